//! Mounting, serving and surviving restarts.
//!
//! Restart design (fd store): the /dev/fuse connection fd is handed to a tiny keeper process
//! (`fatbox-procfs keeper`, its own session, does nothing but hold the fd and hand out copies
//! over a unix socket with SCM_RIGHTS). When the daemon is killed, the kernel connection stays
//! alive because the keeper holds it, so every bind mount in every container stays valid;
//! readers just block until a new daemon takes the fd back from the keeper. The new daemon
//! replays a synthetic FUSE INIT to fuser (the kernel sends INIT only once per connection),
//! swaps the real fd in, and asks the kernel to re-queue requests the dead daemon had read
//! but not answered (FUSE_NOTIFY_RESEND, Linux >= 6.9).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

use crate::error::{Error, Result};
use crate::fs::ProcFs;
use crate::registry::Registry;

/// Default mount point.
pub const DEFAULT_MOUNT: &str = "/run/fatbox/procfs";
/// Default keeper socket.
pub const DEFAULT_KEEPER: &str = "/run/fatbox/procfs.keeper.sock";
const FSNAME: &str = "fatbox-procfs";
const FUSE_NOTIFY_RESEND: i32 = 7;

/// Daemon settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub mountpoint: PathBuf,
    pub registry_dir: PathBuf,
    pub keeper_socket: PathBuf,
    pub threads: usize,
    /// None disables loadavg virtualisation (host loadavg is served).
    pub loadavg_interval: Option<Duration>,
    /// Share renders of the same container's file for this long (zero: render every open).
    pub coalesce: Duration,
    /// Give every worker thread its own /dev/fuse fd (FUSE_DEV_IOC_CLONE).
    pub clone_fd: bool,
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> Error {
    move |e| Error::sys(what, std::io::Error::from_raw_os_error(e as i32))
}

/// Device minors of our filesystem mounted at `mp` (per /proc/self/mountinfo).
fn our_mount_minors(mp: &Path) -> Vec<String> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mp = mp.to_string_lossy();
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let fstype = f
                .iter()
                .position(|x| *x == "-")
                .and_then(|i| f.get(i.saturating_add(1)));
            if f.get(4) == Some(&mp.as_ref()) && fstype == Some(&"fuse.fatbox-procfs") {
                f.get(2)
                    .and_then(|d| d.split_once(':'))
                    .map(|(_, mi)| mi.to_string())
            } else {
                None
            }
        })
        .collect()
}

/// Whether `mp` is currently a mount of our filesystem.
pub fn is_our_mount(mp: &Path) -> bool {
    !our_mount_minors(mp).is_empty()
}

fn mount_fresh(mp: &Path) -> Result<OwnedFd> {
    std::fs::create_dir_all(mp).map_err(|e| Error::io(mp, e))?;
    // A dead mount from an instance whose keeper died too: detach it so we mount cleanly.
    while is_our_mount(mp) {
        nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH)
            .map_err(sys("umount stale mount"))?;
    }
    let fd = nix::fcntl::open(
        "/dev/fuse",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(sys("open /dev/fuse"))?;
    // SAFETY: open returned a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let opts = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
        fd.as_raw_fd()
    );
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some(FSNAME),
        mp,
        Some("fuse.fatbox-procfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
        Some(opts.as_str()),
    )
    .map_err(sys("mount fuse"))?;
    Ok(fd)
}

fn fuse_config(threads: usize, clone_fd: bool) -> fuser::Config {
    let mut c = fuser::Config::default();
    c.acl = fuser::SessionACL::All;
    c.n_threads = Some(threads.max(1));
    c.clone_fd = clone_fd;
    c
}

/// A FUSE_INIT request as the kernel would send it, for fuser's handshake on resume.
fn synthetic_init() -> Vec<u8> {
    let mut m = Vec::with_capacity(104);
    let push32 = |m: &mut Vec<u8>, v: u32| m.extend_from_slice(&v.to_ne_bytes());
    push32(&mut m, 104); // len
    push32(&mut m, 26); // FUSE_INIT
    m.extend_from_slice(&1u64.to_ne_bytes()); // unique
    m.extend_from_slice(&0u64.to_ne_bytes()); // nodeid
    for _ in 0..3 {
        push32(&mut m, 0); // uid, gid, pid
    }
    push32(&mut m, 0); // total_extlen + padding
    push32(&mut m, 7); // major
    push32(&mut m, 40); // minor
    push32(&mut m, 128 * 1024); // max_readahead
    push32(&mut m, 0); // flags
    for _ in 0..12 {
        push32(&mut m, 0); // flags2, unused
    }
    m
}

/// Build a session around an already initialised connection.
fn resume_session(
    fs: ProcFs,
    fuse: OwnedFd,
    config: fuser::Config,
) -> Result<fuser::Session<ProcFs>> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(sys("socketpair"))?;
    nix::unistd::write(&theirs, &synthetic_init()).map_err(sys("write init"))?;
    let session = fuser::Session::from_fd(fs, ours, fuser::SessionACL::All, config)
        .map_err(|e| Error::sys("fuse handshake", e))?;
    let slot = session.as_fd().as_raw_fd();
    // Swap the real connection into the fd number fuser reads from.
    // SAFETY: both fds are open; dup3 atomically replaces `slot`, which the session owns.
    let rc = unsafe { libc::dup3(fuse.as_raw_fd(), slot, libc::O_CLOEXEC) };
    if rc < 0 {
        return Err(Error::sys("dup3", std::io::Error::last_os_error()));
    }
    drop(fuse);
    let mut hdr = Vec::with_capacity(16);
    hdr.extend_from_slice(&16u32.to_ne_bytes());
    hdr.extend_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    hdr.extend_from_slice(&0u64.to_ne_bytes());
    // SAFETY: slot is a valid fd owned by the session for its whole lifetime.
    let rc = unsafe { libc::write(slot, hdr.as_ptr().cast(), hdr.len()) };
    if rc < 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "FUSE_NOTIFY_RESEND failed");
    }
    Ok(session)
}

fn send_fd(sock: &UnixStream, cmd: u8, fd: Option<RawFd>) -> Result<()> {
    let buf = [cmd];
    let iov = [IoSlice::new(&buf)];
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let cm: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cm, MsgFlags::empty(), None).map_err(sys("sendmsg"))?;
    Ok(())
}

fn recv_fd(sock: &UnixStream) -> Result<(u8, Option<OwnedFd>)> {
    let mut buf = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!(RawFd);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(sys("recvmsg"))?;
    let mut fd = None;
    for c in msg.cmsgs().map_err(sys("cmsgs"))? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for f in fds {
                // SAFETY: the kernel just installed this fd for us.
                let owned = unsafe { OwnedFd::from_raw_fd(f) };
                if fd.is_none() {
                    fd = Some(owned);
                }
            }
        }
    }
    if msg.bytes == 0 {
        return Err(Error::sys(
            "recvmsg",
            std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
        ));
    }
    Ok((buf.first().copied().unwrap_or(0), fd))
}

/// Run the keeper: hold the fd put by the daemon, hand out copies, exit on 'Q'.
pub fn run_keeper(socket: &Path) -> Result<()> {
    // Own session: a kill of the daemon's process group must not take the keeper along.
    let _ = nix::unistd::setsid();
    let _ = std::fs::remove_file(socket);
    let l = UnixListener::bind(socket).map_err(|e| Error::io(socket, e))?;
    // Whoever can connect can get the fd and answer every container's /proc reads.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(socket, e))?;
    }
    let pidfile = pidfile_of(socket);
    std::fs::write(&pidfile, format!("{}\n", std::process::id()))
        .map_err(|e| Error::io(&pidfile, e))?;
    let mut held: Option<OwnedFd> = None;
    for conn in l.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        match recv_fd(&conn) {
            Ok((b'P', Some(fd))) => {
                held = Some(fd);
                let _ = send_fd(&conn, b'Y', None);
            }
            Ok((b'G', _)) => {
                let _ = match &held {
                    Some(fd) => send_fd(&conn, b'Y', Some(fd.as_raw_fd())),
                    None => send_fd(&conn, b'N', None),
                };
            }
            Ok((b'Q', _)) => {
                let _ = send_fd(&conn, b'Y', None);
                break;
            }
            Ok(_) | Err(_) => {}
        }
    }
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(&pidfile);
    Ok(())
}

/// Where the keeper writes its pid.
pub fn pidfile_of(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".pid");
    PathBuf::from(s)
}

fn keeper_request(socket: &Path, cmd: u8, fd: Option<RawFd>) -> Result<(u8, Option<OwnedFd>)> {
    let s = UnixStream::connect(socket).map_err(|e| Error::io(socket, e))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| Error::io(socket, e))?;
    send_fd(&s, cmd, fd)?;
    recv_fd(&s)
}

/// Ask a running keeper to exit (drops its reference on the connection).
pub fn stop_keeper(socket: &Path) -> Result<()> {
    keeper_request(socket, b'Q', None).map(|_| ())
}

fn start_keeper(socket: &Path, fuse: &OwnedFd) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::io("/proc/self/exe", e))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("keeper")
        .arg("--socket")
        .arg(socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let mut child = cmd.spawn().map_err(|e| Error::sys("spawn keeper", e))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match keeper_request(socket, b'P', Some(fuse.as_raw_fd())) {
            Ok((b'Y', _)) => break,
            Ok(_) | Err(_) if Instant::now() < deadline => {
                if let Ok(Some(st)) = child.try_wait() {
                    return Err(Error::sys(
                        "keeper exited",
                        std::io::Error::other(format!("{st}")),
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(_) => return Err(Error::sys("keeper", std::io::Error::other("refused fd"))),
            Err(e) => return Err(e),
        }
    }
    tracing::info!(pid = child.id(), "keeper holds the fuse fd");
    // The keeper outlives us by design; it is reaped by init when we exit.
    std::mem::forget(child);
    Ok(())
}

/// Mount (or take over the existing mount from the keeper) and serve until the connection ends.
pub fn serve(opts: &ServeOptions) -> Result<()> {
    let reg = Arc::new(Registry::new(
        &opts.registry_dir,
        crate::cgroup::Hierarchy::detect(),
        opts.loadavg_interval.is_some(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    if let Some(iv) = opts.loadavg_interval {
        crate::loadavg::spawn(reg.clone(), iv, stop.clone())
            .map_err(|e| Error::sys("spawn sampler", e))?;
    }
    let fs = ProcFs::new(reg, opts.coalesce);
    let resumed = match keeper_request(&opts.keeper_socket, b'G', None) {
        Ok((b'Y', Some(fd))) if is_our_mount(&opts.mountpoint) => Some(fd),
        Ok(_) => {
            tracing::warn!("keeper has no live connection; mounting afresh");
            let _ = stop_keeper(&opts.keeper_socket);
            None
        }
        Err(_) => None,
    };
    let session = match resumed {
        Some(fd) => {
            tracing::info!(mount = %opts.mountpoint.display(), "resuming connection from keeper");
            resume_session(fs, fd, fuse_config(opts.threads, opts.clone_fd))?
        }
        None => {
            let fd = mount_fresh(&opts.mountpoint)?;
            let dup = fd.try_clone().map_err(|e| Error::sys("dup", e))?;
            let session = fuser::Session::from_fd(
                fs,
                fd,
                fuser::SessionACL::All,
                fuse_config(opts.threads, opts.clone_fd),
            )
            .map_err(|e| Error::sys("fuse handshake", e))?;
            start_keeper(&opts.keeper_socket, &dup)?;
            tracing::info!(mount = %opts.mountpoint.display(), "mounted");
            session
        }
    };
    let r = session.run().map_err(|e| Error::sys("fuse session", e));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    r
}

/// Tear everything down: stop the keeper, abort the connection, detach the mount.
pub fn shutdown(mountpoint: &Path, keeper_socket: &Path) -> Result<()> {
    let _ = stop_keeper(keeper_socket);
    // Never stat the mount itself: with no daemon serving, that would block.
    for minor in our_mount_minors(mountpoint) {
        let _ = std::fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), b"1");
    }
    while is_our_mount(mountpoint) {
        nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH).map_err(sys("umount"))?;
    }
    Ok(())
}
