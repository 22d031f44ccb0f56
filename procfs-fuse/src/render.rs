//! Rendering of the virtualised files. Formulas follow lxcfs 5.0.3 (calibrated side by side,
//! see tests/lxcfs.rs); host lines we do not virtualise are passed through unchanged.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::cgroup::{parse_cpulist, Cgroups, Hierarchy};
use crate::error::{read_string, Error, Result};

/// The files we serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileKind {
    Meminfo,
    Cpuinfo,
    Stat,
    Uptime,
    Loadavg,
    Diskstats,
    Swaps,
    Online,
}

impl FileKind {
    pub const ALL: [FileKind; 8] = [
        FileKind::Meminfo,
        FileKind::Cpuinfo,
        FileKind::Stat,
        FileKind::Uptime,
        FileKind::Loadavg,
        FileKind::Diskstats,
        FileKind::Swaps,
        FileKind::Online,
    ];

    /// Short name as used by the CLI (`meminfo`, ..., `online`).
    pub fn name(self) -> &'static str {
        match self {
            FileKind::Meminfo => "meminfo",
            FileKind::Cpuinfo => "cpuinfo",
            FileKind::Stat => "stat",
            FileKind::Uptime => "uptime",
            FileKind::Loadavg => "loadavg",
            FileKind::Diskstats => "diskstats",
            FileKind::Swaps => "swaps",
            FileKind::Online => "online",
        }
    }

    /// Accepts the short name, the path under the mount or the host path.
    pub fn parse(s: &str) -> Result<Self> {
        let base = s.rsplit('/').next().unwrap_or(s);
        FileKind::ALL
            .into_iter()
            .find(|k| k.name() == base)
            .ok_or_else(|| Error::UnknownFile(s.to_string()))
    }

    /// Host file this one virtualises.
    pub fn host_path(self) -> &'static str {
        match self {
            FileKind::Meminfo => "/proc/meminfo",
            FileKind::Cpuinfo => "/proc/cpuinfo",
            FileKind::Stat => "/proc/stat",
            FileKind::Uptime => "/proc/uptime",
            FileKind::Loadavg => "/proc/loadavg",
            FileKind::Diskstats => "/proc/diskstats",
            FileKind::Swaps => "/proc/swaps",
            FileKind::Online => "/sys/devices/system/cpu/online",
        }
    }

    /// Path under the FUSE mount.
    pub fn mount_path(self) -> &'static str {
        match self {
            FileKind::Online => "sys/devices/system/cpu/online",
            FileKind::Meminfo => "proc/meminfo",
            FileKind::Cpuinfo => "proc/cpuinfo",
            FileKind::Stat => "proc/stat",
            FileKind::Uptime => "proc/uptime",
            FileKind::Loadavg => "proc/loadavg",
            FileKind::Diskstats => "proc/diskstats",
            FileKind::Swaps => "proc/swaps",
        }
    }
}

/// Load averages of one container, maintained by the sampler.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadAvg {
    pub avg: [f64; 3],
    pub running: u32,
    pub total: u32,
}

/// What is known about the container being rendered for.
#[derive(Debug, Clone, Default)]
pub struct Ctx {
    /// Cgroup path relative to the roots.
    pub cgroup: String,
    /// Container start in seconds since the host booted (CLOCK_BOOTTIME), if known.
    pub started_boot_secs: Option<f64>,
    /// Sampled load, None when sampling is off (host loadavg is served then).
    pub loadavg: Option<LoadAvg>,
}

fn clk_tck() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(v).ok().filter(|v| *v > 0).unwrap_or(100)
}

/// Seconds since boot (CLOCK_BOOTTIME, what /proc/uptime shows).
pub fn boot_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Start time of a process in seconds since boot, from /proc/PID/stat field 22.
pub fn pid_start_boot_secs(pid: u32) -> Result<f64> {
    let p = format!("/proc/{pid}/stat");
    let s = read_string(&p)?;
    // comm may hold spaces and parentheses: fields start after the last ')'.
    let rest = s
        .rfind(')')
        .and_then(|i| s.get(i.saturating_add(1)..))
        .ok_or_else(|| Error::parse(&p, "no comm"))?;
    // rest starts at field 3 (state); starttime is field 22.
    let start = rest
        .split_whitespace()
        .nth(19)
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| Error::parse(&p, "no starttime"))?;
    Ok(start as f64 / clk_tck() as f64)
}

fn ceil_div(a: u64, b: u64) -> u64 {
    if b == 0 {
        return 0;
    }
    a.div_ceil(b)
}

/// Host CPUs visible to the cgroup: its cpuset, cut to ceil(quota/period) (lowest over the
/// cgroup and its ancestors) when a CFS quota is set. Never empty.
pub fn visible_cpus(cg: &dyn Cgroups, path: &str) -> Result<Vec<u32>> {
    let mut cpus = cg.cpus(path)?;
    let mut max: Option<u64> = None;
    let mut cur = path.to_string();
    loop {
        if let Ok(Some((q, p))) = cg.cpu_quota(&cur) {
            let n = ceil_div(q, p).max(1);
            max = Some(max.map_or(n, |m| m.min(n)));
        }
        match cur.rfind('/') {
            Some(0) | None => {
                if cur == "/" {
                    break;
                }
                cur = "/".to_string();
            }
            Some(i) => cur.truncate(i),
        }
    }
    if let Some(n) = max.and_then(|n| usize::try_from(n).ok()) {
        if n < cpus.len() {
            cpus.truncate(n);
        }
    }
    if cpus.is_empty() {
        cpus.push(0);
    }
    Ok(cpus)
}

fn host_meminfo() -> Result<(String, BTreeMap<String, u64>)> {
    let s = read_string("/proc/meminfo")?;
    let mut m = BTreeMap::new();
    for line in s.lines() {
        if let Some((k, v)) = line.split_once(':') {
            if let Some(v) = v.split_whitespace().next().and_then(|v| v.parse().ok()) {
                m.insert(k.to_string(), v);
            }
        }
    }
    Ok((s, m))
}

/// Render `kind` for `ctx` (None: the host's file unchanged).
pub fn render(h: &Hierarchy, kind: FileKind, ctx: Option<&Ctx>) -> Result<Vec<u8>> {
    let Some(ctx) = ctx else {
        return host(kind);
    };
    let cg = h.backend();
    let out = match kind {
        FileKind::Meminfo => meminfo(cg, &ctx.cgroup)?,
        FileKind::Cpuinfo => cpuinfo(cg, &ctx.cgroup)?,
        FileKind::Stat => stat(cg, &ctx.cgroup)?,
        FileKind::Uptime => uptime(cg, ctx)?,
        FileKind::Loadavg => match ctx.loadavg {
            Some(l) => loadavg(&l)?,
            None => return host(kind),
        },
        FileKind::Diskstats => diskstats(cg, &ctx.cgroup)?,
        FileKind::Swaps => swaps(cg, &ctx.cgroup)?,
        FileKind::Online => {
            let n = visible_cpus(cg, &ctx.cgroup)?.len();
            if n > 1 {
                format!("0-{}\n", n.saturating_sub(1))
            } else {
                "0\n".to_string()
            }
        }
    };
    Ok(out.into_bytes())
}

/// The host's file, unchanged.
pub fn host(kind: FileKind) -> Result<Vec<u8>> {
    std::fs::read(kind.host_path()).map_err(|e| Error::io(kind.host_path(), e))
}

struct MemView {
    total_kb: u64,
    usage_kb: u64,
    swap_total_kb: u64,
    swap_used_kb: u64,
    st: crate::cgroup::MemStat,
}

fn mem_view(cg: &dyn Cgroups, path: &str, host: &BTreeMap<String, u64>) -> Result<MemView> {
    let host_total = host.get("MemTotal").copied().unwrap_or(0);
    let limit = cg.mem_limit(path)?;
    let total_kb = limit.map_or(host_total, |l| (l / 1024).min(host_total));
    let usage = cg.mem_usage(path)?;
    let usage_kb = (usage / 1024).min(total_kb);
    let host_swap = host.get("SwapTotal").copied().unwrap_or(0);
    // No host swap: nothing to show whatever the limits say, so skip reading them.
    let (swap_total_kb, swap_used_kb) = if host_swap == 0 {
        (0, 0)
    } else {
        let t = cg
            .swap_limit(path, limit)?
            .map_or(host_swap, |l| (l / 1024).min(host_swap));
        (t, (cg.swap_usage(path, usage)? / 1024).min(t))
    };
    let st = cg.mem_stat(path)?;
    Ok(MemView {
        total_kb,
        usage_kb,
        swap_total_kb,
        swap_used_kb,
        st,
    })
}

fn meminfo(cg: &dyn Cgroups, path: &str) -> Result<String> {
    let (text, host) = host_meminfo()?;
    let v = mem_view(cg, path, &host)?;
    let st = &v.st;
    let kb = |b: u64| b / 1024;
    let free = v.total_kb.saturating_sub(v.usage_kb);
    let cached = kb(st.cache);
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let key = line.split_once(':').map_or(line, |(k, _)| k);
        let val = match key {
            "MemTotal" => Some(v.total_kb),
            "MemFree" => Some(free),
            "MemAvailable" => Some(free.saturating_add(cached).min(v.total_kb)),
            "Buffers" => Some(0),
            "Cached" => Some(cached),
            "SwapCached" => Some(0),
            "Active" => Some(kb(st.active_anon.saturating_add(st.active_file))),
            "Inactive" => Some(kb(st.inactive_anon.saturating_add(st.inactive_file))),
            "Active(anon)" => Some(kb(st.active_anon)),
            "Inactive(anon)" => Some(kb(st.inactive_anon)),
            "Active(file)" => Some(kb(st.active_file)),
            "Inactive(file)" => Some(kb(st.inactive_file)),
            "Unevictable" => Some(kb(st.unevictable)),
            "SwapTotal" => Some(v.swap_total_kb),
            "SwapFree" => Some(v.swap_total_kb.saturating_sub(v.swap_used_kb)),
            "Dirty" => Some(kb(st.dirty)),
            "Writeback" => Some(kb(st.writeback)),
            "AnonPages" => Some(kb(st.rss)),
            "Mapped" => Some(kb(st.mapped_file)),
            "Shmem" => Some(kb(st.shmem)),
            "Slab" => Some(kb(st
                .slab_reclaimable
                .saturating_add(st.slab_unreclaimable))),
            "SReclaimable" => Some(kb(st.slab_reclaimable)),
            "SUnreclaim" => Some(kb(st.slab_unreclaimable)),
            _ => None,
        };
        match val {
            // Same layout as the kernel: key and colon padded to 16 columns, value in 8.
            Some(n) => {
                let _ = writeln!(out, "{:<16}{:>8} kB", format!("{key}:"), n);
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    Ok(out)
}

fn swaps(cg: &dyn Cgroups, path: &str) -> Result<String> {
    let (_, host) = host_meminfo()?;
    let v = mem_view(cg, path, &host)?;
    // lxcfs' header (narrower than the kernel's), kept for byte equality with it.
    let mut out = String::from("Filename\t\t\t\tType\t\tSize\tUsed\tPriority\n");
    if v.swap_total_kb > 0 {
        let _ = writeln!(
            out,
            "none{:36}virtual\t\t{}\t{}\t0",
            "", v.swap_total_kb, v.swap_used_kb
        );
    }
    Ok(out)
}

/// Host cpuinfo split into the preamble and one block per processor.
fn cpuinfo_blocks(text: &str) -> (String, Vec<(u32, Vec<&str>)>) {
    let mut pre = String::new();
    let mut blocks: Vec<(u32, Vec<&str>)> = Vec::new();
    for line in text.lines() {
        let is_proc = line.starts_with("processor")
            && line
                .split_once(':')
                .is_some_and(|(k, _)| k.trim() == "processor");
        if is_proc {
            let id = line
                .split_once(':')
                .and_then(|(_, v)| v.trim().parse::<u32>().ok())
                .unwrap_or(u32::MAX);
            blocks.push((id, vec![line]));
        } else if let Some(b) = blocks.last_mut() {
            b.1.push(line);
        } else {
            pre.push_str(line);
            pre.push('\n');
        }
    }
    (pre, blocks)
}

fn cpuinfo(cg: &dyn Cgroups, path: &str) -> Result<String> {
    let text = read_string("/proc/cpuinfo")?;
    let cpus = visible_cpus(cg, path)?;
    let (pre, blocks) = cpuinfo_blocks(&text);
    let mut out = pre;
    let mut n = 0u32;
    for (id, lines) in &blocks {
        if !cpus.contains(id) {
            continue;
        }
        for (i, l) in lines.iter().enumerate() {
            if i == 0 {
                let _ = writeln!(out, "processor\t: {n}");
            } else {
                out.push_str(l);
                out.push('\n');
            }
        }
        n = n.saturating_add(1);
    }
    Ok(out)
}

fn stat(cg: &dyn Cgroups, path: &str) -> Result<String> {
    let text = read_string("/proc/stat")?;
    let cpus = visible_cpus(cg, path)?;
    let all = cg.cpus(path).unwrap_or_else(|_| cpus.clone());
    let usage = cg.cpu_usage(path, &all)?;
    let tick_ns = 1_000_000_000 / clk_tck();
    // Usage on CPUs cut away by the quota is spread over the visible ones so the sum stays.
    let mut extra = crate::cgroup::CpuUsage::default();
    for (c, u) in &usage {
        if !cpus.contains(c) {
            extra.user_ns = extra.user_ns.saturating_add(u.user_ns);
            extra.system_ns = extra.system_ns.saturating_add(u.system_ns);
        }
    }
    let nvis = u64::try_from(cpus.len().max(1)).unwrap_or(1);
    let mut host_rows: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let mut rest = String::new();
    for line in text.lines() {
        if let Some(r) = line.strip_prefix("cpu") {
            let mut it = r.split_whitespace();
            let first = it.next().unwrap_or("");
            if let Ok(id) = first.parse::<u32>() {
                host_rows.insert(id, it.filter_map(|v| v.parse().ok()).collect());
            }
            continue;
        }
        rest.push_str(line);
        rest.push('\n');
    }
    let mut rows = Vec::with_capacity(cpus.len());
    for c in &cpus {
        let host_total: u64 = host_rows.get(c).map_or(0, |r| {
            r.iter().take(8).fold(0u64, |a, v| a.saturating_add(*v))
        });
        let u = usage.get(c).copied().unwrap_or_default();
        let user = u.user_ns.saturating_add(extra.user_ns / nvis) / tick_ns;
        let sys = u.system_ns.saturating_add(extra.system_ns / nvis) / tick_ns;
        let idle = host_total.saturating_sub(user).saturating_sub(sys);
        rows.push([user, 0, sys, idle, 0, 0, 0, 0, 0, 0]);
    }
    let mut sum = [0u64; 10];
    for r in &rows {
        for (s, v) in sum.iter_mut().zip(r) {
            *s = s.saturating_add(*v);
        }
    }
    let fmt = |r: &[u64; 10]| {
        r.iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = format!("cpu  {}\n", fmt(&sum));
    for (i, r) in rows.iter().enumerate() {
        let _ = writeln!(out, "cpu{i} {}", fmt(r));
    }
    out.push_str(&rest);
    Ok(out)
}

fn uptime(cg: &dyn Cgroups, ctx: &Ctx) -> Result<String> {
    let now = boot_secs();
    let started = match ctx.started_boot_secs {
        Some(s) => s,
        None => oldest_start(cg, &ctx.cgroup).unwrap_or(0.0),
    };
    let up = (now - started).max(0.0);
    let ncpu = visible_cpus(cg, &ctx.cgroup).map_or(1, |c| c.len()) as f64;
    let all = cg.cpus(&ctx.cgroup).unwrap_or_default();
    let busy_ns = cg
        .cpu_usage(&ctx.cgroup, &all)
        .map(|m| {
            m.values().fold(0u64, |a, u| {
                a.saturating_add(u.user_ns).saturating_add(u.system_ns)
            })
        })
        .unwrap_or(0);
    let idle = (up * ncpu - busy_ns as f64 / 1e9).max(0.0);
    Ok(format!("{up:.2} {idle:.2}\n"))
}

/// Earliest start of any thread in the cgroup, for `render --cgroup` without a record.
fn oldest_start(cg: &dyn Cgroups, path: &str) -> Option<f64> {
    cg.threads(path)
        .ok()?
        .into_iter()
        .filter_map(|t| pid_start_boot_secs(t).ok())
        .reduce(f64::min)
}

fn loadavg(l: &LoadAvg) -> Result<String> {
    let host = read_string("/proc/loadavg")?;
    let last = host.split_whitespace().nth(4).unwrap_or("0");
    Ok(format!(
        "{:.2} {:.2} {:.2} {}/{} {}\n",
        l.avg[0], l.avg[1], l.avg[2], l.running, l.total, last
    ))
}

fn diskstats(cg: &dyn Cgroups, path: &str) -> Result<String> {
    let text = read_string("/proc/diskstats")?;
    let io = cg.io_stat(path)?;
    let mut out = String::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(ma), Some(mi), Some(name)) = (f.first(), f.get(1), f.get(2)) else {
            continue;
        };
        let (Ok(ma), Ok(mi)) = (ma.parse::<u32>(), mi.parse::<u32>()) else {
            continue;
        };
        // Like lxcfs: every host device is listed, with zeros when the cgroup did no I/O.
        let s = io.get(&(ma, mi)).copied().unwrap_or_default();
        let _ = writeln!(
            out,
            "{ma:>4} {mi:>7} {name} {} 0 {} 0 {} 0 {} 0 0 0 0 0 0 0 0 0 0",
            s.reads,
            s.read_bytes / 512,
            s.writes,
            s.write_bytes / 512
        );
    }
    Ok(out)
}

/// Parse the host's cpu online list (for callers needing the host CPU count).
pub fn host_online() -> Result<Vec<u32>> {
    let p = "/sys/devices/system/cpu/online";
    parse_cpulist(&read_string(p)?).ok_or_else(|| Error::parse(p, "bad cpu list"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_split() {
        let t = "processor\t: 0\nmodel\t: x\n\nprocessor\t: 1\nmodel\t: y\n\n";
        let (pre, b) = cpuinfo_blocks(t);
        assert!(pre.is_empty());
        assert_eq!(b.len(), 2);
        assert_eq!(b.get(1).map(|x| x.0), Some(1));
    }

    #[test]
    fn kinds() {
        for k in FileKind::ALL {
            assert_eq!(FileKind::parse(k.name()).ok(), Some(k));
            assert_eq!(FileKind::parse(k.mount_path()).ok(), Some(k));
        }
        assert!(FileKind::parse("passwd").is_err());
        assert_eq!(ceil_div(150_000, 100_000), 2);
        assert_eq!(ceil_div(50_000, 100_000), 1);
    }
}
