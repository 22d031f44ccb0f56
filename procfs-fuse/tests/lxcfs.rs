//! Side by side with lxcfs 5.0.3 (`lxcfs --enable-cfs` on a temp dir): the same process reads
//! both mounts; values must agree per the acceptance.

mod common;
use common::*;

struct Case {
    name: &'static str,
    /// (ctrl, rel path, file, value)
    set: &'static [(&'static str, &'static str, &'static str, &'static str)],
}

const LEAF: &str = "a/b/c";

fn compare(lx: &Lxcfs, d: &Daemon, case: &Case) -> TResult {
    let tree = CgTree::new(&["a", "a/b", "a/b/c"])?;
    for (c, rel, f, v) in case.set {
        tree.set(c, rel, f, v)?;
    }
    let ct = Container::start(&tree, LEAF)?;
    d.register(&format!("c-{}", case.name), &tree.path(LEAF), ct.init)?;
    // Page cache charged to the container, so Cached/MemAvailable are non-trivial.
    ct.run(
        &tree,
        LEAF,
        &format!(
            "dd if=/dev/zero of={}/cache bs=1M count=64 status=none && cat {}/cache > /dev/null",
            d.dir.path().display(),
            d.dir.path().display()
        ),
    )?;
    let ours = d.mnt();
    let theirs = lx.mnt();
    let read_both = |f: &str| -> TResult<(String, String)> {
        let out = ct.run(
            &tree,
            LEAF,
            &format!(
                "cat {o}/{f}; echo @@@@; cat {t}/{f}",
                o = ours.display(),
                t = theirs.display()
            ),
        )?;
        let (a, b) = out.split_once("@@@@\n").ok_or("no separator")?;
        Ok((a.to_string(), b.to_string()))
    };
    let (om, lm) = read_both("proc/meminfo")?;
    for k in ["MemTotal", "SwapTotal"] {
        assert_eq!(field(&om, k), field(&lm, k), "{}: {k}", case.name);
    }
    for k in ["MemFree", "MemAvailable", "Cached"] {
        let (a, b) = (
            field(&om, k).ok_or(k)? as f64,
            field(&lm, k).ok_or(k)? as f64,
        );
        let total = field(&lm, "MemTotal").ok_or("MemTotal")? as f64;
        // 1% of the value, floored at 1% of MemTotal for near-zero figures.
        let tol = (b * 0.01).max(total * 0.01);
        assert!(
            (a - b).abs() <= tol,
            "{}: {k} ours {a} lxcfs {b}",
            case.name
        );
    }
    let (os, ls) = read_both("proc/swaps")?;
    assert_eq!(os, ls, "{}: swaps", case.name);
    let (oc, lc) = read_both("proc/cpuinfo")?;
    assert_eq!(processors(&oc), processors(&lc), "{}: cpuinfo", case.name);
    let (oo, lo) = read_both("sys/devices/system/cpu/online")?;
    assert_eq!(oo, lo, "{}: online", case.name);
    let (ost, lst) = read_both("proc/stat")?;
    assert_eq!(cpu_rows(&ost), cpu_rows(&lst), "{}: stat rows", case.name);
    let (ou, lu) = read_both("proc/uptime")?;
    let up = |s: &str| -> TResult<f64> {
        Ok(s.split_whitespace().next().ok_or("empty")?.parse::<f64>()?)
    };
    let (a, b) = (up(&ou)?, up(&lu)?);
    assert!(
        (a - b).abs() <= 0.2,
        "{}: uptime ours {a} lxcfs {b}",
        case.name
    );
    eprintln!(
        "{:<28} MemTotal {:>9} MemFree {:>9}/{:<9} Cached {:>7}/{:<7} cpus {} online {} uptime {a:.2}/{b:.2}",
        case.name,
        field(&om, "MemTotal").unwrap_or(0),
        field(&om, "MemFree").unwrap_or(0),
        field(&lm, "MemFree").unwrap_or(0),
        field(&om, "Cached").unwrap_or(0),
        field(&lm, "Cached").unwrap_or(0),
        processors(&oc),
        oo.trim()
    );
    Ok(())
}

#[test]
fn side_by_side_with_lxcfs() -> TResult {
    let lx = Lxcfs::start()?;
    let d = Daemon::start(&[])?;
    let cases = [
        Case {
            name: "mem-limit-on-ancestor",
            set: &[("memory", "a", "memory.limit_in_bytes", "536870912")],
        },
        Case {
            name: "mem-limit-in-leaf",
            set: &[
                ("memory", "a", "memory.limit_in_bytes", "1073741824"),
                ("memory", LEAF, "memory.limit_in_bytes", "402653184"),
            ],
        },
        Case {
            name: "cpuset-0",
            set: &[
                ("memory", "", "memory.limit_in_bytes", "805306368"),
                // v1 refuses to shrink a parent below its children: leaf first.
                ("cpuset", LEAF, "cpuset.cpus", "0"),
                ("cpuset", "a/b", "cpuset.cpus", "0"),
                ("cpuset", "a", "cpuset.cpus", "0"),
                ("cpuset", "", "cpuset.cpus", "0"),
            ],
        },
        Case {
            name: "cpuset-0-1",
            set: &[("memory", LEAF, "memory.limit_in_bytes", "536870912")],
        },
        Case {
            name: "quota-0.5",
            set: &[
                ("memory", "a", "memory.limit_in_bytes", "536870912"),
                ("cpu", LEAF, "cpu.cfs_quota_us", "50000"),
            ],
        },
        Case {
            name: "quota-1.5",
            set: &[
                ("memory", "a", "memory.limit_in_bytes", "536870912"),
                ("cpu", LEAF, "cpu.cfs_quota_us", "150000"),
            ],
        },
        Case {
            name: "quota-3-on-ancestor",
            set: &[
                ("memory", "a", "memory.limit_in_bytes", "536870912"),
                ("cpu", "a", "cpu.cfs_quota_us", "300000"),
            ],
        },
    ];
    for c in &cases {
        compare(&lx, &d, c)?;
    }
    Ok(())
}
