//! `tar-out IMAGE TARGET` where TARGET is not a regular file: a fifo (or, as root, /dev/null)
//! is written to, not replaced by the temp-file rename used for regular files.

mod common;

use common::{bin, run_ok};
use std::fs;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::process::Command;

#[test]
fn tar_out_into_a_fifo_keeps_the_fifo() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::create_dir_all(src.join("usr/bin")).unwrap();
    fs::write(src.join("etc/os-release"), b"ID=fifo\n").unwrap();
    let img = tmp.path().join("root.ext4");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&src)
            .arg(&img)
            .arg("8M"),
    );
    let fifo = tmp.path().join("out.fifo");
    run_ok(Command::new("mkfifo").arg(&fifo));
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut data = Vec::new();
            fs::File::open(&fifo)
                .unwrap()
                .read_to_end(&mut data)
                .unwrap();
            data
        })
    };
    run_ok(Command::new(bin()).arg("tar-out").arg(&img).arg(&fifo));
    // Checked before joining: had the fifo been replaced, the reader would wait forever.
    let ft = fs::symlink_metadata(&fifo).unwrap().file_type();
    assert!(ft.is_fifo(), "the fifo was replaced: {ft:?}");
    let data = reader.join().unwrap();
    let mut names = Vec::new();
    for e in tar::Archive::new(&data[..]).entries().unwrap() {
        names.push(e.unwrap().path().unwrap().display().to_string());
    }
    assert!(names.iter().any(|n| n == "etc/os-release"), "{names:?}");
    let leftovers: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".fatbox-img-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
