//! End to end with real WebRTC: an in-process signaller (root and relay fan-out 2), one
//! native broadcaster and N native viewers on 127.0.0.1. Every viewer receives RTP at the
//! depth the signaller reports; then a depth-1 relay dies abruptly and its whole subtree
//! receives again, the peers below the orphaned children keeping their parents.
//!
//! Timeouts only guard liveness; nothing here asserts speed. `TREECAST_E2E_VIEWERS` sets N
//! (default 30, the size: depths 1 to 4 are populated, so the killed relay has
//! grandchildren and great-grandchildren).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use treecast_peer::media::now_us;
use treecast_peer::{Peer, PeerConfig, Role};

const LIVENESS: Duration = Duration::from_secs(60);
const REPAIR_BOUND: Duration = Duration::from_secs(20);

async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if size == 0 || after.len() < size {
                break;
            }
            out.push_str(&after[..size]);
            rest = after[size..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_owned()
    };
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn snapshot(addr: SocketAddr, room: &str) -> Value {
    let (status, v) = http(addr, "GET", &format!("/api/rooms/{room}")).await;
    assert_eq!(status, 200, "{v}");
    v
}

fn peer_entry(snap: &Value, id: u64) -> &Value {
    snap["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("peer {id} not in {snap}"))
}

async fn wait_until(what: &str, bound: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn received(p: &Peer) -> u64 {
    p.stats().packets_received.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn viewers_receive_at_their_depth_and_a_dead_relay_is_repaired() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let n: usize = std::env::var("TREECAST_E2E_VIEWERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let test_start = Instant::now();

    let mut config = treecast_signaller::Config::default();
    config.limits.max_connections_per_ip = 10_000;
    config.limits.room_creation_burst = 1_000;
    config.room.root_fanout = 2;
    config.room.relay_fanout = 2;
    config.room.ice_servers = Vec::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(treecast_signaller::serve(listener, config, async move {
        let _ = stopped.await;
    }));

    let (status, created) = http(addr, "POST", "/api/rooms").await;
    assert_eq!(status, 201, "{created}");
    let room = created["room"].as_str().unwrap().to_owned();
    let url = format!("ws://{addr}/ws");

    let mut bc = PeerConfig::new(&url, &room, Role::Broadcaster);
    bc.token = Some(created["token"].as_str().unwrap().to_owned());
    bc.stream_kbps = 300;
    bc.use_ice_servers = false;
    let broadcaster = Peer::start(bc).unwrap();
    wait_until("the broadcaster is welcomed", LIVENESS, || {
        broadcaster.status().peer_id.is_some()
    })
    .await;

    // Viewers join one at a time, each waiting for its place, so the tree fills level by level.
    let mut viewers: Vec<Peer> = Vec::new();
    for _ in 0..n {
        let mut vc = PeerConfig::new(&url, &room, Role::Viewer);
        vc.use_ice_servers = false;
        let v = Peer::start(vc).unwrap();
        wait_until("a viewer is placed", LIVENESS, || {
            v.status().depth.is_some()
        })
        .await;
        viewers.push(v);
    }
    let joined = Instant::now();
    for v in &viewers {
        wait_until("every viewer receives RTP", LIVENESS, || received(v) > 0).await;
    }
    let all_receiving = joined.elapsed();

    // Depths: what each peer was told matches the signaller's snapshot.
    let snap = snapshot(addr, &room).await;
    let mut by_id: HashMap<u64, usize> = HashMap::new();
    for (i, v) in viewers.iter().enumerate() {
        let s = v.status();
        let id = s.peer_id.unwrap().0;
        by_id.insert(id, i);
        let entry = peer_entry(&snap, id);
        assert_eq!(entry["depth"], s.depth.unwrap(), "depth of {id}: {snap}");
        assert_eq!(
            entry["parent"],
            s.parent.unwrap().0,
            "parent of {id}: {snap}"
        );
    }
    let max_depth = snap["max_depth"].as_u64().unwrap();
    // Let the latency samples fill a little, then print per-depth medians.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for d in 1..=max_depth {
        let mut p50s: Vec<u32> = viewers
            .iter()
            .filter(|v| v.status().depth == Some(d as u32))
            .filter_map(|v| v.stats().latency_quantile(0.5))
            .collect();
        p50s.sort_unstable();
        let p99s: Vec<u32> = viewers
            .iter()
            .filter(|v| v.status().depth == Some(d as u32))
            .filter_map(|v| v.stats().latency_quantile(0.99))
            .collect();
        eprintln!(
            "depth {d}: latency p50 per peer (µs) {p50s:?}, p99 max {:?}",
            p99s.iter().max()
        );
    }

    // Pick the depth-1 relay whose children have children.
    let children_of = |snap: &Value, id: u64| -> Vec<u64> {
        peer_entry(snap, id)["children"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect()
    };
    let victim = *by_id
        .keys()
        .filter(|&&id| peer_entry(&snap, id)["depth"] == 1)
        .max_by_key(|&&id| {
            children_of(&snap, id)
                .iter()
                .map(|&c| children_of(&snap, c).len())
                .sum::<usize>()
        })
        .unwrap();
    let orphans = children_of(&snap, victim);
    let grandchildren: Vec<(u64, u64)> = orphans
        .iter()
        .flat_map(|&c| children_of(&snap, c).into_iter().map(move |g| (g, c)))
        .collect();
    let mut descendants: Vec<u64> = orphans.clone();
    let mut frontier: Vec<u64> = orphans.clone();
    while let Some(p) = frontier.pop() {
        for c in children_of(&snap, p) {
            descendants.push(c);
            frontier.push(c);
        }
    }
    eprintln!(
        "{n} viewers, max depth {max_depth}, all receiving {all_receiving:?} after the last join; \
         killing relay {victim}: children {orphans:?}, grandchildren {grandchildren:?}"
    );

    let victim_peer = viewers.remove(by_id[&victim]);
    let by_id: HashMap<u64, usize> = viewers
        .iter()
        .enumerate()
        .map(|(i, v)| (v.status().peer_id.unwrap().0, i))
        .collect();
    let killed_us = now_us();
    let killed = Instant::now();
    victim_peer.kill().await;

    // Every descendant receives a packet the broadcaster sent after the kill.
    let mut repair: Vec<(u64, Duration)> = Vec::new();
    let mut pending: Vec<u64> = descendants.clone();
    let deadline = killed + REPAIR_BOUND;
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no media after the kill within {REPAIR_BOUND:?} for {pending:?}: {}",
            snapshot(addr, &room).await
        );
        pending.retain(|id| {
            let newest = viewers[by_id[id]]
                .stats()
                .newest_sent_us
                .load(Ordering::Relaxed);
            if newest > killed_us {
                repair.push((*id, killed.elapsed()));
                false
            } else {
                true
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("media again after the kill (peer, elapsed): {repair:?}");

    // The tree settles: the victim is gone, and the grandchildren kept their parents.
    let after = loop {
        let snap = snapshot(addr, &room).await;
        let gone = snap["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["id"] != victim);
        if gone || killed.elapsed() > REPAIR_BOUND {
            break snap;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (g, parent) in &grandchildren {
        assert_eq!(
            peer_entry(&after, *g)["parent"],
            *parent,
            "grandchild {g} was moved: {after}"
        );
    }
    for v in &viewers {
        let s = v.status();
        let entry = peer_entry(&after, s.peer_id.unwrap().0);
        assert_eq!(
            entry["depth"],
            s.depth.map_or(Value::Null, Value::from),
            "{after}"
        );
    }
    let stats: Vec<_> = viewers
        .iter()
        .map(|v| {
            (
                v.stats().dropped_queue_full.load(Ordering::Relaxed),
                v.stats().write_errors.load(Ordering::Relaxed),
            )
        })
        .collect();
    eprintln!("(queue-full drops, write errors) per viewer: {stats:?}");

    // The signaller carried signalling only: everything it sent to the peers over their
    // WebSockets is a small fraction of the media the peers moved among themselves. The
    // signalling is mostly a fixed cost per join (SDP and ICE, ~3.6 KB per peer) while this
    // test streams only a few seconds, hence a 10 % bound (measured: ~4 %).
    let signalling: u64 = viewers
        .iter()
        .chain([&broadcaster])
        .map(|v| v.stats().signalling_bytes_received.load(Ordering::Relaxed))
        .sum();
    let media: u64 = viewers
        .iter()
        .map(|v| v.stats().bytes_received.load(Ordering::Relaxed))
        .sum();
    eprintln!(
        "signaller → peers {signalling} B of WebSocket text; media received by viewers {media} B \
         ({:.3} %)",
        signalling as f64 * 100.0 / media.max(1) as f64
    );
    assert!(
        signalling * 10 < media,
        "signalling {signalling} B is not under 10 % of media {media} B"
    );

    for v in viewers {
        v.leave().await;
    }
    broadcaster.leave().await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(LIVENESS, server).await;
    eprintln!("test took {:?}", test_start.elapsed());
}
