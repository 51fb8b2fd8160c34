//! Probe tests of `pipelens memory` against the allocation fixture, whose
//! functions allocate, retain, churn and map known sizes (ground truth it
//! prints itself), built without frame pointers.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use pipelens_tests::{
    TempDir,
    child::Owned,
    memory::{Fixture, build_forwards, build_noalloc, fixture_bin, stripped_copy},
    patience, pipelens_bin, probes_available,
};
use serde_json::Value;

const MIB: f64 = 1024.0 * 1024.0;

/// A running `pipelens memory`, attached (its "profiling" line seen).
struct Profiler {
    process: Owned,
    output: Output,
}

impl Profiler {
    fn start(pid: u32, args: &[&str]) -> Profiler {
        let dir = TempDir::new("memory");
        let out = dir.path.join("profile.json");
        // SIGINT on drop: a failed test leaves no profiler attached.
        let mut process = Owned::spawn(
            "pipelens memory",
            Command::new(pipelens_bin())
                .args(["memory", "--pid", &pid.to_string(), "--duration", "120"])
                .args(args)
                .args(["--format", "json", "-o"])
                .arg(&out)
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
            libc::SIGINT,
        );
        let (tx, rx) = mpsc::channel();
        let err = process.child_mut().stderr.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("pipelens: {line}");
                let _ = tx.send(line);
            }
        });
        let profiler = Profiler {
            process,
            output: Output {
                stderr: rx,
                out,
                _dir: dir,
            },
        };
        profiler.wait_line("profiling ");
        profiler
    }

    fn wait_line(&self, needle: &str) -> String {
        loop {
            match self.output.stderr.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("pipelens memory never said `{needle}`: {e}"),
            }
        }
    }

    /// Stops the profile (SIGINT) and reads what it wrote.
    fn finish(self) -> (Value, Vec<String>) {
        let status = self
            .process
            .stop(libc::SIGINT, patience(Duration::from_secs(120)));
        self.output.read(status)
    }

    /// Waits for the profile to end by itself and reads what it wrote.
    fn wait(self) -> (Value, Vec<String>) {
        let status = self.process.wait();
        self.output.read(status)
    }
}

/// Where a `pipelens memory` run writes: its stderr lines and its profile.
struct Output {
    stderr: mpsc::Receiver<String>,
    out: std::path::PathBuf,
    _dir: TempDir,
}

impl Output {
    /// The profile a finished run wrote, and what it said.
    fn read(self, status: std::process::ExitStatus) -> (Value, Vec<String>) {
        let lines: Vec<String> = self.stderr.try_iter().collect();
        assert!(
            status.success(),
            "pipelens memory failed: {status} {lines:?}"
        );
        let text = std::fs::read_to_string(&self.out).expect("profile written");
        (serde_json::from_str(&text).expect("json profile"), lines)
    }
}

fn column(profile: &Value, name: &str) -> usize {
    profile["value_types"]
        .as_array()
        .unwrap()
        .iter()
        .position(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no column {name}"))
}

/// The stacks with a frame whose name ends with `function`.
fn stacks_through<'a>(profile: &'a Value, function: &'a str) -> impl Iterator<Item = &'a Value> {
    profile["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(move |s| {
            s["frames"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["name"].as_str().unwrap_or("").ends_with(function))
        })
}

/// Inclusive value of `function`.
fn inclusive(profile: &Value, function: &str, col: &str) -> f64 {
    let c = column(profile, col);
    stacks_through(profile, function)
        .map(|s| s["values"][c].as_f64().unwrap())
        .sum()
}

fn within(actual: f64, truth: f64, tolerance: f64, what: &str) {
    let err = (actual - truth).abs() / truth;
    assert!(
        err <= tolerance,
        "{what}: {:.2} MiB, truth {:.2} MiB (off by {:.1} %, allowed {:.0} %)",
        actual / MIB,
        truth / MIB,
        err * 100.0,
        tolerance * 100.0
    );
}

/// Names of the frames of the heaviest stack through `function`,
/// innermost first.
fn heaviest_stack(profile: &Value, function: &str, col: &str) -> Vec<String> {
    let c = column(profile, col);
    let stack = stacks_through(profile, function)
        .max_by_key(|s| s["values"][c].as_i64().unwrap())
        .unwrap_or_else(|| panic!("no stack through {function}"));
    stack["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect()
}

/// `names` holds `chain` in this order (innermost first), each a suffix.
fn assert_chain(names: &[String], chain: &[&str]) {
    let mut at = 0;
    for want in chain {
        match names[at..].iter().position(|n| n.ends_with(want)) {
            Some(i) => at += i + 1,
            None => panic!("stack {names:#?} lacks {want} (in order {chain:?})"),
        }
    }
}

/// Profiles the fixture `bin` through `phases` in `mode`, stopped once
/// the fixture is done (and still holds what it retains): (profile, truth).
/// One sample per 8 KiB on average: over a thousand samples per function,
/// so the estimates land within a few percent.
fn profile_fixture(bin: &std::path::Path, phases: &str, mode: &str) -> (Value, Value) {
    let fixture = Fixture::spawn(bin, &["--phases", phases]);
    let profiler = Profiler::start(fixture.pid(), &["--mode", mode, "--sample-bytes", "8192"]);
    fixture.go();
    let truth = fixture.wait_done();
    let (profile, _) = profiler.finish();
    fixture.finish();
    (profile, truth)
}

fn allocs_profile(bin: &str) -> (Value, Value) {
    profile_fixture(&fixture_bin(bin), "retain,churn", "allocs")
}

fn check_allocs(profile: &Value, truth: &Value) {
    let retain = truth["retain_bytes"].as_f64().unwrap();
    let churn = truth["churn_bytes"].as_f64().unwrap();
    within(
        inclusive(profile, "retain_ten_mib", "alloc_space"),
        retain,
        0.10,
        "allocated in retain_ten_mib",
    );
    within(
        inclusive(profile, "churn_hundred_mib", "alloc_space"),
        churn,
        0.10,
        "allocated in churn_hundred_mib",
    );
    within(
        inclusive(profile, "retain_ten_mib", "inuse_space"),
        retain,
        0.10,
        "in use from retain_ten_mib",
    );
    let churn_in_use = inclusive(profile, "churn_hundred_mib", "inuse_space");
    assert!(
        churn_in_use < 0.01 * churn,
        "churn_hundred_mib frees everything, yet {:.2} MiB in use",
        churn_in_use / MIB
    );
    // Whole stacks: the fixture's own chain under the allocator.
    let stack = heaviest_stack(profile, "retain_ten_mib", "alloc_space");
    assert!(stack.len() >= 3, "{stack:?}");
    assert_chain(
        &stack,
        &[
            "alloc_block",
            "retain_ten_mib",
            "run_phases",
            "fixture_main",
        ],
    );
}

/// Allocation mode on `bin`, whose allocator is `family`.
fn allocs_mode_is_right(test: &str, bin: &str, family: &str) {
    if !probes_available(test) {
        return;
    }
    let (profile, truth) = allocs_profile(bin);
    check_allocs(&profile, &truth);
    let notes = profile["notes"].to_string();
    assert!(notes.contains(family), "{notes}");
}

#[test]
fn allocs_mode_names_functions_with_true_sizes() {
    allocs_mode_is_right(
        "allocs_mode_names_functions_with_true_sizes",
        "alloc-fixture",
        "glibc",
    );
}

#[test]
fn allocs_mode_with_jemalloc_gives_the_same_answer() {
    allocs_mode_is_right(
        "allocs_mode_with_jemalloc_gives_the_same_answer",
        "alloc-fixture-jemalloc",
        "jemalloc",
    );
}

/// glibc's `realloc(NULL, n)` and small-alignment `posix_memalign` return
/// `malloc(n)`: with every call sampled, each function's bytes are exact,
/// not doubled.
#[test]
fn calls_glibc_forwards_to_malloc_count_once() {
    if !probes_available("calls_glibc_forwards_to_malloc_count_once") {
        return;
    }
    let dir = TempDir::new("forwards");
    let bin = build_forwards(&dir.path);
    let fixture = Fixture::spawn(&bin, &[]);
    let profiler = Profiler::start(fixture.pid(), &["--mode", "allocs", "--sample-bytes", "0"]);
    fixture.go();
    let truth = fixture.wait_done();
    let (profile, _) = profiler.finish();
    fixture.finish();
    let each = truth["each_bytes"].as_f64().unwrap();
    for function in ["grow_from_null", "align_like_malloc", "align_to_page"] {
        assert_eq!(
            inclusive(&profile, function, "alloc_space"),
            each,
            "allocated in {function}"
        );
        assert_eq!(
            inclusive(&profile, function, "inuse_space"),
            each,
            "in use from {function}"
        );
    }
}

#[test]
fn growth_mode_attributes_touched_mappings_and_retained_heap() {
    if !probes_available("growth_mode_attributes_touched_mappings_and_retained_heap") {
        return;
    }
    let (profile, truth) =
        profile_fixture(&fixture_bin("alloc-fixture"), "retain,churn,map", "growth");
    let mapped = truth["map_bytes"].as_f64().unwrap();
    within(
        inclusive(&profile, "map_three_regions", "growth_space"),
        mapped,
        0.05,
        "resident growth in map_three_regions",
    );
    within(
        inclusive(&profile, "map_three_regions", "mapped_space"),
        mapped,
        0.10,
        "mapped by map_three_regions",
    );
    // 10 MiB of 1 KiB blocks, each with its allocator header.
    within(
        inclusive(&profile, "retain_ten_mib", "growth_space"),
        truth["retain_bytes"].as_f64().unwrap(),
        0.15,
        "resident growth in retain_ten_mib",
    );
    // Churn reuses the same block: it hardly grows anything.
    let churn = inclusive(&profile, "churn_hundred_mib", "growth_space");
    assert!(churn < 2.0 * MIB, "churn grew {:.2} MiB", churn / MIB);
    let stack = heaviest_stack(&profile, "map_three_regions", "growth_space");
    assert_chain(&stack, &["map_three_regions", "run_phases", "fixture_main"]);
}

#[test]
fn other_processes_of_the_same_libc_do_not_trap() {
    if !probes_available("other_processes_of_the_same_libc_do_not_trap") {
        return;
    }
    let profiled = Fixture::spawn(&fixture_bin("alloc-fixture"), &["--phases", "churn"]);
    let bystander = Fixture::spawn(&fixture_bin("alloc-fixture"), &["--phases", "churn"]);
    let malloc = libc_malloc_address(profiled.pid());
    let before = first_byte(bystander.pid(), libc_malloc_address(bystander.pid()));
    let profiler = Profiler::start(profiled.pid(), &["--mode", "allocs", "--sample-bytes", "0"]);
    // The uprobe is a breakpoint (0xcc) written into the profiled
    // process's copy of malloc's page, and only there.
    assert_eq!(
        first_byte(profiled.pid(), malloc),
        0xcc,
        "profiled malloc not probed"
    );
    let during = first_byte(bystander.pid(), libc_malloc_address(bystander.pid()));
    assert_eq!(during, before, "the bystander's malloc was patched");
    assert_ne!(during, 0xcc);
    // Informational: a malloc loop beside the profile, and without it.
    let traced = pipelens_tests::memory::malloc_loop(&["--iterations", "2000000"]);
    profiled.go();
    profiled.wait_done();
    let (_, _) = profiler.finish();
    let untraced = pipelens_tests::memory::malloc_loop(&["--iterations", "2000000"]);
    eprintln!("bystander malloc loop: {traced:.1} ns/iter while profiling, {untraced:.1} without");
    assert_ne!(
        first_byte(profiled.pid(), malloc),
        0xcc,
        "breakpoint left behind"
    );
    bystander.go();
    bystander.wait_done();
    profiled.finish();
    bystander.finish();
}

/// Address of libc's `malloc` in `pid`, from its maps and libc's symbols.
fn libc_malloc_address(pid: u32) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let (base, path) = maps
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = *f.get(5)?;
            (path.contains("/libc.so") && f[2] == "00000000").then(|| {
                let start = u64::from_str_radix(f[0].split('-').next().unwrap(), 16).unwrap();
                (start, path.to_string())
            })
        })
        .expect("libc mapped");
    let nm = Command::new("nm")
        .args(["-D", "--defined-only", &path])
        .output()
        .expect("nm");
    let text = String::from_utf8_lossy(&nm.stdout);
    let value = text
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[2].split('@').next() == Some("malloc"))
                .then(|| u64::from_str_radix(f[0], 16).unwrap())
        })
        .expect("malloc in libc");
    base + value
}

fn first_byte(pid: u32, addr: u64) -> u8 {
    use std::os::unix::fs::FileExt as _;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut b = [0u8; 1];
    mem.read_exact_at(&mut b, addr).unwrap();
    b[0]
}

#[test]
fn a_process_that_exits_mid_profile_still_gets_its_profile() {
    if !probes_available("a_process_that_exits_mid_profile_still_gets_its_profile") {
        return;
    }
    let fixture = Fixture::spawn(
        &fixture_bin("alloc-fixture"),
        &["--phases", "retain", "--exit-when-done"],
    );
    let profiler = Profiler::start(
        fixture.pid(),
        &["--mode", "allocs", "--sample-bytes", "8192"],
    );
    fixture.go();
    let truth = fixture.wait_done();
    let (profile, lines) = profiler.wait();
    assert!(
        lines.iter().any(|l| l.contains("exited")),
        "the exit is not said: {lines:?}"
    );
    assert!(profile["notes"].to_string().contains("exited"));
    within(
        inclusive(&profile, "retain_ten_mib", "alloc_space"),
        truth["retain_bytes"].as_f64().unwrap(),
        0.10,
        "allocated before the exit",
    );
}

#[test]
fn a_stripped_binary_gets_module_offsets() {
    if !probes_available("a_stripped_binary_gets_module_offsets") {
        return;
    }
    let dir = TempDir::new("stripped");
    let bin = stripped_copy(&fixture_bin("alloc-fixture"), &dir.path);
    let (profile, truth) = profile_fixture(&bin, "retain", "allocs");
    let name = bin.file_name().unwrap().to_str().unwrap().to_string();
    // No names from the stripped module, but module+offset frames whose
    // stacks still add up to what was allocated; libc is still named.
    let c = column(&profile, "alloc_space");
    let through_module: f64 = profile["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["frames"].as_array().unwrap().iter().any(|f| {
                f["name"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{name}+0x"))
            })
        })
        .map(|s| s["values"][c].as_f64().unwrap())
        .sum();
    within(
        through_module,
        truth["retain_bytes"].as_f64().unwrap(),
        0.15,
        "allocated through the stripped module",
    );
    assert!(!profile.to_string().contains("retain_ten_mib"));
    assert!(profile.to_string().contains("\"malloc\""));
}

#[test]
fn bad_targets_get_clear_errors() {
    if !probes_available("bad_targets_get_clear_errors") {
        return;
    }
    let run = |args: &[&str]| {
        let out = Command::new(pipelens_bin())
            .args(["memory", "--duration", "5"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--pid", "999999999"]);
    assert!(err.contains("does not exist"), "{err}");
    let dir = TempDir::new("noalloc");
    let mut noalloc = Command::new(build_noalloc(&dir.path))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(noalloc.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ready"), "{line}");
    let err = run(&["--pid", &noalloc.id().to_string(), "--mode", "allocs"]);
    let _ = noalloc.kill();
    let _ = noalloc.wait();
    assert!(err.contains("no allocator"), "{err}");
    let err = run(&["--pid", "1", "--value", "nope"]);
    assert!(err.contains("alloc_space"), "{err}");
}

/// `pipelens run`: growth sites of every target, and with
/// `--memory-allocs`, allocated and in-use bytes by site of `--pid`
/// targets, as Prometheus series.
#[test]
fn run_exports_top_sites_as_metrics() {
    if !probes_available("run_exports_top_sites_as_metrics") {
        return;
    }
    let fixture = Fixture::spawn(
        &fixture_bin("alloc-fixture"),
        &["--phases", "retain,churn,map"],
    );
    let pid = fixture.pid().to_string();
    let agent = pipelens_tests::Agent::start(&[
        "--pid",
        &pid,
        "--collectors",
        "memory",
        "--memory-allocs",
        // One sample per 64 KiB: about 3,000 growth samples for the 192 MiB
        // mapped and 1,700 allocation samples. Four times more overflowed
        // the ring on a loaded machine (counted in events_lost, but then
        // the estimates fall short of the truth).
        "--memory-sample-bytes",
        "65536",
    ]);
    fixture.go();
    let truth = fixture.wait_done();
    let site = |f: &str| format!("pipelens_alloc_fixture::workload::{f}");
    let process = [("process", "alloc-fixture")];
    let truth_allocated =
        truth["retain_bytes"].as_f64().unwrap() + truth["churn_bytes"].as_f64().unwrap();
    // Samples the ring had no room for are counted, never silently lost:
    // each stood for `mean` bytes on average, so the estimates may fall
    // short of the truth by that much and no more. (On a loaded machine the
    // reader falls behind the fixture's burst of faults: see the issues.)
    let mean = 65536.0;
    let lost = |m: &pipelens_tests::Metrics| {
        m.sum("pipelens_events_lost_total", &[("collector", "memory")]) * mean
    };
    // Growth and allocation sites are published one after the other, so a
    // scrape may fall between them: wait for every series the test reads.
    let m = agent.wait_for(
        &format!("growth of map_region, allocations and use at alloc_block (truth {truth})"),
        Duration::from_secs(30),
        |m| {
            let at = |name: &str, f: &str| m.sum(name, &[process[0], ("site", &site(f))]);
            at("pipelens_memory_growth_bytes_total", "map_region") + lost(m)
                > 0.85 * truth["map_bytes"].as_f64().unwrap()
                && at("pipelens_memory_allocated_bytes_total", "alloc_block") + lost(m)
                    > 0.7 * truth_allocated
                && at("pipelens_memory_in_use_bytes", "alloc_block") > 0.0
        },
    );
    let lost = lost(&m);
    let accounted = |estimate: f64, truth: f64, tolerance: f64, what: &str| {
        assert!(
            estimate <= truth * (1.0 + tolerance) && estimate + lost >= truth * (1.0 - tolerance),
            "{what}: {:.2} MiB, truth {:.2} MiB, {:.2} MiB of samples lost (allowed {:.0} %)",
            estimate / MIB,
            truth / MIB,
            lost / MIB,
            tolerance * 100.0
        );
    };
    accounted(
        m.sum(
            "pipelens_memory_growth_bytes_total",
            &[process[0], ("site", &site("map_region"))],
        ),
        truth["map_bytes"].as_f64().unwrap(),
        // Up to 7 % of the region's faults are sometimes unwound to an
        // `[unknown]` frame instead of map_region (a known defect of the
        // fault-time unwind, tracked in the issues): the rest must land.
        0.15,
        "growth at map_region",
    );
    let allocated = m.sum(
        "pipelens_memory_allocated_bytes_total",
        &[process[0], ("site", &site("alloc_block"))],
    );
    accounted(allocated, truth_allocated, 0.30, "allocated at alloc_block");
    let in_use = m.sum(
        "pipelens_memory_in_use_bytes",
        &[process[0], ("site", &site("alloc_block"))],
    );
    pipelens_tests::promtool_accepts(&agent.metrics_text());
    m.assert_identity_labels(&["pipelens_memory_"]);
    assert!(
        in_use > 2.0 * MIB && in_use < 30.0 * MIB,
        "in use at alloc_block: {:.1} MiB, about 10 expected",
        in_use / MIB
    );
    // The summary names the same top sites.
    let summary = agent.stop();
    let entry = summary["memory"]
        .as_array()
        .expect("memory summary")
        .iter()
        .find(|e| e["pid"].as_u64() == Some(fixture.pid() as u64))
        .expect("the fixture in the memory summary")
        .clone();
    assert_eq!(entry["growth"][0]["site"], site("map_region"), "{entry}");
    assert_eq!(
        entry["allocated"][0]["site"],
        site("alloc_block"),
        "{entry}"
    );
    fixture.finish();
}

/// The fork storm: `pipelens run --comm postgres --collectors
/// memory` while 800 connections each fork a new PostgreSQL backend that
/// the collector profiles while it lives. Each profile holds a view of the
/// backend's modules, not a copy (unwind sections and symbols are shared
/// per file): the agent's peak RSS stays under the README's 128 MiB bound
/// with nothing shed (it reached 1.2 GB before), the backends' profiles are
/// let go as they exit, and postgres growth is still published by site.
#[test]
fn a_forking_server_keeps_the_agent_within_its_memory_bound() {
    if !probes_available("a_forking_server_keeps_the_agent_within_its_memory_bound") {
        return;
    }
    let pg = pipelens_tests::pg::TestPostgres::start();
    pg.pgbench(false, &["-i", "-s", "1", "-q"]);
    let agent = pipelens_tests::Agent::start(&["--comm", "postgres", "--collectors", "memory"]);
    let idle = agent.peak_resident_bytes();
    let connections = fork_storm(&pg);
    let profiled = |m: &pipelens_tests::Metrics| m.sum("pipelens_profiler_processes", &[]);
    let m = agent.wait_for(
        "the backends' profiles let go, postgres growth published",
        Duration::from_secs(30),
        // The postmaster and its few background processes stay.
        |m| profiled(m) <= 12.0 && postgres_growth(m) > 0.0,
    );
    let peak = agent.peak_resident_bytes();
    eprintln!(
        "agent RSS: {:.1} MiB idle, {:.1} MiB peak over {connections} backends",
        idle as f64 / MIB,
        peak as f64 / MIB
    );
    assert!(
        peak < 128 << 20,
        "agent peak RSS {:.1} MiB over {connections} backends",
        peak as f64 / MIB
    );
    assert_eq!(
        m.sum("pipelens_shed_total", &[("collector", "memory")]),
        0.0,
        "within the bound by sharing, not by shedding:\n{}",
        m.dump()
    );
    let grown = m.sum(
        "pipelens_memory_growth_bytes_total",
        &[("process", "postgres")],
    );
    assert!(grown > 0.0, "postgres growth published:\n{}", m.dump());
    let summary = agent.stop();
    let backends = summary["memory"]
        .as_array()
        .expect("memory summary")
        .iter()
        .filter(|p| {
            p["process"] == "postgres" && p["growth"].as_array().is_some_and(|g| !g.is_empty())
        })
        .count();
    assert!(
        backends > connections / 4,
        "{backends} of {connections} backends profiled (each must be, while it lives)"
    );
    // The kernel's RSS counters are per-CPU and summed approximately.
    let reported = summary["agent"]["peak_resident_bytes"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        reported + (1 << 20) >= peak,
        "summary: {reported}, VmHWM {peak}"
    );
}

/// `--memory-limit` is kept by shedding, never by growing: the same fork
/// storm under the smallest limit (64 MiB, where the storm would take the
/// agent to about 70 MiB). The agent's peak RSS stays below the limit, what
/// it shed is counted, and it still publishes postgres growth.
#[test]
fn the_memory_limit_is_kept_by_shedding() {
    if !probes_available("the_memory_limit_is_kept_by_shedding") {
        return;
    }
    let pg = pipelens_tests::pg::TestPostgres::start();
    pg.pgbench(false, &["-i", "-s", "1", "-q"]);
    let agent = pipelens_tests::Agent::start(&[
        "--comm",
        "postgres",
        "--collectors",
        "memory",
        "--memory-limit",
        "64MiB",
    ]);
    let m = agent.metrics();
    assert_eq!(
        m.sum("pipelens_agent_memory_limit_bytes", &[]),
        (64 << 20) as f64
    );
    assert_eq!(
        m.sum("pipelens_shed_total", &[]),
        0.0,
        "nothing shed at rest"
    );
    assert_eq!(
        m.sum("pipelens_agent_memory_pressure", &[]),
        0.0,
        "no pressure at rest: {:.1} MiB",
        m.sum("pipelens_agent_resident_bytes", &[]) / MIB
    );
    fork_storm(&pg);
    let m = agent.wait_for(
        "profiles shed under pressure",
        Duration::from_secs(30),
        |m| {
            m.sum("pipelens_shed_total", &[("collector", "memory")]) > 0.0
                && postgres_growth(m) > 0.0
        },
    );
    let peak = agent.peak_resident_bytes();
    eprintln!(
        "agent peak RSS {:.1} MiB under a 64 MiB limit; shed {}",
        peak as f64 / MIB,
        m.sum("pipelens_shed_total", &[])
    );
    assert!(
        peak < 64 << 20,
        "agent peak RSS {:.1} MiB over a 64 MiB limit:\n{}",
        peak as f64 / MIB,
        m.dump()
    );
    assert!(
        m.sum(
            "pipelens_profiler_samples_dropped_total",
            &[("reason", "pressure")]
        ) > 0.0,
        "{}",
        m.dump()
    );
    agent.stop();
}

/// The ids of the BPF programs loaded now (`bpftool prog show`).
fn loaded_programs() -> std::collections::BTreeSet<u64> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let progs: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    progs
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// The agent SIGKILLed under load (every collector, allocator uprobes in a
/// target calling malloc, pgbench through the queries collector): it had no
/// chance to detach, yet nothing of it stays in the kernel (its programs
/// are gone, the breakpoint in the target's malloc is removed), the traced
/// programs run on unharmed, and the pins it left are removed by the next
/// agent to start.
#[test]
fn an_agent_killed_under_load_leaves_nothing_behind() {
    if !probes_available("an_agent_killed_under_load_leaves_nothing_behind") {
        return;
    }
    if !pipelens_tests::pg::is_available() {
        panic!("PostgreSQL is not installed: cargo xtask setup installs it");
    }
    let before = loaded_programs();
    let pg = pipelens_tests::pg::TestPostgres::start();
    pg.pgbench(false, &["-i", "-s", "1", "-q"]);
    let fixture = Fixture::spawn(&fixture_bin("alloc-fixture"), &["--phases", "churn"]);
    let malloc = libc_malloc_address(fixture.pid());
    let pid = fixture.pid().to_string();
    let agent = pipelens_tests::Agent::start(&[
        "--pid",
        &pid,
        "--comm",
        "pgbench",
        "--comm",
        "postgres",
        "--memory-allocs",
    ]);
    let agent_pid = agent.pid();
    let pins = std::path::Path::new("/sys/fs/bpf/pipelens").join(agent_pid.to_string());
    assert!(pins.exists(), "{} pinned", pins.display());
    let ours: Vec<u64> = loaded_programs().difference(&before).copied().collect();
    assert!(!ours.is_empty(), "the agent's programs are listed");
    assert_eq!(first_byte(fixture.pid(), malloc), 0xcc, "malloc probed");
    // Load: the fixture's malloc churn under uprobes, pgbench's queries.
    fixture.go();
    let bench = {
        let mut cmd = pg.pgbench_command(false, &["-S", "-c", "2", "-j", "2", "-T", "4"]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.spawn().expect("pgbench")
    };
    agent.wait_for("queries counted", Duration::from_secs(20), |m| {
        m.sum(
            "pipelens_db_query_duration_seconds_count",
            &[("process", "pgbench")],
        ) > 100.0
    });
    agent.kill();

    // Nothing attached is left: the programs go with their last descriptor.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let left = loop {
        let now = loaded_programs();
        let left: Vec<u64> = ours.iter().copied().filter(|id| now.contains(id)).collect();
        if left.is_empty() || std::time::Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        left.is_empty(),
        "programs {left:?} of the killed agent still loaded"
    );
    assert_ne!(
        first_byte(fixture.pid(), malloc),
        0xcc,
        "breakpoint left in malloc"
    );
    // The traced programs ran on unharmed.
    let out = bench.wait_with_output().expect("pgbench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let truth = fixture.wait_done();
    assert!(
        truth["churn_bytes"].as_f64().unwrap_or(0.0) > 0.0,
        "{truth}"
    );
    fixture.finish();
    // Only the pins stay behind, and the next agent removes them.
    assert!(pins.exists(), "a SIGKILLed agent cannot remove its pins");
    let next = pipelens_tests::Agent::start(&["--comm", "pgbench", "--collectors", "connections"]);
    assert!(
        !pins.exists(),
        "{} left by the killed agent",
        pins.display()
    );
    next.stop();
}

/// 800 connections (150 under emulation) to `pg`, each a new backend
/// (`pgbench -C`: a new connection for every transaction); returns their
/// number.
fn fork_storm(pg: &pipelens_tests::pg::TestPostgres) -> usize {
    let connections = if pipelens_tests::emulated() { 150 } else { 800 };
    let per_client = (connections / 4).to_string();
    let out = pg.pgbench(
        false,
        &["-C", "-S", "-c", "4", "-j", "2", "-t", &per_client],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    connections
}

/// Growth published for `process="postgres"`, every site.
fn postgres_growth(m: &pipelens_tests::Metrics) -> f64 {
    m.sum(
        "pipelens_memory_growth_bytes_total",
        &[("process", "postgres")],
    )
}
