//! JSON documents and JSON lines (schemas in docs/json.md).
use serde::Serialize;

use conntrack_ebpf::stat;

use crate::{
    aggregate::breakdown::{Breakdown, Item},
    aggregate::reconcile::NetnsRow,
    aggregate::{
        breakdown::BreakdownBuilder,
        sampler::{Count, Sample},
    },
    names::resolver::Process,
    session::Session,
    source::records::{FlowRecord, Kind},
};

/// The `ctwatch report --json` document.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: String,
    pub kernel: String,
    pub duration_s: f64,
    /// Ring-buffer records lost (full buffer) or refused by the decoder.
    pub lost_events: u64,
    pub netns: Vec<NetnsRow>,
    pub drops: Breakdown,
    /// Entries held at the end of the window.
    pub occupancy: Breakdown,
    /// "ctnetlink seed + kernel" (kernel-probe modes) or "ctnetlink" (an end-of-window dump).
    pub occupancy_source: &'static str,
    /// Seconds between the reading of `occupancy` (the start of its dump
    /// in tracepoint mode) and the end of the window; null when none could
    /// be read.
    pub occupancy_age_s: Option<f64>,
    /// Entries created during the window (kernel-probe modes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_flows: Option<Breakdown>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evictions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clashes: Option<u64>,
    /// The evicted entries, by their creation keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evicted: Option<Breakdown>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clashed: Option<Breakdown>,
    /// Where ctwatch and the kernel's counters disagree, and why.
    pub reconciliation: Vec<String>,
    pub counters: ReportCounters,
}

fn breakdown(counts: &[Count], unattributed: u64, top: usize) -> Breakdown {
    BreakdownBuilder::of(counts.iter().map(|c| (&c.flow, c.total)), unattributed).finish(top)
}

impl Report {
    /// The report of one sample over the whole window.
    pub(crate) fn of(session: &Session, s: &Sample, top: usize) -> Self {
        let kernel_entries = s.sees_entries;
        let occupancy = s.held.as_ref();
        let stats = &s.stats;
        let mut reconciliation = s.problems.clone();
        reconciliation.extend(s.reconciliation());
        Report {
            mode: session.mode().map(|m| m.to_string()).unwrap_or_default(),
            kernel: session.release(),
            duration_s: (s.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            lost_events: s.lost_events,
            netns: s.shown_netns().cloned().collect(),
            drops: breakdown(&s.victims, s.unattributed, top),
            occupancy: BreakdownBuilder::of(
                occupancy
                    .iter()
                    .flat_map(|o| o.entries.iter().map(|(f, n)| (f, *n))),
                occupancy.map_or(0, |o| o.unkeyed),
            )
            .finish(top),
            occupancy_source: occupancy.map_or("ctnetlink", |o| o.source),
            occupancy_age_s: occupancy
                .map(|o| (s.elapsed.saturating_sub(o.at).as_secs_f64() * 1000.0).round() / 1000.0),
            new_flows: kernel_entries.then(|| breakdown(&s.created, 0, top)),
            evictions: kernel_entries.then(|| s.evictions()),
            clashes: kernel_entries.then(|| s.clashes()),
            evicted: kernel_entries.then(|| breakdown(&s.evicted, 0, top)),
            clashed: kernel_entries.then(|| breakdown(&s.clashed, 0, top)),
            reconciliation,
            counters: ReportCounters {
                netfilter_drops_any: stats.get(stat::NF_DROP_ANY),
                aggregation_overflow: stats.get(stat::AGG_OVERFLOW),
                decode_errors: stats.get(stat::DECODE_ERR),
                entries_freed: stats.get(stat::FREED),
                inserts: stats.get(stat::INSERTS),
                alloc_failures_not_full: stats.get(stat::ALLOC_ERR),
                events_not_streamed: stats.get(stat::SAMPLED),
                confirm_returns_missed: stats.get(stat::MISSED_CONFIRM),
                early_drop_returns_missed: stats.get(stat::MISSED_EARLY_DROP),
                clash_returns_missed: stats.get(stat::MISSED_CLASH),
                program_runs_skipped: s.runs_skipped(),
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ReportCounters {
    /// Every NETFILTER_DROP in the window, rule drops included.
    pub netfilter_drops_any: u64,
    /// Drops counted in total but beyond the in-kernel key budget ("other").
    pub aggregation_overflow: u64,
    /// Drops whose packet headers could not be read (counted, not decoded).
    pub decode_errors: u64,
    /// Entries freed in the window (kernel-probe modes).
    pub entries_freed: u64,
    /// New entries inserted by `__nf_conntrack_confirm` (kprobe mode); a
    /// clash resolved to the existing entry is not one.
    pub inserts: u64,
    /// Allocation failures that were not a full table. Always 0 since the
    /// kprobe mode stopped hooking the allocation: such failures are never
    /// counted as drops, and the reconciliation shows them as kernel drops
    /// ctwatch did not see.
    pub alloc_failures_not_full: u64,
    /// Per-flow records deliberately not streamed (over the per-CPU stream
    /// budget); they are in every count all the same.
    pub events_not_streamed: u64,
    /// Kprobe mode: calls of `__nf_conntrack_confirm` whose return the
    /// kernel never reported (kretprobe instances exhausted). Each may be
    /// an entry created that `new_flows`, `inserts` and occupancy miss.
    pub confirm_returns_missed: u64,
    /// Kprobe mode: `early_drop` calls whose return was missed: a
    /// table-full drop among them is missing from `drops`.
    pub early_drop_returns_missed: u64,
    /// Kprobe mode: `nf_ct_resolve_clash` calls whose return was missed: a
    /// lost clash among them is missing from `clashes`.
    pub clash_returns_missed: u64,
    /// Runs of ctwatch's programs that the kernel skipped because a BPF
    /// program was already running on that CPU (the programs'
    /// `recursion_misses`): each may be a drop, creation or free no count
    /// saw. Null where the kernel does not count them all (kprobe mode
    /// before 6.7).
    pub program_runs_skipped: Option<u64>,
}

/// One process row as it appears on a drop line.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessRef {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
}

impl From<&Process> for ProcessRef {
    fn from(r: &Process) -> Self {
        Self {
            key: r.name.clone(),
            pid: r.pid,
            role: r.role,
        }
    }
}

/// One `ctwatch drops --json` line for a single dropped flow.
#[derive(Debug, Clone, Serialize)]
pub struct DropLine<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(flatten)]
    pub flow: &'a FlowRecord,
    pub netns_name: Option<String>,
    /// Name of `ifindex_in` (inbound) or `ifindex_out` (local) in that netns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    pub process: ProcessRef,
}

/// One `ctwatch drops --json` line summarising a second of heavy drops.
#[derive(Debug, Clone, Serialize)]
pub struct SummaryLine {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Unix time (seconds) at the end of the interval.
    pub ts: f64,
    pub interval_s: f64,
    /// Exact, from the in-kernel counter.
    pub drops: u64,
    /// Drops printed individually before the stream switched to summaries.
    pub shown: u64,
    /// Per-flow records the kernel did not stream (over budget); counted.
    pub not_streamed: u64,
    pub lost_events: u64,
    pub by_dst_port: Vec<Item>,
    pub by_src_ip: Vec<Item>,
    pub by_process: Vec<Item>,
    pub by_netns: Vec<Item>,
}

impl<'a> DropLine<'a> {
    pub(crate) fn of(
        flow: &'a FlowRecord,
        netns_name: Option<String>,
        interface: Option<String>,
        owner: &Process,
    ) -> Self {
        DropLine {
            kind: match flow.kind {
                Kind::Drop => "drop",
                Kind::Evict => "evict",
                Kind::Clash => "clash",
                Kind::New => "new",
                Kind::SeedFree => "seed_free",
            },
            flow,
            netns_name,
            interface,
            process: owner.into(),
        }
    }
}

impl SummaryLine {
    /// One second of drops from the sample's fresh counts, `shown` of them
    /// printed one by one already.
    pub(crate) fn of(
        s: &Sample,
        shown: u64,
        not_streamed: u64,
        lost_events: u64,
        top: usize,
    ) -> Self {
        let fresh = s.victims.iter().map(|c| (&c.flow, c.fresh));
        let b = BreakdownBuilder::of(fresh, 0).finish(top);
        SummaryLine {
            kind: "summary",
            ts: std::time::SystemTime::now()
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            interval_s: 1.0,
            drops: b.total,
            shown,
            not_streamed,
            lost_events,
            by_dst_port: b.by_dst_port,
            by_src_ip: b.by_src_ip,
            by_process: b.by_process,
            by_netns: b.by_netns,
        }
    }
}

pub fn line<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
