//! Allocation hotspots: sampled allocator calls and page faults, each with
//! the registers and a window of the user stack, unwound in userspace.

/// Bytes of user stack copied with every sample, from the stack pointer
/// up. Enough for a few dozen frames of typical C, C++ and Rust code; a
/// deeper stack is cut where the window ends (and said so).
pub const STACK_WINDOW: usize = 16 * 1024;
/// The window is read in pieces of this size, so that a stack whose top
/// (the end of its mapping) is nearer than [`STACK_WINDOW`] still yields
/// what is there.
pub const STACK_CHUNK: usize = 1024;
/// Entries in the table of exponential draws the samplers pick from.
pub const DRAWS: u32 = 1024;
/// Fixed-point scale of the draws: a draw of `DRAW_ONE` is one mean.
pub const DRAW_ONE: u64 = 1 << 16;
/// Sampled allocations whose pointer is followed until it is freed.
pub const MAX_LIVE: u32 = 262_144;
/// Sampled allocator calls in flight (entry seen, return not yet).
pub const MAX_PENDING: u32 = 16_384;

/// The attach cookie of an allocator uprobe: where the call's size and
/// pointer arguments are, whatever the function is called.
pub mod call {
    /// `malloc(size)`, `valloc`, `pvalloc`, `mallocx(size, flags)`,
    /// `mi_malloc_aligned(size, align)`, `operator new(size)`.
    pub const SIZE_ARG0: u64 = 1;
    /// `aligned_alloc(align, size)`, `memalign(align, size)`.
    pub const SIZE_ARG1: u64 = 2;
    /// `calloc(count, size)`.
    pub const CALLOC: u64 = 3;
    /// `realloc(ptr, size)`, `rallocx(ptr, size, flags)`.
    pub const REALLOC: u64 = 4;
    /// `reallocarray(ptr, count, size)`.
    pub const REALLOCARRAY: u64 = 5;
    /// `posix_memalign(&ptr, align, size)`: the pointer is written to
    /// `*arg0`, the return value is an error number.
    pub const POSIX_MEMALIGN: u64 = 6;
    /// `free(ptr)`, `sdallocx(ptr, size, flags)`, `mi_free(ptr)`.
    pub const FREE: u64 = 7;
    /// Flag on the cookie: this function hands some calls to the probed
    /// `malloc` of the same allocator, which counts them (glibc: `realloc`
    /// of NULL; `posix_memalign`, `aligned_alloc`, `memalign` with an
    /// alignment malloc gives anyway). Such calls are not counted twice.
    pub const FORWARDS_TO_MALLOC: u64 = 1 << 8;
    /// Alignment every glibc `malloc` result has on x86-64.
    pub const MALLOC_ALIGNMENT: u64 = 16;
}

/// `MemSample::kind`.
pub const SAMPLE_ALLOC: u32 = 1;
/// A user page fault on a target (one page of growth if anonymous).
pub const SAMPLE_FAULT: u32 = 2;
/// `mmap` of anonymous memory (or `brk` growing the heap).
pub const SAMPLE_MAP: u32 = 3;

/// `MemNote::kind`: a sampled allocation returned `addr`.
pub const NOTE_RETURNED: u32 = 1;
/// A followed pointer was freed (or moved by `realloc`).
pub const NOTE_FREED: u32 = 2;
/// `munmap(addr, size)` by a target.
pub const NOTE_UNMAPPED: u32 = 3;

/// What a sample says besides its stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MemSampleHeader {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    /// Bytes of stack that follow the header in the record.
    pub stack_len: u32,
    /// Per-CPU sequence number of the call, matched by its
    /// [`NOTE_RETURNED`] note.
    pub seq: u64,
    /// Bytes the call asked for / the page / the mapping's length.
    pub size: u64,
    /// Fault address or mapping address (0 for allocations).
    pub addr: u64,
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub ts: u64,
}

/// A sampled event with its call stack, built in a per-CPU scratch slot
/// and sent as the header plus the `stack_len` bytes read (records are
/// only as long as the stack that was there).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MemSample {
    pub head: MemSampleHeader,
    pub stack: [u8; STACK_WINDOW],
}

/// A small record with no stack: returns, frees, unmaps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MemNote {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub _pad: u32,
    pub seq: u64,
    pub addr: u64,
    pub size: u64,
}

/// Sampler settings written by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MemConfig {
    /// Mean bytes between allocation samples (0: every allocation).
    pub alloc_mean: u64,
    /// Mean bytes between growth samples (faults and mappings; 0: all).
    pub growth_mean: u64,
    /// Follow sampled pointers until they are freed (1) or not (0).
    pub track_frees: u32,
    /// Tracepoint field offsets, each from its own tracepoint's format
    /// file: `exceptions:page_fault_user` `address` and `error_code`,
    pub fault_address: u32,
    pub fault_error_code: u32,
    /// `syscalls:sys_enter_mmap` `len` and `flags`, `sys_exit_mmap` `ret`,
    pub mmap_len: u32,
    pub mmap_flags: u32,
    pub mmap_ret: u32,
    /// `syscalls:sys_enter_munmap` `addr` and `len`, `sys_exit_brk` `ret`.
    pub munmap_addr: u32,
    pub munmap_len: u32,
    pub brk_ret: u32,
    /// Bytes of user stack copied per sample (at most [`STACK_WINDOW`]).
    pub stack_bytes: u32,
    /// `THREAD_SIZE` of this kernel: where a task's user registers sit at
    /// the top of its kernel stack, for kernels without `bpf_task_pt_regs`.
    pub thread_size: u32,
    pub _pad: u32,
}

/// Key of `CALL_SITES`: a probed allocator function, by the address of its
/// first instruction in one process. Kernels before 5.15 have no attach
/// cookies; the uprobe's instruction pointer tells the functions apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CallSite {
    pub tgid: u32,
    pub _pad: u32,
    pub addr: u64,
}

/// Most allocator functions followed by address at once (all processes).
pub const MAX_CALL_SITES: u32 = 4096;

/// The allocator or mapping call in flight on a thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Pending {
    /// Sequence number of the sample taken at entry (0: not sampled).
    pub seq: u64,
    /// `posix_memalign`'s out-pointer, read at return.
    pub out_ptr: u64,
    /// Mapping call: its length (`mmap`).
    pub size: u64,
    /// Its [`call`] kind (1 for a mapping).
    pub kind: u64,
    /// A call handed on to the probed `malloc` (see
    /// [`call::FORWARDS_TO_MALLOC`]): where its return address lies on the
    /// stack, and what it is (the kernel swaps it for the uretprobe
    /// trampoline once the entry probe has run). 0 otherwise.
    pub ret_slot: u64,
    pub ret_addr: u64,
}

/// `MEMORY_STATS` slots.
pub const MSTAT_SAMPLES: u32 = 0;
/// A sample or note did not fit in the ring buffer.
pub const MSTAT_LOST: u32 = 1;
/// A sampled pointer could not be followed: the live map was full.
pub const MSTAT_LIVE_FULL: u32 = 2;
/// The user stack could not be read at all (the sample still counts).
pub const MSTAT_STACK_UNREADABLE: u32 = 3;
/// Allocator calls seen (sampled or not).
pub const MSTAT_CALLS: u32 = 4;
/// Page faults of targets seen (sampled or not).
pub const MSTAT_FAULTS: u32 = 5;
/// An allocator uprobe fired at an address `CALL_SITES` does not know
/// (kernels without attach cookies only); the call is not counted.
pub const MSTAT_UNKNOWN_SITE: u32 = 6;
/// A map insert failed: one slot per map, exported with
/// [`MEMORY_MAP_ERRORS`] (`LIVE` has its own, [`MSTAT_LIVE_FULL`]).
pub const MSTAT_PENDING_FULL: u32 = 7;
pub const MSTAT_MAPPING_FULL: u32 = 8;
pub const MSTAT_BRK_LAST_FULL: u32 = 9;
pub const MSTAT_COUNT: u32 = 10;

/// `MEMORY_STATS` slots counting failed inserts, with the map each is for.
pub const MEMORY_MAP_ERRORS: [(u32, &str); 3] = [
    (MSTAT_PENDING_FULL, "pending"),
    (MSTAT_MAPPING_FULL, "mapping"),
    (MSTAT_BRK_LAST_FULL, "brk_last"),
];
