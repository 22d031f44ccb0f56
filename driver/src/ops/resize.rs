//! resize: change vcpus and memory of a live instance through its cgroups (no restart), and
//! grow its disk (ext4 grows online while mounted; a powered-off disk is checked and grown
//! offline). Shrinking the disk is refused, as Nova does.

use super::{lock, Manager};
use crate::disk::{self, Paths};
use crate::error::{Error, Result};
use crate::model::{Flavor, Instance, VmState};
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResizeRequest {
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mb: Option<u64>,
    #[serde(default)]
    pub root_gb: Option<u64>,
    #[serde(default)]
    pub swap_mb: Option<u64>,
}

impl ResizeRequest {
    /// The flavor after the resize (unset fields keep their value).
    pub fn apply_to(&self, f: &Flavor) -> Flavor {
        Flavor {
            vcpus: self.vcpus.unwrap_or(f.vcpus),
            memory_mb: self.memory_mb.unwrap_or(f.memory_mb),
            root_gb: self.root_gb.unwrap_or(f.root_gb),
            swap_mb: self.swap_mb.unwrap_or(f.swap_mb),
        }
    }
}

impl Manager {
    pub fn resize(&self, id: &str, req: &ResizeRequest) -> Result<Instance> {
        let inst = self.get(id)?;
        let l = self.op_lock(&inst.uuid);
        let _g = lock(&l);
        let inst = self.get(&inst.uuid)?;
        let old = inst.flavor.clone();
        let new = req.apply_to(&old);
        new.validate()?;
        if new.root_gb < old.root_gb {
            return Err(Error::Invalid(format!(
                "root_gb {} < {}: disks only grow",
                new.root_gb, old.root_gb
            )));
        }
        let live = match inst.state {
            VmState::Running | VmState::Paused | VmState::Suspended => true,
            VmState::Shutoff | VmState::Error => false,
            s => {
                return Err(Error::Conflict(format!(
                    "cannot resize an instance in state {s:?}"
                )))
            }
        };
        let cg = self.cgroups(&inst.uuid);
        if live && cg.exists() {
            if let Err(e) = cg.apply(&new) {
                // Half-applied limits would match neither flavor.
                let _ = cg.apply(&old);
                return Err(match e {
                    Error::Io { err, .. } if err.raw_os_error() == Some(libc::EBUSY) => {
                        Error::Conflict(format!(
                            "memory_mb {}: the instance uses more than that",
                            new.memory_mb
                        ))
                    }
                    e => e,
                });
            }
        }
        let mut note = None;
        if new.root_gb > old.root_gb {
            let paths = Paths::new(&self.dir(&inst.uuid));
            if paths.image.exists() {
                match disk::grow(&paths, new.root_gb) {
                    Ok(disk::Grown::Now) => {}
                    Ok(disk::Grown::AtNextBoot) => {
                        note = Some(format!(
                            "the filesystem grows to {} GiB at the next boot (online ext4 resize \
                             needs CAP_SYS_RESOURCE, which fatboxd does not have)",
                            new.root_gb
                        ));
                    }
                    Err(e) => {
                        if live {
                            let _ = cg.apply(&old);
                        }
                        return Err(e);
                    }
                }
            }
        }
        tracing::info!(uuid = inst.uuid, ?old, ?new, live, ?note, "resized");
        self.update(&inst.uuid, |i| {
            i.flavor = new;
            if note.is_some() {
                i.reason = note;
            }
        })
    }
}
