//! Acceptance: VLAN isolation, os-vif external_ids, hot-plug, unplug (real OVS, netns as hosts).

mod ovs_harness;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use driver::network::{parse_nic, NetnsRef, Network};
use ovs_harness::{host_links, Netns, Ovs};

fn tcp_echo(server: &Netns, client: &Netns, addr: &str) -> std::io::Result<String> {
    let sa: SocketAddr = format!("{addr}:7777").parse().expect("addr");
    let listener = server
        .run_in(move || TcpListener::bind(sa))
        .join()
        .expect("bind thread")?;
    listener.set_nonblocking(false)?;
    let srv = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
        Ok(())
    });
    let got = client
        .run_in(move || -> std::io::Result<String> {
            let mut c = TcpStream::connect_timeout(&sa, Duration::from_secs(3))?;
            c.set_read_timeout(Some(Duration::from_secs(3)))?;
            c.write_all(b"hello")?;
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf).into_owned())
        })
        .join()
        .expect("client thread");
    if got.is_ok() {
        srv.join().expect("server thread")?;
    }
    got
}

fn can_tcp(server: &Netns, client: &Netns, addr: &str) -> bool {
    // A blocked accept must not hang the test: connect to it ourselves so it returns.
    match tcp_echo(server, client, addr) {
        Ok(s) => s == "hello",
        Err(_) => {
            let sa: SocketAddr = format!("{addr}:7777").parse().expect("addr");
            let _ = server
                .run_in(move || TcpStream::connect_timeout(&sa, Duration::from_secs(1)))
                .join();
            false
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vlan_isolation_rows_hotplug_unplug() {
    let ovs = Ovs::start();
    let net = Network::connect(&ovs.config()).await.expect("connect");
    let (a, b, c) = (Netns::new(), Netns::new(), Netns::new());
    let specs = [
        (
            &a,
            "vlan=100,ip=10.20.0.5/24,gw=10.20.0.1,mac=fa:16:3e:00:00:0a",
        ),
        (&b, "vlan=100,ip=10.20.0.6/24"),
        (&c, "vlan=200,ip=10.20.0.7/24"),
    ];
    let mut vifs = Vec::new();
    for (ns, s) in specs.iter() {
        let nic = parse_nic(s).expect("parse");
        let inst = uuid::Uuid::new_v4().to_string();
        let vif = net
            .plug(&inst, &NetnsRef::Path(ns.path()), 0, &nic)
            .await
            .expect("plug");
        assert_eq!(vif.ifname, "eth0");
        assert_eq!(vif.tap, format!("tap{}", &nic.port_id[..11]));
        // Interface external_ids exactly as os-vif writes them.
        let ids = ovs.get("Interface", &vif.tap, "external_ids");
        let want = format!(
            "{{attached-mac=\"{}\", iface-id=\"{}\", iface-status=active, vm-uuid=\"{inst}\"}}",
            vif.mac, nic.port_id
        );
        assert_eq!(ids, want);
        assert_eq!(ovs.get("Interface", &vif.tap, "type"), "\"\"");
        assert_eq!(
            ovs.get("Port", &vif.tap, "tag"),
            nic.vlan.unwrap().to_string()
        );
        assert_eq!(ovs.get("Port", &vif.tap, "vlan_mode"), "access");
        let link = ns.exec_ok(&["ip", "-o", "link", "show", "eth0"]);
        assert!(link.contains(&vif.mac.to_string()), "{link}");
        ns.add_addr("eth0", &nic.ips[0].to_string());
        vifs.push((inst, nic, vif));
    }
    assert_eq!(ovs.ports().len(), 3);
    assert!(a
        .exec_ok(&["ip", "link", "show", "eth0"])
        .contains("fa:16:3e:00:00:0a"));

    a.wait_ping("10.20.0.6");
    b.wait_ping("10.20.0.5");
    assert!(can_tcp(&b, &a, "10.20.0.6"), "TCP a->b on VLAN 100");
    assert!(can_tcp(&a, &b, "10.20.0.5"), "TCP b->a on VLAN 100");
    // Cross-VLAN: same subnet, different tag → nothing passes, either way.
    assert!(!a.ping("10.20.0.7"), "VLAN 100 reached VLAN 200");
    assert!(!c.ping("10.20.0.5"), "VLAN 200 reached VLAN 100");
    assert!(!c.ping("10.20.0.6"), "VLAN 200 reached VLAN 100");
    assert!(!can_tcp(&c, &a, "10.20.0.7"), "TCP crossed VLANs");

    // Hot-plug a second NIC on VLAN 200 into the running "instance" a.
    let nic2 = parse_nic("vlan=200,ip=10.30.0.5/24,mac=fa:16:3e:00:01:0a").expect("parse");
    let vif2 = net
        .plug(&vifs[0].0, &NetnsRef::Path(a.path()), 1, &nic2)
        .await
        .expect("hot-plug");
    let shown = a.exec_ok(&["ip", "link", "show", "eth1"]);
    assert!(shown.contains("fa:16:3e:00:01:0a"), "{shown}");
    a.add_addr("eth1", "10.30.0.5/24");
    c.add_addr("eth0", "10.30.0.7/24");
    a.wait_ping("10.30.0.7");
    assert!(
        !b.ping("10.30.0.5"),
        "VLAN 100 reached hot-plugged VLAN 200 NIC"
    );
    net.unplug(&vifs[0].0, &nic2.port_id).await.expect("detach");
    assert!(a.exec(&["ip", "link", "show", "eth1"]).status.code() != Some(0));
    assert!(!ovs.ports().contains(&vif2.tap));
    // Detach twice is fine.
    net.unplug(&vifs[0].0, &nic2.port_id)
        .await
        .expect("detach again");

    // Re-plug on restart keeps a correct port, repairs a stale one.
    let (inst, nic, vif) = &vifs[1];
    ovs.vsctl(&["set", "Port", &vif.tap, "tag=999"]);
    ovs.vsctl(&[
        "remove",
        "Interface",
        &vif.tap,
        "external_ids",
        "iface-status",
    ]);
    net.ensure(inst, &NetnsRef::Path(b.path()), 0, nic)
        .await
        .expect("ensure");
    assert_eq!(ovs.get("Port", &vif.tap, "tag"), "100");
    assert_eq!(
        ovs.get("Interface", &vif.tap, "external_ids:iface-status"),
        "active"
    );
    a.wait_ping("10.20.0.6");

    for (inst, nic, _) in &vifs {
        net.unplug(inst, &nic.port_id).await.expect("unplug");
    }
    assert!(ovs.ports().is_empty(), "ports left: {:?}", ovs.ports());
    let taps: Vec<String> = vifs.iter().map(|(_, _, v)| v.tap.clone()).collect();
    assert!(host_links("tap").iter().all(|l| !taps.contains(l)));
    for ns in [&a, &b, &c] {
        assert!(ns.exec(&["ip", "link", "show", "eth0"]).status.code() != Some(0));
    }
}
