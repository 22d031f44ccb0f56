//! Boot from a Glance image with container_format `docker`: the fixture's layers (fatbox-img
//! convert, uncompressed) packed by this test as a docker save tarball (no docker daemon
//! here), uploaded to the real Glance, then `fatbox run --image ID` pulls it — layers as they
//! are — and the instance reaches running. Root, FATBOX_FIXTURES.

mod common;
#[path = "../../image-bridge/tests/common/mod.rs"]
mod glance_harness;

use common::Daemon;
use guestfs_tools::block::OpenOptions;
use guestfs_tools::convert::{convert, ConvertOptions};
use guestfs_tools::guest::Guest;
use guestfs_tools::oci::{Compression, Layout};
use std::path::Path;

/// docker save layout: manifest.json, <config hex>.json, <layer hex>/layer.tar.
fn docker_save_of(layout_dir: &Path, name: &str, out: &Path) {
    let layout = Layout::open(layout_dir).expect("layout");
    let (_, manifest) = layout.manifest(Some(name)).expect("manifest");
    let config_digest = manifest.config().digest().to_string();
    let config = layout.read_blob(&config_digest).expect("config");
    let chex = config_digest.trim_start_matches("sha256:").to_string();
    let mut layers = Vec::new();
    let f = std::fs::File::create(out).expect("tarball");
    let mut b = tar::Builder::new(f);
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(config.len() as u64);
    b.append_data(&mut h, format!("{chex}.json"), &config[..])
        .expect("config entry");
    for l in manifest.layers() {
        let hex = l
            .digest()
            .to_string()
            .trim_start_matches("sha256:")
            .to_string();
        let name = format!("{hex}/layer.tar");
        b.append_path_with_name(layout.blobs().join(&hex), &name)
            .expect("layer entry");
        layers.push(name);
    }
    let m = serde_json::to_vec(&serde_json::json!([{
        "Config": format!("{chex}.json"),
        "RepoTags": ["fixture/debian:12"],
        "Layers": layers,
    }]))
    .expect("manifest json");
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(m.len() as u64);
    b.append_data(&mut h, "manifest.json", &m[..])
        .expect("manifest entry");
    b.into_inner().expect("finish tarball");
}

#[test]
fn boot_from_docker_container_format_image() {
    glance_harness::require_root();
    let work = tempfile::tempdir().expect("tmp");
    let oci = work.path().join("oci");
    {
        let g = Guest::open(
            &common::fixtures().join("v3.qcow2"),
            &OpenOptions::default(),
        )
        .expect("open fixture");
        let opts = ConvertOptions {
            name: "fixture".into(),
            // Uncompressed: the layer files are their own diff_ids, like docker save's.
            compression: Compression::None,
            ..ConvertOptions::default()
        };
        convert(&g, &oci, &opts, &mut |_| {}).expect("convert");
    }
    let tarball = work.path().join("fixture-docker.tar");
    docker_save_of(&oci, "fixture", &tarball);
    std::fs::remove_dir_all(&oci).expect("rm oci");

    let g = glance_harness::Glance::start();
    let id = g.upload_with_curl_as(&tarball, "fixture-docker", "raw", "docker");

    std::env::set_var("FATBOX_GLANCE__ENDPOINT", &g.endpoint);
    let d = Daemon::start();
    let uuid = d
        .ok(&[
            "run", "--image", &id, "--name", "dk1", "--vcpus", "1", "--memory", "512", "--disk",
            "2",
        ])
        .trim()
        .to_string();
    assert_eq!(d.show(&uuid)["state"], "running");
    let os = d.exec(&uuid, "cat /etc/os-release");
    assert!(os.contains("ID=debian"), "{os}");
    let list: serde_json::Value =
        serde_json::from_str(&d.ok(&["image", "list", "--json"])).expect("list --json");
    let entry = list
        .as_array()
        .expect("array")
        .iter()
        .find(|i| i["glance_id"] == id.as_str())
        .cloned()
        .expect("in the list");
    assert_eq!(entry["layers"].as_array().map(Vec::len), Some(2), "{entry}");
    let fsck = d.fatbox(&["image", "fsck"]);
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    d.ok(&["delete", &uuid]);
}
