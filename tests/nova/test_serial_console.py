"""get_serial_console for nova-serialproxy, with real Nova objects against a real fatboxd
booting the fixture image (root): the ConsoleSerial Nova gets names a TCP port that carries
the guest's console (its getty answers), the same port on every call, gone after destroy;
a host with serial consoles disabled makes the driver raise ConsoleTypeUnavailable.
"""

import socket
import time

import harness
from novaobjs import DriverTestBase
from nova.compute import power_state
from nova.console import type as ctype
from nova import exception
from nova import objects
from nova.virt.fatbox import driver as fbdriver

objects.register_all()


def read_until(sock, needle, timeout):
    """Sends CR now and then (the getty may be starting) and reads until `needle`."""
    sock.settimeout(1.0)
    deadline = time.monotonic() + timeout
    seen = b""
    while needle not in seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {needle!r} on the serial console: {seen[-500:]!r}")
        sock.sendall(b"\r")
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        if not chunk:
            raise AssertionError(f"serial console closed: {seen[-500:]!r}")
        seen += chunk
    return seen


class TestSerialConsole(DriverTestBase):
    def test_serial_console(self):
        inst = self._instance(hostname="vm-serial")
        self._spawn(inst)
        self.assertEqual(power_state.RUNNING, self._state(inst))

        c = self.driver.get_serial_console(self.ctxt, inst)
        self.assertIsInstance(c, ctype.ConsoleSerial)
        self.assertEqual("127.0.0.1", c.host)
        # What nova-serialproxy does: a plain TCP connection to host:port.
        with socket.create_connection((c.host, c.port), timeout=10) as s:
            read_until(s, b"login:", 60)
        self.assertEqual(c.port, self.driver.get_serial_console(self.ctxt, inst).port)

        self.driver.destroy(self.ctxt, inst, [])
        self.assertRaises(exception.InstanceNotFound,
                          self.driver.get_serial_console, self.ctxt, inst)

        def refused():
            try:
                socket.create_connection((c.host, c.port), timeout=2).close()
                return False
            except ConnectionRefusedError:
                return True

        harness.wait_until(refused, 10, "the serial port released by destroy")

    def test_serial_console_disabled(self):
        fb = harness.Fatboxd(extra="[console]\nserial_enabled = false\n")
        try:
            self.flags(socket=str(fb.socket), group="fatbox")
            drv = fbdriver.FatboxDriver(self.virtapi)
            inst = objects.Instance(uuid="5e71a1c0-0000-4000-8000-000000000501")
            self.assertRaises(exception.ConsoleTypeUnavailable,
                              drv.get_serial_console, self.ctxt, inst)
        finally:
            fb.stop()
