//! First boots take their SSH host keys from fatboxd's pool (hostkeys.rs): every instance
//! gets its own set, handed out once, kept across reboots, and the pool refills; with the
//! pool off the guest makes its own keys at first boot as before. Root, FATBOX_FIXTURES.

mod common;
use common::{wait_for, Daemon};
use std::path::Path;

fn ready_sets(state: &Path) -> Vec<(String, String)> {
    std::fs::read_dir(state.join("hostkeys/ready"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let pubkey =
                        std::fs::read_to_string(e.path().join("ssh_host_ed25519_key.pub")).ok()?;
                    Some((e.file_name().to_string_lossy().into_owned(), pubkey))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn run(d: &Daemon, name: &str) -> String {
    d.ok(&[
        "run", "--image", "deb", "--name", name, "--vcpus", "1", "--memory", "256", "--disk", "1",
    ])
    .trim()
    .to_string()
}

#[test]
fn first_boots_take_unique_host_keys_from_the_pool() {
    let d = Daemon::start();
    d.import_fixture("deb");
    let state = d.state_dir();
    let pool = wait_for(120, "two key sets in the pool", || {
        let v = ready_sets(&state);
        (v.len() >= 2).then_some(v)
    });
    let pooled: Vec<&str> = pool.iter().map(|(_, k)| k.as_str()).collect();

    run(&d, "k1");
    run(&d, "k2");
    let k1 = d.exec("k1", "cat /etc/ssh/ssh_host_ed25519_key.pub");
    let k2 = d.exec("k2", "cat /etc/ssh/ssh_host_ed25519_key.pub");
    assert_ne!(k1, k2, "two instances share a host key");
    for k in [&k1, &k2] {
        assert!(pooled.contains(&k.as_str()), "key not from the pool: {k}");
        // Handed out once: no longer in the pool, no claimed copy left on the host.
        assert!(
            !ready_sets(&state).iter().any(|(_, p)| p == k),
            "a used key set is still in the pool"
        );
    }
    let left: Vec<String> = std::fs::read_dir(state.join("hostkeys"))
        .expect("hostkeys")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("taken-"))
        .collect();
    assert!(left.is_empty(), "claimed sets left on the host: {left:?}");

    for name in ["k1", "k2"] {
        // The guest's root owns its keys, private ones unreadable to others; the boot is
        // clean and sshd serves them.
        assert_eq!(
            d.exec(
                name,
                "stat -c '%u %a' /etc/ssh/ssh_host_rsa_key /etc/ssh/ssh_host_ecdsa_key /etc/ssh/ssh_host_ed25519_key.pub"
            ),
            "0 600\n0 600\n0 644\n"
        );
        assert_eq!(d.exec(name, "systemctl is-system-running"), "running\n");
        assert_eq!(d.exec(name, "systemctl is-active ssh"), "active\n");
        let served = d.exec(
            name,
            "ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null | cut -d' ' -f2-3",
        );
        let file = d.exec(name, "cut -d' ' -f1-2 /etc/ssh/ssh_host_ed25519_key.pub");
        assert_eq!(served.trim(), file.trim(), "sshd serves another key");
    }

    // A reboot keeps the first boot's keys.
    let pid = d.show("k1")["init_pid"].clone();
    d.ok(&["reboot", "k1"]);
    wait_for(120, "k1 running again after reboot", || {
        let v = d.show("k1");
        (v["state"] == "running" && v["init_pid"] != pid).then_some(())
    });
    wait_for(60, "systemd up after reboot", || {
        let o = d.fatbox(&["exec", "k1", "--", "systemctl", "is-system-running"]);
        (String::from_utf8_lossy(&o.stdout).trim() == "running").then_some(())
    });
    assert_eq!(d.exec("k1", "cat /etc/ssh/ssh_host_ed25519_key.pub"), k1);

    // The pool refills to its size (4 by default).
    wait_for(180, "the pool back at 4 sets", || {
        (ready_sets(&state).len() >= 4).then_some(())
    });
    d.ok(&["delete", "k1"]);
    d.ok(&["delete", "k2"]);
}
