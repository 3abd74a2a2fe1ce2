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
use conntrack_ebpf::{kind, role, stat, FlowEvent};

use crate::common::{
    aggregate, bump, conf, decode_ip, emit_budgeted, fill_task, net_inum, now_ns, rd,
    scratch_event, sock_ino,
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
    let nfct: u64 = rd(skb, conf!(skb_nfct))?;
    if nfct != 0 {
        // Conntrack had attached an entry (or marked it untracked): a rule
        // dropped this packet, not a full table.
        return Ok(());
    }
    bump(stat::MATCHED);

    let ev: &mut FlowEvent = scratch_event().ok_or(-12)?;
    ev.kind = kind::DROP;
    ev.ts_ns = now_ns();
    let sk: u64 = rd(skb, conf!(skb_sk)).unwrap_or(0);
    let dev: u64 = rd(skb, conf!(skb_dev)).unwrap_or(0);

    // A locally generated packet still carries its socket at LOCAL_OUT; an
    // inbound one has none before early demux, which runs after PRE_ROUTING.
    let net: u64 = if sk != 0 {
        ev.role = role::LOCAL;
        rd(sk, conf!(sk_net)).unwrap_or(0)
    } else {
        ev.role = role::INBOUND;
        rd(dev, conf!(dev_nd_net)).unwrap_or(0)
    };
    ev.netns = net_inum(net);

    if ev.role == role::LOCAL {
        fill_task(ev);
        ev.sock_ino = sock_ino(sk);
        let dst: u64 = rd::<u64>(skb, conf!(skb_refdst)).unwrap_or(0) & !1u64;
        let odev: u64 = rd(dst, conf!(dst_dev)).unwrap_or(0);
        ev.ifindex_out = rd(odev, conf!(dev_ifindex)).unwrap_or(0);
    } else {
        ev.ifindex_in = rd(dev, conf!(dev_ifindex)).unwrap_or(0);
    }

    let head: u64 = rd(skb, conf!(skb_head)).unwrap_or(0);
    let nh: u16 = rd(skb, conf!(skb_network_header)).unwrap_or(0);
    let decoded = decode_ip(head + nh as u64, ev);

    // Count before streaming: totals stay exact even if the ring buffer is full.
    let first = aggregate(ev);
    emit_budgeted(ev, first);
    if decoded {
        Ok(())
    } else {
        Err(-22)
    }
}
