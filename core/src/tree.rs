//! The capacity-aware relay tree.
//!
//! Peers are nodes of a petgraph [`StableGraph`] (edges point parent → child); node indices
//! never leave this module, callers speak [`PeerId`]. Every mutation appends [`TreeEvent`]s
//! that the caller drains with [`RelayTree::drain_events`] and turns into messages.
//!
//! # Placement
//! A joining peer gets the shallowest attached node with a free slot; ties go to the node
//! with more spare slots. Attached nodes with a free slot live in an index grouped by depth
//! and spare slots ([`crate::buckets`]), so finding the best slot never scans the peers.
//! A newcomer whose capacity beats a shallow low-capacity *leaf* by at least two takes that
//! leaf's place and adopts it as its first child (promotion): the newcomer ends up shallower
//! than its best free slot would put it, the displaced leaf no deeper, and the tree gains
//! shallow slots. Only leaves are displaced so that a promotion moves one peer, not a subtree.
//!
//! # Repair
//! When a relay leaves, the deepest leaf able to feed all of its children takes its place
//! and adopts them (the way a heap deletes: the last element fills the hole). The children
//! and their subtrees keep their depth, only the leaf moves, and the tree stays as shallow
//! as it was. Without this, every orphan but one sinks to the bottom of the tree and depth
//! grows steadily under churn.
//!
//! Strong peers rarely stay leaves (they attract children), so often no leaf can feed all
//! the orphans. Then the deepest peer below the departed relay that can, relay or not and
//! the orphans' own subtrees included, takes the place: it adopts the orphans, keeps as
//! many of its own children as it still has room for (they rise with it), and the rest of
//! its children are placed like orphans. Those come from near the bottom of the tree,
//! where a slot costs little depth, while the orphans, the roots of the big subtrees, keep
//! theirs: the hole moves to the bottom instead of whole subtrees sinking. Peers are
//! found in a rank index of attached peers by (depth, capacity class). Only when nobody
//! can feed them all does the strongest leaf adopt what it can.
//!
//! When nobody can stand in (or the root left), each child is detached *with its
//! subtree*. A detached subtree leaves every index, so the placement query cannot pick a
//! slot inside it; it is re-attached as a unit to the best slot, the orphan with the most
//! capacity first. When re-attaching would push nodes below the depth limit, the children
//! of nodes at the limit are cut off and placed like any other orphan. Subtrees that find
//! no slot wait, in arrival order, and are placed as soon as a slot frees up.
//!
//! # Rebalancing
//! Joins in random order, leaves and NAT limits still leave strong peers deep below weak
//! ones, and free slots high above deep leaves. [`RelayTree::rebalance`] repairs that a few
//! moves at a time: it lifts the deepest leaf into a free slot two or more levels higher,
//! or swaps a strong deep peer with a weaker shallow one (the strong one takes the weak
//! one's place, children and as many of its own children as fit; the weak one takes the
//! strong one's old place and the rest). Moves never deepen the tree (waiting subtrees
//! placed in the slots they free may go deeper) and each one lowers the total of
//! capacity × depth, so repeated calls come to rest. The room is to call it on a timer
//! with a moves-per-second budget and carry out every move make-before-break.
//!
//! Work per operation is O(fan-out · log N) for joins and stand-in repairs; a subtree that
//! must move (or rises with a stand-in or a swap) costs time proportional to its size,
//! never to the size of the tree.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::buckets::{Buckets, CLASSES, Slot, class_of};

use petgraph::Direction::{Incoming, Outgoing};
use petgraph::stable_graph::{NodeIndex, StableGraph};
use serde::Serialize;

use crate::ids::{PeerId, PeerIndex};
use crate::protocol::NatClass;

/// Free slots are indexed per NAT group of the feeding peer, so placement finds the
/// shallowest slot a child can reach directly without scanning past those it cannot.
const GROUPS: usize = 4;

/// The index group of a peer by NAT class: peers in one group connect directly to the
/// same children.
fn group_of(nat: NatClass) -> usize {
    match nat {
        NatClass::Public | NatClass::FullCone => 0,
        NatClass::Cone | NatClass::Unknown => 1,
        NatClass::Symmetric => 2,
        NatClass::Blocked => 3,
    }
}

/// How good a free slot is, smallest best: depth, then the NAT group of the parent
/// (restrictive first), then its spare slots (most first).
type SlotRank = (u32, Reverse<usize>, Reverse<usize>);

/// NAT classes, for per-class tables.
const NAT_CLASSES: usize = NatClass::ALL.len();

/// The position of a class in [`NatClass::ALL`].
fn nat_index(nat: NatClass) -> usize {
    NatClass::ALL
        .iter()
        .position(|&c| c == nat)
        .expect("ALL lists every class")
}

/// A class standing for each group in the direct-connection matrix.
const GROUP_CLASS: [NatClass; GROUPS] = [
    NatClass::FullCone,
    NatClass::Cone,
    NatClass::Symmetric,
    NatClass::Blocked,
];

/// The least `(capacity difference) × (depth difference)` for which [`RelayTree::rebalance`]
/// swaps a strong deep peer with a weak shallow one: a one-level swap is worth its moves only
/// when it lifts at least two slots.
pub const MIN_SWAP_GAIN: u32 = 2;

/// Members of one `(depth, class)` cell a rebalancing search tries per look.
const PER_CELL: usize = 4;

/// The least depth any tree can have that holds peers of these capacities below a root
/// feeding `root_capacity`: levels filled one by one, the strongest peers highest (`d_min`,
/// the yardstick for depth under churn). None when they cannot all be held (too many feed
/// nobody). O(N log N): for tests, benchmarks and simulations.
pub fn min_depth(root_capacity: u32, capacities: impl IntoIterator<Item = u32>) -> Option<u32> {
    let mut caps: Vec<u32> = capacities.into_iter().collect();
    caps.sort_unstable_by(|a, b| b.cmp(a));
    let (mut placed, mut depth, mut slots) = (0usize, 0u32, u64::from(root_capacity));
    while placed < caps.len() {
        if slots == 0 {
            return None;
        }
        let take = usize::try_from(slots)
            .unwrap_or(usize::MAX)
            .min(caps.len() - placed);
        slots = caps[placed..placed + take]
            .iter()
            .map(|&c| u64::from(c))
            .sum();
        placed += take;
        depth += 1;
    }
    Some(depth)
}

/// Who changes parent in a swap of a strong deep peer with a weak shallow one.
struct SwapPlan {
    strong: NodeIndex,
    weak: NodeIndex,
    /// The weak one's children (but the strong one), which the strong one adopts.
    adopted: Vec<NodeIndex>,
    /// The strong one's children that the weak one takes.
    given: Vec<NodeIndex>,
    /// The strong one's children that rise with it.
    kept: Vec<NodeIndex>,
}

/// Most failed parents remembered per peer. A peer that failed with this many is not
/// going to connect to the next one either; the oldest failure is forgotten.
const MAX_AVOIDED: usize = 64;

/// Why a peer has no parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitReason {
    /// No free slot within the depth limit.
    NoSlot,
    /// Slots are free, but none is with a peer this one can reach: their NAT classes
    /// cannot connect directly (or ICE failed with them) and no TURN relay is configured.
    NoRoute,
}

/// Something that changed in the tree; drained by the caller after each operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TreeEvent {
    /// `child` now pulls the stream from `parent`, at `depth`.
    Linked {
        /// The feeding peer.
        parent: PeerId,
        /// The fed peer.
        child: PeerId,
        /// Depth of `child` after the link.
        depth: u32,
    },
    /// The edge between `parent` and `child` is gone (one of them may have left).
    Unlinked {
        /// The former feeding peer.
        parent: PeerId,
        /// The former fed peer.
        child: PeerId,
    },
    /// A descendant of a moved subtree is now at a different depth (same parent).
    DepthChanged {
        /// The peer.
        peer: PeerId,
        /// Its new depth.
        depth: u32,
    },
    /// `peer` found no slot and waits (its subtree, if any, waits with it).
    Waiting {
        /// The waiting peer.
        peer: PeerId,
    },
}

/// A tree operation that could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// The peer is not in the tree.
    #[error("peer {0} is not in the tree")]
    UnknownPeer(PeerId),
    /// The peer is already in the tree.
    #[error("peer {0} is already in the tree")]
    DuplicatePeer(PeerId),
    /// The tree already has a root.
    #[error("the tree already has a root")]
    RootExists,
    /// The operation does not apply to the root.
    #[error("the root has no parent to move away from")]
    IsRoot,
}

/// A broken tree invariant, found by [`RelayTree::invariants`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tree invariant violated: {0}")]
pub struct InvariantViolation(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Connected to the root through attached ancestors.
    Attached,
    /// In a subtree cut off from the root; the subtree's top node is in the waiting queue.
    Detached,
}

#[derive(Debug, Clone)]
struct Node {
    peer: PeerId,
    capacity: u32,
    /// Cached out-degree, so spare capacity is O(1).
    children: u32,
    /// Valid while attached; kept while detached to report depth changes on re-attach.
    depth: u32,
    status: Status,
    /// Where this node sits in the free-slot index, if it does.
    free_slot: Option<Slot>,
    /// Where this node sits in the leaf index, if it does.
    leaf_slot: Option<Slot>,
    /// Where this node sits in the rank index (attached non-root nodes), if it does.
    rank_slot: Option<Slot>,
    /// Position in the waiting queue, if this node heads a waiting subtree.
    wait_seq: Option<u64>,
    /// How other peers can reach it.
    nat: NatClass,
    /// Takes no new children for now (its free slots are not offered); see
    /// [`RelayTree::set_held`].
    held: bool,
    /// The capacity it is being brought down to, one moved child at a time, while it
    /// still feeds more children than that ([`RelayTree::limit_capacity`]); `capacity`
    /// then follows its child count down and it offers no slot.
    shed_to: Option<u32>,
}

impl Node {
    fn spare(&self) -> u32 {
        self.capacity.saturating_sub(self.children)
    }
}

/// Read-only view of one peer, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerView {
    /// The peer.
    pub peer: PeerId,
    /// Its parent, if attached below the root.
    pub parent: Option<PeerId>,
    /// Its depth, if attached.
    pub depth: Option<u32>,
    /// Children it may feed.
    pub capacity: u32,
    /// Its current children.
    pub children: Vec<PeerId>,
}

type Graph = StableGraph<Node, (), petgraph::Directed, u32>;

/// The relay tree of one room. See the module docs for placement and repair.
#[derive(Debug, Clone)]
pub struct RelayTree {
    graph: Graph,
    /// Peer ids are small integers: a multiplicative hash is enough and several times
    /// cheaper than SipHash on this hot path.
    /// Peer id → node index, without hashing (ids are small sequential integers).
    nodes: PeerIndex,
    root: Option<NodeIndex>,
    max_depth: u32,
    /// Attached nodes with spare slots and depth below the limit, by (depth, spare class),
    /// one index per NAT group ([`group_of`]).
    free: [Buckets; GROUPS],
    /// Attached non-root leaves by (depth, capacity class): the shallowest weak leaf is a
    /// promotion target, the deepest strong leaf a stand-in for a departing relay.
    leaves: Buckets,
    /// Every attached non-root node by (depth, capacity class): the strong deep peers a
    /// repair promotes and the weak shallow ones rebalancing swaps them with.
    ranks: Buckets,
    /// Heads of detached subtrees in arrival order.
    waiting: BTreeMap<u64, NodeIndex>,
    /// The same queue split by the heads' NAT classes (index in [`NatClass::ALL`]), so a
    /// fill only looks at heads that could use a free slot: peers nobody can reach (no
    /// relay) may wait for long, and must not cost every operation a scan.
    waiting_by_nat: [BTreeSet<u64>; NAT_CLASSES],
    next_wait_seq: u64,
    /// Attached peers per depth, for max depth and histograms without a scan.
    depth_counts: Vec<u64>,
    events: Vec<TreeEvent>,
    /// Reused work lists, so operations do not allocate in steady state.
    orphans: VecDeque<NodeIndex>,
    stack: Vec<(NodeIndex, u32)>,
    /// Parents each peer must not be placed under (and children it must not feed): ICE
    /// between them failed. Both directions are recorded. Only peers with failures have
    /// an entry, so the common case costs one emptiness check.
    avoided: rustc_hash::FxHashMap<PeerId, Vec<PeerId>>,
    /// Whether a TURN relay is available: peers whose NAT classes cannot connect directly
    /// may then be linked when no direct slot exists (TURN carries the link).
    relay_allowed: bool,
    /// Peers with a capacity goal below their child count ([`RelayTree::limit_capacity`]).
    /// Entries of peers that left are dropped lazily.
    shedding: BTreeSet<PeerId>,
    /// After the depth limit was lowered, the depth peers already placed deeper may keep
    /// until [`RelayTree::lift_deep`] brings them up (0 once nobody is deeper).
    overhang: u32,
    /// Advances on every rebalancing search, which starts its look into each cell here:
    /// cells keep their order, and a search that always began at the same members would
    /// retry the same pairs (e.g. two peers whose NATs cannot meet) and never get past them.
    turn: usize,
}

impl RelayTree {
    /// An empty tree. `max_depth` (at least 1) bounds every attached peer's depth.
    pub fn new(max_depth: u32) -> Self {
        Self {
            graph: Graph::default(),
            nodes: PeerIndex::default(),
            root: None,
            max_depth: max_depth.max(1),
            free: Default::default(),
            leaves: Buckets::default(),
            ranks: Buckets::default(),
            waiting: BTreeMap::new(),
            waiting_by_nat: Default::default(),
            next_wait_seq: 0,
            depth_counts: Vec::new(),
            events: Vec::new(),
            orphans: VecDeque::new(),
            stack: Vec::new(),
            avoided: Default::default(),
            relay_allowed: true,
            shedding: BTreeSet::new(),
            overhang: 0,
            turn: 0,
        }
    }

    /// Whether links between peers that cannot connect directly are allowed as a last
    /// resort (a TURN relay is configured). Default: allowed. Without it such peers wait
    /// ([`WaitReason::NoRoute`]) rather than be given a parent they cannot reach.
    pub fn set_relay_allowed(&mut self, allowed: bool) {
        let was = std::mem::replace(&mut self.relay_allowed, allowed);
        if was && !allowed {
            // Links only a relay could carry must go: O(N), for a configuration change.
            let relayed: Vec<NodeIndex> = self
                .graph
                .edge_indices()
                .filter_map(|e| self.graph.edge_endpoints(e))
                .filter(|&(p, c)| !self.graph[c].nat.direct(self.graph[p].nat))
                .map(|(_, c)| c)
                .collect();
            for c in relayed {
                self.move_off_indirect(c);
            }
            self.place_orphans();
        }
        self.fill_waiting();
    }

    /// Pre-allocates room for `n` peers (simulations and benchmarks).
    pub fn with_capacity(max_depth: u32, n: usize) -> Self {
        let mut t = Self::new(max_depth);
        t.graph = Graph::with_capacity(n, n);
        t
    }

    /// Takes the events produced since the last call.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, TreeEvent> {
        self.events.drain(..)
    }

    /// Peers in the tree, attached or waiting.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tree holds no peer.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() == 0
    }

    /// The depth limit.
    pub fn max_depth_limit(&self) -> u32 {
        self.max_depth
    }

    /// The root peer, if any.
    pub fn root(&self) -> Option<PeerId> {
        self.root.map(|n| self.graph[n].peer)
    }

    /// Whether the peer is in the tree.
    pub fn contains(&self, peer: PeerId) -> bool {
        self.nodes.contains(peer)
    }

    /// The peer's parent (None for the root, waiting heads and unknown peers).
    pub fn parent(&self, peer: PeerId) -> Option<PeerId> {
        let n = self.node(peer)?;
        self.parent_of(n).map(|p| self.graph[p].peer)
    }

    /// The peer's children.
    pub fn children(&self, peer: PeerId) -> impl Iterator<Item = PeerId> + '_ {
        let n = self.node(peer);
        n.into_iter()
            .flat_map(move |n| self.graph.neighbors_directed(n, Outgoing))
            .map(move |c| self.graph[c].peer)
    }

    /// The peer's depth, or None if it waits (or is unknown).
    pub fn depth(&self, peer: PeerId) -> Option<u32> {
        let node = &self.graph[self.node(peer)?];
        (node.status == Status::Attached).then_some(node.depth)
    }

    /// The peer's capacity: how many children it may feed now. Above
    /// [`Self::capacity_goal`] while it sheds children after a lower limit.
    pub fn capacity(&self, peer: PeerId) -> Option<u32> {
        self.node(peer).map(|n| self.graph[n].capacity)
    }

    /// The capacity the peer is to end up with: its capacity, or the lower one it is
    /// shedding children towards ([`Self::limit_capacity`]).
    pub fn capacity_goal(&self, peer: PeerId) -> Option<u32> {
        self.node(peer)
            .map(|n| self.graph[n].shed_to.unwrap_or(self.graph[n].capacity))
    }

    /// Whether the peer feeds more children than its capacity goal and sheds them.
    pub fn is_shedding(&self, peer: PeerId) -> bool {
        self.node(peer)
            .is_some_and(|n| self.graph[n].shed_to.is_some())
    }

    /// Peers that still feed more children than their capacity goal.
    pub fn shedding_len(&self) -> usize {
        self.graph
            .node_weights()
            .filter(|n| n.shed_to.is_some())
            .count()
    }

    /// The depth attached peers may have: the limit, or deeper while peers placed before
    /// the limit was lowered wait to be lifted ([`Self::lift_deep`]).
    fn depth_bound(&self) -> u32 {
        self.max_depth.max(self.overhang)
    }

    /// The number of children the peer feeds.
    pub fn child_count(&self, peer: PeerId) -> Option<u32> {
        self.node(peer).map(|n| self.graph[n].children)
    }

    /// Whether `a` and `b` are parent and child (either way round).
    pub fn are_neighbours(&self, a: PeerId, b: PeerId) -> bool {
        match (self.node(a), self.node(b)) {
            (Some(a), Some(b)) => {
                self.graph.find_edge(a, b).is_some() || self.graph.find_edge(b, a).is_some()
            }
            _ => false,
        }
    }

    /// Peers that wait for a slot, counting whole waiting subtrees.
    pub fn waiting_len(&self) -> usize {
        self.nodes.len() - self.attached_len()
    }

    /// Attached peers (the root included).
    pub fn attached_len(&self) -> usize {
        self.depth_counts.iter().sum::<u64>() as usize
    }

    /// Deepest attached depth (0 with only a root or nobody).
    pub fn max_depth(&self) -> u32 {
        self.depth_counts.iter().rposition(|&c| c > 0).unwrap_or(0) as u32
    }

    /// Attached peers per depth (index = depth).
    pub fn depth_histogram(&self) -> &[u64] {
        let end = self.max_depth() as usize + 1;
        &self.depth_counts[..end.min(self.depth_counts.len())]
    }

    /// Free slots an attached peer could take right now, within the depth limit.
    pub fn free_slots(&self) -> u64 {
        self.free
            .iter()
            .flat_map(Buckets::members)
            .map(|(_, _, i)| u64::from(self.graph[NodeIndex::new(i as usize)].spare()))
            .sum()
    }

    /// The peer's NAT class as the tree knows it.
    pub fn nat(&self, peer: PeerId) -> Option<NatClass> {
        self.node(peer).map(|n| self.graph[n].nat)
    }

    /// Why a peer has no parent: `None` when it is attached (or unknown).
    pub fn wait_reason(&self, peer: PeerId) -> Option<WaitReason> {
        if self.depth(peer).is_some() || !self.contains(peer) {
            return None;
        }
        Some(if self.free.iter().all(Buckets::is_empty) {
            WaitReason::NoSlot
        } else {
            WaitReason::NoRoute
        })
    }

    /// Whether `child` under `parent` would be a direct link (their NAT classes can
    /// connect without TURN). False for unknown peers.
    pub fn is_direct(&self, child: PeerId, parent: PeerId) -> bool {
        match (self.nat(child), self.nat(parent)) {
            (Some(a), Some(b)) => a.direct(b),
            _ => false,
        }
    }

    /// A view of one peer.
    pub fn view(&self, peer: PeerId) -> Option<PeerView> {
        let n = self.node(peer)?;
        let node = &self.graph[n];
        let mut children: Vec<PeerId> = self.children(peer).collect();
        children.sort_unstable();
        Some(PeerView {
            peer,
            parent: self.parent(peer),
            depth: (node.status == Status::Attached).then_some(node.depth),
            capacity: node.shed_to.unwrap_or(node.capacity),
            children,
        })
    }

    /// Every attached peer as `(peer, depth, capacity, children)`, in storage order and
    /// without id lookups: for O(N) sweeps such as a simulator's population samples.
    pub fn attached(&self) -> impl Iterator<Item = (PeerId, u32, u32, u32)> + '_ {
        self.graph
            .node_weights()
            .filter(|n| n.status == Status::Attached)
            .map(|n| (n.peer, n.depth, n.capacity, n.children))
    }

    /// Every peer, in storage order.
    pub fn peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.graph.node_weights().map(|n| n.peer)
    }

    /// Makes `peer` the root (the broadcaster) and places waiting subtrees under it.
    pub fn set_root(&mut self, peer: PeerId, capacity: u32) -> Result<(), TreeError> {
        if self.root.is_some() {
            return Err(TreeError::RootExists);
        }
        let n = self.add_node(peer, capacity)?;
        self.root = Some(n);
        self.set_attached(n, 0);
        self.reindex(n);
        self.fill_waiting();
        Ok(())
    }

    /// Adds a viewer: promoted over a weaker leaf, placed at the best slot, or waiting.
    pub fn insert(&mut self, peer: PeerId, capacity: u32) -> Result<(), TreeError> {
        let n = self.add_node(peer, capacity)?;
        if self.root.is_none() {
            self.push_waiting(n);
            return Ok(());
        }
        let slot = self.best_slot(n);
        if let Some(leaf) = self.promotion_candidate(n, capacity, slot.map(|(d, _)| d)) {
            self.promote(n, leaf);
        } else if let Some((depth, parent)) = slot {
            self.link(parent, n);
            self.set_attached(n, depth + 1);
            self.reindex(n);
        } else {
            self.push_waiting(n);
        }
        // A promotion or a new relay adds slots that waiting subtrees may use.
        self.fill_waiting();
        Ok(())
    }

    /// Adds a viewer straight under `parent` (a room rebuilt from its peers' claims puts
    /// each back where it was) when `parent` is attached with a free slot within the depth
    /// limit; otherwise places it like [`Self::insert`]. Returns whether it went under
    /// `parent`. No waiting subtree is placed meanwhile: call [`Self::settle`] once every
    /// restored peer is in, so none takes a slot a restored peer still holds.
    pub fn insert_under(
        &mut self,
        peer: PeerId,
        capacity: u32,
        nat: NatClass,
        parent: PeerId,
    ) -> Result<bool, TreeError> {
        let slot = self.node(parent).filter(|&p| self.slot_free(p));
        let Some(p) = slot else {
            self.insert(peer, capacity)?;
            self.set_nat(peer, nat)?;
            return Ok(false);
        };
        let n = self.add_node(peer, capacity)?;
        self.graph[n].nat = nat;
        let depth = self.graph[p].depth + 1;
        self.link(p, n);
        self.set_attached(n, depth);
        self.reindex(n);
        Ok(true)
    }

    /// Whether [`Self::insert_under`] would put a peer under `parent`.
    pub fn has_slot(&self, parent: PeerId) -> bool {
        self.node(parent).is_some_and(|p| self.slot_free(p))
    }

    fn slot_free(&self, p: NodeIndex) -> bool {
        let node = &self.graph[p];
        node.status == Status::Attached
            && node.spare() > 0
            && node.depth < self.max_depth
            && node.shed_to.is_none()
    }

    /// Places waiting subtrees in free slots (after [`Self::insert_under`]).
    pub fn settle(&mut self) {
        self.fill_waiting();
    }

    /// Removes a peer (left or crashed) and repairs the tree around it.
    pub fn remove(&mut self, peer: PeerId) -> Result<(), TreeError> {
        self.remove_preferring(peer, None)
    }

    /// Removes a peer like [`Self::remove`], with `stand_in` taking its place if it may
    /// ([`Self::stand_in_for`]; e.g. it already holds links to the relay's parent and
    /// children).
    pub fn remove_preferring(
        &mut self,
        peer: PeerId,
        stand_in: Option<PeerId>,
    ) -> Result<(), TreeError> {
        let n = self.node(peer).ok_or(TreeError::UnknownPeer(peer))?;
        let preferred = stand_in.and_then(|s| self.node(s));
        if self.replace_with_stand_in(n, preferred) {
            self.nodes.remove(peer);
            self.graph.remove_node(n);
            self.fill_waiting();
            return Ok(());
        }
        self.nodes.remove(peer);
        let attached = self.graph[n].status == Status::Attached;
        if attached {
            self.unindex(n);
            self.count_depth(self.graph[n].depth, false);
            // Unlinking its edges below must not put it back into an index.
            self.graph[n].status = Status::Detached;
        }
        if let Some(seq) = self.graph[n].wait_seq.take() {
            self.waiting.remove(&seq);
            self.waiting_by_nat[nat_index(self.graph[n].nat)].remove(&seq);
        }
        if let Some(p) = self.parent_of(n) {
            self.unlink(p, n);
        }
        let mut children: Vec<NodeIndex> = self.graph.neighbors_directed(n, Outgoing).collect();
        // The strongest orphan takes the best slot (often the one its parent freed).
        children.sort_by_key(|&c| (Reverse(self.graph[c].capacity), c.index()));
        for c in children {
            self.unlink(n, c);
            if attached {
                self.detach_subtree(c);
            }
            self.orphans.push_back(c);
        }
        self.graph.remove_node(n);
        if self.root == Some(n) {
            self.root = None;
        }
        self.place_orphans();
        self.fill_waiting();
        Ok(())
    }

    /// The peer that would take the place of relay `peer` if it left now: the first two
    /// rules of the stand-in search (a peer that feeds all its children, so the orphans'
    /// subtrees stay whole), passing over peers for which `skip` is true. None for the
    /// root, a leaf, a waiting peer, or when nobody fits.
    pub fn stand_in_for(&self, peer: PeerId, skip: impl Fn(PeerId) -> bool) -> Option<PeerId> {
        let n = self.node(peer)?;
        let node = &self.graph[n];
        if node.status != Status::Attached || node.children == 0 || self.root == Some(n) {
            return None;
        }
        let skip = |x: NodeIndex| skip(self.graph[x].peer);
        self.stand_in(node.children, n, &skip)
            .filter(|&x| self.fits_stand_in(x, n))
            .map(|x| self.graph[x].peer)
    }

    /// Relay `peer` stopped delivering but is still in the room: `stand_in` takes its
    /// place and adopts its children as if it had left ([`Self::remove_preferring`]), and
    /// `peer`, now without children, is placed again like a newcomer (or waits). False,
    /// and nothing changes, if `stand_in` may not stand in for it.
    pub fn demote(&mut self, peer: PeerId, stand_in: PeerId) -> Result<bool, TreeError> {
        let n = self.node(peer).ok_or(TreeError::UnknownPeer(peer))?;
        let s = self
            .node(stand_in)
            .ok_or(TreeError::UnknownPeer(stand_in))?;
        if !self.fits_stand_in(s, n) || !self.replace_with_stand_in(n, Some(s)) {
            return Ok(false);
        }
        self.place_subtree(n);
        self.fill_waiting();
        Ok(true)
    }

    /// Whether `candidate` may still take the place of relay `peer` if it left now (see
    /// [`Self::stand_in_for`]).
    pub fn can_stand_in(&self, candidate: PeerId, peer: PeerId) -> bool {
        match (self.node(candidate), self.node(peer)) {
            (Some(x), Some(n)) => self.fits_stand_in(x, n),
            _ => false,
        }
    }

    /// Moves `peer` with its subtree to the best slot neither under its current parent nor
    /// inside its own subtree (the parent stopped delivering). Returns whether it moved.
    /// When no such slot is free it stays exactly where it is and no event is recorded: a
    /// move back to the same parent would cost the child its media connection for nothing.
    pub fn reparent(&mut self, peer: PeerId) -> Result<bool, TreeError> {
        let n = self.node(peer).ok_or(TreeError::UnknownPeer(peer))?;
        if self.root == Some(n) {
            return Err(TreeError::IsRoot);
        }
        let Some(p) = self.parent_of(n) else {
            return Ok(false); // waiting: nothing to move away from
        };
        if self.graph[n].status == Status::Detached {
            return Ok(false); // inside a waiting subtree: it moves with its head
        }
        // Look before cutting: with the parent and the subtree out of the indexes, the
        // placement query can only pick a slot elsewhere.
        let depth = self.graph[n].depth;
        self.unindex(p);
        self.detach_subtree(n);
        let Some((d, q)) = self.best_slot(n) else {
            // Same depths as before, so re-attaching records no event.
            self.attach_subtree(n, depth);
            self.reindex(p);
            return Ok(false);
        };
        self.unlink(p, n); // re-indexes the parent: its slot is free again
        self.link(q, n);
        self.attach_subtree(n, d + 1);
        self.place_orphans();
        self.fill_waiting();
        Ok(true)
    }

    /// Changes a peer's capacity. Children above the new capacity are moved elsewhere at
    /// once (lowest-capacity children first: they are most likely leaves, cheap to move).
    /// Ends any gradual shedding ([`Self::limit_capacity`]).
    pub fn set_capacity(&mut self, peer: PeerId, capacity: u32) -> Result<(), TreeError> {
        let n = self.node(peer).ok_or(TreeError::UnknownPeer(peer))?;
        let attached = self.graph[n].status == Status::Attached;
        if self.graph[n].shed_to.take().is_some() {
            self.shedding.remove(&peer);
            if attached {
                // Its spare slots (children that left meanwhile) are offered again.
                self.reindex(n);
            }
        }
        if self.graph[n].capacity == capacity {
            self.fill_waiting();
            return Ok(());
        }
        self.graph[n].capacity = capacity;
        let excess = self.graph[n].children.saturating_sub(capacity) as usize;
        if excess > 0 {
            let mut children: Vec<NodeIndex> = self.graph.neighbors_directed(n, Outgoing).collect();
            children.sort_by_key(|&c| (self.graph[c].capacity, c.index()));
            for &c in &children[..excess] {
                self.unlink(n, c);
                if attached {
                    self.detach_subtree(c);
                }
                self.orphans.push_back(c);
            }
        }
        if attached {
            self.reindex(n);
        }
        self.place_orphans();
        self.fill_waiting();
        Ok(())
    }

    /// Lowers a peer's capacity without moving anyone now: when it feeds more children
    /// than `capacity`, it keeps them, offers no slot, and [`Self::shed`] moves the
    /// surplus elsewhere one subtree at a time (an operator lowered the fan-out, and the
    /// room carries each move out make-before-break). Otherwise this is
    /// [`Self::set_capacity`]. A peer inside a waiting subtree feeds nobody yet: its
    /// surplus is cut at once.
    pub fn limit_capacity(&mut self, peer: PeerId, capacity: u32) -> Result<(), TreeError> {
        let n = self.node(peer).ok_or(TreeError::UnknownPeer(peer))?;
        let node = &self.graph[n];
        if capacity >= node.children || node.status != Status::Attached {
            return self.set_capacity(peer, capacity);
        }
        let node = &mut self.graph[n];
        node.capacity = node.children;
        node.shed_to = Some(capacity);
        self.shedding.insert(peer);
        self.reindex(n);
        Ok(())
    }

    /// Moves children away from peers above their capacity goal ([`Self::limit_capacity`]),
    /// at most `max_moves`, one child (with its subtree) per move: leaves first, then the
    /// children feeding fewest, each to the best free slot outside its own subtree where the whole subtree stays
    /// within the depth limit. Children for which `skip` is true stay this time (the room
    /// passes over peers still switching from an earlier move). A surplus with no slot to
    /// go to stays where it is, fed, until one frees: lowering a fan-out never makes
    /// anyone wait. Returns how many peers changed parent.
    pub fn shed(&mut self, max_moves: usize, skip: impl Fn(PeerId) -> bool) -> usize {
        let mut moves = 0;
        let peers: Vec<PeerId> = self.shedding.iter().copied().collect();
        for peer in peers {
            if moves >= max_moves {
                break;
            }
            let Some(n) = self.node(peer) else {
                self.shedding.remove(&peer);
                continue;
            };
            self.settle_shed(n);
            while moves < max_moves
                && self.graph[n].shed_to.is_some()
                && self.graph[n].status == Status::Attached
                && self.shed_one(n, &skip)
            {
                moves += 1;
            }
        }
        self.fill_waiting();
        moves
    }

    /// Brings a shedding peer's capacity down to its child count, or to its goal once it
    /// is there (children may have left on their own).
    fn settle_shed(&mut self, n: NodeIndex) {
        let node = &mut self.graph[n];
        let Some(goal) = node.shed_to else {
            return;
        };
        if node.children <= goal {
            node.capacity = goal;
            node.shed_to = None;
            let peer = node.peer;
            self.shedding.remove(&peer);
        } else {
            node.capacity = node.children;
        }
        if self.graph[n].status == Status::Attached {
            self.reindex(n);
        }
    }

    /// Moves one child of shedding, attached `n` elsewhere (see [`Self::shed`]). False
    /// if none may move now.
    fn shed_one(&mut self, n: NodeIndex, skip: &impl Fn(PeerId) -> bool) -> bool {
        // Leaves first, then the children feeding fewest: the smaller the subtree that
        // moves, the less it deepens the tree before rebalancing lifts it.
        let mut children: Vec<NodeIndex> = self.graph.neighbors_directed(n, Outgoing).collect();
        children.sort_by_key(|&c| (self.graph[c].children, self.graph[c].capacity, c.index()));
        let depth = self.graph[n].depth;
        for c in children {
            if skip(self.graph[c].peer) {
                continue;
            }
            let height = self.subtree_height(c);
            // Look before cutting: with the subtree out of the indexes the placement
            // query cannot pick a slot inside it (`n` offers none while it sheds).
            self.detach_subtree(c);
            match self.best_slot(c) {
                Some((d, q)) if d + 1 + height <= self.max_depth => {
                    self.unlink(n, c);
                    self.link(q, c);
                    self.attach_subtree(c, d + 1);
                    self.settle_shed(n);
                    self.place_orphans();
                    return true;
                }
                // Same depths as before, so re-attaching records no event.
                _ => self.attach_subtree(c, depth + 1),
            }
        }
        false
    }

    /// Levels below `top` in its subtree (0 for a leaf). O(subtree).
    fn subtree_height(&self, top: NodeIndex) -> u32 {
        let mut height = 0;
        let mut stack = vec![(top, 0u32)];
        while let Some((n, h)) = stack.pop() {
            height = height.max(h);
            stack.extend(
                self.graph
                    .neighbors_directed(n, Outgoing)
                    .map(|c| (c, h + 1)),
            );
        }
        height
    }

    /// Changes the depth limit. Raised, the slots it opens are offered (waiting peers
    /// take them) at once. Lowered, no slot at or below the new limit is offered from now
    /// on, and peers already deeper stay, fed, until [`Self::lift_deep`] moves them up.
    pub fn set_max_depth(&mut self, max_depth: u32) {
        let max_depth = max_depth.max(1);
        let old = self.max_depth;
        if max_depth == old {
            return;
        }
        self.max_depth = max_depth;
        let deepest = self.max_depth();
        self.overhang = if deepest > max_depth {
            deepest.max(self.overhang)
        } else {
            0
        };
        // Peers between the two limits change whether their slots are offered: O(N), for
        // a configuration change.
        let (lo, hi) = (old.min(max_depth), old.max(max_depth));
        let affected: Vec<NodeIndex> = self
            .graph
            .node_indices()
            .filter(|&n| {
                let node = &self.graph[n];
                node.status == Status::Attached && (lo..hi).contains(&node.depth)
            })
            .collect();
        for n in affected {
            self.reindex(n);
        }
        self.fill_waiting();
    }

    /// Moves peers deeper than the depth limit (it was lowered) up into free slots within
    /// it, at most `max_moves`: the deepest first, each a leaf (everyone at the deepest
    /// level is), so one peer changes parent per move. Peers for which `skip` is true stay
    /// this time. Peers with no slot to go to stay where they are. Returns the moves.
    pub fn lift_deep(&mut self, max_moves: usize, skip: impl Fn(PeerId) -> bool) -> usize {
        let mut moves = 0;
        while moves < max_moves {
            let deepest = self.max_depth();
            if deepest <= self.max_depth {
                self.overhang = 0;
                break;
            }
            let candidates: Vec<NodeIndex> = (0..CLASSES)
                .rev()
                .flat_map(|class| self.leaves.cell(deepest, class).iter().rev().copied())
                .map(|i| NodeIndex::new(i as usize))
                .collect();
            let mut moved = false;
            for leaf in candidates {
                if skip(self.graph[leaf].peer) {
                    continue;
                }
                // Only slots above the limit are offered, and none is the leaf's own.
                let Some((slot_depth, parent)) = self.best_slot(leaf) else {
                    continue;
                };
                let old = self.parent_of(leaf).expect("leaves are never the root");
                self.unindex(leaf);
                self.count_depth(deepest, false);
                self.graph[leaf].status = Status::Detached;
                self.unlink(old, leaf);
                self.link(parent, leaf);
                self.set_attached(leaf, slot_depth + 1);
                self.reindex(leaf);
                moves += 1;
                moved = true;
                break;
            }
            if !moved {
                break;
            }
        }
        self.fill_waiting();
        moves
    }

    /// Records the peer's NAT class. Links it can no longer make directly move to a
    /// direct slot when one exists; without TURN they must (or wait), with TURN they stay
    /// when nothing better is free, and the relay carries them.
    pub fn set_nat(&mut self, peer: PeerId, nat: NatClass) -> Result<(), TreeError> {
        let n = self.node(peer).ok_or(TreeError::UnknownPeer(peer))?;
        if self.graph[n].nat == nat {
            return Ok(());
        }
        let attached = self.graph[n].status == Status::Attached;
        if attached {
            self.unindex(n);
        }
        if let Some(seq) = self.graph[n].wait_seq {
            self.waiting_by_nat[nat_index(self.graph[n].nat)].remove(&seq);
            self.waiting_by_nat[nat_index(nat)].insert(seq);
        }
        self.graph[n].nat = nat;
        if attached {
            self.reindex(n);
        }
        if let Some(p) = self.parent_of(n)
            && !nat.direct(self.graph[p].nat)
        {
            self.move_off_indirect(n);
        }
        let mut children: Vec<NodeIndex> = self.graph.neighbors_directed(n, Outgoing).collect();
        children.sort_by_key(|&c| (Reverse(self.graph[c].capacity), c.index()));
        for c in children {
            if !nat.direct(self.graph[c].nat) && self.parent_of(c) == Some(n) {
                self.move_off_indirect(c);
            }
        }
        self.place_orphans();
        self.fill_waiting();
        Ok(())
    }

    /// ICE between `child` and its parent `parent` failed: the pair is never linked again
    /// (either way round), and `child` moves with its subtree to the best slot it may use,
    /// or waits.
    pub fn link_failed(&mut self, child: PeerId, parent: PeerId) -> Result<(), TreeError> {
        let c = self.node(child).ok_or(TreeError::UnknownPeer(child))?;
        self.node(parent).ok_or(TreeError::UnknownPeer(parent))?;
        for (a, b) in [(child, parent), (parent, child)] {
            let list = self.avoided.entry(a).or_default();
            if !list.contains(&b) {
                if list.len() == MAX_AVOIDED {
                    list.remove(0);
                }
                list.push(b);
            }
        }
        if let Some(p) = self.parent_of(c).filter(|&p| self.graph[p].peer == parent) {
            self.unlink(p, c);
            // Inside a waiting subtree it is already detached; it now waits on its own.
            if self.graph[c].status == Status::Attached {
                self.detach_subtree(c);
            }
            self.orphans.push_back(c);
            self.place_orphans();
            self.fill_waiting();
        }
        Ok(())
    }

    /// Holds back (or offers again) the peer's free slots without changing its capacity:
    /// a relay under suspicion keeps the children it has and gets no new ones. Releasing
    /// it places waiting peers at once.
    pub fn set_held(&mut self, peer: PeerId, held: bool) -> Result<(), TreeError> {
        let n = self.node(peer).ok_or(TreeError::UnknownPeer(peer))?;
        if self.graph[n].held == held {
            return Ok(());
        }
        self.graph[n].held = held;
        if self.graph[n].status == Status::Attached {
            self.reindex(n);
        }
        if !held {
            self.fill_waiting();
        }
        Ok(())
    }

    /// Whether ICE between the two failed before.
    pub fn is_avoided(&self, a: PeerId, b: PeerId) -> bool {
        !self.avoided.is_empty() && self.avoided.get(&a).is_some_and(|l| l.contains(&b))
    }

    /// Moves peers so that strong ones sit high and none sits deeper than it must, within
    /// a budget of `max_moves` peers that change parent. Returns how many did; 0 means
    /// nothing worth moving was found (or the cheapest move found does not fit the budget).
    ///
    /// Repairs keep the tree shallow as it changes, but joins, leaves and NAT limits still
    /// leave strong peers deep below weak ones, and free slots high above deep leaves.
    /// The room is meant to call this on a timer with a moves-per-second budget, and to
    /// carry out every parent change make-before-break (the new link carries media before
    /// the old one closes), so a move interrupts nobody. Moves, in order of preference:
    ///
    /// - **lift**: the deepest leaf moves to a free slot at least two levels above it
    ///   (one peer changes parent);
    /// - **swap**: a peer S at depth `ds` and a weaker peer W at depth `dw < ds` trade
    ///   places when `(capacity S - capacity W) * (ds - dw)` is at least
    ///   [`MIN_SWAP_GAIN`]. S takes W's parent and W's children and keeps as many of its
    ///   own children as it has room for (their subtrees rise with it); W takes S's old
    ///   parent (or S, if that was W) and S's remaining children, the weakest. Pairs of
    ///   classes are tried largest possible gain first, and within them the deepest strong
    ///   and shallowest weak peers first, moving inward while the gain holds: the extreme
    ///   pair is often one that cannot be linked (their NATs), and a search stuck on it
    ///   would leave the rest of the tree as it is.
    ///
    /// A move only creates direct links and never one between peers that failed with each
    /// other; no peer ends deeper than the deepest place it takes, so the tree's depth
    /// never grows (but for waiting subtrees placed in a slot a move freed). Each move strictly lowers the sum of capacity × depth (or, for lifts
    /// of zero-capacity leaves, the sum of depths), so repeated calls come to rest. Work
    /// per move is bounded by the capacity classes, the depth limit and a few hundred
    /// candidates, plus the subtrees that rise; it never scans the peers.
    pub fn rebalance(&mut self, max_moves: usize) -> usize {
        self.rebalance_where(max_moves, |_| false)
    }

    /// [`Self::rebalance`], leaving alone the peers `skip` names as the one lifted or the
    /// two that trade places (e.g. peers still waiting for their first media: moved
    /// before it arrives, a newcomer would start its connection over).
    pub fn rebalance_where(&mut self, max_moves: usize, skip: impl Fn(PeerId) -> bool) -> usize {
        if self.root.is_none() {
            return 0;
        }
        let mut moves = 0;
        while moves < max_moves {
            let budget = max_moves - moves;
            match self.lift(&skip).or_else(|| self.swap(budget, &skip)) {
                Some(m) => moves += m,
                None => break,
            }
        }
        // A move may free a slot (the old parent's) that a waiting subtree can use.
        self.fill_waiting();
        moves
    }

    // ---- internals ----

    /// `n`'s link to its parent needs a relay: attached, it is re-homed; inside a waiting
    /// subtree it is cut loose to wait on its own when relays are off (it then waits in
    /// the queue or is placed, orphans being placed by the caller).
    fn move_off_indirect(&mut self, n: NodeIndex) {
        if self.graph[n].status == Status::Attached {
            self.rehome(n);
        } else if !self.relay_allowed
            && let Some(p) = self.parent_of(n)
        {
            self.unlink(p, n);
            self.orphans.push_back(n);
        }
    }

    /// Moves attached `n` (with its subtree) to a slot it reaches directly, if one exists
    /// outside its subtree. Otherwise it stays where it is when relays are allowed, or is
    /// placed like any orphan (which may mean waiting).
    fn rehome(&mut self, n: NodeIndex) {
        let Some(p) = self.parent_of(n) else {
            return;
        };
        let depth = self.graph[p].depth;
        self.unlink(p, n);
        self.detach_subtree(n);
        if let Some((d, q)) = self.best_slot_where(n, true) {
            self.link(q, n);
            self.attach_subtree(n, d + 1);
        } else if self.relay_allowed && !self.avoids(n, p) {
            // Same edge back: the room sees an unchanged link and tells nobody.
            self.link(p, n);
            self.attach_subtree(n, depth + 1);
        } else {
            self.orphans.push_back(n);
        }
        self.place_orphans();
    }

    /// Lifts one deep leaf into a free slot at least two levels above it. Returns the
    /// number of peers moved (1), or None.
    fn lift(&mut self, skip: &impl Fn(PeerId) -> bool) -> Option<usize> {
        const BUDGET: usize = 64;
        let shallowest = self.free.iter().filter_map(Buckets::min_depth).min()?;
        self.turn = self.turn.wrapping_add(1);
        let mut examined = 0;
        let depths = (shallowest + 2..self.leaves.depth_bound()).rev();
        for d in depths.filter(|&d| self.leaves.has_depth(d)) {
            // Strong leaves first: lifted, their slots move up too.
            for class in (0..CLASSES).rev() {
                let cell = self.leaves.cell(d, class);
                for k in 0..cell.len().min(PER_CELL) {
                    examined += 1;
                    if examined > BUDGET {
                        return None;
                    }
                    let leaf = NodeIndex::new(cell[(self.turn + k) % cell.len()] as usize);
                    if skip(self.graph[leaf].peer) {
                        continue;
                    }
                    if let Some((slot_depth, parent)) = self.best_slot_where(leaf, true)
                        && slot_depth + 1 < d
                    {
                        let old = self.parent_of(leaf).expect("leaves are never the root");
                        self.unindex(leaf);
                        self.count_depth(d, false);
                        self.graph[leaf].status = Status::Detached;
                        self.unlink(old, leaf);
                        self.link(parent, leaf);
                        self.set_attached(leaf, slot_depth + 1);
                        self.reindex(leaf);
                        return Some(1);
                    }
                }
            }
        }
        None
    }

    /// Swaps one strong deep peer with a weaker shallow one (see [`Self::rebalance`]), if
    /// the move fits `budget`. Returns the number of peers that changed parent, or None.
    fn swap(&mut self, budget: usize, skip: &impl Fn(PeerId) -> bool) -> Option<usize> {
        // Pairs tried per move, and cells looked at (most are empty) per move.
        const BUDGET: usize = 256;
        const CELLS: usize = 4096;
        // Shallowest and deepest depth holding each capacity class.
        let mut shallowest = [u32::MAX; CLASSES];
        let mut deepest = [0u32; CLASSES];
        for d in (1..self.ranks.depth_bound()).filter(|&d| self.ranks.has_depth(d)) {
            for c in (0..CLASSES).filter(|&c| !self.ranks.cell(d, c).is_empty()) {
                shallowest[c] = shallowest[c].min(d);
                deepest[c] = d;
            }
        }
        let gain =
            |strong: usize, weak: usize, ds: u32, dw: u32| (strong - weak) as u32 * (ds - dw);
        let mut pairs: Vec<(u32, usize, usize)> = Vec::new();
        for strong in (1..CLASSES).filter(|&c| deepest[c] > 0) {
            for weak in (0..strong).filter(|&c| shallowest[c] < deepest[strong]) {
                let best = gain(strong, weak, deepest[strong], shallowest[weak]);
                if best >= MIN_SWAP_GAIN {
                    pairs.push((best, strong, weak));
                }
            }
        }
        pairs.sort_unstable_by_key(|&(gain, strong, weak)| Reverse((gain, strong, Reverse(weak))));
        self.turn = self.turn.wrapping_add(1);
        let turn = self.turn;
        let (mut examined, mut cells) = (0, 0);
        // For each pair of classes, the deepest strong peers first, each against the
        // shallowest weak ones it would gain enough from; a few members per cell, starting
        // at a different member each search.
        for (_, strong, weak) in pairs {
            for ds in (shallowest[strong].max(1)..=deepest[strong]).rev() {
                let dw_end = ds.min(deepest[weak] + 1);
                for dw in (shallowest[weak]..dw_end)
                    .take_while(|&dw| gain(strong, weak, ds, dw) >= MIN_SWAP_GAIN)
                {
                    cells += 1;
                    if cells > CELLS {
                        return None;
                    }
                    let (strong_cell, weak_cell) =
                        (self.ranks.cell(ds, strong), self.ranks.cell(dw, weak));
                    if strong_cell.is_empty() || weak_cell.is_empty() {
                        continue;
                    }
                    for i in 0..strong_cell.len().min(PER_CELL) {
                        let s = strong_cell[(turn + i) % strong_cell.len()];
                        for j in 0..weak_cell.len().min(PER_CELL) {
                            examined += 1;
                            if examined > BUDGET {
                                return None;
                            }
                            let w = weak_cell[(turn + j) % weak_cell.len()];
                            let (s, w) = (NodeIndex::new(s as usize), NodeIndex::new(w as usize));
                            if skip(self.graph[s].peer) || skip(self.graph[w].peer) {
                                continue;
                            }
                            if let Some(plan) = self.swap_plan(s, w, budget) {
                                return Some(self.apply_swap(plan));
                            }
                        }
                    }
                }
            }
        }
        None
    }

    /// How `strong` and `weak` would trade places, if they can: every new link direct
    /// and not ruled out, the strong one really stronger and deeper, and the peers that
    /// change parent no more than `budget`.
    fn swap_plan(&self, strong: NodeIndex, weak: NodeIndex, budget: usize) -> Option<SwapPlan> {
        let (s, w) = (&self.graph[strong], &self.graph[weak]);
        // A peer shedding children would take on more: its capacity is on its way down.
        if s.capacity <= w.capacity
            || s.depth <= w.depth
            || s.shed_to.is_some()
            || w.shed_to.is_some()
        {
            return None;
        }
        let (s_parent, w_parent) = (self.parent_of(strong)?, self.parent_of(weak)?);
        let weak_parent = if s_parent == weak { strong } else { s_parent };
        if !self.direct_ok(strong, w_parent) || !self.direct_ok(weak, weak_parent) {
            return None;
        }
        let adopted: Vec<NodeIndex> = self
            .graph
            .neighbors_directed(weak, Outgoing)
            .filter(|&c| c != strong)
            .collect();
        if adopted.iter().any(|&c| !self.direct_ok(c, strong)) {
            return None;
        }
        // Room the strong one keeps for its own children, beside the weak one's (which
        // include the weak one itself when it was the strong one's parent).
        let room = (s.capacity - w.children) as usize;
        let mut own = self.children_strongest_first(strong);
        let handed = own.len().saturating_sub(room);
        // The weak one takes the weakest, which it must reach directly.
        let mut given = Vec::with_capacity(handed);
        let mut i = own.len();
        while given.len() < handed && i > 0 {
            i -= 1;
            if self.direct_ok(own[i], weak) {
                given.push(own.remove(i));
            }
        }
        let moves = 2 + adopted.len() + given.len();
        (given.len() == handed && moves <= budget).then_some(SwapPlan {
            strong,
            weak,
            adopted,
            given,
            kept: own,
        })
    }

    /// Carries out a swap planned by [`Self::swap_plan`]; returns the peers that changed
    /// parent.
    fn apply_swap(&mut self, plan: SwapPlan) -> usize {
        let SwapPlan {
            strong,
            weak,
            adopted,
            given,
            kept,
        } = plan;
        let (ds, dw) = (self.graph[strong].depth, self.graph[weak].depth);
        let s_parent = self.parent_of(strong).expect("not the root");
        let w_parent = self.parent_of(weak).expect("not the root");
        // Both change depth and children: out of the indexes until they are settled.
        for (n, d) in [(strong, ds), (weak, dw)] {
            self.unindex(n);
            self.count_depth(d, false);
            self.graph[n].status = Status::Detached;
        }
        self.unlink(w_parent, weak);
        self.unlink(s_parent, strong);
        for &c in &adopted {
            self.unlink(weak, c);
        }
        for &c in &given {
            self.unlink(strong, c);
        }
        self.graph[strong].depth = dw;
        self.graph[weak].depth = ds;
        self.link(w_parent, strong);
        self.link(if s_parent == weak { strong } else { s_parent }, weak);
        for &c in &adopted {
            self.link(strong, c);
        }
        for &c in &given {
            self.link(weak, c);
        }
        self.set_attached(strong, dw);
        self.set_attached(weak, ds);
        self.reindex(strong);
        self.reindex(weak);
        for &c in &kept {
            self.shift_subtree(c, dw + 1);
        }
        2 + adopted.len() + given.len()
    }

    /// Whether linking `a` and `b` (either way round) is ruled out by an earlier failure.
    fn avoids(&self, a: NodeIndex, b: NodeIndex) -> bool {
        self.is_avoided(self.graph[a].peer, self.graph[b].peer)
    }

    /// Whether `child` may be linked under `parent` without a relay.
    fn direct_ok(&self, child: NodeIndex, parent: NodeIndex) -> bool {
        self.graph[child].nat.direct(self.graph[parent].nat) && !self.avoids(child, parent)
    }

    fn add_node(&mut self, peer: PeerId, capacity: u32) -> Result<NodeIndex, TreeError> {
        if self.nodes.contains(peer) {
            return Err(TreeError::DuplicatePeer(peer));
        }
        let n = self.graph.add_node(Node {
            peer,
            capacity,
            children: 0,
            depth: 0,
            status: Status::Detached,
            free_slot: None,
            leaf_slot: None,
            rank_slot: None,
            wait_seq: None,
            nat: NatClass::Unknown,
            held: false,
            shed_to: None,
        });
        self.nodes.insert(peer, n.index() as u32);
        Ok(n)
    }

    fn node(&self, peer: PeerId) -> Option<NodeIndex> {
        self.nodes.get(peer).map(|i| NodeIndex::new(i as usize))
    }

    fn parent_of(&self, n: NodeIndex) -> Option<NodeIndex> {
        self.graph.neighbors_directed(n, Incoming).next()
    }

    fn count_depth(&mut self, depth: u32, add: bool) {
        let d = depth as usize;
        if d >= self.depth_counts.len() {
            self.depth_counts.resize(d + 1, 0);
        }
        if add {
            self.depth_counts[d] += 1;
        } else {
            self.depth_counts[d] -= 1;
        }
    }

    fn set_attached(&mut self, n: NodeIndex, depth: u32) {
        let node = &mut self.graph[n];
        node.status = Status::Attached;
        node.depth = depth;
        self.count_depth(depth, true);
    }

    /// Adds an edge and keeps the parent's index entries current.
    fn link(&mut self, p: NodeIndex, c: NodeIndex) {
        self.graph.add_edge(p, c, ());
        self.graph[p].children += 1;
        if self.graph[p].status == Status::Attached {
            self.reindex(p);
        }
        let depth = self.graph[p].depth + 1;
        self.events.push(TreeEvent::Linked {
            parent: self.graph[p].peer,
            child: self.graph[c].peer,
            depth,
        });
    }

    /// Removes an edge and keeps the parent's index entries current.
    fn unlink(&mut self, p: NodeIndex, c: NodeIndex) {
        if let Some(e) = self.graph.find_edge(p, c) {
            self.graph.remove_edge(e);
        }
        self.graph[p].children -= 1;
        if self.graph[p].status == Status::Attached {
            self.reindex(p);
        }
        self.events.push(TreeEvent::Unlinked {
            parent: self.graph[p].peer,
            child: self.graph[c].peer,
        });
    }

    /// Puts an attached node into the indexes its current state qualifies it for,
    /// replacing whatever entries it had.
    fn reindex(&mut self, n: NodeIndex) {
        self.unindex_slots(n);
        let i = n.index() as u32;
        let node = &self.graph[n];
        let (depth, spare, capacity) = (node.depth, node.spare(), node.capacity);
        let group = group_of(node.nat);
        let free_slot =
            (spare > 0 && depth < self.max_depth && !node.held && node.shed_to.is_none())
                .then(|| self.free[group].insert(depth, class_of(spare), i));
        let leaf_slot = (node.children == 0 && depth > 0)
            .then(|| self.leaves.insert(depth, class_of(capacity), i));
        // The rank entry depends on depth and capacity only, which change far less often
        // than the child count: leave it alone when it is current.
        let rank = (depth > 0).then_some((depth, class_of(capacity)));
        let current = node.rank_slot.map(|s| (s.depth, s.class as usize));
        if rank != current {
            self.unindex_rank(n);
            let rank_slot = rank.map(|(d, c)| self.ranks.insert(d, c, i));
            self.graph[n].rank_slot = rank_slot;
        }
        let node = &mut self.graph[n];
        node.free_slot = free_slot;
        node.leaf_slot = leaf_slot;
    }

    /// Takes a node out of every index.
    fn unindex(&mut self, n: NodeIndex) {
        self.unindex_slots(n);
        self.unindex_rank(n);
    }

    /// Takes a node out of the free-slot and leaf indexes.
    fn unindex_slots(&mut self, n: NodeIndex) {
        let group = group_of(self.graph[n].nat);
        if let Some(slot) = self.graph[n].free_slot.take()
            && let Some(moved) = self.free[group].remove(slot)
        {
            self.graph[NodeIndex::new(moved as usize)].free_slot = Some(slot);
        }
        if let Some(slot) = self.graph[n].leaf_slot.take()
            && let Some(moved) = self.leaves.remove(slot)
        {
            self.graph[NodeIndex::new(moved as usize)].leaf_slot = Some(slot);
        }
    }

    fn unindex_rank(&mut self, n: NodeIndex) {
        if let Some(slot) = self.graph[n].rank_slot.take()
            && let Some(moved) = self.ranks.remove(slot)
        {
            self.graph[NodeIndex::new(moved as usize)].rank_slot = Some(slot);
        }
    }

    /// The best free slot for `child`: one it reaches directly if any, else (relays
    /// allowed) any; never one it failed with. Shallowest, then most spare slots, then
    /// longest waiting.
    fn best_slot(&self, child: NodeIndex) -> Option<(u32, NodeIndex)> {
        self.best_slot_where(child, true).or_else(|| {
            self.relay_allowed
                .then(|| self.best_slot_where(child, false))
                .flatten()
        })
    }

    /// The best free slot for `child` among parents it reaches directly (`direct`) or
    /// among all, skipping parents it failed with.
    fn best_slot_where(&self, child: NodeIndex, direct: bool) -> Option<(u32, NodeIndex)> {
        let nat = self.graph[child].nat;
        let peer = self.graph[child].peer;
        let avoided: &[PeerId] = match self.avoided.get(&peer) {
            Some(list) if !self.avoided.is_empty() => list,
            _ => &[],
        };
        // At equal depth a slot only few children can use goes first (a public child takes
        // a symmetric relay's slot before a cone one's), leaving the widely usable slots
        // for the children that need them; then the most spare slots.
        let mut best: Option<(SlotRank, NodeIndex)> = None;
        for (g, free) in self.free.iter().enumerate() {
            if direct && !nat.direct(GROUP_CLASS[g]) {
                continue;
            }
            let Some(min) = free.min_depth() else {
                continue;
            };
            'depths: for depth in (min..free.depth_bound()).filter(|&d| free.has_depth(d)) {
                if best.is_some_and(|((d, _, _), _)| d < depth) {
                    break;
                }
                for class in (0..CLASSES).rev() {
                    let found = free.cell(depth, class).iter().find(|&&i| {
                        avoided.is_empty()
                            || !avoided.contains(&self.graph[NodeIndex::new(i as usize)].peer)
                    });
                    if let Some(&i) = found {
                        let key = (depth, Reverse(g), Reverse(class));
                        if best.is_none_or(|(b, _)| key < b) {
                            best = Some((key, NodeIndex::new(i as usize)));
                        }
                        break 'depths;
                    }
                }
            }
        }
        best.map(|((d, _, _), n)| (d, n))
    }

    /// Marks the subtree under `top` detached and removes it from every index, so placement
    /// cannot pick a slot inside it. Depth fields are kept to detect changes on re-attach.
    fn detach_subtree(&mut self, top: NodeIndex) {
        self.stack.clear();
        self.stack.push((top, 0));
        while let Some((n, _)) = self.stack.pop() {
            if self.graph[n].status == Status::Detached {
                continue;
            }
            self.unindex(n);
            let depth = self.graph[n].depth;
            self.count_depth(depth, false);
            self.graph[n].status = Status::Detached;
            let mut kids = self.graph.neighbors_directed(n, Outgoing).detach();
            while let Some(c) = kids.next_node(&self.graph) {
                self.stack.push((c, 0));
            }
        }
    }

    /// Re-attaches the detached subtree under `top` (already linked) starting at `depth`.
    /// Children of nodes at the depth limit are cut off and queued as orphans.
    fn attach_subtree(&mut self, top: NodeIndex, depth: u32) {
        self.stack.clear();
        self.stack.push((top, depth));
        let bound = self.depth_bound();
        while let Some((n, d)) = self.stack.pop() {
            if d >= bound {
                // Cut while `n` is still detached, so unlinking does not index it early.
                let cut: Vec<NodeIndex> = self.graph.neighbors_directed(n, Outgoing).collect();
                for c in cut {
                    self.unlink(n, c);
                    self.orphans.push_back(c);
                }
            } else {
                let mut kids = self.graph.neighbors_directed(n, Outgoing).detach();
                while let Some(c) = kids.next_node(&self.graph) {
                    self.stack.push((c, d + 1));
                }
            }
            let old = self.graph[n].depth;
            self.set_attached(n, d);
            if n != top && old != d {
                self.events.push(TreeEvent::DepthChanged {
                    peer: self.graph[n].peer,
                    depth: d,
                });
            }
            self.reindex(n);
        }
    }

    /// Places every queued orphan subtree, or makes it wait.
    fn place_orphans(&mut self) {
        while let Some(o) = self.orphans.pop_front() {
            self.place_subtree(o);
        }
    }

    fn place_subtree(&mut self, top: NodeIndex) {
        match self.best_slot(top) {
            Some((d, parent)) => {
                self.link(parent, top);
                self.attach_subtree(top, d + 1);
            }
            None => self.push_waiting(top),
        }
    }

    fn push_waiting(&mut self, n: NodeIndex) {
        let seq = self.next_wait_seq;
        self.next_wait_seq += 1;
        self.graph[n].wait_seq = Some(seq);
        self.waiting.insert(seq, n);
        self.waiting_by_nat[nat_index(self.graph[n].nat)].insert(seq);
        self.events.push(TreeEvent::Waiting {
            peer: self.graph[n].peer,
        });
    }

    /// Places waiting subtrees, oldest first, while slots are free. Only heads whose NAT
    /// class may use some free slot are looked at; one whose failed links rule out every
    /// such slot keeps its place in the queue.
    fn fill_waiting(&mut self) {
        let mut skipped: Vec<u64> = Vec::new();
        while self.free.iter().any(|f| !f.is_empty()) {
            let mut next: Option<u64> = None;
            for (i, queue) in self.waiting_by_nat.iter().enumerate() {
                if queue.is_empty() || !self.has_slot_for(NatClass::ALL[i]) {
                    continue;
                }
                if let Some(&seq) = queue.iter().find(|seq| !skipped.contains(seq)) {
                    next = Some(next.map_or(seq, |n: u64| n.min(seq)));
                }
            }
            let Some(seq) = next else {
                return;
            };
            let n = self.waiting[&seq];
            let Some((d, parent)) = self.best_slot(n) else {
                skipped.push(seq);
                continue;
            };
            self.waiting.remove(&seq);
            self.waiting_by_nat[nat_index(self.graph[n].nat)].remove(&seq);
            self.graph[n].wait_seq = None;
            self.link(parent, n);
            self.attach_subtree(n, d + 1);
            self.place_orphans();
            // Its subtree brought slots an earlier, skipped subtree may be able to use.
            skipped.clear();
        }
    }

    /// Whether a peer of this class may use some free slot: one it reaches directly, or
    /// any when relays are allowed. Failed links are not considered.
    fn has_slot_for(&self, nat: NatClass) -> bool {
        self.free
            .iter()
            .enumerate()
            .any(|(g, free)| !free.is_empty() && (self.relay_allowed || nat.direct(GROUP_CLASS[g])))
    }

    /// The shallowest leaf worth displacing by a newcomer of `capacity` (at least 2 more
    /// than the leaf's, so the tree gains a slot), no deeper than the newcomer's best free
    /// slot (`slot_depth`; None when the tree is full). Ties go to the weaker leaf.
    fn promotion_candidate(
        &self,
        newcomer: NodeIndex,
        capacity: u32,
        slot_depth: Option<u32>,
    ) -> Option<NodeIndex> {
        let weakest_allowed = capacity.checked_sub(2)?;
        let deepest = slot_depth
            .unwrap_or(self.max_depth - 1)
            .min(self.max_depth - 1)
            .min(self.leaves.depth_bound().saturating_sub(1));
        for depth in (1..=deepest).filter(|&d| self.leaves.has_depth(d)) {
            for class in 0..=class_of(weakest_allowed) {
                // The top class mixes capacities: check the exact value there.
                let found = self.leaves.cell(depth, class).iter().take(8).find(|&&i| {
                    let leaf = NodeIndex::new(i as usize);
                    (class < CLASSES - 1 || self.graph[leaf].capacity <= weakest_allowed)
                        // The newcomer takes the leaf's parent and feeds the leaf: both
                        // links must work without a relay.
                        && self.direct_ok(leaf, newcomer)
                        && self
                            .parent_of(leaf)
                            .is_some_and(|p| self.direct_ok(newcomer, p))
                });
                if let Some(&i) = found {
                    return Some(NodeIndex::new(i as usize));
                }
            }
        }
        None
    }

    /// A peer to stand in for departing relay `n`, which feeds `need` children. In order
    /// of preference:
    /// 1. the deepest leaf outside `n`'s subtree that can feed all of them (ties: more
    ///    capacity): only it moves, and the orphaned subtrees stay exactly as they were;
    /// 2. the deepest peer below `n`'s depth that can feed all of them (ties: more
    ///    capacity), anywhere, the orphans' subtrees included. It brings its own children
    ///    along as far as it has room and the rest are placed like orphans: they sit near
    ///    the bottom of the tree, where a new slot costs little depth, while `n`'s
    ///    orphans, the roots of the big subtrees, keep their depth. Not a child of one of
    ///    the orphans: that orphan would become its child, the two swapping roles, and a
    ///    swapped pair cannot hand over make-before-break (one connection per pair);
    ///    without such a stand-in the orphans move up as subtrees, the strongest first;
    /// 3. the strongest leaf outside `n`'s subtree (deepest among equals), which adopts
    ///    as many orphans as it can.
    ///
    /// Each step examines a bounded number of candidates.
    /// Candidates for which `skip` is true are passed over (peers already promised as
    /// another relay's stand-in).
    fn stand_in(
        &self,
        need: u32,
        n: NodeIndex,
        skip: &dyn Fn(NodeIndex) -> bool,
    ) -> Option<NodeIndex> {
        const BUDGET: usize = 64;
        let depth = self.graph[n].depth;
        let parent = self.parent_of(n)?;
        // It takes the departing relay's parent: that link must work directly.
        let usable = |i: u32, min_capacity: u32| {
            let x = NodeIndex::new(i as usize);
            (self.graph[x].capacity >= min_capacity && self.direct_ok(x, parent) && !skip(x))
                .then_some(x)
        };
        let need_class = class_of(need);
        let leaf_depths = || {
            (1..self.leaves.depth_bound())
                .rev()
                .filter(|&d| self.leaves.has_depth(d))
        };
        let mut examined = 0;
        for d in leaf_depths() {
            for class in (need_class..CLASSES).rev() {
                for &i in self.leaves.cell(d, class).iter().rev() {
                    examined += 1;
                    if examined > BUDGET {
                        break;
                    }
                    if let Some(x) = usable(i, need).filter(|&x| !self.is_within(x, n)) {
                        return Some(x);
                    }
                }
            }
        }
        let mut examined = 0;
        let deeper = (depth + 1..self.ranks.depth_bound()).rev();
        for d in deeper.filter(|&d| self.ranks.has_depth(d)) {
            for class in (need_class..CLASSES).rev() {
                for &i in self.ranks.cell(d, class).iter().rev() {
                    examined += 1;
                    if examined > BUDGET {
                        break;
                    }
                    let swaps =
                        |x: NodeIndex| self.parent_of(x).and_then(|p| self.parent_of(p)) == Some(n);
                    if let Some(x) = usable(i, need).filter(|&x| !swaps(x)) {
                        return Some(x);
                    }
                }
            }
        }
        let mut examined = 0;
        for class in (1..need_class).rev() {
            for d in leaf_depths() {
                for &i in self.leaves.cell(d, class).iter().rev() {
                    examined += 1;
                    if examined > BUDGET {
                        return None;
                    }
                    if let Some(x) = usable(i, 1).filter(|&x| !self.is_within(x, n)) {
                        return Some(x);
                    }
                }
            }
        }
        None
    }

    /// Whether `x` may stand in for attached relay `n` by rule 1 or 2 of
    /// [`Self::stand_in`]: it feeds all of `n`'s children, reaches `n`'s parent directly,
    /// and is a leaf outside `n`'s subtree or a deeper peer that is not `n`'s grandchild.
    fn fits_stand_in(&self, x: NodeIndex, n: NodeIndex) -> bool {
        let (node, cand) = (&self.graph[n], &self.graph[x]);
        let Some(parent) = self.parent_of(n) else {
            return false;
        };
        if x == n
            || x == parent
            || cand.status != Status::Attached
            || node.status != Status::Attached
            || cand.capacity < node.children
            || !self.direct_ok(x, parent)
        {
            return false;
        }
        if cand.children == 0 && !self.is_within(x, n) {
            return true;
        }
        cand.depth > node.depth && self.parent_of(x).and_then(|p| self.parent_of(p)) != Some(n)
    }

    /// Whether attached node `x` is `top` or lies below it. O(depth difference).
    fn is_within(&self, mut x: NodeIndex, top: NodeIndex) -> bool {
        let top_depth = self.graph[top].depth;
        while self.graph[x].depth > top_depth {
            match self.parent_of(x) {
                Some(p) => x = p,
                None => return false,
            }
        }
        x == top
    }

    /// `n`'s children, the strongest first (ties: storage order, for determinism).
    fn children_strongest_first(&self, n: NodeIndex) -> Vec<NodeIndex> {
        let mut children: Vec<NodeIndex> = self.graph.neighbors_directed(n, Outgoing).collect();
        children.sort_by_key(|&c| (Reverse(self.graph[c].capacity), c.index()));
        children
    }

    /// Moves the attached subtree under `top` (its link unchanged) to start at `depth`,
    /// telling every peer in it its new depth.
    fn shift_subtree(&mut self, top: NodeIndex, depth: u32) {
        let old = self.graph[top].depth;
        self.detach_subtree(top);
        self.attach_subtree(top, depth);
        if old != depth {
            self.events.push(TreeEvent::DepthChanged {
                peer: self.graph[top].peer,
                depth,
            });
        }
    }

    /// Fills the place of attached relay `n` with a stand-in ([`Self::stand_in`]). It
    /// adopts `n`'s children, the strongest first, as many as it can feed directly, then
    /// keeps its own children (the strongest first) while it has room; those rise with
    /// it. Every other child is placed like an orphan. Unlinks `n` (the caller deletes the
    /// node). `preferred` stands in if it may (the room prepared links for it). False if
    /// nobody can stand in.
    fn replace_with_stand_in(&mut self, n: NodeIndex, preferred: Option<NodeIndex>) -> bool {
        let node = &self.graph[n];
        if node.status != Status::Attached || node.children == 0 || self.root == Some(n) {
            return false;
        }
        let preferred = preferred.filter(|&s| self.fits_stand_in(s, n));
        let Some(stand_in) = preferred.or_else(|| self.stand_in(node.children, n, &|_| false))
        else {
            return false;
        };
        let (depth, parent) = (node.depth, self.parent_of(n).expect("non-root attached"));
        // Lift the stand-in out of its place (possibly inside `n`'s subtree).
        let old_parent = self
            .parent_of(stand_in)
            .expect("stand-ins are never the root");
        self.unindex(stand_in);
        self.count_depth(self.graph[stand_in].depth, false);
        self.graph[stand_in].status = Status::Detached;
        self.unlink(old_parent, stand_in);
        // Take `n` out of the tree.
        self.unindex(n);
        self.count_depth(depth, false);
        self.graph[n].status = Status::Detached;
        self.unlink(parent, n);
        let orphans = self.children_strongest_first(n);
        for &c in &orphans {
            self.unlink(n, c);
        }
        let own = self.children_strongest_first(stand_in);
        // The stand-in takes `n`'s parent and depth, and as many children as it can feed
        // directly (the strongest first); the others are placed like any orphan.
        self.link(parent, stand_in);
        self.set_attached(stand_in, depth);
        let mut room_left = self.graph[stand_in].capacity;
        for &c in &orphans {
            if room_left > 0 && self.direct_ok(c, stand_in) {
                room_left -= 1;
                self.link(stand_in, c);
            } else {
                self.detach_subtree(c);
                self.orphans.push_back(c);
            }
        }
        for &c in &own {
            if room_left > 0 {
                room_left -= 1;
                self.shift_subtree(c, depth + 1);
            } else {
                self.unlink(stand_in, c);
                self.detach_subtree(c);
                self.orphans.push_back(c);
            }
        }
        self.reindex(stand_in);
        self.place_orphans();
        true
    }

    /// `newcomer` takes `leaf`'s place; `leaf` becomes its first child.
    fn promote(&mut self, newcomer: NodeIndex, leaf: NodeIndex) {
        let parent = self
            .parent_of(leaf)
            .expect("displaceable leaves are never the root");
        let depth = self.graph[leaf].depth;
        self.unindex(leaf);
        self.count_depth(depth, false);
        self.unlink(parent, leaf);
        self.link(parent, newcomer);
        self.set_attached(newcomer, depth);
        self.link(newcomer, leaf);
        self.set_attached(leaf, depth + 1);
        self.reindex(leaf);
    }

    /// Checks every structural invariant; O(N). Used by tests after every operation.
    pub fn invariants(&self) -> Result<(), InvariantViolation> {
        let fail = |s: String| Err(InvariantViolation(s));
        let mut depth_counts = vec![0u64; self.depth_counts.len().max(1)];
        let mut free = BTreeSet::new();
        let mut leaves = BTreeSet::new();
        let mut ranks = BTreeSet::new();
        let slot_ok = |b: &Buckets, slot: Option<Slot>, i: u32| slot.is_none_or(|s| b.verify(s, i));
        if self.nodes.len() != self.graph.node_count() {
            return fail(format!(
                "{} ids for {} nodes",
                self.nodes.len(),
                self.graph.node_count()
            ));
        }
        for n in self.graph.node_indices() {
            let node = &self.graph[n];
            let peer = node.peer;
            if self.node(peer) != Some(n) {
                return fail(format!("id map does not point {peer} at its node"));
            }
            let parents: Vec<_> = self.graph.neighbors_directed(n, Incoming).collect();
            if parents.len() > 1 {
                return fail(format!("{peer} has {} parents", parents.len()));
            }
            let parent = parents.first().copied();
            let out = self.graph.neighbors_directed(n, Outgoing).count() as u32;
            if out != node.children {
                return fail(format!(
                    "{peer} has {out} children, cached {}",
                    node.children
                ));
            }
            if node.children > node.capacity {
                return fail(format!(
                    "{peer} feeds {} children over capacity {}",
                    node.children, node.capacity
                ));
            }
            if let Some(goal) = node.shed_to
                && (goal >= node.capacity || !self.shedding.contains(&peer))
            {
                return fail(format!(
                    "{peer} sheds to {goal} from capacity {} untracked",
                    node.capacity
                ));
            }
            match node.status {
                Status::Attached => {
                    if node.wait_seq.is_some() {
                        return fail(format!("attached {peer} is queued as waiting"));
                    }
                    if node.depth > self.depth_bound() {
                        return fail(format!("{peer} at depth {} over the limit", node.depth));
                    }
                    match parent {
                        None if self.root != Some(n) => {
                            return fail(format!("attached {peer} has no parent"));
                        }
                        None if node.depth != 0 => return fail("root not at depth 0".into()),
                        Some(p) => {
                            let pn = &self.graph[p];
                            if pn.status != Status::Attached || pn.depth + 1 != node.depth {
                                return fail(format!(
                                    "{peer} at depth {} under {} ({:?}, depth {})",
                                    node.depth, pn.peer, pn.status, pn.depth
                                ));
                            }
                        }
                        None => {}
                    }
                    depth_counts[node.depth as usize] += 1;
                    let i = n.index() as u32;
                    if node.spare() > 0
                        && node.depth < self.max_depth
                        && !node.held
                        && node.shed_to.is_none()
                    {
                        free.insert((group_of(node.nat), node.depth, class_of(node.spare()), i));
                    }
                    if let Some(p) = parent {
                        if self.avoids(n, p) {
                            return fail(format!("{peer} is linked to a parent it failed with"));
                        }
                        if !self.relay_allowed && !node.nat.direct(self.graph[p].nat) {
                            return fail(format!(
                                "{peer} ({:?}) under {} ({:?}) needs a relay, and relays are off",
                                node.nat, self.graph[p].peer, self.graph[p].nat
                            ));
                        }
                    }
                    if node.children == 0 && node.depth > 0 {
                        leaves.insert((node.depth, class_of(node.capacity), i));
                    }
                    if node.depth > 0 {
                        ranks.insert((node.depth, class_of(node.capacity), i));
                    }
                    if !slot_ok(&self.free[group_of(node.nat)], node.free_slot, i)
                        || !slot_ok(&self.leaves, node.leaf_slot, i)
                        || !slot_ok(&self.ranks, node.rank_slot, i)
                    {
                        return fail(format!("{peer}'s recorded index position is stale"));
                    }
                }
                Status::Detached => {
                    if self.root == Some(n) {
                        return fail("root is detached".into());
                    }
                    if node.free_slot.is_some()
                        || node.leaf_slot.is_some()
                        || node.rank_slot.is_some()
                    {
                        return fail(format!("detached {peer} is indexed"));
                    }
                    match parent {
                        None if node.wait_seq.is_none() => {
                            return fail(format!("{peer} is neither attached nor waiting"));
                        }
                        Some(p) if self.graph[p].status != Status::Detached => {
                            return fail(format!("detached {peer} under an attached parent"));
                        }
                        Some(p) if self.avoids(n, p) => {
                            return fail(format!(
                                "waiting {peer} is linked to a parent it failed with"
                            ));
                        }
                        Some(p) if !self.relay_allowed && !node.nat.direct(self.graph[p].nat) => {
                            return fail(format!("waiting {peer} needs a relay to its parent"));
                        }
                        Some(_) if node.wait_seq.is_some() => {
                            return fail(format!("{peer} waits but has a parent"));
                        }
                        _ => {}
                    }
                    // Acyclic: the walk up must reach a waiting head within N steps.
                    let mut cur = n;
                    let mut steps = 0;
                    while let Some(p) = self.parent_of(cur) {
                        cur = p;
                        steps += 1;
                        if steps > self.nodes.len() {
                            return fail(format!("cycle above {peer}"));
                        }
                    }
                    if self.graph[cur].wait_seq.is_none() {
                        return fail(format!("{peer}'s subtree head is not waiting"));
                    }
                }
            }
        }
        for (&seq, &n) in &self.waiting {
            if self.graph.node_weight(n).and_then(|w| w.wait_seq) != Some(seq) {
                return fail("waiting queue out of sync".into());
            }
            if !self.waiting_by_nat[nat_index(self.graph[n].nat)].contains(&seq) {
                return fail("waiting queue by NAT class out of sync".into());
            }
        }
        if self.waiting_by_nat.iter().map(BTreeSet::len).sum::<usize>() != self.waiting.len() {
            return fail("waiting queue by NAT class has stale entries".into());
        }
        let indexed: BTreeSet<_> = self
            .free
            .iter()
            .enumerate()
            .flat_map(|(g, b)| b.members().map(move |(d, c, i)| (g, d, c, i)))
            .collect();
        let indexed_len: usize = self.free.iter().map(Buckets::len).sum();
        if free.len() != indexed_len || free != indexed {
            return fail("free-slot index out of sync".into());
        }
        if leaves.len() != self.leaves.len() || leaves != self.leaves.members().collect() {
            return fail("leaf index out of sync".into());
        }
        if ranks.len() != self.ranks.len() || ranks != self.ranks.members().collect() {
            return fail("rank index out of sync".into());
        }
        let trimmed = |v: &[u64]| v.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1);
        if depth_counts[..trimmed(&depth_counts)]
            != self.depth_counts[..trimmed(&self.depth_counts)]
        {
            return fail("depth counts out of sync".into());
        }
        if self.root.is_some() {
            for &n in self.waiting.values() {
                if let Some((_, p)) = self.best_slot(n) {
                    return fail(format!(
                        "{} waits although {} has a slot it may use",
                        self.graph[n].peer, self.graph[p].peer
                    ));
                }
            }
        }
        if self.root.is_none() && self.attached_len() > 0 {
            return fail("attached peers without a root".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(i: u64) -> PeerId {
        PeerId(i)
    }

    fn filled(n: u64, root_cap: u32, cap: u32, max_depth: u32) -> RelayTree {
        let mut t = RelayTree::new(max_depth);
        t.set_root(p(0), root_cap).unwrap();
        for i in 1..=n {
            t.insert(p(i), cap).unwrap();
            t.invariants().unwrap();
        }
        t
    }

    #[test]
    fn fills_level_by_level() {
        let t = filled(14, 2, 2, 10);
        assert_eq!(t.depth_histogram(), &[1, 2, 4, 8]);
        assert_eq!(t.max_depth(), 3);
        assert_eq!(t.waiting_len(), 0);
    }

    #[test]
    fn ties_go_to_more_spare_capacity() {
        let mut t = RelayTree::new(5);
        t.set_root(p(0), 3).unwrap();
        t.insert(p(1), 1).unwrap();
        t.insert(p(2), 4).unwrap();
        t.insert(p(3), 0).unwrap();
        // Root is full; depth-1 peers: p1 (spare 1) and p2 (spare 4) -> p2 wins.
        t.insert(p(4), 0).unwrap();
        assert_eq!(t.parent(p(4)), Some(p(2)));
        t.invariants().unwrap();
    }

    #[test]
    fn relay_leave_moves_children_with_their_subtrees() {
        let mut t = filled(14, 2, 2, 10);
        let relay = t.children(p(0)).next().unwrap();
        let kids: Vec<_> = t.children(relay).collect();
        let grandkids: Vec<(PeerId, Vec<PeerId>)> =
            kids.iter().map(|&k| (k, t.children(k).collect())).collect();
        t.drain_events().for_each(drop);
        t.remove(relay).unwrap();
        t.invariants().unwrap();
        for (k, gk) in grandkids {
            assert!(t.depth(k).is_some(), "orphan {k} re-attached");
            let mut now: Vec<_> = t.children(k).collect();
            let mut before = gk.clone();
            now.sort();
            before.sort();
            assert_eq!(now, before, "orphan {k} kept its children");
        }
        // A depth-3 leaf stood in for the relay: the orphans keep their depth and the
        // tree does not grow.
        let stand_in = t.parent(kids[0]).unwrap();
        assert_eq!(t.parent(kids[1]), Some(stand_in));
        assert_eq!(t.depth(stand_in), Some(1));
        assert!(kids.iter().all(|&k| t.depth(k) == Some(2)));
        assert_eq!(t.max_depth(), 3);
        let unlinked = t
            .drain_events()
            .filter(|e| matches!(e, TreeEvent::Unlinked { parent, .. } if *parent == relay))
            .count();
        assert_eq!(unlinked, 2);
    }

    #[test]
    fn without_a_stand_in_orphans_move_with_their_subtrees() {
        // The only leaf outside p1's subtree (p2) has capacity 0: it cannot stand in.
        let mut t = RelayTree::new(10);
        t.set_root(p(0), 2).unwrap();
        t.insert(p(1), 2).unwrap();
        t.insert(p(2), 0).unwrap();
        t.insert(p(3), 1).unwrap(); // under p1
        t.insert(p(4), 0).unwrap(); // under p1
        t.insert(p(5), 0).unwrap(); // under p3
        assert_eq!(t.parent(p(5)), Some(p(3)));
        t.remove(p(1)).unwrap();
        t.invariants().unwrap();
        assert_eq!(
            t.depth(p(3)),
            Some(1),
            "the strongest orphan took the freed root slot"
        );
        assert_eq!(t.parent(p(5)), Some(p(3)), "and kept its child");
        assert_eq!(t.depth(p(4)), None, "no slot left: the other orphan waits");
    }

    /// root -> 1 -> {2, 3} -> {4, 5 (capacity 4), 6, 7 (leaves)}: if 1 leaves, 2 and 3
    /// are its orphans and 4 and 5 their strong children.
    fn strong_below_orphans() -> RelayTree {
        let mut t = RelayTree::new(10);
        t.set_root(p(0), 1).unwrap();
        for (i, cap) in [(1, 2), (2, 2), (3, 2), (4, 2), (5, 2), (6, 0), (7, 0)] {
            t.insert(p(i), cap).unwrap();
        }
        t.set_capacity(p(4), 4).unwrap();
        t.set_capacity(p(5), 4).unwrap();
        t
    }

    #[test]
    fn without_a_strong_leaf_a_deep_strong_peer_stands_in() {
        // root -> 1 -> {2, 3} -> {4, 5 (relays), 6, 7 (leaves)} -> 8..11; no leaf outside
        // 1's subtree can feed two.
        let mut t = strong_below_orphans();
        for i in 8..=11 {
            t.insert(p(i), 0).unwrap();
        }
        // A strong peer at depth 4, below an orphan's child.
        t.set_capacity(p(8), 4).unwrap();
        assert_eq!(t.depth(p(8)), Some(4));
        assert_eq!(t.max_depth(), 4);
        t.invariants().unwrap();
        t.remove(p(1)).unwrap();
        t.invariants().unwrap();
        // It took 1's place: the orphans keep their depth and nothing sinks.
        assert_eq!(t.depth(p(8)), Some(1));
        assert_eq!((t.parent(p(2)), t.parent(p(3))), (Some(p(8)), Some(p(8))));
        assert_eq!((t.depth(p(2)), t.depth(p(3))), (Some(2), Some(2)));
        assert_eq!(t.max_depth(), 4);
        assert_eq!(t.waiting_len(), 0);
    }

    #[test]
    fn an_orphans_own_child_does_not_stand_in_for_its_grandparent() {
        // root -> 1 -> {2, 3} -> {4, 5 (strong), 6, 7}: 4 and 5 are orphans' children.
        // Standing in, one would take its own parent as a child (the two swapping roles,
        // which cannot hand over make-before-break): the orphans move up instead.
        let mut t = strong_below_orphans();
        let before: Vec<_> = [4, 5].iter().map(|&i| t.parent(p(i))).collect();
        t.remove(p(1)).unwrap();
        t.invariants().unwrap();
        assert_eq!(
            [4, 5].iter().map(|&i| t.parent(p(i))).collect::<Vec<_>>(),
            before,
            "the strong grandchildren keep their parents"
        );
        assert_eq!(t.waiting_len(), 0);
    }

    #[test]
    fn a_stand_in_too_full_for_its_own_children_hands_them_on() {
        // root -> {1 -> {3, 4 -> {6, 7}}, 2}. Only 4 (capacity 2) can feed both of 1's
        // children; beside its sibling it has room for one of its own.
        let mut t = RelayTree::new(10);
        t.set_root(p(0), 2).unwrap();
        for (i, cap) in [(1, 2), (2, 0), (3, 0), (4, 1)] {
            t.insert(p(i), cap).unwrap();
        }
        assert_eq!(t.parent(p(4)), Some(p(1)));
        t.set_capacity(p(4), 2).unwrap();
        t.insert(p(6), 0).unwrap();
        t.insert(p(7), 0).unwrap();
        assert_eq!(t.parent(p(6)), Some(p(4)));
        t.set_capacity(p(2), 1).unwrap(); // a free slot at depth 1
        t.invariants().unwrap();
        t.remove(p(1)).unwrap();
        t.invariants().unwrap();
        // Before, leaf 2 stood in, adopted 4 only, and 3 found no slot and waited.
        assert_eq!((t.parent(p(4)), t.depth(p(4))), (Some(p(0)), Some(1)));
        assert_eq!(t.parent(p(3)), Some(p(4)));
        let kept = [p(6), p(7)].map(|c| t.parent(c) == Some(p(4)));
        assert_eq!(kept.iter().filter(|&&k| k).count(), 1, "one child kept");
        assert!([p(6), p(7)].iter().any(|&c| t.parent(c) == Some(p(2))));
        assert_eq!(t.waiting_len(), 0);
        assert_eq!(t.max_depth(), 2);
    }

    #[test]
    fn rebalance_swaps_a_strong_deep_relay_with_a_weak_shallow_leaf() {
        // root -> {1 (feeds nobody), 2 -> 3 -> 4 -> 5 (feeds 4) -> {6, 7}}.
        let mut t = RelayTree::new(10);
        t.set_root(p(0), 2).unwrap();
        for (i, cap) in [(1, 0), (2, 1), (3, 1), (4, 1), (5, 1)] {
            t.insert(p(i), cap).unwrap();
        }
        t.set_capacity(p(5), 4).unwrap();
        t.insert(p(6), 0).unwrap();
        t.insert(p(7), 0).unwrap();
        assert_eq!((t.depth(p(5)), t.max_depth()), (Some(4), 5));
        t.invariants().unwrap();
        t.drain_events().for_each(drop);
        assert_eq!(t.rebalance(0), 0, "no budget, no move");
        assert_eq!(t.rebalance(2), 2, "one swap: 5 and 1 trade places");
        t.invariants().unwrap();
        assert_eq!((t.parent(p(5)), t.depth(p(5))), (Some(p(0)), Some(1)));
        assert_eq!((t.parent(p(1)), t.depth(p(1))), (Some(p(4)), Some(4)));
        assert_eq!(t.parent(p(6)), Some(p(5)), "its children came along");
        assert_eq!(t.max_depth(), 4);
        let events: Vec<TreeEvent> = t.drain_events().collect();
        for e in [
            TreeEvent::Unlinked {
                parent: p(4),
                child: p(5),
            },
            TreeEvent::Linked {
                parent: p(0),
                child: p(5),
                depth: 1,
            },
            TreeEvent::Linked {
                parent: p(4),
                child: p(1),
                depth: 4,
            },
            TreeEvent::DepthChanged {
                peer: p(6),
                depth: 2,
            },
            TreeEvent::DepthChanged {
                peer: p(7),
                depth: 2,
            },
        ] {
            assert!(events.contains(&e), "{e:?} missing from {events:?}");
        }
        // Further calls lift the deep leaves into 5's spare slots, then rest.
        let mut moved = 0;
        loop {
            let m = t.rebalance(3);
            t.invariants().unwrap();
            if m == 0 {
                break;
            }
            moved += m;
        }
        assert!(moved > 0);
        // Capacities 4, 1, 1, 1, 0, 0, 0 under a root feeding 2: d_min is 2.
        assert_eq!(t.max_depth(), 2);
        assert_eq!(t.rebalance(10), 0);
    }

    #[test]
    fn rebalance_lifts_a_relay_above_its_weaker_parent() {
        // root -> 1 -> 2 (feeds 3) -> {3, 4}: 2 trades places with its own parent.
        let mut t = RelayTree::new(10);
        t.set_root(p(0), 1).unwrap();
        t.insert(p(1), 1).unwrap();
        t.insert(p(2), 1).unwrap();
        t.set_capacity(p(2), 3).unwrap();
        t.insert(p(3), 0).unwrap();
        t.insert(p(4), 0).unwrap();
        assert_eq!(t.max_depth(), 3);
        assert_eq!(t.rebalance(2), 2);
        t.invariants().unwrap();
        assert_eq!(t.parent(p(2)), Some(p(0)));
        assert_eq!(t.parent(p(1)), Some(p(2)));
        assert_eq!(t.parent(p(3)), Some(p(2)));
        assert_eq!(t.max_depth(), 2);
        assert_eq!(t.rebalance(10), 0);
    }

    #[test]
    fn min_depth_fills_levels_strongest_first() {
        assert_eq!(min_depth(2, []), Some(0));
        assert_eq!(min_depth(2, [4, 1, 1, 1, 0, 0, 0]), Some(2));
        // Two per relay: 2 + 4 + 8 = 14 peers in three levels, the 15th needs a fourth.
        assert_eq!(min_depth(2, [2; 14]), Some(3));
        assert_eq!(min_depth(2, [2; 15]), Some(4));
        assert_eq!(min_depth(1, [0, 0]), None);
    }

    #[test]
    fn no_slot_means_waiting_until_one_frees() {
        let mut t = RelayTree::new(2);
        t.set_root(p(0), 1).unwrap();
        t.insert(p(1), 1).unwrap();
        t.insert(p(2), 1).unwrap();
        t.insert(p(3), 1).unwrap(); // depth limit 2: chain 0-1-2 is full
        assert_eq!(t.depth(p(3)), None);
        assert_eq!(t.waiting_len(), 1);
        t.invariants().unwrap();
        t.remove(p(2)).unwrap();
        assert_eq!(t.depth(p(3)), Some(2));
        t.invariants().unwrap();
    }

    #[test]
    fn subtree_below_depth_limit_is_cut_and_replaced() {
        // Root cap 2, depth limit 3. Build: root -> a -> b -> c, root -> x.
        let mut t = RelayTree::new(3);
        t.set_root(p(0), 1).unwrap();
        t.insert(p(1), 1).unwrap();
        t.insert(p(2), 1).unwrap();
        t.insert(p(3), 2).unwrap();
        t.invariants().unwrap();
        t.set_capacity(p(0), 2).unwrap();
        // Raising root capacity frees a depth-0 slot.
        t.insert(p(4), 2).unwrap();
        assert_eq!(t.parent(p(4)), Some(p(0)));
        t.invariants().unwrap();
        // Lowering p1's capacity pushes its subtree (p2 -> p3) elsewhere, within the limit.
        t.set_capacity(p(1), 0).unwrap();
        t.invariants().unwrap();
        assert!(t.depth(p(2)).is_some() && t.depth(p(3)).is_some());
    }

    #[test]
    fn strong_newcomer_displaces_a_shallow_zero_capacity_leaf() {
        let mut t = RelayTree::new(10);
        t.set_root(p(0), 2).unwrap();
        t.insert(p(1), 0).unwrap();
        t.insert(p(2), 0).unwrap();
        // Root full of leaves: nothing is free.
        t.drain_events().for_each(drop);
        t.insert(p(3), 4).unwrap();
        t.invariants().unwrap();
        assert_eq!(t.depth(p(3)), Some(1));
        assert_eq!(t.child_count(p(3)), Some(1));
        assert_eq!(t.max_depth(), 2);
        let events: Vec<_> = t.drain_events().collect();
        assert!(
            events.iter().any(
                |e| matches!(e, TreeEvent::Linked { parent, depth: 2, .. } if *parent == p(3))
            )
        );
    }

    #[test]
    fn reparent_avoids_the_failing_parent() {
        let mut t = filled(6, 2, 2, 10);
        let child = PeerId(3); // depth 2 under p1
        let old = t.parent(child).unwrap();
        t.reparent(child).unwrap();
        t.invariants().unwrap();
        assert_ne!(t.parent(child), Some(old));
    }

    #[test]
    fn root_loss_makes_everyone_wait_and_a_new_root_takes_them_back() {
        let mut t = filled(6, 2, 2, 10);
        t.remove(p(0)).unwrap();
        t.invariants().unwrap();
        assert_eq!(t.attached_len(), 0);
        assert_eq!(t.waiting_len(), 6);
        t.set_root(p(100), 2).unwrap();
        t.invariants().unwrap();
        assert_eq!(t.attached_len(), 7);
        assert_eq!(t.max_depth(), 2, "the two depth-1 subtrees come back whole");
        assert_eq!(t.child_count(p(1)), Some(2));
        assert_eq!(t.child_count(p(2)), Some(2));
    }

    #[test]
    fn errors_for_unknown_and_duplicate_peers() {
        let mut t = filled(1, 1, 1, 4);
        assert_eq!(t.insert(p(1), 1), Err(TreeError::DuplicatePeer(p(1))));
        assert_eq!(t.remove(p(9)), Err(TreeError::UnknownPeer(p(9))));
        assert_eq!(t.set_root(p(9), 1), Err(TreeError::RootExists));
        assert_eq!(t.reparent(p(0)), Err(TreeError::IsRoot));
    }

    #[test]
    fn a_symmetric_peer_goes_where_it_connects_directly_even_if_deeper() {
        // Root (public) feeds 1 (cone) and 2 (full cone); 1 has the shallower free slot.
        let mut t = RelayTree::new(10);
        t.set_root(p(0), 2).unwrap();
        t.set_nat(p(0), NatClass::Public).unwrap();
        t.insert(p(1), 2).unwrap();
        t.set_nat(p(1), NatClass::Cone).unwrap();
        t.insert(p(2), 1).unwrap();
        t.set_nat(p(2), NatClass::FullCone).unwrap();
        t.insert(p(3), 0).unwrap(); // takes 1's first slot (cone: fine for unknown)
        t.set_nat(p(3), NatClass::Symmetric).unwrap();
        t.invariants().unwrap();
        assert_eq!(t.parent(p(3)), Some(p(2)), "moved to the full-cone relay");
        // A cone child reported after placement stays with the cone relay.
        t.insert(p(4), 0).unwrap();
        t.set_nat(p(4), NatClass::Cone).unwrap();
        assert_eq!(t.parent(p(4)), Some(p(1)));
        t.invariants().unwrap();
    }

    #[test]
    fn without_relays_an_unreachable_peer_waits_for_a_reachable_parent() {
        let mut t = RelayTree::new(10);
        t.set_relay_allowed(false);
        t.set_root(p(0), 1).unwrap();
        t.set_nat(p(0), NatClass::Public).unwrap();
        t.insert(p(1), 2).unwrap();
        t.set_nat(p(1), NatClass::Symmetric).unwrap();
        t.insert(p(2), 0).unwrap();
        t.set_nat(p(2), NatClass::Cone).unwrap();
        t.invariants().unwrap();
        assert_eq!(
            t.parent(p(2)),
            None,
            "symmetric relay cannot reach a cone child"
        );
        assert_eq!(t.wait_reason(p(2)), Some(WaitReason::NoRoute));
        // A full-cone relay arrives: 2 is placed under it at once.
        t.insert(p(3), 2).unwrap();
        t.set_nat(p(3), NatClass::FullCone).unwrap();
        t.invariants().unwrap();
        assert_eq!(t.parent(p(2)), Some(p(3)));
        assert_eq!(t.wait_reason(p(2)), None);
        // With TURN, an unreachable pair is linked rather than left waiting.
        let mut t = RelayTree::new(10);
        t.set_root(p(0), 1).unwrap();
        t.set_nat(p(0), NatClass::Symmetric).unwrap();
        t.insert(p(1), 0).unwrap();
        t.set_nat(p(1), NatClass::Symmetric).unwrap();
        t.invariants().unwrap();
        assert_eq!(t.parent(p(1)), Some(p(0)));
        assert!(!t.is_direct(p(1), p(0)));
    }

    #[test]
    fn a_failed_pair_is_never_linked_again() {
        let mut t = RelayTree::new(10);
        t.set_root(p(0), 1).unwrap();
        t.insert(p(1), 1).unwrap();
        t.insert(p(2), 1).unwrap();
        assert_eq!(t.parent(p(2)), Some(p(1)));
        t.link_failed(p(2), p(1)).unwrap();
        t.invariants().unwrap();
        assert_eq!(
            t.parent(p(2)),
            None,
            "its only possible parent failed: it waits"
        );
        assert_eq!(t.wait_reason(p(2)), Some(WaitReason::NoRoute));
        // 1 leaves: 2 may take its place under the root; the failure is not held against
        // anyone else.
        t.remove(p(1)).unwrap();
        t.invariants().unwrap();
        assert_eq!(t.parent(p(2)), Some(p(0)));
        assert!(t.is_avoided(p(2), p(1)) && t.is_avoided(p(1), p(2)));
    }
}
