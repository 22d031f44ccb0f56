//! suspend / resume: every process of the instance frozen (cgroup freezer) and the state
//! `suspended`, as Nova expects; resume thaws a suspended or a paused instance. Memory stays
//! allocated: a CRIU checkpoint to disk would be the next step.

use super::{lock, Manager};
use crate::error::{Error, Result};
use crate::model::{Instance, VmState};

impl Manager {
    pub fn suspend(&self, id: &str) -> Result<Instance> {
        let inst = self.get(id)?;
        let l = self.op_lock(&inst.uuid);
        let _g = lock(&l);
        let inst = self.get(&inst.uuid)?;
        match inst.state {
            VmState::Suspended => return Ok(inst),
            VmState::Running | VmState::Paused => {}
            s => {
                return Err(Error::Conflict(format!(
                    "cannot suspend an instance in state {s:?}"
                )))
            }
        }
        self.cgroups(&inst.uuid).freeze(true)?;
        self.set_state(&inst.uuid, VmState::Suspended, None)
    }

    /// Thaws a suspended or paused instance (`fatbox resume` serves both).
    pub fn resume(&self, id: &str) -> Result<Instance> {
        let inst = self.get(id)?;
        let l = self.op_lock(&inst.uuid);
        let _g = lock(&l);
        let inst = self.get(&inst.uuid)?;
        match inst.state {
            VmState::Running => return Ok(inst),
            VmState::Suspended | VmState::Paused => {}
            s => {
                return Err(Error::Conflict(format!(
                    "cannot resume an instance in state {s:?}"
                )))
            }
        }
        self.cgroups(&inst.uuid).freeze(false)?;
        self.set_state(&inst.uuid, VmState::Running, None)
    }
}
