//! Renderers against a fake cgroup tree full of garbage: errors are fine, panics are not.

use procfs_fuse::cgroup::{Hierarchy, V1, V2};
use procfs_fuse::render::{render, Ctx, FileKind};

type TResult = Result<(), Box<dyn std::error::Error>>;

fn fill(root: &std::path::Path, files: &[(&str, &[u8])]) -> TResult {
    for (p, data) in files {
        let p = root.join(p);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(p, data)?;
    }
    Ok(())
}

#[test]
fn garbage_cgroup_files() -> TResult {
    let garbage: &[&[u8]] = &[
        b"",
        b"abc",
        b"-1",
        b"99999999999999999999999999",
        b"\xff\xfe\x00garbage\n1 2 3",
        b"0-4294967295",
        b"5-1",
        b"cpu user system\n0 1\nx y z\n4294967295 18446744073709551615 18446744073709551615\n",
        b"8:0 Read 18446744073709551615\n8:0 Bogus\n::\n",
        b"8:0 rbytes=x wbytes=18446744073709551615 rios=1\n",
    ];
    for (i, g) in garbage.iter().enumerate() {
        for v2 in [false, true] {
            let t = tempfile::tempdir()?;
            let r = t.path();
            let cg = "/c/d";
            if v2 {
                let files: Vec<(String, &[u8])> = [
                    "memory.max",
                    "memory.current",
                    "memory.swap.max",
                    "memory.stat",
                    "cpuset.cpus.effective",
                    "cpu.max",
                    "cpu.stat",
                    "io.stat",
                    "cgroup.threads",
                ]
                .iter()
                .map(|f| (format!("c/d/{f}"), *g))
                .collect();
                let refs: Vec<(&str, &[u8])> =
                    files.iter().map(|(a, b)| (a.as_str(), *b)).collect();
                fill(r, &refs)?;
                fill(r, &[("cgroup.controllers", b"memory")])?;
            } else {
                let mut files = Vec::new();
                for (ctrl, fs) in [
                    (
                        "memory",
                        &[
                            "memory.limit_in_bytes",
                            "memory.usage_in_bytes",
                            "memory.memsw.limit_in_bytes",
                            "memory.memsw.usage_in_bytes",
                            "memory.stat",
                            "tasks",
                        ][..],
                    ),
                    ("cpuset", &["cpuset.cpus", "cpuset.effective_cpus"][..]),
                    ("cpu", &["cpu.cfs_quota_us", "cpu.cfs_period_us"][..]),
                    ("cpuacct", &["cpuacct.usage_all"][..]),
                    (
                        "blkio",
                        &[
                            "blkio.throttle.io_service_bytes_recursive",
                            "blkio.throttle.io_serviced_recursive",
                        ][..],
                    ),
                ] {
                    for f in fs {
                        files.push((format!("{ctrl}/c/d/{f}"), *g));
                        files.push((format!("{ctrl}/c/{f}"), *g));
                    }
                }
                let refs: Vec<(&str, &[u8])> =
                    files.iter().map(|(a, b)| (a.as_str(), *b)).collect();
                fill(r, &refs)?;
            }
            let h = if v2 {
                Hierarchy::V2(V2 {
                    root: r.to_path_buf(),
                })
            } else {
                Hierarchy::V1(V1 {
                    root: r.to_path_buf(),
                })
            };
            let ctx = Ctx {
                cgroup: cg.into(),
                started_boot_secs: Some(f64::NAN),
                loadavg: None,
            };
            for k in FileKind::ALL {
                let res = render(&h, k, Some(&ctx));
                if let Ok(data) = &res {
                    assert!(data.len() < 1 << 20, "case {i} {k:?}: huge output");
                }
            }
        }
    }
    // A directory where a file should be (reads fail with EISDIR), and a missing cgroup.
    let t = tempfile::tempdir()?;
    std::fs::create_dir_all(t.path().join("memory/c/memory.limit_in_bytes"))?;
    let h = Hierarchy::V1(V1 {
        root: t.path().to_path_buf(),
    });
    for cg in ["/c", "/missing"] {
        let ctx = Ctx {
            cgroup: cg.into(),
            ..Ctx::default()
        };
        for k in FileKind::ALL {
            let _ = render(&h, k, Some(&ctx));
        }
    }
    Ok(())
}
