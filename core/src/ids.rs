//! Newtype identifiers used at every boundary of the core.

use std::fmt;

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
}
