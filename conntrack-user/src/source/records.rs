//! Raw ring-buffer records → the published, serde-serialised event type.
//!
//! This is the only place that interprets kernel bytes; everything
//! downstream works on [`FlowRecord`].
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use conntrack_ebpf::{flags, kind, role, AggKey, FlowEvent, FlowTuple, FLOW_EVENT_SIZE};
use serde::Serialize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring-buffer record of {0} bytes, expected {FLOW_EVENT_SIZE}: ctwatch and its eBPF object were built from different sources; rebuild with `cargo xtask build`")]
    Size(usize),
    #[error("ring-buffer record with unknown kind {0}")]
    Kind(u8),
    #[error("ring-buffer record with unknown address family {0}")]
    Family(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Drop,
    Evict,
    Clash,
    New,
    /// An entry from before attach was freed (aggregation only).
    SeedFree,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Inbound or forwarded: attributed to the listener of the destination port.
    Inbound,
    /// Locally generated: attributed to the sending process.
    Local,
    /// Created outside the packet path (ctnetlink, templates), or seen
    /// without hook context.
    Unknown,
}

/// One direction of a flow, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Tuple {
    pub proto: String,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

/// The task that was running when the kernel saw the packet; only set in
/// task context on the local-out path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub cgroup_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowRecord {
    pub ts_ns: u64,
    /// Published as the line's `type` by the views.
    #[serde(skip)]
    pub kind: Kind,
    pub role: Role,
    pub netns: u32,
    pub tuple: Tuple,
    /// The entry's reply tuple, when the kernel probes read it (new
    /// entries, kprobe mode): after NAT its source is the backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<Tuple>,
    /// The L4 header was not readable (fragment, extension header): ports are 0.
    pub no_l4: bool,
    #[serde(skip_serializing_if = "is_zero")]
    pub ifindex_in: u32,
    #[serde(skip_serializing_if = "is_zero")]
    pub ifindex_out: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
    #[serde(skip_serializing_if = "is_zero64")]
    pub sock_ino: u64,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}
fn is_zero64(v: &u64) -> bool {
    *v == 0
}

/// Protocol name as conntrack tools print it.
pub fn proto_name(proto: u8) -> String {
    match proto {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        33 => "dccp".into(),
        47 => "gre".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        n => format!("proto-{n}"),
    }
}

/// Address from the 16-byte kernel form. Family 0 means the header could
/// not be read; that is reported as the unspecified address.
pub fn addr(family: u8, raw: &[u8; 16]) -> Result<IpAddr, DecodeError> {
    match family {
        conntrack_ebpf::FAMILY_V4 => Ok(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        conntrack_ebpf::FAMILY_V6 => Ok(IpAddr::V6(Ipv6Addr::from(*raw))),
        0 => Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        f => Err(DecodeError::Family(f)),
    }
}

pub fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn tuple(t: &FlowTuple) -> Result<Tuple, DecodeError> {
    Ok(Tuple {
        proto: proto_name(t.proto),
        src: addr(t.family, &t.saddr)?,
        sport: t.sport,
        dst: addr(t.family, &t.daddr)?,
        dport: t.dport,
    })
}

pub fn kind_of(k: u8) -> Result<Kind, DecodeError> {
    match k {
        kind::DROP => Ok(Kind::Drop),
        kind::EVICT => Ok(Kind::Evict),
        kind::CLASH => Ok(Kind::Clash),
        kind::NEW => Ok(Kind::New),
        kind::SEED_FREE => Ok(Kind::SeedFree),
        k => Err(DecodeError::Kind(k)),
    }
}

pub fn role_of(r: u8) -> Role {
    match r {
        role::LOCAL => Role::Local,
        role::INBOUND => Role::Inbound,
        _ => Role::Unknown,
    }
}

/// Copies a record out of the ring buffer. Rejects anything that is not
/// exactly one `FlowEvent`, so a stale object can never be misread.
pub fn parse(bytes: &[u8]) -> Result<FlowEvent, DecodeError> {
    if bytes.len() != FLOW_EVENT_SIZE {
        return Err(DecodeError::Size(bytes.len()));
    }
    // SAFETY: length checked; FlowEvent is repr(C) POD, any bit pattern is valid.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

pub fn decode(ev: &FlowEvent) -> Result<FlowRecord, DecodeError> {
    let task = (ev.flags & flags::TASK != 0).then(|| Task {
        pid: ev.pid,
        tid: ev.tid,
        comm: comm(&ev.comm),
        cgroup_id: ev.cgroup_id,
    });
    Ok(FlowRecord {
        ts_ns: ev.ts_ns,
        kind: kind_of(ev.kind)?,
        role: role_of(ev.role),
        netns: ev.netns,
        tuple: tuple(&ev.tuple)?,
        reply: match ev.reply.family {
            0 => None,
            _ => Some(tuple(&ev.reply)?),
        },
        no_l4: ev.flags & flags::NO_L4 != 0,
        ifindex_in: ev.ifindex_in,
        ifindex_out: ev.ifindex_out,
        task,
        sock_ino: ev.sock_ino,
    })
}

pub fn decode_bytes(bytes: &[u8]) -> Result<FlowRecord, DecodeError> {
    decode(&parse(bytes)?)
}

/// An in-kernel aggregation key, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AggRecord {
    pub kind: Kind,
    pub role: Role,
    pub netns: u32,
    pub proto: u8,
    pub src: IpAddr,
    /// Before NAT.
    pub dst: IpAddr,
    pub dport: u16,
    pub tgid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub sock_ino: u64,
}

pub fn decode_key(k: &AggKey) -> Result<AggRecord, DecodeError> {
    Ok(AggRecord {
        kind: kind_of(k.kind)?,
        role: role_of(k.role),
        netns: k.netns,
        proto: k.proto,
        src: addr(k.family, &k.saddr)?,
        dst: addr(k.family, &k.daddr)?,
        dport: k.dport,
        tgid: k.tgid,
        comm: comm(&k.comm),
        cgroup_id: k.cgroup_id,
        sock_ino: k.sock_ino,
    })
}

/// One flow's identity, to recognise an entry both dumped and created
/// since attach.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FlowId {
    pub netns: u32,
    pub proto: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

impl FlowId {
    pub fn of_tuple(netns: u32, t: &FlowTuple) -> Option<Self> {
        Some(FlowId {
            netns,
            proto: t.proto,
            src: addr(t.family, &t.saddr).ok()?,
            sport: t.sport,
            dst: addr(t.family, &t.daddr).ok()?,
            dport: t.dport,
        })
    }

    pub fn of_entry(netns: u32, e: &crate::source::ctnetlink::CtEntry) -> Self {
        FlowId {
            netns,
            proto: e.proto,
            src: e.src,
            sport: e.sport,
            dst: e.dst,
            dport: e.dport,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(ev: &FlowEvent) -> Vec<u8> {
        // SAFETY: FlowEvent is repr(C) POD without implicit padding.
        unsafe {
            std::slice::from_raw_parts((ev as *const FlowEvent).cast::<u8>(), FLOW_EVENT_SIZE)
        }
        .to_vec()
    }

    fn sample_v4() -> FlowEvent {
        let mut ev = FlowEvent {
            ts_ns: 42,
            kind: kind::DROP,
            role: role::INBOUND,
            netns: 4026532177,
            ifindex_in: 7,
            ..Default::default()
        };
        ev.tuple.family = conntrack_ebpf::FAMILY_V4;
        ev.tuple.proto = 17;
        ev.tuple.saddr[..4].copy_from_slice(&[198, 18, 0, 2]);
        ev.tuple.daddr[..4].copy_from_slice(&[198, 18, 0, 1]);
        ev.tuple.sport = 40000;
        ev.tuple.dport = 5353;
        ev
    }

    #[test]
    fn decodes_inbound_udp_v4() {
        let r = decode_bytes(&bytes_of(&sample_v4())).unwrap();
        assert_eq!(r.kind, Kind::Drop);
        assert_eq!(r.role, Role::Inbound);
        assert_eq!(r.netns, 4026532177);
        assert_eq!(r.tuple.proto, "udp");
        assert_eq!(r.tuple.src.to_string(), "198.18.0.2");
        assert_eq!(r.tuple.dst.to_string(), "198.18.0.1");
        assert_eq!((r.tuple.sport, r.tuple.dport), (40000, 5353));
        assert_eq!(r.task, None, "inbound packets carry no task");
        let json = serde_json::to_value(&r).unwrap();
        assert!(
            json.get("kind").is_none(),
            "the views publish the kind as `type`"
        );
        assert_eq!(json["role"], "inbound");
        assert_eq!(json["ifindex_in"], 7);
        assert!(json.get("ifindex_out").is_none());
        assert!(
            json.get("reply").is_none(),
            "no reply tuple read: none shown"
        );
    }

    #[test]
    fn decodes_the_reply_tuple_of_a_new_entry() {
        let mut ev = sample_v4();
        ev.kind = kind::NEW;
        // DNAT to 198.18.1.9:8053: the backend answers.
        ev.reply = ev.tuple;
        ev.reply.saddr[..4].copy_from_slice(&[198, 18, 1, 9]);
        ev.reply.daddr[..4].copy_from_slice(&[198, 18, 0, 2]);
        (ev.reply.sport, ev.reply.dport) = (8053, 40000);
        let r = decode(&ev).unwrap();
        let reply = r.reply.clone().expect("reply tuple");
        assert_eq!(reply.src.to_string(), "198.18.1.9");
        assert_eq!((reply.sport, reply.dport), (8053, 40000));
        assert_eq!(
            serde_json::to_value(&r).unwrap()["reply"]["src"],
            "198.18.1.9"
        );
        ev.reply.family = 9;
        assert_eq!(decode(&ev), Err(DecodeError::Family(9)));
    }

    #[test]
    fn decodes_local_v6_with_task() {
        let mut ev = sample_v4();
        ev.role = role::LOCAL;
        ev.flags = flags::TASK;
        ev.pid = 1234;
        ev.tid = 1235;
        ev.comm[..6].copy_from_slice(b"ctpeer");
        ev.tuple.family = conntrack_ebpf::FAMILY_V6;
        ev.tuple.proto = 6;
        ev.tuple.saddr = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        ev.tuple.daddr = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let r = decode(&ev).unwrap();
        assert_eq!(r.role, Role::Local);
        assert_eq!(r.tuple.proto, "tcp");
        assert_eq!(r.tuple.src.to_string(), "2001:2::1");
        let t = r.task.unwrap();
        assert_eq!((t.pid, t.tid, t.comm.as_str()), (1234, 1235, "ctpeer"));
    }

    #[test]
    fn rejects_truncated_and_oversized_records() {
        let b = bytes_of(&sample_v4());
        assert_eq!(decode_bytes(&b[..50]), Err(DecodeError::Size(50)));
        assert_eq!(decode_bytes(&[]), Err(DecodeError::Size(0)));
        let mut longer = b.clone();
        longer.push(0);
        assert!(matches!(decode_bytes(&longer), Err(DecodeError::Size(_))));
    }

    #[test]
    fn rejects_garbage_kind_and_family() {
        let mut ev = sample_v4();
        ev.kind = 0xee;
        assert_eq!(decode(&ev), Err(DecodeError::Kind(0xee)));
        let mut ev = sample_v4();
        ev.tuple.family = 9;
        assert_eq!(decode(&ev), Err(DecodeError::Family(9)));
        // All-0xff bytes must be refused, not panic.
        assert!(decode_bytes(&[0xff; FLOW_EVENT_SIZE]).is_err());
    }

    #[test]
    fn comm_stops_at_nul_and_survives_invalid_utf8() {
        let mut raw = [0u8; 16];
        raw[..3].copy_from_slice(b"abc");
        assert_eq!(comm(&raw), "abc");
        let raw = [0xffu8; 16];
        assert_eq!(comm(&raw).chars().count(), 16);
    }

    #[test]
    fn icmp_and_unknown_protocol_names() {
        assert_eq!(proto_name(1), "icmp");
        assert_eq!(proto_name(58), "icmpv6");
        assert_eq!(proto_name(99), "proto-99");
    }

    #[test]
    fn decodes_aggregation_key() {
        let mut k = AggKey {
            kind: kind::DROP,
            role: role::LOCAL,
            netns: 1,
            proto: 17,
            family: conntrack_ebpf::FAMILY_V4,
            dport: 53,
            tgid: 99,
            ..Default::default()
        };
        k.saddr[..4].copy_from_slice(&[198, 19, 1, 1]);
        k.comm[..4].copy_from_slice(b"dig\0");
        let r = decode_key(&k).unwrap();
        assert_eq!(r.src.to_string(), "198.19.1.1");
        assert_eq!(r.comm, "dig");
        assert_eq!(r.role, Role::Local);
    }
}
