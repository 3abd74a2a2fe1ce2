//! Where a table-full drop's time goes: one more run of the traffic under
//! `perf record -g`, recording the sender only. The drop, the `kfree_skb`
//! hook and the programs on it run in the sender's context (its syscall for
//! a local drop, the softirq its veth transmit raises for an inbound one),
//! so its kernel stacks hold all of it and nothing of other work on the
//! host. Samples whose stack passes through `bpf_trace_run*` are the hook's;
//! each is charged to the function it was sampled in.
use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context, Result};

use super::netns::in_ns;
use crate::setup::cmd_output;

/// Samples of one recorded run.
pub struct Profile {
    pub samples: u64,
    pub in_hook: u64,
    /// Function → samples inside the hook that were taken in it.
    pub by_function: BTreeMap<String, u64>,
}

/// Whether `perf` can record here; `None` says why not.
pub fn unavailable() -> Option<String> {
    match cmd_output(std::process::Command::new("perf").arg("--version")) {
        Ok(_) => None,
        Err(e) => Some(format!("perf is not usable here ({e:#})")),
    }
}

/// Runs `command` in `ns` under `perf record -g` and reads the samples.
pub fn record(ns: &str, command: &str, scratch: &Path) -> Result<Profile> {
    let data = scratch.join("perf.data");
    in_ns(
        ns,
        &format!(
            "perf record -q -g -o {} -- {command} >/dev/null 2>&1",
            data.display()
        ),
    )?;
    let script = cmd_output(std::process::Command::new("perf").args([
        "script",
        "-i",
        &data.to_string_lossy(),
        "-F",
        "comm,ip,sym",
    ]))
    .context("perf script")?;
    let _ = std::fs::remove_file(&data);
    Ok(parse(&script))
}

/// Folds `perf script -F comm,ip,sym` output: samples are separated by
/// blank lines, each a header line then one frame per line, innermost first.
fn parse(script: &str) -> Profile {
    let mut p = Profile {
        samples: 0,
        in_hook: 0,
        by_function: BTreeMap::new(),
    };
    for sample in script.split("\n\n") {
        let frames: Vec<&str> = sample
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1))
            .collect();
        if frames.is_empty() {
            continue;
        }
        p.samples += 1;
        if frames.iter().any(|f| f.starts_with("bpf_trace_run")) {
            p.in_hook += 1;
            *p.by_function.entry(function(frames[0])).or_insert(0) += 1;
        }
    }
    p
}

/// A frame's function, with the JIT images of programs (`bpf_prog_<tag>_…`,
/// a tag per build) folded into one name.
fn function(frame: &str) -> String {
    let name = frame.split("+0x").next().unwrap_or(frame);
    match name.strip_prefix("bpf_prog_") {
        Some(rest)
            if rest.len() > 16
                && rest
                    .get(..16)
                    .is_some_and(|t| t.bytes().all(|b| b.is_ascii_hexdigit())) =>
        {
            "bpf_prog_* (a program's own instructions)".into()
        }
        _ => name.to_string(),
    }
}

/// The section: the hook's share for each profiled arm, and the functions
/// in ctwatch's run.
pub fn section(arms: &[(&str, &Profile)], top: usize) -> String {
    let mut doc = String::new();
    let _ = writeln!(
        doc,
        "Profile: one more run per arm under `perf record -g`, the sender only (see \
         `xtask/src/bench/profile.rs`); a sample is the hook's when its stack passes through \
         `bpf_trace_run*`.\n\n| arm | sender's samples | in the `kfree_skb` hook |\n|---|---:|---:|"
    );
    for (label, p) in arms {
        let _ = writeln!(
            doc,
            "| {label} | {} | {} ({:.1} %) |",
            p.samples,
            p.in_hook,
            pct(p.in_hook, p.samples)
        );
    }
    if let Some((label, p)) = arms.last() {
        let mut rows: Vec<(&String, &u64)> = p.by_function.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let _ = writeln!(
            doc,
            "\nWhere the hook's samples were taken, {label}:\n\n\
             | function | samples | share of the hook | share of the sender |\n|---|---:|---:|---:|"
        );
        for (f, n) in rows.into_iter().take(top) {
            let _ = writeln!(
                doc,
                "| `{f}` | {n} | {:.1} % | {:.1} % |",
                pct(*n, p.in_hook),
                pct(*n, p.samples)
            );
        }
    }
    let _ = writeln!(doc);
    doc
}

fn pct(n: u64, of: u64) -> f64 {
    100.0 * n as f64 / of.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_in_the_hook_are_charged_to_their_innermost_function() {
        let script = "ctpeer\n\
            \tffffffff8151cb3a htab_map_hash+0xea\n\
            \tffffffffc0001234 bpf_prog_806ca240e34b1d37_F+0x1f\n\
            \tffffffff81aaaaaa bpf_trace_run4+0x9\n\
            \tffffffff81bbbbbb sk_skb_reason_drop+0x3\n\
            \n\
            ctpeer\n\
            \tffffffffc0005678 bpf_prog_0123456789abcdef_ctw_kfree_skb+0x2\n\
            \tffffffff81aaaaaa bpf_trace_run4+0x9\n\
            \n\
            ctpeer\n\
            \tffffffff81cccccc udp_sendmsg+0x10\n\
            \n";
        let p = parse(script);
        assert_eq!((p.samples, p.in_hook), (3, 2));
        assert_eq!(p.by_function["htab_map_hash"], 1);
        assert_eq!(
            p.by_function["bpf_prog_* (a program's own instructions)"],
            1
        );
        assert!(!p.by_function.contains_key("udp_sendmsg"));
    }

    #[test]
    fn kernel_functions_named_bpf_prog_are_not_folded() {
        assert_eq!(
            function("bpf_prog_run_pin_on_cpu+0x5"),
            "bpf_prog_run_pin_on_cpu"
        );
    }
}
