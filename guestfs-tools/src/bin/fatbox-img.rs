//! `fatbox-img`: inspect VM disk images and turn them into OCI images, in user space.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use guestfs_tools::block::OpenOptions;
use guestfs_tools::containerize::{all_ops, Selection};
use guestfs_tools::convert::{convert, unpack_image, ConvertOptions};
use guestfs_tools::ext4::FileType;
use guestfs_tools::guest::{Guest, Node};
use guestfs_tools::inspect::inspect;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "fatbox-img",
    version,
    about = "Read VM disk images (qcow2, raw; GPT/MBR; ext2/3/4) without mounting them, and turn them into OCI images for fat containers"
)]
struct Cli {
    /// Machine-readable output (JSON) for inspect, ls, convert and ops.
    #[arg(long, global = true)]
    json: bool,
    /// Extra directory where qcow2 backing files may live (the top image's own directory is
    /// always allowed). Repeatable.
    #[arg(long = "allow-backing-dir", global = true, value_name = "DIR")]
    allow_backing_dir: Vec<PathBuf>,
    /// Image format instead of probing it: raw or qcow2.
    #[arg(long, global = true, value_name = "FMT")]
    format: Option<String>,
    /// Read ext4 filesystems without verifying their metadata checksums (a damaged image,
    /// read as far as its structure allows).
    #[arg(long, global = true)]
    no_verify_csum: bool,
    /// Mount filesystems fatbox-img cannot read in user space (xfs, btrfs) read-only through
    /// the host kernel: loop device, ro,nodev,nosuid,noexec, no log replay, private mount
    /// namespace. Needs root. Opt-in because it exposes the host kernel's filesystem driver to
    /// an untrusted image; ext2/3/4 are still read in user space.
    #[arg(long, global = true)]
    kernel_mount: bool,
    /// More logging (repeat for debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Format, backing chain, partitions, filesystems, OS, init, kernels, sshd/cloud-init.
    Inspect { image: PathBuf },
    /// List a directory of the guest (or one file), like `ls -l`.
    Ls { image: PathBuf, path: String },
    /// Print a file of the guest (symlinks followed inside the guest).
    Cat { image: PathBuf, path: String },
    /// Write the guest's merged tree, as it is, as a PAX tar (`-` for stdout; .zst/.gz compress).
    TarOut { image: PathBuf, out: String },
    /// Convert a disk image into an OCI image layout (base layer + containerize layer).
    Convert {
        image: PathBuf,
        oci_dir: PathBuf,
        /// Name of the image in the layout (index.json ref name).
        #[arg(long, default_value = "latest")]
        name: String,
        /// Layer compression: none (plain tar, for a local store), zstd or gzip (for upload).
        #[arg(long, default_value = "zstd")]
        compression: String,
        /// Compression level (zstd -7..19, gzip 1-9). 1 keeps zstd near disk speed on small hosts.
        #[arg(long, default_value_t = 1)]
        level: i32,
        /// Compression threads.
        #[arg(long, default_value_t = 2)]
        threads: u32,
        /// Do not add the containerize layer (plain export of the disk's files).
        #[arg(long)]
        no_containerize: bool,
        /// Switch off a containerize operation (see `ops`). Repeatable.
        #[arg(long = "disable", value_name = "OP")]
        disable: Vec<String>,
        /// Run only these containerize operations (comma-separated).
        #[arg(long, value_delimiter = ',', value_name = "OP,...")]
        only: Option<Vec<String>>,
        /// Skip hashing the source image for the org.fatbox.source.digest label.
        #[arg(long)]
        no_source_digest: bool,
    },
    /// Unpack an image from an OCI layout into a directory (layers flattened, digests checked).
    Unpack {
        oci_dir: PathBuf,
        dest: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
    /// List the containerize operations.
    Ops,
}

fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .init();
    // SAFETY: geteuid has no preconditions.
    if cli.kernel_mount && unsafe { libc::geteuid() } == 0 {
        // Before any thread exists, so every thread shares the private namespace.
        if let Err(e) = guestfs_tools::kmount::enter_private_mount_namespace() {
            tracing::warn!("no private mount namespace ({e}); mounting in the host's");
        }
        guestfs_tools::kmount::install_signal_cleanup();
    }
    if let Err(e) = run(cli) {
        // One line: the chain of causes joined.
        // One line: the chain of causes, each said once (io errors already name their source).
        let mut msg = String::new();
        for c in e.chain() {
            let c = c.to_string();
            if !msg.contains(&c) {
                if !msg.is_empty() {
                    msg.push_str(": ");
                }
                msg.push_str(&c);
            }
        }
        eprintln!("fatbox-img: error: {msg}");
        std::process::exit(1);
    }
}

fn open(cli: &Cli, image: &Path) -> Result<Guest> {
    let opts = OpenOptions {
        allow_backing_dirs: cli.allow_backing_dir.clone(),
        format: cli.format.clone(),
        no_verify_csum: cli.no_verify_csum,
        kernel_mount: cli.kernel_mount,
    };
    Guest::open(image, &opts).with_context(|| format!("opening {}", image.display()))
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message(what.to_string());
    pb
}

fn run(cli: Cli) -> Result<()> {
    match &cli.cmd {
        Cmd::Inspect { image } => {
            let g = open(&cli, image)?;
            let i = inspect(&g)?;
            if cli.json {
                return print_json(&i);
            }
            println!("image:       {}", i.image);
            println!("format:      {}", i.format);
            println!(
                "virtual size: {} ({} bytes)",
                human(i.virtual_size),
                i.virtual_size
            );
            for (n, c) in i.chain.iter().enumerate() {
                println!(
                    "  chain[{n}]: {} {}{}{}{}",
                    c.path.display(),
                    c.format,
                    c.compat
                        .as_ref()
                        .map(|v| format!(" compat={v}"))
                        .unwrap_or_default(),
                    c.cluster_size
                        .map(|v| format!(" cluster={v}"))
                        .unwrap_or_default(),
                    c.backing_file
                        .as_ref()
                        .map(|v| format!(" backing={v}"))
                        .unwrap_or_default(),
                );
            }
            println!("partitions:  {:?}", i.partition_table);
            for f in &i.filesystems {
                println!(
                    "  {:<14} {:<8} {:>10}  uuid={} label={} mount={}{}",
                    f.location,
                    f.kind,
                    human(f.size),
                    f.uuid.as_deref().unwrap_or("-"),
                    f.label.as_deref().unwrap_or("-"),
                    f.mountpoint.as_deref().unwrap_or("-"),
                    f.error
                        .as_ref()
                        .map(|e| format!("  ({e})"))
                        .unwrap_or_default()
                );
            }
            let os = &i.os;
            println!(
                "os:          {} ({} {}) arch={}",
                os.pretty_name.as_deref().unwrap_or("?"),
                os.id.as_deref().unwrap_or("?"),
                os.version_id.as_deref().unwrap_or("?"),
                os.arch.as_deref().unwrap_or("?")
            );
            println!("init:        {}", os.init);
            println!(
                "kernels:     {}",
                if os.kernels.is_empty() {
                    "-".into()
                } else {
                    os.kernels.join(", ")
                }
            );
            println!("sshd:        {}", if os.sshd { "yes" } else { "no" });
            println!("cloud-init:  {}", if os.cloud_init { "yes" } else { "no" });
            println!(
                "network:     {}",
                if os.network.is_empty() {
                    "-".into()
                } else {
                    os.network.join(", ")
                }
            );
            for w in &i.warnings {
                println!("warning:     {w}");
            }
            Ok(())
        }
        Cmd::Ls { image, path } => {
            let g = open(&cli, image)?;
            let (node, canon) = g
                .resolve_path(path.as_bytes(), true)?
                .with_context(|| format!("{path}: no such file or directory in the guest"))?;
            let entries: Vec<(Vec<u8>, Node)> = if node.inode.file_type() == FileType::Directory {
                g.list(&node, &canon)?
            } else {
                vec![(path.as_bytes().to_vec(), node)]
            };
            if cli.json {
                let v: Vec<serde_json::Value> = entries
                    .iter()
                    .map(|(name, n)| {
                        let target = (n.inode.file_type() == FileType::Symlink)
                            .then(|| g.read_link(n).ok())
                            .flatten()
                            .map(|t| String::from_utf8_lossy(&t).into_owned());
                        serde_json::json!({
                            "name": String::from_utf8_lossy(name),
                            "type": type_char(n.inode.file_type()).to_string(),
                            "mode": n.inode.perm(),
                            "uid": n.inode.uid, "gid": n.inode.gid,
                            "size": n.inode.size, "links": n.inode.links,
                            "mtime": n.inode.mtime.sec,
                            "target": target,
                        })
                    })
                    .collect();
                return print_json(&v);
            }
            let mut out = std::io::stdout().lock();
            for (name, n) in &entries {
                let i = &n.inode;
                let mut line = format!(
                    "{}{} {:>3} {:>6} {:>6} {:>10} {}",
                    type_char(i.file_type()),
                    perm_string(i.perm()),
                    i.links,
                    i.uid,
                    i.gid,
                    if matches!(i.file_type(), FileType::CharDevice | FileType::BlockDevice) {
                        format!("{}, {}", i.rdev.0, i.rdev.1)
                    } else {
                        i.size.to_string()
                    },
                    String::from_utf8_lossy(name)
                );
                if i.file_type() == FileType::Symlink {
                    line.push_str(&format!(
                        " -> {}",
                        String::from_utf8_lossy(&g.read_link(n)?)
                    ));
                }
                writeln!(out, "{line}")?;
            }
            Ok(())
        }
        Cmd::Cat { image, path } => {
            let g = open(&cli, image)?;
            let node = g
                .resolve(path.as_bytes(), true)?
                .with_context(|| format!("{path}: no such file in the guest"))?;
            if node.inode.file_type() != FileType::Regular {
                bail!("{path}: not a regular file in the guest");
            }
            let mut out = std::io::stdout().lock();
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0u64;
            while off < node.inode.size {
                let k = ((node.inode.size - off) as usize).min(buf.len());
                let n = g.read_at(&node, off, &mut buf[..k])?;
                if n == 0 {
                    bail!("{path}: file data ends early at offset {off}");
                }
                out.write_all(&buf[..n])?;
                off += n as u64;
            }
            Ok(())
        }
        Cmd::TarOut { image, out } => {
            let g = open(&cli, image)?;
            if out == "-" {
                let stdout = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
                guestfs_tools::tarout::write_tree(&g, stdout, &mut |_| {})?;
                return Ok(());
            }
            let path = PathBuf::from(out);
            // A device or fifo (/dev/null, a tape, a named pipe) is written to, never replaced
            // by the temp-file rename below (which, as root, would turn /dev/null into a file).
            if std::fs::metadata(&path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .with_context(|| path.display().to_string())?;
                let (mut w, _) = guestfs_tools::tarout::write_tree(
                    &g,
                    std::io::BufWriter::with_capacity(1 << 20, f),
                    &mut |_| {},
                )?;
                w.flush()?;
                return Ok(());
            }
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let tmp = tempfile::Builder::new()
                .prefix(".fatbox-img-")
                .tempfile_in(dir)
                .with_context(|| dir.display().to_string())?;
            let pb = bar(g.used_bytes(), "tar-out");
            let file = std::io::BufWriter::with_capacity(1 << 20, tmp.reopen()?);
            let stats = if out.ends_with(".zst") {
                let mut enc = zstd::Encoder::new(file, 3)?;
                enc.multithread(2)?;
                let (enc, s) = guestfs_tools::tarout::write_tree(&g, enc, &mut |n| pb.inc(n))?;
                enc.finish()?.flush()?;
                s
            } else if out.ends_with(".gz") {
                let enc = flate2::write::GzEncoder::new(file, flate2::Compression::default());
                let (enc, s) = guestfs_tools::tarout::write_tree(&g, enc, &mut |n| pb.inc(n))?;
                enc.finish()?.flush()?;
                s
            } else {
                let (mut f, s) = guestfs_tools::tarout::write_tree(&g, file, &mut |n| pb.inc(n))?;
                f.flush()?;
                s
            };
            pb.finish_and_clear();
            tmp.as_file().sync_all()?;
            tmp.persist(&path)
                .with_context(|| path.display().to_string())?;
            eprintln!(
                "{}: {} entries ({} files, {} dirs, {} symlinks, {} hard links), {} of data",
                path.display(),
                stats.entries,
                stats.files,
                stats.dirs,
                stats.symlinks,
                stats.hardlinks,
                human(stats.data_bytes)
            );
            Ok(())
        }
        Cmd::Convert {
            image,
            oci_dir,
            name,
            compression,
            level,
            threads,
            no_containerize,
            disable,
            only,
            no_source_digest,
        } => {
            let opts = ConvertOptions {
                name: name.clone(),
                compression: compression.parse()?,
                level: *level,
                threads: *threads,
                containerize: !no_containerize,
                ops: Selection {
                    only: only.clone(),
                    disable: disable.clone(),
                },
                source_digest: !no_source_digest,
            };
            opts.ops.check()?;
            let g = open(&cli, image)?;
            let pb = bar(g.used_bytes(), "convert");
            if cli.json {
                pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            let report = convert(&g, oci_dir, &opts, &mut |n| pb.inc(n))
                .with_context(|| format!("converting {}", image.display()))?;
            pb.finish_and_clear();
            if cli.json {
                return print_json(&report);
            }
            println!(
                "{}:{} {}",
                report.layout, report.name, report.manifest_digest
            );
            for (i, l) in report.layers.iter().enumerate() {
                println!(
                    "  layer {i}: {} {} (tar {})",
                    l.digest,
                    human(l.size),
                    human(l.tar_size)
                );
            }
            for (op, s) in &report.containerize {
                println!("  {op}: {s}");
            }
            println!(
                "  {} entries, {} of file data in {:.1} s ({:.0} MiB/s)",
                report.base.entries,
                human(report.base.data_bytes),
                report.seconds,
                report.base.data_bytes as f64 / 1048576.0 / report.seconds.max(1e-9)
            );
            Ok(())
        }
        Cmd::Unpack {
            oci_dir,
            dest,
            name,
        } => {
            unpack_image(oci_dir, name.as_deref(), dest)
                .with_context(|| format!("unpacking {}", oci_dir.display()))?;
            Ok(())
        }
        Cmd::Ops => {
            let ops = all_ops();
            if cli.json {
                let v: Vec<serde_json::Value> = ops
                    .iter()
                    .map(|o| serde_json::json!({"name": o.name(), "description": o.description(), "default": true}))
                    .collect();
                return print_json(&v);
            }
            for o in ops {
                println!("{:<18} {}", o.name(), o.description());
            }
            Ok(())
        }
    }
}

fn type_char(t: FileType) -> char {
    match t {
        FileType::Regular => '-',
        FileType::Directory => 'd',
        FileType::Symlink => 'l',
        FileType::CharDevice => 'c',
        FileType::BlockDevice => 'b',
        FileType::Fifo => 'p',
        FileType::Socket => 's',
    }
}

fn perm_string(m: u32) -> String {
    let mut s = String::new();
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        let bit = 1 << (8 - i);
        s.push(if m & bit != 0 { c } else { '-' });
    }
    let mut b: Vec<char> = s.chars().collect();
    for (flag, pos, on, off) in [
        (0o4000, 2, 's', 'S'),
        (0o2000, 5, 's', 'S'),
        (0o1000, 8, 't', 'T'),
    ] {
        if m & flag != 0 {
            b[pos] = if b[pos] == 'x' || b[pos] == 's' || b[pos] == 't' {
                on
            } else {
                off
            };
        }
    }
    b.into_iter().collect()
}
