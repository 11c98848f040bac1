//! The event queue: a calendar of fixed-width time buckets in front of a small heap.
//!
//! Most scheduled events lie far ahead (every viewer's departure is scheduled on arrival),
//! so one binary heap would hold a million entries and miss the cache on every push and
//! pop. Here an event goes into its time bucket in O(1); only the bucket being processed
//! is a heap. Order is exact: by time, then by scheduling order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Microseconds of virtual time.
type Micros = u64;

/// Buckets per run: enough that a bucket holds a few milliseconds of events.
const BUCKETS: u64 = 200_000;

#[derive(Debug, Clone)]
struct Entry<K> {
    at: Micros,
    seq: u64,
    kind: K,
}

impl<K> PartialEq for Entry<K> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
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
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Events up to an end time, popped in (time, scheduling order).
#[derive(Debug, Clone)]
pub(crate) struct Calendar<K> {
    width: Micros,
    end: Micros,
    /// Index of the bucket the heap holds.
    current: usize,
    heap: BinaryHeap<Reverse<Entry<K>>>,
    buckets: Vec<Vec<Entry<K>>>,
    seq: u64,
}

impl<K> Calendar<K> {
    /// A calendar for events in `0..=end`; later ones are dropped (they would never run).
    pub(crate) fn new(end: Micros) -> Self {
        let width = (end / BUCKETS).max(1_000);
        let count = (end / width + 2) as usize;
        Self {
            width,
            end,
            current: 0,
            heap: BinaryHeap::new(),
            buckets: (0..count).map(|_| Vec::new()).collect(),
            seq: 0,
        }
    }

    /// Schedules `kind` at `at` (never before the last popped time).
    pub(crate) fn push(&mut self, at: Micros, kind: K) {
        if at > self.end {
            return;
        }
        self.seq += 1;
        let entry = Entry {
            at,
            seq: self.seq,
            kind,
        };
        let bucket = (at / self.width) as usize;
        if bucket <= self.current {
            self.heap.push(Reverse(entry));
        } else {
            self.buckets[bucket].push(entry);
        }
    }

    /// The next event, if any.
    pub(crate) fn pop(&mut self) -> Option<(Micros, K)> {
        loop {
            if let Some(Reverse(e)) = self.heap.pop() {
                return Some((e.at, e.kind));
            }
            self.current += 1;
            while self.buckets.get(self.current)?.is_empty() {
                self.current += 1;
            }
            let due = std::mem::take(&mut self.buckets[self.current]);
            self.heap.extend(due.into_iter().map(Reverse));
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
}
