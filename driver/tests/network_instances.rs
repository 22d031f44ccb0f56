//! Acceptance of issue 5 on real booted instances: fatboxd with NICs on a private OVS (netdev
//! datapath), the fixture image, ssh with the injected key, VLAN isolation both ways, os-vif
//! rows, hot attach/detach, stop/start/reboot/restart keep the NICs, delete leaves nothing.
//! Root only.

mod common;
mod ovs_harness;

use common::Daemon;
use ovs_harness::{host_links, poll, run, run_ok, Netns, Ovs};
use std::path::Path;
use std::time::{Duration, Instant};

/// A "host" on the bridge: a netns with a veth port tagged `vlan` (plugged with ovs-vsctl, as
/// an operator would, independently of the code under test).
struct Host {
    ns: Netns,
    tap: String,
}

impl Host {
    fn new(ovs: &Ovs, vlan: u16, cidr: &str) -> Host {
        let ns = Netns::new();
        let tap = format!("fbh{}", &ns.name[5..]);
        run_ok(
            "ip",
            &[
                "link", "add", &tap, "type", "veth", "peer", "name", "h0", "netns", &ns.name,
            ],
        );
        run_ok("ip", &["link", "set", &tap, "up"]);
        ovs.vsctl(&[
            "add-port",
            &ovs.bridge,
            &tap,
            &format!("tag={vlan}"),
            "vlan_mode=access",
        ]);
        ns.add_addr("h0", cidr);
        Host { ns, tap }
    }

    fn ssh(&self, key: &Path, ip: &str) -> std::process::Output {
        self.ns.exec(&[
            "ssh",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=3",
            "-i",
            key.to_str().expect("key path"),
            &format!("root@{ip}"),
            "true",
        ])
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // The netns goes in Netns::drop, taking the veth with it.
        let _ = run("ip", &["link", "del", &self.tap]);
    }
}

fn guest_ping(d: &Daemon, vm: &str, ip: &str) -> bool {
    d.fatbox(&["exec", vm, "--", "ping", "-c", "1", "-W", "1", ip])
        .status
        .success()
}

fn wait_guest_ping(d: &Daemon, vm: &str, ip: &str) {
    poll(
        &format!("{vm} pinging {ip}"),
        Duration::from_secs(20),
        || guest_ping(d, vm, ip).then_some(()),
    );
}

fn nic_of(d: &Daemon, vm: &str, i: usize) -> serde_json::Value {
    d.show(vm)["nics"][i].clone()
}

fn run_vm(d: &Daemon, name: &str, key: &Path, nics: &[&str]) -> (String, Duration) {
    let mut a = vec![
        "run",
        "--image",
        "deb",
        "--name",
        name,
        "--vcpus",
        "1",
        "--memory",
        "256",
        "--disk",
        "1",
        "--ssh-key",
    ];
    a.push(key.to_str().expect("key"));
    for n in nics {
        a.push("--nic");
        a.push(n);
    }
    let t = Instant::now();
    let uuid = d.ok(&a).trim().to_string();
    (uuid, t.elapsed())
}

#[test]
fn instances_on_ovs_vlans() {
    let ovs = Ovs::start();
    let mut d = Daemon::start_with_network(&format!(
        "ovsdb = \"{}\"\nintegration_bridge = \"{}\"\n",
        ovs.endpoint(),
        ovs.bridge
    ));
    d.import_fixture("deb");
    let key = d.dir.path().join("id_ed25519");
    run_ok(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            key.to_str().expect("key"),
        ],
    );
    let pubkey = d.dir.path().join("id_ed25519.pub");

    // Bad NICs: clear API errors, nothing created.
    for (nic, want) in [
        ("vlan=0,ip=10.20.0.9/24", "VLAN"),
        ("vlan=4095,ip=10.20.0.9/24", "VLAN"),
        ("vlan=100,ip=10.20.0.9/24,mac=zz:00:00:00:00:01", "MAC"),
        ("vlan=100,ip=10.20.0.9/24,mtu=67", "MTU"),
        ("vlan=100,ip=10.20.0.9/24,mtu=9000", "MTU"),
        ("vlan=100,ip=10.20.0.9", "ADDRESS/PREFIX"),
        ("vlan=100,ip=10.20.0.9/24,bridge=nosuchbr", "unknown bridge"),
    ] {
        let o = d.fatbox(&[
            "run", "--image", "deb", "--name", "bad", "--vcpus", "1", "--memory", "256", "--disk",
            "1", "--nic", nic,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{nic}: {err}");
        assert!(err.contains("(400)"), "{nic}: not a 400: {err}");
    }
    assert_eq!(d.ok(&["list", "--json"]).trim(), "[]");
    assert!(ovs.ports().is_empty(), "ports after refused creates");

    // A baseline boot without NIC, for the timing comparison.
    let (_, t_plain) = run_vm(&d, "plain", &pubkey, &[]);
    d.ok(&["delete", "plain"]);

    let h100 = Host::new(&ovs, 100, "10.20.0.100/24");
    let h200 = Host::new(&ovs, 200, "10.20.0.200/24");

    let (ua, ta) = run_vm(
        &d,
        "vm-a",
        &pubkey,
        &["vlan=100,ip=10.20.0.5/24,gw=10.20.0.1,mac=fa:16:3e:00:00:0a"],
    );
    let t0 = Instant::now();
    poll("ssh to vm-a", Duration::from_secs(30), || {
        h100.ssh(&key, "10.20.0.5").status.success().then_some(())
    });
    let t_ssh = ta + t0.elapsed();
    let (ub, tb) = run_vm(&d, "vm-b", &pubkey, &["vlan=100,ip=10.20.0.6/24"]);
    let (uc, tc) = run_vm(&d, "vm-c", &pubkey, &["vlan=200,ip=10.20.0.7/24"]);
    eprintln!(
        "boot to running: no NIC {t_plain:?}, with NIC {ta:?} / {tb:?} / {tc:?}; \
         run --nic to ssh accepting: {t_ssh:?}"
    );

    // os-vif rows, tag, device names, MAC inside.
    let mut taps = Vec::new();
    for (vm, uuid, vlan) in [("vm-a", &ua, 100), ("vm-b", &ub, 100), ("vm-c", &uc, 200)] {
        let n = nic_of(&d, vm, 0);
        let port = n["port_id"].as_str().expect("port id").to_string();
        let tap = n["tap"].as_str().expect("tap").to_string();
        let mac = n["mac"].as_str().expect("mac").to_string();
        assert_eq!(tap, format!("tap{}", &port[..11]));
        assert_eq!(n["ifname"], "eth0");
        taps.push(tap.clone());
        assert_eq!(
            ovs.get("Interface", &tap, "external_ids"),
            format!(
                "{{attached-mac=\"{mac}\", iface-id=\"{port}\", iface-status=active, vm-uuid=\"{uuid}\"}}"
            )
        );
        assert_eq!(ovs.get("Port", &tap, "tag"), vlan.to_string());
        let link = d.exec(vm, "ip -o link show eth0");
        assert!(link.contains(&mac), "{vm}: {link}");
    }
    assert_eq!(nic_of(&d, "vm-a", 0)["mac"], "fa:16:3e:00:00:0a");
    assert!(d
        .exec("vm-a", "ip -o addr show eth0")
        .contains("10.20.0.5/24"));
    assert!(d.exec("vm-a", "ip route").contains("default via 10.20.0.1"));
    assert_eq!(
        d.exec("vm-a", "systemctl is-system-running").trim(),
        "running"
    );

    // Same VLAN: ping both ways and ssh with the injected key; other VLAN: nothing, both ways.
    wait_guest_ping(&d, "vm-a", "10.20.0.6");
    wait_guest_ping(&d, "vm-b", "10.20.0.5");
    assert!(h100.ssh(&key, "10.20.0.6").status.success(), "ssh vm-b");
    assert!(
        !guest_ping(&d, "vm-a", "10.20.0.7"),
        "VLAN 100 reached VLAN 200"
    );
    assert!(
        !guest_ping(&d, "vm-c", "10.20.0.5"),
        "VLAN 200 reached VLAN 100"
    );
    assert!(
        !guest_ping(&d, "vm-c", "10.20.0.6"),
        "VLAN 200 reached VLAN 100"
    );
    assert!(
        h200.ns.ping("10.20.0.7"),
        "host on VLAN 200 cannot reach vm-c"
    );
    assert!(!h200.ns.ping("10.20.0.5"), "host on VLAN 200 reached vm-a");
    assert!(!h200.ssh(&key, "10.20.0.5").status.success());
    assert!(!h100.ns.ping("10.20.0.7"), "host on VLAN 100 reached vm-c");

    // Hot attach: eth1 on VLAN 200 with its MAC, traffic on that VLAN; detach removes it.
    let bad = d.fatbox(&[
        "interface-attach",
        "vm-a",
        "--nic",
        "vlan=5000,ip=10.40.0.5/24",
    ]);
    assert!(!bad.status.success());
    assert_eq!(d.show("vm-a")["nics"].as_array().map(Vec::len), Some(1));
    let port2 = d
        .ok(&[
            "interface-attach",
            "vm-a",
            "--nic",
            "vlan=200,ip=10.40.0.5/24,mac=fa:16:3e:00:00:2b",
        ])
        .trim()
        .to_string();
    let n1 = nic_of(&d, "vm-a", 1);
    assert_eq!(n1["ifname"], "eth1");
    assert_eq!(n1["port_id"], port2.as_str());
    let tap2 = n1["tap"].as_str().expect("tap").to_string();
    assert_eq!(ovs.get("Port", &tap2, "tag"), "200");
    let link = d.exec("vm-a", "ip -o link show eth1");
    assert!(link.contains("fa:16:3e:00:00:2b"), "{link}");
    run_ok(
        "ip",
        &[
            "-n",
            &h200.ns.name,
            "addr",
            "add",
            "10.40.0.200/24",
            "dev",
            "h0",
        ],
    );
    h200.ns.wait_ping("10.40.0.5");
    assert!(
        !h100.ns.ping("10.40.0.5"),
        "VLAN 100 reached the VLAN 200 NIC"
    );
    let dup = d.fatbox(&[
        "interface-attach",
        "vm-b",
        "--nic",
        &format!("vlan=200,ip=10.40.0.6/24,port={port2}"),
    ]);
    assert!(!dup.status.success(), "duplicate port id accepted");
    assert!(String::from_utf8_lossy(&dup.stderr).contains("(409)"));

    // The API with a Nova-style VIF object (what the Nova driver sends): MTU applied inside.
    let api = |method: &str, path: &str, body: Option<serde_json::Value>| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let c = driver::client::Client::new(&d.socket);
        rt.block_on(c.request(method, path, body.as_ref()))
            .expect("API call")
    };
    let vif = serde_json::json!({"nic": {
        "port_id": "0b9d6c1e-5f3a-4c2e-9d1b-7a6e5f4c3b2a", "vlan": 100, "mtu": 1400,
        "ips": ["10.50.0.6/24"], "mac": "fa:16:3e:00:00:6c"}});
    let r = api("POST", "/v1/instances/vm-b/interfaces", Some(vif));
    assert_eq!(r.status, 201, "{}", r.error());
    let v = r.json().expect("json");
    assert_eq!(v["ifname"], "eth1");
    assert_eq!(v["tap"], "tap0b9d6c1e-5f");
    let link = d.exec("vm-b", "ip -o link show eth1");
    assert!(
        link.contains("mtu 1400") && link.contains("fa:16:3e:00:00:6c"),
        "{link}"
    );
    let path = "/v1/instances/vm-b/interfaces/0b9d6c1e-5f3a-4c2e-9d1b-7a6e5f4c3b2a";
    assert_eq!(api("DELETE", path, None).status, 204);
    assert_eq!(api("DELETE", path, None).status, 404);
    let bad = api(
        "POST",
        "/v1/instances/vm-b/interfaces",
        Some(serde_json::json!({"nic": {"vlan": 100, "ips": ["10.50.0.6/24"], "mtu": 60}})),
    );
    assert_eq!(bad.status, 400, "{}", bad.error());
    assert_eq!(d.show("vm-b")["nics"].as_array().map(Vec::len), Some(1));
    d.ok(&["interface-detach", "vm-a", &port2]);
    assert!(
        !d.exec("vm-a", "ip -o link").contains("eth1"),
        "eth1 left in the guest"
    );
    assert!(!ovs.ports().contains(&tap2), "OVS port left after detach");
    assert!(host_links(&tap2).is_empty(), "veth left after detach");
    assert!(!h200.ns.ping("10.40.0.5"));

    // Hot-plug cycles leak nothing: no OVS port, host veth or guest device left.
    let before = ovs.ports().len();
    for i in 0..10 {
        let p = d
            .ok(&[
                "interface-attach",
                "vm-a",
                "--nic",
                &format!("vlan=300,ip=10.70.0.{}/24", i + 1),
            ])
            .trim()
            .to_string();
        assert!(d
            .exec("vm-a", "ip -o addr show eth1")
            .contains(&format!("10.70.0.{}/24", i + 1)));
        d.ok(&["interface-detach", "vm-a", &p]);
        assert!(host_links(&format!("tap{}", &p[..11])).is_empty());
    }
    assert_eq!(ovs.ports().len(), before, "ports leaked by hot-plug cycles");
    let devs = d.exec("vm-a", "ls /sys/class/net");
    assert_eq!(devs.split_whitespace().collect::<Vec<_>>(), ["eth0", "lo"]);

    // Stop/start and reboot keep the NIC (same port, MAC and address).
    let tap_b = nic_of(&d, "vm-b", 0)["tap"]
        .as_str()
        .expect("tap")
        .to_string();
    d.ok(&["stop", "vm-b"]);
    assert!(!ovs.ports().contains(&tap_b), "port kept while powered off");
    assert!(host_links(&tap_b).is_empty(), "veth kept while powered off");
    // Attached while powered off: plugged at the next boot as eth1, configured by the guest.
    let port3 = d
        .ok(&[
            "interface-attach",
            "vm-b",
            "--nic",
            "vlan=200,ip=10.60.0.6/24",
        ])
        .trim()
        .to_string();
    let tap3 = format!("tap{}", &port3[..11]);
    assert!(!ovs.ports().contains(&tap3), "plugged while powered off");
    d.ok(&["start", "vm-b"]);
    assert!(ovs.ports().contains(&tap_b));
    assert!(d
        .exec("vm-b", "ip -o addr show eth1")
        .contains("10.60.0.6/24"));
    run_ok(
        "ip",
        &[
            "-n",
            &h200.ns.name,
            "addr",
            "add",
            "10.60.0.200/24",
            "dev",
            "h0",
        ],
    );
    h200.ns.wait_ping("10.60.0.6");
    d.ok(&["interface-detach", "vm-b", &port3]);
    assert!(!ovs.ports().contains(&tap3));
    assert!(!h200.ns.ping("10.60.0.6"));
    wait_guest_ping(&d, "vm-a", "10.20.0.6");
    d.ok(&["reboot", "vm-a"]);
    wait_guest_ping(&d, "vm-b", "10.20.0.5");
    assert!(
        h100.ssh(&key, "10.20.0.5").status.success(),
        "ssh after reboot"
    );

    // fatboxd restart (live-restore) repairs a port removed while it was away.
    let tap_a = nic_of(&d, "vm-a", 0)["tap"]
        .as_str()
        .expect("tap")
        .to_string();
    d.kill9();
    ovs.vsctl(&["del-port", &ovs.bridge, &tap_a]);
    d.spawn();
    poll("port re-ensured", Duration::from_secs(30), || {
        ovs.ports().contains(&tap_a).then_some(())
    });
    assert_eq!(ovs.get("Port", &tap_a, "tag"), "100");
    h100.ns.wait_ping("10.20.0.5");

    // Delete: no OVS row, no veth, no netns mount.
    for vm in ["vm-a", "vm-b", "vm-c"] {
        d.ok(&["delete", vm]);
    }
    let mut ports = ovs.ports();
    ports.sort();
    let mut want = vec![h100.tap.clone(), h200.tap.clone()];
    want.sort();
    assert_eq!(ports, want, "OVS ports left");
    for t in &taps {
        assert!(host_links(t).is_empty(), "veth {t} left");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let state = d.state_dir();
    assert!(
        !mounts.contains(state.to_string_lossy().as_ref()),
        "mounts left under {}",
        state.display()
    );
}

/// `cargo test --release -p driver --test network_instances -- --ignored --nocapture`:
/// `fatbox run` → running without and with a NIC, and → ssh accepting with one
/// (FATBOX_NET_RUNS runs each, default 3).
#[test]
#[ignore]
fn boot_timing_with_and_without_nic() {
    let runs: usize = std::env::var("FATBOX_NET_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let ovs = Ovs::start();
    let d = Daemon::start_with_network(&format!(
        "ovsdb = \"{}\"\nintegration_bridge = \"{}\"\n",
        ovs.endpoint(),
        ovs.bridge
    ));
    d.import_fixture("deb");
    let key = d.dir.path().join("id_ed25519");
    run_ok(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            key.to_str().expect("key"),
        ],
    );
    let pubkey = d.dir.path().join("id_ed25519.pub");
    let h = Host::new(&ovs, 100, "10.20.0.100/24");
    // Warm the layer cache so the first measured run is not the odd one out.
    run_vm(&d, "warm", &pubkey, &[]);
    d.ok(&["delete", "warm"]);
    let mut rows = Vec::new();
    for i in 0..runs {
        let (_, plain) = run_vm(&d, "plain", &pubkey, &[]);
        d.ok(&["delete", "plain"]);
        let ip = format!("10.20.0.{}", 10 + i);
        let t = Instant::now();
        run_vm(&d, "nic", &pubkey, &[&format!("vlan=100,ip={ip}/24")]);
        let running = t.elapsed();
        poll("ssh", Duration::from_secs(60), || {
            h.ssh(&key, &ip).status.success().then_some(())
        });
        let ssh = t.elapsed();
        d.ok(&["delete", "nic"]);
        rows.push((plain, running, ssh));
    }
    let raw = std::fs::read_to_string(d.dir.path().join("fatboxd.log")).unwrap_or_default();
    // tracing colours field names even into a file.
    let mut log = String::new();
    let mut esc = false;
    for c in raw.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => log.push(c),
        }
    }
    let plug: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("VIFs plugged"))
        .filter_map(|l| l.split("ms=").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .collect();
    eprintln!("| run | no NIC → running | --nic → running | --nic → ssh accepting |");
    eprintln!("|---|---|---|---|");
    for (i, (p, r, s)) in rows.iter().enumerate() {
        eprintln!(
            "| {} | {:.2} s | {:.2} s | {:.2} s |",
            i + 1,
            p.as_secs_f64(),
            r.as_secs_f64(),
            s.as_secs_f64()
        );
    }
    eprintln!("plug + guest config inside the boot (ms): {plug:?}");
}
