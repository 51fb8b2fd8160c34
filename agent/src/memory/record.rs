//! Turning ring records into a profile: each sample is unwound into a call
//! stack and weighed; returned pointers are followed until freed, sampled
//! mappings until unmapped.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use pipelens_common::memory::{
    MemNote, MemSampleHeader, NOTE_FREED, NOTE_RETURNED, NOTE_UNMAPPED, SAMPLE_ALLOC, SAMPLE_FAULT,
    SAMPLE_MAP,
};

use super::{
    maps::ProcessMaps,
    modules::Modules,
    profile::{
        ALLOC_OBJECTS, ALLOC_SPACE, Frame, GROWTH_SPACE, INUSE_OBJECTS, INUSE_SPACE, MAPPED_SPACE,
        Profile, Stack, ValueType,
    },
    sampling,
    symbols::Symbols,
    unwind::{ProcessUnwinder, Unwound},
};

/// What a profile measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Resident-set growth: write faults on anonymous memory, and anonymous
    /// mappings (`mmap`, `brk`), by call stack. No uprobes.
    Growth,
    /// Allocator calls (malloc family, jemalloc, mimalloc, tcmalloc) by
    /// call stack, sampled by bytes; in-use bytes of the sampled pointers.
    Allocs,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Growth => "growth",
            Mode::Allocs => "allocs",
        }
    }

    pub fn value_types(self) -> Vec<ValueType> {
        match self {
            Mode::Allocs => vec![ALLOC_SPACE, ALLOC_OBJECTS, INUSE_SPACE, INUSE_OBJECTS],
            Mode::Growth => vec![GROWTH_SPACE, MAPPED_SPACE],
        }
    }
}

// Column indices of each mode's value types.
const ALLOC_B: usize = 0;
const ALLOC_N: usize = 1;
const INUSE_B: usize = 2;
const INUSE_N: usize = 3;
const GROWTH_B: usize = 0;
const MAPPED_B: usize = 1;

/// Sampled calls awaiting their return note, and frees awaiting theirs, at
/// most (far more than are ever in flight at once).
const MAX_AWAITED: usize = 65_536;

/// Distinct call stacks kept per process in full. Past it a new stack is
/// kept by its innermost [`FOLDED_FRAMES`] frames, which hold its site:
/// the profile's sites stay right, its deepest paths merge.
const MAX_STACKS: usize = 4096;
/// Frames a stack past the budget keeps.
const FOLDED_FRAMES: usize = 8;
/// Distinct stacks per process at most, folded ones included; a sample of
/// a new stack past it is dropped and counted.
const MAX_ALL_STACKS: usize = 2 * MAX_STACKS;

struct StackEntry {
    unwound: Unwound,
    values: [f64; 4],
}

/// A sampled allocation whose pointer is followed.
#[derive(Clone, Copy)]
struct Weighed {
    stack: usize,
    bytes: f64,
    count: f64,
}

/// A sampled mapping still mapped.
struct Region {
    start: u64,
    end: u64,
    stack: usize,
    /// Weight per mapped byte.
    scale: f64,
}

/// Everything recorded of one process.
pub struct Recorder {
    pub pid: u32,
    pub process: String,
    mode: Mode,
    mean: u64,
    track_frees: bool,
    started: Instant,
    start_unix_nanos: i64,
    unwinder: ProcessUnwinder,
    maps: Option<ProcessMaps>,
    maps_read: Option<Instant>,
    stacks: Vec<StackEntry>,
    /// Stacks by the hash of their addresses (each stack is kept once, in
    /// `stacks`).
    index: HashMap<u64, Vec<u32>>,
    /// Sampled calls whose return is awaited, by sequence number.
    pending: HashMap<u64, Weighed>,
    live: HashMap<u64, Weighed>,
    /// Frees of pointers whose return note has not arrived yet (the two
    /// can cross between CPUs).
    early_frees: HashSet<u64>,
    regions: Vec<Region>,
    symbols: Symbols,
    pub samples: u64,
    pub truncated: u64,
    pub non_anonymous_faults: u64,
    /// New stacks kept by their innermost frames only (stack budget).
    pub folded: u64,
    /// Samples dropped: their stack was new and the budget spent.
    pub dropped: u64,
}

impl Recorder {
    pub fn new(
        pid: u32,
        process: String,
        mode: Mode,
        mean: u64,
        track_frees: bool,
        shared: &mut Modules,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            pid,
            process,
            mode,
            mean,
            track_frees,
            started: Instant::now(),
            start_unix_nanos: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(0),
            unwinder: ProcessUnwinder::new(pid, shared)?,
            maps: ProcessMaps::read(pid).ok(),
            maps_read: Some(Instant::now()),
            stacks: Vec::new(),
            index: HashMap::new(),
            pending: HashMap::new(),
            live: HashMap::new(),
            early_frees: HashSet::new(),
            regions: Vec::new(),
            symbols: Symbols::default(),
            samples: 0,
            truncated: 0,
            non_anonymous_faults: 0,
            folded: 0,
            dropped: 0,
        })
    }

    fn find(&self, unwound: &Unwound) -> Option<usize> {
        self.index
            .get(&hash_of(unwound))?
            .iter()
            .map(|i| *i as usize)
            .find(|i| self.stacks[*i].unwound == *unwound)
    }

    /// Lets go of what only this process held in `shared`.
    pub fn release(self, shared: &mut Modules) {
        let paths: Vec<_> = self.unwinder.paths().collect();
        drop(self);
        shared.release(paths);
    }

    /// The stack of a sample, by index; `None` when the stack budget is
    /// spent and the stack is new (the sample is counted as dropped).
    fn stack_of(
        &mut self,
        s: &MemSampleHeader,
        stack: &[u8],
        shared: &mut Modules,
    ) -> Option<usize> {
        let len = (s.stack_len as usize).min(stack.len());
        let mut unwound = self
            .unwinder
            .unwind(s.ip, s.sp, s.bp, &stack[..len], shared);
        if unwound.truncated {
            self.truncated += 1;
        }
        if let Some(i) = self.find(&unwound) {
            return Some(i);
        }
        let frugal = self.stacks.len() >= MAX_STACKS
            || crate::budget::pressure() == crate::budget::Pressure::Critical;
        if frugal && unwound.addresses.len() > FOLDED_FRAMES {
            unwound.addresses.truncate(FOLDED_FRAMES);
            unwound.truncated = true;
            if let Some(i) = self.find(&unwound) {
                self.folded += 1;
                return Some(i);
            }
            if self.stacks.len() < MAX_ALL_STACKS {
                self.folded += 1;
            }
        }
        if self.stacks.len() >= MAX_ALL_STACKS {
            self.dropped += 1;
            return None;
        }
        // Name the new addresses now, while the process (and its
        // `/proc/<pid>/root`) is still there.
        let unwinder = &self.unwinder;
        self.symbols
            .resolve(&shared.symbolizer, unwound.addresses.iter().copied(), |a| {
                unwinder.module_of(a).cloned()
            });
        let i = self.stacks.len();
        self.index
            .entry(hash_of(&unwound))
            .or_default()
            .push(i as u32);
        self.stacks.push(StackEntry {
            unwound,
            values: [0.0; 4],
        });
        Some(i)
    }

    /// Whether `addr` is anonymous memory, reading the maps again when the
    /// address is not in the copy we have (a mapping made since).
    fn anonymous(&mut self, addr: u64) -> bool {
        let known = self.maps.as_ref().is_some_and(|m| m.find(addr).is_some());
        if !known
            && self
                .maps_read
                .is_none_or(|t| t.elapsed() > Duration::from_millis(50))
        {
            if let Ok(m) = ProcessMaps::read(self.pid) {
                self.maps = Some(m);
            }
            self.maps_read = Some(Instant::now());
        }
        match &self.maps {
            Some(m) if m.find(addr).is_some() => m.is_anonymous(addr),
            // Unmapped since, or the process is gone: a write fault on
            // memory we cannot classify is most likely anonymous.
            _ => true,
        }
    }

    pub fn sample(&mut self, s: &MemSampleHeader, stack: &[u8], shared: &mut Modules) {
        self.samples += 1;
        match s.kind {
            SAMPLE_ALLOC if self.mode == Mode::Allocs => {
                let Some(stack) = self.stack_of(s, stack, shared) else {
                    return;
                };
                let (bytes, count) = sampling::weight(s.size, self.mean);
                let v = &mut self.stacks[stack].values;
                v[ALLOC_B] += bytes;
                v[ALLOC_N] += count;
                if !self.track_frees {
                    return;
                }
                // A return whose note was lost (full ring) never comes:
                // keep this map from growing without bound in a long run.
                if self.pending.len() >= MAX_AWAITED {
                    self.pending.clear();
                }
                self.pending.insert(
                    s.seq,
                    Weighed {
                        stack,
                        bytes,
                        count,
                    },
                );
            }
            SAMPLE_FAULT if self.mode == Mode::Growth => {
                if !self.anonymous(s.addr) {
                    self.non_anonymous_faults += 1;
                    return;
                }
                let Some(stack) = self.stack_of(s, stack, shared) else {
                    return;
                };
                self.stacks[stack].values[GROWTH_B] += sampling::weight(s.size, self.mean).0;
            }
            SAMPLE_MAP if self.mode == Mode::Growth => {
                let Some(stack) = self.stack_of(s, stack, shared) else {
                    return;
                };
                let (bytes, _) = sampling::weight(s.size, self.mean);
                self.stacks[stack].values[MAPPED_B] += bytes;
                self.regions.push(Region {
                    start: s.addr,
                    end: s.addr.saturating_add(s.size),
                    stack,
                    scale: bytes / s.size.max(1) as f64,
                });
            }
            _ => {}
        }
    }

    pub fn note(&mut self, n: &MemNote) {
        match n.kind {
            NOTE_RETURNED => {
                let Some(w) = self.pending.remove(&n.seq) else {
                    return;
                };
                if n.size == 0 {
                    // Not followed: the kernel's live map was full.
                    return;
                }
                if self.early_frees.remove(&n.addr) {
                    return;
                }
                let v = &mut self.stacks[w.stack].values;
                v[INUSE_B] += w.bytes;
                v[INUSE_N] += w.count;
                self.live.insert(n.addr, w);
            }
            NOTE_FREED => match self.live.remove(&n.addr) {
                Some(w) => {
                    let v = &mut self.stacks[w.stack].values;
                    v[INUSE_B] -= w.bytes;
                    v[INUSE_N] -= w.count;
                }
                None => {
                    if self.early_frees.len() >= MAX_AWAITED {
                        self.early_frees.clear();
                    }
                    self.early_frees.insert(n.addr);
                }
            },
            NOTE_UNMAPPED => {
                let (start, end) = (n.addr, n.addr.saturating_add(n.size));
                let stacks = &mut self.stacks;
                self.regions.retain_mut(|r| {
                    let lo = r.start.max(start);
                    let hi = r.end.min(end);
                    if lo >= hi {
                        return true;
                    }
                    stacks[r.stack].values[MAPPED_B] -= (hi - lo) as f64 * r.scale;
                    // Keep what is left on either side.
                    if r.start < lo {
                        r.end = lo;
                        true
                    } else if hi < r.end {
                        r.start = hi;
                        true
                    } else {
                        false
                    }
                });
            }
            _ => {}
        }
    }

    /// Starts the profile's clock now (once the probes are attached).
    pub fn start_clock(&mut self) {
        self.started = Instant::now();
        self.start_unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Sum of the first column so far (for the progress line).
    pub fn first_total(&self) -> f64 {
        self.stacks.iter().map(|s| s.values[0]).sum()
    }

    /// The profile as it stands, symbolised.
    pub fn profile(&self, notes: Vec<String>) -> Profile {
        let mut frames: Vec<Frame> = Vec::new();
        let mut frame_index: HashMap<Frame, usize> = HashMap::new();
        let mut stacks = Vec::with_capacity(self.stacks.len());
        let columns = self.mode.value_types().len();
        for entry in &self.stacks {
            let mut ids = Vec::new();
            for addr in &entry.unwound.addresses {
                for f in self.symbols.frames(*addr).iter() {
                    let id = *frame_index.entry(f.clone()).or_insert_with(|| {
                        frames.push(f.clone());
                        frames.len() - 1
                    });
                    ids.push(id);
                }
            }
            let values: Vec<i64> = entry.values[..columns]
                .iter()
                .map(|v| v.round().max(0.0) as i64)
                .collect();
            stacks.push(Stack {
                frames: ids,
                values,
                truncated: entry.unwound.truncated,
            });
        }
        Profile {
            pid: self.pid,
            process: self.process.clone(),
            mode: self.mode.name(),
            start_unix_nanos: self.start_unix_nanos,
            duration: self.started.elapsed(),
            value_types: self.mode.value_types(),
            sample_mean_bytes: self.mean,
            frames,
            stacks,
            notes,
        }
    }
}

fn hash_of(unwound: &Unwound) -> u64 {
    use std::hash::{BuildHasher as _, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(unwound)
}
