//! The one table of attach points per mode and kernel. The loader consults
//! nothing else to decide what to load and attach.
use std::fmt;

/// How ctwatch hooks the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// fentry/fexit on the conntrack functions in vmlinux BTF: cheapest, needs
    /// tracing programs and conntrack built into the kernel.
    Fentry,
    /// kprobe/kretprobe on the same functions: works where nf_conntrack is a
    /// module (aya cannot fentry into module BTF).
    Kprobe,
    /// `skb:kfree_skb` raw tracepoint only: victims, no live occupancy.
    Tracepoint,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Fentry => "fentry",
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
pub const AUTO_ORDER: &[Mode] = &[Mode::Fentry, Mode::Kprobe, Mode::Tracepoint];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// Raw tracepoint by name (no trace record is built: cheapest on a flood).
    RawTracepoint(&'static str),
    KProbe(&'static str),
    KRetProbe(&'static str),
    FEntry(&'static str),
    FExit(&'static str),
}

impl Attach {
    /// The kernel function (or tracepoint) this attaches to.
    pub fn target(&self) -> &'static str {
        match *self {
            Attach::RawTracepoint(t)
            | Attach::KProbe(t)
            | Attach::KRetProbe(t)
            | Attach::FEntry(t)
            | Attach::FExit(t) => t,
        }
    }

    pub fn is_function(&self) -> bool {
        !matches!(self, Attach::RawTracepoint(_))
    }
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
/// each program's file under conntrack-ebpf/src/probes/.
pub const PROBES: &[ProbeSpec] = &[
    // Entry programs come before their exits so no exit fires unpaired.
    spec(
        "ctw_in_fe",
        Fentry,
        FEntry("nf_conntrack_in"),
        (5, 5),
        true,
        "hook context (direction, devices, sender)",
    ),
    spec(
        "ctw_edrop_fe",
        Fentry,
        FEntry("early_drop"),
        (5, 5),
        true,
        "evictions",
    ),
    spec(
        "ctw_edrop_fx",
        Fentry,
        FExit("early_drop"),
        (5, 5),
        true,
        "table-full decision",
    ),
    spec(
        "ctw_alloc_fx",
        Fentry,
        FExit("__nf_conntrack_alloc"),
        (5, 5),
        true,
        "entry creation and table-full drops",
    ),
    spec(
        "ctw_free_fe",
        Fentry,
        FEntry("nf_conntrack_free"),
        (5, 5),
        true,
        "entry free (occupancy)",
    ),
    spec(
        "ctw_clash_fx",
        Fentry,
        FExit("nf_ct_resolve_clash"),
        (5, 7),
        false,
        "insert clashes",
    ),
    spec(
        "ctw_confirm_fx",
        Fentry,
        FExit("__nf_conntrack_confirm"),
        (5, 5),
        false,
        "inserts",
    ),
    spec(
        "ctw_in_kp",
        Kprobe,
        KProbe("nf_conntrack_in"),
        (4, 19),
        true,
        "hook context (direction, devices, sender)",
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
        "ctw_alloc_kp",
        Kprobe,
        KProbe("__nf_conntrack_alloc"),
        (4, 19),
        true,
        "entry creation arguments",
    ),
    spec(
        "ctw_alloc_krp",
        Kprobe,
        KRetProbe("__nf_conntrack_alloc"),
        (4, 19),
        true,
        "entry creation and table-full drops",
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
    spec(
        "ctw_confirm_krp",
        Kprobe,
        KRetProbe("__nf_conntrack_confirm"),
        (4, 19),
        false,
        "inserts",
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
