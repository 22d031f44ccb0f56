//! fatbox-img: reads VM disks in user space (no kernel mount of untrusted images, unless the
//! user opts in with `--kernel-mount` for xfs/btrfs: [`kmount`]) and turns them into layered
//! OCI root filesystems.
//!
//! Layers, bottom up: [`block`] (raw, qcow2 with backing chains) → [`part`] (GPT, MBR) →
//! [`ext4`] (ext2/3/4 reader) → [`guest`] (the guest's fstab merged into one tree) →
//! [`tarout`] / [`oci`] (PAX tar streams and OCI image layouts) with [`containerize`]
//! operations applied as a separate layer.

pub mod block;
pub mod containerize;
pub mod convert;
pub mod error;
pub mod ext4;
pub mod guest;
pub mod inspect;
pub mod kmount;
pub mod loopdev;
pub mod oci;
pub mod part;
pub mod tarout;

pub use error::{Error, Result};
