//! Latency grows by one link delay per hop: a chain (root and relay fan-out 1) of native
//! peers whose media sockets each add a 20 ms one-way delay to everything they send
//! (`PeerConfig::link_delay`, see `treecast_peer::netem`). Every hop of the tree is then a
//! 20 ms link, and the median delay behind the broadcaster must step up by about that much
//! per depth.
//!
//! The kernel's netem qdisc would be the usual tool, but the CI kernel has none, so the
//! delay sits in the peer's UDP socket layer: ICE, DTLS-SRTP and RTP cross it unchanged.
//! Only the lower bound of each step is physical and asserted tightly; the upper bound is
//! generous so a loaded machine never fails the test.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{LIVENESS, TestSignaller, wait_until};
use treecast_peer::{Peer, Role};

const LINK: Duration = Duration::from_millis(20);
const VIEWERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hop_adds_one_link_delay() {
    let signaller = TestSignaller::start(1, 1).await;
    let peer_config = |role| {
        let mut c = signaller.peer_config(role);
        c.link_delay = LINK;
        // A low rate keeps the delay lines short; latency does not depend on it.
        c.stream_kbps = 150;
        c
    };

    let bc = peer_config(Role::Broadcaster);
    let broadcaster = Peer::start(bc).unwrap();
    wait_until("the broadcaster is welcomed", LIVENESS, || {
        broadcaster.status().peer_id.is_some()
    })
    .await;

    let mut viewers = Vec::new();
    for _ in 0..VIEWERS {
        viewers.push(Peer::start(peer_config(Role::Viewer)).unwrap());
    }
    wait_until("every viewer receives", LIVENESS, || {
        viewers
            .iter()
            .all(|v| v.stats().packets_received.load(Ordering::Relaxed) > 0)
    })
    .await;
    let mut depths: Vec<u32> = viewers
        .iter()
        .map(|v| v.status().depth.expect("attached"))
        .collect();
    depths.sort_unstable();
    assert_eq!(depths, (1..=VIEWERS as u32).collect::<Vec<_>>(), "a chain");

    // Two seconds of packets (50 frames/s of samples per peer) outweigh the set-up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut by_depth: Vec<(u32, u32, u32)> = viewers
        .iter()
        .map(|v| {
            let s = v.stats();
            (
                v.status().depth.unwrap(),
                s.latency_quantile(0.5).expect("latency samples"),
                s.latency_quantile(0.99).expect("latency samples"),
            )
        })
        .collect();
    by_depth.sort_unstable();
    for (depth, p50, p99) in &by_depth {
        eprintln!("depth {depth}: latency p50 {p50} µs, p99 {p99} µs");
    }

    let link_us = LINK.as_micros() as u32;
    // Depth 1 is one link from the broadcaster.
    assert!(
        by_depth[0].1 >= link_us * 9 / 10,
        "depth 1 is one link away: {by_depth:?}"
    );
    for pair in by_depth.windows(2) {
        let step = pair[1].1.saturating_sub(pair[0].1);
        eprintln!("depth {} -> {}: +{step} µs", pair[0].0, pair[1].0);
        // Each hop is one more link: never less than (most of) its delay, and nowhere
        // near two link delays plus processing on a healthy machine (bound generous).
        assert!(
            step >= link_us * 8 / 10,
            "hop {} -> {} added only {step} µs: {by_depth:?}",
            pair[0].0,
            pair[1].0
        );
        assert!(
            step <= link_us + 250_000,
            "hop {} -> {} added {step} µs: {by_depth:?}",
            pair[0].0,
            pair[1].0
        );
    }

    for v in viewers {
        v.leave().await;
    }
    broadcaster.leave().await;
    signaller.stop().await;
}
