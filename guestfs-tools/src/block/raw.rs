//! Raw disk images.
