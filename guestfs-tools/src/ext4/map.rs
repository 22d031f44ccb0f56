//! Logical → physical block mapping (extent trees and ext2/3 block maps) and file reads.

use super::bytes::{le16, le32};
use super::{Ext4, Inode};
use crate::{Error, Result};

const EXT_MAGIC: u16 = 0xF30A;
const EXT_MAX_DEPTH: u16 = 5;
/// Extent trees and block maps address 2^32 logical blocks.
const LBLK_LIMIT: u64 = 1 << 32;
const INIT_MAX_LEN: u64 = 32768;

/// A run of logical blocks starting at the looked-up block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mapping {
    /// First physical block, or `None` for a hole / an uninitialized extent.
    pub phys: Option<u64>,
    /// Run length in blocks, ≥ 1.
    pub len: u64,
}

impl Mapping {
    fn hole(len: u64) -> Mapping {
        Mapping {
            phys: None,
            len: len.max(1),
        }
    }
}

impl Ext4 {
    pub(crate) fn map_block(&self, inode: &Inode, lblk: u64) -> Result<Mapping> {
        self.map_block_ex(inode, lblk, false)
    }

    /// `logical`: merge allocated blocks even when not physically contiguous (for
    /// `data_runs`, so that a block map full of repeated pointers is walked in big steps).
    fn map_block_ex(&self, inode: &Inode, lblk: u64, logical: bool) -> Result<Mapping> {
        if lblk >= LBLK_LIMIT {
            return Ok(Mapping::hole(u64::MAX - lblk));
        }
        let m = if self.uses_extents(inode) {
            match self.fc_map(inode.ino, lblk) {
                Some(m) => m,
                None => self.map_extent(inode, lblk)?,
            }
        } else {
            self.map_indirect(inode, lblk, logical)?
        };
        if let (Some(p), false) = (m.phys, logical) {
            let end = p.checked_add(m.len);
            if end.is_none_or(|e| e > self.sb.blocks_count) {
                return Err(Error::corrupt(
                    format!(
                        "inode {}: data blocks {p}+{} past the end of the filesystem",
                        inode.ino, m.len
                    ),
                    p.saturating_mul(self.bs()),
                ));
            }
        }
        Ok(m)
    }

    fn map_extent(&self, inode: &Inode, lblk: u64) -> Result<Mapping> {
        let root = self.i_block(inode);
        let mut node: std::sync::Arc<[u8]> = std::sync::Arc::from(&root[..]);
        let mut node_blk = 0u64;
        let mut upper = LBLK_LIMIT;
        let mut expect_depth: Option<u16> = None;
        for _ in 0..=EXT_MAX_DEPTH {
            let bad = |what: &str| {
                Error::corrupt(
                    format!("inode {} extent tree: {what}", inode.ino),
                    node_blk.saturating_mul(self.bs()),
                )
            };
            if le16(&node, 0) != EXT_MAGIC {
                return Err(bad("bad magic"));
            }
            let entries = usize::from(le16(&node, 2));
            let max = usize::from(le16(&node, 4));
            let depth = le16(&node, 6);
            let cap = (node.len().saturating_sub(12)) / 12;
            if entries > max || max > cap {
                return Err(bad("entry count exceeds capacity"));
            }
            if depth > EXT_MAX_DEPTH || expect_depth.is_some_and(|d| d != depth) {
                return Err(bad("bad depth"));
            }
            let ent = |i: usize| node.get(12 + i * 12..24 + i * 12).unwrap_or(&[]);
            if depth == 0 {
                for i in 0..entries {
                    let e = ent(i);
                    let start = u64::from(le32(e, 0));
                    let raw_len = u64::from(le16(e, 4));
                    let (len, uninit) = if raw_len > INIT_MAX_LEN {
                        (raw_len - INIT_MAX_LEN, true)
                    } else {
                        (raw_len, false)
                    };
                    if lblk < start {
                        return Ok(Mapping::hole(start.min(upper).saturating_sub(lblk)));
                    }
                    let end = start + len;
                    if lblk < end {
                        let run = end.min(upper).saturating_sub(lblk);
                        if uninit {
                            return Ok(Mapping::hole(run));
                        }
                        let phys = u64::from(le32(e, 8)) | (u64::from(le16(e, 6)) << 32);
                        return Ok(Mapping {
                            phys: Some(phys + (lblk - start)),
                            len: run.max(1),
                        });
                    }
                }
                return Ok(Mapping::hole(upper.saturating_sub(lblk)));
            }
            let mut chosen: Option<usize> = None;
            for i in 0..entries {
                if u64::from(le32(ent(i), 0)) <= lblk {
                    chosen = Some(i);
                } else {
                    break;
                }
            }
            let Some(i) = chosen else {
                let first = if entries > 0 {
                    u64::from(le32(ent(0), 0))
                } else {
                    upper
                };
                return Ok(Mapping::hole(first.min(upper).saturating_sub(lblk)));
            };
            if i + 1 < entries {
                upper = upper.min(u64::from(le32(ent(i + 1), 0)));
            }
            let e = ent(i);
            let child = u64::from(le32(e, 4)) | (u64::from(le16(e, 8)) << 32);
            node = self.meta_block(child, "extent index")?;
            node_blk = child;
            if self.csum.is_some() {
                super::csum::verify_extent_block(
                    inode.csum_seed,
                    inode.ino,
                    &node,
                    child.saturating_mul(self.bs()),
                )?;
            }
            expect_depth = Some(depth - 1);
        }
        Err(Error::corrupt(
            format!("inode {} extent tree too deep", inode.ino),
            0,
        ))
    }

    fn map_indirect(&self, inode: &Inode, lblk: u64, logical: bool) -> Result<Mapping> {
        let ib = self.i_block(inode);
        let ptr = |i: usize| u64::from(le32(ib, i * 4));
        let apb = self.bs() / 4;
        if lblk < 12 {
            let i = lblk as usize;
            let first = ptr(i);
            let mut n = 1u64;
            while i + (n as usize) < 12 {
                let next = ptr(i + n as usize);
                let same = if first == 0 {
                    next == 0
                } else {
                    next == first + n || (logical && next != 0)
                };
                if !same {
                    break;
                }
                n += 1;
            }
            return Ok(if first == 0 {
                Mapping::hole(n)
            } else {
                Mapping {
                    phys: Some(first),
                    len: n,
                }
            });
        }
        let mut off = lblk - 12;
        let mut cover = apb;
        for (slot, level) in [(12usize, 1u32), (13, 2), (14, 3)] {
            if off < cover {
                return self.walk_indirect(ptr(slot), level, off, logical);
            }
            off -= cover;
            cover = cover.saturating_mul(apb);
        }
        Ok(Mapping::hole(LBLK_LIMIT.saturating_sub(lblk)))
    }

    /// `ptr` is a block of pointers at `level` (1 = points at data) covering apb^level
    /// blocks; `off` is the offset inside that coverage.
    fn walk_indirect(
        &self,
        mut ptr: u64,
        mut level: u32,
        mut off: u64,
        logical: bool,
    ) -> Result<Mapping> {
        let apb = self.bs() / 4;
        loop {
            let cover = apb.saturating_pow(level);
            if ptr == 0 {
                return Ok(Mapping::hole(cover.saturating_sub(off)));
            }
            let b = self.meta_block(ptr, "indirect block")?;
            let per = apb.saturating_pow(level - 1);
            let idx = usize::try_from(off / per).unwrap_or(usize::MAX);
            let entry = |i: usize| u64::from(le32(&b, i.saturating_mul(4)));
            if level == 1 {
                let first = entry(idx);
                let count = usize::try_from(apb).unwrap_or(0);
                let mut n = 1usize;
                while idx + n < count {
                    let next = entry(idx + n);
                    let same = if first == 0 {
                        next == 0
                    } else {
                        next == first + n as u64 || (logical && next != 0)
                    };
                    if !same {
                        break;
                    }
                    n += 1;
                }
                return Ok(if first == 0 {
                    Mapping::hole(n as u64)
                } else {
                    Mapping {
                        phys: Some(first),
                        len: n as u64,
                    }
                });
            }
            ptr = entry(idx);
            off %= per;
            level -= 1;
        }
    }

    /// Inline data: i_block then the `system.data` xattr value.
    fn inline_bytes(&self, inode: &Inode) -> Result<Vec<u8>> {
        let mut v = self.i_block(inode).to_vec();
        if let Some(extra) = self.inline_xattr(inode)? {
            v.extend_from_slice(&extra);
        }
        Ok(v)
    }

    /// Reads file bytes at `offset`; holes and uninitialized extents read as zeros. Returns
    /// the number of bytes read (short only at end of file).
    pub fn read_at(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.check_not_encrypted(inode)?;
        if offset >= inode.size {
            return Ok(0);
        }
        let want =
            usize::try_from((inode.size - offset).min(buf.len() as u64)).unwrap_or(buf.len());
        let Some(buf) = buf.get_mut(..want) else {
            return Ok(0);
        };
        if self.is_inline(inode) {
            let data = self.inline_bytes(inode)?;
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            let src = data.get(start..).unwrap_or(&[]);
            let n = src.len().min(buf.len());
            if let (Some(d), Some(s)) = (buf.get_mut(..n), src.get(..n)) {
                d.copy_from_slice(s);
            }
            // Past the inline bytes (corrupt size) the file reads as zeros.
            if let Some(rest) = buf.get_mut(n..) {
                rest.fill(0);
            }
            return Ok(want);
        }
        let bs = self.bs();
        let mut done = 0usize;
        while done < want {
            let pos = offset + done as u64;
            let lblk = pos / bs;
            let inblk = pos % bs;
            let left = (want - done) as u64;
            let m = self.map_block(inode, lblk)?;
            let run_blocks = m.len.min(left / bs + 2);
            let n = (run_blocks * bs - inblk).min(left) as usize;
            let Some(dst) = buf.get_mut(done..done + n) else {
                break;
            };
            match m.phys {
                None => dst.fill(0),
                Some(p) => self.read_bytes(p * bs + inblk, dst)?,
            }
            done += n;
        }
        Ok(done)
    }

    /// Allocated (logical byte offset, length) ranges of a file, merged, clipped to its
    /// size. Holes and uninitialized extents are left out.
    pub fn data_runs(&self, inode: &Inode) -> Result<Vec<(u64, u64)>> {
        self.check_not_encrypted(inode)?;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        if inode.size == 0 {
            return Ok(runs);
        }
        if self.is_inline(inode) {
            runs.push((0, inode.size));
            return Ok(runs);
        }
        let bs = self.bs();
        let end_blk = inode.size.div_ceil(bs);
        let mut lblk = 0u64;
        while lblk < end_blk {
            let m = self.map_block_ex(inode, lblk, true)?;
            let len = m.len.min(end_blk - lblk);
            if m.phys.is_some() {
                let off = lblk * bs;
                let blen = (len * bs).min(inode.size - off);
                match runs.last_mut() {
                    Some(last) if last.0 + last.1 == off => last.1 += blen,
                    _ => runs.push((off, blen)),
                }
            }
            lblk += len;
        }
        Ok(runs)
    }
}
