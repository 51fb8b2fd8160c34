//! `pipelens record`: a run of the agent that also keeps a book of every
//! series per interval ([`book`]) and writes it, with the targets' resident
//! memory sampled from `/proc`, as a versioned snapshot
//! (`pipelens_review::snapshot`) for `pipelens analyse` and
//! `pipelens compare`.

pub mod book;

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use pipelens_review::snapshot::{self, Interval, ProcessMemory, Snapshot};

use crate::{process, session::Session, targets::Selection};

/// What `record` adds to a run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub output: PathBuf,
    pub interval: Duration,
}

/// The processes whose memory a snapshot lists, at most (the largest):
/// `--all` would otherwise list every process of the host each interval.
const MAX_PROCESSES: usize = 256;

/// A recording under way.
pub struct Recording {
    plan: Plan,
    book: book::Book,
    selection: Selection,
    started: Instant,
    started_at: SystemTime,
    closed_at: Instant,
    intervals: Vec<Interval>,
    partial: Option<String>,
    progress: indicatif::ProgressBar,
}

impl Recording {
    /// Starts the first interval now (the collectors are attached).
    pub fn start(
        plan: Plan,
        book: book::Book,
        selection: Selection,
        duration: Option<Duration>,
    ) -> Self {
        // Whatever the collectors registered while attaching belongs to no
        // interval of the run.
        let _ = book.close_interval();
        let progress = match duration {
            Some(d) => indicatif::ProgressBar::new(d.as_secs()),
            None => indicatif::ProgressBar::new_spinner(),
        };
        progress.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("recording {bar:30} {pos}/{len} s  {msg}")
        {
            progress.set_style(style);
        }
        let now = Instant::now();
        Self {
            plan,
            book,
            selection,
            started: now,
            started_at: SystemTime::now(),
            closed_at: now,
            intervals: Vec::new(),
            partial: None,
            progress,
        }
    }

    pub fn interval(&self) -> Duration {
        self.plan.interval
    }

    /// Ends the interval under way.
    pub fn close_interval(&mut self, session: &Session) {
        let now = Instant::now();
        let page = self.book.close_interval();
        let processes = resident_memory(&session.traced_now());
        let interval = Interval {
            start_seconds: self.closed_at.duration_since(self.started).as_secs_f64(),
            duration_seconds: now.duration_since(self.closed_at).as_secs_f64(),
            counters: page.counters,
            gauges: page.gauges,
            histograms: page.histograms,
            processes,
        };
        self.progress
            .set_position(now.duration_since(self.started).as_secs());
        self.progress.set_message(live_figures(&interval));
        self.intervals.push(interval);
        self.closed_at = now;
    }

    /// Every `--pid` target has exited (and nothing else is selected): the
    /// rest of the run would be empty. Marks the recording partial.
    pub fn targets_gone(&mut self) -> bool {
        let s = &self.selection;
        if s.all || !s.comms.is_empty() || s.pids.is_empty() {
            return false;
        }
        if s.pids.iter().any(|p| process::exists(*p)) {
            return false;
        }
        let after = self.started.elapsed().as_secs_f64();
        self.mark_partial(format!(
            "every --pid target exited ({}) after {after:.1} s",
            join(&s.pids)
        ));
        true
    }

    pub fn mark_partial(&mut self, why: String) {
        self.partial.get_or_insert(why);
    }

    /// Closes the last interval (after the collectors drained what the
    /// kernel still held) and writes the snapshot; nothing is left under
    /// the output's name if the write fails.
    pub fn finish(mut self, session: &Session) -> anyhow::Result<PathBuf> {
        self.close_interval(session);
        self.progress.finish_and_clear();
        let doc = Snapshot {
            format: snapshot::FORMAT.to_owned(),
            schema_version: snapshot::SCHEMA_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            host: read_trimmed("/proc/sys/kernel/hostname"),
            targets: snapshot::Targets {
                all: self.selection.all,
                pids: self.selection.pids.clone(),
                comms: self.selection.comms.clone(),
            },
            started_at_unix_seconds: self
                .started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            duration_seconds: self.started.elapsed().as_secs_f64(),
            interval_seconds: self.plan.interval.as_secs_f64(),
            partial: self.partial,
            intervals: self.intervals,
        };
        crate::output::write_atomically(&self.plan.output, &doc.to_json())?;
        Ok(self.plan.output)
    }
}

fn join(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The resident memory of each traced process (threads in the target map
/// are folded into their process), the largest [`MAX_PROCESSES`].
fn resident_memory(traced: &[u32]) -> Vec<ProcessMemory> {
    let mut seen = std::collections::HashSet::new();
    let mut list: Vec<ProcessMemory> = traced
        .iter()
        .filter_map(|&pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let (tgid, rss) = parse_status(&status)?;
            if tgid != pid || !seen.insert(pid) {
                return None;
            }
            Some(ProcessMemory {
                pid,
                process: process::comm(pid).unwrap_or_default(),
                container: process::container_id(pid),
                rss_bytes: rss,
            })
        })
        .collect();
    list.sort_by(|a, b| b.rss_bytes.cmp(&a.rss_bytes).then(a.pid.cmp(&b.pid)));
    list.truncate(MAX_PROCESSES);
    list
}

/// `Tgid` and `VmRSS` (bytes) of a `/proc/<pid>/status`; a kernel thread
/// has no `VmRSS` and is left out.
fn parse_status(status: &str) -> Option<(u32, u64)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let tgid = field("Tgid:")?.parse().ok()?;
    let kib: u64 = field("VmRSS:")?.strip_suffix("kB")?.trim().parse().ok()?;
    Some((tgid, kib * 1024))
}

/// The interval's headline figures, for the progress line.
fn live_figures(i: &Interval) -> String {
    let secs = i.duration_seconds.max(1e-3);
    let count = |name: &str| -> u64 {
        i.histograms
            .iter()
            .filter(|h| h.series.name == name)
            .map(|h| h.sketch.count() as u64)
            .sum()
    };
    let messages: u64 = i
        .counters
        .iter()
        .filter(|c| c.series.name == "pipelens_websocket_messages_total")
        .map(|c| c.value)
        .sum();
    let sessions: f64 = i
        .gauges
        .iter()
        .filter(|g| g.series.name == "pipelens_websocket_sessions_active")
        .map(|g| g.last)
        .sum();
    let rss: u64 = i.processes.iter().map(|p| p.rss_bytes).sum();
    format!(
        "{:.0} statements/s  {:.0} requests/s  {:.0} messages/s  {sessions:.0} sessions  RSS {:.0} MiB",
        count("pipelens_db_query_duration_seconds") as f64 / secs,
        count("pipelens_http_server_request_duration_seconds") as f64 / secs,
        messages as f64 / secs,
        rss as f64 / (1 << 20) as f64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_gives_the_process_and_its_resident_bytes() {
        let status = "Name:\tpostgres\nTgid:\t4242\nPid:\t4243\nVmRSS:\t  10240 kB\n";
        assert_eq!(parse_status(status), Some((4242, 10 << 20)));
        assert_eq!(parse_status("Name:\tkthreadd\nTgid:\t2\n"), None);
    }

    #[test]
    fn the_recorders_own_memory_is_read_from_proc() {
        let me = std::process::id();
        let list = resident_memory(&[me, me]);
        assert_eq!(list.len(), 1, "one process, listed once");
        assert!(list[0].rss_bytes > 1 << 20, "{:?}", list[0]);
    }
}
