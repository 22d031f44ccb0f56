//! The instance manager: every lifecycle operation, each a blocking function (the API runs
//! them on tokio's blocking pool so a slow boot never blocks another instance's call).

use crate::cgroups::Cgroups;
use crate::config::Config;
use crate::disk::{self, Paths};
use crate::error::{io, Error, Result};
use crate::images;
use crate::model::{now_secs, validate_hostname, validate_name, Flavor, Instance, ProcId, VmState};
use crate::spec::{ExitRecord, InitRecord, RuntimeSpec, EXIT_FILE, INIT_FILE, REBOOT_FLAG};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod exec;
mod export;
mod password;
mod rebuild;
mod rescue;
mod resize;
mod snapshot;
mod suspend;

pub use export::{ExportReport, ExportRequest};
pub use rebuild::RebuildRequest;
pub use rescue::RescueRequest;
pub use resize::ResizeRequest;
pub use snapshot::{SnapshotRequest, SnapshotResult, IDENTITY_FILES};

pub use crate::seccomp::DROP_CAPS;
const POLL: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Deserialize)]
pub struct CreateRequest {
    pub name: String,
    pub image: String,
    pub flavor: Flavor,
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    #[serde(default)]
    pub nics: Vec<serde_json::Value>,
    /// None: `[security] userns`. Turning it off needs `allow_privileged`.
    #[serde(default)]
    pub userns: Option<bool>,
    /// None: `[security] seccomp`. Turning it off needs `allow_privileged`.
    #[serde(default)]
    pub seccomp: Option<bool>,
    /// Trusted workload: no user namespace, no seccomp (needs `allow_privileged`).
    #[serde(default)]
    pub privileged: bool,
    /// The guest's hostname (default: `name`); Nova passes instance.hostname here.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Metadata drive files: relative path -> base64 content (configdrive.rs).
    #[serde(default)]
    pub config_drive: Option<std::collections::BTreeMap<String, String>>,
}

pub struct Manager {
    pub cfg: Config,
    instances: Mutex<HashMap<String, Instance>>,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    ranges: crate::userns::Ranges,
    pub(crate) net: crate::vifs::NetState,
    pub(crate) serial: crate::console::SerialPorts,
    pub keys: Arc<crate::hostkeys::KeyPool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Manager {
    pub fn new(cfg: Config) -> Result<Arc<Manager>> {
        for d in [cfg.instances_dir(), cfg.layers_dir(), cfg.images_dir()] {
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        let sec = &cfg.security;
        let ranges = crate::userns::Ranges::new(&cfg.state_dir, sec.id_base, sec.id_size);
        let keys = Arc::new(crate::hostkeys::KeyPool::new(
            &cfg.state_dir,
            cfg.ssh_host_key_pool,
        ));
        Ok(Arc::new(Manager {
            keys,
            ranges,
            cfg,
            instances: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            net: Default::default(),
            serial: Default::default(),
        }))
    }

    pub fn dir(&self, uuid: &str) -> PathBuf {
        self.cfg.instances_dir().join(uuid)
    }

    pub(crate) fn op_lock(&self, uuid: &str) -> Arc<Mutex<()>> {
        lock(&self.locks)
            .entry(uuid.to_string())
            .or_default()
            .clone()
    }

    pub fn cgroups(&self, uuid: &str) -> Cgroups {
        Cgroups::for_instance(&self.cfg.cgroup_parent, uuid)
    }

    /// Finds an instance by uuid or name.
    pub fn get(&self, id: &str) -> Result<Instance> {
        let g = lock(&self.instances);
        if let Some(i) = g.get(id) {
            return Ok(i.clone());
        }
        g.values()
            .find(|i| i.name == id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("instance {id:?}")))
    }

    pub fn list(&self) -> Vec<Instance> {
        let mut v: Vec<Instance> = lock(&self.instances).values().cloned().collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.name.cmp(&b.name)));
        v
    }

    pub(crate) fn update(&self, uuid: &str, f: impl FnOnce(&mut Instance)) -> Result<Instance> {
        let mut g = lock(&self.instances);
        let inst = g
            .get_mut(uuid)
            .ok_or_else(|| Error::NotFound(format!("instance {uuid}")))?;
        f(inst);
        inst.save(&self.cfg.instances_dir().join(uuid))?;
        Ok(inst.clone())
    }

    fn set_state(&self, uuid: &str, state: VmState, reason: Option<String>) -> Result<Instance> {
        self.update(uuid, |i| {
            i.state = state;
            i.reason = reason;
        })
    }

    /// Validates and records a new instance (state building); `power_on` boots it.
    pub fn create(&self, req: CreateRequest) -> Result<Instance> {
        validate_name(&req.name)?;
        if let Some(h) = &req.hostname {
            validate_hostname(h)?;
        }
        req.flavor.validate()?;
        let sec = &self.cfg.security;
        let opts_out = req.privileged
            || (req.userns == Some(false) && sec.userns)
            || (req.seccomp == Some(false) && sec.seccomp);
        if opts_out && !sec.allow_privileged {
            return Err(Error::Invalid(
                "privileged mode (no user namespace or no seccomp) is disabled on this host: \
                 [security] allow_privileged = true enables it"
                    .into(),
            ));
        }
        let userns = !req.privileged && req.userns.unwrap_or(sec.userns);
        let seccomp = !req.privileged && req.seccomp.unwrap_or(sec.seccomp);
        let nics = crate::vifs::parse_nics(&req.nics)?;
        let uuid = match &req.uuid {
            Some(u) => uuid::Uuid::parse_str(u)
                .map_err(|e| Error::Invalid(format!("uuid {u:?}: {e}")))?
                .hyphenated()
                .to_string(),
            None => uuid::Uuid::new_v4().hyphenated().to_string(),
        };
        // A Glance image id not imported locally is fetched by the build (it may take
        // minutes), so the layers are filled in then.
        let layers = match images::lookup(&self.cfg, &req.image) {
            Ok(i) => i.layers,
            Err(Error::NotFound(_))
                if crate::glance::configured(&self.cfg)
                    && crate::glance::looks_like_id(&req.image) =>
            {
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        self.precheck_nics(&uuid, &nics)?;
        let drive = req
            .config_drive
            .as_ref()
            .map(crate::configdrive::decode)
            .transpose()?;
        for k in &req.ssh_keys {
            if k.contains('\n') || k.len() > 16384 {
                return Err(Error::Invalid(
                    "ssh key: one line each, at most 16 KiB".into(),
                ));
            }
        }
        let inst = Instance {
            uuid: uuid.clone(),
            name: req.name.clone(),
            image: req.image.clone(),
            layers,
            flavor: req.flavor.clone(),
            state: VmState::Building,
            reason: None,
            ssh_keys: req.ssh_keys.clone(),
            nics,
            userns,
            idmap: None,
            seccomp,
            privileged: req.privileged,
            config_drive: drive.is_some(),
            monitor: None,
            init: None,
            created_at: now_secs(),
            booted_at: None,
            rescue: None,
            serial_port: None,
            hostname: req.hostname.clone().filter(|h| *h != req.name),
        };
        let mut g = lock(&self.instances);
        if g.contains_key(&uuid) {
            return Err(Error::Conflict(format!("uuid {uuid} exists")));
        }
        if g.values().any(|i| i.name == req.name) {
            return Err(Error::Conflict(format!("name {:?} is taken", req.name)));
        }
        let mut inst = inst;
        if userns {
            inst.idmap = Some(if sec.isolated_ranges {
                self.ranges.allocate(&uuid)?
            } else {
                crate::userns::IdRange {
                    base: sec.id_base,
                    size: sec.id_size,
                }
            });
        }
        if !userns || !seccomp {
            tracing::warn!(
                uuid,
                name = req.name,
                userns,
                seccomp,
                "PRIVILEGED instance: guest root is host root (no user namespace) or the \
                 seccomp profile is off; only for trusted workloads"
            );
        }
        let dir = self.dir(&uuid);
        std::fs::create_dir(&dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::Conflict(format!("uuid {uuid} exists")),
            _ => Error::io(&dir, e),
        })?;
        if let Some(files) = &drive {
            if let Err(e) = crate::configdrive::write(&dir, files) {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        }
        inst.save(&dir)?;
        g.insert(uuid, inst.clone());
        Ok(inst)
    }

    /// First boot of a created instance; on failure the instance goes to ERROR with the reason.
    pub fn build(&self, uuid: &str) -> Result<Instance> {
        let l = self.op_lock(uuid);
        let _g = lock(&l);
        match self.power_on_locked(uuid) {
            Ok(i) => Ok(i),
            Err(e) => {
                tracing::warn!(uuid, error = %e, "build failed");
                let _ = self.teardown(uuid);
                self.set_state(uuid, VmState::Error, Some(e.to_string()))?;
                Err(e)
            }
        }
    }

    pub fn start(&self, id: &str) -> Result<Instance> {
        let inst = self.get(id)?;
        let l = self.op_lock(&inst.uuid);
        let _g = lock(&l);
        let inst = self.get(&inst.uuid)?;
        match inst.state {
            VmState::Running => return Ok(inst),
            VmState::Shutoff | VmState::Error => {}
            s => {
                return Err(Error::Conflict(format!(
                    "cannot start an instance in state {s:?}"
                )))
            }
        }
        match self.power_on_locked(&inst.uuid) {
            Ok(i) => Ok(i),
            Err(e) => {
                let _ = self.teardown(&inst.uuid);
                self.set_state(&inst.uuid, VmState::Error, Some(e.to_string()))?;
                Err(e)
            }
        }
    }

    fn power_on_locked(&self, uuid: &str) -> Result<Instance> {
        let t0 = Instant::now();
        let inst = self.get(uuid)?;
        let dir = self.dir(uuid);
        let paths = Paths::new(&dir);
        let mut inst = inst;
        if crate::glance::looks_like_id(&inst.image) && crate::glance::configured(&self.cfg) {
            // Every start: a warm hit costs a stat or two, and it re-fetches and re-pins
            // after the cache was wiped.
            if images::lookup(&self.cfg, &inst.image).is_err() {
                let img = crate::glance::ensure_pinned(&self.cfg, &inst.image, uuid)?;
                inst = self.update(uuid, |i| i.layers = img.layer_digests())?;
            }
        }
        let mut lowers = Vec::new();
        for d in inst.layers.iter().rev() {
            match crate::glance::cached_layer_dir(&self.cfg, d) {
                Some(dir) => lowers.push(dir),
                None => lowers.push(images::ensure_layer(&self.cfg, d)?),
            }
        }
        if !paths.image.exists() {
            disk::create_disk(&paths.image, inst.flavor.root_gb)?;
        }
        let t_disk = t0.elapsed();
        let idmap = if inst.userns {
            Some(
                inst.idmap
                    .ok_or_else(|| Error::Other("instance has userns but no id range".into()))?,
            )
        } else {
            None
        };
        if idmap.is_some() {
            // The guest's root resolves `rootfs` from this dir (monitor.rs): it needs search
            // permission here, nothing more (files keep their own modes).
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&dir)
                .map_err(io(&dir))?
                .permissions()
                .mode();
            if mode & 0o001 == 0 {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode | 0o001))
                    .map_err(io(&dir))?;
            }
        }
        match idmap {
            Some(r) if !disk::is_mountpoint(&paths.rootfs) => {
                crate::userns::mount_rootfs_shifted(&self.cfg, &dir, &paths, &lowers, &r)?
            }
            _ => disk::mount_rootfs(&paths, &lowers, None)?,
        }
        write_identity(&paths.rootfs, &inst)?;
        let key_owner = inst.idmap.filter(|_| inst.userns).map(|r| r.base);
        let t_keys = Instant::now();
        if crate::hostkeys::install(&self.keys, &paths.rootfs, key_owner)? {
            tracing::debug!(instance = %uuid, ms = t_keys.elapsed().as_millis() as u64, "ssh host keys from the pool");
        }
        // A rescue boot runs the rescue image with this rootfs bound at /mnt/rescue.
        let (rootfs, binds) = self.rescue_rootfs(&inst, &paths)?;
        // The NICs' guest config goes where init runs (the rescue system too).
        self.plug_vifs(&inst, &rootfs)?;
        let cg = self.cgroups(uuid);
        cg.create(&inst.flavor)?;
        if let Some(r) = &idmap {
            crate::userns::delegate_cgroup(&cg.unified, r)?;
        }
        let mut spec = RuntimeSpec {
            uuid: uuid.to_string(),
            hostname: inst.guest_hostname().to_string(),
            rootfs,
            init: vec!["/sbin/init".into()],
            env: vec![
                "container=fatbox".into(),
                format!("container_uuid={uuid}"),
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                "TERM=vt220".into(),
            ],
            cgroups: cg.dirs.clone(),
            console_log: dir.join("console.log"),
            console_log_max: self.cfg.console_log_max,
            drop_caps: DROP_CAPS.to_vec(),
            procfs_binds: crate::procfs::binds(&self.cfg.procfs),
            userns: inst.userns,
            binds,
            idmap,
            seccomp: inst.seccomp,
            allow_perf_event: self.cfg.security.allow_perf_event,
            ro_binds: Vec::new(),
        };
        if inst.config_drive {
            spec.env.push(crate::configdrive::PRODUCT_ENV.into());
            spec.ro_binds.push((
                dir.join(crate::configdrive::DIR),
                crate::configdrive::GUEST_PATH.into(),
            ));
        }
        spec.save(&dir)?;
        for f in [INIT_FILE, EXIT_FILE, REBOOT_FLAG] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let t_prep = t0.elapsed();
        let monitor = spawn_monitor(&dir)?;
        self.update(uuid, |i| i.monitor = Some(monitor.clone()))?;
        let deadline = Instant::now() + Duration::from_secs(self.cfg.boot_timeout);
        let rec = wait_init_record(&dir, &monitor, 0, deadline)?;
        let init = ProcId {
            pid: rec.pid,
            start_time: rec.start_time,
        };
        self.update(uuid, |i| i.init = Some(init.clone()))?;
        let cgroup_rel = format!("/{}/{}", self.cfg.cgroup_parent, uuid);
        crate::procfs::register(&self.cfg.procfs, uuid, &cgroup_rel, init.pid, now_secs())?;
        let t_init = t0.elapsed();
        wait_running(&dir, &init, deadline)?;
        tracing::info!(
            uuid,
            mkfs_ms = t_disk.as_millis() as u64,
            prepared_ms = t_prep.as_millis() as u64,
            init_started_ms = t_init.as_millis() as u64,
            running_ms = t0.elapsed().as_millis() as u64,
            "boot phases"
        );
        self.update(uuid, |i| {
            i.state = if i.rescue.is_some() {
                VmState::Rescued
            } else {
                VmState::Running
            };
            i.reason = None;
            i.booted_at = Some(now_secs());
        })
    }

    /// Powers off: SIGRTMIN+3 to init, up to `timeout`, then SIGKILL; then releases the
    /// mounts, loop device and cgroups (the disk image stays).
    pub fn stop(&self, id: &str, timeout: Option<Duration>) -> Result<Instance> {
        let inst = self.get(id)?;
        let l = self.op_lock(&inst.uuid);
        let _g = lock(&l);
        let timeout = timeout.unwrap_or(Duration::from_secs(self.cfg.stop_timeout));
        self.stop_locked(&inst.uuid, timeout)?;
        self.set_state(&inst.uuid, VmState::Shutoff, None)
    }

    fn stop_locked(&self, uuid: &str, timeout: Duration) -> Result<()> {
        let inst = self.get(uuid)?;
        let dir = self.dir(uuid);
        let cg = self.cgroups(uuid);
        let _ = std::fs::remove_file(dir.join(REBOOT_FLAG));
        if let Some(m) = &inst.monitor {
            if m.alive() {
                let _ = cg.freeze(false);
                if let Some(init) = inst.init.as_ref().filter(|p| p.alive()) {
                    // systemd's "halt now" signal; nix's Signal has no real-time signals.
                    // SAFETY: plain kill(2).
                    unsafe { libc::kill(init.pid, libc::SIGRTMIN() + 3) };
                }
                if !wait_gone(m, timeout) {
                    tracing::warn!(uuid, "init ignored the stop request, killing");
                    if let Some(init) = inst.init.as_ref().filter(|p| p.alive()) {
                        let _ = kill(Pid::from_raw(init.pid), Signal::SIGKILL);
                    }
                    cg.kill_all();
                    if !wait_gone(m, Duration::from_secs(10)) {
                        let _ = kill(Pid::from_raw(m.pid), Signal::SIGKILL);
                    }
                }
            }
        }
        self.teardown(uuid)
    }

    /// Releases everything a powered-on instance holds on the host except its files.
    fn teardown(&self, uuid: &str) -> Result<()> {
        let cg = self.cgroups(uuid);
        cg.kill_all();
        crate::procfs::unregister(&self.cfg.procfs, uuid);
        if let Err(e) = self.get(uuid).and_then(|i| self.unplug_vifs(&i)) {
            tracing::warn!(uuid, error = %e, "unplugging VIFs failed");
        }
        rescue::release(&self.dir(uuid))?;
        disk::unmount_rootfs(&Paths::new(&self.dir(uuid)))?;
        cg.remove()?;
        self.update(uuid, |i| {
            i.init = None;
            i.monitor = None;
            i.rescue = None;
        })
        .map(|_| ())
    }

    pub fn delete(&self, id: &str) -> Result<()> {
        let inst = self.get(id)?;
        let l = self.op_lock(&inst.uuid);
        let _g = lock(&l);
        self.set_state(&inst.uuid, VmState::Deleting, None)?;
        // Nova's destroy is a hard power-off.
        self.stop_locked(&inst.uuid, Duration::ZERO)?;
        // Again, failing this time: ports left behind once the state is gone would leak.
        self.unplug_vifs(&inst)?;
        let dir = self.dir(&inst.uuid);
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        if let Err(e) = crate::glance::unpin(&self.cfg, &inst.uuid) {
            tracing::warn!(uuid = %inst.uuid, error = %e, "unpinning its Glance layers");
        }
        if self.cfg.security.isolated_ranges {
            self.ranges.free(&inst.uuid)?;
        }
        self.serial.release(&inst.uuid);
        lock(&self.instances).remove(&inst.uuid);
        lock(&self.locks).remove(&inst.uuid);
        Ok(())
    }

    /// Soft: systemd reboots cleanly (SIGINT = ctrl-alt-del) and the monitor starts init
    /// again when it exits. Hard: init is killed and started again.
    pub fn reboot(&self, id: &str, hard: bool) -> Result<Instance> {
        let inst = self.get(id)?;
        let l = self.op_lock(&inst.uuid);
        let _g = lock(&l);
        let inst = self.get(&inst.uuid)?;
        if !matches!(inst.state, VmState::Running | VmState::Rescued) {
            return if hard {
                drop(_g);
                self.start(&inst.uuid)
            } else {
                Err(Error::Conflict(format!(
                    "soft reboot needs a running instance, it is {:?}",
                    inst.state
                )))
            };
        }
        let dir = self.dir(&inst.uuid);
        let (Some(init), Some(monitor)) = (inst.init.clone(), inst.monitor.clone()) else {
            return Err(Error::Conflict("instance has no init".into()));
        };
        let boot = read_init_record(&dir).map(|r| r.boot).unwrap_or(0);
        model_write_flag(&dir)?;
        let sig = if hard {
            Signal::SIGKILL
        } else {
            Signal::SIGINT
        };
        kill(Pid::from_raw(init.pid), sig).map_err(|e| Error::sys("signal init", e))?;
        let deadline =
            Instant::now() + Duration::from_secs(self.cfg.boot_timeout + self.cfg.stop_timeout);
        let rec = wait_init_record(&dir, &monitor, boot, deadline)?;
        let init = ProcId {
            pid: rec.pid,
            start_time: rec.start_time,
        };
        self.update(&inst.uuid, |i| i.init = Some(init.clone()))?;
        // fatbox-procfs counts uptime from the record: a reboot starts it again.
        self.register_procfs(&inst.uuid, init.pid)?;
        wait_running(&dir, &init, deadline)?;
        self.update(&inst.uuid, |i| i.booted_at = Some(now_secs()))
    }

    fn register_procfs(&self, uuid: &str, init_pid: i32) -> Result<()> {
        let cgroup_rel = format!("/{}/{}", self.cfg.cgroup_parent, uuid);
        crate::procfs::register(&self.cfg.procfs, uuid, &cgroup_rel, init_pid, now_secs())
    }

    pub fn pause(&self, id: &str, paused: bool) -> Result<Instance> {
        let inst = self.get(id)?;
        let l = self.op_lock(&inst.uuid);
        let _g = lock(&l);
        let inst = self.get(&inst.uuid)?;
        let (from, to) = if paused {
            (VmState::Running, VmState::Paused)
        } else {
            (VmState::Paused, VmState::Running)
        };
        if inst.state == to {
            return Ok(inst);
        }
        if inst.state != from {
            return Err(Error::Conflict(format!("instance is {:?}", inst.state)));
        }
        self.cgroups(&inst.uuid).freeze(paused)?;
        self.set_state(&inst.uuid, to, None)
    }

    /// The last `bytes` of the console log.
    pub fn console(&self, id: &str, bytes: u64) -> Result<Vec<u8>> {
        let inst = self.get(id)?;
        let p = self.dir(&inst.uuid).join("console.log");
        let data = match std::fs::read(&p) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(p, e)),
        };
        let keep = usize::try_from(bytes).unwrap_or(usize::MAX);
        let start = data.len().saturating_sub(keep);
        Ok(data.get(start..).unwrap_or_default().to_vec())
    }

    /// Live-restore: rebuilds the table from state.json + /proc. Instances whose init is still
    /// there keep running untouched; the others are reported shut off (or in error).
    pub fn restore(&self) -> Result<()> {
        let root = self.cfg.instances_dir();
        let rd = std::fs::read_dir(&root).map_err(io(&root))?;
        for e in rd.flatten() {
            let dir = e.path();
            let Ok(mut inst) = Instance::load(&dir) else {
                tracing::warn!(dir = %dir.display(), "no readable state.json, skipped");
                continue;
            };
            if inst.uuid != e.file_name().to_string_lossy() {
                tracing::warn!(dir = %dir.display(), "state.json uuid does not match its directory, skipped");
                continue;
            }
            let uuid = inst.uuid.clone();
            // Follow reboots that happened while we were away.
            if let Some(rec) = read_init_record(&dir) {
                let p = ProcId {
                    pid: rec.pid,
                    start_time: rec.start_time,
                };
                if p.alive() {
                    inst.init = Some(p);
                }
            }
            let alive = inst.monitor.as_ref().is_some_and(|m| m.alive())
                && inst.init.as_ref().is_some_and(|p| p.alive());
            let prev = inst.state;
            lock(&self.instances).insert(uuid.clone(), inst.clone());
            match (prev, alive) {
                (
                    VmState::Running | VmState::Paused | VmState::Suspended | VmState::Rescued,
                    true,
                ) => {
                    tracing::info!(
                        uuid,
                        pid = inst.init.as_ref().map(|p| p.pid),
                        "restored running instance"
                    );
                    inst.save(&dir)?;
                }
                (VmState::Deleting, _) => {
                    if let Err(e) = self.delete(&uuid) {
                        tracing::warn!(uuid, error = %e, "finishing delete failed");
                    }
                }
                (VmState::Building, _) => {
                    let _ = self.stop_locked(&uuid, Duration::ZERO);
                    self.set_state(
                        &uuid,
                        VmState::Error,
                        Some("fatboxd stopped during the build".into()),
                    )?;
                }
                (
                    VmState::Running | VmState::Paused | VmState::Suspended | VmState::Rescued,
                    false,
                ) => {
                    let _ = self.teardown(&uuid);
                    self.set_state(
                        &uuid,
                        VmState::Shutoff,
                        Some("init exited while fatboxd was down".into()),
                    )?;
                }
                (_, true) => {
                    // Powered-off instance with a live init: trust /proc.
                    self.set_state(&uuid, VmState::Running, None)?;
                }
                (_, false) => {}
            }
        }
        self.restore_serial();
        Ok(())
    }

    /// Notices guests that powered themselves off and guests that rebooted (new init pid).
    pub fn reconcile(&self) {
        for inst in self.list() {
            if !matches!(
                inst.state,
                VmState::Running | VmState::Paused | VmState::Suspended | VmState::Rescued
            ) {
                continue;
            }
            let l = self.op_lock(&inst.uuid);
            let Ok(_g) = l.try_lock() else { continue };
            let Ok(inst) = self.get(&inst.uuid) else {
                continue;
            };
            let dir = self.dir(&inst.uuid);
            let monitor_alive = inst.monitor.as_ref().is_some_and(|m| m.alive());
            if !monitor_alive {
                let reason = read_exit_record(&dir).map(|r| format!("init exited: {}", r.status));
                tracing::info!(uuid = inst.uuid, ?reason, "instance powered off");
                let _ = self.teardown(&inst.uuid);
                let _ = self.set_state(&inst.uuid, VmState::Shutoff, reason);
                continue;
            }
            if let Some(rec) = read_init_record(&dir) {
                if inst.init.as_ref().map(|p| p.pid) != Some(rec.pid) {
                    let p = ProcId {
                        pid: rec.pid,
                        start_time: rec.start_time,
                    };
                    let _ = self.update(&inst.uuid, |i| i.init = Some(p));
                    // A reboot from inside: uptime starts again.
                    let _ = self.register_procfs(&inst.uuid, rec.pid);
                }
            }
        }
    }
}

fn model_write_flag(dir: &Path) -> Result<()> {
    let p = dir.join(REBOOT_FLAG);
    std::fs::write(&p, b"1").map_err(io(p))
}

fn read_init_record(dir: &Path) -> Option<InitRecord> {
    serde_json::from_slice(&std::fs::read(dir.join(INIT_FILE)).ok()?).ok()
}

fn read_exit_record(dir: &Path) -> Option<ExitRecord> {
    serde_json::from_slice(&std::fs::read(dir.join(EXIT_FILE)).ok()?).ok()
}

fn wait_gone(p: &ProcId, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !p.alive() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Starts `fatboxd monitor DIR` in its own session so that it outlives fatboxd.
fn spawn_monitor(dir: &Path) -> Result<ProcId> {
    let exe = std::env::var_os("FATBOX_MONITOR_EXE")
        .map(PathBuf::from)
        .map(Ok)
        .unwrap_or_else(std::env::current_exe)
        .map_err(io("/proc/self/exe"))?;
    let log = dir.join("monitor.log");
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(io(&log))?;
    let logf2 = logf.try_clone().map_err(io(&log))?;
    let mut cmd = Command::new(&exe);
    cmd.arg("monitor")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(logf)
        .stderr(logf2);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(io(&exe))?;
    let pid = i32::try_from(child.id()).map_err(|_| Error::Other("pid overflows".into()))?;
    let id = ProcId::of(pid).ok_or_else(|| Error::Other("monitor died at once".into()))?;
    // Reap it when it ends (fatboxd is its parent until fatboxd itself goes away).
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(id)
}

/// Waits for the monitor to record an init newer than boot `after`.
fn wait_init_record(
    dir: &Path,
    monitor: &ProcId,
    after: u32,
    deadline: Instant,
) -> Result<InitRecord> {
    loop {
        if let Some(r) = read_init_record(dir).filter(|r| r.boot > after) {
            return Ok(r);
        }
        if let Some(x) = read_exit_record(dir) {
            return Err(Error::Other(
                x.error
                    .unwrap_or_else(|| format!("init exited: {}", x.status)),
            ));
        }
        if !monitor.alive() {
            let log = std::fs::read_to_string(dir.join("monitor.log")).unwrap_or_default();
            let tail: String = log.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
            return Err(Error::Other(format!("monitor exited: {tail}")));
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout("init did not start".into()));
        }
        std::thread::sleep(POLL);
    }
}

/// The command line of `nsenter` into every namespace of `pid`, with its root and cwd.
pub fn nsenter_args(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    if crate::userns::other_userns(pid) {
        // As the guest's root (uid 0 inside), or systemd refuses its private bus.
        v.push("-U".into());
    }
    v.extend([
        "-t".into(),
        pid.to_string(),
        "-m".into(),
        "-u".into(),
        "-i".into(),
        "-n".into(),
        "-p".into(),
        "-C".into(),
        "-r".into(),
        "-w".into(),
        "--".into(),
    ]);
    v
}

/// Polls until systemd inside says `running` or `degraded`.
fn wait_running(dir: &Path, init: &ProcId, deadline: Instant) -> Result<String> {
    let bus = PathBuf::from(format!("/proc/{}/root/run/systemd/private", init.pid));
    loop {
        if !init.alive() {
            // The monitor writes why just after it reaps init: give it a moment.
            let until = Instant::now() + Duration::from_secs(2);
            let mut rec = read_exit_record(dir);
            while rec.is_none() && Instant::now() < until {
                std::thread::sleep(POLL);
                rec = read_exit_record(dir);
            }
            let why = rec
                .map(|x| x.error.unwrap_or(x.status))
                .unwrap_or_else(|| "init exited during boot".into());
            return Err(Error::Other(format!("boot failed: {why}")));
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout("systemd did not reach running".into()));
        }
        if bus.exists() {
            let mut child = Command::new("nsenter")
                .args(nsenter_args(init.pid))
                .args(["systemctl", "is-system-running", "--wait"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(io("nsenter"))?;
            let mut poll = POLL;
            let started = Instant::now();
            let status = loop {
                if let Some(s) = child.try_wait().map_err(io("nsenter"))? {
                    break Some(s);
                }
                if Instant::now() >= deadline || !init.alive() {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                std::thread::sleep(poll);
                // Many boots at once must not turn into a busy loop.
                if started.elapsed() > Duration::from_secs(3) {
                    poll = (poll * 2).min(Duration::from_millis(100));
                }
            };
            if status.is_some() {
                let mut out = String::new();
                if let Some(mut s) = child.stdout.take() {
                    let _ = std::io::Read::read_to_string(&mut s, &mut out);
                }
                let state = out.trim().to_string();
                match state.as_str() {
                    "running" | "degraded" => return Ok(state),
                    "stopping" | "offline" | "maintenance" => {
                        return Err(Error::Other(format!("systemd is {state}")))
                    }
                    _ => {}
                }
            }
        }
        std::thread::sleep(POLL * 4);
    }
}

/// Writes the instance's identity into its upper layer before boot: hostname, root's
/// authorized_keys. machine-id stays empty in the image: systemd derives it from
/// container_uuid, so it is unique per instance and stable across boots.
fn write_identity(rootfs: &Path, inst: &Instance) -> Result<()> {
    let etc = rootfs.join("etc");
    // Host paths into the guest tree: a guest symlink for /etc or /root would point our
    // writes at the host's own files.
    for d in [&etc, &rootfs.join("root")] {
        if d.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
            return Err(Error::Invalid(format!(
                "{} in the image is not a directory",
                d.display()
            )));
        }
    }
    std::fs::create_dir_all(&etc).map_err(io(&etc))?;
    let hn = etc.join("hostname");
    // A symlink planted by the guest must not redirect our writes to the host.
    for p in [&hn] {
        if p.symlink_metadata()
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false)
        {
            std::fs::remove_file(p).map_err(io(p))?;
        }
    }
    std::fs::write(&hn, format!("{}\n", inst.guest_hostname())).map_err(io(&hn))?;
    // What we write as host root must belong to the guest's root, not to the overflow id.
    let owner = inst.idmap.filter(|_| inst.userns).map(|r| r.base);
    let give = |p: &Path| -> Result<()> {
        match owner {
            Some(id) => std::os::unix::fs::lchown(p, Some(id), Some(id)).map_err(io(p)),
            None => Ok(()),
        }
    };
    give(&hn)?;
    if !inst.ssh_keys.is_empty() {
        let root = rootfs.join("root");
        let ssh = root.join(".ssh");
        for d in [&root, &ssh] {
            if d.symlink_metadata()
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false)
            {
                return Err(Error::Invalid(format!(
                    "{} is a symlink in the image",
                    d.display()
                )));
            }
        }
        std::fs::create_dir_all(&ssh).map_err(io(&ssh))?;
        give(&ssh)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700)).map_err(io(&ssh))?;
        let ak = ssh.join("authorized_keys");
        if ak
            .symlink_metadata()
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false)
        {
            std::fs::remove_file(&ak).map_err(io(&ak))?;
        }
        let mut body = inst.ssh_keys.join("\n");
        body.push('\n');
        std::fs::write(&ak, body).map_err(io(&ak))?;
        give(&ak)?;
        std::fs::set_permissions(&ak, std::fs::Permissions::from_mode(0o600)).map_err(io(&ak))?;
    }
    Ok(())
}
