//! Command-line interface (the contract in the brief: every flag documented).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::collector::CollectorKind;

#[derive(Debug, Parser)]
#[command(
    name = "pipelens",
    version,
    about = "eBPF observability for a running service: connection lifecycles, query latencies, \
             WebSocket sessions and allocation hotspots, without touching its code",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to target processes and serve Prometheus metrics until stopped.
    Run(RunArgs),
    /// Profile one process's memory for a while: allocation hotspots
    /// (`--mode allocs`) or resident-set growth (`--mode growth`) by call stack.
    Memory(crate::memory::command::MemoryArgs),
    /// Report the kernel, hooks and collectors usable on this host, with reasons.
    Check,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Trace this process (and the children it forks). Repeatable.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Trace every process whose command name (comm, at most 15 bytes) is NAME,
    /// running now or started later. Repeatable, up to 8 names.
    #[arg(long = "comm", value_name = "NAME")]
    pub comms: Vec<String>,

    /// Trace every process on the host except pipelens itself.
    #[arg(long, conflicts_with_all = ["pids", "comms"])]
    pub all: bool,

    /// Comma-separated collectors to run (default: all of them).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub collectors: Vec<CollectorKind>,

    /// Address of the HTTP server for /metrics and /healthz.
    #[arg(long, default_value = "127.0.0.1:9464", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Stop after this many seconds (default: run until SIGINT/SIGTERM).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub duration: Option<Duration>,

    /// Also hook the accept and connect syscalls: attributes connections the
    /// accepting process closes without reading or writing them, and counts
    /// connect errors raised before any SYN is sent (ENETUNREACH, EACCES).
    /// Costs every syscall on the host the tracing slow path (see
    /// BENCHMARKS.md); off by default.
    #[arg(long)]
    pub syscall_hooks: bool,

    /// Bytes captured from the start of each read or write on a socket that
    /// a protocol parser follows (64 to 65536, sent in 4 KiB records).
    /// Framing survives shorter captures (unseen bytes are skipped by
    /// message lengths); statement text longer than this is cut.
    #[arg(long, default_value_t = 16384, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(64..=65536))]
    pub capture_bytes: u32,

    /// Memory collector: mean bytes of growth between samples of the write
    /// faults (and, with `--syscall-hooks`, anonymous mappings) of targets;
    /// 0 samples every one.
    #[arg(long, default_value_t = crate::memory::sampling::DEFAULT_GROWTH_MEAN, value_name = "BYTES")]
    pub memory_sample_bytes: u64,

    /// Memory collector: also put uprobes on the allocator of each `--pid`
    /// target (in that process only) for allocated and in-use bytes by
    /// site. Every allocator call then traps (see BENCHMARKS.md); for a
    /// time-boxed look prefer `pipelens memory --mode allocs`.
    #[arg(long)]
    pub memory_allocs: bool,

    /// Write a JSON summary of everything observed to PATH on exit.
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
}

pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("duration must be positive, got `{s}`"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_flags_parse() {
        let cli = Cli::try_parse_from([
            "pipelens",
            "run",
            "--pid",
            "1",
            "--pid",
            "2",
            "--comm",
            "postgres",
            "--collectors",
            "connections",
            "--listen",
            "127.0.0.1:0",
            "--duration",
            "1.5",
            "--summary-json",
            "/tmp/s.json",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.pids, [1, 2]);
        assert_eq!(run.comms, ["postgres"]);
        assert_eq!(run.collectors, [CollectorKind::Connections]);
        assert_eq!(run.duration, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn wrong_flags_are_rejected_with_a_reason() {
        let err = Cli::try_parse_from(["pipelens", "run", "--all", "--pid", "1"]).unwrap_err();
        assert!(err.to_string().contains("cannot be used with"), "{err}");
        let err = Cli::try_parse_from(["pipelens", "run", "--collectors", "nope"]).unwrap_err();
        assert!(err.to_string().contains("connections"), "{err}");
        let err = Cli::try_parse_from(["pipelens", "run", "--duration", "0"]).unwrap_err();
        assert!(err.to_string().contains("positive"), "{err}");
    }
}
