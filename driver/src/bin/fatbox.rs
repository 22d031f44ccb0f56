//! fatbox: the command-line client of fatboxd.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use driver::client::Client;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(version, about = "fatbox: run VM images as fat containers")]
struct Args {
    #[arg(long, env = "FATBOX_SOCKET", default_value = driver::config::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Image store.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Create and boot an instance; waits until systemd inside is up and prints its uuid.
    #[command(alias = "create")]
    Run {
        #[arg(long)]
        image: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        vcpus: u32,
        /// MiB.
        #[arg(long)]
        memory: u64,
        /// GiB.
        #[arg(long)]
        disk: u64,
        #[arg(long)]
        swap: Option<u64>,
        #[arg(long)]
        ssh_key: Option<PathBuf>,
        #[arg(long)]
        uuid: Option<String>,
        /// A NIC on the integration bridge (repeatable, eth0, eth1, ... in order):
        /// vlan=100,ip=10.20.0.5/24[,gw=..][,mac=..][,mtu=..][,port=ID][,dns=..][,dhcp].
        #[arg(long)]
        nic: Vec<String>,
        /// Return at once (state building) instead of waiting for the boot.
        #[arg(long)]
        no_wait: bool,
        /// Trusted workload: no user namespace and no seccomp profile (the host must allow
        /// it with `[security] allow_privileged = true`).
        #[arg(long)]
        privileged: bool,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    Start {
        id: String,
    },
    Stop {
        id: String,
        /// Seconds before SIGKILL.
        #[arg(long)]
        timeout: Option<u64>,
    },
    Reboot {
        id: String,
        #[arg(long)]
        hard: bool,
    },
    Pause {
        id: String,
    },
    /// Thaw a paused or suspended instance.
    Resume {
        id: String,
    },
    /// Freeze every process of the instance (state suspended).
    Suspend {
        id: String,
    },
    /// Change vcpus/memory live (cgroups) and grow the disk (online ext4 grow).
    Resize {
        id: String,
        #[arg(long)]
        vcpus: Option<u32>,
        /// MiB.
        #[arg(long)]
        memory: Option<u64>,
        /// GiB (grow only).
        #[arg(long)]
        disk: Option<u64>,
        /// MiB.
        #[arg(long)]
        swap: Option<u64>,
    },
    /// Recreate the root disk from an image (default: the current one); its files are lost.
    Rebuild {
        id: String,
        #[arg(long)]
        image: Option<String>,
    },
    /// Boot a rescue image with the instance's root filesystem at /mnt/rescue.
    Rescue {
        id: String,
        #[arg(long)]
        image: Option<String>,
    },
    /// Leave rescue: boot the instance from its own disk again.
    Unrescue {
        id: String,
    },
    Delete {
        id: String,
    },
    /// Attach to the console (Ctrl-] detaches; without a terminal, a pipe: stdin in, output
    /// out, until the console closes or a signal); `--log` prints the tail of console.log.
    Console {
        id: String,
        /// Print the tail of console.log and exit instead of attaching.
        #[arg(long)]
        log: bool,
        /// With --log: how many bytes of the log.
        #[arg(long, default_value_t = 65536, requires = "log")]
        bytes: u64,
        /// Attach: replay this many bytes of the log first.
        #[arg(long, default_value_t = 0, conflicts_with = "log")]
        tail: u64,
        /// Attach without sending input (input is read and discarded).
        #[arg(long, conflicts_with = "log")]
        readonly: bool,
    },
    /// Run a command inside; exits with its exit code.
    Exec {
        /// Give the command a pty (default when stdin and stdout are terminals).
        #[arg(short = 't', long, conflicts_with = "no_tty")]
        tty: bool,
        /// Never allocate a pty.
        #[arg(short = 'T', long)]
        no_tty: bool,
        id: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Hot-plug a NIC (the next free ethN inside); prints its port id.
    InterfaceAttach {
        id: String,
        /// As `run --nic`.
        #[arg(long)]
        nic: String,
        #[arg(long)]
        json: bool,
    },
    /// Hot-unplug a NIC by port id.
    InterfaceDetach {
        id: String,
        port_id: String,
    },
    /// The instance's NICs.
    InterfaceList {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Snapshot the instance (running, paused or shut off) to Glance as a new image on top
    /// of the one it was booted from; prints the new Glance image id.
    Snapshot {
        id: String,
        /// Name of the new Glance image (default `<instance>-snapshot-<unix time>`).
        #[arg(long)]
        image_name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Host resources.
    Host {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Convert a VM disk image (qcow2/raw) into the local store.
    Import {
        file: PathBuf,
        #[arg(long)]
        name: String,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    /// Fetch a Glance image (verified), convert it and cache its layers; shows progress.
    Pull {
        glance_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Check the Glance layer cache (every blob digest, every record); exit 1 if unclean.
    Fsck {
        #[arg(long)]
        json: bool,
    },
    /// Write an instance as a flat VM disk (GPT + ext4, qcow2 v3, no backing file).
    Export {
        instance: String,
        /// The qcow2 file to write.
        #[arg(long, value_name = "OUT")]
        qcow2: PathBuf,
        /// Virtual disk size in GiB (default: the flavor's disk, or what the tree needs).
        #[arg(long)]
        size_gb: Option<u64>,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fatbox: {e}");
            std::process::exit(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("fatbox: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn call(c: &Client, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let r = c.request(method, path, body.as_ref()).await?;
    if !r.ok() {
        bail!("{} ({})", r.error(), r.status);
    }
    if r.body.is_empty() {
        return Ok(Value::Null);
    }
    Ok(r.json()?)
}

fn print_instance(v: &Value) {
    let s = |k: &str| {
        v.get(k)
            .map(|x| x.to_string().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    println!("uuid:        {}", s("uuid"));
    println!("name:        {}", s("name"));
    println!("image:       {}", s("image"));
    println!("state:       {}", s("state"));
    println!("power_state: {}", s("power_state"));
    if let Some(f) = v.get("flavor") {
        println!(
            "flavor:      {} vcpus, {} MiB, {} GiB",
            f.get("vcpus").unwrap_or(&Value::Null),
            f.get("memory_mb").unwrap_or(&Value::Null),
            f.get("root_gb").unwrap_or(&Value::Null)
        );
    }
    println!("init_pid:    {}", s("init_pid"));
    for n in v
        .get("nics")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        println!("nic:         {}", nic_line(n));
    }
    if let Some(r) = v.get("reason").filter(|r| !r.is_null()) {
        println!("reason:      {}", r.as_str().unwrap_or_default());
    }
}

fn nic_line(n: &Value) -> String {
    let s = |k: &str| n.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    let ips: Vec<&str> = n
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let vlan = n
        .get("vlan")
        .and_then(Value::as_u64)
        .map(|v| v.to_string())
        .unwrap_or_else(|| "-".into());
    format!(
        "{} port={} mac={} vlan={vlan} ips={} tap={}",
        s("ifname"),
        s("port_id"),
        s("mac"),
        if ips.is_empty() {
            "-".to_string()
        } else {
            ips.join(",")
        },
        s("tap")
    )
}

fn path_id(id: &str) -> anyhow::Result<&str> {
    if id.is_empty() || id.contains('/') || id.contains('?') || id.contains('#') {
        bail!("invalid instance name or uuid {id:?}");
    }
    Ok(id)
}

async fn run(args: Args) -> anyhow::Result<i32> {
    let c = Client::new(&args.socket);
    match args.cmd {
        Cmd::Image {
            cmd: ImageCmd::Import { file, name },
        } => {
            let file = std::fs::canonicalize(&file).with_context(|| file.display().to_string())?;
            let v = call(
                &c,
                "POST",
                "/v1/images",
                Some(json!({"file": file, "name": name})),
            )
            .await?;
            println!(
                "{}",
                v.get("manifest_digest")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
            );
        }
        Cmd::Image {
            cmd: ImageCmd::List { json },
        } => {
            let v = call(&c, "GET", "/v1/images", None).await?;
            if json {
                println!("{v:#}");
            } else {
                for i in v.as_array().into_iter().flatten() {
                    println!(
                        "{}\t{}",
                        i.get("name").and_then(Value::as_str).unwrap_or_default(),
                        i.get("manifest_digest")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                    );
                }
            }
        }
        Cmd::Image {
            cmd: ImageCmd::Pull { glance_id, json },
        } => return pull(&c, &glance_id, json).await,
        Cmd::Image {
            cmd:
                ImageCmd::Export {
                    instance,
                    qcow2,
                    size_gb,
                    force,
                    json,
                },
        } => {
            // fatboxd writes the file: it needs an absolute path, not the CLI's cwd.
            let out = if qcow2.is_absolute() {
                qcow2
            } else {
                std::env::current_dir().context("current dir")?.join(qcow2)
            };
            let v = call(
                &c,
                "POST",
                &format!("/v1/instances/{}/export", path_id(&instance)?),
                Some(
                    json!({"path": out, "format": "qcow2", "size_gb": size_gb, "overwrite": force}),
                ),
            )
            .await?;
            if json {
                println!("{v:#}");
            } else {
                println!(
                    "{}: {} MiB qcow2, {} GiB virtual, / = UUID={} (frozen {} ms, total {} ms)",
                    out.display(),
                    v["file_size"].as_u64().unwrap_or(0) >> 20,
                    v["virtual_size"].as_u64().unwrap_or(0) >> 30,
                    v["filesystem_uuid"].as_str().unwrap_or_default(),
                    v["frozen_ms"],
                    v["total_ms"],
                );
            }
        }
        Cmd::Image {
            cmd: ImageCmd::Fsck { json },
        } => {
            let v = call(&c, "POST", "/v1/images/fsck", None).await?;
            let clean = v.get("clean").and_then(Value::as_bool).unwrap_or(false);
            if json {
                println!("{v:#}");
            } else {
                let r = &v["report"];
                println!(
                    "{} images, {} blobs verified, {} layer dirs: {}",
                    r["images"],
                    r["blobs_verified"],
                    r["layer_dirs"],
                    if clean { "clean" } else { "NOT clean" }
                );
                for k in ["problems", "orphans"] {
                    for p in r[k].as_array().into_iter().flatten() {
                        println!("{k}: {}", p.as_str().unwrap_or_default());
                    }
                }
            }
            return Ok(if clean { 0 } else { 1 });
        }
        Cmd::Run {
            image,
            name,
            vcpus,
            memory,
            disk,
            swap,
            ssh_key,
            uuid,
            nic,
            no_wait,
            privileged,
        } => {
            let mut keys = Vec::new();
            if let Some(k) = ssh_key {
                let text = std::fs::read_to_string(&k).with_context(|| k.display().to_string())?;
                keys.extend(
                    text.lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(str::to_string),
                );
            }
            let nics: Vec<Value> = nic.iter().map(|n| json!({"spec": n})).collect();
            let body = json!({
                "name": name, "image": image, "uuid": uuid, "ssh_keys": keys, "nics": nics,
                "privileged": privileged,
                "flavor": {"vcpus": vcpus, "memory_mb": memory, "root_gb": disk, "swap_mb": swap.unwrap_or(0)},
            });
            let v = call(&c, "POST", "/v1/instances", Some(body)).await?;
            let uuid = v
                .get("uuid")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if !no_wait {
                let deadline = Instant::now() + Duration::from_secs(600);
                let mut poll = Duration::from_millis(10);
                let started = Instant::now();
                loop {
                    let v = call(&c, "GET", &format!("/v1/instances/{uuid}"), None).await?;
                    match v.get("state").and_then(Value::as_str) {
                        Some("running") => break,
                        Some("error") => bail!(
                            "instance {uuid} failed: {}",
                            v.get("reason").and_then(Value::as_str).unwrap_or("unknown")
                        ),
                        _ => {}
                    }
                    if Instant::now() > deadline {
                        bail!("instance {uuid} did not come up");
                    }
                    // Fast at first (boots take ~1 s), then gentle on a busy host.
                    tokio::time::sleep(poll).await;
                    if started.elapsed() > Duration::from_secs(3) {
                        poll = (poll * 2).min(Duration::from_millis(250));
                    }
                }
            }
            println!("{uuid}");
        }
        Cmd::List { json } => {
            let v = call(&c, "GET", "/v1/instances", None).await?;
            if json {
                println!("{v:#}");
            } else {
                println!("{:<36}  {:<20}  {:<10}  INIT", "UUID", "NAME", "STATE");
                for i in v.as_array().into_iter().flatten() {
                    let s = |k: &str| {
                        i.get(k)
                            .map(|x| x.to_string().trim_matches('"').to_string())
                            .unwrap_or_default()
                    };
                    println!(
                        "{:<36}  {:<20}  {:<10}  {}",
                        s("uuid"),
                        s("name"),
                        s("state"),
                        s("init_pid")
                    );
                }
            }
        }
        Cmd::Show { id, json } => {
            let v = call(&c, "GET", &format!("/v1/instances/{}", path_id(&id)?), None).await?;
            if json {
                println!("{v:#}");
            } else {
                print_instance(&v);
            }
        }
        Cmd::Start { id } => action(&c, &id, json!({"action": "start"})).await?,
        Cmd::Stop { id, timeout } => {
            action(&c, &id, json!({"action": "stop", "timeout": timeout})).await?
        }
        Cmd::Reboot { id, hard } => {
            let a = if hard { "reboot_hard" } else { "reboot" };
            action(&c, &id, json!({"action": a})).await?
        }
        Cmd::Pause { id } => action(&c, &id, json!({"action": "pause"})).await?,
        Cmd::Resume { id } => action(&c, &id, json!({"action": "resume"})).await?,
        Cmd::Suspend { id } => action(&c, &id, json!({"action": "suspend"})).await?,
        Cmd::Resize {
            id,
            vcpus,
            memory,
            disk,
            swap,
        } => {
            if vcpus.is_none() && memory.is_none() && disk.is_none() && swap.is_none() {
                bail!("resize: give --vcpus, --memory, --disk or --swap");
            }
            action(
                &c,
                &id,
                json!({"action": "resize", "vcpus": vcpus, "memory_mb": memory,
                       "root_gb": disk, "swap_mb": swap}),
            )
            .await?
        }
        Cmd::Rebuild { id, image } => {
            action(&c, &id, json!({"action": "rebuild", "image": image})).await?
        }
        Cmd::Rescue { id, image } => {
            action(&c, &id, json!({"action": "rescue", "image": image})).await?
        }
        Cmd::Unrescue { id } => action(&c, &id, json!({"action": "unrescue"})).await?,
        Cmd::Delete { id } => {
            call(
                &c,
                "DELETE",
                &format!("/v1/instances/{}", path_id(&id)?),
                None,
            )
            .await?;
        }
        Cmd::Snapshot {
            id,
            image_name,
            json,
        } => {
            let v = call(
                &c,
                "POST",
                &format!("/v1/instances/{}/snapshot", path_id(&id)?),
                Some(json!({"name": image_name})),
            )
            .await?;
            if json {
                println!("{v:#}");
            } else {
                println!("{}", v["image_id"].as_str().unwrap_or_default());
                eprintln!(
                    "parent {}, layer {} ({} bytes uploaded), {:.1} s",
                    v["parent"].as_str().unwrap_or_default(),
                    v["layer_digest"].as_str().unwrap_or_default(),
                    v["layer_size"],
                    v["seconds"].as_f64().unwrap_or_default()
                );
            }
        }
        Cmd::Console {
            id,
            log: false,
            tail,
            readonly,
            ..
        } => return console_attach(&c, path_id(&id)?, tail, readonly).await,
        Cmd::Console { id, bytes, .. } => {
            let r = c
                .request(
                    "GET",
                    &format!("/v1/instances/{}/console?bytes={bytes}", path_id(&id)?),
                    None,
                )
                .await?;
            if !r.ok() {
                bail!("{} ({})", r.error(), r.status);
            }
            use std::io::Write;
            std::io::stdout().write_all(&r.body)?;
        }
        Cmd::Exec {
            id,
            cmd,
            tty,
            no_tty,
        } => {
            let tty = tty || (!no_tty && driver::ops::exec::interactive());
            return exec(&c, &id, &cmd, tty).await;
        }
        Cmd::InterfaceAttach { id, nic, json } => {
            let v = call(
                &c,
                "POST",
                &format!("/v1/instances/{}/interfaces", path_id(&id)?),
                Some(json!({ "nic": nic })),
            )
            .await?;
            if json {
                println!("{v:#}");
            } else {
                println!(
                    "{}",
                    v.get("port_id").and_then(Value::as_str).unwrap_or_default()
                );
            }
        }
        Cmd::InterfaceDetach { id, port_id } => {
            if port_id.is_empty() || port_id.contains(['/', '?', '#']) {
                bail!("invalid port id {port_id:?}");
            }
            call(
                &c,
                "DELETE",
                &format!("/v1/instances/{}/interfaces/{port_id}", path_id(&id)?),
                None,
            )
            .await?;
        }
        Cmd::InterfaceList { id, json } => {
            let v = call(
                &c,
                "GET",
                &format!("/v1/instances/{}/interfaces", path_id(&id)?),
                None,
            )
            .await?;
            if json {
                println!("{v:#}");
            } else {
                for n in v.as_array().into_iter().flatten() {
                    println!("{}", nic_line(n));
                }
            }
        }
        Cmd::Host { json } => {
            let v = call(&c, "GET", "/v1/host", None).await?;
            if json {
                println!("{v:#}");
            } else if let Some(o) = v.as_object() {
                for (k, val) in o {
                    println!("{k}: {val}");
                }
            }
        }
    }
    Ok(0)
}

/// Starts the pull in fatboxd and follows it with a progress bar (on stderr).
async fn pull(c: &Client, id: &str, json_out: bool) -> anyhow::Result<i32> {
    call(c, "POST", "/v1/images/pull", Some(json!({"glance_id": id}))).await?;
    let bar = indicatif::ProgressBar::new(0);
    if json_out {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>9} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut poll = Duration::from_millis(50);
    loop {
        let v = call(c, "GET", &format!("/v1/images/pull/{}", path_id(id)?), None).await?;
        let p = &v["progress"];
        let phase = p["phase"].as_str().unwrap_or("");
        bar.set_message(phase.to_string());
        match p["total"].as_u64() {
            Some(t) if phase == "download" => {
                bar.set_length(t);
                bar.set_position(p["done"].as_u64().unwrap_or(0));
            }
            _ => bar.set_position(p["done"].as_u64().unwrap_or(0)),
        }
        match v["state"].as_str() {
            Some("done") => {
                bar.finish_and_clear();
                if json_out {
                    println!("{v:#}");
                } else {
                    let img = &v["image"];
                    println!(
                        "{}\t{}\t{} layers",
                        id,
                        img["manifest_digest"].as_str().unwrap_or_default(),
                        img["layers"].as_array().map(Vec::len).unwrap_or(0)
                    );
                }
                return Ok(0);
            }
            Some("error") => {
                bar.abandon();
                bail!(
                    "pull of {id} failed: {}",
                    v["error"].as_str().unwrap_or("?")
                );
            }
            _ => {}
        }
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(Duration::from_millis(250));
    }
}

async fn action(c: &Client, id: &str, body: Value) -> anyhow::Result<()> {
    let v = call(
        c,
        "POST",
        &format!("/v1/instances/{}/actions", path_id(id)?),
        Some(body),
    )
    .await?;
    println!(
        "{}",
        v.get("state").and_then(Value::as_str).unwrap_or_default()
    );
    Ok(())
}

/// Joins the instance's cgroups and namespaces (driver::enter), with our stdio or a pty,
/// so the command runs inside with the instance's limits; returns its exit code.
async fn exec(c: &Client, id: &str, cmd: &[String], tty: bool) -> anyhow::Result<i32> {
    let v = call(c, "GET", &format!("/v1/instances/{}", path_id(id)?), None).await?;
    let state = v.get("state").and_then(Value::as_str).unwrap_or_default();
    if state != "running" && state != "rescued" {
        bail!("instance {id} is not running (it is {state})");
    }
    let pid = v
        .get("init_pid")
        .and_then(Value::as_i64)
        .and_then(|p| i32::try_from(p).ok())
        .context("instance has no init pid")?;
    let cgroups: Vec<PathBuf> = v
        .get("cgroups")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|d| d.as_str().map(PathBuf::from))
        .collect();
    let term = std::env::var("TERM").unwrap_or_else(|_| "vt220".into());
    // The command gets what init got: its namespaces, root, the reduced bounding set and,
    // unless the instance is privileged, the seccomp profile (see driver::enter).
    let seccomp = v
        .pointer("/security/seccomp")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let allow_perf_event = v
        .pointer("/security/allow_perf_event")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let code = driver::ops::exec::exec(&driver::ops::exec::ExecRequest {
        init_pid: pid,
        cgroups: &cgroups,
        cmd,
        tty,
        term,
        seccomp,
        allow_perf_event,
    })?;
    Ok(code)
}

/// Ctrl-]: detaches an interactive attach, as in telnet and virsh console.
const DETACH: u8 = 0x1d;

/// `fatbox console NAME`: the console over fatboxd's WebSocket. On a terminal: raw mode
/// (restored on every way out, by the guard's Drop), Ctrl-] detaches. Otherwise stdin and
/// stdout are plain byte pipes, and the end of stdin does not detach: output keeps coming
/// until the console closes or SIGINT/SIGTERM/SIGHUP.
async fn console_attach(c: &Client, id: &str, tail: u64, readonly: bool) -> anyhow::Result<i32> {
    use futures::{SinkExt, StreamExt};
    use std::io::{IsTerminal, Write};
    use std::os::fd::AsFd;
    use tokio::signal::unix::{signal, SignalKind};
    use tokio_tungstenite::tungstenite::Message;

    let mut ws = c.attach_console(id, tail, readonly).await?;
    let tty = std::io::stdin().is_terminal();
    let _raw = if tty {
        let g = driver::ops::exec::RawMode::enter(std::io::stdin().as_fd());
        eprint!("Connected to the console of {id}; Ctrl-] detaches.\r\n");
        g
    } else {
        None
    };
    // A thread, not tokio's stdin: a read blocked at exit must not hold the runtime.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut stdin = std::io::stdin().lock();
        loop {
            use std::io::Read;
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if in_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut stdin_open = true;
    let mut out = std::io::stdout();
    let why = loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    out.write_all(&b)?;
                    out.flush()?;
                }
                Some(Ok(Message::Text(t))) => {
                    out.write_all(t.as_bytes())?;
                    out.flush()?;
                }
                Some(Ok(Message::Close(_))) | None => break "console closed",
                Some(Ok(_)) => {}
                Some(Err(e)) => break if matches!(e, tokio_tungstenite::tungstenite::Error::ConnectionClosed) {
                    "console closed"
                } else {
                    "connection to fatboxd lost"
                },
            },
            data = in_rx.recv(), if stdin_open => match data {
                Some(mut d) => {
                    let detach = tty && d.contains(&DETACH);
                    if detach {
                        let at = d.iter().position(|&b| b == DETACH).unwrap_or(0);
                        d.truncate(at);
                    }
                    if !d.is_empty() {
                        ws.send(Message::Binary(d.into())).await?;
                    }
                    if detach {
                        break "detached";
                    }
                }
                None => stdin_open = false,
            },
            _ = term.recv() => break "detached",
            _ = hup.recv() => break "detached",
            _ = int.recv() => break "detached",
        }
    };
    // A fatboxd that stopped answering must not keep the terminal raw.
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    drop(_raw);
    if tty || why != "detached" {
        eprintln!("\n[{why}]");
    }
    Ok(0)
}
