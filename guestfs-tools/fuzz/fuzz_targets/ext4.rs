//! Arbitrary bytes as an ext2/3/4 filesystem: open (journal replay included), walk, read.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    guestfs_tools::ext4::fuzz_one(data);
});
