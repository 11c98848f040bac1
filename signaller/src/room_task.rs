//! The task that owns one [`Room`]: the only code that touches the room's state.
//!
//! Connection tasks, HTTP handlers and the shutdown path talk to it through a bounded
//! channel of [`RoomCommand`]s. Each step feeds one input to the room with
//! `now = time since the server started`, then drains the room's outputs:
//!
//! - `Send` goes into the connection's bounded outbound queue without waiting; a full queue
//!   means the client does not read (a slow consumer): its socket is aborted and the room is
//!   told the connection is gone, so the peer keeps its place for the resume grace period;
//! - `Close` asks the connection's writer to close after what is already queued;
//! - `Event` updates the metrics and goes to dashboard subscribers (server-sent events).
//!
//! Between commands the task sleeps until `room.poll_timeout()`. An ended room stays in the
//! registry for [`crate::Limits::ended_room_ttl`] so late visitors hear `room_ended`, then
//! the task removes it and stops. A panic inside the room is caught: the room is closed,
//! its clients get `internal`, the fault is logged and counted, and the server carries on.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot};
use treecast_core::RoomId;
use treecast_core::claim::ClaimKey;
use treecast_core::protocol::{EndReason, ErrorCode, Hello, ServerMessage};
use treecast_core::room::{
    ConnId, Input, Output, Room, RoomConfig, RoomEvent, RoomSettings, RoomSnapshot, Tuning,
};

use crate::access::{self, Admit, LinkKey, PrivateRoom};
use crate::api::{ApiError, check_settings};
use crate::connection::{CloseCode, Outbound};
use crate::rooms::{RoomHandle, RoomStats};
use crate::server::{ServerState, TaskGuard};
use crate::telemetry;

/// Dashboard events buffered per subscriber before it is told it lagged.
const DASHBOARD_BUFFER: usize = 1_024;

/// How long a claim to a place stays valid; renewed past half of it.
const CLAIM_TTL: Duration = Duration::from_secs(12 * 3600);

/// How long a restarted server waits for a lost room's peers to come back with their
/// claims: longer than the clients' longest reconnect delay (5 s), so every live peer is
/// back before the room is rebuilt (it is rebuilt sooner once the broadcaster and every
/// claimed parent are back).
pub(crate) const RESTORE_WINDOW: Duration = Duration::from_secs(7);

/// A room's broadcaster token and link key, derived from the server's key, the room's id
/// and its incarnation: a restarted server with the same key knows them again.
pub(crate) fn room_secrets(key: &ClaimKey, id: &RoomId, inc: u64) -> (String, LinkKey) {
    let parts: [&[u8]; 2] = [id.as_str().as_bytes(), &inc.to_be_bytes()];
    let token = key.derive("treecast broadcaster token", &parts);
    let token = token[..16].iter().map(|b| format!("{b:02x}")).collect();
    let link = LinkKey::from_bytes(key.derive("treecast link key", &parts));
    (token, link)
}

/// What other tasks ask of a room task.
#[derive(Debug)]
pub(crate) enum RoomCommand {
    /// A connection sent `hello` for this room; `outbound` is where its messages go.
    Hello {
        /// The connection.
        conn: ConnId,
        /// Its `hello`.
        hello: Hello,
        /// Its outbound queue.
        outbound: Outbound,
    },
    /// A later message, sign of life or close of a connection that joined this room, as
    /// the room takes it (`Message`, `Alive`, `Disconnected`).
    Input(Input),
    /// The whole room, for `GET /api/rooms/{room}`.
    Snapshot(oneshot::Sender<RoomSnapshot>),
    /// A dashboard subscription: the room as it is now, then every event after it.
    Subscribe(oneshot::Sender<(RoomSnapshot, broadcast::Receiver<DashboardEvent>)>),
    /// End the room (server shutdown). With [`EndReason::Shutdown`] the task stops after
    /// telling its peers, without keeping a tombstone.
    End(EndReason),
    /// Let go of every peer without ending the room (a restartable server shutting
    /// down): they reconnect to the next start and present their claims.
    Suspend,
    /// An operator's settings change (already checked against the server's limits); the
    /// answer is the room's settings after it.
    Reconfigure(Tuning, oneshot::Sender<Result<RoomSettings, ApiError>>),
}

/// One room event, serialized once for every dashboard subscriber.
#[derive(Debug, Clone)]
pub(crate) struct DashboardEvent {
    /// The server-sent event name: `tree`, `joined`, `left`, ...
    pub name: &'static str,
    /// The [`RoomEvent`] as JSON.
    pub json: Arc<str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// What woke the task.
enum Wake {
    Command(Option<RoomCommand>),
    Timer(Duration),
    Expired,
}

/// The room task's state. Built by [`RoomTask::new`], consumed by [`RoomTask::run`].
pub(crate) struct RoomTask {
    id: RoomId,
    room: Room,
    state: Arc<ServerState>,
    commands: mpsc::Receiver<RoomCommand>,
    stats: Arc<RoomStats>,
    /// Outbound queues of the connections bound to this room, by connection.
    links: HashMap<ConnId, Outbound>,
    dashboard: broadcast::Sender<DashboardEvent>,
    /// Connections found to be slow consumers while draining outputs; fed back as
    /// disconnects once the drain is done.
    lost: Vec<ConnId>,
    /// When the room ended, to drop the tombstone later.
    ended_at: Option<Instant>,
    /// A private room's door: which `hello`s may reach the room at all.
    private: Option<PrivateRoom>,
    /// The connection whose `hello` is being fed to the room, and how it got in: its
    /// `welcome` (if any) is seen while the outputs drain.
    admitting: Option<(ConnId, Admit)>,
    /// Keeps the server's shutdown waiting for this task.
    _task: TaskGuard,
}

impl RoomTask {
    /// A room task and the handle to reach it, with the room's own settings (the server's
    /// `[room]` settings, with the stream the broadcaster chose). With a `link_key` the
    /// room is private: viewers need a link signed with it. Register the handle, then
    /// spawn `run`.
    pub(crate) fn new(
        state: &Arc<ServerState>,
        id: RoomId,
        inc: u64,
        seed: u64,
        config: RoomConfig,
        private: bool,
    ) -> (Self, RoomHandle) {
        let (token, link_key) = room_secrets(&state.claim_key, &id, inc);
        let link_key = private.then_some(link_key);
        let mut room = Room::new(id.clone(), token.clone(), config, seed, state.now());
        room.set_unix_epoch(state.start_unix);
        room.enable_claims(state.claim_key.clone(), inc, CLAIM_TTL, private);
        Self::with_room(state, id, room, token, link_key)
    }

    /// A room this server lost (it restarted) to be rebuilt from the claims its peers
    /// present ([`Room::restoring`]); `inc` and `private` come from the first, verified,
    /// claim.
    pub(crate) fn restoring(
        state: &Arc<ServerState>,
        id: RoomId,
        inc: u64,
        private: bool,
        seed: u64,
    ) -> (Self, RoomHandle) {
        let (token, link_key) = room_secrets(&state.claim_key, &id, inc);
        let link_key = private.then_some(link_key);
        let room = Room::restoring(
            id.clone(),
            token.clone(),
            state.config.room.clone(),
            seed,
            state.now(),
            state.start_unix,
            state.claim_key.clone(),
            inc,
            CLAIM_TTL,
            private,
            RESTORE_WINDOW,
        );
        Self::with_room(state, id, room, token, link_key)
    }

    fn with_room(
        state: &Arc<ServerState>,
        id: RoomId,
        room: Room,
        token: String,
        link_key: Option<LinkKey>,
    ) -> (Self, RoomHandle) {
        let (tx, commands) = mpsc::channel(state.config.limits.room_queue);
        let stats = Arc::new(RoomStats::default());
        let handle_token: Arc<str> = token.as_str().into();
        let link_key = link_key.map(Arc::new);
        let private = link_key
            .as_ref()
            .map(|key| PrivateRoom::new(Arc::clone(key), id.clone(), Arc::clone(&handle_token)));
        let (dashboard, _) = broadcast::channel(DASHBOARD_BUFFER);
        let task = Self {
            id,
            room,
            state: Arc::clone(state),
            commands,
            stats: Arc::clone(&stats),
            links: HashMap::new(),
            dashboard,
            lost: Vec::new(),
            ended_at: None,
            private,
            admitting: None,
            _task: state.tasks.enter(),
        };
        (
            task,
            RoomHandle {
                commands: tx,
                stats,
                token: handle_token,
                link_key,
                remote: false,
            },
        )
    }

    /// The driver loop; returns when the room is gone.
    pub(crate) async fn run(mut self) {
        tracing::info!(room = %self.id, "room opened");
        loop {
            let timer = self.room.poll_timeout();
            let expiry = self
                .ended_at
                .map(|at| at + self.state.config.limits.ended_room_ttl);
            let wake = tokio::select! {
                cmd = self.commands.recv() => Wake::Command(cmd),
                () = sleep_until(timer.map(|t| self.state.start + t)) => {
                    Wake::Timer(timer.unwrap_or_default())
                }
                () = sleep_until(expiry) => Wake::Expired,
            };
            let flow = match wake {
                Wake::Command(Some(cmd)) => self.command(cmd),
                Wake::Command(None) | Wake::Expired => Flow::Stop,
                Wake::Timer(due) => self.input(Input::Tick, due),
            };
            if flow == Flow::Stop {
                break;
            }
        }
        self.finish();
    }

    fn command(&mut self, cmd: RoomCommand) -> Flow {
        match cmd {
            RoomCommand::Hello {
                conn,
                hello,
                outbound,
            } => {
                let admit = match &self.private {
                    None => Admit::Free,
                    // A signed claim to a place is checked by the room itself.
                    Some(_) if hello.claim.is_some() && hello.resume.is_some() => Admit::Free,
                    Some(door) => match door.admit(&hello, access::now_unix()) {
                        Ok(admit) => admit,
                        Err(code) => {
                            self.refuse_at_door(conn, &outbound, code);
                            return Flow::Continue;
                        }
                    },
                };
                self.links.insert(conn, outbound);
                self.admitting = Some((conn, admit));
                let flow = self.input(Input::Hello { conn, hello }, Duration::ZERO);
                self.admitting = None;
                flow
            }
            RoomCommand::Input(input) => {
                if let Input::Disconnected { conn } = &input {
                    self.links.remove(conn);
                }
                self.input(input, Duration::ZERO)
            }
            RoomCommand::Snapshot(reply) => match self.guarded(|room| room.snapshot()) {
                Some(snapshot) => {
                    let _ = reply.send(snapshot);
                    Flow::Continue
                }
                None => Flow::Stop,
            },
            RoomCommand::Subscribe(reply) => {
                let events = self.dashboard.subscribe();
                match self.guarded(|room| room.snapshot()) {
                    Some(snapshot) => {
                        let _ = reply.send((snapshot, events));
                        Flow::Continue
                    }
                    None => Flow::Stop,
                }
            }
            RoomCommand::Reconfigure(tuning, reply) => {
                if self.room.ended().is_some() {
                    let _ = reply.send(Err(ApiError::new(ErrorCode::RoomEnded)));
                    return Flow::Continue;
                }
                // Checked here, against the settings the room has now: a combination is
                // refused as a whole, before anything moves.
                let mut after = self.room.config().settings();
                after.root_fanout = tuning.root_fanout.unwrap_or(after.root_fanout);
                after.relay_fanout = tuning.relay_fanout.unwrap_or(after.relay_fanout);
                after.max_depth = tuning.max_depth.unwrap_or(after.max_depth);
                after.max_peers = tuning.max_peers.unwrap_or(after.max_peers);
                if let Err(e) = check_settings(&after, &tuning) {
                    let _ = reply.send(Err(e));
                    return Flow::Continue;
                }
                tracing::info!(room = %self.id, ?tuning, "room settings changed by the operator");
                let flow = self.input(Input::Reconfigure(tuning), Duration::ZERO);
                let _ = reply.send(Ok(self.room.config().settings()));
                flow
            }
            RoomCommand::Suspend => {
                for (_, link) in self.links.drain() {
                    link.close(CloseCode::GoingAway);
                }
                Flow::Stop
            }
            RoomCommand::End(reason) => {
                let flow = self.input(Input::End(reason), Duration::ZERO);
                if reason == EndReason::Shutdown {
                    Flow::Stop
                } else {
                    flow
                }
            }
        }
    }

    /// Refuses a `hello` at a private room's door. `unknown_room` goes out exactly as the
    /// connection layer sends it for a room that does not exist.
    fn refuse_at_door(&mut self, conn: ConnId, outbound: &Outbound, code: ErrorCode) {
        tracing::debug!(room = %self.id, conn = conn.0, code = code.as_str(), "refused at a private room's door");
        telemetry::error_sent(code);
        outbound.send(ServerMessage::error(code));
        outbound.close(CloseCode::Normal);
        self.publish(&RoomEvent::Refused { code });
    }

    /// Time on the room's clock, never earlier than `floor` (the timer being served).
    fn now(&self, floor: Duration) -> Duration {
        self.state.now().max(floor)
    }

    /// Feeds one input and drains the outputs.
    fn input(&mut self, input: Input, floor: Duration) -> Flow {
        let now = self.now(floor);
        if self.guarded(|room| room.handle(now, input)).is_none() {
            return Flow::Stop;
        }
        self.drain()
    }

    /// Runs `f` on the room; on a panic, closes the room down and returns `None`.
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Room) -> T) -> Option<T> {
        let room = &mut self.room;
        match std::panic::catch_unwind(AssertUnwindSafe(|| f(room))) {
            Ok(v) => Some(v),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(room = %self.id, "room failed on a server bug and was closed: {what}");
                telemetry::room_fault();
                let msg = ServerMessage::error_with(
                    ErrorCode::Internal,
                    "The room failed on the server and was closed; please join again.",
                );
                for (_, link) in self.links.drain() {
                    link.send(msg.clone());
                    link.close(CloseCode::Internal);
                }
                None
            }
        }
    }

    /// Drains the room's outputs, feeding slow consumers back as disconnects.
    fn drain(&mut self) -> Flow {
        // Publish first: a client that reads its message and then asks the HTTP API must
        // see the state that message came from.
        self.publish_stats();
        let mut lost_any = false;
        loop {
            while let Some(out) = self.room.poll_output() {
                match out {
                    Output::Send { conn, msg } => {
                        self.note_welcome(conn, &msg);
                        if let Some(link) = self.links.get(&conn)
                            && !link.send(msg)
                        {
                            tracing::debug!(room = %self.id, conn = conn.0, "slow consumer closed");
                            telemetry::error_sent(ErrorCode::SlowConsumer);
                            self.links.remove(&conn);
                            self.lost.push(conn);
                        }
                    }
                    Output::Close { conn } => {
                        if let Some(link) = self.links.remove(&conn) {
                            link.close(CloseCode::Normal);
                        }
                    }
                    Output::Event(event) => self.publish(&event),
                }
            }
            if self.lost.is_empty() {
                break;
            }
            lost_any = true;
            let now = self.now(Duration::ZERO);
            for conn in std::mem::take(&mut self.lost) {
                if self
                    .guarded(|room| room.handle(now, Input::Disconnected { conn }))
                    .is_none()
                {
                    return Flow::Stop;
                }
            }
        }
        if lost_any {
            self.publish_stats();
        }
        if self.ended_at.is_none() && self.room.ended().is_some() {
            self.ended_at = Some(Instant::now());
        }
        Flow::Continue
    }

    /// Tells a private room's door about a `welcome`: the resume token it carries opens
    /// the door from now on, and a new peer let in by a link uses it once.
    fn note_welcome(&mut self, conn: ConnId, msg: &ServerMessage) {
        let (
            Some(door),
            ServerMessage::Welcome {
                peer_id,
                resume,
                resumed,
                ..
            },
        ) = (&mut self.private, msg)
        else {
            return;
        };
        let admit = match &self.admitting {
            Some((c, admit)) if *c == conn => admit,
            _ => &Admit::Free,
        };
        door.welcomed(*peer_id, resume, *resumed, admit);
    }

    fn publish(&mut self, event: &RoomEvent) {
        if let (Some(door), RoomEvent::Left { peer, .. }) = (&mut self.private, event) {
            door.left(*peer);
        }
        telemetry::room_event(event);
        if let RoomEvent::Ended { reason } = event {
            tracing::info!(room = %self.id, reason = telemetry::end_reason(*reason), "room ended");
        }
        if self.dashboard.receiver_count() == 0 {
            return;
        }
        match serde_json::to_string(event) {
            Ok(json) => {
                let _ = self.dashboard.send(DashboardEvent {
                    name: event_name(event),
                    json: json.into(),
                });
            }
            Err(e) => tracing::warn!(room = %self.id, "cannot encode a room event: {e}"),
        }
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        let viewers = self.room.viewers();
        let root = u32::from(self.room.tree().root().is_some());
        s.live.store(self.room.is_live(), Ordering::Relaxed);
        s.ended
            .store(self.room.ended().is_some(), Ordering::Relaxed);
        s.viewers.store(viewers, Ordering::Relaxed);
        s.peers.store(viewers + root, Ordering::Relaxed);
        s.max_depth
            .store(self.room.tree().max_depth(), Ordering::Relaxed);
    }

    /// Leaves the registry and closes whatever connection is still bound.
    fn finish(mut self) {
        self.state.rooms.remove(&self.id, &self.stats);
        self.stats.peers.store(0, Ordering::Relaxed);
        for (_, link) in self.links.drain() {
            link.close(CloseCode::GoingAway);
        }
        tracing::info!(room = %self.id, "room closed");
    }
}

/// The server-sent event name of a room event.
fn event_name(event: &RoomEvent) -> &'static str {
    match event {
        RoomEvent::Joined { .. } => "joined",
        RoomEvent::Disconnected { .. } => "disconnected",
        RoomEvent::Left { .. } => "left",
        RoomEvent::Repaired { .. } => "repaired",
        RoomEvent::Capacity { .. } => "capacity",
        RoomEvent::Tree(_) => "tree",
        RoomEvent::Refused { .. } => "refused",
        RoomEvent::Ended { .. } => "ended",
        RoomEvent::Connectivity { .. } => "connectivity",
        RoomEvent::Link { .. } => "link",
        RoomEvent::LinkFailed { .. } => "link_failed",
        RoomEvent::Media { .. } => "media",
        RoomEvent::Reconfigured(_) => "reconfigured",
        RoomEvent::ClaimRefused { .. } => "claim_refused",
        RoomEvent::Restored(_) => "restored",
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
