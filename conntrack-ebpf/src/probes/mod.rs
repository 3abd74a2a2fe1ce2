//! One module per kernel hook. Each entry point is a thin shell over a
//! shared function whose failures are counted, never silently dropped.
//! Program names start with `ctw_` so `bpftool prog list` shows them.
pub mod early_drop;
pub mod empty;
pub mod kfree_skb;
pub mod nf_conntrack_confirm;
pub mod nf_conntrack_free;
pub mod nf_ct_resolve_clash;
