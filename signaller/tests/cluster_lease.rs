//! Room ownership leases with fencing (`treecast_signaller::cluster`), against a real
//! `redis-server` that each test starts on its own loopback port (see
//! `common/redis_server.rs`: without Debian's `redis-server` these tests say so and pass,
//! unless `TREECAST_REQUIRE_REDIS` is set, as `scripts/test` does).
//!
//! Waits are bounded by [`LIVENESS`] only to fail instead of hanging; nothing asserts that
//! something happened *quickly*.

mod common;

use std::time::Duration;

use common::LIVENESS;
use common::redis_server::RedisServer;
use futures_util::StreamExt;
use tokio::time::{Instant, sleep, timeout};
use treecast_signaller::cluster::{
    self, ClusterError, Epoch, Fenced, Holder, LeaseConfig, LeaseState, Leases, LostReason,
    Rejected, RoomKeys,
};

async fn leases(url: &str, config: LeaseConfig) -> Leases {
    let conn = cluster::connect(url).await.expect("connect to redis");
    Leases::new(conn, config).expect("valid lease settings")
}

async fn get(url: &str, key: &str) -> Option<String> {
    let mut conn = cluster::connect(url).await.unwrap();
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Tries to take `room` until this node wins or another node holds it at an epoch above
/// `previous` (the round's winner).
async fn race_for(leases: Leases, room: &str, node: &str, previous: Epoch) -> Option<Epoch> {
    let deadline = Instant::now() + LIVENESS;
    loop {
        if let Some(epoch) = leases.acquire(room, node).await.unwrap() {
            return Some(epoch);
        }
        if let Some(holder) = leases.owner(room).await.unwrap() {
            if holder.epoch > previous {
                return None;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{node}: nobody took {room} after epoch {previous} within {LIVENESS:?}"
        );
        sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_race_to_own_one_room_100_times_exactly_one_owner_per_epoch_never_two() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // A lease far longer than a round, so no slow moment ends an ownership by accident:
    // rounds end by release, or by the lease running out when the test shortens it.
    let config = LeaseConfig::with_lease(Duration::from_secs(30));
    // Three independent clients, each on its own connection; one speaks RESP3.
    let nodes = [
        leases(&redis.url(), config).await,
        leases(&redis.url(), config).await,
        leases(&redis.url_resp3(), config).await,
    ];
    let names = ["node-a", "node-b", "node-c"];
    let room = "race";
    let keys = RoomKeys::new(room).unwrap();
    let snapshot = keys.snapshot();
    let mut previous: Option<(usize, Holder)> = None;
    let mut expired_rounds = 0;

    for round in 0..100 {
        let floor = previous.as_ref().map_or(Epoch(0), |(_, h)| h.epoch);
        let racers: Vec<_> = (0..3)
            .map(|i| tokio::spawn(race_for(nodes[i].clone(), room, names[i], floor)))
            .collect();
        let mut winners = Vec::new();
        for (i, racer) in racers.into_iter().enumerate() {
            if let Some(epoch) = racer.await.unwrap() {
                winners.push((i, epoch));
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let (w, epoch) = winners[0];
        // One acquisition per round, so the epoch goes up by exactly one.
        assert_eq!(epoch, Epoch(floor.0 + 1), "round {round}");
        let holder = Holder {
            node: names[w].to_owned(),
            epoch,
        };
        for node in &nodes {
            assert_eq!(node.owner(room).await.unwrap(), Some(holder.clone()));
        }

        // The winner's write lands.
        let value = format!("round {round} by {holder}");
        assert_eq!(
            nodes[w]
                .fenced_set(room, &holder, &snapshot, value.as_bytes(), None)
                .await
                .unwrap(),
            Fenced::Written(())
        );
        // The previous owner, still writing as its old epoch, is refused.
        if let Some((p, old)) = &previous {
            assert_eq!(
                nodes[*p]
                    .fenced_set(room, old, &snapshot, b"stale owner", None)
                    .await
                    .unwrap(),
                Fenced::Rejected(Rejected::NotHolder {
                    current: Some(holder.clone())
                }),
                "round {round}: {old} wrote over {holder}"
            );
        }
        // The losers, claiming the new epoch under their own names, are refused too.
        for l in (0..3).filter(|&l| l != w) {
            let claim = Holder {
                node: names[l].to_owned(),
                epoch,
            };
            let write = nodes[l]
                .fenced_set(room, &claim, &snapshot, b"loser", None)
                .await
                .unwrap();
            assert!(!write.is_written(), "round {round}: {claim} wrote");
            let publish = nodes[l]
                .fenced_publish(room, &claim, "tc:{race}:out", b"loser")
                .await
                .unwrap();
            assert!(!publish.is_written(), "round {round}: {claim} published");
        }
        assert_eq!(get(&redis.url(), &snapshot).await.as_deref(), Some(&*value));

        // Most rounds end with a release. Every 5th, the owner stops renewing and its lease
        // runs out (shortened to 50 ms here, as if it had been granted long ago): the next
        // round races against the key's expiry in Redis.
        if round % 5 == 4 {
            let mut conn = cluster::connect(&redis.url()).await.unwrap();
            let shortened: i64 = redis::cmd("PEXPIRE")
                .arg(keys.owner())
                .arg(50)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(shortened, 1);
            expired_rounds += 1;
        } else {
            assert!(nodes[w].release(room, &holder).await.unwrap());
        }
        previous = Some((w, holder));
    }
    assert_eq!(expired_rounds, 20);
    let acquired: u64 = nodes.iter().map(|n| n.stats().acquired).sum();
    assert_eq!(acquired, 100);
    let errors: u64 = nodes.iter().map(|n| n.stats().redis_errors).sum();
    assert_eq!(errors, 0);
}

/// The test runs on a current-thread runtime: blocking its thread stops every task of the
/// process, the renewal task included, as SIGSTOP would.
#[tokio::test]
async fn a_paused_owner_steps_down_on_its_own_deadline_and_its_writes_are_refused() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let config = LeaseConfig::with_lease(Duration::from_secs(2));
    let a = leases(&redis.url(), config).await;
    let b = leases(&redis.url(), config).await;
    let room = "paused";
    let keys = RoomKeys::new(room).unwrap();

    let lease = a.hold(room, "node-a").await.unwrap().expect("a free room");
    let epoch = lease.epoch();
    assert!(lease.is_held());
    assert_eq!(
        lease
            .fenced_set(&keys.snapshot(), b"by a", None)
            .await
            .unwrap(),
        Fenced::Written(())
    );
    assert_eq!(b.acquire(room, "node-b").await.unwrap(), None);

    // The pause: more than twice the lease, so Redis has expired the key.
    std::thread::sleep(config.lease * 2 + Duration::from_millis(500));

    // Right after resuming, before the renewal task has run, the lease reads lost: the
    // local deadline needs no answer from Redis.
    assert_eq!(
        lease.state(),
        LeaseState::Lost {
            epoch,
            why: LostReason::Expired
        }
    );
    assert_eq!(
        lease
            .fenced_set(&keys.snapshot(), b"by a, late", None)
            .await
            .unwrap(),
        Fenced::Rejected(Rejected::LeaseLost)
    );

    let b_epoch = b
        .acquire(room, "node-b")
        .await
        .unwrap()
        .expect("the paused owner's lease expired");
    assert_eq!(b_epoch, Epoch(epoch.0 + 1));
    let b_holder = Holder {
        node: "node-b".into(),
        epoch: b_epoch,
    };

    // A write that was already on its way when the pause began, sent as the old holder,
    // is refused by the fence in Redis.
    let stale = lease.holder().clone();
    assert_eq!(
        a.fenced_set(room, &stale, &keys.snapshot(), b"by a, in flight", None)
            .await
            .unwrap(),
        Fenced::Rejected(Rejected::NotHolder {
            current: Some(b_holder.clone())
        })
    );
    assert!(
        !a.fenced_publish(room, &stale, "tc:{paused}:out", b"x")
            .await
            .unwrap()
            .is_written()
    );
    assert_eq!(
        get(&redis.url(), &keys.snapshot()).await.as_deref(),
        Some("by a")
    );

    // The renewal task reports the loss on its own, and never renews the old holder.
    assert_eq!(
        timeout(LIVENESS, lease.lost()).await.unwrap(),
        LostReason::Expired
    );
    assert_eq!(
        reported_loss(&lease).await,
        LeaseState::Lost {
            epoch,
            why: LostReason::Expired
        }
    );
    assert_eq!(a.stats().lost, 1);
    assert_eq!(b.owner(room).await.unwrap(), Some(b_holder.clone()));
    assert_eq!(
        b.fenced_set(room, &b_holder, &keys.snapshot(), b"by b", None)
            .await
            .unwrap(),
        Fenced::Written(())
    );
    // Releasing the lost lease does not delete the new owner's key.
    assert!(!lease.release().await.unwrap());
    assert_eq!(b.owner(room).await.unwrap(), Some(b_holder));
}

/// Waits until the lease's renewal task itself reports the loss on the watch channel.
async fn reported_loss(lease: &treecast_signaller::cluster::Lease) -> LeaseState {
    let mut updates = lease.watch();
    let lost = timeout(LIVENESS, updates.wait_for(|s| !s.is_held()))
        .await
        .expect("the renewal task reports the loss")
        .expect("the renewal task reports before it ends");
    *lost
}

/// Waits until `leases` has renewed at least `count` more times than `from`.
async fn renewals(leases: &Leases, from: u64, count: u64) {
    let deadline = Instant::now() + LIVENESS;
    while leases.stats().renewed < from + count {
        assert!(Instant::now() < deadline, "no renewals within {LIVENESS:?}");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_empty_the_owner_steps_down_and_the_room_is_taken_again() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let config = LeaseConfig::default();
    let a = leases(&redis.url(), config).await;
    let edge = leases(&redis.url_resp3(), config).await;
    let room = "phoenix";

    let lease = a.hold(room, "node-a").await.unwrap().expect("a free room");
    let epoch = lease.epoch();
    renewals(&a, 0, 2).await;
    assert!(lease.is_held());

    redis.kill();
    let why = timeout(LIVENESS, lease.lost())
        .await
        .expect("the owner steps down while redis is gone");
    assert_eq!(why, LostReason::Expired);
    assert!(!lease.is_held());
    assert_eq!(
        reported_loss(&lease).await,
        LeaseState::Lost {
            epoch,
            why: LostReason::Expired
        }
    );
    assert_eq!(a.stats().lost, 1);
    // Commands fail with typed, counted errors (no panic, no endless wait).
    let down = timeout(LIVENESS, edge.owner(room))
        .await
        .expect("a command fails instead of hanging");
    assert!(
        matches!(down, Err(ClusterError::Redis { op: "owner", .. })),
        "{down:?}"
    );
    assert!(edge.stats().redis_errors >= 1);

    redis.restart();
    // The same connection managers reconnect on their own. Redis forgot the epoch; the
    // node passes the one it remembers, so the new epoch is still higher.
    let deadline = Instant::now() + LIVENESS;
    let renewed_before = a.stats().renewed;
    let again = loop {
        // Errors while reconnecting, or `None` after an attempt whose reply was lost but
        // took the room: retry until that expires.
        if let Ok(Some(lease)) = a.hold_above(room, "node-a", epoch).await {
            break lease;
        }
        assert!(
            Instant::now() < deadline,
            "no acquisition within {LIVENESS:?} of the restart"
        );
        sleep(Duration::from_millis(100)).await;
    };
    assert!(again.epoch() > epoch, "{} <= {epoch}", again.epoch());
    assert_eq!(edge.epoch(room).await.unwrap(), Some(again.epoch()));
    assert_eq!(
        edge.owner(room).await.unwrap(),
        Some(again.holder().clone())
    );
    renewals(&a, renewed_before, 2).await;
    assert!(again.is_held());
    assert!(again.release().await.unwrap());
    assert_eq!(edge.owner(room).await.unwrap(), None);
}

#[tokio::test]
async fn only_the_current_owner_reaches_subscribers_and_streams() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let config = LeaseConfig::default();
    let a = leases(&redis.url(), config).await;
    let b = leases(&redis.url(), config).await;
    let room = "outputs";
    let keys = RoomKeys::new(room).unwrap();
    let channel = keys.key("out");
    let stream = keys.key("log");

    let client = redis::Client::open(redis.url()).unwrap();
    let mut subscriber = client.get_async_pubsub().await.unwrap();
    subscriber.subscribe(&channel).await.unwrap();
    let mut messages = subscriber.into_on_message();

    let lease_a = a.hold(room, "node-a").await.unwrap().unwrap();
    assert_eq!(
        lease_a.fenced_publish(&channel, b"a1").await.unwrap(),
        Fenced::Written(1)
    );
    let Fenced::Written(id) = lease_a
        .fenced_xadd(&stream, 100, &[("m", b"a1")])
        .await
        .unwrap()
    else {
        panic!("the owner's xadd was refused");
    };
    assert!(id.contains('-'), "{id}");
    // Keys of another room are not covered by this room's fence.
    assert!(matches!(
        lease_a.fenced_set("tc:{other}:snapshot", b"x", None).await,
        Err(ClusterError::KeyOutsideRoom { .. })
    ));

    let a_holder = lease_a.holder().clone();
    assert!(lease_a.release().await.unwrap());
    let lease_b = b.hold(room, "node-b").await.unwrap().unwrap();
    let stale_publish = a
        .fenced_publish(room, &a_holder, &channel, b"a2")
        .await
        .unwrap();
    assert_eq!(
        stale_publish,
        Fenced::Rejected(Rejected::NotHolder {
            current: Some(lease_b.holder().clone())
        })
    );
    assert!(
        !a.fenced_xadd(room, &a_holder, &stream, 100, &[("m", b"a2")])
            .await
            .unwrap()
            .is_written()
    );
    assert!(
        lease_b
            .fenced_publish(&channel, b"b1")
            .await
            .unwrap()
            .is_written()
    );
    assert!(
        lease_b
            .fenced_xadd(&stream, 100, &[("m", b"b1")])
            .await
            .unwrap()
            .is_written()
    );

    let mut received = Vec::new();
    for _ in 0..2 {
        let message = timeout(LIVENESS, messages.next())
            .await
            .expect("a published message arrives")
            .expect("the subscription is open");
        received.push(message.get_payload::<String>().unwrap());
    }
    assert_eq!(received, ["a1", "b1"]);

    let mut conn = cluster::connect(&redis.url()).await.unwrap();
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let logged: Vec<&str> = entries.iter().map(|(_, f)| f[0].1.as_str()).collect();
    assert_eq!(logged, ["a1", "b1"]);
    assert_eq!(a.stats().fenced, 2);
}

#[tokio::test]
async fn an_owner_whose_room_was_taken_learns_it_at_its_next_renewal() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let config = LeaseConfig::with_lease(Duration::from_secs(3));
    let a = leases(&redis.url(), config).await;
    let b = leases(&redis.url(), config).await;
    let room = "taken";
    let keys = RoomKeys::new(room).unwrap();
    let lease = a.hold(room, "node-a").await.unwrap().unwrap();

    // The key vanishes while the owner runs (a Redis failover that lost the last writes,
    // an operator's DEL), and another node takes the room.
    let mut conn = cluster::connect(&redis.url()).await.unwrap();
    let deleted: i64 = redis::cmd("DEL")
        .arg(keys.owner())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let b_epoch = b.acquire(room, "node-b").await.unwrap().unwrap();
    assert_eq!(b_epoch, Epoch(lease.epoch().0 + 1));

    assert_eq!(
        timeout(LIVENESS, lease.lost()).await.unwrap(),
        LostReason::Taken
    );
    assert_eq!(
        lease
            .fenced_set(&keys.snapshot(), b"a", None)
            .await
            .unwrap(),
        Fenced::Rejected(Rejected::LeaseLost)
    );
    // The new owner keeps the room: the old one stopped renewing.
    let holder = b.owner(room).await.unwrap().unwrap();
    assert_eq!(holder.node, "node-b");
    assert_eq!(a.stats().lost, 1);
}
