//! Client mechanisms modelled as scenario options: departure kinds, make-before-break and
//! warm standby parents.

use treecast_sim::engine::Engine;
use treecast_sim::scenario::{Arrivals, Scenario, Session};
use treecast_sim::stats::Summary;

fn run(scenario: Scenario) -> Summary {
    scenario.validate().unwrap();
    Engine::new(scenario).unwrap().run().summary()
}

/// Churn with no crashes: every departure sends `leave`.
fn graceful(seed: u64) -> Scenario {
    Scenario {
        name: "graceful churn".into(),
        seed,
        duration_s: 900.0,
        warmup_s: 60.0,
        arrivals: Arrivals {
            rate_per_s: 1.0,
            flash_peers: 300,
            flash_over_s: 30.0,
            ..Arrivals::default()
        },
        session: Session::Lognormal {
            mu: 5.0,
            sigma: 1.0,
        },
        crash_fraction: 0.0,
        ..Scenario::default()
    }
}

/// With every departure an in-app leave and make-before-break, a leaving relay feeds its
/// children until their new links carry media, and a viewer the room moves keeps its old
/// link until then. Without make-before-break the same departures (tab closes, in effect)
/// interrupt their descendants (about 3,000 interruptions); with it, at most a fiftieth as many.
/// Not none: the simulated in-app leave still sends a plain `leave` and bridges on the
/// client side (not the room's `linger`), and background moves made while such a bridge is
/// up can cut it (seed 1: 25 short interruptions, 4 with rebalancing off).
#[test]
fn in_app_leaves_with_make_before_break_interrupt_few() {
    for seed in [1, 2] {
        let mut s = graceful(seed);
        s.in_app_leave_fraction = 1.0;
        let without = run(s.clone());
        s.client.make_before_break = true;
        let with = run(s);
        assert!(
            without.interruptions.count > 50 && without.repairs.get("parent_left") > Some(&20),
            "leaving relays interrupt their subtrees without it: {:?}",
            without.interruptions
        );
        assert!(
            with.repairs.get("parent_left") > Some(&20),
            "relays left: {:?}",
            with.repairs
        );
        eprintln!(
            "seed {seed}: interruptions {} without, {} with make-before-break",
            without.interruptions.count, with.interruptions.count
        );
        assert!(
            with.interruptions.count * 50 <= without.interruptions.count,
            "seed {seed}: {:?} against {:?}",
            with.interruptions,
            without.interruptions
        );
    }
}

/// An in-app leave without make-before-break is a tab close: the page stops forwarding
/// when it sends `leave`. Same seed, same results.
#[test]
fn in_app_leaves_alone_change_nothing() {
    let tab_closes = run(graceful(3));
    let mut s = graceful(3);
    s.in_app_leave_fraction = 1.0;
    assert_eq!(run(s), tab_closes);
}

/// Warm standby: the repair link costs one round trip between the two peers, not the
/// signalled offer/answer and the ICE and DTLS set-up, so interruptions after a relay's
/// departure are shorter; how many there are does not change much.
#[test]
fn a_standby_switch_is_shorter_than_a_cold_reconnect() {
    let mut s = graceful(4);
    s.crash_fraction = 0.5;
    let cold = run(s.clone());
    s.client.warm_standby = true;
    let warm = run(s);
    let (c, w) = (
        &cold.interruptions.duration_ms,
        &warm.interruptions.duration_ms,
    );
    eprintln!(
        "interruption mean / p50 / p95: cold {:.0} / {:.0} / {:.0} ms, warm {:.0} / {:.0} / {:.0} ms",
        c.mean, c.p50, c.p95, w.mean, w.p50, w.p95
    );
    assert!(c.count > 50 && w.count > 50, "{c:?} {w:?}");
    // Mean and total time without media; the median is not compared: the room's repairs
    // (which stall reports it acts on, which parents it holds back) shift with the timing,
    // so the two runs do not interrupt the same set of viewers.
    let total = |d: &treecast_sim::stats::Dist| d.mean * d.count as f64;
    assert!(
        w.mean < c.mean && total(w) < total(c),
        "warm {w:?}, cold {c:?}"
    );
}
