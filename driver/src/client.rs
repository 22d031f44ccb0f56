//! A minimal HTTP/1 client over the unix socket, for the `fatbox` CLI and the tests.

use crate::error::{Error, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};

pub struct Client {
    socket: PathBuf,
}

pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::Other(format!("invalid JSON from fatboxd: {e}")))
    }
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
    /// The API's error message, or the body.
    pub fn error(&self) -> String {
        self.json()
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Reply> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| {
                Error::Other(format!(
                    "cannot reach fatboxd at {}: {e} (is fatboxd running? --socket or FATBOX_SOCKET selects another socket)",
                    self.socket.display()
                ))
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Error::Other(format!("handshake: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let data = match body {
            Some(v) => serde_json::to_vec(v).map_err(|e| Error::Other(e.to_string()))?,
            None => Vec::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "fatboxd")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(data)))
            .map_err(|e| Error::Other(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Error::Other(format!("{method} {path}: {e}")))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Error::Other(format!("reading reply: {e}")))?
            .to_bytes()
            .to_vec();
        Ok(Reply { status, body })
    }
}

/// A console attached through fatboxd's WebSocket.
pub type ConsoleStream = tokio_tungstenite::WebSocketStream<tokio::net::UnixStream>;

impl Client {
    /// `GET /v1/instances/{id}/console/attach` upgraded to a WebSocket; `tail` bytes of the
    /// log come first. An HTTP error (unknown instance, powered off) is returned as such.
    pub async fn attach_console(
        &self,
        id: &str,
        tail: u64,
        readonly: bool,
    ) -> Result<ConsoleStream> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| {
                Error::Other(format!(
                    "cannot reach fatboxd at {}: {e}",
                    self.socket.display()
                ))
            })?;
        let url = format!(
            "ws://fatboxd/v1/instances/{id}/console/attach?tail={tail}&readonly={readonly}"
        );
        match tokio_tungstenite::client_async(url, stream).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let reply = Reply {
                    status: resp.status().as_u16(),
                    body: resp.body().clone().unwrap_or_default(),
                };
                Err(Error::Other(format!(
                    "{} ({})",
                    reply.error(),
                    reply.status
                )))
            }
            Err(e) => Err(Error::Other(format!("console attach: {e}"))),
        }
    }
}
