//! The per-instance monitor: a small process (`fatboxd monitor DIR`), in its own session,
//! that owns one instance's init. It is not a child that dies with fatboxd: fatboxd can be
//! killed or upgraded while instances run. It holds the console pty master and copies the
//! output into a size-capped console.log, reaps init (and orphans, as a subreaper), restarts
//! init on a reboot, and records what happened in init.json / exit.json.
//!
//! It stays single-threaded so that the forked children may allocate safely.

use crate::error::{io, Error, Result};
use crate::model::{now_secs, proc_start_time, write_atomic};
use crate::spec::{ExitRecord, InitRecord, RuntimeSpec, EXIT_FILE, INIT_FILE, REBOOT_FLAG};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Console text that tells a reboot from a power-off when init just exits (it cannot call
/// reboot(2) without CAP_SYS_BOOT, so both look like a plain exit).
const REBOOT_MARKERS: [&str; 3] = [
    "Reached target reboot.target",
    "System Reboot",
    "Rebooting.",
];

pub fn run(dir: &Path) -> Result<()> {
    let spec = RuntimeSpec::load(dir)?;
    // SAFETY: plain prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let pty = nix::pty::openpty(None, None).map_err(|e| Error::sys("openpty", e))?;
    let slave_path = nix::unistd::ttyname(&pty.slave).map_err(|e| Error::sys("ttyname", e))?;
    // Close-on-exec (init must not inherit the master and read its own typed input) and
    // non-blocking (input for a guest that does not read must never stall the monitor).
    for flag in [
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    ] {
        nix::fcntl::fcntl(pty.master.as_raw_fd(), flag).map_err(|e| Error::sys("fcntl pty", e))?;
    }
    let mut console = Console::open(&spec.console_log, spec.console_log_max)?;
    let mut server = crate::console::Server::bind(dir);

    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block()
        .map_err(|e| Error::sys("sigprocmask", e))?;
    let mut sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| Error::sys("signalfd", e))?;

    // fatboxd plugged the VIFs into this namespace before starting us; every init of this
    // power-on (reboots included) joins it. Without it init gets a fresh one (loopback only).
    let netns = crate::network::instance_netns(dir);
    let monitor_pid = std::process::id() as i32;
    let mut boot: u32 = 0;
    loop {
        boot = boot.saturating_add(1);
        let _ = std::fs::remove_file(dir.join(REBOOT_FLAG));
        let console_mark = console.written;
        let init = match start_init(&spec, netns.as_deref(), &slave_path, &pty.slave) {
            Ok(p) => p,
            Err(e) => {
                record_exit(dir, "failed", Some(e.to_string()))?;
                return Err(e);
            }
        };
        let start_time = proc_start_time(init.as_raw()).unwrap_or(0);
        let rec = InitRecord {
            pid: init.as_raw(),
            start_time,
            boot,
            monitor_pid,
        };
        write_atomic(
            &dir.join(INIT_FILE),
            &serde_json::to_vec(&rec).map_err(|e| Error::Other(e.to_string()))?,
        )?;
        tracing::info!(pid = init.as_raw(), boot, "init started");
        let status = wait_init(init, &pty.master, &mut sfd, &mut console, &mut server)?;
        // Drain what init printed last: the reboot marker may be in it.
        console.pump(&pty.master, &mut server);
        let requested = dir.join(REBOOT_FLAG).exists();
        let said_reboot = console
            .tail_since(console_mark)
            .is_some_and(|t| REBOOT_MARKERS.iter().any(|m| t.contains(m)));
        let sighup = matches!(status, WaitStatus::Signaled(_, Signal::SIGHUP, _));
        tracing::info!(?status, requested, said_reboot, "init exited");
        if requested || said_reboot || sighup {
            continue;
        }
        record_exit(dir, &format!("{status:?}"), None)?;
        return Ok(());
    }
}

fn record_exit(dir: &Path, status: &str, error: Option<String>) -> Result<()> {
    let rec = ExitRecord {
        status: status.to_string(),
        error,
        at: now_secs(),
    };
    write_atomic(
        &dir.join(EXIT_FILE),
        &serde_json::to_vec(&rec).map_err(|e| Error::Other(e.to_string()))?,
    )
}

/// Waits for init to exit, copying console output and reaping orphans meanwhile.
fn wait_init(
    init: Pid,
    master: &OwnedFd,
    sfd: &mut SignalFd,
    console: &mut Console,
    server: &mut crate::console::Server,
) -> Result<WaitStatus> {
    let mut fds = Vec::new();
    loop {
        fds.clear();
        let mut master_ev = libc::POLLIN;
        if !server.input.is_empty() {
            master_ev |= libc::POLLOUT;
        }
        fds.push(libc::pollfd {
            fd: master.as_raw_fd(),
            events: master_ev,
            revents: 0,
        });
        fds.push(libc::pollfd {
            fd: sfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        server.pollfds(&mut fds);
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(2);
        // SAFETY: fds is a valid array of nfds pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), nfds, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("poll", e));
        }
        // Clients first: their slots in fds follow the order pollfds gave them, which
        // pump's broadcast may change.
        server.handle(fds.get(2..).unwrap_or_default(), &console.path);
        let (m, s) = (fds[0].revents, fds[1].revents);
        if m & libc::POLLIN != 0 {
            console.pump(master, server);
        }
        if !server.input.is_empty() {
            server.write_input(master);
        }
        if s != 0 {
            while let Ok(Some(_)) = sfd.read_signal() {}
            loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(st) => {
                        if st.pid() == Some(init) {
                            return Ok(st);
                        }
                    }
                }
            }
        }
    }
}

/// console.log, kept under a size cap by dropping its older half.
struct Console {
    path: PathBuf,
    file: File,
    size: u64,
    max: u64,
    written: u64,
    /// Output of the current boot (bounded), to look for reboot markers.
    recent: Vec<u8>,
}

impl Console {
    fn open(path: &Path, max: u64) -> Result<Console> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(io(path))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Console {
            path: path.to_path_buf(),
            file,
            size,
            max: max.max(4096),
            written: 0,
            recent: Vec::new(),
        })
    }

    fn pump(&mut self, master: &OwnedFd, server: &mut crate::console::Server) {
        let mut buf = [0u8; 8192];
        loop {
            let mut pfd = libc::pollfd {
                fd: master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; zero timeout.
            let r = unsafe { libc::poll(&mut pfd, 1, 0) };
            if r <= 0 || pfd.revents & libc::POLLIN == 0 {
                return;
            }
            let n = match nix::unistd::read(master.as_raw_fd(), &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let Some(chunk) = buf.get(..n) else { return };
            self.append(chunk);
            server.broadcast(chunk);
        }
    }

    fn append(&mut self, data: &[u8]) {
        let _ = self.file.write_all(data);
        let len = data.len() as u64;
        self.size = self.size.saturating_add(len);
        self.written = self.written.saturating_add(len);
        self.recent.extend_from_slice(data);
        if self.recent.len() > 16384 {
            let cut = self.recent.len() - 8192;
            self.recent.drain(..cut);
        }
        if self.size > self.max {
            self.rotate();
        }
    }

    fn rotate(&mut self) {
        let keep = self.max / 2;
        let mut data = Vec::new();
        if let Ok(mut f) = File::open(&self.path) {
            let _ = f.read_to_end(&mut data);
        }
        let start = data
            .len()
            .saturating_sub(usize::try_from(keep).unwrap_or(usize::MAX));
        let tail = data.get(start..).unwrap_or_default();
        if write_atomic(&self.path, tail).is_ok() {
            if let Ok(f) = std::fs::OpenOptions::new().append(true).open(&self.path) {
                self.file = f;
                self.size = tail.len() as u64;
            }
        }
    }

    fn tail_since(&self, mark: u64) -> Option<String> {
        let since = usize::try_from(self.written.saturating_sub(mark)).ok()?;
        let start = self.recent.len().saturating_sub(since);
        Some(String::from_utf8_lossy(self.recent.get(start..)?).into_owned())
    }
}

/// Forks the intermediate process that joins the cgroups and unshares the namespaces, and
/// whose child becomes the instance's PID 1. Returns init's pid on the host.
fn start_init(
    spec: &RuntimeSpec,
    netns: Option<&Path>,
    slave_path: &Path,
    slave: &OwnedFd,
) -> Result<Pid> {
    let idmap = match (spec.userns, spec.idmap) {
        (false, _) => None,
        (true, Some(r)) => Some(r),
        (true, None) => return Err(Error::Invalid("userns without an id range".into())),
    };
    if let Some(r) = idmap {
        // The console belongs to the guest's root and tty group (gid 5), not to host root
        // (which the guest would see as nobody and could not chmod).
        sys(
            || "chown console pty".into(),
            nix::unistd::fchown(
                slave.as_raw_fd(),
                Some(nix::unistd::Uid::from_raw(r.base)),
                r.host(5).map(nix::unistd::Gid::from_raw),
            ),
        )?;
    }
    let (pid_r, pid_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe", e))?;
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe", e))?;
    // userns handshake: the child says "unshared", we write its id maps (only a process in
    // the parent namespace may map a range), then say "mapped".
    let (ns_r, ns_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe", e))?;
    let (go_r, go_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe", e))?;
    // SAFETY: the monitor is single-threaded, so the child may allocate.
    match unsafe { fork() }.map_err(|e| Error::sys("fork", e))? {
        ForkResult::Child => {
            drop(pid_r);
            drop(err_r);
            drop(ns_r);
            drop(go_w);
            let mut errf = File::from(err_w);
            let sync = Sync {
                userns: idmap.is_some(),
                unshared: File::from(ns_w),
                mapped: File::from(go_r),
            };
            let r = intermediate(spec, netns, sync, slave_path, slave, pid_w, &mut errf);
            if let Err(e) = r {
                let _ = errf.write_all(e.to_string().as_bytes());
                // SAFETY: leave without running the parent's atexit handlers.
                unsafe { libc::_exit(127) };
            }
            // SAFETY: as above.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(pid_w);
            drop(err_w);
            drop(ns_w);
            drop(go_r);
            let mut map_err = None;
            if let (Some(r), None) = (idmap, netns) {
                let mut b = [0u8; 1];
                let mut f = File::from(ns_r);
                if matches!(f.read(&mut b), Ok(1)) {
                    map_err = crate::userns::write_maps(child.as_raw(), &r).err();
                    if map_err.is_none() {
                        let _ = File::from(go_w).write_all(b"1");
                    }
                }
            } else {
                drop(ns_r);
                drop(go_w);
            }
            let mut s = String::new();
            let _ = File::from(pid_r).read_to_string(&mut s);
            let _ = waitpid(child, None);
            if let Some(e) = map_err {
                return Err(e);
            }
            // EOF on the error pipe once init exec'd (close-on-exec) or died.
            let mut err = String::new();
            let _ = File::from(err_r).read_to_string(&mut err);
            if !err.is_empty() {
                return Err(Error::Other(format!("starting init: {err}")));
            }
            let pid: i32 = s
                .trim()
                .parse()
                .map_err(|_| Error::Other("init did not start".into()))?;
            Ok(Pid::from_raw(pid))
        }
    }
}

/// The intermediate's ends of the user-namespace handshake.
struct Sync {
    userns: bool,
    unshared: File,
    mapped: File,
}

fn intermediate(
    spec: &RuntimeSpec,
    netns: Option<&Path>,
    mut sync: Sync,
    slave_path: &Path,
    slave: &OwnedFd,
    pid_w: OwnedFd,
    errf: &mut File,
) -> Result<()> {
    let userns = sync.userns;
    let me = std::process::id().to_string();
    for d in &spec.cgroups {
        let p = d.join("cgroup.procs");
        std::fs::write(&p, &me).map_err(io(p))?;
    }
    // From here on the rootfs is reached relative to its parent dir: the guest's root may
    // not search the state dir's ancestors (a 0700 state_dir is fine for host root).
    let parent = spec
        .rootfs
        .parent()
        .ok_or_else(|| Error::Invalid("rootfs has no parent".into()))?;
    sys(
        || format!("chdir {}", parent.display()),
        nix::unistd::chdir(parent),
    )?;
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWCGROUP
        | CloneFlags::CLONE_NEWPID;
    match (userns, netns) {
        (true, Some(p)) => {
            // fatboxd made the netns (VIFs already plugged) owned by a user namespace with
            // this instance's mapping (userns::create_netns_owned): join that one, then the
            // netns, over which it gives the guest's root its capabilities.
            crate::userns::enter_netns_owner(p)?;
            crate::network::enter_netns(p)?;
        }
        (false, Some(p)) => crate::network::enter_netns(p)?,
        (_, None) => flags |= CloneFlags::CLONE_NEWNET,
    }
    if userns && netns.is_none() {
        // First, alone: the namespaces unshared below are then owned by it, so the guest's
        // root has capabilities over them and over nothing on the host.
        unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| Error::sys("unshare(user)", e))?;
        sync.unshared.write_all(b"1").map_err(io("userns pipe"))?;
        let mut b = [0u8; 1];
        if !matches!(sync.mapped.read(&mut b), Ok(1)) {
            return Err(Error::Other(
                "the monitor did not map the user namespace".into(),
            ));
        }
    }
    if userns {
        let root_g = nix::unistd::Gid::from_raw(0);
        let root_u = nix::unistd::Uid::from_raw(0);
        sys(|| "setgroups".into(), nix::unistd::setgroups(&[]))?;
        sys(
            || "setresgid".into(),
            nix::unistd::setresgid(root_g, root_g, root_g),
        )?;
        sys(
            || "setresuid".into(),
            nix::unistd::setresuid(root_u, root_u, root_u),
        )?;
    }
    drop(sync);
    unshare(flags).map_err(|e| Error::sys("unshare", e))?;
    // SAFETY: single-threaded process (forked from the single-threaded monitor).
    match unsafe { fork() }.map_err(|e| Error::sys("fork", e))? {
        ForkResult::Child => {
            drop(pid_w);
            let e = init_child(spec, slave_path, slave);
            let _ = errf.write_all(e.to_string().as_bytes());
            // SAFETY: leave without running atexit handlers.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            let mut w = File::from(pid_w);
            w.write_all(child.as_raw().to_string().as_bytes())
                .map_err(io("pid pipe"))?;
            Ok(())
        }
    }
}

/// Runs as PID 1 of the new namespaces: builds the container's mounts and execs init.
/// Returns only on failure.
fn init_child(spec: &RuntimeSpec, slave_path: &Path, slave: &OwnedFd) -> Error {
    match setup_and_exec(spec, slave_path, slave) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

fn sys<T>(what: impl FnOnce() -> String, r: nix::Result<T>) -> Result<T> {
    r.map_err(|e| Error::sys(what(), e))
}

fn setup_and_exec(spec: &RuntimeSpec, slave_path: &Path, slave: &OwnedFd) -> Result<Never> {
    let filter = if spec.seccomp {
        Some(crate::seccomp::build(spec.allow_perf_event)?)
    } else {
        None
    };
    let mut unblock = SigSet::empty();
    unblock.add(Signal::SIGCHLD);
    let _ = unblock.thread_unblock();
    sys(|| "setsid".into(), nix::unistd::setsid())?;
    // SAFETY: ioctl on a valid tty fd to make it our controlling terminal.
    unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
    for fd in 0..3 {
        sys(|| "dup2".into(), nix::unistd::dup2(slave.as_raw_fd(), fd))?;
    }
    sys(
        || "sethostname".into(),
        nix::unistd::sethostname(&spec.hostname),
    )?;

    // Relative to the cwd the intermediate set (the rootfs' parent); a relative lookup also
    // lands on the mounts stacked on the rootfs, unlike an fd would.
    let r = &PathBuf::from(
        spec.rootfs
            .file_name()
            .ok_or_else(|| Error::Invalid("rootfs has no name".into()))?,
    );
    sys(
        || "make / private".into(),
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
    )?;
    // A fresh bind of the rootfs onto itself: the overlay came from the host's mount
    // namespace and is locked in a user namespace's copy, and pivot_root refuses a locked
    // new root.
    sys(
        || "bind rootfs".into(),
        mount(
            Some(r.as_path()),
            r.as_path(),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    let at = |p: &str| r.join(p.trim_start_matches('/'));
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;

    mkdir(&at("proc"))?;
    do_mount(Some("proc"), &at("proc"), Some("proc"), nosuid, None)?;
    // /proc/sys read-only (and /proc/sysrq-trigger, which can reboot the host).
    for p in ["proc/sys", "proc/sysrq-trigger"] {
        let t = at(p);
        if t.exists() {
            bind(&t, &t, true)?;
        }
    }

    mkdir(&at("sys"))?;
    do_mount(
        Some("sysfs"),
        &at("sys"),
        Some("sysfs"),
        nosuid | MsFlags::MS_RDONLY,
        None,
    )?;
    // The cgroup namespace root is the instance's cgroup: systemd gets it writable.
    let cg = at("sys/fs/cgroup");
    if cg.is_dir() {
        do_mount(
            Some("cgroup2"),
            &cg,
            Some("cgroup2"),
            nosuid,
            Some("nsdelegate"),
        )
        .or_else(|_| do_mount(Some("cgroup2"), &cg, Some("cgroup2"), nosuid, None))?;
    }

    for (src, rel) in &spec.procfs_binds {
        let t = at(rel);
        if src.exists() && t.exists() {
            bind(src, &t, false)?;
        }
    }

    for (src, rel) in &spec.binds {
        let t = at(rel);
        // The guest's tree is untrusted: a symlink on the way would aim the bind (and the
        // mkdir) at a host path.
        let mut p = r.to_path_buf();
        for c in Path::new(rel.trim_start_matches('/')).components() {
            p.push(c);
            if p.symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink())
            {
                return Err(Error::Invalid(format!("{rel}: a symlink in the guest")));
            }
        }
        // Reached from the cwd (the instance dir) like ro_binds below: under a user namespace
        // the guest's root may not search the state dir's ancestors.
        let src = spec
            .rootfs
            .parent()
            .and_then(|p| src.strip_prefix(p).ok())
            .filter(|rel_src| !rel_src.as_os_str().is_empty())
            .unwrap_or(src);
        mkdir(&t)?;
        bind(src, &t, false)?;
    }

    for (src, rel) in &spec.ro_binds {
        let t = at(rel);
        // Instance files are reached from the cwd (the instance dir), not through ancestors
        // the guest's root may not search.
        let src = spec
            .rootfs
            .parent()
            .and_then(|p| src.strip_prefix(p).ok())
            .filter(|rel_src| !rel_src.as_os_str().is_empty())
            .unwrap_or(src);
        // A guest symlink here would aim the bind at a host path.
        if t.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
            return Err(Error::Invalid(format!(
                "/{rel} in the guest is not a directory"
            )));
        }
        mkdir(&t)?;
        bind(src, &t, true)?;
    }

    setup_dev(r, slave_path)?;

    for (p, mode) in [("run", "0755"), ("tmp", "1777")] {
        mkdir(&at(p))?;
        do_mount(
            Some("tmpfs"),
            &at(p),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(&format!("mode={mode}")),
        )?;
    }
    mkdir(&at("run/lock"))?;
    do_mount(
        Some("tmpfs"),
        &at("run/lock"),
        Some("tmpfs"),
        nosuid,
        Some("mode=1777,size=5m"),
    )?;

    sys(|| "chdir rootfs".into(), nix::unistd::chdir(r.as_path()))?;
    sys(|| "pivot_root".into(), nix::unistd::pivot_root(".", "."))?;
    sys(
        || "detach old root".into(),
        umount2(".", MntFlags::MNT_DETACH),
    )?;
    sys(|| "chdir /".into(), nix::unistd::chdir("/"))?;

    crate::seccomp::drop_bounding(&spec.drop_caps).map_err(io("PR_CAPBSET_DROP"))?;
    // Signal dispositions were reset by fork for handlers; ignored ones survive exec.
    for s in Signal::iterator() {
        if s != Signal::SIGKILL && s != Signal::SIGSTOP {
            // SAFETY: restoring the default disposition.
            let _ = unsafe { nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigDfl) };
        }
    }
    let _ = SigSet::empty().thread_set_mask();
    let argv: Vec<CString> = spec
        .init
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Invalid("NUL in init argv".into()))?;
    let env: Vec<CString> = spec
        .env
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Invalid("NUL in env".into()))?;
    let prog = argv
        .first()
        .ok_or_else(|| Error::Invalid("empty init command".into()))?;
    if let Some(p) = &filter {
        // Last, so that nothing above runs under it; execve itself is allowed.
        crate::seccomp::install(p).map_err(io("seccomp(SET_MODE_FILTER)"))?;
    }
    let e = nix::unistd::execve(prog, &argv, &env).err();
    Err(Error::Other(format!(
        "exec {}: {}",
        prog.to_string_lossy(),
        e.map(|e| e.desc()).unwrap_or("failed")
    )))
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(io(p))
}

fn do_mount(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    sys(
        || format!("mount {} on {}", src.unwrap_or(""), target.display()),
        mount(src, target, fstype, flags, data),
    )
}

fn bind(src: &Path, target: &Path, ro: bool) -> Result<()> {
    sys(
        || format!("bind {} on {}", src.display(), target.display()),
        mount(
            Some(src),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ),
    )?;
    if ro {
        sys(
            || format!("remount ro {}", target.display()),
            mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            ),
        )?;
    }
    Ok(())
}

/// A minimal /dev: the usual char devices bound from the host, a private devpts, the
/// console pty.
fn setup_dev(r: &Path, slave_path: &Path) -> Result<()> {
    let dev = r.join("dev");
    mkdir(&dev)?;
    do_mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=4m"),
    )?;
    for n in ["null", "zero", "full", "random", "urandom", "tty"] {
        let t = dev.join(n);
        File::create(&t).map_err(io(&t))?;
        bind(&Path::new("/dev").join(n), &t, false)?;
    }
    let pts = dev.join("pts");
    mkdir(&pts)?;
    do_mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620,gid=5"),
    )?;
    symlink("pts/ptmx", &dev.join("ptmx"))?;
    let shm = dev.join("shm");
    mkdir(&shm)?;
    do_mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    let console = dev.join("console");
    File::create(&console).map_err(io(&console))?;
    bind(slave_path, &console, false)?;
    for (l, t) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(t, &dev.join(l))?;
    }
    Ok(())
}

fn symlink(target: &str, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link).map_err(io(link))
}
