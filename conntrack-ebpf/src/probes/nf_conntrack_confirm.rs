//! `__nf_conntrack_confirm`: a new entry goes into the hash table. This is
//! where kprobe mode counts entry creation and occupancy: the inline
//! `nf_conntrack_confirm()` calls it only for entries not yet confirmed, so
//! it runs once per new entry, never for the packets of an existing one.
//!
//! Prototype, unchanged 5.10 – 7.2: `int __nf_conntrack_confirm(struct sk_buff *skb)`
//! - returns on reply-direction packets (ctinfo ≥ `IP_CT_IS_REPLY`) without inserting;
//! - returns NF_ACCEPT (1) on insertion, and on a clash resolved either by
//!   attaching the winner's entry to the skb (`skb->_nfct` changes) or, for
//!   UDP since 5.6, by inserting the loser too (`IPS_NAT_CLASH`);
//! - returns NF_DROP (0) when the entry is dying or the clash is lost;
//! - 6.1+: may insert, then kill the entry and return NF_DROP when an
//!   extension went away meanwhile (its free then balances the count).
//!
//! The packet's context is the entry's first packet at POST_ROUTING (local
//! and forwarded) or LOCAL_IN (inbound): see `confirm_context`.
use aya_ebpf::{
    macros::{kprobe, kretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use conntrack_ebpf::{kind, stat, FlowEvent};

use crate::common::{
    aggregate, bump, conf, confirm_context, confirm_pop, confirm_push, decode_ip, emit_budgeted,
    key_of, net_inum, now_ns, occupy, rd, read_ct_tuple, reply_from_packet, scratch_event,
    IPS_CONFIRMED, IP_CT_IS_REPLY, LIVE, NFCT_PTRMASK,
};

const NF_ACCEPT: u32 = 1;
const BPF_NOEXIST: u64 = 1;

#[kprobe]
pub fn ctw_confirm_kp(ctx: ProbeContext) -> u32 {
    let skb: u64 = ctx.arg(0).unwrap_or(0);
    let nfct: u64 = rd(skb, conf!(skb_nfct)).unwrap_or(0);
    // Pushed even when there is nothing to insert, so every return pops
    // its own frame.
    let ct = if nfct & !NFCT_PTRMASK >= IP_CT_IS_REPLY {
        0
    } else {
        nfct & NFCT_PTRMASK
    };
    confirm_push(skb, ct);
    0
}

#[kretprobe]
pub fn ctw_confirm_krp(ctx: RetProbeContext) -> u32 {
    let ret = ctx.ret::<u64>() as u32;
    if let Some(f) = confirm_pop() {
        if f.ct != 0 {
            let _ = on_confirmed(f.skb, f.ct, ret);
        }
    }
    0
}

fn on_confirmed(skb: u64, ct: u64, ret: u32) -> Result<(), i32> {
    let now: u64 = rd::<u64>(skb, conf!(skb_nfct))? & NFCT_PTRMASK;
    if now != ct {
        // A clash resolved to the winner, counted when it was confirmed.
        return Ok(());
    }
    if conf!(conn_status) != 0 {
        let status: u64 = rd(ct, conf!(conn_status))?;
        if status & IPS_CONFIRMED == 0 {
            return Ok(());
        }
    } else if ret != NF_ACCEPT {
        return Ok(());
    }
    let ev: &mut FlowEvent = scratch_event().ok_or(-12)?;
    ev.kind = kind::NEW;
    ev.ts_ns = now_ns();
    let pkt_net = confirm_context(skb, ev);
    // The table's own namespace where the layout is known.
    let net: u64 = if conf!(conn_net) != 0 {
        rd(ct, conf!(conn_net)).unwrap_or(pkt_net)
    } else {
        pkt_net
    };
    ev.netns = net_inum(net);
    if conf!(conn_tuple) != 0 {
        read_ct_tuple(ct + conf!(conn_tuple) as u64, &mut ev.tuple)?;
        read_ct_tuple(ct + conf!(conn_reply_tuple) as u64, &mut ev.reply)?;
    } else {
        // 5.10 has no module BTF: the packet's own headers, which NAT has
        // already rewritten (see reply_from_packet).
        let head: u64 = rd(skb, conf!(skb_head))?;
        let nh: u16 = rd(skb, conf!(skb_network_header))?;
        if !decode_ip(head + nh as u64, ev) {
            return Err(-22);
        }
        reply_from_packet(ev);
    }
    // A resolved clash that kept this entry cannot reach here twice, but a
    // second insertion must never count twice either.
    match LIVE.insert(&ct, &*ev, BPF_NOEXIST) {
        Ok(()) => {}
        Err(-17) => return Ok(()),
        Err(_) => {
            // Its free cannot be matched: occupancy for it comes from
            // ctnetlink instead.
            bump(stat::LIVE_OVERFLOW);
            bump(stat::NEW);
            bump(stat::INSERTS);
            aggregate(ev);
            return Ok(());
        }
    }
    bump(stat::NEW);
    bump(stat::INSERTS);
    let first = aggregate(ev);
    occupy(&key_of(ev), 1);
    // A key's first record goes out whatever was asked for, as drops' do:
    // its owner is named while it lives, and its reply tuple tells the
    // names stage where NAT sent the key's destination.
    if first || conf!(stream_new) != 0 {
        emit_budgeted(ev, first);
    }
    Ok(())
}
