//! Forwarded and NAT'd flows named at both ends: root, serial
//! (`--test-threads=1`), tracepoint mode on the host.
//!
//! Clients reach a server through a node namespace whose table is full, as
//! pods reach each other through a Kubernetes node or containers through
//! docker0: the node drops the packets, and neither end lives there. The
//! clients behave like real ones and keep their sockets while they wait for
//! an answer. Every count is checked against the node's own conntrack
//! `drop` counter; every name against the pid and namespace the test made.
use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use ctwatch_tests::*;

/// The node's table size (global `nf_conntrack_max`, restored by the guard).
const MAX: u64 = 16;
/// The held connections that fill the node's table go to this port.
const HOLD_PORT: u16 = 7400;
/// Where the server answers.
const SERVICE_PORT: u16 = 53;
/// The node's published port, translated to the server's by DNAT.
const NODE_PORT: u16 = 8053;

/// A client namespace, routed (or bridged) to the node.
struct Client {
    ns: Netns,
    addr: IpAddr,
}

/// Clients → node (forwarding, conntrack, a full table) → server.
struct Topo {
    // Dropped in declaration order: the namespaces go last, after every
    // peer the tests hold (those are declared after the topology).
    node: Netns,
    srv: Netns,
    clients: Vec<Client>,
    /// The node's address on the clients' side: their gateway, and the
    /// front DNAT translates from.
    node_addr: IpAddr,
    srv_addr: IpAddr,
    v6: bool,
}

/// A subnet of 198.18.0.0/15 (and fd00::/8) per topology, away from the
/// 198.18.0.0/24 of the other host tests: ctwatch maps every address of
/// every namespace on the host, and one address in two namespaces names
/// neither.
fn subnet() -> u32 {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    100 + (std::process::id() + SEQ.fetch_add(1, Ordering::Relaxed)) % 150
}

/// `[addr]:port` or `addr:port`, as ctpeer parses it.
fn sock(addr: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

impl Topo {
    /// `clients` client namespaces; behind a bridge in the node (as
    /// docker0 is built) when `bridged`, else each on a routed veth.
    fn new(tag: &str, clients: usize, bridged: bool, v6: bool) -> Self {
        let x = subnet();
        // Side 0 (the clients): 198.18.X.0/26, fd00:c7:X:1::/64; side 1
        // (the server): 198.18.X.64/26, fd00:c7:X:2::/64.
        let len = if v6 { 64 } else { 26 };
        let at = |side: u32, host: u32| -> IpAddr {
            let text = if v6 {
                format!("fd00:c7:{x}:{}::{host:x}", side + 1)
            } else {
                format!("198.18.{x}.{}", side * 64 + host)
            };
            text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
        };
        let node = Netns::new(&format!("{tag}-n"));
        let srv = Netns::new(&format!("{tag}-s"));
        let clients: Vec<Client> = (0..clients)
            .map(|i| Client {
                ns: Netns::new(&format!("{tag}-c{i}")),
                addr: at(0, 2 + i as u32),
            })
            .collect();
        let t = Topo {
            node_addr: at(0, 1),
            srv_addr: at(1, 2),
            node,
            srv,
            clients,
            v6,
        };
        let all = std::iter::once(&t.node)
            .chain(std::iter::once(&t.srv))
            .chain(t.clients.iter().map(|c| &c.ns));
        for ns in all {
            let off = if v6 { "0" } else { "1" };
            // Without IPv6 (v4 runs) nothing but the test's flows reaches
            // the node's table.
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", off);
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", off);
        }
        let (fam, fwd) = if v6 {
            ("-6", "net.ipv6.conf.all.forwarding")
        } else {
            ("-4", "net.ipv4.ip_forward")
        };
        let addr = |ns: &Netns, a: IpAddr, dev: &str| {
            let cidr = format!("{a}/{len}");
            let mut cmd = vec!["ip", "addr", "add", &cidr, "dev", dev];
            if v6 {
                cmd.push("nodad");
            }
            ns.exec(&cmd);
        };
        let up = |ns: &Netns, dev: &str| ns.exec(&["ip", "link", "set", dev, "up"]);
        let route = |ns: &Netns, via: IpAddr| {
            ns.exec(&[
                "ip",
                fam,
                "route",
                "add",
                "default",
                "via",
                &via.to_string(),
            ]);
        };
        // Interface names are per namespace: made inside the node, they
        // need no prefix to stay unique on the host.
        if bridged {
            // Without snooping: its IGMP traffic would take a slot of the
            // node's table that the test counts.
            t.node.exec(&[
                "ip",
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ]);
            addr(&t.node, t.node_addr, "br0");
            up(&t.node, "br0");
            t.node.sysctl("net.bridge.bridge-nf-call-iptables", "1");
            t.node.sysctl("net.bridge.bridge-nf-call-ip6tables", "1");
        }
        for (i, c) in t.clients.iter().enumerate() {
            let dev = format!("c{i}");
            t.node.exec(&[
                "ip", "link", "add", &dev, "type", "veth", "peer", "name", "eth0", "netns",
                &c.ns.name,
            ]);
            if bridged {
                t.node.exec(&["ip", "link", "set", &dev, "master", "br0"]);
            } else {
                addr(&t.node, t.node_addr, &dev);
            }
            up(&t.node, &dev);
            addr(&c.ns, c.addr, "eth0");
            up(&c.ns, "eth0");
            route(&c.ns, t.node_addr);
        }
        t.node.exec(&[
            "ip",
            "link",
            "add",
            "s0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &t.srv.name,
        ]);
        let node_srv = at(1, 1);
        addr(&t.node, node_srv, "s0");
        up(&t.node, "s0");
        addr(&t.srv, t.srv_addr, "eth0");
        up(&t.srv, "eth0");
        route(&t.srv, node_srv);
        if !bridged && t.clients.len() > 1 {
            // One address on several routed veths: each client needs its
            // own host route.
            for (i, c) in t.clients.iter().enumerate() {
                t.node.exec(&[
                    "ip",
                    fam,
                    "route",
                    "replace",
                    &c.addr.to_string(),
                    "dev",
                    &format!("c{i}"),
                ]);
            }
        }
        t.node.sysctl(fwd, "1");
        t.node.enable_conntrack();
        t
    }

    fn client(&self, i: usize) -> &Client {
        &self.clients[i]
    }

    /// Fills the node's table with `n` established connections from client
    /// 0 to `to`, which leads to the server's `port` (assured entries:
    /// early_drop cannot evict them). Returns the server's listener and
    /// the client holding them.
    fn fill(&self, n: u64, port: u16, to: &str) -> (Peer, Peer) {
        let listener = self.srv.peer(&["tcp-listen", &sock(self.any(), port)]);
        let holder = self.client(0).ns.peer(&["tcp-hold", to, &n.to_string()]);
        self.wait_full(n);
        (listener, holder)
    }

    /// Waits until the node holds `n` entries (a handshake's last ACK may
    /// still be on its way), and asserts it does.
    fn wait_full(&self, n: u64) {
        poll_until(Duration::from_secs(5), || self.node.count() >= n);
        assert_eq!(self.node.count(), n, "the node's table is not at {n}");
    }

    /// The wildcard address of the topology's family.
    fn any(&self) -> IpAddr {
        if self.v6 {
            "::".parse().unwrap()
        } else {
            "0.0.0.0".parse().unwrap()
        }
    }
}

/// The rows of one breakdown (`drops`, `occupancy`) in one dimension.
fn rows<'a>(r: &'a Value, part: &str, dim: &str) -> &'a [Value] {
    r[part][dim]
        .as_array()
        .unwrap_or_else(|| panic!("no {part}.{dim} in {r}"))
}

/// The row of a dimension naming `pid`.
fn row_of<'a>(r: &'a Value, part: &str, dim: &str, pid: u32) -> &'a Value {
    rows(r, part, dim)
        .iter()
        .find(|row| row["pid"] == pid)
        .unwrap_or_else(|| panic!("no {part}.{dim} row for pid {pid}: {}", r[part][dim]))
}

/// Every dimension of a breakdown counts every flow once: each adds up
/// to `total`, and `total` is what was asked.
fn assert_dimensions_add_up(r: &Value, part: &str, total: u64) {
    assert_eq!(r[part]["total"], total, "{part} total: {r}");
    for dim in [
        "by_src_ip",
        "by_dst_port",
        "by_process",
        "by_netns",
        "by_origin",
        "by_service",
        "by_pod",
    ] {
        let sum: u64 = rows(r, part, dim)
            .iter()
            .map(|row| row["count"].as_u64().expect("count"))
            .sum();
        assert_eq!(
            sum, total,
            "{part}.{dim} adds up to {sum}: {}",
            r[part][dim]
        );
    }
}

/// The node's row of a report agrees with the kernel: drops seen, drops
/// the kernel counted over the window, and the test's own reading.
fn assert_reconciled(r: &Value, t: &Topo, kernel: u64) {
    let row = netns_row(r, t.node.inum());
    assert_eq!(row["drops_kernel"], kernel, "{r}");
    assert_eq!(row["drops_seen"], kernel, "{r}");
    assert_dimensions_add_up(r, "drops", kernel);
    assert_eq!(r["lost_events"], 0, "{r}");
    assert_eq!(r["reconciliation"].as_array().map(Vec::len), Some(0), "{r}");
}

/// A row names this process, living in that namespace.
fn assert_names(row: &Value, pid: u32, ns: &Netns, what: &str) {
    assert_eq!(row["key"], "ctpeer", "{what}: {row}");
    assert_eq!(row["pid"], pid, "{what}: {row}");
    assert_eq!(row["netns"], ns.inum(), "{what}: {row}");
}

fn proto_name(tcp: bool) -> &'static str {
    if tcp {
        "tcp"
    } else {
        "udp"
    }
}

/// SYN retries of a connecting test client: each socket gives up by itself
/// after 3 s, having sent its SYN, this retry, and (from 6.7, whose first
/// SYN timeouts are linear) one more. The client keeps its sockets all the
/// while, so ctwatch has seconds to name it, and once no socket is
/// connecting the count is final, without killing the client in the
/// middle of a retry.
const SYN_RETRIES: &str = "1";

/// Waits until the namespace's connecting sockets gave up.
fn until_syns_given_up(ns: &Netns) {
    assert!(
        poll_until(Duration::from_secs(15), || ns.syn_sent() == 0),
        "{} sockets still connecting",
        ns.syn_sent()
    );
}

/// Routed: a client sends to the server through the node; the node drops.
fn routed(tag: &str, tcp: bool, v6: bool) {
    const N: u64 = 40;
    let t = Topo::new(tag, 1, false, v6);
    let _max = MaxGuard::set(MAX);
    let _held = t.fill(MAX, HOLD_PORT, &sock(t.srv_addr, HOLD_PORT));
    let listen = if tcp { "tcp-listen" } else { "udp-listen" };
    let listener = t.srv.peer(&[listen, &sock(t.any(), SERVICE_PORT)]);
    let before = t.node.kernel_drops();
    let w = start_report(&t.node, &mode());
    let ask = if tcp { "tcp-ask" } else { "udp-ask" };
    let to = sock(t.srv_addr, SERVICE_PORT);
    if tcp {
        t.client(0)
            .ns
            .sysctl("net.ipv4.tcp_syn_retries", SYN_RETRIES);
    }
    let client = t.client(0).ns.peer(&[ask, &to, &N.to_string()]);
    let client_pid = client.pid;
    if tcp {
        // Every SYN and its first retry, then the rest.
        t.node.drops_since(before, 2 * N);
        until_syns_given_up(&t.client(0).ns);
    } else {
        t.node.drops_since(before, N);
    }
    let r = w.report();
    drop(client);
    let kernel = t.node.kernel_drops() - before;
    if tcp {
        assert!(kernel >= 2 * N, "every SYN and retry dropped: {kernel}");
    } else {
        assert_eq!(kernel, N, "one drop per request");
    }
    assert_reconciled(&r, &t, kernel);
    let proto = proto_name(tcp);
    let origin = rows(&r, "drops", "by_origin");
    assert_eq!(origin.len(), 1, "one client: {r}");
    assert_names(&origin[0], client_pid, &t.client(0).ns, "by_origin");
    assert_eq!(origin[0]["role"], "sender", "{r}");
    let service = rows(&r, "drops", "by_service");
    assert_eq!(service.len(), 1, "one service: {r}");
    assert_names(&service[0], listener.pid, &t.srv, "by_service");
    assert_eq!(service[0]["via"], format!("{proto}/{to}"), "{r}");
    assert!(service[0].get("to").is_none(), "nothing translated: {r}");
    let process = rows(&r, "drops", "by_process");
    assert_eq!(process.len(), 1, "{r}");
    assert_names(&process[0], listener.pid, &t.srv, "by_process");
    assert_eq!(process[0]["role"], "listener", "{r}");
    assert_eq!(
        rows(&r, "drops", "by_src_ip")[0]["key"],
        t.client(0).addr.to_string()
    );
    assert_eq!(
        rows(&r, "drops", "by_dst_port")[0]["key"],
        format!("{proto}/{SERVICE_PORT}")
    );
    assert_eq!(
        rows(&r, "drops", "by_netns")[0]["key"],
        t.node.inum().to_string()
    );
}

#[test]
fn routed_udp_v4_names_client_and_server() {
    require_env!();
    routed("rtu4", false, false);
}

#[test]
fn routed_tcp_syn_v4_names_client_and_server() {
    require_env!();
    routed("rtt4", true, false);
}

#[test]
fn routed_udp_v6_names_client_and_server() {
    require_env!();
    routed("rtu6", false, true);
}

#[test]
fn routed_tcp_syn_v6_names_client_and_server() {
    require_env!();
    routed("rtt6", true, true);
}

#[test]
fn bridged_clients_are_each_named() {
    require_env!();
    const N: u64 = 30;
    // Two clients on a bridge in the node, the server routed behind it:
    // docker0 and the containers on it. The second client also asks the
    // first one, across the bridge alone: conntrack sees that flow only
    // through br_netfilter.
    let t = Topo::new("brg", 2, true, false);
    let _max = MaxGuard::set(MAX);
    let _held = t.fill(MAX, HOLD_PORT, &sock(t.srv_addr, HOLD_PORT));
    let any = sock(t.any(), SERVICE_PORT);
    let listener = t.srv.peer(&["udp-listen", &any]);
    let neighbour = t.client(0).ns.peer(&["udp-listen", &any]);
    let before = t.node.kernel_drops();
    let w = start_report(&t.node, &mode());
    let to = sock(t.srv_addr, SERVICE_PORT);
    let across = sock(t.client(0).addr, SERVICE_PORT);
    let a = t.client(0).ns.peer(&["udp-ask", &to, &N.to_string()]);
    let b = t.client(1).ns.peer(&["udp-ask", &to, &(2 * N).to_string()]);
    let c = t.client(1).ns.peer(&["udp-ask", &across, &N.to_string()]);
    t.node.drops_since(before, 4 * N);
    let r = w.report();
    let kernel = t.node.kernel_drops() - before;
    assert_eq!(kernel, 4 * N, "one drop per request");
    assert_reconciled(&r, &t, kernel);
    for (peer, cli, n) in [
        (&a, t.client(0), N),
        (&b, t.client(1), 2 * N),
        (&c, t.client(1), N),
    ] {
        let row = row_of(&r, "drops", "by_origin", peer.pid);
        assert_names(row, peer.pid, &cli.ns, "by_origin");
        assert_eq!(row["count"], n, "{r}");
    }
    for (peer, ns, n) in [(&listener, &t.srv, 3 * N), (&neighbour, &t.client(0).ns, N)] {
        let row = row_of(&r, "drops", "by_service", peer.pid);
        assert_names(row, peer.pid, ns, "by_service");
        assert_eq!(row["count"], n, "{r}");
    }
    let src = |c: &Client| {
        rows(&r, "drops", "by_src_ip")
            .iter()
            .find(|s| s["key"] == c.addr.to_string())
            .map(|s| s["count"].clone())
    };
    assert_eq!(src(t.client(0)), Some(N.into()), "{r}");
    assert_eq!(src(t.client(1)), Some((3 * N).into()), "{r}");
}

#[test]
fn dnat_drops_name_the_service_behind_the_node_port() {
    require_env!();
    const N: u64 = 30;
    let t = Topo::new("dnat", 1, false, false);
    // A published port, as docker's and kube-proxy's DNAT build it.
    t.node.nft("add table ip ctwnat");
    t.node
        .nft("add chain ip ctwnat pre { type nat hook prerouting priority -100; }");
    t.node.nft(&format!(
        "add rule ip ctwnat pre ip daddr {} meta l4proto {{ tcp, udp }} th dport {NODE_PORT} dnat to {}",
        t.node_addr,
        sock(t.srv_addr, SERVICE_PORT)
    ));
    let _max = MaxGuard::set(MAX);
    let udp_listener = t.srv.peer(&["udp-listen", &sock(t.any(), SERVICE_PORT)]);
    // The entries that fill the table are translated flows: the table
    // itself then says where the node port leads.
    let front = sock(t.node_addr, NODE_PORT);
    let (tcp_listener, holder) = t.fill(MAX - 1, SERVICE_PORT, &front);
    let _asker = t.client(0).ns.peer(&["udp-ask", &front, "1"]);
    t.wait_full(MAX);
    let before = t.node.kernel_drops();
    let w = start_report(&t.node, &mode());
    let udp = t.client(0).ns.peer(&["udp-ask", &front, &N.to_string()]);
    t.client(0)
        .ns
        .sysctl("net.ipv4.tcp_syn_retries", SYN_RETRIES);
    let tcp = t.client(0).ns.peer(&["tcp-ask", &front, &N.to_string()]);
    // Every datagram, every SYN and its first retry, then the rest.
    t.node.drops_since(before, 3 * N);
    until_syns_given_up(&t.client(0).ns);
    let tcp_pid = tcp.pid;
    let r = w.report();
    drop(tcp);
    let kernel = t.node.kernel_drops() - before;
    assert!(kernel >= 3 * N, "{kernel}");
    assert_reconciled(&r, &t, kernel);
    let backend = sock(t.srv_addr, SERVICE_PORT);
    for (proto, listener) in [("udp", &udp_listener), ("tcp", &tcp_listener)] {
        let row = rows(&r, "drops", "by_service")
            .iter()
            .find(|s| s["via"] == format!("{proto}/{front}"))
            .unwrap_or_else(|| panic!("no {proto} service row: {r}"));
        assert_names(row, listener.pid, &t.srv, "by_service");
        assert_eq!(row["to"], backend, "translated to the server: {r}");
    }
    // Both clients are named: each waited on its sockets.
    for (pid, n) in [(udp.pid, N), (tcp_pid, kernel - N)] {
        let row = row_of(&r, "drops", "by_origin", pid);
        assert_names(row, pid, &t.client(0).ns, "by_origin");
        assert_eq!(row["count"], n, "{r}");
    }
    // The victims' ports are the ones the clients asked for, before NAT.
    for row in rows(&r, "drops", "by_dst_port") {
        assert!(row["key"].as_str().unwrap().ends_with("/8053"), "{r}");
    }
    // The held entries: every one the holder's, translated to the server.
    let occ = rows(&r, "occupancy", "by_origin");
    let held = row_of(&r, "occupancy", "by_origin", holder.pid);
    assert_names(held, holder.pid, &t.client(0).ns, "occupancy.by_origin");
    assert_eq!(held["count"], MAX - 1, "{occ:?}");
    let svc = rows(&r, "occupancy", "by_service")
        .iter()
        .find(|s| s["via"] == format!("tcp/{front}"))
        .unwrap_or_else(|| panic!("no held service row: {r}"));
    assert_names(svc, tcp_listener.pid, &t.srv, "occupancy.by_service");
    assert_eq!(svc["to"], backend, "{r}");
}

/// The cgroup2 mount: /sys/fs/cgroup on pure v2 hosts, /sys/fs/cgroup/unified
/// on hybrid ones (v1 controllers beside it), as on this project's host.
fn cgroup2_root() -> PathBuf {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists())
        .expect("a cgroup2 mount at /sys/fs/cgroup or /sys/fs/cgroup/unified")
}

/// A cgroup v2 directory made for the test, with every parent it had to
/// make. Removed deepest first on drop, so declare it before the peers
/// that run in it: they must be gone first.
struct Cgroup {
    path: PathBuf,
    made: Vec<PathBuf>,
}

impl Cgroup {
    fn new(rel: &str) -> Self {
        let mut cg = Cgroup {
            path: cgroup2_root(),
            made: Vec::new(),
        };
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            cg.path.push(part);
            if !cg.path.exists() {
                fs::create_dir(&cg.path).unwrap_or_else(|e| panic!("mkdir {:?}: {e}", cg.path));
                cg.made.push(cg.path.clone());
            }
        }
        cg
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in self.made.iter().rev() {
            // A process killed a moment ago may still be leaving it.
            let gone = poll_until(Duration::from_secs(5), || {
                fs::remove_dir(dir).is_ok() || !dir.exists()
            });
            if !gone {
                eprintln!("FAILED to remove cgroup {dir:?}");
            }
        }
    }
}

/// The kubelet's log directory of one pod, `/var/log/pods/<ns>_<name>_<uid>/
/// <container>/`, where ctwatch reads the pod's name; removed on drop, with
/// `/var/log/pods` itself when the test made it.
struct PodLogs {
    dir: PathBuf,
    made_root: bool,
}

const POD_LOGS: &str = "/var/log/pods";

impl PodLogs {
    fn new(namespace: &str, name: &str, uid: &str, container: &str) -> Self {
        let made_root = !Path::new(POD_LOGS).exists();
        let logs = PodLogs {
            dir: Path::new(POD_LOGS).join(format!("{namespace}_{name}_{uid}")),
            made_root,
        };
        fs::create_dir_all(logs.dir.join(container)).expect("pod log directory");
        logs
    }
}

impl Drop for PodLogs {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("FAILED to remove {:?}: {e}", self.dir);
        }
        if self.made_root {
            let _ = fs::remove_dir(POD_LOGS);
        }
    }
}

/// `len` hex digits, different for every call in every run.
fn hex(len: usize) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ u64::from(SEQ.fetch_add(1, Ordering::Relaxed));
    let mut out = String::new();
    while out.len() < len {
        // splitmix64: well spread digits from a counter.
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.push_str(&format!("{:016x}", z ^ (z >> 31)));
    }
    out.truncate(len);
    out
}

/// A pod as a kubelet with the systemd driver and containerd lay it out,
/// and a container as docker with the systemd driver does. Field order is
/// drop order: cgroups after the peers (declared later by the tests) left.
struct Pods {
    pod_cgroup: Cgroup,
    docker_cgroup: Cgroup,
    _logs: PodLogs,
    /// `pod <namespace>/<name> <container id, 12 digits>`: ctwatch's label
    /// of the pod's container.
    pod_label: String,
    /// `pod <namespace>/<name>`: the pod, as `by_pod` and the namespace are
    /// named.
    pod_key: String,
    docker_label: String,
}

impl Pods {
    fn new() -> Self {
        let uid = format!("{}-{}-4{}-8{}-{}", hex(8), hex(4), hex(3), hex(3), hex(12));
        let (pod_ctr, docker_ctr) = (hex(64), hex(64));
        let name = format!("client-{}", std::process::id());
        let pod_cgroup = Cgroup::new(&format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{pod_ctr}.scope",
            uid.replace('-', "_")
        ));
        let docker_cgroup = Cgroup::new(&format!("/system.slice/docker-{docker_ctr}.scope"));
        let logs = PodLogs::new("ctwatch-test", &name, &uid, "client");
        Pods {
            pod_label: format!("pod ctwatch-test/{name} {}", &pod_ctr[..12]),
            pod_key: format!("pod ctwatch-test/{name}"),
            docker_label: format!("docker {}", &docker_ctr[..12]),
            pod_cgroup,
            docker_cgroup,
            _logs: logs,
        }
    }
}

/// A routed topology whose client runs in a pod and whose server runs in
/// a docker container; the pod also holds every entry of the node's table.
/// Returns the peers: (TCP listener, holder, UDP listener).
fn pod_scene(t: &Topo, pods: &Pods) -> (Peer, Peer, Peer) {
    let hold = t.srv.peer_in_cgroup(
        &pods.docker_cgroup.path,
        &["tcp-listen", &sock(t.any(), HOLD_PORT)],
    );
    let holder = t.client(0).ns.peer_in_cgroup(
        &pods.pod_cgroup.path,
        &["tcp-hold", &sock(t.srv_addr, HOLD_PORT), &MAX.to_string()],
    );
    t.wait_full(MAX);
    let listener = t.srv.peer_in_cgroup(
        &pods.docker_cgroup.path,
        &["udp-listen", &sock(t.any(), SERVICE_PORT)],
    );
    (hold, holder, listener)
}

#[test]
fn pods_and_containers_are_named_at_both_ends() {
    require_env!();
    const N: u64 = 30;
    let t = Topo::new("pod", 1, false, false);
    let pods = Pods::new();
    let _max = MaxGuard::set(MAX);
    let (hold, holder, listener) = pod_scene(&t, &pods);
    let before = t.node.kernel_drops();
    let w = start_report(&t.node, &mode());
    let client = t.client(0).ns.peer_in_cgroup(
        &pods.pod_cgroup.path,
        &["udp-ask", &sock(t.srv_addr, SERVICE_PORT), &N.to_string()],
    );
    t.node.drops_since(before, N);
    let r = w.report();
    let kernel = t.node.kernel_drops() - before;
    assert_eq!(kernel, N, "one drop per request");
    assert_reconciled(&r, &t, kernel);
    let (pod, docker) = (&pods.pod_label, &pods.docker_label);
    let origin = row_of(&r, "drops", "by_origin", client.pid);
    assert_names(origin, client.pid, &t.client(0).ns, "by_origin");
    assert_eq!(origin["container"], pod.as_str(), "{r}");
    let service = row_of(&r, "drops", "by_service", listener.pid);
    assert_names(service, listener.pid, &t.srv, "by_service");
    assert_eq!(service["container"], docker.as_str(), "{r}");
    let process = row_of(&r, "drops", "by_process", listener.pid);
    assert_eq!(process["container"], docker.as_str(), "{r}");
    // The pod of a flow is its origin's, when the origin runs here.
    let by_pod = rows(&r, "drops", "by_pod");
    assert_eq!(by_pod.len(), 1, "{r}");
    assert_eq!(
        (&by_pod[0]["key"], &by_pod[0]["count"]),
        (&pods.pod_key.as_str().into(), &N.into())
    );

    // Who holds the table: the pod's client, every entry of it.
    assert_dimensions_add_up(&r, "occupancy", MAX);
    let held = row_of(&r, "occupancy", "by_origin", holder.pid);
    assert_names(held, holder.pid, &t.client(0).ns, "occupancy.by_origin");
    assert_eq!(held["container"], pod.as_str(), "{r}");
    assert_eq!(held["count"], MAX, "{r}");
    let by_pod = rows(&r, "occupancy", "by_pod");
    assert_eq!(by_pod.len(), 1, "{r}");
    assert_eq!(
        (&by_pod[0]["key"], &by_pod[0]["count"]),
        (&pods.pod_key.as_str().into(), &MAX.into())
    );
    let to = row_of(&r, "occupancy", "by_service", hold.pid);
    assert_names(to, hold.pid, &t.srv, "occupancy.by_service");
    assert_eq!(to["container"], docker.as_str(), "{r}");
}

/// The value of the series `name` that carries exactly these labels.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|l| l.split_once("} "))
        .find(|(set, _)| {
            let mut have: Vec<&str> = set.split("\",").map(|p| p.trim_end_matches('"')).collect();
            have.sort_unstable();
            let mut want: Vec<&str> = want.iter().map(|w| w.trim_end_matches('"')).collect();
            want.sort_unstable();
            have == want
        })
        .and_then(|(_, v)| v.trim().parse().ok())
}

#[test]
fn serve_exports_pods_and_containers() {
    require_env!();
    const N: u64 = 30;
    let t = Topo::new("psrv", 1, false, false);
    let pods = Pods::new();
    let _max = MaxGuard::set(MAX);
    let (_hold, holder, listener) = pod_scene(&t, &pods);
    let addr = free_loopback_addr();
    let before = t.node.kernel_drops();
    let w = start_serve(&t.node, &addr, &[]);
    let (pod, docker) = (pods.pod_label.as_str(), pods.docker_label.as_str());
    let entries = |text: &str| {
        series(
            text,
            "ctwatch_entries_by",
            &[("dimension", "pod"), ("key", &pods.pod_key)],
        )
    };
    // The client starts once serve has named the held entries, having read
    // the client namespace's sockets just before its socket existed: as a
    // pod that starts on a watched node.
    let mut text = String::new();
    poll_until(Duration::from_secs(15), || {
        text = scrape_metrics(&addr);
        entries(&text) == Some(MAX as f64)
    });
    assert_eq!(entries(&text), Some(MAX as f64), "{text}");
    let client = t.client(0).ns.peer_in_cgroup(
        &pods.pod_cgroup.path,
        &["udp-ask", &sock(t.srv_addr, SERVICE_PORT), &N.to_string()],
    );
    assert_eq!(t.node.drops_since(before, N), N, "one drop per request");
    let drops = "ctwatch_table_full_drops_by_total";
    let client_key = format!("ctpeer[{}]", client.pid);
    // A socket opened after the namespace's table was last read is found at
    // a later refresh (tables are re-read at most twice a second).
    poll_until(Duration::from_secs(15), || {
        text = scrape_metrics(&addr);
        series(
            &text,
            drops,
            &[("dimension", "pod"), ("key", &pods.pod_key)],
        ) == Some(N as f64)
            && series(
                &text,
                drops,
                &[
                    ("dimension", "origin"),
                    ("key", &client_key),
                    ("container", pod),
                ],
            )
            .is_some()
    });
    let n = Some(N as f64);
    assert_eq!(
        series(
            &text,
            drops,
            &[("dimension", "pod"), ("key", &pods.pod_key)]
        ),
        n,
        "{text}"
    );
    let listener_key = format!("ctpeer[{}]", listener.pid);
    for (dim, key, container) in [
        ("origin", &client_key, pod),
        ("service", &listener_key, docker),
        ("process", &listener_key, docker),
    ] {
        let labels = [("dimension", dim), ("key", key), ("container", container)];
        assert_eq!(series(&text, drops, &labels), n, "{dim}: {text}");
    }
    let holder_key = format!("ctpeer[{}]", holder.pid);
    let labels = [
        ("dimension", "origin"),
        ("key", holder_key.as_str()),
        ("container", pod),
    ];
    assert_eq!(
        series(&text, "ctwatch_entries_by", &labels),
        Some(MAX as f64),
        "{text}"
    );
    let (code, _) = w.stop();
    assert_eq!(code, 0);
}

/// The DaemonSet gives the names stage what it reads: the host's cgroup
/// hierarchy, the kubelet's pod directories, and the host's cgroup
/// namespace. No privileges needed.
#[test]
fn daemonset_mounts_what_the_names_need() {
    let ds = deploy_daemonset();
    let spec = &ds["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    for (host, at) in [
        ("/sys/fs/cgroup", "/sys/fs/cgroup"),
        ("/var/log/pods", "/var/log/pods"),
    ] {
        let vol = spec["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .find(|v| v["hostPath"]["path"] == host)
            .unwrap_or_else(|| panic!("no hostPath volume for {host}"));
        let mount = c["volumeMounts"]
            .as_sequence()
            .expect("volumeMounts")
            .iter()
            .find(|m| m["name"] == vol["name"])
            .unwrap_or_else(|| panic!("{host} is not mounted"));
        assert_eq!(mount["mountPath"], at, "{host}");
        assert_eq!(mount["readOnly"], true, "{host} read-only");
    }
    // The host's cgroup namespace, joined before ctwatch runs: Kubernetes
    // has no field for it short of `privileged`.
    let command: Vec<&str> = c["command"]
        .as_sequence()
        .expect("command")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert_eq!(
        command,
        [
            "nsenter",
            "--cgroup=/proc/1/ns/cgroup",
            "--",
            "/usr/local/bin/ctwatch"
        ]
    );
    assert_eq!(spec["hostPID"], true, "/proc/1 is the host's init");
}

#[test]
fn a_client_gone_before_the_lookup_keeps_its_address_and_namespace() {
    require_env!();
    const N: u64 = 30;
    let t = Topo::new("shot", 1, false, false);
    let pods = Pods::new();
    let _max = MaxGuard::set(MAX);
    let (_hold, _holder, listener) = pod_scene(&t, &pods);
    let before = t.node.kernel_drops();
    let w = start_report(&t.node, &mode());
    // One datagram per socket, closed at once: nothing waits for an answer.
    let (shooter, _) = t.client(0).ns.peer_run_in_cgroup(
        &pods.pod_cgroup.path,
        &["udp-send", &sock(t.srv_addr, SERVICE_PORT), &N.to_string()],
    );
    t.node.drops_since(before, N);
    let r = w.report();
    let kernel = t.node.kernel_drops() - before;
    assert_eq!(kernel, N, "one drop per datagram");
    assert_reconciled(&r, &t, kernel);
    // Whether a socket was still there when ctwatch looked is a race; the
    // address, its namespace and the pod living there are known either way.
    let shot = format!("(no socket) {}", t.client(0).addr);
    for row in rows(&r, "drops", "by_origin") {
        assert_eq!(row["netns"], t.client(0).ns.inum(), "{r}");
        let named = row["key"] == "ctpeer" && row["pid"] == shooter;
        let unnamed = row["key"] == shot.as_str() && row.get("pid").is_none();
        assert!(named || unnamed, "{row}: {r}");
        // A named sender's container; else the pod that owns its namespace.
        let container = if named {
            &pods.pod_label
        } else {
            &pods.pod_key
        };
        assert_eq!(row["container"], container.as_str(), "{r}");
    }
    let service = rows(&r, "drops", "by_service");
    assert_names(&service[0], listener.pid, &t.srv, "by_service");
    assert_eq!(service[0]["container"], pods.docker_label.as_str(), "{r}");
    // The flows came from the client's pod, never the server's container.
    let by_pod = rows(&r, "drops", "by_pod");
    assert_eq!(by_pod.len(), 1, "{r}");
    assert_eq!(by_pod[0]["key"], pods.pod_key.as_str(), "{r}");
}
