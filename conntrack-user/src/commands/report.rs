//! `ctwatch report`: watch for a window, then print one report.
use std::time::Duration;

use crate::{
    aggregate::sampler::{Dumps, Sampler},
    cli::Settings,
    error::Error,
    session::{Session, Streaming},
    views::{json, text},
};

pub(crate) async fn run(
    settings: &Settings,
    duration: Duration,
    as_json: bool,
) -> Result<(), Error> {
    let stop = super::stop_requested()?;
    let mut session = Session::attach(settings, Streaming::NAMES)?;
    let mut sampler = Sampler::start(&mut session, Dumps::EachSample)?;
    eprintln!(
        "{}; reporting after {:.1}s (Ctrl-C to stop early)",
        session.banner(),
        duration.as_secs_f64()
    );
    super::watch(&mut session, tokio::time::sleep(duration), stop).await?;
    let sample = sampler.sample(&mut session)?;
    let report = json::Report::of(&session, &sample, settings.top);
    if as_json {
        println!("{}", json::line(&report));
    } else {
        print!("{}", text::report(&report));
    }
    Ok(())
}
