//! Part `hooks`: the cost of each arm on each kind of traffic, as ratios
//! to the untraced rate taken in the same rounds (ABBA order), plus one
//! extra run per arm with `kernel.bpf_stats_enabled` for the programs'
//! own counts and times.
use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use anyhow::{bail, Context, Result};

use super::{
    fmt_rate, mmm,
    netns::{self, in_ns, Proc, Topology, C_ADDR, MAX, NS_C, NS_S, S_ADDR},
    profile,
    progs::{self, EmptyProgs, ProgStat},
    Target, Tools,
};
use crate::bench::guard;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Arm {
    A0,
    A1,
    A2,
    A3,
}

const ARMS: [Arm; 4] = [Arm::A0, Arm::A1, Arm::A2, Arm::A3];

impl Arm {
    fn label(self) -> &'static str {
        match self {
            Arm::A0 => "A0 no BPF",
            Arm::A1 => "A1 empty program on the same hook",
            Arm::A2 => "A2 `ctwatch report`",
            Arm::A3 => "A3 `ctwatch serve`",
        }
    }
}

/// The raw tracepoints tracepoint mode attaches (conntrack-user's compat
/// table: `ctw_kfree_skb` on `kfree_skb`, nothing else).
const TRACEPOINT_HOOKS: &[&str] = &["kfree_skb"];

enum Running {
    Nothing,
    Empty(EmptyProgs),
    Ctwatch(Proc),
}

fn start(arm: Arm, tools: &Tools, banners: &mut BTreeMap<Arm, String>) -> Result<Running> {
    Ok(match arm {
        Arm::A0 => Running::Nothing,
        Arm::A1 => Running::Empty(progs::attach_empty(&tools.obj, TRACEPOINT_HOOKS)?),
        Arm::A2 | Arm::A3 => {
            let (p, banner) = if arm == Arm::A2 {
                netns::start_ctwatch(
                    &tools.ctwatch,
                    &[
                        "report",
                        "--mode",
                        "tracepoint",
                        "--duration",
                        "3600",
                        "--netns",
                        NS_S,
                    ],
                )?
            } else {
                let (p, banner, _) = netns::start_serve(&tools.ctwatch)?;
                (p, banner)
            };
            banners.entry(arm).or_insert(banner);
            Running::Ctwatch(p)
        }
    })
}

/// How long ctwatch may take to exit after SIGINT (report prints then).
const GRACE: Duration = Duration::from_secs(60);

/// Stops an arm and waits until the kernel has released its programs (it
/// does so after an RCU grace period), so the next run starts without them.
/// False if ctwatch had to be killed.
fn stop(r: Running, baseline: &BTreeMap<u64, ProgStat>) -> Result<bool> {
    let exited = match r {
        Running::Nothing => return Ok(true),
        Running::Empty(e) => {
            drop(e);
            true
        }
        Running::Ctwatch(p) => p.interrupt(GRACE),
    };
    for _ in 0..100 {
        if progs::ctw_programs()?
            .keys()
            .all(|id| baseline.contains_key(id))
        {
            return Ok(exited);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the arm's programs were still loaded 5 s after it stopped")
}

/// Waits (up to `secs`) for `ctw_` programs this bench did not load to go
/// away: another ctwatch attached to the same hook would be measured in
/// every arm. Returns what is still there.
fn wait_for_foreign(secs: u64) -> Result<BTreeMap<u64, ProgStat>> {
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let p = progs::ctw_programs()?;
        if p.is_empty() || std::time::Instant::now() >= until {
            return Ok(p);
        }
        eprintln!(
            "xtask: waiting for programs this bench did not load: {}",
            p.iter()
                .map(|(id, s)| format!("{} (id {id})", s.name))
                .collect::<Vec<_>>()
                .join(", ")
        );
        std::thread::sleep(Duration::from_secs(10));
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// UDP datagrams the sink's sockets refused, per datagram (want 0).
    SinkRefused,
    /// New entries in the server's table, per datagram (want 1).
    NewEntries,
    /// The server's conntrack `drop` counter, per datagram (want 1).
    KernelDrops,
}

impl Check {
    fn header(self) -> &'static str {
        match self {
            Check::SinkRefused => "refused by the sink per datagram",
            Check::NewEntries => "new entries per datagram",
            Check::KernelDrops => "conntrack drops per datagram",
        }
    }

    fn read(self) -> Result<u64> {
        match self {
            Check::SinkRefused => netns::udp_in_errors(NS_C),
            Check::NewEntries => netns::ct_count(NS_S),
            Check::KernelDrops => netns::ct_drops(NS_S),
        }
    }
}

struct Traffic {
    key: &'static str,
    title: &'static str,
    about: &'static str,
    /// Namespace the sender runs in.
    ns: &'static str,
    /// ctpeer arguments after the subcommand's address (`{ms}` = duration).
    args: String,
    check: Check,
    /// Flush the server's table after each run (new flows below the max).
    flush: bool,
}

impl Traffic {
    fn command(&self, ctpeer: &str, ms: u64) -> String {
        format!("{ctpeer} {}", self.args.replace("{ms}", &ms.to_string()))
    }
}

fn traffics() -> Vec<Traffic> {
    vec![
        Traffic {
            key: "a",
            title: "(a) established: small packets of one tracked UDP flow",
            about: "One connected socket in the server namespace sends 1-byte datagrams to a \
                    draining sink in the client namespace; the flow's entry exists and has seen \
                    a reply (the sink answers its first datagram), so every packet is a \
                    conntrack lookup hit and nothing is freed.",
            ns: NS_S,
            args: format!("bench-stream {C_ADDR}:9000 {{ms}} 40000"),
            check: Check::SinkRefused,
            flush: false,
        },
        Traffic {
            key: "b",
            title: "(b) new flows below the max",
            about: "One socket in the server namespace sends 1-byte datagrams, each to the next \
                    of 32 ports on the next of 65,536 addresses (198.19.0.0/16, answered by the \
                    client's sink through an AnyIP route): every datagram creates an entry, and \
                    every datagram is delivered, none freed. The table is flushed after each \
                    run, outside the timed window.",
            ns: NS_S,
            args: "bench-rotate 198.19.0.0:9000 {ms} 32 65536".into(),
            check: Check::NewEntries,
            flush: true,
        },
        Traffic {
            key: "c",
            title: "(c) table full, locally generated: one socket, rotating ports",
            about: "Inside the namespace whose table is full, one socket sends 1-byte datagrams \
                    to destination ports cycling through 1024-65535: every datagram is a new \
                    flow and a table-full drop at LOCAL_OUT. The rate counts successful sendto \
                    plus EPERM (the drop).",
            ns: NS_S,
            args: format!("bench-rotate {C_ADDR}:1024 {{ms}} 64512 1"),
            check: Check::KernelDrops,
            flush: false,
        },
        Traffic {
            key: "d",
            title: "(d) table full, inbound: many sources and ports",
            about: "From the client namespace, 32 sockets bound to 198.18.1.1-198.18.1.32 (each \
                    its own source port) take turns sending 1-byte datagrams to destination \
                    ports cycling through 1024-65535 of the full namespace: every datagram is a \
                    new flow and a table-full drop at PRE_ROUTING. The rate counts successful \
                    sendto.",
            ns: NS_C,
            args: format!("bench-rotate {S_ADDR}:1024 {{ms}} 64512 1 198.18.1.1 32"),
            check: Check::KernelDrops,
            flush: false,
        },
    ]
}

struct RunOut {
    rate: f64,
    datagrams: u64,
    check: f64,
}

fn run_traffic(tools: &Tools, t: &Traffic, ms: u64) -> Result<RunOut> {
    let before = t.check.read()?;
    let out = in_ns(t.ns, &t.command(&tools.ctpeer.to_string_lossy(), ms))?;
    let after = t.check.read()?;
    // `KIND sent OK eperm E other O secs T`
    let w: Vec<&str> = out.split_whitespace().collect();
    let field = |name: &str| -> Result<f64> {
        w.iter()
            .position(|x| *x == name)
            .and_then(|i| w.get(i + 1))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("ctpeer said {out:?}"))
    };
    let datagrams = (field("sent")? + field("eperm")?) as u64;
    let secs = field("secs")?;
    if datagrams == 0 || secs <= 0.0 {
        bail!("ctpeer sent nothing: {out:?}");
    }
    Ok(RunOut {
        rate: datagrams as f64 / secs,
        datagrams,
        check: after.saturating_sub(before) as f64 / datagrams as f64,
    })
}

fn flush() -> Result<()> {
    in_ns(NS_S, "conntrack -F 2>/dev/null")?;
    // The flush returns once entries are unlinked; wait for the count.
    for _ in 0..100 {
        if netns::ct_count(NS_S)? < 1000 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the server's table did not empty after conntrack -F")
}

struct ArmResult {
    runs: Vec<RunOut>,
    /// Runs after which ctwatch did not exit within GRACE of SIGINT.
    killed: usize,
    unavailable: Option<String>,
    stats: Vec<ProgStat>,
    stats_datagrams: u64,
}

pub fn run(
    tools: &Tools,
    rounds: usize,
    secs: f64,
    keys: &[String],
) -> Result<(String, Vec<Target>)> {
    let ms = (secs * 1000.0).round() as u64;
    let ctpeer = tools.ctpeer.to_string_lossy().to_string();
    let mut doc = String::new();
    let mut targets = Vec::new();
    let mut banners = BTreeMap::new();
    let mut foreign: BTreeMap<String, u64> = BTreeMap::new();
    wait_for_foreign(120)?;

    let mut topo = Topology::new()?;
    guard::set_sysctl(MAX, "4000000")?;
    topo.spawn_ready(NS_C, &tools.ctpeer, &["bench-sink", "0.0.0.0:9000", "32"])?;
    let mut full = false;

    let _ = writeln!(
        doc,
        "## Cost per packet: arms × traffic\n\n\
         Arms, each started fresh for every run and stopped after it: \
         **A0** no BPF; **A1** the eBPF object's empty programs on tracepoint mode's hooks \
         (`ctw_empty_kfree_skb` on the `kfree_skb` raw tracepoint), loaded by xtask with aya; \
         **A2** `ctwatch report --mode tracepoint --duration 3600 --netns {NS_S}`; **A3** \
         `ctwatch serve --mode tracepoint --listen 127.0.0.1:PORT --netns {NS_S}` (scoped to \
         the bench's server namespace, so namespaces other work leaves on the host are not \
         dumped; the kernel program sees every namespace either way).\n\n\
         Method: {rounds} rounds in ABBA order (A0 A1 A2 A3, then A3 A2 A1 A0, ...), one \
         {secs} s run per arm per round; the rate is the sender's datagrams per second as \
         ctpeer counts them. The ratio is taken per round (arm ÷ A0 of the same round); the \
         table gives the median of those ratios and their range. `kernel.bpf_stats_enabled` \
         is 0 in these runs, so its two clock reads per program run stay out of the ratios; \
         after the rounds, one more run per BPF arm with it set to 1 gives each program's \
         runs and nanoseconds per run (`bpftool prog show --json`, programs named `ctw_*` \
         that the arm loaded).\n"
    );

    for t in traffics()
        .into_iter()
        .filter(|t| keys.iter().any(|k| k == t.key))
    {
        if t.check == Check::KernelDrops && !full {
            // The table-full scenarios: 64 assured TCP connections, max 64.
            flush()?;
            guard::set_sysctl(MAX, "64")?;
            topo.spawn_ready(NS_S, &tools.ctpeer, &["tcp-listen", "0.0.0.0:7400"])?;
            topo.spawn_ready(
                NS_C,
                &tools.ctpeer,
                &["tcp-hold", &format!("{S_ADDR}:7400"), "64"],
            )?;
            std::thread::sleep(Duration::from_millis(300));
            let n = netns::ct_count(NS_S)?;
            if n != 64 {
                bail!("the full table holds {n} entries, not 64");
            }
            full = true;
        }
        if t.check != Check::KernelDrops && full {
            bail!("traffic {} must run before the table-full ones", t.key);
        }
        eprintln!("xtask: bench {}", t.title);
        let load0 = loadavg();
        let mut primed = String::new();
        if t.key == "a" {
            // Create the flow and let the sink answer it once.
            in_ns(
                NS_S,
                &format!("{ctpeer} bench-stream {C_ADDR}:9000 20 40000"),
            )?;
            std::thread::sleep(Duration::from_millis(200));
            primed = in_ns(
                NS_S,
                "conntrack -L -p udp --orig-port-src 40000 2>/dev/null",
            )?
            .trim()
            .to_string();
        }
        let mut res: BTreeMap<Arm, ArmResult> = ARMS
            .iter()
            .map(|a| {
                (
                    *a,
                    ArmResult {
                        runs: vec![],
                        killed: 0,
                        unavailable: None,
                        stats: vec![],
                        stats_datagrams: 0,
                    },
                )
            })
            .collect();
        for round in 0..rounds {
            let order: Vec<Arm> = if round % 2 == 0 {
                ARMS.to_vec()
            } else {
                ARMS.iter().rev().copied().collect()
            };
            for arm in order {
                if res[&arm].unavailable.is_some() {
                    continue;
                }
                // Nothing of ours is loaded now: any `ctw_` program is
                // someone else's, and it is counted against this run.
                let baseline = progs::ctw_programs()?;
                for (id, p) in &baseline {
                    *foreign.entry(format!("{} (id {id})", p.name)).or_insert(0) += 1;
                }
                let running = match start(arm, tools, &mut banners) {
                    Ok(r) => r,
                    Err(e) if round == 0 && arm != Arm::A0 => {
                        eprintln!("xtask: {}: not measured: {e:#}", arm.label());
                        res.get_mut(&arm).unwrap().unavailable = Some(format!("{e:#}"));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                std::thread::sleep(Duration::from_millis(500));
                let out = run_traffic(tools, &t, ms);
                if !stop(running, &baseline)? {
                    res.get_mut(&arm).unwrap().killed += 1;
                }
                if t.flush {
                    flush()?;
                }
                let out = out?;
                eprintln!(
                    "xtask:   round {} {}: {} /s",
                    round + 1,
                    arm.label(),
                    fmt_rate(out.rate)
                );
                res.get_mut(&arm).unwrap().runs.push(out);
            }
        }
        // One run per BPF arm with bpf_stats on.
        for arm in [Arm::A1, Arm::A2, Arm::A3] {
            if res[&arm].unavailable.is_some() {
                continue;
            }
            let baseline = progs::ctw_programs()?;
            let running = start(arm, tools, &mut banners)?;
            std::thread::sleep(Duration::from_millis(500));
            progs::stats_on()?;
            let before = progs::ctw_programs()?;
            let out = run_traffic(tools, &t, ms);
            let after = progs::ctw_programs();
            progs::stats_off()?;
            if !stop(running, &baseline)? {
                res.get_mut(&arm).unwrap().killed += 1;
            }
            if t.flush {
                flush()?;
            }
            let (out, after) = (out?, after?);
            let r = res.get_mut(&arm).unwrap();
            r.stats = progs::delta(&baseline, &before, &after);
            r.stats_datagrams = out.datagrams;
        }
        // Where the time goes, for the table-full traffics the targets are about.
        let mut profiles: Vec<(&str, profile::Profile)> = Vec::new();
        let perf_missing = profile::unavailable();
        if t.check == Check::KernelDrops && perf_missing.is_none() {
            for arm in [Arm::A1, Arm::A2] {
                if res[&arm].unavailable.is_some() {
                    continue;
                }
                let baseline = progs::ctw_programs()?;
                let running = start(arm, tools, &mut banners)?;
                std::thread::sleep(Duration::from_millis(500));
                let p = profile::record(t.ns, &t.command(&ctpeer, ms), &std::env::temp_dir());
                stop(running, &baseline)?;
                profiles.push((arm.label(), p?));
            }
        }
        let load1 = loadavg();

        // The section.
        let _ = writeln!(doc, "### {}\n\n{}\n", t.title, t.about);
        let _ = writeln!(
            doc,
            "Sender (in `{}`): `{}`{}\n",
            t.ns,
            t.command("ctpeer", ms),
            if t.key == "a" && !primed.is_empty() {
                format!(" — the flow's entry before the runs: `{primed}`")
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            doc,
            "| arm | datagrams/s min | median | max | ratio to A0 (median of rounds) | ratio range | {} |\n\
             |---|---:|---:|---:|---:|---:|---:|",
            t.check.header()
        );
        let base: Vec<f64> = res[&Arm::A0].runs.iter().map(|r| r.rate).collect();
        let mut ratio_of = BTreeMap::new();
        for arm in ARMS {
            let r = &res[&arm];
            if let Some(why) = &r.unavailable {
                let _ = writeln!(doc, "| {} | not measured: {why} | | | | | |", arm.label());
                continue;
            }
            let rates: Vec<f64> = r.runs.iter().map(|x| x.rate).collect();
            let ratios: Vec<f64> = rates.iter().zip(&base).map(|(a, b)| a / b).collect();
            let checks: Vec<f64> = r.runs.iter().map(|x| x.check).collect();
            let (lo, med, hi) = mmm(&rates);
            let (rlo, rmed, rhi) = mmm(&ratios);
            ratio_of.insert(arm, rmed);
            let _ = writeln!(
                doc,
                "| {} | {} | {} | {} | **{rmed:.3}** | {rlo:.3}–{rhi:.3} | {:.3} |",
                arm.label(),
                fmt_rate(lo),
                fmt_rate(med),
                fmt_rate(hi),
                mmm(&checks).1
            );
        }
        let _ = writeln!(
            doc,
            "\nLoad average (1 min) {load0:.2} before these runs, {load1:.2} after.\n"
        );
        for arm in [Arm::A2, Arm::A3] {
            let r = &res[&arm];
            if r.killed > 0 {
                let _ = writeln!(
                    doc,
                    "**{}** had not exited {} s after SIGINT in {} of its {} runs here (the \
                     timed rounds and the bpf_stats run) and was killed; outside the timed \
                     window, so the rates above are unaffected.\n",
                    arm.label(),
                    GRACE.as_secs(),
                    r.killed,
                    r.runs.len() + 1
                );
            }
        }
        let _ = writeln!(
            doc,
            "Program runs in the extra run with `kernel.bpf_stats_enabled` = 1:\n\n\
             | arm | program | type | runs | runs per datagram | ns per run |\n\
             |---|---|---|---:|---:|---:|"
        );
        for arm in [Arm::A1, Arm::A2, Arm::A3] {
            let r = &res[&arm];
            if r.unavailable.is_some() {
                continue;
            }
            if r.stats.is_empty() {
                let _ = writeln!(
                    doc,
                    "| {} | (no `ctw_` program loaded) | | | | |",
                    arm.label()
                );
            }
            for p in &r.stats {
                let _ = writeln!(
                    doc,
                    "| {} | `{}` | {} | {} | {:.3} | {} |",
                    arm.label(),
                    p.name,
                    p.kind,
                    p.run_cnt,
                    p.run_cnt as f64 / r.stats_datagrams.max(1) as f64,
                    if p.run_cnt > 0 {
                        format!("{:.0}", p.run_time_ns as f64 / p.run_cnt as f64)
                    } else {
                        "–".into()
                    }
                );
            }
        }
        let _ = writeln!(doc);
        if t.check == Check::KernelDrops {
            match &perf_missing {
                None => {
                    let arms: Vec<(&str, &profile::Profile)> =
                        profiles.iter().map(|(l, p)| (*l, p)).collect();
                    doc.push_str(&profile::section(&arms, 12));
                }
                Some(why) => {
                    let _ = writeln!(doc, "No profile: {why}.\n");
                }
            }
            targets.extend(judge(&t, &ratio_of));
        }
    }
    drop(topo);

    if !banners.is_empty() {
        let _ = writeln!(doc, "ctwatch's own banners in these runs:\n");
        for (arm, b) in &banners {
            let _ = writeln!(doc, "- {}: `{b}`", arm.label());
        }
        let _ = writeln!(doc);
    }
    if !foreign.is_empty() {
        let _ = writeln!(
            doc,
            "**Caveat:** programs named `ctw_*` that this bench did not load were attached \
             before some runs (another ctwatch on the host, still there after waiting 120 s \
             for it), so those runs, A0 included, carry its cost too: {}.\n",
            foreign
                .iter()
                .map(|(k, n)| format!("{k} before {n} runs"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok((doc, targets))
}

/// The two targets for a table-full traffic.
fn judge(t: &Traffic, ratio: &BTreeMap<Arm, f64>) -> Vec<Target> {
    let mut v = Vec::new();
    let name = &t.title[..3];
    if let Some(&r2) = ratio.get(&Arm::A2) {
        v.push(Target {
            what: format!("{name} rate with `report` attached ÷ untraced"),
            target: "≥ 0.93".into(),
            measured: format!("{r2:.3}"),
            met: r2 >= 0.93,
            by: if r2 >= 0.93 {
                String::new()
            } else {
                format!(
                    "missed by {:.3} ({:.1} points)",
                    0.93 - r2,
                    (0.93 - r2) * 100.0
                )
            },
            drop_path: true,
        });
        if let Some(&r1) = ratio.get(&Arm::A1) {
            let own = 1.0 - r2;
            let bare = 1.0 - r1;
            let met = own <= 2.0 * bare;
            v.push(Target {
                what: format!("{name} ctwatch's cost within twice the bare hook's"),
                target: "(1 − A2) ≤ 2 × (1 − A1)".into(),
                measured: format!("{own:.3} vs 2 × {bare:.3} = {:.3}", 2.0 * bare),
                met,
                by: if met {
                    String::new()
                } else {
                    format!("missed by {:.3}", own - 2.0 * bare)
                },
                drop_path: true,
            });
        }
    }
    v
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}
