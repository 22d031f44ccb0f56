//! `fatbox exec`: run a command inside a running instance, in its cgroups and namespaces,
//! with the caller's stdio or, when interactive, with a pty of the instance's own devpts.

use crate::error::{io, Error, Result};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// ptmx is char device 5:2, in every devpts instance.
const PTMX_MAJOR: u32 = 5;
const PTMX_MINOR: u32 = 2;

pub struct ExecRequest<'a> {
    pub init_pid: i32,
    pub cgroups: &'a [PathBuf],
    pub cmd: &'a [String],
    pub tty: bool,
    /// TERM for the command (the caller's, when it has one).
    pub term: String,
    /// Install the default seccomp profile (as init has it, unless privileged).
    pub seccomp: bool,
    pub allow_perf_event: bool,
}

/// Runs the command and returns its exit code (128 + signal when killed).
pub fn exec(req: &ExecRequest<'_>) -> Result<i32> {
    if req.cmd.is_empty() {
        return Err(Error::Invalid("exec: empty command".into()));
    }
    // Join the instance's cgroups first so nsenter and the command are accounted and limited
    // like the instance; children inherit it.
    let me = std::process::id().to_string();
    for d in req.cgroups {
        let p = d.join("cgroup.procs");
        std::fs::write(&p, &me).map_err(io(p))?;
    }
    let filter = if req.seccomp {
        Some(crate::seccomp::build(req.allow_perf_event)?)
    } else {
        None
    };
    // Not nsenter: joining a user namespace resets the bounding set, and init's confinement
    // must be re-applied between setns and exec (crate::enter).
    let target = crate::enter::Target::open(req.init_pid, filter)?;
    let (prog, args) = req
        .cmd
        .split_first()
        .ok_or_else(|| Error::Invalid("exec: empty command".into()))?;
    let mut cmd = Command::new(prog);
    // SAFETY: Target::enter makes only raw syscalls between fork and exec. It is registered
    // first, so the pty set-up below runs in the process that execs the command.
    unsafe {
        cmd.pre_exec(move || target.enter());
    }
    cmd.args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("TERM", &req.term)
        .env("HOME", "/root")
        .env("container", "fatbox");
    let status = if req.tty {
        with_pty(req.init_pid, cmd)?
    } else {
        cmd.status().map_err(io(prog))?
    };
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// Runs a command inside with `input` on its stdin and no terminal, for fatboxd's own guest
/// operations (set_password). Unlike `exec`, the caller stays where it is: fatboxd must not
/// move itself into an instance's cgroups, so only the forked child joins them (by writing
/// "0" to fds opened before the fork). Secrets go through stdin, never argv (visible in ps).
/// The command is killed after `timeout`: a guest can replace the binary with anything.
pub fn run_with_input(
    req: &ExecRequest<'_>,
    input: &[u8],
    timeout: std::time::Duration,
) -> Result<(i32, String)> {
    use std::io::{Read, Seek, Write};
    let (prog, args) = req
        .cmd
        .split_first()
        .ok_or_else(|| Error::Invalid("exec: empty command".into()))?;
    let mut procs = Vec::new();
    for d in req.cgroups {
        let p = d.join("cgroup.procs");
        procs.push(File::options().write(true).open(&p).map_err(io(p))?);
    }
    let filter = if req.seccomp {
        Some(crate::seccomp::build(req.allow_perf_event)?)
    } else {
        None
    };
    let target = crate::enter::Target::open(req.init_pid, filter)?;
    // A file, not a pipe: nothing to drain while waiting, and a command that leaves a child
    // holding the pipe open cannot block us.
    let mut errf = tempfile::tempfile().map_err(io("stderr tempfile"))?;
    let mut cmd = Command::new(prog);
    // SAFETY: only raw syscalls (write on fds opened above, then Target::enter) run between
    // fork and exec; the parent is multi-threaded, so nothing may allocate there.
    unsafe {
        cmd.pre_exec(move || {
            for f in &procs {
                if libc::write(f.as_raw_fd(), c"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            target.enter()
        });
    }
    cmd.args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        .env("LANG", "C")
        .env("container", "fatbox")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            errf.try_clone().map_err(io("stderr tempfile"))?,
        ));
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        // exec inside failed: report it as the shell would.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((127, e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Ok((126, e.to_string()))
        }
        Err(e) => return Err(Error::io(prog, e)),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // EPIPE: the command exited without reading; its status says why.
        let _ = stdin.write_all(input);
    }
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(io(prog))? {
            break st;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Timeout(format!("{prog} inside the instance")));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let mut err = String::new();
    let _ = errf.rewind();
    let _ = Read::take(&mut errf, 4096).read_to_string(&mut err);
    Ok((
        status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
        err,
    ))
}

/// Opens a pty pair in the instance's devpts: `tty` inside names a device that exists there,
/// and the instance's own pty limits apply.
fn open_pty(init_pid: i32) -> Result<(OwnedFd, OwnedFd)> {
    use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
    let root = PathBuf::from(format!("/proc/{init_pid}/root"));
    let dir = rustix::fs::open(
        &root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io(&root, e.into()))?;
    // The guest owns that tree: resolve its symlinks inside it, never on the host, and open
    // nothing but a ptmx (opening an arbitrary device can have side effects).
    let probe = openat2(
        &dir,
        "dev/pts/ptmx",
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| Error::io(root.join("dev/pts/ptmx"), e.into()))?;
    let st = rustix::fs::fstat(&probe).map_err(|e| Error::io("ptmx", e.into()))?;
    let is_chr =
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::CharacterDevice;
    if !is_chr
        || rustix::fs::major(st.st_rdev) != PTMX_MAJOR
        || rustix::fs::minor(st.st_rdev) != PTMX_MINOR
    {
        return Err(Error::Other(
            "the instance's /dev/pts/ptmx is not a ptmx device".into(),
        ));
    }
    // Reopen the checked inode itself through its O_PATH descriptor.
    let master = rustix::fs::open(
        format!("/proc/self/fd/{}", probe.as_raw_fd()),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("ptmx", e.into()))?;
    let mut unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK takes a pointer to an int that outlives the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &mut unlock) } < 0 {
        return Err(Error::io("TIOCSPTLCK", std::io::Error::last_os_error()));
    }
    // SAFETY: TIOCGPTPEER returns a new fd for the slave, no path lookup involved.
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(Error::io("TIOCGPTPEER", std::io::Error::last_os_error()));
    }
    // SAFETY: the ioctl just returned this fd and nothing else owns it.
    Ok((master, unsafe { OwnedFd::from_raw_fd(slave) }))
}

/// Restores the terminal mode on drop (also on error paths).
pub struct RawMode {
    fd: i32,
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    /// Raw mode on `fd`; None when it is not a terminal.
    pub fn enter(fd: std::os::fd::BorrowedFd<'_>) -> Option<RawMode> {
        let saved = nix::sys::termios::tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        nix::sys::termios::tcsetattr(fd, nix::sys::termios::SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode {
            fd: fd.as_raw_fd(),
            saved,
        })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: stdin stays open for the life of the process.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        let _ = nix::sys::termios::tcsetattr(fd, nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
}

fn copy_winsize(from: i32, to: i32) {
    // SAFETY: winsize is plain data; both ioctls take a pointer to it.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(from, libc::TIOCGWINSZ, &mut ws) == 0 {
            libc::ioctl(to, libc::TIOCSWINSZ, &ws);
        }
    }
}

fn with_pty(init_pid: i32, mut cmd: Command) -> Result<std::process::ExitStatus> {
    let (master, slave) = open_pty(init_pid)?;
    let stdin = std::io::stdin();
    let stdin_fd = stdin.as_fd().as_raw_fd();
    let stdout_fd = std::io::stdout().as_fd().as_raw_fd();
    copy_winsize(stdin_fd, master.as_raw_fd());
    let dup = |f: &OwnedFd| f.try_clone().map_err(io("pty"));
    cmd.stdin(Stdio::from(dup(&slave)?))
        .stdout(Stdio::from(dup(&slave)?))
        .stderr(Stdio::from(dup(&slave)?));
    // SAFETY: setsid, ioctl and the sigset calls are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            // We block SIGWINCH to read it from a signalfd; the command must get it.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGWINCH);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // SIGWINCH as an fd in the poll loop: window resizes follow the caller's terminal.
    let mut mask = nix::sys::signal::SigSet::empty();
    mask.add(nix::sys::signal::Signal::SIGWINCH);
    let _ = mask.thread_block();
    let winch = nix::sys::signalfd::SignalFd::with_flags(
        &mask,
        nix::sys::signalfd::SfdFlags::SFD_NONBLOCK | nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
    )
    .map_err(|e| Error::sys("signalfd", e))?;
    let mut child = cmd.spawn().map_err(io("nsenter"))?;
    drop(slave);
    let _raw = RawMode::enter(stdin.as_fd());
    let mut out = File::from(master.try_clone().map_err(io("pty"))?);
    let mut stdin_open = true;
    let mut buf = [0u8; 16384];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if stdin_open { stdin_fd } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: winch.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // A short timeout: the command may end while something it started keeps the pty.
        // SAFETY: fds is a valid array of three pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 3, 200) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("poll", e));
        }
        if fds[0].revents != 0 {
            match nix::unistd::read(master.as_raw_fd(), &mut buf) {
                Ok(n) if n > 0 => {
                    if let Some(chunk) = buf.get(..n) {
                        write_all(stdout_fd, chunk);
                    }
                }
                // EIO: every slave fd is closed, the command is done.
                _ => break,
            }
        }
        if fds[1].revents != 0 {
            match nix::unistd::read(stdin_fd, &mut buf) {
                Ok(n) if n > 0 => {
                    if let Some(chunk) = buf.get(..n) {
                        use std::io::Write;
                        let _ = out.write_all(chunk);
                    }
                }
                _ => {
                    // Piped input ended: pass EOF on as the terminal's end-of-file (^D).
                    stdin_open = false;
                    use std::io::Write;
                    let _ = out.write_all(&[4]);
                }
            }
        }
        if fds[2].revents != 0 {
            while let Ok(Some(_)) = winch.read_signal() {}
            copy_winsize(stdin_fd, master.as_raw_fd());
        }
        if fds[0].revents == 0 {
            if let Some(st) = child.try_wait().map_err(io("nsenter"))? {
                drain(&master, stdout_fd, &mut buf);
                return Ok(st);
            }
        }
    }
    child.wait().map_err(io("nsenter"))
}

/// What the command wrote just before it exited.
fn drain(master: &OwnedFd, stdout_fd: i32, buf: &mut [u8]) {
    loop {
        let mut pfd = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 {
            return;
        }
        match nix::unistd::read(master.as_raw_fd(), buf) {
            Ok(n) if n > 0 => {
                if let Some(chunk) = buf.get(..n) {
                    write_all(stdout_fd, chunk);
                }
            }
            _ => return,
        }
    }
}

fn write_all(fd: i32, mut data: &[u8]) {
    while !data.is_empty() {
        // SAFETY: fd is our stdout, data a valid slice.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n <= 0 {
            return;
        }
        data = data
            .get(usize::try_from(n).unwrap_or(0)..)
            .unwrap_or_default();
    }
}

/// True when both stdin and stdout are terminals (an interactive caller).
pub fn interactive() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}
