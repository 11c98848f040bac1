//! A relay tree built over real WebSockets: 200 viewers join at once, the tree stays within
//! capacities and near the minimum depth, and a relay's departure (socket crash or `leave`)
//! re-parents its children with their subtrees intact.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::{Client, TestServer, peer_in, snapshot, wait_for_snapshot};
use serde_json::{Value, json};

const VIEWERS: usize = 200;
const FANOUT: u32 = 2;

/// d_min = ceil(log_k(1 + N(k-1)/k_s)): the fewest levels that hold N viewers.
fn d_min(n: u64, k: u64, k_s: u64) -> u32 {
    // Count levels instead of using floating-point logarithms.
    let (mut depth, mut level, mut total) = (0u32, k_s, 0u64);
    while total < n {
        total += level;
        level *= k;
        depth += 1;
    }
    depth
}

/// Everyone is attached, nobody feeds more than its capacity or more than `FANOUT`, and
/// each peer's parent lists it as a child.
fn check_tree(snap: &Value, viewers: usize) {
    assert_eq!(snap["waiting"], 0, "nobody waits: {snap}");
    assert_eq!(snap["viewers"], viewers as u64);
    let peers = snap["peers"].as_array().unwrap();
    assert_eq!(peers.len(), viewers + 1);
    let by_id: HashMap<u64, &Value> = peers
        .iter()
        .map(|p| (p["id"].as_u64().unwrap(), p))
        .collect();
    for p in peers {
        let children = p["children"].as_array().unwrap();
        let capacity = p["capacity"].as_u64().unwrap();
        assert!(capacity <= u64::from(FANOUT), "{p}");
        assert!(children.len() as u64 <= capacity, "over capacity: {p}");
        assert!(p["depth"].is_u64(), "attached: {p}");
        if p["role"] == "viewer" {
            let parent = &by_id[&p["parent"].as_u64().expect("a viewer has a parent")];
            assert!(
                parent["children"].as_array().unwrap().contains(&p["id"]),
                "{p}"
            );
            assert_eq!(
                p["depth"].as_u64().unwrap(),
                parent["depth"].as_u64().unwrap() + 1
            );
        }
    }
}

/// What each client was told matches the snapshot, and nobody was told of more children
/// than its capacity.
fn check_messages(snap: &Value, clients: &[&Client]) {
    for c in clients {
        let (parent, children) = c.neighbours();
        assert!(
            children.len() <= FANOUT as usize,
            "peer {} was given {children:?}",
            c.id()
        );
        let p = peer_in(snap, c.id()).expect("in the room");
        assert_eq!(parent, p["parent"].as_u64(), "peer {}'s parent", c.id());
        let mut expected: Vec<u64> = p["children"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        expected.sort_unstable();
        assert_eq!(children, expected, "peer {}'s children", c.id());
    }
}

/// One viewer per uplink, all joining at once; each has its first `parent` when this returns.
async fn join_all(addr: SocketAddr, room: &str, uplinks: &[u32]) -> HashMap<u64, Client> {
    let joins: Vec<_> = uplinks
        .iter()
        .map(|&uplink| {
            let room = room.to_owned();
            tokio::spawn(async move {
                let mut c = Client::join(addr, &room, "viewer", None, Some(uplink)).await;
                c.recv_until("parent").await;
                c
            })
        })
        .collect();
    let mut viewers = HashMap::new();
    for j in joins {
        let c = j.await.expect("a viewer joins");
        viewers.insert(c.id(), c);
    }
    viewers
}

async fn sync_all(broadcaster: &mut Client, viewers: &mut HashMap<u64, Client>) {
    broadcaster.sync().await;
    for v in viewers.values_mut() {
        v.sync().await;
    }
}

fn children_of(snap: &Value, id: u64) -> Vec<u64> {
    peer_in(snap, id).unwrap()["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

/// A child of the broadcaster with grandchildren below it.
fn depth_one_relay(snap: &Value, broadcaster: u64) -> u64 {
    children_of(snap, broadcaster)
        .into_iter()
        .find(|&c| {
            children_of(snap, c)
                .iter()
                .any(|&g| !children_of(snap, g).is_empty())
        })
        .expect("a depth-1 relay with a subtree")
}

/// Removes relay `gone` (by `how`) and checks the repair as its children and grandchildren
/// saw it.
async fn remove_relay(
    addr: SocketAddr,
    room: &str,
    broadcaster: &mut Client,
    viewers: &mut HashMap<u64, Client>,
    how: &str,
) {
    let before = snapshot(addr, room).await;
    let gone = depth_one_relay(&before, broadcaster.id());
    let orphans = children_of(&before, gone);
    let grandchildren: Vec<u64> = orphans
        .iter()
        .flat_map(|&o| children_of(&before, o))
        .collect();
    assert!(!orphans.is_empty() && !grandchildren.is_empty());
    let marks: HashMap<u64, usize> = viewers.iter().map(|(&id, c)| (id, c.log.len())).collect();

    let mut relay = viewers.remove(&gone).unwrap();
    match how {
        "crash" => relay.crash(),
        "leave" => {
            relay.send_json(&json!({"type": "leave"})).await;
            relay.expect_closed().await;
        }
        _ => unreachable!(),
    }
    let after = wait_for_snapshot(addr, room, |s| peer_in(s, gone).is_none()).await;
    sync_all(broadcaster, viewers).await;

    // A viewer moved away from a parent that stays (a stand-in leaf) is make-before-break:
    // no `drop` for the old parent yet, which still lists it as a child. Once it reports
    // media from the new parent, as a client does, both ends of the old link get `drop`.
    let moved: Vec<u64> = viewers
        .iter()
        .filter(|(id, c)| !c.since(marks[id], "parent").is_empty() && !orphans.contains(id))
        .map(|(&id, _)| id)
        .collect();
    assert!(!moved.is_empty(), "a leaf stood in for the departed relay");
    for id in &moved {
        let c = viewers.get_mut(id).unwrap();
        let old = peer_in(&before, *id).unwrap()["parent"].as_u64();
        assert!(
            c.since(marks[id], "drop")
                .iter()
                .all(|d| d["peer_id"].as_u64() != old),
            "{id} keeps its old parent {old:?} until its new one delivers: {:?}",
            &c.log[marks[id]..]
        );
        // As a client does: `connecting` on the new `parent`, `receiving` once media flows.
        c.send_json(&json!({"type": "report", "state": "connecting"}))
            .await;
        c.send_json(&json!({"type": "report", "state": "receiving"}))
            .await;
        c.sync().await;
        let dropped = c.since(marks[id], "drop");
        assert!(
            dropped.iter().any(|d| d["peer_id"].as_u64() == old),
            "{id}'s old link is dropped once it receives: {:?}",
            &c.log[marks[id]..]
        );
    }
    sync_all(broadcaster, viewers).await;

    let remaining = viewers.len();
    check_tree(&after, remaining);
    for &o in &orphans {
        let c = &viewers[&o];
        let parents = c.since(marks[&o], "parent");
        assert_eq!(
            parents.len(),
            1,
            "orphan {o} gets exactly one new parent: {:?}",
            c.log
        );
        assert_ne!(parents[0]["peer_id"], gone);
        assert_eq!(peer_in(&after, o).unwrap()["parent"], parents[0]["peer_id"]);
    }
    for &g in &grandchildren {
        let c = &viewers[&g];
        assert!(
            c.since(marks[&g], "parent").is_empty(),
            "grandchild {g} keeps its parent: {:?}",
            &c.log[marks[&g]..]
        );
        assert!(
            c.since(marks[&g], "drop").is_empty(),
            "grandchild {g} keeps its parent"
        );
        assert_eq!(
            peer_in(&after, g).unwrap()["parent"],
            peer_in(&before, g).unwrap()["parent"]
        );
    }
    let all: Vec<&Client> = std::iter::once(&*broadcaster)
        .chain(viewers.values())
        .collect();
    check_messages(&after, &all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_joins_build_a_shallow_tree_that_survives_relays_leaving() {
    let mut config = common::test_config();
    config.room.root_fanout = FANOUT;
    config.room.relay_fanout = FANOUT;
    config.room.resume_grace = Duration::ZERO; // a dropped socket is a departure
    config.room.heartbeat_timeout = None; // idle test clients are not read continuously
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let (room, token) = common::create_room(addr).await;
    let mut broadcaster =
        Client::join(addr, &room, "broadcaster", Some(&token), Some(100_000)).await;

    let mut viewers = join_all(addr, &room, &[100_000; VIEWERS]).await;
    assert_eq!(viewers.len(), VIEWERS, "peer ids are distinct");

    let snap = snapshot(addr, &room).await;
    sync_all(&mut broadcaster, &mut viewers).await;
    check_tree(&snap, VIEWERS);
    let all: Vec<&Client> = std::iter::once(&broadcaster)
        .chain(viewers.values())
        .collect();
    check_messages(&snap, &all);
    let limit = d_min(VIEWERS as u64, u64::from(FANOUT), u64::from(FANOUT)) + 1;
    assert_eq!(limit, 8);
    assert!(
        snap["max_depth"].as_u64().unwrap() <= u64::from(limit),
        "max depth {} > {limit}",
        snap["max_depth"]
    );
    let deepest = viewers
        .values()
        .flat_map(|c| c.log.iter())
        .filter(|m| m["type"] == "parent")
        .map(|m| m["depth"].as_u64().unwrap())
        .max();
    assert!(deepest.unwrap() <= u64::from(limit));
    let ids: HashSet<u64> = viewers.keys().copied().collect();
    assert!(!ids.contains(&broadcaster.id()));

    remove_relay(addr, &room, &mut broadcaster, &mut viewers, "crash").await;
    remove_relay(addr, &room, &mut broadcaster, &mut viewers, "leave").await;
    server.shutdown().await.unwrap();
}

#[test]
fn minimum_depth_matches_the_design_formula() {
    assert_eq!(d_min(200, 2, 2), 7);
    assert_eq!(d_min(1_000_000, 4, 4), 10);
    assert_eq!(d_min(1, 2, 2), 1);
}

/// 500 viewers with mixed uplinks (feeding 4, 2 or no children), a depth-1 relay crashes:
/// once the repair and the background moves settle, the tree is again within a level of
/// the least depth its peers allow, and nobody waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_uplinks_stay_shallow_after_a_depth_one_relay_dies() {
    const MIXED: usize = 500;
    const UPLINKS: [u32; 3] = [100_000, 1_250, 600];
    let mut config = common::test_config();
    config.room.root_fanout = 4;
    config.room.relay_fanout = 4;
    config.room.resume_grace = Duration::ZERO;
    config.room.heartbeat_timeout = None;
    let server = TestServer::start(config).await;
    let addr = server.addr;
    let (room, token) = common::create_room(addr).await;
    let broadcaster = Client::join(addr, &room, "broadcaster", Some(&token), Some(100_000)).await;
    let uplinks: Vec<u32> = (0..MIXED).map(|i| UPLINKS[i % UPLINKS.len()]).collect();
    let mut viewers = join_all(addr, &room, &uplinks).await;
    let before = snapshot(addr, &room).await;
    let gone = depth_one_relay(&before, broadcaster.id());
    let relay = viewers.remove(&gone).unwrap();
    relay.crash();
    let d_min = |snap: &Value| {
        let peers = snap["peers"].as_array().unwrap();
        let caps = peers
            .iter()
            .filter(|p| p["role"] == "viewer")
            .map(|p| p["capacity"].as_u64().unwrap() as u32);
        treecast_core::tree::min_depth(4, caps).expect("everyone fits")
    };
    let limit = d_min(&before) + 1;
    // Repair at once; background moves bring the strong peers back up over seconds.
    let after = wait_for_snapshot(addr, &room, |s| {
        peer_in(s, gone).is_none()
            && s["waiting"] == 0
            && s["max_depth"].as_u64().unwrap() <= u64::from(d_min(s) + 1)
    })
    .await;
    println!(
        "mixed uplinks: depth {} before, {} after the crash (limit {limit}), histogram {}",
        before["max_depth"], after["max_depth"], after["depth_histogram"]
    );
    assert_eq!(after["viewers"], (MIXED - 1) as u64);
    server.shutdown().await.unwrap();
}
