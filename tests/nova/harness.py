"""A private fatboxd for the Nova driver tests: release binaries from the cargo build, a temp
state dir and socket under /var/tmp, its own cgroup parent, the fixture disk imported under
the Glance ids the tests use. Stopped and cleaned (instances deleted through the API,
daemon killed by pid, cgroup dirs and files removed) at the end even when tests fail.
"""

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
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


class Fatboxd:
    def __init__(self, extra=""):
        """`extra`: TOML appended to the config (whole sections)."""
        self.dir = Path(tempfile.mkdtemp(prefix="fatbox-nova-", dir="/var/tmp"))
        self.socket = self.dir / "fatboxd.sock"
        self.state = self.dir / "state"
        self.cgroup_parent = f"fatbox-nova-{os.getpid()}"
        self.config = self.dir / "fatbox.toml"
        self.config.write_text(
            f'state_dir = "{self.state}"\nsocket = "{self.socket}"\n'
            f'cgroup_parent = "{self.cgroup_parent}"\nstop_timeout = 20\n'
            "[procfs]\n[network]\n[glance]\n" + extra
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
                raise RuntimeError(f"fatboxd did not come up: {self.log_tail()}")
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
