//! `ctwatch snapshot` for people: the settings, then one compact table per
//! namespace.
use std::fmt::Write;

use crate::{
    aggregate::breakdown::Item,
    aggregate::summary::{Presence, Snapshot},
};

/// Timeouts worth a glance during an incident; JSON carries all of them.
const SHOWN_TIMEOUTS: [(&str, &str); 10] = [
    ("tcp_timeout_established", "tcp established"),
    ("tcp_timeout_syn_sent", "syn_sent"),
    ("tcp_timeout_syn_recv", "syn_recv"),
    ("tcp_timeout_fin_wait", "fin_wait"),
    ("tcp_timeout_close_wait", "close_wait"),
    ("tcp_timeout_time_wait", "time_wait"),
    ("udp_timeout", "udp"),
    ("udp_timeout_stream", "udp stream"),
    ("icmp_timeout", "icmp"),
    ("generic_timeout", "generic"),
];

fn map_line(m: &std::collections::BTreeMap<String, u64>) -> String {
    let mut v: Vec<(&String, &u64)> = m.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn percent(n: u64, of: u64) -> String {
    if of == 0 {
        return "?".into();
    }
    format!("{:.0}%", n as f64 * 100.0 / of as f64)
}

pub fn snapshot(s: &Snapshot) -> String {
    let mut o = String::new();
    let st = &s.settings;
    let how = match st.nf_conntrack {
        Presence::Module => "module",
        Presence::BuiltIn => "built in",
        Presence::Absent => "absent",
    };
    let _ = writeln!(
        o,
        "nf_conntrack ({how}): max {}, buckets {} ({:.1} entries per bucket at max)",
        st.max,
        st.buckets,
        st.max as f64 / st.buckets.max(1) as f64
    );
    let shown: Vec<String> = SHOWN_TIMEOUTS
        .iter()
        .filter_map(|(k, label)| st.timeouts.get(*k).map(|v| format!("{label} {v}")))
        .collect();
    if !shown.is_empty() {
        let _ = writeln!(o, "timeouts (s): {}", shown.join(", "));
    }
    if s.netns.is_empty() {
        let _ = writeln!(o, "no namespace holds conntrack entries");
    }
    for n in &s.netns {
        let name = n
            .name
            .as_deref()
            .map(|x| format!(" ({x})"))
            .unwrap_or_default();
        let fill = match n.max {
            Some(m) => format!(" of max {m} ({})", percent(n.count, m)),
            None => String::new(),
        };
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "netns {}{name}: {} entries{fill}, {} assured, {} unreplied",
            n.inum, n.count, n.assured, n.unreplied
        );
        if n.count == 0 {
            continue;
        }
        let _ = writeln!(
            o,
            "  l3: {}   l4: {}",
            map_line(&n.by_l3),
            map_line(&n.by_l4)
        );
        if !n.tcp_states.is_empty() {
            let _ = writeln!(o, "  tcp states: {}", map_line(&n.tcp_states));
        }
        columns(
            &mut o,
            [
                ("top sources", &n.top_src_ip),
                ("top dest ports", &n.top_dst_port),
                ("top source + port", &n.top_src_dst_port),
            ],
        );
    }
    for note in &s.notes {
        let _ = writeln!(o, "note: {note}");
    }
    o
}

/// Lists side by side, each as "key  count" padded to its widest row.
fn columns(o: &mut String, cols: [(&str, &Vec<Item>); 3]) {
    let cells: Vec<Vec<String>> = cols
        .iter()
        .map(|(title, items)| {
            let kw = items.iter().map(|i| i.key.len()).max().unwrap_or(0);
            let cw = items
                .iter()
                .map(|i| i.count.to_string().len())
                .max()
                .unwrap_or(0);
            let mut c = vec![title.to_string()];
            c.extend(
                items
                    .iter()
                    .map(|i| format!("{:<kw$} {:>cw$}", i.key, i.count)),
            );
            c
        })
        .collect();
    let widths: Vec<usize> = cells
        .iter()
        .map(|c| c.iter().map(String::len).max().unwrap_or(0))
        .collect();
    let rows = cells.iter().map(Vec::len).max().unwrap_or(0);
    for r in 0..rows {
        let mut line = String::from(" ");
        for (c, w) in cells.iter().zip(&widths) {
            let _ = write!(
                line,
                " {:<w$}  ",
                c.get(r).map(String::as_str).unwrap_or("")
            );
        }
        let _ = writeln!(o, "{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        aggregate::summary::{tests::entry, NetnsTable, Summary, TableSettings},
        source::netns::NetnsInfo,
    };

    #[test]
    fn one_compact_table_per_namespace() {
        let entries: Vec<_> = (0..64)
            .map(|_| entry(6, "198.18.0.2", 7400, Some("ESTABLISHED"), 0b110))
            .chain((0..3).map(|_| entry(17, "198.18.0.9", 5353, None, 0)))
            .collect();
        let info = NetnsInfo {
            inum: 4026532246,
            name: Some("edge".into()),
            path: "/run/netns/edge".into(),
        };
        let sysctl = crate::source::counters::Sysctl {
            count: 67,
            max: 64,
            buckets: 1024,
        };
        let snap = Snapshot {
            settings: TableSettings {
                nf_conntrack: Presence::Module,
                max: 64,
                buckets: 1024,
                count: 0,
                timeouts: [("tcp_timeout_established".to_string(), 432000)].into(),
            },
            netns: vec![NetnsTable::new(
                &info,
                Some(&sysctl),
                &Summary::of(&entries),
                1,
            )],
            notes: vec![],
        };
        let text = snapshot(&snap);
        assert!(
            text.starts_with("nf_conntrack (module): max 64, buckets 1024"),
            "{text}"
        );
        assert!(
            text.contains("timeouts (s): tcp established 432000\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "netns 4026532246 (edge): 67 entries of max 64 (105%), 64 assured, 3 unreplied"
            ),
            "{text}"
        );
        assert!(
            text.contains("  l3: ipv4 67   l4: tcp 64, udp 3\n"),
            "{text}"
        );
        let header = text.lines().find(|l| l.contains("top sources")).unwrap();
        assert!(header.contains("top dest ports") && header.contains("top source + port"));
        assert!(text.contains("198.18.0.2 64"), "{text}");
        assert!(text.contains("tcp/7400 64"), "{text}");
        assert!(text.contains("other       3"), "{text}");
    }
}
