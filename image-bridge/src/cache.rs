//! The layer cache: Glance images turned into OCI layers and unpacked lower dirs, once.
//!
//! ```text
//! <dir>/oci/                 OCI image layout (blobs/sha256/*, index.json; ref "glance-<id>")
//! <dir>/layers/<hex>/        each layer unpacked once (overlay whiteouts), shared by images
//! <dir>/images/<id>.json     the record of a cached image: written last, it is the commit
//!                            point; its mtime is the LRU clock
//! <dir>/pins/<owner>.json    layers an owner (an instance) uses: never evicted
//! <dir>/tmp/w-*/             work dirs (download, conversion, unpack), each locked by its
//!                            owner; stale ones (owner dead) are removed at open
//! <dir>/locks/<id>.lock      one filler per image across processes
//! <dir>/cache.lock           commits, eviction, GC and fsck exclude each other
//! ```
//!
//! Heavy work happens in a private work dir; a commit only renames (blobs, layer dirs) and
//! writes small files atomically, then the record. A kill -9 at any point leaves either no
//! record (and orphans that the next open's GC removes) or a complete image.

use crate::error::{io, Error, Result};
use crate::glance::{check_id, GlanceClient, ImageMeta};
use crate::lock::FileLock;
use guestfs_tools::block::OpenOptions;
use guestfs_tools::convert::{convert, ConvertOptions};
use guestfs_tools::guest::Guest;
use guestfs_tools::oci::{self, Layout, UnpackMode};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

const REF_PREFIX: &str = "glance-";

/// What a conversion or a docker import left in the work layout: the manifest, the config
/// digest and the layers (digest, blob size), bottom first.
type Filled = (oci_spec::image::Descriptor, String, Vec<(String, u64)>);

#[derive(Debug, Clone)]
pub struct CacheOptions {
    pub dir: PathBuf,
    /// Size cap in bytes (blobs + unpacked layers); None = unbounded.
    pub max_bytes: Option<u64>,
    /// zstd level and threads of the layer blobs.
    pub level: i32,
    pub threads: u32,
}

impl CacheOptions {
    pub fn new(dir: impl Into<PathBuf>) -> CacheOptions {
        CacheOptions {
            dir: dir.into(),
            max_bytes: None,
            level: 1,
            threads: 2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedLayer {
    pub digest: String,
    /// Compressed blob size.
    pub size: u64,
    /// Data bytes of the unpacked dir.
    pub unpacked_bytes: u64,
}

/// The record of one cached image (`images/<id>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedImage {
    pub glance_id: String,
    pub name: Option<String>,
    pub manifest_digest: String,
    pub config_digest: String,
    /// Bottom first.
    pub layers: Vec<CachedLayer>,
    pub disk_format: String,
    /// Glance's container_format ("docker": a docker save tarball imported as it is).
    #[serde(default)]
    pub container_format: Option<String>,
    pub source_size: u64,
    pub hash_algo: Option<String>,
    pub hash_value: Option<String>,
    /// Unix seconds.
    pub cached_at: u64,
    /// Unpacked lower dirs, bottom first (filled on read, not stored).
    #[serde(skip_deserializing, default)]
    pub layer_dirs: Vec<PathBuf>,
}

impl CachedImage {
    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.digest.clone()).collect()
    }
}

/// Where a fill is: phase `download` (bytes of total), `convert` (data bytes written to the
/// base layer), `unpack`, `commit`, `done`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    pub phase: String,
    pub done: u64,
    pub total: Option<u64>,
}

pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

#[derive(Debug, Default, Serialize)]
pub struct Counters {
    pub downloads: AtomicU64,
    pub conversions: AtomicU64,
    pub hits: AtomicU64,
    pub evictions: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Pin {
    pub image: String,
    pub layers: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FsckReport {
    pub images: usize,
    pub blobs_verified: usize,
    pub layer_dirs: usize,
    /// Damage: a record naming something missing or with the wrong digest.
    pub problems: Vec<String>,
    /// Leftovers no record or pin refers to (removed by the next open).
    pub orphans: Vec<String>,
}

impl FsckReport {
    pub fn clean(&self) -> bool {
        self.problems.is_empty() && self.orphans.is_empty()
    }
}

/// Hashes what passes through (the uncompressed layer tar: its diff_id).
struct HashingReader<R> {
    inner: R,
    hash: sha2::Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        sha2::Digest::update(&mut self.hash, &buf[..n]);
        Ok(n)
    }
}

pub struct LayerCache {
    dir: PathBuf,
    opts: CacheOptions,
    glance: Option<GlanceClient>,
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub counters: Counters,
}

/// A private directory under tmp/, locked while its owner lives; removed on drop.
struct WorkDir {
    path: PathBuf,
    _lock: FileLock,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(dir = %self.path.display(), error = %e, "removing work dir");
        }
    }
}

fn hex_of(digest: &str) -> Result<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| Error::Invalid(format!("layer digest {digest:?}")))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn check_owner(owner: &str) -> Result<()> {
    let ok = !owner.is_empty()
        && owner.len() <= 128
        && !owner.starts_with('.')
        && owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("pin owner {owner:?}")))
    }
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let data = serde_json::to_vec_pretty(v).map_err(|e| Error::Cache(e.to_string()))?;
    oci::write_atomic(path, &data)?;
    Ok(())
}

/// Removes a tree, first renaming it into `trash` (same filesystem) so that it vanishes
/// from its place atomically even if the removal itself is interrupted.
fn remove_tree(path: &Path, trash: &Path) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let t = trash.join(format!("trash-{name}-{}", std::process::id()));
    std::fs::rename(path, &t).map_err(io(path))?;
    std::fs::remove_dir_all(&t).map_err(io(&t))
}

impl LayerCache {
    /// Opens (creating) a cache, removing what crashed fills left behind.
    pub fn open(opts: CacheOptions, glance: Option<GlanceClient>) -> Result<LayerCache> {
        let dir = opts.dir.clone();
        for d in ["oci", "layers", "images", "pins", "tmp", "locks"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        let c = LayerCache {
            dir,
            opts,
            glance,
            flights: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        };
        c.recover()?;
        Ok(c)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn glance(&self) -> Option<&GlanceClient> {
        self.glance.as_ref()
    }

    fn p(&self, sub: &str) -> PathBuf {
        self.dir.join(sub)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.p("images").join(format!("{id}.json"))
    }

    fn cache_lock(&self) -> Result<FileLock> {
        FileLock::exclusive(&self.p("cache.lock"))
    }

    /// The unpacked lower dir of a layer digest (it may not exist).
    pub fn layer_dir(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.p("layers").join(hex_of(digest)?))
    }

    /// Removes stale work dirs and temp files, then orphans (under the cache lock).
    fn recover(&self) -> Result<()> {
        let _g = self.cache_lock()?;
        // Under the lock: another process's recover removes `.tmp-*` files of writes
        // in flight otherwise.
        Layout::create(&self.p("oci"))?;
        let tmp = self.p("tmp");
        for e in std::fs::read_dir(&tmp).map_err(io(&tmp))? {
            let e = e.map_err(io(&tmp))?;
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if name.starts_with("w-") {
                    // A live owner holds the lock: its fill is still running.
                    match FileLock::try_exclusive(&path.join(".lock")) {
                        Ok(Some(_)) => {}
                        Ok(None) => continue,
                        Err(e) => {
                            tracing::warn!(dir = %path.display(), error = %e, "cannot test a work dir's lock; kept");
                            continue;
                        }
                    }
                }
                tracing::info!(dir = %path.display(), "removing stale temp dir");
                std::fs::remove_dir_all(&path).map_err(io(&path))?;
            } else {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        for d in ["images", "pins", "oci"] {
            let dir = self.p(d);
            for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
                let e = e.map_err(io(&dir))?;
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        self.gc_locked()
    }

    /// The record of a cached image whose layer dirs all exist; bumps its LRU time.
    pub fn lookup(&self, id: &str) -> Result<Option<CachedImage>> {
        check_id(id)?;
        let Some(mut img) = self.read_record(id)? else {
            return Ok(None);
        };
        for l in &img.layers {
            let d = self.layer_dir(&l.digest)?;
            if !d.is_dir() {
                tracing::warn!(image = id, layer = %l.digest, "cached image lacks a layer dir");
                return Ok(None);
            }
            img.layer_dirs.push(d);
        }
        // The record's mtime is the LRU clock; no fsync: losing a touch only ages an entry.
        let p = self.record_path(id);
        if let Ok(f) = File::options().write(true).open(&p) {
            let _ = f.set_modified(SystemTime::now());
        }
        Ok(Some(img))
    }

    fn read_record(&self, id: &str) -> Result<Option<CachedImage>> {
        let p = self.record_path(id);
        let data = match std::fs::read(&p) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&p, e)),
        };
        let img: CachedImage = serde_json::from_slice(&data)
            .map_err(|e| Error::Cache(format!("{}: {e}", p.display())))?;
        Ok(Some(img))
    }

    /// Every record, with its LRU time.
    fn records(&self) -> Result<Vec<(CachedImage, SystemTime)>> {
        let dir = self.p("images");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            if name.starts_with('.') || check_id(id).is_err() {
                continue;
            }
            let mtime = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            if let Some(img) = self.read_record(id)? {
                out.push((img, mtime));
            }
        }
        Ok(out)
    }

    /// Cached images, least recently used first.
    pub fn list(&self) -> Result<Vec<CachedImage>> {
        let mut r = self.records()?;
        r.sort_by_key(|(_, t)| *t);
        Ok(r.into_iter()
            .map(|(mut img, _)| {
                img.layer_dirs = img
                    .layers
                    .iter()
                    .filter_map(|l| self.layer_dir(&l.digest).ok())
                    .collect();
                img
            })
            .collect())
    }

    fn flight(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut g = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        g.entry(id.to_string()).or_default().clone()
    }

    /// The image's layers, downloading and converting it first when it is not cached.
    /// Concurrent calls for one image — in this process or others — fill it once.
    /// A snapshot image (see [`crate::snapshot`]) is filled parent first: its parents are
    /// ensured in turn (reusing what is cached), then only its own layer is downloaded.
    pub async fn ensure_image(
        self: &Arc<Self>,
        id: &str,
        progress: Option<ProgressFn>,
    ) -> Result<CachedImage> {
        self.ensure_chain(id, progress, Vec::new()).await
    }

    /// `chain`: the snapshots whose fill asked for this one (cycle and depth guard).
    fn ensure_chain<'a>(
        self: &'a Arc<Self>,
        id: &'a str,
        progress: Option<ProgressFn>,
        chain: Vec<String>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<CachedImage>> + Send + 'a>> {
        Box::pin(async move { self.ensure_inner(id, progress, chain).await })
    }

    async fn ensure_inner(
        self: &Arc<Self>,
        id: &str,
        progress: Option<ProgressFn>,
        chain: Vec<String>,
    ) -> Result<CachedImage> {
        check_id(id)?;
        if chain.iter().any(|c| c == id) {
            return Err(Error::Invalid(format!(
                "snapshot chain {} -> {id} is a cycle",
                chain.join(" -> ")
            )));
        }
        if chain.len() >= crate::snapshot::MAX_DEPTH {
            return Err(Error::Unsupported(format!(
                "snapshot chain of image {} is deeper than {} parents",
                chain.first().map(String::as_str).unwrap_or(id),
                crate::snapshot::MAX_DEPTH
            )));
        }
        if let Some(img) = self.lookup(id)? {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(img);
        }
        let flight = self.flight(id);
        let _g = flight.lock().await;
        if let Some(img) = self.lookup(id)? {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(img);
        }
        let lock_path = self.p("locks").join(format!("{id}.lock"));
        let _flock = tokio::task::spawn_blocking(move || FileLock::exclusive(&lock_path))
            .await
            .map_err(|e| Error::Cache(format!("lock task: {e}")))??;
        if let Some(img) = self.lookup(id)? {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(img);
        }
        let progress: ProgressFn = progress.unwrap_or_else(|| Arc::new(|_| {}));
        let img = self.fill(id, progress.clone(), chain).await?;
        let me = self.clone();
        let keep = id.to_string();
        match tokio::task::spawn_blocking(move || me.evict(&[keep])).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "eviction failed"),
            Err(e) => tracing::warn!(error = %e, "eviction task failed"),
        }
        progress(Progress {
            phase: "done".into(),
            done: img.source_size,
            total: Some(img.source_size),
        });
        self.lookup(id)?
            .ok_or_else(|| Error::Cache(format!("image {id} vanished right after its fill")))
    }

    fn new_work_dir(&self, id: &str) -> Result<WorkDir> {
        // Created and locked under the cache lock, so `recover` in another process never
        // sees it unlocked.
        let _g = self.cache_lock()?;
        let tmp = self.p("tmp");
        let d = tempfile::Builder::new()
            .prefix(&format!("w-{id}-"))
            .tempdir_in(&tmp)
            .map_err(io(&tmp))?
            .keep();
        let lock = FileLock::exclusive(&d.join(".lock"))?;
        Ok(WorkDir {
            path: d,
            _lock: lock,
        })
    }

    async fn fill(
        self: &Arc<Self>,
        id: &str,
        progress: ProgressFn,
        chain: Vec<String>,
    ) -> Result<CachedImage> {
        let glance = self.glance.as_ref().ok_or_else(|| {
            Error::Cache(format!(
                "image {id} is not cached and no Glance is configured"
            ))
        })?;
        let meta = glance.show(id).await?;
        if meta.status != "active" {
            return Err(Error::NotActive {
                id: id.to_string(),
                status: meta.status,
            });
        }
        if let Some(snap) = crate::snapshot::snapshot_info(&meta)? {
            return self.fill_snapshot(meta, snap, progress, chain).await;
        }
        let disk_format = meta.disk_format.clone().unwrap_or_default();
        let container_format = meta.container_format.clone().unwrap_or_default();
        // A docker save tarball carries its own layers: disk_format says nothing about it.
        let docker = container_format == "docker";
        let slow = match disk_format.as_str() {
            _ if docker => false,
            "qcow2" | "raw" => false,
            "vmdk" | "vdi" | "vhd" | "vhdx" | "qed" => true,
            other => {
                return Err(Error::Unsupported(format!(
                    "image {id}: disk_format {other:?} (qcow2, raw, vmdk, vdi, vhd, vhdx, qed are)"
                )))
            }
        };
        let work = self.new_work_dir(id)?;
        let src = work.path.join("source");
        let t0 = Instant::now();
        let report = self.download(glance, &meta, &src, &progress).await?;
        tracing::info!(
            image = id,
            bytes = report.bytes,
            seconds = report.seconds,
            verified_with = report.verified_with.as_deref().unwrap_or("none"),
            retries = report.retries,
            "downloaded"
        );
        self.counters.conversions.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        let idc = id.to_string();
        let wp = work.path.clone();
        let p3 = progress.clone();
        let img = tokio::task::spawn_blocking(move || {
            me.convert_and_commit(&idc, &meta, &wp, &disk_format, slow, docker, p3)
        })
        .await
        .map_err(|e| Error::Cache(format!("conversion task: {e}")))??;
        tracing::info!(
            image = id,
            seconds = t0.elapsed().as_secs_f64(),
            layers = img.layers.len(),
            "image cached"
        );
        drop(work);
        Ok(img)
    }

    #[allow(clippy::too_many_arguments)]
    fn convert_and_commit(
        &self,
        id: &str,
        meta: &ImageMeta,
        work: &Path,
        disk_format: &str,
        slow: bool,
        docker: bool,
        progress: ProgressFn,
    ) -> Result<CachedImage> {
        let src = work.join("source");
        let name = format!("{REF_PREFIX}{id}");
        let oci_dir = work.join("oci");
        let (desc, config_digest, layer_list) = if docker {
            let t0 = Instant::now();
            let imp = crate::docker::import(&src, work, &oci_dir, &name)?;
            tracing::info!(
                image = id,
                layers = imp.layers.len(),
                tags = ?imp.repo_tags,
                seconds = t0.elapsed().as_secs_f64(),
                "docker save tarball imported (layers as they are)"
            );
            let _ = std::fs::remove_file(&src);
            (imp.manifest, imp.config_digest, imp.layers)
        } else {
            self.convert_disk(id, work, disk_format, slow, &progress)?
        };
        let work_layout = Layout::open(&oci_dir)?;
        self.unpack_and_commit(
            id,
            meta,
            work,
            &work_layout,
            desc,
            config_digest,
            layer_list,
            disk_format,
            progress,
        )
    }

    /// fatbox-img conversion of a VM disk: (manifest, config digest, layers).
    fn convert_disk(
        &self,
        id: &str,
        work: &Path,
        disk_format: &str,
        slow: bool,
        progress: &ProgressFn,
    ) -> Result<Filled> {
        let src = work.join("source");
        let disk = if slow {
            let raw = work.join("source.raw");
            tracing::warn!(
                image = id,
                disk_format,
                "slow path: qemu-img convert -O raw before the conversion"
            );
            let out = std::process::Command::new("qemu-img")
                .args(["convert", "-f", disk_format, "-O", "raw"])
                .arg(&src)
                .arg(&raw)
                .output()
                .map_err(|e| Error::Command {
                    cmd: "qemu-img convert".into(),
                    msg: e.to_string(),
                })?;
            if !out.status.success() {
                return Err(Error::Command {
                    cmd: "qemu-img convert".into(),
                    msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
            let _ = std::fs::remove_file(&src);
            raw
        } else {
            src
        };
        let name = format!("{REF_PREFIX}{id}");
        let oci_dir = work.join("oci");
        let t0 = Instant::now();
        let report = {
            let guest = Guest::open(
                &disk,
                &OpenOptions {
                    // Glance says the format; probing would let a raw image posing as qcow2
                    // pull in a backing file.
                    format: Some(if slow { "raw" } else { disk_format }.to_string()),
                    ..OpenOptions::default()
                },
            )?;
            let opts = ConvertOptions {
                name: name.clone(),
                level: self.opts.level,
                threads: self.opts.threads,
                // Already verified against Glance's hash while downloading.
                source_digest: false,
                ..ConvertOptions::default()
            };
            let mut done = 0u64;
            let mut last = Instant::now();
            convert(&guest, &oci_dir, &opts, &mut |n| {
                done += n;
                if last.elapsed().as_millis() >= 100 {
                    last = Instant::now();
                    progress(Progress {
                        phase: "convert".into(),
                        done,
                        total: None,
                    });
                }
            })?
        };
        tracing::info!(
            image = id,
            seconds = t0.elapsed().as_secs_f64(),
            "converted"
        );
        let _ = std::fs::remove_file(&disk);
        let work_layout = Layout::open(&oci_dir)?;
        let (desc, _) = work_layout.manifest(Some(&name))?;
        let layers = report
            .layers
            .iter()
            .map(|l| (l.digest.clone(), l.size))
            .collect();
        Ok((desc, report.config_digest, layers))
    }

    /// Unpacks the new layers in the work dir, then commits blobs, layer dirs and the record.
    #[allow(clippy::too_many_arguments)]
    fn unpack_and_commit(
        &self,
        id: &str,
        meta: &ImageMeta,
        work: &Path,
        work_layout: &Layout,
        desc: oci_spec::image::Descriptor,
        config_digest: String,
        layer_list: Vec<(String, u64)>,
        disk_format: &str,
        progress: ProgressFn,
    ) -> Result<CachedImage> {
        let name = format!("{REF_PREFIX}{id}");
        // Unpack into the work dir: only renames happen under the cache lock.
        let mut unpacked = Vec::new();
        for (i, (digest, _)) in layer_list.iter().enumerate() {
            progress(Progress {
                phase: "unpack".into(),
                done: i as u64,
                total: Some(layer_list.len() as u64),
            });
            let hex = hex_of(digest)?;
            if self.p("layers").join(hex).is_dir() {
                unpacked.push((digest.clone(), None, 0));
                continue;
            }
            let dest = work.join(format!("unpack-{hex}"));
            if dest.exists() {
                // The same layer twice in one image: unpacked once.
                unpacked.push((digest.clone(), None, 0));
                continue;
            }
            std::fs::create_dir(&dest).map_err(io(&dest))?;
            let mut r = work_layout.open_blob(digest)?;
            let stats = oci::unpack_layer(&mut r, &dest, UnpackMode::Overlay)?;
            r.verify()?;
            unpacked.push((digest.clone(), Some(dest), stats.bytes));
        }
        progress(Progress {
            phase: "commit".into(),
            done: 0,
            total: None,
        });
        let _g = self.cache_lock()?;
        let known = self.known_unpacked_bytes()?;
        let layout = Layout::create(&self.p("oci"))?;
        let blobs = layout.blobs();
        for e in std::fs::read_dir(work_layout.blobs()).map_err(io(work_layout.blobs()))? {
            let e = e.map_err(io(work_layout.blobs()))?;
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let target = blobs.join(e.file_name());
            if !target.exists() {
                std::fs::rename(e.path(), &target).map_err(io(&target))?;
            }
        }
        fsync_dir(&blobs)?;
        let layers_dir = self.p("layers");
        let mut layers = Vec::new();
        for ((digest, tmp, bytes), (_, size)) in unpacked.into_iter().zip(&layer_list) {
            let target = self.layer_dir(&digest)?;
            let bytes = match tmp {
                Some(t) if !target.exists() => {
                    std::fs::rename(&t, &target).map_err(io(&target))?;
                    bytes
                }
                _ => known.get(&digest).copied().unwrap_or(bytes),
            };
            layers.push(CachedLayer {
                digest,
                size: *size,
                unpacked_bytes: bytes,
            });
        }
        fsync_dir(&layers_dir)?;
        layout.tag(desc.clone(), &name)?;
        let img = CachedImage {
            glance_id: id.to_string(),
            name: meta.name.clone(),
            manifest_digest: desc.digest().to_string(),
            config_digest,
            layers,
            disk_format: disk_format.to_string(),
            container_format: meta.container_format.clone(),
            source_size: meta.size.unwrap_or(0),
            hash_algo: meta.expected_hash().map(|h| h.0),
            hash_value: meta.expected_hash().map(|h| h.1),
            cached_at: now_secs(),
            layer_dirs: Vec::new(),
        };
        write_json(&self.record_path(id), &img)?;
        Ok(img)
    }

    /// Downloads an image's data to `dest`, reporting it as the "download" phase, and counts it.
    async fn download(
        &self,
        glance: &GlanceClient,
        meta: &ImageMeta,
        dest: &Path,
        progress: &ProgressFn,
    ) -> Result<crate::glance::DownloadReport> {
        let p2 = progress.clone();
        let report = glance
            .download(meta, dest, &move |done, total| {
                p2(Progress {
                    phase: "download".into(),
                    done,
                    total,
                })
            })
            .await?;
        self.counters.downloads.fetch_add(1, Ordering::Relaxed);
        Ok(report)
    }

    /// A snapshot: parents first (cached ones are hits), then its own layer — downloaded
    /// only when no cached image has it already — verified against its digest, unpacked, and
    /// committed with a manifest and config that extend the parent's.
    async fn fill_snapshot(
        self: &Arc<Self>,
        meta: ImageMeta,
        snap: crate::snapshot::SnapshotInfo,
        progress: ProgressFn,
        mut chain: Vec<String>,
    ) -> Result<CachedImage> {
        let id = meta.id.clone();
        chain.push(id.clone());
        let parent = self
            .ensure_chain(&snap.parent, Some(progress.clone()), chain)
            .await?;
        let want = &snap.layers[..snap.layers.len() - 1];
        if parent.layer_digests() != want {
            return Err(Error::Invalid(format!(
                "snapshot image {id}: its parent {} has layers {:?}, the snapshot records {:?}",
                snap.parent,
                parent.layer_digests(),
                want
            )));
        }
        let work = self.new_work_dir(&id)?;
        let work_layout = Layout::create(&work.path.join("oci"))?;
        let have = self.p("layers").join(hex_of(&snap.layer_digest)?).is_dir()
            && Layout::open(&self.p("oci"))?
                .blob_path(&snap.layer_digest)?
                .is_file();
        let mut size = meta.size.unwrap_or(0);
        if !have {
            let glance = self
                .glance
                .as_ref()
                .ok_or_else(|| Error::Cache("no Glance configured".into()))?;
            let src = work_layout.blob_path(&snap.layer_digest)?;
            let report = self.download(glance, &meta, &src, &progress).await?;
            size = report.bytes;
            tracing::info!(
                image = %id,
                parent = %snap.parent,
                bytes = report.bytes,
                seconds = report.seconds,
                verified_with = report.verified_with.as_deref().unwrap_or("none"),
                "downloaded snapshot layer (parents cached)"
            );
        } else {
            tracing::info!(image = %id, layer = %snap.layer_digest, "snapshot layer already cached");
        }
        let me = self.clone();
        let wp = work.path.clone();
        let img = tokio::task::spawn_blocking(move || {
            me.commit_snapshot(&meta, &snap, &parent, &wp, have, size, progress)
        })
        .await
        .map_err(|e| Error::Cache(format!("snapshot unpack task: {e}")))??;
        drop(work);
        Ok(img)
    }

    #[allow(clippy::too_many_arguments)]
    fn commit_snapshot(
        &self,
        meta: &ImageMeta,
        snap: &crate::snapshot::SnapshotInfo,
        parent: &CachedImage,
        work: &Path,
        have: bool,
        size: u64,
        progress: ProgressFn,
    ) -> Result<CachedImage> {
        let id = &meta.id;
        let digest = &snap.layer_digest;
        let work_layout = Layout::open(&work.join("oci"))?;
        let mut unpacked = None;
        let mut diff_id = snap.diff_id.clone();
        if !have {
            progress(Progress {
                phase: "unpack".into(),
                done: 0,
                total: Some(1),
            });
            let dest = work.join("unpack");
            std::fs::create_dir(&dest).map_err(io(&dest))?;
            // One pass: the blob's digest, the tar's digest (diff_id) and the unpack.
            let blob = work_layout.open_blob(digest)?;
            let mut dec = zstd::Decoder::new(blob).map_err(io(&dest))?;
            let mut tar = HashingReader {
                inner: &mut dec,
                hash: sha2::Sha256::default(),
            };
            let stats = oci::unpack_layer(&mut tar, &dest, UnpackMode::Overlay)?;
            std::io::copy(&mut tar, &mut std::io::sink()).map_err(io(&dest))?;
            let got = format!("sha256:{}", hex::encode(sha2::Digest::finalize(tar.hash)));
            if let Some(want) = &snap.diff_id {
                if *want != got {
                    return Err(Error::Invalid(format!(
                        "snapshot image {id}: layer tar digest {got}, fatbox_diff_id says {want}"
                    )));
                }
            }
            diff_id = Some(got);
            dec.finish().into_inner().verify()?;
            unpacked = Some((dest, stats.bytes));
        }
        let _g = self.cache_lock()?;
        // The parent may have been evicted since it was ensured: its layers must still be
        // here (this record will hold them from now on).
        for l in &parent.layers {
            if !self.layer_dir(&l.digest)?.is_dir() {
                return Err(Error::Cache(format!(
                    "parent layer {} of snapshot {id} vanished (evicted meanwhile); pull again",
                    l.digest
                )));
            }
        }
        let layout = Layout::create(&self.p("oci"))?;
        let target_blob = layout.blob_path(digest)?;
        if !have && !target_blob.exists() {
            let src = work_layout.blob_path(digest)?;
            std::fs::rename(&src, &target_blob).map_err(io(&target_blob))?;
            fsync_dir(&layout.blobs())?;
        }
        let target = self.layer_dir(digest)?;
        let known = self.known_unpacked_bytes()?;
        let unpacked_bytes = match unpacked {
            Some((dir, bytes)) if !target.exists() => {
                std::fs::rename(&dir, &target).map_err(io(&target))?;
                fsync_dir(&self.p("layers"))?;
                bytes
            }
            Some((_, bytes)) => known.get(digest).copied().unwrap_or(bytes),
            None => known.get(digest).copied().unwrap_or(0),
        };
        // Config and manifest: the parent's, plus this layer.
        let pconf: serde_json::Value =
            serde_json::from_slice(&layout.read_blob(&parent.config_digest)?)
                .map_err(|e| Error::Cache(format!("parent config: {e}")))?;
        let mut conf = pconf;
        let diff_id = match diff_id {
            Some(d) => d,
            None => {
                // Cached layer, no property: recompute from the blob.
                let blob = layout.open_blob(digest)?;
                let mut dec = zstd::Decoder::new(blob).map_err(io(&target_blob))?;
                let mut h = HashingReader {
                    inner: &mut dec,
                    hash: sha2::Sha256::default(),
                };
                std::io::copy(&mut h, &mut std::io::sink()).map_err(io(&target_blob))?;
                format!("sha256:{}", hex::encode(sha2::Digest::finalize(h.hash)))
            }
        };
        if let Some(ids) = conf
            .pointer_mut("/rootfs/diff_ids")
            .and_then(serde_json::Value::as_array_mut)
        {
            ids.push(serde_json::Value::String(diff_id));
        } else {
            return Err(Error::Cache("parent config has no rootfs.diff_ids".into()));
        }
        let entry = serde_json::json!({
            "created_by": format!("fatbox snapshot {id} of {}", snap.parent),
            "comment": meta.name.clone().unwrap_or_default(),
        });
        match conf
            .get_mut("history")
            .and_then(serde_json::Value::as_array_mut)
        {
            Some(h) => h.push(entry),
            None => conf["history"] = serde_json::json!([entry]),
        }
        let config_desc =
            layout.put_blob(oci_spec::image::MediaType::ImageConfig, &oci::json(&conf)?)?;
        let pman: serde_json::Value =
            serde_json::from_slice(&layout.read_blob(&parent.manifest_digest)?)
                .map_err(|e| Error::Cache(format!("parent manifest: {e}")))?;
        let mut man = pman;
        man["config"] =
            serde_json::to_value(&config_desc).map_err(|e| Error::Cache(e.to_string()))?;
        let layer_desc = oci::descriptor(
            oci_spec::image::MediaType::ImageLayerZstd,
            digest,
            std::fs::metadata(&target_blob)
                .map_err(io(&target_blob))?
                .len(),
        )?;
        match man
            .get_mut("layers")
            .and_then(serde_json::Value::as_array_mut)
        {
            Some(l) => {
                l.push(serde_json::to_value(&layer_desc).map_err(|e| Error::Cache(e.to_string()))?)
            }
            None => return Err(Error::Cache("parent manifest has no layers".into())),
        }
        let man_desc =
            layout.put_blob(oci_spec::image::MediaType::ImageManifest, &oci::json(&man)?)?;
        layout.tag(man_desc.clone(), &format!("{REF_PREFIX}{id}"))?;
        let mut layers = parent.layers.clone();
        layers.push(CachedLayer {
            digest: digest.clone(),
            size: std::fs::metadata(&target_blob)
                .map_err(io(&target_blob))?
                .len(),
            unpacked_bytes,
        });
        let img = CachedImage {
            glance_id: id.clone(),
            name: meta.name.clone(),
            manifest_digest: man_desc.digest().to_string(),
            config_digest: config_desc.digest().to_string(),
            layers,
            disk_format: crate::snapshot::FORMAT.into(),
            container_format: meta.container_format.clone(),
            source_size: size,
            hash_algo: meta.expected_hash().map(|h| h.0),
            hash_value: meta.expected_hash().map(|h| h.1),
            cached_at: now_secs(),
            layer_dirs: Vec::new(),
        };
        write_json(&self.record_path(id), &img)?;
        tracing::info!(image = %id, parent = %snap.parent, layers = img.layers.len(), "snapshot image cached");
        Ok(img)
    }

    fn known_unpacked_bytes(&self) -> Result<HashMap<String, u64>> {
        let mut m = HashMap::new();
        for (img, _) in self.records()? {
            for l in img.layers {
                m.insert(l.digest, l.unpacked_bytes);
            }
        }
        Ok(m)
    }

    fn pins(&self) -> Result<BTreeMap<String, Pin>> {
        let dir = self.p("pins");
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(owner) = name.strip_suffix(".json") else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let data = std::fs::read(e.path()).map_err(io(e.path()))?;
            let v: serde_json::Value = serde_json::from_slice(&data)
                .map_err(|err| Error::Cache(format!("{}: {err}", e.path().display())))?;
            let pin = Pin {
                image: v["image"].as_str().unwrap_or_default().to_string(),
                layers: v["layers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect(),
            };
            out.insert(owner.to_string(), pin);
        }
        Ok(out)
    }

    /// Marks an image's layers as used by `owner` (an instance uuid): eviction keeps them
    /// until [`unpin`](Self::unpin). Fails if the image was evicted since it was looked up
    /// (the caller ensures it again).
    pub fn pin(&self, owner: &str, id: &str) -> Result<CachedImage> {
        check_owner(owner)?;
        check_id(id)?;
        let _g = self.cache_lock()?;
        let img = self
            .lookup(id)?
            .ok_or_else(|| Error::Cache(format!("image {id} is not cached (evicted?)")))?;
        write_json(
            &self.p("pins").join(format!("{owner}.json")),
            &serde_json::json!({"image": id, "layers": img.layer_digests()}),
        )?;
        Ok(img)
    }

    pub fn unpin(&self, owner: &str) -> Result<()> {
        check_owner(owner)?;
        let p = self.p("pins").join(format!("{owner}.json"));
        match std::fs::remove_file(&p) {
            Ok(()) => fsync_dir(&self.p("pins")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&p, e)),
        }
    }

    /// Bytes the cache holds: blobs plus unpacked layer data.
    pub fn usage(&self) -> Result<u64> {
        let blobs = self.p("oci").join("blobs/sha256");
        let mut total = 0;
        for e in std::fs::read_dir(&blobs).map_err(io(&blobs))? {
            let e = e.map_err(io(&blobs))?;
            total += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
        let known = self.known_unpacked_bytes()?;
        for (d, b) in known {
            if self.layer_dir(&d)?.is_dir() {
                total += b;
            }
        }
        Ok(total)
    }

    /// Evicts least recently used images until the cache fits its cap; never an image in
    /// `keep` or a pinned one, and never a layer a pin names. Returns the evicted ids.
    pub fn evict(&self, keep: &[String]) -> Result<Vec<String>> {
        let Some(max) = self.opts.max_bytes else {
            return Ok(Vec::new());
        };
        let _g = self.cache_lock()?;
        let mut usage = self.usage()?;
        if usage <= max {
            return Ok(Vec::new());
        }
        let pins = self.pins()?;
        let pinned_layers: HashSet<&String> = pins.values().flat_map(|p| &p.layers).collect();
        let pinned_images: HashSet<&String> = pins.values().map(|p| &p.image).collect();
        let mut recs = self.records()?;
        recs.sort_by_key(|(_, t)| *t);
        let mut evicted = Vec::new();
        for (img, _) in recs {
            if usage <= max {
                break;
            }
            // An unpinned image that shares a layer with a pinned one (identical containerize
            // layers are common) is still evicted: gc keeps every layer a pin names.
            if keep.contains(&img.glance_id) || pinned_images.contains(&img.glance_id) {
                continue;
            }
            if img.layers.iter().all(|l| pinned_layers.contains(&l.digest)) {
                // Nothing of it would be freed.
                continue;
            }
            let p = self.record_path(&img.glance_id);
            std::fs::remove_file(&p).map_err(io(&p))?;
            fsync_dir(&self.p("images"))?;
            self.gc_locked()?;
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
            tracing::info!(image = %img.glance_id, "evicted");
            evicted.push(img.glance_id);
            usage = self.usage()?;
        }
        if usage > max {
            tracing::warn!(
                usage,
                max,
                "cache over its cap: the rest is pinned or in use"
            );
        }
        Ok(evicted)
    }

    /// What records and pins refer to: (blob hexes, layer hexes, ref names).
    fn referenced(&self) -> Result<(HashSet<String>, HashSet<String>, HashSet<String>)> {
        let mut blobs = HashSet::new();
        let mut layers = HashSet::new();
        let mut refs = HashSet::new();
        for (img, _) in self.records()? {
            refs.insert(format!("{REF_PREFIX}{}", img.glance_id));
            for d in [&img.manifest_digest, &img.config_digest] {
                blobs.insert(hex_of(d)?.to_string());
            }
            for l in &img.layers {
                blobs.insert(hex_of(&l.digest)?.to_string());
                layers.insert(hex_of(&l.digest)?.to_string());
            }
        }
        for p in self.pins()?.values() {
            for l in &p.layers {
                if let Ok(h) = hex_of(l) {
                    blobs.insert(h.to_string());
                    layers.insert(h.to_string());
                }
            }
        }
        Ok((blobs, layers, refs))
    }

    /// Removes blobs, layer dirs and index entries nothing refers to. Caller holds the lock.
    fn gc_locked(&self) -> Result<()> {
        let (blobs, layers, refs) = self.referenced()?;
        let layout = Layout::create(&self.p("oci"))?;
        let mut index = layout.index()?;
        let before = index.manifests().len();
        let kept: Vec<_> = index
            .manifests()
            .iter()
            .filter(|d| oci::ref_name(d).is_some_and(|n| refs.contains(n)))
            .cloned()
            .collect();
        if kept.len() != before {
            index.set_manifests(kept);
            oci::write_atomic(&self.p("oci").join("index.json"), &oci::json(&index)?)?;
        }
        let bdir = layout.blobs();
        for e in std::fs::read_dir(&bdir).map_err(io(&bdir))? {
            let e = e.map_err(io(&bdir))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if !blobs.contains(&n) {
                tracing::debug!(blob = n, "gc: removing blob");
                std::fs::remove_file(e.path()).map_err(io(e.path()))?;
            }
        }
        let ldir = self.p("layers");
        for e in std::fs::read_dir(&ldir).map_err(io(&ldir))? {
            let e = e.map_err(io(&ldir))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if !layers.contains(&n) {
                tracing::debug!(layer = n, "gc: removing layer dir");
                if e.path().is_dir() {
                    remove_tree(&e.path(), &self.p("tmp"))?;
                } else {
                    std::fs::remove_file(e.path()).map_err(io(e.path()))?;
                }
            }
        }
        Ok(())
    }

    /// Checks every record against the layout (each blob's digest recomputed) and the layer
    /// dirs, and lists leftovers.
    pub fn fsck(&self) -> Result<FsckReport> {
        let _g = self.cache_lock()?;
        let mut rep = FsckReport::default();
        let layout = Layout::open(&self.p("oci"))?;
        let verify = |digest: &str, rep: &mut FsckReport| -> Option<Vec<u8>> {
            let mut r = match layout.open_blob(digest) {
                Ok(r) => r,
                Err(e) => {
                    rep.problems.push(format!("blob {digest}: {e}"));
                    return None;
                }
            };
            let mut data = Vec::new();
            // Manifests and configs are small; layers are only hashed.
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if data.len() < (4 << 20) {
                            data.extend_from_slice(&buf[..n]);
                        }
                    }
                    Err(e) => {
                        rep.problems.push(format!("blob {digest}: {e}"));
                        return None;
                    }
                }
            }
            match r.verify() {
                Ok(()) => {
                    rep.blobs_verified += 1;
                    Some(data)
                }
                Err(e) => {
                    rep.problems.push(format!("blob {digest}: {e}"));
                    None
                }
            }
        };
        let index = layout.index()?;
        let tags: HashMap<String, String> = index
            .manifests()
            .iter()
            .filter_map(|d| oci::ref_name(d).map(|n| (n.to_string(), d.digest().to_string())))
            .collect();
        let records = self.records()?;
        for (img, _) in &records {
            rep.images += 1;
            let id = &img.glance_id;
            match tags.get(&format!("{REF_PREFIX}{id}")) {
                Some(d) if *d == img.manifest_digest => {}
                Some(d) => rep.problems.push(format!(
                    "image {id}: index names manifest {d}, the record {}",
                    img.manifest_digest
                )),
                None => rep
                    .problems
                    .push(format!("image {id}: not in the layout's index")),
            }
            if let Some(m) = verify(&img.manifest_digest, &mut rep) {
                match serde_json::from_slice::<oci_spec::image::ImageManifest>(&m) {
                    Ok(m) => {
                        let in_manifest: Vec<String> =
                            m.layers().iter().map(|l| l.digest().to_string()).collect();
                        if in_manifest != img.layer_digests() {
                            rep.problems.push(format!(
                                "image {id}: record layers differ from the manifest's"
                            ));
                        }
                    }
                    Err(e) => rep
                        .problems
                        .push(format!("image {id}: manifest does not parse: {e}")),
                }
            }
            verify(&img.config_digest, &mut rep);
            for l in &img.layers {
                verify(&l.digest, &mut rep);
                match self.layer_dir(&l.digest) {
                    Ok(d) if d.is_dir() => rep.layer_dirs += 1,
                    _ => rep
                        .problems
                        .push(format!("image {id}: layer dir of {} missing", l.digest)),
                }
            }
        }
        let (blobs, layers, refs) = self.referenced()?;
        for n in tags.keys() {
            if !refs.contains(n) {
                rep.orphans.push(format!("index entry {n}"));
            }
        }
        for (sub, set) in [("oci/blobs/sha256", &blobs), ("layers", &layers)] {
            let d = self.p(sub);
            for e in std::fs::read_dir(&d).map_err(io(&d))? {
                let e = e.map_err(io(&d))?;
                let n = e.file_name().to_string_lossy().into_owned();
                if !set.contains(&n) {
                    rep.orphans.push(format!("{sub}/{n}"));
                }
            }
        }
        let tmp = self.p("tmp");
        for e in std::fs::read_dir(&tmp).map_err(io(&tmp))? {
            let e = e.map_err(io(&tmp))?;
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let live = path.is_dir()
                && name.starts_with("w-")
                && matches!(FileLock::try_exclusive(&path.join(".lock")), Ok(None));
            if !live {
                rep.orphans
                    .push(format!("tmp/{}", e.file_name().to_string_lossy()));
            }
        }
        Ok(rep)
    }
}
