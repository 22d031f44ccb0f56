//! ext2/3/4 reader in user space.
//!
//! Guest images are untrusted: every on-disk number is checked before use, allocations are
//! capped, and a journal that needs recovery is replayed into an in-memory overlay (the image
//! is never written).

mod bytes;
mod csum;
mod dev;
mod dir;
mod fast_commit;
mod inode;
mod journal;
mod map;
mod sb;
mod xattr;

#[doc(hidden)]
pub use dev::fuzz_one;

use crate::block::{BlockDevice, Device};
use crate::{Error, Result};
use sb::Superblock;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

pub const ROOT_INO: u32 = 2;

/// Bytes per large device read; big enough to run at disk speed.
const BIG_READ: usize = 1 << 20;
/// Metadata blocks kept in memory (inode tables, extent/indirect nodes, directories).
const CACHE_BLOCKS: usize = 1024;
/// Deepest path `lookup` walks.
const MAX_PATH_COMPONENTS: usize = 4096;

#[derive(Debug, Clone, serde::Serialize)]
pub struct FsInfo {
    /// "ext2", "ext3" or "ext4", decided like blkid does.
    pub kind: &'static str,
    /// Lowercase hyphenated, as blkid prints it.
    pub uuid: String,
    pub label: Option<String>,
    pub block_size: u32,
    pub blocks: u64,
    pub inodes: u32,
    pub free_blocks: u64,
    /// Journal transactions replayed in memory at open.
    pub journal_replayed: u32,
    /// Fast-commit tags replayed in memory at open (after the regular log).
    pub fast_commit_replayed: u32,
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
    /// Full st_mode including the type bits.
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
    /// (major, minor) for device nodes, (0, 0) otherwise.
    pub rdev: (u32, u32),
    i_block: [u8; 60],
    /// i_blocks converted to 512-byte units.
    sectors: u64,
    file_acl: u64,
    /// The in-inode extended attribute area (after i_extra_isize), possibly empty.
    ibody: Vec<u8>,
    /// Seed of this inode's extent and directory block checksums (metadata_csum).
    csum_seed: u32,
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

    /// Metadata of a file read through another backend (a kernel-mounted filesystem): no
    /// block map, no in-inode xattrs; the caller fills the public fields.
    pub(crate) fn detached(ino: u32, mode: u16) -> Inode {
        Inode {
            ino,
            mode,
            uid: 0,
            gid: 0,
            size: 0,
            links: 1,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            crtime: None,
            flags: 0,
            rdev: (0, 0),
            i_block: [0; 60],
            sectors: 0,
            file_acl: 0,
            ibody: Vec::new(),
            csum_seed: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u32,
    /// From the directory entry when the filesystem records types (`filetype` feature).
    pub file_type: Option<FileType>,
}

/// Small LRU: evicts the older half in one go so a miss costs O(1) amortized.
struct BlockCache {
    map: HashMap<u64, (Arc<[u8]>, u64)>,
    tick: u64,
}

impl BlockCache {
    fn get(&mut self, blk: u64) -> Option<Arc<[u8]>> {
        self.tick = self.tick.wrapping_add(1);
        let t = self.tick;
        self.map.get_mut(&blk).map(|e| {
            e.1 = t;
            e.0.clone()
        })
    }
    fn put(&mut self, blk: u64, data: Arc<[u8]>) {
        if self.map.len() >= CACHE_BLOCKS {
            let mut ticks: Vec<u64> = self.map.values().map(|e| e.1).collect();
            ticks.sort_unstable();
            let cut = ticks.get(ticks.len() / 2).copied().unwrap_or(u64::MAX);
            self.map.retain(|_, e| e.1 > cut);
        }
        self.tick = self.tick.wrapping_add(1);
        self.map.insert(blk, (data, self.tick));
    }
}

pub struct Ext4 {
    dev: Device,
    sb: Superblock,
    info: FsInfo,
    /// Journal replay result: filesystem block → its committed contents.
    overlay: journal::Overlay,
    /// Fast-commit replay result, consulted before the disk.
    fc: fast_commit::FcState,
    cache: Mutex<BlockCache>,
    /// The filesystem's checksum seed when metadata checksums are verified.
    csum: Option<u32>,
}

impl std::fmt::Debug for Ext4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ext4").field("info", &self.info).finish()
    }
}

impl Ext4 {
    /// Whether the device holds an ext2/3/4 superblock (magic only).
    pub fn probe(dev: &dyn BlockDevice) -> bool {
        let mut m = [0u8; 2];
        dev.size() >= sb::SB_OFFSET + sb::SB_SIZE as u64
            && dev.read_at(&mut m, sb::SB_OFFSET + 0x38).is_ok()
            && u16::from_le_bytes(m) == sb::MAGIC
    }

    /// Opens the filesystem, replaying a journal that needs recovery in memory, and verifying
    /// metadata checksums when the filesystem has them.
    pub fn open(dev: Device) -> Result<Ext4> {
        Self::open_with(dev, true)
    }

    /// [`Ext4::open`], with metadata checksum verification switchable (off reads a damaged
    /// filesystem as far as its structure allows, like `debugfs -n`).
    pub fn open_with(dev: Device, verify_csum: bool) -> Result<Ext4> {
        let mut raw = vec![0u8; sb::SB_SIZE];
        if dev.size() < sb::SB_OFFSET + sb::SB_SIZE as u64 {
            return Err(Error::corrupt("device too small for an ext superblock", 0));
        }
        dev.read_at(&mut raw, sb::SB_OFFSET)?;
        let sb = Superblock::parse(&raw)?;
        let fs_bytes = sb.blocks_count.saturating_mul(u64::from(sb.block_size));
        if fs_bytes > dev.size() {
            tracing::warn!(
                fs_bytes,
                device = dev.size(),
                "filesystem is larger than its device (truncated image?)"
            );
        }
        let mut fs = Ext4 {
            dev,
            info: Self::make_info(&sb, 0),
            sb,
            overlay: BTreeMap::new(),
            fc: fast_commit::FcState::default(),
            cache: Mutex::new(BlockCache {
                map: HashMap::new(),
                tick: 0,
            }),
            csum: None,
        };
        if fs.sb.has_compat(sb::COMPAT_HAS_JOURNAL) && fs.sb.has_incompat(sb::INCOMPAT_RECOVER) {
            let r = journal::replay(&fs)?;
            tracing::info!(
                transactions = r.transactions,
                blocks = r.overlay.len(),
                fast_commit_tags = r.fc_tags.len(),
                "replayed ext journal in memory"
            );
            fs.overlay = r.overlay;
            fs.clear_cache();
            // The journal usually carries the superblock and group descriptors too.
            fs.read_bytes(sb::SB_OFFSET, &mut raw)?;
            fs.sb = Superblock::parse(&raw)?;
            // Fast commits apply on top of the replayed log, as in the kernel. Checksums are
            // known only after this, so the replay reads unverified metadata; set them first
            // when enabled so that directory and extent reads keep verifying.
            if verify_csum && fs.sb.has_ro_compat(sb::RO_COMPAT_METADATA_CSUM) {
                fs.csum = Some(csum::fs_seed(
                    &raw,
                    fs.sb.has_incompat(sb::INCOMPAT_CSUM_SEED),
                    &fs.sb.uuid,
                ));
            }
            fs.fc_apply(&r.fc_tags)?;
            fs.csum = None;
            fs.info = Self::make_info(&fs.sb, r.transactions);
            fs.info.fast_commit_replayed = fs.fc.tags;
        } else if fs.sb.has_incompat(sb::INCOMPAT_RECOVER) {
            tracing::warn!("needs_recovery set without a journal; ignoring");
        }
        if verify_csum && fs.sb.has_ro_compat(sb::RO_COMPAT_METADATA_CSUM) {
            // After the replay: the journal carries the superblock it commits.
            if fs.sb.checksum_type != 1 {
                return Err(Error::Unsupported(format!(
                    "ext metadata checksum type {} (only crc32c is defined)",
                    fs.sb.checksum_type
                )));
            }
            csum::verify_superblock(&raw, sb::SB_OFFSET)?;
            fs.csum = Some(csum::fs_seed(
                &raw,
                fs.sb.has_incompat(sb::INCOMPAT_CSUM_SEED),
                &fs.sb.uuid,
            ));
        }
        Ok(fs)
    }

    fn make_info(sb: &Superblock, replayed: u32) -> FsInfo {
        FsInfo {
            kind: sb.kind(),
            uuid: sb.uuid_string(),
            label: sb.label.clone(),
            block_size: sb.block_size,
            blocks: sb.blocks_count,
            inodes: sb.inodes_count,
            free_blocks: sb.free_blocks,
            journal_replayed: replayed,
            fast_commit_replayed: 0,
            last_mounted: sb.last_mounted.clone(),
        }
    }

    pub fn info(&self) -> &FsInfo {
        &self.info
    }

    fn clear_cache(&self) {
        if let Ok(mut c) = self.cache.lock() {
            c.map.clear();
        }
    }

    fn bs(&self) -> u64 {
        u64::from(self.sb.block_size)
    }

    /// Reads filesystem bytes, with journal-replayed blocks patched in.
    fn read_bytes(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = off
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::corrupt("read offset overflows", off))?;
        self.dev.read_at(buf, off)?;
        if self.overlay.is_empty() {
            return Ok(());
        }
        let bs = self.bs();
        let first = off / bs;
        let last = (end - 1) / bs;
        for (blk, data) in self.overlay.range(first..=last) {
            let bstart = blk.saturating_mul(bs);
            let from = bstart.max(off);
            let to = bstart.saturating_add(bs).min(end);
            if from >= to {
                continue;
            }
            let src = data.get(usize::try_from(from - bstart).unwrap_or(usize::MAX)..);
            let dst = buf.get_mut(
                usize::try_from(from - off).unwrap_or(usize::MAX)
                    ..usize::try_from(to - off).unwrap_or(usize::MAX),
            );
            if let (Some(src), Some(dst)) = (src, dst) {
                if let Some(src) = src.get(..dst.len()) {
                    dst.copy_from_slice(src);
                }
            }
        }
        Ok(())
    }

    fn check_block(&self, blk: u64, what: &str) -> Result<()> {
        if blk >= self.sb.blocks_count {
            return Err(Error::corrupt(
                format!(
                    "{what}: block {blk} past the end ({} blocks)",
                    self.sb.blocks_count
                ),
                blk.saturating_mul(self.bs()),
            ));
        }
        Ok(())
    }

    /// One metadata block, through the cache.
    fn meta_block(&self, blk: u64, what: &str) -> Result<Arc<[u8]>> {
        self.check_block(blk, what)?;
        if let Ok(mut c) = self.cache.lock() {
            if let Some(b) = c.get(blk) {
                return Ok(b);
            }
        }
        let mut buf = vec![0u8; self.sb.block_size as usize];
        self.read_bytes(blk * self.bs(), &mut buf)?;
        let data: Arc<[u8]> = buf.into();
        if let Ok(mut c) = self.cache.lock() {
            c.put(blk, data.clone());
        }
        Ok(data)
    }

    /// Resolves an absolute path without following symlinks. `..` is handled lexically.
    pub fn lookup(&self, path: &[u8]) -> Result<Option<u32>> {
        lookup_in(path, |ino| self.inode(ino), |ino| self.read_dir(ino))
    }

    /// A sequential reader over a file's contents, reading large runs at once.
    pub fn reader(&self, inode: &Inode) -> impl std::io::Read + '_ {
        FileReader {
            fs: self,
            inode: inode.clone(),
            pos: 0,
            buf: Vec::new(),
            start: 0,
        }
    }
}

struct FileReader<'a> {
    fs: &'a Ext4,
    inode: Inode,
    pos: u64,
    buf: Vec<u8>,
    start: usize,
}

impl std::io::Read for FileReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.start >= self.buf.len() {
            let left = self.inode.size.saturating_sub(self.pos);
            if left == 0 || out.is_empty() {
                return Ok(0);
            }
            // Large caller buffers go straight through; small ones are served from a 1 MiB
            // refill so that the device still sees big reads.
            if out.len() >= BIG_READ {
                let n = self
                    .fs
                    .read_at(&self.inode, self.pos, out)
                    .map_err(std::io::Error::other)?;
                self.pos += n as u64;
                return Ok(n);
            }
            let want = usize::try_from(left.min(BIG_READ as u64)).unwrap_or(BIG_READ);
            self.buf.resize(want, 0);
            let n = self
                .fs
                .read_at(&self.inode, self.pos, &mut self.buf)
                .map_err(std::io::Error::other)?;
            self.buf.truncate(n);
            self.pos += n as u64;
            self.start = 0;
            if n == 0 {
                return Ok(0);
            }
        }
        let avail = self.buf.get(self.start..).unwrap_or(&[]);
        let n = avail.len().min(out.len());
        if let (Some(dst), Some(src)) = (out.get_mut(..n), avail.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.start += n;
        Ok(n)
    }
}

/// The path walk of every reader of a guest tree (this one and the kernel-mount backend):
/// components one by one from the root, `..` lexically (never above the root), no symlink
/// followed, and at most `MAX_PATH_COMPONENTS` components from an untrusted path.
pub(crate) fn lookup_in(
    path: &[u8],
    inode: impl Fn(u32) -> Result<Inode>,
    read_dir: impl Fn(u32) -> Result<Vec<DirEntry>>,
) -> Result<Option<u32>> {
    let mut stack: Vec<u32> = vec![ROOT_INO];
    for (n, comp) in path.split(|c| *c == b'/').enumerate() {
        if n > MAX_PATH_COMPONENTS {
            return Err(Error::Limit(format!(
                "path has more than {MAX_PATH_COMPONENTS} components"
            )));
        }
        match comp {
            b"" | b"." => continue,
            b".." => {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            _ => {}
        }
        let cur = stack.last().copied().unwrap_or(ROOT_INO);
        if inode(cur)?.file_type() != FileType::Directory {
            return Ok(None);
        }
        match read_dir(cur)?.into_iter().find(|e| e.name == comp) {
            Some(e) => stack.push(e.ino),
            None => return Ok(None),
        }
    }
    Ok(stack.last().copied())
}
