//! Restarting the signaller under a live room costs no viewer a frame (native peers, an
//! in-process signaller on 127.0.0.1 with a configured resume key).
//!
//! A broadcaster and [`VIEWERS`] viewers stream; the server is shut down and started again
//! on the same address with nothing in memory. Media between peers never went through it,
//! so it keeps flowing; each peer reconnects and presents its signed claim, and the new
//! server rebuilds the room from them. Asserted: the rebuilt tree is the one before the
//! restart, and no viewer misses more packets across it than jitter explains (every packet
//! carries the broadcaster's sequence number, so a gap shows as numbers never received).
//! How long the address was down, the rebuild and the largest miss are printed.
//! Timeouts guard liveness only.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{LIVENESS, Mark, TestSignaller, count, parents, start_tree, wait_until};
use treecast_core::agent::Phase;
use treecast_core::turn::Secret;

const VIEWERS: usize = 50;
const STREAM_KBPS: u32 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_signaller_takes_its_room_back_and_no_media_stops() {
    let mut signaller = TestSignaller::start_with(4, 3, |c| {
        c.resume_key = Some(Secret::new(
            "a resume key that stays the same across starts",
        ));
        c.room.stream_kbps = STREAM_KBPS;
    })
    .await;
    let (broadcaster, viewers) = start_tree(&signaller, VIEWERS, |_| {}).await;

    // The tree as it settled: the same shape for two seconds running.
    let mut before = parents(&signaller.snapshot().await);
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + LIVENESS;
    while stable_since.elapsed() < Duration::from_secs(2) {
        assert!(Instant::now() < deadline, "the tree never settled");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = parents(&signaller.snapshot().await);
        if now != before {
            before = now;
            stable_since = Instant::now();
        }
    }
    assert_eq!(before.len(), VIEWERS + 1);

    let marks: Vec<Mark> = viewers.iter().map(Mark::of).collect();
    let restarted = Instant::now();
    let down = signaller.restart().await;
    // Every peer back in, and the room rebuilt.
    let mut after = BTreeMap::new();
    let deadline = Instant::now() + LIVENESS;
    while after.len() != VIEWERS + 1 {
        assert!(
            Instant::now() < deadline,
            "the room never came back: {after:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (status, snap) = common::http(
            signaller.addr,
            "GET",
            &format!("/api/rooms/{}", signaller.room),
        )
        .await;
        if status == 200 {
            after = parents(&snap);
        }
    }
    let rebuilt = restarted.elapsed();
    assert_eq!(
        after, before,
        "the rebuilt tree is the one before the restart"
    );
    wait_until("every peer is joined again", LIVENESS, || {
        std::iter::once(&broadcaster)
            .chain(&viewers)
            .all(|p| p.status().phase == Phase::Joined)
    })
    .await;
    // Long enough for any gap to show and late packets to arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_tree = parents(&signaller.snapshot().await);
    assert_eq!(after_tree, before, "nobody was moved after the rebuild");

    let mut worst = (0, 0);
    for (v, mark) in viewers.iter().zip(marks) {
        let later = Mark::of(v);
        let missing = mark.missing_until(later);
        let span = later.next_seq - mark.next_seq;
        worst = worst.max((missing, span));
        // Reordering at most, not a break: a stopped stream misses dozens per second.
        assert!(
            missing <= 6,
            "viewer {:?} missed {missing} of {span} packets across the restart",
            v.status().peer_id
        );
        assert!(count(&v.stats().packets_received) > 0);
    }
    eprintln!(
        "restart: address down {down:?}, room rebuilt {rebuilt:?} after the shutdown began; \
         worst viewer missed {} of {} packets",
        worst.0, worst.1
    );
    for v in viewers {
        v.kill().await;
    }
    broadcaster.kill().await;
    signaller.stop().await;
}
