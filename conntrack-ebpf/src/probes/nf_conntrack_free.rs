//! `nf_conntrack_free`: an entry leaves the table for good.
//!
//! Prototype, unchanged 5.10 – 7.2: `void nf_conntrack_free(struct nf_conn *ct)`
//! Called for every entry, confirmed or not: packets dropped before their
//! entry was confirmed (a firewall rule, a lost clash) free it here too.
//! Entries counted at confirmation are matched by pointer in `LIVE` (no
//! read of `struct nf_conn`); older ones are read once to update the
//! seeded counts.
use aya_ebpf::{macros::kprobe, programs::ProbeContext};
use conntrack_ebpf::{kind, role, stat, FlowEvent, RETURN_STALE_NS};

use crate::common::{
    aggregate, bump, conf, emit_budgeted, key_of, net_inum, now_ns, occupy, rd, read_ct_tuple,
    scratch_event, slot_get, tag, EARLY, IPS_CONFIRMED, LIVE,
};

#[kprobe]
pub fn ctw_free_kp(ctx: ProbeContext) -> u32 {
    let _ = on_free(ctx.arg::<u64>(0).unwrap_or(0));
    0
}

fn on_free(ct: u64) -> Result<(), i32> {
    if ct == 0 {
        return Ok(());
    }
    bump(stat::FREED);
    // A mark whose early_drop return was missed would claim every later
    // free of this context; past a live call's age it claims none.
    let evicted = slot_get(&EARLY, 0) == tag()
        && now_ns().wrapping_sub(slot_get(&EARLY, 1)) <= RETURN_STALE_NS;
    let ev: &mut FlowEvent = scratch_event().ok_or(-12)?;
    match unsafe { LIVE.get(&ct) } {
        Some(live) => {
            *ev = *live;
            let key = key_of(ev);
            occupy(&key, -1);
            let _ = LIVE.remove(&ct);
        }
        None if conf!(conn_tuple) == 0 => {
            // No nf_conn layout (no module BTF): nothing safe to read.
            ev.kind = kind::SEED_FREE;
        }
        None => {
            let status: u64 = rd(ct, conf!(conn_status))?;
            if status & IPS_CONFIRMED == 0 {
                // Never in the table, so neither in the seed nor in LIVE.
                return Ok(());
            }
            read_ct_tuple(ct + conf!(conn_tuple) as u64, &mut ev.tuple)?;
            let net: u64 = rd(ct, conf!(conn_net)).unwrap_or(0);
            ev.netns = net_inum(net);
            ev.role = role::UNKNOWN;
            ev.kind = kind::SEED_FREE;
            aggregate(ev);
        }
    }
    if evicted {
        bump(stat::EVICTIONS);
        ev.kind = kind::EVICT;
        ev.ts_ns = now_ns();
        let first = aggregate(ev);
        emit_budgeted(ev, first);
    }
    Ok(())
}
