//! The per-instance disk: a sparse ext4 image on an autoclear loop device holding the
//! overlayfs upper/work dirs, and the overlay rootfs on top of the image layers.

use crate::error::{io, Error, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Paths {
    pub image: PathBuf,
    pub disk_mnt: PathBuf,
    pub rootfs: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Paths {
        Paths {
            image: dir.join("disk.img"),
            disk_mnt: dir.join("disk"),
            rootfs: dir.join("rootfs"),
        }
    }
}

/// Creates the sparse disk image and its filesystem (first boot only).
pub fn create_disk(path: &Path, root_gb: u64) -> Result<()> {
    let size = root_gb
        .checked_mul(1 << 30)
        .ok_or_else(|| Error::Invalid("root_gb overflows".into()))?;
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(path))?;
    f.set_len(size).map_err(io(path))?;
    drop(f);
    // No lazy init threads writing zeroes behind our back, no journal checksum cost: the disk
    // is private and the host page cache holds it.
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
        ])
        .arg(path))
}

/// Attaches `image` to a free loop device with autoclear (detached when unmounted).
fn attach_loop(image: &Path) -> Result<(std::fs::File, PathBuf)> {
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(io(image))?;
    // Parallel boots would all get the same free device from GET_FREE: one at a time here;
    // other processes (losetup, mount -o loop) can still race us, hence the retries inside.
    static ATTACH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = ATTACH.lock().unwrap_or_else(|p| p.into_inner());
    let opts = guestfs_tools::loopdev::LoopOptions {
        name: "fatbox instance disk",
        ..Default::default()
    };
    guestfs_tools::loopdev::attach(&backing, &opts)
        .map_err(|e| Error::Other(format!("no loop device for {}: {e}", image.display())))
}

pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(m) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let p = path.to_string_lossy();
    m.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|mp| mp == p))
}

/// Mounts the disk and the overlay rootfs (idempotent). `upper_owner`: the host uid/gid that
/// owns the upper dir (the guest's root under a user namespace), set before the overlay is
/// mounted because overlay caches its root's owner.
pub fn mount_rootfs(
    paths: &Paths,
    lowers_top_first: &[PathBuf],
    upper_owner: Option<u32>,
) -> Result<()> {
    for d in [&paths.disk_mnt, &paths.rootfs] {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    if !is_mountpoint(&paths.disk_mnt) {
        if let Some(d) = loop_of(&paths.image) {
            return Err(Error::Other(format!(
                "{} is still attached to {}: not mounting it twice",
                paths.image.display(),
                d.display()
            )));
        }
        if grow_flag(paths).exists() {
            offline_grow(paths)?;
        }
        let (loopf, dev) = attach_loop(&paths.image)?;
        let r = mount(
            Some(&dev),
            &paths.disk_mnt,
            Some("ext4"),
            MsFlags::MS_NOATIME,
            None::<&str>,
        );
        // The mount holds the device now; closing ours lets autoclear detach it at umount.
        drop(loopf);
        r.map_err(|e| {
            Error::sys(
                format!("mount {} on {}", dev.display(), paths.disk_mnt.display()),
                e,
            )
        })?;
    }
    let upper = paths.disk_mnt.join("upper");
    let work = paths.disk_mnt.join("work");
    for d in [&upper, &work] {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    if let Some(id) = upper_owner {
        std::os::unix::fs::chown(&upper, Some(id), Some(id)).map_err(io(&upper))?;
    }
    if !is_mountpoint(&paths.rootfs) {
        let lower = lowers_top_first
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":");
        let opts = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        mount(
            Some("overlay"),
            &paths.rootfs,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .map_err(|e| Error::sys(format!("overlay on {}", paths.rootfs.display()), e))?;
    }
    Ok(())
}

/// Unmounts the overlay and the disk (the loop device goes with it: autoclear), and waits
/// until the filesystem is really gone: a lazily detached ext4 still held somewhere (another
/// mount namespace) and mounted again through a second loop device would be two writers of
/// one disk.
pub fn unmount_rootfs(paths: &Paths) -> Result<()> {
    let dev = mounted_device(&paths.disk_mnt);
    for p in [&paths.rootfs, &paths.disk_mnt] {
        // Submounts could exist if someone bound into the rootfs; detach everything under.
        while is_mountpoint(p) {
            umount2(p.as_path(), MntFlags::MNT_DETACH)
                .map_err(|e| Error::sys(format!("umount {}", p.display()), e))?;
        }
    }
    if dev.is_some() {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while let Some(d) = loop_of(&paths.image) {
            if std::time::Instant::now() >= deadline {
                return Err(Error::Other(format!(
                    "{} is still attached to {} (its filesystem is held elsewhere)",
                    paths.image.display(),
                    d.display()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    Ok(())
}

/// Mounts a powered-off instance's disk read-only at `mnt` (snapshot and export read it);
/// [`unmount_disk`] undoes it.
pub fn mount_disk_ro(paths: &Paths, mnt: &Path) -> Result<()> {
    if let Some(d) = loop_of(&paths.image) {
        return Err(Error::Conflict(format!(
            "{} is attached to {}: the instance's disk is in use",
            paths.image.display(),
            d.display()
        )));
    }
    std::fs::create_dir_all(mnt).map_err(io(mnt))?;
    let (loopf, dev) = attach_loop(&paths.image)?;
    let r = mount(
        Some(&dev),
        mnt,
        Some("ext4"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOATIME,
        None::<&str>,
    );
    drop(loopf);
    r.map_err(|e| Error::sys(format!("mount {} on {}", dev.display(), mnt.display()), e))
}

/// Unmounts what [`mount_disk_ro`] mounted and waits for the loop device to go.
pub fn unmount_disk(paths: &Paths, mnt: &Path) -> Result<()> {
    while is_mountpoint(mnt) {
        umount2(mnt, MntFlags::MNT_DETACH)
            .map_err(|e| Error::sys(format!("umount {}", mnt.display()), e))?;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Some(d) = loop_of(&paths.image) {
        if std::time::Instant::now() >= deadline {
            return Err(Error::Other(format!(
                "{} is still attached to {}",
                paths.image.display(),
                d.display()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

/// The loop device backed by `image`, if any (from sysfs).
pub fn loop_of(image: &Path) -> Option<PathBuf> {
    let want = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    let rd = std::fs::read_dir("/sys/block").ok()?;
    rd.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            return None;
        }
        let b = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
        (Path::new(b.trim()) == want).then(|| PathBuf::from(format!("/dev/{name}")))
    })
}

const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;

/// The block device mounted at `mnt` (from our mountinfo), if any.
fn mounted_device(mnt: &Path) -> Option<PathBuf> {
    let m = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mnt.to_string_lossy();
    m.lines().find_map(|l| {
        let mut f = l.split(' ');
        if f.nth(4)? != want {
            return None;
        }
        // Optional fields end at " - "; then fstype and source.
        let rest = l.split(" - ").nth(1)?;
        let src = rest.split(' ').nth(1)?;
        src.starts_with("/dev/").then(|| PathBuf::from(src))
    })
}

/// Marks a disk whose filesystem must still grow to its file's size (done before the next
/// mount).
fn grow_flag(paths: &Paths) -> PathBuf {
    let mut p = paths.image.clone().into_os_string();
    p.push(".grow-pending");
    PathBuf::from(p)
}

/// What `grow` achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grown {
    Now,
    /// Online ext4 resize needs CAP_SYS_RESOURCE, which fatboxd lacks (some sandboxes drop
    /// it even for root): the filesystem grows offline before the next mount.
    AtNextBoot,
}

/// Grows the disk image to `root_gb` and its ext4 filesystem with it: online through the
/// loop device when the disk is mounted, offline (fsck first, as resize2fs demands) when not.
pub fn grow(paths: &Paths, root_gb: u64) -> Result<Grown> {
    let size = root_gb
        .checked_mul(1 << 30)
        .ok_or_else(|| Error::Invalid("root_gb overflows".into()))?;
    let f = OpenOptions::new()
        .write(true)
        .open(&paths.image)
        .map_err(io(&paths.image))?;
    let cur = f.metadata().map_err(io(&paths.image))?.len();
    if size < cur {
        return Err(Error::Invalid("disks only grow".into()));
    }
    f.set_len(size).map_err(io(&paths.image))?;
    drop(f);
    match mounted_device(&paths.disk_mnt) {
        Some(dev) => {
            let lf = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dev)
                .map_err(io(&dev))?;
            // SAFETY: LOOP_SET_CAPACITY takes no argument; it re-reads the backing file size.
            if unsafe { libc::ioctl(lf.as_raw_fd(), LOOP_SET_CAPACITY, 0) } < 0 {
                return Err(Error::io(&dev, std::io::Error::last_os_error()));
            }
            match run(Command::new("resize2fs").arg(&dev)) {
                Ok(()) => Ok(Grown::Now),
                Err(Error::Command { msg, .. }) if msg.contains("Permission denied") => {
                    let flag = grow_flag(paths);
                    std::fs::write(&flag, b"").map_err(io(&flag))?;
                    Ok(Grown::AtNextBoot)
                }
                Err(e) => Err(e),
            }
        }
        None => {
            offline_grow(paths)?;
            Ok(Grown::Now)
        }
    }
}

fn offline_grow(paths: &Paths) -> Result<()> {
    // e2fsck exits 1 when it fixed something: still fine to resize.
    let out = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(&paths.image)
        .output()
        .map_err(|e| Error::Command {
            cmd: "e2fsck".into(),
            msg: e.to_string(),
        })?;
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(Error::Command {
            cmd: format!("e2fsck -f -p {}", paths.image.display()),
            msg: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        });
    }
    run(Command::new("resize2fs").arg(&paths.image))?;
    let _ = std::fs::remove_file(grow_flag(paths));
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().map_err(|e| Error::Command {
        cmd: format!("{cmd:?}"),
        msg: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            cmd: format!("{cmd:?}"),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
