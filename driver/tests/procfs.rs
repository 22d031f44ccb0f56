//! fatbox-procfs integration: `free -m` and `nproc` inside follow the flavor. Turns itself on
//! when the procfs FUSE mount is there (built by another issue).

mod common;
use common::Daemon;

#[test]
fn free_and_nproc_follow_the_flavor() {
    let mount = std::path::Path::new("/run/fatbox/procfs");
    if !driver::disk::is_mountpoint(mount) {
        eprintln!(
            "NOTICE: skipped: {} is not mounted (fatbox-procfs not running)",
            mount.display()
        );
        return;
    }
    let d = Daemon::start();
    d.import_fixture("deb");
    d.ok(&[
        "run", "--image", "deb", "--name", "p1", "--vcpus", "1", "--memory", "384", "--disk", "1",
    ]);
    let total: u64 = d
        .exec("p1", "free -m | awk '/^Mem:/ {print $2}'")
        .trim()
        .parse()
        .expect("free -m");
    assert!((370..=384).contains(&total), "free -m total {total}");
    assert_eq!(d.exec("p1", "nproc").trim(), "1");
    d.ok(&["delete", "p1"]);
}
