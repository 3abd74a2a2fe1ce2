//! `ctwatch snapshot` (being written).
use crate::{cli::Settings, error::Error};

pub async fn run(settings: &Settings, json: bool) -> Result<(), Error> {
    let _ = (settings, json);
    Err(Error::Unimplemented("snapshot"))
}
