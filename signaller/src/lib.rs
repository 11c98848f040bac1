//! treecast's signalling server: the axum + tokio shell around
//! [`treecast_core::room::Room`].
//!
//! # Tasks and the driver loop
//! The core is sans-IO: a `Room` takes inputs with the current time and hands back outputs.
//! This crate drives it with one tokio task per room and two per WebSocket:
//!
//! ```text
//!   WebSocket ──► reader task ──RoomCommand──► room task ──Outbound queue──► writer task ──► WebSocket
//!                 (limits, decode,            (owns the Room:              (serialize,
//!                  hello routing)              handle → poll_output,        ping, close)
//!                                              sleep to poll_timeout)
//!   HTTP API ────── Snapshot / Subscribe ────►    │ events ──► metrics, dashboard SSE
//! ```
//!
//! - **Room task**: owns one `Room` and nothing else touches it
//!   (no `Arc<Mutex<Room>>`). It waits on its command channel or until
//!   `room.poll_timeout()`, feeds `room.handle(now, input)` with `now` = time since the
//!   server started, then drains `room.poll_output()`: messages go into the connection's
//!   bounded outbound queue without waiting (a full queue makes the client a slow consumer:
//!   it is closed and the room is told it disconnected), closes go to the writer after what
//!   is queued, events go to the metrics and to dashboard subscribers. An ended room stays
//!   registered for a while so late visitors hear that it ended.
//! - **Connection reader**: enforces the frame size and message rate, decodes text frames,
//!   accepts only `hello` before joining and routes it to the room it names; afterwards
//!   every message goes to that room. Pongs become `Alive`, a closed socket `Disconnected`.
//! - **Connection writer**: serializes queued messages, pings every heartbeat interval, and
//!   closes the socket when asked.
//! - **Registry**: room id → the room task's channel, behind a lock held only for the lookup.
//!
//! # Use
//! [`serve`] runs a server on a listener you bind (tests bind `127.0.0.1:0`) until a
//! shutdown future completes; [`Config`] holds every setting, with defaults that serve.
//! The `treecast-signaller` binary adds flags, environment variables and a TOML file.
//! [`serve_with_stun`] also answers STUN on two UDP sockets you bind ([`StunSockets`]; the
//! binary binds `stun_port` and the next port) and hands that STUN server to clients first
//! in their ICE servers; [`serve`] alone binds no UDP port, so parallel tests never collide.
//!
//! # TLS
//! With [`Config::tls`] set, the same routes are served over HTTPS and WSS: from PEM files
//! that are re-read when they change, or from a self-signed certificate for a LAN (see
//! [`TlsConfig`]). [`serve_with`] also takes a [`TlsReload`] to re-read them on demand.
//!
//! # Routes
//! - `GET /ws`: the signalling WebSocket (JSON protocol of [`treecast_core::protocol`]).
//! - `POST /api/rooms`: creates a room; 201 `{room, token, watch_url}` (with
//!   `[access] create = "token"`, needs a grant or the operator secret).
//! - `GET /api/rooms`: every room: `[{id, live, ended, viewers, max_depth}]` (operator).
//! - `GET /api/rooms/{room}`: the room's snapshot (tree and peers) (operator, or the
//!   room's broadcaster token).
//! - `GET /api/rooms/{room}/events`: server-sent events, a `snapshot` then every room
//!   event (operator, or the room's broadcaster token).
//! - `GET /api/access`: what credentials this server asks for (public).
//!
//! Credentials go in `Authorization: Bearer`; see [`access`]. Without an operator secret
//! and on a loopback-only listener, all of these are open.
//! - `POST /api/uplink`: a bounded, rate-limited upload a browser times to estimate its
//!   uplink before joining.
//! - `GET /healthz`, `GET /metrics` (Prometheus), the pages `/`, `/watch/{room}`,
//!   `/dashboard`, and their scripts, styles and wasm client under `/assets/`.
//!
//! # Restarts and cluster mode
//! With a resume key ([`Config::resume_key`]) every peer holds a signed claim to its place
//! ([`treecast_core::claim`]); a restarted server opens a room again on the first genuine
//! claim and rebuilds it from the claims its peers present. With [`Config::redis`] several
//! nodes share one Redis: any node takes any peer's WebSocket, each room has one owner
//! holding a fenced lease, and an edge takes over a room whose owner died ([`cluster`]).
//!
//! # TURN
//! With `room.turn` set, every peer gets TURN credentials minted for it (TURN REST scheme,
//! checked by coturn's `use-auth-secret` or by the embedded TURN server that
//! [`Config::turn_server`] starts on a UDP port next to the HTTP one).
//!
//! Errors are JSON `{code, message}` with the protocol's error codes.
#![forbid(unsafe_code)]

pub mod access;
mod api;
pub mod client;
pub mod cluster;
mod config;
mod connection;
mod pages;
mod rate;
mod room_task;
mod rooms;
mod server;
pub mod stun;
mod telemetry;
mod tls;
mod turn_server;
mod uplink;

pub use access::{AccessConfig, AccessError, CreateMode};
pub use config::{Config, ConfigError, Limits};
pub use server::{Extras, ServerError, bind, serve, serve_with, serve_with_stun};
pub use stun::StunSockets;
pub use tls::{
    LETS_ENCRYPT_PRODUCTION, LETS_ENCRYPT_STAGING, TlsConfig, TlsError, TlsReload, fingerprint,
};
pub use treecast_core::room::RoomConfig;
pub use turn_server::{PortRange, TurnServerConfig, TurnServerError};
