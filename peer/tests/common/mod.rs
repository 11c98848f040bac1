//! Shared by the native peer's end-to-end tests: an in-process signaller on 127.0.0.1 with
//! a room, and liveness waits. Timeouts only guard liveness (a hung test fails instead of
//! hanging); nothing here asserts speed.
#![allow(dead_code)]

#[path = "../../../signaller/tests/common/redis_server.rs"]
pub mod redis_server;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use treecast_core::PeerId;
use treecast_peer::{Peer, PeerConfig, Role};

/// Longest wait for anything that should happen.
pub const LIVENESS: Duration = Duration::from_secs(60);

/// A signaller serving in this process, and one room on it.
pub struct TestSignaller {
    /// Its HTTP and WebSocket address.
    pub addr: SocketAddr,
    /// `ws://…/ws`.
    pub url: String,
    /// The room created for the test.
    pub room: String,
    /// That room's broadcaster token.
    pub token: String,
    /// The STUN server's primary and alternate addresses, when it runs one.
    pub stun: Option<(SocketAddr, SocketAddr)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), treecast_signaller::ServerError>>>,
    /// What it was started with, for a restart.
    config: treecast_signaller::Config,
}

impl TestSignaller {
    /// Starts a signaller with the given root and relay fan-out, no ICE servers (so no
    /// packet leaves loopback) and limits high enough for every peer of a test, and creates
    /// a room.
    pub async fn start(root_fanout: u32, relay_fanout: u32) -> Self {
        Self::launch(root_fanout, relay_fanout, false, |_| {}).await
    }

    /// Like [`TestSignaller::start`], with `configure` changing the room settings last.
    pub async fn start_with(
        root_fanout: u32,
        relay_fanout: u32,
        configure: impl FnOnce(&mut treecast_signaller::Config),
    ) -> Self {
        Self::launch(root_fanout, relay_fanout, false, configure).await
    }

    /// Like [`TestSignaller::start`] (root and relay fan-out 4), with the embedded STUN
    /// server on two ephemeral loopback ports: it leads the ICE servers in `welcome`.
    pub async fn start_with_stun() -> Self {
        Self::launch(4, 4, true, |_| {}).await
    }

    async fn launch(
        root_fanout: u32,
        relay_fanout: u32,
        with_stun: bool,
        configure: impl FnOnce(&mut treecast_signaller::Config),
    ) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let mut config = treecast_signaller::Config::default();
        config.limits.max_connections_per_ip = 10_000;
        config.limits.room_creation_burst = 1_000;
        config.room.root_fanout = root_fanout;
        config.room.relay_fanout = relay_fanout;
        config.room.ice_servers = Vec::new();
        configure(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut extras = treecast_signaller::Extras::default();
        let mut stun = None;
        if with_stun {
            let primary = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let alternate = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            stun = Some((
                primary.local_addr().unwrap(),
                alternate.local_addr().unwrap(),
            ));
            extras.stun = Some(treecast_signaller::StunSockets::new(primary, alternate).unwrap());
        }
        let (stop, server) = Self::serve(listener, config.clone(), extras);
        let (status, created) = http(addr, "POST", "/api/rooms").await;
        assert_eq!(status, 201, "{created}");
        Self {
            addr,
            url: format!("ws://{addr}/ws"),
            room: created["room"].as_str().unwrap().to_owned(),
            token: created["token"].as_str().unwrap().to_owned(),
            stun,
            stop: Some(stop),
            server: Some(server),
            config,
        }
    }

    #[allow(clippy::type_complexity)]
    fn serve(
        listener: tokio::net::TcpListener,
        config: treecast_signaller::Config,
        extras: treecast_signaller::Extras,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), treecast_signaller::ServerError>>,
    ) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let server = tokio::spawn(treecast_signaller::serve_with(
            listener, config, shutdown, extras,
        ));
        (stop, server)
    }

    /// Shuts the server down (gracefully, as an upgrade does) and starts it again on the
    /// same address with the same configuration, as a fresh process would: no room
    /// survives in memory. Returns how long the address had no server.
    pub async fn restart(&mut self) -> Duration {
        let _ = self.stop.take().map(|stop| stop.send(()));
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(LIVENESS, server).await;
        }
        let down = Instant::now();
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(down.elapsed() < LIVENESS, "rebinding {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let (stop, server) = Self::serve(
            listener,
            self.config.clone(),
            treecast_signaller::Extras::default(),
        );
        self.stop = Some(stop);
        self.server = Some(server);
        down.elapsed()
    }

    /// A peer configuration for this room on loopback (the broadcaster's carries the token).
    pub fn peer_config(&self, role: Role) -> PeerConfig {
        let mut c = PeerConfig::new(&self.url, &self.room, role);
        c.use_ice_servers = false;
        if role == Role::Broadcaster {
            c.token = Some(self.token.clone());
        }
        c
    }

    /// The room's snapshot as the HTTP API gives it.
    pub async fn snapshot(&self) -> Value {
        let (status, snap) = http(self.addr, "GET", &format!("/api/rooms/{}", self.room)).await;
        assert_eq!(status, 200, "{snap}");
        snap
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        let _ = self.stop.take().map(|stop| stop.send(()));
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(LIVENESS, server).await;
        }
    }
}

/// One request to the signaller's REST API: status and JSON body.
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, Value) {
    let r = treecast_signaller::client::request(&addr.to_string(), method, path, None, LIVENESS)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let body = r
        .json()
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", r.body));
    (r.status, body)
}

/// Starts a broadcaster, then `viewers` viewers one after another (each placed before the
/// next joins, so the tree's shape follows the fan-outs), and waits until every viewer
/// receives. `configure` adjusts each peer's configuration.
pub async fn start_tree(
    signaller: &TestSignaller,
    viewers: usize,
    configure: impl Fn(&mut PeerConfig),
) -> (Peer, Vec<Peer>) {
    let config = |role| {
        let mut c = signaller.peer_config(role);
        configure(&mut c);
        c
    };
    let broadcaster = Peer::start(config(Role::Broadcaster)).unwrap();
    wait_until("the broadcaster is welcomed", LIVENESS, || {
        broadcaster.status().peer_id.is_some()
    })
    .await;
    let mut placed = Vec::new();
    for _ in 0..viewers {
        let v = Peer::start(config(Role::Viewer)).unwrap();
        wait_until("a viewer is placed", LIVENESS, || {
            v.status().depth.is_some()
        })
        .await;
        placed.push(v);
    }
    for v in &placed {
        wait_until("every viewer receives", LIVENESS, || {
            count(&v.stats().packets_received) > 0
        })
        .await;
    }
    (broadcaster, placed)
}

/// After `gone` left: waits until every viewer has another parent and receives again
/// (ten more packets each), then streams `after` longer so late packets are counted.
pub async fn await_repair(viewers: &[Peer], gone: PeerId, after: Duration) {
    wait_until("every child has another parent", LIVENESS, || {
        viewers
            .iter()
            .all(|v| v.status().parent.is_some_and(|p| p != gone))
    })
    .await;
    let resumed: Vec<u64> = viewers
        .iter()
        .map(|v| count(&v.stats().packets_received))
        .collect();
    wait_until("media flows after the repair", LIVENESS, || {
        viewers
            .iter()
            .zip(&resumed)
            .all(|(v, &n)| count(&v.stats().packets_received) > n + 10)
    })
    .await;
    tokio::time::sleep(after).await;
}

/// Polls `done` until it holds; fails the test after `bound`.
pub async fn wait_until(what: &str, bound: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each peer's parent, from a room's snapshot (`GET /api/rooms/{room}`).
pub fn parents(snapshot: &Value) -> std::collections::BTreeMap<u64, Option<u64>> {
    snapshot["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| (p["id"].as_u64().unwrap(), p["parent"].as_u64()))
        .collect()
}

/// A counter's value.
pub fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// One viewer's packet counters at an instant. Every packet carries the broadcaster's
/// probe sequence number (relays pass payloads through untouched), so the packets a viewer
/// missed between two marks are the sequence numbers it never received.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    pub next_seq: u64,
    pub received: u64,
    pub duplicates: u64,
}

impl Mark {
    pub fn of(p: &Peer) -> Self {
        let s = p.stats();
        Self {
            next_seq: count(&s.next_seq),
            received: count(&s.packets_received),
            duplicates: count(&s.reordered_or_duplicate),
        }
    }

    /// Sequence numbers sent between `self` and `later` that never arrived.
    pub fn missing_until(self, later: Mark) -> i64 {
        let span = later.next_seq as i64 - self.next_seq as i64;
        let unique =
            (later.received - self.received) as i64 - (later.duplicates - self.duplicates) as i64;
        span - unique
    }
}
