//! `fatbox image export INSTANCE --qcow2 OUT`: the instance as a flat VM disk again.
//!
//! The instance's merged tree — its image layers without the containerize layer, then its
//! upper dir, whiteouts applied, owners shifted back from the user-namespace range — is laid
//! out in a staging dir next to OUT (lower files hard-linked, upper files copied), turned into
//! an ext4 filesystem by `mkfs.ext4 -d` inside a raw disk 1 MiB in, behind a GPT written here,
//! and converted by `qemu-img` to qcow2 v3 without backing file or extended L2 (what Glance
//! accepts). A running instance is frozen only while its upper dir is copied.

use super::Manager;
use crate::disk::{self, Paths};
use crate::error::{io, Error, Result};
use crate::model::VmState;
use crate::userns::IdRange;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// GPT: 128 entries of 128 bytes = 32 sectors, plus the header sector.
const GPT_SECTORS: u64 = 33;
const FSTAB_MARK: &str = "# fatbox: block devices do not exist in a container: ";

/// Discoverable Partitions Specification: "Linux root" of this architecture.
#[cfg(target_arch = "aarch64")]
const ROOT_TYPE: &str = "b921b045-1df0-41c3-af44-4c6f280d3fae";
#[cfg(not(target_arch = "aarch64"))]
const ROOT_TYPE: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";

#[derive(Debug, Clone, Deserialize)]
pub struct ExportRequest {
    /// Absolute host path of the qcow2 to write.
    pub path: PathBuf,
    /// Only "qcow2".
    #[serde(default = "qcow2")]
    pub format: String,
    /// Virtual disk size; default the flavor's root_gb, grown when the tree needs more.
    #[serde(default)]
    pub size_gb: Option<u64>,
    /// Replace an existing file at `path`.
    #[serde(default)]
    pub overwrite: bool,
}

fn qcow2() -> String {
    "qcow2".into()
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub path: PathBuf,
    pub format: String,
    pub virtual_size: u64,
    /// Bytes of the qcow2 file.
    pub file_size: u64,
    pub filesystem_uuid: String,
    pub partition_uuid: String,
    /// Files, dirs and links in the tree.
    pub entries: u64,
    /// Data bytes in the tree.
    pub tree_bytes: u64,
    /// How long the instance was frozen (0 when it was not running).
    pub frozen_ms: u64,
    pub stage_ms: u64,
    pub mkfs_ms: u64,
    pub convert_ms: u64,
    pub total_ms: u64,
    /// What was put back from the base layer / changed for a VM boot.
    pub restored: Vec<String>,
}

/// Removes the work dir (and anything mounted in it) on every path.
struct Work {
    dir: PathBuf,
    mounts: Vec<PathBuf>,
}

impl Drop for Work {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            while disk::is_mountpoint(m) {
                if let Err(e) = nix::mount::umount2(m.as_path(), nix::mount::MntFlags::MNT_DETACH) {
                    tracing::warn!(mount = %m.display(), error = %e, "export: unmounting");
                    break;
                }
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "export: removing work dir");
        }
    }
}

/// Thaws the instance on every path (unless it was paused before: it stays as it was).
struct Frozen<'a> {
    cg: &'a crate::cgroups::Cgroups,
    since: Instant,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.cg.freeze(false) {
            tracing::error!(error = %e, "export: thawing the instance failed");
        }
    }
}

/// Freezing is asynchronous (FREEZING / `frozen 0` until every task stopped).
fn wait_frozen(cg: &crate::cgroups::Cgroups) -> Result<()> {
    // The v1 freezer when the host has one (hybrid hosts freeze there), else cgroup2.
    let v1 = cg
        .dirs
        .iter()
        .map(|d| d.join("freezer.state"))
        .find(|p| p.exists());
    let (file, done) = match v1 {
        Some(p) => (p, "FROZEN"),
        None => (cg.unified.join("cgroup.events"), "frozen 1"),
    };
    if !file.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = std::fs::read_to_string(&file).map_err(io(&file))?;
        if s.lines().any(|l| l.trim() == done) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout("instance did not freeze within 10 s".into()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Manager {
    pub fn export(&self, id: &str, req: &ExportRequest) -> Result<ExportReport> {
        let t0 = Instant::now();
        if req.format != "qcow2" {
            return Err(Error::Invalid(format!(
                "export format {:?}: only qcow2",
                req.format
            )));
        }
        let out = &req.path;
        if !out.is_absolute() {
            return Err(Error::Invalid(format!(
                "{}: the export path must be absolute",
                out.display()
            )));
        }
        let name = out
            .file_name()
            .ok_or_else(|| Error::Invalid(format!("{}: no file name", out.display())))?;
        let parent = out
            .parent()
            .ok_or_else(|| Error::Invalid(format!("{}: no parent dir", out.display())))?;
        if !parent.is_dir() {
            return Err(Error::Invalid(format!("{}: no such dir", parent.display())));
        }
        if out.exists() && !req.overwrite {
            return Err(Error::Conflict(format!(
                "{} exists (overwrite to replace it)",
                out.display()
            )));
        }
        let inst = self.get(id)?;
        let lowers = self.export_lowers(&inst)?;
        let work_dir = tempfile::Builder::new()
            .prefix(&format!(".{}.export-", name.to_string_lossy()))
            .tempdir_in(parent)
            .map_err(io(parent))?
            .keep();
        let mut work = Work {
            dir: work_dir,
            mounts: Vec::new(),
        };
        let root = work.dir.join("root");
        let mut tree = Tree::default();
        let mut restored = Vec::new();

        // Lower layers: hard links into the shared store (never written through: the upper
        // replaces files, it does not modify them).
        for (i, l) in lowers.iter().enumerate() {
            if i == 0 {
                tree.mkdir_like(l, &root, None)?;
            }
            tree.apply(l, &root, None, true)?;
        }

        // The upper dir, under the op lock (no start/stop meanwhile) and, if it runs, frozen.
        let frozen_ms;
        {
            let l = self.op_lock(&inst.uuid);
            let _g = super::lock(&l);
            let inst = self.get(&inst.uuid)?;
            let paths = Paths::new(&self.dir(&inst.uuid));
            let upper_root = if disk::is_mountpoint(&paths.disk_mnt) {
                paths.disk_mnt.clone()
            } else if paths.image.exists() {
                let m = work.dir.join("disk");
                std::fs::create_dir(&m).map_err(io(&m))?;
                disk::mount_disk_ro(&paths, &m)?;
                work.mounts.push(m.clone());
                m
            } else {
                // Never booted: the image alone.
                PathBuf::new()
            };
            let upper = upper_root.join("upper");
            let cg = self.cgroups(&inst.uuid);
            let frozen = if matches!(inst.state, VmState::Running | VmState::Rescued) {
                cg.freeze(true)?;
                let f = Frozen {
                    cg: &cg,
                    since: Instant::now(),
                };
                wait_frozen(&cg)?;
                Some(f)
            } else {
                None
            };
            let shift = if inst.userns { inst.idmap } else { None };
            if !upper_root.as_os_str().is_empty() && upper.is_dir() {
                tree.apply(&upper, &root, shift, false)?;
                tree.set_meta(&upper, &root, shift)?;
            }
            frozen_ms = frozen
                .as_ref()
                .map(|f| f.since.elapsed().as_millis() as u64)
                .unwrap_or(0);
            drop(frozen);
            let mounts = std::mem::take(&mut work.mounts);
            for m in &mounts {
                disk::unmount_rootfs(&Paths {
                    image: paths.image.clone(),
                    disk_mnt: m.clone(),
                    rootfs: work.dir.join("no-rootfs"),
                })?;
            }
        }

        let fs_uuid = uuid::Uuid::new_v4();
        restored.extend(fix_for_vm(&root, &fs_uuid)?);
        let stage_ms = t0.elapsed().as_millis() as u64;
        let (tree_bytes, inodes) = usage(&root)?;

        // Sizes: the flavor's disk, or more when the tree needs it (ext4 metadata, journal,
        // reserved blocks, some room to grow).
        let want = req
            .size_gb
            .unwrap_or(inst.flavor.root_gb)
            .saturating_mul(1 << 30);
        let need = tree_bytes + tree_bytes / 4 + inodes * 512 + 256 * MIB;
        let fs_bytes = want.max(need).div_ceil(MIB) * MIB;
        let disk_bytes = fs_bytes + 2 * MIB;
        let raw = work.dir.join("disk.raw");
        File::create(&raw)
            .and_then(|f| f.set_len(disk_bytes))
            .map_err(io(&raw))?;
        let t = Instant::now();
        let inode_count = (inodes + inodes / 2 + 4096).max(fs_bytes / 16384);
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-L", "root", "-U"])
            .arg(fs_uuid.to_string())
            .arg("-N")
            .arg(inode_count.to_string())
            .arg("-E")
            .arg(format!("offset={MIB},root_owner=0:0"))
            .arg("-d")
            .arg(&root)
            .arg(&raw)
            .arg(format!("{}k", fs_bytes / 1024)))?;
        let mkfs_ms = t.elapsed().as_millis() as u64;
        // The staging tree is no longer needed: free its space before the qcow2 is written.
        std::fs::remove_dir_all(&root).map_err(io(&root))?;
        let part_uuid = uuid::Uuid::new_v4();
        write_gpt(
            &raw,
            disk_bytes,
            MIB / SECTOR,
            fs_bytes / SECTOR,
            &part_uuid,
        )?;

        let t = Instant::now();
        let tmp_out = work.dir.join("out.qcow2");
        run(Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "compat=1.1,extended_l2=off,lazy_refcounts=off",
            ])
            .arg(&raw)
            .arg(&tmp_out))?;
        File::open(&tmp_out)
            .and_then(|f| f.sync_all())
            .map_err(io(&tmp_out))?;
        let convert_ms = t.elapsed().as_millis() as u64;
        let file_size = std::fs::metadata(&tmp_out).map_err(io(&tmp_out))?.len();
        std::fs::rename(&tmp_out, out).map_err(io(out))?;
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io(parent))?;
        drop(work);
        let rep = ExportReport {
            path: out.clone(),
            format: "qcow2".into(),
            virtual_size: disk_bytes,
            file_size,
            filesystem_uuid: fs_uuid.to_string(),
            partition_uuid: part_uuid.to_string(),
            entries: tree.entries,
            tree_bytes,
            frozen_ms,
            stage_ms,
            mkfs_ms,
            convert_ms,
            total_ms: t0.elapsed().as_millis() as u64,
            restored,
        };
        tracing::info!(
            uuid = %inst.uuid,
            out = %out.display(),
            file_size,
            frozen_ms,
            total_ms = rep.total_ms,
            "exported"
        );
        Ok(rep)
    }

    /// The instance's lower dirs, bottom first, without the containerize layer (found by
    /// its history entry in the image config): the base layer has the kernel, the unmasked
    /// units and the original fstab and network config.
    fn export_lowers(&self, inst: &crate::model::Instance) -> Result<Vec<PathBuf>> {
        let skip = containerize_layer(&self.cfg, inst);
        if skip.is_none() && inst.layers.len() > 1 {
            tracing::warn!(
                uuid = %inst.uuid,
                "export: no containerize layer found in the image config; exporting all layers"
            );
        }
        let mut out = Vec::new();
        for (i, d) in inst.layers.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            out.push(match crate::glance::cached_layer_dir(&self.cfg, d) {
                Some(dir) => dir,
                None => crate::images::ensure_layer(&self.cfg, d)?,
            });
        }
        Ok(out)
    }
}

/// Index (in the instance's layers) of the layer fatbox-img's containerize step wrote.
fn containerize_layer(cfg: &crate::config::Config, inst: &crate::model::Instance) -> Option<usize> {
    use guestfs_tools::oci::Layout;
    let tries = [
        (cfg.images_dir(), inst.image.clone()),
        (
            cfg.glance_cache_dir().join("oci"),
            format!("glance-{}", inst.image),
        ),
    ];
    for (dir, name) in tries {
        let Ok(layout) = Layout::open(&dir) else {
            continue;
        };
        let Ok((_, manifest)) = layout.manifest(Some(&name)) else {
            continue;
        };
        let digests: Vec<String> = manifest
            .layers()
            .iter()
            .map(|l| l.digest().to_string())
            .collect();
        if digests != inst.layers {
            continue;
        }
        let Ok(data) = layout.read_blob(manifest.config().digest().as_ref()) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&data) else {
            continue;
        };
        let mut layer = 0usize;
        for h in v["history"].as_array().into_iter().flatten() {
            if h["empty_layer"].as_bool() == Some(true) {
                continue;
            }
            if h["created_by"]
                .as_str()
                .is_some_and(|c| c.starts_with("fatbox-img containerize"))
            {
                return Some(layer);
            }
            layer += 1;
        }
    }
    None
}

fn run(cmd: &mut Command) -> Result<()> {
    let name = format!("{:?}", cmd.get_program());
    let o = cmd.output().map_err(io(name.clone()))?;
    if !o.status.success() {
        return Err(Error::Command {
            cmd: name,
            msg: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Host id → guest id: inside the range minus its base; host root stays root (files fatboxd
/// wrote for the guest); anything else was the overflow id in the guest too.
fn unshift(id: u32, r: Option<IdRange>) -> u32 {
    match r {
        None => id,
        Some(r) if id >= r.base && id - r.base < r.size => id - r.base,
        Some(_) if id == 0 => 0,
        Some(_) => 65534,
    }
}

/// Builds the merged tree layer by layer.
#[derive(Default)]
struct Tree {
    entries: u64,
    /// (dev, ino) of a copied source file → its copy (hard links inside the upper).
    copies: HashMap<(u64, u64), PathBuf>,
}

fn remove_any(p: &Path) -> Result<()> {
    match p.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).map_err(io(p)),
        Ok(_) => std::fs::remove_file(p).map_err(io(p)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(p, e)),
    }
}

fn xattr_names(p: &Path) -> Result<Vec<String>> {
    let mut buf = vec![0u8; 4096];
    let n = loop {
        match rustix::fs::llistxattr(p, &mut buf[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(p, e.into())),
        }
    };
    Ok(buf[..n]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

fn xattr_get(p: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 4096];
    loop {
        match rustix::fs::lgetxattr(p, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(rustix::io::Errno::RANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            Err(rustix::io::Errno::NODATA) | Err(rustix::io::Errno::NOTSUP) => return Ok(None),
            Err(e) => return Err(Error::io(p, e.into())),
        }
    }
}

/// A v3 file capability (written inside a user namespace) names the namespace's root; on a
/// VM disk it must be a plain v2 one.
fn caps_to_v2(v: &[u8]) -> Vec<u8> {
    const V3: u32 = 0x0300_0000;
    if v.len() == 24 {
        let magic = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
        if magic & 0xFF00_0000 == V3 {
            let m2 = (magic & 0x00FF_FFFF) | 0x0200_0000;
            let mut out = m2.to_le_bytes().to_vec();
            out.extend_from_slice(&v[4..20]);
            return out;
        }
    }
    v.to_vec()
}

impl Tree {
    fn mkdir_like(&mut self, src: &Path, dst: &Path, shift: Option<IdRange>) -> Result<()> {
        std::fs::create_dir(dst).map_err(io(dst))?;
        self.set_meta(src, dst, shift)
    }

    /// Owner, mode, xattrs (overlay's own left out) and times of `src` onto `dst`.
    fn set_meta(&self, src: &Path, dst: &Path, shift: Option<IdRange>) -> Result<()> {
        let md = src.symlink_metadata().map_err(io(src))?;
        // chown first: it clears setuid bits and file capabilities.
        std::os::unix::fs::lchown(
            dst,
            Some(unshift(md.uid(), shift)),
            Some(unshift(md.gid(), shift)),
        )
        .map_err(io(dst))?;
        if !md.file_type().is_symlink() {
            std::fs::set_permissions(dst, std::fs::Permissions::from_mode(md.mode() & 0o7777))
                .map_err(io(dst))?;
        }
        let names = xattr_names(src)?;
        // What is created in a directory with a default ACL inherits it; the source says
        // which ACLs the entry really has.
        for key in ["system.posix_acl_access", "system.posix_acl_default"] {
            if names.iter().any(|n| n == key) {
                continue;
            }
            match rustix::fs::lremovexattr(dst, key) {
                Ok(()) | Err(rustix::io::Errno::NODATA) | Err(rustix::io::Errno::OPNOTSUPP) => {}
                // Symlinks have no ACLs; some filesystems say so with EPERM.
                Err(_) if md.file_type().is_symlink() => {}
                Err(e) => return Err(Error::io(dst, e.into())),
            }
        }
        for n in names {
            if n.starts_with("trusted.overlay.") {
                continue;
            }
            let Some(mut v) = xattr_get(src, &n)? else {
                continue;
            };
            if n == "security.capability" && shift.is_some() {
                v = caps_to_v2(&v);
            }
            rustix::fs::lsetxattr(dst, n.as_str(), &v, rustix::fs::XattrFlags::empty())
                .map_err(|e| Error::io(dst, e.into()))?;
        }
        let ts = |s: i64, ns: i64| rustix::fs::Timespec {
            tv_sec: s,
            tv_nsec: ns as _,
        };
        let times = rustix::fs::Timestamps {
            last_access: ts(md.atime(), md.atime_nsec()),
            last_modification: ts(md.mtime(), md.mtime_nsec()),
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            dst,
            &times,
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| Error::io(dst, e.into()))?;
        Ok(())
    }

    /// Applies one overlay layer dir (`src`) onto `dst`: 0/0 char devices delete, opaque
    /// dirs hide what was below. `link`: hard-link non-directories (the read-only layer
    /// store) instead of copying them (the upper dir, whose owners are shifted).
    fn apply(&mut self, src: &Path, dst: &Path, shift: Option<IdRange>, link: bool) -> Result<()> {
        for e in std::fs::read_dir(src).map_err(io(src))? {
            let e = e.map_err(io(src))?;
            let s = e.path();
            let d = dst.join(e.file_name());
            let md = s.symlink_metadata().map_err(io(&s))?;
            let ft = md.file_type();
            if ft.is_char_device() && md.rdev() == 0 {
                remove_any(&d)?;
                continue;
            }
            self.entries += 1;
            if ft.is_dir() {
                for x in ["trusted.overlay.redirect", "trusted.overlay.metacopy"] {
                    if xattr_get(&s, x)?.is_some() {
                        return Err(Error::Other(format!(
                            "{}: has {x} (overlay redirect_dir/metacopy): not exportable",
                            s.display()
                        )));
                    }
                }
                let opaque = xattr_get(&s, "trusted.overlay.opaque")?.as_deref() == Some(b"y");
                match d.symlink_metadata() {
                    Ok(m) if m.is_dir() => {
                        if opaque {
                            for c in std::fs::read_dir(&d).map_err(io(&d))? {
                                remove_any(&c.map_err(io(&d))?.path())?;
                            }
                        }
                    }
                    Ok(_) => {
                        remove_any(&d)?;
                        std::fs::create_dir(&d).map_err(io(&d))?;
                    }
                    Err(_) => std::fs::create_dir(&d).map_err(io(&d))?,
                }
                self.apply(&s, &d, shift, link)?;
                // After the children: creating them moved the dir's mtime.
                self.set_meta(&s, &d, shift)?;
                continue;
            }
            if ft.is_file() && xattr_get(&s, "trusted.overlay.metacopy")?.is_some() {
                return Err(Error::Other(format!(
                    "{}: a metacopy-only upper file (overlay metacopy=on): not exportable",
                    s.display()
                )));
            }
            remove_any(&d)?;
            if link {
                match std::fs::hard_link(&s, &d) {
                    Ok(()) => continue,
                    Err(err) if err.raw_os_error() == Some(libc::EXDEV) => {}
                    Err(err) => return Err(Error::io(&d, err)),
                }
            }
            let key = (md.dev(), md.ino());
            if md.nlink() > 1 && !ft.is_dir() {
                if let Some(first) = self.copies.get(&key) {
                    std::fs::hard_link(first, &d).map_err(io(&d))?;
                    continue;
                }
            }
            if ft.is_file() {
                std::fs::copy(&s, &d).map_err(io(&d))?;
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&s).map_err(io(&s))?;
                std::os::unix::fs::symlink(&t, &d).map_err(io(&d))?;
            } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
                let kind = if ft.is_char_device() {
                    nix::sys::stat::SFlag::S_IFCHR
                } else if ft.is_block_device() {
                    nix::sys::stat::SFlag::S_IFBLK
                } else {
                    nix::sys::stat::SFlag::S_IFIFO
                };
                nix::sys::stat::mknod(
                    &d,
                    kind,
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    md.rdev(),
                )
                .map_err(|e| Error::sys(format!("mknod {}", d.display()), e))?;
            } else {
                // Sockets are runtime objects: a VM's services create their own.
                continue;
            }
            self.set_meta(&s, &d, shift)?;
            if md.nlink() > 1 {
                self.copies.insert(key, d);
            }
        }
        Ok(())
    }
}

/// Writes a file in the staging tree as a new inode (the old one may be a hard link into
/// the shared layer store).
fn replace_file(p: &Path, data: &[u8], mode: u32) -> Result<()> {
    remove_any(p)?;
    let mut f = File::create(p).map_err(io(p))?;
    f.write_all(data).map_err(io(p))?;
    std::os::unix::fs::lchown(p, Some(0), Some(0)).map_err(io(p))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(io(p))?;
    Ok(())
}

/// What a VM boot needs on top of the merged tree: fstab mounting `/` by the new UUID (the
/// containerize comment-outs undone; other block devices, which this one-partition disk
/// does not have, commented out) and an empty machine-id (regenerated at first boot).
fn fix_for_vm(root: &Path, fs_uuid: &uuid::Uuid) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let etc = root.join("etc");
    if !etc.is_dir() {
        return Err(Error::Invalid(
            "the instance's tree has no /etc: not a Linux root filesystem".into(),
        ));
    }
    let fstab = etc.join("fstab");
    // Resolved in the staging tree only: /etc/fstab must be a plain file here.
    let old = match fstab.symlink_metadata() {
        Ok(m) if m.is_file() => std::fs::read_to_string(&fstab).map_err(io(&fstab))?,
        _ => String::new(),
    };
    let (text, notes) = rewrite_fstab(&old, fs_uuid);
    replace_file(&fstab, text.as_bytes(), 0o644)?;
    done.push(format!("/etc/fstab: / on UUID={fs_uuid}"));
    done.extend(notes);
    let mid = etc.join("machine-id");
    replace_file(&mid, b"", 0o444)?;
    done.push("/etc/machine-id emptied (systemd makes a new one at first boot)".into());
    let boot = root.join("boot");
    if let Ok(rd) = std::fs::read_dir(&boot) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("vmlinuz") || n.starts_with("initrd.img") {
                done.push(format!("/boot/{n}"));
            }
        }
    }
    Ok(done)
}

pub(crate) fn rewrite_fstab(old: &str, fs_uuid: &uuid::Uuid) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut notes = Vec::new();
    let mut have_root = false;
    for line in old.lines() {
        let line = line.strip_prefix(FSTAB_MARK).unwrap_or(line);
        let t = line.trim();
        let f: Vec<&str> = t.split_whitespace().collect();
        if t.starts_with('#') || f.len() < 2 {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let block = ["UUID=", "LABEL=", "PARTUUID=", "PARTLABEL=", "/dev/"]
            .iter()
            .any(|p| f[0].starts_with(p))
            && !f[0].starts_with("/dev/shm");
        if f[1] == "/" {
            if have_root {
                continue;
            }
            have_root = true;
            let rest: Vec<&str> = f.iter().skip(2).copied().collect();
            let rest = if rest.is_empty() {
                "ext4 errors=remount-ro 0 1".to_string()
            } else {
                let mut r = rest.clone();
                r[0] = "ext4";
                r.join(" ")
            };
            out.push_str(&format!("UUID={fs_uuid} / {rest}\n"));
        } else if block || f.get(2) == Some(&"swap") {
            out.push_str("# fatbox export: not on this one-partition disk (merged into /): ");
            out.push_str(line);
            out.push('\n');
            notes.push(format!("/etc/fstab: {} commented out", f[1]));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !have_root {
        out.push_str(&format!("UUID={fs_uuid} / ext4 errors=remount-ro 0 1\n"));
    }
    (out, notes)
}

/// Data bytes (allocated, hard links once) and inodes of a tree.
fn usage(root: &Path) -> Result<(u64, u64)> {
    fn walk(
        p: &Path,
        seen: &mut std::collections::HashSet<(u64, u64)>,
        acc: &mut (u64, u64),
    ) -> Result<()> {
        for e in std::fs::read_dir(p).map_err(io(p))? {
            let e = e.map_err(io(p))?;
            let md = e.path().symlink_metadata().map_err(io(e.path()))?;
            if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
                continue;
            }
            acc.0 += md.blocks() * 512;
            acc.1 += 1;
            if md.is_dir() {
                walk(&e.path(), seen, acc)?;
            }
        }
        Ok(())
    }
    let mut acc = (0, 1);
    walk(root, &mut Default::default(), &mut acc)?;
    Ok(acc)
}

fn guid_bytes(u: &uuid::Uuid) -> [u8; 16] {
    // GPT stores the first three fields little-endian.
    u.to_bytes_le()
}

/// Protective MBR, primary and backup GPT with one partition `[first, first+sectors)`.
fn write_gpt(
    raw: &Path,
    disk_bytes: u64,
    first: u64,
    sectors: u64,
    part: &uuid::Uuid,
) -> Result<()> {
    let lbas = disk_bytes / SECTOR;
    let last = lbas - 1;
    let part_last = first + sectors - 1;
    if part_last > last - GPT_SECTORS || first < 2 + GPT_SECTORS - 1 {
        return Err(Error::Other(
            "GPT: partition outside the usable area".into(),
        ));
    }
    let mut mbr = vec![0u8; 512];
    let e = &mut mbr[446..462];
    e[1] = 0x00;
    e[2] = 0x02;
    e[4] = 0xEE;
    e[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
    e[8..12].copy_from_slice(&1u32.to_le_bytes());
    e[12..16].copy_from_slice(&(u32::try_from(last).unwrap_or(u32::MAX)).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;

    let mut entries = vec![0u8; 128 * 128];
    let type_guid = uuid::Uuid::parse_str(ROOT_TYPE)
        .map_err(|e| Error::Other(format!("root partition type: {e}")))?;
    entries[0..16].copy_from_slice(&guid_bytes(&type_guid));
    entries[16..32].copy_from_slice(&guid_bytes(part));
    entries[32..40].copy_from_slice(&first.to_le_bytes());
    entries[40..48].copy_from_slice(&part_last.to_le_bytes());
    for (i, c) in "root".encode_utf16().enumerate() {
        entries[56 + 2 * i..58 + 2 * i].copy_from_slice(&c.to_le_bytes());
    }
    let entries_crc = crc32fast::hash(&entries);
    let disk_guid = uuid::Uuid::new_v4();
    let header = |me: u64, other: u64, entries_lba: u64| -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&me.to_le_bytes());
        h[32..40].copy_from_slice(&other.to_le_bytes());
        h[40..48].copy_from_slice(&(2 + GPT_SECTORS - 1).to_le_bytes());
        h[48..56].copy_from_slice(&(last - GPT_SECTORS).to_le_bytes());
        h[56..72].copy_from_slice(&guid_bytes(&disk_guid));
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };
    let mut f = File::options().write(true).open(raw).map_err(io(raw))?;
    let mut put = |lba: u64, data: &[u8]| -> Result<()> {
        f.seek(SeekFrom::Start(lba * SECTOR)).map_err(io(raw))?;
        f.write_all(data).map_err(io(raw))
    };
    put(0, &mbr)?;
    put(1, &header(1, last, 2))?;
    put(2, &entries)?;
    put(last - GPT_SECTORS + 1, &entries)?;
    put(last, &header(last, 1, last - GPT_SECTORS + 1))?;
    f.sync_all().map_err(io(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_root_by_new_uuid_and_containerize_comments_undone() {
        let u = uuid::Uuid::parse_str("11111111-2222-4333-8444-555555555555").expect("uuid");
        let old = format!(
            "# static\n{FSTAB_MARK}UUID=abc / ext4 errors=remount-ro 0 1\n\
             {FSTAB_MARK}UUID=def /boot ext4 defaults 0 2\n\
             {FSTAB_MARK}/dev/sda3 none swap sw 0 0\ntmpfs /tmp tmpfs defaults 0 0\n"
        );
        let (t, notes) = rewrite_fstab(&old, &u);
        assert!(
            t.contains(&format!("UUID={u} / ext4 errors=remount-ro 0 1\n")),
            "{t}"
        );
        assert!(!t.contains(FSTAB_MARK), "{t}");
        assert!(
            t.contains(
                "# fatbox export: not on this one-partition disk (merged into /): UUID=def /boot"
            ),
            "{t}"
        );
        assert!(t.contains("merged into /): /dev/sda3 none swap"), "{t}");
        assert!(t.contains("\ntmpfs /tmp tmpfs defaults 0 0\n"), "{t}");
        assert_eq!(notes.len(), 2);
        let (t, _) = rewrite_fstab("", &u);
        assert_eq!(t, format!("UUID={u} / ext4 errors=remount-ro 0 1\n"));
    }

    #[test]
    fn unshift_maps_the_range_back() {
        let r = Some(IdRange {
            base: 100_000,
            size: 65_536,
        });
        assert_eq!(unshift(100_000, r), 0);
        assert_eq!(unshift(101_000, r), 1000);
        assert_eq!(unshift(0, r), 0);
        assert_eq!(unshift(5, r), 65534);
        assert_eq!(unshift(5, None), 5);
    }

    #[test]
    fn v3_caps_become_v2() {
        let mut v3 = 0x0300_0001u32.to_le_bytes().to_vec();
        v3.extend_from_slice(&[7u8; 16]);
        v3.extend_from_slice(&100_000u32.to_le_bytes());
        let v2 = caps_to_v2(&v3);
        assert_eq!(v2.len(), 20);
        assert_eq!(
            u32::from_le_bytes([v2[0], v2[1], v2[2], v2[3]]),
            0x0200_0001
        );
        assert_eq!(&v2[4..], &[7u8; 16]);
    }

    #[test]
    fn gpt_is_read_back_by_sfdisk() {
        let d = tempfile::tempdir().expect("tmp");
        let raw = d.path().join("d.raw");
        let size = 64 * MIB;
        File::create(&raw)
            .and_then(|f| f.set_len(size))
            .expect("create");
        let p = uuid::Uuid::new_v4();
        write_gpt(&raw, size, 2048, (size - 2 * MIB) / SECTOR, &p).expect("gpt");
        let o = Command::new("sfdisk")
            .args(["--json"])
            .arg(&raw)
            .output()
            .expect("sfdisk");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        let part = &v["partitiontable"]["partitions"][0];
        assert_eq!(v["partitiontable"]["label"], "gpt");
        assert_eq!(part["start"], 2048);
        assert_eq!(part["size"], (size - 2 * MIB) / SECTOR);
        assert_eq!(
            part["type"].as_str().map(str::to_lowercase).as_deref(),
            Some(ROOT_TYPE)
        );
        assert_eq!(
            part["uuid"].as_str().map(str::to_lowercase),
            Some(p.to_string())
        );
        let v = Command::new("sfdisk")
            .arg("--verify")
            .arg(&raw)
            .output()
            .expect("sfdisk --verify");
        assert!(
            v.status.success(),
            "{}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
}
