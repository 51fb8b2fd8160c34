//! The workload: known sizes allocated in known functions.
//!
//! Every function here is `#[inline(never)]`, so each one is a frame of its
//! own and a symbol of its own (`pipelens_alloc_fixture::workload::NAME`),
//! and the chains the profiler should report are
//!
//! ```text
//! main -> fixture_main -> run_phases -> retain_ten_mib    -> alloc_block
//! main -> fixture_main -> run_phases -> churn_hundred_mib -> alloc_block, free_block
//! main -> fixture_main -> run_phases -> map_three_regions -> map_region
//! ```
//!
//! Nothing but the ground truth is allocated while the phases run: the
//! retained blocks are kept on a list threaded through the blocks
//! themselves, and the mapped regions in a fixed array, so there is no
//! bookkeeping allocation to tell apart from the workload.

use std::{
    alloc::{Layout, alloc, dealloc, handle_alloc_error},
    hint::black_box,
    ptr,
};

/// Bytes `retain_ten_mib` allocates and keeps until exit.
pub const RETAIN_BYTES: u64 = 10 * 1024 * 1024;
/// The size of each retained block.
pub const RETAIN_BLOCK: usize = 1024;
/// Bytes one `churn_hundred_mib` allocates and frees.
pub const CHURN_BYTES: u64 = 100 * 1024 * 1024;
/// The size of each churned block.
pub const CHURN_BLOCK: usize = 4096;
/// How many regions `map_three_regions` maps.
pub const MAP_REGIONS: usize = 3;
/// The size of each mapped region.
pub const MAP_REGION: usize = 64 * 1024 * 1024;
/// The stride at which the regions are written: one byte a page.
pub const PAGE: usize = 4096;

/// The phases, by their names on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Retain,
    Churn,
    Map,
}

impl Phase {
    pub fn parse(name: &str) -> Option<Phase> {
        match name {
            "retain" => Some(Phase::Retain),
            "churn" => Some(Phase::Churn),
            "map" => Some(Phase::Map),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Retain => "retain",
            Phase::Churn => "churn",
            Phase::Map => "map",
        }
    }

    /// The workload function that carries out this phase.
    pub fn function(self) -> &'static str {
        match self {
            Phase::Retain => "retain_ten_mib",
            Phase::Churn => "churn_hundred_mib",
            Phase::Map => "map_three_regions",
        }
    }
}

/// What was actually done: the ground truth printed on the `done` line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Done {
    pub retain_bytes: u64,
    pub retain_blocks: u64,
    pub churn_bytes: u64,
    pub churn_blocks: u64,
    pub map_bytes: u64,
    pub map_pages: u64,
}

/// Memory kept until the process exits.
pub struct Kept {
    /// Last retained block; each block's first word points to the one
    /// allocated before it.
    retained: *mut u8,
    regions: [*mut u8; MAP_REGIONS],
}

impl Kept {
    pub fn new() -> Kept {
        Kept {
            retained: ptr::null_mut(),
            regions: [ptr::null_mut(); MAP_REGIONS],
        }
    }

    /// Blocks on the retained list (walks it: a check, not a hot path).
    pub fn retained_blocks(&self) -> u64 {
        let mut n = 0;
        let mut p = self.retained;
        while !p.is_null() {
            n += 1;
            // SAFETY: every block on the list is live, pointer-aligned and
            // starts with the next pointer written by `retain_ten_mib`.
            p = unsafe { p.cast::<*mut u8>().read() };
        }
        n
    }
}

impl Default for Kept {
    fn default() -> Kept {
        Kept::new()
    }
}

/// Runs `phases` in order, churn `repeat` times, and returns what it did.
#[inline(never)]
pub fn run_phases(phases: &[Phase], repeat: u32, kept: &mut Kept) -> Done {
    let mut done = Done::default();
    for &phase in phases {
        match phase {
            Phase::Retain => {
                done.retain_bytes += retain_ten_mib(kept);
                done.retain_blocks += RETAIN_BYTES / RETAIN_BLOCK as u64;
            }
            Phase::Churn => {
                for _ in 0..repeat {
                    done.churn_bytes += churn_hundred_mib();
                    done.churn_blocks += CHURN_BYTES / CHURN_BLOCK as u64;
                }
            }
            Phase::Map => {
                done.map_bytes += map_three_regions(kept);
                done.map_pages += (MAP_REGIONS * MAP_REGION / PAGE) as u64;
            }
        }
        black_box(&mut *kept);
    }
    black_box(done)
}

/// 10 MiB as 10,240 blocks of 1,024 bytes, kept until exit.
#[inline(never)]
pub fn retain_ten_mib(kept: &mut Kept) -> u64 {
    let blocks = RETAIN_BYTES as usize / RETAIN_BLOCK;
    let mut bytes = 0;
    for i in 0..blocks {
        let p = alloc_block(RETAIN_BLOCK, i as u8);
        // SAFETY: p is a fresh block of RETAIN_BLOCK >= 8 bytes, aligned
        // for a pointer (alloc_block asks for that alignment).
        unsafe { p.cast::<*mut u8>().write(kept.retained) };
        kept.retained = black_box(p);
        bytes += RETAIN_BLOCK as u64;
    }
    black_box(bytes)
}

/// 100 MiB as 25,600 blocks of 4,096 bytes, each freed right after it is
/// written.
#[inline(never)]
pub fn churn_hundred_mib() -> u64 {
    let blocks = CHURN_BYTES as usize / CHURN_BLOCK;
    let mut bytes = 0;
    for i in 0..blocks {
        let p = alloc_block(CHURN_BLOCK, i as u8);
        free_block(p, CHURN_BLOCK);
        bytes += CHURN_BLOCK as u64;
    }
    black_box(bytes)
}

/// Three anonymous private 64 MiB mappings, one byte written in every
/// 4 KiB page, kept mapped until exit.
#[inline(never)]
pub fn map_three_regions(kept: &mut Kept) -> u64 {
    let mut bytes = 0;
    for slot in kept.regions.iter_mut() {
        // A second `map` phase maps three more; the first ones stay
        // mapped (and are simply no longer tracked).
        *slot = black_box(map_region(MAP_REGION));
        bytes += MAP_REGION as u64;
    }
    black_box(bytes)
}

fn block_layout(size: usize) -> Layout {
    Layout::from_size_align(size, align_of::<*mut u8>()).expect("block layout")
}

/// One block from the global allocator, every byte of it written.
#[inline(never)]
pub fn alloc_block(size: usize, fill: u8) -> *mut u8 {
    let layout = block_layout(size);
    // SAFETY: layout has a non-zero size.
    let p = unsafe { alloc(layout) };
    if p.is_null() {
        handle_alloc_error(layout);
    }
    // SAFETY: p is valid for `size` bytes.
    unsafe { ptr::write_bytes(p, fill | 1, size) };
    black_box(p)
}

/// Returns a block from `alloc_block` to the global allocator.
#[inline(never)]
pub fn free_block(p: *mut u8, size: usize) {
    // SAFETY: p came from alloc_block(size, _) and is freed once.
    unsafe { dealloc(black_box(p), block_layout(size)) };
}

/// An anonymous private mapping of `size` bytes, one byte written in
/// every page. Transparent huge pages are declined for it, so each 4 KiB
/// page is its own first-touch fault, as on a host with THP off.
#[inline(never)]
pub fn map_region(size: usize) -> *mut u8 {
    // SAFETY: a fresh anonymous mapping; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        panic!("mmap {size} bytes: {}", std::io::Error::last_os_error());
    }
    // SAFETY: p..p+size is the mapping just made. Failure only means the
    // kernel has no THP, which is what is asked for anyway.
    unsafe { libc::madvise(p, size, libc::MADV_NOHUGEPAGE) };
    let p = p.cast::<u8>();
    let mut off = 0;
    while off < size {
        // SAFETY: off < size, inside the mapping, which is writable.
        unsafe { ptr::write_volatile(p.add(off), 1) };
        off += PAGE;
    }
    black_box(p)
}
