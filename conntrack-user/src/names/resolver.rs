//! One resolver for every name a view shows: the process behind a flow,
//! its container or pod, a namespace's name and an interface's. Every
//! lookup goes through the stage's one cache policy ([`super::cache`]).
use std::net::IpAddr;

use super::{cache::Cache, cgroups::Cgroups, sockets::Sockets};
use crate::source::{
    netns::{self, NetnsInfo},
    records::{AggRecord, Kind, Role},
};

/// The process a flow is attributed to, as published: a command name with
/// its pid, or a placeholder such as `(no listener)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Process {
    pub(crate) name: String,
    pub(crate) pid: Option<u32>,
    pub(crate) role: Option<&'static str>,
}

impl Process {
    pub(crate) fn plain(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            pid: None,
            role: None,
        }
    }
}

/// A kernel aggregation key with its names: what every view ranks by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Flow {
    pub(crate) kind: Kind,
    pub(crate) role: Role,
    pub(crate) netns: u32,
    pub(crate) proto: u8,
    pub(crate) src: IpAddr,
    pub(crate) dport: u16,
    pub(crate) process: Process,
    /// The container or pod of the process (or of the cgroup the kernel
    /// saw), when it runs in one.
    pub(crate) container: Option<String>,
    /// The cgroup the kernel saw: a container label, else the cgroup path.
    pub(crate) cgroup: Option<String>,
}

/// What identifies a process before it is resolved: inbound flows go to
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

impl OwnerKey {
    fn of(rec: &AggRecord) -> Self {
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
}

#[derive(Debug, Default)]
pub(crate) struct Resolver {
    sockets: Sockets,
    cgroups: Cgroups,
    /// Resolved when first seen, so a process that exits before the end of
    /// the window is still named.
    owners: Cache<OwnerKey, Process>,
    namespaces: Cache<u32, Option<NetnsInfo>>,
    interfaces: Cache<(u32, u32), Option<String>>,
    cgroup_names: Cache<u64, String>,
    flows: Cache<AggRecord, Flow>,
}

impl Resolver {
    fn lookup(&mut self, key: &OwnerKey) -> Process {
        let listener = |sockets: &mut Sockets, netns, proto, port| {
            sockets.listener(netns, proto, port).map(|o| Process {
                name: o.comm,
                pid: Some(o.pid),
                role: Some("listener"),
            })
        };
        match key {
            OwnerKey::Unknown { netns, proto, port } => {
                listener(&mut self.sockets, *netns, *proto, *port)
                    .unwrap_or_else(|| Process::plain("(unknown)"))
            }
            OwnerKey::Listener { netns, proto, port } => {
                listener(&mut self.sockets, *netns, *proto, *port).unwrap_or(Process {
                    name: "(no listener)".into(),
                    pid: None,
                    role: Some("listener"),
                })
            }
            OwnerKey::Sender {
                sock_ino,
                tgid,
                comm,
            } => {
                // The socket's holder is right even for retransmits sent from
                // softirq, where `current` is whatever was interrupted.
                let holder = (*sock_ino != 0)
                    .then(|| self.sockets.owner(*sock_ino))
                    .flatten();
                let (name, pid) = match holder {
                    Some(o) => (o.comm, Some(o.pid)),
                    None if *tgid != 0 => (comm.clone(), Some(*tgid)),
                    None => ("(unknown sender)".into(), None),
                };
                Process {
                    name,
                    pid,
                    role: Some("sender"),
                }
            }
        }
    }

    /// The process behind a kernel key.
    pub(crate) fn process(&mut self, rec: &AggRecord) -> Process {
        let key = OwnerKey::of(rec);
        if let Some(p) = self.owners.fresh(&key) {
            return p.clone();
        }
        let mut p = self.lookup(&key);
        // A process that has gone since keeps its name on the flows it
        // caused: a later "nobody" must not erase who it was.
        if p.pid.is_none() {
            if let Some(old) = self.owners.stale(&key).filter(|o| o.pid.is_some()) {
                p = old.clone();
            }
        }
        self.owners.put(key, p.clone());
        p
    }

    /// Every name of a kernel key, resolved once per key and cached.
    pub(crate) fn flow(&mut self, rec: &AggRecord) -> Flow {
        // The kind does not change the names: share one entry.
        let mut probe = rec.clone();
        probe.kind = Kind::New;
        if let Some(f) = self.flows.fresh(&probe) {
            return Flow {
                kind: rec.kind,
                ..f.clone()
            };
        }
        let process = self.process(rec);
        let cgroup = (rec.cgroup_id != 0).then(|| self.cgroup(rec.cgroup_id));
        let container = (rec.cgroup_id != 0)
            .then(|| self.cgroups.label_of_id(rec.cgroup_id))
            .flatten()
            .or_else(|| process.pid.and_then(|p| self.cgroups.label_of_pid(p)));
        let f = Flow {
            kind: rec.kind,
            role: rec.role,
            netns: rec.netns,
            proto: rec.proto,
            src: rec.src,
            dport: rec.dport,
            process,
            container,
            cgroup,
        };
        self.flows.put(probe, f.clone());
        f
    }

    fn namespace(&mut self, inum: u32) -> Option<NetnsInfo> {
        self.namespaces.get_or(inum, || {
            netns::list()
                .ok()
                .and_then(|l| l.into_iter().find(|n| n.inum == inum))
        })
    }

    pub(crate) fn netns_name(&mut self, inum: u32) -> Option<String> {
        self.namespace(inum).and_then(|n| n.name)
    }

    /// `ip netns` name, else the inode; with the container of a process in
    /// it where the namespace is known through a process.
    pub(crate) fn netns_label(&mut self, ns: &NetnsInfo) -> String {
        if let Some(n) = &ns.name {
            return n.clone();
        }
        let pid = ns
            .path
            .strip_prefix("/proc")
            .ok()
            .and_then(|p| p.iter().next())
            .and_then(|p| p.to_str()?.parse::<u32>().ok());
        match pid.and_then(|p| self.cgroups.label_of_pid(p)) {
            Some(c) => format!("{} · {c}", ns.inum),
            None => ns.inum.to_string(),
        }
    }

    /// Name of interface `ifindex` inside namespace `inum` (interface
    /// indexes are per namespace, so the lookup runs inside it).
    pub(crate) fn interface(&mut self, inum: u32, ifindex: u32) -> Option<String> {
        if ifindex == 0 {
            return None;
        }
        if let Some(n) = self.interfaces.fresh(&(inum, ifindex)) {
            return n.clone();
        }
        let name = self.namespace(inum).and_then(|ns| {
            netns::run_in(&ns, move || {
                nix::net::if_::if_indextoname(ifindex)
                    .ok()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .ok()
            .flatten()
        });
        self.interfaces.put((inum, ifindex), name.clone());
        name
    }

    /// Container label (pod, docker, containerd...) or cgroup path of a
    /// cgroup v2 id; the bare id when neither can be found.
    pub(crate) fn cgroup(&mut self, id: u64) -> String {
        if let Some(n) = self.cgroup_names.fresh(&id) {
            return n.clone();
        }
        let name = self
            .cgroups
            .label_of_id(id)
            .or_else(|| self.cgroups.path_of(id))
            .unwrap_or_else(|| format!("cgroup {id}"));
        self.cgroup_names.put(id, name.clone());
        name
    }
}
