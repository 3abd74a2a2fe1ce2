//! Harness for the privileged integration tests: namespaces with veth
//! pairs, a guarded `nf_conntrack_max`, traffic peers, and a ctwatch child.
//!
//! Every guard cleans up in `Drop`, so a failing assertion (a panic) still
//! deletes namespaces, kills peers and restores the global max.
use std::{
    io::{BufRead, BufReader, Read},
    path::PathBuf,
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
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(ctpeer_bin())
            .args(args)
            .stdout(Stdio::piped())
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
        assert!(line.starts_with("ready"), "ctpeer {args:?} said {line:?}");
        peer
    }

    /// Runs ctpeer to completion inside this netns; returns (pid, stdout).
    pub fn peer_run(&self, args: &[&str]) -> (u32, String) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(ctpeer_bin())
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn ctpeer");
        let pid = child.id();
        let out = child.wait_with_output().expect("ctpeer");
        assert!(out.status.success(), "ctpeer {args:?} failed");
        (pid, String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Netns {
    /// Spawns ctpeer inside this netns, a member of the cgroup v2
    /// directory `cgroup` from before its first instruction, as a
    /// container's processes are: a shell joins it, then execs ctpeer.
    pub fn peer_in_cgroup(&self, cgroup: &std::path::Path, args: &[&str]) -> Peer {
        let mut child = Command::new("sh")
            .args(["-c", "echo $$ > \"$0\" && exec \"$@\""])
            .arg(cgroup.join("cgroup.procs"))
            .args(["ip", "netns", "exec", &self.name])
            .arg(ctpeer_bin())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ctpeer");
        let pid = child.id();
        let stdout = child.stdout.take().unwrap();
        let peer = Peer { child, pid };
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("ctpeer output");
        assert!(
            line.starts_with("ready"),
            "ctpeer {args:?} in {cgroup:?} said {line:?}"
        );
        peer
    }

    /// [`Netns::peer_run`] as a member of the cgroup v2 directory `cgroup`.
    pub fn peer_run_in_cgroup(&self, cgroup: &std::path::Path, args: &[&str]) -> (u32, String) {
        let child = Command::new("sh")
            .args(["-c", "echo $$ > \"$0\" && exec \"$@\""])
            .arg(cgroup.join("cgroup.procs"))
            .args(["ip", "netns", "exec", &self.name])
            .arg(ctpeer_bin())
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn ctpeer");
        let pid = child.id();
        let out = child.wait_with_output().expect("ctpeer");
        assert!(out.status.success(), "ctpeer {args:?} in {cgroup:?} failed");
        (pid, String::from_utf8_lossy(&out.stdout).into_owned())
    }
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

/// Which of these program IDs `bpftool prog list` still shows.
pub fn still_loaded(ids: &[u32]) -> Vec<u32> {
    let out = Command::new("bpftool").args(["prog", "list"]).output();
    let Ok(out) = out else { return vec![] };
    let text = String::from_utf8_lossy(&out.stdout);
    ids.iter()
        .copied()
        .filter(|id| text.lines().any(|l| l.starts_with(&format!("{id}: "))))
        .collect()
}

/// IDs of loaded BPF programs whose name matches one of ctwatch's.
pub fn ctwatch_programs() -> Vec<String> {
    let out = Command::new("bpftool").args(["prog", "list"]).output();
    let Ok(out) = out else { return vec![] };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" name ctw_"))
        .map(str::to_string)
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
