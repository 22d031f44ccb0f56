//! PAX tar output, as GNU tar writes it with `--format=posix --xattrs --numeric-owner`:
//! ustar headers, PAX records for long names, big numbers and `SCHILY.xattr.*`, hard links as
//! link entries pointing at the first path of their group.
//!
//! We format headers with the `tar` crate but stream entries ourselves: the crate's builder
//! copies data through an 8 KiB buffer, which costs a block-layer lookup per 8 KiB read.

use crate::ext4::FileType;
use crate::guest::{Guest, LinkTracker, Node};
use crate::oci::LayerSink;
use crate::{Error, Result};
use std::io::Write;

const BLOCK: usize = 512;
/// Largest value of an 11-digit octal ustar number field (sizes, mtime).
const USTAR_MAX_12: u64 = 0o77777777777;
/// Largest value of a 7-digit octal ustar number field (uid, gid, device numbers).
const USTAR_MAX_8: u64 = 0o7777777;
/// Read size when copying file data.
const CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    Char,
    Block,
    Fifo,
}

/// Metadata of one tar entry.
#[derive(Debug, Clone)]
pub struct EntryMeta {
    /// Relative path, no leading `/` or `./`; directories get their trailing `/` added here.
    pub path: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    /// Data size (regular files only).
    pub size: u64,
    /// Symlink target or hard-link target path.
    pub link: Option<Vec<u8>>,
    pub rdev: (u32, u32),
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl EntryMeta {
    pub fn new(path: &[u8], kind: Kind, mode: u32) -> Self {
        EntryMeta {
            path: path.to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            link: None,
            rdev: (0, 0),
            xattrs: Vec::new(),
        }
    }
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct TarStats {
    pub entries: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub devices: u64,
    pub xattrs: u64,
    /// File data bytes written (holes included, as tar stores them).
    pub data_bytes: u64,
}

/// Lets the writer read file data straight into the output's own buffer (see
/// [`crate::oci::LayerSink::fill_in_place`]): the filler gets free space and returns how
/// many bytes it put there.
pub type InPlace<W> = fn(&mut W, &mut dyn FnMut(&mut [u8]) -> Result<usize>) -> Result<usize>;

/// Writes tar entries to `W`.
pub struct TarWriter<W: Write> {
    out: W,
    in_place: Option<InPlace<W>>,
    pub stats: TarStats,
}

fn io_err(e: std::io::Error) -> Error {
    Error::io("<tar output>", e)
}

fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    // The length prefix counts itself: find the fixed point.
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while body + len.to_string().len() != len {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        TarWriter {
            out,
            in_place: None,
            stats: TarStats::default(),
        }
    }

    /// A writer whose file data is read from the guest directly into `out`'s buffers.
    pub fn with_in_place(out: W, fill: InPlace<W>) -> Self {
        TarWriter {
            out,
            in_place: Some(fill),
            stats: TarStats::default(),
        }
    }

    fn write_padded(&mut self, data: &[u8]) -> Result<()> {
        self.out.write_all(data).map_err(io_err)?;
        self.pad(data.len() as u64)
    }

    fn pad(&mut self, len: u64) -> Result<()> {
        let rem = (len % BLOCK as u64) as usize;
        if rem != 0 {
            self.out
                .write_all(&[0u8; BLOCK][..BLOCK - rem])
                .map_err(io_err)?;
        }
        Ok(())
    }

    /// Writes the header (and PAX header if needed) of an entry; regular-file data must
    /// follow through [`TarWriter::write_data`] with exactly `meta.size` bytes.
    pub fn header(&mut self, meta: &EntryMeta) -> Result<()> {
        let mut path = meta.path.clone();
        if meta.kind == Kind::Dir && path.last() != Some(&b'/') {
            path.push(b'/');
        }
        let mut pax = Vec::new();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(match meta.kind {
            Kind::File => tar::EntryType::Regular,
            Kind::Dir => tar::EntryType::Directory,
            Kind::Symlink => tar::EntryType::Symlink,
            Kind::HardLink => tar::EntryType::Link,
            Kind::Char => tar::EntryType::Char,
            Kind::Block => tar::EntryType::Block,
            Kind::Fifo => tar::EntryType::Fifo,
        });
        h.set_mode(meta.mode & 0o7777);
        let size = if meta.kind == Kind::File {
            meta.size
        } else {
            0
        };
        if size > USTAR_MAX_12 {
            pax_record(&mut pax, "size", size.to_string().as_bytes());
            h.set_size(0);
        } else {
            h.set_size(size);
        }
        for (key, v) in [("uid", meta.uid), ("gid", meta.gid)] {
            let v64 = u64::from(v);
            if v64 > USTAR_MAX_8 {
                pax_record(&mut pax, key, v.to_string().as_bytes());
            }
            let field = v64.min(USTAR_MAX_8);
            if key == "uid" {
                h.set_uid(field);
            } else {
                h.set_gid(field);
            }
        }
        if meta.mtime < 0 || meta.mtime as u64 > USTAR_MAX_12 {
            pax_record(&mut pax, "mtime", meta.mtime.to_string().as_bytes());
            h.set_mtime(0);
        } else {
            h.set_mtime(meta.mtime as u64);
        }
        if matches!(meta.kind, Kind::Char | Kind::Block) {
            h.set_device_major(meta.rdev.0.min(USTAR_MAX_8 as u32))
                .map_err(io_err)?;
            h.set_device_minor(meta.rdev.1.min(USTAR_MAX_8 as u32))
                .map_err(io_err)?;
        }
        {
            let ustar = h
                .as_ustar_mut()
                .ok_or_else(|| Error::Other("ustar header expected".into()))?;
            if path.len() <= ustar.name.len() && !path.contains(&0) {
                ustar.name[..path.len()].copy_from_slice(&path);
            } else {
                pax_record(&mut pax, "path", &path);
                let short = &path[..path.len().min(ustar.name.len())];
                let short: Vec<u8> = short
                    .iter()
                    .map(|b| if *b == 0 { b'_' } else { *b })
                    .collect();
                ustar.name[..short.len()].copy_from_slice(&short);
            }
            if let Some(link) = &meta.link {
                if link.len() <= ustar.linkname.len() && !link.contains(&0) {
                    ustar.linkname[..link.len()].copy_from_slice(link);
                } else {
                    pax_record(&mut pax, "linkpath", link);
                }
            }
        }
        for (name, value) in &meta.xattrs {
            pax_record(&mut pax, &format!("SCHILY.xattr.{name}"), value);
            self.stats.xattrs += 1;
        }
        h.set_cksum();
        if !pax.is_empty() {
            let mut x = tar::Header::new_ustar();
            x.set_entry_type(tar::EntryType::XHeader);
            x.set_mode(0o644);
            x.set_size(pax.len() as u64);
            let name = b"././@PaxHeader";
            if let Some(u) = x.as_ustar_mut() {
                u.name[..name.len()].copy_from_slice(name);
            }
            x.set_cksum();
            self.out.write_all(x.as_bytes()).map_err(io_err)?;
            self.write_padded(&pax)?;
        }
        self.out.write_all(h.as_bytes()).map_err(io_err)?;
        self.stats.entries += 1;
        match meta.kind {
            Kind::File => self.stats.files += 1,
            Kind::Dir => self.stats.dirs += 1,
            Kind::Symlink => self.stats.symlinks += 1,
            Kind::HardLink => self.stats.hardlinks += 1,
            Kind::Char | Kind::Block | Kind::Fifo => self.stats.devices += 1,
        }
        Ok(())
    }

    /// Writes an entry whose data is in memory.
    pub fn append(&mut self, meta: &EntryMeta, data: &[u8]) -> Result<()> {
        let mut m = meta.clone();
        m.size = data.len() as u64;
        self.header(&m)?;
        if m.kind == Kind::File {
            self.stats.data_bytes += m.size;
            self.write_padded(data)?;
        }
        Ok(())
    }

    /// Streams a guest file's data (after its header): allocated runs are read, holes are
    /// written as zeros without touching the disk.
    pub fn write_data(
        &mut self,
        guest: &Guest,
        node: &Node,
        buf: &mut Vec<u8>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let size = node.inode.size;
        let runs = guest.data_runs(node)?;
        // Sized to the file (up to CHUNK): a tree of small files never faults in 1 MiB.
        let want = usize::try_from(size).map_or(CHUNK, |s| s.clamp(1, CHUNK));
        if buf.len() < want {
            buf.resize(want, 0);
        }
        let mut pos = 0u64;
        // Holes come from a shared zero block: clearing the 1 MiB copy buffer for every
        // file (most have no holes) used to cost more than reading the data.
        let write_zeros = |w: &mut Self, mut n: u64| -> Result<()> {
            static ZEROS: [u8; 64 << 10] = [0u8; 64 << 10];
            while n > 0 {
                let k = n.min(ZEROS.len() as u64) as usize;
                w.out.write_all(&ZEROS[..k]).map_err(io_err)?;
                n -= k as u64;
            }
            Ok(())
        };
        for (start, len) in runs {
            let start = start.min(size);
            let end = start.saturating_add(len).min(size);
            if start < pos {
                return Err(Error::corrupt("overlapping data runs in a file", start));
            }
            write_zeros(self, start - pos)?;
            pos = start;
            if let Some(fill) = self.in_place {
                while pos < end {
                    let n = fill(&mut self.out, &mut |dst: &mut [u8]| {
                        let k = usize::try_from(end - pos)
                            .unwrap_or(usize::MAX)
                            .min(dst.len());
                        let got = guest.read_at(node, pos, &mut dst[..k])?;
                        if got != k {
                            return Err(Error::corrupt(
                                format!("file data ends early (inode {})", node.r.ino),
                                pos,
                            ));
                        }
                        Ok(k)
                    })?;
                    pos += n as u64;
                    progress(n as u64);
                }
                continue;
            }
            while pos < end {
                let k = (end - pos).min(buf.len() as u64) as usize;
                let n = guest.read_at(node, pos, &mut buf[..k])?;
                if n != k {
                    return Err(Error::corrupt(
                        format!("file data ends early (inode {})", node.r.ino),
                        pos,
                    ));
                }
                self.out.write_all(&buf[..k]).map_err(io_err)?;
                pos += k as u64;
                progress(k as u64);
            }
        }
        write_zeros(self, size - pos)?;
        self.stats.data_bytes += size;
        self.pad(size)
    }

    /// Streams exactly `size` bytes of an entry's data from `r` (after its header); a source
    /// that ends early is an error, not a silently truncated archive.
    pub fn write_from(&mut self, r: &mut dyn std::io::Read, size: u64) -> Result<()> {
        let mut buf = vec![0u8; CHUNK.min(usize::try_from(size).unwrap_or(CHUNK)).max(1)];
        let mut left = size;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            let n = r.read(&mut buf[..k]).map_err(io_err)?;
            if n == 0 {
                return Err(Error::Other(format!(
                    "file data ended {left} bytes early (changed while archived?)"
                )));
            }
            self.out.write_all(&buf[..n]).map_err(io_err)?;
            left -= n as u64;
        }
        self.stats.data_bytes += size;
        self.pad(size)
    }

    /// Ends the archive (two zero blocks) and returns the writer.
    pub fn finish(mut self) -> Result<(W, TarStats)> {
        self.out.write_all(&[0u8; BLOCK * 2]).map_err(io_err)?;
        self.out.flush().map_err(io_err)?;
        Ok((self.out, self.stats))
    }
}

/// Metadata of a guest node as a tar entry at `path`.
pub fn node_meta(guest: &Guest, node: &Node, path: &[u8]) -> Result<EntryMeta> {
    let i = &node.inode;
    let kind = match i.file_type() {
        FileType::Regular => Kind::File,
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        FileType::CharDevice => Kind::Char,
        FileType::BlockDevice => Kind::Block,
        FileType::Fifo => Kind::Fifo,
        // Sockets cannot be archived (GNU tar skips them too); the caller skips them.
        FileType::Socket => {
            return Err(Error::Unsupported(format!(
                "socket {} cannot be stored in a tar",
                String::from_utf8_lossy(path)
            )))
        }
    };
    let mut m = EntryMeta::new(path, kind, i.perm());
    m.uid = i.uid;
    m.gid = i.gid;
    m.mtime = i.mtime.sec;
    m.size = if kind == Kind::File { i.size } else { 0 };
    m.rdev = i.rdev;
    if kind == Kind::Symlink {
        m.link = Some(guest.read_link(node)?);
    }
    m.xattrs = guest.xattrs(node)?;
    Ok(m)
}

/// Writes the guest's merged tree, as it is, to a tar stream.
pub fn write_tree<W: Write>(
    guest: &Guest,
    out: W,
    progress: &mut dyn FnMut(u64),
) -> Result<(W, TarStats)> {
    write_tree_with(guest, TarWriter::new(out), progress)
}

/// [`write_tree`] into a layer blob, reading file data straight into the blob's chunks.
pub fn write_tree_to_layer(
    guest: &Guest,
    sink: LayerSink,
    progress: &mut dyn FnMut(u64),
) -> Result<(LayerSink, TarStats)> {
    write_tree_with(
        guest,
        TarWriter::with_in_place(sink, LayerSink::fill_in_place),
        progress,
    )
}

fn write_tree_with<W: Write>(
    guest: &Guest,
    mut tw: TarWriter<W>,
    progress: &mut dyn FnMut(u64),
) -> Result<(W, TarStats)> {
    let mut links = LinkTracker::default();
    let mut buf = Vec::new();
    guest.walk(&mut |e| {
        if e.node.inode.file_type() == FileType::Socket {
            tracing::debug!(path = %String::from_utf8_lossy(e.path), "socket skipped");
            return Ok(());
        }
        if let Some(first) = links.check(e.node, e.path) {
            let mut m = EntryMeta::new(e.path, Kind::HardLink, e.node.inode.perm());
            m.uid = e.node.inode.uid;
            m.gid = e.node.inode.gid;
            m.mtime = e.node.inode.mtime.sec;
            m.link = Some(first);
            return tw.header(&m);
        }
        let m = node_meta(guest, e.node, e.path)?;
        tw.header(&m)?;
        if m.kind == Kind::File {
            tw.write_data(guest, e.node, &mut buf, progress)?;
        }
        Ok(())
    })?;
    tw.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        for vlen in [0usize, 1, 5, 90, 95, 96, 97, 98, 990, 995, 9990] {
            let mut out = Vec::new();
            let v = vec![b'a'; vlen];
            pax_record(&mut out, "path", &v);
            let sp = out.iter().position(|b| *b == b' ').unwrap_or(0);
            let n: usize = std::str::from_utf8(&out[..sp])
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            assert_eq!(n, out.len(), "value length {vlen}");
        }
    }

    #[test]
    fn long_names_and_xattrs_read_back_with_the_tar_crate() {
        let mut tw = TarWriter::new(Vec::new());
        let long = "d/".repeat(80) + "file";
        let mut m = EntryMeta::new(long.as_bytes(), Kind::File, 0o4755);
        m.uid = 3_000_000;
        m.gid = 5;
        m.mtime = 1_700_000_000;
        m.xattrs = vec![("user.x".into(), b"v\0al".to_vec())];
        tw.append(&m, b"hello").ok();
        let (bytes, stats) = tw.finish().expect("finish");
        assert_eq!(stats.files, 1);
        let mut ar = tar::Archive::new(&bytes[..]);
        let mut entries = ar.entries().expect("entries");
        let mut e = entries.next().expect("one entry").expect("entry ok");
        assert_eq!(e.path_bytes().as_ref(), long.as_bytes());
        let exts: Vec<(String, Vec<u8>)> = e
            .pax_extensions()
            .expect("pax")
            .expect("has pax")
            .filter_map(|x| x.ok())
            .map(|x| (x.key().unwrap_or("").to_string(), x.value_bytes().to_vec()))
            .collect();
        assert!(exts.contains(&("uid".to_string(), b"3000000".to_vec())));
        assert!(exts.contains(&("SCHILY.xattr.user.x".to_string(), b"v\0al".to_vec())));
        assert_eq!(e.header().mode().ok(), Some(0o4755));
        let mut s = String::new();
        std::io::Read::read_to_string(&mut e, &mut s).ok();
        assert_eq!(s, "hello");
    }
}
