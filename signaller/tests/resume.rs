//! A viewer whose signalling socket drops comes back with its resume token and keeps its
//! peer id, its parent and its children: nobody's media connection has to change.

mod common;

use std::time::Duration;

use common::{Client, TestServer, peer_in, wait_for_snapshot};
use serde_json::json;

/// Broadcaster → relay → leaf: a chain, so the relay has both a parent and a child.
async fn chain(addr: std::net::SocketAddr) -> (String, Client, Client, Client) {
    let (room, mut broadcaster, mut relay) = common::live_room(addr).await;
    broadcaster.recv_until("child").await;
    let mut leaf = Client::join(addr, &room, "viewer", None, None).await;
    let parent = leaf.recv_until("parent").await;
    assert_eq!(parent["peer_id"], relay.id());
    relay.recv_until("child").await;
    (room, broadcaster, relay, leaf)
}

fn chain_config() -> treecast_signaller::Config {
    let mut config = common::test_config();
    config.room.root_fanout = 1;
    config.room.relay_fanout = 1;
    config.room.resume_grace = Duration::from_secs(60); // far longer than the test needs
    config
}

async fn resume(
    addr: std::net::SocketAddr,
    room: &str,
    token: &str,
) -> (Client, serde_json::Value) {
    let mut c = Client::connect(addr).await;
    c.send_json(&json!({"type": "hello", "room": room, "role": "viewer", "resume": token}))
        .await;
    let welcome = c.expect_welcome().await;
    (c, welcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_viewer_resumes_its_place() {
    let server = TestServer::start(chain_config()).await;
    let addr = server.addr;
    let (room, mut broadcaster, relay, mut leaf) = chain(addr).await;
    let (relay_id, token) = (relay.id(), relay.resume.clone().unwrap());
    let leaf_mark = leaf.log.len();
    let broadcaster_mark = broadcaster.log.len();

    relay.crash();
    let snap = wait_for_snapshot(addr, &room, |s| {
        peer_in(s, relay_id).is_some_and(|p| p["connected"] == false)
    })
    .await;
    assert_eq!(
        peer_in(&snap, leaf.id()).unwrap()["parent"],
        relay_id,
        "the leaf keeps its parent meanwhile"
    );

    let (mut relay, welcome) = resume(addr, &room, &token).await;
    assert_eq!(welcome["resumed"], true);
    assert_eq!(welcome["peer_id"], relay_id);
    let status = relay.recv_until("room").await;
    assert_eq!(status["parent"], broadcaster.id());
    assert_eq!(status["children"], json!([leaf.id()]));
    assert_eq!(status["depth"], 1);

    let snap = wait_for_snapshot(addr, &room, |s| {
        peer_in(s, relay_id).is_some_and(|p| p["connected"] == true)
    })
    .await;
    assert_eq!(
        peer_in(&snap, relay_id).unwrap()["parent"],
        broadcaster.id()
    );
    assert_eq!(peer_in(&snap, leaf.id()).unwrap()["parent"], relay_id);
    leaf.sync().await;
    broadcaster.sync().await;
    for ty in ["parent", "drop"] {
        assert!(
            leaf.since(leaf_mark, ty).is_empty(),
            "the leaf was not moved: {:?}",
            leaf.log
        );
        assert!(broadcaster.since(broadcaster_mark, ty).is_empty());
    }
    assert!(broadcaster.since(broadcaster_mark, "child").is_empty());

    // Signalling between the resumed relay and its neighbours works both ways.
    relay
        .send_json(&json!({"type": "signal", "to": leaf.id(), "data": {"sdp": "offer"}}))
        .await;
    assert_eq!(leaf.recv_until("signal").await["from"], relay_id);
    leaf.send_json(&json!({"type": "signal", "to": relay_id, "data": {"sdp": "answer"}}))
        .await;
    assert_eq!(relay.recv_until("signal").await["from"], leaf.id());
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_replaces_a_half_open_socket() {
    let server = TestServer::start(chain_config()).await;
    let addr = server.addr;
    let (room, _broadcaster, mut old, mut leaf) = chain(addr).await;
    let token = old.resume.clone().unwrap();
    // The client gave up on a socket the server still thinks is fine.
    let (mut relay, welcome) = resume(addr, &room, &token).await;
    assert_eq!(welcome["resumed"], true);
    assert_eq!(welcome["peer_id"], old.id());
    old.expect_closed().await;
    relay.sync().await;
    leaf.sync().await;
    assert_eq!(leaf.neighbours().0, Some(old.id()));
    let snap = common::snapshot(addr, &room).await;
    assert_eq!(peer_in(&snap, old.id()).unwrap()["connected"], true);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_token_is_single_room_and_role() {
    let server = TestServer::start(chain_config()).await;
    let addr = server.addr;
    let (room, broadcaster, relay, _leaf) = chain(addr).await;
    // A broadcaster's token does not resume a viewer, nor the other way round.
    let mut c = Client::connect(addr).await;
    let hello = json!({"type": "hello", "room": room, "role": "broadcaster",
                       "token": "x", "resume": relay.resume.clone().unwrap()});
    c.send_json(&hello).await;
    c.expect_error("wrong_token").await;
    let mut c = Client::connect(addr).await;
    let hello = json!({"type": "hello", "room": room, "role": "viewer", "resume": broadcaster.resume.clone().unwrap()});
    c.send_json(&hello).await;
    c.expect_error("bad_resume").await;
    c.expect_closed().await;
    server.shutdown().await.unwrap();
}
