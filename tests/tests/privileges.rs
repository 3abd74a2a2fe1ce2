//! Least privilege, read off the running process, and what a missing
//! privilege (or another failure class) looks like from outside: its exit
//! code. Root, serial (`--test-threads=1`), host only.
use std::time::Duration;

use ctwatch_tests::*;

const HOLD_PORT: u16 = 7400;

// include/uapi/linux/capability.h
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SETPCAP: u32 = 8;
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_MODULE: u32 = 16;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn bit(cap: u32) -> u64 {
    1 << cap
}

/// One thread's capability sets, from /proc/PID/task/TID/status.
#[derive(Debug)]
struct Task {
    tid: String,
    comm: String,
    eff: u64,
    prm: u64,
    bnd: u64,
}

fn tasks_of(pid: u32) -> Vec<Task> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task list") {
        let dir = e.expect("task entry").path();
        // A thread that ended since the listing.
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let field = |name: &str| {
            let line = status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {}", dir.display()));
            u64::from_str_radix(line.trim(), 16).expect("hex capability set")
        };
        out.push(Task {
            tid: dir.file_name().unwrap().to_string_lossy().into_owned(),
            comm: std::fs::read_to_string(dir.join("comm"))
                .unwrap_or_default()
                .trim()
                .to_string(),
            eff: field("CapEff:"),
            prm: field("CapPrm:"),
            bnd: field("CapBnd:"),
        });
    }
    out
}

/// Every task holds none of `dropped` and all of `kept`.
fn assert_dropped_everywhere(pid: u32, dropped: u64, kept: u64) {
    let tasks = tasks_of(pid);
    assert!(
        tasks.len() >= 3,
        "the main thread and the runtime's workers: {tasks:?}"
    );
    for t in &tasks {
        for (set, value) in [("CapEff", t.eff), ("CapPrm", t.prm), ("CapBnd", t.bnd)] {
            assert_eq!(
                value & dropped,
                0,
                "thread {} ({}) still has {:#x} in {set}: {t:?}",
                t.tid,
                t.comm,
                value & dropped
            );
        }
        assert_eq!(
            t.eff & kept,
            kept,
            "thread {} lost what it needs: {t:?}",
            t.tid
        );
    }
}

#[test]
fn serve_drops_unneeded_capabilities_on_every_thread_and_still_counts() {
    require_env!();
    const MAX: usize = 16;
    const N: u64 = 150;
    let lab = Lab::new("privs", false);
    let _max = MaxGuard::set(MAX as u64);
    let _held = lab.fill(MAX, HOLD_PORT);
    let _listener = lab.srv.peer(&["udp-listen", "0.0.0.0:5353"]);
    let addr = free_loopback_addr();
    let w = start_serve(&lab.srv, &addr, &[]);

    // Root starts with every capability; after attach these are gone, and
    // from the bounding set too (root holds CAP_SETPCAP for that).
    let mut dropped = [
        CAP_PERFMON,
        CAP_SYS_RESOURCE,
        CAP_NET_BIND_SERVICE,
        CAP_DAC_OVERRIDE,
        CAP_SETPCAP,
        CAP_NET_RAW,
        CAP_SYS_MODULE,
    ]
    .into_iter()
    .fold(0, |m, c| m | bit(c));
    let mut kept = [
        CAP_SYS_ADMIN,
        CAP_NET_ADMIN,
        CAP_SYS_PTRACE,
        CAP_DAC_READ_SEARCH,
    ]
    .into_iter()
    .fold(0, |m, c| m | bit(c));
    // CAP_BPF goes where the kernel lets a map be used by fd without it.
    if maps_usable_without_any_capability() {
        dropped |= bit(CAP_BPF);
    } else {
        kept |= bit(CAP_BPF);
    }
    // The drop happens before the banner the harness waited for.
    assert_dropped_everywhere(w.pid, dropped, kept);

    // And ctwatch still does its job: reads its maps, enters the
    // namespace, dumps its table, names the listener.
    let before = lab.srv.kernel_drops();
    lab.cli
        .peer_run(&["udp-send", "198.18.0.1:5353", &N.to_string()]);
    let kernel_drops = lab.srv.drops_since(before, N) as f64;
    assert_eq!(kernel_drops, N as f64, "kernel drop counter");
    let ns = format!("netns=\"{}\"", lab.srv.inum());
    let mut text = String::new();
    poll_until(Duration::from_secs(15), || {
        text = scrape_metrics(&addr);
        metric_value(&text, "ctwatch_table_full_drops_total", &[&ns]) == Some(kernel_drops)
    });
    assert_eq!(
        metric_value(&text, "ctwatch_table_full_drops_total", &[&ns]),
        Some(kernel_drops),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "ctwatch_entries_by",
            &["dimension=\"dst_port\"", "key=\"tcp/7400\""]
        ),
        Some(MAX as f64),
        "the ctnetlink dump in the namespace: {text}"
    );
    assert_eq!(
        metric_value(&text, "ctwatch_lost_events_total", &[]),
        Some(0.0),
        "{text}"
    );
    // Threads started since (blocking pool, namespace visits) inherited
    // the reduced sets.
    assert_dropped_everywhere(w.pid, dropped, kept);

    let (code, _) = w.stop_with(libc::SIGTERM);
    assert_eq!(
        code, 0,
        "serve stops cleanly without the dropped capabilities"
    );
}

/// Whether a thread with no capability at all may read, write and walk a
/// map through its fd: the kernel behaviour ctwatch's drop of CAP_BPF
/// follows. By 6.5 bpf(2) checks privileges only at map and program
/// creation; stable kernels differ (Debian's 6.1 allows it, its 5.10 does
/// not). Checked on a thread of its own: capabilities are per thread.
fn maps_usable_without_any_capability() -> bool {
    std::thread::spawn(|| {
        // union bpf_attr, little-endian u64 words: BPF_MAP_CREATE reads
        // map_type, key_size, value_size and max_entries (u32 each); the
        // element commands read map_fd, then pointers to key and value.
        let bpf = |cmd: libc::c_long, attr: &mut [u64; 16]| {
            // SAFETY: a 128-byte attribute block that outlives the call;
            // the pointers in it lead to this thread's stack.
            unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128usize) }
        };
        const BPF_MAP_CREATE: libc::c_long = 0;
        const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
        const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
        const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
        const BPF_MAP_TYPE_HASH: u64 = 1;
        let mut attr = [0u64; 16];
        attr[0] = BPF_MAP_TYPE_HASH | 4 << 32;
        attr[1] = 8 | 4 << 32;
        let fd = bpf(BPF_MAP_CREATE, &mut attr);
        assert!(
            fd >= 0,
            "BPF_MAP_CREATE as root: {}",
            std::io::Error::last_os_error()
        );
        let key = 7u32;
        let mut val = 1u64;
        let mut next = 0u32;
        let elem = |attr: &mut [u64; 16], key: *const u32, value: u64| {
            *attr = [0; 16];
            attr[0] = fd as u64;
            attr[1] = key as u64;
            attr[2] = value;
        };
        elem(&mut attr, &key, &mut val as *mut u64 as u64);
        assert_eq!(bpf(BPF_MAP_UPDATE_ELEM, &mut attr), 0, "update as root");

        // Nothing left in any set of this thread.
        let header = [0x2008_0522u32, 0];
        let data = [0u32; 6];
        // SAFETY: version 3 header and two zeroed data structs.
        let r = unsafe { libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr()) };
        assert_eq!(r, 0, "capset: {}", std::io::Error::last_os_error());

        let mut ok = true;
        elem(&mut attr, &key, &mut val as *mut u64 as u64);
        ok &= bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) == 0;
        elem(&mut attr, &key, &mut val as *mut u64 as u64);
        ok &= bpf(BPF_MAP_UPDATE_ELEM, &mut attr) == 0;
        elem(&mut attr, std::ptr::null(), &mut next as *mut u32 as u64);
        ok &= bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) == 0;
        // SAFETY: closing the fd this thread created.
        unsafe { libc::close(fd as i32) };
        ok
    })
    .join()
    .expect("the capability-less thread")
}

#[test]
fn maps_are_used_by_fd_without_any_capability_from_6_5_on() {
    require_env!();
    let free = maps_usable_without_any_capability();
    eprintln!(
        "kernel {:?}: maps usable by fd without capabilities: {free}",
        kernel_version()
    );
    if kernel_version() >= (6, 5) {
        assert!(
            free,
            "a map fd was refused to a thread without capabilities"
        );
    }
}

/// README "Exit codes": usage 2, missing privilege 3, unsupported kernel
/// 4, each with a one-line message.
#[test]
fn each_failure_class_has_its_exit_code() {
    require_env!();
    let one_line = |code: i32, err: &str, want: i32| {
        assert_eq!(code, want, "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    };
    let (code, _, err) = ctwatch_once(&["report", "--no-such-flag"]);
    assert_eq!(code, 2, "clap's usage error: {err}");
    let (code, _, err) =
        ctwatch_once(&["report", "--netns", "no-such-netns-ctw", "--duration", "1"]);
    one_line(code, &err, 2);
    assert!(err.contains("no-such-netns-ctw"), "{err}");

    let (code, _, err) = ctwatch_as_nobody(&["report", "--duration", "1"]);
    one_line(code, &err, 3);
    assert!(err.contains("root"), "{err}");

    // Every kernel the suite runs on has the tracepoint mode, and no
    // stream of conntrack events there.
    let (code, _, err) = ctwatch_once(&["events", "--mode", "tracepoint"]);
    one_line(code, &err, 4);
    assert!(
        err.contains("kprobe"),
        "names the modes that would do: {err}"
    );
}
