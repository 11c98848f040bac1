//! Private rooms over real sockets: a viewer needs a link signed with the room's own key.
//! No link, a forged one or another room's is refused exactly like a room that does not
//! exist; an expired or used-up link gets its own code; a resume costs no use; the
//! broadcaster token always gets in; public rooms are unchanged. Also the links endpoint's
//! credentials and bounds, and what the HTTP API shows of a private room.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Client, TestServer, call};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use treecast_core::turn::Secret;
use treecast_signaller::Config;
use treecast_signaller::access;

const SECRET: &str = "operator-secret-for-private-room-tests";

/// Creates a private room: (room id, broadcaster token).
async fn private_room(addr: SocketAddr, bearer: Option<&str>) -> (String, String) {
    let (status, body) = call(
        addr,
        "POST",
        "/api/rooms",
        Some(r#"{"private": true}"#),
        bearer,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["private"], true, "{body}");
    (
        body["room"].as_str().unwrap().to_owned(),
        body["token"].as_str().unwrap().to_owned(),
    )
}

/// A signed link for `room`, asked with `bearer`: the whole answer.
async fn new_link(addr: SocketAddr, room: &str, bearer: &str, body: Value) -> Value {
    let (status, answer) = call(
        addr,
        "POST",
        &format!("/api/rooms/{room}/links"),
        Some(&body.to_string()),
        Some(bearer),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    answer
}

/// Sends a viewer `hello` with these extra fields; returns the client and its first
/// answer (`welcome` or `error`).
async fn hello(addr: SocketAddr, room: &str, extra: Value) -> (Client, Value) {
    let mut c = Client::connect(addr).await;
    let mut msg = json!({"type": "hello", "room": room, "role": "viewer"});
    for (k, v) in extra.as_object().unwrap() {
        msg[k] = v.clone();
    }
    c.send_json(&msg).await;
    let first = loop {
        let m = c.recv().await.expect("an answer to hello");
        if m["type"] == "welcome" || m["type"] == "error" {
            break m;
        }
    };
    if first["type"] == "welcome" {
        c.peer_id = first["peer_id"].as_u64();
        c.resume = first["resume"].as_str().map(str::to_owned);
    }
    (c, first)
}

/// A `hello` that must be refused with `code` and a normal close; returns the `error`.
async fn refused(addr: SocketAddr, room: &str, extra: Value, code: &str) -> Value {
    let (mut c, answer) = hello(addr, room, extra.clone()).await;
    assert_eq!(answer["type"], "error", "{extra}: {answer}");
    assert_eq!(answer["code"], code, "{extra}: {answer}");
    assert_eq!(c.expect_closed().await, Some(CloseCode::Normal), "{extra}");
    answer
}

/// A `hello` that must be welcomed as a new peer.
async fn welcomed(addr: SocketAddr, room: &str, extra: Value) -> Client {
    let (c, answer) = hello(addr, room, extra.clone()).await;
    assert_eq!(answer["type"], "welcome", "{extra}: {answer}");
    c
}

fn guarded_config() -> Config {
    let mut config = common::test_config();
    config.access.admin_secret = Some(Secret::new(SECRET));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_link_a_private_room_looks_like_no_room() {
    let server = TestServer::start(common::test_config()).await;
    let addr = server.addr;
    let (room, token) = private_room(addr, None).await;
    let (other, other_token) = private_room(addr, None).await;
    let mut broadcaster = Client::join(addr, &room, "broadcaster", Some(&token), None).await;
    let link = new_link(addr, &room, &token, json!({})).await;
    let good = link["token"].as_str().unwrap().to_owned();
    let elsewhere = new_link(addr, &other, &other_token, json!({})).await["token"]
        .as_str()
        .unwrap()
        .to_owned();

    // What a room that does not exist answers: the refusals below must be the same.
    let nothing = refused(addr, "no-such-room", json!({}), "unknown_room").await;
    let mut tampered = good.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let resumed_broadcaster = broadcaster.resume.clone().unwrap();
    for extra in [
        json!({}),
        json!({"link": "not-a-token"}),
        json!({"link": tampered}),
        json!({"link": elsewhere}),
        json!({"link": ""}),
        json!({"resume": "0123456789abcdef0123456789abcdef"}),
        json!({"token": "not-the-broadcaster-token"}),
        json!({"role": "broadcaster", "token": "not-the-broadcaster-token"}),
        json!({"role": "broadcaster", "token": other_token}),
    ] {
        let answer = refused(addr, &room, extra.clone(), "unknown_room").await;
        assert_eq!(answer, nothing, "{extra}");
    }
    // A resume token of the room works only for a peer of that role: the broadcaster's
    // is no viewer's key to the door (the room itself refuses the role mix-up).
    refused(
        addr,
        &room,
        json!({"resume": resumed_broadcaster}),
        "bad_resume",
    )
    .await;

    // The genuine link lets a viewer in, and it is placed under the broadcaster.
    let mut viewer = welcomed(addr, &room, json!({"link": good})).await;
    let parent = viewer.recv_until("parent").await;
    assert_eq!(parent["peer_id"], broadcaster.id());
    broadcaster.recv_until("child").await;

    // Without an operator secret the HTTP API is open, but not about private rooms.
    let (status, list) = call(addr, "GET", "/api/rooms", None, None).await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert!(!ids.contains(&room.as_str()), "{list}");
    for bearer in [None, Some("wrong"), Some(other_token.as_str())] {
        let (status, body) = call(addr, "GET", &format!("/api/rooms/{room}"), None, bearer).await;
        assert_eq!((status, body["code"].as_str()), (404, Some("unknown_room")));
        let (_, none) = call(addr, "GET", "/api/rooms/no-such-room", None, bearer).await;
        assert_eq!(
            body["message"].as_str().unwrap().replace(&room, "X"),
            none["message"]
                .as_str()
                .unwrap()
                .replace("no-such-room", "X"),
        );
        let (status, _) = call(
            addr,
            "GET",
            &format!("/api/rooms/{room}/events"),
            None,
            bearer,
        )
        .await;
        assert_eq!(status, 404);
    }
    // Its broadcaster token still opens its snapshot (the broadcast page draws its tree).
    let (status, snap) = call(
        addr,
        "GET",
        &format!("/api/rooms/{room}"),
        None,
        Some(&token),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(snap["viewers"], 1);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_expire_and_run_out_but_a_resume_costs_nothing() {
    let mut config = common::test_config();
    config.room.resume_grace = Duration::from_secs(60);
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let (room, token) = private_room(addr, None).await;
    let _broadcaster = Client::join(addr, &room, "broadcaster", Some(&token), None).await;

    // A link for one second: genuine, then expired.
    let short = new_link(addr, &room, &token, json!({"expires_in_s": 1})).await;
    let expires_at = short["expires_at"].as_u64().unwrap();
    // Minted a moment ago (however slow the machine) for one second.
    let now = access::now_unix();
    assert!(
        expires_at <= now + 1 && expires_at + 60 >= now,
        "{expires_at} vs {now}"
    );
    while access::now_unix() < expires_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = refused(addr, &room, json!({"link": short["token"]}), "link_expired").await;
    assert!(
        answer["message"].as_str().unwrap().contains("expired"),
        "{answer}"
    );

    // Two uses: a resume in between costs none.
    let twice = new_link(addr, &room, &token, json!({"max_uses": 2})).await;
    assert_eq!(twice["max_uses"], 2);
    let link = twice["token"].clone();
    let first = welcomed(addr, &room, json!({"link": link})).await;
    let (first_id, first_resume) = (first.id(), first.resume.clone().unwrap());
    first.crash();
    // The resume carries the link too, as the page's does; and once without it.
    let (again, answer) = hello(
        addr,
        &room,
        json!({"link": link, "resume": first_resume.clone()}),
    )
    .await;
    assert_eq!(answer["type"], "welcome", "{answer}");
    assert_eq!(answer["resumed"], true);
    assert_eq!(answer["peer_id"], first_id);
    again.crash();
    let (_again, answer) = hello(addr, &room, json!({"resume": first_resume})).await;
    assert_eq!(
        (answer["type"].as_str(), answer["resumed"].as_bool()),
        (Some("welcome"), Some(true)),
        "{answer}"
    );
    let _second = welcomed(addr, &room, json!({"link": link})).await;
    refused(addr, &room, json!({"link": link}), "link_used_up").await;
    // Another link of the same room has its own count.
    let other = new_link(addr, &room, &token, json!({"max_uses": 1})).await;
    let _third = welcomed(addr, &room, json!({"link": other["token"]})).await;
    refused(addr, &room, json!({"link": other["token"]}), "link_used_up").await;

    // The broadcaster token always gets in: a reload takes the room back without any link.
    let mut back = Client::connect(addr).await;
    back.send_json(&json!({"type": "hello", "room": room, "role": "broadcaster", "token": token}))
        .await;
    let answer = back.recv().await.unwrap();
    assert!(
        answer["type"] == "welcome" || answer["code"] == "broadcaster_exists",
        "the door let the token holder through to the room: {answer}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_rooms_need_no_link_and_ignore_one() {
    let server = TestServer::start(common::test_config()).await;
    let addr = server.addr;
    let (status, created) = call(addr, "POST", "/api/rooms", None, None).await;
    assert_eq!(status, 201);
    assert_eq!(created["private"], false);
    let room = created["room"].as_str().unwrap().to_owned();
    let token = created["token"].as_str().unwrap().to_owned();
    let _b = Client::join(addr, &room, "broadcaster", Some(&token), None).await;
    let mut plain = welcomed(addr, &room, json!({})).await;
    plain.recv_until("parent").await;
    let mut odd = welcomed(addr, &room, json!({"link": "whatever"})).await;
    odd.recv_until("parent").await;
    // Public rooms have no links to sign.
    let (status, body) = call(
        addr,
        "POST",
        &format!("/api/rooms/{room}/links"),
        None,
        Some(&token),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (409, Some("not_private")));
    let (_, list) = call(addr, "GET", "/api/rooms", None, None).await;
    assert_eq!(list[0]["private"], false, "{list}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_links_endpoint_checks_credentials_and_bounds() {
    let server = TestServer::start(guarded_config()).await;
    let addr = server.addr;
    let (room, token) = private_room(addr, None).await;
    let (_other, other_token) = private_room(addr, None).await;
    let path = format!("/api/rooms/{room}/links");

    for bearer in [None, Some("wrong"), Some(other_token.as_str())] {
        let (status, body) = call(addr, "POST", &path, None, bearer).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("unauthorized")),
            "{bearer:?}"
        );
    }
    // Unknown rooms answer the same to anyone but the operator.
    let (status, _) = call(
        addr,
        "POST",
        "/api/rooms/no-such-room/links",
        None,
        Some(&token),
    )
    .await;
    assert_eq!(status, 401);
    let (status, body) = call(
        addr,
        "POST",
        "/api/rooms/no-such-room/links",
        None,
        Some(SECRET),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("unknown_room")));

    // The broadcaster token and the operator secret both mint; the default lifetime is
    // the server's longest (a day).
    let now = access::now_unix();
    let by_owner = new_link(addr, &room, &token, json!({})).await;
    let expires = by_owner["expires_at"].as_u64().unwrap();
    assert!(
        (now + 86_400..=now + 86_460).contains(&expires),
        "{by_owner}"
    );
    assert!(by_owner.get("max_uses").is_none(), "{by_owner}");
    let t = by_owner["token"].as_str().unwrap();
    assert_eq!(t.split('.').count(), 3, "a JWT: {t}");
    assert_eq!(by_owner["watch_url"], format!("/watch/{room}#t={t}"));
    assert_eq!(
        by_owner["link"],
        format!("http://{addr}/watch/{room}#t={t}")
    );
    let by_operator = new_link(
        addr,
        &room,
        SECRET,
        json!({"expires_in_s": 600, "max_uses": 30}),
    )
    .await;
    assert_ne!(by_operator["token"], by_owner["token"]);
    assert_eq!(by_operator["max_uses"], 30);

    // Bad bodies name the field.
    for (body, field) in [
        (r#"{"expires_in_s": 0}"#, "expires_in_s"),
        (r#"{"expires_in_s": 86401}"#, "expires_in_s"),
        (r#"{"expires_in_s": -5}"#, "expires_in_s"),
        (r#"{"expires_in_s": "1h"}"#, "expires_in_s"),
        (r#"{"max_uses": 0}"#, "max_uses"),
        (r#"{"max_uses": 1000001}"#, "max_uses"),
        (r#"{"max_uses": 2.5}"#, "max_uses"),
        (r#"{"uses": 3}"#, "uses"),
    ] {
        let (status, answer) = call(addr, "POST", &path, Some(body), Some(&token)).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (400, Some("invalid_field")),
            "{body}: {answer}"
        );
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(field), "{body}: {message}");
    }
    let (status, answer) = call(addr, "POST", &path, Some("[1]"), Some(&token)).await;
    assert_eq!((status, answer["code"].as_str()), (400, Some("bad_json")));
    // `private` at creation is a boolean, named when it is not.
    let (status, answer) = call(
        addr,
        "POST",
        "/api/rooms",
        Some(r#"{"private": "yes"}"#),
        None,
    )
    .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (400, Some("invalid_field"))
    );
    assert!(
        answer["message"].as_str().unwrap().contains("private"),
        "{answer}"
    );

    // With an operator secret the operator sees private rooms, marked so.
    let (status, list) = call(addr, "GET", "/api/rooms", None, Some(SECRET)).await;
    assert_eq!(status, 200);
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == room.as_str())
        .expect("listed for the operator");
    assert_eq!(listed["private"], true);
    let (status, _) = call(
        addr,
        "GET",
        &format!("/api/rooms/{room}"),
        None,
        Some(SECRET),
    )
    .await;
    assert_eq!(status, 200);

    // A link from the operator opens the room like the broadcaster's.
    let _viewer = welcomed(addr, &room, json!({"link": by_operator["token"]})).await;
    server.shutdown().await.unwrap();
}
