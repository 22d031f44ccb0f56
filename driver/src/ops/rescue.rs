//! rescue / unrescue: boot a rescue image (by default the instance's own image, as Nova does)
//! with the instance's root filesystem bound read-write at /mnt/rescue, so an operator can
//! repair a guest that no longer boots; unrescue powers the instance on from its own disk.
//!
//! The rescue system writes to its own small sparse disk (`rescue.img`), removed when the
//! rescue boot ends: nothing of it survives into the instance.

use super::{lock, write_identity, Manager};
use crate::disk::{self, Paths};
use crate::error::{Error, Result};
use crate::images;
use crate::model::{Instance, RescueImage, VmState};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the instance's root filesystem appears inside the rescue system.
pub const RESCUE_MOUNT: &str = "/mnt/rescue";
const RESCUE_DISK_GB: u64 = 1;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RescueRequest {
    /// Image to boot; default the instance's own.
    #[serde(default)]
    pub image: Option<String>,
}

fn paths(dir: &Path) -> Paths {
    Paths {
        image: dir.join("rescue.img"),
        disk_mnt: dir.join("rescue-disk"),
        rootfs: dir.join("rescue-root"),
    }
}

/// Unmounts the rescue system and deletes its disk (no-op for a normal boot).
pub(super) fn release(dir: &Path) -> Result<()> {
    let p = paths(dir);
    if !p.image.exists() && !p.disk_mnt.exists() && !p.rootfs.exists() {
        return Ok(());
    }
    disk::unmount_rootfs(&p)?;
    for d in [&p.rootfs, &p.disk_mnt] {
        match std::fs::remove_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(d.as_path(), e)),
        }
    }
    match std::fs::remove_file(&p.image) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(&p.image, e)),
    }
}

impl Manager {
    /// The root filesystem init runs in, and the binds it gets: the instance's own rootfs for
    /// a normal boot; for a rescue boot, the rescue image's overlay with the instance's
    /// rootfs at /mnt/rescue.
    pub(super) fn rescue_rootfs(
        &self,
        inst: &Instance,
        own: &Paths,
    ) -> Result<(PathBuf, Vec<(PathBuf, String)>)> {
        let Some(r) = &inst.rescue else {
            return Ok((own.rootfs.clone(), Vec::new()));
        };
        let dir = self.dir(&inst.uuid);
        let p = paths(&dir);
        let mut lowers = Vec::new();
        for d in r.layers.iter().rev() {
            lowers.push(images::ensure_layer(&self.cfg, d)?);
        }
        if !p.image.exists() {
            disk::create_disk(&p.image, RESCUE_DISK_GB)?;
        }
        match inst.idmap.filter(|_| inst.userns) {
            Some(r) if !disk::is_mountpoint(&p.rootfs) => {
                crate::userns::mount_rootfs_shifted(&self.cfg, &dir, &p, &lowers, &r)?
            }
            _ => disk::mount_rootfs(&p, &lowers, None)?,
        }
        write_identity(&p.rootfs, inst)?;
        Ok((
            p.rootfs.clone(),
            vec![(own.rootfs.clone(), RESCUE_MOUNT.to_string())],
        ))
    }

    /// Stops the instance (cleanly, up to stop_timeout) and boots the rescue system.
    pub fn rescue(&self, id: &str, req: &RescueRequest) -> Result<Instance> {
        let inst = self.get(id)?;
        let l = self.op_lock(&inst.uuid);
        let _g = lock(&l);
        let inst = self.get(&inst.uuid)?;
        match inst.state {
            VmState::Running | VmState::Shutoff | VmState::Error => {}
            VmState::Rescued => return Ok(inst),
            s => {
                return Err(Error::Conflict(format!(
                    "cannot rescue an instance in state {s:?}"
                )))
            }
        }
        let name = req.image.clone().unwrap_or_else(|| inst.image.clone());
        // Unknown image: refused before the instance is touched.
        let image = images::lookup(&self.cfg, &name)?;
        self.stop_locked(&inst.uuid, Duration::from_secs(self.cfg.stop_timeout))?;
        self.update(&inst.uuid, |i| {
            i.rescue = Some(RescueImage {
                image: name.clone(),
                layers: image.layers.clone(),
            })
        })?;
        self.power_on_or_error(&inst.uuid)
    }

    /// Ends the rescue boot and powers the instance on from its own disk.
    pub fn unrescue(&self, id: &str) -> Result<Instance> {
        let inst = self.get(id)?;
        let l = self.op_lock(&inst.uuid);
        let _g = lock(&l);
        let inst = self.get(&inst.uuid)?;
        if inst.state != VmState::Rescued {
            return Err(Error::Conflict(format!(
                "instance is {:?}, not rescued",
                inst.state
            )));
        }
        // The rescue system holds nothing worth a clean shutdown wait beyond the usual.
        self.stop_locked(&inst.uuid, Duration::from_secs(self.cfg.stop_timeout))?;
        self.power_on_or_error(&inst.uuid)
    }

    /// Powers on; on failure releases what the boot took and records ERROR with the reason.
    pub(super) fn power_on_or_error(&self, uuid: &str) -> Result<Instance> {
        match self.power_on_locked(uuid) {
            Ok(i) => Ok(i),
            Err(e) => {
                tracing::warn!(uuid, error = %e, "power on failed");
                let _ = self.teardown(uuid);
                self.set_state(uuid, VmState::Error, Some(e.to_string()))?;
                Err(e)
            }
        }
    }
}
