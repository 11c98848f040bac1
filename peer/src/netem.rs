//! Link-delay emulation for the peer's media sockets.
//!
//! Tests of how latency accumulates down the tree need links slower than loopback. The usual
//! tool, the kernel's `netem` qdisc, is not available on every kernel (the CI machines' kernel
//! has no `sch_netem`), so the delay is added one layer up instead: [`DelayedRuntime`] wraps
//! the webrtc crate's tokio runtime and holds every outgoing UDP datagram of a peer
//! connection for a fixed time before it reaches the kernel. ICE, DTLS and SRTP all run over
//! it unchanged, exactly as they would over a link with that one-way delay.
//!
//! Like netem, the delay line has a packet limit: beyond it datagrams are dropped (a router
//! queue overflowing is loss, not an error). Datagrams leave in order, since every one
//! waits the same time.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use webrtc::runtime::{
    AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, EcnCodepoint, JoinHandle,
    RecvMeta, Runtime, TokioRuntime, Transmit,
};

/// Datagrams held per socket before the delay line drops (netem's default limit).
pub const DEFAULT_LIMIT: usize = 1000;

/// A tokio runtime whose UDP sockets delay every datagram they send by a fixed time.
#[derive(Debug)]
pub struct DelayedRuntime {
    inner: TokioRuntime,
    delay: Duration,
    limit: usize,
    dropped: Arc<AtomicU64>,
}

impl DelayedRuntime {
    /// Sockets made by this runtime add `delay` to everything they send.
    pub fn new(delay: Duration) -> Self {
        Self {
            inner: TokioRuntime,
            delay,
            limit: DEFAULT_LIMIT,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Datagrams dropped because a delay line was full, over all sockets of this runtime.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

struct Held {
    due: Instant,
    destination: SocketAddr,
    ecn: Option<EcnCodepoint>,
    src_ip: Option<IpAddr>,
    contents: Vec<u8>,
}

/// The delaying socket: sends are queued here, a task hands them to the real socket when due.
struct DelayedUdpSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    delay: Duration,
    line: mpsc::Sender<Held>,
    dropped: Arc<AtomicU64>,
}

impl fmt::Debug for DelayedUdpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DelayedUdpSocket")
            .field("inner", &self.inner)
            .field("delay", &self.delay)
            .finish()
    }
}

async fn drain(inner: Arc<dyn AsyncUdpSocket>, mut line: mpsc::Receiver<Held>) {
    while let Some(held) = line.recv().await {
        tokio::time::sleep_until(held.due).await;
        let transmit = Transmit {
            destination: held.destination,
            ecn: held.ecn,
            contents: &held.contents,
            segment_size: None,
            src_ip: held.src_ip,
        };
        let sent = std::future::poll_fn(|cx| inner.poll_send(cx, &transmit)).await;
        if let Err(e) = sent {
            // UDP send errors (e.g. an unreachable port) are what a real link loses too.
            tracing::trace!(error = %e, "delayed datagram not sent");
        }
    }
}

impl AsyncUdpSocket for DelayedUdpSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn poll_send(&self, _cx: &mut Context<'_>, transmit: &Transmit<'_>) -> Poll<io::Result<usize>> {
        // Segmentation offload is not advertised (max_gso_segments is 1), so one transmit is
        // one datagram.
        let held = Held {
            due: Instant::now() + self.delay,
            destination: transmit.destination,
            ecn: transmit.ecn,
            src_ip: transmit.src_ip,
            contents: transmit.contents.to_vec(),
        };
        if self.line.try_send(held).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(Ok(transmit.contents.len()))
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn max_gro_segments(&self) -> usize {
        self.inner.max_gro_segments()
    }
}

impl Runtime for DelayedRuntime {
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        self.inner.spawn(future)
    }

    fn spawn_reactor(
        &self,
        reactor_pool_size: usize,
        future: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Box<dyn JoinHandle> {
        self.inner.spawn_reactor(reactor_pool_size, future)
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let inner = self.inner.wrap_udp_socket(socket)?;
        let (line, queued) = mpsc::channel(self.limit);
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| io::Error::other(format!("delayed socket outside tokio: {e}")))?;
        // The task ends when the socket (the only sender) is dropped.
        handle.spawn(drain(inner.clone(), queued));
        Ok(Arc::new(DelayedUdpSocket {
            inner,
            delay: self.delay,
            line,
            dropped: self.dropped.clone(),
        }))
    }

    fn wrap_tcp_listener(
        &self,
        listener: std::net::TcpListener,
    ) -> io::Result<Arc<dyn AsyncTcpListener>> {
        self.inner.wrap_tcp_listener(listener)
    }

    fn connect_tcp<'a>(
        &'a self,
        remote_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<Arc<dyn AsyncTcpStream>>> + Send + 'a>> {
        self.inner.connect_tcp(remote_addr)
    }

    fn resolve_host<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        self.inner.resolve_host(host)
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.sleep(duration)
    }

    fn interval(&self, period: Duration) -> Box<dyn AsyncInterval> {
        self.inner.interval(period)
    }

    fn block_on(&self, future: Pin<Box<dyn Future<Output = ()> + '_>>) {
        self.inner.block_on(future)
    }

    fn yield_now(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.yield_now()
    }

    fn name(&self) -> &'static str {
        "tokio+delay"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn datagrams_arrive_after_the_delay_and_in_order() {
        let rt = DelayedRuntime::new(Duration::from_millis(40));
        let tx = rt
            .wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .unwrap();
        let rx = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        let start = std::time::Instant::now();
        for i in 0u8..5 {
            tx.send_to(&[i], to).await.unwrap();
        }
        let mut buf = [0u8; 8];
        for i in 0u8..5 {
            let (n, _) = rx.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], &[i]);
        }
        // A lower bound only: the delay line must never deliver early.
        assert!(start.elapsed() >= Duration::from_millis(40));
        assert_eq!(rt.dropped(), 0);
    }

    #[tokio::test]
    async fn a_full_line_drops_instead_of_blocking() {
        let mut rt = DelayedRuntime::new(Duration::from_secs(3600));
        rt.limit = 4;
        let tx = rt
            .wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .unwrap();
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for _ in 0..10 {
            assert_eq!(tx.send_to(b"x", to).await.unwrap(), 1);
        }
        // The drain task holds one datagram while it sleeps, so 4 or 5 are queued.
        assert!((5..=6).contains(&rt.dropped()), "{}", rt.dropped());
    }
}
