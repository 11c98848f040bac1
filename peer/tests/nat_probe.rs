//! The NAT probe against the signaller's embedded STUN server on loopback, where there is
//! no NAT: the class is `public`. The probe alone, then a broadcaster and a viewer that
//! use the signaller's ICE servers, probe after `welcome` and tell the room.
//! (NAT behaviours themselves are tested in network namespaces.)

mod common;

use std::time::Duration;

use common::{LIVENESS, TestSignaller, wait_until};
use tokio::net::UdpSocket;
use treecast_core::protocol::NatClass;
use treecast_peer::nat::{self, SignallerStun};
use treecast_peer::{Peer, Role};

#[tokio::test]
async fn loopback_has_no_nat() {
    let server = TestSignaller::start_with_stun().await;
    let (primary, alternate) = server.stun.unwrap();
    let probed = nat::probe(
        "127.0.0.1:0".parse().unwrap(),
        primary,
        alternate,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(probed.nat, NatClass::Public, "{probed:?}");
    assert_eq!(probed.mapped_primary, Some(probed.local));
    assert_eq!(probed.mapped_alternate, Some(probed.local));

    // Nothing listens on a port just closed: no answer at all.
    let closed = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let nowhere = closed.local_addr().unwrap();
    drop(closed);
    let probed = nat::probe(
        "127.0.0.1:0".parse().unwrap(),
        nowhere,
        alternate,
        Duration::from_millis(500),
    )
    .await
    .unwrap();
    assert_eq!(probed.nat, NatClass::Blocked, "{probed:?}");
}

#[tokio::test]
async fn peers_probe_after_welcome_and_tell_the_room() {
    let server = TestSignaller::start_with_stun().await;
    let with_ice_servers = |role| {
        let mut c = server.peer_config(role);
        c.use_ice_servers = true;
        c
    };
    let broadcaster = Peer::start(with_ice_servers(Role::Broadcaster)).unwrap();
    let viewer = Peer::start(with_ice_servers(Role::Viewer)).unwrap();

    for (who, peer) in [("broadcaster", &broadcaster), ("viewer", &viewer)] {
        wait_until(&format!("the {who}'s NAT probe"), LIVENESS, || {
            peer.stats().nat_probe.lock().unwrap().is_some()
        })
        .await;
        let probed = peer.stats().nat_probe.lock().unwrap().clone().unwrap();
        assert_eq!(probed.nat, NatClass::Public, "{who}: {probed:?}");
    }
    // The room heard it, and media flows with the STUN server among the ICE servers.
    let deadline = tokio::time::Instant::now() + LIVENESS;
    loop {
        let snap = server.snapshot().await;
        let peers = snap["peers"].as_array().unwrap();
        if peers.len() == 2 && peers.iter().all(|p| p["nat"] == "public") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the room never learned both classes: {snap}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_until("media at the viewer", LIVENESS, || {
        viewer
            .stats()
            .packets_received
            .load(std::sync::atomic::Ordering::Relaxed)
            > 50
    })
    .await;
    viewer.leave().await;
    broadcaster.leave().await;
    server.stop().await;
}

#[tokio::test]
async fn the_entry_resolves_to_the_server_ports() {
    let stun = SignallerStun {
        host: "127.0.0.1".into(),
        primary_port: 3478,
        alternate_port: 3479,
    };
    let (p, a) = stun.resolve("127.0.0.1".parse().unwrap()).await.unwrap();
    assert_eq!(
        (p, a),
        (
            "127.0.0.1:3478".parse().unwrap(),
            "127.0.0.1:3479".parse().unwrap()
        )
    );
    assert!(
        stun.resolve("::1".parse().unwrap()).await.is_err(),
        "an IPv4 server is not usable from an IPv6 socket"
    );
}
