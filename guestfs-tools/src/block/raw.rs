//! Raw disk images.

use super::{BlockDevice, ImageInfo};
use crate::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// A raw image file read with positional reads, so one handle serves many threads.
pub struct RawImage {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawImage {
    pub fn open(path: &Path) -> Result<RawImage> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let size = if meta.file_type().is_file() {
            meta.len()
        } else {
            // Block devices report length 0 in metadata; the end offset is the size.
            let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(Error::io(path, std::io::Error::last_os_error()));
            }
            end as u64
        };
        Ok(RawImage {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockDevice for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| {
                Error::corrupt(
                    format!("read of {} bytes past end of image", buf.len()),
                    offset,
                )
            })?;
        let _ = end;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(&self.path, e))
    }

    fn format(&self) -> &'static str {
        "raw"
    }

    fn chain(&self) -> Vec<ImageInfo> {
        vec![ImageInfo {
            path: self.path.clone(),
            format: "raw".into(),
            virtual_size: self.size,
            compat: None,
            cluster_size: None,
            compression: None,
            backing_file: None,
        }]
    }

    /// A range is zero when it holds no data extent (a hole), as SEEK_DATA reports.
    fn is_zero(&self, offset: u64, len: u64) -> bool {
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        if end > self.size || len == 0 {
            return len == 0 && offset <= self.size;
        }
        let Ok(off) = libc::off_t::try_from(offset) else {
            return false;
        };
        // SAFETY: lseek on a descriptor we own; the file position is irrelevant to pread.
        let data = unsafe { libc::lseek(self.file.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data at or after offset.
            return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        }
        data as u64 >= end
    }
}
