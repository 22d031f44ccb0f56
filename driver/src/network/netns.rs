//! The instance's persistent network namespace: created by fatboxd before the first init of a
//! power-on and held by a bind mount on a file in the instance directory, so VIFs are plugged
//! before init starts and survive the guest's own reboots (the monitor starts each new init in
//! the same namespace), as a VM's NICs survive a reboot.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use rustix::fs::{Mode, OFlags};
use tracing::debug;

use super::error::{Error, Result};

/// `f_type` of nsfs (linux/magic.h NSFS_MAGIC).
const NSFS_MAGIC: i64 = 0x6e73_6673;

fn ns_err(path: &Path, e: impl Into<std::io::Error>) -> Error {
    Error::Netns {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// Whether `path` is a mounted network namespace file.
// f_type is i64 on x86_64 but narrower elsewhere.
#[allow(clippy::useless_conversion)]
pub fn is_netns(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| i64::from(s.f_type) == NSFS_MAGIC)
}

/// Creates a new network namespace bound on `path`; keeps an existing one (idempotent).
pub fn create_netns(path: &Path) -> Result<()> {
    if is_netns(path) {
        return Ok(());
    }
    match rustix::fs::open(
        path,
        OFlags::CREATE | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o444),
    ) {
        Ok(_) => {}
        Err(e) => return Err(ns_err(path, e)),
    }
    // unshare(CLONE_NEWNET) moves only the calling thread: a short-lived thread creates the
    // namespace and pins it with the bind mount, the daemon's other threads stay on the host.
    let target = path.to_path_buf();
    let r = std::thread::spawn(move || -> Result<()> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| ns_err(&target, e))?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| ns_err(&target, e))?;
        Ok(())
    })
    .join()
    .map_err(|_| ns_err(path, std::io::Error::other("netns thread panicked")))?;
    if let Err(e) = r {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    // Private: the namespace's mount must not propagate into peers of the state directory.
    let _ = mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    );
    debug!(path = %path.display(), "network namespace created");
    Ok(())
}

/// Releases the namespace (it disappears once no process is left in it, taking the container
/// ends of the veths, and so the host ends, with it) and removes the file. Idempotent.
pub fn remove_netns(path: &Path) -> Result<()> {
    while is_netns(path) {
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINVAL) => break,
            Err(e) => return Err(ns_err(path, e)),
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ns_err(path, e)),
    }
}

/// Moves the calling thread into the namespace at `path` (the monitor's intermediate process,
/// before it unshares the other namespaces).
pub fn enter_netns(path: &Path) -> Result<()> {
    let f = File::open(path).map_err(|e| ns_err(path, e))?;
    setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| ns_err(path, e))
}
