//! Newtype identifiers used at every boundary of the core.

use std::fmt;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

/// A peer inside one room. Assigned by the room on `hello`, never reused within a room.
///
/// Serialized as a JSON number; ids stay far below 2^53 so JavaScript reads them exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PeerId(pub u64);

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Ids per page of a [`PeerIndex`].
const PAGE_BITS: u32 = 10;
const PAGE: usize = 1 << PAGE_BITS;
/// Ids at or above this go to the hash map: the page table stays small (at most 64 K
/// entries) whatever ids a caller makes up.
const DENSE_LIMIT: u64 = 1 << 26;
/// No entry.
const ABSENT: u32 = u32::MAX;

/// Maps [`PeerId`]s to `u32` slots (positions in the room's and the tree's tables).
///
/// Rooms hand out ids sequentially, so an id indexes a page table of small arrays: one
/// cached lookup and one load instead of hashing and probing, which at 10^6 peers is a
/// cache miss saved on nearly every operation. A page whose ids have all left is freed, so
/// memory follows the spread of the live ids, not every id a long-lived room ever issued.
/// Ids past the dense range (callers of the tree may pick any) go to a hash map.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerIndex {
    pages: Vec<Option<Box<[u32; PAGE]>>>,
    /// Entries per page, to free empty pages.
    live: Vec<u16>,
    sparse: FxHashMap<u64, u32>,
    len: usize,
}

impl PeerIndex {
    /// Entries in the map.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The slot of `id`, if it has one.
    #[inline]
    pub(crate) fn get(&self, id: PeerId) -> Option<u32> {
        if id.0 < DENSE_LIMIT {
            let page = (id.0 >> PAGE_BITS) as usize;
            let slot = match self.pages.get(page) {
                Some(Some(p)) => p[id.0 as usize & (PAGE - 1)],
                _ => ABSENT,
            };
            (slot != ABSENT).then_some(slot)
        } else {
            self.sparse.get(&id.0).copied()
        }
    }

    /// Whether `id` has a slot.
    pub(crate) fn contains(&self, id: PeerId) -> bool {
        self.get(id).is_some()
    }

    /// Sets the slot of `id`, which must not have one.
    pub(crate) fn insert(&mut self, id: PeerId, slot: u32) {
        debug_assert!(slot != ABSENT && !self.contains(id));
        self.len += 1;
        if id.0 >= DENSE_LIMIT {
            self.sparse.insert(id.0, slot);
            return;
        }
        let page = (id.0 >> PAGE_BITS) as usize;
        if page >= self.pages.len() {
            self.pages.resize_with(page + 1, || None);
            self.live.resize(page + 1, 0);
        }
        let p = self.pages[page].get_or_insert_with(|| Box::new([ABSENT; PAGE]));
        p[id.0 as usize & (PAGE - 1)] = slot;
        self.live[page] += 1;
    }

    /// Removes `id`'s entry; returns its slot.
    pub(crate) fn remove(&mut self, id: PeerId) -> Option<u32> {
        let slot = if id.0 >= DENSE_LIMIT {
            self.sparse.remove(&id.0)?
        } else {
            let page = (id.0 >> PAGE_BITS) as usize;
            let p = self.pages.get_mut(page)?.as_mut()?;
            let slot = std::mem::replace(&mut p[id.0 as usize & (PAGE - 1)], ABSENT);
            if slot == ABSENT {
                return None;
            }
            self.live[page] -= 1;
            if self.live[page] == 0 {
                self.pages[page] = None;
            }
            slot
        };
        self.len -= 1;
        Some(slot)
    }
}

/// A room name: 1 to 64 characters from `[A-Za-z0-9_-]`, so it is safe in URLs and logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct RoomId(String);

/// Why a string is not a valid [`RoomId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomIdError {
    /// Empty or longer than [`RoomId::MAX_LEN`].
    #[error("a room id must be 1 to 64 characters long")]
    Length,
    /// Contains something other than letters, digits, `-` and `_`.
    #[error("a room id may only contain letters, digits, '-' and '_'")]
    Character,
}

impl RoomId {
    /// Longest accepted room id.
    pub const MAX_LEN: usize = 64;

    /// Validates and wraps a room name.
    pub fn new(s: impl Into<String>) -> Result<Self, RoomIdError> {
        let s = s.into();
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(RoomIdError::Length);
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(RoomIdError::Character);
        }
        Ok(Self(s))
    }

    /// The room name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RoomId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RoomId::new(s).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for RoomId {
    type Err = RoomIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RoomId::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids_are_validated() {
        assert!(RoomId::new("abc-DEF_123").is_ok());
        assert_eq!(RoomId::new(""), Err(RoomIdError::Length));
        assert_eq!(RoomId::new("a".repeat(65)), Err(RoomIdError::Length));
        assert_eq!(RoomId::new("a/b"), Err(RoomIdError::Character));
        assert_eq!(RoomId::new("é"), Err(RoomIdError::Character));
        let err = serde_json::from_str::<RoomId>("\"../x\"").unwrap_err();
        assert!(err.to_string().contains("may only contain"));
    }

    #[test]
    fn peer_index_maps_dense_and_far_ids_and_frees_empty_pages() {
        let mut m = PeerIndex::default();
        for i in 0..3_000 {
            m.insert(PeerId(i), i as u32 * 2);
        }
        m.insert(PeerId(u64::MAX), 7);
        assert_eq!(m.len(), 3_001);
        assert_eq!(m.get(PeerId(2_999)), Some(5_998));
        assert_eq!(m.get(PeerId(u64::MAX)), Some(7));
        assert_eq!(m.get(PeerId(3_000)), None);
        assert_eq!(m.get(PeerId(1 << 40)), None);
        for i in 0..PAGE as u64 {
            assert_eq!(m.remove(PeerId(i)), Some(i as u32 * 2));
        }
        assert!(m.pages[0].is_none(), "the first page emptied and was freed");
        assert_eq!(m.remove(PeerId(0)), None);
        assert_eq!(m.remove(PeerId(u64::MAX)), Some(7));
        assert_eq!(m.len(), 3_000 - PAGE);
        m.insert(PeerId(5), 1);
        assert_eq!(m.get(PeerId(5)), Some(1));
    }
}
