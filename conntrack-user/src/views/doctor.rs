//! `ctwatch doctor` for people: findings, most urgent first, each with its
//! evidence and the commands to run.
use std::fmt::Write;

use crate::doctor::{Diagnosis, Severity};

pub(crate) fn report(r: &Diagnosis) -> String {
    let mut o = String::new();
    match &r.window {
        Some(w) => {
            let how = w
                .mode
                .as_deref()
                .map_or("kernel counters only".to_string(), |m| format!("{m} mode"));
            let _ = writeln!(o, "ctwatch doctor: watched {:.1} s ({how})", w.secs);
        }
        None => {
            let _ = writeln!(
                o,
                "ctwatch doctor: settings and counters only (no watch window)"
            );
        }
    }
    for f in &r.findings {
        let tag = match f.severity {
            Severity::Critical => "CRITICAL",
            Severity::Warning => "WARNING",
            Severity::Info => "INFO",
        };
        let _ = writeln!(o);
        let _ = writeln!(o, "{tag:<8}  {}", f.title);
        let _ = writeln!(o, "  evidence: {}", f.evidence);
        if !f.remedies.is_empty() {
            let _ = writeln!(o, "  fix:");
            for cmd in &f.remedies {
                let _ = writeln!(o, "    $ {cmd}");
            }
        }
        for c in &f.caveats {
            let _ = writeln!(o, "  caveat: {c}");
        }
    }
    if !r.notes.is_empty() {
        let _ = writeln!(o);
    }
    for n in &r.notes {
        let _ = writeln!(o, "note: {n}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::{Finding, ObjectSize, Window};

    #[test]
    fn findings_print_with_commands_to_paste() {
        let r = Diagnosis {
            findings: vec![Finding {
                severity: Severity::Critical,
                rule: "table-fill",
                title: "conntrack table full in netns 4026532246 (edge)".into(),
                netns: Some(4026532246),
                netns_name: Some("edge".into()),
                evidence: "16/16 entries (100%) now".into(),
                remedies: vec!["sysctl -w net.netfilter.nf_conntrack_max=32".into()],
                caveats: vec!["costs memory".into()],
            }],
            window: Some(Window {
                secs: 2.0,
                mode: Some("tracepoint".into()),
                sees_new_flows: false,
            }),
            object_size: ObjectSize::default(),
            netns: vec![],
            notes: vec!["netns 1 vanished".into()],
        };
        let text = report(&r);
        assert!(
            text.starts_with("ctwatch doctor: watched 2.0 s (tracepoint mode)\n"),
            "{text}"
        );
        assert!(
            text.contains("\nCRITICAL  conntrack table full in netns 4026532246 (edge)\n"),
            "{text}"
        );
        assert!(
            text.contains("\n    $ sysctl -w net.netfilter.nf_conntrack_max=32\n"),
            "{text}"
        );
        assert!(text.contains("\n  caveat: costs memory\n"), "{text}");
        assert!(text.ends_with("note: netns 1 vanished\n"), "{text}");
    }
}
