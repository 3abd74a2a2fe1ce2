//! How results reach people and programs: text lines, JSON lines, and the
//! report document. Views format; they never read the kernel.
pub mod doctor;
pub mod json;
pub mod snapshot;
pub mod text;
pub mod top;
