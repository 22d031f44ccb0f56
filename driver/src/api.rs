//! The REST API on the unix socket (routes of DESIGN.md's Nova table).

use crate::error::Error;
use crate::images;
use crate::ops::{CreateRequest, Manager, RebuildRequest, RescueRequest, ResizeRequest};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

type Mgr = Arc<Manager>;

pub struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            Error::Invalid(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::Disabled(_) => StatusCode::NOT_IMPLEMENTED,
            Error::Unsupported(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Image(guestfs_tools::Error::NotFound(_)) => StatusCode::NOT_FOUND,
            Error::Image(
                guestfs_tools::Error::Corrupt { .. }
                | guestfs_tools::Error::Unsupported(_)
                | guestfs_tools::Error::Refused(_)
                | guestfs_tools::Error::Limit(_),
            ) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Network(n) => network_status(n),
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(json!({"error": self.0.to_string()}))).into_response()
    }
}

fn network_status(e: &crate::network::Error) -> StatusCode {
    use crate::network::Error as N;
    match e {
        N::InvalidNic { .. }
        | N::InvalidMac(_)
        | N::InvalidVlan(_)
        | N::InvalidMtu { .. }
        | N::InvalidPortId(_)
        | N::InvalidIndex(_)
        | N::UnknownBridge(_) => StatusCode::BAD_REQUEST,
        N::DuplicatePort { .. } => StatusCode::CONFLICT,
        N::OvsdbConnect { .. } | N::OvsdbDisconnected | N::OvsdbTimeout(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(Error::Other(format!("task failed: {e}"))))?
        .map_err(ApiError)
}

pub fn router(m: Mgr) -> Router {
    Router::new()
        .route("/v1/instances", get(list).post(create))
        .route("/v1/instances/{id}", get(show).delete(delete))
        .route("/v1/instances/{id}/actions", post(action))
        .route("/v1/instances/{id}/console", get(console))
        .route("/v1/instances/{id}/export", post(export_instance))
        .route(
            "/v1/instances/{id}/console/attach",
            get(crate::console::attach),
        )
        .route(
            "/v1/instances/{id}/serial-console",
            post(crate::console::serial_console),
        )
        .route("/v1/instances/{id}/snapshot", post(snapshot))
        .route(
            "/v1/instances/{id}/interfaces",
            get(list_interfaces).post(attach_interface),
        )
        .route(
            "/v1/instances/{id}/interfaces/{port_id}",
            axum::routing::delete(detach_interface),
        )
        .route("/v1/host", get(host))
        .route("/v1/images", get(list_images).post(import_image))
        .route("/v1/images/pull", post(pull_image))
        .route("/v1/images/pull/{id}", get(pull_status))
        .route("/v1/images/fsck", post(fsck_images))
        .with_state(m)
}

async fn list(State(m): State<Mgr>) -> Json<Value> {
    Json(Value::Array(m.list().iter().map(|i| i.view()).collect()))
}

async fn show(State(m): State<Mgr>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let inst = m.get(&id)?;
    let mut v = inst.view();
    if let Some(o) = v.as_object_mut() {
        o.insert("cgroups".into(), json!(m.cgroups(&inst.uuid).dirs));
        if let Some(sec) = o.get_mut("security").and_then(Value::as_object_mut) {
            // What `fatbox exec` must apply to match init.
            sec.insert(
                "allow_perf_event".into(),
                json!(m.cfg.security.allow_perf_event),
            );
        }
    }
    Ok(Json(v))
}

/// Records the instance and boots it in the background: the answer (202, state building)
/// comes at once; clients poll GET until running or error.
async fn create(
    State(m): State<Mgr>,
    Json(req): Json<CreateRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let m2 = m.clone();
    let inst = blocking(move || m2.create(req)).await?;
    let uuid = inst.uuid.clone();
    let m3 = m.clone();
    tokio::task::spawn_blocking(move || {
        let t = std::time::Instant::now();
        match m3.build(&uuid) {
            Ok(_) => tracing::info!(
                uuid,
                ms = t.elapsed().as_millis() as u64,
                "instance running"
            ),
            Err(e) => tracing::warn!(uuid, error = %e, "instance build failed"),
        }
    });
    Ok((StatusCode::ACCEPTED, Json(inst.view())))
}

async fn delete(State(m): State<Mgr>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    blocking(move || m.delete(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct ActionReq {
    action: String,
    #[serde(default)]
    timeout: Option<u64>,
    /// rebuild, rescue: the image (default: the instance's).
    #[serde(default)]
    image: Option<String>,
    /// set_password: the new password (stdin of the guest's chpasswd only) and the user
    /// (default root).
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    user: Option<String>,
    /// resize: the fields to change.
    #[serde(flatten)]
    resize: ResizeRequest,
}

async fn action(
    State(m): State<Mgr>,
    Path(id): Path<String>,
    Json(req): Json<ActionReq>,
) -> ApiResult<Json<Value>> {
    let inst = blocking(move || match req.action.as_str() {
        "stop" | "power_off" => m.stop(&id, req.timeout.map(Duration::from_secs)),
        "start" | "power_on" => m.start(&id),
        "reboot" => m.reboot(&id, false),
        "reboot_hard" | "hard_reboot" => m.reboot(&id, true),
        "pause" => m.pause(&id, true),
        "unpause" => m.pause(&id, false),
        "suspend" => m.suspend(&id),
        "resume" => m.resume(&id),
        "resize" => m.resize(&id, &req.resize),
        "rebuild" => m.rebuild(&id, &RebuildRequest { image: req.image }),
        "rescue" => m.rescue(&id, &RescueRequest { image: req.image }),
        "unrescue" => m.unrescue(&id),
        "set_password" => match &req.password {
            Some(p) => m.set_password(&id, req.user.as_deref(), p),
            None => Err(Error::Invalid("set_password needs a password".into())),
        },
        other => Err(Error::Invalid(format!(
            "unknown action {other:?} (stop, start, reboot, reboot_hard, pause, unpause, \
             suspend, resume, resize, rebuild, rescue, unrescue, set_password)"
        ))),
    })
    .await?;
    Ok(Json(inst.view()))
}

/// Writes the instance as a flat VM disk at a host path (blocking until done).
async fn export_instance(
    State(m): State<Mgr>,
    Path(id): Path<String>,
    Json(req): Json<crate::ops::ExportRequest>,
) -> ApiResult<Json<Value>> {
    let rep = blocking(move || m.export(&id, &req)).await?;
    Ok(Json(json!(rep)))
}

/// Snapshot to Glance; answers when the image is active (Nova's snapshot waits for it too).
async fn snapshot(
    State(m): State<Mgr>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let req: crate::ops::SnapshotRequest = if body.iter().all(u8::is_ascii_whitespace) {
        Default::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError(Error::Invalid(format!("snapshot request: {e}"))))?
    };
    let r = blocking(move || m.snapshot(&id, &req)).await?;
    Ok(Json(json!(r)))
}

async fn list_interfaces(State(m): State<Mgr>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let nics = m.interfaces(&id)?;
    Ok(Json(Value::Array(nics.iter().map(|n| n.view()).collect())))
}

/// Body: `{"nic": "vlan=..,ip=.."}`, `{"nic": {VIF object}}`, or the VIF object itself.
async fn attach_interface(
    State(m): State<Mgr>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let nic = match body.get("nic") {
        Some(n) => n.clone(),
        None => body,
    };
    let n = blocking(move || m.attach_interface(&id, &nic)).await?;
    Ok((StatusCode::CREATED, Json(n.view())))
}

async fn detach_interface(
    State(m): State<Mgr>,
    Path((id, port_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    blocking(move || m.detach_interface(&id, &port_id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct ConsoleQuery {
    #[serde(default)]
    bytes: Option<u64>,
}

async fn console(
    State(m): State<Mgr>,
    Path(id): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> ApiResult<Vec<u8>> {
    let n = q.bytes.unwrap_or(64 * 1024);
    blocking(move || m.console(&id, n)).await
}

async fn host(State(m): State<Mgr>) -> Json<Value> {
    let vcpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let disk = nix::sys::statvfs::statvfs(&m.cfg.state_dir)
        .map(|s| {
            (
                s.blocks().saturating_mul(s.fragment_size()) >> 30,
                s.blocks_available().saturating_mul(s.fragment_size()) >> 30,
            )
        })
        .unwrap_or((0, 0));
    let list = m.list();
    Json(json!({
        "hostname": nix::unistd::gethostname().ok().map(|h| h.to_string_lossy().into_owned()),
        "vcpus": vcpus,
        "memory_mb": mem_kb / 1024,
        "disk_gb": disk.0,
        "disk_available_gb": disk.1,
        "instances": list.len(),
        "vcpus_used": list.iter().map(|i| u64::from(i.flavor.vcpus)).sum::<u64>(),
        "memory_mb_used": list.iter().map(|i| i.flavor.memory_mb).sum::<u64>(),
        "hypervisor_type": "fatbox",
    }))
}

async fn list_images(State(m): State<Mgr>) -> ApiResult<Json<Value>> {
    let cfg = m.cfg.clone();
    let v = blocking(move || {
        let mut v: Vec<Value> = images::list(&cfg)?.iter().map(|i| json!(i)).collect();
        for g in crate::glance::list(&cfg)? {
            v.push(json!({
                "name": g.glance_id,
                "glance_id": g.glance_id,
                "source": "glance",
                "glance_name": g.name,
                "manifest_digest": g.manifest_digest,
                "layers": g.layer_digests(),
                "disk_format": g.disk_format,
                "cached_at": g.cached_at,
            }));
        }
        Ok(v)
    })
    .await?;
    Ok(Json(Value::Array(v)))
}

#[derive(Deserialize)]
struct PullReq {
    glance_id: String,
}

/// Starts (or joins) a background pull; poll GET /v1/images/pull/{id} for progress.
async fn pull_image(
    State(m): State<Mgr>,
    Json(req): Json<PullReq>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let cfg = m.cfg.clone();
    let job = blocking(move || crate::glance::start_pull(&cfg, &req.glance_id)).await?;
    Ok((StatusCode::ACCEPTED, Json(json!(job))))
}

async fn pull_status(Path(id): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(json!(crate::glance::job(&id)?)))
}

async fn fsck_images(State(m): State<Mgr>) -> ApiResult<Json<Value>> {
    let cfg = m.cfg.clone();
    let r = blocking(move || crate::glance::fsck(&cfg)).await?;
    Ok(Json(json!({"clean": r.clean(), "report": r})))
}

#[derive(Deserialize)]
struct ImportReq {
    file: Option<std::path::PathBuf>,
    name: Option<String>,
    /// Pre-cache a Glance image instead (what Nova's cache_image sends): answers 202 with
    /// the pull job, as POST /v1/images/pull does.
    glance_id: Option<String>,
}

async fn import_image(
    State(m): State<Mgr>,
    Json(req): Json<ImportReq>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let cfg = m.cfg.clone();
    if let Some(id) = req.glance_id {
        let job = blocking(move || crate::glance::start_pull(&cfg, &id)).await?;
        return Ok((StatusCode::ACCEPTED, Json(json!(job))));
    }
    let (Some(file), Some(name)) = (req.file, req.name) else {
        return Err(ApiError(Error::Invalid(
            "POST /v1/images needs {\"file\", \"name\"} or {\"glance_id\"}".into(),
        )));
    };
    let info = blocking(move || images::import(&cfg, &file, &name)).await?;
    Ok((StatusCode::CREATED, Json(json!(info))))
}

/// Serves until the future returned by `shutdown` completes.
pub async fn serve(
    m: Mgr,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let m2 = m.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let m3 = m2.clone();
            let _ = tokio::task::spawn_blocking(move || m3.reconcile()).await;
        }
    });
    axum::serve(listener, router(m))
        .with_graceful_shutdown(shutdown)
        .await
}
