//! Node sets grouped by `(depth, class)`, with O(1) insert and remove.
//!
//! The relay tree asks "shallowest node with the most spare slots" and "deepest leaf of at
//! least this capacity" on every join and leave. Ordered trees answer that in O(log N),
//! but at 10^6 peers each descent is a handful of cache misses. Depths and capacity
//! classes are small, so a grid of vectors answers with a short scan over contiguous
//! counters instead, and members remember their position for swap-removal.

/// Capacity and spare values are grouped into classes `0..CLASSES`; the last class holds
/// every value at or above `CLASSES - 1` (callers check exact values where that matters).
pub(crate) const CLASSES: usize = 17;

/// Class of a capacity or spare-slot count.
pub(crate) fn class_of(value: u32) -> usize {
    (value as usize).min(CLASSES - 1)
}

/// Where a member sits, so it can be removed in O(1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) depth: u32,
    pub(crate) class: u8,
    pos: u32,
}

/// A set of node indices grouped by `(depth, class)`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Buckets {
    /// `lists[depth * CLASSES + class]` holds the members of that cell.
    lists: Vec<Vec<u32>>,
    /// Members per depth, to skip empty depths without touching the cells.
    per_depth: Vec<u32>,
    len: usize,
}

impl Buckets {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Depths that may hold members: `0..depth_bound()`.
    pub(crate) fn depth_bound(&self) -> u32 {
        self.per_depth.len() as u32
    }

    /// Adds `node` to cell `(depth, class)`; returns where it went.
    pub(crate) fn insert(&mut self, depth: u32, class: usize, node: u32) -> Slot {
        let d = depth as usize;
        if d >= self.per_depth.len() {
            self.per_depth.resize(d + 1, 0);
            self.lists.resize_with((d + 1) * CLASSES, Vec::new);
        }
        let list = &mut self.lists[d * CLASSES + class];
        list.push(node);
        self.per_depth[d] += 1;
        self.len += 1;
        Slot {
            depth,
            class: class as u8,
            pos: (list.len() - 1) as u32,
        }
    }

    /// Removes the member at `slot`. Returns the member that moved into its position (its
    /// slot is now `slot`), which the caller must record.
    pub(crate) fn remove(&mut self, slot: Slot) -> Option<u32> {
        let d = slot.depth as usize;
        let list = &mut self.lists[d * CLASSES + slot.class as usize];
        list.swap_remove(slot.pos as usize);
        self.per_depth[d] -= 1;
        self.len -= 1;
        list.get(slot.pos as usize).copied()
    }

    /// Members of one cell, oldest first.
    pub(crate) fn cell(&self, depth: u32, class: usize) -> &[u32] {
        self.lists
            .get(depth as usize * CLASSES + class)
            .map_or(&[], Vec::as_slice)
    }

    /// Whether any member sits at `depth`.
    pub(crate) fn has_depth(&self, depth: u32) -> bool {
        self.per_depth.get(depth as usize).is_some_and(|&n| n > 0)
    }

    /// The shallowest depth with members.
    pub(crate) fn min_depth(&self) -> Option<u32> {
        self.per_depth.iter().position(|&n| n > 0).map(|d| d as u32)
    }

    /// Every member with its cell, for consistency checks.
    pub(crate) fn members(&self) -> impl Iterator<Item = (u32, usize, u32)> + '_ {
        self.lists.iter().enumerate().flat_map(|(i, list)| {
            let (depth, class) = ((i / CLASSES) as u32, i % CLASSES);
            list.iter().map(move |&n| (depth, class, n))
        })
    }

    /// The slot `node` occupies, if its recorded slot is right (for consistency checks).
    pub(crate) fn verify(&self, slot: Slot, node: u32) -> bool {
        self.cell(slot.depth, slot.class as usize)
            .get(slot.pos as usize)
            .is_some_and(|&n| n == node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_reports_the_member_that_moved() {
        let mut b = Buckets::default();
        let a = b.insert(2, 3, 10);
        let _ = b.insert(2, 3, 11);
        let c = b.insert(2, 3, 12);
        assert_eq!(b.min_depth(), Some(2));
        assert_eq!(b.remove(a), Some(12), "the last member fills the hole");
        assert!(b.verify(a, 12), "12 now sits where 10 was");
        assert!(!b.verify(c, 12));
        assert_eq!(b.cell(2, 3), &[12, 11]);
        assert_eq!(b.len(), 2);
        assert_eq!(class_of(1_000), CLASSES - 1);
    }
}
