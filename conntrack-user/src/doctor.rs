//! `ctwatch doctor`: measure, then judge.
//!
//! [`measure`] gathers facts (settings, counters, an optional eBPF watch,
//! one ctnetlink dump per namespace) into a [`Measured`]; [`diagnose`] is
//! a pure function from that to findings ranked by urgency, each with its
//! evidence and the exact commands that fix it. Keeping the judgement pure
//! lets every rule be tested without privileges.
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    future::Future,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use conntrack_ebpf::AggKey;
use serde::Serialize;

use crate::{
    attribution::Attributor,
    cli::{DoctorArgs, Settings},
    counters, ctnetlink,
    error::Error,
    event::{self, Kind, Role},
    netns::{self, NetnsInfo},
    reconcile,
    snapshot::{self, has_ports, PortKey, Presence, Summary, TableSettings},
    source::counts_since,
    watch::{Scope, Watch},
};

#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("--watch {0} is not a usable window: give seconds between 0 and one day")]
    Window(f64),
    #[error("cannot read the conntrack counters of any namespace (netns {inum}: {reason})")]
    Unreadable { inum: u32, reason: String },
}

/// Used when the nf_conntrack slab cannot be read: `struct nf_conn` with
/// its extensions and slab alignment is about this size on x86-64.
pub const FALLBACK_OBJECT_SIZE: u64 = 320;
/// Share of flows (or entries) above which one port or source "dominates".
pub const DOMINANT_PERCENT: u64 = 50;
/// Fewer flows than this say nothing about who dominates.
pub const MIN_SAMPLE: u64 = 10;
/// Fill at which the table is reported nearly full.
pub const NEARLY_FULL_PERCENT: u64 = 80;
/// Fill at which held entries are worth a look for timeouts and notrack.
pub const PRESSURE_PERCENT: u64 = 50;
/// Entries per bucket beyond which lookups walk long chains.
pub const MAX_CHAIN: u64 = 4;
/// `nf_conntrack_max` is an int; stay well inside it.
const MAX_SUGGESTED: u64 = 1 << 30;
/// One `struct hlist_nulls_head` per bucket on 64-bit.
const BUCKET_BYTES: u64 = 8;
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
const NOTRACK_TABLE: &str = "ctwatch_notrack";

// ---------------------------------------------------------------- inputs

/// Everything [`diagnose`] judges from.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Measured {
    pub nf_conntrack: Option<Presence>,
    pub max: u64,
    pub buckets: u64,
    pub object_size: ObjectSize,
    /// Timeouts of the initial namespace.
    pub timeouts: BTreeMap<String, u64>,
    pub window: Option<Window>,
    pub netns: Vec<NetnsMeasure>,
    pub notes: Vec<String>,
}

/// Size of one conntrack entry in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectSize {
    pub bytes: u64,
    /// Where it was read, or "assumed".
    pub source: String,
}

impl Default for ObjectSize {
    fn default() -> Self {
        ObjectSize {
            bytes: FALLBACK_OBJECT_SIZE,
            source: "assumed".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Window {
    pub secs: f64,
    /// The eBPF mode that watched, or `None` when only counters were read.
    pub mode: Option<String>,
    /// Whether new entries were seen (kernel-probe modes).
    pub sees_new_flows: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NetnsMeasure {
    pub inum: u32,
    pub name: Option<String>,
    /// A file to enter it by, for commands that must run inside.
    pub path: PathBuf,
    pub is_init: bool,
    pub count: u64,
    pub max: u64,
    /// Highest count sampled (the count itself without a window).
    pub peak: u64,
    /// Growth of the kernel's `drop` counter over the window.
    pub drops_window: Option<u64>,
    pub early_drop_window: Option<u64>,
    /// The `drop` counter since the namespace started.
    pub drops_total: Option<u64>,
    /// Table-full drops ctwatch attributed in the window (eBPF watch only).
    pub full_drops_seen: Option<u64>,
    /// Entries created in the window (kernel-probe modes only).
    pub new_flows: Option<Culprits>,
    /// Flows refused an entry because the table was full (eBPF watch only).
    pub refused: Option<Culprits>,
    /// Entries held at the end, from one ctnetlink dump.
    pub held: Option<Held>,
    /// This namespace's own timeouts (each namespace has a copy).
    pub timeouts: BTreeMap<String, u64>,
}

/// Who made a set of flows: the leading port and the leading source.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Culprits {
    pub total: u64,
    pub port: Option<PortShare>,
    pub src: Option<SrcShare>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PortShare {
    pub proto: u8,
    pub port: u16,
    /// Inbound (to a local listener or forwarded), local (sent from here),
    /// or unknown (a dump carries no hook context).
    pub role: Role,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SrcShare {
    pub ip: IpAddr,
    pub role: Role,
    pub count: u64,
}

/// The entries a namespace holds, from a dump.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Held {
    pub total: u64,
    pub tcp_states: BTreeMap<String, u64>,
    pub udp: u64,
    pub udp_unreplied: u64,
    pub ipv6: u64,
    pub port: Option<PortShare>,
    pub src: Option<SrcShare>,
}

// --------------------------------------------------------------- outputs

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Warning,
    Info,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Stable identifier of the rule that fired.
    pub rule: &'static str,
    pub title: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_name: Option<String>,
    pub evidence: String,
    /// Exact commands, in the order to consider them.
    pub remedies: Vec<String>,
    /// What the remedies cost or break.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub caveats: Vec<String>,
}

/// The `ctwatch doctor --json` document.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub window: Option<Window>,
    pub object_size: ObjectSize,
    /// The per-namespace measurements the findings were judged from.
    pub netns: Vec<NetnsMeasure>,
    pub notes: Vec<String>,
}

impl Report {
    /// Judges `m` and keeps its facts alongside the findings.
    pub fn new(m: Measured) -> Self {
        Report {
            findings: diagnose(&m),
            window: m.window,
            object_size: m.object_size,
            netns: m.netns,
            notes: m.notes,
        }
    }
}

// ----------------------------------------------------------------- rules

/// Judges the measurements: critical findings first, then warnings, then
/// information. With nothing wrong, exactly one info finding says so.
pub fn diagnose(m: &Measured) -> Vec<Finding> {
    if m.nf_conntrack == Some(Presence::Absent) {
        return vec![Finding {
            severity: Severity::Info,
            rule: "not-loaded",
            title: "nf_conntrack is not loaded: nothing is tracked".into(),
            netns: None,
            netns_name: None,
            evidence: "neither /sys/module/nf_conntrack/initstate nor /proc/sys/net/netfilter/nf_conntrack_max exists".into(),
            remedies: vec![],
            caveats: vec![],
        }];
    }
    let fills: Vec<(&NetnsMeasure, Severity)> = m
        .netns
        .iter()
        .filter_map(|n| fill_severity(n).map(|s| (n, s)))
        .collect();
    // The max is global: one value covers the worst namespace.
    let target = fills
        .iter()
        .map(|(n, s)| suggested_max(effective_peak(n, *s)))
        .max()
        .map(|t| t.max(next_pow2(m.max.saturating_add(1))));

    let mut out = Vec::new();
    for (n, sev) in &fills {
        out.push(fill_finding(m, n, *sev, target.unwrap_or(m.max)));
    }
    for n in &m.netns {
        if fill_severity(n).is_none() {
            if let Some(f) = unexplained_drops(m, n) {
                out.push(f);
            }
        }
        out.extend(timeout_findings(m, n));
    }
    if let Some(f) = bucket_finding(m, target) {
        out.push(f);
    }
    if out.is_empty() {
        out.push(healthy(m));
    }
    out.sort_by_key(|f| f.severity);
    out
}

fn percent_of(n: u64, of: u64) -> u64 {
    n.saturating_mul(100).checked_div(of).unwrap_or(0)
}

fn pct(n: u64, of: u64) -> String {
    if of == 0 {
        return "?%".into();
    }
    let p = n as f64 * 100.0 / of as f64;
    // "0%" of a big table would hide that it holds anything at all.
    if p < 10.0 && n > 0 {
        format!("{p:.1}%")
    } else {
        format!("{p:.0}%")
    }
}

fn next_pow2(n: u64) -> u64 {
    n.max(1)
        .checked_next_power_of_two()
        .unwrap_or(MAX_SUGGESTED)
        .min(MAX_SUGGESTED)
}

/// Next power of two at or above twice the peak.
pub fn suggested_max(peak: u64) -> u64 {
    next_pow2(peak.saturating_mul(2))
}

/// Buckets for a max: a quarter of it, as a power of two.
pub fn suggested_buckets(max: u64) -> u64 {
    next_pow2(max.div_ceil(MAX_CHAIN))
}

/// Table-full drops the kernel agrees with. In tracepoint mode "seen"
/// also holds raw-table and other pre-conntrack drops, which the kernel's
/// conntrack `drop` counter does not count; only both together mean a
/// full table.
fn confirmed_full_drops(n: &NetnsMeasure) -> u64 {
    match (n.full_drops_seen, n.drops_window) {
        (Some(seen), Some(kernel)) => seen.min(kernel),
        (Some(seen), None) => seen,
        (None, _) => 0,
    }
}

fn fill_severity(n: &NetnsMeasure) -> Option<Severity> {
    if n.max == 0 {
        return None;
    }
    let full = confirmed_full_drops(n) > 0
        || n.peak >= n.max
        || (n.drops_window.unwrap_or(0) > 0 && percent_of(n.peak, n.max) >= 95);
    if full {
        Some(Severity::Critical)
    } else if percent_of(n.peak, n.max) >= NEARLY_FULL_PERCENT
        || n.early_drop_window.unwrap_or(0) > 0
    {
        Some(Severity::Warning)
    } else {
        None
    }
}

/// A table that dropped for want of room was at its max, even if no
/// sample caught it there.
fn effective_peak(n: &NetnsMeasure, sev: Severity) -> u64 {
    if sev == Severity::Critical {
        n.peak.max(n.max)
    } else {
        n.peak
    }
}

fn under_pressure(n: &NetnsMeasure) -> bool {
    n.max > 0
        && (percent_of(n.peak, n.max) >= PRESSURE_PERCENT
            || confirmed_full_drops(n) > 0
            || n.drops_window.unwrap_or(0) > 0)
}

fn ns_label(n: &NetnsMeasure) -> String {
    match &n.name {
        Some(name) => format!("netns {} ({name})", n.inum),
        None if n.is_init => format!("netns {} (initial)", n.inum),
        None => format!("netns {}", n.inum),
    }
}

/// What to put before a command that must run inside the namespace.
fn enter_prefix(n: &NetnsMeasure) -> String {
    if n.is_init {
        String::new()
    } else if let Some(name) = &n.name {
        format!("ip netns exec {name} ")
    } else {
        format!("nsenter --net={} ", n.path.display())
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn port_name(p: &PortShare) -> String {
    PortKey {
        proto: p.proto,
        port: p.port,
    }
    .to_string()
}

fn role_word(r: Role) -> &'static str {
    match r {
        Role::Inbound => "inbound",
        Role::Local => "sent from this namespace",
        Role::Unknown => "direction unknown",
    }
}

/// ", peak P during the S s watch", or nothing without a window (the
/// peak is then just the count).
fn peak_words(m: &Measured, peak: u64) -> String {
    match &m.window {
        Some(w) => format!(", peak {peak} during the {:.1} s watch", w.secs),
        None => String::new(),
    }
}

fn window_words(m: &Measured) -> String {
    match &m.window {
        Some(w) => format!("during the {:.1} s watch", w.secs),
        None => "(no watch window)".into(),
    }
}

fn fill_finding(m: &Measured, n: &NetnsMeasure, sev: Severity, target: u64) -> Finding {
    let label = ns_label(n);
    let title = match sev {
        Severity::Critical => format!("conntrack table full in {label}"),
        _ => format!("conntrack table nearly full in {label}"),
    };
    let mut ev = vec![format!(
        "{}/{} entries ({}) now{}",
        n.count,
        n.max,
        pct(n.count, n.max),
        peak_words(m, n.peak)
    )];
    if let Some(seen) = n.full_drops_seen {
        ev.push(format!("ctwatch saw {seen} table-full drops"));
    }
    match (n.drops_window, n.drops_total) {
        (Some(d), _) => ev.push(format!(
            "kernel drop counter +{d}, early_drop +{}",
            n.early_drop_window.unwrap_or(0)
        )),
        (None, Some(t)) if t > 0 => ev.push(format!(
            "kernel drop counter {t} since the namespace started"
        )),
        _ => {}
    }
    describe_culprits(&mut ev, "new entries", n.new_flows.as_ref());
    describe_culprits(&mut ev, "flows refused an entry", n.refused.as_ref());
    if let Some(h) = &n.held {
        describe_culprits(
            &mut ev,
            "entries held",
            Some(&Culprits {
                total: h.total,
                port: h.port.clone(),
                src: h.src.clone(),
            }),
        );
    }
    let per = &m.object_size;
    let mut remedies = vec![
        format!("sysctl -w net.netfilter.nf_conntrack_max={target}"),
        format!(
            "echo 'net.netfilter.nf_conntrack_max = {target}' > /etc/sysctl.d/90-conntrack.conf"
        ),
    ];
    let mut caveats = vec![format!(
        "nf_conntrack_max={target} lets the tables use up to {} of kernel memory per full namespace ({target} × {} B per entry{}); it is global, so run it in the initial namespace",
        bytes(target.saturating_mul(per.bytes)),
        per.bytes,
        if per.source == "assumed" {
            format!(", assumed: the nf_conntrack slab size could not be read, so {FALLBACK_OBJECT_SIZE} B is a guess")
        } else {
            format!(", object size from {}", per.source)
        }
    )];
    let (notrack, notrack_caveats) = notrack_remedies(n);
    remedies.extend(notrack);
    caveats.extend(notrack_caveats);
    Finding {
        severity: sev,
        rule: "table-fill",
        title,
        netns: Some(n.inum),
        netns_name: n.name.clone(),
        evidence: ev.join("; "),
        remedies,
        caveats,
    }
}

fn describe_culprits(ev: &mut Vec<String>, what: &str, c: Option<&Culprits>) {
    let Some(c) = c else { return };
    if c.total == 0 {
        return;
    }
    let mut parts = Vec::new();
    if let Some(p) = &c.port {
        parts.push(format!(
            "{} to {} ({})",
            pct(p.count, c.total),
            port_name(p),
            role_word(p.role)
        ));
    }
    if let Some(s) = &c.src {
        parts.push(format!("{} from {}", pct(s.count, c.total), s.ip));
    }
    ev.push(format!(
        "{what}: {}{}",
        c.total,
        if parts.is_empty() {
            String::new()
        } else {
            format!(", {}", parts.join(", "))
        }
    ));
}

fn dominates(count: u64, total: u64) -> bool {
    total >= MIN_SAMPLE && count.saturating_mul(100) >= DOMINANT_PERCENT * total
}

/// Notrack rules scoped to exactly the port (or, failing that, the source)
/// that dominates new flows, refused flows or held entries; never a
/// blanket rule.
pub fn notrack_remedies(n: &NetnsMeasure) -> (Vec<String>, Vec<String>) {
    let held = n.held.as_ref().map(|h| Culprits {
        total: h.total,
        port: h.port.clone(),
        src: h.src.clone(),
    });
    let sets: Vec<&Culprits> = [n.new_flows.as_ref(), n.refused.as_ref(), held.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    let mut ports: Vec<PortShare> = Vec::new();
    for c in &sets {
        if let Some(p) = &c.port {
            if has_ports(p.proto) && dominates(p.count, c.total) {
                match ports
                    .iter_mut()
                    .find(|q| q.proto == p.proto && q.port == p.port)
                {
                    // A direction seen by a hook beats a dump's guess.
                    Some(q) if q.role == Role::Unknown => q.role = p.role,
                    Some(_) => {}
                    None => ports.push(p.clone()),
                }
            }
        }
    }
    let mut srcs: Vec<SrcShare> = Vec::new();
    if ports.is_empty() {
        for c in &sets {
            if let Some(s) = &c.src {
                if dominates(s.count, c.total) && !srcs.iter().any(|t| t.ip == s.ip) {
                    srcs.push(s.clone());
                }
            }
        }
    }
    if ports.is_empty() && srcs.is_empty() {
        return (vec![], vec![]);
    }
    let prefix = enter_prefix(n);
    let v6 = n.held.as_ref().is_some_and(|h| h.ipv6 > 0);
    let mut remedies = Vec::new();
    let mut unknown = false;
    for p in &ports {
        let proto = event::proto_name(p.proto);
        unknown |= p.role == Role::Unknown;
        // The flow's own packets match dport on the hook they arrive by;
        // its replies match sport on the other, or they make entries of
        // their own.
        let (fwd, back) = hooks(p.role);
        let rules = [
            (fwd, format!("{proto} dport {}", p.port)),
            (back, format!("{proto} sport {}", p.port)),
        ];
        remedies.push(nft_line(&prefix, &rules));
        let ipt = |bin: &str| {
            [(fwd, "--dport"), (back, "--sport")]
                .iter()
                .map(|(h, flag)| {
                    format!(
                        "{prefix}{bin} -t raw -A {} -p {proto} {flag} {} -j CT --notrack",
                        h.iptables(),
                        p.port
                    )
                })
                .collect::<Vec<_>>()
        };
        let mut lines = ipt("iptables");
        if v6 {
            lines.extend(ipt("ip6tables"));
        }
        remedies.push(lines.join(" && "));
    }
    for s in &srcs {
        unknown |= s.role == Role::Unknown;
        let fam = if s.ip.is_ipv4() { "ip" } else { "ip6" };
        let (fwd, back) = hooks(s.role);
        let rules = [
            (fwd, format!("{fam} saddr {}", s.ip)),
            (back, format!("{fam} daddr {}", s.ip)),
        ];
        remedies.push(nft_line(&prefix, &rules));
        let bin = if s.ip.is_ipv4() {
            "iptables"
        } else {
            "ip6tables"
        };
        remedies.push(format!(
            "{prefix}{bin} -t raw -A {} -s {ip} -j CT --notrack && {prefix}{bin} -t raw -A {} -d {ip} -j CT --notrack",
            fwd.iptables(),
            back.iptables(),
            ip = s.ip
        ));
    }
    let what = ports
        .iter()
        .map(port_name)
        .chain(srcs.iter().map(|s| s.ip.to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    let mut caveats = vec![format!(
        "notrack takes {what} out of connection tracking: NAT (masquerade, DNAT, port forwarding) and stateful rules (ct state, conntrack-based policing) stop working for that traffic, so use it only where replies need no tracking; run one of the nft or iptables forms, not both"
    )];
    if unknown {
        caveats.push(
            "the direction was guessed from a dump: the rules assume the traffic arrives from outside; for traffic this host sends, swap the hooks (output for the dport rule, prerouting for the sport rule)"
                .into(),
        );
    }
    (remedies, caveats)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    Pre,
    Out,
}

impl Hook {
    fn chain(self) -> &'static str {
        match self {
            Hook::Pre => "pre",
            Hook::Out => "out",
        }
    }
    fn nft(self) -> &'static str {
        match self {
            Hook::Pre => "prerouting",
            Hook::Out => "output",
        }
    }
    fn iptables(self) -> &'static str {
        match self {
            Hook::Pre => "PREROUTING",
            Hook::Out => "OUTPUT",
        }
    }
}

/// (hook of the flow's first packet, hook of its replies).
fn hooks(role: Role) -> (Hook, Hook) {
    match role {
        Role::Local => (Hook::Out, Hook::Pre),
        Role::Inbound | Role::Unknown => (Hook::Pre, Hook::Out),
    }
}

/// One nft invocation, applied atomically: table, both raw-priority chains
/// (before conntrack at -200), and the rules.
fn nft_line(prefix: &str, rules: &[(Hook, String)]) -> String {
    let t = NOTRACK_TABLE;
    let mut cmds = vec![format!("add table inet {t}")];
    for h in [Hook::Pre, Hook::Out] {
        cmds.push(format!(
            "add chain inet {t} {} {{ type filter hook {} priority -300; }}",
            h.chain(),
            h.nft()
        ));
    }
    for (h, m) in rules {
        cmds.push(format!("add rule inet {t} {} {m} notrack", h.chain()));
    }
    format!("{prefix}nft '{}'", cmds.join("; "))
}

/// A short-lived state (or unanswered UDP) holding most of a pressed table.
fn timeout_findings(m: &Measured, n: &NetnsMeasure) -> Vec<Finding> {
    let Some(h) = &n.held else { return vec![] };
    if !under_pressure(n) || h.total < MIN_SAMPLE {
        return vec![];
    }
    let mut out = Vec::new();
    let state = h
        .tcp_states
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)));
    if let Some((state, count)) = state {
        if let Some((key, suggested)) = tcp_timeout_for(state) {
            if dominates(*count, h.total) {
                if let Some(f) = timeout_finding(
                    m,
                    n,
                    key,
                    suggested,
                    format!(
                        "{count} of {} entries ({}) are TCP {state}, from a ctnetlink dump",
                        h.total,
                        pct(*count, h.total)
                    ),
                    format!(
                        "TCP {state} entries hold most of the table in {}",
                        ns_label(n)
                    ),
                ) {
                    out.push(f);
                }
            }
        }
    }
    if dominates(h.udp_unreplied, h.total) {
        if let Some(f) = timeout_finding(
            m,
            n,
            "udp_timeout",
            10,
            format!(
                "{} of {} entries ({}) are UDP flows that never saw a reply, from a ctnetlink dump",
                h.udp_unreplied,
                h.total,
                pct(h.udp_unreplied, h.total)
            ),
            format!(
                "unanswered UDP flows hold most of the table in {}",
                ns_label(n)
            ),
        ) {
            out.push(f);
        }
    }
    out
}

/// The sysctl (without `nf_conntrack_`) that times out a TCP state, and a
/// shorter value that is still safe for it.
pub fn tcp_timeout_for(state: &str) -> Option<(&'static str, u64)> {
    Some(match state {
        "SYN_SENT" => ("tcp_timeout_syn_sent", 30),
        "SYN_RECV" => ("tcp_timeout_syn_recv", 30),
        "FIN_WAIT" => ("tcp_timeout_fin_wait", 30),
        "CLOSE_WAIT" => ("tcp_timeout_close_wait", 20),
        "LAST_ACK" => ("tcp_timeout_last_ack", 10),
        "TIME_WAIT" => ("tcp_timeout_time_wait", 30),
        "CLOSE" => ("tcp_timeout_close", 5),
        _ => return None,
    })
}

fn timeout_finding(
    m: &Measured,
    n: &NetnsMeasure,
    key: &str,
    suggested: u64,
    evidence: String,
    title: String,
) -> Option<Finding> {
    let current = n
        .timeouts
        .get(key)
        .or_else(|| m.timeouts.get(key))
        .copied()?;
    if current <= suggested {
        return None;
    }
    let sysctl = format!("net.netfilter.nf_conntrack_{key}");
    let mut remedies = vec![format!("{}sysctl -w {sysctl}={suggested}", enter_prefix(n))];
    let mut caveats = vec![format!(
        "an entry idle longer than {suggested} s in that state is forgotten; its next packet is then judged as a new (or invalid) flow by stateful rules"
    )];
    if n.is_init {
        remedies.push(format!(
            "echo '{sysctl} = {suggested}' >> /etc/sysctl.d/92-conntrack-timeouts.conf"
        ));
    } else {
        caveats.push("each namespace has its own copy of the timeouts: make it persistent where the namespace is created (its runtime's sysctl settings)".into());
    }
    Some(Finding {
        severity: Severity::Warning,
        rule: "timeouts",
        title,
        netns: Some(n.inum),
        netns_name: n.name.clone(),
        evidence: format!("{evidence}; {sysctl} is {current} s, {suggested} s suggested"),
        remedies,
        caveats,
    })
}

/// Kernel drops in a table that never looked full.
fn unexplained_drops(m: &Measured, n: &NetnsMeasure) -> Option<Finding> {
    let d = n.drops_window.filter(|d| *d > 0)?;
    let who = n.name.clone().unwrap_or_else(|| n.inum.to_string());
    Some(Finding {
        severity: Severity::Warning,
        rule: "conntrack-drops",
        title: format!("conntrack dropped packets in {} without a full table", ns_label(n)),
        netns: Some(n.inum),
        netns_name: n.name.clone(),
        evidence: format!(
            "kernel drop counter +{d} {}, peak {}/{} entries; ctwatch saw {} table-full drops: the rest are packets a protocol tracker refused or failed clash resolution",
            window_words(m),
            n.peak,
            n.max,
            n.full_drops_seen.map_or("no".to_string(), |s| s.to_string())
        ),
        remedies: vec![
            format!("ctwatch drops --netns {who}"),
            format!("{}conntrack -S", enter_prefix(n)),
        ],
        caveats: vec![],
    })
}

/// Long hash chains now, or after the suggested max.
fn bucket_finding(m: &Measured, target: Option<u64>) -> Option<Finding> {
    if m.buckets == 0 {
        return None;
    }
    // One hash table serves every namespace.
    let total: u64 = m.netns.iter().map(|n| n.count).sum();
    let eff_max = target.unwrap_or(0).max(m.max);
    let long_now = total > MAX_CHAIN * m.buckets;
    let long_at_max = eff_max > MAX_CHAIN * m.buckets;
    if !(long_now || long_at_max) {
        return None;
    }
    let b = suggested_buckets(eff_max);
    let persist = match m.nf_conntrack {
        Some(Presence::Module) => {
            format!("echo 'options nf_conntrack hashsize={b}' > /etc/modprobe.d/nf_conntrack.conf")
        }
        _ => format!("echo 'net.netfilter.nf_conntrack_buckets = {b}' > /etc/sysctl.d/91-conntrack-buckets.conf"),
    };
    let max_words = if eff_max > m.max {
        format!("the suggested max {eff_max}")
    } else {
        format!("max {}", m.max)
    };
    Some(Finding {
        severity: Severity::Warning,
        rule: "hash-buckets",
        title: "conntrack hash table too small: long bucket chains".into(),
        netns: None,
        netns_name: None,
        evidence: format!(
            "{total} entries in {} buckets ({:.1} per bucket) now; {max_words} means {:.1} per bucket at full table (above {MAX_CHAIN} slows every lookup)",
            m.buckets,
            total as f64 / m.buckets as f64,
            eff_max as f64 / m.buckets as f64
        ),
        remedies: vec![
            format!("echo {b} > /sys/module/nf_conntrack/parameters/hashsize"),
            persist,
        ],
        caveats: vec![format!(
            "writable from the initial network namespace only; the resize rehashes every entry once (a short stall on a big table) and costs {} for {b} buckets",
            bytes(b * BUCKET_BYTES)
        )],
    })
}

fn healthy(m: &Measured) -> Finding {
    let worst = m.netns.iter().max_by(|a, b| {
        percent_of(a.peak, a.max)
            .cmp(&percent_of(b.peak, b.max))
            .then_with(|| a.peak.cmp(&b.peak))
    });
    let mut ev = Vec::new();
    match worst {
        Some(n) => ev.push(format!(
            "fullest: {} with {}/{} entries ({}) now{}",
            ns_label(n),
            n.count,
            n.max,
            pct(n.count, n.max),
            peak_words(m, n.peak)
        )),
        None => ev.push("no namespace holds conntrack entries".into()),
    }
    if m.window.is_some() {
        let d: u64 = m.netns.iter().filter_map(|n| n.drops_window).sum();
        ev.push(format!("kernel drop counters +{d} in the window"));
    } else {
        let d: u64 = m.netns.iter().filter_map(|n| n.drops_total).sum();
        if d > 0 {
            ev.push(format!(
                "the kernel's drop counters stand at {d} since the namespaces started (not necessarily recent: watch with --watch SECS)"
            ));
        }
    }
    if m.buckets > 0 {
        ev.push(format!(
            "max {} over {} buckets ({:.1} per bucket at full table)",
            m.max,
            m.buckets,
            m.max as f64 / m.buckets as f64
        ));
    }
    Finding {
        severity: Severity::Info,
        rule: "healthy",
        title: "no conntrack problem found".into(),
        netns: None,
        netns_name: None,
        evidence: ev.join("; "),
        remedies: vec![],
        caveats: vec![],
    }
}

// ----------------------------------------------------------- measurement

/// The size of one nf_conntrack slab object: /proc/slabinfo's objsize (the
/// per-object stride), else sysfs, else [`FALLBACK_OBJECT_SIZE`].
pub fn object_size() -> ObjectSize {
    if let Some(b) = fs::read_to_string("/proc/slabinfo")
        .ok()
        .and_then(|t| parse_slabinfo(&t))
    {
        return ObjectSize {
            bytes: b,
            source: "/proc/slabinfo".into(),
        };
    }
    for file in ["slab_size", "object_size"] {
        let path = Path::new("/sys/kernel/slab/nf_conntrack").join(file);
        if let Some(b) = fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .filter(|b| *b > 0)
        {
            return ObjectSize {
                bytes: b,
                source: path.display().to_string(),
            };
        }
    }
    ObjectSize::default()
}

/// objsize of the `nf_conntrack` cache (older kernels name one cache per
/// namespace `nf_conntrack_<hex>`); never `nf_conntrack_expect`.
pub fn parse_slabinfo(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let name = *f.first()?;
        let ours = name == "nf_conntrack"
            || name
                .strip_prefix("nf_conntrack_")
                .is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()));
        if !ours {
            return None;
        }
        f.get(3)?.parse().ok().filter(|b| *b > 0)
    })
}

/// Per-netns tally of flows by port (with the hook direction) and source.
#[derive(Debug, Default)]
struct FlowTally {
    total: u64,
    ports: HashMap<PortKey, [u64; 3]>,
    srcs: HashMap<IpAddr, [u64; 3]>,
}

fn role_index(r: Role) -> usize {
    match r {
        Role::Inbound => 0,
        Role::Local => 1,
        Role::Unknown => 2,
    }
}

fn role_at(i: usize) -> Role {
    match i {
        0 => Role::Inbound,
        1 => Role::Local,
        _ => Role::Unknown,
    }
}

/// The key with the largest sum, and its most frequent direction.
fn lead<K: Copy + Ord>(m: &HashMap<K, [u64; 3]>) -> Option<(K, Role, u64)> {
    let (k, v) = m.iter().max_by(|a, b| {
        let (sa, sb) = (a.1.iter().sum::<u64>(), b.1.iter().sum::<u64>());
        sa.cmp(&sb).then_with(|| b.0.cmp(a.0))
    })?;
    let role = (0..3)
        .max_by_key(|i| (v[*i], 3 - *i))
        .map_or(Role::Unknown, role_at);
    Some((*k, role, v.iter().sum()))
}

impl FlowTally {
    fn add(&mut self, proto: u8, dport: u16, src: IpAddr, role: Role, n: u64) {
        self.total += n;
        let port = PortKey {
            proto,
            port: if has_ports(proto) { dport } else { 0 },
        };
        self.ports.entry(port).or_default()[role_index(role)] += n;
        self.srcs.entry(src).or_default()[role_index(role)] += n;
    }

    fn culprits(&self) -> Culprits {
        Culprits {
            total: self.total,
            port: lead(&self.ports).map(|(k, role, count)| PortShare {
                proto: k.proto,
                port: k.port,
                role,
                count,
            }),
            src: lead(&self.srcs).map(|(ip, role, count)| SrcShare { ip, role, count }),
        }
    }
}

fn held_of(s: &Summary, inum: u32, attributor: &mut Attributor) -> Held {
    Held {
        total: s.entries,
        tcp_states: s.tcp_states.clone(),
        udp: s.l4_count(17),
        udp_unreplied: s.udp_unreplied,
        ipv6: s.ipv6,
        port: s.dst_port.leader().map(|(k, count)| PortShare {
            proto: k.proto,
            port: k.port,
            role: snapshot::role_of_port(attributor, inum, k),
            count,
        }),
        src: s.src.leader().map(|(ip, count)| SrcShare {
            ip,
            role: Role::Unknown,
            count,
        }),
    }
}

fn sample_counts(ns: &[NetnsInfo], peaks: &mut HashMap<u32, u64>) {
    for n in ns {
        if let Ok(s) = counters::read_sysctl(n) {
            let p = peaks.entry(n.inum).or_default();
            *p = (*p).max(s.count);
        }
    }
}

/// Gathers what [`diagnose`] needs. With `args.watch > 0`, watches the
/// kernel for that long (ending early when `stop` resolves), through eBPF
/// when it loads and through the kernel's counters alone when it does not.
pub async fn measure(
    settings: &Settings,
    args: &DoctorArgs,
    stop: impl Future<Output = ()>,
) -> Result<Measured, Error> {
    let mut m = Measured {
        nf_conntrack: Some(Presence::detect()),
        ..Default::default()
    };
    if m.nf_conntrack == Some(Presence::Absent) {
        return Ok(m);
    }
    if !(args.watch.is_finite() && (0.0..=86400.0).contains(&args.watch)) {
        return Err(DoctorError::Window(args.watch).into());
    }
    let table = TableSettings::read()?;
    m.max = table.max;
    m.buckets = table.buckets;
    m.timeouts = table.timeouts;
    m.object_size = object_size();
    let scope = Scope::from_specs(&settings.netns)?;
    let named = scope.is_narrowed();
    let scope_ns = scope.namespaces()?;
    let init_inum = snapshot::init_netns().map(|n| n.inum);

    // Attach before the first counter read, so the kernel's counters and
    // ctwatch's cover the same window.
    let mut w = None;
    if args.watch > 0.0 {
        // The per-key count maps are all the doctor reads: stream as few
        // records as the programs allow (0 would mean unlimited).
        match Watch::start(settings, false, 1) {
            Ok(x) => w = Some(x),
            Err(e) => m.notes.push(format!(
                "eBPF did not load ({}); judged from the kernel's counters only",
                crate::loader::chain(&e)
            )),
        }
    }
    let mut peaks: HashMap<u32, u64> = HashMap::new();
    let start = reconcile::snapshot(&scope_ns);
    for (inum, s) in &start {
        if let Some(x) = &s.sysctl {
            peaks.insert(*inum, x.count);
        }
    }
    let mut refused: HashMap<u32, FlowTally> = HashMap::new();
    let mut created: HashMap<u32, FlowTally> = HashMap::new();
    let mut seen_full: HashMap<u32, u64> = HashMap::new();
    let mut end_ns = scope_ns.clone();
    let mut watched_by_ebpf = false;
    let mut sees_new = false;
    if args.watch > 0.0 {
        let secs = args.watch;
        let before: Option<HashMap<AggKey, u64>> = match &w {
            Some(w) => Some(w.source.counts()?),
            None => None,
        };
        match &w {
            Some(w) => eprintln!(
                "{}; judging after {secs:.1}s (Ctrl-C to stop early)",
                w.banner()
            ),
            None => {
                eprintln!("ctwatch doctor: reading counters for {secs:.1}s (Ctrl-C to stop early)")
            }
        }
        let t0 = Instant::now();
        let deadline = tokio::time::sleep(Duration::from_secs_f64(secs));
        tokio::pin!(deadline);
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                _ = &mut stop => break,
                _ = tick.tick() => sample_counts(&scope_ns, &mut peaks),
                r = async {
                    match w.as_mut() {
                        Some(w) => w.source.next_batch(&mut batch).await,
                        None => std::future::pending().await,
                    }
                } => {
                    r?;
                    // The counts maps are exact; the events themselves are not needed.
                    batch.clear();
                }
            }
        }
        sample_counts(&scope_ns, &mut peaks);
        m.window = Some(Window {
            secs: (t0.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
            mode: w.as_ref().map(|w| w.loaded.mode.to_string()),
            sees_new_flows: w.as_ref().is_some_and(|w| w.loaded.mode.sees_entries()),
        });
        if let (Some(w), Some(before)) = (w.as_mut(), before) {
            watched_by_ebpf = true;
            sees_new = w.loaded.mode.sees_entries();
            let now = w.source.counts()?;
            for (key, n) in counts_since(&now, &before) {
                let Ok(rec) = event::decode_key(&key) else {
                    continue;
                };
                if !w.scope.contains(rec.netns) {
                    continue;
                }
                let target = match rec.kind {
                    Kind::Drop => {
                        *seen_full.entry(rec.netns).or_default() += n;
                        &mut refused
                    }
                    Kind::New => &mut created,
                    _ => continue,
                };
                target
                    .entry(rec.netns)
                    .or_default()
                    .add(rec.proto, rec.dport, rec.src, rec.role, n);
            }
            // Namespaces created during the window count too.
            if !named {
                for ns in w.scope.namespaces().unwrap_or_default() {
                    if !end_ns.iter().any(|n| n.inum == ns.inum) {
                        end_ns.push(ns);
                    }
                }
            }
        }
    }
    let end = if m.window.is_some() {
        reconcile::snapshot(&end_ns)
    } else {
        start.clone()
    };

    // Judging nothing would read as "healthy": say what is missing instead.
    if !end.values().any(|e| e.sysctl.is_some()) {
        if let Some((inum, reason)) = end
            .iter()
            .find_map(|(i, e)| e.error.as_ref().map(|r| (*i, r.clone())))
        {
            return Err(DoctorError::Unreadable { inum, reason }.into());
        }
    }
    let mut attributor = Attributor::new();
    for ns in &end_ns {
        let Some(e) = end.get(&ns.inum) else { continue };
        let Some(sysctl) = &e.sysctl else {
            if named {
                m.notes.push(format!(
                    "netns {}: no counters: {}",
                    ns.inum,
                    e.error.as_deref().unwrap_or("unreadable")
                ));
            }
            continue;
        };
        let s = start.get(&ns.inum);
        let delta = |f: fn(&counters::CtStats) -> u64| -> Option<u64> {
            let a = s?.stats.as_ref()?;
            let b = e.stats.as_ref()?;
            Some(f(&b.0).saturating_sub(f(&a.0)))
        };
        let windowed = m.window.is_some();
        if let Some(before) = s.and_then(|x| x.sysctl.as_ref()) {
            if windowed && before.max != sysctl.max {
                // Another tool (or a test) moved it: peaks straddle two limits.
                m.notes.push(format!(
                    "netns {}: nf_conntrack_max changed during the window ({} -> {}); fill is judged against the last value",
                    ns.inum, before.max, sysctl.max
                ));
            }
        }
        let mut nm = NetnsMeasure {
            inum: ns.inum,
            name: ns.name.clone(),
            path: ns.path.clone(),
            is_init: Some(ns.inum) == init_inum,
            count: sysctl.count,
            max: sysctl.max,
            peak: peaks.get(&ns.inum).copied().unwrap_or(0).max(sysctl.count),
            drops_window: if windowed { delta(|c| c.drop) } else { None },
            early_drop_window: if windowed {
                delta(|c| c.early_drop)
            } else {
                None
            },
            drops_total: e.stats.as_ref().map(|(c, _)| c.drop),
            full_drops_seen: watched_by_ebpf.then(|| seen_full.get(&ns.inum).copied().unwrap_or(0)),
            new_flows: sees_new.then(|| {
                created
                    .get(&ns.inum)
                    .map(FlowTally::culprits)
                    .unwrap_or_default()
            }),
            refused: watched_by_ebpf.then(|| {
                refused
                    .get(&ns.inum)
                    .map(FlowTally::culprits)
                    .unwrap_or_default()
            }),
            held: None,
            timeouts: BTreeMap::new(),
        };
        let active =
            nm.peak > 0 || nm.drops_window.unwrap_or(0) > 0 || nm.full_drops_seen.unwrap_or(0) > 0;
        if !(active || named) {
            continue;
        }
        match ctnetlink::dump_in(ns) {
            Ok(entries) => {
                let summary = Summary::of(&entries);
                drop(entries);
                nm.held = Some(held_of(&summary, ns.inum, &mut attributor));
            }
            Err(e) => m
                .notes
                .push(format!("netns {}: no ctnetlink dump: {e}", ns.inum)),
        }
        nm.timeouts = netns::run_in(ns, snapshot::read_timeouts).unwrap_or_default();
        m.netns.push(nm);
    }
    m.netns.sort_by_key(|n| n.inum);
    Ok(m)
}

#[cfg(test)]
mod fill_tests {
    use super::*;

    #[test]
    fn rule_drops_at_low_fill_are_not_a_full_table() {
        let n = NetnsMeasure {
            max: 1000,
            peak: 10,
            count: 10,
            full_drops_seen: Some(500),
            drops_window: Some(0),
            ..Default::default()
        };
        assert_eq!(
            fill_severity(&n),
            None,
            "raw-table drops look like this in tracepoint mode"
        );
        let n = NetnsMeasure {
            drops_window: Some(500),
            ..n
        };
        assert_eq!(fill_severity(&n), Some(Severity::Critical));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Measured {
        Measured {
            nf_conntrack: Some(Presence::BuiltIn),
            max: 65536,
            buckets: 65536,
            object_size: ObjectSize {
                bytes: 256,
                source: "/proc/slabinfo".into(),
            },
            timeouts: BTreeMap::from([
                ("tcp_timeout_time_wait".to_string(), 120),
                ("udp_timeout".to_string(), 30),
            ]),
            window: Some(Window {
                secs: 2.0,
                mode: Some("tracepoint".into()),
                sees_new_flows: false,
            }),
            netns: vec![],
            notes: vec![],
        }
    }

    fn ns(count: u64, max: u64) -> NetnsMeasure {
        NetnsMeasure {
            inum: 4026532246,
            name: Some("edge".into()),
            path: "/run/netns/edge".into(),
            is_init: false,
            count,
            max,
            peak: count,
            drops_window: Some(0),
            early_drop_window: Some(0),
            drops_total: Some(0),
            full_drops_seen: Some(0),
            ..Default::default()
        }
    }

    fn held_tcp(total: u64, port: u16) -> Held {
        Held {
            total,
            tcp_states: BTreeMap::from([("ESTABLISHED".to_string(), total)]),
            port: Some(PortShare {
                proto: 6,
                port,
                role: Role::Inbound,
                count: total,
            }),
            src: Some(SrcShare {
                ip: "198.18.0.2".parse().unwrap(),
                role: Role::Unknown,
                count: total,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn table_full_is_critical_with_a_max_remedy_and_its_memory() {
        let mut m = base();
        m.max = 16;
        let mut n = ns(16, 16);
        n.drops_window = Some(150);
        n.full_drops_seen = Some(150);
        m.netns.push(n);
        let f = diagnose(&m);
        assert_eq!(f[0].severity, Severity::Critical, "{f:#?}");
        assert_eq!(f[0].netns, Some(4026532246));
        assert!(f[0].title.contains("full"));
        assert_eq!(
            f[0].remedies[0],
            "sysctl -w net.netfilter.nf_conntrack_max=32"
        );
        assert_eq!(
            f[0].remedies[1],
            "echo 'net.netfilter.nf_conntrack_max = 32' > /etc/sysctl.d/90-conntrack.conf"
        );
        // 32 entries × 256 B.
        assert!(f[0].caveats[0].contains("8.0 KiB"), "{:?}", f[0].caveats);
        assert!(f[0].caveats[0].contains("256 B"));
        assert!(
            f[0].evidence.contains("150 table-full drops"),
            "{}",
            f[0].evidence
        );
        assert!(f.iter().all(|x| x.rule != "healthy"));
    }

    #[test]
    fn suggested_max_doubles_the_peak_to_a_power_of_two() {
        assert_eq!(suggested_max(16), 32);
        assert_eq!(suggested_max(200_000), 524_288);
        assert_eq!(suggested_max(0), 1);
        assert_eq!(suggested_max(u64::MAX), MAX_SUGGESTED);
        // Raised at 85% fill: the answer is above today's max.
        let mut m = base();
        m.netns.push(ns(56_000, 65_536));
        let f = diagnose(&m);
        assert_eq!(f[0].severity, Severity::Warning);
        assert_eq!(
            f[0].remedies[0],
            "sysctl -w net.netfilter.nf_conntrack_max=131072"
        );
    }

    #[test]
    fn unreadable_slab_falls_back_and_says_so() {
        let mut m = base();
        m.object_size = ObjectSize::default();
        m.max = 16;
        m.netns.push(ns(16, 16));
        let f = diagnose(&m);
        assert!(f[0].caveats[0].contains("320 B"), "{:?}", f[0].caveats);
        assert!(f[0].caveats[0].contains("guess"));
    }

    #[test]
    fn dominant_port_gets_a_notrack_rule_scoped_to_it_with_the_nat_warning() {
        let mut m = base();
        m.max = 16;
        let mut n = ns(16, 16);
        n.full_drops_seen = Some(150);
        n.refused = Some(Culprits {
            total: 150,
            port: Some(PortShare {
                proto: 17,
                port: 5353,
                role: Role::Inbound,
                count: 150,
            }),
            src: Some(SrcShare {
                ip: "198.18.0.2".parse().unwrap(),
                role: Role::Inbound,
                count: 150,
            }),
        });
        m.netns.push(n);
        let f = &diagnose(&m)[0];
        let nft = f
            .remedies
            .iter()
            .find(|r| r.contains("nft"))
            .expect("an nft remedy");
        assert_eq!(
            nft,
            "ip netns exec edge nft 'add table inet ctwatch_notrack; \
             add chain inet ctwatch_notrack pre { type filter hook prerouting priority -300; }; \
             add chain inet ctwatch_notrack out { type filter hook output priority -300; }; \
             add rule inet ctwatch_notrack pre udp dport 5353 notrack; \
             add rule inet ctwatch_notrack out udp sport 5353 notrack'"
        );
        let ipt = f.remedies.iter().find(|r| r.contains("iptables")).unwrap();
        assert!(
            ipt.contains("iptables -t raw -A PREROUTING -p udp --dport 5353 -j CT --notrack"),
            "{ipt}"
        );
        assert!(ipt.contains("-A OUTPUT -p udp --sport 5353"), "{ipt}");
        // Scoped: every notrack rule names the port; none is a blanket rule.
        for r in f.remedies.iter().filter(|r| r.contains("notrack")) {
            for rule in r
                .split(';')
                .filter(|c| c.contains("notrack") && c.contains("add rule"))
            {
                assert!(rule.contains("5353"), "unscoped rule {rule}");
            }
        }
        // A dominant port makes a source rule unnecessary.
        assert!(!f.remedies.iter().any(|r| r.contains("saddr")));
        assert!(
            f.caveats
                .iter()
                .any(|c| c.contains("NAT") && c.contains("ct state")),
            "{:?}",
            f.caveats
        );
    }

    #[test]
    fn locally_sent_flood_untracks_on_output_and_replies_on_prerouting() {
        let mut m = base();
        m.max = 16;
        let mut n = ns(16, 16);
        n.is_init = true;
        n.name = None;
        n.full_drops_seen = Some(40);
        n.refused = Some(Culprits {
            total: 40,
            port: Some(PortShare {
                proto: 17,
                port: 9999,
                role: Role::Local,
                count: 40,
            }),
            src: None,
        });
        m.netns.push(n);
        let f = &diagnose(&m)[0];
        let nft = f.remedies.iter().find(|r| r.contains("nft")).unwrap();
        assert!(
            nft.starts_with("nft '"),
            "init netns needs no prefix: {nft}"
        );
        assert!(nft.contains("add rule inet ctwatch_notrack out udp dport 9999 notrack"));
        assert!(nft.contains("add rule inet ctwatch_notrack pre udp sport 9999 notrack"));
    }

    #[test]
    fn no_dominant_port_falls_back_to_the_dominant_source() {
        let mut m = base();
        m.max = 100;
        let mut n = ns(100, 100);
        n.path = "/proc/4242/ns/net".into();
        n.name = None;
        n.held = Some(Held {
            total: 100,
            port: Some(PortShare {
                proto: 6,
                port: 80,
                role: Role::Inbound,
                count: 20,
            }),
            src: Some(SrcShare {
                ip: "2001:2::2".parse().unwrap(),
                role: Role::Unknown,
                count: 90,
            }),
            ..Default::default()
        });
        m.netns.push(n);
        let f = &diagnose(&m)[0];
        let nft = f.remedies.iter().find(|r| r.contains("nft")).unwrap();
        assert!(
            nft.starts_with("nsenter --net=/proc/4242/ns/net nft"),
            "{nft}"
        );
        assert!(nft.contains("pre ip6 saddr 2001:2::2 notrack"), "{nft}");
        assert!(nft.contains("out ip6 daddr 2001:2::2 notrack"), "{nft}");
        assert!(f
            .remedies
            .iter()
            .any(|r| r.contains("ip6tables -t raw -A PREROUTING -s 2001:2::2")));
        assert!(f.caveats.iter().any(|c| c.contains("guessed")));
    }

    #[test]
    fn small_samples_do_not_dominate() {
        let mut m = base();
        m.max = 16;
        let mut n = ns(16, 16);
        n.refused = Some(Culprits {
            total: 3,
            port: Some(PortShare {
                proto: 17,
                port: 53,
                role: Role::Inbound,
                count: 3,
            }),
            src: None,
        });
        m.netns.push(n);
        let f = &diagnose(&m)[0];
        assert!(
            !f.remedies.iter().any(|r| r.contains("notrack")),
            "{:?}",
            f.remedies
        );
    }

    #[test]
    fn time_wait_heavy_table_gets_a_timeout_remedy() {
        let mut m = base();
        let mut n = ns(40_000, 65_536);
        let mut h = held_tcp(40_000, 443);
        h.tcp_states = BTreeMap::from([
            ("TIME_WAIT".to_string(), 30_000),
            ("ESTABLISHED".to_string(), 10_000),
        ]);
        n.held = Some(h);
        n.timeouts = BTreeMap::from([("tcp_timeout_time_wait".to_string(), 120)]);
        m.netns.push(n);
        let f = diagnose(&m);
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!(f[0].severity, Severity::Warning);
        assert_eq!(f[0].rule, "timeouts");
        assert_eq!(
            f[0].remedies[0],
            "ip netns exec edge sysctl -w net.netfilter.nf_conntrack_tcp_timeout_time_wait=30"
        );
        assert!(f[0].evidence.contains("75%"), "{}", f[0].evidence);
        assert!(f[0].evidence.contains("120 s"), "{}", f[0].evidence);
    }

    #[test]
    fn unanswered_udp_gets_the_udp_timeout_and_init_gets_a_persistent_form() {
        let mut m = base();
        let mut n = ns(40_000, 65_536);
        n.is_init = true;
        n.name = None;
        n.held = Some(Held {
            total: 40_000,
            udp: 39_000,
            udp_unreplied: 38_000,
            ..Default::default()
        });
        m.netns.push(n);
        let f = diagnose(&m);
        let t = f
            .iter()
            .find(|x| x.rule == "timeouts")
            .expect("timeout finding");
        assert_eq!(
            t.remedies[0],
            "sysctl -w net.netfilter.nf_conntrack_udp_timeout=10"
        );
        assert!(t.remedies[1].contains("/etc/sysctl.d/"));
    }

    #[test]
    fn already_short_timeouts_are_left_alone() {
        let mut m = base();
        let mut n = ns(40_000, 65_536);
        let mut h = held_tcp(40_000, 443);
        h.tcp_states = BTreeMap::from([("TIME_WAIT".to_string(), 40_000)]);
        n.held = Some(h);
        n.timeouts = BTreeMap::from([("tcp_timeout_time_wait".to_string(), 10)]);
        m.netns.push(n);
        assert!(diagnose(&m).iter().all(|f| f.rule != "timeouts"));
    }

    #[test]
    fn healthy_host_gets_one_info_finding_with_numbers() {
        let mut m = base();
        let mut n = ns(1200, 262_144);
        n.held = Some(held_tcp(1200, 443));
        m.netns.push(n);
        m.max = 262_144;
        m.buckets = 262_144;
        let f = diagnose(&m);
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!(f[0].severity, Severity::Info);
        assert!(f[0].evidence.contains("1200/262144"), "{}", f[0].evidence);
        assert!(f[0].remedies.is_empty());
        let v = serde_json::to_value(&f[0]).unwrap();
        assert_eq!(v["severity"], "info");
        assert!(v["remedies"].as_array().unwrap().is_empty());
    }

    #[test]
    fn long_chains_suggest_a_hashsize_from_the_init_netns() {
        let mut m = base();
        m.max = 1_048_576;
        m.buckets = 16_384;
        m.nf_conntrack = Some(Presence::Module);
        m.netns.push(ns(1000, 1_048_576));
        let f = diagnose(&m);
        let b = f.iter().find(|x| x.rule == "hash-buckets").unwrap();
        assert_eq!(
            b.remedies[0],
            "echo 262144 > /sys/module/nf_conntrack/parameters/hashsize"
        );
        assert!(b.remedies[1].contains("options nf_conntrack hashsize=262144"));
        assert!(b.caveats[0].contains("initial network namespace only"));
    }

    #[test]
    fn raising_max_past_the_buckets_also_suggests_hashsize() {
        let mut m = base();
        m.max = 65_536;
        m.buckets = 16_384;
        m.netns.push(ns(65_536, 65_536));
        let f = diagnose(&m);
        assert_eq!(f[0].severity, Severity::Critical);
        let b = f.iter().find(|x| x.rule == "hash-buckets").unwrap();
        // Suggested max 131072 → 32768 buckets.
        assert_eq!(
            b.remedies[0],
            "echo 32768 > /sys/module/nf_conntrack/parameters/hashsize"
        );
        assert!(b.remedies[1].contains("nf_conntrack_buckets = 32768"));
    }

    #[test]
    fn findings_are_ranked_critical_first() {
        let mut m = base();
        m.max = 65_536;
        let mut a = ns(40_000, 65_536);
        let mut h = held_tcp(40_000, 443);
        h.tcp_states = BTreeMap::from([("TIME_WAIT".to_string(), 40_000)]);
        a.held = Some(h);
        a.timeouts = BTreeMap::from([("tcp_timeout_time_wait".to_string(), 120)]);
        let mut b = ns(65_536, 65_536);
        b.inum = 4026532999;
        m.netns = vec![a, b];
        let f = diagnose(&m);
        let sev: Vec<Severity> = f.iter().map(|x| x.severity).collect();
        let mut sorted = sev.clone();
        sorted.sort();
        assert_eq!(sev, sorted);
        assert_eq!(f[0].severity, Severity::Critical);
        assert_eq!(f[0].netns, Some(4026532999));
    }

    #[test]
    fn drops_without_a_full_table_are_flagged_for_investigation() {
        let mut m = base();
        let mut n = ns(100, 65_536);
        n.drops_window = Some(7);
        m.netns.push(n);
        let f = diagnose(&m);
        assert_eq!(f[0].rule, "conntrack-drops");
        assert!(f[0].remedies[0].contains("ctwatch drops --netns edge"));
    }

    #[test]
    fn absent_conntrack_is_one_info_finding() {
        let m = Measured {
            nf_conntrack: Some(Presence::Absent),
            ..Default::default()
        };
        let f = diagnose(&m);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].severity, Severity::Info);
    }

    #[test]
    fn slabinfo_objsize_of_nf_conntrack_only() {
        let text = "slabinfo - version: 2.1\n\
# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>\n\
nf_conntrack_expect      0      0    232   17    1 : tunables    0    0    0 : slabdata      0      0      0\n\
nf_conntrack         112    176    256   16    1 : tunables    0    0    0 : slabdata     11     11      0\n";
        assert_eq!(parse_slabinfo(text), Some(256));
        let old = "nf_conntrack_ffff8800b6e5c000    96    96    312   26    2 : tunables 0 0 0 : slabdata 4 4 0\n";
        assert_eq!(parse_slabinfo(old), Some(312));
        assert_eq!(parse_slabinfo("nf_conntrack_expect 0 0 232 17 1\n"), None);
        assert_eq!(parse_slabinfo("nf_conntrack 1 2\n"), None);
        assert_eq!(parse_slabinfo(""), None);
    }

    #[test]
    fn flow_tally_picks_the_leading_port_and_its_direction() {
        let mut t = FlowTally::default();
        let a: IpAddr = "198.18.0.2".parse().unwrap();
        t.add(17, 5353, a, Role::Inbound, 100);
        t.add(17, 5353, a, Role::Unknown, 5);
        t.add(6, 80, "198.18.0.3".parse().unwrap(), Role::Local, 20);
        // ICMP's type/code is no port.
        t.add(1, 0x0800, a, Role::Inbound, 3);
        let c = t.culprits();
        assert_eq!(c.total, 128);
        let p = c.port.unwrap();
        assert_eq!(
            (p.proto, p.port, p.role, p.count),
            (17, 5353, Role::Inbound, 105)
        );
        assert_eq!(c.src.unwrap().count, 108);
        assert!(t.ports.contains_key(&PortKey { proto: 1, port: 0 }));
    }
}
