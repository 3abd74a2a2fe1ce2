//! `ctwatch doctor`: measure (optionally watching the kernel for a while),
//! then print findings ranked by urgency with the commands that fix them.
use crate::{
    cli::{DoctorArgs, Settings},
    doctor,
    error::Error,
    views::{doctor as view, json},
};

pub(crate) async fn run(settings: &Settings, args: &DoctorArgs) -> Result<(), Error> {
    let stop = super::stop_requested()?;
    let m = doctor::measure(settings, args, stop).await?;
    let report = doctor::Diagnosis::new(m);
    if args.json {
        println!("{}", json::line(&report));
    } else {
        print!("{}", view::report(&report));
    }
    Ok(())
}
