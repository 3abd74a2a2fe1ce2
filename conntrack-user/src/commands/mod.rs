//! One module per subcommand: each wires the pipeline (session → sampler
//! → view) for its job, and nothing more.
pub(crate) mod doctor;
pub(crate) mod drops;
pub(crate) mod report;
pub(crate) mod serve;
pub(crate) mod snapshot;
pub(crate) mod top;

use std::future::Future;

use crate::{error::Error, session::Session};

/// Installs the Ctrl-C and SIGTERM handlers now (before ctwatch announces
/// itself, so an early signal cannot kill it with programs attached) and
/// returns a future that resolves on either.
pub(crate) fn stop_requested() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Keeps naming the owners of streamed records, while they still exist,
/// until the window ends or a stop is requested.
pub(crate) async fn watch(
    session: &mut Session,
    window: impl Future<Output = ()>,
    stop: impl Future<Output = ()>,
) -> Result<(), Error> {
    tokio::pin!(window);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut window => return Ok(()),
            _ = &mut stop => return Ok(()),
            r = session.events() => { r?; }
        }
    }
}
