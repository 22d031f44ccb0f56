//! Test harness: real cgroups, real lxcfs, real daemon; everything torn down in Drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub type TResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

pub const CTRLS: &[&str] = &["memory", "cpuset", "cpu", "cpuacct", "blkio"];
pub const BIN: &str = env!("CARGO_BIN_EXE_fatbox-procfs");

pub fn rand_suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{:x}", std::process::id(), t)
}

/// Poll `f` until it returns Some or the deadline passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A cgroup tree `/fatbox-test-<rand>/...` in every v1 controller, removed on drop.
pub struct CgTree {
    pub base: String,
    dirs: Vec<String>,
}

impl CgTree {
    /// `rel` are paths below the base, parents first (e.g. ["a", "a/b", "a/b/c"]).
    pub fn new(rel: &[&str]) -> TResult<Self> {
        let base = format!("/fatbox-test-{}", rand_suffix());
        let mut t = CgTree {
            base: base.clone(),
            dirs: vec![base.clone()],
        };
        for r in rel {
            t.dirs.push(format!("{base}/{r}"));
        }
        for d in t.dirs.clone() {
            for c in CTRLS {
                std::fs::create_dir_all(format!("/sys/fs/cgroup/{c}{d}"))?;
            }
            // cpuset children start empty and refuse tasks until cpus/mems are set.
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let parent = Path::new(&format!("/sys/fs/cgroup/cpuset{d}"))
                    .parent()
                    .map(Path::to_path_buf)
                    .ok_or("no parent")?;
                let v = std::fs::read_to_string(parent.join(f))?;
                std::fs::write(format!("/sys/fs/cgroup/cpuset{d}/{f}"), v.trim())?;
            }
        }
        Ok(t)
    }

    pub fn path(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.base.clone()
        } else {
            format!("{}/{rel}", self.base)
        }
    }

    pub fn set(&self, ctrl: &str, rel: &str, file: &str, val: &str) -> TResult {
        let p = format!("/sys/fs/cgroup/{ctrl}{}/{file}", self.path(rel));
        std::fs::write(&p, val).map_err(|e| format!("{p}: {e}"))?;
        Ok(())
    }

    /// Shell snippet moving the current shell into the leaf `rel` of every controller.
    pub fn enter_snippet(&self, rel: &str) -> String {
        let mut s = String::new();
        for c in CTRLS {
            s.push_str(&format!(
                "echo $$ > /sys/fs/cgroup/{c}{}/cgroup.procs || exit 97; ",
                self.path(rel)
            ));
        }
        s
    }
}

impl Drop for CgTree {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            for c in CTRLS {
                let dir = format!("/sys/fs/cgroup/{c}{d}");
                if let Ok(pids) = std::fs::read_to_string(format!("{dir}/cgroup.procs")) {
                    for p in pids.lines() {
                        let _ = std::fs::write(format!("/sys/fs/cgroup/{c}/cgroup.procs"), p);
                    }
                }
                let _ = poll(Duration::from_secs(2), || {
                    std::fs::remove_dir(&dir)
                        .ok()
                        .or_else(|| (!Path::new(&dir).exists()).then_some(()))
                });
            }
        }
    }
}

/// A child process killed (by pid) on drop.
pub struct Proc {
    pub child: Child,
    pub extra_pids: Vec<u32>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        for p in &self.extra_pids {
            if let Ok(p) = i32::try_from(*p) {
                // SAFETY: plain kill(2) of a pid we started.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// A "container": `unshare -p -f sleep` inside the cgroup leaf; `init` is the sleep (pid 1
/// of its pid namespace, which is what lxcfs keys on).
pub struct Container {
    pub proc_: Proc,
    pub init: u32,
}

impl Container {
    pub fn start(tree: &CgTree, leaf: &str) -> TResult<Self> {
        let script = format!(
            "{} exec unshare -p -f --kill-child sleep 3600",
            tree.enter_snippet(leaf)
        );
        let child = Command::new("bash")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .spawn()?;
        let mut proc_ = Proc {
            child,
            extra_pids: vec![],
        };
        let pid = proc_.pid();
        let init = poll(Duration::from_secs(5), || {
            children_of(pid).first().copied().filter(|c| {
                std::fs::read_to_string(format!("/proc/{c}/comm"))
                    .map(|s| s.trim() == "sleep")
                    .unwrap_or(false)
            })
        })
        .ok_or("container init did not start")?;
        proc_.extra_pids.push(init);
        Ok(Container { proc_, init })
    }

    /// Run `cmd` (a shell command) in the container's cgroup leaf and pid namespace.
    pub fn run(&self, tree: &CgTree, leaf: &str, cmd: &str) -> TResult<String> {
        let script = format!(
            "{} exec nsenter -t {} -p -- bash -c {}",
            tree.enter_snippet(leaf),
            self.init,
            shell_quote(cmd)
        );
        let out = Command::new("bash").arg("-c").arg(script).output()?;
        if !out.status.success() {
            return Err(format!(
                "{cmd}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn mounted(mp: &Path, fstype: &str) -> bool {
    let mp = mp.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let ty = f.iter().position(|x| *x == "-").and_then(|i| f.get(i + 1));
            f.get(4) == Some(&mp.as_ref()) && ty == Some(&fstype)
        })
}

fn lazy_umount_all(mp: &Path, fstype: &str) {
    while mounted(mp, fstype) {
        if nix_umount(mp).is_err() {
            break;
        }
    }
}

fn nix_umount(mp: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(mp.to_string_lossy().as_bytes())?;
    // SAFETY: valid NUL-terminated path.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// lxcfs 5.0.3 on a temp dir.
pub struct Lxcfs {
    pub dir: tempfile::TempDir,
    pub proc_: Option<Proc>,
}

impl Lxcfs {
    pub fn start() -> TResult<Self> {
        let dir = tempfile::tempdir()?;
        let mut l = Lxcfs { dir, proc_: None };
        l.restart()?;
        Ok(l)
    }

    pub fn restart(&mut self) -> TResult {
        let mp = self.dir.path().join("mnt");
        // A killed lxcfs leaves a dead mount behind; detach it like an operator would.
        lazy_umount_all(&mp, "fuse.lxcfs");
        std::fs::create_dir_all(&mp)?;
        let pidfile = self.dir.path().join("pid");
        let child = Command::new("lxcfs")
            .args(["-f", "--enable-cfs", "-p"])
            .arg(&pidfile)
            .arg(&mp)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.proc_ = Some(Proc {
            child,
            extra_pids: vec![],
        });
        let meminfo = mp.join("proc/meminfo");
        poll(Duration::from_secs(10), || {
            (mounted(&mp, "fuse.lxcfs") && std::fs::read(&meminfo).is_ok()).then_some(())
        })
        .ok_or("lxcfs did not come up")?;
        Ok(())
    }

    pub fn kill9(&mut self) {
        self.proc_ = None;
    }

    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for Lxcfs {
    fn drop(&mut self) {
        self.proc_ = None;
        lazy_umount_all(&self.mnt(), "fuse.lxcfs");
    }
}

/// Our daemon with its own mount, registry dir and keeper socket.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub proc_: Option<Proc>,
    pub args: Vec<String>,
}

impl Daemon {
    pub fn start(extra: &[&str]) -> TResult<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("reg"))?;
        let mut d = Daemon {
            dir,
            proc_: None,
            args: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.restart()?;
        Ok(d)
    }

    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
    pub fn reg(&self) -> PathBuf {
        self.dir.path().join("reg")
    }
    pub fn sock(&self) -> PathBuf {
        self.dir.path().join("keeper.sock")
    }

    /// Spawn the daemon (no wait for the mount to answer).
    pub fn spawn(&mut self) -> TResult {
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--mount")
            .arg(self.mnt())
            .arg("--registry")
            .arg(self.reg())
            .arg("--keeper-socket")
            .arg(self.sock())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        self.proc_ = Some(Proc {
            child,
            extra_pids: vec![],
        });
        Ok(())
    }

    pub fn restart(&mut self) -> TResult {
        self.spawn()?;
        let mp = self.mnt();
        poll(Duration::from_secs(10), || {
            mounted(&mp, "fuse.fatbox-procfs").then_some(())
        })
        .ok_or("daemon did not mount")?;
        Ok(())
    }

    pub fn kill9(&mut self) {
        self.proc_ = None;
    }

    pub fn register(&self, id: &str, cgroup: &str, init: u32) -> TResult {
        procfs_fuse::registry::register(
            &self.reg(),
            &procfs_fuse::registry::Record {
                id: id.into(),
                cgroup: cgroup.into(),
                init_pid: init,
                started_at: None,
            },
        )?;
        // The daemon notices within RESCAN_INTERVAL; give it that long.
        std::thread::sleep(procfs_fuse::registry::RESCAN_INTERVAL * 2);
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.proc_ = None;
        let _ = Command::new(BIN)
            .arg("shutdown")
            .arg("--mount")
            .arg(self.mnt())
            .arg("--keeper-socket")
            .arg(self.sock())
            .status();
        if let Ok(pid) = std::fs::read_to_string(procfs_fuse::daemon::pidfile_of(&self.sock())) {
            if let Ok(p) = pid.trim().parse::<i32>() {
                // SAFETY: kill(2) of the keeper we started.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
        lazy_umount_all(&self.mnt(), "fuse.fatbox-procfs");
    }
}

pub fn field(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.split_whitespace().next()?.parse().ok())?
    })
}

pub fn cpu_rows(stat: &str) -> Vec<String> {
    stat.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.starts_with("cpu") && w.len() > 3)
        .map(str::to_string)
        .collect()
}

pub fn processors(cpuinfo: &str) -> usize {
    cpuinfo
        .lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(k, _)| k.trim() == "processor")
        })
        .count()
}
