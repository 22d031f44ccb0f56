//! Bad input and broken guests: clear API errors or ERROR with a reason, and the host and
//! the other instances untouched.

mod common;
use common::Daemon;

fn fails_with(d: &Daemon, args: &[&str], want: &str) {
    let o = d.fatbox(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
}

fn host_avail(p: &std::path::Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).expect("statvfs");
    s.blocks_available() * s.fragment_size()
}

#[test]
fn bad_requests_broken_guests_and_a_full_disk() {
    let d = Daemon::start();
    d.import_fixture("deb");
    let run = |name: &str, extra: &[&str]| {
        let mut a = vec![
            "run", "--image", "deb", "--name", name, "--vcpus", "1", "--memory", "256", "--disk",
            "1",
        ];
        a.extend_from_slice(extra);
        d.fatbox(&a)
    };
    let ok = run("good", &[]);
    assert!(ok.status.success(), "{ok:?}");
    let good_pid = d.show("good")["init_pid"].as_i64().expect("pid");

    // Requests refused before anything is made.
    let base = [
        "run", "--image", "deb", "--vcpus", "1", "--memory", "256", "--disk", "1",
    ];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        a
    }
    fails_with(&d, &with(&base, &["--name", "a/b"]), "name");
    fails_with(&d, &with(&base, &["--name", "../x"]), "name");
    fails_with(&d, &with(&base, &["--name", "good"]), "taken");
    let good_uuid = d.show("good")["uuid"].as_str().expect("uuid").to_string();
    fails_with(
        &d,
        &with(&base, &["--name", "other", "--uuid", &good_uuid]),
        "exists",
    );
    fails_with(
        &d,
        &with(&base, &["--name", "other", "--uuid", "not-a-uuid"]),
        "uuid",
    );
    fails_with(
        &d,
        &[
            "run", "--image", "nope", "--name", "x", "--vcpus", "1", "--memory", "256", "--disk",
            "1",
        ],
        "not found",
    );
    fails_with(
        &d,
        &[
            "run", "--image", "deb", "--name", "x", "--vcpus", "0", "--memory", "256", "--disk",
            "1",
        ],
        "vcpus",
    );
    fails_with(
        &d,
        &[
            "run",
            "--image",
            "deb",
            "--name",
            "x",
            "--vcpus",
            "1",
            "--memory",
            "99999999999",
            "--disk",
            "1",
        ],
        "memory",
    );
    fails_with(
        &d,
        &[
            "run", "--image", "deb", "--name", "x", "--vcpus", "1", "--memory", "256", "--disk",
            "0",
        ],
        "root_gb",
    );
    fails_with(&d, &["resize", "good", "--vcpus", "0"], "vcpus");
    fails_with(&d, &["rescue", "good", "--image", "nope"], "not found");
    fails_with(&d, &["resume", "good-not-there"], "not found");
    let names: Vec<String> = serde_json::from_str::<serde_json::Value>(&d.ok(&["list", "--json"]))
        .expect("json")
        .as_array()
        .expect("array")
        .iter()
        .map(|i| i["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(names, ["good"]);

    // A guest whose /sbin/init is gone: ERROR with the reason, and rescue repairs it.
    assert!(run("noinit", &[]).status.success());
    d.exec("noinit", "rm /sbin/init");
    d.ok(&["stop", "noinit"]);
    fails_with(&d, &["start", "noinit"], "sbin/init");
    let v = d.show("noinit");
    assert_eq!(v["state"], "error");
    assert_eq!(v["power_state"], 6);
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("/sbin/init"),
        "{v}"
    );
    assert!(v["init_pid"].is_null());
    assert_eq!(d.ok(&["rescue", "noinit"]).trim(), "rescued");
    d.exec("noinit", "ln -s /lib/systemd/systemd /mnt/rescue/sbin/init");
    assert_eq!(d.ok(&["unrescue", "noinit"]).trim(), "running");

    // An init that exits at once: ERROR with its exit status.
    d.exec(
        "noinit",
        "rm /sbin/init && printf '#!/bin/sh\\nexit 3\\n' > /sbin/init && chmod 755 /sbin/init",
    );
    d.ok(&["stop", "noinit"]);
    fails_with(&d, &["start", "noinit"], "boot failed");
    let v = d.show("noinit");
    assert_eq!(v["state"], "error");
    assert!(
        v["reason"].as_str().unwrap_or_default().contains(", 3)"),
        "{v}"
    );

    // Disk full inside: the instance's disk fills, the host's does not, the guest answers.
    let state = d.state_dir();
    let o = d.fatbox(&[
        "exec",
        "good",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/root/fill bs=1M 2>&1; sync",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("No space left"), "dd: {out}");
    let used = d.exec("good", "df --output=pcent / | tail -1");
    assert_eq!(used.trim(), "100%");
    // What the instance can take from the host is its sparse disk file, capped at root_gb
    // (the host's free space is not compared: other jobs share this filesystem).
    use std::os::unix::fs::MetadataExt;
    let img = state.join("instances").join(&good_uuid).join("disk.img");
    let allocated = std::fs::metadata(&img).expect("disk.img").blocks() * 512;
    assert!(
        allocated <= (1u64 << 30) + (16 << 20),
        "disk.img holds {allocated} bytes"
    );
    assert!(
        allocated >= 900 << 20,
        "disk.img holds only {allocated} bytes after a full disk"
    );
    let after = host_avail(&state);
    assert!(after > 0);
    assert_eq!(d.exec("good", "echo still here").trim(), "still here");
    let st = d.exec("good", "systemctl is-system-running || true");
    assert!(st.trim() == "running" || st.trim() == "degraded", "{st}");
    d.exec("good", "rm /root/fill");
    assert_eq!(
        d.show("good")["init_pid"].as_i64(),
        Some(good_pid),
        "other failures touched a good instance"
    );
    d.ok(&["delete", "noinit"]);
    d.ok(&["delete", "good"]);
}
