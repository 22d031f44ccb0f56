//! Superblock and group descriptors.

use super::bytes::{le16, le32};
use crate::{Error, Result};

pub(crate) const SB_OFFSET: u64 = 1024;
pub(crate) const SB_SIZE: usize = 1024;
pub(crate) const MAGIC: u16 = 0xEF53;

pub(crate) const COMPAT_HAS_JOURNAL: u32 = 0x4;
pub(crate) const COMPAT_SPARSE_SUPER2: u32 = 0x200;

pub(crate) const INCOMPAT_COMPRESSION: u32 = 0x1;
pub(crate) const INCOMPAT_FILETYPE: u32 = 0x2;
pub(crate) const INCOMPAT_RECOVER: u32 = 0x4;
pub(crate) const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
pub(crate) const INCOMPAT_META_BG: u32 = 0x10;
pub(crate) const INCOMPAT_EXTENTS: u32 = 0x40;
pub(crate) const INCOMPAT_64BIT: u32 = 0x80;
pub(crate) const INCOMPAT_MMP: u32 = 0x100;
pub(crate) const INCOMPAT_FLEX_BG: u32 = 0x200;
pub(crate) const INCOMPAT_EA_INODE: u32 = 0x400;
pub(crate) const INCOMPAT_DIRDATA: u32 = 0x1000;
pub(crate) const INCOMPAT_CSUM_SEED: u32 = 0x2000;
pub(crate) const INCOMPAT_LARGEDIR: u32 = 0x4000;
pub(crate) const INCOMPAT_INLINE_DATA: u32 = 0x8000;
pub(crate) const INCOMPAT_ENCRYPT: u32 = 0x10000;
pub(crate) const INCOMPAT_CASEFOLD: u32 = 0x20000;

/// What this reader understands. Encrypted and casefolded filesystems are accepted: only
/// encrypted inodes are refused, when they are actually read.
const INCOMPAT_SUPPORTED: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD;

const INCOMPAT_NAMES: &[(u32, &str)] = &[
    (INCOMPAT_COMPRESSION, "compression"),
    (INCOMPAT_FILETYPE, "filetype"),
    (INCOMPAT_RECOVER, "needs_recovery"),
    (INCOMPAT_JOURNAL_DEV, "journal_dev"),
    (INCOMPAT_META_BG, "meta_bg"),
    (INCOMPAT_EXTENTS, "extent"),
    (INCOMPAT_64BIT, "64bit"),
    (INCOMPAT_MMP, "mmp"),
    (INCOMPAT_FLEX_BG, "flex_bg"),
    (INCOMPAT_EA_INODE, "ea_inode"),
    (INCOMPAT_DIRDATA, "dirdata"),
    (INCOMPAT_CSUM_SEED, "metadata_csum_seed"),
    (INCOMPAT_LARGEDIR, "large_dir"),
    (INCOMPAT_INLINE_DATA, "inline_data"),
    (INCOMPAT_ENCRYPT, "encrypt"),
    (INCOMPAT_CASEFOLD, "casefold"),
];

pub(crate) const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
pub(crate) const RO_COMPAT_LARGE_FILE: u32 = 0x2;
pub(crate) const RO_COMPAT_BTREE_DIR: u32 = 0x4;
pub(crate) const RO_COMPAT_HUGE_FILE: u32 = 0x8;
pub(crate) const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

#[derive(Debug, Clone)]
pub(crate) struct Superblock {
    pub inodes_count: u32,
    pub blocks_count: u64,
    pub free_blocks: u64,
    pub first_data_block: u32,
    pub block_size: u32,
    pub blocks_per_group: u32,
    pub inodes_per_group: u32,
    pub inode_size: u16,
    /// First non-reserved inode (s_first_ino; 11 on revision 0).
    pub first_ino: u32,
    pub desc_size: u16,
    pub compat: u32,
    pub incompat: u32,
    pub ro_compat: u32,
    pub uuid: [u8; 16],
    pub label: Option<String>,
    pub last_mounted: Option<String>,
    pub journal_inum: u32,
    pub journal_dev: u32,
    pub first_meta_bg: u32,
    pub backup_bgs: [u32; 2],
    /// s_checksum_type: 1 is crc32c, the only one defined.
    pub checksum_type: u8,
}

fn cstr(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    let s = b.get(..end)?;
    if s.is_empty() {
        None
    } else {
        Some(String::from_utf8_lossy(s).into_owned())
    }
}

pub(crate) fn incompat_names(bits: u32) -> String {
    let mut names: Vec<String> = Vec::new();
    for bit in 0..32 {
        let m = 1u32 << bit;
        if bits & m != 0 {
            match INCOMPAT_NAMES.iter().find(|(b, _)| *b == m) {
                Some((_, n)) => names.push((*n).to_string()),
                None => names.push(format!("unknown incompat bit {m:#x}")),
            }
        }
    }
    names.join(", ")
}

impl Superblock {
    pub fn parse(b: &[u8]) -> Result<Superblock> {
        let bad = |what: &str| Error::corrupt(format!("ext superblock: {what}"), SB_OFFSET);
        if b.len() < SB_SIZE {
            return Err(bad("short read"));
        }
        if le16(b, 0x38) != MAGIC {
            return Err(bad("bad magic"));
        }
        let incompat = le32(b, 0x60);
        let unsupported = incompat & !INCOMPAT_SUPPORTED;
        if unsupported != 0 {
            return Err(Error::Unsupported(format!(
                "ext filesystem feature(s): {}",
                incompat_names(unsupported)
            )));
        }
        let log_bs = le32(b, 0x18);
        if log_bs > 6 {
            return Err(bad("block size too large"));
        }
        let block_size = 1024u32 << log_bs;
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let hi = |off: usize| -> u64 {
            if is64 {
                u64::from(le32(b, off)) << 32
            } else {
                0
            }
        };
        let blocks_count = u64::from(le32(b, 0x4)) | hi(0x150);
        let free_blocks = u64::from(le32(b, 0xC)) | hi(0x158);
        let first_data_block = le32(b, 0x14);
        let blocks_per_group = le32(b, 0x20);
        let inodes_per_group = le32(b, 0x28);
        let inodes_count = le32(b, 0x0);
        let rev_level = le32(b, 0x4C);
        let inode_size = if rev_level == 0 { 128 } else { le16(b, 0x58) };
        let bits_per_block = block_size.saturating_mul(8);
        if blocks_per_group == 0 || blocks_per_group > bits_per_block {
            return Err(bad("blocks per group"));
        }
        if inodes_per_group == 0 || inodes_per_group > bits_per_block {
            return Err(bad("inodes per group"));
        }
        if inode_size < 128 || !inode_size.is_power_of_two() || u32::from(inode_size) > block_size {
            return Err(bad("inode size"));
        }
        if blocks_count.checked_mul(u64::from(block_size)).is_none() {
            return Err(bad("blocks count overflows"));
        }
        if u64::from(first_data_block) >= blocks_count {
            return Err(bad("first data block past the end"));
        }
        if block_size == 1024 && first_data_block != 1 || block_size > 1024 && first_data_block != 0
        {
            // bigalloc with 1k blocks uses 0; tolerate but note it.
            tracing::debug!(first_data_block, block_size, "unusual first data block");
        }
        let desc_size = if is64 {
            let d = le16(b, 0xFE);
            if d < 32 || !d.is_power_of_two() || u32::from(d) > block_size {
                return Err(bad("group descriptor size"));
            }
            d
        } else {
            32
        };
        let data_blocks = blocks_count - u64::from(first_data_block);
        let groups = data_blocks.div_ceil(u64::from(blocks_per_group));
        let group_count: u32 = u32::try_from(groups).map_err(|_| bad("too many groups"))?;
        let max_inodes = u64::from(group_count) * u64::from(inodes_per_group);
        if u64::from(inodes_count) > max_inodes {
            return Err(bad("inodes count larger than groups can hold"));
        }
        let mut uuid = [0u8; 16];
        if let Some(s) = b.get(0x68..0x78) {
            uuid.copy_from_slice(s);
        }
        Ok(Superblock {
            inodes_count,
            blocks_count,
            free_blocks,
            first_data_block,
            block_size,
            blocks_per_group,
            inodes_per_group,
            inode_size,
            first_ino: if rev_level == 0 { 11 } else { le32(b, 0x54) },
            desc_size,
            compat: le32(b, 0x5C),
            incompat,
            ro_compat: le32(b, 0x64),
            uuid,
            label: b.get(0x78..0x88).and_then(cstr),
            last_mounted: b.get(0x88..0xC8).and_then(cstr),
            journal_inum: le32(b, 0xE0),
            journal_dev: le32(b, 0xE4),
            first_meta_bg: le32(b, 0x104),
            backup_bgs: [le32(b, 0x24C), le32(b, 0x250)],
            checksum_type: b.get(0x175).copied().unwrap_or(0),
        })
    }

    pub fn has_incompat(&self, f: u32) -> bool {
        self.incompat & f != 0
    }
    pub fn has_ro_compat(&self, f: u32) -> bool {
        self.ro_compat & f != 0
    }
    pub fn has_compat(&self, f: u32) -> bool {
        self.compat & f != 0
    }

    /// Same rule as blkid: ext4 as soon as a feature ext3 lacks is present.
    pub fn kind(&self) -> &'static str {
        const EXT3_INCOMPAT: u32 = INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG;
        const EXT3_RO: u32 = RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_BTREE_DIR;
        if self.incompat & !EXT3_INCOMPAT != 0 || self.ro_compat & !EXT3_RO != 0 {
            "ext4"
        } else if self.has_compat(COMPAT_HAS_JOURNAL) {
            "ext3"
        } else {
            "ext2"
        }
    }

    pub fn uuid_string(&self) -> String {
        let h = hex::encode(self.uuid);
        let p = |a: usize, b: usize| h.get(a..b).unwrap_or("");
        format!(
            "{}-{}-{}-{}-{}",
            p(0, 8),
            p(8, 12),
            p(12, 16),
            p(16, 20),
            p(20, 32)
        )
    }

    fn group_has_super(&self, g: u32) -> bool {
        if self.has_compat(COMPAT_SPARSE_SUPER2) {
            return g == 0 || self.backup_bgs.contains(&g);
        }
        if g <= 1 || !self.has_ro_compat(RO_COMPAT_SPARSE_SUPER) {
            return true;
        }
        if g & 1 == 0 {
            return false;
        }
        [3u32, 5, 7].iter().any(|&base| {
            let mut n = base;
            while n < g {
                match n.checked_mul(base) {
                    Some(m) => n = m,
                    None => return false,
                }
            }
            n == g
        })
    }

    /// Byte offset (in the filesystem) of group `g`'s descriptor.
    pub fn group_desc_offset(&self, g: u32) -> Result<u64> {
        let bs = u64::from(self.block_size);
        let per_block = self.block_size / u32::from(self.desc_size);
        let ds = u64::from(self.desc_size);
        let meta_group = g / per_block;
        let block = if self.has_incompat(INCOMPAT_META_BG) && meta_group >= self.first_meta_bg {
            let first = meta_group * per_block;
            u64::from(self.first_data_block)
                + u64::from(first) * u64::from(self.blocks_per_group)
                + u64::from(self.group_has_super(first))
        } else {
            u64::from(self.first_data_block) + 1 + u64::from(meta_group)
        };
        if block >= self.blocks_count {
            return Err(Error::corrupt("group descriptor block past the end", block));
        }
        Ok(block * bs + u64::from(g % per_block) * ds)
    }
}
