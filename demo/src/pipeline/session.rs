//! One WebSocket session: a reader that ingests the client's events and a
//! writer that drains the session's outbound queue.
//!
//! Control frames follow RFC 6455 §5.5: tungstenite queues the Pong for a
//! Ping and the reply to a client's Close as soon as it reads them, and
//! writes them on the next read, so the reader keeps reading after a Close
//! until the stream ends — that is what completes the closing handshake
//! (§7.1.2) before the server drops the TCP connection (§7.1.1).

use std::{sync::Arc, time::Duration};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, close_code};
use futures_util::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use tokio_util::sync::CancellationToken;

use super::{
    App, Ingest,
    event::Event,
    fanout::{OutboundQueue, OutboundSender, outbound_queue},
    stats::PipelineStats,
};

/// Sent to a subscriber once it is registered: from then on it receives
/// every event.
pub const SUBSCRIBED: &str = r#"{"subscribed":true}"#;

/// How long a finished session waits for its writer before abandoning it
/// (a writer blocked on a client that stopped reading).
const WRITER_GRACE: Duration = Duration::from_secs(1);

pub async fn run(socket: WebSocket, subscriber: bool, app: Arc<App>) {
    let id = app.new_session_id();
    app.stats.session_opened(subscriber);
    let capacity =
        (!app.settings.unbounded_buffer).then_some(app.settings.outbound_capacity as usize);
    let (outbound, queue) = outbound_queue(capacity, app.stats.clone());
    let (sink, stream) = socket.split();
    let writer = tokio::spawn(write_outbound(
        sink,
        queue,
        app.stats.clone(),
        app.shutdown.clone(),
    ));
    if subscriber {
        app.subscribers.subscribe(id, outbound.clone());
        let _ = outbound.enqueue(Utf8Bytes::from_static(SUBSCRIBED), &app.stats);
    }

    read_inbound(stream, &outbound, &app).await;

    if subscriber {
        app.subscribers.unsubscribe(id);
    }
    drop(outbound);
    let abort = writer.abort_handle();
    if tokio::time::timeout(WRITER_GRACE, writer).await.is_err() {
        abort.abort();
    }
    app.stats.session_closed(subscriber);
}

async fn read_inbound(mut stream: SplitStream<WebSocket>, outbound: &OutboundSender, app: &App) {
    let mut close_seen = false;
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => ingest(text, outbound, app).await,
            Some(Ok(Message::Binary(bytes))) => {
                app.stats.message_received(bytes.len());
                app.stats.message_rejected();
                reply_error(outbound, &app.stats, "binary messages are not accepted");
            }
            Some(Ok(Message::Ping(_))) => app.stats.ping_received(),
            Some(Ok(Message::Pong(_))) => {}
            Some(Ok(Message::Close(frame))) => {
                close_seen = true;
                // After the server's own Close (shutdown) this is the
                // client's reply, not a close the client started.
                if !app.shutdown.is_cancelled() {
                    app.stats.client_close(frame.map(|f| f.code));
                }
            }
            Some(Err(e)) => {
                log::debug!("session ended without a closing handshake: {e}");
                if !close_seen {
                    app.stats.abnormal_disconnect();
                }
                return;
            }
            None => {
                if !close_seen {
                    app.stats.abnormal_disconnect();
                }
                return;
            }
        }
    }
}

async fn ingest(text: Utf8Bytes, outbound: &OutboundSender, app: &App) {
    app.stats.message_received(text.len());
    let event = match Event::parse(&text) {
        Ok(event) => event,
        Err(e) => {
            app.stats.message_rejected();
            reply_error(outbound, &app.stats, &e.to_string());
            return;
        }
    };
    match &app.ingest {
        Ingest::PerEvent => match app.store.insert_one(&event).await {
            Ok(()) => app.stats.stored(1),
            Err(e) => {
                log::warn!("{e}");
                app.stats.insert_failed(1);
                reply_error(outbound, &app.stats, "the event could not be stored");
                return;
            }
        },
        Ingest::Batched(batcher) => {
            if batcher.send(event).await.is_err() {
                // The batcher stops only at shutdown.
                app.stats.insert_failed(1);
                return;
            }
        }
    }
    app.subscribers.publish(&text);
}

fn reply_error(outbound: &OutboundSender, stats: &PipelineStats, error: &str) {
    let body = serde_json::json!({ "error": error }).to_string();
    // A client too slow to take its own error replies loses them.
    let _ = outbound.enqueue(Utf8Bytes::from(body), stats);
}

async fn write_outbound(
    mut sink: SplitSink<WebSocket, Message>,
    mut queue: OutboundQueue,
    stats: Arc<PipelineStats>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                stats.server_close();
                let frame = CloseFrame {
                    code: close_code::AWAY,
                    reason: Utf8Bytes::from_static("server shutting down"),
                };
                let _ = sink.send(Message::Close(Some(frame))).await;
                return;
            }
            message = queue.recv() => {
                let Some(text) = message else { return };
                let len = text.len();
                if sink.send(Message::Text(text)).await.is_err() {
                    stats.dequeued_unsent(1);
                    return;
                }
                stats.message_sent(len);
            }
        }
    }
}
