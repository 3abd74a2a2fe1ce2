//! The Sampler: turns the kernel's state into one typed [`Sample`] per
//! refresh. Every command reads the kernel through it: `report` takes one
//! Sample over its window, `top` one a second, `serve` one per refresh,
//! `doctor` a series of them.
use std::{
    collections::{BTreeMap, HashMap},
    sync::mpsc,
    time::{Duration, Instant},
};

use conntrack_ebpf::{stat, AggKey, AggValue};

use super::{
    occupancy::{self, NatSeen},
    reconcile::{self, NetnsRow, NetnsSnapshot},
};
use crate::{
    names::resolver::{Flow, Process},
    session::{Session, SessionError},
    source::{
        maps::{Drained, KernelStats, RETURN_PROBES},
        netns::NetnsInfo,
        records::{self, AggRecord, FlowRecord, Kind},
    },
};

/// When the tracepoint mode dumps the table for occupancy (the
/// kernel-probe modes track it live and need no dumps).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dumps {
    /// Not needed by the command.
    Never,
    /// One dump per sample, before it returns.
    EachSample,
    /// On a thread of its own, at most one round per period, and further
    /// apart as tables grow, so that the dumps stay under
    /// [`occupancy::DUMP_BUDGET`] of a core; a sample carries the latest
    /// finished round, stamped with when it began.
    Background(Duration),
}

/// One key's count since the sampler started and since the last sample.
#[derive(Debug, Clone)]
pub(crate) struct Count {
    pub(crate) flow: Flow,
    pub(crate) total: u64,
    pub(crate) fresh: u64,
}

/// Distinct keys the ledger keeps; counts of keys past it are only in the
/// kernel's totals, and so under "other". Every kept key is named and
/// carried in each sample: this bounds ctwatch's memory under a flood from
/// a million sources, far above what any top-K list shows.
const LEDGER_KEYS: usize = 16384;

/// One key's counts in the ledger.
#[derive(Debug, Clone, Copy, Default)]
struct Counted {
    /// Drained: final.
    settled: u64,
    /// `settled` plus what the map just left holds, at the last sample.
    shown: u64,
    sport: u16,
}

/// One key at one sample.
#[derive(Debug, Clone, Copy)]
struct Tallied {
    total: u64,
    fresh: u64,
    sport: u16,
}

/// Per-key counts since the sampler started, from the kernel's drained
/// count maps: the kernel keeps one refresh of keys, the ledger the rest.
#[derive(Debug, Default)]
struct Ledger {
    keys: HashMap<AggKey, Counted>,
    /// Settled counts of keys past the budget.
    spilled: Spilled,
}

/// Counts past a key budget, per (namespace, kind).
type Spilled = HashMap<(u32, u8), u64>;

impl Ledger {
    /// Folds one drain in; every key with its total and its growth since
    /// the previous sample.
    /// Also returns the counts past the budget per (namespace, kind), so
    /// every namespace's total stays exact.
    fn update(&mut self, d: Drained) -> (Vec<(AggKey, Tallied)>, Spilled) {
        let mut pending: HashMap<AggKey, AggValue> = HashMap::new();
        for (k, v) in d.pending {
            pending.insert(k, v);
        }
        for (k, v) in d.settled {
            match self.entry(k) {
                Some(c) => {
                    c.settled += v.count;
                    c.sport = v.sport;
                }
                None => *self.spilled.entry((k.netns, k.kind)).or_default() += v.count,
            }
        }
        let mut spilled = self.spilled.clone();
        for (k, v) in &pending {
            match self.entry(*k) {
                Some(c) => c.sport = v.sport,
                None => *spilled.entry((k.netns, k.kind)).or_default() += v.count,
            }
        }
        let mut out = Vec::with_capacity(self.keys.len());
        for (k, c) in self.keys.iter_mut() {
            let total = c.settled + pending.get(k).map_or(0, |v| v.count);
            let fresh = total.saturating_sub(c.shown);
            c.shown = total;
            out.push((
                *k,
                Tallied {
                    total,
                    fresh,
                    sport: c.sport,
                },
            ));
        }
        (out, spilled)
    }

    fn entry(&mut self, k: AggKey) -> Option<&mut Counted> {
        if self.keys.len() >= LEDGER_KEYS && !self.keys.contains_key(&k) {
            return None;
        }
        Some(self.keys.entry(k).or_default())
    }
}

/// Who holds the table's slots at one instant.
#[derive(Debug, Clone)]
pub(crate) struct Occupancy {
    /// When the counts were taken, since the sampler started.
    pub(crate) at: Duration,
    /// How the counts were taken.
    pub(crate) source: &'static str,
    /// Background dumps: how far apart they start now.
    pub(crate) every: Option<Duration>,
    pub(crate) entries: Vec<(Flow, u64)>,
    /// Entries past the key budget: counted under "other".
    pub(crate) unkeyed: u64,
}

/// The kernel's state at one refresh, named and counted.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    /// The records that were queued on the ring buffer, named: the live
    /// streams print them, where a second drain would lose them.
    pub(crate) queued: Vec<(FlowRecord, Process)>,
    /// Since the sampler started.
    pub(crate) elapsed: Duration,
    /// Namespaces in scope, those with drops since start, and those that
    /// vanished since the previous sample (once).
    pub(crate) netns: Vec<NetnsRow>,
    /// Victims: table-full drops per key, in scope.
    pub(crate) victims: Vec<Count>,
    /// Table-full drops known only as a total (over the in-kernel key
    /// budget, or unreadable), since start.
    pub(crate) unattributed: u64,
    /// Culprits, kernel-probe modes: entries created per key.
    pub(crate) created: Vec<Count>,
    pub(crate) evicted: Vec<Count>,
    pub(crate) clashed: Vec<Count>,
    /// Culprits: entries held per key, when known.
    pub(crate) held: Option<Occupancy>,
    /// The programs' own counters since start.
    pub(crate) stats: KernelStats,
    /// Ring-buffer records lost or refused by the decoder, since start.
    pub(crate) lost_events: u64,
    /// What could not be read this time (a namespace, a dump).
    pub(crate) problems: Vec<String>,
    pub(crate) sees_entries: bool,
    pub(crate) narrowed: bool,
    /// Whether `stats`' skipped runs are all of them (see `Loaded`).
    pub(crate) skips_counted: bool,
}

/// One sentence per kernel function whose kretprobe missed returns, and
/// one for program runs the kernel skipped: what each may have taken out
/// of the counts.
fn unseen_calls(stats: &KernelStats) -> Vec<String> {
    // In `RETURN_PROBES`' order.
    let what = [
        "entries created that new entries, inserts and occupancy do not count",
        "table-full drops among them are missing from the drop counts",
        "clashes among them are missing from the clash counts",
    ];
    RETURN_PROBES
        .iter()
        .zip(what)
        .filter_map(|(&(idx, function), what)| {
        let n = stats.get(idx);
        (n > 0).then(|| {
            format!("missed returns of {function}: {n} (kretprobe instances exhausted); {what}")
        })
    })
    .chain((stats.get(stat::RUNS_SKIPPED) > 0).then(|| {
        format!(
            "program runs the kernel skipped: {} (a BPF program was already running on that CPU; `bpftool prog show` names which); drops, new entries and frees among them are missing from the counts",
            stats.get(stat::RUNS_SKIPPED)
        )
    }))
    .collect()
}

impl Sample {
    /// Evictions since start (kernel-probe modes): the kernel-side counter,
    /// host-wide, unless `--netns` narrows the scope: then the evicted keys
    /// of the namespaces in it.
    pub(crate) fn evictions(&self) -> u64 {
        self.host_or_scoped(stat::EVICTIONS, &self.evicted)
    }

    /// Runs of ctwatch's programs the kernel skipped since start, where it
    /// counts them all (see `Loaded::skips_counted`).
    pub(crate) fn runs_skipped(&self) -> Option<u64> {
        self.skips_counted
            .then(|| self.stats.get(stat::RUNS_SKIPPED))
    }

    /// Insert clashes since start, as [`Sample::evictions`].
    pub(crate) fn clashes(&self) -> u64 {
        self.host_or_scoped(stat::CLASHES, &self.clashed)
    }

    fn host_or_scoped(&self, idx: u32, counts: &[Count]) -> u64 {
        if self.narrowed {
            counts.iter().map(|c| c.total).sum()
        } else {
            self.stats.get(idx)
        }
    }

    /// Namespaces worth a line: busy ones, or all when `--netns` named them.
    pub(crate) fn shown_netns(&self) -> impl Iterator<Item = &NetnsRow> {
        self.netns.iter().filter(|r| self.narrowed || r.is_active())
    }

    /// One sentence per disagreement with the kernel's counters, and per
    /// count the programs could not key.
    pub(crate) fn reconciliation(&self) -> Vec<String> {
        let why = reconcile::Context {
            kernel_probes: self.sees_entries,
            unattributed: self.unattributed,
        };
        let mut notes = Vec::new();
        for row in self.shown_netns() {
            notes.extend(reconcile::explain(row, &why));
            if let Some(e) = &row.error {
                notes.push(format!("netns {}: {e}", row.inum));
            }
        }
        let overflow = self.stats.get(stat::AGG_OVERFLOW);
        if overflow > 0 {
            notes.push(format!(
                "{overflow} counts exceeded the in-kernel key budget: drops among them are in the drop total and under \"other\"; entries created or held among them are missing from those breakdowns"
            ));
        }
        let live = self.stats.get(stat::LIVE_OVERFLOW);
        if live > 0 {
            notes.push(format!(
                "{live} new entries did not fit the live-entry map: occupancy under-counts them"
            ));
        }
        notes.extend(unseen_calls(&self.stats));
        notes
    }
}

/// A dump running on its own thread: (when it began, its counts, notes,
/// its CPU time).
type Pending = mpsc::Receiver<(Duration, HeldNow, NatSeen, Vec<String>, Duration)>;

/// Entries held, as read.
type HeldNow = occupancy::HeldCounts;

/// Occupancy before naming: when it was read, how, how far apart
/// background dumps start, and the counts.
type HeldRead = (Duration, &'static str, Option<Duration>, HeldNow);

pub(crate) struct Sampler {
    t0: Instant,
    dumps: Dumps,
    stats_start: KernelStats,
    spill_start: HashMap<(u32, u8), u64>,
    ledger: Ledger,
    counters_start: HashMap<u32, NetnsSnapshot>,
    /// Namespaces of the previous sample, to report a vanished one once.
    shown: BTreeMap<u32, NetnsSnapshot>,
    /// Kernel-probe modes: entries from before attach plus the kernel's.
    held: Option<occupancy::Held>,
    /// Tracepoint mode: the latest finished dump and the running one.
    dumped: Option<(Duration, HeldNow)>,
    pending: Option<Pending>,
    pacer: occupancy::Pacer,
    /// Problems met before the first sample (the seed dump's).
    carried: Vec<String>,
}

impl Sampler {
    /// Takes the baselines now; in kernel-probe modes also counts the
    /// entries that predate attach, from one dump per namespace.
    pub(crate) fn start(session: &mut Session, dumps: Dumps) -> Result<Self, SessionError> {
        let mut carried = Vec::new();
        let scope = session.scope.namespaces()?;
        let (stats_start, spill_start, held) = match session.probes_mut() {
            Some(p) => {
                p.source.reset()?;
                let held = match (p.loaded.mode.sees_entries(), dumps) {
                    (false, _) | (true, Dumps::Never) => None,
                    (true, _) => Some(occupancy::Held::seed(&p.source, &scope, &mut carried)),
                };
                (p.source.stats()?, p.source.spilled()?, held)
            }
            None => Default::default(),
        };
        if let Some(h) = &held {
            for (k, b) in h.nat() {
                session.names.learn_nat(*k, *b);
            }
        }
        let counters_start = reconcile::snapshot(&scope);
        Ok(Self {
            t0: Instant::now(),
            dumps,
            stats_start,
            spill_start,
            ledger: Ledger::default(),
            shown: counters_start
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            counters_start,
            held,
            dumped: None,
            pending: None,
            pacer: occupancy::Pacer::new(match dumps {
                Dumps::Background(period) => period,
                Dumps::Never | Dumps::EachSample => Duration::ZERO,
            }),
            carried,
        })
    }

    /// Reads the kernel once and names what it found.
    pub(crate) fn sample(&mut self, session: &mut Session) -> Result<Sample, SessionError> {
        // Name the owners of whatever is queued while they still exist.
        let queued = session.drain();
        let mut problems = std::mem::take(&mut self.carried);
        let scope = session.scope.namespaces().unwrap_or_else(|e| {
            problems.push(e.to_string());
            Vec::new()
        });
        let counters = reconcile::snapshot(&scope);

        let (stats, drained, spilled) = match session.probes_mut() {
            Some(p) => (
                p.source.stats()?.since(&self.stats_start),
                p.source.drain()?,
                p.source.spilled()?,
            ),
            None => Default::default(),
        };
        let malformed = session.probes().map_or(0, |p| p.source.malformed);
        let (counts, ledger_spill) = self.ledger.update(drained);

        let mut keyed_drops = 0;
        let mut seed_frees = Vec::new();
        let mut keyed = Vec::with_capacity(counts.len());
        for (key, c) in counts {
            let Ok(rec) = records::decode_key(&key) else {
                continue;
            };
            match rec.kind {
                Kind::Drop => keyed_drops += c.total,
                Kind::SeedFree => {
                    seed_frees.push((rec, c.fresh));
                    continue;
                }
                _ => {}
            }
            if session.scope.contains(rec.netns) {
                keyed.push((rec, c));
            }
        }
        // Read (and learn the translations it shows) before anything is
        // named, so victims are named after NAT too.
        let held = self
            .occupancy(session, &scope, &counters, seed_frees, &mut problems)?
            .map(|(at, source, every, held)| Occupancy {
                at,
                source,
                every,
                entries: held
                    .keyed
                    .into_iter()
                    .filter(|(r, _, _)| session.scope.contains(r.netns))
                    .map(|(r, n, sport)| (session.names.flow(&r, sport), n))
                    .collect(),
                unkeyed: held.unkeyed,
            });

        let mut victims = Vec::new();
        let mut created = Vec::new();
        let mut evicted = Vec::new();
        let mut clashed = Vec::new();
        let mut seen: HashMap<u32, u64> = HashMap::new();
        let mut made: HashMap<u32, u64> = HashMap::new();
        for (rec, c) in keyed {
            let target = match rec.kind {
                Kind::Drop => {
                    *seen.entry(rec.netns).or_default() += c.total;
                    &mut victims
                }
                Kind::New => {
                    *made.entry(rec.netns).or_default() += c.total;
                    &mut created
                }
                Kind::Evict => &mut evicted,
                Kind::Clash => &mut clashed,
                Kind::SeedFree => continue,
            };
            target.push(Count {
                flow: session.names.flow(&rec, c.sport),
                total: c.total,
                fresh: c.fresh,
            });
        }
        // Counts past the in-kernel key budget are known per namespace: its
        // totals stay exact, and they are "other" in every breakdown.
        let mut spilled_drops = 0;
        let kernel_spill = spilled.iter().map(|(k, n)| {
            (
                *k,
                n.saturating_sub(self.spill_start.get(k).copied().unwrap_or(0)),
            )
        });
        for ((inum, kind), n) in kernel_spill.chain(ledger_spill) {
            if n == 0 || !session.scope.contains(inum) {
                continue;
            }
            match records::kind_of(kind) {
                Ok(Kind::Drop) => {
                    *seen.entry(inum).or_default() += n;
                    spilled_drops += n;
                }
                Ok(Kind::New) => *made.entry(inum).or_default() += n,
                _ => {}
            }
        }
        // Drops the kernel counted but could not key (unreadable) belong to
        // no namespace: "other", unless the scope is narrowed and they may
        // well be someone else's; those past a key budget are known per
        // namespace.
        let unattributed = if session.scope.is_narrowed() {
            spilled_drops
        } else {
            stats.get(stat::MATCHED).saturating_sub(keyed_drops)
        };

        let sees_entries = session.sees_entries();
        let mut netns = Vec::new();
        let mut inums: Vec<u32> = counters.keys().chain(seen.keys()).copied().collect();
        // Vanished since the previous sample: shown once more, as such.
        inums.extend(self.shown.keys().filter(|i| !counters.contains_key(i)));
        inums.sort_unstable();
        inums.dedup();
        for inum in inums {
            let now = counters.get(&inum);
            let start = self.counters_start.get(&inum);
            let seen_here = seen.get(&inum).copied().unwrap_or(0);
            let mut row = match (start, now, self.shown.get(&inum)) {
                // Appeared after the start, vanished before now.
                (None, None, Some(last)) => reconcile::row(Some(last), None, seen_here),
                _ => reconcile::row(start, now, seen_here),
            };
            row.inum = inum;
            let before = start.or(self.shown.get(&inum));
            if now.is_none() && before.is_none() {
                // Drops in a namespace no process or bind mount keeps
                // visible (held by an fd only) still get their row.
                row.name = session.names.netns_name(inum);
                row.error = None;
            }
            row.label = match now.or(before) {
                Some(s) => session.names.netns_label(&s.info),
                None => row.name.clone().unwrap_or_else(|| inum.to_string()),
            };
            row.created = sees_entries.then(|| made.get(&inum).copied().unwrap_or(0));
            netns.push(row);
        }
        self.shown = counters.into_iter().collect();

        Ok(Sample {
            queued,
            elapsed: self.t0.elapsed(),
            netns,
            victims,
            unattributed,
            created,
            evicted,
            clashed,
            held,
            lost_events: stats.get(stat::RB_LOST) + malformed,
            stats,
            problems,
            sees_entries,
            narrowed: session.scope.is_narrowed(),
            skips_counted: session.probes().is_none_or(|p| p.loaded.skips_counted),
        })
    }

    /// Who holds the slots now, unnamed, with when it was read (and how far
    /// apart background dumps start). Learns the translations the dumps
    /// show on the way, so everything named after it sees them.
    fn occupancy(
        &mut self,
        session: &mut Session,
        scope: &[NetnsInfo],
        counters: &HashMap<u32, NetnsSnapshot>,
        seed_frees: Vec<(AggRecord, u64)>,
        problems: &mut Vec<String>,
    ) -> Result<Option<HeldRead>, SessionError> {
        if let (Some(held), Some(p)) = (self.held.as_mut(), session.probes()) {
            let records = held.now(&p.source, seed_frees)?;
            return Ok(Some((
                self.t0.elapsed(),
                "ctnetlink seed + kernel",
                None,
                records,
            )));
        }
        if session.sees_entries() {
            return Ok(None);
        }
        // Empty tables need no dump: on a node with hundreds of pods most
        // namespaces never use conntrack.
        let busy: Vec<NetnsInfo> = scope
            .iter()
            .filter(|ns| {
                counters
                    .get(&ns.inum)
                    .and_then(|c| c.sysctl.as_ref())
                    .is_none_or(|s| s.count > 0)
            })
            .cloned()
            .collect();
        let mut learned = None;
        match self.dumps {
            Dumps::Never => return Ok(None),
            Dumps::EachSample => {
                let at = self.t0.elapsed();
                let (records, nat, _) = occupancy::count_now(&busy, problems);
                self.dumped = Some((at, records));
                learned = Some(nat);
            }
            Dumps::Background(_) => {
                if let Some(rx) = &self.pending {
                    match rx.try_recv() {
                        Ok((at, records, nat, notes, cpu)) => {
                            self.dumped = Some((at, records));
                            learned = Some(nat);
                            problems.extend(notes);
                            self.pacer.finished(cpu);
                            self.pending = None;
                        }
                        Err(mpsc::TryRecvError::Empty) => {}
                        Err(mpsc::TryRecvError::Disconnected) => self.pending = None,
                    }
                }
                if self.pending.is_none() && self.pacer.due() {
                    self.pacer.started();
                    let (tx, rx) = mpsc::channel();
                    let at = self.t0.elapsed();
                    std::thread::spawn(move || {
                        let mut notes = Vec::new();
                        let (records, nat, cpu) = occupancy::count_now(&busy, &mut notes);
                        let _ = tx.send((at, records, nat, notes, cpu));
                    });
                    self.pending = Some(rx);
                }
            }
        }
        for (k, b) in learned.into_iter().flatten() {
            session.names.learn_nat(k, b);
        }
        let every = matches!(self.dumps, Dumps::Background(_)).then(|| self.pacer.spacing());
        Ok(self
            .dumped
            .as_ref()
            .map(|(at, records)| (*at, "ctnetlink", every, records.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(netns: u32) -> AggKey {
        AggKey {
            netns,
            ..Default::default()
        }
    }

    fn v(count: u64, sport: u16) -> AggValue {
        AggValue {
            count,
            sport,
            _pad: [0; 6],
        }
    }

    fn get(t: &[(AggKey, Tallied)], netns: u32) -> Tallied {
        t.iter().find(|(k, _)| k.netns == netns).unwrap().1
    }

    #[test]
    fn pending_counts_show_now_and_settle_once() {
        let mut l = Ledger::default();
        // The map just left holds 5; nothing settled yet.
        let (t, _) = l.update(Drained {
            settled: vec![],
            pending: vec![(key(1), v(5, 4000))],
        });
        let a = get(&t, 1);
        assert_eq!((a.total, a.fresh, a.sport), (5, 5, 4000));
        // Next refresh drains it with 2 late arrivals; 1 more is pending.
        let (t, _) = l.update(Drained {
            settled: vec![(key(1), v(7, 4001))],
            pending: vec![(key(1), v(1, 4002))],
        });
        let b = get(&t, 1);
        assert_eq!((b.total, b.fresh), (8, 3), "never counted twice");
        // The pending 1 is drained next: shown already, so nothing fresh.
        let (t, _) = l.update(Drained {
            settled: vec![(key(1), v(1, 4002))],
            pending: vec![],
        });
        let c = get(&t, 1);
        assert_eq!((c.total, c.fresh), (8, 0));
    }

    #[test]
    fn the_ledger_is_bounded() {
        let mut l = Ledger::default();
        let settled = (0..LEDGER_KEYS as u32 + 10)
            .map(|i| (key(i), v(1, 0)))
            .collect();
        let (t, spilled) = l.update(Drained {
            settled,
            pending: vec![],
        });
        assert_eq!(t.len(), LEDGER_KEYS);
        let past: u64 = spilled.values().sum();
        assert_eq!(past, 10, "what does not fit is still counted per namespace");
    }

    #[test]
    fn missed_returns_are_named_per_function_and_silent_at_zero() {
        let mut stats = KernelStats::default();
        assert!(unseen_calls(&stats).is_empty());
        stats.0[stat::MISSED_CONFIRM as usize] = 3;
        stats.0[stat::MISSED_CLASH as usize] = 1;
        stats.0[stat::RUNS_SKIPPED as usize] = 4;
        let notes = unseen_calls(&stats);
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(
            notes[0].starts_with("missed returns of __nf_conntrack_confirm: 3 "),
            "{notes:?}"
        );
        assert!(
            notes[1].starts_with("missed returns of nf_ct_resolve_clash: 1 "),
            "{notes:?}"
        );
        assert!(
            notes[2].starts_with("program runs the kernel skipped: 4 "),
            "{notes:?}"
        );
    }
}
