//! Harness for the memory tests and benchmarks: the allocation fixtures of
//! `tests/alloc-fixture`, whose `done` line is the ground truth the
//! profiler's findings are compared with.
//!
//! ```text
//! alloc-fixture, alloc-fixture-jemalloc   [--phases retain,churn,map] [--repeat N]
//!                                         [--no-wait] [--exit-when-done]
//!   stdout: ready <pid>   stdin: go   stdout: done {json}   stdin: exit or EOF -> exit 0
//! malloc-loop   [--iterations N | --seconds S] [--size BYTES] [--wait]
//!   stdout: ns_per_iter <float>, iterations <n>
//! noalloc       (built here from noalloc.c) stdout: ready <pid>, then sleeps until killed
//! ```

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        Mutex,
        mpsc::{Receiver, RecvTimeoutError, channel},
    },
    time::{Duration, Instant},
};

use crate::workspace_root;

/// How long a fixture may take to print `ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the phases may take before `done` (they take well under a
/// second unprofiled; a profiler slows them down).
pub const DONE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a fixture may take to exit once told to.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A fixture binary of the workspace's release build.
pub fn fixture_bin(name: &str) -> PathBuf {
    let path = workspace_root().join("target/release").join(name);
    assert!(
        path.exists(),
        "{} is missing: build the fixtures first with `cargo xtask build` \
         (or `cargo build --release -p pipelens-alloc-fixture`)",
        path.display()
    );
    path
}

/// A running fixture speaking the `ready` / `go` / `done` protocol,
/// killed when dropped. Its methods take `&self`, so a test can hand it
/// around (its pid to a profiler, say) while still driving it.
pub struct Fixture {
    child: Mutex<Child>,
    stdin: Mutex<Option<ChildStdin>>,
    lines: Receiver<String>,
    pid: u32,
    what: String,
}

impl Fixture {
    /// Starts `bin ARGS` (a [`fixture_bin`], a [`stripped_copy`], or any
    /// program that prints `ready <pid>` first, like noalloc) and waits
    /// for its `ready` line.
    pub fn spawn(bin: &Path, args: &[&str]) -> Fixture {
        let what = format!(
            "{} {}",
            bin.file_name().unwrap_or(bin.as_os_str()).to_string_lossy(),
            args.join(" ")
        )
        .trim_end()
        .to_owned();
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let fixture = Fixture {
            pid: child.id(),
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
            lines,
            what,
        };
        let ready = fixture.expect("ready", READY_TIMEOUT);
        assert_eq!(
            ready,
            fixture.pid.to_string(),
            "{}: `ready` names another pid",
            fixture.what
        );
        fixture
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Lets the phases start.
    pub fn go(&self) {
        self.send("go");
    }

    /// Writes one line to the fixture's stdin.
    pub fn send(&self, line: &str) {
        let what = &self.what;
        let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        let stdin = stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{what}: writing `{line}` to stdin: {e}"));
    }

    /// Waits (up to [`DONE_TIMEOUT`]) for the `done` line and returns its
    /// JSON: what the fixture actually did.
    pub fn wait_done(&self) -> serde_json::Value {
        self.wait_done_within(DONE_TIMEOUT)
    }

    pub fn wait_done_within(&self, timeout: Duration) -> serde_json::Value {
        let json = self.expect("done", timeout);
        serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("{}: `done` is not JSON ({e}): {json}", self.what))
    }

    /// The next line starting with `word`, without it; other lines are
    /// passed over (and shown).
    fn expect(&self, word: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => match line.strip_prefix(word) {
                    Some(rest) if rest.is_empty() || rest.starts_with(' ') => {
                        return rest.trim().to_owned();
                    }
                    _ => eprintln!("{}: {line}", self.what),
                },
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{}: no `{word}` line after {timeout:?}", self.what)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.wait_exit(EXIT_TIMEOUT);
                    panic!("{}: exited ({status}) before printing `{word}`", self.what)
                }
            }
        }
    }

    fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => panic!("{}: still running after {timeout:?}", self.what),
                Err(e) => panic!("{}: wait: {e}", self.what),
            }
        }
    }

    /// Closes stdin (the fixture's cue to exit) and asserts a clean exit.
    pub fn finish(self) {
        drop(self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take());
        let status = self.wait_exit(EXIT_TIMEOUT);
        assert!(status.success(), "{}: exited with {status}", self.what);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Resident set size of `pid` (`VmRSS` of `/proc/PID/status`), in bytes.
pub fn vm_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

fn run_tool(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Compiles `tests/alloc-fixture/NAME.c` into `dir/NAME` with gcc and `flags`.
fn build_c(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let src = workspace_root().join(format!("tests/alloc-fixture/{name}.c"));
    let out = dir.join(name);
    run_tool(
        Command::new("gcc")
            .args(flags)
            .arg("-o")
            .arg(&out)
            .arg(&src),
    );
    out
}

/// `forwards.c`: glibc allocation calls that end in another probed one,
/// built optimised, without frame pointers, with line tables.
pub fn build_forwards(dir: &Path) -> PathBuf {
    build_c(dir, "forwards", &["-O2", "-g", "-fomit-frame-pointer"])
}

/// `noalloc.c`: a static program with no libc and no allocator that prints
/// `ready <pid>` and sleeps.
pub fn build_noalloc(dir: &Path) -> PathBuf {
    build_c(dir, "noalloc", &["-static", "-nostdlib", "-O2"])
}

/// A copy of `bin` in `dir` with every symbol stripped (`strip
/// --strip-all`), named `<name>.stripped`.
pub fn stripped_copy(bin: &Path, dir: &Path) -> PathBuf {
    let name = bin.file_name().expect("a file").to_string_lossy();
    let out = dir.join(format!("{name}.stripped"));
    run_tool(
        Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(&out)
            .arg(bin),
    );
    out
}

/// Runs `malloc-loop ARGS` to completion and returns its `ns_per_iter`.
/// With `--wait` among the args, `go` is sent for it.
pub fn malloc_loop(args: &[&str]) -> f64 {
    let bin = fixture_bin("malloc-loop");
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let mut stdin = child.stdin.take().expect("stdin");
    if args.contains(&"--wait") {
        // Read after `ready`; the pipe holds it until then.
        writeln!(stdin, "go").expect("malloc-loop stdin");
    }
    drop(stdin);
    let out = child.wait_with_output().expect("wait malloc-loop");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "malloc-loop {args:?} exited with {}:\n{text}",
        out.status
    );
    text.lines()
        .find_map(|l| l.strip_prefix("ns_per_iter "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("malloc-loop {args:?} printed no ns_per_iter:\n{text}"))
}
