//! Shared helpers for the ext4 reader tests: run tools, build images, open them.
#![allow(dead_code)]

use guestfs_tools::block::Device;
use guestfs_tools::block::RawImage;
use guestfs_tools::ext4::Ext4;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// Runs a command, failing the test with its output when it exits with a code not in `ok`.
pub fn run_ok(cmd: &mut Command, ok: &[i32]) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let code = out.status.code().unwrap_or(-1);
    assert!(
        ok.contains(&code),
        "{cmd:?} exited {code}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sh(cmd: &str, args: &[&str]) -> String {
    run_ok(Command::new(cmd).args(args), &[0])
}

/// mkfs.<kind> with extra options, populated from `src`, of `size_mb` MiB.
pub fn mkfs(kind: &str, opts: &[&str], src: &Path, img: &Path, size_mb: u32) {
    let mut c = Command::new(format!("mkfs.{kind}"));
    c.arg("-q")
        .arg("-F")
        .args(opts)
        .arg("-d")
        .arg(src)
        .arg(img)
        .arg(format!("{size_mb}M"));
    run_ok(&mut c, &[0]);
}

pub fn open(img: &Path) -> Ext4 {
    let dev: Device = Arc::new(RawImage::open(img).expect("open image"));
    Ext4::open(dev).expect("open ext fs")
}

/// Opens without metadata checksum verification: for tests that patch raw bytes and want
/// the parser behind the checksums to meet them.
pub fn open_unverified(img: &Path) -> Ext4 {
    let dev: Device = Arc::new(RawImage::open(img).expect("open image"));
    Ext4::open_with(dev, false).expect("open ext fs")
}

pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn sha256_file(p: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(p).expect("open for hash");
    std::io::copy(&mut f, &mut h).expect("hash");
    hex::encode(h.finalize())
}

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
pub fn random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 8);
    seed |= 1;
    while v.len() < n {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        v.extend_from_slice(&seed.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(n);
    v
}

/// debugfs -R REQUEST on an image (read-only unless `write`).
pub fn debugfs(img: &Path, request: &str, write: bool) -> String {
    let mut c = Command::new("debugfs");
    if write {
        c.arg("-w");
    }
    c.arg("-R").arg(request).arg(img);
    run_ok(&mut c, &[0])
}
