//! Partition tables: GPT, MBR (with extended/logical partitions), or a whole-disk filesystem.
//! STUB (lead): replaced by the block branch.
use crate::block::{BlockDevice, Device, Slice};
use crate::Result;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum TableKind {
    Gpt,
    Mbr,
    None,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Partition {
    pub index: u32,
    pub start: u64,
    pub size: u64,
    pub type_id: String,
    pub partuuid: Option<String>,
    pub name: Option<String>,
    pub bootable: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionTable {
    pub kind: TableKind,
    pub disk_id: Option<String>,
    pub sector_size: u64,
    pub partitions: Vec<Partition>,
}

pub fn read_partitions(_dev: &dyn BlockDevice) -> Result<PartitionTable> {
    Ok(PartitionTable {
        kind: TableKind::None,
        disk_id: None,
        sector_size: 512,
        partitions: vec![],
    })
}

impl Partition {
    pub fn device(&self, disk: &Device) -> Result<Device> {
        Ok(Arc::new(Slice::new(disk.clone(), self.start, self.size)?))
    }
}
