//! OCI image layouts: content-addressed blobs, manifests, configs and the index, written
//! crash-safely (temp file + fsync + rename), and layers unpacked without ever writing
//! outside the destination.

pub mod unpack;

use crate::{Error, Result};
use oci_spec::image::{
    Descriptor, DescriptorBuilder, Digest, ImageIndex, ImageIndexBuilder, ImageManifest, MediaType,
};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use unpack::{unpack_layer, unpack_layer_buffered, UnpackMode, UnpackStats};

/// Annotation naming an image inside a layout (what `skopeo` calls `oci:DIR:NAME`).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Plain tar: for a local cache, where the bytes never cross a network and compressing
    /// them would only cost CPU on import and on unpack.
    None,
    #[default]
    Zstd,
    Gzip,
}

impl Compression {
    pub fn media_type(self) -> MediaType {
        match self {
            Compression::None => MediaType::ImageLayer,
            Compression::Zstd => MediaType::ImageLayerZstd,
            Compression::Gzip => MediaType::ImageLayerGzip,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
        }
    }
}

impl FromStr for Compression {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            "gzip" => Ok(Compression::Gzip),
            _ => Err(Error::Other(format!(
                "unknown compression {s:?} (use none, zstd or gzip)"
            ))),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

/// Writes to a file under a temporary name and makes it durable and visible by rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io(dir))?;
    tmp.write_all(data).map_err(io(path))?;
    tmp.as_file().sync_all().map_err(io(path))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    fsync_dir(dir)
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Counts and hashes what passes through.
pub struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W> Hashing<W> {
    pub fn new(inner: W) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
            len: 0,
        }
    }
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hash.finalize()), self.len)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

enum Compressor<W: Write> {
    Zstd(zstd::Encoder<'static, W>),
    Gzip(flate2::write::GzEncoder<W>),
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Compressor::Zstd(e) => e.write(buf),
            Compressor::Gzip(e) => e.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Compressor::Zstd(e) => e.flush(),
            Compressor::Gzip(e) => e.flush(),
        }
    }
}

impl<W: Write> Compressor<W> {
    fn finish(self) -> std::io::Result<W> {
        match self {
            Compressor::Zstd(e) => e.finish(),
            Compressor::Gzip(e) => e.finish(),
        }
    }
}

/// A finished layer blob.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerInfo {
    /// Digest of the stored blob ("sha256:..."); the diff_id when uncompressed.
    pub digest: String,
    /// Digest of the uncompressed tar (the config's diff_id).
    pub diff_id: String,
    pub size: u64,
    pub tar_size: u64,
    #[serde(skip)]
    pub media_type: MediaType,
}

/// Bytes of tar per hand-off between the producer and the hashing/compressing threads.
const CHUNK: usize = 1 << 20;
/// Chunks in flight per consumer: bounds memory (≈ 2 × DEPTH MiB) while letting the
/// producer run ahead of a momentarily slower consumer.
const DEPTH: usize = 4;

type Chunk = Arc<Vec<u8>>;

/// What the blob thread hands back: the temp file, its digest and size (None when the
/// blob is the tar itself, whose digest the tar hasher computes).
type BlobDone = (tempfile::NamedTempFile, Option<(String, u64)>);

/// Receives an uncompressed tar stream and stores it as a content-addressed blob.
///
/// The stream is cut into 1 MiB chunks that two threads consume in parallel with the
/// producer (which reads the guest's files): one hashes the tar (the diff_id), the other
/// compresses, hashes and writes the blob. On a small host this turns three serial costs
/// (read, sha256, compress) into a pipeline bounded by the slowest of them.
pub struct LayerSink {
    buf: Vec<u8>,
    to_hash: Option<SyncSender<Chunk>>,
    to_blob: Option<SyncSender<Chunk>>,
    /// Empty chunks coming back from whichever consumer let go of them last.
    spare: Receiver<Vec<u8>>,
    hasher: Option<JoinHandle<(String, u64)>>,
    blob: Option<JoinHandle<std::io::Result<BlobDone>>>,
    blobs: PathBuf,
    compression: Compression,
}

/// Hands a chunk's buffer back to the producer once both consumers are done with it.
fn recycle(chunk: Chunk, spare: &SyncSender<Vec<u8>>) {
    if let Some(mut v) = Arc::into_inner(chunk) {
        v.clear();
        let _ = spare.try_send(v);
    }
}

fn spawn_hasher(rx: Receiver<Chunk>, spare: SyncSender<Vec<u8>>) -> JoinHandle<(String, u64)> {
    std::thread::spawn(move || {
        let mut h = Sha256::new();
        let mut len = 0u64;
        for chunk in rx {
            h.update(&chunk[..]);
            len += chunk.len() as u64;
            recycle(chunk, &spare);
        }
        (hex::encode(h.finalize()), len)
    })
}

fn spawn_blob_writer(
    rx: Receiver<Chunk>,
    spare: SyncSender<Vec<u8>>,
    tmp: tempfile::NamedTempFile,
    compression: Compression,
    level: i32,
    threads: u32,
) -> JoinHandle<std::io::Result<BlobDone>> {
    std::thread::spawn(move || {
        if compression == Compression::None {
            // Chunks are large already: write them straight to the file, no second hash.
            let mut f = tmp;
            for chunk in rx {
                f.write_all(&chunk)?;
                recycle(chunk, &spare);
            }
            return Ok((f, None));
        }
        let file = Hashing::new(BufWriter::with_capacity(CHUNK, tmp));
        let mut comp = match compression {
            Compression::Gzip => Compressor::Gzip(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::new(level.clamp(1, 9) as u32),
            )),
            _ => {
                let mut e = zstd::Encoder::new(file, level)?;
                if threads > 1 {
                    e.multithread(threads)?;
                }
                Compressor::Zstd(e)
            }
        };
        for chunk in rx {
            comp.write_all(&chunk)?;
            recycle(chunk, &spare);
        }
        let (buf, digest, size) = comp.finish()?.finish();
        let tmp = buf.into_inner().map_err(|e| e.into_error())?;
        Ok((tmp, Some((digest, size))))
    })
}

impl LayerSink {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = self
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
        let chunk = Arc::new(std::mem::replace(&mut self.buf, next));
        let ok = match (&self.to_hash, &self.to_blob) {
            (Some(h), Some(b)) => h.send(chunk.clone()).is_ok() && b.send(chunk).is_ok(),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(self.stopped())
        }
    }

    /// Why a consumer stopped early (the blob write failed: disk full, ...): its own error,
    /// so the user sees the cause rather than a broken pipe.
    fn stopped(&mut self) -> std::io::Error {
        self.to_hash = None;
        self.to_blob = None;
        let why = match self.blob.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => std::io::Error::other("layer writer thread panicked"),
            _ => std::io::Error::new(std::io::ErrorKind::BrokenPipe, "layer writer stopped"),
        };
        if let Some(h) = self.hasher.take() {
            let _ = h.join();
        }
        why
    }

    fn join(&mut self) -> Result<((String, u64), BlobDone)> {
        self.to_hash = None;
        self.to_blob = None;
        let panicked = || Error::Other("layer writer thread panicked".into());
        let Some(blob) = self.blob.take() else {
            let why = self.stopped();
            return Err(Error::io(&self.blobs, why));
        };
        let blob = blob
            .join()
            .map_err(|_| panicked())?
            .map_err(io(&self.blobs))?;
        let tar = self
            .hasher
            .take()
            .ok_or_else(panicked)?
            .join()
            .map_err(|_| panicked())?;
        Ok((tar, blob))
    }

    pub fn finish(mut self) -> Result<LayerInfo> {
        let flushed = self.send();
        let ((diff, tar_size), (tmp, blob)) = self.join()?;
        flushed.map_err(io(&self.blobs))?;
        let (digest, size) = blob.unwrap_or_else(|| (diff.clone(), tar_size));
        tmp.as_file().sync_all().map_err(io(&self.blobs))?;
        let dest = self.blobs.join(&digest);
        tmp.persist(&dest).map_err(|e| Error::io(&dest, e.error))?;
        fsync_dir(&self.blobs)?;
        Ok(LayerInfo {
            digest: format!("sha256:{digest}"),
            diff_id: format!("sha256:{diff}"),
            size,
            tar_size,
            media_type: self.compression.media_type(),
        })
    }
}

impl Write for LayerSink {
    fn write(&mut self, mut data: &[u8]) -> std::io::Result<usize> {
        let n = data.len();
        while !data.is_empty() {
            let room = CHUNK - self.buf.len();
            let (now, rest) = data.split_at(room.min(data.len()));
            self.buf.extend_from_slice(now);
            data = rest;
            if self.buf.len() == CHUNK {
                self.send()?;
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LayerSink {
    fn drop(&mut self) {
        // Abandoned (an error upstream): stop the threads; the temp file deletes itself.
        if self.blob.is_some() || self.hasher.is_some() {
            let _ = self.stopped();
        }
    }
}

/// An OCI image layout directory.
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    /// Opens a layout, creating it if the directory is missing or empty.
    pub fn create(dir: &Path) -> Result<Layout> {
        std::fs::create_dir_all(dir.join("blobs/sha256")).map_err(io(dir))?;
        let marker = dir.join("oci-layout");
        if !marker.exists() {
            write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = dir.join("index.json");
        if !index.exists() {
            let idx = ImageIndexBuilder::default()
                .schema_version(2u32)
                .media_type(MediaType::ImageIndex)
                .manifests(Vec::<Descriptor>::new())
                .build()
                .map_err(|e| Error::Other(e.to_string()))?;
            write_atomic(&index, &json(&idx)?)?;
        }
        Ok(Layout {
            dir: dir.to_path_buf(),
        })
    }

    /// Opens an existing layout.
    pub fn open(dir: &Path) -> Result<Layout> {
        if !dir.join("oci-layout").is_file() || !dir.join("index.json").is_file() {
            return Err(Error::NotFound(format!(
                "{} is not an OCI image layout (no oci-layout / index.json)",
                dir.display()
            )));
        }
        Ok(Layout {
            dir: dir.to_path_buf(),
        })
    }

    pub fn blobs(&self) -> PathBuf {
        self.dir.join("blobs/sha256")
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| Error::Other(format!("invalid digest {digest:?}")))?;
        Ok(self.blobs().join(hex))
    }

    /// Starts a layer blob; `threads` > 1 compresses zstd on several threads.
    pub fn layer_sink(
        &self,
        compression: Compression,
        level: i32,
        threads: u32,
    ) -> Result<LayerSink> {
        let blobs = self.blobs();
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-layer-")
            .tempfile_in(&blobs)
            .map_err(io(&blobs))?;
        if compression == Compression::Zstd {
            // Fail here, not in the thread, on a level zstd does not know.
            let range = zstd::compression_level_range();
            if !range.contains(&level) {
                return Err(Error::Other(format!(
                    "zstd level {level} outside {}..={}",
                    range.start(),
                    range.end()
                )));
            }
        }
        let (hash_tx, hash_rx) = sync_channel(DEPTH);
        let (blob_tx, blob_rx) = sync_channel(DEPTH);
        let (spare_tx, spare_rx) = sync_channel(2 * DEPTH + 2);
        let hasher = spawn_hasher(hash_rx, spare_tx.clone());
        let blob = spawn_blob_writer(blob_rx, spare_tx, tmp, compression, level, threads);
        Ok(LayerSink {
            buf: Vec::with_capacity(CHUNK),
            to_hash: Some(hash_tx),
            to_blob: Some(blob_tx),
            spare: spare_rx,
            hasher: Some(hasher),
            blob: Some(blob),
            blobs,
            compression,
        })
    }

    /// Stores a small blob (config, manifest) and returns its descriptor.
    pub fn put_blob(&self, media_type: MediaType, data: &[u8]) -> Result<Descriptor> {
        let hex = hex::encode(Sha256::digest(data));
        let path = self.blobs().join(&hex);
        if !path.exists() {
            write_atomic(&path, data)?;
        }
        descriptor(media_type, &format!("sha256:{hex}"), data.len() as u64)
    }

    pub fn index(&self) -> Result<ImageIndex> {
        let p = self.dir.join("index.json");
        let data = std::fs::read(&p).map_err(io(&p))?;
        serde_json::from_slice(&data)
            .map_err(|e| Error::Other(format!("{}: invalid index.json: {e}", p.display())))
    }

    /// Points `name` at a manifest in index.json (replacing what it named before).
    pub fn tag(&self, manifest: Descriptor, name: &str) -> Result<()> {
        let mut index = self.index()?;
        let mut manifests: Vec<Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| ref_name(d) != Some(name))
            .cloned()
            .collect();
        let mut ann = HashMap::new();
        ann.insert(REF_NAME.to_string(), name.to_string());
        let mut d = manifest;
        d.set_annotations(Some(ann));
        manifests.push(d);
        index.set_manifests(manifests);
        write_atomic(&self.dir.join("index.json"), &json(&index)?)
    }

    /// The manifest `name` points at (or the only one, when `name` is None).
    pub fn manifest(&self, name: Option<&str>) -> Result<(Descriptor, ImageManifest)> {
        let index = self.index()?;
        let found: Vec<&Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| name.is_none() || ref_name(d) == name)
            .collect();
        let d = match (found.as_slice(), name) {
            ([d], _) => (*d).clone(),
            ([], Some(n)) => {
                return Err(Error::NotFound(format!(
                    "no image named {n:?} in {}",
                    self.dir.display()
                )))
            }
            (_, _) => {
                return Err(Error::Other(format!(
                    "{} holds {} images: name one",
                    self.dir.display(),
                    found.len()
                )))
            }
        };
        let data = self.read_blob(d.digest().as_ref())?;
        let m: ImageManifest = serde_json::from_slice(&data)
            .map_err(|e| Error::Other(format!("invalid manifest {}: {e}", d.digest())))?;
        Ok((d, m))
    }

    /// Reads a small blob whole, verifying its digest.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let mut r = self.open_blob(digest)?;
        let mut data = Vec::new();
        r.read_to_end(&mut data)
            .map_err(|e| Error::io(self.blob_path(digest).unwrap_or_default(), e))?;
        r.verify()?;
        Ok(data)
    }

    /// Opens a blob for streaming; call [`VerifyingReader::verify`] after reading it all.
    pub fn open_blob(&self, digest: &str) -> Result<VerifyingReader<File>> {
        let p = self.blob_path(digest)?;
        let f = File::open(&p).map_err(io(&p))?;
        Ok(VerifyingReader {
            inner: f,
            hash: Sha256::new(),
            expected: digest.to_string(),
        })
    }
}

/// A reader that hashes what it reads, to check a blob against its digest at the end.
pub struct VerifyingReader<R> {
    inner: R,
    hash: Sha256,
    expected: String,
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

impl<R: Read> VerifyingReader<R> {
    /// Drains what is left and compares the digest.
    pub fn verify(mut self) -> Result<()> {
        let mut buf = [0u8; 64 << 10];
        loop {
            match self.inner.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.hash.update(&buf[..n]),
                Err(e) => return Err(Error::io(&self.expected, e)),
            }
        }
        let got = format!("sha256:{}", hex::encode(self.hash.finalize()));
        if got != self.expected {
            return Err(Error::corrupt(
                format!("blob {} has digest {got}", self.expected),
                0,
            ));
        }
        Ok(())
    }
}

pub fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(REF_NAME))
        .map(String::as_str)
}

pub fn descriptor(media_type: MediaType, digest: &str, size: u64) -> Result<Descriptor> {
    let digest = Digest::from_str(digest).map_err(|e| Error::Other(e.to_string()))?;
    DescriptorBuilder::default()
        .media_type(media_type)
        .digest(digest)
        .size(size)
        .build()
        .map_err(|e| Error::Other(e.to_string()))
}

pub fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::Other(e.to_string()))
}
