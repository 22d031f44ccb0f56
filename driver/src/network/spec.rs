//! VIF description (what Nova's network_info or the CLI `--nic` gives) and its validation.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

/// Smallest MTU Linux accepts on an interface carrying IPv4.
pub const MIN_MTU: u32 = 68;
/// Largest MTU a veth accepts.
pub const MAX_MTU: u32 = 65535;
/// Longest port id accepted; Neutron ids are 36-character UUIDs.
const MAX_PORT_ID_LEN: usize = 64;

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A MAC in Neutron's default base_mac range (fa:16:3e) derived from `seed`, so re-plugging
    /// the same port without an explicit MAC gives the same address.
    pub fn from_seed(seed: &[u8]) -> MacAddr {
        // FNV-1a: stable across releases, unlike std's hasher.
        let mut h: u32 = 0x811c_9dc5;
        for b in seed {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
        let [_, a, b, c] = h.to_be_bytes();
        MacAddr([0xfa, 0x16, 0x3e, a, b, c])
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddr {
    type Err = Error;

    fn from_str(s: &str) -> Result<MacAddr> {
        let bad = || Error::InvalidMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for slot in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *slot = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        // A multicast source address would be dropped by every switch on the way.
        if out[0] & 1 == 1 || out == [0; 6] {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One virtual interface of an instance, as Nova's VIF (vif_type `ovs`) describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// Neutron port id; becomes the Interface `iface-id` and names the host device.
    pub port_id: String,
    /// Port MAC; derived from the port id when absent.
    pub mac: Option<MacAddr>,
    /// MTU of both veth ends; the kernel default (1500) when absent.
    pub mtu: Option<u32>,
    /// Access VLAN set as Port `tag` in standalone mode.
    pub vlan: Option<u16>,
    /// OVS bridge; the configured integration bridge when absent.
    pub bridge: Option<String>,
    /// Fixed IPs with prefix length.
    #[serde(default)]
    pub ips: Vec<IpNet>,
    pub gateway: Option<IpAddr>,
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    /// The network runs DHCP: the guest's own client configures the address.
    #[serde(default)]
    pub dhcp: bool,
}

impl NicSpec {
    /// A NIC with a fresh port id and nothing else set.
    pub fn new(port_id: impl Into<String>) -> NicSpec {
        NicSpec {
            port_id: port_id.into(),
            mac: None,
            mtu: None,
            vlan: None,
            bridge: None,
            ips: Vec::new(),
            gateway: None,
            dns: Vec::new(),
            dhcp: false,
        }
    }

    /// The MAC the interface gets.
    pub fn effective_mac(&self) -> MacAddr {
        self.mac
            .unwrap_or_else(|| MacAddr::from_seed(self.port_id.as_bytes()))
    }

    /// Host-side device name, as os-vif/Nova name it: `tap` + first 11 characters of the port id.
    pub fn tap_name(&self) -> String {
        tap_name(&self.port_id)
    }

    /// Checks everything that does not need OVSDB (the bridge's MTU is checked at plug time).
    pub fn validate(&self) -> Result<()> {
        validate_port_id(&self.port_id)?;
        if let Some(v) = self.vlan {
            if !(1..=4094).contains(&v) {
                return Err(Error::InvalidVlan(u32::from(v)));
            }
        }
        if let Some(mtu) = self.mtu {
            if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
                return Err(Error::InvalidMtu {
                    mtu,
                    min: MIN_MTU,
                    max: MAX_MTU,
                });
            }
        }
        if let Some(b) = &self.bridge {
            if b.is_empty() || b.len() > 15 || b.contains(['/', ' ', ':']) {
                return Err(Error::UnknownBridge(b.clone()));
            }
        }
        if let Some(gw) = self.gateway {
            if !self.ips.iter().any(|n| n.contains(&gw)) && !self.dhcp {
                return Err(Error::invalid_nic(
                    &self.port_id,
                    format!("gateway {gw} is not in any of the NIC's subnets"),
                ));
            }
        }
        Ok(())
    }
}

pub(crate) fn tap_name(port_id: &str) -> String {
    let short: String = port_id.chars().take(11).collect();
    format!("tap{short}")
}

pub(crate) fn validate_port_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_PORT_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidPortId(id.to_string()))
    }
}

/// A NIC as the API takes it: the CLI string, `{"spec": "<CLI string>"}`, or a VIF object
/// (`port_id`, `mac`, `mtu`, `vlan`, `bridge`, `ips`, `gateway`, `dns`, `dhcp`; a missing
/// port id is generated). Validated; the MAC is filled in.
pub fn nic_from_json(v: &serde_json::Value) -> Result<NicSpec> {
    use serde_json::Value;
    let mut nic = match v {
        Value::String(s) => return parse_nic(s),
        Value::Object(o) if o.len() == 1 && o.contains_key("spec") => {
            return match o.get("spec") {
                Some(Value::String(s)) => parse_nic(s),
                _ => Err(Error::invalid_nic(&v.to_string(), "spec must be a string")),
            };
        }
        Value::Object(o) => {
            let mut o = o.clone();
            o.entry("port_id")
                .or_insert_with(|| Value::String(uuid::Uuid::new_v4().to_string()));
            serde_json::from_value::<NicSpec>(Value::Object(o))
                .map_err(|e| Error::invalid_nic(&v.to_string(), e.to_string()))?
        }
        _ => {
            return Err(Error::invalid_nic(
                &v.to_string(),
                "expected a string or an object",
            ))
        }
    };
    if nic.mac.is_none() {
        nic.mac = Some(nic.effective_mac());
    }
    if nic.ips.is_empty() && !nic.dhcp {
        return Err(Error::invalid_nic(&v.to_string(), "give ips or dhcp"));
    }
    nic.validate()?;
    Ok(nic)
}

/// Parses the CLI syntax `vlan=100,ip=10.20.0.5/24[,gw=10.20.0.1][,mac=..][,mtu=..]
/// [,port=<id>][,bridge=<br>][,dns=<ip>][,dhcp]`. `ip` and `dns` may repeat. A random port id
/// (UUID v4) and a MAC derived from it are filled in when absent.
pub fn parse_nic(s: &str) -> Result<NicSpec> {
    let mut nic = NicSpec::new(String::new());
    let mut seen_port = false;
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => (item, ""),
        };
        let need = |v: &str| -> Result<()> {
            if v.is_empty() {
                Err(Error::invalid_nic(s, format!("{key} needs a value")))
            } else {
                Ok(())
            }
        };
        match key {
            "vlan" => {
                need(value)?;
                let v: u32 = value.parse().map_err(|_| {
                    Error::invalid_nic(s, format!("vlan {value:?} is not a number"))
                })?;
                let v = u16::try_from(v)
                    .ok()
                    .filter(|v| (1..=4094).contains(v))
                    .ok_or(Error::InvalidVlan(v))?;
                nic.vlan = Some(v);
            }
            "ip" => {
                need(value)?;
                let net: IpNet = value.parse().map_err(|_| {
                    Error::invalid_nic(s, format!("ip {value:?} is not ADDRESS/PREFIX"))
                })?;
                nic.ips.push(net);
            }
            "gw" | "gateway" => {
                need(value)?;
                nic.gateway = Some(value.parse().map_err(|_| {
                    Error::invalid_nic(s, format!("gateway {value:?} is not an IP address"))
                })?);
            }
            "dns" => {
                need(value)?;
                nic.dns.push(value.parse().map_err(|_| {
                    Error::invalid_nic(s, format!("dns {value:?} is not an IP address"))
                })?);
            }
            "mac" => {
                need(value)?;
                nic.mac = Some(value.parse()?);
            }
            "mtu" => {
                need(value)?;
                let mtu: u32 = value
                    .parse()
                    .map_err(|_| Error::invalid_nic(s, format!("mtu {value:?} is not a number")))?;
                nic.mtu = Some(mtu);
            }
            "port" | "port_id" | "id" => {
                need(value)?;
                validate_port_id(value)?;
                nic.port_id = value.to_string();
                seen_port = true;
            }
            "bridge" => {
                need(value)?;
                nic.bridge = Some(value.to_string());
            }
            "dhcp" => {
                nic.dhcp = match value {
                    "" | "yes" | "true" | "1" => true,
                    "no" | "false" | "0" => false,
                    other => {
                        return Err(Error::invalid_nic(s, format!("dhcp={other:?}: yes or no")))
                    }
                }
            }
            other => return Err(Error::invalid_nic(s, format!("unknown key {other:?}"))),
        }
    }
    if !seen_port {
        nic.port_id = uuid::Uuid::new_v4().to_string();
    }
    if nic.mac.is_none() {
        nic.mac = Some(nic.effective_mac());
    }
    if nic.ips.is_empty() && !nic.dhcp {
        return Err(Error::invalid_nic(s, "give ip=ADDRESS/PREFIX or dhcp"));
    }
    nic.validate()?;
    Ok(nic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_spec() {
        let n = parse_nic("vlan=100,ip=10.20.0.5/24,gw=10.20.0.1,mac=FA:16:3e:00:00:01,mtu=1400,port=abc-def,dns=1.1.1.1").unwrap();
        assert_eq!(n.vlan, Some(100));
        assert_eq!(n.ips, vec!["10.20.0.5/24".parse::<IpNet>().unwrap()]);
        assert_eq!(n.gateway, Some("10.20.0.1".parse().unwrap()));
        assert_eq!(n.mac.unwrap().to_string(), "fa:16:3e:00:00:01");
        assert_eq!(n.mtu, Some(1400));
        assert_eq!(n.tap_name(), "tapabc-def");
        assert_eq!(n.dns.len(), 1);
    }

    #[test]
    fn generates_port_and_mac() {
        let n = parse_nic("vlan=7,ip=10.0.0.2/24").unwrap();
        assert_eq!(n.port_id.len(), 36);
        assert_eq!(n.tap_name().len(), 14);
        assert_eq!(n.mac.unwrap().0[..3], [0xfa, 0x16, 0x3e]);
    }

    #[test]
    fn json_forms() {
        let a = nic_from_json(&serde_json::json!("vlan=100,ip=10.0.0.2/24")).unwrap();
        assert_eq!(a.vlan, Some(100));
        let b = nic_from_json(&serde_json::json!({"spec": "vlan=5,dhcp"})).unwrap();
        assert!(b.dhcp);
        let c = nic_from_json(&serde_json::json!({
            "port_id": "p1", "vlan": 7, "ips": ["10.1.0.2/24"], "mac": "fa:16:3e:01:02:03"
        }))
        .unwrap();
        assert_eq!(c.port_id, "p1");
        assert_eq!(c.mac.unwrap().to_string(), "fa:16:3e:01:02:03");
        for bad in [
            serde_json::json!({"spec": 5}),
            serde_json::json!({"vlan": 4095, "ips": ["10.1.0.2/24"]}),
            serde_json::json!({"vlan": 7}),
            serde_json::json!({"vlan": 7, "ips": ["x"]}),
            serde_json::json!(42),
        ] {
            assert!(nic_from_json(&bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "vlan=0,ip=10.0.0.2/24",
            "vlan=4095,ip=10.0.0.2/24",
            "vlan=70000,ip=10.0.0.2/24",
            "vlan=x,ip=10.0.0.2/24",
            "ip=10.0.0.2",
            "ip=10.0.0.2/24,mac=zz:00:00:00:00:00",
            "ip=10.0.0.2/24,mac=01:00:00:00:00:00",
            "ip=10.0.0.2/24,mac=00:00:00:00:00",
            "ip=10.0.0.2/24,mac=00:00:00:00:00:01:02",
            "ip=10.0.0.2/24,mtu=67",
            "ip=10.0.0.2/24,mtu=70000",
            "ip=10.0.0.2/24,gw=10.1.0.1",
            "ip=10.0.0.2/24,port=../../x",
            "ip=10.0.0.2/24,colour=blue",
            "vlan=5",
            "",
        ] {
            assert!(parse_nic(bad).is_err(), "{bad} accepted");
        }
    }
}
