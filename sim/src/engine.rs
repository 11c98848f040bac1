//! The discrete-event engine: virtual time, an event queue, simulated peers, and the
//! production [`Room`] in the middle.
//!
//! Simulated peers speak the real protocol: they send `hello`, `report` and `leave`, and
//! act on `welcome`, `parent`, `child`, `drop`, `room`, `standby` and `standby_end`
//! exactly as a client would. Every message crosses the modelled network to or from the
//! signaller. What the room decides — placement, promotion, stand-ins, repair — is the
//! production code; the engine only models what happens around it:
//!
//! - a peer reports its NAT class (`connectivity`) `connectivity.report_ms` after its
//!   welcome, as a client does once its candidates are gathered;
//! - a link comes up once both ends know of each other, after the offer/answer round trips
//!   through the signaller plus ICE/DTLS set-up (`timing.connect_ms`), if the two classes
//!   connect directly ([`NatClass::direct`]); otherwise through the TURN relay when there is
//!   one (slower to set up, `connectivity.turn_extra_ms` more delay), and without one ICE
//!   gives up after `connectivity.ice_fail_ms` and the child sends `link_failed`;
//! - media flows down links that are up from a peer that receives it; each relay adds
//!   `timing.hop_ms`, each link its one-way network delay;
//! - a peer whose media stops reports `stalled` after `timing.stall_window_ms` (its frame
//!   watchdog), and `receiving` when media is back; one that gets no media from a new
//!   parent within `timing.connect_fail_ms` reports `stalled` too;
//! - a graceful departure sends `leave`; a crash just stops, and the signaller sees the
//!   socket close `timing.crash_detect_ms` later. A tab close stops forwarding with its
//!   `leave`; an in-app leave does too, unless `client.make_before_break` is on: then it
//!   keeps forwarding, and any viewer the room moves keeps playing its old link, until the
//!   new one carries media (or `client.bridge_timeout_ms`). When the room hands moves over
//!   itself (`room.handover_timeout`), a viewer reports `receiving` only for its new
//!   parent's media, and a `drop` closes every link to that peer at once, as the client
//!   agent does; only a departed in-app leaver is still played and fed;
//! - with `client.warm_standby`, the two ends of each `standby` the room sends set up an
//!   idle link as they would a media link (signalled offer/answer, `timing.connect_ms`,
//!   or never for pairs that cannot connect), and `standby_end` closes it. A `parent` or
//!   `child` naming a peer whose standby link is up gets media over it one round trip
//!   after both ends know; one still being set up, when its set-up ends; otherwise the
//!   link is made cold. Without it the clients ignore both messages, as the web page and
//!   the native peer do: a standby link named in `parent`/`child` opens cold.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::time::Duration;

use treecast_core::protocol::{
    ClientMessage, Connectivity, Hello, IceServer, MediaState, NatClass, PROTOCOL_VERSION, Report,
    Role, ServerMessage, StandbyRole,
};
use treecast_core::room::{ConnId, Input, Output, Room};
use treecast_core::tree::WaitReason;
use treecast_core::{PeerId, RoomId};

use crate::models::{
    ArrivalModel, CapacityModel, LatencyModel, MatrixError, NatModel, Position, SessionModel,
    Streams, unit,
};
use crate::queue::Calendar;
use crate::scenario::Scenario;
use crate::stats::Stats;

const TOKEN: &str = "simulated-broadcaster";
/// No peer (`by_id` slots of ids not yet seen, `parent`), no depth.
const NONE: u32 = u32::MAX;

/// Microseconds of virtual time.
type Micros = u64;

/// Never (a standby link between peers that cannot connect).
const NEVER: Micros = Micros::MAX;

/// A standby link, as far as its two ends know of it. Kept by (upstream, downstream)
/// peer index in [`Engine::standby`] and never put in the queue: its set-up needs no
/// event of its own, only its end time, read when a media link uses it.
#[derive(Debug, Clone, Copy)]
struct StandbyLink {
    /// Which ends were told: 1 upstream, 2 downstream.
    told: u8,
    /// While one end knows: when its message arrives. Once both do: when the idle
    /// connection is up, or `NEVER`.
    at: Micros,
}

/// Hashes a pair of peer indices (already well spread) with one multiplication.
#[derive(Debug, Default, Clone, Copy)]
struct PairHasher(u64);

impl std::hash::Hasher for PairHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0 ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type PairMap<V> = HashMap<u64, V, BuildHasherDefault<PairHasher>>;

fn pair(up: u32, down: u32) -> u64 {
    (u64::from(up) << 32) | u64::from(down)
}

fn ms(x: f64) -> Micros {
    (x * 1_000.0).max(0.0) as Micros
}

/// A message from a client to the signaller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Up {
    Hello,
    Leave,
    Report(MediaState),
    /// Its NAT class, once candidates are gathered.
    Connectivity,
    /// ICE to this parent (peer index) failed.
    LinkFailed(u32),
    /// Not a message: the signaller notices the socket closed.
    Closed,
}

/// A message from the signaller to a client, reduced to what a client acts on. Peers are
/// named by their index here, mapped from ids when the message is sent (an id is mapped
/// when the room welcomes its peer, before any message can name it), which keeps queue
/// entries small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Down {
    Welcome,
    Parent(u32, u32),
    Child(u32),
    Drop(u32),
    ParentLost(u32),
    /// A `room` status: depth (`NONE`: none), and whether it waits for want of a route.
    Status(u32, bool),
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Arrival,
    FlashArrival,
    ToServer(u32, Up),
    ToClient(u32, Down),
    Tick,
    LinkUp {
        child: u32,
        epoch: u32,
    },
    MediaCheck {
        peer: u32,
        epoch: u32,
    },
    ConnectCheck {
        peer: u32,
        epoch: u32,
    },
    /// ICE gives up on a link that cannot be made directly and has no relay.
    IceFailed {
        child: u32,
        epoch: u32,
    },
    /// Candidates gathered: the peer reports its NAT class.
    Gathered(u32),
    Depart(u32),
    /// An in-app leaver stops forwarding (make-before-break timeout).
    LingerEnd(u32),
    /// A moved child closes its old link, whether or not the new one carries media.
    BridgeEnd {
        child: u32,
        epoch: u32,
    },
    /// A parent told to drop a child that still pulls media from it closes the link.
    DropLinger {
        child: u32,
        parent: u32,
        epoch: u32,
    },
    Sample,
    /// The operator's change `scenario.events[i]`.
    Retune(u32),
}

// Queue entries are this plus 16 bytes of time and order: two per cache line.
const _: () = assert!(std::mem::size_of::<Kind>() <= 16);

/// A simulated client.
///
/// At 10^6 peers nearly every event misses the cache on its peer: the fields most events
/// and the population samples read (liveness, link and media state, parent, children,
/// latency) come first, in one cache line.
#[derive(Debug, Clone)]
#[repr(C, align(64))]
pub(crate) struct SimPeer {
    pub(crate) alive: bool,
    pub(crate) media: bool,
    link_up: bool,
    got_media: bool,
    stall_reported: bool,
    /// Told a new parent and nothing received from it yet. Like the client agent, it
    /// reports `connecting` when told and `receiving` at the first media (the room relies
    /// on the latter to tell a dead parent from a stale report).
    connecting: bool,
    /// Its NAT class (the truth; the room learns it from its report).
    nat: NatClass,
    /// How the link to its current parent is made (or fails).
    pub(crate) path: LinkPath,
    /// Parent as told by the signaller (peer index).
    parent: u32,
    link_gen: u32,
    media_gen: u32,
    /// Depth as told by the signaller, or `NONE` (an `Option` would not fit the line).
    depth: u32,
    /// One-way delay to the signaller.
    to_server: Micros,
    /// Glass-to-glass delay while receiving.
    pub(crate) latency: Micros,
    /// Children as told by the signaller (peer indices).
    children: Kids,
    // Second cache line: media delivery and arrival.
    pos: Position,
    arrived: Micros,
    /// When media stopped, while it is interrupted.
    down_since: Option<Micros>,
    pub(crate) capacity: u32,
    /// How it will depart, if it does.
    departure: Departure,
    /// Make-before-break: the old parent whose media it still plays while its new link
    /// comes up, or `NONE`.
    bridge: u32,
    /// Departed by an in-app leave and still forwarding (make-before-break).
    lingering: bool,
    /// The last `media_up` walk that visited it: old links can close a loop (a peer
    /// moved below one it still plays), which must be walked once.
    walked: u32,
    /// Told by its last `room` status that it waits with no route (counted in
    /// `Engine::no_route`).
    no_route: bool,
}

/// How a viewer departs: the three cases a browser client can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Departure {
    /// No `leave`; the signaller sees the socket close `timing.crash_detect_ms` later.
    Crash,
    /// The tab closes: `leave` is sent, but the page and its media stop at once.
    TabClose,
    /// The page's leave control: `leave` is sent and the page stays up, so with
    /// make-before-break it keeps forwarding until its children have moved.
    InApp,
}

/// How a child's link to its parent is made, from the two NAT classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum LinkPath {
    /// No parent.
    None,
    /// Directly (host, reflexive or hole-punched candidates).
    Direct,
    /// Through the TURN relay.
    Relayed,
    /// Not at all: no direct route and no relay; ICE will fail.
    Failing,
}

// The hot fields end with `children`, inside the first cache line.
const _: () = assert!(std::mem::offset_of!(SimPeer, children) + std::mem::size_of::<Kids>() <= 64);

/// Children inline in the peer.
const INLINE_KIDS: usize = 4;

/// A peer's children in the order the signaller announced them: the first four (a relay's
/// usual fan-out) inline, so walking them costs no extra cache miss, the rest on the heap.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kids {
    /// A prefix of peer indices, then `NONE`s.
    inline: [u32; INLINE_KIDS],
    /// Children after the first four. Boxed: one pointer, where a `Vec` would not fit the
    /// peer's first cache line.
    #[allow(clippy::box_collection)]
    more: Option<Box<Vec<u32>>>,
}

impl Default for Kids {
    fn default() -> Self {
        Self {
            inline: [NONE; INLINE_KIDS],
            more: None,
        }
    }
}

impl Kids {
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let more = self.more.as_deref().map_or(&[][..], Vec::as_slice);
        let n = self
            .inline
            .iter()
            .position(|&c| c == NONE)
            .unwrap_or(INLINE_KIDS);
        self.inline[..n].iter().chain(more).copied()
    }

    fn contains(&self, c: u32) -> bool {
        self.iter().any(|k| k == c)
    }

    fn push(&mut self, c: u32) {
        match self.inline.iter_mut().find(|k| **k == NONE) {
            Some(slot) => *slot = c,
            None => self.more.get_or_insert_with(Box::default).push(c),
        }
    }

    /// Removes every `c`, keeping the others in order.
    fn remove(&mut self, c: u32) {
        if !self.contains(c) {
            return;
        }
        let rest: Vec<u32> = self.iter().filter(|&k| k != c).collect();
        *self = Self::default();
        for k in rest {
            self.push(k);
        }
    }
}

/// The simulator for one scenario. Build with [`Engine::new`], then [`Engine::run`].
pub struct Engine {
    scenario: Scenario,
    room: Room,
    room_id: RoomId,
    now: Micros,
    end: Micros,
    queue: Calendar<Kind>,
    pub(crate) peers: Vec<SimPeer>,
    /// Peer index by room-assigned id.
    by_id: Vec<u32>,
    /// Room-assigned id by peer index (`NONE` until its welcome).
    id_of: Vec<u32>,
    /// Viewers present, without a parent, last told they wait with no route.
    no_route: u64,
    next_tick: Option<Micros>,
    streams: Streams,
    arrivals: ArrivalModel,
    sessions: SessionModel,
    capacities: CapacityModel,
    nats: NatModel,
    latency: LatencyModel,
    flash_left: u64,
    /// Reused work list of the media walks.
    stack: Vec<u32>,
    /// Reused work list of `media_up`: peer, and whether it already had media.
    up_stack: Vec<(u32, bool)>,
    /// Number of the current `media_up` walk.
    walk: u32,
    /// Standby links the room asked for (`client.warm_standby`), by (upstream,
    /// downstream).
    standby: PairMap<StandbyLink>,
    /// Size of `standby` after its last sweep of dead peers' links.
    standby_swept: usize,
    pub(crate) stats: Stats,
    events: u64,
}

/// A run that could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The latency matrix could not be used.
    #[error(transparent)]
    Matrix(#[from] MatrixError),
}

impl Engine {
    /// An engine ready to run `scenario` (validated by the caller).
    pub fn new(scenario: Scenario) -> Result<Self, EngineError> {
        let room_id = RoomId::new("sim").expect("a valid literal");
        let mut config = scenario.room.clone();
        if scenario.connectivity.turn {
            // What makes `has_relay()` true; the address itself is never used.
            config.ice_servers.push(IceServer {
                urls: vec!["turn:turn.sim.invalid:3478".into()],
                username: None,
                credential: None,
            });
        }
        let room = Room::new(
            room_id.clone(),
            TOKEN.into(),
            config,
            scenario.seed,
            Duration::ZERO,
        );
        let end = ms(scenario.duration_s * 1_000.0);
        let expected = expected_peers(&scenario);
        let stats = Stats::new(&scenario);
        let mut engine = Self {
            arrivals: ArrivalModel::new(&scenario),
            sessions: SessionModel::new(&scenario.session),
            capacities: CapacityModel::new(&scenario.capacity),
            nats: NatModel::new(&scenario.connectivity),
            latency: LatencyModel::new(&scenario.latency)?,
            streams: Streams::new(scenario.seed),
            flash_left: scenario.arrivals.flash_peers,
            scenario,
            room,
            room_id,
            now: 0,
            end,
            queue: Calendar::new(end),
            // Room for everyone expected, so the peer table does not regrow mid-run.
            peers: Vec::with_capacity(expected),
            by_id: Vec::new(),
            id_of: Vec::with_capacity(expected),
            no_route: 0,
            next_tick: None,
            stack: Vec::new(),
            up_stack: Vec::new(),
            walk: 0,
            standby: PairMap::default(),
            standby_swept: 0,
            stats,
            events: 0,
        };
        engine.start();
        Ok(engine)
    }

    /// Runs to the end of the scenario and returns the statistics.
    pub fn run(mut self) -> Stats {
        self.run_with(|_| {});
        self.finish()
    }

    /// Runs, calling `progress` with the simulated fraction done now and then.
    pub fn run_with(&mut self, mut progress: impl FnMut(f64)) {
        let step = (self.end / 200).max(1);
        let mut next_report = step;
        while let Some((at, kind)) = self.queue.pop() {
            self.now = at;
            self.events += 1;
            self.dispatch(kind);
            if self.now >= next_report {
                next_report = self.now + step;
                progress(self.now as f64 / self.end as f64);
            }
        }
        self.now = self.end;
    }

    /// Closes the books at the end time.
    pub fn finish(mut self) -> Stats {
        self.stats.finish(self.now, self.events);
        self.stats
    }

    /// Events processed so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    fn start(&mut self) {
        // The broadcaster: peer 0, placed like anyone else, never leaves.
        let pos = self.latency.place(&mut self.streams.latency);
        self.peers.push(SimPeer::new(
            pos,
            ms(self.latency.to_server(pos)),
            self.scenario.capacity.broadcaster_children,
            self.scenario.connectivity.broadcaster,
            0,
        ));
        self.id_of.push(NONE);
        self.peers[0].media = true;
        self.peers[0].got_media = true;
        self.schedule(0, Kind::ToServer(0, Up::Hello));
        if let Some(t) = self.arrivals.next_after(0.0, &mut self.streams.arrivals) {
            self.schedule(ms(t * 1_000.0), Kind::Arrival);
        }
        if self.flash_left > 0 {
            self.schedule(0, Kind::FlashArrival);
        }
        self.schedule(0, Kind::Sample);
        for i in 0..self.scenario.events.len() {
            let at = ms(self.scenario.events[i].at_s * 1_000.0);
            self.schedule(at, Kind::Retune(i as u32));
        }
    }

    fn schedule(&mut self, at: Micros, kind: Kind) {
        self.queue.push(at, kind);
    }

    fn dispatch(&mut self, kind: Kind) {
        match kind {
            Kind::Arrival => {
                self.arrive();
                let t = self.now as f64 / 1e6;
                if let Some(next) = self.arrivals.next_after(t, &mut self.streams.arrivals) {
                    self.schedule(ms(next * 1_000.0), Kind::Arrival);
                }
            }
            Kind::FlashArrival => {
                self.arrive();
                self.flash_left -= 1;
                if self.flash_left > 0 {
                    let n = self.scenario.arrivals.flash_peers as f64;
                    let gap = self.scenario.arrivals.flash_over_s * 1e6 / n;
                    self.schedule(self.now + gap as Micros, Kind::FlashArrival);
                }
            }
            Kind::ToServer(peer, up) => self.server_receives(peer, up),
            Kind::ToClient(peer, down) => self.client_receives(peer, down),
            Kind::Tick => {
                if self.next_tick == Some(self.now) {
                    self.next_tick = None;
                    self.room_input(Input::Tick);
                }
            }
            Kind::LinkUp { child, epoch } => self.link_up(child, epoch),
            Kind::MediaCheck { peer, epoch } => {
                let p = &self.peers[peer as usize];
                if p.alive && !p.media && p.media_gen == epoch && p.parent != NONE {
                    self.report_stalled(peer);
                }
            }
            Kind::ConnectCheck { peer, epoch } => {
                let p = &self.peers[peer as usize];
                if p.alive && !p.media && p.link_gen == epoch && p.parent != NONE {
                    self.report_stalled(peer);
                }
            }
            Kind::IceFailed { child, epoch } => {
                let c = &self.peers[child as usize];
                if c.alive && c.link_gen == epoch && c.parent != NONE && !c.link_up {
                    let parent = c.parent;
                    self.stats.ice_failed(self.now);
                    self.send_up(child, Up::LinkFailed(parent));
                }
            }
            Kind::Gathered(peer) => {
                if self.peers[peer as usize].alive {
                    self.send_up(peer, Up::Connectivity);
                }
            }
            Kind::Depart(peer) => self.depart(peer),
            Kind::Retune(i) => {
                let tuning = self.scenario.events[i as usize].tuning();
                self.room_input(Input::Reconfigure(tuning));
            }
            Kind::LingerEnd(peer) => self.linger_end(peer),
            Kind::BridgeEnd { child, epoch } => {
                let c = &self.peers[child as usize];
                if c.link_gen == epoch && c.bridge != NONE {
                    // The new link has not carried media yet (else the bridge would be
                    // closed): the child is down until it does.
                    self.close_bridge(child);
                    self.media_down(child);
                }
            }
            Kind::DropLinger {
                child,
                parent,
                epoch,
            } => {
                let c = &self.peers[child as usize];
                if c.link_gen == epoch && c.parent == parent {
                    self.peers[parent as usize].children.remove(child);
                    self.link_down(child);
                }
            }
            Kind::Sample => {
                self.stats.sample(
                    self.now,
                    &self.peers,
                    &self.by_id,
                    &self.room,
                    self.no_route,
                );
                let every = ms(self.scenario.sample_interval_s * 1_000.0).max(1);
                self.schedule(self.now + every, Kind::Sample);
            }
        }
    }

    // ---- peers ----

    fn arrive(&mut self) {
        let idx = self.peers.len() as u32;
        let capacity = self.capacities.sample(&mut self.streams.capacity);
        let nat = self.nats.sample(&mut self.streams.nat);
        let pos = self.latency.place(&mut self.streams.latency);
        let to_server = ms(self.latency.to_server(pos));
        self.peers
            .push(SimPeer::new(pos, to_server, capacity, nat, self.now));
        self.id_of.push(NONE);
        self.stats.arrived(self.now, nat);
        self.schedule(self.now + to_server, Kind::ToServer(idx, Up::Hello));
        let session = self.sessions.sample(&mut self.streams.sessions);
        // One draw decides the kind, so adding in-app leaves leaves crashes unchanged.
        let u = unit(&mut self.streams.sessions);
        let crash = self.scenario.crash_fraction;
        self.peers[idx as usize].departure = if u < crash {
            Departure::Crash
        } else if u < crash + self.scenario.in_app_leave_fraction {
            Departure::InApp
        } else {
            Departure::TabClose
        };
        if session.is_finite() {
            let at = self.now.saturating_add(ms(session * 1_000.0));
            if at <= self.end {
                self.schedule(at, Kind::Depart(idx));
            }
        }
    }

    fn depart(&mut self, idx: u32) {
        let peer = &mut self.peers[idx as usize];
        if !peer.alive {
            return;
        }
        let crash = peer.departure == Departure::Crash;
        let lingers = peer.departure == Departure::InApp && self.scenario.client.make_before_break;
        peer.alive = false;
        self.clear_no_route(idx);
        self.stats.departed(self.now, crash);
        if lingers {
            // The page stays up: it keeps its links, fed and feeding, until its children
            // have moved or the timeout.
            self.peers[idx as usize].lingering = true;
            let at = self.now + ms(self.scenario.client.bridge_timeout_ms);
            self.schedule(at, Kind::LingerEnd(idx));
        } else {
            // It stops forwarding at once, whatever the signaller learns and when.
            self.stop_forwarding(idx);
        }
        let to_server = self.peers[idx as usize].to_server;
        if crash {
            let detect = ms(self.scenario.timing.crash_detect_ms);
            self.schedule(self.now + detect, Kind::ToServer(idx, Up::Closed));
        } else {
            self.schedule(self.now + to_server, Kind::ToServer(idx, Up::Leave));
        }
    }

    /// `idx` closes every link it feeds, and any old link it still plays.
    fn stop_forwarding(&mut self, idx: u32) {
        let children = std::mem::take(&mut self.peers[idx as usize].children);
        for c in children.iter() {
            let child = &self.peers[c as usize];
            if child.parent == idx {
                self.link_down(c);
            } else if child.bridge == idx {
                self.close_bridge(c);
                self.media_down(c);
            }
        }
        if self.peers[idx as usize].bridge != NONE {
            self.close_bridge(idx);
        }
    }

    /// An in-app leaver's timeout: it closes its links, up and down.
    fn linger_end(&mut self, idx: u32) {
        if !std::mem::take(&mut self.peers[idx as usize].lingering) {
            return;
        }
        self.stop_forwarding(idx);
        let up = self.peers[idx as usize].parent;
        if up != NONE {
            self.peers[up as usize].children.remove(idx);
        }
        self.peers[idx as usize].media = false;
    }

    /// Make-before-break: `idx`, told to leave its parent, keeps playing that parent's media
    /// while it is still fed, until its next link carries media or the timeout. True if so.
    fn start_bridge(&mut self, idx: u32) -> bool {
        let p = &self.peers[idx as usize];
        let old = p.parent;
        if !self.scenario.client.make_before_break
            || p.bridge != NONE
            || old == NONE
            || !p.link_up
            || !p.media
        {
            return false;
        }
        let q = &self.peers[old as usize];
        if !(q.alive || q.lingering) || !q.media {
            return false;
        }
        self.peers[idx as usize].bridge = old;
        true
    }

    /// The child closes the old link it was still playing.
    fn close_bridge(&mut self, idx: u32) {
        let old = std::mem::replace(&mut self.peers[idx as usize].bridge, NONE);
        if old != NONE && self.peers[idx as usize].parent != old {
            self.peers[old as usize].children.remove(idx);
        }
    }

    fn client_receives(&mut self, idx: u32, down: Down) {
        if !self.peers[idx as usize].alive {
            return;
        }
        match down {
            Down::Welcome => {
                let after = self.scenario.connectivity.report_ms;
                if after >= 0.0 {
                    self.schedule(self.now + ms(after), Kind::Gathered(idx));
                }
            }
            Down::Parent(q, depth) => {
                if q != NONE {
                    self.clear_no_route(idx);
                }
                let path = self.path_to(idx, q);
                let p = &mut self.peers[idx as usize];
                p.path = path;
                if p.parent != NONE || p.got_media {
                    self.stats.reparented(self.now);
                }
                let old = p.parent;
                let bridged = self.start_bridge(idx);
                let p = &mut self.peers[idx as usize];
                p.parent = q;
                p.depth = depth;
                p.link_gen += 1;
                let epoch = p.link_gen;
                if old != NONE && !bridged {
                    self.link_down(idx);
                }
                let p = &mut self.peers[idx as usize];
                p.link_up = false;
                if p.bridge != NONE {
                    let at = self.now + ms(self.scenario.client.bridge_timeout_ms);
                    self.schedule(at, Kind::BridgeEnd { child: idx, epoch });
                }
                let p = &mut self.peers[idx as usize];
                // Connecting to a new parent: the frame watchdog restarts; the connect
                // watchdog below covers this peer until media flows.
                p.media_gen += 1;
                p.connecting = q != NONE;
                if q != NONE {
                    self.send_up(idx, Up::Report(MediaState::Connecting));
                }
                let fail = ms(self.scenario.timing.connect_fail_ms);
                self.schedule(self.now + fail, Kind::ConnectCheck { peer: idx, epoch });
                if q != NONE && self.peers[q as usize].children.contains(idx) {
                    self.connect(idx);
                }
            }
            Down::Child(c) => {
                if c == NONE {
                    return;
                }
                let p = &mut self.peers[idx as usize];
                if !p.children.contains(c) {
                    p.children.push(c);
                }
                let child = &self.peers[c as usize];
                if child.parent == idx && !child.link_up {
                    self.connect(c);
                }
            }
            Down::Drop(x) => {
                if x == NONE {
                    return;
                }
                if self.scenario.client.make_before_break
                    && !self.scenario.room.handover_timeout.is_zero()
                {
                    self.drop_now(idx, x);
                } else if self.peers[idx as usize].parent == x {
                    let bridged = self.start_bridge(idx);
                    self.leave_parent(idx, bridged);
                } else if self.peers[x as usize].bridge == idx {
                    // Make-before-break: the child closes this link once it has moved.
                } else if self.scenario.client.make_before_break
                    && self.peers[x as usize].parent == idx
                    && self.peers[x as usize].media
                {
                    // Make-before-break: keep feeding a child that still pulls from here
                    // until it moves (its own `drop` and `parent` are on their way) or the
                    // timeout.
                    self.feed_on(idx, x);
                } else {
                    self.peers[idx as usize].children.remove(x);
                    // Closing the connection cuts the child's media, if it still pulls here.
                    if self.peers[x as usize].parent == idx {
                        self.link_down(x);
                    }
                }
            }
            Down::ParentLost(q) => {
                // The client's hint rule: if media from that parent has stopped, report
                // once it has been missing `parent_lost_ms`, not after the full window.
                let lost = ms(self.scenario.timing.parent_lost_ms);
                // Only ever sooner than the frame watchdog, as in the agent.
                let sooner = lost < self.stall_window(idx);
                let p = &mut self.peers[idx as usize];
                if sooner && q != NONE && p.parent == q && !p.media && !p.stall_reported {
                    if let Some(since) = p.down_since {
                        // A new epoch retires the pending full-window check.
                        p.media_gen += 1;
                        let epoch = p.media_gen;
                        let at = (since + lost).max(self.now);
                        self.schedule(at, Kind::MediaCheck { peer: idx, epoch });
                    }
                }
            }
            Down::Status(depth, no_route) => {
                self.peers[idx as usize].depth = depth;
                let waits = no_route && depth == NONE;
                if waits != self.peers[idx as usize].no_route {
                    self.peers[idx as usize].no_route = waits;
                    if waits {
                        self.no_route += 1;
                    } else {
                        self.no_route -= 1;
                    }
                }
            }
            Down::Ended => {
                self.clear_no_route(idx);
                self.peers[idx as usize].alive = false;
            }
        }
    }

    /// `idx`, told `drop` for child `x`, feeds it on until the timeout.
    fn feed_on(&mut self, idx: u32, x: u32) {
        let epoch = self.peers[x as usize].link_gen;
        let at = self.now + ms(self.scenario.client.bridge_timeout_ms);
        self.schedule(
            at,
            Kind::DropLinger {
                child: x,
                parent: idx,
                epoch,
            },
        );
    }

    /// `idx` was told `drop` for its parent; `bridged`: it keeps playing that link.
    fn leave_parent(&mut self, idx: u32, bridged: bool) {
        let p = &mut self.peers[idx as usize];
        p.parent = NONE;
        p.path = LinkPath::None;
        p.link_gen += 1;
        let epoch = p.link_gen;
        if bridged {
            p.link_up = false;
            let at = self.now + ms(self.scenario.client.bridge_timeout_ms);
            self.schedule(at, Kind::BridgeEnd { child: idx, epoch });
        } else {
            self.link_down(idx);
        }
    }

    /// `drop` as the client agent acts on it when the room hands moves over itself: the
    /// room drops a live old parent only once the move delivered, timed out or was undone,
    /// so every link to `x` closes at once, whichever way it runs (after a stand-in or a
    /// swap the two may be linked the other way round by now, and `drop` names only the
    /// peer). Only a departed parent, an in-app leaver still forwarding, is played on.
    fn drop_now(&mut self, idx: u32, x: u32) {
        if self.peers[idx as usize].bridge == x {
            self.lose_bridge(idx);
        }
        if self.peers[idx as usize].parent == x {
            let bridged = self.peers[x as usize].lingering && self.start_bridge(idx);
            self.leave_parent(idx, bridged);
        }
        let child = &self.peers[x as usize];
        if child.lingering && child.parent == idx && child.media {
            // An in-app leaver still pulls media for the children it feeds.
            self.feed_on(idx, x);
            return;
        }
        self.peers[idx as usize].children.remove(x);
        let child = &self.peers[x as usize];
        if child.parent == idx {
            self.link_down(x);
        } else if child.bridge == idx {
            self.lose_bridge(x);
        }
    }

    /// `idx` closes the old link it was still playing: it goes on with its new parent's
    /// media if that flows (and does not come round through `idx`), or has none.
    fn lose_bridge(&mut self, idx: u32) {
        self.close_bridge(idx);
        let p = &self.peers[idx as usize];
        let q = p.parent;
        if q != NONE && p.link_up && self.peers[q as usize].media && !self.fed_through(q, idx) {
            self.media_up(idx);
        } else {
            self.media_down(idx);
        }
    }

    /// The peer no longer counts as waiting with no route.
    fn clear_no_route(&mut self, idx: u32) {
        let p = &mut self.peers[idx as usize];
        if std::mem::take(&mut p.no_route) {
            self.no_route -= 1;
        }
    }

    /// How `child`'s link to `parent` (a peer index, or `NONE`) is made.
    fn path_to(&self, child: u32, parent: u32) -> LinkPath {
        if parent == NONE {
            return LinkPath::None;
        }
        let a = self.peers[child as usize].nat;
        if a.direct(self.peers[parent as usize].nat) {
            LinkPath::Direct
        } else if self.scenario.connectivity.turn {
            LinkPath::Relayed
        } else {
            LinkPath::Failing
        }
    }

    fn index_of(&self, id: PeerId) -> u32 {
        self.by_id.get(id.0 as usize).copied().unwrap_or(NONE)
    }

    /// Both ends know of each other: the offer/answer crosses the signaller twice, then
    /// ICE and DTLS finish, directly or through the relay. A pair that can do neither
    /// fails once ICE gives up.
    fn connect(&mut self, child: u32) {
        let c = &self.peers[child as usize];
        let q = &self.peers[c.parent as usize];
        if !q.alive {
            return; // the child's connect watchdog will report it
        }
        let rtts = 2 * (c.to_server + q.to_server);
        let epoch = c.link_gen;
        let connectivity = &self.scenario.connectivity;
        let extra = match c.path {
            LinkPath::Failing => {
                let at = self.now + rtts + ms(connectivity.ice_fail_ms);
                self.schedule(at, Kind::IceFailed { child, epoch });
                return;
            }
            LinkPath::Relayed => ms(connectivity.turn_extra_ms),
            LinkPath::Direct | LinkPath::None => 0,
        };
        if self.scenario.client.warm_standby {
            let parent = c.parent;
            // The client takes a standby link only in the role it was prepared for; one
            // the other way round is closed.
            self.standby.remove(&pair(child, parent));
            if let Some(link) = self.standby.remove(&pair(parent, child))
                && link.told == 3
            {
                if link.at == NEVER {
                    self.stats.standby_used(self.now, None);
                } else {
                    // The connection exists (or soon will): one round trip between the two
                    // starts the media.
                    let (c, q) = (&self.peers[child as usize], &self.peers[parent as usize]);
                    let rtt = 2 * (ms(self.latency.between(c.pos, q.pos)) + extra);
                    let at = (self.now + rtt).max(link.at);
                    self.stats.standby_used(self.now, Some(link.at <= self.now));
                    self.schedule(at, Kind::LinkUp { child, epoch });
                    return;
                }
            }
        }
        let jitter = 0.75 + 0.5 * unit(&mut self.streams.connect);
        let setup = ms(self.scenario.timing.connect_ms * jitter) + extra;
        self.schedule(self.now + rtts + setup, Kind::LinkUp { child, epoch });
    }

    /// The room tells `idx` to prepare a standby link to `other`. Its set-up starts once
    /// both ends know, and takes what a media link's does.
    fn standby_told(&mut self, idx: u32, other: u32, role: StandbyRole) {
        if other == NONE {
            return;
        }
        let (up, down, bit) = match role {
            StandbyRole::Child => (idx, other, 1),
            StandbyRole::Parent => (other, idx, 2),
        };
        let arrives = self.now + self.peers[idx as usize].to_server;
        let link = self
            .standby
            .entry(pair(up, down))
            .or_insert(StandbyLink { told: 0, at: 0 });
        if link.told & bit != 0 {
            return;
        }
        link.told |= bit;
        link.at = link.at.max(arrives);
        if link.told != 3 {
            return;
        }
        let start = link.at;
        let (u, d) = (&self.peers[up as usize], &self.peers[down as usize]);
        let rtts = 2 * (u.to_server + d.to_server);
        let connectivity = &self.scenario.connectivity;
        let ready = match self.path_to(down, up) {
            LinkPath::Failing => NEVER,
            path => {
                let extra = if path == LinkPath::Relayed {
                    ms(connectivity.turn_extra_ms)
                } else {
                    0
                };
                let jitter = 0.75 + 0.5 * unit(&mut self.streams.connect);
                start + rtts + ms(self.scenario.timing.connect_ms * jitter) + extra
            }
        };
        if let Some(link) = self.standby.get_mut(&pair(up, down)) {
            link.at = ready;
        }
        self.stats.standby_prepared(self.now, ready != NEVER);
        // Links whose ends died before the room ended them (or before both were told)
        // are dropped now and then, at a cost proportional to the links added since.
        if self.standby.len() > 2 * self.standby_swept + 4_096 {
            let peers = &self.peers;
            self.standby
                .retain(|&k, _| peers[(k >> 32) as usize].alive && peers[k as u32 as usize].alive);
            self.standby_swept = self.standby.len();
        }
    }

    /// The room ends the standby link between `idx` and `other`: the first end to hear
    /// of it closes the connection.
    fn standby_ended(&mut self, idx: u32, other: u32) {
        if other != NONE {
            self.standby.remove(&pair(idx, other));
            self.standby.remove(&pair(other, idx));
        }
    }

    fn link_up(&mut self, child: u32, epoch: u32) {
        let c = &self.peers[child as usize];
        if !c.alive || c.link_gen != epoch || c.parent == NONE {
            return;
        }
        let q = c.parent;
        if !self.peers[q as usize].alive || !self.peers[q as usize].children.contains(child) {
            return;
        }
        self.peers[child as usize].link_up = true;
        if self.peers[q as usize].media {
            self.media_up(child);
        }
    }

    fn link_down(&mut self, child: u32) {
        self.peers[child as usize].link_up = false;
        // A child still playing its old link (make-before-break) keeps that media.
        if self.peers[child as usize].bridge == NONE {
            self.media_down(child);
        }
    }

    /// Media reaches `top` from its parent; it flows on down every link that is up. With
    /// make-before-break `top` may already have media (from its old link): it switches,
    /// and the latencies below it are brought up to date.
    fn media_up(&mut self, top: u32) {
        let mut stack = std::mem::take(&mut self.up_stack);
        stack.clear();
        stack.push((top, self.peers[top as usize].media));
        let hop = ms(self.scenario.timing.hop_ms);
        let turn_extra = ms(self.scenario.connectivity.turn_extra_ms);
        self.walk = self.walk.wrapping_add(1).max(1);
        while let Some((i, had)) = stack.pop() {
            let p = &mut self.peers[i as usize];
            if std::mem::replace(&mut p.walked, self.walk) == self.walk {
                continue;
            }
            let p = &self.peers[i as usize];
            if p.bridge != NONE
                && p.link_up
                && self.peers[p.parent as usize].media
                && !self.fed_through(p.parent, i)
            {
                self.close_bridge(i);
            }
            let p = &self.peers[i as usize];
            let parent = if p.bridge != NONE { p.bridge } else { p.parent };
            let (ppos, plat) = {
                let p = &self.peers[parent as usize];
                (p.pos, p.latency)
            };
            let relay_cost = if parent == 0 { 0 } else { hop };
            let mut link = ms(self.latency.between(ppos, self.peers[i as usize].pos));
            let now = self.now;
            let p = &mut self.peers[i as usize];
            if p.path == LinkPath::Relayed {
                link += turn_extra;
            }
            p.media = true;
            p.latency = plat + relay_cost + link;
            if !p.got_media {
                p.got_media = true;
                self.stats.first_media(now, now - p.arrived, p.nat);
            }
            if let Some(since) = p.down_since.take() {
                self.stats.interrupted(now, now - since);
            }
            let p = &mut self.peers[i as usize];
            // Its state is its parent link's, as the agent reports it: media still played
            // from the old parent (a walk passing on a change up there) says nothing of the
            // new one, and `receiving` would end the room's handover too soon.
            if p.bridge == NONE
                && std::mem::take(&mut p.stall_reported) | std::mem::take(&mut p.connecting)
            {
                self.send_up(i, Up::Report(MediaState::Receiving));
            }
            for c in self.peers[i as usize].children.iter() {
                let child = &self.peers[c as usize];
                let fed = (child.parent == i && child.link_up) || child.bridge == i;
                // Children with media already: below a switch (new latency), or playing
                // an old link while this one now carries media (they switch).
                let due = !child.media || had || (child.parent == i && child.bridge != NONE);
                if child.alive && fed && due {
                    stack.push((c, child.media));
                }
            }
        }
        self.up_stack = stack;
    }

    /// Whether `x`'s media comes through `through` (following old links first). A peer
    /// moved below one it still plays must not switch to it: the media would only go round.
    fn fed_through(&self, mut x: u32, through: u32) -> bool {
        // Longer than any depth the room allows; a longer chain is treated as a loop.
        for _ in 0..1_024 {
            if x == through {
                return true;
            }
            let p = &self.peers[x as usize];
            x = if p.bridge != NONE {
                p.bridge
            } else if p.link_up {
                p.parent
            } else {
                return false;
            };
            if x == NONE || x == 0 {
                return false;
            }
        }
        true
    }

    /// Media stops at `top` (its link or something above failed) and below it.
    fn media_down(&mut self, top: u32) {
        let mut stack = std::mem::take(&mut self.stack);
        stack.clear();
        stack.push(top);
        while let Some(i) = stack.pop() {
            // The top's own link went dark: no byte at all arrives, which the page reports
            // sooner (below it, a relay that re-encodes still sends concealment audio).
            let window = if i == top {
                self.silence_window(i).min(self.stall_window(i))
            } else {
                self.stall_window(i)
            };
            let p = &mut self.peers[i as usize];
            if !p.media || !(p.alive || p.lingering) {
                continue;
            }
            p.media = false;
            p.down_since = Some(self.now);
            p.media_gen += 1;
            let epoch = p.media_gen;
            self.schedule(self.now + window, Kind::MediaCheck { peer: i, epoch });
            for c in self.peers[i as usize].children.iter() {
                let child = &self.peers[c as usize];
                // A child playing an old link is fed by that one only.
                if (child.parent == i && child.link_up && child.bridge == NONE) || child.bridge == i
                {
                    stack.push(c);
                }
            }
        }
        self.stack = stack;
    }

    /// Reports a stall, and keeps repeating it every stall window while it lasts (the
    /// signaller may hold a report while the parent is still reconnecting).
    fn report_stalled(&mut self, idx: u32) {
        self.peers[idx as usize].stall_reported = true;
        self.send_up(idx, Up::Report(MediaState::Stalled));
        let (epoch, window) = (self.peers[idx as usize].media_gen, self.stall_window(idx));
        self.schedule(self.now + window, Kind::MediaCheck { peer: idx, epoch });
    }

    /// The client's frame watchdog: longer deeper down, so the peer nearest to a failure
    /// reports first and its descendants' reports find the repair already under way.
    fn stall_window(&self, idx: u32) -> Micros {
        let t = &self.scenario.timing;
        let below = self.peers[idx as usize]
            .depth()
            .unwrap_or(1)
            .saturating_sub(1);
        ms(t.stall_window_ms + t.stall_step_ms * f64::from(below))
    }

    /// The page's total-silence watchdog, stepped by depth like the frame window
    /// (`Micros::MAX` when the scenario turns it off).
    fn silence_window(&self, idx: u32) -> Micros {
        let t = &self.scenario.timing;
        if t.silence_ms <= 0.0 {
            return Micros::MAX;
        }
        let below = self.peers[idx as usize]
            .depth()
            .unwrap_or(1)
            .saturating_sub(1);
        ms(t.silence_ms + t.stall_step_ms * f64::from(below))
    }

    fn send_up(&mut self, idx: u32, up: Up) {
        let at = self.now + self.peers[idx as usize].to_server;
        self.schedule(at, Kind::ToServer(idx, up));
    }

    // ---- the signaller ----

    fn server_receives(&mut self, idx: u32, up: Up) {
        let conn = ConnId(u64::from(idx));
        let input = match up {
            Up::Hello => {
                let peer = &self.peers[idx as usize];
                let cfg = &self.scenario.room;
                // Declare exactly the uplink that yields this peer's class of capacity.
                let uplink = (u64::from(peer.capacity) * u64::from(cfg.stream_kbps) * 100)
                    .div_ceil(u64::from(cfg.usable_uplink_percent));
                let broadcaster = idx == 0;
                Input::Hello {
                    conn,
                    hello: Hello {
                        v: PROTOCOL_VERSION,
                        room: self.room_id.clone(),
                        role: if broadcaster {
                            Role::Broadcaster
                        } else {
                            Role::Viewer
                        },
                        token: broadcaster.then(|| TOKEN.to_owned()),
                        uplink_kbps: Some(uplink.min(u64::from(u32::MAX)) as u32),
                        resume: None,
                        link: None,
                        claim: None,
                    },
                }
            }
            Up::Leave => Input::Message {
                conn,
                msg: ClientMessage::Leave { linger: false },
            },
            Up::Report(state) => Input::Message {
                conn,
                msg: ClientMessage::Report(Report {
                    state,
                    loss: None,
                    latency_ms: None,
                    uplink_kbps: None,
                    delivered: Vec::new(),
                    link: None,
                }),
            },
            Up::Connectivity => Input::Message {
                conn,
                msg: ClientMessage::Connectivity(Connectivity {
                    nat: self.peers[idx as usize].nat,
                    relay: self.scenario.connectivity.turn,
                }),
            },
            Up::LinkFailed(parent) => {
                let id = self.id_of[parent as usize];
                if id == NONE {
                    return;
                }
                Input::Message {
                    conn,
                    msg: ClientMessage::LinkFailed {
                        peer: PeerId(u64::from(id)),
                    },
                }
            }
            Up::Closed => Input::Disconnected { conn },
        };
        if up != Up::Closed {
            self.stats.message_up();
        }
        self.room_input(input);
    }

    fn room_input(&mut self, input: Input) {
        let at = Duration::from_micros(self.now);
        self.room.handle(at, input);
        while let Some(out) = self.room.poll_output() {
            match out {
                Output::Send { conn, msg } => {
                    self.stats.message_down();
                    let idx = conn.0 as u32;
                    let down = match msg {
                        ServerMessage::Welcome { peer_id, .. } => {
                            // Others may hear of this peer (`child`) before it hears its
                            // own welcome: map the id now, where the room assigns it.
                            let slot = peer_id.0 as usize;
                            if slot >= self.by_id.len() {
                                self.by_id.resize(slot + 1, NONE);
                            }
                            self.by_id[slot] = idx;
                            self.id_of[idx as usize] = peer_id.0 as u32;
                            Down::Welcome
                        }
                        ServerMessage::Parent { peer_id, depth } => {
                            Down::Parent(self.index_of(peer_id), depth)
                        }
                        ServerMessage::Child { peer_id } => Down::Child(self.index_of(peer_id)),
                        ServerMessage::Drop { peer_id } => Down::Drop(self.index_of(peer_id)),
                        ServerMessage::ParentDisconnected { parent } => {
                            Down::ParentLost(self.index_of(parent))
                        }
                        ServerMessage::Room { depth, waiting, .. } => Down::Status(
                            depth.unwrap_or(NONE),
                            waiting == Some(WaitReason::NoRoute),
                        ),
                        ServerMessage::Ended { .. } => Down::Ended,
                        // Standby links need no event: their set-up is timed from when
                        // each end's message arrives, and read when a link uses them.
                        ServerMessage::Standby { peer_id, role } => {
                            if self.scenario.client.warm_standby {
                                self.standby_told(idx, self.index_of(peer_id), role);
                            }
                            continue;
                        }
                        ServerMessage::StandbyEnd { peer_id } => {
                            if self.scenario.client.warm_standby {
                                self.standby_ended(idx, self.index_of(peer_id));
                            }
                            continue;
                        }
                        ServerMessage::Signal { .. }
                        | ServerMessage::IceServers { .. }
                        | ServerMessage::Claim { .. }
                        | ServerMessage::Pong
                        | ServerMessage::Error { .. } => continue,
                    };
                    let at = self.now + self.peers[idx as usize].to_server;
                    self.schedule(at, Kind::ToClient(idx, down));
                }
                Output::Close { conn } => {
                    // A viewer the room turned away (e.g. `room_full`) gives up: it is not
                    // left waiting for ever in the population.
                    let idx = conn.0 as usize;
                    if idx != 0
                        && self.room.peer_of(conn).is_none()
                        && self
                            .peers
                            .get(idx)
                            .is_some_and(|p| p.alive && p.depth().is_none())
                    {
                        self.peers[idx].alive = false;
                        self.clear_no_route(idx as u32);
                        self.stats.departed(self.now, false);
                    }
                }
                Output::Event(e) => self.stats.room_event(self.now, &e),
            }
        }
        if let Some(t) = self.room.poll_timeout() {
            let t = t.as_micros() as Micros;
            if self.next_tick.is_none_or(|n| t < n) {
                self.next_tick = Some(t.max(self.now));
                self.schedule(t.max(self.now), Kind::Tick);
            }
        }
    }

    /// The room (for tests and reports).
    pub fn room(&self) -> &Room {
        &self.room
    }
}

/// Viewers a scenario should bring, for pre-allocation (capped to stay modest).
fn expected_peers(s: &Scenario) -> usize {
    let poisson = s.arrivals.max_rate() * s.duration_s;
    (s.arrivals.flash_peers as f64 + poisson * 1.1 + 16.0).min(5e7) as usize
}

impl SimPeer {
    fn depth(&self) -> Option<u32> {
        (self.depth != NONE).then_some(self.depth)
    }

    fn new(pos: Position, to_server: Micros, capacity: u32, nat: NatClass, now: Micros) -> Self {
        Self {
            alive: true,
            media: false,
            link_up: false,
            got_media: false,
            stall_reported: false,
            connecting: false,
            nat,
            path: LinkPath::None,
            parent: NONE,
            link_gen: 0,
            media_gen: 0,
            depth: NONE,
            to_server,
            children: Kids::default(),
            latency: 0,
            pos,
            arrived: now,
            down_since: None,
            capacity,
            departure: Departure::TabClose,
            bridge: NONE,
            lingering: false,
            walked: 0,
            no_route: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kids_keep_announcement_order_past_the_inline_ones() {
        let mut k = Kids::default();
        for c in [5, 3, 9, 1, 7, 2] {
            k.push(c);
        }
        assert_eq!(k.iter().collect::<Vec<_>>(), [5, 3, 9, 1, 7, 2]);
        k.remove(3);
        assert_eq!(k.iter().collect::<Vec<_>>(), [5, 9, 1, 7, 2]);
        k.remove(2);
        k.remove(5);
        assert!(k.contains(7) && !k.contains(5));
        assert_eq!(k.iter().collect::<Vec<_>>(), [9, 1, 7]);
        assert!(k.more.is_none(), "back inline once four or fewer are left");
        k.remove(42);
        assert_eq!(k.iter().count(), 3);
    }
}
