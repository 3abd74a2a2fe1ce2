//! `ctwatch drops`: stream table-full drops live; one summary per second
//! when there are too many to read. `ctwatch events` is the same stream
//! with every kind of event (new entries, evictions, clashes) included.
use std::time::Duration;

use conntrack_ebpf::stat;

use crate::{
    aggregate::sampler::{Dumps, Sampler},
    cli::Settings,
    error::Error,
    names::resolver::Process,
    session::{Session, Streaming},
    source::records::{FlowRecord, Kind},
    views::{json, text},
};

/// Records per second per CPU the kernel streams for `events` (beyond the
/// first of each key); the rest are counted, and reported as not streamed.
const EVENTS_BUDGET: u32 = 10_000;

/// Lines printed within the current second, to switch the stream to
/// summaries before a flood scrolls the terminal away.
#[derive(Debug, Default)]
struct LineBudget {
    second: u64,
    count: u64,
}

impl LineBudget {
    /// Counts one line in `second`; whether it stays within `max`.
    fn allows(&mut self, second: u64, max: u64) -> bool {
        if second != self.second {
            self.second = second;
            self.count = 0;
        }
        self.count += 1;
        self.count <= max
    }
}

/// The stream's state: what it prints, and how many lines this second.
struct Out {
    json: bool,
    all_kinds: bool,
    max_lines: u64,
    lines: LineBudget,
    /// Drops printed one by one since the last summary.
    shown: u64,
    second: u64,
}

/// One line for one record, within the per-second budget.
fn print(session: &mut Session, out: &mut Out, rec: FlowRecord, owner: Process) {
    if (!out.all_kinds && rec.kind != Kind::Drop) || !session.scope.contains(rec.netns) {
        return;
    }
    if !out.lines.allows(out.second, out.max_lines) {
        return;
    }
    if rec.kind == Kind::Drop {
        out.shown += 1;
    }
    let name = session.names.netns_name(rec.netns);
    let ifindex = if rec.ifindex_in != 0 {
        rec.ifindex_in
    } else {
        rec.ifindex_out
    };
    let interface = session.names.interface(rec.netns, ifindex);
    if out.json {
        println!(
            "{}",
            json::line(&json::DropLine::of(&rec, name, interface, &owner))
        );
    } else {
        println!(
            "{}",
            text::drop_line(&rec, name.as_deref(), interface.as_deref(), &owner)
        );
    }
}

pub(crate) async fn run(
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
        max_lines.clamp(1, u64::from(u32::MAX)) as u32
    };
    let mut session = Session::attach(
        settings,
        Streaming {
            new_entries: all_kinds,
            budget,
        },
    )?;
    if all_kinds && !session.sees_entries() {
        return Err(Error::NeedsKernelProbes {
            what: "events",
            release: session.release(),
        });
    }
    let what = if all_kinds {
        "conntrack events"
    } else {
        "table-full drops"
    };
    eprintln!("{}; streaming {what} (Ctrl-C to stop)", session.banner());
    let mut sampler = Sampler::start(&mut session, Dumps::Never)?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut out = Out {
        json: as_json,
        all_kinds,
        max_lines,
        lines: LineBudget::default(),
        shown: 0,
        second: 0,
    };
    let (mut lost_before, mut skipped_before) = (0, 0);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                // Records written without waking ctwatch are still lines to print.
                for (rec, owner) in session.drain() {
                    print(&mut session, &mut out, rec, owner);
                }
                out.second += 1;
                let s = sampler.sample(&mut session)?;
                let drops: u64 = s.victims.iter().map(|c| c.fresh).sum();
                let lost = s.stats.get(stat::RB_LOST) - lost_before;
                let not_streamed = s.stats.get(stat::SAMPLED) - skipped_before;
                (lost_before, skipped_before) = (s.stats.get(stat::RB_LOST), s.stats.get(stat::SAMPLED));
                if drops > out.shown {
                    let line = json::SummaryLine::of(&s, out.shown, not_streamed, lost, settings.top.min(5));
                    if as_json {
                        println!("{}", json::line(&line));
                    } else {
                        println!("{}", text::summary_line(&line));
                    }
                } else if lost > 0 {
                    eprintln!("ctwatch: {lost} events lost to a full ring buffer in the last second");
                }
                out.shown = 0;
            }
            events = session.events() => {
                for (rec, owner) in events? {
                    print(&mut session, &mut out, rec, owner);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_budget_resets_each_second() {
        let mut b = LineBudget::default();
        assert!(b.allows(1, 2));
        assert!(b.allows(1, 2));
        assert!(!b.allows(1, 2));
        assert!(b.allows(2, 2));
    }
}
