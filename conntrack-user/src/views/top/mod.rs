//! `top`: the model (rates, time to full, rankings), its drawing, and
//! the keys that change it.
pub(crate) mod draw;
pub(crate) mod input;
pub(crate) mod model;
