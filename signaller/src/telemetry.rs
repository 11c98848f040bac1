//! Prometheus metrics through the `metrics` facade.
//!
//! The recorder is process-wide (the facade allows one), installed by the first
//! [`crate::serve`] of the process; servers started later in the same process (tests)
//! share it. Counters are bumped where things happen; gauges that describe the rooms
//! (`treecast_rooms`, `treecast_peers`, `treecast_room_max_depth`) are computed from the
//! room registry when `/metrics` is scraped, so they never drift.

use std::sync::OnceLock;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use treecast_core::claim::ClaimError;
use treecast_core::protocol::{EndReason, ErrorCode};
use treecast_core::room::{LeaveCause, RoomEvent};
use treecast_core::tree::TreeEvent;

/// The process-wide recorder's handle; `None` if another recorder was installed first.
static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder once per process and returns its handle.
pub(crate) fn install() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let depth_buckets: Vec<f64> =
                (0..=16).map(f64::from).chain([24.0, 32.0, 64.0]).collect();
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full("treecast_peer_depth".into()), &depth_buckets)
                .and_then(|b| b.install_recorder());
            match handle {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!("metrics are disabled: {e}");
                    None
                }
            }
        })
        .clone()
}

fn describe() {
    describe_gauge!(
        "treecast_rooms",
        "Rooms in the registry, ended rooms kept for late visitors included."
    );
    describe_gauge!(
        "treecast_peers",
        "Peers in all rooms, broadcasters included, connected or within their resume grace."
    );
    describe_gauge!(
        "treecast_room_max_depth",
        "Deepest attached depth over all rooms."
    );
    describe_gauge!("treecast_connections", "Open WebSocket connections.");
    describe_counter!(
        "treecast_connections_total",
        "WebSocket connections accepted."
    );
    describe_counter!(
        "treecast_joins_total",
        "Peers that joined a room (resumes not included)."
    );
    describe_counter!(
        "treecast_resumes_total",
        "Peers that resumed their place after a socket drop."
    );
    describe_counter!("treecast_leaves_total", "Peers that left a room, by cause.");
    describe_counter!(
        "treecast_repairs_total",
        "Subtrees re-attached to a new parent, by cause."
    );
    describe_counter!(
        "treecast_rooms_created_total",
        "Rooms created through the API."
    );
    describe_counter!("treecast_rooms_ended_total", "Rooms that ended, by reason.");
    describe_counter!(
        "treecast_messages_in_total",
        "WebSocket data frames received from clients."
    );
    describe_counter!("treecast_messages_out_total", "Messages sent to clients.");
    describe_counter!(
        "treecast_errors_total",
        "Client errors by code: error messages sent, plus slow consumers and oversized frames (closed without a message)."
    );
    describe_counter!(
        "treecast_room_faults_total",
        "Room tasks that failed on a server bug."
    );
    describe_counter!(
        "treecast_links_total",
        "Links between a child and its parent that came up, by the candidate-pair type ICE selected (host, srflx, prflx, relay), as children report them."
    );
    describe_counter!(
        "treecast_ice_failures_total",
        "Links whose ICE failed (a child found no working candidate pair to its parent)."
    );
    describe_counter!(
        "treecast_connectivity_reports_total",
        "NAT classes peers reported (public, full_cone, cone, symmetric, blocked)."
    );
    describe_counter!(
        "treecast_stun_requests_total",
        "STUN Binding requests answered, by answer (success, or error for change-IP and unknown attributes)."
    );
    describe_counter!(
        "treecast_stun_malformed_total",
        "Datagrams on the STUN ports dropped unanswered: not a well-formed Binding request."
    );
    describe_counter!(
        "treecast_tls_reloads_total",
        "TLS certificate reloads, by outcome (ok, failed: the old certificate stays)."
    );
    describe_histogram!(
        "treecast_peer_depth",
        "Depth of a peer each time it is linked to a parent."
    );
    crate::turn_server::describe_metrics();
}

/// Counts a WebSocket connection accepted.
pub(crate) fn connection_opened() {
    counter!("treecast_connections_total").increment(1);
    gauge!("treecast_connections").increment(1.0);
}

/// Counts a WebSocket connection closed.
pub(crate) fn connection_closed() {
    gauge!("treecast_connections").decrement(1.0);
}

/// Counts a data frame received.
pub(crate) fn message_in() {
    counter!("treecast_messages_in_total").increment(1);
}

/// Counts messages written to a client.
pub(crate) fn messages_out(n: u64) {
    counter!("treecast_messages_out_total").increment(n);
}

/// Counts an `error` sent to a client.
pub(crate) fn error_sent(code: ErrorCode) {
    counter!("treecast_errors_total", "code" => code.as_str()).increment(1);
}

/// Counts a room created through the API.
pub(crate) fn room_created() {
    counter!("treecast_rooms_created_total").increment(1);
}

/// Counts a room task that failed on a bug.
pub(crate) fn room_fault() {
    counter!("treecast_room_faults_total").increment(1);
    error_sent(ErrorCode::Internal);
}

/// Counts a STUN request answered.
pub(crate) fn stun_answered(kind: crate::stun::ReplyKind) {
    counter!("treecast_stun_requests_total", "answer" => kind.as_str()).increment(1);
}

/// Counts a datagram on a STUN port that was dropped.
pub(crate) fn stun_malformed() {
    counter!("treecast_stun_malformed_total").increment(1);
}

/// Counts a TLS certificate reload that worked or failed.
pub(crate) fn tls_reload(ok: bool) {
    let outcome = if ok { "ok" } else { "failed" };
    counter!("treecast_tls_reloads_total", "outcome" => outcome).increment(1);
}

/// Updates counters for something a room reported.
pub(crate) fn room_event(event: &RoomEvent) {
    match event {
        RoomEvent::Joined { resumed: false, .. } => counter!("treecast_joins_total").increment(1),
        RoomEvent::Joined { resumed: true, .. } => counter!("treecast_resumes_total").increment(1),
        RoomEvent::Left { cause, .. } => {
            counter!("treecast_leaves_total", "cause" => leave_cause(*cause)).increment(1);
        }
        RoomEvent::Repaired { subtrees, cause } => {
            counter!("treecast_repairs_total", "cause" => cause.as_str())
                .increment(u64::from(*subtrees));
        }
        RoomEvent::Tree(TreeEvent::Linked { depth, .. }) => {
            histogram!("treecast_peer_depth").record(f64::from(*depth));
        }
        RoomEvent::Refused { code } => error_sent(*code),
        RoomEvent::Ended { reason } => {
            counter!("treecast_rooms_ended_total", "reason" => end_reason(*reason)).increment(1);
        }
        RoomEvent::Link { link, .. } => {
            counter!("treecast_links_total", "kind" => link.as_str()).increment(1);
        }
        RoomEvent::LinkFailed { .. } => counter!("treecast_ice_failures_total").increment(1),
        RoomEvent::Connectivity { nat, .. } => {
            counter!("treecast_connectivity_reports_total", "nat" => nat.as_str()).increment(1);
        }
        RoomEvent::ClaimRefused { reason } => {
            counter!("treecast_claims_refused_total", "reason" => claim_error(*reason))
                .increment(1);
        }
        RoomEvent::Restored(s) => {
            counter!("treecast_restored_peers_total", "place" => "kept")
                .increment(u64::from(s.in_place));
            counter!("treecast_restored_peers_total", "place" => "moved")
                .increment(u64::from(s.moved));
        }
        RoomEvent::Disconnected { .. }
        | RoomEvent::Capacity { .. }
        | RoomEvent::Tree(_)
        | RoomEvent::Media { .. }
        | RoomEvent::Reconfigured(_) => {}
    }
}

/// Sets the registry-derived gauges and renders the Prometheus text format.
pub(crate) fn render(
    handle: Option<&PrometheusHandle>,
    rooms: usize,
    peers: u64,
    max_depth: u32,
) -> String {
    let Some(handle) = handle else {
        return "# metrics are disabled: another metrics recorder was installed in this process\n"
            .to_owned();
    };
    gauge!("treecast_rooms").set(rooms as f64);
    gauge!("treecast_peers").set(peers as f64);
    gauge!("treecast_room_max_depth").set(f64::from(max_depth));
    handle.run_upkeep();
    handle.render()
}

/// The wire name of a leave cause, as a metric label.
fn leave_cause(cause: LeaveCause) -> &'static str {
    match cause {
        LeaveCause::Left => "left",
        LeaveCause::Lost => "lost",
        LeaveCause::Failed => "failed",
        LeaveCause::Overflow => "overflow",
        LeaveCause::RoomEnded => "room_ended",
    }
}

/// Cluster mode: the lease operations' counts so far.
pub(crate) fn cluster_leases(stats: &crate::cluster::LeaseStats) {
    counter!("treecast_cluster_leases_acquired_total").absolute(stats.acquired);
    counter!("treecast_cluster_lease_renewals_total").absolute(stats.renewed);
    counter!("treecast_cluster_fenced_writes_refused_total").absolute(stats.fenced);
    counter!("treecast_cluster_redis_errors_total", "op" => "lease").absolute(stats.redis_errors);
}

/// Cluster mode: a Redis operation of the message path failed (`op` names it).
pub(crate) fn cluster_redis_error(op: &'static str) {
    counter!("treecast_cluster_redis_errors_total", "op" => op).increment(1);
}

/// Cluster mode: this node began or stopped owning a room (`+1` / `-1`).
pub(crate) fn cluster_owned(delta: f64) {
    gauge!("treecast_cluster_rooms_owned").increment(delta);
}

/// Cluster mode: this node lost a room's lease (expired, taken, or Redis unreachable).
pub(crate) fn cluster_lease_lost() {
    counter!("treecast_cluster_leases_lost_total").increment(1);
}

/// Cluster mode: this node took over a room whose owner was gone.
pub(crate) fn cluster_takeover() {
    counter!("treecast_cluster_takeovers_total").increment(1);
}

/// Cluster mode: how long an input waited in a room's stream before its owner read it.
pub(crate) fn cluster_stream_lag(lag: std::time::Duration) {
    histogram!("treecast_cluster_stream_lag_seconds").record(lag.as_secs_f64());
}

/// Cluster mode: an edge dropped a batch from a room's former owner (older epoch).
pub(crate) fn cluster_stale_batch() {
    counter!("treecast_cluster_stale_batches_total").increment(1);
}

/// Cluster mode: an edge had peers resume because messages to them may have been lost
/// (`gap` in one connection's sequence, or a lost `subscription`).
pub(crate) fn cluster_resync(cause: &'static str, peers: usize) {
    counter!("treecast_cluster_resyncs_total", "cause" => cause).increment(peers as u64);
}

/// Counts a media report at a cluster edge: forwarded to the room's owner, or kept at
/// the edge because it changed nothing the owner decides on.
pub(crate) fn cluster_report(forwarded: bool) {
    let outcome = if forwarded { "forwarded" } else { "digested" };
    counter!("treecast_cluster_reports_total", "outcome" => outcome).increment(1);
}

/// Why a claim was refused, as a metric label.
pub(crate) fn claim_error(reason: ClaimError) -> &'static str {
    match reason {
        ClaimError::Malformed => "malformed",
        ClaimError::Forged => "forged",
        ClaimError::Expired => "expired",
        ClaimError::OtherRoom => "other_room",
    }
}

/// The wire name of an end reason, as a metric label.
pub(crate) fn end_reason(reason: EndReason) -> &'static str {
    match reason {
        EndReason::BroadcasterLeft => "broadcaster_left",
        EndReason::BroadcasterLost => "broadcaster_lost",
        EndReason::Expired => "expired",
        EndReason::Shutdown => "shutdown",
    }
}
