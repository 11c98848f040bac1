//! Random operation sequences against the relay tree, with every invariant checked after
//! every operation. 256 cases × up to 600 operations ≈ 100,000+ operations per run.

use proptest::prelude::*;
use treecast_core::PeerId;
use treecast_core::protocol::NatClass;
use treecast_core::tree::{RelayTree, TreeEvent, min_depth};

#[derive(Debug, Clone)]
enum Op {
    Join {
        capacity: u32,
    },
    Leave {
        pick: usize,
    },
    Stall {
        pick: usize,
    },
    Capacity {
        pick: usize,
        capacity: u32,
    },
    RootLeaves,
    RootJoins {
        capacity: u32,
    },
    /// A peer reports its NAT class.
    Nat {
        pick: usize,
        class: usize,
    },
    /// A child's ICE to its parent failed.
    LinkFailed {
        pick: usize,
    },
    /// TURN comes or goes.
    Relay {
        allowed: bool,
    },
    /// The room's rebalancing timer.
    Rebalance {
        budget: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0u32..=5).prop_map(|capacity| Op::Join { capacity }),
        4 => any::<usize>().prop_map(|pick| Op::Leave { pick }),
        2 => any::<usize>().prop_map(|pick| Op::Stall { pick }),
        2 => (any::<usize>(), 0u32..=5).prop_map(|(pick, capacity)| Op::Capacity { pick, capacity }),
        1 => Just(Op::RootLeaves),
        1 => (1u32..=5).prop_map(|capacity| Op::RootJoins { capacity }),
        4 => (any::<usize>(), 0usize..NatClass::ALL.len())
            .prop_map(|(pick, class)| Op::Nat { pick, class }),
        2 => any::<usize>().prop_map(|pick| Op::LinkFailed { pick }),
        1 => any::<bool>().prop_map(|allowed| Op::Relay { allowed }),
        2 => (1usize..6).prop_map(|budget| Op::Rebalance { budget }),
    ]
}

/// Tracks what the events say the tree looks like, to check the events tell the truth.
#[derive(Default)]
struct EventMirror {
    parent: std::collections::HashMap<PeerId, PeerId>,
}

impl EventMirror {
    fn apply(&mut self, events: impl Iterator<Item = TreeEvent>) {
        for e in events {
            match e {
                TreeEvent::Linked { parent, child, .. } => {
                    assert!(
                        self.parent.insert(child, parent).is_none(),
                        "{child} linked to {parent} without an unlink from its old parent"
                    );
                }
                TreeEvent::Unlinked { parent, child } => {
                    assert_eq!(
                        self.parent.remove(&child),
                        Some(parent),
                        "unlink of a non-edge"
                    );
                }
                TreeEvent::DepthChanged { .. } | TreeEvent::Waiting { .. } => {}
            }
        }
    }
}

fn run(max_depth: u32, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut tree = RelayTree::new(max_depth);
    let mut mirror = EventMirror::default();
    let mut live: Vec<PeerId> = Vec::new();
    let mut root: Option<PeerId> = None;
    let mut next = 0u64;
    let mut fresh = || {
        next += 1;
        PeerId(next)
    };
    for op in ops {
        match *op {
            Op::Join { capacity } => {
                let p = fresh();
                tree.insert(p, capacity).unwrap();
                live.push(p);
            }
            Op::Leave { pick } if !live.is_empty() => {
                let p = live.swap_remove(pick % live.len());
                tree.remove(p).unwrap();
            }
            Op::Stall { pick } if !live.is_empty() => {
                let p = live[pick % live.len()];
                let before = tree.parent(p);
                let moved = tree.reparent(p).unwrap();
                if moved {
                    prop_assert_ne!(tree.parent(p), before, "a move lands elsewhere");
                    prop_assert!(tree.parent(p).is_some(), "a move lands on a slot");
                } else {
                    prop_assert_eq!(tree.parent(p), before, "no move, no change");
                    let events: Vec<TreeEvent> = tree.drain_events().collect();
                    prop_assert!(events.is_empty(), "no move, no events: {:?}", events);
                }
            }
            Op::Capacity { pick, capacity } if !live.is_empty() => {
                tree.set_capacity(live[pick % live.len()], capacity)
                    .unwrap();
            }
            Op::RootLeaves => {
                if let Some(r) = root.take() {
                    tree.remove(r).unwrap();
                }
            }
            Op::RootJoins { capacity } if root.is_none() => {
                let r = fresh();
                tree.set_root(r, capacity).unwrap();
                root = Some(r);
            }
            Op::Nat { pick, class } => {
                let all: Vec<PeerId> = live.iter().copied().chain(root).collect();
                if !all.is_empty() {
                    let p = all[pick % all.len()];
                    tree.set_nat(p, NatClass::ALL[class]).unwrap();
                }
            }
            Op::LinkFailed { pick } if !live.is_empty() => {
                let child = live[pick % live.len()];
                if let Some(parent) = tree.parent(child) {
                    tree.link_failed(child, parent).unwrap();
                    prop_assert_ne!(tree.parent(child), Some(parent), "failed link kept");
                }
            }
            Op::Relay { allowed } => tree.set_relay_allowed(allowed),
            Op::Rebalance { budget } => {
                let (depth, waiting) = (tree.max_depth(), tree.waiting_len());
                prop_assert!(tree.rebalance(budget) <= budget, "over budget");
                // Deeper only by placing waiting peers in the slots the moves freed.
                prop_assert!(
                    tree.max_depth() <= depth || tree.waiting_len() < waiting,
                    "rebalancing deepened the tree"
                );
            }
            _ => {}
        }
        mirror.apply(tree.drain_events());
        if let Err(v) = tree.invariants() {
            return Err(TestCaseError::fail(format!("after {op:?}: {v}")));
        }
        for (&child, &parent) in &mirror.parent {
            prop_assert_eq!(
                tree.parent(child),
                Some(parent),
                "events disagree with the tree"
            );
        }
        prop_assert_eq!(tree.len(), live.len() + usize::from(root.is_some()));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_after_every_operation(
        max_depth in 2u32..8,
        ops in proptest::collection::vec(op(), 300..600),
    ) {
        run(max_depth, &ops)?;
    }
}

/// A stalled child with no slot left but its parent's stays put: no unlink and re-link of the
/// same edge, nothing for the room to tell anyone.
#[test]
fn a_reparent_with_nowhere_else_to_go_changes_nothing() {
    let mut tree = RelayTree::new(10);
    tree.set_root(PeerId(0), 1).unwrap();
    tree.insert(PeerId(1), 2).unwrap(); // depth 1, the root's only slot
    tree.insert(PeerId(2), 0).unwrap(); // depth 2
    tree.insert(PeerId(3), 0).unwrap(); // depth 2: PeerId(1) is full
    tree.drain_events().for_each(drop);
    assert_eq!(tree.reparent(PeerId(2)), Ok(false));
    assert_eq!(tree.parent(PeerId(2)), Some(PeerId(1)));
    assert_eq!(tree.drain_events().count(), 0);
    tree.invariants().unwrap();
    // A slot opens elsewhere (inside the stalled child's own subtree does not count).
    tree.insert(PeerId(4), 1).unwrap(); // waits: no slot
    tree.set_capacity(PeerId(0), 2).unwrap(); // PeerId(4) is placed under the root
    tree.drain_events().for_each(drop);
    assert_eq!(tree.reparent(PeerId(2)), Ok(true));
    assert_eq!(tree.parent(PeerId(2)), Some(PeerId(4)));
    tree.invariants().unwrap();
}

/// A long deterministic run at a larger size, where subtrees are deep and repairs big.
#[test]
fn large_churn_keeps_invariants_and_stays_near_minimum_depth() {
    let mut tree = RelayTree::new(30);
    tree.set_root(PeerId(0), 3).unwrap();
    let mut live = Vec::new();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 1..=20_000u64 {
        if live.len() < 500 || rand() % 3 != 0 {
            tree.insert(PeerId(i), 3).unwrap();
            live.push(PeerId(i));
        } else {
            let p = live.swap_remove((rand() % live.len() as u64) as usize);
            tree.remove(p).unwrap();
        }
        tree.drain_events().for_each(drop);
        if i % 1_000 == 0 {
            tree.invariants().unwrap();
        }
    }
    tree.invariants().unwrap();
    // Equal capacity 3 everywhere: d_min = ceil(log3(1 + N*2/3)).
    let n = live.len() as f64;
    let d_min = (1.0 + n * 2.0 / 3.0).log(3.0).ceil() as u32;
    eprintln!(
        "{n} peers after churn: depth {} (d_min {d_min})",
        tree.max_depth()
    );
    assert!(
        tree.max_depth() <= d_min + 1,
        "depth {} vs d_min {d_min} for {n} peers",
        tree.max_depth()
    );
}

#[derive(Debug, Clone)]
enum Churn {
    Join {
        capacity: u32,
    },
    /// Leaving or crashing: the tree sees a removal either way.
    Leave {
        pick: usize,
    },
    /// The room's timer: a few rebalancing moves.
    Rebalance {
        budget: usize,
    },
}

/// Capacities in the shares of mixed real uplinks: most peers feed nobody or two, a
/// quarter feed four (the fan-out limit), a few one.
fn mixed_capacity() -> impl Strategy<Value = u32> {
    prop_oneof![4 => Just(0u32), 1 => Just(1), 3 => Just(2), 3 => Just(4)]
}

fn churn() -> impl Strategy<Value = Churn> {
    prop_oneof![
        6 => mixed_capacity().prop_map(|capacity| Churn::Join { capacity }),
        4 => any::<usize>().prop_map(|pick| Churn::Leave { pick }),
        1 => (1usize..8).prop_map(|budget| Churn::Rebalance { budget }),
    ]
}

fn run_churn(root_capacity: u32, ops: &[Churn]) -> Result<(), TestCaseError> {
    let mut tree = RelayTree::new(64);
    let mut mirror = EventMirror::default();
    tree.set_root(PeerId(0), root_capacity).unwrap();
    let mut live: Vec<(PeerId, u32)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match *op {
            Churn::Join { capacity } => {
                let p = PeerId(i as u64 + 1);
                tree.insert(p, capacity).unwrap();
                live.push((p, capacity));
            }
            Churn::Leave { pick } if !live.is_empty() => {
                let (p, _) = live.swap_remove(pick % live.len());
                tree.remove(p).unwrap();
            }
            Churn::Rebalance { budget } => {
                let (depth, waiting) = (tree.max_depth(), tree.waiting_len());
                let moved = tree.rebalance(budget);
                prop_assert!(moved <= budget, "{moved} moves over a budget of {budget}");
                prop_assert!(
                    tree.max_depth() <= depth || tree.waiting_len() < waiting,
                    "rebalancing deepened the tree"
                );
            }
            Churn::Leave { .. } => {}
        }
        mirror.apply(tree.drain_events());
        if let Err(v) = tree.invariants() {
            return Err(TestCaseError::fail(format!("after {op:?}: {v}")));
        }
    }
    // The churn settles: the room's timer runs until nothing is worth moving.
    let mut rounds = 0;
    while tree.rebalance(8) > 0 {
        mirror.apply(tree.drain_events());
        tree.invariants()
            .map_err(|v| TestCaseError::fail(v.to_string()))?;
        rounds += 1;
        prop_assert!(rounds < 100_000, "rebalancing does not come to rest");
    }
    mirror.apply(tree.drain_events());
    for (&child, &parent) in &mirror.parent {
        prop_assert_eq!(
            tree.parent(child),
            Some(parent),
            "events disagree with the tree"
        );
    }
    if let Some(d_min) = min_depth(root_capacity, live.iter().map(|&(_, c)| c)) {
        prop_assert_eq!(tree.waiting_len(), 0, "room for everyone, yet some wait");
        prop_assert!(
            tree.max_depth() <= d_min + 1,
            "depth {} with d_min {} for {} peers",
            tree.max_depth(),
            d_min,
            live.len()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mixed_capacity_churn_settles_within_one_level_of_the_minimum(
        root_capacity in 1u32..=6,
        ops in proptest::collection::vec(churn(), 200..1_000),
    ) {
        run_churn(root_capacity, &ops)?;
    }
}
