//! The top-level error: every module's typed error folded in, each with a
//! one-line message that says what is missing and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cli(#[from] crate::cli::CliError),
    #[error(transparent)]
    Load(#[from] crate::loader::LoadError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error(transparent)]
    Counters(#[from] crate::counters::CountersError),
    #[error(transparent)]
    Btf(#[from] crate::btf::BtfError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
