//! Reads what the kernel programs produce: the `EVENTS` ring buffer, the
//! per-CPU `STATS` counters and the per-CPU `DROPS` aggregation map.
use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use conntrack_ebpf::{stat, AggKey, FlowEvent};
use tokio::io::unix::AsyncFd;

use crate::{kernel::loader::Loaded, source::records as event};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("eBPF map {0} missing from the object: rebuild with `cargo xtask build`")]
    MissingMap(&'static str),
    #[error("eBPF map {name}: {detail}")]
    Map { name: &'static str, detail: String },
    #[error("waiting on the ring buffer failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Kernel counters summed over CPUs, indexed by `conntrack_ebpf::stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelStats(pub [u64; stat::COUNT as usize]);

impl KernelStats {
    pub fn get(&self, idx: u32) -> u64 {
        self.0[idx as usize]
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
    counts: PerCpuHashMap<MapData, AggKey, u64>,
    occupancy: PerCpuHashMap<MapData, AggKey, i64>,
    live: BpfHashMap<MapData, u64, FlowEvent>,
    /// Records the decoder refused (size or content): counted as lost.
    pub malformed: u64,
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
            counts: take(loaded, "COUNTS")?,
            occupancy: take(loaded, "OCC")?,
            live: take(loaded, "LIVE")?,
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
        for (i, o) in out.iter_mut().enumerate() {
            let v = self
                .stats
                .get(&(i as u32), 0)
                .map_err(|e| SourceError::Map {
                    name: "STATS",
                    detail: e.to_string(),
                })?;
            *o = v.iter().sum();
        }
        Ok(KernelStats(out))
    }

    /// Every aggregation key (drops, new entries, evictions, clashes) with
    /// its count summed over CPUs. Keys are never deleted while running
    /// (that would race with the kernel's increments); callers take
    /// differences between two reads.
    pub fn counts(&self) -> Result<HashMap<AggKey, u64>, SourceError> {
        let mut out = HashMap::new();
        for item in self.counts.iter() {
            let (k, v) = item.map_err(|e| SourceError::Map {
                name: "COUNTS",
                detail: e.to_string(),
            })?;
            out.insert(k, v.iter().sum());
        }
        Ok(out)
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
        let mut out = HashMap::new();
        for item in self.occupancy.iter() {
            let (k, v) = item.map_err(|e| SourceError::Map {
                name: "OCC",
                detail: e.to_string(),
            })?;
            let n: i64 = v.iter().sum();
            if n != 0 {
                out.insert(k, n);
            }
        }
        Ok(out)
    }
}

/// Counts in `now` minus counts in `before`, dropping keys that did not grow.
pub fn counts_since(
    now: &HashMap<AggKey, u64>,
    before: &HashMap<AggKey, u64>,
) -> HashMap<AggKey, u64> {
    now.iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then_some((*k, d))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_ignore_keys_that_did_not_grow() {
        let a = AggKey {
            netns: 1,
            ..Default::default()
        };
        let b = AggKey {
            netns: 2,
            ..Default::default()
        };
        let before = HashMap::from([(a, 5u64), (b, 3)]);
        let now = HashMap::from([(a, 9u64), (b, 3)]);
        let d = counts_since(&now, &before);
        assert_eq!(d, HashMap::from([(a, 4u64)]));
        let mut s1 = KernelStats::default();
        s1.0[0] = 10;
        let mut s2 = s1;
        s2.0[0] = 15;
        assert_eq!(s2.since(&s1).get(0), 5);
    }
}
