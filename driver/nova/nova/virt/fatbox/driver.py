"""FatboxDriver: Nova's compute driver for fat containers (systemd as PID 1, used like VMs).

A thin, blocking client of fatboxd (driver/openapi.yaml) over its unix socket. fatboxd owns
every instance (mounts, cgroups, OVS ports, monitor processes); this module only translates
Nova's objects into API requests and fatboxd's answers into Nova's states and exceptions.

Every method takes **kwargs: the driver interface grows arguments between releases
(share_info appeared in 2025.1) and an unknown keyword must not break a compute node.
Operations whose fatboxd route has not landed yet fail with NotImplementedError (Nova's
convention for "this driver cannot"), never by silently doing nothing.
"""

import base64
import json
import os
import platform
import re
import threading
import time

import os_resource_classes as orc
from oslo_log import log as logging
from oslo_utils import versionutils

import nova.conf
from nova.compute import power_state
from nova.compute import task_states
from nova import exception
from nova.objects import diagnostics as diagnostics_obj
from nova.objects import fields as obj_fields
from nova.virt import driver
from nova.virt import event as virtevent
from nova.virt import hardware
from nova.virt.fatbox import client as fbclient
from nova.virt.fatbox import conf as fbconf
from nova.virt.fatbox import vif as fbvif

CONF = nova.conf.CONF
fbconf.register(CONF)
LOG = logging.getLogger(__name__)

FATBOX_VERSION = "0.1.0"
# Nova's HVType has no "fatbox": containers are "lxc" with vm_mode "exe". "hvm" is listed too
# because the images are ordinary VM disks and some carry hw_vm_mode=hvm.
HV_TYPE = obj_fields.HVType.LXC

_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")

_LIFECYCLE = {
    power_state.RUNNING: virtevent.EVENT_LIFECYCLE_STARTED,
    power_state.SHUTDOWN: virtevent.EVENT_LIFECYCLE_STOPPED,
    power_state.CRASHED: virtevent.EVENT_LIFECYCLE_STOPPED,
    power_state.PAUSED: virtevent.EVENT_LIFECYCLE_PAUSED,
    power_state.SUSPENDED: virtevent.EVENT_LIFECYCLE_SUSPENDED,
}


def _unsupported(what, err):
    """True when fatboxd does not know the route or the action (yet)."""
    if isinstance(err, fbclient.NotFound) and "instance" not in (err.message or ""):
        return True
    if err.status in (405, 422):
        return True
    return err.status == 400 and "unknown action" in (err.message or "")


def _not_implemented(what):
    return NotImplementedError(f"fatboxd on this host does not support {what} yet")


class FatboxDriver(driver.ComputeDriver):
    capabilities = dict(
        driver.ComputeDriver.capabilities,
        has_imagecache=True,
        supports_evacuate=False,
        supports_migrate_to_same_host=True,
        supports_attach_interface=True,
        supports_image_type_qcow2=True,
        supports_image_type_raw=True,
    )

    def __init__(self, virtapi, read_only=False, **kwargs):
        super().__init__(virtapi)
        self.client = fbclient.Client(CONF.fatbox.socket, timeout=CONF.fatbox.api_timeout)
        self._poller = None
        self._stop_polling = threading.Event()
        self._last_states = {}

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def fatbox_name(instance):
        """fatboxd names are hostnames (RFC 1123 labels) and unique: Nova's instance name
        (instance-%08x by default) is both; anything else falls back to the uuid."""
        name = (instance.name or "").lower()
        if _NAME_RE.match(name):
            return name
        return "nova-" + instance.uuid

    def _show(self, instance):
        try:
            return self.client.show(instance.uuid)
        except fbclient.NotFound:
            raise exception.InstanceNotFound(instance_id=instance.uuid)

    def _wait_for(self, instance, ok_states, timeout, what):
        """Polls fatboxd until the instance is in one of `ok_states` (fatboxd state names)."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            view = self._show(instance)
            state = view.get("state")
            if state in ok_states:
                return view
            if state == "error":
                raise exception.InstanceDeployFailure(
                    reason=f"{what}: {view.get('reason') or 'fatboxd reports an error'}"
                )
            if time.monotonic() >= deadline:
                raise exception.InstanceDeployFailure(
                    reason=f"{what}: still {state} after {timeout} s"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _action(self, instance, action, what=None, **body):
        try:
            return self.client.action(instance.uuid, action, **body)
        except fbclient.NotFound as e:
            if _unsupported(action, e):
                raise _not_implemented(what or action)
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        except fbclient.FatboxError as e:
            if _unsupported(action, e):
                raise _not_implemented(what or action)
            if isinstance(e, fbclient.Conflict):
                raise exception.InstanceInvalidState(
                    attr="state", instance_uuid=instance.uuid, state=e.message, method=action
                )
            raise exception.NovaException(f"fatboxd {action}: {e.message}")

    def _flavor(self, flavor, image_meta=None):
        root_gb = flavor.root_gb
        if not root_gb:
            size = getattr(image_meta, "size", None) if image_meta is not None else None
            root_gb = CONF.fatbox.default_root_gb
            if size:
                root_gb = max(root_gb, -(-int(size) // (1 << 30)))
        return {
            "vcpus": int(flavor.vcpus),
            "memory_mb": int(flavor.memory_mb),
            "root_gb": int(root_gb),
            "swap_mb": int(flavor.swap or 0),
        }

    @staticmethod
    def _ssh_keys(instance):
        keys = []
        kps = instance.keypairs if "keypairs" in instance else None
        for kp in kps or []:
            if kp.type in (None, "ssh") and kp.public_key:
                keys.extend(k.strip() for k in kp.public_key.splitlines() if k.strip())
        for k in (instance.key_data or "").splitlines():
            if k.strip() and k.strip() not in keys:
                keys.append(k.strip())
        return keys

    @staticmethod
    def _hostname(instance):
        """Nova's instance.hostname (the name is instance-%08x). An FQDN longer than the
        kernel's 64 bytes keeps its first label, as `hostname -s` would show it."""
        h = (instance.hostname if "hostname" in instance else None) or ""
        if len(h) > 64 and "." in h:
            h = h.split(".", 1)[0]
        return h or None

    def _image_ref(self, image_meta):
        return CONF.fatbox.image_template.format(
            image_id=getattr(image_meta, "id", None) or "",
            image_name=getattr(image_meta, "name", None) or "",
        )

    @staticmethod
    def _config_drive_files(context, instance, injected_files, admin_password, network_info):
        """Nova's own config-drive content, path -> base64, for fatboxd to write."""
        from nova.api.metadata import base as instance_metadata

        extra_md = {}
        if admin_password:
            extra_md["admin_pass"] = admin_password
        md = instance_metadata.InstanceMetadata(
            instance, content=injected_files, extra_md=extra_md, network_info=network_info
        )
        files = {}
        for path, data in md.metadata_for_config_drive():
            if isinstance(data, str):
                data = data.encode("utf-8")
            files[path] = base64.b64encode(data).decode("ascii")
        return files

    @staticmethod
    def _neutron_events(network_info):
        return [
            ("network-vif-plugged", vif["id"])
            for vif in network_info or []
            if vif.get("active", True) is False
        ]

    def _neutron_failed_callback(self, event_name, instance):
        LOG.error("Neutron reported failure on event %s", event_name, instance=instance)
        if CONF.vif_plugging_is_fatal:
            raise exception.VirtualInterfaceCreateException()

    # -- host -------------------------------------------------------------------------

    def init_host(self, host, **kwargs):
        try:
            h = self.client.host()
        except fbclient.FatboxError as e:
            raise exception.HypervisorUnavailable(host=f"{host} ({e})")
        LOG.info(
            "fatbox driver: fatboxd at %s, %s vCPUs, %s MiB, %s instances",
            CONF.fatbox.socket,
            h.get("vcpus"),
            h.get("memory_mb"),
            h.get("instances"),
        )
        # fatboxd keeps instances (and their VIFs) across its own and nova-compute's
        # restarts; Nova's _init_instance calls plug_vifs per instance for the rest.
        self._last_states = {i["uuid"]: i.get("power_state") for i in self._list()}
        self._start_event_poller()

    def cleanup_host(self, host, **kwargs):
        self._stop_polling.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
            self._poller = None

    def _start_event_poller(self):
        interval = CONF.fatbox.event_poll_interval
        if not interval or self._poller is not None:
            return
        self._stop_polling.clear()
        t = threading.Thread(target=self._poll_events, args=(interval,), daemon=True,
                             name="fatbox-events")
        self._poller = t
        t.start()

    def _poll_events(self, interval):
        """fatboxd has no event stream yet: diff the power states it reports."""
        while not self._stop_polling.wait(interval):
            try:
                self.poll_events_once()
            except Exception:  # noqa: BLE001 - the poller must survive fatboxd restarts
                LOG.debug("fatbox event poll failed", exc_info=True)

    def poll_events_once(self):
        """One diff of power states -> lifecycle events; returns the events emitted."""
        now = {i["uuid"]: i.get("power_state") for i in self._list()}
        events = []
        for uuid, st in now.items():
            prev = self._last_states.get(uuid)
            if prev == st or st not in _LIFECYCLE:
                continue
            if prev is None and st == power_state.RUNNING:
                # A new instance: spawn reports it, no event needed.
                continue
            transition = _LIFECYCLE[st]
            if st == power_state.RUNNING and prev in (power_state.PAUSED, power_state.SUSPENDED):
                transition = virtevent.EVENT_LIFECYCLE_RESUMED
            ev = virtevent.LifecycleEvent(uuid, transition)
            events.append(ev)
            self.emit_event(ev)
        self._last_states = now
        return events

    def get_available_nodes(self, refresh=False, **kwargs):
        return [CONF.host]

    def get_host_ip_addr(self, **kwargs):
        return CONF.my_ip

    def get_host_uptime(self, **kwargs):
        with open("/proc/uptime") as f:
            secs = float(f.read().split()[0])
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        return f"up {int(secs // 86400)} days {int(secs % 86400 // 3600)}:" \
               f"{int(secs % 3600 // 60):02d}, load average: {', '.join(load)}"

    def get_host_cpu_stats(self, **kwargs):
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, iowait = (int(x) for x in fields[:5])
        ns = 1_000_000_000 // hz
        return {
            "kernel": system * ns,
            "idle": idle * ns,
            "user": (user + nice) * ns,
            "iowait": iowait * ns,
            "frequency": 0,
        }

    @staticmethod
    def _cpu_info(vcpus):
        model, vendor, flags = "unknown", "unknown", []
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    k, v = k.strip(), v.strip()
                    if k == "model name" and model == "unknown":
                        model = v
                    elif k == "vendor_id" and vendor == "unknown":
                        vendor = v
                    elif k == "flags" and not flags:
                        flags = v.split()
        except OSError:
            pass
        return {
            "arch": platform.machine(),
            "model": model,
            "vendor": vendor,
            "features": flags,
            "topology": {"sockets": 1, "cores": vcpus, "threads": 1},
        }

    def get_available_resource(self, nodename, **kwargs):
        h = self.client.host()
        vcpus = int(h["vcpus"])
        disk_gb = int(h["disk_gb"])
        disk_free = int(h.get("disk_available_gb", disk_gb))
        arch = obj_fields.Architecture.canonicalize(platform.machine())
        return {
            "vcpus": vcpus,
            "memory_mb": int(h["memory_mb"]),
            "local_gb": disk_gb,
            "vcpus_used": int(h.get("vcpus_used", 0)),
            "memory_mb_used": int(h.get("memory_mb_used", 0)),
            "local_gb_used": max(disk_gb - disk_free, 0),
            "hypervisor_type": HV_TYPE,
            "hypervisor_version": versionutils.convert_version_to_int(FATBOX_VERSION),
            "hypervisor_hostname": nodename,
            "cpu_info": json.dumps(self._cpu_info(vcpus)),
            "disk_available_least": disk_free,
            "supported_instances": [
                (arch, HV_TYPE, obj_fields.VMMode.EXE),
                (arch, HV_TYPE, obj_fields.VMMode.HVM),
            ],
            "numa_topology": None,
            "pci_passthrough_devices": None,
        }

    def update_provider_tree(self, provider_tree, nodename, allocations=None, **kwargs):
        h = self.client.host()
        vcpus, mem, disk = int(h["vcpus"]), int(h["memory_mb"]), int(h["disk_gb"])
        inv = provider_tree.data(nodename).inventory
        ratios = self._get_allocation_ratios(inv)
        inventory = {
            orc.VCPU: {
                "total": vcpus,
                "min_unit": 1,
                "max_unit": vcpus,
                "step_size": 1,
                "allocation_ratio": ratios[orc.VCPU],
                "reserved": CONF.reserved_host_cpus,
            },
            orc.MEMORY_MB: {
                "total": mem,
                "min_unit": 1,
                "max_unit": mem,
                "step_size": 1,
                "allocation_ratio": ratios[orc.MEMORY_MB],
                "reserved": CONF.reserved_host_memory_mb,
            },
        }
        if disk > 0:
            inventory[orc.DISK_GB] = {
                "total": disk,
                "min_unit": 1,
                "max_unit": disk,
                "step_size": 1,
                "allocation_ratio": ratios[orc.DISK_GB],
                "reserved": self._get_reserved_host_disk_gb_from_config(),
            }
        provider_tree.update_inventory(nodename, inventory)

    def get_volume_connector(self, instance, **kwargs):
        raise _not_implemented("volumes")

    # -- instances --------------------------------------------------------------------

    def _list(self):
        return self.client.list() or []

    def list_instances(self, **kwargs):
        return [i["name"] for i in self._list()]

    def list_instance_uuids(self, **kwargs):
        return [i["uuid"] for i in self._list()]

    def get_num_instances(self, **kwargs):
        return len(self._list())

    def instance_exists(self, instance, **kwargs):
        try:
            self.client.show(instance.uuid)
            return True
        except fbclient.NotFound:
            return False

    def get_info(self, instance, use_cache=True, **kwargs):
        view = self._show(instance)
        return hardware.InstanceInfo(state=view.get("power_state", power_state.NOSTATE))

    def spawn(self, context, instance, image_meta, injected_files, admin_password,
              allocations, network_info=None, block_device_info=None, power_on=True,
              accel_info=None, **kwargs):
        nics = fbvif.network_info_to_nics(network_info)
        spec = {
            "uuid": instance.uuid,
            "name": self.fatbox_name(instance),
            "image": self._image_ref(image_meta),
            "flavor": self._flavor(instance.flavor, image_meta),
            "ssh_keys": self._ssh_keys(instance),
            "nics": nics,
        }
        hostname = self._hostname(instance)
        if hostname:
            spec["hostname"] = hostname
        if CONF.fatbox.config_drive:
            spec["config_drive"] = self._config_drive_files(
                context, instance, injected_files, admin_password, network_info
            )
        timeout = CONF.vif_plugging_timeout
        events = self._neutron_events(network_info) if timeout else []
        try:
            with self.virtapi.wait_for_instance_event(
                instance, events, timeout=timeout, error_callback=self._neutron_failed_callback
            ):
                try:
                    self.client.create(spec)
                except fbclient.FatboxError as e:
                    if e.status == 404:
                        raise exception.ImageNotFound(image_id=spec["image"])
                    raise exception.InstanceDeployFailure(reason=f"fatboxd: {e.message}")
        except exception.InstanceEventTimeout:
            if CONF.vif_plugging_is_fatal:
                self._delete(instance)
                raise exception.VirtualInterfaceCreateException()
        except Exception:
            self._delete(instance)
            raise
        try:
            self._wait_for(instance, ("running",), CONF.fatbox.boot_timeout, "boot")
            if not power_on:
                self._action(instance, "stop", timeout=0)
        except Exception:
            LOG.error("fatbox spawn failed", instance=instance)
            self._delete(instance)
            raise
        LOG.info("Instance spawned (fatbox)", instance=instance)

    def _delete(self, instance):
        try:
            self.client.delete(instance.uuid)
        except fbclient.NotFound:
            pass
        except fbclient.FatboxError as e:
            LOG.warning("fatbox delete failed: %s", e, instance=instance)

    def destroy(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, destroy_secrets=True, **kwargs):
        if instance.task_state == task_states.RESIZE_REVERTING:
            # revert_resize destroys "the destination"; fatbox resizes in place, so that is
            # the instance itself, which finish_revert_migration resizes back and starts.
            LOG.info("destroy during a same-host resize revert: powering off only",
                     instance=instance)
            try:
                self._action(instance, "stop", timeout=0)
            except exception.InstanceNotFound:
                pass
            return
        try:
            self.client.delete(instance.uuid)
        except fbclient.NotFound:
            LOG.debug("destroy: not on this host (already gone)", instance=instance)
        except fbclient.FatboxError as e:
            raise exception.InstanceTerminationFailure(reason=e.message)
        self._last_states.pop(instance.uuid, None)

    def cleanup(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, migrate_data=None, destroy_vifs=True,
                destroy_secrets=True, **kwargs):
        if destroy_disks:
            self._delete(instance)

    def delete_instance_files(self, instance, **kwargs):
        self._delete(instance)
        return True

    def reboot(self, context, instance, network_info, reboot_type, block_device_info=None,
               bad_volumes_callback=None, accel_info=None, **kwargs):
        if reboot_type == "SOFT":
            try:
                self._action(instance, "reboot")
                return
            except exception.InstanceNotFound:
                raise
            except Exception as e:  # noqa: BLE001 - fall back as libvirt does
                LOG.warning("soft reboot failed (%s), trying hard", e, instance=instance)
        self._action(instance, "reboot_hard")

    def power_off(self, instance, timeout=0, retry_interval=0, **kwargs):
        # timeout 0 = hard power-off (Nova's force stop); otherwise a clean shutdown.
        self._action(instance, "stop", timeout=int(timeout or 0))

    def power_on(self, context, instance, network_info, block_device_info=None,
                 accel_info=None, **kwargs):
        self._action(instance, "start")

    def resume_state_on_host_boot(self, context, instance, network_info, share_info=None,
                                  block_device_info=None, **kwargs):
        view = self._show(instance)
        if view.get("state") != "running":
            self._action(instance, "start")

    def pause(self, instance, **kwargs):
        self._action(instance, "pause")

    def unpause(self, instance, **kwargs):
        self._action(instance, "unpause")

    def suspend(self, context, instance, **kwargs):
        self._action(instance, "suspend")

    def resume(self, context, instance, network_info, block_device_info=None, **kwargs):
        self._action(instance, "resume")

    def rescue(self, context, instance, network_info, image_meta, rescue_password,
               block_device_info=None, share_info=None, **kwargs):
        body = {}
        if image_meta is not None and getattr(image_meta, "id", None):
            body["image"] = self._image_ref(image_meta)
        self._action(instance, "rescue", **body)

    def unrescue(self, context, instance, **kwargs):
        # Idempotent like libvirt's: an instance that is not rescued stays as it is.
        if self._show(instance).get("state") != "rescued":
            LOG.debug("unrescue: instance is not rescued", instance=instance)
            return
        self._action(instance, "unrescue")

    def get_console_output(self, context, instance, **kwargs):
        try:
            data = self.client.console(instance.uuid)
        except fbclient.NotFound:
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        # latin-1 maps bytes 1:1, so the manager's encode("latin-1") gets the bytes back.
        return data.decode("latin-1")

    def get_serial_console(self, context, instance, **kwargs):
        # fatboxd opens a TCP port on its `[console] serial_listen` address that relays raw
        # bytes to the console pty: what nova-serialproxy connects to, as with libvirt.
        from nova.console import type as ctype
        try:
            c = self.client.serial_console(instance.uuid)
        except fbclient.NotFound:
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        except fbclient.FatboxError as e:
            if e.status == 501:
                raise exception.ConsoleTypeUnavailable(console_type="serial")
            raise
        return ctype.ConsoleSerial(host=c["host"], port=c["port"])

    @staticmethod
    def _cgroup_files(view, name):
        """Contents of `name` in each of the instance's cgroup dirs that has it (a hybrid
        v1 host lists one dir per controller plus the unified one)."""
        out = []
        for d in view.get("cgroups") or []:
            try:
                with open(os.path.join(d, name)) as f:
                    out.append(f.read())
            except OSError:
                continue
        return out

    def _cpu_ns(self, view):
        for stat in self._cgroup_files(view, "cpu.stat"):
            for line in stat.splitlines():
                k, _, v = line.partition(" ")
                if k == "usage_usec":
                    return int(v) * 1000
        for usage in self._cgroup_files(view, "cpuacct.usage"):
            if usage.strip().isdigit():
                return int(usage)
        return 0

    def _mem_bytes(self, view):
        for name in ("memory.current", "memory.usage_in_bytes"):
            for v in self._cgroup_files(view, name):
                if v.strip().isdigit() and int(v) > 0:
                    return int(v)
        return 0

    def get_diagnostics(self, instance, **kwargs):
        view = self._show(instance)
        return {
            "state": view.get("state"),
            "memory": int(view["flavor"]["memory_mb"]) * 1024,
            "memory-actual": self._mem_bytes(view) // 1024,
            "cpu0_time": self._cpu_ns(view),
        }

    def get_instance_diagnostics(self, instance, **kwargs):
        view = self._show(instance)
        booted = view.get("booted_at")
        uptime = int(time.time() - booted) if booted and view.get("state") == "running" else 0
        # `driver` is a closed enum (libvirt, xenapi, ...) without fatbox: left unset.
        diags = diagnostics_obj.Diagnostics(
            state=power_state.STATE_MAP.get(view.get("power_state"), "pending"),
            hypervisor=HV_TYPE,
            hypervisor_os="linux",
            uptime=uptime,
            config_drive=bool(view.get("config_drive")),
        )
        # The cgroup accounts CPU time for the whole instance, not per vCPU.
        usage = self._cpu_ns(view)
        for i in range(int(view["flavor"]["vcpus"])):
            diags.add_cpu(id=i, time=usage if i == 0 else 0)
        for nic in view.get("nics") or []:
            if isinstance(nic, dict) and nic.get("mac"):
                diags.add_nic(mac_address=nic["mac"])
        diags.memory_details = diagnostics_obj.MemoryDiagnostics(
            maximum=int(view["flavor"]["memory_mb"]), used=self._mem_bytes(view) >> 20
        )
        return diags

    # -- networking -------------------------------------------------------------------

    def _interfaces(self, instance):
        try:
            return self.client.request(
                "GET", f"/v1/instances/{instance.uuid}/interfaces"
            ) or []
        except fbclient.NotFound as e:
            if _unsupported("interfaces", e):
                raise _not_implemented("interfaces")
            raise exception.InstanceNotFound(instance_id=instance.uuid)

    def _attach(self, instance, vif):
        nic = fbvif.vif_to_nic(vif)
        try:
            return self.client.request(
                "POST", f"/v1/instances/{instance.uuid}/interfaces", body={"nic": nic}
            )
        except fbclient.FatboxError as e:
            if _unsupported("attach_interface", e):
                raise _not_implemented("attach_interface")
            if isinstance(e, fbclient.NotFound):
                raise exception.InstanceNotFound(instance_id=instance.uuid)
            LOG.error("attach of port %s failed: %s", vif["id"], e.message, instance=instance)
            raise exception.InterfaceAttachFailed(instance_uuid=instance.uuid)

    def _detach(self, instance, port_id):
        try:
            self.client.request(
                "DELETE", f"/v1/instances/{instance.uuid}/interfaces/{port_id}"
            )
        except fbclient.NotFound:
            pass  # idempotent: already detached (or instance gone)
        except fbclient.FatboxError as e:
            if _unsupported("detach_interface", e):
                raise _not_implemented("detach_interface")
            LOG.error("detach of port %s failed: %s", port_id, e.message, instance=instance)
            raise exception.InterfaceDetachFailed(instance_uuid=instance.uuid)

    def attach_interface(self, context, instance, image_meta, vif, **kwargs):
        self._attach(instance, vif)

    def detach_interface(self, context, instance, vif, **kwargs):
        self._detach(instance, vif["id"])

    def plug_vifs(self, instance, network_info, **kwargs):
        """Makes fatboxd's NICs match network_info (Nova calls this at start per instance)."""
        if not network_info:
            return
        try:
            have = {n.get("port_id") for n in self._interfaces(instance) if isinstance(n, dict)}
        except (NotImplementedError, exception.InstanceNotFound):
            # Before spawn (or without the interfaces route) spawn's create plugs them.
            return
        for vif in network_info:
            if vif["id"] not in have:
                self._attach(instance, vif)

    def unplug_vifs(self, instance, network_info, **kwargs):
        for vif in network_info or []:
            try:
                self._detach(instance, vif["id"])
            except NotImplementedError:
                return

    # -- images, snapshots, resize ----------------------------------------------------

    def cache_image(self, context, image_id, **kwargs):
        ref = CONF.fatbox.image_template.format(image_id=image_id, image_name="")
        for img in self.client.images() or []:
            if img.get("name") == ref or img.get("glance_id") == image_id:
                return False
        try:
            self.client.request("POST", "/v1/images", body={"glance_id": image_id})
        except fbclient.FatboxError as e:
            if e.status in (400, 404, 405, 422):
                raise _not_implemented("image pre-caching from Glance")
            raise
        return True

    def snapshot(self, context, instance, image_id, update_task_state, **kwargs):
        """The instance keeps running: fatboxd freezes its cgroup while it writes the
        overlay upper dir as a layer, then uploads that layer into the queued image the
        compute API created (image bridge), and answers once the image is active."""
        try:
            view = self._show(instance)
        except exception.InstanceNotFound:
            raise exception.InstanceNotRunning(instance_id=instance.uuid)
        if view.get("state") not in ("running", "paused", "shutoff"):
            raise exception.InstanceNotRunning(instance_id=instance.uuid)
        update_task_state(task_state=task_states.IMAGE_PENDING_UPLOAD)
        update_task_state(
            task_state=task_states.IMAGE_UPLOADING,
            expected_state=task_states.IMAGE_PENDING_UPLOAD,
        )
        try:
            self.client.request(
                "POST",
                f"/v1/instances/{instance.uuid}/snapshot",
                body={"image_id": image_id},
            )
        except fbclient.FatboxError as e:
            msg = e.message or ""
            if isinstance(e, fbclient.NotFound) and image_id in msg:
                # The queued image is gone (deleted while we snapshotted, or never
                # created): the compute manager expects ImageNotFound for that and only
                # logs it. The instance is untouched (fatboxd uploads after thawing).
                raise exception.ImageNotFound(image_id=image_id)
            if _unsupported("snapshot", e):
                raise _not_implemented("snapshot")
            if isinstance(e, fbclient.NotFound):
                raise exception.InstanceNotFound(instance_id=instance.uuid)
            raise exception.NovaException(f"fatboxd snapshot: {msg}")

    def set_admin_password(self, instance, new_pass, **kwargs):
        """The guest's own chpasswd sets it (fatboxd pipes it on stdin: no argv, no log)."""
        body = {"password": new_pass}
        try:
            user = instance.image_meta.properties.get("os_admin_user")
        except Exception:  # noqa: BLE001 - no image metadata: the default user
            user = None
        if user:
            body["user"] = user
        try:
            self.client.action(instance.uuid, "set_password", **body)
        except fbclient.FatboxError as e:
            if isinstance(e, fbclient.NotFound) and not _unsupported("set_password", e):
                raise exception.InstanceNotFound(instance_id=instance.uuid)
            if _unsupported("set_password", e):
                # An older fatboxd, or a guest without chpasswd: as libvirt says for a guest
                # without the agent.
                raise exception.SetAdminPasswdNotSupported()
            if isinstance(e, fbclient.Conflict):
                raise exception.InstancePasswordSetFailed(
                    instance=instance.uuid, reason="the instance is not running"
                )
            # fatboxd's message never contains the password (it redacts chpasswd's output).
            raise exception.InstancePasswordSetFailed(instance=instance.uuid, reason=e.message)

    def migrate_disk_and_power_off(self, context, instance, dest, flavor, network_info,
                                   block_device_info=None, timeout=0, retry_interval=0,
                                   **kwargs):
        if dest not in (CONF.host, CONF.my_ip) and dest != self.get_host_ip_addr():
            raise exception.InstanceFaultRollback(
                exception.MigrationPreCheckError(
                    reason="fatbox resizes on the same host only (no cold migration yet)"
                )
            )
        if flavor.root_gb and flavor.root_gb < instance.flavor.root_gb:
            raise exception.InstanceFaultRollback(
                exception.ResizeError(reason="Unable to resize disk down.")
            )
        self._action(instance, "stop", timeout=int(timeout or 0))
        return ""

    def _resize_to(self, instance, flavor):
        f = self._flavor(flavor)
        self._action(instance, "resize", what="resize", **f)

    def finish_migration(self, context, migration, instance, disk_info, network_info,
                         image_meta, resize_instance, allocations, block_device_info=None,
                         power_on=True, **kwargs):
        try:
            if resize_instance:
                self._resize_to(instance, instance.flavor)
        finally:
            # Same host: the instance is still here, powered off; bring it back either way.
            if power_on:
                self._action(instance, "start")

    def confirm_migration(self, context, migration, instance, network_info, **kwargs):
        # Resized in place: no source copy to remove.
        pass

    def finish_revert_migration(self, context, instance, network_info, migration,
                                block_device_info=None, power_on=True, **kwargs):
        view = self._show(instance)
        if view["flavor"]["vcpus"] != instance.flavor.vcpus or \
                view["flavor"]["memory_mb"] != instance.flavor.memory_mb:
            if view.get("state") == "running":
                self._action(instance, "stop", timeout=CONF.shutdown_timeout)
            self._resize_to(instance, instance.flavor)
        if power_on:
            self._action(instance, "start")

    def poll_rebooting_instances(self, timeout, instances, **kwargs):
        pass

    def manage_image_cache(self, context, all_instances, **kwargs):
        # fatboxd keeps image layers while any instance uses them; pruning is its job.
        pass

    def instance_on_disk(self, instance, **kwargs):
        return False
