//! Conntrack's own counters and table size, per network namespace.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use netlink_packet_core::{
    nla_align, parse_u32_be, Emitable, NetlinkBuffer, NetlinkHeader, NlasIterator, NLA_ALIGNTO,
    NLA_HEADER_SIZE, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterProtoFamily};

use crate::source::ctnetlink::{self, CtnetlinkError, NFNL_SUBSYS_CTNETLINK};
use crate::source::netns::{self, NetnsError, NetnsInfo};

/// Summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct CtStats {
    pub found: u64,
    pub invalid: u64,
    pub insert: u64,
    pub insert_failed: u64,
    pub drop: u64,
    pub early_drop: u64,
    pub error: u64,
    pub search_restart: u64,
    pub clash_resolve: u64,
    pub chaintoolong: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Sysctl {
    pub count: u64,
    pub max: u64,
    pub buckets: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum StatsSource {
    ProcFs,
    Ctnetlink,
}

#[derive(Debug, thiserror::Error)]
pub enum CountersError {
    #[error("line {line} of nf_conntrack stats is malformed: {reason}; the kernel's format is not understood")]
    Malformed { line: usize, reason: String },
    #[error("nf_conntrack stats have a header but no per-CPU rows; the read was cut short, retry")]
    NoCpuRows,
    #[error("cannot read {path}: {source}; is nf_conntrack loaded? (modprobe nf_conntrack)")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds {value:?}, not a number; the kernel's sysctl format is not understood")]
    SysctlValue { path: PathBuf, value: String },
    #[error(transparent)]
    Ctnetlink(#[from] CtnetlinkError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// Per netns; read through thread-self so that [`netns::run_in`] works.
const PROC_STAT: &str = "/proc/thread-self/net/stat/nf_conntrack";
/// Per netns by the netns of whoever opens the file.
const SYSCTL_DIR: &str = "/proc/sys/net/netfilter";

// include/uapi/linux/netfilter/nfnetlink_conntrack.h
const IPCTNL_MSG_CT_GET_STATS_CPU: u16 = 4;
const STATS_CPU_MSG_TYPE: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS_CPU;
// include/uapi/linux/netfilter/nfnetlink.h
const NFNETLINK_V0: u8 = 0;
// enum ctattr_stats_cpu
const CTA_STATS_FOUND: u16 = 2;
const CTA_STATS_INVALID: u16 = 4;
const CTA_STATS_INSERT: u16 = 8;
const CTA_STATS_INSERT_FAILED: u16 = 9;
const CTA_STATS_DROP: u16 = 10;
const CTA_STATS_EARLY_DROP: u16 = 11;
const CTA_STATS_ERROR: u16 = 12;
const CTA_STATS_SEARCH_RESTART: u16 = 13;
const CTA_STATS_CLASH_RESOLVE: u16 = 14;
const CTA_STATS_CHAIN_TOOLONG: u16 = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Found,
    Invalid,
    Insert,
    InsertFailed,
    Drop,
    EarlyDrop,
    Error,
    SearchRestart,
    ClashResolve,
    ChainTooLong,
}

impl Field {
    /// Column names of /proc/net/stat/nf_conntrack. 5.9+ reuses the old
    /// `searched` slot as `clashres` and 5.15+ the `delete_list` slot as
    /// `chainlength`, so only names are trustworthy, never positions.
    fn from_column(name: &str) -> Option<Field> {
        Some(match name {
            "found" => Field::Found,
            "invalid" => Field::Invalid,
            "insert" => Field::Insert,
            "insert_failed" => Field::InsertFailed,
            "drop" => Field::Drop,
            "early_drop" => Field::EarlyDrop,
            "icmp_error" | "error" => Field::Error,
            "search_restart" => Field::SearchRestart,
            "clashres" | "clash_resolve" => Field::ClashResolve,
            "chainlength" | "chaintoolong" => Field::ChainTooLong,
            _ => return None,
        })
    }

    fn from_attr(kind: u16) -> Option<Field> {
        Some(match kind {
            CTA_STATS_FOUND => Field::Found,
            CTA_STATS_INVALID => Field::Invalid,
            CTA_STATS_INSERT => Field::Insert,
            CTA_STATS_INSERT_FAILED => Field::InsertFailed,
            CTA_STATS_DROP => Field::Drop,
            CTA_STATS_EARLY_DROP => Field::EarlyDrop,
            CTA_STATS_ERROR => Field::Error,
            CTA_STATS_SEARCH_RESTART => Field::SearchRestart,
            CTA_STATS_CLASH_RESOLVE => Field::ClashResolve,
            CTA_STATS_CHAIN_TOOLONG => Field::ChainTooLong,
            _ => return None,
        })
    }
}

impl CtStats {
    fn add(&mut self, field: Field, value: u64) {
        let slot = match field {
            Field::Found => &mut self.found,
            Field::Invalid => &mut self.invalid,
            Field::Insert => &mut self.insert,
            Field::InsertFailed => &mut self.insert_failed,
            Field::Drop => &mut self.drop,
            Field::EarlyDrop => &mut self.early_drop,
            Field::Error => &mut self.error,
            Field::SearchRestart => &mut self.search_restart,
            Field::ClashResolve => &mut self.clash_resolve,
            Field::ChainTooLong => &mut self.chaintoolong,
        };
        // The kernel's per-CPU counters are 32-bit; only corrupt input can
        // overflow their sum, and it must not panic.
        *slot = slot.saturating_add(value);
    }
}

/// Parses /proc/net/stat/nf_conntrack: a header naming the columns, then
/// one row of hex numbers per possible CPU. Columns this struct has no
/// field for (`entries`, `expect_*`, the always-zero ones) are ignored.
pub fn parse_proc_stat(text: &str) -> Result<CtStats, CountersError> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty());
    let (header_line, header) = lines.next().ok_or(CountersError::Malformed {
        line: 1,
        reason: "the file is empty, the header row is missing".into(),
    })?;
    let columns: Vec<&str> = header.split_whitespace().collect();
    if columns
        .iter()
        .all(|c| c.chars().all(|ch| ch.is_ascii_hexdigit()))
    {
        return Err(CountersError::Malformed {
            line: header_line,
            reason: "the first row holds numbers, not column names".into(),
        });
    }
    let fields: Vec<Option<Field>> = columns.iter().map(|c| Field::from_column(c)).collect();

    let mut stats = CtStats::default();
    let mut rows = 0;
    for (line, row) in lines {
        let values: Vec<&str> = row.split_whitespace().collect();
        if values.len() != columns.len() {
            return Err(CountersError::Malformed {
                line,
                reason: format!(
                    "{} columns where the header names {}",
                    values.len(),
                    columns.len()
                ),
            });
        }
        for ((value, field), name) in values.iter().zip(&fields).zip(&columns) {
            let n = u64::from_str_radix(value, 16).map_err(|_| CountersError::Malformed {
                line,
                reason: format!("column {name} holds {value:?}, not a hex number"),
            })?;
            if let Some(field) = field {
                stats.add(*field, n);
            }
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(CountersError::NoCpuRows);
    }
    Ok(stats)
}

/// Reads the counters of `ns`: from procfs when the kernel has
/// CONFIG_NF_CONNTRACK_PROCFS, else over ctnetlink as `conntrack -S` does.
pub fn read_stats(ns: &NetnsInfo) -> Result<(CtStats, StatsSource), CountersError> {
    netns::run_in(ns, || match fs::read_to_string(PROC_STAT) {
        Ok(text) => Ok((parse_proc_stat(&text)?, StatsSource::ProcFs)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Ok((read_stats_ctnetlink()?, StatsSource::Ctnetlink))
        }
        Err(source) => Err(CountersError::Read {
            path: PROC_STAT.into(),
            source,
        }),
    })?
}

/// nf_conntrack_count, _max and _buckets as seen from inside `ns`.
pub fn read_sysctl(ns: &NetnsInfo) -> Result<Sysctl, CountersError> {
    netns::run_in(ns, || {
        let dir = Path::new(SYSCTL_DIR);
        Ok(Sysctl {
            count: read_u64(&dir.join("nf_conntrack_count"))?,
            max: read_u64(&dir.join("nf_conntrack_max"))?,
            buckets: read_u64(&dir.join("nf_conntrack_buckets"))?,
        })
    })?
}

fn read_u64(path: &Path) -> Result<u64, CountersError> {
    let text = fs::read_to_string(path).map_err(|source| CountersError::Read {
        path: path.into(),
        source,
    })?;
    text.trim().parse().map_err(|_| CountersError::SysctlValue {
        path: path.into(),
        value: text.trim().into(),
    })
}

/// The per-CPU stats dump (`IPCTNL_MSG_CT_GET_STATS_CPU`) of the calling
/// thread's netns, summed. netlink-packet-netfilter has no message type
/// for it, so the request and the reply's attributes go through the
/// crates' generic header, nfgenmsg and NLA types.
pub fn read_stats_ctnetlink() -> Result<CtStats, CountersError> {
    let seq = ctnetlink::next_seq();
    let request = stats_cpu_request(seq);
    let mut stats = CtStats::default();
    let mut cpus = 0;
    ctnetlink::run_dump(&request, seq, |msg_type, payload| {
        if msg_type == STATS_CPU_MSG_TYPE {
            add_cpu_stats(payload, &mut stats)?;
            cpus += 1;
        }
        Ok(())
    })?;
    if cpus == 0 {
        return Err(CountersError::NoCpuRows);
    }
    Ok(stats)
}

/// nlmsghdr (NLM_F_REQUEST | NLM_F_DUMP) + nfgenmsg (AF_UNSPEC,
/// NFNETLINK_V0, res_id 0), no attributes: what `conntrack -S` sends.
fn stats_cpu_request(seq: u32) -> Vec<u8> {
    let nfgen = NetfilterHeader::new(NetfilterProtoFamily::Unspec, NFNETLINK_V0, 0);
    let mut header = NetlinkHeader::default();
    header.message_type = STATS_CPU_MSG_TYPE;
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    // port_number 0: the kernel addresses us by our socket.
    let len = header.buffer_len() + nfgen.buffer_len();
    header.length = len as u32;
    let mut request = vec![0u8; len];
    header.emit(&mut request);
    nfgen.emit(NetlinkBuffer::new(&mut request[..]).payload_mut());
    request
}

/// One CPU's reply (nfgenmsg onwards; res_id is the CPU number) on its own.
pub(crate) fn decode_cpu_stats(payload: &[u8]) -> Result<CtStats, CtnetlinkError> {
    let mut stats = CtStats::default();
    add_cpu_stats(payload, &mut stats)?;
    Ok(stats)
}

/// Adds one CPU's reply to `stats`. Attributes are big-endian u32s; unknown
/// ones, and known ones of another size, are skipped so a newer kernel's
/// additions do no harm. An attribute whose length runs past the message
/// or is shorter than its own header is an error; fewer than
/// `NLA_HEADER_SIZE` bytes after the last attribute are ignored, as
/// libmnl's attribute walk does.
fn add_cpu_stats(payload: &[u8], stats: &mut CtStats) -> Result<(), CtnetlinkError> {
    let nfgen = NetfilterHeader::parse(payload)
        .map_err(|e| CtnetlinkError::Decode(format!("per-CPU stats reply: {e}")))?;
    let attrs = &payload[nfgen.buffer_len()..];
    let mut seen = 0;
    for nla in NlasIterator::new(attrs) {
        let nla = match nla {
            Ok(nla) => nla,
            Err(_) if attrs.len().saturating_sub(seen) < NLA_HEADER_SIZE => break,
            Err(e) => {
                return Err(CtnetlinkError::Decode(format!(
                    "per-CPU stats attribute at offset {seen}: {e}"
                )))
            }
        };
        seen += nla_align!(usize::from(nla.length()));
        if let Some(field) = Field::from_attr(nla.kind()) {
            if let Ok(v) = parse_u32_be(nla.value()) {
                stats.add(field, u64::from(v));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header and rows of this host's 6.18 /proc/net/stat/nf_conntrack.
    const V6_18: &str = "\
entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000003  00000001 00000010 00000000 00000002 00000000 00000000 00000004 00000020 00000003 0000000a 00000005 00000006  00000000 00000000 00000000 00000007
00000003  00000001 00000100 00000000 00000002 00000000 00000000 00000000 00000020 00000000 00000001 00000000 00000000  00000000 00000000 00000000 00000000
";

    /// 5.4: `searched` and `delete_list` where 6.x has clashres and chainlength.
    const V5_4: &str = "\
entries searched found new invalid ignore delete delete_list insert insert_failed drop early_drop icmp_error expect_new expect_create expect_delete search_restart
0000002a 00000063 00000011 00000000 00000001 00000000 00000000 00000000 00000002 00000003 00000004 00000005 00000006 00000000 00000000 00000000 00000008
";

    #[test]
    fn parses_6x_layout_by_name_and_sums_cpus() {
        assert_eq!(
            parse_proc_stat(V6_18).unwrap(),
            CtStats {
                found: 0x110,
                invalid: 4,
                insert: 0x40,
                insert_failed: 3,
                drop: 11,
                early_drop: 5,
                error: 6,
                search_restart: 7,
                clash_resolve: 2,
                chaintoolong: 4,
            }
        );
    }

    #[test]
    fn parses_5_4_layout_without_newer_columns() {
        assert_eq!(
            parse_proc_stat(V5_4).unwrap(),
            CtStats {
                found: 0x11,
                invalid: 1,
                insert: 2,
                insert_failed: 3,
                drop: 4,
                early_drop: 5,
                error: 6,
                search_restart: 8,
                clash_resolve: 0,
                chaintoolong: 0,
            }
        );
    }

    #[test]
    fn malformed_rows_name_their_line() {
        let short = V6_18.replace("00000100 00000000 00000002", "00000100 00000002");
        match parse_proc_stat(&short) {
            Err(CountersError::Malformed { line: 3, reason }) => {
                assert!(reason.contains("columns"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let bad_hex = V5_4.replace("00000011", "0000zz11");
        match parse_proc_stat(&bad_hex) {
            Err(e @ CountersError::Malformed { line: 2, .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("found") && msg.contains("line 2") && !msg.contains('\n'),
                    "{msg}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    /// Found by the proc_stat fuzz target: two rows whose sum overflows u64.
    #[test]
    fn counter_sum_overflow_saturates() {
        let stats = parse_proc_stat("drop\ne\nFFFFFFFFFFFFFFFF").unwrap();
        assert_eq!(stats.drop, u64::MAX);
    }

    #[test]
    fn header_only_and_empty_files_are_errors() {
        let header = V6_18.lines().next().unwrap();
        assert!(matches!(
            parse_proc_stat(header),
            Err(CountersError::NoCpuRows)
        ));
        assert!(matches!(
            parse_proc_stat(&format!("{header}\n\n")),
            Err(CountersError::NoCpuRows)
        ));
        assert!(matches!(
            parse_proc_stat(""),
            Err(CountersError::Malformed { line: 1, .. })
        ));
        let rows_only: String = V6_18.lines().skip(1).collect::<Vec<_>>().join("\n");
        assert!(matches!(
            parse_proc_stat(&rows_only),
            Err(CountersError::Malformed { line: 1, .. })
        ));
    }

    #[test]
    fn this_hosts_file_parses() {
        match fs::read_to_string("/proc/net/stat/nf_conntrack") {
            Ok(text) => {
                parse_proc_stat(&text).unwrap();
            }
            Err(e) => {
                crate::source::netns::testutil::skip_or_fail(
                    "this_hosts_file_parses",
                    &e.to_string(),
                );
            }
        }
    }

    #[test]
    fn stats_request_wire_bytes() {
        let seq = 0x01020304u32;
        // Spelled out field by field as in struct nlmsghdr and nfgenmsg;
        // the nlmsghdr fields are host-endian.
        let mut want = Vec::new();
        want.extend_from_slice(&20u32.to_ne_bytes()); // nlmsg_len
        want.extend_from_slice(&0x0104u16.to_ne_bytes()); // CTNETLINK << 8 | GET_STATS_CPU
        want.extend_from_slice(&0x0301u16.to_ne_bytes()); // NLM_F_REQUEST | NLM_F_DUMP
        want.extend_from_slice(&seq.to_ne_bytes()); // nlmsg_seq
        want.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
        want.extend_from_slice(&[0, 0, 0, 0]); // AF_UNSPEC, NFNETLINK_V0, res_id 0
        assert_eq!(stats_cpu_request(seq), want);
    }

    /// One NLA as the kernel lays it out: host-endian header, padded to 4.
    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = nla_header(4 + value.len() as u16, kind);
        out.extend_from_slice(value);
        out.resize((out.len() + 3) & !3, 0);
        out
    }

    /// An NLA header alone, with whatever length it claims.
    fn nla_header(len: u16, kind: u16) -> Vec<u8> {
        [len.to_ne_bytes(), kind.to_ne_bytes()].concat()
    }

    /// nfgenmsg (res_id = cpu 1) followed by `attrs`.
    fn cpu_reply(attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut payload = vec![0u8, 0, 0, 1];
        for a in attrs {
            payload.extend_from_slice(a);
        }
        payload
    }

    #[test]
    fn cpu_reply_attributes_decode() {
        let mut payload = cpu_reply(&[
            nla(CTA_STATS_FOUND, &7u32.to_be_bytes()),
            nla(CTA_STATS_DROP, &3u32.to_be_bytes()),
            nla(CTA_STATS_CHAIN_TOOLONG, &2u32.to_be_bytes()),
        ]);
        let mut s = CtStats::default();
        add_cpu_stats(&payload, &mut s).unwrap();
        add_cpu_stats(&payload, &mut s).unwrap();
        assert_eq!((s.found, s.drop, s.chaintoolong, s.insert), (14, 6, 4, 0));
        payload.truncate(payload.len() - 2);
        assert!(add_cpu_stats(&payload, &mut s).is_err());
    }

    #[test]
    fn unknown_and_odd_sized_attributes_are_skipped() {
        let payload = cpu_reply(&[
            nla(CTA_STATS_INSERT, &5u32.to_be_bytes()),
            // Not in enum ctattr_stats_cpu (yet): a newer kernel's addition.
            nla(99, &[0xff; 12]),
            // The byte-order flag is masked off the type.
            nla(
                CTA_STATS_INVALID | netlink_packet_core::NLA_F_NET_BYTEORDER,
                &9u32.to_be_bytes(),
            ),
            // A known type with a value that is not a u32 is not counted.
            nla(CTA_STATS_ERROR, &1u64.to_be_bytes()),
            nla(CTA_STATS_EARLY_DROP, &4u32.to_be_bytes()),
        ]);
        assert_eq!(
            decode_cpu_stats(&payload).unwrap(),
            CtStats {
                insert: 5,
                invalid: 9,
                early_drop: 4,
                ..CtStats::default()
            }
        );
        // Nothing but the nfgenmsg: a CPU with no counters.
        assert_eq!(decode_cpu_stats(&[0, 0, 0, 1]).unwrap(), CtStats::default());
        // Up to three stray bytes after the last attribute are no attribute.
        let mut tail = payload.clone();
        tail.extend_from_slice(&[0xaa; 3]);
        assert_eq!(
            decode_cpu_stats(&tail).unwrap(),
            decode_cpu_stats(&payload).unwrap()
        );
    }

    #[test]
    fn malformed_attributes_are_errors() {
        let good = nla(CTA_STATS_FOUND, &1u32.to_be_bytes());
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("no nfgenmsg", vec![0, 0]),
            ("empty", vec![]),
            // The second attribute claims 8 bytes, 6 are left.
            ("truncated", {
                let mut p = cpu_reply(&[good.clone(), good.clone()]);
                p.truncate(p.len() - 2);
                p
            }),
            // nla_len 2 is shorter than the NLA header itself.
            (
                "length below header",
                cpu_reply(&[good.clone(), nla_header(2, CTA_STATS_FOUND)]),
            ),
            // nla_len 0 would loop forever if it were accepted.
            (
                "zero length",
                cpu_reply(&[nla_header(0, CTA_STATS_FOUND), good.clone()]),
            ),
            ("garbage", cpu_reply(&[vec![0xff; 9]])),
            (
                "claims 64 KiB",
                cpu_reply(&[nla_header(0xffff, CTA_STATS_FOUND), vec![0, 0, 0, 1]]),
            ),
        ];
        for (what, payload) in cases {
            match decode_cpu_stats(&payload) {
                Err(CtnetlinkError::Decode(msg)) => assert!(!msg.is_empty(), "{what}"),
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        // Every prefix of every one-byte corruption of a valid reply.
        let valid = cpu_reply(&[
            nla(CTA_STATS_FOUND, &7u32.to_be_bytes()),
            nla(99, &[1, 2, 3]),
            nla(CTA_STATS_SEARCH_RESTART, &2u32.to_be_bytes()),
        ]);
        for i in 0..valid.len() {
            for b in [0x00, 0x01, 0x03, 0x04, 0x7f, 0xff] {
                let mut p = valid.clone();
                p[i] = b;
                for end in 0..=p.len() {
                    let _ = decode_cpu_stats(&p[..end]);
                }
            }
        }
    }

    /// A raw TCP segment with SYN and FIN both set to 127.0.0.1: never
    /// valid, so conntrack counts it in `invalid` (the zero checksum only
    /// adds to that).
    fn send_syn_fin() {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
        assert!(fd >= 0, "raw socket: {}", io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut seg = [0u8; 20];
        seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
        seg[2..4].copy_from_slice(&80u16.to_be_bytes());
        seg[4..8].copy_from_slice(&1u32.to_be_bytes());
        seg[12] = 5 << 4;
        seg[13] = 0x03;
        seg[14..16].copy_from_slice(&1024u16.to_be_bytes());
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: the pointers and lengths describe live, correctly sized
        // locals for the duration of the call.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                seg.as_ptr().cast(),
                seg.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(sent, 20, "sendto: {}", io::Error::last_os_error());
    }

    #[test]
    fn root_procfs_and_ctnetlink_agree() {
        use crate::source::netns::testutil::*;
        use std::net::UdpSocket;
        if !can_run("root_procfs_and_ctnetlink_agree", &["ip", "nft"]) {
            return;
        }
        let ns = TestNetns::new("cnt");
        ns.enable_conntrack();
        const FLOWS: u16 = 40;
        netns::run_in(&ns.info, || {
            let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
            let to = rx.local_addr().unwrap();
            // Held open so every socket has its own source port: one new
            // conntrack entry each (a closed port can be handed out again).
            let mut held = Vec::new();
            for _ in 0..FLOWS {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.send_to(b"x", to).unwrap();
                held.push(s);
            }
            // 6.x no longer counts `found` or `insert`, so ordinary flows
            // leave every counter at zero; an invalid packet moves one.
            send_syn_fin();
        })
        .unwrap();

        let (proc_stats, source) = read_stats(&ns.info).unwrap();
        assert_eq!(
            source,
            StatsSource::ProcFs,
            "this host has CONFIG_NF_CONNTRACK_PROCFS"
        );
        let nl_stats = netns::run_in(&ns.info, read_stats_ctnetlink)
            .unwrap()
            .unwrap();
        assert_eq!(proc_stats, nl_stats);
        assert!(proc_stats.invalid >= 1, "{proc_stats:?}");

        let sysctl = read_sysctl(&ns.info).unwrap();
        assert!(sysctl.count >= u64::from(FLOWS), "{sysctl:?}");
        assert!(sysctl.max > 0 && sysctl.buckets > 0, "{sysctl:?}");

        // The counters are per netns: a fresh one starts at zero.
        let other = TestNetns::new("cnt0");
        let (fresh, _) = read_stats(&other.info).unwrap();
        assert_eq!(fresh, CtStats::default());
        assert_eq!(read_sysctl(&other.info).unwrap().count, 0);
    }
}
