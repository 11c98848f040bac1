//! treecast's discrete-event simulator: the signaller's own room and tree code
//! ([`treecast_core::room::Room`]) driven with virtual time, modelled network latency,
//! peer capacities, NAT classes (direct, relayed or failing links) and churn.
//!
//! # Driver loop
//! [`engine::Engine`] keeps an event queue ordered by virtual time (ties in scheduling
//! order). Each event is a peer arriving or departing, a message reaching the signaller or
//! a client, a link coming up, a watchdog firing, a room timer, or a population sample.
//! Messages to the signaller become `room.handle(now, input)`; the room's outputs become
//! client deliveries after the modelled one-way delay; `room.poll_timeout()` schedules the
//! next room tick. So placement (NAT-aware), promotion, stand-in repair, stall and
//! `link_failed` handling are exactly the production code's; only the network, the
//! clients and the media are modelled.
//!
//! Every random draw comes from one seed ([`models::Streams`]): the same scenario and seed
//! give byte-identical results.
//!
//! # Use
//! Load a [`scenario::Scenario`] (TOML), build an [`engine::Engine`], `run()` it, and turn
//! the returned [`stats::Stats`] into files with [`report::write`]. [`sweep`] runs the
//! Cartesian product of parameter overrides across cores. The `sim` binary does all this.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod engine;
pub mod models;
mod queue;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod sweep;
