//! Loading the memory kernel object and attaching its samplers: allocator
//! uprobes scoped to one process, the write-fault tracepoint and the
//! mapping syscalls for growth.

use std::num::NonZeroU32;

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, RingBuf},
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    },
};
use pipelens_common::memory::{
    CallSite, DRAW_ONE, DRAWS, MEMORY_MAP_ERRORS, MSTAT_CALLS, MSTAT_FAULTS, MSTAT_LIVE_FULL,
    MSTAT_LOST, MSTAT_SAMPLES, MSTAT_STACK_UNREADABLE, MemConfig, MemNote, MemSampleHeader, call,
};
use tokio::io::unix::AsyncFd;

use super::{
    allocator::{AllocProbe, Family},
    maps::ProcessMaps,
    sampling,
};
use crate::{
    objects::{self, Loader, ProbeError},
    tracefs::TracepointFormat,
};

/// How the samplers are set up.
#[derive(Clone, Copy, Debug)]
pub struct SamplerSettings {
    /// Mean bytes between allocation samples (0: every call).
    pub alloc_mean: u64,
    /// Mean bytes between growth samples (0: every page and mapping).
    pub growth_mean: u64,
    /// Follow sampled pointers to their `free` (return and free probes).
    pub track_frees: bool,
    /// User stack bytes copied per sample.
    pub stack_bytes: u32,
    /// Size of the ring buffer (a power of two, in bytes): it must hold
    /// the samples of a burst while the agent unwinds them.
    pub ring_bytes: u32,
}

impl Default for SamplerSettings {
    /// The defaults, with an 8 MiB ring (a few hundred samples of
    /// headroom for a continuous, sparsely sampled collector).
    fn default() -> Self {
        Self {
            alloc_mean: sampling::DEFAULT_ALLOC_MEAN,
            growth_mean: sampling::DEFAULT_GROWTH_MEAN,
            track_frees: true,
            stack_bytes: 8192,
            ring_bytes: 8 << 20,
        }
    }
}

/// One ring record.
pub enum Record<'a> {
    Sample(MemSampleHeader, &'a [u8]),
    Note(MemNote),
}

/// A sample (header and stack bytes) or a note, told apart by length.
pub fn parse(bytes: &[u8]) -> Option<Record<'_>> {
    if bytes.len() == size_of::<MemNote>() {
        // SAFETY: MemNote is plain integers; the length matches.
        let note = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<MemNote>()) };
        return Some(Record::Note(note));
    }
    if bytes.len() < size_of::<MemSampleHeader>() {
        return None;
    }
    // SAFETY: plain integers; the record holds at least the header.
    let head = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<MemSampleHeader>()) };
    let stack = &bytes[size_of::<MemSampleHeader>()..];
    Some(Record::Sample(head, stack))
}

/// Counters the kernel keeps, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounts {
    pub samples: u64,
    pub lost: u64,
    pub live_full: u64,
    pub stack_unreadable: u64,
    pub calls: u64,
    pub faults: u64,
}

/// How the memory programs get what an older kernel does not hand them,
/// chosen per kernel when they load, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryHooks {
    /// User registers in tracepoints: `bpf_task_pt_regs` (5.15+), else
    /// read from the top of the task's kernel stack.
    pub regs_from_stack: bool,
    /// Allocator call kinds: attach cookies (5.15+), else a map by the
    /// probed address.
    pub calls_by_address: bool,
}

impl MemoryHooks {
    /// For `pipelens check` and `pipelens_collector_hook_info`.
    pub fn describe(&self) -> [(&'static str, &'static str); 2] {
        [
            (
                "user_regs",
                if self.regs_from_stack {
                    "task_stack"
                } else {
                    "bpf_task_pt_regs"
                },
            ),
            (
                "alloc_calls",
                if self.calls_by_address {
                    "address_map"
                } else {
                    "attach_cookie"
                },
            ),
        ]
    }
}

pub struct MemoryProbes {
    ebpf: Ebpf,
    uprobes_loaded: bool,
    pub hooks: MemoryHooks,
}

/// The growth programs, per way of reading user registers.
const GROWTH_HELPER: [&str; 3] = ["page_fault", "mmap_exit", "brk_exit"];
const GROWTH_STACK: [&str; 3] = ["page_fault_stack", "mmap_exit_stack", "brk_exit_stack"];

impl MemoryProbes {
    pub fn load(loader: &Loader, settings: SamplerSettings) -> Result<Self, ProbeError> {
        let fault = TracepointFormat::load("exceptions", "page_fault_user")?;
        let mmap = TracepointFormat::load("syscalls", "sys_enter_mmap")?;
        let mmap_exit = TracepointFormat::load("syscalls", "sys_exit_mmap")?;
        let munmap = TracepointFormat::load("syscalls", "sys_enter_munmap")?;
        let brk_exit = TracepointFormat::load("syscalls", "sys_exit_brk")?;
        let config = MemConfig {
            alloc_mean: settings.alloc_mean,
            growth_mean: settings.growth_mean,
            track_frees: u32::from(settings.track_frees),
            fault_address: fault.offset("address")?,
            fault_error_code: fault.offset("error_code")?,
            mmap_len: mmap.offset("len")?,
            mmap_flags: mmap.offset("flags")?,
            mmap_ret: mmap_exit.offset("ret")?,
            munmap_addr: munmap.offset("addr")?,
            munmap_len: munmap.offset("len")?,
            brk_ret: brk_exit.offset("ret")?,
            stack_bytes: settings.stack_bytes,
            thread_size: thread_size(),
            _pad: 0,
        };
        let mut ebpf = loader.load("memory", objects::MEMORY, |l| {
            l.override_global("MEMORY_CONFIG", &config, true)
                .map_max_entries("MEMORY_EVENTS", settings.ring_bytes);
        })?;
        let mut draws: Array<&mut MapData, u64> = Array::try_from(
            ebpf.map_mut("DRAW_TABLE")
                .ok_or(ProbeError::MissingMap("DRAW_TABLE"))?,
        )?;
        for (i, d) in sampling::exponential_draws(DRAWS as usize, DRAW_ONE)
            .into_iter()
            .enumerate()
        {
            draws.set(i as u32, d, 0)?;
        }
        let hooks = MemoryHooks {
            regs_from_stack: false,
            calls_by_address: false,
        };
        let mut probes = Self {
            ebpf,
            uprobes_loaded: false,
            hooks,
        };
        probes.load_growth()?;
        Ok(probes)
    }

    /// Loads the growth programs this kernel accepts: with
    /// `bpf_task_pt_regs`, or reading the registers off the kernel stack.
    fn load_growth(&mut self) -> Result<(), ProbeError> {
        let first = load_all(&mut self.ebpf, &GROWTH_HELPER);
        if first.is_ok() {
            return Ok(());
        }
        load_all(&mut self.ebpf, &GROWTH_STACK).map_err(|(name, source)| ProbeError::Attach {
            category: "tracepoint",
            name,
            source,
        })?;
        self.hooks.regs_from_stack = true;
        if let Err((name, e)) = first {
            log::info!(
                "memory: user registers read from the kernel stack ({name}: {})",
                objects::verifier_reason(&e)
            );
        }
        Ok(())
    }

    fn growth_program(&self, index: usize) -> &'static str {
        if self.hooks.regs_from_stack {
            GROWTH_STACK[index]
        } else {
            GROWTH_HELPER[index]
        }
    }

    /// Write faults of targets (always) and, with `syscalls`, their
    /// `mmap`, `munmap` and `brk` calls (which cost every syscall on the
    /// host the tracing slow path while attached).
    pub fn attach_growth(&mut self, syscalls: bool) -> Result<(), ProbeError> {
        let mut hooks = vec![(self.growth_program(0), "exceptions", "page_fault_user")];
        if syscalls {
            hooks.extend([
                ("mmap_enter", "syscalls", "sys_enter_mmap"),
                (self.growth_program(1), "syscalls", "sys_exit_mmap"),
                ("munmap_enter", "syscalls", "sys_enter_munmap"),
                (self.growth_program(2), "syscalls", "sys_exit_brk"),
            ]);
        }
        objects::attach_tracepoints(&mut self.ebpf, &hooks)
    }

    /// Tells the `brk` tracker where a process's break is now.
    pub fn seed_brk(&mut self, tgid: u32, brk: u64) -> Result<(), ProbeError> {
        let mut map: BpfHashMap<&mut MapData, u32, u64> = BpfHashMap::try_from(
            self.ebpf
                .map_mut("BRK_LAST")
                .ok_or(ProbeError::MissingMap("BRK_LAST"))?,
        )?;
        map.insert(tgid, brk, 0)?;
        Ok(())
    }

    /// Uprobes on `probes`, in process `pid` only: the breakpoints are
    /// written into that process's pages, so other users of the same
    /// library never trap.
    pub fn attach_allocator(
        &mut self,
        pid: u32,
        probes: &[AllocProbe],
        track_frees: bool,
    ) -> Result<usize, ProbeError> {
        let pid = NonZeroU32::new(pid).ok_or_else(|| ProbeError::Layout("pid 0".into()))?;
        self.load_allocator()?;
        let with_cookie = !self.hooks.calls_by_address;
        let enter = if self.hooks.calls_by_address {
            "alloc_enter_by_address"
        } else {
            "alloc_enter"
        };
        if self.hooks.calls_by_address {
            self.note_call_sites(pid.get(), probes)?;
        }
        let mut attached = 0;
        for probe in probes {
            let wanted: Vec<&'static str> = if !track_frees {
                if probe.call == call::FREE {
                    vec![]
                } else {
                    vec![enter]
                }
            } else if probe.call == call::FREE {
                vec![enter]
            } else {
                vec![enter, "alloc_exit"]
            };
            for name in wanted {
                let p = self.uprobe(name);
                let point = UProbeAttachPoint {
                    location: UProbeAttachLocation::AbsoluteOffset(probe.file_offset),
                    // Kernels without cookies refuse one; CALL_SITES has it.
                    cookie: with_cookie.then(|| cookie(probe)),
                };
                p.attach(point, &probe.module, UProbeScope::OneProcess(pid))
                    .map_err(|source| ProbeError::Attach {
                        category: "uprobe",
                        name,
                        source,
                    })?;
                attached += 1;
            }
        }
        Ok(attached)
    }

    /// Loads the allocator uprobes once, with the call-kind hook this kernel
    /// accepts: attach cookies (5.15+), else the probed address.
    fn load_allocator(&mut self) -> Result<(), ProbeError> {
        if self.uprobes_loaded {
            return Ok(());
        }
        if let Err(e) = self.uprobe("alloc_enter").load() {
            log::info!(
                "memory: allocator calls told apart by address ({})",
                objects::verifier_reason(&e)
            );
            self.hooks.calls_by_address = true;
        }
        let names: &[&'static str] = if self.hooks.calls_by_address {
            &["alloc_enter_by_address", "alloc_exit"]
        } else {
            &["alloc_exit"]
        };
        for &name in names {
            self.uprobe(name)
                .load()
                .map_err(|source| ProbeError::Attach {
                    category: "uprobe",
                    name,
                    source,
                })?;
        }
        self.uprobes_loaded = true;
        Ok(())
    }

    /// Writes where each probed function lies in process `pid`, for
    /// `alloc_enter_by_address`: the module's mapping that holds the
    /// function's file offset gives its address.
    fn note_call_sites(&mut self, pid: u32, probes: &[AllocProbe]) -> Result<(), ProbeError> {
        let maps = ProcessMaps::read(pid)
            .map_err(|e| ProbeError::Layout(format!("maps of process {pid}: {e}")))?;
        let mut sites: BpfHashMap<&mut MapData, CallSite, u64> = BpfHashMap::try_from(
            self.ebpf
                .map_mut("CALL_SITES")
                .ok_or(ProbeError::MissingMap("CALL_SITES"))?,
        )?;
        for probe in probes {
            let Some(addr) = address_in(&maps, probe) else {
                log::warn!(
                    "memory: {} of {} is not mapped in process {pid}",
                    probe.symbol,
                    probe.module.display()
                );
                continue;
            };
            let site = CallSite {
                tgid: pid,
                _pad: 0,
                addr,
            };
            sites.insert(site, cookie(probe), 0)?;
        }
        Ok(())
    }

    fn uprobe(&mut self, name: &str) -> &mut UProbe {
        self.ebpf
            .program_mut(name)
            .expect("program defined in the object")
            .try_into()
            .expect("program is a uprobe")
    }

    pub fn take_ring(&mut self) -> Result<AsyncFd<RingBuf<MapData>>, ProbeError> {
        objects::take_ring(&mut self.ebpf, "MEMORY_EVENTS")
    }

    /// See [`objects::export_map_errors`].
    pub fn export_map_errors(&self) {
        if let Err(e) =
            objects::export_map_errors(&self.ebpf, "memory", "MEMORY_STATS", &MEMORY_MAP_ERRORS)
        {
            log::debug!("memory: map error counts: {e}");
        }
    }

    pub fn counts(&self) -> KernelCounts {
        let get = |slot| objects::per_cpu_total(&self.ebpf, "MEMORY_STATS", slot).unwrap_or(0);
        KernelCounts {
            samples: get(MSTAT_SAMPLES),
            lost: get(MSTAT_LOST),
            live_full: get(MSTAT_LIVE_FULL),
            stack_unreadable: get(MSTAT_STACK_UNREADABLE),
            calls: get(MSTAT_CALLS),
            faults: get(MSTAT_FAULTS),
        }
    }
}

/// The address of `probe`'s first instruction in the process of `maps`: in the
/// mapping of its module (compared by inode, so a path seen through
/// `/proc/<pid>/root` still matches) that covers its file offset.
fn address_in(maps: &ProcessMaps, probe: &AllocProbe) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let inode = std::fs::metadata(&probe.module).ok()?.ino();
    maps.mappings.iter().find_map(|m| {
        let covers = m.inode == inode
            && m.offset <= probe.file_offset
            && probe.file_offset < m.offset + (m.end - m.start);
        covers.then(|| m.start + (probe.file_offset - m.offset))
    })
}

/// Loads every program of `names`; the first refused and why.
fn load_all(
    ebpf: &mut Ebpf,
    names: &[&'static str],
) -> Result<(), (&'static str, aya::programs::ProgramError)> {
    for &name in names {
        let p: &mut aya::programs::TracePoint = ebpf
            .program_mut(name)
            .expect("program defined in the object")
            .try_into()
            .expect("program is a tracepoint");
        p.load().map_err(|e| (name, e))?;
    }
    Ok(())
}

/// `THREAD_SIZE` on x86-64: 16 KiB, doubled by KASAN.
fn thread_size() -> u32 {
    if crate::btf::kallsyms_address("__asan_load8").is_some() {
        32 << 10
    } else {
        16 << 10
    }
}

/// The attach cookie of `probe`: where its arguments are, and whether it
/// hands some calls to its allocator's probed `malloc` (glibc 2.36:
/// `realloc(NULL, n)` returns `malloc(n)`, and `_mid_memalign`, behind
/// `posix_memalign`, `aligned_alloc` and `memalign`, returns `malloc(n)`
/// when the alignment is no more than malloc's own).
fn cookie(probe: &AllocProbe) -> u64 {
    let forwards = probe.family == Family::Glibc
        && matches!(
            probe.call,
            call::REALLOC | call::POSIX_MEMALIGN | call::SIZE_ARG1
        );
    probe.call
        | if forwards {
            call::FORWARDS_TO_MALLOC
        } else {
            0
        }
}

/// Loads the memory object as `run` and `pipelens memory` would (growth
/// programs and allocator uprobes, with the same per-kernel choices), without
/// attaching: what `pipelens check` reports.
pub fn verify(loader: &Loader) -> Result<MemoryHooks, String> {
    let settings = SamplerSettings {
        ring_bytes: 1 << 20,
        ..SamplerSettings::default()
    };
    let mut probes = MemoryProbes::load(loader, settings).map_err(|e| e.to_string())?;
    for name in ["mmap_enter", "munmap_enter"] {
        let p: &mut aya::programs::TracePoint = probes
            .ebpf
            .program_mut(name)
            .expect("program defined in the object")
            .try_into()
            .expect("program is a tracepoint");
        p.load()
            .map_err(|e| format!("{name}: {}", objects::verifier_reason(&e)))?;
    }
    probes.load_allocator().map_err(|e| e.to_string())?;
    Ok(probes.hooks)
}
