//! Placement and repair cost at 10^3 .. 10^6 peers, in steady state.
//!
//! Each sample runs batches of 1,000 joins followed by 1,000 leaves of random peers (relays
//! included, so leave figures include repair), keeping the tree near its size. `join`
//! reports the time of the joins, `leave_repair` the time of the leaves, per operation.
//! Capacities are mixed: 30 % leaves (0), 20 % one child, 25 % two, 25 % four; the depth
//! limit is the operator default (16). After each size's churn the tree is rebalanced until
//! nothing is worth moving; the cost per move and the depth before and after are printed.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use treecast_core::PeerId;
use treecast_core::tree::{RelayTree, min_depth};

const BATCH: usize = 1_000;

struct Steady {
    tree: RelayTree,
    live: Vec<PeerId>,
    next: u64,
    rng: ChaCha8Rng,
}

impl Steady {
    fn new(n: usize) -> Self {
        let mut s = Self {
            tree: RelayTree::with_capacity(16, n + BATCH),
            live: Vec::with_capacity(n + BATCH),
            next: 1,
            rng: ChaCha8Rng::seed_from_u64(n as u64),
        };
        s.tree.set_root(PeerId(0), 4).unwrap();
        for _ in 0..n {
            s.join();
        }
        s.tree.drain_events().for_each(drop);
        s
    }

    fn capacity(&mut self) -> u32 {
        match self.rng.next_u32() % 20 {
            0..=5 => 0,
            6..=9 => 1,
            10..=14 => 2,
            _ => 4,
        }
    }

    fn join(&mut self) {
        let p = PeerId(self.next);
        self.next += 1;
        let cap = self.capacity();
        self.tree.insert(p, cap).unwrap();
        self.live.push(p);
    }

    fn leave(&mut self) {
        let i = (self.rng.next_u64() % self.live.len() as u64) as usize;
        let p = self.live.swap_remove(i);
        self.tree.remove(p).unwrap();
    }

    /// Runs `ops` joins and `ops` leaves; returns (join time, leave time).
    fn run(&mut self, ops: u64) -> (Duration, Duration) {
        let (mut join, mut leave) = (Duration::ZERO, Duration::ZERO);
        let mut done = 0;
        while done < ops {
            let n = BATCH.min((ops - done) as usize);
            let t = Instant::now();
            for _ in 0..n {
                self.join();
            }
            join += t.elapsed();
            self.tree.drain_events().for_each(drop);
            let t = Instant::now();
            for _ in 0..n {
                self.leave();
            }
            leave += t.elapsed();
            self.tree.drain_events().for_each(drop);
            done += n as u64;
        }
        (join, leave)
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("tree");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for n in [1_000usize, 10_000, 100_000, 1_000_000] {
        let mut steady = Steady::new(n);
        group.bench_with_input(BenchmarkId::new("join", n), &n, |b, _| {
            b.iter_custom(|iters| steady.run(iters).0)
        });
        group.bench_with_input(BenchmarkId::new("leave_repair", n), &n, |b, _| {
            b.iter_custom(|iters| steady.run(iters).1)
        });
        steady.tree.invariants().unwrap();
        eprintln!(
            "n={n}: depth {} after churn (d_min {}), {} waiting",
            steady.tree.max_depth(),
            d_min(&steady.tree),
            steady.tree.waiting_len()
        );
        settle(&mut steady.tree, n);
    }
    group.finish();
}

/// The least possible depth for the tree's attached peers ([`min_depth`]).
fn d_min(tree: &RelayTree) -> u32 {
    let root = tree.root().expect("the bench keeps its root");
    let capacities = tree
        .attached()
        .filter(|&(p, ..)| p != root)
        .map(|(.., c, _)| c);
    min_depth(tree.capacity(root).unwrap_or(0), capacities).unwrap_or(u32::MAX)
}

/// Rebalances the churned tree until nothing is worth moving (or a million moves), and
/// reports the cost per move and the depth it reaches. Not a criterion measurement: the
/// work shrinks as the tree settles, so it is timed once.
fn settle(tree: &mut RelayTree, n: usize) {
    let before = tree.max_depth();
    let mut moves = 0;
    let t = Instant::now();
    for _ in 0..1_000 {
        let m = tree.rebalance(1_000);
        tree.drain_events().for_each(drop);
        moves += m;
        if m == 0 {
            break;
        }
    }
    let elapsed = t.elapsed();
    tree.invariants().unwrap();
    eprintln!(
        "n={n}: rebalance: {moves} moves in {elapsed:.2?} ({:.2?} per move), depth {before} -> {} (d_min {})",
        elapsed / moves.max(1) as u32,
        tree.max_depth(),
        d_min(tree)
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
