//! Static addressing for guests: writes the image's own network configuration (netplan,
//! systemd-networkd or ifupdown) for each `eth<N>` before init starts.
//!
//! The root filesystem is untrusted: every path is resolved with `openat2(RESOLVE_IN_ROOT)`
//! so a symlink planted in the image (e.g. `/etc/netplan -> /host/etc`) cannot redirect a
//! write outside the rootfs, and files are replaced by rename so a symlink at the final name
//! is replaced rather than followed.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::error::{Error, Result};
use super::spec::NicSpec;

/// Which network configuration system an image uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestNetworkConfig {
    Netplan,
    /// systemd-networkd; `enable` when it is installed but not enabled (we enable it).
    Networkd {
        enable: bool,
    },
    Ifupdown,
}

const MAX_READ: u64 = 1 << 20;

fn resolve() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

fn io_err(root: &Path, rel: &str, e: impl Into<std::io::Error>) -> Error {
    Error::GuestIo {
        path: root.join(rel),
        source: e.into(),
    }
}

struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

impl Root {
    fn open(path: &Path) -> Result<Root> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err(path, "", e))?;
        Ok(Root {
            fd,
            path: path.to_path_buf(),
        })
    }

    fn open_in(&self, rel: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
        rustix::fs::openat2(
            self.fd.as_fd(),
            rel,
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            resolve(),
        )
    }

    fn exists(&self, rel: &str) -> bool {
        self.open_in(rel, OFlags::PATH).is_ok()
    }

    /// Whether the name exists, even as a symlink whose target does not (an enablement link
    /// in `*.wants/` may point at a unit under a path only valid after merged-/usr).
    fn exists_nofollow(&self, rel: &str) -> bool {
        self.open_in(rel, OFlags::PATH | OFlags::NOFOLLOW).is_ok()
    }

    /// Opens (creating as needed) a directory inside the root.
    fn dir(&self, rel: &str) -> Result<OwnedFd> {
        let mut cur = String::new();
        for comp in rel.split('/').filter(|c| !c.is_empty()) {
            let parent = if cur.is_empty() { "." } else { cur.as_str() };
            let pfd = self
                .open_in(parent, OFlags::PATH | OFlags::DIRECTORY)
                .map_err(|e| io_err(&self.path, parent, e))?;
            match rustix::fs::mkdirat(pfd.as_fd(), comp, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io_err(&self.path, rel, e)),
            }
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(comp);
        }
        self.open_in(&cur, OFlags::PATH | OFlags::DIRECTORY)
            .map_err(|e| io_err(&self.path, rel, e))
    }

    fn read(&self, rel: &str) -> Result<Option<String>> {
        let fd = match self.open_in(rel, OFlags::RDONLY) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(io_err(&self.path, rel, e)),
        };
        let mut s = String::new();
        File::from(fd)
            .take(MAX_READ)
            .read_to_string(&mut s)
            .map_err(|e| io_err(&self.path, rel, e))?;
        Ok(Some(s))
    }

    /// Atomically replaces `dir/name` with `contents`.
    fn write(&self, dir: &str, name: &str, contents: &str, mode: u32) -> Result<()> {
        let rel = format!("{dir}/{name}");
        let dfd = self.dir(dir)?;
        let dfd = rustix::fs::openat(
            dfd.as_fd(),
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err(&self.path, dir, e))?;
        let tmp = format!(".{name}.fatbox-tmp");
        match rustix::fs::unlinkat(dfd.as_fd(), tmp.as_str(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(io_err(&self.path, &rel, e)),
        }
        let fd = rustix::fs::openat(
            dfd.as_fd(),
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(|e| io_err(&self.path, &rel, e))?;
        let mut f = File::from(fd);
        f.write_all(contents.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| io_err(&self.path, &rel, e))?;
        rustix::fs::renameat(dfd.as_fd(), tmp.as_str(), dfd.as_fd(), name)
            .map_err(|e| io_err(&self.path, &rel, e))?;
        Ok(())
    }
}

/// Detects the image's network configuration system, preferring what the image enables.
pub fn detect_guest_network(rootfs: &Path) -> Result<Option<GuestNetworkConfig>> {
    let root = Root::open(rootfs)?;
    Ok(detect(&root))
}

fn detect(root: &Root) -> Option<GuestNetworkConfig> {
    let any = |paths: &[&str]| paths.iter().any(|p| root.exists(p));
    if any(&[
        "usr/sbin/netplan",
        "usr/share/netplan/netplan.script",
        "lib/netplan/generate",
        "usr/lib/netplan/generate",
    ]) {
        return Some(GuestNetworkConfig::Netplan);
    }
    if [
        "etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
        "etc/systemd/system/sockets.target.wants/systemd-networkd.socket",
    ]
    .iter()
    .any(|p| root.exists_nofollow(p))
    {
        return Some(GuestNetworkConfig::Networkd { enable: false });
    }
    if any(&["sbin/ifup", "usr/sbin/ifup"]) {
        return Some(GuestNetworkConfig::Ifupdown);
    }
    if any(&[
        "lib/systemd/systemd-networkd",
        "usr/lib/systemd/systemd-networkd",
    ]) {
        return Some(GuestNetworkConfig::Networkd { enable: true });
    }
    None
}

fn ifname(index: u32) -> String {
    format!("eth{index}")
}

fn networkd_unit(index: u32, nic: &NicSpec) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Written by fatbox from the instance's port {}",
        nic.port_id
    );
    let _ = writeln!(s, "[Match]\nName={}\n", ifname(index));
    if let Some(mtu) = nic.mtu {
        let _ = writeln!(s, "[Link]\nMTUBytes={mtu}\n");
    }
    let _ = writeln!(s, "[Network]\nDHCP={}", if nic.dhcp { "yes" } else { "no" });
    for ip in &nic.ips {
        let _ = writeln!(s, "Address={ip}");
    }
    if let Some(gw) = nic.gateway {
        let _ = writeln!(s, "Gateway={gw}");
    }
    for d in &nic.dns {
        let _ = writeln!(s, "DNS={d}");
    }
    s
}

fn ifupdown_stanzas(nics: &[(u32, NicSpec)]) -> String {
    let mut s = String::from("# Written by fatbox from the instance's ports\n");
    for (index, nic) in nics {
        let name = ifname(*index);
        let _ = writeln!(s, "\nauto {name}");
        let v4: Vec<_> = nic.ips.iter().filter(|n| n.addr().is_ipv4()).collect();
        let v6: Vec<_> = nic.ips.iter().filter(|n| n.addr().is_ipv6()).collect();
        let extra = |s: &mut String, v6fam: bool| {
            if let Some(mtu) = nic.mtu {
                let _ = writeln!(s, "    mtu {mtu}");
            }
            if let Some(gw) = nic.gateway.filter(|g| g.is_ipv6() == v6fam) {
                let _ = writeln!(s, "    gateway {gw}");
            }
            let dns: Vec<String> = nic.dns.iter().map(ToString::to_string).collect();
            if !dns.is_empty() && !v6fam {
                let _ = writeln!(s, "    dns-nameservers {}", dns.join(" "));
            }
        };
        if nic.dhcp {
            let _ = writeln!(s, "iface {name} inet dhcp");
        } else if v4.is_empty() && v6.is_empty() {
            let _ = writeln!(s, "iface {name} inet manual");
        }
        if let Some((first, rest)) = v4.split_first() {
            if !nic.dhcp {
                let _ = writeln!(s, "iface {name} inet static\n    address {first}");
                extra(&mut s, false);
                for a in rest {
                    let _ = writeln!(s, "    up ip addr add {a} dev {name}");
                }
            }
        }
        if let Some((first, rest)) = v6.split_first() {
            let _ = writeln!(s, "iface {name} inet6 static\n    address {first}");
            extra(&mut s, true);
            for a in rest {
                let _ = writeln!(s, "    up ip -6 addr add {a} dev {name}");
            }
        }
    }
    s
}

fn netplan_yaml(nics: &[(u32, NicSpec)]) -> String {
    let mut s = String::from(
        "# Written by fatbox from the instance's ports\nnetwork:\n  version: 2\n  ethernets:\n",
    );
    for (index, nic) in nics {
        let _ = writeln!(s, "    {}:", ifname(*index));
        let _ = writeln!(s, "      dhcp4: {}", nic.dhcp);
        if let Some(mtu) = nic.mtu {
            let _ = writeln!(s, "      mtu: {mtu}");
        }
        if !nic.ips.is_empty() {
            let ips: Vec<String> = nic.ips.iter().map(|i| format!("\"{i}\"")).collect();
            let _ = writeln!(s, "      addresses: [{}]", ips.join(", "));
        }
        if let Some(gw) = nic.gateway {
            let to = if gw.is_ipv6() {
                "\"::/0\""
            } else {
                "\"0.0.0.0/0\""
            };
            let _ = writeln!(
                s,
                "      routes:\n        - to: {to}\n          via: \"{gw}\""
            );
        }
        if !nic.dns.is_empty() {
            let dns: Vec<String> = nic.dns.iter().map(|d| format!("\"{d}\"")).collect();
            let _ = writeln!(
                s,
                "      nameservers:\n        addresses: [{}]",
                dns.join(", ")
            );
        }
    }
    s
}

const STANZA_WORDS: [&str; 7] = [
    "iface",
    "auto",
    "allow-auto",
    "allow-hotplug",
    "mapping",
    "source",
    "source-directory",
];

/// Comments out the image's own stanzas for the interfaces fatbox configures (a converted
/// image says `iface eth0 inet dhcp`; ifupdown would run both, and dhclient would hold the
/// boot for a minute on a static network).
fn disable_stanzas(text: &str, managed: &[String]) -> String {
    let mut out = String::new();
    let mut in_managed = false;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let first = words.first().copied().unwrap_or("");
        if STANZA_WORDS.contains(&first) {
            in_managed = false;
        }
        let is_managed = |w: &str| managed.iter().any(|m| m == w);
        match first {
            "iface" if words.get(1).is_some_and(|w| is_managed(w)) => {
                in_managed = true;
                let _ = writeln!(out, "#fatbox: {line}");
            }
            "auto" | "allow-auto" | "allow-hotplug" if words[1..].iter().any(|w| is_managed(w)) => {
                let _ = writeln!(out, "#fatbox: {line}");
                let keep: Vec<&str> = words[1..]
                    .iter()
                    .copied()
                    .filter(|w| !is_managed(w))
                    .collect();
                if !keep.is_empty() {
                    let _ = writeln!(out, "{first} {}", keep.join(" "));
                }
            }
            _ if in_managed && !first.is_empty() && !first.starts_with('#') => {
                let _ = writeln!(out, "#fatbox: {line}");
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Removes what [`write_guest_config`] wrote for `eth<index>` alone (systemd-networkd keeps one
/// file per interface; the other systems' single file is rewritten for the remaining NICs).
pub fn remove_guest_config(rootfs: &Path, index: u32) -> Result<()> {
    let root = Root::open(rootfs)?;
    let dir = "etc/systemd/network";
    let dfd = match root.open_in(dir, OFlags::RDONLY | OFlags::DIRECTORY) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(io_err(rootfs, dir, e)),
    };
    let name = format!("10-fatbox-{}.network", ifname(index));
    match rustix::fs::unlinkat(dfd.as_fd(), name.as_str(), AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(io_err(rootfs, &format!("{dir}/{name}"), e)),
    }
}

/// Writes configuration for `eth<index>` of each NIC in the system the image uses. Returns
/// which one, or `None` (nothing written) when the image has none of them.
pub fn write_guest_config(
    rootfs: &Path,
    nics: &[(u32, NicSpec)],
) -> Result<Option<GuestNetworkConfig>> {
    for (_, nic) in nics {
        nic.validate()?;
    }
    let root = Root::open(rootfs)?;
    let Some(kind) = detect(&root) else {
        warn!(rootfs = %rootfs.display(), "no known network configuration system in image");
        return Ok(None);
    };
    match kind {
        GuestNetworkConfig::Netplan => {
            // netplan warns about world-readable configs.
            root.write("etc/netplan", "90-fatbox.yaml", &netplan_yaml(nics), 0o600)?;
        }
        GuestNetworkConfig::Networkd { enable } => {
            for (index, nic) in nics {
                let name = format!("10-fatbox-{}.network", ifname(*index));
                root.write(
                    "etc/systemd/network",
                    &name,
                    &networkd_unit(*index, nic),
                    0o644,
                )?;
            }
            if enable {
                let wants = "etc/systemd/system/multi-user.target.wants";
                let dfd = root.dir(wants)?;
                match rustix::fs::symlinkat(
                    "/lib/systemd/system/systemd-networkd.service",
                    dfd.as_fd(),
                    "systemd-networkd.service",
                ) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(io_err(rootfs, wants, e)),
                }
            }
        }
        GuestNetworkConfig::Ifupdown => {
            root.write(
                "etc/network/interfaces.d",
                "fatbox",
                &ifupdown_stanzas(nics),
                0o644,
            )?;
            let orig = root.read("etc/network/interfaces")?.unwrap_or_default();
            let managed: Vec<String> = nics.iter().map(|(i, _)| ifname(*i)).collect();
            let main = disable_stanzas(&orig, &managed);
            let sourced = main.lines().any(|l| {
                let l = l.trim();
                l.starts_with("source /etc/network/interfaces.d/")
                    || l.starts_with("source-directory /etc/network/interfaces.d")
                    || l.starts_with("source-directory interfaces.d")
            });
            let mut new = main;
            if !sourced {
                if !new.is_empty() && !new.ends_with('\n') {
                    new.push('\n');
                }
                new.push_str("source /etc/network/interfaces.d/*\n");
            }
            if new != orig {
                root.write("etc/network", "interfaces", &new, 0o644)?;
            }
        }
    }
    info!(rootfs = %rootfs.display(), ?kind, nics = nics.len(), "guest network config written");
    Ok(Some(kind))
}

#[cfg(test)]
mod tests {
    use super::disable_stanzas;

    #[test]
    fn disables_only_managed_stanzas() {
        let text = "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n\nauto eth0 eth1\niface eth0 inet dhcp\n    hostname x\n# keep\niface eth1 inet dhcp\n";
        let out = disable_stanzas(text, &["eth0".to_string()]);
        assert_eq!(
            out,
            "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n\n#fatbox: auto eth0 eth1\nauto eth1\n#fatbox: iface eth0 inet dhcp\n#fatbox:     hostname x\n# keep\niface eth1 inet dhcp\n"
        );
        assert_eq!(disable_stanzas(&out, &["eth0".to_string()]), out);
    }
}
