//! Publisher and subscriber sessions, each a writer (this task) and a
//! reader (a spawned task) sharing counters.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use futures_util::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use tokio::{
    net::TcpStream,
    sync::{Notify, oneshot},
    task::JoinHandle,
    time::{Instant, MissedTickBehavior},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Bytes, Message,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};
use tokio_util::sync::CancellationToken;

use super::{
    message::event_message,
    plan::{CloseKind, SessionClass, SessionPlan},
    settings::{LoadgenSettings, PublishLimit},
    summary::{Outcome, SessionRecord},
};
use crate::pipeline::session::SUBSCRIBED;

type Ws = WebSocketStream<TcpStream>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TCP connect to {target}: {source}")]
    Tcp {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("WebSocket handshake: {0}")]
    Handshake(#[source] tokio_tungstenite::tungstenite::Error),
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
}

/// What all sessions share.
pub struct SessionContext {
    pub settings: LoadgenSettings,
    pub start: Instant,
    /// Cancelled once every publisher has finished.
    pub publishers_done: CancellationToken,
}

/// Counters written by the reader task and read by the session; the reader
/// may be aborted (abrupt close), so it accounts as it goes.
#[derive(Default)]
struct Counters {
    messages_received: AtomicU64,
    bytes_received: AtomicU64,
    events_received: AtomicU64,
    pongs_received: AtomicU64,
    /// Milliseconds since the run started of the last data message.
    last_received_ms: AtomicU64,
    server_close: Mutex<Option<Option<u16>>>,
    pong: Notify,
}

impl Counters {
    fn server_close(&self) -> Option<Option<u16>> {
        *self.server_close.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Opens the TCP connection and the WebSocket session. Sessions that will
/// end abruptly get SO_LINGER 0 now, so that dropping the socket resets it.
async fn connect(
    settings: &LoadgenSettings,
    class: SessionClass,
    close: CloseKind,
) -> Result<Ws, ConnectError> {
    let target = settings.target.as_str();
    let open = async {
        let tcp = TcpStream::connect(target)
            .await
            .map_err(|source| ConnectError::Tcp {
                target: target.to_owned(),
                source,
            })?;
        let tcp_err = |source| ConnectError::Tcp {
            target: target.to_owned(),
            source,
        };
        tcp.set_nodelay(true).map_err(tcp_err)?;
        if close == CloseKind::Abrupt {
            // Zero linger: close() sends RST at once and never blocks.
            tcp.set_zero_linger().map_err(tcp_err)?;
        }
        let query = match class {
            SessionClass::Subscriber => "?subscribe=1",
            SessionClass::Publisher => "",
        };
        let (ws, _response) =
            tokio_tungstenite::client_async(format!("ws://{target}/ws{query}"), tcp)
                .await
                .map_err(ConnectError::Handshake)?;
        Ok(ws)
    };
    let timeout = settings.connect_timeout();
    tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| ConnectError::Timeout(timeout))?
}

/// How the reader stopped.
enum ReadEnd {
    /// The server closed the connection (after a closing handshake or not).
    Eof,
    Error(String),
}

async fn read_incoming(
    mut stream: SplitStream<Ws>,
    counters: Arc<Counters>,
    start: Instant,
    read_delay: Option<Duration>,
    mut subscribed: Option<oneshot::Sender<()>>,
) -> ReadEnd {
    loop {
        let data_len = match stream.next().await {
            Some(Ok(Message::Text(text))) => {
                if subscribed.is_some() && text.as_str() == SUBSCRIBED {
                    if let Some(tx) = subscribed.take() {
                        let _ = tx.send(());
                    }
                } else {
                    counters.events_received.fetch_add(1, Relaxed);
                }
                text.len()
            }
            Some(Ok(Message::Binary(bytes))) => bytes.len(),
            Some(Ok(Message::Pong(_))) => {
                counters.pongs_received.fetch_add(1, Relaxed);
                counters.pong.notify_waiters();
                continue;
            }
            // tungstenite answers Pings itself.
            Some(Ok(Message::Ping(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Close(frame))) => {
                *counters
                    .server_close
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(frame.map(|f| u16::from(f.code)));
                continue;
            }
            Some(Err(e)) => return ReadEnd::Error(e.to_string()),
            None => return ReadEnd::Eof,
        };
        counters.messages_received.fetch_add(1, Relaxed);
        counters.bytes_received.fetch_add(data_len as u64, Relaxed);
        counters
            .last_received_ms
            .store(start.elapsed().as_millis() as u64, Relaxed);
        if let Some(delay) = read_delay {
            tokio::time::sleep(delay).await;
        }
    }
}

/// A session in progress: the write half, the reader task and what it counts.
struct OpenSession {
    record: SessionRecord,
    sink: SplitSink<Ws, Message>,
    reader: JoinHandle<ReadEnd>,
    counters: Arc<Counters>,
}

impl OpenSession {
    fn start(
        ws: Ws,
        record: SessionRecord,
        ctx: &SessionContext,
        read_delay: Option<Duration>,
        subscribed: Option<oneshot::Sender<()>>,
    ) -> OpenSession {
        let (sink, stream) = ws.split();
        let counters = Arc::new(Counters::default());
        let reader = tokio::spawn(read_incoming(
            stream,
            counters.clone(),
            ctx.start,
            read_delay,
            subscribed,
        ));
        OpenSession {
            record,
            sink,
            reader,
            counters,
        }
    }

    async fn send(&mut self, message: Message) -> Result<(), String> {
        self.sink.send(message).await.map_err(|e| e.to_string())
    }

    /// Ends the session as planned and returns its record.
    async fn finish(mut self, ctx: &SessionContext, write_error: Option<String>) -> SessionRecord {
        let timeout = ctx.settings.close_timeout();
        if let Some(error) = write_error {
            // The server went first, or the connection broke.
            return self.finish_after_error(ctx, error).await;
        }
        if self.counters.server_close().is_some() {
            let _ = tokio::time::timeout(timeout, &mut self.reader).await;
            return self.complete(Outcome::ClosedByServer, None);
        }
        match self.record.close {
            CloseKind::Code(code) => {
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: "".into(),
                };
                if let Err(e) = self.send(Message::Close(Some(frame))).await {
                    return self.finish_after_error(ctx, e).await;
                }
                // Our Close is on the wire: the server's reply (if any)
                // completes the handshake, then it drops the connection.
                let end = tokio::time::timeout(timeout, &mut self.reader).await;
                self.reader.abort();
                self.record.close_acknowledged = self.counters.server_close().is_some();
                let error = match end {
                    Ok(Ok(ReadEnd::Error(e))) if !self.record.close_acknowledged => Some(e),
                    Err(_) => Some(format!("no closing handshake within {timeout:?}")),
                    _ => None,
                };
                self.complete(Outcome::Closed, error)
            }
            CloseKind::Abrupt => {
                if self.record.class == SessionClass::Publisher {
                    // Everything we sent must have been read by the server
                    // before the reset, or it may be discarded: a Pong to
                    // our last Ping proves it (frames are read in order).
                    if let Err(e) = self.barrier(timeout).await {
                        return self.finish_after_error(ctx, e).await;
                    }
                }
                self.reader.abort();
                let _ = (&mut self.reader).await;
                self.complete(Outcome::Abrupt, None)
            }
        }
    }

    async fn finish_after_error(mut self, ctx: &SessionContext, error: String) -> SessionRecord {
        let _ = tokio::time::timeout(ctx.settings.close_timeout(), &mut self.reader).await;
        self.reader.abort();
        if self.counters.server_close().is_some() {
            self.complete(Outcome::ClosedByServer, None)
        } else {
            self.complete(Outcome::Error, Some(error))
        }
    }

    /// Sends a Ping and waits for every Ping sent so far to be answered.
    async fn barrier(&mut self, timeout: Duration) -> Result<(), String> {
        self.send(Message::Ping(Bytes::from_static(b"barrier")))
            .await?;
        self.record.pings_sent += 1;
        let wanted = self.record.pings_sent;
        let counters = self.counters.clone();
        let answered = async {
            loop {
                let notified = counters.pong.notified();
                if counters.pongs_received.load(Relaxed) >= wanted {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, answered)
            .await
            .map_err(|_| format!("no Pong within {timeout:?}"))
    }

    fn complete(mut self, outcome: Outcome, error: Option<String>) -> SessionRecord {
        let c = &self.counters;
        let r = &mut self.record;
        r.outcome = outcome;
        r.error = error;
        r.messages_received = c.messages_received.load(Relaxed);
        r.bytes_received = c.bytes_received.load(Relaxed);
        r.events_received = c.events_received.load(Relaxed);
        r.pongs_received = c.pongs_received.load(Relaxed);
        if outcome == Outcome::ClosedByServer {
            r.server_close_code = c.server_close().flatten();
        }
        self.record
    }
}

/// Publishes events until the limit, then ends as planned.
pub async fn publisher(plan: SessionPlan, ctx: Arc<SessionContext>) -> SessionRecord {
    let mut record = SessionRecord::new(plan.index, plan.class, plan.close);
    let ws = match connect(&ctx.settings, plan.class, plan.close).await {
        Ok(ws) => ws,
        Err(e) => {
            record.error = Some(e.to_string());
            return record;
        }
    };
    let mut session = OpenSession::start(ws, record, &ctx, None, None);
    let error = publish(&mut session, plan.index, &ctx).await.err();
    session.finish(&ctx, error).await
}

async fn publish(
    session: &mut OpenSession,
    index: usize,
    ctx: &SessionContext,
) -> Result<(), String> {
    let settings = &ctx.settings;
    let (max_messages, deadline) = match settings.publish_limit() {
        PublishLimit::Messages(n) => (Some(n), None),
        PublishLimit::Duration(d) => (None, Some(Instant::now() + d)),
    };
    let mut ticker = settings.message_interval().map(|period| {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker
    });
    let kinds = &settings.kinds;
    let mut seq: u64 = 0;
    loop {
        if max_messages.is_some_and(|n| seq >= n) {
            break;
        }
        if let Some(ticker) = ticker.as_mut() {
            match deadline {
                Some(deadline) => {
                    tokio::select! {
                        _ = ticker.tick() => {}
                        () = tokio::time::sleep_until(deadline) => break,
                    }
                }
                None => {
                    ticker.tick().await;
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let kind = if kinds.is_empty() {
            "event"
        } else {
            kinds[(seq % kinds.len() as u64) as usize].as_str()
        };
        let text = event_message(kind, index, seq, settings.message_size);
        let len = text.len() as u64;
        session.send(Message::text(text)).await?;
        session.record.messages_sent += 1;
        session.record.bytes_sent += len;
        seq += 1;
        if settings.ping_every > 0 && seq.is_multiple_of(settings.ping_every) {
            session.send(Message::Ping(Bytes::new())).await?;
            session.record.pings_sent += 1;
        }
    }
    Ok(())
}

/// Subscribes, reports itself ready once the server confirmed, listens
/// until the publishers are done and the stream went quiet, then ends as
/// planned.
pub async fn subscriber(
    plan: SessionPlan,
    ctx: Arc<SessionContext>,
    ready: oneshot::Sender<()>,
) -> SessionRecord {
    let mut record = SessionRecord::new(plan.index, plan.class, plan.close);
    let ws = match connect(&ctx.settings, plan.class, plan.close).await {
        Ok(ws) => ws,
        Err(e) => {
            record.error = Some(e.to_string());
            return record;
        }
    };
    let read_delay = (ctx.settings.subscriber_read_delay_ms > 0)
        .then(|| Duration::from_millis(ctx.settings.subscriber_read_delay_ms));
    let (subscribed_tx, subscribed_rx) = oneshot::channel();
    let mut session = OpenSession::start(ws, record, &ctx, read_delay, Some(subscribed_tx));
    let confirmed = tokio::time::timeout(ctx.settings.connect_timeout(), subscribed_rx)
        .await
        .is_ok_and(|r| r.is_ok());
    let _ = ready.send(());
    if !confirmed {
        let error = "the server did not confirm the subscription".to_owned();
        return session.finish(&ctx, Some(error)).await;
    }
    ctx.publishers_done.cancelled().await;
    drain(&mut session, &ctx).await;
    session.finish(&ctx, None).await
}

/// Waits until nothing arrived for `--drain-ms`, at most `--drain-max-ms`.
async fn drain(session: &mut OpenSession, ctx: &SessionContext) {
    let quiet = Duration::from_millis(ctx.settings.drain_ms);
    let done_at = Instant::now();
    let cap = done_at + Duration::from_millis(ctx.settings.drain_max_ms);
    loop {
        if session.reader.is_finished() {
            return;
        }
        let last =
            ctx.start + Duration::from_millis(session.counters.last_received_ms.load(Relaxed));
        let until = last.max(done_at) + quiet;
        let now = Instant::now();
        if now >= until || now >= cap {
            return;
        }
        tokio::time::sleep_until(until.min(cap)).await;
    }
}
