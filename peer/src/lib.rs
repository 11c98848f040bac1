//! Native treecast peer on the `webrtc` crate: a broadcaster that sends a synthetic
//! VP8-shaped RTP stream, and viewers that relay it along the signaller's tree without
//! decoding. The protocol logic is the core [`treecast_core::agent::Agent`], the same one
//! the browser client drives; [`Peer`] carries its actions out with real WebRTC
//! connections and a signalling WebSocket.
//!
//! Relays pass keyframe requests (PLI) up to the broadcaster, which marks its next frame a
//! keyframe, and report the bitrate they deliver to each child. [`load`] runs many peers in
//! one process and measures them (`treecast-peer load`). [`nat`] probes the host's NAT
//! class against the signaller's STUN server.
//!
//! Used by the end-to-end tests in `peer/tests/` and by the `treecast-peer` binary.

pub mod load;
pub mod media;
pub mod nat;
pub mod netem;
mod peer;

pub use media::Stats;
pub use peer::{KEYFRAME_REQUEST_GAP, Peer, PeerConfig, PeerError};
pub use treecast_core::agent::{Phase, Status};
pub use treecast_core::protocol::Role;
