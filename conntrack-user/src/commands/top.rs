//! `ctwatch top`: a live, full-screen view of fill, culprits and victims per
//! namespace, one Sample per `--interval`; `q` quits.
use std::io::IsTerminal;

use crossterm::event::EventStream;
use futures_util::StreamExt;

use crate::{
    aggregate::sampler::{Dumps, Sampler},
    cli::{Settings, TopArgs},
    error::Error,
    session::{Session, Streaming},
    views::top::{
        draw::{Screen, TerminalError},
        input,
        model::{Action, Model, Status},
    },
};

pub(crate) async fn run(settings: &Settings, args: &TopArgs) -> Result<(), Error> {
    // Checked before anything is loaded: nothing to undo.
    if !std::io::stdout().is_terminal() {
        return Err(Error::NotATerminal);
    }
    let stop = super::stop_requested()?;
    tokio::pin!(stop);
    let mut session = Session::attach(settings, Streaming::NAMES)?;
    let sees_entries = session.sees_entries();
    eprintln!("{}; starting the live view (q quits)", session.banner());
    // Tracepoint mode dumps the table on its own thread, so the screen
    // never freezes behind a big table.
    let mut sampler = Sampler::start(&mut session, Dumps::Background(args.dump_interval))?;
    let mut model = Model::new(settings.top, sees_entries, session.scope.is_narrowed());
    model.status = Status {
        mode: session.mode().map(|m| m.to_string()).unwrap_or_default(),
        kernel: session.release(),
        interval_s: args.interval.as_secs_f64(),
        dump_interval_s: (!sees_entries).then_some(args.dump_interval.as_secs_f64()),
        dump_every_s: None,
        notes: Vec::new(),
    };
    let mut screen = Screen::enter()?;
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            ev = keys.next() => match ev {
                Some(Ok(ev)) => match input::action(ev, &mut model.view) {
                    Action::Quit => break,
                    Action::Redraw => screen.draw(&model, model.now())?,
                    Action::Ignore => {}
                },
                Some(Err(e)) => return Err(TerminalError::from(e).into()),
                None => break,
            },
            _ = tick.tick() => {
                // Per-namespace counter reads block on entering namespaces.
                let sample = tokio::task::block_in_place(|| sampler.sample(&mut session))?;
                model.take(&sample);
                screen.draw(&model, model.now())?;
            }
            r = session.events() => { r?; }
        }
    }
    drop(screen);
    Ok(())
}
