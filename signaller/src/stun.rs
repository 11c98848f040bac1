//! The embedded STUN server: answers Binding requests (RFC 8489/5389) on two UDP ports of
//! one address, with the NAT behaviour discovery attributes of RFC 5780.
//!
//! Clients learn their server-reflexive address from it, and compare the mapped port
//! seen from the primary port P and the alternate port (P+1 when the binary binds them):
//! the same port from both means the NAT maps endpoint-independently. A request carrying
//! CHANGE-REQUEST with the change-port flag is answered from the other socket, so a
//! native client can test whether its NAT filters by remote port. The server has one IP
//! address only, so change-IP is refused with 420 (Unknown Attribute), as RFC 5780 §6.1
//! asks of a server without an alternate address.
//!
//! # Driver loop
//! [`answer`] is a pure function (datagram, client address, receiving socket, the
//! sockets' addresses) -> a reply and the socket to send it from, or why the datagram was
//! dropped. One tokio task per socket receives, calls it, sends the reply and bumps the
//! metrics; both stop when the server begins shutting down. Anything that is not a
//! well-formed Binding request is dropped without an answer (counted in
//! `treecast_stun_malformed_total`): a STUN server answering garbage would reflect
//! traffic at spoofed addresses.
//!
//! Messages are encoded and decoded by `rtc-stun`, the sans-IO STUN codec of the webrtc
//! stack the native peer already uses.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rtc_stun::addr::MappedAddress;
use rtc_stun::attributes::{
    ATTR_CHANGE_REQUEST, ATTR_FINGERPRINT, ATTR_MESSAGE_INTEGRITY, ATTR_MESSAGE_INTEGRITY_SHA256,
    ATTR_OTHER_ADDRESS, ATTR_PRIORITY, ATTR_RESPONSE_ORIGIN, ATTR_SOFTWARE, ATTR_USE_CANDIDATE,
    ATTR_USERNAME, AttrType,
};
use rtc_stun::error_code::{CODE_UNKNOWN_ATTRIBUTE, ErrorCodeAttribute};
use rtc_stun::fingerprint::FINGERPRINT;
use rtc_stun::message::{
    BINDING_ERROR, BINDING_REQUEST, BINDING_SUCCESS, MAGIC_COOKIE, MESSAGE_HEADER_SIZE, Message,
    Setter,
};
use rtc_stun::textattrs::TextAttribute;
use rtc_stun::uattrs::UnknownAttributes;
use rtc_stun::xoraddr::XorMappedAddress;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use treecast_core::protocol::IceServer;

use crate::server::ServerError;
use crate::telemetry;

/// CHANGE-REQUEST flag: answer from the other IP address (RFC 5780 §7.2).
const CHANGE_IP: u32 = 0x04;
/// CHANGE-REQUEST flag: answer from the other port.
const CHANGE_PORT: u32 = 0x02;
/// Largest datagram read; a longer one arrives truncated and fails the length check.
const MAX_DATAGRAM: usize = 2048;
/// The SOFTWARE attribute of every answer.
const SOFTWARE: &str = "treecast";

/// Which of the server's two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StunPort {
    /// Port P, the one given first in the URLs.
    Primary,
    /// The alternate port (P+1 when the binary binds them).
    Alternate,
}

impl StunPort {
    /// The other socket.
    pub fn other(self) -> Self {
        match self {
            Self::Primary => Self::Alternate,
            Self::Alternate => Self::Primary,
        }
    }
}

/// The two sockets' addresses, as answers describe them (RESPONSE-ORIGIN, OTHER-ADDRESS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StunAddrs {
    /// The primary socket.
    pub primary: SocketAddr,
    /// The alternate socket.
    pub alternate: SocketAddr,
}

impl StunAddrs {
    /// The address of one socket.
    pub fn of(&self, port: StunPort) -> SocketAddr {
        match port {
            StunPort::Primary => self.primary,
            StunPort::Alternate => self.alternate,
        }
    }
}

/// What the server sends back for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The encoded STUN response.
    pub bytes: Vec<u8>,
    /// The socket it must leave from.
    pub from: StunPort,
    /// Whether it is a success or an error response.
    pub kind: ReplyKind,
}

/// Success or error response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A Binding success response with the client's mapped address.
    Success,
    /// A Binding error response (an unsupported comprehension-required attribute, or
    /// change-IP).
    Error,
}

impl ReplyKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Error => "error",
        }
    }
}

/// Why a datagram got no answer. Each is counted as malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    /// Shorter than a STUN header, or its length field disagrees with its size.
    #[error("not a whole STUN message")]
    Truncated,
    /// Not STUN: the leading bits, the magic cookie or the attribute padding are wrong.
    #[error("not a STUN message")]
    NotStun,
    /// The attributes could not be decoded.
    #[error("undecodable attributes: {0}")]
    Undecodable(String),
    /// A STUN message, but not a Binding request.
    #[error("not a Binding request")]
    NotBindingRequest,
    /// FINGERPRINT present but wrong, or not the last attribute.
    #[error("bad FINGERPRINT")]
    BadFingerprint,
    /// CHANGE-REQUEST with a value that is not four bytes.
    #[error("bad CHANGE-REQUEST")]
    BadChangeRequest,
    /// The response could not be encoded (should not happen).
    #[error("cannot encode the answer: {0}")]
    Encode(String),
}

/// Comprehension-required attributes a Binding request may carry here. The credentials
/// and ICE attributes are defined by the base protocol and ICE; the server does not
/// authenticate Binding requests, so they are understood and ignored.
const UNDERSTOOD: [AttrType; 6] = [
    ATTR_CHANGE_REQUEST,
    ATTR_USERNAME,
    ATTR_MESSAGE_INTEGRITY,
    ATTR_MESSAGE_INTEGRITY_SHA256,
    ATTR_PRIORITY,
    ATTR_USE_CANDIDATE,
];

/// Answers one datagram received on `received_on` from `client`.
///
/// A Binding request gets a success response with XOR-MAPPED-ADDRESS, MAPPED-ADDRESS,
/// RESPONSE-ORIGIN, OTHER-ADDRESS, SOFTWARE and FINGERPRINT, from the socket that
/// received it or, when CHANGE-REQUEST asks for a port change, from the other one. An
/// unknown comprehension-required attribute or a change-IP request gets a 420 error
/// response listing them. Anything else is dropped.
pub fn answer(
    datagram: &[u8],
    client: SocketAddr,
    received_on: StunPort,
    addrs: StunAddrs,
) -> Result<Reply, Dropped> {
    let request = decode_binding_request(datagram)?;
    // A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; they know themselves
    // by the IPv4 address.
    let client = SocketAddr::new(client.ip().to_canonical(), client.port());

    let mut unknown: Vec<AttrType> = request
        .attributes
        .0
        .iter()
        .map(|a| a.typ)
        .filter(|t| t.required() && !UNDERSTOOD.contains(t))
        .collect();
    let mut from = received_on;
    let (change, present) = request.attributes.get(ATTR_CHANGE_REQUEST);
    if present {
        let flags: [u8; 4] = change
            .value
            .as_slice()
            .try_into()
            .map_err(|_| Dropped::BadChangeRequest)?;
        let flags = u32::from_be_bytes(flags);
        if flags & CHANGE_IP != 0 {
            // One IP address only: the client must not believe an IP change happened.
            unknown.push(ATTR_CHANGE_REQUEST);
        } else if flags & CHANGE_PORT != 0 {
            from = received_on.other();
        }
    }
    unknown.dedup();

    let kind = if unknown.is_empty() {
        ReplyKind::Success
    } else {
        // Errors leave from the socket that received the request: the client asked for
        // something this server cannot do, so nothing was changed.
        from = received_on;
        ReplyKind::Error
    };
    let response =
        encode_response(&request, kind, client, from, &unknown, addrs).map_err(Dropped::Encode)?;
    Ok(Reply {
        bytes: response.raw,
        from,
        kind,
    })
}

/// Encodes the success or error response to `request`, leaving from socket `from`.
fn encode_response(
    request: &Message,
    kind: ReplyKind,
    client: SocketAddr,
    from: StunPort,
    unknown: &[AttrType],
    addrs: StunAddrs,
) -> Result<Message, String> {
    let mut m = Message::new();
    let typ = match kind {
        ReplyKind::Success => BINDING_SUCCESS,
        ReplyKind::Error => BINDING_ERROR,
    };
    m.build(&[Box::new(request.clone()), Box::new(typ)])
        .map_err(|e| e.to_string())?;
    let as_mapped = |a: SocketAddr| MappedAddress {
        ip: a.ip(),
        port: a.port(),
    };
    match kind {
        ReplyKind::Success => {
            XorMappedAddress {
                ip: client.ip(),
                port: client.port(),
            }
            .add_to(&mut m)
            .map_err(|e| e.to_string())?;
            // For RFC 3489 clients; costs 12 bytes.
            as_mapped(client)
                .add_to(&mut m)
                .map_err(|e| e.to_string())?;
            as_mapped(addrs.of(from))
                .add_to_as(&mut m, ATTR_RESPONSE_ORIGIN)
                .map_err(|e| e.to_string())?;
            as_mapped(addrs.of(from.other()))
                .add_to_as(&mut m, ATTR_OTHER_ADDRESS)
                .map_err(|e| e.to_string())?;
        }
        ReplyKind::Error => {
            ErrorCodeAttribute {
                code: CODE_UNKNOWN_ATTRIBUTE,
                reason: b"Unknown Attribute".to_vec(),
            }
            .add_to(&mut m)
            .map_err(|e| e.to_string())?;
            UnknownAttributes(unknown.to_vec())
                .add_to(&mut m)
                .map_err(|e| e.to_string())?;
        }
    }
    TextAttribute::new(ATTR_SOFTWARE, SOFTWARE.to_owned())
        .add_to(&mut m)
        .map_err(|e| e.to_string())?;
    FINGERPRINT.add_to(&mut m).map_err(|e| e.to_string())?;
    Ok(m)
}

/// Checks the framing, decodes, and accepts only a Binding request whose FINGERPRINT, if
/// any, is last and right.
fn decode_binding_request(datagram: &[u8]) -> Result<Message, Dropped> {
    if datagram.len() < MESSAGE_HEADER_SIZE {
        return Err(Dropped::Truncated);
    }
    // The two leading bits are zero in every STUN message (RFC 8489 §5); this is what
    // tells STUN apart from the other protocols multiplexed on a port.
    if datagram[0] & 0xC0 != 0
        || u32::from_be_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]) != MAGIC_COOKIE
    {
        return Err(Dropped::NotStun);
    }
    let length = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
    if length % 4 != 0 {
        return Err(Dropped::NotStun);
    }
    if MESSAGE_HEADER_SIZE + length != datagram.len() {
        return Err(Dropped::Truncated);
    }
    let mut request = Message::new();
    request
        .unmarshal_binary(datagram)
        .map_err(|e| Dropped::Undecodable(e.to_string()))?;
    if request.typ != BINDING_REQUEST {
        return Err(Dropped::NotBindingRequest);
    }
    let attributes = &request.attributes.0;
    if let Some(i) = attributes.iter().position(|a| a.typ == ATTR_FINGERPRINT) {
        if i + 1 != attributes.len() || FINGERPRINT.check(&request).is_err() {
            return Err(Dropped::BadFingerprint);
        }
    }
    Ok(request)
}

/// The server's two UDP sockets, on one IP address.
#[derive(Debug)]
pub struct StunSockets {
    primary: UdpSocket,
    alternate: UdpSocket,
}

impl StunSockets {
    /// Binds the primary port `port` and the alternate port `port + 1` on `ip`.
    pub async fn bind(ip: IpAddr, port: u16) -> Result<Self, ServerError> {
        let Some(alternate_port) = port.checked_add(1).filter(|_| port != 0) else {
            return Err(ServerError::StunPort(port));
        };
        let bind = |port| async move {
            let addr = SocketAddr::new(ip, port);
            UdpSocket::bind(addr)
                .await
                .map_err(|source| ServerError::StunBind { addr, source })
        };
        Ok(Self {
            primary: bind(port).await?,
            alternate: bind(alternate_port).await?,
        })
    }

    /// Uses two sockets bound by the caller (tests bind `127.0.0.1:0` twice). They must be
    /// on the same IP address; the ports may be any.
    pub fn new(primary: UdpSocket, alternate: UdpSocket) -> std::io::Result<Self> {
        let (p, a) = (primary.local_addr()?, alternate.local_addr()?);
        if p.ip() != a.ip() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the STUN sockets must share one IP address, not {p} and {a}"),
            ));
        }
        Ok(Self { primary, alternate })
    }

    /// The sockets' addresses.
    pub fn addrs(&self) -> std::io::Result<StunAddrs> {
        Ok(StunAddrs {
            primary: self.primary.local_addr()?,
            alternate: self.alternate.local_addr()?,
        })
    }

    fn socket(&self, port: StunPort) -> &UdpSocket {
        match port {
            StunPort::Primary => &self.primary,
            StunPort::Alternate => &self.alternate,
        }
    }
}

/// Starts one answering task per socket; they stop when `shutdown` turns `true`.
pub(crate) fn spawn(
    sockets: StunSockets,
    addrs: StunAddrs,
    shutdown: &watch::Sender<bool>,
) -> Vec<JoinHandle<()>> {
    let sockets = Arc::new(sockets);
    [StunPort::Primary, StunPort::Alternate]
        .into_iter()
        .map(|port| {
            tokio::spawn(answer_on(
                port,
                Arc::clone(&sockets),
                addrs,
                shutdown.subscribe(),
            ))
        })
        .collect()
}

async fn answer_on(
    port: StunPort,
    sockets: Arc<StunSockets>,
    addrs: StunAddrs,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let received = tokio::select! {
            r = sockets.socket(port).recv_from(&mut buf) => r,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (n, client) = match received {
            Ok(r) => r,
            // ICMP errors from earlier sends surface here on some systems; the socket is
            // still fine.
            Err(e) => {
                tracing::debug!(?port, "STUN receive failed: {e}");
                continue;
            }
        };
        match answer(&buf[..n], client, port, addrs) {
            Ok(reply) => {
                telemetry::stun_answered(reply.kind);
                if let Err(e) = sockets
                    .socket(reply.from)
                    .send_to(&reply.bytes, client)
                    .await
                {
                    tracing::debug!(%client, "STUN answer not sent: {e}");
                }
            }
            Err(why) => {
                telemetry::stun_malformed();
                tracing::trace!(%client, "STUN datagram dropped: {why}");
            }
        }
    }
}

/// Puts the STUN server first in the rooms' ICE servers (as [`ice_servers`] describes it
/// for the hosts of [`advertised_hosts`]) and says in the log where it listens and how
/// clients are told to reach it.
pub(crate) fn advertise(
    sockets: StunSockets,
    config: &mut crate::Config,
) -> Result<(StunSockets, StunAddrs), ServerError> {
    let addrs = sockets.addrs().map_err(ServerError::StunSockets)?;
    let hosts = advertised_hosts(config.public_host.as_deref(), addrs.primary.ip());
    if hosts.is_empty() {
        tracing::warn!(
            "STUN on {} and {}, but no address to tell clients: set --public-host",
            addrs.primary,
            addrs.alternate
        );
    } else {
        tracing::info!(
            "STUN on {} and {}, told to clients as {}",
            addrs.primary,
            addrs.alternate,
            hosts.join(", ")
        );
    }
    let mut servers = ice_servers(&hosts, addrs);
    servers.append(&mut config.room.ice_servers);
    config.room.ice_servers = servers;
    Ok((sockets, addrs))
}

/// The ICE server entries for this STUN server: one per host name, each with the
/// primary and the alternate URL (clients probe their NAT's mapping with the two).
pub fn ice_servers(hosts: &[String], addrs: StunAddrs) -> Vec<IceServer> {
    hosts
        .iter()
        .map(|host| {
            let host = url_host(host);
            IceServer {
                urls: vec![
                    format!("stun:{host}:{}", addrs.primary.port()),
                    format!("stun:{host}:{}", addrs.alternate.port()),
                ],
                username: None,
                credential: None,
            }
        })
        .collect()
}

/// A host as it appears in a URL: IPv6 addresses in brackets.
fn url_host(host: &str) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => host.to_owned(),
    }
}

/// The names clients reach the STUN server by: `public_host` when set, else the bind
/// address when it is a specific one, else every non-loopback, non-link-local address of
/// the machine's interfaces (of the bind address's family; both for `::`, which Linux
/// binds dual-stack).
pub fn advertised_hosts(public_host: Option<&str>, bind_ip: IpAddr) -> Vec<String> {
    if let Some(host) = public_host {
        return vec![host.to_owned()];
    }
    if !bind_ip.is_unspecified() {
        return vec![bind_ip.to_string()];
    }
    let interfaces = match if_addrs::get_if_addrs() {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!("cannot list the network interfaces: {e}");
            return Vec::new();
        }
    };
    let mut hosts: Vec<IpAddr> = interfaces
        .iter()
        .map(|i| i.ip())
        .filter(|ip| !ip.is_loopback() && !is_link_local(*ip))
        .filter(|ip| bind_ip.is_ipv6() || ip.is_ipv4())
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts.into_iter().map(|ip| ip.to_string()).collect()
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rtc_stun::attributes::RawAttribute;
    use rtc_stun::message::TransactionId;

    fn addrs() -> StunAddrs {
        StunAddrs {
            primary: "192.0.2.1:3478".parse().unwrap(),
            alternate: "192.0.2.1:3479".parse().unwrap(),
        }
    }

    fn client() -> SocketAddr {
        "198.51.100.7:40000".parse().unwrap()
    }

    /// A Binding request with these extra attributes, and FINGERPRINT if asked.
    fn request(extra: &[RawAttribute], fingerprint: bool) -> Vec<u8> {
        let mut m = Message::new();
        m.build(&[Box::new(BINDING_REQUEST), Box::new(TransactionId::new())])
            .unwrap();
        for a in extra {
            m.add(a.typ, &a.value);
        }
        if fingerprint {
            FINGERPRINT.add_to(&mut m).unwrap();
        }
        m.raw
    }

    fn change_request(flags: u32) -> RawAttribute {
        RawAttribute {
            typ: ATTR_CHANGE_REQUEST,
            length: 4,
            value: flags.to_be_bytes().to_vec(),
        }
    }

    fn decode(bytes: &[u8]) -> Message {
        let mut m = Message::new();
        m.unmarshal_binary(bytes).unwrap();
        FINGERPRINT.check(&m).unwrap();
        m
    }

    fn address(m: &Message, t: AttrType) -> SocketAddr {
        let mut a = MappedAddress::default();
        a.get_from_as(m, t).unwrap();
        SocketAddr::new(a.ip, a.port)
    }

    #[test]
    fn binding_request_gets_the_mapped_address_and_both_server_addresses() {
        let req = request(&[], true);
        let reply = answer(&req, client(), StunPort::Primary, addrs()).unwrap();
        assert_eq!(
            (reply.from, reply.kind),
            (StunPort::Primary, ReplyKind::Success)
        );
        // The size docs/operations.md quotes for the amplification factor.
        assert_eq!(reply.bytes.len(), 88);
        let m = decode(&reply.bytes);
        assert_eq!(m.typ, BINDING_SUCCESS);
        assert_eq!(m.transaction_id.0, req[8..20]);
        let mut x = XorMappedAddress::default();
        x.get_from_as(&m, rtc_stun::attributes::ATTR_XORMAPPED_ADDRESS)
            .unwrap();
        assert_eq!(SocketAddr::new(x.ip, x.port), client());
        assert_eq!(
            address(&m, rtc_stun::attributes::ATTR_MAPPED_ADDRESS),
            client()
        );
        assert_eq!(address(&m, ATTR_RESPONSE_ORIGIN), addrs().primary);
        assert_eq!(address(&m, ATTR_OTHER_ADDRESS), addrs().alternate);
        // Without FINGERPRINT in the request (RFC 3489-era clients) it is answered too.
        let reply = answer(&request(&[], false), client(), StunPort::Alternate, addrs());
        let m = decode(&reply.unwrap().bytes);
        assert_eq!(address(&m, ATTR_RESPONSE_ORIGIN), addrs().alternate);
        assert_eq!(address(&m, ATTR_OTHER_ADDRESS), addrs().primary);
    }

    #[test]
    fn change_port_answers_from_the_other_socket_and_change_ip_is_refused() {
        let req = request(&[change_request(CHANGE_PORT)], true);
        let reply = answer(&req, client(), StunPort::Primary, addrs()).unwrap();
        assert_eq!(reply.from, StunPort::Alternate);
        let m = decode(&reply.bytes);
        assert_eq!(address(&m, ATTR_RESPONSE_ORIGIN), addrs().alternate);

        let req = request(&[change_request(CHANGE_IP | CHANGE_PORT)], true);
        let reply = answer(&req, client(), StunPort::Primary, addrs()).unwrap();
        assert_eq!(
            (reply.from, reply.kind),
            (StunPort::Primary, ReplyKind::Error)
        );
        let m = decode(&reply.bytes);
        assert_eq!(m.typ, BINDING_ERROR);
        let mut code = ErrorCodeAttribute::default();
        rtc_stun::message::Getter::get_from(&mut code, &m).unwrap();
        assert!(code.code == CODE_UNKNOWN_ATTRIBUTE);
        let mut unknown = UnknownAttributes(Vec::new());
        rtc_stun::message::Getter::get_from(&mut unknown, &m).unwrap();
        assert_eq!(unknown.0, vec![ATTR_CHANGE_REQUEST]);

        // No flag: an ordinary answer.
        let req = request(&[change_request(0)], true);
        let reply = answer(&req, client(), StunPort::Alternate, addrs()).unwrap();
        assert_eq!(reply.from, StunPort::Alternate);
    }

    #[test]
    fn unknown_required_attributes_get_420_and_optional_ones_are_ignored() {
        let odd = |typ| RawAttribute {
            typ: AttrType(typ),
            length: 2,
            value: vec![1, 2],
        };
        let reply = answer(
            &request(&[odd(0x7777)], true),
            client(),
            StunPort::Primary,
            addrs(),
        );
        assert_eq!(reply.unwrap().kind, ReplyKind::Error);
        let reply = answer(
            &request(&[odd(0xC777)], true),
            client(),
            StunPort::Primary,
            addrs(),
        );
        assert_eq!(reply.unwrap().kind, ReplyKind::Success);
    }

    #[test]
    fn what_is_not_a_valid_binding_request_is_dropped() {
        let good = request(&[], true);
        assert_eq!(
            answer(&good[..19], client(), StunPort::Primary, addrs()),
            Err(Dropped::Truncated)
        );
        assert_eq!(
            answer(
                &good[..good.len() - 4],
                client(),
                StunPort::Primary,
                addrs()
            ),
            Err(Dropped::Truncated)
        );
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(
            answer(&bad, client(), StunPort::Primary, addrs()),
            Err(Dropped::BadFingerprint)
        );
        let mut m = Message::new();
        m.build(&[
            Box::new(BINDING_SUCCESS),
            Box::new(TransactionId::new()),
            Box::new(FINGERPRINT),
        ])
        .unwrap();
        assert_eq!(
            answer(&m.raw, client(), StunPort::Primary, addrs()),
            Err(Dropped::NotBindingRequest)
        );
        let mut cookie = good.clone();
        cookie[4] ^= 0xff;
        assert_eq!(
            answer(&cookie, client(), StunPort::Primary, addrs()),
            Err(Dropped::NotStun)
        );
        let req = request(&[change_request(0)], true);
        let mut short = req.clone();
        // CHANGE-REQUEST declared two bytes long instead of four.
        short[22..24].copy_from_slice(&2u16.to_be_bytes());
        assert!(answer(&short, client(), StunPort::Primary, addrs()).is_err());
    }

    #[test]
    fn ipv4_clients_of_a_dual_stack_socket_see_their_ipv4_address() {
        let v6 = StunAddrs {
            primary: "[2001:db8::1]:3478".parse().unwrap(),
            alternate: "[2001:db8::1]:3479".parse().unwrap(),
        };
        let client6: SocketAddr = "[2001:db8::9]:40000".parse().unwrap();
        let reply = answer(&request(&[], false), client6, StunPort::Primary, v6).unwrap();
        assert_eq!(reply.bytes.len(), 136);
        let mapped: SocketAddr = "[::ffff:198.51.100.7]:40000".parse().unwrap();
        let reply = answer(&request(&[], true), mapped, StunPort::Primary, addrs()).unwrap();
        let m = decode(&reply.bytes);
        let mut x = XorMappedAddress::default();
        x.get_from_as(&m, rtc_stun::attributes::ATTR_XORMAPPED_ADDRESS)
            .unwrap();
        assert_eq!(SocketAddr::new(x.ip, x.port), client());
    }

    #[test]
    fn urls_bracket_ipv6_hosts() {
        let servers = ice_servers(&["2001:db8::1".into(), "stun.example".into()], addrs());
        assert_eq!(
            servers[0].urls,
            ["stun:[2001:db8::1]:3478", "stun:[2001:db8::1]:3479"]
        );
        assert_eq!(
            servers[1].urls,
            ["stun:stun.example:3478", "stun:stun.example:3479"]
        );
        assert_eq!(
            advertised_hosts(None, "10.0.0.5".parse().unwrap()),
            ["10.0.0.5"]
        );
        assert_eq!(
            advertised_hosts(Some("a.example"), "0.0.0.0".parse().unwrap()),
            ["a.example"]
        );
        for host in advertised_hosts(None, "0.0.0.0".parse().unwrap()) {
            let ip: IpAddr = host.parse().unwrap();
            assert!(ip.is_ipv4() && !ip.is_loopback(), "{ip}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random bytes never panic, and whatever is answered is a Binding response.
        #[test]
        fn random_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(reply) = answer(&bytes, client(), StunPort::Primary, addrs()) {
                let m = decode(&reply.bytes);
                prop_assert!(m.typ == BINDING_SUCCESS || m.typ == BINDING_ERROR);
            }
        }

        /// A well-formed header (Binding request, magic cookie, right length) before random
        /// attribute bytes: the attribute decoder sees everything.
        #[test]
        fn random_attributes_never_panic(
            words in proptest::collection::vec(any::<[u8; 4]>(), 0..40),
            tid in any::<[u8; 12]>(),
        ) {
            let mut bytes = vec![0x00, 0x01];
            bytes.extend_from_slice(&((words.len() * 4) as u16).to_be_bytes());
            bytes.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
            bytes.extend_from_slice(&tid);
            bytes.extend(words.into_iter().flatten());
            if let Ok(reply) = answer(&bytes, client(), StunPort::Primary, addrs()) {
                let m = decode(&reply.bytes);
                prop_assert_eq!(&m.raw[8..20], &tid[..]);
            }
        }

        /// Valid requests with bytes flipped, cut or appended: no panic; an answer only if
        /// the result is still a Binding request.
        #[test]
        fn mutated_requests_never_panic(
            change in proptest::option::of(any::<u32>()),
            fingerprint in any::<bool>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in proptest::option::of(any::<prop::sample::Index>()),
            tail in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let extra: Vec<RawAttribute> = change.map(change_request).into_iter().collect();
            let mut bytes = request(&extra, fingerprint);
            for (at, mask) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= mask;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes.extend_from_slice(&tail);
            if let Ok(reply) = answer(&bytes, client(), StunPort::Alternate, addrs()) {
                let m = decode(&reply.bytes);
                prop_assert_eq!(&m.raw[8..20], &bytes[8..20]);
            }
        }
    }
}
