//! Shared helpers for the fixture-image tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The fixture directory: `$FATBOX_FIXTURES`, or built (cached) by the fixture script.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(d) = std::env::var("FATBOX_FIXTURES") {
            return PathBuf::from(d);
        }
        let script = repo_root().join("tests/fixtures/build-guest-images.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "fixture script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or("").trim().to_string();
        PathBuf::from(last)
    })
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fatbox-img"))
}

pub fn manifest_py() -> PathBuf {
    repo_root().join("tests/fixtures/manifest.py")
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    out
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Writes the manifest of a dir or tar to `out`.
pub fn manifest(path: &Path, out: &Path, extra: &[&str]) {
    let o = run_ok(
        Command::new("python3")
            .arg(manifest_py())
            .args(extra)
            .arg(path),
    );
    std::fs::write(out, &o.stdout).expect("writing manifest");
}

/// Compares two manifests; panics with the differences.
pub fn compare(a: &Path, b: &Path, extra: &[&str]) {
    let o = run(Command::new("python3")
        .arg(manifest_py())
        .arg("compare")
        .arg(a)
        .arg(b)
        .args(extra));
    assert!(
        o.status.success(),
        "trees differ ({} vs {}):\n{}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
