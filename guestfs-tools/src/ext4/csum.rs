//! ext4 metadata checksums (`metadata_csum`): CRC32C as the kernel's `ext4_chksum` computes
//! it (no pre- or post-inversion), and the per-structure rules of
//! Documentation/filesystems/ext4 (superblock, group descriptors, inodes, extent blocks,
//! directory leaf and htree blocks, xattr blocks).

use super::bytes::{le16, le32};
use crate::{Error, Result};

const POLY: u32 = 0x82F6_3B78;

const fn make_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static TABLE: [u32; 256] = make_table();

fn crc32c_soft(mut crc: u32, data: &[u8]) -> u32 {
    for b in data {
        crc = TABLE[((crc ^ u32::from(*b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_sse42(crc: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut c = u64::from(crc);
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        c = _mm_crc32_u64(c, u64::from_le_bytes(a));
    }
    let mut c = c as u32;
    for b in words.remainder() {
        c = _mm_crc32_u8(c, *b);
    }
    c
}

/// CRC32C update without inversions (`crc32c_le` in the kernel).
pub(crate) fn crc32c(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU supports SSE4.2, checked just above.
        return unsafe { crc32c_sse42(crc, data) };
    }
    crc32c_soft(crc, data)
}

fn mismatch(what: String, stored: u32, computed: u32, offset: u64) -> Error {
    Error::corrupt(
        format!(
            "{what} checksum mismatch (stored {stored:#x}, computed {computed:#x}; \
             --no-verify-csum reads the image anyway)"
        ),
        offset,
    )
}

/// Superblock: CRC32C(~0) of the first 0x3FC bytes, stored at 0x3FC.
pub(crate) fn verify_superblock(raw: &[u8], offset: u64) -> Result<()> {
    let body = raw
        .get(..0x3FC)
        .ok_or_else(|| Error::corrupt("ext superblock: short read", offset))?;
    let computed = crc32c(!0, body);
    let stored = le32(raw, 0x3FC);
    if computed != stored {
        return Err(mismatch("ext superblock".into(), stored, computed, offset));
    }
    Ok(())
}

/// The filesystem-wide seed: `s_checksum_seed` with `metadata_csum_seed`, else the UUID's CRC.
pub(crate) fn fs_seed(raw_sb: &[u8], has_seed_field: bool, uuid: &[u8; 16]) -> u32 {
    if has_seed_field {
        le32(raw_sb, 0x270)
    } else {
        crc32c(!0, uuid)
    }
}

/// Group descriptor: low 16 bits of CRC32C(seed, group number, descriptor with its checksum
/// field read as zero).
pub(crate) fn verify_group_desc(seed: u32, group: u32, desc: &[u8], offset: u64) -> Result<()> {
    let mut c = crc32c(seed, &group.to_le_bytes());
    c = crc32c(c, desc.get(..0x1E).unwrap_or(&[]));
    c = crc32c(c, &[0u8; 2]);
    if desc.len() > 0x20 {
        c = crc32c(c, desc.get(0x20..).unwrap_or(&[]));
    }
    let computed = c & 0xFFFF;
    let stored = u32::from(le16(desc, 0x1E));
    if computed != stored {
        return Err(mismatch(
            format!("ext group descriptor {group}"),
            stored,
            computed,
            offset,
        ));
    }
    Ok(())
}

/// The per-inode seed: CRC32C(seed, inode number, generation).
pub(crate) fn inode_seed(seed: u32, ino: u32, generation: u32) -> u32 {
    crc32c(crc32c(seed, &ino.to_le_bytes()), &generation.to_le_bytes())
}

/// Inode: CRC32C(inode seed, the raw inode with both checksum halves read as zero); only
/// the low half is compared when the inode has no room for the high one.
pub(crate) fn verify_inode(iseed: u32, ino: u32, raw: &[u8], offset: u64) -> Result<()> {
    const LO: usize = 0x7C;
    const HI: usize = 0x82;
    // e2fsprogs accepts a never-written (all zero) inode.
    if raw.iter().all(|b| *b == 0) {
        return Ok(());
    }
    let has_hi = raw.len() > 128 && HI + 2 <= 128 + usize::from(le16(raw, 0x80));
    let zero = [0u8; 2];
    let mut c = crc32c(iseed, raw.get(..LO).unwrap_or(&[]));
    c = crc32c(c, &zero);
    c = crc32c(c, raw.get(LO + 2..128).unwrap_or(&[]));
    if raw.len() > 128 {
        c = crc32c(c, raw.get(128..HI).unwrap_or(&[]));
        let rest = if has_hi {
            c = crc32c(c, &zero);
            HI + 2
        } else {
            HI
        };
        c = crc32c(c, raw.get(rest..).unwrap_or(&[]));
    }
    let mut stored = u32::from(le16(raw, LO));
    let mut computed = c;
    if has_hi {
        stored |= u32::from(le16(raw, HI)) << 16;
    } else {
        computed &= 0xFFFF;
    }
    if computed != stored {
        return Err(mismatch(format!("inode {ino}"), stored, computed, offset));
    }
    Ok(())
}

/// Extent tree block: CRC32C(inode seed, header + eh_max entries), stored right after them.
pub(crate) fn verify_extent_block(iseed: u32, ino: u32, block: &[u8], offset: u64) -> Result<()> {
    let tail = 12 + 12 * usize::from(le16(block, 4));
    let Some(body) = block.get(..tail).filter(|_| tail + 4 <= block.len()) else {
        return Err(Error::corrupt(
            format!("inode {ino} extent block: no room for its checksum"),
            offset,
        ));
    };
    let computed = crc32c(iseed, body);
    let stored = le32(block, tail);
    if computed != stored {
        return Err(mismatch(
            format!("inode {ino} extent block"),
            stored,
            computed,
            offset,
        ));
    }
    Ok(())
}

/// Where an htree node keeps its count/limit header, as the kernel's `get_dx_countlimit`.
fn dx_count_offset(block: &[u8]) -> Option<usize> {
    let bs = block.len();
    let rec = |o: usize| usize::from(le16(block, o + 4));
    if rec(0) == bs {
        return Some(8);
    }
    if rec(0) == 12 && rec(12) == bs - 12 && le32(block, 24) == 0 && block.get(29) == Some(&8) {
        return Some(32);
    }
    None
}

/// Directory block: a leaf ends with a 12-byte fake entry holding CRC32C(inode seed, the
/// entries before it); an htree node has a `dx_tail` after its `limit` index entries.
pub(crate) fn verify_dir_block(iseed: u32, ino: u32, block: &[u8], offset: u64) -> Result<()> {
    let bs = block.len();
    let what = || format!("directory inode {ino} block");
    let t = bs.saturating_sub(12);
    let is_tail = le32(block, t) == 0
        && le16(block, t + 4) == 12
        && block.get(t + 6) == Some(&0)
        && block.get(t + 7) == Some(&0xDE);
    if is_tail {
        let computed = crc32c(iseed, block.get(..t).unwrap_or(&[]));
        let stored = le32(block, t + 8);
        if computed != stored {
            return Err(mismatch(what(), stored, computed, offset));
        }
        return Ok(());
    }
    let Some(co) = dx_count_offset(block) else {
        return Err(Error::corrupt(
            format!("{}: no checksum tail", what()),
            offset,
        ));
    };
    let limit = usize::from(le16(block, co));
    let count = usize::from(le16(block, co + 2));
    let tail = co + limit * 8;
    if tail + 8 > bs || count > limit {
        return Err(Error::corrupt(
            format!("{} (htree node): no room for its checksum", what()),
            offset,
        ));
    }
    let mut c = crc32c(iseed, block.get(..co + count * 8).unwrap_or(&[]));
    c = crc32c(c, block.get(tail..tail + 4).unwrap_or(&[]));
    c = crc32c(c, &[0u8; 4]);
    let stored = le32(block, tail + 4);
    if c != stored {
        return Err(mismatch(
            format!("{} (htree node)", what()),
            stored,
            c,
            offset,
        ));
    }
    Ok(())
}

/// Extended attribute block: CRC32C(seed, block number, block with its checksum zeroed).
pub(crate) fn verify_xattr_block(seed: u32, blk: u64, block: &[u8], offset: u64) -> Result<()> {
    let mut c = crc32c(seed, &blk.to_le_bytes());
    c = crc32c(c, block.get(..0x10).unwrap_or(&[]));
    c = crc32c(c, &[0u8; 4]);
    c = crc32c(c, block.get(0x14..).unwrap_or(&[]));
    let stored = le32(block, 0x10);
    if c != stored {
        return Err(mismatch(format!("xattr block {blk}"), stored, c, offset));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value_on_both_paths() {
        // CRC-32C("123456789") = 0xE3069283 with the usual inversions.
        assert_eq!(!crc32c_soft(!0, b"123456789"), 0xE306_9283);
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        for n in [0, 1, 7, 8, 9, 63, 1000] {
            assert_eq!(crc32c(0x1234, &data[..n]), crc32c_soft(0x1234, &data[..n]));
        }
    }
}
