//! `nf_conntrack_in`: the hook context (direction, devices, socket, task)
//! for the entry that may be created further down the same call.
//!
//! Prototype, unchanged 5.10 – 7.2:
//! `unsigned int nf_conntrack_in(struct sk_buff *skb, const struct nf_hook_state *state)`
//! `state->hook` is `unsigned int` on 5.10 and `u8` later; reading its first
//! byte is right for both on little-endian.
use aya_ebpf::{
    macros::{fentry, kprobe},
    programs::{FEntryContext, ProbeContext},
};
use conntrack_ebpf::role;

use crate::common::{conf, fill_task, net_inum, rd, sock_ino, tag, HookCtx, HOOK_CTX};

const NF_INET_PRE_ROUTING: u8 = 0;
const NF_INET_LOCAL_OUT: u8 = 3;

#[kprobe]
pub fn ctw_in_kp(ctx: ProbeContext) -> u32 {
    let skb: u64 = ctx.arg(0).unwrap_or(0);
    let state: u64 = ctx.arg(1).unwrap_or(0);
    let _ = save(skb, state);
    0
}

#[fentry(function = "nf_conntrack_in")]
pub fn ctw_in_fe(ctx: FEntryContext) -> u32 {
    let skb: u64 = ctx.arg(0);
    let state: u64 = ctx.arg(1);
    let _ = save(skb, state);
    0
}

fn save(skb: u64, state: u64) -> Result<(), i32> {
    let c: &mut HookCtx = unsafe { &mut *HOOK_CTX.get_ptr_mut(0).ok_or(-12)? };
    c.tag = tag();
    c.sock_ino = 0;
    c.cgroup_id = 0;
    c.ifindex_in = 0;
    c.ifindex_out = 0;
    c.task = 0;
    c.comm = [0; 16];
    let hook: u8 = rd(state, conf!(state_hook))?;
    c.role = match hook {
        NF_INET_PRE_ROUTING => role::INBOUND,
        NF_INET_LOCAL_OUT => role::LOCAL,
        _ => role::UNKNOWN,
    };
    let indev: u64 = rd(state, conf!(state_in)).unwrap_or(0);
    let outdev: u64 = rd(state, conf!(state_out)).unwrap_or(0);
    c.ifindex_in = rd(indev, conf!(dev_ifindex)).unwrap_or(0);
    c.ifindex_out = rd(outdev, conf!(dev_ifindex)).unwrap_or(0);
    if c.role == role::LOCAL {
        let sk: u64 = rd(skb, conf!(skb_sk)).unwrap_or(0);
        c.sock_ino = sock_ino(sk);
        let mut tmp = conntrack_ebpf::FlowEvent::default();
        fill_task(&mut tmp);
        c.cgroup_id = tmp.cgroup_id;
        c.comm = tmp.comm;
        c.task = 1;
    }
    // Keeps the netns check cheap at allocation time: nothing else to save.
    let _ = net_inum;
    Ok(())
}
