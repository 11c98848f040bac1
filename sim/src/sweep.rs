//! Parameter sweeps: the Cartesian product of `--set key=v1,v2,...` overrides, run on
//! every core, each run in its own output directory, with a summary table.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::engine::{Engine, EngineError};
use crate::report::{self, ReportError};
use crate::scenario::{Scenario, ScenarioError, set_value};
use crate::stats::Summary;

/// One swept parameter and its values (TOML literals).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Axis {
    /// Dotted scenario key, e.g. `room.relay_fanout`.
    pub key: String,
    /// Values, each a TOML literal.
    pub values: Vec<String>,
}

/// A sweep or run that failed.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// A `--set` argument is malformed.
    #[error("--set {0:?}: expected key=value[,value...]")]
    Syntax(String),
    /// An override or the resulting scenario is invalid.
    #[error("{combo}: {source}")]
    Scenario {
        /// Which combination.
        combo: String,
        /// Why.
        source: ScenarioError,
    },
    /// A run could not start.
    #[error("{combo}: {source}")]
    Engine {
        /// Which combination.
        combo: String,
        /// Why.
        source: EngineError,
    },
    /// Output could not be written.
    #[error(transparent)]
    Report(#[from] ReportError),
}

impl Axis {
    /// Parses `key=v1,v2,...`; commas inside `[...]` or `{...}` belong to that value.
    pub fn parse(arg: &str) -> Result<Self, SweepError> {
        let (key, values) = arg
            .split_once('=')
            .filter(|(k, v)| !k.trim().is_empty() && !v.trim().is_empty())
            .ok_or_else(|| SweepError::Syntax(arg.to_owned()))?;
        let mut out = Vec::new();
        let (mut depth, mut start) = (0i32, 0);
        for (i, c) in values.char_indices() {
            match c {
                '[' | '{' => depth += 1,
                ']' | '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(values[start..i].trim().to_owned());
                    start = i + 1;
                }
                _ => {}
            }
        }
        out.push(values[start..].trim().to_owned());
        if out.iter().any(String::is_empty) {
            return Err(SweepError::Syntax(arg.to_owned()));
        }
        Ok(Self {
            key: key.trim().to_owned(),
            values: out,
        })
    }
}

/// Every combination of the axes' values, first axis slowest.
pub fn combinations(axes: &[Axis]) -> Vec<Vec<(String, String)>> {
    axes.iter().fold(vec![Vec::new()], |acc, axis| {
        acc.iter()
            .flat_map(|prefix| {
                axis.values.iter().map(move |v| {
                    let mut c = prefix.clone();
                    c.push((axis.key.clone(), v.clone()));
                    c
                })
            })
            .collect()
    })
}

/// A combination as text: `room.relay_fanout=2 seed=3`.
pub fn label(combo: &[(String, String)]) -> String {
    if combo.is_empty() {
        return "base".into();
    }
    combo
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn dir_name(i: usize, combo: &[(String, String)]) -> String {
    let clean: String = label(combo)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '=' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{i:03}-{clean}")
}

/// Builds the scenario of one combination.
pub fn scenario_for(
    base: &toml::Value,
    combo: &[(String, String)],
) -> Result<Scenario, SweepError> {
    let mut doc = base.clone();
    let wrap = |source| SweepError::Scenario {
        combo: label(combo),
        source,
    };
    for (k, v) in combo {
        set_value(&mut doc, k, v).map_err(wrap)?;
    }
    Scenario::from_value(doc, &label(combo)).map_err(wrap)
}

/// The result of one combination.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The overrides.
    pub combo: Vec<(String, String)>,
    /// Where its files are.
    pub dir: PathBuf,
    /// Its summary.
    pub summary: Summary,
}

/// Runs every combination on `jobs` threads, writing each into `out/<nnn-combo>/`.
/// `progress` is called after each run with (done, total). Results come back in
/// combination order, whatever order they finished in.
pub fn run(
    base: &toml::Value,
    axes: &[Axis],
    out: &Path,
    jobs: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Vec<RunResult>, SweepError> {
    let combos = combinations(axes);
    // Validate everything before spending minutes on the first runs.
    let scenarios: Vec<Scenario> = combos
        .iter()
        .map(|c| scenario_for(base, c))
        .collect::<Result<_, _>>()?;
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<RunResult, SweepError>>>> =
        Mutex::new((0..combos.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, combos.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(scenario) = scenarios.get(i) else {
                        return;
                    };
                    let combo = &combos[i];
                    let dir = out.join(dir_name(i, combo));
                    let result = Engine::new(scenario.clone())
                        .map_err(|source| SweepError::Engine {
                            combo: label(combo),
                            source,
                        })
                        .and_then(|engine| {
                            let stats = engine.run();
                            Ok(report::write(&stats, &dir)?)
                        })
                        .map(|summary| RunResult {
                            combo: combo.clone(),
                            dir,
                            summary,
                        });
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(result);
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1, combos.len());
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.expect("every combination ran"))
        .collect()
}

/// The summary table of a sweep, as CSV (also printed, aligned, by the CLI).
pub fn table(results: &[RunResult]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let keys: Vec<String> = results
        .first()
        .map(|r| r.combo.iter().map(|(k, _)| k.clone()).collect())
        .unwrap_or_default();
    let mut header = keys.clone();
    header.extend(
        [
            "mean_viewers",
            "depth_mean",
            "depth_max",
            "join_p95_ms",
            "latency_p50_ms",
            "latency_p95_ms",
            "interruptions_per_viewer_hour",
            "interruption_p95_ms",
            "receiving",
            "waiting",
            "turn_share",
            "no_route",
        ]
        .map(String::from),
    );
    rows.push(header);
    for r in results {
        let s = &r.summary;
        let mut row: Vec<String> = r.combo.iter().map(|(_, v)| v.clone()).collect();
        row.extend([
            format!("{:.1}", s.mean_population),
            format!("{:.2}", s.depth.mean),
            s.depth.max.to_string(),
            format!("{:.0}", s.join_time_ms.p95),
            format!("{:.0}", s.latency_ms.p50),
            format!("{:.0}", s.latency_ms.p95),
            format!("{:.3}", s.interruptions.per_viewer_hour),
            format!("{:.0}", s.interruptions.duration_ms.p95),
            format!("{:.3}", s.receiving_fraction),
            format!("{:.3}", s.waiting_fraction),
            format!("{:.3}", s.connectivity.turn_share),
            format!("{:.3}", s.connectivity.no_route_fraction),
        ]);
        rows.push(row);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_parse_and_multiply() {
        let a = Axis::parse("room.relay_fanout=2,3,4").unwrap();
        let b = Axis::parse("latency.matrix_file=\"m.csv\"").unwrap();
        let c = Axis::parse("x=[1,2],[3]").unwrap();
        assert_eq!(c.values, ["[1,2]", "[3]"]);
        assert_eq!(combinations(&[a, b]).len(), 3);
        assert!(Axis::parse("novalue").is_err());
        assert!(Axis::parse("k=1,,2").is_err());
    }
}
