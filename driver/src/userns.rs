//! User namespaces: guest root is an unprivileged host uid.
//!
//! Each instance gets an id range (`0..size` inside → `base..base+size` on the host), either
//! one range shared by all instances or, with `isolated_ranges`, a non-overlapping range per
//! instance allocated here and persisted in `<state_dir>/idranges.json` (freed on delete).
//! The shared image layers stay owned by host root on disk; each instance sees them through
//! idmapped mounts (mount_setattr(MOUNT_ATTR_IDMAP)) stacked under its overlay, or, if the
//! kernel refuses that, through a chowned copy per range made once (`layers-shifted/`).

use crate::error::{io, Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdRange {
    /// First host id; guest id 0 (root) maps to it.
    pub base: u32,
    pub size: u32,
}

impl IdRange {
    /// The host id of guest id `id` (None when outside the range).
    pub fn host(&self, id: u32) -> Option<u32> {
        if id < self.size {
            self.base.checked_add(id)
        } else {
            None
        }
    }

    /// The map line for /proc/PID/{uid,gid}_map.
    pub fn map_line(&self) -> String {
        format!("0 {} {}\n", self.base, self.size)
    }

    /// Shifts a host-root-owned id (0..size) into the range; ids outside stay unmapped
    /// (the guest sees them as the overflow id).
    fn shift(&self, id: u32) -> u32 {
        self.host(id).unwrap_or(id)
    }
}

/// Writes the uid and gid maps of a process that has just unshared its user namespace.
/// Called by the monitor (host root), which may map any range.
pub fn write_maps(pid: i32, r: &IdRange) -> Result<()> {
    for f in ["uid_map", "gid_map"] {
        let p = PathBuf::from(format!("/proc/{pid}/{f}"));
        std::fs::write(&p, r.map_line()).map_err(io(&p))?;
    }
    Ok(())
}

/// Allocator of isolated ranges, persisted as `{uuid: slot}`; slot n is
/// `base + n * size`.
pub struct Ranges {
    path: PathBuf,
    base: u32,
    size: u32,
    lock: Mutex<()>,
}

impl Ranges {
    pub fn new(state_dir: &Path, base: u32, size: u32) -> Ranges {
        Ranges {
            path: state_dir.join("idranges.json"),
            base,
            size,
            lock: Mutex::new(()),
        }
    }

    fn load(&self) -> Result<BTreeMap<String, u32>> {
        match std::fs::read(&self.path) {
            Ok(d) => serde_json::from_slice(&d)
                .map_err(|e| Error::Other(format!("{}: {e}", self.path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(Error::io(&self.path, e)),
        }
    }

    fn save(&self, m: &BTreeMap<String, u32>) -> Result<()> {
        let d = serde_json::to_vec_pretty(m).map_err(|e| Error::Other(e.to_string()))?;
        crate::model::write_atomic(&self.path, &d)
    }

    fn range(&self, slot: u32) -> Option<IdRange> {
        let base = self.base.checked_add(slot.checked_mul(self.size)?)?;
        base.checked_add(self.size)?;
        Some(IdRange {
            base,
            size: self.size,
        })
    }

    /// The range of `uuid`, allocating the lowest free slot the first time.
    pub fn allocate(&self, uuid: &str) -> Result<IdRange> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut m = self.load()?;
        if let Some(s) = m.get(uuid) {
            return self
                .range(*s)
                .ok_or_else(|| Error::Other(format!("id slot {s} overflows")));
        }
        let used: std::collections::BTreeSet<u32> = m.values().copied().collect();
        let slot = (0..u32::MAX)
            .find(|s| !used.contains(s))
            .ok_or_else(|| Error::Other("no free id range".into()))?;
        let r = self.range(slot).ok_or_else(|| {
            Error::Invalid(format!(
                "no free id range: {} ranges of {} ids from {} exhaust the 32-bit id space",
                slot, self.size, self.base
            ))
        })?;
        m.insert(uuid.to_string(), slot);
        self.save(&m)?;
        Ok(r)
    }

    pub fn free(&self, uuid: &str) -> Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut m = self.load()?;
        if m.remove(uuid).is_some() {
            self.save(&m)?;
        }
        Ok(())
    }
}

/// A user namespace with the range's mapping, held by an fd (for MOUNT_ATTR_IDMAP). The
/// namespace is made by a short-lived helper process that is killed once the fd is open.
pub fn userns_fd(r: &IdRange) -> Result<OwnedFd> {
    let mut cmd = std::process::Command::new("/bin/sleep");
    cmd.arg("60")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: unshare is a raw syscall, fine between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // spawn() returns after the exec succeeded, so the helper already sits in its namespace.
    let mut child = cmd.spawn().map_err(io("/bin/sleep (userns helper)"))?;
    let pid = child.id();
    let res = (|| {
        write_maps(pid as i32, r)?;
        let p = format!("/proc/{pid}/ns/user");
        let f = std::fs::File::open(&p).map_err(io(&p))?;
        Ok(OwnedFd::from(f))
    })();
    let _ = child.kill();
    let _ = child.wait();
    res
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("NUL in path {}", p.display())))
}

/// Mounts `src` at `dst` (an existing directory) through the idmapping of `userns`.
pub fn idmapped_bind(src: &Path, dst: &Path, userns: &OwnedFd) -> Result<()> {
    let s = cpath(src)?;
    let d = cpath(dst)?;
    // SAFETY: s is a valid C string; flags are plain integers.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            s.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(Error::io(
            format!("open_tree {}", src.display()),
            std::io::Error::last_os_error(),
        ));
    }
    let fd = i32::try_from(fd).map_err(|_| Error::Other("open_tree fd".into()))?;
    // SAFETY: fd was just returned by open_tree and is owned by nobody else.
    let tree = unsafe { OwnedFd::from_raw_fd(fd) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: u64::try_from(userns.as_raw_fd()).unwrap_or(0),
    };
    let empty = c"";
    // SAFETY: attr lives for the call and its size is passed; empty is a valid C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        return Err(Error::io(
            format!("mount_setattr(MOUNT_ATTR_IDMAP) {}", src.display()),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: valid fds and C strings for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            d.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(Error::io(
            format!("move_mount {}", dst.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// A copy of `src` at `dst` with every owner shifted into the range (hard links inside one
/// layer are kept as links; xattrs other than ownership-bearing ones are copied). Built in
/// a temp dir and renamed, so a crash leaves no half copy. Returns the bytes copied.
pub fn shifted_copy(src: &Path, dst: &Path, r: &IdRange) -> Result<u64> {
    if dst.is_dir() {
        return Ok(0);
    }
    let parent = dst
        .parent()
        .ok_or_else(|| Error::Other(format!("{} has no parent", dst.display())))?;
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(".shift-")
        .tempdir_in(parent)
        .map_err(io(parent))?;
    let out = tmp.path().join("t");
    // cp keeps modes, times, xattrs (overlay whiteouts are char devices 0/0, kept by -a),
    // hard links and sparse files; owners are shifted by the walk below.
    let st = std::process::Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(src)
        .arg(&out)
        .status()
        .map_err(io("cp"))?;
    if !st.success() {
        return Err(Error::Command {
            cmd: format!("cp -a {} {}", src.display(), out.display()),
            msg: st.to_string(),
        });
    }
    let mut bytes = 0u64;
    chown_tree(&out, r, &mut bytes)?;
    std::fs::rename(&out, dst).map_err(io(dst))?;
    Ok(bytes)
}

fn chown_tree(p: &Path, r: &IdRange, bytes: &mut u64) -> Result<()> {
    let md = p.symlink_metadata().map_err(io(p))?;
    *bytes = bytes.saturating_add(md.len());
    // lchown drops setuid/setgid bits and file capabilities: put the mode back after.
    std::os::unix::fs::lchown(p, Some(r.shift(md.uid())), Some(r.shift(md.gid())))
        .map_err(io(p))?;
    if !md.file_type().is_symlink() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(md.mode() & 0o7777))
            .map_err(io(p))?;
    }
    if md.is_dir() {
        for e in std::fs::read_dir(p).map_err(io(p))? {
            let e = e.map_err(io(p))?;
            chown_tree(&e.path(), r, bytes)?;
        }
    }
    Ok(())
}

/// Lets the guest's root own its delegated cgroup2 directory (systemd inside writes
/// cgroup.procs and cgroup.subtree_control and makes its own children).
pub fn delegate_cgroup(dir: &Path, r: &IdRange) -> Result<()> {
    let root = Some(r.base);
    std::os::unix::fs::chown(dir, root, root).map_err(io(dir))?;
    for f in ["cgroup.procs", "cgroup.threads", "cgroup.subtree_control"] {
        let p = dir.join(f);
        if p.exists() {
            std::os::unix::fs::chown(&p, root, root).map_err(io(&p))?;
        }
    }
    Ok(())
}

/// True when `pid` lives in another user namespace than ours (nsenter must then join it).
pub fn other_userns(pid: i32) -> bool {
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/user")).map(|m| m.ino());
    let ours = std::fs::metadata("/proc/self/ns/user").map(|m| m.ino());
    matches!((theirs, ours), (Ok(a), Ok(b)) if a != b)
}

/// Mounts the instance's overlay with the image layers shown through the range: idmapped
/// mounts when the config and kernel allow, else a chowned copy of each layer per range.
pub fn mount_rootfs_shifted(
    cfg: &crate::config::Config,
    dir: &Path,
    paths: &crate::disk::Paths,
    lowers: &[PathBuf],
    r: &IdRange,
) -> Result<()> {
    let t = std::time::Instant::now();
    if cfg.security.shift == crate::config::ShiftMode::Idmap {
        match mount_idmapped(dir, paths, lowers, r) {
            Ok(()) => {
                tracing::debug!(
                    base = r.base,
                    ms = t.elapsed().as_millis() as u64,
                    "rootfs on idmapped layers"
                );
                return Ok(());
            }
            Err(e) => tracing::warn!(
                base = r.base,
                error = %e,
                "idmapped mounts failed: falling back to a shifted copy of each image layer \
                 for this id range (slow first boot, disk space per range)"
            ),
        }
    }
    let root = cfg
        .state_dir
        .join("layers-shifted")
        .join(format!("{}-{}", r.base, r.size));
    let mut shifted = Vec::new();
    let mut bytes = 0u64;
    {
        // One copy per (range, layer), even when instances of one range boot together.
        static SHIFT: Mutex<()> = Mutex::new(());
        let _g = SHIFT.lock().unwrap_or_else(|p| p.into_inner());
        for l in lowers {
            let name = l
                .file_name()
                .ok_or_else(|| Error::Other(format!("layer dir {}", l.display())))?;
            let dst = root.join(name);
            bytes = bytes.saturating_add(shifted_copy(l, &dst, r)?);
            shifted.push(dst);
        }
    }
    if bytes > 0 {
        tracing::info!(
            base = r.base,
            bytes,
            ms = t.elapsed().as_millis() as u64,
            "shifted copies of the image layers made for this id range"
        );
    }
    crate::disk::mount_rootfs(paths, &shifted, Some(r.base))
}

fn mount_idmapped(
    dir: &Path,
    paths: &crate::disk::Paths,
    lowers: &[PathBuf],
    r: &IdRange,
) -> Result<()> {
    use nix::mount::{umount2, MntFlags};
    let ns = userns_fd(r)?;
    let base = dir.join("lower");
    let mut mounted = Vec::new();
    let res = (|| {
        for (i, l) in lowers.iter().enumerate() {
            let m = base.join(i.to_string());
            std::fs::create_dir_all(&m).map_err(io(&m))?;
            while crate::disk::is_mountpoint(&m) {
                let _ = umount2(m.as_path(), MntFlags::MNT_DETACH);
            }
            idmapped_bind(l, &m, &ns)?;
            mounted.push(m);
        }
        crate::disk::mount_rootfs(paths, &mounted, Some(r.base))
    })();
    // overlayfs keeps private clones of its layers' mounts: ours can go in every case.
    for m in &mounted {
        let _ = umount2(m.as_path(), MntFlags::MNT_DETACH);
    }
    res
}

/// Creates the instance's persistent network namespace at `path` owned by a user namespace
/// with the range's mapping (so the guest's root may configure its own NICs and mount sysfs),
/// made by a short-lived helper process; keeps an existing one. fatboxd, as host root, still
/// plugs the VIFs into it.
pub fn create_netns_owned(path: &Path, r: &IdRange) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    if crate::network::is_netns(path) {
        return Ok(());
    }
    let userns = userns_fd(r)?;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    let ufd = userns.as_raw_fd();
    let mut cmd = std::process::Command::new("/bin/sleep");
    cmd.arg("60")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: raw syscalls only, between fork and exec (the child is single-threaded, as
    // setns into a user namespace requires).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ufd, libc::CLONE_NEWUSER) != 0 || libc::unshare(libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(io("/bin/sleep (netns helper)"))?;
    let src = format!("/proc/{}/ns/net", child.id());
    let r = mount(
        Some(src.as_str()),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    );
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = r {
        let _ = std::fs::remove_file(path);
        return Err(Error::sys(format!("bind {src} on {}", path.display()), e));
    }
    let _ = mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    );
    Ok(())
}

/// Joins the user namespace that owns the netns at `path` (the monitor's intermediate,
/// single-threaded, host root). Refuses a netns owned by our own user namespace: that one
/// was not made for a guest with a range.
pub fn enter_netns_owner(path: &Path) -> Result<()> {
    const NS_GET_USERNS: libc::c_ulong = 0xb701;
    let f = std::fs::File::open(path).map_err(io(path))?;
    // SAFETY: ioctl on a valid nsfs fd; returns a new fd or -1.
    let fd = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_USERNS) };
    if fd < 0 {
        return Err(Error::io(
            format!("NS_GET_USERNS {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd was just returned to us by the kernel.
    let owner = unsafe { OwnedFd::from_raw_fd(fd) };
    let ours = std::fs::metadata("/proc/self/ns/user").map_err(io("/proc/self/ns/user"))?;
    let theirs = std::fs::File::from(owner);
    let tm = theirs.metadata().map_err(io(path))?;
    if tm.ino() == ours.ino() {
        return Err(Error::Other(format!(
            "{} belongs to the host's user namespace, not to the instance's",
            path.display()
        )));
    }
    nix::sched::setns(&theirs, nix::sched::CloneFlags::CLONE_NEWUSER)
        .map_err(|e| Error::sys("setns(user)", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_allocate_reuse_and_free() {
        let d = tempfile::tempdir().expect("tmp");
        let r = Ranges::new(d.path(), 1_000_000, 65536);
        let a = r.allocate("a").expect("a");
        let b = r.allocate("b").expect("b");
        assert_eq!(a.base, 1_000_000);
        assert_eq!(b.base, 1_065_536);
        assert_eq!(r.allocate("a").expect("a again"), a);
        r.free("a").expect("free");
        // Persisted: a new allocator sees b's slot and reuses a's.
        let r2 = Ranges::new(d.path(), 1_000_000, 65536);
        assert_eq!(r2.allocate("c").expect("c").base, 1_000_000);
        assert_eq!(r2.allocate("b").expect("b").base, 1_065_536);
        // The 32-bit id space ends.
        let d2 = tempfile::tempdir().expect("tmp");
        let big = Ranges::new(d2.path(), u32::MAX - 10, 8);
        assert!(big.allocate("x").is_ok());
        assert!(big.allocate("y").is_err());
    }

    #[test]
    fn host_ids() {
        let r = IdRange {
            base: 100,
            size: 10,
        };
        assert_eq!(r.host(0), Some(100));
        assert_eq!(r.host(9), Some(109));
        assert_eq!(r.host(10), None);
        assert_eq!(r.map_line(), "0 100 10\n");
    }
}
