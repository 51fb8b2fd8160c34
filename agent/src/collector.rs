//! What every collector shares: its name, the shape `pipelens run` drives
//! it through ([`Collector`], [`Attached`]), and the health registry that
//! `/healthz`, `pipelens_collector_up` and `pipelens check` read.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{objects::ProbeError, session::Session};

/// The collectors pipelens can run, as users name them. Each has its own
/// kernel object (the payload analysers share one), so that a verifier
/// rejection or a missing hook in one cannot take the others down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CollectorKind {
    Connections,
    Queries,
    Websocket,
    Memory,
}

impl CollectorKind {
    pub const ALL: &'static [CollectorKind] = &[
        CollectorKind::Connections,
        CollectorKind::Queries,
        CollectorKind::Websocket,
        CollectorKind::Memory,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CollectorKind::Connections => "connections",
            CollectorKind::Queries => "queries",
            CollectorKind::Websocket => "websocket",
            CollectorKind::Memory => "memory",
        }
    }
}

/// One way a collector hooks this kernel (`pipelens_collector_hook_info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    /// What the hook is for: `state`, `bytes`, `payload`, `faults`, ...
    pub hook: &'static str,
    /// How: `raw_tracepoint`, `fexit`, `kprobe`, `tracepoint`, `uprobe`, ...
    pub kind: &'static str,
    /// Which kernel events or functions.
    pub target: &'static str,
}

/// A summary section: its key in `--summary-json`, and its content.
pub type Section = (&'static str, serde_json::Value);

/// A collector as requested, with its settings: which kinds' health it
/// carries, and how it loads and attaches its kernel object in a session.
/// `pipelens run` is wiring over a list of these (`run::collectors`).
pub trait Collector {
    /// The collectors, as users name them, that stand or fall with this one
    /// (the payload analysers share one capture object).
    fn kinds(&self) -> Vec<CollectorKind>;
    /// Loads and attaches its kernel object; a failure leaves nothing
    /// attached and marks its kinds down.
    fn start(self: Box<Self>, session: &Session) -> Result<Box<dyn Attached>, ProbeError>;
}

/// A collector whose kernel object is attached.
pub trait Attached: Send {
    /// The hooks it chose on this kernel, best first.
    fn hooks(&self) -> Vec<Hook>;
    /// Runs its reader until `shutdown`, then drains what the kernel still
    /// holds; resolves to its summary sections. Dropping what it ran
    /// detaches every probe.
    fn spawn(self: Box<Self>, shutdown: CancellationToken) -> Running;
}

/// A running collector's reader.
pub type Running = tokio::task::JoinHandle<Result<Vec<Section>, ProbeError>>;

impl fmt::Display for CollectorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "lowercase")]
pub enum Status {
    /// Requested, not attached yet.
    Starting,
    /// Every probe attached.
    Up,
    /// Could not attach; the reason is shown in /healthz and logs.
    Down(String),
}

/// Shared health of the requested collectors.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Mutex<BTreeMap<CollectorKind, Status>>>,
}

impl Health {
    pub fn new(requested: &[CollectorKind]) -> Self {
        let health = Self::default();
        for kind in requested {
            health.set(*kind, Status::Starting);
        }
        health
    }

    pub fn set(&self, kind: CollectorKind, status: Status) {
        let up = if status == Status::Up { 1.0 } else { 0.0 };
        metrics::gauge!("pipelens_collector_up", "collector" => kind.name()).set(up);
        self.lock().insert(kind, status);
    }

    /// True once every requested collector is attached.
    pub fn all_up(&self) -> bool {
        let map = self.lock();
        !map.is_empty() && map.values().all(|s| *s == Status::Up)
    }

    pub fn snapshot(&self) -> BTreeMap<CollectorKind, Status> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<CollectorKind, Status>> {
        // A poisoned lock only means a panic elsewhere; the map is still valid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_only_when_every_requested_collector_is_up() {
        let h = Health::new(&[CollectorKind::Connections]);
        assert!(!h.all_up());
        h.set(
            CollectorKind::Connections,
            Status::Down("no tracepoint".into()),
        );
        assert!(!h.all_up());
        h.set(CollectorKind::Connections, Status::Up);
        assert!(h.all_up());
        assert!(!Health::new(&[]).all_up());
    }
}
