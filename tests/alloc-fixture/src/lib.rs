//! Allocation fixtures for the memory tests and benchmarks: processes that
//! allocate known sizes in known functions, the ground truth the memory
//! profiler is compared with.
//!
//! `alloc-fixture` (glibc malloc) and `alloc-fixture-jemalloc` (a statically
//! linked jemalloc, symbols prefixed `_rjem_`) run the same [`workload`]:
//!
//! ```text
//! alloc-fixture [--phases retain,churn,map] [--repeat N] [--no-wait] [--exit-when-done]
//!
//! stdout: ready <pid>                 once started
//! stdin:  go                          (skipped with --no-wait)
//!         ... the phases run, in the order given ...
//! stdout: done {json}                 what was actually done
//! stdin:  exit, or EOF                then exit 0 (--exit-when-done: at once)
//! ```
//!
//! Every line is flushed as it is written. They are built without frame
//! pointers, optimised, with symbols and line tables (see the workspace
//! `Cargo.toml`), like the services the profiler is pointed at.

pub mod workload;

use std::{
    io::{BufRead, Write},
    process::ExitCode,
};

use workload::{Done, Kept, Phase};

/// Command line of the allocation fixtures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub phases: Vec<Phase>,
    pub repeat: u32,
    pub wait: bool,
    pub exit_when_done: bool,
}

pub const USAGE: &str =
    "usage: alloc-fixture [--phases retain,churn,map] [--repeat N] [--no-wait] [--exit-when-done]";

impl Args {
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut out = Args {
            phases: vec![Phase::Retain, Phase::Churn, Phase::Map],
            repeat: 1,
            wait: true,
            exit_when_done: false,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = |flag: &str| args.next().ok_or(format!("{flag} needs a value"));
            match arg.as_str() {
                "--phases" => {
                    let list = value("--phases")?;
                    out.phases = list
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(|s| Phase::parse(s).ok_or(format!("unknown phase `{s}`")))
                        .collect::<Result<_, _>>()?;
                }
                "--repeat" => {
                    let n = value("--repeat")?;
                    out.repeat = n
                        .parse()
                        .map_err(|_| format!("--repeat wants a count, got `{n}`"))?;
                }
                "--no-wait" => out.wait = false,
                "--exit-when-done" => out.exit_when_done = true,
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        Ok(out)
    }
}

/// Writes one line to stdout and flushes it.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A reader that went away is not this process's problem: it is told
    // to exit through stdin.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// What ended a wait on stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    Go,
    Exit,
    Eof,
}

/// Reads stdin lines until `go`, `exit` or end of file.
/// Waits for `go`; the exit code to leave with when `exit` or the end of
/// input comes first.
pub fn await_go() -> Result<(), ExitCode> {
    match wait_stdin() {
        Heard::Go => Ok(()),
        Heard::Exit => Err(ExitCode::SUCCESS),
        Heard::Eof => {
            eprintln!("stdin closed before `go`");
            Err(ExitCode::FAILURE)
        }
    }
}

pub fn wait_stdin() -> Heard {
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        line.clear();
        match stdin.lock().read_line(&mut line) {
            Ok(0) | Err(_) => return Heard::Eof,
            Ok(_) => match line.trim() {
                "go" => return Heard::Go,
                "exit" => return Heard::Exit,
                "" => {}
                other => eprintln!("ignoring stdin line `{other}` (want go or exit)"),
            },
        }
    }
}

/// The `done` line's JSON.
pub fn done_json(allocator: &str, args: &Args, done: &Done) -> String {
    let phases = args
        .phases
        .iter()
        .map(|p| format!("\"{}\"", p.name()))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        concat!(
            "{{\"allocator\":\"{}\",\"pid\":{},\"phases\":[{}],\"repeat\":{},",
            "\"retain_bytes\":{},\"retain_blocks\":{},\"retain_block_size\":{},",
            "\"churn_bytes\":{},\"churn_blocks\":{},\"churn_block_size\":{},",
            "\"map_bytes\":{},\"map_regions\":{},\"map_region_size\":{},\"map_pages\":{},",
            "\"module\":\"pipelens_alloc_fixture::workload\",",
            "\"functions\":{{\"retain\":\"{}\",\"churn\":\"{}\",\"map\":\"{}\",",
            "\"entry\":\"run_phases\",\"alloc\":\"alloc_block\",\"free\":\"free_block\",",
            "\"mmap\":\"map_region\"}}}}"
        ),
        allocator,
        std::process::id(),
        phases,
        args.repeat,
        done.retain_bytes,
        done.retain_blocks,
        workload::RETAIN_BLOCK,
        done.churn_bytes,
        done.churn_blocks,
        workload::CHURN_BLOCK,
        done.map_bytes,
        done.map_bytes / workload::MAP_REGION as u64,
        workload::MAP_REGION,
        done.map_pages,
        Phase::Retain.function(),
        Phase::Churn.function(),
        Phase::Map.function(),
    )
}

/// The whole fixture; `allocator` names the global allocator of the
/// calling binary, for the `done` line.
#[inline(never)]
pub fn fixture_main(allocator: &str) -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    say(&format!("ready {}", std::process::id()));
    if args.wait
        && let Err(code) = await_go()
    {
        return code;
    }
    let mut kept = Kept::new();
    let done = workload::run_phases(&args.phases, args.repeat, &mut kept);
    say(&format!("done {}", done_json(allocator, &args, &done)));
    if !args.exit_when_done {
        while wait_stdin() == Heard::Go {}
    }
    // What was kept stays allocated and mapped up to the very exit.
    std::hint::black_box(&kept);
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Args, String> {
        Args::parse(s.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn parses_the_command_line() {
        let a = parse("").unwrap();
        assert_eq!(a.phases, [Phase::Retain, Phase::Churn, Phase::Map]);
        assert_eq!((a.repeat, a.wait, a.exit_when_done), (1, true, false));
        let a = parse("--phases map,retain --repeat 3 --no-wait --exit-when-done").unwrap();
        assert_eq!(a.phases, [Phase::Map, Phase::Retain]);
        assert_eq!((a.repeat, a.wait, a.exit_when_done), (3, false, true));
        assert!(parse("--phases bogus").is_err());
        assert!(parse("--repeat").is_err());
        assert!(parse("--frob").is_err());
    }
}
