//! A pool of pre-generated SSH host key sets, so a first boot does not wait for them.
//!
//! Containerized images have their host keys removed and generate them at first boot
//! (`fatbox-ssh-keygen.service`, `ssh-keygen -A`, ordered before sshd). RSA key generation is
//! a random prime search: 0.3–2.7 s here, most of a first boot and almost all of its
//! variance. fatboxd keeps a few key sets ready under `<state_dir>/hostkeys/ready`, made in a
//! background thread at the lowest CPU priority, and writes one set into a new instance's
//! /etc/ssh before init starts; `ssh-keygen -A` then finds every key present and does
//! nothing. Each set is handed out once (claimed by a rename, then deleted), so no two
//! instances share a key. An empty pool only means the guest generates its own, as before.

use crate::error::{io, Error, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};

/// The key types `ssh-keygen -A` makes on Debian's OpenSSH (dsa is gone since 9.x).
pub const KEY_TYPES: [&str; 3] = ["rsa", "ecdsa", "ed25519"];

pub struct KeyPool {
    dir: PathBuf,
    target: usize,
    /// Wakes the refill thread when a set was taken.
    wake: Arc<(Mutex<bool>, Condvar)>,
}

impl KeyPool {
    /// A pool of `target` sets under `state_dir/hostkeys`; 0 turns it off.
    pub fn new(state_dir: &Path, target: usize) -> KeyPool {
        KeyPool {
            dir: state_dir.join("hostkeys"),
            target,
            wake: Arc::new((Mutex::new(true), Condvar::new())),
        }
    }

    fn ready(&self) -> PathBuf {
        self.dir.join("ready")
    }

    fn ready_sets(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.ready())
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Number of sets ready now.
    pub fn len(&self) -> usize {
        self.ready_sets().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts the thread that keeps `target` sets ready. Leftovers of an interrupted
    /// generation or hand-out are removed first: a half-written or half-copied set is never
    /// used.
    pub fn start(self: &Arc<Self>) -> Result<()> {
        if self.target == 0 {
            return Ok(());
        }
        let ready = self.ready();
        std::fs::create_dir_all(&ready).map_err(io(&ready))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(&self.dir))?;
        for e in std::fs::read_dir(&self.dir)
            .map_err(io(&self.dir))?
            .flatten()
        {
            if e.file_name() != "ready" {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let me = self.clone();
        std::thread::Builder::new()
            .name("hostkey-pool".into())
            .spawn(move || me.refill_loop())
            .map_err(io("hostkey-pool thread"))?;
        Ok(())
    }

    fn refill_loop(&self) {
        // Key generation is background work: boots and API calls go first.
        // SAFETY: setpriority on this thread's own id; no memory is passed.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
        }
        loop {
            while self.len() < self.target {
                if let Err(e) = self.generate() {
                    tracing::warn!(error = %e, "ssh host key pool: generation failed; guests make their own keys");
                    return;
                }
            }
            let (m, cv) = &*self.wake;
            let mut woken = m.lock().unwrap_or_else(|p| p.into_inner());
            while !*woken {
                woken = cv.wait(woken).unwrap_or_else(|p| p.into_inner());
            }
            *woken = false;
        }
    }

    /// Makes one set in a temp dir and renames it into `ready` (a crash leaves no half set).
    fn generate(&self) -> Result<()> {
        let tmp = tempfile::Builder::new()
            .prefix("gen-")
            .tempdir_in(&self.dir)
            .map_err(io(&self.dir))?;
        for t in KEY_TYPES {
            // A relative name: the command line then does not name the state dir, where
            // tools that count fatboxd's processes by it (its tests) would take it for one.
            let out = Command::new("ssh-keygen")
                .args(["-q", "-N", "", "-C", "root@fatbox", "-t", t, "-f"])
                .arg(format!("ssh_host_{t}_key"))
                .current_dir(tmp.path())
                .stdin(Stdio::null())
                .output()
                .map_err(io("ssh-keygen"))?;
            if !out.status.success() {
                return Err(Error::Command {
                    cmd: format!("ssh-keygen -t {t}"),
                    msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
        }
        for e in std::fs::read_dir(tmp.path())
            .map_err(io(tmp.path()))?
            .flatten()
        {
            let f = std::fs::File::open(e.path()).map_err(io(e.path()))?;
            f.sync_all().map_err(io(e.path()))?;
        }
        let dest = self.ready().join(uuid::Uuid::new_v4().to_string());
        let kept = tmp.keep();
        std::fs::rename(&kept, &dest).map_err(io(&dest))?;
        std::fs::File::open(self.ready())
            .and_then(|d| d.sync_all())
            .map_err(io(self.ready()))?;
        Ok(())
    }

    /// Claims one ready set (it leaves `ready` by a rename, so two boots never get the same
    /// one) and returns its directory; the caller removes it when done. None: pool empty.
    pub fn take(&self) -> Option<TakenSet> {
        if self.target == 0 {
            return None;
        }
        let mut got = None;
        for set in self.ready_sets() {
            let claimed = self
                .dir
                .join(format!("taken-{}", set.file_name()?.to_string_lossy()));
            if std::fs::rename(&set, &claimed).is_ok() {
                got = Some(TakenSet { dir: claimed });
                break;
            }
        }
        let (m, cv) = &*self.wake;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_one();
        got
    }
}

/// A key set taken from the pool; its files are deleted when it is dropped (used or not).
pub struct TakenSet {
    dir: PathBuf,
}

impl TakenSet {
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TakenSet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes a taken set into the guest's /etc/ssh when the image has sshd and no host keys
/// yet (a later boot keeps the keys of the first). `owner`: the guest root's host uid/gid
/// (user namespace), else files stay root's. Returns whether keys were written.
pub fn install(pool: &KeyPool, rootfs: &Path, owner: Option<u32>) -> Result<bool> {
    let ssh = rootfs.join("etc/ssh");
    // Our writes must not follow a symlink planted in the image.
    let is_real_dir = |p: &Path| p.symlink_metadata().is_ok_and(|m| m.is_dir());
    if !is_real_dir(&rootfs.join("etc")) || !is_real_dir(&ssh) {
        return Ok(false);
    }
    if rootfs.join("usr/sbin/sshd").symlink_metadata().is_err() {
        return Ok(false);
    }
    let have_any = std::fs::read_dir(&ssh)
        .map_err(io(&ssh))?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("ssh_host_"));
    if have_any {
        return Ok(false);
    }
    let Some(set) = pool.take() else {
        return Ok(false);
    };
    use std::os::unix::fs::PermissionsExt;
    for t in KEY_TYPES {
        for (suffix, mode) in [("", 0o600), (".pub", 0o644)] {
            let name = format!("ssh_host_{t}_key{suffix}");
            let src = set.path().join(&name);
            let dst = ssh.join(&name);
            let data = std::fs::read(&src).map_err(io(&src))?;
            let tmp = ssh.join(format!(".{name}.fatbox"));
            let _ = std::fs::remove_file(&tmp);
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io(&tmp))?;
                f.write_all(&data).map_err(io(&tmp))?;
                f.sync_all().map_err(io(&tmp))?;
            }
            if let Some(id) = owner {
                std::os::unix::fs::lchown(&tmp, Some(id), Some(id)).map_err(io(&tmp))?;
            }
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
                .map_err(io(&tmp))?;
            std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
        }
    }
    Ok(true)
}
