//! Load mode: many native peers in one process against a running signaller, and a report of
//! what they measured.
//!
//! [`run`] creates a room over the HTTP API (or uses a given one), starts a broadcaster with
//! the synthetic stream, joins N viewers one after another, then:
//! 1. **join**: waits until every viewer has received a packet (join to first packet is
//!    measured from [`Peer::start`], so it includes the WebSocket, `hello`, placement, ICE,
//!    DTLS and the first RTP);
//! 2. **steady window**: clears every peer's samples, lets the stream run, then reads the
//!    delay behind the broadcaster per depth (from the send time in every payload; all peers
//!    share this process's clock), the time relays hold a packet, and CPU and memory;
//! 3. **relay deaths**: K times, kills a random relay abruptly (no `leave`, no WebSocket
//!    close frame) and times, for each of its descendants, how long until a packet the
//!    broadcaster sent after the death arrives; for its direct children it also splits that
//!    time into stall detection, the signaller's reaction, connection set-up and first packet.
//!
//! Nothing here asserts: the report says what happened, bounds only stop waiting.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use serde::Serialize;
use treecast_core::PeerId;
use treecast_signaller::client::{self, ClientError};

use crate::media::{Stats, now_us};
use crate::{Peer, PeerConfig, PeerError, Role};

/// Settings of one load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The signaller's WebSocket URL, e.g. `ws://127.0.0.1:8080/ws`; the HTTP API is on the
    /// same host and port.
    pub url: String,
    /// Use this room instead of creating one.
    pub room: Option<String>,
    /// Broadcaster token of `room`; without it no broadcaster is started (one must already
    /// be sending in that room, on this machine, for the latency figures to mean anything).
    pub token: Option<String>,
    /// Viewers to start.
    pub peers: usize,
    /// Delay between two joins.
    pub join_every: Duration,
    /// Broadcaster's stream bitrate (payload), kbit/s.
    pub stream_kbps: u32,
    /// Broadcaster's frames per second.
    pub fps: u32,
    /// Uplink the viewers announce (sets their capacity with the signaller's fan-out limit).
    pub uplink_kbps: Option<u32>,
    /// Longest wait for every viewer's first packet.
    pub join_bound: Duration,
    /// Length of the steady measurement window.
    pub measure: Duration,
    /// Relays to kill, one after another.
    pub kills: usize,
    /// Longest wait for a dead relay's descendants to receive again.
    pub recovery_bound: Duration,
    /// Pause after each recovery before the next death, so repairs do not overlap (the
    /// room holds stall reports for its settle window, 3 s by default).
    pub kill_gap: Duration,
    /// Seed of the victim choice.
    pub seed: u64,
    /// Use the signaller's STUN/TURN servers (off on loopback).
    pub use_ice_servers: bool,
    /// Overrides the viewers' stall window at depth 1.
    pub stall_after: Option<Duration>,
    /// Overrides the viewers' extra stall window per level.
    pub stall_step_per_depth: Option<Duration>,
}

impl LoadConfig {
    /// Defaults: 50 viewers, one join per 20 ms, 150 kbit/s at 25 fps, a 10 s window, 3
    /// relay deaths.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            room: None,
            token: None,
            peers: 50,
            join_every: Duration::from_millis(20),
            stream_kbps: 150,
            fps: 25,
            uplink_kbps: None,
            join_bound: Duration::from_secs(120),
            measure: Duration::from_secs(10),
            kills: 3,
            recovery_bound: Duration::from_secs(15),
            kill_gap: Duration::from_secs(4),
            seed: 1,
            use_ice_servers: false,
            stall_after: None,
            stall_step_per_depth: None,
        }
    }
}

/// Why a load run could not run (what it measured is never an error).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The URL is not `ws://host:port/...`.
    #[error(transparent)]
    Url(#[from] ClientError),
    /// The HTTP API could not be reached or answered badly.
    #[error("creating a room: {0}")]
    CreateRoom(String),
    /// A peer could not start.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// The broadcaster was not welcomed in time.
    #[error("the broadcaster was not welcomed within {0:?}")]
    Broadcaster(Duration),
}

/// Percentiles of a set of samples (unit in the field name of the owner).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
}

impl Summary {
    fn of(h: &Histogram<u64>, scale: f64) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.50) as f64 / scale,
            p95: h.value_at_quantile(0.95) as f64 / scale,
            p99: h.value_at_quantile(0.99) as f64 / scale,
            max: h.max() as f64 / scale,
        }
    }

    /// p50 <= p95 <= p99 <= max.
    pub fn is_ordered(&self) -> bool {
        self.p50 <= self.p95 && self.p95 <= self.p99 && self.p99 <= self.max
    }
}

/// Delay behind the broadcaster at one depth, over the steady window.
#[derive(Debug, Clone, Serialize)]
pub struct DepthLatency {
    /// Depth (1 = the broadcaster's children).
    pub depth: u32,
    /// Viewers at that depth.
    pub peers: usize,
    /// Delay behind the broadcaster, ms.
    pub latency_ms: Summary,
}

/// One relay death.
#[derive(Debug, Clone, Serialize)]
pub struct Death {
    /// The killed relay's peer id.
    pub victim: u64,
    /// Its depth.
    pub depth: u32,
    /// Its children.
    pub children: usize,
    /// All peers below it.
    pub descendants: usize,
    /// Descendants that received again within the bound.
    pub recovered: usize,
    /// Time from the death until each recovered descendant received a packet sent after
    /// it, ms.
    pub interruption_ms: Summary,
    /// Stall reports, all viewers, from the death to the end of the pause after it.
    pub stalls: u64,
    /// Parent changes, all viewers, in the same time.
    pub moves: u64,
    /// Deepest viewer at the end of the pause after it.
    pub max_depth_after: u32,
}

/// Where a dead relay's direct children spent their interruption (medians and maxima over
/// all deaths, ms). Each step starts where the previous one ended.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Breakdown {
    /// Children with every step timed.
    pub children: usize,
    /// Death → the child's watchdog reports `stalled`.
    pub detect_ms: Summary,
    /// `stalled` → the child is told its new parent (the signaller's reaction, including
    /// the WebSocket both ways).
    pub reassign_ms: Summary,
    /// New parent → the new connection is connected (ICE and DTLS).
    pub connect_ms: Summary,
    /// Connected → a packet sent after the death arrives (the new parent's own path
    /// included: a stand-in leaf reconnects at the same time).
    pub flow_ms: Summary,
    /// Children whose parent did not change (a sibling stood in, or the child was moved
    /// before it reported), or whose steps were out of order; their total is in
    /// `interruption_ms` only.
    pub untimed: usize,
}

/// CPU and memory of the whole process over the steady window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cost {
    /// Window length, s.
    pub window_s: f64,
    /// User + system CPU of the process in the window, s.
    pub cpu_s: f64,
    /// Streams the process sent: one per tree edge (broadcaster's and relays' legs), s.
    pub forwarded_stream_s: f64,
    /// CPU per stream: `cpu_s / forwarded_stream_s`, as % of one core.
    pub cpu_per_stream_pct: f64,
    /// Packets handed to children in the window.
    pub packets_forwarded: u64,
    /// CPU per forwarded packet, µs (receiving and every peer's bookkeeping included).
    pub cpu_us_per_packet: f64,
    /// Resident memory at the end of the window, MB.
    pub rss_mb: f64,
    /// Peak resident memory, MB.
    pub peak_rss_mb: f64,
}

/// What a load run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    /// Room used.
    pub room: String,
    /// Viewers started.
    pub peers: usize,
    /// Viewers that received at least one packet within the join bound.
    pub receiving: usize,
    /// Viewers per depth at the end of the join phase (index = depth; 0 is the broadcaster).
    pub depths: Vec<usize>,
    /// Peer start → first RTP packet, ms.
    pub join_to_first_packet_ms: Summary,
    /// Delay behind the broadcaster per depth.
    pub latency_by_depth: Vec<DepthLatency>,
    /// Time a relay holds a packet, RTP read to `write_rtp` accepted per child, µs.
    pub hop_in_relay_us: Summary,
    /// Added delay per hop from per-depth differences: (p50, p99) of depth d+1 minus depth
    /// d, µs, for each d with viewers at both.
    pub hop_from_depths_us: Vec<(u32, f64, f64)>,
    /// Every relay death.
    pub deaths: Vec<Death>,
    /// Interruption over all deaths' descendants, ms.
    pub interruption_ms: Summary,
    /// Descendants of dead relays, all deaths.
    pub affected: usize,
    /// Descendants that did not receive again within the bound.
    pub never_recovered: usize,
    /// Where the direct children's interruption went.
    pub breakdown: Breakdown,
    /// CPU and memory.
    pub cost: Cost,
    /// Stall reports during the steady window (no relay had died: each one is a false alarm).
    pub stalls_in_window: u64,
    /// Parent changes during the steady window (moves nobody asked for).
    pub moves_in_window: u64,
    /// Stall reports during the relay deaths, all viewers (the dead relays' children
    /// should account for them).
    pub stalls_in_deaths: u64,
    /// Packets dropped on full child queues, all peers.
    pub dropped_queue_full: u64,
    /// `write_rtp` errors, all peers.
    pub write_errors: u64,
    /// Keyframe requests received by the broadcaster, and keyframes it sent.
    pub keyframes: (u64, u64),
}

fn histogram() -> Histogram<u64> {
    // 1 µs to an hour at 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

fn record(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.max(1));
}

/// Runs the load: see the module docs.
pub async fn run(config: LoadConfig) -> Result<LoadReport, LoadError> {
    let host = client::authority_of(&config.url)?;
    let (room, token) = match (&config.room, &config.token) {
        (Some(room), token) => (room.clone(), token.clone()),
        (None, _) => {
            let (room, token) = create_room(&host).await?;
            (room, Some(token))
        }
    };
    let viewer_config = |c: &LoadConfig| {
        let mut v = PeerConfig::new(&c.url, &room, Role::Viewer);
        v.use_ice_servers = c.use_ice_servers;
        v.uplink_kbps = c.uplink_kbps;
        if let Some(s) = c.stall_after {
            v.stall_after = s;
        }
        if let Some(s) = c.stall_step_per_depth {
            v.stall_step_per_depth = s;
        }
        v
    };

    let broadcaster = match token {
        Some(token) => {
            let mut b = PeerConfig::new(&config.url, &room, Role::Broadcaster);
            b.token = Some(token);
            b.stream_kbps = config.stream_kbps;
            b.fps = config.fps;
            b.use_ice_servers = config.use_ice_servers;
            let b = Peer::start(b)?;
            let bound = Duration::from_secs(10);
            let deadline = Instant::now() + bound;
            while b.status().peer_id.is_none() {
                if Instant::now() > deadline {
                    b.leave().await;
                    return Err(LoadError::Broadcaster(bound));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Some(b)
        }
        None => None,
    };

    // 1. Join.
    let mut viewers: Vec<Peer> = Vec::with_capacity(config.peers);
    let mut every = tokio::time::interval(config.join_every.max(Duration::from_millis(1)));
    for _ in 0..config.peers {
        every.tick().await;
        viewers.push(Peer::start(viewer_config(&config))?);
    }
    let deadline = Instant::now() + config.join_bound;
    while Instant::now() < deadline && viewers.iter().any(|v| first_packet(v.stats()) == 0) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut report = LoadReport {
        room: room.clone(),
        peers: config.peers,
        ..Default::default()
    };
    let mut joins = histogram();
    for v in &viewers {
        let s = v.stats();
        let first = first_packet(s);
        if first != 0 {
            report.receiving += 1;
            record(
                &mut joins,
                first.saturating_sub(s.started_us.load(Ordering::Relaxed)),
            );
        }
    }
    report.join_to_first_packet_ms = Summary::of(&joins, 1000.0);
    // Let the tree settle (keyframe requests of the last joins, late reports).
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 2. Steady window.
    for p in viewers.iter().chain(broadcaster.iter()) {
        p.stats().latency.clear();
        p.stats().hop.clear();
    }
    let forwarded_before = total(&viewers, &broadcaster, |s| &s.packets_forwarded);
    let edges_before = edges(&viewers, &broadcaster);
    let stalls_before = total(&viewers, &broadcaster, |s| &s.stalls);
    let moves_before = total(&viewers, &broadcaster, |s| &s.parent_changes);
    let cpu_before = process_cpu_s();
    let t0 = Instant::now();
    tokio::time::sleep(config.measure).await;
    let window = t0.elapsed().as_secs_f64();
    let cpu = process_cpu_s().zip(cpu_before).map(|(a, b)| a - b);
    let forwarded = total(&viewers, &broadcaster, |s| &s.packets_forwarded) - forwarded_before;
    let edges_after = edges(&viewers, &broadcaster);
    report.stalls_in_window = total(&viewers, &broadcaster, |s| &s.stalls) - stalls_before;
    report.moves_in_window = total(&viewers, &broadcaster, |s| &s.parent_changes) - moves_before;
    let mut by_depth: BTreeMap<u32, (usize, Histogram<u64>)> = BTreeMap::new();
    let mut hop = histogram();
    for v in &viewers {
        let depth = v.status().depth;
        if let Some(d) = depth {
            while report.depths.len() <= d as usize {
                report.depths.push(0);
            }
            report.depths[d as usize] += 1;
            let entry = by_depth.entry(d).or_insert_with(|| (0, histogram()));
            entry.0 += 1;
            for us in v.stats().latency.snapshot() {
                record(&mut entry.1, us as u64);
            }
        }
        for us in v.stats().hop.snapshot() {
            record(&mut hop, us as u64);
        }
    }
    if let Some(first) = report.depths.first_mut() {
        *first = usize::from(broadcaster.is_some());
    }
    report.hop_in_relay_us = Summary::of(&hop, 1.0);
    report.latency_by_depth = by_depth
        .iter()
        .map(|(&depth, (peers, h))| DepthLatency {
            depth,
            peers: *peers,
            latency_ms: Summary::of(h, 1000.0),
        })
        .collect();
    report.hop_from_depths_us = report
        .latency_by_depth
        .windows(2)
        .filter(|w| w[1].depth == w[0].depth + 1)
        .map(|w| {
            (
                w[0].depth,
                (w[1].latency_ms.p50 - w[0].latency_ms.p50) * 1000.0,
                (w[1].latency_ms.p99 - w[0].latency_ms.p99) * 1000.0,
            )
        })
        .collect();
    let stream_s = (edges_before + edges_after) as f64 / 2.0 * window;
    let (rss_mb, peak_rss_mb) = process_memory_mb();
    report.cost = Cost {
        window_s: window,
        cpu_s: cpu.unwrap_or(0.0),
        forwarded_stream_s: stream_s,
        cpu_per_stream_pct: cpu.map_or(0.0, |c| c / stream_s.max(1e-9) * 100.0),
        packets_forwarded: forwarded,
        cpu_us_per_packet: cpu.map_or(0.0, |c| c * 1e6 / forwarded.max(1) as f64),
        rss_mb,
        peak_rss_mb,
    };

    // 3. Relay deaths.
    // Victims are chosen from the seed, so a run can be repeated against the same tree shape.
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut interruptions = histogram();
    let mut steps: [Histogram<u64>; 4] = [histogram(), histogram(), histogram(), histogram()];
    for _ in 0..config.kills {
        let statuses: HashMap<PeerId, (usize, Vec<PeerId>, Option<u32>)> = viewers
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let s = v.status();
                Some((s.peer_id?, (i, s.children, s.depth)))
            })
            .collect();
        let mut relays: Vec<PeerId> = statuses
            .iter()
            .filter(|(_, (_, children, depth))| !children.is_empty() && depth.is_some())
            .map(|(&id, _)| id)
            .collect();
        if relays.is_empty() {
            break;
        }
        relays.sort_unstable();
        let victim = relays[(rng.next_u64() % relays.len() as u64) as usize];
        let (victim_index, children, depth) = statuses[&victim].clone();
        let mut descendants: Vec<usize> = Vec::new();
        let mut frontier = children.clone();
        while let Some(p) = frontier.pop() {
            if let Some((i, below, _)) = statuses.get(&p) {
                descendants.push(*i);
                frontier.extend(below.iter().copied());
            }
        }
        let direct: Vec<usize> = children
            .iter()
            .filter_map(|c| statuses.get(c).map(|s| s.0))
            .collect();
        let killed_us = now_us();
        for &i in &descendants {
            viewers[i].stats().arm_recovery(killed_us);
        }
        let victim_peer = viewers.swap_remove(victim_index);
        // swap_remove moved the last viewer into the victim's slot.
        let moved = viewers.len();
        let fix = |i: usize| if i == moved { victim_index } else { i };
        let descendants: Vec<usize> = descendants.into_iter().map(fix).collect();
        let direct: Vec<usize> = direct.into_iter().map(fix).collect();
        // Without the victim, whose counters leave with it.
        let stalls_before = total(&viewers, &broadcaster, |s| &s.stalls);
        let moves_before = total(&viewers, &broadcaster, |s| &s.parent_changes);
        victim_peer.kill().await;
        let deadline = Instant::now() + config.recovery_bound;
        while Instant::now() < deadline
            && descendants
                .iter()
                .any(|&i| viewers[i].stats().recovered_us.load(Ordering::Relaxed) == 0)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut this = histogram();
        let mut recovered = 0;
        for &i in &descendants {
            let r = viewers[i].stats().recovered_us.load(Ordering::Relaxed);
            if r != 0 {
                recovered += 1;
                record(&mut this, r.saturating_sub(killed_us));
                record(&mut interruptions, r.saturating_sub(killed_us));
            }
        }
        for &i in &direct {
            let s = viewers[i].stats();
            let at = |t: u64| if t > killed_us { Some(t) } else { None };
            let stalled = at(s.stalled_us.load(Ordering::Relaxed));
            let assigned = at(s.parent_assigned_us.load(Ordering::Relaxed));
            let connected = at(s.parent_connected_us.load(Ordering::Relaxed));
            let recovered = at(s.recovered_us.load(Ordering::Relaxed));
            match (stalled, assigned, connected, recovered) {
                (Some(a), Some(b), Some(c), Some(d)) if a <= b && b <= c && c <= d => {
                    report.breakdown.children += 1;
                    record(&mut steps[0], a - killed_us);
                    record(&mut steps[1], b - a);
                    record(&mut steps[2], c - b);
                    record(&mut steps[3], d - c);
                }
                _ => report.breakdown.untimed += 1,
            }
        }
        report.affected += descendants.len();
        report.never_recovered += descendants.len() - recovered;
        tokio::time::sleep(config.kill_gap).await;
        report.deaths.push(Death {
            victim: victim.0,
            depth: depth.unwrap_or(0),
            children: children.len(),
            descendants: descendants.len(),
            recovered,
            interruption_ms: Summary::of(&this, 1000.0),
            stalls: total(&viewers, &broadcaster, |s| &s.stalls).saturating_sub(stalls_before),
            moves: total(&viewers, &broadcaster, |s| &s.parent_changes)
                .saturating_sub(moves_before),
            max_depth_after: viewers
                .iter()
                .filter_map(|v| v.status().depth)
                .max()
                .unwrap_or(0),
        });
    }
    report.stalls_in_deaths = report.deaths.iter().map(|d| d.stalls).sum();
    report.interruption_ms = Summary::of(&interruptions, 1000.0);
    report.breakdown.detect_ms = Summary::of(&steps[0], 1000.0);
    report.breakdown.reassign_ms = Summary::of(&steps[1], 1000.0);
    report.breakdown.connect_ms = Summary::of(&steps[2], 1000.0);
    report.breakdown.flow_ms = Summary::of(&steps[3], 1000.0);
    report.dropped_queue_full = total(&viewers, &broadcaster, |s| &s.dropped_queue_full);
    report.write_errors = total(&viewers, &broadcaster, |s| &s.write_errors);
    if let Some(b) = &broadcaster {
        report.keyframes = (
            b.stats().keyframe_requests_received.load(Ordering::Relaxed),
            b.stats().keyframes_sent.load(Ordering::Relaxed),
        );
    }

    for v in viewers {
        v.leave().await;
    }
    if let Some(b) = broadcaster {
        b.leave().await;
    }
    Ok(report)
}

fn first_packet(s: &Stats) -> u64 {
    s.first_packet_us.load(Ordering::Relaxed)
}

fn total(
    viewers: &[Peer],
    broadcaster: &Option<Peer>,
    counter: impl Fn(&Stats) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    viewers
        .iter()
        .chain(broadcaster.iter())
        .map(|p| counter(p.stats()).load(Ordering::Relaxed))
        .sum()
}

/// Tree edges this process feeds: every peer's children.
fn edges(viewers: &[Peer], broadcaster: &Option<Peer>) -> usize {
    viewers
        .iter()
        .chain(broadcaster.iter())
        .map(|p| p.status().children.len())
        .sum()
}

/// User + system CPU seconds of this process, from `/proc/self/stat` (Linux; `None`
/// elsewhere). The fields are in USER_HZ, which Linux fixes at 100 for `/proc`.
pub fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may contain spaces; the fields after it do not.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of the man page; `rest` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// (current, peak) resident memory of this process in MB, from `/proc/self/status`.
pub fn process_memory_mb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
}

/// `POST /api/rooms`: (room id, broadcaster token).
async fn create_room(authority: &str) -> Result<(String, String), LoadError> {
    let fail = |e: String| LoadError::CreateRoom(e);
    let r = client::request(
        authority,
        "POST",
        "/api/rooms",
        None,
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| fail(e.to_string()))?;
    if r.status != 201 {
        return Err(fail(format!(
            "expected 201 Created, got {}: {}",
            r.status, r.body
        )));
    }
    let v = r.json().map_err(|e| fail(format!("{e}: {}", r.body)))?;
    match (v["room"].as_str(), v["token"].as_str()) {
        (Some(room), Some(token)) => Ok((room.to_owned(), token.to_owned())),
        _ => Err(fail(format!("no room or token in {v}"))),
    }
}

impl LoadReport {
    /// The report as a human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let row = |out: &mut String, name: &str, s: &Summary, unit: &str| {
            let _ = writeln!(
                out,
                "{name:<38} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {unit}",
                s.count, s.p50, s.p95, s.p99, s.max
            );
        };
        let _ = writeln!(
            out,
            "room {}: {} viewers, {} receiving; viewers per depth {:?}",
            self.room, self.peers, self.receiving, self.depths
        );
        let _ = writeln!(
            out,
            "{:<38} {:>7} {:>9} {:>9} {:>9} {:>9}",
            "", "n", "p50", "p95", "p99", "max"
        );
        row(
            &mut out,
            "join to first packet",
            &self.join_to_first_packet_ms,
            "ms",
        );
        for d in &self.latency_by_depth {
            row(
                &mut out,
                &format!("behind broadcaster, depth {} ({} peers)", d.depth, d.peers),
                &d.latency_ms,
                "ms",
            );
        }
        row(
            &mut out,
            "relay hold (RTP read to write)",
            &self.hop_in_relay_us,
            "µs",
        );
        for (d, p50, p99) in &self.hop_from_depths_us {
            let _ = writeln!(
                out,
                "{:<38} {:>7} {:>9.0} {:>9} {:>9.0} {:>9} µs",
                format!("added by hop {d} -> {}", d + 1),
                "",
                p50,
                "",
                p99,
                ""
            );
        }
        for (i, d) in self.deaths.iter().enumerate() {
            let _ = writeln!(
                out,
                "death {}: relay {} at depth {}, {} children, {} descendants, {} recovered; \
                 {} stall reports, {} moves, max depth after {}",
                i + 1,
                d.victim,
                d.depth,
                d.children,
                d.descendants,
                d.recovered,
                d.stalls,
                d.moves,
                d.max_depth_after
            );
        }
        row(
            &mut out,
            &format!(
                "interruption ({} affected, {} never)",
                self.affected, self.never_recovered
            ),
            &self.interruption_ms,
            "ms",
        );
        let b = &self.breakdown;
        row(&mut out, "  death -> stall reported", &b.detect_ms, "ms");
        row(&mut out, "  stalled -> new parent", &b.reassign_ms, "ms");
        row(&mut out, "  new parent -> connected", &b.connect_ms, "ms");
        row(&mut out, "  connected -> packets", &b.flow_ms, "ms");
        let c = &self.cost;
        let _ = writeln!(
            out,
            "CPU {:.2} s in {:.1} s for {:.0} stream-s: {:.3} % of a core per stream, {:.1} µs per forwarded packet ({} packets)",
            c.cpu_s,
            c.window_s,
            c.forwarded_stream_s,
            c.cpu_per_stream_pct,
            c.cpu_us_per_packet,
            c.packets_forwarded
        );
        let _ = writeln!(
            out,
            "steady window: {} stall reports, {} moves; during the deaths: {} stall reports",
            self.stalls_in_window, self.moves_in_window, self.stalls_in_deaths
        );
        let _ = writeln!(
            out,
            "memory {:.0} MB resident ({:.0} MB peak), {:.2} MB per peer; queue-full drops {}, write errors {}; broadcaster: {} keyframe requests, {} keyframes",
            c.rss_mb,
            c.peak_rss_mb,
            c.rss_mb / (self.peers + 1) as f64,
            self.dropped_queue_full,
            self.write_errors,
            self.keyframes.0,
            self.keyframes.1
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_parsing() {
        if cfg!(target_os = "linux") {
            assert!(process_cpu_s().is_some());
            assert!(process_memory_mb().0 > 0.0);
        }
    }

    #[test]
    fn summaries_are_ordered() {
        let mut h = histogram();
        for v in 1..=1000 {
            record(&mut h, v);
        }
        let s = Summary::of(&h, 1.0);
        assert_eq!(s.count, 1000);
        assert!(s.is_ordered());
        assert!((s.p50 - 500.0).abs() < 2.0, "{s:?}");
        assert_eq!(Summary::of(&histogram(), 1.0), Summary::default());
    }
}
