//! Signalling wire types: JSON text frames with a `"type"` tag in snake_case.
//!
//! Types are split by direction ([`ClientMessage`] travels client → server,
//! [`ServerMessage`] server → client) so neither side can send the other's messages.
//! Every message is documented for client authors in `docs/protocol.md`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{PeerId, RoomId};
use crate::quality::VideoFormat;
use crate::tree::WaitReason;

/// Protocol version spoken by this build. A `hello` with another `v` is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// The role a peer asks for in `hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The one peer that captures and sends the stream; root of the relay tree.
    Broadcaster,
    /// Receives the stream from a parent and relays it to its children.
    Viewer,
}

/// First message on every connection: which room to join and as what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// Protocol version the client speaks; absent means 1.
    #[serde(default = "default_version")]
    pub v: u32,
    /// Room to join.
    pub room: RoomId,
    /// Broadcaster or viewer.
    pub role: Role,
    /// Broadcaster token returned when the room was created; required for the broadcaster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Upload bandwidth the client measured or assumes, in kbit/s. Sets its relay capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_kbps: Option<u32>,
    /// Resume token from an earlier `welcome`: reclaims the same peer id and tree position
    /// after a signalling blip, within the room's resume grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
    /// A signed viewer link token (the `t` of a private room's `/watch/{room}#t=...`
    /// link); needed to join a private room without its broadcaster token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// The latest `claim` the server sent this peer, presented with `resume`: if the
    /// server lost the room's bookkeeping (a restart, a failover), the claim puts the peer
    /// back where it was ([`crate::claim`]). Ignored while the resume token is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn default_version() -> u32 {
    PROTOCOL_VERSION
}

/// Whether media is arriving from the parent, as seen by the reporting peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaState {
    /// Still connecting to a new parent; no media expected yet.
    Connecting,
    /// Frames arrive and advance.
    Receiving,
    /// No media for the client's watchdog window: the parent (or something above it) failed.
    Stalled,
}

/// Bitrate a relay actually delivered to one child over the last report interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delivery {
    /// The child.
    pub peer: PeerId,
    /// Delivered bitrate in kbit/s.
    pub kbps: u32,
    /// How the relay feeds this child, when it says (older clients and the broadcaster
    /// do not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RelayMode>,
}

/// How a relay passes the stream on to one child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayMode {
    /// The received encoded frames unchanged: same picture at every depth.
    PassThrough,
    /// Decoded and encoded again (one generation of quality loss, the leg under
    /// WebRTC's congestion control).
    Track,
}

/// How other peers can reach this one, as it learned while gathering ICE candidates.
///
/// Learned from the reflexive addresses the signaller's STUN server reports on its two
/// ports (RFC 5780's mapping test): the same mapped port toward both means the NAT maps
/// endpoint-independently. Filtering can only be tested by clients that can ask the STUN
/// server to answer from its other port (native peers); browsers report `cone` for any
/// endpoint-independent NAT.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum NatClass {
    /// Not reported yet. Placed as `cone`, the most common case.
    #[default]
    Unknown,
    /// No NAT: the reflexive address is a host address.
    Public,
    /// Endpoint-independent mapping and filtering that does not depend on the remote port
    /// ("full cone", or address-restricted): anyone who learns the mapping reaches it.
    FullCone,
    /// Endpoint-independent mapping, port-restricted (or unknown) filtering. Connects
    /// directly to every class but `symmetric`.
    Cone,
    /// Endpoint-dependent mapping: a new public port per destination. Connects directly
    /// only to `public` and `full_cone` peers.
    Symmetric,
    /// No reflexive candidate at all (UDP blocked, or STUN unreachable): only TURN reaches it.
    Blocked,
}

impl NatClass {
    /// Every class, for metrics and tests.
    pub const ALL: [NatClass; 6] = [
        Self::Unknown,
        Self::Public,
        Self::FullCone,
        Self::Cone,
        Self::Symmetric,
        Self::Blocked,
    ];

    /// The class as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Public => "public",
            Self::FullCone => "full_cone",
            Self::Cone => "cone",
            Self::Symmetric => "symmetric",
            Self::Blocked => "blocked",
        }
    }

    /// Whether two peers of these classes can connect without TURN (UDP hole punching,
    /// both sides sending checks as ICE does). Symmetric.
    pub fn direct(self, other: NatClass) -> bool {
        use NatClass::*;
        match (self, other) {
            (Blocked, _) | (_, Blocked) => false,
            (Public | FullCone, _) | (_, Public | FullCone) => true,
            (Symmetric, _) | (_, Symmetric) => false,
            // cone and unknown (presumed cone) with each other
            _ => true,
        }
    }
}

/// What a peer learned about its network while gathering candidates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connectivity {
    /// Its NAT class.
    pub nat: NatClass,
    /// Whether it obtained a TURN relay candidate (TURN is configured and works for it).
    #[serde(default)]
    pub relay: bool,
}

/// The type of the candidate pair ICE selected for a link, as the reporting peer sees it:
/// `relay` if either side is a TURN relay, else `prflx` if either side was learned from a
/// check, else `srflx` if either side is server-reflexive, else `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkKind {
    /// Both host candidates (same network).
    Host,
    /// Through at least one NAT mapping learned from STUN.
    Srflx,
    /// Through a mapping learned from a connectivity check.
    Prflx,
    /// Through a TURN relay.
    Relay,
}

impl LinkKind {
    /// Every kind, for metrics.
    pub const ALL: [LinkKind; 4] = [Self::Host, Self::Srflx, Self::Prflx, Self::Relay];

    /// The kind as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Srflx => "srflx",
            Self::Prflx => "prflx",
            Self::Relay => "relay",
        }
    }

    /// The pair's kind from its two candidates' types (`host`, `srflx`, `prflx`, `relay`
    /// as ICE names them). `None` for an unknown type name.
    pub fn of_pair(local: &str, remote: &str) -> Option<Self> {
        let rank = |t: &str| match t {
            "host" => Some(0),
            "srflx" => Some(1),
            "prflx" => Some(2),
            "relay" => Some(3),
            _ => None,
        };
        let kinds = [Self::Host, Self::Srflx, Self::Prflx, Self::Relay];
        Some(kinds[rank(local)?.max(rank(remote)?)])
    }
}

/// Periodic (and on-change) media report from a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// Whether media from the parent is arriving.
    pub state: MediaState,
    /// Fraction of packets lost from the parent, 0.0 ..= 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f32>,
    /// Estimated delay behind the broadcaster, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u32>,
    /// A new uplink measurement in kbit/s; updates this peer's relay capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_kbps: Option<u32>,
    /// What this peer delivered to each of its children.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delivered: Vec<Delivery>,
    /// The candidate-pair type ICE selected toward the parent, once connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkKind>,
}

/// Messages a client sends to the signaller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Join a room (must be the first message, and only once per connection).
    Hello(Hello),
    /// Opaque WebRTC signalling (SDP offer/answer, ICE candidate) for a current parent or child.
    Signal {
        /// Recipient: the sender's parent or one of its children.
        to: PeerId,
        /// Passed through untouched.
        data: Value,
    },
    /// Media state and measurements.
    Report(Report),
    /// What the peer learned about its network (send once candidates are gathered, and
    /// again if it changes).
    Connectivity(Connectivity),
    /// ICE toward this neighbour (the sender's parent) failed: no candidate pair works.
    LinkFailed {
        /// The neighbour.
        peer: PeerId,
    },
    /// Keep-alive; answered with `pong`. (Braces so unknown fields are refused.)
    Ping {},
    /// Leave the room for good. A broadcaster leaving ends the room.
    Leave {
        /// The leaver keeps feeding its children until the room has moved each of them
        /// to a new parent that delivers (make-before-break); it gets `drop` per child as
        /// each move completes, then the server closes its socket. Absent means false:
        /// the server closes its socket at once.
        #[serde(default, skip_serializing_if = "is_false")]
        linger: bool,
    },
}

/// A STUN/TURN server for RTCPeerConnection configuration, in the browser's own shape.
/// Unknown keys are refused, so a misspelt `credentials` in a config file is an error
/// rather than a TURN server that silently fails to authenticate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IceServer {
    /// `stun:` / `turn:` URLs.
    pub urls: Vec<String>,
    /// TURN user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Limits the server enforces, told to the client so it can stay within them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientLimits {
    /// Largest accepted text frame, in bytes.
    pub max_message_bytes: u32,
    /// Sustained messages per second allowed per connection.
    pub messages_per_second: u32,
    /// Send something (e.g. `ping` or `report`) at least this often, in milliseconds.
    pub heartbeat_ms: u64,
    /// How long the signaller keeps the peer's place after its socket drops, in milliseconds.
    pub resume_grace_ms: u64,
    /// Children this peer may be asked to feed.
    pub capacity: u32,
    /// Bitrate of the room's stream (video and audio), kbit/s: what a sender sends each
    /// child, and what one child costs in the capacity formula. 0 from a server that does
    /// not say.
    #[serde(default)]
    pub stream_kbps: u32,
    /// The picture the broadcaster chose (resolution and frame rate), when the room was
    /// created with a quality.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video: Option<VideoFormat>,
}

/// Why a room ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The broadcaster sent `leave`.
    BroadcasterLeft,
    /// The broadcaster's connection dropped and did not come back within the grace period.
    BroadcasterLost,
    /// The broadcaster never arrived within the room's start timeout.
    Expired,
    /// The server is shutting down.
    Shutdown,
}

/// What a standby peer would become to the peer told about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StandbyRole {
    /// It would feed you: it opens the connection and sends the offer.
    Parent,
    /// You would feed it: open a connection without media and send the offer.
    Child,
}

/// Messages the signaller sends to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Answer to `hello`: who you are in this room.
    Welcome {
        /// This peer's id in the room.
        peer_id: PeerId,
        /// Secret to present in a later `hello` to resume this peer after a socket drop.
        resume: String,
        /// The role granted.
        role: Role,
        /// Whether this `hello` resumed an existing peer (its tree position is kept).
        resumed: bool,
        /// ICE servers for RTCPeerConnection.
        ice_servers: Vec<IceServer>,
        /// Limits this server enforces.
        limits: ClientLimits,
        /// Protocol version of the server.
        protocol: u32,
        /// The broadcast's title, as the broadcaster gave it when creating the room.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
    },
    /// Your place in the room, signed: keep the latest and present it in `hello` with
    /// `resume`, so a server that lost the room's bookkeeping can put you back where you
    /// are ([`crate::claim`]). Sent after `welcome` and whenever your parent changes.
    Claim {
        /// Opaque to the client.
        claim: String,
    },
    /// Pull the stream from this peer. It opens the connection and sends the offer.
    Parent {
        /// The new parent.
        peer_id: PeerId,
        /// Depth this peer will have under that parent (broadcaster = 0).
        depth: u32,
    },
    /// Feed this peer: open a connection to it and send it an offer.
    Child {
        /// The new child.
        peer_id: PeerId,
    },
    /// Fresh STUN/TURN servers (TURN credentials are renewed before they expire). Use
    /// them for new connections and ICE restarts; existing relayed connections keep
    /// working with the credentials they allocated with.
    IceServers {
        /// Replaces the list from `welcome`.
        ice_servers: Vec<IceServer>,
    },
    /// Your parent's signalling connection dropped. It may resume in a moment (a network
    /// blip: its media keeps flowing) or be dead (a killed relay: media stopped with it).
    /// Report `stalled` as soon as media from it stops, without the full stall window.
    ParentDisconnected {
        /// The parent whose connection dropped.
        parent: PeerId,
    },
    /// Close the media connection to this peer (it is no longer your parent or child).
    Drop {
        /// The former neighbour.
        peer_id: PeerId,
    },
    /// Prepare a standby link to this peer: connect now (the upstream end sends the offer,
    /// as for `parent`/`child`) but send no media on it. The room names the peer in a
    /// later `parent` or `child` if it takes the place of a relay that left or failed;
    /// that link then carries media at once, with no new connection. Until then both ends
    /// keep it idle.
    Standby {
        /// The other end.
        peer_id: PeerId,
        /// What that peer would become to you.
        role: StandbyRole,
    },
    /// Close the standby link to this peer (nothing to do if it became your parent or
    /// child in the meantime).
    StandbyEnd {
        /// The other end.
        peer_id: PeerId,
    },
    /// Signalling data from a neighbour.
    Signal {
        /// The sender (your parent or one of your children).
        from: PeerId,
        /// As the sender passed it.
        data: Value,
    },
    /// Room status for this peer; sent on join, on depth changes and as the audience changes.
    Room {
        /// Viewers currently in the room (attached or waiting).
        viewers: u32,
        /// Whether the broadcaster is present.
        live: bool,
        /// Hops from the broadcaster; absent while this peer waits for a parent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        depth: Option<u32>,
        /// Current parent; absent for the broadcaster and while waiting.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<PeerId>,
        /// Current children. After a resume this is authoritative: close media
        /// connections to anyone else.
        #[serde(default)]
        children: Vec<PeerId>,
        /// Children this peer may feed right now.
        capacity: u32,
        /// Why this peer has no parent, while it waits: `no_slot` (every place within the
        /// depth limit is taken) or `no_route` (places are free, but with peers this one
        /// cannot connect to directly, and the server has no TURN relay).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        waiting: Option<WaitReason>,
    },
    /// The room ended; the server closes the connection after this.
    Ended {
        /// Why.
        reason: EndReason,
    },
    /// Answer to `ping`.
    Pong,
    /// A request was refused. `code` is stable for programs, `message` is for people.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human sentence.
        message: String,
    },
}

impl ServerMessage {
    /// An `error` message with the code's standard sentence.
    pub fn error(code: ErrorCode) -> Self {
        Self::Error {
            code,
            message: code.sentence().to_owned(),
        }
    }

    /// An `error` message with a specific sentence.
    pub fn error_with(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            code,
            message: message.into(),
        }
    }

    /// Encodes as a JSON text frame.
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail: keys are strings and values are plain data.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal","message":"encoding failed"}"#.to_owned()
        })
    }
}

/// Stable, machine-readable error codes. Each has a human sentence ([`ErrorCode::sentence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON.
    BadJson,
    /// Valid JSON, but not an object with a string `type`.
    BadMessage,
    /// `type` names no known message.
    UnknownType,
    /// A field is missing, unknown, or has the wrong type or value.
    InvalidField,
    /// The frame exceeds the size limit.
    TooLarge,
    /// A binary frame; the protocol is JSON text only.
    BinaryFrame,
    /// Above the per-connection message rate; messages are being dropped.
    RateLimited,
    /// A message other than `hello` before `hello`.
    NotJoined,
    /// A second `hello` on the same connection.
    AlreadyJoined,
    /// The `hello` names a protocol version this server does not speak.
    UnsupportedVersion,
    /// No room with that id exists.
    UnknownRoom,
    /// The room has ended.
    RoomEnded,
    /// The room has its maximum number of peers.
    RoomFull,
    /// Broadcaster role asked for without the right token.
    WrongToken,
    /// The room already has a broadcaster connected.
    BroadcasterExists,
    /// The resume token is unknown or expired.
    BadResume,
    /// A resume claim is malformed, not signed by this server, expired, or for another
    /// room or role.
    BadClaim,
    /// `signal` to a peer that is not the sender's parent or child.
    NotNeighbour,
    /// A `signal` names a peer that is not in the room.
    UnknownPeer,
    /// Too many connections from this address.
    TooManyConnections,
    /// The server has its maximum number of rooms.
    TooManyRooms,
    /// A room asked for with a quality above the server's stream bitrate limit.
    QualityNotAllowed,
    /// The client did not send anything within the heartbeat timeout.
    Timeout,
    /// The client could not keep up with the messages sent to it.
    SlowConsumer,
    /// The server is shutting down.
    ShuttingDown,
    /// A fault on the server side; details are in the server's logs.
    Internal,
    /// HTTP only: credentials (operator secret, broadcaster token or grant) are missing,
    /// invalid, expired, or not good for what was asked.
    Unauthorized,
    /// HTTP only: valid credentials that do not allow what was asked.
    Forbidden,
    /// A private room's viewer link is genuine but past its expiry.
    LinkExpired,
    /// A private room's viewer link has been used as many times as it allows.
    LinkUsedUp,
    /// HTTP only: signed viewer links asked for a room that is public.
    NotPrivate,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 31] = [
        Self::BadJson,
        Self::BadMessage,
        Self::UnknownType,
        Self::InvalidField,
        Self::TooLarge,
        Self::BinaryFrame,
        Self::RateLimited,
        Self::NotJoined,
        Self::AlreadyJoined,
        Self::UnsupportedVersion,
        Self::UnknownRoom,
        Self::RoomEnded,
        Self::RoomFull,
        Self::WrongToken,
        Self::BroadcasterExists,
        Self::BadResume,
        Self::BadClaim,
        Self::NotNeighbour,
        Self::UnknownPeer,
        Self::TooManyConnections,
        Self::TooManyRooms,
        Self::QualityNotAllowed,
        Self::Timeout,
        Self::SlowConsumer,
        Self::ShuttingDown,
        Self::Internal,
        Self::Unauthorized,
        Self::Forbidden,
        Self::LinkExpired,
        Self::LinkUsedUp,
        Self::NotPrivate,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadJson => "bad_json",
            Self::BadMessage => "bad_message",
            Self::UnknownType => "unknown_type",
            Self::InvalidField => "invalid_field",
            Self::TooLarge => "too_large",
            Self::BinaryFrame => "binary_frame",
            Self::RateLimited => "rate_limited",
            Self::NotJoined => "not_joined",
            Self::AlreadyJoined => "already_joined",
            Self::UnsupportedVersion => "unsupported_version",
            Self::UnknownRoom => "unknown_room",
            Self::RoomEnded => "room_ended",
            Self::RoomFull => "room_full",
            Self::WrongToken => "wrong_token",
            Self::BroadcasterExists => "broadcaster_exists",
            Self::BadResume => "bad_resume",
            Self::BadClaim => "bad_claim",
            Self::NotNeighbour => "not_neighbour",
            Self::UnknownPeer => "unknown_peer",
            Self::TooManyConnections => "too_many_connections",
            Self::TooManyRooms => "too_many_rooms",
            Self::QualityNotAllowed => "quality_not_allowed",
            Self::Timeout => "timeout",
            Self::SlowConsumer => "slow_consumer",
            Self::ShuttingDown => "shutting_down",
            Self::Internal => "internal",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::LinkExpired => "link_expired",
            Self::LinkUsedUp => "link_used_up",
            Self::NotPrivate => "not_private",
        }
    }

    /// The standard human sentence for this code.
    pub fn sentence(self) -> &'static str {
        match self {
            Self::BadJson => "The message is not valid JSON.",
            Self::BadMessage => "The message must be a JSON object with a string \"type\" field.",
            Self::UnknownType => "The message type is not one this server knows.",
            Self::InvalidField => "A field of the message is missing or has the wrong type.",
            Self::TooLarge => "The message is larger than this server accepts.",
            Self::BinaryFrame => "Binary frames are not accepted; send JSON text frames.",
            Self::RateLimited => {
                "Too many messages; slow down. Messages above the limit are dropped."
            }
            Self::NotJoined => "Send \"hello\" before any other message.",
            Self::AlreadyJoined => "This connection has already joined a room.",
            Self::UnsupportedVersion => "This server does not speak that protocol version.",
            Self::UnknownRoom => "There is no room with that id. Check the link.",
            Self::RoomEnded => "This broadcast has ended.",
            Self::RoomFull => "The room is full.",
            Self::WrongToken => {
                "Only the room's creator, with its broadcaster token, can broadcast."
            }
            Self::BroadcasterExists => "This room already has a broadcaster connected.",
            Self::BadResume => {
                "That resume token is unknown or has expired; join again without it."
            }
            Self::BadClaim => {
                "That claim to a place in the room is not valid here; join again without it."
            }
            Self::NotNeighbour => "You can only signal your current parent or children.",
            Self::UnknownPeer => "That peer is not in this room.",
            Self::TooManyConnections => "Too many connections from your address.",
            Self::TooManyRooms => "The server cannot open more rooms right now.",
            Self::QualityNotAllowed => {
                "This server does not offer that quality; choose a lower one."
            }
            Self::Timeout => "Nothing was heard from you for too long.",
            Self::SlowConsumer => "You did not read messages fast enough.",
            Self::ShuttingDown => "The server is shutting down.",
            Self::Internal => "Something went wrong on the server.",
            Self::Unauthorized => {
                "This needs credentials: send \"Authorization: Bearer <secret or token>\"."
            }
            Self::Forbidden => "Your credentials do not allow this.",
            Self::LinkExpired => "This invitation link has expired; ask for a new one.",
            Self::LinkUsedUp => {
                "This invitation link has been used as many times as it allows; ask for a new one."
            }
            Self::NotPrivate => "This room is public: its plain link needs no signature.",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a text frame could not be decoded into a [`ClientMessage`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DecodeError {
    /// The code to answer with.
    pub code: ErrorCode,
    /// A sentence naming what was wrong, for the client's developer.
    pub message: String,
}

impl DecodeError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The `error` message answering this failure.
    pub fn to_message(&self) -> ServerMessage {
        ServerMessage::error_with(self.code, self.message.clone())
    }
}

/// Message type names a client may send, in wire form.
pub const CLIENT_TYPES: [&str; 7] = [
    "hello",
    "signal",
    "report",
    "connectivity",
    "link_failed",
    "ping",
    "leave",
];

/// Deepest nesting of arrays and objects a client message may have, the message object
/// itself included (the JSON parser's own limit, which keeps a hostile message from
/// exhausting the stack): a `signal`'s `data` may nest one level less.
pub const MAX_NESTING: usize = 127;

impl ClientMessage {
    /// Decodes a text frame, classifying every failure with an [`ErrorCode`].
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            let message = if e.to_string().starts_with("recursion limit exceeded") {
                format!("The message nests arrays and objects more than {MAX_NESTING} levels deep.")
            } else {
                format!("The message is not valid JSON ({e}).")
            };
            DecodeError::new(ErrorCode::BadJson, message)
        })?;
        let Some(kind) = value.get("type").and_then(Value::as_str).map(str::to_owned) else {
            return Err(DecodeError::new(
                ErrorCode::BadMessage,
                ErrorCode::BadMessage.sentence(),
            ));
        };
        if !CLIENT_TYPES.contains(&kind.as_str()) {
            let shown: String = kind.chars().take(40).collect();
            return Err(DecodeError::new(
                ErrorCode::UnknownType,
                format!(
                    "Unknown message type \"{shown}\"; expected one of: {}.",
                    CLIENT_TYPES.join(", ")
                ),
            ));
        }
        serde_json::from_value(value).map_err(|e| {
            DecodeError::new(
                ErrorCode::InvalidField,
                format!("Invalid \"{kind}\" message: {e}."),
            )
        })
    }

    /// Encodes as a JSON text frame (used by native clients and tests).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_with_defaults() {
        let m = ClientMessage::decode(r#"{"type":"hello","room":"r1","role":"viewer"}"#).unwrap();
        let ClientMessage::Hello(h) = &m else {
            panic!("not a hello: {m:?}")
        };
        assert_eq!(h.v, PROTOCOL_VERSION);
        assert_eq!(h.role, Role::Viewer);
        assert_eq!(ClientMessage::decode(&m.to_json()).unwrap(), m);
    }

    #[test]
    fn decode_failures_are_classified() {
        let code = |s: &str| ClientMessage::decode(s).unwrap_err().code;
        assert_eq!(code("{nope"), ErrorCode::BadJson);
        // `data` may nest up to the documented limit, and no deeper.
        let signal = |levels: usize| {
            let data = format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
            ClientMessage::decode(&format!(r#"{{"type":"signal","to":1,"data":{data}}}"#))
        };
        assert!(signal(MAX_NESTING - 1).is_ok());
        let deep = signal(MAX_NESTING).unwrap_err();
        assert_eq!(deep.code, ErrorCode::BadJson);
        assert!(deep.message.contains("127 levels"), "{}", deep.message);
        assert_eq!(code("[1,2]"), ErrorCode::BadMessage);
        assert_eq!(code(r#"{"type":7}"#), ErrorCode::BadMessage);
        assert_eq!(code(r#"{"type":"launch"}"#), ErrorCode::UnknownType);
        assert_eq!(
            code(r#"{"type":"hello","room":"r"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"hello","room":"a b","role":"viewer"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"signal","to":"x","data":{}}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"ping","extra":1}"#),
            ErrorCode::InvalidField
        );
        let e = ClientMessage::decode(r#"{"type":"hello","role":"viewer"}"#).unwrap_err();
        assert!(e.message.contains("room"), "{}", e.message);
    }

    #[test]
    fn nat_classes_connect_as_the_hole_punching_matrix_says() {
        use NatClass::*;
        for a in NatClass::ALL {
            for b in NatClass::ALL {
                assert_eq!(a.direct(b), b.direct(a), "{a:?} {b:?}");
            }
            assert!(!a.direct(Blocked));
        }
        assert!(Cone.direct(Cone));
        assert!(Unknown.direct(Cone));
        assert!(!Symmetric.direct(Cone));
        assert!(!Symmetric.direct(Symmetric));
        assert!(!Symmetric.direct(Unknown));
        assert!(FullCone.direct(Symmetric));
        assert!(Public.direct(Symmetric));
        let m = ClientMessage::decode(r#"{"type":"connectivity","nat":"full_cone","relay":true}"#)
            .unwrap();
        assert_eq!(
            m,
            ClientMessage::Connectivity(Connectivity {
                nat: FullCone,
                relay: true
            })
        );
        let m = ClientMessage::decode(r#"{"type":"link_failed","peer":4}"#).unwrap();
        assert_eq!(m, ClientMessage::LinkFailed { peer: PeerId(4) });
    }

    #[test]
    fn leave_lingers_only_when_asked() {
        let plain = ClientMessage::decode(r#"{"type":"leave"}"#).unwrap();
        assert_eq!(plain, ClientMessage::Leave { linger: false });
        assert_eq!(plain.to_json(), r#"{"type":"leave"}"#, "false is omitted");
        let linger = ClientMessage::decode(r#"{"type":"leave","linger":true}"#).unwrap();
        assert_eq!(linger, ClientMessage::Leave { linger: true });
        assert_eq!(ClientMessage::decode(&linger.to_json()).unwrap(), linger);
        let code = |s: &str| ClientMessage::decode(s).unwrap_err().code;
        assert_eq!(
            code(r#"{"type":"leave","linger":1}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"leave","stay":true}"#),
            ErrorCode::InvalidField
        );
    }

    #[test]
    fn pair_kind_is_the_weakest_candidate() {
        assert_eq!(LinkKind::of_pair("host", "host"), Some(LinkKind::Host));
        assert_eq!(LinkKind::of_pair("srflx", "host"), Some(LinkKind::Srflx));
        assert_eq!(LinkKind::of_pair("srflx", "prflx"), Some(LinkKind::Prflx));
        assert_eq!(LinkKind::of_pair("relay", "host"), Some(LinkKind::Relay));
        assert_eq!(LinkKind::of_pair("bogus", "host"), None);
    }

    #[test]
    fn server_messages_use_snake_case_tags() {
        let json = ServerMessage::Child { peer_id: PeerId(3) }.to_json();
        assert_eq!(json, r#"{"type":"child","peer_id":3}"#);
        let json = ServerMessage::error(ErrorCode::NotNeighbour).to_json();
        assert!(json.starts_with(r#"{"type":"error","code":"not_neighbour","message":"#));
    }

    #[test]
    fn every_code_has_a_distinct_wire_name_and_a_sentence() {
        let mut names: Vec<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        for c in ErrorCode::ALL {
            let wire = serde_json::to_value(c).unwrap();
            assert_eq!(wire, Value::String(c.as_str().into()));
            assert!(c.sentence().ends_with('.'));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }
}
