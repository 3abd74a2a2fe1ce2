//! `ctwatch drops`: stream table-full drops live; one summary per second
//! when there are too many to read. `ctwatch events` is the same stream
//! with every kind of event (new entries, evictions, clashes) included.
use std::time::{Duration, SystemTime};

use conntrack_ebpf::stat;

use crate::{
    aggregate::{BreakdownBuilder, Rate},
    cli::Settings,
    error::Error,
    event::{self, Kind},
    source::counts_since,
    views::{json, text},
    watch::Watch,
};

/// Records per second per CPU the kernel streams for `events` (beyond the
/// first of each key); the rest are counted, and reported as not streamed.
const EVENTS_BUDGET: u32 = 10_000;

pub async fn run(
    settings: &Settings,
    as_json: bool,
    max_lines: u64,
    all_kinds: bool,
) -> Result<(), Error> {
    let stop = super::stop_requested()?;
    tokio::pin!(stop);
    // No more records than a person can read: the summaries come from the
    // in-kernel counts, which stay exact.
    let budget = if all_kinds {
        EVENTS_BUDGET
    } else {
        max_lines.clamp(1, u32::MAX as u64) as u32
    };
    let mut w = Watch::start(settings, all_kinds, budget)?;
    if all_kinds && !w.loaded.mode.sees_entries() {
        return Err(Error::NeedsKernelProbes {
            what: "events",
            release: w.loaded.release.clone(),
        });
    }
    eprintln!(
        "{}; streaming {} (Ctrl-C to stop)",
        w.banner(),
        if all_kinds {
            "conntrack events"
        } else {
            "table-full drops"
        }
    );
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_stats = w.source.stats()?;
    let mut last_counts = w.source.counts()?;
    let mut rate = Rate::default();
    let mut shown = 0u64;
    let mut epoch = 0u64;
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                epoch += 1;
                let now = w.source.stats()?;
                let d = now.since(&last_stats);
                last_stats = now;
                let counts = w.source.counts()?;
                let delta = counts_since(&counts, &last_counts);
                last_counts = counts;
                let mut second = BreakdownBuilder::new(1024);
                let mut drops = 0;
                for (key, n) in &delta {
                    let Ok(rec) = event::decode_key(key) else { continue };
                    if rec.kind == Kind::Drop && w.scope.contains(rec.netns) {
                        drops += n;
                        let dims = w.dims(&rec);
                        second.add(dims, *n);
                    }
                }
                let lost = d.get(stat::RB_LOST);
                if drops > shown {
                    let b = second.finish(settings.top.min(5));
                    let s = json::SummaryLine {
                        kind: "summary",
                        ts: SystemTime::now()
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs_f64(),
                        interval_s: 1.0,
                        drops,
                        shown,
                        not_streamed: d.get(stat::SAMPLED),
                        lost_events: lost,
                        by_dst_port: b.by_dst_port,
                        by_src_ip: b.by_src_ip,
                        by_process: b.by_process,
                        by_netns: b.by_netns,
                    };
                    if as_json {
                        println!("{}", json::line(&s));
                    } else {
                        println!("{}", text::summary_line(&s));
                    }
                } else if lost > 0 {
                    eprintln!("ctwatch: {lost} events lost to a full ring buffer in the last second");
                }
                shown = 0;
            }
            r = w.source.next_batch(&mut batch) => {
                r?;
                for ev in batch.drain(..) {
                    let Some((rec, owner)) = w.observe(&ev) else { continue };
                    if (!all_kinds && rec.kind != Kind::Drop) || !w.scope.contains(rec.netns) {
                        continue;
                    }
                    if rate.tick(epoch) > max_lines {
                        continue;
                    }
                    if rec.kind == Kind::Drop {
                        shown += 1;
                    }
                    let name = w.netns_name(rec.netns);
                    let ifindex = if rec.ifindex_in != 0 { rec.ifindex_in } else { rec.ifindex_out };
                    let interface = w.interface(rec.netns, ifindex);
                    if as_json {
                        let l = json::DropLine {
                            kind: kind_name(rec.kind),
                            flow: &rec,
                            netns_name: name,
                            interface,
                            process: (&owner).into(),
                        };
                        println!("{}", json::line(&l));
                    } else {
                        println!("{}", text::drop_line(&rec, name.as_deref(), interface.as_deref(), &owner));
                    }
                }
            }
        }
    }
    Ok(())
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Drop => "drop",
        Kind::Evict => "evict",
        Kind::Clash => "clash",
        Kind::New => "new",
        Kind::SeedFree => "seed_free",
    }
}
