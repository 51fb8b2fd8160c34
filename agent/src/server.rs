//! The HTTP server: `/metrics` for Prometheus, `/healthz` for probes.
//!
//! It runs on every node beside production services, so a client can never
//! make it hold resources: headers must arrive within [`Limits::header_read`],
//! a connection is closed after [`Limits::lifetime`] (at the end of the
//! request in progress), and at most [`Limits::connections`] are open at
//! once — the rest are closed on accept and counted in
//! `pipelens_exporter_connections_rejected_total`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;

use crate::collector::Health;

const REJECTED: &str = "pipelens_exporter_connections_rejected_total";

/// What one client may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time allowed for a request's headers to arrive, counted from the
    /// connection's accept or the previous response.
    pub header_read: Duration,
    /// A connection is closed, between requests, once it is this old.
    pub lifetime: Duration,
    /// Connections open at once; more are closed as soon as accepted.
    pub connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // A Prometheus scrape sends its headers at once and reconnects when
        // its keep-alive connection is closed; 64 is far more scrapers and
        // health probes than any node has.
        Self {
            header_read: Duration::from_secs(5),
            lifetime: Duration::from_secs(120),
            connections: 64,
        }
    }
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Health,
}

/// Binds first, so that an address in use is reported before any probe is
/// attached.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("--listen {addr}: address already in use; pick another with --listen")
        } else {
            anyhow::anyhow!("--listen {addr}: {e}")
        }
    })
}

pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    health: Health,
    limits: Limits,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let rejected = metrics::counter!(REJECTED);
    rejected.absolute(0);
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .with_state(AppState { metrics, health });
    let slots = Arc::new(Semaphore::new(limits.connections));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept:
                    // neither is the server's end, so wait a moment and go on.
                    log::warn!("/metrics accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            rejected.increment(1);
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                () = tokio::time::sleep(limits.lifetime) => {}
                () = shutdown.cancelled() => {}
            }
            // Let the request in progress, if any, finish; then close.
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.header_read, connection).await;
        });
    }
    connections.shutdown().await;
    Ok(())
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let code = if state.health.all_up() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_string(&state.health.snapshot()).unwrap_or_default();
    (code, [("content-type", "application/json")], body)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;

    struct Running {
        addr: SocketAddr,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    async fn start(limits: Limits) -> Running {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            handle,
            Health::new(&[]),
            limits,
            shutdown.clone(),
        ));
        Running {
            addr,
            shutdown,
            task,
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    }

    /// Reads until the server closes; returns how long that took.
    async fn until_closed(stream: &mut TcpStream) -> Duration {
        let started = Instant::now();
        let mut sink = [0u8; 1024];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        started.elapsed()
    }

    fn limits(connections: usize) -> Limits {
        Limits {
            header_read: Duration::from_millis(300),
            lifetime: Duration::from_secs(30),
            connections,
        }
    }

    #[tokio::test]
    async fn a_client_that_sends_no_headers_is_closed() {
        let server = start(limits(8)).await;
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        let mut partial = TcpStream::connect(server.addr).await.unwrap();
        partial
            .write_all(b"GET /metrics HTTP/1.1\r\nho")
            .await
            .unwrap();
        // Both are closed after the header timeout, well before the 30 s
        // lifetime; the server still answers others.
        assert!(until_closed(&mut silent).await < Duration::from_secs(10));
        assert!(until_closed(&mut partial).await < Duration::from_secs(10));
        let response = get(server.addr, "/metrics").await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        server.shutdown.cancel();
        server.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_at_once_and_slots_come_back() {
        let server = start(Limits {
            header_read: Duration::from_secs(30),
            ..limits(4)
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(TcpStream::connect(server.addr).await.unwrap());
        }
        // Give the accept loop time to take the four slots.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut fifth = TcpStream::connect(server.addr).await.unwrap();
        assert!(until_closed(&mut fifth).await < Duration::from_secs(5));
        drop(held);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let response = get(server.addr, "/metrics").await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        server.shutdown.cancel();
        server.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_kept_alive_connection_is_closed_after_its_lifetime() {
        let server = start(Limits {
            header_read: Duration::from_secs(30),
            lifetime: Duration::from_millis(500),
            ..limits(4)
        })
        .await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        assert!(until_closed(&mut stream).await < Duration::from_secs(5));
        server.shutdown.cancel();
        server.task.await.unwrap().unwrap();
    }
}
