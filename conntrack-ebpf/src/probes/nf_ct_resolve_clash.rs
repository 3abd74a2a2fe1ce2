//! `nf_ct_resolve_clash`: two packets of one new flow raced to insert; the
//! loser is dropped and counted by the kernel as `insert_failed`.
//!
//! Prototype 5.7 – 7.2 (static):
//! `static int nf_ct_resolve_clash(struct sk_buff *skb,
//!      struct nf_conntrack_tuple_hash *h, u32 repl_idx)`
//! Returns NF_ACCEPT when the clash was resolved, NF_DROP (0) when not.
//! It may be inlined on some builds; the probe is optional. It runs inside
//! `__nf_conntrack_confirm` with bottom halves off, so the entry/return
//! stash cannot be overwritten by a nested call on this CPU.
use aya_ebpf::{
    macros::{kprobe, kretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use conntrack_ebpf::{kind, stat, FlowEvent};

use crate::common::{
    aggregate, bump, conf, emit_budgeted, enter_call, net_inum, now_ns, rd, read_ct_tuple,
    scratch_event, slot_get, slot_set, tag, ARGS, NFCT_PTRMASK,
};

const NF_DROP: u64 = 0;

#[kprobe]
pub fn ctw_clash_kp(ctx: ProbeContext) -> u32 {
    // Calls never nest (bottom halves are off), so a slot still held is a
    // return the kernel never reported: that clash's outcome is unknown.
    enter_call(&ARGS, 3, 6, stat::MISSED_CLASH);
    slot_set(&ARGS, 4, ctx.arg::<u64>(0).unwrap_or(0));
    slot_set(&ARGS, 5, ctx.arg::<u64>(1).unwrap_or(0));
    0
}

#[kretprobe]
pub fn ctw_clash_krp(ctx: RetProbeContext) -> u32 {
    if slot_get(&ARGS, 3) != tag() {
        return 0;
    }
    slot_set(&ARGS, 3, 0);
    let _ = on_clash(slot_get(&ARGS, 4), slot_get(&ARGS, 5), ctx.ret::<u64>());
    0
}

fn on_clash(skb: u64, h: u64, ret: u64) -> Result<(), i32> {
    if ret as u32 as u64 != NF_DROP {
        return Ok(());
    }
    bump(stat::CLASHES);
    let ev: &mut FlowEvent = scratch_event().ok_or(-12)?;
    ev.kind = kind::CLASH;
    ev.ts_ns = now_ns();
    let loser: u64 = rd::<u64>(skb, conf!(skb_nfct)).unwrap_or(0) & NFCT_PTRMASK;
    // The loser's own original tuple; `h` may be the winner's reply side,
    // which would swap source and destination.
    if conf!(conn_tuple) != 0 && loser != 0 {
        read_ct_tuple(loser + conf!(conn_tuple) as u64, &mut ev.tuple)?;
    } else {
        read_ct_tuple(h + conf!(hash_tuple) as u64, &mut ev.tuple)?;
    }
    let net: u64 = rd(loser, conf!(conn_net)).unwrap_or(0);
    ev.netns = net_inum(net);
    let first = aggregate(ev);
    emit_budgeted(ev, first);
    Ok(())
}
