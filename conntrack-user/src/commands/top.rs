//! `ctwatch top` (being written).
use crate::{
    cli::{Settings, TopArgs},
    error::Error,
};

pub async fn run(settings: &Settings, args: &TopArgs) -> Result<(), Error> {
    let _ = (settings, args);
    Err(Error::Unimplemented("top"))
}
