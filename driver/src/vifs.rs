//! Instance NICs in the lifecycle: the instance's network namespace is created and its VIFs
//! plugged (and the guest's network config written) before init starts; stop and delete
//! unplug them; fatboxd restart re-ensures them; attach/detach hot-plug them.
//!
//! The network module is async (rtnetlink, OVSDB over tokio) while the manager's operations
//! are blocking: they run network steps on a small runtime of their own, which also works from
//! the API's blocking pool and from code outside any runtime (tests' cleanup).

use crate::error::{Error, Result};
use crate::model::{Instance, VmState};
use crate::network::{self, InstanceNic, NetnsRef, Network, NicSpec};
use crate::ops::Manager;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The lazily connected network service of a manager (no OVSDB connection is made while no
/// instance has a NIC).
#[derive(Default)]
pub struct NetState {
    net: Mutex<Option<Arc<Network>>>,
}

fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RT.get() {
        return Ok(rt);
    }
    // One worker: the OVSDB reader and the netlink socket keep running between calls.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fatbox-net")
        .enable_all()
        .build()
        .map_err(|e| Error::io("tokio runtime", e))?;
    Ok(RT.get_or_init(|| rt))
}

fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    Ok(runtime()?.block_on(f))
}

/// Parses the API's `nics` (CLI strings, `{"spec": ..}` or VIF objects) into slots eth0...
pub fn parse_nics(reqs: &[serde_json::Value]) -> Result<Vec<InstanceNic>> {
    let mut out: Vec<InstanceNic> = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let nic = network::nic_from_json(r)?;
        if out.iter().any(|n| n.nic.port_id == nic.port_id) {
            return Err(Error::Invalid(format!(
                "nics: port id {:?} given twice",
                nic.port_id
            )));
        }
        if out
            .iter()
            .any(|n| n.nic.effective_mac() == nic.effective_mac())
        {
            return Err(Error::Invalid(format!(
                "nics: MAC {} given twice",
                nic.effective_mac()
            )));
        }
        let index = u32::try_from(i).map_err(|_| Error::Invalid("too many nics".into()))?;
        out.push(InstanceNic { index, nic });
    }
    Ok(out)
}

fn lowest_free_index(nics: &[InstanceNic]) -> u32 {
    (0u32..)
        .find(|i| !nics.iter().any(|n| n.index == *i))
        .unwrap_or(0)
}

fn guest_nics(nics: &[InstanceNic]) -> Vec<(u32, NicSpec)> {
    nics.iter().map(|n| (n.index, n.nic.clone())).collect()
}

impl Manager {
    fn network(&self) -> Result<Arc<Network>> {
        let mut g = self.net.net.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = g.as_ref() {
            return Ok(n.clone());
        }
        let n = Arc::new(block_on(Network::connect(&self.cfg.network))??);
        *g = Some(n.clone());
        Ok(n)
    }

    pub fn netns_path(&self, uuid: &str) -> PathBuf {
        self.dir(uuid).join(network::NETNS_FILE)
    }

    /// Create-time checks against OVSDB, so a bad NIC is refused before anything exists.
    pub(crate) fn precheck_nics(&self, uuid: &str, nics: &[InstanceNic]) -> Result<()> {
        if nics.is_empty() {
            return Ok(());
        }
        let net = self.network()?;
        for n in nics {
            block_on(net.precheck(uuid, &n.nic))??;
        }
        Ok(())
    }

    /// Power-on step before the monitor starts: the instance's netns, the guest's network
    /// config in the rootfs, every VIF plugged (idempotently).
    pub(crate) fn plug_vifs(&self, inst: &Instance, rootfs: &Path) -> Result<()> {
        let ns = self.netns_path(&inst.uuid);
        match inst.idmap.filter(|_| inst.userns) {
            // Owned by the guest's user namespace, or its root could not configure its NICs.
            Some(r) => crate::userns::create_netns_owned(&ns, &r)?,
            None => network::create_netns(&ns)?,
        }
        if inst.nics.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        let kind = network::write_guest_config(rootfs, &guest_nics(&inst.nics))?;
        let net = self.network()?;
        for n in &inst.nics {
            block_on(net.ensure(&inst.uuid, &NetnsRef::Path(ns.clone()), n.index, &n.nic))??;
        }
        tracing::info!(
            uuid = inst.uuid,
            nics = inst.nics.len(),
            ?kind,
            ms = t.elapsed().as_millis() as u64,
            "VIFs plugged"
        );
        Ok(())
    }

    /// Removes the instance's OVS ports and veths (found in OVSDB by vm-uuid and on the host
    /// by link alias, so it works when the netns is already gone), then its netns.
    pub(crate) fn unplug_vifs(&self, inst: &Instance) -> Result<()> {
        if !inst.nics.is_empty() {
            let net = self.network()?;
            block_on(net.cleanup_instance(&inst.uuid))??;
        }
        network::remove_netns(&self.netns_path(&inst.uuid))?;
        Ok(())
    }

    /// Live-restore: re-ensures the ports of running instances (a port removed or changed
    /// while fatboxd was away is repaired; a correct one is kept).
    pub fn restore_vifs(&self) {
        for inst in self.list() {
            if !matches!(
                inst.state,
                VmState::Running | VmState::Paused | VmState::Suspended | VmState::Rescued
            ) || inst.nics.is_empty()
            {
                continue;
            }
            let l = self.op_lock(&inst.uuid);
            let _g = l.lock().unwrap_or_else(|p| p.into_inner());
            let ns = self.netns_path(&inst.uuid);
            if !network::is_netns(&ns) {
                tracing::warn!(
                    uuid = inst.uuid,
                    "running instance has no netns file; VIFs not restored"
                );
                continue;
            }
            let r = self.network().and_then(|net| {
                for n in &inst.nics {
                    block_on(net.ensure(
                        &inst.uuid,
                        &NetnsRef::Path(ns.clone()),
                        n.index,
                        &n.nic,
                    ))??;
                }
                Ok(())
            });
            match r {
                Ok(()) => tracing::info!(uuid = inst.uuid, "VIFs re-ensured"),
                Err(e) => tracing::warn!(uuid = inst.uuid, error = %e, "re-plugging VIFs failed"),
            }
        }
    }

    pub fn interfaces(&self, id: &str) -> Result<Vec<InstanceNic>> {
        Ok(self.get(id)?.nics)
    }

    /// Hot-plug: a running instance gets the VIF at once as its lowest free `eth<N>` and the
    /// guest configures it; a powered-off one gets it at its next boot.
    pub fn attach_interface(&self, id: &str, req: &serde_json::Value) -> Result<InstanceNic> {
        let inst = self.get(id)?;
        let l = self.op_lock(&inst.uuid);
        let _g = l.lock().unwrap_or_else(|p| p.into_inner());
        let inst = self.get(&inst.uuid)?;
        let nic = network::nic_from_json(req)?;
        if inst.nics.iter().any(|n| n.nic.port_id == nic.port_id) {
            return Err(Error::Conflict(format!(
                "port {:?} is already attached",
                nic.port_id
            )));
        }
        let new = InstanceNic {
            index: lowest_free_index(&inst.nics),
            nic,
        };
        let running = matches!(inst.state, VmState::Running | VmState::Paused);
        match inst.state {
            VmState::Running | VmState::Paused | VmState::Shutoff | VmState::Error => {}
            s => {
                return Err(Error::Conflict(format!(
                    "cannot attach an interface in state {s:?}"
                )))
            }
        }
        let net = self.network()?;
        if running {
            let ns = self.netns_path(&inst.uuid);
            block_on(net.plug(&inst.uuid, &NetnsRef::Path(ns), new.index, &new.nic))??;
        } else {
            block_on(net.precheck(&inst.uuid, &new.nic))??;
        }
        let saved = self.update(&inst.uuid, |i| i.nics.push(new.clone()));
        let inst = match saved {
            Ok(i) => i,
            Err(e) => {
                if running {
                    let _ = block_on(net.unplug(&inst.uuid, &new.nic.port_id));
                }
                return Err(e);
            }
        };
        if running {
            self.configure_guest(&inst, Some(&new), None)?;
        }
        tracing::info!(
            uuid = inst.uuid,
            port = new.nic.port_id,
            ifname = new.ifname(),
            "interface attached"
        );
        Ok(new)
    }

    /// Hot-unplug: the guest lets go of `eth<N>`, the veth and the OVS port go away.
    pub fn detach_interface(&self, id: &str, port_id: &str) -> Result<()> {
        let inst = self.get(id)?;
        let l = self.op_lock(&inst.uuid);
        let _g = l.lock().unwrap_or_else(|p| p.into_inner());
        let inst = self.get(&inst.uuid)?;
        let Some(old) = inst.nics.iter().find(|n| n.nic.port_id == port_id).cloned() else {
            return Err(Error::NotFound(format!(
                "interface {port_id:?} of instance {}",
                inst.name
            )));
        };
        let running = matches!(inst.state, VmState::Running | VmState::Paused);
        if running {
            // Best effort: ifupdown would otherwise keep eth<N> in its state file.
            let _ = self.guest_ifdown(&inst, &old);
        }
        let net = self.network()?;
        block_on(net.unplug(&inst.uuid, port_id))??;
        let inst = self.update(&inst.uuid, |i| i.nics.retain(|n| n.nic.port_id != port_id))?;
        if running {
            self.configure_guest(&inst, None, Some(&old))?;
        }
        tracing::info!(uuid = inst.uuid, port = port_id, "interface detached");
        Ok(())
    }

    /// Rewrites the guest's network config for the current NICs and, for a hot-plugged one,
    /// has the guest's own network stack bring it up.
    fn configure_guest(
        &self,
        inst: &Instance,
        added: Option<&InstanceNic>,
        removed: Option<&InstanceNic>,
    ) -> Result<()> {
        let rootfs = self.dir(&inst.uuid).join("rootfs");
        let kind = network::write_guest_config(&rootfs, &guest_nics(&inst.nics))?;
        if let Some(r) = removed {
            network::remove_guest_config(&rootfs, r.index)?;
        }
        let Some(n) = added else { return Ok(()) };
        let ifname = n.ifname();
        let cmd: Vec<&str> = match kind {
            Some(network::GuestNetworkConfig::Ifupdown) => vec!["ifup", &ifname],
            Some(network::GuestNetworkConfig::Networkd { .. }) => vec!["networkctl", "reload"],
            Some(network::GuestNetworkConfig::Netplan) => vec!["netplan", "apply"],
            None => return Ok(()),
        };
        if let Err(e) = self.guest_run(inst, &cmd) {
            tracing::warn!(uuid = inst.uuid, ifname, error = %e, "guest did not configure the new interface");
        }
        Ok(())
    }

    fn guest_ifdown(&self, inst: &Instance, nic: &InstanceNic) -> Result<()> {
        let rootfs = self.dir(&inst.uuid).join("rootfs");
        if network::detect_guest_network(&rootfs)? == Some(network::GuestNetworkConfig::Ifupdown) {
            self.guest_run(inst, &["ifdown", "--force", &nic.ifname()])?;
        }
        Ok(())
    }

    /// Runs a command in every namespace of the instance's init, with a deadline.
    fn guest_run(&self, inst: &Instance, cmd: &[&str]) -> Result<()> {
        let init = inst
            .init
            .as_ref()
            .filter(|p| p.alive())
            .ok_or_else(|| Error::Conflict("instance has no init".into()))?;
        let mut child = Command::new("nsenter")
            .args(crate::ops::nsenter_args(init.pid))
            .args(cmd)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io("nsenter", e))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().map_err(|e| Error::io("nsenter", e))? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Timeout(format!("{cmd:?} in the guest")));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if status.success() {
            return Ok(());
        }
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        Err(Error::Command {
            cmd: cmd.join(" "),
            msg: format!("{status}: {}", err.trim()),
        })
    }
}
