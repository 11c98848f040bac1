//! The stream the broadcaster chose: presets offered within `max_stream_kbps`, a room
//! created with one streams at its bitrate (clients hear it in `welcome`), and choices the
//! server does not offer are refused with a code naming the field.

mod common;

use common::{Client, TestServer, http};
use serde_json::Value;

fn welcome_of(c: &Client) -> &Value {
    c.log
        .iter()
        .find(|m| m["type"] == "welcome")
        .expect("welcomed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presets_are_offered_within_the_servers_limit() {
    let mut config = common::test_config();
    config.room.max_stream_kbps = 1_500;
    let server = TestServer::start(config).await;
    let r = http(server.addr, "GET", "/api/qualities", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["max_stream_kbps"], 1_500);
    assert_eq!(v["default_stream_kbps"], 500);
    let offered: Vec<(String, bool, u64)> = v["qualities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["quality"].as_str().unwrap().to_owned(),
                q["allowed"].as_bool().unwrap(),
                q["stream_kbps"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        offered,
        vec![
            ("360p".into(), true, 500),
            ("720p".into(), true, 1_500),
            ("1080p".into(), false, 3_000)
        ]
    );
    assert_eq!(v["qualities"][1]["width"], 1280);
    assert_eq!(v["qualities"][1]["height"], 720);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_streams_at_its_chosen_quality() {
    let server = TestServer::start(common::test_config()).await;
    let addr = server.addr;
    let r = http(addr, "POST", "/api/rooms", Some(r#"{"quality":"720p"}"#)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let created = r.json();
    assert_eq!(created["stream_kbps"], 1_500);
    assert_eq!(created["video"]["width"], 1280);
    let room = created["room"].as_str().unwrap();
    let token = created["token"].as_str().unwrap();

    // Broadcaster: 10,000 × 0.8 / 1500 = 5, capped by root_fanout (4). Viewer: 4000 →
    // 3200 / 1500 = 2 (it would be 4 at the default 500 kbit/s).
    let b = Client::join(addr, room, "broadcaster", Some(token), Some(10_000)).await;
    let mut v = Client::join(addr, room, "viewer", None, Some(4_000)).await;
    v.recv_until("parent").await;
    for (c, capacity) in [(&b, 4), (&v, 2)] {
        let limits = &welcome_of(c)["limits"];
        assert_eq!(limits["stream_kbps"], 1_500, "{limits}");
        assert_eq!(limits["capacity"], capacity, "{limits}");
        assert_eq!(limits["video"]["quality"], "720p", "{limits}");
        assert_eq!(limits["video"]["height"], 720, "{limits}");
        assert_eq!(limits["video"]["fps"], 30, "{limits}");
    }

    // Without a choice: the server's stream_kbps, and no picture told.
    let (plain, token) = common::create_room(addr).await;
    let b = Client::join(addr, &plain, "broadcaster", Some(&token), None).await;
    let limits = &welcome_of(&b)["limits"];
    assert_eq!(limits["stream_kbps"], 500);
    assert!(limits.get("video").is_none(), "{limits}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choices_the_server_does_not_offer_are_refused() {
    let mut config = common::test_config();
    config.room.max_stream_kbps = 1_500;
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let cases = [
        (
            r#"{"quality":"1080p"}"#,
            "quality_not_allowed",
            "1500 kbit/s",
        ),
        (r#"{"quality":"4k"}"#, "invalid_field", "360p, 720p, 1080p"),
        (r#"{"quality":720}"#, "invalid_field", "quality"),
        (r#"{"qualty":"720p"}"#, "invalid_field", "qualty"),
        ("720p", "bad_json", "JSON object"),
        ("{quality: 720p}", "bad_json", "JSON object"),
    ];
    for (body, code, says) in cases {
        let r = http(addr, "POST", "/api/rooms", Some(body)).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let v = r.json();
        assert_eq!(v["code"], code, "{body}: {v}");
        let message = v["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
        if code != "bad_json" {
            assert!(message.contains("quality"), "names the field: {message}");
        }
    }
    // Nothing was created by the refusals.
    let list = http(addr, "GET", "/api/rooms", None).await.json();
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
    server.shutdown().await.unwrap();
}
