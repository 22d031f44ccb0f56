//! Opt-in `--kernel-mount` fallback: a filesystem the user-space readers cannot read (xfs,
//! btrfs) is attached to a read-only loop device and
//! mounted read-only by the host kernel, then read through [`DirFs`] with the same contract as
//! the ext4 reader (numeric owners, symlinks never followed on the host, hard links by inode).
//!
//! This hands an untrusted image to the host kernel's filesystem driver, which is why it is
//! never the default. What we can do to limit the damage:
//! - the loop device is read-only and the mount is `ro,nodev,nosuid,noexec` plus the
//!   filesystem's no-log-replay option, so the image file is never written;
//! - the process moves into a private mount namespace first ([`enter_private_mount_namespace`])
//!   so the mount never shows in the host's mount table and dies with the process;
//! - the loop device is configured with `LO_FLAGS_AUTOCLEAR` through `LOOP_CONFIGURE` while we
//!   hold it open, so the kernel detaches it as soon as the last user (our fd, the mount) goes,
//!   even if we are killed;
//! - a qcow2 partition is copied to an `O_TMPFILE` raw file (no name, nothing to leak);
//! - SIGINT/SIGTERM/SIGHUP/SIGQUIT lazily unmount and remove the mount points before dying
//!   ([`install_signal_cleanup`]).

use crate::block::Device;
use crate::ext4::{DirEntry, FileType, Inode, Timestamp, ROOT_INO};
use crate::{Error, Result};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
/// Bytes per read when copying a partition out of a qcow2 image.
const COPY_CHUNK: usize = 1 << 20;
/// Names and values longer than this are refused (the VFS limit is 64 KiB per value).
const XATTR_MAX: usize = 1 << 16;

pub const NEEDS_ROOT: &str = "--kernel-mount needs root (loop devices and mount)";

/// The kernel driver and the mount options that keep it from writing: no log replay.
fn driver_for(kind: &str) -> Option<(&'static str, &'static str)> {
    match kind {
        // nouuid: a cloned image may share its UUID with a filesystem the host has mounted.
        "xfs" => Some(("xfs", "norecovery,nouuid")),
        "btrfs" => Some(("btrfs", "rescue=nologreplay")),
        // ext2/3/4 stay in user space even when our reader refuses one: a damaged ext4 is
        // exactly what should not reach the kernel's driver.
        _ => None,
    }
}

/// Whether `--kernel-mount` can serve a filesystem of this kind.
pub fn can_mount(kind: &str) -> bool {
    driver_for(kind).is_some()
}

fn kernel_has(fstype: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().last() == Some(fstype))
        })
        .unwrap_or(false)
}

fn last_os(what: impl Into<PathBuf>) -> Error {
    Error::io(what, std::io::Error::last_os_error())
}

fn cstr(p: &[u8]) -> Result<CString> {
    CString::new(p).map_err(|_| Error::Other("path contains a NUL byte".into()))
}

/// Moves this process into a private mount namespace, so that what it mounts is invisible to
/// the host and is torn down by the kernel when the process exits, however it exits. Call it
/// before any thread is started (the namespace is per thread; later threads inherit it).
pub fn enter_private_mount_namespace() -> Result<()> {
    // SAFETY: plain syscalls with constant arguments.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(last_os("unshare(CLONE_NEWNS)"));
    }
    let root = c"/";
    // SAFETY: valid NUL-terminated strings; NULL source/fstype/data are allowed for a
    // propagation change.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(last_os("making / private in the new mount namespace"));
    }
    Ok(())
}

/// Mount points a signal handler must unmount; leaked CStrings (a one-shot CLI mounts a few).
static ACTIVE: [AtomicPtr<libc::c_char>; 16] = [const { AtomicPtr::new(std::ptr::null_mut()) }; 16];

fn register(mp: &CStr) -> Option<usize> {
    let p = mp.to_owned().into_raw();
    for (i, slot) in ACTIVE.iter().enumerate() {
        if slot
            .compare_exchange(std::ptr::null_mut(), p, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Some(i);
        }
    }
    // SAFETY: `p` came from into_raw just above and was not shared.
    drop(unsafe { CString::from_raw(p) });
    None
}

fn unregister(slot: Option<usize>) {
    if let Some(s) = slot.and_then(|i| ACTIVE.get(i)) {
        let p = s.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: the pointer came from CString::into_raw in `register` and the handler
            // only reads slots it loads (a handler racing with this is dying anyway).
            drop(unsafe { CString::from_raw(p) });
        }
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    for slot in &ACTIVE {
        let p = slot.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: async-signal-safe syscalls on a NUL-terminated string we own.
            unsafe {
                libc::umount2(p, libc::MNT_DETACH);
                libc::rmdir(p);
            }
        }
    }
    // Die of the same signal so the caller sees how we ended; our fds close on exit, which
    // lets the autoclear loop devices go.
    // SAFETY: async-signal-safe calls.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Unmounts and removes our mount points when the process is told to stop.
pub fn install_signal_cleanup() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: installing a handler that only does async-signal-safe work.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESETHAND;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// A read-only, autoclear loop device over a range of a file.
struct LoopDevice {
    dev: File,
    path: PathBuf,
}

impl LoopDevice {
    fn attach(backing: &File, offset: u64, size: u64) -> Result<LoopDevice> {
        let opts = crate::loopdev::LoopOptions {
            offset,
            size,
            read_only: true,
            name: "fatbox-img --kernel-mount",
        };
        let (dev, path) = crate::loopdev::attach(backing, &opts)
            .map_err(|e| Error::Other(format!("attaching a loop device: {e}")))?;
        Ok(LoopDevice { dev, path })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // Autoclear would detach it when we close; asking explicitly makes it immediate when
        // nothing else holds it (and is deferred to the last close otherwise).
        // SAFETY: ioctl without argument on a file we hold.
        unsafe { libc::ioctl(self.dev.as_raw_fd(), LOOP_CLR_FD) };
        tracing::debug!(loopdev = %self.path.display(), "loop device released");
    }
}

/// The kernel mount: unmounted, loop device released and mount point removed on drop.
struct Mounted {
    mountpoint: tempfile::TempDir,
    slot: Option<usize>,
    loopdev: Option<LoopDevice>,
    mounted: bool,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            if let Ok(mp) = cstr(self.mountpoint.path().as_os_str().as_bytes()) {
                // SAFETY: valid NUL-terminated path.
                let rc = unsafe { libc::umount2(mp.as_ptr(), 0) };
                if rc != 0 {
                    tracing::warn!(
                        mountpoint = %self.mountpoint.path().display(),
                        error = %std::io::Error::last_os_error(),
                        "unmount failed; detaching lazily"
                    );
                    // SAFETY: as above.
                    unsafe { libc::umount2(mp.as_ptr(), libc::MNT_DETACH) };
                }
            }
        }
        unregister(self.slot.take());
        drop(self.loopdev.take());
        // The TempDir removes the (now empty) mount point when it drops after us.
    }
}

/// Where the filesystem's bytes are.
pub enum Source<'a> {
    /// A raw image file used in place: the filesystem is `size` bytes at `offset`.
    File {
        path: &'a Path,
        offset: u64,
        size: u64,
    },
    /// Any device (a qcow2 partition): copied to an anonymous temporary raw file first.
    Device(&'a Device),
}

/// Copies a device to an unnamed file in $TMPDIR, sparse where the source reads as zeros.
fn copy_to_tmpfile(dev: &Device) -> Result<File> {
    let dir = std::env::temp_dir();
    let f = tempfile::tempfile_in(&dir).map_err(|e| Error::io(&dir, e))?;
    let size = dev.size();
    f.set_len(size).map_err(|e| Error::io(&dir, e))?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut off = 0u64;
    while off < size {
        let n = usize::try_from(size - off).map_or(COPY_CHUNK, |l| l.min(COPY_CHUNK));
        if !dev.is_zero(off, n as u64) {
            let b = &mut buf[..n];
            dev.read_at(b, off)?;
            if b.iter().any(|x| *x != 0) {
                f.write_all_at(b, off).map_err(|e| Error::io(&dir, e))?;
            }
        }
        off += n as u64;
    }
    Ok(f)
}

/// Parses the UUID and label of the filesystems we mount, for fstab matching.
fn identify(kind: &str, src: &Device) -> (Option<String>, Option<String>) {
    let peek = |off: u64, len: usize| -> Option<Vec<u8>> {
        if off.checked_add(len as u64)? > src.size() {
            return None;
        }
        let mut b = vec![0u8; len];
        src.read_at(&mut b, off).ok()?;
        Some(b)
    };
    let uuid = |b: &[u8]| -> Option<String> {
        let h = hex::encode(b.get(..16)?);
        Some(format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        ))
    };
    let label = |b: &[u8]| -> Option<String> {
        let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
        (end > 0).then(|| String::from_utf8_lossy(&b[..end]).into_owned())
    };
    match kind {
        // xfs: sb_uuid at 32, sb_fname[12] at 108.
        "xfs" => peek(0, 120).map_or((None, None), |b| (uuid(&b[32..48]), label(&b[108..120]))),
        // btrfs: superblock at 64 KiB; fsid at +0x20, label[256] at +0x12b.
        "btrfs" => peek(0x10000, 0x12b + 256).map_or((None, None), |b| {
            (uuid(&b[0x20..0x30]), label(&b[0x12b..0x12b + 256]))
        }),
        _ => (None, None),
    }
}

/// Mounts one filesystem read-only through the kernel. `dev` is the filesystem's own device
/// (used to identify it and, for [`Source::Device`], copied).
pub fn mount(kind: &str, src: Source<'_>, dev: &Device) -> Result<DirFs> {
    let (fstype, opts) = driver_for(kind).ok_or_else(|| {
        Error::Unsupported(format!("--kernel-mount does not handle {kind} filesystems"))
    })?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::Refused(NEEDS_ROOT.into()));
    }
    if !kernel_has(fstype) {
        return Err(Error::Unsupported(format!(
            "the host kernel has no {fstype} driver (see /proc/filesystems)"
        )));
    }
    let (uuid, label) = identify(kind, dev);
    let (backing, offset, size) = match src {
        Source::File { path, offset, size } => (
            File::open(path).map_err(|e| Error::io(path, e))?,
            offset,
            size,
        ),
        Source::Device(d) => (copy_to_tmpfile(d)?, 0, d.size()),
    };
    let mountpoint = tempfile::Builder::new()
        .prefix("fatbox-kmount-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let mp_c = cstr(mountpoint.path().as_os_str().as_bytes())?;
    // Registered before anything is attached, so a signal from here on removes the directory.
    let mut m = Mounted {
        slot: register(&mp_c),
        mountpoint,
        loopdev: None,
        mounted: false,
    };
    m.loopdev = Some(LoopDevice::attach(&backing, offset, size)?);
    // The loop device holds its own reference to the backing file.
    drop(backing);
    let loop_path = m
        .loopdev
        .as_ref()
        .map(|l| l.path.clone())
        .unwrap_or_default();
    let src_c = cstr(loop_path.as_os_str().as_bytes())?;
    let type_c = cstr(fstype.as_bytes())?;
    let data_c = cstr(opts.as_bytes())?;
    tracing::warn!(
        "--kernel-mount: the untrusted image's {kind} filesystem now reaches the host kernel's {fstype} driver ({} read-only, {opts})",
        loop_path.display()
    );
    // SAFETY: valid NUL-terminated strings; data is the fs's option string.
    let rc = unsafe {
        libc::mount(
            src_c.as_ptr(),
            mp_c.as_ptr(),
            type_c.as_ptr(),
            libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC,
            data_c.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::Other(format!(
            "kernel mount of the {kind} filesystem failed ({fstype} -o ro,{opts} on {}): {e}",
            loop_path.display()
        )));
    }
    m.mounted = true;
    DirFs::new(m, kind, uuid, label)
}

struct DirNode {
    /// Path below the mount root, without a leading `/`; empty for the root.
    rel: Vec<u8>,
    inode: Inode,
}

#[derive(Default)]
struct State {
    /// Synthetic inode numbers: `ROOT_INO + index`.
    nodes: Vec<DirNode>,
    /// (st_dev, st_ino) → synthetic inode number: hard links share one.
    by_key: HashMap<(u64, u64), u32>,
    /// The last regular file read, kept open across the chunked reads of one file.
    open: Option<(u32, File)>,
}

/// A kernel-mounted filesystem read like the ext4 reader reads a disk. Files are reached
/// with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) below the mount root, and metadata of
/// one name in a directory opened that way, so a symlink in the image is never followed on the
/// host. Synthetic inode numbers stand in for the filesystem's (64-bit on xfs and btrfs).
pub struct DirFs {
    state: Mutex<State>,
    root: OwnedFd,
    pub kind: String,
    pub uuid: Option<String>,
    pub label: Option<String>,
    /// The btrfs subvolume (a directory below the mount root) this view is rooted at.
    pub subvol: Option<String>,
    /// This view's root below the mount root (for messages).
    base: Vec<u8>,
    /// Dropped last: the last view unmounts after every fd above is closed.
    mount: Arc<Mounted>,
}

impl std::fmt::Debug for DirFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirFs")
            .field("kind", &self.kind)
            .field("mountpoint", &self.mount.mountpoint.path())
            .finish()
    }
}

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::BENEATH
        | ResolveFlags::NO_SYMLINKS
        | ResolveFlags::NO_MAGICLINKS
        | ResolveFlags::NO_XDEV
}

fn ts(sec: i64, nsec: i64) -> Timestamp {
    Timestamp {
        sec,
        nsec: u32::try_from(nsec).unwrap_or(0).min(999_999_999),
    }
}

fn inode_from_stat(ino: u32, st: &rustix::fs::Stat) -> Inode {
    // Type and permission bits fit 16 bits (S_IFMT is 0o170000).
    let mut i = Inode::detached(ino, (st.st_mode & 0o177777) as u16);
    i.uid = st.st_uid;
    i.gid = st.st_gid;
    i.size = u64::try_from(st.st_size).unwrap_or(0);
    i.links = u16::try_from(st.st_nlink).unwrap_or(u16::MAX);
    i.atime = ts(st.st_atime, st.st_atime_nsec as i64);
    i.mtime = ts(st.st_mtime, st.st_mtime_nsec as i64);
    i.ctime = ts(st.st_ctime, st.st_ctime_nsec as i64);
    if matches!(i.file_type(), FileType::CharDevice | FileType::BlockDevice) {
        i.rdev = (rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev));
    }
    i
}

impl DirFs {
    fn new(
        mount: Mounted,
        kind: &str,
        uuid: Option<String>,
        label: Option<String>,
    ) -> Result<DirFs> {
        let mp = mount.mountpoint.path().to_path_buf();
        let root = rustix::fs::open(
            &mp,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io(&mp, e.into()))?;
        Self::from_root(Arc::new(mount), root, Vec::new(), kind, uuid, label, None)
    }

    /// Another view of the same mount rooted at directory `rel` (a btrfs subvolume the
    /// guest's fstab mounts with `subvol=`), with its own inode numbers.
    pub fn view(&self, rel: &str) -> Result<DirFs> {
        let rel = rel.trim_matches('/');
        let root = self.open_beneath(rel.as_bytes(), OFlags::PATH | OFlags::DIRECTORY)?;
        let mut base = self.base.clone();
        if !base.is_empty() {
            base.push(b'/');
        }
        base.extend_from_slice(rel.as_bytes());
        Self::from_root(
            self.mount.clone(),
            root,
            base,
            &self.kind,
            self.uuid.clone(),
            self.label.clone(),
            Some(rel.to_string()),
        )
    }

    fn from_root(
        mount: Arc<Mounted>,
        root: OwnedFd,
        base: Vec<u8>,
        kind: &str,
        uuid: Option<String>,
        label: Option<String>,
        subvol: Option<String>,
    ) -> Result<DirFs> {
        let st =
            rustix::fs::fstat(&root).map_err(|e| Error::io(mount.mountpoint.path(), e.into()))?;
        let mut state = State::default();
        state.by_key.insert((st.st_dev, st.st_ino), ROOT_INO);
        state.nodes.push(DirNode {
            rel: Vec::new(),
            inode: inode_from_stat(ROOT_INO, &st),
        });
        Ok(DirFs {
            state: Mutex::new(state),
            root,
            kind: kind.to_string(),
            uuid,
            label,
            subvol,
            base,
            mount,
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::Other("kernel-mount state poisoned".into()))
    }

    fn rel(&self, ino: u32) -> Result<Vec<u8>> {
        let st = self.lock()?;
        ino.checked_sub(ROOT_INO)
            .and_then(|i| st.nodes.get(i as usize))
            .map(|n| n.rel.clone())
            .ok_or_else(|| Error::Other(format!("kernel-mounted inode {ino} unknown")))
    }

    fn host_path(&self, rel: &[u8]) -> PathBuf {
        let mut p = self.mount.mountpoint.path().to_path_buf();
        if !self.base.is_empty() {
            p.push(std::ffi::OsStr::from_bytes(&self.base));
        }
        if !rel.is_empty() {
            p.push(std::ffi::OsStr::from_bytes(rel));
        }
        p
    }

    fn io_err(&self, rel: &[u8], e: rustix::io::Errno) -> Error {
        Error::io(
            format!("{} (kernel-mounted)", String::from_utf8_lossy(rel)),
            e.into(),
        )
    }

    /// Opens `rel` below the root without following any symlink.
    fn open_beneath(&self, rel: &[u8], flags: OFlags) -> Result<OwnedFd> {
        let path: &[u8] = if rel.is_empty() { b"." } else { rel };
        // openat2 refuses O_PATH combined with anything but these.
        let extra = if flags.contains(OFlags::PATH) {
            OFlags::NOFOLLOW | OFlags::CLOEXEC
        } else {
            OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY
        };
        rustix::fs::openat2(
            &self.root,
            path,
            flags | extra,
            Mode::empty(),
            resolve_flags(),
        )
        .map_err(|e| self.io_err(rel, e))
    }

    /// The parent directory (as an O_PATH fd) and the last name of a non-root node.
    fn parent_and_name<'a>(&self, rel: &'a [u8]) -> Result<(OwnedFd, &'a [u8])> {
        let (parent, name) = match rel.iter().rposition(|c| *c == b'/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => (&b""[..], rel),
        };
        Ok((
            self.open_beneath(parent, OFlags::PATH | OFlags::DIRECTORY)?,
            name,
        ))
    }

    /// A path naming the node without walking the image's tree on the host: the parent
    /// directory's fd in /proc plus one name (the l* xattr calls do not follow it).
    fn proc_path(&self, rel: &[u8]) -> Result<(Option<OwnedFd>, Vec<u8>)> {
        if rel.is_empty() {
            let p = format!("/proc/self/fd/{}", self.root.as_raw_fd());
            return Ok((None, p.into_bytes()));
        }
        let (dir, name) = self.parent_and_name(rel)?;
        let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        p.extend_from_slice(name);
        Ok((Some(dir), p))
    }

    pub fn inode(&self, ino: u32) -> Result<Inode> {
        let st = self.lock()?;
        ino.checked_sub(ROOT_INO)
            .and_then(|i| st.nodes.get(i as usize))
            .map(|n| n.inode.clone())
            .ok_or_else(|| Error::Other(format!("kernel-mounted inode {ino} unknown")))
    }

    pub fn read_dir(&self, ino: u32) -> Result<Vec<DirEntry>> {
        let rel = self.rel(ino)?;
        let fd = self.open_beneath(&rel, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let mut dir = rustix::fs::Dir::read_from(&fd).map_err(|e| self.io_err(&rel, e))?;
        let mut out = Vec::new();
        while let Some(ent) = dir.read() {
            let ent = ent.map_err(|e| self.io_err(&rel, e))?;
            let name = ent.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let st = rustix::fs::statat(&fd, ent.file_name(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| self.io_err(&rel, e))?;
            let mut child = rel.clone();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(name);
            let mut s = self.lock()?;
            let key = (st.st_dev, st.st_ino);
            let cino = match s.by_key.get(&key) {
                Some(i) => *i,
                None => {
                    let i = u32::try_from(s.nodes.len())
                        .ok()
                        .and_then(|n| n.checked_add(ROOT_INO))
                        .ok_or_else(|| Error::Limit("more than 2^32 files".into()))?;
                    s.by_key.insert(key, i);
                    s.nodes.push(DirNode {
                        rel: child,
                        inode: inode_from_stat(i, &st),
                    });
                    i
                }
            };
            let ft = inode_from_stat(cino, &st).file_type();
            out.push(DirEntry {
                name: name.to_vec(),
                ino: cino,
                file_type: Some(ft),
            });
        }
        Ok(out)
    }

    pub fn lookup(&self, path: &[u8]) -> Result<Option<u32>> {
        crate::ext4::lookup_in(path, |ino| self.inode(ino), |ino| self.read_dir(ino))
    }

    pub fn read_link(&self, inode: &Inode) -> Result<Vec<u8>> {
        if inode.file_type() != FileType::Symlink {
            return Err(Error::Other(format!(
                "inode {} is not a symlink",
                inode.ino
            )));
        }
        let rel = self.rel(inode.ino)?;
        let (dir, name) = self.parent_and_name(&rel)?;
        let t = rustix::fs::readlinkat(&dir, name, Vec::new()).map_err(|e| self.io_err(&rel, e))?;
        Ok(t.into_bytes())
    }

    fn with_file<T>(&self, inode: &Inode, f: impl FnOnce(&File) -> Result<T>) -> Result<T> {
        if inode.file_type() != FileType::Regular {
            return Err(Error::Other(format!(
                "inode {} is not a regular file",
                inode.ino
            )));
        }
        let mut st = self.lock()?;
        if st.open.as_ref().map(|o| o.0) != Some(inode.ino) {
            st.open = None;
            let rel = st
                .nodes
                .get(inode.ino.saturating_sub(ROOT_INO) as usize)
                .map(|n| n.rel.clone())
                .ok_or_else(|| {
                    Error::Other(format!("kernel-mounted inode {} unknown", inode.ino))
                })?;
            drop(st);
            let fd = self.open_beneath(&rel, OFlags::RDONLY)?;
            st = self.lock()?;
            st.open = Some((inode.ino, File::from(fd)));
        }
        match &st.open {
            Some((_, file)) => f(file),
            None => Err(Error::Other("kernel-mounted file not open".into())),
        }
    }

    pub fn read_at(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let ino = inode.ino;
        self.with_file(inode, |file| {
            file.read_at(buf, offset)
                .map_err(|e| Error::io(format!("kernel-mounted inode {ino}"), e))
        })
    }

    pub fn data_runs(&self, inode: &Inode) -> Result<Vec<(u64, u64)>> {
        let size = inode.size;
        if size == 0 {
            return Ok(Vec::new());
        }
        self.with_file(inode, |file| {
            let fd = file.as_fd();
            let mut runs = Vec::new();
            let mut pos = 0u64;
            while pos < size {
                let Ok(at) = i64::try_from(pos) else { break };
                // SAFETY: lseek on an fd we hold.
                let data = unsafe { libc::lseek(fd.as_raw_fd(), at, libc::SEEK_DATA) };
                if data < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::ENXIO) {
                        break; // only a hole up to the end
                    }
                    // A filesystem without SEEK_DATA: all of it is data.
                    return Ok(vec![(0, size)]);
                }
                // SAFETY: as above.
                let hole = unsafe { libc::lseek(fd.as_raw_fd(), data, libc::SEEK_HOLE) };
                let start = data as u64;
                let end = if hole < 0 {
                    size
                } else {
                    (hole as u64).min(size)
                };
                if start >= size || end <= start {
                    break;
                }
                runs.push((start, end - start));
                pos = end;
            }
            Ok(runs)
        })
    }

    /// All extended attributes, sorted by name, as the ext4 reader returns them (POSIX ACLs
    /// in their binary xattr form, which is what the kernel hands out).
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<(String, Vec<u8>)>> {
        let rel = self.rel(inode.ino)?;
        let (_keep, p) = self.proc_path(&rel)?;
        let p = cstr(&p)?;
        let is_root = rel.is_empty();
        let host = self.host_path(&rel);
        let err = |what: &str| {
            Error::io(
                format!("{} ({what})", host.display()),
                std::io::Error::last_os_error(),
            )
        };
        let mut names = vec![0u8; XATTR_MAX];
        // The root's /proc link must be followed to reach the directory; every other node is
        // one name in an fd-opened directory and must not be followed.
        // SAFETY: valid path and a buffer of the length passed.
        let n = unsafe {
            if is_root {
                libc::listxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len())
            } else {
                libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len())
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOTSUP) {
                return Ok(Vec::new());
            }
            return Err(err("listxattr"));
        }
        names.truncate(n as usize);
        let mut out = Vec::new();
        let mut val = vec![0u8; XATTR_MAX];
        for name in names.split(|c| *c == 0).filter(|n| !n.is_empty()) {
            // xfs shows root its on-disk copy of the POSIX ACLs, which system.posix_acl_*
            // already carry; the ext4 path has no such names.
            if self.kind == "xfs"
                && matches!(name, b"trusted.SGI_ACL_FILE" | b"trusted.SGI_ACL_DEFAULT")
            {
                continue;
            }
            let name_c = cstr(name)?;
            // SAFETY: valid strings and a buffer of the length passed.
            let n = unsafe {
                if is_root {
                    libc::getxattr(
                        p.as_ptr(),
                        name_c.as_ptr(),
                        val.as_mut_ptr().cast(),
                        val.len(),
                    )
                } else {
                    libc::lgetxattr(
                        p.as_ptr(),
                        name_c.as_ptr(),
                        val.as_mut_ptr().cast(),
                        val.len(),
                    )
                }
            };
            if n < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENODATA) {
                    continue;
                }
                return Err(err("getxattr"));
            }
            out.push((
                String::from_utf8_lossy(name).into_owned(),
                val[..n as usize].to_vec(),
            ));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Bytes in use (for progress bars).
    pub fn used_bytes(&self) -> u64 {
        rustix::fs::fstatvfs(&self.root)
            .map(|s| {
                s.f_blocks
                    .saturating_sub(s.f_bfree)
                    .saturating_mul(s.f_frsize)
            })
            .unwrap_or(0)
    }
}
