//! `ctwatch drops`: stream table-full drops live; one summary per second
//! when there are too many to read. `ctwatch events` is the same stream
//! with every kind of event (new entries, evictions, clashes) included.
use std::time::{Duration, SystemTime};

use conntrack_ebpf::stat;

use crate::{
    aggregate::{BreakdownBuilder, Rate},
    cli::Settings,
    error::Error,
    event::{self, AggRecord, Kind},
    views::{json, text},
    watch::Watch,
};

pub async fn run(
    settings: &Settings,
    as_json: bool,
    max_lines: u64,
    all_kinds: bool,
) -> Result<(), Error> {
    let stop = super::stop_requested()?;
    tokio::pin!(stop);
    let mut w = Watch::start(settings, all_kinds)?;
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
    let mut second = BreakdownBuilder::new(1024);
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
                let drops = d.get(stat::MATCHED);
                let lost = d.get(stat::RB_LOST);
                if drops > shown || lost > 0 {
                    let b = second.finish(settings.top.min(5));
                    let s = json::SummaryLine {
                        kind: "summary",
                        ts: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64(),
                        interval_s: 1.0,
                        drops,
                        shown,
                        lost_events: lost,
                        by_dst_port: b.by_dst_port,
                        by_src_ip: b.by_src_ip,
                        by_process: b.by_process,
                        by_netns: b.by_netns,
                    };
                    if drops > shown {
                        if as_json { println!("{}", json::line(&s)); } else { println!("{}", text::summary_line(&s)); }
                    } else if lost > 0 {
                        eprintln!("ctwatch: {lost} events lost to a full ring buffer in the last second");
                    }
                }
                second = BreakdownBuilder::new(1024);
                shown = 0;
            }
            r = w.source.next_batch(&mut batch) => {
                r?;
                for ev in batch.drain(..) {
                    let Some((rec, owner)) = w.observe(&ev) else { continue };
                    if (!all_kinds && rec.kind != Kind::Drop) || !w.scope.contains(rec.netns) {
                        continue;
                    }
                    let agg = AggRecord {
                        kind: rec.kind,
                        role: rec.role,
                        netns: rec.netns,
                        proto: ev.tuple.proto,
                        src: rec.tuple.src,
                        dport: rec.tuple.dport,
                        tgid: ev.pid,
                        comm: event::comm(&ev.comm),
                        cgroup_id: ev.cgroup_id,
                        sock_ino: ev.sock_ino,
                    };
                    if rec.kind == Kind::Drop {
                        let dims = w.dims(&agg);
                        second.add(dims, 1);
                    }
                    if rate.tick(epoch) > max_lines {
                        continue;
                    }
                    shown += 1;
                    let name = w.netns_name(rec.netns);
                    if as_json {
                        let l = json::DropLine { kind: kind_name(rec.kind), flow: &rec, netns_name: name, process: (&owner).into() };
                        println!("{}", json::line(&l));
                    } else {
                        println!("{}", text::drop_line(&rec, name.as_deref(), &owner));
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
