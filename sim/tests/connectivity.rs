//! NAT classes, the TURN relay and ICE failure, driven through the production room.

use treecast_core::protocol::NatClass;
use treecast_sim::engine::Engine;
use treecast_sim::scenario::{
    Arrivals, Capacity, CapacityClass, Connectivity, Scenario, Session, sim_room_config_with,
};
use treecast_sim::stats::Summary;

fn run(scenario: Scenario) -> (Summary, treecast_sim::stats::Stats) {
    scenario.validate().unwrap();
    let stats = Engine::new(scenario).unwrap().run();
    (stats.summary(), stats)
}

/// `n` viewers in a 30 s flash crowd who never leave; every peer (the broadcaster too) can
/// feed `k` children, the broadcaster no more than `root`.
fn no_churn(n: u64, k: u32, root: u32, connectivity: Connectivity) -> Scenario {
    Scenario {
        name: "connectivity".into(),
        seed: 3,
        duration_s: 240.0,
        sample_interval_s: 10.0,
        arrivals: Arrivals {
            rate_per_s: 0.0,
            flash_peers: n,
            flash_over_s: 30.0,
            ..Arrivals::default()
        },
        session: Session::Forever,
        capacity: Capacity {
            classes: vec![CapacityClass {
                children: k,
                fraction: 1.0,
            }],
            broadcaster_children: root,
        },
        connectivity,
        crash_fraction: 0.0,
        room: sim_room_config_with(root, k, 64),
        ..Scenario::default()
    }
}

const CHURNY: &str = r#"
name = "churny"
seed = 4
duration_s = 900
warmup_s = 100
crash_fraction = 0.3
[arrivals]
rate_per_s = 1.0
flash_peers = 200
flash_over_s = 30
[session]
model = "lognormal"
mu = 5.0
sigma = 1.0
"#;

#[test]
fn all_cone_shares_change_nothing() {
    let plain = Scenario::from_value(toml::from_str(CHURNY).unwrap(), "plain").unwrap();
    let with = format!(
        "{CHURNY}[connectivity]\npublic = 0.0\nfull_cone = 0\ncone = 2.5\nsymmetric = 0\n\
         blocked = 0\nbroadcaster = \"public\"\n"
    );
    let with = Scenario::from_value(toml::from_str(&with).unwrap(), "with").unwrap();
    let (a, _) = run(plain);
    let (b, _) = run(with);
    assert_eq!(a, b, "an all-cone section is the default");
    assert!(a.arrivals > 500 && a.receiving_fraction > 0.9);
    assert_eq!(a.connectivity.ice_failures, 0);
    assert_eq!(a.connectivity.turn_share, 0.0);
}

#[test]
fn without_turn_symmetric_viewers_need_a_reachable_relay() {
    // Symmetric viewers under a public broadcaster with 4 slots: only those 4 are served,
    // everyone else waits for a route for ever.
    let only_symmetric = Connectivity {
        cone: 0.0,
        symmetric: 1.0,
        ..Connectivity::default()
    };
    let (s, stats) = run(no_churn(40, 4, 4, only_symmetric));
    let last = stats.series.last().unwrap();
    assert_eq!(last.population, 40);
    assert_eq!(last.receiving, 4, "{last:?}");
    assert_eq!(last.no_route, 36, "{last:?}");
    assert!(s.connectivity.no_route_mean > 30.0, "{:?}", s.connectivity);
    assert_eq!(s.connectivity.join_time_ms_by_nat["symmetric"].count, 4);

    // Enough full-cone relays feed them all.
    let some_full_cone = Connectivity {
        cone: 0.0,
        symmetric: 0.6,
        full_cone: 0.4,
        ..Connectivity::default()
    };
    let (s, stats) = run(no_churn(200, 4, 4, some_full_cone));
    let last = stats.series.last().unwrap();
    assert_eq!(last.receiving, 200, "{last:?}");
    assert_eq!(last.no_route, 0, "{last:?}");
    assert_eq!(s.connectivity.turn_share, 0.0);
    assert!(
        s.connectivity.links["direct"] > 0.99,
        "{:?}",
        s.connectivity
    );
}

#[test]
fn with_turn_indirect_links_are_relayed() {
    // Every viewer symmetric, broadcaster public with 4 slots: all links but those 4 go
    // through the relay, and every viewer is served.
    let symmetric_with_turn = Connectivity {
        cone: 0.0,
        symmetric: 1.0,
        turn: true,
        ..Connectivity::default()
    };
    let (s, stats) = run(no_churn(200, 4, 4, symmetric_with_turn.clone()));
    let last = stats.series.last().unwrap();
    assert_eq!(last.receiving, 200, "{last:?}");
    assert_eq!(last.relayed, 196, "{last:?}");
    assert_eq!(s.connectivity.ice_failures, 0);
    // The relay's delay shows in the latency: compare with the same audience all cone.
    let (cone, _) = run(no_churn(200, 4, 4, Connectivity::default()));
    assert!(
        s.latency_ms.p50 > cone.latency_ms.p50 + 20.0,
        "{} vs {}",
        s.latency_ms.p50,
        cone.latency_ms.p50
    );

    // Peers that never report their class are placed blindly: the share of relayed links
    // is then the share of random pairs that cannot connect directly.
    let blind = Connectivity {
        cone: 0.7,
        symmetric: 0.3,
        report_ms: -1.0,
        turn: true,
        ..Connectivity::default()
    };
    let expected = blind.indirect_pair_share();
    assert!((expected - 0.51).abs() < 1e-9);
    let (s, _) = run(no_churn(3_000, 4, 4, blind));
    let share = s.connectivity.turn_share;
    assert!((share - expected).abs() < 0.05, "{share} vs {expected}");

    // When they do report, the room prefers direct parents: cone viewers leave symmetric
    // parents, and only symmetric viewers (who have no direct parent but the broadcaster
    // here) stay on the relay.
    let reported = Connectivity {
        cone: 0.7,
        symmetric: 0.3,
        turn: true,
        ..Connectivity::default()
    };
    let (s, _) = run(no_churn(3_000, 4, 4, reported));
    let symmetric = s.connectivity.arrivals_by_nat["symmetric"] as f64 / 3_000.0;
    let share = s.connectivity.turn_share;
    assert!((share - symmetric).abs() < 0.03, "{share} vs {symmetric}");
}

#[test]
fn ice_failures_delay_the_classes_that_need_them() {
    // No relay, and nobody reports a class: the room places blindly, a symmetric viewer
    // under a symmetric parent waits until ICE gives up (`ice_fail_ms`), sends
    // `link_failed` and is moved. Public viewers never fail.
    let ice_fail_ms = 3_000.0;
    let blind = Connectivity {
        public: 0.8,
        cone: 0.0,
        symmetric: 0.2,
        report_ms: -1.0,
        ice_fail_ms,
        ..Connectivity::default()
    };
    let (s, _) = run(no_churn(1_000, 4, 4, blind.clone()));
    let c = &s.connectivity;
    assert!(c.ice_failures > 20, "{c:?}");
    let (public, symmetric) = (
        &c.join_time_ms_by_nat["public"],
        &c.join_time_ms_by_nat["symmetric"],
    );
    // Each failure costs one `ice_fail_ms` (plus the next link's set-up).
    let failures_per_viewer = c.ice_failures as f64 / c.arrivals_by_nat["symmetric"] as f64;
    let expected = failures_per_viewer * ice_fail_ms;
    let extra = symmetric.mean - public.mean;
    assert!(
        extra > 0.8 * expected && extra < 1.5 * expected,
        "symmetric joins {extra} ms later on average; {failures_per_viewer} failures each"
    );
    assert!(symmetric.p95 > ice_fail_ms, "{symmetric:?}");
    assert!(public.p50 < ice_fail_ms, "{public:?}");

    // Same seed, same run.
    let (again, _) = run(no_churn(1_000, 4, 4, blind));
    assert_eq!(s, again);
}

#[test]
fn blocked_viewers_are_leaves_served_only_by_the_relay() {
    let blocked = |turn| Connectivity {
        cone: 0.8,
        blocked: 0.2,
        turn,
        ..Connectivity::default()
    };
    let (s, stats) = run(no_churn(300, 4, 4, blocked(true)));
    assert_eq!(stats.series.last().unwrap().receiving, 300);
    let relayed = s.connectivity.turn_share;
    let blocked_share = s.connectivity.arrivals_by_nat["blocked"] as f64 / 300.0;
    assert!(
        (relayed - blocked_share).abs() < 0.02,
        "{relayed} vs {blocked_share}"
    );

    let (s, stats) = run(no_churn(300, 4, 4, blocked(false)));
    let last = stats.series.last().unwrap();
    assert_eq!(last.no_route, s.connectivity.arrivals_by_nat["blocked"]);
    assert_eq!(last.receiving + last.no_route, 300);
    assert_eq!(
        s.connectivity.join_time_ms_by_nat[NatClass::Blocked.as_str()].count,
        0
    );
}
