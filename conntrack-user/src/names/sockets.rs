//! Who owns a socket, and who listens on a port, with caches cheap enough
//! to consult once per event.
//!
//! Every table here is rebuilt only on a miss, and at most once per
//! [`REFRESH`]: a flood of events about a process that has already exited
//! costs one /proc scan per interval, not one per event. Hits are trusted
//! for up to [`MAX_AGE`] before a rebuild, so a closed socket's owner may
//! be reported that long after the fact.

use std::collections::HashMap;
use std::fs;
use std::io::Cursor;
use std::time::{Duration, Instant};

use procfs::net::{TcpNetEntries, TcpState, UdpNetEntries};
use procfs::process::FDTarget;
use procfs::FromBufReadSI;

use crate::source::netns::{self, NetnsError, NetnsInfo};

/// Minimum time between two rebuilds of one table.
pub const REFRESH: Duration = Duration::from_millis(500);
/// Oldest a table may get before a lookup rebuilds it even on a hit.
pub const MAX_AGE: Duration = Duration::from_secs(5);
/// A netns's tables are dropped after this long without a rebuild.
const FORGET: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Owner {
    pub pid: u32,
    pub comm: String,
}

#[derive(Debug, Default)]
pub struct Sockets {
    /// Socket inode -> lowest PID holding it (a forked server's parent).
    sockets: HashMap<u64, u32>,
    sockets_at: Option<Instant>,
    /// Emptied with `sockets`, since PIDs get reused.
    comms: HashMap<u32, String>,
    /// Per netns inum.
    ports: HashMap<u32, PortTable>,
    netns: HashMap<u32, NetnsInfo>,
    netns_at: Option<Instant>,
    proc_scans: u64,
}

#[derive(Debug)]
struct PortTable {
    at: Instant,
    /// Local port -> inodes of listening TCP sockets.
    tcp: HashMap<u16, Vec<u64>>,
    /// Local port -> inodes of TCP sockets in any other state (clients).
    tcp_bound: HashMap<u16, Vec<u64>>,
    /// Local port -> inodes of UDP sockets, unconnected ones first.
    udp: HashMap<u16, Vec<u64>>,
}

/// Why a refresh of a netns's socket tables failed; logged, never returned,
/// because attribution is best effort.
#[derive(Debug, thiserror::Error)]
enum TableError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot read {path} in network namespace {inum}: {source}; check that procfs is mounted at /proc")]
    Read {
        path: &'static str,
        inum: u32,
        #[source]
        source: std::io::Error,
    },
}

impl Sockets {
    /// The process holding the socket with inode `sock_ino` (found through
    /// /proc/*/fd). `None` if no process holds it any more, or never did
    /// as far as /proc shows.
    pub fn owner(&mut self, sock_ino: u64) -> Option<Owner> {
        for _ in 0..2 {
            let hit = self.sockets.contains_key(&sock_ino);
            if due(self.sockets_at, hit) {
                self.scan_sockets();
            }
            let pid = *self.sockets.get(&sock_ino)?;
            // The comm read doubles as a liveness check for a cached PID.
            if let Some(comm) = self.comm_of(pid) {
                return Some(Owner { pid, comm });
            }
            // That holder exited; a child it forked may still hold the
            // socket, which the next (rate-limited) scan will find.
            self.sockets.remove(&sock_ino);
        }
        None
    }

    /// The process owning the TCP listener (`proto` 6) or the bound UDP
    /// socket (`proto` 17) on local `port` in network namespace
    /// `netns_inum`, over IPv4 or IPv6, wildcard binds included. `None`
    /// means nobody listens there (or the netns is gone).
    pub fn listener(&mut self, netns_inum: u32, proto: u8, port: u16) -> Option<Owner> {
        if proto != 6 && proto != 17 {
            return None;
        }
        self.owner_in(netns_inum, |t| t.lookup(proto, port))
    }

    /// The first live holder of the sockets `find` picks from a namespace's
    /// table, which is re-read first when due: on a miss at most once per
    /// [`REFRESH`], on a hit once it is older than [`MAX_AGE`].
    fn owner_in(
        &mut self,
        netns_inum: u32,
        find: impl Fn(&PortTable) -> Option<&[u64]>,
    ) -> Option<Owner> {
        let table = self.ports.get(&netns_inum);
        let hit = table.is_some_and(|t| find(t).is_some());
        if due(table.map(|t| t.at), hit) {
            let table = self.scan_ports(netns_inum).unwrap_or_else(|e| {
                log::debug!("no socket table for netns {netns_inum}: {e}");
                // Remember the failure too, so misses stay rate-limited.
                PortTable::empty()
            });
            self.ports.insert(netns_inum, table);
        }
        let inodes = find(self.ports.get(&netns_inum)?)?.to_vec();
        inodes.into_iter().find_map(|ino| self.owner(ino))
    }

    /// The process holding any socket on local `port` (a client's socket:
    /// the origin of a flow) in network namespace `netns_inum`.
    pub fn bound(&mut self, netns_inum: u32, proto: u8, port: u16) -> Option<Owner> {
        if (proto != 6 && proto != 17) || port == 0 {
            return None;
        }
        self.owner_in(netns_inum, |t| t.lookup_bound(proto, port))
    }

    /// The command name of `pid`, `None` once it has exited.
    pub fn comm_of(&mut self, pid: u32) -> Option<String> {
        if let Some(comm) = self.comms.get(&pid) {
            return Some(comm.clone());
        }
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let comm = comm.trim_end_matches('\n').to_string();
        self.comms.insert(pid, comm.clone());
        Some(comm)
    }

    fn scan_sockets(&mut self) {
        self.proc_scans += 1;
        self.sockets_at = Some(Instant::now());
        self.sockets.clear();
        self.comms.clear();
        let Ok(procs) = procfs::process::all_processes() else {
            log::warn!("cannot list /proc; socket owners stay unknown");
            return;
        };
        // Any per-process error means it exited mid-scan or is not ours to
        // read: skip it.
        for process in procs.flatten() {
            let pid = process.pid() as u32;
            let Ok(fds) = process.fd() else { continue };
            for fd in fds.flatten() {
                if let FDTarget::Socket(ino) = fd.target {
                    self.sockets
                        .entry(ino)
                        .and_modify(|p| *p = (*p).min(pid))
                        .or_insert(pid);
                }
            }
        }
    }

    fn netns_info(&mut self, inum: u32) -> Result<NetnsInfo, NetnsError> {
        if let Some(ns) = self.netns.get(&inum) {
            return Ok(ns.clone());
        }
        if due(self.netns_at, false) {
            self.netns_at = Some(Instant::now());
            self.netns = netns::list()?.into_iter().map(|ns| (ns.inum, ns)).collect();
        }
        self.netns.get(&inum).cloned().ok_or(NetnsError::NotFound {
            spec: inum.to_string(),
        })
    }

    fn scan_ports(&mut self, inum: u32) -> Result<PortTable, TableError> {
        // Namespaces come and go with containers; forget the ones nobody
        // asked about for a while.
        self.ports.retain(|_, t| t.at.elapsed() < FORGET);
        let ns = self.netns_info(inum)?;
        let files = match netns::run_in(&ns, read_socket_tables) {
            Err(NetnsError::Vanished { .. }) => {
                // The path died with its process; another may still hold
                // the netns, so look it up afresh next time.
                self.netns.remove(&inum);
                return Err(NetnsError::Vanished {
                    inum,
                    path: ns.path,
                }
                .into());
            }
            other => other?,
        };
        let files = files.map_err(|(path, source)| TableError::Read { path, inum, source })?;
        let mut table = PortTable::empty();
        for (path, text) in files {
            let mut malformed = 0;
            if path.contains("tcp") {
                parse_table(
                    &text,
                    true,
                    &mut table.tcp,
                    &mut table.tcp_bound,
                    &mut malformed,
                );
            } else {
                parse_table(
                    &text,
                    false,
                    &mut table.udp,
                    &mut HashMap::new(),
                    &mut malformed,
                );
            }
            // Attribution is best effort: the rest of the table still counts.
            if malformed > 0 {
                log::warn!(
                    "skipped {malformed} malformed lines of {path} in network namespace {inum}"
                );
            }
        }
        Ok(table)
    }
}

impl PortTable {
    fn empty() -> Self {
        PortTable {
            at: Instant::now(),
            tcp: HashMap::new(),
            tcp_bound: HashMap::new(),
            udp: HashMap::new(),
        }
    }

    fn lookup(&self, proto: u8, port: u16) -> Option<&[u64]> {
        let map = if proto == 6 { &self.tcp } else { &self.udp };
        map.get(&port).map(Vec::as_slice)
    }

    /// Any socket on local `port`: the other end of a client's flow.
    fn lookup_bound(&self, proto: u8, port: u16) -> Option<&[u64]> {
        let map = if proto == 6 {
            &self.tcp_bound
        } else {
            &self.udp
        };
        map.get(&port).map(Vec::as_slice)
    }
}

/// Whether a table stamped `at` should be rebuilt for a lookup that did
/// (`hit`) or did not find its key.
fn due(at: Option<Instant>, hit: bool) -> bool {
    match at {
        None => true,
        Some(t) => {
            let age = t.elapsed();
            age >= REFRESH && (!hit || age >= MAX_AGE)
        }
    }
}

const SOCKET_TABLES: [&str; 4] = [
    "/proc/thread-self/net/tcp",
    "/proc/thread-self/net/tcp6",
    "/proc/thread-self/net/udp",
    "/proc/thread-self/net/udp6",
];

type Tables = Result<Vec<(&'static str, String)>, (&'static str, std::io::Error)>;

/// Runs inside the target netns: /proc/thread-self/net is this thread's
/// netns, /proc/self/net would be the main thread's.
fn read_socket_tables() -> Tables {
    let mut out = Vec::new();
    for path in SOCKET_TABLES {
        match fs::read_to_string(path) {
            Ok(text) => out.push((path, text)),
            // tcp6/udp6 vanish when IPv6 is disabled.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err((path, e)),
        }
    }
    Ok(out)
}

/// procfs parses a whole table or nothing; feeding it one line at a time
/// (behind an empty header line) lets a bad line be skipped and counted.
fn parse_lines<'a, T>(
    lines: impl Iterator<Item = &'a str>,
    malformed: &mut u64,
    parse: impl Fn(Cursor<String>) -> procfs::ProcResult<Vec<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for line in lines {
        match parse(Cursor::new(format!("\n{line}"))) {
            Ok(mut entries) if entries.len() == 1 => out.push(entries.remove(0)),
            _ => *malformed += 1,
        }
    }
    out
}

/// Data lines of a /proc/net socket table: no header, no blank lines.
fn data_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().skip(1).filter(|l| !l.trim().is_empty())
}

/// One socket table: TCP listeners or bound UDP sockets, by local port.
/// One socket table: TCP listeners (and other TCP sockets in `bound`) or
/// bound UDP sockets, by local port.
pub(crate) fn parse_table(
    text: &str,
    tcp: bool,
    ports: &mut HashMap<u16, Vec<u64>>,
    bound: &mut HashMap<u16, Vec<u64>>,
    malformed: &mut u64,
) {
    if tcp {
        parse_tcp(text, ports, bound, malformed)
    } else {
        parse_udp_bound(text, ports, malformed)
    }
}

fn parse_tcp(
    text: &str,
    listeners: &mut HashMap<u16, Vec<u64>>,
    bound: &mut HashMap<u16, Vec<u64>>,
    malformed: &mut u64,
) {
    let entries = parse_lines(data_lines(text), malformed, |r| {
        TcpNetEntries::from_buf_read(r, procfs::current_system_info()).map(|e| e.0)
    });
    for e in entries {
        if e.inode == 0 {
            continue;
        }
        let map = if e.state == TcpState::Listen {
            &mut *listeners
        } else {
            &mut *bound
        };
        map.entry(e.local_address.port()).or_default().push(e.inode);
    }
}

fn parse_udp_bound(text: &str, ports: &mut HashMap<u16, Vec<u64>>, malformed: &mut u64) {
    let entries = parse_lines(data_lines(text), malformed, |r| {
        UdpNetEntries::from_buf_read(r, procfs::current_system_info()).map(|e| e.0)
    });
    for e in entries {
        let port = e.local_address.port();
        if port == 0 || e.inode == 0 {
            continue;
        }
        let list = ports.entry(port).or_default();
        // A server's unconnected socket is the better answer than a
        // client's connected one that happens to share the port.
        if e.remote_address.port() == 0 {
            list.insert(0, e.inode);
        } else {
            list.push(e.inode);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, UdpSocket};
    use std::os::unix::fs::MetadataExt;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2222 1 0000000000000000 20 4 30 10 -1
   2: this line is garbage
   3: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3333 1 0000000000000000 100 0 0 10 0
   4: 0100007F:0051 00000000:0000 FF 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
   5: 0100007F:0052 00000000:0000 0A 00000000:00000000
";

    const UDP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 0000000000000000FFFF00000100007F:14E9 0000000000000000FFFF00000100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 5555 2 0000000000000000 0
  101: 00000000000000000000000000000000:14E9 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 6666 2 0000000000000000 0
  102: 00000000000000000000000000000000:0000 00000000000000000000000000000000:0000 07
";

    #[test]
    fn tcp_listeners_apart_from_clients_and_bad_lines_counted() {
        let (mut ports, mut bound) = (HashMap::new(), HashMap::new());
        let mut bad = 0;
        parse_table(TCP, true, &mut ports, &mut bound, &mut bad);
        assert_eq!(ports.get(&22), Some(&vec![1111]));
        assert_eq!(ports.get(&80), Some(&vec![3333]));
        assert_eq!(
            ports.get(&8080),
            None,
            "established sockets are not listeners"
        );
        assert!(
            bound.values().flatten().count() > 0,
            "established sockets are a client's end: {bound:?}"
        );
        assert_eq!(ports.get(&0x51), None, "unknown state");
        // The garbage line, the unknown state and the truncated listener.
        assert_eq!(bad, 3);
    }

    #[test]
    fn udp_unconnected_sockets_come_first() {
        let mut ports = HashMap::new();
        let mut bad = 0;
        parse_udp_bound(UDP6, &mut ports, &mut bad);
        assert_eq!(ports.get(&5353), Some(&vec![6666, 5555]));
        assert_eq!(bad, 1, "the truncated line");
        assert_eq!(ports.len(), 1);
    }

    #[test]
    fn refresh_is_rate_limited() {
        let now = Instant::now();
        assert!(due(None, true));
        assert!(!due(Some(now), false));
        assert!(!due(Some(now), true));
        if let Some(old) = now.checked_sub(REFRESH) {
            assert!(due(Some(old), false));
            assert!(!due(Some(old), true));
        }
        if let Some(older) = now.checked_sub(MAX_AGE) {
            assert!(due(Some(older), true));
        }
    }

    #[test]
    fn misses_do_not_rescan_proc_each_time() {
        let mut a = Sockets::default();
        for ino in 1..1000 {
            assert_eq!(a.owner(ino), None);
        }
        assert_eq!(a.proc_scans, 1);
        assert_eq!(
            a.listener(netns::testutil::self_inum(), 1, 80),
            None,
            "ICMP has no ports"
        );
    }

    #[test]
    fn comm_of_self_and_of_nobody() {
        let mut a = Sockets::default();
        let me = fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(
            a.comm_of(std::process::id()).as_deref(),
            Some(me.trim_end())
        );
        // PIDs never reach u32::MAX (pid_max is at most 2^22).
        assert_eq!(a.comm_of(u32::MAX), None);
    }

    fn me() -> Owner {
        Owner {
            pid: std::process::id(),
            comm: fs::read_to_string("/proc/self/comm")
                .unwrap()
                .trim_end()
                .into(),
        }
    }

    #[test]
    fn root_listener_and_socket_owner_in_a_netns() {
        use crate::source::netns::testutil::*;
        if !can_run("root_listener_and_socket_owner_in_a_netns", &["ip"]) {
            return;
        }
        let ns = TestNetns::new("attr");
        let (udp, tcp6, tcp4) = netns::run_in(&ns.info, || {
            (
                UdpSocket::bind("0.0.0.0:5353").unwrap(),
                TcpListener::bind("[::]:8080").unwrap(),
                TcpListener::bind("127.0.0.1:8081").unwrap(),
            )
        })
        .unwrap();

        let mut a = Sockets::default();
        let inum = ns.info.inum;
        assert_eq!(a.listener(inum, 17, 5353), Some(me()));
        assert_eq!(a.listener(inum, 6, 8080), Some(me()));
        assert_eq!(a.listener(inum, 6, 8081), Some(me()));
        assert_eq!(
            a.listener(inum, 6, 5353),
            None,
            "UDP port is not a TCP listener"
        );
        assert_eq!(a.listener(inum, 17, 8080), None);
        // Same ports, other netns: ours has none of these sockets.
        assert_ne!(netns::testutil::self_inum(), inum);

        let ino = fs::metadata(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&udp)
        ))
        .unwrap()
        .ino();
        assert_eq!(a.owner(ino), Some(me()));

        // A closed socket is still a cached hit until MAX_AGE, then a
        // rebuild forgets it.
        drop(udp);
        let fresh = Sockets::default().listener(inum, 17, 5353);
        assert_eq!(fresh, None);
        std::thread::sleep(REFRESH);
        assert_eq!(
            a.listener(inum, 17, 5353),
            Some(me()),
            "hit trusted until MAX_AGE"
        );
        let long_ago = Instant::now().checked_sub(MAX_AGE).unwrap();
        a.sockets_at = Some(long_ago);
        a.ports.get_mut(&inum).unwrap().at = long_ago;
        assert_eq!(a.listener(inum, 17, 5353), None);
        assert_eq!(a.owner(ino), None);
        drop((tcp6, tcp4));
    }

    #[test]
    fn unknown_netns_has_no_listeners() {
        let mut a = Sockets::default();
        assert_eq!(a.listener(1, 6, 22), None);
        assert_eq!(a.listener(1, 6, 22), None);
    }
}
