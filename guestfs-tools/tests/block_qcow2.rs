//! qcow2 reader checked byte for byte against `qemu-img convert -O raw`, and refusing bad
//! images with clear errors.

use guestfs_tools::block::{open_image, BlockDevice, MemDevice, OpenOptions, Qcow2};
use guestfs_tools::Error;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_img(args: &[&str]) {
    run(Command::new("qemu-img").args(args));
}

fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(img);
    run(&mut c);
}

/// splitmix64: deterministic data without a rand dependency.
fn fill_random(buf: &mut [u8], mut seed: u64) {
    for chunk in buf.chunks_mut(8) {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let b = z.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// A raw disk of `size` bytes: random data with zero holes and a highly compressible run,
/// so qcow2 conversion produces data, unallocated and compressed clusters.
fn make_raw(dir: &Path, name: &str, size: u64, seed: u64) -> PathBuf {
    let mut data = vec![0u8; size as usize];
    fill_random(&mut data, seed);
    let s = size as usize;
    data[s / 4..s / 4 + s / 8].fill(0);
    data[s / 2..s / 2 + 70_000].fill(b'A');
    data[s - 100_000..s - 30_000].fill(0);
    let p = dir.join(name);
    std::fs::write(&p, &data).unwrap();
    p
}

fn reference(img: &Path) -> Vec<u8> {
    let dir = TempDir::new().unwrap();
    let out = dir.path().join("ref.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

/// Reads the whole device in uneven chunks (crossing clusters) and compares with qemu.
fn assert_same_as_qemu(img: &Path, opts: &OpenOptions) {
    let want = reference(img);
    let dev = open_image(img, opts).unwrap();
    assert_eq!(dev.size(), want.len() as u64, "virtual size of {img:?}");
    let mut got = vec![0u8; want.len()];
    let mut off = 0usize;
    let mut step = 1usize;
    while off < got.len() {
        step = (step * 7 + 4093) % (300 * 1024) + 1;
        let end = (off + step).min(got.len());
        dev.read_at(&mut got[off..end], off as u64).unwrap();
        off = end;
    }
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("{img:?}: first difference at byte {i:#x}");
    }
    // Whole-image read in one call: exercises coalesced runs.
    let mut all = vec![0u8; want.len()];
    dev.read_at(&mut all, 0).unwrap();
    assert!(all == want, "{img:?}: one-shot read differs");
    // is_zero must never claim a range with data is zero.
    let chunk = 64 * 1024;
    for (i, c) in want.chunks(chunk).enumerate() {
        let o = (i * chunk) as u64;
        if dev.is_zero(o, c.len() as u64) {
            assert!(c.iter().all(|b| *b == 0), "{img:?}: is_zero lies at {o:#x}");
        }
    }
}

fn convert_variant(opts: &[&str], compress: bool) {
    let dir = TempDir::new().unwrap();
    let raw = make_raw(dir.path(), "src.raw", 5 * MIB + 3 * 512, 42);
    let img = dir.path().join("img.qcow2");
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    if compress {
        args.push("-c");
    }
    for o in opts {
        args.extend(["-o", o]);
    }
    args.push(raw.to_str().unwrap());
    args.push(img.to_str().unwrap());
    qemu_img(&args);
    assert_same_as_qemu(&img, &OpenOptions::default());
    // And identical to the source itself.
    let want = std::fs::read(&raw).unwrap();
    let dev = open_image(&img, &OpenOptions::default()).unwrap();
    let mut got = vec![0u8; want.len()];
    dev.read_at(&mut got, 0).unwrap();
    assert!(got == want);
}

#[test]
fn v2_compat_010() {
    convert_variant(&["compat=0.10"], false);
}

#[test]
fn v3_cluster_512() {
    convert_variant(&["compat=1.1,cluster_size=512"], false);
}

#[test]
fn v3_cluster_4k() {
    convert_variant(&["cluster_size=4096"], false);
}

#[test]
fn v3_cluster_64k() {
    convert_variant(&["cluster_size=65536"], false);
}

#[test]
fn v3_cluster_2m() {
    convert_variant(&["cluster_size=2M"], false);
}

#[test]
fn compressed_zlib() {
    convert_variant(&["compression_type=zlib"], true);
}

#[test]
fn compressed_zlib_v2_4k() {
    convert_variant(&["compat=0.10,cluster_size=4096"], true);
}

#[test]
fn compressed_zstd() {
    convert_variant(&["compression_type=zstd"], true);
}

#[test]
fn compressed_zstd_2m() {
    convert_variant(&["compression_type=zstd,cluster_size=2M"], true);
}

#[test]
fn extended_l2() {
    convert_variant(&["extended_l2=on,cluster_size=128k"], false);
}

#[test]
fn extended_l2_compressed() {
    convert_variant(
        &["extended_l2=on,cluster_size=64k,compression_type=zstd"],
        true,
    );
}

/// Zero clusters (allocated and not), discards and sub-cluster writes made with qemu-io.
#[test]
fn sparse_and_zero_clusters() {
    for (opts, name) in [
        ("cluster_size=65536", "std.qcow2"),
        ("extended_l2=on,cluster_size=65536", "ext.qcow2"),
        ("compat=0.10", "v2.qcow2"),
    ] {
        let dir = TempDir::new().unwrap();
        let raw = make_raw(dir.path(), "src.raw", 4 * MIB, 7);
        let img = dir.path().join(name);
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            opts,
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        qemu_io(
            &img,
            "qcow2",
            &[
                "write -z 0 128k",
                "write -z -u 1M 192k",
                "discard 2M 64k",
                "write -P 0xab 3M 4k",
                "write -z 3200k 6k",
                "write -P 0xcd 3300k 1k",
            ],
        );
        assert_same_as_qemu(&img, &OpenOptions::default());
        let dev = open_image(&img, &OpenOptions::default()).unwrap();
        if !name.starts_with("v2") {
            assert!(
                dev.is_zero(0, 128 * 1024),
                "{name}: zero clusters not reported by is_zero"
            );
        }
    }
}

#[test]
fn backing_chain_three_deep() {
    let dir = TempDir::new().unwrap();
    let sub = dir.path().join("layers");
    std::fs::create_dir(&sub).unwrap();
    let raw = make_raw(dir.path(), "src.raw", 4 * MIB, 99);
    let base = sub.join("base.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        raw.to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
    let mid = sub.join("mid.qcow2");
    // Relative names, and a grown virtual size: past the base reads zeros.
    run(Command::new("qemu-img").current_dir(&sub).args([
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "mid.qcow2",
        "5M",
    ]));
    qemu_io(
        &mid,
        "qcow2",
        &["write -P 0x11 100k 200k", "write -z 1M 64k"],
    );
    let top = dir.path().join("top.qcow2");
    run(Command::new("qemu-img").current_dir(dir.path()).args([
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        "-b",
        "layers/mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "6M",
    ]));
    qemu_io(
        &top,
        "qcow2",
        &["write -P 0x22 150k 10k", "write -P 0x33 4700k 300k"],
    );
    assert_same_as_qemu(&top, &OpenOptions::default());
    let dev = open_image(&top, &OpenOptions::default()).unwrap();
    let chain = dev.chain();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[0].backing_file.as_deref(), Some("layers/mid.qcow2"));
    assert_eq!(chain[1].backing_file.as_deref(), Some("base.qcow2"));
    assert_eq!(chain[2].cluster_size, Some(4096));
    assert_eq!(chain[0].compat.as_deref(), Some("1.1"));
}

#[test]
fn backing_raw_shorter_than_overlay_without_format() {
    let dir = TempDir::new().unwrap();
    make_raw(dir.path(), "base.raw", 3 * MIB, 5);
    run(Command::new("qemu-img").current_dir(dir.path()).args([
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "top.qcow2",
        "8M",
    ]));
    let top = dir.path().join("top.qcow2");
    qemu_io(&top, "qcow2", &["write -P 0x5a 2M 2M"]);
    assert_same_as_qemu(&top, &OpenOptions::default());
    // Without the format extension (renamed to an unknown one) we probe the backing file.
    let hdr = std::fs::read(&top).unwrap();
    let ext = hdr
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    patch(&top, ext as u64, &[0x12, 0x34, 0x56, 0x78]);
    let dev = open_image(&top, &OpenOptions::default()).unwrap();
    assert_eq!(dev.chain()[1].format, "raw");
    assert!(dev.is_zero(4 * MIB, MIB));
}

#[test]
fn backing_in_allowed_dir() {
    let base_dir = TempDir::new().unwrap();
    let top_dir = TempDir::new().unwrap();
    let base = make_raw(base_dir.path(), "base.raw", MIB, 1);
    let top = top_dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        top.to_str().unwrap(),
    ]);
    let err = open_image(&top, &OpenOptions::default()).err().unwrap();
    assert!(matches!(err, Error::Refused(_)), "{err}");
    let opts = OpenOptions {
        allow_backing_dirs: vec![base_dir.path().to_path_buf()],
        ..Default::default()
    };
    assert_same_as_qemu(&top, &opts);
}

// ---------- bad images ----------

fn valid_image(dir: &Path, opts: &str, compress: bool) -> PathBuf {
    let raw = make_raw(dir, "src.raw", 2 * MIB, 3);
    let img = dir.join("img.qcow2");
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2", "-o", opts];
    if compress {
        args.push("-c");
    }
    args.extend([raw.to_str().unwrap(), img.to_str().unwrap()]);
    qemu_img(&args);
    img
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn be64_at(data: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(data[off..off + 8].try_into().unwrap())
}

/// Opens and reads everything; returns the first error.
fn open_and_read(path: &Path) -> Result<(), Error> {
    let dev = open_image(path, &OpenOptions::default())?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0;
    while off < dev.size() {
        let n = (dev.size() - off).min(buf.len() as u64) as usize;
        dev.read_at(&mut buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

fn expect_err(path: &Path, pred: impl Fn(&Error) -> bool, needle: &str) {
    let err = open_and_read(path)
        .err()
        .unwrap_or_else(|| panic!("{path:?} opened fine"));
    let msg = err.to_string();
    assert!(
        pred(&err) && msg.contains(needle),
        "unexpected error: {msg}"
    );
}

#[test]
fn truncated_in_header() {
    let dir = TempDir::new().unwrap();
    let img = valid_image(dir.path(), "compat=1.1", false);
    let orig = std::fs::read(&img).unwrap();
    for len in [0usize, 3, 50, 90, 110] {
        std::fs::write(&img, &orig[..len]).unwrap();
        // A file too short for the magic is a (tiny) raw image, not an error.
        if len < 4 {
            open_and_read(&img).unwrap();
            continue;
        }
        let err = open_and_read(&img).err().unwrap();
        assert!(matches!(err, Error::Corrupt { .. }), "{len}: {err}");
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}

#[test]
fn truncated_in_l1() {
    let dir = TempDir::new().unwrap();
    let img = valid_image(dir.path(), "compat=1.1,cluster_size=512", false);
    let data = std::fs::read(&img).unwrap();
    let l1 = be64_at(&data, 40);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(l1 + 4)
        .unwrap();
    expect_err(
        &img,
        |e| matches!(e, Error::Corrupt { offset, .. } if *offset == l1),
        "L1 table",
    );
}

#[test]
fn l1_offset_past_eof() {
    let dir = TempDir::new().unwrap();
    let img = valid_image(dir.path(), "compat=1.1", false);
    patch(&img, 40, &(1u64 << 40).to_be_bytes());
    expect_err(
        &img,
        |e| matches!(e, Error::Corrupt { offset, .. } if *offset == 1 << 40),
        "past the end",
    );
}

#[test]
fn l1_size_terabytes() {
    let dir = TempDir::new().unwrap();
    let img = valid_image(dir.path(), "compat=1.1", false);
    // 8 TiB virtual size with 64k clusters needs 16384 L1 entries (fine), but 2^31 entries
    // would need 16 GiB of memory.
    patch(&img, 24, &(8u64 << 40).to_be_bytes());
    patch(&img, 36, &0x8000_0000u32.to_be_bytes());
    expect_err(&img, |e| matches!(e, Error::Limit(_)), "L1 table");
    // A virtual size of 1 EiB.
    patch(&img, 24, &(1u64 << 60).to_be_bytes());
    expect_err(&img, |e| matches!(e, Error::Limit(_)), "virtual size");
    // An L1 table that fits the cap but lies past the end of the file.
    let len = std::fs::metadata(&img).unwrap().len();
    patch(&img, 24, &(8u64 << 40).to_be_bytes());
    patch(&img, 36, &16384u32.to_be_bytes());
    patch(&img, 40, &(len & !0xffff).to_be_bytes());
    expect_err(&img, |e| matches!(e, Error::Corrupt { .. }), "L1 table");
}

#[test]
fn l2_and_data_past_eof() {
    let dir = TempDir::new().unwrap();
    let img = valid_image(dir.path(), "compat=1.1", false);
    let data = std::fs::read(&img).unwrap();
    let l1 = be64_at(&data, 40);
    let l2 = be64_at(&data, l1 as usize) & 0x00ff_ffff_ffff_fe00;
    // Data cluster 0 moved far past the end of the file.
    let entry = be64_at(&data, l2 as usize);
    patch(
        &img,
        l2,
        &((entry & (1 << 63)) | (1u64 << 45)).to_be_bytes(),
    );
    expect_err(
        &img,
        |e| matches!(e, Error::Corrupt { offset, .. } if *offset == 1 << 45),
        "data cluster past end",
    );
    // L2 table itself past the end.
    patch(&img, l1, &((1u64 << 63) | (1u64 << 44)).to_be_bytes());
    expect_err(
        &img,
        |e| matches!(e, Error::Corrupt { offset, .. } if *offset == 1 << 44),
        "L2 table past end",
    );
}

/// Replaces the first compressed cluster's data with a stream that inflates to twice the
/// cluster size.
fn inflate_bomb(kind: &str) {
    let dir = TempDir::new().unwrap();
    let img = valid_image(
        dir.path(),
        &format!("compat=1.1,cluster_size=65536,compression_type={kind}"),
        true,
    );
    let data = std::fs::read(&img).unwrap();
    let l1 = be64_at(&data, 40);
    let l2 = be64_at(&data, l1 as usize) & 0x00ff_ffff_ffff_fe00;
    // Cluster 16 (1 MiB) is the run of 'A's: the only one qemu keeps compressed.
    let entry = be64_at(&data, l2 as usize + 16 * 8);
    assert!(entry & (1 << 62) != 0, "cluster 16 not compressed");
    let x = 62 - (16 - 8);
    let coff = entry & ((1u64 << x) - 1);
    let big = vec![0u8; 128 * 1024];
    let stream = if kind == "zstd" {
        zstd::bulk::compress(&big, 3).unwrap()
    } else {
        let mut c = flate2::Compress::new(flate2::Compression::best(), false);
        let mut out = Vec::with_capacity(1024);
        c.compress_vec(&big, &mut out, flate2::FlushCompress::Finish)
            .unwrap();
        out
    };
    assert!(stream.len() < 400, "bomb stream {} bytes", stream.len());
    patch(&img, coff, &stream);
    expect_err(
        &img,
        |e| matches!(e, Error::Corrupt { offset, .. } if *offset == coff),
        "past the cluster size",
    );
}

#[test]
fn compressed_zlib_inflates_past_cluster() {
    inflate_bomb("zlib");
}

#[test]
fn compressed_zstd_inflates_past_cluster() {
    inflate_bomb("zstd");
}

fn backing_refused(backing: &str, needle: &str) {
    let dir = TempDir::new().unwrap();
    let sub = dir.path().join("a").join("b");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(dir.path().join("x"), b"outside").unwrap();
    run(Command::new("qemu-img").current_dir(&sub).args([
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        backing,
        "-F",
        "raw",
        "top.qcow2",
        "1M",
    ]));
    expect_err(
        &sub.join("top.qcow2"),
        |e| matches!(e, Error::Refused(_)),
        needle,
    );
}

#[test]
fn backing_etc_shadow_refused() {
    backing_refused("/etc/shadow", "outside the allowed directories");
}

#[test]
fn backing_dotdot_refused() {
    backing_refused("../../x", "outside the allowed directories");
}

#[test]
fn backing_symlink_escape_refused() {
    let dir = TempDir::new().unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
    run(Command::new("qemu-img").current_dir(dir.path()).args([
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "link",
        "-F",
        "raw",
        "top.qcow2",
        "1M",
    ]));
    expect_err(
        &dir.path().join("top.qcow2"),
        |e| matches!(e, Error::Refused(_)),
        "symlink",
    );
}

#[test]
fn backing_json_protocol_refused() {
    let dir = TempDir::new().unwrap();
    run(Command::new("qemu-img").current_dir(dir.path()).args([
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "json:{\"driver\":\"file\",\"filename\":\"/etc/shadow\"}",
        "-F",
        "raw",
        "top.qcow2",
        "1M",
    ]));
    expect_err(
        &dir.path().join("top.qcow2"),
        |e| matches!(e, Error::Refused(_)),
        "protocol",
    );
}

#[test]
fn backing_loop_refused() {
    let dir = TempDir::new().unwrap();
    let c = |args: &[&str]| run(Command::new("qemu-img").current_dir(dir.path()).args(args));
    c(&[
        "create", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2", "1M",
    ]);
    c(&[
        "create", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", "1M",
    ]);
    expect_err(
        &dir.path().join("a.qcow2"),
        |e| matches!(e, Error::Refused(_)),
        "loop",
    );
    // Self-reference.
    c(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "./s.qcow2",
        "-F",
        "qcow2",
        "s.qcow2",
        "1M",
    ]);
    expect_err(
        &dir.path().join("s.qcow2"),
        |e| matches!(e, Error::Refused(_)),
        "loop",
    );
}

#[test]
fn backing_chain_too_deep() {
    let dir = TempDir::new().unwrap();
    let c = |args: &[&str]| run(Command::new("qemu-img").current_dir(dir.path()).args(args));
    c(&["create", "-f", "qcow2", "l0.qcow2", "1M"]);
    for i in 1..=18 {
        let (b, t) = (format!("l{}.qcow2", i - 1), format!("l{i}.qcow2"));
        c(&[
            "create", "-f", "qcow2", "-u", "-b", &b, "-F", "qcow2", &t, "1M",
        ]);
    }
    // 16 backing files below the top are fine, 17 are not.
    open_and_read(&dir.path().join("l16.qcow2")).unwrap();
    expect_err(
        &dir.path().join("l17.qcow2"),
        |e| matches!(e, Error::Limit(_)),
        "deeper than 16",
    );
}

#[test]
fn external_data_file_refused() {
    let dir = TempDir::new().unwrap();
    run(Command::new("qemu-img").current_dir(dir.path()).args([
        "create",
        "-f",
        "qcow2",
        "-o",
        "data_file=data.raw",
        "top.qcow2",
        "1M",
    ]));
    expect_err(
        &dir.path().join("top.qcow2"),
        |e| matches!(e, Error::Refused(_)),
        "external data file",
    );
}

#[test]
fn unknown_incompatible_bit() {
    let dir = TempDir::new().unwrap();
    let img = valid_image(dir.path(), "compat=1.1", false);
    patch(&img, 72, &(1u64 << 20).to_be_bytes());
    expect_err(&img, |e| matches!(e, Error::Unsupported(_)), "bit 20");
}

#[test]
fn corrupt_bit_refused_dirty_bit_read() {
    let dir = TempDir::new().unwrap();
    let img = valid_image(dir.path(), "compat=1.1", false);
    patch(&img, 72, &1u64.to_be_bytes());
    open_and_read(&img).unwrap();
    patch(&img, 72, &2u64.to_be_bytes());
    expect_err(
        &img,
        |e| matches!(e, Error::Corrupt { .. }),
        "marked corrupt",
    );
}

#[test]
fn encryption_refused() {
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("enc.qcow2");
    run(Command::new("qemu-img").args([
        "create",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=pw",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        img.to_str().unwrap(),
        "1M",
    ]));
    expect_err(&img, |e| matches!(e, Error::Unsupported(_)), "encrypted");
    let img = valid_image(dir.path(), "compat=0.10", false);
    patch(&img, 32, &1u32.to_be_bytes());
    expect_err(
        &img,
        |e| matches!(e, Error::Unsupported(_)),
        "crypt_method 1",
    );
}

/// Deterministic mutations of a small image through the in-memory device: anything may
/// fail, nothing may panic. (The fuzz targets do this at scale.)
#[test]
fn mutated_headers_never_panic() {
    let dir = TempDir::new().unwrap();
    let img = valid_image(
        dir.path(),
        "compat=1.1,cluster_size=4096,compression_type=zstd",
        true,
    );
    let orig = std::fs::read(&img).unwrap();
    let mut rnd = [0u8; 8 * 3 * 400];
    fill_random(&mut rnd, 1234);
    for m in rnd.chunks(24) {
        let mut data = orig.clone();
        let r = |i: usize| u64::from_le_bytes(m[i * 8..i * 8 + 8].try_into().unwrap());
        let pos = (r(0) % 16384.min(data.len() as u64)) as usize;
        data[pos] = r(1) as u8;
        let pos2 = (r(2) % data.len() as u64) as usize;
        data[pos2] ^= 0xff;
        let dev = Arc::new(MemDevice::new(data, "/nonexistent/fuzz.qcow2"));
        if let Ok(q) = Qcow2::from_device(
            dev,
            Path::new("/nonexistent/fuzz.qcow2"),
            &OpenOptions::default(),
        ) {
            let mut buf = vec![0u8; 64 * 1024];
            let mut off = 0;
            while off < q.size().min(8 * MIB) {
                let n = (q.size() - off).min(buf.len() as u64) as usize;
                let _ = q.read_at(&mut buf[..n], off);
                off += n as u64;
            }
        }
    }
}
