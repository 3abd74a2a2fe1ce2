//! The Prometheus exposition of `ctwatch serve`: the latest [`Sample`]
//! encoded by a prometheus-client [`Collector`] when a scrape asks.
//!
//! Names follow node_exporter's `node_nf_conntrack_*` with a `ctwatch_`
//! prefix, so dashboards built for one read naturally with the other.
//! Every scrape encodes the latest sample only: a namespace that vanished,
//! or a key that fell out of the top K, has no series at the next scrape,
//! so cardinality stays bounded by (namespaces × 7) + (4 dimensions ×
//! (K + 1)) per top-K family.
use std::{
    sync::{Arc, PoisonError, RwLock},
    time::Instant,
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        prometheus_text, text, DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder,
    },
    metrics::{counter::ConstCounter, gauge::ConstGauge, info::Info, MetricType},
    registry::Registry,
};

use crate::{
    aggregate::{
        breakdown::{Breakdown, BreakdownBuilder, Item},
        reconcile::NetnsRow,
        sampler::{Count, Sample},
    },
    kernel::compat::Mode,
    source::maps::RETURN_PROBES,
    views::label::Label,
};

#[derive(Debug, thiserror::Error)]
#[error("cannot encode the metrics exposition: a label or help text could not be written")]
pub(crate) struct EncodeError;

/// Labels of the per-namespace series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NetnsLabels {
    netns: String,
    netns_name: String,
}

/// Labels of a top-K series: `dimension` and `key`, and `container` (the
/// pod or container of the process the row names) only where there is one.
type ByLabels = Vec<(&'static str, String)>;

/// What a scrape encodes: the latest sample, reduced to its series.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Exported {
    pub(crate) netns: Vec<NetnsRow>,
    /// Events lost to a full ring buffer or refused by the decoder, since start.
    pub(crate) lost_events: u64,
    /// Kernel-probe modes only: successful early-drop evictions since start.
    pub(crate) evictions: u64,
    /// Kernel-probe modes only: insert clashes since start.
    pub(crate) clashes: u64,
    /// Kernel-probe modes only: returns the kernel's kretprobes missed
    /// since start, for `__nf_conntrack_confirm`, `early_drop` and
    /// `nf_ct_resolve_clash`.
    pub(crate) returns_missed: [u64; 3],
    /// Runs of ctwatch's programs the kernel skipped since start, where
    /// it counts them all.
    pub(crate) runs_skipped: Option<u64>,
    /// Victims: table-full drops since start.
    pub(crate) drops_by: Breakdown,
    /// Culprits: entries held now.
    pub(crate) entries_by: Breakdown,
    /// When `entries_by` was true: its age is measured at scrape time.
    pub(crate) entries_at: Option<Instant>,
    /// Culprits (kernel-probe modes): entries created since start.
    pub(crate) new_entries_by: Option<Breakdown>,
}

impl Default for Exported {
    fn default() -> Self {
        let empty = BreakdownBuilder::new(1).finish(1);
        Exported {
            netns: Vec::new(),
            lost_events: 0,
            evictions: 0,
            clashes: 0,
            returns_missed: [0; 3],
            runs_skipped: None,
            drops_by: empty.clone(),
            entries_by: empty,
            entries_at: None,
            new_entries_by: None,
        }
    }
}

fn breakdown(counts: &[Count], unattributed: u64, top: usize) -> Breakdown {
    BreakdownBuilder::of(counts.iter().map(|c| (&c.flow, c.total)), unattributed).finish(top)
}

impl Exported {
    pub(crate) fn of(s: &Sample, top: usize) -> Self {
        let held = s
            .held
            .iter()
            .flat_map(|o| o.entries.iter().map(|(f, n)| (f, *n)));
        Exported {
            netns: s.netns.clone(),
            lost_events: s.lost_events,
            evictions: s.evictions(),
            clashes: s.clashes(),
            returns_missed: RETURN_PROBES.map(|(i, _)| s.stats.get(i)),
            runs_skipped: s.runs_skipped(),
            drops_by: breakdown(&s.victims, s.unattributed, top),
            entries_by: BreakdownBuilder::of(held, s.held.as_ref().map_or(0, |o| o.unkeyed))
                .finish(top),
            // The sample's clock ran to `elapsed` just now.
            entries_at: s
                .held
                .as_ref()
                .and_then(|o| Instant::now().checked_sub(s.elapsed.saturating_sub(o.at))),
            new_entries_by: s.sees_entries.then(|| breakdown(&s.created, 0, top)),
        }
    }
}

/// Text format of a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// Prometheus text 0.0.4: what curl and most scrapers get.
    Prometheus,
    /// OpenMetrics 1.0, when the scraper asks for it.
    OpenMetrics,
}

impl Format {
    /// Picks the format from an HTTP `Accept` header.
    pub(crate) fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The dimensions every top-K family is broken down by: the victim's or
/// culprit's port, source, process and namespace, both ends of the flow
/// (`origin`, `service`) and the pod or container it belongs to.
const DIMENSIONS: [&str; 7] = [
    "dst_port", "src_ip", "process", "netns", "origin", "service", "pod",
];

fn dimension<'a>(b: &'a Breakdown, dim: &str) -> &'a [Item] {
    match dim {
        "dst_port" => &b.by_dst_port,
        "src_ip" => &b.by_src_ip,
        "process" => &b.by_process,
        "origin" => &b.by_origin,
        "service" => &b.by_service,
        "pod" => &b.by_pod,
        _ => &b.by_netns,
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The latest values, encoded at scrape time.
#[derive(Debug)]
struct Latest {
    /// The evictions, clashes and new-entry series exist only in the modes
    /// that see entries: in tracepoint mode a constant 0 would claim "no
    /// evictions" where ctwatch simply cannot see.
    sees_entries: bool,
    values: RwLock<Exported>,
}

/// One family: its descriptor, then one series per label set.
fn family<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in series {
        let one: MetricEncoder = m.encode_family(&labels)?;
        value(one, kind, v)?;
    }
    Ok(())
}

fn value(m: MetricEncoder, kind: MetricType, v: u64) -> Result<(), std::fmt::Error> {
    match kind {
        MetricType::Counter => ConstCounter::new(v).encode(m),
        _ => ConstGauge::new(to_i64(v)).encode(m),
    }
}

fn single(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    value(m, MetricType::Counter, v)
}

/// Two rows can share a label (same command and pid seen both as listener
/// and sender): their counts add up.
fn by_series(b: &Breakdown) -> Vec<(ByLabels, u64)> {
    let mut out: Vec<(ByLabels, u64)> = Vec::new();
    for dim in DIMENSIONS {
        for it in dimension(b, dim) {
            let mut l: ByLabels = vec![
                ("dimension", dim.to_string()),
                ("key", Label::from(it).short()),
            ];
            if let Some(c) = &it.container {
                l.push(("container", c.clone()));
            }
            match out.iter_mut().find(|(k, _)| *k == l) {
                Some((_, n)) => *n += it.count,
                None => out.push((l, it.count)),
            }
        }
    }
    out
}

impl Collector for Latest {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let v = self.values.read().unwrap_or_else(PoisonError::into_inner);
        let labels = |ns: &NetnsRow| NetnsLabels {
            netns: ns.inum.to_string(),
            netns_name: ns.name.clone().unwrap_or_default(),
        };
        let per_ns = |f: fn(&NetnsRow) -> Option<u64>| {
            v.netns
                .iter()
                .filter_map(|ns| Some((labels(ns), f(ns)?)))
                .collect::<Vec<_>>()
        };
        use MetricType::{Counter, Gauge};
        let e = &mut enc;
        family(
            e,
            "ctwatch_nf_conntrack_entries",
            "Conntrack entries in the namespace (nf_conntrack_count)",
            Gauge,
            per_ns(|n| n.count),
        )?;
        family(
            e,
            "ctwatch_nf_conntrack_entries_limit",
            "Table size of the namespace (nf_conntrack_max)",
            Gauge,
            per_ns(|n| n.max),
        )?;
        family(
            e,
            "ctwatch_nf_conntrack_buckets",
            "Hash buckets of the table (nf_conntrack_buckets)",
            Gauge,
            per_ns(|n| n.buckets),
        )?;
        family(e, "ctwatch_nf_conntrack_stat_drop", "Kernel conntrack drop counter of the namespace (any conntrack drop, not only table full)", Counter, per_ns(|n| Some(n.kernel.as_ref()?.drop)))?;
        family(
            e,
            "ctwatch_nf_conntrack_stat_early_drop",
            "Kernel count of entries evicted to make room (early_drop)",
            Counter,
            per_ns(|n| Some(n.kernel.as_ref()?.early_drop)),
        )?;
        family(
            e,
            "ctwatch_nf_conntrack_stat_insert_failed",
            "Kernel count of failed inserts (clashes lost)",
            Counter,
            per_ns(|n| Some(n.kernel.as_ref()?.insert_failed)),
        )?;
        family(
            e,
            "ctwatch_table_full_drops",
            "Packets dropped because the table was full, seen by ctwatch since it started",
            Counter,
            per_ns(|n| Some(n.drops_seen)),
        )?;
        single(
            e,
            "ctwatch_lost_events",
            "Events lost to a full ring buffer or refused by the decoder since start",
            v.lost_events,
        )?;
        // Absent, not 0, where the kernel does not count them all.
        if let Some(n) = v.runs_skipped {
            single(
                e,
                "ctwatch_program_runs_skipped",
                "Runs of ctwatch's programs the kernel skipped since start because a BPF program was already running on that CPU: each may be a drop, creation or free no count saw",
                n,
            )?;
        }
        if self.sees_entries {
            single(
                e,
                "ctwatch_evictions",
                "Entries evicted by early_drop since start",
                v.evictions,
            )?;
            single(
                e,
                "ctwatch_clashes",
                "Insert clashes since start",
                v.clashes,
            )?;
            // Its own family, not a reason of ctwatch_lost_events: those are
            // records lost on the way with every count exact, these are
            // calls no count saw.
            family(
                e,
                "ctwatch_probe_returns_missed",
                "Returns of a probed kernel function that its kretprobe missed (instances exhausted) since start: each may be a creation, drop or clash no count saw",
                Counter,
                RETURN_PROBES
                    .iter()
                    .zip(v.returns_missed)
                    .map(|((_, f), n)| (vec![("function", f.to_string())], n)),
            )?;
        }
        family(e, "ctwatch_table_full_drops_by", "Table-full drops since start by victim, top K per dimension, the rest under key=\"other\"", Counter, by_series(&v.drops_by))?;
        family(
            e,
            "ctwatch_entries_by",
            "Entries held now by culprit, top K per dimension, the rest under key=\"other\"",
            Gauge,
            by_series(&v.entries_by),
        )?;
        if let Some(at) = v.entries_at {
            let m = e.encode_descriptor(
                "ctwatch_occupancy_age_seconds",
                "Seconds since ctwatch_entries_by was read: in tracepoint mode, since its ctnetlink dump began",
                None,
                Gauge,
            )?;
            ConstGauge::new(at.elapsed().as_secs_f64()).encode(m)?;
        }
        if let (true, Some(b)) = (self.sees_entries, &v.new_entries_by) {
            family(e, "ctwatch_new_entries_by", "Entries created since start by culprit, top K per dimension, the rest under key=\"other\"", Counter, by_series(b))?;
        }
        Ok(())
    }
}

/// The registry: a static info series and the collector of the latest
/// sample. Shared between the refresh loop and the HTTP handlers.
pub(crate) struct Metrics {
    registry: Registry,
    latest: Arc<Latest>,
}

impl Metrics {
    pub(crate) fn new(mode: Option<Mode>, kernel: &str) -> Self {
        let latest = Arc::new(Latest {
            sees_entries: mode.is_some_and(Mode::sees_entries),
            values: RwLock::new(Exported::default()),
        });
        let mut registry = Registry::default();
        registry.register(
            "ctwatch",
            "ctwatch attach mode and kernel release",
            Info::new(vec![
                (
                    "mode".to_string(),
                    mode.map_or_else(|| "none".into(), |m| m.to_string()),
                ),
                ("kernel".to_string(), kernel.to_string()),
            ]),
        );
        registry.register_collector(Box::new(latest.clone()));
        Metrics { registry, latest }
    }

    /// Makes `e` what the next scrape encodes. Counters are cumulative
    /// since start already; one that would go down keeps its last value.
    pub(crate) fn publish(&self, mut e: Exported) {
        let mut v = self
            .latest
            .values
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        e.lost_events = e.lost_events.max(v.lost_events);
        e.evictions = e.evictions.max(v.evictions);
        e.clashes = e.clashes.max(v.clashes);
        for (n, was) in e.returns_missed.iter_mut().zip(v.returns_missed) {
            *n = (*n).max(was);
        }
        e.runs_skipped = e.runs_skipped.max(v.runs_skipped);
        *v = e;
    }

    /// The exposition text of the latest sample.
    pub(crate) fn encode(&self, format: Format) -> Result<String, EncodeError> {
        let mut out = String::new();
        match format {
            Format::Prometheus => prometheus_text::encode(&mut out, &self.registry),
            Format::OpenMetrics => text::encode(&mut out, &self.registry),
        }
        .map_err(|_| EncodeError)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{aggregate::breakdown::tests::flow, source::counters::CtStats};

    fn sample(top: usize, ports: u16) -> Exported {
        let mut drops = BreakdownBuilder::default();
        for p in 0..ports {
            // Port 5353 gets the most; the others one each.
            let n = if p == 0 { 500 } else { 1 };
            let src = format!("198.18.{}.{}", p / 250, p % 250 + 1);
            drops.add(
                &flow(&src, 17, 5353 + p, "ctpeer", 100 + u32::from(p), 4026532177),
                n,
            );
        }
        let mut occ = BreakdownBuilder::default();
        occ.add(&flow("198.18.0.2", 6, 7400, "ctpeer", 42, 4026532177), 16);
        let total = drops.finish(top).total;
        Exported {
            netns: vec![NetnsRow {
                inum: 4026532177,
                name: Some("lab-srv".into()),
                count: Some(16),
                max: Some(16),
                buckets: Some(1024),
                kernel: Some(CtStats {
                    drop: 700,
                    early_drop: 3,
                    insert_failed: 2,
                    ..Default::default()
                }),
                drops_seen: total,
                ..Default::default()
            }],
            lost_events: 4,
            evictions: 9,
            clashes: 1,
            returns_missed: [5, 0, 2],
            runs_skipped: Some(6),
            drops_by: drops.finish(top),
            entries_by: occ.finish(top),
            entries_at: Instant::now().checked_sub(std::time::Duration::from_secs(40)),
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
        let m = Metrics::new(Some(Mode::Kprobe), "6.1.0-test");
        m.publish(sample(3, 1));
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
            "ctwatch_program_runs_skipped_total 6".into(),
            r#"ctwatch_probe_returns_missed_total{function="__nf_conntrack_confirm"} 5"#.into(),
            r#"ctwatch_probe_returns_missed_total{function="early_drop"} 0"#.into(),
            r#"ctwatch_probe_returns_missed_total{function="nf_ct_resolve_clash"} 2"#.into(),
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
    fn occupancy_age_is_taken_at_scrape_time() {
        let m = Metrics::new(Some(Mode::Tracepoint), "6.18.0");
        m.publish(sample(3, 1));
        let t = m.encode(Format::Prometheus).unwrap();
        let age: f64 = lines_of(&t, "ctwatch_occupancy_age_seconds")
            .first()
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no age in:\n{t}"));
        // Read 40 s before the publish; scraped right after it.
        assert!((40.0..45.0).contains(&age), "{age}");
        assert!(
            t.contains("# TYPE ctwatch_occupancy_age_seconds gauge"),
            "{t}"
        );

        // No occupancy read yet: no age to claim.
        m.publish(Exported::default());
        let t = m.encode(Format::Prometheus).unwrap();
        assert!(!t.contains("ctwatch_occupancy_age_seconds"), "{t}");
    }

    #[test]
    fn top_k_is_bounded_with_an_other_row() {
        const K: usize = 3;
        let m = Metrics::new(Some(Mode::Tracepoint), "6.18.0");
        m.publish(sample(K, 200));
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
        let m = Metrics::new(Some(Mode::Tracepoint), "6.18.0");
        m.publish(sample(2, 50));
        let mut s = sample(2, 1);
        s.netns.clear();
        m.publish(s);
        let t = m.encode(Format::Prometheus).unwrap();
        let by = lines_of(&t, "ctwatch_table_full_drops_by_total");
        // One row per dimension (one port, one source, one process...):
        // no "other" left.
        assert_eq!(by.len(), DIMENSIONS.len(), "{t}");
        assert!(!t.contains("udp/5354"), "{t}");
        assert!(
            lines_of(&t, "ctwatch_nf_conntrack_entries").is_empty(),
            "{t}"
        );
    }

    #[test]
    fn uncounted_skips_are_absent_not_zero() {
        let m = Metrics::new(Some(Mode::Kprobe), "6.1.0-test");
        let mut s = sample(3, 1);
        s.runs_skipped = None;
        m.publish(s);
        let t = m.encode(Format::Prometheus).unwrap();
        assert!(!t.contains("ctwatch_program_runs_skipped"), "{t}");
    }

    #[test]
    fn tracepoint_mode_has_no_kernel_probe_series() {
        let m = Metrics::new(Some(Mode::Tracepoint), "6.18.0");
        m.publish(sample(3, 1));
        let t = m.encode(Format::Prometheus).unwrap();
        assert!(!t.contains("ctwatch_evictions"), "{t}");
        assert!(!t.contains("ctwatch_new_entries_by"), "{t}");
        assert!(!t.contains("ctwatch_probe_returns_missed"), "{t}");
        assert!(
            t.contains(r#"ctwatch_info{mode="tracepoint",kernel="6.18.0"} 1"#),
            "{t}"
        );
    }

    #[test]
    fn counters_never_go_down_between_refreshes() {
        let m = Metrics::new(Some(Mode::Kprobe), "6.1.0");
        let mut s = sample(3, 1);
        m.publish(s.clone());
        s.lost_events = 10;
        m.publish(s.clone());
        // A smaller value (cannot happen with since-start counts) keeps the old one.
        s.lost_events = 2;
        m.publish(s);
        let t = m.encode(Format::Prometheus).unwrap();
        assert!(
            t.lines().any(|l| l == "ctwatch_lost_events_total 10"),
            "{t}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut drops = BreakdownBuilder::default();
        drops.add(&flow("198.18.0.2", 17, 53, "evil\"comm\\", 7, 1), 3);
        let s = Exported {
            drops_by: drops.finish(5),
            ..Default::default()
        };
        let m = Metrics::new(Some(Mode::Tracepoint), "6.18.0");
        m.publish(s);
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
        let m = Metrics::new(Some(Mode::Tracepoint), "6.18.0");
        m.publish(sample(3, 1));
        let t = m.encode(Format::OpenMetrics).unwrap();
        assert!(t.ends_with("# EOF\n"), "{t}");
        assert!(t.contains(
            r#"ctwatch_table_full_drops_by_total{dimension="dst_port",key="udp/5353"} 500"#
        ));
    }
}
