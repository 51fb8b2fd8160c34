//! The queries collector: PostgreSQL statements, their latency and their
//! errors, from the wire protocol in the targets' socket payloads, whatever
//! the client's language or driver, with no change to it.
//!
//! - `wire`: framing of both directions, through truncated captures.
//! - `conn`: pairing requests with replies (simple, extended, pipelines, COPY).
//! - `sql`: the template a statement is reported under.

pub mod conn;
pub mod sql;
pub mod wire;

#[cfg(test)]
pub(crate) mod fixture_tests;
#[cfg(test)]
mod sql_tests;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use conn::{Completed, PgConnection, Role};
use serde::Serialize;
use wire::{Segment, Side};

use crate::{
    collector::Section,
    distribution::{Distribution, Quantiles},
    streams::{Analyser, Chunk, Claim, Flow},
    telemetry::{Identities, Identity, LabelCap},
};

/// Distinct query templates per process (the brief's default).
pub const TEMPLATE_CAP: usize = 500;
const DB_CAP: usize = 50;
/// Raw statements whose template is remembered (tokenising is the costly
/// part; the same statement text repeats).
const TEMPLATE_CACHE: usize = 8192;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct QueryKey {
    #[serde(flatten)]
    pub identity: Identity,
    pub role: &'static str,
    pub db_name: String,
    pub operation: &'static str,
    pub query: String,
}

#[derive(Debug, Default, Serialize)]
pub struct TemplateStats {
    pub count: u64,
    pub errors: BTreeMap<String, u64>,
    #[serde(skip)]
    durations: Distribution,
    pub duration_seconds: Option<Quantiles>,
}

/// Metric handles of one query label set, registered on first use.
struct Series {
    key: QueryKey,
    /// By status, `ok` then `error`, each registered on first use.
    by_status: [StatusSeries; 2],
    errors: HashMap<String, metrics::Counter>,
}

/// The histograms of one series and status.
#[derive(Default)]
struct StatusSeries {
    /// `pipelens_db_query_duration_seconds`.
    duration: Option<metrics::Histogram>,
    /// `pipelens_db_query_service_seconds`.
    service: Option<metrics::Histogram>,
}

/// Shared view for the summary writer: one row per series, in the order
/// series were first seen (an index, so that recording takes no lookup).
pub type QueriesSummary = Arc<Mutex<Vec<(QueryKey, TemplateStats)>>>;

/// Statements remembered per connection by the identity of their text, so
/// that executing a prepared statement again costs no hashing of strings.
const MEMO_PER_CONN: usize = 1024;

struct ConnEntry {
    conn: PgConnection,
    identity: Identity,
    /// The `db_name` label, fixed once the StartupMessage is known.
    db: Option<String>,
    /// SQL text (by address, kept alive here) → series, per status.
    memo: HashMap<usize, (Arc<str>, usize)>,
    /// `skipped_after_error` already exported.
    skipped_reported: u64,
}

impl ConnEntry {
    fn count_unanswered(&self, reason: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        let mut labels = self.identity.labels();
        labels.push(metrics::Label::new("role", self.conn.role.label()));
        labels.push(metrics::Label::new("reason", reason));
        metrics::counter!("pipelens_db_unanswered_statements_total", labels).increment(n);
    }
}

pub struct QueriesAnalyser {
    conns: HashMap<u64, ConnEntry>,
    templates: HashMap<Arc<str>, (String, &'static str)>,
    /// Templates per process, capped.
    per_process: HashMap<String, LabelCap>,
    ids: Identities,
    db_cap: LabelCap,
    series: Vec<Series>,
    series_index: HashMap<QueryKey, usize>,
    stats: QueriesSummary,
    parse_errors_seen: HashMap<u64, u64>,
    /// Every completed statement with its socket, in order, for tests that
    /// compare runs statement by statement.
    #[cfg(test)]
    pub(crate) log: Arc<Mutex<Vec<(u64, Completed)>>>,
}

impl QueriesAnalyser {
    pub fn new() -> (Self, QueriesSummary) {
        let stats: QueriesSummary = Arc::default();
        // The give-ups of every process together, from the first scrape.
        metrics::counter!("pipelens_parser_give_ups_total", "collector" => "queries").increment(0);
        (
            Self {
                conns: HashMap::new(),
                templates: HashMap::new(),
                per_process: HashMap::new(),
                ids: Identities::new("queries"),
                db_cap: LabelCap::new(DB_CAP, "queries", "db_name"),
                series: Vec::new(),
                series_index: HashMap::new(),
                stats: stats.clone(),
                parse_errors_seen: HashMap::new(),
                #[cfg(test)]
                log: Arc::default(),
            },
            stats,
        )
    }

    fn template(&mut self, sql: &Arc<str>) -> (String, &'static str) {
        if let Some(t) = self.templates.get(sql) {
            return t.clone();
        }
        if self.templates.len() >= TEMPLATE_CACHE {
            self.templates.clear();
        }
        let t = sql::template(sql);
        let op = sql::operation(&t);
        self.templates.insert(sql.clone(), (t.clone(), op));
        (t, op)
    }

    /// The series of `sql` for this connection's labels.
    fn series_of(&mut self, who: &Identity, role: Role, db: &str, sql: &Arc<str>) -> usize {
        let (template, operation) = self.template(sql);
        let query = self
            .per_process
            .entry(who.process.clone())
            .or_insert_with(|| LabelCap::new(TEMPLATE_CAP, "queries", "query"))
            .admit(&template);
        let key = QueryKey {
            identity: who.clone(),
            role: role.label(),
            db_name: db.to_owned(),
            operation,
            query,
        };
        if let Some(i) = self.series_index.get(&key) {
            return *i;
        }
        let i = self.series.len();
        self.series_index.insert(key.clone(), i);
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((key.clone(), TemplateStats::default()));
        self.series.push(Series {
            key,
            by_status: Default::default(),
            errors: HashMap::new(),
        });
        i
    }

    fn record(&mut self, i: usize, c: Completed) {
        let secs = c.end_ns.saturating_sub(c.start_ns) as f64 / 1e9;
        let service = c.end_ns.saturating_sub(c.start_ns + c.queued_ns) as f64 / 1e9;
        let series = &mut self.series[i];
        let key = &series.key;
        let labels = |status: &str| {
            key.identity.labels_with([
                metrics::Label::new("role", key.role),
                metrics::Label::new("db_system", "postgresql"),
                metrics::Label::new("db_name", key.db_name.clone()),
                metrics::Label::new("operation", key.operation),
                metrics::Label::new("query", key.query.clone()),
                metrics::Label::new("status", status.to_owned()),
            ])
        };
        let (slot, status) = match c.error {
            None => (0, "ok"),
            Some(_) => (1, "error"),
        };
        let by_status = &mut series.by_status[slot];
        by_status
            .duration
            .get_or_insert_with(|| {
                metrics::histogram!("pipelens_db_query_duration_seconds", labels(status))
            })
            .record(secs);
        by_status
            .service
            .get_or_insert_with(|| {
                metrics::histogram!("pipelens_db_query_service_seconds", labels(status))
            })
            .record(service);
        if let Some(state) = &c.error {
            // The label set is built once per SQLSTATE, not per error.
            let counter = match series.errors.get(state) {
                Some(counter) => counter,
                None => {
                    let mut with_state = labels(status);
                    with_state.pop();
                    with_state.push(metrics::Label::new("sqlstate", state.clone()));
                    series
                        .errors
                        .entry(state.clone())
                        .or_insert(metrics::counter!(
                            "pipelens_db_query_errors_total",
                            with_state
                        ))
                }
            };
            counter.increment(1);
        }
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut stats[i].1;
        s.count += 1;
        if let Some(state) = c.error {
            *s.errors.entry(state).or_default() += 1;
        }
        s.durations.add(secs);
    }
}

/// Summary JSON of the queries collector.
pub fn summary(stats: &QueriesSummary) -> serde_json::Value {
    let stats = stats.lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<&(QueryKey, TemplateStats)> = stats.iter().collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let rows: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|(key, s)| {
            serde_json::json!({
                "labels": key,
                "count": s.count,
                "errors": s.errors,
                "duration_seconds": s.durations.quantiles(),
            })
        })
        .collect();
    serde_json::json!({ "templates": rows })
}

/// What the first captured bytes of a socket say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recognised {
    /// The connection's first message: a StartupMessage v3, SSLRequest,
    /// GSSENCRequest or CancelRequest.
    Startup,
    /// Well-formed messages of a session already under way.
    MidStream,
    No,
    /// Too few bytes to tell.
    TooShort,
}

/// Recognises PostgreSQL in `data`, written by `side`: an untagged
/// startup-phase message, or — attaching mid-session — a run of messages
/// that frame exactly to the end of the data and begin with a type byte
/// only that side sends (so HTTP, TLS or WebSocket bytes never pass).
pub fn recognise(data: &[u8], side: Side) -> Recognised {
    if data.len() < 5 {
        return Recognised::TooShort;
    }
    if side == Side::Frontend {
        // The untagged startup-phase messages: a length, then a code. The
        // opening may hold only their first bytes (a driver that writes
        // the length and code before the parameters, or any split of the
        // write): a plausible start asks for more rather than ruling out.
        let len = u32::from_be_bytes(data[..4].try_into().expect("4"));
        let plausible = (8..=10_000).contains(&len);
        if data.len() < 8 {
            if plausible {
                return Recognised::TooShort;
            }
        } else {
            let code = u32::from_be_bytes(data[4..8].try_into().expect("4"));
            let startup = matches!(
                code,
                wire::PROTOCOL_V3 | wire::SSL_REQUEST | wire::GSSENC_REQUEST | wire::CANCEL_REQUEST
            );
            if startup && plausible {
                return if len as usize <= data.len() {
                    Recognised::Startup
                } else {
                    Recognised::TooShort
                };
            }
        }
    }
    let distinctive = match side {
        Side::Frontend => matches!(data[0], b'Q' | b'P' | b'B' | b'E' | b'X'),
        Side::Backend => matches!(
            data[0],
            b'Z' | b'T' | b'R' | b'1' | b'2' | b'3' | b'n' | b't' | b'K'
        ),
    };
    if !distinctive {
        return Recognised::No;
    }
    let mut at = 0usize;
    let mut count = 0;
    while at + 5 <= data.len() {
        let tag = data[at];
        let ok = match side {
            Side::Frontend => wire::frontend_tag(tag),
            Side::Backend => wire::backend_tag(tag),
        };
        let len = u32::from_be_bytes(data[at + 1..at + 5].try_into().expect("4")) as usize;
        if !ok || !(4..=1 << 30).contains(&len) || !length_fits(side, tag, len) {
            return Recognised::No;
        }
        // A simple query's text ends with its NUL.
        if tag == b'Q' && at + 1 + len <= data.len() && data[at + len] != 0 {
            return Recognised::No;
        }
        at += 1 + len;
        count += 1;
    }
    if count > 0 && at >= data.len() {
        Recognised::MidStream
    } else {
        Recognised::No
    }
}

/// Messages whose length the protocol fixes: a Terminate is 4 bytes, so
/// an HTTP request line such as `X / HTTP/1.1` (`X`, then a "length" made
/// of ` / H`) is not one.
fn length_fits(side: Side, tag: u8, len: usize) -> bool {
    match (side, tag) {
        // Terminate, Sync, Flush.
        (Side::Frontend, b'X' | b'S' | b'H') => len == 4,
        // ReadyForQuery.
        (Side::Backend, b'Z') => len == 5,
        // ParseComplete, BindComplete, CloseComplete, NoData.
        (Side::Backend, b'1' | b'2' | b'3' | b'n') => len == 4,
        // BackendKeyData: a 4-byte pid and a key of 4 (protocol 3.0) to
        // 256 bytes (3.2).
        (Side::Backend, b'K') => (12..=264).contains(&len),
        // Authentication: a 4-byte code, then its data.
        (Side::Backend, b'R') => len >= 8,
        _ => true,
    }
}

/// The segments of one captured syscall: the prefix, the unseen middle,
/// and the tail when the kernel kept one.
fn segments<'a>(c: &Chunk<'a>) -> Vec<Segment<'a>> {
    let seen = c.data.len() as u64;
    let mut segs = vec![Segment::Bytes(c.data)];
    if c.len <= seen {
        return segs;
    }
    // A record whose tail is longer than the whole call is malformed
    // (found by the postgres fuzz target): read as if the tail began at 0.
    let tail_start = c.len.saturating_sub(c.tail.len() as u64);
    if c.tail.is_empty() {
        segs.push(Segment::Gap(c.len - seen));
    } else if tail_start >= seen {
        segs.push(Segment::Gap(tail_start - seen));
        segs.push(Segment::Bytes(c.tail));
    } else {
        // The tail overlaps the prefix: only its new part counts.
        let skip = (seen - tail_start) as usize;
        segs.push(Segment::Bytes(&c.tail[skip.min(c.tail.len())..]));
    }
    segs
}

fn side_of(role: Role, flow: Flow) -> Side {
    match (role, flow) {
        (Role::Client, Flow::Sent) | (Role::Server, Flow::Received) => Side::Frontend,
        _ => Side::Backend,
    }
}

impl Analyser for QueriesAnalyser {
    fn name(&self) -> &'static str {
        "postgresql"
    }

    fn summary(&self) -> Section {
        ("queries", summary(&self.stats))
    }

    fn offer(&mut self, c: &Chunk<'_>) -> Claim {
        let (as_frontend, as_backend) = (
            recognise(c.data, Side::Frontend),
            recognise(c.data, Side::Backend),
        );
        let found = match (c.flow, as_frontend, as_backend) {
            (Flow::Sent, Recognised::Startup, _) => Some((Role::Client, true)),
            (Flow::Received, Recognised::Startup, _) => Some((Role::Server, true)),
            (Flow::Sent, Recognised::MidStream, _) => Some((Role::Client, false)),
            (Flow::Received, Recognised::MidStream, _) => Some((Role::Server, false)),
            (Flow::Received, _, Recognised::MidStream) => Some((Role::Client, false)),
            (Flow::Sent, _, Recognised::MidStream) => Some((Role::Server, false)),
            (_, Recognised::TooShort, _) => return Claim::Unsure,
            _ => None,
        };
        let Some((role, from_start)) = found else {
            return Claim::NotMine;
        };
        let identity = self.ids.of(c.tgid, c.comm);
        self.conns.insert(
            c.sk,
            ConnEntry {
                conn: PgConnection::new(role, from_start),
                identity,
                db: None,
                memo: HashMap::new(),
                skipped_reported: 0,
            },
        );
        Claim::Mine
    }

    fn feed(&mut self, c: &Chunk<'_>) {
        let Some(entry) = self.conns.get_mut(&c.sk) else {
            return;
        };
        let side = side_of(entry.conn.role, c.flow);
        let ts = match c.flow {
            // A write's first byte leaves at the syscall's entry; a read's
            // bytes are in hand at its exit.
            Flow::Sent => c.ts_enter,
            Flow::Received => c.ts_exit,
        };
        let was_encrypted = entry.conn.encrypted;
        let mut done = Vec::new();
        entry.conn.feed(side, &segments(c), ts, &mut done);
        let errors = entry.conn.parse_errors();
        let seen = self.parse_errors_seen.entry(c.sk).or_default();
        if errors > *seen {
            metrics::counter!("pipelens_db_parse_errors_total", entry.identity.labels())
                .increment(errors - *seen);
            metrics::counter!("pipelens_parser_give_ups_total", "collector" => "queries")
                .increment(errors - *seen);
            *seen = errors;
        }
        let skipped = entry.conn.skipped_after_error;
        if skipped > entry.skipped_reported {
            entry.count_unanswered("skipped_after_error", skipped - entry.skipped_reported);
            entry.skipped_reported = skipped;
        }
        if entry.conn.encrypted && !was_encrypted {
            let mut labels = entry.identity.labels();
            labels.push(metrics::Label::new("role", entry.conn.role.label()));
            metrics::counter!("pipelens_db_encrypted_connections_total", labels).increment(1);
        }
        if done.is_empty() {
            return;
        }
        if entry.db.is_none() && entry.conn.database.is_some() {
            let db = entry.conn.database.clone().unwrap_or_default();
            entry.db = Some(self.db_cap.admit(&db));
        }
        let role = entry.conn.role;
        let who = entry.identity.clone();
        let db = entry.db.clone().unwrap_or_else(|| "unknown".to_owned());
        // The memo is taken out while series are resolved, so that the
        // connection is looked up once per chunk, not once per statement.
        let mut memo = std::mem::take(&mut entry.memo);
        #[cfg(test)]
        self.log
            .lock()
            .expect("log")
            .extend(done.iter().map(|d| (c.sk, d.clone())));
        for d in done {
            let ptr = Arc::as_ptr(&d.sql) as *const u8 as usize;
            let known = memo
                .get(&ptr)
                .filter(|(sql, _)| Arc::ptr_eq(sql, &d.sql))
                .map(|(_, i)| *i);
            let i = match known {
                Some(i) => i,
                None => {
                    let i = self.series_of(&who, role, &db, &d.sql);
                    if memo.len() >= MEMO_PER_CONN {
                        memo.clear();
                    }
                    memo.insert(ptr, (d.sql.clone(), i));
                    i
                }
            };
            self.record(i, d);
        }
        if let Some(entry) = self.conns.get_mut(&c.sk) {
            entry.memo = memo;
        }
    }

    fn closed(&mut self, sk: u64, _ts: u64) {
        self.parse_errors_seen.remove(&sk);
        let Some(entry) = self.conns.remove(&sk) else {
            return;
        };
        // A server that died, or a client that gave up, mid-request: the
        // statements in flight have no outcome, so they are counted here
        // instead of in the duration histogram.
        entry.count_unanswered("closed", entry.conn.unanswered());
        entry.count_unanswered("queue_full", entry.conn.dropped_requests);
    }

    fn forget_all(&mut self) {
        self.conns.clear();
        self.parse_errors_seen.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the postgres fuzz target: a record whose tail is longer
    /// than the call's length made the segment arithmetic overflow.
    #[test]
    fn a_tail_longer_than_the_call_is_no_panic() {
        let tail = [b'x'; 16];
        let c = Chunk {
            sk: 1,
            tgid: 1,
            comm: b"fuzz",
            flow: Flow::Received,
            ts_enter: 0,
            ts_exit: 0,
            len: 10,
            data: b"abcd",
            tail: &tail,
            lport: 0,
            rport: 0,
        };
        let segs = segments(&c);
        assert!(matches!(segs[0], Segment::Bytes(b"abcd")));
        assert!(
            !segs
                .iter()
                .any(|s| matches!(s, Segment::Gap(n) if *n > c.len))
        );
    }

    /// Found by `streams::reassembly_tests`: a StartupMessage whose first
    /// piece held 5 to `len - 1` of its bytes was ruled out (`No`), so the
    /// socket's capture was switched off before the rest arrived.
    #[test]
    fn a_startup_message_seen_in_part_asks_for_more() {
        let mut startup = 88u32.to_be_bytes().to_vec();
        startup.extend(wire::PROTOCOL_V3.to_be_bytes());
        startup.extend(b"user\0postgres\0database\0fixtures\0\0");
        startup.resize(88, 0);
        for n in 1..88 {
            assert_eq!(
                recognise(&startup[..n], Side::Frontend),
                Recognised::TooShort,
                "first {n} bytes"
            );
        }
        assert_eq!(recognise(&startup, Side::Frontend), Recognised::Startup);
        // An SSLRequest is whole at 8 bytes.
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend(wire::SSL_REQUEST.to_be_bytes());
        assert_eq!(recognise(&ssl, Side::Frontend), Recognised::Startup);
        // A length no startup message has, or a code none has, still
        // rules PostgreSQL out at once.
        assert_eq!(recognise(b"\xff\0\0\0\0", Side::Frontend), Recognised::No);
        assert_eq!(
            recognise(b"\0\0\0\x58\x12\x34\x56\x78", Side::Frontend),
            Recognised::No
        );
    }

    /// Issue 13: an HTTP request line starting with `X` was taken for a
    /// PostgreSQL Terminate with a long body.
    #[test]
    fn an_http_request_starting_with_x_is_not_postgres() {
        for line in [
            &b"X / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"X-PURGE /cache HTTP/1.1\r\n\r\n",
            b"X1 / HTTP/1.0\r\n\r\n",
        ] {
            assert_eq!(recognise(line, Side::Frontend), Recognised::No, "{line:?}");
        }
        // A real Terminate still is.
        assert_eq!(
            recognise(b"X\0\0\0\x04", Side::Frontend),
            Recognised::MidStream
        );
        // ReadyForQuery is 5 bytes; a 'Z' with any other length is not one.
        assert_eq!(
            recognise(b"Z\0\0\0\x05I", Side::Backend),
            Recognised::MidStream
        );
        assert_eq!(
            recognise(b"Z\0\0\0\x09IIIII", Side::Backend),
            Recognised::No
        );
    }
}
