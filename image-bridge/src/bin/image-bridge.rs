//! image-bridge: the layer cache and Glance client from the command line (operators'
//! debugging, the tests' second process, the bench).

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use image_bridge::glance::NewImage;
use image_bridge::{CacheOptions, GlanceClient, LayerCache, Progress};
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Parser)]
#[command(version, about = "Glance images → cached OCI layers")]
struct Args {
    /// Cache directory.
    #[arg(long, env = "IMAGE_BRIDGE_CACHE")]
    cache: Option<PathBuf>,
    /// Glance endpoint (http://host:9292), no auth.
    #[arg(long, env = "IMAGE_BRIDGE_GLANCE")]
    endpoint: Option<String>,
    /// Cache size cap in GiB (fractions allowed).
    #[arg(long)]
    max_gib: Option<f64>,
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download, verify, convert and unpack an image (once).
    Pull { id: String },
    /// Cached images.
    List,
    /// Verify every blob digest and record; exit 1 when anything is wrong or left over.
    Fsck,
    /// Evict down to --max-gib.
    Evict,
    /// Upload a disk image file to Glance; prints the new id.
    Upload {
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "qcow2")]
        disk_format: String,
        #[arg(long, default_value = "bare")]
        container_format: String,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IMAGE_BRIDGE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("image-bridge: {e}");
            std::process::exit(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("image-bridge: {e:#}");
            std::process::exit(1);
        }
    }
}

fn glance(args: &Args) -> anyhow::Result<Option<GlanceClient>> {
    Ok(match &args.endpoint {
        Some(e) => Some(GlanceClient::new(e, None)?),
        None => None,
    })
}

fn cache(args: &Args) -> anyhow::Result<Arc<LayerCache>> {
    let dir = args.cache.clone().context("--cache DIR is required")?;
    let mut opts = CacheOptions::new(dir);
    opts.max_bytes = args.max_gib.map(|g| (g * (1u64 << 30) as f64) as u64);
    Ok(Arc::new(LayerCache::open(opts, glance(args)?)?))
}

async fn run(args: Args) -> anyhow::Result<i32> {
    match &args.cmd {
        Cmd::Pull { id } => {
            let c = cache(&args)?;
            let quiet = args.json;
            let progress = Arc::new(move |p: Progress| {
                if !quiet {
                    match p.total {
                        Some(t) if t > 0 => eprint!(
                            "\r{:<8} {:>6.1}%  {} MiB   ",
                            p.phase,
                            p.done as f64 * 100.0 / t as f64,
                            p.done >> 20
                        ),
                        _ => eprint!("\r{:<8} {} MiB          ", p.phase, p.done >> 20),
                    }
                }
            });
            let t0 = std::time::Instant::now();
            let img = c.ensure_image(id, Some(progress)).await?;
            if !quiet {
                eprintln!();
            }
            let v = json!({
                "image": img,
                "seconds": t0.elapsed().as_secs_f64(),
                "downloads": c.counters.downloads.load(Ordering::Relaxed),
                "conversions": c.counters.conversions.load(Ordering::Relaxed),
                "hits": c.counters.hits.load(Ordering::Relaxed),
            });
            if args.json {
                println!("{v}");
            } else {
                for d in &img.layer_dirs {
                    println!("{}", d.display());
                }
            }
        }
        Cmd::List => {
            let c = cache(&args)?;
            let l = c.list()?;
            if args.json {
                println!("{}", json!({"images": l, "usage": c.usage()?}));
            } else {
                for i in l {
                    println!(
                        "{}\t{}\t{} layers\t{}",
                        i.glance_id,
                        i.name.as_deref().unwrap_or("-"),
                        i.layers.len(),
                        i.manifest_digest
                    );
                }
            }
        }
        Cmd::Fsck => {
            let c = cache(&args)?;
            let r = c.fsck()?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} images, {} blobs verified, {} layer dirs",
                    r.images, r.blobs_verified, r.layer_dirs
                );
                for p in &r.problems {
                    println!("problem: {p}");
                }
                for o in &r.orphans {
                    println!("orphan: {o}");
                }
            }
            if !r.clean() {
                return Ok(1);
            }
        }
        Cmd::Evict => {
            let c = cache(&args)?;
            let e = c.evict(&[])?;
            println!("{}", json!({"evicted": e, "usage": c.usage()?}));
        }
        Cmd::Upload {
            file,
            name,
            disk_format,
            container_format,
        } => {
            let Some(g) = glance(&args)? else {
                bail!("--endpoint is required");
            };
            let m = g
                .create(&NewImage {
                    name: name.clone(),
                    disk_format: disk_format.clone(),
                    container_format: container_format.clone(),
                    ..NewImage::default()
                })
                .await?;
            g.upload(&m.id, file).await?;
            let m = g
                .wait_active(&m.id, std::time::Duration::from_secs(600))
                .await?;
            println!("{}", m.id);
        }
    }
    Ok(0)
}
