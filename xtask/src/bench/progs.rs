//! Arm A1 (the object's empty programs on ctwatch's hooks, loaded with aya
//! here) and the kernel's per-program run statistics (`bpftool prog show
//! --json` while `kernel.bpf_stats_enabled` is 1).
use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{bail, Context, Result};
use aya::{programs::RawTracePoint, Ebpf, EbpfLoader};

use super::guard;
use crate::setup::cmd_output;

/// The empty program, attached while this lives.
pub struct EmptyProgs {
    _ebpf: Ebpf,
}

const EMPTY_RAW_TP: &str = "ctw_empty_kfree_skb";

/// Loads the object (its CONFIG global left as built: an empty program
/// reads nothing) and attaches `ctw_empty_kfree_skb` to each raw tracepoint
/// tracepoint mode uses. (The object's `ctw_empty_kp` would stand in for
/// kprobe mode, which this host cannot run.)
pub fn attach_empty(obj: &Path, raw_tracepoints: &[&str]) -> Result<EmptyProgs> {
    let mut ebpf = EbpfLoader::new()
        .load_file(obj)
        .with_context(|| format!("loading {}", obj.display()))?;
    let p: &mut RawTracePoint = ebpf
        .program_mut(EMPTY_RAW_TP)
        .with_context(|| format!("{} has no {EMPTY_RAW_TP}", obj.display()))?
        .try_into()?;
    p.load().context(EMPTY_RAW_TP)?;
    for tp in raw_tracepoints {
        if *tp != "kfree_skb" {
            bail!("no empty program for raw tracepoint {tp}");
        }
        p.attach(tp)
            .with_context(|| format!("{EMPTY_RAW_TP} on {tp}"))?;
    }
    Ok(EmptyProgs { _ebpf: ebpf })
}

/// One loaded program's counters.
#[derive(Debug, Clone)]
pub struct ProgStat {
    pub name: String,
    pub kind: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

/// Every loaded program whose name starts with `ctw_`, by id.
pub fn ctw_programs() -> Result<BTreeMap<u64, ProgStat>> {
    parse_programs(&cmd_output(
        Command::new("bpftool").args(["prog", "show", "--json"]),
    )?)
}

/// The `ctw_` programs in `bpftool prog show --json` output.
pub fn parse_programs(json: &str) -> Result<BTreeMap<u64, ProgStat>> {
    let v: serde_json::Value = serde_json::from_str(json).context("bpftool prog show --json")?;
    let mut progs = BTreeMap::new();
    for p in v.as_array().context("bpftool: not a list")? {
        let name = p["name"].as_str().unwrap_or_default();
        if !name.starts_with("ctw_") {
            continue;
        }
        let Some(id) = p["id"].as_u64() else { continue };
        progs.insert(
            id,
            ProgStat {
                name: name.to_string(),
                kind: p["type"].as_str().unwrap_or_default().to_string(),
                // bpftool leaves both out while they are 0.
                run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
                run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
            },
        );
    }
    Ok(progs)
}

/// Per program: runs and nanoseconds between two snapshots, for the ids in
/// `after` that were not loaded at `baseline` (this arm's own programs).
pub fn delta(
    baseline: &BTreeMap<u64, ProgStat>,
    before: &BTreeMap<u64, ProgStat>,
    after: &BTreeMap<u64, ProgStat>,
) -> Vec<ProgStat> {
    after
        .iter()
        .filter(|(id, _)| !baseline.contains_key(id))
        .map(|(id, a)| {
            let (c0, t0) = before
                .get(id)
                .map_or((0, 0), |b| (b.run_cnt, b.run_time_ns));
            ProgStat {
                name: a.name.clone(),
                kind: a.kind.clone(),
                run_cnt: a.run_cnt.saturating_sub(c0),
                run_time_ns: a.run_time_ns.saturating_sub(t0),
            }
        })
        .collect()
}

pub const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled` = 1 until `stats_off` (and on every exit
/// path, through the guard).
pub fn stats_on() -> Result<()> {
    guard::set_sysctl(STATS, "1")
}

pub fn stats_off() -> Result<()> {
    guard::reset_sysctl(STATS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bpftool 7.1 output: run_time_ns and run_cnt only once they are not 0.
    const JSON: &str = r#"[{"id":7,"type":"kprobe","name":"other","tag":"aa","gpl_compatible":true},
        {"id":260,"type":"raw_tracepoint","name":"ctw_kfree_skb","tag":"bb","gpl_compatible":true,
         "run_time_ns":900,"run_cnt":3,"loaded_at":1,"uid":0,"orphaned":false,"bytes_xlated":8,
         "jited":true,"bytes_jited":8,"bytes_memlock":4096,"map_ids":[1,2],"btf_id":5},
        {"id":261,"type":"raw_tracepoint","name":"ctw_empty_kfree","tag":"cc","gpl_compatible":true}]"#;

    #[test]
    fn parses_ctw_programs_with_and_without_stats() {
        let p = parse_programs(JSON).unwrap();
        assert_eq!(p.keys().copied().collect::<Vec<_>>(), vec![260, 261]);
        assert_eq!((p[&260].run_cnt, p[&260].run_time_ns), (3, 900));
        assert_eq!((p[&261].run_cnt, p[&261].run_time_ns), (0, 0));
        assert_eq!(p[&260].kind, "raw_tracepoint");
    }

    #[test]
    fn delta_keeps_only_the_arms_own_programs() {
        let before = parse_programs(JSON).unwrap();
        let mut after = before.clone();
        after.get_mut(&260).unwrap().run_cnt = 10;
        after.get_mut(&260).unwrap().run_time_ns = 3000;
        let mut baseline = BTreeMap::new();
        baseline.insert(261, before[&261].clone());
        let d = delta(&baseline, &before, &after);
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].run_cnt, d[0].run_time_ns), (7, 2100));
    }
}
