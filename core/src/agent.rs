//! A peer's side of treecast, sans-IO: what a browser (or native) client does with the
//! signaller's messages and with what its media connections report.
//!
//! The [`Agent`] owns no socket, no `RTCPeerConnection` and no clock. Its driver (the
//! wasm client in the browser, the simulator in tests) repeats:
//!
//! 1. feed an [`Input`] with the current time: `agent.handle(now, input)` — the WebSocket
//!    opened or closed, a text frame from the signaller, media progress counters from the
//!    connection to the parent, per-child delivery measurements, a signal the page wants to
//!    send to a neighbour, or `leave`;
//! 2. call `agent.handle_timeout(now)` when `agent.poll_timeout()` is due;
//! 3. drain [`Action`]s with `agent.poll_action()` and carry them out in order: open or close
//!    the WebSocket, send a text frame, open a receiving connection to the parent or a
//!    sending connection to a child, close a connection, hand signalling data to a
//!    connection, take a media sample of the parent's connection now and feed it as
//!    [`Input::MediaProgress`] ([`Action::SampleMedia`]), show a new [`Status`].
//!
//! Besides answering `SampleMedia`, the driver samples the parent's connection on its own
//! clock (the page every 200 ms, the native peer every 50 ms); the watchdog relies on
//! those samples and only asks for one when a deadline passes.
//!
//! What it decides:
//! - **Tree links.** `parent`, `child` and `drop` open and close media connections, once per
//!   neighbour (a repeated `parent`/`child` keeps the connection). A new parent replaces the
//!   receiving connection only: sending connections to children stay up, and the driver swaps
//!   the tracks they send (`replaceTrack`), so the subtree below does not renegotiate.
//! - **Stall watchdog.** Media counters from the parent must advance: video frames
//!   received when the stream has video (a relay whose parent died keeps sending
//!   decoder-generated audio, so bytes alone would hide the stall), bytes otherwise. No advance for the
//!   stall window reports `stalled` at once, and the periodic report repeats it while the
//!   stall lasts (the server may hold a report while the tree above is reconnecting);
//!   frames flowing again report `receiving`. Deeper peers wait a little longer
//!   (`stall_step_per_depth` per level), so the peer right below a dead relay normally
//!   reports first and the server repairs the fault where it is. The simulator measured
//!   the step's trade-off (docs/performance.md): 100 ms keeps both join time and
//!   interruptions low, where 300 ms made deep viewers wait seconds to report. Total
//!   silence (no byte at all for `silence_after`, plus the same step per level) means the
//!   parent itself is gone and is reported sooner. It is stepped too: a relay that passes
//!   frames through unchanged sends nothing at all when its own parent fails, so without
//!   the step its whole subtree would report at once. A new parent that delivers
//!   nothing within `connect_timeout` also counts as a stall.
//!
//!   Only samples decide a stall, never a timer. When a deadline passes the agent asks
//!   the driver for a fresh sample (`SampleMedia`, once until a sample arrives), and the
//!   stall is decided when that sample, or any later one, shows no advance across the
//!   whole window. The window must be covered by continuous sampling: a gap between two
//!   samples longer than `max_sample_gap` restarts the evidence, so the no-advance time
//!   counts from the later of the last advance and the start of continuous sampling. A
//!   page that could not sample (a busy CPU, a throttled background tab, a paused
//!   renderer) therefore says nothing, instead of blaming a healthy parent for samples
//!   that never arrived.
//! - **Reports.** Every `report_interval`: state, loss, latency estimate (hop latency times
//!   depth), delivered kbit/s per child, and a new uplink estimate when the driver gave one.
//! - **Resume.** When the WebSocket drops, media connections stay up; the agent reconnects
//!   with backoff and presents its resume token. The last `room` status is authoritative:
//!   connections to anyone else are closed, missing ones opened. `bad_resume` closes every
//!   media connection and joins afresh.
//! - **Liveness.** A `ping` when nothing was sent for half the heartbeat interval.
//! - **Leaving.** [`Input::Leave`] leaves at once (a page being closed).
//!   [`Input::LeaveGracefully`] (the page's own leave control) lets a relay hand its
//!   children over first: it sends `leave` with `linger` and, in [`Phase::Leaving`], keeps
//!   every connection (and the driver keeps relaying) but reports nothing; each `drop`
//!   closes a child, and the last one, the socket closing or `linger_max` ends it in
//!   [`Phase::Left`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::ids::{PeerId, RoomId};
use crate::protocol::{
    ClientMessage, Connectivity, Delivery, EndReason, ErrorCode, Hello, IceServer, LinkKind,
    MediaState, PROTOCOL_VERSION, Report, Role, ServerMessage, StandbyRole,
};
use crate::quality::VideoFormat;
use crate::tree::WaitReason;

/// Settings of one agent. `Default` gives the values the web client uses.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// Room to join.
    pub room: RoomId,
    /// Broadcaster or viewer.
    pub role: Role,
    /// The broadcaster token (broadcaster only).
    pub token: Option<String>,
    /// The signed viewer link token of a private room (`hello.link`).
    pub link: Option<String>,
    /// Measured upload bandwidth, sent in `hello` so the server can place capacity well.
    pub uplink_kbps: Option<u32>,
    /// Media gap after which a peer at depth 1 reports `stalled`.
    pub stall_after: Duration,
    /// Extra gap per level below depth 1 before reporting `stalled`, so the peer nearest
    /// to a failure reports first.
    pub stall_step_per_depth: Duration,
    /// No bytes at all from the parent for this long (at depth 1, plus
    /// `stall_step_per_depth` per level below): the parent itself is likely gone, so this
    /// is reported sooner than the frame window. A re-encoding relay whose own parent
    /// failed still sends something (its decoder's concealment audio); one that passes
    /// frames through sends nothing, hence the step.
    pub silence_after: Duration,
    /// After the signaller says the parent's connection dropped (`parent_disconnected`),
    /// a media sample showing no progress for this long is a stall, whatever the depth: a
    /// killed relay's socket closes with it, so its children need not wait out the full
    /// window. Media that keeps flowing means it was only a signalling blip. Keep it above
    /// the sampling interval (the page samples every 200 ms, the native peer every 50 ms).
    pub parent_lost_after: Duration,
    /// A new parent that delivers no media for this long counts as stalled.
    pub connect_timeout: Duration,
    /// Longest gap between two media samples that still counts as continuous sampling.
    /// A longer gap restarts the stall evidence: nothing is known about the time the
    /// driver did not look. The page samples every 200 ms and the native peer every
    /// 50 ms, but a background tab's timers run only about once a second, so 1.5 s keeps
    /// a background tab's sampling continuous while a page starved for longer says nothing.
    pub max_sample_gap: Duration,
    /// How often to send a periodic `report`.
    pub report_interval: Duration,
    /// First reconnect delay after the WebSocket drops; doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Longest a relay leaving gracefully ([`Input::LeaveGracefully`]) keeps feeding its
    /// children before it closes everything anyway. The room moves them and drops the
    /// leaver within its handover timeout (5 s by default); this bounds a room that never
    /// answers.
    pub linger_max: Duration,
}

impl AgentConfig {
    /// A configuration with the default timings.
    pub fn new(room: RoomId, role: Role) -> Self {
        Self {
            room,
            role,
            token: None,
            link: None,
            uplink_kbps: None,
            stall_after: Duration::from_millis(1000),
            stall_step_per_depth: Duration::from_millis(100),
            silence_after: Duration::from_millis(400),
            parent_lost_after: Duration::from_millis(400),
            connect_timeout: Duration::from_millis(8000),
            max_sample_gap: Duration::from_millis(1500),
            report_interval: Duration::from_millis(2000),
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_millis(5000),
            linger_max: Duration::from_millis(6000),
        }
    }
}

/// Something that happened to the agent's peer.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The WebSocket the agent asked for is open.
    SocketOpened,
    /// The WebSocket closed or failed.
    SocketClosed,
    /// A text frame from the signaller.
    Text(String),
    /// A sample of the cumulative counters of the connection to the current parent (reset
    /// to zero for a new connection): video frames received (`None` when the stream has
    /// no video) and bytes received over every track. Feed one on the driver's own
    /// sampling clock and whenever [`Action::SampleMedia`] asks; its time should be when
    /// the counters were read.
    MediaProgress {
        /// Video frames received (the browser's `framesReceived`), if there is video.
        video_frames: Option<u64>,
        /// `bytesReceived` over all inbound tracks.
        bytes: u64,
    },
    /// Measurements for the next periodic report.
    Measured(Measurements),
    /// A new uplink estimate in kbit/s, sent once in the next periodic report
    /// (`uplink_kbps`) and given in later resuming `hello`s. The driver decides when a
    /// value is worth sending (the browser's rule is in `client-wasm`).
    UplinkEstimate(u32),
    /// The page wants to send signalling data (SDP, ICE) to a neighbour.
    SendSignal {
        /// The neighbour.
        to: PeerId,
        /// Opaque data.
        data: Value,
    },
    /// What the driver learned about the peer's network while gathering candidates. Sent
    /// to the room now, and again after every fresh (not resumed) join.
    Connectivity(Connectivity),
    /// ICE toward this neighbour failed. Reported when it is the parent (the child side
    /// reports, so one failure is one move).
    LinkFailed {
        /// The neighbour.
        peer: PeerId,
    },
    /// Leave now (broadcaster: ends the broadcast): the page is closing, or the peer
    /// must stop at once. Children lose their parent without warning.
    Leave,
    /// The user leaves from the page's own control, with time to spare: a relay keeps
    /// feeding its children until the room has moved each of them to a new parent that
    /// delivers (`leave` with `linger`), in phase [`Phase::Leaving`]. Anything else
    /// (a leaf, the broadcaster, no signalling connection) leaves at once, as `Leave`.
    LeaveGracefully,
}

/// Media measurements the driver takes from `getStats`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measurements {
    /// Fraction of packets lost from the parent over the last interval.
    pub loss: Option<f32>,
    /// Delay added by the last hop (half the round trip plus the jitter buffer), in ms.
    pub hop_latency_ms: Option<u32>,
    /// Bitrate delivered to each child over the last interval.
    pub delivered: Vec<Delivery>,
    /// The candidate-pair type of the link to the parent, once ICE selected one.
    pub link: Option<LinkKind>,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    /// Open a WebSocket to the signaller's `/ws`.
    OpenSocket,
    /// Close the WebSocket (after sending what was queued).
    CloseSocket,
    /// Send this text frame on the WebSocket.
    Send {
        /// The JSON text.
        text: String,
    },
    /// Create a receiving connection for this new parent; it will send an offer.
    OpenParent {
        /// The parent.
        peer: PeerId,
    },
    /// Create a sending connection to this child, add the current tracks, send an offer.
    OpenChild {
        /// The child.
        peer: PeerId,
    },
    /// Prepare an idle standby link to this peer (`standby`): as a receiving connection
    /// for `OpenParent` when it would be the parent (it sends the offer), as a sending
    /// connection with no media for `OpenChild` when it would be the child (send the
    /// offer; the senders stay without a track until `UseStandby`).
    OpenStandby {
        /// The other end.
        peer: PeerId,
        /// What it would become to this peer.
        role: StandbyRole,
    },
    /// The standby link to this peer is now the parent link (as after `OpenParent`) or a
    /// child link (as after `OpenChild`: put the current tracks on its senders).
    UseStandby {
        /// The new parent or child.
        peer: PeerId,
    },
    /// Close the media connection to this peer.
    Close {
        /// The former neighbour.
        peer: PeerId,
    },
    /// Signalling data from a neighbour, for its connection.
    Signal {
        /// The neighbour.
        from: PeerId,
        /// Opaque data.
        data: Value,
    },
    /// A watchdog deadline passed: read the parent connection's counters now and feed them
    /// as [`Input::MediaProgress`]. Only a sample decides a stall, so without one the agent
    /// reports nothing. Asked once per deadline, until a sample arrives.
    SampleMedia,
    /// The status shown to the user changed.
    Status(Status),
}

/// Where the agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Opening the first WebSocket, waiting for `welcome`.
    Joining,
    /// In the room.
    Joined,
    /// The WebSocket dropped; trying to resume.
    Reconnecting,
    /// The room ended (see `ended`).
    Ended,
    /// Refused for good (see `error`).
    Failed,
    /// Left the room, still feeding its former children until the room has moved them
    /// (it reports nothing and shows as gone from the audience). Ends in `Left`.
    Leaving,
    /// Left on the user's request.
    Left,
}

/// What a page shows about its peer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// Life phase.
    pub phase: Phase,
    /// Own peer id, once welcomed.
    pub peer_id: Option<PeerId>,
    /// Own depth (broadcaster 0), when attached.
    pub depth: Option<u32>,
    /// Current parent.
    pub parent: Option<PeerId>,
    /// Current children.
    pub children: Vec<PeerId>,
    /// Viewers in the room.
    pub viewers: u32,
    /// Whether the broadcaster is connected.
    pub live: bool,
    /// Children this peer may feed.
    pub capacity: u32,
    /// Media from the parent.
    pub media: MediaState,
    /// Why there is no parent, while waiting for one.
    pub waiting: Option<WaitReason>,
    /// Why the room ended, when it did.
    pub ended: Option<EndReason>,
    /// Why the agent failed, when it did.
    pub error: Option<ErrorInfo>,
    /// The broadcast's title, from `welcome`, if it has one.
    pub title: Option<String>,
}

/// The room's stream, from `welcome.limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RoomStream {
    /// Bitrate of the whole stream (video and audio), kbit/s, per child.
    pub stream_kbps: u32,
    /// The picture the broadcaster chose, when the room was created with a quality.
    pub video: Option<VideoFormat>,
}

/// A refusal from the signaller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorInfo {
    /// Stable code.
    pub code: ErrorCode,
    /// Human sentence.
    pub message: String,
}

/// Most signals held while the WebSocket is down.
const MAX_HELD_SIGNALS: usize = 256;

/// The peer-side state machine. See the module docs for the driver loop.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    phase: Phase,
    socket_open: bool,
    /// `hello` was answered with `welcome` on the current socket.
    welcomed: bool,
    resume: Option<String>,
    /// The latest signed claim to our place, presented with `resume`.
    claim: Option<String>,
    ice_servers: Vec<IceServer>,
    /// The room's stream bitrate and picture, from the last `welcome`.
    stream: Option<RoomStream>,
    /// The broadcast's title, from `welcome`.
    title: Option<String>,
    /// What the driver said about the network, and whether the room has still to hear it
    /// (not yet sent, or a fresh join since).
    connectivity: Option<Connectivity>,
    connectivity_due: bool,
    heartbeat: Duration,
    peer_id: Option<PeerId>,
    parent: Option<PeerId>,
    /// The parent before `parent`, still feeding this peer while the new one connects
    /// (make-before-break). Closed only on the server's `drop` for it, which comes once
    /// this peer reported media from the new parent and nobody above it is still
    /// switching: the new parent's first media may be relayed over an old link that runs
    /// through this very peer.
    previous: Option<PeerId>,
    children: BTreeSet<PeerId>,
    /// Idle links prepared at the room's request, with what each peer would become.
    standby: BTreeMap<PeerId, StandbyRole>,
    depth: Option<u32>,
    viewers: u32,
    live: bool,
    capacity: u32,
    media: MediaState,
    waiting: Option<WaitReason>,
    /// When the current parent was assigned.
    parent_since: Duration,
    /// Last counters seen from the parent's connection.
    progress: Option<(Option<u64>, u64)>,
    /// Last time those counters advanced.
    advanced_at: Option<Duration>,
    /// Last time any byte arrived from the parent.
    bytes_at: Option<Duration>,
    /// When the signaller said the current parent's connection dropped.
    parent_lost_at: Option<Duration>,
    /// When the last media sample of the current parent's connection arrived.
    sampled_at: Option<Duration>,
    /// Since when samples arrived without a gap longer than `max_sample_gap`: evidence of
    /// a stall counts from here at the earliest.
    sampling_since: Option<Duration>,
    /// A `SampleMedia` is out and no sample has answered it yet.
    sample_asked: bool,
    measured: Measurements,
    /// Uplink estimate waiting for the next periodic report.
    uplink_estimate: Option<u32>,
    next_report: Option<Duration>,
    last_sent: Duration,
    reconnect_at: Option<Duration>,
    /// While `Leaving`: when to stop feeding the children whatever the room says.
    linger_until: Option<Duration>,
    backoff: Duration,
    held: VecDeque<ClientMessage>,
    ended: Option<EndReason>,
    error: Option<ErrorInfo>,
    shown: Option<Status>,
    out: VecDeque<Action>,
}

impl Agent {
    /// A new agent; its first action asks the driver to open the WebSocket.
    pub fn new(config: AgentConfig) -> Self {
        let backoff = config.reconnect_min;
        let mut agent = Self {
            config,
            phase: Phase::Joining,
            socket_open: false,
            welcomed: false,
            resume: None,
            claim: None,
            ice_servers: Vec::new(),
            stream: None,
            title: None,
            connectivity: None,
            connectivity_due: false,
            heartbeat: Duration::from_secs(5),
            peer_id: None,
            parent: None,
            previous: None,
            children: BTreeSet::new(),
            standby: BTreeMap::new(),
            depth: None,
            viewers: 0,
            live: false,
            capacity: 0,
            media: MediaState::Connecting,
            waiting: None,
            parent_since: Duration::ZERO,
            progress: None,
            advanced_at: None,
            bytes_at: None,
            parent_lost_at: None,
            sampled_at: None,
            sampling_since: None,
            sample_asked: false,
            measured: Measurements::default(),
            uplink_estimate: None,
            next_report: None,
            last_sent: Duration::ZERO,
            reconnect_at: None,
            linger_until: None,
            backoff,
            held: VecDeque::new(),
            ended: None,
            error: None,
            shown: None,
            out: VecDeque::new(),
        };
        agent.out.push_back(Action::OpenSocket);
        agent.emit_status();
        agent
    }

    /// STUN/TURN servers from the last `welcome`, for new connections.
    pub fn ice_servers(&self) -> &[IceServer] {
        &self.ice_servers
    }

    /// The room's stream as the last `welcome` told it: what the encoder aims for (none
    /// before `welcome`, or from a server that does not say).
    pub fn stream(&self) -> Option<&RoomStream> {
        self.stream.as_ref()
    }

    /// Sets the signed viewer link sent in every later `hello` (a private room's).
    pub fn set_link(&mut self, link: Option<String>) {
        self.config.link = link;
    }

    /// The current status.
    pub fn status(&self) -> Status {
        Status {
            phase: self.phase,
            peer_id: self.peer_id,
            depth: self.depth,
            parent: self.parent,
            children: self.children.iter().copied().collect(),
            viewers: self.viewers,
            live: self.live,
            capacity: self.capacity,
            media: self.media,
            waiting: self.waiting,
            ended: self.ended,
            error: self.error.clone(),
            title: self.title.clone(),
        }
    }

    /// The next action for the driver, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// When [`Agent::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.is_over() {
            return None;
        }
        if self.phase == Phase::Leaving {
            return self.linger_until;
        }
        let mut next = self.reconnect_at;
        let mut earliest = |t: Duration| next = Some(next.map_or(t, |n| n.min(t)));
        if self.socket_open && self.welcomed {
            if let Some(t) = self.next_report {
                earliest(t);
            }
            earliest(self.last_sent + self.heartbeat / 2);
        }
        // The driver wakes at the deadline to be asked for a sample; once asked, the next
        // sample (not a timer) moves things on.
        if let Some(t) = self.watchdog_deadline().filter(|_| !self.sample_asked) {
            earliest(t);
        }
        next
    }

    fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Ended | Phase::Failed | Phase::Left)
    }

    /// Feeds one input.
    pub fn handle(&mut self, now: Duration, input: Input) {
        if self.is_over() {
            if input == Input::SocketOpened {
                self.out.push_back(Action::CloseSocket);
            }
            return;
        }
        if self.phase == Phase::Leaving {
            self.on_leaving(now, input);
            return self.emit_status();
        }
        match input {
            Input::SocketOpened => self.on_open(now),
            Input::SocketClosed => self.on_closed(now),
            Input::Text(text) => {
                if let Ok(msg) = serde_json::from_str::<ServerMessage>(&text) {
                    self.on_message(now, msg);
                }
            }
            Input::MediaProgress {
                video_frames,
                bytes,
            } => self.on_progress(now, video_frames, bytes),
            Input::Measured(m) => self.measured = m,
            Input::UplinkEstimate(kbps) => self.uplink_estimate = Some(kbps),
            Input::SendSignal { to, data } => {
                if self.is_neighbour(to) {
                    self.send(now, ClientMessage::Signal { to, data });
                }
            }
            Input::Connectivity(c) => {
                if self.connectivity.as_ref() != Some(&c) {
                    self.connectivity = Some(c);
                    self.connectivity_due = true;
                    self.flush_connectivity(now);
                }
            }
            Input::LinkFailed { peer } => {
                if self.parent == Some(peer) {
                    self.send(now, ClientMessage::LinkFailed { peer });
                }
            }
            Input::Leave => self.leave(now),
            Input::LeaveGracefully => self.leave_gracefully(now),
        }
        self.check_watchdog(now);
        self.emit_status();
    }

    /// Does what is due at `now`.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.is_over() {
            return;
        }
        if self.phase == Phase::Leaving {
            if self.linger_until.is_some_and(|t| t <= now) {
                self.finish(Phase::Left);
                self.emit_status();
            }
            return;
        }
        if self.reconnect_at.is_some_and(|t| t <= now) {
            self.reconnect_at = None;
            self.out.push_back(Action::OpenSocket);
        }
        self.check_watchdog(now);
        if self.socket_open && self.welcomed {
            if self.next_report.is_some_and(|t| t <= now) {
                self.send_report(now);
            }
            if now >= self.last_sent + self.heartbeat / 2 {
                self.send(now, ClientMessage::Ping {});
            }
        }
        self.emit_status();
    }

    fn on_open(&mut self, now: Duration) {
        self.socket_open = true;
        self.welcomed = false;
        let hello = Hello {
            v: PROTOCOL_VERSION,
            room: self.config.room.clone(),
            role: self.config.role,
            token: self.config.token.clone(),
            uplink_kbps: self.config.uplink_kbps,
            resume: self.resume.clone(),
            link: self.config.link.clone(),
            // Only with a resume token: a fresh join has no place to claim.
            claim: self.resume.as_ref().and(self.claim.clone()),
        };
        self.send_now(now, &ClientMessage::Hello(hello));
    }

    fn on_closed(&mut self, now: Duration) {
        self.socket_open = false;
        self.welcomed = false;
        self.phase = Phase::Reconnecting;
        self.reconnect_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(self.config.reconnect_max);
    }

    fn on_message(&mut self, now: Duration, msg: ServerMessage) {
        match msg {
            ServerMessage::Welcome {
                peer_id,
                resume,
                resumed,
                ice_servers,
                limits,
                title,
                ..
            } => {
                self.title = title;
                if !resumed {
                    // A new identity: whatever links the old one had are gone.
                    self.close_all_media();
                    self.held.clear();
                    self.claim = None;
                }
                self.peer_id = Some(peer_id);
                self.resume = Some(resume);
                self.ice_servers = ice_servers;
                self.heartbeat = Duration::from_millis(limits.heartbeat_ms.max(200));
                self.capacity = limits.capacity;
                self.stream = (limits.stream_kbps > 0).then_some(RoomStream {
                    stream_kbps: limits.stream_kbps,
                    video: limits.video,
                });
                self.phase = Phase::Joined;
                self.welcomed = true;
                self.backoff = self.config.reconnect_min;
                self.next_report = Some(now + self.config.report_interval);
                while let Some(msg) = self.held.pop_front() {
                    self.send_now(now, &msg);
                }
                // A new identity knows nothing of what the old one said.
                self.connectivity_due |= !resumed && self.connectivity.is_some();
                self.flush_connectivity(now);
                if self.parent.is_some() {
                    self.report_state(now);
                }
            }
            ServerMessage::Parent { peer_id, depth } => {
                self.waiting = None;
                self.depth = Some(depth);
                self.set_parent(now, Some(peer_id), true);
            }
            ServerMessage::IceServers { ice_servers } => self.ice_servers = ice_servers,
            ServerMessage::Claim { claim } => self.claim = Some(claim),
            ServerMessage::ParentDisconnected { parent } => {
                if self.parent == Some(parent) {
                    // Acted on at the next media sample (`on_progress`).
                    self.parent_lost_at = Some(now);
                }
            }
            ServerMessage::Child { peer_id } => self.add_child(peer_id),
            ServerMessage::Standby { peer_id, role } => {
                let own = self.peer_id == Some(peer_id);
                if !own && !self.is_neighbour(peer_id) && !self.standby.contains_key(&peer_id) {
                    self.standby.insert(peer_id, role);
                    self.out.push_back(Action::OpenStandby {
                        peer: peer_id,
                        role,
                    });
                }
            }
            ServerMessage::StandbyEnd { peer_id } => {
                if self.standby.remove(&peer_id).is_some() {
                    self.out.push_back(Action::Close { peer: peer_id });
                }
            }
            ServerMessage::Drop { peer_id } => {
                if self.parent == Some(peer_id) {
                    self.set_parent(now, None, false);
                    self.depth = None;
                }
                if self.previous == Some(peer_id) {
                    self.close_previous();
                }
                if self.children.remove(&peer_id) {
                    self.out.push_back(Action::Close { peer: peer_id });
                }
            }
            ServerMessage::Signal { from, data } => {
                if self.is_neighbour(from) {
                    self.out.push_back(Action::Signal { from, data });
                }
            }
            ServerMessage::Room {
                viewers,
                live,
                depth,
                parent,
                children,
                capacity,
                waiting,
            } => {
                self.waiting = waiting;
                self.viewers = viewers;
                self.live = live;
                self.capacity = capacity;
                if self.config.role == Role::Broadcaster {
                    self.depth = Some(0);
                } else {
                    self.depth = depth;
                }
                // Authoritative links (after a resume they may differ from what we have).
                if parent != self.parent {
                    self.set_parent(now, parent, true);
                }
                let wanted: BTreeSet<PeerId> = children.into_iter().collect();
                for gone in self
                    .children
                    .difference(&wanted)
                    .copied()
                    .collect::<Vec<_>>()
                {
                    self.children.remove(&gone);
                    self.out.push_back(Action::Close { peer: gone });
                }
                for new in wanted {
                    self.add_child(new);
                }
            }
            ServerMessage::Ended { reason } => {
                self.ended = Some(reason);
                self.finish(Phase::Ended);
            }
            ServerMessage::Pong => {}
            ServerMessage::Error { code, message } => self.on_error(code, message),
        }
    }

    fn on_error(&mut self, code: ErrorCode, message: String) {
        match code {
            ErrorCode::BadResume | ErrorCode::BadClaim => {
                // Our place is gone: join afresh (the server closes this socket).
                self.resume = None;
                self.claim = None;
                self.close_all_media();
                self.backoff = self.config.reconnect_min;
            }
            // After `ended` this only confirms it; on its own (a resume into an ended
            // room) it ends the agent.
            ErrorCode::RoomEnded if self.ended.is_none() => {
                self.error = Some(ErrorInfo { code, message });
                self.finish(Phase::Ended);
            }
            ErrorCode::UnknownRoom
            | ErrorCode::RoomFull
            | ErrorCode::WrongToken
            | ErrorCode::BroadcasterExists
            | ErrorCode::UnsupportedVersion
            | ErrorCode::TooManyConnections
            | ErrorCode::LinkExpired
            | ErrorCode::LinkUsedUp
            | ErrorCode::ShuttingDown => {
                self.error = Some(ErrorInfo { code, message });
                self.finish(Phase::Failed);
            }
            // Everything else either leaves the socket open (a refused message) or closes
            // it resumably (timeout, internal, slow consumer): the reconnect handles it.
            _ => {}
        }
    }

    fn finish(&mut self, phase: Phase) {
        self.phase = phase;
        self.close_all_media();
        self.reconnect_at = None;
        self.held.clear();
        if self.socket_open {
            self.out.push_back(Action::CloseSocket);
        }
    }

    fn leave(&mut self, now: Duration) {
        if self.socket_open && self.welcomed {
            self.send_now(now, &ClientMessage::Leave { linger: false });
        }
        self.finish(Phase::Left);
    }

    /// Leaves with `linger` if it feeds anyone; otherwise as [`Agent::leave`].
    fn leave_gracefully(&mut self, now: Duration) {
        let feeds = self.config.role == Role::Viewer && !self.children.is_empty();
        if !(feeds && self.socket_open && self.welcomed) {
            return self.leave(now);
        }
        self.send_now(now, &ClientMessage::Leave { linger: true });
        self.close_standbys();
        self.phase = Phase::Leaving;
        self.linger_until = Some(now + self.config.linger_max);
        self.reconnect_at = None;
        self.held.clear();
    }

    /// While leaving gracefully: every connection stays up, nothing is reported; the
    /// room's `drop` closes each child's connection, and the last one (or the socket
    /// closing, or an immediate `Leave`) ends it all.
    fn on_leaving(&mut self, now: Duration, input: Input) {
        match input {
            Input::Text(text) => match serde_json::from_str::<ServerMessage>(&text) {
                Ok(ServerMessage::Drop { peer_id }) => {
                    if self.children.remove(&peer_id) {
                        self.out.push_back(Action::Close { peer: peer_id });
                    }
                    if self.parent == Some(peer_id) {
                        self.set_parent(now, None, false);
                    }
                    if self.previous == Some(peer_id) {
                        self.close_previous();
                    }
                    if self.children.is_empty() {
                        self.finish(Phase::Left);
                    }
                }
                Ok(ServerMessage::Signal { from, data }) if self.is_neighbour(from) => {
                    self.out.push_back(Action::Signal { from, data });
                }
                Ok(ServerMessage::Ended { reason }) => {
                    self.ended = Some(reason);
                    self.finish(Phase::Ended);
                }
                _ => {}
            },
            Input::SendSignal { to, data } if self.is_neighbour(to) => {
                self.send(now, ClientMessage::Signal { to, data });
            }
            Input::SocketClosed => {
                // The room let it go (or the network did): nobody to wait for.
                self.socket_open = false;
                self.finish(Phase::Left);
            }
            Input::Leave => self.leave(now),
            _ => {}
        }
    }

    fn is_neighbour(&self, peer: PeerId) -> bool {
        self.parent == Some(peer)
            || self.previous == Some(peer)
            || self.children.contains(&peer)
            || self.standby.contains_key(&peer)
    }

    fn add_child(&mut self, peer: PeerId) {
        if self.children.contains(&peer) {
            return;
        }
        let warm = self.take_standby(peer, StandbyRole::Child);
        self.children.insert(peer);
        self.out.push_back(if warm {
            Action::UseStandby { peer }
        } else {
            Action::OpenChild { peer }
        });
    }

    /// Takes the standby link to `peer` for a new parent or child link. True if it can
    /// serve as `role`; a standby prepared for the other role is closed (its connection
    /// was set up the wrong way round).
    fn take_standby(&mut self, peer: PeerId, role: StandbyRole) -> bool {
        match self.standby.remove(&peer) {
            Some(r) if r == role => true,
            Some(_) => {
                self.out.push_back(Action::Close { peer });
                false
            }
            None => false,
        }
    }

    fn close_standbys(&mut self) {
        for peer in std::mem::take(&mut self.standby).into_keys() {
            self.out.push_back(Action::Close { peer });
        }
    }

    /// `keep_old`: the old parent was not dropped, so it may keep feeding this peer.
    fn set_parent(&mut self, now: Duration, parent: Option<PeerId>, keep_old: bool) {
        if parent == self.parent {
            return;
        }
        // Without a `drop` the old parent keeps feeding this peer until the new one
        // delivers (make-before-break); a third parent in the meantime means the one in
        // between never delivered, and the server drops it.
        if let Some(old) = self.parent.take() {
            if keep_old && self.previous.is_none() {
                self.previous = Some(old);
            } else {
                self.out.push_back(Action::Close { peer: old });
            }
        }
        if parent.is_some() && parent == self.previous {
            // Back to the parent it was leaving: that connection is made afresh.
            self.close_previous();
        }
        self.parent = parent;
        self.progress = None;
        self.advanced_at = None;
        self.bytes_at = None;
        self.parent_lost_at = None;
        self.forget_samples();
        self.parent_since = now;
        self.media = MediaState::Connecting;
        if let Some(peer) = parent {
            let warm = self.take_standby(peer, StandbyRole::Parent);
            self.out.push_back(if warm {
                Action::UseStandby { peer }
            } else {
                Action::OpenParent { peer }
            });
            self.report_state(now);
        }
    }

    /// Closes the connection to the parent being left, if any.
    fn close_previous(&mut self) {
        if let Some(peer) = self.previous.take() {
            self.out.push_back(Action::Close { peer });
        }
    }

    fn close_all_media(&mut self) {
        self.close_standbys();
        self.close_previous();
        if let Some(peer) = self.parent.take() {
            self.out.push_back(Action::Close { peer });
        }
        for peer in std::mem::take(&mut self.children) {
            self.out.push_back(Action::Close { peer });
        }
        self.depth = None;
        self.progress = None;
        self.advanced_at = None;
        self.bytes_at = None;
        self.forget_samples();
        self.media = MediaState::Connecting;
    }

    /// Samples belong to one connection: a new one starts its evidence afresh.
    fn forget_samples(&mut self) {
        self.sampled_at = None;
        self.sampling_since = None;
        self.sample_asked = false;
    }

    fn on_progress(&mut self, now: Duration, video_frames: Option<u64>, bytes: u64) {
        if self.parent.is_none() {
            return;
        }
        self.sample_asked = false;
        if self
            .sampled_at
            .is_none_or(|t| now.saturating_sub(t) > self.config.max_sample_gap)
        {
            // Nothing is known about the time nobody looked: the evidence restarts here.
            self.sampling_since = Some(now);
        }
        self.sampled_at = Some(now);
        if self
            .progress
            .map_or(bytes > 0, |(_, before)| bytes > before)
        {
            self.bytes_at = Some(now);
        }
        let advanced = match (self.progress, video_frames) {
            (None, Some(frames)) => frames > 0,
            (None, None) => bytes > 0,
            (Some((Some(before), _)), Some(frames)) => frames > before,
            (Some((_, before)), _) => bytes > before,
        };
        self.progress = Some((video_frames, bytes));
        if advanced {
            self.advanced_at = Some(now);
            if self
                .parent_lost_at
                .is_some_and(|t| now >= t + self.config.stall_after)
            {
                // Media outlived the hint by a whole stall window: the parent is alive.
                self.parent_lost_at = None;
            }
            if self.media != MediaState::Receiving {
                self.media = MediaState::Receiving;
                self.report_state(now);
            }
        } else if self.watchdog_deadline().is_some_and(|t| t <= now)
            || (self.media == MediaState::Receiving
                && self.parent_lost_at.is_some()
                && self
                    .advanced_at
                    .is_some_and(|t| now >= self.evidence_from(t) + self.config.parent_lost_after))
        {
            // Samples covering the whole window showed no advance (after
            // `parent_disconnected`, a shorter one).
            self.media = MediaState::Stalled;
            self.report_state(now);
        }
    }

    /// Where no-advance evidence counting from `t` really starts: not before sampling
    /// became continuous.
    fn evidence_from(&self, t: Duration) -> Duration {
        self.sampling_since.map_or(t, |s| s.max(t))
    }

    /// The stall window at the current depth.
    fn stall_window(&self) -> Duration {
        let below = self.depth.unwrap_or(1).saturating_sub(1).min(16);
        self.config.stall_after + self.config.stall_step_per_depth * below
    }

    /// The total-silence window at the current depth.
    fn silence_window(&self) -> Duration {
        let below = self.depth.unwrap_or(1).saturating_sub(1).min(16);
        self.config.silence_after + self.config.stall_step_per_depth * below
    }

    /// When samples showing no advance would prove a stall, if sampling stays continuous.
    fn watchdog_deadline(&self) -> Option<Duration> {
        self.parent?;
        match self.media {
            MediaState::Receiving => {
                let frames = self
                    .advanced_at
                    .map(|t| self.evidence_from(t) + self.stall_window());
                let silence = self
                    .bytes_at
                    .map(|t| self.evidence_from(t) + self.silence_window());
                match (frames, silence) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            MediaState::Connecting => {
                Some(self.evidence_from(self.parent_since) + self.config.connect_timeout)
            }
            MediaState::Stalled => None,
        }
    }

    /// A deadline that passed asks for a fresh sample; the sample decides (`on_progress`).
    fn check_watchdog(&mut self, now: Duration) {
        if !self.sample_asked && self.watchdog_deadline().is_some_and(|t| t <= now) {
            self.sample_asked = true;
            self.out.push_back(Action::SampleMedia);
        }
    }

    /// Sends the current media state at once (state changes are edge-triggered).
    fn report_state(&mut self, now: Duration) {
        if self.config.role == Role::Viewer && self.parent.is_some() {
            let report = Report {
                state: self.media,
                loss: None,
                latency_ms: None,
                uplink_kbps: None,
                delivered: Vec::new(),
                link: None,
            };
            self.send(now, ClientMessage::Report(report));
        }
    }

    fn send_report(&mut self, now: Duration) {
        self.next_report = Some(now + self.config.report_interval);
        let m = std::mem::take(&mut self.measured);
        let state = match self.config.role {
            // The broadcaster's own capture is its "media": always flowing while live.
            Role::Broadcaster => MediaState::Receiving,
            Role::Viewer if self.parent.is_some() => self.media,
            // Waiting for a parent: nothing to say about media.
            Role::Viewer => return,
        };
        let latency_ms = match (self.config.role, m.hop_latency_ms, self.depth) {
            (Role::Viewer, Some(hop), Some(depth)) => Some(hop.saturating_mul(depth.max(1))),
            _ => None,
        };
        let uplink_kbps = self.uplink_estimate.take();
        if uplink_kbps.is_some() {
            // A resume recomputes capacity from the hello's uplink: keep the newest one.
            self.config.uplink_kbps = uplink_kbps;
        }
        let report = Report {
            state,
            loss: m.loss.filter(|l| (0.0..=1.0).contains(l)),
            latency_ms,
            uplink_kbps,
            delivered: m.delivered,
            link: m.link.filter(|_| self.parent.is_some()),
        };
        self.send(now, ClientMessage::Report(report));
    }

    fn flush_connectivity(&mut self, now: Duration) {
        if self.connectivity_due
            && self.socket_open
            && self.welcomed
            && let Some(c) = self.connectivity.clone()
        {
            self.connectivity_due = false;
            self.send_now(now, &ClientMessage::Connectivity(c));
        }
    }

    /// Sends when connected and welcomed; holds signals (not reports or pings) otherwise.
    fn send(&mut self, now: Duration, msg: ClientMessage) {
        if self.socket_open && self.welcomed {
            self.send_now(now, &msg);
        } else if matches!(msg, ClientMessage::Signal { .. }) && self.held.len() < MAX_HELD_SIGNALS
        {
            self.held.push_back(msg);
        }
    }

    fn send_now(&mut self, now: Duration, msg: &ClientMessage) {
        self.last_sent = now;
        self.out.push_back(Action::Send {
            text: msg.to_json(),
        });
    }

    fn emit_status(&mut self) {
        let status = self.status();
        if self.shown.as_ref() != Some(&status) {
            self.shown = Some(status.clone());
            self.out.push_back(Action::Status(status));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::RelayMode;
    use serde_json::json;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn viewer() -> Agent {
        Agent::new(AgentConfig::new(
            RoomId::new("room1").unwrap(),
            Role::Viewer,
        ))
    }

    /// The actions, without status updates and requests for a sample (tests that care
    /// about those read `poll_action` themselves).
    fn drain(a: &mut Agent) -> Vec<Action> {
        std::iter::from_fn(|| a.poll_action())
            .filter(|x| !matches!(x, Action::Status(_) | Action::SampleMedia))
            .collect()
    }

    fn sample(a: &mut Agent, t: u64, frames: u64, bytes: u64) -> Vec<Value> {
        a.handle(
            ms(t),
            Input::MediaProgress {
                video_frames: Some(frames),
                bytes,
            },
        );
        sent(&drain(a))
    }

    fn sent(actions: &[Action]) -> Vec<Value> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { text } => Some(serde_json::from_str(text).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn server(a: &mut Agent, now: u64, msg: Value) -> Vec<Action> {
        a.handle(ms(now), Input::Text(msg.to_string()));
        drain(a)
    }

    fn welcome(resumed: bool) -> Value {
        json!({"type":"welcome","peer_id":5,"resume":"tok","role":"viewer","resumed":resumed,
               "ice_servers":[],"limits":{"max_message_bytes":16384,"messages_per_second":50,
               "heartbeat_ms":5000,"resume_grace_ms":10000,"capacity":2},"protocol":1})
    }

    /// A viewer joined under parent 1 at depth 1 and receiving.
    fn receiving_viewer() -> Agent {
        let mut a = viewer();
        assert_eq!(drain(&mut a), vec![Action::OpenSocket]);
        a.handle(ms(0), Input::SocketOpened);
        let hello = sent(&drain(&mut a));
        assert_eq!(hello[0]["type"], "hello");
        assert!(hello[0].get("resume").is_none());
        server(&mut a, 10, welcome(false));
        let acts = server(&mut a, 10, json!({"type":"parent","peer_id":1,"depth":1}));
        assert_eq!(acts[0], Action::OpenParent { peer: PeerId(1) });
        assert_eq!(sent(&acts)[0]["state"], "connecting");
        a.handle(
            ms(500),
            Input::MediaProgress {
                video_frames: Some(3),
                bytes: 900,
            },
        );
        assert_eq!(sent(&drain(&mut a))[0]["state"], "receiving");
        a
    }

    #[test]
    fn welcome_tells_the_rooms_stream() {
        let mut a = viewer();
        drain(&mut a);
        a.handle(ms(0), Input::SocketOpened);
        drain(&mut a);
        assert_eq!(a.stream(), None);
        // A server that does not say leaves it unknown.
        server(&mut a, 10, welcome(false));
        assert_eq!(a.stream(), None);
        let mut w = welcome(true);
        w["limits"]["stream_kbps"] = json!(1500);
        w["limits"]["video"] = json!({"quality":"720p","width":1280,"height":720,"fps":30});
        server(&mut a, 20, w);
        let stream = a.stream().copied().unwrap();
        assert_eq!(stream.stream_kbps, 1500);
        assert_eq!(stream.video, Some(crate::quality::Quality::Hd.video()));
    }

    #[test]
    fn stall_is_reported_once_and_recovery_reported() {
        let mut a = receiving_viewer();
        // Audio bytes keep coming but video frames stop: that is a stall.
        for t in (600..=1400).step_by(200) {
            assert!(sample(&mut a, t, 3, t).is_empty(), "no report before 1 s");
        }
        assert_eq!(a.poll_timeout(), Some(ms(1500)));
        a.handle_timeout(ms(1500));
        assert!(
            sent(&drain(&mut a)).is_empty(),
            "a timer alone decides nothing"
        );
        let r = sample(&mut a, 1500, 3, 1500);
        assert_eq!(r, vec![json!({"type":"report","state":"stalled"})]);
        a.handle_timeout(ms(3000));
        drain(&mut a); // a periodic report repeats "stalled" while the stall lasts
        a.handle(
            ms(3100),
            Input::MediaProgress {
                video_frames: Some(3),
                bytes: 5000,
            },
        );
        assert!(
            sent(&drain(&mut a)).iter().all(|m| m["state"] != "stalled"),
            "edge-triggered"
        );
        a.handle(
            ms(3200),
            Input::MediaProgress {
                video_frames: Some(4),
                bytes: 5000,
            },
        );
        assert_eq!(sent(&drain(&mut a))[0]["state"], "receiving");
    }

    #[test]
    fn a_dropped_parent_whose_media_stopped_is_reported_at_the_next_samples() {
        let mut a = receiving_viewer();
        let quiet = |a: &mut Agent, t: u64| {
            a.handle(
                ms(t),
                Input::MediaProgress {
                    video_frames: Some(3),
                    bytes: 900,
                },
            );
            a.handle_timeout(ms(t));
            sent(&drain(a))
        };
        // Frames and bytes last advanced at 500 ms; the parent's socket drops at 550 ms.
        assert!(
            server(
                &mut a,
                550,
                json!({"type":"parent_disconnected","parent":1})
            )
            .is_empty()
        );
        // Decided on samples, not on a timer.
        assert_eq!(
            a.poll_timeout(),
            Some(ms(500 + 400)),
            "the usual silence window"
        );
        assert!(quiet(&mut a, 700).is_empty(), "200 ms quiet: not yet");
        assert_eq!(quiet(&mut a, 900)[0]["state"], "stalled", "400 ms quiet");

        // A throttled page whose first sample after the hint comes late, but shows
        // progress: no stall.
        let mut a = receiving_viewer();
        server(
            &mut a,
            550,
            json!({"type":"parent_disconnected","parent":1}),
        );
        a.handle(
            ms(1050),
            Input::MediaProgress {
                video_frames: Some(40),
                bytes: 9000,
            },
        );
        assert!(sent(&drain(&mut a)).is_empty());

        // A page starved for two seconds after the hint: its late samples showing no
        // progress count only from the first of them.
        let mut a = receiving_viewer();
        server(
            &mut a,
            550,
            json!({"type":"parent_disconnected","parent":1}),
        );
        let r = quiet(&mut a, 2600);
        assert!(
            r.iter().all(|m| m["state"] != "stalled"),
            "first sample after the gap"
        );
        let r = quiet(&mut a, 2800);
        assert!(
            r.iter().all(|m| m["state"] != "stalled"),
            "200 ms of samples"
        );
        assert_eq!(
            quiet(&mut a, 3000)[0]["state"],
            "stalled",
            "400 ms of samples"
        );
    }

    #[test]
    fn a_signalling_blip_of_a_parent_whose_media_flows_changes_nothing() {
        let mut a = receiving_viewer();
        server(
            &mut a,
            550,
            json!({"type":"parent_disconnected","parent":1}),
        );
        // About someone else: ignored.
        server(
            &mut a,
            560,
            json!({"type":"parent_disconnected","parent":9}),
        );
        for t in (600..=2600).step_by(200) {
            a.handle(
                ms(t),
                Input::MediaProgress {
                    video_frames: Some(t),
                    bytes: t,
                },
            );
            a.handle_timeout(ms(t));
            assert!(sent(&drain(&mut a)).iter().all(|m| m["state"] != "stalled"));
        }
        // A whole stall window of media after the hint retired it: a later gap gets the
        // usual windows again, not the hint's.
        for t in [2900, 3100] {
            a.handle(
                ms(t),
                Input::MediaProgress {
                    video_frames: Some(2600),
                    bytes: t,
                },
            );
            assert!(
                sent(&drain(&mut a)).is_empty(),
                "frames quiet {} ms",
                t - 2600
            );
        }
    }

    #[test]
    fn total_silence_is_reported_sooner() {
        let mut a = receiving_viewer();
        server(&mut a, 600, json!({"type":"parent","peer_id":1,"depth":4}));
        a.handle(
            ms(700),
            Input::MediaProgress {
                video_frames: Some(10),
                bytes: 2000,
            },
        );
        drain(&mut a);
        // Depth 4: 400 ms + 3 steps of 100 ms, sooner than the frame window (1300 ms).
        assert_eq!(a.watchdog_deadline(), Some(ms(1400)));
        for t in (900..=1300).step_by(200) {
            assert!(sample(&mut a, t, 10, 2000).is_empty());
        }
        a.handle_timeout(ms(1400));
        assert!(
            sent(&drain(&mut a)).is_empty(),
            "a timer alone decides nothing"
        );
        assert_eq!(sample(&mut a, 1400, 10, 2000)[0]["state"], "stalled");
    }

    #[test]
    fn deeper_peers_wait_longer_before_reporting() {
        let mut a = receiving_viewer();
        server(&mut a, 600, json!({"type":"parent","peer_id":1,"depth":3}));
        a.handle(
            ms(700),
            Input::MediaProgress {
                video_frames: Some(10),
                bytes: 1,
            },
        );
        drain(&mut a);
        assert_eq!(a.stall_window(), ms(1000 + 2 * 100));
    }

    #[test]
    fn a_parent_that_never_delivers_counts_as_stalled() {
        let mut a = viewer();
        a.handle(ms(0), Input::SocketOpened);
        server(&mut a, 0, welcome(false));
        server(&mut a, 0, json!({"type":"parent","peer_id":1,"depth":1}));
        let nothing = |a: &mut Agent, t: u64| {
            a.handle(
                ms(t),
                Input::MediaProgress {
                    video_frames: None,
                    bytes: 0,
                },
            );
            a.handle_timeout(ms(t));
            sent(&drain(a))
        };
        for t in (0..8000).step_by(200) {
            assert!(nothing(&mut a, t).iter().all(|m| m["state"] != "stalled"));
        }
        assert_eq!(nothing(&mut a, 8000)[0]["state"], "stalled");
    }

    #[test]
    fn a_page_that_could_not_sample_blames_nobody() {
        // (a) Five seconds without a sample, far past every deadline; the next sample
        // shows the media advanced meanwhile: nothing to report, ever.
        let mut a = receiving_viewer();
        for t in (1000..=5500).step_by(500) {
            a.handle_timeout(ms(t));
            let r = sent(&drain(&mut a));
            assert!(
                r.iter().all(|m| m["state"] != "stalled"),
                "at {t} ms: {r:?}"
            );
        }
        assert!(sample(&mut a, 5500, 200, 90_000).is_empty());
        assert_eq!(a.status().media, MediaState::Receiving);

        // (b) The same gap, then samples every 200 ms showing video stopped (audio
        // flows): the stall window counts from the first sample after the gap.
        let mut a = receiving_viewer();
        a.handle_timeout(ms(5000));
        drain(&mut a);
        for t in (5500..6500).step_by(200) {
            assert!(sample(&mut a, t, 3, t).is_empty(), "reported at {t} ms");
        }
        assert_eq!(sample(&mut a, 6500, 3, 6500)[0]["state"], "stalled");

        // Total silence after the gap: the silence window, again from the first sample.
        let mut a = receiving_viewer();
        for t in (5500..5900).step_by(200) {
            assert!(sample(&mut a, t, 3, 900).is_empty(), "reported at {t} ms");
        }
        assert_eq!(sample(&mut a, 5900, 3, 900)[0]["state"], "stalled");

        // A sampling gap inside the window restarts it; a background tab's one sample a
        // second is still continuous.
        let mut a = receiving_viewer();
        assert!(sample(&mut a, 1400, 3, 1400).is_empty());
        assert!(
            sample(&mut a, 3000, 3, 3000).is_empty(),
            "1.6 s gap: evidence restarts"
        );
        assert!(sample(&mut a, 3900, 3, 3900).is_empty());
        assert_eq!(sample(&mut a, 4000, 3, 4000)[0]["state"], "stalled");
        let mut a = receiving_viewer();
        assert_eq!(
            sample(&mut a, 1500, 3, 1500)[0]["state"],
            "stalled",
            "1 s gap"
        );
    }

    #[test]
    fn a_passed_deadline_asks_for_one_sample() {
        let mut a = receiving_viewer();
        let asks = |a: &mut Agent| {
            std::iter::from_fn(|| a.poll_action())
                .filter(|x| *x == Action::SampleMedia)
                .count()
        };
        assert_eq!(a.poll_timeout(), Some(ms(900)), "the silence deadline");
        a.handle_timeout(ms(800));
        assert_eq!(asks(&mut a), 0, "not yet due");
        a.handle_timeout(ms(900));
        assert_eq!(asks(&mut a), 1);
        // Asked: the driver is not woken again for it, and later timers do not repeat it.
        assert!(a.poll_timeout().is_some_and(|t| t > ms(900)));
        for t in [900, 1200, 3000] {
            a.handle_timeout(ms(t));
            a.handle(ms(t), Input::UplinkEstimate(900));
            assert_eq!(asks(&mut a), 0, "asked again at {t} ms");
        }
        // The answer comes after a gap, so it restarts the evidence; the next deadline
        // asks once more.
        a.handle(
            ms(3100),
            Input::MediaProgress {
                video_frames: Some(3),
                bytes: 900,
            },
        );
        assert_eq!(a.status().media, MediaState::Receiving);
        assert_eq!(asks(&mut a), 0);
        assert_eq!(a.watchdog_deadline(), Some(ms(3500)));
        a.handle_timeout(ms(3500));
        assert_eq!(asks(&mut a), 1);
    }

    #[test]
    fn a_move_without_drop_keeps_the_old_parent_until_the_server_drops_it() {
        let mut a = receiving_viewer();
        // No `drop` for parent 1: it keeps feeding while parent 3 connects.
        let acts = server(&mut a, 600, json!({"type":"parent","peer_id":3,"depth":2}));
        assert_eq!(acts[0], Action::OpenParent { peer: PeerId(3) });
        assert!(!acts.contains(&Action::Close { peer: PeerId(1) }));
        // Signals from the old parent are still taken (e.g. its last ICE candidates).
        assert_eq!(
            server(&mut a, 650, json!({"type":"signal","from":1,"data":{}})).len(),
            1
        );
        // The new parent's first media is reported; the old connection stays until the
        // server drops it.
        a.handle(
            ms(900),
            Input::MediaProgress {
                video_frames: Some(1),
                bytes: 100,
            },
        );
        let acts = drain(&mut a);
        assert!(!acts.contains(&Action::Close { peer: PeerId(1) }));
        assert_eq!(sent(&acts)[0]["state"], "receiving");
        assert_eq!(
            server(&mut a, 950, json!({"type":"drop","peer_id":1})),
            vec![Action::Close { peer: PeerId(1) }]
        );
    }

    #[test]
    fn standby_links_are_prepared_then_used_or_closed() {
        let mut a = receiving_viewer();
        let up = server(
            &mut a,
            600,
            json!({"type":"standby","peer_id":6,"role":"parent"}),
        );
        assert_eq!(
            up,
            vec![Action::OpenStandby {
                peer: PeerId(6),
                role: StandbyRole::Parent
            }]
        );
        // About itself, told twice, or about a neighbour (its parent): nothing new.
        for (peer, role) in [(5, "parent"), (6, "parent"), (1, "child")] {
            let msg = json!({"type":"standby","peer_id":peer,"role":role});
            assert!(server(&mut a, 610, msg).is_empty(), "{peer}");
        }
        let down = server(
            &mut a,
            630,
            json!({"type":"standby","peer_id":8,"role":"child"}),
        );
        assert_eq!(
            down,
            vec![Action::OpenStandby {
                peer: PeerId(8),
                role: StandbyRole::Child
            }]
        );
        // Its ICE and DTLS are set up in advance: signals from it are taken.
        assert_eq!(
            server(&mut a, 640, json!({"type":"signal","from":6,"data":{}})).len(),
            1
        );
        // The standby parent becomes the parent: its link is used, nothing is opened.
        let acts = server(&mut a, 700, json!({"type":"parent","peer_id":6,"depth":2}));
        assert_eq!(acts[0], Action::UseStandby { peer: PeerId(6) });
        assert!(!acts.iter().any(|x| matches!(x, Action::OpenParent { .. })));
        // A standby the wrong way round is closed and the link made afresh.
        let acts = server(
            &mut a,
            800,
            json!({"type":"standby","peer_id":9,"role":"parent"}),
        );
        assert_eq!(acts.len(), 1);
        assert_eq!(
            server(&mut a, 810, json!({"type":"child","peer_id":9})),
            vec![
                Action::Close { peer: PeerId(9) },
                Action::OpenChild { peer: PeerId(9) }
            ]
        );
        // A child standby becomes a child.
        assert_eq!(
            server(&mut a, 820, json!({"type":"child","peer_id":8})),
            vec![Action::UseStandby { peer: PeerId(8) }]
        );
        // The end of a standby link closes it; the end of one that became a link does not.
        server(
            &mut a,
            830,
            json!({"type":"standby","peer_id":11,"role":"parent"}),
        );
        assert_eq!(
            server(&mut a, 840, json!({"type":"standby_end","peer_id":11})),
            vec![Action::Close { peer: PeerId(11) }]
        );
        assert!(server(&mut a, 850, json!({"type":"standby_end","peer_id":8})).is_empty());
        // Leaving closes what is left.
        server(
            &mut a,
            860,
            json!({"type":"standby","peer_id":12,"role":"child"}),
        );
        a.handle(ms(900), Input::Leave);
        assert!(drain(&mut a).contains(&Action::Close { peer: PeerId(12) }));
    }

    #[test]
    fn a_dropped_old_parent_is_closed_and_a_third_parent_closes_the_second() {
        let mut a = receiving_viewer();
        server(&mut a, 600, json!({"type":"parent","peer_id":3,"depth":2}));
        assert_eq!(
            server(&mut a, 700, json!({"type":"drop","peer_id":1})),
            vec![Action::Close { peer: PeerId(1) }]
        );
        server(&mut a, 800, json!({"type":"parent","peer_id":4,"depth":2}));
        let acts = server(&mut a, 900, json!({"type":"parent","peer_id":6,"depth":2}));
        // 3, being left, keeps feeding; 4, in between, never delivered and is closed.
        assert!(acts.contains(&Action::Close { peer: PeerId(4) }));
        assert!(!acts.contains(&Action::Close { peer: PeerId(3) }));
    }

    #[test]
    fn new_parent_replaces_only_the_receiving_connection() {
        let mut a = receiving_viewer();
        assert_eq!(
            server(&mut a, 600, json!({"type":"child","peer_id":7})),
            vec![Action::OpenChild { peer: PeerId(7) }]
        );
        assert!(server(&mut a, 600, json!({"type":"child","peer_id":7})).is_empty());
        assert_eq!(
            server(&mut a, 700, json!({"type":"drop","peer_id":1})),
            vec![Action::Close { peer: PeerId(1) }]
        );
        let acts = server(&mut a, 700, json!({"type":"parent","peer_id":3,"depth":1}));
        assert_eq!(acts[0], Action::OpenParent { peer: PeerId(3) });
        assert_eq!(
            sent(&acts),
            vec![json!({"type":"report","state":"connecting"})]
        );
        assert!(
            !acts
                .iter()
                .any(|x| matches!(x, Action::Close { .. } | Action::OpenChild { .. }))
        );
        assert!(server(&mut a, 700, json!({"type":"parent","peer_id":3,"depth":1})).is_empty());
    }

    #[test]
    fn signals_only_to_and_from_neighbours() {
        let mut a = receiving_viewer();
        assert!(server(&mut a, 600, json!({"type":"signal","from":9,"data":{}})).is_empty());
        assert_eq!(
            server(
                &mut a,
                600,
                json!({"type":"signal","from":1,"data":{"x":1}})
            ),
            vec![Action::Signal {
                from: PeerId(1),
                data: json!({"x":1})
            }]
        );
        a.handle(
            ms(600),
            Input::SendSignal {
                to: PeerId(9),
                data: json!({}),
            },
        );
        assert!(drain(&mut a).is_empty());
        a.handle(
            ms(600),
            Input::SendSignal {
                to: PeerId(1),
                data: json!({"a":2}),
            },
        );
        assert_eq!(
            sent(&drain(&mut a)),
            vec![json!({"type":"signal","to":1,"data":{"a":2}})]
        );
    }

    #[test]
    fn socket_blip_resumes_keeping_media_and_the_last_room_status_rules() {
        let mut a = receiving_viewer();
        server(&mut a, 600, json!({"type":"child","peer_id":7}));
        a.handle(ms(1000), Input::SocketClosed);
        assert!(drain(&mut a).is_empty(), "media connections stay up");
        assert_eq!(a.status().phase, Phase::Reconnecting);
        // A signal while away is held until the resume.
        a.handle(
            ms(1100),
            Input::SendSignal {
                to: PeerId(7),
                data: json!({"c":1}),
            },
        );
        assert!(drain(&mut a).is_empty());
        assert_eq!(a.poll_timeout(), Some(ms(1250)));
        a.handle_timeout(ms(1250));
        assert_eq!(drain(&mut a), vec![Action::OpenSocket]);
        a.handle(ms(1300), Input::SocketOpened);
        let hello = sent(&drain(&mut a));
        assert_eq!(hello[0]["resume"], "tok");
        let acts = server(&mut a, 1310, welcome(true));
        let msgs = sent(&acts);
        assert_eq!(msgs[0], json!({"type":"signal","to":7,"data":{"c":1}}));
        assert!(!acts.iter().any(|x| matches!(x, Action::Close { .. })));
        // Authoritative status: child 7 moved away, child 8 is new, parent unchanged.
        let acts = server(
            &mut a,
            1320,
            json!({"type":"room","viewers":4,"live":true,"depth":1,"parent":1,"children":[8],"capacity":2}),
        );
        assert_eq!(
            acts,
            vec![
                Action::Close { peer: PeerId(7) },
                Action::OpenChild { peer: PeerId(8) }
            ]
        );
    }

    #[test]
    fn bad_resume_closes_media_and_joins_afresh() {
        let mut a = receiving_viewer();
        a.handle(ms(1000), Input::SocketClosed);
        a.handle_timeout(ms(1250));
        a.handle(ms(1300), Input::SocketOpened);
        drain(&mut a);
        let acts = server(
            &mut a,
            1310,
            json!({"type":"error","code":"bad_resume","message":"x"}),
        );
        assert_eq!(acts, vec![Action::Close { peer: PeerId(1) }]);
        a.handle(ms(1320), Input::SocketClosed);
        a.handle_timeout(ms(2000));
        a.handle(ms(2000), Input::SocketOpened);
        let hello = sent(&drain(&mut a));
        assert!(hello[0].get("resume").is_none());
    }

    #[test]
    fn refusals_and_the_end_stop_everything() {
        let mut a = viewer();
        a.handle(ms(0), Input::SocketOpened);
        drain(&mut a);
        let acts = server(
            &mut a,
            5,
            json!({"type":"error","code":"unknown_room","message":"There is no room."}),
        );
        assert_eq!(acts, vec![Action::CloseSocket]);
        assert_eq!(a.status().phase, Phase::Failed);
        assert_eq!(a.status().error.unwrap().code, ErrorCode::UnknownRoom);
        a.handle(ms(10), Input::SocketClosed);
        assert_eq!(a.poll_timeout(), None);

        let mut b = receiving_viewer();
        server(&mut b, 600, json!({"type":"child","peer_id":7}));
        let acts = server(
            &mut b,
            700,
            json!({"type":"ended","reason":"broadcaster_left"}),
        );
        assert_eq!(
            acts,
            vec![
                Action::Close { peer: PeerId(1) },
                Action::Close { peer: PeerId(7) },
                Action::CloseSocket
            ]
        );
        assert_eq!(b.status().phase, Phase::Ended);
        assert_eq!(b.status().ended, Some(EndReason::BroadcasterLeft));
    }

    #[test]
    fn periodic_report_carries_measurements_and_pings_keep_alive() {
        let mut a = receiving_viewer();
        server(&mut a, 600, json!({"type":"parent","peer_id":1,"depth":2}));
        a.handle(
            ms(700),
            Input::Measured(Measurements {
                loss: Some(0.01),
                hop_latency_ms: Some(20),
                delivered: vec![Delivery {
                    peer: PeerId(7),
                    kbps: 480,
                    mode: Some(RelayMode::PassThrough),
                }],
                link: Some(LinkKind::Srflx),
            }),
        );
        a.handle(
            ms(2000),
            Input::MediaProgress {
                video_frames: Some(10),
                bytes: 5000,
            },
        );
        drain(&mut a);
        a.handle_timeout(ms(2010));
        let r = sent(&drain(&mut a));
        assert_eq!(
            r[0],
            json!({"type":"report","state":"receiving","loss":0.01,
                   "latency_ms":40,"delivered":[{"peer":7,"kbps":480,"mode":"pass_through"}],"link":"srflx"})
        );
        let mut b = Agent::new(AgentConfig::new(
            RoomId::new("r").unwrap(),
            Role::Broadcaster,
        ));
        b.handle(ms(0), Input::SocketOpened);
        server(&mut b, 0, welcome(false));
        b.handle_timeout(ms(2500));
        let msgs = sent(&drain(&mut b));
        assert!(msgs.iter().any(|m| m["type"] == "report"), "{msgs:?}");
        // A viewer waiting for a parent sends no reports, so it pings.
        let mut c = viewer();
        c.handle(ms(0), Input::SocketOpened);
        server(&mut c, 0, welcome(false));
        assert_eq!(c.poll_timeout(), Some(ms(2000)));
        c.handle_timeout(ms(2000));
        assert!(sent(&drain(&mut c)).is_empty());
        c.handle_timeout(ms(2500));
        assert_eq!(sent(&drain(&mut c)), vec![json!({"type":"ping"})]);
    }

    #[test]
    fn an_uplink_estimate_goes_out_once_and_into_later_hellos() {
        let mut a = receiving_viewer();
        let flowing = |a: &mut Agent, t: u64| {
            a.handle(
                ms(t),
                Input::MediaProgress {
                    video_frames: Some(t),
                    bytes: t,
                },
            );
        };
        a.handle(ms(600), Input::UplinkEstimate(3200));
        flowing(&mut a, 2000);
        a.handle_timeout(ms(2010));
        let r = sent(&drain(&mut a));
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0]["uplink_kbps"], 3200, "{r:?}");
        flowing(&mut a, 4000);
        a.handle_timeout(ms(4010));
        let r = sent(&drain(&mut a));
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(r[0].get("uplink_kbps").is_none(), "sent once: {r:?}");
        a.handle(ms(4100), Input::SocketClosed);
        a.handle_timeout(ms(4350));
        a.handle(ms(4400), Input::SocketOpened);
        let hello = sent(&drain(&mut a));
        assert_eq!(hello[0]["uplink_kbps"], 3200);
    }

    /// `input` sends a plain `leave`, closes the socket and ends the agent.
    fn leaves_at_once(a: &mut Agent, now: u64, input: Input) {
        a.handle(ms(now), input);
        let acts = drain(a);
        assert_eq!(sent(&acts), vec![json!({"type":"leave"})]);
        assert_eq!(acts.last(), Some(&Action::CloseSocket));
        assert_eq!(a.status().phase, Phase::Left);
    }

    #[test]
    fn leave_sends_leave_and_closes() {
        leaves_at_once(&mut receiving_viewer(), 900, Input::Leave);
    }

    /// A viewer under parent 1 feeding children 7 and 8.
    fn relaying_viewer() -> Agent {
        let mut a = receiving_viewer();
        server(&mut a, 600, json!({"type":"child","peer_id":7}));
        server(&mut a, 600, json!({"type":"child","peer_id":8}));
        a
    }

    #[test]
    fn a_graceful_leave_feeds_the_children_until_each_is_dropped() {
        let mut a = relaying_viewer();
        a.handle(ms(1000), Input::LeaveGracefully);
        let acts = drain(&mut a);
        assert_eq!(sent(&acts), vec![json!({"type":"leave","linger":true})]);
        assert!(
            !acts
                .iter()
                .any(|x| matches!(x, Action::Close { .. } | Action::CloseSocket)),
            "every connection stays up: {acts:?}"
        );
        assert_eq!(a.status().phase, Phase::Leaving);
        assert_eq!(a.poll_timeout(), Some(ms(7000)), "only the linger bound");
        // Media stops mattering: no reports, no stall, no pings.
        assert!(sample(&mut a, 3000, 3, 900).is_empty());
        a.handle_timeout(ms(5000));
        assert!(drain(&mut a).is_empty());
        // Signals for the links still up pass both ways.
        let ice = json!({"candidate": "c"});
        let acts = server(&mut a, 5100, json!({"type":"signal","from":7,"data":ice}));
        assert_eq!(
            acts,
            vec![Action::Signal {
                from: PeerId(7),
                data: ice.clone()
            }]
        );
        a.handle(
            ms(5100),
            Input::SendSignal {
                to: PeerId(7),
                data: ice,
            },
        );
        assert_eq!(sent(&drain(&mut a))[0]["to"], 7);

        let acts = server(&mut a, 5200, json!({"type":"drop","peer_id":7}));
        assert_eq!(acts, vec![Action::Close { peer: PeerId(7) }]);
        assert_eq!(a.status().phase, Phase::Leaving);
        assert_eq!(a.status().children, vec![PeerId(8)]);
        let acts = server(&mut a, 5300, json!({"type":"drop","peer_id":8}));
        assert!(acts.contains(&Action::Close { peer: PeerId(8) }));
        assert!(
            acts.contains(&Action::Close { peer: PeerId(1) }),
            "the parent too"
        );
        assert_eq!(acts.last(), Some(&Action::CloseSocket));
        assert_eq!(a.status().phase, Phase::Left);
        assert_eq!(a.poll_timeout(), None);
    }

    #[test]
    fn a_graceful_leave_ends_at_the_linger_bound_or_when_the_socket_closes() {
        let mut a = relaying_viewer();
        a.handle(ms(1000), Input::LeaveGracefully);
        drain(&mut a);
        a.handle_timeout(ms(6999));
        assert!(drain(&mut a).is_empty());
        a.handle_timeout(ms(7000));
        let acts = drain(&mut a);
        for peer in [1, 7, 8] {
            assert!(
                acts.contains(&Action::Close { peer: PeerId(peer) }),
                "{acts:?}"
            );
        }
        assert_eq!(acts.last(), Some(&Action::CloseSocket));
        assert_eq!(a.status().phase, Phase::Left);

        let mut a = relaying_viewer();
        a.handle(ms(1000), Input::LeaveGracefully);
        drain(&mut a);
        a.handle(ms(1500), Input::SocketClosed);
        let acts = drain(&mut a);
        assert_eq!(acts.len(), 3, "closes the three connections: {acts:?}");
        assert_eq!(a.status().phase, Phase::Left);
        assert_eq!(a.poll_timeout(), None, "no reconnect");
    }

    #[test]
    fn a_graceful_leave_can_still_be_cut_short() {
        let mut a = relaying_viewer();
        a.handle(ms(1000), Input::LeaveGracefully);
        drain(&mut a);
        leaves_at_once(&mut a, 1200, Input::Leave);
    }

    #[test]
    fn a_leaf_leaving_gracefully_leaves_at_once() {
        leaves_at_once(&mut receiving_viewer(), 900, Input::LeaveGracefully);
    }
}
