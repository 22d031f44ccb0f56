//! Snapshots: an overlayfs upper dir becomes one OCI layer on top of its image's layers and
//! goes back to Glance as a new image whose properties name its parent and every layer.
//!
//! The layer is the upper dir as the OCI image spec wants a change set: overlay whiteouts
//! (0/0 char devices) become `.wh.NAME` files, opaque directories (`trusted.overlay.opaque=y`)
//! get a `.wh..wh..opq` entry, and owners written through a user namespace are shifted back to
//! the ids the guest saw. The Glance image's data is that layer blob alone (tar + zstd), so
//! an upload costs the change, not the image; a host that boots it fetches the parents first
//! (`LayerCache::ensure_image`), reusing what it has.

use crate::error::{io, Error, Result};
use crate::glance::{check_id, GlanceClient, ImageMeta, NewImage};
use guestfs_tools::oci::{Compression, Hashing, Layout};
use guestfs_tools::tarout::{EntryMeta, Kind, TarWriter};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Glance properties of a snapshot image.
pub const PROP_PARENT: &str = "fatbox_parent";
/// Every layer digest, base first, comma separated (Glance properties are strings).
pub const PROP_LAYERS: &str = "fatbox_layers";
/// The digest of this image's data: the snapshot layer blob.
pub const PROP_LAYER_DIGEST: &str = "fatbox_layer_digest";
/// sha256 of the uncompressed layer tar (the OCI config's diff_id).
pub const PROP_DIFF_ID: &str = "fatbox_diff_id";
pub const PROP_FORMAT: &str = "fatbox_format";
pub const FORMAT: &str = "oci-layer-tar+zstd";
/// Glance 33 accepts both; `compressed` says "not a disk", and `raw` is the one disk format
/// whose upload-time format inspection accepts arbitrary bytes. KVM hosts cannot boot it.
pub const DISK_FORMAT: &str = "raw";
pub const CONTAINER_FORMAT: &str = "compressed";
/// Parents followed when a snapshot is fetched; deeper chains are refused.
pub const MAX_DEPTH: usize = 32;

/// The id a file outside the instance's id range is given in the layer (what the guest saw:
/// the overflow id).
const OVERFLOW_ID: u32 = 65534;
const XATTR_OVERLAY: &str = "trusted.overlay.";
const VFS_CAP_REVISION_MASK: u32 = 0xFF00_0000;
const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
const VFS_CAP_REVISION_3: u32 = 0x0300_0000;
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;

#[derive(Debug, Clone, Default)]
pub struct UpperOptions {
    /// Host id range the upper dir's owners live in (guest id 0 = `base`): shifted back.
    pub shift: Option<(u32, u32)>,
    /// Paths left out (relative, no leading `/`): exact (a directory with its subtree), or
    /// ending in `*` for a name prefix within one directory (`etc/ssh/ssh_host_*`).
    pub exclude: Vec<String>,
    /// Files left out only when their content is exactly this (what the host wrote).
    pub exclude_if_equal: Vec<(String, Vec<u8>)>,
    pub level: i32,
    pub threads: u32,
    /// Write a plain tar (then [`compress_layer`]): the shortest walk, for a frozen instance.
    pub plain: bool,
}

/// The layer built from an upper dir.
#[derive(Debug, Clone, Serialize)]
pub struct LayerBuild {
    pub digest: String,
    pub diff_id: String,
    /// Compressed blob bytes (what is uploaded).
    pub size: u64,
    pub tar_size: u64,
    pub blob: PathBuf,
    pub entries: u64,
    pub files: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    pub data_bytes: u64,
    /// Paths left out (identity files).
    pub skipped: Vec<String>,
    /// Owners outside the id range, written as the overflow id.
    pub unmapped_owners: u64,
    pub seconds: f64,
}

fn excluded(rel: &[u8], pat: &str) -> bool {
    let p = pat.as_bytes();
    if let Some(prefix) = p.strip_suffix(b"*") {
        rel.starts_with(prefix) && !rel[prefix.len()..].contains(&b'/')
    } else {
        rel == p || (rel.starts_with(p) && rel.get(p.len()) == Some(&b'/'))
    }
}

fn lxattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut names = vec![0u8; 1024];
    let n = loop {
        match rustix::fs::llistxattr(path, &mut names[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) if names.len() < (1 << 20) => {
                names.resize(names.len() * 4, 0)
            }
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(path, e.into())),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let mut val = vec![0u8; 256];
        let len = loop {
            match rustix::fs::lgetxattr(path, name, &mut val[..]) {
                Ok(l) => break l,
                Err(rustix::io::Errno::RANGE) if val.len() < (1 << 20) => {
                    val.resize(val.len() * 4, 0)
                }
                Err(rustix::io::Errno::NODATA) => break usize::MAX,
                Err(e) => return Err(Error::io(path, e.into())),
            }
        };
        if len != usize::MAX {
            val.truncate(len);
            out.push((name.to_string(), val));
        }
    }
    Ok(out)
}

struct Walker<'a, W: std::io::Write> {
    tar: TarWriter<W>,
    opts: &'a UpperOptions,
    links: HashMap<(u64, u64), Vec<u8>>,
    out: LayerBuild,
}

impl<W: std::io::Write> Walker<'_, W> {
    fn id(&mut self, host: u32) -> u32 {
        match self.opts.shift {
            Some((base, size)) => match host.checked_sub(base).filter(|g| *g < size) {
                Some(g) => g,
                None => {
                    self.out.unmapped_owners += 1;
                    OVERFLOW_ID
                }
            },
            None => host,
        }
    }

    /// Xattrs as the guest saw them: overlay's own left out (translated by the caller),
    /// capability and ACL ids un-shifted.
    fn guest_xattrs(&mut self, xs: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for (k, mut v) in xs {
            if k.starts_with(XATTR_OVERLAY) {
                continue;
            }
            if self.opts.shift.is_some() {
                if k == "security.capability" && v.len() >= 24 {
                    let magic = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
                    if magic & VFS_CAP_REVISION_MASK == VFS_CAP_REVISION_3 {
                        // A v3 capability names the host uid of its namespace's root; in
                        // the image it is a plain v2 one, valid in whatever namespace runs it.
                        let v2 = (magic & !VFS_CAP_REVISION_MASK) | VFS_CAP_REVISION_2;
                        v.truncate(20);
                        v[..4].copy_from_slice(&v2.to_le_bytes());
                    }
                } else if k == "system.posix_acl_access" || k == "system.posix_acl_default" {
                    let mut i = 4;
                    while i + 8 <= v.len() {
                        let tag = u16::from_le_bytes([v[i], v[i + 1]]);
                        if tag == ACL_USER || tag == ACL_GROUP {
                            let host = u32::from_le_bytes([v[i + 4], v[i + 5], v[i + 6], v[i + 7]]);
                            let g = self.id(host);
                            v[i + 4..i + 8].copy_from_slice(&g.to_le_bytes());
                        }
                        i += 8;
                    }
                }
            }
            out.push((k, v));
        }
        out
    }

    fn skip(&mut self, rel: &[u8], path: &Path, md: &std::fs::Metadata) -> Result<bool> {
        if self.opts.exclude.iter().any(|p| excluded(rel, p)) {
            self.out
                .skipped
                .push(String::from_utf8_lossy(rel).into_owned());
            return Ok(true);
        }
        for (p, content) in &self.opts.exclude_if_equal {
            if p.as_bytes() == rel
                && md.is_file()
                && md.len() == content.len() as u64
                && std::fs::read(path).map_err(io(path))? == *content
            {
                self.out
                    .skipped
                    .push(String::from_utf8_lossy(rel).into_owned());
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn walk(&mut self, dir: &Path, rel: &[u8]) -> Result<()> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(io(dir))?;
        // Sorted: the same change gives the same layer digest.
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let mut r = rel.to_vec();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(name.as_bytes());
            let md = std::fs::symlink_metadata(&path).map_err(io(&path))?;
            if self.skip(&r, &path, &md)? {
                continue;
            }
            let ft = md.file_type();
            if ft.is_char_device() && md.rdev() == 0 {
                let mut wh = rel.to_vec();
                if !wh.is_empty() {
                    wh.push(b'/');
                }
                wh.extend_from_slice(b".wh.");
                wh.extend_from_slice(name.as_bytes());
                self.tar
                    .append(&EntryMeta::new(&wh, Kind::File, 0o644), &[])?;
                self.out.whiteouts += 1;
                continue;
            }
            let xs = lxattrs(&path)?;
            for (k, _) in &xs {
                if k == "trusted.overlay.redirect" || k == "trusted.overlay.metacopy" {
                    return Err(Error::Unsupported(format!(
                        "{}: overlay {} (redirect_dir/metacopy) cannot be snapshotted as a layer",
                        String::from_utf8_lossy(&r),
                        k.trim_start_matches(XATTR_OVERLAY)
                    )));
                }
            }
            let opaque = ft.is_dir()
                && xs
                    .iter()
                    .any(|(k, v)| k == "trusted.overlay.opaque" && v.as_slice() == b"y");
            let kind = if ft.is_dir() {
                Kind::Dir
            } else if ft.is_symlink() {
                Kind::Symlink
            } else if ft.is_file() {
                Kind::File
            } else if ft.is_char_device() {
                Kind::Char
            } else if ft.is_block_device() {
                Kind::Block
            } else if ft.is_fifo() {
                Kind::Fifo
            } else {
                // Sockets: tar has no entry for them, and nothing in an image needs one.
                self.out
                    .skipped
                    .push(String::from_utf8_lossy(&r).into_owned());
                continue;
            };
            let mut meta = EntryMeta::new(&r, kind, md.mode() & 0o7777);
            meta.uid = self.id(md.uid());
            meta.gid = self.id(md.gid());
            meta.mtime = md.mtime();
            meta.xattrs = self.guest_xattrs(xs);
            if matches!(kind, Kind::Char | Kind::Block) {
                let d = md.rdev();
                meta.rdev = (rustix::fs::major(d), rustix::fs::minor(d));
            }
            if kind == Kind::Symlink {
                let t = std::fs::read_link(&path).map_err(io(&path))?;
                meta.link = Some(t.as_os_str().as_bytes().to_vec());
            }
            if kind != Kind::Dir && md.nlink() > 1 {
                let key = (md.dev(), md.ino());
                if let Some(first) = self.links.get(&key) {
                    let mut l = EntryMeta::new(&r, Kind::HardLink, meta.mode);
                    l.link = Some(first.clone());
                    l.uid = meta.uid;
                    l.gid = meta.gid;
                    l.mtime = meta.mtime;
                    self.tar.header(&l)?;
                    continue;
                }
                self.links.insert(key, r.clone());
            }
            if kind == Kind::File {
                meta.size = md.len();
                self.tar.header(&meta)?;
                let mut f = std::fs::File::open(&path).map_err(io(&path))?;
                self.tar.write_from(&mut f, md.len())?;
                self.out.files += 1;
            } else {
                self.tar.header(&meta)?;
            }
            if kind == Kind::Dir {
                if opaque {
                    let mut o = r.clone();
                    o.extend_from_slice(b"/.wh..wh..opq");
                    self.tar
                        .append(&EntryMeta::new(&o, Kind::File, 0o644), &[])?;
                    self.out.opaque_dirs += 1;
                }
                self.walk(&path, &r)?;
            }
        }
        Ok(())
    }
}

/// Writes the upper dir `upper` as a tar+zstd layer blob into `layout` (blocking; the caller
/// keeps the tree still meanwhile: a frozen or stopped instance).
pub fn upper_to_layer(upper: &Path, layout: &Layout, opts: &UpperOptions) -> Result<LayerBuild> {
    let t0 = Instant::now();
    let mut out = if opts.plain {
        // A scratch file, not a durable blob: no fsync while the instance is frozen.
        let blobs = layout.blobs();
        let (file, tmp) = tempfile::Builder::new()
            .prefix(".tmp-plain-")
            .tempfile_in(&blobs)
            .map_err(io(&blobs))?
            .into_parts();
        let w = Hashing::new(std::io::BufWriter::with_capacity(1 << 20, file));
        let (w, stats, mut out) = walk_into(w, upper, opts)?;
        let (bw, hex, len) = w.finish();
        bw.into_inner()
            .map_err(|e| Error::io(&blobs, e.into_error()))?;
        out.blob = tmp.keep().map_err(|e| Error::io(&blobs, e.error))?;
        out.digest = format!("sha256:{hex}");
        out.diff_id = out.digest.clone();
        out.size = len;
        out.tar_size = len;
        out.entries = stats.entries;
        out.data_bytes = stats.data_bytes;
        out
    } else {
        let sink = layout.layer_sink(Compression::Zstd, opts.level, opts.threads.max(1))?;
        let (sink, stats, mut out) = walk_into(sink, upper, opts)?;
        let info = sink.finish()?;
        out.blob = layout.blob_path(&info.digest)?;
        out.digest = info.digest;
        out.diff_id = info.diff_id;
        out.size = info.size;
        out.tar_size = info.tar_size;
        out.entries = stats.entries;
        out.data_bytes = stats.data_bytes;
        out
    };
    out.seconds = t0.elapsed().as_secs_f64();
    if out.unmapped_owners > 0 {
        tracing::warn!(
            count = out.unmapped_owners,
            "files owned outside the instance's id range: written as {OVERFLOW_ID} (as the guest saw them)"
        );
    }
    Ok(out)
}

fn walk_into<W: std::io::Write>(
    w: W,
    upper: &Path,
    opts: &UpperOptions,
) -> Result<(W, guestfs_tools::tarout::TarStats, LayerBuild)> {
    let mut wk = Walker {
        tar: TarWriter::new(w),
        opts,
        links: HashMap::new(),
        out: LayerBuild {
            digest: String::new(),
            diff_id: String::new(),
            size: 0,
            tar_size: 0,
            blob: PathBuf::new(),
            entries: 0,
            files: 0,
            whiteouts: 0,
            opaque_dirs: 0,
            data_bytes: 0,
            skipped: Vec::new(),
            unmapped_owners: 0,
            seconds: 0.0,
        },
    };
    wk.walk(upper, b"")?;
    let (w, stats) = wk.tar.finish()?;
    Ok((w, stats, wk.out))
}

/// Turns a plain layer (`plain: true`) into the tar+zstd blob that is uploaded; the plain
/// scratch file is removed.
pub fn compress_layer(
    layout: &Layout,
    build: &mut LayerBuild,
    level: i32,
    threads: u32,
) -> Result<()> {
    let t0 = Instant::now();
    let plain = build.blob.clone();
    let mut sink = layout.layer_sink(Compression::Zstd, level, threads.max(1))?;
    let mut f = std::fs::File::open(&plain).map_err(io(&plain))?;
    std::io::copy(&mut f, &mut sink).map_err(io(&plain))?;
    let info = sink.finish()?;
    if info.diff_id != build.diff_id {
        return Err(Error::Cache(format!(
            "{}: changed while compressed (tar digest {} became {})",
            plain.display(),
            build.diff_id,
            info.diff_id
        )));
    }
    std::fs::remove_file(&plain).map_err(io(&plain))?;
    build.blob = layout.blob_path(&info.digest)?;
    build.digest = info.digest;
    build.size = info.size;
    build.seconds += t0.elapsed().as_secs_f64();
    Ok(())
}

/// Where the snapshot goes in Glance.
#[derive(Debug, Clone, Default)]
pub struct PublishRequest {
    /// An existing image in state `queued` (Nova creates one and passes its id).
    pub image_id: Option<String>,
    /// Name of a new image (when `image_id` is None).
    pub name: Option<String>,
    pub parent: String,
    /// The parent's layers, base first.
    pub parent_layers: Vec<String>,
    /// Extra properties (strings); `fatbox_*` keys are ours and cannot be set.
    pub properties: Map<String, Value>,
}

/// The properties that make an image a fatbox snapshot.
pub fn snapshot_properties(req: &PublishRequest, layer: &LayerBuild) -> Result<Map<String, Value>> {
    check_id(&req.parent)?;
    let mut props = Map::new();
    for (k, v) in &req.properties {
        if k.starts_with("fatbox_") {
            return Err(Error::Invalid(format!(
                "property {k}: fatbox_* properties are set by the snapshot itself"
            )));
        }
        let v = match v {
            Value::String(s) => Value::String(s.clone()),
            Value::Number(_) | Value::Bool(_) => Value::String(v.to_string()),
            _ => {
                return Err(Error::Invalid(format!(
                    "property {k}: Glance properties are strings"
                )))
            }
        };
        props.insert(k.clone(), v);
    }
    let mut layers = req.parent_layers.clone();
    layers.push(layer.digest.clone());
    props.insert(PROP_PARENT.into(), Value::String(req.parent.clone()));
    props.insert(PROP_LAYERS.into(), Value::String(layers.join(",")));
    props.insert(
        PROP_LAYER_DIGEST.into(),
        Value::String(layer.digest.clone()),
    );
    props.insert(PROP_DIFF_ID.into(), Value::String(layer.diff_id.clone()));
    props.insert(PROP_FORMAT.into(), Value::String(FORMAT.into()));
    Ok(props)
}

/// Uploads the layer blob as a Glance image (into the queued `image_id`, or a new one) with
/// the snapshot properties; returns the active image. A new image is deleted again if the
/// upload fails; a caller's queued image is left to its owner (Nova cleans it up).
pub async fn publish(
    glance: &GlanceClient,
    req: &PublishRequest,
    layer: &LayerBuild,
) -> Result<ImageMeta> {
    let props = snapshot_properties(req, layer)?;
    let (id, created) = match &req.image_id {
        Some(id) => {
            check_id(id)?;
            let m = glance.show(id).await?;
            if m.status != "queued" {
                return Err(Error::Invalid(format!(
                    "image {id} is {}: a snapshot uploads into a queued image",
                    m.status
                )));
            }
            let mut ops = vec![
                serde_json::json!({"op": "replace", "path": "/disk_format", "value": DISK_FORMAT}),
                serde_json::json!({"op": "replace", "path": "/container_format", "value": CONTAINER_FORMAT}),
            ];
            for (k, v) in &props {
                ops.push(serde_json::json!({"op": "add", "path": format!("/{k}"), "value": v}));
            }
            glance.patch(id, &ops).await?;
            (id.clone(), false)
        }
        None => {
            let name = req
                .name
                .clone()
                .unwrap_or_else(|| format!("snapshot-of-{}", req.parent));
            let m = glance
                .create(&NewImage {
                    name,
                    disk_format: DISK_FORMAT.into(),
                    container_format: CONTAINER_FORMAT.into(),
                    visibility: None,
                    properties: props,
                })
                .await?;
            (m.id, true)
        }
    };
    let r = async {
        glance.upload(&id, &layer.blob).await?;
        glance.wait_active(&id, Duration::from_secs(300)).await
    }
    .await;
    if r.is_err() && created {
        if let Err(e) = glance.delete(&id).await {
            tracing::warn!(image = %id, error = %e, "deleting the failed snapshot image");
        }
    }
    r
}

/// A snapshot image's place in its chain, from its Glance properties.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub parent: String,
    /// All layers, base first (the last is this image's data).
    pub layers: Vec<String>,
    pub layer_digest: String,
    pub diff_id: Option<String>,
}

/// Some(info) when the image is a fatbox snapshot; an error when its properties are
/// inconsistent.
pub fn snapshot_info(meta: &ImageMeta) -> Result<Option<SnapshotInfo>> {
    let Some(digest) = meta.property(PROP_LAYER_DIGEST) else {
        return Ok(None);
    };
    let bad = |why: &str| Error::Invalid(format!("snapshot image {}: {why}", meta.id));
    let parent = meta
        .property(PROP_PARENT)
        .ok_or_else(|| bad("no fatbox_parent"))?
        .to_string();
    check_id(&parent)?;
    if parent == meta.id {
        return Err(bad("it is its own parent"));
    }
    let layers: Vec<String> = meta
        .property(PROP_LAYERS)
        .ok_or_else(|| bad("no fatbox_layers"))?
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    for l in layers.iter().chain(std::iter::once(&digest.to_string())) {
        let ok = l
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !ok {
            return Err(bad(&format!("layer digest {l:?}")));
        }
    }
    if layers.len() < 2 || layers.last().map(String::as_str) != Some(digest) {
        return Err(bad("fatbox_layers does not end with fatbox_layer_digest"));
    }
    if layers.len() > MAX_DEPTH + 64 {
        return Err(bad("too many layers"));
    }
    Ok(Some(SnapshotInfo {
        parent,
        layers,
        layer_digest: digest.to_string(),
        diff_id: meta.property(PROP_DIFF_ID).map(str::to_string),
    }))
}

#[cfg(test)]
mod tests {
    use super::excluded;

    #[test]
    fn exclusion_patterns() {
        assert!(excluded(b"etc/hostname", "etc/hostname"));
        assert!(!excluded(b"etc/hostnames", "etc/hostname"));
        assert!(excluded(b"config-drive/openstack/x", "config-drive"));
        assert!(excluded(b"etc/ssh/ssh_host_rsa_key", "etc/ssh/ssh_host_*"));
        assert!(!excluded(b"etc/ssh/sshd_config", "etc/ssh/ssh_host_*"));
        assert!(!excluded(b"etc/ssh/ssh_host_x/y", "etc/ssh/ssh_host_*"));
    }
}
