//! `POST /api/uplink`: a short timed upload that lets a browser estimate its upload
//! bandwidth before it joins (it times the request; the answer echoes the byte count).
//!
//! Bounded: bodies above [`MAX_PROBE_BYTES`] are refused (413) before they are buffered, at
//! most [`CONCURRENT_PROBES`] run at once and at most [`PROBES_PER_SECOND`] start per
//! second on the whole server; more get 429 and the client joins without a measurement.

use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

/// Largest probe body.
pub(crate) const MAX_PROBE_BYTES: usize = 1 << 20;
/// Probes running at once.
const CONCURRENT_PROBES: usize = 4;
/// Probes started per second, server-wide.
const PROBES_PER_SECOND: u32 = 20;

static RUNNING: Semaphore = Semaphore::const_new(CONCURRENT_PROBES);
static STARTED: Mutex<Option<(Instant, u32)>> = Mutex::new(None);

fn admit() -> bool {
    let mut started = STARTED.lock().unwrap_or_else(PoisonError::into_inner);
    let now = Instant::now();
    match started.as_mut() {
        Some((since, count)) if now.duration_since(*since).as_secs() < 1 => {
            if *count >= PROBES_PER_SECOND {
                return false;
            }
            *count += 1;
        }
        _ => *started = Some((now, 1)),
    }
    true
}

fn busy() -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        Json(serde_json::json!({
            "code": "rate_limited",
            "message": "Too many bandwidth probes right now; join without one.",
        })),
    )
        .into_response()
}

/// `POST /api/uplink`. The body limit is a layer on the route (see `server.rs`).
pub(crate) async fn probe(body: Bytes) -> Response {
    let Ok(_permit) = RUNNING.try_acquire() else {
        return busy();
    };
    if !admit() {
        return busy();
    }
    Json(serde_json::json!({ "bytes": body.len() })).into_response()
}
