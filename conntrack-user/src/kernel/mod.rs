//! Loader stage: what the running kernel offers (BTF, the mode table) and
//! the loading and attaching of the eBPF programs, and the capabilities
//! given up once they are attached.
pub(crate) mod btf;
pub(crate) mod compat;
pub(crate) mod loader;
pub(crate) mod privileges;
