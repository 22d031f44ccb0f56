//! The local image store: one OCI layout (ref name = image name) and its layers unpacked
//! once each as overlayfs lower dirs.

use crate::config::Config;
use crate::error::{io, Error, Result};
use guestfs_tools::block::OpenOptions;
use guestfs_tools::convert::{convert, ConvertOptions};
use guestfs_tools::guest::Guest;
use guestfs_tools::oci::{self, Layout, UnpackMode};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub name: String,
    pub manifest_digest: String,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
}

/// Serialises writers of index.json (imports tag into one shared layout).
fn layout_lock() -> &'static Mutex<()> {
    static L: OnceLock<Mutex<()>> = OnceLock::new();
    L.get_or_init(|| Mutex::new(()))
}

/// One lock per layer digest, so a layer is unpacked once however many spawns want it.
fn layer_lock(digest: &str) -> Arc<Mutex<()>> {
    static M: OnceLock<Mutex<HashMap<String, Arc<Mutex<()>>>>> = OnceLock::new();
    let map = M.get_or_init(|| Mutex::new(HashMap::new()));
    let mut g = map.lock().unwrap_or_else(|p| p.into_inner());
    g.entry(digest.to_string()).or_default().clone()
}

pub fn validate_image_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "image name {name:?}: use letters, digits, '-', '_', '.', ':'"
        )))
    }
}

/// Converts a VM disk image into the store under `name` and unpacks its layers.
pub fn import(cfg: &Config, file: &Path, name: &str) -> Result<ImageInfo> {
    validate_image_name(name)?;
    if !file.is_file() {
        return Err(Error::Invalid(format!("{}: no such file", file.display())));
    }
    let guest = Guest::open(file, &OpenOptions::default())?;
    // Convert into a private layout first: the shared index is touched only under the lock.
    let staging_parent = cfg.state_dir.join("tmp");
    std::fs::create_dir_all(&staging_parent).map_err(io(&staging_parent))?;
    let staging = tempfile::Builder::new()
        .prefix("import-")
        .tempdir_in(&staging_parent)
        .map_err(io(&staging_parent))?;
    let opts = ConvertOptions {
        name: name.to_string(),
        // The store is local: compressing would cost CPU on import and again on unpack.
        compression: oci::Compression::None,
        ..ConvertOptions::default()
    };
    let report = convert(&guest, staging.path(), &opts, &mut |_| {})?;
    tracing::info!(image = name, seconds = report.seconds, "converted");
    let src = Layout::open(staging.path())?;
    let (desc, manifest) = src.manifest(Some(name))?;
    let images = cfg.images_dir();
    {
        let _g = layout_lock().lock().unwrap_or_else(|p| p.into_inner());
        let dst = Layout::create(&images)?;
        // Blobs are content-addressed: moving them is safe even if they already exist.
        let rd = std::fs::read_dir(src.blobs()).map_err(io(src.blobs()))?;
        for e in rd {
            let e = e.map_err(io(src.blobs()))?;
            let target = dst.blobs().join(e.file_name());
            if !target.exists() {
                std::fs::rename(e.path(), &target).map_err(io(&target))?;
            }
        }
        dst.tag(desc.clone(), name)?;
    }
    let layers: Vec<String> = manifest
        .layers()
        .iter()
        .map(|l| l.digest().to_string())
        .collect();
    for l in &layers {
        ensure_layer(cfg, l)?;
    }
    Ok(ImageInfo {
        name: name.to_string(),
        manifest_digest: desc.digest().to_string(),
        layers,
    })
}

pub fn lookup(cfg: &Config, name: &str) -> Result<ImageInfo> {
    validate_image_name(name)?;
    let layout = Layout::open(&cfg.images_dir())
        .map_err(|_| Error::NotFound(format!("image {name:?} (no image imported yet)")))?;
    let (desc, manifest) = layout.manifest(Some(name)).map_err(|e| match e {
        guestfs_tools::Error::NotFound(_) => Error::NotFound(format!("image {name:?}")),
        e => Error::Image(e),
    })?;
    Ok(ImageInfo {
        name: name.to_string(),
        manifest_digest: desc.digest().to_string(),
        layers: manifest
            .layers()
            .iter()
            .map(|l| l.digest().to_string())
            .collect(),
    })
}

pub fn list(cfg: &Config) -> Result<Vec<ImageInfo>> {
    let Ok(layout) = Layout::open(&cfg.images_dir()) else {
        return Ok(Vec::new());
    };
    let index = layout.index()?;
    let mut out = Vec::new();
    for d in index.manifests() {
        if let Some(n) = oci::ref_name(d) {
            out.push(lookup(cfg, n)?);
        }
    }
    Ok(out)
}

/// `<state_dir>/layers/<hex>`: the unpacked lower dir of a layer digest.
pub fn layer_dir(cfg: &Config, digest: &str) -> Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| Error::Invalid(format!("invalid layer digest {digest:?}")))?;
    Ok(cfg.layers_dir().join(hex))
}

/// Unpacks a layer blob once (temp dir + rename), verifying its digest.
pub fn ensure_layer(cfg: &Config, digest: &str) -> Result<PathBuf> {
    let dir = layer_dir(cfg, digest)?;
    let lock = layer_lock(digest);
    let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
    if dir.is_dir() {
        return Ok(dir);
    }
    let parent = cfg.layers_dir();
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(&parent)
        .map_err(io(&parent))?;
    let layout = Layout::open(&cfg.images_dir())?;
    let mut r = layout.open_blob(digest)?;
    let stats = oci::unpack_layer(&mut r, tmp.path(), UnpackMode::Overlay)?;
    r.verify()?;
    let tmp_path = tmp.keep();
    std::fs::rename(&tmp_path, &dir).map_err(io(&dir))?;
    tracing::info!(digest, entries = stats.entries, "layer unpacked");
    Ok(dir)
}
