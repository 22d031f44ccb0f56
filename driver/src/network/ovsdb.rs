//! A small OVSDB JSON-RPC (RFC 7047) client over a unix or TCP socket.
//!
//! The `ovsdb` crate (0.0.6) only models `select` with string clauses, does not answer the
//! server's `echo` probes and has no reconnect, so this speaks the protocol directly: requests
//! are multiplexed by id over one connection, the connection is re-established lazily after
//! it drops, and callers retry their idempotent steps on [`Error::is_transient`] errors.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, Mutex};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::error::{Error, Result};

/// Database the Open vSwitch schema lives in.
pub const DB: &str = "Open_vSwitch";
/// Largest message accepted from the server; a full Open_vSwitch dump of a big host is far below.
const MAX_MESSAGE: usize = 64 << 20;

type Pending = Arc<StdMutex<HashMap<u64, oneshot::Sender<Result<Value>>>>>;
type Writer = Arc<Mutex<Box<dyn AsyncWrite + Send + Unpin>>>;

#[derive(Clone, Debug)]
enum Endpoint {
    Unix(std::path::PathBuf),
    Tcp(String),
}

impl Endpoint {
    fn parse(s: &str) -> Result<Endpoint> {
        if let Some(p) = s.strip_prefix("unix:") {
            if !p.is_empty() {
                return Ok(Endpoint::Unix(p.into()));
            }
        } else if let Some(a) = s.strip_prefix("tcp:") {
            if !a.is_empty() {
                return Ok(Endpoint::Tcp(a.to_string()));
            }
        }
        Err(Error::InvalidEndpoint(s.to_string()))
    }
}

struct Conn {
    writer: Writer,
    pending: Pending,
    alive: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Shared OVSDB connection; cheap to share behind an `Arc`.
pub struct OvsdbClient {
    endpoint: Endpoint,
    endpoint_str: String,
    conn: Mutex<Option<Arc<Conn>>>,
    next_id: Arc<AtomicU64>,
    request_timeout: Duration,
    probe_interval: Duration,
}

impl OvsdbClient {
    /// Prepares a client; the connection is made by the first request.
    pub fn new(
        endpoint: &str,
        request_timeout: Duration,
        probe_interval: Duration,
    ) -> Result<Self> {
        Ok(OvsdbClient {
            endpoint: Endpoint::parse(endpoint)?,
            endpoint_str: endpoint.to_string(),
            conn: Mutex::new(None),
            next_id: Arc::new(AtomicU64::new(1)),
            request_timeout,
            probe_interval,
        })
    }

    async fn connection(&self) -> Result<Arc<Conn>> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.alive.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
        }
        *guard = None;
        let conn_err = |source| Error::OvsdbConnect {
            endpoint: self.endpoint_str.clone(),
            source,
        };
        let (reader, writer): (
            Box<dyn AsyncRead + Send + Unpin>,
            Box<dyn AsyncWrite + Send + Unpin>,
        ) = match &self.endpoint {
            Endpoint::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await.map_err(conn_err)?;
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Endpoint::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await.map_err(conn_err)?;
                s.set_nodelay(true).map_err(conn_err)?;
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
        };
        let writer: Writer = Arc::new(Mutex::new(writer));
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let reader_task = tokio::spawn(read_loop(
            reader,
            writer.clone(),
            pending.clone(),
            alive.clone(),
        ));
        let probe_task = tokio::spawn(probe_loop(
            writer.clone(),
            pending.clone(),
            alive.clone(),
            self.next_id.clone(),
            self.probe_interval,
            self.request_timeout,
        ));
        debug!(endpoint = %self.endpoint_str, "connected to OVSDB");
        let c = Arc::new(Conn {
            writer,
            pending,
            alive,
            tasks: vec![reader_task, probe_task],
        });
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Sends one JSON-RPC request and waits for its response's `result`.
    pub async fn request(&self, method: &str, params: Value) -> Result<Value> {
        let conn = self.connection().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let r = call(
            &conn.writer,
            &conn.pending,
            &conn.alive,
            id,
            method,
            params,
            self.request_timeout,
        )
        .await;
        if matches!(
            r,
            Err(Error::OvsdbDisconnected) | Err(Error::OvsdbTimeout(_))
        ) {
            conn.alive.store(false, Ordering::Release);
        }
        r
    }

    /// Runs a transaction on the Open_vSwitch database and returns the per-operation results;
    /// any operation error (or commit error) becomes [`Error::OvsdbTransaction`].
    pub async fn transact(&self, ops: Vec<Value>) -> Result<Vec<Value>> {
        let n = ops.len();
        let mut params = Vec::with_capacity(n.saturating_add(1));
        params.push(Value::String(DB.to_string()));
        params.extend(ops);
        let result = self.request("transact", Value::Array(params)).await?;
        let Value::Array(results) = result else {
            return Err(Error::OvsdbProtocol(format!(
                "transact result is not an array: {result}"
            )));
        };
        for r in &results {
            if let Some(e) = r.get("error").filter(|e| !e.is_null()) {
                return Err(Error::OvsdbTransaction {
                    error: e.as_str().unwrap_or("error").to_string(),
                    details: r
                        .get("details")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                });
            }
        }
        if results.len() < n {
            return Err(Error::OvsdbProtocol(format!(
                "transact returned {} results for {n} operations",
                results.len()
            )));
        }
        Ok(results)
    }
}

async fn call(
    writer: &Writer,
    pending: &Pending,
    alive: &AtomicBool,
    id: u64,
    method: &str,
    params: Value,
    timeout: Duration,
) -> Result<Value> {
    let (tx, rx) = oneshot::channel();
    lock(pending).insert(id, tx);
    // The reader may have died between the liveness check and the insert: it drains the map
    // when it exits, so a late insert would otherwise wait for the whole timeout.
    if !alive.load(Ordering::Acquire) {
        lock(pending).remove(&id);
        return Err(Error::OvsdbDisconnected);
    }
    let msg = json!({"method": method, "params": params, "id": id});
    let bytes = serde_json::to_vec(&msg).map_err(|e| Error::OvsdbProtocol(e.to_string()))?;
    let written = {
        let mut w = writer.lock().await;
        match w.write_all(&bytes).await {
            Ok(()) => w.flush().await,
            Err(e) => Err(e),
        }
    };
    if let Err(e) = written {
        lock(pending).remove(&id);
        debug!(error = %e, "OVSDB write failed");
        return Err(Error::OvsdbDisconnected);
    }
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(Error::OvsdbDisconnected),
        Err(_) => {
            lock(pending).remove(&id);
            Err(Error::OvsdbTimeout(timeout))
        }
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the map cannot leave it inconsistent (single insert/remove).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn read_loop(
    mut reader: Box<dyn AsyncRead + Send + Unpin>,
    writer: Writer,
    pending: Pending,
    alive: Arc<AtomicBool>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut chunk = vec![0u8; 64 << 10];
    'outer: loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                debug!(error = %e, "OVSDB read failed");
                break;
            }
        };
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        let mut consumed = 0usize;
        {
            let mut stream = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            loop {
                match stream.next() {
                    Some(Ok(v)) => {
                        consumed = stream.byte_offset();
                        dispatch(v, &writer, &pending).await;
                    }
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(e)) => {
                        warn!(error = %e, "OVSDB sent malformed JSON; dropping connection");
                        break 'outer;
                    }
                    None => {
                        consumed = buf.len();
                        break;
                    }
                }
            }
        }
        buf.drain(..consumed.min(buf.len()));
        if buf.len() > MAX_MESSAGE {
            warn!("OVSDB message exceeds {MAX_MESSAGE} bytes; dropping connection");
            break;
        }
    }
    alive.store(false, Ordering::Release);
    // Dropping the senders wakes every waiter with "disconnected".
    lock(&pending).clear();
}

async fn dispatch(v: Value, writer: &Writer, pending: &Pending) {
    let method = v.get("method").and_then(Value::as_str);
    match method {
        Some("echo") => {
            // Inactivity probe from the server: answering keeps the session open.
            let reply = json!({"id": v.get("id").cloned().unwrap_or(Value::Null),
                               "result": v.get("params").cloned().unwrap_or(json!([])),
                               "error": null});
            if let Ok(bytes) = serde_json::to_vec(&reply) {
                let mut w = writer.lock().await;
                let _ = w.write_all(&bytes).await;
            }
        }
        Some(_) => {} // notifications (update, locked, ...) are not subscribed to
        None => {
            let Some(id) = v.get("id").and_then(Value::as_u64) else {
                return;
            };
            let Some(tx) = lock(pending).remove(&id) else {
                return;
            };
            let r = match v.get("error").filter(|e| !e.is_null()) {
                Some(e) => Err(Error::OvsdbProtocol(e.to_string())),
                None => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
            };
            let _ = tx.send(r);
        }
    }
}

/// Sends `echo` when idle so a silently dead peer (TCP) is noticed before a real request
/// waits for its full timeout.
async fn probe_loop(
    writer: Writer,
    pending: Pending,
    alive: Arc<AtomicBool>,
    next_id: Arc<AtomicU64>,
    interval: Duration,
    timeout: Duration,
) {
    if interval.is_zero() {
        return;
    }
    loop {
        tokio::time::sleep(interval).await;
        if !alive.load(Ordering::Acquire) {
            return;
        }
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = call(
            &writer,
            &pending,
            &alive,
            id,
            "echo",
            json!(["fatbox"]),
            timeout,
        )
        .await
        {
            warn!(error = %e, "OVSDB echo probe failed; reconnecting on next request");
            alive.store(false, Ordering::Release);
            return;
        }
    }
}
