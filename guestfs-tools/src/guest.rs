//! A guest disk seen as the guest sees it: partitions probed, the root filesystem found, and
//! the filesystems its fstab mounts (a separate /boot, /var ...) grafted into one tree.
//!
//! Everything here resolves paths inside the guest root only: `..` stops at the root and
//! absolute symlink targets are taken relative to it, as `chroot` would, so nothing in an
//! image can make us look at (or write to) a host path.

use crate::block::{self, Device, OpenOptions};
use crate::ext4::{DirEntry, Ext4, FileType, Inode, ROOT_INO};
use crate::kmount::{self, DirFs};
use crate::part::{self, PartitionTable, TableKind};
use crate::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Symlinks followed while resolving one path, as Linux's MAXSYMLINKS.
const MAX_SYMLINKS: usize = 40;
/// Directory depth at which a walk gives up: deeper trees are corrupt or hostile.
const MAX_DEPTH: usize = 512;
/// Files read whole into memory by [`Guest::read_file`] (configuration files).
pub const MAX_SMALL_FILE: u64 = 16 << 20;

/// Where a filesystem sits on the disk.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FsLocation {
    /// Partition number as Linux names it (sda1 → 1); `None` for a whole-disk filesystem.
    pub partition: Option<u32>,
    pub start: u64,
    pub size: u64,
    pub partuuid: Option<String>,
    pub partlabel: Option<String>,
}

/// A filesystem found on the disk, readable or not.
#[derive(Clone)]
pub struct GuestFs {
    pub location: FsLocation,
    /// "ext2", "ext3", "ext4", or the name of a filesystem we detect but cannot read
    /// ("xfs", "btrfs", "LVM2_member", "swap", "vfat", "crypto_LUKS", "ntfs"), or "unknown".
    pub kind: String,
    pub ext: Option<Arc<Ext4>>,
    /// The same filesystem mounted read-only by the host kernel (`--kernel-mount`), for the
    /// kinds the user-space readers cannot read.
    pub kernel: Option<Arc<DirFs>>,
    /// Why an ext filesystem could not be opened (corrupt, unsupported feature), or why the
    /// kernel mount failed.
    pub error: Option<String>,
}

impl GuestFs {
    pub fn uuid(&self) -> Option<&str> {
        match (&self.ext, &self.kernel) {
            (Some(e), _) => Some(e.info().uuid.as_str()),
            (None, Some(k)) => k.uuid.as_deref(),
            _ => None,
        }
    }
    pub fn label(&self) -> Option<&str> {
        match (&self.ext, &self.kernel) {
            (Some(e), _) => e.info().label.as_deref(),
            (None, Some(k)) => k.label.as_deref(),
            _ => None,
        }
    }
    /// The reader of this filesystem: the user-space one, else the kernel mount.
    pub fn reader(&self) -> Option<&dyn FsRead> {
        match (&self.ext, &self.kernel) {
            (Some(e), _) => Some(e.as_ref()),
            (None, Some(k)) => Some(k.as_ref()),
            _ => None,
        }
    }
}

/// What the merged tree needs from a filesystem; the ext4 reader and a kernel-mounted
/// directory ([`DirFs`]) provide it. Inode numbers are the backend's own.
pub trait FsRead: Send + Sync {
    fn inode(&self, ino: u32) -> Result<Inode>;
    fn read_dir(&self, ino: u32) -> Result<Vec<DirEntry>>;
    fn read_link(&self, inode: &Inode) -> Result<Vec<u8>>;
    fn read_at(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize>;
    fn xattrs(&self, inode: &Inode) -> Result<Vec<(String, Vec<u8>)>>;
    fn data_runs(&self, inode: &Inode) -> Result<Vec<(u64, u64)>>;
    /// Absolute path → inode, symlinks not followed.
    fn lookup(&self, path: &[u8]) -> Result<Option<u32>>;
    fn used_bytes(&self) -> u64;
}

impl FsRead for Ext4 {
    fn inode(&self, ino: u32) -> Result<Inode> {
        Ext4::inode(self, ino)
    }
    fn read_dir(&self, ino: u32) -> Result<Vec<DirEntry>> {
        Ext4::read_dir(self, ino)
    }
    fn read_link(&self, inode: &Inode) -> Result<Vec<u8>> {
        Ext4::read_link(self, inode)
    }
    fn read_at(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        Ext4::read_at(self, inode, offset, buf)
    }
    fn xattrs(&self, inode: &Inode) -> Result<Vec<(String, Vec<u8>)>> {
        Ext4::xattrs(self, inode)
    }
    fn data_runs(&self, inode: &Inode) -> Result<Vec<(u64, u64)>> {
        Ext4::data_runs(self, inode)
    }
    fn lookup(&self, path: &[u8]) -> Result<Option<u32>> {
        Ext4::lookup(self, path)
    }
    fn used_bytes(&self) -> u64 {
        let i = self.info();
        i.blocks.saturating_sub(i.free_blocks) * u64::from(i.block_size)
    }
}

impl FsRead for DirFs {
    fn inode(&self, ino: u32) -> Result<Inode> {
        DirFs::inode(self, ino)
    }
    fn read_dir(&self, ino: u32) -> Result<Vec<DirEntry>> {
        DirFs::read_dir(self, ino)
    }
    fn read_link(&self, inode: &Inode) -> Result<Vec<u8>> {
        DirFs::read_link(self, inode)
    }
    fn read_at(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        DirFs::read_at(self, inode, offset, buf)
    }
    fn xattrs(&self, inode: &Inode) -> Result<Vec<(String, Vec<u8>)>> {
        DirFs::xattrs(self, inode)
    }
    fn data_runs(&self, inode: &Inode) -> Result<Vec<(u64, u64)>> {
        DirFs::data_runs(self, inode)
    }
    fn lookup(&self, path: &[u8]) -> Result<Option<u32>> {
        DirFs::lookup(self, path)
    }
    fn used_bytes(&self) -> u64 {
        DirFs::used_bytes(self)
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FstabEntry {
    pub spec: String,
    pub mountpoint: String,
    pub fstype: String,
    pub options: String,
}

/// A node in the merged tree: which filesystem, which inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeRef {
    pub fs: usize,
    pub ino: u32,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub r: NodeRef,
    pub inode: Inode,
}

/// One entry of a walk of the merged tree.
pub struct WalkEntry<'a> {
    /// Path relative to the root, without a leading `/` (e.g. `etc/passwd`).
    pub path: &'a [u8],
    pub node: &'a Node,
}

#[derive(Debug, Clone)]
struct Mount {
    /// Absolute, normalized ("/boot").
    path: Vec<u8>,
    fs: usize,
}

pub struct Guest {
    pub path: PathBuf,
    pub disk: Device,
    pub table: PartitionTable,
    pub filesystems: Vec<GuestFs>,
    pub root_fs: usize,
    pub fstab: Vec<FstabEntry>,
    /// Things a user should know about (an fstab entry we could not resolve, ...).
    pub warnings: Vec<String>,
    mounts: Vec<Mount>,
}

impl Guest {
    /// Opens a disk image and assembles the guest tree.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Guest> {
        let disk = block::open_image(path, opts)?;
        Self::assemble(
            path.to_path_buf(),
            disk,
            !opts.no_verify_csum,
            opts.kernel_mount,
        )
    }

    pub fn from_device(path: PathBuf, disk: Device) -> Result<Guest> {
        Self::from_device_with(path, disk, true)
    }

    /// `verify_csum`: check ext4 metadata checksums (see [`Ext4::open_with`]).
    pub fn from_device_with(path: PathBuf, disk: Device, verify_csum: bool) -> Result<Guest> {
        Self::assemble(path, disk, verify_csum, false)
    }

    /// `kernel_mount`: mount the filesystems the user-space readers cannot read through the
    /// host kernel ([`kmount`]); ext2/3/4 stay in user space.
    fn assemble(
        path: PathBuf,
        disk: Device,
        verify_csum: bool,
        kernel_mount: bool,
    ) -> Result<Guest> {
        let table = part::read_partitions(disk.as_ref())?;
        let mut filesystems = Vec::new();
        let mut devs = Vec::new();
        if table.kind == TableKind::None || table.partitions.is_empty() {
            devs.push(disk.clone());
            filesystems.push(probe_fs(
                disk.clone(),
                verify_csum,
                FsLocation {
                    partition: None,
                    start: 0,
                    size: disk.size(),
                    partuuid: None,
                    partlabel: None,
                },
            ));
        } else {
            for p in &table.partitions {
                let dev = p.device(&disk)?;
                devs.push(dev.clone());
                filesystems.push(probe_fs(
                    dev,
                    verify_csum,
                    FsLocation {
                        partition: Some(p.index),
                        start: p.start,
                        size: p.size,
                        partuuid: p.partuuid.clone(),
                        partlabel: p.name.clone(),
                    },
                ));
            }
        }
        if kernel_mount {
            for (fs, dev) in filesystems.iter_mut().zip(&devs) {
                if fs.ext.is_some() || !kmount::can_mount(&fs.kind) {
                    continue;
                }
                match kernel_mount_fs(&path, &disk, fs, dev) {
                    Ok(k) => {
                        fs.kernel = Some(Arc::new(k));
                        fs.error = None;
                    }
                    // Without root nothing can be mounted: say so rather than "no root".
                    Err(Error::Refused(m)) => return Err(Error::Refused(m)),
                    Err(e) => {
                        tracing::warn!(fs = %describe_location(&fs.location), "{e}");
                        fs.error = Some(e.to_string());
                    }
                }
            }
        }
        add_btrfs_root_subvolumes(&mut filesystems)?;
        let root_fs = find_root(&filesystems)?;
        let mut guest = Guest {
            path,
            disk,
            table,
            filesystems,
            root_fs,
            fstab: Vec::new(),
            warnings: Vec::new(),
            mounts: Vec::new(),
        };
        guest.mount_fstab()?;
        Ok(guest)
    }

    fn ext(&self, fs: usize) -> Result<&dyn FsRead> {
        self.filesystems
            .get(fs)
            .and_then(GuestFs::reader)
            .ok_or_else(|| Error::Other(format!("filesystem #{fs} is not readable")))
    }

    pub fn root(&self) -> Result<Node> {
        self.node(NodeRef {
            fs: self.root_fs,
            ino: ROOT_INO,
        })
    }

    pub fn node(&self, r: NodeRef) -> Result<Node> {
        Ok(Node {
            r,
            inode: self.ext(r.fs)?.inode(r.ino)?,
        })
    }

    /// The filesystem mounted at `abs` (normalized absolute path), if any.
    fn mount_at(&self, abs: &[u8]) -> Option<NodeRef> {
        self.mounts.iter().find(|m| m.path == abs).map(|m| NodeRef {
            fs: m.fs,
            ino: ROOT_INO,
        })
    }

    fn mount_fstab(&mut self) -> Result<()> {
        let root = self.resolve(b"/etc/fstab", true)?;
        let Some(node) = root else {
            self.warnings
                .push("the guest has no /etc/fstab: only the root filesystem is used".into());
            return Ok(());
        };
        let text = self.read_node_small(&node)?;
        self.fstab = parse_fstab(&String::from_utf8_lossy(&text));
        let mut mounts: Vec<Mount> = Vec::new();
        for e in self.fstab.clone() {
            if e.mountpoint == "/" || !e.mountpoint.starts_with('/') {
                continue;
            }
            let is_ext = matches!(e.fstype.as_str(), "ext2" | "ext3" | "ext4" | "auto");
            let known_other = matches!(
                e.fstype.as_str(),
                "xfs" | "btrfs" | "vfat" | "ntfs" | "reiserfs" | "jfs" | "zfs" | "f2fs"
            );
            if !is_ext && !known_other {
                continue; // tmpfs, proc, swap, nfs, bind ...: not on this disk
            }
            let optional = e.options.split(',').any(|o| o == "noauto" || o == "nofail");
            let Some(idx) = self.find_fs(&e.spec) else {
                let msg = format!(
                    "fstab: {} for {} matches no filesystem on this disk",
                    e.spec, e.mountpoint
                );
                if optional || e.mountpoint.starts_with("/boot/efi") || e.fstype == "vfat" {
                    self.warnings.push(msg);
                    continue;
                }
                return Err(Error::NotFound(msg));
            };
            let mp = normalize(e.mountpoint.as_bytes())?;
            let idx = match subvol_option(&e.options) {
                Some(sv) if self.filesystems[idx].kernel.is_some() => self.subvol_fs(idx, &sv)?,
                _ => idx,
            };
            let fs = &self.filesystems[idx];
            if fs.reader().is_none() {
                let msg = format!(
                    "{} is {} on {}, which fatbox-img cannot read{}",
                    e.mountpoint,
                    fs.kind,
                    describe_location(&fs.location),
                    fs.error
                        .as_ref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                );
                if optional || fs.kind == "vfat" {
                    self.warnings.push(msg);
                    continue;
                }
                let hint = if kmount::can_mount(&fs.kind) {
                    "; convert it with --kernel-mount or move the data to ext4"
                } else {
                    "; move the data to ext4"
                };
                return Err(Error::Unsupported(format!("{msg}{hint}")));
            }
            if idx == self.root_fs || mounts.iter().any(|m| m.fs == idx || m.path == mp) {
                self.warnings
                    .push(format!("fstab: {} mounted twice, ignored", e.mountpoint));
                continue;
            }
            mounts.push(Mount { path: mp, fs: idx });
        }
        // Parents before children, so a lookup of /var/log/x sees /var first.
        mounts.sort_by_key(|m| m.path.len());
        self.mounts = mounts;
        Ok(())
    }

    /// The filesystem index of btrfs subvolume `sv` of kernel-mounted filesystem `idx`, added
    /// as a view of the same mount the first time.
    fn subvol_fs(&mut self, idx: usize, sv: &str) -> Result<usize> {
        let sv = sv.trim_matches('/');
        let start = self.filesystems[idx].location.start;
        if let Some(i) = self.filesystems.iter().position(|f| {
            f.location.start == start
                && f.kernel.as_ref().and_then(|k| k.subvol.as_deref()) == Some(sv)
        }) {
            return Ok(i);
        }
        let Some(top) = self.filesystems[idx].kernel.clone() else {
            return Ok(idx);
        };
        let mut fs = self.filesystems[idx].clone();
        fs.kernel = Some(Arc::new(top.view(sv)?));
        self.filesystems.push(fs);
        Ok(self.filesystems.len() - 1)
    }

    /// Finds the filesystem an fstab spec names.
    pub fn find_fs(&self, spec: &str) -> Option<usize> {
        let eq = |a: Option<&str>, b: &str| a.is_some_and(|a| a.eq_ignore_ascii_case(b));
        let by = |f: &dyn Fn(&GuestFs) -> bool| self.filesystems.iter().position(f);
        if let Some(u) = spec
            .strip_prefix("UUID=")
            .or_else(|| spec.strip_prefix("/dev/disk/by-uuid/"))
        {
            let u = u.trim_matches('"');
            return by(&|f| eq(f.uuid(), u));
        }
        if let Some(l) = spec
            .strip_prefix("LABEL=")
            .or_else(|| spec.strip_prefix("/dev/disk/by-label/"))
        {
            let l = l.trim_matches('"');
            return by(&|f| f.label() == Some(l));
        }
        if let Some(u) = spec
            .strip_prefix("PARTUUID=")
            .or_else(|| spec.strip_prefix("/dev/disk/by-partuuid/"))
        {
            let u = u.trim_matches('"');
            return by(&|f| eq(f.location.partuuid.as_deref(), u));
        }
        if let Some(l) = spec.strip_prefix("PARTLABEL=") {
            return by(&|f| f.location.partlabel.as_deref() == Some(l.trim_matches('"')));
        }
        // /dev/sda1, /dev/vda2, /dev/xvda1, /dev/hda3: the first disk's partition N.
        let dev = spec.strip_prefix("/dev/")?;
        let rest = ["sd", "vd", "hd", "xvd"]
            .iter()
            .find_map(|p| dev.strip_prefix(p))?;
        let mut chars = rest.chars();
        if chars.next() != Some('a') {
            return None;
        }
        let n: u32 = chars.as_str().parse().ok()?;
        by(&|f| f.location.partition == Some(n))
    }

    /// Resolves an absolute guest path, following symlinks in every component (and in the
    /// last one when `follow_last`), chroot-style. `Ok(None)` when it does not exist.
    pub fn resolve(&self, path: &[u8], follow_last: bool) -> Result<Option<Node>> {
        Ok(self.resolve_path(path, follow_last)?.map(|(node, _)| node))
    }

    /// As [`Guest::resolve`], also returning the canonical absolute path found.
    pub fn resolve_path(&self, path: &[u8], follow_last: bool) -> Result<Option<(Node, Vec<u8>)>> {
        let mut links = 0usize;
        // Work list of components still to walk, in order.
        let mut todo: Vec<Vec<u8>> = components(path).map(<[u8]>::to_vec).collect();
        todo.reverse();
        let mut stack: Vec<(Node, Vec<u8>)> = vec![(self.root()?, Vec::new())];
        while let Some(comp) = todo.pop() {
            let is_last = todo.is_empty();
            if comp == b".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let (cur, cur_path) = match stack.last() {
                Some(top) => top.clone(),
                None => return Err(Error::Other("path resolution lost its root".into())),
            };
            if cur.inode.file_type() != FileType::Directory {
                return Ok(None);
            }
            let mut child_path = cur_path.clone();
            child_path.push(b'/');
            child_path.extend_from_slice(&comp);
            let child = match self.mount_at(&child_path) {
                Some(m) => Some(m),
                None => self.child(&cur, &comp)?,
            };
            let Some(child) = child else {
                return Ok(None);
            };
            let node = self.node(child)?;
            if node.inode.file_type() == FileType::Symlink && (!is_last || follow_last) {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Error::Other(format!(
                        "too many levels of symbolic links resolving {}",
                        String::from_utf8_lossy(path)
                    )));
                }
                let target = self.ext(node.r.fs)?.read_link(&node.inode)?;
                if target.first() == Some(&b'/') {
                    stack.truncate(1);
                }
                for c in components(&target).collect::<Vec<_>>().into_iter().rev() {
                    todo.push(c.to_vec());
                }
                continue;
            }
            stack.push((node, child_path));
        }
        Ok(stack.pop().map(|(n, p)| {
            let p = if p.is_empty() { b"/".to_vec() } else { p };
            (n, p)
        }))
    }

    fn is_empty_dir(&self, node: &Node) -> Result<bool> {
        Ok(node.inode.file_type() == FileType::Directory
            && self.ext(node.r.fs)?.read_dir(node.r.ino)?.is_empty())
    }

    fn child(&self, dir: &Node, name: &[u8]) -> Result<Option<NodeRef>> {
        let entries = self.ext(dir.r.fs)?.read_dir(dir.r.ino)?;
        Ok(entries
            .into_iter()
            .find(|e| e.name == name)
            .map(|e| NodeRef {
                fs: dir.r.fs,
                ino: e.ino,
            }))
    }

    /// The children of a directory node, with mounts substituted, sorted by name. `abs` is the
    /// directory's absolute path in the guest (to find what is mounted below it).
    pub fn list(&self, dir: &Node, abs: &[u8]) -> Result<Vec<(Vec<u8>, Node)>> {
        let entries: Vec<DirEntry> = self.ext(dir.r.fs)?.read_dir(dir.r.ino)?;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            check_name(&e.name, abs)?;
            let mut p = abs.to_vec();
            if p.last() != Some(&b'/') {
                p.push(b'/');
            }
            p.extend_from_slice(&e.name);
            let r = self.mount_at(&p).unwrap_or(NodeRef {
                fs: dir.r.fs,
                ino: e.ino,
            });
            out.push((e.name, self.node(r)?));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Reads a whole (small) file: configuration files for inspection and containerize ops.
    pub fn read_node_small(&self, node: &Node) -> Result<Vec<u8>> {
        if node.inode.size > MAX_SMALL_FILE {
            return Err(Error::Limit(format!(
                "file of {} bytes is too large to read whole (cap {MAX_SMALL_FILE})",
                node.inode.size
            )));
        }
        let mut buf = vec![0u8; node.inode.size as usize];
        self.read_at(node, 0, &mut buf)?;
        Ok(buf)
    }

    /// Reads a file by absolute guest path, following symlinks; `None` if absent or not a file.
    pub fn read_file(&self, path: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.resolve(path, true)? {
            Some(n) if n.inode.file_type() == FileType::Regular => {
                Ok(Some(self.read_node_small(&n)?))
            }
            _ => Ok(None),
        }
    }

    /// Fills `buf` from `offset` of a regular file; short only at the end of the file.
    pub fn read_at(&self, node: &Node, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let ext = self.ext(node.r.fs)?;
        let mut done = 0;
        while done < buf.len() {
            let n = ext.read_at(&node.inode, offset + done as u64, &mut buf[done..])?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    pub fn read_link(&self, node: &Node) -> Result<Vec<u8>> {
        self.ext(node.r.fs)?.read_link(&node.inode)
    }

    pub fn xattrs(&self, node: &Node) -> Result<Vec<(String, Vec<u8>)>> {
        self.ext(node.r.fs)?.xattrs(&node.inode)
    }

    pub fn data_runs(&self, node: &Node) -> Result<Vec<(u64, u64)>> {
        self.ext(node.r.fs)?.data_runs(&node.inode)
    }

    /// Bytes in use on the filesystems making up the tree (for progress bars).
    pub fn used_bytes(&self) -> u64 {
        let mut fss = vec![self.root_fs];
        fss.extend(self.mounts.iter().map(|m| m.fs));
        // Subvolumes of one btrfs share its space: count each partition once.
        let mut starts = HashSet::new();
        fss.retain(|i| {
            self.filesystems
                .get(*i)
                .is_some_and(|f| starts.insert(f.location.start))
        });
        fss.iter()
            .filter_map(|i| self.filesystems.get(*i)?.reader())
            .map(FsRead::used_bytes)
            .sum()
    }

    /// Absolute mount points grafted into the tree (besides `/`), with their filesystem index.
    pub fn mounts(&self) -> Vec<(String, usize)> {
        self.mounts
            .iter()
            .map(|m| (String::from_utf8_lossy(&m.path).into_owned(), m.fs))
            .collect()
    }

    /// Depth-first walk of the merged tree in name order, directories before their contents.
    /// The root itself is not visited. A directory reached twice (a loop or a hard-linked
    /// directory) is a corrupt image.
    pub fn walk(&self, f: &mut dyn FnMut(&WalkEntry) -> Result<()>) -> Result<()> {
        let root = self.root()?;
        let mut seen_dirs: HashSet<NodeRef> = HashSet::new();
        seen_dirs.insert(root.r);
        let mut path = Vec::with_capacity(256);
        self.walk_dir(&root, &mut path, 0, &mut seen_dirs, f)
    }

    fn walk_dir(
        &self,
        dir: &Node,
        path: &mut Vec<u8>,
        depth: usize,
        seen: &mut HashSet<NodeRef>,
        f: &mut dyn FnMut(&WalkEntry) -> Result<()>,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(Error::Limit(format!(
                "directory nesting deeper than {MAX_DEPTH} at /{}",
                String::from_utf8_lossy(path)
            )));
        }
        let mut abs = Vec::with_capacity(path.len() + 1);
        abs.push(b'/');
        abs.extend_from_slice(path);
        for (name, node) in self.list(dir, &abs)? {
            if dir.r.ino == ROOT_INO && name == b"lost+found" && self.is_empty_dir(&node)? {
                // mkfs' recovery directory belongs to the filesystem, not to the guest's files.
                continue;
            }
            let base = path.len();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            let is_dir = node.inode.file_type() == FileType::Directory;
            if is_dir && !seen.insert(node.r) {
                return Err(Error::corrupt(
                    format!(
                        "directory loop: /{} (inode {}) is reached twice",
                        String::from_utf8_lossy(path),
                        node.r.ino
                    ),
                    0,
                ));
            }
            f(&WalkEntry { path, node: &node })?;
            if is_dir {
                self.walk_dir(&node, path, depth + 1, seen, f)?;
            }
            path.truncate(base);
        }
        Ok(())
    }
}

/// A directory entry name must be one path component.
fn check_name(name: &[u8], dir: &[u8]) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Error::corrupt(
            format!(
                "invalid file name {:?} in directory {}",
                String::from_utf8_lossy(name),
                String::from_utf8_lossy(dir)
            ),
            0,
        ));
    }
    Ok(())
}

fn components(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
}

/// Lexical normalization of an absolute mount point; `..` is refused (fstab has no business
/// climbing).
fn normalize(p: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for c in components(p) {
        if c == b".." {
            return Err(Error::Refused(format!(
                "fstab mount point {} contains '..'",
                String::from_utf8_lossy(p)
            )));
        }
        out.push(b'/');
        out.extend_from_slice(c);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    Ok(out)
}

pub fn parse_fstab(text: &str) -> Vec<FstabEntry> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some(FstabEntry {
                spec: unescape_fstab(f.next()?),
                mountpoint: unescape_fstab(f.next()?),
                fstype: f.next().unwrap_or("auto").to_string(),
                options: f.next().unwrap_or("defaults").to_string(),
            })
        })
        .collect()
}

/// fstab escapes spaces and tabs as octal (`\040`).
fn unescape_fstab(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')));
        match octal.and_then(|v| u8::try_from(v).ok()) {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn describe_location(l: &FsLocation) -> String {
    match l.partition {
        Some(n) => format!("partition {n}"),
        None => "the whole disk".into(),
    }
}

/// Reads a few bytes at `off`, or `None` if the device is too small.
fn peek(dev: &Device, off: u64, len: usize) -> Option<Vec<u8>> {
    if off.checked_add(len as u64)? > dev.size() {
        return None;
    }
    let mut buf = vec![0u8; len];
    dev.read_at(&mut buf, off).ok()?;
    Some(buf)
}

fn probe_fs(dev: Device, verify_csum: bool, location: FsLocation) -> GuestFs {
    let mut fs = GuestFs {
        location,
        kind: "unknown".into(),
        ext: None,
        kernel: None,
        error: None,
    };
    if Ext4::probe(dev.as_ref()) {
        match Ext4::open_with(dev, verify_csum) {
            Ok(e) => {
                fs.kind = e.info().kind.to_string();
                fs.ext = Some(Arc::new(e));
            }
            Err(e) => {
                fs.kind = "ext".into();
                fs.error = Some(e.to_string());
            }
        }
        return fs;
    }
    let sig = |off: u64, magic: &[u8]| peek(&dev, off, magic.len()).is_some_and(|b| b == magic);
    fs.kind = if sig(0, b"XFSB") {
        "xfs"
    } else if sig(0x10040, b"_BHRfS_M") {
        "btrfs"
    } else if sig(512 + 24, b"LVM2 001") || sig(512, b"LABELONE") {
        "LVM2_member"
    } else if sig(0, b"LUKS\xba\xbe") {
        "crypto_LUKS"
    } else if sig(4086, b"SWAPSPACE2") || sig(4086, b"SWAP-SPACE") {
        "swap"
    } else if sig(3, b"NTFS    ") {
        "ntfs"
    } else if sig(0x52, b"FAT32   ") || sig(0x36, b"FAT16   ") || sig(0x36, b"FAT12   ") {
        "vfat"
    } else {
        "unknown"
    }
    .to_string();
    fs
}

fn looks_like_root(e: &dyn FsRead) -> Result<bool> {
    let has = |p: &[u8]| e.lookup(p).map(|i| i.is_some());
    Ok(has(b"/etc")? && (has(b"/usr")? || has(b"/bin")? || has(b"/sbin")?))
}

/// `subvol=NAME` of a btrfs fstab entry.
fn subvol_option(options: &str) -> Option<String> {
    options
        .split(',')
        .find_map(|o| o.strip_prefix("subvol="))
        .map(str::to_string)
}

/// Distributions put a btrfs root in a subvolume (`@`, `root`) of the top level, which is what
/// we mount: a top level that is no root but has a subdirectory that is one adds that
/// subdirectory as a filesystem of its own (the first by name).
fn add_btrfs_root_subvolumes(filesystems: &mut Vec<GuestFs>) -> Result<()> {
    for i in 0..filesystems.len() {
        let Some(top) = filesystems[i].kernel.clone() else {
            continue;
        };
        if top.kind != "btrfs" || looks_like_root(top.as_ref())? {
            continue;
        }
        let mut dirs: Vec<DirEntry> = FsRead::read_dir(top.as_ref(), ROOT_INO)?
            .into_iter()
            .filter(|e| e.file_type == Some(FileType::Directory))
            .collect();
        dirs.sort_by(|a, b| a.name.cmp(&b.name));
        for d in dirs {
            let Ok(name) = std::str::from_utf8(&d.name) else {
                continue;
            };
            let view = top.view(name)?;
            if looks_like_root(&view)? {
                let mut fs = filesystems[i].clone();
                fs.kernel = Some(Arc::new(view));
                filesystems.push(fs);
                break;
            }
        }
    }
    Ok(())
}

/// The root filesystem is the readable one that looks like a Linux root; with several, the
/// one that has an fstab mounting itself at `/` wins, else the first.
fn find_root(filesystems: &[GuestFs]) -> Result<usize> {
    // A filesystem that cannot even be looked into (a checksum mismatch, ...) says why.
    let verdicts: Vec<Result<bool>> = filesystems
        .iter()
        .map(|f| f.reader().map_or(Ok(false), looks_like_root))
        .collect();
    match verdicts.iter().position(|v| matches!(v, Ok(true))) {
        Some(i) => Ok(i),
        None => {
            let seen: Vec<String> = filesystems
                .iter()
                .zip(&verdicts)
                .map(|(f, v)| {
                    let mut s = format!("{}: {}", describe_location(&f.location), f.kind);
                    if let Some(e) = &f.error {
                        s.push_str(&format!(" ({e})"));
                    } else if let Err(e) = v {
                        s.push_str(&format!(" ({e})"));
                    }
                    s
                })
                .collect();
            let unsupported = filesystems
                .iter()
                .any(|f| f.reader().is_none() && kmount::can_mount(&f.kind) && f.error.is_none());
            let hint = if unsupported {
                "; the root may be on a filesystem fatbox-img cannot read in user space (only ext2/3/4): try --kernel-mount"
            } else {
                ""
            };
            Err(Error::NotFound(format!(
                "no Linux root filesystem found (seen: {}){hint}",
                if seen.is_empty() {
                    "nothing".to_string()
                } else {
                    seen.join(", ")
                }
            )))
        }
    }
}

/// Counts hard links seen during a walk: maps an inode to the first path it was seen at.
#[derive(Default)]
pub struct LinkTracker {
    first: HashMap<NodeRef, Vec<u8>>,
}

impl LinkTracker {
    /// For a non-directory with more than one link: the path it was first seen at, if any;
    /// records `path` otherwise.
    pub fn check(&mut self, node: &Node, path: &[u8]) -> Option<Vec<u8>> {
        if node.inode.links < 2 || node.inode.file_type() == FileType::Directory {
            return None;
        }
        match self.first.get(&node.r) {
            Some(p) => Some(p.clone()),
            None => {
                self.first.insert(node.r, path.to_vec());
                None
            }
        }
    }
}

impl Guest {
    /// Walks the subtree below an absolute guest path (resolved, following symlinks), giving
    /// absolute canonical paths. Nothing happens if the path is missing or not a directory.
    pub fn walk_under(
        &self,
        abs: &[u8],
        f: &mut dyn FnMut(&[u8], &Node) -> Result<()>,
    ) -> Result<()> {
        let Some((node, canon)) = self.resolve_path(abs, true)? else {
            return Ok(());
        };
        if node.inode.file_type() != FileType::Directory {
            return Ok(());
        }
        let mut seen = HashSet::new();
        seen.insert(node.r);
        let rel_base = canon.strip_prefix(b"/").unwrap_or(&canon).to_vec();
        let mut path = rel_base.clone();
        self.walk_dir(&node, &mut path, 0, &mut seen, &mut |e| {
            let mut a = Vec::with_capacity(e.path.len() + 1);
            a.push(b'/');
            a.extend_from_slice(e.path);
            f(&a, e.node)
        })
    }

    /// The canonical absolute path of `abs` with its parent resolved (symlinks followed) and
    /// the last component kept as is; `None` when the parent does not exist.
    pub fn canonical_parent(&self, abs: &[u8]) -> Result<Option<Vec<u8>>> {
        let trimmed = abs.strip_suffix(b"/").unwrap_or(abs);
        let split = trimmed.iter().rposition(|b| *b == b'/').unwrap_or(0);
        let (parent, name) = (&trimmed[..split], &trimmed[split + 1..]);
        let Some((_, mut canon)) = self.resolve_path(parent, true)? else {
            return Ok(None);
        };
        if canon.last() != Some(&b'/') {
            canon.push(b'/');
        }
        canon.extend_from_slice(name);
        Ok(Some(canon))
    }
}

/// Mounts one filesystem through the kernel: a raw image in place (loop offset), anything else
/// (qcow2, a chain) through a temporary raw copy of the filesystem's bytes.
fn kernel_mount_fs(path: &Path, disk: &Device, fs: &GuestFs, dev: &Device) -> Result<DirFs> {
    let chain = disk.chain();
    let raw_file = match chain.as_slice() {
        [only] if disk.format() == "raw" && only.path.is_file() => Some(only.path.clone()),
        _ => None,
    };
    let src = match &raw_file {
        Some(p) => kmount::Source::File {
            path: p,
            offset: fs.location.start,
            size: fs.location.size,
        },
        None => kmount::Source::Device(dev),
    };
    kmount::mount(&fs.kind, src, dev).map_err(|e| match e {
        Error::Refused(m) => Error::Refused(m),
        e => Error::Other(format!(
            "{}: {} on {}: {e}",
            path.display(),
            fs.kind,
            describe_location(&fs.location)
        )),
    })
}
