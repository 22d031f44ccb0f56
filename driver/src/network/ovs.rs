//! Open_vSwitch table operations used by VIF plugging, each one a checked transaction.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::error::{Error, Result};
use super::ovsdb::OvsdbClient;

/// Interface external_ids keys os-vif writes and neutron-openvswitch-agent reads.
pub const IFACE_ID: &str = "iface-id";
pub const IFACE_STATUS: &str = "iface-status";
pub const ATTACHED_MAC: &str = "attached-mac";
pub const VM_UUID: &str = "vm-uuid";

/// What the driver wants a port to look like.
#[derive(Clone, Debug)]
pub(crate) struct DesiredPort<'a> {
    pub bridge: &'a str,
    pub name: &'a str,
    /// Standalone mode: the driver owns `tag` and makes the port an access port (an untagged
    /// OVS port without vlan_mode would be a trunk carrying every VLAN). With Neutron the
    /// agent owns both.
    pub standalone: bool,
    pub tag: Option<u16>,
    pub external_ids: BTreeMap<String, String>,
}

/// A Port row with its single Interface.
#[derive(Clone, Debug, Default)]
pub(crate) struct PortRow {
    pub uuid: String,
    pub tag: Option<i64>,
    pub vlan_mode: Option<String>,
    pub interfaces: Vec<String>,
    pub bridge: Option<String>,
    pub iface_uuid: Option<String>,
    pub external_ids: BTreeMap<String, String>,
}

/// State relevant to plugging one port, read in one transaction (one snapshot).
#[derive(Clone, Debug, Default)]
pub(crate) struct Snapshot {
    pub bridge_exists: bool,
    pub bridge_mtu: Option<u32>,
    pub port: Option<PortRow>,
    /// Interfaces (by name) whose iface-id is the port id.
    pub iface_id_owners: Vec<String>,
}

fn uuid_of(v: &Value) -> Option<String> {
    match v.as_array().map(Vec::as_slice) {
        Some([t, Value::String(u)]) if t == "uuid" => Some(u.clone()),
        _ => None,
    }
}

/// Decodes an OVSDB set of uuids (`["uuid",x]` or `["set",[...]]`).
fn uuid_set(v: &Value) -> Vec<String> {
    if let Some(u) = uuid_of(v) {
        return vec![u];
    }
    match v.as_array().map(Vec::as_slice) {
        Some([t, Value::Array(items)]) if t == "set" => items.iter().filter_map(uuid_of).collect(),
        _ => Vec::new(),
    }
}

/// Decodes an optional integer (`5` or `["set",[]]`).
fn opt_int(v: Option<&Value>) -> Option<i64> {
    v.and_then(Value::as_i64)
}

fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    if let Some([t, Value::Array(pairs)]) = v.and_then(Value::as_array).map(Vec::as_slice) {
        if t == "map" {
            for p in pairs {
                if let Some([Value::String(k), Value::String(val)]) =
                    p.as_array().map(Vec::as_slice)
                {
                    m.insert(k.clone(), val.clone());
                }
            }
        }
    }
    m
}

fn ovs_map(m: &BTreeMap<String, String>) -> Value {
    json!([
        "map",
        m.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>()
    ])
}

fn rows(results: &[Value], i: usize) -> Result<&Vec<Value>> {
    results
        .get(i)
        .and_then(|r| r.get("rows"))
        .and_then(Value::as_array)
        .ok_or_else(|| Error::OvsdbProtocol(format!("select result {i} has no rows")))
}

fn str_col<'a>(row: &'a Value, col: &str) -> Option<&'a str> {
    row.get(col).and_then(Value::as_str)
}

pub(crate) async fn snapshot(
    c: &OvsdbClient,
    bridge: &str,
    name: &str,
    port_id: &str,
) -> Result<Snapshot> {
    let res = c
        .transact(vec![
            json!({"op": "select", "table": "Bridge", "where": [], "columns": ["name", "ports"]}),
            json!({"op": "select", "table": "Interface", "where": [["name", "==", bridge]],
                   "columns": ["mtu"]}),
            json!({"op": "select", "table": "Port", "where": [["name", "==", name]],
                   "columns": ["_uuid", "tag", "vlan_mode", "interfaces"]}),
            json!({"op": "select", "table": "Interface", "where": [["name", "==", name]],
                   "columns": ["_uuid", "external_ids"]}),
            json!({"op": "select", "table": "Interface",
                   "where": [["external_ids", "includes", ["map", [[IFACE_ID, port_id]]]]],
                   "columns": ["name"]}),
        ])
        .await?;
    let bridges = rows(&res, 0)?;
    let mut snap = Snapshot {
        bridge_exists: bridges.iter().any(|b| str_col(b, "name") == Some(bridge)),
        bridge_mtu: rows(&res, 1)?
            .first()
            .and_then(|r| opt_int(r.get("mtu")))
            .and_then(|m| u32::try_from(m).ok()),
        port: None,
        iface_id_owners: rows(&res, 4)?
            .iter()
            .filter_map(|r| str_col(r, "name").map(str::to_string))
            .collect(),
    };
    if let Some(p) = rows(&res, 2)?.first() {
        let uuid = p.get("_uuid").and_then(uuid_of).unwrap_or_default();
        let owner = bridges
            .iter()
            .find(|b| {
                b.get("ports")
                    .map(uuid_set)
                    .unwrap_or_default()
                    .contains(&uuid)
            })
            .and_then(|b| str_col(b, "name"))
            .map(str::to_string);
        let iface = rows(&res, 3)?.first();
        snap.port = Some(PortRow {
            tag: opt_int(p.get("tag")),
            vlan_mode: str_col(p, "vlan_mode").map(str::to_string),
            interfaces: p.get("interfaces").map(uuid_set).unwrap_or_default(),
            bridge: owner,
            iface_uuid: iface.and_then(|i| i.get("_uuid")).and_then(uuid_of),
            external_ids: string_map(iface.and_then(|i| i.get("external_ids"))),
            uuid,
        });
    }
    Ok(snap)
}

fn port_row(d: &DesiredPort<'_>) -> Value {
    let mut row = json!({"name": d.name, "interfaces": ["named-uuid", "iface"]});
    if d.standalone {
        row["tag"] = tag_value(d.tag);
        row["vlan_mode"] = json!("access");
    }
    row
}

fn tag_value(tag: Option<u16>) -> Value {
    match tag {
        Some(t) => json!(t),
        None => json!(["set", []]),
    }
}

/// Inserts Port + Interface and attaches them to the bridge. Aborts (nothing written) when the
/// bridge is missing, the name is taken, or another Interface already carries the iface-id.
pub(crate) async fn insert_port(c: &OvsdbClient, d: &DesiredPort<'_>) -> Result<()> {
    let iface_id = d.external_ids.get(IFACE_ID).cloned().unwrap_or_default();
    c.transact(vec![
        json!({"op": "wait", "table": "Bridge", "where": [["name", "==", d.bridge]],
               "columns": ["name"], "until": "==", "rows": [{"name": d.bridge}], "timeout": 0}),
        json!({"op": "wait", "table": "Port", "where": [["name", "==", d.name]],
               "columns": ["name"], "until": "==", "rows": [], "timeout": 0}),
        json!({"op": "wait", "table": "Interface",
               "where": [["external_ids", "includes", ["map", [[IFACE_ID, iface_id]]]]],
               "columns": ["name"], "until": "==", "rows": [], "timeout": 0}),
        json!({"op": "insert", "table": "Interface", "uuid-name": "iface",
               "row": {"name": d.name, "type": "", "external_ids": ovs_map(&d.external_ids)}}),
        json!({"op": "insert", "table": "Port", "uuid-name": "port", "row": port_row(d)}),
        json!({"op": "mutate", "table": "Bridge", "where": [["name", "==", d.bridge]],
               "mutations": [["ports", "insert", ["set", [["named-uuid", "port"]]]]]}),
    ])
    .await?;
    Ok(())
}

/// Whether an existing port already is what `d` asks for.
pub(crate) fn port_matches(p: &PortRow, d: &DesiredPort<'_>) -> bool {
    p.bridge.as_deref() == Some(d.bridge)
        && p.interfaces.len() == 1
        && p.iface_uuid.is_some()
        && p.interfaces.first() == p.iface_uuid.as_ref()
        && (!d.standalone
            || (p.tag == d.tag.map(i64::from) && p.vlan_mode.as_deref() == Some("access")))
        && d.external_ids
            .iter()
            .all(|(k, v)| p.external_ids.get(k) == Some(v))
}

/// Brings an existing port in line with `d` in one transaction guarded by the row's uuid.
pub(crate) async fn repair_port(c: &OvsdbClient, p: &PortRow, d: &DesiredPort<'_>) -> Result<()> {
    let (Some(iface), [only]) = (p.iface_uuid.as_ref(), p.interfaces.as_slice()) else {
        // Not a shape we write: replace it.
        delete_port(c, &p.uuid).await?;
        return insert_port(c, d).await;
    };
    if only != iface {
        delete_port(c, &p.uuid).await?;
        return insert_port(c, d).await;
    }
    let keys: Vec<&String> = d.external_ids.keys().collect();
    let mut ops = vec![
        json!({"op": "wait", "table": "Bridge", "where": [["name", "==", d.bridge]],
               "columns": ["name"], "until": "==", "rows": [{"name": d.bridge}], "timeout": 0}),
        json!({"op": "mutate", "table": "Interface", "where": [["_uuid", "==", ["uuid", iface]]],
               "mutations": [["external_ids", "delete", ["set", keys]],
                             ["external_ids", "insert", ovs_map(&d.external_ids)]]}),
    ];
    if d.standalone {
        ops.push(
            json!({"op": "update", "table": "Port", "where": [["_uuid", "==", ["uuid", p.uuid]]],
                        "row": {"tag": tag_value(d.tag), "vlan_mode": "access"}}),
        );
    }
    if p.bridge.as_deref() != Some(d.bridge) {
        ops.push(json!({"op": "mutate", "table": "Bridge",
                        "where": [["ports", "includes", ["uuid", p.uuid]]],
                        "mutations": [["ports", "delete", ["uuid", p.uuid]]]}));
        ops.push(
            json!({"op": "mutate", "table": "Bridge", "where": [["name", "==", d.bridge]],
                        "mutations": [["ports", "insert", ["uuid", p.uuid]]]}),
        );
    }
    c.transact(ops).await?;
    Ok(())
}

/// Detaches a port from every bridge; OVSDB garbage-collects the unreferenced Port and
/// Interface rows in the same commit. Idempotent.
pub(crate) async fn delete_port(c: &OvsdbClient, port_uuid: &str) -> Result<()> {
    c.transact(vec![json!({"op": "mutate", "table": "Bridge",
                           "where": [["ports", "includes", ["uuid", port_uuid]]],
                           "mutations": [["ports", "delete", ["uuid", port_uuid]]]})])
        .await?;
    Ok(())
}

/// Deletes the port named `name` if it exists.
pub(crate) async fn delete_port_by_name(c: &OvsdbClient, name: &str) -> Result<bool> {
    let res = c
        .transact(vec![json!({"op": "select", "table": "Port",
                              "where": [["name", "==", name]], "columns": ["_uuid"]})])
        .await?;
    let mut found = false;
    for r in rows(&res, 0)? {
        if let Some(u) = r.get("_uuid").and_then(uuid_of) {
            delete_port(c, &u).await?;
            found = true;
        }
    }
    Ok(found)
}

/// Names of Interfaces whose external_ids has `key=value`.
pub(crate) async fn interfaces_with(
    c: &OvsdbClient,
    key: &str,
    value: &str,
) -> Result<Vec<String>> {
    let res = c
        .transact(vec![json!({"op": "select", "table": "Interface",
                              "where": [["external_ids", "includes", ["map", [[key, value]]]]],
                              "columns": ["name"]})])
        .await?;
    Ok(rows(&res, 0)?
        .iter()
        .filter_map(|r| str_col(r, "name").map(str::to_string))
        .collect())
}

/// Creates a bridge (idempotent), used for standalone setups and tests.
pub(crate) async fn ensure_bridge(c: &OvsdbClient, name: &str, datapath_type: &str) -> Result<()> {
    let res = c
        .transact(vec![json!({"op": "select", "table": "Bridge",
                              "where": [["name", "==", name]], "columns": ["name"]})])
        .await?;
    if !rows(&res, 0)?.is_empty() {
        return Ok(());
    }
    c.transact(vec![
        json!({"op": "wait", "table": "Bridge", "where": [["name", "==", name]],
               "columns": ["name"], "until": "==", "rows": [], "timeout": 0}),
        json!({"op": "insert", "table": "Interface", "uuid-name": "i",
               "row": {"name": name, "type": "internal"}}),
        json!({"op": "insert", "table": "Port", "uuid-name": "p",
               "row": {"name": name, "interfaces": ["named-uuid", "i"]}}),
        json!({"op": "insert", "table": "Bridge", "uuid-name": "b",
               "row": {"name": name, "ports": ["named-uuid", "p"],
                       "datapath_type": datapath_type}}),
        json!({"op": "mutate", "table": "Open_vSwitch", "where": [],
               "mutations": [["bridges", "insert", ["set", [["named-uuid", "b"]]]]]}),
    ])
    .await?;
    Ok(())
}

/// Adds `uplink` to `bridge` as a trunk port (no tag: carries every VLAN). Idempotent.
pub(crate) async fn ensure_trunk(c: &OvsdbClient, bridge: &str, uplink: &str) -> Result<()> {
    let snap = snapshot(c, bridge, uplink, "").await?;
    if !snap.bridge_exists {
        return Err(Error::UnknownBridge(bridge.to_string()));
    }
    if let Some(p) = snap.port {
        if p.bridge.as_deref() == Some(bridge) {
            return Ok(());
        }
        delete_port(c, &p.uuid).await?;
    }
    c.transact(vec![
        json!({"op": "wait", "table": "Port", "where": [["name", "==", uplink]],
               "columns": ["name"], "until": "==", "rows": [], "timeout": 0}),
        json!({"op": "insert", "table": "Interface", "uuid-name": "i", "row": {"name": uplink}}),
        json!({"op": "insert", "table": "Port", "uuid-name": "p",
               "row": {"name": uplink, "interfaces": ["named-uuid", "i"]}}),
        json!({"op": "mutate", "table": "Bridge", "where": [["name", "==", bridge]],
               "mutations": [["ports", "insert", ["set", [["named-uuid", "p"]]]]]}),
    ])
    .await?;
    Ok(())
}
