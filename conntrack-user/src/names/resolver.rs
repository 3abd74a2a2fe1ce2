//! One resolver for every name a view shows: the process behind a flow,
//! its container or pod, a namespace's name and an interface's. Every
//! lookup goes through the stage's one cache policy ([`super::cache`]).
use std::{fs, net::IpAddr, os::unix::fs::MetadataExt};

use super::{
    cache::Cache,
    cgroups::{pod_of, Cgroups},
    endpoints::Endpoints,
    sockets::Sockets,
};
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

/// One end of a flow, named as far as this host can.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct End {
    /// Where packets came from, or were sent to (before NAT).
    pub(crate) addr: IpAddr,
    pub(crate) port: u16,
    /// After NAT: where a translated destination really is.
    pub(crate) backend: Option<(IpAddr, u16)>,
    /// The namespace on this host that owns the address, if any does.
    pub(crate) netns: Option<u32>,
    /// The process holding the socket at this end (listener or sender).
    pub(crate) process: Option<Process>,
    /// Its container or pod.
    pub(crate) container: Option<String>,
}

impl End {
    /// An address of this host whose socket was not found.
    fn unresolved(&self) -> bool {
        self.netns.is_some() && self.process.is_none()
    }
}

/// A kernel aggregation key with its names: what every view ranks by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Flow {
    pub(crate) kind: Kind,
    pub(crate) role: Role,
    /// The namespace whose table counted it.
    pub(crate) netns: u32,
    pub(crate) proto: u8,
    pub(crate) src: IpAddr,
    /// Before NAT.
    pub(crate) dst: IpAddr,
    pub(crate) dport: u16,
    /// The sender of a locally generated flow, else the destination's
    /// listener (the `by_process` dimension).
    pub(crate) process: Process,
    /// The container or pod of that process (or of the cgroup the kernel
    /// saw), when it runs in one.
    pub(crate) container: Option<String>,
    /// The cgroup the kernel saw: a container label, else the cgroup path.
    pub(crate) cgroup: Option<String>,
    pub(crate) origin: End,
    pub(crate) service: End,
    /// Neither end lives in the namespace that counted it: the packets were
    /// forwarded through it (a node between pods, a router).
    pub(crate) forwarded: bool,
}

impl Flow {
    /// The pod (or container, outside Kubernetes) a flow belongs to: its
    /// origin's when the origin runs on this host, else its destination's.
    pub(crate) fn pod(&self) -> Option<&str> {
        match self.origin.netns {
            Some(_) => self.origin.container.as_deref(),
            None => self.service.container.as_deref(),
        }
        .map(pod_of)
    }
}

#[derive(Debug, Default)]
pub(crate) struct Resolver {
    sockets: Sockets,
    cgroups: Cgroups,
    namespaces: Cache<u32, Option<NetnsInfo>>,
    interfaces: Cache<(u32, u32), Option<String>>,
    cgroup_names: Cache<u64, String>,
    /// Resolved when first seen, so a process that exits before the end of
    /// the window is still named.
    flows: Cache<AggRecord, Flow>,
    endpoints: Endpoints,
    ns_containers: Cache<u32, Option<String>>,
    /// (netns, proto, address, port) before NAT → after, from the table.
    nat: Cache<(u32, u8, IpAddr, u16), (IpAddr, u16)>,
}

impl Resolver {
    /// The sender of a locally generated flow. The socket's holder is right
    /// even for retransmits sent from softirq, where `current` is whatever
    /// was interrupted; the task the kernel saw is the fallback.
    fn sender(&mut self, rec: &AggRecord) -> Process {
        let holder = (rec.sock_ino != 0)
            .then(|| self.sockets.owner(rec.sock_ino))
            .flatten();
        let (name, pid) = match holder {
            Some(o) => (o.comm, Some(o.pid)),
            None if rec.tgid != 0 => (rec.comm.clone(), Some(rec.tgid)),
            None => ("(unknown sender)".into(), None),
        };
        Process {
            name,
            pid,
            role: Some("sender"),
        }
    }

    /// Remembers that `dst:dport` in namespace `netns` is translated to
    /// `backend` (an entry's reply tuple says so).
    pub(crate) fn learn_nat(
        &mut self,
        (netns, proto, dst, dport): (u32, u8, IpAddr, u16),
        backend: (IpAddr, u16),
    ) {
        self.nat.put((netns, proto, dst, dport), backend);
    }

    fn listener_in(&mut self, netns: u32, proto: u8, port: u16) -> Option<Process> {
        self.sockets.listener(netns, proto, port).map(|o| Process {
            name: o.comm,
            pid: Some(o.pid),
            role: Some("listener"),
        })
    }

    /// The source end: the sender of a local flow, else the socket on
    /// `sport` in whichever namespace of this host owns the source address.
    fn origin(&mut self, rec: &AggRecord, sport: u16, sender: Option<&Process>) -> End {
        let mut end = End {
            addr: rec.src,
            port: sport,
            backend: None,
            netns: None,
            process: None,
            container: None,
        };
        if rec.role == Role::Local {
            end.netns = Some(rec.netns);
            end.process = sender.cloned();
        } else if let Some(ns) = self.endpoints.namespace_of(rec.src) {
            end.netns = Some(ns.inum);
            end.process = self
                .sockets
                .bound(ns.inum, rec.proto, sport)
                .map(|o| Process {
                    name: o.comm,
                    pid: Some(o.pid),
                    role: Some("sender"),
                });
        }
        end.container = match &end.process {
            Some(p) => self.container_of(p),
            None => end.netns.and_then(|n| self.container_in(n)),
        };
        end
    }

    /// The destination end after NAT: the backend an existing entry names
    /// (a dropped packet has none of its own), then the namespace that owns
    /// it and the listener there.
    fn service(&mut self, rec: &AggRecord) -> End {
        let backend = self
            .nat
            .stale(&(rec.netns, rec.proto, rec.dst, rec.dport))
            .copied();
        let (addr, port) = backend.unwrap_or((rec.dst, rec.dport));
        let ns = self.endpoints.namespace_of(addr).map(|n| n.inum);
        // A packet to an address no namespace claims (a broadcast, an
        // unlearned virtual IP) that arrived here is for a listener here.
        let at = ns.or((rec.role != Role::Local && backend.is_none()).then_some(rec.netns));
        let process = at.and_then(|n| self.listener_in(n, rec.proto, port));
        let container = match &process {
            Some(p) => self.container_of(p),
            None => ns.and_then(|n| self.container_in(n)),
        };
        End {
            addr: rec.dst,
            port: rec.dport,
            backend,
            netns: ns,
            process,
            container,
        }
    }

    /// The container or pod of a namespace, from the cgroup of a process in
    /// it: every container of a pod shares the pod's namespace, so one
    /// process names it even when the flow's own socket is gone.
    fn container_in(&mut self, inum: u32) -> Option<String> {
        if let Some(c) = self.ns_containers.fresh(&inum) {
            return c.clone();
        }
        let found = fs::read_dir("/proc").ok().and_then(|d| {
            let pids = d
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    fs::metadata(format!("/proc/{pid}/ns/net"))
                        .is_ok_and(|m| m.ino() as u32 == inum)
                });
            self.cgroups.label_of_netns(pids)
        });
        self.ns_containers.put(inum, found.clone());
        found
    }

    fn container_of(&mut self, p: &Process) -> Option<String> {
        p.pid.and_then(|pid| self.cgroups.label_of_pid(pid))
    }

    /// Every name of a kernel key, resolved once per key and cached.
    /// `sport` is a source port the kernel saw for the key (0: none), to
    /// find the origin's socket.
    pub(crate) fn flow(&mut self, rec: &AggRecord, sport: u16) -> Flow {
        // Keyed by kind too: a victim and an entry holding a slot can share
        // every other field (one client namespace, one destination) and
        // still come from different sockets, each kind's key with the
        // source port of its own.
        let probe = rec.clone();
        let backend = self
            .nat
            .stale(&(rec.netns, rec.proto, rec.dst, rec.dport))
            .copied();
        // A translation learned since the key was named changes its
        // destination: name it again. So does a socket not found yet: the
        // socket tables themselves are re-read at most twice a second.
        if let Some(f) = self.flows.fresh(&probe).filter(|f| {
            f.service.backend == backend && !f.origin.unresolved() && !f.service.unresolved()
        }) {
            return f.clone();
        }
        let sender = (rec.role == Role::Local).then(|| self.sender(rec));
        let mut origin = self.origin(rec, sport, sender.as_ref());
        // A client that has gone since keeps its name on the flows it sent.
        if origin.process.is_none() {
            if let Some(old) = self
                .flows
                .stale(&probe)
                .filter(|o| o.origin.process.is_some())
            {
                origin = old.origin.clone();
            }
        }
        let service = self.service(rec);
        let mut process = match (&sender, &service.process, rec.role) {
            (Some(s), _, _) => s.clone(),
            (None, Some(l), _) => l.clone(),
            (None, None, Role::Unknown) => Process::plain("(unknown)"),
            (None, None, _) => Process {
                name: "(no listener)".into(),
                pid: None,
                role: Some("listener"),
            },
        };
        // A process that has gone since keeps its name on the flows it
        // caused: a later "nobody" must not erase who it was.
        if process.pid.is_none() {
            if let Some(old) = self.flows.stale(&probe).filter(|o| o.process.pid.is_some()) {
                process = old.process.clone();
            }
        }
        let cgroup = (rec.cgroup_id != 0).then(|| self.cgroup(rec.cgroup_id));
        let container = (rec.cgroup_id != 0)
            .then(|| self.cgroups.label_of_id(rec.cgroup_id))
            .flatten()
            .or_else(|| self.container_of(&process));
        let forwarded = rec.role != Role::Local
            && origin.netns != Some(rec.netns)
            && service.netns.is_some_and(|n| n != rec.netns);
        let f = Flow {
            kind: rec.kind,
            role: rec.role,
            netns: rec.netns,
            proto: rec.proto,
            src: rec.src,
            dst: rec.dst,
            dport: rec.dport,
            process,
            container,
            cgroup,
            origin,
            service,
            forwarded,
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
