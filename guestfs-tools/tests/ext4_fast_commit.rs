//! ext4 fast-commit replay against the kernel's (needs root: loop devices and mounts).
//!
//! A real filesystem made with `mkfs.ext4 -O fast_commit` is loop-mounted, changed with
//! fsync after each step (create, append, overwrite, link, unlink, chmod, chown, truncate,
//! mkdir, rename) and shut down with EXT4_GOING_FLAGS_NOLOGFLUSH so that the fast-commit
//! records stay unreplayed. The oracle is the kernel itself: a copy of the image mounted
//! (which replays) must show the same tree as our reader on the original, which must stay
//! byte-for-byte unchanged.

mod ext4_common;

use ext4_common::*;
use guestfs_tools::ext4::{Ext4, FileType, ROOT_INO};
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// EXT4_IOC_SHUTDOWN = _IOR('X', 125, __u32).
const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587D;
const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A loop device, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(img: &Path) -> Loop {
        let out = sh("losetup", &["-f", "--show", img.to_str().unwrap_or("")]);
        Loop(out.trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A mount, unmounted on drop.
struct Mount(Option<PathBuf>);

impl Mount {
    fn try_new(dev: &Loop, dir: &Path) -> Option<Mount> {
        fs::create_dir_all(dir).expect("mkdir");
        let ok = Command::new("mount")
            .arg(&dev.0)
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Mount(Some(dir.to_path_buf())))
    }
    fn new(dev: &Loop, dir: &Path) -> Mount {
        Mount::try_new(dev, dir).expect("mount")
    }
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new("/nonexistent"))
    }
    fn unmount(mut self) {
        if let Some(p) = &self.0 {
            // On failure the guard keeps the path, so drop retries once the panic unwinds
            // whatever kept the mount busy.
            sh("umount", &[p.to_str().unwrap_or("")]);
        }
        self.0 = None;
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = Command::new("umount").arg(&p).status();
        }
    }
}

fn fsync(p: &Path) {
    fs::File::open(p).expect("open").sync_all().expect("fsync");
}

fn write_sync(p: &Path, data: &[u8], append: bool) {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(p)
        .expect("open for write");
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

fn shutdown_nologflush(dir: &Path) {
    let f = fs::File::open(dir).expect("open mount");
    let flags = EXT4_GOING_FLAGS_NOLOGFLUSH;
    // SAFETY: EXT4_IOC_SHUTDOWN reads one u32 through the pointer, which outlives the call.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            EXT4_IOC_SHUTDOWN,
            &flags as *const u32,
        )
    };
    assert_eq!(
        r,
        0,
        "EXT4_IOC_SHUTDOWN: {}",
        std::io::Error::last_os_error()
    );
}

/// Builds the crashed image: a full commit of the base tree, then only fast commits.
fn build(dir: &Path) -> PathBuf {
    let img = dir.join("fs.img");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "fast_commit"])
            .arg(&img)
            .arg("32M"),
        &[0],
    );
    let lo = Loop::attach(&img);
    let mnt = Mount::new(&lo, &dir.join("mnt"));
    let m = mnt.path().to_path_buf();
    fs::write(m.join("base"), b"base\n").expect("write");
    fs::write(m.join("old"), random_bytes(9000, 1)).expect("write");
    fs::write(m.join("shrink"), random_bytes(40000, 2)).expect("write");
    fs::create_dir(m.join("d")).expect("mkdir");
    fs::write(m.join("d/k"), b"keep?\n").expect("write");
    fs::write(m.join("d/moved"), b"moved\n").expect("write");
    // A full commit: the fast commits below belong to the transaction after it.
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };

    // Directory fsyncs force full commits; fsync a regular file instead, which commits
    // every tracked change as a fast commit.
    let anchor = m.join("new");
    write_sync(&anchor, &b"hello".repeat(1000), false);
    write_sync(&m.join("base"), b"appended\n", true);
    write_sync(&m.join("d/n2"), &random_bytes(20000, 3), false);
    fs::hard_link(&anchor, m.join("d/newlink")).expect("link");
    fsync(&anchor);
    fs::remove_file(m.join("d/k")).expect("unlink");
    fsync(&anchor);
    fs::set_permissions(&anchor, fs::Permissions::from_mode(0o640)).expect("chmod");
    fsync(&anchor);
    std::os::unix::fs::chown(&anchor, Some(1000), Some(1001)).expect("chown");
    fsync(&anchor);
    for (name, len) in [("d/n2", 5000), ("shrink", 4096)] {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(m.join(name))
            .expect("open");
        f.set_len(len).expect("truncate");
        f.sync_all().expect("fsync");
    }
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(m.join("old"))
            .expect("open");
        f.seek(SeekFrom::Start(4096)).expect("seek");
        f.write_all(&random_bytes(6000, 4)).expect("overwrite");
        f.sync_all().expect("fsync");
    }
    fs::create_dir(m.join("d/sub")).expect("mkdir");
    write_sync(&m.join("d/sub/f"), b"in sub\n", false);
    fs::rename(m.join("d/moved"), m.join("moved2")).expect("rename");
    fsync(&m.join("moved2"));
    shutdown_nologflush(&m);
    mnt.unmount();
    drop(lo);
    img
}

/// A second workload on 4 KiB blocks: symlinks, sparse and fragmented files (an extent tree
/// deeper than the inode), O_TRUNC rewrites, rmdir, rename over an existing file, unlinking
/// one of two links.
fn build_b(dir: &Path) -> PathBuf {
    let img = dir.join("fs-b.img");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-O", "fast_commit"])
            .arg(&img)
            .arg("64M"),
        &[0],
    );
    let lo = Loop::attach(&img);
    let mnt = Mount::new(&lo, &dir.join("mnt-b"));
    let m = mnt.path().to_path_buf();
    fs::create_dir_all(m.join("a/gone")).expect("mkdir");
    fs::write(m.join("a/victim"), b"to be replaced").expect("write");
    fs::write(m.join("a/rewrite"), random_bytes(30000, 5)).expect("write");
    fs::write(m.join("two"), b"two links").expect("write");
    fs::hard_link(m.join("two"), m.join("a/two")).expect("link");
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };

    let anchor = m.join("anchor");
    write_sync(&anchor, b"anchor", false);
    std::os::unix::fs::symlink("anchor", m.join("fast-link")).expect("symlink");
    std::os::unix::fs::symlink("x".repeat(200), m.join("a/slow-link")).expect("symlink");
    fsync(&anchor);
    {
        // Sparse: data at 0, 1 MiB and 5 MiB.
        let mut f = fs::File::create(m.join("sparse")).expect("create");
        for (at, seed) in [(0u64, 6u64), (1 << 20, 7), (5 << 20, 8)] {
            f.seek(SeekFrom::Start(at)).expect("seek");
            f.write_all(&random_bytes(5000, seed)).expect("write");
        }
        f.sync_all().expect("fsync");
    }
    {
        // Two files written in alternating small chunks fragment each other.
        let mut f1 = fs::File::create(m.join("frag1")).expect("create");
        let mut f2 = fs::File::create(m.join("frag2")).expect("create");
        for i in 0..40u64 {
            f1.write_all(&random_bytes(4096, 100 + i)).expect("write");
            f1.sync_all().expect("fsync");
            f2.write_all(&random_bytes(4096, 200 + i)).expect("write");
            f2.sync_all().expect("fsync");
        }
    }
    write_sync(&m.join("a/rewrite"), &random_bytes(7000, 9), false);
    fs::remove_dir(m.join("a/gone")).expect("rmdir");
    fsync(&anchor);
    write_sync(&m.join("a/newer"), b"replacement", false);
    fs::rename(m.join("a/newer"), m.join("a/victim")).expect("rename over");
    fsync(&m.join("a/victim"));
    fs::remove_file(m.join("a/two")).expect("unlink");
    fsync(&m.join("two"));
    shutdown_nologflush(&m);
    mnt.unmount();
    drop(lo);
    img
}

#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: char,
    perm: u32,
    uid: u32,
    gid: u32,
    links: u64,
    size: u64,
    /// sha256 of a file's content, a symlink's target.
    content: String,
    mtime: i64,
}

type Tree = BTreeMap<String, Node>;

fn ours(fs_: &Ext4) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![(String::new(), ROOT_INO)];
    while let Some((path, ino)) = stack.pop() {
        for e in fs_.read_dir(ino).expect("read_dir") {
            let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
            let i = fs_.inode(e.ino).expect("inode");
            let (kind, content, size) = match i.file_type() {
                FileType::Regular => {
                    let mut v = Vec::new();
                    fs_.reader(&i).read_to_end(&mut v).expect("read");
                    ('f', sha256(&v), i.size)
                }
                FileType::Directory => {
                    stack.push((p.clone(), e.ino));
                    ('d', String::new(), 0)
                }
                FileType::Symlink => ('l', sha256(&fs_.read_link(&i).expect("link")), i.size),
                _ => ('o', String::new(), 0),
            };
            let mtime = if kind == 'd' { 0 } else { i.mtime.sec };
            out.insert(
                p,
                Node {
                    kind,
                    perm: i.perm(),
                    uid: i.uid,
                    gid: i.gid,
                    links: u64::from(i.links),
                    size,
                    content,
                    mtime,
                },
            );
        }
    }
    out
}

fn kernels(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![(String::new(), root.to_path_buf())];
    while let Some((path, dir)) = stack.pop() {
        for e in fs::read_dir(&dir).expect("read_dir") {
            let e = e.expect("entry");
            let p = format!("{path}/{}", e.file_name().to_string_lossy());
            let md = fs::symlink_metadata(e.path()).expect("stat");
            let ft = md.file_type();
            let (kind, content, size) = if ft.is_file() {
                ('f', sha256(&fs::read(e.path()).expect("read")), md.size())
            } else if ft.is_dir() {
                stack.push((p.clone(), e.path()));
                ('d', String::new(), 0)
            } else if ft.is_symlink() {
                let t = fs::read_link(e.path()).expect("readlink");
                ('l', sha256(t.as_os_str().as_encoded_bytes()), md.size())
            } else {
                ('o', String::new(), 0)
            };
            let mtime = if kind == 'd' { 0 } else { md.mtime() };
            out.insert(
                p,
                Node {
                    kind,
                    perm: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    links: md.nlink(),
                    size,
                    content,
                    mtime,
                },
            );
        }
    }
    out
}

/// The kernel's view of `img`: a copy, loop-mounted (the kernel replays the journal and the
/// fast commits into the copy). `None` when the kernel refuses to mount it.
fn kernel_view(img: &Path, dir: &Path) -> Option<Tree> {
    let copy = dir.join("kernel-copy.img");
    fs::copy(img, &copy).expect("copy");
    let lo = Loop::attach(&copy);
    let mnt = Mount::try_new(&lo, &dir.join("kmnt"))?;
    let t = kernels(mnt.path());
    mnt.unmount();
    drop(lo);
    let _ = fs::remove_file(&copy);
    Some(t)
}

fn diff(a: &Tree, b: &Tree) -> String {
    let mut s = String::new();
    for (k, v) in a {
        match b.get(k) {
            Some(w) if w == v => {}
            Some(w) => s.push_str(&format!("{k}: ours {v:?}\n  kernel {w:?}\n")),
            None => s.push_str(&format!("{k}: only ours {v:?}\n")),
        }
    }
    for (k, w) in b {
        if !a.contains_key(k) {
            s.push_str(&format!("{k}: only kernel {w:?}\n"));
        }
    }
    s
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Byte offsets in the image of the fast-commit blocks, in order, found with debugfs.
fn fc_blocks(img: &Path) -> Vec<u64> {
    let bs = 1024u64; // mkfs.ext4 on 32 MiB picks 1 KiB blocks; checked below
    let phys = |lblk: u64| -> u64 {
        let out = run_ok(
            Command::new("debugfs")
                .arg("-c")
                .arg("-R")
                .arg(format!("bmap <8> {lblk}"))
                .arg(img),
            &[0],
        );
        out.trim().parse().expect("bmap output")
    };
    let dump = sh("dumpe2fs", &["-h", img.to_str().unwrap_or("")]);
    assert!(dump.contains("Block size:               1024"), "{dump}");
    let mut f = fs::File::open(img).expect("open");
    let mut jsb = vec![0u8; 1024];
    f.seek(SeekFrom::Start(phys(0) * bs)).expect("seek");
    f.read_exact(&mut jsb).expect("read");
    let maxlen = u64::from(be32(&jsb, 0x10));
    let num_fc = match be32(&jsb, 0x54) {
        0 => 256,
        n => u64::from(n),
    };
    (maxlen - num_fc + 1..maxlen)
        .map(|l| phys(l) * bs)
        .collect()
}

/// Positions (image byte offset of the tag) of the TAIL tags of the commits with the head's
/// tid, in order. The area after the last one is left over from older transactions.
fn fc_tails(img: &Path) -> Vec<u64> {
    let mut f = fs::File::open(img).expect("open");
    let mut tails = Vec::new();
    let mut head_tid = None;
    'blocks: for off in fc_blocks(img) {
        let mut b = vec![0u8; 1024];
        f.seek(SeekFrom::Start(off)).expect("seek");
        f.read_exact(&mut b).expect("read");
        let mut cur = 0usize;
        while cur + 4 <= b.len() {
            let tag = le16(&b, cur);
            let len = usize::from(le16(&b, cur + 2));
            if tag == 0 || tag > 9 || cur + 4 + len > b.len() {
                break 'blocks;
            }
            match (tag, head_tid) {
                (9, None) => head_tid = Some(le32(&b, cur + 8)),
                (8, Some(t)) if le32(&b, cur + 4) == t => tails.push(off + cur as u64),
                (8, _) => break 'blocks,
                _ => {}
            }
            cur += 4 + len;
        }
    }
    tails
}

fn patch(img: &Path, at: u64, bytes: &[u8]) {
    let mut f = fs::OpenOptions::new().write(true).open(img).expect("open");
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.write_all(bytes).expect("write");
}

#[test]
fn fast_commits_replay_in_memory_like_the_kernel() {
    if !is_root() {
        eprintln!("skipped: needs root (loop devices, mounts)");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = build(tmp.path());
    // Not vacuous: there are fast commits to replay, the last one with the rename.
    let tails = fc_tails(&img);
    assert!(tails.len() >= 8, "only {} fast commits", tails.len());

    let before = sha256_file(&img);
    let fs_ = open(&img);
    let info = fs_.info().clone();
    assert!(info.fast_commit_replayed >= 20, "{info:?}");
    let got = ours(&fs_);
    drop(fs_);
    assert_eq!(sha256_file(&img), before, "image was modified");

    let want = kernel_view(&img, tmp.path()).expect("kernel mounts the image");
    let d = diff(&got, &want);
    assert!(d.is_empty(), "trees differ:\n{d}");
    // The fast-commit-only changes are there (and so were checked against the kernel).
    assert!(got.contains_key("/moved2") && !got.contains_key("/d/moved"));
    assert!(got.contains_key("/d/sub/f") && !got.contains_key("/d/k"));
    assert_eq!(got["/new"].links, 2);
    assert_eq!(got["/new"].perm, 0o640);
    assert_eq!((got["/new"].uid, got["/new"].gid), (1000, 1001));
    assert_eq!(got["/d/n2"].size, 5000);
    assert_eq!(got["/shrink"].size, 4096);
    eprintln!(
        "{info:?}, {} fast commits, {} entries",
        tails.len(),
        got.len()
    );
}

#[test]
fn a_bad_tail_crc_ends_the_replay_at_that_commit_like_the_kernel() {
    if !is_root() {
        eprintln!("skipped: needs root (loop devices, mounts)");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = build(tmp.path());
    let tails = fc_tails(&img);
    assert!(tails.len() >= 2);
    let full = ours(&open(&img));

    // The last commit (the rename) no longer verifies: everything before it still applies.
    let last = tails[tails.len() - 1];
    let mut f = fs::File::open(&img).expect("open");
    let mut crc = [0u8; 4];
    f.seek(SeekFrom::Start(last + 8)).expect("seek");
    f.read_exact(&mut crc).expect("read");
    crc[0] ^= 0x5A;
    patch(&img, last + 8, &crc);
    let fs_ = open(&img);
    let got = ours(&fs_);
    assert!(fs_.info().fast_commit_replayed > 0);
    drop(fs_);
    assert!(got.contains_key("/d/moved") && !got.contains_key("/moved2"));
    assert!(
        got.contains_key("/d/sub/f"),
        "earlier commits must still apply"
    );
    assert_ne!(got, full);
    let want = kernel_view(&img, tmp.path()).expect("kernel mounts the image");
    let d = diff(&got, &want);
    assert!(d.is_empty(), "trees differ:\n{d}");

    // The first commit broken too: no commit verifies, which fails the kernel's mount.
    let first = tails[0];
    f.seek(SeekFrom::Start(first + 8)).expect("seek");
    f.read_exact(&mut crc).expect("read");
    crc[0] ^= 0x5A;
    patch(&img, first + 8, &crc);
    let dev: guestfs_tools::block::Device =
        std::sync::Arc::new(guestfs_tools::block::RawImage::open(&img).expect("open image"));
    let err = Ext4::open(dev).expect_err("no verified fast commit must be an error");
    assert!(err.to_string().contains("fast-commit"), "{err}");
    assert!(
        kernel_view(&img, tmp.path()).is_none(),
        "the kernel mounted an image whose only fast commit is bad"
    );
}

#[test]
fn a_garbage_fast_commit_area_is_an_error_or_ignored_like_the_kernel() {
    if !is_root() {
        eprintln!("skipped: needs root (loop devices, mounts)");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = build(tmp.path());
    let blocks = fc_blocks(&img);
    let pristine = fs::read(&img).expect("read");

    // Random bytes behind a valid HEAD: the scan meets garbage before any tail verified.
    // Many seeds through our reader only (cheap; no panic, never a silent success).
    for seed in 0..64u64 {
        let mut data = pristine.clone();
        for (n, &off) in blocks.iter().enumerate() {
            let junk = random_bytes(1024, seed * 1000 + n as u64 + 7);
            let from = if n == 0 { 12 } else { 0 };
            let o = usize::try_from(off).expect("offset");
            data[o + from..o + 1024].copy_from_slice(&junk[from..]);
        }
        fs::write(&img, &data).expect("write");
        let dev: guestfs_tools::block::Device =
            std::sync::Arc::new(guestfs_tools::block::RawImage::open(&img).expect("open"));
        if let Ok(fs_) = Ext4::open(dev) {
            // Only possible if the junk happens to verify, which a crc32c makes unlikely.
            panic!("seed {seed}: garbage accepted: {:?}", fs_.info());
        }
    }
    assert!(
        kernel_view(&img, tmp.path()).is_none(),
        "the kernel mounted a fast-commit area of garbage behind a valid head"
    );

    // Garbage from the first byte: no HEAD, so nothing of the area is replayed.
    let mut data = pristine.clone();
    for (n, &off) in blocks.iter().enumerate() {
        let junk = random_bytes(1024, n as u64 + 99);
        let o = usize::try_from(off).expect("offset");
        data[o..o + 1024].copy_from_slice(&junk);
    }
    data[usize::try_from(blocks[0]).expect("offset")] = 0;
    fs::write(&img, &data).expect("write");
    let fs_ = open(&img);
    assert_eq!(fs_.info().fast_commit_replayed, 0);
    let got = ours(&fs_);
    drop(fs_);
    assert!(!got.contains_key("/new"), "fast commits were applied");
    let want = kernel_view(&img, tmp.path()).expect("kernel mounts the image");
    let d = diff(&got, &want);
    assert!(d.is_empty(), "trees differ:\n{d}");
}

/// No root needed: random but well-formed tag streams (the kind a fuzzer rarely builds)
/// through the fuzz entry's fast-commit reach, over a real filesystem. Must never panic.
#[test]
fn random_fast_commit_tags_over_a_real_filesystem_never_panic() {
    let seed_img = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/ext4/small112.img");
    let base = fs::read(&seed_img).expect("seed image");
    for seed in 0..300u64 {
        let r = random_bytes(8192, seed + 1);
        let mut area = Vec::new();
        let mut i = 0usize;
        while area.len() < 8000 && i + 300 < r.len() {
            let pick = r[i] % 6;
            let ino = u32::from(r[i + 1] % 16);
            let parent = if r[i + 2].is_multiple_of(2) {
                2
            } else {
                u32::from(r[i + 3] % 16)
            };
            let (tag, val): (u16, Vec<u8>) = match pick {
                0 => {
                    // ADD_RANGE: ino, ee_block, ee_len, ee_start_hi, ee_start_lo
                    let mut v = ino.to_le_bytes().to_vec();
                    v.extend_from_slice(&u32::from(r[i + 4] % 8).to_le_bytes());
                    v.extend_from_slice(&u16::from(r[i + 5] % 4 + 1).to_le_bytes());
                    v.extend_from_slice(&0u16.to_le_bytes());
                    v.extend_from_slice(&u32::from(r[i + 6]).to_le_bytes());
                    (1, v)
                }
                1 => {
                    let mut v = ino.to_le_bytes().to_vec();
                    v.extend_from_slice(&u32::from(r[i + 4] % 8).to_le_bytes());
                    v.extend_from_slice(&u32::from(r[i + 5]).to_le_bytes());
                    (2, v)
                }
                2..=4 => {
                    let mut v = parent.to_le_bytes().to_vec();
                    v.extend_from_slice(&ino.to_le_bytes());
                    v.extend_from_slice(&[b'a' + r[i + 4] % 3, b'0' + r[i + 5] % 2]);
                    (u16::from(pick + 1), v)
                }
                _ => {
                    let mut v = ino.to_le_bytes().to_vec();
                    v.extend_from_slice(&r[i + 8..i + 8 + 128]);
                    (6, v)
                }
            };
            area.extend_from_slice(&tag.to_le_bytes());
            area.extend_from_slice(&(val.len() as u16).to_le_bytes());
            area.extend_from_slice(&val);
            i += 140;
        }
        area.resize(8192, 0);
        let mut data = base.clone();
        data.extend_from_slice(&area);
        guestfs_tools::ext4::fuzz_one(&data);
    }
}

#[test]
fn symlinks_sparse_fragmented_files_renames_and_rmdir_replay_like_the_kernel() {
    if !is_root() {
        eprintln!("skipped: needs root (loop devices, mounts)");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = build_b(tmp.path());
    let before = sha256_file(&img);
    let fs_ = open(&img);
    let info = fs_.info().clone();
    assert!(info.fast_commit_replayed >= 20, "{info:?}");
    let got = ours(&fs_);
    drop(fs_);
    assert_eq!(sha256_file(&img), before, "image was modified");
    let want = kernel_view(&img, tmp.path()).expect("kernel mounts the image");
    let d = diff(&got, &want);
    assert!(d.is_empty(), "trees differ:\n{d}");
    assert!(got.contains_key("/sparse") && got.contains_key("/frag2"));
    assert!(!got.contains_key("/a/gone") && !got.contains_key("/a/two"));
    assert_eq!(got["/two"].links, 1);
    assert_eq!(got["/frag1"].size, 40 * 4096);
    eprintln!("{info:?}, {} entries", got.len());
}
