//! ACME end to end against a local test CA: Debian's `pebble` (an ACME server) and
//! `pebble-challtestsrv` (a DNS server that answers 127.0.0.1 for every name), so pebble
//! really validates the TLS-ALPN-01 challenge by connecting to the signaller's port.
//!
//! The test installs nothing. It needs `/usr/bin/pebble` and `/usr/bin/pebble-challtestsrv`
//! (the `pebble` package, which `scripts/test` installs) or their paths in `TREECAST_PEBBLE`
//! and `TREECAST_PEBBLE_CHALLTESTSRV`. Without them it says so and passes, unless
//! `TREECAST_REQUIRE_PEBBLE` is set (as `scripts/test` does), in which case it fails.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::test_config;
use common::tls::{TempDir, TestCa, client_trusting, connect, connect_to, https, https_to};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::oneshot;

/// The name the certificate is ordered for; challtestsrv resolves it to 127.0.0.1.
const DOMAIN: &str = "live.treecast.test";
/// Ordering involves several round trips and pebble's validation retries: generous.
const ISSUANCE: Duration = Duration::from_secs(120);

/// A child process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn binary(env: &str, default: &str) -> Option<PathBuf> {
    let path = std::env::var_os(env).map_or_else(|| PathBuf::from(default), PathBuf::from);
    path.is_file().then_some(path)
}

/// A port nobody listens on right now (pebble and challtestsrv take ports as numbers).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(program: &PathBuf, args: &[&str], dir: &TempDir, log: &str) -> Running {
    let log = std::fs::File::create(dir.path(log)).unwrap();
    let child = Command::new(program)
        .args(args)
        .current_dir(&dir.0)
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    Running(child)
}

/// Retries `attempt` until it returns `Some`, for at most `limit`.
async fn eventually<T, F: Future<Output = Option<T>>>(
    limit: Duration,
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(done) = attempt().await {
            return done;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_certificate_is_ordered_from_an_acme_ca_validated_and_cached() {
    let (Some(pebble), Some(challtestsrv)) = (
        binary("TREECAST_PEBBLE", "/usr/bin/pebble"),
        binary(
            "TREECAST_PEBBLE_CHALLTESTSRV",
            "/usr/bin/pebble-challtestsrv",
        ),
    ) else {
        assert!(
            std::env::var_os("TREECAST_REQUIRE_PEBBLE").is_none(),
            "pebble is required (TREECAST_REQUIRE_PEBBLE) but /usr/bin/pebble or \
             /usr/bin/pebble-challtestsrv is missing: apt-get install pebble"
        );
        eprintln!("skipped: Debian's pebble is not installed (scripts/test installs it)");
        return;
    };
    let dir = TempDir::new("acme");

    // The signaller's port must be known before pebble starts: pebble validates
    // TLS-ALPN-01 by connecting to it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();

    // pebble serves its directory over HTTPS with a certificate from our test CA.
    let ca = TestCa::new();
    let pebble_tls = ca.leaf();
    std::fs::write(dir.path("pebble-cert.pem"), &pebble_tls.cert_pem).unwrap();
    std::fs::write(dir.path("pebble-key.pem"), &pebble_tls.key_pem).unwrap();
    std::fs::write(dir.path("test-ca.pem"), ca.0.pem()).unwrap();
    let (acme_port, management_port, dns_port) = (free_port(), free_port(), free_port());
    let pebble_config = serde_json::json!({"pebble": {
        "listenAddress": format!("127.0.0.1:{acme_port}"),
        "managementListenAddress": format!("127.0.0.1:{management_port}"),
        "certificate": "pebble-cert.pem",
        "privateKey": "pebble-key.pem",
        "httpPort": free_port(),
        "tlsPort": server_addr.port(),
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false,
    }});
    std::fs::write(dir.path("pebble.json"), pebble_config.to_string()).unwrap();
    let dns = format!("127.0.0.1:{dns_port}");
    let management = format!("127.0.0.1:{}", free_port());
    let _challtestsrv = spawn(
        &challtestsrv,
        &[
            "-dns01",
            &dns,
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            &management,
            "-defaultIPv6",
            "",
        ],
        &dir,
        "challtestsrv.log",
    );
    let pebble_process = spawn(
        &pebble,
        &["-config", "pebble.json", "-dnsserver", &dns],
        &dir,
        "pebble.log",
    );
    let ca_client = ca.client();
    let acme_addr = SocketAddr::from(([127, 0, 0, 1], acme_port));
    eventually(common::LIVENESS, "pebble starting", || async {
        connect(acme_addr, &ca_client).await.ok().map(drop)
    })
    .await;

    let mut config = test_config();
    config.tls.acme_domains = vec![DOMAIN.to_owned()];
    config.tls.acme_cache = Some(dir.path("acme-cache"));
    config.tls.acme_directory = format!("https://localhost:{acme_port}/dir");
    config.tls.acme_directory_ca = Some(dir.path("test-ca.pem"));
    config.tls.acme_contact = vec!["mailto:ops@treecast.test".to_owned()];
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(treecast_signaller::serve(listener, config.clone(), async {
        let _ = stopped.await;
    }));

    // Certificates pebble issues chain to a root it makes up at start.
    let management_addr = SocketAddr::from(([127, 0, 0, 1], management_port));
    let (status, root) = https(management_addr, &ca_client, "GET", "/roots/0").await;
    assert_eq!(status, 200, "{root}");
    let root = CertificateDer::from_pem_slice(root.as_bytes()).expect("pebble's root in PEM");
    let trusts_pebble = client_trusting(root);

    let served = eventually(ISSUANCE, "issuing the certificate", || async {
        let tls = connect_to(server_addr, &trusts_pebble, DOMAIN).await.ok()?;
        Some(tls.get_ref().1.peer_certificates()?[0].to_vec())
    })
    .await;
    let (status, _) = https_to(server_addr, &trusts_pebble, DOMAIN, "GET", "/healthz").await;
    assert_eq!(status, 200);
    let log = std::fs::read_to_string(dir.path("pebble.log")).unwrap();
    assert!(
        log.contains("set VALID by completed challenge"),
        "pebble validated the challenge itself:\n{log}"
    );

    let _ = stop.send(());
    server.await.unwrap().expect("a clean shutdown");

    // With the CA gone, a restart serves the cached certificate.
    drop(pebble_process);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let again = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(treecast_signaller::serve(listener, config, async {
        let _ = stopped.await;
    }));
    let cached = eventually(
        common::LIVENESS,
        "loading the cached certificate",
        || async {
            let tls = connect_to(again, &trusts_pebble, DOMAIN).await.ok()?;
            Some(tls.get_ref().1.peer_certificates()?[0].to_vec())
        },
    )
    .await;
    assert_eq!(cached, served, "the cached certificate, not a new one");
    let _ = stop.send(());
    server.await.unwrap().expect("a clean shutdown");
}
