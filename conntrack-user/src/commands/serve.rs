//! `ctwatch serve` (being written).
use crate::{
    cli::{ServeArgs, Settings},
    error::Error,
};

pub async fn run(settings: &Settings, args: &ServeArgs) -> Result<(), Error> {
    let _ = (settings, args);
    Err(Error::Unimplemented("serve"))
}
