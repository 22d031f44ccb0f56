//! Block layer: a disk image seen as a flat array of bytes.
//!
//! Format drivers (raw, qcow2) implement [`BlockDevice`]; [`open_image`] detects the format
//! from the file's magic and follows qcow2 backing chains under the [`OpenOptions`] policy.

use crate::Result;
use std::path::PathBuf;
use std::sync::Arc;

pub mod qcow2;
pub mod raw;

/// A read-only random-access disk. `read_at` must fill `buf` completely; reads past
/// `size()` are an error. Implementations are shareable across threads.
pub trait BlockDevice: Send + Sync {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Human-readable format name ("raw", "qcow2").
    fn format(&self) -> &'static str;
    /// Details for `fatbox-img inspect`: this layer and its backing chain, top first.
    fn chain(&self) -> Vec<ImageInfo>;
    /// Whether a byte range is known to read as zeros without reading it (unallocated
    /// clusters, zero clusters, holes). Used to skip work; `false` is always safe.
    fn is_zero(&self, _offset: u64, _len: u64) -> bool {
        false
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub format: String,
    pub virtual_size: u64,
    /// qcow2 only: "0.10" (v2) or "1.1" (v3).
    pub compat: Option<String>,
    pub cluster_size: Option<u64>,
    pub compression: Option<String>,
    pub backing_file: Option<String>,
}

/// Policy for opening untrusted images.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Directories besides the top image's own directory where backing files may live.
    pub allow_backing_dirs: Vec<PathBuf>,
    /// Force a format instead of probing ("raw" or "qcow2").
    pub format: Option<String>,
}

pub type Device = Arc<dyn BlockDevice>;

/// A window onto part of another device (a partition).
pub struct Slice {
    inner: Device,
    start: u64,
    len: u64,
}

impl Slice {
    pub fn new(inner: Device, start: u64, len: u64) -> Result<Self> {
        let end = start
            .checked_add(len)
            .ok_or_else(|| crate::Error::corrupt("slice overflows", start))?;
        if end > inner.size() {
            return Err(crate::Error::corrupt(
                format!(
                    "region {start:#x}+{len:#x} ends past the disk size {:#x}",
                    inner.size()
                ),
                start,
            ));
        }
        Ok(Slice { inner, start, len })
    }
}

impl BlockDevice for Slice {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.len)
            .ok_or_else(|| crate::Error::corrupt("read past end of partition", offset))?;
        let _ = end;
        self.inner.read_at(buf, self.start + offset)
    }
    fn format(&self) -> &'static str {
        self.inner.format()
    }
    fn chain(&self) -> Vec<ImageInfo> {
        self.inner.chain()
    }
    fn is_zero(&self, offset: u64, len: u64) -> bool {
        self.inner.is_zero(self.start + offset, len)
    }
}

/// Opens a disk image, probing its format unless `opts.format` says otherwise.
pub fn open_image(path: &std::path::Path, opts: &OpenOptions) -> Result<Device> {
    let _ = (path, opts);
    Err(crate::Error::Unsupported(
        "block layer not built yet".into(),
    ))
}
