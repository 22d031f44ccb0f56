//! PNG line charts with plotters. plotters' `ab_glyph` backend needs a TTF at runtime (no
//! fontconfig): Debian's fonts-dejavu-core, or `FATBOX_BENCH_FONT`.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::Series;

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("no TTF font found (install Debian's fonts-dejavu-core or set FATBOX_BENCH_FONT)")]
    NoFont,
    #[error("no points to plot")]
    Empty,
    #[error("drawing: {0}")]
    Draw(String),
}

fn ensure_font() -> Result<(), ChartError> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        let mut paths: Vec<String> = std::env::var("FATBOX_BENCH_FONT").into_iter().collect();
        paths.extend(FONT_CANDIDATES.iter().map(|s| s.to_string()));
        for p in paths {
            if let Ok(bytes) = std::fs::read(&p) {
                // register_font wants 'static bytes; one font for the process lifetime.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    });
    if ok {
        Ok(())
    } else {
        Err(ChartError::NoFont)
    }
}

fn draw_err<E: std::fmt::Debug>(e: E) -> ChartError {
    ChartError::Draw(format!("{e:?}"))
}

/// One chart, several series sharing axes (x from 0, y from 0: the curves are compared by eye).
pub fn render_chart(path: &Path, title: &str, series: &[&Series]) -> Result<(), ChartError> {
    ensure_font()?;
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut xmax, mut ymax) = (0f64, 0f64);
    let mut n = 0;
    for (x, y) in pts {
        xmax = xmax.max(*x);
        ymax = ymax.max(*y);
        n += 1;
    }
    if n == 0 {
        return Err(ChartError::Empty);
    }
    let xmax = if xmax > 0.0 { xmax * 1.05 } else { 1.0 };
    let ymax = if ymax > 0.0 { ymax * 1.15 } else { 1.0 };
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(draw_err)?;
    let first = series[0];
    chart
        .configure_mesh()
        .x_desc(first.x_label.as_str())
        .y_desc(first.y_label.as_str())
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(draw_err)?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(draw_err)?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(s.points.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(draw_err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(draw_err)?;
    Ok(())
}
