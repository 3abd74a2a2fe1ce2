//! `ctwatch doctor` (being written).
use crate::{
    cli::{DoctorArgs, Settings},
    error::Error,
};

pub async fn run(settings: &Settings, args: &DoctorArgs) -> Result<(), Error> {
    let _ = (settings, args);
    Err(Error::Unimplemented("doctor"))
}
