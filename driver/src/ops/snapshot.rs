//! snapshot: the instance's overlay upper dir becomes one OCI layer on top of its Glance
//! image's layers and goes back to Glance as a new image (image_bridge::snapshot). A running
//! instance is frozen (cgroup freezer) only while its upper dir is archived and always thawed
//! after — same init, same processes; a paused or suspended one is already frozen and stays
//! so; a shut-off one has its disk mounted read-only for the copy. The upload happens after
//! the instance is released.

use super::{lock, Manager};
use crate::cgroups::Cgroups;
use crate::disk::{self, Paths};
use crate::error::{Error, Result};
use crate::model::{Instance, VmState};
use image_bridge::snapshot::{LayerBuild, PublishRequest, UpperOptions};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, Instant};

/// `POST /v1/instances/{id}/snapshot`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SnapshotRequest {
    /// Name of the new Glance image (default `<instance>-snapshot-<unix time>`).
    #[serde(default)]
    pub name: Option<String>,
    /// A queued Glance image to upload into (Nova creates it and passes its id).
    #[serde(default)]
    pub image_id: Option<String>,
    /// Extra Glance properties (string values).
    #[serde(default)]
    pub properties: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotResult {
    pub image_id: String,
    pub parent: String,
    pub layer_digest: String,
    /// Bytes uploaded (the compressed layer).
    pub layer_size: u64,
    /// Uncompressed file data in the layer.
    pub data_bytes: u64,
    pub whiteouts: u64,
    /// Identity files left out.
    pub skipped: Vec<String>,
    /// How long the instance was frozen for the copy (0 when it was not running).
    pub frozen_ms: u64,
    /// Of which: until the kernel reported every task frozen.
    pub freeze_wait_ms: u64,
    pub seconds: f64,
}

/// Files fatboxd (or first boot) writes per instance: a snapshot is a template, and these
/// would give every instance booted from it the same identity. Relative to the guest's /.
pub const IDENTITY_FILES: &[&str] = &[
    "etc/hostname",
    "etc/machine-id",
    "var/lib/dbus/machine-id",
    "etc/ssh/ssh_host_*",
    "config-drive",
    "etc/netplan/90-fatbox.yaml",
    "etc/systemd/network/10-fatbox-*",
    "etc/network/interfaces.d/fatbox",
];

/// Thaws on drop: whatever fails while the instance is frozen, it runs again.
struct Thaw<'a>(&'a Cgroups);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.freeze(false) {
            tracing::error!(error = %e, "thawing after a snapshot failed");
        }
    }
}

/// Freezes and waits until the kernel reports every task frozen.
fn freeze_and_wait(cg: &Cgroups, timeout: Duration) -> Result<()> {
    cg.freeze(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        let frozen = match cg
            .dirs
            .iter()
            .find(|d| cg.v1 && d.starts_with("/sys/fs/cgroup/freezer"))
        {
            Some(f) => std::fs::read_to_string(f.join("freezer.state"))
                .map(|s| s.trim() == "FROZEN")
                .unwrap_or(false),
            None => std::fs::read_to_string(cg.unified.join("cgroup.events"))
                .map(|s| s.lines().any(|l| l.trim() == "frozen 1"))
                .unwrap_or(false),
        };
        if frozen {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout(
                "the instance did not freeze for its snapshot".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Manager {
    fn snapshot_options(&self, inst: &Instance) -> UpperOptions {
        let mut o = UpperOptions {
            shift: inst.idmap.filter(|_| inst.userns).map(|r| (r.base, r.size)),
            exclude: IDENTITY_FILES.iter().map(|s| s.to_string()).collect(),
            exclude_if_equal: Vec::new(),
            level: 3,
            threads: 2,
            // Compressed after the thaw: the instance is frozen for the plain copy only.
            plain: true,
        };
        if !inst.ssh_keys.is_empty() {
            // What write_identity put there; keys the guest added itself stay.
            let mut body = inst.ssh_keys.join("\n");
            body.push('\n');
            o.exclude_if_equal
                .push(("root/.ssh/authorized_keys".into(), body.into_bytes()));
        }
        o
    }

    /// Archives the upper dir into `layout` with the instance held still.
    fn snapshot_layer(
        &self,
        inst: &Instance,
        layout: &guestfs_tools::oci::Layout,
        tmp: &Path,
    ) -> Result<(LayerBuild, u64, u64)> {
        let paths = Paths::new(&self.dir(&inst.uuid));
        let opts = self.snapshot_options(inst);
        let build = |upper: &Path| {
            image_bridge::snapshot::upper_to_layer(upper, layout, &opts).map_err(|e| match e {
                image_bridge::Error::Unsupported(m) => Error::Conflict(m),
                e => Error::Other(format!("snapshot layer: {e}")),
            })
        };
        match inst.state {
            VmState::Running => {
                let cg = self.cgroups(&inst.uuid);
                let t = Instant::now();
                let thaw = Thaw(&cg);
                freeze_and_wait(&cg, Duration::from_secs(10))?;
                let wait = t.elapsed().as_millis() as u64;
                let r = build(&paths.disk_mnt.join("upper"));
                drop(thaw);
                let frozen = t.elapsed().as_millis() as u64;
                Ok((r?, frozen, wait))
            }
            VmState::Paused | VmState::Suspended => {
                Ok((build(&paths.disk_mnt.join("upper"))?, 0, 0))
            }
            VmState::Shutoff => {
                let mnt = tmp.join("disk");
                disk::mount_disk_ro(&paths, &mnt)?;
                let r = build(&mnt.join("upper"));
                let u = disk::unmount_disk(&paths, &mnt);
                let l = r?;
                u?;
                Ok((l, 0, 0))
            }
            s => Err(Error::Conflict(format!(
                "cannot snapshot an instance in state {s:?} (running, paused, suspended or shutoff)"
            ))),
        }
    }

    /// Snapshots the instance into Glance (blocking; minutes for a big change).
    pub fn snapshot(&self, id: &str, req: &SnapshotRequest) -> Result<SnapshotResult> {
        let t0 = Instant::now();
        let inst = self.get(id)?;
        if !crate::glance::configured(&self.cfg) {
            return Err(Error::Conflict(
                "snapshots go to Glance, and no Glance is configured ([glance] endpoint or [keystone])"
                    .into(),
            ));
        }
        if inst.rescue.is_some() {
            return Err(Error::Conflict(
                "cannot snapshot a rescued instance (unrescue it first)".into(),
            ));
        }
        let local = crate::images::lookup(&self.cfg, &inst.image).is_ok();
        if local || !crate::glance::looks_like_id(&inst.image) {
            return Err(Error::Conflict(format!(
                "snapshots need a Glance-backed image: instance {} runs the locally imported image \
                 {:?}; upload that disk to Glance and boot from its id (`fatbox run --image GLANCE_ID`)",
                inst.name, inst.image
            )));
        }
        // The parent's record (pinned by the instance, so normally a warm hit).
        let parent = crate::glance::ensure_image(&self.cfg, &inst.image, None)?;
        if parent.layer_digests() != inst.layers {
            return Err(Error::Conflict(format!(
                "instance {} runs layers that differ from Glance image {}'s: cannot name a parent",
                inst.name, inst.image
            )));
        }
        let tmp = tempfile::Builder::new()
            .prefix(".snapshot-")
            .tempdir_in(self.dir(&inst.uuid))
            .map_err(|e| Error::io(self.dir(&inst.uuid), e))?;
        let layout = guestfs_tools::oci::Layout::create(&tmp.path().join("oci"))?;
        let (mut layer, frozen_ms, freeze_wait_ms) = {
            let l = self.op_lock(&inst.uuid);
            let _g = lock(&l);
            let inst = self.get(&inst.uuid)?;
            self.snapshot_layer(&inst, &layout, tmp.path())?
        };
        let opts = self.snapshot_options(&inst);
        image_bridge::snapshot::compress_layer(&layout, &mut layer, opts.level, opts.threads)
            .map_err(|e| Error::Other(format!("compressing the snapshot layer: {e}")))?;
        tracing::info!(
            uuid = %inst.uuid,
            layer = %layer.digest,
            bytes = layer.size,
            data_bytes = layer.data_bytes,
            whiteouts = layer.whiteouts,
            frozen_ms,
            freeze_wait_ms,
            skipped = ?layer.skipped,
            "snapshot layer written"
        );
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-snapshot-{}", inst.name, crate::model::now_secs()));
        let preq = PublishRequest {
            image_id: req.image_id.clone(),
            name: Some(name),
            parent: inst.image.clone(),
            parent_layers: parent.layer_digests(),
            properties: req.properties.clone().unwrap_or_default(),
        };
        let meta = crate::glance::publish(&self.cfg, &preq, &layer)?;
        let res = SnapshotResult {
            image_id: meta.id,
            parent: inst.image.clone(),
            layer_digest: layer.digest.clone(),
            layer_size: layer.size,
            data_bytes: layer.data_bytes,
            whiteouts: layer.whiteouts,
            skipped: layer.skipped.clone(),
            frozen_ms,
            freeze_wait_ms,
            seconds: t0.elapsed().as_secs_f64(),
        };
        tracing::info!(uuid = %inst.uuid, image = %res.image_id, seconds = res.seconds, "snapshot uploaded");
        Ok(res)
    }
}
