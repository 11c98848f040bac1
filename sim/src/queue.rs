//! The event queue: a two-level calendar of time buckets in front of a sorted run and a
//! small heap.
//!
//! Most scheduled events lie far ahead (every viewer's departure is scheduled on arrival),
//! so one binary heap would hold a million entries and miss the cache on every push and
//! pop. Here time is cut into fine buckets, grouped into windows of `RING` buckets. An
//! event beyond the current window is appended to its window's list (a few hundred list
//! tails, which stay in cache); when a window begins, its list is dealt into a ring of
//! fine buckets whose allocations are reused window after window. A fine bucket that comes
//! due is sorted once and popped from the end; only events scheduled into the bucket being
//! processed (or earlier) go through a heap, which stays small. Order is exact: by time,
//! then by scheduling order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Microseconds of virtual time.
type Micros = u64;

/// Fine buckets per run: enough that a bucket holds a few milliseconds of events.
const BUCKETS: u64 = 200_000;
/// Fine buckets per window.
const RING: usize = 256;

/// An event in a bucket. Buckets keep their entries in scheduling order, so the order
/// needs no field of its own.
#[derive(Debug, Clone, Copy)]
struct Slot<K> {
    at: Micros,
    kind: K,
}

/// An event in the heap: scheduled into the bucket being processed, after every event the
/// bucket held when it came due.
#[derive(Debug, Clone, Copy)]
struct Entry<K> {
    at: Micros,
    seq: u64,
    kind: K,
}

impl<K> Entry<K> {
    fn key(&self) -> (Micros, u64) {
        (self.at, self.seq)
    }
}

impl<K> PartialEq for Entry<K> {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl<K> Eq for Entry<K> {}
impl<K> PartialOrd for Entry<K> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<K> Ord for Entry<K> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

/// Events up to an end time, popped in (time, scheduling order).
#[derive(Debug, Clone)]
pub(crate) struct Calendar<K> {
    /// Width of a fine bucket.
    width: Micros,
    end: Micros,
    /// Index of the fine bucket being processed (counted from time 0).
    current: usize,
    /// The current bucket as it was when it came due, in order; `head` entries are done.
    due: Vec<Slot<K>>,
    head: usize,
    /// Work space of the radix sort.
    scratch: Vec<Slot<K>>,
    /// Events scheduled into the current bucket (or before it) while it is processed.
    heap: BinaryHeap<Reverse<Entry<K>>>,
    /// Fine buckets of the current window, at their index modulo `RING`.
    ring: Vec<Vec<Slot<K>>>,
    /// Events of later windows, by window.
    windows: Vec<Vec<Slot<K>>>,
    seq: u64,
}

impl<K: Copy> Calendar<K> {
    /// A calendar for events in `0..=end`; later ones are dropped (they would never run).
    pub(crate) fn new(end: Micros) -> Self {
        let width = (end / BUCKETS).max(1_000);
        let count = (end / width + 2) as usize;
        Self {
            width,
            end,
            current: 0,
            due: Vec::new(),
            head: 0,
            scratch: Vec::new(),
            heap: BinaryHeap::new(),
            ring: (0..RING).map(|_| Vec::new()).collect(),
            windows: (0..count.div_ceil(RING) + 1).map(|_| Vec::new()).collect(),
            seq: 0,
        }
    }

    /// Schedules `kind` at `at` (never before the last popped time).
    pub(crate) fn push(&mut self, at: Micros, kind: K) {
        if at > self.end {
            return;
        }
        let bucket = (at / self.width) as usize;
        if bucket <= self.current {
            self.seq += 1;
            let seq = self.seq;
            self.heap.push(Reverse(Entry { at, seq, kind }));
        } else if bucket / RING == self.current / RING {
            self.ring[bucket % RING].push(Slot { at, kind });
        } else {
            self.windows[bucket / RING].push(Slot { at, kind });
        }
    }

    /// The next event, if any.
    pub(crate) fn pop(&mut self) -> Option<(Micros, K)> {
        loop {
            let from_heap = match (self.due.get(self.head), self.heap.peek()) {
                // At equal times the bucket's events come first: they were scheduled
                // before anything in the heap.
                (Some(d), Some(Reverse(h))) => h.at < d.at,
                (None, Some(_)) => true,
                (Some(_), None) => false,
                (None, None) => {
                    self.advance()?;
                    continue;
                }
            };
            return if from_heap {
                self.heap.pop().map(|Reverse(e)| (e.at, e.kind))
            } else {
                self.head += 1;
                let e = self.due[self.head - 1];
                Some((e.at, e.kind))
            };
        }
    }

    /// Makes the next non-empty bucket current; None when none is left.
    fn advance(&mut self) -> Option<()> {
        loop {
            self.current += 1;
            if self.current % RING == 0 {
                // A new window: deal its events into the ring.
                let later = std::mem::take(self.windows.get_mut(self.current / RING)?);
                for e in later {
                    self.ring[(e.at / self.width) as usize % RING].push(e);
                }
            }
            let bucket = &mut self.ring[self.current % RING];
            if !bucket.is_empty() {
                // The drained run's allocation goes back to the ring for reuse.
                self.due.clear();
                self.head = 0;
                std::mem::swap(&mut self.due, bucket);
                self.sort_due();
                return Some(());
            }
        }
    }

    /// Sorts the bucket that came due by (time, scheduling order). A bucket's entries were
    /// appended in scheduling order (a window's list is dealt out before anything else is
    /// pushed into its buckets), so a stable sort by time suffices: an LSD radix sort on
    /// the offset within the bucket, a byte per pass.
    fn sort_due(&mut self) {
        if self.due.len() <= 32 {
            self.due.sort_by_key(|e| e.at);
            return;
        }
        let start = self.current as Micros * self.width;
        let bits = Micros::BITS - (self.width - 1).leading_zeros();
        let mut shift = 0;
        while shift < bits {
            let digit = |e: &Slot<K>| ((e.at - start) >> shift) as usize & 0xff;
            let mut counts = [0usize; 256];
            for e in &self.due {
                counts[digit(e)] += 1;
            }
            let mut sum = 0;
            for c in &mut counts {
                (*c, sum) = (sum, sum + *c);
            }
            self.scratch.clear();
            self.scratch.resize(self.due.len(), self.due[0]);
            for e in &self.due {
                let d = digit(e);
                self.scratch[counts[d]] = *e;
                counts[d] += 1;
            }
            std::mem::swap(&mut self.due, &mut self.scratch);
            shift += 8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_time_then_scheduling_order() {
        let mut q = Calendar::new(10_000_000);
        for (at, k) in [
            (5_000_000, 'c'),
            (3, 'a'),
            (5_000_000, 'd'),
            (2_000, 'b'),
            (20_000_000, 'x'),
        ] {
            q.push(at, k);
        }
        let (_, first) = q.pop().unwrap();
        assert_eq!(first, 'a');
        q.push(1_000, 'e'); // scheduled while running, still in order
        let rest: Vec<char> = std::iter::from_fn(|| q.pop().map(|(_, k)| k)).collect();
        assert_eq!(
            rest,
            ['e', 'b', 'c', 'd'],
            "events after the end are dropped"
        );
    }

    #[test]
    fn matches_a_sorted_reference_across_windows() {
        // A small deterministic generator: pushes at random distances (same bucket, same
        // window, later windows, past the end) interleaved with pops.
        let end = 60_000_000;
        let mut q = Calendar::new(end);
        let mut reference = std::collections::BTreeSet::new();
        let (mut x, mut seq, mut now) = (0x9e37_79b9_7f4a_7c15u64, 0u64, 0u64);
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for step in 0..20_000 {
            if step % 3 != 2 {
                // Bursts into one bucket exercise the radix sort.
                let span = [0, 500, 900, 20_000, 2_000_000, 70_000_000][(next() % 6) as usize];
                let at = now + next() % (span + 1);
                seq += 1;
                q.push(at, seq);
                if at <= end {
                    reference.insert((at, seq));
                }
            } else if let Some((at, k)) = q.pop() {
                assert_eq!(Some((at, k)), reference.pop_first());
                now = at;
            }
        }
        while let Some(e) = q.pop() {
            assert_eq!(Some(e), reference.pop_first());
        }
        assert!(reference.is_empty());
    }
}
