//! The simulator against known results: queueing theory, tree bounds, reproducibility.

use treecast_sim::engine::Engine;
use treecast_sim::scenario::{Arrivals, Capacity, CapacityClass, Scenario, Session};

fn run(scenario: Scenario) -> treecast_sim::stats::Summary {
    scenario.validate().unwrap();
    Engine::new(scenario).unwrap().run().summary()
}

/// M/M/∞: Poisson arrivals at rate λ and exponential sessions of mean 1/μ give a mean
/// population of λ/μ. λ = 2/s, mean session 300 s ⇒ 600 viewers on average; measured over
/// 4 simulated hours after a one-hour warm-up (the population's correlation time is one
/// mean session, so the standard error of the time average is about 0.4 %).
#[test]
fn population_matches_m_m_infinity() {
    let scenario = Scenario {
        name: "M/M/inf".into(),
        seed: 11,
        duration_s: 5.0 * 3_600.0,
        warmup_s: 3_600.0,
        sample_interval_s: 60.0,
        arrivals: Arrivals {
            rate_per_s: 2.0,
            ..Arrivals::default()
        },
        session: Session::Exponential { mean_s: 300.0 },
        ..Scenario::default()
    };
    let s = run(scenario);
    let expected = 2.0 * 300.0;
    let error = (s.mean_population - expected).abs() / expected;
    assert!(
        error < 0.02,
        "mean population {} vs λ/μ = {expected} ({:.2} % off)",
        s.mean_population,
        error * 100.0
    );
}

/// Without churn and with equal capacity k everywhere, the tree is as shallow as possible:
/// its depth is d_min = ceil(log_k(1 + N(k−1)/k_s)).
#[test]
fn depth_without_churn_is_the_minimum() {
    for (n, k) in [(1_000u64, 2u32), (5_000, 3), (3_000, 4)] {
        let scenario = Scenario {
            name: format!("no churn, k = {k}"),
            seed: 5,
            duration_s: 200.0,
            sample_interval_s: 190.0,
            arrivals: Arrivals {
                rate_per_s: 0.0,
                flash_peers: n,
                flash_over_s: 60.0,
                ..Arrivals::default()
            },
            session: Session::Forever,
            capacity: Capacity {
                classes: vec![CapacityClass {
                    children: k,
                    fraction: 1.0,
                }],
                broadcaster_children: k,
            },
            crash_fraction: 0.0,
            room: treecast_sim::scenario::sim_room_config_with(k, k, 64),
            ..Scenario::default()
        };
        let s = run(scenario);
        let kf = f64::from(k);
        let d_min = (1.0 + n as f64 * (kf - 1.0) / kf).log(kf).ceil() as u32;
        assert_eq!(s.depth.max, d_min, "N = {n}, k = {k}");
        assert_eq!(s.arrivals, n);
        assert!(s.receiving_fraction > 0.99, "{}", s.receiving_fraction);
    }
}

fn churny(seed: u64) -> Scenario {
    Scenario {
        name: "determinism".into(),
        seed,
        duration_s: 900.0,
        arrivals: Arrivals {
            rate_per_s: 1.0,
            flash_peers: 200,
            flash_over_s: 30.0,
            ..Arrivals::default()
        },
        session: Session::Lognormal {
            mu: 5.0,
            sigma: 1.0,
        },
        crash_fraction: 0.3,
        ..Scenario::default()
    }
}

#[test]
fn same_seed_gives_identical_output_and_other_seeds_do_not() {
    let dir = std::env::temp_dir().join(format!("treecast-sim-det-{}", std::process::id()));
    let files = |seed: u64, tag: &str| {
        let out = dir.join(tag);
        let stats = Engine::new(churny(seed)).unwrap().run();
        treecast_sim::report::write(&stats, &out).unwrap();
        [
            "summary.json",
            "timeseries.csv",
            "latency_by_depth.csv",
            "latency_cdf.svg",
            "depth_histogram.svg",
        ]
        .map(|f| std::fs::read(out.join(f)).unwrap())
    };
    let a = files(7, "a");
    let b = files(7, "b");
    let c = files(8, "c");
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(a, b, "same seed, same bytes");
    assert_ne!(a[0], c[0], "another seed, another run");
}

#[test]
fn every_session_model_runs_and_churns() {
    for session in [
        Session::Exponential { mean_s: 120.0 },
        Session::Lognormal {
            mu: 4.5,
            sigma: 1.2,
        },
        Session::Pareto {
            scale_s: 30.0,
            shape: 1.5,
        },
        Session::Weibull {
            scale_s: 150.0,
            shape: 0.6,
        },
    ] {
        let s = run(Scenario {
            duration_s: 600.0,
            session: session.clone(),
            arrivals: Arrivals {
                rate_per_s: 2.0,
                ..Arrivals::default()
            },
            ..Scenario::default()
        });
        assert!(
            s.departures > 100,
            "{session:?}: {} departures",
            s.departures
        );
        assert!(
            s.receiving_fraction > 0.9,
            "{session:?}: {}",
            s.receiving_fraction
        );
        assert!(s.join_time_ms.p50 > 0.0);
    }
}

/// A crashed relay whose socket closes at once (a killed process): the signaller's
/// `parent_disconnected` lets its children report after `parent_lost_ms` instead of their
/// depth-stepped watchdog, so interruptions are shorter than with the hint disabled (a
/// window longer than any watchdog never comes first).
#[test]
fn the_parent_disconnected_hint_shortens_interruptions_after_crashes() {
    let crashes = |parent_lost_ms: f64| {
        let mut s = churny(7);
        s.crash_fraction = 1.0;
        s.timing.crash_detect_ms = 5.0;
        s.timing.parent_lost_ms = parent_lost_ms;
        run(s).interruptions.duration_ms
    };
    let with_hint = crashes(400.0);
    let without = crashes(1e9);
    eprintln!(
        "interruption mean / p95: {:.0} / {:.0} ms with the hint, {:.0} / {:.0} ms without",
        with_hint.mean, with_hint.p95, without.mean, without.p95
    );
    assert!(
        with_hint.count > 100,
        "crashes interrupt someone: {with_hint:?}"
    );
    assert!(
        with_hint.mean < without.mean && with_hint.p95 < without.p95,
        "with the hint {with_hint:?}, without {without:?}"
    );
}
