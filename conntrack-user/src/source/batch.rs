//! Batched reads of per-CPU hash maps (`BPF_MAP_LOOKUP_BATCH` and
//! `BPF_MAP_LOOKUP_AND_DELETE_BATCH`, 5.6+): a few syscalls per map instead
//! of two per key. aya 0.14 has no batch API, so this is `bpf(2)` itself.
use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_LOOKUP_AND_DELETE_BATCH: libc::c_long = 25;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Elements asked for per syscall; a bucket holding more makes the kernel
/// answer ENOSPC, and the batch is retried larger.
const CHUNK: usize = 4096;

/// Every key of a per-CPU hash map with its value on each possible CPU,
/// deleted as it is read when `delete` is set.
pub(crate) fn read_percpu<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    cpus: usize,
    delete: bool,
) -> io::Result<Vec<(K, Vec<V>)>> {
    // The kernel rounds each CPU's value up to 8 bytes.
    let stride = std::mem::size_of::<V>().div_ceil(8) * 8;
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    // A hash map's batch token is a bucket index.
    let mut token = 0u32;
    let mut first = true;
    loop {
        let mut keys = vec![0u8; chunk * std::mem::size_of::<K>()];
        let mut values = vec![0u8; chunk * stride * cpus];
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::addr_of!(token) as u64
            },
            out_batch: std::ptr::addr_of_mut!(next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let cmd = if delete {
            BPF_MAP_LOOKUP_AND_DELETE_BATCH
        } else {
            BPF_MAP_LOOKUP_BATCH
        };
        // SAFETY: `attr` points at buffers sized for `count` elements of
        // this map's key and per-CPU value sizes; the kernel writes no more.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                std::ptr::addr_of_mut!(attr),
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        let got = attr.count as usize;
        for i in 0..got.min(chunk) {
            let k = &keys[i * std::mem::size_of::<K>()..][..std::mem::size_of::<K>()];
            // SAFETY: K is Pod and `k` holds exactly one K.
            let key: K = unsafe { std::ptr::read_unaligned(k.as_ptr().cast()) };
            let per_cpu = (0..cpus)
                .map(|c| {
                    let v = &values[(i * cpus + c) * stride..][..std::mem::size_of::<V>()];
                    // SAFETY: V is Pod and `v` holds exactly one V.
                    unsafe { std::ptr::read_unaligned(v.as_ptr().cast()) }
                })
                .collect();
            out.push((key, per_cpu));
        }
        match err {
            None => {}
            // The end of the map, with the last elements in this answer.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Some(e) if e.raw_os_error() == Some(libc::ENOSPC) && got == 0 => {
                chunk *= 2;
                continue;
            }
            Some(e) => return Err(e),
        }
        token = next;
        first = false;
    }
}
