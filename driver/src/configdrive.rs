//! Metadata like an OpenStack config drive, without an ISO: the files Nova's
//! `InstanceMetadata.metadata_for_config_drive()` yields (openstack/<date>/meta_data.json,
//! user_data, network_data.json, ec2/...) are written once, at create, into
//! `<instance>/config-drive` and bound read-only at `/config-drive` in the guest, where
//! cloud-init's ConfigDrive datasource (and ds-identify) look for a directory drive.

use crate::error::{io, Error, Result};
use base64::Engine;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

pub const DIR: &str = "config-drive";
/// Where the guest sees it.
pub const GUEST_PATH: &str = "config-drive";
/// What ds-identify reads from PID 1's environment to pick the OpenStack datasource in a
/// container (no DMI there).
pub const PRODUCT_ENV: &str = "product_name=OpenStack Nova";

/// A real drive is 64 MiB; user_data alone is capped at 64 KiB by Nova.
const MAX_TOTAL: usize = 64 << 20;
const MAX_FILES: usize = 4096;

/// Checks a drive-relative path: plain components only, so nothing escapes the directory.
fn rel_path(p: &str) -> Result<PathBuf> {
    let path = Path::new(p);
    let ok = !p.is_empty()
        && p.len() <= 1024
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(path.to_path_buf())
    } else {
        Err(Error::Invalid(format!(
            "config_drive path {p:?}: relative, without '..'"
        )))
    }
}

/// Decodes and validates the request's files (path -> base64 content).
pub fn decode(files: &BTreeMap<String, String>) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    if files.len() > MAX_FILES {
        return Err(Error::Invalid(format!(
            "config_drive: at most {MAX_FILES} files"
        )));
    }
    let mut total = 0usize;
    let mut out = Vec::with_capacity(files.len());
    for (p, b64) in files {
        let rel = rel_path(p)?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| Error::Invalid(format!("config_drive {p:?}: base64: {e}")))?;
        total = total.saturating_add(data.len());
        if total > MAX_TOTAL {
            return Err(Error::Invalid("config_drive: more than 64 MiB".into()));
        }
        out.push((rel, data));
    }
    Ok(out)
}

/// Writes the drive under `inst_dir` (a fresh directory of ours, so no guest symlinks).
/// Built beside and renamed, so a crash never leaves half a drive.
pub fn write(inst_dir: &Path, files: &[(PathBuf, Vec<u8>)]) -> Result<PathBuf> {
    let dst = inst_dir.join(DIR);
    let tmp = inst_dir.join(format!(".{DIR}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    for (rel, data) in files {
        let p = tmp.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&p, data).map_err(io(&p))?;
    }
    if dst.exists() {
        std::fs::remove_dir_all(&dst).map_err(io(&dst))?;
    }
    std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
    Ok(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn refuses_escaping_paths() {
        for bad in ["../x", "/etc/passwd", "a/../../b", "", "./a"] {
            let m = BTreeMap::from([(bad.to_string(), b64(b"x"))]);
            assert!(decode(&m).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn refuses_bad_base64() {
        let m = BTreeMap::from([("a".to_string(), "!!".to_string())]);
        assert!(decode(&m).is_err());
    }

    #[test]
    fn writes_tree() {
        let d = tempfile::tempdir().expect("tmp");
        let m = BTreeMap::from([
            (
                "openstack/latest/meta_data.json".to_string(),
                b64(b"{\"uuid\":\"u\"}"),
            ),
            ("openstack/latest/user_data".to_string(), b64(&[0, 1, 255])),
        ]);
        let files = decode(&m).expect("decode");
        let out = write(d.path(), &files).expect("write");
        assert_eq!(
            std::fs::read(out.join("openstack/latest/user_data")).expect("read"),
            vec![0, 1, 255]
        );
        // Rewriting replaces the whole drive.
        let files = decode(&BTreeMap::from([("x".to_string(), b64(b"1"))])).expect("decode");
        let out = write(d.path(), &files).expect("write");
        assert!(!out.join("openstack").exists());
        assert!(out.join("x").exists());
    }
}
