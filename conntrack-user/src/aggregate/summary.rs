//! The table at one instant, from one ctnetlink dump per network namespace:
//! what `sysctl -a | grep conntrack` and an awk pass over
//! /proc/net/nf_conntrack tell an on-call engineer, without either (the
//! procfs table is often compiled out) and without eBPF.
//!
//! Each dump is summarised as it streams in: counters indexed by protocol
//! and state, and maps keyed by copyable values (address, protocol and
//! port), so the pass allocates per distinct key, never per entry, and no
//! entry outlives its datagram. Display strings are built only for the
//! rows that are printed.
use std::{
    collections::BTreeMap,
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{
    aggregate::{
        breakdown::{named, Item},
        topk::TopK,
    },
    source::counters::{self, CountersError},
    source::ctnetlink::{self, CtEntry, CtnetlinkError, TcpState},
    source::netns::{self, NetnsError, NetnsInfo},
    source::records::{self, Role},
};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("nf_conntrack is not loaded (no {MAX_PATH}): run `modprobe nf_conntrack`, or use a kernel built with CONFIG_NF_CONNTRACK")]
    NotLoaded,
    #[error("cannot read {path}: {source}; run as root")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no conntrack table could be dumped: netns {inum}: {source}")]
    Dump {
        inum: u32,
        #[source]
        source: CtnetlinkError,
    },
    #[error(transparent)]
    Counters(#[from] CountersError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

const SYSCTL_DIR: &str = "/proc/sys/net/netfilter";
const MAX_PATH: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
/// Exists only when nf_conntrack is a loadable module (built-in code has
/// no initstate).
const MODULE_INITSTATE: &str = "/sys/module/nf_conntrack/initstate";
/// Distinct sources, ports or pairs tracked per namespace before the rest
/// lands in "other": enough to be exact for any plausible top list, and a
/// bound on memory when a flood spreads over millions of addresses.
pub const KEY_BUDGET: usize = 65536;

// include/uapi/linux/netfilter/nf_conntrack_common.h
const IPS_SEEN_REPLY: u32 = 1 << 1;

/// How the kernel provides conntrack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Presence {
    Module,
    BuiltIn,
    Absent,
}

impl Presence {
    pub fn detect() -> Self {
        Self::from_paths(Path::new(MODULE_INITSTATE), Path::new(MAX_PATH))
    }

    fn from_paths(initstate: &Path, max: &Path) -> Self {
        if initstate.exists() {
            Presence::Module
        } else if max.exists() {
            Presence::BuiltIn
        } else {
            Presence::Absent
        }
    }
}

/// Host-wide settings, read in the initial namespace: `max` and `buckets`
/// are global, and the timeouts there are what new namespaces start from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableSettings {
    pub nf_conntrack: Presence,
    pub max: u64,
    pub buckets: u64,
    /// Entries in the initial namespace.
    pub count: u64,
    /// Every `nf_conntrack_*timeout*` sysctl in seconds, keyed without the
    /// `nf_conntrack_` prefix.
    pub timeouts: BTreeMap<String, u64>,
}

/// Reads every `nf_conntrack_*timeout*` sysctl of the calling thread's
/// namespace. Unreadable or non-numeric files are skipped: a timeout the
/// kernel does not offer is simply not there.
pub fn read_timeouts() -> BTreeMap<String, u64> {
    read_timeouts_in(Path::new(SYSCTL_DIR))
}

fn read_timeouts_in(dir: &Path) -> BTreeMap<String, u64> {
    let Ok(rd) = fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let key = name.strip_prefix("nf_conntrack_")?;
            if !key.contains("timeout") {
                return None;
            }
            let v = fs::read_to_string(e.path()).ok()?.trim().parse().ok()?;
            Some((key.to_string(), v))
        })
        .collect()
}

/// The namespace PID 1 lives in, when we may enter it.
pub fn init_netns() -> Option<NetnsInfo> {
    let path = PathBuf::from("/proc/1/ns/net");
    let inum = fs::metadata(&path)
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m) as u32)?;
    Some(NetnsInfo {
        inum,
        name: None,
        path,
    })
}

impl TableSettings {
    pub fn read() -> Result<Self, SnapshotError> {
        let nf_conntrack = Presence::detect();
        if nf_conntrack == Presence::Absent {
            return Err(SnapshotError::NotLoaded);
        }
        // Entering PID 1's namespace needs root; our own is the next best
        // view (the same one unless ctwatch runs in a container).
        if let Some(init) = init_netns() {
            if let (Ok(s), Ok(timeouts)) = (
                counters::read_sysctl(&init),
                netns::run_in(&init, read_timeouts),
            ) {
                return Ok(TableSettings {
                    nf_conntrack,
                    max: s.max,
                    buckets: s.buckets,
                    count: s.count,
                    timeouts,
                });
            }
        }
        let dir = Path::new(SYSCTL_DIR);
        Ok(TableSettings {
            nf_conntrack,
            max: read_u64(&dir.join("nf_conntrack_max"))?,
            buckets: read_u64(&dir.join("nf_conntrack_buckets"))?,
            count: read_u64(&dir.join("nf_conntrack_count"))?,
            timeouts: read_timeouts(),
        })
    }
}

fn read_u64(path: &Path) -> Result<u64, SnapshotError> {
    let text = fs::read_to_string(path).map_err(|source| SnapshotError::Read {
        path: path.into(),
        source,
    })?;
    text.trim().parse().map_err(|_| {
        SnapshotError::Counters(CountersError::SysctlValue {
            path: path.into(),
            value: text.trim().into(),
        })
    })
}

/// A (protocol, destination port) key. Protocols without ports keep port 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub proto: u8,
    pub port: u16,
}

impl PortKey {
    pub fn of(e: &CtEntry) -> Self {
        PortKey {
            proto: e.proto,
            port: if has_ports(e.proto) { e.dport } else { 0 },
        }
    }
}

impl std::fmt::Display for PortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if has_ports(self.proto) {
            write!(f, "{}/{}", records::proto_name(self.proto), self.port)
        } else {
            // An ICMP "port" is type and code; a port list is the wrong place for it.
            f.write_str(&records::proto_name(self.proto))
        }
    }
}

/// TCP, UDP, DCCP, SCTP, UDP-Lite.
pub fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 33 | 132 | 136)
}

/// One namespace's dump, summarised.
#[derive(Debug, Clone)]
pub struct Summary {
    pub entries: u64,
    pub ipv4: u64,
    pub ipv6: u64,
    /// Indexed by IP protocol number.
    pub by_l4: Box<[u64; 256]>,
    /// Named from `states` once the dump is in.
    pub tcp_states: BTreeMap<String, u64>,
    /// Indexed by the kernel's TCP state number.
    states: Box<[u64; 256]>,
    pub assured: u64,
    /// Entries that never saw a reply packet.
    pub unreplied: u64,
    pub udp_unreplied: u64,
    pub src: TopK<IpAddr>,
    pub dst_port: TopK<PortKey>,
    pub pair: TopK<(IpAddr, PortKey)>,
}

impl Summary {
    /// Streams one dump of `ns` through a summary.
    pub fn dump_in(ns: &NetnsInfo) -> Result<Self, CtnetlinkError> {
        let mut s = Summary::new(KEY_BUDGET);
        ctnetlink::for_each_in(ns, |e| s.add(e))?;
        Ok(s.finish())
    }

    /// One pass over a dump held whole.
    #[cfg(test)]
    pub fn of(entries: &[CtEntry]) -> Self {
        Self::of_with_budget(entries, KEY_BUDGET)
    }

    #[cfg(test)]
    pub fn of_with_budget(entries: &[CtEntry], budget: usize) -> Self {
        let mut s = Summary::new(budget);
        entries.iter().for_each(|e| s.add(e));
        s.finish()
    }

    fn new(budget: usize) -> Self {
        Summary {
            entries: 0,
            ipv4: 0,
            ipv6: 0,
            by_l4: Box::new([0; 256]),
            tcp_states: BTreeMap::new(),
            states: Box::new([0; 256]),
            assured: 0,
            unreplied: 0,
            udp_unreplied: 0,
            src: TopK::new(budget),
            dst_port: TopK::new(budget),
            pair: TopK::new(budget),
        }
    }

    fn add(&mut self, e: &CtEntry) {
        self.entries += 1;
        match e.family {
            6 => self.ipv6 += 1,
            _ => self.ipv4 += 1,
        }
        self.by_l4[usize::from(e.proto)] += 1;
        if let Some(st) = e.tcp_state {
            self.states[usize::from(st.0)] += 1;
        }
        if e.assured {
            self.assured += 1;
        }
        if e.status & IPS_SEEN_REPLY == 0 {
            self.unreplied += 1;
            if e.proto == 17 {
                self.udp_unreplied += 1;
            }
        }
        let port = PortKey::of(e);
        self.src.add(e.src, 1);
        self.dst_port.add(port, 1);
        self.pair.add((e.src, port), 1);
    }

    fn finish(mut self) -> Self {
        self.tcp_states = (0..=u8::MAX)
            .zip(self.states.iter())
            .filter(|(_, n)| **n > 0)
            .map(|(st, n)| (TcpState(st).to_string(), *n))
            .collect();
        self
    }

    pub fn l4_count(&self, proto: u8) -> u64 {
        self.by_l4[usize::from(proto)]
    }

    /// `{"tcp": n, ...}` for the protocols present.
    pub fn by_l4_named(&self) -> BTreeMap<String, u64> {
        self.by_l4
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(p, n)| (records::proto_name(p as u8), *n))
            .collect()
    }

    pub fn by_l3_named(&self) -> BTreeMap<String, u64> {
        [("ipv4", self.ipv4), ("ipv6", self.ipv6)]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| (k.to_string(), n))
            .collect()
    }
}

/// One namespace in the published snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct NetnsTable {
    pub inum: u32,
    pub name: Option<String>,
    /// Entries in the dump; every breakdown below sums to it.
    pub count: u64,
    /// `nf_conntrack_count` as the kernel reports it (it also counts
    /// entries not yet confirmed, so it may differ from `count` by a few).
    pub kernel_count: Option<u64>,
    pub max: Option<u64>,
    pub by_l3: BTreeMap<String, u64>,
    pub by_l4: BTreeMap<String, u64>,
    pub tcp_states: BTreeMap<String, u64>,
    pub assured: u64,
    pub unreplied: u64,
    pub top_src_ip: Vec<Item>,
    pub top_dst_port: Vec<Item>,
    /// Source address and destination port together: "198.18.0.2 tcp/7400".
    pub top_src_dst_port: Vec<Item>,
}

impl NetnsTable {
    pub fn new(
        info: &NetnsInfo,
        sysctl: Option<&counters::Sysctl>,
        s: &Summary,
        top: usize,
    ) -> Self {
        NetnsTable {
            inum: info.inum,
            name: info.name.clone(),
            count: s.entries,
            kernel_count: sysctl.map(|x| x.count),
            max: sysctl.map(|x| x.max),
            by_l3: s.by_l3_named(),
            by_l4: s.by_l4_named(),
            tcp_states: s.tcp_states.clone(),
            assured: s.assured,
            unreplied: s.unreplied,
            top_src_ip: named(&s.src, top, |ip| ip.to_string()),
            top_dst_port: named(&s.dst_port, top, |p| p.to_string()),
            top_src_dst_port: named(&s.pair, top, |(ip, p)| format!("{ip} {p}")),
        }
    }
}

/// The `ctwatch snapshot --json` document.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub settings: TableSettings,
    pub netns: Vec<NetnsTable>,
    /// Namespaces that vanished or could not be read, one sentence each.
    pub notes: Vec<String>,
}

/// One namespace's dump and counters, as read.
pub struct Dumped {
    pub info: NetnsInfo,
    pub sysctl: Option<counters::Sysctl>,
    pub summary: Summary,
}

/// Dumps every namespace in `scope`. A namespace that vanishes or cannot
/// be read becomes a note; only when none can be dumped is it an error
/// (that is a missing privilege or a missing ctnetlink, never a race).
pub fn dump_scope(
    scope: &[NetnsInfo],
    notes: &mut Vec<String>,
) -> Result<Vec<Dumped>, SnapshotError> {
    let mut out = Vec::new();
    let mut first_err = None;
    for ns in scope {
        match Summary::dump_in(ns) {
            Ok(summary) => {
                let sysctl = counters::read_sysctl(ns)
                    .map_err(|e| notes.push(format!("netns {}: no counters: {e}", ns.inum)))
                    .ok();
                out.push(Dumped {
                    info: ns.clone(),
                    sysctl,
                    summary,
                });
            }
            Err(CtnetlinkError::Netns(NetnsError::Vanished { inum, .. })) => {
                notes.push(format!("netns {inum} vanished during the snapshot"));
            }
            Err(e) => {
                notes.push(format!("netns {}: no ctnetlink dump: {e}", ns.inum));
                first_err.get_or_insert((ns.inum, e));
            }
        }
    }
    match first_err {
        Some((inum, source)) if out.is_empty() => Err(SnapshotError::Dump { inum, source }),
        _ => Ok(out),
    }
}

/// Takes the snapshot. With `named` (the user listed namespaces), empty
/// tables are kept; otherwise only namespaces with entries are shown.
pub fn take(scope: &[NetnsInfo], named: bool, top: usize) -> Result<Snapshot, SnapshotError> {
    let settings = TableSettings::read()?;
    let mut notes = Vec::new();
    let dumps = dump_scope(scope, &mut notes)?;
    let netns = dumps
        .iter()
        .filter(|d| named || d.summary.entries > 0)
        .map(|d| NetnsTable::new(&d.info, d.sysctl.as_ref(), &d.summary, top))
        .collect();
    Ok(Snapshot {
        settings,
        netns,
        notes,
    })
}

/// Whether a port's entries are inbound (something listens on it in that
/// namespace) or of unknown direction: a dump carries no hook context.
pub fn role_of_port(sockets: &mut crate::names::sockets::Sockets, netns: u32, p: PortKey) -> Role {
    if has_ports(p.proto) && sockets.listener(netns, p.proto, p.port).is_some() {
        Role::Inbound
    } else {
        Role::Unknown
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn entry(proto: u8, src: &str, dport: u16, state: Option<&str>, status: u32) -> CtEntry {
        let src: IpAddr = src.parse().unwrap();
        let dst: IpAddr = if src.is_ipv4() {
            "198.18.0.1".parse().unwrap()
        } else {
            "2001:2::1".parse().unwrap()
        };
        CtEntry {
            family: if src.is_ipv4() { 4 } else { 6 },
            proto,
            src,
            dst,
            sport: 40000,
            dport,
            reply_src: dst,
            reply_dst: src,
            reply_sport: dport,
            reply_dport: 40000,
            tcp_state: state.map(|s| TcpState::named(s).expect("a TCP state name")),
            status,
            assured: status & (1 << 2) != 0,
            timeout: Some(30),
            zone: 0,
        }
    }

    const ASSURED_REPLIED: u32 = (1 << 2) | (1 << 1);

    fn synthetic() -> Vec<CtEntry> {
        let mut v = Vec::new();
        for _ in 0..64 {
            v.push(entry(
                6,
                "198.18.0.2",
                7400,
                Some("ESTABLISHED"),
                ASSURED_REPLIED,
            ));
        }
        for _ in 0..10 {
            v.push(entry(
                6,
                "198.18.0.3",
                443,
                Some("TIME_WAIT"),
                ASSURED_REPLIED,
            ));
        }
        for _ in 0..20 {
            v.push(entry(17, "198.18.0.4", 5353, None, 0));
        }
        for _ in 0..3 {
            v.push(entry(58, "2001:2::2", 0x8000, None, 1 << 1));
        }
        v
    }

    #[test]
    fn one_pass_counts_every_dimension() {
        let s = Summary::of(&synthetic());
        assert_eq!(s.entries, 97);
        assert_eq!((s.ipv4, s.ipv6), (94, 3));
        assert_eq!(s.l4_count(6), 74);
        assert_eq!(s.l4_count(17), 20);
        assert_eq!(s.by_l4_named()["icmpv6"], 3);
        assert_eq!(s.tcp_states["ESTABLISHED"], 64);
        assert_eq!(s.tcp_states["TIME_WAIT"], 10);
        assert_eq!(s.assured, 74);
        assert_eq!(s.unreplied, 20);
        assert_eq!(s.udp_unreplied, 20);
        assert_eq!(
            s.dst_port.leader(),
            Some((
                &PortKey {
                    proto: 6,
                    port: 7400
                },
                64
            ))
        );
        let ports = named(&s.dst_port, 2, |p| p.to_string());
        let rows: Vec<_> = ports.iter().map(|i| (i.key.as_str(), i.count)).collect();
        assert_eq!(
            rows,
            vec![("tcp/7400", 64), ("udp/5353", 20), ("other", 13)]
        );
        // ICMP has no port: its type/code must not pose as one.
        let all = named(&s.dst_port, 10, |p| p.to_string());
        assert!(
            all.iter().any(|i| i.key == "icmpv6" && i.count == 3),
            "{all:?}"
        );
        let pairs = named(&s.pair, 1, |(ip, p)| format!("{ip} {p}"));
        assert_eq!(pairs[0].key, "198.18.0.2 tcp/7400");
        assert_eq!(pairs[1].key, "other");
        assert_eq!(pairs[1].count, 33);
    }

    #[test]
    fn json_shape_matches_the_documented_one() {
        let info = NetnsInfo {
            inum: 4026532246,
            name: Some("edge".into()),
            path: "/run/netns/edge".into(),
        };
        let sysctl = counters::Sysctl {
            count: 97,
            max: 128,
            buckets: 1024,
        };
        let t = NetnsTable::new(&info, Some(&sysctl), &Summary::of(&synthetic()), 10);
        let snap = Snapshot {
            settings: TableSettings {
                nf_conntrack: Presence::BuiltIn,
                max: 262144,
                buckets: 262144,
                count: 5,
                timeouts: BTreeMap::from([("tcp_timeout_established".into(), 432000)]),
            },
            netns: vec![t],
            notes: vec![],
        };
        let v = serde_json::to_value(&snap).unwrap();
        assert_eq!(v["settings"]["max"], 262144);
        assert_eq!(v["settings"]["nf_conntrack"], "built-in");
        assert_eq!(v["settings"]["timeouts"]["tcp_timeout_established"], 432000);
        let n = &v["netns"][0];
        assert_eq!(n["inum"], 4026532246u32);
        assert_eq!(n["name"], "edge");
        assert_eq!(n["count"], 97);
        assert_eq!(n["max"], 128);
        assert_eq!(n["by_l3"]["ipv4"], 94);
        assert_eq!(n["by_l4"]["tcp"], 74);
        assert_eq!(n["tcp_states"]["ESTABLISHED"], 64);
        assert_eq!(n["top_src_ip"][0]["key"], "198.18.0.2");
        assert_eq!(n["top_src_ip"][0]["count"], 64);
        assert_eq!(n["top_dst_port"][0]["key"], "tcp/7400");
        assert!(n["top_src_ip"][0].get("pid").is_none());
    }

    #[test]
    fn key_budget_keeps_totals_exact() {
        let v: Vec<CtEntry> = (0..1000u32)
            .map(|i| entry(17, &format!("10.0.{}.{}", i / 256, i % 256), 53, None, 0))
            .collect();
        let s = Summary::of_with_budget(&v, 100);
        assert_eq!(
            named(&s.src, 1, |ip| ip.to_string())
                .iter()
                .map(|i| i.count)
                .sum::<u64>(),
            1000
        );
        let items = named(&s.src, 5, |ip| ip.to_string());
        assert_eq!(items.iter().map(|i| i.count).sum::<u64>(), 1000);
        assert_eq!(items[0].key, "other");
    }

    #[test]
    fn a_default_sized_table_in_one_pass() {
        // 262144 entries (the default max here) from 65536 sources: every
        // source fits the key budget, so the top list is exact.
        let v: Vec<CtEntry> = (0..262_144u32)
            .map(|i| {
                let s = i % 65_536;
                entry(
                    6,
                    &format!("10.{}.{}.1", s >> 8, s & 255),
                    443,
                    Some("ESTABLISHED"),
                    6,
                )
            })
            .collect();
        let t = std::time::Instant::now();
        let s = Summary::of(&v);
        eprintln!("summarised {} entries in {:?}", v.len(), t.elapsed());
        assert_eq!(s.entries, 262_144);
        assert_eq!(
            named(&s.src, 1, |ip| ip.to_string())
                .iter()
                .map(|i| i.count)
                .sum::<u64>(),
            262_144
        );
        assert_eq!(s.src.leader().map(|(_, n)| n), Some(4));
        assert_eq!(named(&s.dst_port, 10, |p| p.to_string())[0].count, 262_144);
        let pairs = named(&s.pair, 3, |(ip, p)| format!("{ip} {p}"));
        assert_eq!(
            pairs.first().map(|i| (i.key.as_str(), i.count)),
            Some(("other", 262_144 - 12))
        );
    }

    #[test]
    fn presence_prefers_module_then_builtin() {
        let dir = std::env::temp_dir().join(format!("ctwatch-presence-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let init = dir.join("initstate");
        let max = dir.join("max");
        assert_eq!(Presence::from_paths(&init, &max), Presence::Absent);
        fs::write(&max, "65536\n").unwrap();
        assert_eq!(Presence::from_paths(&init, &max), Presence::BuiltIn);
        fs::write(&init, "live\n").unwrap();
        assert_eq!(Presence::from_paths(&init, &max), Presence::Module);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn timeouts_are_keyed_without_the_prefix() {
        let dir = std::env::temp_dir().join(format!("ctwatch-timeouts-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("nf_conntrack_tcp_timeout_established"), "432000\n").unwrap();
        fs::write(dir.join("nf_conntrack_udp_timeout"), "30\n").unwrap();
        fs::write(dir.join("nf_conntrack_max"), "65536\n").unwrap();
        fs::write(dir.join("nf_conntrack_icmp_timeout"), "garbage\n").unwrap();
        let t = read_timeouts_in(&dir);
        assert_eq!(
            t,
            BTreeMap::from([
                ("tcp_timeout_established".to_string(), 432000),
                ("udp_timeout".to_string(), 30)
            ])
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
