//! Glance v2 over HTTP: show, streamed download verified against the hash Glance recorded
//! (resumed with `Range` after a dropped connection), create + streamed upload, properties.

use crate::error::{io, Error, Result};
use crate::hash::Hasher;
use crate::keystone::Keystone;
use futures_util::StreamExt;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

/// What Glance says about an image (the fields we use; the rest, including custom
/// properties, stays in `extra`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageMeta {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    pub status: String,
    #[serde(default)]
    pub disk_format: Option<String>,
    #[serde(default)]
    pub container_format: Option<String>,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub checksum: Option<String>,
    #[serde(default)]
    pub os_hash_algo: Option<String>,
    #[serde(default)]
    pub os_hash_value: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ImageMeta {
    /// The digest to check downloads against: (algorithm, hex), the multihash first.
    pub fn expected_hash(&self) -> Option<(String, String)> {
        match (&self.os_hash_algo, &self.os_hash_value) {
            (Some(a), Some(v)) if !a.is_empty() && !v.is_empty() => {
                Some((a.clone(), v.to_ascii_lowercase()))
            }
            _ => self
                .checksum
                .as_ref()
                .filter(|c| !c.is_empty())
                .map(|c| ("md5".to_string(), c.to_ascii_lowercase())),
        }
    }

    /// A custom property as a string.
    pub fn property(&self, key: &str) -> Option<&str> {
        self.extra.get(key).and_then(Value::as_str)
    }
}

/// Fields of a new image (`POST /v2/images`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct NewImage {
    pub name: String,
    pub disk_format: String,
    pub container_format: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visibility: Option<String>,
    /// Custom properties (string values, as Glance stores them).
    #[serde(flatten)]
    pub properties: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DownloadReport {
    pub bytes: u64,
    pub seconds: f64,
    /// Algorithm the data was verified with; None when Glance recorded no hash.
    pub verified_with: Option<String>,
    pub hash: Option<String>,
    /// Times the transfer was resumed (or restarted) after a failure.
    pub retries: u32,
}

/// Retry with exponential backoff: `attempts` consecutive failures without progress.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    fn delay(&self, failures: u32) -> Duration {
        let f = self.first_delay.saturating_mul(1u32 << failures.min(16));
        f.min(self.max_delay)
    }
}

#[derive(Clone)]
pub struct GlanceClient {
    http: reqwest::Client,
    /// Base URL without the version, e.g. `http://127.0.0.1:9292`.
    endpoint: String,
    auth: Option<Arc<Keystone>>,
    pub retry: RetryPolicy,
}

fn http_err(what: impl Into<String>) -> impl FnOnce(reqwest::Error) -> Error {
    let what = what.into();
    move |source| Error::Http { what, source }
}

async fn status_err(what: &str, resp: Response) -> Error {
    let status = resp.status().as_u16();
    let mut body = resp.text().await.unwrap_or_default();
    body.truncate(512);
    Error::Status {
        what: what.to_string(),
        status,
        body: body.trim().to_string(),
    }
}

pub fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        // A stalled transfer counts as dropped and is resumed.
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("fatbox-image-bridge/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(http_err("building the HTTP client"))
}

impl GlanceClient {
    /// A client for a Glance endpoint (`http://host:9292`, with or without `/v2`).
    pub fn new(endpoint: &str, auth: Option<Arc<Keystone>>) -> Result<GlanceClient> {
        let mut e = endpoint.trim_end_matches('/').to_string();
        if let Some(s) = e.strip_suffix("/v2") {
            e = s.to_string();
        }
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(Error::Invalid(format!(
                "Glance endpoint {endpoint:?} is not an http(s) URL"
            )));
        }
        Ok(GlanceClient {
            http: http_client()?,
            endpoint: e,
            auth,
            retry: RetryPolicy::default(),
        })
    }

    /// A client whose endpoint comes from Keystone's catalog (service type `image`).
    pub async fn from_keystone(ks: Arc<Keystone>) -> Result<GlanceClient> {
        let ep = ks.endpoint("image").await?;
        GlanceClient::new(&ep, Some(ks))
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v2{path}", self.endpoint)
    }

    async fn request(&self, method: Method, path: &str) -> Result<RequestBuilder> {
        let mut rb = self.http.request(method, self.url(path));
        if let Some(ks) = &self.auth {
            rb = rb.header("X-Auth-Token", ks.token().await?);
        }
        Ok(rb)
    }

    /// Sends a request built by `build`, retrying transient failures and re-authenticating
    /// once on 401 (a token revoked before its expiry).
    async fn send(
        &self,
        what: &str,
        build: impl Fn(RequestBuilder) -> RequestBuilder,
        method: Method,
        path: &str,
    ) -> Result<Response> {
        let mut failures = 0;
        let mut reauthed = false;
        loop {
            let rb = build(self.request(method.clone(), path).await?);
            let r = rb.send().await.map_err(http_err(what));
            let err = match r {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && !reauthed => {
                    if let Some(ks) = &self.auth {
                        ks.invalidate().await;
                        reauthed = true;
                        continue;
                    }
                    status_err(what, resp).await
                }
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) if resp.status() == StatusCode::NOT_FOUND => {
                    return Err(status_err(what, resp).await)
                }
                Ok(resp) => status_err(what, resp).await,
                Err(e) => e,
            };
            if !err.transient() || failures + 1 >= self.retry.attempts {
                return Err(err);
            }
            tracing::warn!(what, error = %err, "retrying");
            tokio::time::sleep(self.retry.delay(failures)).await;
            failures += 1;
        }
    }

    pub async fn show(&self, id: &str) -> Result<ImageMeta> {
        check_id(id)?;
        let what = format!("GET image {id}");
        let resp = match self
            .send(&what, |r| r, Method::GET, &format!("/images/{id}"))
            .await
        {
            Err(Error::Status { status: 404, .. }) => {
                return Err(Error::NotFound { id: id.to_string() })
            }
            r => r?,
        };
        resp.json().await.map_err(http_err(what))
    }

    /// Streams the image's data into `dest` (created or truncated), hashing as it goes.
    /// A dropped connection is resumed from the last byte written (`Range`), or restarted
    /// when the server ignores the range. On any failure — a hash or size mismatch above
    /// all — `dest` is removed.
    pub async fn download(
        &self,
        meta: &ImageMeta,
        dest: &Path,
        progress: &(dyn Fn(u64, Option<u64>) + Send + Sync),
    ) -> Result<DownloadReport> {
        let r = self.download_inner(meta, dest, progress).await;
        if r.is_err() {
            let _ = tokio::fs::remove_file(dest).await;
        }
        r
    }

    async fn download_inner(
        &self,
        meta: &ImageMeta,
        dest: &Path,
        progress: &(dyn Fn(u64, Option<u64>) + Send + Sync),
    ) -> Result<DownloadReport> {
        let id = &meta.id;
        check_id(id)?;
        let start = Instant::now();
        let expected = meta.expected_hash();
        if expected.is_none() {
            tracing::warn!(image = %id, "Glance recorded no checksum: download not verified");
        }
        let new_hasher = || -> Result<Option<Hasher>> {
            expected.as_ref().map(|(a, _)| Hasher::new(a)).transpose()
        };
        let mut hasher = new_hasher()?;
        let mut file = tokio::fs::File::create(dest).await.map_err(io(dest))?;
        let mut offset: u64 = 0;
        let mut failures: u32 = 0;
        let mut retries: u32 = 0;
        let what = format!("download of image {id}");
        let path = format!("/images/{id}/file");
        loop {
            let mut rb = self.request(Method::GET, &path).await?;
            if offset > 0 {
                rb = rb.header(reqwest::header::RANGE, format!("bytes={offset}-"));
            }
            let attempt_start = offset;
            let outcome: Result<()> = async {
                let resp = rb.send().await.map_err(http_err(&what))?;
                match resp.status() {
                    StatusCode::OK => {
                        if offset > 0 {
                            tracing::info!(image = %id, offset, "server ignored Range: restarting");
                            file.set_len(0).await.map_err(io(dest))?;
                            file.seek(std::io::SeekFrom::Start(0))
                                .await
                                .map_err(io(dest))?;
                            offset = 0;
                            hasher = new_hasher()?;
                        }
                    }
                    StatusCode::PARTIAL_CONTENT => {
                        let cr = resp
                            .headers()
                            .get(reqwest::header::CONTENT_RANGE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        if !cr.starts_with(&format!("bytes {offset}-")) {
                            return Err(Error::Cache(format!(
                                "{what}: asked for bytes {offset}-, got Content-Range {cr:?}"
                            )));
                        }
                    }
                    StatusCode::RANGE_NOT_SATISFIABLE if Some(offset) == meta.size => {
                        return Ok(());
                    }
                    StatusCode::UNAUTHORIZED if self.auth.is_some() => {
                        if let Some(ks) = &self.auth {
                            ks.invalidate().await;
                        }
                        return Err(status_err(&what, resp).await);
                    }
                    StatusCode::NOT_FOUND | StatusCode::NO_CONTENT => {
                        return Err(Error::NotActive {
                            id: id.clone(),
                            status: format!("without data (HTTP {})", resp.status().as_u16()),
                        })
                    }
                    _ => return Err(status_err(&what, resp).await),
                }
                let mut body = resp.bytes_stream();
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.map_err(http_err(&what))?;
                    file.write_all(&chunk).await.map_err(io(dest))?;
                    if let Some(h) = hasher.as_mut() {
                        h.update(&chunk);
                    }
                    offset += chunk.len() as u64;
                    progress(offset, meta.size);
                }
                Ok(())
            }
            .await;
            match outcome {
                Ok(()) => break,
                Err(e) => {
                    let retryable = e.transient()
                        || matches!(&e, Error::Status { status: 401, .. } if self.auth.is_some());
                    if offset > attempt_start {
                        failures = 0;
                    }
                    if !retryable || failures + 1 >= self.retry.attempts {
                        return Err(e);
                    }
                    tracing::warn!(image = %id, offset, error = %e, "download interrupted; resuming");
                    tokio::time::sleep(self.retry.delay(failures)).await;
                    failures += 1;
                    retries += 1;
                }
            }
        }
        file.flush().await.map_err(io(dest))?;
        file.sync_all().await.map_err(io(dest))?;
        if let Some(size) = meta.size {
            if size != offset {
                return Err(Error::SizeMismatch {
                    id: id.clone(),
                    expected: size,
                    got: offset,
                });
            }
        }
        let (verified_with, hash) = match (expected, hasher) {
            (Some((algo, want)), Some(h)) => {
                let got = h.finish_hex();
                if got != want {
                    return Err(Error::HashMismatch {
                        id: id.clone(),
                        algo,
                        expected: want,
                        got,
                    });
                }
                (Some(algo), Some(got))
            }
            _ => (None, None),
        };
        Ok(DownloadReport {
            bytes: offset,
            seconds: start.elapsed().as_secs_f64(),
            verified_with,
            hash,
            retries,
        })
    }

    pub async fn create(&self, image: &NewImage) -> Result<ImageMeta> {
        let what = format!("create image {:?}", image.name);
        let resp = self
            .send(&what, |r| r.json(image), Method::POST, "/images")
            .await?;
        resp.json().await.map_err(http_err(what))
    }

    /// Uploads a file as the image's data, streamed (never whole in memory).
    pub async fn upload(&self, id: &str, file: &Path) -> Result<()> {
        check_id(id)?;
        let what = format!("upload of image {id}");
        let len = tokio::fs::metadata(file).await.map_err(io(file))?.len();
        // A streamed body cannot be replayed, so an upload is not retried here.
        let f = tokio::fs::File::open(file).await.map_err(io(file))?;
        let body =
            reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(f, 1 << 20));
        let resp = self
            .request(Method::PUT, &format!("/images/{id}/file"))
            .await?
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body)
            .send()
            .await
            .map_err(http_err(&what))?;
        if !resp.status().is_success() {
            return Err(status_err(&what, resp).await);
        }
        Ok(())
    }

    /// Adds or replaces custom properties (JSON patch `add`, which replaces existing keys).
    pub async fn set_properties(&self, id: &str, props: &Map<String, Value>) -> Result<ImageMeta> {
        check_id(id)?;
        let ops: Vec<Value> = props
            .iter()
            .map(|(k, v)| serde_json::json!({"op": "add", "path": format!("/{k}"), "value": v}))
            .collect();
        self.patch(id, &ops).await
    }

    /// Applies a JSON patch (`add`/`replace`/`remove` operations) to an image.
    pub async fn patch(&self, id: &str, ops: &[Value]) -> Result<ImageMeta> {
        check_id(id)?;
        let body = serde_json::to_vec(ops).map_err(|e| Error::Invalid(e.to_string()))?;
        let what = format!("PATCH image {id}");
        let resp = self
            .send(
                &what,
                |r| {
                    r.header(
                        reqwest::header::CONTENT_TYPE,
                        "application/openstack-images-v2.1-json-patch",
                    )
                    .body(body.clone())
                },
                Method::PATCH,
                &format!("/images/{id}"),
            )
            .await?;
        resp.json().await.map_err(http_err(what))
    }

    pub async fn delete(&self, id: &str) -> Result<()> {
        check_id(id)?;
        let what = format!("DELETE image {id}");
        self.send(&what, |r| r, Method::DELETE, &format!("/images/{id}"))
            .await?;
        Ok(())
    }

    /// Polls until the image is active (uploads are processed asynchronously on some
    /// stores), failing when it turns killed/deleted or the deadline passes.
    pub async fn wait_active(&self, id: &str, timeout: Duration) -> Result<ImageMeta> {
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_millis(20);
        loop {
            let m = self.show(id).await?;
            match m.status.as_str() {
                "active" => return Ok(m),
                "killed" | "deleted" | "pending_delete" | "deactivated" => {
                    return Err(Error::NotActive {
                        id: id.to_string(),
                        status: m.status,
                    })
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(Error::NotActive {
                    id: id.to_string(),
                    status: m.status,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }
}

/// Glance ids are UUIDs; anything else would be spliced into a URL path.
pub fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("Glance image id {id:?}")))
    }
}
