//! The analysis phase of a performance review: what a [`Snapshot`] says is
//! costing the service time (or memory, or sessions), ranked, each with the
//! numbers that show it and a concrete fix.
//!
//! Every rule reads only the series the agent exports (see
//! [`crate::snapshot`]); subjects are what the labels hold — normalised
//! query templates, folded routes, code sites — never literals.
//!
//! Statements are counted from the client side when the snapshot has any
//! `role="client"` series (the service's own statements); the server side
//! (`role="server"`, the traced PostgreSQL backend) is used only when there
//! is no client side, so that nothing is counted twice.

use std::{collections::BTreeMap, fmt::Write as _, str::FromStr};

use serde::Serialize;

use crate::snapshot::{Series, Sketch, Snapshot};

mod html;

pub const HTTP_DURATION: &str = "pipelens_http_server_request_duration_seconds";
pub const WS_RESPONSE: &str = "pipelens_websocket_response_duration_seconds";
pub const WS_SESSIONS_ACTIVE: &str = "pipelens_websocket_sessions_active";
pub const WS_SESSIONS_TOTAL: &str = "pipelens_websocket_sessions_total";
pub const WS_CLOSES: &str = "pipelens_websocket_closes_total";
pub const WS_MESSAGES: &str = "pipelens_websocket_messages_total";
pub const DB_DURATION: &str = "pipelens_db_query_duration_seconds";
pub const DB_ERRORS: &str = "pipelens_db_query_errors_total";
pub const TCP_OPENED: &str = "pipelens_tcp_connections_opened_total";
pub const TCP_DURATION: &str = "pipelens_tcp_connection_duration_seconds";
pub const TCP_RESETS: &str = "pipelens_tcp_resets_total";
pub const TCP_CONNECT_FAILURES: &str = "pipelens_tcp_connect_failures_total";
pub const MEMORY_GROWTH: &str = "pipelens_memory_growth_bytes_total";

/// The rank key of a database connection: what opening one PostgreSQL
/// backend costs (fork, authentication, catalog cache warm-up), a nominal
/// figure since the agent does not time the handshake.
pub const NOMINAL_BACKEND_START_SECONDS: f64 = 0.002;

const MIB: f64 = 1024.0 * 1024.0;

/// What kind of problem a [`Finding`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    PerEventRoundTrips,
    NPlusOne,
    SlowTemplate,
    DatabaseConnectionChurn,
    UnboundedGrowth,
    AbnormalCloses,
    ClosedOnOverloadWithoutCode,
}

impl FindingKind {
    /// The snake_case name, as JSON has it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PerEventRoundTrips => "per_event_round_trips",
            Self::NPlusOne => "n_plus_one",
            Self::SlowTemplate => "slow_template",
            Self::DatabaseConnectionChurn => "database_connection_churn",
            Self::UnboundedGrowth => "unbounded_growth",
            Self::AbnormalCloses => "abnormal_closes",
            Self::ClosedOnOverloadWithoutCode => "closed_on_overload_without_code",
        }
    }
}

/// One problem found, with what shows it and what to do.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub title: String,
    /// The measured numbers behind the finding, one sentence each.
    pub evidence: Vec<String>,
    pub suggestion: String,
    /// The rank key: for time findings, the seconds the problem costs per
    /// second of run (statement time summed over all sessions). Findings
    /// that are not time carry an equivalent key, said on their kind:
    /// connection churn counts [`NOMINAL_BACKEND_START_SECONDS`] per new
    /// connection; memory growth is the fraction of its starting resident
    /// memory the process gains per second; abnormal closes are counted at
    /// one second of lost session per dropped session.
    pub cost_seconds: f64,
    /// The part of the response time this accounts for (0–1), when known.
    pub share_of_response_time: Option<f64>,
    /// Templates, routes, code sites or processes the finding is about.
    pub subjects: Vec<String>,
}

/// A name's part of a mix.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Share {
    pub name: String,
    pub count: u64,
    /// Of the total of its mix, 0–1.
    pub share: f64,
}

/// The shape of the workload: what the requests, statements and messages
/// were made of.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Fingerprint {
    /// Statements by template, most executed first.
    pub templates: Vec<Share>,
    /// HTTP requests by `METHOD route`, most requested first.
    pub routes: Vec<Share>,
    /// WebSocket data messages by direction (received, sent).
    pub message_directions: Vec<Share>,
}

/// A count of errors of one class (`http_5xx`, `db_error:<sqlstate>`,
/// `tcp_reset:<reason>`, `websocket_close:<code>`, ...).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ErrorCount {
    pub class: String,
    pub count: u64,
}

/// The highest resident memory of a target process.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProcessPeak {
    pub pid: u32,
    pub process: String,
    pub container: String,
    pub peak_rss_bytes: u64,
}

/// One interval, as the charts draw it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IntervalPoint {
    pub start_seconds: f64,
    pub duration_seconds: f64,
    pub requests_per_second: f64,
    pub messages_received_per_second: f64,
    pub statements_per_second: f64,
    /// p95 of the WebSocket response time in the interval.
    pub websocket_response_p95_seconds: Option<f64>,
    /// p95 of the HTTP request duration in the interval.
    pub http_request_p95_seconds: Option<f64>,
    /// Resident memory at the end of the interval by `process[pid]`.
    pub rss_bytes: BTreeMap<String, u64>,
}

/// The run at a glance.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Overview {
    pub duration_seconds: f64,
    pub intervals: usize,
    pub interval_seconds: f64,
    pub requests_per_second: f64,
    pub messages_received_per_second: f64,
    pub messages_sent_per_second: f64,
    pub statements_per_second: f64,
    /// Which side the statements were counted on: `client` or `server`.
    pub statement_role: Option<String>,
    pub statements_per_request: Option<f64>,
    pub statements_per_received_message: Option<f64>,
    /// The highest interval peak of `pipelens_websocket_sessions_active`
    /// (summed over its label sets).
    pub peak_concurrent_sessions: Option<f64>,
    pub websocket_response_p50_seconds: Option<f64>,
    pub websocket_response_p95_seconds: Option<f64>,
    pub http_request_p50_seconds: Option<f64>,
    pub http_request_p95_seconds: Option<f64>,
    pub peak_rss: Vec<ProcessPeak>,
    pub errors: Vec<ErrorCount>,
    pub fingerprint: Fingerprint,
    pub timeline: Vec<IntervalPoint>,
}

/// What [`analyse`] makes of a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Analysis {
    /// Most costly first.
    pub findings: Vec<Finding>,
    pub overview: Overview,
}

/// How [`Analysis::render`] writes a review.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Markdown,
    Json,
    /// One self-contained page: inline CSS and SVG charts, no script.
    Html,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "markdown" | "md" => Ok(Self::Markdown),
            "json" => Ok(Self::Json),
            "html" => Ok(Self::Html),
            other => Err(format!(
                "unknown review format {other:?}: use text, markdown, json or html"
            )),
        }
    }
}

// ---------------------------------------------------------------------------
// Reading the series.

/// A label set's aggregate over the run, kept per interval.
#[derive(Clone, Debug)]
struct Timed {
    counts: Vec<f64>,
    sums: Vec<f64>,
    sketch: Sketch,
}

impl Timed {
    fn new(n: usize) -> Self {
        Self {
            counts: vec![0.0; n],
            sums: vec![0.0; n],
            sketch: Sketch::default(),
        }
    }
    fn add(&mut self, i: usize, sketch: &Sketch) {
        self.counts[i] += sketch.count() as f64;
        self.sums[i] += sketch.sum();
        self.sketch.merge(sketch);
    }
    fn count(&self) -> f64 {
        self.counts.iter().sum()
    }
    fn total(&self) -> f64 {
        self.sums.iter().sum()
    }
}

#[derive(Clone, Debug)]
struct Template {
    operation: String,
    timed: Timed,
}

/// The views over a snapshot every rule shares.
struct View<'a> {
    s: &'a Snapshot,
    n: usize,
    durations: Vec<f64>,
    duration: f64,
    client_side: bool,
    templates: BTreeMap<String, Template>,
    routes: BTreeMap<String, Timed>,
    ws_response: Timed,
    http: Timed,
    received: Vec<f64>,
    sent: Vec<f64>,
}

fn is_data_opcode(series: &Series) -> bool {
    match series.label("opcode") {
        None => true,
        Some(op) => matches!(
            op.to_ascii_lowercase().as_str(),
            "text" | "binary" | "1" | "2"
        ),
    }
}

impl<'a> View<'a> {
    fn new(s: &'a Snapshot) -> Self {
        let n = s.intervals.len();
        let durations: Vec<f64> = s
            .intervals
            .iter()
            .map(|i| {
                if i.duration_seconds > 0.0 {
                    i.duration_seconds
                } else {
                    s.interval_seconds.max(f64::MIN_POSITIVE)
                }
            })
            .collect();
        let duration = if s.duration_seconds > 0.0 {
            s.duration_seconds
        } else {
            durations.iter().sum()
        };
        let client_side = s.intervals.iter().any(|i| {
            i.histograms
                .iter()
                .any(|h| h.series.name == DB_DURATION && h.series.label("role") == Some("client"))
        });
        let mut v = Self {
            s,
            n,
            durations,
            duration: duration.max(f64::MIN_POSITIVE),
            client_side,
            templates: BTreeMap::new(),
            routes: BTreeMap::new(),
            ws_response: Timed::new(n),
            http: Timed::new(n),
            received: vec![0.0; n],
            sent: vec![0.0; n],
        };
        for (i, iv) in s.intervals.iter().enumerate() {
            for h in &iv.histograms {
                let series = &h.series;
                if series.name == DB_DURATION && v.is_counted_statement(series) {
                    let Some(query) = series.label("query") else {
                        continue;
                    };
                    let operation = series
                        .label("operation")
                        .map(str::to_ascii_uppercase)
                        .unwrap_or_else(|| first_word(query));
                    v.templates
                        .entry(query.to_owned())
                        .or_insert_with(|| Template {
                            operation,
                            timed: Timed::new(n),
                        })
                        .timed
                        .add(i, &h.sketch);
                } else if series.name == HTTP_DURATION {
                    v.http.add(i, &h.sketch);
                    v.routes
                        .entry(route_name(series))
                        .or_insert_with(|| Timed::new(n))
                        .add(i, &h.sketch);
                } else if series.name == WS_RESPONSE {
                    v.ws_response.add(i, &h.sketch);
                }
            }
            for c in &iv.counters {
                if c.series.name == WS_MESSAGES && is_data_opcode(&c.series) {
                    match c.series.label("direction") {
                        Some("received") => v.received[i] += c.value as f64,
                        Some("sent") => v.sent[i] += c.value as f64,
                        _ => {}
                    }
                }
            }
        }
        v
    }

    /// Whether a database series is on the side statements are counted on.
    fn is_counted_statement(&self, series: &Series) -> bool {
        !self.client_side || series.label("role") == Some("client")
    }

    fn counter(&self, name: &str, keep: impl Fn(&Series) -> bool) -> Vec<f64> {
        self.s
            .intervals
            .iter()
            .map(|iv| {
                iv.counters
                    .iter()
                    .filter(|c| c.series.name == name && keep(&c.series))
                    .map(|c| c.value as f64)
                    .sum()
            })
            .collect()
    }

    fn statements(&self) -> Vec<f64> {
        let mut out = vec![0.0; self.n];
        for t in self.templates.values() {
            for (o, c) in out.iter_mut().zip(&t.timed.counts) {
                *o += c;
            }
        }
        out
    }

    fn statement_time(&self) -> f64 {
        self.templates.values().map(|t| t.timed.total()).sum()
    }
}

fn first_word(query: &str) -> String {
    query
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_uppercase()
}

fn route_name(series: &Series) -> String {
    let method = series.label("method").unwrap_or("?");
    let route = series.label("route").unwrap_or("?");
    format!("{method} {route}")
}

// ---------------------------------------------------------------------------
// Arithmetic.

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// The coefficient of variation (standard deviation over mean); 0 for
/// fewer than two values.
fn cv(xs: &[f64]) -> f64 {
    let m = mean(xs);
    if xs.len() < 2 || m == 0.0 {
        return 0.0;
    }
    let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64;
    var.sqrt() / m
}

/// The Pearson correlation, `None` when either side is constant.
fn pearson(xs: &[f64], ys: &[f64]) -> Option<f64> {
    let (mx, my) = (mean(xs), mean(ys));
    let mut sxy = 0.0;
    let mut sxx = 0.0;
    let mut syy = 0.0;
    for (x, y) in xs.iter().zip(ys) {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx).powi(2);
        syy += (y - my).powi(2);
    }
    if sxx == 0.0 || syy == 0.0 {
        None
    } else {
        Some(sxy / (sxx * syy).sqrt())
    }
}

/// Least squares `y = slope · x + intercept`, with R² (0 when `y` is
/// constant: nothing is explained because nothing moves).
fn linear_fit(xs: &[f64], ys: &[f64]) -> Option<(f64, f64, f64)> {
    if xs.len() < 3 || xs.len() != ys.len() {
        return None;
    }
    let (mx, my) = (mean(xs), mean(ys));
    let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    if sxx == 0.0 {
        return None;
    }
    let sxy: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let slope = sxy / sxx;
    let intercept = my - slope * mx;
    let ss_tot: f64 = ys.iter().map(|y| (y - my).powi(2)).sum();
    let ss_res: f64 = xs
        .iter()
        .zip(ys)
        .map(|(x, y)| (y - (slope * x + intercept)).powi(2))
        .sum();
    let r2 = if ss_tot == 0.0 {
        0.0
    } else {
        1.0 - ss_res / ss_tot
    };
    Some((slope, intercept, r2))
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// A duration for people: `850 µs`, `1.25 ms`, `2.40 s`.
pub fn human_seconds(s: f64) -> String {
    // Below what rounds to 1000 µs, so 0.9999 ms reads as 1.00 ms.
    if s < 0.9995e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// A size for people, in MiB.
pub fn human_bytes(b: f64) -> String {
    format!("{:.1} MiB", b / MIB)
}

fn percent(x: f64) -> String {
    format!("{:.1} %", x * 100.0)
}

// ---------------------------------------------------------------------------
// The analysis.

/// Reviews a snapshot: every rule below, ranked by cost, and the overview.
pub fn analyse(s: &Snapshot) -> Analysis {
    let v = View::new(s);
    let mut findings = Vec::new();
    findings.extend(per_event_round_trips(&v));
    findings.extend(n_plus_one(&v));
    let explained: Vec<String> = findings
        .iter()
        .flat_map(|f| f.subjects.iter().take(1).cloned())
        .collect();
    findings.extend(slow_templates(&v, &explained));
    findings.extend(connection_churn(&v));
    findings.extend(unbounded_growth(&v));
    findings.extend(abnormal_closes(&v));
    findings.sort_by(|a, b| b.cost_seconds.total_cmp(&a.cost_seconds));
    Analysis {
        findings,
        overview: overview(&v),
    }
}

/// The ratio of executions to received messages that reads as "one round
/// trip per message".
pub const PER_EVENT_RATIO: (f64, f64) = (0.5, 2.0);
/// Fewer received messages than this say nothing about a per-message rule.
const MIN_EVENTS: f64 = 20.0;

/// `per_event_round_trips`: an INSERT or UPDATE template executed about
/// once per received WebSocket data message (executions / messages within
/// [`PER_EVENT_RATIO`], over the intervals that had messages): each message
/// waits for its own statement. When the message count varies across
/// intervals (CV ≥ 0.1) the template's count must follow it (Pearson ≥
/// 0.8), so that an INSERT driven by something else at a similar rate is
/// not taken for a per-message one.
fn per_event_round_trips(v: &View) -> Vec<Finding> {
    let with_messages: Vec<usize> = (0..v.n).filter(|&i| v.received[i] > 0.0).collect();
    let messages: f64 = with_messages.iter().map(|&i| v.received[i]).sum();
    if messages < MIN_EVENTS {
        return vec![];
    }
    let response_time = v.ws_response.total();
    let mut out = Vec::new();
    for (query, t) in &v.templates {
        if !matches!(t.operation.as_str(), "INSERT" | "UPDATE") {
            continue;
        }
        let executions: f64 = with_messages.iter().map(|&i| t.timed.counts[i]).sum();
        let r = executions / messages;
        if !(PER_EVENT_RATIO.0..=PER_EVENT_RATIO.1).contains(&r) {
            continue;
        }
        let msgs: Vec<f64> = with_messages.iter().map(|&i| v.received[i]).collect();
        let execs: Vec<f64> = with_messages.iter().map(|&i| t.timed.counts[i]).collect();
        let correlation = if cv(&msgs) >= STEADY_CV {
            match pearson(&msgs, &execs) {
                Some(p) if p >= MIN_CORRELATION => Some(p),
                _ => continue,
            }
        } else {
            None
        };
        let total = t.timed.total();
        let mean_exec = ratio(total, t.timed.count()).unwrap_or(0.0);
        let share = ratio(total, response_time);
        let mut evidence = vec![
            format!(
                "{executions:.0} executions for {messages:.0} received messages over {} intervals: \
                 {r:.2} per message",
                with_messages.len()
            ),
            match correlation {
                Some(p) => format!(
                    "its executions follow the message count interval by interval \
                     (correlation {p:.2})"
                ),
                None => "the message rate was steady, so the correlation could not be checked"
                    .to_owned(),
            },
            format!(
                "{} per execution (p95 {}), {} in all",
                human_seconds(mean_exec),
                human_seconds(t.timed.sketch.quantile(0.95).unwrap_or(0.0)),
                human_seconds(total)
            ),
        ];
        if let Some(share) = share {
            evidence.push(format!(
                "{} of the WebSocket response time ({} responses, mean {})",
                percent(share),
                v.ws_response.count(),
                human_seconds(ratio(response_time, v.ws_response.count()).unwrap_or(0.0))
            ));
        }
        out.push(Finding {
            kind: FindingKind::PerEventRoundTrips,
            title: format!("One {} per received message", t.operation),
            evidence,
            suggestion: format!(
                "Take the {} off the message path: queue the rows and write them in batches \
                 (one multi-row INSERT or COPY per batch, flushed by size or every few \
                 milliseconds) from a separate task, so a message no longer waits for a \
                 database round trip.",
                t.operation
            ),
            cost_seconds: total / v.duration,
            share_of_response_time: share,
            subjects: vec![query.clone()],
        });
    }
    out
}

/// Executions per request from which a SELECT reads as N+1.
pub const N_PLUS_ONE_RATIO: f64 = 5.0;
/// The highest coefficient of variation of the per-interval ratio that
/// still reads as a fixed number of executions per request.
const N_PLUS_ONE_MAX_CV: f64 = 0.3;
/// A driver whose per-interval count varies by less than this (CV) is
/// steady: correlation cannot be checked against it.
const STEADY_CV: f64 = 0.1;
const MIN_CORRELATION: f64 = 0.8;
const MIN_REQUESTS: f64 = 10.0;

/// `n_plus_one`: a SELECT template executed many times per request of one
/// route (or per received WebSocket message).
///
/// The rule, per (template, driver) pair, over the intervals in which the
/// driver (a route's requests, or received messages) occurred:
/// - at least [`MIN_REQUESTS`] requests in at least two intervals;
/// - executions / requests ≥ [`N_PLUS_ONE_RATIO`] over those intervals;
/// - the per-interval ratio is stable (coefficient of variation ≤ 0.3):
///   a fixed number of executions per request;
/// - when the request count itself varies (CV ≥ 0.1), the template's
///   per-interval count correlates with it (Pearson ≥ 0.8); when the request
///   rate was steady this cannot be checked, and the evidence says so.
///
/// A template qualifying against several drivers is reported once, against
/// the one with the most stable ratio.
fn n_plus_one(v: &View) -> Vec<Finding> {
    let mut drivers: Vec<(String, &[f64], f64, bool)> = v
        .routes
        .iter()
        .map(|(name, t)| (name.clone(), t.counts.as_slice(), t.total(), true))
        .collect();
    drivers.push((
        "received WebSocket message".to_owned(),
        v.received.as_slice(),
        v.ws_response.total(),
        false,
    ));
    let mut out = Vec::new();
    for (query, t) in &v.templates {
        if t.operation != "SELECT" {
            continue;
        }
        struct Fit<'d> {
            driver: &'d str,
            is_route: bool,
            driver_time: f64,
            requests: f64,
            executions: f64,
            ratio: f64,
            cv: f64,
            correlation: Option<f64>,
            intervals: usize,
        }
        let mut best: Option<Fit> = None;
        for (name, counts, driver_time, is_route) in &drivers {
            let idx: Vec<usize> = (0..v.n).filter(|&i| counts[i] > 0.0).collect();
            let requests: f64 = idx.iter().map(|&i| counts[i]).sum();
            if idx.len() < 2 || requests < MIN_REQUESTS {
                continue;
            }
            let executions: f64 = idx.iter().map(|&i| t.timed.counts[i]).sum();
            let r = executions / requests;
            if r < N_PLUS_ONE_RATIO {
                continue;
            }
            let ratios: Vec<f64> = idx.iter().map(|&i| t.timed.counts[i] / counts[i]).collect();
            let c = cv(&ratios);
            if c > N_PLUS_ONE_MAX_CV {
                continue;
            }
            let reqs: Vec<f64> = idx.iter().map(|&i| counts[i]).collect();
            let execs: Vec<f64> = idx.iter().map(|&i| t.timed.counts[i]).collect();
            let correlation = if cv(&reqs) >= STEADY_CV {
                match pearson(&reqs, &execs) {
                    Some(p) if p >= MIN_CORRELATION => Some(p),
                    _ => continue,
                }
            } else {
                None
            };
            if best.as_ref().is_none_or(|b| c < b.cv) {
                best = Some(Fit {
                    driver: name,
                    is_route: *is_route,
                    driver_time: *driver_time,
                    requests,
                    executions,
                    ratio: r,
                    cv: c,
                    correlation,
                    intervals: idx.len(),
                });
            }
        }
        let Some(f) = best else { continue };
        let total = t.timed.total();
        // The time of the executions that fell in the driver's intervals.
        let attributed = total * f.executions / t.timed.count().max(1.0);
        let per = if f.is_route { "request" } else { "message" };
        let mut evidence = vec![
            format!(
                "{:.0} executions for {:.0} {} over {} intervals: {:.1} per {per} \
                 (per-interval ratio varies by {})",
                f.executions,
                f.requests,
                if f.is_route {
                    format!("requests of {}", f.driver)
                } else {
                    "received messages".to_owned()
                },
                f.intervals,
                f.ratio,
                percent(f.cv)
            ),
            match f.correlation {
                Some(p) => format!(
                    "its executions follow the {per} count interval by interval \
                     (correlation {p:.2})"
                ),
                None => {
                    format!("the {per} rate was steady, so the correlation could not be checked")
                }
            },
            format!(
                "{} per execution, {} per {per} in all, {} over the run",
                human_seconds(ratio(total, t.timed.count()).unwrap_or(0.0)),
                human_seconds(attributed / f.requests),
                human_seconds(total)
            ),
        ];
        let share = ratio(attributed, f.driver_time);
        if let Some(share) = share {
            evidence.push(format!(
                "{} of the time of {}",
                percent(share),
                if f.is_route {
                    f.driver
                } else {
                    "the WebSocket responses"
                }
            ));
        }
        let mut subjects = vec![query.clone()];
        if f.is_route {
            subjects.push(f.driver.to_owned());
        }
        out.push(Finding {
            kind: FindingKind::NPlusOne,
            title: format!(
                "N+1 SELECT: {:.0} executions per {}",
                f.ratio,
                if f.is_route {
                    f.driver
                } else {
                    "received message"
                }
            ),
            evidence,
            suggestion: "Fetch the rows in one statement: collect the keys and run one query \
                         with `= ANY($1)` (or a join with the parent query) instead of one \
                         SELECT per row."
                .to_owned(),
            cost_seconds: total / v.duration,
            share_of_response_time: share,
            subjects,
        });
    }
    out
}

/// The part of all statement time from which a template is reported slow.
pub const SLOW_TEMPLATE_SHARE: f64 = 0.10;
const SLOW_TEMPLATE_MAX: usize = 3;
/// Statement seconds per second of run below which a template is not worth
/// a finding however large its share (a quiet run's biggest template).
pub const SLOW_TEMPLATE_MIN_COST: f64 = 0.01;

/// `slow_template`: the templates taking the most statement time (count ×
/// mean), at most three, each at least [`SLOW_TEMPLATE_SHARE`] of all of it
/// and costing at least [`SLOW_TEMPLATE_MIN_COST`].
/// Templates already reported as per-event round trips or N+1 are left
/// out: their cost is their count, and their finding already says so.
fn slow_templates(v: &View, explained: &[String]) -> Vec<Finding> {
    let all = v.statement_time();
    if all <= 0.0 {
        return vec![];
    }
    let response_time = v.ws_response.total() + v.http.total();
    let mut ranked: Vec<(&String, &Template)> = v.templates.iter().collect();
    ranked.sort_by(|a, b| b.1.timed.total().total_cmp(&a.1.timed.total()));
    ranked
        .into_iter()
        .filter(|(q, t)| {
            t.timed.total() / all >= SLOW_TEMPLATE_SHARE
                && t.timed.total() / v.duration >= SLOW_TEMPLATE_MIN_COST
                && !explained.contains(q)
        })
        .take(SLOW_TEMPLATE_MAX)
        .map(|(query, t)| {
            let total = t.timed.total();
            let count = t.timed.count();
            let m = ratio(total, count).unwrap_or(0.0);
            let p50 = t.timed.sketch.quantile(0.5).unwrap_or(0.0);
            let p95 = t.timed.sketch.quantile(0.95).unwrap_or(0.0);
            let tail = p50 > 0.0 && p95 / p50 >= 5.0;
            Finding {
                kind: FindingKind::SlowTemplate,
                title: format!(
                    "{} of statement time in one {} template",
                    percent(total / all),
                    t.operation
                ),
                evidence: vec![
                    format!(
                        "{count:.0} executions ({:.1}/s), mean {}, p50 {}, p95 {}",
                        count / v.duration,
                        human_seconds(m),
                        human_seconds(p50),
                        human_seconds(p95)
                    ),
                    format!(
                        "{} in all, {} of the {} spent in statements",
                        human_seconds(total),
                        percent(total / all),
                        human_seconds(all)
                    ),
                ],
                suggestion: if tail {
                    "The p95 is far above the median: look for lock waits and cache misses \
                     (EXPLAIN (ANALYZE, BUFFERS) on a slow execution, pg_stat_activity \
                     wait events) before touching the plan."
                        .to_owned()
                } else {
                    "Run EXPLAIN (ANALYZE, BUFFERS) on this template: a sequential scan or \
                     sort wants an index on its predicate or ORDER BY columns; if the plan is \
                     already good, cache the result or execute it less often."
                        .to_owned()
                },
                cost_seconds: total / v.duration,
                share_of_response_time: ratio(total, response_time).map(|r| r.min(1.0)),
                subjects: vec![query.clone()],
            }
        })
        .collect()
}

/// New database connections per request (or received message) from which
/// every request reads as opening its own backend.
pub const CHURN_PER_REQUEST: f64 = 0.5;
const MIN_CHURN_CONNECTIONS: f64 = 10.0;

/// The server ports of the database systems the statements name
/// (PostgreSQL's 5432 always).
fn database_ports(v: &View) -> Vec<String> {
    let mut ports = vec!["5432".to_owned()];
    for iv in &v.s.intervals {
        for h in &iv.histograms {
            if h.series.name == DB_DURATION {
                let port = match h.series.label("db_system") {
                    Some("mysql") | Some("mariadb") => "3306",
                    _ => continue,
                };
                if !ports.iter().any(|p| p == port) {
                    ports.push(port.to_owned());
                }
            }
        }
    }
    ports
}

/// `database_connection_churn`: outbound connections to a database port
/// opened at ≥ [`CHURN_PER_REQUEST`] per HTTP request plus received
/// message: a new backend per request instead of a pool.
fn connection_churn(v: &View) -> Vec<Finding> {
    let ports = database_ports(v);
    let is_db = |s: &Series| {
        s.label("direction") == Some("outbound")
            && s.label("port")
                .is_some_and(|p| ports.iter().any(|q| q == p))
    };
    let opened: f64 = v.counter(TCP_OPENED, is_db).iter().sum();
    let requests = v.http.count();
    let messages: f64 = v.received.iter().sum();
    let drivers = requests + messages;
    let Some(per) = ratio(opened, drivers) else {
        return vec![];
    };
    if opened < MIN_CHURN_CONNECTIONS || per < CHURN_PER_REQUEST {
        return vec![];
    }
    let mut processes: BTreeMap<String, f64> = BTreeMap::new();
    let mut lifetimes = Sketch::default();
    for iv in &v.s.intervals {
        for c in &iv.counters {
            if c.series.name == TCP_OPENED && is_db(&c.series) {
                let p = c.series.label("process").unwrap_or("?").to_owned();
                *processes.entry(p).or_default() += c.value as f64;
            }
        }
        for h in &iv.histograms {
            if h.series.name == TCP_DURATION && is_db(&h.series) {
                lifetimes.merge(&h.sketch);
            }
        }
    }
    let statements: f64 = v.statements().iter().sum();
    let mut evidence = vec![
        format!(
            "{opened:.0} outbound connections to database port(s) {} ({:.1}/s)",
            ports.join(", "),
            opened / v.duration
        ),
        format!(
            "{per:.2} per request or message ({requests:.0} HTTP requests, {messages:.0} \
             received messages)"
        ),
    ];
    if let Some(ps) = ratio(opened, statements) {
        evidence.push(format!(
            "{ps:.2} per statement ({statements:.0} statements)"
        ));
    }
    if let Some(p50) = lifetimes.quantile(0.5) {
        evidence.push(format!(
            "those connections lived {} (p50), {} (p95)",
            human_seconds(p50),
            human_seconds(lifetimes.quantile(0.95).unwrap_or(p50))
        ));
    }
    evidence.push(format!(
        "ranked at a nominal {} per new backend (fork and authentication)",
        human_seconds(NOMINAL_BACKEND_START_SECONDS)
    ));
    vec![Finding {
        kind: FindingKind::DatabaseConnectionChurn,
        title: format!("{per:.2} new database connections per request or message"),
        evidence,
        suggestion: "Open database connections once: use a connection pool (sized to the \
                     concurrency the database serves well) shared by all requests, or put \
                     PgBouncer in front of the database."
            .to_owned(),
        cost_seconds: opened / v.duration * NOMINAL_BACKEND_START_SECONDS,
        share_of_response_time: None,
        subjects: processes.into_keys().collect(),
    }]
}

/// R² from which resident memory reads as growing steadily.
pub const GROWTH_MIN_R2: f64 = 0.8;
/// Growth over the run, as a fraction of the first reading, and in bytes,
/// below which it is not reported.
pub const GROWTH_MIN_FRACTION: f64 = 0.10;
pub const GROWTH_MIN_BYTES: f64 = 8.0 * MIB;
const GROWTH_SITES: usize = 3;

/// `unbounded_growth`: a target whose resident memory grows steadily across
/// the intervals (a linear fit with positive slope and R² ≥ 0.8; growth
/// from first to last reading ≥ 10 % and ≥ 8 MiB), with the code sites
/// the agent attributes the most growth to.
fn unbounded_growth(v: &View) -> Vec<Finding> {
    let mut by_process: BTreeMap<(u32, String, String), Vec<(f64, f64)>> = BTreeMap::new();
    for iv in &v.s.intervals {
        let t = iv.start_seconds + iv.duration_seconds;
        for p in &iv.processes {
            by_process
                .entry((p.pid, p.process.clone(), p.container.clone()))
                .or_default()
                .push((t, p.rss_bytes as f64));
        }
    }
    let mut out = Vec::new();
    for ((pid, process, container), points) in by_process {
        let xs: Vec<f64> = points.iter().map(|p| p.0).collect();
        let ys: Vec<f64> = points.iter().map(|p| p.1).collect();
        let Some((slope, _, r2)) = linear_fit(&xs, &ys) else {
            continue;
        };
        let (first, last) = (ys[0], ys[ys.len() - 1]);
        let growth = last - first;
        if slope <= 0.0
            || r2 < GROWTH_MIN_R2
            || growth < GROWTH_MIN_BYTES
            || first <= 0.0
            || growth / first < GROWTH_MIN_FRACTION
        {
            continue;
        }
        let mut sites: BTreeMap<String, f64> = BTreeMap::new();
        for iv in &v.s.intervals {
            for c in &iv.counters {
                if c.series.name == MEMORY_GROWTH
                    && c.series.label("process") == Some(process.as_str())
                    && c.series.label("container").unwrap_or("") == container
                {
                    let site = c.series.label("site").unwrap_or("?").to_owned();
                    *sites.entry(site).or_default() += c.value as f64;
                }
            }
        }
        let site_total: f64 = sites.values().sum();
        let mut sites: Vec<(String, f64)> = sites.into_iter().collect();
        sites.sort_by(|a, b| b.1.total_cmp(&a.1));
        sites.truncate(GROWTH_SITES);
        let mut evidence = vec![
            format!(
                "resident memory went from {} to {} (+{}, {}) over {} readings",
                human_bytes(first),
                human_bytes(last),
                human_bytes(growth),
                percent(growth / first),
                ys.len()
            ),
            format!("a steady {}/s (linear fit R² {r2:.2})", human_bytes(slope)),
        ];
        for (site, bytes) in &sites {
            evidence.push(format!(
                "{} of growth attributed to {site} ({} of the attributed growth)",
                human_bytes(*bytes),
                percent(ratio(*bytes, site_total).unwrap_or(0.0))
            ));
        }
        let suggestion = match sites.first() {
            Some((site, _)) => format!(
                "Bound what {site} keeps: give the queue or buffer a capacity and apply \
                 back-pressure (or drop, and count what was dropped) when it is full, so a \
                 slow consumer cannot grow it without limit."
            ),
            None => "Find what keeps growing (run with the memory profiler to attribute \
                     growth to code sites) and bound it: a capacity with back-pressure."
                .to_owned(),
        };
        let mut subjects: Vec<String> = sites.into_iter().map(|(s, _)| s).collect();
        subjects.push(format!("{process}[{pid}]"));
        out.push(Finding {
            kind: FindingKind::UnboundedGrowth,
            title: format!("{process}[{pid}] grows without bound"),
            evidence,
            suggestion,
            cost_seconds: slope / first,
            share_of_response_time: None,
            subjects,
        });
    }
    out
}

/// The close codes that say a session ended badly: 1006 (the connection
/// ended without a close frame), 1011 (server error), 1013 (try again
/// later).
pub const ABNORMAL_CODES: [&str; 3] = ["1006", "1011", "1013"];
const MIN_OVERLOAD_CLOSES: f64 = 5.0;

/// `abnormal_closes`: sessions that ended with an abnormal code, with
/// counts and rates; and `closed_on_overload_without_code`: 1006 closes
/// concentrated in the intervals of peak load — those whose peak concurrent
/// sessions or WebSocket response p95 is within 10 % of the run's highest —
/// at least half of them there, and at least twice the share those
/// intervals are of the run.
fn abnormal_closes(v: &View) -> Vec<Finding> {
    let all_closes: f64 = v.counter(WS_CLOSES, |_| true).iter().sum();
    let mut out = Vec::new();
    let mut evidence = Vec::new();
    let mut subjects = Vec::new();
    let mut abnormal = 0.0;
    for code in ABNORMAL_CODES {
        let per = v.counter(WS_CLOSES, |s| s.label("code") == Some(code));
        let count: f64 = per.iter().sum();
        if count == 0.0 {
            continue;
        }
        abnormal += count;
        let mut by_initiator: BTreeMap<String, f64> = BTreeMap::new();
        for iv in &v.s.intervals {
            for c in &iv.counters {
                if c.series.name == WS_CLOSES && c.series.label("code") == Some(code) {
                    *by_initiator
                        .entry(c.series.label("initiator").unwrap_or("none").to_owned())
                        .or_default() += c.value as f64;
                }
            }
        }
        let initiators: Vec<String> = by_initiator
            .iter()
            .map(|(k, n)| format!("{n:.0} {k}"))
            .collect();
        evidence.push(format!(
            "{count:.0} closes with code {code} ({:.2}/s, {} of all closes; initiator: {})",
            count / v.duration,
            percent(ratio(count, all_closes).unwrap_or(0.0)),
            initiators.join(", ")
        ));
        subjects.push(code.to_owned());
    }
    if abnormal == 0.0 {
        return out;
    }
    let sessions: f64 = v.counter(WS_SESSIONS_TOTAL, |_| true).iter().sum();
    if let Some(r) = ratio(abnormal, sessions) {
        evidence.push(format!(
            "{} of the {sessions:.0} sessions opened",
            percent(r)
        ));
    }
    out.push(Finding {
        kind: FindingKind::AbnormalCloses,
        title: format!("{abnormal:.0} WebSocket sessions ended abnormally"),
        evidence,
        suggestion: "Close sessions with a code that tells the client what happened: 1001 on \
                     shutdown, 1013 (Try Again Later) when shedding load, and 1011 only for \
                     real server errors — and find the cause of each 1011 in the server log."
            .to_owned(),
        cost_seconds: abnormal / v.duration,
        share_of_response_time: None,
        subjects,
    });

    let no_frame = v.counter(WS_CLOSES, |s| s.label("code") == Some("1006"));
    let total_no_frame: f64 = no_frame.iter().sum();
    if total_no_frame < MIN_OVERLOAD_CLOSES || v.n < 3 {
        return out;
    }
    let peaks: Vec<f64> =
        v.s.intervals
            .iter()
            .map(|iv| {
                iv.gauges
                    .iter()
                    .filter(|g| g.series.name == WS_SESSIONS_ACTIVE)
                    .map(|g| g.max)
                    .sum()
            })
            .collect();
    let p95s: Vec<f64> = (0..v.n)
        .map(|i| {
            let mut s = Sketch::default();
            for h in &v.s.intervals[i].histograms {
                if h.series.name == WS_RESPONSE {
                    s.merge(&h.sketch);
                }
            }
            s.quantile(0.95).unwrap_or(0.0)
        })
        .collect();
    let peak_sessions = peaks.iter().copied().fold(0.0, f64::max);
    let peak_p95 = p95s.iter().copied().fold(0.0, f64::max);
    let loaded: Vec<usize> = (0..v.n)
        .filter(|&i| {
            (peak_sessions > 0.0 && peaks[i] >= 0.9 * peak_sessions)
                || (peak_p95 > 0.0 && p95s[i] >= 0.9 * peak_p95)
        })
        .collect();
    let in_loaded: f64 = loaded.iter().map(|&i| no_frame[i]).sum();
    let close_share = in_loaded / total_no_frame;
    let interval_share = loaded.len() as f64 / v.n as f64;
    if close_share < 0.5 || close_share < 2.0 * interval_share {
        return out;
    }
    let mut evidence = vec![format!(
        "{in_loaded:.0} of {total_no_frame:.0} closes without a close frame ({}) fell in {} of \
         {} intervals ({}), the intervals of peak load",
        percent(close_share),
        loaded.len(),
        v.n,
        percent(interval_share)
    )];
    if peak_sessions > 0.0 {
        let other: Vec<f64> = (0..v.n)
            .filter(|i| !loaded.contains(i))
            .map(|i| peaks[i])
            .collect();
        evidence.push(format!(
            "peak concurrent sessions {peak_sessions:.0} there, against {:.0} on average \
             elsewhere",
            mean(&other)
        ));
    }
    if peak_p95 > 0.0 {
        evidence.push(format!(
            "WebSocket response p95 up to {} there",
            human_seconds(peak_p95)
        ));
    }
    out.push(Finding {
        kind: FindingKind::ClosedOnOverloadWithoutCode,
        title: "Sessions dropped under overload without a close code".to_owned(),
        evidence,
        suggestion: "When shedding load, close the session with 1013 (Try Again Later) and \
                     let the client back off and reconnect, instead of dropping the \
                     connection; cap concurrent sessions below the point where responses \
                     degrade."
            .to_owned(),
        cost_seconds: in_loaded / v.duration,
        share_of_response_time: None,
        subjects: vec!["1006".to_owned()],
    });
    out
}

// ---------------------------------------------------------------------------
// The overview.

fn shares(mut counts: Vec<(String, f64)>, keep: usize) -> Vec<Share> {
    let total: f64 = counts.iter().map(|c| c.1).sum();
    counts.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts
        .into_iter()
        .filter(|c| c.1 > 0.0)
        .take(keep)
        .map(|(name, count)| Share {
            name,
            count: count as u64,
            share: ratio(count, total).unwrap_or(0.0),
        })
        .collect()
}

fn overview(v: &View) -> Overview {
    let requests = v.http.count();
    let received: f64 = v.received.iter().sum();
    let sent: f64 = v.sent.iter().sum();
    let statements_per_interval = v.statements();
    let statements: f64 = statements_per_interval.iter().sum();
    let peak_sessions =
        v.s.intervals
            .iter()
            .filter(|iv| {
                iv.gauges
                    .iter()
                    .any(|g| g.series.name == WS_SESSIONS_ACTIVE)
            })
            .map(|iv| {
                iv.gauges
                    .iter()
                    .filter(|g| g.series.name == WS_SESSIONS_ACTIVE)
                    .map(|g| g.max)
                    .sum::<f64>()
            })
            .reduce(f64::max);

    let mut peak_rss: BTreeMap<(u32, String, String), u64> = BTreeMap::new();
    for iv in &v.s.intervals {
        for p in &iv.processes {
            let e = peak_rss
                .entry((p.pid, p.process.clone(), p.container.clone()))
                .or_default();
            *e = (*e).max(p.rss_bytes);
        }
    }

    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for iv in &v.s.intervals {
        for h in &iv.histograms {
            if h.series.name == HTTP_DURATION {
                let class = match h.series.label("status_code").and_then(|c| c.chars().next()) {
                    Some('5') => "http_5xx",
                    Some('4') => "http_4xx",
                    _ => continue,
                };
                *errors.entry(class.to_owned()).or_default() += h.sketch.count() as u64;
            }
        }
        for c in &iv.counters {
            let s = &c.series;
            let class = match s.name.as_str() {
                DB_ERRORS if v.is_counted_statement(s) => {
                    format!("db_error:{}", s.label("sqlstate").unwrap_or("?"))
                }
                TCP_RESETS => format!("tcp_reset:{}", s.label("reason").unwrap_or("?")),
                TCP_CONNECT_FAILURES => {
                    format!("tcp_connect_failure:{}", s.label("reason").unwrap_or("?"))
                }
                WS_CLOSES if s.label("code").is_some_and(|c| ABNORMAL_CODES.contains(&c)) => {
                    format!("websocket_close:{}", s.label("code").unwrap_or("?"))
                }
                _ => continue,
            };
            *errors.entry(class).or_default() += c.value;
        }
    }

    let timeline = (0..v.n)
        .map(|i| {
            let iv = &v.s.intervals[i];
            let d = v.durations[i];
            let quantile = |name: &str| {
                let mut s = Sketch::default();
                for h in iv.histograms.iter().filter(|h| h.series.name == name) {
                    s.merge(&h.sketch);
                }
                s.quantile(0.95)
            };
            IntervalPoint {
                start_seconds: iv.start_seconds,
                duration_seconds: d,
                requests_per_second: v.http.counts[i] / d,
                messages_received_per_second: v.received[i] / d,
                statements_per_second: statements_per_interval[i] / d,
                websocket_response_p95_seconds: quantile(WS_RESPONSE),
                http_request_p95_seconds: quantile(HTTP_DURATION),
                rss_bytes: iv
                    .processes
                    .iter()
                    .map(|p| (format!("{}[{}]", p.process, p.pid), p.rss_bytes))
                    .collect(),
            }
        })
        .collect();

    Overview {
        duration_seconds: v.duration,
        intervals: v.n,
        interval_seconds: v.s.interval_seconds,
        requests_per_second: requests / v.duration,
        messages_received_per_second: received / v.duration,
        messages_sent_per_second: sent / v.duration,
        statements_per_second: statements / v.duration,
        statement_role: (!v.templates.is_empty())
            .then(|| if v.client_side { "client" } else { "server" }.to_owned()),
        statements_per_request: ratio(statements, requests),
        statements_per_received_message: ratio(statements, received),
        peak_concurrent_sessions: peak_sessions,
        websocket_response_p50_seconds: v.ws_response.sketch.quantile(0.5),
        websocket_response_p95_seconds: v.ws_response.sketch.quantile(0.95),
        http_request_p50_seconds: v.http.sketch.quantile(0.5),
        http_request_p95_seconds: v.http.sketch.quantile(0.95),
        peak_rss: peak_rss
            .into_iter()
            .map(|((pid, process, container), peak_rss_bytes)| ProcessPeak {
                pid,
                process,
                container,
                peak_rss_bytes,
            })
            .collect(),
        errors: errors
            .into_iter()
            .map(|(class, count)| ErrorCount { class, count })
            .collect(),
        fingerprint: Fingerprint {
            templates: shares(
                v.templates
                    .iter()
                    .map(|(q, t)| (q.clone(), t.timed.count()))
                    .collect(),
                10,
            ),
            routes: shares(
                v.routes
                    .iter()
                    .map(|(r, t)| (r.clone(), t.count()))
                    .collect(),
                10,
            ),
            message_directions: shares(
                vec![("received".to_owned(), received), ("sent".to_owned(), sent)],
                2,
            ),
        },
        timeline,
    }
}

// ---------------------------------------------------------------------------
// Rendering.

fn opt_seconds(s: Option<f64>) -> String {
    s.map(human_seconds).unwrap_or_else(|| "—".to_owned())
}

fn opt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}"))
        .unwrap_or_else(|| "—".to_owned())
}

impl Overview {
    /// The overview as (label, value) lines, shared by the renderers.
    fn lines(&self) -> Vec<(String, String)> {
        let mut l = vec![
            (
                "Duration".to_owned(),
                format!(
                    "{:.0} s in {} intervals of {:.0} s",
                    self.duration_seconds, self.intervals, self.interval_seconds
                ),
            ),
            (
                "HTTP requests/s".to_owned(),
                format!("{:.1}", self.requests_per_second),
            ),
            (
                "WebSocket messages/s".to_owned(),
                format!(
                    "{:.1} received, {:.1} sent",
                    self.messages_received_per_second, self.messages_sent_per_second
                ),
            ),
            (
                "Statements/s".to_owned(),
                format!(
                    "{:.1}{}",
                    self.statements_per_second,
                    self.statement_role
                        .as_ref()
                        .map(|r| format!(" (counted on the {r} side)"))
                        .unwrap_or_default()
                ),
            ),
            (
                "Statements per request / per received message".to_owned(),
                format!(
                    "{} / {}",
                    opt_ratio(self.statements_per_request),
                    opt_ratio(self.statements_per_received_message)
                ),
            ),
            (
                "Peak concurrent sessions".to_owned(),
                self.peak_concurrent_sessions
                    .map(|p| format!("{p:.0}"))
                    .unwrap_or_else(|| "—".to_owned()),
            ),
            (
                "WebSocket response p50 / p95".to_owned(),
                format!(
                    "{} / {}",
                    opt_seconds(self.websocket_response_p50_seconds),
                    opt_seconds(self.websocket_response_p95_seconds)
                ),
            ),
            (
                "HTTP request p50 / p95".to_owned(),
                format!(
                    "{} / {}",
                    opt_seconds(self.http_request_p50_seconds),
                    opt_seconds(self.http_request_p95_seconds)
                ),
            ),
        ];
        for p in &self.peak_rss {
            l.push((
                format!("Peak RSS {}[{}]", p.process, p.pid),
                human_bytes(p.peak_rss_bytes as f64),
            ));
        }
        let errors: Vec<String> = self
            .errors
            .iter()
            .map(|e| format!("{} {}", e.count, e.class))
            .collect();
        l.push((
            "Errors".to_owned(),
            if errors.is_empty() {
                "none".to_owned()
            } else {
                errors.join(", ")
            },
        ));
        l
    }

    fn mixes(&self) -> [(&'static str, &[Share]); 3] {
        [
            ("Statements by template", &self.fingerprint.templates),
            ("Requests by route", &self.fingerprint.routes),
            (
                "Messages by direction",
                &self.fingerprint.message_directions,
            ),
        ]
    }
}

impl Finding {
    fn cost_line(&self) -> String {
        let mut s = match self.kind {
            FindingKind::UnboundedGrowth => format!(
                "grows {} of its starting memory per second",
                percent(self.cost_seconds)
            ),
            FindingKind::AbnormalCloses | FindingKind::ClosedOnOverloadWithoutCode => {
                format!("{:.2} sessions dropped per second", self.cost_seconds)
            }
            _ => format!("{:.3} s per second of run", self.cost_seconds),
        };
        if let Some(share) = self.share_of_response_time {
            let _ = write!(s, ", {} of response time", percent(share));
        }
        s
    }
}

impl Analysis {
    /// The review in `format`.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Text => self.render_text(),
            Format::Markdown => self.render_markdown(),
            Format::Json => serde_json::to_string_pretty(self).expect("an analysis serialises"),
            Format::Html => self.render_html(),
        }
    }

    fn render_text(&self) -> String {
        let mut out = String::from("Performance review\n\nOverview\n");
        for (k, v) in self.overview.lines() {
            let _ = writeln!(out, "  {k}: {v}");
        }
        for (title, mix) in self.overview.mixes() {
            if mix.is_empty() {
                continue;
            }
            let _ = writeln!(out, "  {title}:");
            for s in mix {
                let _ = writeln!(
                    out,
                    "    {:>6}  {:>8}  {}",
                    percent(s.share),
                    s.count,
                    s.name
                );
            }
        }
        out.push('\n');
        if self.findings.is_empty() {
            out.push_str("No findings.\n");
            return out;
        }
        out.push_str("Findings (most costly first)\n");
        for (n, f) in self.findings.iter().enumerate() {
            let _ = writeln!(out, "\n{}. {} [{}]", n + 1, f.title, f.kind.as_str());
            let _ = writeln!(out, "   Cost: {}", f.cost_line());
            if !f.subjects.is_empty() {
                out.push_str("   Subjects:\n");
                for s in &f.subjects {
                    let _ = writeln!(out, "     {s}");
                }
            }
            out.push_str("   Evidence:\n");
            for e in &f.evidence {
                let _ = writeln!(out, "     - {e}");
            }
            let _ = writeln!(out, "   Fix: {}", f.suggestion);
        }
        out
    }

    fn render_markdown(&self) -> String {
        let mut out = String::from("# Performance review\n\n## Overview\n\n| | |\n|---|---|\n");
        for (k, v) in self.overview.lines() {
            let _ = writeln!(out, "| {k} | {} |", md_cell(&v));
        }
        for (title, mix) in self.overview.mixes() {
            if mix.is_empty() {
                continue;
            }
            let _ = writeln!(out, "\n### {title}\n\n| Share | Count | |\n|---:|---:|---|");
            for s in mix {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} |",
                    percent(s.share),
                    s.count,
                    md_code(&md_cell(&s.name))
                );
            }
        }
        out.push_str("\n## Findings\n");
        if self.findings.is_empty() {
            out.push_str("\nNo findings.\n");
        }
        for (n, f) in self.findings.iter().enumerate() {
            let _ = writeln!(
                out,
                "\n### {}. {} (`{}`)\n",
                n + 1,
                f.title,
                f.kind.as_str()
            );
            let _ = writeln!(out, "**Cost:** {}\n", f.cost_line());
            if !f.subjects.is_empty() {
                out.push_str("**Subjects:**\n\n");
                for s in &f.subjects {
                    let _ = writeln!(out, "- {}", md_code(s));
                }
                out.push('\n');
            }
            out.push_str("**Evidence:**\n\n");
            for e in &f.evidence {
                let _ = writeln!(out, "- {e}");
            }
            let _ = writeln!(out, "\n**Fix:** {}", f.suggestion);
        }
        out
    }
}

/// Inline code that survives backticks in the text.
fn md_code(s: &str) -> String {
    let fence = if s.contains('`') { "`` " } else { "`" };
    let close = if s.contains('`') { " ``" } else { "`" };
    format!("{fence}{s}{close}")
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{
        CounterDelta, FORMAT, GaugeReading, HistogramDelta, Interval, ProcessMemory,
        SCHEMA_VERSION, Targets,
    };

    const INTERVAL: f64 = 5.0;
    const INSERT: &str = "INSERT INTO events (session_id, kind, payload) VALUES ($1, $2, $3)";
    const SELECT_ONE: &str = "SELECT id, kind, payload FROM events WHERE id = $1";
    const SELECT_RECENT: &str = "SELECT id FROM events ORDER BY id DESC LIMIT $1";
    const SELECT_MANY: &str = "SELECT id, kind, payload FROM events WHERE id = ANY($1)";
    const QUEUE_PUSH: &str = "pipeline::fanout::Queue::push";

    fn series(name: &str, labels: &[(&str, &str)]) -> Series {
        Series {
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    /// One interval being built.
    struct Iv(Interval);

    impl Iv {
        fn new(i: usize) -> Self {
            Self(Interval {
                start_seconds: i as f64 * INTERVAL,
                duration_seconds: INTERVAL,
                ..Interval::default()
            })
        }
        fn counter(&mut self, name: &str, labels: &[(&str, &str)], value: u64) -> &mut Self {
            if value > 0 {
                self.0.counters.push(CounterDelta {
                    series: series(name, labels),
                    value,
                });
            }
            self
        }
        /// `count` observations spread evenly over `lo`..`hi`.
        fn hist(
            &mut self,
            name: &str,
            labels: &[(&str, &str)],
            count: usize,
            lo: f64,
            hi: f64,
        ) -> &mut Self {
            if count == 0 {
                return self;
            }
            let mut sketch = Sketch::default();
            for k in 0..count {
                sketch.add(lo + (hi - lo) * k as f64 / count as f64);
            }
            self.0.histograms.push(HistogramDelta {
                series: series(name, labels),
                sketch,
            });
            self
        }
        fn gauge(&mut self, name: &str, last: f64, max: f64) -> &mut Self {
            self.0.gauges.push(GaugeReading {
                series: series(name, &[("process", "pipeline")]),
                last,
                max,
            });
            self
        }
        fn rss(&mut self, pid: u32, process: &str, bytes: u64) -> &mut Self {
            self.0.processes.push(ProcessMemory {
                pid,
                process: process.to_owned(),
                container: String::new(),
                rss_bytes: bytes,
            });
            self
        }
        fn statement(&mut self, query: &str, count: usize, lo: f64, hi: f64) -> &mut Self {
            let op = first_word(query);
            self.hist(
                DB_DURATION,
                &[
                    ("process", "pipeline"),
                    ("role", "client"),
                    ("db_system", "postgresql"),
                    ("db_name", "pipeline"),
                    ("operation", &op),
                    ("query", query),
                    ("status", "ok"),
                ],
                count,
                lo,
                hi,
            )
        }
        /// What the postgres backend sees of the same statements.
        fn server_statement(&mut self, query: &str, count: usize) -> &mut Self {
            let op = first_word(query);
            self.hist(
                DB_DURATION,
                &[
                    ("process", "postgres"),
                    ("role", "server"),
                    ("db_system", "postgresql"),
                    ("operation", &op),
                    ("query", query),
                    ("status", "ok"),
                ],
                count,
                0.0002,
                0.0004,
            )
        }
        fn requests(&mut self, route: &str, count: usize, lo: f64, hi: f64) -> &mut Self {
            self.hist(
                HTTP_DURATION,
                &[
                    ("process", "pipeline"),
                    ("port", "8080"),
                    ("method", "GET"),
                    ("route", route),
                    ("status_code", "200"),
                ],
                count,
                lo,
                hi,
            )
        }
        fn messages(&mut self, received: u64, sent: u64, response: (f64, f64)) -> &mut Self {
            let l = |d| {
                [
                    ("process", "pipeline"),
                    ("direction", d),
                    ("opcode", "text"),
                ]
            };
            self.counter(WS_MESSAGES, &l("received"), received)
                .counter(WS_MESSAGES, &l("sent"), sent)
                // Pings are not data messages: they must not count.
                .counter(
                    WS_MESSAGES,
                    &[
                        ("process", "pipeline"),
                        ("direction", "received"),
                        ("opcode", "ping"),
                    ],
                    received,
                )
                .hist(
                    WS_RESPONSE,
                    &[("process", "pipeline"), ("port", "8080")],
                    sent as usize,
                    response.0,
                    response.1,
                )
        }
        fn db_connections(&mut self, n: u64) -> &mut Self {
            self.counter(
                TCP_OPENED,
                &[
                    ("process", "pipeline"),
                    ("direction", "outbound"),
                    ("port", "5432"),
                ],
                n,
            )
        }
        fn closes(&mut self, code: &str, initiator: &str, n: u64) -> &mut Self {
            self.counter(
                WS_CLOSES,
                &[
                    ("process", "pipeline"),
                    ("code", code),
                    ("initiator", initiator),
                ],
                n,
            )
        }
    }

    fn snapshot(intervals: Vec<Iv>) -> Snapshot {
        let intervals: Vec<Interval> = intervals.into_iter().map(|i| i.0).collect();
        Snapshot {
            format: FORMAT.into(),
            schema_version: SCHEMA_VERSION,
            agent_version: "0.1.0".into(),
            kernel: "6.1.0".into(),
            host: "h".into(),
            targets: Targets::default(),
            started_at_unix_seconds: 1.0,
            duration_seconds: intervals.len() as f64 * INTERVAL,
            interval_seconds: INTERVAL,
            partial: None,
            intervals,
        }
    }

    const N: usize = 12;
    /// Received messages per interval: varying, so correlations can be checked.
    fn messages_in(i: usize) -> u64 {
        400 + 60 * (i as u64 % 4)
    }
    /// GET /recent requests per interval.
    fn recent_in(i: usize) -> usize {
        8 + 3 * (i % 5)
    }

    /// The slow demo: one INSERT per received message, 20 SELECT by id per
    /// GET /recent, a new database connection per request, RSS growing
    /// 10 MiB per interval into the fan-out queue.
    fn slow_demo() -> Snapshot {
        let ivs = (0..N)
            .map(|i| {
                let mut iv = Iv::new(i);
                let m = messages_in(i);
                let r = recent_in(i);
                iv.messages(m, m, (0.002, 0.004))
                    .statement(INSERT, m as usize, 0.0008, 0.0012)
                    .server_statement(INSERT, m as usize)
                    .requests("/recent", r, 0.02, 0.04)
                    .statement(SELECT_RECENT, r, 0.0005, 0.0007)
                    .statement(SELECT_ONE, 20 * r, 0.0004, 0.0006)
                    .server_statement(SELECT_ONE, 20 * r)
                    .db_connections(r as u64 + m)
                    .rss(42, "pipeline", (60 + 10 * i as u64) << 20)
                    .counter(
                        MEMORY_GROWTH,
                        &[("process", "pipeline"), ("site", QUEUE_PUSH)],
                        9 << 20,
                    )
                    .counter(
                        MEMORY_GROWTH,
                        &[
                            ("process", "pipeline"),
                            ("site", "serde_json::de::from_slice"),
                        ],
                        1 << 20,
                    )
                    .gauge(WS_SESSIONS_ACTIVE, 50.0, 52.0)
                    .closes("1000", "client", 3);
                iv
            })
            .collect();
        snapshot(ivs)
    }

    /// The fixed configuration: inserts batched ~ one per 100 messages, one
    /// SELECT with `= ANY($1)` per request, a pool opened once, flat RSS.
    fn fixed() -> Snapshot {
        let ivs = (0..N)
            .map(|i| {
                let mut iv = Iv::new(i);
                let m = messages_in(i);
                let r = recent_in(i);
                iv.messages(m, m, (0.0005, 0.001))
                    .statement(INSERT, (m / 100) as usize, 0.002, 0.004)
                    .requests("/recent", r, 0.002, 0.004)
                    .statement(SELECT_RECENT, r, 0.0005, 0.0007)
                    .statement(SELECT_MANY, r, 0.0008, 0.0012)
                    .db_connections(if i == 0 { 10 } else { 0 })
                    .rss(42, "pipeline", (70 << 20) + ((i as u64 % 3) << 18))
                    .gauge(WS_SESSIONS_ACTIVE, 50.0, 52.0)
                    .closes("1000", "client", 3);
                iv
            })
            .collect();
        snapshot(ivs)
    }

    /// The slow demo with one more template, holding a `<`, for the page.
    pub(super) fn slow_demo_for_html() -> Snapshot {
        let mut s = slow_demo();
        for (i, iv) in s.intervals.iter_mut().enumerate() {
            let mut add = Iv(std::mem::take(iv));
            add.statement(
                "SELECT id FROM events WHERE kind < $2",
                10 + i,
                0.001,
                0.002,
            );
            *iv = add.0;
        }
        s
    }

    fn find(a: &Analysis, kind: FindingKind) -> Vec<&Finding> {
        a.findings.iter().filter(|f| f.kind == kind).collect()
    }

    /// The number right after `prefix` in `text`.
    fn number_after(text: &str, prefix: &str) -> f64 {
        let at = text
            .find(prefix)
            .unwrap_or_else(|| panic!("{prefix:?} in {text:?}"));
        text[at + prefix.len()..]
            .trim_start()
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a number after {prefix:?} in {text:?}"))
    }

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance * b.abs().max(1e-12)
    }

    fn total_messages() -> f64 {
        (0..N).map(|i| messages_in(i) as f64).sum()
    }

    fn total_recent() -> f64 {
        (0..N).map(|i| recent_in(i) as f64).sum()
    }

    #[test]
    fn the_slow_demo_has_one_insert_per_message() {
        let a = analyse(&slow_demo());
        let f = find(&a, FindingKind::PerEventRoundTrips);
        assert_eq!(f.len(), 1, "{:#?}", a.findings);
        let f = f[0];
        assert_eq!(f.subjects, vec![INSERT.to_owned()]);
        // The server side sees the same INSERTs: counted once, so 1.00, not 2.00.
        assert_eq!(
            number_after(&f.evidence[0], "intervals:"),
            1.0,
            "{:?}",
            f.evidence
        );
        // ~1 ms of INSERT in each ~3 ms response.
        let share = f.share_of_response_time.expect("a share");
        assert!((0.30..0.37).contains(&share), "{share}");
        let insert_time = total_messages() * 0.001;
        assert!(
            close(f.cost_seconds, insert_time / 60.0, 0.02),
            "{}",
            f.cost_seconds
        );
        assert!(f.suggestion.contains("COPY"), "{}", f.suggestion);
    }

    #[test]
    fn the_slow_demo_has_an_n_plus_one_on_the_recent_route() {
        let a = analyse(&slow_demo());
        let f = find(&a, FindingKind::NPlusOne);
        assert_eq!(f.len(), 1, "{:#?}", a.findings);
        let f = f[0];
        assert_eq!(
            f.subjects,
            vec![SELECT_ONE.to_owned(), "GET /recent".to_owned()]
        );
        assert_eq!(
            number_after(&f.evidence[0], "intervals:"),
            20.0,
            "{:?}",
            f.evidence
        );
        assert!(
            f.evidence[1].contains("correlation 1.00"),
            "{:?}",
            f.evidence
        );
        // 20 × 0.5 ms of each ~30 ms request.
        let share = f.share_of_response_time.expect("a share");
        assert!((0.30..0.37).contains(&share), "{share}");
        assert!(f.suggestion.contains("ANY($1)"), "{}", f.suggestion);
    }

    #[test]
    fn the_slow_demo_grows_in_the_fanout_queue() {
        let a = analyse(&slow_demo());
        let f = find(&a, FindingKind::UnboundedGrowth);
        assert_eq!(f.len(), 1, "{:#?}", a.findings);
        let f = f[0];
        assert_eq!(f.subjects[0], QUEUE_PUSH);
        assert_eq!(f.subjects.last().map(String::as_str), Some("pipeline[42]"));
        // 10 MiB per 5 s interval.
        assert!(
            close(number_after(&f.evidence[1], "a steady"), 2.0, 0.01),
            "{:?}",
            f.evidence
        );
        assert!(f.evidence[0].contains("+110.0 MiB"), "{:?}", f.evidence);
        assert!(f.suggestion.contains(QUEUE_PUSH), "{}", f.suggestion);
        // 2 MiB/s from 60 MiB.
        assert!(
            close(f.cost_seconds, 2.0 / 60.0, 0.01),
            "{}",
            f.cost_seconds
        );
    }

    #[test]
    fn the_slow_demo_opens_a_connection_per_request() {
        let a = analyse(&slow_demo());
        let f = find(&a, FindingKind::DatabaseConnectionChurn);
        assert_eq!(f.len(), 1, "{:#?}", a.findings);
        assert_eq!(
            number_after(&f[0].evidence[1], ""),
            1.0,
            "{:?}",
            f[0].evidence
        );
        assert_eq!(f[0].subjects, vec!["pipeline".to_owned()]);
        let opened = total_messages() + total_recent();
        assert!(close(
            f[0].cost_seconds,
            opened / 60.0 * NOMINAL_BACKEND_START_SECONDS,
            1e-9
        ));
    }

    #[test]
    fn findings_are_ranked_by_cost() {
        let a = analyse(&slow_demo());
        assert!(a.findings.len() >= 4, "{:#?}", a.findings);
        for w in a.findings.windows(2) {
            assert!(w[0].cost_seconds >= w[1].cost_seconds, "{:#?}", a.findings);
        }
        // 5.9 s of INSERT beats 1.6 s of SELECT.
        let rank = |k| a.findings.iter().position(|f| f.kind == k).unwrap();
        assert!(rank(FindingKind::PerEventRoundTrips) < rank(FindingKind::NPlusOne));
    }

    #[test]
    fn the_fixed_configuration_has_none_of_them() {
        let a = analyse(&fixed());
        for kind in [
            FindingKind::PerEventRoundTrips,
            FindingKind::NPlusOne,
            FindingKind::UnboundedGrowth,
            FindingKind::DatabaseConnectionChurn,
            FindingKind::SlowTemplate,
        ] {
            assert!(find(&a, kind).is_empty(), "{kind:?} in {:#?}", a.findings);
        }
        // What the rules saw, so the absence is not for want of data.
        let o = &a.overview;
        let per_message = o
            .fingerprint
            .templates
            .iter()
            .find(|t| t.name == INSERT)
            .unwrap();
        assert!(close(
            per_message.count as f64 / total_messages(),
            0.01,
            0.1
        ));
        let batches: f64 = (0..N).map(|i| (messages_in(i) / 100) as f64).sum();
        assert!(close(
            o.statements_per_request.unwrap(),
            2.0 + batches / total_recent(),
            1e-9
        ));
    }

    #[test]
    fn the_overview_counts_statements_on_the_client_side_only() {
        let a = analyse(&slow_demo());
        let o = &a.overview;
        let (m, r) = (total_messages(), total_recent());
        let statements = m + r + 20.0 * r;
        assert_eq!(o.statement_role.as_deref(), Some("client"));
        assert_eq!(o.intervals, N);
        assert!(close(o.statements_per_second, statements / 60.0, 1e-9));
        assert!(close(o.requests_per_second, r / 60.0, 1e-9));
        assert!(
            close(o.messages_received_per_second, m / 60.0, 1e-9),
            "pings counted"
        );
        assert!(close(
            o.statements_per_received_message.unwrap(),
            statements / m,
            1e-9
        ));
        assert_eq!(o.peak_concurrent_sessions, Some(52.0));
        assert_eq!(o.peak_rss[0].peak_rss_bytes, 170 << 20);
        let p95 = o.websocket_response_p95_seconds.unwrap();
        assert!((0.0037..0.0041).contains(&p95), "{p95}");
        let t = &o.fingerprint.templates[0];
        assert_eq!(t.name, INSERT);
        assert!(close(t.share, m / statements, 1e-9));
        assert_eq!(o.fingerprint.routes[0].name, "GET /recent");
        assert_eq!(o.timeline.len(), N);
        assert!(close(
            o.timeline[3].statements_per_second,
            (messages_in(3) as f64 + 21.0 * recent_in(3) as f64) / 5.0,
            1e-9
        ));
    }

    #[test]
    fn without_a_client_side_the_server_side_is_counted() {
        let ivs = (0..N)
            .map(|i| {
                let mut iv = Iv::new(i);
                iv.messages(messages_in(i), messages_in(i), (0.002, 0.004))
                    .server_statement(INSERT, messages_in(i) as usize);
                iv
            })
            .collect();
        let a = analyse(&snapshot(ivs));
        assert_eq!(a.overview.statement_role.as_deref(), Some("server"));
        assert!(close(
            a.overview.statements_per_received_message.unwrap(),
            1.0,
            1e-9
        ));
        assert_eq!(find(&a, FindingKind::PerEventRoundTrips).len(), 1);
    }

    #[test]
    fn a_template_that_dominates_statement_time_is_slow() {
        let slow = "SELECT count(*) FROM events WHERE kind = $1";
        let ivs = (0..N)
            .map(|i| {
                let mut iv = Iv::new(i);
                iv.requests("/stats", 50, 0.05, 0.07)
                    .statement(slow, 50, 0.02, 0.06)
                    .statement(SELECT_RECENT, 50, 0.0005, 0.0007);
                iv
            })
            .collect();
        let a = analyse(&snapshot(ivs));
        let f = find(&a, FindingKind::SlowTemplate);
        assert_eq!(f.len(), 1, "{:#?}", a.findings);
        assert_eq!(f[0].subjects, vec![slow.to_owned()]);
        // Uniform over 20–60 ms: p95 near 58 ms.
        let p95 = number_after(&f[0].evidence[0], "p95");
        assert!((56.0..60.5).contains(&p95), "{:?}", f[0].evidence);
        // 600 × 40 ms over 60 s.
        assert!(close(f[0].cost_seconds, 0.4, 0.02), "{}", f[0].cost_seconds);
        assert!(find(&a, FindingKind::NPlusOne).is_empty());
    }

    #[test]
    fn an_n_plus_one_needs_a_stable_ratio() {
        // 20 executions per request on average, but not tied to the
        // requests: alternating 5 and 35 per request.
        let ivs = (0..N)
            .map(|i| {
                let mut iv = Iv::new(i);
                let r = recent_in(i);
                let per = if i % 2 == 0 { 5 } else { 35 };
                iv.requests("/recent", r, 0.02, 0.04).statement(
                    SELECT_ONE,
                    per * r,
                    0.0004,
                    0.0006,
                );
                iv
            })
            .collect();
        let a = analyse(&snapshot(ivs));
        assert!(
            find(&a, FindingKind::NPlusOne).is_empty(),
            "{:#?}",
            a.findings
        );
    }

    #[test]
    fn an_insert_at_the_message_rate_that_does_not_follow_it_is_not_per_message() {
        let steady = (total_messages() / N as f64) as usize;
        let ivs = (0..N)
            .map(|i| {
                let mut iv = Iv::new(i);
                iv.messages(messages_in(i), messages_in(i), (0.002, 0.004))
                    .statement(INSERT, steady, 0.0008, 0.0012);
                iv
            })
            .collect();
        let s = snapshot(ivs);
        let a = analyse(&s);
        // The ratio alone would qualify: 490 × 12 for 5880 messages.
        let per_message = (steady * N) as f64 / total_messages();
        assert!(close(per_message, 1.0, 1e-9), "{per_message}");
        assert!(
            find(&a, FindingKind::PerEventRoundTrips).is_empty(),
            "{:#?}",
            a.findings
        );
    }

    #[test]
    fn an_n_plus_one_can_follow_messages() {
        let ivs = (0..N)
            .map(|i| {
                let mut iv = Iv::new(i);
                let m = messages_in(i);
                iv.messages(m, m, (0.004, 0.008)).statement(
                    SELECT_ONE,
                    10 * m as usize,
                    0.0002,
                    0.0004,
                );
                iv
            })
            .collect();
        let a = analyse(&snapshot(ivs));
        let f = find(&a, FindingKind::NPlusOne);
        assert_eq!(f.len(), 1, "{:#?}", a.findings);
        assert_eq!(f[0].subjects, vec![SELECT_ONE.to_owned()]);
        assert_eq!(
            number_after(&f[0].evidence[0], "intervals:"),
            10.0,
            "{:?}",
            f[0].evidence
        );
        // 10 × 0.3 ms of each 6 ms response.
        let share = f[0].share_of_response_time.unwrap();
        assert!(close(share, 0.5, 0.03), "{share}");
    }

    #[test]
    fn an_empty_run_has_no_findings_and_an_empty_overview() {
        let a = analyse(&snapshot(vec![]));
        assert!(a.findings.is_empty(), "{:#?}", a.findings);
        assert_eq!(a.overview.intervals, 0);
        assert_eq!(a.overview.statements_per_request, None);
        assert!(a.render(Format::Text).contains("No findings."));
    }

    /// Sessions: 100 concurrent, 400 in intervals 6 and 7, where
    /// `overload_1006` closes without a close frame happen (1 elsewhere).
    fn closes(overload_1006: u64, elsewhere_1006: u64) -> Snapshot {
        let ivs = (0..N)
            .map(|i| {
                let mut iv = Iv::new(i);
                let loaded = i == 6 || i == 7;
                iv.messages(
                    messages_in(i),
                    messages_in(i),
                    (0.002, if loaded { 0.05 } else { 0.004 }),
                )
                .gauge(
                    WS_SESSIONS_ACTIVE,
                    100.0,
                    if loaded { 400.0 } else { 100.0 },
                )
                .counter(WS_SESSIONS_TOTAL, &[("process", "pipeline")], 10)
                .closes("1000", "client", 3)
                .closes(
                    "1006",
                    "none",
                    if loaded {
                        overload_1006
                    } else {
                        elsewhere_1006
                    },
                )
                .closes("1011", "server", u64::from(i == 3));
                iv
            })
            .collect();
        snapshot(ivs)
    }

    #[test]
    fn abnormal_closes_are_counted_by_code() {
        let a = analyse(&closes(20, 1));
        let f = find(&a, FindingKind::AbnormalCloses);
        assert_eq!(f.len(), 1, "{:#?}", a.findings);
        let f = f[0];
        assert_eq!(f.subjects, vec!["1006".to_owned(), "1011".to_owned()]);
        assert_eq!(number_after(&f.evidence[0], ""), 50.0, "{:?}", f.evidence);
        // 50 of 50 + 1 + 36 closes.
        assert!(f.evidence[0].contains("57.5 %"), "{:?}", f.evidence);
        assert_eq!(number_after(&f.evidence[1], ""), 1.0, "{:?}", f.evidence);
        assert!(close(f.cost_seconds, 51.0 / 60.0, 1e-9));
        let errors = &a.overview.errors;
        assert!(errors.contains(&ErrorCount {
            class: "websocket_close:1006".into(),
            count: 50
        }));
        assert!(errors.contains(&ErrorCount {
            class: "websocket_close:1011".into(),
            count: 1
        }));
    }

    #[test]
    fn closes_without_a_code_at_peak_load_are_overload() {
        let a = analyse(&closes(20, 1));
        let f = find(&a, FindingKind::ClosedOnOverloadWithoutCode);
        assert_eq!(f.len(), 1, "{:#?}", a.findings);
        assert!(
            f[0].evidence[0].starts_with("40 of 50"),
            "{:?}",
            f[0].evidence
        );
        assert!(f[0].evidence[1].contains("400"), "{:?}", f[0].evidence);
        assert!(f[0].suggestion.contains("1013"));
    }

    #[test]
    fn closes_without_a_code_spread_over_the_run_are_not_overload() {
        let a = analyse(&closes(5, 5));
        assert_eq!(find(&a, FindingKind::AbnormalCloses).len(), 1);
        assert!(
            find(&a, FindingKind::ClosedOnOverloadWithoutCode).is_empty(),
            "{:#?}",
            a.findings
        );
    }

    #[test]
    fn every_format_carries_the_findings_in_rank_order() {
        let a = analyse(&slow_demo());
        let text = a.render(Format::Text);
        let md = a.render(Format::Markdown);
        for (out, numbered) in [(&text, "\n1. "), (&md, "### 1. ")] {
            assert!(out.contains(numbered), "{out}");
            let positions: Vec<usize> = a
                .findings
                .iter()
                .map(|f| {
                    out.find(&f.title)
                        .unwrap_or_else(|| panic!("{} in {out}", f.title))
                })
                .collect();
            assert!(positions.windows(2).all(|w| w[0] < w[1]), "{out}");
            assert!(out.contains(INSERT) && out.contains(QUEUE_PUSH), "{out}");
        }
        let json: serde_json::Value = serde_json::from_str(&a.render(Format::Json)).unwrap();
        let findings = json["findings"].as_array().unwrap();
        assert_eq!(findings.len(), a.findings.len());
        assert_eq!(findings[0]["kind"], a.findings[0].kind.as_str());
        assert_eq!(json["overview"]["intervals"], N);
        assert_eq!("md".parse::<Format>(), Ok(Format::Markdown));
        assert!("pdf".parse::<Format>().is_err());
    }
}
