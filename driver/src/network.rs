//! Seam for the network issue: called in the new network namespace before init starts.
//! Today it only brings up nothing (systemd configures lo itself); veth/OVS plumbing for
//! `nics` comes with issue 5.

use crate::error::Result;
use crate::spec::RuntimeSpec;

pub fn before_init(_spec: &RuntimeSpec) -> Result<()> {
    Ok(())
}
