//! Error type of the crate.

use std::path::PathBuf;

/// Errors of `procfs-fuse`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a file, with the path that caused it.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A kernel or cgroup file had content we could not parse.
    #[error("{path}: cannot parse: {what}")]
    Parse { path: PathBuf, what: String },
    /// A registry record is invalid.
    #[error("invalid record: {0}")]
    Record(String),
    /// JSON (de)serialisation of a record failed.
    #[error("record json: {0}")]
    Json(#[from] serde_json::Error),
    /// The file name is not one we serve.
    #[error("unknown file {0:?}")]
    UnknownFile(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Crate result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn parse(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Parse {
            path: path.into(),
            what: what.into(),
        }
    }
    pub(crate) fn sys(what: &'static str, source: std::io::Error) -> Self {
        Error::Sys { what, source }
    }
    /// True when the error means "the thing is gone" (deleted cgroup, exited pid).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound
            || source.raw_os_error() == Some(libc::ESRCH))
    }
}

/// Read a small kernel file to a string.
pub(crate) fn read_string(path: impl AsRef<std::path::Path>) -> Result<String> {
    let path = path.as_ref();
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}
