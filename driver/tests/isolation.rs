//! Isolation of a default (unprivileged) guest, asserted from the host and from inside:
//! user namespace ids on the host, file ownership in the upper dir, systemd and sshd still
//! fine, and a breakout suite run inside as root where every attempt must be denied.
//! Needs root (CI runs as root) and a C compiler for the static probe binary.

mod common;
mod ovs_harness;
use common::Daemon;
use ovs_harness::{poll, run_ok, Netns, Ovs};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn import(d: &Daemon) {
    d.import_fixture("deb");
}

fn run(d: &Daemon, name: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "run", "--image", "deb", "--name", name, "--vcpus", "1", "--memory", "384", "--disk", "1",
    ];
    args.extend_from_slice(extra);
    d.ok(&args);
    d.show(name)
}

/// Host pids of every process in the instance's unified cgroup tree.
fn guest_pids(unified: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let mut stack = vec![unified.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            }
        }
    }
    out
}

/// The four ids of a /proc/PID/status "Uid:"/"Gid:" line.
fn status_ids(pid: i32, key: &str) -> Option<Vec<u32>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    Some(
        line.split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect(),
    )
}

fn unified_cgroup(v: &serde_json::Value) -> PathBuf {
    // The unified hierarchy is listed last (the only one on a pure cgroup2 host).
    v["cgroups"]
        .as_array()
        .expect("cgroups")
        .iter()
        .filter_map(|c| c.as_str())
        .map(PathBuf::from)
        .next_back()
        .expect("unified cgroup")
}

fn exec_with_stdin(d: &Daemon, name: &str, cmd: &str, stdin: &Path) -> std::process::Output {
    let f = std::fs::File::open(stdin).expect("stdin file");
    Command::new(env!("CARGO_BIN_EXE_fatbox"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["exec", name, "--", "sh", "-c", cmd])
        .stdin(Stdio::from(f))
        .output()
        .expect("fatbox exec")
}

/// The static probe binary (tests/isolation/probe.c), built into a temp dir.
fn build_probe() -> (tempfile::TempDir, PathBuf) {
    let probe_dir = tempfile::tempdir().expect("tmp");
    let probe = probe_dir.path().join("probe");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/isolation/probe.c");
    let st = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&probe)
        .arg(&src)
        .status()
        .expect("cc (the probe is a static C binary)");
    assert!(st.success(), "building the probe");
    (probe_dir, probe)
}

fn copy_probe(d: &Daemon, name: &str, probe: &Path) {
    let o = exec_with_stdin(d, name, "cat > /tmp/probe && chmod 755 /tmp/probe", probe);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Sends UDP datagrams with a 0x7a payload over the host's loopback until dropped, so the
/// sniffing attempt inside has host traffic it must not see.
struct HostTraffic {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl HostTraffic {
    fn start() -> HostTraffic {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
            let mut sent = 0u64;
            while !s2.load(Ordering::Relaxed) {
                if sock.send_to(&[0x7a; 64], "127.0.0.1:9").is_ok() {
                    sent += 1;
                }
                // Pacing of the traffic generator, not synchronisation.
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            sent
        });
        HostTraffic {
            stop,
            thread: Some(thread),
        }
    }
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for HostTraffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn unprivileged_guest_and_breakout_suite() {
    if !is_root() {
        eprintln!("NOTICE: skipped: needs root");
        return;
    }
    let d = Daemon::start();
    import(&d);

    // Privileged mode is refused unless the host allows it.
    let o = d.fatbox(&[
        "run",
        "--image",
        "deb",
        "--name",
        "priv",
        "--vcpus",
        "1",
        "--memory",
        "256",
        "--disk",
        "1",
        "--privileged",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("allow_privileged"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let keydir = tempfile::tempdir().expect("tmp");
    let key = keydir.path().join("id");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
    let pubkey = key.with_extension("pub");
    let v = run(&d, "iso", &["--ssh-key", pubkey.to_str().expect("path")]);
    assert_eq!(v["security"]["userns"], true, "{v}");
    assert_eq!(v["security"]["seccomp"], true, "{v}");
    let base = u32::try_from(v["security"]["idmap"]["base"].as_u64().expect("base")).expect("u32");
    let size = u32::try_from(v["security"]["idmap"]["size"].as_u64().expect("size")).expect("u32");
    assert_eq!(size, 65536);
    assert!(
        base >= 65536,
        "guest root must not be a low host uid: {base}"
    );
    let uuid = v["uuid"].as_str().expect("uuid").to_string();

    // systemd: running, nothing failed.
    assert_eq!(
        d.exec("iso", "systemctl is-system-running").trim(),
        "running"
    );
    assert_eq!(
        d.exec("iso", "systemctl --failed --no-legend | wc -l")
            .trim(),
        "0"
    );

    // From the host: every guest process runs with host ids inside the range.
    let pids = guest_pids(&unified_cgroup(&v));
    assert!(pids.len() >= 5, "guest processes: {pids:?}");
    for pid in &pids {
        for key in ["Uid:", "Gid:"] {
            let Some(ids) = status_ids(*pid, key) else {
                continue; // exited meanwhile
            };
            for id in ids {
                assert!(
                    (base..base + size).contains(&id),
                    "pid {pid} {key} {id} outside {base}+{size}"
                );
            }
        }
    }
    // Inside, they are root and friends.
    assert_eq!(d.exec("iso", "id -u").trim(), "0");
    assert_eq!(
        d.exec("iso", "cat /proc/self/uid_map")
            .split_whitespace()
            .collect::<Vec<_>>(),
        vec!["0".to_string(), base.to_string(), size.to_string()]
    );

    // Files made inside are owned by mapped ids on the host (the upper dir on the disk).
    d.exec(
        "iso",
        "touch /root/by-root && install -o 1000 -g 1000 /dev/null /root/by-1000",
    );
    let upper = d
        .state_dir()
        .join("instances")
        .join(&uuid)
        .join("disk/upper/root");
    let m = std::fs::metadata(upper.join("by-root")).expect("by-root in upper");
    assert_eq!((m.uid(), m.gid()), (base, base));
    let m = std::fs::metadata(upper.join("by-1000")).expect("by-1000 in upper");
    assert_eq!((m.uid(), m.gid()), (base + 1000, base + 1000));
    // The shared layers stay owned by host root.
    let layers = d.state_dir().join("layers");
    let some_layer = std::fs::read_dir(&layers)
        .expect("layers")
        .flatten()
        .find(|e| e.path().join("etc").is_dir())
        .expect("a layer with /etc")
        .path();
    assert_eq!(
        std::fs::metadata(some_layer.join("etc"))
            .expect("etc")
            .uid(),
        0
    );

    // sshd works: key login as root over the guest's loopback (StrictModes checks that
    // authorized_keys belongs to the guest's root).
    let o = exec_with_stdin(
        &d,
        "iso",
        "umask 077; cat > /root/id && ssh -i /root/id -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o BatchMode=yes root@127.0.0.1 'id -u; hostname'",
        &key,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.lines().collect::<Vec<_>>() == ["0", "iso"],
        "ssh: {out} {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The breakout suite.
    let (_probe_dir, probe) = build_probe();
    copy_probe(&d, "iso", &probe);
    let disk_mnt = d.state_dir().join("instances").join(&uuid).join("disk");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let majmin = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(disk_mnt.to_str().expect("path")))
        .and_then(|l| l.split(' ').nth(2))
        .expect("the disk's loop device")
        .to_string();
    let (maj, min) = majmin.split_once(':').expect("maj:min");
    let core_before = std::fs::read_to_string("/proc/sys/kernel/core_pattern").expect("core");
    let script = include_str!("isolation/breakout.sh");
    let sockets = format!(
        "{} /run/openvswitch/db.sock /var/run/openvswitch/db.sock /run/fatbox/fatboxd.sock",
        d.socket.display()
    );
    let fatboxd_pid = d.pid().unwrap_or(0).to_string();
    let traffic = HostTraffic::start();
    let out = d.ok(&[
        "exec",
        "iso",
        "--",
        "env",
        "P=/tmp/probe",
        &format!("MAJ={maj}"),
        &format!("MIN={min}"),
        &format!("HOST_PID={fatboxd_pid}"),
        &format!("SOCKETS={sockets}"),
        "SNIFF=1.5",
        "sh",
        "-c",
        script,
    ]);
    let sent = traffic.finish();
    assert!(sent > 10, "host traffic generator sent {sent} packets");

    let results: Vec<(String, bool, String)> = out
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT|"))
        .filter_map(|l| {
            let mut f = l.splitn(3, '|');
            Some((
                f.next()?.to_string(),
                f.next()? == "1",
                f.next().unwrap_or("").to_string(),
            ))
        })
        .collect();
    eprintln!("breakout suite (guest root, userns + seccomp):");
    eprintln!("| attempt | result | detail |\n|---|---|---|");
    for (name, denied, detail) in &results {
        eprintln!(
            "| {name} | {} | {detail} |",
            if *denied { "denied" } else { "ALLOWED" }
        );
    }
    assert_eq!(results.len(), 13, "all attempts reported:\n{out}");
    let allowed: Vec<_> = results.iter().filter(|r| !r.1).collect();
    assert!(allowed.is_empty(), "breakouts not denied: {allowed:#?}");
    // And the host is as it was.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/core_pattern").expect("core"),
        core_before
    );
    let year = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.as_secs() / 31_557_600 + 1970)
        .expect("clock");
    assert!(year >= 2024, "host clock moved to {year}");

    // The guest's bounding set and seccomp mode, as exec sees them (same as init).
    let status = d.exec("iso", "grep -E '^(CapBnd|Seccomp):' /proc/self/status");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    let bnd = u64::from_str_radix(
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapBnd:\t"))
            .expect("CapBnd")
            .trim(),
        16,
    )
    .expect("hex");
    for cap in driver::seccomp::DROP_CAPS {
        assert_eq!(
            bnd & (1u64 << cap),
            0,
            "cap {cap} still in the bounding set"
        );
    }
    assert_ne!(
        bnd & (1u64 << 21),
        0,
        "CAP_SYS_ADMIN (namespaced) stays for systemd"
    );

    d.ok(&["delete", "iso"]);
}

/// Isolated ranges (one per instance, persisted, freed on delete), the shifted-copy
/// fallback for the layers, and the opt-in privileged mode.
#[test]
fn isolated_ranges_copy_shift_and_privileged() {
    if !is_root() {
        eprintln!("NOTICE: skipped: needs root");
        return;
    }
    let d = Daemon::start_with(
        "[security]\nisolated_ranges = true\nshift = \"copy\"\nallow_privileged = true\n\
         id_base = 2000000\n",
    );
    import(&d);
    let a = run(&d, "ra", &[]);
    let b = run(&d, "rb", &[]);
    let base = |v: &serde_json::Value| v["security"]["idmap"]["base"].as_u64().expect("base");
    assert_eq!(base(&a), 2_000_000);
    assert_eq!(base(&b), 2_000_000 + 65536);
    for (n, v) in [("ra", &a), ("rb", &b)] {
        assert_eq!(d.exec(n, "systemctl is-system-running").trim(), "running");
        let pid = i32::try_from(v["init_pid"].as_i64().expect("pid")).expect("pid");
        assert_eq!(status_ids(pid, "Uid:").expect("uid")[0] as u64, base(v));
    }
    // Each range has its own chowned copy of the layers, owned by that range's root.
    let shifted = d.state_dir().join("layers-shifted");
    for v in [&a, &b] {
        let dir = shifted.join(format!("{}-65536", base(v)));
        let layer = std::fs::read_dir(&dir)
            .expect("shifted layers")
            .flatten()
            .find(|e| e.path().join("etc").is_dir())
            .expect("a layer with /etc")
            .path();
        assert_eq!(
            std::fs::metadata(layer.join("etc")).expect("etc").uid() as u64,
            base(v)
        );
    }
    let ranges = d.state_dir().join("idranges.json");
    let ua = a["uuid"].as_str().expect("uuid").to_string();
    assert!(std::fs::read_to_string(&ranges)
        .expect("idranges")
        .contains(&ua));
    d.ok(&["delete", "ra"]);
    assert!(!std::fs::read_to_string(&ranges)
        .expect("idranges")
        .contains(&ua));
    // The freed slot is reused.
    let c = run(&d, "rc", &[]);
    assert_eq!(base(&c), 2_000_000);

    // Privileged: host root inside, no seccomp, logged at warn.
    let p = run(&d, "rp", &["--privileged"]);
    assert_eq!(p["security"]["userns"], false);
    assert_eq!(p["security"]["seccomp"], false);
    let pid = i32::try_from(p["init_pid"].as_i64().expect("pid")).expect("pid");
    assert_eq!(status_ids(pid, "Uid:").expect("uid")[0], 0);
    assert_eq!(
        d.exec("rp", "systemctl is-system-running").trim(),
        "running"
    );
    let log = std::fs::read_to_string(d.dir.path().join("fatboxd.log")).unwrap_or_default();
    assert!(log.contains("PRIVILEGED instance"), "warn line missing");
    for n in ["rb", "rc", "rp"] {
        d.ok(&["delete", n]);
    }
}

/// A test "host" on the OVS bridge: a netns whose veth is an access port of `vlan`.
struct BridgeHost {
    ns: Netns,
    port: String,
}

impl BridgeHost {
    fn new(ovs: &Ovs, vlan: u16, cidr: &str) -> BridgeHost {
        let ns = Netns::new();
        let port = format!("fbh{}", &ns.name[5..]);
        run_ok(
            "ip",
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "h0", "netns", &ns.name,
            ],
        );
        let host = BridgeHost { ns, port };
        run_ok("ip", &["link", "set", &host.port, "up"]);
        ovs.vsctl(&[
            "add-port",
            &ovs.bridge,
            &host.port,
            &format!("tag={vlan}"),
            "vlan_mode=access",
        ]);
        host.ns.add_addr("h0", cidr);
        host
    }
}

impl Drop for BridgeHost {
    fn drop(&mut self) {
        // The netns goes in Netns::drop and takes the peer with it.
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.port])
            .output();
    }
}

/// Whether the host sees `dev` in promiscuous mode (IFF_PROMISC); None if it has no such link.
fn promisc(dev: &str) -> Option<bool> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{dev}/flags")).ok()?;
    let flags = u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()?;
    Some(flags & 0x100 != 0)
}

/// 16 random bytes as hex: a payload marker that cannot occur by chance.
fn marker() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Raw sniffing of other instances' traffic: instances A and B and a test netns C on one VLAN
/// of a private OVS bridge. While B and C exchange packets carrying a marker, A (guest root)
/// captures on an AF_PACKET socket with every interface it can see in promiscuous mode. A must
/// see its own marked traffic (the sniffer works) and none of B's and C's; it sees no bridge
/// or other port, and its attempts leave the bridge's flags as they were.
#[test]
fn sniffing_other_instances_traffic_on_ovs() {
    if !is_root() {
        eprintln!("NOTICE: skipped: needs root");
        return;
    }
    let ovs = Ovs::start();
    let d = Daemon::start_with_network(&format!(
        "ovsdb = \"{}\"\nintegration_bridge = \"{}\"\n",
        ovs.endpoint(),
        ovs.bridge
    ));
    import(&d);
    let c = BridgeHost::new(&ovs, 100, "10.20.0.100/24");
    let a = run(&d, "sniff-a", &["--nic", "vlan=100,ip=10.20.0.5/24"]);
    let b = run(&d, "sniff-b", &["--nic", "vlan=100,ip=10.20.0.6/24"]);
    assert_eq!(a["security"]["userns"], true, "{a}");
    let tap_a = a["nics"][0]["tap"].as_str().expect("tap").to_string();
    let tap_b = b["nics"][0]["tap"].as_str().expect("tap").to_string();
    let (_probe_dir, probe) = build_probe();
    copy_probe(&d, "sniff-a", &probe);

    // Everyone has talked once, so the bridge has learnt every MAC: from here unicast goes
    // only to its port (an unknown destination would be flooded, as on any switch).
    let ping = |vm: &str, ip: &str| {
        d.fatbox(&["exec", vm, "--", "ping", "-c", "1", "-W", "1", ip])
            .status
            .success()
    };
    for (vm, ip) in [
        ("sniff-a", "10.20.0.100"),
        ("sniff-b", "10.20.0.100"),
        ("sniff-a", "10.20.0.6"),
    ] {
        poll(
            &format!("{vm} pinging {ip}"),
            std::time::Duration::from_secs(30),
            || ping(vm, ip).then_some(()),
        );
    }

    // Inside A: what it can see of the network.
    let ifs = d.exec("sniff-a", "ls /sys/class/net");
    let ifs: Vec<&str> = ifs.split_whitespace().collect();
    assert!(
        ifs.iter().all(|i| *i == "lo" || i.starts_with("eth")),
        "A sees foreign interfaces: {ifs:?}"
    );
    for dev in [
        ovs.bridge.as_str(),
        "ovs-netdev",
        tap_b.as_str(),
        c.port.as_str(),
    ] {
        let o = d.fatbox(&[
            "exec", "sniff-a", "--", "ip", "link", "set", dev, "promisc", "on",
        ]);
        assert!(
            !o.status.success(),
            "A put the host's {dev} into promiscuous mode"
        );
    }
    let watched: Vec<String> = [
        ovs.bridge.as_str(),
        "ovs-netdev",
        tap_a.as_str(),
        tap_b.as_str(),
        c.port.as_str(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let flags_before: Vec<Option<bool>> = watched.iter().map(|d| promisc(d)).collect();

    let others = marker();
    let own = marker();
    // C -> B: UDP datagrams carrying the marker (B need not listen), for the whole window.
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let payload: Vec<u8> = (0..4)
        .flat_map(|_| {
            (0..16).map(|i| u8::from_str_radix(&others[2 * i..2 * i + 2], 16).unwrap_or(0))
        })
        .collect();
    let udp = c.ns.run_in(move || {
        let sock = std::net::UdpSocket::bind("10.20.0.100:0").expect("udp in C");
        let mut sent = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            if sock.send_to(&payload, "10.20.0.6:9").is_ok() {
                sent += 1;
            }
            // Pacing of the traffic generator, not synchronisation.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        sent
    });
    // B -> C: echo requests with the marker as pattern (C's replies carry it back).
    let sock = d.socket.clone();
    let others2 = others.clone();
    let b_ping = std::thread::spawn(move || {
        Command::new(env!("CARGO_BIN_EXE_fatbox"))
            .arg("--socket")
            .arg(&sock)
            .args([
                "exec",
                "sniff-b",
                "--",
                "ping",
                "-c",
                "20",
                "-i",
                "0.2",
                "-p",
                &others2,
                "10.20.0.100",
            ])
            .output()
            .expect("fatbox exec")
    });
    // Control: the same capture inside C (an endpoint of that traffic) must see the marker,
    // so a 0 in A means "not delivered to A", not "not recognised".
    let c_sniff = {
        let probe = probe.clone();
        let ns = c.ns.name.clone();
        let others = others.clone();
        std::thread::spawn(move || {
            Command::new("ip")
                .args(["netns", "exec", &ns])
                .arg(&probe)
                .args(["sniff", "3", &others])
                .output()
                .expect("probe in C")
        })
    };
    // A: its own marked pings to C in the background, and the capture with promiscuous mode
    // on every interface it can reach (eth0 via ip link, all of them via PACKET_MR_PROMISC).
    let script = format!(
        "ip link set eth0 promisc on; \
         (ping -c 10 -i 0.2 -p {own} 10.20.0.100 >/dev/null 2>&1 &); \
         /tmp/probe sniff 3 --promisc {others} {own}; ip link set eth0 promisc off"
    );
    let out = d.exec("sniff-a", &script);
    stop.store(true, Ordering::Relaxed);
    let sent = udp.join().expect("udp thread");
    let bp = b_ping.join().expect("ping thread");
    let b_out = String::from_utf8_lossy(&bp.stdout).into_owned();
    let c_out = c_sniff.join().expect("sniff thread");
    let c_seen: u64 = String::from_utf8_lossy(&c_out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);

    let n: Vec<u64> = out
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert_eq!(n.len(), 4, "probe output: {out}");
    let (seen_others, seen_own, total, promisc_ifs) = (n[0], n[1], n[2], n[3]);
    eprintln!(
        "sniffing on A: {seen_others} packets of B<->C (marker), {seen_own} of its own, \
         {total} in all, promiscuous on {promisc_ifs} interface(s) {ifs:?}; \
         C itself saw {c_seen} marked; C sent {sent} UDP to B; B's ping: {}",
        b_out.lines().rev().nth(1).unwrap_or("")
    );
    assert!(sent > 20, "C sent {sent} datagrams");
    // Some replies are enough to show B <-> C flowed (a loaded host may drop a few).
    let received: u32 = b_out
        .split(',')
        .find_map(|f| f.trim().strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(received >= 5, "B <-> C traffic did not flow: {b_out}");
    assert!(
        c_seen > 0,
        "the control capture in C saw no marked packet: {}",
        String::from_utf8_lossy(&c_out.stdout)
    );
    assert!(seen_own > 0, "the sniffer saw none of A's own pings: {out}");
    assert_eq!(seen_others, 0, "A saw B<->C traffic: {out}");
    assert!(
        promisc_ifs as usize <= ifs.len(),
        "promiscuous mode reached {promisc_ifs} interfaces, A has {ifs:?}"
    );
    let flags_after: Vec<Option<bool>> = watched.iter().map(|d| promisc(d)).collect();
    assert_eq!(
        flags_before, flags_after,
        "promiscuous mode of {watched:?} on the host changed"
    );
    assert!(
        flags_before[0].is_some(),
        "the bridge {} is not a host link",
        ovs.bridge
    );

    d.ok(&["delete", "sniff-a"]);
    d.ok(&["delete", "sniff-b"]);
}
