//! The `sim` binary end to end: a scenario with a latency matrix beside it, `run` from
//! another working directory, and a two-run `sweep`.

use std::process::Command;

#[test]
fn run_and_sweep_write_their_outputs() {
    let dir = std::env::temp_dir().join(format!("treecast-sim-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Three hosts, 5-40 ms apart; host 0 is the signaller's.
    std::fs::write(
        dir.join("king.csv"),
        "# one-way delays, ms\n0, 5, 20\n 5,0,40\n20 40 0\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("scenario.toml"),
        "name = \"cli\"\nduration_s = 120\n\n[arrivals]\nrate_per_s = 2.0\n\n\
         [latency]\nmatrix_file = \"king.csv\"\n",
    )
    .unwrap();
    let sim = env!("CARGO_BIN_EXE_sim");
    let out = dir.join("run");
    succeeds(
        Command::new(sim)
            .current_dir(std::env::temp_dir())
            .args(["run", "--quiet", "--out"])
            .arg(&out)
            .arg(dir.join("scenario.toml")),
    );
    for file in [
        "summary.json",
        "timeseries.csv",
        "latency_cdf.svg",
        "timeseries.svg",
    ] {
        assert!(out.join(file).is_file(), "{file} written");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    // With the matrix, no one-way delay exceeds 40 ms: depth-1 latency stays under it.
    let d1 = &summary["latency_by_depth"][0];
    assert_eq!(d1["depth"], 1);
    assert!(d1["latency_ms"]["max"].as_f64().unwrap() <= 41.0, "{d1}");

    let sweep = dir.join("sweep");
    succeeds(
        Command::new(sim)
            .args(["sweep", "--quiet", "--jobs", "2", "--out"])
            .arg(&sweep)
            .arg(dir.join("scenario.toml"))
            .args(["--set", "room.relay_fanout=1,3"]),
    );
    let table = std::fs::read_to_string(sweep.join("sweep.csv")).unwrap();
    assert_eq!(
        table.lines().count(),
        3,
        "a header and one row per run:\n{table}"
    );
    assert!(table.starts_with("room.relay_fanout,"), "{table}");

    let bad = Command::new(sim)
        .args(["run", "--quiet", "--set", "crash_fraction=7"])
        .arg(dir.join("scenario.toml"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("crash_fraction"),
        "the error names the key"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Runs the command; fails the test with its stderr unless it exits successfully.
fn succeeds(command: &mut Command) {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
