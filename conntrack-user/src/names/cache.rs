//! The one cache policy of the names stage. A name is trusted for [`TTL`],
//! so a long-running `serve` or `top` follows a port that changes hands,
//! and at most [`CAP`] names are kept, so a flood from a million sources
//! costs a bounded amount of memory.
use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, Instant},
};

pub(crate) const TTL: Duration = Duration::from_secs(30);
pub(crate) const CAP: usize = 65536;

#[derive(Debug)]
pub(crate) struct Cache<K, V> {
    entries: HashMap<K, (V, Instant)>,
    /// When a full cache last looked for expired names to drop.
    swept: Option<Instant>,
}

impl<K, V> Default for Cache<K, V> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            swept: None,
        }
    }
}

impl<K: Hash + Eq, V> Cache<K, V> {
    /// A name resolved less than [`TTL`] ago.
    pub(crate) fn fresh(&self, k: &K) -> Option<&V> {
        self.entries
            .get(k)
            .filter(|(_, at)| at.elapsed() < TTL)
            .map(|(v, _)| v)
    }

    /// A name however old: what a key was called before it went away.
    pub(crate) fn stale(&self, k: &K) -> Option<&V> {
        self.entries.get(k).map(|(v, _)| v)
    }

    /// Remembers `v`; when full, expired names make room first, and if
    /// none has expired the new one is not kept (it is resolved again).
    pub(crate) fn put(&mut self, k: K, v: V) {
        if self.entries.len() >= CAP && !self.entries.contains_key(&k) {
            // A sweep walks every entry: at most once per TTL, or a flood of
            // new keys into a full cache would walk it once per key.
            if self.swept.is_some_and(|t| t.elapsed() < TTL) {
                return;
            }
            self.swept = Some(Instant::now());
            self.entries.retain(|_, (_, at)| at.elapsed() < TTL);
            if self.entries.len() >= CAP {
                return;
            }
        }
        self.entries.insert(k, (v, Instant::now()));
    }

    /// The cached value, or `resolve`'s, remembered either way.
    pub(crate) fn get_or(&mut self, k: K, resolve: impl FnOnce() -> V) -> V
    where
        K: Clone,
        V: Clone,
    {
        if let Some(v) = self.fresh(&k) {
            return v.clone();
        }
        let v = resolve();
        self.put(k, v.clone());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_cache_keeps_what_it_has_and_still_answers() {
        let mut c = Cache::default();
        for i in 0..CAP as u64 + 10 {
            c.put(i, i);
        }
        assert_eq!(c.entries.len(), CAP);
        assert_eq!(
            c.get_or(u64::MAX, || 7),
            7,
            "a miss past the cap still resolves"
        );
        assert_eq!(c.entries.len(), CAP);
    }

    #[test]
    fn stale_names_outlive_their_ttl() {
        let mut c = Cache::default();
        c.entries.insert(1u32, ("gone", Instant::now() - TTL * 2));
        assert_eq!(c.fresh(&1), None);
        assert_eq!(c.stale(&1), Some(&"gone"));
    }
}
