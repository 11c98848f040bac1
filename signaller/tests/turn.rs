//! TURN interop: credentials the signaller mints for a peer allocate on coturn and on the
//! embedded TURN server; forged and expired ones are refused; an allocation outlives its
//! credentials; the embedded relay refuses loopback peers unless allow-listed.
//!
//! Credentials are obtained the way a peer gets them: create a room over HTTP, join over
//! the WebSocket and read `welcome.ice_servers`. Allocations use the `turn` crate's client.
//! The coturn tests run Debian's `turnserver` on 127.0.0.1 (scripts/test installs it).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Client, LIVENESS, TestServer, create_room, test_config};
use tokio::net::UdpSocket;
use treecast_core::turn::{self as rest, Secret, TurnRest};
use treecast_signaller::{Config, TurnServerConfig};
use turn::client::{Client as TurnClient, ClientConfig};
use webrtc_util::Conn;

const SECRET: &str = "interop-test-secret";

/// Credentials from `welcome`: (TURN server address, username, password).
struct Minted {
    server: SocketAddr,
    username: String,
    password: String,
}

/// Joins a fresh room as its broadcaster and returns the TURN entry of `welcome`.
async fn mint_as_a_peer(signaller: SocketAddr) -> Minted {
    let (room, token) = create_room(signaller).await;
    let mut peer = Client::connect(signaller).await;
    peer.send_json(&serde_json::json!({
        "type": "hello", "room": room, "role": "broadcaster", "token": token,
    }))
    .await;
    let welcome = peer.expect_welcome().await;
    let entry = welcome["ice_servers"]
        .as_array()
        .expect("welcome lists ICE servers")
        .iter()
        .find(|s| s["username"].is_string())
        .unwrap_or_else(|| panic!("no TURN credentials in {welcome}"))
        .clone();
    let url = entry["urls"][0].as_str().unwrap();
    let host_port = url
        .strip_prefix("turn:")
        .and_then(|u| u.split('?').next())
        .unwrap_or_else(|| panic!("not a turn: URL: {url}"));
    let username = entry["username"].as_str().unwrap().to_owned();
    let (_, user) = rest::parse_username(&username).expect("a REST username");
    assert_eq!(
        user,
        format!("{room}.{}", peer.id()),
        "bound to the room and peer"
    );
    Minted {
        server: host_port.parse().unwrap(),
        username,
        password: entry["credential"].as_str().unwrap().to_owned(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A TURN client on 127.0.0.1 talking to `server`.
async fn turn_client(server: SocketAddr, username: &str, password: &str) -> TurnClient {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let client = TurnClient::new(ClientConfig {
        stun_serv_addr: String::new(),
        turn_serv_addr: server.to_string(),
        username: username.to_owned(),
        password: password.to_owned(),
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(socket),
        vnet: None,
    })
    .await
    .expect("a TURN client");
    client.listen().await.expect("the client listens");
    client
}

/// Allocates a relay; `Err` carries the server's refusal.
async fn allocate(
    server: SocketAddr,
    username: &str,
    password: &str,
) -> (TurnClient, Result<impl Conn + use<>, String>) {
    let client = turn_client(server, username, password).await;
    let relay = tokio::time::timeout(LIVENESS, client.allocate())
        .await
        .expect("the TURN server answers the Allocate")
        .map_err(|e| e.to_string());
    (client, relay)
}

/// A signaller whose rooms mint credentials for `urls` with the test secret.
fn config_with_rest(urls: Vec<String>) -> Config {
    let mut config = test_config();
    config.room.turn = Some(TurnRest {
        urls,
        secret: Secret::new(SECRET),
        ttl: TurnRest::DEFAULT_TTL,
    });
    config
}

/// A signaller with the embedded TURN server on a free port of 127.0.0.1.
fn config_with_embedded(allow_peers: &[&str]) -> Config {
    let mut config = config_with_rest(Vec::new());
    config.turn_server = Some(TurnServerConfig {
        port: 0,
        relay_ip: Some("127.0.0.1".parse().unwrap()),
        allow_peers: allow_peers.iter().map(|n| n.parse().unwrap()).collect(),
        ..TurnServerConfig::default()
    });
    config
}

/// The three checks both servers must pass: minted credentials allocate, a forged
/// password and an expired username are refused.
async fn minted_forged_and_expired(signaller: SocketAddr) -> SocketAddr {
    let minted = mint_as_a_peer(signaller).await;
    let (_client, relay) = allocate(minted.server, &minted.username, &minted.password).await;
    let relay = relay.unwrap_or_else(|e| panic!("minted credentials must allocate: {e}"));
    assert!(relay.local_addr().is_ok());

    let forged = rest::password(&Secret::new("not-the-secret"), &minted.username);
    let (_client, refused) = allocate(minted.server, &minted.username, &forged).await;
    let err = refused.err().expect("a forged password is refused");
    assert!(err.contains("401"), "{err}");

    let (_, user) = rest::parse_username(&minted.username).unwrap();
    let expired = rest::username(unix_now() - 60, user);
    let password = rest::password(&Secret::new(SECRET), &expired);
    let (_client, refused) = allocate(minted.server, &expired, &password).await;
    let err = refused.err().expect("an expired username is refused");
    assert!(err.contains("401"), "{err}");
    minted.server
}

/// A UDP socket on `ip` that sends back whatever it receives.
async fn echo(ip: &str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let socket = UdpSocket::bind((ip, 0)).await.unwrap();
    let addr = socket.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    (addr, task)
}

/// Sends `payload` through the relay to `peer` until it comes back or `wait` passes;
/// `true` if it came back.
async fn round_trip(relay: &impl Conn, peer: SocketAddr, payload: &[u8], wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; 2048];
    while tokio::time::Instant::now() < deadline {
        // Each send creates or refreshes the permission for `peer` first.
        relay
            .send_to(payload, peer)
            .await
            .unwrap_or_else(|e| panic!("sending through the relay: {e}"));
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_millis(500), relay.recv_from(&mut buf)).await
        {
            if from == peer && &buf[..n] == payload {
                return true;
            }
        }
    }
    false
}

#[tokio::test]
async fn embedded_turn_accepts_minted_credentials_and_refuses_forged_or_expired() {
    let signaller = TestServer::start(config_with_embedded(&[])).await;
    let turn = minted_forged_and_expired(signaller.addr).await;
    assert_eq!(turn.ip().to_string(), "127.0.0.1");
    let metrics = common::http(signaller.addr, "GET", "/metrics", None)
        .await
        .body;
    for reason in ["bad_password", "expired"] {
        let series = format!("treecast_turn_auth_failures_total{{reason=\"{reason}\"}}");
        assert!(metrics.contains(&series), "{series} missing: {metrics}");
    }
    // The secret is in no answer the server gives.
    let rooms = common::http(signaller.addr, "GET", "/api/rooms", None).await;
    let room = rooms.json()[0]["id"].as_str().unwrap().to_owned();
    for path in [
        "/api/rooms",
        &format!("/api/rooms/{room}"),
        "/metrics",
        "/dashboard",
        "/healthz",
    ] {
        let body = common::http(signaller.addr, "GET", path, None).await.body;
        assert!(!body.contains(SECRET), "{path} shows the TURN secret");
    }
    signaller.shutdown().await.unwrap();
    // The embedded server stopped with the signaller: its port is free again.
    let deadline = tokio::time::Instant::now() + LIVENESS;
    while UdpSocket::bind(turn).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the TURN port {turn} is still taken after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn embedded_relay_outlives_its_credentials() {
    let mut config = config_with_embedded(&["127.0.0.0/8"]);
    // One allocation per peer, so a freed slot shows that the expired Refresh was honoured.
    config
        .turn_server
        .as_mut()
        .unwrap()
        .max_allocations_per_peer = 1;
    let signaller = TestServer::start(config).await;
    let minted = mint_as_a_peer(signaller.addr).await;
    let (_, user) = rest::parse_username(&minted.username).unwrap();
    // Credentials that expire two seconds from now, minted like the room does.
    let username = rest::username(unix_now() + 2, user);
    let password = rest::password(&Secret::new(SECRET), &username);
    let (_client, relay) = allocate(minted.server, &username, &password).await;
    let relay = relay.unwrap_or_else(|e| panic!("fresh credentials must allocate: {e}"));
    let (first_peer, _echo1) = echo("127.0.0.1").await;
    assert!(
        round_trip(&relay, first_peer, b"before expiry", LIVENESS).await,
        "relaying to an allow-listed peer works"
    );

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(unix_now() > rest::parse_username(&username).unwrap().0);
    // A peer at another IP address needs a CreatePermission (permissions are per IP),
    // signed with the now expired credentials; the server accepts it because this client
    // holds an allocation made while they were valid.
    let (second_peer, _echo2) = echo("127.0.0.2").await;
    assert!(
        round_trip(&relay, second_peer, b"after expiry", LIVENESS).await,
        "the allocation keeps permitting and relaying after its credentials expired"
    );
    assert!(round_trip(&relay, first_peer, b"still", LIVENESS).await);

    // A new allocation with the same expired credentials is refused.
    let (_client, refused) = allocate(minted.server, &username, &password).await;
    let err = refused
        .err()
        .expect("expired credentials allocate nothing new");
    assert!(err.contains("401"), "{err}");

    // Closing sends a Refresh with lifetime 0, signed with the expired credentials. Once
    // the server honours it the peer's only slot is free for fresh credentials.
    relay.close().await.unwrap();
    let fresh = rest::username(unix_now() + 600, user);
    let fresh_password = rest::password(&Secret::new(SECRET), &fresh);
    let deadline = tokio::time::Instant::now() + LIVENESS;
    loop {
        let (_client, relay) = allocate(minted.server, &fresh, &fresh_password).await;
        match relay {
            Ok(_) => break,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "the expired Refresh never released the allocation: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = common::http(signaller.addr, "GET", "/metrics", None)
        .await
        .body;
    assert!(
        metrics.contains("treecast_turn_relayed_bytes_total{direction=\"to_peer\"}"),
        "{metrics}"
    );
    signaller.shutdown().await.unwrap();
}

#[tokio::test]
async fn embedded_relay_refuses_loopback_peers_by_default() {
    let signaller = TestServer::start(config_with_embedded(&[])).await;
    let minted = mint_as_a_peer(signaller.addr).await;
    let (_client, relay) = allocate(minted.server, &minted.username, &minted.password).await;
    let relay = relay.unwrap_or_else(|e| panic!("minted credentials must allocate: {e}"));
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer = socket.local_addr().unwrap();
    // The client first asks for a permission for the peer: forbidden.
    let refused = relay
        .send_to(b"to loopback", peer)
        .await
        .expect_err("a permission for a loopback peer is refused");
    assert!(refused.to_string().contains("403"), "{refused}");
    // Absence is only ever shown over a bounded wait.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut buf = [0u8; 64];
    assert!(
        socket.try_recv_from(&mut buf).is_err(),
        "nothing reached the loopback peer"
    );
    let metrics = common::http(signaller.addr, "GET", "/metrics", None)
        .await
        .body;
    assert!(
        metrics.contains("treecast_turn_denied_peers_total{direction=\"permission\"}"),
        "{metrics}"
    );
    drop(relay);
    signaller.shutdown().await.unwrap();
}

#[tokio::test]
async fn embedded_turn_caps_allocations_per_peer() {
    let mut config = config_with_embedded(&[]);
    config
        .turn_server
        .as_mut()
        .unwrap()
        .max_allocations_per_peer = 2;
    let signaller = TestServer::start(config).await;
    let minted = mint_as_a_peer(signaller.addr).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (client, relay) = allocate(minted.server, &minted.username, &minted.password).await;
        held.push((
            client,
            relay.unwrap_or_else(|e| panic!("within the cap: {e}")),
        ));
    }
    let (_client, third) = allocate(minted.server, &minted.username, &minted.password).await;
    let err = third
        .err()
        .expect("a third allocation for one peer is refused");
    assert!(err.contains("486"), "{err}");
    // Another peer has its own quota.
    let other = mint_as_a_peer(signaller.addr).await;
    let (_client, relay) = allocate(other.server, &other.username, &other.password).await;
    assert!(relay.is_ok(), "{:?}", relay.err());
    signaller.shutdown().await.unwrap();
}

/// coturn on 127.0.0.1, killed when dropped.
struct Coturn {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Coturn {
    /// Starts `turnserver` with the test secret on a free port and waits until it answers;
    /// `extra` flags are appended.
    async fn start(extra: &[&str]) -> Self {
        let binary = which("turnserver").unwrap_or_else(|| {
            panic!(
                "turnserver is not installed: install coturn (apt-get install coturn; \
                 scripts/test does) to run the TURN interop tests"
            )
        });
        // Find a free port by binding and releasing it; retry if coturn loses the race.
        for attempt in 0..5 {
            let dir = std::env::temp_dir().join(format!(
                "treecast-coturn-{}-{}-{attempt}",
                std::process::id(),
                unix_now_nanos()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let child = Command::new(&binary)
                .args([
                    "-n",
                    "--listening-ip=127.0.0.1",
                    "--relay-ip=127.0.0.1",
                    &format!("--listening-port={port}"),
                    "--min-port=49152",
                    "--max-port=65535",
                    "--realm=treecast.test",
                    "--use-auth-secret",
                    &format!("--static-auth-secret={SECRET}"),
                    "--fingerprint",
                    "--no-tls",
                    "--no-dtls",
                    "--no-cli",
                    "--no-tcp",
                    &format!("--userdb={}", dir.join("turndb").display()),
                    &format!("--pidfile={}", dir.join("turn.pid").display()),
                    "--log-file=stdout",
                    "--simple-log",
                ])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("turnserver starts");
            // Owned by the guard from here on, so a failing test still kills it.
            let mut coturn = Coturn { child, addr, dir };
            if coturn.answers().await {
                return coturn;
            }
        }
        panic!("coturn did not start on 127.0.0.1 after five attempts");
    }

    /// Polls with STUN Binding requests until coturn answers (or it exited).
    async fn answers(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + LIVENESS;
        while tokio::time::Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return false;
            }
            let client = turn_client(self.addr, "", "").await;
            let answered = tokio::time::timeout(
                Duration::from_secs(2),
                client.send_binding_request_to(&self.addr.to_string()),
            )
            .await;
            let _ = client.close().await;
            if matches!(answered, Ok(Ok(_))) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unix_now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/usr/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

#[tokio::test]
async fn coturn_accepts_minted_credentials_and_refuses_forged_or_expired() {
    let coturn = Coturn::start(&[]).await;
    let url = format!("turn:{}?transport=udp", coturn.addr);
    let signaller = TestServer::start(config_with_rest(vec![url])).await;
    let turn = minted_forged_and_expired(signaller.addr).await;
    assert_eq!(turn, coturn.addr);
    signaller.shutdown().await.unwrap();
    drop(coturn);
}

/// Allocation time, round-trip time and a burst through a relay to a local echo, on the
/// embedded server and on coturn. Prints numbers for docs/performance.md; asserts only that
/// traffic flows. Run: `cargo test --release -p treecast-signaller --test turn -- --ignored
/// --nocapture measure`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a behaviour check"]
async fn measure_relay_costs() {
    let embedded = TestServer::start(config_with_embedded(&["127.0.0.0/8"])).await;
    measure("embedded", mint_as_a_peer(embedded.addr).await).await;
    let coturn = Coturn::start(&["--allow-loopback-peers"]).await;
    let url = format!("turn:{}?transport=udp", coturn.addr);
    let signaller = TestServer::start(config_with_rest(vec![url])).await;
    measure("coturn", mint_as_a_peer(signaller.addr).await).await;
}

async fn measure(name: &str, minted: Minted) {
    let mut allocations = Vec::new();
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let (client, relay) = allocate(minted.server, &minted.username, &minted.password).await;
        allocations.push(started.elapsed());
        let relay = relay.unwrap();
        relay.close().await.unwrap();
        client.close().await.unwrap();
    }
    let (client, relay) = allocate(minted.server, &minted.username, &minted.password).await;
    let relay = relay.unwrap();
    let (peer, _echo) = echo("127.0.0.1").await;
    assert!(round_trip(&relay, peer, b"warm-up", LIVENESS).await);
    let payload = vec![7u8; 1_000];
    let mut rtts = Vec::new();
    let mut buf = vec![0u8; 2_048];
    for _ in 0..1_000 {
        let started = std::time::Instant::now();
        relay.send_to(&payload, peer).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(1), relay.recv_from(&mut buf)).await;
        if matches!(got, Ok(Ok((n, _))) if n == payload.len()) {
            rtts.push(started.elapsed());
        }
    }
    // 5,000 datagrams of 1,000 B paced at 10 per millisecond (80 Mbit/s, what 160 relayed
    // 500 kbit/s streams carry), read back by a second task.
    let relay = Arc::new(relay);
    let reader = {
        let relay = Arc::clone(&relay);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2_048];
            let mut n = 0u32;
            while let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(2), relay.recv_from(&mut buf)).await
            {
                n += 1;
            }
            n
        })
    };
    let started = std::time::Instant::now();
    let mut pace = tokio::time::interval(Duration::from_millis(1));
    for _ in 0..500 {
        pace.tick().await;
        for _ in 0..10 {
            relay.send_to(&payload, peer).await.unwrap();
        }
    }
    let sent_in = started.elapsed();
    let returned = reader.await.unwrap();
    allocations.sort();
    rtts.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name}: allocate median {:.2} ms (max {:.2}); round trip of 1000 B p50 {:.3} ms, \
         p99 {:.3} ms ({} of 1000 answered); 5000 x 1000 B paced at 10/ms sent in {:.0} ms, \
         {returned} came back",
        ms(allocations[allocations.len() / 2]),
        ms(allocations[allocations.len() - 1]),
        ms(rtts[rtts.len() / 2]),
        ms(rtts[rtts.len() * 99 / 100]),
        rtts.len(),
        ms(sent_in),
    );
    assert!(!rtts.is_empty());
    client.close().await.unwrap();
}
