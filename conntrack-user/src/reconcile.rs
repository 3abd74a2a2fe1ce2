//! Compares what ctwatch attributed with the kernel's own per-netns
//! conntrack counters, and says plainly where and why they differ.
use std::collections::HashMap;

use serde::Serialize;

use crate::{
    counters::{self, CtStats, StatsSource, Sysctl},
    netns::NetnsInfo,
};

/// Counters of one netns at one instant.
#[derive(Debug, Clone)]
pub struct NetnsSnapshot {
    pub info: NetnsInfo,
    pub stats: Option<(CtStats, StatsSource)>,
    pub sysctl: Option<Sysctl>,
    /// Why a read failed (netns vanished, conntrack not loaded there, ...).
    pub error: Option<String>,
}

pub fn snapshot(scope: &[NetnsInfo]) -> HashMap<u32, NetnsSnapshot> {
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

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NetnsRow {
    pub inum: u32,
    pub name: Option<String>,
    pub count: Option<u64>,
    pub max: Option<u64>,
    pub buckets: Option<u64>,
    /// Growth of the kernel's `drop` counter over the window.
    pub drops_kernel: Option<u64>,
    /// Table-full drops ctwatch attributed to this netns.
    pub drops_seen: u64,
    pub early_drop: Option<u64>,
    pub insert_failed: Option<u64>,
    /// Where the kernel counters came from: "procfs" or "ctnetlink".
    pub stats_source: Option<&'static str>,
}

fn source_name(s: &StatsSource) -> &'static str {
    match s {
        StatsSource::ProcFs => "procfs",
        StatsSource::Ctnetlink => "ctnetlink",
    }
}

/// Rows for every netns that matters in this window (conntrack in use,
/// drops on either side, or asked for by name), plus one note per mismatch.
pub fn rows(
    start: &HashMap<u32, NetnsSnapshot>,
    end: &HashMap<u32, NetnsSnapshot>,
    seen: &HashMap<u32, u64>,
    why: &Context,
    keep_all: bool,
) -> (Vec<NetnsRow>, Vec<String>) {
    let mut inums: Vec<u32> = start.keys().chain(seen.keys()).copied().collect();
    inums.sort_unstable();
    inums.dedup();
    let mut out = Vec::new();
    let mut notes = Vec::new();
    for inum in inums {
        let s = start.get(&inum);
        let e = end.get(&inum);
        let seen_n = seen.get(&inum).copied().unwrap_or(0);
        let delta = |f: fn(&CtStats) -> u64| -> Option<u64> {
            let a = s?.stats.as_ref()?;
            let b = e?.stats.as_ref()?;
            Some(f(&b.0).saturating_sub(f(&a.0)))
        };
        let drops_kernel = delta(|c| c.drop);
        let sysctl = e
            .and_then(|x| x.sysctl.as_ref())
            .or(s.and_then(|x| x.sysctl.as_ref()));
        let row = NetnsRow {
            inum,
            name: s.or(e).and_then(|x| x.info.name.clone()),
            count: sysctl.map(|x| x.count),
            max: sysctl.map(|x| x.max),
            buckets: sysctl.map(|x| x.buckets),
            drops_kernel,
            drops_seen: seen_n,
            early_drop: delta(|c| c.early_drop),
            insert_failed: delta(|c| c.insert_failed),
            stats_source: e
                .and_then(|x| x.stats.as_ref())
                .map(|(_, src)| source_name(src)),
        };
        let active = seen_n > 0
            || drops_kernel.unwrap_or(0) > 0
            || row.count.unwrap_or(0) > 0
            || row.early_drop.unwrap_or(0) > 0;
        if !(active || keep_all) {
            continue;
        }
        if let Some(note) = explain(&row, why) {
            notes.push(note);
        }
        if s.is_some() && e.is_none() {
            notes.push(format!(
                "netns {inum}: vanished during the window; its counters end early"
            ));
        } else if let Some(err) = e.and_then(|x| x.error.as_ref()) {
            notes.push(format!("netns {inum}: {err}"));
        }
        out.push(row);
    }
    (out, notes)
}

/// What the explanation of a mismatch depends on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context {
    /// The kernel-probe modes see conntrack's own allocation failure; the
    /// tracepoint mode infers it from the drop reason.
    pub kernel_probes: bool,
    /// Drops known only as a total (over the in-kernel key budget, or
    /// unreadable), so absent from every namespace's `drops_seen`.
    pub unattributed: u64,
}

/// One sentence when ctwatch and the kernel disagree about a netns.
pub fn explain(row: &NetnsRow, why: &Context) -> Option<String> {
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
