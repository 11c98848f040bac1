//! A room rebuilt from its peers' claims (a server restart or a failover): everyone goes
//! back where they were, nobody is told of a link they already have, and claims that are
//! forged, expired or for another room are refused.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use proptest::prelude::*;
use treecast_core::claim::{Claim, ClaimKey};
use treecast_core::protocol::{ClientMessage, ErrorCode, Hello, Role, ServerMessage};
use treecast_core::room::{ConnId, Input, Output, RESTORE_QUIET, Room, RoomConfig, RoomEvent};
use treecast_core::{PeerId, RoomId};

const TOKEN: &str = "secret-token";
const INC: u64 = 42;
const WINDOW: Duration = Duration::from_secs(6);
const TTL: Duration = Duration::from_secs(3600);
/// The Unix time at the rooms' `now = 0`.
const UNIX: Duration = Duration::from_secs(1_800_000_000);

fn key() -> ClaimKey {
    ClaimKey::new([7; 32])
}

fn config() -> RoomConfig {
    RoomConfig {
        root_fanout: 2,
        relay_fanout: 2,
        // Background moves and standbys are not what is under test here.
        rebalance_moves_per_second: 0,
        warm_standby: false,
        ..RoomConfig::default()
    }
}

/// What one connection received.
#[derive(Debug, Default, Clone)]
struct Client {
    peer: Option<PeerId>,
    resume: Option<String>,
    claim: Option<String>,
    role: Option<Role>,
    uplink: Option<u32>,
    /// `parent`, `child` and `drop` messages: links made or closed.
    link_changes: u32,
    resumed: Option<bool>,
    children: Option<BTreeSet<PeerId>>,
    parent: Option<PeerId>,
    errors: Vec<ErrorCode>,
    closed: bool,
}

struct Driver {
    room: Room,
    now: Duration,
    clients: HashMap<ConnId, Client>,
    events: Vec<RoomEvent>,
}

impl Driver {
    fn new(room: Room) -> Self {
        Self {
            room,
            now: Duration::ZERO,
            clients: HashMap::new(),
            events: Vec::new(),
        }
    }

    fn input(&mut self, input: Input) {
        self.room.handle(self.now, input);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(out) = self.room.poll_output() {
            match out {
                Output::Send { conn, msg } => {
                    let c = self.clients.entry(conn).or_default();
                    match msg {
                        ServerMessage::Welcome {
                            peer_id,
                            resume,
                            resumed,
                            ..
                        } => {
                            c.peer = Some(peer_id);
                            c.resume = Some(resume);
                            c.resumed = Some(resumed);
                        }
                        ServerMessage::Claim { claim } => c.claim = Some(claim),
                        ServerMessage::Parent { peer_id, .. } => {
                            c.parent = Some(peer_id);
                            c.link_changes += 1;
                        }
                        ServerMessage::Child { .. } | ServerMessage::Drop { .. } => {
                            c.link_changes += 1;
                        }
                        ServerMessage::Room {
                            children, parent, ..
                        } => {
                            c.children = Some(children.into_iter().collect());
                            c.parent = parent;
                        }
                        ServerMessage::Error { code, .. } => c.errors.push(code),
                        _ => {}
                    }
                }
                Output::Close { conn } => self.clients.entry(conn).or_default().closed = true,
                Output::Event(e) => self.events.push(e),
            }
        }
    }

    fn hello(
        &mut self,
        conn: u64,
        role: Role,
        uplink: Option<u32>,
        claim: Option<(String, String)>,
    ) {
        let conn = ConnId(conn);
        let c = self.clients.entry(conn).or_default();
        c.role = Some(role);
        c.uplink = uplink;
        let (resume, claim) = claim.unzip();
        self.input(Input::Hello {
            conn,
            hello: Hello {
                v: 1,
                room: RoomId::new("r1").unwrap(),
                role,
                token: (role == Role::Broadcaster).then(|| TOKEN.to_owned()),
                uplink_kbps: uplink,
                resume,
                link: None,
                claim,
            },
        });
    }

    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        while let Some(at) = self.room.poll_timeout().filter(|&t| t <= until) {
            self.now = at.max(self.now);
            self.input(Input::Tick);
        }
        self.now = until;
        self.input(Input::Tick);
    }

    /// Each peer's parent, from the room's tree.
    fn parents(&self) -> BTreeMap<PeerId, Option<PeerId>> {
        self.room
            .tree()
            .peers()
            .map(|p| (p, self.room.tree().parent(p)))
            .collect()
    }
}

fn live_room() -> Room {
    let mut room = Room::new(
        RoomId::new("r1").unwrap(),
        TOKEN.into(),
        config(),
        1,
        Duration::ZERO,
    );
    room.set_unix_epoch(UNIX);
    room.enable_claims(key(), INC, TTL, false);
    room
}

fn restoring_room() -> Room {
    Room::restoring(
        RoomId::new("r1").unwrap(),
        TOKEN.into(),
        config(),
        2,
        Duration::ZERO,
        UNIX + Duration::from_secs(100),
        key(),
        INC,
        TTL,
        false,
        WINDOW,
    )
}

/// A room with a broadcaster and viewers of the given uplinks, some of whom then leave.
fn grown(uplinks: &[u32], leavers: &[usize]) -> Driver {
    let mut d = Driver::new(live_room());
    d.hello(0, Role::Broadcaster, Some(10_000), None);
    for (i, &up) in uplinks.iter().enumerate() {
        d.advance(Duration::from_millis(50));
        d.hello(i as u64 + 1, Role::Viewer, Some(up), None);
    }
    for &i in leavers {
        let conn = ConnId(i as u64 % uplinks.len() as u64 + 1);
        d.input(Input::Message {
            conn,
            msg: ClientMessage::Leave { linger: false },
        });
        d.input(Input::Disconnected { conn });
        d.clients.remove(&conn);
    }
    d.advance(Duration::from_secs(1));
    d
}

/// Every connected client of `old` says `hello` again, with its resume token and claim,
/// in `order`, to a room restoring from scratch.
fn restore(old: &Driver, order: &[usize], skip: &BTreeSet<PeerId>) -> Driver {
    let mut d = Driver::new(restoring_room());
    let mut conns: Vec<&ConnId> = old.clients.keys().collect();
    conns.sort();
    let n = conns.len();
    for (k, &i) in order.iter().enumerate().take(n) {
        let conn = conns[i % n];
        let c = &old.clients[conn];
        if c.closed || skip.contains(&c.peer.unwrap()) {
            continue;
        }
        d.advance(Duration::from_millis(10));
        d.hello(
            100 + k as u64,
            c.role.unwrap(),
            c.uplink,
            Some((c.resume.clone().unwrap(), c.claim.clone().unwrap())),
        );
    }
    d.advance(RESTORE_QUIET + Duration::from_millis(100));
    d
}

fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the order peers come back in, the tree is the one they left, and no peer
    /// is told of a link it does not already have.
    #[test]
    fn everyone_goes_back_where_they_were(
        uplinks in prop::collection::vec(prop::sample::select(vec![300u32, 1_250, 2_500, 10_000]), 1..40),
        leavers in prop::collection::vec(0usize..40, 0..6),
        seed in any::<u64>(),
    ) {
        let old = grown(&uplinks, &leavers);
        let before = old.parents();
        let order = shuffled(old.clients.len(), seed);
        let new = restore(&old, &order, &BTreeSet::new());
        prop_assert!(!new.room.is_restoring());
        prop_assert_eq!(new.parents(), before.clone());
        for (conn, c) in &new.clients {
            prop_assert_eq!(c.resumed, Some(true), "{:?}", conn);
            prop_assert_eq!(c.link_changes, 0, "{:?} was told of a link", c.peer);
            let id = c.peer.unwrap();
            let children: BTreeSet<PeerId> = old.room.tree().children(id).collect();
            prop_assert_eq!(c.children.clone(), Some(children));
            prop_assert!(c.claim.is_some());
        }
        // New peers get ids the restored ones never had.
        let max = before.keys().max().unwrap().0;
        let mut d = new;
        d.hello(999, Role::Viewer, Some(2_500), None);
        prop_assert!(d.clients[&ConnId(999)].peer.unwrap().0 > max);
    }
}

#[test]
fn a_relay_that_does_not_come_back_has_its_children_placed_and_the_rest_stay() {
    let uplinks = [2_500; 12];
    let old = grown(&uplinks, &[]);
    let before = old.parents();
    // A depth-1 relay with children.
    let root = old.room.tree().root().unwrap();
    let relay = old
        .room
        .tree()
        .children(root)
        .find(|&c| old.room.tree().children(c).count() > 0)
        .unwrap();
    let orphans: BTreeSet<PeerId> = old.room.tree().children(relay).collect();
    let order = shuffled(old.clients.len(), 9);
    let mut new = restore(&old, &order, &BTreeSet::from([relay]));
    // It waits out the window for the missing parent.
    assert!(new.room.is_restoring());
    new.advance(WINDOW);
    assert!(!new.room.is_restoring());
    let after = new.parents();
    assert!(!after.contains_key(&relay));
    for (peer, parent) in &before {
        if *peer == relay {
            continue;
        }
        if orphans.contains(peer) {
            assert!(after[peer].is_some(), "orphan {peer} placed");
            assert_ne!(after[peer], Some(relay));
        } else if parent != &Some(relay) {
            assert_eq!(&after[peer], parent, "{peer} kept its place");
        }
    }
    // The relay's parent no longer lists it.
    let parent_of_relay = before[&relay].unwrap();
    let c = new
        .clients
        .values()
        .find(|c| c.peer == Some(parent_of_relay))
        .unwrap();
    assert!(!c.children.as_ref().unwrap().contains(&relay));
    new.room.tree().invariants().unwrap();
}

#[test]
fn forged_expired_and_foreign_claims_are_refused_and_counted() {
    let old = grown(&[2_500, 2_500], &[]);
    let broadcaster = old.clients[&ConnId(0)].clone();
    let viewer = old.clients[&ConnId(1)].clone();
    let mut d = Driver::new(restoring_room());
    d.hello(
        10,
        Role::Broadcaster,
        None,
        Some((
            broadcaster.resume.clone().unwrap(),
            broadcaster.claim.clone().unwrap(),
        )),
    );
    // Signed with another key.
    let mut claim: Claim = key().verify(viewer.claim.as_deref().unwrap(), 0).unwrap();
    let forged = ClaimKey::new([8; 32]).sign(&claim);
    d.hello(11, Role::Viewer, None, Some(("x".into(), forged)));
    // Another incarnation of the room.
    claim.inc = INC + 1;
    d.hello(
        12,
        Role::Viewer,
        None,
        Some(("x".into(), key().sign(&claim))),
    );
    // Expired.
    claim.inc = INC;
    claim.exp = 1;
    d.hello(
        13,
        Role::Viewer,
        None,
        Some(("x".into(), key().sign(&claim))),
    );
    // Garbage, and a viewer claim presented as the broadcaster's.
    d.hello(14, Role::Viewer, None, Some(("x".into(), "garbage".into())));
    for conn in 11..=14 {
        let c = &d.clients[&ConnId(conn)];
        assert_eq!(c.errors, vec![ErrorCode::BadClaim], "conn {conn}");
        assert!(c.closed);
    }
    let refused = d
        .events
        .iter()
        .filter(|e| matches!(e, RoomEvent::ClaimRefused { .. }))
        .count();
    assert_eq!(refused, 4);
    // The genuine viewer still gets its place back.
    d.hello(
        15,
        Role::Viewer,
        None,
        Some((
            viewer.resume.clone().unwrap(),
            viewer.claim.clone().unwrap(),
        )),
    );
    d.advance(WINDOW);
    assert_eq!(
        d.parents(),
        old.parents()
            .into_iter()
            .filter(|(p, _)| *p != PeerId(3))
            .collect()
    );
}

#[test]
fn joins_during_the_rebuild_wait_and_then_join() {
    let old = grown(&[2_500, 2_500], &[]);
    let mut d = Driver::new(restoring_room());
    d.hello(50, Role::Viewer, Some(2_500), None);
    assert!(
        d.clients[&ConnId(50)].peer.is_none(),
        "no welcome while restoring"
    );
    let order: Vec<usize> = (0..old.clients.len()).collect();
    for &i in &order {
        let conn = ConnId(i as u64);
        let c = &old.clients[&conn];
        d.hello(
            60 + i as u64,
            c.role.unwrap(),
            c.uplink,
            Some((c.resume.clone().unwrap(), c.claim.clone().unwrap())),
        );
    }
    d.advance(RESTORE_QUIET + Duration::from_millis(10));
    assert!(!d.room.is_restoring());
    let newcomer = &d.clients[&ConnId(50)];
    assert_eq!(newcomer.resumed, Some(false));
    assert!(newcomer.parent.is_some());
}

#[test]
fn without_the_broadcaster_the_room_ends_when_the_window_does() {
    let old = grown(&[2_500], &[]);
    let viewer = old.clients[&ConnId(1)].clone();
    let mut d = Driver::new(restoring_room());
    d.hello(
        1,
        Role::Viewer,
        None,
        Some((viewer.resume.unwrap(), viewer.claim.unwrap())),
    );
    d.advance(WINDOW + Duration::from_millis(10));
    assert!(d.room.ended().is_some());
    assert!(d.clients[&ConnId(1)].closed);
}
