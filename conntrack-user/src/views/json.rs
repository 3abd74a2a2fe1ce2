//! JSON documents and JSON lines (schemas in docs/json.md).
use serde::Serialize;

use crate::{
    aggregate::{Item, RowKey},
    event::FlowRecord,
    reconcile::NetnsRow,
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
    pub drops: crate::aggregate::Breakdown,
    /// Entries held at the end of the window.
    pub occupancy: crate::aggregate::Breakdown,
    /// "ctnetlink seed + kernel" (kernel-probe modes) or "ctnetlink" (an end-of-window dump).
    pub occupancy_source: &'static str,
    /// Entries created during the window (kernel-probe modes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_flows: Option<crate::aggregate::Breakdown>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evictions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clashes: Option<u64>,
    /// The evicted entries, by their creation keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evicted: Option<crate::aggregate::Breakdown>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clashed: Option<crate::aggregate::Breakdown>,
    /// Where ctwatch and the kernel's counters disagree, and why.
    pub reconciliation: Vec<String>,
    pub counters: ReportCounters,
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
    /// Confirmations accepted by `__nf_conntrack_confirm`, resolved
    /// clashes included (kernel-probe modes).
    pub inserts: u64,
    /// Allocation failures with no failed early_drop before them (memory,
    /// not a full table): kept out of `drops`.
    pub alloc_failures_not_full: u64,
    /// Per-flow records deliberately not streamed (over the per-CPU stream
    /// budget); they are in every count all the same.
    pub events_not_streamed: u64,
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

impl From<&RowKey> for ProcessRef {
    fn from(r: &RowKey) -> Self {
        Self {
            key: r.key.clone(),
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

pub fn line<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
