//! Harness for the probe tests: runs the real `pipelens` binary as root
//! against peers started here, and reads back what it exported.

pub mod browser;
pub mod child;
pub mod demo;
pub mod memory;
pub mod pg;

use child::Owned;
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

/// Names the file to which each skipped probe test appends its name, so
/// that the runner (`cargo xtask test`) counts it as skipped, not passed.
pub const SKIPPED_ENV: &str = "PIPELENS_SKIPPED";

/// True when the probe tests can run here. Under `CI=true` a host that
/// cannot run them fails the test instead of skipping it. A skip is said
/// on the real stderr (libtest captures `eprintln!`, and would show a
/// skipped test as a plain pass) and recorded in [`SKIPPED_ENV`]'s file.
pub fn probes_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let reason = if !root {
        Some("not root")
    } else if !pipelens_bin().exists() {
        Some("target/release/pipelens not built (run `cargo xtask test`)")
    } else {
        None
    };
    match reason {
        None => true,
        Some(r) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: probe test cannot run under CI: {r}")
        }
        Some(r) => {
            let _ =
                std::io::stderr().write_all(format!("skipping test - {test}: {r}\n").as_bytes());
            if let Some(path) = std::env::var_os(SKIPPED_ENV) {
                let recorded = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(format!("{test}\n").as_bytes()));
                if let Err(e) = recorded {
                    panic!("{test}: cannot record the skip in {path:?}: {e}");
                }
            }
            false
        }
    }
}

/// True inside the kernel-matrix guests, whose CPUs are emulated (qemu
/// TCG, tens of times slower than the host): what a test counts must still
/// be exact there, but how long things take is not what it is on hardware,
/// so timing assertions are left to the host and waits are longer.
pub fn emulated() -> bool {
    std::env::var_os("PIPELENS_EMULATED").is_some()
}

/// `timeout`, stretched under emulation.
pub fn patience(timeout: Duration) -> Duration {
    if emulated() { timeout * 4 } else { timeout }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The agent under test: `PIPELENS_BIN`, or the workspace's release build.
pub fn pipelens_bin() -> PathBuf {
    std::env::var_os("PIPELENS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/pipelens"))
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running `pipelens run`, stopped (SIGINT) when dropped.
/// How probe tests run the agent: as the test's own user with every
/// capability, or with `PIPELENS_TEST_CAPS=root` / `=user` under exactly
/// `CAP_BPF`, `CAP_PERFMON`, `CAP_SYS_PTRACE` and `CAP_DAC_READ_SEARCH`
/// (bounding, inheritable and ambient sets), as root or as `nobody`.
pub const CAPS_ENV: &str = "PIPELENS_TEST_CAPS";
/// The four capabilities the agent is documented to need.
pub const LEAST_CAPS: &str = "+bpf,+perfmon,+sys_ptrace,+dac_read_search";

/// Whether this kernel charges BPF maps to `RLIMIT_MEMLOCK` (before 5.11),
/// so that the least set also holds `CAP_SYS_RESOURCE` to raise it.
pub fn memlock_charged() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) < (5, 11)
}

/// The least capabilities on this kernel, for `setpriv`.
pub fn least_caps() -> String {
    if memlock_charged() {
        format!("{LEAST_CAPS},+sys_resource")
    } else {
        LEAST_CAPS.to_owned()
    }
}

fn least_privilege(dir: &TempDir) -> Command {
    let mode = std::env::var(CAPS_ENV).unwrap_or_default();
    if mode.is_empty() {
        return Command::new(pipelens_bin());
    }
    let mut cmd = Command::new("setpriv");
    match mode.as_str() {
        "root" => {}
        "user" => {
            // nobody writes its summary into the agent's directory.
            std::fs::set_permissions(
                &dir.path,
                std::os::unix::fs::PermissionsExt::from_mode(0o777),
            )
            .expect("chmod the agent's directory");
            cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"]);
        }
        other => panic!("{CAPS_ENV}={other}: expected root or user"),
    }
    with_least_caps(&mut cmd);
    cmd
}

/// Adds to a `setpriv` command the least capabilities of this kernel (and
/// only them, in the bounding, inheritable and ambient sets), then the
/// agent.
fn with_least_caps(setpriv: &mut Command) {
    with_caps(setpriv, &least_caps());
}

/// Adds to a `setpriv` command exactly `caps` (`+bpf,+perfmon,…`), in the
/// bounding, inheritable and ambient sets, then the agent.
fn with_caps(setpriv: &mut Command, caps: &str) {
    let caps = format!("-all,{caps}");
    setpriv
        .args([
            "--inh-caps",
            &caps,
            "--ambient-caps",
            &caps,
            "--bounding-set",
            &caps,
        ])
        .arg(pipelens_bin());
}

/// `pipelens`, as root, under exactly the least capabilities of this
/// kernel.
pub fn least_privileged_agent() -> Command {
    agent_with_caps(&least_caps())
}

/// `pipelens`, as root, under exactly `caps` (`+bpf,+perfmon,…`).
pub fn agent_with_caps(caps: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    with_caps(&mut cmd, caps);
    cmd
}

pub struct Agent {
    process: Owned,
    pub port: u16,
    pub summary_path: PathBuf,
    _dir: TempDir,
}

impl Agent {
    /// Starts `pipelens run ARGS` and waits until `/healthz` answers 200.
    pub fn start(args: &[&str]) -> Agent {
        Self::start_command("run", args)
    }

    /// Starts `pipelens record ARGS -o <its directory>/snapshot.json` and
    /// waits until `/healthz` answers 200 ([`Agent::snapshot_path`]).
    pub fn record(args: &[&str]) -> Agent {
        let mut all: Vec<&str> = args.to_vec();
        if !args.contains(&"-o") {
            all.extend_from_slice(&["-o", "{snapshot}"]);
        }
        Self::start_command("record", &all)
    }

    /// Where [`Agent::record`] writes its snapshot.
    pub fn snapshot_path(&self) -> PathBuf {
        self._dir.path.join("snapshot.json")
    }

    /// Waits (up to `timeout`) for the agent to stop by itself, at the end
    /// of its `--duration`: its exit status and the snapshot it wrote, if
    /// any (read before its directory goes).
    pub fn wait_exit(mut self, timeout: Duration) -> (std::process::ExitStatus, Option<Vec<u8>>) {
        let timeout = patience(timeout);
        let start = Instant::now();
        while self.process.exited().is_none() {
            assert!(
                start.elapsed() < timeout,
                "pipelens still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let snapshot = std::fs::read(self.snapshot_path()).ok();
        let Agent { process, _dir, .. } = self;
        (process.wait(), snapshot)
    }

    fn start_command(command: &str, args: &[&str]) -> Agent {
        let dir = TempDir::new("agent");
        let port = free_port();
        let summary_path = dir.path.join("summary.json");
        let snapshot = dir.path.join("snapshot.json");
        let snapshot = snapshot.to_string_lossy();
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "{snapshot}" { &*snapshot } else { *a })
            .collect();
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = least_privilege(&dir);
        cmd.arg(command)
            .args(&args)
            .args(["--listen", &listen])
            .arg("--summary-json")
            .arg(&summary_path)
            .env("RUST_LOG", "info");
        // SIGINT on drop: the agent detaches and writes its summary.
        let process = Owned::spawn("pipelens", &mut cmd, libc::SIGINT);
        let mut agent = Agent {
            process,
            port,
            summary_path,
            _dir: dir,
        };
        agent.wait_healthy(patience(Duration::from_secs(30)));
        agent.assert_privileges();
        agent
    }

    /// Under `PIPELENS_TEST_CAPS`, the agent really holds the four
    /// capabilities and nothing else, as the user asked for.
    fn assert_privileges(&self) {
        let Ok(mode) = std::env::var(CAPS_ENV) else {
            return;
        };
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the agent's status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().next().unwrap_or_default().to_owned())
                .unwrap_or_default()
        };
        // CAP_DAC_READ_SEARCH 2, CAP_SYS_PTRACE 19, CAP_PERFMON 38, CAP_BPF 39.
        let mut least = (1u64 << 2) | (1 << 19) | (1 << 38) | (1 << 39);
        if memlock_charged() {
            // CAP_SYS_RESOURCE 24, to raise RLIMIT_MEMLOCK.
            least |= 1 << 24;
        }
        assert_eq!(field("CapEff:"), format!("{least:016x}"), "{status}");
        let uid = if mode == "user" { "65534" } else { "0" };
        assert_eq!(field("Uid:"), uid, "{status}");
    }

    fn wait_healthy(&mut self, timeout: Duration) {
        let port = self.port;
        self.process.wait_until("healthy", timeout, || {
            matches!(http_get(port, "/healthz"), Ok((200, _)))
        });
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The agent's peak resident set so far (`VmHWM`), in bytes.
    pub fn peak_resident_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the agent's status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        kib * 1024
    }

    pub fn metrics_text(&self) -> String {
        let (code, body) = http_get(self.port, "/metrics").expect("GET /metrics");
        assert_eq!(code, 200);
        body
    }

    pub fn metrics(&self) -> Metrics {
        Metrics::parse(&self.metrics_text())
    }

    /// Scrapes until `cond` holds (the agent exports kernel counters about
    /// once a second), or panics with the last scrape after `timeout`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Metrics) -> bool,
    ) -> Metrics {
        let timeout = patience(timeout);
        let start = Instant::now();
        loop {
            let m = self.metrics();
            if cond(&m) {
                return m;
            }
            if start.elapsed() > timeout {
                panic!("timed out waiting for {what}; last scrape:\n{}", m.dump());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILL: no chance to detach or clean up.
    pub fn kill(self) {
        let status = self.process.stop(libc::SIGKILL, Duration::from_secs(10));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "{status}"
        );
    }

    /// SIGINT, wait for exit, and return the summary it wrote.
    pub fn stop(self) -> serde_json::Value {
        let status = self
            .process
            .stop(libc::SIGINT, patience(Duration::from_secs(60)));
        assert!(status.success(), "pipelens exited with {status}");
        let text = std::fs::read_to_string(&self.summary_path).expect("summary written");
        serde_json::from_str(&text).expect("summary is JSON")
    }
}

/// Minimal HTTP/1.0 GET, enough for /metrics and /healthz.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// Samples of a Prometheus text exposition, by name and label set.
#[derive(Debug, Default)]
pub struct Metrics {
    pub samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().expect("sample value"),
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Metrics { samples }
    }

    /// Sum of `name` over every series whose labels include `want`.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Asserts that every series of each metric family (by name prefix)
    /// carries the identity labels, `process` and `container` (empty
    /// outside a container), and that each family has series at all.
    pub fn assert_identity_labels(&self, families: &[&str]) {
        for family in families {
            let series: Vec<_> = self
                .samples
                .iter()
                .filter(|(n, _, _)| n.starts_with(family))
                .collect();
            assert!(!series.is_empty(), "no {family}* series:\n{}", self.dump());
            for (name, labels, _) in series {
                assert!(
                    labels.contains_key("process") && labels.contains_key("container"),
                    "{name}{labels:?} lacks process or container"
                );
            }
        }
    }

    pub fn dump(&self) -> String {
        self.samples
            .iter()
            .filter(|(n, _, _)| !n.ends_with("_bucket"))
            .map(|(n, l, v)| format!("{n}{l:?} {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_owned(), value);
        rest = after[end..].trim_start_matches(',');
    }
    out
}

/// A helper process speaking the `tcp-peer` line protocol.
pub struct Peer {
    process: Owned,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    pub fn spawn(bin: &str, args: &[&str]) -> Peer {
        let mut process = Owned::spawn(
            bin,
            Command::new(bin)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
            libc::SIGKILL,
        );
        let stdout = BufReader::new(process.child_mut().stdout.take().expect("stdout"));
        let stdin = process.child_mut().stdin.take();
        Peer {
            process,
            stdin,
            stdout,
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Next line printed by the peer.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("peer stdout");
        assert!(!line.is_empty(), "peer exited without answering");
        line.trim_end().to_owned()
    }

    /// Waits for a line starting with `prefix`, returning the rest.
    pub fn expect(&mut self, prefix: &str) -> String {
        let line = self.line();
        line.strip_prefix(prefix)
            .unwrap_or_else(|| panic!("peer said `{line}`, expected `{prefix}…`"))
            .trim()
            .to_owned()
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("peer stdin");
        stdin.flush().expect("peer stdin");
    }

    pub fn wait(mut self) {
        drop(self.stdin.take());
        let status = self.process.wait();
        assert!(status.success(), "peer failed: {status}");
    }
}

/// A temporary directory removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    /// A directory any user can enter (the PostgreSQL server runs as
    /// `postgres` inside it).
    fn open_to_all(path: &std::path::Path) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755));
    }
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "pipelens-{prefix}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ rand_seed()
        ));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir::open_to_all(&path);
        TempDir { path }
    }
}

fn rand_seed() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The exposition passes `promtool check metrics` (naming, units, types).
pub fn promtool_accepts(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (installed by `cargo xtask setup`)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics:\n{report}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exposition_lines() {
        let m = Metrics::parse(
            "# HELP x y\nfoo_total{a=\"1\",b=\"q\\\"x\"} 3\nfoo_total{a=\"2\",b=\"\"} 4\nbar 1.5\nh_bucket{le=\"+Inf\"} 2\n",
        );
        assert_eq!(m.sum("foo_total", &[]), 7.0);
        assert_eq!(m.sum("foo_total", &[("a", "1")]), 3.0);
        assert_eq!(m.sum("foo_total", &[("b", "q\"x")]), 3.0);
        assert_eq!(m.sum("foo_total", &[("b", "")]), 4.0);
        assert_eq!(m.sum("bar", &[]), 1.5);
        assert_eq!(m.sum("h_bucket", &[("le", "+Inf")]), 2.0);
    }
}
