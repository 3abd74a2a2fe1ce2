//! Maps, configuration and packet decoding shared by every hook.
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    },
    macros::map,
    maps::{Array, HashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use conntrack_ebpf::{
    stat, AggKey, AggValue, Config, FlowEvent, FlowTuple, FAMILY_V4, FAMILY_V6, RETURN_STALE_NS,
};

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
    first_budget: 0,
    skb_span: u32::MAX,
    count_cap: 0,
    _pad: 0,
    conn_status: 0,
    conn_reply_tuple: 0,
};

/// Sized by userspace from the CPU count (its producers); this is the most.
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
    // SAFETY: a per-CPU map value of `FlowEvent` size, 8-aligned (below).
    unsafe {
        zero_words(p as *mut u64, core::mem::size_of::<FlowEvent>() / 8);
        Some(&mut *p)
    }
}

const _: () =
    assert!(core::mem::size_of::<FlowEvent>() % 8 == 0 && core::mem::align_of::<FlowEvent>() == 8);

/// Zeroes `n` words. `write_bytes` and a plain loop both become a call to
/// the object's `memset`, a byte loop: for the 144-byte scratch record that
/// was over 700 instructions on every drop, the largest part of the drop
/// path. Volatile stores are not turned back into that call.
///
/// # Safety
/// `p` must be valid for `n` aligned `u64` writes.
#[inline(always)]
pub unsafe fn zero_words(p: *mut u64, n: usize) {
    for i in 0..n {
        core::ptr::write_volatile(p.add(i), 0);
    }
}

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::KERNEL_COUNT, 0);

/// Per-CPU counts by attribution key and kind (drops, new entries,
/// evictions, clashes), double-buffered: programs add to the map `GEN`
/// selects while userspace drains the other one, so a refresh reads only
/// the keys that changed and no key lives longer than two refreshes.
/// Preallocated (LRU maps always are): a new key allocates nothing. Sized
/// by userspace from the CPU count. One LRU list per CPU, each with that
/// CPU's share of the elements: a CPU that inserts no more than its share
/// (`count_cap`) never makes the map evict a counted key, where with one
/// shared list a CPU short of free elements evicts even while others still
/// hold some.
#[map]
pub static COUNTS_A: LruPerCpuHashMap<AggKey, AggValue> =
    LruPerCpuHashMap::with_max_entries(16384, BPF_F_NO_COMMON_LRU);
#[map]
pub static COUNTS_B: LruPerCpuHashMap<AggKey, AggValue> =
    LruPerCpuHashMap::with_max_entries(16384, BPF_F_NO_COMMON_LRU);

const BPF_F_NO_COMMON_LRU: u32 = 2;

/// [0]: the generation; even selects `COUNTS_A`, odd `COUNTS_B`. Written
/// by userspace only.
#[map]
pub static GEN: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU new keys in the current generation: `gen << 32 | n`.
#[map]
static INSERTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Words in [`SEEN`]: 2^17 bits, so a CPU that has counted 8,192 keys (its
/// cap on a 2-CPU host) finds about one absent key in sixteen marked, and
/// looks that one up for nothing.
const SEEN_WORDS: usize = 2048;

/// Per CPU, the keys this CPU counted in the current generation, as bits
/// of a hash: a clear bit proves the key is not counted here, so past the
/// cap it goes to `SPILL` without a map lookup. Cleared when the CPU sees
/// a new generation, with its `INSERTED` count.
#[map]
static SEEN: PerCpuArray<[u64; SEEN_WORDS]> = PerCpuArray::with_max_entries(1, 0);

/// The word and bit of `key` in [`SEEN`]: a multiplicative hash of its
/// ten words, far cheaper than the map's own hash and lookup.
#[inline(always)]
fn seen_slot(key: &AggKey) -> (usize, u64) {
    const _: () =
        assert!(core::mem::size_of::<AggKey>() == 80 && core::mem::align_of::<AggKey>() == 8);
    // SAFETY: `AggKey` is 80 bytes of plain integers, aligned to 8 (above).
    let words: &[u64; 10] = unsafe { &*(key as *const AggKey as *const [u64; 10]) };
    let mut h: u64 = 0;
    for w in words {
        h = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    let b = (h >> 47) as usize;
    ((b >> 6) & (SEEN_WORDS - 1), 1u64 << (b & 63))
}

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

/// The clock read at most once per tick and CPU. Budget windows and cache
/// ages need no finer time; a clocksource read on every drop is slow in a
/// VM (`read_tsc` showed in the drop path's profile), and
/// `bpf_ktime_get_coarse_ns` is refused to tracing programs.
#[inline(always)]
pub fn coarse_ns() -> u64 {
    let jiffies = unsafe { aya_ebpf::helpers::generated::bpf_jiffies64() };
    let Some(c) = CLOCK.get_ptr_mut(0) else {
        return now_ns();
    };
    // SAFETY: a per-CPU map value only `ctw_kfree_skb` uses; the kernel never
    // runs a program inside itself on one CPU.
    let c = unsafe { &mut *c };
    if c[0] != jiffies || c[1] == 0 {
        *c = [jiffies, now_ns()];
    }
    c[1]
}

/// Per-CPU `[jiffies, ns]` of the last clock read, for [`coarse_ns`].
#[map]
static CLOCK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// The attribution key of an event (everything but the per-flow parts).
#[inline(always)]
pub fn key_of(ev: &FlowEvent) -> AggKey {
    AggKey {
        saddr: ev.tuple.saddr,
        daddr: ev.tuple.daddr,
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

/// Adds one to the per-CPU count of this event's attribution key. Returns
/// true when the key is new (on this CPU), so its first record can be
/// streamed.
#[inline(always)]
pub fn aggregate(ev: &FlowEvent) -> bool {
    let key = key_of(ev);
    count_key(&key, ev.tuple.sport)
}

/// Adds one to `key` in the active count map, remembering the source port
/// last seen for it. Past this CPU's cap of new keys for the generation, a
/// new key is counted in `AGG_OVERFLOW` (reported as "other") without
/// touching the map: cheap, and it never evicts a key that is already
/// counted. Past the cap, a key this CPU has not counted in this
/// generation skips the map lookup too ([`SEEN`]): in a flood of new keys
/// that lookup's cache misses were most of the drop path's cost. So a key
/// another CPU counts goes to "other" for its drops on a CPU past its cap;
/// the totals stay exact either way.
#[inline(always)]
fn count_key(key: &AggKey, sport: u16) -> bool {
    let gen = GEN.get(0).copied().unwrap_or(0);
    let map = if gen & 1 == 0 { &COUNTS_A } else { &COUNTS_B };
    let (Some(ins), Some(seen)) = (INSERTED.get_ptr_mut(0), SEEN.get_ptr_mut(0)) else {
        return false;
    };
    // SAFETY: per-CPU map values. In kprobe mode another program may
    // interrupt this one on its CPU between a read and a write here: that
    // can lose a bit of SEEN (the key then goes to SPILL, counted once
    // either way) or let one key past the cap, which the CPU's LRU list
    // takes by evicting one: rare enough to leave.
    let (ins, seen) = unsafe { (&mut *ins, &mut *seen) };
    if (*ins >> 32) as u32 != gen {
        *ins = (gen as u64) << 32;
        // SAFETY: `seen` is SEEN_WORDS aligned words.
        unsafe { zero_words(seen.as_mut_ptr(), SEEN_WORDS) };
    }
    let cap = conf!(count_cap) as u64;
    let full = cap != 0 && (*ins & 0xffff_ffff) >= cap;
    let (word, bit) = seen_slot(key);
    if full && seen[word] & bit == 0 {
        spill(key);
        return false;
    }
    if let Some(v) = map.get_ptr_mut(key) {
        unsafe {
            (*v).count += 1;
            (*v).sport = sport;
        }
        seen[word] |= bit;
        return false;
    }
    if full {
        spill(key);
        return false;
    }
    *ins += 1;
    seen[word] |= bit;
    const _: () = assert!(
        core::mem::size_of::<AggValue>() == 16 && core::mem::offset_of!(AggValue, sport) == 8
    );
    // Built from words: a `[0; 6]` field is filled by a call to the
    // object's byte-loop memset. Little-endian: `sport`, then zeroes.
    // SAFETY: `AggValue` is two words of plain integers (above).
    let v: AggValue = unsafe { core::mem::transmute::<[u64; 2], AggValue>([1, sport as u64]) };
    if map.insert(key, &v, 0).is_ok() {
        return true;
    }
    spill(key);
    false
}

/// Counts past the key budget, per namespace and kind (`netns << 8 |
/// kind`), so every namespace's total stays exact when its keys do not fit.
#[map]
pub static SPILL: PerCpuHashMap<u64, u64> = PerCpuHashMap::with_max_entries(4096, 0);

#[inline(always)]
fn spill(key: &AggKey) {
    bump(stat::AGG_OVERFLOW);
    let k = (key.netns as u64) << 8 | key.kind as u64;
    if let Some(v) = SPILL.get_ptr_mut(&k) {
        unsafe { *v += 1 };
    } else if SPILL.insert(&k, &1, 0).is_err() {
        if let Some(v) = SPILL.get_ptr_mut(&k) {
            unsafe { *v += 1 };
        }
    }
}

/// Adds `delta` to `key` in a per-CPU map, inserting it when new. Another
/// CPU may insert the same key concurrently, which per-CPU values make
/// harmless; a full map is counted in `AGG_OVERFLOW`.
#[inline(always)]
fn add_to<V: Copy + core::ops::AddAssign>(map: &PerCpuHashMap<AggKey, V>, key: &AggKey, delta: V) {
    if let Some(v) = map.get_ptr_mut(key) {
        unsafe { *v += delta };
        return;
    }
    if map.insert(key, &delta, 0).is_ok() {
        return;
    }
    if let Some(v) = map.get_ptr_mut(key) {
        unsafe { *v += delta };
        return;
    }
    bump(stat::AGG_OVERFLOW);
}

/// Per-CPU stream budget windows: [0] window start (ns), [1] records in
/// it, [2] first-of-key records in it, [3] last forced wakeup (ns).
#[map]
static BUDGET: PerCpuArray<u64> = PerCpuArray::with_max_entries(4, 0);

/// Whether this record may be streamed: first-of-key records within their
/// per-CPU budget, others within theirs. Over budget it is counted as
/// sampled out; per-record streaming at flood rates would cost more than
/// the drop path itself, and the counts are exact regardless.
#[inline(always)]
pub fn may_stream(now: u64, first_of_key: bool) -> bool {
    let (budget, slot) = if first_of_key {
        (conf!(first_budget) as u64, 2)
    } else {
        (conf!(stream_budget) as u64, 1)
    };
    if budget == 0 {
        return true;
    }
    let (Some(start), Some(n)) = (BUDGET.get_ptr_mut(0), BUDGET.get_ptr_mut(slot)) else {
        return false;
    };
    unsafe {
        if now.wrapping_sub(*start) > 1_000_000_000 {
            *start = now;
            if let Some(p) = BUDGET.get_ptr_mut(1) {
                *p = 0;
            }
            if let Some(p) = BUDGET.get_ptr_mut(2) {
                *p = 0;
            }
        }
        if *n < budget {
            *n += 1;
            return true;
        }
    }
    bump(stat::SAMPLED);
    false
}

/// Streams the record if [`may_stream`] allows it.
#[inline(always)]
pub fn emit_budgeted(ev: &FlowEvent, first_of_key: bool) {
    if may_stream(ev.ts_ns, first_of_key) {
        emit(ev);
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

/// Copies the event onto the ring buffer; a full buffer is counted, not
/// hidden. Userspace is woken at most every [`WAKEUP_NS`] per CPU: under a
/// flood a wakeup per record would cost more than the record.
#[inline(always)]
pub fn emit(ev: &FlowEvent) {
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    let flags = match BUDGET.get_ptr_mut(3) {
        Some(last) => unsafe {
            if ev.ts_ns.wrapping_sub(*last) > WAKEUP_NS {
                *last = ev.ts_ns;
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            }
        },
        None => 0,
    };
    if EVENTS.output::<FlowEvent>(ev, flags).is_err() {
        bump(stat::RB_LOST);
    }
}

/// Minimum time between two wakeups of userspace from one CPU.
const WAKEUP_NS: u64 = 5_000_000;

/// Per-CPU early_drop state: [0] = `tag()` while inside early_drop, so
/// the frees inside it are evictions; [1] when it entered (ns). Still set
/// at the next entry, or stale, it is a return the kernel never reported.
#[map]
pub static EARLY: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Per-CPU argument stash for kprobe entry → kretprobe exit pairs:
/// [3..5] `nf_ct_resolve_clash` (tag, skb, h), [6] when it entered (ns).
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

/// Marks a call of a kprobe/kretprobe pair as in progress on this CPU:
/// `tag()` in slot `tag_at`, the time in slot `time_at` (userspace counts a
/// mark older than `RETURN_STALE_NS` that no call has replaced yet). A mark
/// still there is a return the kernel missed, counted in `missed`.
#[inline(always)]
pub fn enter_call(map: &PerCpuArray<u64>, tag_at: u32, time_at: u32, missed: u32) {
    if slot_get(map, tag_at) != 0 {
        bump(missed);
    }
    slot_set(map, time_at, now_ns());
    slot_set(map, tag_at, tag());
}

/// Marks per-CPU state as belonging to the current call chain. Never 0:
/// 0 is what an untouched slot holds and what "none" is written as, and
/// the idle task's pid_tgid is 0 too (softirqs interrupting it).
#[inline(always)]
pub fn tag() -> u64 {
    bpf_get_current_pid_tgid().wrapping_add(1)
}

// ---- kernel-probe mode
//
// State and helpers of the kprobe-mode hooks, which run once per new entry
// (`__nf_conntrack_confirm`), per free, and only while the table is full
// (`early_drop`, the `kfree_skb` that follows it): never per packet of an
// entry that already exists.

/// Low bits of `skb->_nfct` hold ctinfo.
pub const NFCT_PTRMASK: u64 = !7u64;

/// `IP_CT_IS_REPLY`: ctinfo values from here on are reply-direction
/// packets, which `__nf_conntrack_confirm` returns on without inserting.
pub const IP_CT_IS_REPLY: u64 = 3;

/// `IPS_CONFIRMED_BIT`, unchanged since 2.6.
pub const IPS_CONFIRMED: u64 = 1 << 3;

/// One `__nf_conntrack_confirm` call between its kprobe and kretprobe.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConfirmFrame {
    pub tag: u64,
    pub skb: u64,
    /// The entry attached at entry (0: nothing to insert); the skb carries
    /// another one on return when a clash was resolved to the winner.
    pub ct: u64,
    /// When the call entered (ns): a frame older than `RETURN_STALE_NS`
    /// is one whose return the kernel never reported. Read by userspace
    /// as `[u64; 4]`, so it stays the last of four words.
    pub ts: u64,
}

/// Calls of one CPU still inside `__nf_conntrack_confirm`, a stack of
/// frames. They nest: the function's own `local_bh_enable()` runs pending
/// softirqs, which can confirm another entry before the outer call
/// returns, and with the same `tag()` (the interrupted task), so one slot
/// per CPU would pair the outer return with the inner skb. Frames are map
/// entries, not an array in one value: the map lookup bounds the index,
/// where the verifier cannot follow a compiled bounds check.
#[map]
static CONFIRM_FRAMES: PerCpuArray<ConfirmFrame> = PerCpuArray::with_max_entries(CONFIRM_DEPTH, 0);

/// [0]: frames in use on this CPU.
#[map]
static CONFIRM_TOP: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

const CONFIRM_DEPTH: u32 = 4;

// Missed returns are counted here, from the frames they leave behind, and
// not from the kernel's own `missed` count of a perf kprobe link: that one
// is readable only from 6.7 (`bpf_link_info.perf_event.kprobe.missed`), so
// 5.10 and 6.1, half the kernels ctwatch is tested on, would report
// "unknown". Frames work from 5.10 and cost nothing per established
// packet: the hook runs once per new entry.
//
// The kprobe pushes a frame on every call and the kretprobe pops one on
// every return, so a call whose return the kernel dropped leaves its frame
// behind. Calls nest on a CPU only through softirqs run inside an outer
// call, which end long before `RETURN_STALE_NS`; frames are pushed in time
// order, so the stale ones are at the bottom. Each push discards them and
// counts each in `MISSED_CONFIRM`; userspace adds those still waiting for
// a push on their CPU. A stack that is full of fresh frames cannot be a
// real nesting either: its oldest frame goes, counted the same way. Thus
// frames pushed = frames popped + frames counted + frames live, which
// makes `MISSED_CONFIRM` equal the kprobe's runs minus the kretprobe's
// once no call is live and the last miss is a second old.
#[inline(always)]
pub fn confirm_push(skb: u64, ct: u64) {
    let Some(depth) = CONFIRM_TOP.get_ptr_mut(0) else {
        return;
    };
    let depth = unsafe { &mut *depth };
    let now = now_ns();
    if *depth > CONFIRM_DEPTH {
        *depth = 0;
    }
    let mut stale: u32 = 0;
    for i in 0..CONFIRM_DEPTH {
        if i >= *depth {
            break;
        }
        match CONFIRM_FRAMES.get(i) {
            Some(f) if now.wrapping_sub(f.ts) > RETURN_STALE_NS => stale += 1,
            _ => break,
        }
    }
    if stale == 0 && *depth == CONFIRM_DEPTH {
        stale = 1;
    }
    if stale > 0 {
        for i in 0..CONFIRM_DEPTH {
            if i + stale >= *depth {
                break;
            }
            let (Some(from), Some(to)) = (
                CONFIRM_FRAMES.get(i + stale).copied(),
                CONFIRM_FRAMES.get_ptr_mut(i),
            ) else {
                break;
            };
            unsafe { *to = from };
        }
        *depth = depth.saturating_sub(stale);
        if let Some(p) = STATS.get_ptr_mut(stat::MISSED_CONFIRM) {
            unsafe { *p += stale as u64 };
        }
    }
    if let Some(f) = CONFIRM_FRAMES.get_ptr_mut(*depth) {
        unsafe {
            *f = ConfirmFrame {
                tag: tag(),
                skb,
                ct,
                ts: now,
            }
        };
        *depth += 1;
    }
}

/// The frame of the call returning now, if it is this context's.
#[inline(always)]
pub fn confirm_pop() -> Option<ConfirmFrame> {
    let depth = unsafe { &mut *CONFIRM_TOP.get_ptr_mut(0)? };
    if *depth == 0 || *depth > CONFIRM_DEPTH {
        *depth = 0;
        return None;
    }
    *depth -= 1;
    let f = *CONFIRM_FRAMES.get(*depth)?;
    (f.tag == tag()).then_some(f)
}

/// Per-CPU table-full mark: [0] `net` of the `early_drop` call in progress,
/// [1] `tag()` of the context whose last `early_drop` found nothing to
/// evict, [2] when (ns), [3] its `net`. The `kfree_skb` of that packet
/// follows on the same CPU, in the same context, within microseconds.
#[map]
pub static FULL: PerCpuArray<u64> = PerCpuArray::with_max_entries(4, 0);

/// How long a table-full mark waits for its packet's `kfree_skb`. Between
/// the two only the rate-limited "table full" printk runs, which a slow
/// console can stretch to milliseconds; a stale mark must not claim an
/// unrelated drop later.
pub const FULL_FRESH_NS: u64 = 50_000_000;

/// Role, interfaces, task and netns of the packet that creates an entry,
/// seen at its confirmation: POST_ROUTING for locally generated and
/// forwarded packets, LOCAL_IN for inbound ones. Returns the packet's netns
/// (`struct net *`), 0 if unreadable.
#[inline(always)]
pub fn confirm_context(skb: u64, ev: &mut FlowEvent) -> u64 {
    let sk: u64 = rd(skb, conf!(skb_sk)).unwrap_or(0);
    let dev: u64 = rd(skb, conf!(skb_dev)).unwrap_or(0);
    let iif: u32 = rd(skb, conf!(skb_iif)).unwrap_or(0);
    let ifindex: u32 = rd(dev, conf!(dev_ifindex)).unwrap_or(0);
    // A received packet has an input interface; early demux may already
    // have given it the receiving socket, so the socket alone does not
    // make a packet local.
    if sk != 0 && iif == 0 {
        ev.role = conntrack_ebpf::role::LOCAL;
        ev.ifindex_out = ifindex;
        fill_task(ev);
        return rd(sk, conf!(sk_net)).unwrap_or(0);
    }
    ev.role = conntrack_ebpf::role::INBOUND;
    ev.ifindex_in = if iif != 0 { iif } else { ifindex };
    rd(dev, conf!(dev_nd_net)).unwrap_or(0)
}

/// The reply tuple as the packet at confirmation implies it, for kernels
/// without the `nf_conn` layout: NAT has rewritten the packet by then
/// (DNAT before, SNAT at priority 100, confirmation last), so swapping its
/// ends gives the post-NAT reply. ICMP replies change type: left unknown.
#[inline(always)]
pub fn reply_from_packet(ev: &mut FlowEvent) {
    let t = ev.tuple;
    if t.family == 0
        || t.proto == 1
        || t.proto == 58
        || ev.flags & conntrack_ebpf::flags::NO_L4 != 0
    {
        return;
    }
    ev.reply = FlowTuple {
        saddr: t.daddr,
        daddr: t.saddr,
        sport: t.dport,
        dport: t.sport,
        family: t.family,
        proto: t.proto,
        _pad: [0; 2],
    };
}
