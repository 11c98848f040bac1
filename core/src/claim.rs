//! Resume claims: a peer's place in the tree, signed by the server.
//!
//! A room whose server keeps a claim key ([`Room::enable_claims`](crate::room::Room))
//! hands every peer a `claim` message after its `welcome` and again whenever its parent
//! changes: who it is, which room (and which incarnation of it), its parent, its uplink
//! and NAT class, and a sequence number ordering the claims of the room. The broadcaster's
//! claim also carries what the room was created with ([`RoomMeta`]).
//!
//! When the server loses the room's bookkeeping (a restart, or another node taking over a
//! failed owner) the media between peers keeps flowing; each peer reconnects and presents
//! its latest claim in `hello`. The room is rebuilt from them
//! ([`Room::restoring`](crate::room::Room::restoring)): every peer goes back under the
//! parent it claims, so nobody's media connection changes.
//!
//! The encoding is `base64url(JSON) "." base64url(HMAC-SHA256(key, base64url(JSON)))`:
//! readable by its holder (nothing in it is secret from the peer it describes), not
//! forgeable without the key, and bound to one room incarnation and one expiry. A client can
//! present an older claim of its own (a place it once held); the room settles such
//! conflicts by capacity and sequence number, never by trusting one peer about another.
//! Pure computation: the expiry check takes the time as an input.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::protocol::{NatClass, Role};
use crate::quality::Quality;
use crate::room::RoomSettings;
use crate::{PeerId, RoomId};

type HmacSha256 = Hmac<Sha256>;

/// Longest encoded claim accepted: claims are small, and verification should not hash
/// whatever a client sends.
pub const MAX_CLAIM_BYTES: usize = 2048;

/// The server's key for signing claims. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ClaimKey([u8; 32]);

impl fmt::Debug for ClaimKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClaimKey(<redacted>)")
    }
}

impl ClaimKey {
    /// A key from 32 bytes (from configuration, or the OS's randomness).
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A key from a configured secret of any length (at least 32 characters is wise).
    pub fn from_secret(secret: &[u8]) -> Self {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(b"treecast claim key");
        Self(mac.finalize().into_bytes().into())
    }

    /// A key derived from this one for `purpose` (e.g. a room's broadcaster token), so one
    /// configured secret yields independent values.
    pub fn derive(&self, purpose: &str, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(purpose.as_bytes());
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// Signs a claim.
    pub fn sign(&self, claim: &Claim) -> String {
        let json = serde_json::to_vec(claim).expect("a claim serializes");
        let body = URL_SAFE_NO_PAD.encode(json);
        let tag = URL_SAFE_NO_PAD.encode(self.tag(body.as_bytes()));
        format!("{body}.{tag}")
    }

    /// Checks a claim's signature and expiry (`now_unix` in seconds) and decodes it.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Claim, ClaimError> {
        if token.len() > MAX_CLAIM_BYTES {
            return Err(ClaimError::Malformed);
        }
        let (body, tag) = token.split_once('.').ok_or(ClaimError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .ok()
            .filter(|t| t.len() == 32)
            .ok_or(ClaimError::Malformed)?;
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(body.as_bytes());
        // Constant-time comparison.
        mac.verify_slice(&tag).map_err(|_| ClaimError::Forged)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| ClaimError::Malformed)?;
        let claim: Claim = serde_json::from_slice(&json).map_err(|_| ClaimError::Malformed)?;
        if claim.exp <= now_unix {
            return Err(ClaimError::Expired);
        }
        Ok(claim)
    }

    fn tag(&self, body: &[u8]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

/// Why a presented claim is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum ClaimError {
    /// Not a claim at all (bad encoding, too long, wrong shape).
    #[error("the claim is malformed")]
    Malformed,
    /// Well-formed but not signed with this server's key.
    #[error("the claim's signature does not match")]
    Forged,
    /// Genuine, past its expiry.
    #[error("the claim has expired")]
    Expired,
    /// Genuine, but for another room, another incarnation of this room, or another role.
    #[error("the claim is for another room")]
    OtherRoom,
}

/// A peer's place, as the room last told it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    /// The room.
    pub room: RoomId,
    /// The room's incarnation: a random number fixed when the room was created, so a claim
    /// never places a peer in a later room that happens to reuse the id.
    pub inc: u64,
    /// The peer.
    pub peer: PeerId,
    /// Its role.
    pub role: Role,
    /// Its parent when the claim was issued; `None` for the broadcaster and while waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<PeerId>,
    /// Orders the room's claims: a later claim about a place wins over an earlier one.
    pub seq: u64,
    /// Unix seconds after which the claim is refused.
    pub exp: u64,
    /// The uplink it announced, kbit/s (its capacity follows from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_kbps: Option<u32>,
    /// Its NAT class, as it reported it.
    #[serde(default, skip_serializing_if = "is_unknown")]
    pub nat: NatClass,
    /// Whether viewers need a signed link to join (the driver keeps that door).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private: bool,
    /// The room as it was created and last configured (broadcaster's claim only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<RoomMeta>,
}

fn is_unknown(nat: &NatClass) -> bool {
    *nat == NatClass::Unknown
}

/// What a room was created with and how an operator last set it: enough, with the
/// server's own `[room]` configuration, to open it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomMeta {
    /// The stream the broadcaster chose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<Quality>,
    /// The broadcast's title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The settings an operator may change.
    pub settings: RoomSettings,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> Claim {
        Claim {
            room: RoomId::new("r1").unwrap(),
            inc: 7,
            peer: PeerId(3),
            role: Role::Viewer,
            parent: Some(PeerId(1)),
            seq: 12,
            exp: 1_000,
            uplink_kbps: Some(2_500),
            nat: NatClass::Unknown,
            private: false,
            meta: None,
        }
    }

    #[test]
    fn a_signed_claim_verifies_until_it_expires() {
        let key = ClaimKey::new([1; 32]);
        let token = key.sign(&claim());
        assert_eq!(key.verify(&token, 999), Ok(claim()));
        assert_eq!(key.verify(&token, 1_000), Err(ClaimError::Expired));
    }

    #[test]
    fn another_key_or_an_edited_body_is_forged() {
        let key = ClaimKey::new([1; 32]);
        let token = key.sign(&claim());
        assert_eq!(
            ClaimKey::new([2; 32]).verify(&token, 0),
            Err(ClaimError::Forged)
        );
        let mut edited = claim();
        edited.parent = Some(PeerId(2));
        let (_, tag) = token.split_once('.').unwrap();
        let body = key.sign(&edited);
        let (body, _) = body.split_once('.').unwrap();
        assert_eq!(
            key.verify(&format!("{body}.{tag}"), 0),
            Err(ClaimError::Forged)
        );
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let key = ClaimKey::new([1; 32]);
        for bad in ["", ".", "a.b", "!!.!!", &"x".repeat(MAX_CLAIM_BYTES + 1)] {
            assert_eq!(key.verify(bad, 0), Err(ClaimError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn derived_values_depend_on_every_part() {
        let key = ClaimKey::new([1; 32]);
        let a = key.derive("token", &[b"r1", &7u64.to_be_bytes()]);
        assert_ne!(a, key.derive("token", &[b"r1", &8u64.to_be_bytes()]));
        assert_ne!(a, key.derive("link", &[b"r1", &7u64.to_be_bytes()]));
        assert_ne!(a, key.derive("token", &[b"r", b"1", &7u64.to_be_bytes()]));
        assert_eq!(a, key.derive("token", &[b"r1", &7u64.to_be_bytes()]));
    }
}
