//! MBR (DOS) partition tables with extended partitions and EBR chains.

use super::{extent, Partition, PartitionTable, TableKind};
use crate::block::BlockDevice;
use crate::{Error, Result};

const SECTOR: u64 = 512;
/// More logical partitions than any tool creates; bounds work on a hostile EBR chain.
pub const MAX_LOGICAL: usize = 128;

pub(super) enum Kind {
    /// Contains a 0xEE entry: the real table is GPT.
    Protective,
    Mbr,
    None,
}

#[derive(Clone, Copy)]
struct Entry {
    status: u8,
    kind: u8,
    start: u64,
    sectors: u64,
}

fn entries(sector: &[u8; 512]) -> [Entry; 4] {
    let mut out = [Entry {
        status: 0,
        kind: 0,
        start: 0,
        sectors: 0,
    }; 4];
    for (i, e) in out.iter_mut().enumerate() {
        let o = 446 + 16 * i;
        let Some(b) = sector.get(o..o + 16) else {
            continue;
        };
        let le = |s: usize| {
            b.get(s..s + 4)
                .and_then(|x| x.try_into().ok())
                .map(u32::from_le_bytes)
                .unwrap_or(0)
        };
        *e = Entry {
            status: b.first().copied().unwrap_or(0),
            kind: b.get(4).copied().unwrap_or(0),
            start: u64::from(le(8)),
            sectors: u64::from(le(12)),
        };
    }
    out
}

fn has_signature(sector: &[u8; 512]) -> bool {
    sector.get(510..512) == Some(&[0x55, 0xaa][..])
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

pub(super) fn classify(lba0: &[u8; 512]) -> Kind {
    if !has_signature(lba0) {
        return Kind::None;
    }
    let e = entries(lba0);
    if e.iter().any(|e| e.kind == 0xee) {
        return Kind::Protective;
    }
    // Like the kernel: boot indicators other than 0x00/0x80 mean this is not a partition
    // table (a filesystem boot sector, for example).
    if e.iter().any(|e| e.status != 0 && e.status != 0x80) {
        return Kind::None;
    }
    Kind::Mbr
}

pub(super) fn read(dev: &dyn BlockDevice, lba0: &[u8; 512]) -> Result<PartitionTable> {
    let sig = u32::from_le_bytes([lba0[440], lba0[441], lba0[442], lba0[443]]);
    let disk_id = format!("{sig:08x}");
    let mut parts = Vec::new();
    let mut extended: Option<(u64, u64)> = None;
    for (i, e) in entries(lba0).iter().enumerate() {
        if e.kind == 0 || e.sectors == 0 {
            continue;
        }
        let index = i as u32 + 1;
        let (start, size) = extent(
            dev,
            &format!("MBR partition {index}"),
            e.start,
            e.sectors,
            SECTOR,
        )?;
        if is_extended(e.kind) && extended.is_none() {
            extended = Some((e.start, e.sectors));
        }
        parts.push(Partition {
            index,
            start,
            size,
            type_id: format!("{:#04x}", e.kind),
            partuuid: Some(format!("{disk_id}-{index:02x}")),
            name: None,
            bootable: e.status == 0x80,
        });
    }
    if let Some((ext_start, ext_sectors)) = extended {
        read_logical(dev, &disk_id, ext_start, ext_sectors, &mut parts)?;
    }
    Ok(PartitionTable {
        kind: TableKind::Mbr,
        disk_id: Some(disk_id),
        sector_size: SECTOR,
        partitions: parts,
    })
}

/// Follows the EBR chain. Each EBR's first entry is a logical partition relative to the EBR;
/// its second entry links to the next EBR relative to the extended partition's start.
fn read_logical(
    dev: &dyn BlockDevice,
    disk_id: &str,
    ext_start: u64,
    ext_sectors: u64,
    parts: &mut Vec<Partition>,
) -> Result<()> {
    let mut seen: Vec<u64> = Vec::new();
    let mut ebr_lba = ext_start;
    let mut index: u32 = 5;
    let ext_end = ext_start.saturating_add(ext_sectors);
    loop {
        if seen.contains(&ebr_lba) {
            return Err(Error::corrupt(
                format!("MBR: EBR chain loops back to sector {ebr_lba}"),
                ebr_lba.saturating_mul(SECTOR),
            ));
        }
        if seen.len() >= MAX_LOGICAL {
            return Err(Error::Limit(format!(
                "MBR: more than {MAX_LOGICAL} extended boot records"
            )));
        }
        seen.push(ebr_lba);
        let off = ebr_lba
            .checked_mul(SECTOR)
            .filter(|o| o.checked_add(SECTOR).is_some_and(|e| e <= dev.size()));
        let Some(off) = off else {
            return Err(Error::corrupt(
                format!("MBR: EBR at sector {ebr_lba} lies past the end of the disk"),
                ebr_lba.saturating_mul(SECTOR),
            ));
        };
        let mut ebr = [0u8; 512];
        dev.read_at(&mut ebr, off)?;
        if !has_signature(&ebr) {
            // The kernel stops silently at a missing signature.
            tracing::warn!(sector = ebr_lba, "EBR without 0x55AA signature, chain ends");
            return Ok(());
        }
        let e = entries(&ebr);
        let mut next = None;
        for ent in e.iter().take(2) {
            if ent.kind == 0 || ent.sectors == 0 {
                continue;
            }
            if is_extended(ent.kind) {
                if next.is_none() {
                    next = Some(
                        ext_start
                            .checked_add(ent.start)
                            .ok_or_else(|| Error::corrupt("MBR: EBR link overflows", off))?,
                    );
                }
                continue;
            }
            let start_lba = ebr_lba
                .checked_add(ent.start)
                .ok_or_else(|| Error::corrupt("MBR: logical partition start overflows", off))?;
            let what = format!("MBR logical partition {index}");
            let (start, size) = extent(dev, &what, start_lba, ent.sectors, SECTOR)?;
            if start_lba.saturating_add(ent.sectors) > ext_end {
                tracing::warn!(
                    index,
                    "logical partition extends past its extended partition"
                );
            }
            parts.push(Partition {
                index,
                start,
                size,
                type_id: format!("{:#04x}", ent.kind),
                partuuid: Some(format!("{disk_id}-{index:02x}")),
                name: None,
                bootable: ent.status == 0x80,
            });
            index += 1;
        }
        match next {
            Some(n) => ebr_lba = n,
            None => return Ok(()),
        }
    }
}
