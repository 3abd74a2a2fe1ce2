//! One watching session: the loaded programs, their event source, the
//! namespaces in scope and the attribution of kernel keys to rows.
use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use conntrack_ebpf::{AggKey, FlowEvent};

use crate::{
    aggregate::{BreakdownBuilder, Dims, RowKey},
    attribution::Attributor,
    cli::Settings,
    error::Error,
    event::{self, AggRecord, Kind, Role},
    loader::{self, LoadRequest, Loaded},
    netns::{self, NetnsInfo},
    source::KernelSource,
};

/// Which namespaces a session reports on.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// `None`: every namespace.
    only: Option<HashSet<u32>>,
    named: Vec<NetnsInfo>,
}

impl Scope {
    pub fn from_specs(specs: &[String]) -> Result<Self, Error> {
        if specs.is_empty() {
            return Ok(Self::default());
        }
        let named: Vec<NetnsInfo> = specs
            .iter()
            .map(|s| netns::resolve(s))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            only: Some(named.iter().map(|n| n.inum).collect()),
            named,
        })
    }

    pub fn contains(&self, inum: u32) -> bool {
        self.only.as_ref().is_none_or(|s| s.contains(&inum))
    }

    pub fn is_narrowed(&self) -> bool {
        self.only.is_some()
    }

    /// The namespaces to read counters from, as of now.
    pub fn namespaces(&self) -> Result<Vec<NetnsInfo>, Error> {
        if self.only.is_some() {
            return Ok(self.named.clone());
        }
        Ok(netns::list()?)
    }
}

/// Count deltas broken down per kind, for the namespaces in scope.
#[derive(Debug, Default)]
pub struct Tally {
    pub drops: BreakdownBuilder,
    pub new_flows: BreakdownBuilder,
    pub evicted: BreakdownBuilder,
    pub clashed: BreakdownBuilder,
    /// Table-full drops per namespace (the reconciliation's `drops_seen`).
    pub drops_per_netns: HashMap<u32, u64>,
    /// Table-full drops under a decodable key, in scope or not.
    pub drops_keyed: u64,
    /// Counts under keys the decoder refused.
    pub unreadable: u64,
}

/// What identifies a process row before it is resolved: inbound flows go to
/// the listener of (netns, proto, port); local ones to the sending socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum OwnerKey {
    Listener {
        netns: u32,
        proto: u8,
        port: u16,
    },
    Sender {
        sock_ino: u64,
        tgid: u32,
        comm: String,
    },
    /// No hook context (entries from before attach, or made by ctnetlink):
    /// the listener of the port if there is one, else nobody.
    Unknown {
        netns: u32,
        proto: u8,
        port: u16,
    },
}

pub struct Watch {
    pub loaded: Loaded,
    pub source: KernelSource,
    pub scope: Scope,
    attributor: Attributor,
    /// Resolved when first seen, so a process that exits before the end of
    /// the window is still named.
    owners: HashMap<OwnerKey, (RowKey, Instant)>,
    namespaces: HashMap<u32, Option<NetnsInfo>>,
    ifnames: HashMap<(u32, u32), Option<String>>,
    cgroups: crate::cgroups::Cgroups,
    cgroup_names: HashMap<u64, String>,
}

/// Bound on remembered owners; past it, stale ones are dropped first.
const OWNER_CACHE: usize = 65536;
/// How long a resolved owner is trusted before it is looked up again, so a
/// long-running `serve` or `top` follows a port that changes hands.
const OWNER_TTL: Duration = Duration::from_secs(30);

impl Watch {
    /// Loads and attaches. `stream_budget` bounds per-record streaming
    /// (records per second per CPU beyond the first of each key).
    pub fn start(settings: &Settings, stream_new: bool, stream_budget: u32) -> Result<Self, Error> {
        let scope = Scope::from_specs(&settings.netns)?;
        let mut loaded = loader::load(&LoadRequest {
            mode: settings.mode,
            stream_new,
            stream_budget,
        })?;
        let source = KernelSource::new(&mut loaded)?;
        Ok(Self {
            loaded,
            source,
            scope,
            attributor: Attributor::new(),
            owners: HashMap::new(),
            namespaces: HashMap::new(),
            ifnames: HashMap::new(),
            cgroups: crate::cgroups::Cgroups::default(),
            cgroup_names: HashMap::new(),
        })
    }

    /// One line for stderr saying which mode runs and what it hooks.
    pub fn banner(&self) -> String {
        format!(
            "ctwatch: {} mode on kernel {} (attached: {})",
            self.loaded.mode,
            self.loaded.release,
            self.loaded.attached.join(", ")
        )
    }

    fn owner_key(rec: &AggRecord) -> OwnerKey {
        match rec.role {
            Role::Inbound => OwnerKey::Listener {
                netns: rec.netns,
                proto: rec.proto,
                port: rec.dport,
            },
            Role::Local => OwnerKey::Sender {
                sock_ino: rec.sock_ino,
                tgid: rec.tgid,
                comm: rec.comm.clone(),
            },
            Role::Unknown => OwnerKey::Unknown {
                netns: rec.netns,
                proto: rec.proto,
                port: rec.dport,
            },
        }
    }

    fn resolve(&mut self, key: &OwnerKey) -> RowKey {
        match key {
            OwnerKey::Unknown { netns, proto, port } => {
                match self.attributor.listener(*netns, *proto, *port) {
                    Some(o) => RowKey {
                        key: o.comm,
                        pid: Some(o.pid),
                        role: Some("listener"),
                    },
                    None => RowKey::plain("(unknown)"),
                }
            }
            OwnerKey::Listener { netns, proto, port } => {
                match self.attributor.listener(*netns, *proto, *port) {
                    Some(o) => RowKey {
                        key: o.comm,
                        pid: Some(o.pid),
                        role: Some("listener"),
                    },
                    None => RowKey {
                        key: "(no listener)".into(),
                        pid: None,
                        role: Some("listener"),
                    },
                }
            }
            OwnerKey::Sender {
                sock_ino,
                tgid,
                comm,
            } => {
                // The socket's holder is right even for retransmits sent from
                // softirq, where `current` is whatever was interrupted.
                let holder = (*sock_ino != 0)
                    .then(|| self.attributor.socket_owner(*sock_ino))
                    .flatten();
                match holder {
                    Some(o) => RowKey {
                        key: o.comm,
                        pid: Some(o.pid),
                        role: Some("sender"),
                    },
                    None if *tgid != 0 => RowKey {
                        key: comm.clone(),
                        pid: Some(*tgid),
                        role: Some("sender"),
                    },
                    None => RowKey {
                        key: "(unknown sender)".into(),
                        pid: None,
                        role: Some("sender"),
                    },
                }
            }
        }
    }

    pub fn process_row(&mut self, rec: &AggRecord) -> RowKey {
        let key = Self::owner_key(rec);
        let now = Instant::now();
        let cached = self.owners.get(&key).cloned();
        if let Some((row, at)) = &cached {
            if now.duration_since(*at) < OWNER_TTL {
                return row.clone();
            }
        }
        let mut row = self.resolve(&key);
        // A process that has gone since keeps its name on the flows it
        // caused: a later "nobody" must not erase who it was.
        if row.pid.is_none() {
            if let Some((old, _)) = cached.filter(|(old, _)| old.pid.is_some()) {
                row = old;
            }
        }
        if self.owners.len() >= OWNER_CACHE {
            self.owners
                .retain(|_, (_, at)| now.duration_since(*at) < OWNER_TTL);
        }
        if self.owners.len() < OWNER_CACHE {
            self.owners.insert(key, (row.clone(), now));
        }
        row
    }

    /// Resolves the owner of a live event's flow while its process still exists.
    pub fn observe(&mut self, ev: &FlowEvent) -> Option<(event::FlowRecord, RowKey)> {
        let rec = event::decode(ev).ok()?;
        let agg = AggRecord {
            kind: rec.kind,
            role: rec.role,
            netns: rec.netns,
            proto: ev.tuple.proto,
            src: rec.tuple.src,
            dport: rec.tuple.dport,
            tgid: ev.pid,
            comm: event::comm(&ev.comm),
            cgroup_id: ev.cgroup_id,
            sock_ino: ev.sock_ino,
        };
        let row = self.process_row(&agg);
        Some((rec, row))
    }

    fn namespace(&mut self, inum: u32) -> Option<NetnsInfo> {
        if let Some(n) = self.namespaces.get(&inum) {
            return n.clone();
        }
        let info = netns::list()
            .ok()
            .and_then(|l| l.into_iter().find(|n| n.inum == inum));
        if self.namespaces.len() < OWNER_CACHE {
            self.namespaces.insert(inum, info.clone());
        }
        info
    }

    pub fn netns_name(&mut self, inum: u32) -> Option<String> {
        self.namespace(inum).and_then(|n| n.name)
    }

    /// Name of interface `ifindex` inside namespace `inum` (interface
    /// indexes are per namespace, so the lookup runs inside it).
    pub fn interface(&mut self, inum: u32, ifindex: u32) -> Option<String> {
        if ifindex == 0 {
            return None;
        }
        if let Some(n) = self.ifnames.get(&(inum, ifindex)) {
            return n.clone();
        }
        let name = self.namespace(inum).and_then(|ns| {
            netns::run_in(&ns, move || {
                let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
                // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
                let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
                (!p.is_null()).then(|| {
                    // SAFETY: on success buf holds a NUL-terminated name.
                    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
                        .to_string_lossy()
                        .into_owned()
                })
            })
            .ok()
            .flatten()
        });
        if self.ifnames.len() < OWNER_CACHE {
            self.ifnames.insert((inum, ifindex), name.clone());
        }
        name
    }

    pub fn dims(&mut self, rec: &AggRecord) -> Dims {
        Dims {
            src_ip: rec.src.to_string(),
            dst_port: format!("{}/{}", event::proto_name(rec.proto), rec.dport),
            process: self.process_row(rec),
            netns: rec.netns.to_string(),
            cgroup: (rec.cgroup_id != 0).then(|| self.cgroup_name(rec.cgroup_id)),
        }
    }

    /// Breaks count deltas (from `source::counts_since`) down per kind and
    /// dimension, resolving owners on the way.
    pub fn tally(&mut self, deltas: &HashMap<AggKey, u64>) -> Tally {
        let mut t = Tally::default();
        for (key, n) in deltas {
            let Ok(rec) = event::decode_key(key) else {
                t.unreadable += n;
                continue;
            };
            if rec.kind == Kind::Drop {
                t.drops_keyed += n;
            }
            if !self.scope.contains(rec.netns) {
                continue;
            }
            let target = match rec.kind {
                Kind::Drop => {
                    *t.drops_per_netns.entry(rec.netns).or_default() += n;
                    &mut t.drops
                }
                Kind::New => &mut t.new_flows,
                Kind::Evict => &mut t.evicted,
                Kind::Clash => &mut t.clashed,
                Kind::SeedFree => continue,
            };
            let dims = self.dims(&rec);
            target.add(dims, *n);
        }
        t
    }

    /// Adds held entries to a breakdown, keeping only namespaces in scope.
    pub fn breakdown_of(&mut self, records: Vec<(AggRecord, u64)>) -> BreakdownBuilder {
        let mut b = BreakdownBuilder::default();
        for (rec, n) in records {
            if self.scope.contains(rec.netns) {
                let dims = self.dims(&rec);
                b.add(dims, n);
            }
        }
        b
    }

    /// Container label (pod, docker, containerd...) or cgroup path of a
    /// cgroup v2 id; the bare id when neither can be found.
    pub fn cgroup_name(&mut self, id: u64) -> String {
        if let Some(n) = self.cgroup_names.get(&id) {
            return n.clone();
        }
        let name = self
            .cgroups
            .label_of_id(id)
            .or_else(|| self.cgroups.path_of(id))
            .unwrap_or_else(|| format!("cgroup {id}"));
        if self.cgroup_names.len() < OWNER_CACHE {
            self.cgroup_names.insert(id, name.clone());
        }
        name
    }
}
