//! Shared helpers for the signaller's end-to-end tests: a server on `127.0.0.1:0`, the
//! signaller's own REST client, and a WebSocket client that records what it receives.
//!
//! Timeouts here only guard liveness (a hung test fails instead of hanging); they are
//! generous so a slow machine never fails a test.
#![allow(dead_code)]

pub mod redis_server;
pub mod tls;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use treecast_signaller::{Config, ServerError};

/// Longest wait for anything that should happen "soon".
pub const LIVENESS: Duration = Duration::from_secs(30);

/// A configuration for tests: defaults, with limits high enough for hundreds of local
/// clients from one address.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.limits.max_connections_per_ip = 10_000;
    // Every test client comes from 127.0.0.1.
    config.limits.room_creation_burst = 1_000;
    config
}

/// A signaller running in this process.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    /// Starts a server on an ephemeral port.
    pub async fn start(config: Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(treecast_signaller::serve(listener, config, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Asks the server to shut down and waits until `serve` returns.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().unwrap();
        tokio::time::timeout(LIVENESS, task)
            .await
            .expect("the server shuts down")
            .expect("the server task does not panic")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header block as text, `name: value` lines with lowercase names.
    pub headers: String,
    /// Body.
    pub body: String,
}

impl HttpResponse {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request; reads the whole response.
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
    let r = treecast_signaller::client::request(&addr.to_string(), method, path, body, LIVENESS)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let headers = r
        .headers
        .iter()
        .map(|(name, value)| format!("{name}: {}\r\n", value.to_str().unwrap_or_default()))
        .collect();
    HttpResponse {
        status: r.status,
        headers,
        body: r.body,
    }
}

/// One request with an optional body and bearer: the status and the JSON body (`null`
/// when the body is not JSON).
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    bearer: Option<&str>,
) -> (u16, Value) {
    let r = treecast_signaller::client::request_with_auth(
        &addr.to_string(),
        method,
        path,
        body,
        bearer,
        LIVENESS,
    )
    .await
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (
        r.status,
        serde_json::from_str(&r.body).unwrap_or(Value::Null),
    )
}

/// Creates a room; returns its id and broadcaster token.
pub async fn create_room(addr: SocketAddr) -> (String, String) {
    let r = http(addr, "POST", "/api/rooms", None).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    (
        v["room"].as_str().unwrap().to_owned(),
        v["token"].as_str().unwrap().to_owned(),
    )
}

/// A fresh room with its broadcaster and one viewer that has been given its parent:
/// (room id, broadcaster, viewer).
pub async fn live_room(addr: SocketAddr) -> (String, Client, Client) {
    let (room, token) = create_room(addr).await;
    let broadcaster = Client::join(addr, &room, "broadcaster", Some(&token), None).await;
    let mut viewer = Client::join(addr, &room, "viewer", None, None).await;
    viewer.recv_until("parent").await;
    (room, broadcaster, viewer)
}

/// `GET /api/rooms/{room}` as JSON.
pub async fn snapshot(addr: SocketAddr, room: &str) -> Value {
    let r = http(addr, "GET", &format!("/api/rooms/{room}"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// Polls the snapshot until `done` holds.
pub async fn wait_for_snapshot(
    addr: SocketAddr,
    room: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + LIVENESS;
    loop {
        let snap = snapshot(addr, room).await;
        if done(&snap) {
            return snap;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the room never reached the expected state: {snap}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A peer's entry in a snapshot.
pub fn peer_in(snap: &Value, id: u64) -> Option<&Value> {
    snap["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
}

/// A WebSocket client that keeps every text message it received, in order.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Every JSON message received so far.
    pub log: Vec<Value>,
    /// The close code, once the server closed.
    pub closed: Option<Option<CloseCode>>,
    /// From `welcome`.
    pub peer_id: Option<u64>,
    /// From `welcome`.
    pub resume: Option<String>,
}

impl Client {
    /// Opens a WebSocket to `/ws`.
    pub async fn connect(addr: SocketAddr) -> Self {
        let url = format!("ws://{addr}/ws");
        let (ws, _) = tokio::time::timeout(LIVENESS, tokio_tungstenite::connect_async(url))
            .await
            .expect("the WebSocket handshake completes")
            .expect("the WebSocket handshake succeeds");
        Self {
            ws,
            log: Vec::new(),
            closed: None,
            peer_id: None,
            resume: None,
        }
    }

    /// Connects, sends `hello` and waits for `welcome`.
    pub async fn join(
        addr: SocketAddr,
        room: &str,
        role: &str,
        token: Option<&str>,
        uplink_kbps: Option<u32>,
    ) -> Self {
        let mut c = Self::connect(addr).await;
        let mut hello = json!({"type": "hello", "room": room, "role": role});
        if let Some(t) = token {
            hello["token"] = json!(t);
        }
        if let Some(u) = uplink_kbps {
            hello["uplink_kbps"] = json!(u);
        }
        c.send_json(&hello).await;
        c.expect_welcome().await;
        c
    }

    /// Waits for `welcome` and records the peer id and resume token.
    pub async fn expect_welcome(&mut self) -> Value {
        let w = self.recv_until("welcome").await;
        self.peer_id = w["peer_id"].as_u64();
        self.resume = w["resume"].as_str().map(str::to_owned);
        w
    }

    /// This client's peer id.
    pub fn id(&self) -> u64 {
        self.peer_id.expect("joined")
    }

    /// Sends a JSON text frame.
    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(v.to_string()).await;
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, s: impl Into<String>) {
        let s: String = s.into();
        self.ws
            .send(Message::text(s))
            .await
            .expect("the frame is sent");
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, b: Vec<u8>) {
        self.ws
            .send(Message::binary(b))
            .await
            .expect("the frame is sent");
    }

    /// Sends a text frame, ignoring failures (the server may close before it is written).
    pub async fn send_text_lossy(&mut self, s: String) {
        let _ = self.ws.send(Message::text(s)).await;
    }

    /// Queues many text frames and flushes once, ignoring failures (the server may close).
    pub async fn blast(&mut self, text: &str, n: usize) {
        for _ in 0..n {
            if self.ws.feed(Message::text(text.to_owned())).await.is_err() {
                return;
            }
        }
        let _ = self.ws.flush().await;
    }

    /// The next JSON message, or `None` once the server closed. Panics if nothing arrives
    /// within [`LIVENESS`].
    pub async fn recv(&mut self) -> Option<Value> {
        if self.closed.is_some() {
            return None;
        }
        loop {
            let next = tokio::time::timeout(LIVENESS, self.ws.next())
                .await
                .expect("a message arrives in time");
            match next {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("the server sends JSON");
                    self.log.push(v.clone());
                    return Some(v);
                }
                Some(Ok(Message::Close(frame))) => {
                    self.closed = Some(frame.map(|f| f.code));
                    return None;
                }
                Some(Ok(_)) => {} // pings are answered by tungstenite
                Some(Err(_)) | None => {
                    self.closed = Some(None);
                    return None;
                }
            }
        }
    }

    /// Reads until a message of type `ty`; panics if the connection closes first.
    pub async fn recv_until(&mut self, ty: &str) -> Value {
        loop {
            match self.recv().await {
                Some(v) if v["type"] == ty => return v,
                Some(_) => {}
                None => panic!("closed before a \"{ty}\" message; got {:?}", self.log),
            }
        }
    }

    /// Reads until an `error`; asserts its code.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let e = self.recv_until("error").await;
        assert_eq!(e["code"], code, "{e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        e
    }

    /// Reads until the server closes; returns the close code.
    pub async fn expect_closed(&mut self) -> Option<CloseCode> {
        while self.recv().await.is_some() {}
        self.closed.expect("closed")
    }

    /// Sends `ping` and reads until `pong`: everything the server sent this client before
    /// it handled the ping is in [`Client::log`] afterwards.
    pub async fn sync(&mut self) {
        self.send_json(&json!({"type": "ping"})).await;
        self.recv_until("pong").await;
    }

    /// Messages of type `ty` in the log from index `from` on.
    pub fn since(&self, from: usize, ty: &str) -> Vec<&Value> {
        self.log[from..]
            .iter()
            .filter(|v| v["type"] == ty)
            .collect()
    }

    /// The parent and children this client was told about, replaying `parent`, `child` and
    /// `drop` messages (and resume `room` status) in order.
    pub fn neighbours(&self) -> (Option<u64>, Vec<u64>) {
        let mut parent = None;
        let mut children: Vec<u64> = Vec::new();
        for m in &self.log {
            let peer = m["peer_id"].as_u64();
            match m["type"].as_str() {
                Some("parent") => parent = peer,
                Some("child") => children.extend(peer),
                Some("drop") => {
                    if parent == peer {
                        parent = None;
                    }
                    children.retain(|&c| Some(c) != peer);
                }
                _ => {}
            }
        }
        children.sort_unstable();
        (parent, children)
    }

    /// Drops the socket without a close handshake, like a crashed tab.
    pub fn crash(self) {
        drop(self);
    }
}
