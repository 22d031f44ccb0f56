//! Snapshots back to Glance, end to end: boot the fixture from a real Glance (PyPI), change
//! files inside, snapshot while it runs (same init after, still answering), boot the
//! snapshot on a second daemon with an empty cache (changes there, deletion kept, owners as
//! the guest set them), fetch it where the parent is cached (one download), snapshot a
//! shut-off instance, and the errors. Root (instances, overlay, cgroups).

mod common;
#[path = "../../image-bridge/tests/common/mod.rs"]
mod glance_harness;

use common::Daemon;
use serde_json::Value;

fn log_count(d: &Daemon, needle: &str) -> usize {
    std::fs::read_to_string(d.dir.path().join("fatboxd.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[test]
fn snapshot_running_and_shutoff_instances_and_boot_them_elsewhere() {
    glance_harness::require_root();
    let g = glance_harness::Glance::start();
    let qcow = common::fixtures().join("v3.qcow2");
    let base = g.upload_with_curl(&qcow, "debian-12-fixture", "qcow2");
    std::env::set_var("FATBOX_GLANCE__ENDPOINT", &g.endpoint);
    let d1 = Daemon::start();
    let uuid = d1
        .ok(&[
            "run", "--image", &base, "--name", "snap-src", "--vcpus", "1", "--memory", "512",
            "--disk", "2",
        ])
        .trim()
        .to_string();

    // Changes: a new file, a file owned by guest uid 1000, an image file deleted.
    d1.exec(&uuid, "test -f /etc/motd");
    d1.exec(
        &uuid,
        "echo snapshot-payload > /root/snap-file && mkdir -p /home/u && echo u > /home/u/f && \
         chown -R 1000:1000 /home/u && rm /etc/motd && sync",
    );
    let before = d1.show(&uuid);
    let pid = before["init_pid"].as_i64().expect("init pid");

    let out = d1.ok(&["snapshot", "snap-src", "--image-name", "snap-1", "--json"]);
    let snap: Value = serde_json::from_str(&out).expect("snapshot --json");
    let snap_id = snap["image_id"].as_str().expect("image_id").to_string();
    eprintln!("snapshot of a running instance: {snap}");
    assert_eq!(snap["parent"], base.as_str());
    assert!(snap["layer_digest"]
        .as_str()
        .is_some_and(|s| s.starts_with("sha256:")));
    let size = snap["layer_size"].as_u64().expect("size");
    assert!(
        size < 8 << 20,
        "uploaded {size} bytes: the change, not the image"
    );
    assert!(
        snap["skipped"]
            .as_array()
            .expect("skipped")
            .iter()
            .any(|s| s == "etc/hostname"),
        "{snap}"
    );
    // Same init, still running, still answering.
    let after = d1.show(&uuid);
    assert_eq!(after["state"], "running");
    assert_eq!(after["init_pid"].as_i64(), Some(pid), "init replaced");
    assert_eq!(d1.exec(&uuid, "echo alive").trim(), "alive");
    let frozen = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/freezer/{}/{uuid}/freezer.state",
        d1.cgroup_parent()
    ))
    .unwrap_or_else(|_| "THAWED".into());
    assert_eq!(frozen.trim(), "THAWED");

    // Paused: snapshotted as it is, and still paused (frozen) after.
    d1.ok(&["pause", &uuid]);
    let sp: Value = serde_json::from_str(&d1.ok(&["snapshot", &uuid, "--json"])).expect("json");
    assert_eq!(sp["frozen_ms"], 0, "{sp}");
    assert_eq!(d1.show(&uuid)["state"], "paused");
    let state = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/freezer/{}/{uuid}/freezer.state",
        d1.cgroup_parent()
    ))
    .unwrap_or_else(|_| "FROZEN".into());
    assert_eq!(state.trim(), "FROZEN", "a paused instance stays frozen");
    d1.ok(&["resume", &uuid]);
    assert_eq!(d1.exec(&uuid, "echo alive").trim(), "alive");

    // This host has the parent: fetching the snapshot downloads only its layer.
    let downloads = log_count(&d1, "downloaded");
    let converted = log_count(&d1, "converted");
    let pulled: Value =
        serde_json::from_str(&d1.ok(&["image", "pull", &snap_id, "--json"])).expect("pull");
    assert_eq!(pulled["state"], "done");
    assert_eq!(log_count(&d1, "downloaded") - downloads, 1, "one layer");
    assert_eq!(log_count(&d1, "converted"), converted, "no conversion");

    // A second host with an empty cache boots the snapshot: it fetches the parent too.
    let d2 = Daemon::start();
    let c1 = d2
        .ok(&[
            "run",
            "--image",
            &snap_id,
            "--name",
            "snap-copy",
            "--vcpus",
            "1",
            "--memory",
            "512",
            "--disk",
            "2",
        ])
        .trim()
        .to_string();
    assert_eq!(d2.show(&c1)["state"], "running");
    assert_eq!(log_count(&d2, "downloaded"), 2, "parent + snapshot layer");
    assert_eq!(
        d2.exec(&c1, "cat /root/snap-file").trim(),
        "snapshot-payload"
    );
    assert_eq!(
        d2.exec(&c1, "test -e /etc/motd && echo present || echo absent")
            .trim(),
        "absent"
    );
    assert_eq!(
        d2.exec(&c1, "stat -c %u:%g /home/u /home/u/f").trim(),
        "1000:1000\n1000:1000"
    );
    assert_eq!(d2.exec(&c1, "cat /etc/hostname").trim(), "snap-copy");
    let state = d2.exec(&c1, "systemctl is-system-running || true");
    assert!(
        matches!(state.trim(), "running" | "degraded"),
        "systemd says {state}"
    );

    // A shut-off instance: its disk is read without booting it, and it starts again after.
    d1.exec(&uuid, "echo second > /root/snap-file2 && sync");
    d1.ok(&["stop", &uuid]);
    let s2: Value = serde_json::from_str(&d1.ok(&["snapshot", &uuid, "--json"])).expect("json");
    assert_ne!(s2["image_id"], snap["image_id"]);
    assert_eq!(d1.show(&uuid)["state"], "shutoff");
    d1.ok(&["start", &uuid]);
    assert_eq!(d1.show(&uuid)["state"], "running");
    let s2_id = s2["image_id"].as_str().expect("id");
    let c2 = d2
        .ok(&[
            "run",
            "--image",
            s2_id,
            "--name",
            "snap-copy2",
            "--vcpus",
            "1",
            "--memory",
            "256",
            "--disk",
            "2",
        ])
        .trim()
        .to_string();
    assert_eq!(
        d2.exec(&c2, "cat /root/snap-file /root/snap-file2").trim(),
        "snapshot-payload\nsecond"
    );
    assert_eq!(log_count(&d2, "downloaded"), 3, "only the new layer");

    // Errors: unknown instance → 404; an instance of a local image → 409.
    let o = d1.fatbox(&["snapshot", "no-such-instance"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("404"), "{err}");

    d1.import_fixture("local-img");
    let loc = d1
        .ok(&[
            "run",
            "--image",
            "local-img",
            "--name",
            "loc",
            "--vcpus",
            "1",
            "--memory",
            "256",
            "--disk",
            "1",
            "--no-wait",
        ])
        .trim()
        .to_string();
    let o = d1.fatbox(&["snapshot", "loc"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("409") && err.contains("Glance-backed"),
        "{err}"
    );
    d1.ok(&["delete", &loc]);

    d2.ok(&["delete", &c2]);
    d2.ok(&["delete", &c1]);
    d1.ok(&["delete", &uuid]);
}

/// Bench (bench/snapshot/run.sh): a 10 MiB change on the fixture image, snapshotted while
/// running: wall time, bytes uploaded, time frozen; the anchor is uploading the whole image
/// (what a VM snapshot sends). Prints `BENCH key=value` lines.
#[test]
#[ignore = "bench: bash bench/snapshot/run.sh"]
fn bench_snapshot_10mib_change() {
    glance_harness::require_root();
    let g = glance_harness::Glance::start();
    let qcow = common::fixtures().join("v3.qcow2");
    let t = std::time::Instant::now();
    let base = g.upload_with_curl(&qcow, "debian-12-fixture", "qcow2");
    let full_s = t.elapsed().as_secs_f64();
    let full_bytes = std::fs::metadata(&qcow).expect("fixture").len();
    std::env::set_var("FATBOX_GLANCE__ENDPOINT", &g.endpoint);
    let d = Daemon::start();
    let uuid = d
        .ok(&[
            "run",
            "--image",
            &base,
            "--name",
            "bench-snap",
            "--vcpus",
            "1",
            "--memory",
            "512",
            "--disk",
            "2",
        ])
        .trim()
        .to_string();
    d.exec(
        &uuid,
        "head -c 10485760 /dev/urandom > /root/ten-mib && sync",
    );
    let t = std::time::Instant::now();
    let v: Value =
        serde_json::from_str(&d.ok(&["snapshot", &uuid, "--json"])).expect("snapshot --json");
    let wall = t.elapsed().as_secs_f64();
    let id = v["image_id"].as_str().expect("id").to_string();
    let t = std::time::Instant::now();
    d.ok(&["image", "pull", &id, "--json"]);
    let pull = t.elapsed().as_secs_f64();
    println!("BENCH full_upload_s={full_s:.3}");
    println!("BENCH full_upload_mib={:.2}", full_bytes as f64 / 1048576.0);
    println!("BENCH snapshot_s={wall:.3}");
    println!(
        "BENCH uploaded_mib={:.2}",
        v["layer_size"].as_f64().unwrap_or(0.0) / 1048576.0
    );
    println!("BENCH frozen_ms={}", v["frozen_ms"]);
    println!("BENCH freeze_wait_ms={}", v["freeze_wait_ms"]);
    println!("BENCH pull_parent_cached_s={pull:.3}");
    d.ok(&["delete", &uuid]);
}
