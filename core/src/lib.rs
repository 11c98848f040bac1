//! Sans-IO core of treecast: the signalling protocol, the capacity-aware relay tree and
//! the room state machine. No sockets, no clocks, no global randomness: time and seeds are
//! inputs, so the signaller (tokio) and the simulator (virtual time) drive the very same
//! placement and repair code.
//!
//! # Driver loop
//! A driver owns one [`room::Room`] per room and repeats:
//!
//! 1. feed an [`room::Input`] with the current time: `room.handle(now, input)` — a
//!    `hello` from a new connection, a decoded [`protocol::ClientMessage`], a transport
//!    sign of life, a disconnect, or `Tick` when the last `poll_timeout` is due;
//! 2. drain [`room::Output`]s with `room.poll_output()`: messages to send on connections,
//!    connections to close, and [`room::RoomEvent`]s for metrics and dashboards;
//! 3. sleep until `room.poll_timeout()` or the next input, whichever comes first.
//!
//! Text frames are decoded with [`protocol::ClientMessage::decode`], which classifies every
//! failure with an [`protocol::ErrorCode`] the driver answers with.
//!
//! The tree alone ([`tree::RelayTree`]) is usable without a room, e.g. by benchmarks.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod agent;
mod buckets;
pub mod claim;
pub mod ids;
pub mod protocol;
pub mod quality;
pub mod room;
pub mod tree;
pub mod turn;

pub use ids::{PeerId, RoomId};
