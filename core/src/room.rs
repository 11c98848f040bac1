//! One room's state machine: events in, messages and timers out.
//!
//! A driver (the signaller's room task, or the simulator) owns a [`Room`] and loops:
//!
//! ```text
//! room.handle(now, input);                       // a hello, message, disconnect or tick
//! while let Some(out) = room.poll_output() { }   // send, close, or record an event
//! sleep until room.poll_timeout()                // then handle(now, Input::Tick)
//! ```
//!
//! `now` is the time since an epoch the driver picks; the room never reads a clock.
//! Connections are named by the driver ([`ConnId`]); peers by the room ([`PeerId`]).
//! A peer outlives its connection for the resume grace period, so a signalling blip costs
//! no tree position and no media connection.
//!
//! Repairs act on clients' reports: a child whose media stalled moves to another parent
//! (never back to the same one), and a parent that failed several children, or whose
//! children lose packets, gets a capacity ceiling that is raised again slot by slot after
//! a hold (timers, like every other delay here).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use rand_chacha::ChaCha12Rng;
use rand_core::{Rng, SeedableRng};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::ids::{PeerId, PeerIndex, RoomId};
use crate::protocol::{
    ClientLimits, ClientMessage, Connectivity, EndReason, ErrorCode, Hello, IceServer, LinkKind,
    MediaState, NatClass, PROTOCOL_VERSION, RelayMode, Report, Role, ServerMessage, StandbyRole,
};
use crate::quality::{Quality, QualityNotAllowed, VideoFormat};
use crate::tree::{RelayTree, TreeEvent, WaitReason};
use crate::turn::{self, TurnRest};

mod restore;
use restore::{Claims, Restoring};
pub use restore::{RESTORE_QUIET, RestoreSummary};

/// Two children of one parent reporting loss within this window convict the parent's
/// uplink (reports come every 2 s by default).
const LOSS_WINDOW: Duration = Duration::from_secs(5);

/// Two children of one parent stalling within this window convict the parent (one child
/// alone may be starving on its own machine: a busy page reports a stall on a healthy
/// link). Clients repeat stall reports every 2 s, so overlapping stalls fall well inside.
const STALL_WINDOW: Duration = Duration::from_secs(30);

/// A parent a child moved away from, with no other child vouching for it, takes no new
/// children until it is heard from again (any message: a live client reports every 2 s
/// and pings when idle), or for this long. A crashed relay whose socket has not closed yet
/// must not catch newcomers; a live one loses nothing, its capacity unchanged.
const SUSPECT_HOLD: Duration = Duration::from_secs(10);

/// How often the room spends its background-move budget
/// ([`RoomConfig::rebalance_moves_per_second`]).
const REBALANCE_EVERY: Duration = Duration::from_secs(1);

/// A parent its child reports stalled, with no other child receiving, that has sent
/// nothing for this long is presumed dead or frozen: its stand-in takes over at once. A
/// live page reports every 2 s, so it is this quiet a quarter of the time; a wrong guess
/// needs a child's false stall report as well, and costs only make-before-break moves.
const QUIET_PARENT: Duration = Duration::from_millis(1500);

/// How long tree changes are gathered before stand-ins are chosen again. Each new standby
/// link is a connection set-up at both ends: while a crowd joins, a relay's children and
/// the leaves that fit change many times a second, and only where things stand afterwards
/// is worth preparing.
const STANDBY_EVERY: Duration = Duration::from_secs(1);

/// How long a capacity ceiling holds before it is raised by one, on its first strike. Each
/// further strike doubles it, up to [`CAP_HOLD_MAX`]: a parent convicted by a passing
/// congestion gets its slots back within minutes, a parent that fails again whenever it is
/// trusted stays capped longer. The ceiling is re-probed one slot at a time until it
/// reaches the capacity the uplink allows, and then removed.
const CAP_HOLD: Duration = Duration::from_secs(30);

/// The longest a ceiling holds between two raises (30 s doubled four times).
const CAP_HOLD_MAX: Duration = Duration::from_secs(480);

/// A connection as the driver names it. Unique per driver for the room's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ConnId(pub u64);

/// Operator settings for a room. Only binaries read files, flags or environment; they
/// build this struct and pass it in.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomConfig {
    /// Most children the broadcaster may feed, whatever its uplink.
    pub root_fanout: u32,
    /// Most children a viewer may feed, whatever its uplink.
    pub relay_fanout: u32,
    /// Deepest allowed position (broadcaster = 0). Peers wait rather than go deeper.
    pub max_depth: u32,
    /// Bitrate of the stream in kbit/s: one child costs this much uplink. A room created
    /// with a [`Quality`] gets that preset's bitrate instead ([`RoomConfig::for_quality`]);
    /// this is the bitrate of rooms created without one.
    pub stream_kbps: u32,
    /// Highest stream bitrate a broadcaster may choose, kbit/s: presets above it are not
    /// offered and are refused when asked for.
    pub max_stream_kbps: u32,
    /// The preset the broadcaster chose for this room, if any. Set per room from the
    /// room's creation (never from a configuration file); told to clients in `welcome`.
    #[serde(skip)]
    pub quality: Option<Quality>,
    /// The broadcast's title, if the broadcaster gave one. Set per room from its creation
    /// (never from a configuration file); told to clients in `welcome`.
    #[serde(skip)]
    pub title: Option<String>,
    /// Share of a declared uplink that may be spent on children, in percent.
    pub usable_uplink_percent: u32,
    /// Uplink assumed for a peer that declares none, in kbit/s.
    pub default_uplink_kbps: u32,
    /// Loss above this fraction, reported by a child, stops its parent from taking more.
    pub loss_threshold: f32,
    /// Clients should send something at least this often.
    #[serde(with = "millis")]
    pub heartbeat_interval: Duration,
    /// A peer silent for this long is disconnected (it may still resume).
    /// `None` disables the check (simulations that do not model heartbeats).
    #[serde(with = "opt_millis")]
    pub heartbeat_timeout: Option<Duration>,
    /// A peer that got a new parent, or reported a stall, less than this long ago is
    /// presumed to be reconnecting: stall reports about it (and its own, which may predate
    /// its new link) wait. Clients repeat stall reports while stalled, so nothing is lost.
    #[serde(with = "millis")]
    pub settle_window: Duration,
    /// How long a moved peer's old parent keeps feeding it (make-before-break) while its
    /// new parent connects; it stops once the peer reports media from the new one. Zero
    /// turns make-before-break off: both ends of the old link get `drop` at once.
    #[serde(with = "millis")]
    pub handover_timeout: Duration,
    /// Background moves per second that bring strong peers up and weak ones down after
    /// churn (each make-before-break, so nobody sees a gap), plus one per peer that joined
    /// or left in that second and one per thousand peers, so the budget keeps pace with
    /// churn and size in large rooms. 0, or make-before-break off, turns rebalancing off.
    pub rebalance_moves_per_second: u32,
    /// Warm standby: each relay gets a peer prepared to take its place, and the room has
    /// that stand-in connect in advance (ICE and DTLS done, no media) to the relay's parent
    /// and children (`standby`). If the relay leaves or dies, the repair uses those links
    /// and media flows after a round trip instead of a connection set-up. Costs each
    /// stand-in one idle connection per child of its relay, plus one.
    pub warm_standby: bool,
    /// How long a disconnected peer keeps its place and may resume.
    #[serde(with = "millis")]
    pub resume_grace: Duration,
    /// A room whose broadcaster never arrives ends after this long.
    #[serde(with = "millis")]
    pub start_timeout: Duration,
    /// How often viewers are told the audience size (only when it changed).
    /// `None` sends it only on join and on depth changes.
    #[serde(with = "opt_millis")]
    pub audience_interval: Option<Duration>,
    /// Most viewers in the room (the token-holding broadcaster always gets in).
    pub max_peers: u32,
    /// Messages held for a disconnected peer; past this it loses its place.
    pub max_pending: u32,
    /// Told to clients in `welcome`; enforced by the driver.
    pub max_message_bytes: u32,
    /// Told to clients in `welcome`; enforced by the driver.
    pub messages_per_second: u32,
    /// STUN/TURN servers handed to every client as they are (STUN, or TURN with fixed
    /// credentials).
    pub ice_servers: Vec<IceServer>,
    /// TURN servers whose credentials are minted per peer (TURN REST scheme), handed out
    /// after `ice_servers` in `welcome` and renewed before they expire (`ice_servers`
    /// message). Minting needs the wall clock: see [`Room::set_unix_epoch`].
    pub turn: Option<TurnRest>,
}

impl Default for RoomConfig {
    fn default() -> Self {
        Self {
            root_fanout: 4,
            relay_fanout: 4,
            max_depth: 16,
            stream_kbps: 500,
            max_stream_kbps: Quality::Hd.stream_kbps(),
            quality: None,
            title: None,
            usable_uplink_percent: 80,
            default_uplink_kbps: 2_000,
            loss_threshold: 0.05,
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Some(Duration::from_secs(15)),
            settle_window: Duration::from_secs(3),
            handover_timeout: Duration::from_secs(5),
            rebalance_moves_per_second: 4,
            warm_standby: true,
            resume_grace: Duration::from_secs(10),
            start_timeout: Duration::from_secs(3_600),
            audience_interval: Some(Duration::from_secs(2)),
            max_peers: 20_000,
            max_pending: 256,
            max_message_bytes: 16 * 1024,
            messages_per_second: 50,
            // No third party by default: the signaller adds its own STUN server.
            ice_servers: Vec::new(),
            turn: None,
        }
    }
}

impl RoomConfig {
    /// Whether clients get a TURN server: peers whose NAT classes cannot connect directly
    /// may then be linked (the relay carries them) when no direct parent is free.
    pub fn has_relay(&self) -> bool {
        self.turn.as_ref().is_some_and(|t| !t.urls.is_empty())
            || self.ice_servers.iter().any(|s| {
                s.urls
                    .iter()
                    .any(|u| u.starts_with("turn:") || u.starts_with("turns:"))
            })
    }

    /// This configuration for a room whose broadcaster chose `quality`: the stream bitrate
    /// becomes the preset's. Refused when the preset's bitrate is above
    /// [`RoomConfig::max_stream_kbps`].
    pub fn for_quality(&self, quality: Quality) -> Result<RoomConfig, QualityNotAllowed> {
        let needs_kbps = quality.stream_kbps();
        if needs_kbps > self.max_stream_kbps {
            return Err(QualityNotAllowed {
                quality,
                needs_kbps,
                max_kbps: self.max_stream_kbps,
            });
        }
        Ok(RoomConfig {
            stream_kbps: needs_kbps,
            quality: Some(quality),
            ..self.clone()
        })
    }

    /// Whether a broadcaster may choose `quality` on this server.
    pub fn allows(&self, quality: Quality) -> bool {
        quality.stream_kbps() <= self.max_stream_kbps
    }

    /// Children a peer of `role` with this uplink may feed.
    pub fn capacity(&self, role: Role, uplink_kbps: Option<u32>) -> u32 {
        let limit = match role {
            Role::Broadcaster => self.root_fanout,
            Role::Viewer => self.relay_fanout,
        };
        let uplink = u64::from(uplink_kbps.unwrap_or(self.default_uplink_kbps));
        let usable = uplink * u64::from(self.usable_uplink_percent) / 100;
        let by_bandwidth = usable / u64::from(self.stream_kbps.max(1));
        let cap = by_bandwidth.min(u64::from(limit)) as u32;
        match role {
            // A broadcaster that can feed nobody could not broadcast at all.
            Role::Broadcaster => cap.max(1),
            Role::Viewer => cap,
        }
    }
}

pub(crate) mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

mod opt_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(d.as_millis() as u64),
            None => s.serialize_u64(0),
        }
    }
    /// 0 means "off".
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let ms = u64::deserialize(d)?;
        Ok((ms > 0).then(|| Duration::from_millis(ms)))
    }
}

/// What the driver feeds the room.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A `hello` arrived on a connection not yet in this room.
    Hello {
        /// The connection.
        conn: ConnId,
        /// Its `hello`.
        hello: Hello,
    },
    /// Any other message from a connection of this room.
    Message {
        /// The connection.
        conn: ConnId,
        /// The message.
        msg: ClientMessage,
    },
    /// Transport-level sign of life (e.g. a WebSocket pong).
    Alive {
        /// The connection.
        conn: ConnId,
    },
    /// Peers whose reports since the last one the room saw changed nothing it decides on
    /// (a cluster edge keeps such reports): each is alive, and its media is as it last
    /// reported, as of `age` ago.
    Unchanged {
        /// The connections, each with how long ago its latest report arrived.
        conns: Vec<(ConnId, Duration)>,
    },
    /// The connection is gone. The peer keeps its place for the resume grace period.
    Disconnected {
        /// The connection.
        conn: ConnId,
    },
    /// Time passed; due timers fire.
    Tick,
    /// End the room now (server shutdown, operator action).
    End(EndReason),
    /// An operator changed the room's settings while it runs ([`Room::reconfigure`]).
    Reconfigure(Tuning),
}

/// Settings an operator may change while a room runs; absent fields stay as they are.
/// The driver checks them against its own limits; the room only keeps fan-outs and depth
/// sane (the broadcaster feeds at least one child, the depth limit is at least 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tuning {
    /// New [`RoomConfig::root_fanout`].
    pub root_fanout: Option<u32>,
    /// New [`RoomConfig::relay_fanout`].
    pub relay_fanout: Option<u32>,
    /// New [`RoomConfig::max_depth`].
    pub max_depth: Option<u32>,
    /// New [`RoomConfig::max_peers`].
    pub max_peers: Option<u32>,
}

/// The settings of a room an operator may change, as they are now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomSettings {
    /// Most children the broadcaster may feed.
    pub root_fanout: u32,
    /// Most children a viewer may feed.
    pub relay_fanout: u32,
    /// Deepest allowed position.
    pub max_depth: u32,
    /// Most viewers; more are refused with `room_full` (nobody already in is removed).
    pub max_peers: u32,
}

impl RoomConfig {
    /// The settings an operator may change, from this configuration.
    pub fn settings(&self) -> RoomSettings {
        RoomSettings {
            root_fanout: self.root_fanout,
            relay_fanout: self.relay_fanout,
            max_depth: self.max_depth,
            max_peers: self.max_peers,
        }
    }
}

/// What the room asks the driver to do, or tells it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send a message on a connection.
    Send {
        /// The connection.
        conn: ConnId,
        /// The message.
        msg: ServerMessage,
    },
    /// Close a connection, after sending what was queued for it.
    Close {
        /// The connection.
        conn: ConnId,
    },
    /// Something happened worth counting or showing on a dashboard.
    Event(RoomEvent),
}

/// Why a peer left the room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveCause {
    /// It sent `leave`.
    Left,
    /// Its connection dropped and it did not resume within the grace period.
    Lost,
    /// Its children reported it stalled after its connection dropped.
    Failed,
    /// Too many messages queued while it was away.
    Overflow,
    /// The room ended.
    RoomEnded,
}

/// Why a peer (with its subtree) got a new parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RepairCause {
    /// Its parent left or failed.
    ParentLeft,
    /// It reported its parent's media stalled.
    ParentStalled,
    /// Its parent's capacity dropped below its child count.
    ParentCapacity,
    /// ICE between it and its parent failed.
    LinkFailed,
    /// A background move: a stronger peer took a shallower place (make-before-break).
    Rebalance,
    /// An operator lowered a fan-out or the depth limit: a surplus child, or a peer too
    /// deep, moved to a free slot (make-before-break).
    Tuning,
}

impl RepairCause {
    /// The cause as it is serialized (and labelled in metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ParentLeft => "parent_left",
            Self::ParentStalled => "parent_stalled",
            Self::ParentCapacity => "parent_capacity",
            Self::LinkFailed => "link_failed",
            Self::Rebalance => "rebalance",
            Self::Tuning => "tuning",
        }
    }
}

/// Observable happenings, for metrics, logs and the live dashboard stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RoomEvent {
    /// A peer joined (or resumed).
    Joined {
        /// The peer.
        peer: PeerId,
        /// Its role.
        role: Role,
        /// Whether it resumed an earlier session.
        resumed: bool,
        /// Its capacity.
        capacity: u32,
    },
    /// A peer's connection dropped; it keeps its place for the grace period.
    Disconnected {
        /// The peer.
        peer: PeerId,
    },
    /// A peer left the room.
    Left {
        /// The peer.
        peer: PeerId,
        /// Why.
        cause: LeaveCause,
    },
    /// Orphans or moved subtrees re-parented.
    Repaired {
        /// How many subtrees moved.
        subtrees: u32,
        /// Why.
        cause: RepairCause,
    },
    /// A peer's capacity changed.
    Capacity {
        /// The peer.
        peer: PeerId,
        /// New capacity.
        capacity: u32,
    },
    /// The tree changed.
    Tree(TreeEvent),
    /// A client request was refused.
    Refused {
        /// The code sent to the client.
        code: ErrorCode,
    },
    /// The room ended.
    Ended {
        /// Why.
        reason: EndReason,
    },
    /// A peer told the room its NAT class.
    Connectivity {
        /// The peer.
        peer: PeerId,
        /// Its class.
        nat: NatClass,
    },
    /// A child's link to its parent came up with this candidate-pair type (reported when it
    /// changes).
    Link {
        /// The child.
        peer: PeerId,
        /// The selected pair's type.
        link: LinkKind,
    },
    /// ICE between a child and its parent failed; the child is placed elsewhere.
    LinkFailed {
        /// The child that reported it.
        child: PeerId,
        /// Its parent.
        parent: PeerId,
    },
    /// A peer's reported media state changed (reported when it changes), so that what a
    /// dashboard draws follows the viewers.
    Media {
        /// The peer.
        peer: PeerId,
        /// Its new state.
        state: MediaState,
    },
    /// An operator changed the room's settings; these are the settings now.
    Reconfigured(RoomSettings),
    /// A presented claim was refused.
    ClaimRefused {
        /// Why.
        reason: crate::claim::ClaimError,
    },
    /// The room was rebuilt from its peers' claims (or a late claim was honoured).
    Restored(RestoreSummary),
}

#[derive(Debug, Clone)]
struct Peer {
    role: Role,
    conn: Option<ConnId>,
    /// The resume secret; sent to the client as 32 hex digits.
    resume: u128,
    uplink_kbps: Option<u32>,
    /// Ceiling set when children reported this peer failing them; survives new uplink
    /// measurements, so a relay that over-promised cannot talk its way back up. Raised by
    /// one every hold time (see [`CAP_HOLD`]) until the uplink's capacity is reached.
    capacity_cap: Option<u32>,
    /// How many times a ceiling was set or lowered: the hold grows with it.
    cap_strikes: u32,
    /// When the ceiling is next raised (earlier timers are stale).
    cap_raise_at: Option<Duration>,
    /// Its children that reported it stalled lately, with the time of their last report
    /// (kept within [`STALL_WINDOW`]).
    stalled_children: Vec<(PeerId, Duration)>,
    /// Since when its free slots are held back because a child moved away from it
    /// ([`SUSPECT_HOLD`]).
    suspect_since: Option<Duration>,
    last_seen: Duration,
    disconnected_at: Option<Duration>,
    media: MediaState,
    /// When it last sent a report (`media` is as of then).
    reported_at: Option<Duration>,
    stalled_since: Option<Duration>,
    /// When it last got a new parent.
    linked_at: Option<Duration>,
    latency_ms: Option<u32>,
    loss: Option<f32>,
    /// Messages held while disconnected, delivered on resume.
    pending: Vec<ServerMessage>,
    /// What it said about its network; `Unknown` until it says.
    nat: NatClass,
    /// The candidate-pair type of its link to its parent, as last reported.
    link: Option<LinkKind>,
    /// How it relays to each child, as its last report with modes said.
    relay_modes: Vec<(PeerId, RelayMode)>,
    /// When its TURN credentials are due for renewal (earlier timers are stale).
    renew_at: Option<Duration>,
    /// When it last reported loss above the threshold.
    lossy_at: Option<Duration>,
    /// Former children it still feeds while they switch to their new parent.
    handing_over: Vec<PeerId>,
    /// Set once it left with `linger`: out of the tree and the audience, it keeps feeding
    /// its former children until their handovers end.
    departure: Option<Departure>,
    /// When it was last sent a claim (claims enabled only).
    claimed_at: Option<Duration>,
}

impl Peer {
    /// A peer that just said `hello` on `conn`.
    fn new(
        role: Role,
        conn: ConnId,
        resume: u128,
        uplink_kbps: Option<u32>,
        now: Duration,
    ) -> Self {
        Self {
            role,
            conn: Some(conn),
            resume,
            uplink_kbps,
            capacity_cap: None,
            cap_strikes: 0,
            cap_raise_at: None,
            stalled_children: Vec::new(),
            suspect_since: None,
            last_seen: now,
            disconnected_at: None,
            media: MediaState::Connecting,
            reported_at: None,
            stalled_since: None,
            linked_at: None,
            latency_ms: None,
            loss: None,
            pending: Vec::new(),
            nat: NatClass::Unknown,
            link: None,
            relay_modes: Vec::new(),
            renew_at: None,
            lossy_at: None,
            handing_over: Vec::new(),
            departure: None,
            claimed_at: None,
        }
    }
}

/// A relay that left with `linger`, still feeding the children it had until each has a
/// new parent delivering (make-before-break departure).
#[derive(Debug, Clone, Copy)]
struct Departure {
    /// The parent it had, still feeding it meanwhile (that peer lists it in
    /// `handing_over`); dropped when the departure ends.
    upstream: Option<PeerId>,
}

/// A peer moved away from a parent that is still in the room: the old parent keeps
/// feeding it until media flows from the new one (make-before-break).
#[derive(Debug, Clone, Copy)]
struct Handover {
    /// The old parent.
    from: PeerId,
    /// When the old link is dropped even if the new one never delivered.
    until: Duration,
    /// The peer said it is connecting (as a client does on every `parent`): a later
    /// `receiving` is about the new parent. One in flight from before is about the old.
    connecting: bool,
    /// The peer reported media from its new parent; the old link goes once nobody above
    /// it is still switching.
    delivered: bool,
}

/// The room's peers by id. Ids are server-assigned sequential integers, so the id indexes
/// an array of slots ([`PeerIndex`]) and the peers live in a dense table whose freed slots
/// are reused: no hashing, and at 10^6 peers one cache miss fewer per lookup.
#[derive(Debug, Default)]
struct PeerTable {
    index: PeerIndex,
    slots: Vec<Option<(PeerId, Peer)>>,
    vacant: Vec<u32>,
}

impl PeerTable {
    fn len(&self) -> usize {
        self.index.len()
    }

    fn get(&self, id: &PeerId) -> Option<&Peer> {
        let slot = self.index.get(*id)?;
        self.slots[slot as usize].as_ref().map(|(_, p)| p)
    }

    fn get_mut(&mut self, id: &PeerId) -> Option<&mut Peer> {
        let slot = self.index.get(*id)?;
        self.slots[slot as usize].as_mut().map(|(_, p)| p)
    }

    fn contains_key(&self, id: &PeerId) -> bool {
        self.index.contains(*id)
    }

    /// Adds a peer under a fresh id.
    fn insert(&mut self, id: PeerId, peer: Peer) {
        debug_assert!(!self.contains_key(&id), "ids are never reused");
        let slot = match self.vacant.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some((id, peer));
                slot
            }
            None => {
                self.slots.push(Some((id, peer)));
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(id, slot);
    }

    fn remove(&mut self, id: &PeerId) -> Option<Peer> {
        let slot = self.index.remove(*id)?;
        self.vacant.push(slot);
        self.slots[slot as usize].take().map(|(_, p)| p)
    }

    /// Every peer, in no particular order.
    fn iter(&self) -> impl Iterator<Item = (&PeerId, &Peer)> {
        self.slots.iter().flatten().map(|(id, p)| (id, p))
    }

    /// Every id, in no particular order.
    fn keys(&self) -> impl Iterator<Item = &PeerId> {
        self.iter().map(|(id, _)| id)
    }
}

impl std::ops::Index<&PeerId> for PeerTable {
    type Output = Peer;

    fn index(&self, id: &PeerId) -> &Peer {
        self.get(id).expect("a known peer")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// Check the peer's heartbeat (lazy: re-armed from `last_seen` if it was heard from).
    Liveness(PeerId),
    /// The peer's resume grace may be over.
    Grace(PeerId),
    /// Tell viewers the audience size.
    Audience,
    /// The broadcaster should have arrived by now.
    Start,
    /// The peer's TURN credentials are due for renewal.
    Credentials(PeerId),
    /// The peer's capacity ceiling may be due to rise (lazy: `cap_raise_at` decides).
    CapRaise(PeerId),
    /// The hold on the peer's free slots may be over (lazy: `suspect_since` decides).
    Suspect(PeerId),
    /// Background moves are due.
    Rebalance,
    /// Stand-ins of the relays touched lately are due to be looked at again.
    Standby,
    /// The peer's handover from its old parent should be over.
    Handover(PeerId),
    /// Claims past half their lifetime are due for renewal.
    Claims,
    /// A restoring room may have every claim it waits for.
    Restore,
}

/// One peer, as shown in a [`RoomSnapshot`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerSnapshot {
    /// The peer.
    pub id: PeerId,
    /// Its role.
    pub role: Role,
    /// Its parent, if attached below the broadcaster.
    pub parent: Option<PeerId>,
    /// Its depth, if attached.
    pub depth: Option<u32>,
    /// Children it may feed.
    pub capacity: u32,
    /// Its children.
    pub children: Vec<PeerId>,
    /// Whether its signalling connection is up.
    pub connected: bool,
    /// Its last reported media state.
    pub media: MediaState,
    /// Its last reported latency estimate.
    pub latency_ms: Option<u32>,
    /// Its last reported loss.
    pub loss: Option<f32>,
    /// Its NAT class, as it reported it.
    pub nat: NatClass,
    /// The candidate-pair type of its link to its parent, as last reported.
    pub link: Option<LinkKind>,
    /// How it relays to each of its current children that it reported a mode for,
    /// sorted by child.
    pub relay_modes: Vec<ChildRelayMode>,
    /// Why it has no parent, while it waits.
    pub waiting: Option<WaitReason>,
}

/// How a relay feeds one child, as shown in a [`PeerSnapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChildRelayMode {
    /// The child.
    pub peer: PeerId,
    /// Pass-through or track relay.
    pub mode: RelayMode,
}

/// The whole room at one instant, for the HTTP API and dashboards.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoomSnapshot {
    /// The room.
    pub room: RoomId,
    /// Whether a broadcaster is connected.
    pub live: bool,
    /// Why the room ended, if it did.
    pub ended: Option<EndReason>,
    /// The broadcaster's peer id.
    pub broadcaster: Option<PeerId>,
    /// Viewers in the room.
    pub viewers: u32,
    /// Viewers waiting for a slot.
    pub waiting: u32,
    /// Deepest attached depth.
    pub max_depth: u32,
    /// Attached peers per depth.
    pub depth_histogram: Vec<u64>,
    /// Every peer, sorted by id.
    pub peers: Vec<PeerSnapshot>,
    /// The room's stream bitrate, kbit/s (what one child costs).
    pub stream_kbps: u32,
    /// The picture the broadcaster chose, if it chose one.
    pub video: Option<VideoFormat>,
    /// The broadcast's title, if it has one.
    pub title: Option<String>,
    /// The settings an operator may change (fan-outs, depth limit, most viewers).
    pub settings: RoomSettings,
    /// Peers still feeding more children than their capacity after a fan-out was
    /// lowered; they shed them a few moves per second.
    pub shedding: u32,
}

/// A room: the relay tree plus the peers' sessions. See the module docs for the loop.
#[derive(Debug)]
pub struct Room {
    id: RoomId,
    token: String,
    config: RoomConfig,
    tree: RelayTree,
    peers: PeerTable,
    conns: FxHashMap<ConnId, PeerId>,
    /// Resume secrets. Keys are random server-made 128-bit values (clients can only look
    /// them up, never insert), so a cheap hash cannot be pushed into long chains.
    resumes: FxHashMap<u128, PeerId>,
    /// Moved peers still fed by their old parent, by peer.
    handovers: FxHashMap<PeerId, Handover>,
    /// Peers that left with `linger` and still feed their former children.
    departing: u32,
    broadcaster: Option<PeerId>,
    next_peer: u64,
    rng: ChaCha12Rng,
    timers: BinaryHeap<Reverse<(Duration, Timer)>>,
    outputs: VecDeque<Output>,
    ended: Option<EndReason>,
    /// Reused by every tree-event flush, so steady-state operations do not allocate.
    scratch_events: Vec<(TreeEvent, bool)>,
    scratch_status: Vec<PeerId>,
    /// Audience size and liveness last told to everyone, to skip unchanged broadcasts.
    told: (u32, bool),
    now: Duration,
    /// Unix time at the driver's epoch (`now` = 0), for credential expiry times.
    unix_epoch: Duration,
    /// Peers put into or taken out of the tree since the last rebalancing round: each adds
    /// a move to its budget. Arrivals count too: in arrival order, strong peers land below
    /// weak ones as surely as departures open holes (a 10^6 flash crowd ends at depth p99
    /// 22 where 11 would do, when only departures pay for moves).
    churned: u32,
    /// Warm standby, by relay: the peer prepared to stand in for it and the links it was
    /// told to hold for that.
    standbys: FxHashMap<PeerId, Standby>,
    /// Stand-in → the relay it is prepared for (one each, so one failure never finds its
    /// stand-in already spent on another).
    stands_for: FxHashMap<PeerId, PeerId>,
    /// Every standby link both ends were told of, (upstream, downstream), with how many
    /// relays' standbys use it (two relays' arrangements may share one).
    standby_links: FxHashMap<(PeerId, PeerId), u32>,
    /// Peers whose standby arrangements may have changed since the last refresh.
    standby_dirty: Vec<PeerId>,
    /// A [`Timer::Standby`] is armed.
    standby_due: bool,
    /// Signs claims, when the driver keeps a key (a server does; simulations do not).
    claims: Option<Claims>,
    /// Set while the room is rebuilt from its peers' claims.
    restoring: Option<Box<Restoring>>,
}

/// A relay's warm standby: who stands in, and the links (upstream end, downstream end)
/// both ends were told to prepare.
#[derive(Debug, Clone)]
struct Standby {
    stand_in: PeerId,
    links: Vec<(PeerId, PeerId)>,
}

impl Room {
    /// A new room. `token` authorises the broadcaster; `seed` drives resume tokens, so a
    /// production driver must seed from the OS and a simulation from its scenario seed.
    pub fn new(id: RoomId, token: String, config: RoomConfig, seed: u64, now: Duration) -> Self {
        let mut tree = RelayTree::new(config.max_depth);
        tree.set_relay_allowed(config.has_relay());
        let mut room = Self {
            id,
            token,
            config,
            tree,
            peers: PeerTable::default(),
            conns: FxHashMap::default(),
            resumes: FxHashMap::default(),
            handovers: FxHashMap::default(),
            departing: 0,
            broadcaster: None,
            next_peer: 1,
            rng: ChaCha12Rng::seed_from_u64(seed),
            timers: BinaryHeap::new(),
            outputs: VecDeque::new(),
            ended: None,
            scratch_events: Vec::new(),
            scratch_status: Vec::new(),
            told: (0, false),
            now,
            unix_epoch: Duration::ZERO,
            churned: 0,
            standbys: FxHashMap::default(),
            stands_for: FxHashMap::default(),
            standby_links: FxHashMap::default(),
            standby_dirty: Vec::new(),
            standby_due: false,
            claims: None,
            restoring: None,
        };
        room.arm(now + room.config.start_timeout, Timer::Start);
        if let Some(every) = room.config.audience_interval {
            room.arm(now + every, Timer::Audience);
        }
        if room.rebalances() {
            room.arm(now + REBALANCE_EVERY, Timer::Rebalance);
        }
        room
    }

    /// Whether the room moves peers in the background: only make-before-break moves are
    /// invisible to viewers.
    fn rebalances(&self) -> bool {
        self.config.rebalance_moves_per_second > 0 && !self.config.handover_timeout.is_zero()
    }

    /// Up to a second's budget of background moves; each is a handover like any move.
    /// Moves an operator's change calls for (surplus children of a lowered fan-out, peers
    /// below a lowered depth limit) go first; peers still switching from an earlier move
    /// wait for the next round, so nobody is moved twice before its new parent delivers.
    fn rebalance(&mut self) {
        self.arm(self.now + REBALANCE_EVERY, Timer::Rebalance);
        // Plus one move per thousand peers: the same small share of a large audience as of
        // a small one (at 10^6, bursts of repairs otherwise leave a tail a level or three
        // too deep for minutes).
        let budget = (self.config.rebalance_moves_per_second + std::mem::take(&mut self.churned))
            as usize
            + self.tree.attached_len() / 1000;
        let handovers = &self.handovers;
        let shed = self.tree.shed(budget, |p| handovers.contains_key(&p));
        let lifted = self
            .tree
            .lift_deep(budget - shed, |p| handovers.contains_key(&p));
        if shed + lifted > 0 {
            self.event(RoomEvent::Repaired {
                subtrees: (shed + lifted) as u32,
                cause: RepairCause::Tuning,
            });
        }
        // Nobody is moved before its first media (a newcomer would start over) or while an
        // earlier move is still switching it.
        let (handovers, peers) = (&self.handovers, &self.peers);
        let moved = self.tree.rebalance_where(budget - shed - lifted, |p| {
            handovers.contains_key(&p)
                || peers
                    .get(&p)
                    .is_none_or(|peer| peer.media != MediaState::Receiving)
        });
        if moved > 0 {
            self.event(RoomEvent::Repaired {
                subtrees: moved as u32,
                cause: RepairCause::Rebalance,
            });
        }
        // Also when nothing moved: a peer done shedding (its surplus children left on
        // their own) offers its slots again, and waiting peers may have taken them.
        self.flush_tree_events(None);
    }

    /// Tells the room the wall-clock (Unix) time at the driver's epoch, i.e. when `now`
    /// was zero. Only TURN credential expiry uses it; simulations may leave it at zero.
    pub fn set_unix_epoch(&mut self, unix_at_zero: Duration) {
        self.unix_epoch = unix_at_zero;
    }

    /// The room's id.
    pub fn id(&self) -> &RoomId {
        &self.id
    }

    /// The room's configuration.
    pub fn config(&self) -> &RoomConfig {
        &self.config
    }

    /// The relay tree (read-only).
    pub fn tree(&self) -> &RelayTree {
        &self.tree
    }

    /// Why the room ended, once it has. An ended room answers every `hello` with
    /// `room_ended`; the driver may drop it whenever it likes.
    pub fn ended(&self) -> Option<EndReason> {
        self.ended
    }

    /// Whether a broadcaster is connected.
    pub fn is_live(&self) -> bool {
        self.broadcaster
            .and_then(|b| self.peers.get(&b))
            .is_some_and(|p| p.conn.is_some())
    }

    /// Viewers in the room (connected or within their grace period). Relays that left
    /// with `linger` and still feed their former children are not counted.
    pub fn viewers(&self) -> u32 {
        (self.peers.len() - usize::from(self.broadcaster.is_some()) - self.departing as usize)
            as u32
    }

    /// The peer bound to a connection.
    pub fn peer_of(&self, conn: ConnId) -> Option<PeerId> {
        self.conns.get(&conn).copied()
    }

    /// Messages held for a peer whose connection dropped, in the order they will be
    /// delivered if it resumes (empty for a connected or unknown peer). What the client
    /// will know on resume is what it knew plus these.
    pub fn pending(&self, peer: PeerId) -> &[ServerMessage] {
        self.peers.get(&peer).map_or(&[], |p| &p.pending)
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When the room next needs `Input::Tick`.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Feeds one input at time `now`.
    pub fn handle(&mut self, now: Duration, input: Input) {
        self.now = now.max(self.now);
        match input {
            Input::Hello { conn, hello } => self.on_hello(conn, hello),
            Input::Message { conn, msg } => self.on_message(conn, msg),
            Input::Alive { conn } => {
                if let Some(p) = self.conns.get(&conn).and_then(|id| self.peers.get_mut(id)) {
                    p.last_seen = self.now;
                }
            }
            Input::Unchanged { conns } => {
                for (conn, age) in conns {
                    let at = self.now.saturating_sub(age);
                    if let Some(p) = self.conns.get(&conn).and_then(|id| self.peers.get_mut(id)) {
                        p.last_seen = p.last_seen.max(at);
                        p.reported_at = p.reported_at.max(Some(at));
                    }
                }
            }
            Input::Disconnected { conn } => self.on_disconnect(conn),
            Input::Tick => self.on_tick(),
            Input::End(reason) => self.end(reason),
            Input::Reconfigure(tuning) => self.reconfigure(tuning),
        }
    }

    /// The whole room, for APIs and dashboards. O(N). Relays that left with `linger` are
    /// gone from it at once, as they are from the tree.
    pub fn snapshot(&self) -> RoomSnapshot {
        let mut peers: Vec<PeerSnapshot> = self
            .peers
            .iter()
            .filter(|(_, p)| p.departure.is_none())
            .map(|(&id, p)| {
                let view = self.tree.view(id);
                let children: Vec<PeerId> = view
                    .as_ref()
                    .map(|v| v.children.clone())
                    .unwrap_or_default();
                // Only current children: a report may predate a move.
                let relay_modes = p
                    .relay_modes
                    .iter()
                    .filter(|(c, _)| children.contains(c))
                    .map(|&(peer, mode)| ChildRelayMode { peer, mode })
                    .collect();
                PeerSnapshot {
                    id,
                    role: p.role,
                    parent: view.as_ref().and_then(|v| v.parent),
                    depth: view.as_ref().and_then(|v| v.depth),
                    capacity: view.as_ref().map_or(0, |v| v.capacity),
                    children,
                    connected: p.conn.is_some(),
                    media: p.media,
                    latency_ms: p.latency_ms,
                    loss: p.loss,
                    nat: p.nat,
                    link: p.link,
                    relay_modes,
                    waiting: self.tree.wait_reason(id),
                }
            })
            .collect();
        peers.sort_unstable_by_key(|p| p.id);
        RoomSnapshot {
            room: self.id.clone(),
            live: self.is_live(),
            ended: self.ended,
            broadcaster: self.broadcaster,
            viewers: self.viewers(),
            waiting: self.tree.waiting_len() as u32,
            max_depth: self.tree.max_depth(),
            depth_histogram: self.tree.depth_histogram().to_vec(),
            peers,
            stream_kbps: self.config.stream_kbps,
            video: self.config.quality.map(Quality::video),
            title: self.config.title.clone(),
            settings: self.config.settings(),
            shedding: self.tree.shedding_len() as u32,
        }
    }

    /// Changes settings while the room runs. Nobody is removed or left without media:
    ///
    /// - a lower fan-out: peers now feeding more children than they may keep them, take no
    ///   new ones, and hand the surplus on a few moves per second (the rebalancing budget,
    ///   [`RoomConfig::rebalance_moves_per_second`]), each move make-before-break, and
    ///   only to a free slot: a surplus with nowhere to go stays until one frees;
    /// - a higher fan-out: the new slots take waiting peers at once, and rebalancing lifts
    ///   deep peers into them;
    /// - a lower depth limit: no slot beyond it is offered, and peers already deeper move
    ///   up (make-before-break, same budget) where a slot is free;
    /// - fewer viewers allowed: further joins are refused with `room_full`.
    ///
    /// Without a move budget (or with make-before-break off) the change applies at once.
    pub fn reconfigure(&mut self, tuning: Tuning) {
        if self.ended.is_some() {
            return;
        }
        let c = &mut self.config;
        if let Some(v) = tuning.root_fanout {
            c.root_fanout = v.max(1);
        }
        if let Some(v) = tuning.relay_fanout {
            c.relay_fanout = v;
        }
        if let Some(v) = tuning.max_peers {
            c.max_peers = v;
        }
        if let Some(v) = tuning.max_depth {
            c.max_depth = v.max(1);
            self.tree.set_max_depth(c.max_depth);
        }
        let mut ids: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.departure.is_none())
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable(); // deterministic output order for simulations
        for id in ids {
            let target = self.target_capacity(id);
            self.retune_capacity(id, target);
        }
        self.event(RoomEvent::Reconfigured(self.config.settings()));
        if let Some(b) = self.broadcaster {
            self.issue_claim(b);
        }
        if !self.rebalances() {
            let moved =
                self.tree.shed(usize::MAX, |_| false) + self.tree.lift_deep(usize::MAX, |_| false);
            if moved > 0 {
                self.event(RoomEvent::Repaired {
                    subtrees: moved as u32,
                    cause: RepairCause::Tuning,
                });
            }
        }
        self.flush_tree_events(None);
    }

    /// A peer's capacity after a settings change: lowered below its child count, it sheds
    /// gradually ([`RelayTree::limit_capacity`]) when moves are make-before-break.
    fn retune_capacity(&mut self, id: PeerId, target: u32) {
        let Some(goal) = self.tree.capacity_goal(id) else {
            return;
        };
        if goal == target {
            return;
        }
        let children = self.tree.child_count(id).unwrap_or(0);
        if target < children && self.rebalances() {
            let _ = self.tree.limit_capacity(id, target);
            self.touch_standby(id);
            self.event(RoomEvent::Capacity {
                peer: id,
                capacity: target,
            });
        } else {
            self.apply_capacity(id, target);
        }
    }

    // ---- inputs ----

    fn on_hello(&mut self, conn: ConnId, hello: Hello) {
        if self.conns.contains_key(&conn) {
            return self.refuse(conn, ErrorCode::AlreadyJoined, false);
        }
        if let Some(reason) = self.ended {
            self.send(conn, ServerMessage::Ended { reason });
            return self.refuse(conn, ErrorCode::RoomEnded, true);
        }
        if hello.v != PROTOCOL_VERSION {
            return self.refuse(conn, ErrorCode::UnsupportedVersion, true);
        }
        if hello.room != self.id {
            return self.refuse(conn, ErrorCode::UnknownRoom, true);
        }
        if hello.role == Role::Broadcaster && !constant_time_eq(hello.token.as_deref(), &self.token)
        {
            return self.refuse(conn, ErrorCode::WrongToken, true);
        }
        if self.restoring.is_some() {
            return self.restoring_hello(conn, hello);
        }
        if let Some(token) = &hello.resume {
            let known = parse_resume(token).and_then(|t| self.resumes.get(&t).copied());
            return match known {
                Some(id) if self.peers[&id].role == hello.role => self.resume(conn, id, hello),
                // A place held before the server lost the room's bookkeeping.
                None if self.claims.is_some() && hello.claim.is_some() => {
                    let claim = hello.claim.clone().unwrap_or_default();
                    self.late_claim(conn, hello, &claim)
                }
                _ => self.refuse(conn, ErrorCode::BadResume, true),
            };
        }
        if hello.role == Role::Broadcaster {
            if let Some(old) = self.broadcaster {
                if self.peers[&old].conn.is_some() {
                    return self.refuse(conn, ErrorCode::BroadcasterExists, true);
                }
                // The token holder came back without its resume token (a page reload): its
                // old session is gone for good; the tree is re-rooted at the new session.
                self.remove_peer(old, LeaveCause::Lost);
            }
        } else if self.viewers() >= self.config.max_peers {
            return self.refuse(conn, ErrorCode::RoomFull, true);
        }
        self.join(conn, hello);
    }

    fn join(&mut self, conn: ConnId, hello: Hello) {
        let id = PeerId(self.next_peer);
        self.next_peer += 1;
        let resume = self.fresh_resume();
        let capacity = self.config.capacity(hello.role, hello.uplink_kbps);
        self.peers.insert(
            id,
            Peer::new(hello.role, conn, resume, hello.uplink_kbps, self.now),
        );
        self.conns.insert(conn, id);
        self.resumes.insert(resume, id);
        self.welcome(conn, id, hello.role, resume, false, capacity);
        self.event(RoomEvent::Joined {
            peer: id,
            role: hello.role,
            resumed: false,
            capacity,
        });
        let placed = match hello.role {
            Role::Broadcaster => {
                self.broadcaster = Some(id);
                self.tree.set_root(id, capacity)
            }
            Role::Viewer => {
                self.churned = self.churned.saturating_add(1);
                self.tree.insert(id, capacity)
            }
        };
        debug_assert!(
            placed.is_ok(),
            "fresh ids are unique and the root slot is free"
        );
        self.flush_tree_events(Some(id));
        if hello.role == Role::Broadcaster {
            self.issue_claim(id);
            self.announce(Some(id));
        }
        self.arm_liveness(id);
    }

    /// A new random resume secret.
    fn fresh_resume(&mut self) -> u128 {
        (u128::from(self.rng.next_u64()) << 64) | u128::from(self.rng.next_u64())
    }

    fn resume(&mut self, conn: ConnId, id: PeerId, hello: Hello) {
        let (old_conn, resume, pending) = {
            let peer = self
                .peers
                .get_mut(&id)
                .expect("resume tokens map to live peers");
            peer.disconnected_at = None;
            peer.last_seen = self.now;
            if hello.uplink_kbps.is_some() {
                peer.uplink_kbps = hello.uplink_kbps;
            }
            (
                peer.conn.replace(conn),
                peer.resume,
                std::mem::take(&mut peer.pending),
            )
        };
        if let Some(old) = old_conn {
            // A half-open socket the client gave up on: this session replaces it.
            self.conns.remove(&old);
            self.outputs.push_back(Output::Close { conn: old });
        }
        self.conns.insert(conn, id);
        // Welcome and the messages held while away come first; only then may a changed
        // uplink shed children (which sends `drop`s) and the status sum it all up.
        let capacity = self.target_capacity(id);
        self.welcome(conn, id, hello.role, resume, true, capacity);
        for msg in pending {
            self.send(conn, msg);
        }
        self.event(RoomEvent::Joined {
            peer: id,
            role: hello.role,
            resumed: true,
            capacity,
        });
        self.apply_capacity(id, capacity);
        self.send_status(id);
        self.issue_claim(id);
        if hello.role == Role::Broadcaster {
            self.announce(Some(id));
        }
        self.arm_liveness(id);
    }

    fn welcome(
        &mut self,
        conn: ConnId,
        id: PeerId,
        role: Role,
        resume: u128,
        resumed: bool,
        capacity: u32,
    ) {
        let limits = ClientLimits {
            max_message_bytes: self.config.max_message_bytes,
            messages_per_second: self.config.messages_per_second,
            heartbeat_ms: self.config.heartbeat_interval.as_millis() as u64,
            resume_grace_ms: self.config.resume_grace.as_millis() as u64,
            capacity,
            stream_kbps: self.config.stream_kbps,
            video: self.config.quality.map(Quality::video),
        };
        let ice_servers = self.ice_servers_for(id);
        self.send(
            conn,
            ServerMessage::Welcome {
                peer_id: id,
                resume: hex32(resume),
                role,
                resumed,
                ice_servers,
                limits,
                protocol: PROTOCOL_VERSION,
                title: self.config.title.clone(),
            },
        );
    }

    /// The configured servers, then TURN with credentials minted for this peer now; arms
    /// their renewal a fifth of the lifetime before they expire.
    fn ice_servers_for(&mut self, id: PeerId) -> Vec<IceServer> {
        let mut servers = self.config.ice_servers.clone();
        let Some(rest) = &self.config.turn else {
            return servers;
        };
        let ttl = rest.ttl.max(Duration::from_secs(1));
        let expires = (self.unix_epoch + self.now + ttl).as_secs();
        let username = turn::username(expires, &format!("{}.{}", self.id, id));
        let credential = turn::password(&rest.secret, &username);
        servers.push(IceServer {
            urls: rest.urls.clone(),
            username: Some(username),
            credential: Some(credential),
        });
        let renew_at = self.now + ttl - ttl / 5;
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.renew_at = Some(renew_at);
        }
        self.arm(renew_at, Timer::Credentials(id));
        servers
    }

    fn on_message(&mut self, conn: ConnId, msg: ClientMessage) {
        let Some(&id) = self.conns.get(&conn) else {
            // A connection this room already let go of (a close is on its way); the driver
            // answers `not_joined` itself for connections that never joined.
            return;
        };
        if self.peers[&id].departure.is_some() {
            return self.on_departing_message(conn, id, msg);
        }
        let mut heard = false;
        if let Some(p) = self.peers.get_mut(&id) {
            p.last_seen = self.now;
            heard = p.suspect_since.take().is_some();
        }
        if heard {
            // Alive after all: its slots are offered again.
            let _ = self.tree.set_held(id, false);
            self.flush_tree_events(None);
        }
        match msg {
            ClientMessage::Hello(_) => self.refuse(conn, ErrorCode::AlreadyJoined, false),
            ClientMessage::Ping {} => self.send(conn, ServerMessage::Pong),
            ClientMessage::Signal { to, data } => {
                if !self.tree.are_neighbours(id, to)
                    && !self.lingering_link(id, to)
                    && !self.standby_link(id, to)
                {
                    let code = if self.peers.contains_key(&to) {
                        ErrorCode::NotNeighbour
                    } else {
                        ErrorCode::UnknownPeer
                    };
                    return self.refuse(conn, code, false);
                }
                self.send_to_peer(to, ServerMessage::Signal { from: id, data });
            }
            ClientMessage::Report(report) => self.on_report(conn, id, report),
            ClientMessage::Connectivity(c) => self.on_connectivity(id, c),
            ClientMessage::LinkFailed { peer } => self.on_link_failed(conn, id, peer),
            ClientMessage::Leave { linger } => {
                let feeds = self.tree.child_count(id).unwrap_or(0) > 0
                    || !self.peers[&id].handing_over.is_empty();
                if Some(id) == self.broadcaster {
                    // Ends the room: everyone, the broadcaster included, gets `ended`.
                    self.end(EndReason::BroadcasterLeft);
                } else if linger && feeds && !self.config.handover_timeout.is_zero() {
                    self.depart(id);
                } else {
                    self.outputs.push_back(Output::Close { conn });
                    self.remove_peer(id, LeaveCause::Left);
                }
            }
        }
    }

    /// A relay that left with `linger` may only signal its former children and parent
    /// (ICE on links that still carry media), ping, or leave at once; the rest is ignored.
    fn on_departing_message(&mut self, conn: ConnId, id: PeerId, msg: ClientMessage) {
        match msg {
            ClientMessage::Signal { to, data } if self.lingering_link(id, to) => {
                self.send_to_peer(to, ServerMessage::Signal { from: id, data });
            }
            ClientMessage::Ping {} => self.send(conn, ServerMessage::Pong),
            ClientMessage::Leave { linger: false } => self.finish_departure(id),
            _ => {}
        }
    }

    /// Whether `a` and `b` are the two ends of a link a lingering departure keeps up.
    fn lingering_link(&self, a: PeerId, b: PeerId) -> bool {
        let keeps = |x: PeerId, y: PeerId| {
            self.peers.get(&x).is_some_and(|p| {
                p.departure
                    .is_some_and(|d| d.upstream == Some(y) || p.handing_over.contains(&y))
            })
        };
        keeps(a, b) || keeps(b, a)
    }

    /// `id` left with `linger`: gone from the tree and the audience now, its children
    /// re-placed as for any departure, but it keeps its connection, and its children
    /// their links to it, until each has a new parent delivering (their handovers). Its
    /// own parent keeps feeding it meanwhile.
    fn depart(&mut self, id: PeerId) {
        let peer = self.peers.get_mut(&id).expect("a known peer");
        let resume = peer.resume;
        // Being handed over itself: the parent it was leaving still feeds it, and the
        // new one (never heard delivering) is dropped when the tree cuts it below.
        let upstream = self.handovers.remove(&id).map(|h| h.from);
        peer.departure = Some(Departure { upstream });
        self.departing += 1;
        self.resumes.remove(&resume);
        let orphans = self.tree.child_count(id).unwrap_or(0);
        self.churned = self.churned.saturating_add(1);
        self.remove_from_tree(id);
        self.event(RoomEvent::Left {
            peer: id,
            cause: LeaveCause::Left,
        });
        if orphans > 0 {
            self.event(RoomEvent::Repaired {
                subtrees: orphans,
                cause: RepairCause::ParentLeft,
            });
        }
        self.flush_tree_events(None);
        if self
            .peers
            .get(&id)
            .is_some_and(|p| p.handing_over.is_empty())
        {
            // Every child was already mid-move and kept its earlier parent.
            self.finish_departure(id);
        }
    }

    /// The tree cut `leaver` (departing) from `parent`: that link stays up until the
    /// departure ends, unless another parent already feeds it.
    fn keep_upstream(&mut self, leaver: PeerId, parent: PeerId) {
        let Some(d) = self
            .peers
            .get_mut(&leaver)
            .and_then(|p| p.departure.as_mut())
        else {
            return;
        };
        if d.upstream.is_some() {
            self.send_to_peer(parent, ServerMessage::Drop { peer_id: leaver });
            self.send_to_peer(leaver, ServerMessage::Drop { peer_id: parent });
            return;
        }
        d.upstream = Some(parent);
        if let Some(p) = self.peers.get_mut(&parent) {
            p.handing_over.push(leaver);
        }
    }

    /// A departing relay is done (its last child moved, its socket dropped, or it asked
    /// to leave at once): its remaining links are dropped, its connection closed.
    fn finish_departure(&mut self, id: PeerId) {
        let Some(peer) = self.peers.remove(&id) else {
            return;
        };
        debug_assert!(peer.departure.is_some(), "only departing peers finish");
        self.departing -= 1;
        self.stop_feeding(id, peer.handing_over);
        let upstream = peer.departure.and_then(|d| d.upstream);
        if let Some(up) = upstream {
            if let Some(p) = self.peers.get_mut(&up) {
                p.handing_over.retain(|&c| c != id);
            }
            self.send_to_peer(up, ServerMessage::Drop { peer_id: id });
        }
        if let Some(conn) = peer.conn {
            self.conns.remove(&conn);
            if let Some(up) = upstream {
                self.send(conn, ServerMessage::Drop { peer_id: up });
            }
            self.outputs.push_back(Output::Close { conn });
        }
    }

    /// `id` is gone: the peers it still fed (moving children, or a lingering child whose
    /// upstream it was) are told `drop` now, and no later step may drop that link again.
    fn stop_feeding(&mut self, id: PeerId, fed: Vec<PeerId>) {
        for child in fed {
            self.handovers.remove(&child);
            if let Some(d) = self
                .peers
                .get_mut(&child)
                .and_then(|c| c.departure.as_mut())
            {
                d.upstream = None;
            }
            self.send_to_peer(child, ServerMessage::Drop { peer_id: id });
        }
    }

    fn on_report(&mut self, conn: ConnId, id: PeerId, report: Report) {
        if let Some(loss) = report.loss
            && !(0.0..=1.0).contains(&loss)
        {
            return self.refuse_with(
                conn,
                ErrorCode::InvalidField,
                "\"loss\" must be a fraction between 0 and 1.",
            );
        }
        let (was_receiving, media_changed);
        {
            let peer = self
                .peers
                .get_mut(&id)
                .expect("bound connections map to peers");
            was_receiving = peer.media == MediaState::Receiving;
            media_changed = peer.media != report.state;
            peer.media = report.state;
            peer.reported_at = Some(self.now);
            peer.latency_ms = report.latency_ms.or(peer.latency_ms);
            peer.loss = report.loss.or(peer.loss);
            match report.state {
                MediaState::Stalled => {
                    peer.stalled_since.get_or_insert(self.now);
                }
                MediaState::Receiving | MediaState::Connecting => peer.stalled_since = None,
            }
            if report.uplink_kbps.is_some() {
                peer.uplink_kbps = report.uplink_kbps;
            }
            if report.delivered.iter().any(|d| d.mode.is_some()) {
                peer.relay_modes = report
                    .delivered
                    .iter()
                    .filter_map(|d| d.mode.map(|m| (d.peer, m)))
                    .collect();
                peer.relay_modes.sort_unstable_by_key(|&(c, _)| c);
                peer.relay_modes.dedup_by_key(|&mut (c, _)| c);
            }
        }
        if media_changed {
            self.event(RoomEvent::Media {
                peer: id,
                state: report.state,
            });
        }
        if report.uplink_kbps.is_some() {
            self.set_capacity_from_uplink(id);
        }
        if let Some(kind) = report.link {
            let peer = self.peers.get_mut(&id).expect("a known peer");
            if peer.link.replace(kind) != Some(kind) {
                self.event(RoomEvent::Link {
                    peer: id,
                    link: kind,
                });
            }
        }
        let parent = self.tree.parent(id);
        if parent.is_some()
            && let Some(h) = self.handovers.get_mut(&id)
        {
            match report.state {
                MediaState::Connecting => h.connecting = true,
                // Media flows from the new parent: the old one may stop, once nobody
                // above is still switching.
                MediaState::Receiving if h.connecting => {
                    h.delivered = true;
                    self.finish_delivered_handovers();
                }
                _ => {}
            }
        }
        if let (Some(loss), Some(parent)) = (report.loss, parent)
            && loss > self.config.loss_threshold
        {
            self.on_loss(id, parent);
        }
        if report.state == MediaState::Stalled
            && let Some(parent) = parent
        {
            self.on_stall(id, parent, was_receiving);
        }
    }

    /// `id` lost more than the threshold from `parent`. The parent is judged by all its
    /// children: when another of them lost too within [`LOSS_WINDOW`], the parent's uplink
    /// is the bottleneck, so it sheds a child (its capacity drops by one) and the rest
    /// recover. A lone child's loss is most likely its own link: the parent only stops
    /// taking new children while it has just that one, and nobody moves.
    fn on_loss(&mut self, id: PeerId, parent: PeerId) {
        let now = self.now;
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.lossy_at = Some(now);
        }
        let young = |t: Option<Duration>| {
            t.is_some_and(|t| now.saturating_sub(t) < self.config.settle_window)
        };
        if young(self.peers[&id].linked_at) {
            return; // a new link's first seconds (and a report from before it) prove nothing
        }
        let children = self.tree.child_count(parent).unwrap_or(0);
        let others_lossy = self.tree.children(parent).any(|c| {
            c != id
                && self.peers.get(&c).is_some_and(|p| {
                    p.lossy_at
                        .is_some_and(|t| now.saturating_sub(t) < LOSS_WINDOW)
                        && !young(p.linked_at)
                })
        });
        if others_lossy {
            self.lower_capacity(parent, children.saturating_sub(1));
        } else if children == 1 {
            self.lower_capacity(parent, children);
        }
    }

    /// `id` says media from `parent` stopped. Called for every stall report: clients
    /// repeat them while stalled, so a report that has to wait here is not lost.
    /// `was_receiving`: its previous report about this parent said media flowed.
    ///
    /// The parent is judged by all its children: a sibling that receives clears it (the
    /// reporter moves, late, and the parent keeps its capacity); a ceiling needs two
    /// children stalled within [`STALL_WINDOW`] while the parent itself receives. A peer
    /// stalling alone never lowers its parent's capacity.
    fn on_stall(&mut self, id: PeerId, parent: PeerId, was_receiving: bool) {
        if self.tree.depth(id).is_none() {
            return; // inside a waiting subtree: nothing feeds it anyway
        }
        if Some(parent) == self.broadcaster {
            return; // nowhere better to pull from; the broadcaster's own problem
        }
        let settling = |t: Option<Duration>| {
            t.is_some_and(|t| self.now.saturating_sub(t) < self.config.settle_window)
        };
        let young_link = settling(self.peers[&id].linked_at);
        // Its signalling is gone too: the tab or machine died. Repair now rather than wait
        // out the grace period. On a young link only media that flowed from it and stopped
        // proves that (a report about a previous parent cannot say "receiving" first).
        if self.peers[&parent].conn.is_none() && (was_receiving || !young_link) {
            return self.remove_peer(parent, LeaveCause::Failed);
        }
        if young_link {
            return; // still connecting to this parent, or the report predates the link
        }
        let p = &self.peers[&parent];
        // The parent is itself reconnecting (new parent), or starves too and can be
        // repaired (not fed by the broadcaster): the fault is further up and its repair
        // heals this peer. Otherwise move this peer.
        let upstream_repair = settling(p.linked_at)
            || (settling(p.stalled_since) && self.tree.parent(parent) != self.broadcaster);
        if upstream_repair {
            return;
        }
        let now = self.now;
        let parent_receives = p.media == MediaState::Receiving;
        let stalled_since = self.peers[&id].stalled_since.unwrap_or(now);
        // Judged by its other children: one that settled on it and said it receives since
        // this stall began shows that the parent delivers, so the reporter's own link or
        // machine is at fault. An older "receiving" proves nothing: when a relay dies, its
        // children's watchdogs fire one after the other.
        let delivering = self.tree.children(parent).any(|c| {
            c != id
                && self.peers.get(&c).is_some_and(|s| {
                    s.media == MediaState::Receiving
                        && s.reported_at.is_some_and(|t| t >= stalled_since)
                        && s.linked_at
                            .is_some_and(|t| now.saturating_sub(t) >= self.config.settle_window)
                })
        });
        let stalled_children = {
            let p = self.peers.get_mut(&parent).expect("a known peer");
            p.stalled_children
                .retain(|&(c, t)| c != id && now.saturating_sub(t) < STALL_WINDOW);
            p.stalled_children.push((id, now));
            p.stalled_children.len()
        };
        if delivering {
            // A lone staller: moved (its link to this parent may be bad) once the stall has
            // lasted, never held against the parent.
            if now.saturating_sub(stalled_since) >= self.config.settle_window {
                self.move_stalled(id);
            }
            return;
        }
        // Nothing shows the parent delivers and it has gone quiet too: it is likely dead or
        // frozen with its socket still open. Once a second child says so (or it has only
        // this one), its prepared stand-in takes its place over links set up in advance,
        // and it moves down as a leaf. A busy machine starves pages' timers and makes a
        // live relay look quiet, so one child's word is not enough: until a sibling
        // speaks (its stall, or its `receiving`, which clears the parent) or the stall has
        // lasted the settle window, this report only waits. If the relay was alive after
        // all, every one of these moves is make-before-break, so nobody sees a gap.
        // A relay heard from only before this stall was reported has not shown it is alive:
        // one that crashed right after a report looks so until QUIET_PARENT has passed,
        // and its socket may close only after its children's watchdogs fired (a loaded
        // machine). Moving this child at once would scatter the orphans wherever a slot is
        // free instead of under the stand-in prepared for them, so with a stand-in the
        // report waits; the repeated one (every 2 s) finds the relay quiet if it died, or
        // heard from since, and then this child moves alone.
        let quiet = now.saturating_sub(self.peers[&parent].last_seen) >= QUIET_PARENT;
        if self.standbys.contains_key(&parent) {
            let corroborated = stalled_children >= 2 || self.tree.child_count(parent) == Some(1);
            if quiet && corroborated && self.promote_stand_in(parent) {
                return;
            }
            if quiet
                && !corroborated
                && now.saturating_sub(stalled_since) < self.config.settle_window
            {
                return;
            }
            if !quiet && self.peers[&parent].last_seen < stalled_since {
                return;
            }
        }
        // One child's word does not lower a capacity, but until the parent shows it is
        // alive the slot this move frees is not handed to a newcomer (held before the move,
        // which places waiting peers).
        let was_held = self.peers[&parent].suspect_since.is_some();
        let _ = self.tree.set_held(parent, true);
        if !self.move_stalled(id) {
            if !was_held {
                let _ = self.tree.set_held(parent, false);
            }
            return; // nowhere else to go; the repeated report tries again
        }
        self.peers
            .get_mut(&parent)
            .expect("a known peer")
            .suspect_since = Some(now);
        self.arm(now + SUSPECT_HOLD, Timer::Suspect(parent));
        // Only two children failed by a parent that receives itself convict its uplink.
        if stalled_children >= 2 && parent_receives {
            let children = self.tree.child_count(parent).unwrap_or(0);
            self.lower_capacity(parent, children);
        }
    }

    /// A relay its children say stopped delivering: its warm-standby stand-in takes its
    /// place (the repair a departure would get, on the links prepared for it) and the
    /// relay is placed again without children, its free slots held until it is heard from
    /// ([`SUSPECT_HOLD`]). False, and nothing changes, without a stand-in that fits.
    fn promote_stand_in(&mut self, relay: PeerId) -> bool {
        let Some(stand_in) = self.standbys.get(&relay).map(|s| s.stand_in) else {
            return false;
        };
        if !self.tree.demote(relay, stand_in).unwrap_or(false) {
            return false;
        }
        self.touch_standby(relay);
        let _ = self.tree.set_held(relay, true);
        self.peers
            .get_mut(&relay)
            .expect("a known peer")
            .suspect_since = Some(self.now);
        self.arm(self.now + SUSPECT_HOLD, Timer::Suspect(relay));
        let subtrees = self.tree.child_count(stand_in).unwrap_or(0);
        self.event(RoomEvent::Repaired {
            subtrees,
            cause: RepairCause::ParentStalled,
        });
        self.flush_tree_events(None);
        true
    }

    /// Moves a stalled peer (with its subtree) away from its parent, if a slot is free
    /// elsewhere. Returns whether it moved; if not, nothing happened and nobody is told.
    fn move_stalled(&mut self, id: PeerId) -> bool {
        if !self.tree.reparent(id).unwrap_or(false) {
            return false;
        }
        self.event(RoomEvent::Repaired {
            subtrees: 1,
            cause: RepairCause::ParentStalled,
        });
        self.flush_tree_events(None);
        true
    }

    /// The peer's NAT class: links it cannot make directly move to a parent or children
    /// it can reach, when any is free; a peer only TURN reaches becomes a leaf.
    fn on_connectivity(&mut self, id: PeerId, c: Connectivity) {
        let peer = self
            .peers
            .get_mut(&id)
            .expect("bound connections map to peers");
        let changed = peer.nat != c.nat;
        peer.nat = c.nat;
        if !changed {
            return;
        }
        self.event(RoomEvent::Connectivity {
            peer: id,
            nat: c.nat,
        });
        let _ = self.tree.set_nat(id, c.nat);
        self.touch_standby(id);
        self.set_capacity_from_uplink(id);
        // Last, so the status tells the capacity and position after both changes.
        self.flush_tree_events(Some(id));
        self.issue_claim(id);
    }

    /// ICE from `id` to `peer` failed. Only a child's report about its current parent acts:
    /// the parent's side sees the same failure and says nothing, so one failure is one move.
    fn on_link_failed(&mut self, conn: ConnId, id: PeerId, peer: PeerId) {
        if !self.peers.contains_key(&peer) {
            return self.refuse(conn, ErrorCode::UnknownPeer, false);
        }
        if self.tree.parent(id) != Some(peer) {
            if !self.tree.are_neighbours(id, peer) {
                self.refuse(conn, ErrorCode::NotNeighbour, false);
            }
            return;
        }
        self.event(RoomEvent::LinkFailed {
            child: id,
            parent: peer,
        });
        // Never offered again, either way round; the child moves with its subtree.
        let _ = self.tree.link_failed(id, peer);
        self.event(RoomEvent::Repaired {
            subtrees: 1,
            cause: RepairCause::LinkFailed,
        });
        self.flush_tree_events(None);
    }

    fn on_disconnect(&mut self, conn: ConnId) {
        if self.restoring.is_some() {
            return self.restoring_disconnect(conn);
        }
        let Some(id) = self.conns.remove(&conn) else {
            return;
        };
        let grace = self.config.resume_grace;
        let peer = self
            .peers
            .get_mut(&id)
            .expect("bound connections map to peers");
        peer.conn = None;
        if peer.departure.is_some() {
            // It left already; without its connection it cannot be told when to stop
            // feeding, so its children stop relying on it now.
            return self.finish_departure(id);
        }
        peer.disconnected_at = Some(self.now);
        self.event(RoomEvent::Disconnected { peer: id });
        // Without signalling it cannot prepare links: another stand-in may be needed.
        self.touch_standby(id);
        if Some(id) == self.broadcaster {
            self.announce(None);
        }
        // A killed relay's socket closes with it: tell its children now, so they report a
        // stall as soon as its media stops instead of waiting out their watchdog. If it was
        // only a blip, media keeps flowing and they do nothing.
        let children: Vec<PeerId> = self.tree.children(id).collect();
        for child in children {
            self.send_to_peer(child, ServerMessage::ParentDisconnected { parent: id });
        }
        if grace.is_zero() {
            self.lose(id);
        } else {
            self.arm(self.now + grace, Timer::Grace(id));
        }
    }

    fn on_tick(&mut self) {
        while let Some(&Reverse((at, timer))) = self.timers.peek() {
            if at > self.now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Liveness(id) => self.check_liveness(id),
                Timer::Grace(id) => {
                    let expired = self.peers.get(&id).and_then(|p| p.disconnected_at);
                    if expired.is_some_and(|t| t + self.config.resume_grace <= self.now) {
                        self.lose(id);
                    }
                }
                Timer::Audience => self.tell_audience(),
                Timer::Rebalance => self.rebalance(),
                Timer::Standby => {
                    self.standby_due = false;
                    self.refresh_standbys();
                }
                Timer::Credentials(id) => self.renew_credentials(id),
                Timer::CapRaise(id) => self.raise_capacity(id),
                Timer::Suspect(id) => {
                    // Not while its socket is closed: a crashed relay's slots would catch
                    // newcomers until its grace ran out. Its first message after a resume
                    // releases them.
                    let due = self
                        .peers
                        .get(&id)
                        .filter(|p| p.conn.is_some())
                        .and_then(|p| p.suspect_since);
                    if due.is_some_and(|t| t + SUSPECT_HOLD <= self.now) {
                        self.peers.get_mut(&id).expect("a known peer").suspect_since = None;
                        let _ = self.tree.set_held(id, false);
                        self.flush_tree_events(None);
                    }
                }
                Timer::Handover(id) => {
                    if self.handovers.get(&id).is_some_and(|h| h.until <= self.now) {
                        self.finish_handover(id);
                        self.finish_delivered_handovers();
                    }
                }
                Timer::Claims => self.renew_claims(),
                Timer::Restore => self.check_restore(),
                Timer::Start => {
                    if self.restoring.is_some() {
                        // The rebuild ends with a broadcaster or ends the room.
                        continue;
                    }
                    if self.broadcaster.is_none() && self.ended.is_none() {
                        self.end(EndReason::Expired);
                    }
                }
            }
        }
    }

    /// Sends a connected peer fresh TURN credentials. A disconnected one gets them in the
    /// `welcome` of its resume; a departed one is gone.
    fn renew_credentials(&mut self, id: PeerId) {
        let Some(peer) = self.peers.get(&id).filter(|p| p.departure.is_none()) else {
            return;
        };
        let (Some(conn), Some(due)) = (peer.conn, peer.renew_at) else {
            return;
        };
        if due > self.now {
            return; // a resume re-minted them since this timer was armed
        }
        let ice_servers = self.ice_servers_for(id);
        self.send(conn, ServerMessage::IceServers { ice_servers });
    }

    fn check_liveness(&mut self, id: PeerId) {
        let Some(timeout) = self.config.heartbeat_timeout else {
            return;
        };
        let Some(peer) = self.peers.get(&id) else {
            return;
        };
        let Some(conn) = peer.conn else {
            return; // already disconnected; the grace timer owns it now
        };
        if peer.departure.is_some() {
            return; // it left; its handovers bound how long it stays
        }
        let deadline = peer.last_seen + timeout;
        if deadline > self.now {
            self.arm(deadline, Timer::Liveness(id));
            return;
        }
        self.refuse(conn, ErrorCode::Timeout, true);
        self.on_disconnect(conn);
    }

    /// The grace period ran out (or was zero): the peer is gone for good.
    fn lose(&mut self, id: PeerId) {
        if Some(id) == self.broadcaster {
            self.end(EndReason::BroadcasterLost);
        } else {
            self.remove_peer(id, LeaveCause::Lost);
        }
    }

    // ---- tree changes ----

    fn remove_peer(&mut self, id: PeerId, cause: LeaveCause) {
        let Some(peer) = self.peers.remove(&id) else {
            return;
        };
        if let Some(conn) = peer.conn {
            self.conns.remove(&conn);
        }
        self.resumes.remove(&peer.resume);
        if self.broadcaster == Some(id) {
            self.broadcaster = None;
        }
        // Handovers it was part of end with it: a departed old parent feeds nobody, and a
        // departed child needs no feeding.
        let mut ended = !peer.handing_over.is_empty();
        if self.handovers.contains_key(&id) {
            self.finish_handover(id);
            ended = true;
        }
        self.stop_feeding(id, peer.handing_over);
        if ended {
            // Handovers below that waited for this one may end now.
            self.finish_delivered_handovers();
        }
        let orphans = self.tree.child_count(id).unwrap_or(0);
        self.churned = self.churned.saturating_add(1);
        self.remove_from_tree(id);
        self.event(RoomEvent::Left { peer: id, cause });
        if orphans > 0 {
            self.event(RoomEvent::Repaired {
                subtrees: orphans,
                cause: RepairCause::ParentLeft,
            });
        }
        self.flush_tree_events(None);
    }

    /// Capacity from the peer's uplink, under any ceiling its children's reports set.
    fn target_capacity(&self, id: PeerId) -> u32 {
        let Some(peer) = self.peers.get(&id) else {
            return 0;
        };
        if peer.role == Role::Viewer && peer.nat == NatClass::Blocked {
            // Only TURN reaches it: feeding children would put them all on the relay.
            return 0;
        }
        let by_uplink = self.config.capacity(peer.role, peer.uplink_kbps);
        peer.capacity_cap
            .map_or(by_uplink, |cap| by_uplink.min(cap))
    }

    fn set_capacity_from_uplink(&mut self, id: PeerId) {
        let capacity = self.target_capacity(id);
        self.apply_capacity(id, capacity);
    }

    /// Sets a ceiling on the peer's capacity (never raises it). A new or lower ceiling is a
    /// strike: it holds for a time that grows with the strikes, then rises one by one.
    fn lower_capacity(&mut self, id: PeerId, capacity: u32) {
        let now = self.now;
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        if peer.capacity_cap.is_some_and(|c| c <= capacity) {
            return; // the ceiling already holds it there; its timer runs on
        }
        peer.capacity_cap = Some(capacity);
        peer.cap_strikes = peer.cap_strikes.saturating_add(1);
        let at = now + cap_hold(peer.cap_strikes);
        peer.cap_raise_at = Some(at);
        self.arm(at, Timer::CapRaise(id));
        if self.tree.capacity_goal(id).is_some_and(|c| capacity < c) {
            self.apply_capacity(id, capacity);
        }
    }

    /// The hold ran out: the ceiling rises by one (placing waiting peers under the peer if
    /// that frees a slot), or goes once it no longer limits the uplink's capacity.
    fn raise_capacity(&mut self, id: PeerId) {
        let Some(peer) = self.peers.get(&id).filter(|p| p.departure.is_none()) else {
            return;
        };
        let (Some(cap), Some(due)) = (peer.capacity_cap, peer.cap_raise_at) else {
            return;
        };
        if due > self.now {
            return; // a later strike re-armed it
        }
        let by_uplink = self.config.capacity(peer.role, peer.uplink_kbps);
        let hold = cap_hold(peer.cap_strikes);
        let next = cap + 1;
        let peer = self.peers.get_mut(&id).expect("looked up above");
        if next >= by_uplink {
            peer.capacity_cap = None;
            peer.cap_raise_at = None;
        } else {
            peer.capacity_cap = Some(next);
            peer.cap_raise_at = Some(self.now + hold);
            self.arm(self.now + hold, Timer::CapRaise(id));
        }
        self.set_capacity_from_uplink(id);
    }

    fn apply_capacity(&mut self, id: PeerId, capacity: u32) {
        let before = self.tree.child_count(id).unwrap_or(0);
        if self.tree.capacity_goal(id) == Some(capacity) {
            return;
        }
        if self.tree.is_shedding(id)
            && self
                .tree
                .capacity_goal(id)
                .is_some_and(|goal| capacity > goal)
        {
            // Raised while it sheds after a lower fan-out: it keeps shedding gently,
            // towards the new goal (or stops, if it is already there).
            let _ = self.tree.limit_capacity(id, capacity);
            self.touch_standby(id);
            self.event(RoomEvent::Capacity { peer: id, capacity });
            self.flush_tree_events(None);
            return;
        }
        let _ = self.tree.set_capacity(id, capacity);
        self.touch_standby(id);
        self.event(RoomEvent::Capacity { peer: id, capacity });
        let shed = before.saturating_sub(capacity);
        if shed > 0 {
            self.event(RoomEvent::Repaired {
                subtrees: shed,
                cause: RepairCause::ParentCapacity,
            });
        }
        self.flush_tree_events(None);
    }

    /// Turns tree events into messages for the peers involved. Status updates (for peers
    /// whose depth changed or who wait, and for `also_tell`) go last, so they describe the
    /// tree after every `parent`/`child`/`drop` of the batch.
    fn flush_tree_events(&mut self, also_tell: Option<PeerId>) {
        // Scratch buffers live in the room: this runs on every operation.
        let mut events = std::mem::take(&mut self.scratch_events);
        let mut status = std::mem::take(&mut self.scratch_status);
        events.clear();
        events.extend(self.tree.drain_events().map(|e| (e, false)));
        status.clear();
        status.extend(also_tell);
        mark_unchanged_edges(&mut events);
        for &(e, unchanged) in &events {
            self.event(RoomEvent::Tree(e));
            if self.config.warm_standby {
                match e {
                    TreeEvent::Linked { parent, child, .. }
                    | TreeEvent::Unlinked { parent, child } => {
                        self.standby_dirty.extend([parent, child]);
                    }
                    TreeEvent::DepthChanged { peer, .. } | TreeEvent::Waiting { peer } => {
                        self.standby_dirty.push(peer);
                    }
                }
            }
            if unchanged {
                continue;
            }
            match e {
                TreeEvent::Linked {
                    parent,
                    child,
                    depth,
                } => {
                    if self.handovers.get(&child).is_some_and(|h| h.from == parent) {
                        // Back to the parent it was leaving: that link is dropped first
                        // and made afresh, so both ends start from a clean connection.
                        self.finish_handover(child);
                    }
                    if self.handovers.get(&parent).is_some_and(|h| h.from == child) {
                        // The pair swapped roles in a later batch than the one that
                        // began the handover: the old link goes before the new one is
                        // announced, or the `drop` naming the other end would be read
                        // as the new link's.
                        self.finish_handover(parent);
                    }
                    if let Some(c) = self.peers.get_mut(&child) {
                        c.linked_at = Some(self.now);
                        // What it said about its old parent does not hold for this one.
                        c.media = MediaState::Connecting;
                        c.stalled_since = None;
                    }
                    // A standby link between them (either way round) is theirs now: the
                    // clients use it, or close it and connect afresh.
                    if !self.standby_links.is_empty() {
                        self.standby_links.remove(&(parent, child));
                        self.standby_links.remove(&(child, parent));
                    }
                    self.send_to_peer(
                        child,
                        ServerMessage::Parent {
                            peer_id: parent,
                            depth,
                        },
                    );
                    self.send_to_peer(parent, ServerMessage::Child { peer_id: child });
                    self.issue_claim(child);
                }
                TreeEvent::Unlinked { parent, child }
                    if self
                        .peers
                        .get(&child)
                        .is_some_and(|c| c.departure.is_some()) =>
                {
                    self.keep_upstream(child, parent);
                }
                TreeEvent::Unlinked { parent, child } => {
                    // A pair that swapped roles (the old parent is now the child's child)
                    // cannot keep the old link: clients hold one connection per neighbour,
                    // and a `drop` naming the other would be read as the new link's.
                    if !self.config.handover_timeout.is_zero()
                        && self.peers.contains_key(&parent)
                        && self.peers.contains_key(&child)
                        && self.tree.parent(parent) != Some(child)
                    {
                        self.begin_handover(child, parent);
                    } else {
                        self.send_to_peer(parent, ServerMessage::Drop { peer_id: child });
                        self.send_to_peer(child, ServerMessage::Drop { peer_id: parent });
                    }
                }
                TreeEvent::DepthChanged { peer, .. } => status.push(peer),
                TreeEvent::Waiting { peer } => {
                    status.push(peer);
                    self.issue_claim(peer);
                }
            }
        }
        status.sort_unstable();
        status.dedup();
        for &peer in &status {
            self.send_status(peer);
        }
        self.scratch_events = events;
        self.scratch_status = status;
        self.arm_standby();
    }

    // ---- warm standby ----

    /// Takes `id` out of the tree, its prepared stand-in (if any, and if it still fits)
    /// taking its place.
    fn remove_from_tree(&mut self, id: PeerId) {
        let stand_in = self.standbys.get(&id).map(|s| s.stand_in);
        let _ = self.tree.remove_preferring(id, stand_in);
        self.touch_standby(id);
    }

    /// `id`'s standby arrangements (as a relay or a stand-in) are looked at again soon.
    fn touch_standby(&mut self, id: PeerId) {
        self.standby_dirty.push(id);
        self.arm_standby();
    }

    fn arm_standby(&mut self) {
        if !self.standby_dirty.is_empty() && !self.standby_due {
            self.standby_due = true;
            self.arm(self.now + STANDBY_EVERY, Timer::Standby);
        }
    }

    /// Whether `a` and `b` hold a standby link the room asked for.
    fn standby_link(&self, a: PeerId, b: PeerId) -> bool {
        self.standby_links.contains_key(&(a, b)) || self.standby_links.contains_key(&(b, a))
    }

    /// Whether a media link (tree edge, handover or lingering departure) joins `a` and `b`.
    fn media_link(&self, a: PeerId, b: PeerId) -> bool {
        let handover = |x: PeerId, y: PeerId| self.handovers.get(&x).is_some_and(|h| h.from == y);
        self.tree.are_neighbours(a, b)
            || handover(a, b)
            || handover(b, a)
            || self.lingering_link(a, b)
    }

    /// A peer that can prepare standby links: in the room, connected, not leaving.
    fn can_hold_standby(&self, id: PeerId) -> bool {
        self.peers
            .get(&id)
            .is_some_and(|p| p.conn.is_some() && p.departure.is_none())
    }

    /// Looks again at the standby of every relay touched since the last refresh: keeps the
    /// stand-in while it still fits, otherwise picks another, and tells both ends of each
    /// link that appears or goes. A link that became a media link (the stand-in took its
    /// place, or a move made them neighbours) is forgotten silently: both ends already
    /// use it.
    fn refresh_standbys(&mut self) {
        if self.standby_dirty.is_empty() {
            return;
        }
        let mut dirty = std::mem::take(&mut self.standby_dirty);
        // A stand-in that moved, grew or left may no longer fit its relay.
        let relays: Vec<PeerId> = dirty
            .iter()
            .filter_map(|x| self.stands_for.get(x).copied())
            .collect();
        dirty.extend(relays);
        dirty.sort_unstable();
        dirty.dedup();
        for &relay in &dirty {
            self.refresh_standby(relay);
        }
        dirty.clear();
        // Telling peers never changes the tree, so nothing new is dirty; keep the buffer.
        if self.standby_dirty.is_empty() {
            self.standby_dirty = dirty;
        }
    }

    fn refresh_standby(&mut self, relay: PeerId) {
        let usable = |room: &Self, s: PeerId| {
            room.can_hold_standby(s)
                && room
                    .stands_for
                    .get(&s)
                    .is_none_or(|&r| r == relay || !room.standbys.contains_key(&r))
        };
        // The relay itself holds none of the links: whether its own signalling is up does
        // not matter (a relay whose socket just closed is the one most likely to need them).
        let wanted = if self.config.warm_standby && self.tree.child_count(relay).unwrap_or(0) > 0 {
            let current = self.standbys.get(&relay).map(|s| s.stand_in);
            current
                .filter(|&s| usable(self, s) && self.tree.can_stand_in(s, relay))
                .or_else(|| self.tree.stand_in_for(relay, |x| !usable(self, x)))
        } else {
            None
        };
        let mut links = Vec::new();
        if let Some(s) = wanted {
            let parent = self
                .tree
                .parent(relay)
                .expect("relays with a stand-in are attached");
            links.push((parent, s));
            // Children the stand-in cannot reach directly are placed elsewhere by the
            // repair: a link to them would never carry media.
            links.extend(
                self.tree
                    .children(relay)
                    .filter(|&c| c != s && self.tree.is_direct(c, s))
                    .map(|c| (s, c)),
            );
            // A pair holds one connection: not one that already carries media, nor one
            // another relay's standby holds the other way round.
            links.retain(|&(a, b)| {
                !self.media_link(a, b) && !self.standby_links.contains_key(&(b, a))
            });
        }
        let mut old = match self.standbys.remove(&relay) {
            Some(old) => {
                if self.stands_for.get(&old.stand_in) == Some(&relay) {
                    self.stands_for.remove(&old.stand_in);
                }
                old.links
            }
            None => Vec::new(),
        };
        // Links a `parent`/`child` consumed since are the clients' media links (or gone).
        old.retain(|l| self.standby_links.contains_key(l));
        for &(up, down) in &old {
            if links.contains(&(up, down)) {
                continue;
            }
            let users = self
                .standby_links
                .get_mut(&(up, down))
                .expect("told links are counted");
            *users -= 1;
            if *users > 0 {
                continue;
            }
            self.standby_links.remove(&(up, down));
            self.send_to_peer(up, ServerMessage::StandbyEnd { peer_id: down });
            self.send_to_peer(down, ServerMessage::StandbyEnd { peer_id: up });
        }
        for &(up, down) in &links {
            if old.contains(&(up, down)) {
                continue;
            }
            let users = self.standby_links.entry((up, down)).or_insert(0);
            *users += 1;
            if *users == 1 {
                self.send_to_peer(
                    up,
                    ServerMessage::Standby {
                        peer_id: down,
                        role: StandbyRole::Child,
                    },
                );
                self.send_to_peer(
                    down,
                    ServerMessage::Standby {
                        peer_id: up,
                        role: StandbyRole::Parent,
                    },
                );
            }
        }
        if let Some(stand_in) = wanted {
            self.stands_for.insert(stand_in, relay);
            self.standbys.insert(relay, Standby { stand_in, links });
        }
    }

    /// `child` left `from`, both still in the room: `from` keeps feeding it until it
    /// reports media from its new parent, or `handover_timeout` passes. Neither end is
    /// told `drop` until then; the child gets `parent` for its new parent as usual and
    /// keeps the old connection meanwhile. Slot accounting follows the tree at once: for
    /// those seconds the old parent feeds one child more than its capacity says.
    fn begin_handover(&mut self, child: PeerId, from: PeerId) {
        if self.handovers.contains_key(&child) {
            // Moved again before the previous move delivered: `from` never fed it, so
            // that link goes now, and the parent it had before keeps feeding it.
            self.send_to_peer(from, ServerMessage::Drop { peer_id: child });
            self.send_to_peer(child, ServerMessage::Drop { peer_id: from });
            return;
        }
        let until = self.now + self.config.handover_timeout;
        self.handovers.insert(
            child,
            Handover {
                from,
                until,
                connecting: false,
                delivered: false,
            },
        );
        if let Some(p) = self.peers.get_mut(&from) {
            p.handing_over.push(child);
        }
        self.arm(until, Timer::Handover(child));
    }

    /// Ends the handovers whose peers reported media from their new parent, top-down: a
    /// peer keeps its old link while any peer above it is still switching, because until
    /// then its new parent may be relaying what arrives over an old link, and after a
    /// swap that link can run through the peer itself (media going round in a loop with
    /// nothing feeding it once the peer let go of its old parent).
    fn finish_delivered_handovers(&mut self) {
        while !self.handovers.is_empty() {
            let next = self
                .handovers
                .iter()
                .filter(|(_, h)| h.delivered)
                .map(|(&c, _)| c)
                .filter(|&c| !self.switching_above(c))
                .min();
            match next {
                Some(child) => self.finish_handover(child),
                None => return,
            }
        }
    }

    /// Whether a peer above `peer` in the tree is between two parents. O(depth).
    fn switching_above(&self, peer: PeerId) -> bool {
        let mut up = self.tree.parent(peer);
        while let Some(p) = up {
            if self.handovers.contains_key(&p) {
                return true;
            }
            up = self.tree.parent(p);
        }
        false
    }

    /// Ends `child`'s handover: both ends of the old link get `drop`.
    fn finish_handover(&mut self, child: PeerId) {
        let Some(h) = self.handovers.remove(&child) else {
            return;
        };
        let mut departed = false;
        if let Some(p) = self.peers.get_mut(&h.from) {
            p.handing_over.retain(|&c| c != child);
            departed = p.departure.is_some() && p.handing_over.is_empty();
        }
        self.send_to_peer(h.from, ServerMessage::Drop { peer_id: child });
        self.send_to_peer(child, ServerMessage::Drop { peer_id: h.from });
        if departed {
            // Its last former child has a new parent delivering: the lingering relay goes.
            self.finish_departure(h.from);
        }
    }

    fn status(&self, id: PeerId) -> ServerMessage {
        let mut children: Vec<PeerId> = self.tree.children(id).collect();
        // Children it still feeds during their handover stay on its list: the client
        // closes connections to peers missing from it.
        if let Some(p) = self.peers.get(&id) {
            children.extend(&p.handing_over);
        }
        children.sort_unstable();
        ServerMessage::Room {
            viewers: self.viewers(),
            live: self.is_live(),
            depth: self.tree.depth(id),
            parent: self.tree.parent(id),
            children,
            capacity: self.tree.capacity(id).unwrap_or(0),
            waiting: self.tree.wait_reason(id),
        }
    }

    fn send_status(&mut self, id: PeerId) {
        if self.peers.get(&id).is_some_and(|p| p.departure.is_none()) {
            let msg = self.status(id);
            self.send_to_peer(id, msg);
        }
    }

    fn tell_audience(&mut self) {
        if let Some(every) = self.config.audience_interval {
            self.arm(self.now + every, Timer::Audience);
        }
        self.announce(None);
    }

    /// Sends everyone connected (but `told`, who just got one) a fresh status if the
    /// audience size or liveness changed since the last time. O(N): called on a timer and
    /// when the broadcaster comes or goes.
    fn announce(&mut self, told: Option<PeerId>) {
        let now = (self.viewers(), self.is_live());
        if now == self.told || self.ended.is_some() {
            return;
        }
        self.told = now;
        let mut ids: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|&(&id, p)| p.conn.is_some() && p.departure.is_none() && Some(id) != told)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable(); // deterministic output order for simulations
        for id in ids {
            self.send_status(id);
        }
    }

    fn end(&mut self, reason: EndReason) {
        if self.ended.is_some() {
            return;
        }
        self.ended = Some(reason);
        let mut ids: Vec<PeerId> = self.peers.keys().copied().collect();
        ids.sort_unstable();
        for id in &ids {
            if let Some(conn) = self.peers[id].conn {
                self.send(conn, ServerMessage::Ended { reason });
                self.outputs.push_back(Output::Close { conn });
            }
        }
        for id in ids {
            if let Some(peer) = self.peers.remove(&id) {
                if peer.departure.is_none() {
                    // Departing relays were counted as gone when they left.
                    self.event(RoomEvent::Left {
                        peer: id,
                        cause: LeaveCause::RoomEnded,
                    });
                }
            }
        }
        self.conns.clear();
        self.resumes.clear();
        self.handovers.clear();
        self.departing = 0;
        self.broadcaster = None;
        self.tree = RelayTree::new(self.config.max_depth);
        self.timers.clear();
        self.event(RoomEvent::Ended { reason });
    }

    // ---- plumbing ----

    fn arm(&mut self, at: Duration, timer: Timer) {
        self.timers.push(Reverse((at, timer)));
    }

    fn arm_liveness(&mut self, id: PeerId) {
        if let Some(timeout) = self.config.heartbeat_timeout {
            self.arm(self.now + timeout, Timer::Liveness(id));
        }
    }

    fn send(&mut self, conn: ConnId, msg: ServerMessage) {
        self.outputs.push_back(Output::Send { conn, msg });
    }

    /// Sends to a peer's connection, or holds the message while it is disconnected.
    fn send_to_peer(&mut self, id: PeerId, msg: ServerMessage) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        match peer.conn {
            Some(conn) => self.outputs.push_back(Output::Send { conn, msg }),
            None if peer.pending.len() < self.config.max_pending as usize => peer.pending.push(msg),
            None if Some(id) == self.broadcaster => self.end(EndReason::BroadcasterLost),
            None => self.remove_peer(id, LeaveCause::Overflow),
        }
    }

    fn refuse(&mut self, conn: ConnId, code: ErrorCode, close: bool) {
        self.send(conn, ServerMessage::error(code));
        self.event(RoomEvent::Refused { code });
        if close {
            self.outputs.push_back(Output::Close { conn });
        }
    }

    fn refuse_with(&mut self, conn: ConnId, code: ErrorCode, message: &str) {
        self.send(conn, ServerMessage::error_with(code, message));
        self.event(RoomEvent::Refused { code });
    }

    fn event(&mut self, e: RoomEvent) {
        self.outputs.push_back(Output::Event(e));
    }
}

/// How long a ceiling holds after its `strikes`-th strike: [`CAP_HOLD`], doubled per
/// further strike, at most [`CAP_HOLD_MAX`].
fn cap_hold(strikes: u32) -> Duration {
    let doublings = strikes.saturating_sub(1).min(16);
    (CAP_HOLD * (1u32 << doublings)).min(CAP_HOLD_MAX)
}

/// Marks the events of one batch that change no edge, so nobody is told about them. Per
/// edge only the net change counts: cut and re-made (a sibling standing in for its
/// departed neighbour keeps its parent) is no change, and neither is a link made and cut
/// again within the batch (a subtree a rebalance moved through a place on its way to
/// another): announcing that would have the client switch to a parent that never feeds
/// it. An edge that existed before and not after keeps its first cut, one that exists
/// only after keeps its last link. Batches usually hold a handful of events, where
/// scanning beats hashing; large ones (a subtree cut at the depth limit) use a map.
fn mark_unchanged_edges(events: &mut [(TreeEvent, bool)]) {
    if events.len() > 64 {
        let mut chains: FxHashMap<(PeerId, PeerId), Vec<usize>> = FxHashMap::default();
        for (i, (e, _)) in events.iter().enumerate() {
            if let Some((edge, _)) = edge_of(e) {
                chains.entry(edge).or_default().push(i);
            }
        }
        for chain in chains.values() {
            mark_chain(events, chain);
        }
        return;
    }
    let mut chain = [0usize; 64];
    for i in 0..events.len() {
        let Some((edge, _)) = edge_of(&events[i].0) else {
            continue;
        };
        if events[..i]
            .iter()
            .any(|(e, _)| edge_of(e).is_some_and(|(other, _)| other == edge))
        {
            continue; // part of the chain that starts earlier
        }
        let mut len = 0;
        for (j, (e, _)) in events.iter().enumerate().skip(i) {
            if edge_of(e).is_some_and(|(other, _)| other == edge) {
                chain[len] = j;
                len += 1;
            }
        }
        mark_chain(events, &chain[..len]);
    }
}

/// The (parent, child) edge an event links (`true`) or cuts (`false`).
fn edge_of(e: &TreeEvent) -> Option<((PeerId, PeerId), bool)> {
    match *e {
        TreeEvent::Linked { parent, child, .. } => Some(((parent, child), true)),
        TreeEvent::Unlinked { parent, child } => Some(((parent, child), false)),
        _ => None,
    }
}

/// Marks one edge's events of a batch (in order) unchanged but for its net change.
fn mark_chain(events: &mut [(TreeEvent, bool)], chain: &[usize]) {
    let (Some(&first), Some(&last)) = (chain.first(), chain.last()) else {
        return;
    };
    let existed = edge_of(&events[first].0).is_some_and(|(_, linked)| !linked);
    let exists = edge_of(&events[last].0).is_some_and(|(_, linked)| linked);
    for &i in chain {
        events[i].1 = true;
    }
    match (existed, exists) {
        (true, false) => events[first].1 = false,
        (false, true) => events[last].1 = false,
        _ => {}
    }
}

/// A resume token as the room issues it: 32 lowercase hex digits, as `{:032x}` would print
/// them, without the formatting machinery (this runs on every join; at 10^6 joins the
/// formatter took a few percent of a simulation).
fn hex32(value: u128) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    for (i, digit) in out.iter_mut().rev().enumerate() {
        *digit = DIGITS[(value >> (4 * i)) as usize & 0xf];
    }
    String::from_utf8(out.to_vec()).expect("hex digits are ASCII")
}

/// A resume token as the room issued it (32 hex digits), or None.
fn parse_resume(token: &str) -> Option<u128> {
    if token.len() != 32 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(token, 16).ok()
}

/// Compares a presented token with the room's without an early exit on the first
/// differing byte, so response timing does not reveal how much of a guess was right.
fn constant_time_eq(presented: Option<&str>, expected: &str) -> bool {
    let Some(presented) = presented else {
        return false;
    };
    let (a, b) = (presented.as_bytes(), expected.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(events: &[TreeEvent]) -> Vec<bool> {
        let mut marked: Vec<(TreeEvent, bool)> = events.iter().map(|&e| (e, false)).collect();
        mark_unchanged_edges(&mut marked);
        marked.into_iter().map(|(_, f)| f).collect()
    }

    #[test]
    fn resume_tokens_print_like_the_formatter() {
        for v in [
            0,
            1,
            0xabc,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ] {
            assert_eq!(hex32(v), format!("{v:032x}"));
            assert_eq!(parse_resume(&hex32(v)), Some(v));
        }
    }

    #[test]
    fn both_scans_find_the_same_unchanged_edges() {
        let (p, c, d) = (PeerId(1), PeerId(2), PeerId(3));
        let batch = [
            TreeEvent::Linked {
                parent: p,
                child: d,
                depth: 1,
            },
            TreeEvent::Unlinked {
                parent: p,
                child: c,
            },
            TreeEvent::Unlinked {
                parent: p,
                child: d,
            },
            TreeEvent::Linked {
                parent: p,
                child: c,
                depth: 1,
            },
            TreeEvent::Linked {
                parent: c,
                child: d,
                depth: 2,
            },
        ];
        // p-c is cut and re-made, p-d made and cut again: neither changed. Only c-d is new.
        let expected = [true, true, true, true, false];
        assert_eq!(flags(&batch), expected);
        let mut large = batch.to_vec();
        large.extend((0..70).map(|i| TreeEvent::DepthChanged {
            peer: PeerId(100 + i),
            depth: 3,
        }));
        assert_eq!(&flags(&large)[..5], expected, "the map-based scan agrees");
    }
}
