//! Short-lived TURN credentials in the "TURN REST" scheme that coturn's `use-auth-secret`
//! implements (and treecast's embedded TURN server checks the same way).
//!
//! The signaller and the TURN server share a secret; nothing else is stored. For each peer
//! the room mints
//!
//! ```text
//! username = "<unix expiry>:<user>"            e.g. "1795000000:keynote.17"
//! password = base64(HMAC-SHA1(secret, username))
//! ```
//!
//! and the TURN server, seeing `username`, recomputes the password (then applies standard
//! long-term authentication with it) and refuses an allocation past the expiry. Credentials
//! therefore expire on their own, are bound to one peer, and a leaked one is worth at most
//! one TTL. The user part names the room and the peer (`<room>.<peer id>`), so a TURN
//! server can count allocations per peer. Pure computation: no clock, no I/O; the expiry
//! comes from the caller.

use std::fmt;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha1::Sha1;

use base64::Engine as _;

/// A shared secret. Never printed: `Debug` and `Serialize` show `"<redacted>"`, so a
/// logged or served configuration cannot leak it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret's bytes, for computing with it.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Whether the secret is empty (an unusable configuration).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self)
    }
}

/// TURN servers whose credentials the room mints per peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnRest {
    /// `turn:` / `turns:` URLs handed to clients, e.g. `turn:turn.example.org:3478?transport=udp`.
    pub urls: Vec<String>,
    /// The secret shared with the TURN server (coturn: `static-auth-secret`).
    pub secret: Secret,
    /// How long minted credentials stay valid for new allocations (milliseconds in files;
    /// [`TurnRest::DEFAULT_TTL`] when absent). Peers get fresh ones over the signalling
    /// channel before they expire.
    #[serde(with = "crate::room::millis", default = "TurnRest::default_ttl")]
    pub ttl: Duration,
}

impl TurnRest {
    /// Default lifetime of minted credentials: ten minutes.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(600);

    fn default_ttl() -> Duration {
        Self::DEFAULT_TTL
    }
}

/// The username for `user`, valid until `expires_unix` (seconds since 1970).
pub fn username(expires_unix: u64, user: &str) -> String {
    format!("{expires_unix}:{user}")
}

/// The password for `username`: base64 of HMAC-SHA1 keyed with the shared secret.
pub fn password(secret: &Secret, username: &str) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.expose()).expect("HMAC takes any key length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Splits a REST username into its expiry (unix seconds) and user part. `None` if it does
/// not start with a decimal timestamp and a `:`.
pub fn parse_username(username: &str) -> Option<(u64, &str)> {
    let (expiry, user) = username.split_once(':')?;
    if expiry.is_empty() || expiry.len() > 20 || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((expiry.parse().ok()?, user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_matches_the_published_scheme() {
        // Worked example computed independently:
        //   printf '%s' '1700000000:alice' | openssl dgst -sha1 -hmac 'north' -binary | base64
        let secret = Secret::new("north");
        assert_eq!(
            password(&secret, "1700000000:alice"),
            "Cd/49soE35ICqcJF/bCTn8Z4OyE="
        );
    }

    #[test]
    fn usernames_round_trip_and_garbage_is_refused() {
        let name = username(1_795_000_000, "keynote.17");
        assert_eq!(name, "1795000000:keynote.17");
        assert_eq!(parse_username(&name), Some((1_795_000_000, "keynote.17")));
        for bad in [
            "",
            "alice",
            ":alice",
            "12a:alice",
            "-5:alice",
            "123456789012345678901:x",
        ] {
            assert_eq!(parse_username(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
    }
}
