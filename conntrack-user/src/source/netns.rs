//! Network namespaces: finding every one on the host, naming them, and
//! running code inside one.
//!
//! Entering a namespace happens on a short-lived helper thread only, so the
//! caller's threads (a tokio runtime, the BPF loader, ...) always stay in the
//! netns they started in.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

/// Where `ip netns add` bind-mounts named namespaces.
pub const NAMED_NETNS_DIR: &str = "/run/netns";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NetnsInfo {
    /// `net->ns.inum`, the inode number of the nsfs file.
    pub inum: u32,
    /// The `ip netns` name, when the namespace is bind-mounted in /run/netns.
    pub name: Option<String>,
    /// A file to `setns()` into: /run/netns/NAME, /proc/PID/ns/net or
    /// /proc/PID/task/TID/ns/net. A /proc path lives only as long as that
    /// task does.
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot list {path}: {source}; mount procfs at /proc")]
    ProcUnreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no network namespace matches '{spec}'; give an `ip netns` name or an inode number from `lsns -t net`")]
    NotFound { spec: String },
    #[error("network namespace {inum} is gone ({path} no longer refers to it); list the current ones again")]
    Vanished { inum: u32, path: PathBuf },
    #[error("cannot open {path}: {source}; run as root to reach other processes' namespaces")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter network namespace {inum}: {source}; entering needs CAP_SYS_ADMIN (run as root)")]
    Enter {
        inum: u32,
        #[source]
        source: nix::Error,
    },
    #[error("cannot start a thread to enter network namespace {inum}: {source}; the process is out of threads or memory")]
    Thread {
        inum: u32,
        #[source]
        source: io::Error,
    },
}

/// Every network namespace on the host that a process, a thread or an
/// `ip netns` bind mount keeps alive, sorted by inode number.
///
/// Namespaces held only by an open file descriptor or a socket are invisible
/// here: nothing in /proc names them without walking every fd.
pub fn list() -> Result<Vec<NetnsInfo>, NetnsError> {
    let mut found: HashMap<u32, (Rank, NetnsInfo)> = HashMap::new();
    let mut offer = |rank: Rank, info: NetnsInfo| match found.get(&info.inum) {
        Some((have, _)) if *have <= rank => {}
        _ => {
            found.insert(info.inum, (rank, info));
        }
    };

    for (name, inum) in named() {
        offer(
            Rank::Named(name.clone()),
            NetnsInfo {
                inum,
                path: Path::new(NAMED_NETNS_DIR).join(&name),
                name: Some(name),
            },
        );
    }

    let proc_dir = fs::read_dir("/proc").map_err(|source| NetnsError::ProcUnreadable {
        path: "/proc".into(),
        source,
    })?;
    for entry in proc_dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Every error below means the task exited mid-scan, or we may not
        // look at it: either way it has nothing to offer.
        let ns_path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        if let Ok(inum) = inum_of(&ns_path) {
            offer(
                Rank::Process(pid),
                NetnsInfo {
                    inum,
                    name: None,
                    path: ns_path,
                },
            );
        }
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if tid == pid {
                continue;
            }
            let ns_path = PathBuf::from(format!("/proc/{pid}/task/{tid}/ns/net"));
            if let Ok(inum) = inum_of(&ns_path) {
                offer(
                    Rank::Thread(pid, tid),
                    NetnsInfo {
                        inum,
                        name: None,
                        path: ns_path,
                    },
                );
            }
        }
    }

    let mut all: Vec<NetnsInfo> = found.into_values().map(|(_, info)| info).collect();
    all.sort_by_key(|ns| ns.inum);
    Ok(all)
}

/// Finds a namespace by `ip netns` name, by inode number, or by the
/// `net:[INUM]` form that `readlink /proc/PID/ns/net` prints.
pub fn resolve(spec: &str) -> Result<NetnsInfo, NetnsError> {
    let spec = spec.trim();
    let not_found = || NetnsError::NotFound { spec: spec.into() };
    if spec.is_empty() {
        return Err(not_found());
    }
    // A name wins over a number: `ip netns add 42` is legal.
    if !spec.contains('/') && spec != "." && spec != ".." {
        let path = Path::new(NAMED_NETNS_DIR).join(spec);
        if let Some(inum) = live_named(&path) {
            return Ok(NetnsInfo {
                inum,
                name: Some(spec.into()),
                path,
            });
        }
    }
    let digits = spec
        .strip_prefix("net:[")
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(spec);
    let inum: u32 = digits.parse().map_err(|_| not_found())?;
    list()?
        .into_iter()
        .find(|ns| ns.inum == inum)
        .ok_or_else(not_found)
}

/// Runs `f` inside `ns` on a short-lived thread and returns its result.
///
/// Only that thread calls `setns(CLONE_NEWNET)`; the caller's threads never
/// move. Inside `f`, per-netns files must be read through
/// `/proc/thread-self/net/...` (`/proc/self/net` follows the main thread),
/// and sockets opened there stay in `ns` after the thread exits.
/// A panic in `f` is resumed on the caller's thread.
pub fn run_in<T: Send + 'static>(
    ns: &NetnsInfo,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let file = open_ns(ns)?;
    let inum = ns.inum;
    let handle = std::thread::Builder::new()
        .name("ctwatch-netns".into())
        .spawn(move || -> Result<T, NetnsError> {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|source| NetnsError::Enter { inum, source })?;
            drop(file);
            Ok(f())
        })
        .map_err(|source| NetnsError::Thread { inum, source })?;
    match handle.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Opens the namespace file and checks it still is the same namespace: a
/// /proc/PID path outlives nothing, and a reused PID would silently lead
/// into someone else's netns.
fn open_ns(ns: &NetnsInfo) -> Result<File, NetnsError> {
    let vanished = || NetnsError::Vanished {
        inum: ns.inum,
        path: ns.path.clone(),
    };
    let file = match File::open(&ns.path) {
        Ok(f) => f,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => {
            return Err(vanished())
        }
        Err(source) => {
            return Err(NetnsError::Open {
                path: ns.path.clone(),
                source,
            })
        }
    };
    let meta = file.metadata().map_err(|source| NetnsError::Open {
        path: ns.path.clone(),
        source,
    })?;
    if meta.ino() as u32 != ns.inum || !is_netns_file(&file) {
        return Err(vanished());
    }
    Ok(file)
}

/// Which path to keep when several lead to one namespace: a name first
/// (stable and human), then the lowest PID (init's netns gets /proc/1),
/// then a thread.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    Named(String),
    Process(u32),
    Thread(u32, u32),
}

fn inum_of(path: &Path) -> io::Result<u32> {
    fs::metadata(path).map(|m| m.ino() as u32)
}

/// Live `ip netns` names with their inode numbers. A name whose bind mount
/// is gone (an empty file left behind) is skipped.
fn named() -> Vec<(String, u32)> {
    let Ok(dir) = fs::read_dir(NAMED_NETNS_DIR) else {
        return Vec::new();
    };
    let mut out: Vec<(String, u32)> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let inum = live_named(&e.path())?;
            Some((name, inum))
        })
        .collect();
    out.sort();
    out
}

fn live_named(path: &Path) -> Option<u32> {
    let file = File::open(path).ok()?;
    if !is_netns_file(&file) {
        return None;
    }
    file.metadata().ok().map(|m| m.ino() as u32)
}

/// True for an nsfs file of a network namespace. Kernels before 4.11 lack
/// NS_GET_NSTYPE; there an nsfs file is taken on trust.
fn is_netns_file(file: &File) -> bool {
    match fstatfs(file) {
        Ok(st) if st.filesystem_type() == NSFS_MAGIC => {}
        _ => return false,
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only returns a value; the
    // fd is valid for the duration of the call because `file` is borrowed.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) };
    kind < 0 || kind == libc::CLONE_NEWNET
}

/// Scaffolding for root-only tests in this crate: throwaway named
/// namespaces that are deleted even when a test panics.
#[cfg(test)]
pub(crate) mod testutil {
    /// Inode of the calling thread's network namespace, or 0 if /proc is missing.
    ///
    /// thread-self rather than self: inside [`run_in`] the helper thread is in a
    /// different netns from the main thread.
    pub(crate) fn self_inum() -> u32 {
        fs::metadata("/proc/thread-self/ns/net")
            .or_else(|_| fs::metadata("/proc/self/ns/net"))
            .map(|m| m.ino() as u32)
            .unwrap_or(0)
    }

    use super::*;
    use std::process::{Command, Output, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Says why `test` cannot run here and returns false, so the test can
    /// return early; under CI (`CI=true`, read as `cargo xtask test` reads
    /// it) it panics with the same reason instead, because there a skipped
    /// root-only test would pass without having run.
    pub(crate) fn skip_or_fail(test: &str, why: &str) -> bool {
        if matches!(std::env::var("CI").as_deref(), Ok("true" | "1")) {
            panic!("{test} cannot run under CI=true: {why}");
        }
        eprintln!("skipping {test}: {why}");
        false
    }

    /// Returns false, after saying why, when the test cannot run here.
    pub fn can_run(test: &str, tools: &[&str]) -> bool {
        if !nix::unistd::geteuid().is_root() {
            return skip_or_fail(test, "needs root (creates network namespaces)");
        }
        for tool in tools {
            let ok = Command::new(tool)
                .arg(if *tool == "ip" { "-V" } else { "--version" })
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                let package = match *tool {
                    "ip" => "iproute2",
                    "nft" => "nftables",
                    other => other,
                };
                return skip_or_fail(
                    test,
                    &format!("`{tool}` is not installed (apt-get install {package})"),
                );
            }
        }
        true
    }

    pub struct TestNetns {
        pub name: String,
        pub info: NetnsInfo,
    }

    impl TestNetns {
        /// `ip netns add` with a name unique to this process and call, and
        /// loopback brought up.
        pub fn new(tag: &str) -> TestNetns {
            static SEQ: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "ctwatch-t-{tag}-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            );
            run(&["ip", "netns", "add", &name]);
            // From here on Drop cleans up, even if a later step panics.
            let mut ns = TestNetns {
                name: name.clone(),
                info: NetnsInfo {
                    inum: 0,
                    name: None,
                    path: PathBuf::new(),
                },
            };
            ns.info = resolve(&name).expect("freshly added netns resolves");
            run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
            ns
        }

        /// Runs a command inside the namespace; panics if it fails.
        pub fn exec(&self, args: &[&str]) -> Output {
            let mut full = vec!["ip", "netns", "exec", &self.name];
            full.extend_from_slice(args);
            run(&full)
        }

        /// Conntrack only tracks a netns once some rule there needs it.
        pub fn enable_conntrack(&self) {
            self.exec(&["nft", "add", "table", "inet", "t"]);
            self.exec(&[
                "nft",
                "add",
                "chain",
                "inet",
                "t",
                "c",
                "{ type filter hook prerouting priority 0; }",
            ]);
            self.exec(&[
                "nft", "add", "rule", "inet", "t", "c", "ct", "state", "new", "counter",
            ]);
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    pub fn run(args: &[&str]) -> Output {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn rank_prefers_names_then_low_pids() {
        assert!(Rank::Named("z".into()) < Rank::Process(1));
        assert!(Rank::Process(1) < Rank::Process(2));
        assert!(Rank::Process(99999) < Rank::Thread(1, 2));
    }

    #[test]
    fn unknown_specs_are_refused() {
        for spec in ["", "no-such-netns-for-ctwatch", "../etc", "net:[1]", "1"] {
            match resolve(spec) {
                Err(NetnsError::NotFound { .. }) => {}
                other => panic!("{spec:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn own_netns_is_listed() {
        let me = self_inum();
        assert_ne!(me, 0);
        let all = list().unwrap();
        assert!(all.iter().any(|ns| ns.inum == me), "{all:?}");
        let by_num = resolve(&me.to_string()).unwrap();
        assert_eq!(by_num.inum, me);
        assert_eq!(resolve(&format!("net:[{me}]")).unwrap().inum, me);
    }

    #[test]
    fn root_named_netns_list_resolve_and_enter() {
        if !can_run("root_named_netns_list_resolve_and_enter", &["ip"]) {
            return;
        }
        let ns = TestNetns::new("ns");
        let me = self_inum();
        assert_ne!(ns.info.inum, me);
        assert_eq!(ns.info.name.as_deref(), Some(ns.name.as_str()));

        let listed = list().unwrap();
        let entry = listed
            .iter()
            .find(|n| n.inum == ns.info.inum)
            .expect("listed");
        assert_eq!(entry.name.as_deref(), Some(ns.name.as_str()));
        assert_eq!(resolve(&ns.info.inum.to_string()).unwrap(), ns.info);

        let inside = run_in(&ns.info, self_inum).unwrap();
        assert_eq!(inside, ns.info.inum);
        // The helper thread read its own netns; /proc/thread-self/net shows
        // that netns's devices, not ours.
        let devs = run_in(&ns.info, || {
            fs::read_to_string("/proc/thread-self/net/dev").unwrap()
        })
        .unwrap();
        assert!(devs.contains("lo:"));
        assert_eq!(self_inum(), me, "caller thread must not move");

        let stale = NetnsInfo {
            inum: ns.info.inum.wrapping_add(1),
            ..ns.info.clone()
        };
        assert!(matches!(
            run_in(&stale, || ()),
            Err(NetnsError::Vanished { .. })
        ));
    }

    #[test]
    fn root_process_netns_found_without_name() {
        if !can_run("root_process_netns_found_without_name", &["ip", "sleep"]) {
            return;
        }
        // A child in a new, unnamed netns: only /proc can find it.
        let mut child = std::process::Command::new("unshare")
            .args(["--net", "sleep", "30"])
            .spawn();
        let Ok(ref mut child) = child else {
            skip_or_fail(
                "root_process_netns_found_without_name",
                "`unshare` is not installed",
            );
            return;
        };
        struct Kill<'a>(&'a mut std::process::Child);
        impl Drop for Kill<'_> {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let pid = child.id();
        let guard = Kill(child);
        let path = format!("/proc/{pid}/ns/net");
        // unshare(1) forks nothing: the child's own pid moves to the new
        // netns a moment after spawn, so wait for that.
        let mut inum = 0;
        for _ in 0..100 {
            inum = inum_of(Path::new(&path)).unwrap_or(0);
            if inum != 0 && inum != self_inum() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_ne!(inum, self_inum(), "child never entered a new netns");
        let found = resolve(&inum.to_string()).unwrap();
        assert_eq!(found.name, None);
        assert_eq!(run_in(&found, self_inum).unwrap(), inum);
        drop(guard);
        // The netns dies with its only process.
        let mut gone = false;
        for _ in 0..100 {
            if !list().unwrap().iter().any(|n| n.inum == inum) {
                gone = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(gone, "netns {inum} still listed after its process died");
        assert!(matches!(
            run_in(&found, || ()),
            Err(NetnsError::Vanished { .. })
        ));
    }
}
