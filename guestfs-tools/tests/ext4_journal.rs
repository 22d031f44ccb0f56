//! Journal replay: a transaction written with debugfs' journal commands and left
//! unrecovered must be visible through the reader while the image bytes stay unchanged.

mod ext4_common;

use ext4_common::*;
use std::fs;
use std::io::Read;
use std::path::Path;

fn read_file(fs_: &guestfs_tools::ext4::Ext4, path: &str) -> Vec<u8> {
    let ino = fs_.lookup(path.as_bytes()).expect("lookup").expect(path);
    let inode = fs_.inode(ino).expect("inode");
    let mut v = Vec::new();
    fs_.reader(&inode).read_to_end(&mut v).expect("read");
    v
}

fn dirty_image(
    dir: &Path,
    kind: &str,
    opts: &[&str],
    bs: usize,
    jo: &str,
) -> (std::path::PathBuf, Vec<u8>, Vec<u8>) {
    let src = dir.join("src");
    fs::create_dir(&src).expect("mkdir");
    let old = vec![b'A'; bs];
    fs::write(src.join("data.bin"), &old).expect("write");
    fs::write(src.join("other"), b"untouched").expect("write");
    let img = dir.join("fs.img");
    mkfs(kind, opts, &src, &img, 32);
    let blk = debugfs(&img, "bmap /data.bin 0", false).trim().to_string();
    let new = random_bytes(bs, 99);
    let newf = dir.join("new.bin");
    fs::write(&newf, &new).expect("write");
    // Two transactions: the second rewrites the block again, the newest must win.
    let mid = dir.join("mid.bin");
    fs::write(&mid, vec![b'M'; bs]).expect("write");
    let cmds = dir.join("cmds");
    fs::write(
        &cmds,
        format!(
            "{jo}\njw -b {blk} {}\njc\n{jo}\njw -b {blk} {}\njc\n",
            mid.display(),
            newf.display()
        ),
    )
    .expect("write");
    run_ok(
        std::process::Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&cmds)
            .arg(&img),
        &[0],
    );
    let features = sh("dumpe2fs", &["-h", img.to_str().unwrap_or("")]);
    assert!(features.contains("needs_recovery"), "{features}");
    (img, old, new)
}

fn check(kind: &str, opts: &[&str], bs: usize, jo: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (img, old, new) = dirty_image(tmp.path(), kind, opts, bs, jo);
    // debugfs itself does not replay: it still sees the old content.
    let before = sha256_file(&img);
    let fs_ = open(&img);
    assert!(fs_.info().journal_replayed >= 1, "{:?}", fs_.info());
    eprintln!("{kind} {opts:?}: {:?}", fs_.info());
    assert!(
        read_file(&fs_, "/data.bin") == new,
        "journaled content not visible"
    );
    assert_eq!(read_file(&fs_, "/other"), b"untouched");
    assert_eq!(sha256_file(&img), before, "image was modified");
    assert_ne!(old, new);

    // e2fsck's replay on a copy must agree with ours.
    let copy = tmp.path().join("copy.img");
    fs::copy(&img, &copy).expect("copy");
    run_ok(
        std::process::Command::new("e2fsck").arg("-fy").arg(&copy),
        &[0, 1],
    );
    let fixed = open(&copy);
    assert_eq!(fixed.info().journal_replayed, 0);
    assert!(read_file(&fixed, "/data.bin") == new);
}

#[test]
fn replay_ext4() {
    check("ext4", &["-b", "4096"], 4096, "jo");
}

#[test]
fn replay_ext3_1k() {
    check("ext3", &["-b", "1024"], 1024, "jo");
}

#[test]
fn replay_ext4_csum_v3() {
    // Checksummed journals use 16-byte tags and a descriptor tail.
    check("ext4", &["-b", "4096"], 4096, "jo -c -v 3");
}

#[test]
fn replay_ext4_csum_v2_32bit() {
    check("ext4", &["-b", "4096", "-O", "^64bit"], 4096, "jo -c -v 2");
}

/// Whole-disk image from the fixture cache, if the fixture script has been run.
#[test]
fn fixture_dirty_journal() {
    let root = std::env::var("FATBOX_FIXTURES").unwrap_or("/var/cache/fatbox-fixtures".into());
    let Ok(dirs) = fs::read_dir(&root) else {
        eprintln!("NOTICE: no fixture cache, skipping");
        return;
    };
    let mut found = false;
    for d in dirs.flatten() {
        let raw = d.path().join("dirty-journal.raw");
        let json = d.path().join("dirty-journal.json");
        if !raw.exists() || !json.exists() {
            continue;
        }
        found = true;
        let exp: serde_json::Value =
            serde_json::from_slice(&fs::read(&json).expect("json")).expect("parse json");
        eprintln!("fixture {raw:?}: expectations {exp}");
        let str_of = |k: &str| {
            exp.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        let before = sha256_file(&raw);
        let fs_ = open(&raw);
        eprintln!("{:?}", fs_.info());
        assert_eq!(fs_.info().uuid, str_of("fs_uuid"));
        assert!(fs_.info().journal_replayed >= 1);
        if let Some(bs) = exp.get("block_size").and_then(|v| v.as_u64()) {
            assert_eq!(u64::from(fs_.info().block_size), bs);
        }
        let data = read_file(&fs_, &format!("/{}", str_of("path")));
        if let Some(size) = exp.get("size").and_then(|v| v.as_u64()) {
            assert_eq!(data.len() as u64, size);
        }
        assert_eq!(sha256(&data), str_of("sha256_after_replay"));
        assert_ne!(sha256(&data), str_of("sha256_without_replay"));
        if let Some(files) = exp.get("other_files").and_then(|v| v.as_object()) {
            for (path, want) in files {
                let got = read_file(&fs_, &format!("/{path}"));
                assert_eq!(
                    Some(String::from_utf8_lossy(&got).as_ref()),
                    want.as_str(),
                    "{path}"
                );
            }
        }
        assert_eq!(sha256_file(&raw), before);
    }
    if !found {
        eprintln!("NOTICE: no dirty-journal fixture, skipping");
    }
}
