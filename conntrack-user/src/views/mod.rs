//! Views stage: how results reach people and programs. Text, JSON lines,
//! the report document, the `top` screen and Prometheus. Views format;
//! they never read the kernel.
pub(crate) mod doctor;
pub(crate) mod http;
pub(crate) mod json;
pub(crate) mod label;
pub(crate) mod prometheus;
pub(crate) mod snapshot;
pub(crate) mod stream;
pub(crate) mod text;
pub(crate) mod top;
