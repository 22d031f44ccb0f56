//! Acceptance of fatbox-img on the guest-image fixtures (built by
//! tests/fixtures/build-guest-images.sh from a debootstrap tree): every disk variant converts
//! to an OCI image whose base layer equals the source tree; tar-out, cat and ls agree with
//! it; the containerized image boots with systemd-nspawn to `running`. Needs root (nspawn).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn reference_for(variant: &str) -> PathBuf {
    if variant.starts_with("chain/") {
        fixtures().join("chain/reference.jsonl")
    } else {
        fixtures().join("reference.jsonl")
    }
}

fn convert_json(image: &Path, oci: &Path) -> serde_json::Value {
    let out = run_ok(
        Command::new(bin())
            .args(["convert", "--json", "--no-source-digest"])
            .arg(image)
            .arg(oci),
    );
    serde_json::from_slice(&out.stdout).expect("convert --json output")
}

fn blob(oci: &Path, digest: &str) -> PathBuf {
    oci.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Converts one variant and compares its base layer with the reference manifest.
fn check_variant(variant: &str) {
    let image = fixtures().join(variant);
    assert!(image.exists(), "missing fixture {}", image.display());
    let tmp = tempfile::tempdir().expect("tempdir");
    let oci = tmp.path().join("oci");
    let report = convert_json(&image, &oci);
    let layers = report["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 2, "base + containerize layers");
    let base = blob(&oci, layers[0]["digest"].as_str().expect("digest"));
    let got = tmp.path().join("got.jsonl");
    manifest(&base, &got, &[]);
    // The MBR disks' fstab also mounts /boot, unlike the reference's (the GPT disk's).
    let mbr = matches!(variant, "mbr.raw" | "v2.qcow2");
    let mut args = vec!["--ignore", "mtime-dirs"];
    if mbr {
        args.extend(["--exclude", "etc/fstab"]);
    }
    compare(&reference_for(variant), &got, &args);
    if mbr {
        let out = run_ok(Command::new(bin()).arg("cat").arg(&image).arg("/etc/fstab"));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("/boot"),
            "the MBR disk's fstab mounts /boot"
        );
    }
}

macro_rules! variant_tests {
    ($($name:ident => $file:expr),* $(,)?) => {
        $(#[test]
        fn $name() {
            check_variant($file);
        })*
    };
}

variant_tests! {
    convert_gpt_raw => "gpt.raw",
    convert_mbr_raw_with_separate_boot => "mbr.raw",
    convert_qcow2_v3 => "v3.qcow2",
    convert_qcow2_v2 => "v2.qcow2",
    convert_qcow2_zlib => "zlib.qcow2",
    convert_qcow2_zstd => "zstd.qcow2",
    convert_qcow2_extended_l2 => "extl2.qcow2",
    convert_qcow2_4k_clusters => "c4k.qcow2",
    convert_backing_chain => "chain/top.qcow2",
}

#[test]
fn tar_out_equals_source_tree() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let tar = tmp.path().join("out.tar");
    run_ok(
        Command::new(bin())
            .arg("tar-out")
            .arg(fixtures().join("mbr.raw"))
            .arg(&tar),
    );
    let got = tmp.path().join("got.jsonl");
    manifest(&tar, &got, &[]);
    compare(
        &fixtures().join("reference.jsonl"),
        &got,
        &["--ignore", "mtime-dirs", "--exclude", "etc/fstab"],
    );
}

#[test]
fn cat_and_ls_agree_with_the_source_tree() {
    let rootfs = fixtures().join("rootfs");
    for img in ["v3.qcow2", "mbr.raw"] {
        let image = fixtures().join(img);
        let out = run_ok(
            Command::new(bin())
                .arg("cat")
                .arg(&image)
                .arg("/etc/os-release"),
        );
        let want = std::fs::read(rootfs.join("usr/lib/os-release")).expect("os-release");
        assert_eq!(out.stdout, want, "{img}: cat /etc/os-release");

        let out = run_ok(
            Command::new(bin())
                .args(["ls", "--json"])
                .arg(&image)
                .arg("/etc/ssh"),
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ls json");
        let mut got: Vec<String> = v
            .as_array()
            .expect("array")
            .iter()
            .map(|e| e["name"].as_str().unwrap_or("").to_string())
            .collect();
        got.sort();
        let mut want: Vec<String> = std::fs::read_dir(rootfs.join("etc/ssh"))
            .expect("read_dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        want.sort();
        assert_eq!(got, want, "{img}: ls /etc/ssh");
    }
    // A file on the separate /boot partition of the MBR disk.
    let out = run_ok(
        Command::new(bin())
            .args(["ls"])
            .arg(fixtures().join("mbr.raw"))
            .arg("/boot"),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("vmlinuz-"),
        "the /boot partition is merged in: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn inspect_reports_the_guest() {
    let out = run_ok(
        Command::new(bin())
            .args(["inspect", "--json"])
            .arg(fixtures().join("mbr.raw")),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect json");
    assert_eq!(v["partition_table"], "Mbr");
    assert_eq!(v["os"]["id"], "debian");
    assert_eq!(v["os"]["version_id"], "12");
    assert_eq!(v["os"]["init"], "systemd");
    assert_eq!(v["os"]["arch"], "amd64");
    assert_eq!(v["os"]["sshd"], true);
    assert!(!v["os"]["kernels"].as_array().expect("kernels").is_empty());
    let mounts: Vec<&str> = v["filesystems"]
        .as_array()
        .expect("filesystems")
        .iter()
        .filter_map(|f| f["mountpoint"].as_str())
        .collect();
    assert!(
        mounts.contains(&"/") && mounts.contains(&"/boot"),
        "{mounts:?}"
    );

    let out = run_ok(
        Command::new(bin())
            .args(["inspect", "--json"])
            .arg(fixtures().join("chain/top.qcow2")),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect json");
    assert_eq!(
        v["chain"].as_array().map(Vec::len),
        Some(3),
        "top → mid → base"
    );
}

/// A systemd-nspawn container, stopped (and killed if need be) on drop.
struct Nspawn {
    child: Child,
}

impl Drop for Nspawn {
    fn drop(&mut self) {
        // SIGTERM makes nspawn ask the container's systemd to power off.
        let pid = self.child.id() as i32;
        unsafe_kill(pid, 15);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: i32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// The host pid of the container's PID 1: a descendant of `ancestor` that is pid 1 in its
/// own pid namespace.
fn container_init(ancestor: u32) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let nspid = status
            .lines()
            .find(|l| l.starts_with("NSpid:"))
            .unwrap_or("");
        if nspid.split_whitespace().last().is_none_or(|p| p != "1")
            || nspid.split_whitespace().count() < 3
        {
            continue;
        }
        // Walk up the parents.
        let mut cur = pid;
        for _ in 0..16 {
            let Ok(st) = std::fs::read_to_string(format!("/proc/{cur}/stat")) else {
                break;
            };
            let after = st.rsplit_once(')').map(|x| x.1).unwrap_or("");
            let ppid: u32 = after
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if ppid == ancestor {
                return Some(pid);
            }
            if ppid <= 1 {
                break;
            }
            cur = ppid;
        }
    }
    None
}

#[test]
fn containerized_image_boots_with_systemd_to_running() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let oci = tmp.path().join("oci");
    convert_json(&fixtures().join("zstd.qcow2"), &oci);
    let root = tmp.path().join("rootfs");
    run_ok(Command::new(bin()).arg("unpack").arg(&oci).arg(&root));

    // What the containerize layer must have done.
    let boot: Vec<String> = std::fs::read_dir(root.join("boot"))
        .expect("boot dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !boot
            .iter()
            .any(|n| n.starts_with("vmlinuz") || n.starts_with("initrd")),
        "kernel left in /boot: {boot:?}"
    );
    assert!(!root.join("usr/lib/modules").exists(), "/lib/modules left");
    assert_eq!(
        std::fs::metadata(root.join("etc/machine-id"))
            .map(|m| m.len())
            .ok(),
        Some(0),
        "machine-id must be empty"
    );
    let keys: Vec<String> = std::fs::read_dir(root.join("etc/ssh"))
        .expect("etc/ssh")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ssh_host_"))
        .collect();
    assert!(keys.is_empty(), "host keys left: {keys:?}");
    for unit in [
        "systemd-udevd.service",
        "getty@.service",
        "serial-getty@.service",
        "systemd-modules-load.service",
        "systemd-remount-fs.service",
        "ifupdown-pre.service",
    ] {
        let link = std::fs::read_link(root.join("etc/systemd/system").join(unit));
        assert_eq!(
            link.ok().as_deref(),
            Some(Path::new("/dev/null")),
            "{unit} should be masked"
        );
    }
    let fstab = std::fs::read_to_string(root.join("etc/fstab")).expect("fstab");
    assert!(
        fstab.lines().filter(|l| l.starts_with("UUID=")).count() == 0,
        "block devices left in fstab:\n{fstab}"
    );

    // Boot it: systemd as PID 1 must reach `running` with no failed unit.
    let log = std::fs::File::create(tmp.path().join("console.log")).expect("log");
    let machine = format!("fbtest{}", std::process::id());
    let child = Command::new("systemd-nspawn")
        .args([
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--quiet",
        ])
        .args(["--console=passive", "-M", &machine, "-b", "-D"])
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("systemd-nspawn");
    let ns = Nspawn { child };
    let deadline = Instant::now() + Duration::from_secs(60);
    let init = loop {
        if let Some(p) = container_init(ns.child.id()) {
            break p;
        }
        assert!(Instant::now() < deadline, "container init never appeared");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Until systemd has exec'd and opened its private socket, systemctl says "offline".
    let deadline = Instant::now() + Duration::from_secs(120);
    let state = loop {
        let comm = std::fs::read_to_string(format!("/proc/{init}/comm")).unwrap_or_default();
        if comm.trim() == "systemd" {
            let out = run(Command::new("timeout")
                .args(["120", "nsenter", "-t", &init.to_string(), "-a"])
                .args(["systemctl", "is-system-running", "--wait"]));
            let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if s != "offline" && !s.is_empty() {
                break s;
            }
        }
        if Instant::now() > deadline {
            break "offline".to_string();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let failed = run(Command::new("nsenter")
        .args(["-t", &init.to_string(), "-a"])
        .args(["systemctl", "--failed", "--no-legend", "--plain"]));
    let failed = String::from_utf8_lossy(&failed.stdout).trim().to_string();
    let console = std::fs::read_to_string(tmp.path().join("console.log")).unwrap_or_default();
    assert_eq!(
        state, "running",
        "failed units:\n{failed}\nconsole:\n{console}"
    );
    assert!(failed.is_empty(), "failed units: {failed}");
    drop(ns);
}
