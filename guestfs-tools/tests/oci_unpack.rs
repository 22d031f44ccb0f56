//! Layer unpacking never writes outside its destination, applies whiteouts, and keeps
//! owners, modes, xattrs, devices and hard links. Needs root (chown, mknod).

use guestfs_tools::oci::{unpack_layer, UnpackMode};
use guestfs_tools::tarout::{EntryMeta, Kind, TarWriter};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

fn tar(entries: &[(EntryMeta, &[u8])]) -> Vec<u8> {
    let mut tw = TarWriter::new(Vec::new());
    for (m, data) in entries {
        if m.kind == Kind::File {
            tw.append(m, data).expect("append");
        } else {
            tw.header(m).expect("header");
        }
    }
    tw.finish().expect("finish").0
}

fn entry(path: &str, kind: Kind, mode: u32) -> EntryMeta {
    EntryMeta::new(path.as_bytes(), kind, mode)
}

fn link(path: &str, kind: Kind, target: &str) -> EntryMeta {
    let mut m = entry(path, kind, 0o777);
    m.link = Some(target.as_bytes().to_vec());
    m
}

#[test]
fn symlink_in_a_parent_cannot_redirect_a_write() {
    let outside = tempfile::tempdir().expect("tempdir");
    let dest = tempfile::tempdir().expect("tempdir");
    let t = tar(&[
        (
            link("x", Kind::Symlink, &outside.path().display().to_string()),
            b"",
        ),
        (entry("x/evil", Kind::File, 0o644), b"pwned"),
    ]);
    let r = unpack_layer(&t[..], dest.path(), UnpackMode::Flatten);
    assert!(r.is_err(), "write through a symlinked parent must fail");
    assert!(!outside.path().join("evil").exists(), "wrote outside");
    // The symlink itself is kept as a symlink.
    assert!(std::fs::symlink_metadata(dest.path().join("x"))
        .expect("x")
        .file_type()
        .is_symlink());
}

#[test]
fn dot_dot_names_and_hard_links_out_are_refused() {
    let dest = tempfile::tempdir().expect("tempdir");
    let t = tar(&[(entry("a/../../evil", Kind::File, 0o644), b"x")]);
    let e = unpack_layer(&t[..], dest.path(), UnpackMode::Flatten).expect_err("..");
    assert!(e.to_string().contains(".."), "{e}");
    let t = tar(&[(link("h", Kind::HardLink, "../../etc/passwd"), b"")]);
    assert!(unpack_layer(&t[..], dest.path(), UnpackMode::Flatten).is_err());
    let parent = dest.path().parent().unwrap_or(Path::new("/"));
    assert!(!parent.join("evil").exists());
}

#[test]
fn metadata_devices_hard_links_and_xattrs_survive() {
    let dest = tempfile::tempdir().expect("tempdir");
    let mut f = entry("d/f", Kind::File, 0o4755);
    f.uid = 1234;
    f.gid = 5678;
    f.mtime = 1_600_000_000;
    f.xattrs = vec![("user.fatbox".into(), b"hello".to_vec())];
    let mut c = entry("d/null", Kind::Char, 0o666);
    c.rdev = (1, 3);
    let t = tar(&[
        (entry("d", Kind::Dir, 0o750), b""),
        (f, b"content"),
        (link("d/h", Kind::HardLink, "d/f"), b""),
        (c, b""),
        (entry("d/fifo", Kind::Fifo, 0o600), b""),
        (link("d/s", Kind::Symlink, "/etc/shadow"), b""),
    ]);
    unpack_layer(&t[..], dest.path(), UnpackMode::Flatten).expect("unpack");
    let d = dest.path().join("d");
    let m = std::fs::metadata(d.join("f")).expect("f");
    assert_eq!(m.mode() & 0o7777, 0o4755);
    assert_eq!((m.uid(), m.gid()), (1234, 5678));
    assert_eq!(m.mtime(), 1_600_000_000);
    assert_eq!(m.nlink(), 2);
    assert_eq!(
        std::fs::metadata(d.join("h")).expect("h").ino(),
        m.ino(),
        "hard link"
    );
    let x = std::process::Command::new("getfattr")
        .args(["--only-values", "-n", "user.fatbox"])
        .arg(d.join("f"))
        .output()
        .expect("getfattr");
    assert_eq!(x.stdout, b"hello");
    let c = std::fs::metadata(d.join("null")).expect("null");
    assert!(c.file_type().is_char_device());
    assert_eq!(c.rdev(), libc_makedev(1, 3));
    assert!(std::fs::metadata(d.join("fifo"))
        .expect("fifo")
        .file_type()
        .is_fifo());
    assert_eq!(
        std::fs::read_link(d.join("s")).expect("s"),
        Path::new("/etc/shadow")
    );
    assert_eq!(std::fs::metadata(&d).expect("d").mode() & 0o7777, 0o750);
}

fn libc_makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xfffff000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffffff00) << 12)
        | (minor & 0xff)
}

#[test]
fn whiteouts_delete_when_flattening_and_become_devices_for_overlayfs() {
    let lower = tar(&[
        (entry("a", Kind::Dir, 0o755), b""),
        (entry("a/b", Kind::File, 0o644), b"b"),
        (entry("a/c", Kind::File, 0o644), b"c"),
        (entry("o", Kind::Dir, 0o755), b""),
        (entry("o/old", Kind::File, 0o644), b"old"),
    ]);
    let upper = tar(&[
        (entry("a", Kind::Dir, 0o755), b""),
        (entry("a/.wh.b", Kind::File, 0o644), b""),
        (entry("o", Kind::Dir, 0o755), b""),
        (entry("o/new", Kind::File, 0o644), b"new"),
        (entry("o/.wh..wh..opq", Kind::File, 0o644), b""),
    ]);
    let flat = tempfile::tempdir().expect("tempdir");
    unpack_layer(&lower[..], flat.path(), UnpackMode::Flatten).expect("lower");
    unpack_layer(&upper[..], flat.path(), UnpackMode::Flatten).expect("upper");
    assert!(!flat.path().join("a/b").exists());
    assert!(flat.path().join("a/c").exists());
    assert!(
        !flat.path().join("o/old").exists(),
        "opaque dir hides lower"
    );
    assert!(
        flat.path().join("o/new").exists(),
        "opaque keeps this layer's"
    );

    let ov = tempfile::tempdir().expect("tempdir");
    unpack_layer(&upper[..], ov.path(), UnpackMode::Overlay).expect("overlay");
    let wh = std::fs::metadata(ov.path().join("a/b")).expect("whiteout");
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    let x = std::process::Command::new("getfattr")
        .args(["--only-values", "-n", "trusted.overlay.opaque"])
        .arg(ov.path().join("o"))
        .output()
        .expect("getfattr");
    assert_eq!(x.stdout, b"y");
}

/// A POSIX ACL xattr value: version 2, then (tag, perm, id) entries, little-endian.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

fn has_xattr(p: &Path, name: &str) -> bool {
    let mut buf = [0u8; 256];
    rustix::fs::lgetxattr(p, name, &mut buf[..]).is_ok()
}

/// A directory's default ACL is inherited by what is created in it; the layer's entries that
/// have no ACL of their own must not end up with one (the guest would see access rights its
/// disk never had).
#[test]
fn a_default_acl_is_not_inherited_by_entries_that_have_none() {
    let dest = tempfile::tempdir().expect("tempdir");
    let any = u32::MAX;
    let default_acl = acl(&[
        (0x01, 7, any),
        (0x02, 7, 1000),
        (0x04, 5, any),
        (0x10, 7, any),
        (0x20, 5, any),
    ]);
    let mut d = entry("data", Kind::Dir, 0o755);
    d.xattrs = vec![("system.posix_acl_default".into(), default_acl.clone())];
    let mut own = entry("data/own", Kind::File, 0o640);
    own.xattrs = vec![("system.posix_acl_access".into(), default_acl.clone())];
    let t = tar(&[
        (d, b""),
        (entry("data/f", Kind::File, 0o640), b"x"),
        (entry("data/sub", Kind::Dir, 0o750), b""),
        (entry("data/sub/g", Kind::File, 0o600), b"y"),
        (entry("data/p", Kind::Fifo, 0o600), b""),
        (own, b"z"),
    ]);
    unpack_layer(&t[..], dest.path(), UnpackMode::Flatten).expect("unpack");
    let data = dest.path().join("data");
    if !has_xattr(&data, "system.posix_acl_default") {
        eprintln!("SKIP: the temp dir's filesystem keeps no POSIX ACLs");
        return;
    }
    for (p, mode) in [("f", 0o640), ("sub", 0o750), ("sub/g", 0o600), ("p", 0o600)] {
        let path = data.join(p);
        assert!(
            !has_xattr(&path, "system.posix_acl_access"),
            "{p} inherited an access ACL"
        );
        assert!(
            !has_xattr(&path, "system.posix_acl_default"),
            "{p} inherited a default ACL"
        );
        let m = std::fs::symlink_metadata(&path).expect("stat");
        assert_eq!(m.mode() & 0o7777, mode, "{p}");
    }
    assert!(has_xattr(&data.join("own"), "system.posix_acl_access"));
}
