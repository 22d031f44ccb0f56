//! Partition tables: GPT, MBR (with extended/logical partitions), or a whole-disk filesystem.
