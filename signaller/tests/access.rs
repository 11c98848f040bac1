//! Access over real HTTP: the open loopback default, operator-only endpoints, the
//! broadcaster token's reach, room-creation grants, and the secret a public server
//! generates for itself.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Client, LIVENESS, TestServer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use treecast_core::turn::Secret;
use treecast_signaller::access::{self, GrantClaims};
use treecast_signaller::{Config, CreateMode};

const SECRET: &str = "operator-secret-for-tests-0123456789";

fn guarded_config() -> Config {
    let mut config = common::test_config();
    config.access.admin_secret = Some(Secret::new(SECRET));
    config
}

/// One request with an optional bearer.
async fn call(addr: SocketAddr, method: &str, path: &str, bearer: Option<&str>) -> (u16, Value) {
    let r = treecast_signaller::client::request_with_auth(
        &addr.to_string(),
        method,
        path,
        None,
        bearer,
        LIVENESS,
    )
    .await
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    if r.status == 401 {
        assert_eq!(r.header("www-authenticate"), "Bearer", "{path}");
    }
    let body = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    (r.status, body)
}

/// The status line and first event (or error body) of an event stream request.
async fn events_head(addr: SocketAddr, room: &str, bearer: Option<&str>) -> String {
    let mut sse = TcpStream::connect(addr).await.unwrap();
    let auth = bearer
        .map(|b| format!("Authorization: Bearer {b}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET /api/rooms/{room}/events HTTP/1.1\r\nHost: {addr}\r\n{auth}Accept: text/event-stream\r\n\r\n"
    );
    sse.write_all(request.as_bytes()).await.unwrap();
    let mut buffer = String::new();
    tokio::time::timeout(LIVENESS, async {
        while !(buffer.contains("event: snapshot") || buffer.contains("\"code\"")) {
            let mut chunk = [0u8; 4096];
            let n = sse.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the stream closed early: {buffer}");
            buffer.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    })
    .await
    .expect("an answer in time");
    buffer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_without_a_secret_stays_open() {
    let server = TestServer::start(common::test_config()).await;
    let addr = server.addr;
    let (status, info) = call(addr, "GET", "/api/access", None).await;
    assert_eq!(status, 200);
    assert_eq!(info["create"], "open");
    assert_eq!(info["operator_required"], false);
    let (room, _token) = common::create_room(addr).await;
    assert_eq!(call(addr, "GET", "/api/rooms", None).await.0, 200);
    assert_eq!(
        call(addr, "GET", &format!("/api/rooms/{room}"), None)
            .await
            .0,
        200
    );
    assert!(
        events_head(addr, &room, None)
            .await
            .contains("event: snapshot")
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_data_needs_the_operator_secret_or_the_rooms_own_token() {
    let server = TestServer::start(guarded_config()).await;
    let addr = server.addr;
    let (_, info) = call(addr, "GET", "/api/access", None).await;
    assert_eq!(info["operator_required"], true);
    assert_eq!(info["create"], "open");

    // Creation stays open; the rest is closed.
    let (room, token) = common::create_room(addr).await;
    let (other_room, other_token) = common::create_room(addr).await;
    let snapshot = format!("/api/rooms/{room}");
    for bearer in [None, Some("wrong"), Some(&other_token[..])] {
        let (status, body) = call(addr, "GET", "/api/rooms", bearer).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("unauthorized")),
            "{bearer:?}"
        );
        let (status, body) = call(addr, "GET", &snapshot, bearer).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("unauthorized")),
            "{bearer:?}"
        );
        let head = events_head(addr, &room, bearer).await;
        assert!(head.starts_with("HTTP/1.1 401"), "{head}");
        assert!(head.contains("\"unauthorized\""), "{head}");
    }
    // An unknown room answers like a known one to anyone without the secret.
    let (status, _) = call(addr, "GET", "/api/rooms/no-such-room", Some(&token)).await;
    assert_eq!(status, 401);

    // The operator sees everything.
    let (status, list) = call(addr, "GET", "/api/rooms", Some(SECRET)).await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(call(addr, "GET", &snapshot, Some(SECRET)).await.0, 200);
    let (status, body) = call(addr, "GET", "/api/rooms/no-such-room", Some(SECRET)).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("unknown_room")));
    assert!(
        events_head(addr, &room, Some(SECRET))
            .await
            .contains("event: snapshot")
    );

    // A broadcaster token opens its own room, and only that one.
    let b = Client::join(addr, &room, "broadcaster", Some(&token), None).await;
    let (status, snap) = call(addr, "GET", &snapshot, Some(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(snap["broadcaster"], b.id());
    assert!(
        events_head(addr, &room, Some(&token))
            .await
            .contains("event: snapshot")
    );
    let (status, _) = call(
        addr,
        "GET",
        &format!("/api/rooms/{other_room}"),
        Some(&token),
    )
    .await;
    assert_eq!(status, 401);
    assert!(
        events_head(addr, &other_room, Some(&token))
            .await
            .starts_with("HTTP/1.1 401")
    );
    // Viewers still join without any credentials.
    let mut v = Client::join(addr, &room, "viewer", None, None).await;
    v.recv_until("parent").await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mode_creation_needs_a_valid_grant() {
    let mut config = guarded_config();
    config.access.create = CreateMode::Token;
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let (_, info) = call(addr, "GET", "/api/access", None).await;
    assert_eq!(info["create"], "token");

    let now = access::now_unix();
    let hour = 3_600;
    let secret = SECRET.as_bytes();
    let valid = access::mint_grant(secret, "alice", now - 5, now + hour).unwrap();
    let expired = access::mint_grant(secret, "alice", now - 2 * hour, now - hour).unwrap();
    let early = access::mint_grant(secret, "alice", now + hour, now + 2 * hour).unwrap();
    let forged = access::mint_grant(b"not the operator key", "alice", now - 5, now + hour).unwrap();
    let wrong_scope = access::mint_claims(
        secret,
        &GrantClaims {
            sub: "alice".into(),
            scope: "rooms:list".into(),
            iat: now,
            nbf: now - 5,
            exp: now + hour,
        },
    )
    .unwrap();
    // A grant is not an operator secret.
    let (status, _) = call(addr, "GET", "/api/rooms", Some(&valid)).await;
    assert_eq!(status, 401);

    for (bearer, status, code, words) in [
        (None, 401, "unauthorized", "grant"),
        (Some(&expired[..]), 401, "unauthorized", "expired"),
        (Some(&early[..]), 401, "unauthorized", "not valid yet"),
        (Some(&forged[..]), 401, "unauthorized", "not issued"),
        (Some("not.a.jwt"), 401, "unauthorized", "not a valid"),
        (Some(&wrong_scope[..]), 403, "forbidden", "does not allow"),
    ] {
        let (got, body) = call(addr, "POST", "/api/rooms", bearer).await;
        assert_eq!(
            (got, body["code"].as_str()),
            (status, Some(code)),
            "{bearer:?}: {body}"
        );
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(words), "{message}");
    }
    let (status, created) = call(addr, "POST", "/api/rooms", Some(&valid)).await;
    assert_eq!(status, 201, "{created}");
    // The operator secret creates too.
    assert_eq!(call(addr, "POST", "/api/rooms", Some(SECRET)).await.0, 201);
    let (_, list) = call(addr, "GET", "/api/rooms", Some(SECRET)).await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    server.shutdown().await.unwrap();
}

/// What a child process printed so far, collected by a thread.
type Log = std::sync::Arc<std::sync::Mutex<String>>;

fn collect(out: impl std::io::Read + Send + 'static) -> Log {
    let log = Log::default();
    let sink = std::sync::Arc::clone(&log);
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let mut text = sink.lock().unwrap();
            text.push_str(&line);
            text.push('\n');
        }
    });
    log
}

async fn wait_for(log: &Log, what: &str) -> String {
    let deadline = tokio::time::Instant::now() + LIVENESS;
    loop {
        let text = log.lock().unwrap().clone();
        if text.contains(what) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {what:?} in: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_server_generates_its_secret_into_a_private_file() {
    let dir = std::env::temp_dir().join(format!("treecast-access-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bin = env!("CARGO_BIN_EXE_treecast-signaller");
    let mut child = std::process::Command::new(bin)
        .args(["--bind", "0.0.0.0:0", "--stun-port", "0", "--log", "info"])
        .current_dir(&dir)
        .env_remove("TREECAST_ADMIN_SECRET")
        .env_remove("TREECAST_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    let log = wait_for(&out, "listening on http://").await;

    let file = dir.join("treecast-admin-secret");
    let path_shown = std::fs::canonicalize(&file).unwrap();
    assert!(log.contains(&path_shown.display().to_string()), "{log}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    let secret = std::fs::read_to_string(&file).unwrap().trim().to_owned();
    assert_eq!(secret.len(), 64);

    let port: u16 = log
        .split("listening on http://0.0.0.0:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {log}"));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(call(addr, "GET", "/api/rooms", None).await.0, 401);
    assert_eq!(call(addr, "GET", "/api/rooms", Some(&secret)).await.0, 200);

    // mint-token finds the same secret in the file; its grant works where grants are asked.
    let minted = std::process::Command::new(bin)
        .args(["mint-token", "--ttl", "10m", "--sub", "ci"])
        .current_dir(&dir)
        .env_remove("TREECAST_ADMIN_SECRET")
        .env_remove("TREECAST_CONFIG")
        .output()
        .unwrap();
    assert!(minted.status.success(), "{minted:?}");
    let grant = String::from_utf8(minted.stdout).unwrap().trim().to_owned();
    assert_eq!(grant.split('.').count(), 3, "{grant}");
    let mut config = common::test_config();
    config.access.admin_secret = Some(Secret::new(secret.clone()));
    config.access.create = CreateMode::Token;
    let gated = TestServer::start(config).await;
    assert_eq!(
        call(gated.addr, "POST", "/api/rooms", Some(&grant)).await.0,
        201
    );
    gated.shutdown().await.unwrap();

    let _ = child.kill();
    let _ = child.wait();
    let all = format!("{}{}", out.lock().unwrap(), err.lock().unwrap());
    assert!(!all.contains(&secret), "the secret is in the log: {all}");
    let _ = std::fs::remove_dir_all(&dir);
}
