//! Fixture images (built by the fixture script) read by us vs `qemu-img convert -O raw`,
//! and a throughput comparison (`--ignored`, run it in release mode).

use guestfs_tools::block::{open_image, Device, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tempfile::TempDir;

const FIXTURES: &str = "/var/cache/fatbox-fixtures";
const CHUNK: usize = 4 << 20;

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes the device to a sparse raw file, skipping zero chunks like a converter would.
fn convert_ours(dev: &Device, out: &Path) -> Duration {
    let t = Instant::now();
    let f = std::fs::File::create(out).unwrap();
    f.set_len(dev.size()).unwrap();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < dev.size() {
        let n = (dev.size() - off).min(CHUNK as u64) as usize;
        if !dev.is_zero(off, n as u64) {
            dev.read_at(&mut buf[..n], off).unwrap();
            if buf[..n].iter().any(|b| *b != 0) {
                f.write_all_at(&buf[..n], off).unwrap();
            }
        }
        off += n as u64;
    }
    f.sync_data().unwrap();
    t.elapsed()
}

fn convert_qemu(img: &Path, out: &Path) -> Duration {
    let t = Instant::now();
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(img)
        .arg(out));
    let f = std::fs::File::open(out).unwrap();
    f.sync_data().unwrap();
    t.elapsed()
}

fn compare(img: &Path, opts: &OpenOptions) {
    let tmp = TempDir::new_in("/var/tmp").unwrap();
    let (ours, theirs) = (tmp.path().join("ours.raw"), tmp.path().join("qemu.raw"));
    let dev = open_image(img, opts).unwrap();
    let t_ours = convert_ours(&dev, &ours);
    let t_qemu = convert_qemu(img, &theirs);
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(&ours)
        .arg(&theirs));
    eprintln!(
        "{}: {} MiB virtual, ours {:.2}s, qemu-img convert {:.2}s, ratio {:.2}",
        img.display(),
        dev.size() >> 20,
        t_ours.as_secs_f64(),
        t_qemu.as_secs_f64(),
        t_ours.as_secs_f64() / t_qemu.as_secs_f64().max(1e-6)
    );
}

fn fixture_images() -> Vec<PathBuf> {
    let mut v = Vec::new();
    let Ok(dirs) = std::fs::read_dir(FIXTURES) else {
        return v;
    };
    for d in dirs.flatten() {
        if !d.path().join(".complete").exists() {
            continue;
        }
        // The images, and one level of subdirectories (the backing chain).
        for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            let p = f.path();
            if p.is_dir() {
                for g in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                    if g.path().extension().is_some_and(|e| e == "qcow2") {
                        v.push(g.path());
                    }
                }
            } else if p.extension().is_some_and(|e| e == "qcow2") {
                v.push(p);
            }
        }
    }
    v.sort();
    v
}

#[test]
fn fixtures_match_qemu() {
    let imgs = fixture_images();
    if imgs.is_empty() {
        eprintln!("NOTICE: no complete fixtures under {FIXTURES}, skipping");
        return;
    }
    let opts = OpenOptions {
        allow_backing_dirs: vec![PathBuf::from(FIXTURES)],
        ..Default::default()
    };
    for img in imgs {
        compare(&img, &opts);
    }
}

/// 512 MiB of mixed random data and zeros as plain and zstd/zlib-compressed qcow2.
#[test]
#[ignore = "throughput measurement: cargo test --release --test block_fixtures -- --ignored --nocapture"]
fn throughput_vs_qemu_img() {
    let tmp = TempDir::new_in("/var/tmp").unwrap();
    let raw = tmp.path().join("src.raw");
    {
        let f = std::fs::File::create(&raw).unwrap();
        let mut buf = vec![0u8; CHUNK];
        let mut seed = 1u64;
        for i in 0..128u64 {
            if i % 4 == 3 {
                continue;
            }
            for (j, c) in buf.chunks_mut(8).enumerate() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Half the words repeat: compressible like real filesystems, not trivially.
                let w = if j % 2 == 0 { seed } else { j as u64 };
                c.copy_from_slice(&w.to_le_bytes());
            }
            f.write_all_at(&buf, i * CHUNK as u64).unwrap();
        }
        f.set_len(128 * CHUNK as u64).unwrap();
    }
    for (name, extra) in [
        ("plain.qcow2", vec![]),
        ("zlib.qcow2", vec!["-c", "-o", "compression_type=zlib"]),
        ("zstd.qcow2", vec!["-c", "-o", "compression_type=zstd"]),
    ] {
        let img = tmp.path().join(name);
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .args(&extra)
            .arg(&raw)
            .arg(&img));
        compare(&img, &OpenOptions::default());
    }
}
