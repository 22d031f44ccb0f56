//! Advisory file locks (flock): they bind open file descriptions, so they exclude other
//! processes *and* other threads of this one that opened the file themselves, and the kernel
//! drops them when a holder dies — a kill -9 never leaves a cache locked.

use crate::error::{io, Result};
use rustix::fs::{flock, FlockOperation};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

pub struct FileLock {
    _file: File,
    pub path: PathBuf,
}

fn open(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(path))
}

impl FileLock {
    /// Blocks until the lock is held (call from a blocking context).
    pub fn exclusive(path: &Path) -> Result<FileLock> {
        let f = open(path)?;
        flock(&f, FlockOperation::LockExclusive)
            .map_err(|e| crate::Error::io(path, std::io::Error::from(e)))?;
        Ok(FileLock {
            _file: f,
            path: path.to_path_buf(),
        })
    }

    /// Takes the lock if nobody holds it.
    pub fn try_exclusive(path: &Path) -> Result<Option<FileLock>> {
        let f = open(path)?;
        match flock(&f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(FileLock {
                _file: f,
                path: path.to_path_buf(),
            })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(crate::Error::io(path, std::io::Error::from(e))),
        }
    }
}
