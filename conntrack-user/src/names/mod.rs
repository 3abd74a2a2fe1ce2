//! Attribution stage: names for what the kernel reports by number.
//! Namespaces, sockets and their processes, cgroups and containers,
//! interfaces, all behind one [`resolver::Resolver`].
pub(crate) mod cache;
pub(crate) mod cgroups;
pub(crate) mod endpoints;
pub(crate) mod resolver;
pub(crate) mod scope;
pub(crate) mod sockets;
