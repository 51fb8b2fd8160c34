//! What every collector shares: its name, and the health registry that
//! `/healthz`, `pipelens_collector_up` and `pipelens check` read.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, Mutex},
};

use clap::ValueEnum;
use serde::Serialize;

/// The collectors pipelens can run. One kernel object each, so that a
/// verifier rejection or a missing hook in one cannot take the others down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CollectorKind {
    /// TCP connection lifecycles: opens, closes, failures, bytes, retransmits, resets.
    Connections,
    /// PostgreSQL statements from the wire: latency, errors by SQLSTATE.
    Queries,
    /// WebSocket sessions and messages, HTTP/1.1 request latency.
    Websocket,
    /// Resident-set growth by call stack (and allocation hotspots with
    /// `--memory-allocs`).
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
