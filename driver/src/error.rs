//! Typed errors of the runtime; the API maps each kind to an HTTP status.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is part of the message and deliberately not a `source()`: the CLI prints the
    // whole chain, which would repeat it ("x: No such file: No such file").
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{what}: {err}")]
    Sys { what: String, err: nix::Error },
    /// The request is malformed or asks for something impossible (HTTP 400).
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// The request conflicts with the current state (HTTP 409).
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("image: {0}")]
    Image(#[from] guestfs_tools::Error),
    #[error("command {cmd} failed: {msg}")]
    Command { cmd: String, msg: String },
    #[error("network: {0}")]
    Network(#[from] crate::network::Error),
    #[error("timed out: {0}")]
    Timeout(String),
    /// A feature this host has turned off (HTTP 501).
    #[error("disabled: {0}")]
    Disabled(String),
    /// The guest cannot do what is asked (e.g. it has no chpasswd) (HTTP 422).
    #[error("unsupported by the guest: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }

    pub fn sys(what: impl Into<String>, source: nix::Error) -> Self {
        Error::Sys {
            what: what.into(),
            err: source,
        }
    }
}

/// `map_err` helper for std I/O results on a path.
pub fn io<P: Into<PathBuf>>(path: P) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(path, e)
}
