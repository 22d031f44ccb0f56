//! Reading container limits and usage from cgroups: one trait, a v1/hybrid and a v2 backend.
//!
//! Every path handed to a backend is relative to the cgroup roots, exactly as it appears in
//! `/proc/PID/cgroup` (leading `/`). Paths are validated by [`normalize`] so that a record
//! cannot escape the cgroup mount with `..`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{read_string, Error, Result};

/// The kernel's "no limit" values are huge; anything at or above this is treated as unlimited.
const UNLIMITED_THRESHOLD: u64 = 1 << 60;

/// Memory figures of a cgroup in bytes (from `memory.stat`, hierarchical totals).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemStat {
    pub cache: u64,
    pub rss: u64,
    pub shmem: u64,
    pub mapped_file: u64,
    pub dirty: u64,
    pub writeback: u64,
    pub active_anon: u64,
    pub inactive_anon: u64,
    pub active_file: u64,
    pub inactive_file: u64,
    pub unevictable: u64,
    pub slab_reclaimable: u64,
    pub slab_unreclaimable: u64,
}

/// Per block device I/O counters of a cgroup.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoStat {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub reads: u64,
    pub writes: u64,
}

/// CPU time of a cgroup on one host CPU, in nanoseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CpuUsage {
    pub user_ns: u64,
    pub system_ns: u64,
}

/// What the renderers need from a cgroup, whatever the hierarchy looks like.
pub trait Cgroups: Send + Sync {
    /// Whether the cgroup exists (in the memory hierarchy for v1).
    fn exists(&self, cg: &str) -> bool;
    /// Lowest memory limit of `cg` and its ancestors, None when unlimited.
    fn mem_limit(&self, cg: &str) -> Result<Option<u64>>;
    /// Current memory usage (including page cache, as the kernel charges it).
    fn mem_usage(&self, cg: &str) -> Result<u64>;
    /// Lowest swap-only limit of `cg` and its ancestors, None when unlimited or unknown.
    /// `mem_limit` is [`Cgroups::mem_limit`] of the same cgroup (v1 derives swap from it).
    fn swap_limit(&self, cg: &str, mem_limit: Option<u64>) -> Result<Option<u64>>;
    /// Current swap usage; `mem_usage` is [`Cgroups::mem_usage`] of the same cgroup.
    fn swap_usage(&self, cg: &str, mem_usage: u64) -> Result<u64>;
    fn mem_stat(&self, cg: &str) -> Result<MemStat>;
    /// Effective cpuset (host CPU numbers, sorted).
    fn cpus(&self, cg: &str) -> Result<Vec<u32>>;
    /// CFS quota of `cg` itself as (quota, period) in µs, None when unlimited.
    fn cpu_quota(&self, cg: &str) -> Result<Option<(u64, u64)>>;
    /// CPU time per host CPU; backends without per-CPU data return one entry per CPU in
    /// `cpus` with the total spread evenly.
    fn cpu_usage(&self, cg: &str, cpus: &[u32]) -> Result<BTreeMap<u32, CpuUsage>>;
    /// I/O counters keyed by (major, minor).
    fn io_stat(&self, cg: &str) -> Result<BTreeMap<(u32, u32), IoStat>>;
    /// Thread ids in the cgroup and all its descendants (for loadavg sampling).
    fn threads(&self, cg: &str) -> Result<Vec<u32>>;
}

/// Check and canonicalise a cgroup path: absolute, no `.`/`..` components, no NUL.
pub fn normalize(cg: &str) -> Result<String> {
    if !cg.starts_with('/') || cg.contains('\0') {
        return Err(Error::Record(format!(
            "cgroup path {cg:?} must be absolute"
        )));
    }
    let mut out = String::new();
    for comp in cg.split('/').filter(|c| !c.is_empty()) {
        if comp == "." || comp == ".." {
            return Err(Error::Record(format!("cgroup path {cg:?} has {comp:?}")));
        }
        out.push('/');
        out.push_str(comp);
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// `cg` and its ancestors, leaf first, ending with "/".
fn ancestors(cg: &str) -> Vec<String> {
    let mut v = Vec::new();
    let mut cur = cg.trim_end_matches('/').to_string();
    while !cur.is_empty() {
        v.push(cur.clone());
        match cur.rfind('/') {
            Some(i) => cur.truncate(i),
            None => break,
        }
    }
    v.push("/".to_string());
    v
}

fn join(root: &Path, cg: &str) -> PathBuf {
    root.join(cg.trim_start_matches('/'))
}

fn read_u64(path: &Path) -> Result<u64> {
    let s = read_string(path)?;
    let t = s.trim();
    if t == "max" {
        return Ok(u64::MAX);
    }
    t.parse::<u64>()
        .map_err(|_| Error::parse(path, format!("not a number: {t:?}")))
}

fn limit_of(v: u64) -> Option<u64> {
    (v < UNLIMITED_THRESHOLD).then_some(v)
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Parse "key value" lines.
fn kv(path: &Path) -> Result<BTreeMap<String, u64>> {
    let s = read_string(path)?;
    let mut m = BTreeMap::new();
    for line in s.lines() {
        let mut it = line.split_whitespace();
        if let (Some(k), Some(v)) = (it.next(), it.next()) {
            if let Ok(v) = v.parse::<u64>() {
                m.insert(k.to_string(), v);
            }
        }
    }
    Ok(m)
}

/// Parse a cpu list like "0-3,8,10-11". Caps the size so a hostile string cannot make us
/// allocate without bound.
pub fn parse_cpulist(s: &str) -> Option<Vec<u32>> {
    const MAX_CPUS: u32 = 1 << 16;
    let mut v = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?),
            None => {
                let a = part.trim().parse::<u32>().ok()?;
                (a, a)
            }
        };
        if a > b || b >= MAX_CPUS {
            return None;
        }
        v.extend(a..=b);
    }
    v.sort_unstable();
    v.dedup();
    Some(v)
}

/// Format a sorted cpu list as ranges ("0-2,5").
pub fn format_cpulist(cpus: &[u32]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&start) = cpus.get(i) {
        let mut end = start;
        while let Some(&next) = cpus.get(i + 1) {
            if Some(next) == end.checked_add(1) {
                end = next;
                i += 1;
            } else {
                break;
            }
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

fn threads_under(dir: &Path, file: &str, out: &mut Vec<u32>, depth: u32) -> Result<()> {
    // Bounded depth: a container can create deep trees, we only need an estimate.
    if depth > 32 {
        return Ok(());
    }
    let p = dir.join(file);
    match std::fs::read_to_string(&p) {
        Ok(s) => out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(p, e)),
    }
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(_) => return Ok(()),
    };
    for ent in rd.flatten() {
        if ent.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            threads_under(&ent.path(), file, out, depth.saturating_add(1))?;
        }
    }
    Ok(())
}

fn host_cpus() -> Result<Vec<u32>> {
    let p = Path::new("/sys/devices/system/cpu/online");
    parse_cpulist(&read_string(p)?).ok_or_else(|| Error::parse(p, "bad cpu list"))
}

/// cgroup v1 controllers (also the hybrid layout: v1 controllers plus an empty unified tree).
#[derive(Debug, Clone)]
pub struct V1 {
    pub root: PathBuf,
}

impl V1 {
    fn ctrl(&self, ctrl: &str, cg: &str) -> PathBuf {
        join(&self.root.join(ctrl), cg)
    }
}

impl Cgroups for V1 {
    fn exists(&self, cg: &str) -> bool {
        self.ctrl("memory", cg).is_dir()
    }

    fn mem_limit(&self, cg: &str) -> Result<Option<u64>> {
        let mut lim = None;
        let mut found = false;
        for a in ancestors(cg) {
            match read_u64(&self.ctrl("memory", &a).join("memory.limit_in_bytes")) {
                Ok(v) => {
                    found = true;
                    lim = min_opt(lim, limit_of(v));
                }
                // The leaf must exist; ancestors missing (racing delete) are skipped.
                Err(e) if !found => return Err(e),
                Err(_) => {}
            }
        }
        Ok(lim)
    }

    fn mem_usage(&self, cg: &str) -> Result<u64> {
        read_u64(&self.ctrl("memory", cg).join("memory.usage_in_bytes"))
    }

    fn swap_limit(&self, cg: &str, mem: Option<u64>) -> Result<Option<u64>> {
        // v1 limits memory+swap together; the swap share is what memsw allows above memory.
        let mut memsw = None;
        for a in ancestors(cg) {
            if let Ok(v) = read_u64(&self.ctrl("memory", &a).join("memory.memsw.limit_in_bytes")) {
                memsw = min_opt(memsw, limit_of(v));
            }
        }
        Ok(match (memsw, mem) {
            (Some(sw), Some(m)) => Some(sw.saturating_sub(m)),
            (Some(sw), None) => Some(sw),
            (None, _) => None,
        })
    }

    fn swap_usage(&self, cg: &str, mem_usage: u64) -> Result<u64> {
        let d = self.ctrl("memory", cg);
        let memsw = match read_u64(&d.join("memory.memsw.usage_in_bytes")) {
            Ok(v) => v,
            Err(_) => return Ok(0),
        };
        Ok(memsw.saturating_sub(mem_usage))
    }

    fn mem_stat(&self, cg: &str) -> Result<MemStat> {
        let m = kv(&self.ctrl("memory", cg).join("memory.stat"))?;
        let g = |k: &str| m.get(k).copied().unwrap_or(0);
        Ok(MemStat {
            cache: g("total_cache"),
            rss: g("total_rss"),
            shmem: g("total_shmem"),
            mapped_file: g("total_mapped_file"),
            dirty: g("total_dirty"),
            writeback: g("total_writeback"),
            active_anon: g("total_active_anon"),
            inactive_anon: g("total_inactive_anon"),
            active_file: g("total_active_file"),
            inactive_file: g("total_inactive_file"),
            unevictable: g("total_unevictable"),
            slab_reclaimable: 0,
            slab_unreclaimable: 0,
        })
    }

    fn cpus(&self, cg: &str) -> Result<Vec<u32>> {
        let d = self.ctrl("cpuset", cg);
        let p = if d.join("cpuset.effective_cpus").exists() {
            d.join("cpuset.effective_cpus")
        } else {
            d.join("cpuset.cpus")
        };
        match read_string(&p) {
            Ok(s) => parse_cpulist(&s).ok_or_else(|| Error::parse(&p, "bad cpu list")),
            // No cpuset controller or cgroup gone from it: all host CPUs.
            Err(e) if e.is_not_found() => host_cpus(),
            Err(e) => Err(e),
        }
    }

    fn cpu_quota(&self, cg: &str) -> Result<Option<(u64, u64)>> {
        let d = self.ctrl("cpu", cg);
        let q = match std::fs::read_to_string(d.join("cpu.cfs_quota_us")) {
            Ok(s) => s.trim().parse::<i64>().unwrap_or(-1),
            Err(_) => return Ok(None),
        };
        let period = read_u64(&d.join("cpu.cfs_period_us")).unwrap_or(100_000);
        Ok(match u64::try_from(q) {
            Ok(q) if q > 0 && period > 0 => Some((q, period)),
            _ => None,
        })
    }

    fn cpu_usage(&self, cg: &str, cpus: &[u32]) -> Result<BTreeMap<u32, CpuUsage>> {
        let p = self.ctrl("cpuacct", cg).join("cpuacct.usage_all");
        let mut m = BTreeMap::new();
        let s = match read_string(&p) {
            Ok(s) => s,
            // Not in the cpuacct hierarchy: no usage to show, every CPU idle.
            Err(e) if e.is_not_found() => String::new(),
            Err(e) => return Err(e),
        };
        for line in s.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let [c, u, sy] = f.as_slice() {
                if let (Ok(c), Ok(u), Ok(sy)) = (c.parse(), u.parse(), sy.parse()) {
                    m.insert(
                        c,
                        CpuUsage {
                            user_ns: u,
                            system_ns: sy,
                        },
                    );
                }
            }
        }
        for c in cpus {
            m.entry(*c).or_default();
        }
        Ok(m)
    }

    fn io_stat(&self, cg: &str) -> Result<BTreeMap<(u32, u32), IoStat>> {
        let d = self.ctrl("blkio", cg);
        let mut m: BTreeMap<(u32, u32), IoStat> = BTreeMap::new();
        // The throttle files are kept by every scheduler; the cfq/bfq ones are not.
        for (file, bytes) in [
            ("blkio.throttle.io_service_bytes_recursive", true),
            ("blkio.throttle.io_serviced_recursive", false),
        ] {
            let s = match std::fs::read_to_string(d.join(file)) {
                Ok(s) => s,
                Err(_) => continue,
            };
            for line in s.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                let [dev, op, v] = f.as_slice() else { continue };
                let Some((ma, mi)) = dev.split_once(':') else {
                    continue;
                };
                let (Ok(ma), Ok(mi), Ok(v)) = (ma.parse(), mi.parse(), v.parse::<u64>()) else {
                    continue;
                };
                let e = m.entry((ma, mi)).or_default();
                match (*op, bytes) {
                    ("Read", true) => e.read_bytes = v,
                    ("Write", true) => e.write_bytes = v,
                    ("Read", false) => e.reads = v,
                    ("Write", false) => e.writes = v,
                    _ => {}
                }
            }
        }
        Ok(m)
    }

    fn threads(&self, cg: &str) -> Result<Vec<u32>> {
        let mut v = Vec::new();
        threads_under(&self.ctrl("memory", cg), "tasks", &mut v, 0)?;
        Ok(v)
    }
}

/// cgroup v2 (unified) hierarchy.
#[derive(Debug, Clone)]
pub struct V2 {
    pub root: PathBuf,
}

impl V2 {
    fn min_over(&self, cg: &str, file: &str) -> Result<Option<u64>> {
        let mut lim = None;
        let mut found = false;
        for a in ancestors(cg) {
            match read_u64(&join(&self.root, &a).join(file)) {
                Ok(v) => {
                    found = true;
                    lim = min_opt(lim, limit_of(v));
                }
                Err(e) if !found && a != "/" => return Err(e),
                Err(_) => {}
            }
        }
        Ok(lim)
    }
}

impl Cgroups for V2 {
    fn exists(&self, cg: &str) -> bool {
        join(&self.root, cg).is_dir()
    }
    fn mem_limit(&self, cg: &str) -> Result<Option<u64>> {
        self.min_over(cg, "memory.max")
    }
    fn mem_usage(&self, cg: &str) -> Result<u64> {
        read_u64(&join(&self.root, cg).join("memory.current"))
    }
    fn swap_limit(&self, cg: &str, _mem_limit: Option<u64>) -> Result<Option<u64>> {
        self.min_over(cg, "memory.swap.max")
    }
    fn swap_usage(&self, cg: &str, _mem_usage: u64) -> Result<u64> {
        Ok(read_u64(&join(&self.root, cg).join("memory.swap.current")).unwrap_or(0))
    }
    fn mem_stat(&self, cg: &str) -> Result<MemStat> {
        let m = kv(&join(&self.root, cg).join("memory.stat"))?;
        let g = |k: &str| m.get(k).copied().unwrap_or(0);
        Ok(MemStat {
            cache: g("file"),
            rss: g("anon"),
            shmem: g("shmem"),
            mapped_file: g("file_mapped"),
            dirty: g("file_dirty"),
            writeback: g("file_writeback"),
            active_anon: g("active_anon"),
            inactive_anon: g("inactive_anon"),
            active_file: g("active_file"),
            inactive_file: g("inactive_file"),
            unevictable: g("unevictable"),
            slab_reclaimable: g("slab_reclaimable"),
            slab_unreclaimable: g("slab_unreclaimable"),
        })
    }
    fn cpus(&self, cg: &str) -> Result<Vec<u32>> {
        let p = join(&self.root, cg).join("cpuset.cpus.effective");
        match read_string(&p) {
            Ok(s) => parse_cpulist(&s).ok_or_else(|| Error::parse(&p, "bad cpu list")),
            Err(e) if e.is_not_found() => host_cpus(),
            Err(e) => Err(e),
        }
    }
    fn cpu_quota(&self, cg: &str) -> Result<Option<(u64, u64)>> {
        let s = match std::fs::read_to_string(join(&self.root, cg).join("cpu.max")) {
            Ok(s) => s,
            Err(_) => return Ok(None),
        };
        let mut it = s.split_whitespace();
        let q = it.next().and_then(|q| q.parse::<u64>().ok());
        let p = it
            .next()
            .and_then(|p| p.parse::<u64>().ok())
            .unwrap_or(100_000);
        Ok(match q {
            Some(q) if q > 0 && p > 0 => Some((q, p)),
            _ => None,
        })
    }
    fn cpu_usage(&self, cg: &str, cpus: &[u32]) -> Result<BTreeMap<u32, CpuUsage>> {
        // v2 has no per-CPU accounting: spread the totals evenly over the visible CPUs.
        let m = kv(&join(&self.root, cg).join("cpu.stat"))?;
        let n = u64::try_from(cpus.len().max(1)).unwrap_or(1);
        let u = m
            .get("user_usec")
            .copied()
            .unwrap_or(0)
            .saturating_mul(1000)
            / n;
        let s = m
            .get("system_usec")
            .copied()
            .unwrap_or(0)
            .saturating_mul(1000)
            / n;
        Ok(cpus
            .iter()
            .map(|c| {
                (
                    *c,
                    CpuUsage {
                        user_ns: u,
                        system_ns: s,
                    },
                )
            })
            .collect())
    }
    fn io_stat(&self, cg: &str) -> Result<BTreeMap<(u32, u32), IoStat>> {
        let p = join(&self.root, cg).join("io.stat");
        let s = match std::fs::read_to_string(&p) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(Error::io(p, e)),
        };
        let mut m = BTreeMap::new();
        for line in s.lines() {
            let mut it = line.split_whitespace();
            let Some((ma, mi)) = it.next().and_then(|d| d.split_once(':')) else {
                continue;
            };
            let (Ok(ma), Ok(mi)) = (ma.parse(), mi.parse()) else {
                continue;
            };
            let mut st = IoStat::default();
            for f in it {
                let Some((k, v)) = f.split_once('=') else {
                    continue;
                };
                let v = v.parse::<u64>().unwrap_or(0);
                match k {
                    "rbytes" => st.read_bytes = v,
                    "wbytes" => st.write_bytes = v,
                    "rios" => st.reads = v,
                    "wios" => st.writes = v,
                    _ => {}
                }
            }
            m.insert((ma, mi), st);
        }
        Ok(m)
    }
    fn threads(&self, cg: &str) -> Result<Vec<u32>> {
        let mut v = Vec::new();
        threads_under(&join(&self.root, cg), "cgroup.threads", &mut v, 0)?;
        Ok(v)
    }
}

/// Which hierarchy the host runs, with the paths needed to match a caller.
#[derive(Debug, Clone)]
pub enum Hierarchy {
    /// v1 or hybrid: controllers under `root/<ctrl>`.
    V1(V1),
    /// Pure v2 at `root`.
    V2(V2),
}

impl Hierarchy {
    /// Detect the layout under /sys/fs/cgroup.
    pub fn detect() -> Self {
        Self::detect_at(Path::new("/sys/fs/cgroup"))
    }

    pub fn detect_at(root: &Path) -> Self {
        if root.join("cgroup.controllers").exists() {
            Hierarchy::V2(V2 {
                root: root.to_path_buf(),
            })
        } else {
            Hierarchy::V1(V1 {
                root: root.to_path_buf(),
            })
        }
    }

    pub fn backend(&self) -> &dyn Cgroups {
        match self {
            Hierarchy::V1(v) => v,
            Hierarchy::V2(v) => v,
        }
    }
}

/// Whether `cg` is `prefix` or below it, component-wise.
pub fn is_under(cg: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match cg.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulist_roundtrip() {
        assert_eq!(
            parse_cpulist("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(format_cpulist(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(parse_cpulist("3-1"), None);
        assert_eq!(parse_cpulist("0-999999999"), None);
        assert_eq!(parse_cpulist(""), Some(vec![]));
    }

    #[test]
    fn paths() {
        assert_eq!(normalize("/a//b/").ok().as_deref(), Some("/a/b"));
        assert!(normalize("/a/../b").is_err());
        assert!(normalize("a").is_err());
        assert!(is_under("/a/b/c", "/a/b"));
        assert!(!is_under("/a/bc", "/a/b"));
        assert!(is_under("/a", "/"));
        assert_eq!(ancestors("/a/b"), vec!["/a/b", "/a", "/"]);
        assert_eq!(ancestors("/"), vec!["/"]);
    }
}
