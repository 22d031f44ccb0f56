//! Console attach (root): the WebSocket of `GET /v1/instances/{id}/console/attach`, `fatbox
//! console NAME` through a pipe, the serial console's TCP port, a client that never reads,
//! `kill -9` of fatboxd, power-off and delete — on the fixture image, whose console-getty
//! prints `login:` on /dev/console (root has no password there, so no login).

mod common;
use common::{wait_for, Daemon};
use driver::client::{Client, ConsoleStream};
use futures::{SinkExt, StreamExt};
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const NAME: &str = "con-1";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn attach(d: &Daemon, tail: u64, readonly: bool) -> ConsoleStream {
    Client::new(&d.socket)
        .attach_console(NAME, tail, readonly)
        .await
        .expect("attach")
}

/// Reads until `needle` shows up; `poke` (if any) is sent now and again while waiting (the
/// getty may still be starting, or its prompt already printed). Returns all that was read.
async fn ws_until(ws: &mut ConsoleStream, needle: &str, poke: Option<&[u8]>, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut seen = Vec::new();
    loop {
        if let Some(p) = poke {
            ws.send(Message::Binary(p.to_vec().into()))
                .await
                .expect("send");
        }
        let round = Instant::now() + Duration::from_secs(2);
        while Instant::now() < round {
            match tokio::time::timeout_at(round.into(), ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => seen.extend_from_slice(&b),
                Ok(Some(Ok(_))) => {}
                Ok(other) => panic!(
                    "console ended while waiting for {needle:?}: {other:?}; got {}",
                    String::from_utf8_lossy(&seen)
                ),
                Err(_) => break,
            }
            if String::from_utf8_lossy(&seen).contains(needle) {
                return String::from_utf8_lossy(&seen).into_owned();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} on the console within {secs}s; got {:?}",
            String::from_utf8_lossy(&seen)
        );
    }
}

/// Waits for the WebSocket to be closed by the server.
async fn ws_closed(ws: &mut ConsoleStream, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline.into(), ws.next()).await {
            Ok(None | Some(Ok(Message::Close(_))) | Some(Err(_))) => return,
            Ok(Some(Ok(_))) => {}
            Err(_) => panic!("attached console not closed within {secs}s"),
        }
    }
}

/// Same over the serial console's TCP stream (blocking, with a read timeout).
fn tcp_until(s: &mut std::net::TcpStream, needle: &str, secs: u64) -> String {
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        s.write_all(b"\r").expect("tcp write");
        let round = Instant::now() + Duration::from_secs(2);
        while Instant::now() < round {
            match s.read(&mut buf) {
                Ok(0) => panic!(
                    "serial console closed; got {}",
                    String::from_utf8_lossy(&seen)
                ),
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
            if String::from_utf8_lossy(&seen).contains(needle) {
                return String::from_utf8_lossy(&seen).into_owned();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} on the serial console"
        );
    }
}

async fn serial(d: &Daemon) -> (String, u16) {
    let r = Client::new(&d.socket)
        .request(
            "POST",
            &format!("/v1/instances/{NAME}/serial-console"),
            None,
        )
        .await
        .expect("request");
    assert_eq!(r.status, 200, "serial-console: {}", r.error());
    let v = r.json().expect("json");
    assert_eq!(v["protocol"], "tcp");
    (
        v["host"].as_str().expect("host").to_string(),
        u16::try_from(v["port"].as_u64().expect("port")).expect("port fits"),
    )
}

fn sock_path(d: &Daemon) -> std::path::PathBuf {
    let uuid = d.show(NAME)["uuid"].as_str().expect("uuid").to_string();
    d.state_dir()
        .join("instances")
        .join(uuid)
        .join(driver::console::SOCKET)
}

#[test]
fn console_attach_serial_and_restart() {
    let mut d = Daemon::start();
    d.import_fixture("deb");
    d.ok(&[
        "run", "--image", "deb", "--name", NAME, "--vcpus", "1", "--memory", "256", "--disk", "1",
    ]);
    let rt = rt();

    // The socket is the monitor's, 0600.
    let sock = sock_path(&d);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&sock)
            .expect("console.sock")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "console.sock mode {mode:o}");

    // WebSocket: the log's tail first (systemd's boot messages), then the live getty.
    rt.block_on(async {
        let t = Instant::now();
        let mut a = attach(&d, 65536, false).await;
        println!(
            "attach (connect + WebSocket upgrade + hello): {:?}",
            t.elapsed()
        );
        let mut b = attach(&d, 0, true).await;
        let seen = ws_until(&mut a, "login:", Some(b"\r"), 60).await;
        assert!(
            seen.contains("Welcome to"),
            "no boot messages replayed: {seen}"
        );
        // The read-only attacher sees the same live output.
        ws_until(&mut b, "login:", None, 30).await;
        // Keystroke round trips: WebSocket → fatboxd → console.sock → pty → the getty's echo.
        let mut rtts = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            a.send(Message::Binary(b"q".to_vec().into()))
                .await
                .expect("send");
            ws_until(&mut a, "q", None, 10).await;
            rtts.push(t.elapsed());
        }
        rtts.sort();
        println!(
            "keystroke echo through the WebSocket: median {:?}, max {:?} (20 keys)",
            rtts[10], rtts[19]
        );
        // Typed input reaches the getty: a user name gets a password prompt.
        let seen = ws_until(&mut a, "Password:", Some(b"nobody\r"), 30).await;
        assert!(seen.contains("Password:"), "{seen}");
        let _ = a.send(Message::Binary(b"\x03\r".to_vec().into())).await;
    });

    // A client that never reads is dropped; the guest's console and the log keep going.
    let mut stuck = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    stuck.write_all(b"{\"tail\":0}\n").expect("hello");
    let t = Instant::now();
    d.exec(
        NAME,
        "head -c 600000 /dev/zero | tr '\\0' x | fold -w 100 > /dev/console; echo END-OF-FLOOD > /dev/console",
    );
    // The pty hands the output to the monitor asynchronously: poll the log for the marker.
    wait_for(30, "END-OF-FLOOD in console.log", || {
        d.ok(&["console", NAME, "--log", "--bytes", "4096"])
            .contains("END-OF-FLOOD")
            .then_some(())
    });
    let flood = t.elapsed();
    stuck
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut got = 0usize;
    let mut buf = vec![0u8; 65536];
    loop {
        match stuck.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("stuck client not disconnected ({got} bytes read): {e}"),
        }
    }
    assert!(
        got < 600_000,
        "the stuck client got everything ({got} bytes): it was not dropped"
    );
    println!(
        "606 kB written to /dev/console until all in console.log, with a client that never reads: {flood:?}; that client got {got} bytes, then was dropped"
    );

    // `fatbox console NAME` through pipes.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fatbox"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["console", NAME])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fatbox console");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("login:") {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reader.is_finished() {
        assert!(Instant::now() < deadline, "fatbox console: no login prompt");
        let _ = stdin.write_all(b"\r");
        let _ = stdin.flush();
        std::thread::sleep(Duration::from_millis(500));
    }
    let seen = reader.join().expect("reader");
    assert!(seen.contains("login:"), "fatbox console printed: {seen}");
    // End of stdin does not detach a pipe; a signal does, cleanly.
    drop(stdin);
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = wait_for(10, "fatbox console exits on SIGTERM", || {
        child.try_wait().expect("wait")
    });
    assert!(st.success(), "fatbox console after SIGTERM: {st}");

    // On a terminal: raw mode while attached, Ctrl-] detaches, the terminal is restored.
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let before = nix::sys::termios::tcgetattr(&pty.slave).expect("tcgetattr");
    let slave = |_: ()| std::process::Stdio::from(pty.slave.try_clone().expect("dup"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fatbox"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["console", NAME])
        .stdin(slave(()))
        .stdout(slave(()))
        .stderr(slave(()))
        .spawn()
        .expect("fatbox console on a pty");
    let mut master = std::fs::File::from(pty.master);
    let raw = wait_for(10, "raw mode on the terminal", || {
        let now = nix::sys::termios::tcgetattr(&pty.slave).expect("tcgetattr");
        (!now
            .local_flags
            .contains(nix::sys::termios::LocalFlags::ICANON))
        .then_some(now)
    });
    assert!(!raw
        .local_flags
        .contains(nix::sys::termios::LocalFlags::ECHO));
    master.write_all(&[0x1d]).expect("Ctrl-]");
    let st = wait_for(10, "fatbox console detaches on Ctrl-]", || {
        child.try_wait().expect("wait")
    });
    assert!(st.success(), "fatbox console after Ctrl-]: {st}");
    let after = nix::sys::termios::tcgetattr(&pty.slave).expect("tcgetattr");
    assert_eq!(
        before.local_flags, after.local_flags,
        "terminal not restored"
    );
    assert_eq!(
        before.input_flags, after.input_flags,
        "terminal not restored"
    );
    assert_eq!(
        before.output_flags, after.output_flags,
        "terminal not restored"
    );

    // Serial console: a TCP port on demand, the same one when asked again.
    let (host, port) = rt.block_on(serial(&d));
    assert_eq!(host, "127.0.0.1");
    assert_eq!(
        rt.block_on(serial(&d)).1,
        port,
        "a second request moved the port"
    );
    assert_eq!(d.show(NAME)["serial_port"].as_u64(), Some(u64::from(port)));
    let mut tcp = std::net::TcpStream::connect((host.as_str(), port)).expect("serial connect");
    tcp_until(&mut tcp, "login:", 60);
    drop(tcp);

    // kill -9 fatboxd: the console lives on in the monitor; after the restart attach works
    // again and the serial port is listened on again.
    d.kill9();
    d.spawn();
    assert_eq!(
        rt.block_on(serial(&d)).1,
        port,
        "port changed across the restart"
    );
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("serial after restart");
    tcp_until(&mut tcp, "login:", 60);
    rt.block_on(async {
        let mut a = attach(&d, 0, false).await;
        ws_until(&mut a, "login:", Some(b"\r"), 60).await;
    });

    // Power-off closes attachers; a stopped instance has no console to attach to.
    let mut a = rt.block_on(attach(&d, 0, true));
    d.ok(&["stop", NAME, "--timeout", "20"]);
    rt.block_on(ws_closed(&mut a, 30));
    let o = d.fatbox(&["console", NAME]);
    assert!(
        !o.status.success(),
        "attach to a stopped instance succeeded"
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("(409)"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!sock.exists(), "console.sock left after power-off");
    // The serial port is kept, and a connection to it now ends at once.
    let mut buf = [0u8; 16];
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    while let Ok(n) = tcp.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("port kept while off");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert_eq!(tcp.read(&mut buf).expect("EOF"), 0);

    // Delete: attachers closed, port released.
    d.ok(&["start", NAME]);
    let mut a = rt.block_on(attach(&d, 0, false));
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("serial");
    tcp_until(&mut tcp, "login:", 60);
    d.ok(&["delete", NAME]);
    rt.block_on(ws_closed(&mut a, 30));
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => panic!("serial session not closed by delete: {e}"),
        }
    }
    wait_for(10, "serial port released", || {
        std::net::TcpListener::bind(("127.0.0.1", port)).ok()
    });
}

#[test]
fn serial_console_disabled() {
    // Checked before the instance is looked up: no need to boot one.
    let d = Daemon::start_with("[console]\nserial_enabled = false\n");
    let r = rt()
        .block_on(Client::new(&d.socket).request(
            "POST",
            &format!("/v1/instances/{NAME}/serial-console"),
            None,
        ))
        .expect("request");
    assert_eq!(r.status, 501, "{}", r.error());
    assert!(r.error().contains("disabled"), "{}", r.error());
}
