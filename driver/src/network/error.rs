//! Typed errors of the network module.

use std::path::PathBuf;

/// Result alias of the network module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything plugging, unplugging or configuring a VIF can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `--nic` string (or a VIF description) is malformed.
    #[error("invalid NIC specification {spec:?}: {reason}")]
    InvalidNic { spec: String, reason: String },
    /// A MAC address could not be parsed or is not a unicast address.
    #[error("invalid MAC address {0:?}: expected six hex octets (aa:bb:cc:dd:ee:ff), unicast")]
    InvalidMac(String),
    /// VLAN ids 0 and 4095 are reserved by 802.1Q; more than 12 bits do not fit.
    #[error("invalid VLAN id {0}: must be in 1..=4094")]
    InvalidVlan(u32),
    /// MTU outside what Linux accepts for IPv4 or larger than the bridge carries.
    #[error("invalid MTU {mtu}: must be in {min}..={max}")]
    InvalidMtu { mtu: u32, min: u32, max: u32 },
    /// The port id cannot be used (empty, too long, or characters not allowed in a device name).
    #[error("invalid port id {0:?}: expected 1..=64 characters of [A-Za-z0-9_-]")]
    InvalidPortId(String),
    /// The interface index would give a container device name longer than IFNAMSIZ.
    #[error("invalid interface index {0}: must be below 10000")]
    InvalidIndex(u32),
    /// The bridge named by the NIC or the configuration does not exist in OVSDB.
    #[error("unknown bridge {0:?}: no such Bridge row in OVSDB")]
    UnknownBridge(String),
    /// Port id or device name already used by another port or link.
    #[error("duplicate port {port_id:?}: {reason}")]
    DuplicatePort { port_id: String, reason: String },
    /// The network namespace reference could not be opened.
    #[error("cannot open network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("netlink {op} failed: {source}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// The rtnetlink socket could not be created.
    #[error("cannot open rtnetlink socket: {0}")]
    NetlinkSocket(#[source] std::io::Error),
    /// The OVSDB endpoint string is not `unix:PATH` or `tcp:HOST:PORT`.
    #[error("invalid OVSDB endpoint {0:?}: expected unix:PATH or tcp:HOST:PORT")]
    InvalidEndpoint(String),
    /// Connecting to ovsdb-server failed.
    #[error("cannot connect to OVSDB at {endpoint}: {source}")]
    OvsdbConnect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    /// The connection dropped while a request was outstanding; its outcome is unknown.
    #[error("OVSDB connection lost")]
    OvsdbDisconnected,
    /// ovsdb-server did not answer in time.
    #[error("OVSDB request timed out after {0:?}")]
    OvsdbTimeout(std::time::Duration),
    /// The server answered with a JSON-RPC error or something that is not the protocol.
    #[error("OVSDB protocol error: {0}")]
    OvsdbProtocol(String),
    /// A transaction was rejected (constraint violation, failed `wait`, ...).
    #[error("OVSDB transaction failed: {error}: {details}")]
    OvsdbTransaction { error: String, details: String },
    /// Reading or writing a file in a guest root filesystem failed.
    #[error("guest config {path}: {source}")]
    GuestIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Errors after which repeating an idempotent step on a fresh connection can succeed.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::OvsdbConnect { .. } | Error::OvsdbDisconnected | Error::OvsdbTimeout(_)
        )
    }

    pub(crate) fn invalid_nic(spec: &str, reason: impl Into<String>) -> Self {
        Error::InvalidNic {
            spec: spec.to_string(),
            reason: reason.into(),
        }
    }
}
