//! The FUSE mount end to end: chunked reads, a mount namespace with our files bound over
//! /proc, kill -9 + restart (against lxcfs), and bad input.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const LEAF: &str = "a/b";

fn binds(src: &std::path::Path) -> String {
    procfs_fuse::FILES
        .iter()
        .map(|(from, to)| format!("mount --bind {}/{from} {to} && ", src.display()))
        .collect()
}

#[test]
fn chunked_reads_match_full_read() -> TResult {
    let d = Daemon::start(&[])?;
    let tree = CgTree::new(&["a", "a/b"])?;
    tree.set("memory", "a", "memory.limit_in_bytes", "536870912")?;
    let ct = Container::start(&tree, LEAF)?;
    d.register("chunks", &tree.path(LEAF), ct.init)?;
    let script = r#"
import sys, json
out = {}
for p in sys.argv[1:]:
    res = []
    for size in (1 << 20, 1, 1024):
        with open(p, 'rb', buffering=0) as f:
            buf = b''
            while True:
                c = f.read(size)
                if not c:
                    break
                buf += c
        res.append(buf.decode())
    out[p] = res
print(json.dumps(out))
"#;
    let paths: Vec<String> = procfs_fuse::FILES
        .iter()
        .map(|(f, _)| format!("{}/{f}", d.mnt().display()))
        .collect();
    let out = ct.run(
        &tree,
        LEAF,
        &format!("python3 -c {} {}", shell_quote(script), paths.join(" ")),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    for p in &paths {
        let arr = v.get(p).and_then(|a| a.as_array()).ok_or("missing")?;
        let s: Vec<&str> = arr.iter().filter_map(|x| x.as_str()).collect();
        let [full, one, kb] = s.as_slice() else {
            return Err("bad result".into());
        };
        assert!(!full.is_empty() || p.ends_with("loadavg"), "{p} empty");
        let stable = ["cpuinfo", "swaps", "online"]
            .iter()
            .any(|f| p.ends_with(f));
        if stable {
            assert_eq!(full, one, "{p}: 1-byte chunks differ");
            assert_eq!(full, kb, "{p}: 1024-byte chunks differ");
        } else {
            // Values move between opens; the shape (line keys) must not.
            let keys = |t: &str| -> Vec<(usize, String)> {
                t.lines()
                    .map(|l| {
                        let first = l.split([':', ' ']).next().unwrap_or("");
                        let key = if first.chars().any(|c| c.is_ascii_alphabetic()) {
                            first.to_string()
                        } else {
                            String::new()
                        };
                        (l.split_whitespace().count(), key)
                    })
                    .collect()
            };
            assert_eq!(keys(full), keys(one), "{p}: 1-byte chunks differ");
            assert_eq!(keys(full), keys(kb), "{p}: 1024-byte chunks differ");
        }
        if p.ends_with("meminfo") {
            for t in [full, one, kb] {
                assert_eq!(field(t, "MemTotal"), Some(524288));
            }
        }
    }
    // A host process (unregistered) sees the host's files.
    let host_online = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
    let ours = std::fs::read_to_string(d.mnt().join("sys/devices/system/cpu/online"))?;
    assert_eq!(host_online, ours);
    let host_mem = std::fs::read_to_string("/proc/meminfo")?;
    let ours = std::fs::read_to_string(d.mnt().join("proc/meminfo"))?;
    assert_eq!(field(&host_mem, "MemTotal"), field(&ours, "MemTotal"));
    Ok(())
}

#[test]
fn tools_in_mount_namespace_see_container_values() -> TResult {
    let d = Daemon::start(&[])?;
    for (name, quota, cpus, expect_nproc) in
        [("cpuset0", None, "0", 1), ("q05", Some("50000"), "", 2)]
    {
        let tree = CgTree::new(&["a", "a/b"])?;
        tree.set("memory", "a", "memory.limit_in_bytes", "536870912")?;
        if !cpus.is_empty() {
            for rel in [LEAF, "a", ""] {
                tree.set("cpuset", rel, "cpuset.cpus", cpus)?;
            }
        }
        if let Some(q) = quota {
            tree.set("cpu", LEAF, "cpu.cfs_quota_us", q)?;
        }
        let ct = Container::start(&tree, LEAF)?;
        d.register(name, &tree.path(LEAF), ct.init)?;
        let cmd = format!(
            "unshare -m bash -c '{} free -b | awk \"/^Mem:/{{print \\$2}}\"; nproc; getconf _NPROCESSORS_ONLN; \
             python3 -c \"import os;print(os.cpu_count())\"; uptime; cut -d\" \" -f1 /proc/uptime'",
            binds(&d.mnt())
        );
        let out = ct.run(&tree, LEAF, &cmd)?;
        eprintln!("{name}:\n{out}");
        let l: Vec<&str> = out.lines().collect();
        assert_eq!(l.first().copied(), Some("536870912"), "{name}: free -b");
        // nproc follows the affinity mask (cpuset), the others follow /sys/.../online.
        assert_eq!(
            l.get(1).copied(),
            Some(expect_nproc.to_string().as_str()),
            "{name}: nproc"
        );
        assert_eq!(l.get(2).copied(), Some("1"), "{name}: getconf");
        assert_eq!(l.get(3).copied(), Some("1"), "{name}: python cpu_count");
        assert!(
            l.get(4).is_some_and(|u| u.contains("up 0 min")),
            "{name}: uptime"
        );
        let up: f64 = l.get(5).ok_or("no uptime")?.parse()?;
        assert!(up < 30.0, "{name}: /proc/uptime {up}");
    }
    Ok(())
}

const READER: &str = r#"
import sys, time, errno
p, dur = sys.argv[1], float(sys.argv[2])
end = time.time() + dur
while time.time() < end:
    try:
        with open(p, 'rb', buffering=0) as f:
            d = f.read(65536)
        print('ok %.6f %d' % (time.time(), len(d)), flush=True)
    except OSError as e:
        print('err %.6f %d' % (time.time(), e.errno), flush=True)
    time.sleep(0.005)
"#;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn events(path: &std::path::Path) -> Vec<(bool, f64, i64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                *f.first()? == "ok",
                f.get(1)?.parse().ok()?,
                f.get(2)?.parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn kill9_and_restart_keeps_mounts_alive() -> TResult {
    restart_case(&[], false)
}

#[test]
fn kill9_and_restart_with_clone_fd() -> TResult {
    restart_case(&["--clone-fd"], true)
}

/// `clone_fd`: the kernel ends requests pending on a closed cloned fd with ECONNABORTED, so
/// reads in flight at the instant of the kill may fail (never after recovery).
fn restart_case(args: &[&str], clone_fd: bool) -> TResult {
    let mut lx = Lxcfs::start()?;
    let mut d = Daemon::start(args)?;
    let tree = CgTree::new(&["a", "a/b"])?;
    tree.set("memory", "a", "memory.limit_in_bytes", "536870912")?;
    let ct = Container::start(&tree, LEAF)?;
    d.register("restart", &tree.path(LEAF), ct.init)?;
    let tmp = tempfile::tempdir()?;
    let mut readers = Vec::new();
    for (name, src) in [("ours", d.mnt()), ("lxcfs", lx.mnt())] {
        let log = tmp.path().join(name);
        let script = format!(
            "{} nsenter -t {} -p -- unshare -m bash -c {}",
            tree.enter_snippet(LEAF),
            ct.init,
            shell_quote(&format!(
                "mount --bind {}/proc/meminfo /proc/meminfo && exec python3 -c {} /proc/meminfo 5 > {}",
                src.display(),
                shell_quote(READER),
                log.display()
            ))
        );
        let child = Command::new("bash")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .spawn()?;
        readers.push((
            log,
            Proc {
                child,
                extra_pids: vec![],
            },
        ));
    }
    for (log, _) in &readers {
        poll(Duration::from_secs(10), || {
            (events(log).iter().filter(|e| e.0).count() >= 20).then_some(())
        })
        .ok_or("readers did not start")?;
    }
    let t_kill = now();
    d.kill9();
    lx.kill9();
    // Restart both. Ours is back when the kernel connection is served again.
    let t_restart = now();
    d.spawn()?;
    lx.restart()?;
    for (_, p) in &mut readers {
        let deadline = Instant::now() + Duration::from_secs(20);
        while p.child.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let ours = events(&readers.first().ok_or("r")?.0);
    let theirs = events(&readers.get(1).ok_or("r")?.0);
    let first_ok = ours
        .iter()
        .find(|e| e.0 && e.1 > t_restart)
        .map(|e| e.1)
        .ok_or("ours never recovered")?;
    let errs_after: Vec<_> = ours
        .iter()
        .filter(|e| !e.0 && (e.1 >= first_ok || !clone_fd || e.2 != i64::from(libc::ECONNABORTED)))
        .filter(|e| e.1 >= t_kill)
        .collect();
    let enotconn = ours
        .iter()
        .filter(|e| !e.0 && e.2 == i64::from(libc::ENOTCONN))
        .count();
    let ok_after = ours.iter().filter(|e| e.0 && e.1 > first_ok).count();
    let lx_enotconn = theirs
        .iter()
        .filter(|e| !e.0 && e.1 > t_kill && e.2 == i64::from(libc::ENOTCONN))
        .count();
    let lx_ok_after = theirs
        .iter()
        .filter(|e| e.0 && e.1 > t_restart + 1.0)
        .count();
    eprintln!(
        "ours: recovered {:.3}s after restart, {} errors after kill, {} ok reads after; \
         lxcfs: {} ENOTCONN after kill, {} ok reads after restart",
        first_ok - t_restart,
        errs_after.len(),
        ok_after,
        lx_enotconn,
        lx_ok_after
    );
    assert!(first_ok - t_restart < 2.0, "recovery took too long");
    assert!(errs_after.is_empty(), "errors after kill: {errs_after:?}");
    assert_eq!(enotconn, 0);
    assert!(ok_after > 10);
    // The difference this crate exists for: lxcfs' bind mount is dead after its restart.
    assert!(lx_enotconn > 0, "lxcfs unexpectedly survived");
    assert_eq!(lx_ok_after, 0);
    Ok(())
}

#[test]
fn bad_input_never_panics_or_hangs() -> TResult {
    let d = Daemon::start(&[])?;
    let tree = CgTree::new(&["a", "a/b"])?;
    tree.set("memory", "a", "memory.limit_in_bytes", "536870912")?;
    let ct = Container::start(&tree, LEAF)?;
    d.register("bad", &tree.path(LEAF), ct.init)?;
    // Records pointing at nothing, and garbage records, must not disturb anyone.
    d.register("ghost", "/fatbox-test-does-not-exist/x", 999_999_999)?;
    std::fs::write(d.reg().join("junk.json"), b"{\"id\": 7")?;
    // Callers that vanish mid-request.
    let mnt = d.mnt();
    ct.run(
        &tree,
        LEAF,
        &format!(
            "for i in $(seq 1 100); do cat {m}/proc/meminfo {m}/proc/stat > /dev/null & kill -9 $! 2>/dev/null; done; wait; true",
            m = mnt.display()
        ),
    )?;
    // Delete the container's cgroups in every controller but memory, under its feet.
    for c in ["cpuset", "cpu", "cpuacct", "blkio"] {
        for rel in [LEAF, "a"] {
            let dir = format!("/sys/fs/cgroup/{c}{}", tree.path(rel));
            for p in std::fs::read_to_string(format!("{dir}/cgroup.procs"))?.lines() {
                std::fs::write(format!("/sys/fs/cgroup/{c}/cgroup.procs"), p)?;
            }
            std::fs::remove_dir(&dir)?;
        }
    }
    let script = format!(
        "for f in {}; do timeout 5 cat $f > /dev/null; rc=$?; [ $rc -eq 124 ] && echo HANG $f; [ $rc -ne 0 ] && echo FAIL $f; done; echo done",
        procfs_fuse::FILES
            .iter()
            .map(|(f, _)| format!("{}/{f}", mnt.display()))
            .collect::<Vec<_>>()
            .join(" ")
    );
    // The reader lives only in the memory cgroup now (the others are gone).
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "echo $$ > /sys/fs/cgroup/memory{}/cgroup.procs && {script}",
            tree.path(LEAF)
        ))
        .output()?;
    let out = String::from_utf8(out.stdout)?;
    eprintln!("{out}");
    assert!(!out.contains("HANG"), "{out}");
    assert!(out.contains("done"));
    // EIO is allowed, but the memory-only files must still answer with container values.
    let m = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "echo $$ > /sys/fs/cgroup/memory{}/cgroup.procs && cat {}/proc/meminfo",
            tree.path(LEAF),
            mnt.display()
        ))
        .output()?;
    assert_eq!(
        field(&String::from_utf8(m.stdout)?, "MemTotal"),
        Some(524288)
    );
    // The daemon is still alive and serving.
    assert!(std::fs::read(d.mnt().join("proc/stat")).is_ok());
    Ok(())
}
