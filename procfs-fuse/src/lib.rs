//! fatbox-procfs: per-container /proc files over FUSE, lxcfs-compatible.
//!
//! fatboxd registers containers with [`registry::register`] and bind-mounts each entry of
//! [`FILES`] from the mount (default [`daemon::DEFAULT_MOUNT`]) over the container's target
//! path. See docs/procfs.md.

pub mod cgroup;
pub mod daemon;
pub mod error;
pub mod fs;
pub mod loadavg;
pub mod registry;
pub mod render;

pub use error::{Error, Result};

/// What to bind where: (path under the mount, target path inside the container).
pub const FILES: &[(&str, &str)] = &[
    ("proc/meminfo", "/proc/meminfo"),
    ("proc/cpuinfo", "/proc/cpuinfo"),
    ("proc/stat", "/proc/stat"),
    ("proc/uptime", "/proc/uptime"),
    ("proc/loadavg", "/proc/loadavg"),
    ("proc/diskstats", "/proc/diskstats"),
    ("proc/swaps", "/proc/swaps"),
    (
        "sys/devices/system/cpu/online",
        "/sys/devices/system/cpu/online",
    ),
];

/// Render what a process in `cgroup` (relative to the cgroup roots as in /proc/PID/cgroup)
/// would read from `file` (short name, path under the mount, or host path); None renders
/// the host's view. Uptime is taken from the oldest process in the cgroup; loadavg is the
/// host's (sampling only runs in the daemon).
pub fn render(file: &str, cgroup: Option<&str>) -> Result<Vec<u8>> {
    let kind = render::FileKind::parse(file)?;
    let h = cgroup::Hierarchy::detect();
    let ctx = match cgroup {
        Some(cg) => Some(render::Ctx {
            cgroup: cgroup::normalize(cg)?,
            started_boot_secs: None,
            loadavg: None,
        }),
        None => None,
    };
    render::render(&h, kind, ctx.as_ref())
}
