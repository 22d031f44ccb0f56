//! Block layer: a disk image seen as a flat array of bytes.
//!
//! Format drivers (raw, qcow2) implement [`BlockDevice`]; [`open_image`] detects the format
//! from the file's magic and follows qcow2 backing chains under the [`OpenOptions`] policy.

use crate::{Error, Result};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

pub mod mem;
pub mod qcow2;
pub mod raw;

pub use mem::{with_mem_device, MemDevice};
pub use qcow2::Qcow2;
pub use raw::RawImage;

/// Longest backing chain below the top image.
pub const MAX_BACKING_DEPTH: usize = 16;

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
    /// Read ext4 filesystems without verifying their metadata checksums.
    pub no_verify_csum: bool,
    /// Mount filesystems the user-space readers cannot read (xfs, btrfs) read-only through
    /// the host kernel (see [`crate::kmount`]). Never the default.
    pub kernel_mount: bool,
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
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return false;
        }
        self.inner.is_zero(self.start + offset, len)
    }
}

/// Opens a disk image, probing its format unless `opts.format` says otherwise.
///
/// qcow2 backing files are followed when they resolve (after symlinks) inside the top
/// image's directory or one of `opts.allow_backing_dirs`; loops and chains deeper than
/// [`MAX_BACKING_DEPTH`] are refused.
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<Device> {
    let mut ctx = ChainCtx::new(path, opts);
    open_layer(path, opts.format.as_deref(), &mut ctx)
}

/// Reads the first bytes and says which format they look like.
pub fn probe(dev: &dyn BlockDevice) -> Result<&'static str> {
    let mut magic = [0u8; 4];
    if dev.size() >= 4 {
        dev.read_at(&mut magic, 0)?;
        if magic == qcow2::MAGIC {
            return Ok("qcow2");
        }
    }
    Ok("raw")
}

pub(crate) fn open_layer(path: &Path, format: Option<&str>, ctx: &mut ChainCtx) -> Result<Device> {
    let canon = path.canonicalize().map_err(|e| Error::io(path, e))?;
    if ctx.seen.contains(&canon) {
        return Err(Error::Refused(format!(
            "backing chain loop: {} appears twice",
            canon.display()
        )));
    }
    if ctx.seen.len() > MAX_BACKING_DEPTH {
        return Err(Error::Limit(format!(
            "backing chain deeper than {MAX_BACKING_DEPTH} at {}",
            path.display()
        )));
    }
    ctx.seen.push(canon);
    let raw: Device = Arc::new(RawImage::open(path)?);
    let fmt = match format {
        Some("raw") => "raw",
        Some("qcow2") => "qcow2",
        Some(other) => return Err(Error::Unsupported(format!("image format {other:?}"))),
        None => probe(raw.as_ref())?,
    };
    tracing::debug!(path = %path.display(), format = fmt, "opening image");
    if fmt == "qcow2" {
        Ok(Arc::new(Qcow2::open_in_chain(raw, path, ctx)?))
    } else {
        Ok(raw)
    }
}

/// Removes `.` and `..` without touching the filesystem.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// State while following one backing chain: where backing files may live, and which
/// files have been opened (loop detection).
pub(crate) struct ChainCtx {
    lexical_roots: Vec<PathBuf>,
    canonical_roots: Vec<PathBuf>,
    pub(crate) seen: Vec<PathBuf>,
}

impl ChainCtx {
    pub(crate) fn new(top: &Path, opts: &OpenOptions) -> ChainCtx {
        let top_dir = absolute(top)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        let dirs: Vec<PathBuf> = std::iter::once(top_dir)
            .chain(opts.allow_backing_dirs.iter().map(|d| absolute(d)))
            .collect();
        ChainCtx {
            lexical_roots: dirs.iter().map(|d| normalize(d)).collect(),
            canonical_roots: dirs.iter().filter_map(|d| d.canonicalize().ok()).collect(),
            seen: Vec::new(),
        }
    }

    /// Turns a backing file name found in `overlay` into a path we agree to open.
    pub(crate) fn resolve_backing(&self, overlay: &Path, name: &str) -> Result<PathBuf> {
        if name.is_empty() || name.contains('\0') {
            return Err(Error::corrupt(
                format!("qcow2 backing file name {name:?} invalid"),
                0,
            ));
        }
        if name.starts_with("json:") || name.contains("://") {
            return Err(Error::Refused(format!(
                "backing file {name:?} uses a QEMU protocol, only plain files are allowed"
            )));
        }
        let base = absolute(overlay)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        let joined = if Path::new(name).is_absolute() {
            PathBuf::from(name)
        } else {
            base.join(name)
        };
        let lex = normalize(&joined);
        let inside = |p: &Path, roots: &[PathBuf]| roots.iter().any(|r| p.starts_with(r));
        if !inside(&lex, &self.lexical_roots) && !inside(&lex, &self.canonical_roots) {
            return Err(Error::Refused(format!(
                "backing file {name:?} of {} resolves to {} outside the allowed directories",
                overlay.display(),
                lex.display()
            )));
        }
        let canon = joined.canonicalize().map_err(|e| Error::io(&joined, e))?;
        if !inside(&canon, &self.canonical_roots) {
            return Err(Error::Refused(format!(
                "backing file {name:?} of {} resolves through a symlink to {} outside the allowed directories",
                overlay.display(),
                canon.display()
            )));
        }
        Ok(canon)
    }
}
