//! Counts broken down by the dimensions every report shows: source
//! address, destination port, process, namespace and cgroup, and both ends
//! of a flow (origin, service) with their pod or container.
use std::net::IpAddr;

use serde::Serialize;

use super::topk::{TopK, OTHER};
use crate::{
    names::resolver::{End, Flow, Process},
    source::records,
};

/// One row of a `by_*` list, as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub(crate) struct Item {
    pub(crate) key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) role: Option<&'static str>,
    /// The namespace the process lives in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) netns: Option<u32>,
    /// Its pod or container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) container: Option<String>,
    /// The address and port the flow was sent to, before NAT (`by_service`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) via: Option<String>,
    /// Where NAT sent it (`by_service`), when it was translated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) to: Option<String>,
    pub(crate) count: u64,
}

impl Item {
    fn other(count: u64) -> Self {
        Item {
            key: OTHER.into(),
            count,
            ..Default::default()
        }
    }
}

/// `198.18.0.1:53`, `[fd00::1]:53`.
pub(crate) fn endpoint(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V6(_) => format!("[{addr}]:{port}"),
        IpAddr::V4(_) => format!("{addr}:{port}"),
    }
}

/// A process where it lives: the `by_process` rows.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Located {
    process: Process,
    netns: Option<u32>,
    container: Option<String>,
}

impl Row for Located {
    fn item(&self, count: u64) -> Item {
        Item {
            netns: self.netns,
            container: self.container.clone(),
            ..self.process.item(count)
        }
    }
}

/// One end of a flow as a row: its process where it lives, or why there
/// is none. `via` (the destination before NAT) and `to` (after) name a
/// service; an origin has neither.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct EndRow {
    at: Located,
    via: Option<String>,
    to: Option<String>,
}

impl Row for EndRow {
    fn item(&self, count: u64) -> Item {
        Item {
            via: self.via.clone(),
            to: self.to.clone(),
            ..self.at.item(count)
        }
    }
}

/// The `by_origin` row of a flow.
fn origin_row(o: &End) -> EndRow {
    let process = match (&o.process, o.netns) {
        (Some(p), _) => p.clone(),
        // An address of this host whose socket is gone: a client that sent
        // and closed before anyone looked.
        (None, Some(_)) => Process::plain(format!("(no socket) {}", o.addr)),
        (None, None) => Process::plain("(outside this host)"),
    };
    EndRow {
        at: Located {
            process,
            netns: o.netns,
            container: o.container.clone(),
        },
        via: None,
        to: None,
    }
}

/// The `by_service` row of a flow.
fn service_row(f: &Flow) -> EndRow {
    let s = &f.service;
    EndRow {
        at: Located {
            process: s
                .process
                .clone()
                .unwrap_or_else(|| Process::plain("(no local listener)")),
            netns: s.netns,
            container: s.container.clone(),
        },
        via: Some(format!(
            "{}/{}",
            records::proto_name(f.proto),
            endpoint(s.addr, s.port)
        )),
        to: s.backend.map(|(a, p)| endpoint(a, p)),
    }
}

/// What a key of a ranked list publishes as.
pub(crate) trait Row {
    fn item(&self, count: u64) -> Item;
}

impl Row for String {
    fn item(&self, count: u64) -> Item {
        Item {
            key: self.clone(),
            count,
            ..Default::default()
        }
    }
}

impl Row for Process {
    fn item(&self, count: u64) -> Item {
        Item {
            key: self.name.clone(),
            pid: self.pid,
            role: self.role,
            count,
            ..Default::default()
        }
    }
}

/// The `k` largest rows, with everything else folded into one `other` row
/// placed by its count like any other row.
pub(crate) fn items<K: std::hash::Hash + Eq + Ord>(
    t: &TopK<K>,
    k: usize,
    publish: impl Fn(&K, u64) -> Item,
) -> Vec<Item> {
    let (rows, rest) = t.ranked(k);
    let mut out: Vec<Item> = rows.into_iter().map(|(key, n)| publish(key, n)).collect();
    if rest > 0 {
        let pos = out.iter().position(|i| i.count < rest).unwrap_or(out.len());
        out.insert(pos, Item::other(rest));
    }
    out
}

/// [`items`] of keys that publish under a display name.
pub(crate) fn named<K: std::hash::Hash + Eq + Ord>(
    t: &TopK<K>,
    k: usize,
    name: impl Fn(&K) -> String,
) -> Vec<Item> {
    items(t, k, |key, n| name(key).item(n))
}

/// The dimensions every view breaks counts down by.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct Breakdown {
    pub(crate) total: u64,
    pub(crate) by_src_ip: Vec<Item>,
    pub(crate) by_dst_port: Vec<Item>,
    pub(crate) by_process: Vec<Item>,
    pub(crate) by_netns: Vec<Item>,
    pub(crate) by_cgroup: Vec<Item>,
    pub(crate) by_origin: Vec<Item>,
    pub(crate) by_service: Vec<Item>,
    pub(crate) by_pod: Vec<Item>,
}

/// Distinct keys kept per dimension while counting.
pub(crate) const KEY_BUDGET: usize = 4096;

#[derive(Debug, Clone)]
pub(crate) struct BreakdownBuilder {
    total: u64,
    src_ip: TopK<String>,
    dst_port: TopK<String>,
    process: TopK<Located>,
    netns: TopK<String>,
    cgroup: TopK<String>,
    origin: TopK<EndRow>,
    service: TopK<EndRow>,
    pod: TopK<String>,
}

impl Default for BreakdownBuilder {
    fn default() -> Self {
        Self::new(KEY_BUDGET)
    }
}

/// `udp/5353`.
pub(crate) fn port_label(proto: u8, port: u16) -> String {
    format!("{}/{port}", records::proto_name(proto))
}

impl BreakdownBuilder {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            total: 0,
            src_ip: TopK::new(cap),
            dst_port: TopK::new(cap),
            process: TopK::new(cap),
            netns: TopK::new(cap),
            cgroup: TopK::new(cap),
            origin: TopK::new(cap),
            service: TopK::new(cap),
            pod: TopK::new(cap),
        }
    }

    /// Counts of these flows, with `unattributed` more known only in total.
    pub(crate) fn of<'a>(
        flows: impl IntoIterator<Item = (&'a Flow, u64)>,
        unattributed: u64,
    ) -> Self {
        let mut b = Self::default();
        for (f, n) in flows {
            b.add(f, n);
        }
        b.add_unattributed(unattributed);
        b
    }

    pub(crate) fn add(&mut self, f: &Flow, n: u64) {
        if n == 0 {
            return;
        }
        self.total += n;
        self.src_ip.add(f.src.to_string(), n);
        self.dst_port.add(port_label(f.proto, f.dport), n);
        let at = match f.role {
            records::Role::Local => f.origin.netns,
            _ => f.service.netns,
        };
        self.process.add(
            Located {
                process: f.process.clone(),
                netns: at,
                container: f.container.clone(),
            },
            n,
        );
        self.netns.add(f.netns.to_string(), n);
        if let Some(c) = &f.cgroup {
            self.cgroup.add(c.clone(), n);
        }
        self.origin.add(origin_row(&f.origin), n);
        self.service.add(service_row(f), n);
        self.pod
            .add(f.pod().unwrap_or("(no pod or container)").to_string(), n);
    }

    /// Counts known in total but not per key (in-kernel map overflow).
    pub(crate) fn add_unattributed(&mut self, n: u64) {
        self.total += n;
        self.src_ip.add_other(n);
        self.dst_port.add_other(n);
        self.process.add_other(n);
        self.netns.add_other(n);
        self.origin.add_other(n);
        self.service.add_other(n);
        self.pod.add_other(n);
    }

    pub(crate) fn finish(&self, k: usize) -> Breakdown {
        Breakdown {
            total: self.total,
            by_src_ip: items(&self.src_ip, k, Row::item),
            by_dst_port: items(&self.dst_port, k, Row::item),
            by_process: items(&self.process, k, Row::item),
            by_netns: items(&self.netns, k, Row::item),
            by_cgroup: items(&self.cgroup, k, Row::item),
            by_origin: items(&self.origin, k, Row::item),
            by_service: items(&self.service, k, Row::item),
            by_pod: items(&self.pod, k, Row::item),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::source::records::{Kind, Role};

    pub(crate) fn flow(src: &str, proto: u8, dport: u16, comm: &str, pid: u32, netns: u32) -> Flow {
        Flow {
            kind: Kind::Drop,
            role: Role::Inbound,
            netns,
            proto,
            src: src.parse().unwrap(),
            dst: "198.18.0.1".parse().unwrap(),
            dport,
            process: Process {
                name: comm.into(),
                pid: Some(pid),
                role: Some("listener"),
            },
            container: None,
            cgroup: None,
            origin: End {
                addr: src.parse().unwrap(),
                port: 40000,
                backend: None,
                netns: None,
                process: None,
                container: None,
            },
            service: End {
                addr: "198.18.0.1".parse().unwrap(),
                port: dport,
                backend: None,
                netns: Some(netns),
                process: Some(Process {
                    name: comm.into(),
                    pid: Some(pid),
                    role: Some("listener"),
                }),
                container: None,
            },
            forwarded: false,
        }
    }

    #[test]
    fn breakdown_json_shape() {
        let f = flow("198.18.0.2", 17, 5353, "ctpeer", 1234, 4026532177);
        let v = serde_json::to_value(BreakdownBuilder::of([(&f, 199)], 0).finish(10)).unwrap();
        assert_eq!(v["total"], 199);
        assert_eq!(v["by_src_ip"][0]["key"], "198.18.0.2");
        assert_eq!(v["by_dst_port"][0]["key"], "udp/5353");
        assert_eq!(v["by_process"][0]["pid"], 1234);
        assert_eq!(v["by_process"][0]["role"], "listener");
        assert_eq!(v["by_netns"][0]["count"], 199);
        assert!(v["by_src_ip"][0].get("pid").is_none());
    }

    #[test]
    fn unattributed_counts_go_to_other_in_every_dimension() {
        let mut b = BreakdownBuilder::new(4);
        b.add_unattributed(7);
        let out = b.finish(10);
        assert_eq!(out.total, 7);
        assert_eq!(out.by_src_ip[0].key, OTHER);
        assert_eq!(out.by_netns[0].count, 7);
    }

    #[test]
    fn other_row_sits_where_its_count_belongs() {
        let mut t = TopK::new(10);
        t.add("big".to_string(), 100);
        t.add("s1".to_string(), 2);
        t.add("s2".to_string(), 1);
        let top = items(&t, 1, Row::item);
        assert_eq!(top[0].key, "big");
        assert_eq!((top[1].key.as_str(), top[1].count), (OTHER, 3));
        let mut b = BreakdownBuilder::new(100);
        for i in 0..1000u32 {
            let f = flow(&format!("10.0.{}.{}", i / 250, i % 250), 17, 53, "x", 1, 1);
            b.add(&f, 1);
        }
        let out = b.finish(5);
        assert_eq!(
            out.by_src_ip[0].key, OTHER,
            "the rest outweighs every single key"
        );
        assert_eq!(out.by_src_ip.iter().map(|i| i.count).sum::<u64>(), 1000);
        assert_eq!(out.by_src_ip.len(), 6);
    }
}
