//! Least privilege: once the programs are attached and their maps and ring
//! buffer are open, ctwatch gives up every capability it will not use
//! again, on every thread and, where it may, in the bounding set.
//!
//! What stays, and why (README "Capabilities" has them per command):
//! - CAP_SYS_ADMIN: `setns()` into each network namespace at every refresh,
//!   for its sysctls, counters and ctnetlink dumps;
//! - CAP_NET_ADMIN: ctnetlink dumps and statistics;
//! - CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH: `/proc/PID/ns/net` and
//!   `/proc/PID/fd` of processes of other users, and of root processes that
//!   kept capabilities ctwatch dropped (ptrace access wants the target's
//!   capabilities to be a subset of ours), to find namespaces and name the
//!   owners of sockets;
//! - CAP_BPF only where the kernel wants it to use a map through its fd:
//!   there every bpf(2) command checks it when unprivileged BPF is disabled
//!   (the default). A fix that limits that check to map and program
//!   creation went to stable kernels too (Debian's 6.1 has it, its 5.10
//!   does not), so ctwatch asks the kernel rather than its version.
//!
//! CAP_PERFMON (attaching), CAP_NET_BIND_SERVICE (`serve` binds first),
//! CAP_SYS_RESOURCE and every other capability go.
//!
//! Capabilities belong to threads, and capset(2) changes only the calling
//! thread's. The async runtime's workers exist before ctwatch attaches, so
//! each thread must drop for itself: as libcap's psx and Go's
//! `AllThreadsSyscall` do, every task in /proc/self/task gets a signal whose
//! handler makes the same raw syscalls there. Threads created later inherit
//! the reduced sets from the (reduced) thread that creates them. /proc is
//! read back until every task shows the reduced sets.
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicI32, AtomicU64, Ordering::SeqCst},
    time::{Duration, Instant},
};

use caps::{errors::CapsError, CapSet, Capability};

/// Needed after attach on every kernel.
const KEPT: [Capability; 4] = [
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_SYS_PTRACE,
    Capability::CAP_DAC_READ_SEARCH,
];

/// Every thread only has to run a signal handler: far more than enough.
const WITHIN: Duration = Duration::from_secs(2);

/// What every thread keeps, and what leaves the bounding set: read by the
/// signal handler, which may not allocate or lock.
static KEEP: AtomicU64 = AtomicU64::new(0);
static BOUNDING_DROP: AtomicU64 = AtomicU64::new(0);
/// The first errno a thread's drop failed with; 0 while none has.
static FAILED: AtomicI32 = AtomicI32::new(0);

#[derive(Debug, thiserror::Error)]
pub(crate) enum PrivilegeError {
    #[error("cannot read ctwatch's own capabilities: {0}")]
    Read(#[from] CapsError),
    #[error("cannot list ctwatch's threads in /proc/self/task: {0}")]
    Threads(#[from] procfs::ProcError),
    #[error("every real-time signal is taken, and one is needed to reach each thread")]
    NoSignal,
    #[error("a thread could not drop its capabilities: {0}")]
    Thread(nix::Error),
    #[error("threads {0} did not drop their capabilities within 2 s (do they block signals?)")]
    Late(String),
}

/// Which capabilities to keep and to drop, from those held now.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    keep: u64,
    /// Leaves the permitted and effective sets.
    drop: u64,
    /// Leaves the bounding set: only with CAP_SETPCAP, which a container
    /// rarely has; no_new_privs (`allowPrivilegeEscalation: false`) then
    /// keeps an exec from regaining anything all the same.
    bounding: u64,
}

fn mask(caps: impl IntoIterator<Item = Capability>) -> u64 {
    caps.into_iter().fold(0, |m, c| m | c.bitmask())
}

fn plan(permitted: u64, bounding: u64, setpcap: bool, maps_need_no_cap: bool) -> Plan {
    let mut keep = mask(KEPT);
    if !maps_need_no_cap {
        keep |= Capability::CAP_BPF.bitmask();
    }
    Plan {
        keep,
        drop: permitted & !keep,
        bounding: if setpcap { bounding & !keep } else { 0 },
    }
}

/// "CAP_BPF, CAP_PERFMON" for a mask, in kernel order.
fn names(m: u64) -> String {
    let mut held: Vec<Capability> = caps::all()
        .into_iter()
        .filter(|c| m & c.bitmask() != 0)
        .collect();
    held.sort_by_key(Capability::index);
    held.iter()
        .map(Capability::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Drops, on every thread of the process, the capabilities no longer
/// needed once the programs are attached. A failure is a warning: ctwatch
/// then works on with more privilege than it needs.
pub(crate) fn drop_unneeded() {
    match drop_everywhere() {
        Ok(p) if p.drop | p.bounding == 0 => {}
        Ok(p) => log::info!(
            "dropped the capabilities not needed after attach: {}; kept {}",
            names(p.drop | p.bounding),
            names(p.keep)
        ),
        Err(e) => log::warn!("ctwatch keeps capabilities it no longer needs: {e}"),
    }
}

fn drop_everywhere() -> Result<Plan, PrivilegeError> {
    let p = plan(
        mask(caps::read(None, CapSet::Permitted)?),
        mask(caps::read(None, CapSet::Bounding)?),
        caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)?,
        maps_need_no_capability(),
    );
    if p.drop | p.bounding == 0 {
        return Ok(p);
    }
    KEEP.store(p.keep, SeqCst);
    BOUNDING_DROP.store(p.bounding, SeqCst);
    let sig = install_handler()?;
    let result = signal_until_done(sig, &p);
    // Ignoring discards any signal still queued for a thread that had
    // already dropped; the default action would end the process.
    set_handler(sig, libc::SIG_IGN);
    result.map(|()| p)
}

// include/uapi/linux/bpf.h
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_TYPE_ARRAY: u64 = 2;

/// `bpf(2)` with a `union bpf_attr` laid out as little-endian u64 words.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> libc::c_long {
    // SAFETY: a 128-byte attribute block that outlives the call; the
    // pointers the caller put in it lead to live stack data.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128usize) }
}

/// Whether a thread without any capability may use a map through its fd:
/// asked of the kernel, on a thread of its own that creates a one-entry
/// map, drops everything and reads the map.
fn maps_need_no_capability() -> bool {
    let probe = std::thread::Builder::new().spawn(|| {
        let mut attr = [0u64; 16];
        // map_type, key_size; value_size, max_entries.
        attr[0] = BPF_MAP_TYPE_ARRAY | 4 << 32;
        attr[1] = 8 | 1 << 32;
        let fd = bpf(BPF_MAP_CREATE, &mut attr);
        let Ok(fd) = i32::try_from(fd) else {
            return false;
        };
        if fd < 0 {
            return false;
        }
        // SAFETY: the kernel just returned this fd to us; it is closed on drop.
        let map = unsafe { <OwnedFd as FromRawFd>::from_raw_fd(fd) };
        if set_this_thread(0).is_err() {
            return false;
        }
        let key = 0u32;
        let mut value = 0u64;
        attr = [0; 16];
        attr[0] = map.as_raw_fd() as u64;
        attr[1] = &key as *const u32 as u64;
        attr[2] = &mut value as *mut u64 as u64;
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) == 0
    });
    // Without an answer, keeping CAP_BPF is the safe mistake.
    probe.is_ok_and(|t| t.join().unwrap_or(false))
}

fn signal_until_done(sig: libc::c_int, p: &Plan) -> Result<(), PrivilegeError> {
    let pid = std::process::id() as libc::pid_t;
    let deadline = Instant::now() + WITHIN;
    let mut signalled = Vec::new();
    loop {
        let code = FAILED.load(SeqCst);
        if code != 0 {
            return Err(PrivilegeError::Thread(nix::Error::from_raw(code)));
        }
        let left = not_done(p)?;
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let tids: Vec<String> = left.iter().map(i32::to_string).collect();
            return Err(PrivilegeError::Late(tids.join(", ")));
        }
        // Queued signals are not lost: each thread needs one. A thread
        // that ended meanwhile (ESRCH) is gone from the next listing.
        for tid in left {
            if !signalled.contains(&tid) {
                // SAFETY: tgkill has no memory arguments.
                unsafe { libc::tgkill(pid, tid, sig) };
                signalled.push(tid);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Threads still holding a capability they should have dropped.
fn not_done(p: &Plan) -> Result<Vec<i32>, PrivilegeError> {
    let mut left = Vec::new();
    for task in procfs::process::Process::myself()?.tasks()?.flatten() {
        // A thread that ended between the listing and the read.
        let Ok(s) = task.status() else { continue };
        let bounding = s.capbnd.unwrap_or(0);
        if (s.capprm | s.capeff) & p.drop != 0 || bounding & p.bounding != 0 {
            left.push(task.tid);
        }
    }
    Ok(left)
}

/// The first real-time signal nobody handles.
fn install_handler() -> Result<libc::c_int, PrivilegeError> {
    for sig in libc::SIGRTMIN()..=libc::SIGRTMAX() {
        // SAFETY: a null new action only reads the current one.
        let current = unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut old);
            old.sa_sigaction
        };
        if current == libc::SIG_DFL
            && set_handler(sig, on_signal as extern "C" fn(libc::c_int) as usize)
        {
            return Ok(sig);
        }
    }
    Err(PrivilegeError::NoSignal)
}

fn set_handler(sig: libc::c_int, handler: libc::sighandler_t) -> bool {
    // SAFETY: a zeroed sigaction with an empty mask and a handler that is
    // async-signal-safe (or SIG_IGN).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler;
        // Interrupted reads and writes resume instead of failing EINTR.
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(sig, &action, std::ptr::null_mut()) == 0
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    // The interrupted code must find errno as it left it.
    let saved = errno();
    if let Err(code) = drop_on_this_thread() {
        let _ = FAILED.compare_exchange(0, code, SeqCst, SeqCst);
    }
    // SAFETY: errno is this thread's.
    unsafe { *libc::__errno_location() = saved };
}

// include/uapi/linux/capability.h
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Runs inside a signal handler: raw syscalls on stack data only, no
/// allocation, no lock (which is why the `caps` crate is not called here).
fn drop_on_this_thread() -> Result<(), i32> {
    let bounding = BOUNDING_DROP.load(SeqCst);
    for cap in (0..64).filter(|c| bounding & (1u64 << c) != 0) {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(errno());
        }
    }
    set_this_thread(KEEP.load(SeqCst))
}

fn errno() -> i32 {
    // SAFETY: errno is this thread's.
    unsafe { *libc::__errno_location() }
}

/// Lowers the calling thread's effective, permitted and inheritable sets
/// to `keep`; lowering the last two lowers the ambient set too.
/// Async-signal-safe.
fn set_this_thread(keep: u64) -> Result<(), i32> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: version 3 reads and writes two CapData; both live on this
    // stack for the call.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(errno());
    }
    for (half, d) in data.iter_mut().enumerate() {
        let k = (keep >> (32 * half)) as u32;
        d.effective &= k;
        d.permitted &= k;
        d.inheritable &= k;
    }
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(errno());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Capability::*;

    const ALL: u64 = (1 << 41) - 1;

    #[test]
    fn root_where_maps_need_no_capability_keeps_four() {
        let p = plan(ALL, ALL, true, true);
        assert_eq!(
            p.keep,
            mask([
                CAP_SYS_ADMIN,
                CAP_NET_ADMIN,
                CAP_SYS_PTRACE,
                CAP_DAC_READ_SEARCH
            ])
        );
        for c in [
            CAP_BPF,
            CAP_PERFMON,
            CAP_SYS_RESOURCE,
            CAP_NET_BIND_SERVICE,
            CAP_DAC_OVERRIDE,
            CAP_SETPCAP,
        ] {
            assert_ne!(p.drop & c.bitmask(), 0, "{c}");
            assert_ne!(p.bounding & c.bitmask(), 0, "{c}");
        }
        assert_eq!(p.drop & p.keep, 0);
    }

    #[test]
    fn cap_bpf_stays_where_map_reads_still_check_it() {
        let p = plan(ALL, ALL, true, false);
        assert_ne!(p.keep & CAP_BPF.bitmask(), 0);
        assert_eq!(p.drop & CAP_BPF.bitmask(), 0);
        assert_eq!(p.bounding & CAP_BPF.bitmask(), 0);
    }

    #[test]
    fn the_daemonset_drops_bpf_and_perfmon_and_leaves_the_bounding_set() {
        let granted = mask([
            CAP_BPF,
            CAP_PERFMON,
            CAP_NET_ADMIN,
            CAP_SYS_ADMIN,
            CAP_SYS_PTRACE,
            CAP_DAC_READ_SEARCH,
        ]);
        let p = plan(granted, granted, false, true);
        assert_eq!(p.drop, mask([CAP_BPF, CAP_PERFMON]));
        assert_eq!(p.bounding, 0);
        assert_eq!(names(p.drop), "CAP_PERFMON, CAP_BPF");
    }

    #[test]
    fn holding_only_what_is_kept_drops_nothing() {
        let p = plan(mask(KEPT), mask(KEPT), false, true);
        assert_eq!(p.drop | p.bounding, 0);
    }
}
