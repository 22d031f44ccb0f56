//! Images from Glance through image-bridge: `ensure_image` (download, verify, convert once,
//! cache), pins for the instances that use them, pull jobs with progress for the API/CLI.
//!
//! The bridge runs on its own small tokio runtime: its callers are fatboxd's blocking
//! threads (instance builds), which wait on a channel instead of nesting runtimes.

use crate::config::{Config, KeystoneSection};
use crate::error::{Error, Result};
use image_bridge::cache::ProgressFn;
use image_bridge::keystone::{Credentials, Keystone, KeystoneConfig};
use image_bridge::{CacheOptions, CachedImage, GlanceClient, LayerCache, Progress};
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

struct Bridge {
    rt: tokio::runtime::Runtime,
    cache: Arc<LayerCache>,
}

fn bridge_slot() -> &'static Mutex<Option<Arc<Bridge>>> {
    static B: OnceLock<Mutex<Option<Arc<Bridge>>>> = OnceLock::new();
    B.get_or_init(|| Mutex::new(None))
}

fn ib(e: image_bridge::Error) -> Error {
    use image_bridge::Error as E;
    match e {
        E::NotFound { .. } => Error::NotFound(e.to_string()),
        E::Invalid(m) => Error::Invalid(m),
        E::Convert(g) => Error::Image(g),
        E::HashMismatch { .. }
        | E::SizeMismatch { .. }
        | E::Unsupported(_)
        | E::NotActive { .. } => Error::Image(guestfs_tools::Error::Refused(e.to_string())),
        e => Error::Other(format!("glance: {e}")),
    }
}

/// True when Glance is configured (an endpoint or Keystone).
pub fn configured(cfg: &Config) -> bool {
    cfg.glance.endpoint.is_some() || cfg.keystone.auth_url.is_some()
}

/// Glance ids are UUIDs; local image names that look like one are taken as local first.
pub fn looks_like_id(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok() && s.len() == 36
}

fn keystone_config(k: &KeystoneSection) -> Result<Option<KeystoneConfig>> {
    let Some(auth_url) = &k.auth_url else {
        return Ok(None);
    };
    let credentials = match (
        &k.application_credential_id,
        &k.application_credential_secret,
        &k.username,
        &k.password,
    ) {
        (Some(id), Some(secret), _, _) => Credentials::ApplicationCredential {
            id: id.clone(),
            secret: secret.clone(),
        },
        (_, _, Some(u), Some(p)) => Credentials::Password {
            username: u.clone(),
            password: p.clone(),
            user_domain_name: k
                .user_domain_name
                .clone()
                .unwrap_or_else(|| "Default".into()),
            project_name: k.project_name.clone().ok_or_else(|| {
                Error::Config("[keystone] password auth needs project_name".into())
            })?,
            project_domain_name: k
                .project_domain_name
                .clone()
                .unwrap_or_else(|| "Default".into()),
        },
        _ => return Err(Error::Config(
            "[keystone] needs username+password+project_name or application_credential_id+_secret"
                .into(),
        )),
    };
    Ok(Some(KeystoneConfig {
        auth_url: auth_url.clone(),
        credentials,
        region: k.region.clone(),
        interface: k.interface.clone().unwrap_or_else(|| "public".into()),
    }))
}

fn bridge(cfg: &Config) -> Result<Arc<Bridge>> {
    let mut g = bridge_slot().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = g.as_ref() {
        return Ok(b.clone());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("image-bridge")
        .enable_all()
        .build()
        .map_err(|e| Error::Other(format!("image-bridge runtime: {e}")))?;
    let ks = keystone_config(&cfg.keystone)?
        .map(|c| Keystone::new(c).map_err(ib))
        .transpose()?
        .map(Arc::new);
    let glance = match (&cfg.glance.endpoint, ks) {
        (Some(ep), ks) => Some(GlanceClient::new(ep, ks).map_err(ib)?),
        (None, Some(ks)) => {
            let (tx, rx) = std::sync::mpsc::channel();
            rt.spawn(async move {
                let _ = tx.send(GlanceClient::from_keystone(ks).await);
            });
            Some(
                rx.recv()
                    .map_err(|_| Error::Other("Keystone catalog lookup ended".into()))?
                    .map_err(ib)?,
            )
        }
        (None, None) => None,
    };
    let mut opts = CacheOptions::new(cfg.glance_cache_dir());
    opts.max_bytes = cfg
        .glance
        .cache_max_gib
        .map(|g| (g * (1u64 << 30) as f64) as u64);
    let cache = Arc::new(LayerCache::open(opts, glance).map_err(ib)?);
    let b = Arc::new(Bridge { rt, cache });
    *g = Some(b.clone());
    Ok(b)
}

/// The cache (opened once; its start-up removes what crashed fills left).
pub fn cache(cfg: &Config) -> Result<Arc<LayerCache>> {
    Ok(bridge(cfg)?.cache.clone())
}

/// Downloads and converts the image unless cached; blocking (call from a blocking thread).
pub fn ensure_image(cfg: &Config, id: &str, progress: Option<ProgressFn>) -> Result<CachedImage> {
    let b = bridge(cfg)?;
    let cache = b.cache.clone();
    let id = id.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    b.rt.spawn(async move {
        let _ = tx.send(cache.ensure_image(&id, progress).await);
    });
    rx.recv()
        .map_err(|_| Error::Other("image-bridge task ended without an answer".into()))?
        .map_err(ib)
}

/// ensure_image + pin for an instance; retried once if an eviction slipped in between.
pub fn ensure_pinned(cfg: &Config, id: &str, owner: &str) -> Result<CachedImage> {
    for _ in 0..2 {
        tracked(cfg, id)?;
        match cache(cfg)?.pin(owner, id) {
            Ok(img) => return Ok(img),
            Err(image_bridge::Error::Cache(m)) => tracing::warn!(image = id, "{m}; again"),
            Err(e) => return Err(ib(e)),
        }
    }
    Err(Error::Other(format!(
        "image {id} evicted twice while pinning"
    )))
}

/// ensure_image recorded as a pull job (running → done/error), so the API shows the
/// progress of a build's fetch as well as of an explicit pull.
fn tracked(cfg: &Config, id: &str) -> Result<CachedImage> {
    set_job(id, |j| {
        j.state = "running".into();
        j.error = None;
        j.image = None;
        j.progress = Progress {
            phase: "queued".into(),
            ..Progress::default()
        };
    });
    let r = ensure_image(cfg, id, Some(job_progress(id)));
    set_job(id, |j| match &r {
        Ok(img) => {
            j.state = "done".into();
            j.image = Some(img.clone());
        }
        Err(e) => {
            j.state = "error".into();
            j.error = Some(e.to_string());
        }
    });
    r
}

pub fn unpin(cfg: &Config, owner: &str) -> Result<()> {
    if !configured(cfg) && !cfg.glance_cache_dir().join("pins").is_dir() {
        return Ok(());
    }
    cache(cfg)?.unpin(owner).map_err(ib)
}

/// The lower dir of a layer: the Glance cache's when it has it.
pub fn cached_layer_dir(cfg: &Config, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let d = cfg.glance_cache_dir().join("layers").join(hex);
    d.is_dir().then_some(d)
}

/// A pull as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PullJob {
    pub id: String,
    /// running, done, error
    pub state: String,
    pub progress: Progress,
    pub error: Option<String>,
    pub image: Option<CachedImage>,
}

fn jobs() -> &'static Mutex<HashMap<String, PullJob>> {
    static J: OnceLock<Mutex<HashMap<String, PullJob>>> = OnceLock::new();
    J.get_or_init(|| Mutex::new(HashMap::new()))
}

fn job_progress(id: &str) -> ProgressFn {
    let id = id.to_string();
    Arc::new(move |p: Progress| {
        let mut g = jobs().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(j) = g.get_mut(&id) {
            j.progress = p;
        }
    })
}

fn set_job(id: &str, f: impl FnOnce(&mut PullJob)) {
    let mut g = jobs().lock().unwrap_or_else(|e| e.into_inner());
    let j = g.entry(id.to_string()).or_insert_with(|| PullJob {
        id: id.to_string(),
        state: "running".into(),
        progress: Progress::default(),
        error: None,
        image: None,
    });
    f(j);
}

/// Starts a pull in the background (joining one that runs already); returns its job.
pub fn start_pull(cfg: &Config, id: &str) -> Result<PullJob> {
    if !configured(cfg) {
        return Err(Error::Invalid(
            "no Glance configured ([glance] endpoint or [keystone])".into(),
        ));
    }
    image_bridge::glance::check_id(id).map_err(ib)?;
    {
        let g = jobs().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(j) = g.get(id).filter(|j| j.state == "running") {
            return Ok(j.clone());
        }
    }
    let cfg = cfg.clone();
    let idc = id.to_string();
    // Marked running before the answer, so the first poll never finds no job.
    set_job(id, |j| {
        j.state = "running".into();
        j.error = None;
        j.progress = Progress {
            phase: "queued".into(),
            ..Progress::default()
        };
    });
    std::thread::Builder::new()
        .name("glance-pull".into())
        .spawn(move || {
            if let Err(e) = tracked(&cfg, &idc) {
                tracing::warn!(image = %idc, error = %e, "pull failed");
            }
        })
        .map_err(|e| Error::Other(format!("spawning the pull: {e}")))?;
    job(id)
}

pub fn job(id: &str) -> Result<PullJob> {
    let g = jobs().lock().unwrap_or_else(|e| e.into_inner());
    g.get(id)
        .cloned()
        .ok_or_else(|| Error::NotFound(format!("no pull of image {id}")))
}

pub fn list(cfg: &Config) -> Result<Vec<CachedImage>> {
    if !cfg.glance_cache_dir().join("images").is_dir() {
        return Ok(Vec::new());
    }
    cache(cfg)?.list().map_err(ib)
}

pub fn fsck(cfg: &Config) -> Result<image_bridge::cache::FsckReport> {
    cache(cfg)?.fsck().map_err(ib)
}

/// Uploads a snapshot layer to Glance (image_bridge::snapshot::publish); blocking.
pub fn publish(
    cfg: &Config,
    req: &image_bridge::snapshot::PublishRequest,
    layer: &image_bridge::snapshot::LayerBuild,
) -> Result<image_bridge::glance::ImageMeta> {
    let b = bridge(cfg)?;
    let glance = b
        .cache
        .glance()
        .cloned()
        .ok_or_else(|| Error::Conflict("no Glance configured".into()))?;
    let (req, layer) = (req.clone(), layer.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    b.rt.spawn(async move {
        let _ = tx.send(image_bridge::snapshot::publish(&glance, &req, &layer).await);
    });
    rx.recv()
        .map_err(|_| Error::Other("snapshot upload task ended without an answer".into()))?
        .map_err(ib)
}
