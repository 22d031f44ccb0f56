//! Bench (ignored by default; bench/image-bridge/run.sh): cold pull+convert of the fixture
//! qcow2 from a local Glance vs curl of the same file, and warm-cache ensure_image latency.

mod common;

use common::{require_root, Glance};
use image_bridge::{CacheOptions, GlanceClient, LayerCache};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

#[test]
#[ignore = "bench: bash bench/image-bridge/run.sh"]
fn bench_pull_and_warm_hit() {
    require_root();
    let g = Glance::start();
    let src = std::env::var("BENCH_IMAGE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| common::fixtures().join("v3.qcow2"));
    let fmt = if src.extension().is_some_and(|e| e == "raw") {
        "raw"
    } else {
        "qcow2"
    };
    let id = g.upload_with_curl(&src, "bench", fmt);
    let size = std::fs::metadata(&src).expect("image").len() as f64 / (1u64 << 20) as f64;
    let work = tempfile::Builder::new()
        .prefix("ib-bench-")
        .tempdir_in("/var/tmp")
        .expect("tmp");
    let t = Instant::now();
    let st = Command::new("curl")
        .args(["-sf", "-o"])
        .arg(work.path().join("curl.out"))
        .arg(format!("{}/v2/images/{id}/file", g.endpoint))
        .status()
        .expect("curl");
    assert!(st.success());
    let curl = t.elapsed().as_secs_f64();
    std::fs::remove_file(work.path().join("curl.out")).expect("rm");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    let client = GlanceClient::new(&g.endpoint, None).expect("client");
    let dl = rt.block_on(async {
        let m = client.show(&id).await.expect("show");
        client
            .download(&m, &work.path().join("dl"), &|_, _| {})
            .await
            .expect("download")
    });
    std::fs::remove_file(work.path().join("dl")).expect("rm");
    let cache = Arc::new(
        LayerCache::open(CacheOptions::new(work.path().join("cache")), Some(client))
            .expect("cache"),
    );
    let t = Instant::now();
    rt.block_on(cache.ensure_image(&id, None)).expect("cold");
    let cold = t.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    for _ in 0..1000 {
        let t = Instant::now();
        rt.block_on(cache.ensure_image(&id, None)).expect("warm");
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    println!("| what | value |\n|---|---|");
    println!("| image | {} ({size:.0} MiB) |", src.display());
    println!(
        "| curl from Glance | {curl:.2} s = {:.0} MiB/s |",
        size / curl
    );
    println!(
        "| image-bridge download (sha512 verified) | {:.2} s = {:.0} MiB/s |",
        dl.seconds,
        size / dl.seconds
    );
    println!(
        "| cold ensure_image (download + verify + convert + unpack) | {cold:.2} s = {:.0} MiB/s of image |",
        size / cold
    );
    println!(
        "| warm ensure_image, 1000 calls | median {:.3} ms, p99 {:.3} ms, max {:.3} ms |",
        lat[500], lat[990], lat[999]
    );
}
