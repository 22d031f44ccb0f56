//! The contract with fatboxd: one JSON record per container in a directory
//! (default `/run/fatbox/procfs.d/<id>.json`), written atomically (temp file + rename).
//!
//! The daemon re-reads the directory when its mtime changes (checked at most every
//! [`RESCAN_INTERVAL`]), so registration needs no IPC and survives daemon restarts.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::cgroup::{is_under, normalize, Hierarchy};
use crate::error::{Error, Result};
use crate::render::{boot_secs, pid_start_boot_secs, Ctx, LoadAvg};

/// Default record directory.
pub const DEFAULT_DIR: &str = "/run/fatbox/procfs.d";
/// How often the directory's mtime is checked.
pub const RESCAN_INTERVAL: Duration = Duration::from_millis(100);
/// How long a tid → container match is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(1);
const CACHE_MAX: usize = 8192;
const RECORD_MAX_BYTES: u64 = 64 * 1024;

/// One registered container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Container id (file name stem; `[A-Za-z0-9._-]`, no leading dot).
    pub id: String,
    /// Cgroup path relative to the cgroup roots as in /proc/PID/cgroup, e.g. `/fatbox/<uuid>`.
    pub cgroup: String,
    /// Host pid of the container's init.
    pub init_pid: u32,
    /// Container start as unix seconds; when absent the init's start time is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<f64>,
}

impl Record {
    /// Check the id and normalise the cgroup path.
    pub fn validate(mut self) -> Result<Self> {
        let ok = !self.id.is_empty()
            && self.id.len() <= 128
            && !self.id.starts_with('.')
            && self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(Error::Record(format!("bad id {:?}", self.id)));
        }
        self.cgroup = normalize(&self.cgroup)?;
        if self.cgroup == "/" {
            return Err(Error::Record("cgroup must not be the root".into()));
        }
        if let Some(s) = self.started_at {
            if !s.is_finite() || s < 0.0 {
                return Err(Error::Record(format!("bad started_at {s}")));
            }
        }
        Ok(self)
    }
}

fn record_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// Register (or replace) a container: writes `<dir>/<id>.json` atomically.
pub fn register(dir: &Path, rec: &Record) -> Result<()> {
    let rec = rec.clone().validate()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tmp = tempfile_in(dir, &rec.id)?;
    let data = serde_json::to_vec(&rec)?;
    tmp.1.write_all(&data).map_err(|e| Error::io(&tmp.0, e))?;
    tmp.1.sync_all().map_err(|e| Error::io(&tmp.0, e))?;
    let dst = record_path(dir, &rec.id);
    std::fs::rename(&tmp.0, &dst).map_err(|e| {
        let _ = std::fs::remove_file(&tmp.0);
        Error::io(&dst, e)
    })
}

fn tempfile_in(dir: &Path, id: &str) -> Result<(PathBuf, std::fs::File)> {
    let p = dir.join(format!(".{id}.{}.tmp", std::process::id()));
    let f = std::fs::File::create(&p).map_err(|e| Error::io(&p, e))?;
    Ok((p, f))
}

/// Remove a container's record; absent records are not an error.
pub fn unregister(dir: &Path, id: &str) -> Result<()> {
    let p = record_path(dir, id);
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(p, e)),
    }
}

/// Read every valid record in `dir`; invalid files are logged and skipped.
pub fn load_dir(dir: &Path) -> Result<Vec<Record>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut out = Vec::new();
    for ent in rd.flatten() {
        let name = ent.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let p = ent.path();
        match read_record(&p) {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!(path = %p.display(), error = %e, "skipping record"),
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

fn read_record(p: &Path) -> Result<Record> {
    let md = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
    if md.len() > RECORD_MAX_BYTES {
        return Err(Error::Record("record too large".into()));
    }
    let data = std::fs::read(p).map_err(|e| Error::io(p, e))?;
    let r: Record = serde_json::from_slice(&data)?;
    r.validate()
}

/// A registered container as the daemon keeps it.
#[derive(Debug)]
pub struct Entry {
    pub record: Record,
    /// Start in CLOCK_BOOTTIME seconds.
    pub started_boot_secs: Option<f64>,
    /// Sampled load (updated by the sampler thread).
    pub load: Mutex<Option<LoadAvg>>,
}

impl Entry {
    fn new(record: Record, old: Option<&Entry>, loadavg: bool) -> Self {
        let started_boot_secs = match record.started_at {
            Some(unix) => {
                let now_unix = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                Some(boot_secs() - (now_unix - unix))
            }
            None => pid_start_boot_secs(record.init_pid).ok(),
        };
        let load = old
            .filter(|o| o.record.cgroup == record.cgroup)
            .and_then(|o| o.load.lock().ok().and_then(|l| *l))
            // Until the first sample a new container shows zero load, not the host's.
            .or_else(|| loadavg.then(LoadAvg::default));
        Entry {
            record,
            started_boot_secs,
            load: Mutex::new(load),
        }
    }

    /// Rendering context for this container.
    pub fn ctx(&self) -> Ctx {
        Ctx {
            cgroup: self.record.cgroup.clone(),
            started_boot_secs: self.started_boot_secs,
            loadavg: self.load.lock().ok().and_then(|l| *l),
        }
    }
}

struct Snapshot {
    entries: Vec<Arc<Entry>>,
    mtime: Option<SystemTime>,
    checked: Instant,
    generation: u64,
}

type CacheVal = (Instant, u64, Option<Arc<Entry>>);

/// Live view of the record directory with caller matching.
pub struct Registry {
    dir: PathBuf,
    hier: Hierarchy,
    snap: RwLock<Snapshot>,
    cache: Mutex<HashMap<u32, CacheVal>>,
    loadavg: bool,
}

impl Registry {
    /// `loadavg`: whether a sampler runs (otherwise the host loadavg is served).
    pub fn new(dir: impl Into<PathBuf>, hier: Hierarchy, loadavg: bool) -> Self {
        let r = Registry {
            dir: dir.into(),
            hier,
            snap: RwLock::new(Snapshot {
                entries: Vec::new(),
                mtime: None,
                checked: Instant::now(),
                generation: 0,
            }),
            cache: Mutex::new(HashMap::new()),
            loadavg,
        };
        r.rescan(true);
        r
    }

    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hier
    }

    /// All current entries.
    pub fn entries(&self) -> Vec<Arc<Entry>> {
        self.rescan(false);
        self.snap
            .read()
            .map(|s| s.entries.clone())
            .unwrap_or_default()
    }

    /// Re-read the directory when it changed (or always when `force`).
    pub fn rescan(&self, force: bool) {
        let due = self
            .snap
            .read()
            .map(|s| force || s.checked.elapsed() >= RESCAN_INTERVAL)
            .unwrap_or(true);
        if !due {
            return;
        }
        let mtime = std::fs::metadata(&self.dir).and_then(|m| m.modified()).ok();
        let Ok(mut s) = self.snap.write() else { return };
        s.checked = Instant::now();
        if !force && mtime == s.mtime {
            return;
        }
        let records = match load_dir(&self.dir) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read registry");
                return;
            }
        };
        let old: HashMap<String, Arc<Entry>> = s
            .entries
            .iter()
            .map(|e| (e.record.id.clone(), e.clone()))
            .collect();
        s.entries = records
            .into_iter()
            .map(|r| match old.get(&r.id) {
                Some(o) if o.record == r => o.clone(),
                o => Arc::new(Entry::new(r, o.map(|a| a.as_ref()), self.loadavg)),
            })
            .collect();
        s.mtime = mtime;
        s.generation = s.generation.wrapping_add(1);
        tracing::debug!(n = s.entries.len(), "registry reloaded");
    }

    /// The container a thread belongs to, None for the host and unregistered cgroups.
    pub fn lookup(&self, tid: u32) -> Option<Arc<Entry>> {
        self.rescan(false);
        let gen = self.snap.read().map(|s| s.generation).unwrap_or(0);
        if let Ok(c) = self.cache.lock() {
            if let Some((t, g, e)) = c.get(&tid) {
                if *g == gen && t.elapsed() < CACHE_TTL {
                    return e.clone();
                }
            }
        }
        let found = self.lookup_uncached(tid);
        if let Ok(mut c) = self.cache.lock() {
            if c.len() >= CACHE_MAX {
                c.clear();
            }
            c.insert(tid, (Instant::now(), gen, found.clone()));
        }
        found
    }

    fn lookup_uncached(&self, tid: u32) -> Option<Arc<Entry>> {
        // A vanished tid reads as "host": it cannot read the answer anyway.
        let text = std::fs::read_to_string(format!("/proc/{tid}/cgroup")).ok()?;
        let (mem, unified) = caller_paths(&text);
        let snap = self.snap.read().ok()?;
        let backend = self.hier.backend();
        let mut best: Option<&Arc<Entry>> = None;
        for e in &snap.entries {
            let cg = &e.record.cgroup;
            let caller = match (&self.hier, &mem) {
                (Hierarchy::V1(_), Some(m)) if backend.exists(cg) => Some(m),
                _ => unified.as_ref(),
            };
            let Some(caller) = caller else { continue };
            if is_under(caller, cg) && best.is_none_or(|b| b.record.cgroup.len() < cg.len()) {
                best = Some(e);
            }
        }
        best.cloned()
    }
}

/// The memory-controller path and the unified path of a /proc/PID/cgroup text.
pub fn caller_paths(text: &str) -> (Option<String>, Option<String>) {
    let mut mem = None;
    let mut unified = None;
    for line in text.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if ctrls.is_empty() {
            unified = normalize(path).ok();
        } else if ctrls.split(',').any(|c| c == "memory") {
            mem = normalize(path).ok();
        }
    }
    (mem, unified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_roundtrip() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let r = Record {
            id: "c1".into(),
            cgroup: "/fatbox//x/".into(),
            init_pid: 1,
            started_at: None,
        };
        register(d.path(), &r)?;
        let all = load_dir(d.path())?;
        assert_eq!(all.len(), 1);
        assert_eq!(all.first().map(|r| r.cgroup.as_str()), Some("/fatbox/x"));
        unregister(d.path(), "c1")?;
        unregister(d.path(), "c1")?;
        assert!(load_dir(d.path())?.is_empty());
        let bad = Record {
            id: "../x".into(),
            ..r.clone()
        };
        assert!(register(d.path(), &bad).is_err());
        std::fs::write(d.path().join("junk.json"), b"{not json")
            .map_err(|e| Error::io("junk", e))?;
        assert!(load_dir(d.path())?.is_empty());
        Ok(())
    }

    #[test]
    fn caller_path_parsing() {
        let t = "4:memory:/a/b\n3:cpuset:/\n0::/u\n";
        assert_eq!(
            caller_paths(t),
            (Some("/a/b".to_string()), Some("/u".to_string()))
        );
        assert_eq!(caller_paths("garbage"), (None, None));
    }
}
