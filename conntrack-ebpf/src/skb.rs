//! The drop path's view of a dropped `sk_buff`, in as few reads as the
//! kernel allows: one read of the `sk_buff` fields, one of the IP header
//! and ports, and per-CPU caches for what the device, the socket and the
//! task imply (namespace, interface, socket inode, comm, cgroup), since a
//! flood repeats them on every packet.
use aya_ebpf::{
    cty::c_void,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{bpf_get_current_cgroup_id, bpf_probe_read_kernel},
    },
    macros::map,
    maps::PerCpuArray,
};
use conntrack_ebpf::{flags, role, FlowEvent, FAMILY_V4, FAMILY_V6, SKB_SPAN};

use crate::common::{conf, net_inum, rd, sock_ino};

/// How long a cached device, socket or task is trusted: a freed pointer
/// reused for another namespace is then misattributed for at most this long.
const CACHE_NS: u64 = 1_000_000_000;

/// The span, as words: the fields are naturally aligned in `sk_buff` and
/// the span starts 8-aligned (userspace checks both), so each is a shift of
/// one word, where an unaligned read of a byte buffer compiled to a load,
/// shift and or per byte.
#[map]
static SPAN: PerCpuArray<[u64; SKB_SPAN / 8]> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct DevCache {
    dev: u64,
    at: u64,
    inum: u32,
    ifindex: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SockCache {
    sk: u64,
    at: u64,
    sock_ino: u64,
    inum: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TaskCache {
    pid_tgid: u64,
    at: u64,
    cgroup_id: u64,
    comm: [u8; 16],
}

#[map]
static DEV: PerCpuArray<DevCache> = PerCpuArray::with_max_entries(1, 0);
#[map]
static SOCK: PerCpuArray<SockCache> = PerCpuArray::with_max_entries(1, 0);
#[map]
static TASK: PerCpuArray<TaskCache> = PerCpuArray::with_max_entries(1, 0);

/// The `sk_buff` fields the drop path needs.
pub struct Fields {
    pub nfct: u64,
    pub sk: u64,
    pub dev: u64,
    pub head: u64,
    pub network_header: u16,
    pub refdst: u64,
}

/// The word-aligned bytes of the span at `off`, shifted down: the field's
/// value in its low bits (little-endian target).
#[inline(always)]
fn at(b: &[u64; SKB_SPAN / 8], off: u32, base: u32) -> u64 {
    let i = off.wrapping_sub(base) as usize;
    match b.get(i >> 3) {
        Some(w) => *w >> ((i & 7) * 8),
        None => 0,
    }
}

/// Reads the fields, in one read when userspace found they fit in one span.
#[inline(always)]
pub fn fields(skb: u64) -> Result<Fields, i32> {
    let base = conf!(skb_span);
    if base != u32::MAX {
        let p = SPAN.get_ptr_mut(0).ok_or(-12)?;
        // SAFETY: a per-CPU map value only this program uses; the kernel never
        // runs a program inside itself on one CPU.
        let b = unsafe { &mut *p };
        let ret = unsafe {
            bpf_probe_read_kernel(
                b.as_mut_ptr() as *mut c_void,
                SKB_SPAN as u32,
                (skb + base as u64) as *const c_void,
            )
        };
        if ret != 0 {
            return Err(ret as i32);
        }
        return Ok(Fields {
            nfct: at(b, conf!(skb_nfct), base),
            sk: at(b, conf!(skb_sk), base),
            dev: at(b, conf!(skb_dev), base),
            head: at(b, conf!(skb_head), base),
            network_header: at(b, conf!(skb_network_header), base) as u16,
            refdst: at(b, conf!(skb_refdst), base),
        });
    }
    Ok(Fields {
        nfct: rd(skb, conf!(skb_nfct))?,
        sk: rd(skb, conf!(skb_sk)).unwrap_or(0),
        dev: rd(skb, conf!(skb_dev)).unwrap_or(0),
        head: rd(skb, conf!(skb_head)).unwrap_or(0),
        network_header: rd(skb, conf!(skb_network_header)).unwrap_or(0),
        refdst: rd(skb, conf!(skb_refdst)).unwrap_or(0),
    })
}

/// Namespace and interface index of a device, through the per-CPU cache.
#[inline(always)]
fn device(dev: u64, now: u64) -> (u32, u32) {
    let Some(c) = DEV.get_ptr_mut(0) else {
        return (0, 0);
    };
    // SAFETY: as in `fields`.
    let c = unsafe { &mut *c };
    if c.dev != dev || now.wrapping_sub(c.at) > CACHE_NS {
        let net: u64 = rd(dev, conf!(dev_nd_net)).unwrap_or(0);
        *c = DevCache {
            dev,
            at: now,
            inum: net_inum(net),
            ifindex: rd(dev, conf!(dev_ifindex)).unwrap_or(0),
        };
    }
    (c.inum, c.ifindex)
}

/// Namespace and socket inode of a socket, through the per-CPU cache.
#[inline(always)]
fn socket(sk: u64, now: u64) -> (u32, u64) {
    let Some(c) = SOCK.get_ptr_mut(0) else {
        return (0, 0);
    };
    // SAFETY: as in `device`.
    let c = unsafe { &mut *c };
    if c.sk != sk || now.wrapping_sub(c.at) > CACHE_NS {
        let net: u64 = rd(sk, conf!(sk_net)).unwrap_or(0);
        *c = SockCache {
            sk,
            at: now,
            sock_ino: sock_ino(sk),
            inum: net_inum(net),
            _pad: 0,
        };
    }
    (c.inum, c.sock_ino)
}

/// The current task's identity, through the per-CPU cache.
#[inline(always)]
fn task(ev: &mut FlowEvent, now: u64) {
    let pt = bpf_get_current_pid_tgid();
    ev.pid = (pt >> 32) as u32;
    ev.tid = pt as u32;
    ev.flags |= flags::TASK;
    let Some(c) = TASK.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as in `device`.
    let c = unsafe { &mut *c };
    if c.pid_tgid != pt || now.wrapping_sub(c.at) > CACHE_NS {
        *c = TaskCache {
            pid_tgid: pt,
            at: now,
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
        };
    }
    ev.cgroup_id = c.cgroup_id;
    // As two words: assigning the array compiles to a call of the object's
    // byte-loop `memmove`, on every locally generated drop.
    const _: () = assert!(
        core::mem::offset_of!(FlowEvent, comm) % 8 == 0
            && core::mem::offset_of!(TaskCache, comm) % 8 == 0
    );
    // SAFETY: both arrays are 16 bytes at 8-aligned offsets (above) of
    // 8-aligned per-CPU map values.
    unsafe {
        let from = c.comm.as_ptr() as *const u64;
        let to = ev.comm.as_mut_ptr() as *mut u64;
        to.write(from.read());
        to.add(1).write(from.add(1).read());
    }
}

/// Who dropped it, where: role, namespace, interface; the sender's task
/// and socket for a locally generated packet (it still carries its socket
/// at LOCAL_OUT; an inbound one has none before early demux, which runs
/// after PRE_ROUTING).
#[inline(always)]
pub fn context(f: &Fields, ev: &mut FlowEvent, now: u64) {
    if f.sk != 0 {
        ev.role = role::LOCAL;
        let (inum, ino) = socket(f.sk, now);
        ev.netns = inum;
        ev.sock_ino = ino;
        task(ev, now);
    } else {
        ev.role = role::INBOUND;
        let (inum, ifindex) = device(f.dev, now);
        ev.netns = inum;
        ev.ifindex_in = ifindex;
    }
}

/// What only a streamed record shows: the output interface of a locally
/// generated packet (three more reads).
#[inline(always)]
pub fn lazy(f: &Fields, ev: &mut FlowEvent) {
    if ev.role == role::LOCAL {
        let dst = f.refdst & !1u64;
        let odev: u64 = rd(dst, conf!(dst_dev)).unwrap_or(0);
        ev.ifindex_out = rd(odev, conf!(dev_ifindex)).unwrap_or(0);
    }
}

/// Fills `ev.tuple` from the IP header and ports, read at once. Returns
/// false if the L3 header is unreadable; a missing L4 header only sets
/// `NO_L4`.
#[inline(always)]
pub fn tuple(f: &Fields, ev: &mut FlowEvent) -> bool {
    let ip = f.head + f.network_header as u64;
    // IPv4 without options or IPv6 without extension headers, ports included.
    let h: [u8; 48] = match rd(ip, 0) {
        Ok(h) => h,
        Err(_) => return crate::common::decode_ip(ip, ev),
    };
    let t = &mut ev.tuple;
    let ports: [u8; 4] = match h[0] >> 4 {
        4 => {
            t.family = FAMILY_V4;
            t.proto = h[9];
            t.saddr[..4].copy_from_slice(&h[12..16]);
            t.daddr[..4].copy_from_slice(&h[16..20]);
            let frag_off = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
            if frag_off != 0 || h[0] & 0x0f != 5 {
                // Fragments have no ports; options move them: the general decoder.
                return crate::common::decode_ip(ip, ev);
            }
            [h[20], h[21], h[22], h[23]]
        }
        6 => {
            t.family = FAMILY_V6;
            t.proto = h[6];
            t.saddr.copy_from_slice(&h[8..24]);
            t.daddr.copy_from_slice(&h[24..40]);
            [h[40], h[41], h[42], h[43]]
        }
        _ => return false,
    };
    match t.proto {
        6 | 17 | 132 | 136 | 33 => {
            t.sport = u16::from_be_bytes([ports[0], ports[1]]);
            t.dport = u16::from_be_bytes([ports[2], ports[3]]);
            true
        }
        // ICMP's id sits past these four bytes, other protocols have none.
        _ => crate::common::decode_ip(ip, ev),
    }
}
