//! The kernel matrix: the agent and a chosen part of the probe tests, run
//! inside Debian's 5.10, 6.1 and 6.12 cloud kernels booted under qemu.
//!
//! The guests run the very test binaries the host runs (same harness, same
//! ground truth, `CI=true` so nothing skips), so "exact on 5.10" means the
//! same assertions as "exact on this machine".

mod guest;
mod initramfs;
pub mod kernels;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{Tally, cargo, root};

/// What each guest runs, by probe-test binary: one exact-count check per
/// area at least (connections, PostgreSQL, WebSocket, memory).
const GUEST_TESTS: &[(&str, &[&str])] = &[
    (
        "cli",
        &[
            "check_reports_usable_collectors",
            "a_low_memlock_limit_is_refused_by_name_where_the_kernel_counts_it",
            "a_paranoid_perf_level_is_named_where_it_refuses_the_least_capabilities",
        ],
    ),
    (
        "connections",
        &[
            "churn_ipv4",
            "churn_ipv6",
            "churn_ipv4_with_syscall_hooks",
            "refused_and_reset",
        ],
    ),
    (
        "queries",
        &[
            "pgbench_counts_are_exact",
            "errors_by_sqlstate",
            "vectored_statements_are_exact",
        ],
    ),
    (
        "websocket",
        &[
            "demo_pipeline_sessions_are_exact",
            "pipes_and_files_are_not_taken_for_sockets",
        ],
    ),
    (
        "memory",
        &[
            "allocs_mode_names_functions_with_true_sizes",
            "growth_mode_attributes_touched_mappings_and_retained_heap",
            "run_exports_top_sites_as_metrics",
            "a_forking_server_keeps_the_agent_within_its_memory_bound",
        ],
    ),
];

/// Run again in every guest as user nobody with only the least
/// capabilities (`PIPELENS_TEST_CAPS=user`): the four, and
/// `CAP_SYS_RESOURCE` where the kernel charges BPF maps to memlock.
const GUEST_LEAST_PRIVILEGE_TESTS: &[(&str, &[&str])] =
    &[("connections", &["churn_ipv4", "refused_and_reset"])];

/// Release binaries the tests start by their workspace paths.
const RELEASE_BINS: &[&str] = &[
    "pipelens",
    "tcp-peer",
    "pg-vectored",
    "pipeline",
    "loadgen",
    "alloc-fixture",
];

/// PostgreSQL programs the harness runs (`pg::TestPostgres`, pgbench, psql).
const PG_PROGRAMS: &[&str] = &["initdb", "pg_ctl", "postgres", "pgbench", "psql"];

/// A guest that has not powered off by then has hung.
const GUEST_TIMEOUT: Duration = Duration::from_secs(900);

pub struct Options {
    /// Only these kernels (by name), or all.
    pub kernels: Vec<String>,
    /// Only these probe-test binaries (by name), or all of [`GUEST_TESTS`].
    pub tests: Vec<String>,
    /// Guests booted at once.
    pub jobs: usize,
}

/// Builds, fetches the kernels, boots every guest and adds their test
/// results to `tally`; fails when any guest check failed.
pub fn run(opts: &Options, tally: &mut Tally) -> anyhow::Result<()> {
    let started = Instant::now();
    let specs: Vec<&kernels::KernelSpec> = kernels::KERNELS
        .iter()
        .filter(|k| opts.kernels.is_empty() || opts.kernels.iter().any(|n| n == k.name))
        .collect();
    if specs.is_empty() {
        bail!(
            "no such kernel in the matrix: {:?} (known: {})",
            opts.kernels,
            kernels::KERNELS
                .iter()
                .map(|k| k.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let kernels = specs
        .iter()
        .map(|s| kernels::fetch(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let dir = root().join("target/matrix");
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("initramfs.cpio");
    let tests: Vec<(String, PathBuf)> = test_executables()?
        .into_iter()
        .filter(|(name, _)| opts.tests.is_empty() || opts.tests.contains(name))
        .collect();
    let mut files: Vec<PathBuf> = RELEASE_BINS
        .iter()
        .map(|b| root().join("target/release").join(b))
        .collect();
    files.extend(tests.iter().map(|(_, p)| p.clone()));
    files.push("/usr/bin/promtool".into());
    // The least-privilege runs drop to the capabilities they name.
    files.push("/usr/bin/setpriv".into());
    let pg = pipelens_tests::pg::bin_dir()
        .context("PostgreSQL server binaries (cargo xtask setup installs them)")?;
    files.extend(PG_PROGRAMS.iter().map(|p| pg.join(p)));
    let pg_root = pg.parent().context("PostgreSQL bin dir")?;
    let version = pg_root.file_name().context("PostgreSQL version")?;
    let trees = vec![
        pg_root.join("lib"),
        Path::new("/usr/share/postgresql").join(version),
        PathBuf::from("/usr/share/zoneinfo"),
    ];
    initramfs::build(&image, &files, &trees, &init_script(&tests))?;
    eprintln!(
        "xtask: matrix: initramfs {} MiB, built in {:.0?}",
        std::fs::metadata(&image)?.len() >> 20,
        started.elapsed()
    );

    // One vCPU per guest: with two, multi-threaded TCG once oopsed in the
    // 6.12 guest (an int3 left in kernel text by a cross-vCPU code patch
    // while a perf event was opened), an emulator effect, not the agent's.
    let cpus = 1;
    let mut failures = Vec::new();
    for batch in kernels.chunks(opts.jobs.max(1)) {
        let mut guests = Vec::new();
        for k in batch {
            eprintln!("xtask: matrix: booting {} ({})", k.name, k.package);
            guests.push(guest::Guest::boot(k, &image, &dir, cpus, GUEST_TIMEOUT)?);
        }
        let mut running: Vec<usize> = (0..guests.len()).collect();
        while !running.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
            running.retain(|&i| {
                let g = &mut guests[i];
                match g.poll() {
                    Some(lines) => {
                        for l in lines {
                            println!("[{}] {l}", g.kernel);
                        }
                        true
                    }
                    None => false,
                }
            });
        }
        for g in &guests {
            let report = judge(g, tally);
            eprintln!(
                "xtask: matrix: kernel {}: {} in {:.0?}",
                g.kernel,
                if report.is_ok() { "passed" } else { "FAILED" },
                g.elapsed()
            );
            if let Err(e) = report {
                failures.push(format!(
                    "kernel {}: {e}\n--- last console lines ({}):\n{}",
                    g.kernel,
                    g.console.display(),
                    g.console_tail(40)
                ));
            }
        }
    }
    eprintln!("xtask: matrix: {:.0?} in all", started.elapsed());
    if !failures.is_empty() {
        bail!("kernel matrix failed:\n{}", failures.join("\n\n"));
    }
    Ok(())
}

/// Adds a guest's test counts to `tally` and says what went wrong in it.
fn judge(g: &guest::Guest, tally: &mut Tally) -> anyhow::Result<()> {
    judge_lines(&g.lines, g.timed_out, tally)
}

/// [`judge`] on the results port's lines: every step must end with 0, the
/// script must reach `done`, and each test binary's `test result:` lines
/// are counted (a bare step, like the check, counts as one test).
fn judge_lines(lines: &[String], timed_out: bool, tally: &mut Tally) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    let mut step_lines: Vec<&str> = Vec::new();
    let mut begun = None;
    let mut done = false;
    for line in lines {
        tally.count(line);
        if let Some(m) = line.strip_prefix(guest::MARK) {
            let words: Vec<&str> = m.split_whitespace().collect();
            match words.as_slice() {
                ["begin", name] => {
                    begun = Some(*name);
                    step_lines.clear();
                }
                ["end", name, rc] => {
                    if *rc != "0" {
                        // A step that is no test binary (the bare check)
                        // still counts as one failed check.
                        if !name.contains(':') {
                            tally.failed += 1;
                        }
                        let tail = &step_lines[step_lines.len().saturating_sub(60)..];
                        problems.push(format!("{name} exited {rc}:\n{}", tail.join("\n")));
                    } else if !name.contains(':') {
                        tally.passed += 1;
                    }
                    begun = None;
                }
                ["done"] => done = true,
                _ => {}
            }
        } else {
            step_lines.push(line);
        }
    }
    if !done {
        tally.failed += 1;
        let cause = if timed_out {
            format!("stopped after {GUEST_TIMEOUT:?}")
        } else {
            "powered off early (kernel panic or crash?)".to_owned()
        };
        let inside = begun.map_or(String::new(), |b| format!(" during {b}"));
        let tail = &step_lines[step_lines.len().saturating_sub(60)..];
        problems.push(format!("{cause}{inside}:\n{}", tail.join("\n")));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("\n"))
    }
}

/// The probe-test executables the guests run, by test target name, as
/// cargo builds them (release, like the host's probe tests).
fn test_executables() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let out = cargo()
        .args([
            "test",
            "--release",
            "--package",
            "pipelens-tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the probe tests failed");
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        if msg["target"]["kind"][0] == "test" && GUEST_TESTS.iter().any(|(t, _)| *t == name) {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    for (t, _) in GUEST_TESTS {
        if !found.iter().any(|(n, _)| n == t) {
            bail!("probe test binary {t} not built");
        }
    }
    Ok(found)
}

/// The guest's `/init`: mounts what the agent needs, runs `pipelens check`
/// and the chosen tests (each between marked lines on the results port),
/// then powers off.
fn init_script(tests: &[(String, PathBuf)]) -> String {
    let agent = root().join("target/release/pipelens");
    let mut s = format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TZ=UTC CI=true RUST_BACKTRACE=1 PIPELENS_EMULATED=tcg
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
chmod 1777 /tmp /dev/shm
ip link set lo up
ulimit -n 65536
exec >/dev/ttyS1 2>&1
echo "{mark}kernel $(uname -r)"
step() {{ name=$1; shift; echo "{mark}begin $name"; "$@"; echo "{mark}end $name $?"; }}
cd {tests_dir}
step check {agent} check
"#,
        mark = guest::MARK,
        tests_dir = root().join("tests").display(),
        agent = agent.display(),
    );
    for (name, filters) in GUEST_TESTS {
        let Some((_, exe)) = tests.iter().find(|(n, _)| n == name) else {
            continue;
        };
        s.push_str(&format!(
            "step test:{name} {} --test-threads=1 --exact {}\n",
            exe.display(),
            filters.join(" ")
        ));
    }
    // Debian's kernels default to perf_event_paranoid 3, which 5.10 lifts
    // for CAP_SYS_ADMIN only: the README's advice for least privilege.
    s.push_str("echo 2 > /proc/sys/kernel/perf_event_paranoid\n");
    for (name, filters) in GUEST_LEAST_PRIVILEGE_TESTS {
        let Some((_, exe)) = tests.iter().find(|(n, _)| n == name) else {
            continue;
        };
        s.push_str(&format!(
            "step test:{name}-least-privilege env PIPELENS_TEST_CAPS=user {} --test-threads=1 --exact {}\n",
            exe.display(),
            filters.join(" ")
        ));
    }
    s.push_str(&format!("echo \"{}done\"\npoweroff -f\n", guest::MARK));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn a_clean_guest_counts_its_tests() {
        let mut tally = Tally::default();
        let out = lines(
            "@@@ kernel 6.1.0\n@@@ begin check\ncollector memory ok\n@@@ end check 0\n\
             @@@ begin test:connections\ntest result: ok. 3 passed; 0 failed; 0 ignored\n\
             @@@ end test:connections 0\n@@@ done",
        );
        judge_lines(&out, false, &mut tally).expect("clean");
        assert_eq!((tally.passed, tally.failed), (4, 0));
    }

    #[test]
    fn failures_and_early_ends_fail_with_their_output() {
        let mut tally = Tally::default();
        let out = lines(
            "@@@ begin check\ncollector streams FAIL verifier\n@@@ end check 1\n\
             @@@ begin test:queries\ntest result: FAILED. 1 passed; 1 failed;\n\
             @@@ end test:queries 101\n@@@ begin test:memory\npanicked here",
        );
        let err = judge_lines(&out, true, &mut tally).unwrap_err().to_string();
        assert!(
            err.contains("check exited 1") && err.contains("FAIL verifier"),
            "{err}"
        );
        assert!(err.contains("test:queries exited 101"), "{err}");
        assert!(
            err.contains("during test:memory") && err.contains("panicked here"),
            "{err}"
        );
        // check (1) + queries (1) + the unfinished guest (1); queries' pass.
        assert_eq!((tally.passed, tally.failed), (1, 3));
    }
}
