//! One module per subcommand: each wires the pipeline (loader → source →
//! attribution → aggregation → view) for its job.
pub mod drops;
pub mod report;

/// Resolves when the user asks to stop: Ctrl-C or SIGTERM.
pub async fn stop_requested() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
