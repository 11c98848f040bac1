//! Warm standby with native peers (an in-process signaller on 127.0.0.1): broadcaster
//! (fan-out 1) → relay → two children → two grandchildren, every media link delayed by
//! [`LINK`] one way as in `linger.rs`. The room names a stand-in for the relay (one of its
//! children) and has it prepare idle links to the relay's parent and to the relay's other
//! children. Once those are up the relay is killed (no `leave`, its socket just goes), and
//! each remaining viewer's interruption is measured: the longest gap between packets and
//! the packets it never received. The same tree with `warm_standby` off is measured for
//! comparison.
//!
//! Asserted: every viewer recovers; with warm standby the repair takes over exactly the
//! prepared links, each already connected when used, and no other viewer's link changes;
//! without it no standby link exists. Gaps and the repair's timeline are printed, never
//! compared: speed depends on the machine.
//!
//! A second test measures what idle standby links cost: the process's CPU time over a
//! window with a stand-in holding five of them, against the same tree without (window 5 s,
//! or `TREECAST_STANDBY_COST_SECS`); it asserts the idle links stay connected throughout.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{LIVENESS, Mark, TestSignaller, count};
use treecast_core::PeerId;
use treecast_peer::media::now_us;
use treecast_peer::{Peer, PeerConfig};

const STREAM_KBPS: u32 = 300;

/// One-way delay of every media link.
const LINK: Duration = Duration::from_millis(40);

/// Steady streaming measured after the repair, so late packets are counted.
const AFTER: Duration = Duration::from_secs(2);

/// Longest interruption any viewer may see and still count as recovered: far above what a
/// cold repair takes (about a second here), so only a repair that never comes fails.
const RECOVERY_BOUND: Duration = Duration::from_secs(20);

/// The measurements share two cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn wait_until(what: &str, done: impl FnMut() -> bool) {
    common::wait_until(what, LIVENESS, done).await
}

fn id(p: &Peer) -> u64 {
    p.status().peer_id.expect("welcomed").0
}

/// The standby links `p` holds: other end → connected.
fn standby_links(p: &Peer) -> BTreeMap<u64, bool> {
    p.stats().standby.lock().unwrap().clone()
}

/// How each peer used its standby links: (warm, still connecting, opened cold).
fn standby_uses(p: &Peer) -> (u64, u64, u64) {
    let s = p.stats();
    (
        count(&s.standby_warm),
        count(&s.standby_connecting),
        count(&s.standby_cold),
    )
}

/// Milliseconds from `from` to `at` (µs since the epoch), if `at` came after `from`.
fn ms_after(from: u64, at: u64) -> Option<f64> {
    (at >= from).then(|| (at - from) as f64 / 1000.0)
}

/// What one remaining viewer saw across the relay's death.
#[derive(Debug)]
struct Seen {
    peer: u64,
    what: &'static str,
    missing: i64,
    span: u64,
    longest_gap_ms: f64,
    /// Since the kill: stall reported, new parent named, its link up (for a warm link:
    /// when it was used), first packet from it.
    stalled_ms: Option<f64>,
    assigned_ms: Option<f64>,
    connected_ms: Option<f64>,
    first_packet_ms: Option<f64>,
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = |x: Option<f64>| x.map_or("-".to_owned(), |ms| format!("{ms:.0}"));
        write!(
            f,
            "viewer {} ({}): missed {} of {} packets, longest gap {:.1} ms; after the kill \
             (ms): stalled {}, new parent {}, link up {}, first packet {}",
            self.peer,
            self.what,
            self.missing,
            self.span,
            self.longest_gap_ms,
            t(self.stalled_ms),
            t(self.assigned_ms),
            t(self.connected_ms),
            t(self.first_packet_ms),
        )
    }
}

/// One kill of the relay.
struct Outcome {
    seen: Vec<Seen>,
    /// Standby links taken over, counted at both ends: (warm, connecting, cold).
    uses: (u64, u64, u64),
    /// Links the room had prepared for the relay's stand-in (each has two ends).
    prepared: u64,
}

fn configure(c: &mut PeerConfig) {
    c.link_delay = LINK;
    c.stream_kbps = STREAM_KBPS;
}

/// Waits until the relay's stand-in holds its standby links, all connected, and returns
/// it with the number of links: the broadcaster holds one (to the stand-in), the stand-in
/// one to the broadcaster and one to each other child of the relay.
async fn standby_ready(broadcaster: &Peer, viewers: &[Peer], children: &[u64]) -> (u64, u64) {
    let all_up = |p: &Peer| {
        let links = standby_links(p);
        links.values().all(|&up| up).then_some(links)
    };
    let mut found = None;
    wait_until("the stand-in's standby links are up", || {
        found = None;
        let Some(up) = all_up(broadcaster) else {
            return false;
        };
        let Some((&stand_in, _)) = up.iter().next().filter(|_| up.len() == 1) else {
            return false;
        };
        let Some(s) = viewers.iter().find(|v| id(v) == stand_in) else {
            return false;
        };
        let Some(held) = all_up(s) else {
            return false;
        };
        let others: Vec<u64> = children
            .iter()
            .copied()
            .filter(|&c| c != stand_in)
            .collect();
        let want = others.len() + 1;
        let complete = held.contains_key(&id(broadcaster))
            && others.iter().all(|c| held.contains_key(c))
            && held.len() >= want
            && viewers
                .iter()
                .filter(|v| others.contains(&id(v)))
                .all(|v| all_up(v).is_some_and(|l| l.contains_key(&stand_in)));
        if complete {
            found = Some((stand_in, want as u64));
        }
        complete
    })
    .await;
    found.expect("found when the wait ended")
}

/// Builds the tree, waits for the stand-in's links when `warm`, kills the relay and
/// reports what each remaining viewer saw.
async fn kill_relay(warm: bool) -> Outcome {
    let signaller = TestSignaller::start_with(1, 2, |c| c.room.warm_standby = warm).await;
    let (broadcaster, mut viewers) = common::start_tree(&signaller, 5, configure).await;
    let relay = viewers.remove(0);
    assert_eq!(relay.status().depth, Some(1), "fan-out 1 at the root");
    let relay_id = id(&relay);
    let children: Vec<u64> = viewers
        .iter()
        .filter(|v| v.status().parent.is_some_and(|p| p.0 == relay_id))
        .map(id)
        .collect();
    assert_eq!(children.len(), 2, "the relay feeds two children");
    let (stand_in, prepared) = if warm {
        let (s, links) = standby_ready(&broadcaster, &viewers, &children).await;
        (Some(s), links)
    } else {
        (None, 0)
    };
    // Steady state first: the joins' own interruptions are not measured.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let everyone = || std::iter::once(&broadcaster).chain(viewers.iter());
    if !warm {
        for p in everyone() {
            assert!(standby_links(p).is_empty(), "warm standby is off");
        }
    }
    for v in &viewers {
        v.stats()
            .longest_gap_us
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
    let parents_before: Vec<Option<u64>> = viewers
        .iter()
        .map(|v| v.status().parent.map(|p| p.0))
        .collect();
    let changes_before: Vec<u64> = viewers
        .iter()
        .map(|v| count(&v.stats().parent_changes))
        .collect();
    let uses_before: Vec<(u64, u64, u64)> = everyone().map(standby_uses).collect();
    let before: Vec<Mark> = viewers.iter().map(Mark::of).collect();

    let killed_us = now_us();
    relay.kill().await;
    common::await_repair(&viewers, PeerId(relay_id), AFTER).await;

    let uses = everyone()
        .map(standby_uses)
        .zip(uses_before)
        .fold((0, 0, 0), |acc, (now, then)| {
            (
                acc.0 + now.0 - then.0,
                acc.1 + now.1 - then.1,
                acc.2 + now.2 - then.2,
            )
        });
    let mut seen = Vec::new();
    for (i, v) in viewers.iter().enumerate() {
        let s = v.stats();
        let peer = id(v);
        let moved = count(&s.parent_changes) > changes_before[i];
        let since = |at: &std::sync::atomic::AtomicU64| {
            moved.then(|| ms_after(killed_us, count(at))).flatten()
        };
        let what = if Some(peer) == stand_in {
            "child, stand-in"
        } else if children.contains(&peer) {
            "child"
        } else {
            "grandchild"
        };
        if warm && !children.contains(&peer) {
            // Nobody outside the relay's children was touched by the repair.
            assert!(
                !moved && v.status().parent.map(|p| p.0) == parents_before[i],
                "viewer {peer} ({what}) got another parent across a warm repair"
            );
        }
        seen.push(Seen {
            peer,
            what,
            missing: before[i].missing_until(Mark::of(v)),
            span: count(&s.next_seq) - before[i].next_seq,
            longest_gap_ms: count(&s.longest_gap_us) as f64 / 1000.0,
            stalled_ms: ms_after(killed_us, count(&s.stalled_us)),
            assigned_ms: since(&s.parent_assigned_us),
            connected_ms: since(&s.parent_connected_us),
            first_packet_ms: since(&s.parent_first_packet_us),
        });
    }
    for s in &seen {
        assert!(
            s.longest_gap_ms < RECOVERY_BOUND.as_secs_f64() * 1000.0,
            "{s} did not recover"
        );
    }
    for v in viewers {
        v.kill().await;
    }
    broadcaster.leave().await;
    signaller.stop().await;
    Outcome {
        seen,
        uses,
        prepared,
    }
}

/// Nearest-rank quantile of `xs`.
fn quantile(mut xs: Vec<f64>, q: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    let rank = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
    xs[rank - 1]
}

fn summary(o: &Outcome) -> String {
    let gaps: Vec<f64> = o.seen.iter().map(|s| s.longest_gap_ms).collect();
    let missed: i64 = o.seen.iter().map(|s| s.missing).sum();
    format!(
        "gap p95 {:.0} ms, max {:.0} ms over {} viewers; {} packets missed in all; \
         standby links used warm {}, connecting {}, cold {}",
        quantile(gaps.clone(), 0.95),
        quantile(gaps, 1.0),
        o.seen.len(),
        missed,
        o.uses.0,
        o.uses.1,
        o.uses.2
    )
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relays_stand_in_takes_over_on_its_prepared_links() {
    let _serial = SERIAL.lock().await;
    for warm in [true, false] {
        let o = kill_relay(warm).await;
        eprintln!(
            "warm standby {} (load average {}):",
            if warm { "on" } else { "off" },
            load_average()
        );
        for s in &o.seen {
            eprintln!("  {s}");
        }
        eprintln!("  {}", summary(&o));
        if warm {
            // Both ends of every prepared link took it over, each already connected.
            assert_eq!(
                o.uses,
                (2 * o.prepared, 0, 0),
                "standby links used (warm, connecting, cold) of {} prepared",
                o.prepared
            );
        } else {
            assert_eq!(o.uses, (0, 0, 0), "no standby links without warm standby");
        }
    }
}

/// The process's CPU time so far (user and system, all threads).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("Linux /proc");
    // Fields after the command name (which may hold spaces): utime and stime are the
    // 12th and 13th, in clock ticks of 1/100 s (USER_HZ on Linux).
    let rest = &stat[stat.rfind(')').expect("a command name") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Builds broadcaster → relay → five children (one of them the relay's stand-in, holding
/// five idle links when `warm`), and measures the process's CPU time over `window`.
/// Returns it with the idle connections held (both ends) and the stand-in's share.
async fn idle_cost(warm: bool, window: Duration) -> (Duration, usize, usize) {
    let signaller = TestSignaller::start_with(1, 5, |c| c.room.warm_standby = warm).await;
    let (broadcaster, mut viewers) = common::start_tree(&signaller, 6, |c| {
        configure(c);
        // Room for five children (the default uplink allows three).
        c.uplink_kbps = Some(10_000);
    })
    .await;
    let relay = viewers.remove(0);
    assert_eq!(relay.status().depth, Some(1), "fan-out 1 at the root");
    let relay_id = id(&relay);
    let children: Vec<u64> = viewers.iter().map(id).collect();
    assert!(
        viewers
            .iter()
            .all(|v| v.status().parent.is_some_and(|p| p.0 == relay_id)),
        "the relay feeds all five"
    );
    let held = |p: &Peer| standby_links(p).len();
    let mut stand_in_links = 0;
    if warm {
        let (_, links) = standby_ready(&broadcaster, &viewers, &children).await;
        stand_in_links = links as usize;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let everyone = || {
        std::iter::once(&broadcaster)
            .chain(std::iter::once(&relay))
            .chain(viewers.iter())
    };
    let idle_before: usize = everyone().map(held).sum();
    let cpu = cpu_time();
    tokio::time::sleep(window).await;
    let cpu = cpu_time() - cpu;
    // Idle links live on ICE consent checks alone: none went down during the window.
    for p in everyone() {
        let links = standby_links(p);
        assert!(
            links.values().all(|&up| up),
            "peer {} lost an idle standby link: {links:?}",
            id(p)
        );
    }
    let idle: usize = everyone().map(held).sum();
    assert_eq!(idle, idle_before, "standby links came or went while idle");
    if !warm {
        assert_eq!(idle, 0, "warm standby is off");
    }
    for v in viewers {
        v.kill().await;
    }
    relay.kill().await;
    broadcaster.leave().await;
    signaller.stop().await;
    (cpu, idle, stand_in_links)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_standby_links_stay_up_and_their_cost_is_measured() {
    let _serial = SERIAL.lock().await;
    let window = Duration::from_secs(
        std::env::var("TREECAST_STANDBY_COST_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
    );
    for warm in [false, true] {
        let (cpu, idle, stand_in) = idle_cost(warm, window).await;
        eprintln!(
            "warm standby {}: process CPU {:.2} s over {:?} (load average {}); idle standby \
             connections held {idle} (both ends), by the stand-in {stand_in}",
            if warm { "on" } else { "off" },
            cpu.as_secs_f64(),
            window,
            load_average()
        );
        if warm {
            assert_eq!(idle, 2 * stand_in, "both ends of each standby link hold it");
            assert_eq!(
                stand_in, 5,
                "the stand-in links to the broadcaster and four others"
            );
        }
    }
}
