//! ctwatch: who fills the conntrack table, and whose packets die for it.
//!
//! The pipeline, one folder per stage (see `docs/architecture.md`):
//! [`kernel`] loads and attaches the programs, [`source`] reads what they
//! and the kernel produce, [`names`] attributes numbers to namespaces,
//! processes and containers, [`aggregate`] turns it into one `Sample` per
//! refresh, and [`views`] formats it. [`commands`] wire the stages together.
mod aggregate;
mod cli;
mod commands;
pub mod decode;
mod doctor;
mod error;
mod kernel;
mod names;
mod session;
mod source;
mod views;

use std::process::ExitCode;

use cli::{Command, Settings};

/// Parses the command line, runs the command, and maps the outcome to an
/// exit code (README "Exit codes"); errors are printed as one line.
pub fn run() -> ExitCode {
    let settings = Settings::from_args();
    let level = match settings.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ctwatch: cannot start the async runtime: {e}");
            return ExitCode::from(error::Failure::Runtime as u8);
        }
    };
    let result = rt.block_on(async {
        match settings.command.clone() {
            Command::Drops { json, max_lines } => {
                commands::drops::run(&settings, json, max_lines, false).await
            }
            Command::Events { json } => commands::drops::run(&settings, json, u64::MAX, true).await,
            Command::Top(a) => commands::top::run(&settings, &a).await,
            Command::Snapshot { json } => commands::snapshot::run(&settings, json).await,
            Command::Doctor(a) => commands::doctor::run(&settings, &a).await,
            Command::Serve(a) => commands::serve::run(&settings, &a).await,
            Command::Report { duration, json } => {
                commands::report::run(&settings, duration, json).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ctwatch: {}", kernel::loader::chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}
