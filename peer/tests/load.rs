//! The load mode's library function against an in-process signaller on 127.0.0.1, small:
//! 12 viewers under fan-out 2 (depths 1 to 3), one relay death. Every viewer receives, the
//! dead relay's subtree receives again, and the report adds up.
//!
//! Bounds are liveness bounds only; no figure in the report is asserted against a speed.

mod common;

use std::time::Duration;

use common::TestSignaller;

use treecast_peer::load::{self, LoadConfig};

const VIEWERS: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_mode_measures_a_small_tree_and_a_relay_death() {
    let signaller = TestSignaller::start(2, 2).await;

    let mut c = LoadConfig::new(&signaller.url);
    c.peers = VIEWERS;
    c.join_every = Duration::from_millis(50);
    c.stream_kbps = 150;
    c.join_bound = Duration::from_secs(60);
    c.measure = Duration::from_secs(2);
    c.kills = 1;
    c.recovery_bound = Duration::from_secs(30);
    c.kill_gap = Duration::ZERO;
    let report = load::run(c).await.expect("the load run starts");
    eprintln!("{}", report.table());

    // Everybody received; the tree has the shape fan-out 2 gives 12 viewers.
    assert_eq!(report.receiving, VIEWERS);
    assert_eq!(report.join_to_first_packet_ms.count, VIEWERS as u64);
    assert_eq!(report.depths.iter().skip(1).sum::<usize>(), VIEWERS);
    assert_eq!(report.depths[0], 1, "one broadcaster");
    assert!(
        report.depths.len() >= 4,
        "depths 1 to 3: {:?}",
        report.depths
    );
    let per_depth: usize = report.latency_by_depth.iter().map(|d| d.peers).sum();
    assert_eq!(per_depth, VIEWERS);
    for d in &report.latency_by_depth {
        assert!(d.latency_ms.count > 0, "depth {} measured nothing", d.depth);
        assert!(d.latency_ms.is_ordered(), "{d:?}");
    }
    assert!(report.join_to_first_packet_ms.is_ordered());
    assert!(report.hop_in_relay_us.count > 0 && report.hop_in_relay_us.is_ordered());

    // The relay death was noticed and repaired for its whole subtree.
    assert_eq!(report.deaths.len(), 1);
    let death = &report.deaths[0];
    assert!(death.children > 0 && death.descendants >= death.children);
    assert_eq!(death.recovered, death.descendants, "{death:?}");
    assert_eq!(report.affected, death.descendants);
    assert_eq!(report.never_recovered, 0);
    assert_eq!(report.interruption_ms.count, death.descendants as u64);
    assert!(report.interruption_ms.is_ordered());
    assert!(report.interruption_ms.p50 > 0.0);
    let b = &report.breakdown;
    assert_eq!(b.children + b.untimed, death.children);

    // Cost figures exist and are consistent.
    assert!(report.cost.packets_forwarded > 0);
    assert!(report.cost.forwarded_stream_s > 0.0);
    if cfg!(target_os = "linux") {
        // Read from /proc.
        assert!(report.cost.peak_rss_mb >= report.cost.rss_mb && report.cost.rss_mb > 0.0);
    }
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["peers"], VIEWERS);

    signaller.stop().await;
}
