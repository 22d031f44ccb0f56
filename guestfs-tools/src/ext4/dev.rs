//! The fuzz entry point (test devices come from the block layer: `MemDevice`, `RawImage`).

use super::{Ext4, FileType, ROOT_INO};

/// Fuzz entry: opens `data` as a filesystem and walks it with bounded work. Must never
/// panic, hang or allocate without bound whatever the input.
#[doc(hidden)]
pub fn fuzz_one(data: &[u8]) {
    crate::block::with_mem_device(data, std::path::Path::new("fuzz.img"), |d| {
        let dev: crate::block::Device = d;
        walk(dev, data)
    })
}

fn walk(dev: crate::block::Device, data: &[u8]) {
    if !Ext4::probe(dev.as_ref()) {
        return;
    }
    // Checksums first (so their code is fuzzed too), then without them so that mutated
    // metadata still reaches the parsers behind them.
    let mut fs = match Ext4::open(dev.clone()) {
        Ok(fs) => fs,
        Err(_) => match Ext4::open_with(dev, false) {
            Ok(fs) => fs,
            Err(_) => return,
        },
    };
    // Fast-commit areas need a journal too large for the input cap: the input's last 8 KiB
    // stand in for one, so the walk below also meets replayed state.
    fs.fuzz_fast_commit(data.get(data.len().saturating_sub(8192)..).unwrap_or(&[]));
    let mut todo = vec![ROOT_INO];
    let mut visited = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while let Some(ino) = todo.pop() {
        visited += 1;
        if visited > 256 {
            break;
        }
        let Ok(inode) = fs.inode(ino) else {
            continue;
        };
        let _ = fs.xattrs(&inode);
        match inode.file_type() {
            FileType::Directory => {
                if let Ok(entries) = fs.read_dir(ino) {
                    todo.extend(entries.iter().take(64).map(|e| e.ino));
                }
            }
            FileType::Symlink => {
                let _ = fs.read_link(&inode);
            }
            FileType::Regular => {
                let _ = fs.read_at(&inode, 0, &mut buf);
                let _ = fs.read_at(&inode, inode.size.saturating_sub(100), &mut buf);
                let _ = fs.data_runs(&inode);
            }
            _ => {}
        }
    }
    let _ = fs.lookup(b"/etc/../etc/./fstab");
}
