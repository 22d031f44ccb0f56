//! Loop devices set up with one `LOOP_CONFIGURE` ioctl (backing file, range, flags at once),
//! shared by `fatbox-img --kernel-mount` and fatboxd's instance disks. `losetup` would be a
//! separate process per attach and cannot give autoclear and the range in one step.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// Free devices another process may take between GET_FREE and CONFIGURE.
const ATTEMPTS: usize = 64;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// How to attach: a range of the backing file (size 0 = to its end), read-only or not, and
/// a name shown by `losetup -l` (cut at 63 bytes).
#[derive(Debug, Clone, Default)]
pub struct LoopOptions<'a> {
    pub offset: u64,
    pub size: u64,
    pub read_only: bool,
    pub name: &'a str,
}

/// Attaches `backing` to a free loop device with autoclear (the kernel detaches it when the
/// last user, the returned file or a mount, goes away, even after a SIGKILL). Returns the
/// open device and its path. Callers that attach from several threads at once should
/// serialise: GET_FREE hands every caller the same device until one configures it (the
/// retries cover other processes, not a burst of our own).
pub fn attach(backing: &File, opts: &LoopOptions) -> std::io::Result<(File, PathBuf)> {
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    let fd = u32::try_from(backing.as_raw_fd())
        .map_err(|_| std::io::Error::other("negative file descriptor"))?;
    let mut name = [0u8; 64];
    let n = opts.name.len().min(63);
    name[..n].copy_from_slice(&opts.name.as_bytes()[..n]);
    let mut flags = LO_FLAGS_AUTOCLEAR;
    if opts.read_only {
        flags |= LO_FLAGS_READ_ONLY;
    }
    let mut last = std::io::Error::other("no free loop device");
    for _ in 0..ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = match OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(&path)
        {
            Ok(f) => f,
            // udev may not have made the node yet, or another process holds it: next one.
            Err(e) => {
                last = e;
                continue;
            }
        };
        let cfg = LoopConfig {
            fd,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: opts.offset,
                lo_sizelimit: opts.size,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: flags,
                lo_file_name: name,
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: cfg is a properly laid out struct loop_config that outlives the call.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if r == 0 {
            return Ok((dev, path));
        }
        last = std::io::Error::last_os_error();
        // EBUSY: another process configured it first. Anything else is about our request.
        if last.raw_os_error() != Some(libc::EBUSY) {
            return Err(last);
        }
    }
    Err(last)
}
