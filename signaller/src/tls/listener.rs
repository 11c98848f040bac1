//! A TLS listener for `axum::serve`: TCP accepts and TLS handshakes happen in tasks of
//! their own, and `accept` hands axum streams that finished their handshake.
//!
//! Doing the handshake inside `accept` would let one client that opens a socket and says
//! nothing stall every other client for the handshake timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::Acceptor;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};

/// A handshake not done after this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; past this the listener stops accepting until one ends
/// (the kernel's backlog holds the rest), so a flood of idle sockets cannot exhaust tasks.
const MAX_HANDSHAKES: usize = 1024;

/// How handshakes are answered.
#[derive(Clone)]
pub(crate) struct Handshakes {
    /// For every client that wants HTTP.
    normal: TlsAcceptor,
    /// With ACME: for the CA's TLS-ALPN-01 validation handshakes, which only prove control
    /// of the domain and carry no HTTP.
    acme_challenge: Option<Arc<ServerConfig>>,
}

impl Handshakes {
    /// Every handshake with `config`.
    pub(crate) fn new(config: Arc<ServerConfig>) -> Self {
        Self {
            normal: TlsAcceptor::from(config),
            acme_challenge: None,
        }
    }

    /// `config`, except for ACME validation handshakes, which get `challenge`.
    pub(crate) fn with_acme_challenge(
        config: Arc<ServerConfig>,
        challenge: Arc<ServerConfig>,
    ) -> Self {
        Self {
            normal: TlsAcceptor::from(config),
            acme_challenge: Some(challenge),
        }
    }

    /// Runs the handshake; `None` for an ACME validation that is now done.
    async fn accept(&self, tcp: TcpStream) -> std::io::Result<Option<TlsStream<TcpStream>>> {
        let Some(challenge) = &self.acme_challenge else {
            return self.normal.accept(tcp).await.map(Some);
        };
        // The ClientHello decides which configuration answers.
        let start = LazyConfigAcceptor::new(Acceptor::default(), tcp).await?;
        if rustls_acme::is_tls_alpn_challenge(&start.client_hello()) {
            start.into_stream(Arc::clone(challenge)).await?;
            return Ok(None);
        }
        start
            .into_stream(Arc::clone(self.normal.config()))
            .await
            .map(Some)
    }
}

impl std::fmt::Debug for Handshakes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshakes")
            .field("acme", &self.acme_challenge.is_some())
            .finish_non_exhaustive()
    }
}

/// Accepts TCP connections and hands out TLS streams.
#[derive(Debug)]
pub(crate) struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
    /// The accept loop; aborted (closing the TCP listener) when axum drops this listener
    /// at shutdown.
    accepting: JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `listener` with `acceptor`'s configuration.
    pub(crate) fn new(listener: TcpListener, handshakes: Handshakes) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let accepting = tokio::spawn(accept_loop(listener, handshakes, tx));
        Ok(Self {
            ready,
            local_addr,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

async fn accept_loop(
    listener: TcpListener,
    handshakes: Handshakes,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (tcp, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::error!("accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let handshakes = handshakes.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshakes.accept(tcp)).await {
                Ok(Ok(Some(tls))) => {
                    let _ = ready.send((tls, addr)).await;
                }
                Ok(Ok(None)) => tracing::info!("answered an ACME validation from {addr}"),
                // Browsers that do not trust the certificate yet, port scanners, plain
                // HTTP sent to the TLS port: the client's business, not worth more than debug.
                Ok(Err(e)) => tracing::debug!("TLS handshake with {addr} failed: {e}"),
                Err(_) => tracing::debug!("TLS handshake with {addr} timed out"),
            }
        });
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}
