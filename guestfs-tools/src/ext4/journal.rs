//! jbd2 journal replay into an in-memory overlay (the image is never written).
//!
//! Same three steps as e2fsck/the kernel, done in one walk: find the committed
//! transactions from `s_start`/`s_sequence`, collect revoke records, then take the newest
//! non-revoked copy of every logged block. The walk stops at the first block that is not
//! the expected transaction's, so a torn tail is ignored. The fast-commit area behind the
//! log is scanned here too (see `fast_commit`) and applied once the overlay is in place.

use super::bytes::be32;
use super::map::Mapping;
use super::Ext4;
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

const JBD2_MAGIC: u32 = 0xC03B_3998;
const BT_DESCRIPTOR: u32 = 1;
const BT_COMMIT: u32 = 2;
const BT_SB_V1: u32 = 3;
const BT_SB_V2: u32 = 4;
const BT_REVOKE: u32 = 5;

const INCOMPAT_REVOKE: u32 = 0x1;
const INCOMPAT_64BIT: u32 = 0x2;
const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
const INCOMPAT_CSUM_V2: u32 = 0x8;
const INCOMPAT_CSUM_V3: u32 = 0x10;
const INCOMPAT_FAST_COMMIT: u32 = 0x20;
const INCOMPAT_KNOWN: u32 = INCOMPAT_REVOKE
    | INCOMPAT_64BIT
    | INCOMPAT_ASYNC_COMMIT
    | INCOMPAT_CSUM_V2
    | INCOMPAT_CSUM_V3
    | INCOMPAT_FAST_COMMIT;

const TAG_ESCAPE: u32 = 1;
const TAG_SAME_UUID: u32 = 2;
const TAG_LAST: u32 = 8;

/// Replayed data kept in memory at most (a journal is at most 1 GiB in practice).
const MAX_OVERLAY_BYTES: u64 = 2 << 30;

struct Journal<'a> {
    fs: &'a Ext4,
    inode: super::Inode,
    bs: usize,
    /// Log area: journal blocks [first, last).
    first: u64,
    last: u64,
}

impl Journal<'_> {
    fn fs_block(&self, jblk: u64) -> Result<u64> {
        let m: Mapping = self.fs.map_block(&self.inode, jblk)?;
        m.phys
            .ok_or_else(|| Error::corrupt(format!("journal block {jblk} is a hole"), 0))
    }

    fn read(&self, jblk: u64) -> Result<Vec<u8>> {
        let p = self.fs_block(jblk)?;
        let mut buf = vec![0u8; self.bs];
        // The overlay is still empty during replay, so this reads the device as it is.
        self.fs.read_bytes(p * self.fs.bs(), &mut buf)?;
        Ok(buf)
    }

    fn next(&self, jblk: u64) -> u64 {
        let n = jblk + 1;
        if n >= self.last {
            self.first
        } else {
            n
        }
    }
}

struct Txn {
    seq: u32,
    /// (filesystem block, journal block, escaped)
    tags: Vec<(u64, u64, bool)>,
    revokes: Vec<u64>,
}

/// Filesystem block → replayed contents.
pub(crate) type Overlay = BTreeMap<u64, Arc<[u8]>>;

#[derive(Default)]
pub(crate) struct Replayed {
    pub overlay: Overlay,
    /// Committed transactions of the regular log.
    pub transactions: u32,
    /// Fast-commit tags whose commit's tail verified, in log order (applied after the overlay).
    pub fc_tags: Vec<super::fast_commit::FcTag>,
}

/// Replays the regular log and scans the fast-commit area behind it.
pub(crate) fn replay(fs: &Ext4) -> Result<Replayed> {
    let jino = fs.sb.journal_inum;
    if jino == 0 {
        return Err(Error::Unsupported(format!(
            "external journal (device {:#x}) needs recovery",
            fs.sb.journal_dev
        )));
    }
    let inode = fs.inode(jino)?;
    let bs = fs.sb.block_size as usize;
    let mut j = Journal {
        fs,
        inode,
        bs,
        first: 0,
        last: 0,
    };
    let jsb = j.read(0)?;
    if be32(&jsb, 0) != JBD2_MAGIC {
        return Err(Error::corrupt("journal superblock magic", 0));
    }
    let version = be32(&jsb, 4);
    if version != BT_SB_V1 && version != BT_SB_V2 {
        return Err(Error::corrupt("journal superblock type", 0));
    }
    if be32(&jsb, 0xC) as usize != bs {
        return Err(Error::Unsupported(
            "journal block size differs from the filesystem's".into(),
        ));
    }
    let maxlen = u64::from(be32(&jsb, 0x10));
    let first = u64::from(be32(&jsb, 0x14));
    let mut seq = be32(&jsb, 0x18);
    let start = u64::from(be32(&jsb, 0x1C));
    let incompat = if version == BT_SB_V2 {
        be32(&jsb, 0x28)
    } else {
        0
    };
    if incompat & !INCOMPAT_KNOWN != 0 {
        return Err(Error::Unsupported(format!(
            "journal incompat features {:#x}",
            incompat & !INCOMPAT_KNOWN
        )));
    }
    let size_blocks = j.inode.size / fs.bs();
    let mut last = maxlen.min(size_blocks);
    // Fast-commit area, as jbd2 lays it out: the regular log ends at s_maxlen - s_num_fc_blks
    // and the fast-commit blocks start one block later.
    let mut fc_area: Option<(u64, u64)> = None;
    if incompat & INCOMPAT_FAST_COMMIT != 0 {
        let fc = match be32(&jsb, 0x54) {
            0 => 256,
            n => u64::from(n),
        };
        last = last.saturating_sub(fc);
        fc_area = Some((maxlen.saturating_sub(fc) + 1, maxlen.min(size_blocks)));
    }
    // jbd2 does no recovery at all, fast commits included, when s_start is 0.
    if start == 0 {
        return Ok(Replayed::default());
    }
    if first == 0 || first >= last || start < first || start >= last {
        return Err(Error::corrupt("journal superblock bounds", 0));
    }
    j.first = first;
    j.last = last;

    let is64 = incompat & INCOMPAT_64BIT != 0;
    let csum = incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0;
    let tag_size = if incompat & INCOMPAT_CSUM_V3 != 0 {
        16
    } else {
        let mut t = 12usize;
        if incompat & INCOMPAT_CSUM_V2 != 0 {
            t += 2;
        }
        if !is64 {
            t -= 4;
        }
        t
    };

    let mut committed: Vec<Txn> = Vec::new();
    let mut cur = Txn {
        seq,
        tags: Vec::new(),
        revokes: Vec::new(),
    };
    let mut pos = start;
    // The log cannot be longer than the journal nor than the device: this bounds the walk.
    let mut budget = (last - first).min(fs.dev.size() / fs.bs());
    'walk: while budget > 0 {
        budget -= 1;
        let b = j.read(pos)?;
        if be32(&b, 0) != JBD2_MAGIC || be32(&b, 8) != seq {
            break;
        }
        match be32(&b, 4) {
            BT_DESCRIPTOR => {
                let limit = bs - if csum { 4 } else { 0 };
                let mut off = 12usize;
                while off + tag_size <= limit {
                    let blk_lo = u64::from(be32(&b, off));
                    let (flags, blk_hi) = if tag_size == 16 {
                        (be32(&b, off + 4), u64::from(be32(&b, off + 8)))
                    } else {
                        let f = u32::from(u16::from_be_bytes([
                            b.get(off + 6).copied().unwrap_or(0),
                            b.get(off + 7).copied().unwrap_or(0),
                        ]));
                        let hi = if is64 {
                            u64::from(be32(&b, off + 8))
                        } else {
                            0
                        };
                        (f, hi)
                    };
                    off += tag_size;
                    if flags & TAG_SAME_UUID == 0 {
                        off += 16;
                    }
                    if budget == 0 {
                        break 'walk;
                    }
                    budget -= 1;
                    pos = j.next(pos);
                    cur.tags
                        .push((blk_lo | (blk_hi << 32), pos, flags & TAG_ESCAPE != 0));
                    if flags & TAG_LAST != 0 {
                        break;
                    }
                }
            }
            BT_REVOKE => {
                let count = (be32(&b, 12) as usize).min(bs);
                let rsize = if is64 { 8 } else { 4 };
                let mut off = 16usize;
                while off + rsize <= count {
                    let r = if is64 {
                        (u64::from(be32(&b, off)) << 32) | u64::from(be32(&b, off + 4))
                    } else {
                        u64::from(be32(&b, off))
                    };
                    cur.revokes.push(r);
                    off += rsize;
                }
            }
            BT_COMMIT => {
                let next = Txn {
                    seq: seq.wrapping_add(1),
                    tags: Vec::new(),
                    revokes: Vec::new(),
                };
                committed.push(std::mem::replace(&mut cur, next));
                seq = seq.wrapping_add(1);
            }
            _ => break,
        }
        pos = j.next(pos);
    }
    if !cur.tags.is_empty() {
        tracing::info!(seq = cur.seq, "ignoring uncommitted journal transaction");
    }

    let mut revoked: HashMap<u64, u32> = HashMap::new();
    for t in &committed {
        for r in &t.revokes {
            let e = revoked.entry(*r).or_insert(t.seq);
            // Sequence numbers increase along the walk, so the later one wins.
            *e = t.seq;
        }
    }
    let mut overlay: Overlay = BTreeMap::new();
    let mut bytes = 0u64;
    for t in &committed {
        for &(fsblk, jblk, escaped) in &t.tags {
            if revoked.get(&fsblk).is_some_and(|rs| {
                // revoked when the revoke record is in this or a later transaction
                rs.wrapping_sub(t.seq) as i32 >= 0
            }) {
                continue;
            }
            if fsblk >= fs.sb.blocks_count {
                tracing::warn!(fsblk, "journal logs a block past the end; skipped");
                continue;
            }
            let mut data = j.read(jblk)?;
            if escaped {
                if let Some(m) = data.get_mut(0..4) {
                    m.copy_from_slice(&JBD2_MAGIC.to_be_bytes());
                }
            }
            if overlay.insert(fsblk, data.into()).is_none() {
                bytes += bs as u64;
                if bytes > MAX_OVERLAY_BYTES {
                    return Err(Error::Limit("journal replay overlay too large".into()));
                }
            }
        }
    }
    let n = u32::try_from(committed.len()).unwrap_or(u32::MAX);
    let fc_tags = match fc_area {
        // The fast commits to replay belong to the transaction after the last committed one.
        Some((fc_first, fc_end)) => {
            let mut read = |off: u64| -> Result<Option<(u64, Vec<u8>)>> {
                let jblk = fc_first.saturating_add(off);
                if jblk >= fc_end {
                    return Ok(None);
                }
                Ok(Some((jblk, j.read(jblk)?)))
            };
            super::fast_commit::scan(&mut read, seq, fs.sb.inode_size)?
        }
        None => Vec::new(),
    };
    Ok(Replayed {
        overlay,
        transactions: n,
        fc_tags,
    })
}
