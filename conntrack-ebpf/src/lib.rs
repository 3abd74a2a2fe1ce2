//! Types shared by the ctwatch kernel programs and userspace.
//!
//! Everything here is `#[repr(C)]` with explicit padding and no `bool`, so the
//! byte layout is the same on both sides and no padding byte is left for the
//! compiler to fill with whatever the kernel stack held.
#![no_std]

/// Kind of a [`FlowEvent`].
pub mod kind {
    /// A packet dropped because conntrack could not create an entry (table full).
    pub const DROP: u8 = 1;
    /// An unassured entry evicted (`early_drop`) to make room for a new one.
    pub const EVICT: u8 = 2;
    /// An insert that lost a race with an identical entry (`insert_failed`).
    pub const CLASH: u8 = 3;
    /// A new entry created (only streamed when userspace asks for it).
    pub const NEW: u8 = 4;
    /// An entry freed that existed before ctwatch attached (aggregation
    /// only): userspace subtracts these from the occupancy it seeded.
    pub const SEED_FREE: u8 = 5;
}

/// Which side of the host the flow came from, decided in kernel.
pub mod role {
    /// Inbound or forwarded (PRE_ROUTING): `current` means nothing here.
    pub const INBOUND: u8 = 1;
    /// Locally generated (LOCAL_OUT): the sending socket is known.
    pub const LOCAL: u8 = 2;
    /// Created outside the packet path (ctnetlink, templates): no context.
    pub const UNKNOWN: u8 = 0;
}

/// Bits of [`FlowEvent::flags`].
pub mod flags {
    /// pid/tid/comm/cgroup are the sending task's (task context, socket present).
    pub const TASK: u8 = 1 << 0;
    /// The L4 header could not be read: ports are zero.
    pub const NO_L4: u8 = 1 << 1;
}

/// Indexes of the per-CPU `STATS` array.
pub mod stat {
    /// Conntrack drops with no conntrack entry attached (table-full candidates).
    pub const MATCHED: u32 = 0;
    /// Ring-buffer reservations that failed: events lost to userspace.
    pub const RB_LOST: u32 = 1;
    /// Drops that did not fit the in-kernel aggregation map (reported as `other`).
    pub const AGG_OVERFLOW: u32 = 2;
    /// Packets whose headers could not be read (still counted as drops).
    pub const DECODE_ERR: u32 = 3;
    /// Every `NETFILTER_DROP`, whatever the rule: context for the reconciliation.
    pub const NF_DROP_ANY: u32 = 4;
    /// Successful early-drop evictions (kernel-probe modes).
    pub const EVICTIONS: u32 = 5;
    /// Insert clashes (kernel-probe modes).
    pub const CLASHES: u32 = 6;
    /// Entries created (kernel-probe modes).
    pub const NEW: u32 = 7;
    /// Entries freed (kernel-probe modes).
    pub const FREED: u32 = 8;
    /// Entries confirmed into the hash table (kernel-probe modes).
    pub const INSERTS: u32 = 9;
    /// Creations that did not fit the `LIVE` map: their frees cannot be
    /// matched, so occupancy for them comes from ctnetlink instead.
    pub const LIVE_OVERFLOW: u32 = 10;
    /// Allocation failures not preceded by a failed early_drop (slab
    /// failures). Nothing counts them since the kprobe mode stopped hooking
    /// the allocation; the index stays so the others keep theirs.
    pub const ALLOC_ERR: u32 = 11;
    /// Records not streamed because of `Config::stream_budget` (counted in
    /// the maps all the same).
    pub const SAMPLED: u32 = 12;
    /// Calls of `__nf_conntrack_confirm` whose return the kernel never
    /// reported (kretprobe instances exhausted): each is an entry creation
    /// that no count saw. Counted from per-CPU frames left behind longer
    /// than [`RETURN_STALE_NS`](crate::RETURN_STALE_NS).
    pub const MISSED_CONFIRM: u32 = 13;
    /// Calls of `early_drop` whose return never came: a table-full drop
    /// (or a failed eviction) that may be missing from the counts.
    pub const MISSED_EARLY_DROP: u32 = 14;
    /// Calls of `nf_ct_resolve_clash` whose return never came: a clash
    /// that may be missing from the counts.
    pub const MISSED_CLASH: u32 = 15;
    /// Runs of ctwatch's programs that the kernel skipped because a BPF
    /// program was already running on that CPU: events no count saw.
    /// The programs' own `recursion_misses` (kprobes' counted from 6.7),
    /// summed by userspace from their info; no program writes this slot.
    pub const RUNS_SKIPPED: u32 = 16;
    pub const COUNT: u32 = 17;
    /// The slots the programs write, before the userspace-filled ones:
    /// the size of the `STATS` map.
    pub const KERNEL_COUNT: u32 = RUNS_SKIPPED;
}

/// Age past which a probe's entry state that its kretprobe never cleared
/// is a missed return, not a call still running. A live call lasts
/// microseconds, nested softirqs included (they end after 2 ms of work);
/// a second leaves room for a stalled vCPU under emulation. Shared with
/// userspace, which counts the frames still waiting to be found stale.
pub const RETURN_STALE_NS: u64 = 1_000_000_000;

/// Address family values used in [`FlowTuple::family`].
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// One direction of a flow. Addresses are in network order (IPv4 in the first
/// four bytes), ports in host order. For ICMP, `sport` is the id and `dport`
/// is `type << 8 | code`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
}

/// A record on the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowEvent {
    pub ts_ns: u64,
    pub cgroup_id: u64,
    /// Inode number of the sending socket (0 when there is none); userspace
    /// maps it to the process that holds the socket.
    pub sock_ino: u64,
    pub tuple: FlowTuple,
    pub netns: u32,
    pub pid: u32,
    pub tid: u32,
    pub ifindex_in: u32,
    pub ifindex_out: u32,
    pub kind: u8,
    pub role: u8,
    pub flags: u8,
    pub _pad: u8,
    pub comm: [u8; 16],
    /// The entry's reply tuple (kernel-probe modes, new entries): after NAT,
    /// its source is the backend that answers. `family` 0: not known.
    pub reply: FlowTuple,
}

/// Key of the per-CPU `DROPS` aggregation map: everything attribution needs,
/// nothing per-flow (source port), so a flood from one source is one key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AggKey {
    pub saddr: [u8; 16],
    /// Before NAT (conntrack runs before it): the address the flow was
    /// sent to, which names the service a forwarded flow was meant for.
    pub daddr: [u8; 16],
    pub cgroup_id: u64,
    pub sock_ino: u64,
    pub netns: u32,
    pub tgid: u32,
    pub comm: [u8; 16],
    pub dport: u16,
    pub family: u8,
    pub proto: u8,
    pub role: u8,
    pub kind: u8,
    pub _pad: [u8; 2],
}

/// Value of the per-CPU count maps. Besides the count, the last source port
/// seen for the key (the key has none, so a flood from one source stays one
/// key), so userspace can find the socket at a flow's origin without a
/// record per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AggValue {
    pub count: u64,
    pub sport: u16,
    pub _pad: [u8; 6],
}

/// Kernel struct offsets and enum values, resolved from BTF by userspace at
/// load time and written into the `CONFIG` global before the programs load.
/// Rust eBPF has no CO-RE relocations, so this is how one object serves
/// every kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `SKB_DROP_REASON_NETFILTER_DROP` on this kernel.
    pub reason_netfilter_drop: u32,
    /// Userspace asked for every `kind::NEW` event on the ring buffer
    /// (within the budget), not only the first of each key.
    pub stream_new: u32,
    pub skb_nfct: u32,
    pub skb_sk: u32,
    pub skb_dev: u32,
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_protocol: u32,
    pub skb_iif: u32,
    pub skb_refdst: u32,
    pub dst_dev: u32,
    pub dev_ifindex: u32,
    pub dev_nd_net: u32,
    pub net_inum: u32,
    pub sk_net: u32,
    pub sk_socket: u32,
    /// `offsetof(struct socket_alloc, vfs_inode) - offsetof(struct socket_alloc, socket)`
    pub socket_to_inode: u32,
    pub inode_ino: u32,
    /// `offsetof(struct nf_hook_state, hook)` and friends (kernel-probe modes).
    pub state_hook: u32,
    pub state_in: u32,
    pub state_out: u32,
    pub state_net: u32,
    pub state_sk: u32,
    /// `sock.__sk_common.skc_state` (u8): tells full sockets from request/time-wait socks.
    pub sk_state: u32,
    /// `offsetof(struct nf_conn, tuplehash) + offsetof(struct nf_conntrack_tuple_hash, tuple)`:
    /// the original-direction tuple of an entry.
    pub conn_tuple: u32,
    /// `offsetof(struct nf_conn, ct_net)` (+ `possible_net_t.net`).
    pub conn_net: u32,
    /// `offsetof(struct nf_conntrack_tuple_hash, tuple)`.
    pub hash_tuple: u32,
    /// Ring-buffer records per second per CPU (0: unlimited), besides the
    /// first record of each new aggregation key (which `first_budget`
    /// caps). Past it, records are counted in `stat::SAMPLED` instead of
    /// streamed; totals come from the per-CPU maps either way.
    pub stream_budget: u32,
    /// First-of-key records per second per CPU (0: unlimited): a flood of
    /// new keys must not become a flood of records either.
    pub first_budget: u32,
    /// Start of the one read that covers every `sk_buff` field the drop
    /// path needs (`SKB_SPAN` bytes from here); `u32::MAX` when they do not
    /// fit in one span and each field is read on its own.
    pub skb_span: u32,
    /// New keys one CPU may add to a count map per generation before new
    /// keys go to the overflow count, so a flood of distinct keys cannot
    /// evict the keys already counted.
    pub count_cap: u32,
    pub _pad: u32,
    /// `offsetof(struct nf_conn, status)` (0: no nf_conn layout): a free
    /// of an entry never confirmed must not touch the seeded occupancy.
    pub conn_status: u32,
    /// `conn_tuple` + `sizeof(struct nf_conntrack_tuple_hash)`: the reply
    /// tuple (0: no nf_conn layout).
    pub conn_reply_tuple: u32,
}

/// Bytes of `sk_buff` read at once by the drop path.
pub const SKB_SPAN: usize = 256;

/// Size of a [`FlowEvent`] on the ring buffer; userspace rejects other sizes.
pub const FLOW_EVENT_SIZE: usize = core::mem::size_of::<FlowEvent>();

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), every bit pattern valid, padding explicit.
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::AggKey {}
    unsafe impl aya::Pod for super::AggValue {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::FlowTuple {}
}

// Layout is part of the kernel/user ABI: fail the build if it drifts.
const _: () = assert!(core::mem::size_of::<FlowTuple>() == 40);
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 144);
const _: () = assert!(core::mem::size_of::<AggKey>() == 80);
const _: () = assert!(core::mem::size_of::<AggValue>() == 16);
const _: () = assert!(core::mem::size_of::<Config>() == 136);
