//! The top-level error: every module's typed error folded in, each with a
//! one-line message that says what is missing and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cli(#[from] crate::cli::CliError),
    /// Boxed: load errors carry kernel detail strings, and every other
    /// variant should not pay for their size.
    #[error(transparent)]
    Load(Box<crate::loader::LoadError>),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error(transparent)]
    Counters(#[from] crate::counters::CountersError),
    #[error(transparent)]
    Btf(#[from] crate::btf::BtfError),
    #[error(transparent)]
    Serve(#[from] crate::metrics::ServeError),
    #[error(transparent)]
    Top(#[from] crate::commands::top::TopError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    Doctor(#[from] crate::doctor::DoctorError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("`ctwatch {what}` needs the fentry or kprobe mode, and on kernel {release} ctwatch runs in tracepoint mode (`ctwatch -v {what}` says why the others are unavailable): use `ctwatch drops` or `ctwatch report` here")]
    NeedsKernelProbes { what: &'static str, release: String },
}

impl From<crate::loader::LoadError> for Error {
    fn from(e: crate::loader::LoadError) -> Self {
        Error::Load(Box::new(e))
    }
}
