//! Arbitrary bytes as a qcow2 file held in memory: open, then read the first clusters.
#![no_main]

use guestfs_tools::block::{BlockDevice, MemDevice, OpenOptions, Qcow2};
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::Arc;

/// Reading beyond this would only repeat work on the same few tables.
const READ_LIMIT: u64 = 4 << 20;

fuzz_target!(|data: &[u8]| {
    // The name's directory does not exist, so no backing file can ever be opened.
    let name = Path::new("/nonexistent-fuzz-dir/fuzz.qcow2");
    let dev = Arc::new(MemDevice::new(data.to_vec(), name));
    let Ok(q) = Qcow2::from_device(dev, name, &OpenOptions::default()) else {
        return;
    };
    let _ = q.chain();
    let end = q.size().min(READ_LIMIT);
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
    // A read that spans clusters.
    if q.size() > 1000 {
        let mut b = vec![0u8; 1000.min(q.size() as usize)];
        let _ = q.read_at(&mut b, q.size() / 2 - 500.min(q.size() / 2));
    }
});
