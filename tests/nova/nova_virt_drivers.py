"""Nova's own driver test case (nova/tests/unit/virt/test_virt_drivers.py, the one the fake
and libvirt drivers run) against FatboxDriver and a real fatboxd. Not part of the gating
suite: it is a report (tests/nova/run-nova-virt-tests.sh), since some of its tests assume
what fatbox does not do (live migration, volumes, VNC/SPICE consoles).

Two variants:
- FatboxConnectionTestCase: Nova's test case unchanged (its instances have one OVS VIF on
  bridge br0: the harness's private OVS gets a br0, so spawn plugs it for real);
- FatboxConnectionNoNetTestCase: the same tests with spawn given no VIF.
Both run with [fatbox] config_drive = False (see setUp).
"""

import io
import warnings

import fixtures
from sqlalchemy import exc as sqla_exc
from nova.network import model as network_model
from nova import test
from nova.tests.unit import utils as test_utils
from nova.tests.unit.virt import test_virt_drivers as tvd
from nova.virt.fatbox import client as fbclient

import harness


class FatboxConnectionTestCase(tvd._VirtDriverTestCase, test.TestCase):
    REQUIRES_LOCKING = True

    def setUp(self):
        self.driver_module = "nova.virt.fatbox.FatboxDriver"
        fb = harness.daemon()
        super().setUp()
        # Nova's WarningsFixture makes SQLAlchemy deprecations errors; nova 34 on the
        # SQLAlchemy 2.1 that pip picks (nothing pins it) trips on its own noload() in
        # Instance.get_by_uuid. Not the driver's business: ignored here.
        warnings.filterwarnings("ignore", category=sqla_exc.SADeprecationWarning)
        # Nova's TestCase poisons reads under /sys; the driver reads the instance's cgroups.
        self.useFixture(fixtures.MonkeyPatch("builtins.open", io.open))
        self.flags(socket=str(fb.socket), event_poll_interval=0, group="fatbox")
        # The driver was built in super().setUp() with the default socket.
        self.connection.client = fbclient.Client(str(fb.socket))
        self.connection.init_host("myhostname")
        self.addCleanup(self._delete_all, fb)
        # nova.tests.unit.utils.get_test_network_info(): one OVS VIF on bridge br0.
        fb.start_ovs().add_bridge("br0")
        # Nova's get_test_instance() rows cannot lazy-load keypairs/EC2 ids the way
        # InstanceMetadata needs, and it would ask a Neutron server for security groups:
        # no metadata drive in this report (tests/nova/test_fatbox_driver.py covers it).
        self.flags(config_drive=False, group="fatbox")

    @classmethod
    def tearDownClass(cls):
        # The OVS harness lock is host-wide (the Rust network tests take it too).
        if harness._daemon is not None:
            harness._daemon.stop_ovs()
        super().tearDownClass()

    @staticmethod
    def _delete_all(fb):
        c = fb.client()
        for i in c.list() or []:
            try:
                c.delete(i["uuid"])
            except fbclient.FatboxError:
                pass


class FatboxConnectionNoNetTestCase(FatboxConnectionTestCase):
    def _get_running_instance(self, obj=True):
        instance_ref = test_utils.get_test_instance(obj=obj)
        image_meta = test_utils.get_test_image_object(None, instance_ref)
        self.connection.spawn(
            self.ctxt, instance_ref, image_meta, [], "herp", {},
            network_info=network_model.NetworkInfo([]),
        )
        return instance_ref, network_model.NetworkInfo([])
