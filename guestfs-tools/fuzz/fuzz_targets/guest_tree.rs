//! Arbitrary bytes as a whole disk: partitions, filesystems, fstab merge, then the tar writer
//! over the merged tree (names, links, xattrs, sparse data) — what `fatbox-img tar-out` does.
#![no_main]

use guestfs_tools::block::{with_mem_device, Device};
use guestfs_tools::guest::Guest;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

/// Discards output but counts it, so hostile sizes cannot make the target slow forever.
struct Sink(u64);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        if self.0 > 64 << 20 {
            return Err(std::io::Error::other("output cap"));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    with_mem_device(data, Path::new("fuzz.img"), |d| {
        let dev: Device = d;
        if let Ok(g) = Guest::from_device("fuzz.img".into(), dev) {
            let _ = guestfs_tools::tarout::write_tree(&g, Sink(0), &mut |_| {});
            let _ = guestfs_tools::inspect::inspect(&g);
        }
    });
});
