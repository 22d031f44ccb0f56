//! Instance networking on Open vSwitch: veth pairs wired before init starts, Neutron-compatible
//! port binding through OVSDB, standalone access VLANs, hot-plug, and guest addressing config.
//!
//! Order of a plug: validate the NIC, read OVSDB (bridge, MTU, duplicates) in one snapshot,
//! create the veth pair in one netlink request (peer lands in the netns as `eth<N>` with its MAC
//! and MTU), then add Port+Interface in one guarded transaction. A failure after the veth exists
//! deletes it again, so a failed plug leaves nothing behind.

mod error;
mod guest;
mod netlink;
mod netns;
mod ovs;
mod ovsdb;
mod spec;

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

pub use error::{Error, Result};
pub use guest::{
    detect_guest_network, remove_guest_config, write_guest_config, GuestNetworkConfig,
};
pub use netns::{create_netns, enter_netns, is_netns, remove_netns};
pub use ovs::{ATTACHED_MAC, IFACE_ID, IFACE_STATUS, VM_UUID};
pub use spec::{nic_from_json, parse_nic, MacAddr, NicSpec, MAX_MTU, MIN_MTU};

/// Name of the bind-mounted network namespace file in an instance directory.
pub const NETNS_FILE: &str = "netns";

use ovs::DesiredPort;
use ovsdb::OvsdbClient;

/// `[network]` section of fatbox.toml.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// OVSDB endpoint: `unix:PATH` or `tcp:HOST:PORT`.
    pub ovsdb: String,
    /// Bridge VIFs are plugged into unless the NIC names another one.
    pub integration_bridge: String,
    /// No Neutron agent: the driver sets each Port's access VLAN itself.
    pub standalone: bool,
    /// Create the integration bridge at connect time when missing (standalone setups).
    pub create_bridge: bool,
    /// `datapath_type` of a bridge created by `create_bridge` ("" = kernel, "netdev" = userspace).
    pub datapath_type: String,
    /// Standalone mode: host interface added to the integration bridge as a VLAN trunk.
    pub uplink: Option<String>,
    /// How long one OVSDB request may take.
    pub request_timeout_ms: u64,
    /// How long an operation keeps retrying while ovsdb-server is unreachable.
    pub reconnect_timeout_ms: u64,
    /// Idle `echo` probe interval (0 disables).
    pub probe_interval_ms: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            ovsdb: "unix:/run/openvswitch/db.sock".into(),
            integration_bridge: "br-int".into(),
            standalone: true,
            create_bridge: false,
            datapath_type: String::new(),
            uplink: None,
            request_timeout_ms: 10_000,
            reconnect_timeout_ms: 30_000,
            probe_interval_ms: 5_000,
        }
    }
}

/// The network namespace a VIF's container end goes into.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetnsRef {
    /// `/proc/PID/ns/net` of the instance's init.
    Pid(u32),
    /// A netns file, e.g. `/run/netns/NAME` or a bind mount kept by the runtime.
    Path(PathBuf),
}

impl NetnsRef {
    fn path(&self) -> PathBuf {
        match self {
            NetnsRef::Pid(p) => PathBuf::from(format!("/proc/{p}/ns/net")),
            NetnsRef::Path(p) => p.clone(),
        }
    }

    /// Opens the namespace, refusing the driver's own: `eth<N>` must never be created (or a
    /// name clash resolved) among the host's devices.
    fn open(&self) -> Result<File> {
        use std::os::unix::fs::MetadataExt;
        let path = self.path();
        let err = |path: PathBuf, source| Error::Netns { path, source };
        let f = File::open(&path).map_err(|e| err(path.clone(), e))?;
        let own = std::fs::metadata("/proc/self/ns/net").map_err(|e| err(path.clone(), e))?;
        let md = f.metadata().map_err(|e| err(path.clone(), e))?;
        if md.dev() == own.dev() && md.ino() == own.ino() {
            return Err(err(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "is the host's own network namespace",
                ),
            ));
        }
        Ok(f)
    }
}

/// A plugged VIF, as the runtime stores it in state.json.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluggedVif {
    pub instance_uuid: String,
    pub port_id: String,
    pub index: u32,
    /// Device name inside the instance (`eth<index>`).
    pub ifname: String,
    /// Host device name, also the OVS Port/Interface name.
    pub tap: String,
    pub mac: MacAddr,
    pub bridge: String,
    pub vlan: Option<u16>,
    pub mtu: Option<u32>,
}

/// A NIC of an instance as state.json keeps it: the VIF and its slot (`eth<index>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceNic {
    pub index: u32,
    #[serde(flatten)]
    pub nic: NicSpec,
}

impl InstanceNic {
    pub fn ifname(&self) -> String {
        format!("eth{}", self.index)
    }

    /// What the API shows: the stored VIF plus the device names on both sides.
    pub fn view(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(o) = v.as_object_mut() {
            o.insert("ifname".into(), self.ifname().into());
            o.insert("tap".into(), self.nic.tap_name().into());
            o.insert("mac".into(), self.nic.effective_mac().to_string().into());
        }
        v
    }
}

/// Driver-side network service: one OVSDB session (reconnecting) and one rtnetlink socket.
pub struct Network {
    cfg: NetworkConfig,
    ovsdb: OvsdbClient,
    nl: rtnetlink::Handle,
    nl_task: tokio::task::JoinHandle<()>,
}

impl Drop for Network {
    fn drop(&mut self) {
        self.nl_task.abort();
    }
}

fn alias_prefix(instance_uuid: &str) -> String {
    format!("fatbox vm-uuid={instance_uuid} ")
}

fn validate_instance_uuid(u: &str) -> Result<()> {
    // Goes into external_ids and link aliases (IFALIASZ 256): keep it printable and short.
    if u.is_empty() || u.len() > 128 || !u.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid_nic(
            u,
            "instance uuid must be 1..=128 printable characters",
        ));
    }
    Ok(())
}

impl Network {
    /// Connects to OVSDB (retrying with backoff up to `reconnect_timeout_ms`) and netlink;
    /// creates the integration bridge and trunk uplink when configured to.
    pub async fn connect(cfg: &NetworkConfig) -> Result<Network> {
        let ovsdb = OvsdbClient::new(
            &cfg.ovsdb,
            Duration::from_millis(cfg.request_timeout_ms),
            Duration::from_millis(cfg.probe_interval_ms),
        )?;
        let (conn, nl, _) = rtnetlink::new_connection().map_err(Error::NetlinkSocket)?;
        let net = Network {
            cfg: cfg.clone(),
            ovsdb,
            nl,
            nl_task: tokio::spawn(conn),
        };
        net.retry("connect", || {
            net.ovsdb.request("list_dbs", serde_json::json!([]))
        })
        .await?;
        if cfg.create_bridge {
            net.retry("create bridge", || {
                ovs::ensure_bridge(&net.ovsdb, &cfg.integration_bridge, &cfg.datapath_type)
            })
            .await?;
        }
        if let Some(up) = &cfg.uplink {
            net.retry("add uplink", || {
                ovs::ensure_trunk(&net.ovsdb, &cfg.integration_bridge, up)
            })
            .await?;
        }
        info!(ovsdb = %cfg.ovsdb, bridge = %cfg.integration_bridge, "network ready");
        Ok(net)
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.cfg
    }

    /// Repeats an idempotent step while the OVSDB connection is down, with exponential backoff.
    async fn retry<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.reconnect_timeout_ms);
        let mut delay = Duration::from_millis(10);
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && Instant::now() + delay < deadline => {
                    debug!(what, error = %e, ?delay, "OVSDB unavailable, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn desired<'a>(
        &'a self,
        instance_uuid: &str,
        bridge: &'a str,
        tap: &'a str,
        nic: &NicSpec,
    ) -> DesiredPort<'a> {
        // Exactly the keys os-vif sets on the Interface.
        let external_ids = BTreeMap::from([
            (IFACE_ID.to_string(), nic.port_id.clone()),
            (IFACE_STATUS.to_string(), "active".to_string()),
            (ATTACHED_MAC.to_string(), nic.effective_mac().to_string()),
            (VM_UUID.to_string(), instance_uuid.to_string()),
        ]);
        DesiredPort {
            bridge,
            name: tap,
            standalone: self.cfg.standalone,
            tag: nic.vlan,
            external_ids,
        }
    }

    fn vif(&self, instance_uuid: &str, index: u32, nic: &NicSpec, bridge: &str) -> PluggedVif {
        PluggedVif {
            instance_uuid: instance_uuid.to_string(),
            port_id: nic.port_id.clone(),
            index,
            ifname: format!("eth{index}"),
            tap: nic.tap_name(),
            mac: nic.effective_mac(),
            bridge: bridge.to_string(),
            vlan: nic.vlan,
            mtu: nic.mtu,
        }
    }

    /// Checks a NIC against OVSDB: bridge exists, MTU fits the bridge, port id and name unused
    /// (unless `allow_own` and the existing port belongs to this instance and port id).
    async fn check(
        &self,
        instance_uuid: &str,
        bridge: &str,
        nic: &NicSpec,
        allow_own: bool,
    ) -> Result<Option<ovs::PortRow>> {
        let tap = nic.tap_name();
        let snap = self
            .retry("snapshot", || {
                ovs::snapshot(&self.ovsdb, bridge, &tap, &nic.port_id)
            })
            .await?;
        if !snap.bridge_exists {
            return Err(Error::UnknownBridge(bridge.to_string()));
        }
        if let (Some(mtu), Some(max)) = (nic.mtu, snap.bridge_mtu) {
            if mtu > max {
                return Err(Error::InvalidMtu {
                    mtu,
                    min: MIN_MTU,
                    max,
                });
            }
        }
        let own = |ids: &BTreeMap<String, String>| {
            ids.get(VM_UUID).map(String::as_str) == Some(instance_uuid)
                && ids.get(IFACE_ID) == Some(&nic.port_id)
        };
        if let Some(p) = &snap.port {
            if !(allow_own && own(&p.external_ids)) {
                return Err(Error::DuplicatePort {
                    port_id: nic.port_id.clone(),
                    reason: format!("OVS port {tap} already exists"),
                });
            }
        }
        if let Some(other) = snap.iface_id_owners.iter().find(|n| **n != tap) {
            return Err(Error::DuplicatePort {
                port_id: nic.port_id.clone(),
                reason: format!("interface {other} already carries this iface-id"),
            });
        }
        if !allow_own && !snap.iface_id_owners.is_empty() {
            return Err(Error::DuplicatePort {
                port_id: nic.port_id.clone(),
                reason: "an interface already carries this iface-id".into(),
            });
        }
        Ok(snap.port)
    }

    /// Everything `plug` checks before it creates anything (NIC fields, bridge, MTU against the
    /// bridge, port id and device name unused), without creating anything.
    pub async fn precheck(&self, instance_uuid: &str, nic: &NicSpec) -> Result<()> {
        validate_instance_uuid(instance_uuid)?;
        nic.validate()?;
        let bridge = nic
            .bridge
            .as_deref()
            .unwrap_or(&self.cfg.integration_bridge);
        self.check(instance_uuid, bridge, nic, false).await?;
        if netlink::get_link(&self.nl, &nic.tap_name())
            .await?
            .is_some()
        {
            return Err(Error::DuplicatePort {
                port_id: nic.port_id.clone(),
                reason: format!("host link {} already exists", nic.tap_name()),
            });
        }
        Ok(())
    }

    /// Adds or repairs the OVS port; safe to repeat after a lost reply.
    async fn ensure_port(&self, d: &DesiredPort<'_>) -> Result<()> {
        let iface_id = d
            .external_ids
            .get(IFACE_ID)
            .map(String::as_str)
            .unwrap_or("");
        let snap = ovs::snapshot(&self.ovsdb, d.bridge, d.name, iface_id).await?;
        match snap.port {
            Some(p) if ovs::port_matches(&p, d) => Ok(()),
            Some(p) => {
                info!(port = d.name, "repairing stale OVS port");
                ovs::repair_port(&self.ovsdb, &p, d).await
            }
            None => ovs::insert_port(&self.ovsdb, d).await,
        }
    }

    /// Plugs a VIF: veth pair, container end `eth<index>` in `netns` with the NIC's MAC and
    /// MTU, host end `tap<port[:11]>` on the bridge with os-vif's external_ids (and the access
    /// VLAN in standalone mode). Fails with nothing created on bad input or duplicates.
    pub async fn plug(
        &self,
        instance_uuid: &str,
        netns: &NetnsRef,
        index: u32,
        nic: &NicSpec,
    ) -> Result<PluggedVif> {
        self.plug_inner(instance_uuid, netns, index, nic, false)
            .await
    }

    /// Live-restore re-plug: keeps a correct veth and port, recreates a missing veth, repairs a
    /// stale OVS port (wrong tag, bridge or external_ids).
    pub async fn ensure(
        &self,
        instance_uuid: &str,
        netns: &NetnsRef,
        index: u32,
        nic: &NicSpec,
    ) -> Result<PluggedVif> {
        self.plug_inner(instance_uuid, netns, index, nic, true)
            .await
    }

    async fn plug_inner(
        &self,
        instance_uuid: &str,
        netns: &NetnsRef,
        index: u32,
        nic: &NicSpec,
        ensure: bool,
    ) -> Result<PluggedVif> {
        validate_instance_uuid(instance_uuid)?;
        nic.validate()?;
        if index >= 10_000 {
            return Err(Error::InvalidIndex(index));
        }
        let bridge = nic
            .bridge
            .as_deref()
            .unwrap_or(&self.cfg.integration_bridge);
        let vif = self.vif(instance_uuid, index, nic, bridge);
        let ns = netns.open()?;
        self.check(instance_uuid, bridge, nic, ensure).await?;

        let existing = netlink::get_link(&self.nl, &vif.tap).await?;
        let created = match existing {
            Some(l) if ensure && l.is_veth => {
                if l.mtu != nic.mtu && nic.mtu.is_some() {
                    netlink::set_mtu_up(&self.nl, l.index, nic.mtu).await?;
                }
                false
            }
            Some(_) => {
                return Err(Error::DuplicatePort {
                    port_id: nic.port_id.clone(),
                    reason: format!("host link {} already exists", vif.tap),
                })
            }
            None => {
                let alias = format!("{}iface-id={}", alias_prefix(instance_uuid), nic.port_id);
                netlink::create_veth(
                    &self.nl,
                    &netlink::VethRequest {
                        host_name: &vif.tap,
                        peer_name: &vif.ifname,
                        peer_mac: vif.mac.octets(),
                        mtu: nic.mtu,
                        netns: &ns,
                        alias: &alias,
                    },
                    &nic.port_id,
                )
                .await?;
                true
            }
        };

        let d = self.desired(instance_uuid, bridge, &vif.tap, nic);
        if let Err(e) = self.retry("add port", || self.ensure_port(&d)).await {
            warn!(port = %vif.tap, error = %e, "plug failed, rolling back");
            if created {
                if let Err(e2) = netlink::delete_link(&self.nl, &vif.tap).await {
                    warn!(port = %vif.tap, error = %e2, "rollback: veth not deleted");
                }
                // The transaction may have committed before the connection dropped; remove
                // the port only if it is ours (a concurrent plug may own the name).
                match ovs::snapshot(&self.ovsdb, bridge, &vif.tap, &nic.port_id).await {
                    Ok(ovs::Snapshot { port: Some(p), .. })
                        if p.external_ids.get(VM_UUID).map(String::as_str)
                            == Some(instance_uuid)
                            && p.external_ids.get(IFACE_ID) == Some(&nic.port_id) =>
                    {
                        if let Err(e2) = ovs::delete_port(&self.ovsdb, &p.uuid).await {
                            warn!(port = %vif.tap, error = %e2, "rollback: OVS port not deleted");
                        }
                    }
                    Ok(_) => {}
                    Err(e2) => {
                        debug!(port = %vif.tap, error = %e2, "rollback: OVS port not checked")
                    }
                }
            }
            return Err(e);
        }
        debug!(port = %vif.tap, ifname = %vif.ifname, "plugged");
        Ok(vif)
    }

    /// Removes the VIF's OVS port and veth. Idempotent; works when the netns is already gone.
    /// Refuses to remove a port that belongs to another instance.
    pub async fn unplug(&self, instance_uuid: &str, port_id: &str) -> Result<()> {
        spec::validate_port_id(port_id)?;
        let tap = spec::tap_name(port_id);
        let bridge = &self.cfg.integration_bridge;
        let snap = self
            .retry("snapshot", || {
                ovs::snapshot(&self.ovsdb, bridge, &tap, port_id)
            })
            .await?;
        if let Some(p) = &snap.port {
            if let Some(owner) = p.external_ids.get(VM_UUID) {
                if owner != instance_uuid {
                    return Err(Error::DuplicatePort {
                        port_id: port_id.to_string(),
                        reason: format!("port {tap} belongs to instance {owner}"),
                    });
                }
            }
            let uuid = p.uuid.clone();
            self.retry("delete port", || ovs::delete_port(&self.ovsdb, &uuid))
                .await?;
        }
        netlink::delete_link(&self.nl, &tap).await?;
        debug!(port = %tap, "unplugged");
        Ok(())
    }

    /// Removes every port whose Interface vm-uuid is the instance, and every host veth this
    /// driver created for it (found by link alias, so a crash between veth and OVSDB steps is
    /// covered too). Returns how many devices or ports were removed.
    pub async fn cleanup_instance(&self, instance_uuid: &str) -> Result<usize> {
        validate_instance_uuid(instance_uuid)?;
        let names = self
            .retry("list ports", || {
                ovs::interfaces_with(&self.ovsdb, VM_UUID, instance_uuid)
            })
            .await?;
        let mut removed = 0usize;
        for name in &names {
            if self
                .retry("delete port", || {
                    ovs::delete_port_by_name(&self.ovsdb, name)
                })
                .await?
            {
                removed = removed.saturating_add(1);
            }
            if netlink::delete_link(&self.nl, name).await? {
                removed = removed.saturating_add(1);
            }
        }
        let prefix = alias_prefix(instance_uuid);
        for l in netlink::list_links(&self.nl).await? {
            if l.alias.as_deref().is_some_and(|a| a.starts_with(&prefix))
                && netlink::delete_link(&self.nl, &l.name).await?
            {
                removed = removed.saturating_add(1);
            }
        }
        info!(instance = instance_uuid, removed, "network cleanup");
        Ok(removed)
    }

    /// Names of the OVS ports (taps) plugged for an instance, from OVSDB.
    pub async fn instance_ports(&self, instance_uuid: &str) -> Result<Vec<String>> {
        self.retry("list ports", || {
            ovs::interfaces_with(&self.ovsdb, VM_UUID, instance_uuid)
        })
        .await
    }
}

/// The instance's network namespace file inside its directory, when it is mounted.
pub fn instance_netns(instance_dir: &std::path::Path) -> Option<PathBuf> {
    let p = instance_dir.join(NETNS_FILE);
    netns::is_netns(&p).then_some(p)
}
