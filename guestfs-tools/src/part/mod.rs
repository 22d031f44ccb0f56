//! Partition tables: GPT, MBR (with extended/logical partitions), or a whole-disk filesystem.

use crate::block::{BlockDevice, Device, Slice};
use crate::{Error, Result};
use std::sync::Arc;

mod gpt;
mod mbr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum TableKind {
    Gpt,
    Mbr,
    None,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Partition {
    /// Linux numbering: GPT slot + 1; MBR primaries 1-4, logical partitions 5.. in chain order.
    pub index: u32,
    /// Bytes from the start of the disk.
    pub start: u64,
    /// Bytes.
    pub size: u64,
    /// GPT type GUID (lowercase, hyphenated) or MBR type as "0x83".
    pub type_id: String,
    /// GPT unique GUID, or for MBR "<disk signature>-<index>" as blkid reports PARTUUID.
    pub partuuid: Option<String>,
    /// GPT partition name.
    pub name: Option<String>,
    /// MBR active flag, GPT "legacy BIOS bootable" attribute.
    pub bootable: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionTable {
    pub kind: TableKind,
    /// GPT disk GUID or MBR disk signature (8 hex digits).
    pub disk_id: Option<String>,
    pub sector_size: u64,
    pub partitions: Vec<Partition>,
}

/// Reads the partition table of `dev`. A disk without a recognised table (for example a
/// filesystem on the whole disk) yields kind `None` and no partitions.
pub fn read_partitions(dev: &dyn BlockDevice) -> Result<PartitionTable> {
    let mut lba0 = [0u8; 512];
    if dev.size() < 512 {
        return Ok(none());
    }
    dev.read_at(&mut lba0, 0)?;
    match mbr::classify(&lba0) {
        mbr::Kind::Protective => gpt::read(dev),
        mbr::Kind::Mbr => mbr::read(dev, &lba0),
        mbr::Kind::None => {
            // Some tools write GPT without a protective MBR; accept a valid header.
            match gpt::read(dev) {
                Ok(t) => Ok(t),
                Err(_) => Ok(none()),
            }
        }
    }
}

fn none() -> PartitionTable {
    PartitionTable {
        kind: TableKind::None,
        disk_id: None,
        sector_size: 512,
        partitions: vec![],
    }
}

/// `start`/`len` in sectors → bytes, refusing partitions that leave the disk.
fn extent(
    dev: &dyn BlockDevice,
    what: &str,
    start_lba: u64,
    sectors: u64,
    sector_size: u64,
) -> Result<(u64, u64)> {
    let start = start_lba.checked_mul(sector_size);
    let size = sectors.checked_mul(sector_size);
    match (start, size) {
        (Some(s), Some(z)) if s.checked_add(z).is_some_and(|e| e <= dev.size()) => Ok((s, z)),
        _ => Err(Error::corrupt(
            format!(
                "{what} (sectors {start_lba}+{sectors}) ends past the end of the disk ({} bytes)",
                dev.size()
            ),
            start_lba.saturating_mul(sector_size),
        )),
    }
}

impl Partition {
    pub fn device(&self, disk: &Device) -> Result<Device> {
        Ok(Arc::new(Slice::new(disk.clone(), self.start, self.size)?))
    }
}
