//! ctwatch: who fills the conntrack table, and whose packets die for it.
//!
//! The pipeline: [`loader`] picks the attach mode and loads the programs,
//! [`source`] reads their ring buffer and maps, [`attribution`] names
//! processes, listeners and namespaces, [`aggregate`] keeps bounded top-K
//! counts, and [`views`] prints text, JSON lines or reports.
pub mod aggregate;
pub mod attribution;
pub mod btf;
pub mod cgroups;
pub mod cli;
pub mod commands;
pub mod compat;
pub mod counters;
pub mod ctnetlink;
pub mod doctor;
pub mod error;
pub mod event;
pub mod live;
pub mod loader;
pub mod metrics;
pub mod netns;
pub mod occupancy;
pub mod reconcile;
pub mod snapshot;
pub mod source;
pub mod views;
pub mod watch;
