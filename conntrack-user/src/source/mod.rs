//! Source stage: everything read from the kernel. The programs' ring buffer
//! and maps, ctnetlink dumps, the kernel's own counters and sysctls, and
//! the network namespaces they are read in.
pub(crate) mod batch;
pub(crate) mod counters;
pub(crate) mod ctnetlink;
pub(crate) mod maps;
pub(crate) mod netns;
pub(crate) mod programs;
pub(crate) mod records;
