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
//!   the subtree below keeps its connections.
//!
//! The media watchdog feeds the agent the bytes received from the current parent
//! connection every tick; the agent reports `stalled` when they stop advancing (and repeats
//! it with every periodic report while stalled).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use treecast_core::agent::{Action, Agent, AgentConfig, Input, Measurements, Phase, Status};
use treecast_core::protocol::{IceServer, Role};
use treecast_core::{PeerId, RoomId};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCIceServer, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState, RTCSessionDescription, Registry, SettingEngineBuilder,
    register_default_interceptors,
};

use crate::media::{Source, Stats};

/// Payload type the broadcaster stamps (VP8's in the crate's default codec table). Relays
/// rewrite it to each leg's negotiated one anyway.
const VP8_PT: u8 = 96;
/// How often the driver feeds media progress to the agent and checks its timers.
const TICK: Duration = Duration::from_millis(50);

/// Settings of one native peer.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The signaller's WebSocket URL, e.g. `ws://127.0.0.1:9000/ws`.
    pub url: String,
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
}

impl PeerConfig {
    /// Defaults: 127.0.0.1, 500 kbit/s at 25 fps, 1 s stall window, reports every second.
    pub fn new(url: impl Into<String>, room: impl Into<String>, role: Role) -> Self {
        Self {
            url: url.into(),
            room: room.into(),
            role,
            token: None,
            uplink_kbps: None,
            stream_kbps: 500,
            fps: 25,
            bind_ip: IpAddr::from([127, 0, 0, 1]),
            child_queue: 256,
            stall_after: Duration::from_millis(1000),
            stall_step_per_depth: Duration::from_millis(400),
            report_interval: Duration::from_millis(1000),
            use_ice_servers: true,
        }
    }
}

/// A handle on a running peer.
pub struct Peer {
    stats: Arc<Stats>,
    status: watch::Receiver<Status>,
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

enum Command {
    Leave,
    Kill,
}

impl Peer {
    /// Starts the peer on the current tokio runtime.
    pub fn start(config: PeerConfig) -> Result<Self, String> {
        let room = RoomId::new(config.room.clone()).map_err(|e| e.to_string())?;
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
        let agent = Agent::new(agent_config);
        let stats = Arc::new(Stats::default());
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
            ws_reader: None,
            conns: HashMap::new(),
            next_gen: 0,
            fanout: Arc::new(Mutex::new(HashMap::new())),
            source: None,
            last_report: (0, 0),
        };
        let task = tokio::spawn(driver.run());
        Ok(Self {
            stats,
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

    /// Leaves the room (`leave`), closes every connection and waits for the peer to stop.
    pub async fn leave(self) {
        let _ = self.commands.send(Command::Leave);
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
}

struct ChildTx {
    tx: mpsc::Sender<rtp::Packet>,
}

type Fanout = Arc<Mutex<HashMap<PeerId, ChildTx>>>;

struct Conn {
    generation: u64,
    pc: Arc<dyn PeerConnection>,
    remote_set: bool,
    pending: Vec<RTCIceCandidateInit>,
    tasks: Vec<JoinHandle<()>>,
    /// Parent connection: bytes received on it (reset per connection, as the agent wants).
    bytes: Arc<AtomicU64>,
    is_parent: bool,
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
    ws_reader: Option<JoinHandle<()>>,
    conns: HashMap<PeerId, Conn>,
    next_gen: u64,
    fanout: Fanout,
    source: Option<JoinHandle<()>>,
    /// (next_seq, packets_received) at the last measurement, for loss.
    last_report: (u64, u64),
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
            )));
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
                    Some(Command::Leave) | None => {
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
        if self.agent.poll_timeout().is_some_and(|t| t <= now) {
            self.measure(now);
            self.agent.handle_timeout(now);
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
        self.agent.handle(
            now,
            Input::Measured(Measurements {
                loss,
                hop_latency_ms: hop,
                delivered: Vec::new(),
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
                Action::Close { peer } => self.close_conn(peer).await,
                Action::Signal { from, data } => {
                    if let Err(e) = self.on_signal(from, data).await {
                        tracing::warn!(%from, "a signal failed: {e}");
                    }
                }
                Action::Status(status) => {
                    let _ = self.status.send(status);
                }
            }
        }
    }

    async fn open_socket(&mut self) {
        self.ws_epoch += 1;
        let epoch = self.ws_epoch;
        let connected = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(self.config.url.as_str()),
        )
        .await;
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
                let Some(conn) = self
                    .conns
                    .get_mut(&peer)
                    .filter(|c| c.generation == generation && c.is_parent)
                else {
                    return;
                };
                conn.tasks.push(tokio::spawn(read_parent(
                    track,
                    conn.bytes.clone(),
                    self.stats.clone(),
                    self.fanout.clone(),
                )));
            }
            Event::State(peer, generation, state) => {
                tracing::debug!(%peer, generation, %state, "connection state");
            }
        }
    }

    async fn build_pc(&mut self, peer: PeerId) -> Result<Conn, String> {
        self.next_gen += 1;
        let generation = self.next_gen;
        let mut media = MediaEngine::default();
        media.register_default_codecs().map_err(|e| e.to_string())?;
        let registry = register_default_interceptors(Registry::new(), &mut media)
            .map_err(|e| e.to_string())?;
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
            .build();
        let handler = Arc::new(Handler {
            peer,
            generation,
            tx: self.events_tx.clone(),
        });
        let pc = PeerConnectionBuilder::new()
            .with_configuration(rtc_config)
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .with_setting_engine(settings)
            .with_handler(handler as Arc<dyn PeerConnectionEventHandler>)
            .with_udp_addrs(vec![format!("{}:0", self.config.bind_ip)])
            .build()
            .await
            .map_err(|e| e.to_string())?;
        Ok(Conn {
            generation,
            pc: Arc::new(pc),
            remote_set: false,
            pending: Vec::new(),
            tasks: Vec::new(),
            bytes: Arc::new(AtomicU64::new(0)),
            is_parent: false,
        })
    }

    async fn open_conn(&mut self, peer: PeerId, is_parent: bool) -> Result<(), String> {
        self.close_conn(peer).await;
        let mut conn = self.build_pc(peer).await?;
        conn.is_parent = is_parent;
        self.conns.insert(peer, conn);
        Ok(())
    }

    async fn open_child(&mut self, peer: PeerId) -> Result<(), String> {
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
        let sender = pc
            .add_track(track.clone() as Arc<dyn TrackLocal>)
            .await
            .map_err(|e| e.to_string())?;
        let offer = pc.create_offer(None).await.map_err(|e| e.to_string())?;
        pc.set_local_description(offer.clone())
            .await
            .map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel(self.config.child_queue.max(1));
        let task = tokio::spawn(feed_child(rx, track, sender, ssrc, self.stats.clone()));
        if let Some(c) = self.conns.get_mut(&peer) {
            c.tasks.push(task);
        }
        if let Ok(mut f) = self.fanout.lock() {
            f.insert(peer, ChildTx { tx });
        }
        let data = serde_json::to_value(&offer).map_err(|e| e.to_string())?;
        let now = self.now();
        self.agent.handle(now, Input::SendSignal { to: peer, data });
        Ok(())
    }

    async fn close_conn(&mut self, peer: PeerId) {
        if let Some(conn) = self.conns.remove(&peer) {
            if !conn.is_parent
                && let Ok(mut f) = self.fanout.lock()
            {
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

    async fn on_signal(&mut self, from: PeerId, data: Value) -> Result<(), String> {
        let Some(conn) = self.conns.get_mut(&from) else {
            return Ok(());
        };
        let kind = data
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if kind == "offer" || kind == "answer" {
            let desc: RTCSessionDescription =
                serde_json::from_value(data).map_err(|e| e.to_string())?;
            conn.pc
                .set_remote_description(desc)
                .await
                .map_err(|e| e.to_string())?;
            conn.remote_set = true;
            for c in std::mem::take(&mut conn.pending) {
                let _ = conn.pc.add_ice_candidate(c).await;
            }
            if kind == "offer" {
                let answer = conn
                    .pc
                    .create_answer(None)
                    .await
                    .map_err(|e| e.to_string())?;
                conn.pc
                    .set_local_description(answer.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                let data = serde_json::to_value(&answer).map_err(|e| e.to_string())?;
                let now = self.now();
                self.agent.handle(now, Input::SendSignal { to: from, data });
            }
        } else if data
            .get("candidate")
            .and_then(Value::as_str)
            .is_some_and(|c| !c.is_empty())
        {
            let init: RTCIceCandidateInit =
                serde_json::from_value(data).map_err(|e| e.to_string())?;
            if conn.remote_set {
                conn.pc
                    .add_ice_candidate(init)
                    .await
                    .map_err(|e| e.to_string())?;
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
fn fan_out(fanout: &Fanout, packet: &rtp::Packet, stats: &Stats) {
    let Ok(children) = fanout.lock() else {
        return;
    };
    for child in children.values() {
        match child.tx.try_send(packet.clone()) {
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

async fn run_source(mut source: Source, fanout: Fanout, stats: Arc<Stats>) {
    let mut every = tokio::time::interval(Duration::from_secs(1) / source.fps());
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        every.tick().await;
        for packet in source.next_frame() {
            stats.packets_sent.fetch_add(1, Ordering::Relaxed);
            fan_out(&fanout, &packet, &stats);
        }
    }
}

async fn read_parent(
    track: Arc<dyn TrackRemote>,
    bytes: Arc<AtomicU64>,
    stats: Arc<Stats>,
    fanout: Fanout,
) {
    while let Some(event) = track.poll().await {
        if let TrackRemoteEvent::OnRtpPacket(packet) = event {
            bytes.fetch_add(packet.payload.len() as u64, Ordering::Relaxed);
            stats.on_received(&packet);
            fan_out(&fanout, &packet, &stats);
        }
    }
}

async fn feed_child(
    mut rx: mpsc::Receiver<rtp::Packet>,
    track: Arc<TrackLocalStaticRTP>,
    sender: Arc<dyn webrtc::rtp_transceiver::RtpSender>,
    ssrc: u32,
    stats: Arc<Stats>,
) {
    let mut payload_type: Option<u8> = None;
    while let Some(mut packet) = rx.recv().await {
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
        if track.write_rtp(packet).await.is_err() {
            stats.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}
