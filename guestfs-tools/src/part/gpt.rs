//! GUID partition tables (UEFI spec, chapter 5): primary header at LBA 1, backup at the
//! last LBA; both are checked with their CRC32s.

use super::{extent, Partition, PartitionTable, TableKind};
use crate::block::BlockDevice;
use crate::{Error, Result};

const SIGNATURE: &[u8; 8] = b"EFI PART";
pub const MAX_ENTRIES: u32 = 1024;
pub const MAX_ENTRY_SIZE: u32 = 4096;
const ATTR_LEGACY_BOOTABLE: u64 = 1 << 2;

struct Header {
    first_usable: u64,
    last_usable: u64,
    disk_guid: String,
    entries_lba: u64,
    count: u32,
    entry_size: u32,
    entries_crc: u32,
}

fn le32(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}

fn le64(b: &[u8], o: usize) -> u64 {
    b.get(o..o + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// GUIDs are stored with their first three fields little-endian.
pub(crate) fn guid(b: &[u8]) -> String {
    let mut g = [0u8; 16];
    for (d, s) in g.iter_mut().zip(b) {
        *d = *s;
    }
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]
    )
}

fn parse_header(dev: &dyn BlockDevice, lba: u64, ss: u64) -> Result<Header> {
    let off = lba
        .checked_mul(ss)
        .filter(|o| o.checked_add(ss).is_some_and(|e| e <= dev.size()))
        .ok_or_else(|| Error::corrupt("GPT header past end of disk", lba.saturating_mul(ss)))?;
    let mut buf = vec![0u8; ss as usize];
    dev.read_at(&mut buf, off)?;
    if buf.get(..8) != Some(&SIGNATURE[..]) {
        return Err(Error::corrupt("GPT header signature missing", off));
    }
    let hsize = le32(&buf, 12) as usize;
    if hsize < 92 || hsize > buf.len() {
        return Err(Error::corrupt(
            format!("GPT header size {hsize} invalid"),
            off,
        ));
    }
    let stored = le32(&buf, 16);
    let mut h = buf.get(..hsize).unwrap_or_default().to_vec();
    if let Some(c) = h.get_mut(16..20) {
        c.fill(0);
    }
    if crc32fast::hash(&h) != stored {
        return Err(Error::corrupt("GPT header CRC mismatch", off));
    }
    let my_lba = le64(&buf, 24);
    if my_lba != lba {
        return Err(Error::corrupt(
            format!("GPT header says it is at LBA {my_lba}, found at {lba}"),
            off,
        ));
    }
    let count = le32(&buf, 80);
    let entry_size = le32(&buf, 84);
    if count > MAX_ENTRIES {
        return Err(Error::corrupt(
            format!("GPT entry count {count} above {MAX_ENTRIES}"),
            off,
        ));
    }
    if !(128..=MAX_ENTRY_SIZE).contains(&entry_size) || entry_size & 7 != 0 {
        return Err(Error::corrupt(
            format!("GPT entry size {entry_size} invalid"),
            off,
        ));
    }
    Ok(Header {
        first_usable: le64(&buf, 40),
        last_usable: le64(&buf, 48),
        disk_guid: guid(buf.get(56..72).unwrap_or_default()),
        entries_lba: le64(&buf, 72),
        count,
        entry_size,
        entries_crc: le32(&buf, 88),
    })
}

fn read_entries(dev: &dyn BlockDevice, h: &Header, ss: u64) -> Result<Vec<u8>> {
    // count ≤ 1024 and entry_size ≤ 4096 were checked: at most 4 MiB.
    let len = u64::from(h.count) * u64::from(h.entry_size);
    let off = h
        .entries_lba
        .checked_mul(ss)
        .filter(|o| o.checked_add(len).is_some_and(|e| e <= dev.size()))
        .ok_or_else(|| {
            Error::corrupt(
                "GPT partition entry array past end of disk",
                h.entries_lba.saturating_mul(ss),
            )
        })?;
    let mut buf = vec![0u8; len as usize];
    dev.read_at(&mut buf, off)?;
    if crc32fast::hash(&buf) != h.entries_crc {
        return Err(Error::corrupt(
            "GPT partition entry array CRC mismatch",
            off,
        ));
    }
    Ok(buf)
}

fn load(dev: &dyn BlockDevice, lba: u64, ss: u64) -> Result<(Header, Vec<u8>)> {
    let h = parse_header(dev, lba, ss)?;
    let e = read_entries(dev, &h, ss)?;
    Ok((h, e))
}

pub(super) fn read(dev: &dyn BlockDevice) -> Result<PartitionTable> {
    let mut last_err = None;
    // 512-byte sectors first; a 4 KiB-sector disk has its header at byte 4096.
    for ss in [512u64, 4096] {
        let sectors = dev.size() / ss;
        if sectors < 2 {
            continue;
        }
        let (h, entries) = match load(dev, 1, ss) {
            Ok(v) => v,
            Err(primary) => match load(dev, sectors - 1, ss) {
                Ok(v) => {
                    tracing::warn!(error = %primary, "primary GPT unusable, using the backup header");
                    v
                }
                Err(backup) => {
                    tracing::debug!(error = %backup, sector_size = ss, "backup GPT unusable");
                    last_err.get_or_insert(primary);
                    continue;
                }
            },
        };
        return table(dev, &h, &entries, ss);
    }
    Err(last_err.unwrap_or_else(|| Error::corrupt("GPT: disk too small", 0)))
}

fn table(dev: &dyn BlockDevice, h: &Header, entries: &[u8], ss: u64) -> Result<PartitionTable> {
    let mut parts = Vec::new();
    for (i, e) in entries.chunks_exact(h.entry_size as usize).enumerate() {
        let type_guid = e.get(0..16).unwrap_or_default();
        if type_guid.iter().all(|b| *b == 0) {
            continue;
        }
        let index = i as u32 + 1;
        let first = le64(e, 32);
        let last = le64(e, 40);
        let what = format!("GPT partition {index}");
        if last < first {
            return Err(Error::corrupt(
                format!("{what} ends (LBA {last}) before it starts (LBA {first})"),
                first.saturating_mul(ss),
            ));
        }
        let (start, size) = extent(dev, &what, first, last - first + 1, ss)?;
        if first < h.first_usable || last > h.last_usable {
            tracing::warn!(index, "GPT partition outside the usable LBA range");
        }
        let attrs = le64(e, 48);
        let name: Vec<u16> = e
            .get(56..128)
            .unwrap_or_default()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|c| *c != 0)
            .collect();
        let name = String::from_utf16_lossy(&name);
        parts.push(Partition {
            index,
            start,
            size,
            type_id: guid(type_guid),
            partuuid: Some(guid(e.get(16..32).unwrap_or_default())),
            name: (!name.is_empty()).then_some(name),
            bootable: attrs & ATTR_LEGACY_BOOTABLE != 0,
        });
    }
    Ok(PartitionTable {
        kind: TableKind::Gpt,
        disk_id: Some(h.disk_guid.clone()),
        sector_size: ss,
        partitions: parts,
    })
}
