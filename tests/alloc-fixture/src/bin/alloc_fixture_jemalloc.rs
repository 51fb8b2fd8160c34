//! The allocation workload under a statically linked jemalloc, whose
//! symbols carry the `_rjem_` prefix (`_rjem_malloc`, `_rjem_sdallocx`, …).
//! Protocol: see the crate documentation.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    // black_box keeps this a real call, not a tail jump, so `main` is a
    // frame of its own on the stacks the profiler sees.
    std::hint::black_box(pipelens_alloc_fixture::fixture_main("jemalloc"))
}
