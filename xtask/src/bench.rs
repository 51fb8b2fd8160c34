//! `cargo xtask bench`: the workload with and without the agent, rounds
//! interleaved so that machine noise hits both alike; medians and ratios.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::root;

struct Round {
    rate: f64,
    agent_cpu_seconds: f64,
    agent_peak_rss_kib: u64,
}

pub fn run(rounds: usize, seconds: f64) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("the benchmark loads kernel programs: run it as root");
    }
    let secs = seconds.ceil().max(1.0) as u64;
    // (name, agent flags): None runs the workload alone.
    let configs: [(&str, Option<&[&str]>); 3] = [
        ("without agent", None),
        ("pipelens", Some(&[])),
        ("pipelens --syscall-hooks", Some(&["--syscall-hooks"])),
    ];
    let mut results: Vec<Vec<Round>> = configs.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        // Rotate which configuration goes first, so drift over the run
        // (thermal, other tenants) does not favour one of them.
        for k in 0..configs.len() {
            let i = (k + r) % configs.len();
            let (name, flags) = configs[i];
            let round = churn_round(secs, flags)?;
            eprintln!("round {r} {name:>26}: {:>9.0} conn/s", round.rate);
            results[i].push(round);
        }
    }
    let base = median(results[0].iter().map(|r| r.rate).collect());
    let mut report = String::from(
        "| configuration | connections/s (median) | ratio to no agent | agent CPU (cores, median) | agent peak RSS |\n|---|---|---|---|---|\n",
    );
    for (i, (name, _)) in configs.iter().enumerate() {
        let rate = median(results[i].iter().map(|r| r.rate).collect());
        let cpu = median(
            results[i]
                .iter()
                .map(|r| r.agent_cpu_seconds / secs as f64)
                .collect(),
        );
        let rss = results[i]
            .iter()
            .map(|r| r.agent_peak_rss_kib)
            .max()
            .unwrap_or(0);
        let (cpu, rss) = if i == 0 {
            ("-".to_owned(), "-".to_owned())
        } else {
            (
                format!("{cpu:.3}"),
                format!("{:.1} MiB", rss as f64 / 1024.0),
            )
        };
        report.push_str(&format!(
            "| {name} | {rate:.0} | {:.3} | {cpu} | {rss} |\n",
            rate / base
        ));
    }
    report.push_str(&format!(
        "\nWorkload: loopback connection churn (connect, 64 B each way, close), 2 client and \
         2 server threads in one process, both ends traced, {secs} s per round, {rounds} rounds \
         with the configurations interleaved.\n"
    ));
    println!("{report}");
    let out = root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("connections.md"), &report)?;
    eprintln!("written to target/bench/connections.md");
    Ok(())
}

fn churn_round(secs: u64, agent_flags: Option<&[&str]>) -> anyhow::Result<Round> {
    let port = free_port()?;
    let agent = match agent_flags {
        Some(flags) => Some(start_agent(flags)?),
        None => None,
    };
    let mut peer = Command::new(root().join("target/release/tcp-peer"))
        .args(["churn", &port.to_string(), &secs.to_string(), "2"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting tcp-peer (cargo xtask build)")?;
    let mut out = BufReader::new(peer.stdout.take().expect("stdout"));
    let cpu_before = agent.as_ref().map_or(0.0, |a| cpu_seconds(a.id()));
    let mut line = String::new();
    let mut total = None;
    while out.read_line(&mut line)? > 0 {
        if let Some(n) = line.trim().strip_prefix("done ") {
            total = Some(n.parse::<u64>()?);
        }
        line.clear();
    }
    let _ = peer.kill();
    let _ = peer.wait();
    let (cpu, rss) = match &agent {
        Some(a) => (cpu_seconds(a.id()) - cpu_before, peak_rss_kib(a.id())),
        None => (0.0, 0),
    };
    if let Some(a) = agent {
        stop(a);
    }
    let total = total.context("tcp-peer printed no total")?;
    Ok(Round {
        rate: total as f64 / secs as f64,
        agent_cpu_seconds: cpu,
        agent_peak_rss_kib: rss,
    })
}

fn start_agent(flags: &[&str]) -> anyhow::Result<Child> {
    let port = free_port()?;
    let child = Command::new(root().join("target/release/pipelens"))
        .args([
            "run",
            "--comm",
            "tcp-peer",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
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
