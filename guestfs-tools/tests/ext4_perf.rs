//! Throughput of sequential reads (run with --ignored; prints MB/s).

mod ext4_common;

use ext4_common::*;
use std::io::Read;
use std::time::Instant;

#[test]
#[ignore = "performance measurement, writes a 512 MiB image"]
fn sequential_read_speed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).expect("mkdir");
    let chunk = random_bytes(1 << 20, 11);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(src.join("big")).expect("create");
        for _ in 0..512 {
            f.write_all(&chunk).expect("write");
        }
    }
    let img = tmp.path().join("fs.img");
    mkfs("ext4", &["-b", "4096"], &src, &img, 700);
    let fs_ = open(&img);
    let inode = fs_
        .inode(fs_.lookup(b"/big").expect("l").expect("big"))
        .expect("inode");
    let t = Instant::now();
    let mut r = fs_.reader(&inode);
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        assert!(buf[..n] == chunk[(total as usize % (1 << 20))..][..n]);
        total += n as u64;
    }
    let s = t.elapsed().as_secs_f64();
    assert_eq!(total, 512 << 20);
    eprintln!(
        "read {} MiB in {s:.2}s = {:.0} MiB/s",
        total >> 20,
        512.0 / s
    );
}
