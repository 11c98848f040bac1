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
//! When no leaf can stand in (or the root left), each child is detached *with its
//! subtree*. A detached subtree leaves every index, so the placement query cannot pick a
//! slot inside it; it is re-attached as a unit to the best slot, the orphan with the most
//! capacity first. When re-attaching would push nodes below the depth limit, the children
//! of nodes at the limit are cut off and placed like any other orphan. Subtrees that find
//! no slot wait, in arrival order, and are placed as soon as a slot frees up.
//!
//! Work per operation is O(fan-out · log N) for joins and stand-in repairs; a subtree that
//! must move costs time proportional to its size, never to the size of the tree.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::buckets::{Buckets, CLASSES, Slot, class_of};

use petgraph::Direction::{Incoming, Outgoing};
use petgraph::stable_graph::{NodeIndex, StableGraph};
use serde::Serialize;

use crate::ids::{PeerId, PeerIndex};

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
    /// Position in the waiting queue, if this node heads a waiting subtree.
    wait_seq: Option<u64>,
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
    /// Attached nodes with spare slots and depth below the limit, by (depth, spare class).
    free: Buckets,
    /// Attached non-root leaves by (depth, capacity class): the shallowest weak leaf is a
    /// promotion target, the deepest strong leaf a stand-in for a departing relay.
    leaves: Buckets,
    /// Heads of detached subtrees in arrival order.
    waiting: BTreeMap<u64, NodeIndex>,
    next_wait_seq: u64,
    /// Attached peers per depth, for max depth and histograms without a scan.
    depth_counts: Vec<u64>,
    events: Vec<TreeEvent>,
    /// Reused work lists, so operations do not allocate in steady state.
    orphans: VecDeque<NodeIndex>,
    stack: Vec<(NodeIndex, u32)>,
}

impl RelayTree {
    /// An empty tree. `max_depth` (at least 1) bounds every attached peer's depth.
    pub fn new(max_depth: u32) -> Self {
        Self {
            graph: Graph::default(),
            nodes: PeerIndex::default(),
            root: None,
            max_depth: max_depth.max(1),
            free: Buckets::default(),
            leaves: Buckets::default(),
            waiting: BTreeMap::new(),
            next_wait_seq: 0,
            depth_counts: Vec::new(),
            events: Vec::new(),
            orphans: VecDeque::new(),
            stack: Vec::new(),
        }
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

    /// The peer's capacity.
    pub fn capacity(&self, peer: PeerId) -> Option<u32> {
        self.node(peer).map(|n| self.graph[n].capacity)
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
            .members()
            .map(|(_, _, i)| u64::from(self.graph[NodeIndex::new(i as usize)].spare()))
            .sum()
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
            capacity: node.capacity,
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
        let slot = self.best_slot();
        if let Some(leaf) = self.promotion_candidate(capacity, slot.map(|(d, _)| d)) {
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

    /// Removes a peer (left or crashed) and repairs the tree around it.
    pub fn remove(&mut self, peer: PeerId) -> Result<(), TreeError> {
        let n = self.node(peer).ok_or(TreeError::UnknownPeer(peer))?;
        if self.replace_with_leaf(n) {
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

    /// Moves `peer` with its subtree to the best slot not under its current parent (the
    /// parent stopped delivering). The old parent may be chosen only if nothing else is free.
    pub fn reparent(&mut self, peer: PeerId) -> Result<(), TreeError> {
        let n = self.node(peer).ok_or(TreeError::UnknownPeer(peer))?;
        if self.root == Some(n) {
            return Err(TreeError::IsRoot);
        }
        let Some(p) = self.parent_of(n) else {
            return Ok(()); // waiting: nothing to move away from
        };
        if self.graph[n].status == Status::Detached {
            return Ok(()); // inside a waiting subtree: it moves with its head
        }
        self.unlink(p, n);
        self.detach_subtree(n);
        self.unindex(p);
        self.orphans.push_back(n);
        self.place_orphans();
        self.reindex(p);
        self.fill_waiting();
        Ok(())
    }

    /// Changes a peer's capacity. Children above the new capacity are moved elsewhere
    /// (lowest-capacity children first: they are most likely leaves, cheap to move).
    pub fn set_capacity(&mut self, peer: PeerId, capacity: u32) -> Result<(), TreeError> {
        let n = self.node(peer).ok_or(TreeError::UnknownPeer(peer))?;
        if self.graph[n].capacity == capacity {
            return Ok(());
        }
        let attached = self.graph[n].status == Status::Attached;
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

    // ---- internals ----

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
            wait_seq: None,
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
        self.unindex(n);
        let i = n.index() as u32;
        let node = &self.graph[n];
        let (depth, spare, capacity) = (node.depth, node.spare(), node.capacity);
        let free_slot = (spare > 0 && depth < self.max_depth)
            .then(|| self.free.insert(depth, class_of(spare), i));
        let leaf_slot = (node.children == 0 && depth > 0)
            .then(|| self.leaves.insert(depth, class_of(capacity), i));
        let node = &mut self.graph[n];
        node.free_slot = free_slot;
        node.leaf_slot = leaf_slot;
    }

    fn unindex(&mut self, n: NodeIndex) {
        if let Some(slot) = self.graph[n].free_slot.take()
            && let Some(moved) = self.free.remove(slot)
        {
            self.graph[NodeIndex::new(moved as usize)].free_slot = Some(slot);
        }
        if let Some(slot) = self.graph[n].leaf_slot.take()
            && let Some(moved) = self.leaves.remove(slot)
        {
            self.graph[NodeIndex::new(moved as usize)].leaf_slot = Some(slot);
        }
    }

    /// The best free slot: shallowest, then most spare slots, then longest waiting.
    fn best_slot(&self) -> Option<(u32, NodeIndex)> {
        let depth = self.free.min_depth()?;
        (0..CLASSES)
            .rev()
            .find_map(|class| self.free.cell(depth, class).first())
            .map(|&i| (depth, NodeIndex::new(i as usize)))
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
        while let Some((n, d)) = self.stack.pop() {
            if d >= self.max_depth {
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
        match self.best_slot() {
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
        self.events.push(TreeEvent::Waiting {
            peer: self.graph[n].peer,
        });
    }

    /// Places waiting subtrees, oldest first, while slots are free.
    fn fill_waiting(&mut self) {
        while !self.free.is_empty() {
            let Some((_, n)) = self.waiting.pop_first() else {
                return;
            };
            self.graph[n].wait_seq = None;
            self.place_subtree(n);
            self.place_orphans();
        }
    }

    /// The shallowest leaf worth displacing by a newcomer of `capacity` (at least 2 more
    /// than the leaf's, so the tree gains a slot), no deeper than the newcomer's best free
    /// slot (`slot_depth`; None when the tree is full). Ties go to the weaker leaf.
    fn promotion_candidate(&self, capacity: u32, slot_depth: Option<u32>) -> Option<NodeIndex> {
        let weakest_allowed = capacity.checked_sub(2)?;
        let deepest = slot_depth
            .unwrap_or(self.max_depth - 1)
            .min(self.max_depth - 1)
            .min(self.leaves.depth_bound().saturating_sub(1));
        for depth in (1..=deepest).filter(|&d| self.leaves.has_depth(d)) {
            for class in 0..=class_of(weakest_allowed) {
                // The top class mixes capacities: check the exact value there.
                let found = self.leaves.cell(depth, class).iter().take(8).find(|&&i| {
                    class < CLASSES - 1
                        || self.graph[NodeIndex::new(i as usize)].capacity <= weakest_allowed
                });
                if let Some(&i) = found {
                    return Some(NodeIndex::new(i as usize));
                }
            }
        }
        None
    }

    /// A leaf outside `n`'s subtree to stand in for `n`: the deepest one that can feed all
    /// `need` orphans (ties: more capacity), or else the strongest one (deepest among
    /// equals), which adopts as many as it can. Leaves inside are skipped so the orphaned
    /// subtrees stay exactly as they were; a bounded number of candidates is examined.
    fn stand_in(&self, need: u32, n: NodeIndex) -> Option<NodeIndex> {
        const BUDGET: usize = 64;
        let mut examined = 0;
        let mut usable = |i: u32, min_capacity: u32| {
            examined += 1;
            let x = NodeIndex::new(i as usize);
            (examined <= BUDGET && self.graph[x].capacity >= min_capacity && !self.is_within(x, n))
                .then_some(x)
        };
        let need_class = class_of(need);
        let depths = (1..self.leaves.depth_bound()).rev();
        for depth in depths.clone().filter(|&d| self.leaves.has_depth(d)) {
            for class in (need_class..CLASSES).rev() {
                for &i in self.leaves.cell(depth, class).iter().rev() {
                    if let Some(x) = usable(i, need) {
                        return Some(x);
                    }
                }
            }
        }
        // Nobody can take all orphans: the strongest leaf takes the strongest ones.
        for class in (1..need_class).rev() {
            for depth in depths.clone().filter(|&d| self.leaves.has_depth(d)) {
                for &i in self.leaves.cell(depth, class).iter().rev() {
                    if let Some(x) = usable(i, 1) {
                        return Some(x);
                    }
                }
            }
        }
        None
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

    /// Fills the place of attached relay `n` with a stand-in leaf that adopts `n`'s
    /// strongest children (all of them if it can); the rest are queued as orphans. Unlinks
    /// `n` (the caller deletes the node). False if no leaf can stand in.
    fn replace_with_leaf(&mut self, n: NodeIndex) -> bool {
        let node = &self.graph[n];
        if node.status != Status::Attached || node.children == 0 || self.root == Some(n) {
            return false;
        }
        let Some(leaf) = self.stand_in(node.children, n) else {
            return false;
        };
        let (depth, parent) = (node.depth, self.parent_of(n).expect("non-root attached"));
        // Lift the leaf out of its place elsewhere in the tree.
        let leaf_parent = self.parent_of(leaf).expect("leaves are never the root");
        self.unindex(leaf);
        self.count_depth(self.graph[leaf].depth, false);
        self.graph[leaf].status = Status::Detached;
        self.unlink(leaf_parent, leaf);
        // Take `n` out of the tree.
        self.unindex(n);
        self.count_depth(depth, false);
        self.graph[n].status = Status::Detached;
        self.unlink(parent, n);
        let mut children: Vec<NodeIndex> = self.graph.neighbors_directed(n, Outgoing).collect();
        children.sort_by_key(|&c| (Reverse(self.graph[c].capacity), c.index()));
        for &c in &children {
            self.unlink(n, c);
        }
        // The leaf stands in: same parent, same depth, as many children as it can feed.
        self.link(parent, leaf);
        self.set_attached(leaf, depth);
        let adopt = (self.graph[leaf].capacity as usize).min(children.len());
        for &c in &children[..adopt] {
            self.link(leaf, c);
        }
        self.reindex(leaf);
        for &c in &children[adopt..] {
            self.detach_subtree(c);
            self.orphans.push_back(c);
        }
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
            match node.status {
                Status::Attached => {
                    if node.wait_seq.is_some() {
                        return fail(format!("attached {peer} is queued as waiting"));
                    }
                    if node.depth > self.max_depth {
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
                    if node.spare() > 0 && node.depth < self.max_depth {
                        free.insert((node.depth, class_of(node.spare()), i));
                    }
                    if node.children == 0 && node.depth > 0 {
                        leaves.insert((node.depth, class_of(node.capacity), i));
                    }
                    if !slot_ok(&self.free, node.free_slot, i)
                        || !slot_ok(&self.leaves, node.leaf_slot, i)
                    {
                        return fail(format!("{peer}'s recorded index position is stale"));
                    }
                }
                Status::Detached => {
                    if self.root == Some(n) {
                        return fail("root is detached".into());
                    }
                    if node.free_slot.is_some() || node.leaf_slot.is_some() {
                        return fail(format!("detached {peer} is indexed"));
                    }
                    match parent {
                        None if node.wait_seq.is_none() => {
                            return fail(format!("{peer} is neither attached nor waiting"));
                        }
                        Some(p) if self.graph[p].status != Status::Detached => {
                            return fail(format!("detached {peer} under an attached parent"));
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
        }
        if free.len() != self.free.len() || free != self.free.members().collect() {
            return fail("free-slot index out of sync".into());
        }
        if leaves.len() != self.leaves.len() || leaves != self.leaves.members().collect() {
            return fail("leaf index out of sync".into());
        }
        let trimmed = |v: &[u64]| v.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1);
        if depth_counts[..trimmed(&depth_counts)]
            != self.depth_counts[..trimmed(&self.depth_counts)]
        {
            return fail("depth counts out of sync".into());
        }
        if !self.waiting.is_empty() && self.root.is_some() && !self.free.is_empty() {
            return fail("peers wait although a slot within the depth limit is free".into());
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
}
