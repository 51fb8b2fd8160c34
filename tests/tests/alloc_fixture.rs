//! The allocation fixtures do what their `done` line says, so the memory
//! tests can take it as ground truth: the line is checked against what
//! the fixture really did, as seen from outside it (valgrind's count of
//! allocator calls, the resident set). No root and no probes needed.

use std::process::Command;

use pipelens_tests::{
    TempDir,
    memory::{Fixture, build_noalloc, fixture_bin, malloc_loop, stripped_copy, vm_rss_bytes},
};

const MIB: u64 = 1024 * 1024;

/// Runs all three phases and checks the `done` numbers and the RSS growth.
fn check_workload(bin: &str, allocator: &str) {
    let f = Fixture::spawn(&fixture_bin(bin), &["--phases", "retain,churn,map"]);
    let before = vm_rss_bytes(f.pid());
    f.go();
    let done = f.wait_done();
    let after = vm_rss_bytes(f.pid());

    assert_eq!(done["allocator"], allocator, "{done}");
    assert_eq!(done["pid"], f.pid(), "{done}");
    assert_eq!(
        done["phases"],
        serde_json::json!(["retain", "churn", "map"])
    );
    assert_eq!(done["retain_bytes"], 10 * MIB, "{done}");
    assert_eq!(done["retain_blocks"], 10_240, "{done}");
    assert_eq!(done["retain_block_size"], 1024, "{done}");
    assert_eq!(done["churn_bytes"], 100 * MIB, "{done}");
    assert_eq!(done["churn_blocks"], 25_600, "{done}");
    assert_eq!(done["churn_block_size"], 4096, "{done}");
    assert_eq!(done["map_bytes"], 192 * MIB, "{done}");
    assert_eq!(done["map_regions"], 3, "{done}");
    assert_eq!(done["map_pages"], 3 * 64 * MIB / 4096, "{done}");
    assert_eq!(done["module"], "pipelens_alloc_fixture::workload");
    assert_eq!(done["functions"]["retain"], "retain_ten_mib");
    assert_eq!(done["functions"]["churn"], "churn_hundred_mib");
    assert_eq!(done["functions"]["map"], "map_three_regions");

    // Retained blocks and mapped pages are all resident until exit.
    let grown = after.saturating_sub(before);
    assert!(
        grown >= (10 + 192) * MIB,
        "{bin}: RSS grew by {} KiB only ({before} -> {after} bytes)",
        grown / 1024
    );
    f.finish();
}

/// `valgrind`'s own count of the allocator calls the system fixture makes
/// is the `done` line's, give or take the Rust runtime's few dozen.
#[test]
fn valgrind_counts_the_calls_and_bytes_done_reports() {
    let bin = fixture_bin("alloc-fixture");
    let out = match Command::new("valgrind")
        .args(["--tool=memcheck", "--leak-check=no"])
        .arg(&bin)
        .args(["--phases", "retain,churn", "--no-wait", "--exit-when-done"])
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "valgrind is not on PATH: `cargo xtask setup` installs it"
            );
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "skipping test - valgrind is not on PATH");
            return;
        }
        Err(e) => panic!("valgrind: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    let done: serde_json::Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("done "))
        .map(|j| serde_json::from_str(j).expect("done is JSON"))
        .unwrap_or_else(|| panic!("no done line:\n{stdout}"));
    // "total heap usage: 35,872 allocs, 25,631 frees, 115,348,690 bytes allocated"
    let usage = stderr
        .lines()
        .find_map(|l| l.split_once("total heap usage: ").map(|(_, u)| u))
        .unwrap_or_else(|| panic!("no heap summary:\n{stderr}"));
    let numbers: Vec<u64> = usage
        .split(|c: char| !c.is_ascii_digit() && c != ',')
        .filter(|w| !w.is_empty() && *w != ",")
        .map(|w| w.replace(',', "").parse().expect("number"))
        .collect();
    let [allocs, frees, bytes] = numbers[..] else {
        panic!("heap summary `{usage}`")
    };
    let n = |key: &str| {
        done[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}: {done}"))
    };
    let calls = n("retain_blocks") + n("churn_blocks");
    let allocated = n("retain_bytes") + n("churn_bytes");
    assert!(
        (calls..calls + 256).contains(&allocs),
        "valgrind saw {allocs} allocations, done says {calls}"
    );
    assert!(
        frees >= n("churn_blocks"),
        "valgrind saw {frees} frees, the churn alone frees {}",
        n("churn_blocks")
    );
    assert!(
        (allocated..allocated + 64 * 1024).contains(&bytes),
        "valgrind saw {bytes} bytes allocated, done says {allocated}"
    );
}

#[test]
fn system_fixture_does_what_done_says() {
    check_workload("alloc-fixture", "system");
}

#[test]
fn jemalloc_fixture_does_what_done_says() {
    check_workload("alloc-fixture-jemalloc", "jemalloc");
}

#[test]
fn fixture_repeats_churn_and_can_exit_when_done() {
    let f = Fixture::spawn(
        &fixture_bin("alloc-fixture"),
        &[
            "--phases",
            "churn",
            "--repeat",
            "3",
            "--no-wait",
            "--exit-when-done",
        ],
    );
    let done = f.wait_done();
    assert_eq!(done["churn_bytes"], 300 * MIB, "{done}");
    assert_eq!(done["churn_blocks"], 3 * 25_600, "{done}");
    assert_eq!(done["retain_bytes"], 0, "{done}");
    assert_eq!(done["map_bytes"], 0, "{done}");
    f.finish();
}

fn symbols(bin: &std::path::Path) -> String {
    let out = Command::new("nm")
        .arg("-C")
        .arg(bin)
        .output()
        .expect("run nm");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn fixtures_carry_the_symbols_the_profiler_resolves() {
    for bin in ["alloc-fixture", "alloc-fixture-jemalloc"] {
        let syms = symbols(&fixture_bin(bin));
        for f in [
            "run_phases",
            "retain_ten_mib",
            "churn_hundred_mib",
            "map_three_regions",
            "alloc_block",
        ] {
            let want = format!("pipelens_alloc_fixture::workload::{f}");
            assert!(syms.contains(&want), "{bin} has no symbol {want}");
        }
    }
    assert!(symbols(&fixture_bin("alloc-fixture-jemalloc")).contains(" _rjem_malloc\n"));
    assert!(!symbols(&fixture_bin("alloc-fixture")).contains("_rjem_"));

    let dir = TempDir::new("alloc-fixture");
    let stripped = stripped_copy(&fixture_bin("alloc-fixture"), &dir.path);
    assert!(!symbols(&stripped).contains("retain_ten_mib"));
    let f = Fixture::spawn(&stripped, &["--phases", "retain", "--no-wait"]);
    assert_eq!(f.wait_done()["retain_bytes"], 10 * MIB);
    f.finish();
}

#[test]
fn malloc_loop_reports_a_time_per_iteration() {
    for args in [
        &["--iterations", "100000"][..],
        &["--iterations", "1000", "--size", "4096", "--wait"],
        &["--seconds", "0.1"],
    ] {
        let ns = malloc_loop(args);
        assert!(ns.is_finite() && ns > 0.0, "malloc-loop {args:?}: {ns}");
    }
}

#[test]
fn noalloc_says_ready_and_sleeps() {
    let dir = TempDir::new("noalloc");
    let bin = build_noalloc(&dir.path);
    let f = Fixture::spawn(&bin, &[]);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", f.pid())).expect("maps");
    assert!(
        !maps.contains(".so"),
        "noalloc maps a shared object:\n{maps}"
    );
    std::thread::sleep(std::time::Duration::from_millis(100));
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", f.pid())).expect("stat");
    assert!(stat.contains(") S "), "noalloc is not asleep: {stat}");
    drop(f); // kills it
}
