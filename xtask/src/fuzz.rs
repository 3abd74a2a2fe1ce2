//! `cargo xtask fuzz`: the cargo-fuzz targets in `conntrack-user/fuzz`, one
//! per decoder of untrusted input (`ctwatch::decode`), each run for a time
//! budget from the committed seeds plus the corpus earlier runs grew.
//! libFuzzer's sanitizer flags need nightly, so the fuzz crate is a
//! workspace of its own that a stable `cargo build` never sees.
use std::{
    fs::{self, File},
    path::PathBuf,
    process::Stdio,
};

use anyhow::{bail, Context, Result};

use crate::{root, setup};

pub const TARGETS: &[&str] = &[
    "ring_record",
    "proc_stat",
    "socket_table",
    "ctnetlink_datagram",
    "ctnetlink_stats",
    "cgroup_path",
    "btf",
];

/// Per target in `cargo xtask test`: enough to prove each target builds,
/// loads its seeds and survives a few thousand mutations.
pub const SMOKE_SECONDS: u64 = 5;

/// One input that runs longer than this is reported as a hang: every
/// decoder handles a seed in microseconds.
const INPUT_TIMEOUT_SECONDS: u64 = 10;

fn fuzz_dir() -> PathBuf {
    root().join("conntrack-user/fuzz")
}

/// Runs `targets` (all when empty) for `seconds` each. A crash, a hang, or a
/// target that does not run is an error naming the input that caused it.
pub fn run(targets: &[String], seconds: u64, sanitizer: &str) -> Result<()> {
    for t in targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!(
                "unknown fuzz target {t:?}: expected one of {}",
                TARGETS.join(", ")
            );
        }
    }
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    setup::ensure_fuzz_tools()?;
    // Per sanitizer, so switching between `test` and `fuzz` rebuilds nothing.
    let target_dir = root().join("target/fuzz").join(sanitizer);
    let cargo_fuzz = |sub: &str| {
        let mut c = setup::nightly("cargo");
        c.current_dir(root())
            .args(["fuzz", sub, "--fuzz-dir"])
            .arg(fuzz_dir())
            .arg("--target-dir")
            .arg(&target_dir)
            .args(["--sanitizer", sanitizer]);
        c
    };
    eprintln!("xtask: building the fuzz targets (nightly, sanitizer {sanitizer})");
    setup::run(&mut cargo_fuzz("build")).context("building the fuzz targets")?;
    for target in targets {
        let corpus = fuzz_dir().join("corpus").join(target);
        fs::create_dir_all(&corpus)?;
        let log_path = target_dir.join(format!("{target}.log"));
        let log = File::create(&log_path)?;
        // libFuzzer adds what it finds to the first corpus directory only,
        // so the committed seeds stay as they are.
        let status = cargo_fuzz("run")
            .arg(target)
            .arg(&corpus)
            .arg(fuzz_dir().join("seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
            .stdout(log.try_clone()?)
            .stderr(Stdio::from(log))
            .status()
            .with_context(|| format!("running fuzz target {target}"))?;
        let output = fs::read_to_string(&log_path)?;
        let done = output.lines().rev().find(|l| l.starts_with("Done "));
        match (status.success(), done) {
            (true, Some(done)) => eprintln!("xtask: fuzz {target}: {done}, no crash"),
            _ => {
                let tail: Vec<&str> = output.lines().rev().take(40).collect();
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
                bail!(
                    "fuzz target {target} failed ({status}); whole output in {}; a crashing \
                     input is kept under conntrack-user/fuzz/artifacts/{target}/: make it a \
                     unit test next to the parser",
                    log_path.display()
                );
            }
        }
    }
    Ok(())
}

/// The fuzz part of `cargo xtask test`: every target for a few seconds,
/// without a sanitizer (safe Rust needs none to panic). Returns how many
/// targets ran. Outside CI, a machine that cannot fuzz skips with a reason;
/// in CI that is a failure.
pub fn smoke(ci: bool) -> Result<u64> {
    if let Err(e) = setup::ensure_fuzz_tools() {
        if ci {
            return Err(e.context("the fuzz smoke must run in CI"));
        }
        eprintln!("xtask: fuzz smoke skipped: {e:#}");
        return Ok(0);
    }
    run(&[], SMOKE_SECONDS, "none")?;
    Ok(TARGETS.len() as u64)
}
