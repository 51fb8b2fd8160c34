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
    modules::Modules,
    probes::{MemoryProbes, Record, SamplerSettings, parse},
    profile::Profile,
    record::{Mode, Recorder},
    report,
};
use crate::{
    budget::{self, Pressure},
    collector::{Attached, Collector, CollectorKind, Hook, Running},
    objects::{Loader, ProbeError},
    process,
    session::Session,
    telemetry::{Identities, Identity},
};

/// Processes whose growth is profiled at once: each holds its call stacks
/// and a view of the unwind tables of its modules (the tables themselves
/// are shared per file), so `--all` on a busy host must not take them all.
const MAX_PROCESSES: usize = 64;
/// Sites published per process and value.
const TOP_SITES: usize = 10;
/// Sites a process may ever publish per value: a site keeps its series once
/// it has one, so that counters stay monotonic.
const MAX_SITES: usize = 40;
/// Sites remembered per identity for the processes let go (the largest).
const MAX_RETIRED_SITES: usize = 4 * MAX_SITES;
/// Processes listed in the summary at most: past it, the entries of the
/// processes that exited first are dropped (and their number given).
const MAX_SUMMARY: usize = 512;

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
    /// Sites with a series, per identity and value.
    published: HashMap<Series, HashSet<String>>,
    /// Bytes by site of the growth profiles let go (exited or shed), per
    /// identity: their series go on counting them.
    retired: HashMap<Series, HashMap<String, i64>>,
    /// The identity of each profiled process, taken while it lives.
    who: HashMap<u32, Identity>,
    /// Exited processes, oldest first, whose summary entry may be dropped.
    exited: std::collections::VecDeque<u32>,
    /// Summary entries dropped past [`MAX_SUMMARY`].
    unlisted: u64,
    /// When exited processes were last looked for.
    swept: std::time::Instant,
    /// Top sites per process for `--summary-json`, kept after it exits.
    summary: std::collections::BTreeMap<u32, serde_json::Value>,
    ids: Identities,
    /// Unwind sections and symbols, shared by every profiled process.
    shared: Modules,
    /// Processes let go under memory pressure: not profiled again.
    shed: HashSet<u32>,
    /// Stack budget counts already exported, per process and whether of
    /// its allocation profile.
    exported: HashMap<(u32, bool), (u64, u64)>,
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
        for reason in DROP_REASONS {
            metrics::counter!("pipelens_profiler_samples_dropped_total", "reason" => reason)
                .increment(0);
        }
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
            retired: HashMap::new(),
            who: HashMap::new(),
            exited: Default::default(),
            unlisted: 0,
            swept: std::time::Instant::now(),
            summary: Default::default(),
            ids: Identities::new("memory"),
            shared: Modules::default(),
            shed: HashSet::new(),
            exported: HashMap::new(),
        };
        for pid in &self.alloc_targets {
            let comm = process::comm(*pid).unwrap_or_default();
            match Recorder::new(
                *pid,
                comm,
                Mode::Allocs,
                self.alloc_mean,
                true,
                &mut state.shared,
            ) {
                Ok(r) => {
                    let identity = state.ids.of(*pid, r.process.as_bytes());
                    state.who.insert(*pid, identity);
                    state.allocs.insert(*pid, r);
                }
                Err(e) => log::warn!("memory: process {pid}: {e}"),
            }
        }
        let mut ring = self.probes.take_ring()?;
        let mut publish = tokio::time::interval(Duration::from_secs(5));
        let mut relieve = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = relieve.tick() => state.relieve(),
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
        if state.unlisted > 0 {
            log::info!(
                "memory: the summary lists the latest {MAX_SUMMARY} processes; {} that exited \
                 before them are in the series only",
                state.unlisted
            );
        }
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
                    } else if self.growth_recorder(head.tgid) {
                        self.growth.get_mut(&head.tgid)
                    } else {
                        None
                    };
                    if let Some(r) = recorder {
                        r.sample(&head, stack, &mut self.shared);
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

    /// Whether `tgid` has a growth profile, starting one if it may.
    fn growth_recorder(&mut self, tgid: u32) -> bool {
        if !self.growth.contains_key(&tgid) {
            if self.shed.contains(&tgid) {
                dropped_sample("pressure");
                return false;
            }
            if self.growth.len() >= MAX_PROCESSES {
                // Short-lived processes (a forking server's backends) make
                // room as they exit, not only at the next publish.
                self.sweep_exited();
            }
            if self.growth.len() >= MAX_PROCESSES {
                metrics::counter!("pipelens_map_evictions_total", "map" => "memory_processes")
                    .increment(1);
                dropped_sample("process_cap");
                return false;
            }
            if budget::pressure() >= Pressure::High {
                // No new profile under memory pressure: this process's
                // samples are dropped until it falls.
                self.shed_process(tgid);
                dropped_sample("pressure");
                return false;
            }
            // A process gone before its first sample was read cannot be
            // unwound any more (its maps went with it).
            let Some(comm) = process::comm(tgid) else {
                dropped_sample("exited");
                return false;
            };
            let Ok(r) = Recorder::new(
                tgid,
                comm,
                Mode::Growth,
                self.growth_mean,
                false,
                &mut self.shared,
            ) else {
                dropped_sample("exited");
                return false;
            };
            let identity = self.ids.of(tgid, r.process.as_bytes());
            self.who.insert(tgid, identity);
            self.growth.insert(tgid, r);
            self.export_profiled();
        }
        true
    }

    /// Lets go of the profiles of processes that have exited (at most
    /// every 100 ms), their bytes kept in their series.
    fn sweep_exited(&mut self) {
        if self.swept.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.swept = std::time::Instant::now();
        let gone: Vec<u32> = self
            .growth
            .keys()
            .copied()
            .filter(|t| !process::exists(*t))
            .collect();
        for tgid in gone {
            if let Some(r) = self.growth.remove(&tgid) {
                let by_site = sites(&r.profile(Vec::new()), 0);
                summary_entry(&mut self.summary, tgid, &r.process)["growth"] = top_sites(&by_site);
                self.retire(tgid, r, by_site);
                self.exited.push_back(tgid);
            }
        }
        self.export_profiled();
    }

    /// Records that `tgid` is not profiled for memory's sake (once).
    fn shed_process(&mut self, tgid: u32) {
        if self.shed.len() >= 4 * MAX_PROCESSES {
            self.shed.clear();
        }
        if self.shed.insert(tgid) {
            budget::shed("memory", "process", 1);
        }
    }

    fn export_profiled(&self) {
        metrics::gauge!("pipelens_profiler_processes").set(self.growth.len() as f64);
        metrics::gauge!("pipelens_profiler_shared_files").set(self.shared.files_held() as f64);
    }

    /// Under critical pressure, lets go of the half of the growth profiles
    /// with the fewest samples (their series keep their last values).
    fn relieve(&mut self) {
        if budget::pressure() < Pressure::Critical || self.growth.is_empty() {
            return;
        }
        let mut by_samples: Vec<(u64, u32)> =
            self.growth.iter().map(|(t, r)| (r.samples, *t)).collect();
        by_samples.sort_unstable();
        let n = by_samples.len().div_ceil(2);
        for (_, tgid) in by_samples.into_iter().take(n) {
            if let Some(r) = self.growth.remove(&tgid) {
                let by_site = sites(&r.profile(Vec::new()), 0);
                self.retire(tgid, r, by_site);
            }
            self.shed_process(tgid);
        }
        log::warn!("memory: let go of {n} growth profiles under memory pressure");
        self.export_profiled();
        budget::trim();
    }

    /// Exports what the recorders' stack budgets folded and dropped since
    /// the last time.
    fn export_budgets(&mut self) {
        let growth = self.growth.iter().map(|(t, r)| ((*t, false), r));
        let allocs = self.allocs.iter().map(|(t, r)| ((*t, true), r));
        for (key, r) in growth.chain(allocs) {
            let seen = self.exported.entry(key).or_default();
            budget::shed("memory", "stack", r.folded - seen.0);
            budget::shed("memory", "sample", r.dropped - seen.1);
            *seen = (r.folded, r.dropped);
        }
    }

    fn publish(&mut self, probes: &MemoryProbes) {
        export_losses(probes);
        self.export_budgets();
        // Series are per identity (process name, container), not per pid:
        // the backends of a forking server add up, and the ones gone stay
        // counted through `retired`.
        let mut totals = self.retired.clone();
        let mut gone = Vec::new();
        for (tgid, r) in &self.growth {
            let p = r.profile(Vec::new());
            let by_site = sites(&p, 0);
            add_sites(
                &mut totals,
                identity_of(&self.who, *tgid),
                "growth",
                &by_site,
            );
            summary_entry(&mut self.summary, *tgid, &r.process)["growth"] = top_sites(&by_site);
            if !process::exists(*tgid) {
                gone.push((*tgid, by_site));
            }
        }
        for (tgid, r) in &self.allocs {
            let p = r.profile(Vec::new());
            let identity = identity_of(&self.who, *tgid);
            let allocated = sites(&p, 0);
            let in_use = sites(&p, 2);
            add_sites(&mut totals, identity.clone(), "allocated", &allocated);
            add_sites(&mut totals, identity, "in_use", &in_use);
            let entry = summary_entry(&mut self.summary, *tgid, &r.process);
            entry["allocated"] = top_sites(&allocated);
            entry["in_use"] = top_sites(&in_use);
        }
        for ((identity, what), by_site) in &totals {
            publish_sites(&mut self.published, identity, what, by_site);
        }
        for (tgid, by_site) in gone {
            if let Some(r) = self.growth.remove(&tgid) {
                self.retire(tgid, r, by_site);
            }
            self.exited.push_back(tgid);
        }
        // Exited processes keep their summary entry, the latest ones.
        while self.summary.len() > MAX_SUMMARY {
            let Some(oldest) = self.exited.pop_front() else {
                break;
            };
            if self.summary.remove(&oldest).is_some() {
                self.unlisted += 1;
            }
        }
        self.export_profiled();
    }

    /// Lets go of a growth profile, its bytes kept in its identity's series.
    fn retire(&mut self, tgid: u32, r: Recorder, by_site: HashMap<String, i64>) {
        // The allocation profile of the same process may still need it.
        let identity = if self.allocs.contains_key(&tgid) {
            self.who.get(&tgid).cloned()
        } else {
            self.who.remove(&tgid)
        };
        if let Some(identity) = identity {
            let key = (identity, "growth");
            let listed = self.published.get(&key);
            let kept = self.retired.entry(key.clone()).or_default();
            for (site, bytes) in by_site {
                *kept.entry(site).or_default() += bytes;
            }
            if kept.len() > MAX_RETIRED_SITES {
                // The smallest sites are forgotten, unless they have a
                // series (a counter must not go back).
                let mut ranked: Vec<(i64, String)> =
                    kept.iter().map(|(s, b)| (*b, s.clone())).collect();
                ranked.sort_unstable_by(|a, b| b.cmp(a));
                for (_, site) in ranked.into_iter().skip(MAX_RETIRED_SITES) {
                    if !listed.is_some_and(|l| l.contains(&site)) {
                        kept.remove(&site);
                    }
                }
            }
        }
        r.release(&mut self.shared);
        self.exported.remove(&(tgid, false));
    }
}

/// Why a growth sample went into no profile.
const DROP_REASONS: [&str; 3] = ["exited", "process_cap", "pressure"];

fn dropped_sample(reason: &'static str) {
    metrics::counter!("pipelens_profiler_samples_dropped_total", "reason" => reason).increment(1);
}

fn identity_of(who: &HashMap<u32, Identity>, tgid: u32) -> Identity {
    who.get(&tgid).cloned().unwrap_or_default()
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

/// Exports the kernel's loss counters (set: they run from the load).
fn export_losses(probes: &MemoryProbes) {
    let counts = probes.counts();
    metrics::counter!("pipelens_events_lost_total", "collector" => "memory").absolute(counts.lost);
    metrics::counter!("pipelens_map_evictions_total", "map" => "memory_live")
        .absolute(counts.live_full);
    probes.export_map_errors();
}

/// Bytes by allocation site in column `col` of a profile.
fn sites(profile: &Profile, col: usize) -> HashMap<String, i64> {
    let mut by_site: HashMap<String, i64> = HashMap::new();
    for s in &profile.stacks {
        if s.frames.is_empty() {
            continue;
        }
        let site = profile.frames[report::site(profile, s)].name();
        *by_site.entry(site).or_default() += s.values[col];
    }
    by_site
}

/// A family of series of one identity: (who, "growth" | "allocated" |
/// "in_use").
type Series = (Identity, &'static str);

fn add_sites(
    totals: &mut HashMap<Series, HashMap<String, i64>>,
    identity: Identity,
    what: &'static str,
    by_site: &HashMap<String, i64>,
) {
    let total = totals.entry((identity, what)).or_default();
    for (site, bytes) in by_site {
        *total.entry(site.clone()).or_default() += bytes;
    }
}

/// Largest first, ties by name.
fn ranked(by_site: &HashMap<String, i64>) -> Vec<(&String, i64)> {
    let mut ranked: Vec<(&String, i64)> = by_site.iter().map(|(s, b)| (s, *b)).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    ranked
}

/// The top sites for the summary (`[{"site", "bytes"}]`, largest first).
fn top_sites(by_site: &HashMap<String, i64>) -> serde_json::Value {
    ranked(by_site)
        .into_iter()
        .take(TOP_SITES)
        .filter(|(_, v)| *v > 0)
        .map(|(site, bytes)| serde_json::json!({"site": site, "bytes": bytes}))
        .collect()
}

/// The top sites of one identity as `pipelens_memory_{what}` series. A
/// site keeps its series once it has one, so that counters stay monotonic.
fn publish_sites(
    published: &mut HashMap<Series, HashSet<String>>,
    identity: &Identity,
    what: &'static str,
    by_site: &HashMap<String, i64>,
) {
    let known = published.entry((identity.clone(), what)).or_default();
    for (i, (site, value)) in ranked(by_site).into_iter().enumerate() {
        let listed = known.contains(site);
        if !listed && (i >= TOP_SITES || known.len() >= MAX_SITES || value <= 0) {
            continue;
        }
        known.insert(site.clone());
        let labels = identity.labels_with([metrics::Label::new("site", site.clone())]);
        match what {
            "growth" => metrics::counter!("pipelens_memory_growth_bytes_total", labels)
                .absolute(value.max(0) as u64),
            "allocated" => metrics::counter!("pipelens_memory_allocated_bytes_total", labels)
                .absolute(value.max(0) as u64),
            _ => metrics::gauge!("pipelens_memory_in_use_bytes", labels).set(value as f64),
        }
    }
}
