//! `treecast-signaller`: runs the signalling server.
//!
//! Settings come from, highest first: command-line flags, `TREECAST_*` environment
//! variables, the TOML file given with `--config`, and built-in defaults. With none of them
//! it serves on <http://127.0.0.1:8080> and answers STUN on UDP 127.0.0.1:3478 and 3479;
//! use `--bind 0.0.0.0:8080` to accept other hosts.
//! The `--tls-*` flags serve HTTPS and WSS instead; SIGHUP re-reads the certificate.
//!
//! With `TREECAST_RESUME_KEY` (or the file's `resume_key`) set, a restart keeps every
//! room: peers reconnect with their signed claims and the rooms are rebuilt from them.
//!
//! `treecast-signaller mint-token --ttl 1h` prints a room-creation grant signed with the
//! operator secret (from `TREECAST_ADMIN_SECRET`, `[access] admin_secret`, or the secret
//! file a server generated).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use treecast_core::protocol::IceServer;
use treecast_core::turn::Secret;
use treecast_signaller::access::{self, ADMIN_SECRET_ENV};
use treecast_signaller::{
    Config, ConfigError, CreateMode, Extras, LETS_ENCRYPT_STAGING, ServerError, StunSockets,
    TlsConfig, TlsReload,
};

mod turn_flags;

/// The environment variable holding the key that signs resume claims (`resume_key`).
const RESUME_KEY_ENV: &str = "TREECAST_RESUME_KEY";

/// treecast signalling server: rooms, relay-tree placement over WebSocket, HTTP API,
/// metrics and the web pages.
///
/// Durations are in milliseconds. Every flag can also be set with the environment variable
/// shown, or in the TOML file given with --config (flags win over the environment, which
/// wins over the file).
#[derive(Debug, Parser)]
#[command(name = "treecast-signaller", version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// TOML configuration file (keys as in the `Config` struct: `bind`, `stun_port`,
    /// `stun_bind`, `public_host`, `web_dir`, `[room]`, `[room.turn]`, `[limits]`, `[tls]`,
    /// `[turn_server]`).
    #[arg(long, env = "TREECAST_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Address to listen on [default: 127.0.0.1:8080; use 0.0.0.0:8080 for every interface].
    #[arg(long, env = "TREECAST_BIND", value_name = "ADDR")]
    bind: Option<SocketAddr>,

    /// UDP port of the embedded STUN server (on --stun-bind); the next port is its
    /// alternate port (clients' NAT test), so at most 65534. 0: no STUN server
    /// [default: 3478, with 3479].
    #[arg(long, env = "TREECAST_STUN_PORT", value_name = "PORT")]
    stun_port: Option<u16>,

    /// IP address the STUN server listens on [default: the IP of --bind]. Behind a reverse
    /// proxy (--bind 127.0.0.1:8080), give the host's public address here.
    #[arg(long, env = "TREECAST_STUN_BIND", value_name = "IP")]
    stun_bind: Option<std::net::IpAddr>,

    /// Name or address clients reach this server by, used in the STUN URLs given to them
    /// [default: the bind address; for 0.0.0.0 or ::, every non-loopback interface address].
    #[arg(long, env = "TREECAST_PUBLIC_HOST", value_name = "NAME")]
    public_host: Option<String>,

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

    /// Highest stream bitrate a broadcaster may choose, kbit/s: quality presets above it
    /// are not offered (360p 500, 720p 1500, 1080p 3000).
    #[arg(long, env = "TREECAST_MAX_STREAM_KBPS", value_name = "KBPS")]
    max_stream_kbps: Option<u32>,

    /// How often clients must show a sign of life; also the WebSocket ping interval.
    #[arg(long, env = "TREECAST_HEARTBEAT_INTERVAL_MS", value_name = "MS")]
    heartbeat_interval_ms: Option<u64>,

    /// A silent peer is disconnected after this long (0: never).
    #[arg(long, env = "TREECAST_HEARTBEAT_TIMEOUT_MS", value_name = "MS")]
    heartbeat_timeout_ms: Option<u64>,

    /// How long a dropped peer keeps its place and may resume.
    #[arg(long, env = "TREECAST_RESUME_GRACE_MS", value_name = "MS")]
    resume_grace_ms: Option<u64>,

    /// A STUN/TURN URL handed to clients after the signaller's own STUN server (repeat for
    /// several; replaces the configured list). `none` empties the list.
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

    /// Cluster mode: the Redis all nodes share, e.g. redis://10.0.0.5:6379/ (needs
    /// TREECAST_RESUME_KEY, the same on every node). A URL with a password belongs in the
    /// environment variable, not on the command line.
    #[arg(long, env = "TREECAST_REDIS", value_name = "URL")]
    redis: Option<String>,

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

    #[command(
        flatten,
        next_help_heading = "TLS (HTTPS and WSS without a proxy; plain HTTP without these)"
    )]
    tls: TlsArgs,

    #[command(flatten, next_help_heading = "TURN")]
    turn: turn_flags::TurnArgs,

    /// Who may create rooms: `open` (anyone) or `token` (a grant from `mint-token`, or the
    /// operator secret) [default: open]. The operator secret itself comes from
    /// TREECAST_ADMIN_SECRET or the file's `[access] admin_secret`, never from a flag.
    #[arg(long, env = "TREECAST_ROOM_CREATION", value_name = "MODE", value_parser = parse_create_mode)]
    room_creation: Option<CreateMode>,

    /// Where a generated operator secret is written and read back
    /// [default: ./treecast-admin-secret].
    #[arg(long, env = "TREECAST_ADMIN_SECRET_FILE", value_name = "FILE")]
    admin_secret_file: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print a room-creation grant (a JWT, HS256) signed with the operator secret, for
    /// servers with `--room-creation token`. The secret comes from TREECAST_ADMIN_SECRET,
    /// the file's `[access] admin_secret`, or the server's secret file.
    MintToken {
        /// How long the grant is valid: 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = access::parse_ttl)]
        ttl: u64,
        /// Who the grant is for (shown in the server's log when used).
        #[arg(long, default_value = "operator")]
        sub: String,
    },
}

fn parse_create_mode(text: &str) -> Result<CreateMode, String> {
    match text {
        "open" => Ok(CreateMode::Open),
        "token" => Ok(CreateMode::Token),
        _ => Err(format!("{text:?}: use open or token")),
    }
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
        if let Some(url) = self.redis {
            config.redis = Some(url);
        }
        if let Some(port) = self.stun_port {
            config.stun_port = port;
        }
        if self.stun_bind.is_some() {
            config.stun_bind = self.stun_bind;
        }
        if self.public_host.is_some() {
            config.public_host = self.public_host;
        }
        if self.web_dir.is_some() {
            config.web_dir = self.web_dir;
        }
        let room = &mut config.room;
        set(&mut room.root_fanout, self.root_fanout);
        set(&mut room.relay_fanout, self.relay_fanout);
        set(&mut room.max_depth, self.max_depth);
        set(&mut room.stream_kbps, self.stream_kbps);
        set(&mut room.max_stream_kbps, self.max_stream_kbps);
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
        if self.ice_servers.iter().any(|url| url == "none") {
            // The only way to empty a list the configuration file filled.
            if self.ice_servers.len() > 1 {
                return Err(ConfigError::Invalid(
                    "--ice-server none (TREECAST_ICE_SERVERS=none) empties the list and \
                     cannot be combined with URLs"
                        .into(),
                )
                .into());
            }
            room.ice_servers = Vec::new();
        } else if !self.ice_servers.is_empty() {
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
        if let Some(mode) = self.room_creation {
            config.access.create = mode;
        }
        if let Some(file) = self.admin_secret_file {
            config.access.secret_file = file;
        }
        if let Ok(secret) = std::env::var(ADMIN_SECRET_ENV)
            && !secret.is_empty()
        {
            config.access.admin_secret = Some(Secret::new(secret));
        }
        // Like the operator secret: from the environment or the file, never a flag.
        if let Ok(key) = std::env::var(RESUME_KEY_ENV)
            && !key.is_empty()
        {
            config.resume_key = Some(Secret::new(key));
        }
        self.tls.apply(&mut config.tls);
        let secret = std::env::var(turn_flags::SECRET_ENV).ok();
        self.turn.apply(&mut config, secret)?;
        config.validate()?;
        Ok(config)
    }
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(Command::MintToken { ttl, sub }) = args.command.take() {
        // Before logging starts: stdout carries the grant and nothing else.
        return mint_token(args, ttl, &sub);
    }
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

/// `mint-token`: prints a grant valid from now for `ttl` seconds.
fn mint_token(args: Args, ttl: u64, sub: &str) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("treecast-signaller mint-token: {e}");
        ExitCode::from(2)
    };
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let secret = match config.access.admin_secret {
        Some(s) => s,
        None if config.access.secret_file.exists() => {
            match access::read_secret_file(&config.access.secret_file) {
                Ok(s) => s,
                Err(e) => return fail(&e),
            }
        }
        None => {
            return fail(&format!(
                "no operator secret: set {ADMIN_SECRET_ENV}, [access] admin_secret, or run \
                 this where the server keeps {}",
                config.access.secret_file.display()
            ));
        }
    };
    let now = access::now_unix();
    match access::mint_grant(secret.expose(), sub, now, now.saturating_add(ttl)) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

async fn run(config: Config) -> Result<(), ServerError> {
    let listener = treecast_signaller::bind(config.bind).await?;
    let stun = match config.stun_port {
        0 => None,
        port => Some(StunSockets::bind(config.stun_ip(), port).await?),
    };
    let tls_reload = TlsReload::new();
    // Only certificate files can be re-read; otherwise SIGHUP keeps its default meaning
    // (the terminal went away: stop), as before TLS existed.
    if config.tls.cert.is_some() || config.tls.self_signed {
        reload_on_sighup(tls_reload.clone());
    }
    let extras = Extras { stun, tls_reload };
    treecast_signaller::serve_with(listener, config, shutdown_signal(), extras).await
}

/// The TLS flags, grouped so they merge apart from the others.
#[derive(Debug, clap::Args)]
struct TlsArgs {
    /// PEM certificate chain to serve HTTPS and WSS with (needs --tls-key). Re-read when it
    /// changes, or on SIGHUP.
    #[arg(long, env = "TREECAST_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "TREECAST_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,

    /// For a LAN: serve HTTPS with a self-signed certificate for this machine's addresses,
    /// made once and kept in --tls-dir. Prints the links and the certificate's fingerprint.
    #[arg(long, env = "TREECAST_TLS_SELF_SIGNED")]
    tls_self_signed: bool,

    /// Where --tls-self-signed keeps its certificate and key [default: ./treecast-tls].
    #[arg(long, env = "TREECAST_TLS_DIR", value_name = "DIR")]
    tls_dir: Option<PathBuf>,

    /// Get a certificate for this domain from Let's Encrypt (repeat for several names).
    /// Needs --acme-cache and port 443 reachable from the internet.
    #[arg(
        long = "acme-domain",
        env = "TREECAST_ACME_DOMAINS",
        value_name = "DOMAIN",
        value_delimiter = ','
    )]
    acme_domains: Vec<String>,

    /// Directory for the ACME account key and certificates.
    #[arg(long, env = "TREECAST_ACME_CACHE", value_name = "DIR")]
    acme_cache: Option<PathBuf>,

    /// Contact for the ACME account, e.g. mailto:ops@example.org (repeatable).
    #[arg(
        long = "acme-contact",
        env = "TREECAST_ACME_CONTACT",
        value_name = "URL",
        value_delimiter = ','
    )]
    acme_contact: Vec<String>,

    /// ACME directory URL [default: Let's Encrypt production].
    #[arg(long, env = "TREECAST_ACME_DIRECTORY", value_name = "URL")]
    acme_directory: Option<String>,

    /// Trust only the CA in this PEM file for the ACME directory's HTTPS (a private ACME
    /// server such as step-ca or pebble).
    #[arg(long, env = "TREECAST_ACME_DIRECTORY_CA", value_name = "FILE")]
    acme_directory_ca: Option<PathBuf>,

    /// Use Let's Encrypt's staging directory (untrusted certificates, for trying things out).
    #[arg(long, env = "TREECAST_ACME_STAGING", conflicts_with = "acme_directory")]
    acme_staging: bool,
}

impl TlsArgs {
    /// Lays the flags and environment over the file's `[tls]` section.
    fn apply(self, tls: &mut TlsConfig) {
        if self.tls_cert.is_some() {
            tls.cert = self.tls_cert;
        }
        if self.tls_key.is_some() {
            tls.key = self.tls_key;
        }
        if self.tls_self_signed {
            tls.self_signed = true;
        }
        if let Some(dir) = self.tls_dir {
            tls.dir = dir;
        }
        if !self.acme_domains.is_empty() {
            tls.acme_domains = self.acme_domains;
        }
        if self.acme_cache.is_some() {
            tls.acme_cache = self.acme_cache;
        }
        if !self.acme_contact.is_empty() {
            tls.acme_contact = self.acme_contact;
        }
        if let Some(url) = self.acme_directory {
            tls.acme_directory = url;
        }
        if self.acme_directory_ca.is_some() {
            tls.acme_directory_ca = self.acme_directory_ca;
        }
        if self.acme_staging {
            tls.acme_directory = LETS_ENCRYPT_STAGING.to_owned();
        }
    }
}

/// Re-reads the TLS certificate on every SIGHUP (Unix only).
fn reload_on_sighup(reload: TlsReload) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP: {e}");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the TLS certificate");
            reload.trigger();
        }
    });
    #[cfg(not(unix))]
    let _ = reload;
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
