//! `ctwatch doctor`: measure, then judge.
//!
//! [`measure`] gathers facts (settings, counters, an optional eBPF watch,
//! one ctnetlink dump per namespace) into a [`Measured`]; [`diagnose`] is
//! a pure function from that to findings ranked by urgency, each with its
//! evidence and the exact commands that fix it. Keeping the judgement pure
//! lets every rule be tested without privileges.
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    future::Future,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;

use crate::{
    aggregate::summary::{self, has_ports, PortKey, Presence, Summary, TableSettings},
    source::records::Role,
};

mod measure;
mod remedies;
mod rules;
#[cfg(test)]
mod tests;

pub(crate) use measure::measure;
#[cfg(test)]
use measure::*;
use remedies::*;
use rules::*;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DoctorError {
    #[error("cannot read the conntrack counters of any namespace (netns {inum}: {reason})")]
    Unreadable { inum: u32, reason: String },
    #[error(transparent)]
    Session(#[from] crate::session::SessionError),
    #[error(transparent)]
    Table(#[from] summary::SnapshotError),
}

/// Used when the nf_conntrack slab cannot be read: `struct nf_conn` with
/// its extensions and slab alignment is about this size on x86-64.
pub(crate) const FALLBACK_OBJECT_SIZE: u64 = 320;
/// Share of flows (or entries) above which one port or source "dominates".
pub(crate) const DOMINANT_PERCENT: u64 = 50;
/// Fewer flows than this say nothing about who dominates.
pub(crate) const MIN_SAMPLE: u64 = 10;
/// Fill at which the table is reported nearly full.
pub(crate) const NEARLY_FULL_PERCENT: u64 = 80;
/// Fill at which held entries are worth a look for timeouts and notrack.
pub(crate) const PRESSURE_PERCENT: u64 = 50;
/// Entries per bucket beyond which lookups walk long chains.
pub(crate) const MAX_CHAIN: u64 = 4;
/// `nf_conntrack_max` is an int; stay well inside it.
const MAX_SUGGESTED: u64 = 1 << 30;
/// One `struct hlist_nulls_head` per bucket on 64-bit.
const BUCKET_BYTES: u64 = 8;
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// How often the watch dumps the tables, on a thread of its own.
const DUMP_EVERY: Duration = Duration::from_secs(2);
const NOTRACK_TABLE: &str = "ctwatch_notrack";

// ---------------------------------------------------------------- inputs

/// Everything [`diagnose`] judges from.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Measured {
    pub(crate) nf_conntrack: Option<Presence>,
    pub(crate) max: u64,
    pub(crate) buckets: u64,
    pub(crate) object_size: ObjectSize,
    /// Timeouts of the initial namespace.
    pub(crate) timeouts: BTreeMap<String, u64>,
    pub(crate) window: Option<Window>,
    pub(crate) netns: Vec<NetnsMeasure>,
    pub(crate) notes: Vec<String>,
}

/// Size of one conntrack entry in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ObjectSize {
    pub(crate) bytes: u64,
    /// Where it was read, or "assumed".
    pub(crate) source: String,
}

impl Default for ObjectSize {
    fn default() -> Self {
        ObjectSize {
            bytes: FALLBACK_OBJECT_SIZE,
            source: "assumed".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Window {
    pub(crate) secs: f64,
    /// The eBPF mode that watched, or `None` when only counters were read.
    pub(crate) mode: Option<String>,
    /// Whether new entries were seen (kernel-probe modes).
    pub(crate) sees_new_flows: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct NetnsMeasure {
    pub(crate) inum: u32,
    pub(crate) name: Option<String>,
    /// A file to enter it by, for commands that must run inside.
    pub(crate) path: PathBuf,
    pub(crate) is_init: bool,
    pub(crate) count: u64,
    pub(crate) max: u64,
    /// Highest count sampled (the count itself without a window).
    pub(crate) peak: u64,
    /// Growth of the kernel's `drop` counter over the window.
    pub(crate) drops_window: Option<u64>,
    pub(crate) early_drop_window: Option<u64>,
    /// The `drop` counter since the namespace started.
    pub(crate) drops_total: Option<u64>,
    /// Table-full drops ctwatch attributed in the window (eBPF watch only).
    pub(crate) full_drops_seen: Option<u64>,
    /// Entries created in the window (kernel-probe modes only).
    pub(crate) new_flows: Option<Culprits>,
    /// Flows refused an entry because the table was full (eBPF watch only).
    pub(crate) refused: Option<Culprits>,
    /// Entries held at the end, from one ctnetlink dump.
    pub(crate) held: Option<TableContents>,
    /// This namespace's own timeouts (each namespace has a copy).
    pub(crate) timeouts: BTreeMap<String, u64>,
}

/// Who made a set of flows: the leading port and the leading source.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Culprits {
    pub(crate) total: u64,
    pub(crate) port: Option<PortShare>,
    pub(crate) src: Option<SrcShare>,
    /// The leading destination (before NAT), with where NAT sends it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) service: Option<ServiceShare>,
    /// The leading pod or container (the origin's, else the destination's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pod: Option<PodShare>,
}

/// A destination address and port, before NAT.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ServiceShare {
    pub(crate) proto: u8,
    pub(crate) addr: IpAddr,
    pub(crate) port: u16,
    /// Where NAT sends it, when an entry of the table shows a translation.
    pub(crate) backend: Option<(IpAddr, u16)>,
    /// Neither end lives in this namespace: it only forwards the flows.
    pub(crate) forwarded: bool,
    pub(crate) count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct PodShare {
    pub(crate) name: String,
    pub(crate) count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct PortShare {
    pub(crate) proto: u8,
    pub(crate) port: u16,
    /// Inbound (to a local listener or forwarded), local (sent from here),
    /// or unknown (a dump carries no hook context).
    pub(crate) role: Role,
    pub(crate) count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct SrcShare {
    pub(crate) ip: IpAddr,
    pub(crate) role: Role,
    pub(crate) count: u64,
}

/// The entries a namespace holds, from a dump.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct TableContents {
    pub(crate) total: u64,
    pub(crate) tcp_states: BTreeMap<String, u64>,
    pub(crate) udp: u64,
    pub(crate) udp_unreplied: u64,
    pub(crate) ipv6: u64,
    pub(crate) port: Option<PortShare>,
    pub(crate) src: Option<SrcShare>,
}

// --------------------------------------------------------------- outputs

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Severity {
    Critical,
    Warning,
    Info,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Finding {
    pub(crate) severity: Severity,
    /// Stable identifier of the rule that fired.
    pub(crate) rule: &'static str,
    pub(crate) title: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) netns: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) netns_name: Option<String>,
    pub(crate) evidence: String,
    /// Exact commands, in the order to consider them.
    pub(crate) remedies: Vec<String>,
    /// What the remedies cost or break.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) caveats: Vec<String>,
}

/// The `ctwatch doctor --json` document.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Diagnosis {
    pub(crate) findings: Vec<Finding>,
    pub(crate) window: Option<Window>,
    pub(crate) object_size: ObjectSize,
    /// The per-namespace measurements the findings were judged from.
    pub(crate) netns: Vec<NetnsMeasure>,
    pub(crate) notes: Vec<String>,
}

impl Diagnosis {
    /// Judges `m` and keeps its facts alongside the findings.
    pub(crate) fn new(m: Measured) -> Self {
        Diagnosis {
            findings: diagnose(&m),
            window: m.window,
            object_size: m.object_size,
            netns: m.netns,
            notes: m.notes,
        }
    }
}
