//! fatbox-procfs integration: register the instance in `/run/fatbox/procfs.d/<id>.json` and
//! bind the FUSE mount's files over /proc/* inside (only when the mount is there).

use crate::config::ProcfsConfig;
use crate::error::{io, Result};
use std::path::{Path, PathBuf};

/// Files of the procfs mount, relative to it, and where they go under the container's root.
const FILES: [(&str, &str); 8] = [
    ("proc/meminfo", "proc/meminfo"),
    ("proc/cpuinfo", "proc/cpuinfo"),
    ("proc/stat", "proc/stat"),
    ("proc/uptime", "proc/uptime"),
    ("proc/loadavg", "proc/loadavg"),
    ("proc/diskstats", "proc/diskstats"),
    ("proc/swaps", "proc/swaps"),
    (
        "sys/devices/system/cpu/online",
        "sys/devices/system/cpu/online",
    ),
];

pub fn mounted(cfg: &ProcfsConfig) -> bool {
    cfg.enabled && crate::disk::is_mountpoint(&cfg.mount)
}

/// The binds for the runtime spec (empty when procfs is off or not mounted).
pub fn binds(cfg: &ProcfsConfig) -> Vec<(PathBuf, String)> {
    if !mounted(cfg) {
        return Vec::new();
    }
    FILES
        .iter()
        .map(|(src, dst)| (cfg.mount.join(src), (*dst).to_string()))
        .collect()
}

pub fn register(
    cfg: &ProcfsConfig,
    uuid: &str,
    cgroup: &str,
    init_pid: i32,
    started_at: u64,
) -> Result<()> {
    if !cfg.enabled {
        return Ok(());
    }
    std::fs::create_dir_all(&cfg.registry).map_err(io(&cfg.registry))?;
    let v = serde_json::json!({
        "id": uuid, "cgroup": cgroup, "init_pid": init_pid, "started_at": started_at,
    });
    crate::model::write_atomic(&entry(&cfg.registry, uuid), v.to_string().as_bytes())
}

pub fn unregister(cfg: &ProcfsConfig, uuid: &str) {
    let _ = std::fs::remove_file(entry(&cfg.registry, uuid));
}

fn entry(dir: &Path, uuid: &str) -> PathBuf {
    dir.join(format!("{uuid}.json"))
}
