//! ext2/3/4 reader in user space.
