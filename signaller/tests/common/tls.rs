//! TLS helpers for the end-to-end tests: temporary directories, a test CA that issues
//! server certificates, and clients that trust only the CAs they are given.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::LIVENESS;

/// A directory of its own under the system's temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("treecast-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test certificate authority.
pub struct TestCa(pub CertifiedIssuer<'static, KeyPair>);

/// A server certificate: PEM files' contents and the DER a client sees.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new() -> Self {
        // Distinct names, so a client never mistakes one test CA for another.
        static SERIAL: AtomicU32 = AtomicU32::new(0);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            format!(
                "treecast test CA {}",
                SERIAL.fetch_add(1, Ordering::Relaxed)
            ),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Self(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    /// A certificate for `localhost` and 127.0.0.1 with a fresh key.
    pub fn leaf(&self) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.0).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// A client configuration that trusts this CA and nothing else.
    pub fn client(&self) -> TlsConnector {
        client_trusting(self.0.der().clone())
    }
}

pub fn client_trusting(root: CertificateDer<'static>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// Opens a TLS connection to `addr` as `localhost`.
pub async fn connect(
    addr: SocketAddr,
    client: &TlsConnector,
) -> std::io::Result<TlsStream<TcpStream>> {
    connect_to(addr, client, "localhost").await
}

/// Opens a TLS connection to `addr`, asking for the server `name`.
pub async fn connect_to(
    addr: SocketAddr,
    client: &TlsConnector,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_owned()).unwrap();
    tokio::time::timeout(LIVENESS, client.connect(name, tcp))
        .await
        .expect("the TLS handshake ends in time")
}

/// One HTTPS request to `localhost`; returns status and body.
pub async fn https(
    addr: SocketAddr,
    client: &TlsConnector,
    method: &str,
    path: &str,
) -> (u16, String) {
    https_to(addr, client, "localhost", method, path).await
}

/// One HTTPS request to the server `name` at `addr`; returns status and body.
pub async fn https_to(
    addr: SocketAddr,
    client: &TlsConnector,
    name: &str,
    method: &str,
    path: &str,
) -> (u16, String) {
    let tls = connect_to(addr, client, name)
        .await
        .expect("the TLS handshake succeeds");
    let exchange = async {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        let driver = tokio::spawn(connection);
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, name)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        driver.abort();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(LIVENESS, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer in time"))
}
