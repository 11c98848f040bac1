//! Cluster mode end to end: three signaller nodes on one `redis-server` of the test's own,
//! native peers joining one room through every node (each in-process, on 127.0.0.1).
//!
//! The room is created on the first node, which owns it; the other nodes are edges that
//! forward their peers' messages to it through Redis and deliver its answers. Asserted:
//! every viewer receives media, and the tree is the one a single node builds for the same
//! joins in the same order (placement depends only on the inputs, not on which node a peer
//! reached). Needs Debian's `redis-server` (`scripts/test` installs it and makes it
//! required). Timeouts guard liveness only.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::{LIVENESS, Mark, TestSignaller, count, http, wait_until};
use serde_json::Value;
use treecast_core::agent::Phase;
use treecast_core::turn::Secret;
use treecast_peer::{Peer, PeerConfig, Role};

const NODES: usize = 3;
const VIEWERS: usize = 30;
const KEY: &str = "the cluster's resume key, the same on every node";

fn parents(snapshot: &Value) -> BTreeMap<u64, Option<u64>> {
    snapshot["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| (p["id"].as_u64().unwrap(), p["parent"].as_u64()))
        .collect()
}

/// A broadcaster on `nodes[0]`, then viewers through the nodes in turn, each placed
/// before the next joins; returns the peers once every viewer receives.
async fn join_round_robin(nodes: &[&TestSignaller], room: &str, token: &str) -> Vec<Peer> {
    let config = |node: &TestSignaller, role| {
        let mut c = PeerConfig::new(&node.url, room, role);
        c.use_ice_servers = false;
        if role == Role::Broadcaster {
            c.token = Some(token.to_owned());
        }
        c
    };
    let broadcaster = Peer::start(config(nodes[0], Role::Broadcaster)).unwrap();
    wait_until("the broadcaster is welcomed", LIVENESS, || {
        broadcaster.status().peer_id.is_some()
    })
    .await;
    let mut peers = vec![broadcaster];
    for i in 0..VIEWERS {
        let v = Peer::start(config(nodes[i % nodes.len()], Role::Viewer)).unwrap();
        wait_until("a viewer is placed", LIVENESS, || {
            v.status().depth.is_some()
        })
        .await;
        peers.push(v);
    }
    for v in &peers[1..] {
        wait_until("every viewer receives", LIVENESS, || {
            count(&v.stats().packets_received) > 0
        })
        .await;
    }
    peers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_on_three_nodes_share_one_room_and_its_tree() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut nodes = Vec::new();
    for _ in 0..NODES {
        let url = redis.url();
        nodes.push(
            TestSignaller::start_with(2, 2, |c| {
                c.redis = Some(url);
                c.resume_key = Some(Secret::new(KEY));
            })
            .await,
        );
    }
    let owner = &nodes[0];
    let started = Instant::now();
    let refs: Vec<&TestSignaller> = nodes.iter().collect();
    let peers = join_round_robin(&refs, &owner.room, &owner.token).await;
    let joined = started.elapsed();
    let clustered = parents(&owner.snapshot().await);
    assert_eq!(clustered.len(), VIEWERS + 1);

    // The same joins in the same order on one node without Redis.
    let single = TestSignaller::start(2, 2).await;
    let alone = join_round_robin(&[&single], &single.room, &single.token).await;
    let expected = parents(&single.snapshot().await);
    assert_eq!(
        clustered, expected,
        "the cluster builds the tree one node builds"
    );
    eprintln!("{VIEWERS} viewers joined through {NODES} nodes in {joined:?}");
    for p in peers.into_iter().chain(alone) {
        p.kill().await;
    }
    single.stop().await;
    for node in nodes {
        node.stop().await;
    }
}

/// A node in a runtime of its own, so that it can die at once with everything it runs
/// (sockets dropped, no close frames, no lease released), as a killed process does.
struct Node {
    addr: SocketAddr,
    url: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Node {
    async fn start(redis: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut config = treecast_signaller::Config::default();
        config.limits.max_connections_per_ip = 10_000;
        config.limits.room_creation_burst = 1_000;
        config.room.root_fanout = 2;
        config.room.relay_fanout = 2;
        config.room.ice_servers = Vec::new();
        config.redis = Some(redis.to_owned());
        config.resume_key = Some(Secret::new(KEY));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let never = std::future::pending::<()>();
            let _ = treecast_signaller::serve_with(
                listener,
                config,
                never,
                treecast_signaller::Extras::default(),
            )
            .await;
        });
        wait_until("the node serves", LIVENESS, || {
            std::net::TcpStream::connect(addr).is_ok()
        })
        .await;
        Self {
            addr,
            url: format!("ws://{addr}/ws"),
            runtime: Some(runtime),
        }
    }

    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn viewer(node: &Node, room: &str) -> PeerConfig {
    let mut c = PeerConfig::new(&node.url, room, Role::Viewer);
    c.use_ice_servers = false;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_owner_dies_another_node_takes_the_room_and_no_media_stops() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut owner = Node::start(&redis.url()).await;
    let edges = [
        Node::start(&redis.url()).await,
        Node::start(&redis.url()).await,
    ];
    let (status, created) = http(owner.addr, "POST", "/api/rooms").await;
    assert_eq!(status, 201, "{created}");
    let room = created["room"].as_str().unwrap().to_owned();
    let token = created["token"].as_str().unwrap().to_owned();

    // Everyone on the edges: the owner holds no peer's socket.
    let mut b = PeerConfig::new(&edges[0].url, &room, Role::Broadcaster);
    b.use_ice_servers = false;
    b.token = Some(token);
    let broadcaster = Peer::start(b).unwrap();
    wait_until("the broadcaster is welcomed", LIVENESS, || {
        broadcaster.status().peer_id.is_some()
    })
    .await;
    let mut viewers = Vec::new();
    for i in 0..20 {
        let v = Peer::start(viewer(&edges[i % 2], &room)).unwrap();
        wait_until("a viewer is placed", LIVENESS, || {
            v.status().depth.is_some()
        })
        .await;
        viewers.push(v);
    }
    for v in &viewers {
        wait_until("every viewer receives", LIVENESS, || {
            count(&v.stats().packets_received) > 0
        })
        .await;
    }
    let path = format!("/api/rooms/{room}");
    let snapshot = |addr| {
        let path = path.clone();
        async move {
            let (status, snap) = http(addr, "GET", &path).await;
            (status == 200).then(|| parents(&snap))
        }
    };
    let before = snapshot(owner.addr).await.unwrap();
    let marks: Vec<Mark> = viewers.iter().map(Mark::of).collect();

    owner.kill();
    let killed = Instant::now();
    // A join while the room has no owner.
    let late = Peer::start(viewer(&edges[1], &room)).unwrap();
    // One of the edges takes the room over and rebuilds it.
    let mut after = None;
    while after
        .as_ref()
        .is_none_or(|a: &BTreeMap<u64, Option<u64>>| a.len() < before.len())
    {
        assert!(killed.elapsed() < LIVENESS, "no node took the room over");
        tokio::time::sleep(Duration::from_millis(100)).await;
        for edge in &edges {
            if let Some(p) = snapshot(edge.addr).await {
                after = Some(p);
            }
        }
    }
    let took_over = killed.elapsed();
    let after = after.unwrap();
    for (peer, parent) in &before {
        assert_eq!(after.get(peer), Some(parent), "peer {peer} kept its place");
    }
    wait_until("the late viewer receives", LIVENESS, || {
        count(&late.stats().packets_received) > 0
    })
    .await;
    wait_until("every peer is joined", LIVENESS, || {
        viewers.iter().all(|v| v.status().phase == Phase::Joined)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut worst = (0, 0);
    for (v, mark) in viewers.iter().zip(marks) {
        let later = Mark::of(v);
        let missing = mark.missing_until(later);
        worst = worst.max((missing, later.next_seq - mark.next_seq));
        assert!(
            missing <= 6,
            "viewer {:?} missed {missing} packets across the failover",
            v.status().peer_id
        );
    }
    eprintln!(
        "failover: room rebuilt on another node {took_over:?} after the owner died; \
         worst viewer missed {} of {} packets",
        worst.0, worst.1
    );
    assert!(
        took_over < Duration::from_secs(5),
        "took over after {took_over:?}"
    );
    for p in viewers.into_iter().chain([late, broadcaster]) {
        p.kill().await;
    }
}
