//! One native peer: the core [`Agent`] driven by a tokio task, with webrtc-crate
//! connections to its parent and children.
//!
//! The agent decides (which connections to open and close, the stall watchdog, reports,
//! resume); this driver carries its actions out:
//! - `OpenParent`: a receiving connection; the parent's offer is answered. `on_track`
//!   starts a reader task that counts what arrives and hands each packet to the fan-out.
//! - `OpenChild`: a sending connection with one `TrackLocalStaticRTP` (own SSRC), an offer,
//!   and one task with a bounded queue. The fan-out `try_send`s into each child's queue and
//!   counts a drop when it is full, so a slow child never stalls the others. The child's
//!   task rewrites SSRC and payload type to the leg's (the driver silently drops mismatched
//!   packets) and strips header extensions before `write_rtp`.
//! - A new parent replaces only the receiving connection: the children's queues stay, so
//!   the subtree below keeps its connections. A move without `drop` keeps the old parent's
//!   connection (make-before-break): its packets are forwarded until the server's `drop`
//!   closes it, then the new parent's (whose bytes the agent watches meanwhile).
//! - `OpenStandby` (warm standby: this peer would stand in for a relay, or is that
//!   stand-in's parent or future child): the connection is built as for `OpenParent`
//!   (role parent) or `OpenChild` (role child: track, feeding task and offer), so ICE and
//!   DTLS are done in advance, but it stays idle: a standby parent's reader never
//!   forwards and the watchdog does not sample it; a standby child's queue is held out of
//!   the fan-out. `UseStandby` turns it into the parent (the same make-before-break as a
//!   new parent) or a child (its queue joins the fan-out, and a keyframe is asked for at
//!   once), so media flows after the repair's messages with no connection set-up. A
//!   standby whose connection is missing or failed is opened afresh instead.
//!
//! The media watchdog feeds the agent the bytes received from the current parent
//! connection every tick; the agent reports `stalled` when they stop advancing (and repeats
//! it with every periodic report while stalled). When ICE to the parent fails (no path
//! through the NATs), the agent reports `link_failed` and the room places the peer
//! elsewhere.
//!
//! Keyframe requests travel up the tree. An interceptor at the end of every connection's
//! chain hands inbound PLI/FIR to the application (the default chain stops all inbound
//! RTCP). Each child leg has a task reading that feedback from its sender track; a request
//! wakes the peer's `Upstream` task, which sends one PLI to its own parent and then waits
//! [`KEYFRAME_REQUEST_GAP`]: requests meanwhile collapse into one more PLI at the end of
//! the gap, so a hundred children asking at once cost the parent two PLIs, and a child
//! asking late still gets its keyframe. The broadcaster marks its next frame a keyframe
//! instead. A receiver asks once by itself when its first packet from a new parent
//! arrives, as browsers do when a track starts.
//!
//! Each periodic report carries `delivered`: payload bytes `write_rtp` accepted per child
//! over the last report interval, in kbit/s, and `link`: the type of the candidate pair ICE
//! selected toward the parent (host, srflx, prflx, relay). Once a connection is up a task
//! reads its selected pair every second into [`Stats::links`].

use std::collections::HashMap;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rtc::interceptor::{Attribute, Interceptor, Packet, Slot, StreamInfo, TaggedPacket};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtcp;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use serde_json::Value;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use treecast_core::agent::{Action, Agent, AgentConfig, Input, Measurements, Phase, Status};
use treecast_core::protocol::{
    ClientMessage, Connectivity, Delivery, IceServer, LinkKind, MediaState, RelayMode, Role,
    StandbyRole,
};
use treecast_core::{PeerId, RoomId};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCIceServer, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState, RTCSessionDescription, Registry, SettingEngineBuilder,
    register_default_interceptors,
};

use crate::media::{Source, Stats, now_us};
use crate::nat;
use crate::netem::DelayedRuntime;

/// Payload type the broadcaster stamps (VP8's in the crate's default codec table). Relays
/// rewrite it to each leg's negotiated one anyway.
const VP8_PT: u8 = 96;
/// How often the driver feeds media progress to the agent and checks its timers.
const TICK: Duration = Duration::from_millis(50);
/// How long each test of the NAT probe waits for its answer (a port-restricted NAT makes
/// the last test wait this long once).
const NAT_PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Least time between two keyframe requests a relay sends its parent. A keyframe takes
/// about a round trip per level to come back down; asking again sooner only makes the
/// broadcaster send more keyframes.
pub const KEYFRAME_REQUEST_GAP: Duration = Duration::from_millis(300);
/// Where the keyframe-request interceptor sits in the chain: after every default
/// interceptor (the highest named slot is 13 000), so they all see the RTCP first.
const KEYFRAME_SLOT: usize = 14_000;

/// What can go wrong inside a peer. None of these end the peer: a failed connection is
/// logged and the stall watchdog has the signaller repair around it.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The configured room id is not a valid room id.
    #[error("invalid room id: {0}")]
    Room(String),
    /// The webrtc crate refused an operation (building a connection, SDP, ICE).
    #[error("webrtc: {0}")]
    WebRtc(#[from] webrtc::error::Error),
    /// The codec table or interceptor set-up failed.
    #[error("media set-up: {0}")]
    Setup(String),
    /// A neighbour's signalling data was not a valid SDP or ICE candidate.
    #[error("bad signal from a neighbour: {0}")]
    BadSignal(#[from] serde_json::Error),
}

/// Settings of one native peer.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The signaller's WebSocket URL, e.g. `ws://127.0.0.1:9000/ws`.
    pub url: String,
    /// Other nodes of the same signalling cluster: when a connection to one fails, the
    /// next is tried (the peer resumes there, keeping its place). Empty: `url` only.
    pub other_urls: Vec<String>,
    /// Room to join.
    pub room: String,
    /// Broadcaster or viewer.
    pub role: Role,
    /// Broadcaster token.
    pub token: Option<String>,
    /// Uplink announced in `hello` (sets the capacity the signaller gives this peer).
    pub uplink_kbps: Option<u32>,
    /// Broadcaster: payload bitrate of the synthetic stream.
    pub stream_kbps: u32,
    /// Broadcaster: frames per second of the synthetic stream.
    pub fps: u32,
    /// Address the media sockets bind (tests: 127.0.0.1; a wildcard bind skipped loopback).
    pub bind_ip: IpAddr,
    /// Packets queued per child before the fan-out drops.
    pub child_queue: usize,
    /// No RTP from the parent for this long (at depth 1) reports `stalled`.
    pub stall_after: Duration,
    /// Extra stall window per level below depth 1, so the peer nearest a fault reports first.
    pub stall_step_per_depth: Duration,
    /// Periodic report interval; while stalled, `stalled` is repeated this often.
    pub report_interval: Duration,
    /// Use the STUN/TURN servers from `welcome` (tests on loopback turn this off).
    pub use_ice_servers: bool,
    /// One-way delay added to every datagram this peer's media connections send
    /// (link emulation for tests and measurements; zero: none). See [`crate::netem`].
    pub link_delay: Duration,
    /// UDP ports the media sockets bind, one connection per free port, taken in turn
    /// (`None`: any port). Behind a router that forwards exactly these ports (a full-cone
    /// mapping), every connection is reachable from anywhere.
    pub udp_ports: Option<RangeInclusive<u16>>,
}

impl PeerConfig {
    /// Defaults: 127.0.0.1, 500 kbit/s at 25 fps, reports every second, and a stall window
    /// of 0.5 s plus 0.1 s per level below depth 1. The browser waits 1 s because a page's
    /// main thread can block for that long; a native relay's RTP arrives every frame (40 ms)
    /// and 300 peers on a loaded 2-core machine showed no gap that long in steady state
    /// (docs/performance.md, "Native peer"), while the window is most of an interruption.
    pub fn new(url: impl Into<String>, room: impl Into<String>, role: Role) -> Self {
        Self {
            url: url.into(),
            other_urls: Vec::new(),
            room: room.into(),
            role,
            token: None,
            uplink_kbps: None,
            stream_kbps: 500,
            fps: 25,
            bind_ip: IpAddr::from([127, 0, 0, 1]),
            child_queue: 256,
            stall_after: Duration::from_millis(500),
            stall_step_per_depth: Duration::from_millis(100),
            report_interval: Duration::from_millis(1000),
            use_ice_servers: true,
            link_delay: Duration::ZERO,
            udp_ports: None,
        }
    }
}

/// A handle on a running peer.
pub struct Peer {
    stats: Arc<Stats>,
    upstream: Arc<Upstream>,
    status: watch::Receiver<Status>,
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

enum Command {
    Leave,
    LeaveNow,
    Kill,
}

impl Peer {
    /// Starts the peer on the current tokio runtime.
    pub fn start(config: PeerConfig) -> Result<Self, PeerError> {
        let room = RoomId::new(config.room.clone()).map_err(|e| PeerError::Room(e.to_string()))?;
        let mut agent_config = AgentConfig::new(room, config.role);
        agent_config.token = config.token.clone();
        agent_config.uplink_kbps = config.uplink_kbps;
        agent_config.stall_after = config.stall_after;
        agent_config.stall_step_per_depth = config.stall_step_per_depth;
        // A native relay sends nothing when its own parent fails (no decoder concealment),
        // so "no bytes" and "no frames" are the same signal: let the depth-stepped stall
        // window decide rather than the depth-blind silence rule.
        agent_config.silence_after = Duration::from_secs(3600);
        agent_config.report_interval = config.report_interval;
        // Media is sampled every tick (50 ms), so a short window after
        // `parent_disconnected` still spans several samples.
        agent_config.parent_lost_after = Duration::from_millis(200);
        let agent = Agent::new(agent_config);
        let stats = Arc::new(Stats::default());
        stats.started_us.store(now_us(), Ordering::Relaxed);
        let upstream = Arc::new(Upstream {
            is_broadcaster: config.role == Role::Broadcaster,
            parent: Mutex::new(None),
            wake: Notify::new(),
            want_keyframe: AtomicBool::new(true),
            stats: stats.clone(),
        });
        let (status_tx, status) = watch::channel(agent.status());
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let driver = Driver {
            config,
            agent,
            start: Instant::now(),
            stats: stats.clone(),
            status: status_tx,
            events_tx,
            events,
            commands: commands_rx,
            ws: None,
            ws_epoch: 0,
            url_turn: 0,
            ws_reader: None,
            conns: HashMap::new(),
            next_gen: 0,
            fanout: Arc::new(Mutex::new(HashMap::new())),
            source: None,
            last_report: (0, 0),
            upstream: upstream.clone(),
            keyframe_task: None,
            delivered_at: Duration::ZERO,
            delivered_bytes: HashMap::new(),
            delivered: Vec::new(),
            nat_probe: None,
            next_udp_port: 0,
            active_parent: Arc::new(AtomicU64::new(0)),
            standby: HashMap::new(),
        };
        let task = tokio::spawn(driver.run());
        Ok(Self {
            stats,
            upstream,
            status,
            commands,
            task,
        })
    }

    /// The agent's latest status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Media counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Asks for a keyframe as a decoder would after loss: a PLI to the parent (subject to
    /// the same coalescing as requests from children); the broadcaster marks its next frame.
    pub fn request_keyframe(&self) {
        self.upstream.request();
    }

    /// Leaves the room as a viewer's own leave control does: a relay first hands its
    /// children over (`leave` with `linger`: it keeps forwarding until the room has moved
    /// each of them, at most the agent's `linger_max`), then closes every connection; the
    /// call waits for the peer to stop.
    pub async fn leave(self) {
        let _ = self.commands.send(Command::Leave);
        let _ = self.task.await;
    }

    /// Leaves the room at once (`leave` without `linger`), as a closing page does: its
    /// children lose it without warning. Waits for the peer to stop.
    pub async fn leave_now(self) {
        let _ = self.commands.send(Command::LeaveNow);
        let _ = self.task.await;
    }

    /// Dies abruptly: no `leave`, no WebSocket close frame, media stops at once. The
    /// WebRTC connections are still `close()`d (dropping them would leak their drivers);
    /// the remote ends get no faster signal from that than from a crash.
    pub async fn kill(self) {
        let _ = self.commands.send(Command::Kill);
        let _ = self.task.await;
    }
}

type WsSink = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

enum Event {
    WsText(u64, String),
    WsClosed(u64),
    Candidate(PeerId, u64, RTCIceCandidateInit),
    Track(PeerId, u64, Arc<dyn TrackRemote>),
    State(PeerId, u64, RTCPeerConnectionState),
    NatProbed(Result<nat::ProbeResult, nat::NatProbeError>),
}

/// A packet on its way to a child, with the time the relay read it off its parent's track
/// (`None` for the broadcaster's own packets).
struct Forward {
    packet: rtp::Packet,
    read_at: Option<Instant>,
}

struct ChildTx {
    tx: mpsc::Sender<Forward>,
}

type Fanout = Arc<Mutex<HashMap<PeerId, ChildTx>>>;

struct Conn {
    generation: u64,
    pc: Arc<dyn PeerConnection>,
    remote_set: bool,
    pending: Vec<RTCIceCandidateInit>,
    tasks: Vec<JoinHandle<()>>,
    /// Parent connection: bytes received on it (reset per connection, as the agent wants).
    /// Child connection: payload bytes `write_rtp` accepted for it.
    bytes: Arc<AtomicU64>,
    is_parent: bool,
    /// A standby link (`OpenStandby`), idle until `UseStandby`, with what the peer would
    /// become. A standby parent's reader does not forward (its generation is never the
    /// active one) and the watchdog does not sample it; a standby child's queue is kept
    /// here, out of the fan-out, so nothing is written to it.
    standby: Option<StandbyRole>,
    idle_child: Option<ChildTx>,
    /// The connection's latest state (a failed standby is not used).
    state: RTCPeerConnectionState,
    /// Cleared when the connection closes, so its link watcher (which may be mid-step on
    /// another worker when it is aborted) cannot write its kind back after the removal.
    open: Arc<AtomicBool>,
    /// Whether a link watcher runs (ICE may report `connected` again after a blip).
    watching_link: bool,
}

/// Where this peer's keyframe requests go: its parent's track (a PLI on the leg's SSRC),
/// or, for the broadcaster, its own source.
pub(crate) struct Upstream {
    is_broadcaster: bool,
    /// The current parent's track and the SSRC its packets arrive with.
    parent: Mutex<Option<(Arc<dyn TrackRemote>, u32)>>,
    wake: Notify,
    /// Broadcaster: the next frame is a keyframe (the first one is).
    want_keyframe: AtomicBool,
    stats: Arc<Stats>,
}

impl Upstream {
    /// A keyframe is wanted (by a child, or by this peer's own receiver).
    fn request(&self) {
        if self.is_broadcaster {
            self.want_keyframe.store(true, Ordering::Relaxed);
        } else {
            // One stored permit at most: requests during a gap collapse into one.
            self.wake.notify_one();
        }
    }

    fn set_parent(&self, track: Option<(Arc<dyn TrackRemote>, u32)>) {
        if let Ok(mut p) = self.parent.lock() {
            *p = track;
        }
    }

    /// Sends one PLI per wake-up, paced by `gap`.
    async fn run(self: Arc<Self>, gap: Duration) {
        pace(&self.wake, gap, || self.send_pli()).await;
    }

    async fn send_pli(&self) {
        let parent = self.parent.lock().ok().and_then(|p| p.clone());
        // No parent yet: its first packet triggers a request anyway.
        let Some((track, media_ssrc)) = parent else {
            return;
        };
        let pli: Box<dyn rtcp::Packet> = Box::new(PictureLossIndication {
            sender_ssrc: 0,
            media_ssrc,
        });
        if track.write_rtcp(vec![pli]).await.is_ok() {
            self.stats
                .keyframe_requests_sent
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs `send` once per wake-up, then holds off for `gap`. `Notify` keeps at most one
/// permit, so any number of wake-ups during the gap cost exactly one more `send` after it.
async fn pace<F: std::future::Future<Output = ()>>(
    wake: &Notify,
    gap: Duration,
    mut send: impl FnMut() -> F,
) {
    loop {
        wake.notified().await;
        send().await;
        tokio::time::sleep(gap).await;
    }
}

struct Driver {
    config: PeerConfig,
    agent: Agent,
    start: Instant,
    stats: Arc<Stats>,
    status: watch::Sender<Status>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    commands: mpsc::UnboundedReceiver<Command>,
    ws: Option<WsSink>,
    ws_epoch: u64,
    /// Which of the signaller URLs the next connection tries.
    url_turn: usize,
    ws_reader: Option<JoinHandle<()>>,
    conns: HashMap<PeerId, Conn>,
    next_gen: u64,
    fanout: Fanout,
    source: Option<JoinHandle<()>>,
    /// (next_seq, packets_received) at the last measurement, for loss.
    last_report: (u64, u64),
    upstream: Arc<Upstream>,
    keyframe_task: Option<JoinHandle<()>>,
    /// When `delivered` was last computed, and each child's byte counter then.
    delivered_at: Duration,
    delivered_bytes: HashMap<PeerId, u64>,
    /// kbit/s per child over the last report interval.
    delivered: Vec<Delivery>,
    /// The NAT probe, once started (once per peer: the class belongs to the host).
    nat_probe: Option<JoinHandle<()>>,
    /// Offset into `config.udp_ports` where the search for a free port starts next, so a
    /// port whose closed connection is still letting go is not tried first.
    next_udp_port: u16,
    /// Generation of the parent connection whose packets are forwarded: the old parent
    /// while one is being left, else the current one. Only its reader forwards, so
    /// children never get two streams interleaved while a new parent takes over.
    active_parent: Arc<AtomicU64>,
    /// Standby links the room asked for, with what each peer would become: a link whose
    /// connection is missing or failed when used is opened cold in that role.
    standby: HashMap<PeerId, StandbyRole>,
}

struct Handler {
    peer: PeerId,
    generation: u64,
    tx: mpsc::UnboundedSender<Event>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(init) = event.candidate.to_json() {
            let _ = self
                .tx
                .send(Event::Candidate(self.peer, self.generation, init));
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let _ = self
            .tx
            .send(Event::Track(self.peer, self.generation, track));
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self
            .tx
            .send(Event::State(self.peer, self.generation, state));
    }
}

impl Driver {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    async fn run(mut self) {
        if self.config.role == Role::Broadcaster {
            self.source = Some(tokio::spawn(run_source(
                Source::new(
                    self.config.stream_kbps,
                    self.config.fps,
                    0x7EE0_0001,
                    VP8_PT,
                ),
                self.fanout.clone(),
                self.stats.clone(),
                self.upstream.clone(),
            )));
        } else {
            self.keyframe_task = Some(tokio::spawn(
                self.upstream.clone().run(KEYFRAME_REQUEST_GAP),
            ));
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut killed = false;
        loop {
            self.do_actions().await;
            if matches!(
                self.agent.status().phase,
                Phase::Ended | Phase::Failed | Phase::Left
            ) {
                break;
            }
            tokio::select! {
                ev = self.events.recv() => {
                    if let Some(ev) = ev {
                        self.on_event(ev).await;
                    }
                }
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Leave) => {
                        let now = self.now();
                        self.agent.handle(now, Input::LeaveGracefully);
                    }
                    // Without a handle nobody waits for a graceful leave.
                    Some(Command::LeaveNow) | None => {
                        let now = self.now();
                        self.agent.handle(now, Input::Leave);
                    }
                    Some(Command::Kill) => {
                        killed = true;
                        break;
                    }
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
        if !killed {
            // Send what the agent queued (leave), then close the socket politely.
            self.do_actions().await;
            if let Some(mut ws) = self.ws.take() {
                let _ = ws.close().await;
            }
        }
        self.shutdown().await;
    }

    /// Stops everything: tasks first (media stops at once), then the connections.
    async fn shutdown(&mut self) {
        if let Some(t) = self.source.take() {
            t.abort();
        }
        if let Some(t) = self.keyframe_task.take() {
            t.abort();
        }
        if let Some(t) = self.nat_probe.take() {
            t.abort();
        }
        self.upstream.set_parent(None);
        if let Some(t) = self.ws_reader.take() {
            t.abort();
        }
        // Dropping the sink without a close frame: the signaller sees the TCP connection go.
        self.ws = None;
        if let Ok(mut f) = self.fanout.lock() {
            f.clear();
        }
        let conns: Vec<Conn> = self.conns.drain().map(|(_, c)| c).collect();
        for c in &conns {
            for t in &c.tasks {
                t.abort();
            }
        }
        for c in conns {
            let _ = c.pc.close().await;
        }
    }

    fn on_tick(&mut self) {
        let now = self.now();
        self.sample_parent(now);
        if self.agent.poll_timeout().is_some_and(|t| t <= now) {
            self.measure(now);
            self.agent.handle_timeout(now);
        }
    }

    /// Feeds the parent connection's byte counter to the watchdog (every tick, and when
    /// the agent asks). A native relay forwards without decoding, so bytes are its
    /// progress counter.
    fn sample_parent(&mut self, now: Duration) {
        let parent = self.agent.status().parent;
        if let Some(conn) = parent.and_then(|p| self.conns.get(&p)) {
            let bytes = conn.bytes.load(Ordering::Relaxed);
            self.agent.handle(
                now,
                Input::MediaProgress {
                    video_frames: None,
                    bytes,
                },
            );
        }
    }

    /// Feeds loss and latency for the next periodic report.
    fn measure(&mut self, now: Duration) {
        let next_seq = self.stats.next_seq.load(Ordering::Relaxed);
        let received = self.stats.packets_received.load(Ordering::Relaxed);
        let (seq0, rx0) = self.last_report;
        let expected = next_seq.saturating_sub(seq0);
        let got = received.saturating_sub(rx0);
        let loss = (expected > 0 && seq0 > 0)
            .then(|| (1.0 - got as f32 / expected as f32).clamp(0.0, 1.0));
        self.last_report = (next_seq, received);
        let depth = self.agent.status().depth.unwrap_or(1).max(1);
        let hop = self.stats.latency_quantile(0.5).map(|us| us / 1000 / depth);
        // Timeouts other than the report's also land here; recompute the rates only once
        // about a report interval has passed, so each report covers one interval.
        let since = now.saturating_sub(self.delivered_at);
        if since >= self.config.report_interval.mul_f32(0.9) {
            let secs = since.as_secs_f64().max(1e-3);
            let mut delivered = Vec::new();
            let mut bytes_now = HashMap::new();
            for (&peer, conn) in self
                .conns
                .iter()
                .filter(|(_, c)| !c.is_parent && c.standby.is_none())
            {
                let bytes = conn.bytes.load(Ordering::Relaxed);
                // A child opened during the interval counts from zero.
                let before = self.delivered_bytes.get(&peer).copied().unwrap_or(0);
                let kbps = (bytes.saturating_sub(before) as f64 * 8.0 / 1000.0 / secs).round();
                delivered.push(Delivery {
                    peer,
                    kbps: kbps.min(u32::MAX as f64) as u32,
                    // A native relay forwards the RTP it receives as is; the broadcaster's
                    // own stream is no relay.
                    mode: (self.config.role != Role::Broadcaster).then_some(RelayMode::PassThrough),
                });
                bytes_now.insert(peer, bytes);
            }
            delivered.sort_by_key(|d| d.peer);
            self.delivered = delivered;
            self.delivered_bytes = bytes_now;
            self.delivered_at = now;
        }
        self.agent.handle(
            now,
            Input::Measured(Measurements {
                loss,
                hop_latency_ms: hop,
                delivered: self.delivered.clone(),
                link: self.agent.status().parent.and_then(|p| {
                    let links = self.stats.links.lock().ok()?;
                    links.get(&p.0).copied()
                }),
            }),
        );
    }

    async fn do_actions(&mut self) {
        while let Some(action) = self.agent.poll_action() {
            match action {
                Action::OpenSocket => self.open_socket().await,
                Action::CloseSocket => {
                    if let Some(mut ws) = self.ws.take() {
                        let _ = ws.close().await;
                    }
                }
                Action::Send { text } => {
                    self.stats
                        .signalling_bytes_sent
                        .fetch_add(text.len() as u64, Ordering::Relaxed);
                    if text.starts_with(r#"{"type":"report""#) && text.contains("delivered") {
                        self.keep_delivered(&text);
                    }
                    let failed = match self.ws.as_mut() {
                        Some(ws) => ws.send(Message::Text(text.into())).await.is_err(),
                        None => false,
                    };
                    if failed {
                        self.ws = None;
                        let now = self.now();
                        self.agent.handle(now, Input::SocketClosed);
                    }
                }
                Action::OpenParent { peer } => {
                    if let Err(e) = self.open_conn(peer, true).await {
                        tracing::warn!(%peer, "opening the parent connection failed: {e}");
                    }
                }
                Action::OpenChild { peer } => {
                    if let Err(e) = self.open_child(peer).await {
                        tracing::warn!(%peer, "opening a child connection failed: {e}");
                    }
                }
                Action::OpenStandby { peer, role } => {
                    self.standby.insert(peer, role);
                    if let Err(e) = self.open_standby(peer, role).await {
                        tracing::warn!(%peer, "preparing a standby link failed: {e}");
                    }
                }
                Action::UseStandby { peer } => {
                    if let Err(e) = self.use_standby(peer).await {
                        tracing::warn!(%peer, "opening a connection failed: {e}");
                    }
                }
                Action::Close { peer } => {
                    self.standby.remove(&peer);
                    self.close_conn(peer).await
                }
                Action::Signal { from, data } => {
                    if let Err(e) = self.on_signal(from, data).await {
                        tracing::warn!(%from, "a signal failed: {e}");
                    }
                }
                // Ticks sample every 50 ms anyway; answering at once keeps a late tick
                // from delaying the decision.
                Action::SampleMedia => {
                    let now = self.now();
                    self.sample_parent(now);
                }
                Action::Status(status) => {
                    self.note_timeline(&status);
                    self.start_nat_probe(&status);
                    let _ = self.status.send(status);
                }
            }
        }
    }

    /// Once welcomed, probes the NAT class against the signaller's STUN server (when the
    /// peer uses the ICE servers and the signaller runs one); the result comes back as
    /// `Event::NatProbed`.
    fn start_nat_probe(&mut self, status: &Status) {
        if self.nat_probe.is_some() || !self.config.use_ice_servers || status.phase != Phase::Joined
        {
            return;
        }
        let Some(stun) = nat::SignallerStun::find(self.agent.ice_servers()) else {
            return;
        };
        let (bind_ip, tx) = (self.config.bind_ip, self.events_tx.clone());
        let ports = self.config.udp_ports.clone();
        self.nat_probe = Some(tokio::spawn(async move {
            let probed = stun.probe(bind_ip, ports, NAT_PROBE_TIMEOUT).await;
            let _ = tx.send(Event::NatProbed(probed));
        }));
    }

    /// Keeps the `delivered` list of an outgoing report, so tests can see what was sent.
    fn keep_delivered(&self, text: &str) {
        if let Ok(ClientMessage::Report(report)) = serde_json::from_str::<ClientMessage>(text)
            && let Ok(mut last) = self.stats.last_delivered.lock()
        {
            *last = report.delivered;
        }
    }

    /// Timestamps of the repair steps, for the load report's interruption breakdown.
    fn note_timeline(&self, status: &Status) {
        let before = self.status.borrow();
        let now = now_us();
        if status.media == MediaState::Stalled && before.media != MediaState::Stalled {
            self.stats.stalled_us.store(now, Ordering::Relaxed);
            self.stats.stalls.fetch_add(1, Ordering::Relaxed);
        }
        if status.parent.is_some() && status.parent != before.parent {
            self.stats.parent_assigned_us.store(now, Ordering::Relaxed);
            self.stats.parent_changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn open_socket(&mut self) {
        self.ws_epoch += 1;
        let epoch = self.ws_epoch;
        let urls = 1 + self.config.other_urls.len();
        let url = match self.url_turn % urls {
            0 => &self.config.url,
            i => &self.config.other_urls[i - 1],
        };
        let connected = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await;
        if !matches!(connected, Ok(Ok(_))) {
            // That node is down: the next attempt goes to another.
            self.url_turn += 1;
        }
        let now = self.now();
        match connected {
            Ok(Ok((stream, _))) => {
                let (sink, mut source) = stream.split();
                let tx = self.events_tx.clone();
                let stats = self.stats.clone();
                self.ws_reader = Some(tokio::spawn(async move {
                    while let Some(msg) = source.next().await {
                        match msg {
                            Ok(Message::Text(t)) => {
                                stats
                                    .signalling_bytes_received
                                    .fetch_add(t.len() as u64, Ordering::Relaxed);
                                let _ = tx.send(Event::WsText(epoch, t.to_string()));
                            }
                            Ok(Message::Close(_)) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                    let _ = tx.send(Event::WsClosed(epoch));
                }));
                self.ws = Some(sink);
                self.agent.handle(now, Input::SocketOpened);
            }
            _ => self.agent.handle(now, Input::SocketClosed),
        }
    }

    async fn on_event(&mut self, ev: Event) {
        let now = self.now();
        match ev {
            Event::WsText(epoch, text) if epoch == self.ws_epoch => {
                self.agent.handle(now, Input::Text(text));
            }
            Event::WsClosed(epoch) if epoch == self.ws_epoch => {
                self.ws = None;
                self.agent.handle(now, Input::SocketClosed);
            }
            Event::WsText(..) | Event::WsClosed(_) => {}
            Event::NatProbed(Ok(probed)) => {
                tracing::debug!(?probed, "NAT probed");
                let nat = probed.nat;
                if let Ok(mut slot) = self.stats.nat_probe.lock() {
                    *slot = Some(probed);
                }
                self.agent
                    .handle(now, Input::Connectivity(Connectivity { nat, relay: false }));
            }
            Event::NatProbed(Err(e)) => tracing::warn!("the NAT probe failed: {e}"),
            Event::Candidate(peer, generation, init) => {
                if self
                    .conns
                    .get(&peer)
                    .is_some_and(|c| c.generation == generation)
                {
                    let data = serde_json::to_value(&init).unwrap_or(Value::Null);
                    self.agent.handle(now, Input::SendSignal { to: peer, data });
                }
            }
            Event::Track(peer, generation, track) => {
                let receiving = |c: &Conn| c.is_parent || c.standby == Some(StandbyRole::Parent);
                let Some(conn) = self
                    .conns
                    .get_mut(&peer)
                    .filter(|c| c.generation == generation && receiving(c))
                else {
                    return;
                };
                conn.tasks.push(tokio::spawn(read_parent(
                    track,
                    conn.bytes.clone(),
                    self.stats.clone(),
                    self.fanout.clone(),
                    self.upstream.clone(),
                    (generation, self.active_parent.clone()),
                )));
            }
            Event::State(peer, generation, state) => {
                tracing::debug!(%peer, generation, %state, "connection state");
                let Some(conn) = self
                    .conns
                    .get_mut(&peer)
                    .filter(|c| c.generation == generation)
                else {
                    return;
                };
                conn.state = state;
                if let Some(role) = conn.standby {
                    // Idle: no failure report to the room (nothing depends on it yet) and
                    // no link watcher until it is used.
                    let connected = state == RTCPeerConnectionState::Connected;
                    if let Ok(mut held) = self.stats.standby.lock()
                        && let Some(ready) = held.get_mut(&peer.0)
                    {
                        *ready = connected;
                    }
                    if state == RTCPeerConnectionState::Failed {
                        tracing::info!(%peer, ?role, "a standby link failed");
                    }
                    return;
                }
                let is_parent = conn.is_parent;
                // ICE found no path to the parent (nothing arrives, so the stall watchdog,
                // which waits for media to stop, never fires): the room must place this
                // peer elsewhere.
                if state == RTCPeerConnectionState::Failed && is_parent {
                    tracing::info!(%peer, "the link to the parent failed");
                    self.stats.links_failed.fetch_add(1, Ordering::Relaxed);
                    self.agent.handle(now, Input::LinkFailed { peer });
                }
                if state == RTCPeerConnectionState::Connected {
                    self.watch_link(peer);
                    if is_parent {
                        self.stats
                            .parent_connected_us
                            .store(now_us(), Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Starts the link watcher of the connection to `peer` unless one runs.
    fn watch_link(&mut self, peer: PeerId) {
        let turn_ips = if self.config.use_ice_servers {
            turn_server_ips(self.agent.ice_servers())
        } else {
            Vec::new()
        };
        let stats = self.stats.clone();
        if let Some(conn) = self.conns.get_mut(&peer).filter(|c| !c.watching_link) {
            conn.watching_link = true;
            conn.tasks.push(tokio::spawn(watch_link(
                conn.pc.clone(),
                peer,
                conn.open.clone(),
                turn_ips,
                stats,
            )));
        }
    }

    async fn build_pc(&mut self, peer: PeerId) -> Result<Conn, PeerError> {
        self.next_gen += 1;
        let generation = self.next_gen;
        let mut media = MediaEngine::default();
        media
            .register_default_codecs()
            .map_err(|e| PeerError::Setup(e.to_string()))?;
        let registry = register_default_interceptors(Registry::new(), &mut media)
            .map_err(|e| PeerError::Setup(e.to_string()))?
            .with(Slot::from(KEYFRAME_SLOT), KeyframeRequestsToApp::default());
        let ice_servers: Vec<RTCIceServer> = if self.config.use_ice_servers {
            self.agent.ice_servers().iter().map(to_rtc_ice).collect()
        } else {
            Vec::new()
        };
        let rtc_config = RTCConfigurationBuilder::new()
            .with_ice_servers(ice_servers)
            .build();
        let settings = SettingEngineBuilder::new()
            .with_ice_connection_attempts(Some(Duration::from_millis(20)), None)
            .with_ice_timeouts(
                Some(Duration::from_secs(1)),
                Some(Duration::from_secs(2)),
                Some(Duration::from_millis(250)),
            )
            .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
            // A peer-reflexive pair (the remote's check arrived before its trickled host
            // candidate, the usual order when candidates travel through the signaller) is
            // otherwise nominated only after 1 s: every new link would take a second.
            .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
            .build();
        let handler = Arc::new(Handler {
            peer,
            generation,
            tx: self.events_tx.clone(),
        });
        let mut builder = PeerConnectionBuilder::new();
        if !self.config.link_delay.is_zero() {
            builder = builder.with_runtime(Arc::new(DelayedRuntime::new(self.config.link_delay)));
        }
        let pc = builder
            .with_configuration(rtc_config)
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .with_setting_engine(settings)
            .with_handler(handler as Arc<dyn PeerConnectionEventHandler>)
            .with_udp_addrs(vec![self.media_addr()])
            .build()
            .await?;
        Ok(Conn {
            generation,
            pc: Arc::new(pc),
            remote_set: false,
            pending: Vec::new(),
            tasks: Vec::new(),
            bytes: Arc::new(AtomicU64::new(0)),
            is_parent: false,
            standby: None,
            idle_child: None,
            state: RTCPeerConnectionState::New,
            open: Arc::new(AtomicBool::new(true)),
            watching_link: false,
        })
    }

    /// The address the next connection's media socket binds: any port, or the next free
    /// one of `udp_ports` (all taken: any port, and that connection is only as reachable
    /// as the NAT makes it).
    fn media_addr(&mut self) -> String {
        let ip = self.config.bind_ip;
        let Some(ports) = self.config.udp_ports.clone() else {
            return format!("{ip}:0");
        };
        let (first, count) = (*ports.start(), ports.len() as u16);
        for i in 0..count {
            let offset = (self.next_udp_port + i) % count;
            let port = first + offset;
            // Probing with a bind is racy only against other processes: this driver builds
            // its connections one at a time.
            if UdpSocket::bind(SocketAddr::new(ip, port)).is_ok() {
                self.next_udp_port = (offset + 1) % count;
                return format!("{ip}:{port}");
            }
        }
        tracing::warn!("every port of {ports:?} is in use; binding any port");
        format!("{ip}:0")
    }

    async fn open_conn(&mut self, peer: PeerId, is_parent: bool) -> Result<(), PeerError> {
        self.close_conn(peer).await;
        let mut conn = self.build_pc(peer).await?;
        conn.is_parent = is_parent;
        // With no parent being left, the new one is forwarded from its first packet;
        // otherwise it takes over when the old connection closes.
        if is_parent && !self.conns.values().any(|c| c.is_parent) {
            self.active_parent.store(conn.generation, Ordering::Relaxed);
        }
        self.conns.insert(peer, conn);
        Ok(())
    }

    async fn open_child(&mut self, peer: PeerId) -> Result<(), PeerError> {
        let tx = self.open_sending(peer, None).await?;
        if let Ok(mut f) = self.fanout.lock() {
            f.insert(peer, tx);
        }
        Ok(())
    }

    /// Prepares the idle link the room asked for: the connection is set up as for
    /// `OpenParent` or `OpenChild` (offer, ICE, DTLS), but nothing is forwarded from or
    /// to it until `UseStandby`.
    async fn open_standby(&mut self, peer: PeerId, role: StandbyRole) -> Result<(), PeerError> {
        match role {
            StandbyRole::Parent => {
                self.open_conn(peer, false).await?;
                if let Some(c) = self.conns.get_mut(&peer) {
                    c.standby = Some(role);
                }
            }
            StandbyRole::Child => {
                self.open_sending(peer, Some(role)).await?;
            }
        }
        if let Ok(mut held) = self.stats.standby.lock() {
            held.insert(peer.0, false);
        }
        Ok(())
    }

    /// The standby link to `peer` becomes a parent or child link. A standby connection
    /// that is missing or failed is replaced by a new one, as `OpenParent`/`OpenChild`
    /// would open.
    async fn use_standby(&mut self, peer: PeerId) -> Result<(), PeerError> {
        if let Ok(mut held) = self.stats.standby.lock() {
            held.remove(&peer.0);
        }
        let role = self.standby.remove(&peer);
        let usable = self.conns.get(&peer).filter(|c| {
            role.is_some()
                && c.standby == role
                && !matches!(
                    c.state,
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
                )
        });
        let Some(conn) = usable else {
            self.stats.standby_cold.fetch_add(1, Ordering::Relaxed);
            return match role {
                Some(StandbyRole::Parent) => self.open_conn(peer, true).await,
                Some(StandbyRole::Child) => self.open_child(peer).await,
                None => Ok(()),
            };
        };
        let connected = conn.state == RTCPeerConnectionState::Connected;
        let counter = if connected {
            &self.stats.standby_warm
        } else {
            &self.stats.standby_connecting
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let no_parent = !self.conns.values().any(|c| c.is_parent);
        let conn = self.conns.get_mut(&peer).expect("checked above");
        conn.standby = None;
        match role {
            Some(StandbyRole::Parent) => {
                conn.is_parent = true;
                // As in `open_conn`: forwarded from its first packet, or once the parent
                // being left closes.
                if no_parent {
                    self.active_parent.store(conn.generation, Ordering::Relaxed);
                }
                if connected {
                    self.stats
                        .parent_connected_us
                        .store(now_us(), Ordering::Relaxed);
                }
            }
            Some(StandbyRole::Child) => {
                if let Some(tx) = conn.idle_child.take()
                    && let Ok(mut f) = self.fanout.lock()
                {
                    f.insert(peer, tx);
                }
                // The new child needs a keyframe to show anything: ask now rather than
                // wait for its own request to come up.
                self.upstream.request();
            }
            None => {}
        }
        if connected {
            self.watch_link(peer);
        }
        Ok(())
    }

    /// Opens a sending connection to `peer` (a child's, or a standby child's when `standby`
    /// is set) with its track and feeding task, sends the offer, and returns the queue
    /// the fan-out feeds (kept in the connection while it is a standby).
    async fn open_sending(
        &mut self,
        peer: PeerId,
        standby: Option<StandbyRole>,
    ) -> Result<ChildTx, PeerError> {
        self.open_conn(peer, false).await?;
        let generation = self.conns[&peer].generation;
        let pc = self.conns[&peer].pc.clone();
        let ssrc = leg_ssrc(self.agent.status().peer_id, peer, generation);
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            format!("treecast-{ssrc}"),
            format!("treecast-video-{ssrc}"),
            "treecast".to_owned(),
            RtpCodecKind::Video,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec: RTCRtpCodec {
                    mime_type: "video/VP8".to_owned(),
                    clock_rate: 90_000,
                    ..Default::default()
                },
                ..Default::default()
            }],
        )));
        let sender = pc.add_track(track.clone() as Arc<dyn TrackLocal>).await?;
        let offer = pc.create_offer(None).await?;
        pc.set_local_description(offer.clone()).await?;
        let (tx, rx) = mpsc::channel(self.config.child_queue.max(1));
        let written = self.conns[&peer].bytes.clone();
        let feed = tokio::spawn(feed_child(
            rx,
            track.clone(),
            sender,
            ssrc,
            self.stats.clone(),
            written,
        ));
        let feedback = tokio::spawn(read_child_feedback(track, self.upstream.clone()));
        if let Some(c) = self.conns.get_mut(&peer) {
            c.tasks.push(feed);
            c.tasks.push(feedback);
            c.standby = standby;
            if standby.is_some() {
                c.idle_child = Some(ChildTx { tx: tx.clone() });
            }
        }
        let data = serde_json::to_value(&offer)?;
        let now = self.now();
        self.agent.handle(now, Input::SendSignal { to: peer, data });
        Ok(ChildTx { tx })
    }

    async fn close_conn(&mut self, peer: PeerId) {
        if let Ok(mut held) = self.stats.standby.lock() {
            held.remove(&peer.0);
        }
        if let Some(conn) = self.conns.remove(&peer) {
            conn.open.store(false, Ordering::Relaxed);
            if let Ok(mut links) = self.stats.links.lock() {
                links.remove(&peer.0);
            }
            if conn.is_parent {
                if self.active_parent.load(Ordering::Relaxed) == conn.generation {
                    self.upstream.set_parent(None);
                    // The old parent went (its `drop`): the new one takes over.
                    if let Some(next) = self.conns.values().find(|c| c.is_parent) {
                        self.active_parent.store(next.generation, Ordering::Relaxed);
                    }
                }
            } else if let Ok(mut f) = self.fanout.lock() {
                f.remove(&peer);
            }
            for t in &conn.tasks {
                t.abort();
            }
            // Closing waits for the driver; do it off the main loop.
            tokio::spawn(async move {
                let _ = conn.pc.close().await;
            });
        }
    }

    async fn on_signal(&mut self, from: PeerId, data: Value) -> Result<(), PeerError> {
        let Some(conn) = self.conns.get_mut(&from) else {
            return Ok(());
        };
        let kind = data
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if kind == "offer" || kind == "answer" {
            let desc: RTCSessionDescription = serde_json::from_value(data)?;
            conn.pc.set_remote_description(desc).await?;
            conn.remote_set = true;
            for c in std::mem::take(&mut conn.pending) {
                let _ = conn.pc.add_ice_candidate(c).await;
            }
            if kind == "offer" {
                let answer = conn.pc.create_answer(None).await?;
                conn.pc.set_local_description(answer.clone()).await?;
                let data = serde_json::to_value(&answer)?;
                let now = self.now();
                self.agent.handle(now, Input::SendSignal { to: from, data });
            }
        } else if data
            .get("candidate")
            .and_then(Value::as_str)
            .is_some_and(|c| !c.is_empty())
        {
            let init: RTCIceCandidateInit = serde_json::from_value(data)?;
            if conn.remote_set {
                conn.pc.add_ice_candidate(init).await?;
            } else {
                conn.pending.push(init);
            }
        }
        Ok(())
    }
}

fn to_rtc_ice(s: &IceServer) -> RTCIceServer {
    RTCIceServer {
        urls: s.urls.clone(),
        username: s.username.clone().unwrap_or_default(),
        credential: s.credential.clone().unwrap_or_default(),
    }
}

/// IP addresses of the TURN servers among `servers` (`turn:HOST:PORT?…` with HOST an IP).
fn turn_server_ips(servers: &[IceServer]) -> Vec<IpAddr> {
    servers
        .iter()
        .flat_map(|s| &s.urls)
        .filter_map(|url| {
            let rest = url
                .strip_prefix("turn:")
                .or_else(|| url.strip_prefix("turns:"))?;
            let authority = rest.split('?').next()?;
            let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .ok()
        })
        .collect()
}

/// Keeps `stats.links[peer]` at the candidate-pair type ICE selected on `pc`, checked every
/// second (ICE may switch pairs), while `open`. Runs until the connection's tasks are
/// aborted.
async fn watch_link(
    pc: Arc<dyn PeerConnection>,
    peer: PeerId,
    open: Arc<AtomicBool>,
    turn_ips: Vec<IpAddr>,
    stats: Arc<Stats>,
) {
    loop {
        if let Some(kind) = selected_link(pc.as_ref(), &turn_ips).await
            && let Ok(mut links) = stats.links.lock()
            // Checked under the lock, which the closing side takes after clearing `open`.
            && open.load(Ordering::Relaxed)
        {
            links.insert(peer.0, kind);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The type of the candidate pair ICE selected on `pc`, if it selected one.
///
/// A remote candidate that never came through signalling is peer-reflexive, even when it
/// is the far end's TURN relay whose check arrived before its trickled candidate; a
/// peer-reflexive address on a TURN server of ours is that server's relay, so it counts as
/// one.
async fn selected_link(pc: &dyn PeerConnection, turn_ips: &[IpAddr]) -> Option<LinkKind> {
    for transceiver in pc.get_transceivers().await {
        let transport = match transceiver.receiver().await {
            Ok(Some(receiver)) => receiver.transport().await,
            _ => match transceiver.sender().await {
                Ok(Some(sender)) => sender.transport().await,
                _ => continue,
            },
        };
        let Ok(Some(transport)) = transport else {
            continue;
        };
        let Ok(Some(pair)) = transport
            .ice_transport()
            .get_selected_candidate_pair()
            .await
        else {
            continue;
        };
        let (local, remote) = (pair.local(), pair.remote());
        let mut remote_type = remote.typ.to_string();
        if remote_type == "prflx"
            && remote
                .address
                .parse::<IpAddr>()
                .is_ok_and(|ip| turn_ips.contains(&ip))
        {
            remote_type = "relay".to_owned();
        }
        return LinkKind::of_pair(&local.typ.to_string(), &remote_type);
    }
    None
}

/// A distinct SSRC per leg (own id, child id, connection generation).
fn leg_ssrc(me: Option<PeerId>, child: PeerId, generation: u64) -> u32 {
    let me = me.map_or(0, |p| p.0);
    let mut x = me
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(child.0.wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
        .wrapping_add(generation);
    x ^= x >> 29;
    (x as u32) | 1
}

/// Hands a packet to every child's queue; a full queue drops (and counts) for that child only.
fn fan_out(fanout: &Fanout, packet: &rtp::Packet, read_at: Option<Instant>, stats: &Stats) {
    let Ok(children) = fanout.lock() else {
        return;
    };
    for child in children.values() {
        let forward = Forward {
            packet: packet.clone(),
            read_at,
        };
        match child.tx.try_send(forward) {
            Ok(()) => {
                stats.packets_forwarded.fetch_add(1, Ordering::Relaxed);
                stats
                    .bytes_forwarded
                    .fetch_add(packet.payload.len() as u64, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                stats.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

async fn run_source(mut source: Source, fanout: Fanout, stats: Arc<Stats>, up: Arc<Upstream>) {
    let mut every = tokio::time::interval(Duration::from_secs(1) / source.fps());
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        every.tick().await;
        let keyframe = up.want_keyframe.swap(false, Ordering::Relaxed);
        if keyframe {
            stats.keyframes_sent.fetch_add(1, Ordering::Relaxed);
        }
        for packet in source.next_frame(keyframe) {
            stats.packets_sent.fetch_add(1, Ordering::Relaxed);
            fan_out(&fanout, &packet, None, &stats);
        }
    }
}

async fn read_parent(
    track: Arc<dyn TrackRemote>,
    bytes: Arc<AtomicU64>,
    stats: Arc<Stats>,
    fanout: Fanout,
    up: Arc<Upstream>,
    (generation, active): (u64, Arc<AtomicU64>),
) {
    let mut forwarding = false;
    while let Some(event) = track.poll().await {
        if let TrackRemoteEvent::OnRtpPacket(packet) = event {
            let read_at = Instant::now();
            // Counted either way: the agent judges the new parent by these bytes.
            bytes.fetch_add(packet.payload.len() as u64, Ordering::Relaxed);
            if active.load(Ordering::Relaxed) != generation {
                forwarding = false;
                continue; // a new parent while the old one still feeds us
            }
            if !forwarding {
                forwarding = true;
                stats
                    .parent_first_packet_us
                    .store(now_us(), Ordering::Relaxed);
                // The leg's SSRC, as the parent rewrote it: what a PLI must name.
                up.set_parent(Some((track.clone(), packet.header.ssrc)));
                up.request();
            }
            stats.on_received(&packet);
            fan_out(&fanout, &packet, Some(read_at), &stats);
        }
    }
}

/// Reads a child's RTCP feedback (only keyframe requests reach the application) and passes
/// requests up.
async fn read_child_feedback(track: Arc<TrackLocalStaticRTP>, up: Arc<Upstream>) {
    loop {
        match TrackLocal::poll(track.as_ref()).await {
            Some(TrackLocalEvent::OnRtcpPacket(packets)) => {
                if packets.iter().any(|p| is_keyframe_request(p.as_ref())) {
                    up.stats
                        .keyframe_requests_received
                        .fetch_add(1, Ordering::Relaxed);
                    up.request();
                }
            }
            Some(_) => {}
            // Not bound yet (before negotiation) or unbound: look again later; the task
            // is aborted with the connection.
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn feed_child(
    mut rx: mpsc::Receiver<Forward>,
    track: Arc<TrackLocalStaticRTP>,
    sender: Arc<dyn webrtc::rtp_transceiver::RtpSender>,
    ssrc: u32,
    stats: Arc<Stats>,
    written: Arc<AtomicU64>,
) {
    let mut payload_type: Option<u8> = None;
    while let Some(Forward {
        mut packet,
        read_at,
    }) = rx.recv().await
    {
        if payload_type.is_none() {
            payload_type = sender
                .get_parameters()
                .await
                .ok()
                .and_then(|p| p.rtp_parameters.codecs.first().map(|c| c.payload_type));
        }
        let Some(pt) = payload_type else {
            stats.dropped_not_ready.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        packet.header.ssrc = ssrc;
        packet.header.payload_type = pt;
        packet.header.extension = false;
        packet.header.extensions.clear();
        packet.header.extension_profile = 0;
        let len = packet.payload.len() as u64;
        if track.write_rtp(packet).await.is_err() {
            stats.write_errors.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        written.fetch_add(len, Ordering::Relaxed);
        stats.bytes_written.fetch_add(len, Ordering::Relaxed);
        if let Some(t) = read_at {
            stats.hop.push(t.elapsed().as_micros() as u64);
        }
    }
}

fn is_keyframe_request(packet: &dyn rtcp::Packet) -> bool {
    let any = packet.as_any();
    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
}

/// Marks inbound keyframe requests (PLI, FIR) for the application and lets every other
/// inbound RTCP end here, as the chain's terminus would: the default interceptors have
/// already acted on it, and only the application knows where a keyframe comes from.
#[derive(Default)]
struct KeyframeRequestsToApp {
    reads: VecDeque<TaggedPacket>,
    writes: VecDeque<TaggedPacket>,
}

impl rtc::sansio::Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequestsToApp {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = std::time::Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            let requests: Vec<Box<dyn rtcp::Packet>> = packets
                .iter()
                .filter(|p| is_keyframe_request(p.as_ref()))
                .cloned()
                .collect();
            if requests.is_empty() {
                return Ok(());
            }
            msg.message.packet = Packet::Rtcp(requests);
            msg.message.add(Attribute::DeliverToApplication);
        }
        self.reads.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.reads.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.writes.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.writes.pop_front()
    }
}

impl Interceptor for KeyframeRequestsToApp {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real time (the workspace's tokio has no test clock); only bounds that hold however
    /// slow the machine is: a slow machine sends fewer requests, never more.
    #[tokio::test]
    async fn keyframe_requests_are_paced() {
        let wake = Arc::new(Notify::new());
        let sent = Arc::new(AtomicU64::new(0));
        let gap = Duration::from_millis(200);
        let task = {
            let (wake, sent) = (wake.clone(), sent.clone());
            tokio::spawn(async move {
                pace(&wake, gap, || {
                    sent.fetch_add(1, Ordering::Relaxed);
                    std::future::ready(())
                })
                .await
            })
        };
        let count = || sent.load(Ordering::Relaxed);
        let wait_for = |n: u64| {
            let sent = sent.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                while sent.load(Ordering::Relaxed) < n && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        // A hundred children ask at once: one request, plus at most one after the gap.
        for _ in 0..100 {
            wake.notify_one();
        }
        wait_for(1).await;
        tokio::time::sleep(gap * 3).await;
        let after_burst = count();
        assert!((1..=2).contains(&after_burst), "{after_burst}");
        // A later ask is served.
        wake.notify_one();
        wait_for(after_burst + 1).await;
        tokio::time::sleep(gap * 3).await;
        assert!((after_burst + 1..=3).contains(&count()), "{}", count());
        task.abort();
    }
}
