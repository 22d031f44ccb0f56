//! Entering a running guest for `fatbox exec`, with the confinement its init has.
//!
//! nsenter cannot be used for this: joining a user namespace resets the capability bounding
//! set to full, so a bounding set dropped before nsenter would be gone, and nothing runs
//! between nsenter's setns and its exec. Here the whole sequence runs in the child between
//! fork and exec: setns into init's namespaces (user first), root and cwd to init's root,
//! uid/gid 0 of the guest, one more fork so the command is inside the pid namespace, then
//! the bounding set and the seccomp profile, then exec.

use crate::error::{io, Result};
use seccompiler::BpfProgram;
use std::fs::File;
use std::os::fd::AsRawFd;

pub struct Target {
    userns: Option<File>,
    /// (fd, CLONE_NEW* flag), in nsenter's order; mnt last (it resets root and cwd).
    namespaces: Vec<(File, libc::c_int)>,
    root: File,
    filter: Option<BpfProgram>,
}

impl Target {
    /// Opens init's namespaces and root (done before fork: opening allocates).
    pub fn open(init_pid: i32, filter: Option<BpfProgram>) -> Result<Target> {
        let ns = |n: &str| {
            let p = format!("/proc/{init_pid}/ns/{n}");
            File::open(&p).map_err(io(p))
        };
        let userns = if crate::userns::other_userns(init_pid) {
            Some(ns("user")?)
        } else {
            None
        };
        let mut namespaces = Vec::new();
        for (n, flag) in [
            ("cgroup", libc::CLONE_NEWCGROUP),
            ("ipc", libc::CLONE_NEWIPC),
            ("uts", libc::CLONE_NEWUTS),
            ("net", libc::CLONE_NEWNET),
            ("pid", libc::CLONE_NEWPID),
            ("mnt", libc::CLONE_NEWNS),
        ] {
            namespaces.push((ns(n)?, flag));
        }
        let rp = format!("/proc/{init_pid}/root");
        let root = File::open(&rp).map_err(io(rp))?;
        Ok(Target {
            userns,
            namespaces,
            root,
            filter,
        })
    }

    /// Runs in the forked child before exec. Only raw syscalls (no allocation): the parent
    /// may be multi-threaded. The intermediate child waits for the command and exits with
    /// its status, so the caller sees the command's exit code.
    pub fn enter(&self) -> std::io::Result<()> {
        let last = std::io::Error::last_os_error;
        // SAFETY (whole block): raw syscalls on fds we own, integer arguments.
        unsafe {
            if let Some(u) = &self.userns {
                if libc::setns(u.as_raw_fd(), libc::CLONE_NEWUSER) != 0 {
                    return Err(last());
                }
            }
            for (f, flag) in &self.namespaces {
                if libc::setns(f.as_raw_fd(), *flag) != 0 {
                    return Err(last());
                }
            }
            if libc::fchdir(self.root.as_raw_fd()) != 0 {
                return Err(last());
            }
            if libc::chroot(c".".as_ptr()) != 0 {
                return Err(last());
            }
            if self.userns.is_some()
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(0, 0, 0) != 0
                    || libc::setresuid(0, 0, 0) != 0)
            {
                return Err(last());
            }
            match libc::fork() {
                -1 => return Err(last()),
                0 => {}
                child => {
                    // The waiter needs no fd: dropping its copies (std's exec-error pipe above
                    // all) lets the caller's spawn() return once the command has exec'd
                    // instead of when it exits, so it can feed stdin and enforce a deadline.
                    libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                    let mut st: libc::c_int = 0;
                    while libc::waitpid(child, &mut st, 0) < 0 {
                        if *libc::__errno_location() != libc::EINTR {
                            libc::_exit(127);
                        }
                    }
                    let code = if libc::WIFEXITED(st) {
                        libc::WEXITSTATUS(st)
                    } else {
                        128 + libc::WTERMSIG(st)
                    };
                    libc::_exit(code);
                }
            }
        }
        crate::seccomp::drop_bounding(&crate::seccomp::DROP_CAPS)?;
        if let Some(p) = &self.filter {
            crate::seccomp::install(p)?;
        }
        Ok(())
    }
}
