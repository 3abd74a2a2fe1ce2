//! Reads what the kernel programs produce: the `EVENTS` ring buffer, the
//! per-CPU `STATS` counters and the per-CPU `DROPS` aggregation map.
use std::collections::HashMap;

use std::os::fd::AsFd;

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf};
use conntrack_ebpf::{stat, AggKey, AggValue, FlowEvent, RETURN_STALE_NS};
use tokio::io::unix::AsyncFd;

use crate::{
    kernel::loader::Loaded,
    source::{programs::Programs, records as event},
};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("eBPF map {0} missing from the object: rebuild with `cargo xtask build`")]
    MissingMap(&'static str),
    #[error("eBPF map {name}: {detail}")]
    Map { name: &'static str, detail: String },
    #[error("eBPF program {name}: {detail}")]
    Program { name: &'static str, detail: String },
    #[error("waiting on the ring buffer failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The kernel functions probed by a kprobe/kretprobe pair, each with the
/// slot of its missed returns.
pub const RETURN_PROBES: [(u32, &str); 3] = [
    (stat::MISSED_CONFIRM, "__nf_conntrack_confirm"),
    (stat::MISSED_EARLY_DROP, "early_drop"),
    (stat::MISSED_CLASH, "nf_ct_resolve_clash"),
];

/// Kernel counters summed over CPUs, indexed by `conntrack_ebpf::stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelStats(pub [u64; stat::COUNT as usize]);

impl KernelStats {
    pub fn get(&self, idx: u32) -> u64 {
        self.0[idx as usize]
    }
    /// Returns the kernel's kretprobes missed, over the probed functions.
    pub fn returns_missed(&self) -> u64 {
        RETURN_PROBES.iter().map(|(i, _)| self.get(*i)).sum()
    }

    /// Counter growth since `earlier`.
    pub fn since(&self, earlier: &KernelStats) -> KernelStats {
        let mut out = [0u64; stat::COUNT as usize];
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.0[i].saturating_sub(earlier.0[i]);
        }
        KernelStats(out)
    }
}

pub struct KernelSource {
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    ring: AsyncFd<RingBuf<MapData>>,
    stats: PerCpuArray<MapData, u64>,
    /// `COUNTS_A` and `COUNTS_B`: the programs add to `counts[gen & 1]`.
    counts: [MapData; 2],
    gen: Array<MapData, u32>,
    generation: u32,
    occupancy: MapData,
    spill: MapData,
    live: BpfHashMap<MapData, u64, FlowEvent>,
    /// Entry state the kprobe/kretprobe pairs leave per CPU, for the missed
    /// returns the programs have not found yet (None in tracepoint mode:
    /// no pair is attached, and reading it would cost syscalls every refresh).
    pairs: Option<PairState>,
    programs: Programs,
    cpus: usize,
    /// Records the decoder refused (size or content): counted as lost.
    pub malformed: u64,
}

/// A per-CPU hash map, read in batches rather than through aya's types.
fn take_percpu(loaded: &mut Loaded, name: &'static str) -> Result<MapData, SourceError> {
    match loaded.ebpf.take_map(name) {
        Some(Map::PerCpuHashMap(m) | Map::PerCpuLruHashMap(m)) => Ok(m),
        Some(_) => Err(SourceError::Map {
            name,
            detail: "not a per-CPU hash map: rebuild with `cargo xtask build`".into(),
        }),
        None => Err(SourceError::MissingMap(name)),
    }
}

/// One key's count over CPUs, with the source port one of them saw last
/// (any of them names the same origin).
fn summed(per_cpu: &[AggValue]) -> AggValue {
    let mut out = AggValue::default();
    for v in per_cpu {
        out.count += v.count;
        if v.count > 0 && v.sport != 0 {
            out.sport = v.sport;
        }
    }
    out
}

/// Every key of a per-CPU hash map with its value on each CPU, kept.
fn read_all<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    cpus: usize,
    name: &'static str,
) -> Result<Vec<(K, Vec<V>)>, SourceError> {
    super::batch::read_percpu(map.fd().as_fd(), cpus, false).map_err(|e| SourceError::Map {
        name,
        detail: e.to_string(),
    })
}

/// Counts read at one refresh: `settled` were drained from the map the
/// programs left a refresh ago and will not change; `pending` is the map
/// just left, read but kept, so the next refresh drains what lands late.
#[derive(Debug, Default)]
pub(crate) struct Drained {
    pub(crate) settled: Vec<(AggKey, AggValue)>,
    pub(crate) pending: Vec<(AggKey, AggValue)>,
}

fn take<T>(loaded: &mut Loaded, name: &'static str) -> Result<T, SourceError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = loaded
        .ebpf
        .take_map(name)
        .ok_or(SourceError::MissingMap(name))?;
    T::try_from(map).map_err(|e| SourceError::Map {
        name,
        detail: e.to_string(),
    })
}

impl KernelSource {
    pub fn new(loaded: &mut Loaded) -> Result<Self, SourceError> {
        let ring: RingBuf<MapData> = take(loaded, "EVENTS")?;
        Ok(Self {
            // SAFETY: the ring buffer owns its fd and outlives the registration
            // (both live in this struct and are dropped together).
            ring: unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?,
            stats: take(loaded, "STATS")?,
            counts: [
                take_percpu(loaded, "COUNTS_A")?,
                take_percpu(loaded, "COUNTS_B")?,
            ],
            gen: take(loaded, "GEN")?,
            generation: 0,
            occupancy: take_percpu(loaded, "OCC")?,
            spill: take_percpu(loaded, "SPILL")?,
            live: take(loaded, "LIVE")?,
            pairs: if loaded.mode.sees_entries() {
                Some(PairState::take(loaded)?)
            } else {
                None
            },
            programs: Programs::of(loaded)?,
            cpus: aya::util::nr_cpus().map_err(|(what, e)| SourceError::Map {
                name: "COUNTS_A",
                detail: format!("{what}: {e}"),
            })?,
            logger: loaded.logger.take(),
            malformed: 0,
        })
    }

    /// Forwards pending eBPF log records (rare: unreadable packets).
    fn flush_logs(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }

    /// Waits until the ring buffer has data, then drains it into `out`.
    pub async fn next_batch(&mut self, out: &mut Vec<FlowEvent>) -> Result<(), SourceError> {
        self.flush_logs();
        let mut guard = self.ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match event::parse(&item) {
                Ok(ev) => out.push(ev),
                Err(e) => {
                    self.malformed += 1;
                    log::warn!("{e}");
                }
            }
        }
        guard.clear_ready();
        Ok(())
    }

    /// Drains whatever is buffered without waiting.
    pub fn drain_now(&mut self, out: &mut Vec<FlowEvent>) {
        self.flush_logs();
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            match event::parse(&item) {
                Ok(ev) => out.push(ev),
                Err(_) => self.malformed += 1,
            }
        }
    }

    pub fn stats(&self) -> Result<KernelStats, SourceError> {
        let mut out = [0u64; stat::COUNT as usize];
        // The programs' slots; the rest are filled below.
        for (i, o) in out[..stat::KERNEL_COUNT as usize].iter_mut().enumerate() {
            let v = self
                .stats
                .get(&(i as u32), 0)
                .map_err(|e| SourceError::Map {
                    name: "STATS",
                    detail: e.to_string(),
                })?;
            *o = v.iter().sum();
        }
        // Read after STATS: a frame the programs count between the two
        // reads is missing from this sample only, never in it twice.
        if let (Some(p), Some(now)) = (&self.pairs, monotonic_ns()) {
            let pending = p.stale(now).map_err(|e| SourceError::Map {
                name: "CONFIRM_FRAMES",
                detail: e.to_string(),
            })?;
            out[stat::MISSED_CONFIRM as usize] += pending.confirm;
            out[stat::MISSED_EARLY_DROP as usize] += pending.early_drop;
            out[stat::MISSED_CLASH as usize] += pending.clash;
        }
        out[stat::RUNS_SKIPPED as usize] = self.programs.runs_skipped()?;
        Ok(KernelStats(out))
    }

    /// Counts since the previous call. Drains the map the programs left at
    /// the previous call (nothing writes it any more), switches them to it,
    /// and reads the one they just left without emptying it. Cost: the keys
    /// that changed, in a few syscalls.
    pub(crate) fn drain(&mut self) -> Result<Drained, SourceError> {
        let map_err = |name: &'static str| {
            move |e: std::io::Error| SourceError::Map {
                name,
                detail: e.to_string(),
            }
        };
        let idle = (self.generation as usize + 1) & 1;
        let settled = self.read(idle, true).map_err(map_err("COUNTS"))?;
        self.generation = self.generation.wrapping_add(1);
        self.gen
            .set(0, self.generation, 0)
            .map_err(|e| SourceError::Map {
                name: "GEN",
                detail: e.to_string(),
            })?;
        let left = (self.generation as usize + 1) & 1;
        let pending = self.read(left, false).map_err(map_err("COUNTS"))?;
        Ok(Drained { settled, pending })
    }

    /// Counts past the key budget since attach, per (namespace, kind).
    pub(crate) fn spilled(&self) -> Result<HashMap<(u32, u8), u64>, SourceError> {
        Ok(read_all::<u64, u64>(&self.spill, self.cpus, "SPILL")?
            .into_iter()
            .map(|(k, v)| (((k >> 8) as u32, k as u8), v.iter().sum()))
            .collect())
    }

    /// Empties both count maps: what was counted before a window starts
    /// belongs to no window.
    pub(crate) fn reset(&mut self) -> Result<(), SourceError> {
        for which in 0..2 {
            self.read(which, true).map_err(|e| SourceError::Map {
                name: "COUNTS",
                detail: e.to_string(),
            })?;
        }
        Ok(())
    }

    fn read(&self, which: usize, delete: bool) -> std::io::Result<Vec<(AggKey, AggValue)>> {
        let fd = self.counts[which].fd().as_fd();
        Ok(
            super::batch::read_percpu::<AggKey, AggValue>(fd, self.cpus, delete)?
                .into_iter()
                .map(|(k, v)| (k, summed(&v)))
                .filter(|(_, v)| v.count > 0)
                .collect(),
        )
    }

    /// Flows of the entries created since attach and still live (used once,
    /// right after attach, to keep the seed dump from counting them twice).
    pub fn live_flows(&self) -> std::collections::HashSet<crate::source::records::FlowId> {
        self.live
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(_, ev)| crate::source::records::FlowId::of_tuple(ev.netns, &ev.tuple))
            .collect()
    }

    /// Entries held per creation key, created since attach and not yet
    /// freed (per-CPU +1/-1 summed; only the sum is meaningful).
    pub fn occupancy(&self) -> Result<HashMap<AggKey, i64>, SourceError> {
        Ok(read_all::<AggKey, i64>(&self.occupancy, self.cpus, "OCC")?
            .into_iter()
            .map(|(k, v)| (k, v.iter().sum::<i64>()))
            .filter(|(_, n)| *n != 0)
            .collect())
    }
}

/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> Option<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    Some(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// The per-CPU entry state of the kprobe/kretprobe pairs
/// (`conntrack-ebpf/src/common.rs`): the confirm stack, early_drop's mark,
/// the clash stash.
struct PairState {
    /// `ConfirmFrame`s: tag, skb, ct, entry time (ns).
    frames: PerCpuArray<MapData, [u64; 4]>,
    top: PerCpuArray<MapData, u32>,
    early: PerCpuArray<MapData, u64>,
    args: PerCpuArray<MapData, u64>,
}

/// Missed returns still waiting in the programs' state to be counted.
#[derive(Debug, Default, PartialEq, Eq)]
struct Stale {
    confirm: u64,
    early_drop: u64,
    clash: u64,
}

impl PairState {
    fn take(loaded: &mut Loaded) -> Result<Self, SourceError> {
        Ok(PairState {
            frames: take(loaded, "CONFIRM_FRAMES")?,
            top: take(loaded, "CONFIRM_TOP")?,
            early: take(loaded, "EARLY")?,
            args: take(loaded, "ARGS")?,
        })
    }

    /// The programs count a missed return only when the next call on the
    /// same CPU comes; until then it waits here, older than
    /// `RETURN_STALE_NS`, and is counted by this read instead.
    fn stale(&self, now: u64) -> Result<Stale, aya::maps::MapError> {
        let depths = self.top.get(&0, 0)?;
        let mut frames = Vec::new();
        for i in 0..self.frames.len() {
            frames.push(self.frames.get(&i, 0)?);
        }
        let (early_tag, early_at) = (self.early.get(&0, 0)?, self.early.get(&1, 0)?);
        let (clash_tag, clash_at) = (self.args.get(&3, 0)?, self.args.get(&6, 0)?);
        let mut out = Stale::default();
        for (cpu, depth) in depths.iter().enumerate() {
            let stack: Vec<[u64; 4]> = frames.iter().map(|f| f[cpu]).collect();
            out.confirm += stale_frames(*depth, &stack, now);
            out.early_drop += stale_slot(early_tag[cpu], early_at[cpu], now);
            out.clash += stale_slot(clash_tag[cpu], clash_at[cpu], now);
        }
        Ok(out)
    }
}

/// Frames of one CPU's confirm stack whose return is overdue: the first
/// `depth` frames, bottom up, as long as they are stale (pushes are in time
/// order, so a fresh frame has only fresh ones above it).
fn stale_frames(depth: u32, stack: &[[u64; 4]], now: u64) -> u64 {
    stack
        .iter()
        .take(depth as usize)
        .take_while(|f| now.wrapping_sub(f[3]) > RETURN_STALE_NS)
        .count() as u64
}

/// A one-call slot still held (`tag` non-zero) past a live call's age.
fn stale_slot(tag: u64, since: u64, now: u64) -> u64 {
    u64::from(tag != 0 && now.wrapping_sub(since) > RETURN_STALE_NS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overdue_frames_are_the_stale_bottom_of_the_stack() {
        let s = RETURN_STALE_NS;
        let now = 10 * s;
        let at = |ts: u64| [1, 2, 3, ts];
        // Two orphans under a live call; a stale leftover above `depth`
        // is an old popped frame, not a call.
        let stack = [at(now - 3 * s), at(now - s - 1), at(now - 5), at(1)];
        assert_eq!(stale_frames(3, &stack, now), 2);
        assert_eq!(stale_frames(0, &stack, now), 0);
        // Exactly the threshold old is still a call that may return.
        assert_eq!(stale_frames(1, &[at(now - s)], now), 0);
        // A corrupt depth reads no further than the stack.
        assert_eq!(stale_frames(9, &[at(0), at(0)], now), 2);
        assert_eq!(stale_slot(7, now - s - 1, now), 1);
        assert_eq!(stale_slot(7, now - 5, now), 0);
        assert_eq!(stale_slot(0, 0, now), 0);
    }

    #[test]
    fn per_cpu_values_sum_and_keep_an_origin() {
        let v = |count, sport| AggValue {
            count,
            sport,
            _pad: [0; 6],
        };
        let s = summed(&[v(3, 4000), v(0, 0), v(2, 4001)]);
        assert_eq!((s.count, s.sport), (5, 4001));
        assert_eq!(summed(&[]).count, 0);
    }

    #[test]
    fn stats_grow_since() {
        let mut s1 = KernelStats::default();
        s1.0[0] = 10;
        let mut s2 = s1;
        s2.0[0] = 15;
        assert_eq!(s2.since(&s1).get(0), 5);
    }
}
