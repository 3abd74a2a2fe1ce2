//! The one bounded counter of ctwatch: counts per key with a budget on
//! distinct keys, everything past it in `other`, so a flood from a million
//! sources costs the same memory as one from a thousand. Every ranked list
//! (report, snapshot, top, doctor, serve) counts through it.
use std::{collections::HashMap, hash::Hash, ops::AddAssign};

/// Name of the catch-all row.
pub(crate) const OTHER: &str = "other";

#[derive(Debug, Clone)]
pub(crate) struct TopK<K, V = u64> {
    counts: HashMap<K, V>,
    cap: usize,
    other: V,
}

impl<K: Hash + Eq, V: Default> TopK<K, V> {
    /// `cap` bounds the distinct keys kept while counting (not the output length).
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            counts: HashMap::new(),
            cap: cap.max(1),
            other: V::default(),
        }
    }
}

impl<K: Hash + Eq, V: Default + AddAssign + Copy> TopK<K, V> {
    pub(crate) fn add(&mut self, key: K, n: V) {
        if let Some(c) = self.counts.get_mut(&key) {
            *c += n;
        } else if self.counts.len() < self.cap {
            self.counts.insert(key, n);
        } else {
            self.other += n;
        }
    }

    /// Counts that did not fit the key budget (or were unattributable upstream).
    pub(crate) fn add_other(&mut self, n: V) {
        self.other += n;
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.counts.iter()
    }
}

impl<K: Hash + Eq + Ord> TopK<K, u64> {
    /// The largest key (ties by key order, so the answer is stable).
    pub(crate) fn leader(&self) -> Option<(&K, u64)> {
        self.counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
            .map(|(k, n)| (k, *n))
    }

    /// The `k` largest keys, count descending (ties by key, so output is
    /// stable), and the sum of everything else.
    pub(crate) fn ranked(&self, k: usize) -> (Vec<(&K, u64)>, u64) {
        let mut rows: Vec<(&K, u64)> = self.counts.iter().map(|(k, v)| (k, *v)).collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let rest: u64 = rows.iter().skip(k).map(|r| r.1).sum::<u64>() + self.other;
        rows.truncate(k);
        (rows, rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranked_descending_with_ties_by_key() {
        let mut t = TopK::new(10);
        t.add("b", 5);
        t.add("a", 5);
        t.add("c", 9);
        let (rows, rest) = t.ranked(10);
        assert_eq!(rows, vec![(&"c", 9), (&"a", 5), (&"b", 5)]);
        assert_eq!(rest, 0);
    }

    #[test]
    fn key_budget_bounds_memory_and_keeps_totals_exact() {
        let mut t = TopK::new(100);
        for i in 0..1_000_000u32 {
            t.add(i, 1);
        }
        assert_eq!(
            t.iter().count(),
            100,
            "a million sources must not grow the map"
        );
        let (rows, rest) = t.ranked(5);
        assert_eq!(rows.iter().map(|r| r.1).sum::<u64>() + rest, 1_000_000);
        assert_eq!(t.ranked(100).1, 1_000_000 - 100, "the rest is in other");
    }

    #[test]
    fn leader_is_stable_on_ties() {
        let mut t = TopK::new(10);
        t.add(2u8, 3);
        t.add(1u8, 3);
        assert_eq!(t.leader(), Some((&1, 3)));
    }
}
