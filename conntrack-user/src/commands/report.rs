//! `ctwatch report`: watch for a window, then print one report.
use std::{collections::HashMap, time::Instant};

use conntrack_ebpf::stat;

use crate::{
    aggregate::BreakdownBuilder,
    cli::Settings,
    error::Error,
    event, reconcile,
    source::counts_since,
    views::{json, text},
    watch::Watch,
};

pub async fn run(settings: &Settings, duration: std::time::Duration, as_json: bool) -> Result<(), Error> {
    let stop = super::stop_requested()?;
    tokio::pin!(stop);
    let mut w = Watch::start(settings, false)?;
    let scope_ns = w.scope.namespaces()?;
    let start_counters = reconcile::snapshot(&scope_ns);
    let drops_before = w.source.drop_counts()?;
    let stats_before = w.source.stats()?;
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
    let deltas = counts_since(&w.source.drop_counts()?, &drops_before);
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

    let mut drops = BreakdownBuilder::default();
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
        if rec.kind != event::Kind::Drop || !w.scope.contains(rec.netns) {
            continue;
        }
        *seen.entry(rec.netns).or_default() += n;
        let dims = w.dims(&rec);
        drops.add(dims, *n);
    }
    let overflow = stats.get(stat::AGG_OVERFLOW);
    if !w.scope.is_narrowed() {
        drops.add_unattributed(overflow + unreadable);
    }
    let lost = stats.get(stat::RB_LOST) + w.source.malformed;
    let (netns, mut notes) = reconcile::rows(
        &start_counters,
        &end_counters,
        &seen,
        lost,
        w.scope.is_narrowed(),
    );
    if overflow > 0 {
        notes.push(format!(
            "{overflow} drops exceeded the in-kernel key budget: they are in the totals and under \"other\""
        ));
    }
    let report = json::Report {
        mode: w.loaded.mode.to_string(),
        kernel: w.loaded.release.clone(),
        duration_s: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        lost_events: lost,
        netns,
        drops: drops.finish(settings.top),
        reconciliation: notes,
        counters: json::ReportCounters {
            netfilter_drops_any: stats.get(stat::NF_DROP_ANY),
            aggregation_overflow: overflow,
            decode_errors: stats.get(stat::DECODE_ERR),
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
    if let Some((st, src)) = &mut s.stats {
        *st = Default::default();
        let _ = src;
    }
    s
}
