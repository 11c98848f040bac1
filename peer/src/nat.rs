//! The NAT class of this host, probed against the signaller's STUN server (RFC 5780's
//! behaviour discovery, reduced to what placement needs).
//!
//! [`probe`] uses one UDP socket and three tests, each a Binding request retransmitted
//! with a doubling timer (RFC 8489 §6.2.1, with a 100 ms first interval because the
//! answer only decides a class) until the test's timeout:
//! 1. to the primary port: no answer at all means [`NatClass::Blocked`]; a mapped address
//!    equal to the socket's own means [`NatClass::Public`];
//! 2. to the primary port with CHANGE-REQUEST (change port): whether the answer, sent from
//!    the alternate port, gets through the NAT. This runs before anything is sent to the
//!    alternate port, or the NAT would take its answer for a reply;
//! 3. to the alternate port: another mapped address (a new port per destination) means
//!    [`NatClass::Symmetric`]; no answer from that port alone leaves the class
//!    [`NatClass::Unknown`]; the same one means [`NatClass::FullCone`] if test 2's answer
//!    got through (the NAT does not filter by remote port), else [`NatClass::Cone`].
//!
//! A NAT's mapping behaviour belongs to the NAT, not to the socket, so the result of a
//! probe from any port of the host holds for the media sockets too.
//!
//! The native peer probes once after its first `welcome` when it uses the ICE servers
//! (see [`SignallerStun`]) and tells the room with a `connectivity` message.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::Duration;

use rtc::stun::addr::MappedAddress;
use rtc::stun::attributes::{ATTR_CHANGE_REQUEST, ATTR_MAPPED_ADDRESS, ATTR_XORMAPPED_ADDRESS};
use rtc::stun::fingerprint::FINGERPRINT;
use rtc::stun::message::{
    BINDING_REQUEST, CLASS_ERROR_RESPONSE, CLASS_SUCCESS_RESPONSE, METHOD_BINDING, Message, Setter,
    TransactionId,
};
use rtc::stun::xoraddr::XorMappedAddress;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use treecast_core::protocol::{IceServer, NatClass};

/// CHANGE-REQUEST's change-port flag (RFC 5780 §7.2).
const CHANGE_PORT: u32 = 0x02;
/// First retransmission interval; doubled after every send.
const FIRST_RTO: Duration = Duration::from_millis(100);
/// Longest interval between two sends of one request.
const MAX_RTO: Duration = Duration::from_millis(1600);

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// The class.
    pub nat: NatClass,
    /// The probing socket's own address (for a wildcard bind, the address the host sends
    /// from toward the server).
    pub local: SocketAddr,
    /// The mapped (server-reflexive) address the primary port saw, if it answered.
    pub mapped_primary: Option<SocketAddr>,
    /// The mapped address the alternate port saw, if it answered.
    pub mapped_alternate: Option<SocketAddr>,
}

/// Why a probe could not run. No answer is not an error: it is [`NatClass::Blocked`].
#[derive(Debug, thiserror::Error)]
pub enum NatProbeError {
    /// The probing socket could not be bound or has no address.
    #[error("cannot bind a UDP socket on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server's addresses are not of the local address's family.
    #[error("cannot reach the STUN server {server} from {local}: other address family")]
    Family {
        /// The local address.
        local: SocketAddr,
        /// The server's primary address.
        server: SocketAddr,
    },
    /// The STUN server's host name did not resolve to a usable address.
    #[error("cannot resolve the STUN server {host}: {reason}")]
    Resolve {
        /// The host from the URL.
        host: String,
        /// Why.
        reason: String,
    },
}

/// Probes the NAT class of the host from a socket bound on `local_bind` (port 0 is
/// fine), against a STUN server's `primary` and `alternate` ports on one IP address.
/// Each of the (at most three) tests waits up to `timeout` for its answer, so a probe
/// behind a port-restricted or symmetric NAT takes a little over `timeout`, and one with
/// no answer at all exactly `timeout`.
pub async fn probe(
    local_bind: SocketAddr,
    primary: SocketAddr,
    alternate: SocketAddr,
    timeout: Duration,
) -> Result<ProbeResult, NatProbeError> {
    if local_bind.is_ipv4() != primary.is_ipv4() || primary.is_ipv4() != alternate.is_ipv4() {
        return Err(NatProbeError::Family {
            local: local_bind,
            server: primary,
        });
    }
    let bind_error = |source| NatProbeError::Bind {
        addr: local_bind,
        source,
    };
    let socket = UdpSocket::bind(local_bind).await.map_err(bind_error)?;
    let mut local = socket.local_addr().map_err(bind_error)?;
    if local.ip().is_unspecified() {
        local.set_ip(source_ip_toward(primary).await.map_err(bind_error)?);
    }
    let mut result = ProbeResult {
        nat: NatClass::Blocked,
        local,
        mapped_primary: None,
        mapped_alternate: None,
    };

    let Some(Answer::Mapped(first, _)) = transact(&socket, primary, None, timeout).await else {
        return Ok(result);
    };
    result.mapped_primary = Some(first);
    let public = canonical(first) == canonical(local);
    // The filtering test comes before the socket ever sends to the alternate port:
    // afterwards the NAT would let that port's answers in as replies.
    let unfiltered = !public
        && matches!(
            transact(&socket, primary, Some(CHANGE_PORT), timeout).await,
            Some(Answer::Mapped(_, from)) if from != primary
        );
    result.mapped_alternate = match transact(&socket, alternate, None, timeout).await {
        Some(Answer::Mapped(mapped, _)) => Some(mapped),
        _ => None,
    };
    result.nat = match result.mapped_alternate {
        _ if public => NatClass::Public,
        None => NatClass::Unknown,
        Some(second) if second != first => NatClass::Symmetric,
        Some(_) if unfiltered => NatClass::FullCone,
        Some(_) => NatClass::Cone,
    };
    Ok(result)
}

/// The address the host would send from toward `to` (connecting a UDP socket sends
/// nothing; it only picks the route).
async fn source_ip_toward(to: SocketAddr) -> std::io::Result<IpAddr> {
    let any: SocketAddr = if to.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let scratch = UdpSocket::bind(any).await?;
    scratch.connect(to).await?;
    Ok(scratch.local_addr()?.ip())
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A STUN answer.
enum Answer {
    /// A success response: the mapped address, and where the answer came from.
    Mapped(SocketAddr, SocketAddr),
    /// An error response.
    Refused,
}

/// Sends a Binding request to `to` (with CHANGE-REQUEST flags if given), retransmitting,
/// until its answer arrives or `timeout` passes.
async fn transact(
    socket: &UdpSocket,
    to: SocketAddr,
    change: Option<u32>,
    timeout: Duration,
) -> Option<Answer> {
    let request = binding_request(change)?;
    let deadline = Instant::now() + timeout;
    let mut rto = FIRST_RTO;
    let mut next_send = Instant::now();
    let mut buf = vec![0u8; 2048];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        if now >= next_send {
            // A failed send (no route, say) is like a lost one: the deadline decides.
            if let Err(e) = socket.send_to(&request.raw, to).await {
                tracing::debug!(%to, "STUN request not sent: {e}");
            }
            next_send = now + rto;
            rto = (rto * 2).min(MAX_RTO);
        }
        let wait = next_send.min(deadline);
        let Ok(received) = tokio::time::timeout_at(wait, socket.recv_from(&mut buf)).await else {
            continue;
        };
        let Ok((n, from)) = received else { continue };
        if let Some(answer) = parse_answer(&buf[..n], &request, from) {
            return Some(answer);
        }
    }
}

fn binding_request(change: Option<u32>) -> Option<Message> {
    let mut m = Message::new();
    m.build(&[Box::new(BINDING_REQUEST), Box::new(TransactionId::new())])
        .ok()?;
    if let Some(flags) = change {
        m.add(ATTR_CHANGE_REQUEST, &flags.to_be_bytes());
    }
    FINGERPRINT.add_to(&mut m).ok()?;
    Some(m)
}

/// The answer to `request` in a datagram, if it is one.
fn parse_answer(datagram: &[u8], request: &Message, from: SocketAddr) -> Option<Answer> {
    let mut m = Message::new();
    m.unmarshal_binary(datagram).ok()?;
    if m.transaction_id != request.transaction_id || m.typ.method != METHOD_BINDING {
        return None;
    }
    if m.typ.class == CLASS_ERROR_RESPONSE {
        return Some(Answer::Refused);
    }
    if m.typ.class != CLASS_SUCCESS_RESPONSE {
        return None;
    }
    let mut xor = XorMappedAddress::default();
    if xor.get_from_as(&m, ATTR_XORMAPPED_ADDRESS).is_ok() {
        return Some(Answer::Mapped(SocketAddr::new(xor.ip, xor.port), from));
    }
    let mut plain = MappedAddress::default();
    plain.get_from_as(&m, ATTR_MAPPED_ADDRESS).ok()?;
    Some(Answer::Mapped(SocketAddr::new(plain.ip, plain.port), from))
}

/// The signaller's own STUN server in an ICE server list: an entry with two `stun:`
/// URLs on one host (its primary and alternate ports), as the signaller hands out first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignallerStun {
    /// Host as written in the URLs (IPv6 in brackets).
    pub host: String,
    /// The primary port.
    pub primary_port: u16,
    /// The alternate port.
    pub alternate_port: u16,
}

impl SignallerStun {
    /// The first entry of `servers` that looks like the signaller's STUN server.
    pub fn find(servers: &[IceServer]) -> Option<Self> {
        servers.iter().find_map(|s| match s.urls.as_slice() {
            [a, b] => {
                let (host, primary_port) = stun_url(a)?;
                let (other, alternate_port) = stun_url(b)?;
                (host == other && primary_port != alternate_port).then(|| Self {
                    host: host.to_owned(),
                    primary_port,
                    alternate_port,
                })
            }
            _ => None,
        })
    }

    /// The server's primary and alternate addresses, of the family of `local` (any
    /// family when `local` is a wildcard address, IPv4 first).
    pub async fn resolve(&self, local: IpAddr) -> Result<(SocketAddr, SocketAddr), NatProbeError> {
        let fail = |reason: String| NatProbeError::Resolve {
            host: self.host.clone(),
            reason,
        };
        let found: Vec<SocketAddr> =
            tokio::net::lookup_host(format!("{}:{}", self.host, self.primary_port))
                .await
                .map_err(|e| fail(e.to_string()))?
                .collect();
        let usable = |a: &&SocketAddr| local.is_unspecified() || a.is_ipv4() == local.is_ipv4();
        let primary = found
            .iter()
            .filter(usable)
            .min_by_key(|a| a.is_ipv6())
            .copied()
            .ok_or_else(|| fail(format!("no address usable from {local}")))?;
        Ok((primary, SocketAddr::new(primary.ip(), self.alternate_port)))
    }

    /// Resolves and probes from `bind_ip`, waiting up to `timeout` per test: from any
    /// port, or from the first free one of `ports` when the media sockets are confined to
    /// them. A router may treat those ports differently from the rest (one that forwards
    /// exactly them is a full cone for them only), so the class that counts is theirs.
    pub async fn probe(
        &self,
        bind_ip: IpAddr,
        ports: Option<RangeInclusive<u16>>,
        timeout: Duration,
    ) -> Result<ProbeResult, NatProbeError> {
        let (primary, alternate) = self.resolve(bind_ip).await?;
        let bind_ip = match (bind_ip.is_unspecified(), primary.ip()) {
            (true, IpAddr::V4(_)) => IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
            (true, IpAddr::V6(_)) => IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
            (false, _) => bind_ip,
        };
        let Some(ports) = ports else {
            return probe(SocketAddr::new(bind_ip, 0), primary, alternate, timeout).await;
        };
        // Media connections hold some of the ports: a port in use only means "try the next".
        let mut last = None;
        for port in ports {
            match probe(SocketAddr::new(bind_ip, port), primary, alternate, timeout).await {
                Err(e @ NatProbeError::Bind { .. }) => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or(NatProbeError::Bind {
            addr: SocketAddr::new(bind_ip, 0),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no port in the range"),
        }))
    }
}

/// `stun:HOST:PORT` -> (HOST, PORT); `None` for other schemes or no port.
fn stun_url(url: &str) -> Option<(&str, u16)> {
    let rest = url.strip_prefix("stun:")?;
    let rest = rest.split('?').next()?;
    let (host, port) = rest.rsplit_once(':')?;
    if host.is_empty() || (host.contains(':') && !host.starts_with('[')) {
        return None;
    }
    Some((host, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(urls: &[&str]) -> IceServer {
        IceServer {
            urls: urls.iter().map(|u| (*u).to_owned()).collect(),
            username: None,
            credential: None,
        }
    }

    #[test]
    fn the_signaller_entry_is_two_stun_urls_on_one_host() {
        let list = [
            server(&["stun:stun.example:3478"]),
            server(&["turn:a:3478", "turn:a:3479"]),
            server(&["stun:a:3478", "stun:b:3479"]),
            server(&["stun:[2001:db8::1]:3478", "stun:[2001:db8::1]:3479"]),
        ];
        assert_eq!(
            SignallerStun::find(&list),
            Some(SignallerStun {
                host: "[2001:db8::1]".into(),
                primary_port: 3478,
                alternate_port: 3479
            })
        );
        assert_eq!(SignallerStun::find(&list[..3]), None);
        assert_eq!(stun_url("stun:2001:db8::1:3478"), None);
        assert_eq!(stun_url("stun:h:x"), None);
    }
}
