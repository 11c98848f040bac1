//! Client mechanisms modelled as scenario options: departure kinds, make-before-break and
//! the standby links the room asks for.

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

/// Total time without media over all interruptions, ms.
fn total(d: &treecast_sim::stats::Dist) -> f64 {
    d.mean * d.count as f64
}

/// Warm standby, when every departure sends `leave`: the room repairs each leaving relay
/// with the stand-in it designated, whose links to the relay's parent and children the
/// clients prepared when told `standby`. Those links carry media after a round trip
/// instead of the signalled offer/answer and the ICE and DTLS set-up, so the orphans'
/// interruptions are shorter; how many there are barely changes. The room asks in both
/// runs: only the clients differ.
#[test]
fn prepared_standby_links_shorten_the_repairs_of_leaving_relays() {
    let s = graceful(4);
    assert!(
        s.room.warm_standby,
        "the room asks for standby links by default"
    );
    let cold = run(s.clone());
    let mut s = s;
    s.client.warm_standby = true;
    let warm = run(s);
    assert_eq!(
        cold.standby,
        Default::default(),
        "clients that ignore `standby` use none"
    );
    let used = warm.standby.used_ready + warm.standby.used_setting_up;
    eprintln!(
        "standby links: {:?}; parent_left repairs: {:?} cold, {:?} warm",
        warm.standby,
        cold.repairs.get("parent_left"),
        warm.repairs.get("parent_left")
    );
    assert!(
        warm.standby.prepared > 100 && used > 20,
        "the stand-ins' links are prepared and used: {:?}",
        warm.standby
    );
    let (c, w) = (
        &cold.interruptions.duration_ms,
        &warm.interruptions.duration_ms,
    );
    eprintln!(
        "interruption mean / p50 / p95: cold {:.0} / {:.0} / {:.0} ms, warm {:.0} / {:.0} / {:.0} ms",
        c.mean, c.p50, c.p95, w.mean, w.p50, w.p95
    );
    assert!(c.count > 50 && w.count > 50, "{c:?} {w:?}");
    // Mean and total time without media. Not the median: the two runs' timing differs, so
    // the room's repairs (and rebalancing moves) do not interrupt the same viewers.
    assert!(
        w.mean < c.mean && total(w) < total(c),
        "warm {w:?}, cold {c:?}"
    );
}

/// Crashed relays: when the signaller sees the socket close before the children's frame
/// watchdogs fire, the room removes the relay and its stand-in takes over on the links it
/// prepared, so the crashed relays' children get media back sooner. (With the default
/// 5 s until the close is seen, the children's stall reports come first and the room
/// moves them one by one to new parents, cold.)
#[test]
fn prepared_standby_links_shorten_the_repairs_of_crashed_relays() {
    let mut s = graceful(5);
    s.crash_fraction = 1.0;
    s.timing.crash_detect_ms = 50.0;
    let cold = run(s.clone());
    s.client.warm_standby = true;
    let warm = run(s);
    let (c, w) = (
        &cold.interruptions.duration_ms,
        &warm.interruptions.duration_ms,
    );
    eprintln!(
        "crashes: standby {:?}; interruption mean / p95: cold {:.0} / {:.0} ms, warm {:.0} / {:.0} ms",
        warm.standby, c.mean, c.p95, w.mean, w.p95
    );
    assert!(warm.standby.used_ready > 20, "{:?}", warm.standby);
    assert!(c.count > 50 && w.count > 50, "{c:?} {w:?}");
    assert!(
        w.mean < c.mean && total(w) < total(c),
        "warm {w:?}, cold {c:?}"
    );
}

/// Clients prepare only the standby links the room asks for: with the room's
/// `warm_standby` off, the clients' setting changes nothing.
#[test]
fn without_the_rooms_request_clients_prepare_nothing() {
    let mut s = graceful(6);
    s.crash_fraction = 0.3;
    s.room.warm_standby = false;
    let cold = run(s.clone());
    s.client.warm_standby = true;
    let warm = run(s);
    assert_eq!(warm.standby.prepared, 0);
    assert_eq!(warm, cold);
}
