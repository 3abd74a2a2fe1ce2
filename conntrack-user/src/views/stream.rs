//! The live stream of `ctwatch drops` and `ctwatch events`: one line per
//! record, text or JSON, as long as a person can read them. Past
//! `--max-lines` in a second the rest of that second's records get no line
//! of their own; the second ends in one summary instead, counted from the
//! kernel's exact counts rather than from the lines printed.
use conntrack_ebpf::stat;

use crate::{
    aggregate::sampler::Sample,
    names::resolver::Process,
    source::{
        maps::KernelStats,
        records::{FlowRecord, Kind},
    },
    views::{json, text},
};

/// Rows per list in a summary: it stays one readable line.
const SUMMARY_TOP: usize = 5;

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
pub(crate) struct Stream {
    json: bool,
    all_kinds: bool,
    max_lines: u64,
    lines: LineBudget,
    /// Drops printed one by one since the last summary.
    shown: u64,
    second: u64,
    /// The kernel's counters at the end of the previous second: a summary
    /// and the notes report one second's worth.
    before: KernelStats,
}

impl Stream {
    /// `all_kinds`: every kind of record (`events`), else drops only.
    pub(crate) fn new(json: bool, all_kinds: bool, max_lines: u64) -> Self {
        Stream {
            json,
            all_kinds,
            max_lines,
            lines: LineBudget::default(),
            shown: 0,
            second: 0,
            before: KernelStats::default(),
        }
    }

    /// Whether `rec` gets a line of its own, counting it if so: asked
    /// before its names are looked up, so a flood past the budget costs
    /// no lookups.
    pub(crate) fn admits(&mut self, rec: &FlowRecord) -> bool {
        if !self.all_kinds && rec.kind != Kind::Drop {
            return false;
        }
        if !self.lines.allows(self.second, self.max_lines) {
            return false;
        }
        if rec.kind == Kind::Drop {
            self.shown += 1;
        }
        true
    }

    /// The line of a record [`Stream::admits`] let through.
    pub(crate) fn print(
        &self,
        rec: &FlowRecord,
        netns_name: Option<String>,
        interface: Option<String>,
        owner: &Process,
    ) {
        if self.json {
            println!(
                "{}",
                json::line(&json::DropLine::of(rec, netns_name, interface, owner))
            );
        } else {
            println!(
                "{}",
                text::drop_line(rec, netns_name.as_deref(), interface.as_deref(), owner)
            );
        }
    }

    /// Ends the second with the sample taken at its end: a summary where
    /// the kernel counted more drops than were printed one by one, else a
    /// note on stderr if events were lost, which the lines cannot show.
    pub(crate) fn end_second(&mut self, s: &Sample, top: usize) {
        self.second += 1;
        let drops: u64 = s.victims.iter().map(|c| c.fresh).sum();
        let fresh = s.stats.since(&self.before);
        self.before = s.stats;
        let fresh_lost = fresh.get(stat::RB_LOST);
        if drops > self.shown {
            let line = json::SummaryLine::of(
                s,
                self.shown,
                fresh.get(stat::SAMPLED),
                fresh_lost,
                top.min(SUMMARY_TOP),
            );
            if self.json {
                println!("{}", json::line(&line));
            } else {
                println!("{}", text::summary_line(&line));
            }
        } else if fresh_lost > 0 {
            eprintln!("ctwatch: {fresh_lost} events lost to a full ring buffer in the last second");
        }
        let fresh_unseen = fresh.get(stat::RUNS_SKIPPED) + fresh.returns_missed();
        if fresh_unseen > 0 {
            // Neither a line nor a count can show these: say so where the
            // lines go on.
            eprintln!(
                "ctwatch: {fresh_unseen} program runs skipped or kretprobe returns missed by the kernel in the last second: records among them may be missing"
            );
        }
        self.shown = 0;
    }
}

/// The interface a record's line names: where its packet came in, else
/// (a local packet has no input interface) where it was going out.
pub(crate) fn interface_of(rec: &FlowRecord) -> u32 {
    if rec.ifindex_in != 0 {
        rec.ifindex_in
    } else {
        rec.ifindex_out
    }
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

    fn record(k: u8) -> FlowRecord {
        let mut ev = conntrack_ebpf::FlowEvent {
            kind: k,
            role: conntrack_ebpf::role::INBOUND,
            ..Default::default()
        };
        ev.tuple.family = conntrack_ebpf::FAMILY_V4;
        ev.tuple.proto = 17;
        crate::source::records::decode(&ev).unwrap()
    }

    #[test]
    fn drops_get_lines_up_to_the_budget_and_other_kinds_only_in_events() {
        use conntrack_ebpf::kind;
        let (drop, new) = (record(kind::DROP), record(kind::NEW));
        let mut drops = Stream::new(false, false, 2);
        assert!(!drops.admits(&new), "drops shows drops only");
        assert!(drops.admits(&drop));
        assert!(drops.admits(&drop));
        assert!(!drops.admits(&drop), "past --max-lines");
        assert_eq!(drops.shown, 2, "a summary says how many were shown");

        let mut events = Stream::new(false, true, 2);
        assert!(events.admits(&new));
        assert!(events.admits(&drop));
        assert!(!events.admits(&drop));
        assert_eq!(events.shown, 1, "only drops count against the summary");
    }
}
