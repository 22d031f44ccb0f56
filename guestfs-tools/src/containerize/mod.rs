//! "Containerize" operations: what turns a VM's root filesystem into one that boots cleanly
//! with systemd as PID 1 in a container. Like virt-sysprep's operations, each is named,
//! listed by `fatbox-img ops`, on by default and switchable. They never modify the base
//! tree: they produce a [`ChangeSet`] written as a separate layer (whiteouts for deletions),
//! so what was changed is auditable and the base layer stays cacheable.

mod ops;

use crate::ext4::FileType;
use crate::guest::Guest;
use crate::tarout::{node_meta, EntryMeta, Kind, TarStats, TarWriter};
use crate::{Error, Result};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;

pub use ops::all_ops;

/// One change to the tree, at an absolute canonical guest path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Delete,
    File {
        data: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Symlink {
        target: Vec<u8>,
    },
    Dir {
        mode: u32,
    },
}

/// The changes all operations made, keyed by absolute canonical path.
#[derive(Debug, Default)]
pub struct ChangeSet {
    pub changes: BTreeMap<Vec<u8>, Change>,
    /// One line per operation that ran, for the image history.
    pub history: Vec<(String, String)>,
}

impl ChangeSet {
    pub fn set(&mut self, path: Vec<u8>, change: Change) {
        self.changes.insert(path, change);
    }
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// A containerize operation.
pub trait Op: Send + Sync {
    fn name(&self) -> &'static str;
    fn description(&self) -> &'static str;
    /// Records its changes; returns a one-line summary of what it did.
    fn apply(&self, guest: &Guest, cs: &mut ChangeSet) -> Result<String>;
}

/// Which operations run: all by default, minus `disable`, or exactly `only` when given.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub only: Option<Vec<String>>,
    pub disable: Vec<String>,
}

impl Selection {
    pub fn check(&self) -> Result<()> {
        let names: HashSet<&str> = all_ops().iter().map(|o| o.name()).collect();
        for n in self.disable.iter().chain(self.only.iter().flatten()) {
            if !names.contains(n.as_str()) {
                return Err(Error::Other(format!(
                    "unknown containerize operation {n:?} (see `fatbox-img ops`)"
                )));
            }
        }
        Ok(())
    }
    fn enabled(&self, name: &str) -> bool {
        let listed = match &self.only {
            Some(only) => only.iter().any(|o| o == name),
            None => true,
        };
        listed && !self.disable.iter().any(|d| d == name)
    }
}

/// Runs the selected operations against a guest.
pub fn run(guest: &Guest, sel: &Selection) -> Result<ChangeSet> {
    sel.check()?;
    let mut cs = ChangeSet::default();
    for op in all_ops() {
        if !sel.enabled(op.name()) {
            continue;
        }
        let summary = op
            .apply(guest, &mut cs)
            .map_err(|e| Error::Other(format!("containerize operation {}: {e}", op.name())))?;
        tracing::info!(op = op.name(), "{summary}");
        cs.history.push((op.name().to_string(), summary));
    }
    Ok(cs)
}

fn rel(abs: &[u8]) -> &[u8] {
    abs.strip_prefix(b"/").unwrap_or(abs)
}

/// Writes a change set as an OCI layer tar: parents first (with the base tree's metadata),
/// deletions as `.wh.` whiteouts.
pub fn write_layer<W: Write>(guest: &Guest, cs: &ChangeSet, out: W) -> Result<(W, TarStats)> {
    // A fixed stamp (the guest root's mtime) keeps the layer's digest reproducible.
    let stamp = guest.root()?.inode.mtime.sec;
    let mut tw = TarWriter::new(out);
    let mut emitted: HashSet<Vec<u8>> = HashSet::new();
    for (path, change) in &cs.changes {
        // Ancestors, shallowest first.
        let r = rel(path);
        let mut ancestors = Vec::new();
        for (i, b) in r.iter().enumerate() {
            if *b == b'/' {
                ancestors.push(&r[..i]);
            }
        }
        for a in ancestors {
            if emitted.contains(a) {
                continue;
            }
            emitted.insert(a.to_vec());
            let mut abs = b"/".to_vec();
            abs.extend_from_slice(a);
            match (cs.changes.get(&abs), guest.resolve(&abs, false)?) {
                (Some(Change::Dir { mode }), _) => {
                    tw.header(&EntryMeta::new(a, Kind::Dir, *mode))?;
                }
                (_, Some(n)) if n.inode.file_type() == FileType::Directory => {
                    tw.header(&node_meta(guest, &n, a)?)?;
                }
                _ => tw.header(&EntryMeta::new(a, Kind::Dir, 0o755))?,
            }
        }
        if emitted.contains(r) {
            continue;
        }
        emitted.insert(r.to_vec());
        match change {
            Change::Delete => {
                let split = r.iter().rposition(|b| *b == b'/');
                let (dir, name) = match split {
                    Some(i) => (&r[..=i], &r[i + 1..]),
                    None => (&b""[..], r),
                };
                let mut wh = dir.to_vec();
                wh.extend_from_slice(b".wh.");
                wh.extend_from_slice(name);
                tw.append(&EntryMeta::new(&wh, Kind::File, 0o644), b"")?;
            }
            Change::File {
                data,
                mode,
                uid,
                gid,
            } => {
                let mut m = EntryMeta::new(r, Kind::File, *mode);
                m.uid = *uid;
                m.gid = *gid;
                m.mtime = stamp;
                tw.append(&m, data)?;
            }
            Change::Symlink { target } => {
                let mut m = EntryMeta::new(r, Kind::Symlink, 0o777);
                m.link = Some(target.clone());
                m.mtime = stamp;
                tw.header(&m)?;
            }
            Change::Dir { mode } => {
                let mut m = EntryMeta::new(r, Kind::Dir, *mode);
                m.mtime = stamp;
                tw.header(&m)?;
            }
        }
    }
    tw.finish()
}
