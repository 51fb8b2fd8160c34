//! The memory collector of `pipelens run`: continuous growth profiling of
//! every target (write faults on anonymous memory and, with
//! `--syscall-hooks`, anonymous mappings), published as top-N site
//! metrics; with `--memory-allocs`, allocator uprobes in the `--pid`
//! targets too.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use pipelens_common::memory::SAMPLE_ALLOC;
use tokio_util::sync::CancellationToken;

use super::{
    allocator,
    probes::{MemoryProbes, Record, SamplerSettings, parse},
    profile::Profile,
    record::{Mode, Recorder},
    report,
};
use crate::{
    collector::{Attached, Collector, CollectorKind, Hook, Running},
    objects::{Loader, ProbeError},
    process,
    session::Session,
    telemetry::{Identities, Identity},
};

/// Processes whose growth is profiled at once: each holds the unwind
/// tables of its modules, so `--all` on a busy host must not take them all.
const MAX_PROCESSES: usize = 64;
/// Sites published per process and value.
const TOP_SITES: usize = 10;
/// Sites a process may ever publish per value: a site keeps its series once
/// it has one, so that counters stay monotonic.
const MAX_SITES: usize = 40;

pub struct MemoryCollector {
    probes: MemoryProbes,
    alloc_targets: Vec<u32>,
    alloc_mean: u64,
    growth_mean: u64,
}

/// What the collector keeps while it runs. Not `Send` (the symboliser
/// caches per thread), so it lives on the collector's own thread.
struct State {
    growth_mean: u64,
    growth: HashMap<u32, Recorder>,
    allocs: HashMap<u32, Recorder>,
    published: HashMap<(u32, &'static str), HashSet<String>>,
    /// Top sites per process for `--summary-json`, kept after it exits.
    summary: std::collections::BTreeMap<u32, serde_json::Value>,
    ids: Identities,
}

impl MemoryCollector {
    pub fn start(
        loader: &Loader,
        syscall_hooks: bool,
        growth_mean: u64,
        alloc_pids: &[u32],
    ) -> Result<Self, ProbeError> {
        let settings = SamplerSettings {
            growth_mean,
            ..SamplerSettings::default()
        };
        let alloc_mean = settings.alloc_mean;
        let mut probes = MemoryProbes::load(loader, settings)?;
        probes.attach_growth(syscall_hooks)?;
        let mut alloc_targets = Vec::new();
        for pid in alloc_pids {
            let found = match allocator::find(*pid) {
                Ok(found) => found,
                Err(e) => {
                    log::warn!("memory: no allocation profiling of {pid}: {e}");
                    continue;
                }
            };
            probes.attach_allocator(*pid, &found, true)?;
            alloc_targets.push(*pid);
        }
        // Every loss series exists, at zero, before anything can be lost.
        export_losses(&probes);
        metrics::counter!("pipelens_map_evictions_total", "map" => "memory_processes").increment(0);
        Ok(Self {
            probes,
            alloc_targets,
            alloc_mean,
            growth_mean,
        })
    }

    /// Runs until `shutdown`; returns the top sites of every process seen.
    async fn run(mut self, shutdown: CancellationToken) -> Result<serde_json::Value, ProbeError> {
        let mut state = State {
            growth_mean: self.growth_mean,
            growth: HashMap::new(),
            allocs: HashMap::new(),
            published: HashMap::new(),
            summary: Default::default(),
            ids: Identities::new("memory"),
        };
        for pid in &self.alloc_targets {
            let comm = process::comm(*pid).unwrap_or_default();
            match Recorder::new(*pid, comm, Mode::Allocs, self.alloc_mean, true) {
                Ok(r) => {
                    state.allocs.insert(*pid, r);
                }
                Err(e) => log::warn!("memory: process {pid}: {e}"),
            }
        }
        let mut ring = self.probes.take_ring()?;
        let mut publish = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    state.drain(guard.get_inner_mut());
                    guard.clear_ready();
                }
                _ = publish.tick() => {
                    state.drain(ring.get_mut());
                    state.publish(&self.probes);
                }
                () = shutdown.cancelled() => break,
            }
        }
        state.drain(ring.get_mut());
        state.publish(&self.probes);
        Ok(state.summary.into_values().collect())
    }
}

/// The memory collector as `pipelens run` requests it.
pub struct Memory {
    /// Also hook the mapping syscalls.
    pub syscall_hooks: bool,
    /// Mean bytes of growth between samples.
    pub growth_mean: u64,
    /// Processes whose allocator gets uprobes (`--memory-allocs`).
    pub alloc_pids: Vec<u32>,
}

impl Collector for Memory {
    fn kinds(&self) -> Vec<CollectorKind> {
        vec![CollectorKind::Memory]
    }

    fn start(self: Box<Self>, session: &Session) -> Result<Box<dyn Attached>, ProbeError> {
        let collector = MemoryCollector::start(
            &session.loader,
            self.syscall_hooks,
            self.growth_mean,
            &self.alloc_pids,
        )?;
        Ok(Box::new(collector))
    }
}

impl Attached for MemoryCollector {
    fn hooks(&self) -> Vec<Hook> {
        // The allocator's hook is only chosen once uprobes are attached.
        let chosen = if self.alloc_targets.is_empty() { 1 } else { 2 };
        self.probes
            .hooks
            .describe()
            .into_iter()
            .take(chosen)
            .map(|(hook, kind)| Hook {
                hook,
                kind,
                target: "",
            })
            .collect()
    }

    /// On a thread of its own: what it keeps is not `Send` (the symboliser
    /// caches per thread).
    fn spawn(self: Box<Self>, shutdown: CancellationToken) -> Running {
        tokio::task::spawn_blocking(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let summary = rt.block_on(self.run(shutdown))?;
            Ok(vec![("memory", summary)])
        })
    }
}

impl State {
    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            match parse(&item) {
                Some(Record::Sample(head, stack)) => {
                    let recorder = if head.kind == SAMPLE_ALLOC {
                        self.allocs.get_mut(&head.tgid)
                    } else {
                        self.growth_recorder(head.tgid)
                    };
                    if let Some(r) = recorder {
                        r.sample(&head, stack);
                    }
                }
                Some(Record::Note(note)) => {
                    if let Some(r) = self.allocs.get_mut(&note.tgid) {
                        r.note(&note);
                    }
                    if let Some(r) = self.growth.get_mut(&note.tgid) {
                        r.note(&note);
                    }
                }
                None => {}
            }
        }
    }

    fn growth_recorder(&mut self, tgid: u32) -> Option<&mut Recorder> {
        if !self.growth.contains_key(&tgid) {
            if self.growth.len() >= MAX_PROCESSES {
                metrics::counter!("pipelens_map_evictions_total", "map" => "memory_processes")
                    .increment(1);
                return None;
            }
            let comm = process::comm(tgid)?;
            let r = Recorder::new(tgid, comm, Mode::Growth, self.growth_mean, false).ok()?;
            self.growth.insert(tgid, r);
        }
        self.growth.get_mut(&tgid)
    }

    fn publish(&mut self, probes: &MemoryProbes) {
        export_losses(probes);
        let mut gone = Vec::new();
        for (tgid, r) in &self.growth {
            let p = r.profile(Vec::new());
            let labels = self.ids.of(*tgid, r.process.as_bytes());
            let top = publish_sites(&mut self.published, *tgid, &labels, &p, 0, "growth");
            summary_entry(&mut self.summary, *tgid, &r.process)["growth"] = top;
            if !process::exists(*tgid) {
                gone.push(*tgid);
            }
        }
        for (tgid, r) in &self.allocs {
            let p = r.profile(Vec::new());
            let labels = self.ids.of(*tgid, r.process.as_bytes());
            let allocated = publish_sites(&mut self.published, *tgid, &labels, &p, 0, "allocated");
            let in_use = publish_sites(&mut self.published, *tgid, &labels, &p, 2, "in_use");
            let entry = summary_entry(&mut self.summary, *tgid, &r.process);
            entry["allocated"] = allocated;
            entry["in_use"] = in_use;
        }
        for tgid in gone {
            self.growth.remove(&tgid);
        }
    }
}

fn summary_entry<'a>(
    summary: &'a mut std::collections::BTreeMap<u32, serde_json::Value>,
    tgid: u32,
    process: &str,
) -> &'a mut serde_json::Value {
    summary
        .entry(tgid)
        .or_insert_with(|| serde_json::json!({"pid": tgid, "process": process}))
}

/// The top sites of column `col`, as `pipelens_memory_{what}` series;
/// returns them for the summary (`[{"site", "bytes"}]`, largest first).
/// Exports the kernel's loss counters (set: they run from the load).
fn export_losses(probes: &MemoryProbes) {
    let counts = probes.counts();
    metrics::counter!("pipelens_events_lost_total", "collector" => "memory").absolute(counts.lost);
    metrics::counter!("pipelens_map_evictions_total", "map" => "memory_live")
        .absolute(counts.live_full);
    probes.export_map_errors();
}

fn publish_sites(
    published: &mut HashMap<(u32, &'static str), HashSet<String>>,
    tgid: u32,
    identity: &Identity,
    profile: &Profile,
    col: usize,
    what: &'static str,
) -> serde_json::Value {
    let mut by_site: HashMap<String, i64> = HashMap::new();
    for s in &profile.stacks {
        if s.frames.is_empty() {
            continue;
        }
        let site = profile.frames[report::site(profile, s)].name();
        *by_site.entry(site).or_default() += s.values[col];
    }
    let mut ranked: Vec<(String, i64)> = by_site.into_iter().collect();
    ranked.sort_by_key(|r| std::cmp::Reverse(r.1));
    let known = published.entry((tgid, what)).or_default();
    for (i, (site, value)) in ranked.iter().enumerate() {
        let listed = known.contains(site);
        if !listed && (i >= TOP_SITES || known.len() >= MAX_SITES || *value <= 0) {
            continue;
        }
        known.insert(site.clone());
        let labels = identity.labels_with([metrics::Label::new("site", site.clone())]);
        match what {
            "growth" => metrics::counter!("pipelens_memory_growth_bytes_total", labels.clone())
                .absolute(*value as u64),
            "allocated" => {
                metrics::counter!("pipelens_memory_allocated_bytes_total", labels.clone())
                    .absolute(*value as u64)
            }
            _ => metrics::gauge!("pipelens_memory_in_use_bytes", labels.clone()).set(*value as f64),
        }
    }
    ranked
        .iter()
        .take(TOP_SITES)
        .filter(|(_, v)| *v > 0)
        .map(|(site, bytes)| serde_json::json!({"site": site, "bytes": bytes}))
        .collect()
}
