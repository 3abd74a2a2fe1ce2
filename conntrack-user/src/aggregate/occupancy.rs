//! Who holds the table's slots: entries from before attach (seeded from one
//! ctnetlink dump per netns) plus the kernel's live per-key occupancy; in
//! tracepoint mode, ctnetlink dumps paced to a CPU budget.
use std::{
    collections::{hash_map, HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{
    source::ctnetlink::{self, CtEntry},
    source::maps::{KernelSource, SourceError},
    source::netns::NetnsInfo,
    source::records::{self, AggRecord, FlowId, Kind, Role},
};

/// What an entry from before attach is counted under: the same parts of the
/// original-direction tuple the kernel keys frees of such entries by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeedKey {
    pub netns: u32,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub dport: u16,
}

impl SeedKey {
    pub fn of_record(r: &AggRecord) -> Self {
        SeedKey {
            netns: r.netns,
            src: r.src,
            dst: r.dst,
            proto: r.proto,
            dport: r.dport,
        }
    }
}

/// Entries under one key, and the source port of one of them (to find the
/// socket of the flow's origin).
#[derive(Debug, Default, Clone, Copy)]
struct Held1 {
    n: u64,
    sport: u16,
}

/// Where a destination is translated to, learned from entries whose reply
/// tuple answers from elsewhere: (netns, proto, address, port) before NAT
/// to (address, port) after.
pub(crate) type NatSeen = HashMap<(u32, u8, IpAddr, u16), (IpAddr, u16)>;

/// Translations remembered per dump: services, not flows, so a few.
const NAT_PER_DUMP: usize = 4096;

/// Distinct keys a count of held entries keeps; entries past them are
/// counted, not keyed, and show as "other". A table filled from a million
/// spoofed sources then costs what one filled from a few thousand does:
/// every key is named at every refresh, as in the sampler's ledger.
const HELD_KEYS: usize = 16384;

/// Entries held, as read: per key, with the source port of one of them,
/// and those past the key budget.
#[derive(Debug, Clone, Default)]
pub(crate) struct HeldCounts {
    pub(crate) keyed: Vec<(AggRecord, u64, u16)>,
    pub(crate) unkeyed: u64,
}

/// Entries held before attach, minus those freed since.
#[derive(Debug, Default, Clone)]
pub struct Seed {
    counts: HashMap<SeedKey, Held1>,
    /// Entries past [`HELD_KEYS`].
    unkeyed: u64,
    pub(crate) nat: NatSeen,
}

impl Seed {
    /// Counts one dumped entry, unless the kernel already tracks it
    /// because it was created after attach.
    pub(crate) fn fold(&mut self, netns: u32, e: &CtEntry, exclude: &HashSet<FlowId>) {
        if (e.reply_src, e.reply_sport) != (e.dst, e.dport) && self.nat.len() < NAT_PER_DUMP {
            self.nat.insert(
                (netns, e.proto, e.dst, e.dport),
                (e.reply_src, e.reply_sport),
            );
        }
        if !exclude.is_empty() && exclude.contains(&FlowId::of_entry(netns, e)) {
            return;
        }
        let full = self.counts.len() >= HELD_KEYS;
        let key = SeedKey {
            netns,
            src: e.src,
            dst: e.dst,
            proto: e.proto,
            dport: e.dport,
        };
        match self.counts.entry(key) {
            hash_map::Entry::Occupied(mut h) => {
                let h = h.get_mut();
                h.n += 1;
                h.sport = e.sport;
            }
            hash_map::Entry::Vacant(v) if !full => {
                v.insert(Held1 {
                    n: 1,
                    sport: e.sport,
                });
            }
            hash_map::Entry::Vacant(_) => self.unkeyed += 1,
        }
    }

    /// Counts every entry of these namespaces from one ctnetlink dump each,
    /// folded as the datagrams arrive (no dump is ever held whole), leaving
    /// out the flows in `exclude`; and the CPU time the dumps took. A
    /// namespace that cannot be dumped (it vanished, or conntrack is not
    /// loaded there) becomes a note.
    pub fn count(
        scope: &[NetnsInfo],
        exclude: &HashSet<FlowId>,
        notes: &mut Vec<String>,
    ) -> (Self, Duration) {
        let mut seed = Seed::default();
        let mut cpu = Duration::ZERO;
        for ns in scope {
            let inum = ns.inum;
            match ctnetlink::for_each_in(ns, |e| seed.fold(inum, e, exclude)) {
                Ok(spent) => cpu += spent,
                Err(e) => notes.push(format!("netns {inum}: no ctnetlink dump: {e}")),
            }
        }
        (seed, cpu)
    }

    /// Subtracts frees of pre-existing entries reported by the kernel. A
    /// key the seed does not hold is taken for one of those past the key
    /// budget, while there are any.
    pub fn apply_frees(&mut self, frees: impl IntoIterator<Item = (SeedKey, u64)>) {
        for (k, n) in frees {
            match self.counts.get_mut(&k) {
                Some(c) => c.n = c.n.saturating_sub(n),
                None => self.unkeyed = self.unkeyed.saturating_sub(n),
            }
        }
        self.counts.retain(|_, c| c.n > 0);
    }

    /// What remains, as records without hook context: each with its count
    /// and the source port of one of its entries.
    pub fn records(&self) -> impl Iterator<Item = (AggRecord, u64, u16)> + '_ {
        self.counts.iter().map(|(k, h)| {
            (
                AggRecord {
                    kind: Kind::New,
                    role: Role::Unknown,
                    netns: k.netns,
                    proto: k.proto,
                    src: k.src,
                    dst: k.dst,
                    dport: k.dport,
                    tgid: 0,
                    comm: String::new(),
                    cgroup_id: 0,
                    sock_ino: 0,
                },
                h.n,
                h.sport,
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
}

impl Held {
    /// Call right after attach: counts the namespaces in scope, leaving out
    /// entries the kernel already tracks because they were created since.
    pub fn seed(source: &KernelSource, scope: &[NetnsInfo], notes: &mut Vec<String>) -> Self {
        let known = source.live_flows();
        Held {
            seed: Seed::count(scope, &known, notes).0,
        }
    }

    /// Every key held now with its count, and the entries past the key
    /// budget, after applying the frees of pre-existing entries counted
    /// since the last call.
    pub(crate) fn now(
        &mut self,
        source: &KernelSource,
        seed_frees: impl IntoIterator<Item = (AggRecord, u64)>,
    ) -> Result<HeldCounts, SourceError> {
        self.seed.apply_frees(
            seed_frees
                .into_iter()
                .map(|(r, n)| (SeedKey::of_record(&r), n)),
        );
        let live = source.occupancy()?;
        Ok(HeldCounts {
            keyed: self
                .seed
                .records()
                .chain(live.into_iter().filter_map(|(k, n)| {
                    Some((records::decode_key(&k).ok()?, u64::try_from(n).ok()?, 0))
                }))
                .collect(),
            unkeyed: self.seed.unkeyed,
        })
    }

    /// Translations seen in the seed dump.
    pub(crate) fn nat(&self) -> &NatSeen {
        &self.seed.nat
    }
}

/// Entries held per key now, from one dump per namespace (tracepoint
/// mode), the translations seen on the way, and the dumps' CPU time.
pub(crate) fn count_now(
    scope: &[NetnsInfo],
    notes: &mut Vec<String>,
) -> (HeldCounts, NatSeen, Duration) {
    let (seed, cpu) = Seed::count(scope, &HashSet::new(), notes);
    let held = HeldCounts {
        keyed: seed.records().collect(),
        unkeyed: seed.unkeyed,
    };
    (held, seed.nat, cpu)
}

/// The share of one core that tracepoint-mode dumps may take on average.
/// A dump costs in proportion to the table, not to its churn: about 1.2 µs
/// of CPU per entry here, four fifths of it the kernel's walk. 1 M entries
/// then refresh about once a minute, so no one-minute window holds much
/// more than one dump (2 % of a core) and `serve` or `top` stay well under
/// 5 % with their own work; a table of a few thousand entries still
/// refreshes at every allowed period. docs/occupancy.md has the figures.
pub(crate) const DUMP_BUDGET: f64 = 0.02;

/// When the next round of dumps may start: each round waits its
/// predecessor's CPU time divided by [`DUMP_BUDGET`] after that one began,
/// and never less than the period the command asked for.
#[derive(Debug)]
pub(crate) struct Pacer {
    period: Duration,
    spacing: Duration,
    last: Option<Instant>,
}

impl Pacer {
    pub(crate) fn new(period: Duration) -> Self {
        Pacer {
            period,
            spacing: period,
            last: None,
        }
    }

    pub(crate) fn due(&self) -> bool {
        self.last.is_none_or(|t| t.elapsed() >= self.spacing)
    }

    pub(crate) fn started(&mut self) {
        self.last = Some(Instant::now());
    }

    /// The round that began last took `cpu`.
    pub(crate) fn finished(&mut self, cpu: Duration) {
        self.spacing = self.period.max(cpu.div_f64(DUMP_BUDGET));
    }

    /// How far apart rounds start now.
    pub(crate) fn spacing(&self) -> Duration {
        self.spacing
    }
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
            tcp_state: Some(crate::source::ctnetlink::TcpState(3)),
            status: 0,
            assured: true,
            timeout: Some(100),
            zone: 0,
        }
    }

    fn total(s: &Seed) -> u64 {
        s.records().map(|(_, n, _)| n).sum()
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
        let (rec, n, sport) = seed.records().next().unwrap();
        assert_eq!(
            (rec.src.to_string(), rec.dport, n),
            ("198.18.0.2".into(), 7400, 2)
        );
        assert_eq!(rec.role, Role::Unknown);
        assert!(sport == 40000 || sport == 40001, "{sport}");
        assert!(seed.nat.is_empty(), "no entry here was translated");
    }

    #[test]
    fn keys_past_the_budget_are_counted_not_kept() {
        let mut seed = Seed::default();
        let none = HashSet::new();
        for i in 0..HELD_KEYS as u32 + 10 {
            let src = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            seed.fold(7, &entry(&src, 40000, 443), &none);
        }
        // A key already kept still counts under its own name.
        seed.fold(7, &entry("10.0.0.0", 40001, 443), &none);
        assert_eq!(seed.records().count(), HELD_KEYS);
        assert_eq!((total(&seed), seed.unkeyed), (HELD_KEYS as u64 + 1, 10));

        // A free of a key the seed does not hold was one of the others.
        let gone = entry("10.255.0.0", 1, 443);
        let key = SeedKey {
            netns: 7,
            src: gone.src,
            dst: gone.dst,
            proto: gone.proto,
            dport: gone.dport,
        };
        seed.apply_frees([(key, 4)]);
        assert_eq!(seed.unkeyed, 6);
    }

    #[test]
    fn translated_entries_teach_the_backend() {
        let mut e = entry("198.18.0.2", 40000, 8080);
        e.reply_src = "198.18.1.9".parse().unwrap();
        e.reply_sport = 80;
        let mut seed = Seed::default();
        seed.fold(7, &e, &HashSet::new());
        let pre = (7, 6, "198.18.0.1".parse().unwrap(), 8080);
        assert_eq!(
            seed.nat.get(&pre),
            Some(&("198.18.1.9".parse().unwrap(), 80))
        );
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
            dst: "198.18.0.1".parse().unwrap(),
            proto: 6,
            dport: 7400,
        };
        seed.apply_frees([(key.clone(), 1)]);
        assert_eq!(total(&seed), 1);
        seed.apply_frees([(key, 5)]);
        assert_eq!(total(&seed), 0);
    }
}
