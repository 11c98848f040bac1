//! Cluster mode end to end: three signaller nodes on one `redis-server` of the test's own,
//! native peers joining one room through every node (each in-process, on 127.0.0.1).
//!
//! The room is created on the first node, which owns it; the other nodes are edges that
//! forward their peers' messages to it through Redis and deliver its answers. Asserted:
//! every viewer receives media, and each is placed at the depth a single node places it for
//! the same joins in the same order (placement depends only on the inputs, not on which
//! node a peer reached; background moves, which depend on timing, are off for that
//! comparison). Then each kind of failure, one per test: the owner dies, the owner is
//! paused past its lease, an edge dies, an edge loses its subscription, a relay whose children
//! sit on other edges dies, Redis dies and comes back empty. In each, the media between
//! peers must not stop: every packet carries the broadcaster's sequence number, so a gap
//! shows as numbers never received.
//!
//! Needs Debian's `redis-server` (`scripts/test` installs it and makes it required).
//! Timeouts guard liveness only; times are printed.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::{LIVENESS, Mark, TestSignaller, count, http, parents, wait_until};
use treecast_core::agent::Phase;
use treecast_core::turn::Secret;
use treecast_peer::{Peer, PeerConfig, Role};

/// One test at a time: each runs three nodes and a dozen peers or more, and the failure
/// tests time how fast the cluster recovers.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NODES: usize = 3;
const VIEWERS: usize = 300;
const KEY: &str = "the cluster's resume key, the same on every node";

/// Where a viewer was placed: its parent and depth.
type Placed = BTreeMap<u64, (Option<u64>, u32)>;

/// A broadcaster on `nodes[0]`, then viewers through the nodes in turn, each receiving
/// before the next joins (so the room sees the same inputs in the same order, whichever
/// node they came through); returns the peers with where each viewer was placed.
async fn join_round_robin(nodes: &[&str], room: &str, token: &str) -> (Vec<Peer>, Placed) {
    let config = |url: &str, role| {
        let mut c = PeerConfig::new(url, room, role);
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
    let mut placed = BTreeMap::new();
    for i in 0..VIEWERS {
        let v = Peer::start(config(nodes[i % nodes.len()], Role::Viewer)).unwrap();
        wait_until("a viewer receives", LIVENESS, || {
            count(&v.stats().packets_received) > 0
        })
        .await;
        let status = v.status();
        placed.insert(
            status.peer_id.unwrap().0,
            (status.parent.map(|p| p.0), status.depth.unwrap()),
        );
        peers.push(v);
    }
    (peers, placed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_on_three_nodes_share_one_room_and_its_tree() {
    let _serial = SERIAL.lock().await;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut nodes = Vec::new();
    for _ in 0..NODES {
        // Placement only: background moves depend on timing, not on the joins.
        nodes.push(Node::start_with(&redis.url(), |c| c.room.rebalance_moves_per_second = 0).await);
    }
    let (status, created) = http(nodes[0].addr, "POST", "/api/rooms").await;
    assert_eq!(status, 201, "{created}");
    let room = created["room"].as_str().unwrap().to_owned();
    let token = created["token"].as_str().unwrap().to_owned();
    let started = Instant::now();
    let urls: Vec<&str> = nodes.iter().map(|n| n.url.as_str()).collect();
    let (peers, clustered) = join_round_robin(&urls, &room, &token).await;
    let joined = started.elapsed();
    let (status, snap) = http(nodes[0].addr, "GET", &format!("/api/rooms/{room}")).await;
    assert_eq!(status, 200, "{snap}");
    assert_eq!(parents(&snap).len(), VIEWERS + 1);
    for p in peers {
        p.kill().await;
    }

    // The same joins in the same order on one node without Redis.
    let single = TestSignaller::start_with(2, 2, |c| c.room.rebalance_moves_per_second = 0).await;
    let (alone, expected) =
        join_round_robin(&[single.url.as_str()], &single.room, &single.token).await;
    // The same tree: every viewer at the depth one node gives it. Among equally good
    // slots the choice may differ: it follows when each peer's periodic reports arrived,
    // which varies from run to run on one node too.
    let depths = |p: &Placed| -> BTreeMap<u64, u32> { p.iter().map(|(k, v)| (*k, v.1)).collect() };
    assert_eq!(
        depths(&clustered),
        depths(&expected),
        "each viewer is placed at the depth one node places it"
    );
    let other_parent = clustered
        .iter()
        .filter(|(k, v)| expected.get(k).map(|e| e.0) != Some(v.0))
        .count();
    eprintln!(
        "{VIEWERS} viewers joined through {NODES} nodes in {joined:?}; same depths as on one \
         node, {other_parent} under another parent of the same depth"
    );
    for p in alone {
        p.kill().await;
    }
    single.stop().await;
}

/// A node in a runtime of its own, so that it can die at once with everything it runs
/// (sockets dropped, no close frames, no lease released), as a killed process does, or
/// freeze as a stopped one does.
struct Node {
    addr: SocketAddr,
    url: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Node {
    async fn start(redis: &str) -> Self {
        Self::start_with(redis, |_| {}).await
    }

    async fn start_with(
        redis: &str,
        configure: impl FnOnce(&mut treecast_signaller::Config),
    ) -> Self {
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
        configure(&mut config);
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

    /// Dies at once, like `kill -9`.
    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// Stops running for `pause`, like SIGSTOP then SIGCONT: its only worker thread is
    /// taken, so none of its timers, sockets or lease renewals run meanwhile.
    fn freeze(&self, pause: Duration) {
        if let Some(rt) = &self.runtime {
            rt.spawn(async move { std::thread::sleep(pause) });
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A room owned by one node, with a broadcaster and viewers on the others.
struct Bed {
    redis: RedisServer,
    owner: Node,
    edges: Vec<Node>,
    room: String,
    broadcaster: Peer,
    viewers: Vec<Peer>,
}

impl Bed {
    /// The room is created on the owner; the broadcaster joins through the first edge,
    /// `viewers` viewers through the edges in turn. Every peer knows every node, and moves
    /// to another when its node fails.
    async fn start(edges: usize, viewers: usize) -> Option<Self> {
        let redis = RedisServer::start()?;
        let owner = Node::start(&redis.url()).await;
        let mut nodes = Vec::new();
        for _ in 0..edges {
            nodes.push(Node::start(&redis.url()).await);
        }
        let (status, created) = http(owner.addr, "POST", "/api/rooms").await;
        assert_eq!(status, 201, "{created}");
        let room = created["room"].as_str().unwrap().to_owned();
        let token = created["token"].as_str().unwrap().to_owned();
        let mut bed = Self {
            broadcaster: {
                let mut b = Self::config(&nodes, 0, &owner, &room, Role::Broadcaster);
                b.token = Some(token);
                Peer::start(b).unwrap()
            },
            redis,
            owner,
            edges: nodes,
            room,
            viewers: Vec::new(),
        };
        wait_until("the broadcaster is welcomed", LIVENESS, || {
            bed.broadcaster.status().peer_id.is_some()
        })
        .await;
        for i in 0..viewers {
            let v = bed.viewer(i % edges);
            wait_until("a viewer is placed", LIVENESS, || {
                v.status().depth.is_some()
            })
            .await;
            bed.viewers.push(v);
        }
        for v in &bed.viewers {
            wait_until("every viewer receives", LIVENESS, || {
                count(&v.stats().packets_received) > 0
            })
            .await;
        }
        Some(bed)
    }

    fn config(edges: &[Node], i: usize, owner: &Node, room: &str, role: Role) -> PeerConfig {
        let mut c = PeerConfig::new(&edges[i].url, room, role);
        c.use_ice_servers = false;
        c.other_urls = edges
            .iter()
            .cycle()
            .skip(i + 1)
            .take(edges.len() - 1)
            .chain([owner])
            .map(|n| n.url.clone())
            .collect();
        c
    }

    /// A viewer joining through edge `i`.
    fn viewer(&self, i: usize) -> Peer {
        Peer::start(Self::config(
            &self.edges,
            i,
            &self.owner,
            &self.room,
            Role::Viewer,
        ))
        .unwrap()
    }

    /// A viewer joining through the owner; when the owner fails it moves to the edges.
    fn owner_viewer(&self) -> Peer {
        let mut c = PeerConfig::new(&self.owner.url, &self.room, Role::Viewer);
        c.use_ice_servers = false;
        c.other_urls = self.edges.iter().map(|n| n.url.clone()).collect();
        Peer::start(c).unwrap()
    }

    /// Each peer's parent, from whichever node serves the room's snapshot.
    async fn tree(&self) -> Option<BTreeMap<u64, Option<u64>>> {
        let path = format!("/api/rooms/{}", self.room);
        for node in std::iter::once(&self.owner).chain(&self.edges) {
            if node.runtime.is_none() {
                continue;
            }
            // A frozen node would hold the request: ask each briefly.
            let short = Duration::from_secs(1);
            let addr = node.addr.to_string();
            if let Ok(r) =
                treecast_signaller::client::request(&addr, "GET", &path, None, short).await
                && r.status == 200
                && let Ok(snap) = r.json()
            {
                return Some(parents(&snap));
            }
        }
        None
    }

    /// Waits until some node serves the room with every peer of `before` in the same
    /// place; returns how long that took.
    async fn await_tree(&self, before: &BTreeMap<u64, Option<u64>>, what: &str) -> Duration {
        let started = Instant::now();
        loop {
            if let Some(now) = self.tree().await
                && before
                    .iter()
                    .all(|(peer, parent)| now.get(peer) == Some(parent))
            {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < LIVENESS,
                "{what}: the tree never came back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every viewer joined, and (a moment later) the packets each missed since `marks`;
    /// fails if any missed more than reordering explains.
    async fn assert_no_gap(&self, marks: Vec<Mark>, what: &str) -> (i64, u64) {
        wait_until("every peer is joined", LIVENESS, || {
            std::iter::once(&self.broadcaster)
                .chain(&self.viewers)
                .all(|v| v.status().phase == Phase::Joined)
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut worst = (0, 0);
        for (v, mark) in self.viewers.iter().zip(marks) {
            let later = Mark::of(v);
            let missing = mark.missing_until(later);
            worst = worst.max((missing, later.next_seq - mark.next_seq));
            assert!(
                missing <= 6,
                "{what}: viewer {:?} missed {missing} packets",
                v.status().peer_id
            );
        }
        worst
    }

    fn marks(&self) -> Vec<Mark> {
        self.viewers.iter().map(Mark::of).collect()
    }

    async fn stop(self) {
        for p in self.viewers.into_iter().chain([self.broadcaster]) {
            p.kill().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_owner_dies_another_node_takes_the_room_and_no_media_stops() {
    let _serial = SERIAL.lock().await;
    let Some(mut bed) = Bed::start(2, 16).await else {
        return;
    };
    // Some viewers on the owner too: when it dies they reconnect to the edges while the
    // room has no owner, and must be sent to the one that takes it.
    for _ in 0..6 {
        let v = bed.owner_viewer();
        wait_until("a viewer on the owner receives", LIVENESS, || {
            count(&v.stats().packets_received) > 0
        })
        .await;
        bed.viewers.push(v);
    }
    let before = bed.tree().await.unwrap();
    let marks = bed.marks();
    bed.owner.kill();
    let killed = Instant::now();
    // A join while the room has no owner.
    let late = bed.viewer(1);
    bed.await_tree(&before, "after the owner died").await;
    let took_over = killed.elapsed();
    wait_until(
        "the viewer that joined meanwhile receives",
        LIVENESS,
        || count(&late.stats().packets_received) > 0,
    )
    .await;
    let worst = bed.assert_no_gap(marks, "owner killed").await;
    eprintln!(
        "owner killed: the room served again, same tree, {took_over:?} after the kill; \
         worst viewer missed {} of {} packets",
        worst.0, worst.1
    );
    assert!(
        took_over < Duration::from_secs(5),
        "took over after {took_over:?}"
    );
    late.kill().await;
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_paused_past_its_lease_steps_down_without_a_split_brain() {
    let _serial = SERIAL.lock().await;
    let Some(bed) = Bed::start(2, 12).await else {
        return;
    };
    let before = bed.tree().await.unwrap();
    let marks = bed.marks();
    // The nodes of this test share one process, so one metrics registry (and other tests
    // in it count too): differences only.
    let lost_before = metric(&bed.owner, "treecast_cluster_leases_lost_total").await;
    let takeovers_before = metric(&bed.owner, "treecast_cluster_takeovers_total").await;
    // Paused well past the 3 s lease: another node takes the room meanwhile.
    bed.owner.freeze(Duration::from_secs(6));
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took_over = bed.await_tree(&before, "while the owner is paused").await;
    // Back from the pause: it must see it lost the room and leave it alone.
    tokio::time::sleep(
        Duration::from_secs(6).saturating_sub(started.elapsed()) + Duration::from_secs(2),
    )
    .await;
    let path = format!("/api/rooms/{}", bed.room);
    let mut serving = Vec::new();
    for node in std::iter::once(&bed.owner).chain(&bed.edges) {
        serving.push(http(node.addr, "GET", &path).await.0 == 200);
    }
    assert!(!serving[0], "the paused owner still serves the room");
    assert!(
        metric(&bed.owner, "treecast_cluster_leases_lost_total").await > lost_before,
        "the old owner counts the lease it lost"
    );
    assert_eq!(
        metric(&bed.owner, "treecast_cluster_takeovers_total").await - takeovers_before,
        1.0,
        "one edge took the room over"
    );
    assert_eq!(
        serving.iter().filter(|s| **s).count(),
        1,
        "one owner: {serving:?}"
    );
    assert_eq!(bed.tree().await.unwrap(), before, "nobody moved");
    let worst = bed.assert_no_gap(marks, "owner paused").await;
    eprintln!(
        "owner paused: another node served the room {took_over:?} into the pause; the old \
         owner stepped down; worst viewer missed {} of {} packets",
        worst.0, worst.1
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_an_edge_dies_its_peers_resume_on_another_in_place() {
    let _serial = SERIAL.lock().await;
    let Some(mut bed) = Bed::start(2, 12).await else {
        return;
    };
    let before = bed.tree().await.unwrap();
    let marks = bed.marks();
    bed.edges[0].kill();
    let killed = Instant::now();
    // The broadcaster and half the viewers were on it: all resume elsewhere.
    let worst = bed.assert_no_gap(marks, "edge killed").await;
    let resumed = killed.elapsed();
    assert_eq!(bed.tree().await.unwrap(), before, "nobody moved");
    eprintln!(
        "edge killed: its peers resumed elsewhere with the tree unchanged (all joined \
         {resumed:?} after the kill, 2 s of it streaming); worst viewer missed {} of {} packets",
        worst.0, worst.1
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_loses_its_subscription_resyncs_its_peers() {
    let _serial = SERIAL.lock().await;
    let Some(bed) = Bed::start(2, 12).await else {
        return;
    };
    let before = bed.tree().await.unwrap();
    let marks = bed.marks();
    // The nodes share this process's metrics registry: differences only.
    let resyncs = r#"treecast_cluster_resyncs_total{cause="subscription"}"#;
    let before_resyncs = metric(&bed.owner, resyncs).await;
    redis_command(&bed.redis, "CLIENT KILL TYPE pubsub");
    // Whatever an edge missed meanwhile, its peers resume and hear their place again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let back = bed
        .await_tree(&before, "after the subscriptions were cut")
        .await;
    wait_until("no viewer is left without a parent", LIVENESS, || {
        bed.viewers.iter().all(|v| v.status().parent.is_some())
    })
    .await;
    assert_eq!(bed.tree().await.unwrap(), before, "nobody moved");
    assert!(
        metric(&bed.owner, resyncs).await > before_resyncs,
        "the edges noticed the lost subscription and resynced"
    );
    let worst = bed.assert_no_gap(marks, "subscriptions cut").await;
    eprintln!(
        "pub/sub cut: peers resynced, tree unchanged ({back:?}); worst viewer missed {} of {} \
         packets",
        worst.0, worst.1
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_children_sit_on_other_edges_is_repaired_around() {
    let _serial = SERIAL.lock().await;
    let Some(mut bed) = Bed::start(3, 14).await else {
        return;
    };
    let before = bed.tree().await.unwrap();
    // A relay with a child on another edge, killed like a crashed tab. Viewer `i`
    // joined through edge `i % 3`.
    let edge_of: BTreeMap<u64, usize> = bed
        .viewers
        .iter()
        .enumerate()
        .map(|(i, v)| (v.status().peer_id.unwrap().0, i % 3))
        .collect();
    let relay_at = bed
        .viewers
        .iter()
        .enumerate()
        .position(|(i, v)| {
            v.status()
                .children
                .iter()
                .any(|c| edge_of.get(&c.0).is_some_and(|&e| e != i % 3))
        })
        .unwrap_or_else(|| {
            let seen: Vec<_> = bed
                .viewers
                .iter()
                .map(|v| (v.status().peer_id, v.status().children))
                .collect();
            panic!("no relay with a child on another edge: {seen:?} {edge_of:?}")
        });
    let relay = bed.viewers.remove(relay_at);
    let relay_id = relay.status().peer_id.unwrap();
    let orphans: Vec<u64> = before
        .iter()
        .filter(|(_, p)| **p == Some(relay_id.0))
        .map(|(c, _)| *c)
        .collect();
    let killed = Instant::now();
    relay.kill().await;
    common::await_repair(&bed.viewers, relay_id, Duration::ZERO).await;
    let repaired = killed.elapsed();
    let after = bed.tree().await.unwrap();
    for orphan in &orphans {
        assert!(
            after[orphan].is_some_and(|p| p != relay_id.0),
            "orphan {orphan} re-parented"
        );
    }
    eprintln!(
        "relay killed: {} orphans re-parented and receiving {repaired:?} after",
        orphans.len()
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_dies_and_comes_back_empty_the_service_recovers() {
    let _serial = SERIAL.lock().await;
    let Some(mut bed) = Bed::start(2, 12).await else {
        return;
    };
    let before = bed.tree().await.unwrap();
    let marks = bed.marks();
    bed.redis.kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    bed.redis.restart();
    let restarted = Instant::now();
    // Service is back when a new viewer is placed again.
    let late = bed.viewer(0);
    wait_until(
        "a viewer joining after the restart is placed",
        LIVENESS,
        || late.status().depth.is_some(),
    )
    .await;
    let recovered = restarted.elapsed();
    bed.await_tree(&before, "after Redis came back empty").await;
    wait_until("that viewer receives", LIVENESS, || {
        count(&late.stats().packets_received) > 0
    })
    .await;
    let worst = bed.assert_no_gap(marks, "Redis restarted empty").await;
    eprintln!(
        "Redis killed, restarted empty {:?} later: a new viewer placed {recovered:?} after the \
         restart, the tree unchanged; worst viewer missed {} of {} packets",
        restarted.duration_since(killed),
        worst.0,
        worst.1
    );
    assert!(
        recovered < Duration::from_secs(5),
        "recovered after {recovered:?}"
    );
    late.kill().await;
    bed.stop().await;
}

/// A counter or gauge from a node's `/metrics` (0 when absent).
async fn metric(node: &Node, name: &str) -> f64 {
    let r = treecast_signaller::client::request(
        &node.addr.to_string(),
        "GET",
        "/metrics",
        None,
        LIVENESS,
    )
    .await
    .unwrap();
    r.body
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends one inline command to the test's Redis.
fn redis_command(redis: &RedisServer, command: &str) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", redis.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{command}\r\n").as_bytes()).unwrap();
    let mut reply = [0u8; 64];
    let n = s.read(&mut reply).unwrap();
    assert!(
        n > 0 && reply[0] != b'-',
        "{command}: {}",
        String::from_utf8_lossy(&reply[..n])
    );
}
