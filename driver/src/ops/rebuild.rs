//! rebuild: the same instance (uuid, name, flavor, keys, machine-id) on a new image, with
//! Nova's disk policy: the root disk is recreated, whatever was written to it is gone.

use super::{lock, Manager};
use crate::disk::Paths;
use crate::error::{Error, Result};
use crate::images;
use crate::model::{Instance, VmState};
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RebuildRequest {
    /// New image; default the current one (a reinstall).
    #[serde(default)]
    pub image: Option<String>,
}

impl Manager {
    pub fn rebuild(&self, id: &str, req: &RebuildRequest) -> Result<Instance> {
        let inst = self.get(id)?;
        let l = self.op_lock(&inst.uuid);
        let _g = lock(&l);
        let inst = self.get(&inst.uuid)?;
        match inst.state {
            VmState::Running | VmState::Shutoff | VmState::Error => {}
            s => {
                return Err(Error::Conflict(format!(
                    "cannot rebuild an instance in state {s:?}"
                )))
            }
        }
        let name = req.image.clone().unwrap_or_else(|| inst.image.clone());
        // Unknown image: refused while the instance is still untouched.
        let image = images::lookup(&self.cfg, &name)?;
        self.stop_locked(&inst.uuid, Duration::from_secs(self.cfg.stop_timeout))?;
        let paths = Paths::new(&self.dir(&inst.uuid));
        match std::fs::remove_file(&paths.image) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&paths.image, e)),
        }
        self.update(&inst.uuid, |i| {
            i.state = VmState::Building;
            i.reason = None;
            i.image = name.clone();
            i.layers = image.layers.clone();
        })?;
        tracing::info!(uuid = inst.uuid, image = name, "rebuilding");
        self.power_on_or_error(&inst.uuid)
    }
}
