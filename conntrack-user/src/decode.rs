//! The byte-level decoders of untrusted input, public for the fuzz
//! targets. Each must return, never panic, whatever the bytes; the `Ok`
//! value is a debug rendering of what was decoded.
use std::{collections::HashMap, path::Path};

use crate::kernel::btf;
use crate::{names, source};

/// Size of every ring-buffer record; the decoder refuses other sizes.
pub const RING_RECORD_SIZE: usize = conntrack_ebpf::FLOW_EVENT_SIZE;

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
    let (mut ports, mut bound, mut malformed) = (HashMap::new(), HashMap::new(), 0);
    names::sockets::parse_table(text, tcp, &mut ports, &mut bound, &mut malformed);
    format!("{ports:?} {bound:?} {malformed}")
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

/// Kernel BTF as the loader reads it: stand-alone BTF (as
/// `/sys/kernel/btf/vmlinux`) and, in the bytes past its end, nf_conntrack's
/// split BTF on top of it; then the loader's lookups: the struct layout and
/// the drop-reason enum.
pub fn btf(bytes: &[u8]) -> Result<String, String> {
    let (vmlinux, module) = bytes.split_at(btf_object_len(bytes));
    let mut kernel =
        btf::KernelBtf::from_bytes(Path::new("<vmlinux>"), vmlinux).map_err(|e| e.to_string())?;
    if !module.is_empty() {
        kernel
            .add_module("nf_conntrack".into(), Path::new("<nf_conntrack>"), module)
            .map_err(|e| e.to_string())?;
    }
    let layout = btf::resolve_layout(&kernel);
    let reason = btf::netfilter_drop_reason(&kernel);
    Ok(format!("{layout:?} {reason:?}"))
}

/// Length of the BTF object at the start of `bytes` by its (little-endian)
/// header: the header, then whichever of the type and string sections ends
/// last. All of `bytes` when the header says more than that or is cut short.
fn btf_object_len(bytes: &[u8]) -> usize {
    let word = |at: usize| -> Option<u64> {
        let b = bytes.get(at..at + 4)?;
        Some(u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
    };
    let len = (|| {
        let (hdr_len, type_off, type_len) = (word(4)?, word(8)?, word(12)?);
        let (str_off, str_len) = (word(16)?, word(20)?);
        usize::try_from(hdr_len + (type_off + type_len).max(str_off + str_len)).ok()
    })();
    len.map_or(bytes.len(), |n| n.min(bytes.len()))
}
