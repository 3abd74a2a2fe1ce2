//! One module per kernel hook. Each entry point is a thin shell over a
//! `try_*` function whose error is counted, never silently dropped.
pub mod kfree_skb;
