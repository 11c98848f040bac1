//! treecast's browser client: [`treecast_core::agent::Agent`] compiled to WebAssembly.
//!
//! The split: every decision a relay peer makes — which media connections to open and
//! close, what to tell the signaller, when the parent's media counts as stalled, when and
//! how to resume after a WebSocket blip — is the sans-IO agent in `core`, unit-tested
//! natively. This crate exposes it to the page through wasm-bindgen as [`Client`]; the
//! page's `web/client.js` is the I/O shell that owns the WebSocket and the
//! `RTCPeerConnection`s and carries out the agent's actions.
//!
//! # Driver loop (in `web/client.js`)
//! ```text
//!  WebSocket open/close/message ─┐
//!  getStats every 200 ms ────────┼─► Client.<input>(now_ms, …) ─► poll_action() ─► JSON actions:
//!  ICE candidate / SDP to send ──┤                                open_socket, send, open_parent,
//!  timer at poll_timeout() ──────┘                                open_child, close, signal,
//!                                                                 sample_media, status
//! ```
//! `sample_media` asks for a getStats of the parent connection right away: a watchdog
//! deadline passed, and only a sample (never the timer) may decide a stall.
//! Times are `performance.now()` milliseconds. Actions are JSON (`{"kind": …}`) so the
//! page does not depend on wasm-bindgen's object glue.
//!
//! [`Client::uplink`] applies the rule for reporting the browser's own bandwidth estimate
//! ([`uplink`] module). [`qr_svg`] draws the room link as a QR code (the `qrcode` crate,
//! built in).
#![forbid(unsafe_code)]

pub mod uplink;

use std::time::Duration;

use treecast_core::agent::{Agent, AgentConfig, Input, Measurements};
use treecast_core::protocol::{Connectivity, Delivery, RelayMode, Role};
use treecast_core::{PeerId, RoomId};
use wasm_bindgen::prelude::*;

use crate::uplink::{ChildSample, UplinkEstimator};

fn at(now_ms: f64) -> Duration {
    Duration::from_secs_f64(now_ms.max(0.0) / 1000.0)
}

/// One peer in one room: the agent plus JSON glue for the page.
#[wasm_bindgen]
pub struct Client {
    agent: Agent,
    uplink: UplinkEstimator,
}

#[wasm_bindgen]
impl Client {
    /// A client for `room` as `role` ("broadcaster" or "viewer"); `token` is the
    /// broadcaster token, `uplink_kbps` the measured upload bandwidth.
    #[wasm_bindgen(constructor)]
    pub fn new(
        room: &str,
        role: &str,
        token: Option<String>,
        uplink_kbps: Option<u32>,
    ) -> Result<Client, JsError> {
        let room = RoomId::new(room).map_err(|e| JsError::new(&e.to_string()))?;
        let role = match role {
            "broadcaster" => Role::Broadcaster,
            "viewer" => Role::Viewer,
            other => return Err(JsError::new(&format!("unknown role {other:?}"))),
        };
        let mut config = AgentConfig::new(room, role);
        config.token = token;
        config.uplink_kbps = uplink_kbps;
        Ok(Client {
            agent: Agent::new(config),
            uplink: UplinkEstimator::new(uplink_kbps),
        })
    }

    /// The signed viewer link token of a private room, sent in `hello`. Set it before
    /// the socket opens.
    pub fn set_link(&mut self, link: Option<String>) {
        self.agent.set_link(link);
    }

    /// The WebSocket is open.
    pub fn socket_opened(&mut self, now_ms: f64) {
        self.agent.handle(at(now_ms), Input::SocketOpened);
    }

    /// The WebSocket closed or failed.
    pub fn socket_closed(&mut self, now_ms: f64) {
        self.agent.handle(at(now_ms), Input::SocketClosed);
    }

    /// A text frame from the signaller.
    pub fn text(&mut self, now_ms: f64, text: String) {
        self.agent.handle(at(now_ms), Input::Text(text));
    }

    /// A sample of the parent connection's cumulative counters, read at `now_ms`: video
    /// frames received (absent without video) and bytes received. Also the answer to a
    /// `sample_media` action.
    pub fn media_progress(&mut self, now_ms: f64, video_frames: Option<f64>, bytes: f64) {
        self.agent.handle(
            at(now_ms),
            Input::MediaProgress {
                video_frames: video_frames.map(|f| f.max(0.0) as u64),
                bytes: bytes.max(0.0) as u64,
            },
        );
    }

    /// Measurements for the next report; `delivered` is `[[peer, kbps, mode?], …]` as JSON
    /// (`mode`: `pass_through` or `track`, how this relay feeds that child; null or
    /// missing when it is no relay), `link` the selected candidate pair's type toward the
    /// parent (`host`, `srflx`, `prflx`, `relay`), when known.
    pub fn measured(
        &mut self,
        now_ms: f64,
        loss: Option<f32>,
        hop_latency_ms: Option<u32>,
        delivered: &str,
        link: Option<String>,
    ) {
        // Entries are tuples; a third element is optional (older pages send pairs).
        let entries: Vec<Vec<serde_json::Value>> =
            serde_json::from_str(delivered).unwrap_or_default();
        let delivered = entries
            .into_iter()
            .filter_map(|e| {
                let peer = e.first()?.as_u64()?;
                let kbps = u32::try_from(e.get(1)?.as_u64()?).ok()?;
                let mode = e
                    .get(2)
                    .and_then(|m| serde_json::from_value::<RelayMode>(m.clone()).ok());
                Some(Delivery {
                    peer: PeerId(peer),
                    kbps,
                    mode,
                })
            })
            .collect();
        self.agent.handle(
            at(now_ms),
            Input::Measured(Measurements {
                loss,
                hop_latency_ms,
                delivered,
                link: link.and_then(|l| serde_json::from_value(serde_json::Value::String(l)).ok()),
            }),
        );
    }

    /// What candidate gathering showed about this peer's network: `nat` is a class name
    /// (`public`, `full_cone`, `cone`, `symmetric`, `blocked`), `relay` whether a TURN
    /// relay candidate came back. Unknown names are ignored.
    pub fn connectivity(&mut self, now_ms: f64, nat: &str, relay: bool) {
        let Ok(nat) = serde_json::from_value(serde_json::Value::String(nat.into())) else {
            return;
        };
        self.agent
            .handle(at(now_ms), Input::Connectivity(Connectivity { nat, relay }));
    }

    /// ICE toward this neighbour failed (reported when it is the parent).
    pub fn link_failed(&mut self, now_ms: f64, peer: f64) {
        self.agent.handle(
            at(now_ms),
            Input::LinkFailed {
                peer: PeerId(peer as u64),
            },
        );
    }

    /// The sending connections' numbers over the last interval, as JSON
    /// `[[peer, available_kbps | null, sending_kbps], …]`, and the bitrate each child is
    /// meant to get. Returns the new uplink (kbit/s) that the next report will carry, when
    /// the rule in [`uplink`] says the estimate should change it.
    pub fn uplink(&mut self, now_ms: f64, children: &str, target_kbps: u32) -> Option<u32> {
        let rows: Vec<(u64, Option<f64>, f64)> = serde_json::from_str(children).unwrap_or_default();
        let samples: Vec<ChildSample> = rows
            .into_iter()
            .map(|(peer, available, sending)| ChildSample {
                peer,
                available_kbps: available.map(|a| a.clamp(0.0, f64::from(u32::MAX)) as u32),
                sending_kbps: sending.clamp(0.0, f64::from(u32::MAX)) as u32,
            })
            .collect();
        let kbps = self.uplink.sample(at(now_ms), &samples, target_kbps)?;
        self.agent.handle(at(now_ms), Input::UplinkEstimate(kbps));
        Some(kbps)
    }

    /// The smoothed sum of the children's bandwidth estimates (kbit/s), when any count.
    pub fn uplink_estimate(&self) -> Option<u32> {
        self.uplink.smoothed()
    }

    /// Sends signalling data (JSON) to a neighbour; dropped if `to` is not one.
    pub fn send_signal(&mut self, now_ms: f64, to: f64, data: &str) {
        let Ok(data) = serde_json::from_str(data) else {
            return;
        };
        self.agent.handle(
            at(now_ms),
            Input::SendSignal {
                to: PeerId(to as u64),
                data,
            },
        );
    }

    /// Leaves the room now (the broadcaster ends it): for a page being closed.
    pub fn leave(&mut self, now_ms: f64) {
        self.agent.handle(at(now_ms), Input::Leave);
    }

    /// Leaves from the page's own control: a relay keeps feeding its children (phase
    /// `leaving`) until the room has moved them, then ends in `left`. A page closed
    /// meanwhile calls [`Client::leave`], which cuts it short.
    pub fn leave_gracefully(&mut self, now_ms: f64) {
        self.agent.handle(at(now_ms), Input::LeaveGracefully);
    }

    /// Call when [`Client::poll_timeout`] is due.
    pub fn timeout(&mut self, now_ms: f64) {
        self.agent.handle_timeout(at(now_ms));
    }

    /// When to call [`Client::timeout`] next, in `performance.now()` milliseconds.
    pub fn poll_timeout(&self) -> Option<f64> {
        self.agent.poll_timeout().map(|t| t.as_secs_f64() * 1000.0)
    }

    /// The next action as JSON, if any.
    pub fn poll_action(&mut self) -> Option<String> {
        self.agent
            .poll_action()
            .and_then(|a| serde_json::to_string(&a).ok())
    }

    /// The room's stream from `welcome`, as JSON `{"stream_kbps": …, "video": {"quality",
    /// "width", "height", "fps"} | null}`, or `null` before `welcome` (or from a server
    /// that does not say). Senders aim for `stream_kbps` per child.
    pub fn stream(&self) -> String {
        serde_json::to_string(&self.agent.stream()).unwrap_or_else(|_| "null".into())
    }

    /// The ICE servers from `welcome`, as JSON in `RTCIceServer` shape.
    pub fn ice_servers(&self) -> String {
        serde_json::to_string(self.agent.ice_servers()).unwrap_or_else(|_| "[]".into())
    }
}

/// The QR code of `text` as an SVG document (dark modules on white, with a quiet zone).
#[wasm_bindgen]
pub fn qr_svg(text: &str) -> Result<String, JsError> {
    qr(text).map_err(|e| JsError::new(&e))
}

fn qr(text: &str) -> Result<String, String> {
    use qrcode::render::svg;
    let code = qrcode::QrCode::with_error_correction_level(text, qrcode::EcLevel::M)
        .map_err(|e| e.to_string())?;
    Ok(code
        .render::<svg::Color>()
        .min_dimensions(160, 160)
        .quiet_zone(true)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qr_draws_an_svg() {
        let svg = qr("http://127.0.0.1:8080/watch/q7Xc-2_kLm").unwrap();
        assert!(svg.contains("<svg") && svg.contains("path"), "{svg}");
    }
}
