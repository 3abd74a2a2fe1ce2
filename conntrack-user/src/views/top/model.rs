//! The model behind `ctwatch top`: per-namespace rates and time to full,
//! and culprit/victim rankings in a switchable dimension.
//!
//! Pure logic: the command feeds it samples (cumulative kernel counters,
//! per-key count deltas, occupancy snapshots) with their timestamps, and the
//! view reads rows back. Nothing here touches the kernel or the terminal.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
};

use crate::{
    aggregate::{
        breakdown::port_label,
        reconcile::NetnsRow,
        sampler::{Count, Sample},
        topk::OTHER,
    },
    names::resolver::Flow,
    views::label::Label,
};

/// Distinct keys remembered per ranking; past it counts go to "other", so a
/// flood from a million sources costs the same as one from a thousand.
pub const KEY_CAP: usize = 8192;
/// Time to full is judged on the count's growth over this many seconds, so
/// one quiet second does not flip it to "∞".
pub const TREND_WINDOW_S: f64 = 5.0;
/// Prefix lengths of the aggregated source dimension.
pub const PREFIX_V4: u8 = 24;
pub const PREFIX_V6: u8 = 64;

/// What culprits and victims are ranked by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    /// The listener (inbound) or sender (local), with its container.
    Process,
    /// Protocol and destination port, `udp/5353`.
    DstPort,
    /// Source address, or its /24 (/64) when aggregated.
    Source,
    Netns,
    /// The pod or container at the flow's origin, else its destination's.
    Pod,
}

/// The current ranking dimension and whether sources are aggregated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub dim: Dimension,
    pub prefix: bool,
}

impl Default for View {
    fn default() -> Self {
        View {
            dim: Dimension::Process,
            prefix: false,
        }
    }
}

/// What a key press asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Quit,
    Redraw,
    Ignore,
}

impl View {
    /// `p` process, `o` proto/port, `s` source, `/` source prefix toggle,
    /// `n` netns, `c` pod or container, `q` quit.
    pub fn on_key(&mut self, c: char) -> Action {
        let dim = match c {
            'q' | 'Q' => return Action::Quit,
            'p' => Dimension::Process,
            'o' => Dimension::DstPort,
            's' => Dimension::Source,
            'n' => Dimension::Netns,
            'c' => Dimension::Pod,
            '/' => {
                // Toggling is only visible on sources: go there too.
                if self.dim == Dimension::Source {
                    self.prefix = !self.prefix;
                } else {
                    self.prefix = true;
                }
                self.dim = Dimension::Source;
                return Action::Redraw;
            }
            _ => return Action::Ignore,
        };
        self.dim = dim;
        Action::Redraw
    }

    pub fn title(&self) -> &'static str {
        match (self.dim, self.prefix) {
            (Dimension::Process, _) => "process/cgroup",
            (Dimension::DstPort, _) => "proto/dst port",
            (Dimension::Source, false) => "source IP",
            (Dimension::Source, true) => "source /24 (/64)",
            (Dimension::Netns, _) => "netns",
            (Dimension::Pod, _) => "pod/container",
        }
    }

    pub fn key_of(&self, k: &Keys) -> String {
        if k.overflow {
            return OTHER.to_string();
        }
        match self.dim {
            Dimension::Process => k.process.clone(),
            Dimension::DstPort => k.dst.clone(),
            Dimension::Source if self.prefix => source_prefix(k.src),
            Dimension::Source => k.src.to_string(),
            Dimension::Netns => k.netns.clone(),
            Dimension::Pod => k.pod.clone(),
        }
    }
}

/// The network a source belongs to: its /24 (IPv4) or /64 (IPv6).
pub fn source_prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            format!("{}.{}.{}.0/{PREFIX_V4}", o[0], o[1], o[2])
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a) & !(u128::MAX >> PREFIX_V6);
            format!("{}/{PREFIX_V6}", std::net::Ipv6Addr::from(bits))
        }
    }
}

/// Where one count belongs in every dimension.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Keys {
    pub process: String,
    pub dst: String,
    pub src: IpAddr,
    pub netns: String,
    pub pod: String,
    /// The catch-all for counts past [`KEY_CAP`].
    pub overflow: bool,
}

impl Keys {
    fn overflow() -> Self {
        Keys {
            process: OTHER.into(),
            dst: OTHER.into(),
            src: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            netns: OTHER.into(),
            pod: OTHER.into(),
            overflow: true,
        }
    }

    /// One flow shape, shown beside a ranked row: `198.18.0.2 → udp/5353`.
    pub fn flow(&self) -> String {
        if self.overflow {
            return OTHER.into();
        }
        format!("{} → {}", self.src, self.dst)
    }
}

/// A per-second rate, or what is known of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    Exact(f64),
    /// Derived from the count's net change: the true rate is at least this.
    AtLeast(f64),
    Unknown,
}

/// `delta` events over `dt` seconds.
pub fn rate(delta: f64, dt: f64) -> Option<f64> {
    (dt > 0.0 && delta.is_finite()).then(|| delta / dt)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TimeToFull {
    Full,
    /// The table is not growing.
    Never,
    /// Seconds until full at the current net rate.
    In(f64),
    Unknown,
}

/// When `count` reaches `max` at a net growth of `per_s`.
pub fn time_to_full(count: u64, max: u64, per_s: Option<f64>) -> TimeToFull {
    if max == 0 {
        return TimeToFull::Unknown;
    }
    if count >= max {
        return TimeToFull::Full;
    }
    match per_s {
        None => TimeToFull::Unknown,
        Some(r) if r.is_nan() || r <= 0.0 => TimeToFull::Never,
        Some(r) => TimeToFull::In((max - count) as f64 / r),
    }
}

impl std::fmt::Display for TimeToFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TimeToFull::Full => f.write_str("full"),
            TimeToFull::Never => f.write_str("∞"),
            TimeToFull::Unknown => f.write_str("-"),
            TimeToFull::In(s) => f.write_str(&fmt_secs(*s)),
        }
    }
}

/// `45s`, `2m10s`, `1h05m`, `3d04h`.
pub fn fmt_secs(s: f64) -> String {
    if !s.is_finite() {
        return "∞".into();
    }
    if s < 1.0 {
        return "<1s".into();
    }
    let s = s.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ if s / 86400 > 999 => ">999d".into(),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// Compact number: `7`, `0.5`, `12`, `1.2k`, `840k`, `3.4M`.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a < 10.0 && v.fract() != 0.0 {
        format!("{v:.1}")
    } else if a < 1000.0 {
        format!("{v:.0}")
    } else if a < 10_000.0 {
        format!("{:.1}k", v / 1e3)
    } else if a < 1e6 {
        format!("{:.0}k", v / 1e3)
    } else if a < 1e7 {
        format!("{:.1}M", v / 1e6)
    } else {
        format!("{:.0}M", v / 1e6)
    }
}

impl From<&NetnsRow> for NsSample {
    fn from(r: &NetnsRow) -> Self {
        let k = r.kernel.as_ref();
        NsSample {
            inum: r.inum,
            label: r.label.clone(),
            count: r.count,
            max: r.max,
            buckets: r.buckets,
            kernel_drops: k.map(|k| k.drop),
            early_drop: k.map(|k| k.early_drop),
            insert_failed: k.map(|k| k.insert_failed),
            created: r.created,
            full_drops: r.drops_seen,
            error: r.error.clone(),
        }
    }
}

/// One namespace's counters at one instant; counters are cumulative.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NsSample {
    pub inum: u32,
    pub label: String,
    pub count: Option<u64>,
    pub max: Option<u64>,
    pub buckets: Option<u64>,
    /// The kernel's conntrack `drop` counter (every conntrack-stage drop).
    pub kernel_drops: Option<u64>,
    pub early_drop: Option<u64>,
    pub insert_failed: Option<u64>,
    /// Entries created, as the kernel probes count them (kernel-probe modes).
    pub created: Option<u64>,
    /// Table-full drops ctwatch attributed to this namespace.
    pub full_drops: u64,
    pub error: Option<String>,
}

/// One row of the namespace table.
#[derive(Debug, Clone, PartialEq)]
pub struct NsRow {
    pub inum: u32,
    pub label: String,
    pub count: Option<u64>,
    pub max: Option<u64>,
    pub buckets: Option<u64>,
    pub fill: Option<f64>,
    pub new_per_s: Rate,
    pub freed_per_s: Rate,
    pub net_per_s: Option<f64>,
    pub to_full: TimeToFull,
    pub kernel_drops_per_s: Option<f64>,
    pub full_drops_per_s: Option<f64>,
    pub error: Option<String>,
}

/// Rates between two samples of one namespace.
fn ns_rates(a: &(f64, NsSample), b: &(f64, NsSample)) -> (Rate, Rate, Option<f64>, Option<f64>) {
    let dt = b.0 - a.0;
    let diff = |f: fn(&NsSample) -> Option<u64>| -> Option<f64> {
        Some(f(&b.1)?.saturating_sub(f(&a.1)?) as f64)
    };
    let net = match (a.1.count, b.1.count) {
        (Some(x), Some(y)) => rate(y as f64 - x as f64, dt),
        _ => None,
    };
    let (new, freed) = match (diff(|s| s.created).and_then(|d| rate(d, dt)), net) {
        // Frees are what creations did not add to the count.
        (Some(c), Some(n)) => (Rate::Exact(c), Rate::Exact((c - n).max(0.0))),
        (Some(c), None) => (Rate::Exact(c), Rate::Unknown),
        // Without creation counts only the net change is known: growth is
        // at least that many creations, shrinkage that many frees.
        (None, Some(n)) => (Rate::AtLeast(n.max(0.0)), Rate::AtLeast((-n).max(0.0))),
        (None, None) => (Rate::Unknown, Rate::Unknown),
    };
    let kdrops = diff(|s| s.kernel_drops).and_then(|d| rate(d, dt));
    (new, freed, kdrops, net)
}

#[derive(Debug, Clone, Default)]
struct Acc {
    total: u64,
    last: u64,
}

/// Cumulative per-key counts with the last interval's deltas, bounded.
#[derive(Debug, Clone)]
struct KeyCounter {
    cap: usize,
    keys: HashMap<Keys, Acc>,
    dt: f64,
}

impl KeyCounter {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            keys: HashMap::new(),
            dt: 0.0,
        }
    }

    fn apply(&mut self, deltas: Vec<(Keys, u64)>, dt: f64) {
        self.dt = dt;
        for a in self.keys.values_mut() {
            a.last = 0;
        }
        for (k, n) in deltas {
            let k = if self.keys.contains_key(&k) || self.keys.len() < self.cap - 1 {
                k
            } else {
                Keys::overflow()
            };
            let a = self.keys.entry(k).or_default();
            a.total += n;
            a.last += n;
        }
    }

    fn rows(&self, view: &View, k: usize) -> Vec<Row> {
        let dt = self.dt;
        group(
            self.keys
                .iter()
                .map(|(key, a)| (key, rate(a.last as f64, dt).unwrap_or(0.0), a.total)),
            view,
            k,
        )
    }
}

/// One ranked row: the key in the current dimension, its rate (per second,
/// where the panel has one), its count, its share of the panel, and the
/// heaviest flow shape behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: String,
    pub rate: f64,
    pub total: u64,
    pub share: f64,
    pub flow: String,
}

/// Groups per-key (rate, count) by the view's key; ranks by rate, then
/// count, then key; keeps `k` rows and sums the rest into [`OTHER`].
pub fn group<'a>(
    items: impl Iterator<Item = (&'a Keys, f64, u64)>,
    view: &View,
    k: usize,
) -> Vec<Row> {
    struct G<'a> {
        rate: f64,
        total: u64,
        best: (f64, u64, &'a Keys),
    }
    let mut groups: HashMap<String, G<'a>> = HashMap::new();
    let (mut sum_rate, mut sum_total) = (0.0, 0u64);
    for (keys, r, n) in items {
        if r <= 0.0 && n == 0 {
            continue;
        }
        sum_rate += r;
        sum_total += n;
        let g = groups.entry(view.key_of(keys)).or_insert(G {
            rate: 0.0,
            total: 0,
            best: (r, n, keys),
        });
        g.rate += r;
        g.total += n;
        if (r, n) > (g.best.0, g.best.1) {
            g.best = (r, n, keys);
        }
    }
    let share = |r: f64, n: u64| {
        if sum_rate > 0.0 {
            r / sum_rate
        } else if sum_total > 0 {
            n as f64 / sum_total as f64
        } else {
            0.0
        }
    };
    let mut rows: Vec<Row> = groups
        .into_iter()
        .map(|(key, g)| Row {
            share: share(g.rate, g.total),
            flow: g.best.2.flow(),
            key,
            rate: g.rate,
            total: g.total,
        })
        .collect();
    rows.sort_by(|a, b| {
        b.rate
            .total_cmp(&a.rate)
            .then(b.total.cmp(&a.total))
            .then_with(|| (a.key == OTHER).cmp(&(b.key == OTHER)))
            .then_with(|| a.key.cmp(&b.key))
    });
    if rows.len() > k {
        let rest = rows.split_off(k);
        let (r, n) = rest
            .iter()
            .fold((0.0, 0u64), |(r, n), x| (r + x.rate, n + x.total));
        // An "other" row that was ranked already is folded in, not repeated.
        if let Some(o) = rows.iter_mut().find(|x| x.key == OTHER) {
            o.rate += r;
            o.total += n;
            o.share = share(o.rate, o.total);
        } else {
            rows.push(Row {
                key: OTHER.into(),
                rate: r,
                total: n,
                share: share(r, n),
                flow: String::new(),
            });
        }
    }
    rows
}

/// Cumulative counters across the namespaces shown, for the footer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Ring-buffer records lost or refused since start.
    pub lost_events: u64,
    /// Entries freed (kernel-probe modes), all namespaces.
    pub freed: Option<u64>,
    /// Returns the kernel's kretprobes missed since start (kprobe mode):
    /// creations, drops or clashes that no count saw.
    pub returns_missed: u64,
    /// Runs of ctwatch's programs the kernel skipped since start.
    pub runs_skipped: u64,
}

/// What the command observed at one instant.
#[derive(Debug, Clone, Default)]
pub struct Tick {
    /// Seconds on a monotonic clock.
    pub t: f64,
    pub namespaces: Vec<NsSample>,
    /// Table-full drops since the previous tick, per key.
    pub drops: Vec<(Keys, u64)>,
    /// Entries created since the previous tick, per key (kernel-probe modes).
    pub created: Vec<(Keys, u64)>,
    pub totals: Totals,
}

/// Occupancy at one instant: entries held per key.
#[derive(Debug, Clone, Default)]
struct Occupancy {
    t: f64,
    items: Vec<(Keys, u64)>,
}

/// How the session runs, for the header and footer.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub mode: String,
    pub kernel: String,
    pub interval_s: f64,
    /// Tracepoint mode: occupancy comes from ctnetlink dumps at most this
    /// often (seconds).
    pub dump_interval_s: Option<f64>,
    /// How far apart the dumps start now: the period above, or more where
    /// the CPU budget spaces a big table's dumps out.
    pub dump_every_s: Option<f64>,
    /// Problems worth a line on screen (a failed dump, a vanished netns).
    pub notes: Vec<String>,
}

/// Everything `ctwatch top` shows.
#[derive(Debug, Clone)]
pub struct Model {
    pub view: View,
    pub status: Status,
    top: usize,
    /// Every namespace in scope, or only busy ones.
    keep_all: bool,
    ns: BTreeMap<u32, VecDeque<(f64, NsSample)>>,
    last_t: Option<f64>,
    drops: KeyCounter,
    created: KeyCounter,
    /// Whether per-key creations are measured (kernel-probe modes).
    sees_entries: bool,
    occ: Option<Occupancy>,
    prev_occ: Option<Occupancy>,
    totals: Vec<(f64, Totals, u64, u64)>,
    /// When the last sample was taken, to tell the time on its clock.
    sampled_at: Option<std::time::Instant>,
}

impl Model {
    pub fn new(top: usize, sees_entries: bool, keep_all: bool) -> Self {
        Self {
            view: View::default(),
            status: Status::default(),
            top: top.max(1),
            keep_all,
            ns: BTreeMap::new(),
            last_t: None,
            drops: KeyCounter::new(KEY_CAP),
            created: KeyCounter::new(KEY_CAP),
            sees_entries,
            occ: None,
            prev_occ: None,
            totals: Vec::new(),
            sampled_at: None,
        }
    }

    /// Seconds on the samples' clock, now.
    pub(crate) fn now(&self) -> f64 {
        self.last_t.unwrap_or(0.0) + self.sampled_at.map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    /// One sample into the model: counters, fresh counts per key and, when
    /// it is newer than the one shown, occupancy.
    pub(crate) fn take(&mut self, s: &Sample) {
        let t = s.elapsed.as_secs_f64();
        let labels: HashMap<u32, &str> =
            s.netns.iter().map(|n| (n.inum, n.label.as_str())).collect();
        let keys = |f: &Flow| Keys {
            process: Label::from(&f.process).live(f.container.as_deref()),
            dst: port_label(f.proto, f.dport),
            src: f.src,
            netns: labels
                .get(&f.netns)
                .map_or_else(|| f.netns.to_string(), |l| l.to_string()),
            pod: f.pod().unwrap_or("(no pod or container)").to_string(),
            overflow: false,
        };
        let fresh = |counts: &[Count]| -> Vec<(Keys, u64)> {
            counts
                .iter()
                .filter(|c| c.fresh > 0)
                .map(|c| (keys(&c.flow), c.fresh))
                .collect()
        };
        let tick = Tick {
            t,
            namespaces: s.netns.iter().map(NsSample::from).collect(),
            drops: fresh(&s.victims),
            created: fresh(&s.created),
            totals: Totals {
                lost_events: s.lost_events,
                freed: s
                    .sees_entries
                    .then(|| s.stats.get(conntrack_ebpf::stat::FREED)),
                returns_missed: s.stats.returns_missed(),
                runs_skipped: s.stats.get(conntrack_ebpf::stat::RUNS_SKIPPED),
            },
        };
        if let Some(o) = &s.held {
            if let Some(every) = o.every {
                self.status.dump_every_s = Some(every.as_secs_f64());
            }
            let at = o.at.as_secs_f64();
            if self.occ.as_ref().is_none_or(|shown| shown.t < at) {
                let mut items: Vec<_> = o.entries.iter().map(|(f, n)| (keys(f), *n)).collect();
                if o.unkeyed > 0 {
                    items.push((Keys::overflow(), o.unkeyed));
                }
                self.set_occupancy(at, items);
            }
        }
        self.status.notes = s.problems.clone();
        self.push(tick);
        self.sampled_at = Some(std::time::Instant::now());
    }

    pub fn sees_entries(&self) -> bool {
        self.sees_entries
    }

    /// Rows a ranked panel can hold: the top keys and one "other".
    pub fn top_rows(&self) -> usize {
        self.top + 1
    }

    pub fn push(&mut self, tick: Tick) {
        let dt = self.last_t.map(|l| tick.t - l).unwrap_or(0.0);
        self.last_t = Some(tick.t);
        self.drops.apply(tick.drops, dt);
        self.created.apply(tick.created, dt);
        // A namespace missing from the tick has vanished (or left scope).
        self.ns
            .retain(|inum, _| tick.namespaces.iter().any(|s| s.inum == *inum));
        let (mut early, mut clash) = (0u64, 0u64);
        for s in tick.namespaces {
            early += s.early_drop.unwrap_or(0);
            clash += s.insert_failed.unwrap_or(0);
            let h = self.ns.entry(s.inum).or_default();
            h.push_back((tick.t, s));
            // Keep one sample older than the window as its baseline.
            while h.len() > 2 && h.get(1).is_some_and(|(t, _)| tick.t - t >= TREND_WINDOW_S) {
                h.pop_front();
            }
        }
        self.totals.push((tick.t, tick.totals, early, clash));
        if self.totals.len() > 2 {
            self.totals.remove(0);
        }
    }

    /// A new occupancy snapshot; the previous one is kept to measure growth.
    pub fn set_occupancy(&mut self, t: f64, items: Vec<(Keys, u64)>) {
        self.prev_occ = self.occ.take();
        self.occ = Some(Occupancy { t, items });
    }

    /// Seconds since the occupancy was last refreshed, as of `now`.
    pub fn occupancy_age(&self, now: f64) -> Option<f64> {
        self.occ.as_ref().map(|o| (now - o.t).max(0.0))
    }

    pub fn ns_rows(&self) -> Vec<NsRow> {
        let mut rows: Vec<NsRow> = self
            .ns
            .values()
            .filter_map(|h| {
                let last = h.back()?;
                let s = &last.1;
                let (new, freed, kdrops, _) = match h.len() {
                    n if n >= 2 => ns_rates(&h[n - 2], last),
                    _ => (Rate::Unknown, Rate::Unknown, None, None),
                };
                let full_drops = (h.len() >= 2)
                    .then(|| {
                        let a = &h[h.len() - 2];
                        rate(
                            s.full_drops.saturating_sub(a.1.full_drops) as f64,
                            last.0 - a.0,
                        )
                    })
                    .flatten();
                let trend = (h.len() >= 2)
                    .then(|| {
                        let a = &h[0];
                        rate(s.count? as f64 - a.1.count? as f64, last.0 - a.0)
                    })
                    .flatten();
                let fill = match (s.count, s.max) {
                    (Some(c), Some(m)) if m > 0 => Some(c as f64 / m as f64),
                    _ => None,
                };
                let to_full = match (s.count, s.max) {
                    (Some(c), Some(m)) => time_to_full(c, m, trend),
                    _ => TimeToFull::Unknown,
                };
                Some(NsRow {
                    inum: s.inum,
                    label: s.label.clone(),
                    count: s.count,
                    max: s.max,
                    buckets: s.buckets,
                    fill,
                    new_per_s: new,
                    freed_per_s: freed,
                    net_per_s: trend,
                    to_full,
                    kernel_drops_per_s: kdrops,
                    full_drops_per_s: full_drops,
                    error: s.error.clone(),
                })
            })
            .filter(|r| {
                self.keep_all
                    || r.count.unwrap_or(0) > 0
                    || r.kernel_drops_per_s.unwrap_or(0.0) > 0.0
                    || r.full_drops_per_s.unwrap_or(0.0) > 0.0
            })
            .collect();
        rows.sort_by(|a, b| {
            b.fill
                .unwrap_or(0.0)
                .total_cmp(&a.fill.unwrap_or(0.0))
                .then(b.count.cmp(&a.count))
                .then(a.inum.cmp(&b.inum))
        });
        rows
    }

    /// Victims: table-full drops per key, busiest now first, then by total.
    pub fn victims(&self) -> Vec<Row> {
        self.drops.rows(&self.view, self.top)
    }

    /// Culprits by entries held.
    pub fn occupancy_rows(&self) -> Vec<Row> {
        let Some(o) = &self.occ else {
            return Vec::new();
        };
        group(
            o.items.iter().map(|(k, n)| (k, 0.0, *n)),
            &self.view,
            self.top,
        )
    }

    /// Culprits by creation rate: measured in kernel-probe modes; elsewhere
    /// the growth between the last two occupancy snapshots (a lower bound:
    /// entries created and freed in between are not seen).
    pub fn creation_rows(&self) -> Vec<Row> {
        if self.sees_entries {
            return self.created.rows(&self.view, self.top);
        }
        let (Some(now), Some(prev)) = (&self.occ, &self.prev_occ) else {
            return Vec::new();
        };
        let dt = now.t - prev.t;
        if dt <= 0.0 {
            return Vec::new();
        }
        let mut before: HashMap<String, u64> = HashMap::new();
        for (k, n) in &prev.items {
            *before.entry(self.view.key_of(k)).or_default() += n;
        }
        let mut after: HashMap<String, (u64, &Keys, u64)> = HashMap::new();
        for (k, n) in &now.items {
            let e = after.entry(self.view.key_of(k)).or_insert((0, k, 0));
            e.0 += n;
            if *n > e.2 {
                e.1 = k;
                e.2 = *n;
            }
        }
        // Growth is judged per row of the current dimension, so one key
        // shrinking does not hide another growing in the same row.
        let grown: Vec<(Keys, f64, u64)> = after
            .into_iter()
            .filter_map(|(key, (n, k, _))| {
                let g = n.saturating_sub(before.get(&key).copied().unwrap_or(0));
                (g > 0).then(|| (k.clone(), g as f64 / dt, g))
            })
            .collect();
        group(
            grown.iter().map(|(k, r, n)| (k, *r, *n)),
            &self.view,
            self.top,
        )
    }

    /// Footer counters: (cumulative, per second) for evictions and clashes
    /// (the kernel's early_drop and insert_failed), freed entries, and lost
    /// events since start.
    pub fn footer(&self) -> Footer {
        let last = self.totals.last();
        let per_s = |f: fn(&(f64, Totals, u64, u64)) -> Option<u64>| -> Option<f64> {
            let (a, b) = (self.totals.first()?, self.totals.last()?);
            rate(f(b)?.saturating_sub(f(a)?) as f64, b.0 - a.0)
        };
        Footer {
            evictions: last.map(|l| l.2).unwrap_or(0),
            evictions_per_s: per_s(|x| Some(x.2)),
            clashes: last.map(|l| l.3).unwrap_or(0),
            clashes_per_s: per_s(|x| Some(x.3)),
            freed_per_s: per_s(|x| x.1.freed),
            lost_events: last.map(|l| l.1.lost_events).unwrap_or(0),
            returns_missed: last.map(|l| l.1.returns_missed).unwrap_or(0),
            runs_skipped: last.map(|l| l.1.runs_skipped).unwrap_or(0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Footer {
    pub evictions: u64,
    pub evictions_per_s: Option<f64>,
    pub clashes: u64,
    pub clashes_per_s: Option<f64>,
    pub freed_per_s: Option<f64>,
    pub lost_events: u64,
    pub returns_missed: u64,
    pub runs_skipped: u64,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn keys(process: &str, dst: &str, src: &str, netns: &str) -> Keys {
        Keys {
            process: process.into(),
            dst: dst.into(),
            src: src.parse().unwrap(),
            netns: netns.into(),
            pod: "(no pod or container)".into(),
            overflow: false,
        }
    }

    pub(crate) fn ns(inum: u32, count: u64, max: u64) -> NsSample {
        NsSample {
            inum,
            label: format!("ns{inum}"),
            count: Some(count),
            max: Some(max),
            buckets: Some(1024),
            kernel_drops: Some(0),
            ..Default::default()
        }
    }

    #[test]
    fn time_to_full_growing_shrinking_full_and_zero() {
        assert_eq!(time_to_full(900, 1000, Some(10.0)), TimeToFull::In(10.0));
        assert_eq!(time_to_full(900, 1000, Some(-5.0)), TimeToFull::Never);
        assert_eq!(time_to_full(900, 1000, Some(0.0)), TimeToFull::Never);
        assert_eq!(time_to_full(1000, 1000, Some(-5.0)), TimeToFull::Full);
        assert_eq!(time_to_full(1200, 1000, None), TimeToFull::Full);
        assert_eq!(time_to_full(0, 1000, Some(0.0)), TimeToFull::Never);
        assert_eq!(time_to_full(0, 0, Some(1.0)), TimeToFull::Unknown);
        assert_eq!(time_to_full(10, 1000, None), TimeToFull::Unknown);
        assert_eq!(time_to_full(10, 1000, Some(f64::NAN)), TimeToFull::Never);
        assert_eq!(TimeToFull::In(130.0).to_string(), "2m10s");
        assert_eq!(TimeToFull::Never.to_string(), "∞");
        assert_eq!(TimeToFull::Full.to_string(), "full");
    }

    #[test]
    fn durations_and_numbers_format_compactly() {
        assert_eq!(fmt_secs(0.2), "<1s");
        assert_eq!(fmt_secs(45.4), "45s");
        assert_eq!(fmt_secs(130.0), "2m10s");
        assert_eq!(fmt_secs(3900.0), "1h05m");
        assert_eq!(fmt_secs(3.0 * 86400.0 + 4.0 * 3600.0), "3d04h");
        assert_eq!(fmt_secs(1e12), ">999d");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(0.5), "0.5");
        assert_eq!(fmt_num(7.0), "7");
        assert_eq!(fmt_num(999.0), "999");
        assert_eq!(fmt_num(1234.0), "1.2k");
        assert_eq!(fmt_num(840_000.0), "840k");
        assert_eq!(fmt_num(3_400_000.0), "3.4M");
    }

    #[test]
    fn rates_need_elapsed_time() {
        assert_eq!(rate(10.0, 2.0), Some(5.0));
        assert_eq!(rate(10.0, 0.0), None);
        assert_eq!(rate(10.0, -1.0), None);
    }

    #[test]
    fn namespace_rates_from_two_samples() {
        let mut m = Model::new(5, true, false);
        let mut a = ns(7, 100, 1000);
        a.created = Some(50);
        a.kernel_drops = Some(3);
        a.full_drops = 1;
        m.push(Tick {
            t: 10.0,
            namespaces: vec![a.clone()],
            ..Default::default()
        });
        let r = &m.ns_rows()[0];
        assert_eq!(
            (r.new_per_s, r.to_full),
            (Rate::Unknown, TimeToFull::Unknown)
        );
        let mut b = a.clone();
        b.count = Some(300); // +200 in 2 s
        b.created = Some(550); // +500: 300 were freed
        b.kernel_drops = Some(13);
        b.full_drops = 9;
        m.push(Tick {
            t: 12.0,
            namespaces: vec![b],
            ..Default::default()
        });
        let r = &m.ns_rows()[0];
        assert_eq!(r.new_per_s, Rate::Exact(250.0));
        assert_eq!(r.freed_per_s, Rate::Exact(150.0));
        assert_eq!(r.net_per_s, Some(100.0));
        assert_eq!(r.to_full, TimeToFull::In(7.0));
        assert_eq!(r.kernel_drops_per_s, Some(5.0));
        assert_eq!(r.full_drops_per_s, Some(4.0));
        assert_eq!(r.fill, Some(0.3));
    }

    #[test]
    fn without_creation_counts_rates_are_lower_bounds() {
        let mut m = Model::new(5, false, false);
        for (t, c) in [(0.0, 500), (1.0, 400)] {
            m.push(Tick {
                t,
                namespaces: vec![ns(1, c, 1000)],
                ..Default::default()
            });
        }
        let r = &m.ns_rows()[0];
        assert_eq!(r.new_per_s, Rate::AtLeast(0.0));
        assert_eq!(r.freed_per_s, Rate::AtLeast(100.0));
        assert_eq!(r.to_full, TimeToFull::Never, "shrinking");
        m.push(Tick {
            t: 2.0,
            namespaces: vec![ns(1, 1000, 1000)],
            ..Default::default()
        });
        assert_eq!(m.ns_rows()[0].to_full, TimeToFull::Full);
    }

    #[test]
    fn trend_spans_the_window_not_one_second() {
        let mut m = Model::new(5, false, false);
        // +100/s for 4 s, then one flat second: still filling.
        for (t, c) in [
            (0.0, 0),
            (1.0, 100),
            (2.0, 200),
            (3.0, 300),
            (4.0, 400),
            (5.0, 400),
        ] {
            m.push(Tick {
                t,
                namespaces: vec![ns(1, c, 1000)],
                ..Default::default()
            });
        }
        let r = &m.ns_rows()[0];
        assert_eq!(r.net_per_s, Some(80.0));
        assert_eq!(r.to_full, TimeToFull::In(7.5));
        // Long after, only the window counts and it is flat.
        for t in 6..20 {
            m.push(Tick {
                t: t as f64,
                namespaces: vec![ns(1, 400, 1000)],
                ..Default::default()
            });
        }
        assert_eq!(m.ns_rows()[0].to_full, TimeToFull::Never);
        assert!(m.ns.values().all(|h| h.len() <= 7), "history is bounded");
    }

    #[test]
    fn idle_namespaces_hidden_unless_asked_and_vanished_ones_dropped() {
        let mut m = Model::new(5, false, false);
        m.push(Tick {
            t: 0.0,
            namespaces: vec![ns(1, 0, 1000), ns(2, 10, 100)],
            ..Default::default()
        });
        let rows = m.ns_rows();
        assert_eq!(rows.iter().map(|r| r.inum).collect::<Vec<_>>(), vec![2]);
        let mut all = Model::new(5, false, true);
        all.push(Tick {
            t: 0.0,
            namespaces: vec![ns(1, 0, 1000), ns(2, 10, 100)],
            ..Default::default()
        });
        // Fullest first.
        assert_eq!(
            all.ns_rows().iter().map(|r| r.inum).collect::<Vec<_>>(),
            vec![2, 1]
        );
        all.push(Tick {
            t: 1.0,
            namespaces: vec![ns(1, 0, 1000)],
            ..Default::default()
        });
        assert_eq!(all.ns_rows().len(), 1);
    }

    #[test]
    fn source_prefixes() {
        assert_eq!(
            source_prefix("198.18.7.200".parse().unwrap()),
            "198.18.7.0/24"
        );
        assert_eq!(
            source_prefix("2001:2::1:2:3:4".parse().unwrap()),
            "2001:2::/64"
        );
        assert_eq!(
            source_prefix("2001:db8:1:2:aaaa::1".parse().unwrap()),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn prefix_aggregation_merges_a_subnet() {
        let a = keys("x", "udp/53", "198.18.1.1", "n");
        let b = keys("x", "udp/53", "198.18.1.2", "n");
        let c = keys("x", "udp/53", "198.18.2.1", "n");
        let v6a = keys("x", "udp/53", "2001:2::1", "n");
        let v6b = keys("x", "udp/53", "2001:2::ffff:1", "n");
        let items = [
            (&a, 1.0, 10),
            (&b, 2.0, 20),
            (&c, 1.0, 5),
            (&v6a, 0.0, 1),
            (&v6b, 0.0, 1),
        ];
        let mut v = View::default();
        v.on_key('s');
        assert_eq!(group(items.iter().copied(), &v, 10).len(), 5);
        v.on_key('/');
        let rows = group(items.iter().copied(), &v, 10);
        let keys: Vec<_> = rows.iter().map(|r| (r.key.as_str(), r.total)).collect();
        assert_eq!(
            keys,
            vec![
                ("198.18.1.0/24", 30),
                ("198.18.2.0/24", 5),
                ("2001:2::/64", 2)
            ]
        );
        assert_eq!(rows[0].flow, "198.18.1.2 → udp/53", "heaviest member");
        v.on_key('/');
        assert!(!v.prefix);
    }

    #[test]
    fn dimension_switching() {
        let k = keys("ctpeer[9] listener", "udp/5353", "198.18.0.2", "lab");
        let mut v = View::default();
        assert_eq!(v.key_of(&k), "ctpeer[9] listener");
        assert_eq!(v.on_key('o'), Action::Redraw);
        assert_eq!(v.key_of(&k), "udp/5353");
        v.on_key('s');
        assert_eq!(v.key_of(&k), "198.18.0.2");
        v.on_key('n');
        assert_eq!(v.key_of(&k), "lab");
        // '/' from another dimension goes to aggregated sources.
        v.on_key('/');
        assert_eq!(
            (v.dim, v.key_of(&k).as_str()),
            (Dimension::Source, "198.18.0.0/24")
        );
        v.on_key('p');
        assert_eq!(v.key_of(&k), "ctpeer[9] listener");
        assert_eq!(v.on_key('x'), Action::Ignore);
        assert_eq!(v.on_key('q'), Action::Quit);
        assert_eq!(v.key_of(&Keys::overflow()), OTHER);
    }

    #[test]
    fn top_k_bounds_and_other_row() {
        let ks: Vec<Keys> = (0..50)
            .map(|i| keys("p", &format!("tcp/{i}"), "198.18.0.2", "n"))
            .collect();
        let mut v = View::default();
        v.on_key('o');
        let rows = group(ks.iter().enumerate().map(|(i, k)| (k, i as f64, 1)), &v, 5);
        assert_eq!(rows.len(), 6, "k rows and one other");
        assert_eq!(rows[0].key, "tcp/49");
        let other = rows.last().unwrap();
        assert_eq!(other.key, OTHER);
        assert_eq!(other.total, 45);
        assert_eq!(other.rate, (0..45).sum::<i32>() as f64);
        let share: f64 = rows.iter().map(|r| r.share).sum();
        assert!((share - 1.0).abs() < 1e-9);
        // Exactly k keys: no other row.
        assert_eq!(
            group(ks.iter().take(5).map(|k| (k, 1.0, 1)), &v, 5).len(),
            5
        );
        // Zero rows are left out.
        assert!(group(ks.iter().map(|k| (k, 0.0, 0)), &v, 5).is_empty());
    }

    #[test]
    fn key_budget_bounds_memory_and_keeps_totals() {
        let mut c = KeyCounter::new(100);
        let deltas: Vec<(Keys, u64)> = (0..10_000u32)
            .map(|i| {
                (
                    keys("p", "udp/1", &format!("10.0.{}.{}", i >> 8, i & 255), "n"),
                    1,
                )
            })
            .collect();
        c.apply(deltas, 1.0);
        assert!(c.keys.len() <= 100);
        let v = View {
            dim: Dimension::Source,
            prefix: false,
        };
        let rows = c.rows(&v, 10);
        assert_eq!(rows.iter().map(|r| r.total).sum::<u64>(), 10_000);
        assert!(rows.len() <= 11);
    }

    #[test]
    fn victims_rank_by_rate_then_total_and_keep_history() {
        let mut m = Model::new(3, false, false);
        let a = keys("a", "udp/1", "198.18.0.2", "n");
        let b = keys("b", "udp/2", "198.18.0.3", "n");
        m.push(Tick {
            t: 0.0,
            ..Default::default()
        });
        m.push(Tick {
            t: 1.0,
            drops: vec![(a.clone(), 100)],
            ..Default::default()
        });
        m.push(Tick {
            t: 2.0,
            drops: vec![(b.clone(), 5)],
            ..Default::default()
        });
        let v = m.victims();
        assert_eq!(v[0].key, "b", "dropping now ranks first");
        assert_eq!((v[0].rate, v[0].total), (5.0, 5));
        assert_eq!((v[1].key.as_str(), v[1].rate, v[1].total), ("a", 0.0, 100));
    }

    #[test]
    fn occupancy_and_growth_between_snapshots() {
        let mut m = Model::new(5, false, false);
        let a = keys("a", "tcp/80", "198.18.0.2", "n");
        let b = keys("b", "udp/53", "198.18.0.3", "n");
        m.set_occupancy(0.0, vec![(a.clone(), 10), (b.clone(), 5)]);
        assert!(m.creation_rows().is_empty(), "one snapshot has no growth");
        m.set_occupancy(5.0, vec![(a.clone(), 60), (b.clone(), 2)]);
        let occ = m.occupancy_rows();
        assert_eq!((occ[0].key.as_str(), occ[0].total), ("a", 60));
        let grown = m.creation_rows();
        assert_eq!(grown.len(), 1);
        assert_eq!(
            (grown[0].key.as_str(), grown[0].rate, grown[0].total),
            ("a", 10.0, 50)
        );
        assert_eq!(m.occupancy_age(7.0), Some(2.0));
    }

    #[test]
    fn footer_counts_and_rates() {
        let mut m = Model::new(5, true, false);
        let mut s = ns(1, 10, 100);
        s.early_drop = Some(4);
        s.insert_failed = Some(1);
        m.push(Tick {
            t: 0.0,
            namespaces: vec![s.clone()],
            totals: Totals {
                lost_events: 0,
                freed: Some(100),
                returns_missed: 0,
                runs_skipped: 0,
            },
            ..Default::default()
        });
        s.early_drop = Some(10);
        m.push(Tick {
            t: 2.0,
            namespaces: vec![s],
            totals: Totals {
                lost_events: 3,
                freed: Some(140),
                returns_missed: 2,
                runs_skipped: 1,
            },
            ..Default::default()
        });
        let f = m.footer();
        assert_eq!((f.evictions, f.evictions_per_s), (10, Some(3.0)));
        assert_eq!((f.clashes, f.clashes_per_s), (1, Some(0.0)));
        assert_eq!(f.freed_per_s, Some(20.0));
        assert_eq!(f.lost_events, 3);
        assert_eq!(f.returns_missed, 2);
        assert_eq!(f.runs_skipped, 1);
    }
}
