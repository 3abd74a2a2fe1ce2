//! Harness for the privileged integration tests: namespaces with veth
//! pairs, a guarded `nf_conntrack_max`, traffic peers, and a ctwatch child.
//!
//! Every guard cleans up in `Drop`, so a failing assertion (a panic) still
//! deletes namespaces, kills peers and restores the global max.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

pub use serde_json::Value;

/// Runs a command, panicking with its stderr on failure.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Calls `ok` until it holds or `within` has passed; whether it held.
/// Tests wait with it on a kernel counter or on the condition they then
/// assert, never on a sleep that guesses how long the kernel needs.
pub fn poll_until(within: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Why this test cannot run here, if it cannot (printed by the caller).
pub fn cannot_run() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (run through `cargo xtask test`)".into());
    }
    for tool in ["ip", "nft"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "`{tool}` is not installed (cargo xtask setup installs it)"
            ));
        }
    }
    if std::env::var_os("CTWATCH_BIN").is_none() {
        return Some("CTWATCH_BIN is not set (run through `cargo xtask test`)".into());
    }
    None
}

/// Skips (returns from) the calling test with a printed reason.
#[macro_export]
macro_rules! require_env {
    () => {
        if let Some(why) = $crate::cannot_run() {
            eprintln!("SKIP {}: {why}", module_path!());
            if std::env::var_os("CTWATCH_REQUIRE_PRIVILEGED").is_some() {
                panic!("privileged tests are required here but cannot run: {why}");
            }
            return;
        }
    };
}

/// The attach mode under test: `tracepoint` on the host, `kprobe` in VMs.
pub fn mode() -> String {
    std::env::var("CTWATCH_TEST_MODE").unwrap_or_else(|_| "tracepoint".into())
}

pub fn ctwatch_bin() -> PathBuf {
    PathBuf::from(std::env::var_os("CTWATCH_BIN").expect("CTWATCH_BIN"))
}

/// `$CTPEER_BIN`, else the `ctpeer` built next to this test binary
/// (`target/debug/deps/host-*` → `target/debug/ctpeer`).
pub fn ctpeer_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CTPEER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join("ctpeer")
}

/// A network namespace deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!("ctw{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    pub fn inum(&self) -> u64 {
        let path = format!("/run/netns/{}", self.name);
        std::fs::metadata(path)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .expect("netns inode")
    }

    /// TCP sockets here still sending SYNs (`SYN_SENT`, state 02 in
    /// `/proc/net/tcp{,6}`).
    pub fn syn_sent(&self) -> usize {
        self.exec(&["cat", "/proc/net/tcp", "/proc/net/tcp6"])
            .lines()
            .filter(|l| l.split_whitespace().nth(3) == Some("02"))
            .count()
    }

    /// Writes a per-netns sysctl (busybox in the VMs has no `sysctl -q`).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.exec(&["sh", "-c", &format!("echo {value} > {path}")]);
    }

    /// Conntrack only runs in a netns whose ruleset uses it.
    pub fn enable_conntrack(&self) {
        self.exec(&["nft", "add", "table", "inet", "ctw"]);
        self.exec(&[
            "nft",
            "add chain inet ctw pre { type filter hook prerouting priority 0; }",
        ]);
        self.exec(&["nft", "add rule inet ctw pre ct state new counter"]);
    }

    pub fn nft(&self, cmd: &str) {
        self.exec(&["nft", cmd]);
    }

    /// The kernel's own conntrack `drop` counter in this netns, summed over CPUs.
    pub fn kernel_drops(&self) -> u64 {
        self.kernel_stat("drop")
    }

    /// Waits until the kernel's `drop` counter has risen at least `n` above
    /// `before`, and returns the rise. Inbound packets may still sit in the
    /// veth backlog when their sender exits; this counter moves in the same
    /// softirq that hands the drop to ctwatch's programs.
    pub fn drops_since(&self, before: u64, n: u64) -> u64 {
        poll_until(Duration::from_secs(10), || {
            self.kernel_drops() - before >= n
        });
        self.kernel_drops() - before
    }

    /// Packets counted so far by the `counter` rules of one chain (as
    /// `nft list chain` names it, e.g. `inet ctw in`), summed.
    pub fn nft_packets(&self, chain: &str) -> u64 {
        let listing = self.exec(&["nft", &format!("list chain {chain}")]);
        let words: Vec<&str> = listing.split_whitespace().collect();
        words
            .windows(2)
            .filter(|w| w[0] == "packets")
            .map(|w| w[1].parse::<u64>().expect("packet count"))
            .sum()
    }

    /// Packets conntrack has found new here so far: the counter of the rule
    /// [`Netns::enable_conntrack`] adds, which runs once conntrack is done
    /// with a packet (entry created, evictions made).
    pub fn new_flows(&self) -> u64 {
        self.nft_packets("inet ctw pre")
    }

    /// One field of this netns's `/proc/net/snmp` (e.g. `Udp`,
    /// `InDatagrams`): the kernel's own protocol counters.
    pub fn snmp(&self, proto: &str, field: &str) -> u64 {
        let text = self.exec(&["cat", "/proc/net/snmp"]);
        let prefix = format!("{proto}:");
        let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
        let (names, values) = (rows.next(), rows.next());
        let (Some(names), Some(values)) = (names, values) else {
            panic!("no {proto} rows in /proc/net/snmp:\n{text}");
        };
        let col = names
            .split_whitespace()
            .position(|n| n == field)
            .unwrap_or_else(|| panic!("no {field} in {names}"));
        values
            .split_whitespace()
            .nth(col)
            .expect("value")
            .parse()
            .expect("a number")
    }

    /// A counter of one of this netns's interfaces (`tx_dropped`, ...).
    pub fn link_stat(&self, dev: &str, stat: &str) -> u64 {
        self.exec(&["cat", &format!("/sys/class/net/{dev}/statistics/{stat}")])
            .trim()
            .parse()
            .expect("a number")
    }

    /// One column of this netns's `/proc/net/stat/nf_conntrack`, found by
    /// its header name and summed over CPUs: the kernel's own counter.
    pub fn kernel_stat(&self, column: &str) -> u64 {
        let text = self.exec(&["cat", "/proc/net/stat/nf_conntrack"]);
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
        let col = header
            .iter()
            .position(|h| *h == column)
            .unwrap_or_else(|| panic!("no {column} column in {header:?}"));
        lines
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                u64::from_str_radix(f[col], 16).expect("hex")
            })
            .sum()
    }

    pub fn count(&self) -> u64 {
        self.exec(&["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
            .trim()
            .parse()
            .expect("count")
    }

    /// Spawns ctpeer inside this netns.
    pub fn peer(&self, args: &[&str]) -> Peer {
        self.start_peer(None, args)
    }

    /// Runs ctpeer to completion inside this netns; returns (pid, stdout).
    pub fn peer_run(&self, args: &[&str]) -> (u32, String) {
        self.run_peer(None, args)
    }

    /// Spawns ctpeer inside this netns, a member of the cgroup v2
    /// directory `cgroup` from before its first instruction, as a
    /// container's processes are.
    pub fn peer_in_cgroup(&self, cgroup: &Path, args: &[&str]) -> Peer {
        self.start_peer(Some(cgroup), args)
    }

    /// [`Netns::peer_run`] as a member of the cgroup v2 directory `cgroup`.
    pub fn peer_run_in_cgroup(&self, cgroup: &Path, args: &[&str]) -> (u32, String) {
        self.run_peer(Some(cgroup), args)
    }

    /// ctpeer inside this netns; in `cgroup`, a shell joins it and then
    /// execs ctpeer, so no instruction of ctpeer runs outside it.
    fn ctpeer_command(&self, cgroup: Option<&Path>, args: &[&str]) -> Command {
        let mut cmd = match cgroup {
            Some(cgroup) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", "echo $$ > \"$0\" && exec \"$@\""])
                    .arg(cgroup.join("cgroup.procs"))
                    .arg("ip");
                sh
            }
            None => Command::new("ip"),
        };
        cmd.args(["netns", "exec", &self.name])
            .arg(ctpeer_bin())
            .args(args)
            .stdout(Stdio::piped());
        cmd
    }

    /// Spawns ctpeer and waits for its `ready` line: the sockets it was
    /// asked for exist once this returns.
    fn start_peer(&self, cgroup: Option<&Path>, args: &[&str]) -> Peer {
        let mut child = self
            .ctpeer_command(cgroup, args)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ctpeer");
        let pid = child.id();
        let stdout = child.stdout.take().unwrap();
        // Owned by the guard first, so a failed check below still kills it.
        let peer = Peer { child, pid };
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("ctpeer output");
        assert!(
            line.starts_with("ready"),
            "ctpeer {args:?}{} said {line:?}",
            in_cgroup(cgroup)
        );
        peer
    }

    /// [`Netns::peer_run`] pinned to one CPU: traffic it sends through a
    /// veth is then received, and dropped, on that CPU.
    pub fn peer_run_on_cpu(&self, cpu: usize, args: &[&str]) -> (u32, String) {
        use std::os::unix::process::CommandExt;
        let mut cmd = self.ctpeer_command(None, args);
        // SAFETY: only an async-signal-safe syscall between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let mut set = nix::sched::CpuSet::new();
                set.set(cpu).map_err(std::io::Error::from)?;
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                    .map_err(std::io::Error::from)
            });
        }
        Self::wait_peer(cmd, None, args)
    }

    fn run_peer(&self, cgroup: Option<&Path>, args: &[&str]) -> (u32, String) {
        Self::wait_peer(self.ctpeer_command(cgroup, args), cgroup, args)
    }

    fn wait_peer(mut cmd: Command, cgroup: Option<&Path>, args: &[&str]) -> (u32, String) {
        let child = cmd.spawn().expect("spawn ctpeer");
        let pid = child.id();
        let out = child.wait_with_output().expect("ctpeer");
        assert!(
            out.status.success(),
            "ctpeer {args:?}{} failed",
            in_cgroup(cgroup)
        );
        (pid, String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Where a ctpeer ran, for its failure messages.
fn in_cgroup(cgroup: Option<&Path>) -> String {
    cgroup.map_or_else(String::new, |c| format!(" in {c:?}"))
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A long-running ctpeer, killed on drop.
pub struct Peer {
    child: Child,
    pub pid: u32,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two namespaces joined by a veth pair: `srv` (198.18.0.1, 2001:2::1) runs
/// conntrack; `cli` (198.18.0.2, 2001:2::2) does not.
pub struct Lab {
    pub srv: Netns,
    pub cli: Netns,
    /// The veth end in `cli`.
    pub cli_dev: String,
}

impl Lab {
    pub fn new(tag: &str, ipv6: bool) -> Self {
        let srv = Netns::new(&format!("{tag}-s"));
        let cli = Netns::new(&format!("{tag}-c"));
        let (a, b) = (format!("{}a", &srv.name), format!("{}b", &cli.name));
        // veth names are limited to 15 bytes.
        let a = a[a.len().saturating_sub(15)..].to_string();
        let b = b[b.len().saturating_sub(15)..].to_string();
        sh(&[
            "ip", "link", "add", &a, "netns", &srv.name, "type", "veth", "peer", "name", &b,
            "netns", &cli.name,
        ]);
        for (ns, dev, v4, v6) in [
            (&srv, &a, "198.18.0.1/24", "2001:2::1/64"),
            (&cli, &b, "198.18.0.2/24", "2001:2::2/64"),
        ] {
            if ipv6 {
                ns.sysctl("net.ipv6.conf.all.disable_ipv6", "0");
                ns.exec(&["ip", "addr", "add", v6, "dev", dev, "nodad"]);
            } else {
                // No IPv6 chatter: the table must hold exactly what the test put there.
                ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
                ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
            }
            ns.exec(&["ip", "addr", "add", v4, "dev", dev]);
            ns.exec(&["ip", "link", "set", dev, "up"]);
        }
        srv.enable_conntrack();
        Lab {
            srv,
            cli,
            cli_dev: b,
        }
    }

    /// Fills the srv table with `n` assured (established) TCP entries, which
    /// early_drop cannot evict; returns the peers holding them.
    pub fn fill(&self, n: usize, port: u16) -> (Peer, Peer) {
        let listener = self.srv.peer(&["tcp-listen", &format!("0.0.0.0:{port}")]);
        let holder = self
            .cli
            .peer(&["tcp-hold", &format!("198.18.0.1:{port}"), &n.to_string()]);
        // The final handshake ACK may still be in flight on the veth.
        poll_until(Duration::from_secs(5), || self.srv.count() >= n as u64);
        assert_eq!(self.srv.count(), n as u64, "table not filled to {n}");
        (listener, holder)
    }
}

/// Sets the global `nf_conntrack_max` and restores it on drop. Tests that
/// use it must run serially (`--test-threads=1`).
pub struct MaxGuard {
    old: String,
    /// Held for the guard's life: concurrent test runs (two suites, or two
    /// engineers) wait here instead of restoring each other's values.
    _lock: std::fs::File,
}

const MAX_PATH: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

impl MaxGuard {
    pub fn set(max: u64) -> Self {
        use std::os::fd::AsRawFd;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/ctwatch-test-max.lock")
            .expect("open the nf_conntrack_max lock");
        // SAFETY: flock on an fd we own; released when the file closes,
        // after Drop has restored the old value.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        let old = std::fs::read_to_string(MAX_PATH).expect("read nf_conntrack_max");
        std::fs::write(MAX_PATH, max.to_string()).expect("write nf_conntrack_max");
        MaxGuard {
            old: old.trim().to_string(),
            _lock: lock,
        }
    }
}

impl Drop for MaxGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(MAX_PATH, &self.old) {
            eprintln!("FAILED to restore nf_conntrack_max to {}: {e}", self.old);
        }
    }
}

/// A running `ctwatch` that has attached (its banner was printed).
pub struct Ctwatch {
    pub pid: u32,
    child: Option<Child>,
    stderr: mpsc::Receiver<String>,
    /// Read as it comes, so a test can wait on what ctwatch prints and a
    /// chatty run never blocks on a full pipe.
    stdout: mpsc::Receiver<String>,
    /// What has been taken off `stdout` so far.
    out: String,
    pub banner: String,
}

/// Forwards `from` line by line (newline kept) until it closes.
fn lines_of(from: impl Read + Send + 'static, echo: bool) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).into_owned();
            if echo {
                eprintln!("[ctwatch] {line}");
            }
            if tx.send(line + "\n").is_err() {
                break;
            }
        }
    });
    rx
}

impl Ctwatch {
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(ctwatch_bin())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ctwatch");
        let stderr = lines_of(child.stderr.take().unwrap(), true);
        let stdout = lines_of(child.stdout.take().unwrap(), false);
        let mut w = Ctwatch {
            pid: child.id(),
            child: Some(child),
            stderr,
            stdout,
            out: String::new(),
            banner: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match w.stderr.recv_timeout(left) {
                Ok(l) if l.contains(" mode on kernel ") => {
                    w.banner = l.trim_end().to_string();
                    break;
                }
                Ok(_) => continue,
                Err(_) => {
                    let status = w.child.as_mut().unwrap().try_wait();
                    panic!("ctwatch did not attach within 30 s (status {status:?})");
                }
            }
        }
        w
    }

    /// Asserts the banner says ctwatch runs in `mode` with every program
    /// of [`required_programs`] attached: a zero total is evidence only
    /// when the programs that would have counted were there.
    pub fn assert_attached(&self, mode: &str) {
        assert_attached(&self.banner, mode);
    }

    /// Waits until what ctwatch printed on stdout so far satisfies `ok`;
    /// whether it did within `within`.
    pub fn stdout_until(&mut self, within: Duration, mut ok: impl FnMut(&str) -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if ok(&self.out) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => self.out.push_str(&line),
                Err(_) => return false,
            }
        }
    }

    /// Sends SIGINT (as Ctrl-C would) and returns (exit code, stdout).
    pub fn stop(self) -> (i32, String) {
        self.stop_with(libc::SIGINT)
    }

    pub fn stop_with(mut self, signal: i32) -> (i32, String) {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        (status.code().unwrap_or(-1), self.rest_of_stdout())
    }

    /// Waits for ctwatch to exit by itself (its window ran out) and
    /// returns (exit code, stdout); panics after `within`.
    pub fn wait_exit(mut self, within: Duration) -> (i32, String) {
        let mut child = self.child.take().unwrap();
        let exited = poll_until(within, || child.try_wait().is_ok_and(|s| s.is_some()));
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ctwatch did not exit by itself within {within:?}");
        }
        let status = child.wait().unwrap();
        (status.code().unwrap_or(-1), self.rest_of_stdout())
    }

    /// Everything printed on stdout, once the process is gone.
    fn rest_of_stdout(&mut self) -> String {
        // The reader thread ends, closing the channel, at end of file.
        for line in self.stdout.iter() {
            self.out.push_str(&line);
        }
        std::mem::take(&mut self.out)
    }

    /// Stops a `report --json` run and parses its document.
    pub fn report(self) -> Value {
        json_document(self.stop())
    }
}

/// The document of a `--json` run that ended with (code, stdout).
pub fn json_document((code, out): (i32, String)) -> Value {
    assert_eq!(code, 0, "ctwatch exited with {code}: {out}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

/// conntrack-user's table of attach points, built into the test binaries:
/// they also run inside VMs, away from the source tree.
const COMPAT_RS: &str = include_str!("../../conntrack-user/src/kernel/compat.rs");

/// The programs ctwatch cannot run `mode` without: the `required` entries
/// of the `PROBES` table in conntrack-user's kernel/compat.rs, read from
/// the source so the tests follow the table as it changes.
pub fn required_programs(mode: &str) -> Vec<String> {
    let (_, table) = COMPAT_RS
        .split_once("pub const PROBES")
        .expect("a PROBES table in compat.rs");
    let table = table.split_once("\n];").map_or(table, |(t, _)| t);
    let mut out = Vec::new();
    for entry in table.split("spec(").skip(1) {
        let args = call_args(entry);
        let [program, entry_mode, _, _, required, ..] = args.as_slice() else {
            panic!("compat.rs: cannot read spec({entry}");
        };
        if entry_mode.eq_ignore_ascii_case(mode) && required == "true" {
            out.push(program.trim_matches('"').to_string());
        }
    }
    assert!(
        !out.is_empty(),
        "compat.rs lists no required program for {mode} mode"
    );
    out
}

/// The comma-separated arguments of a call whose opening parenthesis has
/// just been read, up to its closing one.
fn call_args(text: &str) -> Vec<String> {
    let (mut args, mut arg) = (Vec::new(), String::new());
    let (mut depth, mut quoted) = (1, false);
    for ch in text.chars() {
        match ch {
            '"' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if !quoted && depth == 1 => {
                args.push(std::mem::take(&mut arg).trim().to_string());
                continue;
            }
            _ => {}
        }
        arg.push(ch);
    }
    if !arg.trim().is_empty() {
        args.push(arg.trim().to_string());
    }
    args
}

/// Asserts a banner (`ctwatch: MODE mode on kernel X (attached: a, b)`)
/// names `mode` and every program [`required_programs`] lists for it.
pub fn assert_attached(banner: &str, mode: &str) {
    assert!(
        banner.contains(&format!("ctwatch: {mode} mode on kernel ")),
        "not in {mode} mode: {banner}"
    );
    let attached: Vec<&str> = banner
        .split_once("(attached: ")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(list, _)| list.split(", ").collect())
        .unwrap_or_default();
    for program in required_programs(mode) {
        assert!(
            attached.contains(&program.as_str()),
            "{program} is not attached: {banner}"
        );
    }
}

impl Drop for Ctwatch {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `ctwatch report --json` narrowed to `ns`, in `mode`, started and
/// attached; its window is long, the test stops it (`Ctwatch::report`).
pub fn start_report(ns: &Netns, mode: &str) -> Ctwatch {
    Ctwatch::start(&[
        "report",
        "--mode",
        mode,
        "--duration",
        "120",
        "--json",
        "--netns",
        &ns.name,
    ])
}

/// Runs ctwatch to completion with the given arguments: (code, stdout, stderr).
pub fn ctwatch_once(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(ctwatch_bin())
        .args(args)
        .output()
        .expect("ctwatch");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs ctwatch to completion as uid/gid 65534 with no supplementary
/// groups: (code, stdout, stderr). No capability survives that exec, so
/// this is ctwatch as an unprivileged user starts it.
pub fn ctwatch_as_nobody(args: &[&str]) -> (i32, String, String) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    let out = unsafe {
        Command::new(ctwatch_bin())
            .args(args)
            .pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
            .output()
            .expect("run ctwatch as nobody")
    };
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ctwatch serve --listen addr` narrowed to `ns`, in the mode under test,
/// started and attached. It refreshes every second, so a test waits about
/// a second for what it did to show in a scrape. `extra` adds flags
/// (`--top K`).
pub fn start_serve(ns: &Netns, addr: &str, extra: &[&str]) -> Ctwatch {
    let mode = mode();
    let mut args = vec![
        "serve",
        "--listen",
        addr,
        "--interval",
        "1",
        "--mode",
        &mode,
        "--netns",
        &ns.name,
    ];
    args.extend_from_slice(extra);
    Ctwatch::start(&args)
}

/// A loopback address (`127.0.0.1:PORT`) that nothing listens on now, for
/// `serve --listen`: suites and engineers run side by side on one host, so
/// a fixed port may be taken. The probe listener is closed on return, so
/// the port is free for ctwatch to bind.
pub fn free_loopback_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").to_string()
}

/// An HTTP answer as it came off the connection.
#[derive(Debug)]
pub struct HttpAnswer {
    /// 0 where the status line did not parse.
    pub status: u32,
    /// The status line and headers.
    pub head: String,
    pub body: String,
}

/// Sends one `method path` request to `addr` on a fresh connection and
/// reads the answer to its end; panics if the connection fails or a read
/// or write waits longer than `within`. Plain std sockets rather than an
/// HTTP client: the VMs' busybox userland has no curl, and the hostile
/// tests must know exactly what was sent. `Connection: close` makes the
/// end of the answer the end of the connection.
pub fn http_exchange(addr: &str, method: &str, path: &str, within: Duration) -> HttpAnswer {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(within)).expect("read timeout");
    s.set_write_timeout(Some(within)).expect("write timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw) {
        panic!("{method} {path}: no complete answer within {within:?}: {e}");
    }
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    HttpAnswer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// How long one read of a scrape may wait. ctwatch answers from its latest
/// sample at once; this only keeps a hung server from hanging the test.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Scrapes `/metrics` of the `ctwatch serve` at `addr` (`127.0.0.1:PORT`),
/// asserting it answers 200: the exposition text. Tests that read the
/// exporter's numbers use this, on the host and in the VMs alike; those
/// whose point is a real client use [`curl`].
pub fn scrape_metrics(addr: &str) -> String {
    let answer = http_exchange(addr, "GET", "/metrics", SCRAPE_TIMEOUT);
    assert_eq!(answer.status, 200, "GET /metrics at {addr}: {answer:?}");
    answer.body
}

/// Scrapes `addr` until `unmet` finds nothing missing in the exposition,
/// for up to `within` (the exporter refreshes on its own clock), then
/// fails with what is still missing and the last scrape.
pub fn scrape_until(addr: &str, within: Duration, unmet: impl Fn(&str) -> Vec<String>) {
    let mut text = String::new();
    poll_until(within, || {
        text = scrape_metrics(addr);
        unmet(&text).is_empty()
    });
    let problems = unmet(&text);
    assert!(
        problems.is_empty(),
        "{}\n--- scrape ---\n{text}",
        problems.join("\n")
    );
}

/// The value of the first sample of `name` in an exposition whose labels
/// contain every one of `labels`, each written as in the exposition
/// (`key="value"`); None where no sample has them all.
pub fn metric_value(exposition: &str, name: &str, labels: &[&str]) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Runs curl with `args` (a URL and any flags): (HTTP status, body), or
/// None where curl is not installed. For tests that must see ctwatch (or
/// Prometheus) as a real HTTP client does.
pub fn curl(args: &[&str]) -> Option<(u32, String)> {
    let out = match Command::new("curl")
        .args(["-s", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("curl: {e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Some((code.trim().parse().unwrap_or(0), body.to_string()))
}

/// A file of the repository's `deploy/` folder. The fleet files are read
/// from the source tree the tests were built in: only the host suite reads
/// them, and it runs in that tree.
pub fn deploy_path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

fn deploy_file(file: &str) -> String {
    let path = deploy_path(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of `deploy/daemonset.yaml`.
pub fn deploy_manifests() -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    let text = deploy_file("daemonset.yaml");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("daemonset.yaml: {e}"))
        })
        .filter(|d| !d.is_null())
        .collect()
}

/// The DaemonSet of `deploy/daemonset.yaml`.
pub fn deploy_daemonset() -> serde_yaml::Value {
    deploy_manifests()
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet in daemonset.yaml")
}

/// `deploy/grafana-dashboard.json`, the dashboard fleets import: its
/// queries are checked against what `serve` exports.
pub fn dashboard() -> Value {
    serde_json::from_str(&deploy_file("grafana-dashboard.json")).expect("dashboard JSON")
}

/// Every panel of a dashboard, rows' nested panels included.
pub fn dashboard_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// Row of a report's `netns` list for this inode.
pub fn netns_row(report: &Value, inum: u64) -> &Value {
    report["netns"]
        .as_array()
        .expect("netns list")
        .iter()
        .find(|r| r["inum"].as_u64() == Some(inum))
        .unwrap_or_else(|| panic!("netns {inum} missing from report: {report}"))
}

/// IDs of the BPF programs a process holds open (from its fds' fdinfo), so
/// a check is not confused by other ctwatch instances running at once.
pub fn programs_held_by(pid: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for e in dir.flatten() {
        if let Ok(info) = std::fs::read_to_string(e.path()) {
            for line in info.lines() {
                if let Some(id) = line.strip_prefix("prog_id:") {
                    if let Ok(id) = id.trim().parse() {
                        ids.push(id);
                    }
                }
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Every loaded program, as `bpftool prog show` describes it. A failed
/// bpftool fails the test: an empty listing would pass every "nothing
/// left" check.
fn bpftool_programs() -> Vec<Value> {
    let out = Command::new("bpftool")
        .args(["--json", "prog", "show"])
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "bpftool prog show: {out:?}");
    let progs: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    progs.as_array().expect("a program list").clone()
}

fn has_id(p: &Value, id: u32) -> bool {
    p["id"].as_u64() == Some(u64::from(id))
}

/// Which of these program IDs bpftool still lists.
pub fn still_loaded(ids: &[u32]) -> Vec<u32> {
    let progs = bpftool_programs();
    ids.iter()
        .copied()
        .filter(|id| progs.iter().any(|p| has_id(p, *id)))
        .collect()
}

/// (major, minor) of the running kernel.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse().expect("release number"));
    (it.next().expect("major"), it.next().expect("minor"))
}

/// What `bpftool prog show` says of each program in `ids`, in that order.
/// Read it while the programs' holder runs: each must be listed.
pub fn programs_info(ids: &[u32]) -> Vec<Value> {
    let progs = bpftool_programs();
    ids.iter()
        .map(|id| {
            progs
                .iter()
                .find(|p| has_id(p, *id))
                .unwrap_or_else(|| panic!("program {id} is not loaded"))
                .clone()
        })
        .collect()
}

/// Runs the kernel skipped (its `recursion_misses`) of the programs in
/// `ids`, summed: bpftool leaves the field out while it is 0, and before
/// 5.12.
pub fn runs_skipped(ids: &[u32]) -> u64 {
    programs_info(ids)
        .iter()
        .map(|p| p["recursion_misses"].as_u64().unwrap_or(0))
        .sum()
}

/// The loaded BPF programs named like ctwatch's, as bpftool describes them.
pub fn ctwatch_programs() -> Vec<Value> {
    bpftool_programs()
        .into_iter()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("ctw_")))
        .collect()
}

impl Ctwatch {
    /// Stops ctwatch with SIGINT and returns (exit code, stdout, peak RSS
    /// in bytes). The peak is the kernel's own accounting of the child
    /// (`ru_maxrss` from wait4: its VmHWM when it exited), so memory taken
    /// while building the final report counts too.
    pub fn stop_with_peak_rss(mut self) -> (i32, String, u64) {
        let child = self.child.take().unwrap();
        let pid = child.id() as libc::pid_t;
        unsafe { libc::kill(pid, libc::SIGINT) };
        let mut status = 0;
        // SAFETY: plain out-parameters; wait4 reaps our own child, and the
        // `Child` handle is dropped below without waiting on it again.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            if rc == pid {
                break;
            }
            let err = std::io::Error::last_os_error();
            assert_eq!(err.kind(), std::io::ErrorKind::Interrupted, "wait4: {err}");
        }
        drop(child);
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        };
        let peak = usage.ru_maxrss as u64 * 1024;
        (code, self.rest_of_stdout(), peak)
    }
}

/// `VmHWM` of a running process, in bytes: the peak resident set so far.
pub fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attach_table_is_read_and_banners_checked_against_it() {
        let banner = |mode: &str, programs: &[String]| {
            format!(
                "ctwatch: {mode} mode on kernel 6.1.0 (attached: {}); reporting",
                programs.join(", ")
            )
        };
        for mode in ["kprobe", "tracepoint"] {
            let programs = required_programs(mode);
            assert!(
                programs.iter().all(|p| p.starts_with("ctw_")),
                "{mode}: {programs:?}"
            );
            assert_attached(&banner(mode, &programs), mode);
            let one_short = banner(mode, &programs[1..]);
            assert!(std::panic::catch_unwind(|| assert_attached(&one_short, mode)).is_err());
        }
    }
}
