//! `/etc/fatbox/fatbox.toml` with `FATBOX_*` environment overrides.

use crate::error::{Error, Result};
pub use crate::network::NetworkConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG: &str = "/etc/fatbox/fatbox.toml";
pub const DEFAULT_SOCKET: &str = "/run/fatbox/fatboxd.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/fatbox";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// Name of the cgroup directory (under each hierarchy) that holds the instances.
    pub cgroup_parent: String,
    /// Seconds a stop waits for systemd to power off before SIGKILL.
    pub stop_timeout: u64,
    /// Seconds a boot may take to reach `running`/`degraded`.
    pub boot_timeout: u64,
    /// Bytes of console output kept in console.log.
    pub console_log_max: u64,
    /// SSH host key sets kept ready for first boots (hostkeys.rs); 0 = guests make their own.
    pub ssh_host_key_pool: usize,
    pub procfs: ProcfsConfig,
    pub network: NetworkConfig,
    pub glance: GlanceConfig,
    /// Keystone v3 for Glance (token + catalog); no auth_url = Glance without auth.
    pub keystone: KeystoneSection,
    pub security: SecurityConfig,
    pub console: ConsoleConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: DEFAULT_STATE_DIR.into(),
            socket: DEFAULT_SOCKET.into(),
            cgroup_parent: "fatbox".into(),
            stop_timeout: 30,
            boot_timeout: 120,
            console_log_max: 1 << 20,
            ssh_host_key_pool: 4,
            procfs: ProcfsConfig::default(),
            network: NetworkConfig::default(),
            glance: GlanceConfig::default(),
            keystone: KeystoneSection::default(),
            security: SecurityConfig::default(),
            console: ConsoleConfig::default(),
        }
    }
}

/// Serial consoles for nova-serialproxy: a TCP port per instance, on demand, relaying raw
/// bytes to the console pty.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ConsoleConfig {
    /// Off: `POST .../serial-console` answers 501 (Nova: ConsoleTypeUnavailable).
    pub serial_enabled: bool,
    /// Address the serial ports listen on (nova.conf `[serial_console] proxyclient_address`).
    pub serial_listen: String,
    /// "FIRST:LAST", inclusive (nova.conf `[serial_console] port_range`).
    pub serial_port_range: String,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            serial_enabled: true,
            serial_listen: "127.0.0.1".into(),
            serial_port_range: "10000:20000".into(),
        }
    }
}

impl ConsoleConfig {
    /// The port range, checked.
    pub fn port_range(&self) -> Result<(u16, u16)> {
        let bad = || {
            Error::Config(format!(
                "console.serial_port_range {:?}: want FIRST:LAST with 1 <= FIRST <= LAST <= 65535",
                self.serial_port_range
            ))
        };
        let (a, b) = self.serial_port_range.split_once(':').ok_or_else(bad)?;
        let a: u16 = a.trim().parse().map_err(|_| bad())?;
        let b: u16 = b.trim().parse().map_err(|_| bad())?;
        if a == 0 || a > b {
            return Err(bad());
        }
        Ok((a, b))
    }

    pub fn listen_ip(&self) -> Result<std::net::IpAddr> {
        self.serial_listen.trim().parse().map_err(|_| {
            Error::Config(format!(
                "console.serial_listen {:?} is not an IP address",
                self.serial_listen
            ))
        })
    }
}

/// fatbox-procfs integration: when enabled and mounted, its files are bound over /proc/*.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcfsConfig {
    pub enabled: bool,
    pub mount: PathBuf,
    pub registry: PathBuf,
}

impl Default for ProcfsConfig {
    fn default() -> Self {
        ProcfsConfig {
            enabled: true,
            mount: "/run/fatbox/procfs".into(),
            registry: "/run/fatbox/procfs.d".into(),
        }
    }
}

/// Isolation of the guests (docs/security.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SecurityConfig {
    /// Default seccomp profile for every guest (see `seccomp.rs`).
    pub seccomp: bool,
    /// Let guests call perf_event_open (profilers); denied by default.
    pub allow_perf_event: bool,
    /// Run guests in a user namespace: guest root is an unprivileged host uid.
    pub userns: bool,
    /// First host uid/gid of the ranges guests are mapped to.
    pub id_base: u32,
    /// Ids per instance (guest ids 0..id_size).
    pub id_size: u32,
    /// Give every instance its own, non-overlapping range (allocated and persisted in
    /// `<state_dir>/idranges.json`, freed on delete) instead of one shared range.
    pub isolated_ranges: bool,
    /// How the shared image layers are shown to a guest with a user namespace: "idmap"
    /// (idmapped mounts, falling back to "copy" if the kernel refuses) or "copy" (a
    /// chowned copy of each layer per id range, made once).
    pub shift: ShiftMode,
    /// Allow instances that ask for `privileged` (no user namespace, no seccomp).
    pub allow_privileged: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ShiftMode {
    Idmap,
    Copy,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            seccomp: true,
            allow_perf_event: false,
            userns: true,
            id_base: 1_000_000,
            id_size: 65536,
            isolated_ranges: false,
            shift: ShiftMode::Idmap,
            allow_privileged: false,
        }
    }
}

/// Images from Glance (image-bridge): `endpoint` directly, or through `[keystone]`'s
/// catalog; converted layers cached under `cache_dir` (default `<state_dir>/glance`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GlanceConfig {
    pub endpoint: Option<String>,
    pub cache_dir: Option<PathBuf>,
    /// Cache cap in GiB (blobs + unpacked layers); unset = no cap. Pinned layers stay.
    pub cache_max_gib: Option<f64>,
}

/// Keystone v3: a password (username/password/project_name) or an application credential
/// (application_credential_id/_secret).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct KeystoneSection {
    pub auth_url: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub project_name: Option<String>,
    pub user_domain_name: Option<String>,
    pub project_domain_name: Option<String>,
    pub application_credential_id: Option<String>,
    pub application_credential_secret: Option<String>,
    pub region: Option<String>,
    pub interface: Option<String>,
}

impl Config {
    /// Loads `path` (missing is fine only for the default path) and applies `FATBOX_*`
    /// overrides (`FATBOX_STATE_DIR`, `FATBOX_SOCKET`, `FATBOX_PROCFS__ENABLED`, ...).
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let (file, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let built = config::Config::builder()
            .add_source(config::File::from(file.clone()).required(required))
            .add_source(
                config::Environment::with_prefix("FATBOX")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .map_err(|e| Error::Config(format!("{}: {e}", file.display())))?;
        let cfg: Config = built
            .try_deserialize()
            .map_err(|e| Error::Config(format!("{}: {e}", file.display())))?;
        // The environment may hold unrelated FATBOX_* variables, so only the file is held to
        // the known keys: a misspelt key there would otherwise be ignored without a word.
        if file.exists() {
            let unknown = unknown_file_keys(&file)?;
            if !unknown.is_empty() {
                return Err(Error::Config(format!(
                    "{}: unknown key(s) {} (docs/configuration.md lists the keys)",
                    file.display(),
                    unknown.join(", ")
                )));
            }
        }
        if cfg.cgroup_parent.is_empty()
            || cfg.cgroup_parent.contains("..")
            || cfg.cgroup_parent.starts_with('/')
        {
            return Err(Error::Config(format!(
                "cgroup_parent {:?} must be a relative path",
                cfg.cgroup_parent
            )));
        }
        if cfg.console.serial_enabled {
            cfg.console.port_range()?;
            cfg.console.listen_ip()?;
        }
        let sec = &cfg.security;
        if sec.id_size == 0 || sec.id_base == 0 || sec.id_base.checked_add(sec.id_size).is_none() {
            return Err(Error::Config(format!(
                "security.id_base {} / id_size {} must be non-zero and fit in 32 bits",
                sec.id_base, sec.id_size
            )));
        }
        Ok(cfg)
    }

    pub fn instances_dir(&self) -> PathBuf {
        self.state_dir.join("instances")
    }
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }
    pub fn layers_dir(&self) -> PathBuf {
        self.state_dir.join("layers")
    }
    pub fn glance_cache_dir(&self) -> PathBuf {
        self.glance
            .cache_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("glance"))
    }
}

/// Keys in the TOML file that `Config` does not have: each file leaf must survive a
/// deserialize/serialize round trip.
fn unknown_file_keys(file: &Path) -> Result<Vec<String>> {
    let cfg_err = |e: &dyn std::fmt::Display| Error::Config(format!("{}: {e}", file.display()));
    let only_file = config::Config::builder()
        .add_source(config::File::from(file.to_path_buf()))
        .build()
        .map_err(|e| cfg_err(&e))?;
    let raw: serde_json::Value = only_file
        .clone()
        .try_deserialize()
        .map_err(|e| cfg_err(&e))?;
    let typed: Config = only_file.try_deserialize().map_err(|e| cfg_err(&e))?;
    let back = serde_json::to_value(&typed).map_err(|e| cfg_err(&e))?;
    let mut unknown = Vec::new();
    fn walk(
        raw: &serde_json::Value,
        back: Option<&serde_json::Value>,
        at: &str,
        out: &mut Vec<String>,
    ) {
        match raw {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let p = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    walk(v, back.and_then(|b| b.get(k)), &p, out);
                }
            }
            _ => {
                if back.is_none() {
                    out.push(p_or_root(at));
                }
            }
        }
    }
    fn p_or_root(at: &str) -> String {
        if at.is_empty() {
            "(root)".into()
        } else {
            format!("`{at}`")
        }
    }
    walk(&raw, Some(&back), "", &mut unknown);
    Ok(unknown)
}
