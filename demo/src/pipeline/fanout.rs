//! Per-session outbound queues and the subscriber registry that fans each
//! event out to them.
//!
//! A slow subscriber is the interesting case. With a bounded queue the
//! server holds at most `capacity` messages for it and drops (and counts)
//! the rest; with an unbounded one its backlog — and the server's memory —
//! grows for as long as it stays slow.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;

use super::stats::PipelineStats;

/// The sending side of one session's outbound queue.
#[derive(Debug, Clone)]
pub enum OutboundSender {
    Bounded(mpsc::Sender<Utf8Bytes>),
    Unbounded(mpsc::UnboundedSender<Utf8Bytes>),
}

/// Why a message did not enter a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueError {
    /// Bounded queue at capacity: the message is dropped.
    Full,
    /// The session is ending.
    Closed,
}

impl OutboundSender {
    /// Queues a message without waiting, keeping the queued-messages gauge
    /// exact: it is raised before the message can be seen by the writer.
    pub fn enqueue(&self, message: Utf8Bytes, stats: &PipelineStats) -> Result<(), EnqueueError> {
        stats.enqueue_started();
        let result = match self {
            OutboundSender::Bounded(tx) => tx.try_send(message).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => EnqueueError::Full,
                mpsc::error::TrySendError::Closed(_) => EnqueueError::Closed,
            }),
            OutboundSender::Unbounded(tx) => tx.send(message).map_err(|_| EnqueueError::Closed),
        };
        if result.is_err() {
            stats.enqueue_failed();
        }
        result
    }
}

/// The receiving side, owned by the session's writer. Messages still queued
/// when it is dropped are taken off the gauge.
pub struct OutboundQueue {
    rx: OutboundReceiver,
    stats: Arc<PipelineStats>,
}

enum OutboundReceiver {
    Bounded(mpsc::Receiver<Utf8Bytes>),
    Unbounded(mpsc::UnboundedReceiver<Utf8Bytes>),
}

impl OutboundQueue {
    pub async fn recv(&mut self) -> Option<Utf8Bytes> {
        match &mut self.rx {
            OutboundReceiver::Bounded(rx) => rx.recv().await,
            OutboundReceiver::Unbounded(rx) => rx.recv().await,
        }
    }

    fn len(&self) -> usize {
        match &self.rx {
            OutboundReceiver::Bounded(rx) => rx.len(),
            OutboundReceiver::Unbounded(rx) => rx.len(),
        }
    }
}

impl Drop for OutboundQueue {
    fn drop(&mut self) {
        // Closing first means no sender can add a message after `len`.
        match &mut self.rx {
            OutboundReceiver::Bounded(rx) => rx.close(),
            OutboundReceiver::Unbounded(rx) => rx.close(),
        }
        self.stats.dequeued_unsent(self.len());
    }
}

/// A new outbound queue: bounded to `capacity` messages, or unbounded.
pub fn outbound_queue(
    capacity: Option<usize>,
    stats: Arc<PipelineStats>,
) -> (OutboundSender, OutboundQueue) {
    let (tx, rx) = match capacity {
        Some(capacity) => {
            let (tx, rx) = mpsc::channel(capacity.max(1));
            (OutboundSender::Bounded(tx), OutboundReceiver::Bounded(rx))
        }
        None => {
            let (tx, rx) = mpsc::unbounded_channel();
            (
                OutboundSender::Unbounded(tx),
                OutboundReceiver::Unbounded(rx),
            )
        }
    };
    (tx, OutboundQueue { rx, stats })
}

/// The sessions that asked for every event.
pub struct SubscriberRegistry {
    subscribers: Mutex<HashMap<u64, OutboundSender>>,
    stats: Arc<PipelineStats>,
}

impl SubscriberRegistry {
    pub fn new(stats: Arc<PipelineStats>) -> SubscriberRegistry {
        SubscriberRegistry {
            subscribers: Mutex::new(HashMap::new()),
            stats,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, OutboundSender>> {
        // Every critical section is a single map operation or non-blocking
        // sends: a poisoned lock still guards a consistent map.
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self, session: u64, tx: OutboundSender) {
        self.lock().insert(session, tx);
    }

    pub fn unsubscribe(&self, session: u64) {
        self.lock().remove(&session);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues `message` for every subscriber; never waits.
    pub fn publish(&self, message: &Utf8Bytes) {
        for tx in self.lock().values() {
            match tx.enqueue(message.clone(), &self.stats) {
                Ok(()) => self.stats.fanout_enqueued(),
                Err(EnqueueError::Full) => self.stats.fanout_dropped(),
                Err(EnqueueError::Closed) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_queues_drop_and_count_when_full() {
        let stats = Arc::new(PipelineStats::default());
        let registry = SubscriberRegistry::new(stats.clone());
        let (tx, mut queue) = outbound_queue(Some(2), stats.clone());
        registry.subscribe(1, tx);
        for i in 0..5 {
            registry.publish(&Utf8Bytes::from(format!("m{i}")));
        }
        let s = stats.snapshot();
        assert_eq!(
            (s.fanout_enqueued, s.fanout_dropped, s.outbound_queued),
            (2, 3, 2)
        );
        assert_eq!(queue.recv().await.as_deref(), Some("m0"));
        stats.message_sent(2);
        drop(queue);
        assert_eq!(stats.snapshot().outbound_queued, 0);
        // A subscriber whose queue is gone is skipped, not counted.
        registry.publish(&Utf8Bytes::from_static("late"));
        let s = stats.snapshot();
        assert_eq!((s.fanout_enqueued, s.fanout_dropped), (2, 3));
    }

    #[tokio::test]
    async fn unbounded_queues_keep_everything() {
        let stats = Arc::new(PipelineStats::default());
        let registry = SubscriberRegistry::new(stats.clone());
        let (tx, mut queue) = outbound_queue(None, stats.clone());
        registry.subscribe(7, tx);
        for i in 0..1000 {
            registry.publish(&Utf8Bytes::from(format!("m{i}")));
        }
        let s = stats.snapshot();
        assert_eq!(
            (s.fanout_enqueued, s.fanout_dropped, s.outbound_queued),
            (1000, 0, 1000)
        );
        assert_eq!(queue.recv().await.as_deref(), Some("m0"));
        registry.unsubscribe(7);
        assert!(registry.is_empty());
    }
}
