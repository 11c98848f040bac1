//! An operator's settings change scripted mid-run (`[[events]]`), driven through the
//! production room: a lower relay fan-out deepens the tree through `tuning` moves, and
//! raising it again lets rebalancing bring the tree back up.

use std::path::Path;

use treecast_sim::engine::Engine;
use treecast_sim::scenario::{
    Arrivals, Capacity, CapacityClass, Client, Scenario, ScriptedChange, Session,
    sim_room_config_with,
};

#[test]
fn a_scripted_fanout_change_deepens_the_tree_and_raising_it_brings_it_back() {
    let mut room = sim_room_config_with(4, 4, 16);
    room.rebalance_moves_per_second = 20;
    let scenario = Scenario {
        name: "retune".into(),
        seed: 5,
        duration_s: 400.0,
        sample_interval_s: 10.0,
        arrivals: Arrivals {
            rate_per_s: 0.0,
            flash_peers: 400,
            flash_over_s: 30.0,
            ..Arrivals::default()
        },
        session: Session::Forever,
        capacity: Capacity {
            classes: vec![CapacityClass {
                children: 4,
                fraction: 1.0,
            }],
            broadcaster_children: 4,
        },
        crash_fraction: 0.0,
        client: Client {
            make_before_break: true,
            ..Client::default()
        },
        room,
        events: vec![
            ScriptedChange {
                at_s: 100.0,
                relay_fanout: Some(2),
                ..ScriptedChange::default()
            },
            ScriptedChange {
                at_s: 250.0,
                relay_fanout: Some(4),
                ..ScriptedChange::default()
            },
        ],
        ..Scenario::default()
    };
    scenario.validate().unwrap();
    let stats = Engine::new(scenario).unwrap().run();
    let depth_at = |t: f64| {
        stats
            .series
            .iter()
            .rfind(|r| r.t_s <= t)
            .map(|r| (r.max_depth, r.attached))
            .unwrap()
    };
    let (at_4, attached) = depth_at(95.0);
    assert_eq!(attached, 400, "everyone placed before the change");
    let (at_2, attached) = depth_at(245.0);
    assert_eq!(attached, 400, "nobody was made to wait");
    let (back, _) = depth_at(399.0);
    // d_min: 4 + 16 + 64 + 256 holds 400 at fan-out 4 (5 levels); at 2, 4 + 8 + … + 256.
    assert!(at_4 <= 6, "fan-out 4: depth {at_4}");
    assert!(
        at_2 > at_4 && at_2 <= 8,
        "fan-out 2: depth {at_2}, was {at_4}"
    );
    assert!(back < at_2, "fan-out 4 again: depth {back}, was {at_2}");
    let summary = stats.summary();
    assert!(
        summary.repairs.get("tuning").copied().unwrap_or(0) > 0,
        "{:?}",
        summary.repairs
    );
}

#[test]
fn the_bundled_retune_scenario_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/retune.toml");
    let scenario = Scenario::load(&path).unwrap();
    assert_eq!(scenario.events.len(), 2);
    assert_eq!(scenario.events[0].relay_fanout, Some(2));
    scenario.validate().unwrap();
}

#[test]
fn events_outside_the_run_are_refused() {
    let scenario = Scenario {
        events: vec![ScriptedChange {
            at_s: 601.0,
            relay_fanout: Some(2),
            ..ScriptedChange::default()
        }],
        ..Scenario::default()
    };
    assert!(scenario.validate().is_err());
}
