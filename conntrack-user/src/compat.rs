//! The one table of attach points per mode and kernel. The loader consults
//! nothing else to decide what to load and attach.
use std::fmt;

/// How ctwatch hooks the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `skb:kfree_skb` raw tracepoint only: victims, no live occupancy.
    Tracepoint,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Tracepoint => "tracepoint",
        })
    }
}

/// Order in which `--mode auto` tries the modes: the most precise first.
pub const AUTO_ORDER: &[Mode] = &[Mode::Tracepoint];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// Raw tracepoint by name (no trace record is built: cheapest on a flood).
    RawTracepoint(&'static str),
}

/// One program of the eBPF object and what it needs from the kernel.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSpec {
    /// Function name in the eBPF object.
    pub program: &'static str,
    pub mode: Mode,
    pub attach: Attach,
    /// Oldest kernel where this attach point has what the program reads;
    /// only used to explain a failure, never to decide.
    pub min_kernel: (u32, u32),
    /// A required probe that fails to attach is fatal.
    pub required: bool,
    /// What it gives the user, for messages.
    pub purpose: &'static str,
}

pub const PROBES: &[ProbeSpec] = &[ProbeSpec {
    program: "kfree_skb",
    mode: Mode::Tracepoint,
    attach: Attach::RawTracepoint("kfree_skb"),
    // The drop-reason argument appeared in 5.17.
    min_kernel: (5, 17),
    required: true,
    purpose: "table-full drops (NETFILTER_DROP with no conntrack entry)",
}];

pub fn probes_for(mode: Mode) -> impl Iterator<Item = &'static ProbeSpec> {
    PROBES.iter().filter(move |p| p.mode == mode)
}

/// `(major, minor)` of a release string like `6.18.44-foo`.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_has_a_required_probe() {
        for m in AUTO_ORDER {
            assert!(probes_for(*m).any(|p| p.required), "{m} has no required probe");
        }
    }

    #[test]
    fn program_names_are_unique() {
        let mut names: Vec<_> = PROBES.iter().map(|p| (p.program, p.mode)).collect();
        names.sort_by_key(|(n, m)| (n.to_string(), m.to_string()));
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_release("5.10.0-32-cloud-amd64"), Some((5, 10)));
        assert_eq!(parse_release("7.2.13+deb14-cloud-amd64"), Some((7, 2)));
        assert_eq!(parse_release("garbage"), None);
    }
}
