//! The load generator behind the `loadgen` binary.
//!
//! Order of a run: the HTTP requests (if any), then every subscriber
//! connects and waits for the server's confirmation, then the publishers
//! run, then the subscribers drain and close. The summary counts what was
//! actually written to and read from the sockets.

pub mod http;
pub mod message;
pub mod plan;
pub mod session;
pub mod settings;
pub mod summary;

use std::sync::Arc;

use tokio::{sync::oneshot, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

pub use settings::LoadgenSettings;

use self::{
    plan::{SessionClass, SessionPlan, plan_sessions},
    session::SessionContext,
    settings::PublishLimit,
    summary::{PlanSummary, SessionRecord, Summary},
};

pub async fn run(settings: LoadgenSettings) -> Summary {
    let start = Instant::now();
    let http = if settings.http_requests > 0 {
        Some(
            http::run(
                &settings.target,
                &settings.http_path,
                settings.http_requests,
                settings.connect_timeout().max(settings.close_timeout()),
            )
            .await,
        )
    } else {
        None
    };

    let plan = plan_sessions(
        settings.sessions,
        settings.subscriber_share,
        &settings.close_mix,
    );
    let plan_summary = summarize_plan(&settings, &plan);
    let ctx = Arc::new(SessionContext {
        settings,
        start,
        publishers_done: CancellationToken::new(),
    });

    let mut subscribers = Vec::new();
    let mut ready = Vec::new();
    for p in plan.iter().filter(|p| p.class == SessionClass::Subscriber) {
        let (tx, rx) = oneshot::channel();
        ready.push(rx);
        subscribers.push((*p, tokio::spawn(session::subscriber(*p, ctx.clone(), tx))));
    }
    for rx in ready {
        // A subscriber that failed drops its sender: it is ready too.
        let _ = rx.await;
    }

    let publishers: Vec<_> = plan
        .iter()
        .filter(|p| p.class == SessionClass::Publisher)
        .map(|p| (*p, tokio::spawn(session::publisher(*p, ctx.clone()))))
        .collect();
    let mut records = collect(publishers).await;
    ctx.publishers_done.cancel();
    records.extend(collect(subscribers).await);
    records.sort_by_key(|r| r.index);

    Summary::new(
        ctx.settings.target.clone(),
        start.elapsed().as_secs_f64(),
        plan_summary,
        records,
        http,
        ctx.settings.per_session,
    )
}

async fn collect(tasks: Vec<(SessionPlan, JoinHandle<SessionRecord>)>) -> Vec<SessionRecord> {
    let mut records = Vec::with_capacity(tasks.len());
    for (plan, task) in tasks {
        records.push(task.await.unwrap_or_else(|e| {
            let mut r = SessionRecord::new(plan.index, plan.class, plan.close);
            r.outcome = summary::Outcome::Error;
            r.error = Some(format!("session task failed: {e}"));
            r
        }));
    }
    records
}

fn summarize_plan(settings: &LoadgenSettings, plan: &[SessionPlan]) -> PlanSummary {
    let subscribers = plan
        .iter()
        .filter(|p| p.class == SessionClass::Subscriber)
        .count();
    let (messages_per_publisher, duration_secs) = match settings.publish_limit() {
        PublishLimit::Messages(n) => (Some(n), None),
        PublishLimit::Duration(d) => (None, Some(d.as_secs_f64())),
    };
    PlanSummary {
        sessions: plan.len(),
        publishers: plan.len() - subscribers,
        subscribers,
        close_mix: settings.close_mix.to_string(),
        rate: settings.rate,
        message_size: settings.message_size,
        messages_per_publisher,
        duration_secs,
    }
}
