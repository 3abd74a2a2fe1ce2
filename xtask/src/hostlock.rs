//! The host lock: host tests and benchmarks lower the global
//! `nf_conntrack_max`, flood namespaces and time sends, so two of them at
//! once break each other. Engineers take it by hand too
//! (`flock /tmp/ctwatch-host.lock ...`).
use std::{fs::File, os::fd::AsRawFd};

use anyhow::{bail, Context, Result};

const LOCK: &str = "/tmp/ctwatch-host.lock";

/// Whether to wait for another holder or refuse at once.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Yes,
    No,
}

/// The lock, held by an ancestor (`flock /tmp/ctwatch-host.lock cargo
/// xtask ...`), or taken here: a description, and the file that holds it
/// until dropped.
pub fn take(wait: Wait) -> Result<(String, Option<File>)> {
    // flock(2) needs no write access: opened read-only, the file works for
    // whoever created it (root by hand, a user here), and it is created
    // world-readable only when missing.
    let f = match File::open(LOCK) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            File::options()
                .create(true)
                .append(true)
                .open(LOCK)
                .with_context(|| LOCK.to_string())?;
            File::open(LOCK).with_context(|| LOCK.to_string())?
        }
        Err(e) => return Err(e).with_context(|| LOCK.to_string()),
    };
    let ino = std::os::unix::fs::MetadataExt::ino(&f.metadata()?);
    let mut ancestors = vec![];
    let mut pid = std::process::id();
    while pid > 1 {
        ancestors.push(pid);
        pid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(") ")?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            })
            .unwrap_or(1);
    }
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let mut holder = None;
    for l in locks.lines().filter(|l| !l.contains("->")) {
        let w: Vec<&str> = l.split_whitespace().collect();
        let (Some(pid), Some(dev)) = (w.get(4), w.get(5)) else {
            continue;
        };
        if dev.rsplit(':').next() != Some(&ino.to_string()) {
            continue;
        }
        let pid: u32 = pid.parse().unwrap_or(0);
        if ancestors.contains(&pid) {
            return Ok((format!("`flock {LOCK}` (pid {pid})"), None));
        }
        holder = Some(pid);
    }
    let mut how = libc::LOCK_EX;
    match (holder, wait) {
        (Some(pid), Wait::No) => {
            bail!("{LOCK} is held by pid {pid}: another host run is going on; retry when it ends")
        }
        (Some(pid), Wait::Yes) => {
            eprintln!("xtask: waiting for {LOCK}, held by pid {pid} (another host run)")
        }
        (None, Wait::No) => how |= libc::LOCK_NB,
        (None, Wait::Yes) => {}
    }
    // SAFETY: flock(2) on a file this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), how) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            bail!("{LOCK} is held by another host run; retry when it ends");
        }
        bail!("locking {LOCK}: {e}");
    }
    Ok(("taken by xtask itself".into(), Some(f)))
}
