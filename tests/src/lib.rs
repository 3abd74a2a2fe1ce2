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
        Lab { srv, cli }
    }

    /// Fills the srv table with `n` assured (established) TCP entries, which
    /// early_drop cannot evict; returns the peers holding them.
    pub fn fill(&self, n: usize, port: u16) -> (Peer, Peer) {
        let listener = self.srv.peer(&["tcp-listen", &format!("0.0.0.0:{port}")]);
        let holder = self
            .cli
            .peer(&["tcp-hold", &format!("198.18.0.1:{port}"), &n.to_string()]);
        // The final handshake ACK may still be in flight on the veth.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.srv.count() < n as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
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
    pub banner: String,
}

impl Ctwatch {
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(ctwatch_bin())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ctwatch");
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[ctwatch] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut w = Ctwatch {
            pid: child.id(),
            child: Some(child),
            stderr: rx,
            banner: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match w.stderr.recv_timeout(left) {
                Ok(l) if l.contains(" mode on kernel ") => {
                    w.banner = l;
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

    /// Sends SIGINT (as Ctrl-C would) and returns (exit code, stdout).
    pub fn stop(self) -> (i32, String) {
        self.stop_with(libc::SIGINT)
    }

    pub fn stop_with(mut self, signal: i32) -> (i32, String) {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, signal) };
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let status = child.wait().unwrap();
        (status.code().unwrap_or(-1), out)
    }

    /// Stops a `report --json` run and parses its document.
    pub fn report(self) -> Value {
        let (code, out) = self.stop();
        assert_eq!(code, 0, "ctwatch exited with {code}: {out}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
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

/// Lets the last packets and ring-buffer records land before stopping.
pub fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}
