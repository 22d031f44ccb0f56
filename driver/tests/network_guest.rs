//! Guest network configuration: detection and files for ifupdown, systemd-networkd and netplan,
//! and that a hostile rootfs cannot redirect the writes outside itself.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use driver::network::{detect_guest_network, parse_nic, write_guest_config, GuestNetworkConfig};

fn touch(root: &Path, rel: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, "").unwrap();
}

fn nics() -> Vec<(u32, driver::network::NicSpec)> {
    vec![
        (
            0,
            parse_nic("vlan=100,ip=10.20.0.5/24,gw=10.20.0.1,dns=10.20.0.2,mtu=1400").unwrap(),
        ),
        (
            1,
            parse_nic("vlan=200,ip=10.30.0.5/24,ip=fd00::5/64").unwrap(),
        ),
        (2, parse_nic("vlan=300,dhcp").unwrap()),
    ]
}

#[test]
fn ifupdown() {
    let t = tempfile::tempdir().unwrap();
    touch(t.path(), "usr/sbin/ifup");
    fs::write(
        t.path().join("etc/network/interfaces").tap_mkdir(),
        "auto lo\niface lo inet loopback",
    )
    .unwrap();
    let kind = write_guest_config(t.path(), &nics()).unwrap();
    assert_eq!(kind, Some(GuestNetworkConfig::Ifupdown));
    let f = fs::read_to_string(t.path().join("etc/network/interfaces.d/fatbox")).unwrap();
    assert!(f.contains("auto eth0\niface eth0 inet static\n    address 10.20.0.5/24\n    mtu 1400\n    gateway 10.20.0.1\n    dns-nameservers 10.20.0.2\n"), "{f}");
    assert!(
        f.contains("iface eth1 inet6 static\n    address fd00::5/64"),
        "{f}"
    );
    assert!(f.contains("iface eth2 inet dhcp"), "{f}");
    let main = fs::read_to_string(t.path().join("etc/network/interfaces")).unwrap();
    assert_eq!(
        main,
        "auto lo\niface lo inet loopback\nsource /etc/network/interfaces.d/*\n"
    );
    // Second run does not add the source line again.
    write_guest_config(t.path(), &nics()).unwrap();
    assert_eq!(
        fs::read_to_string(t.path().join("etc/network/interfaces")).unwrap(),
        main
    );
}

trait MkParent {
    fn tap_mkdir(self) -> Self;
}
impl MkParent for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        fs::create_dir_all(self.parent().unwrap()).unwrap();
        self
    }
}

#[test]
fn networkd_enabled_and_installed() {
    let t = tempfile::tempdir().unwrap();
    let wants = t.path().join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants).unwrap();
    symlink(
        "/lib/systemd/system/systemd-networkd.service",
        wants.join("systemd-networkd.service"),
    )
    .unwrap();
    touch(t.path(), "usr/sbin/ifup"); // enabled networkd wins over installed ifupdown
    assert_eq!(
        write_guest_config(t.path(), &nics()).unwrap(),
        Some(GuestNetworkConfig::Networkd { enable: false })
    );
    let f =
        fs::read_to_string(t.path().join("etc/systemd/network/10-fatbox-eth0.network")).unwrap();
    assert!(f.contains("[Match]\nName=eth0\n"), "{f}");
    assert!(f.contains("[Link]\nMTUBytes=1400\n"), "{f}");
    assert!(
        f.contains("DHCP=no\nAddress=10.20.0.5/24\nGateway=10.20.0.1\nDNS=10.20.0.2\n"),
        "{f}"
    );
    let f2 =
        fs::read_to_string(t.path().join("etc/systemd/network/10-fatbox-eth2.network")).unwrap();
    assert!(f2.contains("DHCP=yes"), "{f2}");

    let t = tempfile::tempdir().unwrap();
    touch(t.path(), "usr/lib/systemd/systemd-networkd");
    symlink("usr/lib", t.path().join("lib")).unwrap();
    assert_eq!(
        write_guest_config(t.path(), &nics()).unwrap(),
        Some(GuestNetworkConfig::Networkd { enable: true })
    );
    let link = fs::read_link(
        t.path()
            .join("etc/systemd/system/multi-user.target.wants/systemd-networkd.service"),
    )
    .unwrap();
    assert_eq!(
        link,
        Path::new("/lib/systemd/system/systemd-networkd.service")
    );
}

#[test]
fn netplan() {
    let t = tempfile::tempdir().unwrap();
    touch(t.path(), "usr/sbin/netplan");
    assert_eq!(
        detect_guest_network(t.path()).unwrap(),
        Some(GuestNetworkConfig::Netplan)
    );
    write_guest_config(t.path(), &nics()).unwrap();
    let p = t.path().join("etc/netplan/90-fatbox.yaml");
    let f = fs::read_to_string(&p).unwrap();
    assert!(f.contains("    eth0:\n      dhcp4: false\n      mtu: 1400\n      addresses: [\"10.20.0.5/24\"]\n      routes:\n        - to: \"0.0.0.0/0\"\n          via: \"10.20.0.1\"\n      nameservers:\n        addresses: [\"10.20.0.2\"]\n"), "{f}");
    assert!(f.contains("    eth2:\n      dhcp4: true\n"), "{f}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn no_known_system_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    fs::create_dir_all(t.path().join("etc")).unwrap();
    assert_eq!(write_guest_config(t.path(), &nics()).unwrap(), None);
    assert!(!t.path().join("etc/network").exists());
    assert!(!t.path().join("etc/systemd").exists());
}

#[test]
fn hostile_symlinks_stay_inside_rootfs() {
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("victim"), "keep").unwrap();
    let t = tempfile::tempdir().unwrap();
    touch(t.path(), "usr/sbin/netplan");
    // Directory symlink to an absolute host path, and the final file as a symlink to a host file.
    fs::create_dir_all(t.path().join("etc")).unwrap();
    symlink(outside.path(), t.path().join("etc/netplan")).unwrap();
    let r = write_guest_config(t.path(), &nics());
    // Resolved inside the root the target does not exist: an error, never a write outside.
    assert!(r.is_err(), "{r:?}");
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 1);

    fs::remove_file(t.path().join("etc/netplan")).unwrap();
    fs::create_dir_all(t.path().join("etc/netplan")).unwrap();
    symlink(
        outside.path().join("victim"),
        t.path().join("etc/netplan/90-fatbox.yaml"),
    )
    .unwrap();
    write_guest_config(t.path(), &nics()).unwrap();
    assert_eq!(
        fs::read_to_string(outside.path().join("victim")).unwrap(),
        "keep"
    );
    assert!(
        fs::symlink_metadata(t.path().join("etc/netplan/90-fatbox.yaml"))
            .unwrap()
            .is_file()
    );

    // Relative escape with `..`: clamped at the rootfs.
    let t = tempfile::tempdir().unwrap();
    touch(t.path(), "usr/sbin/ifup");
    fs::create_dir_all(t.path().join("etc/network")).unwrap();
    symlink(
        "../../../../../../../../tmp",
        t.path().join("etc/network/interfaces.d"),
    )
    .unwrap();
    fs::create_dir_all(t.path().join("tmp")).unwrap();
    write_guest_config(t.path(), &nics()).unwrap();
    assert!(t.path().join("tmp/fatbox").is_file());
    assert!(!Path::new("/tmp/fatbox").exists());
}
