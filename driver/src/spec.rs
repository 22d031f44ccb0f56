//! What the per-instance monitor needs to start init, written by fatboxd into
//! `<instance>/spec.json` before each power-on.

use crate::error::{io, Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuntimeSpec {
    pub uuid: String,
    pub hostname: String,
    pub rootfs: PathBuf,
    pub init: Vec<String>,
    pub env: Vec<String>,
    /// Cgroup directories init joins before it unshares its cgroup namespace.
    pub cgroups: Vec<PathBuf>,
    pub console_log: PathBuf,
    pub console_log_max: u64,
    /// Capabilities removed from the bounding set (numbers, see capabilities(7)).
    pub drop_caps: Vec<u32>,
    /// Files of the fatbox-procfs mount bound over the same paths under /proc.
    pub procfs_binds: Vec<(PathBuf, String)>,
    /// Run init in a user namespace mapped to `idmap`.
    pub userns: bool,
    /// Host directories bound read-write at these paths inside (the instance's own root
    /// filesystem at /mnt/rescue in a rescue boot).
    #[serde(default)]
    pub binds: Vec<(PathBuf, String)>,
    #[serde(default)]
    pub idmap: Option<crate::userns::IdRange>,
    /// Install the default seccomp profile before exec'ing init.
    #[serde(default)]
    pub seccomp: bool,
    #[serde(default)]
    pub allow_perf_event: bool,
    /// Host directories bound read-only at guest paths (relative to the guest root).
    #[serde(default)]
    pub ro_binds: Vec<(PathBuf, String)>,
}

impl RuntimeSpec {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("spec.json")
    }
    pub fn load(dir: &Path) -> Result<RuntimeSpec> {
        let p = Self::path(dir);
        let d = std::fs::read(&p).map_err(io(&p))?;
        serde_json::from_slice(&d).map_err(|e| Error::Other(format!("{}: {e}", p.display())))
    }
    pub fn save(&self, dir: &Path) -> Result<()> {
        let d = serde_json::to_vec_pretty(self).map_err(|e| Error::Other(e.to_string()))?;
        crate::model::write_atomic(&Self::path(dir), &d)
    }
}

/// Written by the monitor each time it starts init.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitRecord {
    pub pid: i32,
    pub start_time: u64,
    pub boot: u32,
    pub monitor_pid: i32,
}

/// Written by the monitor when init is gone for good (not a reboot).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExitRecord {
    pub status: String,
    pub error: Option<String>,
    pub at: u64,
}

pub const INIT_FILE: &str = "init.json";
pub const EXIT_FILE: &str = "exit.json";
pub const REBOOT_FLAG: &str = "reboot-requested";
