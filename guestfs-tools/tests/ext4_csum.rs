//! ext4 metadata checksums: a metadata_csum filesystem holding every checksummed structure
//! (64-bit group descriptors, inodes, an extent tree block, htree nodes, leaf directory
//! blocks, an xattr block) reads cleanly; one flipped byte in any of them is refused with an
//! error naming the structure, and `--no-verify-csum` reads the damaged image anyway.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const BS: u64 = 4096;

/// Builds the image (e2fsprogs' own mkfs, then `e2fsck -D` to index the big directory).
fn build(tmp: &Path) -> PathBuf {
    let root = tmp.join("root");
    for d in ["etc", "usr/bin", "srv/big"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::write(root.join("etc/os-release"), "ID=test\n").expect("write");
    std::fs::write(root.join("srv/hello"), "hello world\n").expect("write");
    // An xattr too big for the inode body lands in an xattr block.
    rustix::fs::setxattr(
        root.join("srv/hello"),
        "user.big",
        &[b'x'; 1500],
        rustix::fs::XattrFlags::empty(),
    )
    .expect("setxattr (needs a filesystem with user xattrs under /var/tmp)");
    // Ten separate data runs: more extents than the inode holds, so a tree block.
    let f = std::fs::File::create(root.join("srv/sparse")).expect("create");
    for i in 0..10u64 {
        std::os::unix::fs::FileExt::write_all_at(&f, &[i as u8 + 1; 4096], i * 2 * BS)
            .expect("write");
    }
    // Enough long names for several blocks: e2fsck -D makes it an htree.
    for i in 0..400 {
        let name = format!("entry-with-a-rather-long-name-{i:04}");
        std::fs::write(root.join("srv/big").join(name), "").expect("write");
    }
    let img = tmp.join("disk.raw");
    run_ok(Command::new("truncate").args(["-s", "64M"]).arg(&img));
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-O", "metadata_csum,64bit", "-d"])
            .arg(&root)
            .arg(&img),
    );
    // -D rewrites directories; exit status 1 means "fixed/optimized", fine here.
    let o = run(Command::new("e2fsck").args(["-f", "-y", "-D"]).arg(&img));
    assert!(
        matches!(o.status.code(), Some(0 | 1)),
        "e2fsck -D: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    img
}

fn debugfs(img: &Path, req: &str) -> String {
    let o = run_ok(Command::new("debugfs").args(["-R", req]).arg(img));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Physical block of a file's logical block.
fn bmap(img: &Path, path: &str, lblk: u64) -> u64 {
    let out = debugfs(img, &format!("bmap {path} {lblk}"));
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("bmap {path}: {out}"))
}

/// Byte offset of an inode in the image.
fn inode_offset(img: &Path, path: &str) -> u64 {
    // "Inode 13 is part of block group 0\n\tlocated at block 36, offset 0x0c00"
    let out = debugfs(img, &format!("imap {path}"));
    let block: u64 = out
        .split("located at block ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("imap {path}: {out}"));
    let off = out
        .split("offset 0x")
        .nth(1)
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .unwrap_or_else(|| panic!("imap {path}: {out}"));
    block * BS + off
}

fn file_acl_block(img: &Path, path: &str) -> u64 {
    let out = debugfs(img, &format!("stat {path}"));
    out.split("File ACL: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .filter(|b| *b != 0)
        .unwrap_or_else(|| panic!("no xattr block on {path}: {out}"))
}

fn read_at(img: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(img).expect("open");
    let mut b = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, off).expect("read");
    b
}

fn flip(img: &Path, off: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .expect("open rw");
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, off).expect("read");
    b[0] ^= 0x01;
    std::os::unix::fs::FileExt::write_all_at(&f, &b, off).expect("write");
}

fn le16(b: &[u8], o: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[o], b[o + 1]]))
}

/// The tree as a tar, sha256'd; Err(stderr) when fatbox-img refuses.
fn tar_digest(img: &Path, extra: &[&str]) -> Result<String, String> {
    let o = run(Command::new(bin())
        .args(extra)
        .arg("tar-out")
        .arg(img)
        .arg(img.with_extension("tar")));
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let data = std::fs::read(img.with_extension("tar")).expect("tar");
    Ok(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data)))
}

#[test]
fn every_checksummed_structure_is_verified() {
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let pristine = build(tmp.path());
    let features = debugfs(&pristine, "features");
    assert!(features.contains("metadata_csum"), "{features}");
    let clean = tar_digest(&pristine, &[]).expect("the pristine image reads with verification");
    assert_eq!(
        tar_digest(&pristine, &["--no-verify-csum"]).as_deref(),
        Ok(clean.as_str())
    );

    // The extent tree block of srv/sparse: the block holding logical block 0's mapping is a
    // leaf below the inode's root; find it as the only tree block with 10 entries.
    let extent_block = {
        let data = std::fs::read(&pristine).expect("read image");
        let hits: Vec<u64> = (0..data.len() as u64 / BS)
            .filter(|b| {
                let o = (*b * BS) as usize;
                data[o..o + 4] == [0x0a, 0xf3, 0x0a, 0x00]
            })
            .collect();
        assert_eq!(hits.len(), 1, "one extent block with 10 entries: {hits:?}");
        hits[0]
    };
    let eb = read_at(&pristine, extent_block * BS, BS as usize);
    let extent_csum = extent_block * BS + 12 + 12 * le16(&eb, 4);

    // srv/big's block 0 is its htree root; its dx_tail checksum sits after `limit` entries.
    let dx_root = bmap(&pristine, "/srv/big", 0);
    let rb = read_at(&pristine, dx_root * BS, BS as usize);
    assert_eq!(rb[29], 8, "srv/big is an htree (dx_root_info.info_length)");
    let dx_csum = dx_root * BS + 32 + 8 * le16(&rb, 32) + 4;

    // A leaf directory block: srv's first block holds "hello"'s entry.
    let srv_block = bmap(&pristine, "/srv", 0);
    let sb = read_at(&pristine, srv_block * BS, BS as usize);
    let name_at = sb
        .windows(5)
        .position(|w| w == b"hello")
        .expect("hello in /srv's block") as u64;

    let cases: Vec<(&str, u64, &str)> = vec![
        (
            "superblock label",
            1024 + 0x78,
            "ext superblock checksum mismatch",
        ),
        // The first group descriptor (block 1 with 4 KiB blocks): free inodes count.
        (
            "group descriptor",
            BS + 0x0E,
            "group descriptor 0 checksum mismatch",
        ),
        (
            "inode uid",
            inode_offset(&pristine, "/srv/hello") + 2,
            "checksum mismatch",
        ),
        (
            "directory entry name",
            srv_block * BS + name_at + 4,
            "block checksum mismatch",
        ),
        (
            "extent block checksum",
            extent_csum,
            "extent block checksum mismatch",
        ),
        (
            "htree node checksum",
            dx_csum,
            "(htree node) checksum mismatch",
        ),
        (
            "xattr block value",
            file_acl_block(&pristine, "/srv/hello") * BS + BS - 8,
            "xattr block",
        ),
    ];
    for (what, off, expect) in cases {
        let img = tmp.path().join("bad.raw");
        std::fs::copy(&pristine, &img).expect("copy");
        flip(&img, off);
        let err = tar_digest(&img, &[]).expect_err(what);
        assert!(
            err.contains(expect) && err.contains("--no-verify-csum") && err.lines().count() == 1,
            "{what}: one line naming the structure: {err}"
        );
        let forced = tar_digest(&img, &["--no-verify-csum"])
            .unwrap_or_else(|e| panic!("{what}: --no-verify-csum still refuses: {e}"));
        // Damage to data the tar carries shows; damage to a stored checksum does not.
        let carried = matches!(
            what,
            "inode uid" | "directory entry name" | "xattr block value"
        );
        assert_eq!(forced != clean, carried, "{what}");
    }
}
