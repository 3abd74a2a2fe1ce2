//! `ctwatch snapshot`: settings and the table's contents per namespace,
//! from one ctnetlink dump each. No eBPF is loaded.
use crate::{
    aggregate::summary as snapshot,
    cli::Settings,
    error::Error,
    names::scope::Scope,
    views::{json, snapshot as view},
};

pub(crate) async fn run(settings: &Settings, as_json: bool) -> Result<(), Error> {
    let scope = Scope::from_specs(&settings.netns)?;
    let namespaces = scope.namespaces()?;
    let named = scope.is_narrowed();
    let top = settings.top;
    // Dumps block on netlink and on helper threads entering namespaces.
    let snap = tokio::task::spawn_blocking(move || snapshot::take(&namespaces, named, top))
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))??;
    if as_json {
        println!("{}", json::line(&snap));
    } else {
        print!("{}", view::snapshot(&snap));
    }
    Ok(())
}
