//! The embedded STUN server over real UDP on loopback: Binding answered from both ports,
//! CHANGE-REQUEST answered from the other port, garbage dropped and counted, and the STUN
//! server handed to clients first in `welcome`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Client, LIVENESS, create_room, http, test_config};
use rtc_stun::addr::MappedAddress;
use rtc_stun::attributes::{
    ATTR_CHANGE_REQUEST, ATTR_OTHER_ADDRESS, ATTR_RESPONSE_ORIGIN, ATTR_XORMAPPED_ADDRESS,
};
use rtc_stun::fingerprint::FINGERPRINT;
use rtc_stun::message::{BINDING_REQUEST, BINDING_SUCCESS, Message, Setter, TransactionId};
use rtc_stun::xoraddr::XorMappedAddress;
use serde_json::json;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use treecast_signaller::{Config, StunSockets};

/// A signaller with STUN on two ephemeral UDP ports of 127.0.0.1.
struct StunServer {
    http: SocketAddr,
    primary: SocketAddr,
    alternate: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl StunServer {
    async fn start(config: Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = listener.local_addr().unwrap();
        let primary = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let alternate = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (primary_addr, alternate_addr) = (
            primary.local_addr().unwrap(),
            alternate.local_addr().unwrap(),
        );
        let sockets = StunSockets::new(primary, alternate).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(treecast_signaller::serve_with_stun(
            listener,
            sockets,
            config,
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            http,
            primary: primary_addr,
            alternate: alternate_addr,
            _stop: stop,
        }
    }
}

/// A Binding request, with CHANGE-REQUEST flags if given.
fn binding_request(change: Option<u32>) -> Message {
    let mut m = Message::new();
    m.build(&[Box::new(BINDING_REQUEST), Box::new(TransactionId::new())])
        .unwrap();
    if let Some(flags) = change {
        m.add(ATTR_CHANGE_REQUEST, &flags.to_be_bytes());
    }
    FINGERPRINT.add_to(&mut m).unwrap();
    m
}

/// Sends `request` to `to` (again every 200 ms, as UDP may lose it) until the answer to
/// it arrives; returns the answer and where it came from.
async fn transact(socket: &UdpSocket, request: &Message, to: SocketAddr) -> (Message, SocketAddr) {
    let deadline = tokio::time::Instant::now() + LIVENESS;
    let mut buf = vec![0u8; 2048];
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no STUN answer from {to}"
        );
        socket.send_to(&request.raw, to).await.unwrap();
        let Ok(received) =
            tokio::time::timeout(Duration::from_millis(200), socket.recv_from(&mut buf)).await
        else {
            continue;
        };
        let (n, from) = received.unwrap();
        let mut answer = Message::new();
        if answer.unmarshal_binary(&buf[..n]).is_ok()
            && answer.transaction_id == request.transaction_id
        {
            FINGERPRINT
                .check(&answer)
                .expect("the answer's fingerprint");
            return (answer, from);
        }
    }
}

fn xor_mapped(m: &Message) -> SocketAddr {
    let mut a = XorMappedAddress::default();
    a.get_from_as(m, ATTR_XORMAPPED_ADDRESS).unwrap();
    SocketAddr::new(a.ip, a.port)
}

fn address(m: &Message, t: rtc_stun::attributes::AttrType) -> SocketAddr {
    let mut a = MappedAddress::default();
    a.get_from_as(m, t).unwrap();
    SocketAddr::new(a.ip, a.port)
}

#[tokio::test]
async fn binding_is_answered_from_both_ports_with_the_mapped_address() {
    let server = StunServer::start(test_config()).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = client.local_addr().unwrap();
    for (port, other) in [
        (server.primary, server.alternate),
        (server.alternate, server.primary),
    ] {
        let (answer, from) = transact(&client, &binding_request(None), port).await;
        assert_eq!(answer.typ, BINDING_SUCCESS);
        assert_eq!(from, port);
        assert_eq!(xor_mapped(&answer), me);
        assert_eq!(address(&answer, ATTR_RESPONSE_ORIGIN), port);
        assert_eq!(address(&answer, ATTR_OTHER_ADDRESS), other);
    }
}

#[tokio::test]
async fn change_port_is_answered_from_the_other_port() {
    let server = StunServer::start(test_config()).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (answer, from) = transact(&client, &binding_request(Some(0x02)), server.primary).await;
    assert_eq!(answer.typ, BINDING_SUCCESS);
    assert_eq!(from, server.alternate);
    assert_eq!(address(&answer, ATTR_RESPONSE_ORIGIN), server.alternate);
    assert_eq!(xor_mapped(&answer), client.local_addr().unwrap());
    // This server has one IP address: change-IP is refused, from the port asked.
    let (answer, from) = transact(&client, &binding_request(Some(0x06)), server.primary).await;
    assert_eq!(answer.typ.class, rtc_stun::message::CLASS_ERROR_RESPONSE);
    assert_eq!(from, server.primary);
}

/// The value of an unlabelled counter in a Prometheus text page (0 when absent).
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

#[tokio::test]
async fn garbage_is_dropped_and_counted() {
    let server = StunServer::start(test_config()).await;
    let metrics = || async { http(server.http, "GET", "/metrics", None).await.body };
    let before = counter(&metrics().await, "treecast_stun_malformed_total");
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut response_not_request = binding_request(None);
    response_not_request.typ = BINDING_SUCCESS;
    response_not_request.encode();
    let mut bad_fingerprint = binding_request(None).raw;
    let last = bad_fingerprint.len() - 1;
    bad_fingerprint[last] ^= 0x55;
    let garbage: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0u8; 3],
        binding_request(None).raw[..24].to_vec(),
        response_not_request.raw,
        bad_fingerprint,
    ];
    for g in &garbage {
        client.send_to(g, server.primary).await.unwrap();
    }
    // The socket's task handles datagrams in order: once a valid request behind the
    // garbage is answered, the garbage has been looked at.
    let (answer, _) = transact(&client, &binding_request(None), server.primary).await;
    assert_eq!(answer.typ, BINDING_SUCCESS);
    let mut buf = [0u8; 2048];
    let extra = tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf)).await;
    assert!(
        extra.is_err(),
        "only the valid request is answered, got a datagram more"
    );
    let deadline = tokio::time::Instant::now() + LIVENESS;
    loop {
        let page = metrics().await;
        let after = counter(&page, "treecast_stun_malformed_total");
        if after >= before + garbage.len() as u64 {
            assert!(page.contains("treecast_stun_requests_total{answer=\"success\"}"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "malformed count went from {before} to {after} only"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn welcome_lists_the_stun_server_first_and_nothing_without_it() {
    let mut config = test_config();
    config.room.ice_servers = vec![
        serde_json::from_value(json!({
            "urls": ["turn:turn.example:3478"], "username": "u", "credential": "c"
        }))
        .unwrap(),
    ];
    let server = StunServer::start(config.clone()).await;
    let (room, token) = create_room(server.http).await;
    let mut c = Client::connect(server.http).await;
    c.send_json(&json!({"type": "hello", "room": room, "role": "broadcaster", "token": token}))
        .await;
    let welcome = c.expect_welcome().await;
    let (p, a) = (server.primary.port(), server.alternate.port());
    assert_eq!(
        welcome["ice_servers"],
        json!([
            {"urls": [format!("stun:127.0.0.1:{p}"), format!("stun:127.0.0.1:{a}")]},
            {"urls": ["turn:turn.example:3478"], "username": "u", "credential": "c"},
        ])
    );

    // The public host replaces the bind address in the URLs.
    config.public_host = Some("2001:db8::7".into());
    let server = StunServer::start(config).await;
    let (room, token) = create_room(server.http).await;
    let mut c = Client::connect(server.http).await;
    c.send_json(&json!({"type": "hello", "room": room, "role": "broadcaster", "token": token}))
        .await;
    let welcome = c.expect_welcome().await;
    let p = server.primary.port();
    assert_eq!(
        welcome["ice_servers"][0]["urls"][0],
        format!("stun:[2001:db8::7]:{p}")
    );

    // Without STUN sockets (and by default) no ICE server at all: no third party.
    let plain = common::TestServer::start(test_config()).await;
    let (room, token) = create_room(plain.addr).await;
    let mut c = Client::connect(plain.addr).await;
    c.send_json(&json!({"type": "hello", "room": room, "role": "broadcaster", "token": token}))
        .await;
    let welcome = c.expect_welcome().await;
    assert_eq!(welcome["ice_servers"], json!([]));
}
