//! An image held in memory: used by the fuzz targets and tests to run the format
//! readers without touching the filesystem.

use super::{BlockDevice, ImageInfo};
use crate::{Error, Result};
use std::path::PathBuf;

pub struct MemDevice {
    data: Vec<u8>,
    name: PathBuf,
}

impl MemDevice {
    pub fn new(data: Vec<u8>, name: impl Into<PathBuf>) -> MemDevice {
        MemDevice {
            data,
            name: name.into(),
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| Some(o..o.checked_add(buf.len())?))
            .and_then(|r| self.data.get(r))
            .ok_or_else(|| {
                Error::corrupt(
                    format!("read of {} bytes past end of image", buf.len()),
                    offset,
                )
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn format(&self) -> &'static str {
        "raw"
    }

    fn chain(&self) -> Vec<ImageInfo> {
        vec![ImageInfo {
            path: self.name.clone(),
            format: "raw".into(),
            virtual_size: self.size(),
            compat: None,
            cluster_size: None,
            compression: None,
            backing_file: None,
        }]
    }
}
