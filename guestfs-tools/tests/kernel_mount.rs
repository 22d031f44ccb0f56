//! `--kernel-mount` (needs root: loop devices and mount; CI runs as root): real xfs and btrfs
//! filesystems built with mkfs and populated through a loop mount in a private mount
//! namespace, assembled into GPT disks (raw and qcow2). Checks the default refusal, that
//! ls/cat/tar-out/convert give the source tree, that ext4 stays in user space next to a
//! kernel-mounted root (fstab merge), and that no loop device, mount or temp file is left after
//! any run: success, failure (corrupt xfs), SIGTERM.

mod common;

use common::{bin, compare, manifest, run, run_ok};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const ROOT_UUID: &str = "6b1c7a4e-93c2-4a57-8d2e-0f6f2b9c1a11";
const SRV_UUID: &str = "0c9d2f6a-1b7e-4e39-a8f1-5d3c2e4b7a22";
const BTRFS_UUID: &str = "3f5e8a1c-7d2b-4c6e-9a0f-1e2d3c4b5a33";
const MIB: u64 = 1 << 20;
/// xfsprogs refuses filesystems smaller than 300 MiB.
const XFS_MB: u64 = 300;
const SRV_MB: u64 = 16;
const BTRFS_MB: u64 = 160;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Root plus the tools; without them the test says why and passes vacuously.
fn prerequisites() -> bool {
    if !is_root() {
        eprintln!("NOTICE: kernel_mount tests need root (loop devices and mount), skipping");
        return false;
    }
    let missing: Vec<&str> = ["mkfs.xfs", "mkfs.btrfs", "mkfs.ext4", "sfdisk", "qemu-img"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        eprintln!("NOTICE: missing {missing:?} (bash tests/deps.sh), skipping");
        return false;
    }
    true
}

fn sh(script: &str) -> Output {
    run_ok(Command::new("sh").args(["-ec", script]))
}

fn write(p: &Path, data: &[u8]) {
    if let Some(d) = p.parent() {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(p, data).unwrap_or_else(|e| panic!("write {p:?}: {e}"));
}

fn pseudo_random(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// The guest tree: every kind of object the directory backend must carry over. `srv/` is the
/// content of a separate ext4 partition mounted there by the guest's fstab.
fn populate(src: &Path, fstab: &str) {
    write(
        &src.join("etc/os-release"),
        b"ID=kmtest\nVERSION_ID=1\nPRETTY_NAME=\"kernel-mount test\"\n",
    );
    write(&src.join("etc/fstab"), fstab.as_bytes());
    write(&src.join("usr/bin/tool"), b"#!/bin/sh\necho tool\n");
    write(
        &src.join("data/big"),
        &pseudo_random((3 * MIB + 17) as usize, 7),
    );
    write(&src.join("data/small"), b"hello from xfs\n");
    write(&src.join("srv/www/index.html"), b"<h1>on ext4</h1>\n");
    fs::set_permissions(src.join("usr/bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    let s = src.display();
    sh(&format!(
        "cd {s}
         truncate -s 5M data/sparse && printf tail >> data/sparse
         ln data/small data/small-hardlink
         ln -s ../etc/os-release data/rel-link
         ln -s /etc/os-release data/abs-link
         ln -s /proc/self/environ data/host-link
         mkfifo data/fifo
         mknod data/null c 1 3
         chown 1234:5678 data/small
         chown -h 42:43 data/rel-link
         setfattr -n user.color -v blue data/small
         setfattr -n security.capability -v 0x0100000200200000000000000000000000000000 usr/bin/tool
         setfacl -m u:4242:r-x,g:4343:r-- data/big
         setfacl -d -m u:4242:rwx data
         touch -h -d '2001-02-03 04:05:06' data/rel-link
         touch -d '1999-12-31 23:59:59' data/small srv/www/index.html"
    ));
}

/// Copies `src` (minus what `exclude` names) into a fresh filesystem image through a loop
/// mount in a throwaway mount namespace: if the test dies, the namespace and its mount die too
/// and the autoclear loop device goes with them.
fn fill_fs(img: &Path, fstype: &str, src: &Path, exclude: &str) {
    sh(&format!(
        "unshare --mount --propagation private sh -ec '
           mp=$(mktemp -d)
           mount -t {fstype} -o loop{opts} {img} $mp
           tar -C {src} --exclude=./{exclude} --xattrs --xattrs-include=\"*\" --acls -cf - . \
             | tar -C $mp --xattrs --xattrs-include=\"*\" --acls --numeric-owner -xpf -
           umount $mp
           rmdir $mp'",
        img = img.display(),
        src = src.display(),
        // The tests run in parallel with the same xfs UUID.
        opts = if fstype == "xfs" { ",nouuid" } else { "" },
    ));
}

/// Builds a GPT disk: p1 xfs root (`src` without srv/'s content), p2 ext4 with srv/.
fn build_xfs_disk(work: &Path, src: &Path) -> PathBuf {
    let p1 = work.join("p1.xfs");
    let p2 = work.join("p2.ext4");
    let disk = work.join("disk.raw");
    sh(&format!(
        "truncate -s {XFS_MB}M {p1}
         mkfs.xfs -q -m uuid={ROOT_UUID} -L kmroot {p1}
         mkfs.ext4 -q -F -U {SRV_UUID} -d {src}/srv {p2} {SRV_MB}M",
        p1 = p1.display(),
        p2 = p2.display(),
        src = src.display()
    ));
    fill_fs(&p1, "xfs", src, "srv/*");
    let p1_start = MIB;
    let p2_start = p1_start + XFS_MB * MIB;
    sh(&format!(
        "truncate -s {size} {d}
         printf 'label: gpt\\nstart={s1}, size={n1}, type=linux\\nstart={s2}, size={n2}, type=linux\\n' | sfdisk -q {d}
         dd if={p1} of={d} bs=1M seek={o1} conv=notrunc,sparse status=none
         dd if={p2} of={d} bs=1M seek={o2} conv=notrunc,sparse status=none",
        size = p2_start + SRV_MB * MIB + MIB,
        d = disk.display(),
        s1 = p1_start / 512,
        n1 = XFS_MB * MIB / 512,
        s2 = p2_start / 512,
        n2 = SRV_MB * MIB / 512,
        p1 = p1.display(),
        p2 = p2.display(),
        o1 = p1_start / MIB,
        o2 = p2_start / MIB,
    ));
    fs::remove_file(&p1).unwrap();
    fs::remove_file(&p2).unwrap();
    disk
}

/// A scratch area; `tmp/` is the TMPDIR the tool runs with, so its temp files are visible.
struct Work {
    dir: TempDir,
}

impl Work {
    fn new() -> Work {
        let dir = tempfile::Builder::new()
            .prefix("fatbox-kmtest-")
            .tempdir_in("/var/tmp")
            .unwrap();
        fs::create_dir(dir.path().join("tmp")).unwrap();
        Work { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn tmp(&self) -> PathBuf {
        self.path().join("tmp")
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.env("TMPDIR", self.tmp()).args(args);
        c
    }
    fn img(&self, args: &[&str]) -> Output {
        let out = run(&mut self.cmd(args));
        self.assert_nothing_left(&format!("{args:?}"));
        out
    }
    fn img_ok(&self, args: &[&str]) -> Output {
        let out = self.img(args);
        assert!(
            out.status.success(),
            "fatbox-img {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Loop devices whose backing file is ours (the image in place, or an O_TMPFILE copy in
    /// our TMPDIR, shown as "<tmp>/#NNN (deleted)").
    fn our_loops(&self) -> Vec<String> {
        let me = self.path().display().to_string();
        let mut out = Vec::new();
        for e in fs::read_dir("/sys/block").unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file")) {
                if b.starts_with(&me) {
                    out.push(format!("{name}: {}", b.trim()));
                }
            }
        }
        out
    }

    /// The tool's private mount point, made in its TMPDIR once it is about to mount.
    fn has_mountpoint(&self) -> bool {
        fs::read_dir(self.tmp()).is_ok_and(|d| {
            d.flatten().any(|x| {
                x.file_name()
                    .to_string_lossy()
                    .starts_with("fatbox-kmount-")
            })
        })
    }

    fn our_mounts(&self) -> Vec<String> {
        let me = self.path().display().to_string();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&me) || l.contains("fatbox-kmount-"))
            .map(str::to_string)
            .collect()
    }

    /// No loop device, mount or temp file of ours remains. The kernel releases an autoclear
    /// loop device when its last user goes, which can trail the process exit a little: poll.
    fn assert_nothing_left(&self, after: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let loops = self.our_loops();
            let mounts = self.our_mounts();
            let tmp: Vec<_> = fs::read_dir(self.tmp())
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            if loops.is_empty() && mounts.is_empty() && tmp.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind after {after}: loops {loops:?} mounts {mounts:?} temp files {tmp:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        // Whatever a failed assertion left: detach our loop devices (autoclear ones go alone).
        for l in self.our_loops() {
            if let Some(dev) = l.split(':').next() {
                let _ = Command::new("losetup")
                    .args(["-d", &format!("/dev/{dev}")])
                    .status();
            }
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The tree seen through tar-out and through convert + unpack equals the source tree.
fn check_tree(w: &Work, img: &Path, src: &Path, tag: &str) {
    let want = w.path().join(format!("want-{tag}.jsonl"));
    manifest(src, &want, &[]);
    let tar = w.path().join(format!("{tag}.tar"));
    w.img_ok(&["--kernel-mount", "tar-out", s(img), s(&tar)]);
    let got = w.path().join(format!("tar-{tag}.jsonl"));
    manifest(&tar, &got, &[]);
    // The ext4 mount point's own mtime is mkfs', not the source directory's.
    compare(&want, &got, &["--ignore", "mtime-dirs"]);
    fs::remove_file(&tar).unwrap();

    // The base layer itself (uncompressed, so the manifest script reads it as a tar): an
    // unpack to a directory would let a default ACL leak into the children it creates.
    let oci = w.path().join(format!("oci-{tag}"));
    let out = w.img_ok(&[
        "--kernel-mount",
        "--json",
        "convert",
        s(img),
        s(&oci),
        "--no-containerize",
        "--no-source-digest",
        "--compression",
        "none",
        "--name",
        tag,
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let digest = report["manifest_digest"].as_str().unwrap_or_default();
    let blob = |d: &str| {
        oci.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let m: serde_json::Value = serde_json::from_slice(&fs::read(blob(digest)).unwrap()).unwrap();
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{m}");
    let layer = blob(layers[0]["digest"].as_str().unwrap());
    let got = w.path().join(format!("oci-{tag}.jsonl"));
    manifest(&layer, &got, &[]);
    compare(&want, &got, &["--ignore", "mtime-dirs"]);
    fs::remove_dir_all(&oci).unwrap();
}

fn check_ls_cat(w: &Work, img: &Path, src: &Path) {
    let ls = w.img_ok(&["--kernel-mount", "ls", s(img), "/data"]);
    let text = String::from_utf8_lossy(&ls.stdout);
    for want in [
        "-rw-r--r--   2   1234   5678         15 small",
        "-rw-r--r--   2   1234   5678         15 small-hardlink",
        "lrwxrwxrwx   1     42     43         17 rel-link -> ../etc/os-release",
        "crw-r--r--   1      0      0       1, 3 null",
        "prw-r--r--   1      0      0          0 fifo",
        "host-link -> /proc/self/environ",
    ] {
        assert!(text.contains(want), "ls lacks {want:?}:\n{text}");
    }
    let stderr_text = stderr(&ls);
    assert_eq!(
        stderr_text.matches("WARN").count(),
        1,
        "one loud warning per kernel-mounted filesystem:\n{stderr_text}"
    );
    assert!(
        stderr_text.contains("host kernel's xfs driver"),
        "{stderr_text}"
    );
    // Symlinks resolve inside the guest: the absolute one reaches the guest's os-release.
    let cat = w.img_ok(&["--kernel-mount", "cat", s(img), "/data/abs-link"]);
    assert_eq!(cat.stdout, fs::read(src.join("etc/os-release")).unwrap());
    let cat = w.img_ok(&["--kernel-mount", "cat", s(img), "/data/big"]);
    assert!(
        cat.stdout == fs::read(src.join("data/big")).unwrap(),
        "big file differs"
    );
    // A link to a host path is not followed on the host: the guest has no /proc/self/environ.
    let out = w.img(&["--kernel-mount", "cat", s(img), "/data/host-link"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no such file in the guest"),
        "{}",
        stderr(&out)
    );
    // The ext4 /srv next to the kernel-mounted root comes from the user-space reader.
    let cat = w.img_ok(&["--kernel-mount", "cat", s(img), "/srv/www/index.html"]);
    assert_eq!(cat.stdout, b"<h1>on ext4</h1>\n");
    let out = w.img_ok(&["--kernel-mount", "--json", "inspect", s(img)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fss = v["filesystems"].as_array().unwrap();
    assert_eq!(fss[0]["kind"], "xfs");
    assert_eq!(fss[0]["uuid"], ROOT_UUID);
    assert_eq!(fss[0]["mountpoint"], "/");
    assert_eq!(fss[1]["kind"], "ext4");
    assert_eq!(fss[1]["mountpoint"], "/srv");
    assert_eq!(v["os"]["id"], "kmtest");
}

#[test]
fn xfs_root_with_ext4_srv_raw_and_qcow2() {
    if !prerequisites() {
        return;
    }
    let w = Work::new();
    let src = w.path().join("src");
    fs::create_dir(&src).unwrap();
    populate(
        &src,
        &format!("UUID={ROOT_UUID} / xfs defaults 0 1\nUUID={SRV_UUID} /srv ext4 defaults 0 2\n"),
    );
    let raw = build_xfs_disk(w.path(), &src);
    let qcow = w.path().join("disk.qcow2");
    sh(&format!(
        "qemu-img convert -O qcow2 {} {}",
        raw.display(),
        qcow.display()
    ));

    // Never the default: a clear error naming the filesystem and the flag.
    for img in [&raw, &qcow] {
        let out = w.img(&["ls", s(img), "/"]);
        assert!(!out.status.success());
        let e = stderr(&out);
        assert!(e.contains("xfs") && e.contains("--kernel-mount"), "{e}");
        assert_eq!(e.trim().lines().count(), 1, "one-line error: {e}");
    }

    check_ls_cat(&w, &raw, &src);
    check_ls_cat(&w, &qcow, &src);
    check_tree(&w, &raw, &src, "raw");
    check_tree(&w, &qcow, &src, "qcow2");

    // The image is never written (ro loop, ro mount, no log replay).
    let before = fs::read(&raw).unwrap();
    w.img_ok(&["--kernel-mount", "ls", s(&raw), "/"]);
    assert!(fs::read(&raw).unwrap() == before, "the raw image changed");
}

#[test]
fn corrupt_xfs_fails_cleanly() {
    if !prerequisites() {
        return;
    }
    let w = Work::new();
    let src = w.path().join("src");
    fs::create_dir(&src).unwrap();
    populate(&src, &format!("UUID={ROOT_UUID} / xfs defaults 0 1\n"));
    let raw = build_xfs_disk(w.path(), &src);
    // Keep the magic (so it is probed as xfs) but break the superblock: block size 0 and
    // garbage in the AG geometry.
    sh(&format!(
        "printf '\\000\\000\\000\\000' | dd of={d} bs=1 seek=$((1048576 + 4)) conv=notrunc status=none
         head -c 64 /dev/zero | dd of={d} bs=1 seek=$((1048576 + 80)) conv=notrunc status=none",
        d = raw.display()
    ));
    for args in [
        vec!["--kernel-mount", "ls", s(&raw), "/"],
        vec!["--kernel-mount", "tar-out", s(&raw), "-"],
    ] {
        let out = w.img(&args);
        assert!(!out.status.success(), "{args:?} succeeded on a corrupt xfs");
        let e = stderr(&out);
        assert!(
            e.contains("kernel mount of the xfs filesystem failed"),
            "{e}"
        );
    }
    let qcow = w.path().join("bad.qcow2");
    sh(&format!(
        "qemu-img convert -O qcow2 {} {}",
        raw.display(),
        qcow.display()
    ));
    let out = w.img(&["--kernel-mount", "cat", s(&qcow), "/etc/os-release"]);
    assert!(!out.status.success());
}

#[test]
fn sigterm_mid_tar_out_cleans_up() {
    if !prerequisites() {
        return;
    }
    let w = Work::new();
    let src = w.path().join("src");
    fs::create_dir(&src).unwrap();
    populate(&src, &format!("UUID={ROOT_UUID} / xfs defaults 0 1\n"));
    let raw = build_xfs_disk(w.path(), &src);
    let qcow = w.path().join("disk.qcow2");
    sh(&format!(
        "qemu-img convert -O qcow2 {} {}",
        raw.display(),
        qcow.display()
    ));
    for img in [&raw, &qcow] {
        // Nobody reads the pipe: the tar stream fills it and the process blocks mid-tree,
        // with its filesystem mounted.
        let mut child = w
            .cmd(&["--kernel-mount", "tar-out", s(img), "-"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while w.our_loops().is_empty() || !w.has_mountpoint() {
            assert!(Instant::now() < deadline, "the tool never mounted");
            assert!(child.try_wait().unwrap().is_none(), "exited early");
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: kill on the pid of a child we own and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
        w.assert_nothing_left("SIGTERM");
        assert!(!w.has_mountpoint(), "mount point directory left in TMPDIR");
    }
}

#[test]
fn btrfs_whole_disk() {
    if !prerequisites() {
        return;
    }
    let w = Work::new();
    let src = w.path().join("src");
    fs::create_dir(&src).unwrap();
    populate(&src, &format!("UUID={BTRFS_UUID} / btrfs defaults 0 0\n"));
    let img = w.path().join("btrfs.raw");
    sh(&format!(
        "truncate -s {BTRFS_MB}M {i} && mkfs.btrfs -q -U {BTRFS_UUID} -L kmbtrfs {i}",
        i = img.display()
    ));
    fill_fs(&img, "btrfs", &src, "nothing-excluded");
    let out = w.img(&["ls", s(&img), "/"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("btrfs"), "{}", stderr(&out));
    let out = w.img_ok(&["--kernel-mount", "cat", s(&img), "/srv/www/index.html"]);
    assert_eq!(out.stdout, b"<h1>on ext4</h1>\n");
    let tar = w.path().join("btrfs.tar");
    w.img_ok(&["--kernel-mount", "tar-out", s(&img), s(&tar)]);
    let want = w.path().join("want.jsonl");
    let got = w.path().join("got.jsonl");
    manifest(&src, &want, &[]);
    manifest(&tar, &got, &[]);
    compare(&want, &got, &[]);
}

#[test]
fn without_root_a_clear_error() {
    if !prerequisites() || !have("setpriv") {
        return;
    }
    let w = Work::new();
    let src = w.path().join("src");
    fs::create_dir(&src).unwrap();
    populate(&src, &format!("UUID={ROOT_UUID} / xfs defaults 0 1\n"));
    let raw = build_xfs_disk(w.path(), &src);
    for p in [w.path(), &w.tmp()] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o777)).unwrap();
    }
    fs::set_permissions(&raw, fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin())
        .args(["--kernel-mount", "ls", s(&raw), "/"])
        .env("TMPDIR", w.tmp()));
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("--kernel-mount needs root (loop devices and mount)"),
        "{e}"
    );
    w.assert_nothing_left("non-root run");
}

/// The Debian fixture's debootstrap tree on an xfs root: what `--kernel-mount` reads equals the
/// reference manifest the ext4 variants are checked against, and a full convert (containerize
/// operations on) succeeds on it.
#[test]
fn debian_fixture_on_xfs_matches_the_reference() {
    if !prerequisites() {
        return;
    }
    let fx = common::fixtures();
    let rootfs = fx.join("rootfs");
    if !rootfs.is_dir() {
        eprintln!("NOTICE: no fixture rootfs under {}, skipping", fx.display());
        return;
    }
    let w = Work::new();
    let part = w.path().join("root.xfs");
    let mb = 1536u64;
    sh(&format!(
        "truncate -s {mb}M {p} && mkfs.xfs -q -m uuid={ROOT_UUID} {p}",
        p = part.display()
    ));
    fill_fs(&part, "xfs", &rootfs, "nothing-excluded");
    let disk = w.path().join("debian-xfs.raw");
    sh(&format!(
        "truncate -s {size} {d}
         printf 'label: gpt\\nstart=2048, size={n}, type=linux\\n' | sfdisk -q {d}
         dd if={p} of={d} bs=1M seek=1 conv=notrunc,sparse status=none
         rm {p}",
        size = (mb + 2) * MIB,
        n = mb * MIB / 512,
        d = disk.display(),
        p = part.display()
    ));
    let tar = w.path().join("debian.tar");
    w.img_ok(&["--kernel-mount", "tar-out", s(&disk), s(&tar)]);
    let got = w.path().join("debian.jsonl");
    manifest(&tar, &got, &[]);
    fs::remove_file(&tar).unwrap();
    // The fixture's fstab names its ext4 root; everything else must match.
    compare(
        &fx.join("reference.jsonl"),
        &got,
        &["--ignore", "mtime-dirs", "--exclude", "etc/fstab"],
    );
    let oci = w.path().join("oci");
    let out = w.img_ok(&["--kernel-mount", "--json", "convert", s(&disk), s(&oci)]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["layers"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
}

/// The layout distributions install on btrfs: the root in subvolume `@`, /home in `@home`,
/// both named by the fstab with `subvol=`.
#[test]
fn btrfs_root_and_home_subvolumes() {
    if !prerequisites() {
        return;
    }
    let w = Work::new();
    let src = w.path().join("src");
    fs::create_dir(&src).unwrap();
    populate(
        &src,
        &format!(
            "UUID={BTRFS_UUID} / btrfs subvol=@,compress=zstd 0 0\n\
             UUID={BTRFS_UUID} /home btrfs subvol=/@home 0 0\n"
        ),
    );
    write(&src.join("home/debian/.profile"), b"export A=1\n");
    let img = w.path().join("subvol.raw");
    let tar_flags = "--xattrs --xattrs-include=\"*\" --acls";
    sh(&format!(
        "truncate -s {BTRFS_MB}M {i} && mkfs.btrfs -q -U {BTRFS_UUID} {i}
         unshare --mount --propagation private sh -ec '
           mp=$(mktemp -d)
           mount -t btrfs -o loop {i} $mp
           btrfs -q subvolume create $mp/@
           btrfs -q subvolume create $mp/@home
           mkdir $mp/@snapshots
           tar -C {s} --exclude=./home/* {tar_flags} -cf - . | tar -C $mp/@ {tar_flags} --numeric-owner -xpf -
           tar -C {s}/home {tar_flags} -cf - . | tar -C $mp/@home {tar_flags} --numeric-owner -xpf -
           umount $mp
           rmdir $mp'",
        i = img.display(),
        s = src.display(),
    ));
    let out = w.img_ok(&["--kernel-mount", "cat", s(&img), "/home/debian/.profile"]);
    assert_eq!(out.stdout, b"export A=1\n");
    let out = w.img_ok(&["--kernel-mount", "--json", "inspect", s(&img)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<(String, String)> = v["filesystems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap_or("").to_string(),
                f["mountpoint"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("btrfs subvol=@".into(), "/".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("btrfs subvol=@home".into(), "/home".into())),
        "{kinds:?}"
    );
    let tar = w.path().join("subvol.tar");
    w.img_ok(&["--kernel-mount", "tar-out", s(&img), s(&tar)]);
    let want = w.path().join("want.jsonl");
    let got = w.path().join("got.jsonl");
    manifest(&src, &want, &[]);
    manifest(&tar, &got, &[]);
    compare(&want, &got, &["--ignore", "mtime-dirs"]);
}

/// With the flag, an ext4-only disk is still read in user space: no warning, no loop device,
/// and no root needed.
#[test]
fn ext4_stays_in_user_space() {
    if !prerequisites() || !have("setpriv") {
        return;
    }
    let w = Work::new();
    let src = w.path().join("src");
    fs::create_dir(&src).unwrap();
    write(&src.join("etc/os-release"), b"ID=ext4only\n");
    fs::create_dir_all(src.join("usr/bin")).unwrap();
    let img = w.path().join("ext4.raw");
    sh(&format!(
        "mkfs.ext4 -q -F -d {} {} 16M",
        src.display(),
        img.display()
    ));
    let out = w.img_ok(&["--kernel-mount", "cat", s(&img), "/etc/os-release"]);
    assert_eq!(out.stdout, b"ID=ext4only\n");
    assert!(!stderr(&out).contains("WARN"), "{}", stderr(&out));
    for p in [w.path(), &w.tmp()] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o777)).unwrap();
    }
    fs::set_permissions(&img, fs::Permissions::from_mode(0o644)).unwrap();
    let out = run_ok(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin())
            .args(["--kernel-mount", "cat", s(&img), "/etc/os-release"])
            .env("TMPDIR", w.tmp()),
    );
    assert_eq!(out.stdout, b"ID=ext4only\n");
    w.assert_nothing_left("ext4 with --kernel-mount");
}
