//! The flavor as seen from inside (nproc, /proc/cpuinfo, cpu/online, free, df) with a real
//! fatbox-procfs, and live resize: cgroup values from outside, the same numbers inside,
//! without a restart (same init pid).

mod common;
use common::{cgroup_file, wait_for, Daemon, Procfs};

fn host_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn inside_view(d: &Daemon, id: &str) -> (usize, usize, String, u64) {
    let nproc = d.exec(id, "nproc").trim().parse().expect("nproc");
    let cpuinfo = d
        .exec(id, "grep -c ^processor /proc/cpuinfo")
        .trim()
        .parse()
        .expect("cpuinfo");
    let online = d
        .exec(id, "cat /sys/devices/system/cpu/online")
        .trim()
        .to_string();
    let free = d
        .exec(id, "free -m | awk '/^Mem:/ {print $2}'")
        .trim()
        .parse()
        .expect("free -m");
    (nproc, cpuinfo, online, free)
}

fn online_of(n: usize) -> String {
    if n == 1 {
        "0".into()
    } else {
        format!("0-{}", n - 1)
    }
}

#[test]
fn nproc_cpuinfo_free_follow_the_flavor_and_live_resize() {
    let p = Procfs::start();
    let d = Daemon::start_with_procfs(&p);
    d.import_fixture("deb");
    let u1 = d
        .ok(&[
            "run", "--image", "deb", "--name", "f1", "--vcpus", "1", "--memory", "384", "--disk",
            "1",
        ])
        .trim()
        .to_string();
    let u2 = d
        .ok(&[
            "run", "--image", "deb", "--name", "f2", "--vcpus", "1", "--memory", "256", "--disk",
            "1",
        ])
        .trim()
        .to_string();

    // Inside: one CPU everywhere a program may look, the flavor's memory.
    let (nproc, cpuinfo, online, free) = inside_view(&d, "f1");
    assert_eq!((nproc, cpuinfo, online.as_str()), (1, 1, "0"));
    assert!((370..=384).contains(&free), "free -m total {free}");
    // fatbox-procfs renders the same from the cgroup values fatboxd wrote.
    let cg1 = format!("/{}/{u1}", d.cgroup_parent());
    assert_eq!(p.render("online", &cg1).trim(), "0");

    // Outside: each 1-vcpu instance has its own host CPU when there are enough.
    let cpus1 = cgroup_file(&d, "cpuset", &u1, "cpuset.cpus");
    let cpus2 = cgroup_file(&d, "cpuset", &u2, "cpuset.cpus");
    if let (Some(a), Some(b)) = (&cpus1, &cpus2) {
        assert_eq!(driver::cgroups::parse_cpus(a).map(|v| v.len()), Some(1));
        if host_cpus() >= 2 {
            assert_ne!(
                a, b,
                "two 1-vcpu instances share a CPU while another is idle"
            );
        }
    }
    assert_eq!(
        cgroup_file(&d, "cpu", &u1, "cpu.cfs_quota_us").as_deref(),
        Some("100000")
    );

    // Live resize: same init, new limits outside and inside.
    let pid = d.show("f1")["init_pid"].as_i64().expect("pid");
    let n = host_cpus().min(2);
    let out = d.ok(&[
        "resize",
        "f1",
        "--vcpus",
        &n.to_string(),
        "--memory",
        "512",
        "--disk",
        "2",
    ]);
    assert_eq!(out.trim(), "running");
    let v = d.show("f1");
    assert_eq!(
        v["init_pid"].as_i64(),
        Some(pid),
        "resize restarted the instance"
    );
    assert_eq!(v["flavor"]["vcpus"], n);
    assert_eq!(v["flavor"]["memory_mb"], 512);
    assert_eq!(v["flavor"]["root_gb"], 2);
    assert_eq!(
        cgroup_file(&d, "memory", &u1, "memory.limit_in_bytes").as_deref(),
        Some((512u64 << 20).to_string().as_str())
    );
    assert_eq!(
        cgroup_file(&d, "cpu", &u1, "cpu.cfs_quota_us").as_deref(),
        Some((n * 100_000).to_string().as_str())
    );
    let (nproc, cpuinfo, online, free) = inside_view(&d, "f1");
    assert_eq!((nproc, cpuinfo), (n, n));
    assert_eq!(online, online_of(n));
    assert!(
        (490..=512).contains(&free),
        "free -m total {free} after resize"
    );
    // The disk grew online (df inside sees it, no remount) or, where the sandbox withholds
    // CAP_SYS_RESOURCE from root (online ext4 resize needs it), grows at the next boot.
    if has_cap_sys_resource() {
        assert_eq!(
            df_gb(&d, "f1"),
            2.0_f64.round(),
            "df after an online grow to 2G"
        );
    } else {
        assert!(
            v["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("next boot"),
            "{v}"
        );
        assert_eq!(df_gb(&d, "f1"), 1.0);
    }
    // Processes that were running before the resize see the new CPUs too.
    let systemd_cpus = d.exec("f1", "grep Cpus_allowed_list /proc/1/status");
    let want = cgroup_file(&d, "cpuset", &u1, "cpuset.cpus");
    if let Some(w) = want {
        assert!(systemd_cpus.contains(&w), "{systemd_cpus} vs cpuset {w}");
    }

    // Shrink back down live; and more vcpus than the host has means all host CPUs.
    d.ok(&["resize", "f1", "--vcpus", "1", "--memory", "320"]);
    let (nproc, _, online, free) = inside_view(&d, "f1");
    assert_eq!((nproc, online.as_str()), (1, "0"));
    assert!((300..=320).contains(&free), "free -m total {free}");
    let many = (host_cpus() + 2) as u32;
    d.ok(&["resize", "f2", "--vcpus", &many.to_string()]);
    assert_eq!(d.exec("f2", "nproc").trim(), host_cpus().to_string());
    assert_eq!(
        cgroup_file(&d, "cpu", &u2, "cpu.cfs_quota_us").as_deref(),
        Some((u64::from(many) * 100_000).to_string().as_str())
    );

    // Refused resizes change nothing.
    for (args, want) in [
        (vec!["--vcpus", "0"], "vcpus"),
        (vec!["--memory", "99999999999"], "memory"),
        (vec!["--disk", "1"], "grow"),
    ] {
        let mut a = vec!["resize", "f1"];
        a.extend(args);
        let o = d.fatbox(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{a:?}: {err}");
    }
    // Less memory than the instance uses: the kernel cannot reclaim it; flavor unchanged.
    d.exec(
        "f2",
        "mkdir -p /dev/shm/x && head -c 120M /dev/zero > /dev/shm/x/fill",
    );
    let o = d.fatbox(&["resize", "f2", "--memory", "64"]);
    assert!(!o.status.success(), "shrinking below usage accepted");
    assert_eq!(d.show("f2")["flavor"]["memory_mb"], 256);
    assert_eq!(
        cgroup_file(&d, "memory", &u2, "memory.limit_in_bytes").as_deref(),
        Some((256u64 << 20).to_string().as_str())
    );
    d.exec("f2", "rm -rf /dev/shm/x");
    assert_eq!(d.show("f1")["flavor"]["vcpus"], 1);

    // A stopped instance's disk grows offline, seen at the next boot.
    d.ok(&["stop", "f2"]);
    d.ok(&["resize", "f2", "--disk", "3", "--vcpus", "1"]);
    d.ok(&["start", "f2"]);
    assert_eq!(df_gb(&d, "f2"), 3.0, "df after an offline grow to 3G");
    assert_eq!(d.exec("f2", "nproc").trim(), "1");
    wait_for(10, "cpuset after start", || {
        cgroup_file(&d, "cpuset", &u2, "cpuset.cpus")
            .map(|c| driver::cgroups::parse_cpus(&c).map(|v| v.len()) == Some(1))
            .unwrap_or(true)
            .then_some(())
    });
    // A grow left for the next boot happens then.
    d.ok(&["stop", "f1"]);
    d.ok(&["start", "f1"]);
    assert_eq!(
        df_gb(&d, "f1"),
        2.0,
        "df after the boot that follows a grow"
    );
    d.ok(&["delete", "f1"]);
    d.ok(&["delete", "f2"]);
}

/// Size of / inside in GiB, rounded (ext4 metadata takes a few percent).
fn df_gb(d: &Daemon, id: &str) -> f64 {
    let kb: f64 = d
        .exec(id, "df -k --output=size / | tail -1")
        .trim()
        .parse()
        .expect("df");
    (kb / (1u64 << 20) as f64).round()
}

fn has_cap_sys_resource() -> bool {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0)
}
