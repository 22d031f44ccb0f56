//! `fatbox-procfs` CLI: serve, status, render, shutdown (and the internal keeper).

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use procfs_fuse::daemon::{self, ServeOptions};
use procfs_fuse::registry;

#[derive(Parser)]
#[command(name = "fatbox-procfs", about = "Per-container /proc files over FUSE")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount (or take over from the keeper) and serve.
    Serve {
        #[arg(long, default_value = daemon::DEFAULT_MOUNT)]
        mount: PathBuf,
        #[arg(long, default_value = registry::DEFAULT_DIR)]
        registry: PathBuf,
        #[arg(long, default_value = daemon::DEFAULT_KEEPER)]
        keeper_socket: PathBuf,
        /// FUSE worker threads (each with its own cloned /dev/fuse fd).
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Loadavg sampling interval in seconds; 0 disables (host loadavg is served).
        #[arg(long, default_value_t = 5.0)]
        loadavg_interval: f64,
        /// Milliseconds during which opens of the same container's file share one render.
        #[arg(long, default_value_t = 20)]
        coalesce_ms: u64,
        /// Per-thread /dev/fuse fds: faster, but a kill -9 fails the reads in flight at
        /// that instant with ECONNABORTED (the kernel ends a cloned fd's pending requests).
        #[arg(long)]
        clone_fd: bool,
    },
    /// List registered containers.
    Status {
        #[arg(long, default_value = registry::DEFAULT_DIR)]
        registry: PathBuf,
    },
    /// Print what a process in the cgroup would read (host view without --cgroup).
    Render {
        /// meminfo, cpuinfo, stat, uptime, loadavg, diskstats, swaps, online
        file: String,
        /// Cgroup path relative to the cgroup roots, as in /proc/PID/cgroup.
        #[arg(long)]
        cgroup: Option<String>,
    },
    /// Stop the keeper, abort the FUSE connection and detach the mount.
    Shutdown {
        #[arg(long, default_value = daemon::DEFAULT_MOUNT)]
        mount: PathBuf,
        #[arg(long, default_value = daemon::DEFAULT_KEEPER)]
        keeper_socket: PathBuf,
    },
    /// Internal: hold the /dev/fuse fd across daemon restarts.
    #[command(hide = true)]
    Keeper {
        #[arg(long)]
        socket: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve {
            mount,
            registry,
            keeper_socket,
            threads,
            loadavg_interval,
            coalesce_ms,
            clone_fd,
        } => {
            let opts = ServeOptions {
                mountpoint: mount,
                registry_dir: registry,
                keeper_socket,
                threads,
                loadavg_interval: (loadavg_interval > 0.0 && loadavg_interval.is_finite())
                    .then(|| Duration::from_secs_f64(loadavg_interval)),
                coalesce: Duration::from_millis(coalesce_ms),
                clone_fd,
            };
            daemon::serve(&opts).context("serve")?;
        }
        Cmd::Status { registry } => {
            let recs = registry::load_dir(&registry).context("read registry")?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{:<40} {:>8} CGROUP", "ID", "INIT")?;
            for r in recs {
                let alive = std::path::Path::new(&format!("/proc/{}", r.init_pid)).exists();
                writeln!(
                    out,
                    "{:<40} {:>8} {}{}",
                    r.id,
                    r.init_pid,
                    r.cgroup,
                    if alive { "" } else { " (init gone)" }
                )?;
            }
        }
        Cmd::Render { file, cgroup } => {
            let data = procfs_fuse::render(&file, cgroup.as_deref())
                .with_context(|| format!("render {file}"))?;
            std::io::stdout().write_all(&data)?;
        }
        Cmd::Shutdown {
            mount,
            keeper_socket,
        } => daemon::shutdown(&mount, &keeper_socket).context("shutdown")?,
        Cmd::Keeper { socket } => daemon::run_keeper(&socket).context("keeper")?,
    }
    Ok(())
}
