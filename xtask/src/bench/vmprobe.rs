//! Part `vm`: kprobe mode cannot run on this host (no kprobes, tracing
//! programs refused), so its program runs are counted inside one Debian
//! kernel under QEMU. QEMU runs under TCG emulation here, so the
//! nanoseconds are emulated ones: only the run counts carry over.
use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use anyhow::{Context, Result};

use super::{progs, Tools};
use crate::vm;

pub fn not_run() -> String {
    "## kprobe mode (VM)\n\nNot measured in this invocation (`--parts` left out `vm`): this \
     host has no kprobes and refuses tracing programs, so kprobe mode only runs in a VM \
     (`--parts vm`).\n\n"
        .into()
}

/// The guest's script: the host bench's topology, then one run per traffic
/// with `ctwatch report --mode kprobe` attached and bpf_stats on. Lines
/// starting `CTWB ` are for the host to parse.
const SCRIPT: &str = r#"
MS=__MS__
say() { echo "CTWB $*"; }
wait_for() { i=0; while ! grep -q "$2" "$1" 2>/dev/null; do i=$((i+1)); [ $i -gt $(($3*5)) ] && return 1; sleep 0.2; done; }
ip netns add s && ip netns add c || exit 1
for n in s c; do ip netns exec $n sh -c 'ip link set lo up; echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6'; done
ip link add ctwb0 netns s type veth peer name ctwb1 netns c || exit 1
ip netns exec s sh -c 'ip addr add 198.18.0.1/24 dev ctwb0 && ip link set ctwb0 up && ip route add 198.19.0.0/16 via 198.18.0.2 && ip route add 198.18.1.0/24 via 198.18.0.2 && nft add table inet ctw && nft "add chain inet ctw pre { type filter hook prerouting priority 0; }" && nft add rule inet ctw pre ct state new counter' || exit 1
ip netns exec c sh -c 'ip addr add 198.18.0.2/24 dev ctwb1 && ip link set ctwb1 up && ip route add local 198.19.0.0/16 dev lo && ip route add local 198.18.1.0/24 dev lo' || exit 1
echo 4000000 > /proc/sys/net/netfilter/nf_conntrack_max
ip netns exec c /bin/ctpeer bench-sink 0.0.0.0:9000 32 > /tmp/sink.out 2>&1 &
wait_for /tmp/sink.out ready 60 || { say error sink; exit 1; }
one() {
  key=$1; ns=$2; shift 2
  /bin/ctwatch report --mode kprobe --duration 3600 --netns s >/tmp/cw.out 2>/tmp/cw.err &
  cw=$!
  if ! wait_for /tmp/cw.err " mode on kernel " 300; then say error $key "$(cat /tmp/cw.err)"; kill -9 $cw; return; fi
  sleep 1
  say banner $key "$(grep ' mode on kernel ' /tmp/cw.err)"
  echo 1 > /proc/sys/kernel/bpf_stats_enabled
  say before $key "$(bpftool prog show --json)"
  say peer $key "$(ip netns exec $ns /bin/ctpeer "$@")"
  say after $key "$(bpftool prog show --json)"
  echo 0 > /proc/sys/kernel/bpf_stats_enabled
  kill -TERM $cw; wait $cw
}
ip netns exec s /bin/ctpeer bench-stream 198.18.0.2:9000 100 40000 >/dev/null
sleep 1
say entry a "$(ip netns exec s conntrack -L -p udp --orig-port-src 40000 2>/dev/null)"
one a s bench-stream 198.18.0.2:9000 $MS 40000
one b s bench-rotate 198.19.0.0:9000 $MS 32 65536
ip netns exec s conntrack -F >/dev/null 2>&1
echo 64 > /proc/sys/net/netfilter/nf_conntrack_max
ip netns exec s /bin/ctpeer tcp-listen 0.0.0.0:7400 > /tmp/l.out 2>&1 &
wait_for /tmp/l.out ready 60 || { say error listen; exit 1; }
ip netns exec c /bin/ctpeer tcp-hold 198.18.0.1:7400 64 > /tmp/h.out 2>&1 &
wait_for /tmp/h.out ready 120 || { say error hold; exit 1; }
sleep 1
say count "$(ip netns exec s cat /proc/sys/net/netfilter/nf_conntrack_count)"
one c s bench-rotate 198.18.0.2:1024 $MS 64512 1
one d c bench-rotate 198.18.0.1:1024 $MS 64512 1 198.18.1.1 32
say done
"#;

const TITLES: [(&str, &str); 4] = [
    ("a", "(a) established, one tracked UDP flow"),
    ("b", "(b) new flows below the max"),
    ("c", "(c) table full, locally generated"),
    ("d", "(d) table full, inbound, many sources"),
];

pub fn run(tools: &Tools, kernel: &str, secs: f64) -> Result<String> {
    vm::ensure_host_tools()?;
    let ms = (secs * 1000.0).round() as u64;
    let script = tools.scratch.join("vm-bench.sh");
    std::fs::write(&script, SCRIPT.replace("__MS__", &ms.to_string()))?;
    let opts = vm::VmOpts {
        kernels: vec![kernel.to_string()],
        files: vec![
            (tools.ctwatch.clone(), "/bin/ctwatch".into()),
            (tools.ctpeer.clone(), "/bin/ctpeer".into()),
            (script, "/bin/ctwbench.sh".into()),
        ],
        share: None,
        command: Some("sh /bin/ctwbench.sh".into()),
        env: vec![],
        timeout: Duration::from_secs(1800),
    };
    eprintln!("xtask: bench kprobe mode in a {kernel} VM (TCG)");
    let results = vm::run_in_vms(&opts)?;
    let r = results.first().context("no VM result")?;
    let mut doc = String::new();
    let _ = writeln!(
        doc,
        "## kprobe mode (VM, emulated)\n\n\
         This host has no kprobes and refuses tracing programs, so kprobe mode runs in a VM: \
         Debian kernel {} under QEMU with **TCG emulation** (KVM cannot run a stock kernel \
         here). Same namespaces and traffic as above, {secs} s per traffic, one run each with \
         `ctwatch report --mode kprobe --netns s` attached and `kernel.bpf_stats_enabled` = 1. \
         **Run counts per datagram carry over to real hardware; the nanoseconds are emulated \
         and say nothing about real cost**, and the rates are meaningless. The empty-program \
         arm (A1) is not run in the VM.\n",
        r.kernel_release
    );
    let lines: Vec<&str> = r
        .output
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("CTWB "))
        .collect();
    let get = |kind: &str, key: &str| -> Option<&str> {
        let p = format!("{kind} {key} ");
        lines.iter().find_map(|l| l.strip_prefix(p.as_str()))
    };
    if !lines.contains(&"done") {
        let _ = writeln!(
            doc,
            "**The guest did not finish** (exit {:?}{}{}); what it printed:\n\n```\n{}\n```\n",
            r.exit_code,
            if r.timed_out { ", timed out" } else { "" },
            if r.panicked { ", kernel panic" } else { "" },
            r.output
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    if let Some(e) = get("entry", "a") {
        let _ = writeln!(
            doc,
            "The established flow's entry before (a): `{}`\n",
            e.trim()
        );
    }
    let _ = writeln!(
        doc,
        "| traffic | datagrams | program | runs | runs per datagram | ns per run (emulated) |\n\
         |---|---:|---|---:|---:|---:|"
    );
    let mut banner = None;
    for (key, title) in TITLES {
        if let Some(e) = get("error", key) {
            let _ = writeln!(doc, "| {title} | not measured: {} | | | | |", e.trim());
            continue;
        }
        let (Some(peer), Some(before), Some(after)) =
            (get("peer", key), get("before", key), get("after", key))
        else {
            let _ = writeln!(doc, "| {title} | not measured (no output) | | | | |");
            continue;
        };
        banner = banner.or(get("banner", key));
        let w: Vec<&str> = peer.split_whitespace().collect();
        let num = |name: &str| -> u64 {
            w.iter()
                .position(|x| *x == name)
                .and_then(|i| w.get(i + 1)?.parse().ok())
                .unwrap_or(0)
        };
        let datagrams = num("sent") + num("eperm");
        let (before, after) = (progs::parse_programs(before), progs::parse_programs(after));
        let (Ok(before), Ok(after)) = (before, after) else {
            let _ = writeln!(
                doc,
                "| {title} | {datagrams} | (bpftool output unreadable) | | | |"
            );
            continue;
        };
        let stats = progs::delta(&BTreeMap::new(), &before, &after);
        let total: u64 = stats.iter().map(|p| p.run_cnt).sum();
        for p in stats.iter().filter(|p| p.run_cnt > 0) {
            let _ = writeln!(
                doc,
                "| {title} | {datagrams} | `{}` ({}) | {} | {:.4} | {:.0} |",
                p.name,
                p.kind,
                p.run_cnt,
                p.run_cnt as f64 / datagrams.max(1) as f64,
                p.run_time_ns as f64 / p.run_cnt as f64
            );
        }
        let idle: Vec<String> = stats
            .iter()
            .filter(|p| p.run_cnt == 0)
            .map(|p| format!("`{}`", p.name))
            .collect();
        let _ = writeln!(
            doc,
            "| {title} | {datagrams} | **all programs** (did not run: {}) | **{total}** | **{:.4}** | |",
            if idle.is_empty() {
                "none".to_string()
            } else {
                idle.join(", ")
            },
            total as f64 / datagrams.max(1) as f64
        );
    }
    if let Some(b) = banner {
        let _ = writeln!(doc, "\nctwatch's banner in the VM: `{}`", b.trim());
    }
    let _ = writeln!(doc);
    Ok(doc)
}
