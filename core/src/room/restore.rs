//! Claims, and rebuilding a room from them.
//!
//! With claims enabled ([`Room::enable_claims`]) every peer holds a signed statement of its
//! place ([`crate::claim`]), renewed whenever its parent changes. A room the server lost
//! (restart, failover) starts as [`Room::restoring`]: it collects the claims its peers
//! present as they reconnect, holding every other `hello`, until the broadcaster and
//! every claimed parent are back and no claim arrived for [`RESTORE_QUIET`], or the
//! window ends. It then puts each peer back under the parent it claims, parents first,
//! without telling anyone of a link it already has: nobody's media connection changes.
//! Claims that cannot be honoured (the parent never came back, or its slots are taken by
//! later claims) are placed like newcomers; everyone then gets a status whose children
//! list is authoritative, so links to peers that did not come back are closed.

use std::collections::VecDeque;
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};

use super::{Output, Peer, Room, RoomConfig, RoomEvent, Timer};
use crate::claim::{Claim, ClaimError, ClaimKey, RoomMeta};
use crate::protocol::{EndReason, ErrorCode, Hello, MediaState, Role, ServerMessage};
use crate::room::ConnId;
use crate::{PeerId, RoomId};

/// Once the broadcaster and every claimed parent are back, the rebuild waits this long
/// after the last claim for stragglers (leaves, whose absence nobody else reveals).
pub const RESTORE_QUIET: Duration = Duration::from_millis(500);

/// Claims issued by a room: the key, the room's incarnation, and the running sequence.
#[derive(Debug)]
pub(super) struct Claims {
    key: ClaimKey,
    inc: u64,
    ttl: Duration,
    private: bool,
    seq: u64,
}

/// A room being rebuilt from its peers' claims.
#[derive(Debug)]
pub(super) struct Restoring {
    /// When the room is rebuilt with whatever claims arrived.
    deadline: Duration,
    /// When the last claim arrived.
    last_claim: Duration,
    /// Verified claims, in arrival order, with the `hello` that brought each.
    claims: Vec<(ConnId, Hello, Claim)>,
    /// `hello`s without a claim: joins wait for the rebuild.
    held: Vec<(ConnId, Hello)>,
    /// Claims refused so far.
    refused: u32,
}

/// What a rebuild did, for metrics and dashboards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RestoreSummary {
    /// Peers put back exactly where they claimed to be.
    pub in_place: u32,
    /// Peers whose claimed place could not be honoured; placed like newcomers.
    pub moved: u32,
    /// Claims refused (forged, expired, another room or incarnation, duplicates).
    pub refused: u32,
    /// `hello`s that waited for the rebuild (joins during it).
    pub held: u32,
}

impl Room {
    /// Makes the room hand out claims signed with `key`, valid for `ttl` and renewed
    /// before they expire. `inc` is the room's incarnation (random, fixed at creation);
    /// `private` tells a restoring driver to keep viewers behind signed links.
    pub fn enable_claims(&mut self, key: ClaimKey, inc: u64, ttl: Duration, private: bool) {
        self.claims = Some(Claims {
            key,
            inc,
            ttl: ttl.max(Duration::from_secs(60)),
            private,
            seq: 0,
        });
        self.arm(self.now + self.claim_scan_every(), Timer::Claims);
    }

    /// A room whose bookkeeping was lost, to be rebuilt from the claims its peers present
    /// within `window` (see the module docs). `token` and `inc` come from the driver (it
    /// verified the first claim before opening the room); `base` is the server's room
    /// configuration, completed from the broadcaster's claim.
    #[allow(clippy::too_many_arguments)]
    pub fn restoring(
        id: RoomId,
        token: String,
        base: RoomConfig,
        seed: u64,
        now: Duration,
        unix_at_zero: Duration,
        key: ClaimKey,
        inc: u64,
        ttl: Duration,
        private: bool,
        window: Duration,
    ) -> Self {
        let mut room = Self::new(id, token, base, seed, now);
        room.set_unix_epoch(unix_at_zero);
        room.enable_claims(key, inc, ttl, private);
        room.restoring = Some(Box::new(Restoring {
            deadline: now + window,
            last_claim: now,
            claims: Vec::new(),
            held: Vec::new(),
            refused: 0,
        }));
        room.arm(now + window, Timer::Restore);
        room
    }

    /// Whether the room is still collecting claims.
    pub fn is_restoring(&self) -> bool {
        self.restoring.is_some()
    }

    /// The room's incarnation, with claims enabled.
    pub fn incarnation(&self) -> Option<u64> {
        self.claims.as_ref().map(|c| c.inc)
    }

    fn claim_scan_every(&self) -> Duration {
        self.claims
            .as_ref()
            .map_or(Duration::from_secs(3600), |c| c.ttl / 4)
    }

    /// Sends `id` a fresh claim to its place (nothing without claims enabled).
    pub(super) fn issue_claim(&mut self, id: PeerId) {
        let Some(claims) = &mut self.claims else {
            return;
        };
        let Some(peer) = self.peers.get(&id) else {
            return;
        };
        if peer.departure.is_some() {
            return;
        }
        claims.seq += 1;
        let meta = (peer.role == Role::Broadcaster).then(|| RoomMeta {
            quality: self.config.quality,
            title: self.config.title.clone(),
            settings: self.config.settings(),
        });
        let claim = Claim {
            room: self.id.clone(),
            inc: claims.inc,
            peer: id,
            role: peer.role,
            parent: self.tree.parent(id),
            seq: claims.seq,
            exp: (self.unix_epoch + self.now + claims.ttl).as_secs(),
            uplink_kbps: peer.uplink_kbps,
            nat: peer.nat,
            meta,
            private: claims.private,
        };
        let claim = claims.key.sign(&claim);
        if let Some(p) = self.peers.get_mut(&id) {
            p.claimed_at = Some(self.now);
        }
        self.send_to_peer(id, ServerMessage::Claim { claim });
    }

    /// Renews claims past half their lifetime.
    pub(super) fn renew_claims(&mut self) {
        let Some(ttl) = self.claims.as_ref().map(|c| c.ttl) else {
            return;
        };
        self.arm(self.now + ttl / 4, Timer::Claims);
        let mut due: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.claimed_at.is_some_and(|t| t + ttl / 2 <= self.now))
            .map(|(&id, _)| id)
            .collect();
        due.sort_unstable();
        for id in due {
            self.issue_claim(id);
        }
    }

    /// Checks a presented claim against this room.
    fn check_claim(&self, hello: &Hello, token: &str) -> Result<Claim, ClaimError> {
        let claims = self.claims.as_ref().ok_or(ClaimError::Forged)?;
        let now_unix = (self.unix_epoch + self.now).as_secs();
        let claim = claims.key.verify(token, now_unix)?;
        if claim.room != self.id || claim.inc != claims.inc || claim.role != hello.role {
            return Err(ClaimError::OtherRoom);
        }
        Ok(claim)
    }

    /// A `hello` while restoring, past the checks every `hello` gets (version, room,
    /// broadcaster token): claims are collected, anything else waits.
    pub(super) fn restoring_hello(&mut self, conn: ConnId, hello: Hello) {
        let r = self.restoring.as_ref().expect("restoring");
        if r.claims.iter().any(|(c, _, _)| *c == conn) || r.held.iter().any(|(c, _)| *c == conn) {
            // The same connection's `hello` twice (a cluster edge sends its peers' again to
            // a new owner): the first stands.
            return;
        }
        let Some(token) = hello.claim.clone() else {
            let r = self.restoring.as_mut().expect("restoring");
            r.held.push((conn, hello));
            return;
        };
        let claim = match self.check_claim(&hello, &token) {
            Ok(claim) => claim,
            Err(error) => return self.refuse_claim(conn, error),
        };
        let now = self.now;
        let r = self.restoring.as_mut().expect("restoring");
        // The same peer twice (a reconnect racing its own half-open socket): the newer
        // connection with the newer claim wins.
        if let Some(i) = r.claims.iter().position(|(_, _, c)| c.peer == claim.peer) {
            if r.claims[i].2.seq > claim.seq {
                r.refused += 1;
                self.event(RoomEvent::ClaimRefused {
                    reason: ClaimError::OtherRoom,
                });
                return self.refuse(conn, ErrorCode::BadClaim, true);
            }
            let (old, _, _) = r.claims.remove(i);
            self.outputs.push_back(Output::Close { conn: old });
        }
        r.claims.push((conn, hello, claim));
        r.last_claim = now;
        self.arm(now + RESTORE_QUIET, Timer::Restore);
    }

    pub(super) fn refuse_claim(&mut self, conn: ConnId, reason: ClaimError) {
        if let Some(r) = self.restoring.as_mut() {
            r.refused += 1;
        }
        self.event(RoomEvent::ClaimRefused { reason });
        self.refuse(conn, ErrorCode::BadClaim, true);
    }

    /// A connection closed while restoring: whatever it brought is forgotten.
    pub(super) fn restoring_disconnect(&mut self, conn: ConnId) {
        let r = self.restoring.as_mut().expect("restoring");
        r.claims.retain(|(c, _, _)| *c != conn);
        r.held.retain(|(c, _)| *c != conn);
    }

    /// Rebuilds the room if everyone it waits for is back (or the window is over).
    pub(super) fn check_restore(&mut self) {
        let Some(r) = &self.restoring else {
            return;
        };
        let present: FxHashSet<PeerId> = r.claims.iter().map(|(_, _, c)| c.peer).collect();
        let complete = r.claims.iter().any(|(_, _, c)| c.role == Role::Broadcaster)
            && r.claims
                .iter()
                .all(|(_, _, c)| c.parent.is_none_or(|p| present.contains(&p)));
        let quiet = self.now >= r.last_claim + RESTORE_QUIET;
        if (complete && quiet) || self.now >= r.deadline {
            self.finish_restore();
        }
    }

    fn finish_restore(&mut self) {
        let r = *self.restoring.take().expect("restoring");
        let mut summary = RestoreSummary {
            in_place: 0,
            moved: 0,
            refused: r.refused,
            held: r.held.len() as u32,
        };
        let mut claims = r.claims;
        // Newest claim first: when two claim the last slot of a parent, the later one holds
        // it (the earlier may be a place its holder left since).
        claims.sort_by_key(|c| std::cmp::Reverse(c.2.seq));
        let root = claims
            .iter()
            .position(|(_, _, c)| c.role == Role::Broadcaster);
        let Some(root) = root else {
            // Nobody can vouch for the room's settings and the broadcaster is gone: the
            // broadcast is over. Held broadcaster `hello`s (a reloaded page) start afresh.
            let broadcaster_back = r.held.iter().any(|(_, h)| h.role == Role::Broadcaster);
            if !broadcaster_back {
                for (conn, _, _) in claims {
                    self.send(
                        conn,
                        ServerMessage::Ended {
                            reason: EndReason::BroadcasterLost,
                        },
                    );
                    self.outputs.push_back(Output::Close { conn });
                }
                for (conn, _) in r.held {
                    self.send(
                        conn,
                        ServerMessage::Ended {
                            reason: EndReason::BroadcasterLost,
                        },
                    );
                    self.outputs.push_back(Output::Close { conn });
                }
                self.end(EndReason::BroadcasterLost);
                return;
            }
            // A reloaded broadcaster page starts the room over under its new session: the
            // viewers' claims name a root that is gone, so they join afresh.
            for (conn, _, _) in claims {
                self.refuse(conn, ErrorCode::BadClaim, true);
                summary.refused += 1;
            }
            self.event(RoomEvent::Restored(summary));
            for (conn, hello) in r.held {
                self.on_hello(conn, hello);
            }
            return;
        };
        // `remove`, not `swap_remove`: the newest-first order decides contested slots.
        let (root_conn, root_hello, root_claim) = claims.remove(root);
        if let Some(meta) = &root_claim.meta {
            self.apply_meta(meta);
        }
        let max_id = claims
            .iter()
            .map(|(_, _, c)| c.peer.0)
            .chain([root_claim.peer.0])
            .max()
            .unwrap_or(0);
        self.next_peer = self.next_peer.max(max_id + 1);
        let max_seq = claims
            .iter()
            .map(|(_, _, c)| c.seq)
            .chain([root_claim.seq])
            .max()
            .unwrap_or(0);
        if let Some(c) = &mut self.claims {
            c.seq = c.seq.max(max_seq);
        }
        // The root.
        let root_id = root_claim.peer;
        self.restore_peer(root_conn, &root_hello, &root_claim);
        self.broadcaster = Some(root_id);
        let capacity = self.target_capacity(root_id);
        let _ = self.tree.set_root(root_id, capacity);
        // Parents first, each peer under the parent it claims while that parent has room.
        let mut by_parent: FxHashMap<PeerId, Vec<usize>> = FxHashMap::default();
        for (i, (_, _, c)) in claims.iter().enumerate() {
            if let Some(p) = c.parent {
                by_parent.entry(p).or_default().push(i);
            }
        }
        let mut placed = vec![false; claims.len()];
        let mut queue = VecDeque::from([root_id]);
        while let Some(parent) = queue.pop_front() {
            for &i in by_parent.get(&parent).map_or(&[][..], |v| v) {
                let (conn, hello, claim) = &claims[i];
                if self.peers.contains_key(&claim.peer) || !self.tree.has_slot(parent) {
                    continue;
                }
                self.restore_peer(*conn, hello, claim);
                let capacity = self.target_capacity(claim.peer);
                let _ = self
                    .tree
                    .insert_under(claim.peer, capacity, claim.nat, parent);
                placed[i] = true;
                queue.push_back(claim.peer);
            }
        }
        summary.in_place = 1 + placed.iter().filter(|&&p| p).count() as u32;
        // Links everyone already has: nobody is told of them again.
        let restored: Vec<PeerId> = self.tree.peers().collect();
        self.tree.drain_events().for_each(drop);
        for &id in &restored {
            if let Some(p) = self.peers.get_mut(&id) {
                // It was receiving when the server went away; its next report says.
                p.media = MediaState::Receiving;
                p.linked_at = Some(self.now);
            }
        }
        // The rest are placed like newcomers, keeping their ids (and subtrees, when their
        // parent came back under a new place): parents before children where possible.
        let mut rest: Vec<usize> = (0..claims.len())
            .filter(|&i| !placed[i] && !self.peers.contains_key(&claims[i].2.peer))
            .collect();
        while !rest.is_empty() {
            let before = rest.len();
            let waiting: FxHashSet<PeerId> = rest.iter().map(|&i| claims[i].2.peer).collect();
            rest.retain(|&i| {
                let (conn, hello, claim) = &claims[i];
                if claim.parent.is_some_and(|p| waiting.contains(&p)) {
                    return true;
                }
                self.restore_peer(*conn, hello, claim);
                let capacity = self.target_capacity(claim.peer);
                let _ = match claim.parent.filter(|p| self.tree.contains(*p)) {
                    Some(p) => self
                        .tree
                        .insert_under(claim.peer, capacity, claim.nat, p)
                        .map(|_| ()),
                    None => self
                        .tree
                        .insert(claim.peer, capacity)
                        .and_then(|()| self.tree.set_nat(claim.peer, claim.nat)),
                };
                summary.moved += 1;
                false
            });
            if rest.len() == before {
                // Claims naming each other (stale places): place them all as they come.
                for i in std::mem::take(&mut rest) {
                    let (conn, hello, claim) = &claims[i];
                    self.restore_peer(*conn, hello, claim);
                    let capacity = self.target_capacity(claim.peer);
                    let _ = self.tree.insert(claim.peer, capacity);
                    summary.moved += 1;
                }
            }
        }
        self.tree.settle();
        self.flush_tree_events(None);
        // Everyone hears its place: the children lists are authoritative, so links to
        // peers that did not come back are closed.
        let mut everyone: Vec<PeerId> = self.peers.keys().copied().collect();
        everyone.sort_unstable();
        for id in everyone {
            self.send_status(id);
            self.issue_claim(id);
            self.arm_liveness(id);
        }
        self.announce(None);
        self.event(RoomEvent::Restored(summary));
        for (conn, hello) in r.held {
            self.on_hello(conn, hello);
        }
    }

    /// Takes the room's settings from the broadcaster's claim.
    fn apply_meta(&mut self, meta: &RoomMeta) {
        if let Some(Ok(config)) = meta.quality.map(|q| self.config.for_quality(q)) {
            self.config = config;
        }
        self.config.title = meta.title.clone();
        let s = meta.settings;
        self.config.root_fanout = s.root_fanout.max(1);
        self.config.relay_fanout = s.relay_fanout;
        self.config.max_depth = s.max_depth.max(1);
        self.config.max_peers = s.max_peers;
        self.tree = crate::tree::RelayTree::new(self.config.max_depth);
        self.tree.set_relay_allowed(self.config.has_relay());
    }

    /// Adds a claimed peer to the room (not yet to the tree) and welcomes it back.
    fn restore_peer(&mut self, conn: ConnId, hello: &Hello, claim: &Claim) {
        let resume = self.fresh_resume();
        let uplink = hello.uplink_kbps.or(claim.uplink_kbps);
        let mut peer = Peer::new(claim.role, conn, resume, uplink, self.now);
        peer.nat = claim.nat;
        self.peers.insert(claim.peer, peer);
        self.conns.insert(conn, claim.peer);
        self.resumes.insert(resume, claim.peer);
        let capacity = self.target_capacity(claim.peer);
        self.welcome(conn, claim.peer, claim.role, resume, true, capacity);
        self.event(RoomEvent::Joined {
            peer: claim.peer,
            role: claim.role,
            resumed: true,
            capacity,
        });
    }

    /// A claim presented after the rebuild (a peer slower to reconnect than the window):
    /// back under its claimed parent if that has room, else placed like a newcomer.
    pub(super) fn late_claim(&mut self, conn: ConnId, hello: Hello, token: &str) {
        let claim = match self.check_claim(&hello, token) {
            Ok(claim) => claim,
            Err(error) => return self.refuse_claim(conn, error),
        };
        if self.peers.contains_key(&claim.peer) || claim.role == Role::Broadcaster {
            // Its place was given up (or its id reused): it joins afresh.
            return self.refuse_claim(conn, ClaimError::OtherRoom);
        }
        self.next_peer = self.next_peer.max(claim.peer.0 + 1);
        self.restore_peer(conn, &hello, &claim);
        let capacity = self.target_capacity(claim.peer);
        let in_place = match claim.parent.filter(|p| self.tree.contains(*p)) {
            Some(p) => self
                .tree
                .insert_under(claim.peer, capacity, claim.nat, p)
                .unwrap_or(false),
            None => {
                let _ = self.tree.insert(claim.peer, capacity);
                false
            }
        };
        if in_place {
            self.tree.drain_events().for_each(drop);
            if let Some(p) = self.peers.get_mut(&claim.peer) {
                p.media = MediaState::Receiving;
                p.linked_at = Some(self.now);
            }
            if let Some(parent) = claim.parent {
                // The parent's authoritative list must now name it again.
                self.send_status(parent);
            }
        }
        self.tree.settle();
        self.flush_tree_events(Some(claim.peer));
        self.issue_claim(claim.peer);
        self.arm_liveness(claim.peer);
        self.event(RoomEvent::Restored(RestoreSummary {
            in_place: u32::from(in_place),
            moved: u32::from(!in_place),
            refused: 0,
            held: 0,
        }));
    }
}
