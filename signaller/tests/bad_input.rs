//! Every kind of bad input gets its `error` code, and the socket is closed only where the
//! protocol says so, while well-behaved peers in the same room are still served.

mod common;

use std::time::Duration;

use common::{Client, TestServer};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Sends `frame` (text) on an unjoined connection and expects `code`, socket kept open
/// (checked by a `ping`, which is answered `not_joined`).
async fn refused_unjoined_kept(c: &mut Client, frame: &str, code: &str) {
    c.send_text(frame).await;
    c.expect_error(code).await;
    c.send_json(&json!({"type": "ping"})).await;
    c.expect_error("not_joined").await;
}

/// Connects, sends `hello`, expects `code`, then the close.
async fn refused_hello_closed(addr: std::net::SocketAddr, hello: Value, code: &str) {
    let mut c = Client::connect(addr).await;
    c.send_json(&hello).await;
    c.expect_error(code).await;
    c.expect_closed().await;
}

/// Sends `msg` on a joined connection and expects `code`, socket kept open (checked by a
/// `ping` answered with `pong`).
async fn refused_joined_kept(c: &mut Client, msg: Value, code: &str) {
    c.send_json(&msg).await;
    c.expect_error(code).await;
    c.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_and_good_peers_are_still_served() {
    let mut config = common::test_config();
    config.room.root_fanout = 16;
    config.room.resume_grace = Duration::ZERO;
    config.room.max_message_bytes = 1_000;
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let (room, token) = common::create_room(addr).await;
    let mut broadcaster = Client::join(addr, &room, "broadcaster", Some(&token), None).await;
    let mut viewer = Client::join(addr, &room, "viewer", None, None).await;
    viewer.recv_until("parent").await;
    broadcaster.recv_until("child").await;

    // Malformed frames before joining: answered, socket kept.
    let mut c = Client::connect(addr).await;
    refused_unjoined_kept(&mut c, "{nope", "bad_json").await;
    refused_unjoined_kept(&mut c, "[1, 2]", "bad_message").await;
    refused_unjoined_kept(&mut c, r#"{"room": "x"}"#, "bad_message").await;
    refused_unjoined_kept(&mut c, r#"{"type": "launch"}"#, "unknown_type").await;
    let hello_without_role = json!({"type": "hello", "room": room}).to_string();
    refused_unjoined_kept(&mut c, &hello_without_role, "invalid_field").await;
    let wrong_type =
        json!({"type": "hello", "room": room, "role": "viewer", "uplink_kbps": "fast"}).to_string();
    refused_unjoined_kept(&mut c, &wrong_type, "invalid_field").await;
    // uplink_kbps is a u32, as docs/protocol.md says.
    let too_fast =
        json!({"type": "hello", "room": room, "role": "viewer", "uplink_kbps": 1u64 << 32})
            .to_string();
    refused_unjoined_kept(&mut c, &too_fast, "invalid_field").await;
    let unknown_field =
        json!({"type": "hello", "room": room, "role": "viewer", "colour": "red"}).to_string();
    refused_unjoined_kept(&mut c, &unknown_field, "invalid_field").await;
    refused_unjoined_kept(
        &mut c,
        r#"{"type": "hello", "room": "a b", "role": "viewer"}"#,
        "invalid_field",
    )
    .await;
    let oversized = json!({"type": "ping", "pad": "x".repeat(2_000)}).to_string();
    refused_unjoined_kept(&mut c, &oversized, "too_large").await;
    c.send_binary(vec![1, 2, 3]).await;
    c.expect_error("binary_frame").await;
    refused_unjoined_kept(&mut c, r#"{"type": "leave"}"#, "not_joined").await;
    // After all that, the same connection can still join.
    c.send_json(&json!({"type": "hello", "room": room, "role": "viewer"}))
        .await;
    c.expect_welcome().await;
    drop(c);

    // Hellos that cannot succeed: answered, then closed.
    let v2 = json!({"type": "hello", "v": 2, "room": room, "role": "viewer"});
    refused_hello_closed(addr, v2, "unsupported_version").await;
    refused_hello_closed(
        addr,
        json!({"type": "hello", "room": "no-such-room", "role": "viewer"}),
        "unknown_room",
    )
    .await;
    let wrong_token =
        json!({"type": "hello", "room": room, "role": "broadcaster", "token": "0".repeat(32)});
    refused_hello_closed(addr, wrong_token, "wrong_token").await;
    refused_hello_closed(
        addr,
        json!({"type": "hello", "room": room, "role": "broadcaster"}),
        "wrong_token",
    )
    .await;
    let second = json!({"type": "hello", "room": room, "role": "broadcaster", "token": token});
    refused_hello_closed(addr, second, "broadcaster_exists").await;
    let resume =
        json!({"type": "hello", "room": room, "role": "viewer", "resume": "feedfacefeedface"});
    refused_hello_closed(addr, resume, "bad_resume").await;

    // A frame above the hard cap closes the socket without buffering it.
    let mut c = Client::connect(addr).await;
    c.send_text_lossy("x".repeat(200 * 1024)).await;
    assert_eq!(c.expect_closed().await, Some(CloseCode::Size));

    // Mistakes after joining: answered, socket kept.
    let mut w = Client::join(addr, &room, "viewer", None, None).await;
    w.recv_until("parent").await;
    refused_joined_kept(
        &mut w,
        json!({"type": "hello", "room": room, "role": "viewer"}),
        "already_joined",
    )
    .await;
    let to_sibling = json!({"type": "signal", "to": viewer.id(), "data": {"sdp": "v=0"}});
    refused_joined_kept(&mut w, to_sibling, "not_neighbour").await;
    let to_nobody = json!({"type": "signal", "to": 999_999, "data": {}});
    refused_joined_kept(&mut w, to_nobody, "unknown_peer").await;
    let deep = format!(
        r#"{{"type":"signal","to":{},"data":{}1{}}}"#,
        viewer.id(),
        "[".repeat(200),
        "]".repeat(200)
    );
    w.send_text(&deep).await;
    w.expect_error("bad_json").await;
    w.sync().await;
    let bad_loss = json!({"type": "report", "state": "receiving", "loss": 1.5});
    refused_joined_kept(&mut w, bad_loss, "invalid_field").await;
    refused_joined_kept(
        &mut w,
        json!({"type": "report", "state": "dancing"}),
        "invalid_field",
    )
    .await;

    // The well-behaved peers are still served.
    broadcaster.sync().await;
    viewer.sync().await;
    viewer
        .send_json(&json!({"type": "signal", "to": broadcaster.id(), "data": {"candidate": "c"}}))
        .await;
    let s = broadcaster.recv_until("signal").await;
    assert_eq!(s["from"], viewer.id());
    assert_eq!(s["data"]["candidate"], "c");
    let newcomer = Client::join(addr, &room, "viewer", None, None).await;
    let child = broadcaster.recv_until("child").await;
    assert_eq!(child["peer_id"], newcomer.id());
    drop(newcomer);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_floods_are_limited_then_cut_off() {
    let mut config = common::test_config();
    config.room.messages_per_second = 20;
    config.limits.message_burst = 10;
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let (room, mut broadcaster, mut viewer) = common::live_room(addr).await;

    // Over the rate: one warning, the excess dropped, the socket kept.
    let mut f = Client::join(addr, &room, "viewer", None, None).await;
    f.blast(r#"{"type":"ping"}"#, 40).await;
    f.expect_error("rate_limited").await;
    let warnings = |c: &Client| c.log.iter().filter(|m| m["code"] == "rate_limited").count();
    // Wait for the bucket to refill (20/s, burst 10), then it is served again.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    f.sync().await;
    assert_eq!(warnings(&f), 1, "one warning per episode: {:?}", f.log);
    let pongs = f.log.iter().filter(|m| m["type"] == "pong").count();
    assert!(pongs < 40, "the excess was dropped ({pongs} pongs)");
    // A flood far above the rate: closed with a policy violation.
    f.blast(r#"{"type":"ping"}"#, 3_000).await;
    assert_eq!(f.expect_closed().await, Some(CloseCode::Policy));
    assert!(
        warnings(&f) >= 2,
        "{:?}",
        &f.log[f.log.len().saturating_sub(3)..]
    );

    // The others in the room are unaffected.
    broadcaster.sync().await;
    viewer.sync().await;
    viewer
        .send_json(&json!({"type": "signal", "to": broadcaster.id(), "data": {}}))
        .await;
    assert_eq!(broadcaster.recv_until("signal").await["from"], viewer.id());
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_connections_from_one_address_are_refused() {
    let mut config = common::test_config();
    config.limits.max_connections_per_ip = 3;
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let (room, _) = common::create_room(addr).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(Client::join(addr, &room, "viewer", None, None).await);
    }
    let mut extra = Client::connect(addr).await;
    extra.expect_error("too_many_connections").await;
    assert_eq!(extra.expect_closed().await, Some(CloseCode::Policy));
    // The others are unaffected.
    for c in &mut open {
        c.sync().await;
    }
    // A freed slot can be taken again (the server notices the close shortly).
    open.pop().unwrap().crash();
    let deadline = tokio::time::Instant::now() + common::LIVENESS;
    loop {
        let mut c = Client::connect(addr).await;
        c.send_json(&json!({"type": "hello", "room": room, "role": "viewer"}))
            .await;
        match c.recv().await {
            Some(m) if m["type"] == "welcome" => break,
            Some(m) => assert_eq!(m["code"], "too_many_connections", "{m}"),
            None => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "the slot is freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_hello_times_out() {
    let mut config = common::test_config();
    config.limits.hello_timeout = Duration::from_millis(300);
    let server = TestServer::start(config).await;
    let mut c = Client::connect(server.addr).await;
    c.expect_error("timeout").await;
    assert_eq!(c.expect_closed().await, Some(CloseCode::Policy));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_and_the_room_goes_on() {
    let mut config = common::test_config();
    config.room.resume_grace = Duration::ZERO;
    config.room.messages_per_second = 100_000;
    config.limits.message_burst = 100_000;
    config.limits.outbound_queue = 16;
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let (room, mut broadcaster, mut reader) = common::live_room(addr).await;
    // This viewer stops reading after its welcome.
    let sleeper = Client::join(addr, &room, "viewer", None, None).await;
    let sleeper_id = sleeper.id();
    broadcaster.recv_until("child").await;
    broadcaster.recv_until("child").await;

    // The broadcaster signals it far more than socket buffers hold (~15 KB a message).
    let blob = "x".repeat(15_000);
    let signal = json!({"type": "signal", "to": sleeper_id, "data": {"sdp": blob}}).to_string();
    let mut dropped = false;
    // Batches stay below the outbound queue (16): once the sleeper is gone, the rest of a
    // batch is answered with `unknown_peer`, and the broadcaster must not overflow itself.
    for _ in 0..2_000 {
        broadcaster.blast(&signal, 8).await;
        // Has the server given up on the sleeper? (`drop` names the peer that left.)
        broadcaster.sync().await;
        if broadcaster
            .log
            .iter()
            .any(|m| m["type"] == "drop" && m["peer_id"] == sleeper_id)
        {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "the slow consumer was cut off");
    // Everyone else is served as before.
    reader.sync().await;
    reader
        .send_json(&json!({"type": "signal", "to": broadcaster.id(), "data": {}}))
        .await;
    assert_eq!(broadcaster.recv_until("signal").await["from"], reader.id());
    drop(sleeper);
    server.shutdown().await.unwrap();
}
