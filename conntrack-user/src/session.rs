//! One watching session, shared by every command: the attached programs
//! and their event source, the namespaces in scope, and the resolver that
//! names what the kernel reports. Commands read events from it; the
//! [`crate::aggregate::sampler::Sampler`] reads its counts.
use conntrack_ebpf::FlowEvent;

use crate::{
    cli::Settings,
    kernel::{
        compat::Mode,
        loader::{self, LoadError, LoadRequest, Loaded},
    },
    names::{
        resolver::{Process, Resolver},
        scope::Scope,
    },
    source::{
        maps::{KernelSource, SourceError},
        netns::NetnsError,
        records::{self, AggRecord, FlowRecord},
    },
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// Boxed: load errors carry kernel detail strings, and every other
    /// variant should not pay for their size.
    #[error(transparent)]
    Load(Box<LoadError>),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

impl From<LoadError> for SessionError {
    fn from(e: LoadError) -> Self {
        SessionError::Load(Box::new(e))
    }
}

/// What the kernel streams on the ring buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Streaming {
    /// One record per new conntrack entry (kernel-probe modes), not only
    /// the first of each key.
    pub(crate) new_entries: bool,
    /// Records per second per CPU beyond the first of each key; the
    /// counts come from the in-kernel maps whatever this is.
    pub(crate) budget: u32,
}

impl Streaming {
    /// What a command that counts needs: records only to name owners while
    /// they live (the first of each key, within its own per-CPU budget),
    /// never one per packet; the numbers come from the in-kernel maps.
    pub(crate) const NAMES: Streaming = Streaming {
        new_entries: false,
        budget: 64,
    };
}

/// The attached programs and what reads them.
pub(crate) struct Probes {
    pub(crate) loaded: Loaded,
    pub(crate) source: KernelSource,
}

pub(crate) struct Session {
    probes: Option<Probes>,
    pub(crate) scope: Scope,
    pub(crate) names: Resolver,
    batch: Vec<FlowEvent>,
}

impl Session {
    /// Loads and attaches the programs.
    pub(crate) fn attach(settings: &Settings, streaming: Streaming) -> Result<Self, SessionError> {
        let scope = Scope::from_specs(&settings.netns)?;
        let mut loaded = loader::load(&LoadRequest {
            mode: settings.mode,
            stream_new: streaming.new_entries,
            stream_budget: streaming.budget,
        })?;
        let source = KernelSource::new(&mut loaded)?;
        crate::kernel::privileges::drop_unneeded();
        Ok(Self {
            probes: Some(Probes { loaded, source }),
            scope,
            names: Resolver::default(),
            batch: Vec::new(),
        })
    }

    /// A session that reads the kernel's counters only, for when eBPF
    /// cannot load and a command can still say something useful.
    pub(crate) fn counters_only(settings: &Settings) -> Result<Self, SessionError> {
        Ok(Self {
            probes: None,
            scope: Scope::from_specs(&settings.netns)?,
            names: Resolver::default(),
            batch: Vec::new(),
        })
    }

    pub(crate) fn probes(&self) -> Option<&Probes> {
        self.probes.as_ref()
    }

    pub(crate) fn probes_mut(&mut self) -> Option<&mut Probes> {
        self.probes.as_mut()
    }

    pub(crate) fn mode(&self) -> Option<Mode> {
        self.probes.as_ref().map(|p| p.loaded.mode)
    }

    /// Whether the kernel probes see entries being created and freed.
    pub(crate) fn sees_entries(&self) -> bool {
        self.mode().is_some_and(Mode::sees_entries)
    }

    pub(crate) fn release(&self) -> String {
        match &self.probes {
            Some(p) => p.loaded.release.clone(),
            None => crate::kernel::btf::kernel_release(),
        }
    }

    /// One line for stderr saying which mode runs and what it hooks.
    pub(crate) fn banner(&self) -> String {
        match &self.probes {
            Some(p) => format!(
                "ctwatch: {} mode on kernel {} (attached: {})",
                p.loaded.mode,
                p.loaded.release,
                p.loaded.attached.join(", ")
            ),
            None => "ctwatch: no eBPF, kernel counters only".into(),
        }
    }

    /// Waits for records on the ring buffer and returns them decoded, with
    /// the process behind each, named now while it still exists. Never
    /// resolves without probes.
    pub(crate) async fn events(&mut self) -> Result<Vec<(FlowRecord, Process)>, SessionError> {
        let Some(p) = self.probes.as_mut() else {
            return std::future::pending().await;
        };
        p.source.next_batch(&mut self.batch).await?;
        Ok(self.observe())
    }

    /// What the ring buffer holds right now, without waiting.
    pub(crate) fn drain(&mut self) -> Vec<(FlowRecord, Process)> {
        if let Some(p) = self.probes.as_mut() {
            p.source.drain_now(&mut self.batch);
        }
        self.observe()
    }

    fn observe(&mut self) -> Vec<(FlowRecord, Process)> {
        let mut out = Vec::with_capacity(self.batch.len());
        for ev in self.batch.drain(..) {
            let Ok(rec) = records::decode(&ev) else {
                continue;
            };
            let key = AggRecord {
                kind: rec.kind,
                role: rec.role,
                netns: rec.netns,
                proto: ev.tuple.proto,
                src: rec.tuple.src,
                dst: rec.tuple.dst,
                dport: rec.tuple.dport,
                tgid: ev.pid,
                comm: records::comm(&ev.comm),
                cgroup_id: ev.cgroup_id,
                sock_ino: ev.sock_ino,
            };
            // A new entry's reply tuple shows where NAT sent it: every
            // flow to the same destination goes there too.
            if let Some(r) = &rec.reply {
                if (r.src, r.sport) != (rec.tuple.dst, rec.tuple.dport) {
                    self.names.learn_nat(
                        (rec.netns, key.proto, rec.tuple.dst, rec.tuple.dport),
                        (r.src, r.sport),
                    );
                }
            }
            let who = self.names.flow(&key, ev.tuple.sport).process;
            out.push((rec, who));
        }
        out
    }
}
