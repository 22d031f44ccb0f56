"""FatboxDriver driven with real Nova objects (nova from PyPI) against a real fatboxd booting
the fixture image. Root (fatboxd makes cgroups, mounts and namespaces).

Nova's own test base (nova.test.TestCase) gives the real Nova database on sqlite, which
InstanceMetadata needs (block device mappings, EC2 ids); Neutron is Nova's NeutronFixture
(security groups for the metadata), since no Neutron server runs here.
"""

import json
import os
import subprocess
import time
import uuid

import harness
from novaobjs import DeadlineVirtAPI, DriverTestBase, USER_DATA
from nova.compute import power_state
from nova.compute import provider_tree
from nova.compute import utils as compute_utils
from nova import context as nova_context
from nova import exception
from nova.network import model as network_model
from nova import objects
from nova.image import glance as nova_glance
from nova import test
from nova import utils as nova_utils
from nova.virt import event as virtevent
from nova.virt.fatbox import driver as fbdriver
from nova.virt.fatbox import vif as fbvif
import os_resource_classes as orc
import os_traits

objects.register_all()


# A port as `openstack port show -f json` / GET /v2.0/ports/{id} returns it after binding.
NEUTRON_PORT = {
    "id": "3b7a8c1e-2d4f-4a6b-9c8d-0e1f2a3b4c5d",
    "name": "",
    "network_id": "9d8c7b6a-5f4e-4d3c-8b2a-1c0d9e8f7a6b",
    "mac_address": "fa:16:3e:4c:2d:91",
    "admin_state_up": True,
    "status": "DOWN",
    "device_owner": "compute:nova",
    "fixed_ips": [
        {"subnet_id": "sub-v4", "ip_address": "10.20.0.15"},
        {"subnet_id": "sub-v4", "ip_address": "10.20.0.16"},
        {"subnet_id": "sub-v6", "ip_address": "fd00:20::f"},
    ],
    "binding:vif_type": "ovs",
    "binding:vnic_type": "normal",
    "binding:vif_details": {
        "port_filter": True,
        "connectivity": "l2",
        "ovs_hybrid_plug": False,
        "datapath_type": "system",
        "bridge_name": "br-int",
        "segmentation_id": 120,
    },
    "binding:profile": {},
}
NEUTRON_NETWORK = {
    "id": "9d8c7b6a-5f4e-4d3c-8b2a-1c0d9e8f7a6b",
    "name": "private",
    "mtu": 1450,
    "provider:network_type": "vlan",
    "provider:segmentation_id": 120,
}
NEUTRON_SUBNETS = {
    "sub-v4": {
        "id": "sub-v4",
        "cidr": "10.20.0.0/24",
        "ip_version": 4,
        "gateway_ip": "10.20.0.1",
        "dns_nameservers": ["10.20.0.2", "9.9.9.9"],
        "host_routes": [{"destination": "10.99.0.0/16", "nexthop": "10.20.0.254"}],
        "enable_dhcp": True,
    },
    "sub-v6": {
        "id": "sub-v6",
        "cidr": "fd00:20::/64",
        "ip_version": 6,
        "gateway_ip": "fd00:20::1",
        "dns_nameservers": [],
        "host_routes": [],
        "enable_dhcp": False,
    },
}


def vif_from_neutron(port, network, subnets):
    """The network model VIF Nova's neutron API builds for a bound port
    (nova.network.neutron.API._build_network_info_model, by hand: no Neutron here)."""
    model_subnets = []
    for sid, s in subnets.items():
        ips = [
            network_model.FixedIP(address=ip["ip_address"])
            for ip in port["fixed_ips"]
            if ip["subnet_id"] == sid
        ]
        sub = network_model.Subnet(
            cidr=s["cidr"],
            gateway=network_model.IP(address=s["gateway_ip"], type="gateway"),
            dns=[network_model.IP(address=d, type="dns") for d in s["dns_nameservers"]],
            ips=ips,
            routes=[
                network_model.Route(
                    cidr=r["destination"],
                    gateway=network_model.IP(address=r["nexthop"], type="gateway"),
                )
                for r in s["host_routes"]
            ],
        )
        if s["enable_dhcp"]:
            sub["meta"]["dhcp_server"] = str(s["cidr"]).rsplit(".", 1)[0] + ".2"
        model_subnets.append(sub)
    net = network_model.Network(
        id=network["id"],
        bridge=port["binding:vif_details"].get("bridge_name", "br-int"),
        label=network["name"],
        subnets=model_subnets,
        meta={"mtu": network["mtu"], "physical_network": "physnet1", "tunneled": False},
    )
    return network_model.VIF(
        id=port["id"],
        address=port["mac_address"],
        network=net,
        type=port["binding:vif_type"],
        details=port["binding:vif_details"],
        devname="tap" + port["id"][:11],
        ovs_interfaceid=port["id"],
        vnic_type=port["binding:vnic_type"],
        active=port["status"] == "ACTIVE",
        profile=port["binding:profile"],
    )


class VifConversionTest(test.NoDBTestCase):
    def test_neutron_port_to_nic(self):
        vif = vif_from_neutron(NEUTRON_PORT, NEUTRON_NETWORK, NEUTRON_SUBNETS)
        nw_info = network_model.NetworkInfo([vif])
        # Through JSON, as Nova stores and hands it over (info_cache).
        nw_info = network_model.NetworkInfo.hydrate(json.loads(nw_info.json()))
        (nic,) = fbvif.network_info_to_nics(nw_info)
        self.assertEqual(NEUTRON_PORT["id"], nic["port_id"])
        self.assertEqual("fa:16:3e:4c:2d:91", nic["mac"])
        self.assertEqual(["10.20.0.15/24", "10.20.0.16/24", "fd00:20::f/64"], nic["ips"])
        self.assertEqual("10.20.0.1", nic["gateway"])
        self.assertEqual("fd00:20::1", nic["gateway6"])
        self.assertEqual(["10.20.0.2", "9.9.9.9"], nic["dns"])
        self.assertEqual(1450, nic["mtu"])
        self.assertEqual(120, nic["vlan"])
        self.assertEqual("br-int", nic["bridge"])
        self.assertFalse(nic["dhcp"])
        self.assertEqual([{"cidr": "10.99.0.0/16", "gateway": "10.20.0.254"}], nic["routes"])
        # Nova waits for the plug event of a DOWN port only.
        self.assertEqual(
            [("network-vif-plugged", NEUTRON_PORT["id"])],
            fbdriver.FatboxDriver._neutron_events(nw_info),
        )

    def test_unsupported_vif_type(self):
        vif = vif_from_neutron(NEUTRON_PORT, NEUTRON_NETWORK, NEUTRON_SUBNETS)
        vif["type"] = "vhostuser"
        self.assertRaises(
            exception.VirtualInterfacePlugException, fbvif.vif_to_nic, vif
        )


class FatboxDriverTest(DriverTestBase):
    """The driver against a real fatboxd, real guests."""

    # -- host ---------------------------------------------------------------------

    def test_available_resource_matches_host(self):
        res = self.driver.get_available_resource("fatbox-test")
        self.assertEqual(len(os.sched_getaffinity(0)), res["vcpus"])
        with open("/proc/meminfo") as f:
            mem_kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
        self.assertEqual(mem_kb // 1024, res["memory_mb"])
        st = os.statvfs(self.fb.state)
        self.assertEqual((st.f_blocks * st.f_frsize) >> 30, res["local_gb"])
        self.assertLessEqual(abs(res["disk_available_least"] - ((st.f_bavail * st.f_frsize) >> 30)), 1)
        self.assertEqual("lxc", res["hypervisor_type"])
        self.assertEqual("fatbox-test", res["hypervisor_hostname"])
        self.assertIsInstance(res["hypervisor_version"], int)
        self.assertIn("arch", json.loads(res["cpu_info"]))
        # The resource tracker copies these into the ComputeNode object: must validate.
        cn = objects.ComputeNode(context=self.ctxt)
        cn.update_from_virt_driver(res)
        self.assertEqual(res["vcpus"], cn.vcpus)
        self.assertTrue(any(s.hv_type == "lxc" for s in cn.supported_hv_specs))

        self.flags(reserved_host_memory_mb=256, reserved_host_cpus=0)
        pt = provider_tree.ProviderTree()
        pt.new_root("fatbox-test", "a9d6f7c0-0000-4000-8000-000000000001")
        self.driver.update_provider_tree(pt, "fatbox-test")
        inv = pt.data("fatbox-test").inventory
        self.assertEqual(res["vcpus"], inv[orc.VCPU]["total"])
        self.assertEqual(res["memory_mb"], inv[orc.MEMORY_MB]["total"])
        self.assertEqual(256, inv[orc.MEMORY_MB]["reserved"])
        self.assertEqual(res["local_gb"], inv[orc.DISK_GB]["total"])
        # initial_*_allocation_ratio defaults: 4.0 / 1.0 / 1.0
        self.assertEqual(4.0, inv[orc.VCPU]["allocation_ratio"])
        self.assertEqual(1.0, inv[orc.MEMORY_MB]["allocation_ratio"])

    def test_capabilities_as_traits(self):
        traits = self.driver.capabilities_as_traits()
        for t in (
            os_traits.COMPUTE_IMAGE_TYPE_QCOW2,
            os_traits.COMPUTE_IMAGE_TYPE_RAW,
            os_traits.COMPUTE_NET_ATTACH_INTERFACE,
            os_traits.COMPUTE_SAME_HOST_COLD_MIGRATE,
        ):
            self.assertTrue(traits[t], t)
        self.assertFalse(traits[os_traits.COMPUTE_IMAGE_TYPE_ISO])
        self.assertTrue(self.driver.capabilities["has_imagecache"])

    # -- lifecycle ----------------------------------------------------------------

    def test_lifecycle(self):
        inst = self._instance()
        self.assertRaises(exception.InstanceNotFound, self.driver.get_info, inst)
        took = self._spawn(inst)
        print(f"spawn -> RUNNING: {took:.2f} s")
        self.assertEqual(power_state.RUNNING, self._state(inst))
        self.assertIn(inst.uuid, self.driver.list_instance_uuids())
        self.assertIn(inst.name, self.driver.list_instances())
        self.assertTrue(self.driver.instance_exists(inst))
        name = fbdriver.FatboxDriver.fatbox_name(inst)
        view = self.fb.client().show(inst.uuid)
        self.assertEqual(
            {"vcpus": 1, "memory_mb": 512, "root_gb": 2, "swap_mb": 0}, view["flavor"]
        )
        # fatboxd's name is Nova's instance name; the guest's hostname is instance.hostname.
        self.assertEqual(inst.name, view["name"])
        self.assertNotEqual("vm-one", inst.name)
        self.assertEqual("vm-one", view["hostname"])
        self.assertEqual("vm-one", self.fb.exec(name, "hostname").strip())
        self.assertEqual("vm-one", self.fb.exec(name, "cat /etc/hostname").strip())

        # Metadata as a config drive, read from inside the guest.
        md = json.loads(self.fb.exec(name, "cat /config-drive/openstack/latest/meta_data.json"))
        self.assertEqual(inst.uuid, md["uuid"])
        self.assertEqual("vm-one", md["hostname"].split(".")[0])
        self.assertEqual(self.pubkey, md["public_keys"]["test-key"].strip())
        self.assertEqual("nova-test", md["meta"]["role"])
        self.assertEqual("s3cret-admin", md.get("admin_pass"))
        ud = self.fb.exec(name, "cat /config-drive/openstack/latest/user_data")
        self.assertEqual(USER_DATA.decode(), ud)
        self.assertIn("latest", self.fb.exec(name, "ls /config-drive/openstack"))
        self.assertIn("network_data.json", self.fb.exec(name, "ls /config-drive/openstack/latest"))
        self.assertIn("ec2", self.fb.exec(name, "ls /config-drive"))
        ro = self.fb.fatbox("exec", name, "--", "touch", "/config-drive/x", check=False)
        self.assertNotEqual(0, ro.returncode, "config drive is writable")
        env = self.fb.exec(name, "tr '\\0' '\\n' < /proc/1/environ")
        self.assertIn("product_name=OpenStack Nova", env.splitlines())
        # The keypair reaches root even without cloud-init (fatboxd writes it).
        self.assertIn(self.pubkey, self.fb.exec(name, "cat /root/.ssh/authorized_keys"))

        out = self.driver.get_console_output(self.ctxt, inst)
        self.assertIsInstance(out, str)
        text = out.encode("latin-1").decode("utf-8", "replace")
        self.assertTrue(
            "Reached target" in text or "Welcome to" in text or "systemd" in text,
            text[-2000:],
        )

        diags = self.driver.get_instance_diagnostics(inst)
        self.assertEqual("running", diags.state)
        self.assertEqual(1, len(diags.cpu_details))
        self.assertEqual(512, diags.memory_details.maximum)
        self.assertGreater(diags.memory_details.used, 0)
        self.assertGreater(diags.cpu_details[0].time, 0)
        self.assertIn("memory", self.driver.get_diagnostics(inst))

        # Power operations, each seen in get_info.
        self.driver.power_off(inst, timeout=30)
        self.assertEqual(power_state.SHUTDOWN, self._state(inst))
        self.driver.power_on(self.ctxt, inst, [])
        self.assertEqual(power_state.RUNNING, self._state(inst))
        pid1 = self.fb.client().show(inst.uuid)["init_pid"]
        self.driver.reboot(self.ctxt, inst, [], "SOFT")
        self.assertEqual(power_state.RUNNING, self._state(inst))
        pid2 = self.fb.client().show(inst.uuid)["init_pid"]
        self.assertNotEqual(pid1, pid2, "soft reboot kept the same init")
        self.driver.reboot(self.ctxt, inst, [], "HARD")
        self.assertEqual(power_state.RUNNING, self._state(inst))
        self.assertNotEqual(pid2, self.fb.client().show(inst.uuid)["init_pid"])
        self.driver.pause(inst)
        self.assertEqual(power_state.PAUSED, self._state(inst))
        self.driver.unpause(inst)
        self.assertEqual(power_state.RUNNING, self._state(inst))
        self.fb.exec(name, "echo kept > /var/tmp/before-suspend")
        pid_before = self.fb.client().show(inst.uuid)["init_pid"]
        self.driver.suspend(self.ctxt, inst)
        self.assertEqual(power_state.SUSPENDED, self._state(inst))
        self.driver.resume(self.ctxt, inst, [])
        self.assertEqual(power_state.RUNNING, self._state(inst))
        self.assertEqual("kept", self.fb.exec(name, "cat /var/tmp/before-suspend").strip())
        # Still the same boot: a suspend is not a reboot.
        self.assertEqual(pid_before, self.fb.client().show(inst.uuid)["init_pid"])

        # A shutdown inside the guest reaches Nova as a lifecycle event.
        self.driver.poll_events_once()
        self.events.clear()
        self.fb.fatbox("exec", name, "--", "systemctl", "poweroff", check=False)

        def stopped():
            self.driver.poll_events_once()
            return [e for e in self.events
                    if e.get_transition() == virtevent.EVENT_LIFECYCLE_STOPPED
                    and e.get_instance_uuid() == inst.uuid]

        harness.wait_until(stopped, 60, "a STOPPED lifecycle event")
        self.assertEqual(power_state.SHUTDOWN, self._state(inst))

        t = time.monotonic()
        self.driver.destroy(self.ctxt, inst, [])
        print(f"destroy: {time.monotonic() - t:.2f} s")
        self.driver.destroy(self.ctxt, inst, [])  # idempotent
        self.assertRaises(exception.InstanceNotFound, self.driver.get_info, inst)
        self.assertFalse(self.driver.instance_exists(inst))
        self.assertNotIn(inst.uuid, self.driver.list_instance_uuids())
        self.assertFalse((self.fb.state / "instances" / inst.uuid).exists())

    def test_cloudinit_user_data_and_keys(self):
        """The cloud-init variant of the fixture: cloud-init picks the config drive at
        /config-drive, runs user_data, installs the keypair for the default user and sets
        the hostname from meta_data."""
        self.fb = harness.daemon_with_cloudinit()
        inst = self._instance(hostname="vm-ci")
        took = self._spawn(inst, image_id=harness.CLOUDINIT_IMAGE_ID)
        print(f"spawn (cloud-init image) -> RUNNING: {took:.2f} s")
        name = fbdriver.FatboxDriver.fatbox_name(inst)

        def ran():
            p = self.fb.fatbox("exec", name, "--", "cat", "/var/tmp/user-data-ran", check=False)
            return p.returncode == 0 and p.stdout.strip() == "user-data-ran"

        harness.wait_until(ran, 180, "user_data to run")
        ds = self.fb.exec(name, "cloud-init query platform 2>/dev/null; cloud-init query subplatform 2>/dev/null")
        print(f"cloud-init datasource: {ds.strip()}")
        self.assertIn("/config-drive", ds)
        self.assertEqual("vm-ci", self.fb.exec(name, "hostname").strip())
        keys = self.fb.exec(name, "cat /home/debian/.ssh/authorized_keys /root/.ssh/authorized_keys 2>/dev/null")
        self.assertIn(self.pubkey.split()[1], keys)

    def _cpu_limit(self, inst):
        """CPUs the instance's cgroup allows (cpu.max on v2, cfs quota on v1)."""
        for d in self.fb.client().show(inst.uuid)["cgroups"]:
            try:
                with open(os.path.join(d, "cpu.max")) as f:
                    quota, period = f.read().split()
                    if quota != "max":
                        return int(quota) / int(period)
            except OSError:
                pass
            try:
                with open(os.path.join(d, "cpu.cfs_quota_us")) as f:
                    quota = int(f.read())
                with open(os.path.join(d, "cpu.cfs_period_us")) as f:
                    period = int(f.read())
                if quota > 0:
                    return quota / period
            except OSError:
                pass
        return None

    def _nproc(self, name):
        return int(self.fb.exec(name, "nproc").strip())

    def test_resize_confirm_and_revert(self):
        """Resize 1 -> 2 vCPUs through Nova's same-host flow (nproc follows: fatbox-procfs
        runs), confirm; then 2 -> 1 reverted as revert_resize + finish_revert_resize do it."""
        inst = self._instance(hostname="vm-resize")
        self._spawn(inst)
        name = fbdriver.FatboxDriver.fatbox_name(inst)
        self.assertEqual(1.0, self._cpu_limit(inst))
        self.assertEqual(1, self._nproc(name))
        self.fb.exec(name, "echo mine > /var/tmp/resize-marker")
        one, two = inst.flavor, self._flavor("fb.2", 2)
        self.driver.migrate_disk_and_power_off(self.ctxt, inst, "fatbox-test", two, [])
        self.assertEqual(power_state.SHUTDOWN, self._state(inst))
        inst.old_flavor, inst.flavor = one, two
        self.driver.finish_migration(self.ctxt, None, inst, "", [], self._image_meta(), True, {})
        self.assertEqual(power_state.RUNNING, self._state(inst))
        self.assertEqual(2, self.fb.client().show(inst.uuid)["flavor"]["vcpus"])
        self.assertEqual(2.0, self._cpu_limit(inst))
        self.assertEqual(2, self._nproc(name))
        self.assertEqual("mine", self.fb.exec(name, "cat /var/tmp/resize-marker").strip())
        self.driver.confirm_migration(self.ctxt, None, inst, [])
        self.assertEqual(power_state.RUNNING, self._state(inst))

        # Revert: a second resize (to 1 vCPU) is reverted. revert_resize first destroys "the destination" (with
        # destroy_disks=True: the driver has no shared-storage check); on the same host that
        # is the instance itself, which must survive for finish_revert_resize.
        self.driver.migrate_disk_and_power_off(self.ctxt, inst, "fatbox-test", one, [])
        inst.old_flavor, inst.flavor = two, one
        self.driver.finish_migration(self.ctxt, None, inst, "", [], self._image_meta(), True, {})
        self.assertEqual(1, self._nproc(name))
        inst.task_state = "resize_reverting"
        inst.flavor = two
        self.driver.destroy(self.ctxt, inst, [], None, True)
        self.assertTrue(self.driver.instance_exists(inst))
        self.assertEqual(power_state.SHUTDOWN, self._state(inst))
        self.driver.finish_revert_migration(self.ctxt, inst, [], None)
        inst.task_state = None
        self.assertEqual(power_state.RUNNING, self._state(inst))
        self.assertEqual(2, self.fb.client().show(inst.uuid)["flavor"]["vcpus"])
        self.assertEqual(2, self._nproc(name))
        self.assertEqual("mine", self.fb.exec(name, "cat /var/tmp/resize-marker").strip())

    def test_rescue_and_snapshot(self):
        """Rescue boots the rescue system with the instance's disk at /mnt/rescue; unrescue
        boots the original disk again. Snapshot: update_task_state in order, guest running."""
        inst = self._instance(hostname="vm-rescue")
        self._spawn(inst)
        name = fbdriver.FatboxDriver.fatbox_name(inst)
        self.fb.exec(name, "echo original > /root/marker")
        pid = self.fb.client().show(inst.uuid)["init_pid"]
        self.driver.rescue(self.ctxt, inst, [], self._image_meta(), "rescue-pw")
        view = self.fb.client().show(inst.uuid)
        self.assertEqual("rescued", view["state"])
        self.assertEqual(power_state.RUNNING, self._state(inst))
        self.assertNotEqual(pid, view["init_pid"])
        # The rescue system runs from its own disk; the instance's is at /mnt/rescue.
        self.assertNotEqual(0, self.fb.fatbox("exec", name, "--", "test", "-e", "/root/marker",
                                              check=False).returncode)
        self.assertEqual("original", self.fb.exec(name, "cat /mnt/rescue/root/marker").strip())
        self.fb.exec(name, "echo repaired > /mnt/rescue/root/repaired; echo junk > /root/junk")
        self.driver.unrescue(self.ctxt, inst)
        view = self.fb.client().show(inst.uuid)
        self.assertEqual("running", view["state"])
        self.assertEqual(power_state.RUNNING, self._state(inst))
        self.assertEqual("original", self.fb.exec(name, "cat /root/marker").strip())
        self.assertEqual("repaired", self.fb.exec(name, "cat /root/repaired").strip())
        self.assertNotEqual(0, self.fb.fatbox("exec", name, "--", "test", "-e", "/root/junk",
                                              check=False).returncode)
        self.assertNotEqual(0, self.fb.fatbox("exec", name, "--", "test", "-e",
                                              "/mnt/rescue/root/marker", check=False).returncode)

        # This daemon has no Glance and the image is a local import: fatboxd refuses (409,
        # snapshots need a Glance-backed image; GlanceSnapshotTest covers the real one), the
        # driver says so in a NovaException, and the guest is untouched.
        calls = []
        pid = self.fb.client().show(inst.uuid)["init_pid"]
        with self.assertRaisesRegex(exception.NovaException, "Glance"):
            self.driver.snapshot(
                self.ctxt, inst, "0a1b2c3d-0000-4000-8000-00000000beef",
                lambda **kw: calls.append(kw),
            )
        self.assertEqual(["image_pending_upload", "image_uploading"],
                         [c["task_state"] for c in calls])
        self.assertEqual(power_state.RUNNING, self._state(inst), "snapshot stopped the guest")
        self.assertEqual(pid, self.fb.client().show(inst.uuid)["init_pid"])
        # test_serial_console.py covers it; here: it answers for a resized instance too.
        self.assertIsInstance(self.driver.get_serial_console(self.ctxt, inst).port, int)

    def _root_hash(self, name):
        line = self.fb.exec(name, "grep '^root:' /etc/shadow").strip()
        return line.split(":")[1]

    def test_set_admin_password(self):
        inst = self._instance(hostname="vm-pw")
        self._spawn(inst)
        name = fbdriver.FatboxDriver.fatbox_name(inst)
        before = self._root_hash(name)
        pw = "N3w-adm1n:pass word"
        self.driver.set_admin_password(inst, pw)
        after = self._root_hash(name)
        self.assertNotEqual(before, after)
        self.assertTrue(after.startswith("$"), after)
        self.assertTrue(harness.crypt_matches(pw, after), f"{after} does not verify")
        self.assertFalse(harness.crypt_matches("wrong", after))
        self.assertNotIn(pw, self.fb.log_tail(10_000_000), "password in fatboxd's log")

        # A guest that cannot (no chpasswd): SetAdminPasswdNotSupported, as libvirt says
        # for a guest without its agent; nothing changed.
        self.fb.exec(name, "mv /usr/sbin/chpasswd /usr/sbin/chpasswd.off")
        self.assertRaises(exception.SetAdminPasswdNotSupported,
                          self.driver.set_admin_password, inst, "other-pass")
        self.fb.exec(name, "mv /usr/sbin/chpasswd.off /usr/sbin/chpasswd")
        self.assertEqual(after, self._root_hash(name))
        # An unknown user (os_admin_user): chpasswd fails inside -> InstancePasswordSetFailed.
        inst.system_metadata["image_os_admin_user"] = "nosuchuser"
        self.assertRaises(exception.InstancePasswordSetFailed,
                          self.driver.set_admin_password, inst, "other-pass")
        del inst.system_metadata["image_os_admin_user"]
        # Not running.
        self.driver.power_off(inst, timeout=0)
        self.assertRaises(exception.InstancePasswordSetFailed,
                          self.driver.set_admin_password, inst, "other-pass")

    def test_spawn_failures_leave_nothing(self):
        inst = self._instance(hostname="vm-bad")
        meta = self._image_meta()
        meta.id = "00000000-0000-4000-8000-00000000dead"
        self.assertRaises(
            exception.ImageNotFound, self.driver.spawn, self.ctxt, inst, meta, [], None, {},
            network_info=network_model.NetworkInfo([]),
        )
        self.assertFalse(self.driver.instance_exists(inst))


def neutron_port(port_id, mac, ip, status="ACTIVE", vlan=120, mtu=1450, bridge="br-int",
                 net="10.20.0"):
    """A bound port, its network and subnet as Neutron's API returns them."""
    port = dict(NEUTRON_PORT, id=port_id, mac_address=mac, status=status,
                network_id=f"net-{vlan}",
                fixed_ips=[{"subnet_id": f"sub-{vlan}", "ip_address": ip}])
    port["binding:vif_details"] = dict(NEUTRON_PORT["binding:vif_details"],
                                       bridge_name=bridge, segmentation_id=vlan)
    network = dict(NEUTRON_NETWORK, id=f"net-{vlan}", name=f"net{vlan}", mtu=mtu,
                   **{"provider:segmentation_id": vlan})
    subnets = {f"sub-{vlan}": dict(NEUTRON_SUBNETS["sub-v4"], id=f"sub-{vlan}",
                                   cidr=f"{net}.0/24", gateway_ip=f"{net}.1",
                                   dns_nameservers=[], host_routes=[])}
    vif = vif_from_neutron(port, network, subnets)
    # Through JSON, as Nova stores it (instance_info_cache) and hands it to the driver.
    return network_model.NetworkInfo.hydrate(json.loads(network_model.NetworkInfo([vif]).json()))[0]


class FatboxNetworkTest(DriverTestBase):
    """Neutron-style VIFs on a private OVS (userspace datapath) behind fatboxd."""

    PORT0 = "0b6f3c2a-91d4-4e5b-8c7a-2f1e0d9c8b70"
    PORT1 = "7d41e9b5-36a8-4c2f-9e1b-5a4d3c2b1a01"

    @classmethod
    def tearDownClass(cls):
        # The OVS harness lock is host-wide (the Rust network tests take it too).
        if harness._daemon is not None:
            harness._daemon.stop_ovs()
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        self.ovs = self.fb.start_ovs()
        self.flags(vif_plugging_timeout=300)

    def _ovs_iface(self, port_id):
        return self.ovs.vsctl("--bare", "--columns=name", "find", "Interface",
                              f"external_ids:iface-id={port_id}").strip()

    def _ext(self, iface, key):
        return self.ovs.get("Interface", iface, f"external_ids:{key}").strip('"')

    def _guest_link(self, name, dev):
        p = self.fb.fatbox("exec", name, "--", "cat", f"/sys/class/net/{dev}/address",
                           f"/sys/class/net/{dev}/mtu", check=False)
        return p.stdout.split() if p.returncode == 0 else None

    def test_attach_detach_interface(self):
        inst = self._instance(hostname="vm-net")
        eth0 = neutron_port(self.PORT0, "fa:16:3e:00:00:e0", "10.20.0.10",
                            bridge=self.ovs.bridge)
        self._spawn(inst, network_model.NetworkInfo([eth0]))
        self.assertEqual(power_state.RUNNING, self._state(inst))
        # An ACTIVE port: nothing to wait for.
        self.assertEqual([[]], self.virtapi.waited)
        name = fbdriver.FatboxDriver.fatbox_name(inst)
        self.assertEqual(["fa:16:3e:00:00:e0", "1450"], self._guest_link(name, "eth0"))

        eth1 = neutron_port(self.PORT1, "fa:16:3e:00:00:e1", "10.30.0.11", vlan=121,
                            mtu=1400, bridge=self.ovs.bridge, net="10.30.0")
        self.driver.attach_interface(self.ctxt, inst, self._image_meta(), eth1)
        link = harness.wait_until(lambda: self._guest_link(name, "eth1"), 30, "eth1 in the guest")
        self.assertEqual(["fa:16:3e:00:00:e1", "1400"], link)
        iface = self._ovs_iface(self.PORT1)
        self.assertTrue(iface, "no OVS interface with the port's iface-id")
        self.assertEqual("fa:16:3e:00:00:e1", self._ext(iface, "attached-mac"))
        self.assertEqual(inst.uuid, self._ext(iface, "vm-uuid"))
        self.assertEqual("121", self.ovs.get("Port", iface, "tag"))
        self.assertEqual("120", self.ovs.get("Port", self._ovs_iface(self.PORT0), "tag"))
        self.assertIn(iface, self.ovs.ports())
        # The guest got the port's address too.
        addrs = self.fb.exec(name, "ip -o addr show dev eth1 2>/dev/null || true")
        print(f"eth1 addresses: {addrs.strip()}")

        self.driver.detach_interface(self.ctxt, inst, eth1)
        harness.wait_until(lambda: self._guest_link(name, "eth1") is None, 30,
                           "eth1 to leave the guest")
        self.assertEqual("", self._ovs_iface(self.PORT1))
        self.assertNotIn(iface, self.ovs.ports())
        self.assertEqual(["fa:16:3e:00:00:e0", "1450"], self._guest_link(name, "eth0"))
        self.driver.detach_interface(self.ctxt, inst, eth1)  # idempotent

        self.driver.destroy(self.ctxt, inst, [eth0])
        self.assertEqual("", self._ovs_iface(self.PORT0))

    def test_spawn_waits_for_vif_plugged(self):
        """Nova waits for network-vif-plugged of the ports Neutron has not made ACTIVE."""
        inst = self._instance(hostname="vm-wait")
        up = neutron_port(self.PORT0, "fa:16:3e:00:01:e0", "10.20.0.20",
                          bridge=self.ovs.bridge)
        down = neutron_port(self.PORT1, "fa:16:3e:00:01:e1", "10.30.0.21", status="DOWN",
                            vlan=121, bridge=self.ovs.bridge, net="10.30.0")
        self._spawn(inst, network_model.NetworkInfo([up, down]))
        self.assertEqual([[("network-vif-plugged", self.PORT1)]], self.virtapi.waited)
        self.assertEqual(power_state.RUNNING, self._state(inst))
        self.assertTrue(self._ovs_iface(self.PORT0))
        self.assertTrue(self._ovs_iface(self.PORT1))

    def test_vif_plugging_deadline_cleans_up(self):
        """No event before vif_plugging_timeout and vif_plugging_is_fatal: spawn fails with
        VirtualInterfaceCreateException and leaves no instance, port or state behind."""
        self.flags(vif_plugging_timeout=2, vif_plugging_is_fatal=True)
        self.driver.virtapi = DeadlineVirtAPI()
        inst = self._instance(hostname="vm-late")
        down = neutron_port(self.PORT1, "fa:16:3e:00:02:e1", "10.30.0.31", status="DOWN",
                            vlan=121, bridge=self.ovs.bridge, net="10.30.0")
        self.assertRaises(exception.VirtualInterfaceCreateException, self._spawn, inst,
                          network_model.NetworkInfo([down]))
        self.assertEqual([[("network-vif-plugged", self.PORT1)]], self.driver.virtapi.waited)
        self.assertFalse(self.driver.instance_exists(inst))
        self.assertEqual("", self._ovs_iface(self.PORT1))
        self.assertFalse((self.fb.state / "instances" / inst.uuid).exists())

    def test_cloudinit_ssh_with_keypair(self):
        """Issue 8 acceptance: a cloud-init guest on a Neutron VIF (static IPv4, VLAN 130)
        lets the keypair from meta_data in over ssh, from a netns on the same VLAN; another
        key is refused."""
        self.fb = harness.daemon_with_cloudinit()
        inst = self._instance(hostname="vm-ssh")
        # A static subnet (no DHCP): the guest's address comes from the port alone.
        vif = vif_from_neutron(
            dict(NEUTRON_PORT, id=self.PORT0, mac_address="fa:16:3e:00:05:e0", status="ACTIVE",
                 network_id="net-130",
                 fixed_ips=[{"subnet_id": "sub-130", "ip_address": "10.50.0.10"}],
                 **{"binding:vif_details": dict(NEUTRON_PORT["binding:vif_details"],
                                                bridge_name=self.ovs.bridge,
                                                segmentation_id=130)}),
            dict(NEUTRON_NETWORK, id="net-130", name="net130",
                 **{"provider:segmentation_id": 130}),
            {"sub-130": dict(NEUTRON_SUBNETS["sub-v4"], id="sub-130", cidr="10.50.0.0/24",
                             gateway_ip="10.50.0.1", dns_nameservers=[], host_routes=[],
                             enable_dhcp=False)},
        )
        nw_info = network_model.NetworkInfo.hydrate(
            json.loads(network_model.NetworkInfo([vif]).json()))
        t0 = time.monotonic()
        took = self._spawn(inst, nw_info, image_id=harness.CLOUDINIT_IMAGE_ID)
        print(f"spawn (cloud-init image, 1 VIF) -> RUNNING: {took:.2f} s")
        self.addCleanup(self._destroy_quietly_nw, inst, nw_info)
        self.assertEqual("130", self.ovs.get("Port", self._ovs_iface(self.PORT0), "tag"))

        ops = harness.OpsNetns(self.ovs, vlan=130, cidr="10.50.0.1/24")
        self.addCleanup(ops.close)
        key = os.path.join(self.keydir, "id")
        user = "debian"  # cloud-init's default user on Debian; the key is for it

        def answered():
            p = ops.popen_run(*harness.ssh_argv(key, user, "10.50.0.10", "hostname"))
            return p if p.returncode == 0 else None

        p = harness.wait_until(answered, 240, "sshd to let the keypair in", interval=0.5)
        print(f"spawn -> ssh {user}@10.50.0.10 answers: {time.monotonic() - t0:.2f} s")
        self.assertEqual("vm-ssh", p.stdout.strip())
        # cloud-init put the key there (not fatboxd, which writes root's only).
        keys = self.fb.exec(fbdriver.FatboxDriver.fatbox_name(inst),
                            f"cat /home/{user}/.ssh/authorized_keys")
        self.assertIn(self.pubkey.split()[1], keys)

        wrong = os.path.join(self.keydir, "wrong")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "wrong",
                        "-f", wrong], check=True)
        for u in (user, "root"):
            p = ops.popen_run(*harness.ssh_argv(wrong, u, "10.50.0.10", "hostname"))
            self.assertEqual(255, p.returncode, f"{u}: {p.stdout}{p.stderr}")
            self.assertIn("Permission denied", p.stderr, u)
            self.assertNotIn("vm-ssh", p.stdout)

    def _destroy_quietly_nw(self, inst, nw_info):
        try:
            self.driver.destroy(self.ctxt, inst, nw_info)
        except Exception as e:  # noqa: BLE001
            print(f"cleanup destroy {inst.uuid}: {e}")

class GlanceSnapshotTest(DriverTestBase):
    """Nova's snapshot against a real Glance (PyPI): the fixture qcow2 in that Glance, a
    fatboxd whose [glance] endpoint is it, and Nova's own image API (nova.image.glance) for
    every Glance call the compute service makes: reading the image at spawn, creating the
    queued snapshot image (compute_utils.create_image, as the compute API does), showing it.
    """

    def _daemon(self):
        self.fb_glance = harness.glance_daemon()
        return self.fb_glance[0]

    def setUp(self):
        super().setUp()
        _, self.glance, self.base_id = self.fb_glance
        self.flags(api_servers=[self.glance.endpoint], group="glance")
        # Nova's Glance client (keystoneauth) refuses to send without a token; this Glance
        # runs the unauthenticated pipeline and ignores it.
        self.ctxt = nova_context.RequestContext("fake-user", "fake-project", is_admin=True,
                                                auth_token="unused")
        self.image_api = nova_glance.API()

    def _image_meta(self, image_id=None):
        return objects.ImageMeta.from_dict(self.image_api.get(self.ctxt, image_id or self.base_id))

    def _glance_instance(self, hostname, image_id):
        inst = self._instance(hostname=hostname, image_ref=image_id)
        # What the compute API records at boot, and create_image copies into the snapshot.
        sm = nova_utils.get_system_metadata_from_image(
            self.image_api.get(self.ctxt, image_id), inst.flavor)
        sm.setdefault("image_base_image_ref", inst.image_ref)
        inst.system_metadata = sm
        inst.save()
        self._spawn(inst, image_id=image_id)
        self.assertEqual(power_state.RUNNING, self._state(inst))
        return inst

    def test_snapshot_running_instance_into_glance_and_boot_it(self):
        inst = self._glance_instance("vm-snap", self.base_id)
        name = fbdriver.FatboxDriver.fatbox_name(inst)
        self.fb.exec(name, "echo nova-snapshot-payload > /root/nova-snap && sync")
        pid = self.fb.client().show(inst.uuid)["init_pid"]

        snap = compute_utils.create_image(self.ctxt, inst, "vm-snap-1", "snapshot",
                                          self.image_api)
        self.assertEqual("queued", snap["status"])
        calls = []

        def update_task_state(task_state, expected_state=None):
            calls.append((task_state, expected_state))

        t = time.monotonic()
        self.driver.snapshot(self.ctxt, inst, snap["id"], update_task_state)
        print(f"driver.snapshot: {time.monotonic() - t:.2f}s")
        self.assertEqual([("image_pending_upload", None),
                          ("image_uploading", "image_pending_upload")], calls)

        img = self.glance.image(snap["id"])
        self.assertEqual("active", img["status"], harness.dumps(img))
        self.assertEqual("vm-snap-1", img["name"])
        self.assertEqual(self.base_id, img["fatbox_parent"])
        self.assertEqual(inst.uuid, img["instance_uuid"])
        self.assertEqual("snapshot", img["image_type"])
        self.assertEqual(self.base_id, img["base_image_ref"])
        self.assertEqual("private", img["visibility"])
        self.assertEqual(("raw", "compressed"), (img["disk_format"], img["container_format"]))
        self.assertTrue(img["fatbox_layers"].endswith(img["fatbox_layer_digest"]))
        # The upload is the change, not the 730 MiB image.
        self.assertLess(img["size"], 8 << 20)
        self.assertEqual("active", self.image_api.get(self.ctxt, snap["id"])["status"])

        # The guest kept running through it: same init, answering.
        view = self.fb.client().show(inst.uuid)
        self.assertEqual("running", view["state"])
        self.assertEqual(pid, view["init_pid"], "snapshot restarted init")
        self.assertEqual(power_state.RUNNING, self._state(inst))
        self.assertEqual("alive", self.fb.exec(name, "echo alive").strip())

        # Nova boots the snapshot like any image: the file is there, the identity is new.
        inst2 = self._glance_instance("vm-from-snap", snap["id"])
        name2 = fbdriver.FatboxDriver.fatbox_name(inst2)
        self.assertEqual("nova-snapshot-payload", self.fb.exec(name2, "cat /root/nova-snap").strip())
        self.assertEqual("vm-from-snap", self.fb.exec(name2, "cat /etc/hostname").strip())
        self.assertEqual(snap["id"], self.fb.client().show(inst2.uuid)["image"])

    def test_snapshot_errors_keep_the_instance_running(self):
        inst = self._glance_instance("vm-snap-err", self.base_id)
        name = fbdriver.FatboxDriver.fatbox_name(inst)
        pid = self.fb.client().show(inst.uuid)["init_pid"]

        # The queued image is gone (deleted by the user meanwhile): ImageNotFound, which the
        # compute manager expects for that case.
        missing = str(uuid.uuid4())
        calls = []
        with self.assertRaises(exception.ImageNotFound) as cm:
            self.driver.snapshot(self.ctxt, inst, missing, lambda **kw: calls.append(kw))
        self.assertIn(missing, str(cm.exception))
        self.assertEqual(["image_pending_upload", "image_uploading"],
                         [c["task_state"] for c in calls])

        # An image that is not queued (here: the active base) is not overwritten.
        before = self.glance.image(self.base_id)
        with self.assertRaisesRegex(exception.NovaException, "queued"):
            self.driver.snapshot(self.ctxt, inst, self.base_id, lambda **kw: None)
        after = self.glance.image(self.base_id)
        self.assertEqual((before["checksum"], before["disk_format"], before["updated_at"]),
                         (after["checksum"], after["disk_format"], after["updated_at"]))

        view = self.fb.client().show(inst.uuid)
        self.assertEqual("running", view["state"])
        self.assertEqual(pid, view["init_pid"])
        self.assertEqual("alive", self.fb.exec(name, "echo alive").strip())
