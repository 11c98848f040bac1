//! Run outputs: `summary.json`, CSV tables and SVG plots in one directory.
//!
//! | file | what |
//! |---|---|
//! | `summary.json` | [`crate::stats::Summary`]: every headline number |
//! | `timeseries.csv` | one row per sample: population, attached, waiting, receiving, depth, repairs, relayed, no route |
//! | `latency_by_depth.csv` | glass-to-glass latency per depth: count, mean, p50, p95, p99, max |
//! | `depth_histogram.csv` | share of viewer samples at each depth |
//! | `interruptions.csv` | the interruption-duration CDF |
//! | `latency_cdf.svg`, `depth_histogram.svg`, `interruption_cdf.svg`, `timeseries.svg` | plots |

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use plotters::prelude::*;
use plotters::series::Histogram as Bars;

use crate::stats::{Stats, Summary};

/// Output could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file or directory could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A plot could not be drawn.
    #[error("cannot draw {path}: {message}")]
    Plot {
        /// The path.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

fn write_file(path: PathBuf, text: &str) -> Result<(), ReportError> {
    std::fs::write(&path, text).map_err(|source| ReportError::Io { path, source })
}

/// Writes every output of a run into `dir` (created if needed); returns the summary.
pub fn write(stats: &Stats, dir: &Path) -> Result<Summary, ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let summary = stats.summary();
    let json = serde_json::to_string_pretty(&summary).expect("plain data serializes");
    write_file(dir.join("summary.json"), &(json + "\n"))?;
    write_file(dir.join("timeseries.csv"), &timeseries_csv(stats))?;
    write_file(dir.join("latency_by_depth.csv"), &latency_csv(&summary))?;
    write_file(dir.join("depth_histogram.csv"), &depth_csv(&summary))?;
    write_file(
        dir.join("interruptions.csv"),
        &cdf_csv(stats.interruption_histogram()),
    )?;
    plot_latency_cdf(stats, &dir.join("latency_cdf.svg"))?;
    plot_depth_histogram(&summary, &dir.join("depth_histogram.svg"))?;
    plot_interruption_cdf(stats, &dir.join("interruption_cdf.svg"))?;
    plot_timeseries(stats, &dir.join("timeseries.svg"))?;
    Ok(summary)
}

fn timeseries_csv(stats: &Stats) -> String {
    let mut out = String::from(
        "t_s,population,attached,waiting,receiving,max_depth,mean_depth,repairs,reparents,interruptions,relayed,no_route\n",
    );
    for r in &stats.series {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            r.t_s,
            r.population,
            r.attached,
            r.waiting,
            r.receiving,
            r.max_depth,
            r.mean_depth,
            r.repairs,
            r.reparents,
            r.interruptions,
            r.relayed,
            r.no_route
        );
    }
    out
}

fn latency_csv(summary: &Summary) -> String {
    let mut out = String::from("depth,count,mean_ms,p50_ms,p95_ms,p99_ms,max_ms\n");
    for d in &summary.latency_by_depth {
        let l = &d.latency_ms;
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{}",
            d.depth, l.count, l.mean, l.p50, l.p95, l.p99, l.max
        );
    }
    out
}

fn depth_csv(summary: &Summary) -> String {
    let mut out = String::from("depth,share\n");
    for (d, share) in summary.depth.histogram.iter().enumerate() {
        let _ = writeln!(out, "{d},{share}");
    }
    out
}

/// CDF points (value in ms, cumulative share), at most about 200, in one pass over the
/// recorded values (asking for 200 quantiles would walk the histogram 200 times).
fn cdf_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let total = h.len() as f64;
    let mut points = vec![(h.min() as f64 / 1_000.0, 0.0)];
    let mut seen = 0u64;
    let mut next_share = 0.005;
    for v in h.iter_recorded() {
        seen += v.count_at_value();
        let share = seen as f64 / total;
        if share >= next_share || seen == h.len() {
            points.push((
                h.highest_equivalent(v.value_iterated_to()) as f64 / 1_000.0,
                share,
            ));
            next_share = share + 0.005;
        }
    }
    points
}

fn cdf_csv(h: &Histogram<u64>) -> String {
    let mut out = String::from("duration_ms,cumulative_share\n");
    for (v, q) in cdf_points(h) {
        let _ = writeln!(out, "{v},{q}");
    }
    out
}

const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn plot_err(path: &Path) -> impl Fn(String) -> ReportError + '_ {
    move |message| ReportError::Plot {
        path: path.to_owned(),
        message,
    }
}

/// Draws CDF curves; `curves` are (label, points).
fn plot_cdfs(
    path: &Path,
    title: &str,
    x_desc: &str,
    curves: &[(String, Vec<(f64, f64)>)],
) -> Result<(), ReportError> {
    let err = plot_err(path);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let x_max = curves
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.0))
        .fold(1.0f64, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..x_max, 0.0..1.0)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("share of samples at or below")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, (label, pts)) in curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
    }
    if !curves.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

fn plot_latency_cdf(stats: &Stats, path: &Path) -> Result<(), ReportError> {
    let hists = stats.latency_histograms();
    let present: Vec<(usize, &Histogram<u64>)> = hists
        .iter()
        .enumerate()
        .filter(|(_, h)| !h.is_empty())
        .collect();
    // Plot at most 8 depths, evenly spread, so the legend stays readable.
    let step = present.len().div_ceil(8).max(1);
    let curves: Vec<(String, Vec<(f64, f64)>)> = present
        .iter()
        .step_by(step)
        .map(|(d, h)| (format!("depth {d}"), cdf_points(h)))
        .collect();
    plot_cdfs(
        path,
        "Glass-to-glass latency by depth",
        "latency (ms)",
        &curves,
    )
}

fn plot_interruption_cdf(stats: &Stats, path: &Path) -> Result<(), ReportError> {
    let h = stats.interruption_histogram();
    let curves = if h.is_empty() {
        Vec::new()
    } else {
        vec![(format!("{} interruptions", h.len()), cdf_points(h))]
    };
    plot_cdfs(path, "Media interruptions", "duration (ms)", &curves)
}

fn plot_depth_histogram(summary: &Summary, path: &Path) -> Result<(), ReportError> {
    let err = plot_err(path);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let shares = &summary.depth.histogram;
    let y_max = shares.iter().copied().fold(0.01f64, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("Depth of viewers (all samples)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(
            (0u32..shares.len().max(1) as u32).into_segmented(),
            0.0..y_max,
        )
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("depth (hops from the broadcaster)")
        .y_desc("share of viewers")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    // One series per bar: a histogram series keeps its bars in a hash map, so bars drawn
    // together would come out in a different order on every run.
    for (d, &s) in shares.iter().enumerate() {
        chart
            .draw_series(
                Bars::vertical(&chart)
                    .style(COLOURS[0].filled())
                    .margin(4)
                    .data([(d as u32, s)]),
            )
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

/// A labelled column of the time series.
type Column = (&'static str, fn(&crate::stats::SeriesRow) -> u64);

/// One panel of time-series lines, coloured from `first_colour` on.
fn series_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    stats: &Stats,
    title: &str,
    y_desc: &str,
    x_desc: Option<&str>,
    columns: &[Column],
    first_colour: usize,
) -> Result<(), String> {
    let rows = &stats.series;
    let t_max = rows.last().map_or(1.0, |r| r.t_s).max(1.0);
    let y_max = rows
        .iter()
        .flat_map(|r| columns.iter().map(move |(_, value)| value(r)))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(if x_desc.is_some() { 40 } else { 30 })
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(|e| e.to_string())?;
    let mut mesh = chart.configure_mesh();
    mesh.y_desc(y_desc);
    if let Some(x) = x_desc {
        mesh.x_desc(x);
    }
    mesh.draw().map_err(|e| e.to_string())?;
    for (i, (label, value)) in columns.iter().enumerate() {
        let colour = COLOURS[(first_colour + i) % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                rows.iter().map(|r| (r.t_s, value(r) as f64)),
                colour.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

fn plot_timeseries(stats: &Stats, path: &Path) -> Result<(), ReportError> {
    let err = plot_err(path);
    let root = SVGBackend::new(path, (800, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (top, bottom) = root.split_vertically(320);
    let population: [Column; 3] = [
        ("present", |r| r.population),
        ("receiving", |r| r.receiving),
        ("waiting", |r| r.waiting),
    ];
    let repairs: [Column; 2] = [
        ("subtrees repaired", |r| r.repairs),
        ("interruptions ended", |r| r.interruptions),
    ];
    series_panel(&top, stats, "Population", "viewers", None, &population, 0).map_err(&err)?;
    series_panel(
        &bottom,
        stats,
        "Repairs and interruptions per sample",
        "per sample",
        Some("simulated time (s)"),
        &repairs,
        population.len(),
    )
    .map_err(&err)?;
    root.present().map_err(|e| err(e.to_string()))
}
