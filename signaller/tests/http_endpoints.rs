//! The HTTP side: health, metrics, pages, the room API with its JSON errors, the dashboard
//! event stream, and a graceful shutdown that tells peers the room ended.

mod common;

use std::time::Duration;

use common::{Client, LIVENESS, TestServer, http};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_pages_answer() {
    let server = TestServer::start(common::test_config()).await;
    let addr = server.addr;

    let r = http(addr, "GET", "/healthz", None).await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));

    // Something to count first.
    let (_room, _b, _v) = common::live_room(addr).await;
    let r = http(addr, "GET", "/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.headers.contains("content-type: text/plain"),
        "{}",
        r.headers
    );
    for name in [
        "treecast_rooms",
        "treecast_peers",
        "treecast_joins_total",
        "treecast_connections_total",
        "treecast_peer_depth",
        "treecast_room_max_depth",
    ] {
        assert!(r.body.contains(name), "{name} missing from:\n{}", r.body);
    }

    for (path, title) in [
        ("/", "treecast"),
        ("/watch/x", "Watch"),
        ("/dashboard", "dashboard"),
    ] {
        let r = http(addr, "GET", path, None).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.headers.contains("content-type: text/html"),
            "{path}: {}",
            r.headers
        );
        let t = r
            .body
            .split("<title>")
            .nth(1)
            .and_then(|t| t.split("</title>").next())
            .expect("a title");
        assert!(t.contains(title), "{path}: title {t:?}");
        assert!(r.body.contains("<p"), "{path} says something");
    }
    // Unknown pages and unknown (or unsafe) asset paths get the same JSON 404.
    for path in [
        "/no/such/page",
        "/assets/no-such-file.js",
        "/assets/.hidden",
    ] {
        let r = http(addr, "GET", path, None).await;
        assert_eq!(r.status, 404, "{path}");
        assert!(
            r.headers.contains("content-type: application/json"),
            "{path}: {}",
            r.headers
        );
        assert_eq!(r.json()["code"], "not_found", "{path}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_use_up_the_rooms() {
    let mut config = common::test_config();
    config.limits.room_creation_burst = 3;
    config.limits.room_creations_per_minute = 1;
    let server = TestServer::start(config).await;
    for _ in 0..3 {
        let r = http(server.addr, "POST", "/api/rooms", None).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = http(server.addr, "POST", "/api/rooms", None).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["code"], "rate_limited");
    let metrics = http(server.addr, "GET", "/metrics", None).await.body;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("treecast_errors_total") && l.contains("rate_limited")),
        "HTTP refusals are counted"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_api_creates_lists_and_describes_rooms() {
    let mut config = common::test_config();
    config.limits.max_rooms = 2;
    let server = TestServer::start(config).await;
    let addr = server.addr;

    let r = http(addr, "POST", "/api/rooms", Some("{}")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let created = r.json();
    let room = created["room"].as_str().unwrap().to_owned();
    assert_eq!(room.len(), 10);
    assert!(
        room.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    let token = created["token"].as_str().unwrap();
    assert_eq!(token.len(), 32);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(created["watch_url"], format!("/watch/{room}"));

    let (other, _) = common::create_room(addr).await;
    assert_ne!(other, room);
    let r = http(addr, "POST", "/api/rooms", None).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["code"], "too_many_rooms");
    assert!(r.json()["message"].as_str().unwrap().ends_with('.'));

    let _b = Client::join(addr, &room, "broadcaster", Some(token), None).await;
    let mut v = Client::join(addr, &room, "viewer", None, None).await;
    v.recv_until("parent").await;
    let list = http(addr, "GET", "/api/rooms", None).await.json();
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == room.as_str())
        .expect("listed");
    assert_eq!(entry["live"], true);
    assert_eq!(entry["viewers"], 1);
    assert_eq!(
        entry["max_depth"],
        1,
        "{list} {}",
        common::snapshot(addr, &room).await
    );
    assert_eq!(list.as_array().unwrap().len(), 2);

    let snap = common::snapshot(addr, &room).await;
    assert_eq!(snap["room"], room.as_str());
    assert_eq!(snap["live"], true);
    assert_eq!(snap["peers"].as_array().unwrap().len(), 2);

    for path in [
        "/api/rooms/nope",
        "/api/rooms/a%20b",
        "/api/rooms/nope/events",
    ] {
        let r = http(addr, "GET", path, None).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.json()["code"], "unknown_room", "{path}");
    }
    server.shutdown().await.unwrap();
}

/// Reads server-sent events until one named `name` arrives; returns its data.
async fn next_event(stream: &mut TcpStream, buffer: &mut String, name: &str) -> serde_json::Value {
    let marker = format!("event: {name}\n");
    tokio::time::timeout(LIVENESS, async {
        loop {
            if let Some(at) = buffer.find(&marker) {
                let rest = &buffer[at + marker.len()..];
                if let Some(end) = rest.find("\n\n") {
                    let data: String = rest[..end]
                        .lines()
                        .filter_map(|l| l.strip_prefix("data: "))
                        .collect();
                    let consumed = at + marker.len() + end;
                    buffer.drain(..consumed);
                    return serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"));
                }
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the event stream ended before \"{name}\": {buffer}");
            buffer.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no \"{name}\" event in time"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_get_a_snapshot_then_tree_events() {
    let server = TestServer::start(common::test_config()).await;
    let addr = server.addr;
    let (room, token) = common::create_room(addr).await;
    let b = Client::join(addr, &room, "broadcaster", Some(&token), None).await;

    let mut sse = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /api/rooms/{room}/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    );
    sse.write_all(request.as_bytes()).await.unwrap();
    let mut buffer = String::new();
    let snap = next_event(&mut sse, &mut buffer, "snapshot").await;
    assert!(
        buffer.is_empty() || !buffer.contains("HTTP/1.1 4"),
        "{buffer}"
    );
    assert_eq!(snap["room"], room.as_str());
    assert_eq!(snap["broadcaster"], b.id());

    let v = Client::join(addr, &room, "viewer", None, None).await;
    let joined = next_event(&mut sse, &mut buffer, "joined").await;
    assert_eq!(joined["peer"], v.id());
    let tree = next_event(&mut sse, &mut buffer, "tree").await;
    assert_eq!(tree["kind"], "tree");
    assert_eq!(tree["event"], "linked");
    assert_eq!(tree["parent"], b.id());
    assert_eq!(tree["child"], v.id());
    assert_eq!(tree["depth"], 1);

    // The stream ends when the server shuts down.
    let shutdown = tokio::spawn(server.shutdown());
    let ended = next_event(&mut sse, &mut buffer, "ended").await;
    assert_eq!(ended["reason"], "shutdown");
    shutdown.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_every_peer_the_room_ended() {
    let server = TestServer::start(common::test_config()).await;
    let addr = server.addr;
    let (_room, mut b, mut v) = common::live_room(addr).await;
    let mut idle = Client::connect(addr).await;

    server.shutdown().await.unwrap();
    for c in [&mut b, &mut v] {
        let ended = c.recv_until("ended").await;
        assert_eq!(ended["reason"], "shutdown");
        c.expect_closed().await;
    }
    idle.expect_error("shutting_down").await;
    idle.expect_closed().await;
    // Nothing listens any more.
    let gone = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await;
    assert!(!matches!(gone, Ok(Ok(_))), "the listener is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_room_tells_late_visitors() {
    let server = TestServer::start(common::test_config()).await;
    let addr = server.addr;
    let (room, mut b, mut v) = common::live_room(addr).await;
    b.send_json(&json!({"type": "leave"})).await;
    assert_eq!(v.recv_until("ended").await["reason"], "broadcaster_left");
    v.expect_closed().await;

    let mut late = Client::connect(addr).await;
    late.send_json(&json!({"type": "hello", "room": room, "role": "viewer"}))
        .await;
    assert_eq!(late.recv_until("ended").await["reason"], "broadcaster_left");
    late.expect_error("room_ended").await;
    late.expect_closed().await;
    let snap = common::snapshot(addr, &room).await;
    assert_eq!(snap["ended"], "broadcaster_left");
    let list = http(addr, "GET", "/api/rooms", None).await.json();
    assert_eq!(list[0]["ended"], true);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_can_come_from_a_web_directory() {
    let dir = std::env::temp_dir().join(format!("treecast-web-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("index.html"),
        "<title>from disk</title><p>edited</p>",
    )
    .unwrap();
    let mut config = common::test_config();
    config.web_dir = Some(dir.clone());
    let server = TestServer::start(config).await;
    let r = http(server.addr, "GET", "/", None).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("from disk"), "{}", r.body);
    let r = http(server.addr, "GET", "/dashboard", None).await;
    assert_eq!(
        r.status, 404,
        "a page missing from the directory is not found"
    );
    server.shutdown().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
