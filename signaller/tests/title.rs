//! The broadcast's title: given at creation, told to every client in `welcome` and in the
//! room's snapshot; a title that cannot be shown as given is refused, naming the field.

mod common;

use common::{Client, TestServer, http};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_title_reaches_every_viewer_and_a_bad_one_is_refused() {
    let server = TestServer::start(common::test_config()).await;
    let addr = server.addr;
    let r = http(
        addr,
        "POST",
        "/api/rooms",
        Some(r#"{"title":"  Friday quiz, round 2 🎉  "}"#),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let created = r.json();
    assert_eq!(
        created["title"], "Friday quiz, round 2 🎉",
        "trimmed: {created}"
    );
    let room = created["room"].as_str().unwrap();
    let token = created["token"].as_str().unwrap();
    let _b = Client::join(addr, room, "broadcaster", Some(token), None).await;
    let v = Client::join(addr, room, "viewer", None, None).await;
    let welcome = v.log.iter().find(|m| m["type"] == "welcome").unwrap();
    assert_eq!(welcome["title"], "Friday quiz, round 2 🎉", "{welcome}");
    assert_eq!(
        common::snapshot(addr, room).await["title"],
        "Friday quiz, round 2 🎉"
    );

    // No title, or a blank one: none is told.
    for body in [None, Some(r#"{"title":"   "}"#)] {
        let r = http(addr, "POST", "/api/rooms", body).await;
        assert_eq!(r.status, 201, "{}", r.body);
        assert!(r.json().get("title").is_none(), "{}", r.body);
    }

    let long = format!(r#"{{"title":"{}"}}"#, "a".repeat(101));
    for (body, says) in [
        (long.as_str(), "longer than 100"),
        (r#"{"title":"two\nlines"}"#, "control characters"),
        (r#"{"title":42}"#, "title"),
    ] {
        let r = http(addr, "POST", "/api/rooms", Some(body)).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let v = r.json();
        assert_eq!(v["code"], "invalid_field", "{v}");
        let message = v["message"].as_str().unwrap();
        assert!(
            message.contains(says) && message.contains("title"),
            "{message}"
        );
    }
    server.shutdown().await.unwrap();
}
