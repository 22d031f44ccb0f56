//! The console socket: the monitor serves the console pty on `<instance>/console.sock`
//! (mode 0600) so that fatboxd (WebSocket attach, TCP serial console) can attach to it.
//!
//! Protocol: the client first sends one line of JSON, [`Hello`] (`{"tail":N,"readonly":b}\n`),
//! then raw bytes both ways: everything the guest prints from then on (after the last `tail`
//! bytes of console.log, if asked), and what the client sends goes to the pty as typed input.
//! Every attached client may write (like several people at one serial line); a read-only
//! client's input is discarded. The monitor never waits for a client: each has a bounded
//! backlog, and one that does not keep up is disconnected, so console.log and the guest's
//! console never stall. The socket belongs to the monitor, so it lives as long as the
//! instance is powered on, whatever happens to fatboxd.

use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

pub const SOCKET: &str = "console.sock";
/// Output a client may have pending before it is disconnected as too slow.
pub const MAX_BACKLOG: usize = 256 * 1024;
/// Typed input waiting for the guest to read it; past this clients are not read (they wait,
/// the guest does not).
const MAX_INPUT: usize = 64 * 1024;
const MAX_HELLO: usize = 1024;
/// The most console.log a client may ask to replay.
pub const MAX_TAIL: u64 = 1 << 20;
const MAX_CLIENTS: usize = 64;

/// The first line a client sends.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Hello {
    /// Replay the last `tail` bytes of console.log first.
    #[serde(default)]
    pub tail: u64,
    /// Input from this client is discarded.
    #[serde(default)]
    pub readonly: bool,
}

impl Hello {
    pub fn line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        v.push(b'\n');
        v
    }
}

pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET)
}

struct Conn {
    stream: UnixStream,
    /// Bytes of the hello line until it is complete; None once attached.
    hello: Option<Vec<u8>>,
    readonly: bool,
    /// The peer shut down its sending side; it may still read.
    input_done: bool,
    out: Vec<u8>,
    dead: bool,
}

/// The monitor's side. Single-threaded: the monitor polls [`Server::pollfds`] together with
/// the pty and calls [`Server::handle`] with the results.
pub struct Server {
    path: PathBuf,
    listener: Option<UnixListener>,
    conns: Vec<Conn>,
    /// Input for the pty not yet written.
    pub input: Vec<u8>,
}

impl Server {
    /// Binds the socket; without it (e.g. a path too long for a unix socket) the console
    /// still goes to console.log, only attaching is impossible.
    pub fn bind(dir: &Path) -> Server {
        let path = socket_path(dir);
        let _ = std::fs::remove_file(&path);
        // Created 0600 from the start (the monitor is single-threaded, the umask is ours).
        // SAFETY: umask only swaps the process mask.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(&path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = match listener.and_then(|l| l.set_nonblocking(true).map(|()| l)) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "no console socket");
                None
            }
        };
        Server {
            path,
            listener,
            conns: Vec::new(),
            input: Vec::new(),
        }
    }

    pub fn clients(&self) -> usize {
        self.conns.iter().filter(|c| c.hello.is_none()).count()
    }

    /// The descriptors to poll, appended to `fds` (in the order `handle` expects).
    pub fn pollfds(&self, fds: &mut Vec<libc::pollfd>) {
        let fd = |fd: i32, events: i16| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        match &self.listener {
            Some(l) => fds.push(fd(l.as_raw_fd(), libc::POLLIN)),
            None => fds.push(fd(-1, 0)),
        }
        let room = self.input.len() < MAX_INPUT;
        for c in &self.conns {
            let mut ev = 0;
            if !c.input_done && (room || c.hello.is_some()) {
                ev |= libc::POLLIN;
            }
            if !c.out.is_empty() {
                ev |= libc::POLLOUT;
            }
            fds.push(fd(c.stream.as_raw_fd(), ev));
        }
    }

    /// Acts on the poll results for our descriptors (`fds` starts at ours).
    pub fn handle(&mut self, fds: &[libc::pollfd], log: &Path) {
        let mut buf = [0u8; 8192];
        for (c, p) in self.conns.iter_mut().zip(fds.iter().skip(1)) {
            if p.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                c.dead = true;
                continue;
            }
            if p.revents & libc::POLLIN != 0 {
                match (&c.stream).read(&mut buf) {
                    Ok(0) => c.input_done = true,
                    Ok(n) => {
                        let data = buf.get(..n).unwrap_or_default();
                        if c.hello.is_some() {
                            read_hello(c, data, log, &mut self.input);
                        } else if !c.readonly {
                            self.input.extend_from_slice(data);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => c.dead = true,
                }
            }
            if p.revents & libc::POLLOUT != 0 {
                flush(c);
            }
            // Both directions closed: nothing more to do with it.
            if p.revents & libc::POLLHUP != 0 && (c.input_done || p.revents & libc::POLLIN == 0) {
                c.dead = true;
            }
            if c.hello.is_some() && c.input_done {
                c.dead = true;
            }
        }
        self.conns.retain(|c| !c.dead);
        if fds.first().is_some_and(|p| p.revents & libc::POLLIN != 0) {
            self.accept();
        }
    }

    fn accept(&mut self) {
        let Some(l) = &self.listener else { return };
        loop {
            match l.accept() {
                Ok((s, _)) => {
                    if self.conns.len() >= MAX_CLIENTS || s.set_nonblocking(true).is_err() {
                        tracing::warn!("console: too many clients, refused one");
                        continue;
                    }
                    self.conns.push(Conn {
                        stream: s,
                        hello: Some(Vec::new()),
                        readonly: false,
                        input_done: false,
                        out: Vec::new(),
                        dead: false,
                    });
                }
                Err(_) => return,
            }
        }
    }

    /// Guest output: queued for every attached client; a client whose backlog would pass
    /// MAX_BACKLOG is disconnected instead of slowing anyone down.
    pub fn broadcast(&mut self, data: &[u8]) {
        for c in self.conns.iter_mut().filter(|c| c.hello.is_none()) {
            if c.out.len().saturating_add(data.len()) > MAX_BACKLOG {
                tracing::info!(
                    backlog = c.out.len(),
                    "console: dropping a client that does not read"
                );
                c.dead = true;
                continue;
            }
            c.out.extend_from_slice(data);
            flush(c);
        }
        self.conns.retain(|c| !c.dead);
    }

    /// Writes pending input to the (non-blocking) pty master.
    pub fn write_input(&mut self, master: &OwnedFd) {
        while !self.input.is_empty() {
            match nix::unistd::write(master, &self.input) {
                Ok(0) => return,
                Ok(n) => {
                    self.input.drain(..n.min(self.input.len()));
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return,
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn read_hello(c: &mut Conn, data: &[u8], log: &Path, input: &mut Vec<u8>) {
    let Some(h) = c.hello.as_mut() else { return };
    h.extend_from_slice(data);
    let Some(nl) = h.iter().position(|&b| b == b'\n') else {
        if h.len() > MAX_HELLO {
            c.dead = true;
        }
        return;
    };
    let rest = h.split_off(nl + 1);
    let hello: Hello = match serde_json::from_slice(h) {
        Ok(v) => v,
        Err(e) => {
            tracing::info!(error = %e, "console: bad hello, client dropped");
            c.dead = true;
            return;
        }
    };
    c.hello = None;
    c.readonly = hello.readonly;
    if hello.tail > 0 {
        c.out = log_tail(log, hello.tail.min(MAX_TAIL));
    }
    if !c.readonly {
        input.extend_from_slice(&rest);
    }
    flush(c);
}

fn flush(c: &mut Conn) {
    while !c.out.is_empty() {
        // MSG_NOSIGNAL: a client gone away must not kill the monitor with SIGPIPE.
        // SAFETY: the buffer is valid for its length during the call.
        let n = unsafe {
            libc::send(
                c.stream.as_raw_fd(),
                c.out.as_ptr().cast(),
                c.out.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => return,
                std::io::ErrorKind::Interrupted => continue,
                _ => {
                    c.dead = true;
                    return;
                }
            }
        }
        let n = usize::try_from(n).unwrap_or(0);
        c.out.drain(..n.min(c.out.len()));
    }
}

/// The last `n` bytes of the log.
pub fn log_tail(log: &Path, n: u64) -> Vec<u8> {
    let Ok(mut f) = std::fs::File::open(log) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(n)));
    let mut v = Vec::new();
    let _ = f.take(n).read_to_end(&mut v);
    v
}

// ---- fatboxd's side: attach (WebSocket relay) and serial consoles (TCP relay) ----

use crate::error::{Error, Result};
use crate::model::VmState;
use crate::ops::Manager;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::io::AsyncWriteExt;

/// Connects to an instance's console socket and says hello; the stream then carries raw
/// console bytes both ways.
pub async fn connect(sock: &Path, hello: Hello) -> Result<tokio::net::UnixStream> {
    let mut s = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| Error::Conflict(format!("console of this instance unreachable: {e}")))?;
    s.write_all(&hello.line())
        .await
        .map_err(|e| Error::io(sock, e))?;
    Ok(s)
}

impl Manager {
    /// The console socket of a powered-on instance.
    pub fn console_socket(&self, id: &str) -> Result<PathBuf> {
        let inst = self.get(id)?;
        let on = matches!(
            inst.state,
            VmState::Running | VmState::Paused | VmState::Suspended | VmState::Rescued
        ) && inst.monitor.as_ref().is_some_and(|m| m.alive());
        if !on {
            return Err(Error::Conflict(format!(
                "instance {} is {:?}: no console to attach to",
                inst.name, inst.state
            )));
        }
        let p = socket_path(&self.dir(&inst.uuid));
        if !p.exists() {
            return Err(Error::Conflict(format!(
                "instance {} has no console socket (its monitor predates console attach: \
                 stop and start it once)",
                inst.name
            )));
        }
        Ok(p)
    }

    /// The instance's serial console port, opened on first use (`[console]` settings).
    pub fn serial_console(&self, id: &str) -> Result<(String, u16)> {
        let c = &self.cfg.console;
        if !c.serial_enabled {
            return Err(Error::Disabled(
                "serial consoles are disabled ([console] serial_enabled = false)".into(),
            ));
        }
        let inst = self.get(id)?;
        let ip = c.listen_ip()?;
        let (first, last) = c.port_range()?;
        let host = ip.to_string();
        // One allocation at a time: two requests must not both pick a port.
        let mut open = lock_map(&self.serial.open);
        if let Some(p) = open.get(&inst.uuid) {
            return Ok((host, p.port));
        }
        let taken: std::collections::HashSet<u16> = self
            .list()
            .iter()
            .filter(|i| i.uuid != inst.uuid)
            .filter_map(|i| i.serial_port)
            .chain(open.values().map(|p| p.port))
            .collect();
        let span = u32::from(last - first) + 1;
        // Start at a spot derived from the uuid: fewer collisions between hosts' choices.
        let start = inst
            .uuid
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
            % span;
        let candidates = inst.serial_port.into_iter().chain(
            (0..span)
                .filter_map(|k| u16::try_from(u32::from(first) + (start + k) % span).ok())
                .filter(|p| !taken.contains(p)),
        );
        let dir = self.dir(&inst.uuid);
        for port in candidates {
            match listen(ip, port, socket_path(&dir)) {
                Ok(task) => {
                    open.insert(inst.uuid.clone(), OpenPort { port, task });
                    drop(open);
                    self.update(&inst.uuid, |i| i.serial_port = Some(port))?;
                    tracing::info!(uuid = inst.uuid, %ip, port, "serial console listening");
                    return Ok((host, port));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(Error::io(format!("serial console {ip}:{port}"), e)),
            }
        }
        Err(Error::Conflict(format!(
            "no free port in console.serial_port_range {}",
            c.serial_port_range
        )))
    }

    /// After a restart: listen again on the ports instances had.
    pub(crate) fn restore_serial(&self) {
        if !self.cfg.console.serial_enabled {
            return;
        }
        let Ok(ip) = self.cfg.console.listen_ip() else {
            return;
        };
        for inst in self.list() {
            let Some(port) = inst.serial_port else {
                continue;
            };
            match listen(ip, port, socket_path(&self.dir(&inst.uuid))) {
                Ok(task) => {
                    lock_map(&self.serial.open).insert(inst.uuid.clone(), OpenPort { port, task });
                }
                // The next request picks another port.
                Err(e) => {
                    tracing::warn!(uuid = inst.uuid, port, error = %e, "serial console port lost")
                }
            }
        }
    }
}

struct OpenPort {
    port: u16,
    task: tokio::task::AbortHandle,
}

/// The serial console listeners of this fatboxd (they end with it; restore reopens them).
#[derive(Default)]
pub struct SerialPorts {
    open: Mutex<HashMap<String, OpenPort>>,
}

impl SerialPorts {
    /// Closes the instance's port (its open sessions end when its console does).
    pub fn release(&self, uuid: &str) {
        if let Some(p) = lock_map(&self.open).remove(uuid) {
            p.task.abort();
        }
    }
}

fn lock_map<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Binds ip:port and serves it on the current tokio runtime: each TCP connection is relayed
/// raw to the console socket of the moment (none while the instance is off: closed at once).
fn listen(
    ip: std::net::IpAddr,
    port: u16,
    sock: PathBuf,
) -> std::io::Result<tokio::task::AbortHandle> {
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|e| std::io::Error::other(format!("no runtime: {e}")))?;
    let l = std::net::TcpListener::bind((ip, port))?;
    l.set_nonblocking(true)?;
    let _guard = rt.enter();
    let l = tokio::net::TcpListener::from_std(l)?;
    let task = rt.spawn(async move {
        loop {
            let (mut tcp, peer) = match l.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of fds, say: back off instead of spinning.
                    tracing::warn!(port, error = %e, "serial console accept");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let sock = sock.clone();
            tokio::spawn(async move {
                tracing::info!(%peer, sock = %sock.display(), "serial console session");
                let Ok(mut u) = connect(&sock, Hello::default()).await else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut u).await;
            });
        }
    });
    Ok(task.abort_handle())
}

#[derive(Debug, Deserialize)]
pub struct AttachQuery {
    /// Bytes of console.log to replay first.
    #[serde(default)]
    tail: u64,
    #[serde(default)]
    readonly: bool,
}

type Mgr = std::sync::Arc<Manager>;
type ApiResult<T> = std::result::Result<T, crate::api::ApiError>;

/// `GET /v1/instances/{id}/console/attach`: a WebSocket carrying the console's raw bytes in
/// binary frames both ways (text frames from the client are taken as their UTF-8 bytes).
/// The console closes the WebSocket when the instance powers off or is deleted.
pub async fn attach(
    axum::extract::State(m): axum::extract::State<Mgr>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::Query(q): axum::extract::Query<AttachQuery>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> ApiResult<axum::response::Response> {
    // Errors are plain HTTP answers, before the upgrade.
    let sock = m.console_socket(&id)?;
    let u = connect(
        &sock,
        Hello {
            tail: q.tail,
            readonly: q.readonly,
        },
    )
    .await?;
    Ok(ws.on_upgrade(move |socket| relay_ws(socket, u)))
}

async fn relay_ws(socket: axum::extract::ws::WebSocket, u: tokio::net::UnixStream) {
    use axum::extract::ws::Message;
    use futures::{SinkExt, StreamExt};
    use tokio::io::AsyncReadExt;
    let (mut tx, mut rx) = socket.split();
    let (mut ur, mut uw) = u.into_split();
    let to_ws = async {
        let mut buf = vec![0u8; 16384];
        loop {
            let n = match ur.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = buf.get(..n).unwrap_or_default();
            if tx
                .send(Message::Binary(chunk.to_vec().into()))
                .await
                .is_err()
            {
                return;
            }
        }
        // The console ended (power-off, delete): say so instead of just dropping.
        let _ = tx
            .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                code: 1000,
                reason: "console closed".into(),
            })))
            .await;
    };
    let from_ws = async {
        while let Some(Ok(msg)) = rx.next().await {
            let r = match msg {
                Message::Binary(b) => uw.write_all(&b).await,
                Message::Text(t) => uw.write_all(t.as_bytes()).await,
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => Ok(()),
            };
            if r.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = to_ws => {}
        _ = from_ws => {}
    }
}

/// `POST /v1/instances/{id}/serial-console` → `{"host","port","protocol":"tcp"}`.
pub async fn serial_console(
    axum::extract::State(m): axum::extract::State<Mgr>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    // The blocking pool still has the runtime's handle, which listen() spawns on.
    let (host, port) = tokio::task::spawn_blocking(move || m.serial_console(&id))
        .await
        .map_err(|e| Error::Other(format!("task failed: {e}")))??;
    Ok(axum::Json(
        serde_json::json!({"host": host, "port": port, "protocol": "tcp"}),
    ))
}
