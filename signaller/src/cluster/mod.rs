//! Cluster mode on Redis: who owns a room, writes that only the owner can make ([`lease`]),
//! and the message path between edges and owners, with takeover when an owner dies
//! (`bus`).
//!
//! In cluster mode any node takes any peer's WebSocket (an *edge*), and each room has
//! exactly one *owner* node that runs the room task. Which node owns a room is decided in
//! Redis by a lease with a fencing epoch ([`lease`]):
//!
//! - **Lease**: `SET tc:{ROOM}:owner NX PX lease_ms`, renewed by its holder every
//!   lease/3. When the holder dies, the key expires and another node can take the room.
//! - **Fencing epoch**: each successful acquisition increments `tc:{ROOM}:epoch`, and the
//!   owner key holds `node:epoch`. Every write an owner makes to shared state (snapshots,
//!   its outputs to edges) goes through a Lua script that performs it only while the owner
//!   key still names that exact holder ([`Leases::fenced_set`], [`Leases::fenced_publish`],
//!   [`Leases::fenced_xadd`]). Edges drop messages stamped with an epoch older than the
//!   newest they have seen.
//!
//! # Why a lease alone is not enough
//! A lease tells the *other* nodes when they may take over; it tells the holder nothing
//! once it stops running. An owner paused longer than the lease (a stop signal, a long
//! garbage-collection-like stall, a VM migration, a swap storm) resumes believing it still
//! owns the room, while another node has taken it. Two defences cover that:
//!
//! 1. The holder keeps a local deadline on its monotonic clock: the instant its last
//!    successful renewal was *sent*, plus the lease, minus a margin. Redis applied the
//!    renewal after it was sent, so Redis's expiry is later than this deadline. Past it
//!    the holder counts itself as not owning the room, even when Redis cannot be reached
//!    and even before its renewal task has had a chance to run after a pause
//!    ([`Lease::state`] reads the clock, not only the last reported state).
//! 2. A write that was already under way when the pause began still reaches Redis later.
//!    The deadline cannot stop it; the fenced script can: it compares the holder in the
//!    same atomic step as the write, so a stale owner's write is refused
//!    ([`Fenced::Rejected`]) instead of overwriting the new owner's state.
//!
//! # Keys
//! Every key of a room carries the room id as a hash tag (`tc:{ROOM}:…`, see [`RoomKeys`]),
//! so a room's keys stay on one Redis Cluster shard and one script may touch them all.
//!
//! # If Redis loses its data
//! A Redis restarted empty forgets the epoch counter, which would start again at 1. Nodes
//! that remember a room's last epoch (edges see it on every owner message; a snapshot
//! carries it) acquire with [`Leases::acquire_above`] so the new epoch is still higher than
//! any the room had; a stale owner is refused either way, since its `node:epoch` holder no
//! longer exists.

pub(crate) mod bus;
pub mod lease;

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

pub use lease::{
    Epoch, Fenced, Holder, Lease, LeaseConfig, LeaseState, LeaseStats, Leases, LostReason, Rejected,
};

/// Errors of cluster mode's Redis operations. None of them is fatal to the process: a
/// failed renewal is retried until the lease's local deadline, a failed write is the
/// caller's to retry or drop.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis refused the command, or could not be reached in time. When a write times out
    /// its outcome is unknown: it may have been applied.
    #[error("redis {op}: {source}")]
    Redis {
        /// Which operation failed (`acquire`, `renew`, `fenced_set`, …).
        op: &'static str,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// Redis answered with something the script cannot return (a bug, or a foreign key
    /// with the same name).
    #[error("unexpected reply from redis to {op}: {reply}")]
    Reply {
        /// The operation.
        op: &'static str,
        /// The reply, for the log.
        reply: String,
    },
    /// A room or node id that cannot be used in a key or a holder.
    #[error("invalid {what} {value:?}: {why}")]
    InvalidName {
        /// `room` or `node`.
        what: &'static str,
        /// The id.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A fenced write to a key outside the room's hash tag: on Redis Cluster the script
    /// could not reach it, and the fence would not cover it.
    #[error("key {key:?} does not carry room {room:?}'s hash tag")]
    KeyOutsideRoom {
        /// The room.
        room: String,
        /// The key.
        key: String,
    },
    /// Lease timings that cannot work (see [`LeaseConfig`]).
    #[error("lease settings: {0}")]
    Config(&'static str),
}

/// The Redis keys of one room: `tc:{ROOM}:NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomKeys {
    room: String,
    prefix: String,
}

impl RoomKeys {
    /// The keys of `room`. The id must be non-empty, at most 256 bytes, and free of the
    /// hash tag's braces (room ids are `[A-Za-z0-9_-]`, so real ones always are).
    pub fn new(room: &str) -> Result<Self, ClusterError> {
        let why = if room.is_empty() {
            Some("empty")
        } else if room.len() > 256 {
            Some("longer than 256 bytes")
        } else if room.contains(['{', '}']) {
            Some("contains a brace, which would break the key's hash tag")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(ClusterError::InvalidName {
                what: "room",
                value: room.to_owned(),
                why,
            });
        }
        Ok(Self {
            room: room.to_owned(),
            prefix: format!("tc:{{{room}}}:"),
        })
    }

    /// The room id.
    pub fn room(&self) -> &str {
        &self.room
    }

    /// `tc:{ROOM}:owner`: the lease, holding `node:epoch`.
    pub fn owner(&self) -> String {
        self.key("owner")
    }

    /// `tc:{ROOM}:epoch`: the fencing counter.
    pub fn epoch(&self) -> String {
        self.key("epoch")
    }

    /// `tc:{ROOM}:snapshot`: the owner's last snapshot of the room.
    pub fn snapshot(&self) -> String {
        self.key("snapshot")
    }

    /// `tc:{ROOM}:NAME`, for any other key of the room.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Whether `key` is one of this room's (carries its hash tag).
    pub fn contains(&self, key: &str) -> bool {
        key.starts_with(&self.prefix)
    }
}

/// Connects to Redis at `url` (`redis://host:port/`, `?protocol=resp3` for RESP3) with a
/// [`ConnectionManager`], which reconnects on its own after an error: a node never stays
/// stuck on a dead connection. Fails if the first connection cannot be made.
///
/// Each command times out after 1 s and each connection attempt after 1 s; a reconnection
/// tries 4 times with backoff capped at 500 ms, then the next command starts a new one.
/// These bounds keep a caller's wait well under the default lease.
pub async fn connect(url: &str) -> Result<ConnectionManager, ClusterError> {
    let client = redis::Client::open(url).map_err(|source| ClusterError::Redis {
        op: "connect",
        source,
    })?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_secs(1)))
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500))
        .set_number_of_retries(4);
    ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|source| ClusterError::Redis {
            op: "connect",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_room_as_hash_tag() {
        let keys = RoomKeys::new("r-1_x").unwrap();
        assert_eq!(keys.owner(), "tc:{r-1_x}:owner");
        assert_eq!(keys.epoch(), "tc:{r-1_x}:epoch");
        assert_eq!(keys.snapshot(), "tc:{r-1_x}:snapshot");
        assert!(keys.contains(&keys.key("out")));
        assert!(!keys.contains("tc:{r-1}:owner"));
        assert!(!keys.contains("tc:{r-1_xy}:owner"));
    }

    #[test]
    fn room_ids_that_would_break_the_hash_tag_are_refused() {
        for bad in ["", "a}b", "{a", &"x".repeat(257)] {
            assert!(
                matches!(
                    RoomKeys::new(bad),
                    Err(ClusterError::InvalidName { what: "room", .. })
                ),
                "{bad:?}"
            );
        }
    }
}
