//! Disk image → OCI image: a base layer with the disk's merged tree and a "containerize"
//! layer with only the changes that make it boot as a container.

use crate::containerize::{self, Selection};
use crate::guest::Guest;
use crate::inspect::{os_info, OsInfo};
use crate::oci::{self, Compression, LayerInfo, Layout};
use crate::tarout::{self, TarStats};
use crate::{Error, Result};
use oci_spec::image::{
    Arch, ConfigBuilder, HistoryBuilder, ImageConfigurationBuilder, ImageManifestBuilder,
    MediaType, Os, RootFsBuilder,
};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Name of the image inside the layout (index.json ref name).
    pub name: String,
    pub compression: Compression,
    pub level: i32,
    pub threads: u32,
    /// Skip the containerize layer entirely (a plain export).
    pub containerize: bool,
    pub ops: Selection,
    /// Hash the source image file into the `org.fatbox.source.digest` label.
    pub source_digest: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            name: "latest".into(),
            compression: Compression::Zstd,
            level: 1,
            threads: 2,
            containerize: true,
            ops: Selection::default(),
            source_digest: true,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvertReport {
    pub layout: String,
    pub name: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub layers: Vec<LayerInfo>,
    pub base: TarStats,
    pub containerize: Vec<(String, String)>,
    pub os: OsInfo,
    pub source_digest: Option<String>,
    pub seconds: f64,
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

fn oe(e: impl std::fmt::Display) -> Error {
    Error::Other(e.to_string())
}

pub fn convert(
    guest: &Guest,
    out: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<ConvertReport> {
    let start = std::time::Instant::now();
    opts.ops.check()?;
    let layout = Layout::create(out)?;
    let src_path = guest.path.clone();
    let hasher = opts
        .source_digest
        .then(|| std::thread::spawn(move || sha256_file(&src_path)));

    let os = os_info(guest)?;
    let sink = layout.layer_sink(opts.compression, opts.level, opts.threads)?;
    let t = std::time::Instant::now();
    let (sink, base) = tarout::write_tree_to_layer(guest, sink, progress)?;
    tracing::debug!(
        tree_s = t.elapsed().as_secs_f64(),
        "base layer tree written"
    );
    let base_layer = sink.finish()?;
    tracing::debug!(total_s = t.elapsed().as_secs_f64(), "base layer stored");
    let mut layers = vec![base_layer];
    let mut history = vec![HistoryBuilder::default()
        .created_by(format!(
            "fatbox-img convert {}: the disk's files ({} entries, {} data bytes)",
            guest.path.display(),
            base.entries,
            base.data_bytes
        ))
        .build()
        .map_err(oe)?];
    let mut ops_done = Vec::new();
    if opts.containerize {
        let cs = containerize::run(guest, &opts.ops)?;
        let sink = layout.layer_sink(opts.compression, opts.level, 1)?;
        let (sink, _) = containerize::write_layer(guest, &cs, sink)?;
        layers.push(sink.finish()?);
        let lines: Vec<String> = cs
            .history
            .iter()
            .map(|(op, s)| format!("{op}: {s}"))
            .collect();
        history.push(
            HistoryBuilder::default()
                .created_by(format!("fatbox-img containerize: {}", lines.join(" | ")))
                .comment(format!("{} changes", cs.changes.len()))
                .build()
                .map_err(oe)?,
        );
        ops_done = cs.history;
    }
    let source_digest = match hasher {
        Some(h) => Some(
            h.join()
                .map_err(|_| Error::Other("source hashing thread panicked".into()))??,
        ),
        None => None,
    };

    let mut labels = HashMap::new();
    labels.insert(
        "org.fatbox.source.image".into(),
        guest.path.display().to_string(),
    );
    labels.insert(
        "org.fatbox.source.format".into(),
        guest.disk.format().into(),
    );
    if let Some(d) = &source_digest {
        labels.insert("org.fatbox.source.digest".into(), d.clone());
    }
    if let Some(v) = &os.id {
        labels.insert("org.fatbox.os.id".into(), v.clone());
    }
    if let Some(v) = &os.version_id {
        labels.insert("org.fatbox.os.version".into(), v.clone());
    }
    labels.insert("org.fatbox.init".into(), os.init.clone());
    let arch = os.arch.clone().unwrap_or_else(|| "amd64".into());
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::from(arch.as_str()))
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .env(vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                ])
                .cmd(vec!["/sbin/init".into()])
                .stop_signal("SIGRTMIN+3")
                .labels(labels)
                .build()
                .map_err(oe)?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>())
                .build()
                .map_err(oe)?,
        )
        .history(history)
        .build()
        .map_err(oe)?;
    let config_desc = layout.put_blob(MediaType::ImageConfig, &oci::json(&config)?)?;
    let layer_descs = layers
        .iter()
        .map(|l| oci::descriptor(l.media_type.clone(), &l.digest, l.size))
        .collect::<Result<Vec<_>>>()?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_desc.clone())
        .layers(layer_descs)
        .build()
        .map_err(oe)?;
    let manifest_desc = layout.put_blob(MediaType::ImageManifest, &oci::json(&manifest)?)?;
    layout.tag(manifest_desc.clone(), &opts.name)?;
    Ok(ConvertReport {
        layout: out.display().to_string(),
        name: opts.name.clone(),
        manifest_digest: manifest_desc.digest().to_string(),
        config_digest: config_desc.digest().to_string(),
        layers,
        base,
        containerize: ops_done,
        os,
        source_digest,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Unpacks every layer of an image in a layout into `dest` (flattened: whiteouts applied),
/// verifying each blob's digest.
pub fn unpack_image(layout_dir: &Path, name: Option<&str>, dest: &Path) -> Result<()> {
    let layout = Layout::open(layout_dir)?;
    let (_, manifest) = layout.manifest(name)?;
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    for l in manifest.layers() {
        let mut r = layout.open_blob(l.digest().as_ref())?;
        oci::unpack_layer(&mut r, dest, oci::UnpackMode::Flatten)?;
        r.verify()?;
    }
    Ok(())
}
