//! The streams in flight on one connection, by id.
//!
//! Stream ids rise by 2, and answers come mostly in the order the streams
//! opened, so a stream's slot is found by arithmetic: a ring indexed by
//! `(id - base) / 2` holds each stream's key in a slab of their states.
//! Adding, finding and removing a stream is a few array reads, with no
//! hashing and no allocation once warm. A map ordered by id did the same
//! job, but with a thousand streams in flight (an Apple round trip of tens of
//! milliseconds) each answer moved its neighbours' state within the tree's
//! nodes, about a kilobyte per stream.
//!
//! A stream left unanswered at the front holds the ring open behind it, 4
//! bytes per stream opened since, until it ends; the request timeout bounds
//! how long that is.

use std::collections::VecDeque;

use slab::Slab;

/// A ring slot whose stream has ended.
const VACANT: u32 = u32::MAX;

pub struct InFlight<T> {
    /// The id of `ring[0]`.
    base: u32,
    /// Slab keys by `(id - base) / 2`; never starts with a vacant slot.
    ring: VecDeque<u32>,
    slab: Slab<T>,
}

impl<T> Default for InFlight<T> {
    fn default() -> Self {
        InFlight {
            base: 0,
            ring: VecDeque::new(),
            slab: Slab::new(),
        }
    }
}

impl<T> InFlight<T> {
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Adds stream `id`, which must be 2 above the last one added (the
    /// connection numbers its own streams).
    pub fn insert(&mut self, id: u32, value: T) {
        if self.ring.is_empty() {
            self.base = id;
        }
        debug_assert_eq!(
            id,
            self.base + 2 * self.ring.len() as u32,
            "stream ids rise by 2 from the first in flight"
        );
        let key = self.slab.insert(value);
        self.ring.push_back(key as u32);
    }

    pub fn contains(&self, id: u32) -> bool {
        self.key(id).is_some()
    }

    pub fn get(&self, id: u32) -> Option<&T> {
        self.key(id).and_then(|k| self.slab.get(k))
    }

    pub fn get_mut(&mut self, id: u32) -> Option<&mut T> {
        self.key(id).and_then(|k| self.slab.get_mut(k))
    }

    pub fn remove(&mut self, id: u32) -> Option<T> {
        let slot = self.slot(id)?;
        let key = std::mem::replace(&mut self.ring[slot], VACANT);
        if key == VACANT {
            return None;
        }
        // Streams that ended at the front let the ring start later.
        while self.ring.front() == Some(&VACANT) {
            self.ring.pop_front();
            self.base = self.base.wrapping_add(2);
        }
        self.slab.try_remove(key as usize)
    }

    /// The ids in flight, lowest first.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        let base = self.base;
        self.ring
            .iter()
            .enumerate()
            .filter(|(_, &k)| k != VACANT)
            .map(move |(i, _)| base + 2 * i as u32)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.slab.iter_mut().map(|(_, v)| v)
    }

    fn slot(&self, id: u32) -> Option<usize> {
        let offset = id.checked_sub(self.base)?;
        if offset % 2 != 0 {
            return None;
        }
        let slot = (offset / 2) as usize;
        (slot < self.ring.len()).then_some(slot)
    }

    fn key(&self, id: u32) -> Option<usize> {
        let key = self.ring[self.slot(id)?];
        (key != VACANT).then_some(key as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn finds_streams_by_id_and_forgets_ended_ones() {
        let mut s = InFlight::default();
        assert!(s.is_empty() && s.get(1).is_none());
        for id in [1, 3, 5, 7] {
            s.insert(id, id * 10);
        }
        assert_eq!(
            (s.len(), s.get(5), s.get(4), s.get(9)),
            (4, Some(&50), None, None)
        );
        // Out of order: the ring keeps its start until the first ends.
        assert_eq!(s.remove(5), Some(50));
        assert_eq!(s.remove(5), None, "removed once");
        assert_eq!(s.ids().collect::<Vec<_>>(), [1, 3, 7]);
        assert_eq!(s.remove(1), Some(10));
        assert_eq!(s.remove(3), Some(30));
        assert_eq!((s.base, s.ring.len()), (7, 1), "the front skipped 5 too");
        *s.get_mut(7).unwrap() += 1;
        assert_eq!(s.remove(7), Some(71));
        assert!(s.is_empty() && s.ring.is_empty());
        // Empty again: the next stream starts the ring afresh.
        s.insert(9, 90);
        assert_eq!((s.get(7), s.get(9)), (None, Some(&90)));
        assert!(s.get(0).is_none() && s.get(u32::MAX).is_none());
    }

    #[test]
    fn slots_are_reused() {
        let mut s = InFlight::default();
        s.insert(1, 0);
        let capacity = (s.slab.capacity(), s.ring.capacity());
        assert_eq!(s.remove(1), Some(0));
        for round in 1..1000u32 {
            let id = 1 + 2 * round;
            s.insert(id, round);
            assert_eq!(s.remove(id), Some(round));
        }
        assert_eq!((s.slab.capacity(), s.ring.capacity()), capacity);
    }

    proptest! {
        /// Against an ordered map: any order of answers, any interleaving
        /// with new streams.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((any::<bool>(), 0usize..64), 1..400)) {
            let mut s = InFlight::default();
            let mut model = BTreeMap::new();
            let mut next = 1u32;
            for (open, pick) in ops {
                if open || model.is_empty() {
                    s.insert(next, next);
                    model.insert(next, next);
                    next += 2;
                } else {
                    let id = *model.keys().nth(pick % model.len()).unwrap();
                    prop_assert_eq!(s.remove(id), model.remove(&id));
                    prop_assert_eq!(s.remove(id), None);
                }
                prop_assert_eq!(s.len(), model.len());
                prop_assert!(s.ids().eq(model.keys().copied()));
                prop_assert!(s.ring.front() != Some(&VACANT));
                for id in 0..next + 2 {
                    prop_assert_eq!(s.get(id), model.get(&id));
                }
            }
        }
    }
}
