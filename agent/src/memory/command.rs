//! `pipelens memory`: a time-boxed profile of one process, written as a
//! text table, folded stacks, pprof or an SVG flame graph.

use std::{
    io::{IsTerminal as _, Write as _},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    allocator,
    modules::Modules,
    probes::{MemoryProbes, Record, SamplerSettings, parse},
    record::{Mode, Recorder},
    report, sampling,
};
use crate::{process, session::Session, targets};

/// Output formats of a profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Top sites and their heaviest stacks, for a terminal.
    Text,
    /// Folded stacks (`a;b;c 1234`), for flamegraph.pl, inferno, speedscope.
    Folded,
    /// gzip-compressed pprof protobuf, for go tool pprof, Pyroscope, Grafana.
    Pprof,
    /// An interactive SVG flame graph.
    Svg,
    /// Every stack with its frames and values, for scripts.
    Json,
}

impl Format {
    pub const ALL: &'static [Format] = &[
        Format::Text,
        Format::Folded,
        Format::Pprof,
        Format::Svg,
        Format::Json,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Folded => "folded",
            Format::Pprof => "pprof",
            Format::Svg => "svg",
            Format::Json => "json",
        }
    }
}

/// What `pipelens memory` was asked for (the CLI's `memory` flags).
#[derive(Clone, Debug)]
pub struct Options {
    /// The process to profile.
    pub pid: u32,
    pub duration: Duration,
    pub mode: Mode,
    pub format: Format,
    /// `None`: standard output.
    pub output: Option<PathBuf>,
    /// Mean bytes between samples; `None`: the mode's default.
    pub sample_bytes: Option<u64>,
    /// Do not follow sampled pointers to their `free`.
    pub no_in_use: bool,
    /// Growth mode without the mapping syscall hooks.
    pub faults_only: bool,
    /// Bytes of user stack copied with each sample.
    pub stack_bytes: u32,
    /// Sites in the text table.
    pub top: usize,
    /// Value column for folded and SVG output; `None`: the first.
    pub value: Option<String>,
}

pub async fn run(args: Options) -> anyhow::Result<()> {
    if !process::exists(args.pid) {
        bail!("process {} does not exist", args.pid);
    }
    let columns = args.mode.value_types();
    let column = match &args.value {
        None => 0,
        Some(v) => columns.iter().position(|c| c.name == v).with_context(|| {
            let names: Vec<_> = columns.iter().map(|c| c.name).collect();
            format!(
                "--value {v}: {} mode has {}",
                args.mode.name(),
                names.join(", ")
            )
        })?,
    };
    if args.mode == Mode::Allocs && !crate::privileges::can_attach_uprobes() {
        bail!(
            "--mode allocs needs CAP_SYS_ADMIN: without it {} (try --mode growth)",
            crate::privileges::UPROBES_NEED_SYS_ADMIN
        );
    }
    let session = Session::open(targets::Selection {
        all: false,
        pids: vec![args.pid],
        comms: Vec::new(),
    })?;
    let comm = process::comm(args.pid).unwrap_or_default();
    let track_frees = args.mode == Mode::Allocs && !args.no_in_use;
    let mean = args.sample_bytes.unwrap_or(match args.mode {
        Mode::Allocs => sampling::DEFAULT_ALLOC_MEAN,
        Mode::Growth => sampling::DEFAULT_GROWTH_MEAN,
    });
    let allocators = match args.mode {
        Mode::Allocs => Some(allocator::find(args.pid)?),
        Mode::Growth => None,
    };
    let settings = SamplerSettings {
        alloc_mean: mean,
        growth_mean: mean,
        track_frees,
        stack_bytes: args.stack_bytes,
        // A time-boxed profile may sample every call: room for thousands.
        ring_bytes: 64 << 20,
    };
    let mut probes = MemoryProbes::load(&session.loader, settings)?;
    let mut shared = Modules::default();
    let mut recorder = Recorder::new(
        args.pid,
        comm.clone(),
        args.mode,
        mean,
        track_frees,
        &mut shared,
    )?;
    let mut notes = Vec::new();
    match &allocators {
        Some(found) => {
            let n = probes.attach_allocator(args.pid, found, track_frees)?;
            let mut families: Vec<String> = found.iter().map(|p| p.family.to_string()).collect();
            families.sort();
            families.dedup();
            log::info!(
                "{n} uprobes on {} in process {} only",
                families.join(", "),
                args.pid
            );
            notes.push(format!("allocator: {}", families.join(", ")));
        }
        None => {
            probes.attach_growth(!args.faults_only)?;
            if let Some(brk) = current_brk(args.pid) {
                probes.seed_brk(args.pid, brk)?;
            }
        }
    }
    let mut ring = probes.take_ring()?;
    eprintln!(
        "profiling {} (pid {}) for {:.0?}, mode {}, one sample per {} on average",
        comm,
        args.pid,
        args.duration,
        args.mode.name(),
        if mean == 0 {
            "event".to_string()
        } else {
            format!("{mean} bytes")
        }
    );

    recorder.start_clock();
    let deadline = tokio::time::Instant::now() + args.duration;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut last_progress = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut ended = None;
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut recorder, &mut shared);
                guard.clear_ready();
            }
            _ = tick.tick() => {
                if !process::alive(args.pid) {
                    ended = Some(format!(
                        "process {} exited after {:.1} s: the profile covers its life until then",
                        args.pid,
                        recorder.elapsed().as_secs_f64()
                    ));
                    break;
                }
                let every = if tty { Duration::from_secs(1) } else { Duration::from_secs(5) };
                if last_progress.elapsed() >= every {
                    last_progress = Instant::now();
                    progress(&recorder, &args, tty);
                }
            }
            () = tokio::time::sleep_until(deadline) => break,
            _ = interrupt.recv() => {
                ended = Some(format!(
                    "interrupted after {:.1} s", recorder.elapsed().as_secs_f64()
                ));
                break;
            }
        }
    }
    // Whatever the kernel sent before the probes go.
    drain(ring.get_mut(), &mut recorder, &mut shared);
    let counts = probes.counts();
    drop(ring);
    drop(probes);
    drop(session);
    if tty {
        eprintln!();
    }
    if let Some(why) = &ended {
        eprintln!("{why}");
        notes.push(why.clone());
    }
    if counts.lost > 0 {
        notes.push(format!(
            "{} samples or notes lost: the ring buffer was full (the totals are low by that much)",
            counts.lost
        ));
    }
    if counts.live_full > 0 {
        notes.push(format!(
            "{} sampled pointers not followed: the live map was full (in-use figures are low)",
            counts.live_full
        ));
    }
    if recorder.truncated > 0 {
        notes.push(format!(
            "{} of {} stacks ended early (stack window or unwind information exhausted)",
            recorder.truncated, recorder.samples
        ));
    }
    if counts.stack_unreadable > 0 {
        notes.push(format!(
            "{} samples without a readable user stack",
            counts.stack_unreadable
        ));
    }
    if args.mode == Mode::Allocs {
        notes.push(format!(
            "{} allocator calls seen, {} sampled",
            counts.calls, recorder.samples
        ));
    } else {
        notes.push(format!(
            "{} write faults seen, {} sampled ({} on file-backed memory, left out)",
            counts.faults, recorder.samples, recorder.non_anonymous_faults
        ));
    }
    let profile = recorder.profile(notes);
    let bytes = match args.format {
        Format::Text => report::text(&profile, args.top).into_bytes(),
        Format::Folded => report::folded(&profile, column).into_bytes(),
        Format::Svg => report::svg(&profile, column)?,
        Format::Pprof => report::pprof(&profile)?,
        Format::Json => serde_json::to_vec_pretty(&profile.to_json())?,
    };
    match &args.output {
        Some(path) => {
            std::fs::write(path, &bytes)
                .with_context(|| format!("writing the profile to {}", path.display()))?;
            eprintln!("profile written to {}", path.display());
        }
        None => std::io::stdout().write_all(&bytes)?,
    }
    Ok(())
}

fn drain(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    recorder: &mut Recorder,
    shared: &mut Modules,
) {
    while let Some(item) = ring.next() {
        match parse(&item) {
            Some(Record::Sample(head, stack)) => recorder.sample(&head, stack, shared),
            Some(Record::Note(note)) => recorder.note(&note),
            None => {}
        }
    }
}

fn progress(recorder: &Recorder, args: &Options, tty: bool) {
    let what = match args.mode {
        Mode::Allocs => "allocated",
        Mode::Growth => "grown",
    };
    let line = format!(
        "{:>4.0}/{:.0} s  {} samples  {} {}",
        recorder.elapsed().as_secs_f64(),
        args.duration.as_secs_f64(),
        recorder.samples,
        report::human_bytes(recorder.first_total()),
        what
    );
    if tty {
        eprint!("\r{line}   ");
    } else {
        eprintln!("{line}");
    }
}

/// The program break of `pid` now: the end of its `[heap]` mapping, or
/// `start_brk` from `/proc/<pid>/stat` while it has no heap yet.
fn current_brk(pid: u32) -> Option<u64> {
    let maps = super::maps::ProcessMaps::read(pid).ok()?;
    if let Some(heap) = maps
        .mappings
        .iter()
        .find(|m| m.path.as_deref() == Some("[heap]"))
    {
        return Some(heap.end);
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised comm; start_brk is field 47.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(47 - 3)?.parse().ok()
}
