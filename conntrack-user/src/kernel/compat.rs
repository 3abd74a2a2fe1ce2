//! The one table of attach points per mode and kernel. The loader consults
//! nothing else to decide what to load and attach.
use std::fmt;

/// How ctwatch hooks the kernel. An fentry mode is left out until a test
/// has run it: aya 0.14 cannot attach fentry to module BTF, where Debian's
/// nf_conntrack functions live, and 5.10 has no module BTF at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// kprobe/kretprobe on the conntrack functions that run once per new
    /// entry, per free, or only while the table is full, plus the
    /// `kfree_skb` raw tracepoint for the drops.
    Kprobe,
    /// `skb:kfree_skb` raw tracepoint only: victims, no live occupancy.
    Tracepoint,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Kprobe => "kprobe",
            Mode::Tracepoint => "tracepoint",
        })
    }
}

impl Mode {
    /// Whether this mode sees entry creation and free (occupancy, new flows).
    pub fn sees_entries(self) -> bool {
        !matches!(self, Mode::Tracepoint)
    }
}

/// Order in which `--mode auto` tries the modes: the most precise first.
pub const AUTO_ORDER: &[Mode] = &[Mode::Kprobe, Mode::Tracepoint];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// Raw tracepoint by name (no trace record is built: cheapest on a flood).
    RawTracepoint(&'static str),
    KProbe(&'static str),
    KRetProbe(&'static str),
}

/// One program of the eBPF object and what it needs from the kernel.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSpec {
    /// Function name in the eBPF object.
    pub program: &'static str,
    pub mode: Mode,
    pub attach: Attach,
    /// Oldest kernel where this attach point has the prototype the program
    /// reads; only used to explain a failure, never to decide.
    pub min_kernel: (u32, u32),
    /// A required probe that fails to attach is fatal for its mode.
    pub required: bool,
    /// What it gives the user, for messages.
    pub purpose: &'static str,
}

const fn spec(
    program: &'static str,
    mode: Mode,
    attach: Attach,
    min_kernel: (u32, u32),
    required: bool,
    purpose: &'static str,
) -> ProbeSpec {
    ProbeSpec {
        program,
        mode,
        attach,
        min_kernel,
        required,
        purpose,
    }
}

use Attach::*;
use Mode::*;

/// Every attach point, per mode. Prototypes per kernel are recorded in
/// each program's file under conntrack-ebpf/src/probes/. No kprobe-mode
/// program runs per packet of an entry that already exists: the VM test
/// `established_packets_run_no_program` holds them to that.
pub const PROBES: &[ProbeSpec] = &[
    // Entry programs come before their exits so no exit fires unpaired,
    // and the drop counter before early_drop, which marks what it counts.
    spec(
        "ctw_kfree_kp",
        Kprobe,
        RawTracepoint("kfree_skb"),
        (4, 19),
        true,
        "table-full drops (the skb freed after a failed early_drop)",
    ),
    spec(
        "ctw_edrop_kp",
        Kprobe,
        KProbe("early_drop"),
        (4, 19),
        true,
        "evictions",
    ),
    spec(
        "ctw_edrop_krp",
        Kprobe,
        KRetProbe("early_drop"),
        (4, 19),
        true,
        "table-full decision",
    ),
    spec(
        "ctw_confirm_kp",
        Kprobe,
        KProbe("__nf_conntrack_confirm"),
        (4, 19),
        true,
        "new entry arguments",
    ),
    spec(
        "ctw_confirm_krp",
        Kprobe,
        KRetProbe("__nf_conntrack_confirm"),
        (4, 19),
        true,
        "entry creation (occupancy, new flows)",
    ),
    spec(
        "ctw_free_kp",
        Kprobe,
        KProbe("nf_conntrack_free"),
        (4, 19),
        true,
        "entry free (occupancy)",
    ),
    spec(
        "ctw_clash_kp",
        Kprobe,
        KProbe("nf_ct_resolve_clash"),
        (5, 7),
        false,
        "insert clash arguments",
    ),
    spec(
        "ctw_clash_krp",
        Kprobe,
        KRetProbe("nf_ct_resolve_clash"),
        (5, 7),
        false,
        "insert clashes",
    ),
    // The drop reason argument appeared in 5.17.
    spec(
        "ctw_kfree_skb",
        Tracepoint,
        RawTracepoint("kfree_skb"),
        (5, 17),
        true,
        "table-full drops (NETFILTER_DROP with no conntrack entry)",
    ),
];

pub fn probes_for(mode: Mode) -> impl Iterator<Item = &'static ProbeSpec> {
    PROBES.iter().filter(move |p| p.mode == mode)
}

/// Attached probes whose other half is not: a kprobe and a kretprobe on one
/// function are a pair, the entry stashing what the return reads. Half an
/// optional pair would count every call as a missed return, or stash for
/// nothing, so the loader detaches these.
pub fn unpaired(mode: Mode, attached: &[&str]) -> Vec<&'static ProbeSpec> {
    let function = |a: Attach| match a {
        Attach::KProbe(f) | Attach::KRetProbe(f) => Some(f),
        Attach::RawTracepoint(_) => None,
    };
    probes_for(mode)
        .filter(|p| attached.contains(&p.program))
        .filter(|p| {
            probes_for(mode).any(|other| {
                other.program != p.program
                    && function(other.attach).is_some()
                    && function(other.attach) == function(p.attach)
                    && !attached.contains(&other.program)
            })
        })
        .collect()
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
    fn half_a_kprobe_pair_is_unpaired() {
        let all: Vec<&str> = probes_for(Mode::Kprobe).map(|p| p.program).collect();
        assert!(unpaired(Mode::Kprobe, &all).is_empty());
        let without_clash_return: Vec<&str> = all
            .iter()
            .copied()
            .filter(|p| *p != "ctw_clash_krp")
            .collect();
        let left: Vec<&str> = unpaired(Mode::Kprobe, &without_clash_return)
            .iter()
            .map(|p| p.program)
            .collect();
        assert_eq!(left, ["ctw_clash_kp"]);
        // A raw tracepoint has no partner to miss.
        assert!(unpaired(Mode::Tracepoint, &["ctw_kfree_skb"]).is_empty());
    }

    #[test]
    fn every_mode_has_a_required_probe() {
        for m in AUTO_ORDER {
            assert!(
                probes_for(*m).any(|p| p.required),
                "{m} has no required probe"
            );
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
