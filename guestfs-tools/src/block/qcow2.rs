//! qcow2 reader (QEMU docs/interop/qcow2.rst).
