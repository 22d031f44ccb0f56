//! Directories: linear and htree (read linearly), and inline-data directories.

use super::bytes::{le16, le32, u8_at};
use super::sb::INCOMPAT_FILETYPE;
use super::{DirEntry, Ext4, FileType};
use crate::{Error, Result};

/// Directories larger than this are refused (the kernel's own limit without large_dir is
/// 2 GiB; real directories are far smaller).
const MAX_DIR_BYTES: u64 = 1 << 30;

fn file_type_of(t: u8) -> Option<FileType> {
    Some(match t {
        1 => FileType::Regular,
        2 => FileType::Directory,
        3 => FileType::CharDevice,
        4 => FileType::BlockDevice,
        5 => FileType::Fifo,
        6 => FileType::Socket,
        7 => FileType::Symlink,
        _ => return None,
    })
}

impl Ext4 {
    /// Parses the directory entries of one block (or inline region) into `out`, skipping
    /// unused entries, "." and "..".
    fn parse_dirents(&self, buf: &[u8], at: u64, out: &mut Vec<DirEntry>) -> Result<()> {
        let filetype = self.sb.has_incompat(INCOMPAT_FILETYPE);
        let big_blocks = self.sb.block_size >= 65536;
        let mut off = 0usize;
        while off < buf.len() {
            let bad =
                |what: &str| Error::corrupt(format!("directory entry: {what}"), at + off as u64);
            if buf.len() - off < 8 {
                return Err(bad("truncated header"));
            }
            let ino = le32(buf, off);
            let raw = le16(buf, off + 4);
            let rec_len = if big_blocks && (raw == 65535 || raw == 0) {
                buf.len() - off
            } else {
                usize::from(raw & 65532) | (usize::from(raw & 3) << 16)
            };
            if rec_len < 8 || rec_len % 4 != 0 || rec_len > buf.len() - off {
                return Err(bad(&format!("bad rec_len {rec_len}")));
            }
            let (name_len, ftype) = if filetype {
                (usize::from(u8_at(buf, off + 6)), u8_at(buf, off + 7))
            } else {
                (usize::from(le16(buf, off + 6)), 0)
            };
            if ino != 0 {
                if name_len + 8 > rec_len {
                    return Err(bad("name longer than the entry"));
                }
                if ino > self.sb.inodes_count {
                    return Err(bad(&format!("inode {ino} out of range")));
                }
                let name = buf.get(off + 8..off + 8 + name_len).unwrap_or(&[]);
                if !name.is_empty() && name != b"." && name != b".." {
                    out.push(DirEntry {
                        name: name.to_vec(),
                        ino,
                        file_type: if filetype { file_type_of(ftype) } else { None },
                    });
                }
            }
            off += rec_len;
        }
        Ok(())
    }

    /// Lists a directory, without "." and "..".
    pub fn read_dir(&self, ino: u32) -> Result<Vec<DirEntry>> {
        let inode = self.inode(ino)?;
        if inode.file_type() != FileType::Directory {
            return Err(Error::Other(format!("inode {ino} is not a directory")));
        }
        self.check_not_encrypted(&inode)?;
        if let Some(list) = self.fc.dirs.get(&ino) {
            return Ok(list.clone());
        }
        let mut out = Vec::new();
        if self.is_inline(&inode) {
            // i_block starts with the parent's inode number, then entries.
            let ib = self.i_block(&inode);
            self.parse_dirents(ib.get(4..).unwrap_or(&[]), 0, &mut out)?;
            if let Some(extra) = self.inline_xattr(&inode)? {
                if !extra.is_empty() {
                    self.parse_dirents(&extra, 0, &mut out)?;
                }
            }
            return Ok(out);
        }
        if inode.size > MAX_DIR_BYTES {
            return Err(Error::Limit(format!(
                "directory inode {ino} has size {} bytes",
                inode.size
            )));
        }
        let bs = self.bs();
        let end = inode.size.div_ceil(bs);
        // A block listed twice would let a small image expand into a huge listing.
        let mut seen = std::collections::HashSet::new();
        let mut lblk = 0u64;
        while lblk < end {
            let m = self.map_block(&inode, lblk)?;
            let len = m.len.min(end - lblk);
            if let Some(p) = m.phys {
                for i in 0..len {
                    let blk = p + i;
                    if !seen.insert(blk) {
                        return Err(Error::corrupt(
                            format!("directory inode {ino} uses block {blk} twice"),
                            blk * bs,
                        ));
                    }
                    let b = self.meta_block(blk, "directory block")?;
                    if self.csum.is_some() {
                        super::csum::verify_dir_block(inode.csum_seed, ino, &b, blk * bs)?;
                    }
                    self.parse_dirents(&b, blk * bs, &mut out)?;
                }
            }
            lblk += len;
        }
        Ok(out)
    }
}
