//! Part `sizes`: `ctwatch snapshot` and `ctwatch serve` on tables of
//! several sizes, against a bare ctnetlink dump (the floor), the seed's five
//! commands and a single-pass `conntrack -L | awk`.
use std::{
    fmt::Write as _,
    fs::File,
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    guard, mib, mmm,
    netns::{self, in_ns, Topology, BUCKETS, MAX, NS_C, NS_S, S_ADDR},
    Target, Tools,
};

/// Where a command runs: on the host, or entered into the server namespace.
#[derive(Clone, Copy, PartialEq)]
enum Place {
    Host,
    Server,
}

struct Cmd {
    label: &'static str,
    /// Counted in the seed's total.
    seed: bool,
    place: Place,
    argv: Vec<String>,
}

impl Cmd {
    fn shown(&self) -> String {
        match self.argv.first().map(String::as_str) {
            Some("sh") => self.argv[2].clone(),
            _ => self.argv.join(" "),
        }
    }
}

const SEED: [(&str, &str); 5] = [
    (
        "seed 1: by L4 protocol (`$3`)",
        "conntrack -L -o extended 2>/dev/null | awk '{print $3}' | sort | uniq -c | sort -rn",
    ),
    (
        "seed 2: by TCP state (`$6`)",
        "conntrack -L -o extended 2>/dev/null | awk '{print $6}' | sort | uniq -c | sort -rn",
    ),
    (
        "seed 3: by L3 protocol (`$1`)",
        "conntrack -L -o extended 2>/dev/null | awk '{print $1}' | sort | uniq -c | sort -rn",
    ),
    (
        "seed 4: top-10 sources (`$7`)",
        "conntrack -L -o extended 2>/dev/null | awk '{print $7}' | sort | uniq -c | sort -rn | head -10",
    ),
    (
        "seed 5: settings",
        "sysctl -a 2>/dev/null | grep conntrack",
    ),
];

const ONE_PASS: &str =
    "conntrack -L -o extended 2>/dev/null | awk '{l4[$3]++; st[$6]++; l3[$1]++; \
src[$7]++} END {for (k in l4) print \"l4\", k, l4[k]; for (k in st) print \"state\", k, st[k]; \
for (k in l3) print \"l3\", k, l3[k]; for (k in src) print src[k], k | \"sort -rn | head -10\"}'";

fn commands(tools: &Tools) -> Vec<Cmd> {
    let sh = |s: &str| vec!["sh".to_string(), "-c".into(), s.to_string()];
    let mut v = vec![
        Cmd {
            label: "bare ctnetlink dump (the floor)",
            seed: false,
            place: Place::Server,
            argv: vec![tools.bare_dump.to_string_lossy().into()],
        },
        Cmd {
            label: "`ctwatch snapshot`",
            seed: false,
            place: Place::Host,
            argv: vec![
                tools.ctwatch.to_string_lossy().into(),
                "snapshot".into(),
                "--netns".into(),
                NS_S.into(),
            ],
        },
    ];
    for (label, cmd) in SEED {
        v.push(Cmd {
            label,
            seed: true,
            place: Place::Server,
            argv: sh(cmd),
        });
    }
    v.push(Cmd {
        label: "single-pass `conntrack -L \\| awk`",
        seed: false,
        place: Place::Server,
        argv: sh(ONE_PASS),
    });
    v
}

/// Wall time and peak RSS (KiB) of one run. The RSS is GNU time's `%M`,
/// `ru_maxrss` from its wait4 (for a pipeline, the largest process): time
/// forks the command from its own small image, whereas a child forked or
/// vforked from xtask would carry xtask's RSS high-water mark into its
/// `ru_maxrss`.
fn measure(c: &Cmd, scratch: &Path) -> Result<(f64, u64, String)> {
    let rss_file = scratch.join("rss");
    let mut cmd = Command::new("/usr/bin/time");
    cmd.args(["-f", "%M", "-o"])
        .arg(&rss_file)
        .arg("--")
        .args(&c.argv)
        .stdin(Stdio::null())
        .stdout(File::create(scratch.join("out"))?)
        .stderr(File::create(scratch.join("err"))?);
    let _ns = match c.place {
        Place::Server => Some(netns::enter(&mut cmd, NS_S)?),
        Place::Host => None,
    };
    let t = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", c.shown()))?;
    let secs = t.elapsed().as_secs_f64();
    if !status.success() {
        let err = std::fs::read_to_string(scratch.join("err")).unwrap_or_default();
        bail!("{} failed ({status}): {}", c.shown(), err.trim());
    }
    let out = std::fs::read_to_string(scratch.join("out")).unwrap_or_default();
    let kib = std::fs::read_to_string(&rss_file)?
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .context("GNU time's %M")?;
    Ok((secs, kib, out))
}

/// Fills the server's table with `n` UDP flows from the client, retrying
/// (the same flows: existing ones are lookups) if the backlog dropped some.
fn fill(tools: &Tools, n: u64) -> Result<u64> {
    let spread = n.div_ceil(64512).max(16);
    let mut count = 0;
    for _ in 0..3 {
        in_ns(
            NS_C,
            &format!(
                "{} bench-fill {S_ADDR}:5000 {n} {spread}",
                tools.ctpeer.display()
            ),
        )?;
        std::thread::sleep(Duration::from_millis(300));
        count = netns::ct_count(NS_S)?;
        if count as f64 >= n as f64 * 0.99 {
            break;
        }
    }
    Ok(count)
}

struct Serve {
    cpu_pct: f64,
    hwm_kib: u64,
    /// VmRSS at the end of the window.
    rss_kib: u64,
    window: f64,
    scrapes: Vec<(f64, usize)>,
    banner: String,
}

fn proc_ticks(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = s.rsplit_once(") ").context("/proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime), counted from 3 after the comm.
    let ut: u64 = f.get(11).and_then(|x| x.parse().ok()).context("utime")?;
    let st: u64 = f.get(12).and_then(|x| x.parse().ok()).context("stime")?;
    Ok(ut + st)
}

fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{key} in /proc/{pid}/status"))
}

fn scrape(addr: &str) -> Result<usize> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    if !body.starts_with(b"HTTP/1.") || !body.windows(4).any(|w| w == b" 200") {
        bail!(
            "scrape: {}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
    }
    Ok(body.len())
}

fn serve(tools: &Tools, warmup: u64, window: u64) -> Result<Serve> {
    let (p, banner, listen) = netns::start_serve(&tools.ctwatch)?;
    std::thread::sleep(Duration::from_secs(warmup));
    let pid = p.pid();
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let t0 = proc_ticks(pid)?;
    let start = Instant::now();
    let mut scrapes = Vec::new();
    // Scraped every 15 s, as a Prometheus would.
    let mut next = 0.0;
    while start.elapsed().as_secs_f64() < window as f64 {
        if start.elapsed().as_secs_f64() >= next {
            let s0 = Instant::now();
            let bytes = scrape(&listen)?;
            scrapes.push((s0.elapsed().as_secs_f64(), bytes));
            next += 15.0;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let t1 = proc_ticks(pid)?;
    let elapsed = start.elapsed().as_secs_f64();
    let hwm_kib = status_kib(pid, "VmHWM:")?;
    let rss_kib = status_kib(pid, "VmRSS:")?;
    if !p.interrupt(Duration::from_secs(60)) {
        eprintln!("xtask: serve was killed");
    }
    Ok(Serve {
        cpu_pct: (t1 - t0) as f64 / tick / elapsed * 100.0,
        hwm_kib,
        rss_kib,
        window: elapsed,
        scrapes,
        banner,
    })
}

pub fn run(
    tools: &Tools,
    sizes: &[u64],
    rounds: usize,
    warmup: u64,
    window: u64,
) -> Result<(String, Vec<Target>)> {
    let mut doc = String::new();
    let mut targets = Vec::new();
    let scratch = tools.scratch.clone();
    let mut sizes = sizes.to_vec();
    sizes.sort_unstable();

    let topo = Topology::new()?;
    guard::set_sysctl(MAX, "2000000")?;
    let buckets = match guard::set_sysctl(BUCKETS, "1048576") {
        Ok(()) => "1,048,576".to_string(),
        Err(e) => format!("left as they were ({e:#})"),
    };
    in_ns(
        NS_S,
        "echo 3600 > /proc/sys/net/netfilter/nf_conntrack_udp_timeout",
    )?;
    let cmds = commands(tools);
    let mut serves = Vec::new();
    let _ = writeln!(
        doc,
        "## Table sizes: `ctwatch snapshot` and `ctwatch serve`\n\n\
         The server namespace's table is filled with unreplied UDP entries: from each \
         source port 1024, 1025, ... the client sends one datagram to each of 16 destination \
         ports (`ctpeer bench-fill {S_ADDR}:5000 N 16`, paced), with \
         `nf_conntrack_udp_timeout` = 3600 in the server namespace, `nf_conntrack_max` = \
         2,000,000 and `nf_conntrack_buckets` {buckets}. Each command runs {rounds} times per \
         size, in a rotating order; the seed's commands and the awk pass run inside the \
         server namespace (setns, no `ip netns exec` in between), `ctwatch snapshot` on the \
         host with `--netns {NS_S}`. Each runs under `/usr/bin/time -f %M`, whose \
         `ru_maxrss` is the peak RSS (for a pipeline, of its largest process); the wall time \
         is xtask's, around it.\n\n\
         Commands:\n"
    );
    for c in &cmds {
        let _ = writeln!(doc, "- {}: `{}`", c.label, c.shown().replace('|', "\\|"));
    }
    let _ = writeln!(doc);

    for &n in &sizes {
        eprintln!("xtask: bench table of {n} entries");
        let count = fill(tools, n)?;
        let mut times: Vec<Vec<f64>> = vec![vec![]; cmds.len()];
        let mut rss: Vec<u64> = vec![0; cmds.len()];
        let mut dumped = 0u64;
        for round in 0..rounds {
            for k in 0..cmds.len() {
                let i = (k + round) % cmds.len();
                let (secs, kib, out) = measure(&cmds[i], &scratch)?;
                times[i].push(secs);
                rss[i] = rss[i].max(kib);
                if i == 0 {
                    dumped = out
                        .split_whitespace()
                        .nth(1)
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(0);
                }
            }
        }
        let floor = mmm(&times[0]).1;
        let _ = writeln!(
            doc,
            "### {count} entries (asked for {n}; the bare dump counted {dumped} messages)\n\n\
             | command | seconds min | median | max | median ÷ floor | peak RSS (MiB) |\n\
             |---|---:|---:|---:|---:|---:|"
        );
        for (i, c) in cmds.iter().enumerate() {
            let (lo, med, hi) = mmm(&times[i]);
            let _ = writeln!(
                doc,
                "| {} | {lo:.3} | {med:.3} | {hi:.3} | {:.2}× | {} |",
                c.label,
                med / floor,
                mib(rss[i])
            );
        }
        let seed_total: Vec<f64> = (0..rounds)
            .map(|r| {
                cmds.iter()
                    .enumerate()
                    .filter(|(_, c)| c.seed)
                    .map(|(i, _)| times[i][r])
                    .sum()
            })
            .collect();
        let (lo, med, hi) = mmm(&seed_total);
        let seed_rss = cmds
            .iter()
            .enumerate()
            .filter(|(_, c)| c.seed)
            .map(|(i, _)| rss[i])
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            doc,
            "| the seed's five commands, one after another | {lo:.3} | {med:.3} | {hi:.3} | {:.2}× | {} |\n",
            med / floor,
            mib(seed_rss)
        );
        let snap = mmm(&times[1]).1 / floor;
        let snap_rss = rss[1];

        eprintln!("xtask: bench serve with {count} entries ({warmup} s + {window} s)");
        let s = serve(tools, warmup, window)?;
        let _ = writeln!(
            doc,
            "`ctwatch serve --mode tracepoint --listen 127.0.0.1:PORT --netns {NS_S}`, \
             after a {warmup} s start-up, over {:.0} s with a scrape every 15 s: \
             **{:.1} % of one core** (utime+stime from /proc/PID/stat), peak RSS (VmHWM) \
             **{} MiB**; scrapes took {} s and returned {} bytes.\n",
            s.window,
            s.cpu_pct,
            mib(s.hwm_kib),
            s.scrapes
                .iter()
                .map(|(t, _)| format!("{t:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
            s.scrapes.last().map_or(0, |x| x.1),
        );
        let _ = writeln!(doc, "Its banner: `{}`\n", s.banner);
        serves.push((count, s.cpu_pct, s.hwm_kib, s.rss_kib));
        if n >= 1_000_000 {
            let at = format!("{count} entries");
            targets.push(Target::at_most(
                format!("`snapshot` time ÷ bare dump, {at}"),
                snap,
                1.25,
                "×",
            ));
            targets.push(Target::at_most(
                format!("`snapshot` peak RSS, {at}"),
                snap_rss as f64 / 1024.0,
                32.0,
                " MiB",
            ));
            targets.push(Target::at_most(
                format!("`serve` CPU, {at}, over {:.0} s", s.window),
                s.cpu_pct,
                5.0,
                " % of a core",
            ));
            targets.push(Target::at_most(
                format!("`serve` peak RSS, {at}"),
                s.hwm_kib as f64 / 1024.0,
                64.0,
                " MiB",
            ));
        }
    }
    drop(topo);
    if !serves.is_empty() {
        let _ = writeln!(
            doc,
            "`ctwatch serve` across the sizes (same window):\n\n\
             | entries | CPU, % of one core | peak RSS (VmHWM, MiB) | RSS at the end (MiB) |\n\
             |---:|---:|---:|---:|"
        );
        for (count, cpu, hwm, rss) in serves {
            let _ = writeln!(doc, "| {count} | {cpu:.1} | {} | {} |", mib(hwm), mib(rss));
        }
        let _ = writeln!(doc);
    }
    Ok((doc, targets))
}
