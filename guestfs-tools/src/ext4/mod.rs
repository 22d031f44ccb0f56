//! ext2/3/4 reader in user space. STUB (lead): replaced by the ext4 branch.
use crate::block::{BlockDevice, Device};
use crate::{Error, Result};

pub const ROOT_INO: u32 = 2;

#[derive(Debug, Clone, serde::Serialize)]
pub struct FsInfo {
    pub kind: &'static str,
    pub uuid: String,
    pub label: Option<String>,
    pub block_size: u32,
    pub blocks: u64,
    pub inodes: u32,
    pub free_blocks: u64,
    pub journal_replayed: u32,
    pub last_mounted: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    Regular,
    Directory,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

#[derive(Debug, Clone)]
pub struct Inode {
    pub ino: u32,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub links: u16,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Option<Timestamp>,
    pub flags: u32,
    pub rdev: (u32, u32),
}

impl Inode {
    pub fn file_type(&self) -> FileType {
        match self.mode & 0o170000 {
            0o040000 => FileType::Directory,
            0o120000 => FileType::Symlink,
            0o020000 => FileType::CharDevice,
            0o060000 => FileType::BlockDevice,
            0o010000 => FileType::Fifo,
            0o140000 => FileType::Socket,
            _ => FileType::Regular,
        }
    }
    pub fn perm(&self) -> u32 {
        u32::from(self.mode) & 0o7777
    }
}

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u32,
    pub file_type: Option<FileType>,
}

pub struct Ext4 {
    info: FsInfo,
}

impl Ext4 {
    pub fn probe(_dev: &dyn BlockDevice) -> bool {
        false
    }
    pub fn open(_dev: Device) -> Result<Ext4> {
        Err(Error::Unsupported("ext4 stub".into()))
    }
    pub fn info(&self) -> &FsInfo {
        &self.info
    }
    pub fn inode(&self, _ino: u32) -> Result<Inode> {
        Err(Error::Unsupported("ext4 stub".into()))
    }
    pub fn read_dir(&self, _ino: u32) -> Result<Vec<DirEntry>> {
        Err(Error::Unsupported("ext4 stub".into()))
    }
    pub fn lookup(&self, _path: &[u8]) -> Result<Option<u32>> {
        Err(Error::Unsupported("ext4 stub".into()))
    }
    pub fn read_link(&self, _inode: &Inode) -> Result<Vec<u8>> {
        Err(Error::Unsupported("ext4 stub".into()))
    }
    pub fn xattrs(&self, _inode: &Inode) -> Result<Vec<(String, Vec<u8>)>> {
        Err(Error::Unsupported("ext4 stub".into()))
    }
    pub fn read_at(&self, _inode: &Inode, _offset: u64, _buf: &mut [u8]) -> Result<usize> {
        Err(Error::Unsupported("ext4 stub".into()))
    }
    pub fn data_runs(&self, _inode: &Inode) -> Result<Vec<(u64, u64)>> {
        Err(Error::Unsupported("ext4 stub".into()))
    }
}
