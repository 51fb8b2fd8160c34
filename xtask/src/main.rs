//! Project automation: `cargo xtask setup | build | run | test | fuzz | bench`.
//!
//! Everything a fresh Debian machine needs is installed by `setup`, which
//! every other command runs first; it is idempotent and fast when done.

mod bench;
mod demo;
mod fuzz;
mod matrix;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "pipelens project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything the build and the tests need (idempotent).
    Setup,
    /// Build the agent in release mode (kernel objects included).
    Build,
    /// The demo: a private PostgreSQL, the event pipeline, load, and the
    /// agent watching the pipeline, with a live summary. Ctrl-C stops it.
    Demo {
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
        /// Where the agent serves /metrics and /healthz.
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: String,
        /// Seconds between summaries.
        #[arg(long, default_value_t = 5)]
        interval: u64,
    },
    /// Build, then run `pipelens ARGS` with the privileges it needs.
    Run {
        /// Arguments for pipelens, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Everything: formatting, clippy (host and kernel crates), unit tests,
    /// a bounded run of every fuzz target, the root-only probe tests one
    /// at a time, and the kernel matrix.
    Test {
        /// Skip the kernel matrix (for a quick local run; CI never does).
        #[arg(long)]
        no_matrix: bool,
    },
    /// The fuzz targets of `agent/fuzz` (all, or one), seeded from the
    /// recorded captures; a crash fails with its reproducer's path.
    Fuzz {
        /// Only this target (`cargo fuzz list` in agent/ names them).
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = fuzz::TEST_SECONDS)]
        seconds: u64,
    },
    /// The kernel matrix alone: the agent and probe tests inside Debian's
    /// 5.10, 6.1 and 6.12 cloud kernels under qemu.
    Matrix {
        /// Only this kernel (repeatable): 5.10, 6.1, 6.12.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Guests booted at once (one vCPU each).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Only these probe-test binaries (repeatable): cli, connections,
        /// queries, websocket, memory.
        #[arg(long = "tests")]
        tests: Vec<String>,
    },
    /// Side-by-side benchmarks, with and without the agent.
    Bench {
        /// Which workload.
        #[arg(value_enum, default_value = "all")]
        workload: bench::Workload,
        /// Rounds per configuration (interleaved).
        #[arg(long, default_value_t = 7)]
        rounds: usize,
        /// Seconds per round.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Another pipelens binary (an earlier build) to run beside this
        /// one: every traced configuration gets a twin row run with it, in
        /// the same interleaved rounds (connections, queries, websocket).
        #[arg(long, value_name = "PATH")]
        baseline: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            build_release()
        }
        Task::Run { args } => {
            setup::run()?;
            build_release()?;
            run_agent(&args)
        }
        Task::Demo {
            duration,
            listen,
            interval,
        } => {
            setup::run()?;
            build_release()?;
            demo::run(demo::DemoArgs {
                duration,
                listen,
                interval,
            })
        }
        Task::Test { no_matrix } => {
            setup::run()?;
            if no_matrix && std::env::var("CI").as_deref() == Ok("true") {
                bail!("--no-matrix is for local runs: CI runs the whole suite");
            }
            test(!no_matrix)
        }
        Task::Fuzz { target, seconds } => {
            setup::run()?;
            fuzz::run(target.as_deref(), seconds)
        }
        Task::Matrix {
            kernels,
            jobs,
            tests,
        } => {
            setup::run()?;
            build_release()?;
            let mut tally = Tally::default();
            let r = matrix::run(
                &matrix::Options {
                    kernels,
                    tests,
                    jobs,
                },
                &mut tally,
            );
            println!("{}", tally.closing_line());
            r
        }
        Task::Bench {
            workload,
            rounds,
            seconds,
            baseline,
        } => {
            setup::run()?;
            build_release()?;
            bench::run(workload, rounds, seconds, baseline)
        }
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `cmd`, failing with its command line when it fails.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn build_release() -> anyhow::Result<()> {
    run_cmd(cargo().args([
        "build",
        "--release",
        "--workspace",
        "--exclude",
        "pipelens-ebpf",
        "--bins",
    ]))
}

fn run_agent(args: &[String]) -> anyhow::Result<()> {
    let bin = root().join("target/release/pipelens");
    let mut cmd = if is_root() {
        Command::new(&bin)
    } else {
        let mut c = Command::new("sudo");
        c.arg("-E").arg(&bin);
        c
    };
    cmd.args(args);
    run_cmd(&mut cmd)
}

/// The probe tests run a second time with the agent under exactly
/// `CAP_BPF`, `CAP_PERFMON`, `CAP_SYS_PTRACE` and `CAP_DAC_READ_SEARCH`.
const LEAST_PRIVILEGE_TESTS: &[&str] = &[
    "churn_ipv4",
    "refused_and_reset",
    "pgbench_counts_are_exact",
    "errors_by_sqlstate",
    "demo_pipeline_sessions_are_exact",
];

/// Host crates are linted together; the kernel crate for its own target.
fn test(with_matrix: bool) -> anyhow::Result<()> {
    run_cmd(cargo().args(["fmt", "--all", "--check"]))?;
    run_cmd(cargo().args(["fmt", "--manifest-path", "agent/fuzz/Cargo.toml", "--check"]))?;
    run_cmd(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "pipelens-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The fuzz crate is its own workspace (cargo-fuzz builds it with its
    // own flags); linted here with the workspace's target directory, whose
    // dependencies it shares.
    run_cmd(cargo().args([
        "clippy",
        "--manifest-path",
        "agent/fuzz/Cargo.toml",
        "--target-dir",
        "target",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run_cmd(cargo().env("RUSTC_BOOTSTRAP", "1").args([
        "clippy",
        "--package",
        "pipelens-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--bins",
        "--",
        "-D",
        "warnings",
    ]))?;
    build_release()?;
    let mut tally = Tally::default();
    // Unit tests (no privileges needed) in parallel.
    tally.run(cargo().args([
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "pipelens-ebpf",
        "--exclude",
        "pipelens-tests",
    ]))?;
    // Every parser and decoder under fuzzing, briefly: a crash fails here.
    if let Err(e) = fuzz::run(None, fuzz::TEST_SECONDS) {
        tally.failed = tally.failed.max(1);
        println!("{}", tally.closing_line());
        return Err(e);
    }
    // Probe tests share kernel state: one at a time, as root.
    let probe_tests = || {
        let mut c = if is_root() {
            cargo()
        } else {
            let mut c = Command::new("sudo");
            c.current_dir(root()).args([
                "-E",
                &std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()),
            ]);
            c
        };
        c.args(["test", "--release", "--package", "pipelens-tests"]);
        c
    };
    // Each probe test that skips (outside CI only) names itself here.
    let skipped = std::env::temp_dir().join(format!("pipelens-skipped-{}", std::process::id()));
    let _ = std::fs::remove_file(&skipped);
    let mut probe = probe_tests();
    probe.args(["--", "--test-threads=1"]);
    probe.env(pipelens_tests::SKIPPED_ENV, &skipped);
    tally.run_skipping(&mut probe, Some(&skipped))?;
    // Least privilege: the connections, queries and websocket tests that
    // cover each collector's hooks again, the agent holding exactly its
    // four capabilities, as root and as nobody.
    for mode in ["root", "user"] {
        let mut probe = probe_tests();
        probe.args([
            "--test",
            "connections",
            "--test",
            "queries",
            "--test",
            "websocket",
        ]);
        probe.args(["--", "--test-threads=1", "--exact"]);
        probe.args(LEAST_PRIVILEGE_TESTS);
        probe
            .env(pipelens_tests::SKIPPED_ENV, &skipped)
            .env(pipelens_tests::CAPS_ENV, mode);
        tally.run_skipping(&mut probe, Some(&skipped))?;
    }
    if with_matrix {
        let opts = matrix::Options {
            kernels: Vec::new(),
            tests: Vec::new(),
            jobs: 1,
        };
        if let Err(e) = matrix::run(&opts, &mut tally) {
            tally.failed = tally.failed.max(1);
            println!("{}", tally.closing_line());
            return Err(e);
        }
    }
    // One closing line for the whole run, whatever the last binary was.
    println!("{}", tally.closing_line());
    Ok(())
}

/// Adds up the `test result:` lines of every test binary of a run.
#[derive(Default)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    /// Probe tests that could not run here (libtest counted them passed).
    pub skipped: u64,
}

impl Tally {
    /// The run's closing line: `N passed, K failed`, then `, M skipped` —
    /// the order in which runners' closing lines are read (a skip after
    /// the failures), so `N passed, K failed` still matches at its start.
    pub fn closing_line(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }

    /// Moves the tests named in `file` (one a line, written by
    /// `pipelens_tests::probes_available`) from passed to skipped.
    fn skipped_from(&mut self, file: &Path) {
        let names = std::fs::read_to_string(file).unwrap_or_default();
        let _ = std::fs::remove_file(file);
        let n = names.lines().filter(|l| !l.trim().is_empty()).count() as u64;
        self.passed = self.passed.saturating_sub(n);
        self.skipped += n;
    }

    /// Counts a libtest `test result:` line.
    pub fn count(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word))
                    .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
                    .unwrap_or(0)
            };
            self.passed += count(" passed");
            self.failed += count(" failed");
        }
    }

    fn run(&mut self, cmd: &mut Command) -> anyhow::Result<()> {
        self.run_skipping(cmd, None)
    }

    /// [`run`](Self::run), then counts the skips the tests wrote to
    /// `skipped`.
    fn run_skipping(&mut self, cmd: &mut Command, skipped: Option<&Path>) -> anyhow::Result<()> {
        use std::io::{BufRead as _, BufReader};
        let shown = format!("{cmd:?}");
        eprintln!("xtask: {shown}");
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {shown}"))?;
        let out = BufReader::new(child.stdout.take().expect("piped"));
        for line in out.lines() {
            let line = line?;
            println!("{line}");
            self.count(&line);
        }
        let status = child.wait()?;
        if let Some(file) = skipped {
            self.skipped_from(file);
        }
        if !status.success() {
            self.failed = self.failed.max(1);
            println!("{}", self.closing_line());
            bail!("{shown} failed: {status}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn skipped_probe_tests_are_not_counted_passed() {
        let mut tally = Tally::default();
        tally.count("test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured");
        let file = std::env::temp_dir().join(format!("tally-skips-{}", std::process::id()));
        std::fs::write(&file, "queries_by_template\nwebsocket_echo\n").expect("write");
        tally.skipped_from(&file);
        assert!(!file.exists());
        assert_eq!((tally.passed, tally.failed, tally.skipped), (3, 0, 2));
        // Starts with the `N passed, K failed` that runners read.
        assert_eq!(tally.closing_line(), "3 passed, 0 failed, 2 skipped");
    }
}
