//! The room registry: room ids to the channels of the tasks that own the rooms.
//!
//! The registry holds no room state, only a [`RoomHandle`] per room: the command channel of
//! the room's task and a few counters that task publishes (for listings and metrics without
//! a round trip). Its lock is held for a map lookup or insert, never across an `.await`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use tokio::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;
use treecast_core::RoomId;

use crate::access::LinkKey;
use crate::rate::{Admission, TokenBucket};
use crate::room_task::RoomCommand;

/// How to reach one room's task.
#[derive(Debug, Clone)]
pub(crate) struct RoomHandle {
    /// Commands to the room task: hellos, messages, disconnects, snapshots.
    pub commands: mpsc::Sender<RoomCommand>,
    /// Figures the room task publishes after each step.
    pub stats: Arc<RoomStats>,
    /// The broadcaster token, which also opens this room's snapshot and event stream.
    pub token: Arc<str>,
    /// A private room's link key (signs viewer links); `None` for a public room.
    pub link_key: Option<Arc<LinkKey>>,
    /// Cluster mode: the room is owned by another node and this handle forwards to it (it
    /// has no figures of its own, so listings and metrics leave it out).
    pub remote: bool,
}

/// Figures a room task publishes after each step, read without asking the task.
#[derive(Debug, Default)]
pub(crate) struct RoomStats {
    /// A broadcaster is connected.
    pub live: AtomicBool,
    /// The room has ended (it is kept as a tombstone for late visitors).
    pub ended: AtomicBool,
    /// Viewers in the room.
    pub viewers: AtomicU32,
    /// Peers in the room, the broadcaster included.
    pub peers: AtomicU32,
    /// Deepest attached depth.
    pub max_depth: AtomicU32,
}

/// One line of `GET /api/rooms`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RoomSummary {
    /// The room.
    pub id: RoomId,
    /// A broadcaster is connected.
    pub live: bool,
    /// The room has ended.
    pub ended: bool,
    /// Viewers in the room.
    pub viewers: u32,
    /// Deepest attached depth.
    pub max_depth: u32,
    /// Viewers need a signed link.
    pub private: bool,
}

/// All rooms of this server.
#[derive(Debug, Default)]
pub(crate) struct Rooms {
    map: RwLock<HashMap<RoomId, RoomHandle>>,
    /// Room creations per client address; entries are forgotten once their bucket is full.
    creations: Mutex<HashMap<IpAddr, TokenBucket>>,
}

/// Addresses remembered before quiet ones are forgotten.
const CREATORS_KEPT: usize = 10_000;

/// Why a room could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddError {
    /// The registry is at its maximum.
    Full,
    /// That id is taken.
    Taken,
}

impl Rooms {
    /// Whether `ip` may create a room now (`per_minute` after a burst of `burst`).
    pub(crate) fn admit_creation(&self, ip: IpAddr, per_minute: u32, burst: u32) -> bool {
        let now = Instant::now();
        let mut creators = self
            .creations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if creators.len() >= CREATORS_KEPT {
            creators.retain(|_, bucket| !bucket.is_full(now));
        }
        let bucket = creators
            .entry(ip)
            .or_insert_with(|| TokenBucket::per_minute(per_minute, burst, now));
        bucket.admit(now) == Admission::Pass
    }

    /// The handle of a room, if it exists.
    pub fn get(&self, id: &RoomId) -> Option<RoomHandle> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// Adds a room unless the registry holds `max` rooms or the id is taken.
    pub fn add(&self, id: RoomId, handle: RoomHandle, max: usize) -> Result<(), AddError> {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= max {
            return Err(AddError::Full);
        }
        if map.contains_key(&id) {
            return Err(AddError::Taken);
        }
        map.insert(id, handle);
        Ok(())
    }

    /// Maps `id` to `handle`, whatever it mapped to before (cluster mode: this node took
    /// over a room it only forwarded to).
    pub fn replace(&self, id: RoomId, handle: RoomHandle) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        map.insert(id, handle);
    }

    /// Removes a room, but only if the registry still maps its id to this room's task.
    pub fn remove(&self, id: &RoomId, stats: &Arc<RoomStats>) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if map.get(id).is_some_and(|h| Arc::ptr_eq(&h.stats, stats)) {
            map.remove(id);
        }
    }

    /// Whether the registry holds `max` rooms or more.
    pub fn is_full(&self, max: usize) -> bool {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
            >= max
    }

    /// Every room's handle (for shutdown).
    pub fn handles(&self) -> Vec<RoomHandle> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.values().cloned().collect()
    }

    /// A summary of every room, sorted by id.
    pub fn summaries(&self) -> Vec<RoomSummary> {
        let mut list: Vec<RoomSummary> = {
            let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
            map.iter()
                .filter(|(_, h)| !h.remote)
                .map(|(id, h)| RoomSummary {
                    id: id.clone(),
                    live: h.stats.live.load(Ordering::Relaxed),
                    ended: h.stats.ended.load(Ordering::Relaxed),
                    viewers: h.stats.viewers.load(Ordering::Relaxed),
                    max_depth: h.stats.max_depth.load(Ordering::Relaxed),
                    private: h.link_key.is_some(),
                })
                .collect()
        };
        list.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        list
    }

    /// Rooms, peers in all rooms, and the deepest depth of any room: for `/metrics`.
    pub fn totals(&self) -> (usize, u64, u32) {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        let rooms = map.values().filter(|h| !h.remote).count();
        let peers = map
            .values()
            .map(|h| u64::from(h.stats.peers.load(Ordering::Relaxed)))
            .sum();
        let depth = map
            .values()
            .map(|h| h.stats.max_depth.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        (rooms, peers, depth)
    }
}

/// Characters of a room id: URL-safe, 64 of them, so each is 6 random bits.
const ID_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Length of a generated room id: about 60 random bits.
const ID_LEN: usize = 10;

/// A fresh random room id from the OS's randomness.
pub(crate) fn random_room_id() -> Result<RoomId, getrandom::Error> {
    let mut bytes = [0u8; ID_LEN];
    getrandom::fill(&mut bytes)?;
    // The first character is a letter or digit (62 of the 64): an id that starts with `-`
    // reads as an option on a command line (`treecast-peer view --room -Hx…`).
    let id: String = bytes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let n = if i == 0 { 62 } else { 64 };
            char::from(ID_ALPHABET[usize::from(*b) % n])
        })
        .collect();
    // The alphabet and length are valid by construction; this cannot fail.
    Ok(RoomId::new(id).unwrap_or_else(|_| unreachable!("generated ids are valid")))
}

#[cfg(test)]
/// A fresh 128-bit broadcaster token, as 32 hex digits.
pub(crate) fn random_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A seed for a room's resume tokens.
pub(crate) fn random_seed() -> Result<u64, getrandom::Error> {
    getrandom::u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_and_tokens_have_the_promised_shape() {
        let id = random_room_id().unwrap();
        assert_eq!(id.as_str().len(), ID_LEN);
        let token = random_token().unwrap();
        assert_eq!(token.len(), 32);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(random_token().unwrap(), token);
        for _ in 0..2_000 {
            let id = random_room_id().unwrap();
            let first = id.as_str().as_bytes()[0];
            assert!(first.is_ascii_alphanumeric(), "{id:?} starts with {first}");
        }
    }
}
