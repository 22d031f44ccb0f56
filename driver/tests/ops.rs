//! rebuild, rescue/unrescue, suspend/resume, reboot and exec with a pty, each asserted from
//! outside (state, power_state, pids, cgroup values) and inside (files, uptime, tty).

mod common;
use common::{cgroup_file, wait_for, Daemon, Procfs};

fn uptime(d: &Daemon, id: &str) -> f64 {
    d.exec(id, "cut -d' ' -f1 /proc/uptime")
        .trim()
        .parse()
        .expect("uptime")
}

fn init_pid(d: &Daemon, id: &str) -> i64 {
    d.show(id)["init_pid"].as_i64().expect("init pid")
}

#[test]
fn rebuild_rescue_suspend_reboot_exec() {
    let p = Procfs::start();
    let d = Daemon::start_with_procfs(&p);
    let qcow = common::fixtures().join("v3.qcow2");
    d.ok(&[
        "image",
        "import",
        qcow.to_str().expect("path"),
        "--name",
        "deb",
    ]);
    d.ok(&[
        "image",
        "import",
        qcow.to_str().expect("path"),
        "--name",
        "deb-b",
    ]);
    let uuid = d
        .ok(&[
            "run", "--image", "deb", "--name", "o1", "--vcpus", "1", "--memory", "256", "--disk",
            "1",
        ])
        .trim()
        .to_string();
    let machine_id = d.exec("o1", "cat /etc/machine-id");

    // Files survive stop/start and reboot; reboot resets uptime (fatbox-procfs' view).
    d.exec("o1", "echo before > /root/marker");
    d.ok(&["stop", "o1"]);
    d.ok(&["start", "o1"]);
    assert_eq!(d.exec("o1", "cat /root/marker").trim(), "before");
    let up = wait_for(30, "uptime above 3 s", || {
        let u = uptime(&d, "o1");
        (u >= 3.0).then_some(u)
    });
    let pid = init_pid(&d, "o1");
    d.ok(&["reboot", "o1"]);
    assert_ne!(init_pid(&d, "o1"), pid);
    let after = uptime(&d, "o1");
    assert!(after < up, "uptime {after} after reboot, {up} before");
    assert_eq!(d.exec("o1", "cat /root/marker").trim(), "before");
    let pid = init_pid(&d, "o1");
    d.ok(&["reboot", "--hard", "o1"]);
    assert_ne!(init_pid(&d, "o1"), pid);
    assert_eq!(d.exec("o1", "cat /root/marker").trim(), "before");

    // exec: exit codes, no tty by default when piped, a pty of the instance with -t.
    assert_eq!(
        d.fatbox(&["exec", "o1", "--", "sh", "-c", "exit 5"])
            .status
            .code(),
        Some(5)
    );
    let o = d.fatbox(&[
        "exec",
        "o1",
        "--",
        "sh",
        "-c",
        "test -t 0 && echo tty || echo notty",
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "notty");
    let o = d.fatbox(&[
        "exec",
        "-t",
        "o1",
        "--",
        "sh",
        "-c",
        "tty; test -t 1 && echo tty; ls -l $(tty) >/dev/null && echo exists; exit 3",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(3), "{out}");
    assert!(out.contains("/dev/pts/"), "{out}");
    assert!(out.contains("tty\r\n") && out.contains("exists"), "{out}");
    // The pty belongs to the instance's devpts: no host pty appears for it.
    let o = d.fatbox(&["exec", "-t", "o1", "--", "sh", "-c", "stty size"]);
    assert!(o.status.success(), "stty on the pty: {o:?}");

    // Suspend: frozen, state and power_state; resume thaws. Resume also ends a pause.
    let v: serde_json::Value =
        serde_json::from_str(&d.ok(&["show", "o1", "--json"])).expect("json");
    assert_eq!(v["state"], "running");
    assert_eq!(d.ok(&["suspend", "o1"]).trim(), "suspended");
    let v = d.show("o1");
    assert_eq!(
        (v["state"].as_str(), v["power_state"].as_i64()),
        (Some("suspended"), Some(7))
    );
    if let Some(s) = cgroup_file(&d, "freezer", &uuid, "freezer.state") {
        assert!(s == "FROZEN" || s == "FREEZING", "freezer {s}");
    }
    let o = d.fatbox(&["exec", "o1", "--", "true"]);
    assert!(!o.status.success(), "exec into a suspended instance");
    assert_eq!(d.ok(&["resume", "o1"]).trim(), "running");
    assert_eq!(
        cgroup_file(&d, "freezer", &uuid, "freezer.state")
            .as_deref()
            .unwrap_or("THAWED"),
        "THAWED"
    );
    assert_eq!(d.exec("o1", "echo alive").trim(), "alive");
    d.ok(&["pause", "o1"]);
    assert_eq!(d.ok(&["resume", "o1"]).trim(), "running");
    // Live-restore keeps a suspended instance suspended.
    d.ok(&["suspend", "o1"]);
    let mut d = d;
    d.kill9();
    d.spawn();
    assert_eq!(d.show("o1")["state"], "suspended");
    d.ok(&["resume", "o1"]);

    // Rescue: the rescue system runs with the instance's root at /mnt/rescue, writable.
    let pid = init_pid(&d, "o1");
    assert_eq!(
        d.ok(&["rescue", "o1", "--image", "deb-b"]).trim(),
        "rescued"
    );
    let v = d.show("o1");
    assert_eq!(v["state"], "rescued");
    assert_eq!(v["rescue_image"], "deb-b");
    assert_ne!(v["init_pid"].as_i64(), Some(pid));
    assert_eq!(d.exec("o1", "cat /mnt/rescue/root/marker").trim(), "before");
    assert!(d
        .exec("o1", "test -e /root/marker && echo yes || echo no")
        .contains("no"));
    d.exec(
        "o1",
        "echo fixed > /mnt/rescue/root/fixed; echo junk > /root/rescue-only",
    );
    let dir = d.state_dir().join("instances").join(&uuid);
    assert!(dir.join("rescue.img").exists());
    assert_eq!(d.ok(&["unrescue", "o1"]).trim(), "running");
    assert!(!dir.join("rescue.img").exists(), "rescue disk left");
    assert!(!dir.join("rescue-root").exists(), "rescue mount point left");
    assert_eq!(d.exec("o1", "cat /root/fixed").trim(), "fixed");
    assert!(d
        .exec("o1", "test -e /root/rescue-only && echo yes || echo no")
        .contains("no"));
    let o = d.fatbox(&["unrescue", "o1"]);
    assert!(!o.status.success(), "unrescue of a running instance");

    // Rebuild: same identity, new image, the disk recreated (files gone).
    let o = d.fatbox(&["rebuild", "o1", "--image", "nope"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not found"));
    assert_eq!(
        d.show("o1")["state"],
        "running",
        "a refused rebuild touched the instance"
    );
    assert_eq!(
        d.ok(&["rebuild", "o1", "--image", "deb-b"]).trim(),
        "running"
    );
    let v = d.show("o1");
    assert_eq!(
        (v["uuid"].as_str(), v["name"].as_str(), v["image"].as_str()),
        (Some(uuid.as_str()), Some("o1"), Some("deb-b"))
    );
    assert!(d
        .exec("o1", "test -e /root/marker && echo yes || echo no")
        .contains("no"));
    assert_eq!(d.exec("o1", "hostname").trim(), "o1");
    assert_eq!(d.exec("o1", "cat /etc/machine-id"), machine_id);
    assert_eq!(
        d.exec("o1", "systemctl is-system-running").trim(),
        "running"
    );
    d.ok(&["delete", "o1"]);
    assert!(!dir.exists());
}
