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
use std::time::Instant;

use common::redis_server::RedisServer;
use common::{LIVENESS, TestSignaller, count, wait_until};
use serde_json::Value;
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
