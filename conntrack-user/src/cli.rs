//! Command-line flags, and their validation into [`Settings`]. The rest of
//! ctwatch never sees clap types.
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::compat::Mode;

#[derive(Debug, Parser)]
#[command(
    name = "ctwatch",
    version,
    about = "Who fills the conntrack table, and whose packets die for it",
    long_about = "ctwatch traces Linux connection tracking with eBPF. It names the flows the kernel \
dropped because the conntrack table was full (victims), and who holds and creates the entries \
(culprits), per process, port, source IP and network namespace."
)]
struct Cli {
    /// Attach mode; auto tries the most precise mode the kernel allows.
    #[arg(long, value_enum, default_value_t = ModeArg::Auto, global = true)]
    mode: ModeArg,
    /// Watch only this network namespace (inode number or `ip netns` name); repeatable.
    #[arg(long, value_name = "INUM|NAME", global = true)]
    netns: Vec<String>,
    /// Rows per breakdown list.
    #[arg(long, default_value_t = 10, global = true)]
    top: usize,
    /// Log what the loader tries (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Auto,
    Fentry,
    Kprobe,
    Tracepoint,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Stream each flow dropped because the table was full, live.
    Drops {
        /// JSON lines instead of text.
        #[arg(long)]
        json: bool,
        /// Above this many drops per second, print one summary per second instead.
        #[arg(long, default_value_t = 20)]
        max_lines: u64,
    },
    /// Stream every conntrack event the kernel probes see: new entries,
    /// evictions, clashes and table-full drops (fentry/kprobe modes).
    Events {
        /// JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Live view of fill, culprits and victims per namespace (q quits).
    Top(TopArgs),
    /// One-shot view of the table from ctnetlink: settings, counts by
    /// protocol and state, top sources and ports, per namespace.
    Snapshot {
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Ranked findings with evidence and the exact commands that fix them.
    Doctor(DoctorArgs),
    /// Prometheus exporter of fill, drops and top culprits/victims.
    Serve(ServeArgs),
    /// Watch for a window, then print one report (also on Ctrl-C / SIGTERM).
    Report {
        /// Length of the window in seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct TopArgs {
    /// Screen refresh interval in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// In tracepoint mode, how often occupancy is re-read from ctnetlink (seconds).
    #[arg(long, default_value_t = 5.0)]
    pub dump_interval: f64,
}

#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct DoctorArgs {
    /// One JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// Seconds to watch the kernel before judging (0: settings and counters only).
    #[arg(long, default_value_t = 5.0)]
    pub watch: f64,
}

#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on; loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1:9465")]
    pub listen: std::net::SocketAddr,
    /// How often the series are refreshed from the kernel (seconds).
    #[arg(long, default_value_t = 5.0)]
    pub interval: f64,
}

/// Bounds on every time flag: below the minimum a timer would spin or
/// round to zero, above the maximum `Duration` arithmetic overflows.
const MIN_SECS: f64 = 0.05;
const MAX_SECS: f64 = 30.0 * 86400.0;
/// Rows per list beyond this help nobody and only make screens overflow.
const MAX_TOP: usize = 1000;

fn in_range(v: f64) -> bool {
    v.is_finite() && (MIN_SECS..=MAX_SECS).contains(&v)
}

/// A validated run configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Option<Mode>,
    pub netns: Vec<String>,
    pub top: usize,
    pub verbose: u8,
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Drops { json: bool, max_lines: u64 },
    Events { json: bool },
    Top(TopArgs),
    Snapshot { json: bool },
    Doctor(DoctorArgs),
    Serve(ServeArgs),
    Report { duration: Duration, json: bool },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CliError {
    #[error("--duration must be between {MIN_SECS} and {MAX_SECS} seconds, got {0}")]
    Duration(f64),
    #[error("--top must be between 1 and {MAX_TOP}")]
    Top,
    #[error("{0} must be between {MIN_SECS} and {MAX_SECS} seconds, got {1}")]
    Positive(&'static str, f64),
}

impl Settings {
    /// Parses `std::env::args`; exits with clap's usage message on bad flags.
    pub fn from_args() -> Result<Self, CliError> {
        Self::from_cli(Cli::parse())
    }

    pub fn try_from_iter<I, T>(args: I) -> Result<Result<Self, CliError>, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Cli::try_parse_from(args).map(Self::from_cli)
    }

    fn from_cli(c: Cli) -> Result<Self, CliError> {
        if c.top == 0 || c.top > MAX_TOP {
            return Err(CliError::Top);
        }
        let positive = |name: &'static str, v: f64| {
            if in_range(v) {
                Ok(())
            } else {
                Err(CliError::Positive(name, v))
            }
        };
        let command = match c.command {
            Cmd::Drops { json, max_lines } => Command::Drops { json, max_lines },
            Cmd::Events { json } => Command::Events { json },
            Cmd::Top(t) => {
                positive("--interval", t.interval)?;
                positive("--dump-interval", t.dump_interval)?;
                Command::Top(t)
            }
            Cmd::Snapshot { json } => Command::Snapshot { json },
            Cmd::Doctor(d) => {
                if !(d.watch == 0.0 || in_range(d.watch)) {
                    return Err(CliError::Positive("--watch", d.watch));
                }
                Command::Doctor(d)
            }
            Cmd::Serve(sv) => {
                positive("--interval", sv.interval)?;
                Command::Serve(sv)
            }
            Cmd::Report { duration, json } => {
                if !in_range(duration) {
                    return Err(CliError::Duration(duration));
                }
                Command::Report {
                    duration: Duration::from_secs_f64(duration),
                    json,
                }
            }
        };
        Ok(Settings {
            mode: match c.mode {
                ModeArg::Auto => None,
                ModeArg::Fentry => Some(Mode::Fentry),
                ModeArg::Kprobe => Some(Mode::Kprobe),
                ModeArg::Tracepoint => Some(Mode::Tracepoint),
            },
            netns: c.netns,
            top: c.top,
            verbose: c.verbose,
            command,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_flags_validate() {
        let s = Settings::try_from_iter(["ctwatch", "report", "--duration", "2.5", "--json"])
            .unwrap()
            .unwrap();
        assert_eq!(
            s.command,
            Command::Report {
                duration: Duration::from_millis(2500),
                json: true
            }
        );
        assert_eq!(s.mode, None);
        let bad = Settings::try_from_iter(["ctwatch", "report", "--duration", "0"]).unwrap();
        assert_eq!(bad.unwrap_err(), CliError::Duration(0.0));
        let nan = Settings::try_from_iter(["ctwatch", "report", "--duration", "NaN"]).unwrap();
        assert!(nan.is_err());
    }

    #[test]
    fn global_flags_after_the_subcommand() {
        let s = Settings::try_from_iter([
            "ctwatch",
            "drops",
            "--mode",
            "tracepoint",
            "--netns",
            "edge",
            "--netns",
            "4026531840",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(s.mode, Some(Mode::Tracepoint));
        assert_eq!(s.netns, vec!["edge", "4026531840"]);
    }

    #[test]
    fn unknown_mode_is_a_usage_error() {
        assert!(Settings::try_from_iter(["ctwatch", "drops", "--mode", "magic"]).is_err());
    }
}
