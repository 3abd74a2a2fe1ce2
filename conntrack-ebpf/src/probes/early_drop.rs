//! `early_drop`: the last chance for a new flow when the table is full.
//!
//! Prototype, unchanged 5.10 – 7.2 (static noinline in nf_conntrack_core.c):
//! `static noinline int early_drop(struct net *net, unsigned int hash)`
//! Called only from `__nf_conntrack_alloc` once the count is over
//! `nf_conntrack_max`, so it never runs while the table has room. Returns
//! 1 when it evicted unassured entries (a whole bucket's worth) (the new
//! flow lives), 0 when it found none: the allocation fails with -ENOMEM,
//! `nf_conntrack_in` returns NF_DROP and `nf_hook_slow` frees the skb,
//! which `ctw_kfree_kp` then counts as the table-full drop.
//! The evicted entries are freed inside this call; `nf_conntrack_free`
//! sees the flag set here and reports each as an eviction.
use aya_ebpf::{
    macros::{kprobe, kretprobe},
    programs::{ProbeContext, RetProbeContext},
};

use conntrack_ebpf::stat;

use crate::common::{enter_call, now_ns, slot_get, slot_set, tag, EARLY, FULL};

#[kprobe]
pub fn ctw_edrop_kp(ctx: ProbeContext) -> u32 {
    // Still set: the previous call's return never came (kretprobe
    // instances exhausted), so whether its packet was dropped is unknown.
    // A nested early_drop (a softirq in the outer one's
    // `local_bh_enable()`) would count once too; it needs a full table
    // hit from both contexts at once, and one slot cannot tell them apart.
    enter_call(&EARLY, 0, 1, stat::MISSED_EARLY_DROP);
    slot_set(&FULL, 0, ctx.arg::<u64>(0).unwrap_or(0));
    0
}

#[kretprobe]
pub fn ctw_edrop_krp(ctx: RetProbeContext) -> u32 {
    slot_set(&EARLY, 0, 0);
    if ctx.ret::<u64>() as u32 == 0 {
        // Read by the kfree_skb of this packet, in this context.
        slot_set(&FULL, 1, tag());
        slot_set(&FULL, 2, now_ns());
        slot_set(&FULL, 3, slot_get(&FULL, 0));
    }
    // Evictions are counted per freed entry in nf_conntrack_free: one call
    // may empty a whole bucket, and the kernel's early_drop stat counts
    // entries, not calls.
    0
}
