//! set_password: a user's password inside a running guest (Nova's set_admin_password), by
//! the guest's own chpasswd so its PAM/shadow settings (hash method, aging) apply. The
//! password travels on chpasswd's stdin only: never in argv, the environment or a log line.

use super::{exec, lock, Manager};
use crate::error::{Error, Result};
use crate::model::{Instance, VmState};
use std::time::Duration;

/// How long chpasswd may take inside the guest before the call gives up.
const CHPASSWD_TIMEOUT: Duration = Duration::from_secs(60);

/// A login name chpasswd accepts and that cannot smuggle a second input line.
fn validate_user(user: &str) -> Result<()> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && !user.starts_with('-')
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "user {user:?}: not a valid login name"
        )))
    }
}

fn validate_password(password: &str) -> Result<()> {
    // chpasswd reads one "user:password" line: a newline would start another entry.
    if password.is_empty() || password.len() > 4096 || password.contains(['\n', '\r', '\0']) {
        return Err(Error::Invalid(
            "password: 1-4096 bytes, no newline or NUL".into(),
        ));
    }
    Ok(())
}

impl Manager {
    pub fn set_password(&self, id: &str, user: Option<&str>, password: &str) -> Result<Instance> {
        let user = user.unwrap_or("root");
        validate_user(user)?;
        validate_password(password)?;
        let inst = self.get(id)?;
        let l = self.op_lock(&inst.uuid);
        let _g = lock(&l);
        let inst = self.get(&inst.uuid)?;
        let init = match (&inst.state, &inst.init) {
            (VmState::Running, Some(p)) if p.alive() => p.pid,
            (s, _) => {
                return Err(Error::Conflict(format!(
                    "cannot set a password in state {s:?} (the guest must run)"
                )))
            }
        };
        let cgroups = self.cgroups(&inst.uuid).dirs;
        let cmd = ["chpasswd".to_string()];
        let req = exec::ExecRequest {
            init_pid: init,
            cgroups: &cgroups,
            cmd: &cmd,
            tty: false,
            term: "dumb".into(),
            seccomp: inst.seccomp,
            allow_perf_event: self.cfg.security.allow_perf_event,
        };
        let line = format!("{user}:{password}\n");
        let (code, stderr) = exec::run_with_input(&req, line.as_bytes(), CHPASSWD_TIMEOUT)?;
        match code {
            0 => {
                tracing::info!(uuid = inst.uuid, user, "password set");
                Ok(inst)
            }
            // The shell's "not found" / "not executable": the guest cannot do it.
            126 | 127 => Err(Error::Unsupported(
                "the guest has no chpasswd: its password cannot be set".into(),
            )),
            _ => {
                // chpasswd does not echo the password, but its PAM modules might.
                let msg = stderr.trim().replace(password, "***");
                Err(Error::Command {
                    cmd: "chpasswd".into(),
                    msg: format!("exit {code}: {msg}"),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_passwords_are_checked() {
        assert!(validate_user("root").is_ok());
        assert!(validate_user("debian").is_ok());
        for bad in ["", "-x", "a:b", "a\nroot", "a b", &"x".repeat(33)] {
            assert!(validate_user(bad).is_err(), "{bad:?}");
        }
        assert!(validate_password("s3cret:with:colons").is_ok());
        for bad in ["", "a\nroot:x", "a\rb", "a\0b"] {
            assert!(validate_password(bad).is_err(), "{bad:?}");
        }
    }
}
