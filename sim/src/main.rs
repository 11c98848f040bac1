//! `sim`: runs treecast relay-tree simulations from scenario files.
//!
//! ```text
//! sim run sim/scenarios/small-talk.toml
//! sim sweep sim/scenarios/keynote.toml --set room.relay_fanout=2,3,4,6 --set seed=1,2,3
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use treecast_sim::engine::Engine;
use treecast_sim::report;
use treecast_sim::scenario::{Scenario, set_value};
use treecast_sim::stats::Summary;
use treecast_sim::sweep::{self, Axis};

/// treecast's discrete-event simulator: the signaller's own room and tree code with
/// simulated time, latency, capacities and churn. Outputs JSON, CSV and SVG plots.
#[derive(Debug, Parser)]
#[command(name = "sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one scenario.
    Run {
        /// Scenario file (TOML).
        scenario: PathBuf,
        /// Output directory [default: sim-out/<scenario file name>].
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Override a scenario value, e.g. `--set room.relay_fanout=6` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Run the Cartesian product of parameter values across all cores.
    Sweep {
        /// Scenario file (TOML).
        scenario: PathBuf,
        /// A swept parameter: `KEY=V1,V2,...` (repeatable; values are TOML literals).
        #[arg(long = "set", value_name = "KEY=V1,V2", required = true)]
        set: Vec<String>,
        /// Output directory [default: sim-out/<scenario file name>-sweep].
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Parallel runs [default: the number of cores].
        #[arg(long, short)]
        jobs: Option<usize>,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run {
            scenario,
            out,
            set,
            quiet,
        } => run(&scenario, out, &set, quiet),
        Command::Sweep {
            scenario,
            set,
            out,
            jobs,
            quiet,
        } => run_sweep(&scenario, &set, out, jobs, quiet),
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map_or("scenario".into(), |s| s.to_string_lossy().into_owned())
}

fn load_doc(path: &Path) -> Result<toml::Value, String> {
    // Load once through the validating path for a precise error, then keep the raw
    // document so overrides apply to what the user wrote.
    Scenario::load(path).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut doc: toml::Value = toml::from_str(&text).map_err(|e| e.to_string())?;
    // A latency matrix named relative to the scenario file is found next to it, wherever
    // `sim` runs from.
    let matrix = doc
        .get_mut("latency")
        .and_then(|l| l.get_mut("matrix_file"));
    if let Some(toml::Value::String(file)) = matrix
        && Path::new(file.as_str()).is_relative()
        && let Some(dir) = path.parent()
    {
        *file = dir.join(file.as_str()).display().to_string();
    }
    Ok(doc)
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

fn bar(len: u64, quiet: bool, template: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

fn run(path: &Path, out: Option<PathBuf>, set: &[String], quiet: bool) -> ExitCode {
    let mut doc = match load_doc(path) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    for kv in set {
        let Some((k, v)) = kv.split_once('=') else {
            return fail(format!("--set {kv:?}: expected KEY=VALUE"));
        };
        if let Err(e) = set_value(&mut doc, k.trim(), v.trim()) {
            return fail(e);
        }
    }
    let scenario = match Scenario::from_value(doc, &path.display().to_string()) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let out = out.unwrap_or_else(|| PathBuf::from("sim-out").join(stem(path)));
    let mut engine = match Engine::new(scenario) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let progress = bar(
        1000,
        quiet,
        "{bar:40} {percent:>3}% simulated, {elapsed} ({eta} left)",
    );
    let started = Instant::now();
    engine.run_with(|f| progress.set_position((f * 1000.0) as u64));
    progress.finish_and_clear();
    let stats = engine.finish();
    let wall = started.elapsed();
    let summary = match report::write(&stats, &out) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    print_summary(&summary);
    println!(
        "\n{} events in {:.2} s wall ({:.2} M events/s); results in {}",
        summary.events,
        wall.as_secs_f64(),
        summary.events as f64 / wall.as_secs_f64().max(1e-9) / 1e6,
        out.display()
    );
    ExitCode::SUCCESS
}

fn print_summary(s: &Summary) {
    println!(
        "{} (seed {}): {:.0} s simulated",
        s.name, s.seed, s.duration_s
    );
    println!(
        "  viewers      {} arrived, {} left ({} crashed), mean {:.1}, peak {}",
        s.arrivals, s.departures, s.crashes, s.mean_population, s.peak_population
    );
    println!(
        "  join time    p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms",
        s.join_time_ms.p50, s.join_time_ms.p95, s.join_time_ms.p99
    );
    println!(
        "  depth        mean {:.2}, p95 {}, max {}",
        s.depth.mean, s.depth.p95, s.depth.max
    );
    println!(
        "  latency      p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms (glass to glass)",
        s.latency_ms.p50, s.latency_ms.p95, s.latency_ms.p99
    );
    println!(
        "  interruption {:.3} per viewer-hour, {:.2} s per viewer-hour, p95 {:.0} ms",
        s.interruptions.per_viewer_hour,
        s.interruptions.seconds_per_viewer_hour,
        s.interruptions.duration_ms.p95
    );
    println!(
        "  load         broadcaster {:.2} children, relays {:.2}, capacity use {:.2}",
        s.load.broadcaster_children_mean, s.load.relay_children_mean, s.load.capacity_use
    );
    println!(
        "  signalling   {:.1} messages per viewer; {} re-parents; receiving {:.1} %, waiting {:.1} %",
        s.control_messages_per_viewer,
        s.reparents,
        s.receiving_fraction * 100.0,
        s.waiting_fraction * 100.0
    );
    let c = &s.connectivity;
    println!(
        "  connectivity TURN {}, {:.1} % of viewers on it; {} ICE failures ({:.3} per viewer-hour); no route {:.2} % (mean {:.1} waiting)",
        if c.turn { "on" } else { "off" },
        c.turn_share * 100.0,
        c.ice_failures,
        c.ice_failures_per_viewer_hour,
        c.no_route_fraction * 100.0,
        c.no_route_mean
    );
    let joins: Vec<String> = c
        .join_time_ms_by_nat
        .iter()
        .map(|(class, d)| format!("{class} {:.0}/{:.0}", d.p50, d.p95))
        .collect();
    println!("  join by NAT  p50/p95 ms: {}", joins.join(", "));
}

/// Quotes a CSV cell that holds a comma, quote or newline (swept arrays and tables do).
fn csv_cell(cell: &str) -> String {
    if cell.contains([',', '"', '\n']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_owned()
    }
}

fn run_sweep(
    path: &Path,
    set: &[String],
    out: Option<PathBuf>,
    jobs: Option<usize>,
    quiet: bool,
) -> ExitCode {
    let doc = match load_doc(path) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let axes: Vec<Axis> = match set.iter().map(|s| Axis::parse(s)).collect() {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let total = sweep::combinations(&axes).len();
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let out = out.unwrap_or_else(|| PathBuf::from("sim-out").join(format!("{}-sweep", stem(path))));
    let progress = bar(
        total as u64,
        quiet,
        "{bar:40} {pos}/{len} runs, {elapsed} ({eta} left)",
    );
    let started = Instant::now();
    let results = match sweep::run(&doc, &axes, &out, jobs, &|done, _| {
        progress.set_position(done as u64)
    }) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    progress.finish_and_clear();
    let table = sweep::table(&results);
    let csv: String = table
        .iter()
        .map(|row| {
            let cells: Vec<String> = row.iter().map(|c| csv_cell(c)).collect();
            cells.join(",") + "\n"
        })
        .collect();
    if let Err(e) = std::fs::write(out.join("sweep.csv"), csv) {
        return fail(format!(
            "cannot write {}: {e}",
            out.join("sweep.csv").display()
        ));
    }
    let widths: Vec<usize> = (0..table[0].len())
        .map(|c| table.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:>w$}"))
            .collect();
        println!("{}", line.join("  "));
    }
    println!(
        "\n{total} runs on {jobs} threads in {:.1} s; results in {} (sweep.csv, one directory per run)",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    ExitCode::SUCCESS
}
