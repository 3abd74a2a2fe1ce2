//! `__nf_conntrack_confirm`: a new entry is inserted into the hash table
//! (the point where it starts to count for lookups).
//!
//! Prototype, unchanged 5.10 – 7.2: `int __nf_conntrack_confirm(struct sk_buff *skb)`
//! Returns NF_ACCEPT (1) on insertion or on a resolved clash.
use aya_ebpf::{
    macros::{fexit, kretprobe},
    programs::{FExitContext, RetProbeContext},
};
use conntrack_ebpf::stat;

use crate::common::bump;

const NF_ACCEPT: u32 = 1;

#[kretprobe]
pub fn ctw_confirm_krp(ctx: RetProbeContext) -> u32 {
    if ctx.ret::<u64>() as u32 == NF_ACCEPT {
        bump(stat::INSERTS);
    }
    0
}

#[fexit(function = "__nf_conntrack_confirm")]
pub fn ctw_confirm_fx(ctx: FExitContext) -> u32 {
    if ctx.arg::<u64>(1) as u32 == NF_ACCEPT {
        bump(stat::INSERTS);
    }
    0
}
