//! Per-instance cgroups: `<parent>/<uuid>` under each v1 controller in use and under the
//! unified hierarchy (which systemd inside gets as its delegated, writable tree).

use crate::error::{io, Error, Result};
use crate::model::Flavor;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";
const V1_CONTROLLERS: [&str; 5] = ["cpu", "memory", "pids", "freezer", "cpuset"];
const CFS_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone)]
pub struct Cgroups {
    /// Directories the init process joins.
    pub dirs: Vec<PathBuf>,
    /// The cgroup2 directory (unified on a hybrid host, the root on a pure v2 host).
    pub unified: PathBuf,
    pub v1: bool,
}

fn is_cgroup2(p: &Path) -> bool {
    nix::sys::statfs::statfs(p)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

impl Cgroups {
    pub fn for_instance(parent: &str, uuid: &str) -> Cgroups {
        let root = Path::new(ROOT);
        if is_cgroup2(root) {
            let unified = root.join(parent).join(uuid);
            return Cgroups {
                dirs: vec![unified.clone()],
                unified,
                v1: false,
            };
        }
        let mut dirs = Vec::new();
        for c in V1_CONTROLLERS {
            if root.join(c).join("cgroup.procs").exists() {
                dirs.push(root.join(c).join(parent).join(uuid));
            }
        }
        let unified = root.join("unified").join(parent).join(uuid);
        dirs.push(unified.clone());
        Cgroups {
            dirs,
            unified,
            v1: true,
        }
    }

    fn v1(&self, controller: &str) -> Option<&PathBuf> {
        let prefix = Path::new(ROOT).join(controller);
        self.dirs.iter().find(|d| self.v1 && d.starts_with(&prefix))
    }

    /// Creates the cgroups and applies the flavor's limits.
    pub fn create(&self, flavor: &Flavor) -> Result<()> {
        for d in &self.dirs {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        if !self.v1 {
            enable_v2_controllers(&self.unified);
        }
        self.apply(flavor)
    }

    pub fn apply(&self, flavor: &Flavor) -> Result<()> {
        let quota = u64::from(flavor.vcpus)
            .checked_mul(CFS_PERIOD_US)
            .ok_or_else(|| Error::Invalid("cpu quota overflows".into()))?;
        let mem = flavor.memory_bytes()?;
        let swap = flavor
            .swap_mb
            .checked_mul(1 << 20)
            .and_then(|s| s.checked_add(mem))
            .ok_or_else(|| Error::Invalid("swap overflows".into()))?;
        let shares = u64::from(flavor.vcpus).saturating_mul(1024);
        if self.v1 {
            if let Some(cpu) = self.v1("cpu") {
                write(cpu, "cpu.cfs_period_us", &CFS_PERIOD_US.to_string())?;
                write(cpu, "cpu.cfs_quota_us", &quota.to_string())?;
                write(cpu, "cpu.shares", &shares.to_string())?;
            }
            if let Some(m) = self.v1("memory") {
                // memsw must stay >= mem: order the writes by direction of change.
                let memsw = m.join("memory.memsw.limit_in_bytes").exists();
                if memsw {
                    let _ = write(m, "memory.memsw.limit_in_bytes", &swap.to_string());
                }
                write(m, "memory.limit_in_bytes", &mem.to_string())?;
                if memsw {
                    write(m, "memory.memsw.limit_in_bytes", &swap.to_string())?;
                }
            }
            if let Some(p) = self.v1("pids") {
                write(p, "pids.max", &pids_max(flavor).to_string())?;
            }
            if let Some(c) = self.v1("cpuset") {
                // A new v1 cpuset is empty: inherit the parent's or nothing can run in it.
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    inherit_cpuset(c, f)?;
                }
                self.set_cpus(c, "cpuset.cpus", flavor.vcpus)?;
            }
        } else {
            let u = &self.unified;
            write(u, "cpu.max", &format!("{quota} {CFS_PERIOD_US}"))?;
            write(
                u,
                "cpu.weight",
                &(100u64.saturating_mul(u64::from(flavor.vcpus)))
                    .min(10000)
                    .to_string(),
            )?;
            write(u, "memory.max", &mem.to_string())?;
            write(
                u,
                "memory.swap.max",
                &(flavor.swap_mb.saturating_mul(1 << 20)).to_string(),
            )?;
            write(u, "pids.max", &pids_max(flavor).to_string())?;
            if u.join("cpuset.cpus").exists() {
                self.set_cpus(u, "cpuset.cpus", flavor.vcpus)?;
            }
        }
        Ok(())
    }

    /// Gives the instance `vcpus` host CPUs, the ones least used by its sibling instances, so
    /// that `nproc` (the CPU affinity) inside says vcpus, as fatbox-procfs' cpuinfo and
    /// cpu/online do. More vcpus than the parent has: all of them. A live change moves the
    /// tasks' affinity with it (the kernel rewrites it when cpuset.cpus changes).
    fn set_cpus(&self, dir: &Path, file: &str, vcpus: u32) -> Result<()> {
        let Some(parent) = dir.parent() else {
            return Ok(());
        };
        let avail = read_cpus(parent, file)
            .or_else(|| read_cpus(parent, "cpuset.cpus.effective"))
            .unwrap_or_default();
        if avail.is_empty() {
            return Ok(());
        }
        let want = usize::try_from(vcpus).unwrap_or(usize::MAX);
        let cpus = if want >= avail.len() {
            avail
        } else {
            let mine = dir.file_name();
            let mut load: Vec<(u32, u32)> = avail.iter().map(|&c| (c, 0)).collect();
            for e in std::fs::read_dir(parent).into_iter().flatten().flatten() {
                if Some(e.file_name().as_os_str()) == mine
                    || !e.file_type().map(|t| t.is_dir()).unwrap_or(false)
                {
                    continue;
                }
                for c in read_cpus(&e.path(), file).unwrap_or_default() {
                    if let Some(l) = load.iter_mut().find(|(x, _)| *x == c) {
                        l.1 = l.1.saturating_add(1);
                    }
                }
            }
            // Keep the CPUs the instance has (a resize must not shuffle it around), then the
            // least loaded; among equals CPU order (stable sort).
            let cur = read_cpus(dir, file).unwrap_or_default();
            load.sort_by_key(|&(c, n)| (!cur.contains(&c), n));
            let mut pick: Vec<u32> = load.iter().take(want).map(|&(c, _)| c).collect();
            pick.sort_unstable();
            pick
        };
        write(dir, file, &format_cpus(&cpus))
    }

    /// The host CPUs of the instance's cpuset (None without a cpuset controller).
    pub fn cpus(&self) -> Option<Vec<u32>> {
        if let Some(c) = self.v1("cpuset") {
            return read_cpus(c, "cpuset.effective_cpus").or_else(|| read_cpus(c, "cpuset.cpus"));
        }
        read_cpus(&self.unified, "cpuset.cpus.effective")
    }

    /// Freezes or thaws every process of the instance.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        if let Some(f) = self.v1("freezer") {
            write(f, "freezer.state", if frozen { "FROZEN" } else { "THAWED" })
        } else {
            write(
                &self.unified,
                "cgroup.freeze",
                if frozen { "1" } else { "0" },
            )
        }
    }

    /// Pids in the instance, from every hierarchy (deduplicated).
    pub fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for d in &self.dirs {
            collect_pids(d, &mut out, 0);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// SIGKILLs everything left in the instance's cgroups.
    pub fn kill_all(&self) {
        let kill = self.unified.join("cgroup.kill");
        if kill.exists() {
            let _ = std::fs::write(&kill, "1");
        }
        // Frozen tasks do not die until thawed.
        let _ = self.freeze(false);
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Removes the cgroup trees (children first); the processes must be gone.
    pub fn remove(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for d in &self.dirs {
            loop {
                match remove_tree(d) {
                    Ok(()) => break,
                    Err(e) if std::time::Instant::now() < deadline => {
                        tracing::debug!(dir = %d.display(), error = %e, "cgroup busy, retrying");
                        self.kill_all();
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|d| d.exists())
    }
}

/// On a pure cgroup2 host a child only gets the controllers its ancestors delegate: turn
/// them on from the root down (each one alone, so a missing controller does not stop the
/// others).
fn enable_v2_controllers(dir: &Path) {
    let root = Path::new(ROOT);
    let mut chain: Vec<&Path> = dir
        .ancestors()
        .skip(1)
        .take_while(|a| a.starts_with(root))
        .collect();
    chain.reverse();
    for a in chain {
        for c in ["cpu", "memory", "pids", "cpuset"] {
            let _ = std::fs::write(a.join("cgroup.subtree_control"), format!("+{c}"));
        }
    }
}

/// Parses a cpu list ("0-3,6"); None when the file is missing or empty.
fn read_cpus(dir: &Path, file: &str) -> Option<Vec<u32>> {
    let s = std::fs::read_to_string(dir.join(file)).ok()?;
    let v = parse_cpus(s.trim())?;
    (!v.is_empty()).then_some(v)
}

pub fn parse_cpus(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 65536 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

pub fn format_cpus(cpus: &[u32]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while let Some(&start) = cpus.get(i) {
        let mut end = start;
        while cpus.get(i + 1) == Some(&(end + 1)) {
            end += 1;
            i += 1;
        }
        parts.push(if end == start {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

fn pids_max(flavor: &Flavor) -> u64 {
    // Scales with memory as a VM's would, with a floor that lets systemd boot.
    (flavor.memory_mb.saturating_mul(8)).clamp(1024, 4_194_304)
}

fn write(dir: &Path, file: &str, value: &str) -> Result<()> {
    let p = dir.join(file);
    std::fs::write(&p, value).map_err(io(p))
}

fn inherit_cpuset(dir: &Path, file: &str) -> Result<()> {
    let cur = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    if !cur.trim().is_empty() {
        return Ok(());
    }
    let mut chain = Vec::new();
    let mut p = dir.parent();
    while let Some(d) = p {
        chain.push(d.to_path_buf());
        if d == Path::new(ROOT).join("cpuset") {
            break;
        }
        p = d.parent();
    }
    let v = chain
        .iter()
        .find_map(|d| {
            std::fs::read_to_string(d.join(file))
                .ok()
                .filter(|s| !s.trim().is_empty())
        })
        .unwrap_or_default();
    // Parents need values before children can take them.
    for d in chain
        .iter()
        .rev()
        .chain(std::iter::once(&dir.to_path_buf()))
    {
        let cur = std::fs::read_to_string(d.join(file)).unwrap_or_default();
        if cur.trim().is_empty() {
            write(d, file, v.trim())?;
        }
    }
    Ok(())
}

fn collect_pids(dir: &Path, out: &mut Vec<i32>, depth: usize) {
    if depth > 64 {
        return;
    }
    if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_pids(&e.path(), out, depth + 1);
            }
        }
    }
}

fn remove_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path())?;
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_round_trip() {
        assert_eq!(parse_cpus("0-3,6,8-9"), Some(vec![0, 1, 2, 3, 6, 8, 9]));
        assert_eq!(format_cpus(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
        assert_eq!(format_cpus(&[1]), "1");
        assert_eq!(parse_cpus(""), Some(vec![]));
        assert_eq!(parse_cpus("3-1"), None);
        assert_eq!(parse_cpus("x"), None);
    }
}
