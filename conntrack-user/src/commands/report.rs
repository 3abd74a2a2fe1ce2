//! `ctwatch report`: watch for a window, then print one report.
use std::{collections::HashMap, time::Instant};

use conntrack_ebpf::{stat, AggKey};

use crate::{
    aggregate::BreakdownBuilder,
    cli::Settings,
    ctnetlink,
    error::Error,
    event::{self, AggRecord, Kind},
    netns::NetnsInfo,
    occupancy::{Seed, SeedKey},
    reconcile,
    source::counts_since,
    views::{json, text},
    watch::Watch,
};

/// One ctnetlink dump per namespace; a namespace that cannot be dumped is
/// reported, not fatal.
fn dump_all(scope: &[NetnsInfo], notes: &mut Vec<String>) -> Vec<(u32, Vec<ctnetlink::CtEntry>)> {
    scope
        .iter()
        .filter_map(|ns| match ctnetlink::dump_in(ns) {
            Ok(entries) => Some((ns.inum, entries)),
            Err(e) => {
                notes.push(format!("netns {}: no ctnetlink dump: {e}", ns.inum));
                None
            }
        })
        .collect()
}

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
    let mut seed = Seed::default();
    let mut seed_free_base = HashMap::new();
    if kernel_entries {
        let dumps = dump_all(&scope_ns, &mut notes);
        let known = w.source.live_flows();
        seed = Seed::from_dumps(dumps.iter().map(|(n, e)| (*n, e.as_slice())), &known);
        seed_free_base = w.source.counts()?;
    }
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
    let mut drops = BreakdownBuilder::default();
    let mut new_flows = BreakdownBuilder::default();
    let mut evicted = BreakdownBuilder::default();
    let mut clashed = BreakdownBuilder::default();
    let mut seen: HashMap<u32, u64> = HashMap::new();
    let mut unreadable = 0u64;
    for (key, n) in &deltas {
        let rec = match event::decode_key(key) {
            Ok(r) => r,
            Err(_) => {
                unreadable += n;
                continue;
            }
        };
        if !w.scope.contains(rec.netns) {
            continue;
        }
        let target = match rec.kind {
            Kind::Drop => {
                *seen.entry(rec.netns).or_default() += n;
                &mut drops
            }
            Kind::New => &mut new_flows,
            Kind::Evict => &mut evicted,
            Kind::Clash => &mut clashed,
            Kind::SeedFree => continue,
        };
        let dims = w.dims(&rec);
        target.add(dims, *n);
    }
    let overflow = stats.get(stat::AGG_OVERFLOW);
    if !w.scope.is_narrowed() {
        drops.add_unattributed(unreadable);
    }

    let mut occupancy = BreakdownBuilder::default();
    if kernel_entries {
        let frees = counts_since(&counts_now, &seed_free_base)
            .into_iter()
            .filter(|(k, _)| k.kind == conntrack_ebpf::kind::SEED_FREE)
            .filter_map(|(k, n)| Some((SeedKey::of_record(&event::decode_key(&k).ok()?), n)));
        seed.apply_frees(frees);
        let live: Vec<(AggKey, i64)> = w.source.occupancy()?.into_iter().collect();
        let records: Vec<(AggRecord, u64)> =
            seed.records()
                .chain(live.iter().filter_map(|(k, n)| {
                    Some((event::decode_key(k).ok()?, u64::try_from(*n).ok()?))
                }))
                .collect();
        for (rec, n) in records {
            if w.scope.contains(rec.netns) {
                let dims = w.dims(&rec);
                occupancy.add(dims, n);
            }
        }
    } else {
        for (netns, entries) in dump_all(&end_ns, &mut notes) {
            if !w.scope.contains(netns) {
                continue;
            }
            for (rec, n) in
                Seed::from_dumps([(netns, entries.as_slice())], &Default::default()).records()
            {
                let dims = w.dims(&rec);
                occupancy.add(dims, n);
            }
        }
    }

    let lost = stats.get(stat::RB_LOST) + w.source.malformed;
    let (netns, rec_notes) = reconcile::rows(
        &start_counters,
        &end_counters,
        &seen,
        lost,
        w.scope.is_narrowed(),
    );
    notes.extend(rec_notes);
    if overflow > 0 {
        notes.push(format!(
            "{overflow} counts exceeded the in-kernel key budget: they are in the totals and under \"other\""
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
        drops: {
            let mut b = drops.finish(top);
            // Overflowed drops are known only as a total.
            if !w.scope.is_narrowed() && overflow > 0 {
                b.total = b.total.max(stats.get(stat::MATCHED));
            }
            b
        },
        occupancy: occupancy.finish(top),
        occupancy_source: if kernel_entries {
            "ctnetlink seed + kernel"
        } else {
            "ctnetlink"
        },
        new_flows: kernel_entries.then(|| new_flows.finish(top)),
        evictions: kernel_entries.then(|| stats.get(stat::EVICTIONS)),
        clashes: kernel_entries.then(|| stats.get(stat::CLASHES)),
        evicted: kernel_entries.then(|| evicted.finish(top)),
        clashed: kernel_entries.then(|| clashed.finish(top)),
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
