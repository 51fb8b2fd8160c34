//! `cargo xtask bench`: each workload with and without the agent, rounds
//! interleaved (the order rotates every round) so that machine noise hits
//! every configuration alike; medians and ratios to the untraced run.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::ValueEnum;
use pipelens_tests::pg::TestPostgres;

use crate::root;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Loopback TCP connection churn.
    Connections,
    /// pgbench -S against a private PostgreSQL.
    Queries,
    /// A malloc-bound loop: growth mode, allocation mode, bpftrace.
    Memory,
    /// WebSocket messages through the demo pipeline.
    Websocket,
    All,
}

struct Round {
    rate: f64,
    /// How long the measured part lasted.
    seconds: f64,
    agent_cpu_seconds: f64,
    agent_peak_rss_kib: u64,
}

/// A configuration: its name and the agent's flags (None: no agent).
type Config = (&'static str, Option<Vec<&'static str>>);

/// `--baseline`: the other binary, and the first flag that selects it.
static BASELINE: OnceLock<PathBuf> = OnceLock::new();
const BASELINE_FLAG: &str = "@baseline";

/// With `--baseline`, a twin of every traced configuration, run with the
/// baseline binary.
fn with_baseline(mut configs: Vec<Config>) -> Vec<Config> {
    if BASELINE.get().is_none() {
        return configs;
    }
    let twins: Vec<Config> = configs
        .iter()
        .filter_map(|(name, flags)| {
            let mut flags = flags.clone()?;
            flags.insert(0, BASELINE_FLAG);
            let name: &'static str = Box::leak(format!("{name} (baseline)").into_boxed_str());
            Some((name, Some(flags)))
        })
        .collect();
    configs.extend(twins);
    configs
}

pub fn run(
    workload: Workload,
    rounds: usize,
    seconds: f64,
    baseline: Option<PathBuf>,
) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("the benchmark loads kernel programs: run it as root");
    }
    if let Some(path) = baseline {
        if !path.is_file() {
            bail!("--baseline {}: no such file", path.display());
        }
        BASELINE.set(path).expect("set once");
    }
    let secs = seconds.ceil().max(1.0) as u64;
    let mut report = String::new();
    if matches!(workload, Workload::Connections | Workload::All) {
        let configs: Vec<Config> = vec![
            ("without agent", None),
            (
                "pipelens --collectors connections",
                Some(vec!["--comm", "tcp-peer", "--collectors", "connections"]),
            ),
            (
                "pipelens --collectors connections --syscall-hooks",
                Some(vec![
                    "--comm",
                    "tcp-peer",
                    "--collectors",
                    "connections",
                    "--syscall-hooks",
                ]),
            ),
            ("pipelens, all collectors", Some(vec!["--comm", "tcp-peer"])),
        ];
        let configs = with_baseline(configs);
        let results = interleave(&configs, rounds, |flags| churn_round(secs, flags))?;
        report.push_str(&table(
            "Loopback connection churn",
            "connections/s",
            &configs,
            &results,
            None,
        ));
        report.push_str(&format!(
            "\nConnect, 64 B each way, close; 2 client and 2 server threads in one process, \
             both ends traced; {secs} s per round, {rounds} rounds.\n\n"
        ));
    }
    if matches!(workload, Workload::Queries | Workload::All) {
        let pg = TestPostgres::start();
        pg.pgbench(false, &["-i", "-s", "10", "-q"]);
        let configs: Vec<Config> = vec![
            ("without agent", None),
            (
                "pipelens, client traced",
                Some(vec!["--comm", "pgbench", "--collectors", "queries"]),
            ),
            (
                "pipelens, server traced",
                Some(vec!["--comm", "postgres", "--collectors", "queries"]),
            ),
            (
                "pipelens, both traced",
                Some(vec![
                    "--comm",
                    "pgbench",
                    "--comm",
                    "postgres",
                    "--collectors",
                    "queries",
                ]),
            ),
        ];
        let configs = with_baseline(configs);
        let results = interleave(&configs, rounds, |flags| pgbench_round(&pg, secs, flags))?;
        report.push_str(&table(
            "PostgreSQL pgbench -S (prepared, 4 clients, TCP)",
            "transactions/s",
            &configs,
            &results,
            Some(10_000.0),
        ));
        report.push_str(&format!(
            "\npgbench -S -M prepared -c 4 -j 2 over TCP loopback, scale 10; {secs} s per \
             round, {rounds} rounds.\n\n"
        ));
    }
    if matches!(workload, Workload::Websocket | Workload::All) {
        let pg = TestPostgres::start();
        let app_port = free_port()?;
        let mut pipeline = Command::new(root().join("target/release/pipeline"))
            .args(["--listen", &format!("127.0.0.1:{app_port}")])
            .args([
                "--database-url",
                &format!(
                    "host=127.0.0.1 port={} user=postgres dbname=postgres",
                    pg.port
                ),
            ])
            .args(["--insert-mode", "batched"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the demo pipeline (cargo xtask build)")?;
        std::thread::sleep(Duration::from_secs(2));
        let configs: Vec<Config> = vec![
            ("without agent", None),
            (
                "pipelens --comm pipeline (websocket)",
                Some(vec!["--comm", "pipeline", "--collectors", "websocket"]),
            ),
            (
                "pipelens --comm pipeline (all collectors)",
                Some(vec!["--comm", "pipeline"]),
            ),
        ];
        let configs = with_baseline(configs);
        let results = interleave(&configs, rounds, |flags| ws_round(app_port, flags));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pipeline.id() as i32, libc::SIGTERM) };
        let _ = pipeline.wait();
        let results = results?;
        report.push_str(&table(
            "WebSocket messages through the demo pipeline",
            "messages/s",
            &configs,
            &results,
            Some(10_000.0),
        ));
        report.push_str(&format!(
            "\nloadgen: 10 publishing sessions, unpaced, 50,000 messages of 200 B in all per round; \
             the pipeline inserts in batches; {rounds} rounds.\n\n"
        ));
    }
    if matches!(workload, Workload::Memory | Workload::All) {
        report.push_str(&memory_bench(rounds, seconds.max(2.0))?);
    }
    println!("{report}");
    let out = root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("report.md"), &report)?;
    eprintln!("written to target/bench/report.md");
    Ok(())
}

fn interleave(
    configs: &[Config],
    rounds: usize,
    mut run: impl FnMut(Option<&[&str]>) -> anyhow::Result<Round>,
) -> anyhow::Result<Vec<Vec<Round>>> {
    let mut results: Vec<Vec<Round>> = configs.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        for k in 0..configs.len() {
            let i = (k + r) % configs.len();
            let (name, flags) = &configs[i];
            let round = run(flags.as_deref())?;
            eprintln!("round {r} {name:>42}: {:>9.0}/s", round.rate);
            results[i].push(round);
        }
    }
    Ok(results)
}

/// `per`: also report agent CPU per `per` operations per second.
fn table(
    title: &str,
    unit: &str,
    configs: &[Config],
    results: &[Vec<Round>],
    per: Option<f64>,
) -> String {
    let base = median(results[0].iter().map(|r| r.rate).collect());
    let mut out = format!(
        "### {title}\n\n| configuration | {unit} (median) | ratio to no agent | agent CPU (cores, median) |{} agent peak RSS |\n|---|---|---|---|{}---|\n",
        if per.is_some() {
            " agent CPU per 10k ops/s |"
        } else {
            ""
        },
        if per.is_some() { "---|" } else { "" },
    );
    for (i, (name, _)) in configs.iter().enumerate() {
        let rate = median(results[i].iter().map(|r| r.rate).collect());
        let cpu = median(
            results[i]
                .iter()
                .map(|r| r.agent_cpu_seconds / r.seconds)
                .collect(),
        );
        let rss = results[i]
            .iter()
            .map(|r| r.agent_peak_rss_kib)
            .max()
            .unwrap_or(0);
        let traced = i > 0;
        let cell = |s: String| if traced { s } else { "-".to_owned() };
        out.push_str(&format!(
            "| {name} | {rate:.0} | {:.3} | {} |{} {} |\n",
            rate / base,
            cell(format!("{cpu:.3}")),
            match per {
                Some(p) => format!(" {} |", cell(format!("{:.3}", cpu / (rate / p)))),
                None => String::new(),
            },
            cell(format!("{:.1} MiB", rss as f64 / 1024.0)),
        ));
    }
    out
}

fn churn_round(secs: u64, agent_flags: Option<&[&str]>) -> anyhow::Result<Round> {
    let port = free_port()?;
    with_agent(agent_flags, || {
        let mut peer = Command::new(root().join("target/release/tcp-peer"))
            .args(["churn", &port.to_string(), &secs.to_string(), "2"])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting tcp-peer (cargo xtask build)")?;
        let out = BufReader::new(peer.stdout.take().expect("stdout"));
        let mut total = None;
        for line in out.lines() {
            if let Some(n) = line?.trim().strip_prefix("done ") {
                total = Some(n.parse::<u64>()?);
            }
        }
        let _ = peer.wait();
        Ok((
            total.context("tcp-peer printed no total")? as f64 / secs as f64,
            secs as f64,
        ))
    })
}

fn pgbench_round(
    pg: &TestPostgres,
    secs: u64,
    agent_flags: Option<&[&str]>,
) -> anyhow::Result<Round> {
    with_agent(agent_flags, || {
        let secs_arg = secs.to_string();
        let out = pg.pgbench(
            false,
            &[
                "-S", "-M", "prepared", "-c", "4", "-j", "2", "-T", &secs_arg,
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("tps = "))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|tps| (tps, secs as f64))
            .context("pgbench printed no tps")
    })
}

fn ws_round(port: u16, agent_flags: Option<&[&str]>) -> anyhow::Result<Round> {
    with_agent(agent_flags, || {
        let out = Command::new(root().join("target/release/loadgen"))
            .args(["--target", &format!("127.0.0.1:{port}")])
            .args(["--sessions", "10", "--subscriber-share", "0", "--rate", "0"])
            .args(["--messages", "5000", "--message-size", "200"])
            .output()
            .context("loadgen")?;
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let sent = summary["publishers"]["messages_sent"]
            .as_f64()
            .context("messages_sent")?;
        let secs = summary["elapsed_secs"].as_f64().context("elapsed_secs")?;
        Ok((sent / secs, secs))
    })
}

/// Runs `workload` (returning its rate and how long it ran), with the
/// agent around it if asked.
fn with_agent(
    flags: Option<&[&str]>,
    workload: impl FnOnce() -> anyhow::Result<(f64, f64)>,
) -> anyhow::Result<Round> {
    let agent = match flags {
        Some(flags) => Some(start_agent(flags)?),
        None => None,
    };
    let cpu_before = agent.as_ref().map_or(0.0, |a| cpu_seconds(a.id()));
    let rate = workload();
    let (cpu, rss) = match &agent {
        Some(a) => (cpu_seconds(a.id()) - cpu_before, peak_rss_kib(a.id())),
        None => (0.0, 0),
    };
    if let Some(a) = agent {
        stop(a);
    }
    let (rate, seconds) = rate?;
    Ok(Round {
        rate,
        seconds,
        agent_cpu_seconds: cpu,
        agent_peak_rss_kib: rss,
    })
}

fn start_agent(flags: &[&str]) -> anyhow::Result<Child> {
    let port = free_port()?;
    let (binary, flags) = match flags.split_first() {
        Some((&BASELINE_FLAG, rest)) => (BASELINE.get().expect("--baseline").clone(), rest),
        _ => (root().join("target/release/pipelens"), flags),
    };
    let child = Command::new(binary)
        .args(["run", "--listen", &format!("127.0.0.1:{port}")])
        .args(flags)
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting pipelens")?;
    for _ in 0..300 {
        if let Ok(out) = Command::new("curl")
            .args(["-sf", &format!("http://127.0.0.1:{port}/healthz")])
            .output()
            && out.status.success()
        {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("pipelens did not become healthy")
}

fn stop(mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// How a memory round watches the malloc loop.
#[derive(Clone, Copy, PartialEq)]
enum MemoryWatcher {
    None,
    /// `pipelens run --collectors memory` (growth mode, the default).
    Growth,
    /// `pipelens memory --mode allocs` (512 KiB mean, pointers followed).
    Allocs,
    /// The same without following pointers: one probe per malloc.
    AllocsNoInUse,
    /// `uprobe:libc:malloc { @[ustack] = sum(arg0); }` for that process.
    Bpftrace,
    /// bpftrace following pointers too: malloc, its return, and free.
    BpftraceInUse,
}

const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

fn memory_bench(rounds: usize, seconds: f64) -> anyhow::Result<String> {
    let configs = [
        ("without agent", MemoryWatcher::None),
        (
            "pipelens run, memory collector (growth)",
            MemoryWatcher::Growth,
        ),
        ("pipelens memory --mode allocs", MemoryWatcher::Allocs),
        (
            "pipelens memory --mode allocs --no-in-use",
            MemoryWatcher::AllocsNoInUse,
        ),
        ("bpftrace malloc one-liner", MemoryWatcher::Bpftrace),
        (
            "bpftrace malloc + return + free",
            MemoryWatcher::BpftraceInUse,
        ),
    ];
    let mut results: Vec<Vec<(f64, f64, u64)>> = configs.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        for k in 0..configs.len() {
            let i = (k + r) % configs.len();
            let (name, watcher) = configs[i];
            let round = memory_round(watcher, seconds)?;
            eprintln!("round {r} {name:>42}: {:>8.1} ns/iter", round.0);
            results[i].push(round);
        }
    }
    let base = median(results[0].iter().map(|r| r.0).collect());
    let mut out = String::from(
        "### malloc-bound loop (malloc(64) + free, one thread)\n\n\
         | configuration | ns per iteration (median) | ratio of throughput to no agent | \
         agent CPU (s per round, median) | agent peak RSS |\n|---|---|---|---|---|\n",
    );
    for (i, (name, _)) in configs.iter().enumerate() {
        let ns = median(results[i].iter().map(|r| r.0).collect());
        let cpu = median(results[i].iter().map(|r| r.1).collect());
        let rss = results[i].iter().map(|r| r.2).max().unwrap_or(0);
        let traced = i > 0;
        out.push_str(&format!(
            "| {name} | {ns:.1} | {:.3} | {} | {} |\n",
            base / ns,
            if traced {
                format!("{cpu:.2}")
            } else {
                "-".into()
            },
            if traced {
                format!("{:.1} MiB", rss as f64 / 1024.0)
            } else {
                "-".into()
            },
        ));
    }
    out.push_str(&format!(
        "\nmalloc-loop --seconds {seconds}: each round starts a fresh loop, attaches the \
         watcher to it, then lets it run; {rounds} rounds, order rotated.\n\n"
    ));
    out.push_str(
        "### Sampled against unsampled: allocation mode on the fixture\n\n\
         | mean bytes per sample | allocated in retain_ten_mib (truth 10 MiB) | \
         allocated in churn_hundred_mib (truth 100 MiB) | in use from retain_ten_mib | samples |\n\
         |---|---|---|---|---|\n",
    );
    for r in 0..rounds.min(3) {
        for mean in ["0", "524288", "65536"] {
            let (retain, churn, in_use, samples) = accuracy_round(mean)?;
            eprintln!("accuracy round {r} mean {mean}: {retain:.2} {churn:.2} {in_use:.2} MiB");
            out.push_str(&format!(
                "| {mean} | {retain:.2} MiB | {churn:.2} MiB | {in_use:.2} MiB | {samples} |\n"
            ));
        }
    }
    out.push('\n');
    Ok(out)
}

/// The fixture's retain and churn phases under `pipelens memory --mode
/// allocs --sample-bytes MEAN`: (MiB allocated in retain, in churn, in use
/// from retain, samples).
fn accuracy_round(mean: &str) -> anyhow::Result<(f64, f64, f64, String)> {
    use std::io::Write as _;
    let mut fx = Command::new(root().join("target/release/alloc-fixture"))
        .args(["--phases", "retain,churn"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting alloc-fixture (cargo xtask build)")?;
    let mut out = BufReader::new(fx.stdout.take().expect("piped"));
    let mut line = String::new();
    out.read_line(&mut line)?;
    let pid = line
        .trim()
        .strip_prefix("ready ")
        .context("fixture not ready")?
        .to_string();
    let json = std::env::temp_dir().join(format!("pipelens-bench-{pid}.json"));
    let mut prof = Command::new(root().join("target/release/pipelens"))
        .args([
            "memory",
            "--mode",
            "allocs",
            "--duration",
            "600",
            "--pid",
            &pid,
        ])
        .args(["--sample-bytes", mean, "--format", "json", "-o"])
        .arg(&json)
        .stderr(Stdio::piped())
        .spawn()?;
    let mut err = BufReader::new(prof.stderr.take().expect("piped"));
    loop {
        line.clear();
        if err.read_line(&mut line)? == 0 {
            bail!("pipelens memory exited before attaching");
        }
        if line.contains("profiling ") {
            break;
        }
    }
    std::thread::spawn(move || for _ in err.lines() {});
    writeln!(fx.stdin.as_mut().expect("piped"), "go")?;
    loop {
        line.clear();
        if out.read_line(&mut line)? == 0 || line.starts_with("done") {
            break;
        }
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(prof.id() as i32, libc::SIGINT) };
    prof.wait()?;
    drop(fx.stdin.take());
    let _ = fx.wait();
    let profile: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    let _ = std::fs::remove_file(&json);
    let sum = |function: &str, col: usize| -> f64 {
        profile["stacks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| {
                s["frames"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|f| f["name"].as_str().is_some_and(|n| n.ends_with(function)))
            })
            .filter_map(|s| s["values"][col].as_f64())
            .sum::<f64>()
            / (1024.0 * 1024.0)
    };
    let samples = profile["notes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str())
        .find(|n| n.contains("sampled"))
        .and_then(|n| n.rsplit(", ").next())
        .unwrap_or("?")
        .to_string();
    Ok((
        sum("retain_ten_mib", 0),
        sum("churn_hundred_mib", 0),
        sum("retain_ten_mib", 2),
        samples,
    ))
}

/// One malloc loop under `watcher`: (ns per iteration, watcher CPU
/// seconds, watcher peak RSS KiB).
fn memory_round(watcher: MemoryWatcher, seconds: f64) -> anyhow::Result<(f64, f64, u64)> {
    let mut lp = Command::new(root().join("target/release/malloc-loop"))
        .args(["--wait", "--seconds", &seconds.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting malloc-loop (cargo xtask build)")?;
    let mut out = BufReader::new(lp.stdout.take().expect("piped"));
    let mut line = String::new();
    out.read_line(&mut line)?;
    let pid = line
        .trim()
        .strip_prefix("ready ")
        .context("malloc-loop did not say ready")?
        .to_string();
    let pipelens = root().join("target/release/pipelens");
    let (mut cmd, ready): (Command, &str) = match watcher {
        MemoryWatcher::None => (Command::new("true"), ""),
        MemoryWatcher::Growth => {
            let mut c = Command::new(&pipelens);
            c.args(["run", "--collectors", "memory", "--pid", &pid])
                .args(["--listen", &format!("127.0.0.1:{}", free_port()?)]);
            (c, "attached in")
        }
        MemoryWatcher::Allocs | MemoryWatcher::AllocsNoInUse => {
            let mut c = Command::new(&pipelens);
            c.args([
                "memory",
                "--mode",
                "allocs",
                "--duration",
                "3600",
                "--pid",
                &pid,
            ])
            .args(["-o", "/dev/null"]);
            if watcher == MemoryWatcher::AllocsNoInUse {
                c.arg("--no-in-use");
            }
            (c, "profiling ")
        }
        MemoryWatcher::Bpftrace | MemoryWatcher::BpftraceInUse => {
            // BEGIN runs once every probe is attached ("Attaching N
            // probes" is printed before).
            let program = if watcher == MemoryWatcher::Bpftrace {
                format!(
                    "BEGIN {{ printf(\"attached\\n\"); }} \
                     uprobe:{LIBC}:malloc {{ @[ustack] = sum(arg0); }}"
                )
            } else {
                format!(
                    "BEGIN {{ printf(\"attached\\n\"); }} \
                     uprobe:{LIBC}:malloc {{ @size[tid] = arg0; @stack[tid] = ustack; }} \
                     uretprobe:{LIBC}:malloc {{ @live[retval] = @size[tid]; \
                     @bytes[@stack[tid]] = sum(@size[tid]); }} \
                     uprobe:{LIBC}:free {{ delete(@live[arg0]); }}"
                )
            };
            let mut c = Command::new("bpftrace");
            c.args(["-p", &pid, "-e", &program]);
            (c, "attached")
        }
    };
    let mut agent = None;
    if watcher != MemoryWatcher::None {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the watcher")?;
        let (tx, rx) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("piped")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
        }
        loop {
            let l = rx
                .recv_timeout(Duration::from_secs(60))
                .context("the watcher never said it was attached")?;
            if l.contains(ready) {
                break;
            }
        }
        agent = Some(child);
    }
    let cpu_before = agent.as_ref().map_or(0.0, |a| cpu_seconds(a.id()));
    {
        use std::io::Write as _;
        writeln!(lp.stdin.as_mut().expect("piped"), "go")?;
    }
    let mut ns = None;
    for l in out.lines() {
        let l = l?;
        if let Some(v) = l.strip_prefix("ns_per_iter ") {
            ns = Some(v.trim().parse::<f64>()?);
        }
    }
    let _ = lp.wait();
    let (cpu, rss) = match &agent {
        Some(a) => (cpu_seconds(a.id()) - cpu_before, peak_rss_kib(a.id())),
        None => (0.0, 0),
    };
    if let Some(a) = agent {
        stop(a);
    }
    Ok((ns.context("malloc-loop printed no ns_per_iter")?, cpu, rss))
}
