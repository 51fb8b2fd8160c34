//! The allocation workload under the system allocator (glibc malloc).
//! Protocol: see the crate documentation.

fn main() -> std::process::ExitCode {
    // black_box keeps this a real call, not a tail jump, so `main` is a
    // frame of its own on the stacks the profiler sees.
    std::hint::black_box(pipelens_alloc_fixture::fixture_main("system"))
}
