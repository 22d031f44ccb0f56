//! fatbox runtime: fat containers (systemd as PID 1) that live like VMs.
//!
//! `fatboxd` serves the REST API ([`api`]) over a unix socket and drives instances through
//! [`ops::Manager`]; each running instance has its own monitor process ([`monitor`]) so
//! instances survive fatboxd restarts. `fatbox` is a thin CLI client ([`client`]).

pub mod api;
pub mod cgroups;
pub mod client;
pub mod config;
pub mod configdrive;
pub mod console;
pub mod disk;
pub mod enter;
pub mod error;
pub mod glance;
pub mod host;
pub mod hostkeys;
pub mod images;
pub mod model;
pub mod monitor;
pub mod network;
pub mod ops;
pub mod procfs;
pub mod seccomp;
pub mod spec;
pub mod userns;
pub mod vifs;

pub use error::{Error, Result};
