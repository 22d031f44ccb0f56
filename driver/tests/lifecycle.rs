//! The whole life of instances of the fixture image through the CLI and API, asserted from
//! outside (state, processes, mounts, cgroups) and inside (systemd, sshd, df, hostname).

mod common;
use common::Daemon;
use std::time::{Duration, Instant};

fn mounts_under(p: &std::path::Path) -> usize {
    let m = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = p.to_string_lossy();
    m.lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|mp| mp.starts_with(p.as_ref()))
        })
        .count()
}

fn loops_of(p: &std::path::Path) -> usize {
    let out = std::process::Command::new("losetup")
        .arg("-a")
        .output()
        .expect("losetup");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(p.to_string_lossy().as_ref()))
        .count()
}

fn cgroups_of(parent: &str) -> usize {
    std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|c| std::fs::read_dir(c.path().join(parent)).ok())
        .flat_map(|rd| rd.flatten())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .count()
}

fn init_pid(d: &Daemon, id: &str) -> i64 {
    d.show(id)["init_pid"].as_i64().expect("init pid")
}

#[test]
fn lifecycle() {
    let mut d = Daemon::start();
    d.import_fixture("deb");

    // Bad input: clear API errors, nothing created.
    for (args, want) in [
        (
            vec![
                "--image", "nope", "--name", "x1", "--vcpus", "1", "--memory", "256", "--disk", "1",
            ],
            "not found",
        ),
        (
            vec![
                "--image", "deb", "--name", "x2", "--vcpus", "0", "--memory", "256", "--disk", "1",
            ],
            "vcpus",
        ),
        (
            vec![
                "--image",
                "deb",
                "--name",
                "x3",
                "--vcpus",
                "1",
                "--memory",
                "99999999999",
                "--disk",
                "1",
            ],
            "memory",
        ),
        (
            vec![
                "--image", "deb", "--name", "a/b", "--vcpus", "1", "--memory", "256", "--disk", "1",
            ],
            "name",
        ),
    ] {
        let mut a = vec!["run"];
        a.extend(args);
        let o = d.fatbox(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{a:?}: {err}");
    }
    assert_eq!(d.ok(&["list", "--json"]).trim(), "[]");

    let key = d.dir.path().join("key.pub");
    std::fs::write(
        &key,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests test@fatbox\n",
    )
    .expect("key");
    let t = Instant::now();
    let u1 = d
        .ok(&[
            "run",
            "--image",
            "deb",
            "--name",
            "vm-one",
            "--vcpus",
            "2",
            "--memory",
            "512",
            "--disk",
            "3",
            "--ssh-key",
            key.to_str().expect("key"),
        ])
        .trim()
        .to_string();
    eprintln!("first boot (cold disk): {:?}", t.elapsed());
    let v = d.show(&u1);
    assert_eq!(v["state"], "running");
    assert_eq!(v["power_state"], 1);
    assert_eq!(v["nics"], serde_json::json!([]));
    assert_eq!(v["flavor"]["vcpus"], 2);

    // Inside: systemd running with no failed unit, sshd listening, identity, disk size.
    assert_eq!(
        d.ok(&["exec", "vm-one", "--", "systemctl", "is-system-running"])
            .trim(),
        "running"
    );
    assert_eq!(
        d.exec("vm-one", "systemctl --failed --no-legend | wc -l")
            .trim(),
        "0"
    );
    assert!(
        d.exec("vm-one", "ss -ltn").contains(":22 "),
        "sshd not listening"
    );
    assert_eq!(d.exec("vm-one", "hostname").trim(), "vm-one");
    assert!(d
        .exec("vm-one", "cat /root/.ssh/authorized_keys")
        .contains("test@fatbox"));
    let df = d.exec("vm-one", "df -BG --output=size / | tail -1");
    let size: f64 = df.trim().trim_end_matches('G').parse().expect("df size");
    assert!(
        (size - 3.0).abs() <= 0.15 * 3.0,
        "df says {size}G for a 3G disk"
    );
    assert_eq!(
        d.exec("vm-one", "cat /run/systemd/container").trim(),
        "fatbox"
    );
    let rc = d.fatbox(&["exec", "vm-one", "--", "sh", "-c", "exit 7"]);
    assert_eq!(rc.status.code(), Some(7));

    // Outside: cgroup limits from the flavor.
    let cg = format!(
        "/sys/fs/cgroup/memory/{}/{u1}/memory.limit_in_bytes",
        d.cgroup_parent()
    );
    if let Ok(m) = std::fs::read_to_string(&cg) {
        assert_eq!(m.trim(), (512u64 << 20).to_string());
        let q = std::fs::read_to_string(format!(
            "/sys/fs/cgroup/cpu/{}/{u1}/cpu.cfs_quota_us",
            d.cgroup_parent()
        ))
        .expect("quota");
        assert_eq!(q.trim(), "200000");
    }

    // A second instance of the same image has its own machine-id.
    let t = Instant::now();
    d.ok(&[
        "run", "--image", "deb", "--name", "vm-two", "--vcpus", "1", "--memory", "256", "--disk",
        "1",
    ]);
    eprintln!("second boot: {:?}", t.elapsed());
    let m1 = d.exec("vm-one", "cat /etc/machine-id");
    let m2 = d.exec("vm-two", "cat /etc/machine-id");
    assert_eq!(m1.trim().len(), 32);
    assert_ne!(m1, m2);
    let dup = d.fatbox(&[
        "run", "--image", "deb", "--name", "vm-three", "--vcpus", "1", "--memory", "256", "--disk",
        "1", "--uuid", &u1,
    ]);
    assert!(
        String::from_utf8_lossy(&dup.stderr).contains("exists"),
        "duplicate uuid accepted"
    );
    let dupname = d.fatbox(&[
        "run", "--image", "deb", "--name", "vm-two", "--vcpus", "1", "--memory", "256", "--disk",
        "1",
    ]);
    assert!(!dupname.status.success());

    // stop/start keeps the disk's files; stop releases mounts.
    d.exec("vm-one", "echo kept > /root/file");
    let pid = init_pid(&d, "vm-one");
    assert_eq!(d.ok(&["stop", "vm-one"]).trim(), "shutoff");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "init survived stop"
    );
    assert_eq!(d.show("vm-one")["power_state"], 4);
    d.ok(&["start", "vm-one"]);
    assert_eq!(d.exec("vm-one", "cat /root/file").trim(), "kept");

    // Soft reboot: new init, uptime of systemd reset, file kept.
    let before = init_pid(&d, "vm-one");
    d.ok(&["reboot", "vm-one"]);
    assert_ne!(init_pid(&d, "vm-one"), before);
    assert_eq!(d.exec("vm-one", "cat /root/file").trim(), "kept");
    assert_eq!(
        d.ok(&["exec", "vm-one", "--", "systemctl", "is-system-running"])
            .trim(),
        "running"
    );

    // Pause freezes every process; resume thaws.
    d.ok(&["pause", "vm-one"]);
    assert_eq!(d.show("vm-one")["power_state"], 3);
    if let Ok(s) = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/freezer/{}/{u1}/freezer.state",
        d.cgroup_parent()
    )) {
        assert_eq!(s.trim(), "FROZEN");
    }
    d.ok(&["resume", "vm-one"]);
    assert_eq!(d.exec("vm-one", "echo alive").trim(), "alive");

    // Live-restore: kill -9 fatboxd; instances keep running with the same init.
    let pids: Vec<i64> = ["vm-one", "vm-two"]
        .iter()
        .map(|n| init_pid(&d, n))
        .collect();
    for _ in 0..3 {
        d.kill9();
        for p in &pids {
            assert!(std::path::Path::new(&format!("/proc/{p}")).exists());
        }
        d.spawn();
        let after: Vec<i64> = ["vm-one", "vm-two"]
            .iter()
            .map(|n| init_pid(&d, n))
            .collect();
        assert_eq!(after, pids);
        assert_eq!(d.show("vm-two")["state"], "running");
    }
    assert_eq!(
        d.exec("vm-two", "systemctl is-system-running").trim(),
        "running"
    );

    // A guest powering itself off is noticed.
    let _ = d.fatbox(&["exec", "vm-two", "--", "systemctl", "poweroff"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.show("vm-two")["state"] != "shutoff" {
        assert!(
            Instant::now() < deadline,
            "poweroff from inside not noticed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Delete leaves nothing behind.
    let console = d.ok(&["console", "vm-one", "--log"]);
    assert!(console.contains("Welcome to"), "console log: {console}");
    d.ok(&["delete", "vm-one"]);
    d.ok(&["delete", "vm-two"]);
    let state = d.state_dir();
    assert_eq!(mounts_under(&state), 0, "mounts left");
    assert_eq!(loops_of(&state), 0, "loop devices left");
    assert_eq!(cgroups_of(&d.cgroup_parent()), 0, "cgroups left");
    assert_eq!(
        std::fs::read_dir(state.join("instances"))
            .expect("dir")
            .count(),
        0,
        "files left"
    );
    for p in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists(),
            "process {p} left"
        );
    }
}
