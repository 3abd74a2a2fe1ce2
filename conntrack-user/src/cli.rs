//! Command-line flags, and their validation into [`Settings`]. The rest of
//! ctwatch never sees clap types.
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::kernel::compat::Mode;

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
    /// Rows per breakdown list (1-1000).
    #[arg(long, default_value_t = 10, global = true, value_parser = clap::value_parser!(u16).range(1..=MAX_TOP))]
    top: u16,
    /// Log what the loader tries (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Auto,
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
    /// evictions, clashes and table-full drops (kprobe mode).
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
        #[arg(long, default_value = "10", value_parser = seconds)]
        duration: Duration,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, PartialEq, clap::Args)]
pub(crate) struct TopArgs {
    /// Screen refresh interval in seconds.
    #[arg(long, default_value = "1", value_parser = seconds)]
    pub(crate) interval: Duration,
    /// In tracepoint mode, how often occupancy is re-read from ctnetlink (seconds).
    #[arg(long, default_value = "5", value_parser = seconds)]
    pub(crate) dump_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, clap::Args)]
pub(crate) struct DoctorArgs {
    /// One JSON document instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    /// Seconds to watch the kernel before judging (0: settings and counters only).
    #[arg(long, default_value = "5", value_parser = seconds_or_zero)]
    pub(crate) watch: Duration,
}

#[derive(Debug, Clone, PartialEq, clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on; loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1:9465")]
    pub(crate) listen: std::net::SocketAddr,
    /// How often the series are refreshed from the kernel (seconds).
    #[arg(long, default_value = "5", value_parser = seconds)]
    pub(crate) interval: Duration,
}

/// Bounds on every time flag: below the minimum a timer would spin or
/// round to zero, above the maximum `Duration` arithmetic overflows.
const MIN_SECS: f64 = 0.05;
const MAX_SECS: f64 = 30.0 * 86400.0;
/// Rows per list beyond this help nobody and only make screens overflow.
const MAX_TOP: i64 = 1000;

/// The one range of every time flag, in seconds.
fn seconds(v: &str) -> Result<Duration, String> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && (MIN_SECS..=MAX_SECS).contains(&s) => {
            Ok(Duration::from_secs_f64(s))
        }
        _ => Err(format!(
            "must be a number of seconds between {MIN_SECS} and {MAX_SECS}"
        )),
    }
}

/// [`seconds`], or 0 for "not at all".
fn seconds_or_zero(v: &str) -> Result<Duration, String> {
    match v.parse::<f64>() {
        Ok(0.0) => Ok(Duration::ZERO),
        _ => seconds(v).map_err(|e| format!("{e}, or 0")),
    }
}

/// A validated run configuration.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) mode: Option<Mode>,
    pub(crate) netns: Vec<String>,
    pub(crate) top: usize,
    pub(crate) verbose: u8,
    pub(crate) command: Command,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Command {
    Drops { json: bool, max_lines: u64 },
    Events { json: bool },
    Top(TopArgs),
    Snapshot { json: bool },
    Doctor(DoctorArgs),
    Serve(ServeArgs),
    Report { duration: Duration, json: bool },
}

impl Settings {
    /// Parses `std::env::args`; exits with clap's usage message (code 2)
    /// on bad flags and out-of-range values.
    pub(crate) fn from_args() -> Self {
        Self::from_cli(Cli::parse())
    }

    #[cfg(test)]
    fn try_from_iter<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Cli::try_parse_from(args).map(Self::from_cli)
    }

    fn from_cli(c: Cli) -> Self {
        let command = match c.command {
            Cmd::Drops { json, max_lines } => Command::Drops { json, max_lines },
            Cmd::Events { json } => Command::Events { json },
            Cmd::Top(t) => Command::Top(t),
            Cmd::Snapshot { json } => Command::Snapshot { json },
            Cmd::Doctor(d) => Command::Doctor(d),
            Cmd::Serve(sv) => Command::Serve(sv),
            Cmd::Report { duration, json } => Command::Report { duration, json },
        };
        Settings {
            mode: match c.mode {
                ModeArg::Auto => None,
                ModeArg::Kprobe => Some(Mode::Kprobe),
                ModeArg::Tracepoint => Some(Mode::Tracepoint),
            },
            netns: c.netns,
            top: usize::from(c.top),
            verbose: c.verbose,
            command,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_flags_validate() {
        let s =
            Settings::try_from_iter(["ctwatch", "report", "--duration", "2.5", "--json"]).unwrap();
        assert_eq!(
            s.command,
            Command::Report {
                duration: Duration::from_millis(2500),
                json: true
            }
        );
        assert_eq!(s.mode, None);
        for bad in ["0", "NaN", "-1", "1e30"] {
            let flag = format!("--duration={bad}");
            let e = Settings::try_from_iter(["ctwatch", "report", &flag]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
            assert!(e.to_string().contains("--duration"), "{e}");
        }
    }

    #[test]
    fn every_time_flag_shares_one_range() {
        for args in [
            &["top", "--interval", "0"][..],
            &["top", "--dump-interval", "1e9"],
            &["serve", "--interval", "0.001"],
            &["doctor", "--watch=-3"],
        ] {
            let e = Settings::try_from_iter(std::iter::once("ctwatch").chain(args.iter().copied()))
                .unwrap_err();
            assert!(e.to_string().contains("between 0.05 and 2592000"), "{e}");
        }
        let d = Settings::try_from_iter(["ctwatch", "doctor", "--watch", "0"]).unwrap();
        assert!(matches!(
            d.command,
            Command::Doctor(DoctorArgs {
                watch: Duration::ZERO,
                ..
            })
        ));
        assert!(Settings::try_from_iter(["ctwatch", "--top", "0", "drops"]).is_err());
        assert!(Settings::try_from_iter(["ctwatch", "--top", "1001", "drops"]).is_err());
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
        .unwrap();
        assert_eq!(s.mode, Some(Mode::Tracepoint));
        assert_eq!(s.netns, vec!["edge", "4026531840"]);
    }

    #[test]
    fn unknown_mode_is_a_usage_error() {
        assert!(Settings::try_from_iter(["ctwatch", "drops", "--mode", "magic"]).is_err());
    }
}
