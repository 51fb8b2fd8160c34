//! A malloc-bound loop for the overhead benchmarks: `libc::malloc(SIZE)`
//! then `libc::free`, straight into glibc whatever Rust's allocator is.
//!
//! ```text
//! malloc-loop [--iterations N | --seconds S] [--size BYTES] [--wait]
//!
//! stdout: ready <pid>            only with --wait, which then reads a
//! stdin:  go                     `go` line before starting
//! stdout: ns_per_iter <float>    mean wall time of one malloc + free
//!         iterations <n>         how many were done
//! ```
//!
//! `--iterations` defaults to 5,000,000; `--seconds` loops until S seconds
//! have elapsed instead, reading the clock every 4,096 iterations.

use std::{
    hint::black_box,
    process::ExitCode,
    time::{Duration, Instant},
};

use pipelens_alloc_fixture::{await_go, say};

const USAGE: &str = "usage: malloc-loop [--iterations N | --seconds S] [--size BYTES] [--wait]";
const CLOCK_EVERY: u64 = 4096;

/// `n` rounds of malloc(size) + free.
#[inline(never)]
fn malloc_free_loop(n: u64, size: usize) {
    for _ in 0..n {
        malloc_free(size);
    }
}

#[inline(always)]
fn malloc_free(size: usize) {
    // SAFETY: malloc has no preconditions; free gets what malloc returned
    // (null is allowed).
    unsafe {
        let p = black_box(libc::malloc(black_box(size)));
        libc::free(p);
    }
}

/// Rounds of malloc(size) + free until `limit` has elapsed; returns how
/// many were done.
#[inline(never)]
fn malloc_free_for(limit: Duration, size: usize) -> u64 {
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < limit {
        malloc_free_loop(CLOCK_EVERY, size);
        n += CLOCK_EVERY;
    }
    n
}

fn main() -> ExitCode {
    let mut iterations: u64 = 5_000_000;
    let mut seconds: Option<f64> = None;
    let mut size: usize = 64;
    let mut wait = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let parsed = match arg.as_str() {
            "--iterations" => args
                .next()
                .and_then(|v| v.parse().ok())
                .map(|v| iterations = v),
            "--seconds" => args
                .next()
                .and_then(|v| v.parse().ok())
                .filter(|s: &f64| s.is_finite() && *s > 0.0)
                .map(|v| seconds = Some(v)),
            "--size" => args.next().and_then(|v| v.parse().ok()).map(|v| size = v),
            "--wait" => {
                wait = true;
                Some(())
            }
            _ => None,
        };
        if parsed.is_none() {
            eprintln!("bad argument `{arg}`\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    if wait {
        say(&format!("ready {}", std::process::id()));
        if let Err(code) = await_go() {
            return code;
        }
    }
    let start = Instant::now();
    let done = match seconds {
        Some(s) => malloc_free_for(Duration::from_secs_f64(s), size),
        None => {
            malloc_free_loop(iterations, size);
            iterations
        }
    };
    let elapsed = start.elapsed();
    let ns = elapsed.as_nanos() as f64 / done.max(1) as f64;
    say(&format!("ns_per_iter {ns:.3}"));
    say(&format!("iterations {done}"));
    ExitCode::SUCCESS
}
