//! Bounded top-K counters and the per-dimension breakdowns built from them.
//!
//! Memory is bounded by construction: a counter tracks at most `cap`
//! distinct keys, and everything beyond lands in `other`, so a flood from a
//! million sources costs the same as one from a thousand.
use std::collections::HashMap;

use serde::Serialize;

/// Key of a breakdown row.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey {
    pub key: String,
    pub pid: Option<u32>,
    pub role: Option<&'static str>,
}

impl RowKey {
    pub fn plain(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            pid: None,
            role: None,
        }
    }
}

/// One row of a `by_*` list, as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    pub count: u64,
}

/// Name of the catch-all row.
pub const OTHER: &str = "other";

#[derive(Debug, Clone)]
pub struct TopK {
    counts: HashMap<RowKey, u64>,
    cap: usize,
    other: u64,
}

impl TopK {
    /// `cap` bounds the distinct keys kept while counting (not the output length).
    pub fn new(cap: usize) -> Self {
        Self {
            counts: HashMap::new(),
            cap: cap.max(1),
            other: 0,
        }
    }

    pub fn add(&mut self, key: RowKey, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(c) = self.counts.get_mut(&key) {
            *c += n;
        } else if self.counts.len() < self.cap {
            self.counts.insert(key, n);
        } else {
            self.other += n;
        }
    }

    /// Counts that did not fit the key budget (or were unattributable upstream).
    pub fn add_other(&mut self, n: u64) {
        self.other += n;
    }

    pub fn distinct(&self) -> usize {
        self.counts.len()
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum::<u64>() + self.other
    }

    /// The `k` largest rows, count descending (ties by key, so output is
    /// stable), with everything else folded into one `other` row placed by
    /// its count like any other row.
    pub fn top(&self, k: usize) -> Vec<Item> {
        let mut rows: Vec<(&RowKey, u64)> = self.counts.iter().map(|(k, v)| (k, *v)).collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let rest: u64 = rows.iter().skip(k).map(|r| r.1).sum::<u64>() + self.other;
        let mut out: Vec<Item> = rows
            .into_iter()
            .take(k)
            .map(|(k, v)| Item {
                key: k.key.clone(),
                pid: k.pid,
                role: k.role,
                count: v,
            })
            .collect();
        if rest > 0 {
            let pos = out.iter().position(|i| i.count < rest).unwrap_or(out.len());
            out.insert(
                pos,
                Item {
                    key: OTHER.into(),
                    pid: None,
                    role: None,
                    count: rest,
                },
            );
        }
        out
    }
}

/// The dimensions every view breaks counts down by.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Breakdown {
    pub total: u64,
    pub by_src_ip: Vec<Item>,
    pub by_dst_port: Vec<Item>,
    pub by_process: Vec<Item>,
    pub by_netns: Vec<Item>,
    pub by_cgroup: Vec<Item>,
}

/// Where one count goes in each dimension.
#[derive(Debug, Clone)]
pub struct Dims {
    pub src_ip: String,
    pub dst_port: String,
    pub process: RowKey,
    pub netns: String,
    pub cgroup: Option<String>,
}

#[derive(Debug, Clone)]
pub struct BreakdownBuilder {
    total: u64,
    src_ip: TopK,
    dst_port: TopK,
    process: TopK,
    netns: TopK,
    cgroup: TopK,
}

/// Distinct keys kept per dimension while counting.
pub const DEFAULT_KEY_BUDGET: usize = 4096;

impl Default for BreakdownBuilder {
    fn default() -> Self {
        Self::new(DEFAULT_KEY_BUDGET)
    }
}

impl BreakdownBuilder {
    pub fn new(cap: usize) -> Self {
        Self {
            total: 0,
            src_ip: TopK::new(cap),
            dst_port: TopK::new(cap),
            process: TopK::new(cap),
            netns: TopK::new(cap),
            cgroup: TopK::new(cap),
        }
    }

    pub fn add(&mut self, d: Dims, n: u64) {
        self.total += n;
        self.src_ip.add(RowKey::plain(d.src_ip), n);
        self.dst_port.add(RowKey::plain(d.dst_port), n);
        self.process.add(d.process, n);
        self.netns.add(RowKey::plain(d.netns), n);
        if let Some(c) = d.cgroup {
            self.cgroup.add(RowKey::plain(c), n);
        }
    }

    /// Counts known in total but not per key (in-kernel map overflow).
    pub fn add_unattributed(&mut self, n: u64) {
        self.total += n;
        self.src_ip.add_other(n);
        self.dst_port.add_other(n);
        self.process.add_other(n);
        self.netns.add_other(n);
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn finish(&self, k: usize) -> Breakdown {
        Breakdown {
            total: self.total,
            by_src_ip: self.src_ip.top(k),
            by_dst_port: self.dst_port.top(k),
            by_process: self.process.top(k),
            by_netns: self.netns.top(k),
            by_cgroup: self.cgroup.top(k),
        }
    }
}

/// Events per second over a sliding one-second bucket, for switching the
/// live stream to summaries when a flood would scroll the terminal away.
#[derive(Debug, Default)]
pub struct Rate {
    second: u64,
    count: u64,
}

impl Rate {
    /// Counts one event at `now_s`; returns the count within that second.
    pub fn tick(&mut self, now_s: u64) -> u64 {
        if now_s != self.second {
            self.second = now_s;
            self.count = 0;
        }
        self.count += 1;
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_descending_with_ties_by_key() {
        let mut t = TopK::new(10);
        t.add(RowKey::plain("b"), 5);
        t.add(RowKey::plain("a"), 5);
        t.add(RowKey::plain("c"), 9);
        let keys: Vec<_> = t.top(10).into_iter().map(|i| (i.key, i.count)).collect();
        assert_eq!(
            keys,
            vec![("c".into(), 9), ("a".into(), 5), ("b".into(), 5)]
        );
    }

    #[test]
    fn key_budget_bounds_memory_and_keeps_totals_exact() {
        let mut t = TopK::new(100);
        for i in 0..1_000_000u32 {
            t.add(
                RowKey::plain(format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)),
                1,
            );
        }
        assert_eq!(t.distinct(), 100, "a million sources must not grow the map");
        assert_eq!(t.total(), 1_000_000);
        let top = t.top(5);
        assert_eq!(top.iter().map(|i| i.count).sum::<u64>(), 1_000_000);
        assert_eq!(top[0].key, OTHER, "the rest outweighs every single key");
        assert_eq!(top.len(), 6);
    }

    #[test]
    fn other_row_sits_where_its_count_belongs() {
        let mut t = TopK::new(10);
        t.add(RowKey::plain("big"), 100);
        t.add(RowKey::plain("s1"), 2);
        t.add(RowKey::plain("s2"), 1);
        let top = t.top(1);
        assert_eq!(top[0].key, "big");
        assert_eq!((top[1].key.as_str(), top[1].count), (OTHER, 3));
        let counts: Vec<_> = top.iter().map(|i| i.count).collect();
        let mut sorted = counts.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        assert_eq!(counts, sorted);
    }

    #[test]
    fn breakdown_json_shape() {
        let mut b = BreakdownBuilder::new(16);
        b.add(
            Dims {
                src_ip: "198.18.0.2".into(),
                dst_port: "udp/5353".into(),
                process: RowKey {
                    key: "ctpeer".into(),
                    pid: Some(1234),
                    role: Some("listener"),
                },
                netns: "4026532177".into(),
                cgroup: None,
            },
            199,
        );
        let v = serde_json::to_value(b.finish(10)).unwrap();
        assert_eq!(v["total"], 199);
        assert_eq!(v["by_src_ip"][0]["key"], "198.18.0.2");
        assert_eq!(v["by_dst_port"][0]["key"], "udp/5353");
        assert_eq!(v["by_process"][0]["pid"], 1234);
        assert_eq!(v["by_process"][0]["role"], "listener");
        assert_eq!(v["by_netns"][0]["count"], 199);
        assert!(v["by_src_ip"][0].get("pid").is_none());
    }

    #[test]
    fn unattributed_counts_go_to_other_in_every_dimension() {
        let mut b = BreakdownBuilder::new(4);
        b.add_unattributed(7);
        let out = b.finish(10);
        assert_eq!(out.total, 7);
        assert_eq!(out.by_src_ip[0].key, OTHER);
        assert_eq!(out.by_netns[0].count, 7);
    }

    #[test]
    fn rate_resets_each_second() {
        let mut r = Rate::default();
        assert_eq!(r.tick(1), 1);
        assert_eq!(r.tick(1), 2);
        assert_eq!(r.tick(2), 1);
    }
}
