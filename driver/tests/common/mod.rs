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
        Daemon::start_with("")
    }

    /// A daemon whose `[network]` section holds `network` (TOML lines).
    pub fn start_with_network(network: &str) -> Daemon {
        Daemon::start_with(&format!("[network]\n{network}\n"))
    }

    /// A daemon whose config gets `extra` (TOML sections) appended.
    pub fn start_with(extra: &str) -> Daemon {
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
                "state_dir = \"{}\"\nsocket = \"{}\"\ncgroup_parent = \"fatbox-test-{}\"\nstop_timeout = 20\n[procfs]\n[glance]\n{}",
                dir.path().join("state").display(),
                socket.display(),
                std::process::id(),
                extra,
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

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
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

    pub fn cgroup_parent(&self) -> String {
        format!("fatbox-test-{}", std::process::id())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
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
