//! What a run measures, with the definitions of `docs/simulator.md`.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;
use treecast_core::protocol::NatClass;
use treecast_core::room::{Room, RoomEvent};

use crate::engine::{LinkPath, SimPeer};
use crate::scenario::Scenario;

/// Simulated peers visited together by a population sample.
const BATCH: usize = 64;

/// Per-peer sums of one population sample.
#[derive(Debug, Default)]
struct Acc {
    attached: u64,
    receiving: u64,
    depth_sum: u64,
    max_depth: u32,
    /// Attached viewers by the path of their parent link: direct, relayed, failing.
    paths: [u64; 3],
}

/// Index of a class in per-class tables (the order of [`NatClass::ALL`]).
fn class_index(nat: NatClass) -> usize {
    NatClass::ALL.iter().position(|&c| c == nat).unwrap_or(0)
}

type Micros = u64;

/// Latencies and durations are kept in microseconds, up to one day, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 86_400_000_000, 3).expect("static bounds are valid")
}

/// Everything recorded during a run.
#[derive(Debug, Clone)]
pub struct Stats {
    from: Micros,
    turn: bool,
    name: String,
    seed: u64,
    warmup_s: f64,
    /// Events processed.
    pub events: u64,
    end: Micros,
    arrivals: u64,
    departures: u64,
    crashes: u64,
    population: u64,
    peak_population: u64,
    /// Viewer-microseconds since `from`, for the time-average population.
    population_area: f64,
    last_change: Micros,
    join: Histogram<u64>,
    /// Join times per NAT class, in the order of [`NatClass::ALL`].
    join_by_nat: Vec<Histogram<u64>>,
    /// Viewers that arrived, per NAT class (whole run).
    arrivals_by_nat: [u64; 6],
    /// `link_failed` reports sent after the warm-up.
    ice_failures: u64,
    /// Warm standby links after the warm-up.
    standby: StandbySummary,
    /// Attached viewer samples by the path of their parent link.
    path_sums: [u64; 3],
    /// Viewers waiting with no route, summed over samples.
    no_route_sum: u64,
    interruptions: Histogram<u64>,
    reparents: u64,
    repairs: BTreeMap<&'static str, u64>,
    messages_up: u64,
    messages_down: u64,
    /// Latency samples per depth; the overall distribution is their sum.
    latency_by_depth: Vec<Histogram<u64>>,
    /// Attached-viewer counts by depth, summed over samples.
    depth_counts: Vec<u64>,
    samples: u64,
    broadcaster_children_sum: u64,
    broadcaster_children_max: u64,
    relay_children_sum: u64,
    relays_sum: u64,
    capacity_use_sum: f64,
    waiting_sum: u64,
    receiving_sum: u64,
    viewers_sum: u64,
    /// One row per sample, over the whole run.
    pub series: Vec<SeriesRow>,
    repairs_since_sample: u64,
    reparents_since_sample: u64,
    interruptions_since_sample: u64,
}

/// One sample of the time series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesRow {
    /// Simulated time, seconds.
    pub t_s: f64,
    /// Viewers present.
    pub population: u64,
    /// Viewers with a place in the tree.
    pub attached: u64,
    /// Viewers waiting for a slot.
    pub waiting: u64,
    /// Of them, told they wait for want of a route (no direct parent free, no relay).
    pub no_route: u64,
    /// Attached viewers whose parent link goes through the TURN relay.
    pub relayed: u64,
    /// Viewers receiving media.
    pub receiving: u64,
    /// Deepest attached viewer.
    pub max_depth: u32,
    /// Mean depth of attached viewers.
    pub mean_depth: f64,
    /// Subtrees re-parented by repairs since the previous sample.
    pub repairs: u64,
    /// `parent` messages to peers that already had one, since the previous sample.
    pub reparents: u64,
    /// Interruptions that ended since the previous sample.
    pub interruptions: u64,
}

/// A distribution, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dist {
    /// Observations.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Dist {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: f64| (us / 1_000.0 * 1_000.0).round() / 1_000.0;
        if h.is_empty() {
            return Self {
                count: 0,
                mean: 0.0,
                p50: 0.0,
                p95: 0.0,
                p99: 0.0,
                max: 0.0,
            };
        }
        Self {
            count: h.len(),
            mean: ms(h.mean()),
            p50: ms(h.value_at_quantile(0.50) as f64),
            p95: ms(h.value_at_quantile(0.95) as f64),
            p99: ms(h.value_at_quantile(0.99) as f64),
            max: ms(h.max() as f64),
        }
    }
}

/// Glass-to-glass latency of peers at one depth.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DepthLatency {
    /// Hops from the broadcaster.
    pub depth: u32,
    /// Latency samples at that depth, ms.
    pub latency_ms: Dist,
}

/// Depth over samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DepthSummary {
    /// Mean depth of attached viewers.
    pub mean: f64,
    /// Median.
    pub p50: u32,
    /// 95th percentile.
    pub p95: u32,
    /// 99th percentile.
    pub p99: u32,
    /// Deepest seen in any sample.
    pub max: u32,
    /// Share of viewer samples at each depth (index = depth).
    pub histogram: Vec<f64>,
}

/// Interruptions: media stopping after it had started, until it comes back.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InterruptionSummary {
    /// Interruptions that ended.
    pub count: u64,
    /// Interruptions per viewer-hour.
    pub per_viewer_hour: f64,
    /// Seconds without media per viewer-hour.
    pub seconds_per_viewer_hour: f64,
    /// Their durations, ms.
    pub duration_ms: Dist,
}

/// Load on senders, averaged over samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadSummary {
    /// Mean children of the broadcaster.
    pub broadcaster_children_mean: f64,
    /// Most children of the broadcaster.
    pub broadcaster_children_max: u64,
    /// Mean children per viewer that relays (has at least one child).
    pub relay_children_mean: f64,
    /// Children fed / children that could be fed, over attached peers.
    pub capacity_use: f64,
}

/// Warm standby links (`client.warm_standby`), counted after the warm-up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StandbySummary {
    /// Standby links both ends were told of (set-up started).
    pub prepared: u64,
    /// Of them, between peers that cannot connect (no direct route, no relay): never up.
    pub prepared_unreachable: u64,
    /// Media links that used a standby link already set up: media after a round trip.
    pub used_ready: u64,
    /// Media links that used a standby link still being set up: media when it is up.
    pub used_setting_up: u64,
    /// Media links named over a standby pair that cannot connect: made cold (and fail).
    pub used_failed: u64,
}

/// NAT classes, the relay and ICE failures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnectivitySummary {
    /// Whether the room had a TURN relay.
    pub turn: bool,
    /// Share of attached viewer samples whose parent link is relayed (media through the
    /// relay is proportional to this: every link carries the one stream).
    pub turn_share: f64,
    /// Shares of attached viewer samples by parent link: `direct`, `relayed`, `failing`
    /// (no direct route and no relay: waiting for ICE to give up).
    pub links: BTreeMap<&'static str, f64>,
    /// Viewers that arrived, by NAT class (whole run).
    pub arrivals_by_nat: BTreeMap<&'static str, u64>,
    /// Join time per NAT class, ms (classes with arrivals).
    pub join_time_ms_by_nat: BTreeMap<&'static str, Dist>,
    /// `link_failed` reports sent (ICE gave up on a parent).
    pub ice_failures: u64,
    /// The same per viewer-hour.
    pub ice_failures_per_viewer_hour: f64,
    /// Time-average number of viewers waiting with no route.
    pub no_route_mean: f64,
    /// Share of viewer samples spent waiting with no route.
    pub no_route_fraction: f64,
}

/// The results of one run, as written to `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Scenario name.
    pub name: String,
    /// Seed.
    pub seed: u64,
    /// Simulated seconds.
    pub duration_s: f64,
    /// Seconds excluded from the statistics.
    pub warmup_s: f64,
    /// Events processed.
    pub events: u64,
    /// Viewers that arrived.
    pub arrivals: u64,
    /// Viewers that left (gracefully or by crashing).
    pub departures: u64,
    /// Of which crashed.
    pub crashes: u64,
    /// Time-average number of viewers after the warm-up.
    pub mean_population: f64,
    /// Most viewers at once.
    pub peak_population: u64,
    /// Viewer-hours after the warm-up.
    pub viewer_hours: f64,
    /// From sending `hello` to the first media, ms.
    pub join_time_ms: Dist,
    /// Tree depth of attached viewers.
    pub depth: DepthSummary,
    /// Glass-to-glass latency of receiving viewers, ms.
    pub latency_ms: Dist,
    /// The same per depth.
    pub latency_by_depth: Vec<DepthLatency>,
    /// Media interruptions.
    pub interruptions: InterruptionSummary,
    /// `parent` messages to viewers that already had a parent or had media.
    pub reparents: u64,
    /// Subtrees re-parented by the room, by cause.
    pub repairs: BTreeMap<&'static str, u64>,
    /// Sender load.
    pub load: LoadSummary,
    /// Signalling messages (both directions) per arrived viewer.
    pub control_messages_per_viewer: f64,
    /// Share of viewer samples spent waiting for a slot.
    pub waiting_fraction: f64,
    /// Share of viewer samples receiving media.
    pub receiving_fraction: f64,
    /// NAT classes, relay use and ICE failures.
    pub connectivity: ConnectivitySummary,
    /// Warm standby links prepared and used.
    pub standby: StandbySummary,
}

impl Stats {
    /// Empty statistics for a scenario.
    pub fn new(scenario: &Scenario) -> Self {
        let from = (scenario.warmup_s * 1e6) as Micros;
        Self {
            from,
            turn: scenario.connectivity.turn,
            name: scenario.name.clone(),
            seed: scenario.seed,
            warmup_s: scenario.warmup_s,
            events: 0,
            end: 0,
            arrivals: 0,
            departures: 0,
            crashes: 0,
            population: 0,
            peak_population: 0,
            population_area: 0.0,
            last_change: from,
            join: histogram(),
            join_by_nat: NatClass::ALL.iter().map(|_| histogram()).collect(),
            arrivals_by_nat: [0; 6],
            ice_failures: 0,
            standby: StandbySummary::default(),
            path_sums: [0; 3],
            no_route_sum: 0,
            interruptions: histogram(),
            reparents: 0,
            repairs: BTreeMap::new(),
            messages_up: 0,
            messages_down: 0,
            latency_by_depth: Vec::new(),
            depth_counts: Vec::new(),
            samples: 0,
            broadcaster_children_sum: 0,
            broadcaster_children_max: 0,
            relay_children_sum: 0,
            relays_sum: 0,
            capacity_use_sum: 0.0,
            waiting_sum: 0,
            receiving_sum: 0,
            viewers_sum: 0,
            series: Vec::new(),
            repairs_since_sample: 0,
            reparents_since_sample: 0,
            interruptions_since_sample: 0,
        }
    }

    fn population_to(&mut self, now: Micros, population: u64) {
        if now > self.from {
            let since = self.last_change.max(self.from);
            self.population_area += self.population as f64 * (now - since) as f64;
            self.last_change = now;
        }
        self.population = population;
        self.peak_population = self.peak_population.max(population);
    }

    pub(crate) fn arrived(&mut self, now: Micros, nat: NatClass) {
        self.arrivals += 1;
        self.arrivals_by_nat[class_index(nat)] += 1;
        self.population_to(now, self.population + 1);
    }

    pub(crate) fn departed(&mut self, now: Micros, crash: bool) {
        self.departures += 1;
        self.crashes += u64::from(crash);
        self.population_to(now, self.population.saturating_sub(1));
    }

    pub(crate) fn first_media(&mut self, now: Micros, took: Micros, nat: NatClass) {
        if now >= self.from {
            let _ = self.join.record(took.max(1));
            let _ = self.join_by_nat[class_index(nat)].record(took.max(1));
        }
    }

    pub(crate) fn ice_failed(&mut self, now: Micros) {
        if now >= self.from {
            self.ice_failures += 1;
        }
    }

    /// A standby link both ends know of: its set-up starts (and never ends, if the pair
    /// cannot connect).
    pub(crate) fn standby_prepared(&mut self, now: Micros, reachable: bool) {
        if now >= self.from {
            self.standby.prepared += 1;
            self.standby.prepared_unreachable += u64::from(!reachable);
        }
    }

    /// A new media link over a standby link: `Some(true)` already up, `Some(false)` still
    /// setting up, `None` a pair that cannot connect.
    pub(crate) fn standby_used(&mut self, now: Micros, ready: Option<bool>) {
        if now >= self.from {
            match ready {
                Some(true) => self.standby.used_ready += 1,
                Some(false) => self.standby.used_setting_up += 1,
                None => self.standby.used_failed += 1,
            }
        }
    }

    pub(crate) fn interrupted(&mut self, now: Micros, lasted: Micros) {
        self.interruptions_since_sample += 1;
        if now >= self.from {
            let _ = self.interruptions.record(lasted.max(1));
        }
    }

    pub(crate) fn reparented(&mut self, now: Micros) {
        self.reparents_since_sample += 1;
        if now >= self.from {
            self.reparents += 1;
        }
    }

    pub(crate) fn message_up(&mut self) {
        self.messages_up += 1;
    }

    pub(crate) fn message_down(&mut self) {
        self.messages_down += 1;
    }

    pub(crate) fn room_event(&mut self, now: Micros, e: &RoomEvent) {
        if let RoomEvent::Repaired { subtrees, cause } = e {
            self.repairs_since_sample += u64::from(*subtrees);
            if now >= self.from {
                *self.repairs.entry(cause.as_str()).or_default() += u64::from(*subtrees);
            }
        }
    }

    /// Samples the whole population: depth, latency, load. O(N), one pass over the tree's
    /// storage with array lookups only (at 10^6 peers, hash lookups here dominated a run).
    /// The simulated peers are visited in batches, their state gathered before it is
    /// used, so the cache misses of a batch overlap instead of queueing one by one.
    pub(crate) fn sample(
        &mut self,
        now: Micros,
        peers: &[SimPeer],
        by_id: &[u32],
        room: &Room,
        no_route: u64,
    ) {
        let mut acc = Acc::default();
        let (mut fed, mut feedable, mut relays, mut relay_children) = (0u64, 0u64, 0u64, 0u64);
        let mut root_children = 0;
        let counting = now >= self.from;
        let mut batch = [(0u32, 0u32); BATCH];
        let mut n = 0;
        for (id, depth, capacity, kids) in room.tree().attached() {
            let (kids, capacity) = (u64::from(kids), u64::from(capacity));
            fed += kids;
            feedable += capacity;
            if depth == 0 {
                root_children = kids;
                continue;
            }
            if kids > 0 {
                relays += 1;
                relay_children += kids;
            }
            let idx = by_id.get(id.0 as usize).copied().unwrap_or(u32::MAX);
            batch[n] = (idx, depth);
            n += 1;
            if n == BATCH {
                self.sample_batch(&batch, peers, counting, &mut acc);
                n = 0;
            }
        }
        self.sample_batch(&batch[..n], peers, counting, &mut acc);
        let Acc {
            attached,
            receiving,
            depth_sum,
            max_depth,
            paths,
        } = acc;
        let population = self.population;
        // Everyone present who is not attached waits (alone or inside a waiting subtree).
        let waiting = population.saturating_sub(attached);
        if counting {
            self.broadcaster_children_sum += root_children;
            self.broadcaster_children_max = self.broadcaster_children_max.max(root_children);
            self.samples += 1;
            self.relays_sum += relays;
            self.relay_children_sum += relay_children;
            self.capacity_use_sum += if feedable > 0 {
                fed as f64 / feedable as f64
            } else {
                0.0
            };
            self.waiting_sum += waiting;
            self.no_route_sum += no_route;
            for (sum, n) in self.path_sums.iter_mut().zip(paths) {
                *sum += n;
            }
            self.receiving_sum += receiving;
            self.viewers_sum += population;
        }
        self.series.push(SeriesRow {
            t_s: now as f64 / 1e6,
            population,
            attached,
            waiting,
            no_route,
            relayed: paths[1],
            receiving,
            max_depth,
            mean_depth: if attached > 0 {
                round3(depth_sum as f64 / attached as f64)
            } else {
                0.0
            },
            repairs: std::mem::take(&mut self.repairs_since_sample),
            reparents: std::mem::take(&mut self.reparents_since_sample),
            interruptions: std::mem::take(&mut self.interruptions_since_sample),
        });
    }

    /// The per-peer part of [`Stats::sample`] for `(peer index, depth)` pairs.
    fn sample_batch(
        &mut self,
        batch: &[(u32, u32)],
        peers: &[SimPeer],
        counting: bool,
        acc: &mut Acc,
    ) {
        // First touch every peer with plain loads (no branches on their data), so the
        // misses are in flight together; the pass below then hits the cache.
        let mut state = [0u8; BATCH];
        for (s, &(idx, _)) in state.iter_mut().zip(batch) {
            *s = peers.get(idx as usize).map_or(0, |p| {
                u8::from(p.alive) | (u8::from(p.media) << 1) | ((p.path as u8) << 2)
            });
        }
        for (&s, &(idx, depth)) in state.iter().zip(batch) {
            // A crashed peer stays in the tree until the signaller notices: the population
            // counts only peers that are really there.
            if s & 1 == 0 {
                continue;
            }
            acc.attached += 1;
            match s >> 2 {
                x if x == LinkPath::Direct as u8 => acc.paths[0] += 1,
                x if x == LinkPath::Relayed as u8 => acc.paths[1] += 1,
                x if x == LinkPath::Failing as u8 => acc.paths[2] += 1,
                _ => {}
            }
            acc.depth_sum += u64::from(depth);
            acc.max_depth = acc.max_depth.max(depth);
            let d = depth as usize;
            if counting {
                if d >= self.depth_counts.len() {
                    self.depth_counts.resize(d + 1, 0);
                }
                self.depth_counts[d] += 1;
            }
            if s & 2 != 0 {
                acc.receiving += 1;
                if counting {
                    while self.latency_by_depth.len() <= d {
                        self.latency_by_depth.push(histogram());
                    }
                    let latency = peers[idx as usize].latency;
                    let _ = self.latency_by_depth[d].record(latency.max(1));
                }
            }
        }
    }

    pub(crate) fn finish(&mut self, now: Micros, events: u64) {
        self.population_to(now, self.population);
        self.end = now;
        self.events = events;
    }

    /// Per-depth latency histograms (index = depth), for plots.
    pub fn latency_histograms(&self) -> &[Histogram<u64>] {
        &self.latency_by_depth
    }

    /// Interruption durations, for plots.
    pub fn interruption_histogram(&self) -> &Histogram<u64> {
        &self.interruptions
    }

    /// The results.
    pub fn summary(&self) -> Summary {
        let span = self.end.saturating_sub(self.from).max(1) as f64;
        let viewer_hours = self.population_area / 3.6e9;
        let total_depth: u64 = self.depth_counts.iter().sum();
        let quantile = |q: f64| -> u32 {
            let target = (q * total_depth as f64).ceil() as u64;
            let mut acc = 0;
            for (d, &c) in self.depth_counts.iter().enumerate() {
                acc += c;
                if acc >= target.max(1) {
                    return d as u32;
                }
            }
            0
        };
        let per = |x: f64, of: u64| if of > 0 { round3(x / of as f64) } else { 0.0 };
        let interruption_total_s = if self.interruptions.is_empty() {
            0.0
        } else {
            self.interruptions.mean() * self.interruptions.len() as f64 / 1e6
        };
        Summary {
            name: self.name.clone(),
            seed: self.seed,
            duration_s: self.end as f64 / 1e6,
            warmup_s: self.warmup_s,
            events: self.events,
            arrivals: self.arrivals,
            departures: self.departures,
            crashes: self.crashes,
            mean_population: round3(self.population_area / span),
            peak_population: self.peak_population,
            viewer_hours: round3(viewer_hours),
            join_time_ms: Dist::of(&self.join),
            depth: DepthSummary {
                mean: per(
                    self.depth_counts
                        .iter()
                        .enumerate()
                        .map(|(d, &c)| d as f64 * c as f64)
                        .sum(),
                    total_depth,
                ),
                p50: quantile(0.5),
                p95: quantile(0.95),
                p99: quantile(0.99),
                max: self.depth_counts.iter().rposition(|&c| c > 0).unwrap_or(0) as u32,
                histogram: self
                    .depth_counts
                    .iter()
                    .map(|&c| per(c as f64, total_depth))
                    .collect(),
            },
            latency_ms: Dist::of(
                &self
                    .latency_by_depth
                    .iter()
                    .fold(histogram(), |mut all, h| {
                        let _ = all.add(h);
                        all
                    }),
            ),
            latency_by_depth: self
                .latency_by_depth
                .iter()
                .enumerate()
                .filter(|(_, h)| !h.is_empty())
                .map(|(d, h)| DepthLatency {
                    depth: d as u32,
                    latency_ms: Dist::of(h),
                })
                .collect(),
            interruptions: InterruptionSummary {
                count: self.interruptions.len(),
                per_viewer_hour: if viewer_hours > 0.0 {
                    round3(self.interruptions.len() as f64 / viewer_hours)
                } else {
                    0.0
                },
                seconds_per_viewer_hour: if viewer_hours > 0.0 {
                    round3(interruption_total_s / viewer_hours)
                } else {
                    0.0
                },
                duration_ms: Dist::of(&self.interruptions),
            },
            reparents: self.reparents,
            repairs: self.repairs.clone(),
            load: LoadSummary {
                broadcaster_children_mean: per(self.broadcaster_children_sum as f64, self.samples),
                broadcaster_children_max: self.broadcaster_children_max,
                relay_children_mean: per(self.relay_children_sum as f64, self.relays_sum),
                capacity_use: per(self.capacity_use_sum, self.samples),
            },
            control_messages_per_viewer: per(
                (self.messages_up + self.messages_down) as f64,
                self.arrivals,
            ),
            waiting_fraction: per(self.waiting_sum as f64, self.viewers_sum),
            receiving_fraction: per(self.receiving_sum as f64, self.viewers_sum),
            connectivity: self.connectivity_summary(viewer_hours),
            standby: self.standby.clone(),
        }
    }

    fn connectivity_summary(&self, viewer_hours: f64) -> ConnectivitySummary {
        let linked: u64 = self.path_sums.iter().sum();
        let share = |n: u64| {
            if linked > 0 {
                round4(n as f64 / linked as f64)
            } else {
                0.0
            }
        };
        let classes = NatClass::ALL
            .iter()
            .enumerate()
            .filter(|&(i, _)| self.arrivals_by_nat[i] > 0);
        ConnectivitySummary {
            turn: self.turn,
            turn_share: share(self.path_sums[1]),
            links: ["direct", "relayed", "failing"]
                .into_iter()
                .zip(self.path_sums)
                .map(|(k, n)| (k, share(n)))
                .collect(),
            arrivals_by_nat: classes
                .clone()
                .map(|(i, c)| (c.as_str(), self.arrivals_by_nat[i]))
                .collect(),
            join_time_ms_by_nat: classes
                .map(|(i, c)| (c.as_str(), Dist::of(&self.join_by_nat[i])))
                .collect(),
            ice_failures: self.ice_failures,
            ice_failures_per_viewer_hour: if viewer_hours > 0.0 {
                round3(self.ice_failures as f64 / viewer_hours)
            } else {
                0.0
            },
            no_route_mean: if self.samples > 0 {
                round3(self.no_route_sum as f64 / self.samples as f64)
            } else {
                0.0
            },
            no_route_fraction: if self.viewers_sum > 0 {
                round4(self.no_route_sum as f64 / self.viewers_sum as f64)
            } else {
                0.0
            },
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1_000.0).round() / 1_000.0
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}
