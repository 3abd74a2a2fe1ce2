//! Who holds the table's slots: entries from before attach (seeded from one
//! ctnetlink dump per netns) plus the kernel's live per-key occupancy.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use conntrack_ebpf::AggKey;

use crate::{
    source::ctnetlink::{self, CtEntry},
    source::maps::{counts_since, KernelSource, SourceError},
    source::netns::{self, NetnsInfo},
    source::records::{self, AggRecord, FlowId, Kind, Role},
};

/// What an entry from before attach is counted under: the same parts of the
/// original-direction tuple the kernel keys frees of such entries by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeedKey {
    pub netns: u32,
    pub src: IpAddr,
    pub proto: u8,
    pub dport: u16,
}

impl SeedKey {
    pub fn of_record(r: &AggRecord) -> Self {
        SeedKey {
            netns: r.netns,
            src: r.src,
            proto: r.proto,
            dport: r.dport,
        }
    }
}

/// Entries held before attach, minus those freed since.
#[derive(Debug, Default, Clone)]
pub struct Seed {
    counts: HashMap<SeedKey, u64>,
}

impl Seed {
    /// Counts one dumped entry, unless the kernel already tracks it
    /// because it was created after attach.
    pub(crate) fn fold(&mut self, netns: u32, e: &CtEntry, exclude: &HashSet<FlowId>) {
        if exclude.contains(&FlowId::of_entry(netns, e)) {
            return;
        }
        *self
            .counts
            .entry(SeedKey {
                netns,
                src: e.src,
                proto: e.proto,
                dport: e.dport,
            })
            .or_default() += 1;
    }

    /// Counts every entry of these namespaces from one ctnetlink dump each,
    /// folded as the datagrams arrive (no dump is ever held whole), leaving
    /// out the flows in `exclude`. A namespace that cannot be dumped (it
    /// vanished, or conntrack is not loaded there) becomes a note.
    pub fn count(scope: &[NetnsInfo], exclude: &HashSet<FlowId>, notes: &mut Vec<String>) -> Self {
        let exclude = std::sync::Arc::new(exclude.clone());
        let mut seed = Seed::default();
        for ns in scope {
            let inum = ns.inum;
            let exclude = exclude.clone();
            let counted = netns::run_in(ns, move || {
                let mut part = Seed::default();
                ctnetlink::for_each(|e| part.fold(inum, &e, &exclude)).map(|()| part)
            });
            match counted {
                Ok(Ok(part)) => seed.counts.extend(part.counts),
                Ok(Err(e)) => notes.push(format!("netns {inum}: no ctnetlink dump: {e}")),
                Err(e) => notes.push(format!("netns {inum}: {e}")),
            }
        }
        seed
    }

    /// Subtracts frees of pre-existing entries reported by the kernel.
    pub fn apply_frees(&mut self, frees: impl IntoIterator<Item = (SeedKey, u64)>) {
        for (k, n) in frees {
            if let Some(c) = self.counts.get_mut(&k) {
                *c = c.saturating_sub(n);
            }
        }
        self.counts.retain(|_, c| *c > 0);
    }

    /// What remains, as records without hook context.
    pub fn records(&self) -> impl Iterator<Item = (AggRecord, u64)> + '_ {
        self.counts.iter().map(|(k, n)| {
            (
                AggRecord {
                    kind: Kind::New,
                    role: Role::Unknown,
                    netns: k.netns,
                    proto: k.proto,
                    src: k.src,
                    dport: k.dport,
                    tgid: 0,
                    comm: String::new(),
                    cgroup_id: 0,
                    sock_ino: 0,
                },
                *n,
            )
        })
    }
}

/// Entries held per key in the kernel-probe modes: a seed from one dump
/// per namespace right after attach, kept current by the kernel's frees of
/// those entries, plus the kernel's live occupancy of entries created
/// since. The one place `report`, `top` and `serve` get occupancy from.
#[derive(Debug, Default)]
pub struct Held {
    seed: Seed,
    /// Counts when seed frees were last applied.
    frees_applied: HashMap<AggKey, u64>,
}

impl Held {
    /// Call right after attach: counts the namespaces in scope, leaving out
    /// entries the kernel already tracks because they were created since.
    pub fn seed(
        source: &KernelSource,
        scope: &[NetnsInfo],
        notes: &mut Vec<String>,
    ) -> Result<Self, SourceError> {
        let known = source.live_flows();
        Self::from_seed(source, Seed::count(scope, &known, notes))
    }

    /// For callers that counted on another thread (`Seed::count` with
    /// `source.live_flows()` as the exclusion).
    pub fn from_seed(source: &KernelSource, seed: Seed) -> Result<Self, SourceError> {
        Ok(Held {
            seed,
            frees_applied: source.counts()?,
        })
    }

    /// Every key held now with its count, after applying the frees of
    /// pre-existing entries counted since the last call.
    pub fn now(
        &mut self,
        source: &KernelSource,
        counts_now: &HashMap<AggKey, u64>,
    ) -> Result<Vec<(AggRecord, u64)>, SourceError> {
        let frees = counts_since(counts_now, &self.frees_applied)
            .into_iter()
            .filter(|(k, _)| k.kind == conntrack_ebpf::kind::SEED_FREE)
            .filter_map(|(k, n)| Some((SeedKey::of_record(&records::decode_key(&k).ok()?), n)));
        self.seed.apply_frees(frees);
        self.frees_applied = counts_now.clone();
        let live = source.occupancy()?;
        Ok(self
            .seed
            .records()
            .chain(
                live.into_iter().filter_map(|(k, n)| {
                    Some((records::decode_key(&k).ok()?, u64::try_from(n).ok()?))
                }),
            )
            .collect())
    }
}

/// Entries held per key now, from one dump per namespace (tracepoint mode).
pub fn count_now(scope: &[NetnsInfo], notes: &mut Vec<String>) -> Vec<(AggRecord, u64)> {
    Seed::count(scope, &HashSet::new(), notes)
        .records()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(src: &str, sport: u16, dport: u16) -> CtEntry {
        CtEntry {
            family: 4,
            proto: 6,
            src: src.parse().unwrap(),
            dst: "198.18.0.1".parse().unwrap(),
            sport,
            dport,
            reply_src: "198.18.0.1".parse().unwrap(),
            reply_dst: src.parse().unwrap(),
            reply_sport: dport,
            reply_dport: sport,
            tcp_state: Some("ESTABLISHED".into()),
            status: 0,
            assured: true,
            timeout: Some(100),
            zone: 0,
        }
    }

    fn total(s: &Seed) -> u64 {
        s.records().map(|(_, n)| n).sum()
    }

    #[test]
    fn seed_counts_by_source_and_port_and_skips_known_flows() {
        let dump = vec![
            entry("198.18.0.2", 40000, 7400),
            entry("198.18.0.2", 40001, 7400),
            entry("198.18.0.3", 40000, 80),
        ];
        let known = HashSet::from([FlowId::of_entry(7, &dump[2])]);
        let mut seed = Seed::default();
        for e in &dump {
            seed.fold(7, e, &known);
        }
        assert_eq!(total(&seed), 2);
        let (rec, n) = seed.records().next().unwrap();
        assert_eq!(
            (rec.src.to_string(), rec.dport, n),
            ("198.18.0.2".into(), 7400, 2)
        );
        assert_eq!(rec.role, Role::Unknown);
    }

    #[test]
    fn frees_bring_the_seed_down_and_never_below_zero() {
        let dump = vec![entry("198.18.0.2", 1, 7400), entry("198.18.0.2", 2, 7400)];
        let mut seed = Seed::default();
        for e in &dump {
            seed.fold(7, e, &HashSet::new());
        }
        let key = SeedKey {
            netns: 7,
            src: "198.18.0.2".parse().unwrap(),
            proto: 6,
            dport: 7400,
        };
        seed.apply_frees([(key.clone(), 1)]);
        assert_eq!(total(&seed), 1);
        seed.apply_frees([(key, 5)]);
        assert_eq!(total(&seed), 0);
    }
}
