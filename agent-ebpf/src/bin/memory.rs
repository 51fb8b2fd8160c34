//! Allocation hotspots. Two samplers share one ring buffer:
//!
//! - allocation mode: uprobes on the allocator functions of one process
//!   (attached with that process as the only scope, so no other user of the
//!   library pays the trap), sampled by bytes with a Poisson process, the
//!   sampled pointers followed to their `free`;
//! - growth mode: write faults of targets (`exceptions:page_fault_user`)
//!   and their `mmap`/`brk`/`munmap` calls, sampled by bytes likewise.
//!
//! A sample carries the user registers and a window of the user stack; the
//! agent unwinds it from the binaries' `.eh_frame` (release builds rarely
//! keep frame pointers, so an in-kernel frame-pointer walk would stop after
//! a frame or two).
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _, Global,
    bindings::pt_regs,
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_task, bpf_get_current_task_btf, bpf_get_prandom_u32,
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        bpf_probe_read_user_buf, bpf_task_pt_regs,
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use pipelens_common::memory::*;
use pipelens_ebpf::{current_ids, is_target, tp_field};

#[unsafe(no_mangle)]
static MEMORY_CONFIG: Global<MemConfig> = Global::new(MemConfig {
    alloc_mean: 512 * 1024,
    growth_mean: 64 * 1024,
    track_frees: 1,
    fault_address: 0,
    fault_error_code: 0,
    mmap_len: 0,
    mmap_flags: 0,
    mmap_ret: 0,
    munmap_addr: 0,
    munmap_len: 0,
    brk_ret: 0,
    stack_bytes: STACK_WINDOW as u32,
    thread_size: 16384,
    _pad: 0,
});

/// Sized by the agent at load (`SamplerSettings::ring_bytes`).
#[map]
static MEMORY_EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Exponential draws with mean `DRAW_ONE`, written by the agent.
#[map]
static DRAW_TABLE: Array<u64> = Array::with_max_entries(DRAWS, 0);

/// Bytes left before the next sample: slot 0 allocations, slot 1 growth;
/// slot 2 is a call counter for sequence numbers.
#[map]
static COUNTDOWN: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

/// Allocator call in flight per thread: a sampled one (its pointer is
/// followed from its return) or one handed on to `malloc`.
#[map]
static PENDING: LruHashMap<u32, Pending> = LruHashMap::with_max_entries(MAX_PENDING, 0);

/// Sampled pointers not freed yet → sequence number of their sample.
#[map]
static LIVE: HashMap<u64, u64> = HashMap::with_max_entries(MAX_LIVE, 0);

/// Mapping call in flight (`mmap` length, `brk`), per thread.
#[map]
static MAPPING: LruHashMap<u32, Pending> = LruHashMap::with_max_entries(MAX_PENDING, 0);

/// Last program break seen per process, to turn `brk` into a delta.
#[map]
static BRK_LAST: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16_384, 0);

/// Where a sample is put together before it is sent.
#[map]
static SCRATCH: PerCpuArray<MemSample> = PerCpuArray::with_max_entries(1, 0);

#[map]
static MEMORY_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MSTAT_COUNT, 0);

/// Probed function → its [`call`] kind, for kernels without attach cookies
/// (written by the agent as it attaches, see [`alloc_enter_by_address`]).
#[map]
static CALL_SITES: HashMap<CallSite, u64> = HashMap::with_max_entries(MAX_CALL_SITES, 0);

const SLOT_ALLOC: u32 = 0;
const SLOT_GROWTH: u32 = 1;
const SLOT_SEQ: u32 = 2;
const PAGE: u64 = 4096;
/// `error_code` bit of a write access (arch/x86/include/asm/trap_pf.h).
const PF_WRITE: u64 = 2;
const MAP_ANONYMOUS: u64 = 0x20;

macro_rules! config {
    ($field:ident) => {
        pipelens_ebpf::global_field!(MEMORY_CONFIG, MemConfig, $field)
    };
}

#[inline(always)]
fn stat(slot: u32) {
    pipelens_ebpf::bump_stat(&MEMORY_STATS, slot);
}

/// Poisson sampling by bytes: true when the next sample point falls inside
/// these `bytes`. The countdown is per CPU; a program runs with migration
/// disabled, so its read-modify-write is not interleaved on one CPU.
#[inline(always)]
fn sampled(slot: u32, bytes: u64, mean: u64) -> bool {
    if mean == 0 {
        return true;
    }
    let Some(left) = COUNTDOWN.get_ptr_mut(slot) else {
        return false;
    };
    // SAFETY: per-CPU slot.
    unsafe {
        if *left > bytes {
            *left -= bytes;
            return false;
        }
        // SAFETY: the helper has no preconditions.
        let i = bpf_get_prandom_u32() % DRAWS;
        let draw = DRAW_TABLE.get(i).copied().unwrap_or(DRAW_ONE);
        *left = (draw * mean) >> 16;
        true
    }
}

#[inline(always)]
fn next_seq() -> u64 {
    // SAFETY: the helper has no preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    let n = match COUNTDOWN.get_ptr_mut(SLOT_SEQ) {
        // SAFETY: per-CPU slot.
        Some(p) => unsafe {
            *p += 1;
            *p
        },
        None => 0,
    };
    (n << 12) | (cpu & 0xfff)
}

/// Sends a sample with the registers `regs` (user registers) and the user
/// stack above their stack pointer.
#[inline(always)]
fn emit_sample(kind: u32, seq: u64, size: u64, addr: u64, regs: &pt_regs) {
    let (tgid, tid) = current_ids();
    stat(MSTAT_SAMPLES);
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let sp = regs.rsp;
    let window = config!(stack_bytes) as usize;
    // SAFETY: `s` is this CPU's scratch slot.
    unsafe {
        (*s).head = MemSampleHeader {
            kind,
            tgid,
            tid,
            stack_len: 0,
            seq,
            size,
            addr,
            ip: regs.rip,
            sp,
            bp: regs.rbp,
            ts: bpf_ktime_get_ns(),
        };
        let mut len = 0usize;
        let stack = &mut (*s).stack;
        for i in 0..(STACK_WINDOW / STACK_CHUNK) {
            let off = i * STACK_CHUNK;
            if off >= window {
                break;
            }
            let src = sp + off as u64;
            let dst = &mut stack[off..off + STACK_CHUNK];
            if bpf_probe_read_user_buf(src as *const u8, dst).is_ok() {
                len += STACK_CHUNK;
                continue;
            }
            // The chunk crosses the end of the stack's mapping (the top of
            // the main thread's stack is that close): take what lies
            // before the page boundary.
            let rest = ((4096 - (src & 4095)) as usize) & (STACK_CHUNK - 1);
            if rest > 0 && bpf_probe_read_user_buf(src as *const u8, &mut dst[..rest]).is_ok() {
                len += rest;
            }
            break;
        }
        if len == 0 {
            stat(MSTAT_STACK_UNREADABLE);
        }
        // Inside a forwarding call, its return address on the stack is the
        // kernel's uretprobe trampoline, which no unwinder can walk past:
        // put the real one back in the copy.
        if let Some(p) = PENDING.get(tid)
            && p.ret_slot != 0
        {
            let off = p.ret_slot.wrapping_sub(sp);
            if off + 8 <= len as u64 {
                let at = (off as usize) & (STACK_WINDOW - 8);
                core::ptr::write_unaligned(stack.as_mut_ptr().add(at).cast::<u64>(), p.ret_addr);
            }
        }
        (*s).head.stack_len = len as u32;
        let mut total = pipelens_ebpf::opaque(size_of::<MemSampleHeader>() + len);
        if total > size_of::<MemSample>() {
            total = size_of::<MemSample>();
        }
        let bytes = core::slice::from_raw_parts(s.cast::<u8>(), total);
        if MEMORY_EVENTS.output::<[u8]>(bytes, 0).is_err() {
            stat(MSTAT_LOST);
        }
    }
}

#[inline(always)]
fn emit_note(kind: u32, seq: u64, addr: u64, size: u64) {
    let (tgid, tid) = current_ids();
    let note = MemNote {
        kind,
        tgid,
        tid,
        _pad: 0,
        seq,
        addr,
        size,
    };
    if MEMORY_EVENTS.output(note, 0).is_err() {
        stat(MSTAT_LOST);
    }
}

/// A followed pointer is freed: forget it and tell the agent.
#[inline(always)]
fn forget(ptr: u64) {
    if ptr == 0 || config!(track_frees) == 0 {
        return;
    }
    // SAFETY: only tested for presence.
    if unsafe { LIVE.get(ptr) }.is_some() {
        let _ = LIVE.remove(ptr);
        emit_note(NOTE_FREED, 0, ptr, 0);
    }
}

/// A call handed on to the probed `malloc`, which counts it. When returns
/// are probed, the kernel swaps this call's return address for its
/// trampoline as soon as this program returns: remember the real one, and
/// where it lies, for the stack copies taken inside the call. The next
/// return seen on the thread (the inner `malloc`'s) clears it.
#[inline(always)]
fn handed_on(sp: u64) {
    if config!(track_frees) == 0 {
        return;
    }
    let (_, tid) = current_ids();
    // SAFETY: the helper validates the user address.
    if let Ok(ret_addr) = unsafe { bpf_probe_read_user(sp as *const u64) } {
        let p = Pending {
            ret_slot: sp,
            ret_addr,
            ..Pending::default()
        };
        if PENDING.insert(tid, p, 0).is_err() {
            stat(MSTAT_PENDING_FULL);
        }
    }
}

/// Entry of every allocator function; the attach cookie says where its
/// arguments are ([`call`]). Cookies need 5.15.
#[uprobe]
pub fn alloc_enter(ctx: ProbeContext) -> u32 {
    // SAFETY: the helper has no preconditions.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    // SAFETY: the context of a uprobe is the user registers.
    on_alloc_enter(unsafe { &*ctx.regs }, cookie);
    0
}

/// [`alloc_enter`] for kernels without attach cookies: the call kind is
/// looked up by the probed address, which is the instruction pointer a
/// uprobe handler sees (the kernel rewinds it to the breakpoint).
#[uprobe]
pub fn alloc_enter_by_address(ctx: ProbeContext) -> u32 {
    // SAFETY: the context of a uprobe is the user registers.
    let regs = unsafe { &*ctx.regs };
    let (tgid, _) = current_ids();
    let site = CallSite {
        tgid,
        _pad: 0,
        addr: regs.rip,
    };
    // SAFETY: copied out.
    match unsafe { CALL_SITES.get(site) }.copied() {
        Some(cookie) => on_alloc_enter(regs, cookie),
        None => stat(MSTAT_UNKNOWN_SITE),
    }
    0
}

#[inline(always)]
fn on_alloc_enter(regs: &pt_regs, cookie: u64) {
    let kind = cookie & 0xff;
    let (a0, a1, a2) = (regs.rdi, regs.rsi, regs.rdx);
    // glibc serves these with its own (probed) malloc.
    let hands_on = cookie & call::FORWARDS_TO_MALLOC != 0
        && match kind {
            call::SIZE_ARG1 => a0 <= call::MALLOC_ALIGNMENT,
            call::REALLOC => a0 == 0,
            call::POSIX_MEMALIGN => a1 <= call::MALLOC_ALIGNMENT,
            _ => false,
        };
    if hands_on {
        handed_on(regs.rsp);
        return;
    }
    let (size, out_ptr) = match kind {
        call::FREE => {
            forget(a0);
            return;
        }
        call::SIZE_ARG0 => (a0, 0),
        // memalign / aligned_alloc(align, size)
        call::SIZE_ARG1 => (a1, 0),
        call::CALLOC => (a0.wrapping_mul(a1), 0),
        call::REALLOC => {
            forget(a0);
            (a1, 0)
        }
        call::REALLOCARRAY => {
            forget(a0);
            (a1.wrapping_mul(a2), 0)
        }
        call::POSIX_MEMALIGN => (a2, a0),
        _ => return,
    };
    stat(MSTAT_CALLS);
    if size == 0 || !sampled(SLOT_ALLOC, size, config!(alloc_mean)) {
        return;
    }
    let seq = next_seq();
    emit_sample(SAMPLE_ALLOC, seq, size, 0, regs);
    if config!(track_frees) != 0 {
        let (_, tid) = current_ids();
        let p = Pending {
            seq,
            out_ptr,
            kind,
            ..Pending::default()
        };
        if PENDING.insert(tid, p, 0).is_err() {
            stat(MSTAT_PENDING_FULL);
        }
    }
}

/// Return of every allocation function (attached only when pointers are
/// followed): the pointer of a sampled call starts being followed.
#[uretprobe]
pub fn alloc_exit(ctx: RetProbeContext) -> u32 {
    let (_, tid) = current_ids();
    // SAFETY: copied out before the entry is removed.
    let Some(p) = (unsafe { PENDING.get(tid) }).copied() else {
        return 0;
    };
    let _ = PENDING.remove(tid);
    if p.seq == 0 {
        // A handed-on call: its inner malloc has returned.
        return 0;
    }
    // SAFETY: the context of a uretprobe is the user registers.
    let rax = unsafe { (*ctx.regs).rax };
    let ptr = if p.kind == call::POSIX_MEMALIGN {
        if rax != 0 {
            0
        } else {
            // SAFETY: the helper validates the user address.
            unsafe { bpf_probe_read_user(p.out_ptr as *const u64) }.unwrap_or(0)
        }
    } else {
        rax
    };
    if ptr == 0 {
        return 0;
    }
    let followed = if LIVE.insert(ptr, p.seq, 0).is_ok() {
        1
    } else {
        stat(MSTAT_LIVE_FULL);
        0
    };
    emit_note(NOTE_RETURNED, p.seq, ptr, followed);
    0
}

/// The user registers of the current task, from a tracepoint (whose
/// context holds only the tracepoint's fields): `bpf_task_pt_regs`, 5.15
/// and newer.
#[inline(always)]
fn user_regs_helper() -> Option<pt_regs> {
    // SAFETY: the helpers take the current task, always valid here.
    unsafe {
        let task = bpf_get_current_task_btf();
        let regs = bpf_task_pt_regs(task) as *const pt_regs;
        bpf_probe_read_kernel(regs).ok()
    }
}

/// The same for older kernels: x86-64 keeps a task's user registers at the
/// top of its kernel stack (`task_pt_regs`: `stack + THREAD_SIZE` minus one
/// `struct pt_regs`). Checked to be a user frame before use.
#[inline(always)]
fn user_regs_from_stack() -> Option<pt_regs> {
    // SAFETY: the helper has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let stack: u64 =
        pipelens_ebpf::read_kernel(task + pipelens_ebpf::kernel_offset!(task_stack) as u64).ok()?;
    let top = stack + config!(thread_size) as u64 - size_of::<pt_regs>() as u64;
    let regs: pt_regs = pipelens_ebpf::read_kernel(top).ok()?;
    // The code segment's privilege level: 3 for user mode.
    (regs.cs & 3 == 3).then_some(regs)
}

/// `exceptions:page_fault_user`: a write fault grows the resident set by a
/// page (first touch of anonymous memory, or copy-on-write). Read faults
/// of anonymous memory map the shared zero page and grow nothing.
#[inline(always)]
fn on_page_fault(ctx: &TracePointContext, user_regs: impl Fn() -> Option<pt_regs>) -> u32 {
    let (tgid, _) = current_ids();
    if !is_target(tgid) {
        return 0;
    }
    let error: u64 = tp_field(ctx, config!(fault_error_code)).unwrap_or(0);
    if error & PF_WRITE == 0 {
        return 0;
    }
    stat(MSTAT_FAULTS);
    if !sampled(SLOT_GROWTH, PAGE, config!(growth_mean)) {
        return 0;
    }
    let addr: u64 = tp_field(ctx, config!(fault_address)).unwrap_or(0);
    if let Some(regs) = user_regs() {
        emit_sample(SAMPLE_FAULT, 0, PAGE, addr, &regs);
    }
    0
}

/// `syscalls:sys_enter_mmap`: remember the length of anonymous mappings.
#[tracepoint]
pub fn mmap_enter(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return 0;
    }
    let len: u64 = tp_field(&ctx, config!(mmap_len)).unwrap_or(0);
    let flags: u64 = tp_field(&ctx, config!(mmap_flags)).unwrap_or(0);
    if flags & MAP_ANONYMOUS == 0 || len == 0 {
        return 0;
    }
    let p = Pending {
        size: len,
        kind: 1,
        ..Pending::default()
    };
    if MAPPING.insert(tid, p, 0).is_err() {
        stat(MSTAT_MAPPING_FULL);
    }
    0
}

/// `syscalls:sys_exit_mmap`: a sampled anonymous mapping, with its stack.
#[inline(always)]
fn on_mmap_exit(ctx: &TracePointContext, user_regs: impl Fn() -> Option<pt_regs>) -> u32 {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return 0;
    }
    // SAFETY: copied out before removal.
    let Some(p) = (unsafe { MAPPING.get(tid) }).copied() else {
        return 0;
    };
    let _ = MAPPING.remove(tid);
    let ret: i64 = tp_field(ctx, config!(mmap_ret)).unwrap_or(-1);
    if ret < 0 || p.kind != 1 {
        return 0;
    }
    if sampled(SLOT_GROWTH, p.size, config!(growth_mean))
        && let Some(regs) = user_regs()
    {
        emit_sample(SAMPLE_MAP, 0, p.size, ret as u64, &regs);
    }
    0
}

/// `syscalls:sys_enter_munmap`: every unmap is noted (no stack); the agent
/// takes it off the sampled mappings it overlaps.
#[tracepoint]
pub fn munmap_enter(ctx: TracePointContext) -> u32 {
    let (tgid, _) = current_ids();
    if !is_target(tgid) {
        return 0;
    }
    let addr: u64 = tp_field(&ctx, config!(munmap_addr)).unwrap_or(0);
    let len: u64 = tp_field(&ctx, config!(munmap_len)).unwrap_or(0);
    emit_note(NOTE_UNMAPPED, 0, addr, len);
    0
}

/// `syscalls:sys_exit_brk`: the new break; growth since the last one seen
/// is sampled like a mapping, shrinking is noted like an unmap.
#[inline(always)]
fn on_brk_exit(ctx: &TracePointContext, user_regs: impl Fn() -> Option<pt_regs>) -> u32 {
    let (tgid, _) = current_ids();
    if !is_target(tgid) {
        return 0;
    }
    let new: u64 = tp_field(ctx, config!(brk_ret)).unwrap_or(0);
    if new == 0 {
        return 0;
    }
    // SAFETY: copied out.
    let last = unsafe { BRK_LAST.get(tgid) }.copied();
    if BRK_LAST.insert(tgid, new, 0).is_err() {
        stat(MSTAT_BRK_LAST_FULL);
    }
    let Some(last) = last else {
        return 0;
    };
    if new > last {
        let grown = new - last;
        if sampled(SLOT_GROWTH, grown, config!(growth_mean))
            && let Some(regs) = user_regs()
        {
            emit_sample(SAMPLE_MAP, 0, grown, last, &regs);
        }
    } else if new < last {
        emit_note(NOTE_UNMAPPED, 0, new, last - new);
    }
    0
}

/// The growth programs, once per way of reading user registers; the agent
/// loads the first pair this kernel's verifier accepts.
macro_rules! growth_programs {
    ($regs:ident, $fault:ident, $mmap_exit:ident, $brk_exit:ident) => {
        /// See `on_page_fault`.
        #[tracepoint]
        pub fn $fault(ctx: TracePointContext) -> u32 {
            on_page_fault(&ctx, $regs)
        }

        /// See `on_mmap_exit`.
        #[tracepoint]
        pub fn $mmap_exit(ctx: TracePointContext) -> u32 {
            on_mmap_exit(&ctx, $regs)
        }

        /// See `on_brk_exit`.
        #[tracepoint]
        pub fn $brk_exit(ctx: TracePointContext) -> u32 {
            on_brk_exit(&ctx, $regs)
        }
    };
}

growth_programs!(user_regs_helper, page_fault, mmap_exit, brk_exit);
growth_programs!(
    user_regs_from_stack,
    page_fault_stack,
    mmap_exit_stack,
    brk_exit_stack
);

pipelens_ebpf::kernel_object!();
