//! Compares what ctwatch attributed with the kernel's own per-netns
//! conntrack counters, and says plainly where and why they differ.
use std::collections::HashMap;

use serde::Serialize;

use crate::{
    source::counters::{self, CtStats, StatsSource, Sysctl},
    source::netns::NetnsInfo,
};

/// Counters of one netns at one instant.
#[derive(Debug, Clone)]
pub(crate) struct NetnsSnapshot {
    pub info: NetnsInfo,
    pub stats: Option<(CtStats, StatsSource)>,
    pub sysctl: Option<Sysctl>,
    /// Why a read failed (netns vanished, conntrack not loaded there, ...).
    pub error: Option<String>,
}

pub(crate) fn snapshot(scope: &[NetnsInfo]) -> HashMap<u32, NetnsSnapshot> {
    scope
        .iter()
        .map(|ns| {
            let mut error = None;
            let stats = counters::read_stats(ns)
                .map_err(|e| error = Some(e.to_string()))
                .ok();
            let sysctl = counters::read_sysctl(ns)
                .map_err(|e| error = Some(e.to_string()))
                .ok();
            (
                ns.inum,
                NetnsSnapshot {
                    info: ns.clone(),
                    stats,
                    sysctl,
                    error,
                },
            )
        })
        .collect()
}

/// One namespace in one sample: the kernel's counters now, their growth
/// over the window, and what ctwatch attributed to it. The one
/// per-namespace record every view reads.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub(crate) struct NetnsRow {
    pub(crate) inum: u32,
    pub(crate) name: Option<String>,
    pub(crate) count: Option<u64>,
    pub(crate) max: Option<u64>,
    pub(crate) buckets: Option<u64>,
    /// Growth of the kernel's `drop` counter over the window.
    pub(crate) drops_kernel: Option<u64>,
    /// Table-full drops ctwatch attributed to this netns.
    pub(crate) drops_seen: u64,
    pub(crate) early_drop: Option<u64>,
    pub(crate) insert_failed: Option<u64>,
    /// Where the kernel counters came from: "procfs" or "ctnetlink".
    pub(crate) stats_source: Option<&'static str>,
    /// `ip netns` name, else the inode with its container.
    #[serde(skip)]
    pub(crate) label: String,
    /// The kernel's counters as it reports them: cumulative since the
    /// namespace was created, not since ctwatch started.
    #[serde(skip)]
    pub(crate) kernel: Option<CtStats>,
    /// Entries created since start (kernel-probe modes).
    #[serde(skip)]
    pub(crate) created: Option<u64>,
    /// Why a read failed (vanished, conntrack not in use there, ...).
    #[serde(skip)]
    pub(crate) error: Option<String>,
}

impl NetnsRow {
    /// Conntrack in use, or drops on either side.
    pub(crate) fn is_active(&self) -> bool {
        self.drops_seen > 0
            || self.drops_kernel.unwrap_or(0) > 0
            || self.count.unwrap_or(0) > 0
            || self.early_drop.unwrap_or(0) > 0
    }
}

fn source_name(s: &StatsSource) -> &'static str {
    match s {
        StatsSource::ProcFs => "procfs",
        StatsSource::Ctnetlink => "ctnetlink",
    }
}

/// One namespace's row from its counters at the window's start and now.
pub(crate) fn row(
    start: Option<&NetnsSnapshot>,
    now: Option<&NetnsSnapshot>,
    seen: u64,
) -> NetnsRow {
    let delta = |f: fn(&CtStats) -> u64| -> Option<u64> {
        // A namespace first seen after the start started from zero.
        let a = match start {
            Some(s) => f(&s.stats.as_ref()?.0),
            None => 0,
        };
        let b = now?.stats.as_ref()?;
        Some(f(&b.0).saturating_sub(a))
    };
    let sysctl = now
        .and_then(|x| x.sysctl.as_ref())
        .or(start.and_then(|x| x.sysctl.as_ref()));
    let info = now.or(start).map(|x| &x.info);
    NetnsRow {
        inum: info.map_or(0, |i| i.inum),
        name: info.and_then(|i| i.name.clone()),
        count: sysctl.map(|x| x.count),
        max: sysctl.map(|x| x.max),
        buckets: sysctl.map(|x| x.buckets),
        drops_kernel: delta(|c| c.drop),
        drops_seen: seen,
        early_drop: delta(|c| c.early_drop),
        insert_failed: delta(|c| c.insert_failed),
        stats_source: now
            .and_then(|x| x.stats.as_ref())
            .map(|(_, src)| source_name(src)),
        label: String::new(),
        kernel: now.and_then(|x| x.stats.as_ref()).map(|(s, _)| s.clone()),
        created: None,
        error: match now {
            Some(n) => n.error.clone(),
            None => Some("vanished during the window; its counters end early".into()),
        },
    }
}

/// What the explanation of a mismatch depends on.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Context {
    /// The kernel-probe modes see conntrack's own allocation failure; the
    /// tracepoint mode infers it from the drop reason.
    pub kernel_probes: bool,
    /// Drops known only as a total (over the in-kernel key budget, or
    /// unreadable), so absent from every namespace's `drops_seen`.
    pub unattributed: u64,
}

/// One sentence when ctwatch and the kernel disagree about a netns.
pub(crate) fn explain(row: &NetnsRow, why: &Context) -> Option<String> {
    let kernel = row.drops_kernel?;
    let seen = row.drops_seen;
    let inum = row.inum;
    if kernel == seen {
        return None;
    }
    Some(if seen > kernel {
        if why.kernel_probes {
            format!(
                "netns {inum}: ctwatch saw {seen} failed allocations with no room, but conntrack \
                 counted {kernel} drops: the kernel counters were read a moment apart from the \
                 window's edges (a drop at the edge lands on one side only)"
            )
        } else {
            format!(
                "netns {inum}: ctwatch saw {seen} NETFILTER_DROP packets without a conntrack entry, \
                 but conntrack counted {kernel} drops: {} were dropped before conntrack ran \
                 (a raw-table or priority < -200 DROP rule, or a netns where conntrack is not in use), \
                 not by a full table",
                seen - kernel
            )
        }
    } else {
        let unkeyed = if why.unattributed > 0 {
            format!(
                "; {} drops overflowed the in-kernel key budget and are counted without a namespace",
                why.unattributed
            )
        } else {
            String::new()
        };
        format!(
            "netns {inum}: conntrack counted {kernel} drops, ctwatch attributed {seen}: \
             the other {} are conntrack drops of other kinds (packets a protocol tracker \
             refused, failed clash resolution, a failed allocation){unkeyed}",
            kernel - seen
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kernel: Option<u64>, seen: u64) -> NetnsRow {
        NetnsRow {
            inum: 4026532177,
            name: None,
            count: Some(100),
            max: Some(100),
            buckets: Some(1024),
            drops_kernel: kernel,
            drops_seen: seen,
            early_drop: Some(0),
            insert_failed: Some(0),
            stats_source: Some("procfs"),
            ..Default::default()
        }
    }

    #[test]
    fn agreement_needs_no_note() {
        assert_eq!(explain(&row(Some(199), 199), &Context::default()), None);
    }

    #[test]
    fn raw_table_drops_show_up_as_seen_above_kernel() {
        let n = explain(&row(Some(0), 50), &Context::default()).unwrap();
        assert!(n.contains("before conntrack ran"), "{n}");
        assert!(n.contains("50 were dropped"), "{n}");
    }

    #[test]
    fn other_conntrack_drops_show_up_as_kernel_above_seen() {
        let why = Context {
            kernel_probes: false,
            unattributed: 3,
        };
        let n = explain(&row(Some(10), 4), &why).unwrap();
        assert!(n.contains("the other 6"), "{n}");
        assert!(n.contains("3 drops overflowed"), "{n}");
        let probes = Context {
            kernel_probes: true,
            unattributed: 0,
        };
        let n = explain(&row(Some(0), 2), &probes).unwrap();
        assert!(
            !n.contains("raw-table"),
            "kprobe mode cannot see rule drops: {n}"
        );
    }

    #[test]
    fn unknown_kernel_counter_is_not_a_mismatch() {
        assert_eq!(explain(&row(None, 5), &Context::default()), None);
    }
}
