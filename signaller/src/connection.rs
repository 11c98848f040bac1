//! One WebSocket connection: a reader (this task) and a writer task.
//!
//! The reader enforces the limits a client must keep (frame size, message rate, `hello`
//! first and within a deadline), decodes text frames with
//! [`ClientMessage::decode`] and routes them: before joining only `hello` is accepted, and it
//! is sent to the room it names; after that every message goes to that room's task.
//!
//! The writer drains a bounded [`Outbound`] queue filled by the room task and the reader,
//! serializes each [`ServerMessage`] with `to_json`, and pings the client every heartbeat
//! interval (its pongs reach the room as `Alive`). Closing is always "after what is queued",
//! except for an abort (slow consumer, flood), which closes at once.
//!
//! Client mistakes are answered with an `error` message; those that make the connection
//! useless (unknown room, flood, no `hello` in time, too many connections) also close it.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::ws::{self, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use treecast_core::RoomId;
use treecast_core::protocol::{ClientMessage, ErrorCode, Hello, PROTOCOL_VERSION, ServerMessage};
use treecast_core::room::{ConnId, Input};

use crate::cluster::bus::RoomMeta;
use crate::rate::{Admission, FloodWindow, TokenBucket};
use crate::room_task::{RoomCommand, RoomTask, room_secrets};
use crate::rooms::RoomHandle;
use crate::server::{IpSlot, ServerState};
use crate::telemetry;

/// Source of connection ids, unique for the life of the process.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// How long a closing connection waits for the client's close reply (or for its writer to
/// get the close frame out) before dropping the socket.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Most queued messages written before one flush.
const WRITE_BATCH: usize = 64;

/// Read buffer per socket: signalling messages are small, and 10⁴ sockets × the default
/// 128 KiB would be over a gigabyte.
const READ_BUFFER: usize = 8 * 1024;

/// Write buffer per socket before a write goes to the kernel.
const WRITE_BUFFER: usize = 8 * 1024;

/// WebSocket close codes the server uses (RFC 6455 §7.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum CloseCode {
    /// 1000: done (room ended, left, refused).
    Normal,
    /// 1001: the server is going away.
    GoingAway,
    /// 1008: the client broke a rule (flood, too many connections, no `hello` in time).
    Policy,
    /// 1008 too, naming the reason: the client did not read what it was sent.
    SlowConsumer,
    /// 1009: a frame above the hard size cap.
    TooBig,
    /// 1011: a server fault.
    Internal,
}

impl CloseCode {
    fn frame(self) -> ws::CloseFrame {
        let (code, reason) = match self {
            Self::Normal => (1000, ""),
            Self::GoingAway => (1001, "server going away"),
            Self::Policy => (1008, "policy violation"),
            Self::SlowConsumer => (1008, "slow consumer"),
            Self::TooBig => (1009, "message too big"),
            Self::Internal => (1011, "server error"),
        };
        ws::CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }
    }
}

/// What the writer is asked to do.
#[derive(Debug)]
enum Outgoing {
    /// Serialize and send.
    Message(ServerMessage),
    /// Close after what is queued before this.
    Close(CloseCode),
}

/// Sends an abort to the writer: close now, dropping what is queued.
#[derive(Debug, Default)]
struct Abort {
    notify: Notify,
    code: Mutex<Option<CloseCode>>,
}

impl Abort {
    fn code(&self) -> CloseCode {
        let code = self
            .code
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        code.unwrap_or(CloseCode::Normal)
    }
}

/// The sending side of a connection's outbound queue, held by the reader and by the room
/// task the connection joined. Never waits: a full queue means a slow consumer.
#[derive(Debug, Clone)]
pub(crate) struct Outbound {
    queue: mpsc::Sender<Outgoing>,
    abort: Arc<Abort>,
}

impl Outbound {
    fn new(capacity: usize) -> (Self, mpsc::Receiver<Outgoing>, Arc<Abort>) {
        let (queue, rx) = mpsc::channel(capacity);
        let abort = Arc::new(Abort::default());
        (
            Self {
                queue,
                abort: Arc::clone(&abort),
            },
            rx,
            abort,
        )
    }

    /// Queues a message. Returns `false` if the client is a slow consumer: its queue was
    /// full, and the connection is being aborted.
    pub(crate) fn send(&self, msg: ServerMessage) -> bool {
        match self.queue.try_send(Outgoing::Message(msg)) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.abort(CloseCode::SlowConsumer);
                false
            }
        }
    }

    /// Closes the connection after what is already queued.
    pub(crate) fn close(&self, code: CloseCode) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.queue.try_send(Outgoing::Close(code))
        {
            self.abort(code);
        }
    }

    /// Closes the connection now, dropping what is queued.
    fn abort(&self, code: CloseCode) {
        self.abort
            .code
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(code);
        self.abort.notify.notify_one();
    }
}

/// The receiving end of an [`Outbound`] whose messages do not go to a local socket: in
/// cluster mode, a room's owner forwards what it sends a peer connected to another node.
#[derive(Debug)]
pub(crate) struct Detached {
    queue: mpsc::Receiver<Outgoing>,
    abort: Arc<Abort>,
}

/// An outbound queue read by a [`Detached`] instead of a socket writer.
pub(crate) fn detached(capacity: usize) -> (Outbound, Detached) {
    let (outbound, queue, abort) = Outbound::new(capacity);
    (outbound, Detached { queue, abort })
}

impl Detached {
    /// The next messages (at least one, at most `max`), with the close code if the
    /// connection is to be closed after them. `None` once every sender is gone.
    pub(crate) async fn next_batch(
        &mut self,
        max: usize,
    ) -> Option<(Vec<ServerMessage>, Option<CloseCode>)> {
        let first = tokio::select! {
            biased;
            () = self.abort.notify.notified() => {
                return Some((Vec::new(), Some(self.abort.code())));
            }
            next = self.queue.recv() => next?,
        };
        let mut messages = Vec::new();
        let mut next = Some(first);
        while let Some(o) = next.take() {
            match o {
                Outgoing::Message(m) => messages.push(m),
                Outgoing::Close(code) => return Some((messages, Some(code))),
            }
            if messages.len() < max {
                next = self.queue.try_recv().ok();
            }
        }
        Some((messages, None))
    }
}

/// Makes this process's connection ids start at `base`, so that ids from the nodes of a
/// cluster never meet in one room.
pub(crate) fn set_conn_base(base: u64) {
    NEXT_CONN.fetch_max(base, Ordering::Relaxed);
}

/// `GET /ws`: upgrades to a WebSocket with the configured size caps.
pub(crate) async fn upgrade(
    State(state): State<Arc<ServerState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    let cap = state.config.max_frame_bytes();
    let slot = state
        .ip_slots
        .acquire(addr.ip(), state.config.limits.max_connections_per_ip);
    let task = state.tasks.enter();
    ws.max_message_size(cap)
        .max_frame_size(cap)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(cap.saturating_mul(2).max(1 << 20))
        .on_failed_upgrade(|e| tracing::debug!("WebSocket upgrade failed: {e}"))
        .on_upgrade(move |socket| async move {
            let _task = task;
            serve_socket(socket, state, addr.ip(), slot).await;
        })
}

/// How processing one frame left the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Keep reading.
    Continue,
    /// The server asked the writer to close; read only to see the client's close reply.
    Closing,
    /// The client closed.
    Closed,
}

/// The reader's state.
struct Connection {
    conn: ConnId,
    ip: IpAddr,
    state: Arc<ServerState>,
    outbound: Outbound,
    /// The room this connection joined, once its `hello` was routed.
    room: Option<RoomHandle>,
    bucket: TokenBucket,
    flood: FloodWindow,
}

async fn serve_socket(
    socket: WebSocket,
    state: Arc<ServerState>,
    ip: IpAddr,
    slot: Option<IpSlot>,
) {
    let conn = ConnId(NEXT_CONN.fetch_add(1, Ordering::Relaxed));
    telemetry::connection_opened();
    let (sink, stream) = socket.split();
    let limits = &state.config.limits;
    let (outbound, queue, abort) = Outbound::new(limits.outbound_queue);
    let writer = tokio::spawn(write_loop(
        sink,
        queue,
        abort,
        state.config.room.heartbeat_interval,
    ));
    let now = Instant::now();
    let rate = state.config.room.messages_per_second;
    let mut connection = Connection {
        conn,
        ip,
        outbound,
        room: None,
        bucket: TokenBucket::new(rate, limits.message_burst, now),
        flood: FloodWindow::new(rate),
        state,
    };
    let flow = if slot.is_none() {
        tracing::debug!(conn = conn.0, %ip, "too many connections from this address");
        connection.refuse_and_close(ErrorCode::TooManyConnections, None, CloseCode::Policy)
    } else {
        Flow::Continue
    };
    connection.run(stream, writer, flow).await;
    telemetry::connection_closed();
    drop(slot);
}

impl Connection {
    async fn run(
        &mut self,
        mut stream: SplitStream<WebSocket>,
        mut writer: JoinHandle<()>,
        mut flow: Flow,
    ) {
        let hello_deadline = Instant::now() + self.state.config.limits.hello_timeout;
        let mut shutdown = self.state.shutdown.subscribe();
        if *shutdown.borrow() {
            shutdown.mark_changed();
        }
        let mut writer_done = false;
        let mut read_error = None;
        while flow != Flow::Closed {
            let waiting_for_hello = self.room.is_none() && flow == Flow::Continue;
            tokio::select! {
                biased;
                _ = &mut writer, if !writer_done => {
                    writer_done = true;
                    break;
                }
                () = tokio::time::sleep_until(hello_deadline), if waiting_for_hello => {
                    flow = self.refuse_and_close(ErrorCode::Timeout, Some("No \"hello\" arrived in time."), CloseCode::Policy);
                }
                _ = shutdown.changed(), if waiting_for_hello => {
                    flow = if self.state.restartable {
                        // Not an error to the client: the next start takes it back.
                        self.outbound.close(CloseCode::GoingAway);
                        Flow::Closing
                    } else {
                        self.refuse_and_close(ErrorCode::ShuttingDown, None, CloseCode::GoingAway)
                    };
                }
                frame = stream.next() => match frame {
                    None => flow = Flow::Closed,
                    Some(Err(e)) => {
                        read_error = Some(e);
                        flow = Flow::Closed;
                    }
                    Some(Ok(Message::Close(_))) => flow = Flow::Closed,
                    Some(Ok(msg)) if flow == Flow::Continue => flow = self.on_frame(msg).await,
                    Some(Ok(_)) => {} // closing: only waiting for the client's close reply
                },
            }
        }
        if let Some(room) = self.room.take() {
            let _ = room
                .commands
                .send(RoomCommand::Input(Input::Disconnected { conn: self.conn }))
                .await;
        }
        if writer_done {
            // The writer sent its close frame: give the client a moment to answer it, so
            // the socket is not reset while our last messages are still in flight.
            let _ = tokio::time::timeout(CLOSE_LINGER, async {
                while let Some(Ok(msg)) = stream.next().await {
                    if matches!(msg, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
        if !writer_done {
            let code = match read_error {
                Some(e) => {
                    tracing::debug!(conn = self.conn.0, ip = %self.ip, "read failed: {e}");
                    if is_capacity_error(e) {
                        telemetry::error_sent(ErrorCode::TooLarge);
                        CloseCode::TooBig
                    } else {
                        CloseCode::Normal
                    }
                }
                None => CloseCode::Normal,
            };
            self.outbound.abort(code);
            if tokio::time::timeout(CLOSE_LINGER, &mut writer)
                .await
                .is_err()
            {
                writer.abort();
            }
            if code == CloseCode::TooBig {
                // The oversized frame is still unread in the socket: closing now would reset
                // the connection and could destroy our close frame before the client reads
                // it. Hold the socket a moment first.
                tokio::time::sleep(CLOSE_LINGER).await;
            }
        }
        drop(stream);
    }

    async fn on_frame(&mut self, msg: Message) -> Flow {
        let now = Instant::now();
        match msg {
            Message::Text(text) => {
                telemetry::message_in();
                match self.admit(now) {
                    Some(flow) => flow,
                    None => self.on_text(text.as_str()).await,
                }
            }
            Message::Binary(_) => {
                telemetry::message_in();
                match self.admit(now) {
                    Some(flow) => flow,
                    None => self.refuse(ErrorCode::BinaryFrame, None),
                }
            }
            Message::Ping(_) => {
                // Answered by the WebSocket layer; only counts against a flood.
                if self.flood.record(now) {
                    self.flooded()
                } else {
                    Flow::Continue
                }
            }
            Message::Pong(_) => {
                if let Some(room) = &self.room {
                    // A lost sign of life is harmless: the next pong or message carries one.
                    let _ = room
                        .commands
                        .try_send(RoomCommand::Input(Input::Alive { conn: self.conn }));
                }
                Flow::Continue
            }
            Message::Close(_) => Flow::Closed,
        }
    }

    /// Applies the rate limits. `None`: process the message; `Some(flow)`: it was dropped.
    fn admit(&mut self, now: Instant) -> Option<Flow> {
        if self.flood.record(now) {
            return Some(self.flooded());
        }
        match self.bucket.admit(now) {
            Admission::Pass => None,
            Admission::Warn => Some(self.refuse(ErrorCode::RateLimited, None)),
            Admission::Drop => Some(Flow::Continue),
        }
    }

    fn flooded(&mut self) -> Flow {
        tracing::debug!(conn = self.conn.0, ip = %self.ip, "message flood; closing");
        self.refuse_and_close(
            ErrorCode::RateLimited,
            Some("Far too many messages; the connection is closed."),
            CloseCode::Policy,
        )
    }

    async fn on_text(&mut self, text: &str) -> Flow {
        let max = self.state.config.room.max_message_bytes as usize;
        if text.len() > max {
            let sentence = format!(
                "The message is {} bytes; this server accepts at most {max}.",
                text.len()
            );
            return self.refuse(ErrorCode::TooLarge, Some(&sentence));
        }
        match ClientMessage::decode(text) {
            Err(e) => {
                telemetry::error_sent(e.code);
                self.send(e.to_message())
            }
            Ok(msg) => self.route(msg).await,
        }
    }

    async fn route(&mut self, msg: ClientMessage) -> Flow {
        match (&self.room, msg) {
            (Some(room), msg) => {
                let cmd = RoomCommand::Input(Input::Message {
                    conn: self.conn,
                    msg,
                });
                if room.commands.send(cmd).await.is_err() {
                    self.room = None;
                    return self.refuse_and_close(
                        ErrorCode::Internal,
                        Some("The room is no longer available; join again."),
                        CloseCode::GoingAway,
                    );
                }
                Flow::Continue
            }
            (None, ClientMessage::Hello(hello)) => self.join(hello).await,
            (None, _) => self.refuse(ErrorCode::NotJoined, None),
        }
    }

    async fn join(&mut self, hello: Hello) -> Flow {
        if hello.v != PROTOCOL_VERSION {
            let sentence = format!(
                "This server speaks protocol version {PROTOCOL_VERSION}, not {}.",
                hello.v
            );
            return self.refuse_and_close(
                ErrorCode::UnsupportedVersion,
                Some(&sentence),
                CloseCode::Normal,
            );
        }
        let mut found = self.state.rooms.get(&hello.room);
        if found.is_none() {
            found = self.remote(&hello.room).await;
        }
        let room = match found {
            Some(room) => room,
            None => match self.restore(&hello).await {
                Ok(Some(room)) => room,
                Ok(None) => {
                    return self.refuse_and_close(ErrorCode::UnknownRoom, None, CloseCode::Normal);
                }
                Err(None) => {
                    // Another node is taking the room back right now: the client comes
                    // back in a moment and finds it (no error: it would give up).
                    self.outbound.close(CloseCode::GoingAway);
                    return Flow::Closing;
                }
                Err(Some(code)) => return self.refuse_and_close(code, None, CloseCode::Normal),
            },
        };
        let cmd = RoomCommand::Hello {
            conn: self.conn,
            hello,
            outbound: self.outbound.clone(),
        };
        if room.commands.send(cmd).await.is_err() {
            return self.refuse_and_close(ErrorCode::UnknownRoom, None, CloseCode::Normal);
        }
        self.room = Some(room);
        Flow::Continue
    }

    /// Cluster mode: a room owned by another node, reached through a proxy that forwards
    /// this node's connections to the owner (one proxy per room and node).
    async fn remote(&self, room: &RoomId) -> Option<RoomHandle> {
        let node = self.state.cluster.as_ref()?;
        let meta = match node.remote_meta(room).await {
            Ok(meta) => meta?,
            Err(e) => {
                tracing::warn!(%room, "looking the room up in the cluster: {e}");
                return None;
            }
        };
        let (token, link_key) = room_secrets(&self.state.claim_key, room, meta.inc);
        let stats = Arc::<crate::rooms::RoomStats>::default();
        let handle = RoomHandle {
            commands: node.proxy(&self.state, room.clone(), meta, Arc::clone(&stats)),
            stats,
            token: token.into(),
            link_key: meta.private.then(|| Arc::new(link_key)),
            remote: true,
        };
        let max = self.state.config.limits.max_rooms;
        match self.state.rooms.add(room.clone(), handle.clone(), max) {
            Ok(()) => Some(handle),
            Err(_) => self.state.rooms.get(room),
        }
    }

    /// A `hello` with a claim for a room this server does not have (it restarted): a
    /// genuine claim opens the room again, to be rebuilt from its peers' claims.
    /// `Err(None)`: try again shortly (in a cluster, the room is being taken back
    /// elsewhere); `Err(Some(code))`: refused.
    async fn restore(&self, hello: &Hello) -> Result<Option<RoomHandle>, Option<ErrorCode>> {
        let Some(token) = hello.claim.as_deref() else {
            return Ok(None);
        };
        if self.state.is_shutting_down() {
            return Ok(None);
        }
        let claim = self
            .state
            .claim_key
            .verify(token, crate::access::now_unix())
            .map_err(|reason| {
                telemetry::room_event(&treecast_core::room::RoomEvent::ClaimRefused { reason });
                Some(ErrorCode::BadClaim)
            })?;
        if claim.room != hello.room {
            return Err(Some(ErrorCode::BadClaim));
        }
        // In a cluster, only the node that takes the room's lease rebuilds it.
        let lease = match &self.state.cluster {
            None => None,
            Some(node) => match node.take(&claim.room).await {
                Ok(Some(lease)) => Some(lease),
                // Held already: by this node (another peer's restore got here first) or
                // another, whose meta may not be written yet.
                Ok(None) => {
                    if let Some(room) = self.state.rooms.get(&claim.room) {
                        return Ok(Some(room));
                    }
                    return self.remote(&claim.room).await.map(Some).ok_or(None);
                }
                Err(e) => {
                    tracing::warn!(room = %claim.room, "taking the room in the cluster: {e}");
                    return Err(None);
                }
            },
        };
        let seed = crate::rooms::random_seed().map_err(|_| Some(ErrorCode::Internal))?;
        let (task, handle) = RoomTask::restoring(
            &self.state,
            claim.room.clone(),
            claim.inc,
            claim.private,
            seed,
        );
        let max = self.state.config.limits.max_rooms;
        match self
            .state
            .rooms
            .add(claim.room.clone(), handle.clone(), max)
        {
            Ok(()) => {
                tracing::info!(room = %claim.room, "taking a room back from its peers' claims");
                tokio::spawn(task.run());
                if let (Some(node), Some(lease)) = (&self.state.cluster, lease) {
                    let meta = RoomMeta {
                        inc: claim.inc,
                        private: claim.private,
                    };
                    if let Err(e) = node.serve(lease, meta, &handle, true).await {
                        tracing::warn!(room = %claim.room, "serving the room in the cluster: {e}");
                    }
                }
                Ok(Some(handle))
            }
            // Another peer of the room got here first.
            Err(crate::rooms::AddError::Taken) => Ok(self.state.rooms.get(&hello.room)),
            Err(crate::rooms::AddError::Full) => Err(Some(ErrorCode::TooManyRooms)),
        }
    }

    fn send(&mut self, msg: ServerMessage) -> Flow {
        if self.outbound.send(msg) {
            Flow::Continue
        } else {
            telemetry::error_sent(ErrorCode::SlowConsumer);
            Flow::Closing
        }
    }

    /// Answers with an `error` and keeps the connection.
    fn refuse(&mut self, code: ErrorCode, sentence: Option<&str>) -> Flow {
        telemetry::error_sent(code);
        let msg = match sentence {
            Some(s) => ServerMessage::error_with(code, s),
            None => ServerMessage::error(code),
        };
        self.send(msg)
    }

    /// Answers with an `error`, then closes after it.
    fn refuse_and_close(
        &mut self,
        code: ErrorCode,
        sentence: Option<&str>,
        close: CloseCode,
    ) -> Flow {
        self.refuse(code, sentence);
        self.outbound.close(close);
        Flow::Closing
    }
}

/// Whether a read failed on the hard size cap.
fn is_capacity_error(e: axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let inner = e.into_inner();
    inner
        .downcast_ref::<WsError>()
        .is_some_and(|e| matches!(e, WsError::Capacity(_)))
}

/// The writer task: drains the outbound queue, pings, and closes.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Outgoing>,
    abort: Arc<Abort>,
    heartbeat: Duration,
) {
    let mut ping = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut batch: Vec<Message> = Vec::with_capacity(WRITE_BATCH);
    let close = loop {
        let first = tokio::select! {
            biased;
            () = abort.notify.notified() => break abort.code(),
            item = queue.recv() => item,
            _ = ping.tick() => {
                batch.push(Message::Ping(Default::default()));
                None
            }
        };
        let mut close = None;
        let mut next = first;
        let mut sent = 0u64;
        while let Some(item) = next.take() {
            match item {
                Outgoing::Message(msg) => {
                    batch.push(Message::text(msg.to_json()));
                    sent += 1;
                }
                Outgoing::Close(code) => {
                    close = Some(code);
                    break;
                }
            }
            if batch.len() >= WRITE_BATCH {
                break;
            }
            next = queue.try_recv().ok();
        }
        if batch.is_empty() && close.is_none() {
            // Every sender is gone: the connection is over.
            break CloseCode::Normal;
        }
        let write = async {
            for msg in batch.drain(..) {
                sink.feed(msg).await?;
            }
            sink.flush().await
        };
        let written = tokio::select! {
            biased;
            () = abort.notify.notified() => break abort.code(),
            r = write => r,
        };
        if written.is_err() {
            return; // the socket is gone
        }
        telemetry::messages_out(sent);
        if let Some(code) = close {
            break code;
        }
    };
    let _ =
        tokio::time::timeout(CLOSE_LINGER, sink.send(Message::Close(Some(close.frame())))).await;
}
