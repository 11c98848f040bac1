//! Room ownership: a lease in Redis with a fencing epoch, and writes fenced by it.
//!
//! # Keys and scripts
//! `tc:{ROOM}:owner` holds `node:epoch` with a time to live (the lease);
//! `tc:{ROOM}:epoch` counts acquisitions. Each operation is one Lua script, so each is
//! atomic in Redis:
//!
//! | operation | script |
//! | --- | --- |
//! | [`Leases::acquire`] | if the owner key is absent: `INCR` epoch, `SET` owner `node:epoch PX lease`, return the epoch; else nil |
//! | [`Leases::renew`] | `PEXPIRE` owner only if it is `node:epoch` |
//! | [`Leases::release`] | `DEL` owner only if it is `node:epoch` |
//! | [`Leases::fenced_set`], [`Leases::fenced_publish`], [`Leases::fenced_xadd`] | the write, only if owner is `node:epoch` and epoch is `epoch`; else `{0, current owner}` |
//!
//! # The holder's side: [`Lease`]
//! [`Leases::hold`] acquires and starts a task that renews every `renew_every` (lease/3 by
//! default). The task keeps a local deadline on the monotonic clock: the instant the last
//! successful renewal (or the acquisition) was *sent*, plus the lease, minus a margin.
//! Redis applied that command after it was sent, so the key lives at least until then on
//! Redis's clock; the margin covers clock-rate differences and the time between checking
//! and acting. Past the deadline the lease is [`LeaseState::Lost`]: no Redis reply is
//! needed to step down, so an owner cut off from Redis, or paused (SIGSTOP) past its lease,
//! knows it lost before its next write. [`Lease::state`] compares the deadline with the
//! clock on every call, so even a process that just resumed, whose renewal task has not
//! run yet, reads `Lost`. Once lost, a `Lease` stays lost; to own the room again a node
//! acquires anew and gets a new epoch.
//!
//! The deadline only covers what the holder starts after checking it. A write already on
//! its way when the pause began arrives late; the fenced scripts refuse it because the
//! holder they compare is no longer the owner. Edges do the same for messages: each owner
//! message carries its epoch, and an edge drops those older than the newest it has seen.
//!
//! # Errors
//! Redis errors come back as [`ClusterError::Redis`], are counted ([`Leases::stats`]) and
//! never panic. A renewal that fails is retried every quarter of `renew_every` until the
//! deadline. The connection is a [`ConnectionManager`], which reconnects on its own.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Script, ScriptInvocation, Value};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use super::{ClusterError, RoomKeys};

/// A room's fencing epoch: incremented by every acquisition, so a later owner always has a
/// higher one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who holds a room: a node at an epoch, stored as `node:epoch` in the owner key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Holder {
    /// The owner node's id.
    pub node: String,
    /// The epoch it acquired the room at.
    pub epoch: Epoch,
}

impl Holder {
    /// Parses `node:epoch` (the epoch is after the last colon, so node ids may contain
    /// colons).
    pub fn parse(s: &str) -> Option<Self> {
        let (node, epoch) = s.rsplit_once(':')?;
        if node.is_empty() {
            return None;
        }
        Some(Self {
            node: node.to_owned(),
            epoch: Epoch(epoch.parse().ok()?),
        })
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.node, self.epoch)
    }
}

/// Lease timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long the owner key lives without renewal: how long a dead owner's room waits
    /// before another node may take it. Default 3 s.
    pub lease: Duration,
    /// How often the holder renews. Default 1 s (lease/3: two renewals may fail before
    /// the lease is lost).
    pub renew_every: Duration,
    /// How much earlier than the lease the holder counts itself as not owning the room.
    /// Default 300 ms.
    pub margin: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_millis(3000),
            renew_every: Duration::from_millis(1000),
            margin: Duration::from_millis(300),
        }
    }
}

impl LeaseConfig {
    /// Timings with `lease`, renewals every lease/3 and a margin of lease/10.
    pub fn with_lease(lease: Duration) -> Self {
        Self {
            lease,
            renew_every: lease / 3,
            margin: lease / 10,
        }
    }

    /// Checks that a renewal can happen before the local deadline.
    pub fn validate(&self) -> Result<(), ClusterError> {
        if self.lease < Duration::from_millis(10) {
            return Err(ClusterError::Config("the lease must be at least 10 ms"));
        }
        if self.renew_every.is_zero() {
            return Err(ClusterError::Config("renew_every must be positive"));
        }
        if self.renew_every + self.margin >= self.lease {
            return Err(ClusterError::Config(
                "renew_every plus margin must be shorter than the lease",
            ));
        }
        Ok(())
    }

    /// How long the holder may count on the lease after sending a command at `sent`.
    fn valid_until(&self, sent: Instant) -> Instant {
        sent + self.lease - self.margin
    }

    /// Wait before retrying a renewal that failed.
    fn retry_every(&self) -> Duration {
        (self.renew_every / 4).max(Duration::from_millis(1))
    }
}

/// The outcome of a fenced write.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Fenced<T> {
    /// The writer was the owner; the write was made. Holds the command's reply.
    Written(T),
    /// The write was not made.
    Rejected(Rejected),
}

impl<T> Fenced<T> {
    /// Whether the write was made.
    pub fn is_written(&self) -> bool {
        matches!(self, Fenced::Written(_))
    }
}

/// Why a fenced write was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// The [`Lease`] was already lost locally (deadline passed, taken, released): nothing
    /// was sent to Redis.
    LeaseLost,
    /// Redis says the writer is not the owner; `current` is who is (none: nobody).
    NotHolder {
        /// The owner key's value at the time of the write, if there is an owner.
        current: Option<Holder>,
    },
}

/// Why a [`Lease`] was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    /// The local deadline passed without a successful renewal (Redis unreachable or slow,
    /// or this process was paused).
    Expired,
    /// Redis answered a renewal: the owner key no longer names this holder.
    Taken,
    /// [`Lease::release`] was called.
    Released,
}

/// A lease as its holder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// This node owns the room at `epoch`, until `valid_until` unless renewed.
    Held {
        /// The fencing epoch.
        epoch: Epoch,
        /// The local deadline (monotonic clock).
        valid_until: Instant,
    },
    /// This node no longer owns the room (at `epoch`).
    Lost {
        /// The epoch it held.
        epoch: Epoch,
        /// Why it was lost.
        why: LostReason,
    },
}

impl LeaseState {
    /// The state as of `now`: `Held` past its deadline is `Lost` (expired).
    pub fn at(self, now: Instant) -> Self {
        match self {
            LeaseState::Held { epoch, valid_until } if now >= valid_until => LeaseState::Lost {
                epoch,
                why: LostReason::Expired,
            },
            other => other,
        }
    }

    /// Whether this is `Held`.
    pub fn is_held(&self) -> bool {
        matches!(self, LeaseState::Held { .. })
    }
}

/// Counts of lease operations since the [`Leases`] was made (shared by its clones and
/// the leases it holds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseStats {
    /// Acquisitions that won.
    pub acquired: u64,
    /// Successful renewals.
    pub renewed: u64,
    /// Leases lost (any reason but release).
    pub lost: u64,
    /// Fenced writes refused (locally or by Redis).
    pub fenced: u64,
    /// Redis errors of any operation.
    pub redis_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    acquired: AtomicU64,
    renewed: AtomicU64,
    lost: AtomicU64,
    fenced: AtomicU64,
    redis_errors: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

// KEYS: owner, epoch. ARGV: node, lease ms, epoch floor.
// The owner key is only absent when no node holds the room, so "absent" is the SET NX
// condition; the holder is written once the epoch is known.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local e = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[3])
if e <= floor then
  e = floor + 1
  redis.call('SET', KEYS[2], string.format('%d', e))
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. string.format('%d', e), 'PX', ARGV[2])
return e
",
    )
});

// KEYS: owner. ARGV: holder, lease ms.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
",
    )
});

// KEYS: owner. ARGV: holder.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// The fence every fenced script starts with. KEYS: owner, epoch, …; ARGV: holder, epoch,
/// …. Returns `{0, current owner or false}` when the caller is not the holder.
const FENCE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return {0, holder}
end
";

// KEYS: owner, epoch, key. ARGV: holder, epoch, value, px (0: no expiry).
static FENCED_SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{FENCE}
if tonumber(ARGV[4]) > 0 then
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
else
  redis.call('SET', KEYS[3], ARGV[3])
end
return {{1, 1}}
"
    ))
});

// KEYS: owner, epoch. ARGV: holder, epoch, channel, payload.
static FENCED_PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{FENCE}
return {{1, redis.call('PUBLISH', ARGV[3], ARGV[4])}}
"
    ))
});

// KEYS: owner, epoch, stream. ARGV: holder, epoch, maxlen (0: untrimmed), field, value, ….
static FENCED_XADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{FENCE}
local args = {{'XADD', KEYS[3]}}
if tonumber(ARGV[3]) > 0 then
  table.insert(args, 'MAXLEN')
  table.insert(args, '~')
  table.insert(args, ARGV[3])
end
table.insert(args, '*')
for i = 4, #ARGV do table.insert(args, ARGV[i]) end
return {{1, redis.call(unpack(args))}}
"
    ))
});

fn check_node(node: &str) -> Result<(), ClusterError> {
    let why = if node.is_empty() {
        Some("empty")
    } else if node.len() > 256 {
        Some("longer than 256 bytes")
    } else {
        None
    };
    match why {
        Some(why) => Err(ClusterError::InvalidName {
            what: "node",
            value: node.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Nil (RESP2) or false (RESP3, Lua `false`).
fn is_none(value: &Value) -> bool {
    matches!(value, Value::Nil | Value::Boolean(false))
}

fn text(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn unexpected(op: &'static str, value: &Value) -> ClusterError {
    ClusterError::Reply {
        op,
        reply: format!("{value:?}"),
    }
}

/// Room leases and fenced writes on one Redis (cheap to clone: the connection and the
/// counters are shared).
#[derive(Clone)]
pub struct Leases {
    conn: ConnectionManager,
    config: LeaseConfig,
    counters: Arc<Counters>,
}

impl fmt::Debug for Leases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leases")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Leases {
    /// Leases over `conn` (see [`super::connect`]) with `config`'s timings.
    pub fn new(conn: ConnectionManager, config: LeaseConfig) -> Result<Self, ClusterError> {
        config.validate()?;
        Ok(Self {
            conn,
            config,
            counters: Arc::default(),
        })
    }

    /// The timings.
    pub fn config(&self) -> LeaseConfig {
        self.config
    }

    /// The counts so far.
    pub fn stats(&self) -> LeaseStats {
        let c = &self.counters;
        LeaseStats {
            acquired: c.acquired.load(Ordering::Relaxed),
            renewed: c.renewed.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            fenced: c.fenced.load(Ordering::Relaxed),
            redis_errors: c.redis_errors.load(Ordering::Relaxed),
        }
    }

    async fn run(
        &self,
        op: &'static str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<Value, ClusterError> {
        let mut conn = self.conn.clone();
        match invocation.invoke_async::<Value>(&mut conn).await {
            Ok(value) => Ok(value),
            Err(source) => {
                bump(&self.counters.redis_errors);
                tracing::debug!(op, error = %source, "redis error");
                Err(ClusterError::Redis { op, source })
            }
        }
    }

    /// Takes `room` for `node` if nobody holds it: returns the new epoch, or `None` if
    /// another holder's lease is live. Does not renew: see [`Leases::hold`]. An error (a
    /// timeout) may hide a success: the room then stays taken, by a holder nobody renews,
    /// until the lease runs out.
    pub async fn acquire(&self, room: &str, node: &str) -> Result<Option<Epoch>, ClusterError> {
        self.acquire_above(room, node, Epoch(0)).await
    }

    /// [`Leases::acquire`], with an epoch higher than `floor` even if Redis lost the
    /// counter (restarted empty): pass the highest epoch this node has seen for the room.
    pub async fn acquire_above(
        &self,
        room: &str,
        node: &str,
        floor: Epoch,
    ) -> Result<Option<Epoch>, ClusterError> {
        let keys = RoomKeys::new(room)?;
        check_node(node)?;
        let mut invocation = ACQUIRE.prepare_invoke();
        invocation
            .key(keys.owner())
            .key(keys.epoch())
            .arg(node)
            .arg(millis(self.config.lease))
            .arg(floor.0);
        let reply = self.run("acquire", &invocation).await?;
        match reply {
            Value::Int(e) if e > 0 => {
                bump(&self.counters.acquired);
                Ok(Some(Epoch(e as u64)))
            }
            other if is_none(&other) => Ok(None),
            other => Err(unexpected("acquire", &other)),
        }
    }

    /// Extends `holder`'s lease on `room` by the full lease from now, only if it still
    /// holds it. `false`: it does not (expired, or another node holds the room).
    pub async fn renew(&self, room: &str, holder: &Holder) -> Result<bool, ClusterError> {
        let keys = RoomKeys::new(room)?;
        let mut invocation = RENEW.prepare_invoke();
        invocation
            .key(keys.owner())
            .arg(holder.to_string())
            .arg(millis(self.config.lease));
        match self.run("renew", &invocation).await? {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            other => Err(unexpected("renew", &other)),
        }
    }

    /// Gives `room` up if `holder` still holds it (compare and delete), so another node
    /// can take it at once. `false`: it did not hold it.
    pub async fn release(&self, room: &str, holder: &Holder) -> Result<bool, ClusterError> {
        let keys = RoomKeys::new(room)?;
        let mut invocation = RELEASE.prepare_invoke();
        invocation.key(keys.owner()).arg(holder.to_string());
        match self.run("release", &invocation).await? {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            other => Err(unexpected("release", &other)),
        }
    }

    /// Who holds `room` now, if anyone (what an edge asks to find the owner).
    pub async fn owner(&self, room: &str) -> Result<Option<Holder>, ClusterError> {
        let keys = RoomKeys::new(room)?;
        let Some(reply) = self.get("owner", &keys.owner()).await? else {
            return Ok(None);
        };
        text(&reply)
            .and_then(Holder::parse)
            .map(Some)
            .ok_or_else(|| unexpected("owner", &reply))
    }

    /// The room's fencing counter (the epoch of the latest acquisition), if it has one.
    pub async fn epoch(&self, room: &str) -> Result<Option<Epoch>, ClusterError> {
        let keys = RoomKeys::new(room)?;
        let Some(reply) = self.get("epoch", &keys.epoch()).await? else {
            return Ok(None);
        };
        text(&reply)
            .and_then(|s| s.parse().ok())
            .map(|e| Some(Epoch(e)))
            .ok_or_else(|| unexpected("epoch", &reply))
    }

    /// `GET key`, counting a failure; `None` if the key does not exist.
    async fn get(&self, op: &'static str, key: &str) -> Result<Option<Value>, ClusterError> {
        let mut conn = self.conn.clone();
        match redis::cmd("GET").arg(key).query_async(&mut conn).await {
            Ok(reply) if is_none(&reply) => Ok(None),
            Ok(reply) => Ok(Some(reply)),
            Err(source) => {
                bump(&self.counters.redis_errors);
                Err(ClusterError::Redis { op, source })
            }
        }
    }

    fn fenced_invocation<'a>(
        script: &'a Script,
        keys: &RoomKeys,
        holder: &Holder,
    ) -> ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(keys.owner())
            .key(keys.epoch())
            .arg(holder.to_string())
            .arg(holder.epoch.0);
        invocation
    }

    async fn run_fenced(
        &self,
        op: &'static str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<Fenced<Value>, ClusterError> {
        let reply = self.run(op, invocation).await?;
        let Value::Array(items) = &reply else {
            return Err(unexpected(op, &reply));
        };
        match items.as_slice() {
            [Value::Int(1), value] => Ok(Fenced::Written(value.clone())),
            [Value::Int(0), current] => {
                bump(&self.counters.fenced);
                Ok(Fenced::Rejected(Rejected::NotHolder {
                    current: text(current).and_then(Holder::parse),
                }))
            }
            _ => Err(unexpected(op, &reply)),
        }
    }

    fn room_key(keys: &RoomKeys, key: &str) -> Result<(), ClusterError> {
        if keys.contains(key) {
            Ok(())
        } else {
            Err(ClusterError::KeyOutsideRoom {
                room: keys.room().to_owned(),
                key: key.to_owned(),
            })
        }
    }

    /// `SET key value [PX ttl]`, only if `holder` owns `room` (e.g. the owner's snapshot).
    /// `key` must be one of the room's ([`RoomKeys::key`]).
    pub async fn fenced_set(
        &self,
        room: &str,
        holder: &Holder,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<Fenced<()>, ClusterError> {
        let keys = RoomKeys::new(room)?;
        Self::room_key(&keys, key)?;
        let mut invocation = Self::fenced_invocation(&FENCED_SET, &keys, holder);
        invocation.key(key).arg(value).arg(ttl.map_or(0, millis));
        Ok(match self.run_fenced("fenced_set", &invocation).await? {
            Fenced::Written(_) => Fenced::Written(()),
            Fenced::Rejected(why) => Fenced::Rejected(why),
        })
    }

    /// `PUBLISH channel payload`, only if `holder` owns `room` (the owner's outputs to
    /// edges). Returns how many subscribers received it. The payload should carry the epoch
    /// so receivers can drop an older owner's messages.
    pub async fn fenced_publish(
        &self,
        room: &str,
        holder: &Holder,
        channel: &str,
        payload: &[u8],
    ) -> Result<Fenced<u64>, ClusterError> {
        let keys = RoomKeys::new(room)?;
        let mut invocation = Self::fenced_invocation(&FENCED_PUBLISH, &keys, holder);
        invocation.arg(channel).arg(payload);
        Ok(
            match self.run_fenced("fenced_publish", &invocation).await? {
                Fenced::Written(Value::Int(n)) if n >= 0 => Fenced::Written(n as u64),
                Fenced::Written(other) => return Err(unexpected("fenced_publish", &other)),
                Fenced::Rejected(why) => Fenced::Rejected(why),
            },
        )
    }

    /// `XADD stream [MAXLEN ~ maxlen] * field value …`, only if `holder` owns `room`.
    /// Returns the entry's id. `stream` must be one of the room's keys; `maxlen` 0 keeps
    /// every entry.
    pub async fn fenced_xadd(
        &self,
        room: &str,
        holder: &Holder,
        stream: &str,
        maxlen: u64,
        fields: &[(&str, &[u8])],
    ) -> Result<Fenced<String>, ClusterError> {
        let keys = RoomKeys::new(room)?;
        Self::room_key(&keys, stream)?;
        let mut invocation = Self::fenced_invocation(&FENCED_XADD, &keys, holder);
        invocation.key(stream).arg(maxlen);
        for (field, value) in fields {
            invocation.arg(*field).arg(*value);
        }
        Ok(match self.run_fenced("fenced_xadd", &invocation).await? {
            Fenced::Written(value) => match text(&value) {
                Some(id) => Fenced::Written(id.to_owned()),
                None => return Err(unexpected("fenced_xadd", &value)),
            },
            Fenced::Rejected(why) => Fenced::Rejected(why),
        })
    }

    /// Acquires `room` for `node` and keeps it renewed: `None` if another node holds it.
    pub async fn hold(&self, room: &str, node: &str) -> Result<Option<Lease>, ClusterError> {
        self.hold_above(room, node, Epoch(0)).await
    }

    /// [`Leases::hold`] with an epoch above `floor` (see [`Leases::acquire_above`]).
    pub async fn hold_above(
        &self,
        room: &str,
        node: &str,
        floor: Epoch,
    ) -> Result<Option<Lease>, ClusterError> {
        // The lease runs from when Redis applies the command, which is after this.
        let sent = Instant::now();
        let Some(epoch) = self.acquire_above(room, node, floor).await? else {
            return Ok(None);
        };
        let holder = Holder {
            node: node.to_owned(),
            epoch,
        };
        let valid_until = self.config.valid_until(sent);
        let (state_tx, state) = watch::channel(LeaseState::Held { epoch, valid_until });
        let (stop_tx, stop) = oneshot::channel();
        let seen_lost = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(renew_until_lost(
            self.clone(),
            room.to_owned(),
            holder.clone(),
            sent,
            state_tx,
            seen_lost.clone(),
            stop,
        ));
        Ok(Some(Lease {
            leases: self.clone(),
            room: room.to_owned(),
            holder,
            state,
            seen_lost,
            stop: Some(stop_tx),
            task: Some(task),
        }))
    }
}

/// The renewal task of one [`Lease`]: renews every `renew_every` from the last renewal
/// sent, retries failures sooner, and reports `Lost` at the local deadline or as soon as
/// Redis says the holder changed. It ends once the lease is lost or released.
async fn renew_until_lost(
    leases: Leases,
    room: String,
    holder: Holder,
    acquired_at: Instant,
    state: watch::Sender<LeaseState>,
    seen_lost: Arc<AtomicBool>,
    mut stop: oneshot::Receiver<()>,
) {
    let config = leases.config;
    let epoch = holder.epoch;
    let mut valid_until = config.valid_until(acquired_at);
    let mut next = acquired_at + config.renew_every;
    let lose = |why: LostReason| {
        bump(&leases.counters.lost);
        tracing::warn!(room, holder = %holder, ?why, "room lease lost");
        state.send_replace(LeaseState::Lost { epoch, why });
    };
    loop {
        tokio::select! {
            () = sleep_until(next) => {}
            _ = &mut stop => return,
        }
        let sent = Instant::now();
        // After a pause the deadline may be long gone: a renewal that succeeded now would
        // not undo what others did meanwhile. And once the holder has read `Lost`, the
        // room must not stay locked by a node that stepped down.
        if sent >= valid_until || seen_lost.load(Ordering::Acquire) {
            lose(LostReason::Expired);
            return;
        }
        let reply = tokio::select! {
            reply = leases.renew(&room, &holder) => reply,
            () = sleep_until(valid_until) => {
                lose(LostReason::Expired);
                return;
            }
            _ = &mut stop => return,
        };
        match reply {
            // A reply that arrives after the deadline comes too late: the holder may have
            // read `Lost` meanwhile, and a lost lease never comes back.
            Ok(true) if Instant::now() >= valid_until => {
                lose(LostReason::Expired);
                return;
            }
            Ok(true) => {
                bump(&leases.counters.renewed);
                valid_until = config.valid_until(sent);
                state.send_replace(LeaseState::Held { epoch, valid_until });
                next = sent + config.renew_every;
            }
            Ok(false) => {
                lose(LostReason::Taken);
                return;
            }
            Err(error) => {
                tracing::debug!(room, holder = %holder, %error, "lease renewal failed");
                next = Instant::now() + config.retry_every();
            }
        }
    }
}

/// A room this node owns, kept renewed by a task until it is lost or released. Dropping
/// it stops renewing (the lease then expires in Redis); [`Lease::release`] gives the room
/// up at once.
#[derive(Debug)]
pub struct Lease {
    leases: Leases,
    room: String,
    holder: Holder,
    state: watch::Receiver<LeaseState>,
    /// Set once anyone read `Lost`: from then on the lease stays lost, even if a renewal
    /// reply that was under way lands.
    seen_lost: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Lease {
    /// The room.
    pub fn room(&self) -> &str {
        &self.room
    }

    /// This node and the epoch it holds the room at.
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// The fencing epoch.
    pub fn epoch(&self) -> Epoch {
        self.holder.epoch
    }

    /// The state now: `Lost` as soon as the local deadline has passed, even if the renewal
    /// task has not run since (e.g. the process was just resumed).
    pub fn state(&self) -> LeaseState {
        self.read(*self.state.borrow())
    }

    /// `reported` as of now, latching the loss.
    fn read(&self, reported: LeaseState) -> LeaseState {
        let epoch = self.holder.epoch;
        if self.seen_lost.load(Ordering::Acquire) {
            return match reported {
                LeaseState::Lost { .. } => reported,
                LeaseState::Held { .. } => LeaseState::Lost {
                    epoch,
                    why: LostReason::Expired,
                },
            };
        }
        let now = reported.at(Instant::now());
        if !now.is_held() {
            self.seen_lost.store(true, Ordering::Release);
        }
        now
    }

    /// Whether this node may still act as the room's owner.
    pub fn is_held(&self) -> bool {
        self.state().is_held()
    }

    /// Updates of the state: each renewal (a later `valid_until`) and the loss. A `Held`
    /// read from it may be past its deadline: check with [`LeaseState::at`].
    pub fn watch(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Waits until the lease is lost (deadline, taken, released) and says why.
    pub async fn lost(&self) -> LostReason {
        let mut updates = self.state.clone();
        loop {
            let reported = *updates.borrow_and_update();
            let current = self.read(reported);
            let valid_until = match current {
                LeaseState::Lost { why, .. } => return why,
                LeaseState::Held { valid_until, .. } => valid_until,
            };
            tokio::select! {
                changed = updates.changed() => {
                    if changed.is_err() {
                        // The task is gone without a word: only the deadline is left.
                        sleep_until(valid_until).await;
                        return LostReason::Expired;
                    }
                }
                () = sleep_until(valid_until) => {}
            }
        }
    }

    /// [`Leases::fenced_set`] as this holder; refused without asking Redis once the lease
    /// is lost locally.
    pub async fn fenced_set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<Fenced<()>, ClusterError> {
        if !self.is_held() {
            bump(&self.leases.counters.fenced);
            return Ok(Fenced::Rejected(Rejected::LeaseLost));
        }
        self.leases
            .fenced_set(&self.room, &self.holder, key, value, ttl)
            .await
    }

    /// [`Leases::fenced_publish`] as this holder; refused without asking Redis once the
    /// lease is lost locally.
    pub async fn fenced_publish(
        &self,
        channel: &str,
        payload: &[u8],
    ) -> Result<Fenced<u64>, ClusterError> {
        if !self.is_held() {
            bump(&self.leases.counters.fenced);
            return Ok(Fenced::Rejected(Rejected::LeaseLost));
        }
        self.leases
            .fenced_publish(&self.room, &self.holder, channel, payload)
            .await
    }

    /// [`Leases::fenced_xadd`] as this holder; refused without asking Redis once the lease
    /// is lost locally.
    pub async fn fenced_xadd(
        &self,
        stream: &str,
        maxlen: u64,
        fields: &[(&str, &[u8])],
    ) -> Result<Fenced<String>, ClusterError> {
        if !self.is_held() {
            bump(&self.leases.counters.fenced);
            return Ok(Fenced::Rejected(Rejected::LeaseLost));
        }
        self.leases
            .fenced_xadd(&self.room, &self.holder, stream, maxlen, fields)
            .await
    }

    /// Stops renewing and deletes the owner key if it still names this holder, so another
    /// node can take the room at once. `Ok(false)`: the key no longer named this holder
    /// (expired or taken).
    pub async fn release(mut self) -> Result<bool, ClusterError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        // The renewal task has ended, so nothing else writes the state.
        self.seen_lost.store(true, Ordering::Release);
        let (_, receiver) = watch::channel(LeaseState::Lost {
            epoch: self.holder.epoch,
            why: LostReason::Released,
        });
        self.state = receiver;
        self.leases.release(&self.room, &self.holder).await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_round_trip_and_node_ids_may_contain_colons() {
        let holder = Holder {
            node: "10.0.0.1:7000".into(),
            epoch: Epoch(42),
        };
        assert_eq!(holder.to_string(), "10.0.0.1:7000:42");
        assert_eq!(Holder::parse("10.0.0.1:7000:42"), Some(holder));
        assert_eq!(Holder::parse("n:x"), None);
        assert_eq!(Holder::parse(":3"), None);
        assert_eq!(Holder::parse("n"), None);
    }

    #[test]
    fn timings_that_cannot_renew_in_time_are_refused() {
        assert!(LeaseConfig::default().validate().is_ok());
        assert!(
            LeaseConfig::with_lease(Duration::from_millis(300))
                .validate()
                .is_ok()
        );
        let late = LeaseConfig {
            lease: Duration::from_millis(1000),
            renew_every: Duration::from_millis(900),
            margin: Duration::from_millis(100),
        };
        assert!(late.validate().is_err());
    }

    #[test]
    fn a_held_state_past_its_deadline_reads_as_expired() {
        let now = Instant::now();
        let held = LeaseState::Held {
            epoch: Epoch(3),
            valid_until: now + Duration::from_millis(10),
        };
        assert_eq!(held.at(now), held);
        assert_eq!(
            held.at(now + Duration::from_millis(10)),
            LeaseState::Lost {
                epoch: Epoch(3),
                why: LostReason::Expired
            }
        );
    }
}
