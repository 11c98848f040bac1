//! Native treecast peer on the `webrtc` crate: a broadcaster that sends a synthetic
//! VP8-shaped RTP stream, and viewers that relay it along the signaller's tree without
//! decoding. The protocol logic is the core [`treecast_core::agent::Agent`], the same one
//! the browser client drives; [`Peer`] carries its actions out with real WebRTC
//! connections and a signalling WebSocket.
//!
//! Used by the end-to-end tests in `peer/tests/` and by the `treecast-peer` binary.

pub mod media;
mod peer;

pub use media::Stats;
pub use peer::{Peer, PeerConfig};
pub use treecast_core::agent::{Phase, Status};
pub use treecast_core::protocol::Role;
