//! `ctwatch drops`: stream table-full drops live; one summary per second
//! when there are too many to read. `ctwatch events` is the same stream
//! with every kind of event (new entries, evictions, clashes) included.
use std::time::Duration;

use crate::{
    aggregate::sampler::{Dumps, Sampler},
    cli::Settings,
    error::Error,
    names::resolver::Process,
    session::{Session, Streaming},
    source::records::FlowRecord,
    views::stream::{self, Stream},
};

/// Records per second per CPU the kernel streams for `events` (beyond the
/// first of each key); the rest are counted, and reported as not streamed.
const EVENTS_BUDGET: u32 = 10_000;

/// Prints `rec`'s line where the stream admits it; names are looked up
/// only for the lines printed.
fn show(session: &mut Session, stream: &mut Stream, rec: FlowRecord, owner: Process) {
    if !session.scope.contains(rec.netns) || !stream.admits(&rec) {
        return;
    }
    let netns_name = session.names.netns_name(rec.netns);
    let interface = session
        .names
        .interface(rec.netns, stream::interface_of(&rec));
    stream.print(&rec, netns_name, interface, &owner);
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
    let mut stream = Stream::new(as_json, all_kinds, max_lines);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                // Records written without waking ctwatch are still lines to
                // print: the sample drained them.
                let mut s = sampler.sample(&mut session)?;
                for (rec, owner) in std::mem::take(&mut s.queued) {
                    show(&mut session, &mut stream, rec, owner);
                }
                stream.end_second(&s, settings.top);
            }
            events = session.events() => {
                for (rec, owner) in events? {
                    show(&mut session, &mut stream, rec, owner);
                }
            }
        }
    }
    Ok(())
}
