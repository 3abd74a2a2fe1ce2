//! Conntrack table dump over ctnetlink (`conntrack -L`), plus the netlink
//! plumbing that `counters` shares for its stats request.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU32, Ordering};

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla, NlaBuffer, NlasIterator,
    Parseable, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple, Tuple,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::source::netns::{self, NetnsError, NetnsInfo};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CtEntry {
    /// 4 or 6.
    pub family: u8,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...).
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// For ICMP and ICMPv6: the echo id.
    pub sport: u16,
    /// For ICMP and ICMPv6: `type << 8 | code`.
    pub dport: u16,
    pub reply_src: IpAddr,
    pub reply_dst: IpAddr,
    pub reply_sport: u16,
    pub reply_dport: u16,
    /// Conntrack's TCP state name as `conntrack -L` prints it.
    pub tcp_state: Option<String>,
    /// `IPS_*` bits.
    pub status: u32,
    pub assured: bool,
    /// Seconds left.
    pub timeout: Option<u32>,
    pub zone: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum CtnetlinkError {
    #[error(
        "cannot open a NETLINK_NETFILTER socket: {0}; ctnetlink needs CAP_NET_ADMIN (run as root)"
    )]
    Socket(#[source] io::Error),
    #[error("ctnetlink request failed: {source}; {hint}")]
    Kernel {
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error("malformed ctnetlink reply: {0}; please report it with `uname -r`")]
    Decode(String),
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

// include/uapi/linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h
pub(crate) const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TIMEOUT: u16 = 7;
const CTA_ZONE: u16 = 18;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;
const IPS_ASSURED: u32 = 1 << 2;

/// Indexed by `enum tcp_conntrack`; names as conntrack-tools prints them.
const TCP_STATES: [&str; 10] = [
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "SYN_SENT2",
];

/// Big enough for any dump skb: the kernel sizes them by the reader's
/// buffer but caps them at 32 KiB.
const RECV_BUF: usize = 64 * 1024;
/// Lets the kernel queue more dump data while we decode.
const SOCK_RCVBUF: usize = 4 << 20;

/// Dumps every conntrack entry (IPv4 and IPv6, all zones) of the calling
/// thread's network namespace.
pub fn dump() -> Result<Vec<CtEntry>, CtnetlinkError> {
    let mut entries = Vec::new();
    for_each(|e| entries.push(e))?;
    Ok(entries)
}

/// Hands every entry of the calling thread's namespace to `f` as its
/// datagram is decoded, so a million-entry table never sits in memory.
pub fn for_each(mut f: impl FnMut(CtEntry)) -> Result<(), CtnetlinkError> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = next_seq();
    let seq = header.sequence_number;
    // AF_UNSPEC asks for every L3 family in one dump.
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
            ConntrackMessage::Get(vec![]),
        )),
    );
    msg.finalize();
    let mut request = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut request);

    run_dump(&request, seq, |msg_type, payload| {
        let subsys = msg_type >> 8;
        let kind = msg_type & 0xff;
        if subsys == NFNL_SUBSYS_CTNETLINK
            && (kind == IPCTNL_MSG_CT_NEW || kind == IPCTNL_MSG_CT_GET)
        {
            if let Some(entry) = decode_entry(payload)? {
                f(entry);
            }
        }
        Ok(())
    })
}

/// [`dump`] inside another network namespace.
pub fn dump_in(ns: &NetnsInfo) -> Result<Vec<CtEntry>, CtnetlinkError> {
    netns::run_in(ns, dump)?
}

pub(crate) fn next_seq() -> u32 {
    static SEQ: AtomicU32 = AtomicU32::new(1);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// Sends one dump request on a fresh NETLINK_NETFILTER socket (in the
/// calling thread's netns) and hands every reply message's type and
/// payload (nfgenmsg onwards) to `each`, datagram by datagram, so nothing
/// but the decoded result accumulates.
pub(crate) fn run_dump(
    request: &[u8],
    seq: u32,
    mut each: impl FnMut(u16, &[u8]) -> Result<(), CtnetlinkError>,
) -> Result<(), CtnetlinkError> {
    let mut sock = Socket::new(NETLINK_NETFILTER).map_err(CtnetlinkError::Socket)?;
    // Best effort: rmem_max may clamp it, and a small buffer is only slower.
    let _ = sock.set_rx_buf_sz(SOCK_RCVBUF);
    sock.bind_auto().map_err(CtnetlinkError::Socket)?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(CtnetlinkError::Socket)?;
    sock.send(request, 0).map_err(kernel_error)?;

    let mut buf = vec![0u8; RECV_BUF];
    loop {
        let n = match sock.recv(&mut &mut buf[..], libc::MSG_TRUNC) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(kernel_error(e)),
        };
        if n > buf.len() {
            return Err(CtnetlinkError::Decode(format!(
                "a {n}-byte datagram does not fit the {}-byte buffer",
                buf.len()
            )));
        }
        if walk_datagram(&buf[..n], seq, &mut each)? == Walk::Done {
            return Ok(());
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Walk {
    More,
    Done,
}

/// Splits one received datagram into netlink messages. Messages carrying
/// another sequence number are ignored; an error reply or an error in
/// NLMSG_DONE ends the dump with that errno.
pub(crate) fn walk_datagram(
    buf: &[u8],
    seq: u32,
    each: &mut impl FnMut(u16, &[u8]) -> Result<(), CtnetlinkError>,
) -> Result<Walk, CtnetlinkError> {
    let mut off = 0;
    while off < buf.len() {
        let nl = NetlinkBuffer::new_checked(&buf[off..])
            .map_err(|e| CtnetlinkError::Decode(e.to_string()))?;
        let len = nl.length() as usize;
        let payload = nl.payload();
        if nl.sequence_number() == seq {
            match nl.message_type() {
                NLMSG_NOOP => {}
                NLMSG_DONE => {
                    // A dump callback's error arrives as a negative int here.
                    if let Some(code) = payload.get(..4) {
                        let code = i32::from_ne_bytes(code.try_into().unwrap());
                        if code < 0 {
                            return Err(kernel_error(io::Error::from_raw_os_error(-code)));
                        }
                    }
                    return Ok(Walk::Done);
                }
                NLMSG_ERROR => {
                    let code = payload
                        .get(..4)
                        .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
                        .ok_or_else(|| CtnetlinkError::Decode("truncated NLMSG_ERROR".into()))?;
                    if code < 0 {
                        return Err(kernel_error(io::Error::from_raw_os_error(-code)));
                    }
                    // A plain ACK: nothing follows for this request.
                    return Ok(Walk::Done);
                }
                NLMSG_OVERRUN => {
                    return Err(CtnetlinkError::Decode(
                        "kernel reported NLMSG_OVERRUN".into(),
                    ))
                }
                other => each(other, payload)?,
            }
        }
        off += (len + 3) & !3;
    }
    Ok(Walk::More)
}

/// Every message of one dump datagram (any sequence number) decoded, as
/// the dump loop would: what the datagram walker and the entry decoder
/// make of untrusted bytes.
pub(crate) fn decode_datagram(buf: &[u8]) -> Result<String, CtnetlinkError> {
    let seq = NetlinkBuffer::new_checked(buf)
        .map(|nl| nl.sequence_number())
        .unwrap_or(0);
    let mut out = String::new();
    walk_datagram(buf, seq, &mut |_, payload| {
        out.push_str(&format!("{:?}\n", decode_entry(payload)?));
        Ok(())
    })?;
    Ok(out)
}

fn kernel_error(source: io::Error) -> CtnetlinkError {
    let hint = match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => "ctnetlink needs CAP_NET_ADMIN (run as root)",
        Some(libc::EOPNOTSUPP) | Some(libc::ENOENT) | Some(libc::EPROTONOSUPPORT) => {
            "the kernel lacks ctnetlink; load it with `modprobe nf_conntrack_netlink`"
        }
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => "the kernel ran short of memory; retry",
        _ => "check that nf_conntrack and nf_conntrack_netlink are loaded",
    };
    CtnetlinkError::Kernel { source, hint }
}

/// Decodes one conntrack message (nfgenmsg onwards). Only the attributes
/// [`CtEntry`] needs are parsed, which keeps big dumps cheap. `None` for
/// an L3 family other than IPv4/IPv6.
pub(crate) fn decode_entry(payload: &[u8]) -> Result<Option<CtEntry>, CtnetlinkError> {
    let nfgen =
        NetfilterHeader::parse(payload).map_err(|e| CtnetlinkError::Decode(e.to_string()))?;
    let family = match nfgen.family {
        NetfilterProtoFamily::IPv4 => 4,
        NetfilterProtoFamily::IPv6 => 6,
        _ => return Ok(None),
    };
    let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let mut orig: Option<TupleParts> = None;
    let mut reply = TupleParts::default();
    let mut entry = CtEntry {
        family,
        proto: 0,
        src: unspecified,
        dst: unspecified,
        sport: 0,
        dport: 0,
        reply_src: unspecified,
        reply_dst: unspecified,
        reply_sport: 0,
        reply_dport: 0,
        tcp_state: None,
        status: 0,
        assured: false,
        timeout: None,
        zone: 0,
    };
    let decode = |e: netlink_packet_core::DecodeError| CtnetlinkError::Decode(e.to_string());
    for nla in NlasIterator::new(&payload[4..]) {
        let nla = nla.map_err(decode)?;
        match nla.kind() {
            CTA_TUPLE_ORIG | CTA_TUPLE_REPLY | CTA_STATUS | CTA_PROTOINFO | CTA_TIMEOUT => {
                match ConntrackAttribute::parse(&nla).map_err(decode)? {
                    ConntrackAttribute::CtaTupleOrig(t) => orig = Some(TupleParts::from_tuples(&t)),
                    ConntrackAttribute::CtaTupleReply(t) => reply = TupleParts::from_tuples(&t),
                    ConntrackAttribute::CtaStatus(s) => entry.status = s.bits(),
                    ConntrackAttribute::CtaTimeout(t) => entry.timeout = Some(t),
                    ConntrackAttribute::CtaProtoInfo(infos) => entry.tcp_state = tcp_state(&infos),
                    _ => {}
                }
            }
            CTA_ZONE => entry.zone = be16(&nla).unwrap_or(0),
            _ => {}
        }
    }
    let orig = orig
        .ok_or_else(|| CtnetlinkError::Decode("conntrack entry without CTA_TUPLE_ORIG".into()))?;
    entry.proto = orig.proto;
    entry.src = orig.src.unwrap_or(unspecified);
    entry.dst = orig.dst.unwrap_or(unspecified);
    entry.sport = orig.sport;
    entry.dport = orig.dport;
    entry.reply_src = reply.src.unwrap_or(unspecified);
    entry.reply_dst = reply.dst.unwrap_or(unspecified);
    entry.reply_sport = reply.sport;
    entry.reply_dport = reply.dport;
    entry.assured = entry.status & IPS_ASSURED != 0;
    Ok(Some(entry))
}

#[derive(Debug, Default)]
struct TupleParts {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    proto: u8,
    sport: u16,
    dport: u16,
}

impl TupleParts {
    fn from_tuples(tuples: &[Tuple]) -> TupleParts {
        let mut parts = TupleParts::default();
        let (mut icmp_type, mut icmp_code) = (None, 0u8);
        for tuple in tuples {
            match tuple {
                Tuple::Ip(ips) => {
                    for ip in ips {
                        match ip {
                            IPTuple::SourceAddress(a) => parts.src = Some(*a),
                            IPTuple::DestinationAddress(a) => parts.dst = Some(*a),
                            _ => {}
                        }
                    }
                }
                Tuple::Proto(protos) => {
                    for p in protos {
                        match p {
                            ProtoTuple::Protocol(n) => parts.proto = u8::from(*n),
                            ProtoTuple::SourcePort(port) => parts.sport = *port,
                            ProtoTuple::DestinationPort(port) => parts.dport = *port,
                            ProtoTuple::Other(nla) => match nla.kind() {
                                CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => {
                                    parts.sport = nla_value_be16(nla).unwrap_or(0)
                                }
                                CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => {
                                    icmp_type = nla_value_u8(nla)
                                }
                                CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => {
                                    icmp_code = nla_value_u8(nla).unwrap_or(0)
                                }
                                _ => {}
                            },
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(t) = icmp_type {
            parts.dport = u16::from(t) << 8 | u16::from(icmp_code);
        }
        parts
    }
}

fn tcp_state(infos: &[ProtoInfo]) -> Option<String> {
    infos.iter().find_map(|info| match info {
        ProtoInfo::TCP(tcp) => tcp.iter().find_map(|t| match t {
            ProtoInfoTCP::State(s) => Some(
                TCP_STATES
                    .get(usize::from(*s))
                    .map_or_else(|| format!("UNKNOWN({s})"), |n| (*n).to_string()),
            ),
            _ => None,
        }),
        _ => None,
    })
}

fn be16(nla: &NlaBuffer<&[u8]>) -> Option<u16> {
    nla.value()
        .get(..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// DefaultNla keeps its bytes private; emitting them is the only way out.
fn nla_value<N: Nla>(nla: &N) -> Vec<u8> {
    let mut v = vec![0u8; nla.value_len()];
    nla.emit_value(&mut v);
    v
}

fn nla_value_be16<N: Nla>(nla: &N) -> Option<u16> {
    let v = nla_value(nla);
    v.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

fn nla_value_u8<N: Nla>(nla: &N) -> Option<u8> {
    nla_value(nla).first().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{DefaultNla, Emitable};
    use netlink_packet_netfilter::conntrack::{Protocol, Status};
    use std::collections::BTreeSet;
    use std::net::{Ipv6Addr, SocketAddr as InetAddr, TcpListener, TcpStream};

    fn tuple(src: IpAddr, dst: IpAddr, proto: u8, extra: Vec<ProtoTuple>) -> Vec<Tuple> {
        let mut p = vec![ProtoTuple::Protocol(Protocol::from(proto))];
        p.extend(extra);
        vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(src),
                IPTuple::DestinationAddress(dst),
            ]),
            Tuple::Proto(p),
        ]
    }

    /// nfgenmsg + attributes, as the kernel would send them.
    fn message(family: NetfilterProtoFamily, attrs: Vec<ConntrackAttribute>) -> Vec<u8> {
        let mut out = vec![0u8; 4 + attrs.as_slice().buffer_len()];
        NetfilterHeader::new(family, 0, 0).emit(&mut out[..4]);
        attrs.as_slice().emit(&mut out[4..]);
        out
    }

    fn nlmsg(msg_type: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = 16 + payload.len();
        let mut out = Vec::with_capacity((len + 3) & !3);
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&msg_type.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize((len + 3) & !3, 0);
        out
    }

    #[test]
    fn decodes_tcp_entry_with_zone_and_state() {
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        let status = Status::Assured | Status::Confirmed | Status::SeenReply;
        let bytes = message(
            NetfilterProtoFamily::IPv4,
            vec![
                ConntrackAttribute::CtaTupleOrig(tuple(
                    a,
                    b,
                    6,
                    vec![
                        ProtoTuple::SourcePort(40000),
                        ProtoTuple::DestinationPort(80),
                    ],
                )),
                ConntrackAttribute::CtaTupleReply(tuple(
                    b,
                    a,
                    6,
                    vec![
                        ProtoTuple::SourcePort(80),
                        ProtoTuple::DestinationPort(40000),
                    ],
                )),
                ConntrackAttribute::CtaStatus(status),
                ConntrackAttribute::CtaTimeout(431999),
                ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![ProtoInfoTCP::State(
                    3,
                )])]),
                // Counters and friends must be skipped, not trip the decoder.
                ConntrackAttribute::Other(DefaultNla::new(12, vec![0, 0, 0, 1])),
                ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, vec![0, 7])),
            ],
        );
        let e = decode_entry(&bytes).unwrap().unwrap();
        assert_eq!(
            e,
            CtEntry {
                family: 4,
                proto: 6,
                src: a,
                dst: b,
                sport: 40000,
                dport: 80,
                reply_src: b,
                reply_dst: a,
                reply_sport: 80,
                reply_dport: 40000,
                tcp_state: Some("ESTABLISHED".into()),
                status: status.bits(),
                assured: true,
                timeout: Some(431999),
                zone: 7,
            }
        );
    }

    #[test]
    fn decodes_icmpv6_entry() {
        let a: IpAddr = "fd00::1".parse().unwrap();
        let b: IpAddr = Ipv6Addr::LOCALHOST.into();
        let icmp = |id: u16, ty: u8| {
            vec![
                ProtoTuple::Other(DefaultNla::new(
                    CTA_PROTO_ICMPV6_ID,
                    id.to_be_bytes().to_vec(),
                )),
                ProtoTuple::Other(DefaultNla::new(CTA_PROTO_ICMPV6_TYPE, vec![ty])),
                ProtoTuple::Other(DefaultNla::new(CTA_PROTO_ICMPV6_CODE, vec![0])),
            ]
        };
        let bytes = message(
            NetfilterProtoFamily::IPv6,
            vec![
                ConntrackAttribute::CtaTupleOrig(tuple(a, b, 58, icmp(0x1234, 128))),
                ConntrackAttribute::CtaTupleReply(tuple(b, a, 58, icmp(0x1234, 129))),
                ConntrackAttribute::CtaStatus(Status::Confirmed),
            ],
        );
        let e = decode_entry(&bytes).unwrap().unwrap();
        assert_eq!((e.family, e.proto, e.src, e.dst), (6, 58, a, b));
        assert_eq!((e.sport, e.dport), (0x1234, 128 << 8));
        assert_eq!(e.reply_dport, 129 << 8);
        assert_eq!(
            (e.tcp_state, e.assured, e.timeout, e.zone),
            (None, false, None, 0)
        );
    }

    #[test]
    fn rejects_entry_without_original_tuple_and_skips_other_families() {
        let bytes = message(
            NetfilterProtoFamily::IPv4,
            vec![ConntrackAttribute::CtaTimeout(5)],
        );
        assert!(matches!(
            decode_entry(&bytes),
            Err(CtnetlinkError::Decode(_))
        ));
        let bytes = message(NetfilterProtoFamily::Bridge, vec![]);
        assert_eq!(decode_entry(&bytes).unwrap(), None);
        // Truncated attribute header.
        let mut bytes = message(
            NetfilterProtoFamily::IPv4,
            vec![ConntrackAttribute::CtaTimeout(5)],
        );
        bytes[4] = 200;
        assert!(matches!(
            decode_entry(&bytes),
            Err(CtnetlinkError::Decode(_))
        ));
    }

    #[test]
    fn walks_datagrams_and_reports_errors() {
        let mut seen = Vec::new();
        let mut data = nlmsg(0x0100, 9, &[2, 0, 0, 0]);
        data.extend(nlmsg(0x0100, 8, &[2, 0, 0, 0])); // someone else's seq
        data.extend(nlmsg(0x0104, 9, &[0, 0, 0, 1]));
        let mut each = |t: u16, p: &[u8]| {
            seen.push((t, p.len()));
            Ok(())
        };
        assert_eq!(walk_datagram(&data, 9, &mut each).unwrap(), Walk::More);
        let done = nlmsg(NLMSG_DONE, 9, &0i32.to_ne_bytes());
        assert_eq!(walk_datagram(&done, 9, &mut each).unwrap(), Walk::Done);
        assert_eq!(seen, vec![(0x0100, 4), (0x0104, 4)]);

        let err = nlmsg(NLMSG_ERROR, 9, &(-libc::EPERM).to_ne_bytes());
        match walk_datagram(&err, 9, &mut |_, _| Ok(())) {
            Err(CtnetlinkError::Kernel { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EPERM))
            }
            other => panic!("{other:?}"),
        }
        let done_err = nlmsg(NLMSG_DONE, 9, &(-libc::ENOMEM).to_ne_bytes());
        assert!(matches!(
            walk_datagram(&done_err, 9, &mut |_, _| Ok(())),
            Err(CtnetlinkError::Kernel { .. })
        ));
        let mut short = nlmsg(0x0100, 9, &[2, 0, 0, 0]);
        short.truncate(18);
        assert!(matches!(
            walk_datagram(&short, 9, &mut |_, _| Ok(())),
            Err(CtnetlinkError::Decode(_))
        ));
    }

    #[test]
    fn decoding_is_fast_enough_for_big_tables() {
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        let one = message(
            NetfilterProtoFamily::IPv4,
            vec![
                ConntrackAttribute::CtaTupleOrig(tuple(
                    a,
                    b,
                    17,
                    vec![ProtoTuple::SourcePort(1), ProtoTuple::DestinationPort(2)],
                )),
                ConntrackAttribute::CtaTupleReply(tuple(
                    b,
                    a,
                    17,
                    vec![ProtoTuple::SourcePort(2), ProtoTuple::DestinationPort(1)],
                )),
                ConntrackAttribute::CtaStatus(Status::Confirmed),
                ConntrackAttribute::CtaTimeout(30),
                ConntrackAttribute::Other(DefaultNla::new(8, vec![0; 4])),
                ConntrackAttribute::Other(DefaultNla::new(12, vec![0; 8])),
            ],
        );
        let datagram: Vec<u8> = (0..100).flat_map(|_| nlmsg(0x0100, 1, &one)).collect();
        let start = std::time::Instant::now();
        let mut n = 0usize;
        for _ in 0..1000 {
            walk_datagram(&datagram, 1, &mut |_, p| {
                n += decode_entry(p)?.is_some() as usize;
                Ok(())
            })
            .unwrap();
        }
        let took = start.elapsed();
        eprintln!("decoded {n} entries in {took:?}");
        assert_eq!(n, 100_000);
        // Generous for a debug build; a release build is ~10x faster.
        assert!(took.as_secs() < 20, "{took:?}");
    }

    /// (proto, src, dst, sport, dport) of each `conntrack -L` line.
    fn conntrack_cli_tuples(out: &str) -> BTreeSet<(u8, IpAddr, IpAddr, u16, u16)> {
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                let proto: u8 = words[1].parse().expect("protocol number");
                let first = |key: &str| {
                    words
                        .iter()
                        .find_map(|w| w.strip_prefix(key))
                        .unwrap_or_else(|| panic!("no {key} in {line}"))
                };
                (
                    proto,
                    first("src=").parse().unwrap(),
                    first("dst=").parse().unwrap(),
                    first("sport=").parse().unwrap(),
                    first("dport=").parse().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn root_dump_matches_conntrack_cli() {
        use crate::source::netns::testutil::*;
        if !can_run(
            "root_dump_matches_conntrack_cli",
            &["ip", "nft", "conntrack"],
        ) {
            return;
        }
        const K: usize = 50;
        let ns = TestNetns::new("ct");
        ns.enable_conntrack();

        // Sockets made on a thread inside the netns stay there afterwards.
        let (v4, v6) = netns::run_in(&ns.info, || {
            (
                TcpListener::bind("127.0.0.1:0").unwrap(),
                TcpListener::bind("[::1]:0").unwrap(),
            )
        })
        .unwrap();
        let addrs: Vec<InetAddr> = vec![v4.local_addr().unwrap(), v6.local_addr().unwrap()];
        let clients = netns::run_in(&ns.info, move || {
            (0..K)
                .map(|i| TcpStream::connect(addrs[i % 2]).unwrap())
                .collect::<Vec<_>>()
        })
        .unwrap();
        let accepted: Vec<TcpStream> = (0..K)
            .map(|i| {
                if i % 2 == 0 { v4.accept() } else { v6.accept() }
                    .unwrap()
                    .0
            })
            .collect();

        let entries = dump_in(&ns.info).unwrap();
        let cli = ns.exec(&["conntrack", "-L"]);
        let cli = conntrack_cli_tuples(&String::from_utf8_lossy(&cli.stdout));

        let ours: BTreeSet<_> = entries
            .iter()
            .map(|e| (e.proto, e.src, e.dst, e.sport, e.dport))
            .collect();
        assert_eq!(entries.len(), cli.len(), "entries: {entries:#?}");
        assert_eq!(ours, cli);
        let tcp: Vec<&CtEntry> = entries.iter().filter(|e| e.proto == 6).collect();
        assert_eq!(tcp.len(), K);
        assert_eq!(tcp.iter().filter(|e| e.family == 6).count(), K / 2);
        for e in &tcp {
            assert_eq!(e.tcp_state.as_deref(), Some("ESTABLISHED"), "{e:?}");
            assert!(e.assured);
            assert_eq!((e.reply_src, e.reply_sport), (e.dst, e.dport));
            assert_eq!((e.reply_dst, e.reply_dport), (e.src, e.sport));
            assert!(e.timeout.unwrap() > 0);
        }
        drop((clients, accepted, v4, v6));
    }

    #[test]
    fn root_dump_of_an_empty_table_is_empty() {
        use crate::source::netns::testutil::*;
        if !can_run("root_dump_of_an_empty_table_is_empty", &["ip"]) {
            return;
        }
        let ns = TestNetns::new("ct0");
        assert_eq!(dump_in(&ns.info).unwrap(), vec![]);
    }
}
