//! Arbitrary bytes as an OCI image layer (plain, gzip or zstd tar; the first byte picks the
//! flatten or overlay mode), unpacked into a fresh directory. Besides not crashing, nothing
//! may land next to the unpack root: a `..`, absolute, symlink or hard-link escape would.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::atomic::{AtomicU64, Ordering};

static RUN: AtomicU64 = AtomicU64::new(0);

fn open_up(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            open_up(&e.path());
        }
    }
}

/// tmpfs when there is one: the unpacking is syscall-bound and a disk filesystem's journal
/// made it several times slower. FUZZ_SCRATCH overrides.
fn scratch_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("FUZZ_SCRATCH") {
        return d.into();
    }
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, layer)) = data.split_first() else {
        return;
    };
    let base = scratch_dir().join(format!(
        "fuzz-oci-layer-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let root = base.join("root");
    if std::fs::create_dir_all(&root).is_err() {
        return;
    }
    let mode = if sel & 1 == 1 {
        guestfs_tools::oci::UnpackMode::Overlay
    } else {
        guestfs_tools::oci::UnpackMode::Flatten
    };
    // 64 KiB buffers: ASan maps and zero-faults every allocation above 128 KiB afresh.
    let _ = guestfs_tools::oci::unpack_layer_buffered(layer, &root, mode, 64 << 10);
    let names: Vec<_> = std::fs::read_dir(&base)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    if std::fs::remove_dir_all(&base).is_err() {
        // A layer may ship 0000 directories: make everything removable again, then retry.
        open_up(&base);
        let _ = std::fs::remove_dir_all(&base);
    }
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("root")],
        "escaped the unpack root"
    );
});
