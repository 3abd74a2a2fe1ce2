//! The byte-level decoders of untrusted input, public for the fuzz
//! targets. Each must return, never panic, whatever the bytes; the `Ok`
//! value is a debug rendering of what was decoded.
use std::collections::HashMap;

use crate::{names, source};

/// One ring-buffer record, as the kernel programs write it.
pub fn ring_record(bytes: &[u8]) -> Result<String, String> {
    source::records::decode_bytes(bytes)
        .map(|r| format!("{r:?}"))
        .map_err(|e| e.to_string())
}

/// `/proc/net/stat/nf_conntrack`.
pub fn proc_stat(text: &str) -> Result<String, String> {
    source::counters::parse_proc_stat(text)
        .map(|s| format!("{s:?}"))
        .map_err(|e| e.to_string())
}

/// `/proc/net/{tcp,tcp6}` (listeners) or `/proc/net/{udp,udp6}`.
pub fn socket_table(text: &str, tcp: bool) -> String {
    let (mut ports, mut malformed) = (HashMap::new(), 0);
    names::sockets::parse_table(text, tcp, &mut ports, &mut malformed);
    format!("{ports:?} {malformed}")
}

/// One received ctnetlink datagram of a conntrack dump, every entry
/// decoded.
pub fn ctnetlink_datagram(bytes: &[u8]) -> Result<String, String> {
    source::ctnetlink::decode_datagram(bytes).map_err(|e| e.to_string())
}

/// One CPU's reply to the per-CPU stats request.
pub fn ctnetlink_stats(bytes: &[u8]) -> Result<String, String> {
    source::counters::decode_cpu_stats(bytes)
        .map(|s| format!("{s:?}"))
        .map_err(|e| e.to_string())
}

/// A cgroup v2 path, as `/proc/PID/cgroup` prints it.
pub fn cgroup_path(path: &str) -> String {
    format!("{:?}", names::cgroups::parse_path(path))
}
