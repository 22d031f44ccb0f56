//! ext4 fast-commit replay, in memory.
//!
//! A fast commit logs logical changes (inode images, extent ranges, directory entries) in the
//! blocks after the regular jbd2 log. The kernel (`fs/ext4/fast_commit.c`) scans them first:
//! tags are summed with crc32c and only the commits whose TAIL carries the expected tid and a
//! matching crc count; the first bad one ends the scan (an error if no commit verified before
//! it). Then it replays the counted tags in order.
//!
//! We keep the replay logical instead of rewriting extent trees and directory blocks like the
//! kernel does: replayed inodes are kept as raw inode images, files whose mapping changed get
//! a flat extent map (the on-disk tree with the logged ranges applied), and directories with
//! entry changes get their full listing. The reader consults these before the disk, so the
//! image is never written and the result is what the kernel's replay would produce for every
//! field the reader exposes.

use super::bytes::{le16, le32};
use super::inode::{FL_EXTENTS, FL_INLINE_DATA};
use super::map::Mapping;
use super::sb::INCOMPAT_FILETYPE;
use super::{DirEntry, Ext4, FileType, ROOT_INO};
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

const TAG_ADD_RANGE: u16 = 1;
const TAG_DEL_RANGE: u16 = 2;
const TAG_CREAT: u16 = 3;
const TAG_LINK: u16 = 4;
const TAG_UNLINK: u16 = 5;
const TAG_INODE: u16 = 6;
const TAG_PAD: u16 = 7;
const TAG_TAIL: u16 = 8;
const TAG_HEAD: u16 = 9;

/// EXT4_FC_SUPPORTED_FEATURES: no head feature bit is defined yet.
const SUPPORTED_FEATURES: u32 = 0;
const TL_LEN: usize = 4;
/// sizeof(struct ext4_fc_dentry_info) and sizeof(struct ext4_fc_inode).
const DENTRY_HDR: usize = 8;
const INODE_HDR: usize = 4;
const NAME_MAX: usize = 255;
/// offsetof(struct ext4_inode, i_block) and offsetof(.., i_generation).
const OFF_IBLOCK: usize = 0x28;
const OFF_GEN: usize = 0x64;
const EXT_MAGIC: u16 = 0xF30A;
const INIT_MAX_LEN: u64 = 32768;
const LBLK_LIMIT: u64 = 1 << 32;
/// Bound on what the scan keeps in memory and on a materialized extent map.
const MAX_TAG_BYTES: usize = 256 << 20;
const MAX_EXTENTS: usize = 1 << 20;

/// One tag of a verified fast commit.
pub(crate) struct FcTag {
    tag: u16,
    /// Journal block the tag was read from, for error messages.
    jblk: u64,
    val: Vec<u8>,
}

fn tag_name(tag: u16) -> &'static str {
    match tag {
        TAG_ADD_RANGE => "ADD_RANGE",
        TAG_DEL_RANGE => "DEL_RANGE",
        TAG_CREAT => "CREAT",
        TAG_LINK => "LINK",
        TAG_UNLINK => "UNLINK",
        TAG_INODE => "INODE",
        TAG_PAD => "PAD",
        TAG_TAIL => "TAIL",
        TAG_HEAD => "HEAD",
        _ => "unknown",
    }
}

/// `ext4_fc_value_len_isvalid`.
fn len_valid(tag: u16, len: usize, inode_size: u16) -> bool {
    match tag {
        TAG_ADD_RANGE => len == 16,
        TAG_DEL_RANGE => len == 12,
        TAG_CREAT | TAG_LINK | TAG_UNLINK => {
            (1..=NAME_MAX).contains(&len.saturating_sub(DENTRY_HDR)) && len > DENTRY_HDR
        }
        TAG_INODE => {
            let n = len.saturating_sub(INODE_HDR);
            len > INODE_HDR && n >= 128 && n <= usize::from(inode_size)
        }
        TAG_PAD => true,
        TAG_TAIL => len >= 8,
        TAG_HEAD => len == 8,
        _ => false,
    }
}

/// The kernel's scan pass (`ext4_fc_replay_scan`). `read(off)` returns fast-commit block
/// `off` (with its journal block number) or `None` past the area. Returns the tags of the
/// commits that verified, in order.
pub(crate) fn scan(
    read: &mut dyn FnMut(u64) -> Result<Option<(u64, Vec<u8>)>>,
    expected_tid: u32,
    inode_size: u16,
) -> Result<Vec<FcTag>> {
    let mut tags: Vec<FcTag> = Vec::new();
    let mut valid = 0usize;
    let mut crc = 0u32;
    let mut bytes = 0usize;
    // A failure before any commit verified fails the kernel's mount; after one, it only
    // ends the scan.
    let fail = |valid: usize, e: Error| -> Result<()> {
        if valid > 0 {
            Ok(())
        } else {
            Err(e)
        }
    };
    let mut off = 0u64;
    'blocks: while let Some((jblk, b)) = read(off)? {
        if off == 0 && le16(&b, 0) != TAG_HEAD {
            // No fast commit since the last full commit.
            return Ok(Vec::new());
        }
        off += 1;
        let mut cur = 0usize;
        while cur + TL_LEN <= b.len() {
            let tag = le16(&b, cur);
            let len = usize::from(le16(&b, cur + 2));
            let val_at = cur + TL_LEN;
            let bad = |what: &str| {
                Error::corrupt(
                    format!(
                        "ext4 fast-commit tag {} ({tag}) at journal block {jblk}: {what}",
                        tag_name(tag)
                    ),
                    0,
                )
            };
            if len > b.len() - val_at || !len_valid(tag, len, inode_size) {
                fail(valid, bad(&format!("bad length {len}")))?;
                break 'blocks;
            }
            let whole = b.get(cur..val_at + len).unwrap_or(&[]);
            let val = b.get(val_at..val_at + len).unwrap_or(&[]);
            match tag {
                TAG_ADD_RANGE | TAG_DEL_RANGE | TAG_LINK | TAG_UNLINK | TAG_CREAT | TAG_INODE
                | TAG_PAD => {
                    crc = super::csum::crc32c(crc, whole);
                }
                TAG_TAIL => {
                    // The tail's own crc field is not summed.
                    crc = super::csum::crc32c(crc, b.get(cur..val_at + 4).unwrap_or(&[]));
                    let tid = le32(val, 0);
                    let stored = le32(val, 4);
                    if tid == expected_tid && stored == crc {
                        // Counted below, so `valid` covers this tail.
                    } else {
                        fail(
                            valid,
                            bad(&format!(
                                "commit does not verify (tid {tid}, expected {expected_tid}; \
                                 crc {stored:#x}, computed {crc:#x})"
                            )),
                        )?;
                        break 'blocks;
                    }
                }
                TAG_HEAD => {
                    let features = le32(val, 0);
                    if features & !SUPPORTED_FEATURES != 0 {
                        return Err(Error::Unsupported(format!(
                            "ext4 fast-commit features {features:#x} at journal block {jblk}"
                        )));
                    }
                    if le32(val, 4) != expected_tid {
                        // Left over from an older transaction: nothing (more) to replay.
                        break 'blocks;
                    }
                    crc = super::csum::crc32c(crc, whole);
                }
                _ => {
                    fail(valid, bad("unknown tag"))?;
                    break 'blocks;
                }
            }
            bytes = bytes.saturating_add(len + TL_LEN);
            if bytes > MAX_TAG_BYTES {
                return Err(Error::Limit("ext4 fast-commit area too large".into()));
            }
            // Padding carries nothing to replay; keeping it would only cost memory.
            if tag != TAG_PAD {
                tags.push(FcTag {
                    tag,
                    jblk,
                    val: val.to_vec(),
                });
            }
            if tag == TAG_TAIL {
                valid = tags.len();
                crc = 0;
            }
            cur = val_at + len;
        }
    }
    tags.truncate(valid);
    Ok(tags)
}

/// Logical → physical map of one file after replay: start → (physical start, length).
/// Only initialized blocks are kept: an unwritten extent reads as zeros, like a hole.
#[derive(Default, Clone)]
pub(crate) struct ExtMap(BTreeMap<u64, (u64, u64)>);

impl ExtMap {
    fn remove(&mut self, start: u64, end: u64) {
        let mut hits = Vec::new();
        for (&k, &(p, l)) in self.0.range(..end).rev() {
            if k.saturating_add(l) <= start {
                break;
            }
            hits.push((k, p, l));
        }
        for (k, p, l) in hits {
            self.0.remove(&k);
            if k < start {
                self.0.insert(k, (p, start - k));
            }
            let e = k.saturating_add(l);
            if e > end {
                self.0.insert(end, (p.saturating_add(end - k), e - end));
            }
        }
    }

    pub(crate) fn lookup(&self, lblk: u64) -> Mapping {
        if let Some((&k, &(p, l))) = self.0.range(..=lblk).next_back() {
            if k.saturating_add(l) > lblk {
                return Mapping {
                    phys: Some(p.saturating_add(lblk - k)),
                    len: (k + l - lblk).max(1),
                };
            }
        }
        let next = self
            .0
            .range(lblk.saturating_add(1)..)
            .next()
            .map_or(LBLK_LIMIT, |(&k, _)| k);
        Mapping {
            phys: None,
            len: next.saturating_sub(lblk).max(1),
        }
    }
}

/// Replay results the reader consults before the disk.
#[derive(Default)]
pub(crate) struct FcState {
    /// Raw inode images (inode_size bytes) as the replay leaves them.
    pub inodes: HashMap<u32, Arc<[u8]>>,
    /// Files whose block mapping the replay changed.
    pub extents: HashMap<u32, ExtMap>,
    /// Directories whose entries the replay changed: their full listing.
    pub dirs: HashMap<u32, Vec<DirEntry>>,
    /// Tags replayed.
    pub tags: u32,
}

fn file_type_of(mode: u16) -> Option<FileType> {
    Some(match mode & 0o170000 {
        0o100000 => FileType::Regular,
        0o040000 => FileType::Directory,
        0o120000 => FileType::Symlink,
        0o020000 => FileType::CharDevice,
        0o060000 => FileType::BlockDevice,
        0o010000 => FileType::Fifo,
        0o140000 => FileType::Socket,
        _ => return None,
    })
}

impl Ext4 {
    /// Whether `ext4_iget(ino, EXT4_IGET_NORMAL)` would succeed: a valid number and an
    /// in-use inode of a known type.
    fn fc_live(&self, ino: u32) -> Option<super::Inode> {
        if ino == 0 || ino > self.sb.inodes_count || (ino < self.sb.first_ino && ino != ROOT_INO) {
            return None;
        }
        let i = self.inode(ino).ok()?;
        (i.links > 0 && file_type_of(i.mode).is_some()).then_some(i)
    }

    /// The raw inode as the replay sees it: its replayed image, else the inode table's bytes
    /// (unverified, like `ext4_get_fc_inode_loc`).
    fn fc_raw(&self, ino: u32) -> Result<Vec<u8>> {
        if let Some(r) = self.fc.inodes.get(&ino) {
            return Ok(r.to_vec());
        }
        self.with_raw_inode(ino, false, |raw, _| raw.to_vec())
    }

    fn fc_set_links(&mut self, ino: u32, f: impl FnOnce(u16) -> u16) -> Result<()> {
        let mut raw = self.fc_raw(ino)?;
        let n = f(le16(&raw, 0x1A));
        if let Some(s) = raw.get_mut(0x1A..0x1C) {
            s.copy_from_slice(&n.to_le_bytes());
        }
        self.fc.inodes.insert(ino, raw.into());
        Ok(())
    }

    fn fc_dir(&mut self, dir: u32) -> Result<&mut Vec<DirEntry>> {
        if !self.fc.dirs.contains_key(&dir) {
            let list = self.read_dir(dir)?;
            self.fc.dirs.insert(dir, list);
        }
        self.fc
            .dirs
            .get_mut(&dir)
            .ok_or_else(|| Error::Other("fast-commit directory state".into()))
    }

    fn fc_extents(&mut self, inode: &super::Inode) -> Result<&mut ExtMap> {
        let ino = inode.ino;
        if !self.fc.extents.contains_key(&ino) {
            let mut m = ExtMap::default();
            let mut lblk = 0u64;
            while lblk < LBLK_LIMIT {
                let r = self.map_block(inode, lblk)?;
                if let Some(p) = r.phys {
                    m.0.insert(lblk, (p, r.len));
                    if m.0.len() > MAX_EXTENTS {
                        return Err(Error::Limit(format!(
                            "inode {ino}: more than {MAX_EXTENTS} extents to replay"
                        )));
                    }
                }
                lblk = lblk.saturating_add(r.len.max(1));
            }
            self.fc.extents.insert(ino, m);
        }
        self.fc
            .extents
            .get_mut(&ino)
            .ok_or_else(|| Error::Other("fast-commit extent state".into()))
    }

    /// `ext4_fc_replay_link_internal`: adds `name` → `ino` in `parent` unless it exists.
    fn fc_link(
        &mut self,
        parent: u32,
        name: &[u8],
        ino: u32,
        ftype: Option<FileType>,
    ) -> Result<()> {
        match self.fc_live(parent) {
            Some(d) if d.file_type() == FileType::Directory => {}
            _ => return Ok(()),
        }
        let with_type = self.sb.has_incompat(INCOMPAT_FILETYPE);
        let list = self.fc_dir(parent)?;
        if list.iter().any(|e| e.name == name) {
            return Ok(()); // -EEXIST: already there, the kernel leaves it.
        }
        list.push(DirEntry {
            name: name.to_vec(),
            ino,
            file_type: if with_type { ftype } else { None },
        });
        self.fc_set_links(ino, |n| n.saturating_add(1))
    }

    fn fc_apply_one(&mut self, t: &FcTag) -> Result<()> {
        let v = &t.val;
        let unsupported = |what: &str| {
            Error::Unsupported(format!(
                "ext4 fast-commit tag {} at journal block {}: {what}",
                tag_name(t.tag),
                t.jblk
            ))
        };
        match t.tag {
            TAG_INODE => {
                let ino = le32(v, 0);
                if ino == 0 || ino > self.sb.inodes_count {
                    return Ok(()); // ext4_get_fc_inode_loc fails: the kernel skips it.
                }
                let fc = v.get(INODE_HDR..).unwrap_or(&[]);
                let mut raw = self.fc_raw(ino)?;
                let n = fc.len().min(raw.len());
                if let (Some(d), Some(s)) = (raw.get_mut(..OFF_IBLOCK), fc.get(..OFF_IBLOCK)) {
                    d.copy_from_slice(s);
                }
                if n > OFF_GEN {
                    if let (Some(d), Some(s)) = (raw.get_mut(OFF_GEN..n), fc.get(OFF_GEN..n)) {
                        d.copy_from_slice(s);
                    }
                }
                let flags = le32(&raw, 0x20);
                if flags & FL_EXTENTS != 0 {
                    if le16(&raw, OFF_IBLOCK) != EXT_MAGIC {
                        // Not an extent tree yet: an empty root, as the kernel writes.
                        if let Some(h) = raw.get_mut(OFF_IBLOCK..OFF_IBLOCK + 12) {
                            h.fill(0);
                            h[0..2].copy_from_slice(&EXT_MAGIC.to_le_bytes());
                            h[4..6].copy_from_slice(&4u16.to_le_bytes());
                        }
                        self.fc.extents.remove(&ino);
                    }
                } else if flags & FL_INLINE_DATA != 0 {
                    if let (Some(d), Some(s)) = (
                        raw.get_mut(OFF_IBLOCK..OFF_GEN),
                        fc.get(OFF_IBLOCK..OFF_GEN),
                    ) {
                        d.copy_from_slice(s);
                    }
                }
                self.fc.inodes.insert(ino, raw.into());
            }
            TAG_ADD_RANGE | TAG_DEL_RANGE => {
                let ino = le32(v, 0);
                let Some(inode) = self.fc_live(ino) else {
                    return Ok(()); // iget fails: the kernel skips the tag.
                };
                if !self.uses_extents(&inode) {
                    return Err(unsupported(&format!("inode {ino} does not use extents")));
                }
                let map = self.fc_extents(&inode)?;
                if t.tag == TAG_ADD_RANGE {
                    let start = u64::from(le32(v, 4));
                    let raw_len = u64::from(le16(v, 8));
                    let pblk = u64::from(le32(v, 12)) | (u64::from(le16(v, 10)) << 32);
                    let (len, unwritten) = if raw_len > INIT_MAX_LEN {
                        (raw_len - INIT_MAX_LEN, true)
                    } else {
                        (raw_len, false)
                    };
                    let end = start.saturating_add(len).min(LBLK_LIMIT);
                    map.remove(start, end);
                    if !unwritten && end > start {
                        map.0.insert(start, (pblk, end - start));
                    }
                } else {
                    let start = u64::from(le32(v, 4));
                    let end = start.saturating_add(u64::from(le32(v, 8))).min(LBLK_LIMIT);
                    map.remove(start, end);
                }
            }
            TAG_CREAT | TAG_LINK | TAG_UNLINK => {
                let parent = le32(v, 0);
                let ino = le32(v, 4);
                let name = v.get(DENTRY_HDR..).unwrap_or(&[]).to_vec();
                let Some(inode) = self.fc_live(ino) else {
                    if t.tag == TAG_CREAT {
                        // The kernel fails the mount here (ext4_mark_inode_used / iget).
                        return Err(Error::corrupt(
                            format!(
                                "ext4 fast-commit tag CREAT at journal block {}: inode {ino} \
                                 is not in use",
                                t.jblk
                            ),
                            0,
                        ));
                    }
                    return Ok(());
                };
                match t.tag {
                    TAG_LINK => self.fc_link(parent, &name, ino, file_type_of(inode.mode))?,
                    TAG_CREAT => {
                        if inode.file_type() == FileType::Directory {
                            if self.fc_live(parent).is_none() {
                                return Ok(());
                            }
                            // ext4_init_new_dir: a fresh directory holding only . and ..
                            self.fc.dirs.insert(ino, Vec::new());
                        }
                        self.fc_link(parent, &name, ino, file_type_of(inode.mode))?;
                        self.fc_set_links(ino, |_| 1)?;
                    }
                    _ => {
                        match self.fc_live(parent) {
                            Some(d) if d.file_type() == FileType::Directory => {}
                            _ => return Ok(()),
                        }
                        let list = self.fc_dir(parent)?;
                        let Some(pos) = list.iter().position(|e| e.name == name) else {
                            return Ok(()); // -ENOENT
                        };
                        // A name now pointing elsewhere stays; the link count still drops.
                        if list.get(pos).is_some_and(|e| e.ino == ino) {
                            list.remove(pos);
                        }
                        self.fc_set_links(ino, |n| n.saturating_sub(1))?;
                    }
                }
            }
            TAG_HEAD | TAG_TAIL | TAG_PAD => {}
            other => return Err(unsupported(&format!("tag value {other}"))),
        }
        Ok(())
    }

    /// Applies the verified fast-commit tags (`ext4_fc_replay`), in order.
    pub(crate) fn fc_apply(&mut self, tags: &[FcTag]) -> Result<()> {
        for t in tags {
            self.fc_apply_one(t)?;
            self.fc.tags = self.fc.tags.saturating_add(1);
        }
        Ok(())
    }

    /// The replayed extent map of `ino`, when the replay changed its mapping.
    pub(crate) fn fc_map(&self, ino: u32, lblk: u64) -> Option<Mapping> {
        if self.fc.extents.is_empty() {
            return None;
        }
        self.fc.extents.get(&ino).map(|m| m.lookup(lblk))
    }
}

impl Ext4 {
    /// Fuzz reach: `data` read as fast-commit blocks, scanned, then its tags applied without
    /// their crc (which a fuzzer cannot forge), so that the replay meets arbitrary tags over a
    /// real filesystem. Errors are expected; panics and unbounded work are not.
    pub(crate) fn fuzz_fast_commit(&mut self, data: &[u8]) {
        let bs = self.sb.block_size as usize;
        let tid = le32(data, 8);
        let blocks: Vec<&[u8]> = data.chunks(bs.max(1)).take(64).collect();
        let mut read = |off: u64| -> Result<Option<(u64, Vec<u8>)>> {
            let b = usize::try_from(off).ok().and_then(|i| blocks.get(i));
            Ok(b.map(|b| {
                let mut v = b.to_vec();
                v.resize(bs, 0);
                (off, v)
            }))
        };
        let _ = scan(&mut read, tid, self.sb.inode_size);
        let mut tags = Vec::new();
        let mut cur = 0usize;
        while cur + TL_LEN <= data.len() && tags.len() < 4096 {
            let tag = le16(data, cur);
            let len = usize::from(le16(data, cur + 2));
            let at = cur + TL_LEN;
            if len > data.len() - at || !len_valid(tag, len, self.sb.inode_size) {
                break;
            }
            tags.push(FcTag {
                tag,
                jblk: cur as u64,
                val: data.get(at..at + len).unwrap_or(&[]).to_vec(),
            });
            cur = at + len;
        }
        // One at a time: an error stops a real replay, but here the rest should still run.
        for t in &tags {
            let _ = self.fc_apply(std::slice::from_ref(t));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tl(tag: u16, val: &[u8]) -> Vec<u8> {
        let mut v = tag.to_le_bytes().to_vec();
        v.extend_from_slice(&(val.len() as u16).to_le_bytes());
        v.extend_from_slice(val);
        v
    }

    /// One commit in one block: `body` tags then a TAIL padded to the block end.
    fn commit(body: &[u8], tid: u32, crc_in: u32, bs: usize, corrupt: bool) -> (Vec<u8>, u32) {
        let mut b = body.to_vec();
        let tail_len = bs - b.len() - TL_LEN;
        let mut tail = vec![0u8; tail_len];
        tail[..4].copy_from_slice(&tid.to_le_bytes());
        let mut t = tl(TAG_TAIL, &tail);
        let crc = crate::ext4::csum::crc32c(crc_in, &b);
        let crc = crate::ext4::csum::crc32c(crc, &t[..8]);
        t[8..12].copy_from_slice(&(crc ^ u32::from(corrupt)).to_le_bytes());
        b.extend_from_slice(&t);
        (b, crc)
    }

    fn head(tid: u32) -> Vec<u8> {
        let mut v = 0u32.to_le_bytes().to_vec();
        v.extend_from_slice(&tid.to_le_bytes());
        tl(TAG_HEAD, &v)
    }

    fn del(ino: u32) -> Vec<u8> {
        let mut v = ino.to_le_bytes().to_vec();
        v.extend_from_slice(&[0; 8]);
        tl(TAG_DEL_RANGE, &v)
    }

    fn run(blocks: &[Vec<u8>], tid: u32) -> Result<Vec<u16>> {
        let mut read = |off: u64| -> Result<Option<(u64, Vec<u8>)>> {
            Ok(blocks.get(off as usize).map(|b| (off + 100, b.clone())))
        };
        scan(&mut read, tid, 256).map(|t| t.iter().map(|t| t.tag).collect())
    }

    #[test]
    fn scan_keeps_verified_commits_and_stops_at_the_first_bad_one() {
        let bs = 1024;
        let mut first = head(7);
        first.extend(del(12));
        let (b0, _) = commit(&first, 7, 0, bs, false);
        let (b1, _) = commit(&del(13), 7, 0, bs, false);
        let (b2, _) = commit(&del(14), 7, 0, bs, true);
        let (b3, _) = commit(&del(15), 7, 0, bs, false);
        let all = [b0.clone(), b1.clone(), b2.clone(), b3];
        let ok = vec![TAG_HEAD, TAG_DEL_RANGE, TAG_TAIL, TAG_DEL_RANGE, TAG_TAIL];
        assert_eq!(run(&all, 7).expect("scan"), ok);
        // A tail for another transaction ends it the same way.
        let (b1_old, _) = commit(&del(13), 6, 0, bs, false);
        assert_eq!(run(&[b0.clone(), b1_old], 7).expect("scan"), ok[..3]);
        // No head, or a head of another transaction: nothing to replay.
        assert!(run(std::slice::from_ref(&b1), 7).expect("scan").is_empty());
        assert!(run(std::slice::from_ref(&b0), 8).expect("scan").is_empty());
        // The first commit bad: the kernel fails the mount; so do we, naming the block.
        let (bad0, _) = commit(&first, 7, 0, bs, true);
        let e = run(&[bad0, b1.clone()], 7).expect_err("bad first commit");
        assert!(e.to_string().contains("journal block 100"), "{e}");
        // Garbage after the head, before any tail verified: an error too.
        let mut g = head(7);
        g.extend_from_slice(&[0xEE; 40]);
        g.resize(bs, 0);
        assert!(run(&[g], 7).is_err());
    }

    #[test]
    fn ext_map_sets_and_removes_ranges() {
        let mut m = ExtMap::default();
        m.0.insert(0, (1000, 10));
        m.0.insert(20, (2000, 5));
        m.remove(5, 22);
        assert_eq!(
            m.0.iter().collect::<Vec<_>>(),
            [(&0, &(1000, 5)), (&22, &(2002, 3))]
        );
        let h = m.lookup(7);
        assert_eq!((h.phys, h.len), (None, 15));
        let h = m.lookup(23);
        assert_eq!((h.phys, h.len), (Some(2003), 2));
        let h = m.lookup(30);
        assert_eq!((h.phys, h.len), (None, LBLK_LIMIT - 30));
        m.remove(0, LBLK_LIMIT);
        assert!(m.0.is_empty());
    }
}
