//! Inode table lookup and on-disk inode decoding.

use super::bytes::{le16, le32};
use super::sb::{INCOMPAT_64BIT, INCOMPAT_LARGEDIR, RO_COMPAT_HUGE_FILE};
use super::{Ext4, Inode, Timestamp};
use crate::{Error, Result};

pub(crate) const FL_ENCRYPT: u32 = 0x800;
pub(crate) const FL_HUGE_FILE: u32 = 0x40000;
pub(crate) const FL_EXTENTS: u32 = 0x80000;
pub(crate) const FL_EA_INODE: u32 = 0x200000;
pub(crate) const FL_INLINE_DATA: u32 = 0x1000_0000;

fn time(lo: u32, extra: Option<u32>) -> Timestamp {
    let base = i64::from(lo as i32);
    match extra {
        Some(x) => Timestamp {
            sec: base + (i64::from(x & 3) << 32),
            // Values above 999999999 are corrupt; clamp so consumers never see them.
            nsec: (x >> 2).min(999_999_999),
        },
        None => Timestamp { sec: base, nsec: 0 },
    }
}

impl Ext4 {
    /// Byte offset of the inode table of group `g`.
    fn inode_table_block(&self, g: u32) -> Result<u64> {
        let off = self.sb.group_desc_offset(g)?;
        let bs = self.bs();
        let blk = off / bs;
        let within = usize::try_from(off % bs).unwrap_or(usize::MAX);
        let b = self.meta_block(blk, "group descriptor")?;
        if let Some(seed) = self.csum {
            let desc = b
                .get(within..within.saturating_add(usize::from(self.sb.desc_size)))
                .ok_or_else(|| Error::corrupt("group descriptor crosses its block", off))?;
            super::csum::verify_group_desc(seed, g, desc, off)?;
        }
        let lo = u64::from(le32(&b, within.saturating_add(0x8)));
        let hi = if self.sb.has_incompat(INCOMPAT_64BIT) && self.sb.desc_size >= 64 {
            u64::from(le32(&b, within.saturating_add(0x28)))
        } else {
            0
        };
        Ok(lo | (hi << 32))
    }

    /// Reads and decodes inode `ino` (1-based).
    pub fn inode(&self, ino: u32) -> Result<Inode> {
        if let Some(raw) = (!self.fc.inodes.is_empty())
            .then(|| self.fc.inodes.get(&ino))
            .flatten()
        {
            // Replayed from a fast commit: the table's checksum is for the old bytes.
            let iseed = self.csum.map_or(0, |seed| {
                super::csum::inode_seed(seed, ino, le32(raw, 0x64))
            });
            return Ok(self.decode_inode(ino, raw, iseed));
        }
        self.with_raw_inode(ino, true, |raw, iseed| self.decode_inode(ino, raw, iseed))
    }

    /// Runs `f` on the on-disk bytes of inode `ino` and its checksum seed, verifying the
    /// checksum when asked and enabled.
    pub(crate) fn with_raw_inode<R>(
        &self,
        ino: u32,
        verify: bool,
        f: impl FnOnce(&[u8], u32) -> R,
    ) -> Result<R> {
        if ino == 0 || ino > self.sb.inodes_count {
            return Err(Error::corrupt(
                format!(
                    "inode number {ino} out of range (1..={})",
                    self.sb.inodes_count
                ),
                0,
            ));
        }
        let idx = ino - 1;
        let group = idx / self.sb.inodes_per_group;
        let index = u64::from(idx % self.sb.inodes_per_group);
        let table = self.inode_table_block(group)?;
        let isz = u64::from(self.sb.inode_size);
        let byte = index * isz;
        let blk = table
            .checked_add(byte / self.bs())
            .ok_or_else(|| Error::corrupt("inode table block overflows", 0))?;
        let b = self.meta_block(blk, "inode table")?;
        let start = usize::try_from(byte % self.bs()).unwrap_or(usize::MAX);
        let raw = b
            .get(start..start.saturating_add(usize::from(self.sb.inode_size)))
            .ok_or_else(|| Error::corrupt("inode crosses its block", blk * self.bs()))?;
        let iseed = match self.csum {
            Some(seed) => {
                let iseed = super::csum::inode_seed(seed, ino, le32(raw, 0x64));
                if verify {
                    let at = (blk * self.bs()).saturating_add(start as u64);
                    super::csum::verify_inode(iseed, ino, raw, at)?;
                }
                iseed
            }
            None => 0,
        };
        Ok(f(raw, iseed))
    }

    fn decode_inode(&self, ino: u32, r: &[u8], csum_seed: u32) -> Inode {
        let mode = le16(r, 0x0);
        let flags = le32(r, 0x20);
        let is_reg = mode & 0o170000 == 0o100000;
        let size_hi = if is_reg || self.sb.has_incompat(INCOMPAT_LARGEDIR) {
            u64::from(le32(r, 0x6C))
        } else {
            0
        };
        let size = u64::from(le32(r, 0x4)) | (size_hi << 32);
        let mut extra_isize = 0usize;
        if r.len() > 128 {
            let x = usize::from(le16(r, 0x80));
            if 128 + x <= r.len() && x % 4 == 0 {
                extra_isize = x;
            } else {
                tracing::warn!(
                    ino,
                    extra_isize = x,
                    "bad i_extra_isize; ignoring extra fields"
                );
            }
        }
        // Field at inode offset `off` (4 bytes) exists when extra_isize reaches past it.
        let extra =
            |off: usize| -> Option<u32> { (off + 4 <= 128 + extra_isize).then(|| le32(r, off)) };
        let crtime = extra(0x90).map(|lo| time(lo, extra(0x94)));
        let mut i_block = [0u8; 60];
        if let Some(s) = r.get(0x28..0x64) {
            i_block.copy_from_slice(s);
        }
        let blocks_lo = u64::from(le32(r, 0x1C));
        let blocks_hi = u64::from(le16(r, 0x74));
        let sectors = if self.sb.has_ro_compat(RO_COMPAT_HUGE_FILE) {
            let n = blocks_lo | (blocks_hi << 32);
            if flags & FL_HUGE_FILE != 0 {
                n.saturating_mul(self.bs() / 512)
            } else {
                n
            }
        } else {
            blocks_lo
        };
        let ftype = mode & 0o170000;
        let rdev = if ftype == 0o020000 || ftype == 0o060000 {
            let old = le32(&i_block, 0);
            if old != 0 {
                ((old >> 8) & 0xff, old & 0xff)
            } else {
                let new = le32(&i_block, 4);
                ((new & 0xfff00) >> 8, (new & 0xff) | ((new >> 12) & 0xfff00))
            }
        } else {
            (0, 0)
        };
        let ibody = r.get(128 + extra_isize..).unwrap_or(&[]).to_vec();
        Inode {
            ino,
            mode,
            uid: u32::from(le16(r, 0x2)) | (u32::from(le16(r, 0x78)) << 16),
            gid: u32::from(le16(r, 0x18)) | (u32::from(le16(r, 0x7A)) << 16),
            size,
            links: le16(r, 0x1A),
            atime: time(le32(r, 0x8), extra(0x8C)),
            ctime: time(le32(r, 0xC), extra(0x84)),
            mtime: time(le32(r, 0x10), extra(0x88)),
            crtime,
            flags,
            rdev,
            i_block,
            sectors,
            file_acl: u64::from(le32(r, 0x68)) | (u64::from(le16(r, 0x76)) << 32),
            ibody,
            csum_seed,
        }
    }

    pub(crate) fn check_not_encrypted(&self, inode: &Inode) -> Result<()> {
        if inode.flags & FL_ENCRYPT != 0 {
            return Err(Error::Unsupported(format!(
                "inode {} is encrypted (fscrypt)",
                inode.ino
            )));
        }
        Ok(())
    }

    /// Symlink target stored in i_block: no data blocks besides an xattr block.
    fn is_fast_symlink(&self, inode: &Inode) -> bool {
        if inode.flags & (FL_INLINE_DATA | FL_EA_INODE) != 0 || inode.size >= 60 {
            return false;
        }
        let acl_sectors = if inode.file_acl != 0 {
            self.bs() / 512
        } else {
            0
        };
        inode.sectors.saturating_sub(acl_sectors) == 0
    }

    /// The target of a symbolic link.
    pub fn read_link(&self, inode: &Inode) -> Result<Vec<u8>> {
        if inode.file_type() != super::FileType::Symlink {
            return Err(Error::Other(format!(
                "inode {} is not a symlink",
                inode.ino
            )));
        }
        self.check_not_encrypted(inode)?;
        if self.is_fast_symlink(inode) {
            let n = usize::try_from(inode.size).unwrap_or(60).min(60);
            return Ok(inode.i_block.get(..n).unwrap_or(&[]).to_vec());
        }
        const MAX_TARGET: u64 = 65536;
        if inode.size > MAX_TARGET {
            return Err(Error::corrupt(
                format!("symlink inode {} has size {}", inode.ino, inode.size),
                0,
            ));
        }
        let mut buf = vec![0u8; inode.size as usize];
        let n = self.read_at(inode, 0, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    pub(crate) fn i_block<'a>(&self, inode: &'a Inode) -> &'a [u8; 60] {
        &inode.i_block
    }

    pub(crate) fn file_acl(&self, inode: &Inode) -> u64 {
        inode.file_acl
    }

    pub(crate) fn ibody<'a>(&self, inode: &'a Inode) -> &'a [u8] {
        &inode.ibody
    }

    pub(crate) fn uses_extents(&self, inode: &Inode) -> bool {
        inode.flags & FL_EXTENTS != 0
    }

    pub(crate) fn is_inline(&self, inode: &Inode) -> bool {
        inode.flags & FL_INLINE_DATA != 0
    }

    pub(crate) fn is_ea_inode(&self, inode: &Inode) -> bool {
        inode.flags & FL_EA_INODE != 0
    }
}
