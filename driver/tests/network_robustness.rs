//! Acceptance: bad input, duplicate ports, ovsdb-server restarts, 100 plug/unplug cycles,
//! cleanup after the netns is gone.

mod ovs_harness;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use driver::network::{parse_nic, Error, NetnsRef, Network, NicSpec};
use ovs_harness::{host_links, poll, run_ok, Netns, Ovs};

fn netns_count() -> usize {
    run_ok("ip", &["netns", "list"]).lines().count()
}

fn assert_clean(ovs: &Ovs, ns: &Netns, taps: &[String]) {
    assert!(ovs.ports().is_empty(), "ports left: {:?}", ovs.ports());
    let left: Vec<String> = host_links("tap")
        .into_iter()
        .filter(|l| taps.contains(l))
        .collect();
    assert!(left.is_empty(), "veths left: {left:?}");
    let inside = ns.exec_ok(&["ip", "-o", "link"]);
    assert!(!inside.contains("eth"), "left in netns: {inside}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_creates_nothing() {
    let ovs = Ovs::start();
    let net = Network::connect(&ovs.config()).await.expect("connect");
    let ns = Netns::new();
    let at = NetnsRef::Path(ns.path());
    let inst = uuid::Uuid::new_v4().to_string();
    let base = parse_nic("vlan=100,ip=10.20.0.5/24").expect("parse");
    let mut taps = vec![base.tap_name()];

    let mut unknown = base.clone();
    unknown.bridge = Some("nosuchbr".into());
    let e = net.plug(&inst, &at, 0, &unknown).await.unwrap_err();
    assert!(
        matches!(e, Error::UnknownBridge(ref b) if b == "nosuchbr"),
        "{e}"
    );
    assert!(e.to_string().contains("unknown bridge"), "{e}");

    for vlan in [0u16, 4095, 4096, u16::MAX] {
        let mut n = base.clone();
        n.vlan = Some(vlan);
        let e = net.plug(&inst, &at, 0, &n).await.unwrap_err();
        assert!(
            matches!(e, Error::InvalidVlan(v) if v == u32::from(vlan)),
            "{e}"
        );
    }
    for s in ["vlan=0,ip=10.0.0.1/24", "vlan=4095,ip=10.0.0.1/24"] {
        assert!(matches!(parse_nic(s), Err(Error::InvalidVlan(_))), "{s}");
    }
    for mac in [
        "fa:16:3e:00:00",
        "fa:16:3e:00:00:zz",
        "01:00:5e:00:00:01",
        "fa163e000001",
    ] {
        let e = parse_nic(&format!("vlan=100,ip=10.0.0.1/24,mac={mac}")).unwrap_err();
        assert!(matches!(e, Error::InvalidMac(_)), "{mac}: {e}");
    }
    for (mtu, max) in [(67u32, 65535u32), (9000, 1500), (1501, 1500)] {
        let mut n = base.clone();
        n.mtu = Some(mtu);
        let e = net.plug(&inst, &at, 0, &n).await.unwrap_err();
        assert!(
            matches!(e, Error::InvalidMtu { mtu: m, max: x, .. } if m == mtu && x == max),
            "{mtu}: {e}"
        );
    }
    let mut bad_id = base.clone();
    bad_id.port_id = "../etc".into();
    assert!(matches!(
        net.plug(&inst, &at, 0, &bad_id).await,
        Err(Error::InvalidPortId(_))
    ));
    assert!(matches!(
        net.plug(&inst, &at, 10_000, &base).await,
        Err(Error::InvalidIndex(_))
    ));
    // The host's own namespace is refused outright.
    let e = net
        .plug(&inst, &NetnsRef::Pid(std::process::id()), 0, &base)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Netns { .. }), "{e}");
    let e = net
        .plug(
            &inst,
            &NetnsRef::Path("/run/netns/does-not-exist".into()),
            0,
            &base,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Netns { .. }), "{e}");
    assert_clean(&ovs, &ns, &taps);

    // Duplicate port id: same id again (any instance), or a different id whose tap name collides.
    let ok = net.plug(&inst, &at, 0, &base).await.expect("plug");
    let ns2 = Netns::new();
    let e = net
        .plug(&inst, &NetnsRef::Path(ns2.path()), 0, &base)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DuplicatePort { .. }), "{e}");
    let other = uuid::Uuid::new_v4().to_string();
    let e = net
        .plug(&other, &NetnsRef::Path(ns2.path()), 0, &base)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DuplicatePort { .. }), "{e}");
    let mut same_prefix = base.clone();
    same_prefix.port_id = format!("{}-different-suffix", &base.port_id[..11]);
    let e = net
        .plug(&inst, &NetnsRef::Path(ns2.path()), 0, &same_prefix)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DuplicatePort { .. }), "{e}");
    // eth0 already taken inside the netns by the first plug.
    let fresh = parse_nic("vlan=100,ip=10.20.0.6/24").expect("parse");
    taps.push(fresh.tap_name());
    let e = net.plug(&inst, &at, 0, &fresh).await.unwrap_err();
    assert!(matches!(e, Error::DuplicatePort { .. }), "{e}");
    assert!(
        !host_links("tap").contains(&fresh.tap_name()),
        "half-created veth"
    );
    assert_eq!(ovs.ports(), vec![ok.tap.clone()]);
    // Another instance may not unplug it.
    assert!(net.unplug(&other, &base.port_id).await.is_err());
    net.unplug(&inst, &base.port_id).await.expect("unplug");
    assert_clean(&ovs, &ns, &taps);
    assert!(ns2.exec_ok(&["ip", "-o", "link"]).lines().count() == 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_cycles_leak_nothing() {
    let ovs = Ovs::start();
    let net = Network::connect(&ovs.config()).await.expect("connect");
    let ns_before = netns_count();
    let ns = Netns::new();
    let inst = uuid::Uuid::new_v4().to_string();
    let mut taps = Vec::new();
    let start = Instant::now();
    for i in 0..100u32 {
        let nic = parse_nic(&format!("vlan={},ip=10.40.0.5/24", 1 + i % 4000)).expect("parse");
        taps.push(nic.tap_name());
        let vif = net
            .plug(&inst, &NetnsRef::Path(ns.path()), i % 3, &nic)
            .await
            .expect("plug");
        net.unplug(&inst, &vif.port_id).await.expect("unplug");
    }
    eprintln!("100 plug/unplug cycles: {:?}", start.elapsed());
    assert_clean(&ovs, &ns, &taps);
    drop(ns);
    assert_eq!(netns_count(), ns_before, "netns leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ovsdb_restart_during_plug_loop() {
    let mut ovs = Ovs::start();
    let net = Arc::new(Network::connect(&ovs.config()).await.expect("connect"));
    let ns = Arc::new(Netns::new());
    let inst = uuid::Uuid::new_v4().to_string();
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (net2, ns2, done2, stop2, inst2) = (
        net.clone(),
        ns.clone(),
        done.clone(),
        stop.clone(),
        inst.clone(),
    );
    let looper = tokio::spawn(async move {
        let mut failures = Vec::new();
        let mut kept: Vec<NicSpec> = Vec::new();
        let mut i = 0u32;
        while !stop2.load(Ordering::Acquire) {
            let nic = parse_nic("vlan=300,ip=10.50.0.5/24").expect("parse");
            // Keep every other NIC plugged so the end state has live ports to check.
            match net2
                .plug(&inst2, &NetnsRef::Path(ns2.path()), i, &nic)
                .await
            {
                Ok(_) if i.is_multiple_of(2) => kept.push(nic),
                Ok(v) => {
                    if let Err(e) = net2.unplug(&inst2, &v.port_id).await {
                        failures.push(format!("unplug: {e}"));
                    }
                }
                Err(e) => failures.push(format!("plug: {e}")),
            }
            i += 1;
            done2.fetch_add(1, Ordering::Release);
        }
        (failures, kept)
    });
    for round in 1..=3usize {
        let target = round * 15;
        let d = done.clone();
        tokio::task::spawn_blocking(move || {
            poll("plug loop progress", Duration::from_secs(60), || {
                (d.load(Ordering::Acquire) >= target).then_some(())
            })
        })
        .await
        .expect("poll");
        ovs.restart_ovsdb();
    }
    let d = done.clone();
    let target = done.load(Ordering::Acquire) + 10;
    tokio::task::spawn_blocking(move || {
        poll("plug loop after restarts", Duration::from_secs(60), || {
            (d.load(Ordering::Acquire) >= target).then_some(())
        })
    })
    .await
    .expect("poll");
    stop.store(true, Ordering::Release);
    let (failures, kept) = looper.await.expect("loop");
    eprintln!(
        "{} plugs across 3 ovsdb-server restarts, failures: {failures:?}",
        done.load(Ordering::Acquire)
    );
    assert!(failures.is_empty(), "{failures:?}");

    // Every OVS port has its veth and vice versa: nothing half-created.
    let mut ports = ovs.ports();
    ports.sort();
    let mut want: Vec<String> = kept.iter().map(NicSpec::tap_name).collect();
    want.sort();
    assert_eq!(ports, want);
    let links = host_links("tap");
    for t in &want {
        assert!(links.contains(t), "port {t} without veth");
        assert_eq!(
            ovs.get("Interface", t, "external_ids:vm-uuid"),
            format!("\"{inst}\"")
        );
    }
    assert_eq!(
        net.instance_ports(&inst).await.expect("list").len(),
        want.len()
    );
    let removed = net.cleanup_instance(&inst).await.expect("cleanup");
    assert!(removed >= want.len());
    assert!(ovs.ports().is_empty());
    assert!(host_links("tap").iter().all(|l| !want.contains(l)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_after_netns_gone_and_crash_leftovers() {
    let ovs = Ovs::start();
    let net = Network::connect(&ovs.config()).await.expect("connect");
    let inst = uuid::Uuid::new_v4().to_string();
    let ns = Netns::new();
    let a = parse_nic("vlan=10,ip=10.60.0.5/24").expect("parse");
    let b = parse_nic("vlan=11,ip=10.61.0.5/24").expect("parse");
    net.plug(&inst, &NetnsRef::Path(ns.path()), 0, &a)
        .await
        .expect("plug a");
    net.plug(&inst, &NetnsRef::Path(ns.path()), 1, &b)
        .await
        .expect("plug b");
    // Instance died: its netns (and with it both veths) is gone, the OVS rows stay.
    drop(ns);
    poll("veths gone with netns", Duration::from_secs(10), || {
        let l = host_links("tap");
        (!l.contains(&a.tap_name()) && !l.contains(&b.tap_name())).then_some(())
    });
    assert_eq!(ovs.ports().len(), 2);
    net.cleanup_instance(&inst).await.expect("cleanup");
    assert!(ovs.ports().is_empty());
    // Idempotent.
    assert_eq!(net.cleanup_instance(&inst).await.expect("cleanup again"), 0);

    // Crash between the veth and the OVSDB step: veth without a row is found by its alias.
    let ns = Netns::new();
    let c = parse_nic("vlan=12,ip=10.62.0.5/24").expect("parse");
    net.plug(&inst, &NetnsRef::Path(ns.path()), 0, &c)
        .await
        .expect("plug c");
    ovs.vsctl(&["del-port", &c.tap_name()]);
    assert!(host_links("tap").contains(&c.tap_name()));
    assert_eq!(net.cleanup_instance(&inst).await.expect("cleanup"), 1);
    assert!(!host_links("tap").contains(&c.tap_name()));
    // Unplug of something already gone is fine.
    net.unplug(&inst, &c.port_id).await.expect("unplug gone");
}

struct DelLink(String);
impl Drop for DelLink {
    fn drop(&mut self) {
        let _ = ovs_harness::run("ip", &["link", "del", &self.0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_bridge_and_trunk_uplink_from_config() {
    let ovs = Ovs::start();
    let up = format!("fbu{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    run_ok(
        "ip",
        &[
            "link",
            "add",
            &up,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{up}p"),
        ],
    );
    let _guard = DelLink(up.clone());
    let br = format!("fbs{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _br_guard = DelLink(br.clone());
    let mut cfg = ovs.config();
    cfg.integration_bridge = br.clone();
    cfg.create_bridge = true;
    cfg.datapath_type = "netdev".into();
    cfg.uplink = Some(up.clone());
    let net = Network::connect(&cfg).await.expect("connect");
    // Connecting again is idempotent.
    drop(Network::connect(&cfg).await.expect("reconnect"));
    assert_eq!(ovs.get("Bridge", &br, "datapath_type"), "netdev");
    assert_eq!(ovs.vsctl(&["list-ports", &br]).trim(), up);
    assert_eq!(ovs.get("Port", &up, "tag"), "[]");
    let ns = Netns::new();
    let nic = parse_nic("vlan=42,ip=10.80.0.5/24").expect("parse");
    let inst = uuid::Uuid::new_v4().to_string();
    net.plug(&inst, &NetnsRef::Path(ns.path()), 0, &nic)
        .await
        .expect("plug");
    assert_eq!(ovs.get("Port", &nic.tap_name(), "tag"), "42");
    net.cleanup_instance(&inst).await.expect("cleanup");
    ovs.vsctl(&["del-br", &br]);
}
