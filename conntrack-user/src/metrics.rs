//! The Prometheus series of `ctwatch serve`, and how one refresh computes
//! them from a watching session.
//!
//! Names follow node_exporter's `node_nf_conntrack_*` with a `ctwatch_`
//! prefix, so dashboards built for one read naturally with the other.
//! Every refresh rebuilds every family from scratch: a namespace that
//! vanished, or a key that fell out of the top K, loses its series at the
//! next refresh instead of lingering, so cardinality stays bounded by
//! (namespaces × 7) + (4 dimensions × (K + 1)) per top-K family.
use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use conntrack_ebpf::{stat, AggKey};
use prometheus_client::{
    encoding::{prometheus_text, text, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

use crate::{
    aggregate::{Breakdown, BreakdownBuilder, Item},
    compat::Mode,
    counters::{CtStats, Sysctl},
    error::Error,
    netns::NetnsInfo,
    occupancy::{self, Held},
    reconcile,
    source::{counts_since, KernelStats},
    watch::Watch,
};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: the address is already in use (another exporter or ctwatch serve?); pick another with --listen")]
    AddrInUse { addr: std::net::SocketAddr },
    #[error(
        "cannot listen on {addr}: no local interface has that address; pick another with --listen"
    )]
    AddrNotAvailable { addr: std::net::SocketAddr },
    #[error("cannot listen on {addr}: permission denied (ports below 1024 need CAP_NET_BIND_SERVICE); pick another with --listen")]
    PermissionDenied { addr: std::net::SocketAddr },
    #[error("cannot listen on {addr}: {reason}; pick another with --listen")]
    Bind {
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error("--interval must be between {min} and {max} seconds, got {got}")]
    Interval { min: f64, max: f64, got: f64 },
    #[error("cannot encode the metrics exposition: a label or help text could not be written")]
    Encode,
}

/// Labels of the per-namespace series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NetnsLabels {
    netns: String,
    netns_name: String,
}

/// Labels of the top-K series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ByLabels {
    dimension: String,
    key: String,
}

/// One namespace's values at a refresh.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetnsSample {
    pub inum: u32,
    pub name: Option<String>,
    /// `None` when the namespace could not be read this time.
    pub sysctl: Option<Sysctl>,
    /// The kernel's own counters, as the kernel reports them (cumulative
    /// since the namespace was created, not since ctwatch started).
    pub stats: Option<CtStats>,
    /// Table-full drops ctwatch attributed to this namespace since start.
    pub table_full_drops: u64,
}

/// Everything one refresh exports. Built by [`Refresher::sample`] from the
/// kernel, or by hand in tests.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub netns: Vec<NetnsSample>,
    /// Events lost to a full ring buffer or refused by the decoder, since start.
    pub lost_events: u64,
    /// Kernel-probe modes only: successful early-drop evictions since start.
    pub evictions: u64,
    /// Kernel-probe modes only: insert clashes since start.
    pub clashes: u64,
    /// Victims: table-full drops since start.
    pub drops_by: Breakdown,
    /// Culprits: entries held now.
    pub entries_by: Breakdown,
    /// Culprits (kernel-probe modes): entries created since start.
    pub new_entries_by: Option<Breakdown>,
}

impl Default for Sample {
    fn default() -> Self {
        let empty = BreakdownBuilder::new(1).finish(1);
        Sample {
            netns: Vec::new(),
            lost_events: 0,
            evictions: 0,
            clashes: 0,
            drops_by: empty.clone(),
            entries_by: empty,
            new_entries_by: None,
        }
    }
}

/// Text format of a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4: what curl and most scrapers get.
    Prometheus,
    /// OpenMetrics 1.0, when the scraper asks for it.
    OpenMetrics,
}

impl Format {
    /// Picks the format from an HTTP `Accept` header.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The registry and its families. Shared between the refresh loop and the
/// HTTP handlers.
pub struct Metrics {
    registry: Registry,
    /// Held while a refresh rebuilds the families and while a scrape
    /// encodes them, so no scrape sees a half-rebuilt family.
    consistent: Mutex<()>,
    entries: Family<NetnsLabels, Gauge>,
    entries_limit: Family<NetnsLabels, Gauge>,
    buckets: Family<NetnsLabels, Gauge>,
    stat_drop: Family<NetnsLabels, Counter>,
    stat_early_drop: Family<NetnsLabels, Counter>,
    stat_insert_failed: Family<NetnsLabels, Counter>,
    table_full_drops: Family<NetnsLabels, Counter>,
    lost_events: Counter,
    evictions: Option<Counter>,
    clashes: Option<Counter>,
    drops_by: Family<ByLabels, Counter>,
    entries_by: Family<ByLabels, Gauge>,
    new_entries_by: Option<Family<ByLabels, Counter>>,
}

/// The dimensions every top-K family is broken down by.
const DIMENSIONS: [&str; 4] = ["dst_port", "src_ip", "process", "netns"];

fn dimension<'a>(b: &'a Breakdown, dim: &str) -> &'a [Item] {
    match dim {
        "dst_port" => &b.by_dst_port,
        "src_ip" => &b.by_src_ip,
        "process" => &b.by_process,
        _ => &b.by_netns,
    }
}

/// A process row's label: the command name plus its pid, so two processes
/// with the same name stay apart.
fn item_key(it: &Item) -> String {
    match it.pid {
        Some(pid) => format!("{}[{pid}]", it.key),
        None => it.key.clone(),
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Registers every family. The evictions, clashes and new-entry series
    /// exist only in the modes that see entries: in tracepoint mode a
    /// constant 0 would claim "no evictions" where ctwatch simply cannot see.
    pub fn new(mode: Mode, kernel: &str) -> Self {
        let fam_ns = Family::<NetnsLabels, Gauge>::default;
        let cnt_ns = Family::<NetnsLabels, Counter>::default;
        let mut m = Metrics {
            registry: Registry::default(),
            consistent: Mutex::new(()),
            entries: fam_ns(),
            entries_limit: fam_ns(),
            buckets: fam_ns(),
            stat_drop: cnt_ns(),
            stat_early_drop: cnt_ns(),
            stat_insert_failed: cnt_ns(),
            table_full_drops: cnt_ns(),
            lost_events: Counter::default(),
            evictions: mode.sees_entries().then(Counter::default),
            clashes: mode.sees_entries().then(Counter::default),
            drops_by: Family::default(),
            entries_by: Family::default(),
            new_entries_by: mode.sees_entries().then(Family::default),
        };
        m.registry.register(
            "ctwatch",
            "ctwatch attach mode and kernel release",
            Info::new(vec![
                ("mode".to_string(), mode.to_string()),
                ("kernel".to_string(), kernel.to_string()),
            ]),
        );
        m.registry.register(
            "ctwatch_nf_conntrack_entries",
            "Conntrack entries in the namespace (nf_conntrack_count)",
            m.entries.clone(),
        );
        m.registry.register(
            "ctwatch_nf_conntrack_entries_limit",
            "Table size of the namespace (nf_conntrack_max)",
            m.entries_limit.clone(),
        );
        m.registry.register(
            "ctwatch_nf_conntrack_buckets",
            "Hash buckets of the table (nf_conntrack_buckets)",
            m.buckets.clone(),
        );
        m.registry.register(
            "ctwatch_nf_conntrack_stat_drop",
            "Kernel conntrack drop counter of the namespace (any conntrack drop, not only table full)",
            m.stat_drop.clone(),
        );
        m.registry.register(
            "ctwatch_nf_conntrack_stat_early_drop",
            "Kernel count of entries evicted to make room (early_drop)",
            m.stat_early_drop.clone(),
        );
        m.registry.register(
            "ctwatch_nf_conntrack_stat_insert_failed",
            "Kernel count of failed inserts (clashes lost)",
            m.stat_insert_failed.clone(),
        );
        m.registry.register(
            "ctwatch_table_full_drops",
            "Packets dropped because the table was full, seen by ctwatch since it started",
            m.table_full_drops.clone(),
        );
        m.registry.register(
            "ctwatch_lost_events",
            "Events lost to a full ring buffer or refused by the decoder since start",
            m.lost_events.clone(),
        );
        if let Some(c) = &m.evictions {
            m.registry.register(
                "ctwatch_evictions",
                "Entries evicted by early_drop since start",
                c.clone(),
            );
        }
        if let Some(c) = &m.clashes {
            m.registry
                .register("ctwatch_clashes", "Insert clashes since start", c.clone());
        }
        m.registry.register(
            "ctwatch_table_full_drops_by",
            "Table-full drops since start by victim, top K per dimension, the rest under key=\"other\"",
            m.drops_by.clone(),
        );
        m.registry.register(
            "ctwatch_entries_by",
            "Entries held now by culprit, top K per dimension, the rest under key=\"other\"",
            m.entries_by.clone(),
        );
        if let Some(f) = &m.new_entries_by {
            m.registry.register(
                "ctwatch_new_entries_by",
                "Entries created since start by culprit, top K per dimension, the rest under key=\"other\"",
                f.clone(),
            );
        }
        m
    }

    /// Replaces every series with the values of `s`.
    ///
    /// The top-K counters are recreated at their cumulative value, so a
    /// key that stays in the top K is monotonic; the `other` row may shrink
    /// when a key enters the top K (Prometheus reads that as a reset).
    pub fn update(&self, s: &Sample) {
        let _held = self
            .consistent
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for f in [&self.entries, &self.entries_limit, &self.buckets] {
            f.clear();
        }
        for f in [
            &self.stat_drop,
            &self.stat_early_drop,
            &self.stat_insert_failed,
            &self.table_full_drops,
        ] {
            f.clear();
        }
        for ns in &s.netns {
            let l = NetnsLabels {
                netns: ns.inum.to_string(),
                netns_name: ns.name.clone().unwrap_or_default(),
            };
            if let Some(sc) = &ns.sysctl {
                self.entries.get_or_create(&l).set(to_i64(sc.count));
                self.entries_limit.get_or_create(&l).set(to_i64(sc.max));
                self.buckets.get_or_create(&l).set(to_i64(sc.buckets));
            }
            if let Some(st) = &ns.stats {
                self.stat_drop.get_or_create(&l).inc_by(st.drop);
                self.stat_early_drop.get_or_create(&l).inc_by(st.early_drop);
                self.stat_insert_failed
                    .get_or_create(&l)
                    .inc_by(st.insert_failed);
            }
            self.table_full_drops
                .get_or_create(&l)
                .inc_by(ns.table_full_drops);
        }
        set_counter(&self.lost_events, s.lost_events);
        if let Some(c) = &self.evictions {
            set_counter(c, s.evictions);
        }
        if let Some(c) = &self.clashes {
            set_counter(c, s.clashes);
        }
        fill_counters(&self.drops_by, &s.drops_by);
        self.entries_by.clear();
        for dim in DIMENSIONS {
            for it in dimension(&s.entries_by, dim) {
                let l = ByLabels {
                    dimension: dim.to_string(),
                    key: item_key(it),
                };
                self.entries_by.get_or_create(&l).inc_by(to_i64(it.count));
            }
        }
        if let (Some(f), Some(b)) = (&self.new_entries_by, &s.new_entries_by) {
            fill_counters(f, b);
        }
    }

    /// The exposition text of the current series.
    pub fn encode(&self, format: Format) -> Result<String, ServeError> {
        let _held = self
            .consistent
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut out = String::new();
        match format {
            Format::Prometheus => prometheus_text::encode(&mut out, &self.registry),
            Format::OpenMetrics => text::encode(&mut out, &self.registry),
        }
        .map_err(|_| ServeError::Encode)?;
        Ok(out)
    }
}

/// Counters only go up; these ones are cumulative since start already.
fn set_counter(c: &Counter, v: u64) {
    c.inc_by(v.saturating_sub(c.get()));
}

fn fill_counters(f: &Family<ByLabels, Counter>, b: &Breakdown) {
    f.clear();
    for dim in DIMENSIONS {
        for it in dimension(b, dim) {
            let l = ByLabels {
                dimension: dim.to_string(),
                key: item_key(it),
            };
            // Two rows can share a label (same command and pid seen both as
            // listener and sender): their counts add up.
            f.get_or_create(&l).inc_by(it.count);
        }
    }
}

/// Logs what a dump could not cover: a namespace that cannot be dumped
/// is missing from `entries_by` until the next refresh.
fn log_notes(notes: Vec<String>) {
    for n in notes {
        log::warn!("{n}");
    }
}

/// The baselines of a serving session: everything is reported since start.
pub struct Refresher {
    top: usize,
    kernel_entries: bool,
    counts_start: HashMap<AggKey, u64>,
    stats_start: KernelStats,
    /// Entries held (kernel-probe modes): seed at start plus the kernel's.
    held: Option<Held>,
}

impl Refresher {
    /// Takes the baselines now; in kernel-probe modes also seeds the
    /// entries that predate attach from one dump per namespace.
    pub fn start(w: &mut Watch, top: usize) -> Result<Self, Error> {
        let kernel_entries = w.loaded.mode.sees_entries();
        let counts_start = w.source.counts()?;
        let stats_start = w.source.stats()?;
        let held = if kernel_entries {
            let scope = w.scope.namespaces()?;
            let mut notes = Vec::new();
            let held = Held::seed(&w.source, &scope, &mut notes)?;
            log_notes(notes);
            Some(held)
        } else {
            None
        };
        Ok(Refresher {
            top,
            kernel_entries,
            counts_start,
            stats_start,
            held,
        })
    }

    /// Reads the kernel and builds the series of this refresh.
    pub fn sample(&mut self, w: &mut Watch) -> Result<Sample, Error> {
        let stats = w.source.stats()?.since(&self.stats_start);
        let counts_now = w.source.counts()?;
        let deltas = counts_since(&counts_now, &self.counts_start);
        // A namespace that cannot be listed right now is not fatal for a
        // long-running exporter: the per-namespace rows are just missing.
        let scope_ns = w.scope.namespaces().unwrap_or_else(|e| {
            log::warn!("{e}");
            Vec::new()
        });
        let counters = reconcile::snapshot(&scope_ns);

        let tally = w.tally(&deltas);
        let (mut drops, new_flows, per_ns) = (tally.drops, tally.new_flows, tally.drops_per_netns);
        let attributed = tally.drops_keyed;
        // Drops the kernel counted but could not key (aggregation map full,
        // unreadable headers) belong to no namespace: "other", unless the
        // scope is narrowed and they may well be someone else's.
        if !w.scope.is_narrowed() {
            drops.add_unattributed(stats.get(stat::MATCHED).saturating_sub(attributed));
        }

        let entries_by = if let Some(held) = self.held.as_mut() {
            let records = held.now(&w.source, &counts_now)?;
            w.breakdown_of(records)
        } else {
            // Empty tables need no dump: on a node with hundreds of pods
            // most namespaces never use conntrack.
            let busy: Vec<NetnsInfo> = scope_ns
                .iter()
                .filter(|ns| {
                    counters
                        .get(&ns.inum)
                        .and_then(|c| c.sysctl.as_ref())
                        .is_none_or(|s| s.count > 0)
                })
                .cloned()
                .collect();
            let mut notes = Vec::new();
            let held = occupancy::count_now(&busy, &mut notes);
            log_notes(notes);
            w.breakdown_of(held)
        };

        let mut netns: Vec<NetnsSample> = scope_ns
            .iter()
            .map(|ns| {
                let c = counters.get(&ns.inum);
                NetnsSample {
                    inum: ns.inum,
                    name: ns.name.clone(),
                    sysctl: c.and_then(|c| c.sysctl.clone()),
                    stats: c.and_then(|c| c.stats.as_ref().map(|(s, _)| s.clone())),
                    table_full_drops: per_ns.get(&ns.inum).copied().unwrap_or(0),
                }
            })
            .collect();
        // Drops in a namespace no process or bind mount keeps visible (held
        // by an fd only) still get their row.
        for (inum, n) in &per_ns {
            if !netns.iter().any(|s| s.inum == *inum) {
                netns.push(NetnsSample {
                    inum: *inum,
                    name: w.netns_name(*inum),
                    table_full_drops: *n,
                    ..Default::default()
                });
            }
        }
        netns.sort_by_key(|s| s.inum);

        Ok(Sample {
            netns,
            lost_events: stats.get(stat::RB_LOST) + w.source.malformed,
            evictions: stats.get(stat::EVICTIONS),
            clashes: stats.get(stat::CLASHES),
            drops_by: drops.finish(self.top),
            entries_by: entries_by.finish(self.top),
            new_entries_by: self.kernel_entries.then(|| new_flows.finish(self.top)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{Dims, RowKey};

    fn dims(src: &str, port: &str, comm: &str, pid: u32, netns: &str) -> Dims {
        Dims {
            src_ip: src.into(),
            dst_port: port.into(),
            process: RowKey {
                key: comm.into(),
                pid: Some(pid),
                role: Some("listener"),
            },
            netns: netns.into(),
            cgroup: None,
        }
    }

    fn sample(top: usize, ports: u16) -> Sample {
        let mut drops = BreakdownBuilder::default();
        for p in 0..ports {
            // Port 5353 gets the most; the others one each.
            let n = if p == 0 { 500 } else { 1 };
            drops.add(
                dims(
                    &format!("198.18.{}.{}", p / 250, p % 250 + 1),
                    &format!("udp/{}", 5353 + p),
                    "ctpeer",
                    100 + u32::from(p),
                    "4026532177",
                ),
                n,
            );
        }
        let mut occ = BreakdownBuilder::default();
        occ.add(
            dims("198.18.0.2", "tcp/7400", "ctpeer", 42, "4026532177"),
            16,
        );
        Sample {
            netns: vec![NetnsSample {
                inum: 4026532177,
                name: Some("lab-srv".into()),
                sysctl: Some(Sysctl {
                    count: 16,
                    max: 16,
                    buckets: 1024,
                }),
                stats: Some(CtStats {
                    drop: 700,
                    early_drop: 3,
                    insert_failed: 2,
                    ..Default::default()
                }),
                table_full_drops: drops.total(),
            }],
            lost_events: 4,
            evictions: 9,
            clashes: 1,
            drops_by: drops.finish(top),
            entries_by: occ.finish(top),
            new_entries_by: Some(occ.finish(top)),
        }
    }

    fn lines_of<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .collect()
    }

    #[test]
    fn a_refresh_encodes_every_series() {
        let m = Metrics::new(Mode::Kprobe, "6.1.0-test");
        m.update(&sample(3, 1));
        let t = m.encode(Format::Prometheus).unwrap();
        let ns = r#"netns="4026532177",netns_name="lab-srv""#;
        for want in [
            format!("ctwatch_nf_conntrack_entries{{{ns}}} 16"),
            format!("ctwatch_nf_conntrack_entries_limit{{{ns}}} 16"),
            format!("ctwatch_nf_conntrack_buckets{{{ns}}} 1024"),
            format!("ctwatch_nf_conntrack_stat_drop_total{{{ns}}} 700"),
            format!("ctwatch_nf_conntrack_stat_early_drop_total{{{ns}}} 3"),
            format!("ctwatch_nf_conntrack_stat_insert_failed_total{{{ns}}} 2"),
            format!("ctwatch_table_full_drops_total{{{ns}}} 500"),
            "ctwatch_lost_events_total 4".into(),
            "ctwatch_evictions_total 9".into(),
            "ctwatch_clashes_total 1".into(),
            r#"ctwatch_info{mode="kprobe",kernel="6.1.0-test"} 1"#.into(),
            r#"ctwatch_table_full_drops_by_total{dimension="dst_port",key="udp/5353"} 500"#.into(),
            r#"ctwatch_table_full_drops_by_total{dimension="process",key="ctpeer[100]"} 500"#
                .into(),
            r#"ctwatch_table_full_drops_by_total{dimension="netns",key="4026532177"} 500"#.into(),
            r#"ctwatch_entries_by{dimension="src_ip",key="198.18.0.2"} 16"#.into(),
            r#"ctwatch_new_entries_by_total{dimension="dst_port",key="tcp/7400"} 16"#.into(),
        ] {
            assert!(t.lines().any(|l| l == want), "missing {want:?} in:\n{t}");
        }
        assert!(
            t.contains("# TYPE ctwatch_table_full_drops_total counter"),
            "{t}"
        );
    }

    #[test]
    fn top_k_is_bounded_with_an_other_row() {
        const K: usize = 3;
        let m = Metrics::new(Mode::Tracepoint, "6.18.0");
        m.update(&sample(K, 200));
        let t = m.encode(Format::Prometheus).unwrap();
        let by = lines_of(&t, "ctwatch_table_full_drops_by_total");
        for dim in DIMENSIONS {
            let rows: Vec<_> = by
                .iter()
                .filter(|l| l.contains(&format!("dimension=\"{dim}\"")))
                .collect();
            assert!(rows.len() <= K + 1, "{dim}: {} rows\n{t}", rows.len());
        }
        let port_rows: Vec<_> = by.iter().filter(|l| l.contains("\"dst_port\"")).collect();
        assert_eq!(port_rows.len(), K + 1, "{t}");
        assert!(by.contains(
            &r#"ctwatch_table_full_drops_by_total{dimension="dst_port",key="udp/5353"} 500"#
        ));
        // 199 ports with one drop each: K - 1 of them shown, the rest folded.
        let other = format!(
            r#"ctwatch_table_full_drops_by_total{{dimension="dst_port",key="other"}} {}"#,
            199 - (K - 1)
        );
        assert!(by.contains(&other.as_str()), "{t}");
        // The per-dimension rows add up to the total.
        let sum: u64 = port_rows
            .iter()
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(sum, 699);
    }

    #[test]
    fn keys_that_leave_the_top_k_do_not_linger() {
        let m = Metrics::new(Mode::Tracepoint, "6.18.0");
        m.update(&sample(2, 50));
        let mut s = sample(2, 1);
        s.netns.clear();
        m.update(&s);
        let t = m.encode(Format::Prometheus).unwrap();
        let by = lines_of(&t, "ctwatch_table_full_drops_by_total");
        // One port, one source, one process, one netns: no "other" left.
        assert_eq!(by.len(), 4, "{t}");
        assert!(!t.contains("udp/5354"), "{t}");
        assert!(
            lines_of(&t, "ctwatch_nf_conntrack_entries").is_empty(),
            "{t}"
        );
    }

    #[test]
    fn tracepoint_mode_has_no_kernel_probe_series() {
        let m = Metrics::new(Mode::Tracepoint, "6.18.0");
        m.update(&sample(3, 1));
        let t = m.encode(Format::Prometheus).unwrap();
        assert!(!t.contains("ctwatch_evictions"), "{t}");
        assert!(!t.contains("ctwatch_new_entries_by"), "{t}");
        assert!(
            t.contains(r#"ctwatch_info{mode="tracepoint",kernel="6.18.0"} 1"#),
            "{t}"
        );
    }

    #[test]
    fn counters_never_go_down_between_refreshes() {
        let m = Metrics::new(Mode::Kprobe, "6.1.0");
        let mut s = sample(3, 1);
        m.update(&s);
        s.lost_events = 10;
        m.update(&s);
        // A smaller value (cannot happen with since-start counts) keeps the old one.
        s.lost_events = 2;
        m.update(&s);
        let t = m.encode(Format::Prometheus).unwrap();
        assert!(
            t.lines().any(|l| l == "ctwatch_lost_events_total 10"),
            "{t}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut drops = BreakdownBuilder::default();
        drops.add(dims("198.18.0.2", "udp/53", "evil\"comm\\", 7, "1"), 3);
        let s = Sample {
            drops_by: drops.finish(5),
            ..Default::default()
        };
        let m = Metrics::new(Mode::Tracepoint, "6.18.0");
        m.update(&s);
        let t = m.encode(Format::Prometheus).unwrap();
        assert!(t.contains(r#"key="evil\"comm\\[7]""#), "{t}");
    }

    #[test]
    fn openmetrics_on_request() {
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        let m = Metrics::new(Mode::Tracepoint, "6.18.0");
        m.update(&sample(3, 1));
        let t = m.encode(Format::OpenMetrics).unwrap();
        assert!(t.ends_with("# EOF\n"), "{t}");
        assert!(t.contains(
            r#"ctwatch_table_full_drops_by_total{dimension="dst_port",key="udp/5353"} 500"#
        ));
    }
}
