//! The Sampler: turns the kernel's state into one typed [`Sample`] per
//! refresh. Every command reads the kernel through it: `report` takes one
//! Sample over its window, `top` one a second, `serve` one per refresh,
//! `doctor` a series of them.
use std::{
    collections::{BTreeMap, HashMap},
    sync::mpsc,
    time::{Duration, Instant},
};

use conntrack_ebpf::{stat, AggKey};

use super::{
    occupancy::{self, Held},
    reconcile::{self, NetnsRow, NetnsSnapshot},
};
use crate::{
    names::resolver::Flow,
    session::{Session, SessionError},
    source::{
        maps::{counts_since, KernelStats},
        netns::NetnsInfo,
        records::{self, AggRecord, Kind},
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
    /// At most one per period, on a thread of its own; a sample carries
    /// the latest finished one, stamped with when it began.
    Background(Duration),
}

/// One key's count since the sampler started and since the last sample.
#[derive(Debug, Clone)]
pub(crate) struct Count {
    pub(crate) flow: Flow,
    pub(crate) total: u64,
    pub(crate) fresh: u64,
}

/// Who holds the table's slots at one instant.
#[derive(Debug, Clone)]
pub(crate) struct Occupancy {
    /// When the counts were taken, since the sampler started.
    pub(crate) at: Duration,
    /// How the counts were taken.
    pub(crate) source: &'static str,
    pub(crate) entries: Vec<(Flow, u64)>,
}

/// The kernel's state at one refresh, named and counted.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
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
}

impl Sample {
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
        notes
    }
}

/// A dump running on its own thread: (when it began, its counts, notes).
type Pending = mpsc::Receiver<(Duration, Vec<(AggRecord, u64)>, Vec<String>)>;

pub(crate) struct Sampler {
    t0: Instant,
    dumps: Dumps,
    stats_start: KernelStats,
    counts_start: HashMap<AggKey, u64>,
    counts_prev: HashMap<AggKey, u64>,
    counters_start: HashMap<u32, NetnsSnapshot>,
    /// Namespaces of the previous sample, to report a vanished one once.
    shown: BTreeMap<u32, NetnsSnapshot>,
    /// Kernel-probe modes: entries from before attach plus the kernel's.
    held: Option<Held>,
    /// Tracepoint mode: the latest finished dump and the running one.
    dumped: Option<(Duration, Vec<(AggRecord, u64)>)>,
    pending: Option<Pending>,
    last_dump: Option<Instant>,
    /// Problems met before the first sample (the seed dump's).
    carried: Vec<String>,
}

impl Sampler {
    /// Takes the baselines now; in kernel-probe modes also counts the
    /// entries that predate attach, from one dump per namespace.
    pub(crate) fn start(session: &mut Session, dumps: Dumps) -> Result<Self, SessionError> {
        let mut carried = Vec::new();
        let scope = session.scope.namespaces()?;
        let (stats_start, counts_start, held) = match session.probes() {
            Some(p) => {
                let held = match (p.loaded.mode.sees_entries(), dumps) {
                    (false, _) | (true, Dumps::Never) => None,
                    (true, _) => Some(Held::seed(&p.source, &scope, &mut carried)?),
                };
                (p.source.stats()?, p.source.counts()?, held)
            }
            None => Default::default(),
        };
        let counters_start = reconcile::snapshot(&scope);
        Ok(Self {
            t0: Instant::now(),
            dumps,
            stats_start,
            counts_prev: counts_start.clone(),
            counts_start,
            shown: counters_start
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            counters_start,
            held,
            dumped: None,
            pending: None,
            last_dump: None,
            carried,
        })
    }

    /// Reads the kernel once and names what it found.
    pub(crate) fn sample(&mut self, session: &mut Session) -> Result<Sample, SessionError> {
        // Name the owners of whatever is queued while they still exist.
        session.drain();
        let mut problems = std::mem::take(&mut self.carried);
        let scope = session.scope.namespaces().unwrap_or_else(|e| {
            problems.push(e.to_string());
            Vec::new()
        });
        let counters = reconcile::snapshot(&scope);

        let (stats, counts_now) = match session.probes() {
            Some(p) => (
                p.source.stats()?.since(&self.stats_start),
                p.source.counts()?,
            ),
            None => Default::default(),
        };
        let malformed = session.probes().map_or(0, |p| p.source.malformed);
        let since_start = counts_since(&counts_now, &self.counts_start);
        let since_prev = counts_since(&counts_now, &self.counts_prev);

        let mut victims = Vec::new();
        let mut created = Vec::new();
        let mut evicted = Vec::new();
        let mut clashed = Vec::new();
        let mut keyed_drops = 0;
        let mut seen: HashMap<u32, u64> = HashMap::new();
        let mut made: HashMap<u32, u64> = HashMap::new();
        for (key, total) in &since_start {
            let Ok(rec) = records::decode_key(key) else {
                continue;
            };
            if rec.kind == Kind::Drop {
                keyed_drops += total;
            }
            if !session.scope.contains(rec.netns) {
                continue;
            }
            let target = match rec.kind {
                Kind::Drop => {
                    *seen.entry(rec.netns).or_default() += total;
                    &mut victims
                }
                Kind::New => {
                    *made.entry(rec.netns).or_default() += total;
                    &mut created
                }
                Kind::Evict => &mut evicted,
                Kind::Clash => &mut clashed,
                Kind::SeedFree => continue,
            };
            target.push(Count {
                flow: session.names.flow(&rec),
                total: *total,
                fresh: since_prev.get(key).copied().unwrap_or(0),
            });
        }
        // Drops the kernel counted but could not key belong to no
        // namespace: "other", unless the scope is narrowed and they may
        // well be someone else's.
        let unattributed = if session.scope.is_narrowed() {
            0
        } else {
            stats.get(stat::MATCHED).saturating_sub(keyed_drops)
        };

        let held = self.occupancy(session, &scope, &counters, &counts_now, &mut problems)?;
        self.counts_prev = counts_now;

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
        })
    }

    fn occupancy(
        &mut self,
        session: &mut Session,
        scope: &[NetnsInfo],
        counters: &HashMap<u32, NetnsSnapshot>,
        counts_now: &HashMap<AggKey, u64>,
        problems: &mut Vec<String>,
    ) -> Result<Option<Occupancy>, SessionError> {
        let named = |session: &mut Session, records: Vec<(AggRecord, u64)>| -> Vec<(Flow, u64)> {
            records
                .into_iter()
                .filter(|(r, _)| session.scope.contains(r.netns))
                .map(|(r, n)| (session.names.flow(&r), n))
                .collect()
        };
        if let (Some(held), Some(p)) = (self.held.as_mut(), session.probes()) {
            let records = held.now(&p.source, counts_now)?;
            return Ok(Some(Occupancy {
                at: self.t0.elapsed(),
                source: "ctnetlink seed + kernel",
                entries: named(session, records),
            }));
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
        match self.dumps {
            Dumps::Never => return Ok(None),
            Dumps::EachSample => {
                let at = self.t0.elapsed();
                let records = occupancy::count_now(&busy, problems);
                self.dumped = Some((at, records));
            }
            Dumps::Background(every) => {
                if let Some(rx) = &self.pending {
                    match rx.try_recv() {
                        Ok((at, records, notes)) => {
                            self.dumped = Some((at, records));
                            problems.extend(notes);
                            self.pending = None;
                        }
                        Err(mpsc::TryRecvError::Empty) => {}
                        Err(mpsc::TryRecvError::Disconnected) => self.pending = None,
                    }
                }
                if self.pending.is_none() && self.last_dump.is_none_or(|t| t.elapsed() >= every) {
                    self.last_dump = Some(Instant::now());
                    let (tx, rx) = mpsc::channel();
                    let at = self.t0.elapsed();
                    std::thread::spawn(move || {
                        let mut notes = Vec::new();
                        let records = occupancy::count_now(&busy, &mut notes);
                        let _ = tx.send((at, records, notes));
                    });
                    self.pending = Some(rx);
                }
            }
        }
        let Some((at, records)) = &self.dumped else {
            return Ok(None);
        };
        let (at, records) = (*at, records.clone());
        Ok(Some(Occupancy {
            at,
            source: "ctnetlink",
            entries: named(session, records),
        }))
    }
}
