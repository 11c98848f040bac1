//! Server configuration: one struct with defaults, read from TOML by the binary.
//!
//! Only binaries read files, flags or the environment; the library takes a [`Config`].
//! Durations are written in milliseconds, like [`RoomConfig`]'s.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use treecast_core::room::RoomConfig;
use treecast_core::turn::Secret;

use crate::access::AccessConfig;
use crate::tls::TlsConfig;
use crate::turn_server::{self, TurnServerConfig};

/// Everything the signaller needs to run.
///
/// A TOML file maps onto it directly; every key is optional:
///
/// ```toml
/// bind = "0.0.0.0:8080"
/// stun_port = 3478                # and 3479; 0: no STUN server
/// stun_bind = "203.0.113.5"       # unset: the IP of `bind`
/// public_host = "live.example.org"
///
/// [room]
/// root_fanout = 4
/// relay_fanout = 3
/// resume_grace = 10000   # milliseconds
///
/// [limits]
/// max_rooms = 100
/// max_connections_per_ip = 64
///
/// [tls]
/// self_signed = true
///
/// [access]
/// create = "token"    # "open": anyone may create rooms
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the binary listens on. Tests pass their own listener to [`crate::serve`]
    /// and ignore this.
    pub bind: SocketAddr,
    /// UDP port of the embedded STUN server (on `stun_bind`); it also uses the next
    /// port (RFC 5780's alternate port, for clients' NAT mapping test). 0: no STUN server.
    /// Only the binary binds it: [`crate::serve`] runs no STUN server and
    /// [`crate::serve_with_stun`] takes sockets bound by the caller.
    pub stun_port: u16,
    /// IP address the STUN server listens on. Absent: the IP of `bind`. Set it when the
    /// HTTP side listens on loopback behind a reverse proxy: UDP does not pass the proxy.
    pub stun_bind: Option<IpAddr>,
    /// The name or address clients reach this server by, used in the STUN URLs handed to
    /// them. Absent: the bind address, or every non-loopback interface address when the
    /// bind address is a wildcard (`0.0.0.0`, `::`).
    pub public_host: Option<String>,
    /// Serve the web pages from this directory instead of the copies built into the
    /// binary (for working on the pages without rebuilding).
    pub web_dir: Option<PathBuf>,
    /// Settings of every room: fan-out, depth, heartbeats, resume grace, ICE servers, and
    /// the per-peer message size and rate that the connections enforce.
    pub room: RoomConfig,
    /// Limits that protect the server as a whole.
    pub limits: Limits,
    /// Serving HTTPS and WSS directly; plain HTTP when empty.
    pub tls: TlsConfig,
    /// The embedded TURN server, if wanted (`[turn_server]`); it checks the credentials
    /// of `room.turn` and its URL is added to theirs.
    pub turn_server: Option<TurnServerConfig>,
    /// Operator credentials and who may create rooms (`[access]`).
    pub access: AccessConfig,
    /// Signs the claims peers hold to their place in a room, and derives each room's
    /// broadcaster token. With it set (32 characters or more, the same on every start), a
    /// restarted server takes its rooms back from the claims its peers present, and no
    /// media stops; unset, each start picks a random key and a restart ends every room.
    pub resume_key: Option<Secret>,
    /// Cluster mode: the Redis every node of the cluster shares (`redis://host:port/`).
    /// Unset (the default): one process holds every room in memory.
    pub redis: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            stun_port: 3478,
            stun_bind: None,
            public_host: None,
            web_dir: None,
            room: RoomConfig::default(),
            limits: Limits::default(),
            tls: TlsConfig::default(),
            turn_server: None,
            access: AccessConfig::default(),
            resume_key: None,
            redis: None,
        }
    }
}

/// Server-wide limits. Per-peer message size and rate live in [`RoomConfig`]
/// (`max_message_bytes`, `messages_per_second`) because clients are told them in `welcome`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most rooms at once, ended rooms still kept for late visitors included. Creating one
    /// more answers 503 `too_many_rooms`.
    pub max_rooms: usize,
    /// Rooms one IP address may create per minute, after a burst of
    /// `room_creation_burst`; more answer 429 `rate_limited`. Keeps one client from using
    /// up `max_rooms` with anonymous requests.
    pub room_creations_per_minute: u32,
    /// Rooms one IP address may create at once before the per-minute rate applies.
    pub room_creation_burst: u32,
    /// Most simultaneous WebSockets from one IP address. Counted per address, so a whole
    /// office behind one NAT shares it.
    pub max_connections_per_ip: u32,
    /// Hard cap on one WebSocket frame or message, in bytes. Frames between
    /// `room.max_message_bytes` and this are answered with `too_large` and the socket stays
    /// open; anything larger closes the socket before it is buffered. Absent: four times
    /// `room.max_message_bytes`, at least 64 KiB.
    pub max_frame_bytes: Option<u32>,
    /// Messages a connection may send in a burst above `room.messages_per_second`.
    pub message_burst: u32,
    /// A connection that has not sent `hello` after this long gets `timeout` and is closed
    /// (milliseconds). After `hello`, the room's heartbeat timeout applies.
    #[serde(with = "millis")]
    pub hello_timeout: Duration,
    /// Messages queued for one connection before it counts as a slow consumer and is closed.
    pub outbound_queue: usize,
    /// Commands queued for one room task before senders wait.
    pub room_queue: usize,
    /// How long an ended room is kept so late visitors learn it ended (milliseconds).
    #[serde(with = "millis")]
    pub ended_room_ttl: Duration,
    /// On shutdown, how long to wait for rooms to tell their peers and sockets to close
    /// (milliseconds).
    #[serde(with = "millis")]
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_rooms: 1_000,
            room_creations_per_minute: 6,
            room_creation_burst: 10,
            max_connections_per_ip: 256,
            max_frame_bytes: None,
            message_burst: 100,
            hello_timeout: Duration::from_secs(10),
            outbound_queue: 512,
            room_queue: 4_096,
            ended_room_ttl: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Why a configuration could not be used. Each variant reads as a sentence for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O failure.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("the configuration file {path} is not valid: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said, with line and column.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file. Keys not in the file keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses TOML text. Keys not given keep their defaults.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that would make the server misbehave (zero rates, zero intervals).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |s: &str| Err(ConfigError::Invalid(s.to_owned()));
        if self
            .resume_key
            .as_ref()
            .is_some_and(|k| k.expose().len() < 32)
        {
            return fail("resume_key must be at least 32 characters long");
        }
        if self.redis.is_some() && self.resume_key.is_none() {
            return fail(
                "cluster mode (redis) needs resume_key, the same on every node: rooms' \
                 tokens and peers' claims must be recognised by all of them",
            );
        }
        let room = &self.room;
        if room.heartbeat_interval.is_zero() {
            return fail("room.heartbeat_interval must be above zero");
        }
        if room
            .heartbeat_timeout
            .is_some_and(|t| t <= room.heartbeat_interval)
        {
            return fail(
                "room.heartbeat_timeout must be longer than room.heartbeat_interval, \
                 or healthy clients are cut off between two heartbeats",
            );
        }
        if room.stream_kbps == 0 {
            return fail("room.stream_kbps must be above zero");
        }
        if room.max_stream_kbps == 0 {
            return fail("room.max_stream_kbps must be above zero");
        }
        if !(1..=100).contains(&room.usable_uplink_percent) {
            return fail("room.usable_uplink_percent must be between 1 and 100");
        }
        if !(0.0..=1.0).contains(&room.loss_threshold) {
            return fail("room.loss_threshold must be a fraction between 0 and 1");
        }
        if room.max_depth == 0 {
            return fail("room.max_depth must be at least 1");
        }
        if room.messages_per_second == 0 {
            return fail("room.messages_per_second must be above zero");
        }
        if room.max_message_bytes == 0 {
            return fail("room.max_message_bytes must be above zero");
        }
        if room.root_fanout == 0 {
            return fail("room.root_fanout must be at least 1, or nobody could receive the stream");
        }
        if self.limits.room_creations_per_minute == 0 || self.limits.room_creation_burst == 0 {
            return fail(
                "limits.room_creations_per_minute and room_creation_burst must be at least 1",
            );
        }
        if self.limits.message_burst == 0 {
            return fail("limits.message_burst must be at least 1");
        }
        if self.limits.max_connections_per_ip == 0 {
            return fail("limits.max_connections_per_ip must be at least 1");
        }
        if self.limits.outbound_queue == 0 || self.limits.room_queue == 0 {
            return fail("limits.outbound_queue and limits.room_queue must be at least 1");
        }
        if self.limits.hello_timeout.is_zero() {
            return fail("limits.hello_timeout must be above zero");
        }
        if self.access.max_link_ttl < Duration::from_secs(1) {
            return fail("access.max_link_ttl must be at least 1000 (one second)");
        }
        if self.stun_port == u16::MAX {
            return fail("stun_port must be below 65535: the STUN server also uses the next port");
        }
        if let Some(host) = &self.public_host
            && !is_host_name(host)
        {
            return fail(
                "public_host must be a DNS name or an IP address (no scheme, port or path)",
            );
        }
        if self.max_frame_bytes() < room.max_message_bytes as usize {
            return fail("limits.max_frame_bytes must not be below room.max_message_bytes");
        }
        self.tls.mode()?;
        turn_server::validate(self)
    }

    /// The IP address the STUN server listens on.
    pub fn stun_ip(&self) -> IpAddr {
        self.stun_bind.unwrap_or(self.bind.ip())
    }

    /// The hard cap on a frame or message, in bytes (see [`Limits::max_frame_bytes`]).
    pub fn max_frame_bytes(&self) -> usize {
        match self.limits.max_frame_bytes {
            Some(cap) => cap as usize,
            None => (self.room.max_message_bytes as usize)
                .saturating_mul(4)
                .max(64 * 1024),
        }
    }
}

/// A DNS name or an IP address (IPv6 with or without brackets), as it may stand in a
/// `stun:` URL.
fn is_host_name(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

pub(crate) mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// Reads a whole number of milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn sections_override_defaults() {
        let c = Config::from_toml(
            "bind = \"0.0.0.0:9000\"\n[room]\nroot_fanout = 2\nresume_grace = 0\n\
             [limits]\nmax_rooms = 3\nhello_timeout = 500\n",
        )
        .unwrap();
        assert_eq!(c.bind.port(), 9000);
        assert_eq!(c.stun_port, 3478);
        let off = Config::from_toml("stun_port = 0\npublic_host = \"[2001:db8::1]\"\n").unwrap();
        assert_eq!(
            (off.stun_port, off.public_host.as_deref()),
            (0, Some("[2001:db8::1]"))
        );
        assert_eq!(c.room.root_fanout, 2);
        assert_eq!(c.room.resume_grace, Duration::ZERO);
        assert_eq!(c.limits.max_rooms, 3);
        assert_eq!(c.limits.hello_timeout, Duration::from_millis(500));
        assert_eq!(c.room.relay_fanout, RoomConfig::default().relay_fanout);
        assert_eq!(
            c.tls,
            TlsConfig::default(),
            "plain HTTP unless [tls] says otherwise"
        );
        let c = Config::from_toml("[tls]\nself_signed = true\ndir = \"/var/lib/t\"\n").unwrap();
        assert!(c.tls.self_signed);
        assert_eq!(c.tls.dir, PathBuf::from("/var/lib/t"));
    }

    #[test]
    fn access_section_parses() {
        let c = Config::from_toml(
            "[access]\ncreate = \"token\"\nsecret_file = \"/var/lib/t/secret\"\n",
        )
        .unwrap();
        assert_eq!(c.access.create, crate::access::CreateMode::Token);
        assert_eq!(c.access.secret_file, PathBuf::from("/var/lib/t/secret"));
        assert!(c.access.admin_secret.is_none());
        assert!(Config::from_toml("[access]\ncreate = \"closed\"\n").is_err());
        let c = Config::from_toml("[access]\nadmin_secret = \"s\"\n").unwrap();
        assert_eq!(format!("{:?}", c.access.admin_secret), "Some(<redacted>)");
    }

    #[test]
    fn mistakes_are_explained() {
        let e = Config::from_toml("[limits]\nmax_romes = 3\n").unwrap_err();
        assert!(e.to_string().contains("max_romes"), "{e}");
        let e = Config::from_toml("[room]\nheartbeat_interval = 0\n").unwrap_err();
        assert!(e.to_string().contains("heartbeat_interval"), "{e}");
        for (toml, key) in [
            ("[room]\nheartbeat_timeout = 1000\n", "heartbeat_timeout"),
            (
                "[room]\nusable_uplink_percent = 150\n",
                "usable_uplink_percent",
            ),
            ("[room]\nloss_threshold = 2.0\n", "loss_threshold"),
            ("[room]\nmax_depth = 0\n", "max_depth"),
            ("stun_port = 65535\n", "stun_port"),
            ("public_host = \"stun://x:3478\"\n", "public_host"),
            (
                "[room]\nice_servers = [{ urls = [\"turn:x\"], credentials = \"c\" }]\n",
                "credentials",
            ),
            ("[tls]\ncert_file = \"c.pem\"\n", "cert_file"),
            (
                "[tls]\nself_signed = true\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
                "tls.self_signed",
            ),
        ] {
            let e = Config::from_toml(toml).unwrap_err().to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
    }

    use treecast_core::turn::TurnRest;

    #[test]
    fn turn_sections_parse() {
        let c = Config::from_toml(
            "[room.turn]\nurls = [\"turn:203.0.113.2:3478?transport=udp\"]\n\
             secret = \"north\"\nttl = 120000\n\
             [turn_server]\nport = 3481\nrelay_ip = \"203.0.113.2\"\n\
             relay_ports = \"50000-50100\"\nallow_peers = [\"10.0.0.0/8\"]\n",
        )
        .unwrap();
        let rest = c.room.turn.as_ref().unwrap();
        assert_eq!(rest.ttl, Duration::from_secs(120));
        assert_eq!(rest.secret.expose(), b"north");
        let server = c.turn_server.as_ref().unwrap();
        assert_eq!(server.port, 3481);
        assert_eq!(server.relay_ports.to_string(), "50000-50100");
        assert_eq!(server.allow_peers.len(), 1);
        assert_eq!(server.realm, "treecast");
        // The secret never shows in a printed configuration.
        assert!(!format!("{c:?}").contains("north"));
    }

    #[test]
    fn turn_mistakes_are_explained() {
        let rest = "[room.turn]\nurls = [\"turn:x:3478\"]\nsecret = \"s\"\nttl = 600000\n";
        for (toml, says) in [
            (
                "[room.turn]\nurls = []\nsecret = \"s\"\nttl = 600000\n",
                "no TURN server",
            ),
            (
                "[room.turn]\nurls = [\"turn:x\"]\nsecret = \"\"\nttl = 600000\n",
                "empty secret",
            ),
            (
                "[room.turn]\nurls = [\"stun:x\"]\nsecret = \"s\"\nttl = 600000\n",
                "not a turn",
            ),
            (
                "[room.turn]\nurls = [\"turn:x\"]\nsecret = \"s\"\nttl = 5000\n",
                "ttl",
            ),
            ("[turn_server]\nport = 3478\n", "shared secret"),
            (
                &format!("bind = \"0.0.0.0:80\"\n{rest}[turn_server]\n"),
                "relay_ip",
            ),
            (
                &format!("{rest}[turn_server]\nrelay_ip = \"0.0.0.0\"\n"),
                "specific address",
            ),
            (
                &format!("{rest}[turn_server]\nrelay_ports = \"9-3\"\n"),
                "9-3",
            ),
            (
                &format!("{rest}[turn_server]\nmax_allocations_per_peer = 0\n"),
                "at least 1",
            ),
            (
                &format!("{rest}[turn_server]\nport = 3479\nrelay_ip = \"203.0.113.2\"\n"),
                "taken by the STUN server",
            ),
        ] {
            let e = Config::from_toml(toml).unwrap_err().to_string();
            assert!(e.contains(says), "{toml}: {e}");
        }
        // The lifetime may be left out.
        let c = Config::from_toml("[room.turn]\nurls = [\"turn:x\"]\nsecret = \"s\"\n").unwrap();
        assert_eq!(c.room.turn.unwrap().ttl, TurnRest::DEFAULT_TTL);
        // The embedded server supplies the URL itself.
        Config::from_toml("[room.turn]\nurls = []\nsecret = \"s\"\nttl = 600000\n[turn_server]\n")
            .unwrap();
    }

    #[test]
    fn frame_cap_is_at_least_64_kib() {
        let mut c = Config::default();
        c.room.max_message_bytes = 1_000;
        assert_eq!(c.max_frame_bytes(), 64 * 1024);
        c.room.max_message_bytes = 100_000;
        assert_eq!(c.max_frame_bytes(), 400_000);
    }
}
