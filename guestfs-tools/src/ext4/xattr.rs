//! Extended attributes: in-inode area and external block, ea_inode values, and conversion
//! of ext4's compact POSIX ACLs to the Linux xattr format.

use super::bytes::{le16, le32, u8_at};
use super::{Ext4, Inode};
use crate::{Error, Result};

const XATTR_MAGIC: u32 = 0xEA02_0000;
/// Larger values are refused; the kernel's own limit is 64 KiB.
const MAX_VALUE: u64 = 1 << 20;
const INDEX_SYSTEM: u8 = 7;

struct RawXattr {
    index: u8,
    name: Vec<u8>,
    value: Vec<u8>,
}

fn prefix(index: u8) -> Option<&'static str> {
    Some(match index {
        0 => "",
        1 => "user.",
        2 => "system.posix_acl_access",
        3 => "system.posix_acl_default",
        4 => "trusted.",
        6 => "security.",
        7 => "system.",
        8 => "system.richacl",
        _ => return None,
    })
}

/// ext4 stores ACLs as version 1 with 4-byte entries for the *_OBJ/MASK/OTHER tags; tools
/// see version 2 with 8-byte entries everywhere.
fn acl_to_xattr(v: &[u8]) -> Result<Vec<u8>> {
    const ACL_USER: u16 = 2;
    const ACL_GROUP: u16 = 8;
    let bad = || Error::corrupt("POSIX ACL xattr", 0);
    if v.len() < 4 || le32(v, 0) != 1 {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(v.len() * 2);
    out.extend_from_slice(&2u32.to_le_bytes());
    let mut off = 4usize;
    while off < v.len() {
        if v.len() - off < 4 {
            return Err(bad());
        }
        let tag = le16(v, off);
        let perm = le16(v, off + 2);
        let id = if tag == ACL_USER || tag == ACL_GROUP {
            if v.len() - off < 8 {
                return Err(bad());
            }
            let id = le32(v, off + 4);
            off += 8;
            id
        } else {
            off += 4;
            u32::MAX
        };
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    Ok(out)
}

impl Ext4 {
    /// Parses an entry table. `entries` starts at the first entry; values are at
    /// `value_base[e_value_offs..]`.
    fn parse_xattr_entries(
        &self,
        entries: &[u8],
        value_base: &[u8],
        at: u64,
        resolve_ea: bool,
        out: &mut Vec<RawXattr>,
    ) -> Result<()> {
        let mut off = 0usize;
        while entries.len().saturating_sub(off) >= 4 && le32(entries, off) != 0 {
            let bad = |what: &str| Error::corrupt(format!("xattr entry: {what}"), at);
            if entries.len() - off < 16 {
                return Err(bad("truncated"));
            }
            let name_len = usize::from(u8_at(entries, off));
            let index = u8_at(entries, off + 1);
            let value_offs = usize::from(le16(entries, off + 2));
            let value_inum = le32(entries, off + 4);
            let value_size = le32(entries, off + 8);
            let name = entries
                .get(off + 16..off + 16 + name_len)
                .ok_or_else(|| bad("name past the end"))?
                .to_vec();
            off += (16 + name_len + 3) & !3;
            if u64::from(value_size) > MAX_VALUE {
                return Err(Error::Limit(format!("xattr value of {value_size} bytes")));
            }
            let value = if value_inum != 0 {
                if !resolve_ea {
                    continue;
                }
                self.ea_inode_value(value_inum, value_size)?
            } else {
                let end = value_offs
                    .checked_add(value_size as usize)
                    .ok_or_else(|| bad("value offset"))?;
                value_base
                    .get(value_offs..end)
                    .ok_or_else(|| bad("value past the end"))?
                    .to_vec()
            };
            out.push(RawXattr { index, name, value });
        }
        Ok(())
    }

    fn ea_inode_value(&self, ino: u32, size: u32) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        if !self.is_ea_inode(&inode) {
            return Err(Error::corrupt(
                format!("xattr value inode {ino} lacks the EA_INODE flag"),
                0,
            ));
        }
        let mut v = vec![0u8; size as usize];
        let n = self.read_at(&inode, 0, &mut v)?;
        if n != v.len() {
            return Err(Error::corrupt(
                format!("xattr value inode {ino} shorter than the value"),
                0,
            ));
        }
        Ok(v)
    }

    /// `full`: also the external block and values in EA inodes. Inline data needs neither,
    /// and skipping them keeps an EA inode that claims to be inline from recursing.
    fn raw_xattrs(&self, inode: &Inode, full: bool) -> Result<Vec<RawXattr>> {
        let (with_block, resolve_ea) = (full, full);
        let mut out = Vec::new();
        let ibody = self.ibody(inode);
        if ibody.len() >= 4 && le32(ibody, 0) == XATTR_MAGIC {
            let body = ibody.get(4..).unwrap_or(&[]);
            self.parse_xattr_entries(body, body, 0, resolve_ea, &mut out)?;
        }
        let acl = self.file_acl(inode);
        if with_block && acl != 0 {
            let b = self.meta_block(acl, "xattr block")?;
            let at = acl.saturating_mul(self.bs());
            if le32(&b, 0) != XATTR_MAGIC || le32(&b, 8) != 1 {
                return Err(Error::corrupt("xattr block header", at));
            }
            if let Some(seed) = self.csum {
                super::csum::verify_xattr_block(seed, acl, &b, at)?;
            }
            self.parse_xattr_entries(b.get(32..).unwrap_or(&[]), &b, at, resolve_ea, &mut out)?;
        }
        Ok(out)
    }

    /// The `system.data` value of an inline-data inode.
    pub(crate) fn inline_xattr(&self, inode: &Inode) -> Result<Option<Vec<u8>>> {
        Ok(self
            .raw_xattrs(inode, false)?
            .into_iter()
            .find(|x| x.index == INDEX_SYSTEM && x.name == b"data")
            .map(|x| x.value))
    }

    /// All extended attributes with full names, sorted by name. POSIX ACLs are returned in
    /// the Linux xattr format (as getfattr shows them); `system.data` (inline data) is
    /// internal and left out.
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        for x in self.raw_xattrs(inode, true)? {
            if x.index == INDEX_SYSTEM && x.name == b"data" {
                continue;
            }
            let Some(p) = prefix(x.index) else {
                tracing::warn!(
                    ino = inode.ino,
                    index = x.index,
                    "skipping xattr with unknown name index"
                );
                continue;
            };
            let name = format!("{p}{}", String::from_utf8_lossy(&x.name));
            let value = if x.index == 2 || x.index == 3 {
                acl_to_xattr(&x.value)?
            } else {
                x.value
            };
            out.push((name, value));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}
