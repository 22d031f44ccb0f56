//! image-bridge: boots straight from Glance.
//!
//! * [`glance`]: a Glance v2 client — show, hash-verified streamed download with retry and
//!   Range resume, create + streamed upload, property patches.
//! * [`keystone`]: Keystone v3 tokens (password or application credential), reused until
//!   shortly before expiry, and the image endpoint from the service catalog.
//! * [`cache`]: the layer cache — one OCI layout plus unpacked lower dirs, filled by
//!   `ensure_image` (download → fatbox-img conversion → unpack) once per image however many
//!   callers ask at once, crash-safe, LRU-evicted under a size cap except what is pinned.
//! * [`snapshot`]: an overlay upper dir as one OCI layer, published to Glance with its parent
//!   chain in the image properties; the cache fetches such chains parent first.

pub mod cache;
pub mod docker;
pub mod error;
pub mod glance;
pub mod hash;
pub mod keystone;
pub mod lock;
pub mod snapshot;

pub use cache::{CacheOptions, CachedImage, LayerCache, Progress};
pub use error::{Error, Result};
pub use glance::GlanceClient;
