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
    let mut without = Vec::new();
    let mut with = Vec::new();
    for r in 0..rounds {
        // Alternate which configuration goes first, so drift over the run
        // (thermal, other tenants) does not favour one of them.
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for agent in order {
            let round = churn_round(secs, agent)?;
            eprintln!(
                "round {r} {:>13}: {:>9.0} conn/s",
                if agent { "with agent" } else { "without agent" },
                round.rate
            );
            if agent {
                with.push(round)
            } else {
                without.push(round)
            }
        }
    }
    let base = median(without.iter().map(|r| r.rate).collect());
    let traced = median(with.iter().map(|r| r.rate).collect());
    let cpu = median(
        with.iter()
            .map(|r| r.agent_cpu_seconds / secs as f64)
            .collect(),
    );
    let rss = with.iter().map(|r| r.agent_peak_rss_kib).max().unwrap_or(0);
    let report = format!(
        "| workload | without agent (median) | with agent (median) | ratio | agent CPU (cores) | agent peak RSS |\n\
         |---|---|---|---|---|---|\n\
         | loopback connection churn, {secs} s x {rounds} rounds, 2 client threads | {base:.0} conn/s | {traced:.0} conn/s | {:.3} | {cpu:.2} | {:.1} MiB |\n",
        traced / base,
        rss as f64 / 1024.0
    );
    println!("{report}");
    let out = root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("connections.md"), &report)?;
    eprintln!("written to target/bench/connections.md");
    Ok(())
}

fn churn_round(secs: u64, with_agent: bool) -> anyhow::Result<Round> {
    let port = free_port()?;
    let agent = if with_agent {
        Some(start_agent()?)
    } else {
        None
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

fn start_agent() -> anyhow::Result<Child> {
    let port = free_port()?;
    let child = Command::new(root().join("target/release/pipelens"))
        .args([
            "run",
            "--comm",
            "tcp-peer",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
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
