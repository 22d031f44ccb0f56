//! Glance images with container_format `docker`: a `docker save` tarball (manifest.json, the
//! image config, one tar per layer; the tarball and the layers possibly gzip or zstd
//! compressed). Its layers are taken as they are — no fatbox-img conversion — after each
//! one's uncompressed digest is checked against the config's `rootfs.diff_ids`, and stored
//! as blobs of an OCI layout with a manifest of our own. Docker whiteouts (`.wh.NAME`,
//! `.wh..wh..opq`) are OCI whiteouts: the unpacker handles them.
//!
//! The tarball is untrusted: entry names must be relative and stay inside it (symlinks and
//! hard links too: docker save links duplicate layers), only files, dirs and links are
//! accepted, JSON documents are capped in size, and every layer the manifest names must be
//! there.

use crate::error::{io, Error, Result};
use guestfs_tools::oci::{self, Layout};
use oci_spec::image::MediaType;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// manifest.json and the config are small; anything larger is not a docker save.
const MAX_JSON: u64 = 16 << 20;
const MAX_ENTRIES: usize = 100_000;
const MAX_LINK_HOPS: usize = 16;

/// What an import produced: the manifest (tagged `name` in the layout), its config and the
/// layer blobs, bottom first, as (digest, size).
#[derive(Debug)]
pub struct DockerImport {
    pub manifest: oci_spec::image::Descriptor,
    pub config_digest: String,
    pub layers: Vec<(String, u64)>,
    pub repo_tags: Vec<String>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Invalid(format!("docker save tarball: {}", msg.into()))
}

#[derive(Debug)]
enum Entry {
    File(PathBuf),
    /// A link to another entry (normalized name).
    Link(String),
}

/// `a/./b/` → `a/b`; None when absolute, empty or leaving the archive with `..`.
fn normalize(name: &str) -> Option<String> {
    if name.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

fn decompressed(r: impl Read + 'static) -> Result<Box<dyn Read>> {
    let mut r = BufReader::with_capacity(1 << 20, r);
    let magic = r
        .fill_buf()
        .map_err(io("docker tarball"))?
        .get(..4)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::GzDecoder::new(r))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::Decoder::with_buffer(r).map_err(io("docker tarball"))?)
    } else {
        Box::new(r)
    })
}

/// Extracts the tarball's files flat into `dir` (as numbered files, never by their names).
fn extract(tarball: &Path, dir: &Path) -> Result<HashMap<String, Entry>> {
    let f = File::open(tarball).map_err(io(tarball))?;
    let mut ar = tar::Archive::new(decompressed(f)?);
    let mut entries = HashMap::new();
    let mut n = 0usize;
    for e in ar
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?
    {
        let mut e = e.map_err(|e| bad(format!("reading the archive: {e}")))?;
        n += 1;
        if n > MAX_ENTRIES {
            return Err(bad(format!("more than {MAX_ENTRIES} entries")));
        }
        let raw = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let name = normalize(&raw)
            .ok_or_else(|| bad(format!("entry {raw:?} is absolute or escapes the archive")))?;
        let kind = e.header().entry_type();
        let entry = if kind.is_dir() {
            continue;
        } else if kind.is_file() {
            let p = dir.join(format!("f{n}"));
            let mut out = File::create(&p).map_err(io(&p))?;
            std::io::copy(&mut e, &mut out).map_err(|err| bad(format!("{name}: {err}")))?;
            out.flush().map_err(io(&p))?;
            Entry::File(p)
        } else if kind.is_symlink() || kind.is_hard_link() {
            let t = e
                .link_name_bytes()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .ok_or_else(|| bad(format!("{name}: link without a target")))?;
            // Symlinks are relative to their dir, hard links to the archive's root.
            let joined = if kind.is_symlink() {
                match name.rsplit_once('/') {
                    Some((parent, _)) => format!("{parent}/{t}"),
                    None => t.clone(),
                }
            } else {
                t.clone()
            };
            let target = normalize(&joined)
                .ok_or_else(|| bad(format!("{name}: link target {t:?} escapes the archive")))?;
            Entry::Link(target)
        } else if kind == tar::EntryType::XGlobalHeader || kind == tar::EntryType::XHeader {
            continue;
        } else {
            return Err(bad(format!("{name}: unexpected entry type {kind:?}")));
        };
        entries.insert(name, entry);
    }
    Ok(entries)
}

fn resolve<'a>(entries: &'a HashMap<String, Entry>, name: &str) -> Result<&'a Path> {
    let mut cur = normalize(name).ok_or_else(|| bad(format!("{name:?} escapes the archive")))?;
    for _ in 0..MAX_LINK_HOPS {
        match entries.get(&cur) {
            Some(Entry::File(p)) => return Ok(p),
            Some(Entry::Link(t)) => cur = t.clone(),
            None => return Err(bad(format!("{name} is named but not in the tarball"))),
        }
    }
    Err(bad(format!("{name}: too many links")))
}

fn read_json(entries: &HashMap<String, Entry>, name: &str) -> Result<(Vec<u8>, serde_json::Value)> {
    let p = resolve(entries, name)?;
    let len = std::fs::metadata(p).map_err(io(p))?.len();
    if len > MAX_JSON {
        return Err(bad(format!(
            "{name}: {len} bytes, more than a JSON document here may be"
        )));
    }
    let data = std::fs::read(p).map_err(io(p))?;
    let v = serde_json::from_slice(&data).map_err(|e| bad(format!("{name}: {e}")))?;
    Ok((data, v))
}

fn sha256_hex(r: &mut dyn Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Imports a docker save tarball into the layout at `layout_dir` as image `name`, using
/// `work` (same filesystem) for the extracted files.
pub fn import(tarball: &Path, work: &Path, layout_dir: &Path, name: &str) -> Result<DockerImport> {
    let xdir = work.join("docker");
    std::fs::create_dir_all(&xdir).map_err(io(&xdir))?;
    let entries = extract(tarball, &xdir)?;
    let (_, manifest) = read_json(&entries, "manifest.json").map_err(|e| match e {
        Error::Invalid(m) if m.contains("not in the tarball") => {
            bad("no manifest.json (not a docker save tarball)")
        }
        e => e,
    })?;
    let images = manifest
        .as_array()
        .ok_or_else(|| bad("manifest.json is not a list"))?;
    let img = match images.as_slice() {
        [one] => one,
        [] => return Err(bad("manifest.json lists no image")),
        more => {
            return Err(bad(format!(
                "manifest.json lists {} images; one Glance image holds one",
                more.len()
            )))
        }
    };
    let config_name = img["Config"]
        .as_str()
        .ok_or_else(|| bad("manifest.json: no Config"))?;
    let layer_names: Vec<&str> = img["Layers"]
        .as_array()
        .ok_or_else(|| bad("manifest.json: no Layers list"))?
        .iter()
        .map(|l| {
            l.as_str()
                .ok_or_else(|| bad("manifest.json: a layer is not a string"))
        })
        .collect::<Result<_>>()?;
    if layer_names.is_empty() {
        return Err(bad("manifest.json: no layers"));
    }
    let repo_tags = img["RepoTags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect();
    let (config_bytes, config) = read_json(&entries, config_name)?;
    let config_hex = hex::encode(Sha256::digest(&config_bytes));
    // The config's file is named by its digest ("<hex>.json" or "blobs/sha256/<hex>").
    let stem = config_name
        .rsplit('/')
        .next()
        .unwrap_or(config_name)
        .trim_end_matches(".json");
    if stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()) && stem != config_hex {
        return Err(bad(format!(
            "config {config_name} hashes to sha256:{config_hex}, not the digest its name says"
        )));
    }
    if config["rootfs"]["type"].as_str() != Some("layers") {
        return Err(bad("config: rootfs.type is not \"layers\""));
    }
    let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
        .as_array()
        .ok_or_else(|| bad("config: no rootfs.diff_ids"))?
        .iter()
        .filter_map(|d| d.as_str())
        .collect();
    if diff_ids.len() != layer_names.len() {
        return Err(bad(format!(
            "manifest.json names {} layers, the config's diff_ids {}",
            layer_names.len(),
            diff_ids.len()
        )));
    }
    let layout = Layout::create(layout_dir)?;
    let mut layers = Vec::new();
    let mut descs = Vec::new();
    for (lname, want) in layer_names.iter().zip(&diff_ids) {
        let path = resolve(&entries, lname)?.to_path_buf();
        let (blob_hex, size, media) = {
            let mut f = File::open(&path).map_err(io(&path))?;
            let blob_hex = sha256_hex(&mut f).map_err(io(&path))?;
            let size = f.metadata().map_err(io(&path))?.len();
            let mut head = [0u8; 4];
            let f = File::open(&path).map_err(io(&path))?;
            let n = f.take(4).read(&mut head).map_err(io(&path))?;
            let media = if n >= 2 && head[..2] == [0x1f, 0x8b] {
                MediaType::ImageLayerGzip
            } else if n == 4 && head == [0x28, 0xb5, 0x2f, 0xfd] {
                MediaType::ImageLayerZstd
            } else {
                MediaType::ImageLayer
            };
            (blob_hex, size, media)
        };
        let diff_hex = {
            let mut r = decompressed(File::open(&path).map_err(io(&path))?)?;
            sha256_hex(&mut r).map_err(|e| bad(format!("layer {lname}: {e}")))?
        };
        if *want != format!("sha256:{diff_hex}") {
            return Err(bad(format!(
                "layer {lname}: its tar hashes to sha256:{diff_hex}, the config says {want}"
            )));
        }
        let target = layout.blobs().join(&blob_hex);
        if !target.exists() {
            // A layer file linked twice: the second use copies.
            match std::fs::rename(&path, &target) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&target, e)),
            }
            if !target.exists() {
                std::fs::copy(&path, &target).map_err(io(&target))?;
            }
        }
        let digest = format!("sha256:{blob_hex}");
        descs.push(oci::descriptor(media, &digest, size)?);
        layers.push((digest, size));
    }
    let cdesc = layout.put_blob(MediaType::ImageConfig, &config_bytes)?;
    let manifest = oci_spec::image::ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(cdesc.clone())
        .layers(descs)
        .build()
        .map_err(|e| Error::Cache(format!("manifest: {e}")))?;
    let mdesc = layout.put_blob(MediaType::ImageManifest, &oci::json(&manifest)?)?;
    layout.tag(mdesc.clone(), name)?;
    std::fs::remove_dir_all(&xdir).map_err(io(&xdir))?;
    Ok(DockerImport {
        manifest: mdesc,
        config_digest: cdesc.digest().to_string(),
        layers,
        repo_tags,
    })
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn names_stay_inside() {
        assert_eq!(normalize("./a/b/../c").as_deref(), Some("a/c"));
        assert_eq!(normalize("abc/layer.tar").as_deref(), Some("abc/layer.tar"));
        assert_eq!(normalize("../x"), None);
        assert_eq!(normalize("a/../../x"), None);
        assert_eq!(normalize("/etc/passwd"), None);
        assert_eq!(normalize("./"), None);
    }
}
