//! Sequential HTTP/1.1 GET requests on one keep-alive connection.

use std::{collections::BTreeMap, time::Duration};

use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, body::Bytes, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HttpSummary {
    pub path: String,
    /// TCP connections opened for the requests: 1, or 0 if that failed.
    pub connections: u64,
    /// Requests written.
    pub requests: u64,
    /// Complete responses read (status line, headers and body).
    pub responses: u64,
    pub status_codes: BTreeMap<String, u64>,
    /// Body bytes of those responses.
    pub body_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Sends `count` requests for `path`, each after the previous response was
/// read in full, on one connection; stops at the first error.
pub async fn run(target: &str, path: &str, count: u64, timeout: Duration) -> HttpSummary {
    let mut summary = HttpSummary {
        path: path.to_owned(),
        ..HttpSummary::default()
    };
    if let Err(e) = requests(target, path, count, timeout, &mut summary).await {
        summary.error = Some(e);
    }
    summary
}

async fn requests(
    target: &str,
    path: &str,
    count: u64,
    timeout: Duration,
    summary: &mut HttpSummary,
) -> Result<(), String> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| format!("connecting to {target}: timed out"))?
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    summary.connections = 1;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let connection = tokio::spawn(connection);
    let mut result = Ok(());
    for _ in 0..count {
        let request = Request::get(path)
            .header(header::HOST, target)
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("building the request: {e}"))?;
        let exchange = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body.len()))
        };
        summary.requests += 1;
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok((status, body_len))) => {
                summary.responses += 1;
                summary.body_bytes += body_len as u64;
                *summary.status_codes.entry(status.to_string()).or_default() += 1;
            }
            Ok(Err(e)) => {
                result = Err(format!("request {}: {e}", summary.requests));
                break;
            }
            Err(_) => {
                result = Err(format!("request {}: timed out", summary.requests));
                break;
            }
        }
    }
    // Dropping the sender lets the connection close (FIN) once idle.
    drop(sender);
    let _ = tokio::time::timeout(timeout, connection).await;
    result
}
