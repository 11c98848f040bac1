//! The server: shared state, routes, and the shutdown sequence.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use axum::serve::ListenerExt;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use treecast_core::claim::ClaimKey;

use crate::cluster::bus::Node;
use treecast_core::protocol::EndReason;

use crate::access::{Access, AccessError};
use crate::config::{Config, ConfigError};
use crate::pages::Pages;
use crate::room_task::RoomCommand;
use crate::rooms::Rooms;
use crate::stun::StunSockets;
use crate::tls::{TlsError, TlsReload, listener::TlsListener};
use crate::{api, connection, pages, stun, telemetry, tls, uplink};

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
    /// A STUN port could not be bound.
    #[error(
        "cannot listen for STUN on {addr}: {source} (use --stun-port to choose another, 0 for none)"
    )]
    StunBind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The STUN port leaves no room for the alternate port after it (or is 0).
    #[error(
        "cannot use {0} as the STUN port: it must be 1 to 65534 (the next port is the alternate)"
    )]
    StunPort(u16),
    /// The STUN sockets' addresses could not be read.
    #[error("the STUN sockets are unusable: {0}")]
    StunSockets(#[source] std::io::Error),
    /// TLS could not be set up (certificate or key unusable, self-signed certificate not
    /// writable).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The embedded TURN server could not start.
    #[error(transparent)]
    Turn(#[from] crate::turn_server::TurnServerError),
    /// The operator secret could not be read or generated.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// Cluster mode could not reach Redis.
    #[error("cluster mode: {0}")]
    Cluster(#[source] crate::cluster::ClusterError),
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
    /// Who may do what.
    pub access: Access,
    /// Signs resume claims and derives rooms' broadcaster tokens and link keys.
    pub claim_key: ClaimKey,
    /// The key is configured, so it outlives this process: shutting down leaves rooms to
    /// be taken back by the next start instead of ending them.
    pub restartable: bool,
    /// This node, in cluster mode.
    pub cluster: Option<Arc<Node>>,
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
/// [`crate::Limits::shutdown_grace`].
///
/// With [`Config::tls`] set it serves HTTPS and WSS. It runs no STUN server and binds
/// nothing but `listener`; see [`serve_with`] for the STUN server and a reload trigger. The embedded TURN
/// server, if configured, runs as long as the HTTP server.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    serve_with(listener, config, shutdown, Extras::default()).await
}

/// What [`serve_with`] runs beside the HTTP server.
#[derive(Debug, Default)]
pub struct Extras {
    /// Answer STUN on these two sockets until the shutdown begins. Clients are handed this
    /// STUN server first in their ICE servers: one entry per host name clients reach the
    /// server by (see [`Config::public_host`]), each with the primary and the alternate
    /// port's URL, followed by `config.room.ice_servers`.
    pub stun: Option<StunSockets>,
    /// Every [`TlsReload::trigger`] re-reads the TLS certificate and key (the binary
    /// triggers it on SIGHUP). Without TLS the trigger does nothing.
    pub tls_reload: TlsReload,
}

/// [`serve`] with a STUN server on `stun`'s two sockets.
pub async fn serve_with_stun(
    listener: TcpListener,
    stun: StunSockets,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let extras = Extras {
        stun: Some(stun),
        ..Extras::default()
    };
    serve_with(listener, config, shutdown, extras).await
}

/// [`serve`], with the STUN server and certificate-reload trigger of `extras`.
pub async fn serve_with(
    listener: TcpListener,
    mut config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    extras: Extras,
) -> Result<(), ServerError> {
    config.validate()?;
    let stun = extras
        .stun
        .map(|sockets| stun::advertise(sockets, &mut config))
        .transpose()?;
    let local = listener.local_addr().ok();
    let access = Access::resolve(&config.access, local)?;
    let tls = match config.tls.mode()? {
        Some(mode) => Some(tls::start(mode, &config.tls, local, extras.tls_reload)?),
        None => None,
    };
    let embedded_turn = crate::turn_server::start_configured(&mut config, &listener).await?;
    let grace = config.limits.shutdown_grace;
    let restartable = config.resume_key.is_some();
    let claim_key = match &config.resume_key {
        Some(secret) => ClaimKey::from_secret(secret.expose()),
        None => {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes)
                .map_err(|e| ServerError::Serve(std::io::Error::other(e)))?;
            ClaimKey::new(bytes)
        }
    };
    let cluster = match &config.redis {
        Some(url) => Some(
            Node::start(
                url,
                config.limits.outbound_queue,
                config.room.loss_threshold,
            )
            .await
            .map_err(ServerError::Cluster)?,
        ),
        None => None,
    };
    let state = Arc::new(ServerState {
        claim_key,
        restartable,
        cluster,
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
        access,
    });
    if let Some(addr) = local {
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!("treecast signaller listening on {scheme}://{addr}");
    }
    let upkeep = tokio::spawn(upkeep(state.metrics.clone()));
    let stun_tasks = stun
        .map(|(sockets, addrs)| stun::spawn(sockets, addrs, &state.shutdown))
        .unwrap_or_default();

    let on_shutdown = {
        let state = Arc::clone(&state);
        async move {
            shutdown.await;
            state.shutdown.send_replace(true);
            if state.restartable {
                tracing::info!(
                    "shutting down: closing connections; rooms resume at the next start"
                );
            } else {
                tracing::info!("shutting down: ending rooms and closing connections");
            }
            end_all_rooms(&state).await;
        }
    };
    let app = router(Arc::clone(&state)).into_make_service_with_connect_info::<SocketAddr>();
    let served = match &tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(on_shutdown)
                .await
        }
        Some(tls) => {
            // The no-op tap only lends the listener axum's `ConnectInfo<SocketAddr>`,
            // which axum implements for tapped listeners of any kind.
            let listener = TlsListener::new(listener, tls.handshakes.clone())
                .map_err(ServerError::Serve)?
                .tap_io(|_| {});
            axum::serve(listener, app)
                .with_graceful_shutdown(on_shutdown)
                .await
        }
    };
    upkeep.abort();
    // They stop at the shutdown signal; this also closes their sockets if `axum::serve`
    // returned on an error.
    for task in stun_tasks {
        task.abort();
        let _ = task.await;
    }
    if let Some(tls) = &tls {
        tls.upkeep.abort();
    }
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

/// Ends every room, or (with a configured resume key) only lets go of its peers: they
/// reconnect to the next start with their claims, their media flowing meanwhile.
async fn end_all_rooms(state: &ServerState) {
    for room in state.rooms.handles() {
        let cmd = match state.restartable {
            true => RoomCommand::Suspend,
            false => RoomCommand::End(EndReason::Shutdown),
        };
        let _ = room.commands.send(cmd).await;
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
        .route(
            "/api/rooms",
            get(api::list_rooms)
                .post(api::create_room)
                .layer(axum::extract::DefaultBodyLimit::max(api::MAX_ROOM_BODY)),
        )
        .route("/api/qualities", get(api::qualities))
        .route(
            "/api/rooms/{room}",
            get(api::room_snapshot)
                .patch(api::tune_room)
                .layer(axum::extract::DefaultBodyLimit::max(api::MAX_ROOM_BODY)),
        )
        .route("/api/rooms/{room}/events", get(api::room_events))
        .route(
            "/api/rooms/{room}/links",
            axum::routing::post(api::create_link)
                .layer(axum::extract::DefaultBodyLimit::max(api::MAX_ROOM_BODY)),
        )
        .route("/api/access", get(api::access))
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
