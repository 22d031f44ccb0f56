//! Placeholder: built by its own issue.
pub mod network;
