//! Partition tables built by sfdisk, checked against `sfdisk --json`.

use guestfs_tools::block::{open_image, Device, OpenOptions};
use guestfs_tools::part::{read_partitions, TableKind};
use guestfs_tools::Error;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

fn disk(dir: &Path, size: u64, script: &str) -> PathBuf {
    let p = dir.join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    let mut child = Command::new("sfdisk")
        .args(["--no-reread", "--no-tell-kernel", "-q"])
        .arg(&p)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    p
}

fn sfdisk_json(p: &Path) -> serde_json::Value {
    let out = Command::new("sfdisk")
        .arg("--json")
        .arg(p)
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["partitiontable"].clone()
}

fn open(p: &Path) -> Device {
    open_image(p, &OpenOptions::default()).unwrap()
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// Compares every partition sfdisk reports with ours (index from the node name suffix).
fn check_against_sfdisk(p: &Path) -> guestfs_tools::part::PartitionTable {
    let want = sfdisk_json(p);
    let dev = open(p);
    let got = read_partitions(dev.as_ref()).unwrap();
    let wparts = want["partitions"].as_array().unwrap();
    assert_eq!(got.partitions.len(), wparts.len(), "{got:#?} vs {want:#}");
    for w in wparts {
        let node = w["node"].as_str().unwrap();
        let digits = node.len()
            - node
                .chars()
                .rev()
                .take_while(|c| c.is_ascii_digit())
                .count();
        let index: u32 = node[digits..].parse().unwrap();
        let g = got
            .partitions
            .iter()
            .find(|g| g.index == index)
            .unwrap_or_else(|| panic!("no partition {index}"));
        assert_eq!(
            g.start,
            w["start"].as_u64().unwrap() * 512,
            "start of {index}"
        );
        assert_eq!(g.size, w["size"].as_u64().unwrap() * 512, "size of {index}");
        let t = w["type"].as_str().unwrap().to_lowercase();
        match got.kind {
            TableKind::Gpt => {
                assert_eq!(g.type_id, t);
                assert_eq!(
                    g.partuuid.as_deref().unwrap(),
                    w["uuid"].as_str().unwrap().to_lowercase()
                );
                assert_eq!(g.name.as_deref(), w["name"].as_str());
            }
            TableKind::Mbr => {
                assert_eq!(g.type_id, format!("0x{t:0>2}"));
                assert_eq!(g.bootable, w["bootable"].as_bool().unwrap_or(false));
            }
            TableKind::None => panic!("no table"),
        }
    }
    let id = want["id"].as_str().unwrap().to_lowercase();
    assert_eq!(got.disk_id.as_deref().unwrap(), id.trim_start_matches("0x"));
    got
}

const GPT_SCRIPT: &str = "label: gpt
label-id: 5E1F9E5A-1C1B-4A6B-9B6B-3C1D2E3F4A5B
size=2MiB, type=L, name=root
size=3MiB, type=U
start=8MiB, size=4MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"data part\", attrs=\"LegacyBIOSBootable\"
";

#[test]
fn gpt_matches_sfdisk() {
    let dir = TempDir::new().unwrap();
    let p = disk(dir.path(), 20 * MIB, GPT_SCRIPT);
    let t = check_against_sfdisk(&p);
    assert_eq!(t.kind, TableKind::Gpt);
    assert_eq!(
        t.disk_id.as_deref(),
        Some("5e1f9e5a-1c1b-4a6b-9b6b-3c1d2e3f4a5b")
    );
    let data = t.partitions.iter().find(|p| p.index == 3).unwrap();
    assert!(data.bootable);
    assert_eq!(data.name.as_deref(), Some("data part"));
    assert_eq!(
        t.partitions[1].type_id,
        "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
    );
    // The partition device is a window onto the disk.
    let disk = open(&p);
    patch(&p, 8 * MIB + 4096, b"hello");
    let part = data.device(&disk).unwrap();
    assert_eq!(part.size(), 4 * MIB);
    let mut b = [0u8; 5];
    part.read_at(&mut b, 4096).unwrap();
    assert_eq!(&b, b"hello");
    assert!(part.read_at(&mut b, 4 * MIB - 2).is_err());
}

#[test]
fn mbr_with_logicals_matches_sfdisk() {
    let dir = TempDir::new().unwrap();
    let p = disk(
        dir.path(),
        20 * MIB,
        "label: dos
label-id: 0x12345678
size=2MiB, type=83, bootable
size=2MiB, type=82
type=5
size=2MiB, type=83
size=3MiB, type=7
size=1MiB, type=c
",
    );
    let t = check_against_sfdisk(&p);
    assert_eq!(t.kind, TableKind::Mbr);
    let idx: Vec<u32> = t.partitions.iter().map(|p| p.index).collect();
    assert_eq!(idx, [1, 2, 3, 5, 6, 7]);
    let p6 = t.partitions.iter().find(|p| p.index == 6).unwrap();
    assert_eq!(p6.partuuid.as_deref(), Some("12345678-06"));
    assert_eq!(p6.type_id, "0x07");
    assert!(t.partitions[0].bootable);
}

#[test]
fn no_table() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("fs.img");
    std::fs::File::create(&p).unwrap().set_len(4 * MIB).unwrap();
    let t = read_partitions(open(&p).as_ref()).unwrap();
    assert_eq!(t.kind, TableKind::None);
    assert!(t.partitions.is_empty());
    // A whole-disk ext4 filesystem.
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success());
    let t = read_partitions(open(&p).as_ref()).unwrap();
    assert_eq!(t.kind, TableKind::None);
}

#[test]
fn partition_outside_disk() {
    let dir = TempDir::new().unwrap();
    // MBR: primary 2 claims far more sectors than the disk has.
    let p = disk(
        dir.path(),
        8 * MIB,
        "label: dos\nsize=2MiB, type=83\nsize=2MiB, type=83\n",
    );
    patch(&p, 446 + 16 + 12, &0x0100_0000u32.to_le_bytes());
    let err = read_partitions(open(&p).as_ref()).unwrap_err();
    assert!(
        matches!(err, Error::Corrupt { .. }) && err.to_string().contains("MBR partition 2"),
        "{err}"
    );
    // GPT: the disk was cut after partitioning, so partition 3 now ends past it.
    let p = disk(dir.path(), 20 * MIB, GPT_SCRIPT);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(10 * MIB)
        .unwrap();
    let err = read_partitions(open(&p).as_ref()).unwrap_err();
    assert!(
        matches!(err, Error::Corrupt { .. }) && err.to_string().contains("GPT partition 3"),
        "{err}"
    );
}

#[test]
fn gpt_bad_primary_falls_back_to_backup() {
    let dir = TempDir::new().unwrap();
    let p = disk(dir.path(), 20 * MIB, GPT_SCRIPT);
    let good = read_partitions(open(&p).as_ref()).unwrap();
    // Header CRC broken (a byte of the disk GUID).
    patch(&p, 512 + 60, &[0xff]);
    let t = read_partitions(open(&p).as_ref()).unwrap();
    assert_eq!(t.kind, TableKind::Gpt);
    assert_eq!(
        format!("{:?}", t.partitions),
        format!("{:?}", good.partitions)
    );
    // Primary entry array broken instead (header fine).
    let p = disk(dir.path(), 20 * MIB, GPT_SCRIPT);
    let good = read_partitions(open(&p).as_ref()).unwrap();
    patch(&p, 1024 + 40, &[0x77]);
    let t = read_partitions(open(&p).as_ref()).unwrap();
    assert_eq!(
        format!("{:?}", t.partitions),
        format!("{:?}", good.partitions)
    );
    // Both broken: a clear error.
    patch(&p, 20 * MIB - 512 + 60, &[0xff]);
    let err = read_partitions(open(&p).as_ref()).unwrap_err();
    assert!(err.to_string().contains("GPT"), "{err}");
}

#[test]
fn ebr_loop() {
    let dir = TempDir::new().unwrap();
    let p = disk(
        dir.path(),
        20 * MIB,
        "label: dos\ntype=5\nsize=2MiB, type=83\nsize=2MiB, type=83\nsize=2MiB, type=83\n",
    );
    let t = read_partitions(open(&p).as_ref()).unwrap();
    assert_eq!(t.partitions.len(), 4);
    // Find the second EBR through the first one's link, and point its link back at the first.
    let data = std::fs::read(&p).unwrap();
    let ext_start = u32::from_le_bytes(data[446 + 8..446 + 12].try_into().unwrap()) as usize;
    let ebr1 = ext_start * 512;
    let link =
        u32::from_le_bytes(data[ebr1 + 462 + 8..ebr1 + 462 + 12].try_into().unwrap()) as usize;
    let ebr2 = (ext_start + link) * 512;
    assert_eq!(&data[ebr2 + 510..ebr2 + 512], &[0x55, 0xaa]);
    patch(&p, (ebr2 + 462 + 8) as u64, &0u32.to_le_bytes());
    let err = read_partitions(open(&p).as_ref()).unwrap_err();
    assert!(err.to_string().contains("loops"), "{err}");
}

#[test]
fn random_sectors_never_panic() {
    // Take a valid MBR+EBR and GPT disk and scribble on the table sectors.
    let dir = TempDir::new().unwrap();
    let mbr = disk(
        dir.path(),
        4 * MIB,
        "label: dos\ntype=5\nsize=1MiB, type=83\nsize=1MiB, type=83\n",
    );
    let mbr = std::fs::read(mbr).unwrap();
    let gpt = disk(dir.path(), 4 * MIB, "label: gpt\nsize=1MiB\nsize=1MiB\n");
    let gpt = std::fs::read(gpt).unwrap();
    let mut seed = 99u64;
    for i in 0..600 {
        let mut img = if i % 2 == 0 { mbr.clone() } else { gpt.clone() };
        for _ in 0..4 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let pos = ((seed >> 33) as usize) % 34816;
            img[pos] = (seed >> 13) as u8;
        }
        let dev = guestfs_tools::block::MemDevice::new(img, "mem");
        let _ = read_partitions(&dev);
    }
}

/// The fixture disks (built by the fixture script), when present, against sfdisk.
#[test]
fn fixture_disks_match_sfdisk() {
    let mut found = 0;
    for d in std::fs::read_dir("/var/cache/fatbox-fixtures")
        .into_iter()
        .flatten()
        .flatten()
    {
        if !d.path().join(".complete").exists() {
            continue;
        }
        for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            let p = f.path();
            if p.extension().is_none_or(|e| e != "raw") {
                continue;
            }
            // Whole-disk filesystems have no table for sfdisk to dump.
            let ok = Command::new("sfdisk")
                .arg("--json")
                .arg(&p)
                .stderr(Stdio::null())
                .output();
            if ok.is_ok_and(|o| o.status.success() && !o.stdout.is_empty()) {
                let t = check_against_sfdisk(&p);
                eprintln!(
                    "{}: {:?}, {} partitions match sfdisk",
                    p.display(),
                    t.kind,
                    t.partitions.len()
                );
                found += 1;
            }
        }
    }
    if found == 0 {
        eprintln!("NOTICE: no fixture disks under /var/cache/fatbox-fixtures, skipping");
    }
}
