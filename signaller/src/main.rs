//! `treecast-signaller`: runs the signalling server.
//!
//! Settings come from, highest first: command-line flags, `TREECAST_*` environment
//! variables, the TOML file given with `--config`, and built-in defaults. With none of them
//! it serves on <http://127.0.0.1:8080>; use `--bind 0.0.0.0:8080` to accept other hosts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use treecast_core::protocol::IceServer;
use treecast_signaller::{Config, ServerError};

mod turn_flags;

/// treecast signalling server: rooms, relay-tree placement over WebSocket, HTTP API,
/// metrics and the web pages.
///
/// Durations are in milliseconds. Every flag can also be set with the environment variable
/// shown, or in the TOML file given with --config (flags win over the environment, which
/// wins over the file).
#[derive(Debug, Parser)]
#[command(name = "treecast-signaller", version)]
struct Args {
    /// TOML configuration file (keys as in the `Config` struct: `bind`, `web_dir`, `[room]`,
    /// `[room.turn]`, `[limits]`, `[turn_server]`).
    #[arg(long, env = "TREECAST_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Address to listen on [default: 127.0.0.1:8080; use 0.0.0.0:8080 for every interface].
    #[arg(long, env = "TREECAST_BIND", value_name = "ADDR")]
    bind: Option<SocketAddr>,

    /// Log filter, e.g. `info` or `treecast_signaller=debug` [default: RUST_LOG, else
    /// `info,turn=off`: the embedded TURN engine's own messages are off].
    #[arg(long, env = "TREECAST_LOG", value_name = "FILTER")]
    log: Option<String>,

    /// Serve the web pages from this directory instead of the built-in copies.
    #[arg(long, env = "TREECAST_WEB_DIR", value_name = "DIR")]
    web_dir: Option<PathBuf>,

    /// Most children the broadcaster feeds.
    #[arg(long, env = "TREECAST_ROOT_FANOUT", value_name = "N")]
    root_fanout: Option<u32>,

    /// Most children a relaying viewer feeds.
    #[arg(long, env = "TREECAST_RELAY_FANOUT", value_name = "N")]
    relay_fanout: Option<u32>,

    /// Deepest position in the tree (broadcaster = 0); deeper viewers wait for a slot.
    #[arg(long, env = "TREECAST_MAX_DEPTH", value_name = "N")]
    max_depth: Option<u32>,

    /// Stream bitrate in kbit/s: one child costs a relay this much uplink.
    #[arg(long, env = "TREECAST_STREAM_KBPS", value_name = "KBPS")]
    stream_kbps: Option<u32>,

    /// How often clients must show a sign of life; also the WebSocket ping interval.
    #[arg(long, env = "TREECAST_HEARTBEAT_INTERVAL_MS", value_name = "MS")]
    heartbeat_interval_ms: Option<u64>,

    /// A silent peer is disconnected after this long (0: never).
    #[arg(long, env = "TREECAST_HEARTBEAT_TIMEOUT_MS", value_name = "MS")]
    heartbeat_timeout_ms: Option<u64>,

    /// How long a dropped peer keeps its place and may resume.
    #[arg(long, env = "TREECAST_RESUME_GRACE_MS", value_name = "MS")]
    resume_grace_ms: Option<u64>,

    /// A STUN/TURN URL handed to clients (repeat for several; replaces the configured list).
    #[arg(
        long = "ice-server",
        env = "TREECAST_ICE_SERVERS",
        value_name = "URL",
        value_delimiter = ','
    )]
    ice_servers: Vec<String>,

    /// Most rooms on this server.
    #[arg(long, env = "TREECAST_MAX_ROOMS", value_name = "N")]
    max_rooms: Option<usize>,

    /// Most viewers in one room (the broadcaster always gets in).
    #[arg(long, env = "TREECAST_MAX_PEERS", value_name = "N")]
    max_peers: Option<u32>,

    /// Largest accepted message in bytes (larger ones get `too_large`).
    #[arg(long, env = "TREECAST_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    max_message_bytes: Option<u32>,

    /// Messages per second a peer may send (bursts up to --message-burst).
    #[arg(long, env = "TREECAST_MESSAGES_PER_SECOND", value_name = "N")]
    messages_per_second: Option<u32>,

    /// Burst of messages a peer may send above the rate.
    #[arg(long, env = "TREECAST_MESSAGE_BURST", value_name = "N")]
    message_burst: Option<u32>,

    /// Most simultaneous WebSockets from one IP address.
    #[arg(long, env = "TREECAST_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    max_connections_per_ip: Option<u32>,

    /// A connection must send `hello` within this long.
    #[arg(long, env = "TREECAST_HELLO_TIMEOUT_MS", value_name = "MS")]
    hello_timeout_ms: Option<u64>,

    #[command(flatten, next_help_heading = "TURN")]
    turn: turn_flags::TurnArgs,
}

impl Args {
    /// The file (or defaults), with the flags and environment laid over it.
    fn into_config(self) -> Result<Config, ServerError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        let ms = Duration::from_millis;
        let set = |slot: &mut u32, v: Option<u32>| {
            if let Some(v) = v {
                *slot = v;
            }
        };
        if let Some(bind) = self.bind {
            config.bind = bind;
        }
        if self.web_dir.is_some() {
            config.web_dir = self.web_dir;
        }
        let room = &mut config.room;
        set(&mut room.root_fanout, self.root_fanout);
        set(&mut room.relay_fanout, self.relay_fanout);
        set(&mut room.max_depth, self.max_depth);
        set(&mut room.stream_kbps, self.stream_kbps);
        set(&mut room.max_peers, self.max_peers);
        set(&mut room.max_message_bytes, self.max_message_bytes);
        set(&mut room.messages_per_second, self.messages_per_second);
        if let Some(v) = self.heartbeat_interval_ms {
            room.heartbeat_interval = ms(v);
        }
        if let Some(v) = self.heartbeat_timeout_ms {
            room.heartbeat_timeout = (v > 0).then(|| ms(v));
        }
        if let Some(v) = self.resume_grace_ms {
            room.resume_grace = ms(v);
        }
        if !self.ice_servers.is_empty() {
            room.ice_servers = self
                .ice_servers
                .into_iter()
                .map(|url| IceServer {
                    urls: vec![url],
                    username: None,
                    credential: None,
                })
                .collect();
        }
        let limits = &mut config.limits;
        if let Some(v) = self.max_rooms {
            limits.max_rooms = v;
        }
        set(&mut limits.message_burst, self.message_burst);
        set(
            &mut limits.max_connections_per_ip,
            self.max_connections_per_ip,
        );
        if let Some(v) = self.hello_timeout_ms {
            limits.hello_timeout = ms(v);
        }
        let secret = std::env::var(turn_flags::SECRET_ENV).ok();
        self.turn.apply(&mut config, secret)?;
        config.validate()?;
        Ok(config)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = args
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        // The TURN engine logs a line for every datagram that reaches a relay port without a
        // permission, and an error for every send to a client that went away: anyone on
        // the internet could flood the log with them. The metrics count what matters.
        .unwrap_or_else(|| "info,turn=off".to_owned());
    let filter = match EnvFilter::try_new(&filter) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("treecast-signaller: invalid log filter \"{filter}\": {e}");
            return ExitCode::from(2);
        }
    };
    // Colour codes only on a terminal: not in files, pipes or the journal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .init();
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("treecast-signaller: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("treecast-signaller: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("treecast-signaller: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), ServerError> {
    let listener = treecast_signaller::bind(config.bind).await?;
    treecast_signaller::serve(listener, config, shutdown_signal()).await
}

/// Completes on Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
