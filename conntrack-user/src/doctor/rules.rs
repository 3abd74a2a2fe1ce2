//! The rules: a pure function from measurements to ranked findings, so
//! every rule is tested without privileges.
use super::*;
use crate::{aggregate::breakdown::endpoint, source::records};

/// Judges the measurements: critical findings first, then warnings, then
/// information. With nothing wrong, exactly one info finding says so.
pub(crate) fn diagnose(m: &Measured) -> Vec<Finding> {
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

pub(super) fn percent_of(n: u64, of: u64) -> u64 {
    n.saturating_mul(100).checked_div(of).unwrap_or(0)
}

pub(super) fn pct(n: u64, of: u64) -> String {
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

pub(super) fn next_pow2(n: u64) -> u64 {
    n.max(1)
        .checked_next_power_of_two()
        .unwrap_or(MAX_SUGGESTED)
        .min(MAX_SUGGESTED)
}

/// Next power of two at or above twice the peak.
pub(crate) fn suggested_max(peak: u64) -> u64 {
    next_pow2(peak.saturating_mul(2))
}

/// Buckets for a max: a quarter of it, as a power of two.
pub(crate) fn suggested_buckets(max: u64) -> u64 {
    next_pow2(max.div_ceil(MAX_CHAIN))
}

/// Table-full drops the kernel agrees with. In tracepoint mode "seen"
/// also holds raw-table and other pre-conntrack drops, which the kernel's
/// conntrack `drop` counter does not count; only both together mean a
/// full table.
pub(super) fn confirmed_full_drops(n: &NetnsMeasure) -> u64 {
    match (n.full_drops_seen, n.drops_window) {
        (Some(seen), Some(kernel)) => seen.min(kernel),
        (Some(seen), None) => seen,
        (None, _) => 0,
    }
}

pub(super) fn fill_severity(n: &NetnsMeasure) -> Option<Severity> {
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
pub(super) fn effective_peak(n: &NetnsMeasure, sev: Severity) -> u64 {
    if sev == Severity::Critical {
        n.peak.max(n.max)
    } else {
        n.peak
    }
}

pub(super) fn under_pressure(n: &NetnsMeasure) -> bool {
    n.max > 0
        && (percent_of(n.peak, n.max) >= PRESSURE_PERCENT
            || confirmed_full_drops(n) > 0
            || n.drops_window.unwrap_or(0) > 0)
}

pub(super) fn ns_label(n: &NetnsMeasure) -> String {
    match &n.name {
        Some(name) => format!("netns {} ({name})", n.inum),
        None if n.is_init => format!("netns {} (initial)", n.inum),
        None => format!("netns {}", n.inum),
    }
}

/// What to put before a command that must run inside the namespace.
pub(super) fn enter_prefix(n: &NetnsMeasure) -> String {
    if n.is_init {
        String::new()
    } else if let Some(name) = &n.name {
        format!("ip netns exec {name} ")
    } else {
        format!("nsenter --net={} ", n.path.display())
    }
}

pub(super) fn bytes(n: u64) -> String {
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

pub(super) fn port_name(p: &PortShare) -> String {
    PortKey {
        proto: p.proto,
        port: p.port,
    }
    .to_string()
}

pub(super) fn role_word(r: Role) -> &'static str {
    match r {
        Role::Inbound => "inbound",
        Role::Local => "sent from this namespace",
        Role::Unknown => "direction unknown",
    }
}

/// ", peak P during the S s watch", or nothing without a window (the
/// peak is then just the count).
pub(super) fn peak_words(m: &Measured, peak: u64) -> String {
    match &m.window {
        Some(w) => format!(", peak {peak} during the {:.1} s watch", w.secs),
        None => String::new(),
    }
}

pub(super) fn window_words(m: &Measured) -> String {
    match &m.window {
        Some(w) => format!("during the {:.1} s watch", w.secs),
        None => "(no watch window)".into(),
    }
}

pub(super) fn fill_finding(m: &Measured, n: &NetnsMeasure, sev: Severity, target: u64) -> Finding {
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
                ..Default::default()
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

pub(super) fn describe_culprits(ev: &mut Vec<String>, what: &str, c: Option<&Culprits>) {
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
    if let Some(v) = c
        .service
        .as_ref()
        .filter(|v| v.forwarded || v.backend.is_some())
    {
        let to = v
            .backend
            .map(|(a, p)| format!(", translated to {}", endpoint(a, p)))
            .unwrap_or_default();
        parts.push(format!(
            "{} to {}/{}{to}{}",
            pct(v.count, c.total),
            records::proto_name(v.proto),
            endpoint(v.addr, v.port),
            if v.forwarded {
                " (forwarded through this namespace)"
            } else {
                ""
            }
        ));
    }
    if let Some(p) = &c.pod {
        parts.push(format!("{} from or to {}", pct(p.count, c.total), p.name));
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

pub(super) fn dominates(count: u64, total: u64) -> bool {
    total >= MIN_SAMPLE && count.saturating_mul(100) >= DOMINANT_PERCENT * total
}

/// A short-lived state (or unanswered UDP) holding most of a pressed table.
pub(super) fn timeout_findings(m: &Measured, n: &NetnsMeasure) -> Vec<Finding> {
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
pub(crate) fn tcp_timeout_for(state: &str) -> Option<(&'static str, u64)> {
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

pub(super) fn timeout_finding(
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
pub(super) fn unexplained_drops(m: &Measured, n: &NetnsMeasure) -> Option<Finding> {
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
pub(super) fn bucket_finding(m: &Measured, target: Option<u64>) -> Option<Finding> {
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

pub(super) fn healthy(m: &Measured) -> Finding {
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
