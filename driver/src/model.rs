//! The instance model, its state machine and its atomically written state.json.

use crate::error::{io, Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Upper bounds that catch typos and hostile requests before they reach the kernel.
pub const MAX_VCPUS: u32 = 1024;
pub const MAX_MEMORY_MB: u64 = 16 << 20;
pub const MAX_ROOT_GB: u64 = 64 << 10;
pub const MIN_MEMORY_MB: u64 = 32;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Flavor {
    pub vcpus: u32,
    pub memory_mb: u64,
    pub root_gb: u64,
    #[serde(default)]
    pub swap_mb: u64,
}

impl Flavor {
    pub fn validate(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::Invalid(format!(
                "vcpus must be 1..={MAX_VCPUS}, got {}",
                self.vcpus
            )));
        }
        if self.memory_mb < MIN_MEMORY_MB || self.memory_mb > MAX_MEMORY_MB {
            return Err(Error::Invalid(format!(
                "memory_mb must be {MIN_MEMORY_MB}..={MAX_MEMORY_MB}, got {}",
                self.memory_mb
            )));
        }
        if self.root_gb == 0 || self.root_gb > MAX_ROOT_GB {
            return Err(Error::Invalid(format!(
                "root_gb must be 1..={MAX_ROOT_GB}, got {}",
                self.root_gb
            )));
        }
        if self.swap_mb > MAX_MEMORY_MB {
            return Err(Error::Invalid(format!(
                "swap_mb {} is absurd",
                self.swap_mb
            )));
        }
        Ok(())
    }

    pub fn memory_bytes(&self) -> Result<u64> {
        self.memory_mb
            .checked_mul(1 << 20)
            .ok_or_else(|| Error::Invalid("memory overflows".into()))
    }
}

/// Nova's vm_state values we use.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Building,
    Running,
    Paused,
    Suspended,
    Shutoff,
    Rescued,
    Error,
    Deleting,
}

impl VmState {
    /// nova.compute.power_state for this state.
    pub fn power_state(self) -> PowerState {
        match self {
            VmState::Running => PowerState::Running,
            VmState::Paused => PowerState::Paused,
            VmState::Suspended => PowerState::Suspended,
            VmState::Shutoff => PowerState::Shutdown,
            VmState::Error => PowerState::Crashed,
            // Nova reports a rescued guest as running: the rescue system is.
            VmState::Rescued => PowerState::Running,
            VmState::Building | VmState::Deleting => PowerState::NoState,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PowerState {
    NoState = 0,
    Running = 1,
    Paused = 3,
    Shutdown = 4,
    Crashed = 6,
    Suspended = 7,
}

impl PowerState {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// The process that runs a booted instance, with the start time that makes a pid unique.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcId {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat (clock ticks since host boot).
    pub start_time: u64,
}

impl ProcId {
    pub fn of(pid: i32) -> Option<ProcId> {
        proc_start_time(pid).map(|start_time| ProcId { pid, start_time })
    }
    /// True while this very process (not a recycled pid) exists and is not a zombie.
    pub fn alive(&self) -> bool {
        proc_start_time(self.pid) == Some(self.start_time)
    }
}

/// Start time of a live (non-zombie) process.
pub fn proc_start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses: fields start after the last ')'.
    let rest = stat.get(stat.rfind(')')?.checked_add(2)?..)?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // rest starts at field 3; start time is field 22.
    fields.nth(18)?.parse().ok()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    pub uuid: String,
    pub name: String,
    pub image: String,
    /// Digests of the image's layers, bottom first.
    pub layers: Vec<String>,
    pub flavor: Flavor,
    pub state: VmState,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    #[serde(default)]
    pub nics: Vec<crate::network::InstanceNic>,
    /// Guest root is mapped to the host id range `idmap` (a user namespace).
    #[serde(default)]
    pub userns: bool,
    /// True when the instance has a metadata drive (configdrive.rs) bound at /config-drive.
    #[serde(default)]
    pub config_drive: bool,
    #[serde(default)]
    pub idmap: Option<crate::userns::IdRange>,
    /// The default seccomp profile is applied to the guest.
    #[serde(default = "yes")]
    pub seccomp: bool,
    /// Asked for privileged mode (no user namespace, no seccomp).
    #[serde(default)]
    pub privileged: bool,
    #[serde(default)]
    pub monitor: Option<ProcId>,
    #[serde(default)]
    pub init: Option<ProcId>,
    pub created_at: u64,
    #[serde(default)]
    pub booted_at: Option<u64>,
    /// Set while the instance runs its rescue system (its own disk at /mnt/rescue).
    #[serde(default)]
    pub rescue: Option<RescueImage>,
    /// TCP port of its serial console (nova-serialproxy), allocated on first request and
    /// kept until the instance is deleted.
    #[serde(default)]
    pub serial_port: Option<u16>,
    /// The guest's hostname when it differs from `name` (Nova: instance.hostname, while the
    /// name is instance-%08x).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// The image a rescued instance boots.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RescueImage {
    pub image: String,
    /// Digests of its layers, bottom first.
    pub layers: Vec<String>,
}

fn yes() -> bool {
    true
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Names become hostnames and directory-free identifiers: RFC 1123 labels only.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "name {name:?}: use 1-63 letters, digits and inner '-' (it becomes the hostname)"
        )))
    }
}

/// A guest hostname: RFC 1123 labels joined by dots, within the kernel's 64-byte limit
/// (sethostname refuses more, so a longer FQDN could never be set).
pub fn validate_hostname(h: &str) -> Result<()> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if h.len() <= 64 && h.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "hostname {h:?}: RFC 1123 labels (letters, digits, inner '-') joined by '.', \
             at most 64 characters"
        )))
    }
}

impl Instance {
    /// What the guest is told its hostname is.
    pub fn guest_hostname(&self) -> &str {
        self.hostname.as_deref().unwrap_or(&self.name)
    }

    pub fn power_state(&self) -> PowerState {
        self.state.power_state()
    }

    pub fn state_file(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }

    pub fn load(dir: &Path) -> Result<Instance> {
        let p = Self::state_file(dir);
        let data = std::fs::read(&p).map_err(io(&p))?;
        serde_json::from_slice(&data).map_err(|e| Error::Other(format!("{}: {e}", p.display())))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let data = serde_json::to_vec_pretty(self).map_err(|e| Error::Other(e.to_string()))?;
        write_atomic(&Self::state_file(dir), &data)
    }

    /// The JSON the API and `fatbox show --json` return.
    pub fn view(&self) -> serde_json::Value {
        serde_json::json!({
            "uuid": self.uuid,
            "name": self.name,
            "hostname": self.guest_hostname(),
            "image": self.image,
            "state": self.state,
            "reason": self.reason,
            "power_state": self.power_state().code(),
            "flavor": self.flavor,
            "nics": self.nics.iter().map(|n| n.view()).collect::<Vec<_>>(),
            "config_drive": self.config_drive,
            "security": {
                "userns": self.userns,
                "idmap": self.idmap,
                "seccomp": self.seccomp,
                "privileged": self.privileged,
            },
            "init_pid": self.init.as_ref().filter(|p| p.alive()).map(|p| p.pid),
            "monitor_pid": self.monitor.as_ref().filter(|p| p.alive()).map(|p| p.pid),
            "created_at": self.created_at,
            "booted_at": self.booted_at,
            "rescue_image": self.rescue.as_ref().map(|r| &r.image),
            "serial_port": self.serial_port,
        })
    }
}

/// Write to a temp file in the same directory, fsync it, rename over, fsync the directory:
/// a crash leaves either the old or the new content.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Other(format!("{} has no parent", path.display())))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io(dir))?;
    tmp.write_all(data).map_err(io(path))?;
    tmp.as_file().sync_all().map_err(io(path))?;
    tmp.persist(path)
        .map_err(|e| Error::io(path.to_path_buf(), e.error))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod hostname_tests {
    use super::validate_hostname;

    #[test]
    fn hostnames_follow_rfc1123_and_the_kernel_limit() {
        for ok in ["vm-one", "a", "web01.example.org", "x1-2.y"] {
            assert!(validate_hostname(ok).is_ok(), "{ok:?}");
        }
        let long = format!("{}.example.org", "a".repeat(60));
        for bad in [
            "",
            "-a",
            "a-",
            "a..b",
            "a_b",
            "a b",
            ".a",
            "a.",
            &long,
            &"a".repeat(64),
        ] {
            assert!(validate_hostname(bad).is_err(), "{bad:?}");
        }
    }
}
