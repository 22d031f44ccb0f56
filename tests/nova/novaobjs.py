"""Real Nova objects for the driver tests and the benchmark: a TestCase base with Nova's
database (sqlite, Nova's own fixtures), NeutronFixture, a keypair, flavors, instances."""

import base64
import contextlib
import genericpath
import io
import os
import subprocess
import threading
import time

import fixtures
import harness
from nova.compute import power_state
from nova import context as nova_context
from nova import exception
from nova.network import model as network_model
from nova import objects
from nova import test
from nova.tests import fixtures as nova_fixtures
from nova.virt import fake
from nova.virt.fatbox import driver as fbdriver

objects.register_all()
_isdir = genericpath.isdir

USER_DATA = b"#!/bin/sh\necho user-data-ran > /var/tmp/user-data-ran\n"


class RecordingVirtAPI(fake.FakeVirtAPI):
    """FakeVirtAPI that remembers which events spawn waited for."""

    def __init__(self):
        super().__init__()
        self.waited = []

    def wait_for_instance_event(self, instance, event_names, timeout=300, error_callback=None):
        self.waited.append(list(event_names))
        return super().wait_for_instance_event(instance, event_names, timeout, error_callback)


class DeadlineVirtAPI(RecordingVirtAPI):
    """As Nova's ComputeVirtAPI when Neutron never sends the events: after the block, waits
    out the deadline, then raises InstanceEventTimeout."""

    @contextlib.contextmanager
    def wait_for_instance_event(self, instance, event_names, timeout=300, error_callback=None):
        self.waited.append(list(event_names))
        yield
        if event_names:
            threading.Event().wait(timeout)
            raise exception.InstanceEventTimeout()


class DriverTestBase(test.TestCase):
    """Real fatboxd, real guests; each test cleans its instances in cleanups."""

    def setUp(self):
        super().setUp()
        # Nova's unit-test base poisons reads under /sys (its tests must not see the host's
        # hardware); these tests are about this host, and the driver reads instance cgroups.
        self.useFixture(fixtures.MonkeyPatch("builtins.open", io.open))
        self.useFixture(fixtures.MonkeyPatch("os.path.isdir", _isdir))
        self.fb = self._daemon()
        self.flags(socket=str(self.fb.socket), group="fatbox")
        # The tests call poll_events_once themselves; no background thread.
        self.flags(event_poll_interval=0, group="fatbox")
        self.flags(host="fatbox-test")
        self.useFixture(nova_fixtures.NeutronFixture(self))
        self.ctxt = nova_context.RequestContext("fake-user", "fake-project", is_admin=True)
        self.virtapi = RecordingVirtAPI()
        self.driver = fbdriver.FatboxDriver(self.virtapi)
        self.driver.init_host("fatbox-test")
        self.events = []
        self.driver.register_event_listener(self.events.append)
        self.keydir = self.useFixture(fixtures.TempDir()).path
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "nova-test",
             "-f", os.path.join(self.keydir, "id")],
            check=True,
        )
        with open(os.path.join(self.keydir, "id.pub")) as f:
            self.pubkey = f.read().strip()

    def _daemon(self):
        """The fatboxd the driver talks to (a subclass may want another one)."""
        return harness.daemon()

    def _flavor(self, name, vcpus, memory_mb=512, root_gb=2):
        try:
            return objects.Flavor.get_by_name(self.ctxt, name)
        except exception.FlavorNotFound:
            f = objects.Flavor(
                context=self.ctxt, name=name, flavorid=name, vcpus=vcpus,
                memory_mb=memory_mb, root_gb=root_gb, ephemeral_gb=0, swap=0,
                rxtx_factor=1.0, vcpu_weight=None, disabled=False, is_public=True,
                extra_specs={}, description=None,
            )
            f.create()
            return f

    def _instance(self, hostname="vm-one", vcpus=1, image_ref=harness.IMAGE_ID):
        flavor = self._flavor(f"fb.{vcpus}", vcpus)
        kp = objects.KeyPair(
            name="test-key", public_key=self.pubkey, type="ssh", user_id="fake-user"
        )
        inst = objects.Instance(
            context=self.ctxt,
            user_id="fake-user",
            project_id="fake-project",
            image_ref=image_ref,
            hostname=hostname,
            display_name=hostname,
            host="fatbox-test",
            flavor=flavor,
            instance_type_id=flavor.id,
            vcpus=flavor.vcpus,
            memory_mb=flavor.memory_mb,
            root_gb=flavor.root_gb,
            ephemeral_gb=0,
            vm_state="building",
            power_state=power_state.NOSTATE,
            key_name="test-key",
            key_data=self.pubkey,
            keypairs=objects.KeyPairList(objects=[kp]),
            user_data=base64.b64encode(USER_DATA).decode(),
            metadata={"role": "nova-test"},
            system_metadata={},
            availability_zone="nova",
            launch_index=0,
            config_drive="",
        )
        inst.create()
        self.addCleanup(self._destroy_quietly, inst)
        return inst

    def _destroy_quietly(self, inst):
        try:
            self.driver.destroy(self.ctxt, inst, [])
        except Exception as e:  # noqa: BLE001
            print(f"cleanup destroy {inst.uuid}: {e}")

    def _image_meta(self, image_id=harness.IMAGE_ID):
        return objects.ImageMeta.from_dict({
            "id": image_id,
            "name": "debian-12-fixture",
            "disk_format": "qcow2",
            "container_format": "bare",
            "min_disk": 0,
            "min_ram": 0,
            "properties": {"os_distro": "debian", "os_type": "linux"},
        })

    def _state(self, inst):
        return self.driver.get_info(inst).state

    def _spawn(self, inst, network_info=None, image_id=harness.IMAGE_ID):
        t = time.monotonic()
        self.driver.spawn(
            self.ctxt, inst, self._image_meta(image_id), [("/etc/motd-nova", b"injected\n")],
            "s3cret-admin", {}, network_info=network_info or network_model.NetworkInfo([]),
        )
        return time.monotonic() - t
