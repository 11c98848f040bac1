//! Shared by the native peer's end-to-end tests: an in-process signaller on 127.0.0.1 with
//! a room, and liveness waits. Timeouts only guard liveness (a hung test fails instead of
//! hanging); nothing here asserts speed.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use treecast_peer::{PeerConfig, Role};

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
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), treecast_signaller::ServerError>>,
}

impl TestSignaller {
    /// Starts a signaller with the given root and relay fan-out, no ICE servers (so no
    /// packet leaves loopback) and limits high enough for every peer of a test, and creates
    /// a room.
    pub async fn start(root_fanout: u32, relay_fanout: u32) -> Self {
        Self::launch(root_fanout, relay_fanout, false).await
    }

    /// Like [`TestSignaller::start`] (root and relay fan-out 4), with the embedded STUN
    /// server on two ephemeral loopback ports: it leads the ICE servers in `welcome`.
    pub async fn start_with_stun() -> Self {
        Self::launch(4, 4, true).await
    }

    async fn launch(root_fanout: u32, relay_fanout: u32, with_stun: bool) -> Self {
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
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let server = tokio::spawn(treecast_signaller::serve_with(
            listener, config, shutdown, extras,
        ));
        let (status, created) = http(addr, "POST", "/api/rooms").await;
        assert_eq!(status, 201, "{created}");
        Self {
            addr,
            url: format!("ws://{addr}/ws"),
            room: created["room"].as_str().unwrap().to_owned(),
            token: created["token"].as_str().unwrap().to_owned(),
            stun,
            stop,
            server,
        }
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
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(LIVENESS, self.server).await;
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

/// Polls `done` until it holds; fails the test after `bound`.
pub async fn wait_until(what: &str, bound: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
