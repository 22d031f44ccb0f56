//! veth handling over rtnetlink: one RTM_NEWLINK creates both ends, with the peer already in
//! the instance's netns under its final name, MAC and MTU, so there is no window in which a
//! half-configured device is visible inside the container. The container end is left
//! administratively down, as a fresh VM NIC is: the guest's network configuration brings it up
//! (the kernel here also refuses IFF_UP on a peer created in another netns with ENOTCONN).
//!
//! Host devices are never moved or renamed; only veths are ever deleted.

use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec};

use super::error::{Error, Result};

/// Host-side facts about a link.
#[derive(Clone, Debug, Default)]
pub(crate) struct HostLink {
    pub name: String,
    pub index: u32,
    pub mtu: Option<u32>,
    pub alias: Option<String>,
    pub is_veth: bool,
}

pub(crate) struct VethRequest<'a> {
    pub host_name: &'a str,
    pub peer_name: &'a str,
    pub peer_mac: [u8; 6],
    pub mtu: Option<u32>,
    pub netns: &'a std::fs::File,
    pub alias: &'a str,
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn nl_err(op: impl Into<String>, source: rtnetlink::Error) -> Error {
    Error::Netlink {
        op: op.into(),
        source,
    }
}

/// Creates the pair. EEXIST (host name or, inside the netns, the peer name taken) becomes
/// [`Error::DuplicatePort`].
pub(crate) async fn create_veth(h: &Handle, r: &VethRequest<'_>, port_id: &str) -> Result<()> {
    let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(r.peer_name.to_string())
        .address(r.peer_mac.to_vec())
        .setns_by_fd(r.netns.as_raw_fd());
    let mut host = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(r.host_name.to_string())
        .up();
    if let Some(mtu) = r.mtu {
        peer = peer.mtu(mtu);
        host = host.mtu(mtu);
    }
    let msg = host
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
        .build();
    match h.link().add(msg).execute().await {
        Ok(()) => {
            // RTM_NEWLINK ignores IFLA_IFALIAS; the alias lets cleanup find a veth whose OVS
            // row was never written.
            let set = LinkUnspec::new_with_name(r.host_name)
                .alias(r.alias.to_string())
                .build();
            if let Err(e) = h.link().set(set).execute().await {
                let _ = delete_link(h, r.host_name).await;
                return Err(nl_err(format!("set alias on {}", r.host_name), e));
            }
            Ok(())
        }
        Err(e) if errno(&e) == Some(libc::EEXIST) => Err(Error::DuplicatePort {
            port_id: port_id.to_string(),
            reason: format!(
                "a link named {} (host) or {} (in the instance netns) already exists",
                r.host_name, r.peer_name
            ),
        }),
        Err(e) => Err(nl_err(format!("create veth {}", r.host_name), e)),
    }
}

/// Deletes a host veth by name (its peer goes with it). Returns false when it was absent.
/// Anything that is not a veth is left alone: a name from OVSDB must never take down a NIC.
pub(crate) async fn delete_link(h: &Handle, name: &str) -> Result<bool> {
    let Some(l) = get_link(h, name).await? else {
        return Ok(false);
    };
    if !l.is_veth {
        tracing::warn!(link = name, "not a veth; not deleting it");
        return Ok(false);
    }
    match h.link().del(l.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(nl_err(format!("delete {name}"), e)),
    }
}

fn host_link(m: &rtnetlink::packet_route::link::LinkMessage) -> HostLink {
    let mut l = HostLink {
        index: m.header.index,
        ..HostLink::default()
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::IfAlias(s) => l.alias = Some(s.clone()),
            LinkAttribute::Mtu(m) => l.mtu = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                l.is_veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            _ => {}
        }
    }
    l
}

/// Looks a host link up by name.
pub(crate) async fn get_link(h: &Handle, name: &str) -> Result<Option<HostLink>> {
    let mut s = h.link().get().match_name(name.to_string()).execute();
    match s.try_next().await {
        Ok(Some(m)) => Ok(Some(host_link(&m))),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl_err(format!("get {name}"), e)),
    }
}

/// All host links.
pub(crate) async fn list_links(h: &Handle) -> Result<Vec<HostLink>> {
    let msgs: Vec<_> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl_err("dump links", e))?;
    Ok(msgs.iter().map(host_link).collect())
}

/// Sets the MTU of a host link and brings it up.
pub(crate) async fn set_mtu_up(h: &Handle, index: u32, mtu: Option<u32>) -> Result<()> {
    let mut b = LinkUnspec::new_with_index(index).up();
    if let Some(m) = mtu {
        b = b.mtu(m);
    }
    h.link()
        .set(b.build())
        .execute()
        .await
        .map_err(|e| nl_err(format!("set link {index}"), e))
}
