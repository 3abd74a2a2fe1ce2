//! Aggregation stage: bounded counts, breakdowns, occupancy, the table
//! summary and the reconciliation with the kernel's counters.
pub(crate) mod breakdown;
pub(crate) mod occupancy;
pub(crate) mod reconcile;
pub(crate) mod sampler;
pub(crate) mod summary;
pub(crate) mod topk;
