//! Test harness: a private ovsdb-server + ovs-vswitchd (userspace `netdev` datapath) under a
//! temp dir, and network namespaces standing in for instances. Everything is torn down in Drop.
//!
//! The netdev datapath creates a host tap called `ovs-netdev`, so two vswitchds cannot run at
//! once on one host: a file lock serializes harnesses across tests and test processes.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use driver::network::NetworkConfig;

const LOCK: &str = "/run/fatbox-ovs-harness.lock";
const SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";

pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn unique(prefix: &str) -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}", &u[..8])
}

pub fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd}: {e}"))
}

pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub struct Ovs {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub bridge: String,
    db: Option<Child>,
    vswitchd: Option<Child>,
    _lock: File,
}

impl Ovs {
    /// Starts ovsdb-server and ovs-vswitchd and creates a netdev bridge with a unique name.
    pub fn start() -> Ovs {
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK)
            .expect("open harness lock");
        rustix::fs::flock(lock.as_fd(), rustix::fs::FlockOperation::LockExclusive)
            .expect("lock harness");
        // A previous run killed hard may have left the datapath tap behind.
        let _ = run("ip", &["link", "del", "ovs-netdev"]);
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("db.sock");
        run_ok(
            "ovsdb-tool",
            &[
                "create",
                dir.path().join("conf.db").to_str().unwrap(),
                SCHEMA,
            ],
        );
        let mut ovs = Ovs {
            sock,
            bridge: unique("fbt"),
            db: None,
            vswitchd: None,
            _lock: lock,
            dir,
        };
        ovs.start_ovsdb();
        ovs.vsctl(&["--no-wait", "init"]);
        // Must be set before vswitchd starts: TCP over veth does not pass on the userspace
        // datapath on this machine without it.
        ovs.vsctl(&[
            "--no-wait",
            "set",
            "Open_vSwitch",
            ".",
            "other_config:userspace-tso-enable=true",
        ]);
        ovs.start_vswitchd();
        let br = ovs.bridge.clone();
        ovs.vsctl(&[
            "--timeout=20",
            "add-br",
            &br,
            "--",
            "set",
            "bridge",
            &br,
            "datapath_type=netdev",
        ]);
        ovs
    }

    fn spawn(&self, prog: &str, args: &[String], log: &str) -> Child {
        let log = File::create(self.dir.path().join(log)).expect("log file");
        let err = log.try_clone().expect("dup log");
        Command::new(prog)
            .args(args)
            .env("OVS_RUNDIR", self.dir.path())
            .env("OVS_DBDIR", self.dir.path())
            .env("OVS_LOGDIR", self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {prog}: {e}"))
    }

    pub fn start_ovsdb(&mut self) {
        let d = self.dir.path();
        let args = vec![
            d.join("conf.db").display().to_string(),
            format!("--remote=punix:{}", self.sock.display()),
            format!("--unixctl={}", d.join("ovsdb.ctl").display()),
            format!("--pidfile={}", d.join("ovsdb.pid").display()),
            "-vconsole:off".into(),
            format!("--log-file={}", d.join("ovsdb-server.log").display()),
        ];
        let _ = std::fs::remove_file(&self.sock);
        self.db = Some(self.spawn("ovsdb-server", &args, "ovsdb-server.out"));
        let sock = self.sock.clone();
        poll("ovsdb socket", Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&sock)
                .ok()
                .map(|_| ())
        });
    }

    pub fn stop_ovsdb(&mut self) {
        if let Some(mut c) = self.db.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart_ovsdb(&mut self) {
        self.stop_ovsdb();
        self.start_ovsdb();
    }

    fn start_vswitchd(&mut self) {
        let d = self.dir.path();
        let args = vec![
            format!("unix:{}", self.sock.display()),
            format!("--unixctl={}", d.join("vswitchd.ctl").display()),
            format!("--pidfile={}", d.join("vswitchd.pid").display()),
            "-vconsole:off".into(),
            format!("--log-file={}", d.join("ovs-vswitchd.log").display()),
        ];
        self.vswitchd = Some(self.spawn("ovs-vswitchd", &args, "ovs-vswitchd.out"));
        let ctl = d.join("vswitchd.ctl");
        poll("vswitchd control socket", Duration::from_secs(10), || {
            ctl.exists().then_some(())
        });
    }

    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.sock.display())
    }

    pub fn config(&self) -> NetworkConfig {
        NetworkConfig {
            ovsdb: self.endpoint(),
            integration_bridge: self.bridge.clone(),
            standalone: true,
            reconnect_timeout_ms: 15_000,
            ..NetworkConfig::default()
        }
    }

    pub fn vsctl(&self, args: &[&str]) -> String {
        let db = format!("--db={}", self.endpoint());
        let mut all = vec![db.as_str()];
        all.extend_from_slice(args);
        run_ok("ovs-vsctl", &all)
    }

    /// Ports on the harness bridge.
    pub fn ports(&self) -> Vec<String> {
        self.vsctl(&["list-ports", &self.bridge])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// `ovs-vsctl get TABLE ROW COLUMN` (trimmed).
    pub fn get(&self, table: &str, row: &str, col: &str) -> String {
        self.vsctl(&["get", table, row, col]).trim().to_string()
    }
}

impl Drop for Ovs {
    fn drop(&mut self) {
        if let Some(mut c) = self.vswitchd.take() {
            // `exit --cleanup` removes the datapath and its taps; kill is the fallback.
            let ctl = self.dir.path().join("vswitchd.ctl");
            let _ = Command::new("timeout")
                .args([
                    "5",
                    "ovs-appctl",
                    "-t",
                    ctl.to_str().unwrap_or(""),
                    "exit",
                    "--cleanup",
                ])
                .output();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stop_ovsdb();
        for dev in [self.bridge.as_str(), "ovs-netdev"] {
            let _ = run("ip", &["link", "del", dev]);
        }
    }
}

/// A named network namespace (`ip netns add`), deleted in Drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = unique("fbtns");
        run_ok("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    pub fn exec_ok(&self, args: &[&str]) -> String {
        let o = self.exec(args);
        assert!(
            o.status.success(),
            "in {}: {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn add_addr(&self, dev: &str, cidr: &str) {
        self.exec_ok(&["ip", "addr", "add", cidr, "dev", dev]);
        self.exec_ok(&["ip", "link", "set", dev, "up"]);
    }

    /// One ICMP echo with a one-second wait.
    pub fn ping(&self, ip: &str) -> bool {
        self.exec(&["python3", "-c", include_str!("ping.py"), ip, "1"])
            .status
            .success()
    }

    /// Polls until `ip` answers (the new port needs a moment in vswitchd).
    pub fn wait_ping(&self, ip: &str) {
        poll(
            &format!("ping {ip} from {}", self.name),
            Duration::from_secs(15),
            || self.ping(ip).then_some(()),
        );
    }

    /// Runs `f` on a thread that has joined this namespace.
    pub fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("open netns");
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Host links whose name starts with `prefix`.
pub fn host_links(prefix: &str) -> Vec<String> {
    let out = run_ok("ip", &["-o", "link", "show"]);
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with(prefix))
        .collect()
}
