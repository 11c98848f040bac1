//! The server: shared state, routes, and the shutdown sequence.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use treecast_core::protocol::EndReason;

use crate::config::{Config, ConfigError};
use crate::pages::Pages;
use crate::room_task::RoomCommand;
use crate::rooms::Rooms;
use crate::{api, connection, pages, telemetry, uplink};

/// Why the server could not start or stopped on a fault.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listening address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The embedded TURN server could not start.
    #[error(transparent)]
    Turn(#[from] crate::turn_server::TurnServerError),
    /// Accepting or serving connections failed.
    #[error("the server stopped on an I/O error: {0}")]
    Serve(#[source] std::io::Error),
}

/// Binds a listener on `addr` (a convenience for binaries).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// State shared by every handler and task of one server.
#[derive(Debug)]
pub(crate) struct ServerState {
    /// The configuration the server was started with.
    pub config: Config,
    /// The rooms.
    pub rooms: Rooms,
    /// The rooms' clock starts here: a room's `now` is the time elapsed since.
    pub start: Instant,
    /// Unix time at `start`, for TURN credential expiry times.
    pub start_unix: Duration,
    /// Live WebSockets per client address.
    pub ip_slots: Arc<IpSlots>,
    /// Turns `true` when the server begins shutting down.
    pub shutdown: watch::Sender<bool>,
    /// Room and connection tasks the shutdown waits for.
    pub tasks: Arc<TaskCount>,
    /// The Prometheus recorder, if this process has one.
    pub metrics: Option<PrometheusHandle>,
    /// The web pages.
    pub pages: Pages,
}

impl ServerState {
    /// Time on the rooms' clock.
    pub(crate) fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Whether the server is shutting down.
    pub(crate) fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// Counts live WebSockets per client address.
#[derive(Debug, Default)]
pub(crate) struct IpSlots {
    counts: Mutex<HashMap<IpAddr, u32>>,
}

/// One live WebSocket of an address; frees its slot when dropped.
#[derive(Debug)]
pub(crate) struct IpSlot {
    slots: Arc<IpSlots>,
    ip: IpAddr,
}

impl IpSlots {
    /// Takes a slot for `ip`, unless it already has `max`.
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<IpSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            slots: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self
            .slots
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Counts the tasks a shutdown waits for.
#[derive(Debug, Default)]
pub(crate) struct TaskCount {
    live: AtomicUsize,
    idle: Notify,
}

/// One counted task; uncounted when dropped.
#[derive(Debug)]
pub(crate) struct TaskGuard(Arc<TaskCount>);

impl TaskCount {
    /// Counts a task until the guard drops.
    pub(crate) fn enter(self: &Arc<Self>) -> TaskGuard {
        self.live.fetch_add(1, Ordering::SeqCst);
        TaskGuard(Arc::clone(self))
    }

    /// Waits until no counted task is left.
    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.live.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Runs the signaller on `listener` until `shutdown` completes.
///
/// On shutdown, new connections are refused, every room ends with
/// [`EndReason::Shutdown`] (its peers get `ended`, then their sockets close), and the call
/// returns once every room and connection task is done, or after
/// [`crate::Limits::shutdown_grace`]. The embedded TURN server, if configured, runs as long
/// as the HTTP server.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    config.validate()?;
    let mut config = config;
    let embedded_turn = crate::turn_server::start_configured(&mut config, &listener).await?;
    let grace = config.limits.shutdown_grace;
    let state = Arc::new(ServerState {
        pages: Pages::new(config.web_dir.clone()),
        config,
        rooms: Rooms::default(),
        start: Instant::now(),
        start_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
        ip_slots: Arc::default(),
        shutdown: watch::Sender::new(false),
        tasks: Arc::default(),
        metrics: telemetry::install(),
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("treecast signaller listening on http://{addr}");
    }
    let upkeep = tokio::spawn(upkeep(state.metrics.clone()));

    let on_shutdown = {
        let state = Arc::clone(&state);
        async move {
            shutdown.await;
            tracing::info!("shutting down: ending rooms and closing connections");
            state.shutdown.send_replace(true);
            end_all_rooms(&state).await;
        }
    };
    let app = router(Arc::clone(&state));
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(on_shutdown)
    .await;
    upkeep.abort();
    if let Some(turn) = embedded_turn {
        turn.stop().await;
    }
    let tasks = Arc::clone(&state.tasks);
    drop(state);
    if tokio::time::timeout(grace, tasks.idle()).await.is_err() {
        tracing::warn!("some connections were still open when the shutdown grace ran out");
    }
    served.map_err(ServerError::Serve)
}

async fn end_all_rooms(state: &ServerState) {
    for room in state.rooms.handles() {
        let _ = room
            .commands
            .send(RoomCommand::End(EndReason::Shutdown))
            .await;
    }
}

/// Drains the metrics recorder's histograms now and then, even if nobody scrapes.
async fn upkeep(handle: Option<PrometheusHandle>) {
    let Some(handle) = handle else { return };
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        every.tick().await;
        handle.run_upkeep();
    }
}

fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/ws", get(connection::upgrade))
        .route("/api/rooms", get(api::list_rooms).post(api::create_room))
        .route("/api/rooms/{room}", get(api::room_snapshot))
        .route("/api/rooms/{room}/events", get(api::room_events))
        .route(
            "/api/uplink",
            axum::routing::post(uplink::probe).layer(axum::extract::DefaultBodyLimit::max(
                uplink::MAX_PROBE_BYTES,
            )),
        )
        .route("/healthz", get(api::health))
        .route("/metrics", get(api::metrics))
        .route("/", get(pages::landing))
        .route("/watch/{room}", get(pages::watch))
        .route("/watch", get(pages::watch))
        .route("/watch/", get(pages::watch))
        .route("/dashboard", get(pages::dashboard))
        .route("/assets/{*path}", get(pages::asset))
        .fallback(api::not_found)
        .with_state(state)
}
