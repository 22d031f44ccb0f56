//! Builds ext2/3/4 images with mkfs -d from a populated tree and compares everything the
//! reader returns against the source tree (std::fs, getfattr) and debugfs.

mod ext4_common;

use ext4_common::*;
use guestfs_tools::ext4::{Ext4, FileType, ROOT_INO};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

const BIG_DIR_ENTRIES: usize = 5000;
const DEEP: usize = 40;

fn mknod(p: &Path, mode: u32, major: u32, minor: u32) {
    let c = CString::new(p.as_os_str().as_bytes()).expect("path");
    // SAFETY: valid NUL-terminated path; mknod has no other memory effects.
    let rc = unsafe { libc::mknod(c.as_ptr(), mode, libc::makedev(major, minor)) };
    assert_eq!(rc, 0, "mknod {p:?}: {}", std::io::Error::last_os_error());
}

fn write(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {p:?}: {e}"));
}

/// Populates `src` with every kind of object the reader must handle.
fn populate(src: &Path, big_dir: bool) {
    for (i, n) in [0usize, 1, 4095, 4096, 4097, (1 << 20) + 3]
        .iter()
        .enumerate()
    {
        write(
            &src.join(format!("file_{n}")),
            &random_bytes(*n, i as u64 + 7),
        );
    }
    // Sparse: data at 0, 3 MiB and the last bytes of 8 MiB, holes between.
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(src.join("sparse")).expect("sparse");
        f.set_len(8 << 20).expect("truncate");
        f.write_all_at(&random_bytes(5000, 1), 0).expect("w");
        f.write_all_at(&random_bytes(4096, 2), 3 << 20).expect("w");
        f.write_all_at(b"tail", (8 << 20) - 4).expect("w");
    }
    std::os::unix::fs::symlink("file_1", src.join("link_fast")).expect("symlink");
    let long = format!("{}/target", "d".repeat(120));
    std::os::unix::fs::symlink(&long, src.join("link_slow")).expect("symlink");
    write(&src.join("hard_a"), b"hard link content\n");
    fs::hard_link(src.join("hard_a"), src.join("hard_b")).expect("link");
    mknod(&src.join("fifo"), libc::S_IFIFO | 0o640, 0, 0);
    mknod(&src.join("null"), libc::S_IFCHR | 0o666, 1, 3);
    mknod(&src.join("sda1"), libc::S_IFBLK | 0o660, 8, 1);
    mknod(&src.join("bigdev"), libc::S_IFCHR | 0o600, 300, 70000);

    let x = src.join("xattrs");
    write(&x, b"x");
    sh(
        "setfattr",
        &["-n", "user.small", "-v", "hello", x.to_str().unwrap_or("")],
    );
    let big_val = format!("0x{}", hex::encode(random_bytes(600, 3)));
    sh(
        "setfattr",
        &["-n", "user.big", "-v", &big_val, x.to_str().unwrap_or("")],
    );
    sh(
        "setfattr",
        &["-n", "trusted.t", "-v", "tv", x.to_str().unwrap_or("")],
    );
    let acl = src.join("acl");
    write(&acl, b"acl");
    sh(
        "setfacl",
        &["-m", "u:1234:rwx,g:99:r,m:rwx", acl.to_str().unwrap_or("")],
    );
    let acld = src.join("acl_dir");
    fs::create_dir(&acld).expect("mkdir");
    sh(
        "setfacl",
        &["-d", "-m", "u:4321:rx", acld.to_str().unwrap_or("")],
    );
    sh("setfacl", &["-m", "g:5:rwx", acld.to_str().unwrap_or("")]);
    let cap = src.join("ping");
    write(&cap, b"#!/bin/sh\n");
    sh("setcap", &["cap_net_raw+ep", cap.to_str().unwrap_or("")]);

    let owned = src.join("owned");
    write(&owned, b"owned");
    std::os::unix::fs::chown(&owned, Some(100_000), Some(200_000)).expect("chown");
    fs::set_permissions(&owned, fs::Permissions::from_mode(0o4751)).expect("chmod");
    let owned_link = src.join("owned_link");
    std::os::unix::fs::symlink("owned", &owned_link).expect("symlink");
    std::os::unix::fs::lchown(&owned_link, Some(70_000), Some(70_001)).expect("lchown");

    let times = src.join("times");
    write(&times, b"t");
    let f = fs::File::options().write(true).open(&times).expect("open");
    f.set_times(
        fs::FileTimes::new().set_modified(UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789)),
    )
    .expect("set_times");

    let mut deep = src.join("deep");
    for i in 0..DEEP {
        deep = deep.join(format!("level{i}"));
    }
    fs::create_dir_all(&deep).expect("deep");
    write(&deep.join("bottom"), b"bottom");

    if big_dir {
        let d = src.join("bigdir");
        fs::create_dir(&d).expect("bigdir");
        for i in 0..BIG_DIR_ENTRIES {
            write(&d.join(format!("entry-with-a-longish-name-{i:05}")), b"");
        }
    }
}

/// getfattr -R -d -m - -e hex: path → (name → value bytes).
fn source_xattrs(src: &Path) -> BTreeMap<PathBuf, BTreeMap<String, Vec<u8>>> {
    let out = run_ok(
        std::process::Command::new("getfattr")
            .args(["-R", "-d", "-h", "--absolute-names", "-m", "-", "-e", "hex"])
            .arg(src),
        &[0],
    );
    let mut all = BTreeMap::new();
    let mut cur: Option<PathBuf> = None;
    for line in out.lines() {
        if let Some(p) = line.strip_prefix("# file: ") {
            cur = Some(PathBuf::from(p));
        } else if let (Some(c), Some((k, v))) = (&cur, line.split_once('=')) {
            let v = hex::decode(v.trim_start_matches("0x")).expect("getfattr hex");
            all.entry(c.clone())
                .or_insert_with(BTreeMap::new)
                .insert(k.to_string(), v);
        }
    }
    all
}

struct Stats {
    files: usize,
    bytes: u64,
}

/// Compares one directory level recursively.
fn compare_dir(
    fs_: &Ext4,
    src_root: &Path,
    rel: &Path,
    xattrs: &BTreeMap<PathBuf, BTreeMap<String, Vec<u8>>>,
    st: &mut Stats,
) {
    let src_dir = src_root.join(rel);
    let abs = Path::new("/").join(rel);
    let ino = fs_
        .lookup(abs.as_os_str().as_bytes())
        .expect("lookup")
        .unwrap_or_else(|| panic!("{abs:?} missing"));
    let mut want: BTreeSet<Vec<u8>> = fs::read_dir(&src_dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().as_bytes().to_vec())
        .collect();
    if ino == ROOT_INO {
        want.insert(b"lost+found".to_vec());
    }
    let entries = fs_.read_dir(ino).expect("ext read_dir");
    let got: BTreeSet<Vec<u8>> = entries.iter().map(|e| e.name.clone()).collect();
    assert_eq!(got.len(), entries.len(), "duplicate names in {abs:?}");
    assert_eq!(got, want, "listing of {abs:?}");
    for e in entries {
        if ino == ROOT_INO && e.name == b"lost+found" {
            continue;
        }
        let rel_child = rel.join(std::ffi::OsStr::from_bytes(&e.name));
        let src = src_root.join(&rel_child);
        let m = fs::symlink_metadata(&src).expect("stat src");
        let inode = fs_.inode(e.ino).expect("inode");
        let what = format!("{rel_child:?}");
        assert_eq!(u32::from(inode.mode), m.mode(), "mode {what}");
        assert_eq!(inode.uid, m.uid(), "uid {what}");
        assert_eq!(inode.gid, m.gid(), "gid {what}");
        assert_eq!(u64::from(inode.links), m.nlink(), "nlink {what}");
        assert_eq!(inode.mtime.sec, m.mtime(), "mtime {what}");
        let ft = inode.file_type();
        if let Some(t) = e.file_type {
            assert_eq!(t, ft, "dirent type {what}");
        }
        let want_x = xattrs.get(&src).cloned().unwrap_or_default();
        let got_x: BTreeMap<String, Vec<u8>> =
            fs_.xattrs(&inode).expect("xattrs").into_iter().collect();
        assert_eq!(got_x, want_x, "xattrs {what}");
        match ft {
            FileType::Directory => {
                assert!(m.is_dir(), "{what}");
                compare_dir(fs_, src_root, &rel_child, xattrs, st);
            }
            FileType::Regular => {
                assert!(m.is_file(), "{what}");
                assert_eq!(inode.size, m.len(), "size {what}");
                let mut data = Vec::new();
                fs_.reader(&inode).read_to_end(&mut data).expect("read");
                let src_data = fs::read(&src).expect("read src");
                assert!(data == src_data, "content of {what} differs");
                st.files += 1;
                st.bytes += data.len() as u64;
            }
            FileType::Symlink => {
                let t = fs::read_link(&src).expect("readlink");
                assert_eq!(
                    fs_.read_link(&inode).expect("read_link"),
                    t.as_os_str().as_bytes(),
                    "{what}"
                );
                assert_eq!(inode.size, m.len(), "symlink size {what}");
            }
            FileType::CharDevice | FileType::BlockDevice => {
                let rdev = m.rdev();
                assert_eq!(
                    inode.rdev,
                    (libc::major(rdev), libc::minor(rdev)),
                    "rdev {what}"
                );
            }
            FileType::Fifo | FileType::Socket => {}
        }
    }
}

/// debugfs' view of an inode: (links, size, uid, gid).
fn debugfs_stat(img: &Path, ino: u32) -> (u64, u64, u64, u64) {
    let out = debugfs(img, &format!("stat <{ino}>"), false);
    let toks: Vec<&str> = out.split_whitespace().collect();
    let after = |key: &str| -> u64 {
        toks.iter()
            .position(|t| *t == key)
            .and_then(|i| toks.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in debugfs stat output:\n{out}"))
    };
    (
        after("Links:"),
        after("Size:"),
        after("User:"),
        after("Group:"),
    )
}

fn check_variant(kind: &str, opts: &[&str]) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    fs::create_dir(&src).expect("mkdir");
    populate(&src, true);
    let img = tmp.path().join("fs.img");
    let mut all_opts = vec!["-N", "8192"];
    all_opts.extend_from_slice(opts);
    mkfs(kind, &all_opts, &src, &img, 64);
    // Index the big directory (htree) the way a guest's e2fsck would.
    run_ok(
        std::process::Command::new("e2fsck").arg("-fyD").arg(&img),
        &[0, 1],
    );

    let fs_ = open(&img);
    let info = fs_.info().clone();
    eprintln!("{kind} {opts:?}: {info:?}");
    let blkid = sh("blkid", &["-o", "export", img.to_str().unwrap_or("")]);
    assert!(blkid.contains(&format!("UUID={}\n", info.uuid)), "{blkid}");
    assert!(blkid.contains(&format!("TYPE={}\n", info.kind)), "{blkid}");
    assert_eq!(info.journal_replayed, 0);

    let xattrs = source_xattrs(&src);
    let mut st = Stats { files: 0, bytes: 0 };
    compare_dir(&fs_, &src, Path::new(""), &xattrs, &mut st);
    eprintln!("compared {} files, {} bytes", st.files, st.bytes);
    assert!(st.files > BIG_DIR_ENTRIES);

    let big = fs_.lookup(b"/bigdir").expect("lookup").expect("bigdir");
    let big_inode = fs_.inode(big).expect("inode");
    assert_ne!(
        big_inode.flags & 0x1000,
        0,
        "bigdir should be an htree after e2fsck -D"
    );
    if opts.contains(&"inline_data") {
        for p in ["/file_1", "/acl_dir", "/hard_a"] {
            let i = fs_
                .inode(fs_.lookup(p.as_bytes()).expect("l").expect(p))
                .expect("inode");
            assert_ne!(i.flags & 0x1000_0000, 0, "{p} should be inline");
        }
    }
    assert_eq!(fs_.read_dir(big).expect("read_dir").len(), BIG_DIR_ENTRIES);

    // Sparse file: allocated ranges must leave the holes out.
    let sp = fs_
        .inode(fs_.lookup(b"/sparse").expect("l").expect("sparse"))
        .expect("inode");
    let runs = fs_.data_runs(&sp).expect("runs");
    let allocated: u64 = runs.iter().map(|r| r.1).sum();
    eprintln!("sparse runs: {runs:?}");
    assert!(allocated < 64 << 10, "holes kept: {runs:?}");
    assert_eq!(runs.first().map(|r| r.0), Some(0));
    assert!(runs
        .iter()
        .any(|r| r.0 <= 3 << 20 && r.0 + r.1 >= (3 << 20) + 4096));
    assert_eq!(runs.last().map(|r| r.0 + r.1), Some(8 << 20));
    // Unaligned read across a data/hole boundary.
    let mut buf = vec![0xAAu8; 10_000];
    assert_eq!(fs_.read_at(&sp, 4000, &mut buf).expect("read_at"), 10_000);
    let src_sp = fs::read(src.join("sparse")).expect("read");
    assert!(buf[..] == src_sp[4000..14_000]);

    let big_file = fs_
        .inode(fs_.lookup(b"/file_1048579").expect("l").expect("f"))
        .expect("inode");
    let full = fs_.data_runs(&big_file).expect("runs");
    assert_eq!(full, vec![(0, (1 << 20) + 3)]);

    for path in ["/owned", "/file_1048579", "/hard_a", "/deep"] {
        let ino = fs_.lookup(path.as_bytes()).expect("l").expect(path);
        let i = fs_.inode(ino).expect("inode");
        let d = debugfs_stat(&img, ino);
        assert_eq!(
            d,
            (
                u64::from(i.links),
                i.size,
                u64::from(i.uid),
                u64::from(i.gid)
            ),
            "debugfs stat {path}"
        );
    }
    // Nanosecond mtimes survive when the inode has room for them.
    let t = fs_
        .inode(fs_.lookup(b"/times").expect("l").expect("times"))
        .expect("inode");
    assert_eq!(t.mtime.sec, 1_600_000_000);
    if !opts.contains(&"128") {
        // mkfs -d drops nanoseconds; set them (and a post-2038 epoch bit) with debugfs.
        debugfs(&img, "sif /times mtime_extra 0x1D6F3455", true);
        let fs2 = open(&img);
        let t = fs2
            .inode(fs2.lookup(b"/times").expect("l").expect("t"))
            .expect("inode");
        assert_eq!(t.mtime.nsec, 0x1D6F3455 >> 2);
        assert_eq!(t.mtime.sec, 1_600_000_000 + (1i64 << 32));
        let out = debugfs(&img, "stat /times", false);
        assert!(out.contains("mtime: 0x5f5e1000:1d6f3455"), "{out}");
    }
}

#[test]
fn ext4_default() {
    check_variant("ext4", &["-b", "4096"]);
}

#[test]
fn ext2() {
    check_variant("ext2", &["-b", "4096"]);
}

#[test]
fn ext3() {
    check_variant("ext3", &["-b", "4096"]);
}

#[test]
fn ext4_no_extents() {
    check_variant("ext4", &["-b", "4096", "-O", "^extent,^64bit"]);
}

#[test]
fn ext4_64bit_128_inodes() {
    check_variant("ext4", &["-b", "4096", "-O", "64bit", "-I", "128"]);
}

#[test]
fn ext4_1k_blocks() {
    check_variant("ext4", &["-b", "1024"]);
}

#[test]
fn ext4_inline_data() {
    check_variant("ext4", &["-b", "4096", "-O", "inline_data"]);
}

#[test]
fn ext4_meta_bg_no_flex() {
    check_variant(
        "ext4",
        &["-b", "1024", "-O", "meta_bg,^resize_inode,^flex_bg"],
    );
}

/// A 3000-byte xattr on a 1 KiB-block filesystem with ea_inode lives in its own inode.
#[test]
fn ea_inode_values() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    fs::create_dir(&src).expect("mkdir");
    let f = src.join("f");
    write(&f, b"x");
    let val = random_bytes(3000, 77);
    let arg = format!("0x{}", hex::encode(&val));
    sh(
        "setfattr",
        &["-n", "user.huge", "-v", &arg, f.to_str().unwrap_or("")],
    );
    let img = tmp.path().join("fs.img");
    mkfs("ext4", &["-b", "1024", "-O", "ea_inode"], &src, &img, 16);
    let fs_ = open(&img);
    let inode = fs_
        .inode(fs_.lookup(b"/f").expect("l").expect("f"))
        .expect("inode");
    let x = fs_.xattrs(&inode).expect("xattrs");
    assert_eq!(x, vec![("user.huge".to_string(), val)]);
    let ea_inodes = (1..=fs_.info().inodes)
        .filter_map(|i| fs_.inode(i).ok())
        .filter(|i| i.flags & 0x20_0000 != 0)
        .count();
    assert_eq!(ea_inodes, 1, "value should be stored in an EA inode");
}
