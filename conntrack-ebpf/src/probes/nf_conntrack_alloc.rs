//! `__nf_conntrack_alloc`: every entry creation, and the table-full failure.
//!
//! Prototype, unchanged 5.10 – 7.2 (static in nf_conntrack_core.c):
//! `struct nf_conn *__nf_conntrack_alloc(struct net *net,
//!      const struct nf_conntrack_zone *zone,
//!      const struct nf_conntrack_tuple *orig, const struct nf_conntrack_tuple *repl,
//!      gfp_t gfp, u32 hash)`
//! Over `nf_conntrack_max` it calls `early_drop()`; when that evicts nothing
//! it returns `ERR_PTR(-ENOMEM)` and the packet is dropped. `orig` is the
//! flow that could not get a slot.
use aya_ebpf::{
    macros::{fexit, kprobe, kretprobe},
    programs::{FExitContext, ProbeContext, RetProbeContext},
};
use conntrack_ebpf::{kind, role, stat, FlowEvent};

use crate::common::{
    aggregate, bump, conf, emit_budgeted, is_err_ptr, key_of, net_inum, now_ns, occupy, pid_tgid,
    read_ct_tuple, scratch_event, slot_get, slot_set, tag, ARGS, EARLY, HOOK_CTX, LIVE,
};

#[kprobe]
pub fn ctw_alloc_kp(ctx: ProbeContext) -> u32 {
    slot_set(&ARGS, 0, tag());
    slot_set(&ARGS, 1, ctx.arg::<u64>(0).unwrap_or(0));
    slot_set(&ARGS, 2, ctx.arg::<u64>(2).unwrap_or(0));
    0
}

#[kretprobe]
pub fn ctw_alloc_krp(ctx: RetProbeContext) -> u32 {
    let ret: u64 = ctx.ret();
    if slot_get(&ARGS, 0) != tag() {
        return 0;
    }
    slot_set(&ARGS, 0, 0);
    let _ = on_alloc(slot_get(&ARGS, 1), slot_get(&ARGS, 2), ret);
    0
}

#[fexit(function = "__nf_conntrack_alloc")]
pub fn ctw_alloc_fx(ctx: FExitContext) -> u32 {
    let net: u64 = ctx.arg(0);
    let orig: u64 = ctx.arg(2);
    // The return value follows the six arguments.
    let ret: u64 = ctx.arg(6);
    let _ = on_alloc(net, orig, ret);
    0
}

fn on_alloc(net: u64, orig: u64, ret: u64) -> Result<(), i32> {
    let me = tag();
    let full = slot_get(&EARLY, 1) == me;
    slot_set(&EARLY, 1, 0);
    if is_err_ptr(ret) && !full {
        // A slab failure, not a full table.
        bump(stat::ALLOC_ERR);
        return Ok(());
    }
    let ev: &mut FlowEvent = scratch_event().ok_or(-12)?;
    ev.ts_ns = now_ns();
    ev.netns = net_inum(net);
    read_ct_tuple(orig, &mut ev.tuple)?;
    ev.role = role::UNKNOWN;
    if let Some(c) = HOOK_CTX.get(0) {
        // Only trust context saved by this same call (same task, same CPU).
        if c.tag == me {
            ev.role = c.role;
            ev.ifindex_in = c.ifindex_in;
            ev.ifindex_out = c.ifindex_out;
            ev.sock_ino = c.sock_ino;
            if c.task != 0 {
                let pt = pid_tgid();
                ev.pid = (pt >> 32) as u32;
                ev.tid = pt as u32;
                ev.comm = c.comm;
                ev.cgroup_id = c.cgroup_id;
                ev.flags |= conntrack_ebpf::flags::TASK;
            }
        }
    }
    if is_err_ptr(ret) {
        ev.kind = kind::DROP;
        bump(stat::MATCHED);
        let first = aggregate(ev);
        emit_budgeted(ev, first);
        return Ok(());
    }
    ev.kind = kind::NEW;
    // Entries are keyed by process, not by socket: a busy client opens a
    // socket per connection, and per-socket keys would fill the maps.
    ev.sock_ino = 0;
    bump(stat::NEW);
    let first = aggregate(ev);
    let key = key_of(ev);
    occupy(&key, 1);
    if LIVE.insert(&ret, &*ev, 0).is_err() {
        // Its free cannot be matched: undo, and let ctnetlink account for it.
        occupy(&key, -1);
        bump(stat::LIVE_OVERFLOW);
    }
    if conf!(stream_new) != 0 {
        emit_budgeted(ev, first);
    }
    Ok(())
}
