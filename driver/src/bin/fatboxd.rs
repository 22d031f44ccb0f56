//! fatboxd: the fatbox daemon (`fatboxd --config PATH`), and the per-instance monitor
//! (`fatboxd monitor DIR`, started by fatboxd itself).

use anyhow::Context;
use clap::{Parser, Subcommand};
use driver::config::Config;
use driver::ops::Manager;
use std::path::PathBuf;

#[derive(Parser)]
#[command(version, about = "fatbox daemon: fat containers that live like VMs")]
struct Args {
    /// Configuration file (TOML; FATBOX_* environment variables override it).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Internal: the monitor process of one instance.
    #[command(hide = true)]
    Monitor { dir: PathBuf },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FATBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(Cmd::Monitor { dir }) = args.cmd {
        // Before any thread exists: the monitor forks and must stay single-threaded.
        return driver::monitor::run(&dir).with_context(|| format!("monitor {}", dir.display()));
    }
    let cfg = Config::load(args.config.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(daemon(cfg))
}

async fn daemon(cfg: Config) -> anyhow::Result<()> {
    let socket = cfg.socket.clone();
    driver::host::tune();
    let m = Manager::new(cfg)?;
    m.keys.start().context("ssh host key pool")?;
    let m2 = m.clone();
    tokio::task::spawn_blocking(move || m2.restore())
        .await
        .context("restore task")?
        .context("live-restore")?;
    // Ports of running instances are re-ensured in the background: an OVSDB that is slow to
    // come back must not keep the API down.
    let m3 = m.clone();
    tokio::task::spawn_blocking(move || m3.restore_vifs());
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
    }
    // A stale socket from a killed daemon would make bind fail.
    match std::fs::remove_file(&socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| socket.display().to_string()),
    }
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660))
            .with_context(|| socket.display().to_string())?;
    }
    tracing::info!(socket = %socket.display(), instances = m.list().len(), "fatboxd listening");
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down; instances keep running");
    };
    driver::api::serve(m, listener, shutdown)
        .await
        .context("serving the API")?;
    Ok(())
}
