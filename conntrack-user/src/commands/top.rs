//! `ctwatch top`: a live, full-screen view of fill, culprits and victims per
//! namespace, refreshed every `--interval` seconds; `q` quits.
//!
//! Everything slow (per-namespace counter reads, ctnetlink dumps) runs on
//! blocking threads whose results are picked up by the same select loop
//! that reads keys, so the screen never freezes behind a big table.
use std::{
    collections::{HashMap, HashSet},
    io::{IsTerminal, Stdout},
    sync::{
        atomic::{AtomicBool, Ordering},
        Once,
    },
    time::{Duration, Instant},
};

use conntrack_ebpf::{stat, AggKey};
use ratatui::{
    backend::CrosstermBackend,
    crossterm::{
        cursor,
        event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
        execute,
        terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
    },
    Terminal,
};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    cgroups::Cgroups,
    cli::{Settings, TopArgs},
    error::Error,
    event::{self as ev, AggRecord, Kind},
    live::{self, Action, Keys, Model, NsSample, Tick, Totals},
    netns::NetnsInfo,
    occupancy::{FlowId, Held, Seed},
    reconcile::{self, NetnsSnapshot},
    source::counts_since,
    views,
    watch::Watch,
};

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("`ctwatch top` needs a terminal and stdout is not one: use `ctwatch report --json` or `ctwatch drops` for pipes and files")]
    NotATerminal,
    #[error("cannot drive the terminal: {0}; check that TERM names a terminal that supports the alternate screen")]
    Terminal(#[source] std::io::Error),
    #[error("a background read for `ctwatch top` failed: {0}; run it again")]
    Task(String),
}

/// Cached `Keys` per decoded record; emptied this often so container and
/// namespace names that appear later are picked up.
const KEYS_TTL: Duration = Duration::from_secs(30);
const KEYS_CAP: usize = 65_536;

/// Whether the terminal is in raw mode on the alternate screen: the panic
/// hook and the guard restore it exactly once.
static ACTIVE: AtomicBool = AtomicBool::new(false);
static HOOK: Once = Once::new();

fn restore_terminal() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(std::io::stdout(), LeaveAlternateScreen, cursor::Show);
    }
}

/// Raw mode and the alternate screen for as long as it lives; restored on
/// drop (normal exit, error) and by a panic hook (panic).
struct Screen {
    term: Terminal<CrosstermBackend<Stdout>>,
}

impl Screen {
    fn enter() -> Result<Self, TopError> {
        HOOK.call_once(|| {
            let prev = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                // Restore first, or the message lands on the alternate screen.
                restore_terminal();
                prev(info);
            }));
        });
        terminal::enable_raw_mode().map_err(TopError::Terminal)?;
        ACTIVE.store(true, Ordering::SeqCst);
        let setup = execute!(std::io::stdout(), EnterAlternateScreen, cursor::Hide)
            .and_then(|_| Terminal::new(CrosstermBackend::new(std::io::stdout())));
        match setup {
            Ok(term) => Ok(Screen { term }),
            Err(e) => {
                restore_terminal();
                Err(TopError::Terminal(e))
            }
        }
    }

    fn draw(&mut self, m: &Model, now: f64) -> Result<(), TopError> {
        self.term
            .draw(|f| views::top::draw(f, m, now))
            .map(|_| ())
            .map_err(TopError::Terminal)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore_terminal();
    }
}

enum Input {
    Key(char),
    Resize,
    Failed(std::io::Error),
}

/// Reads terminal events on a plain thread (crossterm's reader blocks) and
/// forwards what matters; ends when the receiver is gone.
fn spawn_keys(tx: mpsc::UnboundedSender<Input>) -> Result<(), TopError> {
    std::thread::Builder::new()
        .name("ctwatch-keys".into())
        .spawn(move || {
            while !tx.is_closed() {
                let input = match event::poll(Duration::from_millis(200)) {
                    Ok(false) => continue,
                    Ok(true) => match event::read() {
                        Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => match k.code {
                            // Raw mode turns Ctrl-C into a key, not a signal.
                            KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                                Input::Key('q')
                            }
                            KeyCode::Char(c) => Input::Key(c),
                            KeyCode::Esc => Input::Key('q'),
                            _ => continue,
                        },
                        Ok(Event::Resize(..)) => Input::Resize,
                        Ok(_) => continue,
                        Err(e) => Input::Failed(e),
                    },
                    Err(e) => Input::Failed(e),
                };
                let failed = matches!(input, Input::Failed(_));
                if tx.send(input).is_err() || failed {
                    break;
                }
            }
        })
        .map(|_| ())
        .map_err(|e| TopError::Task(format!("cannot start the key reader: {e}")))
}

/// Awaits a background task if there is one; pending forever otherwise.
async fn finished<T>(task: &mut Option<JoinHandle<T>>) -> Result<T, TopError> {
    match task {
        Some(h) => {
            let r = h.await;
            *task = None;
            r.map_err(|e| TopError::Task(e.to_string()))
        }
        None => std::future::pending().await,
    }
}

/// The namespaces in scope and their counters, read on a blocking thread.
type Snapshot = (Vec<NetnsInfo>, HashMap<u32, NetnsSnapshot>, Option<String>);

/// Occupancy per netns from one dump each, folded into counts per key on
/// the blocking thread as the datagrams arrive: whole dumps never exist.
type Dumped = (Seed, Vec<String>);

fn dump_seed(nss: &[NetnsInfo], exclude: &HashSet<FlowId>) -> Dumped {
    let mut notes = Vec::new();
    let seed = Seed::count(nss, exclude, &mut notes);
    (seed, notes)
}

struct Session {
    kernel_entries: bool,
    prev_counts: HashMap<AggKey, u64>,
    /// Kernel-probe modes: entries held (seed at start plus the kernel's).
    held: Option<Held>,
    created: HashMap<u32, u64>,
    full_drops: HashMap<u32, u64>,
    ns_labels: HashMap<u32, String>,
    namespaces: Vec<NetnsInfo>,
    cgroups: Cgroups,
    keys: HashMap<AggRecord, Keys>,
    keys_at: Instant,
    t0: Instant,
    /// Problems of the latest namespace read and dump, shown in the footer
    /// until the next read or dump says otherwise.
    snap_notes: Vec<String>,
    dump_notes: Vec<String>,
}

impl Session {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn show_notes(&self, m: &mut Model) {
        m.status.notes = self
            .snap_notes
            .iter()
            .chain(&self.dump_notes)
            .cloned()
            .collect();
    }

    fn ns_label(&self, inum: u32) -> String {
        self.ns_labels
            .get(&inum)
            .cloned()
            .unwrap_or_else(|| inum.to_string())
    }

    /// `ip netns` name, else the inode; with the container of a process in
    /// it where the namespace is known through a process.
    fn label_ns(&mut self, ns: &NetnsInfo) -> String {
        if let Some(n) = &ns.name {
            return n.clone();
        }
        let pid = ns
            .path
            .strip_prefix("/proc")
            .ok()
            .and_then(|p| p.iter().next())
            .and_then(|p| p.to_str()?.parse::<u32>().ok());
        match pid.and_then(|p| self.cgroups.label_of_pid(p)) {
            Some(c) => format!("{} · {c}", ns.inum),
            None => ns.inum.to_string(),
        }
    }

    fn keys_of(&mut self, w: &mut Watch, rec: &AggRecord) -> Keys {
        if self.keys_at.elapsed() >= KEYS_TTL || self.keys.len() >= KEYS_CAP {
            self.keys.clear();
            self.keys_at = Instant::now();
        }
        // The kind does not change the keys: share one entry.
        let mut probe = rec.clone();
        probe.kind = Kind::New;
        if let Some(k) = self.keys.get(&probe) {
            return k.clone();
        }
        let row = w.process_row(rec);
        let container = (rec.cgroup_id != 0)
            .then(|| self.cgroups.label_of_id(rec.cgroup_id))
            .flatten()
            .or_else(|| row.pid.and_then(|p| self.cgroups.label_of_pid(p)));
        let k = Keys {
            process: live::process_label(&row.key, row.pid, row.role, container.as_deref()),
            dst: format!("{}/{}", ev::proto_name(rec.proto), rec.dport),
            src: rec.src,
            netns: self.ns_label(rec.netns),
            overflow: false,
        };
        self.keys.insert(probe, k.clone());
        k
    }

    fn occupancy_keys(
        &mut self,
        w: &mut Watch,
        records: Vec<(AggRecord, u64)>,
    ) -> Vec<(Keys, u64)> {
        let mut out = Vec::with_capacity(records.len());
        for (r, n) in records {
            if w.scope.contains(r.netns) {
                out.push((self.keys_of(w, &r), n));
            }
        }
        out
    }

    /// Turns fresh namespace counters and the kernel maps into one tick.
    fn sample(&mut self, w: &mut Watch, m: &mut Model, snap: Snapshot) -> Result<(), Error> {
        let (nss, counters, error) = snap;
        self.snap_notes = error.into_iter().collect();
        for ns in &nss {
            let l = self.label_ns(ns);
            self.ns_labels.insert(ns.inum, l);
        }
        self.namespaces = nss;
        let stats = w.source.stats()?;
        let counts = w.source.counts()?;
        let deltas = counts_since(&counts, &self.prev_counts);
        self.prev_counts = counts;
        let (mut drops, mut created) = (Vec::new(), Vec::new());
        for (key, n) in deltas {
            let Ok(rec) = ev::decode_key(&key) else {
                continue;
            };
            if !w.scope.contains(rec.netns) {
                continue;
            }
            match rec.kind {
                Kind::Drop => {
                    *self.full_drops.entry(rec.netns).or_default() += n;
                    drops.push((self.keys_of(w, &rec), n));
                }
                Kind::New => {
                    *self.created.entry(rec.netns).or_default() += n;
                    created.push((self.keys_of(w, &rec), n));
                }
                Kind::SeedFree | Kind::Evict | Kind::Clash => {}
            }
        }
        let namespaces = self
            .namespaces
            .iter()
            .map(|ns| {
                let s = counters.get(&ns.inum);
                let sysctl = s.and_then(|s| s.sysctl.as_ref());
                let st = s.and_then(|s| s.stats.as_ref()).map(|x| &x.0);
                NsSample {
                    inum: ns.inum,
                    label: self.ns_label(ns.inum),
                    count: sysctl.map(|x| x.count),
                    max: sysctl.map(|x| x.max),
                    buckets: sysctl.map(|x| x.buckets),
                    kernel_drops: st.map(|x| x.drop),
                    early_drop: st.map(|x| x.early_drop),
                    insert_failed: st.map(|x| x.insert_failed),
                    created: self
                        .kernel_entries
                        .then(|| self.created.get(&ns.inum).copied().unwrap_or(0)),
                    full_drops: self.full_drops.get(&ns.inum).copied().unwrap_or(0),
                    error: s.and_then(|s| s.error.clone()),
                }
            })
            .collect();
        let t = self.now();
        m.push(Tick {
            t,
            namespaces,
            drops,
            created,
            totals: Totals {
                lost_events: stats.get(stat::RB_LOST) + w.source.malformed,
                freed: self.kernel_entries.then(|| stats.get(stat::FREED)),
            },
        });
        if let Some(held) = self.held.as_mut() {
            let records = held.now(&w.source, &self.prev_counts)?;
            let items = self.occupancy_keys(w, records);
            m.set_occupancy(t, items);
        }
        Ok(())
    }
}

pub async fn run(settings: &Settings, args: &TopArgs) -> Result<(), Error> {
    // Checked before anything is loaded: nothing to undo.
    if !std::io::stdout().is_terminal() {
        return Err(TopError::NotATerminal.into());
    }
    let stop = super::stop_requested()?;
    tokio::pin!(stop);
    // One record per key is enough to name owners while they live; the
    // numbers come from the in-kernel maps.
    let mut w = Watch::start(settings, false, 64)?;
    let kernel_entries = w.loaded.mode.sees_entries();
    eprintln!("{}; starting the live view (q quits)", w.banner());

    let mut session = Session {
        kernel_entries,
        prev_counts: HashMap::new(),
        held: None,
        created: HashMap::new(),
        full_drops: HashMap::new(),
        ns_labels: HashMap::new(),
        namespaces: Vec::new(),
        cgroups: Cgroups::default(),
        keys: HashMap::new(),
        keys_at: Instant::now(),
        t0: Instant::now(),
        snap_notes: Vec::new(),
        dump_notes: Vec::new(),
    };
    let mut model = Model::new(settings.top, kernel_entries, w.scope.is_narrowed());
    model.status = live::Status {
        mode: w.loaded.mode.to_string(),
        kernel: w.loaded.release.clone(),
        interval_s: args.interval,
        dump_interval_s: (!kernel_entries).then_some(args.dump_interval),
        notes: Vec::new(),
    };
    if kernel_entries {
        // Entries from before attach are seeded once, right after attach,
        // leaving out those the kernel already tracks, as `report` does.
        let scope = w.scope.clone();
        let known = w.source.live_flows();
        let (seed, notes) = tokio::task::spawn_blocking(move || {
            let nss = scope.namespaces().unwrap_or_default();
            dump_seed(&nss, &known)
        })
        .await
        .map_err(|e| TopError::Task(e.to_string()))?;
        session.held = Some(Held::from_seed(&w.source, seed)?);
        session.dump_notes = notes;
    }
    session.prev_counts = w.source.counts()?;

    let (tx, mut keys) = mpsc::unbounded_channel();
    let mut screen = Screen::enter()?;
    spawn_keys(tx)?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(args.interval));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let dump_every = Duration::from_secs_f64(args.dump_interval);
    let mut next_dump = Instant::now();
    let mut snap_task: Option<JoinHandle<Snapshot>> = None;
    let mut dump_task: Option<JoinHandle<Dumped>> = None;
    let mut dump_started = 0.0;
    let mut batch = Vec::new();
    screen.draw(&model, session.now())?;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            input = keys.recv() => match input {
                Some(Input::Key(c)) => match model.view.on_key(c) {
                    Action::Quit => break,
                    Action::Redraw => screen.draw(&model, session.now())?,
                    Action::Ignore => {}
                },
                Some(Input::Resize) => screen.draw(&model, session.now())?,
                Some(Input::Failed(e)) => return Err(TopError::Terminal(e).into()),
                None => break,
            },
            _ = tick.tick() => {
                if snap_task.is_none() {
                    let scope = w.scope.clone();
                    snap_task = Some(tokio::task::spawn_blocking(move || {
                        let (nss, error) = match scope.namespaces() {
                            Ok(n) => (n, None),
                            Err(e) => (Vec::new(), Some(e.to_string())),
                        };
                        let counters = reconcile::snapshot(&nss);
                        (nss, counters, error)
                    }));
                }
            }
            snap = finished(&mut snap_task) => {
                let snap = snap?;
                let busy: Vec<NetnsInfo> = snap
                    .0
                    .iter()
                    .filter(|ns| {
                        snap.1.get(&ns.inum).and_then(|s| s.sysctl.as_ref()).is_some_and(|s| s.count > 0)
                    })
                    .cloned()
                    .collect();
                session.sample(&mut w, &mut model, snap)?;
                session.show_notes(&mut model);
                if !kernel_entries && dump_task.is_none() && Instant::now() >= next_dump {
                    next_dump = Instant::now() + dump_every;
                    dump_started = session.now();
                    dump_task = Some(tokio::task::spawn_blocking(move || dump_seed(&busy, &HashSet::new())));
                }
                screen.draw(&model, session.now())?;
            }
            dumped = finished(&mut dump_task) => {
                let (seed, notes) = dumped?;
                session.dump_notes = notes;
                session.show_notes(&mut model);
                let records: Vec<(AggRecord, u64)> = seed.records().collect();
                let items = session.occupancy_keys(&mut w, records);
                // Stamped with when the dump began: that is the instant it shows.
                model.set_occupancy(dump_started, items);
                screen.draw(&model, session.now())?;
            }
            r = w.source.next_batch(&mut batch) => {
                r?;
                for e in batch.drain(..) {
                    // Name owners now, while their processes still exist.
                    w.observe(&e);
                }
            }
        }
    }
    drop(screen);
    Ok(())
}
