//! The websocket collector's side of the capture path: claims sockets that
//! speak HTTP/1.x, feeds them to [`WebStream`], and turns its events into
//! the brief's WebSocket and HTTP metrics and the summary.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use serde::Serialize;

use super::{
    Direction, Role, WebEvent,
    http::{FirstBytes, classify_first_bytes},
    response::Responses,
    stream::WebStream,
};
use crate::{
    collector::Section,
    streams::{Analyser, Chunk, Claim, Flow},
    telemetry::{Identities, Identity, LabelCap},
};

const PORT_CAP: usize = 200;
/// Distinct close codes reported; others are `other` (a peer may send any
/// number in 3000–4999).
const CODE_CAP: usize = 50;
/// Distinct HTTP route classes reported; others are `other`.
const ROUTE_CAP: usize = 100;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortKey {
    #[serde(flatten)]
    pub identity: Identity,
    pub port: String,
}

/// Per (process, port) figures of the summary.
#[derive(Debug, Default, Serialize)]
pub struct PortStats {
    pub sessions: u64,
    pub messages_received: u64,
    pub messages_sent: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub control_frames: u64,
    pub closes: BTreeMap<String, u64>,
    pub http_requests: BTreeMap<String, u64>,
    pub parse_errors: u64,
}

pub type WebSummary = Arc<Mutex<BTreeMap<PortKey, PortStats>>>;

struct Conn {
    stream: WebStream,
    /// Index into `WebAnalyser::series`.
    series: usize,
    /// Response timing, once a session the traced process serves is open.
    responses: Option<Responses>,
}

pub struct WebAnalyser {
    conns: HashMap<u64, Conn>,
    series: Vec<PortSeries>,
    series_index: HashMap<PortKey, usize>,
    ids: Identities,
    port_cap: LabelCap,
    code_cap: LabelCap,
    route_cap: LabelCap,
    stats: WebSummary,
    /// Every event with its socket, in order, for tests that compare runs
    /// event by event.
    #[cfg(test)]
    pub(crate) log: Arc<Mutex<Vec<(u64, WebEvent)>>>,
}

impl WebAnalyser {
    pub fn new() -> (Self, WebSummary) {
        let stats: WebSummary = Arc::default();
        // The give-ups of every process together, from the first scrape.
        metrics::counter!("pipelens_parser_give_ups_total", "collector" => "websocket")
            .increment(0);
        (
            Self {
                conns: HashMap::new(),
                series: Vec::new(),
                series_index: HashMap::new(),
                ids: Identities::new("websocket"),
                port_cap: LabelCap::new(PORT_CAP, "websocket", "port"),
                code_cap: LabelCap::new(CODE_CAP, "websocket", "code"),
                route_cap: LabelCap::new(ROUTE_CAP, "websocket", "route"),
                stats: stats.clone(),
                #[cfg(test)]
                log: Arc::default(),
            },
            stats,
        )
    }

    /// The series of `key`, registered on first use.
    fn series_of(&mut self, key: &PortKey) -> usize {
        if let Some(&i) = self.series_index.get(key) {
            return i;
        }
        self.series.push(PortSeries::new(key));
        self.series_index.insert(key.clone(), self.series.len() - 1);
        self.series.len() - 1
    }

    /// Counts `events` of one connection into its series `m` and the summary.
    fn publish(
        m: &mut PortSeries,
        route_cap: &mut LabelCap,
        code_cap: &mut LabelCap,
        stats: &WebSummary,
        responses: &mut Option<Responses>,
        events: Vec<WebEvent>,
    ) {
        let mut stats = stats.lock().unwrap_or_else(|e| e.into_inner());
        if !stats.contains_key(&m.key) {
            stats.insert(m.key.clone(), PortStats::default());
        }
        let s = stats.get_mut(&m.key).expect("inserted above");
        for ev in events {
            match ev {
                WebEvent::HttpRequest(r) => {
                    *s.http_requests
                        .entry(format!("{} {}", r.method.as_str(), r.status_code))
                        .or_default() += 1;
                    if r.role == Role::Server {
                        m.request(r.method.as_str(), &r.route, r.status_code, route_cap)
                            .record(r.duration_ns() as f64 / 1e9);
                    }
                }
                WebEvent::SessionOpened { role, .. } => {
                    if role == Role::Server {
                        *responses = Some(Responses::default());
                    }
                    s.sessions += 1;
                    m.sessions.increment(1);
                    m.active.increment(1.0);
                }
                WebEvent::Message {
                    direction,
                    opcode,
                    size,
                    ts_ns,
                    ..
                } => {
                    if let Some(r) = responses.as_mut() {
                        match direction {
                            Direction::Received if !r.received(ts_ns) => {
                                m.untimed.increment(1);
                            }
                            Direction::Received => {}
                            Direction::Sent => {
                                for seconds in r.sent(ts_ns) {
                                    m.response.record(seconds);
                                }
                            }
                        }
                    }
                    match direction {
                        Direction::Received => {
                            s.messages_received += 1;
                            s.bytes_received += size;
                        }
                        Direction::Sent => {
                            s.messages_sent += 1;
                            s.bytes_sent += size;
                        }
                    }
                    let (count, sizes) = m.message(direction, opcode.as_str());
                    count.increment(1);
                    sizes.record(size as f64);
                }
                WebEvent::Control {
                    direction, kind, ..
                } => {
                    s.control_frames += 1;
                    m.control(direction, kind.as_str()).increment(1);
                }
                WebEvent::SessionClosed {
                    code,
                    closed_by,
                    duration_ns,
                    ..
                } => {
                    let code = code.map_or_else(|| "unknown".to_owned(), |c| c.to_string());
                    let code = code_cap.admit(&code);
                    let initiator = match closed_by {
                        Some(Role::Client) => "client",
                        Some(Role::Server) => "server",
                        None => "none",
                    };
                    *s.closes.entry(code.clone()).or_default() += 1;
                    m.close(code, initiator).increment(1);
                    m.duration.record(duration_ns as f64 / 1e9);
                    m.active.decrement(1.0);
                }
                WebEvent::ParseError { error, .. } => {
                    s.parse_errors += 1;
                    m.parse_error(error.label()).increment(1);
                    metrics::counter!("pipelens_parser_give_ups_total", "collector" => "websocket")
                        .increment(1);
                }
            }
        }
    }
}

/// The metric handles of one (process, container, port), each registered
/// once per label set: looking series up by their labels on every event is
/// what the connections collector once spent most of its CPU on.
struct PortSeries {
    /// The summary row it counts into too.
    key: PortKey,
    base: Vec<metrics::Label>,
    sessions: metrics::Counter,
    active: metrics::Gauge,
    duration: metrics::Histogram,
    response: metrics::Histogram,
    untimed: metrics::Counter,
    /// By (method, status), then route class.
    requests: HashMap<(&'static str, u16), HashMap<String, metrics::Histogram>>,
    messages: HashMap<(Direction, &'static str), (metrics::Counter, metrics::Histogram)>,
    controls: HashMap<(Direction, &'static str), metrics::Counter>,
    closes: HashMap<(String, &'static str), metrics::Counter>,
    parse_errors: HashMap<&'static str, metrics::Counter>,
}

impl PortSeries {
    fn new(key: &PortKey) -> Self {
        let base = key
            .identity
            .labels_with([metrics::Label::new("port", key.port.clone())]);
        Self {
            sessions: metrics::counter!("pipelens_websocket_sessions_total", base.clone()),
            active: metrics::gauge!("pipelens_websocket_sessions_active", base.clone()),
            duration: metrics::histogram!(
                "pipelens_websocket_session_duration_seconds",
                base.clone()
            ),
            response: metrics::histogram!(
                "pipelens_websocket_response_duration_seconds",
                base.clone()
            ),
            untimed: metrics::counter!("pipelens_websocket_responses_untimed_total", base.clone()),
            base,
            key: key.clone(),
            requests: HashMap::new(),
            messages: HashMap::new(),
            controls: HashMap::new(),
            closes: HashMap::new(),
            parse_errors: HashMap::new(),
        }
    }

    /// The request histogram of `method`, `route`, `status`; a route class
    /// already seen is looked up without allocating.
    fn request(
        &mut self,
        method: &'static str,
        route: &str,
        status: u16,
        cap: &mut LabelCap,
    ) -> &metrics::Histogram {
        let base = &self.base;
        let routes = self.requests.entry((method, status)).or_default();
        if routes.contains_key(route) {
            return &routes[route];
        }
        let admitted = cap.admit(route);
        if !routes.contains_key(&admitted) {
            let labels = with(
                base,
                &[
                    ("method", method.to_owned()),
                    ("route", admitted.clone()),
                    ("status_code", status.to_string()),
                ],
            );
            let histogram =
                metrics::histogram!("pipelens_http_server_request_duration_seconds", labels);
            routes.insert(admitted.clone(), histogram);
        }
        &routes[&admitted]
    }

    fn message(
        &mut self,
        direction: Direction,
        opcode: &'static str,
    ) -> &(metrics::Counter, metrics::Histogram) {
        let base = &self.base;
        self.messages.entry((direction, opcode)).or_insert_with(|| {
            let labels = with(
                base,
                &[
                    ("direction", direction.as_str().to_owned()),
                    ("opcode", opcode.to_owned()),
                ],
            );
            (
                metrics::counter!("pipelens_websocket_messages_total", labels.clone()),
                metrics::histogram!("pipelens_websocket_message_size_bytes", labels),
            )
        })
    }

    fn control(&mut self, direction: Direction, opcode: &'static str) -> &metrics::Counter {
        let base = &self.base;
        self.controls.entry((direction, opcode)).or_insert_with(|| {
            let labels = with(
                base,
                &[
                    ("direction", direction.as_str().to_owned()),
                    ("opcode", opcode.to_owned()),
                ],
            );
            metrics::counter!("pipelens_websocket_control_frames_total", labels)
        })
    }

    fn close(&mut self, code: String, initiator: &'static str) -> &metrics::Counter {
        let base = &self.base;
        self.closes
            .entry((code.clone(), initiator))
            .or_insert_with(|| {
                let labels = with(base, &[("code", code), ("initiator", initiator.to_owned())]);
                metrics::counter!("pipelens_websocket_closes_total", labels)
            })
    }

    fn parse_error(&mut self, reason: &'static str) -> &metrics::Counter {
        let base = &self.base;
        self.parse_errors.entry(reason).or_insert_with(|| {
            let labels = with(base, &[("reason", reason.to_owned())]);
            metrics::counter!("pipelens_http_parse_errors_total", labels)
        })
    }
}

/// `base` and then `extra`.
fn with(base: &[metrics::Label], extra: &[(&'static str, String)]) -> Vec<metrics::Label> {
    let mut l = base.to_vec();
    l.extend(
        extra
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, v.clone())),
    );
    l
}

/// Summary JSON of the websocket collector, per (process, port).
pub fn summary(stats: &WebSummary) -> serde_json::Value {
    let stats = stats.lock().unwrap_or_else(|e| e.into_inner());
    let rows: Vec<serde_json::Value> = stats
        .iter()
        .map(|(k, s)| serde_json::json!({ "labels": k, "stats": s }))
        .collect();
    serde_json::json!({ "ports": rows })
}

/// Whether an unclassified socket's first bytes open an HTTP/1.x request.
/// Connections already under way when the agent attached are not followed
/// (the stream analysis starts at a request).
pub fn recognise_http(data: &[u8]) -> Claim {
    match classify_first_bytes(data) {
        FirstBytes::Request => Claim::Mine,
        FirstBytes::NeedMore => Claim::Unsure,
        FirstBytes::NotHttp => Claim::NotMine,
    }
}

fn direction(flow: Flow) -> Direction {
    match flow {
        Flow::Received => Direction::Received,
        Flow::Sent => Direction::Sent,
    }
}

impl Analyser for WebAnalyser {
    fn name(&self) -> &'static str {
        "http"
    }

    fn summary(&self) -> Section {
        ("websocket", summary(&self.stats))
    }

    fn offer(&mut self, c: &Chunk<'_>) -> Claim {
        let claim = recognise_http(c.data);
        if claim != Claim::Mine {
            return claim;
        }
        // The side that sends the request is the client.
        let role = match c.flow {
            Flow::Received => Role::Server,
            Flow::Sent => Role::Client,
        };
        let port = match role {
            Role::Server => c.lport,
            Role::Client => c.rport,
        };
        let key = PortKey {
            identity: self.ids.of(c.tgid, c.comm),
            port: self.port_cap.admit(&port.to_string()),
        };
        let series = self.series_of(&key);
        self.conns.insert(
            c.sk,
            Conn {
                stream: WebStream::with_role(role),
                series,
                responses: None,
            },
        );
        Claim::Mine
    }

    fn feed(&mut self, c: &Chunk<'_>) {
        let Some(conn) = self.conns.get_mut(&c.sk) else {
            return;
        };
        let ts = match c.flow {
            Flow::Sent => c.ts_enter,
            Flow::Received => c.ts_exit,
        };
        conn.stream
            .feed_with_tail(direction(c.flow), c.data, c.tail, c.len as usize, ts);
        let events: Vec<WebEvent> = conn.stream.drain_events().collect();
        #[cfg(test)]
        self.log
            .lock()
            .expect("log")
            .extend(events.iter().map(|e| (c.sk, e.clone())));
        if !events.is_empty() {
            Self::publish(
                &mut self.series[conn.series],
                &mut self.route_cap,
                &mut self.code_cap,
                &self.stats,
                &mut conn.responses,
                events,
            );
        }
    }

    fn closed(&mut self, sk: u64, ts: u64) {
        if let Some(mut conn) = self.conns.remove(&sk) {
            conn.stream.on_connection_closed(ts);
            let events: Vec<WebEvent> = conn.stream.drain_events().collect();
            #[cfg(test)]
            self.log
                .lock()
                .expect("log")
                .extend(events.iter().map(|e| (sk, e.clone())));
            Self::publish(
                &mut self.series[conn.series],
                &mut self.route_cap,
                &mut self.code_cap,
                &self.stats,
                &mut conn.responses,
                events,
            );
        }
    }

    fn forget_all(&mut self) {
        self.conns.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_http_and_nothing_else() {
        assert_eq!(
            recognise_http(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"),
            Claim::Mine
        );
        assert_eq!(recognise_http(b"POST /events HTTP/1.1\r\n"), Claim::Mine);
        assert_eq!(recognise_http(b"GE"), Claim::Unsure);
        assert_eq!(
            recognise_http(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
            Claim::NotMine
        );
        assert_eq!(
            recognise_http(b"Q\x00\x00\x00\x0dSELECT 1\x00"),
            Claim::NotMine
        );
        assert_eq!(
            recognise_http(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]),
            Claim::NotMine
        );
    }
}
