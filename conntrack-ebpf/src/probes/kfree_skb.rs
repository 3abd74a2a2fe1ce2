//! Raw tracepoint `skb:kfree_skb`: the tracepoint-mode source of table-full
//! drops, for kernels that allow neither kprobes nor fentry.
//!
//! Prototype (arguments arrive in this order on a raw tracepoint):
//! - 5.17 – 6.7:  `kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason)`
//! - 6.8+:        `kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, struct sock *rx_sk)`
//! - < 5.17: no reason argument; userspace refuses this mode there.
//!
//! A table-full drop is `NF_DROP` from `nf_conntrack_in` before any entry was
//! attached, so it is `NETFILTER_DROP` with `skb->_nfct == 0`. Raw-table DROP
//! rules (priority -300) look the same; userspace reconciles with the
//! kernel's per-netns `drop` counter to expose them.
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use conntrack_ebpf::{kind, stat, FlowEvent};

use crate::{
    common::{aggregate, bump, coarse_ns, conf, emit, may_stream, now_ns, scratch_event},
    skb,
};

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn ctw_kfree_skb(ctx: RawTracePointContext) -> i32 {
    let reason: u64 = ctx.arg(2);
    if reason as u32 != conf!(reason_netfilter_drop) {
        return 0;
    }
    bump(stat::NF_DROP_ANY);
    let skb: u64 = ctx.arg(0);
    if let Err(e) = try_kfree_skb(skb) {
        bump(stat::DECODE_ERR);
        // Rare (a header the probe could not read); counted either way.
        aya_log_ebpf::warn!(&ctx, "kfree_skb: unreadable skb headers, error {}", e);
    }
    0
}

fn try_kfree_skb(skb: u64) -> Result<(), i32> {
    let f = skb::fields(skb)?;
    if f.nfct != 0 {
        // Conntrack had attached an entry (or marked it untracked): a rule
        // dropped this packet, not a full table.
        return Ok(());
    }
    bump(stat::MATCHED);
    let ev: &mut FlowEvent = scratch_event().ok_or(-12)?;
    ev.kind = kind::DROP;
    let now = coarse_ns();
    skb::context(&f, ev, now);
    let decoded = skb::tuple(&f, ev);
    // Count before streaming: totals stay exact even if the ring buffer is full.
    let first = aggregate(ev);
    if may_stream(now, first) {
        ev.ts_ns = now_ns();
        skb::lazy(&f, ev);
        emit(ev);
    }
    if decoded {
        Ok(())
    } else {
        Err(-22)
    }
}

// ---- kernel-probe mode ---------------------------------------------------
//
// `ctw_kfree_kp`: the same raw tracepoint in kprobe mode, on every kernel
// from 5.10. A drop counts only when `early_drop` has just failed in this
// context (its kretprobe set the `FULL` mark), so the drop reason is not
// needed: 5.10 has none, and a program that reads the third argument
// cannot attach there (the kernel checks the highest argument read
// against the tracepoint's). Prototype as above; on 5.10 - 5.16:
// `kfree_skb(struct sk_buff *skb, void *location)`.
//
// Every other freed skb costs one per-CPU array lookup and a compare.

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn ctw_kfree_kp(ctx: RawTracePointContext) -> i32 {
    use crate::common::{slot_get, tag, FULL};
    if slot_get(&FULL, 1) != tag() {
        return 0;
    }
    let skb: u64 = ctx.arg(0);
    match kp::on_marked_free(skb) {
        Ok(()) => {}
        Err(e) => {
            bump(stat::DECODE_ERR);
            aya_log_ebpf::warn!(&ctx, "kfree_skb: unreadable skb headers, error {}", e);
        }
    }
    0
}

mod kp {
    use conntrack_ebpf::{kind, role, stat, FlowEvent};

    use crate::common::{
        aggregate, bump, conf, decode_ip, emit_budgeted, fill_task, net_inum, now_ns, rd,
        scratch_event, slot_get, slot_set, sock_ino, FULL, FULL_FRESH_NS,
    };

    /// A freed skb in a context whose `early_drop` just failed: the
    /// table-full drop if it carries no entry and belongs to that table's
    /// namespace. Returns `Ok` for skbs that are not it.
    pub fn on_marked_free(skb: u64) -> Result<(), i32> {
        let now = now_ns();
        if now.wrapping_sub(slot_get(&FULL, 2)) > FULL_FRESH_NS {
            slot_set(&FULL, 1, 0);
            return Ok(());
        }
        let nfct: u64 = rd(skb, conf!(skb_nfct))?;
        if nfct != 0 {
            return Ok(());
        }
        let sk: u64 = rd(skb, conf!(skb_sk)).unwrap_or(0);
        let dev: u64 = rd(skb, conf!(skb_dev)).unwrap_or(0);
        // A locally generated packet still carries its socket at LOCAL_OUT;
        // an inbound one has none before early demux, after PRE_ROUTING.
        let pkt_net: u64 = if sk != 0 {
            rd(sk, conf!(sk_net)).unwrap_or(0)
        } else {
            rd(dev, conf!(dev_nd_net)).unwrap_or(0)
        };
        let net = slot_get(&FULL, 3);
        if pkt_net != net {
            // A softirq that interrupted the marked context between its
            // early_drop and its kfree_skb, freeing another namespace's skb.
            return Ok(());
        }
        slot_set(&FULL, 1, 0);
        bump(stat::MATCHED);

        let ev: &mut FlowEvent = scratch_event().ok_or(-12)?;
        ev.kind = kind::DROP;
        ev.ts_ns = now;
        ev.netns = net_inum(net);
        if sk != 0 {
            ev.role = role::LOCAL;
            fill_task(ev);
            ev.sock_ino = sock_ino(sk);
            let dst: u64 = rd::<u64>(skb, conf!(skb_refdst)).unwrap_or(0) & !1u64;
            let odev: u64 = rd(dst, conf!(dst_dev)).unwrap_or(0);
            ev.ifindex_out = rd(odev, conf!(dev_ifindex)).unwrap_or(0);
        } else {
            ev.role = role::INBOUND;
            ev.ifindex_in = rd(dev, conf!(dev_ifindex)).unwrap_or(0);
        }
        let head: u64 = rd(skb, conf!(skb_head)).unwrap_or(0);
        let nh: u16 = rd(skb, conf!(skb_network_header)).unwrap_or(0);
        let decoded = decode_ip(head + nh as u64, ev);
        // Count before streaming: totals stay exact even if the ring
        // buffer is full.
        let first = aggregate(ev);
        emit_budgeted(ev, first);
        if decoded {
            Ok(())
        } else {
            Err(-22)
        }
    }
}
