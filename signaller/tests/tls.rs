//! The signaller over TLS, end to end on real sockets: HTTPS and WSS with a certificate
//! from a test CA, certificate reload when the files change (open WebSockets stay up, new
//! handshakes get the new certificate), failed reloads, untrusted clients, start-up errors,
//! LAN mode's self-signed certificate, and plain HTTP as the default.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::tls::{Leaf, TempDir, TestCa, client_trusting, connect, https};
use common::{LIVENESS, TestServer, test_config};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use treecast_signaller::{Config, TlsReload};

/// How often the tests' servers look at the certificate files: short, so tests are quick;
/// every wait below still has a [`LIVENESS`] deadline.
const RELOAD_INTERVAL: Duration = Duration::from_millis(100);

/// Writes a certificate and key where the server reads them.
fn install(dir: &TempDir, leaf: &Leaf) {
    std::fs::write(dir.path("cert.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.path("key.pem"), &leaf.key_pem).unwrap();
}

fn tls_config(dir: &TempDir) -> Config {
    let mut config = test_config();
    config.tls.cert = Some(dir.path("cert.pem"));
    config.tls.key = Some(dir.path("key.pem"));
    config.tls.reload_interval = RELOAD_INTERVAL;
    config
}

/// The leaf certificate a new connection is served.
async fn served_certificate(addr: SocketAddr, client: &TlsConnector) -> Vec<u8> {
    let tls = connect(addr, client)
        .await
        .expect("the TLS handshake succeeds");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Waits until new connections are served `der`.
async fn wait_for_certificate(addr: SocketAddr, client: &TlsConnector, der: &[u8]) {
    let deadline = tokio::time::Instant::now() + LIVENESS;
    while served_certificate(addr, client).await != der {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new connections never got the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates a room over HTTPS; returns its id.
async fn create_room(addr: SocketAddr, client: &TlsConnector) -> String {
    let (status, body) = https(addr, client, "POST", "/api/rooms").await;
    assert_eq!(status, 201, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["room"].as_str().unwrap().to_owned()
}

/// A WebSocket over TLS.
struct Wss(WebSocketStream<TlsStream<TcpStream>>);

impl Wss {
    async fn open(addr: SocketAddr, client: &TlsConnector) -> Self {
        let tls = connect(addr, client)
            .await
            .expect("the TLS handshake succeeds");
        let (ws, _) = tokio::time::timeout(
            LIVENESS,
            tokio_tungstenite::client_async(format!("wss://localhost:{}/ws", addr.port()), tls),
        )
        .await
        .expect("the WebSocket handshake ends in time")
        .expect("the WebSocket handshake succeeds");
        Self(ws)
    }

    async fn send(&mut self, v: Value) {
        self.0.send(Message::text(v.to_string())).await.unwrap();
    }

    /// Reads until a message of type `ty`; `None` if the socket closes first.
    async fn recv_until(&mut self, ty: &str) -> Option<Value> {
        loop {
            let next = tokio::time::timeout(LIVENESS, self.0.next())
                .await
                .expect("a message arrives in time");
            match next {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["type"] == ty {
                        return Some(v);
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                Some(Ok(_)) => {}
            }
        }
    }
}

/// The value of one Prometheus counter (0 when absent).
async fn counter(addr: SocketAddr, client: &TlsConnector, series: &str) -> f64 {
    let (status, body) = https(addr, client, "GET", "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn wss_survives_a_certificate_reload_and_new_handshakes_get_the_new_certificate() {
    let dir = TempDir::new("reload");
    let ca = TestCa::new();
    let client = ca.client();
    let first = ca.leaf();
    install(&dir, &first);
    let server = TestServer::start(tls_config(&dir)).await;

    let room = create_room(server.addr, &client).await;
    let mut ws = Wss::open(server.addr, &client).await;
    ws.send(json!({"type": "hello", "room": room, "role": "viewer"}))
        .await;
    let welcome = ws.recv_until("welcome").await.expect("welcome over wss");
    assert!(welcome["peer_id"].is_u64(), "{welcome}");
    assert_eq!(served_certificate(server.addr, &client).await, first.der);

    let second = ca.leaf();
    assert_ne!(second.der, first.der);
    install(&dir, &second);
    wait_for_certificate(server.addr, &client, &second.der).await;

    // The WebSocket opened under the old certificate is still served.
    ws.send(json!({"type": "ping"})).await;
    assert!(
        ws.recv_until("pong").await.is_some(),
        "the open WebSocket still works"
    );
    assert!(
        counter(
            server.addr,
            &client,
            "treecast_tls_reloads_total{outcome=\"ok\"}"
        )
        .await
            >= 1.0
    );

    // Graceful shutdown works over TLS too: the viewer hears the room ended.
    let stopping = tokio::spawn(server.shutdown());
    let ended = ws
        .recv_until("ended")
        .await
        .expect("ended before the close");
    assert_eq!(ended["reason"], "shutdown");
    tokio::time::timeout(LIVENESS, stopping)
        .await
        .expect("the server stops in time")
        .unwrap()
        .expect("a clean shutdown");
}

#[tokio::test]
async fn a_failed_reload_keeps_the_old_certificate_until_a_good_one_arrives() {
    let dir = TempDir::new("bad-reload");
    let ca = TestCa::new();
    let client = ca.client();
    let first = ca.leaf();
    install(&dir, &first);
    let server = TestServer::start(tls_config(&dir)).await;
    let failed = "treecast_tls_reloads_total{outcome=\"failed\"}";
    let failures_before = counter(server.addr, &client, failed).await;

    // A new certificate with the key of another one.
    let (other, stranger) = (ca.leaf(), ca.leaf());
    std::fs::write(dir.path("cert.pem"), &other.cert_pem).unwrap();
    std::fs::write(dir.path("key.pem"), &stranger.key_pem).unwrap();
    let deadline = tokio::time::Instant::now() + LIVENESS;
    while counter(server.addr, &client, failed).await <= failures_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the mismatched pair was never reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        served_certificate(server.addr, &client).await,
        first.der,
        "the old certificate is still served"
    );

    let fixed = ca.leaf();
    install(&dir, &fixed);
    wait_for_certificate(server.addr, &client, &fixed.der).await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_fails_the_handshake() {
    let dir = TempDir::new("untrusted");
    let ca = TestCa::new();
    install(&dir, &ca.leaf());
    let server = TestServer::start(tls_config(&dir)).await;

    let stranger = TestCa::new().client();
    let e = connect(server.addr, &stranger)
        .await
        .expect_err("the handshake fails");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    // The server is fine afterwards.
    let (status, _) = https(server.addr, &ca.client(), "GET", "/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn plain_http_is_the_default() {
    let server = TestServer::start(test_config()).await;
    let r = common::http(server.addr, "GET", "/healthz", None).await;
    assert_eq!(r.status, 200);
    let ca = TestCa::new();
    assert!(
        connect(server.addr, &ca.client()).await.is_err(),
        "no TLS handshake on a plain server"
    );
}

#[tokio::test]
async fn start_up_with_an_unusable_certificate_or_key_names_the_file() {
    let dir = TempDir::new("startup");
    let ca = TestCa::new();
    let (leaf, other) = (ca.leaf(), ca.leaf());
    std::fs::write(dir.path("cert.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.path("key.pem"), &other.key_pem).unwrap();
    let start = |config: Config| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        tokio::time::timeout(
            LIVENESS,
            treecast_signaller::serve(listener, config, std::future::pending()),
        )
        .await
        .expect("start-up fails at once")
        .expect_err("start-up fails")
        .to_string()
    };
    let name = |p: PathBuf| p.display().to_string();

    let e = start(tls_config(&dir)).await;
    assert!(
        e.contains(&name(dir.path("cert.pem"))) && e.contains(&name(dir.path("key.pem"))),
        "{e}"
    );
    assert!(e.contains("does not belong"), "{e}");
    assert!(
        !e.contains("PRIVATE KEY"),
        "no key material in the message: {e}"
    );

    std::fs::write(dir.path("key.pem"), "not a key").unwrap();
    let e = start(tls_config(&dir)).await;
    assert!(e.contains(&name(dir.path("key.pem"))), "{e}");

    let mut missing = tls_config(&dir);
    missing.tls.cert = Some(dir.path("absent.pem"));
    let e = start(missing).await;
    assert!(e.contains(&name(dir.path("absent.pem"))), "{e}");
}

#[tokio::test]
async fn lan_mode_serves_a_self_signed_certificate_kept_across_restarts() {
    let dir = TempDir::new("self-signed");
    let mut config = test_config();
    config.tls.self_signed = true;
    config.tls.dir = dir.path("kept");
    let server = TestServer::start(config.clone()).await;
    let cert = wait_for_file(&dir.path("kept/cert.pem")).await;
    let der = CertificateDer::pem_slice_iter(cert.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let client = client_trusting(der.clone());
    assert_eq!(served_certificate(server.addr, &client).await, der.to_vec());
    let (status, _) = https(server.addr, &client, "GET", "/healthz").await;
    assert_eq!(status, 200);
    server.shutdown().await.unwrap();

    let again = TestServer::start(config).await;
    assert_eq!(
        served_certificate(again.addr, &client).await,
        der.to_vec(),
        "the same certificate after a restart"
    );
}

/// Reads a file once the server has written it.
async fn wait_for_file(path: &Path) -> String {
    let deadline = tokio::time::Instant::now() + LIVENESS;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.contains("END CERTIFICATE") {
                return text;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_reload_request_rereads_the_files_at_once() {
    let dir = TempDir::new("trigger");
    let ca = TestCa::new();
    let client = ca.client();
    install(&dir, &ca.leaf());
    let mut config = tls_config(&dir);
    // The file poll would not notice within the test: only the trigger (SIGHUP in the
    // binary) can explain the new certificate.
    config.tls.reload_interval = Duration::from_secs(3600);
    let reload = TlsReload::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(treecast_signaller::serve_with(
        listener,
        config,
        async {
            let _ = stopped.await;
        },
        treecast_signaller::Extras {
            tls_reload: reload.clone(),
            ..Default::default()
        },
    ));

    let next = ca.leaf();
    install(&dir, &next);
    reload.trigger();
    wait_for_certificate(addr, &client, &next.der).await;
    let _ = stop.send(());
    server.await.unwrap().expect("a clean shutdown");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_does_not_hold_up_others() {
    let dir = TempDir::new("silent");
    let ca = TestCa::new();
    let leaf = ca.leaf();
    install(&dir, &leaf);
    let server = TestServer::start(tls_config(&dir)).await;

    // Connected, says nothing: its handshake waits in a task of its own.
    let silent = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(
        served_certificate(server.addr, &ca.client()).await,
        leaf.der
    );
    // Served while the silent one is still waiting (not after the server gave up on it
    // and closed it, which a read would see as end of stream).
    let mut byte = [0u8; 1];
    assert!(
        matches!(silent.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the silent connection is still open and unanswered"
    );
}
