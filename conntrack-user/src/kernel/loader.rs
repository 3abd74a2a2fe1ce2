//! Checks what the kernel offers, picks the attach mode, loads and attaches
//! the eBPF programs. The choice is made here and nowhere else, from the
//! table in [`crate::kernel::compat`].
use std::path::Path;

use aya::{
    programs::{KProbe, Program, RawTracePoint},
    Ebpf, EbpfLoader,
};
use conntrack_ebpf::Config;

use crate::{
    kernel::btf::{self, BtfError, KernelBtf},
    kernel::compat::{self, Attach, Mode, ProbeSpec},
};

/// The eBPF object, embedded at build time by `build.rs` (empty when the
/// crate was built without `cargo xtask build`, e.g. for unit tests).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ctwatch-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("ctwatch needs root, or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN (missing {0}): run it with sudo")]
    Privileges(String),
    #[error("nf_conntrack is not loaded in this kernel: run `modprobe nf_conntrack` (or the kernel lacks CONFIG_NF_CONNTRACK)")]
    NoConntrack,
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error("this ctwatch binary carries no eBPF object: build it with `cargo xtask build` (or run `cargo xtask run -- ...`)")]
    NoObject,
    #[error("kernel {0} has no BPF ring buffer (needs 5.8 or later): ctwatch cannot run on it")]
    NoRingBuf(String),
    #[error("loading the eBPF object failed on kernel {release}: {detail}")]
    Load { release: String, detail: String },
    #[error(
        "{mode} mode: {program} ({purpose}) failed to {stage} on kernel {release}: {detail}{hint}"
    )]
    Probe {
        mode: Mode,
        program: &'static str,
        purpose: &'static str,
        stage: &'static str,
        release: String,
        detail: String,
        hint: String,
    },
    #[error("{mode} mode is unavailable on kernel {release}: {why}")]
    Unavailable {
        mode: Mode,
        release: String,
        why: String,
    },
    #[error("no attach mode works on kernel {release}: {tried}")]
    NoMode { release: String, tried: String },
}

/// What the caller asks for.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadRequest {
    /// `None` means auto: try [`compat::AUTO_ORDER`] in order.
    pub mode: Option<Mode>,
    /// Stream one event per new conntrack entry (kernel-probe modes only),
    /// not only the first of each key.
    pub stream_new: bool,
    /// Ring-buffer records per second per CPU beyond the first of each key
    /// (0: unlimited). Totals come from in-kernel maps regardless.
    pub stream_budget: u32,
}

/// Loaded and attached programs. Dropping it detaches everything: every
/// link is file-descriptor based and nothing is pinned.
pub struct Loaded {
    pub ebpf: Ebpf,
    /// Forwards the programs' aya-log records to `log` (shown with `-v`).
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pub mode: Mode,
    pub attached: Vec<&'static str>,
    pub release: String,
    /// Whether the kernel counts every run of these programs it skips
    /// (`recursion_misses`): kprobes' only from 6.7. A raw tracepoint's
    /// program either is counted or, before 6.2, runs nested instead.
    pub skips_counted: bool,
}

/// Formats an error with its whole `source()` chain on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Errors are one line: a verifier log is cut to its last line (the
/// verdict), and the whole log goes to the debug log (`-vv`).
fn one_line(detail: &str) -> String {
    let mut lines = detail.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    let last = lines.next_back();
    if last.is_some() {
        log::debug!("{detail}");
    }
    // aya appends "Verifier output:" even when the log is empty.
    let first = first
        .trim_end_matches("Verifier output:")
        .trim_end()
        .trim_end_matches('.');
    match last {
        Some(l) => format!("{first} … {l}"),
        None => first.to_string(),
    }
}

/// Missing capabilities, by name (empty when we have what we need).
fn missing_caps() -> Vec<&'static str> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let eff = procfs::process::Process::myself()
        .and_then(|p| p.status())
        .map(|s| s.capeff)
        .unwrap_or(0);
    let mut missing = Vec::new();
    // CAP_SYS_ADMIN implies the other two on every kernel that has them.
    if eff & (1 << CAP_SYS_ADMIN) == 0 {
        if eff & (1u64 << CAP_BPF) == 0 {
            missing.push("CAP_BPF");
        }
        if eff & (1u64 << CAP_PERFMON) == 0 {
            missing.push("CAP_PERFMON");
        }
        // Needed to enter other network namespaces for their counters.
        missing.push("CAP_SYS_ADMIN");
    }
    missing
}

/// Checks that do not depend on the mode: privileges, conntrack, BTF.
pub fn preflight() -> Result<KernelBtf, LoadError> {
    let missing = missing_caps();
    if !missing.is_empty() {
        return Err(LoadError::Privileges(missing.join(", ")));
    }
    if !Path::new("/proc/sys/net/netfilter/nf_conntrack_max").exists()
        && !Path::new("/sys/module/nf_conntrack").exists()
    {
        return Err(LoadError::NoConntrack);
    }
    let btf = KernelBtf::load()?;
    Ok(btf.with_module("nf_conntrack")?)
}

/// Chooses, loads and attaches. Prints nothing: the caller says which mode
/// it got.
pub fn load(req: &LoadRequest) -> Result<Loaded, LoadError> {
    let kbtf = preflight()?;
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let release = btf::kernel_release();
    let candidates: Vec<Mode> = match req.mode {
        Some(m) => vec![m],
        None => compat::AUTO_ORDER.to_vec(),
    };
    // Everything BTF tells is read before loading, so this parse is freed
    // before aya parses the same BTF for its relocations: both alive at
    // once were the peak of ctwatch's RSS.
    let plans: Vec<(Mode, Result<Config, LoadError>)> = candidates
        .iter()
        .map(|&mode| (mode, plan(mode, req, &kbtf, &release)))
        .collect();
    let kprobe_skips_counted = btf::counts_kprobe_skips(&kbtf);
    drop(kbtf);
    let mut tried = Vec::new();
    for (mode, plan) in plans {
        let skips_counted = mode == Mode::Tracepoint || kprobe_skips_counted;
        match plan.and_then(|config| load_mode(mode, &config, &release, skips_counted)) {
            Ok(l) => return Ok(l),
            // A forced mode reports its own failure as is.
            Err(e) if req.mode.is_some() => return Err(e),
            Err(e) => {
                log::info!("{mode} mode unavailable: {e}");
                tried.push(format!("{mode}: {e}"));
            }
        }
    }
    Err(LoadError::NoMode {
        release,
        tried: tried.join("; "),
    })
}

/// Why `mode` cannot work here, found without loading anything.
fn unavailable(mode: Mode, kbtf: &KernelBtf) -> Option<String> {
    match mode {
        Mode::Kprobe => {
            if !Path::new("/sys/bus/event_source/devices/kprobe").exists() {
                return Some("the kernel has no kprobes (CONFIG_KPROBES is off)".into());
            }
            None
        }
        Mode::Tracepoint => btf::netfilter_drop_reason(kbtf)
            .err()
            .map(|e| e.to_string()),
    }
}

/// `LIVE` holds one record per entry created since attach; size it for a
/// full table (it is not preallocated, so unused room costs nothing).
fn live_capacity(mode: Mode) -> u32 {
    if !mode.sees_entries() {
        return 1;
    }
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        // Every namespace may hold up to the (global) max: leave room for
        // several full ones. Not preallocated, so headroom costs nothing.
        .map_or(262_144, |m| m.saturating_mul(4).clamp(4096, 1 << 21) as u32)
}

/// First-of-key records per second per CPU: enough to name every owner of
/// an ordinary incident; a flood of new keys is counted, not streamed.
const FIRST_BUDGET: u32 = 4096;

/// Keys per count map. A flood of new keys looks every drop up in the
/// active map, so the map's size is the drop path's cache footprint: at
/// 65,536 keys those lookups missed the cache and the program cost about
/// 1.4 times what it costs at 16,384 (bpf_stats, in a flood of new keys),
/// which still holds an ordinary incident's keys for a refresh. Values are
/// preallocated per CPU, so hosts with many CPUs get fewer keys: at most
/// about 16 MiB per map.
fn count_capacity() -> u32 {
    const KEYS: usize = 16_384;
    const BYTES: usize = 16 << 20;
    let per_key = std::mem::size_of::<conntrack_ebpf::AggValue>() * cpus() as usize
        + std::mem::size_of::<conntrack_ebpf::AggKey>();
    (BYTES / per_key).clamp(4096, KEYS) as u32
}

/// Ring-buffer bytes: 1 MiB per CPU, from 2 to 16 MiB. Each CPU streams
/// at most its first-of-key budget plus the stream budget per second
/// (about 2 MB/s), and userspace is woken every 5 ms, so this is about
/// half a second of every CPU at its limit. The kernel maps the buffer
/// into the reader twice (wrap-around), all of it resident: at a fixed
/// 16 MiB it was half of `serve`'s peak RSS on a 2-CPU host.
fn ring_bytes() -> u32 {
    (cpus().min(16) << 20)
        .next_power_of_two()
        .clamp(2 << 20, 16 << 20)
}

/// Possible CPUs: per-CPU maps hold a value for each.
fn cpus() -> u32 {
    aya::util::nr_cpus().unwrap_or(1).max(1) as u32
}

/// The configuration `mode` would load with, or why it cannot work here.
fn plan(
    mode: Mode,
    req: &LoadRequest,
    kbtf: &KernelBtf,
    release: &str,
) -> Result<Config, LoadError> {
    if let Some(why) = unavailable(mode, kbtf) {
        return Err(LoadError::Unavailable {
            mode,
            release: release.to_string(),
            why,
        });
    }
    let mut config = btf::resolve_layout(kbtf)?;
    config.reason_netfilter_drop = btf::netfilter_drop_reason(kbtf).unwrap_or(0);
    config.stream_new = req.stream_new as u32;
    config.stream_budget = req.stream_budget;
    config.first_budget = FIRST_BUDGET;
    // Every CPU may add its share and no more: the LRU map then never has to
    // evict a key it has counted, so per-key counts stay exact and the rest
    // is counted per namespace past the cap.
    config.count_cap = (count_capacity() / cpus()).max(1);
    Ok(config)
}

fn load_mode(
    mode: Mode,
    config: &Config,
    release: &str,
    skips_counted: bool,
) -> Result<Loaded, LoadError> {
    let counts = count_capacity();
    let mut ebpf = EbpfLoader::new()
        .override_global("CONFIG", config, true)
        .map_max_entries("LIVE", live_capacity(mode))
        .map_max_entries("COUNTS_A", counts)
        .map_max_entries("COUNTS_B", counts)
        .map_max_entries("EVENTS", ring_bytes())
        .load(OBJECT)
        .map_err(|e| classify_load_error(e, release))?;
    let mut attached = Vec::new();
    for spec in compat::probes_for(mode) {
        match attach(&mut ebpf, spec, release) {
            Ok(()) => attached.push(spec.program),
            Err(e) if spec.required => return Err(e),
            Err(e) => log::warn!("optional probe skipped: {e}"),
        }
    }
    for spec in compat::unpaired(mode, &attached) {
        log::warn!(
            "optional probe {} detached: the other half of its pair did not attach",
            spec.program
        );
        if let Some(Program::KProbe(p)) = ebpf.program_mut(spec.program) {
            if let Err(e) = p.unload() {
                log::warn!("{}: {e}", spec.program);
            }
        }
        attached.retain(|a| *a != spec.program);
    }
    // The object always carries the log map; if it does not, nothing logs.
    let logger = aya_log::EbpfLogger::init(&mut ebpf)
        .map_err(|e| log::debug!("no eBPF log forwarding: {e}"))
        .ok();
    Ok(Loaded {
        ebpf,
        logger,
        mode,
        attached,
        release: release.to_string(),
        skips_counted,
    })
}

fn classify_load_error(e: aya::EbpfError, release: &str) -> LoadError {
    let detail = one_line(&chain(&e));
    if let aya::EbpfError::MapError(aya::maps::MapError::CreateError { name, .. }) = &e {
        if name == "EVENTS" && compat::parse_release(release).is_some_and(|v| v < (5, 8)) {
            return LoadError::NoRingBuf(release.to_string());
        }
    }
    LoadError::Load {
        release: release.to_string(),
        detail,
    }
}

fn attach(ebpf: &mut Ebpf, spec: &ProbeSpec, release: &str) -> Result<(), LoadError> {
    let fail = |stage: &'static str, detail: String| {
        let detail = one_line(&detail);
        let old = compat::parse_release(release).is_some_and(|v| v < spec.min_kernel);
        let hint = if old {
            format!(
                " (this attach point needs kernel {}.{}+)",
                spec.min_kernel.0, spec.min_kernel.1
            )
        } else if detail.contains("Operation not permitted") {
            " (the kernel refused this program type: lockdown, or a missing capability)".into()
        } else {
            String::new()
        };
        LoadError::Probe {
            mode: spec.mode,
            program: spec.program,
            purpose: spec.purpose,
            stage,
            release: release.to_string(),
            detail,
            hint,
        }
    };
    let prog = ebpf
        .program_mut(spec.program)
        .ok_or_else(|| fail("load", "program missing from the eBPF object".into()))?;
    match (spec.attach, prog) {
        (Attach::RawTracepoint(tp), Program::RawTracePoint(p)) => {
            let p: &mut RawTracePoint = p;
            p.load().map_err(|e| fail("load", chain(&e)))?;
            p.attach(tp).map_err(|e| fail("attach", chain(&e)))?;
        }
        (Attach::KProbe(f) | Attach::KRetProbe(f), Program::KProbe(p)) => {
            let p: &mut KProbe = p;
            p.load().map_err(|e| fail("load", chain(&e)))?;
            p.attach(f, 0).map_err(|e| fail("attach", chain(&e)))?;
        }
        (_, _) => {
            return Err(fail(
                "load",
                "program type does not match the compat table".into(),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn verifier_logs_become_one_line() {
        let log = "load failed: Permission denied. Verifier output: 0: (79) r1 = *(u64 *)(r1 +0)\n1: R1 invalid mem access 'scalar'\nprocessed 2 insns\n";
        let l = one_line(log);
        assert!(!l.contains('\n'), "{l}");
        assert!(l.ends_with("processed 2 insns"), "{l}");
        assert_eq!(
            one_line("returned Operation not permitted (os error 1). Verifier output: "),
            "returned Operation not permitted (os error 1)"
        );
    }
}
