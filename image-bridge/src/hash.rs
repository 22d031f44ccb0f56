//! The digests Glance records for image data (`os_hash_algo`, else the md5 `checksum`).

use crate::{Error, Result};
use md5::Md5;
use sha2::{Digest, Sha256, Sha384, Sha512};

pub enum Hasher {
    Md5(Md5),
    Sha256(Sha256),
    Sha384(Sha384),
    Sha512(Sha512),
}

impl Hasher {
    /// A hasher for one of the algorithms Glance's `hashing_algorithm` may name.
    pub fn new(algo: &str) -> Result<Hasher> {
        Ok(match algo.to_ascii_lowercase().as_str() {
            "md5" => Hasher::Md5(Md5::new()),
            "sha256" => Hasher::Sha256(Sha256::new()),
            "sha384" => Hasher::Sha384(Sha384::new()),
            "sha512" => Hasher::Sha512(Sha512::new()),
            other => {
                return Err(Error::Unsupported(format!(
                    "hash algorithm {other:?} (md5, sha256, sha384, sha512 are known)"
                )))
            }
        })
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish_hex(self) -> String {
        match self {
            Hasher::Md5(h) => hex::encode(h.finalize()),
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha384(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}
