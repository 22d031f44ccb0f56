//! Layer blobs written by `convert`: the three compressions store the same tar (same
//! diff_id) under the right OCI media type, digests match what real tools compute, and a
//! failing blob write ends the convert with an error instead of a hang or a stray file.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

fn mkfs(src: &Path, img: &Path, size: &str) {
    run_ok(Command::new("truncate").args(["-s", size]).arg(img));
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(src)
            .arg(img),
    );
}

/// Bytes that do not compress (xorshift), so sizes in the tests are real sizes.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A guest with files that span several of the sink's 1 MiB chunks, text that compresses,
/// and a sparse file.
fn guest(tmp: &Path, noise_bytes: usize) -> PathBuf {
    let root = tmp.join("root");
    for d in ["etc", "usr/bin", "srv/data"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::write(root.join("etc/os-release"), "ID=test\nVERSION_ID=1\n").expect("write");
    std::fs::write(root.join("srv/data/noise"), noise(noise_bytes, 0x9e37_79b9)).expect("write");
    let text: String = (0..60_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(root.join("srv/data/text"), text).expect("write");
    let sparse = std::fs::File::create(root.join("srv/data/sparse")).expect("create");
    sparse.set_len(5 << 20).expect("set_len");
    let img = tmp.join("disk.raw");
    mkfs(&root, &img, "64M");
    img
}

fn sha256_hex(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn blob(oci: &Path, digest: &str) -> PathBuf {
    oci.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).expect("read json")).expect("parse json")
}

/// (manifest, config) of the image `name` in a layout.
fn image(oci: &Path, name: &str) -> (serde_json::Value, serde_json::Value) {
    let index = read_json(&oci.join("index.json"));
    let desc = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == name)
        .expect("image in index")
        .clone();
    let manifest = read_json(&blob(oci, desc["digest"].as_str().expect("digest")));
    let config = read_json(&blob(
        oci,
        manifest["config"]["digest"]
            .as_str()
            .expect("config digest"),
    ));
    (manifest, config)
}

#[test]
fn none_zstd_and_gzip_layers_hold_the_same_tar_under_the_right_media_type() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = guest(tmp.path(), (3 << 20) + 12345);
    let oci = tmp.path().join("oci");
    let cases = [
        ("none", "application/vnd.oci.image.layer.v1.tar", None),
        (
            "zstd",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            Some("zstd"),
        ),
        (
            "gzip",
            "application/vnd.oci.image.layer.v1.tar+gzip",
            Some("gzip"),
        ),
    ];
    let mut diff_ids: Vec<Vec<String>> = Vec::new();
    for (comp, media, tool) in cases {
        run_ok(
            Command::new(bin())
                .args(["convert", "--no-source-digest", "--compression", comp])
                .args(["--name", comp])
                .arg(&img)
                .arg(&oci),
        );
        let (manifest, config) = image(&oci, comp);
        let ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .expect("diff_ids")
            .iter()
            .map(|v| v.as_str().expect("diff_id").to_string())
            .collect();
        let layers = manifest["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), 2, "{comp}: base + containerize");
        for (layer, diff_id) in layers.iter().zip(&ids) {
            assert_eq!(layer["mediaType"], media, "{comp}");
            let digest = layer["digest"].as_str().expect("digest");
            let data = std::fs::read(blob(&oci, digest)).expect("blob");
            assert_eq!(&sha256_hex(&data), digest, "{comp}: blob digest");
            assert_eq!(layer["size"].as_u64(), Some(data.len() as u64), "{comp}");
            let tar = match tool {
                None => {
                    assert_eq!(digest, diff_id, "an uncompressed blob is its own diff_id");
                    data
                }
                Some(t) => {
                    // The system's own decompressor, not the crate that compressed it.
                    run_ok(Command::new(t).arg("-dc").arg(blob(&oci, digest))).stdout
                }
            };
            assert_eq!(
                &sha256_hex(&tar),
                diff_id,
                "{comp}: diff_id is the tar's digest"
            );
        }
        diff_ids.push(ids);
    }
    // The base layer is the disk's tree: identical whatever the compression.
    assert!(
        diff_ids.iter().all(|d| d[0] == diff_ids[0][0]),
        "{diff_ids:?}"
    );

    // The uncompressed image unpacks to the guest's files.
    let dest = tmp.path().join("unpacked");
    run_ok(
        Command::new(bin())
            .args(["unpack", "--name", "none"])
            .arg(&oci)
            .arg(&dest),
    );
    assert_eq!(
        std::fs::read(dest.join("srv/data/noise")).expect("noise"),
        noise((3 << 20) + 12345, 0x9e37_79b9)
    );
    let sparse = std::fs::read(dest.join("srv/data/sparse")).expect("sparse");
    assert!(sparse.len() == 5 << 20 && sparse.iter().all(|b| *b == 0));
}

/// zstd layers are cut into one frame per 1 MiB chunk, compressed on `--threads` workers:
/// the blob must not depend on the worker count (digests stay reproducible across hosts),
/// and our own unpacker must read every frame, not just the first.
#[test]
fn zstd_layers_are_the_same_bytes_whatever_the_thread_count_and_unpack_whole() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let noise_len = (5 << 20) + 777;
    let img = guest(tmp.path(), noise_len);
    let oci = tmp.path().join("oci");
    let mut bases = Vec::new();
    for threads in ["1", "2", "3"] {
        let name = format!("t{threads}");
        run_ok(
            Command::new(bin())
                .args(["convert", "--no-source-digest", "--threads", threads])
                .args(["--name", &name])
                .arg(&img)
                .arg(&oci),
        );
        let (manifest, _) = image(&oci, &name);
        bases.push(
            manifest["layers"][0]["digest"]
                .as_str()
                .expect("digest")
                .to_string(),
        );
    }
    assert!(bases.iter().all(|d| *d == bases[0]), "{bases:?}");
    let data = std::fs::read(blob(&oci, &bases[0])).expect("blob");
    // Several frames: the magic number at the start of each one.
    let frames = data
        .windows(4)
        .filter(|w| *w == [0x28, 0xb5, 0x2f, 0xfd])
        .count();
    assert!(
        frames >= 6,
        "expected one frame per MiB of tar, found {frames}"
    );

    let dest = tmp.path().join("unpacked");
    run_ok(
        Command::new(bin())
            .args(["unpack", "--name", "t2"])
            .arg(&oci)
            .arg(&dest),
    );
    assert_eq!(
        std::fs::read(dest.join("srv/data/noise")).expect("noise"),
        noise(noise_len, 0x9e37_79b9),
        "data past the first frame"
    );
}

#[test]
fn an_unknown_compression_or_zstd_level_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = guest(tmp.path(), 1000);
    for args in [
        &["--compression", "lz4"][..],
        &["--compression", "zstd", "--level", "99"][..],
    ] {
        let o = run(Command::new(bin())
            .arg("convert")
            .args(args)
            .arg(&img)
            .arg(tmp.path().join("oci")));
        assert!(!o.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "one-line error: {err}");
        assert!(err.contains("lz4") || err.contains("99"), "{err}");
    }
}

/// A tmpfs mounted for one test, unmounted even when the test fails.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Needs root (mounts a small tmpfs to fill up).
#[test]
fn a_full_disk_fails_the_convert_with_its_reason_and_leaves_no_partial_blob() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = guest(tmp.path(), 12 << 20);
    let mnt = tmp.path().join("small");
    std::fs::create_dir(&mnt).expect("mkdir");
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "fatbox-test"])
            .arg(&mnt),
    );
    let _guard = Tmpfs(mnt.clone());
    let oci = mnt.join("oci");
    for comp in ["none", "zstd"] {
        let o = run(Command::new(bin())
            .args(["convert", "--no-source-digest", "--compression", comp])
            .arg(&img)
            .arg(&oci));
        assert!(!o.status.success(), "{comp}: 12 MiB of noise fit in 4 MiB?");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("No space left on device") && err.lines().count() == 1,
            "{comp}: one line naming the cause: {err}"
        );
        let left: Vec<_> = std::fs::read_dir(oci.join("blobs/sha256"))
            .expect("blobs dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{comp}: partial blobs left: {left:?}");
    }
}
