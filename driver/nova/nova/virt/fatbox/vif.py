"""Nova's VIF model (network_info) -> fatboxd's NIC objects (driver/src/network/spec.rs).

Every fixed IP of every subnet is kept (nova-docker configured only the first one), IPv6
included; fatboxd writes them as static guest config, which works whether or not the
network has a DHCP agent the guest can reach.
"""

import ipaddress

from nova import exception

# What os-vif's ovs plugin handles; fatboxd plugs the same kind of OVS port.
SUPPORTED_VIF_TYPES = ("ovs",)


def _vlan(vif):
    details = vif.get("details") or {}
    meta = (vif.get("network") or {}).get("meta") or {}
    for v in (
        details.get("vlan"),
        details.get("segmentation_id"),
        meta.get("vlan"),
        meta.get("segmentation_id"),
    ):
        if v in (None, ""):
            continue
        try:
            n = int(v)
        except (TypeError, ValueError):
            continue
        if 1 <= n <= 4094:
            return n
    return None


def vif_to_nic(vif):
    """One Nova VIF (network model dict) -> the create/attach request's NIC object."""
    vif_type = vif.get("type")
    if vif_type not in SUPPORTED_VIF_TYPES:
        raise exception.VirtualInterfacePlugException(
            f"fatbox plugs vif_type {', '.join(SUPPORTED_VIF_TYPES)}, port {vif.get('id')} "
            f"is {vif_type!r}"
        )
    network = vif.get("network") or {}
    details = vif.get("details") or {}
    ips, dns, gw4, gw6, routes = [], [], None, None, []
    dhcp_only = False
    for subnet in network.get("subnets") or []:
        cidr = subnet.get("cidr")
        if not cidr:
            continue
        net = ipaddress.ip_network(cidr, strict=False)
        fixed = [ip for ip in subnet.get("ips") or [] if ip.get("type", "fixed") == "fixed"]
        for ip in fixed:
            ips.append(f"{ip['address']}/{net.prefixlen}")
        gw = (subnet.get("gateway") or {}).get("address")
        if gw and fixed:
            if net.version == 4 and gw4 is None:
                gw4 = gw
            elif net.version == 6 and gw6 is None:
                gw6 = gw
        for d in subnet.get("dns") or []:
            a = d.get("address")
            if a and a not in dns:
                dns.append(a)
        for r in subnet.get("routes") or []:
            dest = r.get("cidr")
            via = (r.get("gateway") or {}).get("address")
            if dest and via:
                routes.append({"cidr": dest, "gateway": via})
        if not fixed and (subnet.get("meta") or {}).get("dhcp_server"):
            dhcp_only = True
    nic = {
        "port_id": vif["id"],
        "mac": vif.get("address"),
        "ips": ips,
        "dns": dns,
        "dhcp": dhcp_only and not ips,
    }
    mtu = (network.get("meta") or {}).get("mtu")
    if mtu:
        nic["mtu"] = int(mtu)
    vlan = _vlan(vif)
    if vlan is not None:
        nic["vlan"] = vlan
    bridge = network.get("bridge") or details.get("bridge_name")
    if bridge:
        nic["bridge"] = bridge
    # fatboxd's NicSpec has one gateway: the IPv4 one when there is one. The IPv6 gateway,
    # routes and names ride along for the guest config (ignored by today's fatboxd).
    gw = gw4 or gw6
    if gw:
        nic["gateway"] = gw
    if gw6 and gw4:
        nic["gateway6"] = gw6
    if routes:
        nic["routes"] = routes
    nic["network_id"] = network.get("id")
    nic["devname"] = vif.get("devname")
    return nic


def network_info_to_nics(network_info):
    return [vif_to_nic(vif) for vif in network_info or []]
