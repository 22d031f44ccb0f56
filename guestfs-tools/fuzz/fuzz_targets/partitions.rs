//! Arbitrary bytes as a raw disk: read its partition table.
#![no_main]

use guestfs_tools::block::{with_mem_device, Device};
use guestfs_tools::part::read_partitions;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    with_mem_device(data, Path::new("fuzz.img"), |d| {
        let dev: Device = d;
        if let Ok(t) = read_partitions(dev.as_ref()) {
            for p in &t.partitions {
                if let Ok(d) = p.device(&dev) {
                    let mut b = [0u8; 16];
                    if d.size() >= 16 {
                        let _ = d.read_at(&mut b, d.size() - 16);
                    }
                }
            }
        }
    });
});
