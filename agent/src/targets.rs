//! Target selection: which processes are traced. Decided inside the kernel
//! programs (the `TARGETS` map and the config's mode), kept current through
//! fork, exec and exit by the `targets` object.

use std::time::Duration;

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
    programs::TracePoint,
};
use pipelens_common::config::{
    AgentConfig, COMM_LEN, MAX_COMMS, MODE_ALL, MODE_TARGETS, SchedTracepointOffsets, TARGET_CHILD,
    TARGET_COMM, TARGET_EXPLICIT, TARGET_MAP_ERRORS,
};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::{
    objects::{self, LoadError, Loader},
    process,
    tracefs::{TracefsError, TracepointFormat},
};

#[derive(Debug, Error)]
pub enum TargetError {
    #[error("no process with pid {0}")]
    NoSuchPid(u32),
    #[error("nothing to trace: give --pid, --comm or --all")]
    Empty,
    #[error("at most {MAX_COMMS} --comm names are supported, got {0}")]
    TooManyComms(usize),
    #[error("--comm name is empty")]
    EmptyComm,
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("attaching {tracepoint}: {source}")]
    Attach {
        tracepoint: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("updating the target map: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// What the user asked to trace.
#[derive(Clone, Debug)]
pub struct Selection {
    pub all: bool,
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
}

impl Selection {
    pub fn validate(&self) -> Result<(), TargetError> {
        if !self.all && self.pids.is_empty() && self.comms.is_empty() {
            return Err(TargetError::Empty);
        }
        if self.comms.len() > MAX_COMMS {
            return Err(TargetError::TooManyComms(self.comms.len()));
        }
        if self.comms.iter().any(String::is_empty) {
            return Err(TargetError::EmptyComm);
        }
        if let Some(pid) = self.pids.iter().find(|p| !process::exists(**p)) {
            return Err(TargetError::NoSuchPid(*pid));
        }
        Ok(())
    }

    /// Names as the kernel stores them: comm is truncated to 15 bytes.
    pub fn kernel_comms(&self) -> Vec<String> {
        self.comms
            .iter()
            .map(|c| {
                let mut end = c.len().min(COMM_LEN - 1);
                while !c.is_char_boundary(end) {
                    end -= 1;
                }
                if end < c.len() {
                    log::warn!(
                        "--comm {c}: the kernel keeps 15 bytes of a process name; matching `{}`",
                        &c[..end]
                    );
                }
                c[..end].to_owned()
            })
            .collect()
    }

    pub fn agent_config(&self) -> AgentConfig {
        let mut cfg = AgentConfig::empty();
        cfg.agent_tgid = std::process::id();
        cfg.mode = if self.all { MODE_ALL } else { MODE_TARGETS };
        let comms = self.kernel_comms();
        cfg.comm_count = comms.len() as u32;
        for (slot, name) in cfg.comms.iter_mut().zip(&comms) {
            slot[..name.len()].copy_from_slice(name.as_bytes());
        }
        cfg
    }
}

/// The loaded `targets` object; dropping it detaches the fork/exec/exit
/// probes.
pub struct TargetTracker {
    ebpf: Ebpf,
    /// Stops the task exporting the object's failed inserts.
    stats_export: CancellationToken,
}

impl Drop for TargetTracker {
    fn drop(&mut self) {
        self.stats_export.cancel();
    }
}

/// Exports the targets object's failed `TARGETS` inserts every few seconds
/// (a fork or exec of a target while the map was full goes untraced), from
/// the first scrape on. Without a tokio runtime, once.
fn export_stats(stats: PerCpuArray<MapData, u64>, stop: CancellationToken) {
    let export = move || {
        if let Err(e) = objects::export_map_errors_from(&stats, "targets", &TARGET_MAP_ERRORS) {
            log::debug!("targets: map error counts: {e}");
        }
    };
    export();
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => export(),
                () = stop.cancelled() => break,
            }
        }
    });
}

/// Says, once each, when a `--pid` target exits and when its pid is taken
/// by a new process: that process is not the one asked for, so it is not
/// traced (its children forked before the exit still are).
fn watch_explicit(pids: &[u32], stop: CancellationToken) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let mut watched: Vec<(u32, Option<u64>, bool)> = pids
        .iter()
        .map(|&pid| (pid, process::start_time(pid), false))
        .collect();
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while !watched.is_empty() {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => break,
            }
            watched.retain_mut(|(pid, started, exited)| {
                let now = process::alive(*pid)
                    .then(|| process::start_time(*pid))
                    .flatten();
                if !*exited && now != *started {
                    log::warn!(
                        "--pid {pid} exited; its children stay traced, \
                         a new process given pid {pid} will not be"
                    );
                    *exited = true;
                }
                if *exited && now.is_some() {
                    log::warn!(
                        "pid {pid} now belongs to a new process ({}), which is not traced: \
                         it is not the --pid target",
                        process::comm(*pid).unwrap_or_default()
                    );
                    return false;
                }
                true
            });
        }
    });
}

impl TargetTracker {
    /// Loads and attaches the follow probes first, then seeds the map, so
    /// that a child forked while seeding is not missed.
    pub fn start(loader: &Loader, selection: &Selection) -> Result<Self, TargetError> {
        let fork = TracepointFormat::load("sched", "sched_process_fork")?;
        let exit = TracepointFormat::load("sched", "sched_process_exit")?;
        let offsets = SchedTracepointOffsets {
            fork_child_pid: fork.offset("child_pid")?,
            exit_group_dead: exit.offset_or_absent("group_dead"),
        };
        let mut ebpf = loader.load("targets", objects::TARGETS, |l| {
            l.override_global("SCHED_OFFSETS", &offsets, true);
        })?;
        for (prog, name) in [
            ("sched_process_fork", "sched:sched_process_fork"),
            ("sched_process_exec", "sched:sched_process_exec"),
            ("sched_process_exit", "sched:sched_process_exit"),
        ] {
            let tp: &mut TracePoint = ebpf
                .program_mut(prog)
                .expect("program defined in the object")
                .try_into()
                .expect("program is a tracepoint");
            tp.load()
                .and_then(|()| tp.attach("sched", prog).map(|_| ()))
                .map_err(|source| TargetError::Attach {
                    tracepoint: name,
                    source,
                })?;
        }
        let stats_export = CancellationToken::new();
        if let Some(map) = ebpf.take_map("TARGET_STATS") {
            export_stats(PerCpuArray::try_from(map)?, stats_export.clone());
        }
        let mut tracker = Self { ebpf, stats_export };
        if !selection.all {
            tracker.seed(selection)?;
            watch_explicit(&selection.pids, tracker.stats_export.clone());
        }
        Ok(tracker)
    }

    fn seed(&mut self, selection: &Selection) -> Result<(), TargetError> {
        let mut map: HashMap<_, u32, u32> =
            HashMap::try_from(self.ebpf.map_mut("TARGETS").expect("TARGETS in object"))?;
        let parents = process::parent_map();
        let by_comm = process::by_comm(&selection.kernel_comms());
        let explicit = process::with_descendants(&selection.pids, &parents);
        let named = process::with_descendants(&by_comm, &parents);
        for pid in &explicit {
            let kind = if selection.pids.contains(pid) {
                TARGET_EXPLICIT
            } else {
                TARGET_CHILD
            };
            map.insert(pid, kind, 0)?;
        }
        for pid in named.difference(&explicit) {
            map.insert(pid, TARGET_COMM, 0)?;
        }
        log::info!(
            "tracing {} running process(es){}",
            explicit.len() + named.difference(&explicit).count(),
            if selection.comms.is_empty() {
                String::new()
            } else {
                format!(" and any process named {:?}", selection.kernel_comms())
            }
        );
        Ok(())
    }

    /// The tgids currently targeted (for seeding existing connections).
    pub fn current(&self) -> Vec<u32> {
        let Some(map) = self.ebpf.map("TARGETS") else {
            return Vec::new();
        };
        let Ok(map) = HashMap::<_, u32, u32>::try_from(map) else {
            return Vec::new();
        };
        map.keys().filter_map(Result::ok).collect()
    }
}
