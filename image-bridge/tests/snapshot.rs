//! Snapshots against the real Glance API (PyPI): an overlay upper dir (whiteouts, an opaque
//! dir, owners shifted by a user namespace, identity files) becomes one layer, is published
//! with its parent chain in the properties, and comes back through `ensure_image`: a cache
//! that has the parent downloads only the layer, an empty cache fetches the whole chain.
//! Needs root (mknod whiteouts, trusted.* xattrs, chown).

mod common;

use common::{require_root, tiny_image, Glance};
use image_bridge::glance::NewImage;
use image_bridge::snapshot::{self, PublishRequest, UpperOptions};
use image_bridge::{CacheOptions, Error, GlanceClient, LayerCache};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const BASE: u32 = 200_000;
const SIZE: u32 = 65_536;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn open_cache(dir: &Path, endpoint: &str) -> Arc<LayerCache> {
    Arc::new(
        LayerCache::open(
            CacheOptions::new(dir),
            Some(GlanceClient::new(endpoint, None).expect("client")),
        )
        .expect("open cache"),
    )
}

fn counts(c: &LayerCache) -> (u64, u64) {
    (
        c.counters.downloads.load(Ordering::Relaxed),
        c.counters.conversions.load(Ordering::Relaxed),
    )
}

/// An upper dir as overlayfs leaves it under a user namespace at BASE.
fn make_upper(dir: &Path, tag: &str) {
    let host = |id: u32| BASE + id;
    for d in ["etc/ssh", "home/user", "opt", "root/.ssh"] {
        std::fs::create_dir_all(dir.join(d)).expect("mkdir");
    }
    // What the guest's root creates is owned by BASE on the host.
    for d in [
        "etc",
        "etc/ssh",
        "home",
        "home/user",
        "opt",
        "root",
        "root/.ssh",
    ] {
        std::os::unix::fs::chown(dir.join(d), Some(host(0)), Some(host(0))).expect("chown");
    }
    std::fs::write(
        dir.join("etc/new-file"),
        format!("written in the instance {tag}\n"),
    )
    .expect("write");
    std::os::unix::fs::chown(dir.join("etc/new-file"), Some(host(0)), Some(host(0)))
        .expect("chown");
    std::fs::write(dir.join("home/user/owned"), "mine\n").expect("write");
    std::os::unix::fs::chown(
        dir.join("home/user/owned"),
        Some(host(1000)),
        Some(host(1000)),
    )
    .expect("chown");
    std::os::unix::fs::chown(dir.join("home/user"), Some(host(1000)), Some(host(1000)))
        .expect("chown");
    // A hard link pair.
    std::fs::hard_link(dir.join("home/user/owned"), dir.join("home/user/owned-too")).expect("link");
    // Whiteout: the image's /etc/marker was deleted.
    rustix::fs::mknodat(
        rustix::fs::CWD,
        dir.join("etc/marker"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        0,
    )
    .expect("mknod whiteout");
    // Opaque: /opt was removed and made again (the image's payload hidden).
    rustix::fs::setxattr(
        dir.join("opt"),
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .expect("opaque xattr");
    std::fs::write(dir.join("opt/fresh"), "fresh\n").expect("write");
    std::os::unix::fs::chown(dir.join("opt/fresh"), Some(host(0)), Some(host(0))).expect("chown");
    // Left by a process outside the range: the guest saw the overflow id.
    std::fs::write(dir.join("opt/stray"), "?\n").expect("write");
    // Identity: dropped from the layer.
    std::fs::write(dir.join("etc/hostname"), "inst-1\n").expect("write");
    std::fs::write(dir.join("etc/ssh/ssh_host_ed25519_key"), "secret").expect("write");
    std::fs::write(
        dir.join("root/.ssh/authorized_keys"),
        "ssh-ed25519 AAAA test\n",
    )
    .expect("write");
}

fn options() -> UpperOptions {
    UpperOptions {
        shift: Some((BASE, SIZE)),
        exclude: vec![
            "etc/hostname".into(),
            "etc/ssh/ssh_host_*".into(),
            "config-drive".into(),
        ],
        exclude_if_equal: vec![(
            "root/.ssh/authorized_keys".into(),
            b"ssh-ed25519 AAAA test\n".to_vec(),
        )],
        level: 3,
        threads: 1,
        plain: false,
    }
}

#[test]
fn snapshot_chain_round_trip() {
    require_root();
    let g = Glance::start();
    let work = tempfile::tempdir().expect("tmp");
    let raw = tiny_image(work.path(), "base", 2, "base-marker");
    let parent = g.upload_with_curl(&raw, "base", "raw");
    let rt = rt();
    let client = GlanceClient::new(&g.endpoint, None).expect("client");

    // Host A boots the parent.
    let a = open_cache(&work.path().join("cache-a"), &g.endpoint);
    let pimg = rt.block_on(a.ensure_image(&parent, None)).expect("parent");
    assert_eq!(counts(&a), (1, 1));

    // The instance's changes.
    let upper = work.path().join("upper");
    make_upper(&upper, "one");
    let layout = guestfs_tools::oci::Layout::create(&work.path().join("snap-oci")).expect("layout");
    let layer = snapshot::upper_to_layer(&upper, &layout, &options()).expect("layer");
    assert_eq!(layer.whiteouts, 1);
    assert_eq!(layer.opaque_dirs, 1);
    assert_eq!(layer.unmapped_owners, 2, "opt/stray's uid and gid");
    let mut skipped = layer.skipped.clone();
    skipped.sort();
    assert_eq!(
        skipped,
        [
            "etc/hostname",
            "etc/ssh/ssh_host_ed25519_key",
            "root/.ssh/authorized_keys"
        ]
    );
    // Same tree, same layer; written plain then compressed (the frozen-instance path), too.
    let again = snapshot::upper_to_layer(&upper, &layout, &options()).expect("layer");
    assert_eq!(again.digest, layer.digest);
    let mut plain = snapshot::upper_to_layer(
        &upper,
        &layout,
        &UpperOptions {
            plain: true,
            ..options()
        },
    )
    .expect("plain layer");
    assert_eq!(plain.diff_id, layer.diff_id);
    assert_eq!(plain.digest, plain.diff_id, "uncompressed");
    let plain_blob = plain.blob.clone();
    snapshot::compress_layer(&layout, &mut plain, 3, 1).expect("compress");
    assert_eq!(plain.digest, layer.digest);
    assert!(!plain_blob.exists(), "plain blob removed");

    let req = PublishRequest {
        image_id: None,
        name: Some("snap-1".into()),
        parent: parent.clone(),
        parent_layers: pimg.layer_digests(),
        properties: serde_json::from_str(r#"{"os_distro": "debian"}"#).expect("props"),
    };
    let meta = rt
        .block_on(snapshot::publish(&client, &req, &layer))
        .expect("publish");
    assert_eq!(meta.status, "active");
    assert_eq!(meta.size, Some(layer.size), "uploaded = the layer blob");
    assert_eq!(meta.disk_format.as_deref(), Some(snapshot::DISK_FORMAT));
    assert_eq!(
        meta.container_format.as_deref(),
        Some(snapshot::CONTAINER_FORMAT)
    );
    assert_eq!(meta.property("fatbox_parent"), Some(parent.as_str()));
    assert_eq!(
        meta.property("fatbox_layer_digest"),
        Some(layer.digest.as_str())
    );
    let mut all = pimg.layer_digests();
    all.push(layer.digest.clone());
    assert_eq!(meta.property("fatbox_layers"), Some(all.join(",").as_str()));
    assert_eq!(meta.property("os_distro"), Some("debian"));
    let snap1 = meta.id.clone();

    // Host A has the parent: one download (the layer), no conversion.
    let img = rt
        .block_on(a.ensure_image(&snap1, None))
        .expect("snap on A");
    assert_eq!(counts(&a), (2, 1), "only the new layer is fetched");
    assert_eq!(img.layer_digests(), all);
    let top = img.layer_dirs.last().expect("layer dir");
    let md = std::fs::metadata(top.join("home/user/owned")).expect("owned");
    assert_eq!((md.uid(), md.gid()), (1000, 1000), "un-shifted owner");
    assert_eq!(md.nlink(), 2, "hard link kept");
    let md = std::fs::metadata(top.join("etc/new-file")).expect("new");
    assert_eq!((md.uid(), md.gid()), (0, 0));
    let wh = std::fs::symlink_metadata(top.join("etc/marker")).expect("whiteout");
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    let op = rustix::fs::getxattr(top.join("opt"), "trusted.overlay.opaque", &mut [0u8; 4])
        .expect("opaque");
    assert_eq!(op, 1);
    assert!(top.join("opt/fresh").is_file());
    let md = std::fs::metadata(top.join("opt/stray")).expect("stray");
    assert_eq!((md.uid(), md.gid()), (65534, 65534));
    for gone in [
        "etc/hostname",
        "etc/ssh/ssh_host_ed25519_key",
        "root/.ssh/authorized_keys",
    ] {
        assert!(!top.join(gone).exists(), "{gone} leaked into the snapshot");
    }
    let r = a.fsck().expect("fsck");
    assert!(r.clean(), "{r:?}");

    // Nova's way: a queued image created first, then the snapshot uploads into it.
    make_upper(&work.path().join("upper2"), "two");
    let layer2 = snapshot::upper_to_layer(&work.path().join("upper2"), &layout, &options())
        .expect("layer 2");
    let queued = rt
        .block_on(client.create(&NewImage {
            name: "nova-snap".into(),
            disk_format: "qcow2".into(),
            container_format: "bare".into(),
            ..NewImage::default()
        }))
        .expect("queued");
    let req2 = PublishRequest {
        image_id: Some(queued.id.clone()),
        name: None,
        parent: snap1.clone(),
        parent_layers: img.layer_digests(),
        properties: Default::default(),
    };
    let m2 = rt
        .block_on(snapshot::publish(&client, &req2, &layer2))
        .expect("publish into queued");
    assert_eq!(m2.id, queued.id);
    assert_eq!(m2.status, "active");
    // Uploading into an active image is refused.
    let e = rt
        .block_on(snapshot::publish(&client, &req2, &layer2))
        .expect_err("active image");
    assert!(matches!(e, Error::Invalid(_)), "{e}");

    // Host B, empty cache: the whole chain (parent, snap1, snap2), one conversion.
    let b = open_cache(&work.path().join("cache-b"), &g.endpoint);
    let img2 = rt
        .block_on(b.ensure_image(&m2.id, None))
        .expect("chain on B");
    assert_eq!(counts(&b), (3, 1));
    assert_eq!(img2.layers.len(), pimg.layers.len() + 2);
    let top2 = img2.layer_dirs.last().expect("dir");
    assert_eq!(
        std::fs::read_to_string(top2.join("etc/new-file")).expect("file"),
        "written in the instance two\n"
    );
    // The parents are cached on B too.
    assert!(b.lookup(&snap1).expect("lookup").is_some());
    let r = b.fsck().expect("fsck");
    assert!(r.clean(), "{r:?}");

    // A cycle (snap1's parent pointed at snap2) is refused on a fresh host.
    rt.block_on(client.set_properties(
        &snap1,
        &serde_json::from_value(serde_json::json!({"fatbox_parent": m2.id})).expect("map"),
    ))
    .expect("patch");
    let c = open_cache(&work.path().join("cache-c"), &g.endpoint);
    let e = rt
        .block_on(c.ensure_image(&m2.id, None))
        .expect_err("cycle");
    assert!(e.to_string().contains("cycle"), "{e}");
    let r = c.fsck().expect("fsck");
    assert!(r.clean(), "{r:?}");
}
