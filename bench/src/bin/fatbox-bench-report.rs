//! `fatbox-bench-report --results DIR --out bench/REPORT.md [--charts bench/charts]`: the last step
//! of bench/run.sh.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use clap::Parser;
use fatbox_bench::{load_dir, render_charts, render_markdown, write_atomic, Machine};

#[derive(Parser)]
#[command(about = "Write bench/REPORT.md and charts from the bench scripts' JSON results")]
struct Args {
    /// Directory of <area>.json files written by the bench scripts.
    #[arg(long, default_value = "bench/out")]
    results: PathBuf,
    /// Report file.
    #[arg(long, default_value = "bench/REPORT.md")]
    out: PathBuf,
    /// Directory for PNG charts.
    #[arg(long, default_value = "bench/charts")]
    charts: PathBuf,
    /// Marks the report as a quick run (fewer repetitions, smaller sizes).
    #[arg(long)]
    quick: bool,
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_default()
}

fn machine(quick: bool) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|s| s.trim_matches('"').to_string())
        .unwrap_or_default();
    Machine {
        date: first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        cpu,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: mem_kib / 1024.0 / 1024.0,
        kernel: first_line("uname", &["-r"]),
        os,
        commit: first_line("git", &["rev-parse", "--short", "HEAD"]),
        mode: if quick { "quick" } else { "full" }.into(),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let areas = load_dir(&args.results)?;
    let base = args
        .out
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let charts = render_charts(&areas, &args.charts, &base).context("rendering charts")?;
    let md = render_markdown(&machine(args.quick), &areas, &charts);
    write_atomic(&args.out, md.as_bytes())
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "wrote {} ({} areas, {} charts)",
        args.out.display(),
        areas.len(),
        charts.len()
    );
    Ok(())
}
