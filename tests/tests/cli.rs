//! Wrong input to the agent gets a clear error and a failing exit status.

use std::{process::Command, time::Duration};

use pipelens_tests::{pipelens_bin, probes_available};

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(pipelens_bin())
        .args(args)
        .output()
        .expect("run pipelens");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_invocations_say_what_is_wrong() {
    if !probes_available("bad_invocations_say_what_is_wrong") {
        return;
    }
    let (ok, err) = run(&["run", "--pid", "999999999"]);
    assert!(!ok);
    assert!(err.contains("no process with pid 999999999"), "{err}");

    let (ok, err) = run(&["run"]);
    assert!(!ok);
    assert!(err.contains("give --pid, --comm or --all"), "{err}");

    let (ok, err) = run(&["run", "--all", "--collectors", "bogus"]);
    assert!(!ok);
    assert!(
        err.contains("possible values") && err.contains("connections"),
        "{err}"
    );

    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr").to_string();
    let (ok, err) = run(&["run", "--all", "--listen", &addr, "--duration", "1"]);
    assert!(!ok);
    assert!(err.contains("address already in use"), "{err}");

    // An unwritable summary path fails at once, before anything attaches,
    // not after the whole run (the run would be lost).
    let started = std::time::Instant::now();
    let (ok, err) = run(&[
        "run",
        "--all",
        "--listen",
        "127.0.0.1:0",
        "--duration",
        "30",
        "--summary-json",
        "/nonexistent-dir/summary.json",
    ]);
    assert!(!ok);
    assert!(
        err.contains("--summary-json") && err.contains("/nonexistent-dir/summary.json"),
        "{err}"
    );
    assert!(!err.contains("attached in"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "waited for the run"
    );

    // Below one 4 KiB record a PostgreSQL startup reply or a burst of
    // frames read at once is no longer framed (README, --capture-bytes).
    let (ok, err) = run(&["run", "--all", "--capture-bytes", "1024"]);
    assert!(!ok);
    assert!(
        err.contains("--capture-bytes") && err.contains("4096"),
        "{err}"
    );

    // Allocator uprobes go into --pid targets only: without one the flag
    // would profile nothing, silently.
    let (ok, err) = run(&["run", "--comm", "postgres", "--memory-allocs"]);
    assert!(!ok);
    assert!(
        err.contains("--memory-allocs") && err.contains("--pid"),
        "{err}"
    );
    let me = std::process::id().to_string();
    let (ok, err) = run(&[
        "run",
        "--pid",
        &me,
        "--collectors",
        "queries",
        "--memory-allocs",
    ]);
    assert!(!ok);
    assert!(
        err.contains("--memory-allocs") && err.contains("memory collector"),
        "{err}"
    );
}

#[test]
fn check_reports_usable_collectors() {
    if !probes_available("check_reports_usable_collectors") {
        return;
    }
    let out = Command::new(pipelens_bin())
        .arg("check")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("collector connections") && l.contains("ok")),
        "{text}"
    );
}

/// Under exactly the four documented capabilities the kernel refuses
/// uprobes (they need CAP_SYS_ADMIN since "perf: Require CAP_SYS_ADMIN for
/// uprobes"): allocator profiling says so before attaching anything, and
/// names what still works.
#[test]
fn allocator_profiling_without_cap_sys_admin_is_refused() {
    if !probes_available("allocator_profiling_without_cap_sys_admin_is_refused") {
        return;
    }
    let me = std::process::id().to_string();
    for args in [
        &["run", "--pid", &me, "--memory-allocs", "--duration", "5"][..],
        &[
            "memory",
            "--pid",
            &me,
            "--mode",
            "allocs",
            "--duration",
            "5",
        ][..],
    ] {
        let out = pipelens_tests::least_privileged_agent()
            .args(args)
            .output()
            .expect("setpriv");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("needs CAP_SYS_ADMIN") && err.contains("growth profiling"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("attached in"), "{err}");
    }
}

/// A `--pid` target that exits, and a new process that is then given its
/// pid (forced with `ns_last_pid`): the agent says both, once, and names
/// the newcomer as not traced. It used to say nothing.
#[test]
fn a_reused_target_pid_is_logged_and_not_traced() {
    if !probes_available("a_reused_target_pid_is_logged_and_not_traced") {
        return;
    }
    let sleeper = || Command::new("sleep").arg("120").spawn().expect("sleep");
    let mut first = sleeper();
    let pid = first.id();
    let dir = pipelens_tests::TempDir::new("reuse");
    let log = dir.path.join("agent.log");
    let mut cmd = Command::new(pipelens_bin());
    cmd.args([
        "run",
        "--pid",
        &pid.to_string(),
        "--collectors",
        "connections",
    ])
    .args(["--listen", "127.0.0.1:0"])
    .env("RUST_LOG", "info")
    .stderr(std::fs::File::create(&log).expect("log file"));
    let mut agent = pipelens_tests::child::Owned::spawn("pipelens", &mut cmd, libc::SIGINT);
    let said = |what: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(what)
    };
    agent.wait_until("attached", Duration::from_secs(30), || said("attached in"));
    first.kill().expect("kill");
    first.wait().expect("reap");
    let exited = format!("--pid {pid} exited");
    agent.wait_until("the exit said", Duration::from_secs(10), || said(&exited));
    // The next fork gets ns_last_pid + 1, unless another process forks
    // in between: try until the pid is ours.
    let mut second = None;
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).expect("ns_last_pid");
        let mut child = sleeper();
        if child.id() == pid {
            second = Some(child);
            break;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut second = second.expect("pid reused within 50 forks");
    let reused = format!("pid {pid} now belongs to a new process (sleep), which is not traced");
    agent.wait_until("the reuse said", Duration::from_secs(10), || said(&reused));
    let _ = second.kill();
    let _ = second.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(text.matches(&exited).count(), 1, "{text}");
    assert_eq!(text.matches(&reused).count(), 1, "{text}");
}

/// `RLIMIT_MEMLOCK` at its old default (64 KiB) under exactly the four
/// capabilities: a kernel that charges BPF maps to it (before 5.11) is
/// refused at once, naming `CAP_SYS_RESOURCE` and the limit; a later kernel
/// charges the maps to the memory cgroup, and the agent runs.
#[test]
fn a_low_memlock_limit_is_refused_by_name_where_the_kernel_counts_it() {
    if !probes_available("a_low_memlock_limit_is_refused_by_name_where_the_kernel_counts_it") {
        return;
    }
    use std::os::unix::process::CommandExt as _;
    // Exactly the four: not the fifth the harness adds on such kernels.
    let mut cmd = connections_for_two_seconds(pipelens_tests::LEAST_CAPS);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64 * 1024,
                rlim_max: 64 * 1024,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // At Debian's default perf level (3) 5.10 refuses the least
    // capabilities before memlock matters: the level users set there.
    let out = with_perf_paranoid("2", || cmd.output().expect("setpriv pipelens"));
    let err = String::from_utf8_lossy(&out.stderr);
    if pipelens_tests::memlock_charged() {
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("missing capabilities: CAP_SYS_RESOURCE")
                && err.contains("RLIMIT_MEMLOCK")
                && err.contains("64 KiB"),
            "{err}"
        );
    } else {
        assert!(out.status.success(), "{err}");
    }
}

/// `kernel.perf_event_paranoid` at 3, the level Debian's and Ubuntu's
/// kernels add: where the kernel lifts it for `CAP_SYS_ADMIN` only (Debian's
/// 5.10 and 6.1), the agent under the least capabilities refuses at once, naming
/// `CAP_SYS_ADMIN` and the sysctl, instead of an EACCES from deep inside an
/// attach; where `CAP_PERFMON` is enough (or the level is upstream's, the
/// same as 2), it runs. At 2 it runs on every kernel.
#[test]
fn a_paranoid_perf_level_is_named_where_it_refuses_the_least_capabilities() {
    if !probes_available("a_paranoid_perf_level_is_named_where_it_refuses_the_least_capabilities") {
        return;
    }
    let run_least = || {
        let out = connections_for_two_seconds(&pipelens_tests::least_caps())
            .output()
            .expect("setpriv pipelens");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let at3 = with_perf_paranoid("3", run_least);
    let at2 = with_perf_paranoid("2", run_least);
    let (ok, err) = at3;
    eprintln!(
        "at level 3 the least capabilities {}",
        if ok { "run" } else { "are refused" }
    );
    assert!(
        ok || (err.contains("missing capabilities: CAP_SYS_ADMIN")
            && err.contains("perf_event_paranoid is 3")
            && err.contains("sysctl kernel.perf_event_paranoid=2")),
        "{err}"
    );
    assert!(at2.0, "{}", at2.1);
}

/// Runs `f` with `kernel.perf_event_paranoid` at `level`, then puts back
/// what was there.
fn with_perf_paranoid<T>(level: &str, f: impl FnOnce() -> T) -> T {
    const SYSCTL: &str = "/proc/sys/kernel/perf_event_paranoid";
    let before = std::fs::read_to_string(SYSCTL).expect("perf_event_paranoid");
    std::fs::write(SYSCTL, level).expect("set perf_event_paranoid");
    let result = f();
    std::fs::write(SYSCTL, before.trim()).expect("restore perf_event_paranoid");
    result
}

/// `pipelens run --all --collectors connections --duration 2` under exactly
/// `caps`.
fn connections_for_two_seconds(caps: &str) -> Command {
    let listen = format!("127.0.0.1:{}", pipelens_tests::free_port());
    let mut cmd = pipelens_tests::agent_with_caps(caps);
    cmd.args(["run", "--all", "--collectors", "connections"])
        .args(["--duration", "2", "--listen", &listen]);
    cmd
}
