//! Routes: the WebSocket endpoint and the REST endpoints.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Query, State, WebSocketUpgrade},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};

use super::{App, session, stats::StatsSnapshot, store::StoredEvent};

pub const DEFAULT_RECENT_LIMIT: i64 = 20;
pub const MAX_RECENT_LIMIT: i64 = 1000;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/ws", get(websocket))
        .route("/events/recent", get(recent_events))
        .route("/health", get(health))
        .route("/stats", get(stats))
        .with_state(app)
}

#[derive(Debug, Deserialize)]
struct WebSocketParams {
    subscribe: Option<String>,
}

/// `GET /ws` upgrades to a WebSocket session; `GET /ws?subscribe=1` (or
/// `true`) also receives every event published by any session.
async fn websocket(
    State(app): State<Arc<App>>,
    Query(params): Query<WebSocketParams>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let subscriber = params
        .subscribe
        .as_deref()
        .is_some_and(|v| matches!(v, "1" | "true" | "yes"));
    let max = app.settings.max_message_bytes;
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        .on_failed_upgrade(|e| log::debug!("WebSocket upgrade failed: {e}"))
        .on_upgrade(move |socket| {
            let sessions = app.sessions.clone();
            sessions.track_future(session::run(socket, subscriber, app))
        })
}

#[derive(Debug, Deserialize)]
struct RecentParams {
    limit: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RecentEvents {
    pub events: Vec<StoredEvent>,
}

/// `GET /events/recent?limit=N`: the newest events, newest first, with their
/// kind's description (`limit` defaults to 20, at most 1000).
async fn recent_events(
    State(app): State<Arc<App>>,
    Query(params): Query<RecentParams>,
) -> Response {
    let limit = params
        .limit
        .unwrap_or(DEFAULT_RECENT_LIMIT)
        .clamp(1, MAX_RECENT_LIMIT);
    match app.store.recent(limit, app.settings.n_plus_one).await {
        Ok(events) => Json(RecentEvents { events }).into_response(),
        Err(e) => {
            log::warn!("{e}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "error": e.to_string() })),
            )
                .into_response()
        }
    }
}

/// `GET /health`: the process serves requests. Touches nothing else, so a
/// run of health checks is pure HTTP traffic.
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StatsResponse {
    pub insert_mode: String,
    pub n_plus_one: bool,
    pub unbounded_buffer: bool,
    pub subscribers: usize,
    #[serde(flatten)]
    pub counters: StatsSnapshot,
}

/// `GET /stats`: the modes in force and the pipeline's counters.
async fn stats(State(app): State<Arc<App>>) -> Json<StatsResponse> {
    Json(StatsResponse {
        insert_mode: app.settings.insert_mode.name().to_owned(),
        n_plus_one: app.settings.n_plus_one,
        unbounded_buffer: app.settings.unbounded_buffer,
        subscribers: app.subscribers.len(),
        counters: app.stats.snapshot(),
    })
}
