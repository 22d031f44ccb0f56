//! qcow2 reader (QEMU docs/interop/qcow2.rst), versions 2 and 3, read-only.
//!
//! The image is untrusted: every offset taken from it is bounds-checked against the file,
//! tables are only allocated after their size has been checked against caps, and
//! decompressed clusters are capped at the cluster size.

use super::{BlockDevice, ChainCtx, Device, ImageInfo, OpenOptions};
use crate::{Error, Result};
use lru::LruCache;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Virtual sizes beyond this are refused: no real VM image comes near it and it bounds
/// the L1 table we allocate.
pub const MAX_VIRTUAL_SIZE: u64 = 16 << 40;
/// QEMU's own cap on the active L1 table.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Total memory for cached L2 tables; the table count is derived from the cluster size.
const L2_CACHE_BYTES: u64 = 32 << 20;
const L2_CACHE_MAX_TABLES: u64 = 64;
/// The ext4 reader reads 4 KiB blocks one at a time, so keep the last few inflated clusters.
const COMPRESSED_CACHE_CLUSTERS: usize = 8;
const MAX_BACKING_NAME: u32 = 1023;
const ZSTD_POOL: usize = 4;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;

const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
const SUBCLUSTERS: u64 = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

impl Compression {
    fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// What one guest range maps to.
#[derive(Debug, Clone, Copy)]
enum Extent {
    /// Host byte offset in the image file.
    Data(u64),
    Zero,
    /// Unallocated here: the backing file, or zeros without one.
    Backing,
    /// The raw L2 descriptor of a compressed cluster.
    Compressed(u64),
}

pub struct Qcow2 {
    file: Device,
    path: PathBuf,
    version: u32,
    cluster_bits: u32,
    cluster_size: u64,
    size: u64,
    extended_l2: bool,
    compression: Compression,
    /// Only the entries needed to cover `size` are kept.
    l1: Vec<u64>,
    l1_offset: u64,
    l2_entries: u64,
    l2_cache: Mutex<LruCache<u64, Arc<Vec<u64>>>>,
    zcache: Mutex<LruCache<u64, Arc<Vec<u8>>>>,
    /// Idle zstd contexts: creating one per cluster costs more than decoding a 64 KiB cluster.
    zstd_pool: Mutex<Vec<zstd::stream::raw::Decoder<'static>>>,
    backing: Option<Device>,
    backing_name: Option<String>,
}

fn be32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes(s.try_into().ok()?))
}

fn be64(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_be_bytes(s.try_into().ok()?))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The caches stay consistent even if a holder panicked: entries are inserted whole.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn truncated(what: &str, offset: u64) -> Error {
    Error::corrupt(format!("qcow2 {what} truncated"), offset)
}

/// The names the image gives its own feature bits (feature name table extension).
fn feature_name(table: &[(u8, u8, String)], kind: u8, bit: u32) -> String {
    table
        .iter()
        .find(|(k, b, _)| *k == kind && u32::from(*b) == bit)
        .map(|(_, _, n)| format!(" ({n})"))
        .unwrap_or_default()
}

impl Qcow2 {
    /// Opens a qcow2 image stored on `dev` (a file or memory). `name` is the image's path:
    /// relative backing file names are resolved against its directory under `opts`.
    pub fn from_device(dev: Device, name: &Path, opts: &OpenOptions) -> Result<Qcow2> {
        let mut ctx = ChainCtx::new(name, opts);
        if let Ok(c) = name.canonicalize() {
            ctx.seen.push(c);
        }
        Qcow2::open_in_chain(dev, name, &mut ctx)
    }

    pub(crate) fn open_in_chain(dev: Device, name: &Path, ctx: &mut ChainCtx) -> Result<Qcow2> {
        let file_size = dev.size();
        // The fixed header is at most 112 bytes; anything shorter than the v2 header is cut.
        let mut fixed = [0u8; 112];
        let fixed_len = usize::try_from(file_size.min(112)).unwrap_or(112);
        let fixed_buf = fixed
            .get_mut(..fixed_len)
            .ok_or_else(|| truncated("header", 0))?;
        dev.read_at(fixed_buf, 0)?;
        let hdr = fixed_buf;
        if hdr.get(..4) != Some(&MAGIC[..]) {
            return Err(Error::corrupt("not a qcow2 image (bad magic)", 0));
        }
        let field32 = |off: usize| be32(hdr, off).ok_or_else(|| truncated("header", off as u64));
        let field64 = |off: usize| be64(hdr, off).ok_or_else(|| truncated("header", off as u64));
        let version = field32(4)?;
        if version != 2 && version != 3 {
            return Err(Error::Unsupported(format!("qcow2 version {version}")));
        }
        let backing_file_offset = field64(8)?;
        let backing_file_size = field32(16)?;
        let cluster_bits = field32(20)?;
        let size = field64(24)?;
        let crypt_method = field32(32)?;
        let l1_size = field32(36)?;
        let l1_offset = field64(40)?;
        let (incompat, header_length) = if version == 3 {
            (field64(72)?, field32(100)?)
        } else {
            (0, 72)
        };
        if !(9..=21).contains(&cluster_bits) {
            return Err(Error::corrupt(
                format!("qcow2 cluster_bits {cluster_bits} outside 9..=21"),
                20,
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        if version == 3 && (header_length < 104 || u64::from(header_length) > cluster_size) {
            return Err(Error::corrupt(
                format!("qcow2 header length {header_length} invalid"),
                100,
            ));
        }
        if u64::from(header_length) > file_size {
            return Err(truncated("header", 0));
        }
        if crypt_method != 0 {
            return Err(Error::Unsupported(format!(
                "encrypted qcow2 (crypt_method {crypt_method})"
            )));
        }

        // The rest of the header area (extensions, backing name) lives in the first cluster.
        let first_len = usize::try_from(file_size.min(cluster_size))
            .map_err(|_| Error::Limit("cluster size".into()))?;
        let mut first = vec![0u8; first_len];
        dev.read_at(&mut first, 0)?;

        let mut features: Vec<(u8, u8, String)> = Vec::new();
        let mut backing_format: Option<String> = None;
        let mut has_data_file_ext = false;
        let ext_end = if backing_file_offset != 0 && backing_file_offset < cluster_size {
            backing_file_offset
        } else {
            cluster_size
        };
        let mut off = u64::from(header_length);
        while off < ext_end {
            let o = usize::try_from(off).map_err(|_| truncated("header extension", off))?;
            let (Some(kind), Some(len)) = (be32(&first, o), be32(&first, o.saturating_add(4)))
            else {
                return Err(truncated("header extension", off));
            };
            let data_start = off + 8;
            let data_end = data_start + u64::from(len);
            if data_end > ext_end {
                return Err(Error::corrupt("qcow2 header extension too large", off));
            }
            let data = usize::try_from(data_start)
                .ok()
                .zip(usize::try_from(data_end).ok())
                .and_then(|(s, e)| first.get(s..e))
                .ok_or_else(|| truncated("header extension", off))?;
            match kind {
                EXT_END => break,
                EXT_BACKING_FORMAT => {
                    backing_format = Some(
                        std::str::from_utf8(data)
                            .map_err(|_| Error::corrupt("qcow2 backing format not UTF-8", off))?
                            .to_string(),
                    );
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let (Some(&k), Some(&b)) = (e.first(), e.get(1)) else {
                            continue;
                        };
                        let n = e.get(2..).unwrap_or_default();
                        let n = n.split(|c| *c == 0).next().unwrap_or_default();
                        features.push((k, b, String::from_utf8_lossy(n).into_owned()));
                    }
                }
                EXT_DATA_FILE => has_data_file_ext = true,
                _ => {}
            }
            off = data_start + ((u64::from(len) + 7) & !7);
        }

        if incompat & INCOMPAT_DATA_FILE != 0 || has_data_file_ext {
            return Err(Error::Refused(
                "qcow2 external data file (incompatible feature bit 2)".into(),
            ));
        }
        let unknown = incompat & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            return Err(Error::Unsupported(format!(
                "qcow2 unknown incompatible feature bit {bit}{}",
                feature_name(&features, 0, bit)
            )));
        }
        if incompat & INCOMPAT_CORRUPT != 0 {
            return Err(Error::corrupt(
                "qcow2 image is marked corrupt (incompatible feature bit 1; run qemu-img check -r)",
                72,
            ));
        }
        if incompat & INCOMPAT_DIRTY != 0 {
            tracing::warn!(image = %name.display(), "qcow2 dirty bit set: refcounts may be stale, reading anyway");
        }
        let compression = if version == 3 && header_length > 104 {
            match first.get(104) {
                Some(0) => Compression::Zlib,
                Some(1) => Compression::Zstd,
                Some(t) => return Err(Error::Unsupported(format!("qcow2 compression type {t}"))),
                None => return Err(truncated("header", 104)),
            }
        } else {
            Compression::Zlib
        };
        let extended_l2 = incompat & INCOMPAT_EXTL2 != 0;
        if extended_l2 && cluster_bits < 14 {
            return Err(Error::corrupt(
                "qcow2 extended L2 needs clusters of at least 16 KiB",
                20,
            ));
        }

        if size > MAX_VIRTUAL_SIZE {
            return Err(Error::Limit(format!(
                "qcow2 virtual size {size} exceeds {MAX_VIRTUAL_SIZE}"
            )));
        }
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(Error::Limit(format!(
                "qcow2 L1 table of {l1_size} entries exceeds {MAX_L1_BYTES} bytes"
            )));
        }
        let entry_bytes: u64 = if extended_l2 { 16 } else { 8 };
        let l2_entries = cluster_size / entry_bytes;
        let clusters = size.div_ceil(cluster_size);
        let needed = clusters.div_ceil(l2_entries);
        if u64::from(l1_size) < needed {
            return Err(Error::corrupt(
                format!("qcow2 L1 table has {l1_size} entries, virtual size needs {needed}"),
                36,
            ));
        }
        if needed > 0 && l1_offset % cluster_size != 0 {
            return Err(Error::corrupt(
                "qcow2 L1 table offset not cluster aligned",
                l1_offset,
            ));
        }
        let l1_bytes = needed * 8;
        if l1_offset
            .checked_add(l1_bytes)
            .is_none_or(|e| e > file_size)
        {
            return Err(Error::corrupt(
                "qcow2 L1 table lies past the end of the file",
                l1_offset,
            ));
        }
        let mut raw_l1 =
            vec![0u8; usize::try_from(l1_bytes).map_err(|_| Error::Limit("L1".into()))?];
        if needed > 0 {
            dev.read_at(&mut raw_l1, l1_offset)?;
        }
        let l1: Vec<u64> = raw_l1
            .chunks_exact(8)
            .map(|c| c.try_into().map(u64::from_be_bytes).unwrap_or(0))
            .collect();

        let backing_name = if backing_file_offset != 0 && backing_file_size != 0 {
            if backing_file_size > MAX_BACKING_NAME {
                return Err(Error::corrupt("qcow2 backing file name too long", 16));
            }
            let s = usize::try_from(backing_file_offset).ok();
            let bytes = s
                .and_then(|s| first.get(s..s.checked_add(backing_file_size as usize)?))
                .ok_or_else(|| {
                    Error::corrupt(
                        "qcow2 backing file name outside the first cluster",
                        backing_file_offset,
                    )
                })?;
            Some(
                std::str::from_utf8(bytes)
                    .map_err(|_| {
                        Error::corrupt("qcow2 backing file name not UTF-8", backing_file_offset)
                    })?
                    .to_string(),
            )
        } else {
            None
        };

        let backing = match &backing_name {
            Some(b) => {
                let path = ctx.resolve_backing(name, b)?;
                let fmt = match backing_format.as_deref() {
                    None => None,
                    Some(f @ ("raw" | "qcow2")) => Some(f),
                    Some(f) => {
                        return Err(Error::Unsupported(format!(
                            "qcow2 backing file format {f:?}"
                        )))
                    }
                };
                Some(super::open_layer(&path, fmt, ctx)?)
            }
            None => None,
        };

        let tables = (L2_CACHE_BYTES / cluster_size).clamp(4, L2_CACHE_MAX_TABLES) as usize;
        Ok(Qcow2 {
            file: dev,
            path: name.to_path_buf(),
            version,
            cluster_bits,
            cluster_size,
            size,
            extended_l2,
            compression,
            l1,
            l1_offset,
            l2_entries,
            l2_cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(tables).unwrap_or(NonZeroUsize::MIN),
            )),
            zcache: Mutex::new(LruCache::new(
                NonZeroUsize::new(COMPRESSED_CACHE_CLUSTERS).unwrap_or(NonZeroUsize::MIN),
            )),
            zstd_pool: Mutex::new(Vec::new()),
            backing,
            backing_name,
        })
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    pub fn backing(&self) -> Option<&Device> {
        self.backing.as_ref()
    }

    fn l2_table(&self, l2_off: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(t) = lock(&self.l2_cache).get(&l2_off) {
            return Ok(t.clone());
        }
        if l2_off
            .checked_add(self.cluster_size)
            .is_none_or(|e| e > self.file.size())
        {
            return Err(Error::corrupt("qcow2 L2 table past end of file", l2_off));
        }
        let mut raw = vec![0u8; self.cluster_size as usize];
        self.file.read_at(&mut raw, l2_off)?;
        let t: Arc<Vec<u64>> = Arc::new(
            raw.chunks_exact(8)
                .map(|c| c.try_into().map(u64::from_be_bytes).unwrap_or(0))
                .collect(),
        );
        lock(&self.l2_cache).put(l2_off, t.clone());
        Ok(t)
    }

    /// Maps guest `offset` (< size) to an extent and the number of bytes from `offset`
    /// that share that mapping (never crossing a cluster boundary).
    fn map(&self, offset: u64) -> Result<(Extent, u64)> {
        let cs = self.cluster_size;
        let cluster = offset >> self.cluster_bits;
        let in_cluster = offset & (cs - 1);
        let to_end = cs - in_cluster;
        let l1_idx = cluster / self.l2_entries;
        let l1e = usize::try_from(l1_idx)
            .ok()
            .and_then(|i| self.l1.get(i))
            .copied()
            .ok_or_else(|| Error::corrupt("qcow2 offset beyond L1 table", offset))?;
        let l2_off = l1e & L1_OFFSET_MASK;
        if l2_off == 0 {
            return Ok((Extent::Backing, to_end));
        }
        if l2_off & (cs - 1) != 0 {
            return Err(Error::corrupt(
                "qcow2 L1 entry: L2 table offset not cluster aligned",
                self.l1_offset.saturating_add(l1_idx * 8),
            ));
        }
        let table = self.l2_table(l2_off)?;
        let l2_idx = cluster % self.l2_entries;
        let step = if self.extended_l2 { 2 } else { 1 };
        let pos = usize::try_from(l2_idx * step).unwrap_or(usize::MAX);
        let entry = table
            .get(pos)
            .copied()
            .ok_or_else(|| Error::corrupt("qcow2 L2 index out of range", l2_off))?;
        let entry_loc = l2_off.saturating_add(l2_idx * step * 8);
        if entry & L2_COMPRESSED != 0 {
            return Ok((Extent::Compressed(entry), to_end));
        }
        let host = entry & L2_OFFSET_MASK;
        if host & (cs - 1) != 0 {
            return Err(Error::corrupt(
                "qcow2 L2 entry: data cluster offset not cluster aligned",
                entry_loc,
            ));
        }
        if !self.extended_l2 {
            if self.version >= 3 && entry & L2_ZERO != 0 {
                return Ok((Extent::Zero, to_end));
            }
            if host == 0 {
                return Ok((Extent::Backing, to_end));
            }
            return Ok((Extent::Data(host + in_cluster), to_end));
        }
        let bitmap = table.get(pos + 1).copied().unwrap_or(0);
        let sc_size = cs / SUBCLUSTERS;
        let state = |sc: u64| -> Result<u8> {
            let alloc = (bitmap >> sc) & 1 != 0;
            let zero = (bitmap >> (32 + sc)) & 1 != 0;
            match (alloc, zero) {
                (true, true) => Err(Error::corrupt(
                    "qcow2 extended L2 entry: subcluster both allocated and zero",
                    entry_loc,
                )),
                (true, false) if host == 0 => Err(Error::corrupt(
                    "qcow2 extended L2 entry: allocated subcluster without a host cluster",
                    entry_loc,
                )),
                (true, false) => Ok(0),
                (false, true) => Ok(1),
                (false, false) => Ok(2),
            }
        };
        let first = in_cluster / sc_size;
        let st = state(first)?;
        let mut end = first + 1;
        while end < SUBCLUSTERS && state(end)? == st {
            end += 1;
        }
        let len = end * sc_size - in_cluster;
        let ext = match st {
            0 => Extent::Data(host + in_cluster),
            1 => Extent::Zero,
            _ => Extent::Backing,
        };
        Ok((ext, len))
    }

    /// Reads host bytes; an allocated cluster that starts inside the file but is cut
    /// short by its end reads zeros for the missing part, as QEMU does.
    fn read_host(&self, buf: &mut [u8], host: u64) -> Result<()> {
        let fsize = self.file.size();
        if host >= fsize {
            return Err(Error::corrupt("qcow2 data cluster past end of file", host));
        }
        let avail = usize::try_from(fsize - host)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let (head, tail) = buf.split_at_mut(avail);
        self.file.read_at(head, host)?;
        tail.fill(0);
        Ok(())
    }

    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        // A backing file shorter than the overlay reads as zeros past its end.
        let bsize = b.size();
        let avail = usize::try_from(bsize.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let (head, tail) = buf.split_at_mut(avail);
        if !head.is_empty() {
            b.read_at(head, offset)?;
        }
        tail.fill(0);
        Ok(())
    }

    fn compressed_cluster(&self, entry: u64) -> Result<Arc<Vec<u8>>> {
        let x = 62 - (self.cluster_bits - 8);
        let desc = entry & ((1u64 << 62) - 1);
        let coff = desc & ((1u64 << x) - 1);
        let sectors = (desc >> x) + 1;
        if let Some(c) = lock(&self.zcache).get(&coff) {
            return Ok(c.clone());
        }
        let csize = sectors * 512 - (coff & 511);
        let fsize = self.file.size();
        if coff >= fsize {
            return Err(Error::corrupt(
                "qcow2 compressed cluster past end of file",
                coff,
            ));
        }
        // The last compressed cluster may be shorter than its sector count says.
        let clen = csize.min(fsize - coff) as usize;
        let mut src = vec![0u8; clen];
        self.file.read_at(&mut src, coff)?;
        let mut out = vec![0u8; self.cluster_size as usize];
        let res = match self.compression {
            Compression::Zlib => inflate_zlib(&src, &mut out),
            Compression::Zstd => {
                let pooled = lock(&self.zstd_pool).pop();
                let mut dec = match pooled {
                    Some(d) => d,
                    None => new_zstd(self.cluster_bits).map_err(|why| {
                        Error::corrupt(format!("qcow2 compressed cluster: {why}"), coff)
                    })?,
                };
                let r = inflate_zstd(&mut dec, &src, &mut out);
                let mut pool = lock(&self.zstd_pool);
                if pool.len() < ZSTD_POOL {
                    pool.push(dec);
                }
                r
            }
        };
        res.map_err(|why| Error::corrupt(format!("qcow2 compressed cluster: {why}"), coff))?;
        let out = Arc::new(out);
        lock(&self.zcache).put(coff, out.clone());
        Ok(out)
    }
}

/// Raw deflate (no zlib header), exactly one cluster of output.
fn inflate_zlib(src: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut d = Decompress::new(false);
    let mut done = false;
    loop {
        let (ip, op) = (d.total_in() as usize, d.total_out() as usize);
        let (Some(i), Some(o)) = (src.get(ip..), out.get_mut(op..)) else {
            return Err("inflate state out of range".into());
        };
        if o.is_empty() {
            break;
        }
        let st = d
            .decompress(i, o, FlushDecompress::None)
            .map_err(|e| format!("inflate: {e}"))?;
        if st == Status::StreamEnd {
            done = true;
            break;
        }
        if d.total_in() as usize == ip && d.total_out() as usize == op {
            return Err("compressed data truncated".into());
        }
    }
    if (d.total_out() as usize) < out.len() {
        return Err(format!(
            "inflates to {} bytes, less than the cluster size {}",
            d.total_out(),
            out.len()
        ));
    }
    if !done {
        let mut extra = [0u8; 1];
        let i = src.get(d.total_in() as usize..).unwrap_or_default();
        let _ = d.decompress(i, &mut extra, FlushDecompress::None);
        if d.total_out() as usize > out.len() {
            return Err("inflates past the cluster size".into());
        }
    }
    Ok(())
}

fn new_zstd(cluster_bits: u32) -> std::result::Result<zstd::stream::raw::Decoder<'static>, String> {
    use zstd::stream::raw::{DParameter, Decoder};
    let mut dec = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
    // Bound the decoder's window allocation; a cluster never needs more than itself.
    dec.set_parameter(DParameter::WindowLogMax(cluster_bits.max(21) + 1))
        .map_err(|e| format!("zstd: {e}"))?;
    Ok(dec)
}

/// One zstd frame, exactly one cluster of output; trailing padding after the frame is
/// ignored, output beyond the cluster is corruption.
fn inflate_zstd(
    dec: &mut zstd::stream::raw::Decoder<'static>,
    src: &[u8],
    out: &mut [u8],
) -> std::result::Result<(), String> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    // A pooled context may hold the state of a failed frame.
    dec.reinit().map_err(|e| format!("zstd: {e}"))?;
    let mut input = InBuffer::around(src);
    let out_len = out.len();
    let mut output = OutBuffer::around(out);
    let mut frame_done = false;
    while output.pos() < out_len {
        let (ip, op) = (input.pos(), output.pos());
        let hint = dec
            .run(&mut input, &mut output)
            .map_err(|e| format!("zstd: {e}"))?;
        if hint == 0 {
            frame_done = true;
            break;
        }
        if input.pos() == ip && output.pos() == op {
            return Err("compressed data truncated".into());
        }
    }
    if output.pos() < out_len {
        return Err(format!(
            "decompresses to {} bytes, less than the cluster size {out_len}",
            output.pos()
        ));
    }
    if !frame_done {
        let mut extra = [0u8; 1];
        let mut eo = OutBuffer::around(&mut extra[..]);
        let _ = dec.run(&mut input, &mut eo);
        if eo.pos() > 0 {
            return Err("decompresses past the cluster size".into());
        }
    }
    Ok(())
}

impl BlockDevice for Qcow2 {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(Error::corrupt(
                format!("read of {} bytes past the qcow2 virtual size", buf.len()),
                offset,
            ));
        }
        // Pending run of contiguous host data: (buffer start, host start, length).
        let mut run: Option<(usize, u64, usize)> = None;
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let (ext, avail) = self.map(off)?;
            let n = usize::try_from(avail)
                .unwrap_or(usize::MAX)
                .min(buf.len() - pos);
            if let Extent::Data(h) = ext {
                match &mut run {
                    Some((bs, hs, len)) if *bs + *len == pos && *hs + *len as u64 == h => {
                        *len += n;
                    }
                    _ => {
                        if let Some((bs, hs, len)) = run.take() {
                            self.read_host(&mut buf[bs..bs + len], hs)?;
                        }
                        run = Some((pos, h, n));
                    }
                }
                pos += n;
                continue;
            }
            if let Some((bs, hs, len)) = run.take() {
                self.read_host(&mut buf[bs..bs + len], hs)?;
            }
            let dst = &mut buf[pos..pos + n];
            match ext {
                Extent::Zero => dst.fill(0),
                Extent::Backing => self.read_backing(dst, off)?,
                Extent::Compressed(entry) => {
                    let c = self.compressed_cluster(entry)?;
                    let s = (off & (self.cluster_size - 1)) as usize;
                    let src = c
                        .get(s..s + n)
                        .ok_or_else(|| Error::corrupt("qcow2 compressed cluster short", off))?;
                    dst.copy_from_slice(src);
                }
                Extent::Data(_) => {}
            }
            pos += n;
        }
        if let Some((bs, hs, len)) = run {
            self.read_host(&mut buf[bs..bs + len], hs)?;
        }
        Ok(())
    }

    fn format(&self) -> &'static str {
        "qcow2"
    }

    fn chain(&self) -> Vec<ImageInfo> {
        let mut v = vec![ImageInfo {
            path: self.path.clone(),
            format: "qcow2".into(),
            virtual_size: self.size,
            compat: Some(if self.version == 2 { "0.10" } else { "1.1" }.into()),
            cluster_size: Some(self.cluster_size),
            compression: Some(self.compression.name().into()),
            backing_file: self.backing_name.clone(),
        }];
        if let Some(b) = &self.backing {
            v.extend(b.chain());
        }
        v
    }

    fn is_zero(&self, offset: u64, len: u64) -> bool {
        let Some(end) = offset.checked_add(len).filter(|e| *e <= self.size) else {
            return false;
        };
        let mut off = offset;
        while off < end {
            let Ok((ext, avail)) = self.map(off) else {
                return false;
            };
            let n = avail.min(end - off);
            let zero = match ext {
                Extent::Zero => true,
                Extent::Backing => match &self.backing {
                    None => true,
                    // Past the backing file's end reads as zeros.
                    Some(b) => off >= b.size() || b.is_zero(off, n.min(b.size() - off)),
                },
                Extent::Data(_) | Extent::Compressed(_) => false,
            };
            if !zero {
                return false;
            }
            off += n;
        }
        true
    }
}
