//! Bench report: every `bench/<area>/run.sh` writes one JSON file per area (our figure, the anchor
//! measured in the same run, the goal); this crate turns a directory of them into
//! `bench/REPORT.md` and PNG charts, so no number in the report is typed by hand.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod chart;

pub use chart::{render_chart, ChartError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a bench result: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no bench results (*.json) in {0}; run bench/run.sh first")]
    Empty(PathBuf),
    #[error("chart {path}: {source}")]
    Chart { path: PathBuf, source: ChartError },
}

pub type Result<T> = std::result::Result<T, Error>;

/// One area's results, as a bench script writes them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Area {
    /// Short key, used for ordering and file names ("boot", "procfs", ...).
    pub area: String,
    pub title: String,
    /// The command that produced these numbers, so a reader can reproduce them.
    pub command: String,
    #[serde(default)]
    pub notes: Vec<String>,
    #[serde(default)]
    pub rows: Vec<Row>,
    #[serde(default)]
    pub series: Vec<Series>,
}

/// One figure compared against its anchor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Row {
    pub metric: String,
    pub unit: String,
    pub ours: f64,
    /// What the anchor is ("systemd-nspawn -b", "lxcfs", ...); absent when there is none.
    #[serde(default)]
    pub anchor_name: Option<String>,
    #[serde(default)]
    pub anchor: Option<f64>,
    /// Direction of "better", needed to judge the goal.
    #[serde(default = "yes")]
    pub lower_is_better: bool,
    #[serde(default)]
    pub goal: Option<Goal>,
}

fn yes() -> bool {
    true
}

/// A goal from the issues: an absolute bound on our figure, or a bound on ours/anchor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Goal {
    /// ours ≤ value (in the row's unit).
    AtMost(f64),
    /// ours ≥ value.
    AtLeast(f64),
    /// ours / anchor ≤ value.
    RatioAtMost(f64),
    /// ours / anchor ≥ value (throughputs).
    RatioAtLeast(f64),
    /// anchor / ours ≥ value ("N× faster").
    SpeedupAtLeast(f64),
}

/// A curve for a chart: (x, y) points, e.g. instances → seconds to all running.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Series {
    pub chart: String,
    pub name: String,
    pub x_label: String,
    pub y_label: String,
    pub points: Vec<(f64, f64)>,
}

impl Row {
    pub fn ratio(&self) -> Option<f64> {
        match self.anchor {
            Some(a) if a != 0.0 => Some(self.ours / a),
            _ => None,
        }
    }

    /// None when there is no goal or the goal needs an anchor that was not measured.
    pub fn goal_met(&self) -> Option<bool> {
        match self.goal.as_ref()? {
            Goal::AtMost(v) => Some(self.ours <= *v),
            Goal::AtLeast(v) => Some(self.ours >= *v),
            Goal::RatioAtMost(v) => self.ratio().map(|r| r <= *v),
            Goal::RatioAtLeast(v) => self.ratio().map(|r| r >= *v),
            Goal::SpeedupAtLeast(v) => self.ratio().filter(|r| *r != 0.0).map(|r| 1.0 / r >= *v),
        }
    }
}

impl Goal {
    fn describe(&self, unit: &str) -> String {
        match self {
            Goal::AtMost(v) => format!("≤ {} {unit}", fmt_num(*v)),
            Goal::AtLeast(v) => format!("≥ {} {unit}", fmt_num(*v)),
            Goal::RatioAtMost(v) => format!("≤ {}× anchor", fmt_num(*v)),
            Goal::RatioAtLeast(v) => format!("≥ {}× anchor", fmt_num(*v)),
            Goal::SpeedupAtLeast(v) => format!("≥ {}× faster than anchor", fmt_num(*v)),
        }
    }
}

/// Reads every `*.json` in `dir` (sorted by name, so the report order is stable).
pub fn load_dir(dir: &Path) -> Result<Vec<Area>> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json") && !is_machine_file(p))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(Error::Empty(dir.to_path_buf()));
    }
    paths
        .iter()
        .map(|p| {
            let text = fs::read_to_string(p).map_err(|source| Error::Io {
                path: p.clone(),
                source,
            })?;
            serde_json::from_str(&text).map_err(|source| Error::Parse {
                path: p.clone(),
                source,
            })
        })
        .collect()
}

fn is_machine_file(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n == "machine.json")
}

/// What the numbers ran on; read by the bench command at report time.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    pub date: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
    pub commit: String,
    pub mode: String,
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Markdown for the whole report. `charts` maps an area to the chart files (relative to the
/// report) that belong to it.
pub fn render_markdown(machine: &Machine, areas: &[Area], charts: &[(String, String)]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# fatbox benchmark report\n");
    let _ = writeln!(
        s,
        "Generated by `bench/run.sh{}` — do not edit by hand; rerun it instead.\n",
        if machine.mode == "quick" {
            " --quick"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "| machine | |\n|---|---|");
    for (k, v) in [
        ("date", machine.date.clone()),
        ("cpu", machine.cpu.clone()),
        ("cores", machine.cores.to_string()),
        ("memory", format!("{:.1} GiB", machine.memory_gib)),
        ("kernel", machine.kernel.clone()),
        ("os", machine.os.clone()),
        ("commit", machine.commit.clone()),
        ("mode", machine.mode.clone()),
    ] {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    s.push('\n');
    let (mut met, mut missed) = (0, 0);
    for a in areas {
        for r in &a.rows {
            match r.goal_met() {
                Some(true) => met += 1,
                Some(false) => missed += 1,
                None => {}
            }
        }
    }
    let _ = writeln!(s, "Goals met: {met}, missed: {missed}.\n");
    for a in areas {
        let _ = writeln!(s, "## {}\n", a.title);
        let _ = writeln!(s, "Command: `{}`\n", a.command);
        if !a.rows.is_empty() {
            let _ = writeln!(
                s,
                "| metric | fatbox | anchor | anchor value | ratio | goal | met |\n|---|---|---|---|---|---|---|"
            );
            for r in &a.rows {
                let anchor_val = r
                    .anchor
                    .map(|v| format!("{} {}", fmt_num(v), r.unit))
                    .unwrap_or_else(|| "—".into());
                let ratio = r
                    .ratio()
                    .map(|v| format!("{}×", fmt_num(v)))
                    .unwrap_or_else(|| "—".into());
                let goal = r
                    .goal
                    .as_ref()
                    .map(|g| g.describe(&r.unit))
                    .unwrap_or_else(|| "—".into());
                let met = match r.goal_met() {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "—",
                };
                let _ = writeln!(
                    s,
                    "| {} | {} {} | {} | {} | {} | {} | {} |",
                    r.metric,
                    fmt_num(r.ours),
                    r.unit,
                    r.anchor_name.as_deref().unwrap_or("—"),
                    anchor_val,
                    ratio,
                    goal,
                    met
                );
            }
            s.push('\n');
        }
        for n in &a.notes {
            let _ = writeln!(s, "- {n}");
        }
        if !a.notes.is_empty() {
            s.push('\n');
        }
        for (area, file) in charts {
            if *area == a.area {
                let _ = writeln!(s, "![{}]({file})\n", file);
            }
        }
    }
    s
}

/// Charts grouped by `Series::chart`: one PNG per (area, chart) under `out_dir`; returns
/// (area, path relative to `rel_base`).
pub fn render_charts(
    areas: &[Area],
    out_dir: &Path,
    rel_base: &Path,
) -> Result<Vec<(String, String)>> {
    fs::create_dir_all(out_dir).map_err(|source| Error::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for a in areas {
        let mut names: Vec<&str> = a.series.iter().map(|s| s.chart.as_str()).collect();
        names.dedup();
        names.sort_unstable();
        names.dedup();
        for name in names {
            let series: Vec<&Series> = a.series.iter().filter(|s| s.chart == name).collect();
            let file = format!("{}-{}.png", a.area, slug(name));
            let path = out_dir.join(&file);
            render_chart(&path, name, &series).map_err(|source| Error::Chart {
                path: path.clone(),
                source,
            })?;
            let rel = path
                .strip_prefix(rel_base)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| path.to_string_lossy().into_owned());
            out.push((a.area.clone(), rel));
        }
    }
    Ok(out)
}

fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// Atomic write: a reader never sees half a report.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    tmp.write_all(data).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ours: f64, anchor: Option<f64>, goal: Goal) -> Row {
        Row {
            metric: "m".into(),
            unit: "s".into(),
            ours,
            anchor_name: anchor.map(|_| "a".into()),
            anchor,
            lower_is_better: true,
            goal: Some(goal),
        }
    }

    #[test]
    fn goals() {
        assert_eq!(
            row(1.0, Some(2.0), Goal::RatioAtMost(1.5)).goal_met(),
            Some(true)
        );
        assert_eq!(
            row(3.2, Some(2.0), Goal::RatioAtMost(1.5)).goal_met(),
            Some(false)
        );
        assert_eq!(
            row(1.0, Some(6.0), Goal::SpeedupAtLeast(5.0)).goal_met(),
            Some(true)
        );
        assert_eq!(
            row(2.0, Some(6.0), Goal::SpeedupAtLeast(5.0)).goal_met(),
            Some(false)
        );
        assert_eq!(row(2.0, None, Goal::RatioAtMost(1.0)).goal_met(), None);
        assert_eq!(row(2.0, None, Goal::AtMost(5.0)).goal_met(), Some(true));
        assert_eq!(row(2.0, None, Goal::AtLeast(5.0)).goal_met(), Some(false));
    }

    #[test]
    fn markdown_has_every_row_and_verdict() {
        let a = Area {
            area: "boot".into(),
            title: "Boot".into(),
            command: "bench/boot/run.sh 3".into(),
            notes: vec!["n1".into()],
            rows: vec![row(0.4, Some(0.33), Goal::RatioAtMost(1.1))],
            series: vec![],
        };
        let md = render_markdown(&Machine::default(), &[a], &[]);
        assert!(md.contains("| m | 0.40 s | a | 0.33 s | 1.21× | ≤ 1.10× anchor | **no** |"));
        assert!(md.contains("Goals met: 0, missed: 1."));
        assert!(md.contains("- n1"));
    }

    #[test]
    fn rejects_unknown_fields_and_empty_dirs() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(load_dir(d.path()), Err(Error::Empty(_))));
        fs::write(d.path().join("x.json"), r#"{"area":"x","titel":"typo"}"#).unwrap();
        let e = load_dir(d.path()).unwrap_err().to_string();
        assert!(e.contains("x.json"), "{e}");
    }

    #[test]
    fn slugs() {
        assert_eq!(slug("Time to all running (s)"), "time-to-all-running-s");
    }
}

#[cfg(test)]
mod chart_tests {
    use super::*;

    /// Needs Debian's fonts-dejavu-core (tests/deps.sh installs it).
    #[test]
    fn renders_a_png_per_chart() {
        let d = tempfile::tempdir().unwrap();
        let s = |name: &str, pts: Vec<(f64, f64)>| Series {
            chart: "Time to all running".into(),
            name: name.into(),
            x_label: "instances".into(),
            y_label: "s".into(),
            points: pts,
        };
        let a = Area {
            area: "density".into(),
            title: "Density".into(),
            command: "x".into(),
            notes: vec![],
            rows: vec![],
            series: vec![
                s("fatbox", vec![(1.0, 0.4), (10.0, 3.0)]),
                s("nspawn", vec![(1.0, 0.3)]),
            ],
        };
        let charts = render_charts(&[a], &d.path().join("charts"), d.path()).unwrap();
        assert_eq!(
            charts,
            vec![(
                "density".to_string(),
                "charts/density-time-to-all-running.png".to_string()
            )]
        );
        let png = fs::read(d.path().join(&charts[0].1)).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(
            png.len() > 5000,
            "chart suspiciously small: {} bytes",
            png.len()
        );
    }
}
