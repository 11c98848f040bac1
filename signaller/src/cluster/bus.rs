//! Cluster mode's message path: any node takes any peer's WebSocket (an *edge*); the room's
//! *owner* runs the room task, unchanged.
//!
//! - **Edge → owner**: an edge forwards what its peers send (their `hello`, messages, signs
//!   of life and disconnects) to the room's Redis Stream `tc:{ROOM}:in`, batched per wake-up
//!   in one pipeline. The owner reads the stream (a dedicated connection blocked on
//!   `XREAD`) and feeds each entry to its room task as if the connection were local.
//! - **Owner → edge**: for a peer connected elsewhere the owner's room task writes into a
//!   [`Detached`] queue; a forwarder drains it and publishes the batch on the edge's channel
//!   `tc:edge:{NODE}`, through the fenced script, so an owner that lost its lease can no
//!   longer reach anyone. Each batch carries the room's fencing epoch and a per-connection
//!   sequence number.
//! - **Gaps**: pub/sub keeps nothing, so a message lost while an edge's subscription was
//!   down shows as a jump in the sequence (or, after a reconnect, as a subscription that may
//!   have missed anything). The edge then closes those peers' WebSockets: their clients
//!   resume at once (through any node) and get an authoritative status, while their media
//!   never stopped. Messages stamped with an epoch older than the newest seen are dropped.
//! - **Reports stay at the edge**: a media report goes to the owner only if it changes what
//!   the owner decides on (media state, loss over the threshold, uplink, link kind, relay
//!   modes), or every 30 s. Once a second the edge sends one entry listing its peers whose
//!   reports changed nothing, with their age ([`Input::Unchanged`]): the owner's liveness
//!   and sibling evidence stay as fresh as with every report, at a cost per viewer that no
//!   longer grows with the report rate.
//! - **Takeover**: each edge looks at its rooms' owners once a second. A new owner gets the
//!   edge's peers' `hello`s again, each with the resume token and latest claim the edge saw
//!   the old owner give it. When nobody holds a room (its owner died and the lease
//!   expired), the edges race for the lease (epoch above any seen); the winner opens the
//!   room as [`treecast_core::room::Room::restoring`], reads the stream from its end, and
//!   its own peers go straight to the new room task. Peers keep their sockets throughout.
//!
//! Connection ids are unique across the cluster: each node takes a number from
//! `tc:nodes:seq` at start and numbers its connections from `number << 40`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::{StreamRangeReply, StreamReadReply};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use treecast_core::PeerId;
use treecast_core::RoomId;
use treecast_core::protocol::{
    ClientMessage, Hello, LinkKind, MediaState, RelayMode, Report, ServerMessage,
};
use treecast_core::room::{ConnId, Input};

use super::{ClusterError, Epoch, Fenced, Holder, Lease, LeaseConfig, Leases, RoomKeys};
use crate::connection::{self, CloseCode, Detached, Outbound};
use crate::room_task::{RoomCommand, RoomTask};
use crate::rooms::{RoomHandle, RoomStats};
use crate::server::ServerState;
use crate::telemetry;

/// Entries kept in a room's input stream (approximately), to bound its memory: the owner
/// reads entries as they come, and a new owner starts at the end.
const STREAM_MAXLEN: u64 = 100_000;

/// How long one `XREAD` waits for entries.
const READ_BLOCK: Duration = Duration::from_millis(1000);

/// Entries read from the input stream per `XREAD`.
const READ_COUNT: usize = 512;

/// Messages to one peer published in one batch at most.
const BATCH: usize = 64;

/// How often an edge looks at the owner of a room it forwards to: a third of the lease,
/// so a dead owner is replaced within about a lease and a half.
const OWNER_CHECK: Duration = Duration::from_millis(1000);

/// Looks (one a second) at a room with no owner and no peer here before the proxy stops.
const GONE_AFTER: u32 = 5;

/// What an edge's look at a room's owner decided.
enum Watch {
    /// Keep forwarding to the owner.
    Remote,
    /// This node owns the room now: its task's channel.
    Local(mpsc::Sender<RoomCommand>),
    /// The room is over for this node: the proxy stops.
    Gone,
}

/// One `XADD` of an input to a room's stream.
fn xadd(
    pipe: &mut redis::Pipeline,
    stream: &str,
    node: &str,
    conn: ConnId,
    kind: &str,
    data: Option<&[u8]>,
) {
    let cmd = pipe
        .cmd("XADD")
        .arg(stream)
        .arg("MAXLEN")
        .arg("~")
        .arg(STREAM_MAXLEN)
        .arg("*")
        .arg("e")
        .arg(node)
        .arg("c")
        .arg(conn.0)
        .arg("k")
        .arg(kind);
    if let Some(d) = data {
        cmd.arg("d").arg(d);
    }
    cmd.ignore();
}

/// What an edge does with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Next in line: deliver it.
    Deliver,
    /// From an owner older than the newest seen for the room: drop it.
    Stale,
    /// Something before it was lost: the peer resumes.
    Gap,
}

/// Orders a batch stamped `(epoch, seq)`: `newest` is the newest epoch seen for the room,
/// `link_epoch` and `next` the connection's owner epoch and expected sequence number (a new
/// owner numbers from 1). Advances them for a delivered batch.
fn order(newest: &mut u64, link_epoch: &mut u64, next: &mut u64, epoch: u64, seq: u64) -> Order {
    if epoch < *newest {
        return Order::Stale;
    }
    *newest = epoch;
    if epoch > *link_epoch {
        *link_epoch = epoch;
        *next = 1;
    }
    if seq != *next {
        return Order::Gap;
    }
    *next += 1;
    Order::Deliver
}

/// What a room's owner stores about it for the other nodes (`tc:{ROOM}:meta`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct RoomMeta {
    /// The room's incarnation (its secrets derive from it).
    pub inc: u64,
    /// Viewers need a signed link.
    pub private: bool,
}

/// One batch from an owner to one of an edge's connections.
#[derive(Debug, Serialize, Deserialize)]
struct Batch {
    /// The room.
    r: RoomId,
    /// The owner's fencing epoch.
    ep: u64,
    /// The connection.
    c: u64,
    /// Its sequence number, from 1 per connection.
    s: u64,
    /// The messages.
    m: Vec<ServerMessage>,
    /// Close the connection after them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<CloseCode>,
}

/// A connection of this node whose room is owned by another node.
#[derive(Debug)]
struct EdgeLink {
    room: RoomId,
    outbound: Outbound,
    /// Its `hello`, with the resume token and latest claim the owner gave it since: after
    /// a failover it is sent again, so the new owner puts the peer back in place.
    hello: Hello,
    /// The epoch of the owner it hears from.
    epoch: u64,
    /// The sequence number expected next from that owner.
    next: u64,
    /// What its last report forwarded to the owner said, and when.
    reported: Option<(Digest, std::time::Instant)>,
    /// When the latest report kept here (it changed nothing) arrived, until the owner is
    /// told ([`Input::Unchanged`]).
    heard: Option<std::time::Instant>,
}

/// What in a media report changes the owner's decisions: reports that change none of it
/// stay at the edge (a viewer reports every 2 s; at 10^6 viewers that would be 500,000
/// messages a second through Redis).
#[derive(Debug, Clone, PartialEq)]
struct Digest {
    state: MediaState,
    /// Loss above the room's threshold.
    lossy: bool,
    uplink_kbps: Option<u32>,
    link: Option<LinkKind>,
    modes: Vec<(PeerId, RelayMode)>,
}

impl Digest {
    fn of(report: &Report, loss_threshold: f32) -> Self {
        let mut modes: Vec<(PeerId, RelayMode)> = report
            .delivered
            .iter()
            .filter_map(|d| d.mode.map(|m| (d.peer, m)))
            .collect();
        modes.sort_unstable_by_key(|&(p, _)| p);
        Self {
            state: report.state,
            lossy: report.loss.is_some_and(|l| l > loss_threshold),
            uplink_kbps: report.uplink_kbps,
            link: report.link,
            modes,
        }
    }
}

/// A report that changes nothing is still forwarded this often, so the owner's view of
/// latency and delivered bitrates (dashboards) is never older than this.
const REPORT_REFRESH: Duration = Duration::from_secs(30);

impl EdgeLink {
    /// The `hello` to send a new owner: as the client sent it, with the resume token and
    /// claim the owner gave it since (a never-welcomed join stays a plain join).
    fn hello_again(&self) -> Hello {
        self.hello.clone()
    }
}

/// This node in the cluster.
#[derive(Debug)]
pub(crate) struct Node {
    /// Its name in leases and channels.
    pub id: String,
    client: redis::Client,
    conn: ConnectionManager,
    leases: Leases,
    /// Connections on this node bound to rooms owned elsewhere.
    links: Mutex<HashMap<ConnId, EdgeLink>>,
    /// Newest epoch seen per remote room.
    epochs: Mutex<HashMap<RoomId, u64>>,
    /// Outbound queue length per forwarded connection.
    queue: usize,
    /// Loss above this, in a report, is forwarded at once.
    loss_threshold: f32,
}

impl Node {
    /// Joins the cluster at `url`: a node number for connection ids, a connection manager
    /// for commands, and this node's channel subscription.
    pub(crate) async fn start(
        url: &str,
        queue: usize,
        loss_threshold: f32,
    ) -> Result<Arc<Self>, ClusterError> {
        let redis_err = |op| move |source| ClusterError::Redis { op, source };
        let client = redis::Client::open(url).map_err(redis_err("connect"))?;
        let mut conn = super::connect(url).await?;
        let number: u64 = redis::cmd("INCR")
            .arg("tc:nodes:seq")
            .query_async(&mut conn)
            .await
            .map_err(redis_err("node number"))?;
        // 2^24 nodes over the life of a Redis, 2^40 connections per node.
        connection::set_conn_base((number & 0xff_ffff) << 40);
        let mut rand = [0u8; 6];
        getrandom::fill(&mut rand).map_err(|e| ClusterError::Reply {
            op: "node id",
            reply: e.to_string(),
        })?;
        let id = format!(
            "n{number}-{}",
            rand.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let leases = Leases::new(conn.clone(), LeaseConfig::default())?;
        let node = Arc::new(Self {
            id,
            client,
            conn,
            leases,
            links: Mutex::default(),
            epochs: Mutex::default(),
            queue,
            loss_threshold,
        });
        tokio::spawn(Arc::clone(&node).subscribe());
        tracing::info!(node = %node.id, "joined the cluster");
        Ok(node)
    }

    /// The lease operations' counts so far (for `/metrics`).
    pub(crate) fn lease_stats(&self) -> super::LeaseStats {
        self.leases.stats()
    }

    fn channel(node: &str) -> String {
        format!("tc:edge:{node}")
    }

    /// Takes ownership of a room just created here: the lease, the room's meta for other
    /// nodes, and the reader of its input stream feeding `commands`. False if another
    /// node holds that id.
    pub(crate) async fn own(
        self: &Arc<Self>,
        room: &RoomId,
        meta: RoomMeta,
        handle: &RoomHandle,
    ) -> Result<bool, ClusterError> {
        let Some(lease) = self.take(room).await? else {
            return Ok(false);
        };
        self.serve(lease, meta, handle, false).await?;
        Ok(true)
    }

    /// The room's lease if nobody holds it, at an epoch above any this node has seen (a
    /// Redis that restarted empty starts counting again).
    pub(crate) async fn take(&self, room: &RoomId) -> Result<Option<Lease>, ClusterError> {
        let floor = Epoch(self.newest_epoch(room));
        self.leases.hold_above(room.as_str(), &self.id, floor).await
    }

    /// Serves a room this node holds the lease of: writes its meta for the other nodes and
    /// feeds its input stream to `commands` (from its start for a new room; from its end
    /// for one taken over, whose edges then send their peers again).
    pub(crate) async fn serve(
        self: &Arc<Self>,
        lease: Lease,
        meta: RoomMeta,
        handle: &RoomHandle,
        from_end: bool,
    ) -> Result<(), ClusterError> {
        let commands = handle.commands.clone();
        let keys = RoomKeys::new(lease.room())?;
        let json = serde_json::to_vec(&meta).expect("meta serializes");
        if let Fenced::Rejected(why) = lease.fenced_set(&keys.key("meta"), &json, None).await? {
            tracing::warn!(room = lease.room(), ?why, "lost the room before serving it");
            let _ = commands.send(RoomCommand::Suspend).await;
            return Ok(());
        }
        let redis_err = |source| ClusterError::Redis {
            op: "stream reader",
            source,
        };
        let mut last = "0-0".to_owned();
        if from_end {
            let mut conn = self.conn.clone();
            let newest: StreamRangeReply = redis::cmd("XREVRANGE")
                .arg(keys.key("in"))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            if let Some(entry) = newest.ids.into_iter().next() {
                last = entry.id;
            }
        }
        let reader = self.reader().await.map_err(redis_err)?;
        telemetry::cluster_owned(1.0);
        tokio::spawn(Arc::clone(self).read_inputs(
            Arc::new(lease),
            keys,
            reader,
            commands,
            Arc::clone(&handle.stats),
            last,
        ));
        Ok(())
    }

    /// A connection of its own for one room's blocking `XREAD`, which waits up to
    /// [`READ_BLOCK`]: its replies may take that long, unlike other commands'.
    async fn reader(&self) -> redis::RedisResult<MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(READ_BLOCK + Duration::from_secs(1)))
            .set_connection_timeout(Some(Duration::from_secs(1)));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// The meta of a room owned elsewhere, if it exists.
    pub(crate) async fn remote_meta(
        &self,
        room: &RoomId,
    ) -> Result<Option<RoomMeta>, ClusterError> {
        let keys = RoomKeys::new(room.as_str())?;
        let mut conn = self.conn.clone();
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(keys.key("meta"))
            .query_async(&mut conn)
            .await
            .map_err(|source| ClusterError::Redis {
                op: "room meta",
                source,
            })?;
        Ok(raw.and_then(|r| serde_json::from_slice(&r).ok()))
    }

    /// The command channel of a proxy for a room owned elsewhere: what connections here
    /// send it goes to the owner's input stream.
    pub(crate) fn proxy(
        self: &Arc<Self>,
        state: &Arc<ServerState>,
        room: RoomId,
        meta: RoomMeta,
        stats: Arc<RoomStats>,
    ) -> mpsc::Sender<RoomCommand> {
        let (tx, rx) = mpsc::channel(state.config.limits.room_queue);
        tokio::spawn(Arc::clone(self).forward_inputs(Arc::clone(state), room, meta, stats, rx));
        tx
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<ConnId, EdgeLink>> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Edge side: commands from local connections to a remote room, onto its stream. It
    /// also watches the room's owner: when the owner changes, this node's peers' `hello`s
    /// (with their claims) go to the new one; when nobody owns the room (its owner died),
    /// this node tries to take it over, and if it does, its peers' commands go straight to
    /// the room rebuilt here.
    async fn forward_inputs(
        self: Arc<Self>,
        state: Arc<ServerState>,
        room: RoomId,
        meta: RoomMeta,
        stats: Arc<RoomStats>,
        mut rx: mpsc::Receiver<RoomCommand>,
    ) {
        let Ok(keys) = RoomKeys::new(room.as_str()) else {
            return;
        };
        let stream = keys.key("in");
        let mut owner = self.leases.owner(room.as_str()).await.ok().flatten();
        let mut watch = tokio::time::interval(OWNER_CHECK);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut local: Option<mpsc::Sender<RoomCommand>> = None;
        let mut idle = 0;
        let mut batch = Vec::new();
        loop {
            if let Some(tx) = &local {
                // This node owns the room now.
                let Some(cmd) = rx.recv().await else { return };
                if tx.send(cmd).await.is_err() {
                    return;
                }
                continue;
            }
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(first) = cmd else { return };
                    batch.push(first);
                    while batch.len() < READ_COUNT {
                        match rx.try_recv() {
                            Ok(cmd) => batch.push(cmd),
                            Err(_) => break,
                        }
                    }
                    if !self.send_inputs(&room, &stream, &mut batch).await {
                        return;
                    }
                }
                _ = watch.tick() => match self.tick(&state, &room, &stream, meta, &mut owner).await {
                    Watch::Remote => idle = 0,
                    Watch::Local(tx) => local = Some(tx),
                    // Not at the first look: peers made to resync (their sockets closed a
                    // moment ago) are on their way back, and a join among them must find
                    // the room here, not an unknown one.
                    Watch::Gone if idle < GONE_AFTER => idle += 1,
                    Watch::Gone => {
                        state.rooms.remove(&room, &stats);
                        return;
                    }
                },
            }
        }
    }

    /// Sends a batch of commands to the room's stream; false once the proxy should stop.
    async fn send_inputs(&self, room: &RoomId, stream: &str, batch: &mut Vec<RoomCommand>) -> bool {
        let mut pipe = redis::pipe();
        let mut go_on = true;
        let mut queued = false;
        for cmd in batch.drain(..) {
            let (conn_id, kind, data) = match cmd {
                RoomCommand::Hello {
                    conn,
                    hello,
                    outbound,
                } => {
                    let data = serde_json::to_vec(&hello).ok();
                    self.links().insert(
                        conn,
                        EdgeLink {
                            room: room.clone(),
                            outbound,
                            hello,
                            epoch: 0,
                            next: 1,
                            reported: None,
                            heard: None,
                        },
                    );
                    (conn, "hello", data)
                }
                RoomCommand::Input(Input::Message {
                    conn,
                    msg: ClientMessage::Report(report),
                }) => {
                    if !self.report_matters(conn, &report) {
                        telemetry::cluster_report(false);
                        continue;
                    }
                    telemetry::cluster_report(true);
                    let msg = ClientMessage::Report(report);
                    (conn, "msg", serde_json::to_vec(&msg).ok())
                }
                RoomCommand::Input(Input::Message { conn, msg }) => {
                    (conn, "msg", serde_json::to_vec(&msg).ok())
                }
                RoomCommand::Input(Input::Alive { conn }) => (conn, "alive", None),
                RoomCommand::Input(Input::Disconnected { conn }) => {
                    self.links().remove(&conn);
                    (conn, "gone", None)
                }
                // Served by the owner only; dropping the reply tells the caller.
                RoomCommand::Input(_)
                | RoomCommand::Snapshot(_)
                | RoomCommand::Subscribe(_)
                | RoomCommand::Reconfigure(..) => continue,
                RoomCommand::End(_) | RoomCommand::Suspend => {
                    // This node is shutting down: its peers go elsewhere.
                    self.links().retain(|_, l| {
                        if l.room == *room {
                            l.outbound.close(CloseCode::GoingAway);
                        }
                        l.room != *room
                    });
                    go_on = false;
                    continue;
                }
            };
            xadd(&mut pipe, stream, &self.id, conn_id, kind, data.as_deref());
            queued = true;
        }
        if !queued {
            return go_on; // only reports kept at the edge
        }
        let mut conn = self.conn.clone();
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            // Lost inputs show to the room as silence; the peers' next messages and
            // their watchdogs carry on from there.
            telemetry::cluster_redis_error("forward");
            tracing::warn!(%room, "forwarding to the room's owner failed: {e}");
        }
        go_on
    }

    /// Whether a peer's report changes anything the owner decides on (or the owner has not
    /// heard one for [`REPORT_REFRESH`]); remembers it if so.
    fn report_matters(&self, conn: ConnId, report: &Report) -> bool {
        let digest = Digest::of(report, self.loss_threshold);
        let now = std::time::Instant::now();
        let mut links = self.links();
        let Some(link) = links.get_mut(&conn) else {
            return true;
        };
        let fresh = link
            .reported
            .as_ref()
            .is_some_and(|(d, at)| *d == digest && now.duration_since(*at) < REPORT_REFRESH);
        if fresh {
            link.heard = Some(now);
        } else {
            link.reported = Some((digest, now));
            link.heard = None;
        }
        !fresh
    }

    /// Once a second: the owner hears which peers here reported nothing new, and the
    /// owner is looked at.
    async fn tick(
        self: &Arc<Self>,
        state: &Arc<ServerState>,
        room: &RoomId,
        stream: &str,
        meta: RoomMeta,
        owner: &mut Option<Holder>,
    ) -> Watch {
        let now = std::time::Instant::now();
        let unchanged: Vec<(u64, u64)> = self
            .links()
            .iter_mut()
            .filter(|(_, l)| l.room == *room)
            .filter_map(|(c, l)| {
                let age = now.duration_since(l.heard.take()?);
                Some((c.0, age.as_millis() as u64))
            })
            .collect();
        if !unchanged.is_empty() {
            let mut pipe = redis::pipe();
            let data = serde_json::to_vec(&unchanged).ok();
            xadd(
                &mut pipe,
                stream,
                &self.id,
                ConnId(0),
                "unchanged",
                data.as_deref(),
            );
            let mut conn = self.conn.clone();
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                telemetry::cluster_redis_error("unchanged");
                tracing::debug!(%room, "telling the owner of unchanged reports: {e}");
            }
        }
        self.check_owner(state, room, meta, owner).await
    }

    /// Looks at the room's owner. A new owner hears this node's peers again; no owner at
    /// all means it died: this node tries to take the room, and returns the channel of the
    /// room task it then runs.
    async fn check_owner(
        self: &Arc<Self>,
        state: &Arc<ServerState>,
        room: &RoomId,
        meta: RoomMeta,
        owner: &mut Option<Holder>,
    ) -> Watch {
        let now = match self.leases.owner(room.as_str()).await {
            Ok(now) => now,
            Err(e) => {
                telemetry::cluster_redis_error("owner");
                tracing::debug!(%room, "checking the room's owner: {e}");
                return Watch::Remote;
            }
        };
        match now {
            Some(holder) if owner.as_ref() == Some(&holder) => Watch::Remote,
            Some(holder) => {
                // Also after a time without an owner: `hello`s sent then went to a stream
                // the new owner reads only from when it took the room.
                owner.replace(holder.clone());
                if self.hello_again(room, holder.epoch.0).await > 0 {
                    tracing::info!(%room, owner = %holder, "the room has a new owner; its peers here are sent to it");
                }
                Watch::Remote
            }
            // Nobody here is in the room: it ended (or its owner is gone with nobody
            // here to miss it). The next `hello` looks it up afresh.
            None if !self.links().values().any(|l| l.room == *room) => Watch::Gone,
            None => {
                let seen = self.newest_epoch(room);
                let floor = Epoch(seen.max(owner.as_ref().map_or(0, |h| h.epoch.0)));
                match self.leases.hold_above(room.as_str(), &self.id, floor).await {
                    Ok(Some(lease)) => {
                        *owner = Some(lease.holder().clone());
                        match self.take_over(state, room, meta, lease).await {
                            Some(tx) => Watch::Local(tx),
                            None => Watch::Remote,
                        }
                    }
                    Ok(None) => Watch::Remote,
                    Err(e) => {
                        tracing::debug!(%room, "taking over the room: {e}");
                        Watch::Remote
                    }
                }
            }
        }
    }

    fn newest_epoch(&self, room: &RoomId) -> u64 {
        let epochs = self.epochs.lock().unwrap_or_else(PoisonError::into_inner);
        epochs.get(room).copied().unwrap_or(0)
    }

    /// Sends this node's peers of `room` to its new owner again.
    /// Returns how many were sent: those that have not heard from an owner at `epoch`.
    async fn hello_again(&self, room: &RoomId, epoch: u64) -> usize {
        let Ok(keys) = RoomKeys::new(room.as_str()) else {
            return 0;
        };
        let stream = keys.key("in");
        let mut pipe = redis::pipe();
        let mut any = 0;
        for (conn, link) in self
            .links()
            .iter_mut()
            .filter(|(_, l)| l.room == *room && l.epoch < epoch)
        {
            // The new owner knows nothing of their media yet.
            link.reported = None;
            let data = serde_json::to_vec(&link.hello_again()).ok();
            xadd(
                &mut pipe,
                &stream,
                &self.id,
                *conn,
                "hello",
                data.as_deref(),
            );
            any += 1;
        }
        if any > 0 {
            let mut conn = self.conn.clone();
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                telemetry::cluster_redis_error("hello_again");
                tracing::warn!(%room, "sending peers to the new owner failed: {e}");
            }
        }
        any
    }

    /// This node took the room over from an owner that died: the room is rebuilt here
    /// from its peers' claims (this node's peers at once, the other edges' as they see
    /// the new owner), and the input stream is read from now on.
    async fn take_over(
        self: &Arc<Self>,
        state: &Arc<ServerState>,
        room: &RoomId,
        meta: RoomMeta,
        lease: Lease,
    ) -> Option<mpsc::Sender<RoomCommand>> {
        tracing::info!(%room, epoch = %lease.epoch(), "the room's owner is gone; taking it over");
        telemetry::cluster_takeover();
        let seed = crate::rooms::random_seed().ok()?;
        let (task, handle) = RoomTask::restoring(state, room.clone(), meta.inc, meta.private, seed);
        state.rooms.replace(room.clone(), handle.clone());
        tokio::spawn(task.run());
        if let Err(e) = self.serve(lease, meta, &handle, true).await {
            tracing::warn!(%room, "serving the room taken over: {e}");
            let _ = handle.commands.send(RoomCommand::Suspend).await;
            return None;
        }
        let mine: Vec<(ConnId, EdgeLink)> = {
            let mut links = self.links();
            let conns: Vec<ConnId> = links
                .iter()
                .filter(|(_, l)| l.room == *room)
                .map(|(c, _)| *c)
                .collect();
            conns
                .into_iter()
                .filter_map(|c| links.remove(&c).map(|l| (c, l)))
                .collect()
        };
        for (conn, link) in mine {
            let cmd = RoomCommand::Hello {
                conn,
                hello: link.hello_again(),
                outbound: link.outbound,
            };
            if handle.commands.send(cmd).await.is_err() {
                break;
            }
        }
        Some(handle.commands)
    }

    /// Owner side: the room's input stream into its task, until the lease is lost.
    async fn read_inputs(
        self: Arc<Self>,
        lease: Arc<Lease>,
        keys: RoomKeys,
        mut reader: MultiplexedConnection,
        commands: mpsc::Sender<RoomCommand>,
        stats: Arc<RoomStats>,
        mut last: String,
    ) {
        let stream = keys.key("in");
        loop {
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(READ_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&stream)
                .arg(&last);
            let read = cmd.query_async::<Option<StreamReadReply>>(&mut reader);
            let reply = tokio::select! {
                why = lease.lost() => {
                    tracing::warn!(room = keys.room(), ?why, "lost the room's lease; stepping down");
                    telemetry::cluster_lease_lost();
                    telemetry::cluster_owned(-1.0);
                    let _ = commands.send(RoomCommand::Suspend).await;
                    return;
                }
                () = commands.closed() => return self.room_gone(lease, &keys, &stats).await,
                reply = read => reply,
            };
            let reply = match reply {
                Ok(reply) => reply,
                Err(e) => {
                    telemetry::cluster_redis_error("read");
                    tracing::warn!(room = keys.room(), "reading the room's inputs failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    // The connection may be gone with the error: a new one, while the lease
                    // lasts (the select above steps down when it does not).
                    if let Ok(fresh) = self.reader().await {
                        reader = fresh;
                    }
                    continue;
                }
            };
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                last.clone_from(&entry.id);
                // Entry ids start with Redis's clock in milliseconds.
                if let Some(ms) = entry
                    .id
                    .split('-')
                    .next()
                    .and_then(|t| t.parse::<u64>().ok())
                {
                    telemetry::cluster_stream_lag(Duration::from_millis(now_ms.saturating_sub(ms)));
                }
                let Some(cmd) = self.input_command(&lease, &entry) else {
                    continue;
                };
                if commands.send(cmd).await.is_err() {
                    return self.room_gone(lease, &keys, &stats).await;
                }
            }
        }
    }

    /// The room task stopped. If the room ended, other nodes stop finding it; if this
    /// node is only shutting down, another takes it over. Either way the lease is let go.
    async fn room_gone(&self, lease: Arc<Lease>, keys: &RoomKeys, stats: &RoomStats) {
        telemetry::cluster_owned(-1.0);
        if stats.ended.load(std::sync::atomic::Ordering::Relaxed) {
            let gone = Some(Duration::from_millis(1));
            if let Err(e) = lease.fenced_set(&keys.key("meta"), b"{}", gone).await {
                tracing::debug!(room = keys.room(), "removing the room's meta: {e}");
            }
        }
        // Forwarders may still hold it; the last one dropped stops the renewals.
        if let Ok(lease) = Arc::try_unwrap(lease) {
            let _ = lease.release().await;
        }
    }

    /// One stream entry as a room command (`None` if malformed).
    fn input_command(
        self: &Arc<Self>,
        lease: &Arc<Lease>,
        entry: &redis::streams::StreamId,
    ) -> Option<RoomCommand> {
        let edge: String = entry.get("e")?;
        let conn = ConnId(entry.get::<u64>("c")?);
        let kind: String = entry.get("k")?;
        let data: Option<Vec<u8>> = entry.get("d");
        Some(match kind.as_str() {
            "hello" => {
                let hello: Hello = serde_json::from_slice(&data?).ok()?;
                let (outbound, detached) = connection::detached(self.queue);
                tokio::spawn(Arc::clone(self).forward_outputs(
                    Arc::clone(lease),
                    edge,
                    conn,
                    detached,
                ));
                RoomCommand::Hello {
                    conn,
                    hello,
                    outbound,
                }
            }
            "msg" => {
                let msg: ClientMessage = serde_json::from_slice(&data?).ok()?;
                RoomCommand::Input(Input::Message { conn, msg })
            }
            "alive" => RoomCommand::Input(Input::Alive { conn }),
            "unchanged" => {
                let list: Vec<(u64, u64)> = serde_json::from_slice(&data?).ok()?;
                let conns = list
                    .into_iter()
                    .map(|(c, age)| (ConnId(c), Duration::from_millis(age)))
                    .collect();
                RoomCommand::Input(Input::Unchanged { conns })
            }
            "gone" => RoomCommand::Input(Input::Disconnected { conn }),
            _ => return None,
        })
    }

    /// Owner side: what the room sends a peer on another node, onto that node's channel.
    async fn forward_outputs(
        self: Arc<Self>,
        lease: Arc<Lease>,
        edge: String,
        conn: ConnId,
        mut detached: Detached,
    ) {
        let channel = Self::channel(&edge);
        let room = match RoomId::new(lease.room()) {
            Ok(room) => room,
            Err(_) => return,
        };
        let mut seq = 0;
        while let Some((m, x)) = detached.next_batch(BATCH).await {
            seq += 1;
            let batch = Batch {
                r: room.clone(),
                ep: lease.epoch().0,
                c: conn.0,
                s: seq,
                m,
                x,
            };
            let payload = serde_json::to_vec(&batch).expect("a batch serializes");
            match lease.fenced_publish(&channel, &payload).await {
                Ok(Fenced::Written(_)) => {}
                Ok(Fenced::Rejected(_)) => return,
                // The edge sees the gap in the sequence and has the peer resume.
                Err(e) => {
                    telemetry::cluster_redis_error("publish");
                    tracing::debug!(%room, "publishing to {edge} failed: {e}");
                }
            }
            if x.is_some() {
                return;
            }
        }
    }

    /// Edge side: this node's channel, delivered to its connections. After a lost
    /// subscription every remote peer here resumes, since anything may have been missed.
    async fn subscribe(self: Arc<Self>) {
        let channel = Self::channel(&self.id);
        let mut first = true;
        loop {
            let pubsub = match self.client.get_async_pubsub().await {
                Ok(mut p) => match p.subscribe(&channel).await {
                    Ok(()) => Some(p),
                    Err(e) => {
                        tracing::warn!("subscribing to {channel}: {e}");
                        None
                    }
                },
                Err(e) => {
                    tracing::warn!("connecting for {channel}: {e}");
                    None
                }
            };
            let Some(pubsub) = pubsub else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            if !first {
                self.resync_all();
            }
            first = false;
            let mut messages = pubsub.into_on_message();
            while let Some(msg) = messages.next().await {
                let Ok(batch) = serde_json::from_slice::<Batch>(msg.get_payload_bytes()) else {
                    continue;
                };
                self.deliver(batch);
            }
            tracing::warn!("the subscription to {channel} ended; subscribing again");
        }
    }

    fn deliver(&self, batch: Batch) {
        let conn = ConnId(batch.c);
        let mut epochs = self.epochs.lock().unwrap_or_else(PoisonError::into_inner);
        let newest = epochs.entry(batch.r.clone()).or_insert(batch.ep);
        let mut links = self.links();
        let mut unknown = (0, 0);
        let (link_epoch, next) = match links.get_mut(&conn) {
            Some(link) => (&mut link.epoch, &mut link.next),
            None => (&mut unknown.0, &mut unknown.1),
        };
        match order(newest, link_epoch, next, batch.ep, batch.s) {
            Order::Stale => {
                telemetry::cluster_stale_batch();
                return;
            }
            Order::Gap => {
                tracing::debug!(conn = conn.0, got = batch.s, "gap; the peer resumes");
                if let Some(link) = links.remove(&conn) {
                    link.outbound.close(CloseCode::GoingAway);
                    telemetry::cluster_resync("gap", 1);
                }
                return;
            }
            Order::Deliver => {}
        }
        drop(epochs);
        let Some(link) = links.get_mut(&conn) else {
            return;
        };
        for m in batch.m {
            match &m {
                ServerMessage::Welcome { resume, .. } => {
                    link.hello.resume = Some(resume.clone());
                }
                ServerMessage::Claim { claim } => link.hello.claim = Some(claim.clone()),
                _ => {}
            }
            link.outbound.send(m);
        }
        if let Some(code) = batch.x {
            link.outbound.close(code);
            links.remove(&conn);
        }
    }

    /// Every remote peer here resumes (after a subscription that may have missed messages).
    fn resync_all(&self) {
        let mut links = self.links();
        tracing::info!(peers = links.len(), "resubscribed; remote peers resume");
        telemetry::cluster_resync("subscription", links.len());
        for (_, link) in links.drain() {
            link.outbound.close(CloseCode::GoingAway);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_delivered_in_order_and_a_former_owners_are_dropped() {
        let (mut newest, mut epoch, mut next) = (0, 0, 1);
        let mut step = |e, s| order(&mut newest, &mut epoch, &mut next, e, s);
        assert_eq!(step(3, 1), Order::Deliver);
        assert_eq!(step(3, 2), Order::Deliver);
        // Batch 3 was lost.
        assert_eq!(step(3, 4), Order::Gap);
        // A new owner (epoch 4) numbers from 1; the old one is stale from then on.
        assert_eq!(step(4, 1), Order::Deliver);
        assert_eq!(step(3, 5), Order::Stale);
        assert_eq!(step(4, 2), Order::Deliver);
    }
}
