//! Test harness: the real Glance API (PyPI, in the venv tests/glance/setup.sh builds) on
//! 127.0.0.1, with a sqlite database and a file store in a temp dir, killed on drop; tiny
//! bootable-looking disk images made with mkfs.ext4 -d; a TCP proxy that drops or slows a
//! connection on purpose.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The venv with glance + gunicorn (built once per requirements hash, cached).
pub fn venv() -> PathBuf {
    static V: OnceLock<PathBuf> = OnceLock::new();
    V.get_or_init(|| {
        let out = Command::new("bash")
            .arg(workspace().join("tests/glance/setup.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("running tests/glance/setup.sh");
        assert!(out.status.success(), "tests/glance/setup.sh failed");
        let s = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(s.lines().last().expect("venv path").trim())
    })
    .clone()
}

pub fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests need root (overlay whiteouts and trusted.* xattrs in unpacked layers)"
    );
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

pub struct Glance {
    pub endpoint: String,
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    child: Child,
}

impl Glance {
    pub fn start() -> Glance {
        let venv = venv();
        let dir = tempfile::Builder::new()
            .prefix("glance-test-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        let conf = d.join("conf");
        let store = d.join("store");
        for p in [&conf, &store, &d.join("staging"), &d.join("tasks")] {
            std::fs::create_dir_all(p).expect("mkdir");
        }
        std::fs::copy(
            venv.join("etc/glance/glance-api-paste.ini"),
            conf.join("glance-api-paste.ini"),
        )
        .expect("paste ini");
        let port = free_port();
        let endpoint = format!("http://127.0.0.1:{port}");
        // No paste flavor → the unauthenticated pipeline; the legacy policy defaults let
        // that context (no project, no roles) use the API.
        let cfg = format!(
            "[DEFAULT]\nenabled_backends = fs:file\nworker_self_reference_url = {endpoint}\n\
             image_size_cap = 8589934592\n\
             [database]\nconnection = sqlite:///{db}\n\
             [glance_store]\ndefault_backend = fs\n\
             [fs]\nfilesystem_store_datadir = {store}/\n\
             [os_glance_staging_store]\nfilesystem_store_datadir = {staging}/\n\
             [os_glance_tasks_store]\nfilesystem_store_datadir = {tasks}/\n\
             [paste_deploy]\nflavor =\n\
             [oslo_policy]\nenforce_new_defaults = False\nenforce_scope = False\n",
            db = d.join("glance.sqlite").display(),
            store = store.display(),
            staging = d.join("staging").display(),
            tasks = d.join("tasks").display(),
        );
        std::fs::write(conf.join("glance-api.conf"), cfg).expect("glance-api.conf");
        let log = std::fs::File::create(d.join("glance.log")).expect("log");
        let st = Command::new(venv.join("bin/glance-manage"))
            .arg("--config-file")
            .arg(conf.join("glance-api.conf"))
            .arg("db_sync")
            .env("OS_GLANCE_CONFIG_DIR", &conf)
            .current_dir(d)
            .stdout(log.try_clone().expect("log"))
            .stderr(log.try_clone().expect("log"))
            .status()
            .expect("glance-manage");
        assert!(
            st.success(),
            "glance-manage db_sync failed: see {}",
            d.display()
        );
        let child = Command::new(venv.join("bin/gunicorn"))
            .args(["-b", &format!("127.0.0.1:{port}")])
            // Threads: a long download must not block show/upload calls.
            .args([
                "-w",
                "1",
                "-k",
                "gthread",
                "--threads",
                "8",
                "--timeout",
                "600",
            ])
            .arg("glance.wsgi.api:application")
            .env("OS_GLANCE_CONFIG_DIR", &conf)
            .current_dir(d)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("gunicorn");
        let g = Glance {
            endpoint,
            store,
            dir,
            child,
        };
        g.wait_ready(Duration::from_secs(120));
        g
    }

    fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let port: u16 = self
            .endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        let mut delay = Duration::from_millis(50);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                let req = "GET /v2/images HTTP/1.0\r\nHost: x\r\n\r\n";
                let mut resp = String::new();
                if s.write_all(req.as_bytes()).is_ok() && s.read_to_string(&mut resp).is_ok() {
                    if resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200") {
                        return;
                    }
                    panic!(
                        "Glance answers but not 200: {}",
                        resp.lines().next().unwrap_or("")
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "Glance did not come up; log: {}",
                std::fs::read_to_string(self.dir.path().join("glance.log")).unwrap_or_default()
            );
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// The stored file of an image in the fs backend.
    pub fn stored_file(&self, id: &str) -> PathBuf {
        self.store.join(id)
    }

    /// Creates an image and uploads `file` with plain HTTP (curl), returns its id.
    pub fn upload_with_curl(&self, file: &Path, name: &str, disk_format: &str) -> String {
        self.upload_with_curl_as(file, name, disk_format, "bare")
    }

    /// Same, with a container_format other than `bare` (`docker` for a docker save tarball).
    pub fn upload_with_curl_as(
        &self,
        file: &Path,
        name: &str,
        disk_format: &str,
        container_format: &str,
    ) -> String {
        let body = format!(
            r#"{{"name":"{name}","disk_format":"{disk_format}","container_format":"{container_format}"}}"#
        );
        let out = Command::new("curl")
            .args([
                "-sf",
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "-d",
            ])
            .arg(&body)
            .arg(format!("{}/v2/images", self.endpoint))
            .output()
            .expect("curl");
        assert!(out.status.success(), "create image failed");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let id = v["id"].as_str().expect("id").to_string();
        let st = Command::new("curl")
            .args([
                "-sf",
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/octet-stream",
            ])
            .arg("-T")
            .arg(file)
            .arg(format!("{}/v2/images/{id}/file", self.endpoint))
            .status()
            .expect("curl");
        assert!(st.success(), "upload failed");
        id
    }
}

impl Drop for Glance {
    fn drop(&mut self) {
        // gunicorn's master stops its workers on TERM.
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// A small whole-disk ext4 image that looks like a Linux root (etc, usr, sbin) with
/// `payload_mib` MiB of random data in /opt/payload and a marker file.
pub fn tiny_image(dir: &Path, name: &str, payload_mib: u64, marker: &str) -> PathBuf {
    let root = dir.join(format!("{name}-root"));
    for d in ["etc", "usr/bin", "sbin", "opt", "var/log"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::write(
        root.join("etc/os-release"),
        "ID=debian\nVERSION_ID=\"12\"\nPRETTY_NAME=\"tiny test image\"\n",
    )
    .expect("os-release");
    std::fs::write(root.join("etc/marker"), marker).expect("marker");
    std::os::unix::fs::symlink("../lib/systemd/systemd", root.join("sbin/init")).expect("init");
    let mut data = vec![0u8; (payload_mib << 20) as usize];
    let mut x: u64 = 0x9e3779b97f4a7c15 ^ marker.len() as u64;
    for (i, b) in data.iter_mut().enumerate() {
        if i % 8 == 0 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        *b = (x >> ((i % 8) * 8)) as u8;
    }
    std::fs::write(root.join("opt/payload"), &data).expect("payload");
    let img = dir.join(format!("{name}.raw"));
    let size_mib = payload_mib * 2 + 16;
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&img)
        .arg(format!("{size_mib}M"))
        .status()
        .expect("mkfs.ext4");
    assert!(st.success(), "mkfs.ext4 -d failed");
    std::fs::remove_dir_all(&root).expect("rm root");
    img
}

/// `qemu-img convert` to another format (qcow2, vmdk...).
pub fn qemu_convert(src: &Path, fmt: &str, dst: &Path) {
    let st = Command::new("qemu-img")
        .args(["convert", "-O", fmt])
        .arg(src)
        .arg(dst)
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img convert -O {fmt} failed");
}

/// The guest-image fixtures (FATBOX_FIXTURES, from tests/fixtures/build-guest-images.sh).
pub fn fixtures() -> PathBuf {
    let d = std::env::var_os("FATBOX_FIXTURES").map(PathBuf::from).expect(
        "FATBOX_FIXTURES is not set: FATBOX_FIXTURES=$(bash tests/fixtures/build-guest-images.sh | tail -n1)",
    );
    assert!(d.join("v3.qcow2").is_file(), "{}: no v3.qcow2", d.display());
    d
}

/// A TCP proxy to `target` on 127.0.0.1. With `cut_after` set, the first connection whose
/// response passes that many bytes is dropped (once); `bytes_per_sec` throttles responses.
pub struct Proxy {
    pub endpoint: String,
    pub cuts: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    port: u16,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    pub fn start(target: &str, cut_after: Option<u64>, bytes_per_sec: Option<u64>) -> Proxy {
        let target_port: u16 = target
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("target port");
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        l.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(0));
        let (stop2, cuts2) = (stop.clone(), cuts.clone());
        let thread = std::thread::spawn(move || {
            let cut_done = Arc::new(AtomicBool::new(cut_after.is_none()));
            while !stop2.load(Ordering::Relaxed) {
                let (client, _) = match l.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => break,
                };
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                    continue;
                };
                let (c2, s2) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                // Requests upstream as they are.
                std::thread::spawn(move || {
                    let (mut c2, mut s2) = (c2, s2);
                    let _ = std::io::copy(&mut c2, &mut s2);
                    let _ = s2.shutdown(std::net::Shutdown::Write);
                });
                let (cut_done, cuts, stop3) = (cut_done.clone(), cuts2.clone(), stop2.clone());
                std::thread::spawn(move || {
                    let (mut server, mut client) = (server, client);
                    let mut buf = vec![0u8; 64 << 10];
                    let mut sent: u64 = 0;
                    let start = Instant::now();
                    loop {
                        if stop3.load(Ordering::Relaxed) {
                            break;
                        }
                        let n = match server.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n as u64;
                        if let Some(limit) = cut_after {
                            if sent > limit && !cut_done.swap(true, Ordering::SeqCst) {
                                cuts.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                        }
                        if let Some(bps) = bytes_per_sec {
                            let due = Duration::from_secs_f64(sent as f64 / bps as f64);
                            if let Some(wait) = due.checked_sub(start.elapsed()) {
                                std::thread::sleep(wait);
                            }
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    let _ = server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Proxy {
            endpoint: format!("http://127.0.0.1:{port}"),
            cuts,
            stop,
            port,
            thread: Some(thread),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every entry under `dir` (relative), for "nothing left behind" checks.
pub fn entries(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The real Keystone (PyPI, same venv) on 127.0.0.1: sqlite, fernet tokens, bootstrapped
/// admin (password `ADMIN_PASSWORD`, project admin, region RegionOne); killed on drop.
pub struct Keystone {
    pub url: String,
    pub dir: tempfile::TempDir,
    child: Child,
}

pub const ADMIN_PASSWORD: &str = "fatbox-test-secret";

impl Keystone {
    pub fn start() -> Keystone {
        let venv = venv();
        let dir = tempfile::Builder::new()
            .prefix("keystone-test-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        let conf = d.join("conf");
        for p in [&conf, &d.join("fernet"), &d.join("cred")] {
            std::fs::create_dir_all(p).expect("mkdir");
        }
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}/v3");
        let cfg = format!(
            "[database]\nconnection = sqlite:///{db}\n\
             [token]\nprovider = fernet\nexpiration = 3600\n\
             [fernet_tokens]\nkey_repository = {fernet}\n\
             [fernet_receipts]\nkey_repository = {fernet}\n\
             [credential]\nkey_repository = {cred}\n",
            db = d.join("keystone.sqlite").display(),
            fernet = d.join("fernet").display(),
            cred = d.join("cred").display(),
        );
        let conf_file = conf.join("keystone.conf");
        std::fs::write(&conf_file, cfg).expect("keystone.conf");
        let log = std::fs::File::create(d.join("keystone.log")).expect("log");
        let manage = |args: &[&str]| {
            let st = Command::new(venv.join("bin/keystone-manage"))
                .arg("--config-file")
                .arg(&conf_file)
                .args(args)
                .current_dir(d)
                .stdout(log.try_clone().expect("log"))
                .stderr(log.try_clone().expect("log"))
                .status()
                .expect("keystone-manage");
            assert!(
                st.success(),
                "keystone-manage {args:?} failed: see {}",
                d.display()
            );
        };
        manage(&["db_sync"]);
        manage(&[
            "fernet_setup",
            "--keystone-user",
            "root",
            "--keystone-group",
            "root",
        ]);
        manage(&[
            "credential_setup",
            "--keystone-user",
            "root",
            "--keystone-group",
            "root",
        ]);
        manage(&[
            "bootstrap",
            "--bootstrap-password",
            ADMIN_PASSWORD,
            "--bootstrap-public-url",
            &url,
            "--bootstrap-admin-url",
            &url,
            "--bootstrap-region-id",
            "RegionOne",
        ]);
        // keystone parses sys.argv at import: hide gunicorn's arguments from it.
        std::fs::write(
            d.join("ks_wsgi.py"),
            "import sys\nsys.argv = sys.argv[:1]\nfrom keystone.wsgi.api import application  # noqa\n",
        )
        .expect("wsgi shim");
        let child = Command::new(venv.join("bin/gunicorn"))
            .args(["-b", &format!("127.0.0.1:{port}")])
            .args(["-w", "1", "-k", "gthread", "--threads", "4"])
            .arg("ks_wsgi:application")
            .env("OS_KEYSTONE_CONFIG_DIR", &conf)
            .env("PYTHONPATH", d)
            .current_dir(d)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("gunicorn");
        let k = Keystone { url, dir, child };
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut delay = Duration::from_millis(50);
        loop {
            let ok = Command::new("curl")
                .args(["-sf", "-m", "10", "-o", "/dev/null", &k.url])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Keystone did not come up; log: {}",
                std::fs::read_to_string(k.dir.path().join("keystone.log")).unwrap_or_default()
            );
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(500));
        }
        k
    }

    /// An admin token (curl, independent of the code under test) and the admin user id.
    pub fn admin_token(&self) -> (String, String) {
        let body = format!(
            r#"{{"auth":{{"identity":{{"methods":["password"],"password":{{"user":{{"name":"admin","domain":{{"name":"Default"}},"password":"{ADMIN_PASSWORD}"}}}}}},"scope":{{"project":{{"name":"admin","domain":{{"name":"Default"}}}}}}}}}}"#
        );
        let out = Command::new("curl")
            .args([
                "-sf",
                "-D",
                "-",
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "-d",
            ])
            .arg(&body)
            .arg(format!("{}/auth/tokens", self.url))
            .output()
            .expect("curl");
        assert!(out.status.success(), "admin token");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let token = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("X-Subject-Token: ")
                    .or_else(|| l.strip_prefix("x-subject-token: "))
            })
            .expect("X-Subject-Token")
            .trim()
            .to_string();
        let json_start = text.find("\r\n\r\n").map(|i| i + 4).unwrap_or(0);
        let v: serde_json::Value = serde_json::from_str(&text[json_start..]).expect("json");
        let user = v["token"]["user"]["id"]
            .as_str()
            .expect("user id")
            .to_string();
        (token, user)
    }

    /// POSTs JSON with the admin token; returns the answer.
    pub fn post(&self, token: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
        let out = Command::new("curl")
            .args([
                "-sf",
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "-H",
            ])
            .arg(format!("X-Auth-Token: {token}"))
            .arg("-d")
            .arg(body.to_string())
            .arg(format!("{}{path}", self.url))
            .output()
            .expect("curl");
        assert!(out.status.success(), "POST {path} failed");
        serde_json::from_slice(&out.stdout).expect("json")
    }
}

impl Drop for Keystone {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}
