//! The bench's two namespaces and the processes in them.
//!
//! `ctwbench-s` (the server) has conntrack hooked by an nft `ct` rule;
//! `ctwbench-c` (the client) has no conntrack at all. A veth joins them:
//! 198.18.0.1 (s) and 198.18.0.2 (c). The client also answers for
//! 198.19.0.0/16 (an AnyIP route), so new flows below the max are delivered
//! to bound sockets instead of freed, and owns 198.18.1.0/24, the sources of
//! the inbound flood. All addresses are in 198.18.0.0/15.
use std::{
    fs::File,
    io::{BufRead, BufReader},
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::guard;
use crate::setup::{cmd_output, run};

pub const NS_S: &str = "ctwbench-s";
pub const NS_C: &str = "ctwbench-c";
pub const S_ADDR: &str = "198.18.0.1";
pub const C_ADDR: &str = "198.18.0.2";
pub const MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
pub const BUCKETS: &str = "/proc/sys/net/netfilter/nf_conntrack_buckets";

/// `sh -c CMD` inside a namespace; its stdout.
pub fn in_ns(ns: &str, cmd: &str) -> Result<String> {
    cmd_output(Command::new("ip").args(["netns", "exec", ns, "sh", "-c", cmd]))
}

/// Makes `cmd` start in namespace `ns` (setns before exec), without an
/// `ip netns exec` process in between: its rusage is the command's own.
pub fn enter(cmd: &mut Command, ns: &str) -> Result<File> {
    let f = File::open(format!("/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?;
    let fd = f.as_raw_fd();
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The caller keeps it open until the command has started.
    Ok(f)
}

/// A child process killed (and reaped) on drop, and by the guard on a signal.
pub struct Proc {
    pub child: Child,
    /// The last lines it wrote on stderr, when captured.
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Result<Proc> {
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        guard::add_pid(child.id());
        Ok(Proc {
            child,
            stderr: Arc::default(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGINT (ctwatch's clean exit, as a person would stop it), then waits;
    /// SIGKILL if it has not exited within `grace`. Whether it exited.
    pub fn interrupt(mut self, grace: Duration) -> bool {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                guard::remove_pid(self.child.id());
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "xtask: pid {} had not exited {} s after SIGINT; killing it",
            self.pid(),
            grace.as_secs()
        );
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        guard::remove_pid(self.child.id());
    }
}

/// `ctwatch serve` as both parts measure it: tracepoint mode, scoped to the
/// server namespace, on a free loopback port. Returns the process, its
/// banner and the address it serves.
pub fn start_serve(bin: &Path) -> Result<(Proc, String, String)> {
    let listen = format!("127.0.0.1:{}", free_port()?);
    let (p, banner) = start_ctwatch(
        bin,
        &[
            "serve",
            "--mode",
            "tracepoint",
            "--listen",
            &listen,
            "--netns",
            NS_S,
        ],
    )?;
    Ok((p, banner, listen))
}

/// Starts ctwatch and waits for its banner (`... mode on kernel ...
/// (attached: ...)`), which it prints once every program is attached.
/// Returns the process and the banner.
pub fn start_ctwatch(bin: &Path, args: &[&str]) -> Result<(Proc, String)> {
    let mut p = Proc::spawn(
        Command::new(bin)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )?;
    let mut err = BufReader::new(p.child.stderr.take().expect("piped"));
    let mut line = String::new();
    let mut seen = Vec::new();
    while err.read_line(&mut line)? > 0 {
        if line.contains(" mode on kernel ") {
            let banner = line.trim().to_string();
            // Keep draining stderr so ctwatch never blocks on a full pipe.
            let keep = p.stderr.clone();
            std::thread::spawn(move || {
                for l in err.lines().map_while(Result::ok) {
                    let mut k = keep.lock().unwrap_or_else(|e| e.into_inner());
                    if k.len() >= 20 {
                        k.remove(0);
                    }
                    k.push(l);
                }
            });
            return Ok((p, banner));
        }
        seen.push(line.trim().to_string());
        line.clear();
    }
    bail!(
        "ctwatch {} exited before attaching: {}",
        args.join(" "),
        seen.join(" / ")
    )
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The two namespaces; the guard deletes them (and restores the sysctls)
/// when this drops.
pub struct Topology {
    procs: Vec<Proc>,
}

impl Topology {
    pub fn new() -> Result<Self> {
        let t = Topology { procs: vec![] };
        for ns in [NS_S, NS_C] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            guard::add_netns(ns);
            run(Command::new("ip").args(["netns", "add", ns]))?;
            in_ns(
                ns,
                "ip link set lo up && echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6",
            )?;
        }
        run(Command::new("ip").args([
            "link", "add", "ctwb0", "netns", NS_S, "type", "veth", "peer", "name", "ctwb1",
            "netns", NS_C,
        ]))?;
        in_ns(
            NS_S,
            &format!(
                "ip addr add {S_ADDR}/24 dev ctwb0 && ip link set ctwb0 up \
                 && ip route add 198.19.0.0/16 via {C_ADDR} \
                 && ip route add 198.18.1.0/24 via {C_ADDR} \
                 && nft add table inet ctw \
                 && nft 'add chain inet ctw pre {{ type filter hook prerouting priority 0; }}' \
                 && nft add rule inet ctw pre ct state new counter"
            ),
        )?;
        in_ns(
            NS_C,
            &format!(
                "ip addr add {C_ADDR}/24 dev ctwb1 && ip link set ctwb1 up \
                 && ip route add local 198.19.0.0/16 dev lo \
                 && ip route add local 198.18.1.0/24 dev lo"
            ),
        )?;
        Ok(t)
    }

    /// Starts a ctpeer that prints `ready ...` once its sockets exist, and
    /// owns it.
    pub fn spawn_ready(&mut self, ns: &str, bin: &Path, args: &[&str]) -> Result<()> {
        let mut p = Proc::spawn(
            Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(bin)
                .args(args)
                .stdout(Stdio::piped()),
        )?;
        let out = p.child.stdout.take().expect("piped");
        self.procs.push(p);
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        if !line.starts_with("ready") {
            bail!("ctpeer {args:?} said {line:?}");
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.procs.clear();
        guard::cleanup();
    }
}

/// nf_conntrack_count of a namespace.
pub fn ct_count(ns: &str) -> Result<u64> {
    in_ns(ns, "cat /proc/sys/net/netfilter/nf_conntrack_count")?
        .trim()
        .parse()
        .context("nf_conntrack_count")
}

/// The conntrack `drop` counter of a namespace, summed over CPUs
/// (`conntrack -S`, which works with or without procfs).
pub fn ct_drops(ns: &str) -> Result<u64> {
    let out = in_ns(ns, "conntrack -S")?;
    Ok(out
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("drop="))
        .filter_map(|v| v.parse::<u64>().ok())
        .sum())
}

/// UDP datagrams a namespace's sockets refused (RcvbufErrors + InErrors
/// counts both; RcvbufErrors is in InErrors), from /proc/net/snmp.
pub fn udp_in_errors(ns: &str) -> Result<u64> {
    let out = in_ns(ns, "cat /proc/net/snmp")?;
    let mut rows = out.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(head), Some(vals)) = (rows.next(), rows.next()) else {
        bail!("no Udp rows in /proc/net/snmp");
    };
    head.split_whitespace()
        .zip(vals.split_whitespace())
        .find(|(h, _)| *h == "InErrors")
        .and_then(|(_, v)| v.parse().ok())
        .context("Udp InErrors")
}
