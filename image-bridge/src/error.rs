//! Typed errors of the bridge.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Http {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    /// Glance (or Keystone) answered with an error status.
    #[error("{what}: HTTP {status}: {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    #[error("image {id} not found in Glance")]
    NotFound { id: String },
    /// The downloaded data does not match what Glance recorded at upload; nothing was kept.
    #[error("image {id}: {algo} mismatch: Glance recorded {expected}, the downloaded data hashes to {got}; download discarded")]
    HashMismatch {
        id: String,
        algo: String,
        expected: String,
        got: String,
    },
    #[error("image {id}: Glance says {expected} bytes, received {got}; download discarded")]
    SizeMismatch { id: String, expected: u64, got: u64 },
    #[error("image {id} is {status} in Glance, not active")]
    NotActive { id: String, status: String },
    #[error("unsupported image: {0}")]
    Unsupported(String),
    #[error("keystone: {0}")]
    Auth(String),
    #[error("conversion: {0}")]
    Convert(#[from] guestfs_tools::Error),
    #[error("command {cmd} failed: {msg}")]
    Command { cmd: String, msg: String },
    #[error("layer cache: {0}")]
    Cache(String),
    #[error("invalid: {0}")]
    Invalid(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Errors worth retrying: the connection dropped or the server is briefly unavailable.
    pub fn transient(&self) -> bool {
        match self {
            Error::Http { source, .. } => {
                source.is_connect()
                    || source.is_timeout()
                    || source.is_body()
                    || source.is_request()
                    || source.is_decode()
            }
            Error::Status { status, .. } => matches!(status, 408 | 429 | 500 | 502 | 503 | 504),
            _ => false,
        }
    }
}

/// `map_err` helper for std I/O results on a path.
pub fn io<P: Into<PathBuf>>(path: P) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(path, e)
}
