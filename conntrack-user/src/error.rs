//! The top-level error: every lower layer's typed error folded in, each
//! with a one-line message that says what is missing and what to do.
//! Only commands return it; the stages below return their own.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error(transparent)]
    Session(#[from] crate::session::SessionError),
    #[error(transparent)]
    Counters(#[from] crate::source::counters::CountersError),
    #[error(transparent)]
    Netns(#[from] crate::source::netns::NetnsError),
    #[error(transparent)]
    Serve(#[from] crate::views::http::ServeError),
    #[error(transparent)]
    Terminal(#[from] crate::views::top::draw::TerminalError),
    #[error(transparent)]
    Snapshot(#[from] crate::aggregate::summary::SnapshotError),
    #[error(transparent)]
    Doctor(#[from] crate::doctor::DoctorError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("`ctwatch {what}` needs the fentry or kprobe mode, and on kernel {release} ctwatch runs in tracepoint mode (`ctwatch -v {what}` says why the others are unavailable): use `ctwatch drops` or `ctwatch report` here")]
    NeedsKernelProbes { what: &'static str, release: String },
    #[error("`ctwatch top` needs a terminal and stdout is not one: use `ctwatch report --json` or `ctwatch drops` for pipes and files")]
    NotATerminal,
}
