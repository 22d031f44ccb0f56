//! Hostile or odd trees inside otherwise valid disks: names that are not one path component,
//! huge sparse files, symlinks that point outside the guest. Each gives a clear error or a
//! correct output, never a panic and never a write outside the output directory.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// Builds an ext4 whole-disk image from a directory (no metadata checksums, so tests can
/// patch directory entries in place).
fn mkfs(src: &Path, img: &Path, size: &str) {
    run_ok(Command::new("truncate").args(["-s", size]).arg(img));
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^metadata_csum,^dir_index", "-d"])
            .arg(src)
            .arg(img),
    );
}

fn guest_dir(tmp: &Path) -> std::path::PathBuf {
    let root = tmp.join("root");
    for d in ["etc", "usr/bin", "srv"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::write(root.join("etc/os-release"), "ID=test\n").expect("write");
    root
}

fn patch(img: &Path, from: &[u8], to: &[u8]) -> usize {
    assert_eq!(from.len(), to.len());
    let mut data = std::fs::read(img).expect("read image");
    let mut n = 0;
    let mut i = 0;
    while i + from.len() <= data.len() {
        if &data[i..i + from.len()] == from {
            data[i..i + from.len()].copy_from_slice(to);
            n += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    std::fs::write(img, data).expect("write image");
    n
}

#[test]
fn names_with_slash_or_dot_dot_are_refused_with_a_clear_error() {
    for (name, bad) in [("aQb", "a/b"), ("QQ", "..")] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = guest_dir(tmp.path());
        std::fs::write(root.join("srv").join(name), "x").expect("write");
        let img = tmp.path().join("disk.raw");
        mkfs(&root, &img, "16M");
        // Patch the name bytes inside the directory entry (name_len and the rest unchanged).
        let hit = patch(
            &img,
            format!("{name}\0").as_bytes(),
            format!("{bad}\0").as_bytes(),
        );
        assert!(hit >= 1, "name {name} not found in the image");
        let out_dir = tmp.path().join("oci");
        let o = run(Command::new(bin()).arg("convert").arg(&img).arg(&out_dir));
        if bad == ".." {
            // The reader drops "." and ".." entries whatever they point at: a correct output
            // without the bogus entry is as good as an error.
            if o.status.success() {
                let tar = tmp.path().join("t.tar");
                run_ok(Command::new(bin()).arg("tar-out").arg(&img).arg(&tar));
                let names = run_ok(Command::new("tar").arg("-tf").arg(&tar));
                let names = String::from_utf8_lossy(&names.stdout);
                assert!(!names.lines().any(|l| l.contains("..")), "{names}");
                continue;
            }
        }
        assert!(!o.status.success(), "{bad:?} must be refused");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("invalid file name") && err.lines().count() == 1,
            "clear one-line error for {bad:?}: {err}"
        );
        // Nothing escaped: the only thing written is inside the output directory.
        assert!(!tmp.path().join("b").exists() && !root.join("b").exists());
    }
}

#[test]
fn a_10_gib_sparse_file_converts_correctly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = guest_dir(tmp.path());
    let f = std::fs::File::create(root.join("srv/sparse")).expect("create");
    f.set_len(10 << 30).expect("set_len");
    drop(f);
    std::os::unix::fs::FileExt::write_at(
        &std::fs::File::options()
            .write(true)
            .open(root.join("srv/sparse"))
            .expect("open"),
        b"tail",
        (10 << 30) - 4,
    )
    .expect("write tail");
    let img = tmp.path().join("disk.raw");
    mkfs(&root, &img, "64M");
    let tar = tmp.path().join("out.tar.zst");
    run_ok(Command::new(bin()).arg("tar-out").arg(&img).arg(&tar));
    // Read it back with the tar crate: size and the tail are right, the rest is zeros.
    let f = std::fs::File::open(&tar).expect("open tar");
    let dec = zstd::Decoder::new(f).expect("zstd");
    let mut ar = tar::Archive::new(dec);
    let mut found = false;
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        if e.path_bytes().as_ref() != b"srv/sparse" {
            continue;
        }
        found = true;
        assert_eq!(e.size(), 10 << 30, "size from the PAX record");
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        let mut last = Vec::new();
        loop {
            let n = std::io::Read::read(&mut e, &mut buf).expect("read");
            if n == 0 {
                break;
            }
            total += n as u64;
            if total < (10 << 30) - (1 << 20) {
                assert!(buf[..n].iter().all(|b| *b == 0), "hole reads as zeros");
            } else {
                last.extend_from_slice(&buf[..n]);
            }
        }
        assert_eq!(total, 10 << 30);
        assert!(last.ends_with(b"tail"));
    }
    assert!(found, "srv/sparse in the tar");
}

#[test]
fn symlinks_out_of_the_guest_stay_symlinks_and_are_resolved_inside() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = guest_dir(tmp.path());
    std::os::unix::fs::symlink("/etc/shadow", root.join("srv/abs")).expect("symlink");
    std::os::unix::fs::symlink("../../../../../etc/os-release", root.join("srv/rel"))
        .expect("symlink");
    let img = tmp.path().join("disk.raw");
    mkfs(&root, &img, "16M");
    // cat follows symlinks inside the guest root only: ../../.. stops at the guest's root,
    // and /etc/shadow is the guest's (absent), never the host's.
    let o = run_ok(Command::new(bin()).arg("cat").arg(&img).arg("/srv/rel"));
    assert_eq!(o.stdout, b"ID=test\n");
    let o = run(Command::new(bin()).arg("cat").arg(&img).arg("/srv/abs"));
    assert!(!o.status.success());
    assert!(
        o.stdout.is_empty(),
        "the host's /etc/shadow must never be read"
    );
    let o = run_ok(
        Command::new(bin())
            .args(["ls", "--json"])
            .arg(&img)
            .arg("/srv"),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let abs = v
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["name"] == "abs")
        .expect("abs listed");
    assert_eq!(abs["type"], "l");
    assert_eq!(abs["target"], "/etc/shadow");
}

/// The layout is a real OCI image: skopeo inspects it, and umoci (which predates zstd layers)
/// unpacks the gzip and the uncompressed flavours.
#[test]
fn other_oci_tools_read_the_layout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = guest_dir(tmp.path());
    std::fs::write(root.join("srv/hello"), "hi\n").expect("write");
    let img = tmp.path().join("disk.raw");
    mkfs(&root, &img, "16M");
    let oci = tmp.path().join("oci");
    run_ok(
        Command::new(bin())
            .args(["convert", "--name", "z"])
            .arg(&img)
            .arg(&oci),
    );
    run_ok(
        Command::new(bin())
            .args(["convert", "--compression", "gzip", "--name", "g"])
            .arg(&img)
            .arg(&oci),
    );
    run_ok(
        Command::new(bin())
            .args(["convert", "--compression", "none", "--name", "n"])
            .arg(&img)
            .arg(&oci),
    );
    for name in ["z", "g", "n"] {
        let o = run_ok(
            Command::new("skopeo")
                .arg("inspect")
                .arg(format!("oci:{}:{name}", oci.display())),
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("skopeo json");
        assert_eq!(v["Layers"].as_array().map(Vec::len), Some(2), "{name}");
        assert_eq!(v["Os"], "linux");
    }
    for name in ["g", "n"] {
        let bundle = tmp.path().join(format!("bundle-{name}"));
        run_ok(
            Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:{name}", oci.display()))
                .arg(&bundle),
        );
        assert_eq!(
            std::fs::read_to_string(bundle.join("rootfs/srv/hello"))
                .ok()
                .as_deref(),
            Some("hi\n"),
            "{name}"
        );
    }
}
