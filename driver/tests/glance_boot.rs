//! Boot from Glance: a real Glance (PyPI) holds the fixture qcow2; `fatbox run --image
//! GLANCE_ID` fetches, verifies, converts and pins it, the instance reaches `running`, and
//! `fatbox image pull/list/fsck` see the cache. Root (instances, overlay, cgroups).

mod common;
#[path = "../../image-bridge/tests/common/mod.rs"]
mod glance_harness;

use common::Daemon;
use std::time::{Duration, Instant};

#[test]
fn boot_from_glance_image() {
    glance_harness::require_root();
    let g = glance_harness::Glance::start();
    let qcow = common::fixtures().join("v3.qcow2");
    let id = g.upload_with_curl(&qcow, "debian-12-fixture", "qcow2");
    // fatboxd (a child) and this process's Drop cleanup read the same override.
    std::env::set_var("FATBOX_GLANCE__ENDPOINT", &g.endpoint);
    let d = Daemon::start();

    // Cold: the build downloads and converts.
    let t = Instant::now();
    let uuid = d.ok(&[
        "run", "--image", &id, "--name", "g1", "--vcpus", "1", "--memory", "512", "--disk", "2",
    ]);
    let uuid = uuid.trim().to_string();
    eprintln!("cold run from Glance: {:?}", t.elapsed());
    let v = d.show(&uuid);
    assert_eq!(v["state"], "running");
    let os = d.exec(&uuid, "cat /etc/os-release");
    assert!(os.contains("ID=debian"), "{os}");
    let state = d.exec(&uuid, "systemctl is-system-running || true");
    assert!(
        state.trim() == "running" || state.trim() == "degraded",
        "systemd says {state}"
    );
    let pins = d.state_dir().join("glance/pins");
    assert!(
        pins.join(format!("{uuid}.json")).is_file(),
        "instance pins its layers"
    );

    // Warm: pull answers from the cache.
    let t = Instant::now();
    let out = d.ok(&["image", "pull", &id, "--json"]);
    let warm = t.elapsed();
    let v: serde_json::Value = serde_json::from_str(&out).expect("pull --json");
    assert_eq!(v["state"], "done");
    assert_eq!(v["image"]["layers"].as_array().map(Vec::len), Some(2));
    assert!(warm < Duration::from_secs(5), "warm pull took {warm:?}");

    let list: serde_json::Value =
        serde_json::from_str(&d.ok(&["image", "list", "--json"])).expect("list --json");
    assert!(
        list.as_array()
            .expect("array")
            .iter()
            .any(|i| i["name"] == id.as_str() && i["source"] == "glance"),
        "{list}"
    );
    let fsck = d.fatbox(&["image", "fsck"]);
    assert!(
        fsck.status.success(),
        "fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    // A second instance of the same image: no new download (the cache is warm).
    let t = Instant::now();
    let u2 = d.ok(&[
        "run", "--image", &id, "--name", "g2", "--vcpus", "1", "--memory", "256", "--disk", "1",
    ]);
    eprintln!("warm run from Glance: {:?}", t.elapsed());
    d.ok(&["delete", u2.trim()]);
    assert!(
        !pins.join(format!("{}.json", u2.trim())).exists(),
        "delete unpins"
    );

    // A Glance id that does not exist: a clear error, the instance goes to error.
    let bogus = "00000000-0000-4000-8000-000000000000";
    let o = d.fatbox(&[
        "run", "--image", bogus, "--name", "g3", "--vcpus", "1", "--memory", "256", "--disk", "1",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not found"), "{err}");
    d.ok(&["delete", "g3"]);
    d.ok(&["delete", &uuid]);
}
