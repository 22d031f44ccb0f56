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
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// Written bytes between two writeback kicks of a layer file.
const WRITEBACK_STEP: u64 = 8 << 20;
/// Dirty bytes a layer file may keep ahead of the disk before its writer waits.
const WRITEBACK_LAG: u64 = 64 << 20;

/// A layer file whose pages are sent to the disk while it is written: the fsync at the end
/// then waits for the last few MiB instead of writing the whole layer (1.4 GiB took ~2 s
/// after the tar was done), and a big layer does not fill the page cache with dirty pages.
struct Writeback {
    file: tempfile::NamedTempFile,
    written: u64,
    kicked: u64,
    waited: u64,
}

impl Writeback {
    fn new(file: tempfile::NamedTempFile) -> Self {
        Writeback {
            file,
            written: 0,
            kicked: 0,
            waited: 0,
        }
    }

    fn sync_range(&self, from: u64, to: u64, flags: libc::c_uint) {
        let (Ok(off), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
            return;
        };
        // SAFETY: a plain syscall on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::sync_file_range(self.file.as_file().as_raw_fd(), off, len, flags) };
        if rc != 0 {
            // Only a hint: the fsync in `finish` reports real write errors.
            tracing::debug!(err = %std::io::Error::last_os_error(), "sync_file_range");
        }
    }

    fn kick(&mut self) {
        self.sync_range(self.kicked, self.written, libc::SYNC_FILE_RANGE_WRITE);
        self.kicked = self.written;
        let old = self.written.saturating_sub(WRITEBACK_LAG);
        if old > self.waited {
            self.sync_range(
                self.waited,
                old,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
            self.waited = old;
        }
    }

    fn into_inner(self) -> tempfile::NamedTempFile {
        self.file
    }
}

impl Write for Writeback {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.kicked >= WRITEBACK_STEP {
            self.kick();
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
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
    /// The chunk being filled: always `CHUNK` bytes long, `used` of them are tar.
    buf: Vec<u8>,
    used: usize,
    to_hash: Option<SyncSender<Chunk>>,
    to_blob: Option<SyncSender<Chunk>>,
    /// Empty chunks coming back from whichever consumer let go of them last.
    spare: Receiver<Vec<u8>>,
    hasher: Option<JoinHandle<(String, u64)>>,
    blob: Option<JoinHandle<std::io::Result<BlobDone>>>,
    blobs: PathBuf,
    compression: Compression,
    /// Time the producer waited for the consumers (which stage is the bottleneck).
    blocked: Duration,
}

/// Hands a chunk's buffer back to the producer once both consumers are done with it.
fn recycle(chunk: Chunk, spare: &SyncSender<Vec<u8>>) {
    // The length stays: the producer fills buffers in place and would otherwise have to
    // zero each one again.
    if let Some(v) = Arc::into_inner(chunk) {
        let _ = spare.try_send(v);
    }
}

fn spawn_hasher(rx: Receiver<Chunk>, spare: SyncSender<Vec<u8>>) -> JoinHandle<(String, u64)> {
    std::thread::spawn(move || {
        let mut h = Sha256::new();
        let mut len = 0u64;
        let mut busy = Duration::ZERO;
        for chunk in rx {
            let t = Instant::now();
            h.update(&chunk[..]);
            busy += t.elapsed();
            len += chunk.len() as u64;
            recycle(chunk, &spare);
        }
        tracing::debug!(busy_s = busy.as_secs_f64(), bytes = len, "tar hasher done");
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
        let mut busy = Duration::ZERO;
        if compression == Compression::None {
            // Chunks are large already: write them straight to the file, no second hash.
            let mut f = Writeback::new(tmp);
            for chunk in rx {
                let t = Instant::now();
                f.write_all(&chunk)?;
                busy += t.elapsed();
                recycle(chunk, &spare);
            }
            tracing::debug!(busy_s = busy.as_secs_f64(), "layer writer done");
            return Ok((f.into_inner(), None));
        }
        let mut file = Hashing::new(Writeback::new(tmp));
        let t = Instant::now();
        if compression == Compression::Zstd {
            zstd_frames(rx, &spare, &mut file, level, threads.max(1) as usize)?;
        } else {
            let mut gz = flate2::write::GzEncoder::new(
                BufWriter::with_capacity(CHUNK, &mut file),
                flate2::Compression::new(level.clamp(1, 9) as u32),
            );
            for chunk in rx {
                gz.write_all(&chunk)?;
                recycle(chunk, &spare);
            }
            gz.finish()?.into_inner().map_err(|e| e.into_error())?;
        }
        tracing::debug!(wall_s = t.elapsed().as_secs_f64(), "layer compressor done");
        let (wb, digest, size) = file.finish();
        let tmp = wb.into_inner();
        Ok((tmp, Some((digest, size))))
    })
}

/// A compression worker: chunks in, frames out, and its used output buffers back.
struct FrameWorker {
    chunks: Option<SyncSender<Chunk>>,
    frames: Receiver<std::io::Result<Vec<u8>>>,
    buffers: SyncSender<Vec<u8>>,
    handle: JoinHandle<()>,
}

/// Chunks a worker holds at most (queued, compressing, or compressed and not yet written).
const FRAMES_IN_FLIGHT: usize = 2;

fn spawn_frame_worker(level: i32, spare: SyncSender<Vec<u8>>) -> FrameWorker {
    let (chunk_tx, chunk_rx) = sync_channel::<Chunk>(FRAMES_IN_FLIGHT);
    let (frame_tx, frame_rx) = sync_channel(FRAMES_IN_FLIGHT);
    let (buf_tx, buf_rx) = sync_channel::<Vec<u8>>(FRAMES_IN_FLIGHT + 1);
    let handle = std::thread::spawn(move || {
        let mut zc = match zstd::bulk::Compressor::new(level) {
            Ok(z) => z,
            Err(e) => {
                let _ = frame_tx.send(Err(e));
                return;
            }
        };
        for chunk in chunk_rx {
            let mut out = buf_rx.try_recv().unwrap_or_default();
            out.clear();
            out.reserve(zstd::zstd_safe::compress_bound(chunk.len()));
            let r = zc.compress_to_buffer(&chunk[..], &mut out).map(|_| out);
            recycle(chunk, &spare);
            let failed = r.is_err();
            if frame_tx.send(r).is_err() || failed {
                return;
            }
        }
    });
    FrameWorker {
        chunks: Some(chunk_tx),
        frames: frame_rx,
        buffers: buf_tx,
        handle,
    }
}

/// Compresses the chunks as independent zstd frames on `threads` workers and writes the
/// frames in order. A zstd stream may hold any number of frames (RFC 8878 §3.1) and every
/// decoder reads them as one; frames of 1 MiB cost 0.2% of size against one frame. Unlike
/// the library's multithreaded mode, the workers read the shared chunks in place instead of
/// copying the whole layer into job buffers first.
fn zstd_frames(
    rx: Receiver<Chunk>,
    spare: &SyncSender<Vec<u8>>,
    out: &mut impl Write,
    level: i32,
    threads: usize,
) -> std::io::Result<()> {
    let mut workers: Vec<FrameWorker> = (0..threads)
        .map(|_| spawn_frame_worker(level, spare.clone()))
        .collect();
    let n = workers.len();
    let stopped = || std::io::Error::other("zstd worker stopped");
    // Frames are collected round-robin, in the order their chunks went out.
    let collect = |w: &FrameWorker, out: &mut dyn Write| -> std::io::Result<()> {
        let frame = w.frames.recv().map_err(|_| stopped())??;
        out.write_all(&frame)?;
        let _ = w.buffers.try_send(frame);
        Ok(())
    };
    let mut sent = 0usize;
    let mut done = 0usize;
    let mut result = Ok(());
    for chunk in rx {
        if sent - done >= n * FRAMES_IN_FLIGHT {
            if let Err(e) = collect(&workers[done % n], out) {
                result = Err(e);
                break;
            }
            done += 1;
        }
        let ok = workers[sent % n]
            .chunks
            .as_ref()
            .is_some_and(|c| c.send(chunk).is_ok());
        if !ok {
            // The worker ended on an error; its frame channel says which.
            result = collect(&workers[sent % n], out).and(Err(stopped()));
            break;
        }
        sent += 1;
    }
    if result.is_ok() {
        while done < sent {
            if let Err(e) = collect(&workers[done % n], out) {
                result = Err(e);
                break;
            }
            done += 1;
        }
    }
    for w in &mut workers {
        w.chunks = None;
    }
    for w in workers {
        // Unblock a worker waiting to hand over a frame nobody will collect.
        drop(w.frames);
        if w.handle.join().is_err() {
            result = result.and(Err(std::io::Error::other("zstd worker panicked")));
        }
    }
    result
}

impl LayerSink {
    fn send(&mut self) -> std::io::Result<()> {
        if self.used == 0 {
            return Ok(());
        }
        // A fresh buffer is calloc'ed (zero pages, no memset); a recycled one is only
        // shorter than a chunk if it was the last, partial one.
        let mut next = self.spare.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
        next.resize(CHUNK, 0);
        let mut full = std::mem::replace(&mut self.buf, next);
        full.truncate(self.used);
        self.used = 0;
        let chunk = Arc::new(full);
        let t = Instant::now();
        let ok = match (&self.to_hash, &self.to_blob) {
            (Some(h), Some(b)) => h.send(chunk.clone()).is_ok() && b.send(chunk).is_ok(),
            _ => false,
        };
        self.blocked += t.elapsed();
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
        let t = Instant::now();
        let ((diff, tar_size), (tmp, blob)) = self.join()?;
        tracing::debug!(
            producer_blocked_s = self.blocked.as_secs_f64(),
            drain_s = t.elapsed().as_secs_f64(),
            "layer consumers joined"
        );
        flushed.map_err(io(&self.blobs))?;
        let (digest, size) = blob.unwrap_or_else(|| (diff.clone(), tar_size));
        let t = Instant::now();
        tmp.as_file().sync_all().map_err(io(&self.blobs))?;
        tracing::debug!(
            fsync_s = t.elapsed().as_secs_f64(),
            size,
            "layer blob synced"
        );
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

impl LayerSink {
    /// Lets `fill` write tar bytes straight into the current chunk (file data read from the
    /// disk image lands where the hasher and compressor read it, without a copy through an
    /// intermediate buffer). `fill` gets the free part of the chunk and returns how many
    /// bytes it wrote; the total is returned.
    pub fn fill_in_place(
        &mut self,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<usize>,
    ) -> Result<usize> {
        let room = &mut self.buf[self.used..];
        let n = fill(room)?;
        if n > room.len() {
            return Err(Error::Other("in-place fill overran its chunk".into()));
        }
        self.used += n;
        if self.used == CHUNK {
            self.send().map_err(io(&self.blobs))?;
        }
        Ok(n)
    }
}

impl Write for LayerSink {
    fn write(&mut self, mut data: &[u8]) -> std::io::Result<usize> {
        let n = data.len();
        while !data.is_empty() {
            let room = &mut self.buf[self.used..];
            let k = room.len().min(data.len());
            room[..k].copy_from_slice(&data[..k]);
            self.used += k;
            data = &data[k..];
            if self.used == CHUNK {
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
            buf: vec![0u8; CHUNK],
            used: 0,
            to_hash: Some(hash_tx),
            to_blob: Some(blob_tx),
            spare: spare_rx,
            hasher: Some(hasher),
            blob: Some(blob),
            blobs,
            compression,
            blocked: Duration::ZERO,
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
