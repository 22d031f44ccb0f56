//! Arbitrary bytes as a qcow2 file held in memory: open, then read the first clusters.
#![no_main]

use guestfs_tools::block::{with_mem_device, BlockDevice, OpenOptions, Qcow2};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

/// Read cluster by cluster up to here. Every cluster goes through the same L1/L2 lookup and
/// the seeds' data sits in the first few hundred KiB; the old 4 MiB mostly re-walked
/// unallocated entries (8192 lookups per run with 512-byte clusters) and cost 3/4 of the time.
const READ_LIMIT: u64 = 512 << 10;
/// Then this many reads spread over the whole virtual disk, so far L1 entries are reached too.
const SAMPLES: u64 = 16;

fuzz_target!(|data: &[u8]| {
    // The name's directory does not exist, so no backing file can ever be opened.
    let name = Path::new("/nonexistent-fuzz-dir/fuzz.qcow2");
    with_mem_device(data, name, |dev| {
        let Ok(q) = Qcow2::from_device(dev, name, &OpenOptions::default()) else {
            return;
        };
        let _ = q.chain();
        let size = q.size();
        let end = size.min(READ_LIMIT);
        let step = q.cluster_size().clamp(512, 64 * 1024);
        let mut buf = vec![0u8; step as usize];
        let mut off = 0u64;
        while off < end {
            let n = (end - off).min(step) as usize;
            let _ = q.is_zero(off, n as u64);
            // Errors are fine; panics, hangs and huge allocations are what we look for.
            let _ = q.read_at(&mut buf[..n], off);
            off += n as u64;
        }
        if size > READ_LIMIT {
            for i in 1..=SAMPLES {
                let at = (size / SAMPLES).saturating_mul(i).min(size - 1);
                let at = at - at % step;
                let n = (size - at).min(step) as usize;
                let _ = q.is_zero(at, n as u64);
                let _ = q.read_at(&mut buf[..n], at);
            }
        }
        // A read that spans clusters.
        if size > 1000 {
            let mut b = vec![0u8; 1000];
            let _ = q.read_at(&mut b, size / 2 - 500);
        }
    });
});
