//! Everything the bench changes outside its own processes, undone on every
//! exit path: a normal return, an error or a panic (the owners' `Drop`),
//! SIGINT, SIGTERM or SIGHUP (a thread that waits for them), and even
//! SIGKILL: the original values of global sysctls are written to a restore
//! file first, and the next bench applies a file it finds.
use std::{
    fs,
    path::PathBuf,
    sync::{Mutex, MutexGuard},
};

use anyhow::{Context, Result};

struct State {
    /// Global sysctls (path, original value), in the order they were changed.
    sysctls: Vec<(String, String)>,
    /// Network namespaces the bench created.
    netns: Vec<String>,
    /// Child processes still running.
    pids: Vec<i32>,
    /// Set once a signal cleaned up: nothing may change after it.
    closed: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    sysctls: Vec::new(),
    netns: Vec::new(),
    pids: Vec::new(),
    closed: false,
});

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

fn restore_file() -> PathBuf {
    crate::root().join("target/bench/restore")
}

static SIGNAL_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    // Async-signal-safe: one write(2).
    let b = sig as u8;
    unsafe {
        libc::write(
            SIGNAL_PIPE.load(std::sync::atomic::Ordering::Relaxed),
            (&b as *const u8).cast(),
            1,
        )
    };
}

/// Applies a restore file an interrupted bench left, then routes SIGINT,
/// SIGTERM and SIGHUP to a cleanup thread.
pub fn install() -> Result<()> {
    if let Ok(text) = fs::read_to_string(restore_file()) {
        for (path, value) in text.lines().filter_map(|l| l.split_once('\t')) {
            fs::write(path, value).with_context(|| format!("restoring {path}"))?;
            eprintln!("xtask: restored {path} = {value}, left by an interrupted bench");
        }
        fs::remove_file(restore_file())?;
    }
    // Nothing of a run that was killed outright may linger either.
    for ns in [super::netns::NS_S, super::netns::NS_C] {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(std::process::Stdio::null())
            .status();
    }
    // A handler that writes the signal's number to a pipe, and a thread that
    // reads it. Not a blocked mask and sigwait: children inherit a blocked
    // mask (ctwatch would never see its SIGINT), while caught signals are
    // reset to their default on exec.
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        anyhow::bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    SIGNAL_PIPE.store(fds[1], std::sync::atomic::Ordering::Relaxed);
    let read_end = fds[0];
    std::thread::spawn(move || {
        let mut sig = 0u8;
        while unsafe { libc::read(read_end, (&mut sig as *mut u8).cast(), 1) } != 1 {}
        eprintln!("xtask: signal {sig}: restoring the host and exiting");
        let mut st = state();
        clean(&mut st);
        st.closed = true;
        // Exits with the lock held: no other thread changes anything now.
        std::process::exit(128 + i32::from(sig));
    });
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
    Ok(())
}

/// Writes a global sysctl, remembering (in memory and in the restore file)
/// its value before the bench first touched it.
pub fn set_sysctl(path: &str, value: &str) -> Result<()> {
    let mut st = state();
    if st.closed {
        anyhow::bail!("cleaning up");
    }
    if !st.sysctls.iter().any(|(p, _)| p == path) {
        let old = fs::read_to_string(path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .to_string();
        st.sysctls.push((path.to_string(), old));
        let text: String = st
            .sysctls
            .iter()
            .rev()
            .map(|(p, v)| format!("{p}\t{v}\n"))
            .collect();
        fs::create_dir_all(restore_file().parent().expect("has a parent"))?;
        fs::write(restore_file(), text)?;
    }
    fs::write(path, value).with_context(|| format!("writing {value} to {path}"))
}

/// Puts a global sysctl back to its original value now (it stays
/// registered, so cleanup writes the same value again, harmlessly).
pub fn reset_sysctl(path: &str) -> Result<()> {
    let st = state();
    if let Some((_, v)) = st.sysctls.iter().find(|(p, _)| p == path) {
        fs::write(path, v).with_context(|| format!("restoring {path}"))?;
    }
    Ok(())
}

pub fn add_netns(name: &str) {
    state().netns.push(name.to_string());
}

pub fn add_pid(pid: u32) {
    state().pids.push(pid as i32);
}

pub fn remove_pid(pid: u32) {
    state().pids.retain(|p| *p != pid as i32);
}

/// Kills what still runs, restores the sysctls and deletes the namespaces.
/// Safe to call more than once.
pub fn cleanup() {
    clean(&mut state());
}

fn clean(st: &mut State) {
    for pid in st.pids.drain(..) {
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    for (path, value) in st.sysctls.iter().rev() {
        if let Err(e) = fs::write(path, value) {
            eprintln!("xtask: could not restore {path} = {value}: {e}");
        }
    }
    for ns in st.netns.drain(..) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &ns])
            .status();
    }
    if !st.sysctls.is_empty() {
        st.sysctls.clear();
        let _ = fs::remove_file(restore_file());
    }
}
