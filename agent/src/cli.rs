//! Command-line interface (the contract in the brief: every flag
//! documented). The only module that knows clap: each command's flags are
//! turned into that command's plain options here.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{
    Args, Parser, Subcommand,
    builder::{PossibleValue, PossibleValuesParser, TypedValueParser},
};
use pipelens_common::memory::STACK_WINDOW;

use crate::{
    collector::CollectorKind,
    memory::{self, command::Format, record::Mode},
    run,
    targets::Selection,
};

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
    /// What to fix, from a snapshot: per-event round trips, N+1 queries,
    /// slow templates, connection churn, unbounded growth, abnormal closes,
    /// each with its evidence and a suggested fix, costliest first.
    Analyse(AnalyseArgs),
    /// A run that also writes a snapshot for `analyse` and `compare`: every
    /// series per interval, latencies as sketches, the targets' memory.
    Record(RecordArgs),
    /// Profile one process's memory for a while: allocation hotspots
    /// (`--mode allocs`) or resident-set growth (`--mode growth`) by call stack.
    Memory(MemoryArgs),
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
    #[arg(long, value_delimiter = ',', value_name = "LIST", value_parser = one_of::<CollectorKind>())]
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
    /// a protocol parser follows (4096 to 65536, sent in 4 KiB records).
    /// Unseen bytes of a message are skipped by its length; a message that
    /// starts past the capture (a read holding a burst of queued messages)
    /// is lost and counted as a parse error; statement text longer than
    /// this is cut.
    #[arg(long, default_value_t = 16384, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(4096..=65536))]
    pub capture_bytes: u32,

    /// Memory collector: mean bytes of growth between samples of the write
    /// faults (and, with `--syscall-hooks`, anonymous mappings) of targets;
    /// 0 samples every one.
    #[arg(long, default_value_t = memory::sampling::DEFAULT_GROWTH_MEAN, value_name = "BYTES")]
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

    /// Queries: report double-quoted identifiers as `"?"` as well as
    /// literals. Unquoted names stay: they are the statement's shape, but a
    /// quoted one can carry anything (`"user@example.com"`).
    #[arg(long)]
    pub mask_identifiers: bool,

    /// The agent's resident memory is kept below this (bytes, or with KiB,
    /// MiB, GiB): from 70 % of it no new state is taken on (processes
    /// profiled, sockets followed), from 85 % profiles are let go. What is
    /// shed is counted in pipelens_shed_total. At least 64 MiB.
    #[arg(long, default_value = "128MiB", value_name = "SIZE", value_parser = parse_size)]
    pub memory_limit: u64,
}

impl RunArgs {
    pub fn into_options(self) -> run::Options {
        run::Options {
            selection: Selection {
                all: self.all,
                pids: self.pids,
                comms: self.comms,
            },
            collectors: self.collectors,
            listen: self.listen,
            duration: self.duration,
            syscall_hooks: self.syscall_hooks,
            capture_bytes: self.capture_bytes as usize,
            memory_sample_bytes: self.memory_sample_bytes,
            memory_allocs: self.memory_allocs,
            summary_json: self.summary_json,
            mask_identifiers: self.mask_identifiers,
            memory_limit: self.memory_limit,
            record: None,
        }
    }
}

#[derive(Debug, Args)]
pub struct AnalyseArgs {
    /// A snapshot written by `pipelens record`.
    #[arg(value_name = "SNAPSHOT")]
    pub snapshot: PathBuf,

    /// `text`, `markdown`, `json` or `html` (one self-contained page with
    /// its charts).
    #[arg(long, default_value = "text", value_parser = one_of::<ReviewFormat>())]
    pub format: ReviewFormat,

    /// Write the report to FILE instead of standard output.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
}

impl AnalyseArgs {
    pub fn into_options(self) -> crate::review::AnalyseOptions {
        crate::review::AnalyseOptions {
            snapshot: self.snapshot,
            format: self.format.0,
            output: self.output,
        }
    }
}

/// A review report's format, as clap offers it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReviewFormat(pub pipelens_review::analyse::Format);

impl FlagValue for ReviewFormat {
    const ALL: &'static [Self] = &[
        ReviewFormat(pipelens_review::analyse::Format::Text),
        ReviewFormat(pipelens_review::analyse::Format::Markdown),
        ReviewFormat(pipelens_review::analyse::Format::Json),
        ReviewFormat(pipelens_review::analyse::Format::Html),
    ];
    fn name(self) -> &'static str {
        use pipelens_review::analyse::Format;
        match self.0 {
            Format::Text => "text",
            Format::Markdown => "markdown",
            Format::Json => "json",
            Format::Html => "html",
        }
    }
    fn help(self) -> &'static str {
        use pipelens_review::analyse::Format;
        match self.0 {
            Format::Text => "A plain table and findings, for a terminal",
            Format::Markdown => "Tables for a pull request or a design document",
            Format::Json => "The whole result, machine-readable",
            Format::Html => "One self-contained page with its charts (no network, no script)",
        }
    }
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    #[command(flatten)]
    pub run: RunArgs,

    /// Write the snapshot (JSON) to FILE, atomically: a failed write leaves
    /// nothing under that name.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,

    /// Length of each interval of the snapshot, in seconds: the variation
    /// between intervals is what `compare` judges significance by.
    #[arg(long, default_value = "5", value_name = "SECS", value_parser = parse_secs)]
    pub interval: Duration,
}

impl RecordArgs {
    pub fn into_options(self) -> Result<run::Options, String> {
        if let Some(d) = self.run.duration
            && d < self.interval
        {
            return Err(format!(
                "--duration {:.1} is shorter than one --interval ({:.1} s)",
                d.as_secs_f64(),
                self.interval.as_secs_f64()
            ));
        }
        let mut opts = self.run.into_options();
        opts.record = Some(crate::record::Plan {
            output: self.output,
            interval: self.interval,
        });
        Ok(opts)
    }
}

#[derive(Debug, Args)]
pub struct MemoryArgs {
    /// The process to profile.
    #[arg(long, value_name = "PID")]
    pub pid: u32,

    /// How long to profile, in seconds (the profile is written earlier if
    /// the process exits or on SIGINT).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub duration: Duration,

    /// `allocs`: allocator calls by call stack (uprobes on the allocator
    /// the process uses, in that process only); `growth`: write faults on
    /// anonymous memory and anonymous mappings by call stack (no uprobes).
    #[arg(long, default_value = "allocs", value_parser = one_of::<Mode>())]
    pub mode: Mode,

    #[arg(long, default_value = "text", value_parser = one_of::<Format>())]
    pub format: Format,

    /// Write the profile to FILE instead of standard output.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Mean bytes between samples of the Poisson sampler (0: every call,
    /// fault and mapping). Default: 524288 for allocs, 65536 for growth.
    #[arg(long, value_name = "BYTES")]
    pub sample_bytes: Option<u64>,

    /// Allocated bytes only: do not follow sampled pointers to their
    /// `free` (one probe hit per allocation instead of three per
    /// allocation/free pair; no in-use figures).
    #[arg(long)]
    pub no_in_use: bool,

    /// Growth mode: page faults only, without the `mmap`/`brk`/`munmap`
    /// syscall hooks (which cost every syscall on the host while attached).
    #[arg(long)]
    pub faults_only: bool,

    /// Bytes of user stack copied with each sample and unwound here (up
    /// to 16384). Deep stacks with large frames need more; the stack is
    /// cut where the window ends (and the profile says how often).
    #[arg(long, default_value_t = 8192, value_name = "BYTES",
          value_parser = clap::value_parser!(u32).range(512..=STACK_WINDOW as i64))]
    pub stack_bytes: u32,

    /// Sites in the text table.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub top: usize,

    /// Value column for folded and SVG output (default: the first one:
    /// alloc_space or growth_space). One of alloc_space, alloc_objects,
    /// inuse_space, inuse_objects, growth_space, mapped_space.
    #[arg(long, value_name = "NAME")]
    pub value: Option<String>,
}

impl MemoryArgs {
    pub fn into_options(self) -> memory::command::Options {
        memory::command::Options {
            pid: self.pid,
            duration: self.duration,
            mode: self.mode,
            format: self.format,
            output: self.output,
            sample_bytes: self.sample_bytes,
            no_in_use: self.no_in_use,
            faults_only: self.faults_only,
            stack_bytes: self.stack_bytes,
            top: self.top,
            value: self.value,
        }
    }
}

/// A domain enum as a flag's value: its names, and a help line for each.
trait FlagValue: Copy + Send + Sync + 'static {
    const ALL: &'static [Self];
    fn name(self) -> &'static str;
    fn help(self) -> &'static str;
}

impl FlagValue for CollectorKind {
    const ALL: &'static [Self] = CollectorKind::ALL;
    fn name(self) -> &'static str {
        CollectorKind::name(self)
    }
    fn help(self) -> &'static str {
        match self {
            CollectorKind::Connections => {
                "TCP connection lifecycles: opens, closes, failures, bytes, retransmits, resets"
            }
            CollectorKind::Queries => {
                "PostgreSQL statements from the wire: latency, errors by SQLSTATE"
            }
            CollectorKind::Websocket => "WebSocket sessions and messages, HTTP/1.1 request latency",
            CollectorKind::Memory => {
                "Resident-set growth by call stack (and allocation hotspots with --memory-allocs)"
            }
        }
    }
}

impl FlagValue for Mode {
    const ALL: &'static [Self] = &[Mode::Growth, Mode::Allocs];
    fn name(self) -> &'static str {
        Mode::name(self)
    }
    fn help(self) -> &'static str {
        match self {
            Mode::Growth => {
                "Resident-set growth: write faults on anonymous memory, and anonymous mappings \
                 (mmap, brk), by call stack. No uprobes"
            }
            Mode::Allocs => {
                "Allocator calls (malloc family, jemalloc, mimalloc, tcmalloc) by call stack, \
                 sampled by bytes; in-use bytes of the sampled pointers"
            }
        }
    }
}

impl FlagValue for Format {
    const ALL: &'static [Self] = Format::ALL;
    fn name(self) -> &'static str {
        Format::name(self)
    }
    fn help(self) -> &'static str {
        match self {
            Format::Text => "Top sites and their heaviest stacks, for a terminal",
            Format::Folded => "Folded stacks (a;b;c 1234), for flamegraph.pl, inferno, speedscope",
            Format::Pprof => {
                "gzip-compressed pprof protobuf, for go tool pprof, Pyroscope, Grafana"
            }
            Format::Svg => "An interactive SVG flame graph",
            Format::Json => "Every stack with its frames and values, for scripts",
        }
    }
}

/// Parses one of `T`'s names; `--help` lists them with their help lines.
fn one_of<T: FlagValue>() -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(
        T::ALL
            .iter()
            .map(|v| PossibleValue::new(v.name()).help(v.help())),
    )
    .map(|name| {
        *T::ALL
            .iter()
            .find(|v| v.name() == name)
            .expect("a possible value")
    })
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

/// The smallest `--memory-limit`: the agent with every collector attached
/// and idle holds about 30 MiB (BENCHMARKS.md), and the governor acts from
/// 70 % of the limit.
pub const MIN_MEMORY_LIMIT: u64 = 64 << 20;

/// A size in bytes: a number, optionally followed by KiB, MiB or GiB (K, M,
/// G and KB, MB, GB are read as the same powers of two).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a size (for example 128MiB)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}`: use KiB, MiB or GiB"
            ));
        }
    };
    let bytes = number * scale as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(format!("`{s}` is too large"));
    }
    let bytes = bytes as u64;
    if bytes < MIN_MEMORY_LIMIT {
        return Err(format!(
            "`{s}` is below the smallest limit, {} MiB",
            MIN_MEMORY_LIMIT >> 20
        ));
    }
    Ok(bytes)
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
    fn sizes_parse_in_powers_of_two_and_refuse_what_is_not_one() {
        assert_eq!(parse_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("100000000"), Ok(100_000_000));
        assert_eq!(parse_size("65536KiB"), Ok(64 << 20));
        assert!(
            parse_size("32MiB")
                .unwrap_err()
                .contains("smallest limit, 64 MiB")
        );
        assert!(
            parse_size("12 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_size("MiB").unwrap_err().contains("not a size"));
        let cli = Cli::try_parse_from(["pipelens", "run", "--all"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.memory_limit, 128 << 20, "the documented default");
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
