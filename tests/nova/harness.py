"""A private fatboxd for the Nova driver tests: release binaries from the cargo build, a temp
state dir and socket under /var/tmp, its own cgroup parent, the fixture disk imported under
the Glance ids the tests use. Stopped and cleaned (instances deleted through the API,
daemon killed by pid, cgroup dirs and files removed) at the end even when tests fail.
"""

import atexit
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The Glance ids the tests use: ours, and the one Nova's own test_virt_drivers uses
# (GlanceFixture's image behind nova.tests.unit.utils.get_test_instance).
IMAGE_ID = "5f1d7a8e-6c0e-4d6f-9a53-0c2f6f1e7b11"
NOVA_TEST_IMAGE_ID = "cedef40a-ed67-4d10-800e-17455edce175"
CLOUDINIT_IMAGE_ID = "c1d0c1d0-7e57-4c1d-9a11-0000000c1d00"


def bin_dir():
    d = os.environ.get("FATBOX_BIN_DIR")
    if d:
        return Path(d)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "release"


def fixtures():
    d = os.environ.get("FATBOX_FIXTURES")
    if d:
        return Path(d)
    out = subprocess.run(
        ["bash", str(ROOT / "tests/fixtures/build-guest-images.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


def cloudinit_qcow2():
    """tests/fixtures/build-cloudinit-image.sh's qcow2 (built once, cached)."""
    env = dict(os.environ, FATBOX_FIXTURES=str(fixtures()))
    out = subprocess.run(
        ["bash", str(ROOT / "tests/fixtures/build-cloudinit-image.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ).stdout
    return Path(out.strip().splitlines()[-1])


OVS_LOCK = "/run/fatbox-ovs-harness.lock"
OVS_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


def _run(*args, check=True):
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{args}: {p.returncode}: {p.stderr}")
    return p.stdout


class Ovs:
    """A private ovsdb-server + ovs-vswitchd (userspace netdev datapath) in `dir`, with one
    bridge. The netdev datapath makes a host tap named ovs-netdev, so two vswitchds cannot
    run at once: the same lock file as the Rust harness (driver/tests/ovs_harness)
    serializes them. Started on first use, stopped (exit --cleanup, then kill by pid)."""

    def __init__(self, dir, bridge):
        self.dir = Path(dir)
        self.bridge = bridge
        self.sock = self.dir / "db.sock"
        self.procs = []
        self.extra_bridges = []
        self._lock = None

    @property
    def endpoint(self):
        return f"unix:{self.sock}"

    def running(self):
        return bool(self.procs)

    def _spawn(self, args, log):
        out = open(self.dir / log, "ab")
        env = dict(os.environ, OVS_RUNDIR=str(self.dir), OVS_DBDIR=str(self.dir),
                   OVS_LOGDIR=str(self.dir))
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
        out.close()
        self.procs.append(p)
        return p

    def start(self):
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(OVS_LOCK, "a")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            # A previous run killed hard may have left the datapath tap behind.
            _run("ip", "link", "del", "ovs-netdev", check=False)
            # A fresh database each start (a restart after stop() must not find the old one).
            for f in ("conf.db", ".conf.db.~lock~", "db.sock"):
                (self.dir / f).unlink(missing_ok=True)
            _run("ovsdb-tool", "create", str(self.dir / "conf.db"), OVS_SCHEMA)
            self._spawn(["ovsdb-server", str(self.dir / "conf.db"),
                         f"--remote=punix:{self.sock}",
                         f"--unixctl={self.dir / 'ovsdb.ctl'}", "-vconsole:off",
                         f"--log-file={self.dir / 'ovsdb-server.log'}"], "ovsdb-server.out")
            wait_until(self.sock.exists, 10, "ovsdb socket")
            self.vsctl("--no-wait", "init")
            # As the Rust harness: TCP over veth needs it on the userspace datapath here.
            self.vsctl("--no-wait", "set", "Open_vSwitch", ".",
                       "other_config:userspace-tso-enable=true")
            self._spawn(["ovs-vswitchd", self.endpoint,
                         f"--unixctl={self.dir / 'vswitchd.ctl'}", "-vconsole:off",
                         f"--log-file={self.dir / 'ovs-vswitchd.log'}"], "ovs-vswitchd.out")
            wait_until((self.dir / "vswitchd.ctl").exists, 10, "vswitchd control socket")
            self.vsctl("--timeout=20", "add-br", self.bridge, "--", "set", "bridge",
                       self.bridge, "datapath_type=netdev")
        except Exception:
            self.stop()
            raise

    def vsctl(self, *args):
        return _run("ovs-vsctl", f"--db={self.endpoint}", *args)

    def add_bridge(self, name):
        """Another netdev bridge (its host tap is deleted in stop())."""
        if name not in self.extra_bridges:
            self.extra_bridges.append(name)
        self.vsctl("--timeout=20", "--may-exist", "add-br", name, "--", "set", "bridge",
                   name, "datapath_type=netdev")

    def get(self, table, row, col):
        return self.vsctl("get", table, row, col).strip()

    def ports(self):
        return self.vsctl("list-ports", self.bridge).split()

    def stop(self):
        if self._lock is None:
            # Never started (or stopped already): the datapath tap, if any, is someone else's.
            return
        if len(self.procs) > 1:
            subprocess.run(["timeout", "5", "ovs-appctl", "-t", str(self.dir / "vswitchd.ctl"),
                            "exit", "--cleanup"], capture_output=True)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=5 if p is self.procs[-1] else 0.1)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        for dev in (self.bridge, *self.extra_bridges, "ovs-netdev"):
            _run("ip", "link", "del", dev, check=False)
        self.extra_bridges = []
        if self._lock is not None:
            self._lock.close()
            self._lock = None


class Procfs:
    """A real fatbox-procfs on a private mount and registry (so `nproc`, `free` inside
    follow the flavor), shut down by its own `shutdown` command, then by pid."""

    def __init__(self):
        if not (bin_dir() / "fatbox-procfs").exists() and not os.environ.get("FATBOX_BIN_DIR"):
            # `cargo test -p driver` alone does not build the other package's binary.
            subprocess.run(["cargo", "build", "--release", "-p", "procfs-fuse", "--bin",
                            "fatbox-procfs"], cwd=ROOT, check=True)
        self.dir = Path(tempfile.mkdtemp(prefix="fatbox-nova-procfs-", dir="/run"))
        self.mount = self.dir / "mnt"
        self.registry = self.dir / "registry"
        self.keeper = self.dir / "keeper.sock"
        self.mount.mkdir()
        self.registry.mkdir()
        log = open(self.dir / "procfs.log", "ab")
        self.proc = subprocess.Popen(
            [str(bin_dir() / "fatbox-procfs"), "serve", "--mount", str(self.mount),
             "--registry", str(self.registry), "--keeper-socket", str(self.keeper)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
        log.close()
        try:
            wait_until(lambda: os.path.ismount(self.mount) or self.proc.poll() is not None,
                       30, "fatbox-procfs to mount")
            if self.proc.poll() is not None:
                raise RuntimeError(f"fatbox-procfs exited: {(self.dir / 'procfs.log').read_text()}")
        except Exception:
            self.stop()
            raise

    def stop(self):
        subprocess.run([str(bin_dir() / "fatbox-procfs"), "shutdown", "--mount", str(self.mount),
                        "--keeper-socket", str(self.keeper)], capture_output=True, timeout=30)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if os.path.ismount(self.mount):
            subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


class Fatboxd:
    def __init__(self, extra="", tag=""):
        """`extra`: TOML appended to the config's [glance] section (and further sections);
        `tag`: tells this daemon's cgroup parent from another one in the same process."""
        self.dir = Path(tempfile.mkdtemp(prefix="fatbox-nova-", dir="/var/tmp"))
        self.socket = self.dir / "fatboxd.sock"
        self.state = self.dir / "state"
        self.cgroup_parent = f"fatbox-nova-{os.getpid()}{tag}"
        self.config = self.dir / "fatbox.toml"
        # The OVS starts only when a test needs networking (ovs()): until then nothing
        # connects to this socket, and the host-wide OVS harness lock stays free.
        self.ovs = Ovs(self.dir / "ovs", f"fbn{uuid.uuid4().hex[:8]}")
        try:
            self.procfs = Procfs()
        except Exception:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.config.write_text(
            f'state_dir = "{self.state}"\nsocket = "{self.socket}"\n'
            f'cgroup_parent = "{self.cgroup_parent}"\n'
            f'stop_timeout = {int(os.environ.get("FATBOX_TEST_STOP_TIMEOUT", "20"))}\n'
            f'[procfs]\nmount = "{self.procfs.mount}"\nregistry = "{self.procfs.registry}"\n'
            f'[network]\novsdb = "{self.ovs.endpoint}"\n'
            f'integration_bridge = "{self.ovs.bridge}"\nstandalone = true\n'
            "reconnect_timeout_ms = 5000\n"
            "[glance]\n" + extra
        )
        self.log = open(self.dir / "fatboxd.log", "ab")
        self.proc = subprocess.Popen(
            [str(bin_dir() / "fatboxd"), "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
        )
        deadline = time.monotonic() + 30
        while not self._connectable():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()
                self.procfs.stop()
                self.log.close()
                shutil.rmtree(self.dir, ignore_errors=True)
                raise RuntimeError(f"fatboxd did not come up: {tail}")
            time.sleep(0.01)

    def _connectable(self):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(self.socket))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def log_tail(self, n=4000):
        try:
            return (self.dir / "fatboxd.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def fatbox(self, *args, check=True, timeout=120):
        p = subprocess.run(
            [str(bin_dir() / "fatbox"), "--socket", str(self.socket), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
        )
        if check and p.returncode != 0:
            raise AssertionError(f"fatbox {args}: {p.returncode}: {p.stdout}{p.stderr}")
        return p

    def exec(self, name, cmd):
        return self.fatbox("exec", name, "--", "sh", "-c", cmd).stdout

    def import_image(self, name, path):
        self.fatbox("image", "import", str(path), "--name", name, timeout=600)

    def start_ovs(self):
        """The private OVS behind [network] (idempotent); stop_ovs() releases it."""
        if not self.ovs.running():
            self.ovs.start()
        return self.ovs

    def stop_ovs(self):
        self.ovs.stop()

    def client(self):
        from nova.virt.fatbox import client

        return client.Client(str(self.socket))

    def stop(self):
        try:
            c = self.client()
            for i in c.list() or []:
                try:
                    c.delete(i["uuid"])
                except Exception as e:  # noqa: BLE001 - clean as much as possible
                    print(f"cleanup of {i['uuid']}: {e}")
        except Exception as e:  # noqa: BLE001
            print(f"cleanup: {e}")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.ovs.stop()
        self.procfs.stop()
        for root in Path("/sys/fs/cgroup").iterdir() if Path("/sys/fs/cgroup").is_dir() else []:
            p = root / self.cgroup_parent
            if p.is_dir():
                try:
                    p.rmdir()
                except OSError:
                    pass
        p = Path("/sys/fs/cgroup") / self.cgroup_parent
        if p.is_dir():
            try:
                p.rmdir()
            except OSError:
                pass
        if os.environ.get("FATBOX_KEEP_TEST_DIR"):
            print(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


_daemon = None


def daemon():
    """The shared fatboxd (started on first use, stopped at exit)."""
    global _daemon
    if _daemon is None:
        d = Fatboxd()
        try:
            qcow = fixtures() / "v3.qcow2"
            d.import_image(IMAGE_ID, qcow)
            d.import_image(NOVA_TEST_IMAGE_ID, qcow)
        except Exception:
            d.stop()
            raise
        _daemon = d
        atexit.register(stop_daemon)
    return _daemon


class Glance:
    """A real Glance (PyPI, tests/glance/setup.sh's venv) as the Rust harness starts it
    (image-bridge/tests/common): sqlite database, file store, unauthenticated paste
    pipeline, gunicorn on a free loopback port. Stopped (TERM, then kill, by pid) and its
    dir removed by stop()."""

    def __init__(self):
        out = subprocess.run(["bash", str(ROOT / "tests/glance/setup.sh")], check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        venv = Path(out.strip().splitlines()[-1])
        self.dir = Path(tempfile.mkdtemp(prefix="fatbox-nova-glance-", dir="/var/tmp"))
        self.proc = None
        try:
            self._start(venv)
        except Exception:
            self.stop()
            raise

    def _start(self, venv):
        d = self.dir
        conf, store = d / "conf", d / "store"
        for p in (conf, store, d / "staging", d / "tasks"):
            p.mkdir(parents=True, exist_ok=True)
        shutil.copy(venv / "etc/glance/glance-api-paste.ini", conf / "glance-api-paste.ini")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        # No paste flavor: the unauthenticated pipeline; the legacy policy defaults let that
        # context (no project, no roles) use the API.
        (conf / "glance-api.conf").write_text(
            f"[DEFAULT]\nenabled_backends = fs:file\nworker_self_reference_url = {self.endpoint}\n"
            "image_size_cap = 8589934592\n"
            f"[database]\nconnection = sqlite:///{d / 'glance.sqlite'}\n"
            "[glance_store]\ndefault_backend = fs\n"
            f"[fs]\nfilesystem_store_datadir = {store}/\n"
            f"[os_glance_staging_store]\nfilesystem_store_datadir = {d / 'staging'}/\n"
            f"[os_glance_tasks_store]\nfilesystem_store_datadir = {d / 'tasks'}/\n"
            "[paste_deploy]\nflavor =\n"
            "[oslo_policy]\nenforce_new_defaults = False\nenforce_scope = False\n"
        )
        env = dict(os.environ, OS_GLANCE_CONFIG_DIR=str(conf))
        with open(d / "glance.log", "ab") as log:
            subprocess.run([str(venv / "bin/glance-manage"), "--config-file",
                            str(conf / "glance-api.conf"), "db_sync"], check=True, cwd=d,
                           env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            # Threads: a long image download must not block the show/patch calls.
            self.proc = subprocess.Popen(
                [str(venv / "bin/gunicorn"), "-b", f"127.0.0.1:{port}", "-w", "1",
                 "-k", "gthread", "--threads", "8", "--timeout", "600",
                 "glance.wsgi.api:application"],
                cwd=d, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        wait_until(lambda: self._ready(), 120, f"Glance on {self.endpoint}")

    def _ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"Glance exited: {self.log_tail()}")
        try:
            self.request("GET", "/v2/images")
            return True
        except OSError:
            return False

    def log_tail(self, n=4000):
        try:
            return (self.dir / "glance.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def request(self, method, path, body=None, headers=None, timeout=600):
        """JSON in, JSON out (None for an empty answer); HTTPError on 4xx/5xx."""
        import urllib.request

        headers_ = dict(headers or {})
        if body is not None and not isinstance(body, (bytes, io.IOBase)):
            data = json.dumps(body).encode()
            headers_.setdefault("Content-Type", "application/json")
        else:
            data = body
        req = urllib.request.Request(self.endpoint + path, data=data, method=method,
                                     headers=headers_)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def image(self, image_id):
        return self.request("GET", f"/v2/images/{image_id}")

    def upload(self, path, name, disk_format="qcow2"):
        """Creates an image and uploads `path` into it; returns its id once active."""
        img = self.request("POST", "/v2/images", {
            "name": name, "disk_format": disk_format, "container_format": "bare",
        })
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            self.request("PUT", f"/v2/images/{img['id']}/file", f, headers={
                "Content-Type": "application/octet-stream", "Content-Length": str(size),
            })
        wait_until(lambda: self.image(img["id"])["status"] == "active", 120,
                   f"image {img['id']} active")
        return img["id"]

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            # gunicorn's master stops its workers on TERM.
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if os.environ.get("FATBOX_KEEP_TEST_DIR"):
            print(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


_glance_daemon = None


def glance_daemon():
    """A real Glance with the fixture qcow2 uploaded, and a second fatboxd whose [glance]
    endpoint is that Glance (started on first use by the tests that need them, stopped at
    exit). Returns (fatboxd, glance, fixture image id)."""
    global _glance_daemon
    if _glance_daemon is None:
        g = Glance()
        try:
            image_id = g.upload(fixtures() / "v3.qcow2", "debian-12-fixture")
            d = Fatboxd(extra=f'endpoint = "{g.endpoint}"\n', tag="-glance")
        except Exception:
            g.stop()
            raise
        _glance_daemon = (d, g, image_id)
        atexit.register(stop_glance_daemon)
    return _glance_daemon


def stop_glance_daemon():
    """The daemon first: its instances' deletion does not need Glance, but its cleanup
    must not race a Glance going away under a pull."""
    global _glance_daemon
    if _glance_daemon is not None:
        (d, g, _), _glance_daemon = _glance_daemon, None
        try:
            d.stop()
        finally:
            g.stop()


_cloudinit_imported = False


def daemon_with_cloudinit():
    global _cloudinit_imported
    d = daemon()
    if not _cloudinit_imported:
        d.import_image(CLOUDINIT_IMAGE_ID, cloudinit_qcow2())
        _cloudinit_imported = True
    return d


def stop_daemon():
    global _daemon
    if _daemon is not None:
        d, _daemon = _daemon, None
        d.stop()


def wait_until(fn, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)


def dumps(v):
    return json.dumps(v, indent=1, sort_keys=True, default=str)


def crypt_matches(password, hashed):
    """True when `password` hashes to `hashed` with libc's crypt (libxcrypt: yescrypt,
    sha512crypt, ... whatever the guest's chpasswd chose)."""
    try:
        import crypt  # noqa: F401 - deprecated, gone in Python 3.13

        out = crypt.crypt(password, hashed)
    except ImportError:
        import ctypes
        import ctypes.util

        lib = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so.1")
        lib.crypt.restype = ctypes.c_char_p
        r = lib.crypt(password.encode(), hashed.encode())
        out = r.decode() if r else None
    return out == hashed


class OpsNetns:
    """An operator's seat on the private OVS: a netns of its own whose eth0 is a veth with
    the host end as an access port (`tag`) of `ovs.bridge`. Traffic from it stays inside the
    netns and the OVS; no host interface but the veth it creates is touched. close() removes
    the OVS port, the veth and the netns, whatever part of the setup got done."""

    def __init__(self, ovs, vlan, cidr, mtu=1450):
        tag = uuid.uuid4().hex[:8]
        self.ovs = ovs
        self.ns = f"fatbox-nova-ops-{tag}"
        self.link = f"fbo{tag}"
        self._created = []
        try:
            _run("ip", "netns", "add", self.ns)
            self._created.append("netns")
            _run("ip", "link", "add", self.link, "mtu", str(mtu), "type", "veth", "peer",
                 "name", "eth0", "mtu", str(mtu), "netns", self.ns)
            self._created.append("veth")
            _run("ip", "link", "set", self.link, "up")
            self.run("ip", "link", "set", "lo", "up")
            self.run("ip", "link", "set", "eth0", "up")
            self.run("ip", "addr", "add", cidr, "dev", "eth0")
            self._created.append("port")
            ovs.vsctl("--may-exist", "add-port", ovs.bridge, self.link, f"tag={vlan}")
        except Exception:
            self.close()
            raise

    def run(self, *args, check=True):
        return _run("ip", "netns", "exec", self.ns, *args, check=check)

    def popen_run(self, *args, timeout=30):
        """`args` inside the netns: the CompletedProcess (stdout, stderr, returncode)."""
        return subprocess.run(["ip", "netns", "exec", self.ns, *args], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=timeout)

    def close(self):
        if "port" in self._created and self.ovs.running():
            self.ovs.vsctl("--if-exists", "del-port", self.ovs.bridge, self.link)
        if "veth" in self._created:
            _run("ip", "link", "del", self.link, check=False)
        if "netns" in self._created:
            _run("ip", "netns", "del", self.ns, check=False)
        self._created = []


def ssh_argv(key, user, ip, *cmd):
    """Non-interactive ssh with only `key` (no agent, no known_hosts)."""
    return ["ssh", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "-o", "LogLevel=ERROR",
            f"{user}@{ip}", *cmd]
