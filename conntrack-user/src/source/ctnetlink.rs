//! Conntrack table dump over ctnetlink (`conntrack -L`), plus the netlink
//! plumbing that `counters` shares for its stats request.
//!
//! A dump streams: a reader thread receives datagrams into a few buffers
//! while the caller decodes and folds the previous ones, and entries are
//! decoded straight from the datagram into plain values, so a
//! million-entry table costs a handful of buffers and no allocation per
//! entry.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::time::Duration;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLA_TYPE_MASK, NLMSG_DONE,
    NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::ConntrackMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::source::netns::{self, NetnsError, NetnsInfo};

#[derive(Debug, Clone, Copy, PartialEq)]
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
    pub tcp_state: Option<TcpState>,
    /// `IPS_*` bits.
    pub status: u32,
    pub assured: bool,
    /// Seconds left.
    pub timeout: Option<u32>,
    pub zone: u16,
}

/// Conntrack's TCP state (`enum tcp_conntrack`), kept as the kernel's
/// number so an entry stays plain data; it becomes a name only when shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpState(pub u8);

impl std::fmt::Display for TcpState {
    /// As `conntrack -L` prints it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match TCP_STATES.get(usize::from(self.0)) {
            Some(name) => f.write_str(name),
            None => write!(f, "UNKNOWN({})", self.0),
        }
    }
}

#[cfg(test)]
impl TcpState {
    pub fn named(name: &str) -> Option<Self> {
        let i = TCP_STATES.iter().position(|n| *n == name)?;
        u8::try_from(i).ok().map(TcpState)
    }
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
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
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
/// Datagrams in flight between a dump's reader thread and its decoder:
/// enough that neither waits for the other, few enough that a dump's
/// memory does not grow with the table.
const POOL: usize = 4;

/// Every entry of `ns` (IPv4 and IPv6, all zones), collected.
#[cfg(test)]
pub fn dump_in(ns: &NetnsInfo) -> Result<Vec<CtEntry>, CtnetlinkError> {
    let mut entries = Vec::new();
    for_each_in(ns, |e| entries.push(*e))?;
    Ok(entries)
}

/// Dumps the table of `ns` (IPv4 and IPv6, all zones) and hands every
/// entry to `f` on the calling thread, while a reader thread receives the
/// next datagrams: the kernel's half of the dump (done inside `recv`) and
/// the decoding overlap, and at most [`POOL`] datagrams are ever held.
/// Returns the CPU time the dump took on both threads, the kernel's work
/// included, for callers that pace their dumps.
pub fn for_each_in(
    ns: &NetnsInfo,
    mut f: impl FnMut(&CtEntry),
) -> Result<Duration, CtnetlinkError> {
    let seq = next_seq();
    let request = dump_request(seq);
    // Only the socket needs the namespace: it stays there once made.
    let sock = netns::run_in(ns, move || open(&request))??;
    let start = thread_cpu();
    let (full_tx, full_rx) = mpsc::sync_channel(POOL);
    let (free_tx, free_rx) = mpsc::channel();
    for _ in 0..POOL {
        let _ = free_tx.send(vec![0u8; RECV_BUF]);
    }
    let mut each = |msg_type: u16, payload: &[u8]| {
        let subsys = msg_type >> 8;
        let kind = msg_type & 0xff;
        if subsys == NFNL_SUBSYS_CTNETLINK
            && (kind == IPCTNL_MSG_CT_NEW || kind == IPCTNL_MSG_CT_GET)
        {
            if let Some(entry) = decode_entry(payload)? {
                f(&entry);
            }
        }
        Ok(())
    };
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || read_dump(&sock, seq, &free_rx, &full_tx));
        let mut outcome = Err(CtnetlinkError::Decode(
            "the dump ended without NLMSG_DONE".into(),
        ));
        for got in full_rx.iter() {
            let walked = got.and_then(|(buf, n)| {
                let walk = walk_datagram(&buf[..n], seq, &mut each);
                let _ = free_tx.send(buf);
                walk
            });
            match walked {
                Ok(Walk::More) => continue,
                Ok(Walk::Done) => outcome = Ok(()),
                Err(e) => outcome = Err(e),
            }
            break;
        }
        // Hanging up frees a reader that waits for a buffer or a slot.
        drop((free_tx, full_rx));
        let reader_cpu = reader
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        outcome.map(|()| thread_cpu().saturating_sub(start) + reader_cpu)
    })
}

/// A datagram as the reader hands it over: the buffer and its length.
type Received = Result<(Vec<u8>, usize), CtnetlinkError>;

/// The reader's half of a dump: fills free buffers with datagrams and
/// passes them on until the dump ends, fails, or the decoder hangs up.
/// Returns the CPU time it spent.
fn read_dump(
    sock: &Socket,
    seq: u32,
    free: &Receiver<Vec<u8>>,
    full: &SyncSender<Received>,
) -> Duration {
    let start = thread_cpu();
    while let Ok(mut buf) = free.recv() {
        let got = recv_datagram(sock, &mut buf);
        let last = match &got {
            Ok(n) => ends_dump(&buf[..*n], seq),
            Err(_) => true,
        };
        if full.send(got.map(|n| (buf, n))).is_err() || last {
            break;
        }
    }
    thread_cpu().saturating_sub(start)
}

/// Whether a datagram ends dump `seq`: it holds its NLMSG_DONE or an
/// error, or it is malformed (the decoder says how). Headers only, so the
/// reader stops without waiting for a datagram that will never come.
fn ends_dump(buf: &[u8], seq: u32) -> bool {
    let mut off = 0;
    while off < buf.len() {
        let Ok(nl) = NetlinkBuffer::new_checked(&buf[off..]) else {
            return true;
        };
        if nl.sequence_number() == seq
            && matches!(nl.message_type(), NLMSG_DONE | NLMSG_ERROR | NLMSG_OVERRUN)
        {
            return true;
        }
        off += (nl.length() as usize + 3) & !3;
    }
    false
}

/// CPU time, user and system, of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; this clock exists on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// IPCTNL_MSG_CT_GET with NLM_F_DUMP for every L3 family (AF_UNSPEC).
fn dump_request(seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
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
    request
}

pub(crate) fn next_seq() -> u32 {
    static SEQ: AtomicU32 = AtomicU32::new(1);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// A fresh NETLINK_NETFILTER socket in the calling thread's netns, with
/// `request` sent on it.
fn open(request: &[u8]) -> Result<Socket, CtnetlinkError> {
    let mut sock = Socket::new(NETLINK_NETFILTER).map_err(CtnetlinkError::Socket)?;
    // Best effort: rmem_max may clamp it, and a small buffer is only slower.
    let _ = sock.set_rx_buf_sz(SOCK_RCVBUF);
    sock.bind_auto().map_err(CtnetlinkError::Socket)?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(CtnetlinkError::Socket)?;
    sock.send(request, 0).map_err(kernel_error)?;
    Ok(sock)
}

/// One datagram into `buf`; its length.
fn recv_datagram(sock: &Socket, buf: &mut [u8]) -> Result<usize, CtnetlinkError> {
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
        return Ok(n);
    }
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
    let sock = open(request)?;
    let mut buf = vec![0u8; RECV_BUF];
    loop {
        let n = recv_datagram(&sock, &mut buf)?;
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
                            // i32::MIN has no negation; no errno is that big.
                            let errno = code.saturating_neg();
                            return Err(kernel_error(io::Error::from_raw_os_error(errno)));
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
                        let errno = code.saturating_neg();
                        return Err(kernel_error(io::Error::from_raw_os_error(errno)));
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

/// Decodes one conntrack message (nfgenmsg onwards) straight from the
/// datagram, without allocating: only the attributes [`CtEntry`] needs are
/// read, the rest are stepped over. `None` for an L3 family other than
/// IPv4/IPv6.
pub(crate) fn decode_entry(payload: &[u8]) -> Result<Option<CtEntry>, CtnetlinkError> {
    let (nfgen, attrs) = payload
        .split_at_checked(4)
        .ok_or_else(|| CtnetlinkError::Decode("truncated nfgenmsg".into()))?;
    let family = match i32::from(nfgen[0]) {
        libc::AF_INET => 4,
        libc::AF_INET6 => 6,
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
    for nla in nlas(attrs) {
        let (kind, value) = nla?;
        match kind {
            CTA_TUPLE_ORIG => orig = Some(TupleParts::of(value)?),
            CTA_TUPLE_REPLY => reply = TupleParts::of(value)?,
            CTA_STATUS => entry.status = be32(value)?,
            CTA_TIMEOUT => entry.timeout = Some(be32(value)?),
            CTA_PROTOINFO => entry.tcp_state = tcp_state(value)?,
            CTA_ZONE => entry.zone = be16(value).unwrap_or(0),
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

/// The attributes in `buf` as (type, value), each checked against what is
/// left of it. Read by hand: a dump walks some twenty of them per entry,
/// and the netlink crate's checked accessors cost more than the decoding.
fn nlas(buf: &[u8]) -> Nlas<'_> {
    Nlas { rest: buf }
}

struct Nlas<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Nlas<'a> {
    type Item = Result<(u16, &'a [u8]), CtnetlinkError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let &[l0, l1, t0, t1, ..] = self.rest else {
            if self.rest.is_empty() {
                return None;
            }
            self.rest = &[];
            return Some(Err(CtnetlinkError::Decode(
                "truncated attribute header".into(),
            )));
        };
        let len = usize::from(u16::from_ne_bytes([l0, l1]));
        let Some(value) = self.rest.get(4..len) else {
            let left = self.rest.len();
            self.rest = &[];
            return Some(Err(CtnetlinkError::Decode(format!(
                "an attribute of length {len} where {left} bytes are left"
            ))));
        };
        // The last attribute may go without its padding.
        self.rest = self.rest.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some(Ok((u16::from_ne_bytes([t0, t1]) & NLA_TYPE_MASK, value)))
    }
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
    /// A CTA_TUPLE_ORIG or CTA_TUPLE_REPLY value: CTA_TUPLE_IP and
    /// CTA_TUPLE_PROTO, each nested.
    fn of(tuple: &[u8]) -> Result<TupleParts, CtnetlinkError> {
        let mut parts = TupleParts::default();
        let (mut icmp_type, mut icmp_code) = (None, 0u8);
        for nla in nlas(tuple) {
            let (kind, value) = nla?;
            match kind {
                CTA_TUPLE_IP => {
                    for ip in nlas(value) {
                        let (kind, v) = ip?;
                        match kind {
                            CTA_IP_V4_SRC | CTA_IP_V6_SRC => parts.src = Some(addr(v)?),
                            CTA_IP_V4_DST | CTA_IP_V6_DST => parts.dst = Some(addr(v)?),
                            _ => {}
                        }
                    }
                }
                CTA_TUPLE_PROTO => {
                    for p in nlas(value) {
                        let (kind, v) = p?;
                        match kind {
                            CTA_PROTO_NUM => parts.proto = exact::<1>(v)?[0],
                            CTA_PROTO_SRC_PORT => parts.sport = u16::from_be_bytes(exact(v)?),
                            CTA_PROTO_DST_PORT => parts.dport = u16::from_be_bytes(exact(v)?),
                            CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => {
                                parts.sport = be16(v).unwrap_or(0)
                            }
                            CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => {
                                icmp_type = v.first().copied()
                            }
                            CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => {
                                icmp_code = v.first().copied().unwrap_or(0)
                            }
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
        Ok(parts)
    }
}

/// The state in a CTA_PROTOINFO value, when it is TCP's.
fn tcp_state(protoinfo: &[u8]) -> Result<Option<TcpState>, CtnetlinkError> {
    for info in nlas(protoinfo) {
        let (kind, value) = info?;
        if kind != CTA_PROTOINFO_TCP {
            continue;
        }
        for tcp in nlas(value) {
            let (kind, v) = tcp?;
            if kind == CTA_PROTOINFO_TCP_STATE {
                return Ok(v.first().map(|s| TcpState(*s)));
            }
        }
    }
    Ok(None)
}

/// A value that must be exactly `N` bytes long.
fn exact<const N: usize>(v: &[u8]) -> Result<[u8; N], CtnetlinkError> {
    v.try_into().map_err(|_| {
        CtnetlinkError::Decode(format!("a {}-byte attribute where {N} were due", v.len()))
    })
}

fn be32(v: &[u8]) -> Result<u32, CtnetlinkError> {
    exact(v).map(u32::from_be_bytes)
}

fn be16(v: &[u8]) -> Option<u16> {
    v.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

fn addr(v: &[u8]) -> Result<IpAddr, CtnetlinkError> {
    match v.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(exact::<4>(v)?))),
        _ => Ok(IpAddr::V6(Ipv6Addr::from(exact::<16>(v)?))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{DefaultNla, Emitable};
    use netlink_packet_netfilter::conntrack::{
        ConntrackAttribute, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple, Protocol, Status, Tuple,
    };
    use std::collections::BTreeSet;
    use std::net::{SocketAddr as InetAddr, TcpListener, TcpStream};

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
                tcp_state: Some(TcpState(3)),
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

    /// Found by the ctnetlink_datagram fuzz target: NLMSG_DONE carrying
    /// i32::MIN, whose negation overflowed. The same code in NLMSG_ERROR
    /// took the same path.
    #[test]
    fn error_code_i32_min_is_an_error_not_a_panic() {
        let done: [u8; 20] = [
            0x14, 0, 0, 0, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80,
        ];
        let mut error = done;
        error[4] = NLMSG_ERROR as u8;
        for datagram in [done, error] {
            match decode_datagram(&datagram) {
                Err(CtnetlinkError::Kernel { source, .. }) => {
                    assert_eq!(source.raw_os_error(), Some(i32::MAX))
                }
                other => panic!("{other:?}"),
            }
        }
    }

    /// Counts each thread's allocations, so the decoder's work can be
    /// measured without a clock: other tests allocate on their own threads.
    struct CountingAlloc;

    thread_local! {
        static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    fn count_allocation() {
        // try_with: a thread still allocates while its locals are destroyed.
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
    }

    // SAFETY: every call is passed unchanged to the system allocator.
    unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            count_allocation();
            unsafe { std::alloc::System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
            count_allocation();
            unsafe { std::alloc::System.alloc_zeroed(layout) }
        }

        unsafe fn realloc(
            &self,
            ptr: *mut u8,
            layout: std::alloc::Layout,
            new_size: usize,
        ) -> *mut u8 {
            count_allocation();
            unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static COUNTING: CountingAlloc = CountingAlloc;

    /// Entries decoded from `datagram`, walked `times` times, and the
    /// allocations that took on this thread.
    fn decode_counting(datagram: &[u8], times: usize) -> (usize, u64) {
        let before = ALLOCATIONS.with(|n| n.get());
        let mut entries = 0usize;
        for _ in 0..times {
            walk_datagram(datagram, 1, &mut |_, p| {
                entries += decode_entry(p)?.is_some() as usize;
                Ok(())
            })
            .unwrap_or_else(|e| panic!("the decoder refused the datagram: {e}"));
        }
        (entries, ALLOCATIONS.with(|n| n.get()) - before)
    }

    /// A big table decodes without a single allocation, whatever the
    /// attributes CtEntry ignores. Allocations stand for the work: unlike a
    /// timer they come out the same on a loaded machine, and a regression
    /// (an attribute parsed into a Vec, a state name per entry) shows up in
    /// them exactly.
    #[test]
    fn decoding_big_tables_allocates_nothing() {
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        let needed = || {
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
                ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![ProtoInfoTCP::State(
                    3,
                )])]),
            ]
        };
        let one = message(NetfilterProtoFamily::IPv4, needed());
        // What a real dump adds: mark, counters, use count, id, timestamps.
        // The mark is one byte short of its u32: parsing it would fail.
        let mut extra = needed();
        extra.push(ConntrackAttribute::Other(DefaultNla::new(8, vec![0xff])));
        for kind in [9, 10, 11, 12, 20] {
            extra.push(ConntrackAttribute::Other(DefaultNla::new(
                kind,
                vec![0; 16],
            )));
        }
        let padded = message(NetfilterProtoFamily::IPv4, extra);

        let datagram = |payload: &[u8], n: usize| -> Vec<u8> {
            (0..n).flat_map(|_| nlmsg(0x0100, 1, payload)).collect()
        };
        let before = ALLOCATIONS.with(|n| n.get());
        drop(std::hint::black_box(Box::new(0u64)));
        assert_eq!(
            ALLOCATIONS.with(|n| n.get()) - before,
            1,
            "the counting allocator is not in use"
        );

        let (n, allocations) = decode_counting(&datagram(&padded, 1), 1);
        assert_eq!((n, allocations), (1, 0), "attributes CtEntry ignores cost");
        // 1000 datagrams of 100 entries: a 100,000-entry table.
        let one_hundred = datagram(&one, 100);
        let (n, allocations) = decode_counting(&one_hundred, 1000);
        assert_eq!(n, 100_000);
        assert_eq!(allocations, 0, "decoding allocates per entry");
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
            assert_eq!(
                e.tcp_state.map(|s| s.to_string()).as_deref(),
                Some("ESTABLISHED"),
                "{e:?}"
            );
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
