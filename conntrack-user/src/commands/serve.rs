//! `ctwatch serve`: a Prometheus exporter of fill, drops and the top
//! culprits and victims; one Sample per `--interval`, encoded when scraped.
use std::sync::Arc;

use crate::{
    aggregate::sampler::{Dumps, Sampler},
    cli::{ServeArgs, Settings},
    error::Error,
    session::{Session, Streaming},
    views::{
        http,
        prometheus::{Exported, Metrics},
    },
};

pub(crate) async fn run(settings: &Settings, args: &ServeArgs) -> Result<(), Error> {
    let stop = super::stop_requested()?;
    tokio::pin!(stop);
    // Bound before anything is loaded, so a taken port fails fast and
    // leaves the kernel untouched.
    let listener = http::bind(args.listen).await?;
    let addr = listener.local_addr().unwrap_or(args.listen);
    let mut session = Session::attach(settings, Streaming::NAMES)?;
    let metrics = Arc::new(Metrics::new(session.mode(), &session.release()));
    // Tracepoint-mode dumps on their own thread, paced to a CPU budget:
    // a refresh never waits for a big table.
    let mut sampler = Sampler::start(&mut session, Dumps::Background(args.interval))?;
    // Series exist from the first scrape on.
    metrics.publish(Exported::of(&sampler.sample(&mut session)?, settings.top));
    let server = tokio::spawn(http::serve_http(listener, metrics.clone()));
    eprintln!(
        "{}; serving http://{addr}/metrics, refreshed every {}s (Ctrl-C to stop)",
        session.banner(),
        args.interval.as_secs_f64()
    );
    let mut tick = tokio::time::interval(args.interval);
    // A slow refresh delays the next one rather than bunching up.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let result = loop {
        tokio::select! {
            _ = &mut stop => break Ok(()),
            _ = tick.tick() => match sampler.sample(&mut session) {
                Ok(s) => {
                    for p in &s.problems {
                        log::warn!("{p}");
                    }
                    metrics.publish(Exported::of(&s, settings.top));
                }
                Err(e) => break Err(e.into()),
            },
            r = session.events() => if let Err(e) = r {
                break Err(e.into());
            },
        }
    };
    server.abort();
    result
}
