//! Retuning rooms over real sockets: settings chosen at creation, the operator-only
//! `PATCH /api/rooms/{room}`, and a 500-viewer room whose relay fan-out goes from 4 to 2
//! and back while every viewer keeps a parent link throughout.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Client, TestServer, call};
use serde_json::{Value, json};
use treecast_core::tree::min_depth;
use treecast_signaller::Config;

const SECRET: &str = "operator-secret-for-tests-0123456789";
const VIEWERS: usize = 500;

fn config() -> Config {
    let mut config = common::test_config();
    config.access.admin_secret = Some(treecast_core::turn::Secret::new(SECRET));
    config.room.root_fanout = 4;
    config.room.relay_fanout = 4;
    config
}

async fn snapshot(addr: SocketAddr, room: &str) -> Value {
    let (status, snap) = call(
        addr,
        "GET",
        &format!("/api/rooms/{room}"),
        None,
        Some(SECRET),
    )
    .await;
    assert_eq!(status, 200, "{snap}");
    snap
}

async fn create(addr: SocketAddr, body: &str) -> (u16, Value) {
    call(addr, "POST", "/api/rooms", Some(body), None).await
}

async fn patch(addr: SocketAddr, room: &str, body: &str, bearer: Option<&str>) -> (u16, Value) {
    call(
        addr,
        "PATCH",
        &format!("/api/rooms/{room}"),
        Some(body),
        bearer,
    )
    .await
}

fn assert_refused(answer: &(u16, Value), status: u16, code: &str, field: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["code"], code, "{}", answer.1);
    let message = answer.1["message"].as_str().unwrap_or_default();
    assert!(message.contains(field), "names {field}: {message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_take_settings_at_creation_within_the_servers_limits() {
    let server = TestServer::start(config()).await;
    let addr = server.addr;
    let (status, created) = create(
        addr,
        r#"{"quality":"360p","root_fanout":2,"relay_fanout":3,"max_depth":5,"max_viewers":100}"#,
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let room = created["room"].as_str().unwrap();
    let settings = &snapshot(addr, room).await["settings"];
    assert_eq!(
        settings,
        &json!({"root_fanout": 2, "relay_fanout": 3, "max_depth": 5, "max_peers": 100})
    );

    assert_refused(
        &create(addr, r#"{"relay_fanout":5}"#).await,
        400,
        "invalid_field",
        "relay_fanout",
    );
    assert_refused(
        &create(addr, r#"{"root_fanout":0}"#).await,
        400,
        "invalid_field",
        "root_fanout",
    );
    assert_refused(
        &create(addr, r#"{"max_depth":17}"#).await,
        400,
        "invalid_field",
        "max_depth",
    );
    assert_refused(
        &create(addr, r#"{"max_viewers":20001}"#).await,
        400,
        "invalid_field",
        "max_viewers",
    );
    // Viewers who never relay: the broadcaster's 4 slots are the whole room.
    assert_refused(
        &create(addr, r#"{"relay_fanout":0,"max_viewers":10}"#).await,
        400,
        "invalid_field",
        "max_viewers",
    );
    let (status, _) = create(addr, r#"{"relay_fanout":0,"max_viewers":4}"#).await;
    assert_eq!(status, 201);
    assert_refused(
        &create(addr, r#"{"fanout":2}"#).await,
        400,
        "invalid_field",
        "fanout",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_operator_may_retune_a_room_and_bad_changes_are_refused() {
    let server = TestServer::start(config()).await;
    let addr = server.addr;
    let (_, created) = create(addr, "").await;
    let room = created["room"].as_str().unwrap();
    let token = created["token"].as_str().unwrap();
    let change = r#"{"relay_fanout":2}"#;

    let (status, _) = patch(addr, room, change, None).await;
    assert_eq!(status, 401);
    let (status, _) = patch(addr, room, change, Some("not-the-secret")).await;
    assert_eq!(status, 401);
    assert_refused(
        &patch(addr, room, change, Some(token)).await,
        403,
        "forbidden",
        "operator",
    );
    let (status, body) = patch(addr, "nosuchroom", change, Some(SECRET)).await;
    assert_eq!(
        (status, &body["code"]),
        (404, &json!("unknown_room")),
        "{body}"
    );

    let (status, settings) = patch(addr, room, change, Some(SECRET)).await;
    assert_eq!(status, 200, "{settings}");
    assert_eq!(
        settings,
        json!({"root_fanout": 4, "relay_fanout": 2, "max_depth": 16, "max_viewers": 20000})
    );
    assert_eq!(snapshot(addr, room).await["settings"]["relay_fanout"], 2);

    let bad = [
        (r#"{"relay_fanout":5}"#, "invalid_field", "relay_fanout"),
        (r#"{"max_depth":0}"#, "invalid_field", "max_depth"),
        (r#"{"max_viewers":0}"#, "invalid_field", "max_viewers"),
        (r#"{"quality":"720p"}"#, "invalid_field", "quality"),
        (r#"{}"#, "invalid_field", "changes nothing"),
        (
            r#"{"relay_fanout":1,"max_depth":2}"#,
            "invalid_field",
            "max_depth",
        ),
        (r#"[1]"#, "bad_json", "JSON object"),
        (r#"{"relay_fanout":"#, "bad_json", "JSON object"),
    ];
    for (body, code, field) in bad {
        assert_refused(
            &patch(addr, room, body, Some(SECRET)).await,
            400,
            code,
            field,
        );
    }
    assert_eq!(
        snapshot(addr, room).await["settings"],
        json!({"root_fanout": 4, "relay_fanout": 2, "max_depth": 16, "max_peers": 20000}),
        "refused changes change nothing"
    );
}

/// A viewer driven like a page: reports media from each new parent at once (`connecting`,
/// then `receiving`), pings to stay heard, and keeps everything it was told.
async fn run_viewer(addr: SocketAddr, room: String, stop: Arc<AtomicBool>) -> Client {
    let mut c = Client::join(addr, &room, "viewer", None, Some(10_000)).await;
    let mut last_ping = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // `recv` only records whole messages, so giving up on one mid-wait loses nothing.
        match tokio::time::timeout(Duration::from_millis(500), c.recv()).await {
            Ok(Some(m)) if m["type"] == "parent" => {
                for state in ["connecting", "receiving"] {
                    c.send_json(&json!({"type": "report", "state": state}))
                        .await;
                }
            }
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => break,
        }
        if last_ping.elapsed() > Duration::from_secs(2) {
            c.send_json(&json!({"type": "ping"})).await;
            last_ping = Instant::now();
        }
    }
    c
}

/// Replays a client's log: the peers feeding it (parents not yet dropped). Returns the
/// number of moves (a `parent` after the first) and the first moment, if any, a `drop`
/// left it with no parent link at all.
fn replay(log: &[Value]) -> (u32, Option<String>) {
    let mut feeding: BTreeSet<u64> = BTreeSet::new();
    let mut children: BTreeSet<u64> = BTreeSet::new();
    let (mut parents, mut gap) = (0u32, None);
    for (i, m) in log.iter().enumerate() {
        let peer = m["peer_id"].as_u64();
        match (m["type"].as_str(), peer) {
            (Some("parent"), Some(p)) => {
                feeding.insert(p);
                parents += 1;
            }
            (Some("child"), Some(p)) => {
                children.insert(p);
            }
            (Some("drop"), Some(p)) => {
                if feeding.remove(&p) {
                    if feeding.is_empty() && gap.is_none() {
                        gap = Some(format!("message {i}: dropped by {p} with no other parent"));
                    }
                } else {
                    children.remove(&p);
                }
            }
            _ => {}
        }
    }
    (parents.saturating_sub(1), gap)
}

/// d_min for the peers' capacities as the snapshot gives them (the new ones).
fn d_min(snap: &Value) -> u32 {
    let peers = snap["peers"].as_array().unwrap();
    let cap = |p: &Value| p["capacity"].as_u64().unwrap() as u32;
    let root = peers.iter().find(|p| p["role"] == "broadcaster").unwrap();
    let viewers = peers.iter().filter(|p| p["role"] == "viewer").map(cap);
    min_depth(cap(root), viewers).expect("everyone fits")
}

/// Whether every peer is attached and feeds no more children than its capacity, which
/// is within `relay` for viewers.
fn within(snap: &Value, relay: u64) -> bool {
    snap["waiting"] == 0
        && snap["shedding"] == 0
        && snap["peers"].as_array().unwrap().iter().all(|p| {
            let capacity = p["capacity"].as_u64().unwrap();
            p["depth"].is_u64()
                && p["children"].as_array().unwrap().len() as u64 <= capacity
                && (p["role"] == "broadcaster" || capacity <= relay)
        })
}

/// Polls the snapshot until `done` holds; the bound only guards against a hang.
async fn wait_until(
    addr: SocketAddr,
    room: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let snap = snapshot(addr, room).await;
        if done(&snap) {
            return snap;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never happened: histogram {}, shedding {}",
            snap["depth_histogram"],
            snap["shedding"]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_the_relay_fanout_of_500_viewers_leaves_nobody_without_a_parent() {
    let mut config = config();
    // Without heartbeat timeouts a client busy behind 500 others is never taken for dead;
    // the moves under test are the operator's, not liveness repairs.
    config.room.heartbeat_timeout = None;
    config.room.rebalance_moves_per_second = 20;
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let (_, created) = create(addr, "").await;
    let room = created["room"].as_str().unwrap().to_owned();
    let token = created["token"].as_str().unwrap();
    let mut broadcaster =
        Client::join(addr, &room, "broadcaster", Some(token), Some(100_000)).await;

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let viewers: Vec<_> = (0..VIEWERS)
        .map(|_| tokio::spawn(run_viewer(addr, room.clone(), Arc::clone(&stop))))
        .collect();
    let at_4 = wait_until(addr, &room, "all viewers placed", |s| {
        s["viewers"] == VIEWERS as u64 && within(s, 4)
    })
    .await;
    let joined = started.elapsed();
    let depth_at_4 = at_4["max_depth"].as_u64().unwrap();

    let lowered = Instant::now();
    let (status, body) = patch(addr, &room, r#"{"relay_fanout":2}"#, Some(SECRET)).await;
    assert_eq!(status, 200, "{body}");
    let at_2 = wait_until(addr, &room, "every peer within fan-out 2", |s| within(s, 2)).await;
    let shed = lowered.elapsed();
    let d_min_2 = d_min(&at_2);
    let settled = wait_until(addr, &room, "depth within d_min + 1", |s| {
        within(s, 2) && s["max_depth"].as_u64().unwrap() <= u64::from(d_min_2) + 1
    })
    .await;
    let settled_after = lowered.elapsed();
    let depth_at_2 = settled["max_depth"].as_u64().unwrap();

    let raised = Instant::now();
    let (status, body) = patch(addr, &room, r#"{"relay_fanout":4}"#, Some(SECRET)).await;
    assert_eq!(status, 200, "{body}");
    let back = wait_until(addr, &room, "a shallower tree at fan-out 4", |s| {
        within(s, 4) && s["max_depth"].as_u64().unwrap() < depth_at_2
    })
    .await;
    let raised_after = raised.elapsed();

    stop.store(true, Ordering::Relaxed);
    let mut moves = 0u32;
    let mut moved = 0u32;
    for v in viewers {
        let c = v.await.expect("the viewer task does not panic");
        let (n, gap) = replay(&c.log);
        assert_eq!(gap, None, "peer {} went without a parent link", c.id());
        moves += n;
        moved += u32::from(n > 0);
    }
    broadcaster.sync().await;
    eprintln!(
        "{VIEWERS} viewers: joined in {joined:.1?}, depth {depth_at_4} at fan-out 4; \
         fan-out 2: within capacity after {shed:.1?}, depth {depth_at_2} (d_min {d_min_2}) \
         after {settled_after:.1?}; fan-out 4 again: depth {} after {raised_after:.1?}; \
         {moves} moves of {moved} viewers",
        back["max_depth"]
    );
    assert!(moved > 0, "lowering the fan-out moved somebody");
}
