//! What is in a guest: OS, init system, kernels, services a cloud image cares about.

use crate::block::ImageInfo;
use crate::ext4::FileType;
use crate::guest::{describe_location, Guest};
use crate::part::TableKind;
use crate::Result;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OsInfo {
    pub id: Option<String>,
    pub version_id: Option<String>,
    pub pretty_name: Option<String>,
    pub arch: Option<String>,
    /// "systemd", "upstart", "sysvinit", "openrc" or "unknown".
    pub init: String,
    pub kernels: Vec<String>,
    pub sshd: bool,
    pub cloud_init: bool,
    /// Network stacks configured in the guest: ifupdown, systemd-networkd, netplan, NetworkManager.
    pub network: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FsReport {
    pub location: String,
    pub partition: Option<u32>,
    pub start: u64,
    pub size: u64,
    pub kind: String,
    pub uuid: Option<String>,
    pub label: Option<String>,
    pub mountpoint: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspection {
    pub image: String,
    pub format: String,
    pub virtual_size: u64,
    pub chain: Vec<ImageInfo>,
    pub partition_table: TableKind,
    pub filesystems: Vec<FsReport>,
    pub os: OsInfo,
    pub warnings: Vec<String>,
}

fn parse_os_release(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_string(),
                v.trim().trim_matches('"').trim_matches('\'').to_string(),
            )
        })
        .collect()
}

/// ELF e_machine of a file → a Go/OCI architecture name.
fn elf_arch(g: &Guest, path: &[u8]) -> Result<Option<String>> {
    let Some(n) = g.resolve(path, true)? else {
        return Ok(None);
    };
    if n.inode.file_type() != FileType::Regular {
        return Ok(None);
    }
    let mut h = [0u8; 20];
    if g.read_at(&n, 0, &mut h)? < 20 || &h[..4] != b"\x7fELF" {
        return Ok(None);
    }
    let machine = if h[5] == 2 {
        u16::from_be_bytes([h[18], h[19]])
    } else {
        u16::from_le_bytes([h[18], h[19]])
    };
    Ok(Some(
        match machine {
            0x3e => "amd64",
            0xb7 => "arm64",
            0x03 => "386",
            0x28 => "arm",
            0x15 => "ppc64le",
            0x16 => "s390x",
            0xf3 => "riscv64",
            _ => "unknown",
        }
        .to_string(),
    ))
}

pub fn os_info(g: &Guest) -> Result<OsInfo> {
    let mut os = OsInfo::default();
    let rel = match g.read_file(b"/etc/os-release")? {
        Some(t) => Some(t),
        None => g.read_file(b"/usr/lib/os-release")?,
    };
    if let Some(t) = rel {
        for (k, v) in parse_os_release(&String::from_utf8_lossy(&t)) {
            match k.as_str() {
                "ID" => os.id = Some(v),
                "VERSION_ID" => os.version_id = Some(v),
                "PRETTY_NAME" => os.pretty_name = Some(v),
                _ => {}
            }
        }
    }
    os.arch = match elf_arch(g, b"/sbin/init")? {
        Some(a) => Some(a),
        None => elf_arch(g, b"/bin/sh")?,
    };
    let init_target = match g.resolve_path(b"/sbin/init", true)? {
        Some((_, p)) => String::from_utf8_lossy(&p).into_owned(),
        None => String::new(),
    };
    let has = |p: &[u8]| g.resolve(p, true).ok().flatten().is_some();
    os.init = if init_target.contains("systemd") {
        "systemd"
    } else if has(b"/sbin/initctl") && has(b"/etc/init") {
        "upstart"
    } else if has(b"/sbin/openrc") {
        "openrc"
    } else if !init_target.is_empty() {
        "sysvinit"
    } else {
        "unknown"
    }
    .to_string();
    if let Some((n, p)) = g.resolve_path(b"/boot", true)? {
        if n.inode.file_type() == FileType::Directory {
            for (name, _) in g.list(&n, &p)? {
                if let Some(v) = name.strip_prefix(b"vmlinuz-") {
                    os.kernels.push(String::from_utf8_lossy(v).into_owned());
                }
            }
        }
    }
    os.sshd = has(b"/usr/sbin/sshd");
    os.cloud_init = has(b"/usr/bin/cloud-init");
    for (path, name) in [
        (&b"/etc/network/interfaces"[..], "ifupdown"),
        (b"/etc/systemd/network", "systemd-networkd"),
        (b"/etc/netplan", "netplan"),
        (b"/etc/NetworkManager/system-connections", "NetworkManager"),
    ] {
        if has(path) {
            os.network.push(name.to_string());
        }
    }
    Ok(os)
}

pub fn inspect(g: &Guest) -> Result<Inspection> {
    let chain = g.disk.chain();
    let mounts = g.mounts();
    let filesystems = g
        .filesystems
        .iter()
        .enumerate()
        .map(|(i, f)| FsReport {
            location: describe_location(&f.location),
            partition: f.location.partition,
            start: f.location.start,
            size: f.location.size,
            kind: match f.kernel.as_ref().and_then(|k| k.subvol.as_deref()) {
                Some(sv) => format!("{} subvol={sv}", f.kind),
                None => f.kind.clone(),
            },
            uuid: f.uuid().map(str::to_string),
            label: f.label().map(str::to_string),
            mountpoint: if i == g.root_fs {
                Some("/".into())
            } else {
                mounts.iter().find(|m| m.1 == i).map(|m| m.0.clone())
            },
            error: f.error.clone(),
        })
        .collect();
    Ok(Inspection {
        image: g.path.display().to_string(),
        format: g.disk.format().to_string(),
        virtual_size: g.disk.size(),
        chain,
        partition_table: g.table.kind,
        filesystems,
        os: os_info(g)?,
        warnings: g.warnings.clone(),
    })
}
