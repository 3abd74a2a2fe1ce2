//! Maps, configuration and packet decoding shared by every hook.
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    },
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use conntrack_ebpf::{stat, AggKey, Config, FlowEvent, FlowTuple, FAMILY_V4, FAMILY_V6};

/// Written by userspace before load (offsets from BTF); zero means "not set".
#[unsafe(no_mangle)]
pub static CONFIG: Config = Config {
    reason_netfilter_drop: 0,
    stream_new: 0,
    skb_nfct: 0,
    skb_sk: 0,
    skb_dev: 0,
    skb_head: 0,
    skb_network_header: 0,
    skb_protocol: 0,
    skb_iif: 0,
    skb_refdst: 0,
    dst_dev: 0,
    dev_ifindex: 0,
    dev_nd_net: 0,
    net_inum: 0,
    sk_net: 0,
    sk_socket: 0,
    socket_to_inode: 0,
    inode_ino: 0,
    state_hook: 0,
    state_in: 0,
    state_out: 0,
    state_net: 0,
    state_sk: 0,
    sk_state: 0,
    conn_tuple: 0,
    conn_net: 0,
    hash_tuple: 0,
    stream_budget: 0,
};

/// 16 MiB: about 160k events of slack before a burst starts losing events.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Per-CPU scratch event: a `FlowEvent` is too big for the 512-byte BPF stack
/// next to everything else a hook holds.
#[map]
static SCRATCH: PerCpuArray<FlowEvent> = PerCpuArray::with_max_entries(1, 0);

/// Returns this CPU's scratch event, zeroed so no stale bytes reach userspace.
#[inline(always)]
pub fn scratch_event() -> Option<&'static mut FlowEvent> {
    let p = SCRATCH.get_ptr_mut(0)?;
    unsafe {
        core::ptr::write_bytes(p, 0, 1);
        Some(&mut *p)
    }
}

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Per-CPU counts by attribution key and kind (drops, new entries,
/// evictions, clashes): exact totals even when the ring buffer overflows.
#[map]
pub static COUNTS: PerCpuHashMap<AggKey, u64> =
    PerCpuHashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// Per-CPU occupancy by creation key: +1 on create, -1 on free (on whatever
/// CPU frees it), so only the sum over CPUs is meaningful.
#[map]
pub static OCC: PerCpuHashMap<AggKey, i64> =
    PerCpuHashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// Live entries created since attach: `ct` pointer → the creation event.
/// Sized by userspace from `nf_conntrack_max`; not preallocated.
#[map]
pub static LIVE: HashMap<u64, FlowEvent> = HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

const BPF_F_NO_PREALLOC: u32 = 1;

/// Reads one `Config` field without letting the compiler fold the zero
/// initialiser into a constant.
macro_rules! conf {
    ($f:ident) => {
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!($crate::common::CONFIG.$f)) }
    };
}
pub(crate) use conf;

#[inline(always)]
pub fn bump(idx: u32) {
    if let Some(p) = STATS.get_ptr_mut(idx) {
        unsafe { *p += 1 };
    }
}

/// Reads a `T` at `base + off` from kernel memory.
#[inline(always)]
pub fn rd<T>(base: u64, off: u32) -> Result<T, i32> {
    if base == 0 {
        return Err(-14);
    }
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }
}

/// `net->ns.inum`, or 0 if `net` is unreadable.
#[inline(always)]
pub fn net_inum(net: u64) -> u32 {
    rd::<u32>(net, conf!(net_inum)).unwrap_or(0)
}

/// Inode number of the `struct socket` behind `sk`, for full sockets only:
/// request and time-wait socks are shorter and have no `sk_socket`.
#[inline(always)]
pub fn sock_ino(sk: u64) -> u64 {
    const TCP_TIME_WAIT: u8 = 6;
    const TCP_NEW_SYN_RECV: u8 = 12;
    let state = rd::<u8>(sk, conf!(sk_state)).unwrap_or(TCP_TIME_WAIT);
    if state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV {
        return 0;
    }
    let socket = rd::<u64>(sk, conf!(sk_socket)).unwrap_or(0);
    if socket == 0 {
        return 0;
    }
    rd::<u64>(socket + conf!(socket_to_inode) as u64, conf!(inode_ino)).unwrap_or(0)
}

/// Fills `ev.tuple` from the IP header at `ip`. Returns false if the L3
/// header is unreadable; a missing L4 header only sets `NO_L4`.
#[inline(always)]
pub fn decode_ip(ip: u64, ev: &mut FlowEvent) -> bool {
    let first: u8 = match rd(ip, 0) {
        Ok(b) => b,
        Err(_) => return false,
    };
    let t: &mut FlowTuple = &mut ev.tuple;
    let l4: u64;
    match first >> 4 {
        4 => {
            let h: [u8; 20] = match rd(ip, 0) {
                Ok(h) => h,
                Err(_) => return false,
            };
            t.family = FAMILY_V4;
            t.proto = h[9];
            t.saddr[..4].copy_from_slice(&h[12..16]);
            t.daddr[..4].copy_from_slice(&h[16..20]);
            let frag_off = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
            if frag_off != 0 {
                ev.flags |= conntrack_ebpf::flags::NO_L4;
                return true;
            }
            l4 = ip + ((h[0] & 0x0f) as u64) * 4;
        }
        6 => {
            let h: [u8; 40] = match rd(ip, 0) {
                Ok(h) => h,
                Err(_) => return false,
            };
            t.family = FAMILY_V6;
            t.proto = h[6];
            t.saddr.copy_from_slice(&h[8..24]);
            t.daddr.copy_from_slice(&h[24..40]);
            // Extension headers are rare on the flows that fill a table;
            // report them by next-header with no ports rather than walk them.
            l4 = ip + 40;
        }
        _ => return false,
    }
    let p: [u8; 8] = match t.proto {
        6 | 17 | 132 | 136 | 33 | 1 | 58 => match rd(l4, 0) {
            Ok(p) => p,
            Err(_) => {
                ev.flags |= conntrack_ebpf::flags::NO_L4;
                return true;
            }
        },
        _ => {
            ev.flags |= conntrack_ebpf::flags::NO_L4;
            return true;
        }
    };
    if t.proto == 1 || t.proto == 58 {
        // ICMP: id as the "source port", type/code as the "destination port",
        // the same way conntrack keys these flows.
        t.sport = u16::from_be_bytes([p[4], p[5]]);
        t.dport = u16::from_be_bytes([p[0], p[1]]);
    } else {
        t.sport = u16::from_be_bytes([p[0], p[1]]);
        t.dport = u16::from_be_bytes([p[2], p[3]]);
    }
    true
}

/// Stamps the current task onto the event (callers decide whether the task
/// is meaningful: only in LOCAL_OUT task context).
#[inline(always)]
pub fn fill_task(ev: &mut FlowEvent) {
    let pt = bpf_get_current_pid_tgid();
    ev.pid = (pt >> 32) as u32;
    ev.tid = pt as u32;
    ev.comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
    ev.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    ev.flags |= conntrack_ebpf::flags::TASK;
}

#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// The attribution key of an event (everything but the per-flow parts).
#[inline(always)]
pub fn key_of(ev: &FlowEvent) -> AggKey {
    AggKey {
        saddr: ev.tuple.saddr,
        cgroup_id: ev.cgroup_id,
        sock_ino: ev.sock_ino,
        netns: ev.netns,
        tgid: ev.pid,
        comm: ev.comm,
        dport: ev.tuple.dport,
        family: ev.tuple.family,
        proto: ev.tuple.proto,
        role: ev.role,
        kind: ev.kind,
        _pad: [0; 2],
    }
}

/// Adds one to the per-CPU count of this event's attribution key. A full
/// map is counted in `AGG_OVERFLOW` and reported as "other". Returns true
/// when the key is new (on this CPU), so its first record can be streamed.
#[inline(always)]
pub fn aggregate(ev: &FlowEvent) -> bool {
    let key = key_of(ev);
    count_key(&key)
}

#[inline(always)]
pub fn count_key(key: &AggKey) -> bool {
    add_to(&COUNTS, key, 1u64)
}

/// Adds `delta` to `key` in a per-CPU map, inserting it when new; returns
/// true when this call inserted it. Another CPU may insert the same key
/// concurrently, which per-CPU values make harmless; a full map is counted
/// in `AGG_OVERFLOW` (reported as "other").
#[inline(always)]
fn add_to<V: Copy + core::ops::AddAssign>(
    map: &PerCpuHashMap<AggKey, V>,
    key: &AggKey,
    delta: V,
) -> bool {
    if let Some(v) = map.get_ptr_mut(key) {
        unsafe { *v += delta };
        return false;
    }
    if map.insert(key, &delta, 0).is_ok() {
        return true;
    }
    if let Some(v) = map.get_ptr_mut(key) {
        unsafe { *v += delta };
        return false;
    }
    bump(stat::AGG_OVERFLOW);
    false
}

/// Per-CPU stream budget window: [0] window start (ns), [1] records in it.
#[map]
static BUDGET: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Streams the record if it is the first of its key or within this CPU's
/// per-second budget; otherwise counts it as sampled out. Per-record
/// streaming at flood rates would cost more than the drop path itself.
#[inline(always)]
pub fn emit_budgeted(ev: &FlowEvent, first_of_key: bool) {
    let budget = conf!(stream_budget) as u64;
    if first_of_key || budget == 0 {
        emit(ev);
        return;
    }
    let (Some(start), Some(n)) = (BUDGET.get_ptr_mut(0), BUDGET.get_ptr_mut(1)) else {
        return;
    };
    unsafe {
        if ev.ts_ns.wrapping_sub(*start) > 1_000_000_000 {
            *start = ev.ts_ns;
            *n = 0;
        }
        if *n < budget {
            *n += 1;
            emit(ev);
        } else {
            bump(stat::SAMPLED);
        }
    }
}

/// Adds `delta` to the occupancy of `key` on this CPU.
#[inline(always)]
pub fn occupy(key: &AggKey, delta: i64) {
    add_to(&OCC, key, delta);
}

/// Reads a `struct nf_conntrack_tuple` (stable 40-byte layout since 4.x)
/// into `t`: addresses raw, ports converted to host order.
#[inline(always)]
pub fn read_ct_tuple(ptr: u64, t: &mut FlowTuple) -> Result<(), i32> {
    let raw: [u8; 40] = rd(ptr, 0)?;
    let l3num = u16::from_ne_bytes([raw[18], raw[19]]);
    t.family = match l3num {
        2 => FAMILY_V4,
        10 => FAMILY_V6,
        _ => 0,
    };
    t.proto = raw[38];
    t.saddr.copy_from_slice(&raw[0..16]);
    t.daddr.copy_from_slice(&raw[20..36]);
    // For ICMP these bytes are src.u.icmp.id and dst.u.icmp.{type,code},
    // which is the same "id / type<<8|code" encoding decode_ip uses.
    t.sport = u16::from_be_bytes([raw[16], raw[17]]);
    t.dport = u16::from_be_bytes([raw[36], raw[37]]);
    Ok(())
}

/// Copies the event onto the ring buffer; a full buffer is counted, not hidden.
#[inline(always)]
pub fn emit(ev: &FlowEvent) {
    if EVENTS.output::<FlowEvent>(ev, 0).is_err() {
        bump(stat::RB_LOST);
    }
}

/// Packet context saved by `nf_conntrack_in` for the allocation that may
/// follow on the same CPU, in the same call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HookCtx {
    /// `tag()` of the call that saved it.
    pub tag: u64,
    pub sock_ino: u64,
    pub cgroup_id: u64,
    pub ifindex_in: u32,
    pub ifindex_out: u32,
    pub role: u8,
    pub task: u8,
    pub _pad: [u8; 6],
    pub comm: [u8; 16],
}

#[map]
pub static HOOK_CTX: PerCpuArray<HookCtx> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU early_drop state: [0] = pid_tgid while inside early_drop,
/// [1] = pid_tgid whose last early_drop found nothing to evict (table full).
#[map]
pub static EARLY: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Per-CPU argument stash for kprobe entry → kretprobe exit pairs.
/// [0..2] `__nf_conntrack_alloc` (pid_tgid, net, orig), [3..4] clash (pid_tgid, h).
#[map]
pub static ARGS: PerCpuArray<u64> = PerCpuArray::with_max_entries(8, 0);

#[inline(always)]
pub fn slot_get(map: &PerCpuArray<u64>, i: u32) -> u64 {
    map.get(i).copied().unwrap_or(0)
}

#[inline(always)]
pub fn slot_set(map: &PerCpuArray<u64>, i: u32, v: u64) {
    if let Some(p) = map.get_ptr_mut(i) {
        unsafe { *p = v };
    }
}

#[inline(always)]
pub fn pid_tgid() -> u64 {
    bpf_get_current_pid_tgid()
}

/// Marks per-CPU state as belonging to the current call chain. Never 0:
/// 0 is what an untouched slot holds and what "none" is written as, and
/// the idle task's pid_tgid is 0 too (softirqs interrupting it).
#[inline(always)]
pub fn tag() -> u64 {
    bpf_get_current_pid_tgid().wrapping_add(1)
}

/// `IS_ERR()` on a returned kernel pointer.
#[inline(always)]
pub fn is_err_ptr(p: u64) -> bool {
    p >= (-4095i64) as u64
}
