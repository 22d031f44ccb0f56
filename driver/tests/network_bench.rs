//! Plug latency benchmark (run by bench/network/run.sh; ignored in normal test runs):
//! the driver (one netlink request + one OVSDB transaction) against the same steps done with
//! `ip` and `ovs-vsctl`, sequentially and 50 in parallel, in the same run.

mod ovs_harness;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driver::network::{parse_nic, NetnsRef, Network, NicSpec};
use ovs_harness::{Netns, Ovs};

const N: usize = 50;

fn stats(name: &str, mut v: Vec<Duration>, wall: Option<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p = |q: f64| ms(v[((v.len() as f64 - 1.0) * q).round() as usize]);
    let mean = v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
    match wall {
        Some(w) => println!(
            "{name:<44} n={:<3} mean {mean:7.2} ms  p50 {:7.2}  p95 {:7.2}  max {:7.2}  wall {:8.1} ms",
            v.len(), p(0.5), p(0.95), p(1.0), ms(w)
        ),
        None => println!(
            "{name:<44} n={:<3} mean {mean:7.2} ms  p50 {:7.2}  p95 {:7.2}  max {:7.2}",
            v.len(), p(0.5), p(0.95), p(1.0)
        ),
    }
    (mean, wall.map(ms).unwrap_or(0.0))
}

fn shell_plug(ovs_db: &str, bridge: &str, ns: &str, inst: &str, nic: &NicSpec, wait: bool) {
    let tap = nic.tap_name();
    let mac = nic.effective_mac().to_string();
    let ok = |c: &mut Command| {
        let o = c.output().expect("spawn");
        assert!(
            o.status.success(),
            "{c:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    ok(Command::new("ip").args([
        "link", "add", &tap, "type", "veth", "peer", "name", "eth0", "netns", ns, "address", &mac,
    ]));
    ok(Command::new("ip").args(["link", "set", &tap, "up"]));
    let tag = format!("tag={}", nic.vlan.unwrap_or(1));
    let ids = [
        format!("external_ids:iface-id={}", nic.port_id),
        "external_ids:iface-status=active".to_string(),
        format!("external_ids:attached-mac={mac}"),
        format!("external_ids:vm-uuid={inst}"),
    ];
    let db = format!("--db={ovs_db}");
    let mut args = vec![db.as_str()];
    if !wait {
        args.push("--no-wait");
    }
    args.extend([
        "--",
        "--may-exist",
        "add-port",
        bridge,
        &tap,
        &tag,
        "vlan_mode=access",
    ]);
    args.extend(["--", "set", "Interface", &tap]);
    args.extend(ids.iter().map(String::as_str));
    ok(Command::new("ovs-vsctl").args(&args));
}

fn shell_unplug(ovs_db: &str, tap: &str) {
    let db = format!("--db={ovs_db}");
    let _ = Command::new("ovs-vsctl")
        .args([db.as_str(), "--no-wait", "--if-exists", "del-port", tap])
        .output();
    let _ = Command::new("ip").args(["link", "del", tap]).output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: bench/network/run.sh"]
async fn plug_latency() {
    let ovs = Ovs::start();
    let net = Arc::new(Network::connect(&ovs.config()).await.expect("connect"));
    let db = ovs.endpoint();
    let br = ovs.bridge.clone();
    let nss: Vec<Arc<Netns>> = (0..N).map(|_| Arc::new(Netns::new())).collect();
    let inst = uuid::Uuid::new_v4().to_string();
    let nic =
        |i: usize| parse_nic(&format!("vlan={},ip=10.70.0.5/24", 100 + i % 2)).expect("parse");
    // Warm up both paths (page cache, first connection).
    for _ in 0..3 {
        let n = nic(0);
        let v = net
            .plug(&inst, &NetnsRef::Path(nss[0].path()), 0, &n)
            .await
            .expect("plug");
        net.unplug(&inst, &v.port_id).await.expect("unplug");
        shell_plug(&db, &br, &nss[0].name, &inst, &n, false);
        shell_unplug(&db, &n.tap_name());
    }
    println!(
        "--- plug latency, {N} VIFs (veth + netns move + OVS port with external_ids + tag) ---"
    );

    // Sequential.
    let nics: Vec<NicSpec> = (0..N).map(nic).collect();
    let mut lat = Vec::new();
    for (ns, n) in nss.iter().zip(&nics) {
        let t = Instant::now();
        net.plug(&inst, &NetnsRef::Path(ns.path()), 0, n)
            .await
            .expect("plug");
        lat.push(t.elapsed());
    }
    let (drv_seq, _) = stats("driver sequential", lat, None);
    let t = Instant::now();
    for n in &nics {
        net.unplug(&inst, &n.port_id).await.expect("unplug");
    }
    println!(
        "driver unplug sequential mean {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3 / N as f64
    );

    let mut results = Vec::new();
    for wait in [false, true] {
        let nics: Vec<NicSpec> = (0..N).map(nic).collect();
        let mut lat = Vec::new();
        for (ns, n) in nss.iter().zip(&nics) {
            let t = Instant::now();
            shell_plug(&db, &br, &ns.name, &inst, n, wait);
            lat.push(t.elapsed());
        }
        let label = if wait {
            "ip + ovs-vsctl sequential (waits vswitchd)"
        } else {
            "ip + ovs-vsctl --no-wait sequential"
        };
        results.push(stats(label, lat, None).0);
        for n in &nics {
            shell_unplug(&db, &n.tap_name());
        }
    }

    // 50 in parallel.
    let nics: Vec<NicSpec> = (0..N).map(nic).collect();
    let wall = Instant::now();
    let mut tasks = Vec::new();
    for (ns, n) in nss.iter().zip(&nics) {
        let (net, ns, n, inst) = (net.clone(), ns.clone(), n.clone(), inst.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            net.plug(&inst, &NetnsRef::Path(ns.path()), 0, &n)
                .await
                .expect("plug");
            t.elapsed()
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.push(t.await.expect("task"));
    }
    let (_, drv_par) = stats("driver 50 parallel", lat, Some(wall.elapsed()));
    for n in &nics {
        net.unplug(&inst, &n.port_id).await.expect("unplug");
    }

    let nics: Vec<NicSpec> = (0..N).map(nic).collect();
    let wall = Instant::now();
    let mut threads = Vec::new();
    for (ns, n) in nss.iter().zip(&nics) {
        let (db, br, ns, n, inst) = (
            db.clone(),
            br.clone(),
            ns.name.clone(),
            n.clone(),
            inst.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let t = Instant::now();
            shell_plug(&db, &br, &ns, &inst, &n, false);
            t.elapsed()
        }));
    }
    let lat: Vec<Duration> = threads
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    let (_, sh_par) = stats(
        "ip + ovs-vsctl --no-wait 50 parallel",
        lat,
        Some(wall.elapsed()),
    );
    for n in &nics {
        shell_unplug(&db, &n.tap_name());
    }
    println!(
        "speedup sequential: {:.1}x vs --no-wait, {:.1}x vs waiting vsctl; 50 parallel wall: {:.1}x",
        results[0] / drv_seq,
        results[1] / drv_seq,
        sh_par / drv_par
    );
    assert!(ovs.ports().is_empty());
    emit_report(drv_seq, results[0], results[1], drv_par, sh_par);
}

/// Results for bench/REPORT.md (bench/emit.py writes `$BENCH_OUT/network.json`).
fn emit_report(drv_seq: f64, sh_nowait: f64, sh_wait: f64, drv_par: f64, sh_par: f64) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::env::var("BENCH_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("bench/out"));
    let status = Command::new("python3")
        .current_dir(&root)
        .arg("bench/emit.py")
        .arg(out.join("network.json"))
        .args(["--area", "network", "--title", "VIF plugging on OVS (userspace datapath)"])
        .args(["--command", "bench/network/run.sh"])
        .arg("--row")
        .arg(format!("plug one VIF, sequential mean of {N}|ms|{drv_seq}|ip + ovs-vsctl --no-wait|{sh_nowait}|speedup_at_least:5|"))
        .arg("--row")
        .arg(format!("plug one VIF, sequential mean of {N}|ms|{drv_seq}|ip + ovs-vsctl (waits for vswitchd)|{sh_wait}||"))
        .arg("--row")
        .arg(format!("plug one VIF (absolute goal)|ms|{drv_seq}|||at_most:20|"))
        .arg("--row")
        .arg(format!("{N} VIFs in parallel, wall time|ms|{drv_par}|ip + ovs-vsctl --no-wait, {N} parallel|{sh_par}||"))
        .arg("--note")
        .arg("A plug is: veth pair created with the peer in the instance netns as ethN (MAC, MTU), then Port+Interface with os-vif external_ids and the access tag in one OVSDB transaction.")
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => eprintln!("bench/emit.py failed: {other:?}"),
    }
}
