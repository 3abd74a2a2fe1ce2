//! `early_drop`: the last chance for a new flow when the table is full.
//!
//! Prototype, unchanged 5.10 – 7.2 (static noinline in nf_conntrack_core.c):
//! `static noinline int early_drop(struct net *net, unsigned int hash)`
//! Returns 1 when it evicted unassured entries (a whole bucket's worth) (the new flow lives), 0
//! when it found none: the table is full and the packet will be dropped.
//! The evicted entry is freed inside this call; `nf_conntrack_free` sees
//! the flag set here and reports it as an eviction.
use crate::common::{slot_set, tag, EARLY};
use aya_ebpf::{
    macros::{fentry, fexit, kprobe, kretprobe},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};

fn enter() {
    slot_set(&EARLY, 0, tag());
}

fn leave(ret: u64) {
    slot_set(&EARLY, 0, 0);
    if ret as u32 == 0 {
        // Read by the __nf_conntrack_alloc exit that follows.
        slot_set(&EARLY, 1, tag());
    }
    // Evictions are counted per freed entry in nf_conntrack_free: one call
    // may empty a whole bucket, and the kernel's early_drop stat counts
    // entries, not calls.
}

#[kprobe]
pub fn ctw_edrop_kp(_ctx: ProbeContext) -> u32 {
    enter();
    0
}

#[kretprobe]
pub fn ctw_edrop_krp(ctx: RetProbeContext) -> u32 {
    leave(ctx.ret::<u64>());
    0
}

#[fentry(function = "early_drop")]
pub fn ctw_edrop_fe(_ctx: FEntryContext) -> u32 {
    enter();
    0
}

#[fexit(function = "early_drop")]
pub fn ctw_edrop_fx(ctx: FExitContext) -> u32 {
    leave(ctx.arg::<u64>(2));
    0
}
