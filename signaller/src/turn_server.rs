//! The embedded TURN server (opt-in): a UDP TURN relay inside the signaller, so a small
//! deployment is one binary. It checks the same TURN REST credentials the rooms mint
//! (`[room.turn]`, see [`treecast_core::turn`]) and its URL is handed to clients with them.
//!
//! The protocol engine is the `turn` crate; this module adds what treecast needs around it:
//!
//! - **Credentials** ([`RestAuth`]): the username is `"<unix expiry>:<room>.<peer id>"`; the
//!   password is recomputed from the shared secret and turned into the long-term key. Expiry
//!   is enforced only when an allocation is created, never on Refresh, CreatePermission or
//!   ChannelBind, so a relayed session outlives its credentials (coturn behaves the same).
//! - **Destinations** ([`PeerPolicy`]): permissions for loopback, private, link-local,
//!   CGNAT, multicast or unspecified peers are refused (403) and datagrams to or from them
//!   dropped, unless an allow-list permits them, so the relay cannot be used to reach the
//!   operator's internal network.
//! - **Refusals** ([`RestAuth::screen`]): signed requests are checked on the listening
//!   socket before the engine sees them, so wrong, forged or expired credentials get 401
//!   (as from coturn) and are counted by reason.
//! - **Quota**: at most `max_allocations_per_peer` live allocations per user part
//!   (`<room>.<peer id>`), whatever client address they come from; one more gets 486.
//! - **Metrics**: allocations, relayed bytes, authentication failures and denied destinations.
//!
//! - **Flood guard**: unsigned requests, each of which costs the engine a nonce, are capped
//!   at [`CHALLENGES_PER_SECOND`] for all clients together, and nonces are forgotten after
//!   [`NONCE_TTL`] (the engine's own server loop keeps them forever).
//!
//! # How the crate is driven, and why the ledger works
//! [`serve_turn`] reads the listening socket in one task and hands each datagram to the
//! engine's request handler, to the end, before reading the next (as the engine's own server
//! loop does; driving it here is what lets nonces be pruned). For an Allocate the handler
//! calls [`AuthHandler::auth_handle`] and then, on the same task with no other request in
//! between, [`RelayAddressGenerator::allocate_conn`].
//! [`RestAuth`] therefore notes who it just authenticated ([`Ledger::last_auth`]), and
//! [`RelayPorts::allocate_conn`] reads that note to learn which client and username the new
//! relay belongs to. That is how the ledger knows which (client address, username) pairs
//! hold an allocation: an expired username is accepted only from such a pair, where it can
//! only refresh, permit or bind (a second Allocate from the same 5-tuple is answered 437
//! by the crate). Everything hangs on one listening socket per server, which is all this
//! module creates.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use ipnet::IpNet;
use metrics::{counter, describe_counter, describe_gauge, gauge};
use serde::Deserialize;
use tokio::net::UdpSocket;
use treecast_core::turn::{self as rest, Secret};
use turn::allocation::allocation_manager::{Manager, ManagerConfig};
use turn::auth::{AuthHandler, generate_auth_key};
use turn::relay::RelayAddressGenerator;
use turn::server::request::Request;
use webrtc_util::Conn;

use crate::config::{Config, ConfigError};

/// Settings of the embedded TURN server (`[turn_server]` in the TOML file). Absent: no
/// embedded server.
///
/// ```toml
/// [turn_server]
/// port = 3480
/// relay_ip = "203.0.113.5"
/// relay_ports = "49152-65535"
/// allow_peers = ["10.0.0.0/8"]
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TurnServerConfig {
    /// UDP port to listen on (0: any free port, which tests use; the binary's
    /// `--turn-port 0` means no server instead).
    pub port: u16,
    /// The address clients reach the server at: it listens there and relays from there.
    /// Absent: the signaller's own listening address, which must then be a specific one.
    pub relay_ip: Option<IpAddr>,
    /// UDP ports relayed transport addresses are taken from (open them in the firewall).
    pub relay_ports: PortRange,
    /// The long-term credential realm clients are told.
    pub realm: String,
    /// Peer networks the relay may send to although they are loopback, private, link-local
    /// or CGNAT (e.g. a LAN test bed). Empty: only public addresses.
    pub allow_peers: Vec<IpNet>,
    /// Live allocations one peer (`<room>.<peer id>`) may hold; more are refused.
    pub max_allocations_per_peer: u32,
}

impl Default for TurnServerConfig {
    fn default() -> Self {
        Self {
            // Not 3478 or 3479: the signaller's own STUN server answers there.
            port: 3480,
            relay_ip: None,
            relay_ports: PortRange {
                first: 49152,
                last: 65535,
            },
            realm: "treecast".to_owned(),
            allow_peers: Vec::new(),
            // A relaying viewer has a parent and up to a fan-out of children, one peer
            // connection each, and ICE may allocate once per connection and interface:
            // 12 leaves room for that, as LiveKit's limit does.
            max_allocations_per_peer: 12,
        }
    }
}

/// An inclusive range of UDP ports, written `"first-last"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct PortRange {
    /// Lowest port.
    pub first: u16,
    /// Highest port.
    pub last: u16,
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("\"{s}\" is not a port range like 49152-65535");
        let (first, last) = s.split_once('-').ok_or_else(bad)?;
        let first: u16 = first.trim().parse().map_err(|_| bad())?;
        let last: u16 = last.trim().parse().map_err(|_| bad())?;
        if first == 0 || last < first {
            return Err(format!(
                "\"{s}\": the relay port range must start above 0 and end at or after its start"
            ));
        }
        Ok(Self { first, last })
    }
}

impl TryFrom<String> for PortRange {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Shortest credential lifetime accepted: a peer renews a fifth of it before expiry, over
/// the signalling channel, so shorter ones would churn for no safety gained.
pub const MIN_CREDENTIAL_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Checks the TURN parts of a configuration: REST credentials and the embedded server.
pub(crate) fn validate(config: &Config) -> Result<(), ConfigError> {
    let fail = |s: String| Err(ConfigError::Invalid(s));
    let embedded = config.turn_server.as_ref();
    match &config.room.turn {
        None if embedded.is_some() => {
            return fail(
                "the embedded TURN server needs the shared secret of room.turn \
                 (--turn-secret-file or TREECAST_TURN_SECRET) to check credentials"
                    .into(),
            );
        }
        None => {}
        Some(rest) => {
            if rest.secret.is_empty() {
                return fail(
                    "room.turn has an empty secret: set it with --turn-secret-file or \
                     TREECAST_TURN_SECRET"
                        .into(),
                );
            }
            if rest.urls.is_empty() && embedded.is_none() {
                return fail(
                    "a TURN secret is configured but no TURN server: add --turn-url \
                     (room.turn.urls) or start the embedded one with --turn-port"
                        .into(),
                );
            }
            if let Some(url) = rest
                .urls
                .iter()
                .find(|u| !(u.starts_with("turn:") || u.starts_with("turns:")))
            {
                return fail(format!(
                    "room.turn.urls: \"{url}\" is not a turn: or turns: URL"
                ));
            }
            if rest.ttl < MIN_CREDENTIAL_TTL {
                return fail(format!(
                    "room.turn.ttl must be at least {} s: credentials are renewed a fifth \
                     of their lifetime before they expire",
                    MIN_CREDENTIAL_TTL.as_secs()
                ));
            }
        }
    }
    if let Some(server) = embedded {
        let stun = config.stun_port;
        if server.port != 0
            && stun != 0
            && (server.port == stun || Some(server.port) == stun.checked_add(1))
        {
            return fail(format!(
                "turn_server.port {} is taken by the STUN server (stun_port {stun} and the \
                 next port): give the embedded TURN server another port, e.g. --turn-port {}",
                server.port,
                stun.saturating_add(2)
            ));
        }
        if server.relay_ip.is_none() && config.bind.ip().is_unspecified() {
            return fail(format!(
                "the embedded TURN server needs turn_server.relay_ip (--turn-relay-ip): the \
                 signaller binds {}, which is not an address clients can be told",
                config.bind.ip()
            ));
        }
        if let Some(ip) = server.relay_ip {
            if ip.is_unspecified() || ip.is_multicast() {
                return fail(format!(
                    "turn_server.relay_ip {ip} must be one specific address clients can reach"
                ));
            }
        }
        if server.realm.is_empty() {
            return fail("turn_server.realm must not be empty".into());
        }
        if server.max_allocations_per_peer == 0 {
            return fail("turn_server.max_allocations_per_peer must be at least 1".into());
        }
    }
    Ok(())
}

/// Why the embedded TURN server could not start.
#[derive(Debug, thiserror::Error)]
pub enum TurnServerError {
    /// No relay address was given and the signaller listens on every interface.
    #[error(
        "the embedded TURN server needs --turn-relay-ip: the signaller listens on {0}, \
         which is not an address clients can be told"
    )]
    NoRelayAddress(IpAddr),
    /// The UDP port could not be bound.
    #[error("cannot listen for TURN on udp {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TURN engine refused its configuration.
    #[error("cannot start the embedded TURN server: {0}")]
    Start(String),
}

/// How long a nonce the engine handed out stays usable. The engine never forgets nonces
/// by itself (its own server loop keeps every one it issued, about 100 bytes each, so a
/// flood of unsigned requests would grow memory without end); this module drives the
/// engine's request handler itself and prunes them. A client presenting a pruned nonce
/// gets 438 Stale Nonce with a fresh one and retries, as RFC 5389 clients do.
const NONCE_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// How often nonces older than [`NONCE_TTL`] are pruned.
const NONCE_PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Unsigned requests (each makes the engine issue a nonce) accepted per second from all
/// clients together, and the burst above that rate. A browser sends one per allocation;
/// the cap bounds the nonce table at about `rate × NONCE_TTL × 100 B` (60 MB) under a flood.
const CHALLENGES_PER_SECOND: u32 = 1_000;
const CHALLENGE_BURST: u32 = 5_000;

/// Largest datagram read from the listening socket (the engine's own loop reads 1500).
const MAX_DATAGRAM: usize = 2_048;

/// A running embedded TURN server.
pub(crate) struct EmbeddedTurn {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl EmbeddedTurn {
    /// Binds the UDP port and starts serving. `signaller_ip` is where the signaller
    /// listens, the relay address when none is configured.
    pub(crate) async fn start(
        config: &TurnServerConfig,
        secret: Secret,
        signaller_ip: IpAddr,
    ) -> Result<Self, TurnServerError> {
        let relay_ip = config.relay_ip.unwrap_or(signaller_ip);
        if relay_ip.is_unspecified() {
            return Err(TurnServerError::NoRelayAddress(relay_ip));
        }
        let addr = SocketAddr::new(relay_ip, config.port);
        let socket = UdpSocket::bind(addr)
            .await
            .map_err(|source| TurnServerError::Bind { addr, source })?;
        let local = socket
            .local_addr()
            .map_err(|source| TurnServerError::Bind { addr, source })?;
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let auth = Arc::new(RestAuth {
            secret,
            realm: config.realm.clone(),
            ledger: Arc::clone(&ledger),
            max_per_peer: config.max_allocations_per_peer,
        });
        let policy = Arc::new(PeerPolicy::new(config.allow_peers.clone()));
        let ports = RelayPorts {
            ip: relay_ip,
            range: config.relay_ports,
            policy: Arc::clone(&policy),
            max_per_peer: config.max_allocations_per_peer,
            ledger,
        };
        let listener = Arc::new(Listener {
            socket,
            auth: Arc::clone(&auth),
            policy,
            challenges: Mutex::new(crate::rate::TokenBucket::new(
                CHALLENGES_PER_SECOND,
                CHALLENGE_BURST,
                tokio::time::Instant::now(),
            )),
        });
        let manager = Arc::new(Manager::new(ManagerConfig {
            relay_addr_generator: Box::new(ports),
            alloc_close_notify: None,
        }));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(serve_turn(
            listener,
            manager,
            auth,
            config.realm.clone(),
            stopped,
        ));
        let url = match local.ip() {
            IpAddr::V6(ip) => format!("turn:[{ip}]:{}?transport=udp", local.port()),
            IpAddr::V4(ip) => format!("turn:{ip}:{}?transport=udp", local.port()),
        };
        tracing::info!(
            "embedded TURN server on udp {local}, relaying from ports {}",
            config.relay_ports
        );
        Ok(Self { url, stop, task })
    }

    /// The URL clients are given, `turn:IP:PORT?transport=udp`.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Closes every allocation and the listening socket.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        if let Err(e) = self.task.await {
            tracing::warn!("the embedded TURN server failed while stopping: {e}");
        }
    }
}

/// The driver loop: one datagram at a time through the engine's request handler (which is
/// what makes [`Ledger::last_auth`] sound), nonces pruned now and then, until `stopped`.
async fn serve_turn(
    listener: Arc<Listener>,
    manager: Arc<Manager>,
    auth: Arc<RestAuth>,
    realm: String,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let nonces: Arc<tokio::sync::Mutex<HashMap<String, tokio::time::Instant>>> = Arc::default();
    let mut prune = tokio::time::interval(NONCE_PRUNE_EVERY);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = tokio::select! {
            received = listener.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(e) => {
                    tracing::warn!("the embedded TURN server stopped reading: {e}");
                    break;
                }
            },
            _ = prune.tick() => {
                nonces.lock().await.retain(|_, issued| issued.elapsed() < NONCE_TTL);
                continue;
            }
            _ = &mut stopped => break,
        };
        let mut request = Request {
            conn: Arc::clone(&listener) as Arc<dyn Conn + Send + Sync>,
            src_addr: from,
            buff: buf[..n].to_vec(),
            allocation_manager: Arc::clone(&manager),
            nonces: Arc::clone(&nonces),
            auth_handler: Arc::clone(&auth) as Arc<dyn AuthHandler + Send + Sync>,
            realm: realm.clone(),
            channel_bind_timeout: turn::proto::lifetime::DEFAULT_LIFETIME,
        };
        // Malformed or refused requests from clients: counted where it matters, not logged
        // (anyone could fill the log).
        if let Err(e) = request.handle_request().await {
            tracing::trace!("TURN datagram from {from} not handled: {e}");
        }
    }
    if let Err(e) = manager.close().await {
        tracing::warn!("closing the embedded TURN server's allocations: {e}");
    }
}

/// Starts the embedded TURN server if `config` asks for one and adds its URL to the
/// credentials' URLs, so rooms hand it out. `listener` is the signaller's HTTP listener,
/// whose address is the default relay address.
pub(crate) async fn start_configured(
    config: &mut Config,
    listener: &tokio::net::TcpListener,
) -> Result<Option<EmbeddedTurn>, TurnServerError> {
    let (Some(server), Some(rest)) = (&config.turn_server, &mut config.room.turn) else {
        return Ok(None);
    };
    let signaller_ip = listener
        .local_addr()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
    let embedded = EmbeddedTurn::start(server, rest.secret.clone(), signaller_ip).await?;
    rest.urls.push(embedded.url().to_owned());
    Ok(Some(embedded))
}

/// Who holds allocations; shared by the credential check and the relay allocator.
#[derive(Debug, Default)]
struct Ledger {
    /// The request the listener task is handling now, once authenticated (see the module
    /// docs for why this identifies an Allocate's owner).
    last_auth: Option<Authenticated>,
    /// Live allocations per (client address, username).
    holders: HashMap<(SocketAddr, String), u32>,
    /// Live allocations per user part (`<room>.<peer id>`).
    per_peer: HashMap<String, u32>,
}

#[derive(Debug, Clone)]
struct Authenticated {
    client: SocketAddr,
    username: String,
    user: String,
    expired: bool,
}

impl Ledger {
    fn release(&mut self, client: SocketAddr, username: &str, user: &str) {
        let key = (client, username.to_owned());
        if let Some(n) = self.holders.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.holders.remove(&key);
            }
        }
        if let Some(n) = self.per_peer.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(user);
            }
        }
    }
}

fn lock(ledger: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Checks TURN REST credentials (see the module docs).
struct RestAuth {
    secret: Secret,
    realm: String,
    ledger: Arc<Mutex<Ledger>>,
    /// Live allocations one peer may hold (answered 486 beyond, before the engine runs).
    max_per_peer: u32,
}

impl RestAuth {
    /// The long-term key for `username`, if its credentials may be used by `client` now.
    fn verify(
        &self,
        username: &str,
        realm: &str,
        client: SocketAddr,
        now_unix: u64,
    ) -> Result<(Vec<u8>, Authenticated), AuthFailure> {
        if realm != self.realm {
            return Err(AuthFailure::WrongRealm);
        }
        let (expiry, user) = rest::parse_username(username).ok_or(AuthFailure::Malformed)?;
        let expired = expiry <= now_unix;
        // Expiry only bars new allocations: a client that already holds one with this
        // username keeps refreshing it and its permissions.
        if expired
            && !lock(&self.ledger)
                .holders
                .contains_key(&(client, username.to_owned()))
        {
            return Err(AuthFailure::Expired);
        }
        let password = rest::password(&self.secret, username);
        let key = generate_auth_key(username, realm, &password);
        let who = Authenticated {
            client,
            username: username.to_owned(),
            user: user.to_owned(),
            expired,
        };
        Ok((key, who))
    }

    /// [`RestAuth::verify`], noting who was authenticated for a following allocation.
    fn check(
        &self,
        username: &str,
        realm: &str,
        client: SocketAddr,
        now_unix: u64,
    ) -> Result<Vec<u8>, AuthFailure> {
        let (key, who) = self.verify(username, realm, client, now_unix)?;
        lock(&self.ledger).last_auth = Some(who);
        Ok(key)
    }

    /// Whether `user` already holds as many allocations as it may.
    fn quota_reached(&self, user: &str) -> bool {
        lock(&self.ledger).per_peer.get(user).copied().unwrap_or(0) >= self.max_per_peer
    }

    /// Checks the credentials of a signed request before the engine sees it; `Some` is
    /// the 401 answer to send instead. The engine itself answers a bad signature with 400
    /// and cannot tell a wrong password from other mistakes; checking here gives clients
    /// coturn's 401 and the operator a count of wrong passwords (a secret that differs
    /// between signaller and TURN server shows up there).
    fn screen(&self, datagram: &[u8], client: SocketAddr, now_unix: u64) -> Option<Vec<u8>> {
        use stun::attributes::{ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
        use stun::message::{CLASS_ERROR_RESPONSE, CLASS_REQUEST, Message, MessageType};
        use stun::textattrs::TextAttribute;

        if !stun::message::is_message(datagram) {
            return None; // channel data, or garbage the engine drops
        }
        let mut request = Message::new();
        request.raw = datagram.to_vec();
        if request.decode().is_err()
            || request.typ.class != CLASS_REQUEST
            || !request.contains(ATTR_MESSAGE_INTEGRITY)
        {
            return None; // unsigned requests get the engine's 401 challenge
        }
        let username = TextAttribute::get_from_as(&request, ATTR_USERNAME).ok()?;
        let realm = TextAttribute::get_from_as(&request, ATTR_REALM).ok()?;
        let nonce = TextAttribute::get_from_as(&request, ATTR_NONCE).ok()?;
        let failure = match self.verify(&username.text, &realm.text, client, now_unix) {
            Err(why) => why,
            Ok((key, who)) => {
                let integrity = stun::integrity::MessageIntegrity(key);
                if integrity.check(&mut request.clone()).is_err() {
                    AuthFailure::BadPassword
                } else if request.typ.method == stun::message::METHOD_ALLOCATE
                    && self.quota_reached(&who.user)
                {
                    // Answered here with coturn's 486; the allocator checks again, since
                    // this is only a forecast.
                    counter!("treecast_turn_allocations_refused_total", "reason" => "per_peer_quota")
                        .increment(1);
                    return error_answer(
                        &request,
                        ALLOCATION_QUOTA_REACHED,
                        b"Allocation Quota Reached",
                    );
                } else {
                    return None;
                }
            }
        };
        count_auth_failure(failure, client);
        let mut answer = Message::new();
        answer
            .build(&[
                Box::new(request.transaction_id),
                Box::new(MessageType::new(request.typ.method, CLASS_ERROR_RESPONSE)),
                Box::new(stun::error_code::ErrorCodeAttribute {
                    code: stun::error_code::CODE_UNAUTHORIZED,
                    reason: b"Unauthorized".to_vec(),
                }),
                Box::new(TextAttribute::new(ATTR_REALM, self.realm.clone())),
                Box::new(nonce),
                Box::new(stun::fingerprint::FINGERPRINT),
            ])
            .ok()?;
        Some(answer.raw)
    }
}

/// 486 Allocation Quota Reached (RFC 5766 15; not among the stun crate's constants).
const ALLOCATION_QUOTA_REACHED: stun::error_code::ErrorCode = stun::error_code::ErrorCode(486);

/// An error response to `request` carrying only `code` (and a fingerprint).
fn error_answer(
    request: &stun::message::Message,
    code: stun::error_code::ErrorCode,
    reason: &[u8],
) -> Option<Vec<u8>> {
    use stun::message::{CLASS_ERROR_RESPONSE, Message, MessageType};
    let mut answer = Message::new();
    answer
        .build(&[
            Box::new(request.transaction_id),
            Box::new(MessageType::new(request.typ.method, CLASS_ERROR_RESPONSE)),
            Box::new(stun::error_code::ErrorCodeAttribute {
                code,
                reason: reason.to_vec(),
            }),
            Box::new(stun::fingerprint::FINGERPRINT),
        ])
        .ok()?;
    Some(answer.raw)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn count_auth_failure(why: AuthFailure, client: SocketAddr) {
    counter!("treecast_turn_auth_failures_total", "reason" => why.as_str()).increment(1);
    tracing::debug!("TURN request from {client} refused: {}", why.as_str());
}

impl AuthHandler for RestAuth {
    fn auth_handle(
        &self,
        username: &str,
        realm: &str,
        src_addr: SocketAddr,
    ) -> Result<Vec<u8>, turn::Error> {
        // Requests reach this only after `screen` let them through; a refusal here is the
        // rare expiry between the two checks.
        self.check(username, realm, src_addr, unix_now())
            .map_err(|why| {
                count_auth_failure(why, src_addr);
                turn::Error::Other(why.as_str().to_owned())
            })
    }
}

/// The listening socket, with [`RestAuth::screen`] and [`PeerPolicy::screen`] in front of
/// the engine.
struct Listener {
    socket: UdpSocket,
    auth: Arc<RestAuth>,
    policy: Arc<PeerPolicy>,
    /// Unsigned requests admitted, all clients together (see [`CHALLENGES_PER_SECOND`]).
    challenges: Mutex<crate::rate::TokenBucket>,
}

impl Listener {
    /// Whether an unsigned request (which costs the engine a nonce) may pass now.
    fn admits_challenge(&self, datagram: &[u8]) -> bool {
        if !is_unsigned_request(datagram) {
            return true;
        }
        let admitted = self
            .challenges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(tokio::time::Instant::now())
            == crate::rate::Admission::Pass;
        if !admitted {
            counter!("treecast_turn_challenges_dropped_total").increment(1);
        }
        admitted
    }
}

/// A STUN request other than Binding without MESSAGE-INTEGRITY: the engine answers it with
/// a 401 and a new nonce.
fn is_unsigned_request(datagram: &[u8]) -> bool {
    use stun::attributes::ATTR_MESSAGE_INTEGRITY;
    use stun::message::{CLASS_REQUEST, METHOD_BINDING, Message};
    if !stun::message::is_message(datagram) {
        return false;
    }
    let mut m = Message::new();
    m.raw = datagram.to_vec();
    m.decode().is_ok()
        && m.typ.class == CLASS_REQUEST
        && m.typ.method != METHOD_BINDING
        && !m.contains(ATTR_MESSAGE_INTEGRITY)
}

#[async_trait]
impl Conn for Listener {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other(
            "the TURN listener is not connected".into(),
        ))
    }

    async fn recv(&self, _buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Err(webrtc_util::Error::Other(
            "the TURN listener is not connected".into(),
        ))
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        loop {
            let (n, from) = self.socket.recv_from(buf).await?;
            let datagram = &buf[..n];
            if !self.admits_challenge(datagram) {
                continue;
            }
            let refusal = self
                .auth
                .screen(datagram, from, unix_now())
                .or_else(|| self.policy.screen(datagram));
            match refusal {
                None => return Ok((n, from)),
                Some(refusal) => {
                    let _ = self.socket.send_to(&refusal, from).await;
                }
            }
        }
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(webrtc_util::Error::Other(
            "the TURN listener is not connected".into(),
        ))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        Ok(self.socket.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// Why credentials were refused (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthFailure {
    WrongRealm,
    Malformed,
    Expired,
    BadPassword,
}

impl AuthFailure {
    fn as_str(self) -> &'static str {
        match self {
            Self::WrongRealm => "wrong_realm",
            Self::Malformed => "malformed_username",
            Self::Expired => "expired",
            Self::BadPassword => "bad_password",
        }
    }
}

/// Creates relay sockets on the relay address, within the port range, after the quota
/// check; each comes wrapped in a [`FilteredRelay`].
struct RelayPorts {
    ip: IpAddr,
    range: PortRange,
    policy: Arc<PeerPolicy>,
    max_per_peer: u32,
    ledger: Arc<Mutex<Ledger>>,
}

impl RelayPorts {
    async fn bind(&self, requested_port: u16) -> Result<UdpSocket, turn::Error> {
        if requested_port != 0 {
            return Ok(UdpSocket::bind((self.ip, requested_port)).await?);
        }
        let span = u32::from(self.range.last - self.range.first) + 1;
        let mut seed = [0u8; 4];
        getrandom::fill(&mut seed).map_err(|e| turn::Error::Other(e.to_string()))?;
        let start = u32::from_le_bytes(seed) % span;
        // Probe upwards from a random point (the OS picks no port for us inside a range);
        // a full range fails after 64 tries instead of scanning thousands of ports.
        for i in 0..span.min(64) {
            let port = self.range.first + ((start + i) % span) as u16;
            if let Ok(socket) = UdpSocket::bind((self.ip, port)).await {
                return Ok(socket);
            }
        }
        Err(turn::Error::Other(format!(
            "no free relay port in {}",
            self.range
        )))
    }
}

#[async_trait]
impl RelayAddressGenerator for RelayPorts {
    fn validate(&self) -> Result<(), turn::Error> {
        Ok(())
    }

    async fn allocate_conn(
        &self,
        use_ipv4: bool,
        requested_port: u16,
    ) -> Result<(Arc<dyn Conn + Send + Sync>, SocketAddr), turn::Error> {
        if use_ipv4 != self.ip.is_ipv4() {
            return Err(turn::Error::Other("address family not relayed here".into()));
        }
        let owner = {
            let mut ledger = lock(&self.ledger);
            // Read, not taken: for an EVEN-PORT request the engine first probes for a port
            // by allocating and dropping a relay, then allocates the real one, both after
            // the same authentication.
            let Some(owner) = ledger.last_auth.clone() else {
                return Err(turn::Error::Other("allocation without credentials".into()));
            };
            if owner.expired {
                counter!("treecast_turn_auth_failures_total", "reason" => "expired").increment(1);
                return Err(turn::Error::Other("expired credentials".into()));
            }
            let held = ledger.per_peer.get(&owner.user).copied().unwrap_or(0);
            if held >= self.max_per_peer {
                counter!("treecast_turn_allocations_refused_total", "reason" => "per_peer_quota")
                    .increment(1);
                return Err(turn::Error::Other("allocation quota reached".into()));
            }
            // Counted now, before the await, so two Allocates cannot both pass the quota.
            *ledger
                .holders
                .entry((owner.client, owner.username.clone()))
                .or_default() += 1;
            *ledger.per_peer.entry(owner.user.clone()).or_default() += 1;
            owner
        };
        let holding = Holding {
            ledger: Arc::clone(&self.ledger),
            owner,
            live: AtomicBool::new(false),
            released: AtomicBool::new(false),
        };
        // On failure `holding` drops and gives the counts back.
        let socket = self.bind(requested_port).await?;
        let relay_addr = socket.local_addr()?;
        holding.go_live();
        let relay = FilteredRelay {
            socket,
            policy: Arc::clone(&self.policy),
            holding,
        };
        Ok((Arc::new(relay), relay_addr))
    }
}

/// One allocation's place in the ledger (and in the gauge once it is live); given back
/// once, on close or drop, whichever comes first.
struct Holding {
    ledger: Arc<Mutex<Ledger>>,
    owner: Authenticated,
    live: AtomicBool,
    released: AtomicBool,
}

impl Holding {
    /// Marks the allocation as created and counts it in the gauge.
    fn go_live(&self) {
        counter!("treecast_turn_allocations_total").increment(1);
        gauge!("treecast_turn_allocations").increment(1.0);
        self.live.store(true, Ordering::SeqCst);
    }

    fn release(&self) {
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        if self.live.load(Ordering::SeqCst) {
            gauge!("treecast_turn_allocations").decrement(1.0);
        }
        lock(&self.ledger).release(self.owner.client, &self.owner.username, &self.owner.user);
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.release();
    }
}

/// A relay socket that refuses to talk to disallowed peers: datagrams to them are dropped
/// (and counted), datagrams from them ignored.
struct FilteredRelay {
    socket: UdpSocket,
    policy: Arc<PeerPolicy>,
    holding: Holding,
}

#[async_trait]
impl Conn for FilteredRelay {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other(
            "a relay socket is not connected".into(),
        ))
    }

    async fn recv(&self, _buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Err(webrtc_util::Error::Other(
            "a relay socket is not connected".into(),
        ))
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        loop {
            let (n, from) = self.socket.recv_from(buf).await?;
            if self.policy.allows(from.ip()) {
                counter!("treecast_turn_relayed_bytes_total", "direction" => "from_peer")
                    .increment(n as u64);
                return Ok((n, from));
            }
            counter!("treecast_turn_denied_peers_total", "direction" => "from_peer").increment(1);
        }
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(webrtc_util::Error::Other(
            "a relay socket is not connected".into(),
        ))
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        if !self.policy.allows(target.ip()) {
            counter!("treecast_turn_denied_peers_total", "direction" => "to_peer").increment(1);
            // Reported as sent: the client learns nothing about the internal network.
            return Ok(buf.len());
        }
        let n = self.socket.send_to(buf, target).await?;
        counter!("treecast_turn_relayed_bytes_total", "direction" => "to_peer").increment(n as u64);
        Ok(n)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        // The allocation ended (expiry, Refresh with lifetime 0, server shutdown).
        self.holding.release();
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// Which peer addresses the relay may exchange datagrams with.
#[derive(Debug, Default)]
pub(crate) struct PeerPolicy {
    allow: Vec<IpNet>,
}

impl PeerPolicy {
    pub(crate) fn new(allow: Vec<IpNet>) -> Self {
        Self { allow }
    }

    /// Public unicast addresses, and anything on the allow-list.
    pub(crate) fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self.allow.iter().any(|net| net.contains(&ip)) {
            return true;
        }
        match ip {
            IpAddr::V4(v4) => !internal_v4(v4),
            IpAddr::V6(v6) => !internal_v6(v6),
        }
    }
}

impl PeerPolicy {
    /// Answers 403 to a signed CreatePermission or ChannelBind naming a peer the relay may
    /// not reach (coturn does the same), so the client's ICE agent gives up on it at once
    /// instead of sending into a relay that drops everything. Unsigned requests pass: the
    /// engine challenges them first, and the credentials are checked before this.
    fn screen(&self, datagram: &[u8]) -> Option<Vec<u8>> {
        use stun::attributes::{ATTR_MESSAGE_INTEGRITY, ATTR_XOR_PEER_ADDRESS};
        use stun::message::{
            CLASS_REQUEST, METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION, Message,
        };

        if !stun::message::is_message(datagram) {
            return None;
        }
        let mut request = Message::new();
        request.raw = datagram.to_vec();
        if request.decode().is_err()
            || request.typ.class != CLASS_REQUEST
            || !(request.typ.method == METHOD_CREATE_PERMISSION
                || request.typ.method == METHOD_CHANNEL_BIND)
            || !request.contains(ATTR_MESSAGE_INTEGRITY)
        {
            return None;
        }
        let transaction = request.transaction_id.0;
        let forbidden = request
            .attributes
            .0
            .iter()
            .filter(|a| a.typ == ATTR_XOR_PEER_ADDRESS)
            .filter_map(|a| xor_peer_ip(&a.value, &transaction))
            .any(|ip| !self.allows(ip));
        if !forbidden {
            return None;
        }
        counter!("treecast_turn_denied_peers_total", "direction" => "permission").increment(1);
        error_answer(&request, stun::error_code::CODE_FORBIDDEN, b"Forbidden IP")
    }
}

/// The IP address in an XOR-PEER-ADDRESS value (RFC 5766 14.3, RFC 5389 15.2): family at
/// byte 1, the address from byte 4 XORed with the magic cookie (and, for IPv6, the
/// transaction id).
fn xor_peer_ip(value: &[u8], transaction: &[u8; 12]) -> Option<IpAddr> {
    const MAGIC_COOKIE: [u8; 4] = 0x2112_A442u32.to_be_bytes();
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE);
    key[4..].copy_from_slice(transaction);
    match (value.get(1)?, value.get(4..)?) {
        (1, xored) if xored.len() >= 4 => {
            let mut octets = [0u8; 4];
            for (i, o) in octets.iter_mut().enumerate() {
                *o = xored[i] ^ key[i];
            }
            Some(IpAddr::from(octets))
        }
        (2, xored) if xored.len() >= 16 => {
            let mut octets = [0u8; 16];
            for (i, o) in octets.iter_mut().enumerate() {
                *o = xored[i] ^ key[i];
            }
            Some(IpAddr::from(octets))
        }
        _ => None,
    }
}

/// Loopback, RFC 1918, link-local, CGNAT (RFC 6598), "this network", multicast, broadcast.
fn internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
}

/// Loopback, unspecified, unique local (fc00::/7), link-local (fe80::/10), multicast.
fn internal_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
}

/// Describes the embedded TURN server's metrics (called once, with the recorder).
pub(crate) fn describe_metrics() {
    describe_gauge!(
        "treecast_turn_allocations",
        "Live allocations on the embedded TURN server."
    );
    describe_counter!(
        "treecast_turn_allocations_total",
        "Allocations the embedded TURN server created."
    );
    describe_counter!(
        "treecast_turn_allocations_refused_total",
        "Allocations refused after authentication, by reason (per_peer_quota)."
    );
    describe_counter!(
        "treecast_turn_relayed_bytes_total",
        "Bytes relayed by the embedded TURN server, by direction (to_peer, from_peer)."
    );
    describe_counter!(
        "treecast_turn_auth_failures_total",
        "TURN requests whose credentials were refused, by reason (expired, malformed_username, wrong_realm, bad_password)."
    );
    describe_counter!(
        "treecast_turn_challenges_dropped_total",
        "Unsigned TURN requests dropped because more than 1000 a second arrived (each would cost a nonce)."
    );
    describe_counter!(
        "treecast_turn_denied_peers_total",
        "Permissions refused (403) and datagrams dropped because the peer address is loopback, private, link-local, CGNAT or multicast and not allow-listed, by direction (permission, to_peer, from_peer)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> RestAuth {
        RestAuth {
            secret: Secret::new("north"),
            realm: "treecast".into(),
            ledger: Arc::default(),
            max_per_peer: 12,
        }
    }

    #[test]
    fn the_key_is_the_long_term_key_of_the_rest_password() {
        let a = auth();
        let client: SocketAddr = "198.51.100.7:5000".parse().unwrap();
        let key = a.check("2000:r.1", "treecast", client, 1_000).unwrap();
        let password = rest::password(&Secret::new("north"), "2000:r.1");
        assert_eq!(key, generate_auth_key("2000:r.1", "treecast", &password));
    }

    #[test]
    fn expired_credentials_only_serve_an_allocation_already_held() {
        let a = auth();
        let client: SocketAddr = "198.51.100.7:5000".parse().unwrap();
        let other: SocketAddr = "198.51.100.7:5001".parse().unwrap();
        assert_eq!(
            a.check("900:r.1", "treecast", client, 1_000),
            Err(AuthFailure::Expired)
        );
        // The client allocated while the username was valid.
        lock(&a.ledger)
            .holders
            .insert((client, "900:r.1".into()), 1);
        assert!(a.check("900:r.1", "treecast", client, 1_000).is_ok());
        assert_eq!(
            a.check("900:r.1", "treecast", other, 1_000),
            Err(AuthFailure::Expired)
        );
        lock(&a.ledger).release(client, "900:r.1", "r.1");
        assert_eq!(
            a.check("900:r.1", "treecast", client, 1_000),
            Err(AuthFailure::Expired)
        );
    }

    /// A signed Allocate as a client builds it.
    fn signed_allocate(username: &str, password: &str) -> Vec<u8> {
        use stun::agent::TransactionId;
        use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
        use stun::message::{CLASS_REQUEST, METHOD_ALLOCATE, Message, MessageType};
        use stun::textattrs::TextAttribute;
        let mut m = Message::new();
        m.build(&[
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
            Box::new(TextAttribute::new(ATTR_USERNAME, username.into())),
            Box::new(TextAttribute::new(ATTR_REALM, "treecast".into())),
            Box::new(TextAttribute::new(ATTR_NONCE, "n0nce".into())),
            Box::new(stun::integrity::MessageIntegrity::new_long_term_integrity(
                username.into(),
                "treecast".into(),
                password.into(),
            )),
        ])
        .unwrap();
        m.raw
    }

    #[test]
    fn wrong_passwords_are_answered_401_before_the_engine_sees_them() {
        let a = auth();
        let client: SocketAddr = "198.51.100.7:5000".parse().unwrap();
        let good = rest::password(&Secret::new("north"), "2000:r.1");
        assert_eq!(
            a.screen(&signed_allocate("2000:r.1", &good), client, 1_000),
            None
        );
        let answer = a
            .screen(&signed_allocate("2000:r.1", "forged"), client, 1_000)
            .expect("refused");
        let mut m = stun::message::Message::new();
        m.raw = answer;
        m.decode().unwrap();
        assert_eq!(m.typ.class, stun::message::CLASS_ERROR_RESPONSE);
        let mut code = stun::error_code::ErrorCodeAttribute::default();
        stun::message::Getter::get_from(&mut code, &m).unwrap();
        assert!(code.code == stun::error_code::CODE_UNAUTHORIZED);
        // Expired, and not holding an allocation: refused although correctly signed.
        assert!(
            a.screen(&signed_allocate("2000:r.1", &good), client, 3_000)
                .is_some()
        );
        // Unsigned requests and channel data pass through to the engine.
        assert_eq!(
            a.screen(&[0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4], client, 1_000),
            None
        );
    }

    #[test]
    fn only_unsigned_requests_cost_a_challenge() {
        use stun::agent::TransactionId;
        use stun::message::{CLASS_REQUEST, METHOD_ALLOCATE, METHOD_BINDING, Message, MessageType};
        let unsigned = |method| {
            let mut m = Message::new();
            m.build(&[
                Box::new(TransactionId::new()),
                Box::new(MessageType::new(method, CLASS_REQUEST)),
            ])
            .unwrap();
            m.raw
        };
        assert!(is_unsigned_request(&unsigned(METHOD_ALLOCATE)));
        assert!(!is_unsigned_request(&unsigned(METHOD_BINDING)));
        assert!(!is_unsigned_request(&signed_allocate("2000:r.1", "p")));
        assert!(!is_unsigned_request(&[0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4]));
    }

    #[test]
    fn garbage_and_foreign_realms_are_refused() {
        let a = auth();
        let client: SocketAddr = "198.51.100.7:5000".parse().unwrap();
        assert_eq!(
            a.check("alice", "treecast", client, 1),
            Err(AuthFailure::Malformed)
        );
        assert_eq!(
            a.check("2000:r.1", "elsewhere", client, 1),
            Err(AuthFailure::WrongRealm)
        );
    }

    #[test]
    fn internal_destinations_are_denied_unless_allow_listed() {
        let policy = PeerPolicy::default();
        for denied in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!policy.allows(denied.parse().unwrap()), "{denied}");
        }
        for allowed in [
            "203.0.113.9",
            "198.51.100.1",
            "8.8.8.8",
            "100.128.0.1",
            "2001:db8::1",
        ] {
            assert!(policy.allows(allowed.parse().unwrap()), "{allowed}");
        }
        let lab = PeerPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(lab.allows("127.0.0.1".parse().unwrap()));
        assert!(!lab.allows("10.0.0.1".parse().unwrap()));
    }

    fn signed_create_permission(peer: SocketAddr) -> Vec<u8> {
        use stun::agent::TransactionId;
        use stun::message::{CLASS_REQUEST, METHOD_CREATE_PERMISSION, Message, MessageType};
        let mut m = Message::new();
        m.build(&[
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_CREATE_PERMISSION, CLASS_REQUEST)),
            Box::new(turn::proto::peeraddr::PeerAddress {
                ip: peer.ip(),
                port: peer.port(),
            }),
            Box::new(stun::integrity::MessageIntegrity::new_long_term_integrity(
                "2000:r.1".into(),
                "treecast".into(),
                "p".into(),
            )),
        ])
        .unwrap();
        m.raw
    }

    #[test]
    fn permissions_for_internal_peers_are_forbidden() {
        let policy = PeerPolicy::default();
        for denied in ["127.0.0.1:9", "10.0.0.1:9", "[fd00::1]:9", "[::1]:9"] {
            let answer = policy
                .screen(&signed_create_permission(denied.parse().unwrap()))
                .unwrap_or_else(|| panic!("{denied} permitted"));
            let mut m = stun::message::Message::new();
            m.raw = answer;
            m.decode().unwrap();
            let mut code = stun::error_code::ErrorCodeAttribute::default();
            stun::message::Getter::get_from(&mut code, &m).unwrap();
            assert!(code.code == stun::error_code::CODE_FORBIDDEN, "{denied}");
        }
        for allowed in ["203.0.113.9:9", "[2001:db8::1]:9"] {
            assert_eq!(
                policy.screen(&signed_create_permission(allowed.parse().unwrap())),
                None,
                "{allowed}"
            );
        }
    }

    fn relay_with(policy: PeerPolicy, socket: UdpSocket) -> FilteredRelay {
        FilteredRelay {
            socket,
            policy: Arc::new(policy),
            holding: Holding {
                ledger: Arc::default(),
                owner: Authenticated {
                    client: "198.51.100.7:5000".parse().unwrap(),
                    username: "2000:r.1".into(),
                    user: "r.1".into(),
                    expired: false,
                },
                live: AtomicBool::new(false),
                released: AtomicBool::new(false),
            },
        }
    }

    #[tokio::test]
    async fn the_relay_socket_drops_datagrams_to_internal_peers() {
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = peer.local_addr().unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let strict = relay_with(PeerPolicy::default(), socket);
        // Reported as sent, but dropped.
        assert_eq!(strict.send_to(b"no", to).await.unwrap(), 2);
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let lab = relay_with(
            PeerPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]),
            socket,
        );
        lab.send_to(b"yes", to).await.unwrap();
        let mut buf = [0u8; 16];
        let (n, _) =
            tokio::time::timeout(std::time::Duration::from_secs(30), peer.recv_from(&mut buf))
                .await
                .expect("the allow-listed datagram arrives")
                .unwrap();
        // Datagrams on loopback arrive in order: had the first one been sent, it would be
        // read first.
        assert_eq!(&buf[..n], b"yes");
    }

    #[test]
    fn port_ranges_parse_and_explain_mistakes() {
        assert_eq!(
            "49152-65535".parse::<PortRange>(),
            Ok(PortRange {
                first: 49152,
                last: 65535
            })
        );
        for bad in ["", "5000", "0-10", "10-5", "a-b", "1-70000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }
}
