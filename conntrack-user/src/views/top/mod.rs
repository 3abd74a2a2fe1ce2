//! `top`: the model (rates, time to full, rankings) and its drawing.
pub(crate) mod draw;
pub(crate) mod model;
