//! image-bridge against the real Glance API (PyPI). Needs root (unpacked layers carry
//! overlay whiteouts and trusted.* xattrs), curl, qemu-img, mkfs.ext4.

mod common;

use common::{entries, require_root, tiny_image, Glance, Proxy};
use image_bridge::glance::NewImage;
use image_bridge::{CacheOptions, Error, GlanceClient, LayerCache};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn open_cache(dir: &Path, endpoint: &str, max_bytes: Option<u64>) -> Arc<LayerCache> {
    let mut o = CacheOptions::new(dir);
    o.max_bytes = max_bytes;
    Arc::new(
        LayerCache::open(o, Some(GlanceClient::new(endpoint, None).expect("client")))
            .expect("open cache"),
    )
}

fn assert_clean(cache: &LayerCache) {
    let r = cache.fsck().expect("fsck");
    assert!(r.clean(), "fsck: {r:?}");
    assert!(
        entries(&cache.dir().join("tmp")).is_empty(),
        "tmp not empty: {:?}",
        entries(&cache.dir().join("tmp"))
    );
}

/// Upload with our client (create + streamed PUT + PATCH), then pull: verified, converted,
/// layers unpacked with the image's files; a second pull is a warm hit.
#[test]
fn upload_pull_convert_and_warm_hit() {
    require_root();
    let g = Glance::start();
    let work = tempfile::tempdir().expect("tmp");
    let raw = tiny_image(work.path(), "a", 4, "hello-from-glance");
    let qcow = work.path().join("a.qcow2");
    common::qemu_convert(&raw, "qcow2", &qcow);
    let rt = rt();
    let client = GlanceClient::new(&g.endpoint, None).expect("client");
    let id = rt.block_on(async {
        let m = client
            .create(&NewImage {
                name: "tiny".into(),
                disk_format: "qcow2".into(),
                container_format: "bare".into(),
                ..NewImage::default()
            })
            .await
            .expect("create");
        client.upload(&m.id, &qcow).await.expect("upload");
        let mut props = serde_json::Map::new();
        props.insert("fatbox_test".into(), "yes".into());
        client.set_properties(&m.id, &props).await.expect("patch");
        let m = client
            .wait_active(&m.id, Duration::from_secs(60))
            .await
            .expect("active");
        assert_eq!(m.property("fatbox_test"), Some("yes"));
        assert_eq!(m.os_hash_algo.as_deref(), Some("sha512"));
        m.id
    });
    let cdir = work.path().join("cache");
    let cache = open_cache(&cdir, &g.endpoint, None);
    let img = rt.block_on(cache.ensure_image(&id, None)).expect("pull");
    assert_eq!(img.layers.len(), 2, "base + containerize layers");
    assert_eq!(img.hash_algo.as_deref(), Some("sha512"));
    let base = &img.layer_dirs[0];
    assert_eq!(
        std::fs::read_to_string(base.join("etc/marker")).expect("marker in base layer"),
        "hello-from-glance"
    );
    assert_eq!(
        std::fs::metadata(base.join("opt/payload"))
            .expect("payload")
            .len(),
        4 << 20
    );
    assert_eq!(cache.counters.downloads.load(Ordering::Relaxed), 1);
    assert_eq!(cache.counters.conversions.load(Ordering::Relaxed), 1);
    // Warm: no Glance call at all (stop it first to prove it).
    drop(g);
    let t = Instant::now();
    let again = rt
        .block_on(cache.ensure_image(&id, None))
        .expect("warm pull");
    let warm = t.elapsed();
    assert_eq!(again.layer_dirs, img.layer_dirs);
    assert_eq!(cache.counters.downloads.load(Ordering::Relaxed), 1);
    assert_eq!(cache.counters.hits.load(Ordering::Relaxed), 1);
    assert!(
        warm < Duration::from_millis(50),
        "warm ensure_image took {warm:?}"
    );
    assert_clean(&cache);
    // A second process (reopen) sees the same image.
    drop(cache);
    let cache = open_cache(&cdir, "http://127.0.0.1:9", None);
    assert!(cache.lookup(&id).expect("lookup").is_some());
    assert_clean(&cache);
}

/// Two concurrent pulls in one process, and two in separate processes: one download and
/// one conversion each time.
#[test]
fn concurrent_pulls_download_and_convert_once() {
    require_root();
    let g = Glance::start();
    let work = tempfile::tempdir().expect("tmp");
    let raw = tiny_image(work.path(), "b", 16, "single-flight");
    let id = g.upload_with_curl(&raw, "b", "raw");
    let rt = rt();
    let cache = open_cache(&work.path().join("c1"), &g.endpoint, None);
    let (a, b) = rt.block_on(async {
        let (c1, c2) = (cache.clone(), cache.clone());
        let (i1, i2) = (id.clone(), id.clone());
        let t1 = tokio::spawn(async move { c1.ensure_image(&i1, None).await });
        let t2 = tokio::spawn(async move { c2.ensure_image(&i2, None).await });
        (t1.await.expect("join"), t2.await.expect("join"))
    });
    let (a, b) = (a.expect("pull 1"), b.expect("pull 2"));
    assert_eq!(a.layer_dirs, b.layer_dirs);
    assert_eq!(cache.counters.downloads.load(Ordering::Relaxed), 1);
    assert_eq!(cache.counters.conversions.load(Ordering::Relaxed), 1);
    assert_eq!(cache.counters.hits.load(Ordering::Relaxed), 1);
    assert_clean(&cache);

    // Across processes: the per-image file lock.
    let c2 = work.path().join("c2");
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_image-bridge"))
            .arg("--cache")
            .arg(&c2)
            .args(["--endpoint", &g.endpoint, "--json", "pull", &id])
            .env("IMAGE_BRIDGE_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("image-bridge")
    };
    let (p1, p2) = (spawn(), spawn());
    let mut downloads = 0;
    let mut conversions = 0;
    for p in [p1, p2] {
        let out = p.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "child pull failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        downloads += v["downloads"].as_u64().expect("downloads");
        conversions += v["conversions"].as_u64().expect("conversions");
    }
    assert_eq!((downloads, conversions), (1, 1), "two processes, one fill");
    assert_clean(&open_cache(&c2, &g.endpoint, None));
}

/// Glance's stored file altered behind its back: the hash check refuses it, nothing is
/// cached, nothing left behind.
#[test]
fn tampered_image_is_refused_and_nothing_cached() {
    require_root();
    let g = Glance::start();
    let work = tempfile::tempdir().expect("tmp");
    let raw = tiny_image(work.path(), "t", 4, "tamper");
    let id = g.upload_with_curl(&raw, "t", "raw");
    let stored = g.stored_file(&id);
    let mut data = std::fs::read(&stored).expect("stored file");
    let n = data.len();
    data[n / 2] ^= 0xff;
    std::fs::write(&stored, &data).expect("tamper");
    let cache = open_cache(&work.path().join("c"), &g.endpoint, None);
    let err = rt()
        .block_on(cache.ensure_image(&id, None))
        .expect_err("must refuse");
    match &err {
        Error::HashMismatch { algo, .. } => assert_eq!(algo, "sha512"),
        e => panic!("expected a hash mismatch, got {e}"),
    }
    assert!(err.to_string().contains("download discarded"));
    assert!(cache.list().expect("list").is_empty());
    assert!(entries(&cache.dir().join("layers")).is_empty());
    assert_eq!(cache.counters.conversions.load(Ordering::Relaxed), 0);
    assert_clean(&cache);
}

/// A connection dropped mid-transfer is resumed with Range and the result still verifies.
#[test]
fn dropped_connection_is_resumed() {
    require_root();
    let g = Glance::start();
    let work = tempfile::tempdir().expect("tmp");
    let raw = tiny_image(work.path(), "r", 24, "resume");
    let id = g.upload_with_curl(&raw, "r", "raw");
    let proxy = Proxy::start(&g.endpoint, Some(5 << 20), None);
    let client = GlanceClient::new(&proxy.endpoint, None).expect("client");
    let rt = rt();
    let dest = work.path().join("dl");
    let (meta, rep) = rt.block_on(async {
        let meta = client.show(&id).await.expect("show");
        let rep = client
            .download(&meta, &dest, &|_, _| {})
            .await
            .expect("download");
        (meta, rep)
    });
    assert_eq!(
        proxy.cuts.load(Ordering::SeqCst),
        1,
        "the proxy cut one connection"
    );
    assert!(rep.retries >= 1, "resumed: {rep:?}");
    assert_eq!(rep.verified_with.as_deref(), Some("sha512"));
    assert_eq!(Some(rep.bytes), meta.size);
    assert_eq!(
        std::fs::read(&dest).expect("dl"),
        std::fs::read(&raw).expect("raw")
    );
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut d = Duration::from_millis(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(d);
        d = (d * 2).min(Duration::from_millis(100));
    }
}

fn work_dirs(cache: &Path) -> Vec<std::path::PathBuf> {
    entries(&cache.join("tmp"))
        .into_iter()
        .filter(|n| n.starts_with("w-"))
        .map(|n| cache.join("tmp").join(n))
        .collect()
}

/// kill -9 of a pulling process during the download, then during the conversion: the next
/// pull succeeds, no temp data is left and fsck is clean.
#[test]
fn kill9_during_download_and_conversion_then_pull_again() {
    require_root();
    let g = Glance::start();
    let work = tempfile::tempdir().expect("tmp");
    let raw = tiny_image(work.path(), "k", 48, "kill-nine");
    let id = g.upload_with_curl(&raw, "k", "raw");
    let cdir = work.path().join("c");
    // Throttled so the download is surely in flight when the kill lands.
    let slow = Proxy::start(&g.endpoint, None, Some(8 << 20));
    let pull = |endpoint: &str| {
        Command::new(env!("CARGO_BIN_EXE_image-bridge"))
            .arg("--cache")
            .arg(&cdir)
            .args(["--endpoint", endpoint, "--json", "pull", &id])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("image-bridge")
    };
    // 1. during the download
    let mut child = pull(&slow.endpoint);
    wait_for("the download to start", Duration::from_secs(60), || {
        work_dirs(&cdir)
            .iter()
            .any(|w| std::fs::metadata(w.join("source")).is_ok_and(|m| m.len() > (1 << 20)))
    });
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    assert!(
        !work_dirs(&cdir).is_empty(),
        "the killed pull left its work dir"
    );
    // 2. during the conversion (the oci dir appears once the download verified)
    let mut child = pull(&g.endpoint);
    wait_for("the conversion to start", Duration::from_secs(120), || {
        work_dirs(&cdir).iter().any(|w| w.join("oci").exists())
    });
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    // 3. a fresh process: open cleans up, the pull succeeds, nothing is left over.
    let cache = open_cache(&cdir, &g.endpoint, None);
    assert!(
        work_dirs(&cdir).is_empty(),
        "stale work dirs removed at open"
    );
    let img = rt()
        .block_on(cache.ensure_image(&id, None))
        .expect("pull after kills");
    assert_eq!(
        std::fs::read_to_string(img.layer_dirs[0].join("etc/marker")).expect("marker"),
        "kill-nine"
    );
    assert_clean(&cache);
}

/// Under a tiny cap, pulling a second image evicts the first unless an instance pins it.
#[test]
fn eviction_under_tiny_cap_keeps_pinned_layers() {
    require_root();
    let g = Glance::start();
    let work = tempfile::tempdir().expect("tmp");
    let a = g.upload_with_curl(&tiny_image(work.path(), "ea", 2, "image-a"), "ea", "raw");
    let b = g.upload_with_curl(&tiny_image(work.path(), "eb", 2, "image-b"), "eb", "raw");
    let c = g.upload_with_curl(&tiny_image(work.path(), "ec", 2, "image-c"), "ec", "raw");
    let rt = rt();
    let cache = open_cache(&work.path().join("c"), &g.endpoint, Some(1));
    let ia = rt.block_on(cache.ensure_image(&a, None)).expect("a");
    cache.pin("instance-1", &a).expect("pin a");
    rt.block_on(cache.ensure_image(&b, None)).expect("b");
    // a is pinned: kept although older and over the cap.
    assert!(
        cache.lookup(&a).expect("lookup").is_some(),
        "pinned image evicted"
    );
    for d in &ia.layer_dirs {
        assert!(d.is_dir(), "pinned layer dir {} removed", d.display());
    }
    // c evicts b (unpinned, least recently used), not a.
    let ic = rt.block_on(cache.ensure_image(&c, None)).expect("c");
    assert!(
        cache.lookup(&b).expect("lookup").is_none(),
        "b should be evicted"
    );
    assert!(cache.lookup(&a).expect("lookup").is_some());
    assert!(cache.counters.evictions.load(Ordering::Relaxed) >= 1);
    // Unpinned, a goes too (c was used more recently).
    cache.unpin("instance-1").expect("unpin");
    let ev = cache.evict(std::slice::from_ref(&c)).expect("evict");
    assert_eq!(ev, vec![a.clone()]);
    // a's base layer (its own marker) goes; a layer c shares (the containerize layer is
    // byte-identical when both were built within the same second) must stay for c.
    assert!(!ia.layer_dirs[0].exists(), "a's base layer kept");
    for d in &ia.layer_dirs {
        if ic.layer_dirs.contains(d) {
            assert!(d.is_dir(), "layer {} shared with c removed", d.display());
        } else {
            assert!(!d.exists(), "unpinned layer dir {} kept", d.display());
        }
    }
    assert_clean(&cache);
}

/// vmdk goes through qemu-img first (the slow path) and ends up with the same files.
#[test]
fn vmdk_goes_through_qemu_img() {
    require_root();
    let g = Glance::start();
    let work = tempfile::tempdir().expect("tmp");
    let raw = tiny_image(work.path(), "v", 2, "from-vmdk");
    let vmdk = work.path().join("v.vmdk");
    common::qemu_convert(&raw, "vmdk", &vmdk);
    let id = g.upload_with_curl(&vmdk, "v", "vmdk");
    let cache = open_cache(&work.path().join("c"), &g.endpoint, None);
    let img = rt()
        .block_on(cache.ensure_image(&id, None))
        .expect("pull vmdk");
    assert_eq!(img.disk_format, "vmdk");
    assert_eq!(
        std::fs::read_to_string(img.layer_dirs[0].join("etc/marker")).expect("marker"),
        "from-vmdk"
    );
    assert_clean(&cache);
}
