//! One error enum for the library; the CLI adds context at the edge.

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
    /// A structure in the image is malformed. `what` names the structure, `offset` is the
    /// byte offset in the image (or in the filesystem, as the message says).
    #[error("corrupt image: {what} at offset {offset:#x}")]
    Corrupt { what: String, offset: u64 },
    /// The image uses a feature we refuse or do not implement (named in the message).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The image asks for something that our security policy refuses (backing file outside
    /// the allowed directories, external data file, ...).
    #[error("refused: {0}")]
    Refused(String),
    #[error("not found in guest: {0}")]
    NotFound(String),
    #[error("limit exceeded: {0}")]
    Limit(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn corrupt(what: impl Into<String>, offset: u64) -> Self {
        Error::Corrupt {
            what: what.into(),
            offset,
        }
    }
}
