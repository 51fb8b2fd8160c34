//! The pipeline's own counters, served as JSON on `GET /stats`. Plain
//! application bookkeeping, the kind any service has — not instrumentation
//! for pipelens, which measures from outside.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
    },
};

use serde::Serialize;

#[derive(Debug, Default)]
pub struct PipelineStats {
    sessions_opened: AtomicU64,
    sessions_active: AtomicI64,
    subscribers_active: AtomicI64,
    messages_received: AtomicU64,
    bytes_received: AtomicU64,
    messages_rejected: AtomicU64,
    pings_received: AtomicU64,
    events_stored: AtomicU64,
    events_lost: AtomicU64,
    insert_errors: AtomicU64,
    fanout_enqueued: AtomicU64,
    fanout_dropped: AtomicU64,
    outbound_queued: AtomicI64,
    messages_sent: AtomicU64,
    bytes_sent: AtomicU64,
    /// Close frames received from clients, by status code (`none` when the
    /// frame carried no code).
    client_closes: Mutex<BTreeMap<String, u64>>,
    /// Sessions that ended without a close frame from the client (dropped
    /// TCP connection, protocol error).
    abnormal_disconnects: AtomicU64,
    /// Close handshakes the server started (shutdown).
    server_closes: AtomicU64,
}

/// `GET /stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub sessions_opened: u64,
    pub sessions_active: i64,
    pub subscribers_active: i64,
    pub messages_received: u64,
    pub bytes_received: u64,
    pub messages_rejected: u64,
    pub pings_received: u64,
    pub events_stored: u64,
    pub events_lost: u64,
    pub insert_errors: u64,
    pub fanout_enqueued: u64,
    pub fanout_dropped: u64,
    pub outbound_queued: i64,
    pub messages_sent: u64,
    pub bytes_sent: u64,
    pub client_closes: BTreeMap<String, u64>,
    pub abnormal_disconnects: u64,
    pub server_closes: u64,
}

impl PipelineStats {
    pub fn session_opened(&self, subscriber: bool) {
        self.sessions_opened.fetch_add(1, Relaxed);
        self.sessions_active.fetch_add(1, Relaxed);
        if subscriber {
            self.subscribers_active.fetch_add(1, Relaxed);
        }
    }

    pub fn session_closed(&self, subscriber: bool) {
        self.sessions_active.fetch_sub(1, Relaxed);
        if subscriber {
            self.subscribers_active.fetch_sub(1, Relaxed);
        }
    }

    pub fn message_received(&self, bytes: usize) {
        self.messages_received.fetch_add(1, Relaxed);
        self.bytes_received.fetch_add(bytes as u64, Relaxed);
    }

    pub fn message_rejected(&self) {
        self.messages_rejected.fetch_add(1, Relaxed);
    }

    pub fn ping_received(&self) {
        self.pings_received.fetch_add(1, Relaxed);
    }

    pub fn stored(&self, events: u64) {
        self.events_stored.fetch_add(events, Relaxed);
    }

    pub fn insert_failed(&self, events: u64) {
        self.insert_errors.fetch_add(1, Relaxed);
        self.events_lost.fetch_add(events, Relaxed);
    }

    /// A message is about to enter an outbound queue; undone by
    /// [`Self::enqueue_failed`] when the queue refuses it.
    pub fn enqueue_started(&self) {
        self.outbound_queued.fetch_add(1, Relaxed);
    }

    pub fn enqueue_failed(&self) {
        self.outbound_queued.fetch_sub(1, Relaxed);
    }

    pub fn fanout_enqueued(&self) {
        self.fanout_enqueued.fetch_add(1, Relaxed);
    }

    pub fn fanout_dropped(&self) {
        self.fanout_dropped.fetch_add(1, Relaxed);
    }

    /// `n` queued messages left their queue without being sent.
    pub fn dequeued_unsent(&self, n: usize) {
        self.outbound_queued.fetch_sub(n as i64, Relaxed);
    }

    pub fn message_sent(&self, bytes: usize) {
        self.outbound_queued.fetch_sub(1, Relaxed);
        self.messages_sent.fetch_add(1, Relaxed);
        self.bytes_sent.fetch_add(bytes as u64, Relaxed);
    }

    pub fn client_close(&self, code: Option<u16>) {
        let key = code.map_or_else(|| "none".to_owned(), |c| c.to_string());
        *self
            .client_closes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    pub fn abnormal_disconnect(&self) {
        self.abnormal_disconnects.fetch_add(1, Relaxed);
    }

    pub fn server_close(&self) {
        self.server_closes.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            sessions_opened: self.sessions_opened.load(Relaxed),
            sessions_active: self.sessions_active.load(Relaxed),
            subscribers_active: self.subscribers_active.load(Relaxed),
            messages_received: self.messages_received.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            messages_rejected: self.messages_rejected.load(Relaxed),
            pings_received: self.pings_received.load(Relaxed),
            events_stored: self.events_stored.load(Relaxed),
            events_lost: self.events_lost.load(Relaxed),
            insert_errors: self.insert_errors.load(Relaxed),
            fanout_enqueued: self.fanout_enqueued.load(Relaxed),
            fanout_dropped: self.fanout_dropped.load(Relaxed),
            outbound_queued: self.outbound_queued.load(Relaxed),
            messages_sent: self.messages_sent.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            client_closes: self
                .client_closes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            abnormal_disconnects: self.abnormal_disconnects.load(Relaxed),
            server_closes: self.server_closes.load(Relaxed),
        }
    }
}
