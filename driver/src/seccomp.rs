//! The default seccomp profile of a guest and the capability bounding set, both applied just
//! before `/sbin/init` is exec'd (so the whole guest inherits them) and by `fatbox exec`.
//!
//! Built with `seccompiler` (rust-vmm, firecracker's): pure Rust, no libseccomp C library to
//! link or ship, and it compiles rules with argument conditions to a classic BPF program we
//! install ourselves. We do not use its `apply_filter`, which sets `PR_SET_NO_NEW_PRIVS`: that
//! would break setuid binaries (su, sudo, passwd) for the guest's users. Installing without it
//! is allowed because the installer holds CAP_SYS_ADMIN (in its user namespace).
//!
//! The profile is a deny list (default allow) in the spirit of Docker's and Incus' defaults:
//! everything denied answers EPERM, which systemd and friends treat as "not permitted here"
//! rather than crashing, as they would on a kill.

use crate::error::{Error, Result};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// Capabilities removed from the bounding set of every guest: kernel modules, raw I/O,
/// process accounting, reboot/kexec of the host, the host clock, device nodes, audit and
/// LSM policy, the kernel log, wake alarms, suspend blocking, perf and BPF.
/// CAP_SYS_ADMIN stays: systemd needs it for its own namespaces and mounts (inside a user
/// namespace it only covers the guest's own namespaces).
pub const DROP_CAPS: [u32; 14] = [
    16, // SYS_MODULE
    17, // SYS_RAWIO
    20, // SYS_PACCT
    22, // SYS_BOOT
    25, // SYS_TIME
    27, // MKNOD
    30, // AUDIT_CONTROL
    32, // MAC_OVERRIDE
    33, // MAC_ADMIN
    34, // SYSLOG
    35, // WAKE_ALARM
    36, // BLOCK_SUSPEND
    38, // PERFMON
    39, // BPF
];

/// What the profile denies, as (name, syscall number). Names are kept for the docs, the
/// tests and the log line.
fn denied(allow_perf: bool) -> Vec<(&'static str, i64)> {
    let mut v: Vec<(&'static str, i64)> = vec![
        ("kexec_load", libc::SYS_kexec_load),
        ("kexec_file_load", libc::SYS_kexec_file_load),
        ("init_module", libc::SYS_init_module),
        ("finit_module", libc::SYS_finit_module),
        ("delete_module", libc::SYS_delete_module),
        // The program type sits behind a pointer, out of seccomp's reach: all of bpf(2).
        // systemd falls back to no BPF firewalling/device policy on EPERM.
        ("bpf", libc::SYS_bpf),
        ("keyctl", libc::SYS_keyctl),
        ("add_key", libc::SYS_add_key),
        ("request_key", libc::SYS_request_key),
        // name_to_handle_at stays: systemd uses it to compare mount ids.
        ("open_by_handle_at", libc::SYS_open_by_handle_at),
        ("userfaultfd", libc::SYS_userfaultfd),
        // adjtimex/clock_adjtime stay for reading the NTP state (timedatectl); setting the
        // clock through them needs CAP_SYS_TIME in the initial namespace, which is dropped.
        ("settimeofday", libc::SYS_settimeofday),
        ("clock_settime", libc::SYS_clock_settime),
        ("swapon", libc::SYS_swapon),
        ("swapoff", libc::SYS_swapoff),
        ("reboot", libc::SYS_reboot),
        ("acct", libc::SYS_acct),
        ("quotactl", libc::SYS_quotactl),
        ("quotactl_fd", libc::SYS_quotactl_fd),
        ("lookup_dcookie", libc::SYS_lookup_dcookie),
        ("uselib", libc::SYS_uselib),
        ("_sysctl", libc::SYS__sysctl),
        ("nfsservctl", libc::SYS_nfsservctl),
        // A large, often-exploited surface that nothing in a systemd guest needs.
        ("io_uring_setup", libc::SYS_io_uring_setup),
        ("io_uring_enter", libc::SYS_io_uring_enter),
        ("io_uring_register", libc::SYS_io_uring_register),
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([("iopl", libc::SYS_iopl), ("ioperm", libc::SYS_ioperm)]);
    if !allow_perf {
        v.push(("perf_event_open", libc::SYS_perf_event_open));
    }
    v
}

/// personality(2) values allowed (Docker's list): Linux, Linux32, UNAME26 and the query.
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// The names the profile denies (for docs and logs).
pub fn denied_names(allow_perf: bool) -> Vec<&'static str> {
    let mut v: Vec<_> = denied(allow_perf).into_iter().map(|(n, _)| n).collect();
    v.push("personality(other than Linux/Linux32/UNAME26)");
    v
}

/// The compiled profile.
pub fn build(allow_perf: bool) -> Result<BpfProgram> {
    let err = |e: seccompiler::BackendError| Error::Other(format!("seccomp profile: {e}"));
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = denied(allow_perf)
        .into_iter()
        .map(|(_, nr)| (nr, Vec::new()))
        .collect();
    let conds = PERSONALITIES
        .iter()
        .map(|p| SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, *p))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(err)?;
    rules.insert(
        libc::SYS_personality,
        vec![SeccompRule::new(conds).map_err(err)?],
    );
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| Error::Other(format!("seccomp: {e:?}")))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(err)?;
    let mut prog: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(e))?;
    deny_x32(&mut prog);
    Ok(prog)
}

/// A deny list keyed on syscall numbers is bypassed by the x32 ABI (same arch, numbers with
/// bit 30 set) where the kernel has it: refuse every such call. seccompiler's program starts
/// with the arch check (load arch, jump-if-equal over a kill, kill); the x32 check goes right
/// after it, where that jump lands, so no other relative jump is disturbed.
fn deny_x32(prog: &mut BpfProgram) {
    if !cfg!(target_arch = "x86_64") || prog.len() < 3 {
        return;
    }
    // BPF_LD | BPF_W | BPF_ABS, BPF_JMP | BPF_JGE | BPF_K, BPF_RET | BPF_K.
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JGE_K: u16 = 0x05 | 0x30;
    const BPF_RET_K: u16 = 0x06;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let ins = [
        seccompiler::sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0, // seccomp_data.nr
        },
        seccompiler::sock_filter {
            code: BPF_JGE_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        seccompiler::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | (libc::EPERM as u32),
        },
    ];
    prog.splice(3..3, ins);
}

/// Installs `prog` on the calling thread (inherited across fork and exec). Does not set
/// no_new_privs: the caller must hold CAP_SYS_ADMIN in its user namespace.
/// Only raw syscalls: safe between fork and exec.
pub fn install(prog: &BpfProgram) -> std::io::Result<()> {
    let len =
        u16::try_from(prog.len()).map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?;
    let fprog = libc::sock_fprog {
        len,
        // Same layout (struct sock_filter), two crates' definitions.
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: fprog points at prog's instructions, alive for the call; the kernel copies them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Drops `caps` from the bounding set (raw prctl: safe between fork and exec). Unknown
/// capability numbers (older kernels) are skipped.
pub fn drop_bounding(caps: &[u32]) -> std::io::Result<()> {
    for cap in caps {
        // SAFETY: prctl with integer arguments.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(*cap), 0, 0, 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_compiles_with_x32_guard() {
        let p = build(false).expect("profile");
        assert!(p.len() > 30, "{} instructions", p.len());
        assert_eq!(p[3].k, 0, "x32 guard loads nr right after the arch check");
        assert_eq!(p[4].k, 0x4000_0000);
        let with_perf = build(true).expect("profile");
        assert!(with_perf.len() < p.len());
        assert!(denied_names(false).contains(&"perf_event_open"));
        assert!(!denied_names(true).contains(&"perf_event_open"));
    }

    /// Installs the profile in a forked child and checks a denied call gets EPERM while an
    /// allowed one works (needs root for CAP_SYS_ADMIN; skipped otherwise).
    #[test]
    fn denied_calls_get_eperm() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let prog = build(false).expect("profile");
        // SAFETY: the child only makes raw syscalls and _exits.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                let code = (|| {
                    if install(&prog).is_err() {
                        return 10;
                    }
                    // SAFETY: raw syscalls with integer/null arguments.
                    let r = unsafe { libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0) };
                    if r != -1
                        || std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM)
                    {
                        return 11;
                    }
                    // SAFETY: as above.
                    let r = unsafe { libc::syscall(libc::SYS_personality, 0x0040000u64) };
                    if r != -1 {
                        return 12;
                    }
                    // SAFETY: as above.
                    let r = unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
                    if r == -1 {
                        return 13;
                    }
                    // SAFETY: as above.
                    let r = unsafe { libc::syscall(0x4000_0000 | libc::SYS_getpid) };
                    if r != -1
                        || std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM)
                    {
                        return 14;
                    }
                    if std::process::id() == 0 {
                        return 15;
                    }
                    0
                })();
                // SAFETY: leave the forked test process without unwinding.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).expect("wait");
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
