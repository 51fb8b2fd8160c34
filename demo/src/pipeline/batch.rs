//! Batched inserts: events wait in a buffer until it holds `max_rows` of
//! them or its oldest has waited `max_delay`, then go to PostgreSQL in one
//! multi-row INSERT.

use std::{sync::Arc, time::Duration};

use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{event::Event, stats::PipelineStats, store::EventStore};

/// The buffering rule, free of I/O and clocks so that it can be tested.
#[derive(Debug)]
pub struct BatchBuffer<T> {
    items: Vec<T>,
    max_rows: usize,
    max_delay: Duration,
    /// When the oldest buffered item arrived.
    oldest: Option<Instant>,
}

impl<T> BatchBuffer<T> {
    pub fn new(max_rows: usize, max_delay: Duration) -> BatchBuffer<T> {
        let max_rows = max_rows.max(1);
        BatchBuffer {
            items: Vec::with_capacity(max_rows),
            max_rows,
            max_delay,
            oldest: None,
        }
    }

    /// Adds an item that arrived at `now`; returns a full batch when this
    /// item completes one.
    pub fn push(&mut self, item: T, now: Instant) -> Option<Vec<T>> {
        self.oldest.get_or_insert(now);
        self.items.push(item);
        if self.items.len() >= self.max_rows {
            self.take()
        } else {
            None
        }
    }

    /// When the current batch must be flushed even if not full.
    pub fn deadline(&self) -> Option<Instant> {
        self.oldest.map(|t| t + self.max_delay)
    }

    /// The buffered items if their deadline has passed at `now`.
    pub fn take_due(&mut self, now: Instant) -> Option<Vec<T>> {
        match self.deadline() {
            Some(deadline) if deadline <= now => self.take(),
            _ => None,
        }
    }

    /// Everything buffered, whatever its age (for shutdown).
    pub fn take(&mut self) -> Option<Vec<T>> {
        self.oldest = None;
        if self.items.is_empty() {
            None
        } else {
            Some(std::mem::replace(
                &mut self.items,
                Vec::with_capacity(self.max_rows),
            ))
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// The task that owns the buffer and writes batches. Sessions hand it events
/// through the channel; `stop` makes it drain the channel, write what is
/// left and return.
pub async fn write_batches(
    mut events: mpsc::Receiver<Event>,
    mut buffer: BatchBuffer<Event>,
    store: Arc<EventStore>,
    stats: Arc<PipelineStats>,
    stop: CancellationToken,
) {
    loop {
        let deadline = buffer.deadline();
        let due = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => {
                    if let Some(batch) = buffer.push(event, Instant::now()) {
                        flush(&store, &stats, batch).await;
                    }
                }
                None => break,
            },
            () = due => {
                if let Some(batch) = buffer.take_due(Instant::now()) {
                    flush(&store, &stats, batch).await;
                }
            }
            () = stop.cancelled() => {
                events.close();
                while let Ok(event) = events.try_recv() {
                    if let Some(batch) = buffer.push(event, Instant::now()) {
                        flush(&store, &stats, batch).await;
                    }
                }
                break;
            }
        }
    }
    if let Some(batch) = buffer.take() {
        flush(&store, &stats, batch).await;
    }
}

async fn flush(store: &EventStore, stats: &PipelineStats, batch: Vec<Event>) {
    let rows = batch.len() as u64;
    match store.insert_many(&batch).await {
        Ok(_) => stats.stored(rows),
        Err(e) => {
            log::warn!("{e}");
            stats.insert_failed(rows);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_full_batch_is_returned_by_the_push_that_fills_it() {
        let t0 = Instant::now();
        let mut b = BatchBuffer::new(3, 100 * MS);
        assert_eq!(b.push(1, t0), None);
        assert_eq!(b.push(2, t0 + MS), None);
        assert_eq!(b.push(3, t0 + 2 * MS), Some(vec![1, 2, 3]));
        assert!(b.is_empty());
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn the_deadline_follows_the_oldest_item() {
        let t0 = Instant::now();
        let mut b = BatchBuffer::new(10, 50 * MS);
        assert_eq!(b.deadline(), None);
        b.push('a', t0 + 5 * MS);
        b.push('b', t0 + 30 * MS);
        assert_eq!(b.deadline(), Some(t0 + 55 * MS));
        assert_eq!(b.take_due(t0 + 54 * MS), None);
        assert_eq!(b.take_due(t0 + 55 * MS), Some(vec!['a', 'b']));
        // The next batch's clock starts with its own first item.
        b.push('c', t0 + 60 * MS);
        assert_eq!(b.deadline(), Some(t0 + 110 * MS));
    }

    #[test]
    fn take_empties_regardless_of_age_and_nothing_is_lost() {
        let t0 = Instant::now();
        let mut b = BatchBuffer::new(4, 1000 * MS);
        let mut out = Vec::new();
        for i in 0..10 {
            if let Some(batch) = b.push(i, t0) {
                assert_eq!(batch.len(), 4);
                out.extend(batch);
            }
        }
        assert_eq!(b.len(), 2);
        out.extend(b.take().expect("two left"));
        assert_eq!(out, (0..10).collect::<Vec<_>>());
        assert_eq!(b.take(), None);
    }

    #[test]
    fn a_zero_row_limit_still_makes_progress() {
        let mut b = BatchBuffer::new(0, MS);
        assert_eq!(b.push(7, Instant::now()), Some(vec![7]));
    }
}
