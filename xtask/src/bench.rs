//! `cargo xtask bench`: side-by-side ratios measured in one run, written to
//! docs/benchmarks.md. No timed assertions anywhere: these are figures for
//! people, taken on whatever machine runs them.
use std::{
    fmt::Write as _,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::setup::{cmd_output, run};

const NS_S: &str = "ctwbench-s";
const NS_C: &str = "ctwbench-c";
const MAX_PATH: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args).stdout(Stdio::null()))
}

fn in_ns(ns: &str, cmd: &str) -> Result<String> {
    cmd_output(Command::new("ip").args(["netns", "exec", ns, "sh", "-c", cmd]))
}

/// Namespaces, veth and the global max; all undone on drop.
struct Bench {
    old_max: String,
    children: Vec<Child>,
}

impl Bench {
    fn new() -> Result<Self> {
        let old_max = std::fs::read_to_string(MAX_PATH)?.trim().to_string();
        let b = Bench {
            old_max,
            children: vec![],
        };
        for ns in [NS_S, NS_C] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns])?;
            in_ns(
                ns,
                "ip link set lo up; echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6",
            )?;
        }
        ip(&[
            "link", "add", "ctwb0", "netns", NS_S, "type", "veth", "peer", "name", "ctwb1",
            "netns", NS_C,
        ])?;
        in_ns(
            NS_S,
            "ip addr add 198.18.0.1/24 dev ctwb0 && ip link set ctwb0 up",
        )?;
        in_ns(
            NS_C,
            "ip addr add 198.18.0.2/24 dev ctwb1 && ip link set ctwb1 up",
        )?;
        in_ns(
            NS_S,
            "nft add table inet ctw && nft 'add chain inet ctw pre { type filter hook prerouting priority 0; }' \
             && nft add rule inet ctw pre ct state new counter",
        )?;
        Ok(b)
    }

    fn spawn_ready(&mut self, ns: &str, bin: &Path, args: &[&str]) -> Result<()> {
        let mut c = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()?;
        let out = c.stdout.take().unwrap();
        // Owned (and killed on drop) before anything can fail.
        self.children.push(c);
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        if !line.starts_with("ready") {
            bail!("ctpeer {args:?} said {line:?}");
        }
        Ok(())
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::write(MAX_PATH, &self.old_max);
        for ns in [NS_S, NS_C] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Starts ctwatch and waits for its banner; killed (SIGINT) by the caller.
fn start_ctwatch(bin: &Path, args: &[&str]) -> Result<Child> {
    let mut c = Command::new(bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut err = BufReader::new(c.stderr.take().unwrap());
    let mut line = String::new();
    while err.read_line(&mut line)? > 0 {
        if line.contains(" mode on kernel ") {
            // Keep draining stderr so ctwatch never blocks on a full pipe.
            std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
            return Ok(c);
        }
        line.clear();
    }
    bail!("ctwatch exited before attaching")
}

fn stop(mut c: Child) {
    // SIGINT: ctwatch's clean exit path, as a person would stop it.
    unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
    let _ = c.wait();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn flood_rate(ctpeer: &Path, millis: u64) -> Result<f64> {
    let out = in_ns(
        NS_S,
        &format!("{} udp-flood 198.18.0.2:9999 {millis}", ctpeer.display()),
    )?;
    let n: f64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("ctpeer udp-flood output")?;
    Ok(n / (millis as f64 / 1000.0))
}

fn time_it(mut cmd: Command) -> Result<f64> {
    let t = Instant::now();
    let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(t.elapsed().as_secs_f64())
}

pub fn bench(ctwatch: &Path, ctpeer: &Path, root: &Path) -> Result<()> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut doc = String::new();
    let _ = writeln!(doc, "# Benchmarks\n");
    let _ = writeln!(
        doc,
        "Made by `cargo xtask bench` (release build) on kernel {kernel}, {cpus} CPUs. Every figure \
         is a ratio of runs taken side by side, alternating, in that one invocation; the \
         absolute rates only say what this machine did that day.\n"
    );

    // 1. Hook overhead on the table-full path (tracepoint mode, the only
    //    one this host allows).
    let mut b = Bench::new()?;
    std::fs::write(MAX_PATH, "64")?;
    b.spawn_ready(NS_S, ctpeer, &["tcp-listen", "0.0.0.0:7400"])?;
    b.spawn_ready(NS_C, ctpeer, &["tcp-hold", "198.18.0.1:7400", "64"])?;
    std::thread::sleep(Duration::from_millis(300));
    let (mut base, mut with) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        base.push(flood_rate(ctpeer, 2000)?);
        let w = start_ctwatch(
            ctwatch,
            &[
                "report",
                "--mode",
                "tracepoint",
                "--duration",
                "600",
                "--netns",
                NS_S,
            ],
        )?;
        with.push(flood_rate(ctpeer, 2000)?);
        stop(w);
    }
    let (b0, w0) = (median(base.clone()), median(with.clone()));
    let _ = writeln!(doc, "## Cost on the table-full path\n");
    let _ = writeln!(
        doc,
        "A single-socket UDP flood from a namespace whose table is full (64 assured TCP \
         entries, `nf_conntrack_max` = 64): every datagram is a new flow and a table-full drop \
         on LOCAL_OUT, so the send rate is the rate of the drop path itself. Three alternating \
         2-second runs each, medians.\n"
    );
    let _ = writeln!(doc, "| run | datagrams/s (median) | runs |\n|---|---:|---|");
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{:.0}", x))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(doc, "| without ctwatch | {b0:.0} | {} |", fmt(&base));
    let _ = writeln!(
        doc,
        "| `ctwatch report --mode tracepoint` attached | {w0:.0} | {} |",
        fmt(&with)
    );
    let _ = writeln!(
        doc,
        "\n**Ratio with/without: {:.3}** ({:.1} % slower). Every drop is decoded and counted \
         in kernel per attribution key; per-flow records beyond the per-CPU stream budget are \
         counted as not streamed instead of crossing the ring buffer.\n",
        w0 / b0,
        (1.0 - w0 / b0) * 100.0
    );
    drop(b);

    // 2. Snapshot against the seed's pipelines on a big table.
    const ENTRIES: usize = 200_000;
    let b = Bench::new()?;
    std::fs::write(MAX_PATH, "262144")?;
    // Unreplied UDP entries expire in 30 s by default: keep them for the run.
    in_ns(
        NS_S,
        "echo 600 > /proc/sys/net/netfilter/nf_conntrack_udp_timeout",
    )?;
    in_ns(
        NS_C,
        &format!("{} udp-send 198.18.0.1:5000 {ENTRIES} 16", ctpeer.display()),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let count = in_ns(NS_S, "cat /proc/sys/net/netfilter/nf_conntrack_count")?;
    let count = count.trim();
    let snap = || {
        let mut c = Command::new(ctwatch);
        c.args(["snapshot", "--json", "--netns", NS_S]);
        c
    };
    let _ = writeln!(doc, "## `ctwatch snapshot` against the usual pipelines\n");
    let _ = writeln!(
        doc,
        "{count} conntrack entries in one namespace. Each command produces the counts by \
         protocol and top sources; three alternating runs each, medians.\n"
    );
    let _ = writeln!(
        doc,
        "| command | seconds (median) | ratio to ctwatch |\n|---|---:|---:|"
    );
    type MakeCommand<'a> = Box<dyn Fn() -> Command + 'a>;
    let pipelines: Vec<(&str, MakeCommand)> = vec![
        ("`ctwatch snapshot --json`", Box::new(snap)),
        (
            "`conntrack -L \\| awk` (top sources)",
            Box::new(|| {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", NS_S, "sh", "-c"]).arg(
                    "conntrack -L 2>/dev/null | awk '{for(i=1;i<=NF;i++) if ($i ~ /^src=/) {print $i; break}}' | sort | uniq -c | sort -rn | head",
                );
                c
            }),
        ),
        (
            "`cat /proc/net/nf_conntrack \\| awk` (by protocol)",
            Box::new(|| {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", NS_S, "sh", "-c"])
                    .arg("awk '{print $1, $3}' /proc/net/nf_conntrack | sort | uniq -c");
                c
            }),
        ),
    ];
    let mut times: Vec<Vec<f64>> = vec![vec![]; pipelines.len()];
    let mut skipped = String::new();
    for _ in 0..3 {
        for (i, (name, mk)) in pipelines.iter().enumerate() {
            match time_it(mk()) {
                Ok(t) => times[i].push(t),
                Err(e) if i == 0 => {
                    skipped = format!("{name} failed: {e}");
                }
                Err(e) => return Err(e),
            }
        }
    }
    if times[0].is_empty() {
        let _ = writeln!(doc, "Not measured: {skipped}\n");
    } else {
        let t0 = median(times[0].clone());
        for (i, (name, _)) in pipelines.iter().enumerate() {
            let t = median(times[i].clone());
            let _ = writeln!(doc, "| {name} | {t:.3} | {:.2}× |", t / t0);
        }
    }
    drop(b);

    let _ = writeln!(
        doc,
        "\nThe kernel-probe modes are not timed here: this host refuses them, and QEMU's TCG \
         emulation (the only way to run them here) says nothing about real cost."
    );
    let path: PathBuf = root.join("docs/benchmarks.md");
    std::fs::write(&path, &doc)?;
    print!("{doc}");
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}
