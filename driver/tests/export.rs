//! `fatbox image export INSTANCE --qcow2 OUT`: a booted fixture instance with a file written
//! inside becomes a flat qcow2 (GPT + ext4) that qemu-img checks, fatbox-img reads (the file,
//! the restored kernel, fstab by the new UUID), the real Glance accepts as qcow2, and that
//! imports and boots again. Root (instances, overlay, cgroups, loop devices).

mod common;
#[path = "../../image-bridge/tests/common/mod.rs"]
mod glance_harness;

use common::Daemon;
use guestfs_tools::block::OpenOptions;
use guestfs_tools::guest::Guest;
use std::process::Command;
use std::time::Instant;

fn qemu_info(p: &std::path::Path) -> serde_json::Value {
    let o = Command::new("qemu-img")
        .args(["info", "--output", "json"])
        .arg(p)
        .output()
        .expect("qemu-img info");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("qemu-img info json")
}

fn read(g: &Guest, path: &str) -> Option<String> {
    g.read_file(path.as_bytes())
        .expect("read")
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

#[test]
fn export_booted_instance_then_glance_import_and_boot() {
    glance_harness::require_root();
    let d = Daemon::start();
    d.import_fixture("deb");
    let uuid = d
        .ok(&[
            "run", "--image", "deb", "--name", "ex1", "--vcpus", "1", "--memory", "512", "--disk",
            "2",
        ])
        .trim()
        .to_string();
    assert_eq!(d.show(&uuid)["state"], "running");
    // A file, a file of a non-root guest user (owners must come back unshifted), a deletion
    // (a whiteout in the upper dir).
    d.exec(
        &uuid,
        "echo export-marker-42 > /root/exported.txt && echo u > /root/owned.txt && \
         chown 1000:1000 /root/owned.txt && rm /etc/issue.net && sync",
    );

    let outdir = tempfile::tempdir().expect("tmp");
    let out = outdir.path().join("ex1.qcow2");
    let t = Instant::now();
    let rep: serde_json::Value = serde_json::from_str(&d.ok(&[
        "image",
        "export",
        &uuid,
        "--qcow2",
        out.to_str().expect("path"),
        "--json",
    ]))
    .expect("export --json");
    let took = t.elapsed();
    eprintln!(
        "export of the running fixture instance: {took:?}, file {} MiB, virtual {} GiB, \
         frozen {} ms, stage {} ms, mkfs {} ms, qemu-img {} ms",
        rep["file_size"].as_u64().unwrap_or(0) >> 20,
        rep["virtual_size"].as_u64().unwrap_or(0) >> 30,
        rep["frozen_ms"],
        rep["stage_ms"],
        rep["mkfs_ms"],
        rep["convert_ms"]
    );

    // Thawed and still serving; nothing left beside OUT.
    assert_eq!(d.show(&uuid)["state"], "running");
    assert_eq!(d.exec(&uuid, "echo alive").trim(), "alive");
    let left: Vec<String> = std::fs::read_dir(outdir.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["ex1.qcow2".to_string()], "work dir removed");

    // qemu-img: consistent, qcow2 v3, no backing file, no extended L2.
    let chk = Command::new("qemu-img")
        .arg("check")
        .arg(&out)
        .output()
        .expect("qemu-img check");
    assert!(
        chk.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&chk.stdout)
    );
    let info = qemu_info(&out);
    assert_eq!(info["format"], "qcow2", "{info}");
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1", "{info}");
    assert_eq!(
        info["format-specific"]["data"]["extended-l2"], false,
        "{info}"
    );

    // fatbox-img (the library behind inspect/cat) reads it back.
    let fs_uuid = rep["filesystem_uuid"].as_str().expect("uuid").to_string();
    {
        let g = Guest::open(&out, &OpenOptions::default()).expect("open export");
        let insp = guestfs_tools::inspect::inspect(&g).expect("inspect");
        assert_eq!(format!("{:?}", insp.partition_table), "Gpt", "{insp:?}");
        let root = insp
            .filesystems
            .iter()
            .find(|f| f.mountpoint.as_deref() == Some("/"))
            .expect("a root filesystem");
        assert_eq!(root.kind, "ext4");
        assert_eq!(root.uuid.as_deref(), Some(fs_uuid.as_str()));
        assert_eq!(root.start, 1 << 20, "partition 1 MiB aligned");
        assert!(!insp.os.kernels.is_empty(), "kernel restored: {insp:?}");
        let (boot, canon) = g
            .resolve_path(b"/boot", true)
            .expect("resolve")
            .expect("/boot");
        let names: Vec<String> = g
            .list(&boot, &canon)
            .expect("ls /boot")
            .into_iter()
            .map(|(n, _)| String::from_utf8_lossy(&n).into_owned())
            .collect();
        assert!(
            names.iter().any(|n| n.starts_with("vmlinuz-"))
                && names.iter().any(|n| n.starts_with("initrd.img-")),
            "/boot/vmlinuz* and initrd restored: {names:?}"
        );
        assert_eq!(
            read(&g, "/root/exported.txt").as_deref(),
            Some("export-marker-42\n")
        );
        assert!(read(&g, "/etc/issue.net").is_none(), "whiteout applied");
        let owned = g
            .resolve(b"/root/owned.txt", false)
            .expect("resolve")
            .expect("owned.txt");
        assert_eq!(
            (owned.inode.uid, owned.inode.gid),
            (1000, 1000),
            "unshifted"
        );
        let rootdir = g.resolve(b"/root", true).expect("resolve").expect("/root");
        assert_eq!(rootdir.inode.uid, 0, "/root owned by root again");
        let fstab = read(&g, "/etc/fstab").expect("fstab");
        assert!(fstab.contains(&format!("UUID={fs_uuid} / ext4")), "{fstab}");
        assert!(!fstab.contains("# fatbox: block devices"), "{fstab}");
        assert_eq!(read(&g, "/etc/machine-id").as_deref(), Some(""));
        let modules = g.resolve(b"/lib/modules", true).expect("resolve");
        assert!(modules.is_some(), "modules restored");
        // Units the containerize layer masked are not masked on the VM disk.
        let masked = g
            .resolve(b"/etc/systemd/system/systemd-udevd.service", false)
            .expect("resolve");
        assert!(masked.is_none(), "systemd-udevd unmasked");
    }

    // The real Glance accepts it as qcow2.
    let glance = glance_harness::Glance::start();
    let id = glance.upload_with_curl(&out, "exported-ex1", "qcow2");
    let o = Command::new("curl")
        .args(["-sf"])
        .arg(format!("{}/v2/images/{id}", glance.endpoint))
        .output()
        .expect("curl");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("image json");
    assert_eq!(v["status"], "active", "{v}");
    assert_eq!(v["disk_format"], "qcow2");

    // Back into fatbox: import and boot; the file is there.
    d.ok(&[
        "image",
        "import",
        out.to_str().expect("path"),
        "--name",
        "exported",
    ]);
    let u2 = d
        .ok(&[
            "run", "--image", "exported", "--name", "ex2", "--vcpus", "1", "--memory", "512",
            "--disk", "2",
        ])
        .trim()
        .to_string();
    assert_eq!(d.show(&u2)["state"], "running");
    assert_eq!(
        d.exec(&u2, "cat /root/exported.txt").trim(),
        "export-marker-42"
    );

    // A stopped instance exports from its disk mounted read-only, which goes away after.
    d.ok(&["stop", &uuid]);
    let out2 = outdir.path().join("ex1-stopped.qcow2");
    d.ok(&[
        "image",
        "export",
        &uuid,
        "--qcow2",
        out2.to_str().expect("path"),
    ]);
    {
        let g = Guest::open(&out2, &OpenOptions::default()).expect("open export");
        assert_eq!(
            read(&g, "/root/exported.txt").as_deref(),
            Some("export-marker-42\n")
        );
    }
    let disk_img = d.state_dir().join("instances").join(&uuid).join("disk.img");
    assert!(
        driver::disk::loop_of(&disk_img).is_none(),
        "read-only loop mount released"
    );
    // OUT exists: refused without --force.
    let again = d.fatbox(&[
        "image",
        "export",
        &uuid,
        "--qcow2",
        out2.to_str().expect("path"),
    ]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    d.ok(&["start", &uuid]);
    assert_eq!(d.show(&uuid)["state"], "running");
    d.ok(&["delete", &u2]);
    d.ok(&["delete", &uuid]);
}
