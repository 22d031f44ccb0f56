//! Corrupted and hostile images: clear errors or correct output, never a panic or hang.

mod ext4_common;

use ext4_common::*;
use guestfs_tools::block::MemDevice;
use guestfs_tools::ext4::{fuzz_one, Ext4};
use guestfs_tools::Error;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn base_image(dir: &Path, kind: &str, opts: &[&str], size_mb: u32) -> PathBuf {
    let src = dir.join("src");
    fs::create_dir_all(src.join("a/b")).expect("mkdir");
    fs::write(src.join("a/b/file"), b"in b").expect("w");
    fs::write(src.join("f"), random_bytes(20_000, 5)).expect("w");
    fs::write(src.join("g"), random_bytes(20_000, 6)).expect("w");
    fs::write(src.join("empty"), b"").expect("w");
    fs::write(src.join("empty2"), b"").expect("w");
    let img = dir.join("fs.img");
    mkfs(kind, opts, &src, &img, size_mb);
    img
}

fn ino(fs_: &Ext4, p: &str) -> u32 {
    fs_.lookup(p.as_bytes()).expect("lookup").expect(p)
}

fn patch(img: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(img)
        .expect("open rw");
    f.write_all_at(bytes, off).expect("patch");
}

#[test]
fn directory_loop_and_long_paths() {
    let tmp = tempfile::tempdir().expect("tmp");
    let img = base_image(tmp.path(), "ext4", &[], 16);
    debugfs(&img, "link /a /a/b/up", true);
    let fs_ = open(&img);
    let a = ino(&fs_, "/a");
    assert_eq!(fs_.lookup(b"/a/b/up").expect("lookup"), Some(a));
    let looped = format!("/a{}", "/b/up".repeat(200));
    assert_eq!(fs_.lookup(looped.as_bytes()).expect("lookup"), Some(a));
    let endless = format!("/a{}", "/b/up".repeat(5000));
    assert!(matches!(
        fs_.lookup(endless.as_bytes()),
        Err(Error::Limit(_))
    ));
    assert_eq!(
        fs_.lookup(b"/a/../a/./b/file").expect("lookup"),
        Some(ino(&fs_, "/a/b/file"))
    );
    assert_eq!(fs_.lookup(b"/a/b/file/x").expect("lookup"), None);
    assert_eq!(fs_.lookup(b"/nope").expect("lookup"), None);
}

#[test]
fn rec_len_zero() {
    let tmp = tempfile::tempdir().expect("tmp");
    let img = base_image(tmp.path(), "ext4", &["-b", "4096"], 16);
    let blk: u64 = debugfs(&img, "bmap /a 0", false)
        .trim()
        .parse()
        .expect("bmap");
    patch(&img, blk * 4096 + 4, &[0, 0]);
    // Patched behind the filesystem's back: the block checksum catches it first...
    let err = open(&img).lookup(b"/a/b").expect_err("checksum");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    // ...and without checksums the directory parser must refuse it too.
    let fs_ = open_unverified(&img);
    let a = ino(&fs_, "/a");
    let err = fs_.read_dir(a).expect_err("rec_len 0 must fail");
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(fs_.lookup(b"/a/b").is_err());
}

#[test]
fn bad_extent_magic_and_blocks_past_end() {
    let tmp = tempfile::tempdir().expect("tmp");
    let img = base_image(tmp.path(), "ext4", &["-b", "4096"], 16);
    debugfs(&img, "sif /f block[0] 0x0001F30B", true);
    debugfs(&img, "sif /g block[5] 0x7fffffff", true);
    let fs_ = open(&img);
    let mut buf = vec![0u8; 8192];
    for p in ["/f", "/g"] {
        let inode = fs_.inode(ino(&fs_, p)).expect("inode");
        let err = fs_.read_at(&inode, 0, &mut buf).expect_err(p);
        assert!(matches!(err, Error::Corrupt { .. }), "{p}: {err}");
        assert!(fs_.reader(&inode).read_to_end(&mut Vec::new()).is_err());
    }
    // Indirect maps: a pointer past the end of the filesystem.
    let img2 = tmp.path().join("ext2.img");
    fs::rename(
        base_image(&tmp.path().join("e2"), "ext2", &["-b", "1024"], 16),
        &img2,
    )
    .expect("mv");
    debugfs(&img2, "sif /f block[0] 0x7fffffff", true);
    debugfs(&img2, "sif /g block[IND] 0x7ffffff0", true);
    let fs2 = open(&img2);
    for p in ["/f", "/g"] {
        let inode = fs2.inode(ino(&fs2, p)).expect("inode");
        let mut all = Vec::new();
        let err = fs2.reader(&inode).read_to_end(&mut all).expect_err(p);
        eprintln!("{p}: {err}");
    }
}

#[test]
fn inode_numbers_out_of_range() {
    let tmp = tempfile::tempdir().expect("tmp");
    let img = base_image(tmp.path(), "ext4", &["-b", "4096"], 16);
    let fs_ = open(&img);
    let n = fs_.info().inodes;
    assert!(fs_.inode(0).is_err());
    assert!(fs_.inode(n + 1).is_err());
    assert!(fs_.inode(u32::MAX).is_err());
    assert!(fs_.inode(n).is_ok());
    // A directory entry pointing past the inode count.
    drop(fs_);
    let blk: u64 = debugfs(&img, "bmap /a 0", false)
        .trim()
        .parse()
        .expect("bmap");
    patch(&img, blk * 4096, &0xFFFF_FFF0u32.to_le_bytes());
    let fs_ = open_unverified(&img);
    let err = fs_
        .read_dir(ino(&fs_, "/a"))
        .expect_err("inode out of range");
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
}

#[test]
fn huge_sparse_files() {
    let tmp = tempfile::tempdir().expect("tmp");
    for (kind, opts) in [("ext4", &["-b", "4096"][..]), ("ext2", &["-b", "1024"][..])] {
        let dir = tmp.path().join(kind);
        let img = base_image(&dir, kind, opts, 16);
        debugfs(&img, "sif /empty size 0xA0000000000", true); // 10 TiB
        debugfs(&img, "sif /empty2 size 0x7fffffffffffffff", true);
        let fs_ = open(&img);
        for p in ["/empty", "/empty2"] {
            let inode = fs_.inode(ino(&fs_, p)).expect("inode");
            assert!(inode.size >= 10 << 40);
            assert_eq!(fs_.data_runs(&inode).expect("runs"), vec![]);
            let mut buf = vec![0xFFu8; 1 << 20];
            assert_eq!(
                fs_.read_at(&inode, 5 << 40, &mut buf).expect("read"),
                1 << 20
            );
            assert!(buf.iter().all(|b| *b == 0));
            let mut r = fs_.reader(&inode).take(4 << 20);
            let mut v = Vec::new();
            r.read_to_end(&mut v).expect("read");
            assert_eq!(v.len(), 4 << 20);
            assert!(v.iter().all(|b| *b == 0));
        }
    }
}

#[test]
fn truncated_image() {
    let tmp = tempfile::tempdir().expect("tmp");
    let img = base_image(tmp.path(), "ext4", &["-b", "1024"], 4);
    let data = fs::read(&img).expect("read");
    for keep in [
        0usize,
        1000,
        2048,
        4096,
        20_000,
        data.len() / 3,
        data.len() / 2,
    ] {
        let part = data.get(..keep).unwrap_or(&data).to_vec();
        fuzz_one(&part);
        let dev: guestfs_tools::block::Device = Arc::new(MemDevice::new(part, "mem"));
        if let Ok(fs_) = Ext4::open(dev) {
            let _ = fs_.read_dir(2);
        }
    }
}

/// Cheap mutation fuzzing (the real fuzzer lives in fuzz/): flip bytes in metadata
/// areas of a small image and walk it.
#[test]
fn mutation_smoke() {
    let tmp = tempfile::tempdir().expect("tmp");
    let img = base_image(tmp.path(), "ext4", &["-b", "1024", "-O", "inline_data"], 2);
    let data = fs::read(&img).expect("read");
    fuzz_one(&data);
    let fs_ = open(&img);
    assert!(fs_.read_dir(2).expect("root").len() >= 5);
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // Metadata lives in the first ~300 KiB of such a small image.
    let hot = data.len().min(300 << 10);
    for _ in 0..300 {
        let mut m = data.clone();
        for _ in 0..(next() % 16 + 1) {
            let pos = (next() as usize) % hot;
            if let Some(b) = m.get_mut(pos) {
                *b = next() as u8;
            }
        }
        fuzz_one(&m);
    }
}
