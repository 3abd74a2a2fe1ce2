//! Empty programs on the hooks ctwatch uses, for the benchmark's bare-hook
//! arm (`cargo xtask bench`): what attaching anything at all costs, beside
//! what ctwatch's own programs cost. Never attached by ctwatch itself.
use aya_ebpf::{
    macros::{kprobe, raw_tracepoint},
    programs::{ProbeContext, RawTracePointContext},
};

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn ctw_empty_kfree_skb(_ctx: RawTracePointContext) -> i32 {
    0
}

#[kprobe]
pub fn ctw_empty_kp(_ctx: ProbeContext) -> u32 {
    0
}
