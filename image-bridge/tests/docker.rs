//! Glance images with container_format `docker`: a docker save tarball built here (no docker
//! daemon) from two small layers — the second gzip-compressed, with a whiteout and an opaque
//! dir — uploaded to the real Glance (PyPI), pulled: its layers are taken as they are and
//! unpacked with Docker whiteouts as overlay ones. Malformed tarballs are refused with a clear
//! error and nothing cached. Needs root (overlay whiteouts, trusted.* xattrs, chown).

mod common;

use common::{entries, require_root, Glance};
use image_bridge::glance::NewImage;
use image_bridge::{CacheOptions, Error, GlanceClient, LayerCache};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A tar entry: (name, data or None for a dir, mode, uid).
type Item<'a> = (&'a str, Option<&'a [u8]>, u32, u64);

fn tar_of(items: &[Item]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data, mode, uid) in items {
        let mut h = tar::Header::new_gnu();
        h.set_mode(*mode);
        h.set_uid(*uid);
        h.set_gid(*uid);
        h.set_mtime(1_700_000_000);
        match data {
            Some(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                b.append_data(&mut h, name, *d).expect("append");
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, name, &b""[..]).expect("append dir");
            }
        }
    }
    b.into_inner().expect("tar")
}

/// Appends a file whose name is written raw into the header (tar's builder refuses `..`).
fn append_raw_name(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    b.append(&h, data).expect("append raw");
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

struct Parts {
    layer1: Vec<u8>,
    layer2_gz: Vec<u8>,
    config: Vec<u8>,
}

fn parts() -> Parts {
    let layer1 = tar_of(&[
        ("etc/", None, 0o755, 0),
        (
            "etc/os-release",
            Some(b"ID=debian\nVERSION_ID=\"12\"\n"),
            0o644,
            0,
        ),
        ("etc/marker", Some(b"docker-1"), 0o644, 0),
        ("etc/remove-me", Some(b"x"), 0o644, 0),
        ("usr/", None, 0o755, 0),
        ("usr/bin/", None, 0o755, 0),
        ("usr/bin/tool", Some(b"#!/bin/sh\n"), 0o755, 1000),
        ("opt/", None, 0o755, 0),
        ("opt/gone/", None, 0o755, 0),
        ("opt/gone/old", Some(b"old"), 0o644, 0),
    ]);
    let layer2 = tar_of(&[
        ("etc/", None, 0o755, 0),
        ("etc/marker", Some(b"docker-2"), 0o644, 0),
        ("etc/.wh.remove-me", Some(b""), 0o644, 0),
        ("opt/", None, 0o755, 0),
        ("opt/gone/", None, 0o755, 0),
        ("opt/gone/.wh..wh..opq", Some(b""), 0o644, 0),
        ("opt/gone/new", Some(b"new"), 0o644, 0),
    ]);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [
            format!("sha256:{}", hex(&layer1)),
            format!("sha256:{}", hex(&layer2)),
        ]},
        "history": [{"created_by": "layer 1"}, {"created_by": "layer 2"}],
    }))
    .expect("config");
    Parts {
        layer2_gz: gzip(&layer2),
        layer1,
        config,
    }
}

/// A docker save tarball; `manifest` overrides manifest.json, `extra` adds raw entries.
fn docker_save(p: &Parts, manifest: Option<&[u8]>, extra: &[(&str, &[u8])]) -> Vec<u8> {
    let chex = hex(&p.config);
    let m = serde_json::to_vec(&serde_json::json!([{
        "Config": format!("{chex}.json"),
        "RepoTags": ["test/tiny:1"],
        "Layers": ["l1/layer.tar", "l2/layer.tar"],
    }]))
    .expect("manifest");
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).expect("append");
    };
    add(&format!("{chex}.json"), &p.config);
    add("l1/layer.tar", &p.layer1);
    add("l2/layer.tar", &p.layer2_gz);
    add("manifest.json", manifest.unwrap_or(&m));
    for (n, d) in extra {
        append_raw_name(&mut b, n, d);
    }
    b.into_inner().expect("tar")
}

fn upload(rt: &tokio::runtime::Runtime, g: &Glance, dir: &Path, name: &str, data: &[u8]) -> String {
    let f = dir.join(format!("{name}.tar"));
    std::fs::write(&f, data).expect("write tarball");
    let client = GlanceClient::new(&g.endpoint, None).expect("client");
    rt.block_on(async {
        let m = client
            .create(&NewImage {
                name: name.into(),
                disk_format: "raw".into(),
                container_format: "docker".into(),
                ..NewImage::default()
            })
            .await
            .expect("create");
        client.upload(&m.id, &f).await.expect("upload");
        client
            .wait_active(&m.id, Duration::from_secs(60))
            .await
            .expect("active")
            .id
    })
}

#[test]
fn docker_save_tarball_layers_imported_as_they_are() {
    require_root();
    let g = Glance::start();
    let rt = rt();
    let work = tempfile::tempdir().expect("tmp");
    let p = parts();
    // docker save | gzip: the outer tarball compressed too.
    let id = upload(
        &rt,
        &g,
        work.path(),
        "tiny",
        &gzip(&docker_save(&p, None, &[])),
    );
    let cdir = work.path().join("cache");
    let cache = Arc::new(
        LayerCache::open(
            CacheOptions::new(&cdir),
            Some(GlanceClient::new(&g.endpoint, None).expect("client")),
        )
        .expect("open cache"),
    );
    let img = rt.block_on(cache.ensure_image(&id, None)).expect("pull");
    assert_eq!(img.container_format.as_deref(), Some("docker"));
    // As they are: the blobs are the tarball's layer files, byte for byte.
    assert_eq!(
        img.layer_digests(),
        vec![
            format!("sha256:{}", hex(&p.layer1)),
            format!("sha256:{}", hex(&p.layer2_gz)),
        ]
    );
    let (l1, l2) = (&img.layer_dirs[0], &img.layer_dirs[1]);
    assert_eq!(
        std::fs::read(l1.join("etc/marker")).expect("m1"),
        b"docker-1"
    );
    assert_eq!(
        std::fs::read(l2.join("etc/marker")).expect("m2"),
        b"docker-2"
    );
    let tool = std::fs::metadata(l1.join("usr/bin/tool")).expect("tool");
    assert_eq!((tool.uid(), tool.mode() & 0o7777), (1000, 0o755));
    // Docker whiteouts became overlay ones.
    let wh = std::fs::symlink_metadata(l2.join("etc/remove-me")).expect("whiteout");
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0, "{wh:?}");
    let opq = rustix::fs::getxattr(l2.join("opt/gone"), "trusted.overlay.opaque", &mut [0u8; 4])
        .expect("opaque xattr");
    assert_eq!(opq, 1);
    assert_eq!(std::fs::read(l2.join("opt/gone/new")).expect("new"), b"new");
    assert_eq!(cache.counters.downloads.load(Ordering::Relaxed), 1);
    let r = cache.fsck().expect("fsck");
    assert!(r.clean(), "{r:?}");
    // Warm.
    rt.block_on(cache.ensure_image(&id, None)).expect("warm");
    assert_eq!(cache.counters.downloads.load(Ordering::Relaxed), 1);
}

#[test]
fn malformed_docker_tarballs_are_refused_and_nothing_cached() {
    require_root();
    let g = Glance::start();
    let rt = rt();
    let work = tempfile::tempdir().expect("tmp");
    let p = parts();
    let chex = hex(&p.config);
    let missing = serde_json::to_vec(&serde_json::json!([{
        "Config": format!("{chex}.json"),
        "Layers": ["l1/layer.tar", "l3/layer.tar"],
    }]))
    .expect("json");
    let mut bad_diff = Parts {
        layer1: p.layer1.clone(),
        layer2_gz: p.layer2_gz.clone(),
        config: p.config.clone(),
    };
    bad_diff.layer1.extend_from_slice(&[0u8; 1024]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "escape",
            docker_save(&p, None, &[("../evil", b"x")]),
            "escapes the archive",
        ),
        (
            "missing-layer",
            docker_save(&p, Some(&missing), &[]),
            "l3/layer.tar is named but not in the tarball",
        ),
        (
            "bad-manifest",
            docker_save(&p, Some(b"{not json"), &[]),
            "manifest.json:",
        ),
        (
            "diff-id",
            docker_save(&bad_diff, None, &[]),
            "the config says",
        ),
        (
            "not-a-tar",
            b"just some bytes, no tar".repeat(40),
            "docker save tarball",
        ),
    ];
    let cdir = work.path().join("cache");
    let cache = Arc::new(
        LayerCache::open(
            CacheOptions::new(&cdir),
            Some(GlanceClient::new(&g.endpoint, None).expect("client")),
        )
        .expect("open cache"),
    );
    for (name, data, want) in cases {
        let id = upload(&rt, &g, work.path(), name, &data);
        let e = rt.block_on(cache.ensure_image(&id, None)).expect_err(name);
        assert!(matches!(e, Error::Invalid(_)), "{name}: {e:?}");
        assert!(e.to_string().contains(want), "{name}: {e}");
        assert!(cache.lookup(&id).expect("lookup").is_none(), "{name}");
        assert!(
            entries(&cdir.join("tmp")).is_empty(),
            "{name}: tmp {:?}",
            entries(&cdir.join("tmp"))
        );
    }
    assert!(entries(&cdir.join("layers")).is_empty());
    let r = cache.fsck().expect("fsck");
    assert!(r.clean(), "{r:?}");
}
