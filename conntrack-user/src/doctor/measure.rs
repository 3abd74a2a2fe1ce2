//! Gathers what the rules judge: settings, the kernel's counters, a
//! series of Samples over the window, and one table summary per namespace.
use std::ops::AddAssign;

use super::*;
use crate::{
    aggregate::{
        sampler::{Count, Dumps, Sample, Sampler},
        topk::TopK,
    },
    cli::{DoctorArgs, Settings},
    names::sockets::Sockets,
    session::{Session, Streaming},
    source::netns::{self, NetnsInfo},
};

/// The size of one nf_conntrack slab object: /proc/slabinfo's objsize (the
/// per-object stride), else sysfs, else [`FALLBACK_OBJECT_SIZE`].
pub(crate) fn object_size() -> ObjectSize {
    if let Some(b) = fs::read_to_string("/proc/slabinfo")
        .ok()
        .and_then(|t| parse_slabinfo(&t))
    {
        return ObjectSize {
            bytes: b,
            source: "/proc/slabinfo".into(),
        };
    }
    for file in ["slab_size", "object_size"] {
        let path = Path::new("/sys/kernel/slab/nf_conntrack").join(file);
        if let Some(b) = fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .filter(|b| *b > 0)
        {
            return ObjectSize {
                bytes: b,
                source: path.display().to_string(),
            };
        }
    }
    ObjectSize::default()
}

/// objsize of the `nf_conntrack` cache (older kernels name one cache per
/// namespace `nf_conntrack_<hex>`); never `nf_conntrack_expect`.
pub(crate) fn parse_slabinfo(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let name = *f.first()?;
        let ours = name == "nf_conntrack"
            || name
                .strip_prefix("nf_conntrack_")
                .is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()));
        if !ours {
            return None;
        }
        f.get(3)?.parse().ok().filter(|b| *b > 0)
    })
}

/// Counts per direction: inbound, local, unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct ByRole([u64; 3]);

impl ByRole {
    fn of(role: Role, n: u64) -> Self {
        let mut v = [0; 3];
        v[match role {
            Role::Inbound => 0,
            Role::Local => 1,
            Role::Unknown => 2,
        }] = n;
        ByRole(v)
    }

    fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The most frequent direction (inbound first on ties).
    fn role(&self) -> Role {
        let i = (0..3).max_by_key(|i| (self.0[*i], 3 - *i)).unwrap_or(2);
        [Role::Inbound, Role::Local, Role::Unknown][i]
    }
}

impl AddAssign for ByRole {
    fn add_assign(&mut self, o: Self) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a += b;
        }
    }
}

/// (protocol, address, port) a flow was sent to, before NAT.
type Destination = (u8, IpAddr, u16);
/// Where NAT sends a destination, and whether the namespace only forwards it.
type Translated = (Option<(IpAddr, u16)>, bool);

/// Per-netns tally of flows by port (with the hook direction), source,
/// destination before NAT, and pod.
#[derive(Debug)]
pub(super) struct FlowTally {
    total: u64,
    pub(super) ports: TopK<PortKey, ByRole>,
    srcs: TopK<IpAddr, ByRole>,
    services: TopK<Destination>,
    /// What the names stage said of each destination.
    ends: HashMap<Destination, Translated>,
    pods: TopK<String>,
}

impl Default for FlowTally {
    fn default() -> Self {
        FlowTally {
            total: 0,
            ports: TopK::new(summary::KEY_BUDGET),
            srcs: TopK::new(summary::KEY_BUDGET),
            services: TopK::new(summary::KEY_BUDGET),
            ends: HashMap::new(),
            pods: TopK::new(summary::KEY_BUDGET),
        }
    }
}

/// The key with the largest sum, and its most frequent direction.
fn lead<K: Copy + Ord + std::hash::Hash>(t: &TopK<K, ByRole>) -> Option<(K, Role, u64)> {
    let (k, v) = t
        .iter()
        .max_by(|a, b| a.1.total().cmp(&b.1.total()).then_with(|| b.0.cmp(a.0)))?;
    Some((*k, v.role(), v.total()))
}

impl FlowTally {
    pub(super) fn add(&mut self, proto: u8, dport: u16, src: IpAddr, role: Role, n: u64) {
        self.total += n;
        let port = PortKey {
            proto,
            port: if has_ports(proto) { dport } else { 0 },
        };
        self.ports.add(port, ByRole::of(role, n));
        self.srcs.add(src, ByRole::of(role, n));
    }

    pub(super) fn culprits(&self) -> Culprits {
        Culprits {
            total: self.total,
            port: lead(&self.ports).map(|(k, role, count)| PortShare {
                proto: k.proto,
                port: k.port,
                role,
                count,
            }),
            src: lead(&self.srcs).map(|(ip, role, count)| SrcShare { ip, role, count }),
            service: self.services.leader().map(|(k, count)| {
                let (backend, forwarded) = self.ends.get(k).copied().unwrap_or((None, false));
                ServiceShare {
                    proto: k.0,
                    addr: k.1,
                    port: k.2,
                    backend,
                    forwarded,
                    count,
                }
            }),
            pod: self.pods.leader().map(|(name, count)| PodShare {
                name: name.clone(),
                count,
            }),
        }
    }

    fn of<'a>(counts: impl Iterator<Item = &'a Count>) -> Self {
        let mut t = FlowTally::default();
        for c in counts {
            let f = &c.flow;
            t.add(f.proto, f.dport, f.src, f.role, c.total);
            if has_ports(f.proto) {
                let k = (f.proto, f.dst, f.dport);
                t.services.add(k, c.total);
                if t.ends.len() < summary::KEY_BUDGET {
                    t.ends.insert(k, (f.service.backend, f.forwarded));
                }
            }
            if let Some(p) = f.pod() {
                t.pods.add(p.to_string(), c.total);
            }
        }
        t
    }
}

fn held_of(s: &Summary, inum: u32, sockets: &mut Sockets) -> TableContents {
    TableContents {
        total: s.entries,
        tcp_states: s.tcp_states.clone(),
        udp: s.l4_count(17),
        udp_unreplied: s.udp_unreplied,
        ipv6: s.ipv6,
        port: s.dst_port.leader().map(|(k, count)| PortShare {
            proto: k.proto,
            port: k.port,
            role: summary::role_of_port(sockets, inum, *k),
            count,
        }),
        src: s.src.leader().map(|(ip, count)| SrcShare {
            ip: *ip,
            role: Role::Unknown,
            count,
        }),
    }
}

/// Attaches for a watch (through eBPF when it loads, through the kernel's
/// counters alone when it does not).
fn open(settings: &Settings, watch: bool, notes: &mut Vec<String>) -> Result<Session, DoctorError> {
    if watch {
        // The per-key count maps are all the doctor reads: stream as few
        // records as the programs allow (0 would mean unlimited).
        let streaming = Streaming {
            new_entries: false,
            budget: 1,
        };
        match Session::attach(settings, streaming) {
            Ok(s) => return Ok(s),
            Err(e) => notes.push(format!(
                "eBPF did not load ({}); judged from the kernel's counters only",
                crate::kernel::loader::chain(&e)
            )),
        }
    }
    Ok(Session::counters_only(settings)?)
}

/// Gathers what [`diagnose`] needs. With a `--watch` window, samples the
/// kernel every [`SAMPLE_EVERY`] for that long (ending early when `stop`
/// resolves) to catch the peak fill.
pub(crate) async fn measure(
    settings: &Settings,
    args: &DoctorArgs,
    stop: impl Future<Output = ()>,
) -> Result<Measured, DoctorError> {
    let mut m = Measured {
        nf_conntrack: Some(Presence::detect()),
        ..Default::default()
    };
    if m.nf_conntrack == Some(Presence::Absent) {
        return Ok(m);
    }
    let table = TableSettings::read()?;
    m.max = table.max;
    m.buckets = table.buckets;
    m.timeouts = table.timeouts;
    m.object_size = object_size();
    let windowed = !args.watch.is_zero();
    // Attach before the first counter read, so the kernel's counters and
    // ctwatch's cover the same window.
    let mut session = open(settings, windowed, &mut m.notes)?;
    let named = session.scope.is_narrowed();
    let watched_by_ebpf = session.probes().is_some();
    // The dumps teach the translations that name a forwarded flow's service.
    let mut sampler = Sampler::start(&mut session, Dumps::Background(DUMP_EVERY))?;
    let first = sampler.sample(&mut session)?;
    let mut peaks: HashMap<u32, u64> = HashMap::new();
    let mut observe = |s: &Sample| {
        for r in &s.netns {
            if let Some(c) = r.count {
                let p = peaks.entry(r.inum).or_default();
                *p = (*p).max(c);
            }
        }
    };
    observe(&first);
    let last = if windowed {
        match session.mode() {
            Some(_) => eprintln!(
                "{}; judging after {:.1}s (Ctrl-C to stop early)",
                session.banner(),
                args.watch.as_secs_f64()
            ),
            None => eprintln!(
                "ctwatch doctor: reading counters for {:.1}s (Ctrl-C to stop early)",
                args.watch.as_secs_f64()
            ),
        }
        let deadline = tokio::time::sleep(args.watch);
        tokio::pin!(deadline);
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                _ = &mut stop => break,
                _ = tick.tick() => observe(&sampler.sample(&mut session)?),
                r = session.events() => { r?; }
            }
        }
        let last = sampler.sample(&mut session)?;
        observe(&last);
        m.window = Some(Window {
            secs: (last.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            mode: session.mode().map(|m| m.to_string()),
            sees_new_flows: session.sees_entries(),
        });
        last
    } else {
        first.clone()
    };

    // Judging nothing would read as "healthy": say what is missing instead.
    if !last.netns.iter().any(|r| r.count.is_some()) {
        if let Some(r) = last.netns.iter().find(|r| r.error.is_some()) {
            return Err(DoctorError::Unreadable {
                inum: r.inum,
                reason: r.error.clone().unwrap_or_default(),
            });
        }
    }
    let init_inum = summary::init_netns().map(|n| n.inum);
    let mut sockets = Sockets::default();
    let scope = session.scope.namespaces().unwrap_or_default();
    for row in &last.netns {
        let Some(count) = row.count else {
            if named {
                m.notes.push(format!(
                    "netns {}: no counters: {}",
                    row.inum,
                    row.error.as_deref().unwrap_or("unreadable")
                ));
            }
            continue;
        };
        let max = row.max.unwrap_or(0);
        if let Some(before) = first
            .netns
            .iter()
            .find(|r| r.inum == row.inum)
            .and_then(|r| r.max)
        {
            if windowed && before != max {
                // Another tool (or a test) moved it: peaks straddle two limits.
                m.notes.push(format!(
                    "netns {}: nf_conntrack_max changed during the window ({before} -> {max}); fill is judged against the last value",
                    row.inum
                ));
            }
        }
        let of_ns = |counts: &'_ [Count]| {
            FlowTally::of(counts.iter().filter(|c| c.flow.netns == row.inum)).culprits()
        };
        let Some(ns) = scope.iter().find(|n| n.inum == row.inum) else {
            continue;
        };
        let mut nm = NetnsMeasure {
            inum: row.inum,
            name: row.name.clone(),
            path: ns.path.clone(),
            is_init: Some(row.inum) == init_inum,
            count,
            max,
            peak: peaks.get(&row.inum).copied().unwrap_or(0).max(count),
            drops_window: windowed.then_some(row.drops_kernel).flatten(),
            early_drop_window: windowed.then_some(row.early_drop).flatten(),
            drops_total: row.kernel.as_ref().map(|k| k.drop),
            full_drops_seen: (windowed && watched_by_ebpf).then_some(row.drops_seen),
            new_flows: (windowed && last.sees_entries).then(|| of_ns(&last.created)),
            refused: (windowed && watched_by_ebpf).then(|| of_ns(&last.victims)),
            held: None,
            timeouts: BTreeMap::new(),
        };
        let active = is_active(&nm);
        if !(active || named) {
            continue;
        }
        held_and_timeouts(&mut nm, ns, &mut sockets, &mut m.notes);
        m.netns.push(nm);
    }
    m.netns.sort_by_key(|n| n.inum);
    Ok(m)
}

fn is_active(nm: &NetnsMeasure) -> bool {
    nm.peak > 0 || nm.drops_window.unwrap_or(0) > 0 || nm.full_drops_seen.unwrap_or(0) > 0
}

/// The entries a namespace holds now, and its own timeouts.
fn held_and_timeouts(
    nm: &mut NetnsMeasure,
    ns: &NetnsInfo,
    sockets: &mut Sockets,
    notes: &mut Vec<String>,
) {
    match Summary::dump_in(ns) {
        Ok(summary) => nm.held = Some(held_of(&summary, ns.inum, sockets)),
        Err(e) => notes.push(format!("netns {}: no ctnetlink dump: {e}", ns.inum)),
    }
    nm.timeouts = netns::run_in(ns, summary::read_timeouts).unwrap_or_default();
}
