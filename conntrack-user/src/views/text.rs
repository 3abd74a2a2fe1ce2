//! Text for people: one line per dropped flow, and the report.
use std::fmt::Write;

use crate::{
    aggregate::breakdown::{Breakdown, Item},
    names::resolver::Process,
    source::records::{FlowRecord, Role},
    views::json::{Report, SummaryLine},
    views::label::Label,
};

fn endpoint(ip: &std::net::IpAddr, port: u16) -> String {
    match ip {
        std::net::IpAddr::V6(_) => format!("[{ip}]:{port}"),
        std::net::IpAddr::V4(_) => format!("{ip}:{port}"),
    }
}

fn clock(ts: std::time::SystemTime) -> String {
    let d = ts.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let s = d.as_secs() % 86400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        (s / 60) % 60,
        s % 60,
        d.subsec_millis()
    )
}

pub fn drop_line(
    r: &FlowRecord,
    netns_name: Option<&str>,
    interface: Option<&str>,
    owner: &Process,
) -> String {
    let t = &r.tuple;
    let ns = match netns_name {
        Some(n) => format!("{} ({n})", r.netns),
        None => r.netns.to_string(),
    };
    let dev = |idx: u32| interface.map_or_else(|| format!("if{idx}"), str::to_string);
    let dir = match r.role {
        Role::Inbound if r.ifindex_in != 0 => format!(" in {}", dev(r.ifindex_in)),
        Role::Local if r.ifindex_out != 0 => format!(" out {}", dev(r.ifindex_out)),
        _ => String::new(),
    };
    let what = match r.kind {
        crate::source::records::Kind::Drop => "table-full drop",
        crate::source::records::Kind::Evict => "evicted",
        crate::source::records::Kind::Clash => "insert clash",
        crate::source::records::Kind::New => "new entry",
        crate::source::records::Kind::SeedFree => "freed",
    };
    format!(
        "{} {what} {} {} -> {} netns {ns}{dir} {}",
        clock(std::time::SystemTime::now()),
        t.proto,
        endpoint(&t.src, t.sport),
        endpoint(&t.dst, t.dport),
        Label::from(owner).line()
    )
}

/// Both ends and the pod, where this host knows more than the namespace
/// that counted: forwarded flows, or processes in containers.
fn ends(o: &mut String, b: &Breakdown) {
    let known = |l: &[Item]| l.iter().any(|i| i.pid.is_some() || i.container.is_some());
    if !(known(&b.by_origin) || known(&b.by_service) || known(&b.by_pod)) {
        return;
    }
    let _ = writeln!(o, "  by origin:       {}", items(&b.by_origin));
    let _ = writeln!(o, "  by service:      {}", items(&b.by_service));
    let _ = writeln!(o, "  by pod:          {}", items(&b.by_pod));
}

fn items(list: &[Item]) -> String {
    list.iter()
        .map(|i| {
            let mut k = Label::from(i).row();
            if let Some(c) = &i.container {
                k.push_str(&format!(" · {c}"));
            }
            if let Some(v) = &i.via {
                k.push_str(&format!(" via {v}"));
            }
            if let Some(t) = &i.to {
                k.push_str(&format!(" → {t}"));
            }
            format!("{k} {}", i.count)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn summary_line(s: &SummaryLine) -> String {
    format!(
        "{} {} table-full drops in {:.1}s ({} shown, {} not streamed, {} events lost); top ports: {}; sources: {}; processes: {}",
        clock(std::time::SystemTime::now()),
        s.drops,
        s.interval_s,
        s.shown,
        s.not_streamed,
        s.lost_events,
        items(&s.by_dst_port),
        items(&s.by_src_ip),
        items(&s.by_process)
    )
}

pub fn report(r: &Report) -> String {
    let mut o = String::new();
    let c = &r.counters;
    let missed = c.confirm_returns_missed + c.early_drop_returns_missed + c.clash_returns_missed;
    // Shown only when there were some: the reconciliation says per probe
    // what they may have taken out of the counts.
    let mut missed = if missed > 0 {
        format!(", {missed} probe returns missed")
    } else {
        String::new()
    };
    match c.program_runs_skipped {
        Some(0) => {}
        Some(n) => missed += &format!(", {n} program runs skipped"),
        // Not a disagreement with the kernel, so not in the reconciliation:
        // a limit of this kernel, said where the other losses are.
        None => missed += ", skipped kprobe runs not counted by this kernel (before 6.7)",
    }
    let _ = writeln!(
        o,
        "ctwatch report: {} mode, kernel {}, {:.1} s, {} lost events{missed}",
        r.mode, r.kernel, r.duration_s, r.lost_events
    );
    let _ = writeln!(
        o,
        "{:<12} {:<12} {:>15} {:>14} {:>12}",
        "netns", "name", "count/max", "drops(kernel)", "drops(seen)"
    );
    for n in &r.netns {
        let opt = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
        let _ = writeln!(
            o,
            "{:<12} {:<12} {:>15} {:>14} {:>12}",
            n.inum,
            n.name.as_deref().unwrap_or("-"),
            format!("{}/{}", opt(n.count), opt(n.max)),
            opt(n.drops_kernel),
            n.drops_seen
        );
    }
    let d = &r.drops;
    let _ = writeln!(o, "table-full drops: {}", d.total);
    if d.total > 0 {
        let _ = writeln!(o, "  by source IP:    {}", items(&d.by_src_ip));
        let _ = writeln!(o, "  by dest port:    {}", items(&d.by_dst_port));
        let _ = writeln!(o, "  by process:      {}", items(&d.by_process));
        let _ = writeln!(o, "  by netns:        {}", items(&d.by_netns));
        ends(&mut o, d);
    }
    let o_ = &r.occupancy;
    let _ = writeln!(o, "entries held: {} ({})", o_.total, r.occupancy_source);
    if o_.total > 0 {
        let _ = writeln!(o, "  by source IP:    {}", items(&o_.by_src_ip));
        let _ = writeln!(o, "  by dest port:    {}", items(&o_.by_dst_port));
        let _ = writeln!(o, "  by process:      {}", items(&o_.by_process));
        let _ = writeln!(o, "  by netns:        {}", items(&o_.by_netns));
        ends(&mut o, o_);
    }
    if let Some(n) = &r.new_flows {
        let _ = writeln!(o, "entries created: {}", n.total);
        if n.total > 0 {
            let _ = writeln!(o, "  by source IP:    {}", items(&n.by_src_ip));
            let _ = writeln!(o, "  by dest port:    {}", items(&n.by_dst_port));
            let _ = writeln!(o, "  by process:      {}", items(&n.by_process));
        }
    }
    if let (Some(e), Some(c)) = (r.evictions, r.clashes) {
        let _ = writeln!(o, "evictions: {e}, insert clashes: {c}");
    }
    for note in &r.reconciliation {
        let _ = writeln!(o, "note: {note}");
    }
    o
}
