//! A private fatboxd per test file (temp state_dir and socket), torn down in Drop even when
//! the test fails: instances deleted through the library, daemon killed, files removed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// `$FATBOX_FIXTURES`, or the fixture script's (cached) output.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(d) = std::env::var("FATBOX_FIXTURES") {
            return PathBuf::from(d);
        }
        let script = repo_root().join("tests/fixtures/build-guest-images.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(out.status.success(), "fixture script failed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(stdout.lines().last().unwrap_or("").trim())
    })
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_full("", "")
    }

    /// A daemon whose instances get the files of this (real) fatbox-procfs bound over /proc.
    pub fn start_with_procfs(p: &Procfs) -> Daemon {
        Self::start_full(
            &format!(
                "mount = \"{}\"\nregistry = \"{}\"\n",
                p.mount.display(),
                p.registry.display()
            ),
            "",
        )
    }

    /// A daemon whose `[network]` section holds `network` (TOML lines).
    pub fn start_with_network(network: &str) -> Daemon {
        Self::start_full("", network)
    }

    /// `procfs` and `network`: TOML lines for those sections.
    pub fn start_full(procfs: &str, network: &str) -> Daemon {
        Self::start_cfg(procfs, network, "")
    }

    /// A daemon whose config gets `extra` (whole TOML sections, e.g. `[security]`) appended.
    pub fn start_with(extra: &str) -> Daemon {
        Self::start_cfg("", "", extra)
    }

    fn start_cfg(procfs: &str, network: &str, extra: &str) -> Daemon {
        // /var/tmp: a disk-backed filesystem (overlay lower dirs, disk images).
        let dir = tempfile::Builder::new()
            .prefix("fatbox-test-")
            .tempdir_in("/var/tmp")
            .expect("temp dir");
        let socket = dir.path().join("fatboxd.sock");
        let config = dir.path().join("fatbox.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\nsocket = \"{}\"\ncgroup_parent = \"{}\"\nstop_timeout = 20\n[procfs]\n{procfs}[network]\n{network}\n[glance]\n{extra}",
                dir.path().join("state").display(),
                socket.display(),
                cgroup_parent_of(dir.path()),
            ),
        )
        .expect("config");
        let mut d = Daemon {
            dir,
            socket,
            config,
            child: None,
        };
        d.spawn();
        d
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("fatboxd.log"))
            .expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_fatboxd"))
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawning fatboxd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.fatbox(&["list"]).status.success() {
            assert!(Instant::now() < deadline, "fatboxd did not come up");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// fatboxd's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as an operator's `kill -9` would.
    pub fn kill9(&mut self) -> u32 {
        let mut c = self.child.take().expect("daemon running");
        let pid = c.id();
        let _ = c.kill();
        let _ = c.wait();
        pid
    }

    pub fn fatbox(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_fatbox"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running fatbox")
    }

    /// Runs fatbox, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.fatbox(args);
        assert!(
            o.status.success(),
            "fatbox {args:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn show(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["show", id, "--json"])).expect("show --json")
    }

    pub fn exec(&self, id: &str, cmd: &str) -> String {
        self.ok(&["exec", id, "--", "sh", "-c", cmd])
    }

    /// Imports the fixture VM disk (v3.qcow2) as image `name`.
    pub fn import_fixture(&self, name: &str) {
        let qcow = fixtures().join("v3.qcow2");
        self.ok(&[
            "image",
            "import",
            qcow.to_str().expect("path"),
            "--name",
            name,
        ]);
    }

    pub fn cgroup_parent(&self) -> String {
        cgroup_parent_of(self.dir.path())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

/// One cgroup parent per daemon (the temp dir's unique name): tests of one binary run in
/// parallel, and a footprint count must not see another test's instances.
fn cgroup_parent_of(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("fatbox-test-{}", std::process::id()))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Whatever the test left: remove through the library (same code as DELETE).
        if let Ok(cfg) = driver::config::Config::load(Some(&self.config)) {
            let parent = cfg.cgroup_parent.clone();
            if let Ok(m) = driver::ops::Manager::new(cfg) {
                let _ = m.restore();
                for i in m.list() {
                    if let Err(e) = m.delete(&i.uuid) {
                        eprintln!("cleanup of {}: {e}", i.uuid);
                    }
                }
            }
            for root in std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
            {
                let _ = std::fs::remove_dir(root.path().join(&parent));
            }
        }
    }
}

/// A real fatbox-procfs on a private mount and registry, shut down in Drop.
pub struct Procfs {
    pub dir: tempfile::TempDir,
    pub mount: PathBuf,
    pub registry: PathBuf,
    keeper: PathBuf,
    child: Option<Child>,
}

/// The workspace's fatbox-procfs binary next to ours (built on demand: `cargo test -p driver`
/// does not build other packages' binaries).
pub fn procfs_bin() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_fatboxd"));
    let bindir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let bin = bindir.join("fatbox-procfs");
    if !bin.exists() {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.current_dir(repo_root())
            .args(["build", "-p", "procfs-fuse", "--bin", "fatbox-procfs"]);
        if bindir.file_name().is_some_and(|n| n == "release") {
            c.arg("--release");
        }
        if let Some(target) = bindir.parent() {
            c.env("CARGO_TARGET_DIR", target);
        }
        let st = c.status().expect("cargo build fatbox-procfs");
        assert!(st.success(), "building fatbox-procfs failed");
    }
    bin
}

impl Procfs {
    pub fn start() -> Procfs {
        let dir = tempfile::Builder::new()
            .prefix("fatbox-procfs-test-")
            .tempdir_in("/run")
            .expect("temp dir");
        let mount = dir.path().join("mnt");
        let registry = dir.path().join("registry");
        let keeper = dir.path().join("keeper.sock");
        std::fs::create_dir_all(&mount).expect("mount dir");
        std::fs::create_dir_all(&registry).expect("registry dir");
        let log = std::fs::File::create(dir.path().join("procfs.log")).expect("log");
        let child = Command::new(procfs_bin())
            .arg("serve")
            .arg("--mount")
            .arg(&mount)
            .arg("--registry")
            .arg(&registry)
            .arg("--keeper-socket")
            .arg(&keeper)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawning fatbox-procfs");
        let p = Procfs {
            dir,
            mount,
            registry,
            keeper,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !driver::disk::is_mountpoint(&p.mount) {
            assert!(Instant::now() < deadline, "fatbox-procfs did not mount");
            std::thread::sleep(Duration::from_millis(10));
        }
        p
    }

    /// What fatbox-procfs renders for a cgroup (the host side of the comparison).
    pub fn render(&self, file: &str, cgroup: &str) -> String {
        let o = Command::new(procfs_bin())
            .args(["render", file, "--cgroup", cgroup])
            .output()
            .expect("fatbox-procfs render");
        assert!(o.status.success(), "render {file}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Procfs {
    fn drop(&mut self) {
        let _ = Command::new(procfs_bin())
            .arg("shutdown")
            .arg("--mount")
            .arg(&self.mount)
            .arg("--keeper-socket")
            .arg(&self.keeper)
            .status();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` until it returns Some, or panics with `what` after `secs`.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut poll = Duration::from_millis(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(poll);
        poll = (poll * 2).min(Duration::from_millis(200));
    }
}

/// Reads a file of the instance's v1 cgroup (None on a host without that controller).
pub fn cgroup_file(d: &Daemon, controller: &str, uuid: &str, file: &str) -> Option<String> {
    std::fs::read_to_string(format!(
        "/sys/fs/cgroup/{controller}/{}/{uuid}/{file}",
        d.cgroup_parent()
    ))
    .ok()
    .map(|s| s.trim().to_string())
}
