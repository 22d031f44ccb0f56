//! Test and fuzz helpers: simple block devices and the fuzz entry point.

use super::{Ext4, FileType, ROOT_INO};
use crate::block::{BlockDevice, ImageInfo};
use crate::{Error, Result};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A device backed by bytes in memory.
#[doc(hidden)]
pub struct MemDevice(pub Vec<u8>);

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.0.get(o..o.checked_add(buf.len())?))
            .ok_or_else(|| Error::corrupt("read past the end of the device", offset))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn format(&self) -> &'static str {
        "raw"
    }
    fn chain(&self) -> Vec<ImageInfo> {
        Vec::new()
    }
}

/// A device backed by a plain file (read with pread).
#[doc(hidden)]
pub struct FileDevice {
    file: std::fs::File,
    size: u64,
    path: PathBuf,
}

impl FileDevice {
    pub fn open(path: &Path) -> Result<FileDevice> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        Ok(FileDevice {
            file,
            size,
            path: path.to_path_buf(),
        })
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(Error::corrupt("read past the end of the device", offset));
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(&self.path, e))
    }
    fn format(&self) -> &'static str {
        "raw"
    }
    fn chain(&self) -> Vec<ImageInfo> {
        Vec::new()
    }
}

/// Fuzz entry: opens `data` as a filesystem and walks it with bounded work. Must never
/// panic, hang or allocate without bound whatever the input.
#[doc(hidden)]
pub fn fuzz_one(data: &[u8]) {
    let dev: crate::block::Device = Arc::new(MemDevice(data.to_vec()));
    if !Ext4::probe(dev.as_ref()) {
        return;
    }
    let Ok(fs) = Ext4::open(dev) else {
        return;
    };
    let mut todo = vec![ROOT_INO];
    let mut visited = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while let Some(ino) = todo.pop() {
        visited += 1;
        if visited > 256 {
            break;
        }
        let Ok(inode) = fs.inode(ino) else {
            continue;
        };
        let _ = fs.xattrs(&inode);
        match inode.file_type() {
            FileType::Directory => {
                if let Ok(entries) = fs.read_dir(ino) {
                    todo.extend(entries.iter().take(64).map(|e| e.ino));
                }
            }
            FileType::Symlink => {
                let _ = fs.read_link(&inode);
            }
            FileType::Regular => {
                let _ = fs.read_at(&inode, 0, &mut buf);
                let _ = fs.read_at(&inode, inode.size.saturating_sub(100), &mut buf);
                let _ = fs.data_runs(&inode);
            }
            _ => {}
        }
    }
    let _ = fs.lookup(b"/etc/../etc/./fstab");
}
