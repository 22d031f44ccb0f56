//! Unpacks layer tars into a directory without ever leaving it.
//!
//! Every path is walked component by component from a directory fd with `O_NOFOLLOW`, and
//! every change is made with `*at` calls relative to the parent's fd, so a symlink planted by
//! an earlier entry (`etc -> /etc`) cannot redirect a later write to the host. Names with `..`
//! are refused; absolute names are taken relative to the destination.

use crate::{Error, Result};
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{self as rfs, AtFlags, FileType as RFileType, Mode, OFlags, Timestamps};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const ACL_ACCESS: &str = "system.posix_acl_access";
const ACL_DEFAULT: &str = "system.posix_acl_default";

/// How whiteouts are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnpackMode {
    /// Apply the layer onto what is already in the directory: whiteouts delete.
    Flatten,
    /// Produce an overlayfs lower/upper dir: whiteouts become 0/0 char devices and opaque
    /// directories get `trusted.overlay.opaque=y`.
    Overlay,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct UnpackStats {
    pub entries: u64,
    pub whiteouts: u64,
    pub bytes: u64,
}

fn err(path: &[u8], e: impl std::fmt::Display) -> Error {
    Error::Other(format!("{}: {e}", String::from_utf8_lossy(path)))
}

fn errno(path: &[u8], e: rustix::io::Errno) -> Error {
    Error::io(
        Path::new(OsStr::from_bytes(path)),
        std::io::Error::from_raw_os_error(e.raw_os_error()),
    )
}

/// Splits an entry name into checked components.
fn components(name: &[u8]) -> Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    for c in name.split(|b| *b == b'/') {
        match c {
            b"" | b"." => continue,
            b".." => {
                return Err(Error::Refused(format!(
                    "layer entry {} climbs out with '..'",
                    String::from_utf8_lossy(name)
                )))
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

fn open_dir_at(dir: impl AsFd, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    rfs::openat(
        dir,
        OsStr::from_bytes(name),
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens (creating as needed, mode 0755) the parent directories of `comps`, refusing to
/// follow symlinks. Returns the parent's fd.
fn open_parent(root: &OwnedFd, comps: &[&[u8]], name: &[u8]) -> Result<OwnedFd> {
    let mut cur = rfs::openat(
        root,
        ".",
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| errno(name, e))?;
    for c in comps {
        let next = match open_dir_at(&cur, c) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => {
                rfs::mkdirat(&cur, OsStr::from_bytes(c), Mode::from_raw_mode(0o755))
                    .map_err(|e| errno(name, e))?;
                open_dir_at(&cur, c).map_err(|e| errno(name, e))?
            }
            Err(rustix::io::Errno::NOTDIR) | Err(rustix::io::Errno::LOOP) => {
                return Err(Error::Refused(format!(
                    "layer entry {} goes through {} which is not a directory (a symlink?)",
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(c)
                )))
            }
            Err(e) => return Err(errno(name, e)),
        };
        cur = next;
    }
    Ok(cur)
}

/// Removes `name` in `dir`, recursively if it is a directory, never following symlinks.
pub fn remove_at(dir: &OwnedFd, name: &[u8]) -> rustix::io::Result<()> {
    match rfs::unlinkat(dir, OsStr::from_bytes(name), AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(rustix::io::Errno::ISDIR) | Err(rustix::io::Errno::PERM) => {
            let sub = open_dir_at(dir, name)?;
            clear_dir(&sub, &HashSet::new(), &[])?;
            rfs::unlinkat(dir, OsStr::from_bytes(name), AtFlags::REMOVEDIR)
        }
        Err(e) => Err(e),
    }
}

/// Removes every child of `dir` except those whose full path (`prefix/name`) is in `keep`.
fn clear_dir(dir: &OwnedFd, keep: &HashSet<Vec<u8>>, prefix: &[u8]) -> rustix::io::Result<()> {
    let mut names = Vec::new();
    let mut d = rfs::Dir::read_from(dir)?;
    while let Some(ent) = d.read() {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    for n in names {
        let mut full = prefix.to_vec();
        if !full.is_empty() {
            full.push(b'/');
        }
        full.extend_from_slice(&n);
        if !keep.contains(&full) {
            remove_at(dir, &n)?;
        }
    }
    Ok(())
}

struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn set_times_at(dir: &OwnedFd, name: &[u8], mtime: i64) -> rustix::io::Result<()> {
    let ts = rfs::Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    rfs::utimensat(
        dir,
        OsStr::from_bytes(name),
        &Timestamps {
            last_access: ts,
            last_modification: ts,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
}

/// The ACLs an entry got from its parent's default ACL but does not have in the layer.
/// Everything created in a directory with a default ACL inherits it: as its access ACL, and a
/// directory as its default ACL too. The layer's entry alone says which ACLs it has.
fn inherited_acls(m: &Meta, is_dir: bool) -> impl Iterator<Item = &'static str> + '_ {
    [ACL_ACCESS, ACL_DEFAULT]
        .into_iter()
        .filter(move |k| (is_dir || *k == ACL_ACCESS) && !m.xattrs.iter().any(|(x, _)| x == k))
}

fn removed_or_absent(r: rustix::io::Result<()>, name: &[u8], key: &str) -> Result<()> {
    match r {
        Ok(()) | Err(rustix::io::Errno::NODATA) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
        Err(e) => Err(err(name, format!("removing inherited {key}: {e}"))),
    }
}

/// Inherited ACLs off, owner, then mode (chown clears setuid), then xattrs (chown clears
/// security.capability).
fn apply_meta_fd(fd: &OwnedFd, m: &Meta, name: &[u8], is_dir: bool) -> Result<()> {
    for key in inherited_acls(m, is_dir) {
        removed_or_absent(rfs::fremovexattr(fd, key), name, key)?;
    }
    rfs::fchown(
        fd,
        Some(rustix::process::Uid::from_raw(m.uid)),
        Some(rustix::process::Gid::from_raw(m.gid)),
    )
    .map_err(|e| errno(name, e))?;
    rfs::fchmod(fd, Mode::from_raw_mode(m.mode & 0o7777)).map_err(|e| errno(name, e))?;
    for (k, v) in &m.xattrs {
        rfs::fsetxattr(fd, k.as_str(), v, rfs::XattrFlags::empty())
            .map_err(|e| err(name, format!("setting xattr {k}: {e}")))?;
    }
    Ok(())
}

/// Unpacks one layer (plain, gzip or zstd tar, detected from its first bytes) into `dest`,
/// which must exist. Returns what it did.
pub fn unpack_layer(reader: impl Read, dest: &Path, mode: UnpackMode) -> Result<UnpackStats> {
    unpack_layer_buffered(reader, dest, mode, 1 << 20)
}

/// [`unpack_layer`] with `io_buf` bytes for the read-ahead and copy buffers. The fuzz target
/// uses a small one: 1 MiB buffers per call cost it more than the unpacking.
pub fn unpack_layer_buffered(
    reader: impl Read,
    dest: &Path,
    mode: UnpackMode,
    io_buf: usize,
) -> Result<UnpackStats> {
    let io_buf = io_buf.max(4096);
    let mut reader = std::io::BufReader::with_capacity(io_buf, reader);
    let magic = {
        let b = std::io::BufRead::fill_buf(&mut reader).map_err(|e| Error::io(dest, e))?;
        b.get(..4).map(<[u8]>::to_vec).unwrap_or_default()
    };
    let stream: Box<dyn Read> = if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::Decoder::with_buffer(reader).map_err(|e| Error::io(dest, e))?)
    } else if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::GzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let root = rfs::open(
        dest,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| errno(dest.as_os_str().as_bytes(), e))?;
    let mut archive = tar::Archive::new(stream);
    let mut stats = UnpackStats::default();
    // Paths this layer created: an opaque marker must not delete them.
    let mut created: HashSet<Vec<u8>> = HashSet::new();
    // Directory mtimes are set last: creating their children changes them.
    let mut dir_times: Vec<(Vec<u8>, i64)> = Vec::new();
    let entries = archive.entries().map_err(|e| Error::io(dest, e))?;
    let mut buf = vec![0u8; io_buf];
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::io(dest, e))?;
        let name = entry.path_bytes().into_owned();
        let comps = components(&name)?;
        let h = entry.header().clone();
        let kind = h.entry_type();
        let mut xattrs = Vec::new();
        if let Some(exts) = entry.pax_extensions().map_err(|e| Error::io(dest, e))? {
            for ext in exts {
                let ext = ext.map_err(|e| Error::io(dest, e))?;
                if let Some(k) = ext.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr.")) {
                    xattrs.push((k.to_string(), ext.value_bytes().to_vec()));
                }
            }
        }
        let meta = Meta {
            mode: h.mode().map_err(|e| err(&name, e))?,
            uid: u32::try_from(h.uid().map_err(|e| err(&name, e))?)
                .map_err(|_| err(&name, "uid out of range"))?,
            gid: u32::try_from(h.gid().map_err(|e| err(&name, e))?)
                .map_err(|_| err(&name, "gid out of range"))?,
            mtime: i64::try_from(h.mtime().map_err(|e| err(&name, e))?).unwrap_or(0),
            xattrs,
        };
        stats.entries += 1;
        let Some((last, parents)) = comps.split_last() else {
            // The root directory itself.
            if kind.is_dir() {
                apply_meta_fd(&root, &meta, &name, true)?;
                dir_times.push((Vec::new(), meta.mtime));
            }
            continue;
        };
        let parent = open_parent(&root, parents, &name)?;
        let rel: Vec<u8> = comps.join(&b'/');
        let parent_rel: Vec<u8> = parents.join(&b'/');

        if *last == OPAQUE {
            stats.whiteouts += 1;
            match mode {
                UnpackMode::Flatten => {
                    clear_dir(&parent, &created, &parent_rel).map_err(|e| errno(&name, e))?
                }
                UnpackMode::Overlay => rfs::fsetxattr(
                    &parent,
                    "trusted.overlay.opaque",
                    b"y",
                    rfs::XattrFlags::empty(),
                )
                .map_err(|e| err(&name, format!("marking opaque: {e}")))?,
            }
            continue;
        }
        if let Some(target) = last.strip_prefix(WHITEOUT_PREFIX) {
            stats.whiteouts += 1;
            if target.is_empty() || target == b"." || target == b".." {
                return Err(err(&name, "invalid whiteout"));
            }
            remove_at(&parent, target).map_err(|e| errno(&name, e))?;
            if mode == UnpackMode::Overlay {
                rfs::mknodat(
                    &parent,
                    OsStr::from_bytes(target),
                    RFileType::CharacterDevice,
                    Mode::empty(),
                    rfs::makedev(0, 0),
                )
                .map_err(|e| errno(&name, e))?;
            }
            continue;
        }
        let cname = OsStr::from_bytes(last);
        // An existing non-directory (or a directory being replaced by a non-directory) goes.
        let existing = rfs::statat(&parent, cname, AtFlags::SYMLINK_NOFOLLOW).ok();
        let existing_is_dir =
            existing.is_some_and(|st| RFileType::from_raw_mode(st.st_mode) == RFileType::Directory);
        if existing.is_some() && !(kind.is_dir() && existing_is_dir) {
            remove_at(&parent, last).map_err(|e| errno(&name, e))?;
        }
        created.insert(rel.clone());
        if kind.is_dir() {
            if !existing_is_dir {
                rfs::mkdirat(&parent, cname, Mode::from_raw_mode(0o700))
                    .map_err(|e| errno(&name, e))?;
            }
            let fd = open_dir_at(&parent, last).map_err(|e| errno(&name, e))?;
            apply_meta_fd(&fd, &meta, &name, true)?;
            dir_times.push((rel, meta.mtime));
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            let fd = rfs::openat(
                &parent,
                cname,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| errno(&name, e))?;
            let mut file = std::fs::File::from(fd);
            loop {
                let n = entry.read(&mut buf).map_err(|e| Error::io(dest, e))?;
                if n == 0 {
                    break;
                }
                std::io::Write::write_all(&mut file, &buf[..n])
                    .map_err(|e| Error::io(Path::new(OsStr::from_bytes(&name)), e))?;
                stats.bytes += n as u64;
            }
            let fd = OwnedFd::from(file);
            apply_meta_fd(&fd, &meta, &name, false)?;
            set_times_at(&parent, last, meta.mtime).map_err(|e| errno(&name, e))?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| err(&name, "symlink without target"))?
                .into_owned();
            rfs::symlinkat(OsStr::from_bytes(&target), &parent, cname)
                .map_err(|e| errno(&name, e))?;
            rfs::chownat(
                &parent,
                cname,
                Some(rustix::process::Uid::from_raw(meta.uid)),
                Some(rustix::process::Gid::from_raw(meta.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| errno(&name, e))?;
            set_times_at(&parent, last, meta.mtime).map_err(|e| errno(&name, e))?;
        } else if kind.is_hard_link() {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| err(&name, "hard link without target"))?
                .into_owned();
            let tcomps = components(&target)?;
            let Some((tlast, tparents)) = tcomps.split_last() else {
                return Err(err(&name, "hard link to the root"));
            };
            let tparent = open_parent(&root, tparents, &target)?;
            // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
            rfs::linkat(
                &tparent,
                OsStr::from_bytes(tlast),
                &parent,
                cname,
                AtFlags::empty(),
            )
            .map_err(|e| errno(&name, e))?;
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            let (ft, dev) = if kind.is_fifo() {
                (RFileType::Fifo, 0)
            } else {
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                let ft = if kind.is_character_special() {
                    RFileType::CharacterDevice
                } else {
                    RFileType::BlockDevice
                };
                (ft, rfs::makedev(major, minor))
            };
            rfs::mknodat(&parent, cname, ft, Mode::from_raw_mode(0o600), dev)
                .map_err(|e| errno(&name, e))?;
            // Opening a device or fifo could block or reach a driver, and O_PATH fds cannot
            // take xattrs: the inherited ACL goes through the parent's fd path, which names
            // this very directory (no re-resolution of the image's path on the host).
            for key in inherited_acls(&meta, false) {
                let at = format!("/proc/self/fd/{}/", rustix::fd::AsRawFd::as_raw_fd(&parent));
                let mut p = at.into_bytes();
                p.extend_from_slice(last);
                removed_or_absent(rfs::lremovexattr(OsStr::from_bytes(&p), key), &name, key)?;
            }
            rfs::chownat(
                &parent,
                cname,
                Some(rustix::process::Uid::from_raw(meta.uid)),
                Some(rustix::process::Gid::from_raw(meta.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| errno(&name, e))?;
            rfs::chmodat(
                &parent,
                cname,
                Mode::from_raw_mode(meta.mode & 0o7777),
                AtFlags::empty(),
            )
            .map_err(|e| errno(&name, e))?;
            set_times_at(&parent, last, meta.mtime).map_err(|e| errno(&name, e))?;
        } else if kind.is_pax_global_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            continue;
        } else {
            return Err(err(&name, format!("unsupported tar entry type {kind:?}")));
        }
    }
    for (rel, mtime) in dir_times.into_iter().rev() {
        let comps = components(&rel)?;
        match comps.split_last() {
            Some((last, parents)) => {
                let parent = open_parent(&root, parents, &rel)?;
                set_times_at(&parent, last, mtime).map_err(|e| errno(&rel, e))?;
            }
            None => set_times_at(&root, b".", mtime).map_err(|e| errno(b".", e))?,
        }
    }
    Ok(stats)
}
