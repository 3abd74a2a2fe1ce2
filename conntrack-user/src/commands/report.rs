//! `ctwatch report`: watch for a window, then print one report.
use std::time::Instant;

use conntrack_ebpf::stat;

use crate::{
    cli::Settings,
    error::Error,
    occupancy::{self, Held},
    reconcile,
    source::counts_since,
    views::{json, text},
    watch::Watch,
};

pub async fn run(
    settings: &Settings,
    duration: std::time::Duration,
    as_json: bool,
) -> Result<(), Error> {
    let stop = super::stop_requested()?;
    tokio::pin!(stop);
    // A report needs one record per key (to name owners while they live);
    // the counts come from the in-kernel maps.
    let mut w = Watch::start(settings, false, 64)?;
    let kernel_entries = w.loaded.mode.sees_entries();
    let scope_ns = w.scope.namespaces()?;
    let start_counters = reconcile::snapshot(&scope_ns);
    let counts_before = w.source.counts()?;
    let stats_before = w.source.stats()?;
    let mut notes = Vec::new();
    // Entries that predate attach: seeded once, then kept current by the
    // kernel's frees of pre-existing entries.
    let mut held = if kernel_entries {
        Some(Held::seed(&w.source, &scope_ns, &mut notes)?)
    } else {
        None
    };
    eprintln!(
        "{}; reporting after {:.1}s (Ctrl-C to stop early)",
        w.banner(),
        duration.as_secs_f64()
    );
    let t0 = Instant::now();
    let deadline = tokio::time::sleep(duration);
    tokio::pin!(deadline);
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = &mut stop => break,
            r = w.source.next_batch(&mut batch) => {
                r?;
                for ev in batch.drain(..) {
                    // Name owners now, while their processes still exist.
                    w.observe(&ev);
                }
            }
        }
    }
    let elapsed = t0.elapsed();
    w.source.drain_now(&mut batch);
    for ev in batch.drain(..) {
        w.observe(&ev);
    }
    let stats = w.source.stats()?.since(&stats_before);
    let counts_now = w.source.counts()?;
    let deltas = counts_since(&counts_now, &counts_before);
    // Namespaces created during the window count too.
    let mut end_ns = w.scope.namespaces().unwrap_or_default();
    for ns in &scope_ns {
        if !end_ns.iter().any(|n| n.inum == ns.inum) {
            end_ns.push(ns.clone());
        }
    }
    let end_counters = reconcile::snapshot(&end_ns);
    let mut start_counters = start_counters;
    for (k, v) in &end_counters {
        start_counters.entry(*k).or_insert_with(|| zeroed(v));
    }

    let top = settings.top;
    let tally = w.tally(&deltas);
    let mut drops = tally.drops;
    let overflow = stats.get(stat::AGG_OVERFLOW);
    // Known only as totals: over the in-kernel key budget, or unreadable.
    let unattributed = stats.get(stat::MATCHED).saturating_sub(tally.drops_keyed);
    if !w.scope.is_narrowed() {
        drops.add_unattributed(unattributed);
    }
    let held_now = match held.as_mut() {
        Some(h) => h.now(&w.source, &counts_now)?,
        None => occupancy::count_now(&end_ns, &mut notes),
    };
    let occupancy = w.breakdown_of(held_now);
    let seen = tally.drops_per_netns;

    let lost = stats.get(stat::RB_LOST) + w.source.malformed;
    let why = reconcile::Context {
        kernel_probes: kernel_entries,
        unattributed,
    };
    let (netns, rec_notes) = reconcile::rows(
        &start_counters,
        &end_counters,
        &seen,
        &why,
        w.scope.is_narrowed(),
    );
    notes.extend(rec_notes);
    if overflow > 0 {
        notes.push(format!(
            "{overflow} counts exceeded the in-kernel key budget: drops among them are in the drop total and under \"other\"; entries created or held among them are missing from those breakdowns"
        ));
    }
    if stats.get(stat::LIVE_OVERFLOW) > 0 {
        notes.push(format!(
            "{} new entries did not fit the live-entry map: occupancy under-counts them",
            stats.get(stat::LIVE_OVERFLOW)
        ));
    }
    let report = json::Report {
        mode: w.loaded.mode.to_string(),
        kernel: w.loaded.release.clone(),
        duration_s: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        lost_events: lost,
        netns,
        drops: drops.finish(top),
        occupancy: occupancy.finish(top),
        occupancy_source: if kernel_entries {
            "ctnetlink seed + kernel"
        } else {
            "ctnetlink"
        },
        new_flows: kernel_entries.then(|| tally.new_flows.finish(top)),
        // Host-wide counters, unless --netns narrows the report to the
        // namespaces whose evicted/clashed keys are counted.
        evictions: kernel_entries.then(|| {
            if w.scope.is_narrowed() {
                tally.evicted.total()
            } else {
                stats.get(stat::EVICTIONS)
            }
        }),
        clashes: kernel_entries.then(|| {
            if w.scope.is_narrowed() {
                tally.clashed.total()
            } else {
                stats.get(stat::CLASHES)
            }
        }),
        evicted: kernel_entries.then(|| tally.evicted.finish(top)),
        clashed: kernel_entries.then(|| tally.clashed.finish(top)),
        reconciliation: notes,
        counters: json::ReportCounters {
            netfilter_drops_any: stats.get(stat::NF_DROP_ANY),
            aggregation_overflow: overflow,
            decode_errors: stats.get(stat::DECODE_ERR),
            entries_freed: stats.get(stat::FREED),
            inserts: stats.get(stat::INSERTS),
            alloc_failures_not_full: stats.get(stat::ALLOC_ERR),
            events_not_streamed: stats.get(stat::SAMPLED),
        },
    };
    if as_json {
        println!("{}", json::line(&report));
    } else {
        print!("{}", text::report(&report));
    }
    Ok(())
}

/// A namespace first seen at the end of the window started from zero.
fn zeroed(end: &reconcile::NetnsSnapshot) -> reconcile::NetnsSnapshot {
    let mut s = end.clone();
    if let Some((st, _)) = &mut s.stats {
        *st = Default::default();
    }
    s
}
