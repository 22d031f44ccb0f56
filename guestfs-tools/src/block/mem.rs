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

    /// Gives the buffer back, so a caller that opens many images (the fuzz targets) can reuse
    /// one allocation instead of mapping and faulting in a fresh one each time.
    pub fn into_data(self) -> Vec<u8> {
        self.data
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

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on a [`MemDevice`] holding a copy of `data`, reusing one buffer per thread. For
/// fuzz targets: under ASan every allocation above 128 KiB is a fresh mmap whose pages are
/// zeroed on first touch, which cost more than parsing a typical input.
#[doc(hidden)]
pub fn with_mem_device<R>(
    data: &[u8],
    name: &std::path::Path,
    f: impl FnOnce(std::sync::Arc<MemDevice>) -> R,
) -> R {
    let mut buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    buf.clear();
    buf.extend_from_slice(data);
    let dev = std::sync::Arc::new(MemDevice::new(buf, name));
    let out = f(dev.clone());
    // Only reusable when nothing kept a reference (a parser holding the device past `f` would
    // simply cost the next call an allocation).
    if let Ok(d) = std::sync::Arc::try_unwrap(dev) {
        SCRATCH.with(|s| *s.borrow_mut() = d.into_data());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn with_mem_device_copies_and_reuses_its_buffer() {
        let first = with_mem_device(b"abcdef", Path::new("a.img"), |d| {
            let mut b = [0u8; 3];
            d.read_at(&mut b, 2).expect("read");
            assert_eq!(&b, b"cde");
            assert_eq!(d.size(), 6);
            SCRATCH.with(|s| s.borrow().capacity())
        });
        // Taken out while in use, put back afterwards with the input's capacity.
        assert_eq!(first, 0);
        let cap = SCRATCH.with(|s| s.borrow().capacity());
        assert!(cap >= 6);
        // A shorter input: same allocation, only its bytes visible.
        with_mem_device(b"xy", Path::new("b.img"), |d| {
            assert_eq!(d.size(), 2);
            assert!(d.read_at(&mut [0u8; 3], 0).is_err());
        });
        assert_eq!(SCRATCH.with(|s| s.borrow().capacity()), cap);
        // A device kept alive past the call is not reused (and nothing breaks).
        let kept = with_mem_device(b"zz", Path::new("c.img"), |d| d);
        assert_eq!(kept.size(), 2);
        assert_eq!(SCRATCH.with(|s| s.borrow().capacity()), 0);
    }
}
