//! The event pipeline served by the `pipeline` binary.
//!
//! ```text
//! WebSocket /ws ──► session reader ──► PostgreSQL (per event, or via the batcher)
//!                                 └──► subscriber registry ──► each subscriber's
//!                                      outbound queue ──► session writer ──► client
//! REST /events/recent ──► PostgreSQL (join, or N+1)
//! ```

pub mod batch;
pub mod event;
pub mod fanout;
pub mod http;
pub mod session;
pub mod settings;
pub mod stats;
pub mod store;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use settings::{InsertMode, PipelineSettings};

use self::{
    batch::BatchBuffer,
    event::Event,
    fanout::SubscriberRegistry,
    stats::PipelineStats,
    store::{EventStore, StoreError},
};

/// How long shutdown waits for WebSocket sessions to finish their closing
/// handshakes before the process exits anyway.
const SESSION_DRAIN: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving HTTP: {0}")]
    Serve(#[source] std::io::Error),
}

/// Where a session's valid events go.
pub enum Ingest {
    /// Inserted by the session itself, one statement each.
    PerEvent,
    /// Handed to the batcher task.
    Batched(mpsc::Sender<Event>),
}

/// Everything the handlers share.
pub struct App {
    pub settings: PipelineSettings,
    pub store: Arc<EventStore>,
    pub subscribers: SubscriberRegistry,
    pub stats: Arc<PipelineStats>,
    pub ingest: Ingest,
    /// Cancelled when the process is asked to stop: sessions send Close 1001.
    pub shutdown: CancellationToken,
    pub sessions: TaskTracker,
    next_session: AtomicU64,
}

impl App {
    pub fn new_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }
}

/// Connects to PostgreSQL, creates the schema, serves until `stop`
/// completes, then closes every WebSocket session (1001), writes what the
/// batcher still holds and returns.
pub async fn run(
    settings: PipelineSettings,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), PipelineError> {
    let store = Arc::new(
        EventStore::connect(&settings.database_url, settings.db_connections.into()).await?,
    );
    let stats = Arc::new(PipelineStats::default());
    let stop_batcher = CancellationToken::new();
    let (ingest, batcher) = match settings.insert_mode {
        InsertMode::PerEvent => (Ingest::PerEvent, None),
        InsertMode::Batched => {
            // Room for a few batches: sessions wait (back-pressure) only
            // when PostgreSQL falls behind by that much.
            let (tx, rx) = mpsc::channel(usize::from(settings.batch_size) * 4);
            let buffer = BatchBuffer::new(settings.batch_size.into(), settings.batch_interval());
            let task = tokio::spawn(batch::write_batches(
                rx,
                buffer,
                store.clone(),
                stats.clone(),
                stop_batcher.clone(),
            ));
            (Ingest::Batched(tx), Some(task))
        }
    };
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| PipelineError::Listen {
            addr: settings.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(PipelineError::Serve)?;
    eprintln!(
        "pipeline: listening on {local} (insert-mode {}, n-plus-one {}, unbounded-buffer {})",
        settings.insert_mode.name(),
        settings.n_plus_one,
        settings.unbounded_buffer
    );

    let shutdown = CancellationToken::new();
    let app = Arc::new(App {
        subscribers: SubscriberRegistry::new(stats.clone()),
        settings,
        store,
        stats,
        ingest,
        shutdown: shutdown.clone(),
        sessions: TaskTracker::new(),
        next_session: AtomicU64::new(1),
    });

    let trigger = shutdown.clone();
    tokio::spawn(async move {
        stop.await;
        trigger.cancel();
    });
    axum::serve(listener, http::router(app.clone()))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .map_err(PipelineError::Serve)?;

    // Upgraded connections are not the HTTP server's any more: wait for the
    // sessions' closing handshakes here.
    app.sessions.close();
    if tokio::time::timeout(SESSION_DRAIN, app.sessions.wait())
        .await
        .is_err()
    {
        log::warn!("some WebSocket sessions did not close in time");
    }
    stop_batcher.cancel();
    if let Some(task) = batcher {
        let _ = task.await;
    }
    Ok(())
}
