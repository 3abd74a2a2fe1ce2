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
mod doctor;
mod error;
mod kernel;
mod names;
mod session;
mod source;
mod views;

use std::process::ExitCode;

/// The byte-level decoders of untrusted input, public for the fuzz
/// targets. Each must return, never panic, whatever the bytes; the `Ok`
/// value is a debug rendering of what was decoded.
pub mod decode {
    use std::collections::HashMap;

    use crate::{names, source};

    /// One ring-buffer record, as the kernel programs write it.
    pub fn ring_record(bytes: &[u8]) -> Result<String, String> {
        source::records::decode_bytes(bytes)
            .map(|r| format!("{r:?}"))
            .map_err(|e| e.to_string())
    }

    /// `/proc/net/stat/nf_conntrack`.
    pub fn proc_stat(text: &str) -> Result<String, String> {
        source::counters::parse_proc_stat(text)
            .map(|s| format!("{s:?}"))
            .map_err(|e| e.to_string())
    }

    /// `/proc/net/{tcp,tcp6}` (listeners) or `/proc/net/{udp,udp6}`.
    pub fn socket_table(text: &str, tcp: bool) -> String {
        let (mut ports, mut malformed) = (HashMap::new(), 0);
        names::sockets::parse_table(text, tcp, &mut ports, &mut malformed);
        format!("{ports:?} {malformed}")
    }

    /// One received ctnetlink datagram of a conntrack dump, every entry
    /// decoded.
    pub fn ctnetlink_datagram(bytes: &[u8]) -> Result<String, String> {
        source::ctnetlink::decode_datagram(bytes).map_err(|e| e.to_string())
    }

    /// One CPU's reply to the per-CPU stats request.
    pub fn ctnetlink_stats(bytes: &[u8]) -> Result<String, String> {
        source::counters::decode_cpu_stats(bytes)
            .map(|s| format!("{s:?}"))
            .map_err(|e| e.to_string())
    }

    /// A cgroup v2 path, as `/proc/PID/cgroup` prints it.
    pub fn cgroup_path(path: &str) -> String {
        format!("{:?}", names::cgroups::parse_path(path))
    }
}

use cli::{Command, Settings};

/// Parses the command line, runs the command, and maps the outcome to an
/// exit code; errors are printed as one line.
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
            return ExitCode::FAILURE;
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
            ExitCode::FAILURE
        }
    }
}
