//! One module per subcommand: each wires the pipeline (loader → source →
//! attribution → aggregation → view) for its job.
pub mod doctor;
pub mod drops;
pub mod report;
pub mod serve;
pub mod snapshot;
pub mod top;

/// Installs the Ctrl-C and SIGTERM handlers now (before ctwatch announces
/// itself, so an early signal cannot kill it with programs attached) and
/// returns a future that resolves on either.
pub fn stop_requested() -> std::io::Result<impl std::future::Future<Output = ()>> {
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
