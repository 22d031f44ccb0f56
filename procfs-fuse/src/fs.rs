//! The FUSE filesystem: a fixed tree of directories and the virtualised files.
//!
//! Inode numbers are fixed so that a restarted daemon serves the same inodes the kernel
//! (and every bind mount in a container) still references.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, Request,
};

use crate::registry::Registry;
use crate::render::{render, FileKind};

const TTL: Duration = Duration::from_secs(3600);
const SHARDS: usize = 16;

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Dir,
    File(FileKind),
}

/// (ino, parent ino, name, node). Inode 1 is the root.
pub const TREE: &[(u64, u64, &str, Node)] = &[
    (1, 1, "", Node::Dir),
    (2, 1, "proc", Node::Dir),
    (3, 1, "sys", Node::Dir),
    (4, 3, "devices", Node::Dir),
    (5, 4, "system", Node::Dir),
    (6, 5, "cpu", Node::Dir),
    (10, 2, "meminfo", Node::File(FileKind::Meminfo)),
    (11, 2, "cpuinfo", Node::File(FileKind::Cpuinfo)),
    (12, 2, "stat", Node::File(FileKind::Stat)),
    (13, 2, "uptime", Node::File(FileKind::Uptime)),
    (14, 2, "loadavg", Node::File(FileKind::Loadavg)),
    (15, 2, "diskstats", Node::File(FileKind::Diskstats)),
    (16, 2, "swaps", Node::File(FileKind::Swaps)),
    (17, 6, "online", Node::File(FileKind::Online)),
];

fn node(ino: u64) -> Option<Node> {
    TREE.iter().find(|t| t.0 == ino).map(|t| t.3)
}

fn attr(ino: u64, n: Node) -> FileAttr {
    let (kind, perm, nlink) = match n {
        Node::Dir => (FileType::Directory, 0o555, 2),
        Node::File(_) => (FileType::RegularFile, 0o444, 1),
    };
    FileAttr {
        ino: INodeNo(ino),
        // Size 0 like /proc: readers read until EOF, direct I/O makes that work.
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind,
        perm,
        nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

type Shard = Mutex<HashMap<u64, Arc<Vec<u8>>>>;

/// Per-open snapshots, sharded by handle to keep lock contention low with many threads.
struct Snapshots {
    shards: Vec<Shard>,
}

impl Snapshots {
    fn new() -> Self {
        Snapshots {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
    fn shard(&self, fh: u64) -> Option<&Shard> {
        self.shards
            .get(usize::try_from(fh % SHARDS as u64).unwrap_or(0))
    }
    fn get(&self, fh: u64) -> Option<Arc<Vec<u8>>> {
        self.shard(fh)?.lock().ok()?.get(&fh).cloned()
    }
    fn put(&self, fh: u64, data: Arc<Vec<u8>>) {
        if let Some(Ok(mut m)) = self.shard(fh).map(|s| s.lock()) {
            m.insert(fh, data);
        }
    }
    fn remove(&self, fh: u64) {
        if let Some(Ok(mut m)) = self.shard(fh).map(|s| s.lock()) {
            m.remove(&fh);
        }
    }
}

type RenderCache = Mutex<HashMap<(String, FileKind), (Instant, Arc<Vec<u8>>)>>;

/// The filesystem served over FUSE.
pub struct ProcFs {
    reg: Arc<Registry>,
    next_fh: AtomicU64,
    snaps: Snapshots,
    /// Renders younger than this are shared between opens of the same container's file;
    /// cgroup v1 memory.stat alone costs ~200 µs per read, so bursts of readers coalesce.
    coalesce: Duration,
    cache: RenderCache,
}

impl ProcFs {
    /// `coalesce`: see [`ProcFs`]; zero renders on every open.
    pub fn new(reg: Arc<Registry>, coalesce: Duration) -> Self {
        // Handles of a previous daemon instance may still be open after a restart; start
        // far from them (they are served by rendering afresh, see `read`).
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            << 8;
        ProcFs {
            reg,
            next_fh: AtomicU64::new(seed | 1),
            snaps: Snapshots::new(),
            coalesce,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn render_for(&self, kind: FileKind, pid: u32) -> crate::Result<Arc<Vec<u8>>> {
        let Some(entry) = self.reg.lookup(pid) else {
            return render(self.reg.hierarchy(), kind, None).map(Arc::new);
        };
        let key = (entry.record.cgroup.clone(), kind);
        if !self.coalesce.is_zero() {
            if let Ok(c) = self.cache.lock() {
                if let Some((t, d)) = c.get(&key) {
                    if t.elapsed() < self.coalesce {
                        return Ok(d.clone());
                    }
                }
            }
        }
        let data = Arc::new(render(self.reg.hierarchy(), kind, Some(&entry.ctx()))?);
        if !self.coalesce.is_zero() {
            if let Ok(mut c) = self.cache.lock() {
                // Bounded: drop stale entries when many containers come and go.
                if c.len() > 4096 {
                    let ttl = self.coalesce;
                    c.retain(|_, (t, _)| t.elapsed() < ttl);
                }
                c.insert(key, (Instant::now(), data.clone()));
            }
        }
        Ok(data)
    }
}

impl Filesystem for ProcFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = TREE
            .iter()
            .find(|t| t.1 == parent.0 && t.0 != 1 && OsStr::new(t.2) == name);
        match found {
            Some(t) => reply.entry(&TTL, &attr(t.0, t.3), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match node(ino.0) {
            Some(n) => reply.attr(&TTL, &attr(ino.0, n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match node(ino.0) {
            Some(Node::File(_)) => {}
            Some(Node::Dir) => return reply.error(Errno::EISDIR),
            None => return reply.error(Errno::ENOENT),
        }
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EACCES);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(Node::File(kind)) = node(ino.0) else {
            return reply.error(Errno::EISDIR);
        };
        let snap = match (offset, self.snaps.get(fh.0)) {
            (o, Some(s)) if o != 0 => s,
            // Offset 0, or a handle we never saw (opened before a restart): render now.
            _ => match self.render_for(kind, req.pid()) {
                Ok(d) => {
                    self.snaps.put(fh.0, d.clone());
                    d
                }
                Err(e) => {
                    tracing::warn!(file = kind.name(), pid = req.pid(), error = %e, "render failed");
                    return reply.error(Errno::EIO);
                }
            },
        };
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(snap.len());
        let end = start
            .saturating_add(usize::try_from(size).unwrap_or(0))
            .min(snap.len());
        reply.data(snap.get(start..end).unwrap_or(&[]));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.snaps.remove(fh.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match node(ino.0) {
            Some(Node::Dir) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Some(Node::File(_)) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if node(ino.0) != Some(Node::Dir) {
            return reply.error(Errno::ENOTDIR);
        }
        let parent = TREE.iter().find(|t| t.0 == ino.0).map_or(1, |t| t.1);
        let mut entries: Vec<(u64, FileType, &str)> = vec![
            (ino.0, FileType::Directory, "."),
            (parent, FileType::Directory, ".."),
        ];
        for t in TREE.iter().filter(|t| t.1 == ino.0 && t.0 != 1) {
            let kind = match t.3 {
                Node::Dir => FileType::Directory,
                Node::File(_) => FileType::RegularFile,
            };
            entries.push((t.0, kind, t.2));
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            let next = u64::try_from(i).unwrap_or(u64::MAX).saturating_add(1);
            if reply.add(INodeNo(ino), next, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match node(ino.0) {
            None => reply.error(Errno::ENOENT),
            Some(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Some(_) => reply.ok(),
        }
    }
}
