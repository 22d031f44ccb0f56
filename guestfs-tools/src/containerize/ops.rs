//! The operations themselves. Each works on canonical paths (symlinks in parents resolved:
//! on merged-/usr guests `/lib/modules` is `/usr/lib/modules`) so the whiteouts it produces
//! hit the real entries.

use super::{Change, ChangeSet, Op};
use crate::ext4::FileType;
use crate::guest::Guest;
use crate::Result;

pub fn all_ops() -> Vec<Box<dyn Op>> {
    vec![
        Box::new(Kernel),
        Box::new(Fstab),
        Box::new(MaskUnits),
        Box::new(MachineId),
        Box::new(SshHostKeys),
        Box::new(Logs),
        Box::new(CloudInitState),
        Box::new(UdevNetRules),
        Box::new(DhcpLeases),
        Box::new(Network),
    ]
}

/// Deletes `abs` (canonicalized) if it exists; true if it did.
fn delete(g: &Guest, cs: &mut ChangeSet, abs: &[u8]) -> Result<bool> {
    let Some(canon) = g.canonical_parent(abs)? else {
        return Ok(false);
    };
    if g.resolve(&canon, false)?.is_none() || cs.changes.get(&canon) == Some(&Change::Delete) {
        return Ok(false);
    }
    cs.set(canon, Change::Delete);
    Ok(true)
}

/// Names in a directory (resolved), or nothing.
fn names_in(g: &Guest, dir: &[u8]) -> Result<Vec<(Vec<u8>, FileType)>> {
    let Some((node, canon)) = g.resolve_path(dir, true)? else {
        return Ok(vec![]);
    };
    if node.inode.file_type() != FileType::Directory {
        return Ok(vec![]);
    }
    Ok(g.list(&node, &canon)?
        .into_iter()
        .map(|(n, node)| (n, node.inode.file_type()))
        .collect())
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if p.last() != Some(&b'/') {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Writes a file at `abs` keeping the existing file's owner and mode when there is one.
fn write_file(g: &Guest, cs: &mut ChangeSet, abs: &[u8], data: Vec<u8>, mode: u32) -> Result<()> {
    let canon = g.canonical_parent(abs)?.unwrap_or_else(|| abs.to_vec());
    ensure_parents(g, cs, &canon)?;
    let (mode, uid, gid) = match g.resolve(&canon, false)? {
        Some(n) if n.inode.file_type() == FileType::Regular => {
            (n.inode.perm(), n.inode.uid, n.inode.gid)
        }
        _ => (mode, 0, 0),
    };
    cs.set(
        canon,
        Change::File {
            data,
            mode,
            uid,
            gid,
        },
    );
    Ok(())
}

fn symlink(g: &Guest, cs: &mut ChangeSet, abs: &[u8], target: &[u8]) -> Result<()> {
    let canon = g.canonical_parent(abs)?.unwrap_or_else(|| abs.to_vec());
    ensure_parents(g, cs, &canon)?;
    cs.set(
        canon,
        Change::Symlink {
            target: target.to_vec(),
        },
    );
    Ok(())
}

/// Adds directories for missing parents of `abs`.
fn ensure_parents(g: &Guest, cs: &mut ChangeSet, abs: &[u8]) -> Result<()> {
    let mut cur = Vec::new();
    let comps: Vec<&[u8]> = abs
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        cur.push(b'/');
        cur.extend_from_slice(c);
        if g.resolve(&cur, true)?.is_none() && !cs.changes.contains_key(&cur) {
            cs.set(cur.clone(), Change::Dir { mode: 0o755 });
        }
    }
    Ok(())
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

struct Kernel;
impl Op for Kernel {
    fn name(&self) -> &'static str {
        "kernel"
    }
    fn description(&self) -> &'static str {
        "Remove kernel images, initramfs, kernel modules and firmware (the host's kernel runs the container)"
    }
    fn apply(&self, g: &Guest, cs: &mut ChangeSet) -> Result<String> {
        let mut removed = Vec::new();
        for (name, _) in names_in(g, b"/boot")? {
            let n = lossy(&name);
            if [
                "vmlinuz",
                "vmlinux",
                "initrd.img",
                "initramfs",
                "System.map",
                "config-",
            ]
            .iter()
            .any(|p| n.starts_with(p))
                && delete(g, cs, &join(b"/boot", &name))?
            {
                removed.push(format!("/boot/{n}"));
            }
        }
        for p in [
            "/vmlinuz",
            "/vmlinuz.old",
            "/initrd.img",
            "/initrd.img.old",
            "/lib/modules",
            "/lib/firmware",
            "/usr/lib/modules",
            "/usr/lib/firmware",
        ] {
            if delete(g, cs, p.as_bytes())? {
                removed.push(p.to_string());
            }
        }
        Ok(format!("removed {}", list_or_none(&removed)))
    }
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "nothing".into()
    } else {
        v.join(", ")
    }
}

struct Fstab;
impl Op for Fstab {
    fn name(&self) -> &'static str {
        "fstab"
    }
    fn description(&self) -> &'static str {
        "Comment out block-device and swap entries in /etc/fstab (keep tmpfs, bind and network mounts)"
    }
    fn apply(&self, g: &Guest, cs: &mut ChangeSet) -> Result<String> {
        let Some(text) = g.read_file(b"/etc/fstab")? else {
            return Ok("no /etc/fstab".into());
        };
        let text = String::from_utf8_lossy(&text);
        let mut out = String::new();
        let mut dropped = Vec::new();
        for line in text.lines() {
            let t = line.trim();
            let f: Vec<&str> = t.split_whitespace().collect();
            let is_block = !t.starts_with('#')
                && f.len() >= 2
                && (["UUID=", "LABEL=", "PARTUUID=", "PARTLABEL=", "/dev/"]
                    .iter()
                    .any(|p| f[0].starts_with(p))
                    && !f[0].starts_with("/dev/shm")
                    || f.get(2) == Some(&"swap"));
            let is_network = f.get(2).is_some_and(|t| {
                matches!(*t, "nfs" | "nfs4" | "cifs" | "smb3" | "glusterfs" | "ceph")
            });
            let is_bind = f.get(3).is_some_and(|o| o.split(',').any(|o| o == "bind"));
            if is_block && !is_network && !is_bind {
                out.push_str("# fatbox: block devices do not exist in a container: ");
                dropped.push(f.get(1).copied().unwrap_or("?").to_string());
            }
            out.push_str(line);
            out.push('\n');
        }
        write_file(g, cs, b"/etc/fstab", out.into_bytes(), 0o644)?;
        Ok(format!("commented out {}", list_or_none(&dropped)))
    }
}

/// Units that need hardware, the host's kernel or capabilities a container lacks.
const MASK: &[&str] = &[
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "ifupdown-pre.service",
    "getty@.service",
    "autovt@.service",
    "serial-getty@.service",
    "systemd-modules-load.service",
    "kmod-static-nodes.service",
    "systemd-remount-fs.service",
    "systemd-fsck-root.service",
    "systemd-fsck@.service",
    "systemd-growfs-root.service",
    "systemd-growfs@.service",
    "systemd-timesyncd.service",
    "chrony.service",
    "ntp.service",
    "ntpsec.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
    "systemd-pstore.service",
    "systemd-journald-audit.socket",
    "lvm2-monitor.service",
    "lvm2-lvmpolld.socket",
    "dm-event.socket",
    "mdmonitor.service",
    "multipathd.service",
    "multipathd.socket",
    "iscsid.socket",
    "open-iscsi.service",
    "smartmontools.service",
    "irqbalance.service",
    "acpid.service",
    "acpid.socket",
    "mcelog.service",
    "thermald.service",
    "haveged.service",
    "rngd.service",
    "cpufrequtils.service",
    "e2scrub_reap.service",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-hwdb-update.service",
];

const UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

struct MaskUnits;
impl Op for MaskUnits {
    fn name(&self) -> &'static str {
        "mask-units"
    }
    fn description(&self) -> &'static str {
        "Mask units that cannot work in a container: udev, gettys on ttys and serial ports (console-getty stays), modules-load, remount-fs, fsck, growfs, time sync, kernel pseudo-filesystem mounts, hardware daemons"
    }
    fn apply(&self, g: &Guest, cs: &mut ChangeSet) -> Result<String> {
        let mut masked = Vec::new();
        for unit in MASK {
            let mut exists = false;
            for d in UNIT_DIRS {
                let p = format!("{d}/{unit}");
                if g.resolve(p.as_bytes(), false)?.is_some() {
                    exists = true;
                    break;
                }
            }
            if exists {
                symlink(
                    g,
                    cs,
                    format!("/etc/systemd/system/{unit}").as_bytes(),
                    b"/dev/null",
                )?;
                masked.push(unit.to_string());
            }
        }
        Ok(format!("masked {}", list_or_none(&masked)))
    }
}

struct MachineId;
impl Op for MachineId {
    fn name(&self) -> &'static str {
        "machine-id"
    }
    fn description(&self) -> &'static str {
        "Empty /etc/machine-id so that every instance gets its own at first boot"
    }
    fn apply(&self, g: &Guest, cs: &mut ChangeSet) -> Result<String> {
        write_file(g, cs, b"/etc/machine-id", Vec::new(), 0o444)?;
        let mut s = "emptied /etc/machine-id".to_string();
        if let Some(n) = g.resolve(b"/var/lib/dbus/machine-id", false)? {
            if n.inode.file_type() == FileType::Regular {
                delete(g, cs, b"/var/lib/dbus/machine-id")?;
                s.push_str(", removed /var/lib/dbus/machine-id");
            }
        }
        Ok(s)
    }
}

const KEYGEN_UNIT: &str = "[Unit]
Description=Generate SSH host keys for this instance (fatbox)
Before=ssh.service sshd.service
ConditionPathExists=/usr/bin/ssh-keygen

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
";

struct SshHostKeys;
impl Op for SshHostKeys {
    fn name(&self) -> &'static str {
        "ssh-host-keys"
    }
    fn description(&self) -> &'static str {
        "Remove SSH host keys baked into the image; a unit generates fresh ones at each instance's first boot"
    }
    fn apply(&self, g: &Guest, cs: &mut ChangeSet) -> Result<String> {
        let mut n = 0;
        for (name, _) in names_in(g, b"/etc/ssh")? {
            if name.starts_with(b"ssh_host_") && delete(g, cs, &join(b"/etc/ssh", &name))? {
                n += 1;
            }
        }
        if g.resolve(b"/usr/bin/ssh-keygen", true)?.is_none() {
            return Ok(format!(
                "removed {n} host key files (no ssh-keygen in the image)"
            ));
        }
        write_file(
            g,
            cs,
            b"/etc/systemd/system/fatbox-ssh-keygen.service",
            KEYGEN_UNIT.as_bytes().to_vec(),
            0o644,
        )?;
        symlink(
            g,
            cs,
            b"/etc/systemd/system/multi-user.target.wants/fatbox-ssh-keygen.service",
            b"/etc/systemd/system/fatbox-ssh-keygen.service",
        )?;
        Ok(format!(
            "removed {n} host key files, added fatbox-ssh-keygen.service"
        ))
    }
}

struct Logs;
impl Op for Logs {
    fn name(&self) -> &'static str {
        "logs"
    }
    fn description(&self) -> &'static str {
        "Clear log files under /var/log (wtmp, btmp, lastlog, faillog are kept empty)"
    }
    fn apply(&self, g: &Guest, cs: &mut ChangeSet) -> Result<String> {
        let keep_empty = ["wtmp", "btmp", "lastlog", "faillog"];
        let mut files = Vec::new();
        g.walk_under(b"/var/log", &mut |abs, node| {
            if node.inode.file_type() == FileType::Regular && node.inode.size > 0 {
                files.push((
                    abs.to_vec(),
                    node.inode.perm(),
                    node.inode.uid,
                    node.inode.gid,
                ));
            }
            Ok(())
        })?;
        let mut n = 0;
        for (abs, mode, uid, gid) in files {
            let name = abs.rsplit(|b| *b == b'/').next().unwrap_or(&abs).to_vec();
            if keep_empty.iter().any(|k| k.as_bytes() == name.as_slice()) {
                cs.set(
                    abs,
                    Change::File {
                        data: Vec::new(),
                        mode,
                        uid,
                        gid,
                    },
                );
            } else {
                cs.set(abs, Change::Delete);
            }
            n += 1;
        }
        Ok(format!("cleared {n} log files"))
    }
}

struct CloudInitState;
impl Op for CloudInitState {
    fn name(&self) -> &'static str {
        "cloud-init-state"
    }
    fn description(&self) -> &'static str {
        "Remove cloud-init's per-instance state so it runs again in each instance"
    }
    fn apply(&self, g: &Guest, cs: &mut ChangeSet) -> Result<String> {
        let mut removed = Vec::new();
        for p in [
            "/var/lib/cloud/instances",
            "/var/lib/cloud/instance",
            "/var/lib/cloud/data",
            "/var/lib/cloud/sem",
            "/var/lib/cloud/handlers",
            "/var/log/cloud-init.log",
            "/var/log/cloud-init-output.log",
            "/run/cloud-init",
        ] {
            if delete(g, cs, p.as_bytes())? {
                removed.push(p.to_string());
            }
        }
        Ok(format!("removed {}", list_or_none(&removed)))
    }
}

struct UdevNetRules;
impl Op for UdevNetRules {
    fn name(&self) -> &'static str {
        "udev-net-rules"
    }
    fn description(&self) -> &'static str {
        "Remove udev persistent network rules that pin interface names to the VM's MACs"
    }
    fn apply(&self, g: &Guest, cs: &mut ChangeSet) -> Result<String> {
        let mut removed = Vec::new();
        for p in [
            "/etc/udev/rules.d/70-persistent-net.rules",
            "/etc/udev/rules.d/75-persistent-net-generator.rules",
            "/etc/udev/rules.d/70-persistent-cd.rules",
        ] {
            if delete(g, cs, p.as_bytes())? {
                removed.push(p.to_string());
            }
        }
        Ok(format!("removed {}", list_or_none(&removed)))
    }
}

struct DhcpLeases;
impl Op for DhcpLeases {
    fn name(&self) -> &'static str {
        "dhcp-leases"
    }
    fn description(&self) -> &'static str {
        "Remove DHCP leases of the VM (dhclient, NetworkManager, systemd-networkd)"
    }
    fn apply(&self, g: &Guest, cs: &mut ChangeSet) -> Result<String> {
        let mut n = 0;
        for dir in [
            "/var/lib/dhcp",
            "/var/lib/dhclient",
            "/var/lib/NetworkManager",
            "/var/lib/systemd/network",
        ] {
            for (name, ft) in names_in(g, dir.as_bytes())? {
                let s = lossy(&name);
                let lease = s.contains("lease") || dir.ends_with("network");
                if lease && ft == FileType::Regular && delete(g, cs, &join(dir.as_bytes(), &name))?
                {
                    n += 1;
                }
            }
        }
        Ok(format!("removed {n} lease files"))
    }
}

const NETWORKING_DROPIN: &str = "# fatbox: an instance may boot with fewer NICs than the VM had;
# a missing interface must not fail the boot.
[Service]
ExecStart=
ExecStart=-/sbin/ifup -a --read-environment
";

struct Network;
impl Op for Network {
    fn name(&self) -> &'static str {
        "network"
    }
    fn description(&self) -> &'static str {
        "Keep the guest's network stack (ifupdown, systemd-networkd, netplan, NetworkManager) but point it at eth0, eth1, ... (DHCP when nothing else is set) and make a missing interface harmless"
    }
    fn apply(&self, g: &Guest, cs: &mut ChangeSet) -> Result<String> {
        let mut done = Vec::new();
        if let Some(s) = ifupdown(g, cs)? {
            done.push(s);
        }
        if let Some(s) = networkd(g, cs)? {
            done.push(s);
        }
        if let Some(s) = netplan(g, cs)? {
            done.push(s);
        }
        if let Some(s) = network_manager(g, cs)? {
            done.push(s);
        }
        if done.is_empty() {
            Ok("no network configuration found".into())
        } else {
            Ok(done.join("; "))
        }
    }
}

/// Maps the VM's interface names (ens3, enp0s3, eth0 ...) to eth0, eth1, ... in the order
/// the configuration names them.
#[derive(Default)]
struct NameMap(Vec<String>);

impl NameMap {
    fn map(&mut self, name: &str) -> String {
        if name == "lo" || name.contains(':') || name.contains('.') {
            return name.to_string();
        }
        let i = match self.0.iter().position(|n| n == name) {
            Some(i) => i,
            None => {
                self.0.push(name.to_string());
                self.0.len() - 1
            }
        };
        format!("eth{i}")
    }
}

fn ifupdown(g: &Guest, cs: &mut ChangeSet) -> Result<Option<String>> {
    let mut files = Vec::new();
    if g.read_file(b"/etc/network/interfaces")?.is_some() {
        files.push(b"/etc/network/interfaces".to_vec());
    } else {
        return Ok(None);
    }
    for (name, ft) in names_in(g, b"/etc/network/interfaces.d")? {
        if ft == FileType::Regular {
            files.push(join(b"/etc/network/interfaces.d", &name));
        }
    }
    let mut names = NameMap::default();
    let mut has_iface = false;
    for f in &files {
        let Some(text) = g.read_file(f)? else {
            continue;
        };
        let text = String::from_utf8_lossy(&text);
        let mut out = String::new();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let new = match words.first().copied() {
                Some("auto") | Some("allow-hotplug") | Some("allow-auto") => {
                    // No udev in a container: hotplug events never come, so bring it up at boot.
                    let ifs: Vec<String> = words[1..].iter().map(|w| names.map(w)).collect();
                    format!("auto {}", ifs.join(" "))
                }
                Some("iface") if words.len() >= 2 => {
                    let n = names.map(words[1]);
                    if n != "lo" {
                        has_iface = true;
                    }
                    let mut w: Vec<String> = words.iter().map(|s| s.to_string()).collect();
                    w[1] = n;
                    w.join(" ")
                }
                _ => line.to_string(),
            };
            out.push_str(&new);
            out.push('\n');
        }
        if f == b"/etc/network/interfaces" && !has_iface {
            out.push_str("\n# fatbox: DHCP on the first interface by default\nauto eth0\niface eth0 inet dhcp\n");
            has_iface = true;
            names.map("eth0");
        }
        write_file(g, cs, f, out.into_bytes(), 0o644)?;
    }
    write_file(
        g,
        cs,
        b"/etc/systemd/system/networking.service.d/fatbox.conf",
        NETWORKING_DROPIN.as_bytes().to_vec(),
        0o644,
    )?;
    Ok(Some(format!(
        "ifupdown: {} → {}",
        if names.0.is_empty() {
            "-".to_string()
        } else {
            names.0.join(",")
        },
        (0..names.0.len())
            .map(|i| format!("eth{i}"))
            .collect::<Vec<_>>()
            .join(",")
    )))
}

fn networkd(g: &Guest, cs: &mut ChangeSet) -> Result<Option<String>> {
    let mut n = 0;
    let mut i = 0;
    for (name, ft) in names_in(g, b"/etc/systemd/network")? {
        let path = join(b"/etc/systemd/network", &name);
        if ft != FileType::Regular {
            continue;
        }
        if name.ends_with(b".link") {
            // .link files rename interfaces by MAC through udev, which a container lacks.
            delete(g, cs, &path)?;
            n += 1;
            continue;
        }
        if !name.ends_with(b".network") {
            continue;
        }
        let Some(text) = g.read_file(&path)? else {
            continue;
        };
        let text = String::from_utf8_lossy(&text);
        let mut out = String::new();
        let mut section = String::new();
        let mut matched = false;
        for line in text.lines() {
            let t = line.trim();
            if t.starts_with('[') {
                if section == "[Match]" && !matched {
                    out.push_str(&format!("Name=eth{i}\n"));
                    matched = true;
                }
                section = t.to_string();
            }
            if section == "[Match]" {
                let key = t.split('=').next().unwrap_or("").trim();
                if matches!(
                    key,
                    "MACAddress" | "PermanentMACAddress" | "Path" | "Driver"
                ) {
                    continue;
                }
                if key == "Name" {
                    let v = t.split_once('=').map(|x| x.1.trim()).unwrap_or("");
                    if v == "lo" {
                        out.push_str(line);
                        out.push('\n');
                    } else if !matched {
                        out.push_str(&format!("Name=eth{i}\n"));
                    }
                    matched = true;
                    continue;
                }
            }
            out.push_str(line);
            out.push('\n');
        }
        if section == "[Match]" && !matched {
            out.push_str(&format!("Name=eth{i}\n"));
        }
        i += 1;
        write_file(g, cs, &path, out.into_bytes(), 0o644)?;
        n += 1;
    }
    Ok((n > 0).then(|| format!("systemd-networkd: {n} files pointed at eth*")))
}

fn netplan(g: &Guest, cs: &mut ChangeSet) -> Result<Option<String>> {
    let mut n = 0;
    let mut names = NameMap::default();
    for (name, ft) in names_in(g, b"/etc/netplan")? {
        if ft != FileType::Regular || !(name.ends_with(b".yaml") || name.ends_with(b".yml")) {
            continue;
        }
        let path = join(b"/etc/netplan", &name);
        let Some(text) = g.read_file(&path)? else {
            continue;
        };
        let text = String::from_utf8_lossy(&text);
        let mut out = String::new();
        let mut in_ethernets = None::<usize>;
        let mut child_indent = None::<usize>;
        let mut skip_indent = None::<usize>;
        for line in text.lines() {
            let indent = line.len() - line.trim_start().len();
            let t = line.trim();
            if let Some(si) = skip_indent {
                if indent > si || t.is_empty() {
                    continue;
                }
                skip_indent = None;
            }
            if t == "ethernets:" {
                in_ethernets = Some(indent);
                child_indent = None;
                out.push_str(line);
                out.push('\n');
                continue;
            }
            if let Some(ei) = in_ethernets {
                if !t.is_empty() && !t.starts_with('#') {
                    if indent <= ei {
                        in_ethernets = None;
                    } else if t.starts_with("match:") || t.starts_with("set-name:") {
                        skip_indent = Some(indent);
                        continue;
                    } else if child_indent.is_none_or(|c| c == indent) {
                        child_indent = Some(indent);
                        if let Some(key) = t.strip_suffix(':') {
                            out.push_str(&format!("{}{}:\n", &line[..indent], names.map(key)));
                            continue;
                        }
                    }
                }
            }
            out.push_str(line);
            out.push('\n');
        }
        write_file(g, cs, &path, out.into_bytes(), 0o600)?;
        n += 1;
    }
    Ok((n > 0).then(|| format!("netplan: {n} files pointed at eth*")))
}

fn network_manager(g: &Guest, cs: &mut ChangeSet) -> Result<Option<String>> {
    let dir = b"/etc/NetworkManager/system-connections";
    let mut n = 0;
    for (name, ft) in names_in(g, dir)? {
        if ft != FileType::Regular {
            continue;
        }
        let path = join(dir, &name);
        let Some(text) = g.read_file(&path)? else {
            continue;
        };
        let text = String::from_utf8_lossy(&text);
        let out: String = text
            .lines()
            .filter(|l| {
                let k = l.split('=').next().unwrap_or("").trim();
                !matches!(k, "interface-name" | "mac-address" | "cloned-mac-address")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_file(g, cs, &path, out.into_bytes(), 0o600)?;
        n += 1;
    }
    Ok((n > 0).then(|| format!("NetworkManager: {n} connections unpinned from interface names")))
}
