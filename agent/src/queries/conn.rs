//! `PgConnection`: one PostgreSQL connection seen from a traced process,
//! pairing frontend requests with backend replies strictly in order, for
//! the simple protocol, the extended protocol (named and unnamed statements
//! and portals, pipelines of several Executes and Syncs) and COPY.

use std::{collections::HashMap, collections::VecDeque, sync::Arc};

use super::wire::{
    CANCEL_REQUEST, Framer, GSSENC_REQUEST, Message, PROTOCOL_V3, SSL_REQUEST, Segment, Side, cstr,
    sqlstate,
};

/// Which end of the protocol the traced process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// It sends frontend messages (an application, a pooler's client side).
    Client,
    /// It sends backend messages (PostgreSQL itself).
    Server,
}

impl Role {
    pub fn label(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
        }
    }
}

/// A finished operation.
#[derive(Clone, Debug, PartialEq)]
pub struct Completed {
    /// The SQL as sent (raw: normalised before it goes anywhere).
    pub sql: Arc<str>,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Of `end_ns - start_ns`, the time spent queued behind earlier
    /// statements of the connection (pipelines, batches): from the write
    /// that carried it to the previous reply's completion, 0 when nothing
    /// was in flight before it.
    pub queued_ns: u64,
    /// SQLSTATE when the server answered with an ErrorResponse.
    pub error: Option<String>,
}

#[derive(Debug)]
enum Request {
    Query {
        sql: Arc<str>,
        start: u64,
        error: Option<String>,
    },
    Parse {
        sql: Arc<str>,
        start: u64,
    },
    Bind {
        sql: Arc<str>,
        start: u64,
    },
    Describe,
    Execute {
        sql: Arc<str>,
        start: u64,
    },
    Close,
    Sync,
    Function {
        start: u64,
    },
}

/// Statements and portals remembered per connection, at most.
const MAX_NAMES: usize = 4096;
/// Requests waiting for a reply, at most (a runaway pipeline, or replies
/// we cannot see, must not grow memory).
const MAX_QUEUE: usize = 65_536;

pub const UNKNOWN_STATEMENT: &str = "/* statement prepared before pipelens attached */";

#[derive(Debug)]
pub struct PgConnection {
    pub role: Role,
    frontend: Framer,
    backend: Framer,
    pub database: Option<String>,
    pub user: Option<String>,
    pub encrypted: bool,
    pub cancel_request: bool,
    statements: HashMap<String, Arc<str>>,
    portals: HashMap<String, Arc<str>>,
    queue: VecDeque<Request>,
    /// After an ErrorResponse in the extended protocol the server ignores
    /// everything up to the next Sync.
    skipping_to_sync: bool,
    pub dropped_requests: u64,
    /// Statements the server discarded unrun: sent after one that failed,
    /// before the next Sync (the extended protocol's error recovery).
    pub skipped_after_error: u64,
    /// When the last statement completed.
    last_end: u64,
}

impl PgConnection {
    /// `from_start`: the first bytes seen are the connection's first bytes
    /// (a StartupMessage or SSLRequest), not the middle of a session.
    pub fn new(role: Role, from_start: bool) -> Self {
        Self {
            role,
            frontend: Framer::new(Side::Frontend, from_start),
            backend: Framer::new(Side::Backend, from_start),
            database: None,
            user: None,
            encrypted: false,
            cancel_request: false,
            statements: HashMap::new(),
            portals: HashMap::new(),
            queue: VecDeque::new(),
            skipping_to_sync: false,
            dropped_requests: 0,
            skipped_after_error: 0,
            last_end: 0,
        }
    }

    /// Times framing was lost in either direction.
    pub fn parse_errors(&self) -> u64 {
        self.frontend.errors + self.backend.errors
    }

    /// Feeds the pieces of one syscall's data written by `side`, observed
    /// at `ts`; completed operations are appended to `done`.
    pub fn feed(
        &mut self,
        side: Side,
        segments: &[Segment<'_>],
        ts: u64,
        done: &mut Vec<Completed>,
    ) {
        let first_new = done.len();
        self.feed_messages(side, segments, ts, done);
        for d in &mut done[first_new..] {
            let latency = d.end_ns.saturating_sub(d.start_ns);
            d.queued_ns = self.last_end.saturating_sub(d.start_ns).min(latency);
            self.last_end = self.last_end.max(d.end_ns);
        }
    }

    fn feed_messages(
        &mut self,
        side: Side,
        segments: &[Segment<'_>],
        ts: u64,
        done: &mut Vec<Completed>,
    ) {
        if self.encrypted {
            return;
        }
        let mut msgs = Vec::new();
        let framer = match side {
            Side::Frontend => &mut self.frontend,
            Side::Backend => &mut self.backend,
        };
        for (i, seg) in segments.iter().enumerate() {
            framer.feed(*seg, i == 0, &mut msgs);
        }
        for m in msgs {
            match side {
                Side::Frontend => self.on_frontend(m, ts),
                Side::Backend => self.on_backend(m, ts, done),
            }
            if self.encrypted {
                return;
            }
        }
    }

    fn push(&mut self, r: Request) {
        if self.queue.len() >= MAX_QUEUE {
            self.queue.pop_front();
            self.dropped_requests += 1;
        }
        self.queue.push_back(r);
    }

    fn on_frontend(&mut self, m: Message, ts: u64) {
        match m.tag {
            0 => self.on_startup(&m),
            b'Q' => {
                let sql = text(&m.body);
                self.push(Request::Query {
                    sql,
                    start: ts,
                    error: None,
                });
            }
            b'P' => {
                let Some((name, rest)) = cstr(&m.body) else {
                    return;
                };
                let sql: Arc<str> = match cstr(rest) {
                    Some((q, _)) => Arc::from(q),
                    // Cut by the capture: keep what was seen.
                    None => Arc::from(String::from_utf8_lossy(rest).as_ref()),
                };
                remember(&mut self.statements, name, sql.clone());
                self.push(Request::Parse { sql, start: ts });
            }
            b'B' => {
                let Some((portal, rest)) = cstr(&m.body) else {
                    return;
                };
                let Some((stmt, _)) = cstr(rest) else { return };
                let sql = self
                    .statements
                    .get(stmt)
                    .cloned()
                    .unwrap_or_else(|| Arc::from(UNKNOWN_STATEMENT));
                remember(&mut self.portals, portal, sql.clone());
                self.push(Request::Bind { sql, start: ts });
            }
            b'D' => self.push(Request::Describe),
            b'E' => {
                let Some((portal, _)) = cstr(&m.body) else {
                    return;
                };
                let sql = self
                    .portals
                    .get(portal)
                    .cloned()
                    .unwrap_or_else(|| Arc::from(UNKNOWN_STATEMENT));
                self.push(Request::Execute { sql, start: ts });
            }
            b'C' => {
                if let Some((&kind, rest)) = m.body.split_first()
                    && let Some((name, _)) = cstr(rest)
                {
                    match kind {
                        b'S' => {
                            self.statements.remove(name);
                        }
                        b'P' => {
                            self.portals.remove(name);
                        }
                        _ => {}
                    }
                }
                self.push(Request::Close);
            }
            b'S' => self.push(Request::Sync),
            b'F' => self.push(Request::Function { start: ts }),
            // Flush, Terminate, CopyData/Done/Fail, password: no reply of their own.
            _ => {}
        }
    }

    fn on_startup(&mut self, m: &Message) {
        let Some(code) = m
            .body
            .get(..4)
            .map(|c| u32::from_be_bytes(c.try_into().expect("4")))
        else {
            return;
        };
        match code {
            SSL_REQUEST | GSSENC_REQUEST => self.backend.expect_single_byte = true,
            CANCEL_REQUEST => self.cancel_request = true,
            PROTOCOL_V3 => {
                let mut rest = &m.body[4..];
                while let Some((key, after)) = cstr(rest) {
                    if key.is_empty() {
                        break;
                    }
                    let Some((value, after)) = cstr(after) else {
                        break;
                    };
                    match key {
                        "database" => self.database = Some(value.to_owned()),
                        "user" => self.user = Some(value.to_owned()),
                        _ => {}
                    }
                    rest = after;
                }
                if self.database.is_none() {
                    // The server's default database is the user's name.
                    self.database = self.user.clone();
                }
            }
            _ => {}
        }
    }

    fn on_backend(&mut self, m: Message, ts: u64, done: &mut Vec<Completed>) {
        match m.tag {
            // The bare answer to an SSLRequest / GSSENCRequest.
            b'S' | b'G' | b'N'
                if m.body.is_empty() && m.complete && self.frontend_awaits_startup() =>
            {
                if m.tag == b'N' {
                    self.frontend.restart_startup();
                } else {
                    self.encrypted = true;
                }
            }
            b'1' => self.pop_if(|r| matches!(r, Request::Parse { .. })),
            b'2' => self.pop_if(|r| matches!(r, Request::Bind { .. })),
            b'3' => self.pop_if(|r| matches!(r, Request::Close)),
            b'T' | b'n' => self.pop_if(|r| matches!(r, Request::Describe)),
            b'V' => {
                if let Some(Request::Function { start }) = self.front() {
                    let start = *start;
                    self.queue.pop_front();
                    done.push(Completed {
                        sql: Arc::from("/* function call */"),
                        start_ns: start,
                        end_ns: ts,
                        queued_ns: 0,
                        error: None,
                    });
                }
            }
            b'C' | b'I' | b's' => {
                self.drop_answered_describes();
                if let Some(Request::Execute { .. }) = self.front()
                    && let Some(Request::Execute { sql, start }) = self.queue.pop_front()
                {
                    done.push(Completed {
                        sql,
                        start_ns: start,
                        end_ns: ts,
                        queued_ns: 0,
                        error: None,
                    });
                }
            }
            b'E' => {
                let state = sqlstate(&m.body).unwrap_or_else(|| "XX000".to_owned());
                match self.queue.front_mut() {
                    Some(Request::Query { error, .. }) => {
                        error.get_or_insert(state);
                    }
                    Some(Request::Sync) | None => {}
                    Some(_) => {
                        // The failing request is the oldest one waiting; the
                        // server then skips everything up to the next Sync.
                        let failed = self.queue.pop_front();
                        let reported = match failed {
                            Some(Request::Parse { sql, start })
                            | Some(Request::Bind { sql, start })
                            | Some(Request::Execute { sql, start }) => Some((sql, start)),
                            Some(Request::Function { start }) => {
                                Some((Arc::from("/* function call */"), start))
                            }
                            _ => None,
                        };
                        if let Some((sql, start)) = reported {
                            done.push(Completed {
                                sql,
                                start_ns: start,
                                end_ns: ts,
                                queued_ns: 0,
                                error: Some(state),
                            });
                        }
                        self.skipping_to_sync = true;
                        while let Some(r) = self.queue.front() {
                            if matches!(r, Request::Sync | Request::Query { .. }) {
                                break;
                            }
                            if matches!(r, Request::Execute { .. } | Request::Function { .. }) {
                                self.skipped_after_error += 1;
                            }
                            self.queue.pop_front();
                        }
                    }
                }
            }
            b'Z' => {
                self.skipping_to_sync = false;
                match self.queue.front() {
                    Some(Request::Query { .. }) => {
                        if let Some(Request::Query { sql, start, error }) = self.queue.pop_front() {
                            done.push(Completed {
                                sql,
                                start_ns: start,
                                end_ns: ts,
                                queued_ns: 0,
                                error,
                            });
                        }
                    }
                    _ => {
                        // Everything up to and including the Sync is answered.
                        while let Some(r) = self.queue.pop_front() {
                            if matches!(r, Request::Sync) {
                                break;
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn frontend_awaits_startup(&self) -> bool {
        self.backend.expect_single_byte || self.queue.is_empty()
    }

    fn front(&self) -> Option<&Request> {
        self.queue.front()
    }

    fn pop_if(&mut self, f: impl Fn(&Request) -> bool) {
        if self.queue.front().is_some_and(f) {
            self.queue.pop_front();
        }
    }

    /// A Describe answered by ParameterDescription only leaves its
    /// RowDescription/NoData to come; an Execute's completion behind it means
    /// the Describe was answered already.
    fn drop_answered_describes(&mut self) {
        while matches!(self.queue.front(), Some(Request::Describe)) {
            self.queue.pop_front();
        }
    }

    /// Statements sent and not answered yet (a Query, an Execute or a
    /// function call): at close, those the server never answered.
    pub fn unanswered(&self) -> u64 {
        self.queue
            .iter()
            .filter(|r| {
                matches!(
                    r,
                    Request::Query { .. } | Request::Execute { .. } | Request::Function { .. }
                )
            })
            .count() as u64
    }

    /// Requests still waiting.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }
}

fn text(body: &[u8]) -> Arc<str> {
    let end = body.iter().position(|c| *c == 0).unwrap_or(body.len());
    Arc::from(String::from_utf8_lossy(&body[..end]).as_ref())
}

fn remember(map: &mut HashMap<String, Arc<str>>, name: &str, sql: Arc<str>) {
    if map.len() >= MAX_NAMES && !map.contains_key(name) {
        map.clear();
    }
    map.insert(name.to_owned(), sql);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn startup(db: &str) -> Vec<u8> {
        let mut body = PROTOCOL_V3.to_be_bytes().to_vec();
        body.extend_from_slice(format!("user\0alice\0database\0{db}\0\0").as_bytes());
        let mut v = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        v.extend(body);
        v
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        msg(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
    }
    fn bind(portal: &str, stmt: &str) -> Vec<u8> {
        msg(b'B', format!("{portal}\0{stmt}\0\0\0\0\0\0\0").as_bytes())
    }
    fn execute(portal: &str) -> Vec<u8> {
        msg(b'E', format!("{portal}\0\0\0\0\0").as_bytes())
    }
    fn error(code: &str) -> Vec<u8> {
        msg(b'E', format!("SERROR\0C{code}\0Mboom\0\0").as_bytes())
    }

    fn fe(c: &mut PgConnection, bytes: &[u8], ts: u64, done: &mut Vec<Completed>) {
        c.feed(Side::Frontend, &[Segment::Bytes(bytes)], ts, done);
    }
    fn be(c: &mut PgConnection, bytes: &[u8], ts: u64, done: &mut Vec<Completed>) {
        c.feed(Side::Backend, &[Segment::Bytes(bytes)], ts, done);
    }

    #[test]
    fn simple_query_with_startup() {
        let mut c = PgConnection::new(Role::Client, true);
        let mut done = Vec::new();
        fe(&mut c, &startup("shop"), 1, &mut done);
        be(
            &mut c,
            &[msg(b'R', &[0, 0, 0, 0]), msg(b'Z', b"I")].concat(),
            2,
            &mut done,
        );
        assert_eq!(c.database.as_deref(), Some("shop"));
        assert!(done.is_empty());
        fe(&mut c, &msg(b'Q', b"SELECT 1\0"), 10, &mut done);
        be(
            &mut c,
            &[msg(b'T', b"x"), msg(b'D', b"y"), msg(b'C', b"SELECT 1\0")].concat(),
            15,
            &mut done,
        );
        assert!(
            done.is_empty(),
            "the simple protocol completes at ReadyForQuery"
        );
        be(&mut c, &msg(b'Z', b"I"), 17, &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(&*done[0].sql, "SELECT 1");
        assert_eq!((done[0].start_ns, done[0].end_ns), (10, 17));
    }

    #[test]
    fn extended_pipeline_pairs_in_order_with_named_statements() {
        let mut c = PgConnection::new(Role::Client, false);
        let mut done = Vec::new();
        let batch = [
            parse("s1", "SELECT a FROM t WHERE id = $1"),
            parse("s2", "UPDATE t SET a = $1"),
            bind("", "s1"),
            msg(b'D', b"P\0"),
            execute(""),
            bind("", "s2"),
            execute(""),
            msg(b'S', b""),
            bind("", "s1"),
            execute(""),
            msg(b'S', b""),
        ]
        .concat();
        fe(&mut c, &batch, 100, &mut done);
        let reply = [
            msg(b'1', b""),
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'T', b"r"),
            msg(b'D', b"d"),
            msg(b'C', b"SELECT 1\0"),
            msg(b'2', b""),
            msg(b'C', b"UPDATE 3\0"),
            msg(b'Z', b"T"),
            msg(b'2', b""),
            msg(b'D', b"d"),
            msg(b'C', b"SELECT 1\0"),
            msg(b'Z', b"I"),
        ]
        .concat();
        be(&mut c, &reply, 200, &mut done);
        let sqls: Vec<&str> = done.iter().map(|d| &*d.sql).collect();
        assert_eq!(
            sqls,
            [
                "SELECT a FROM t WHERE id = $1",
                "UPDATE t SET a = $1",
                "SELECT a FROM t WHERE id = $1"
            ]
        );
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn an_error_skips_the_rest_of_the_batch_until_sync() {
        let mut c = PgConnection::new(Role::Client, false);
        let mut done = Vec::new();
        let batch = [
            parse("", "SELECT 1/0"),
            bind("", ""),
            execute(""),
            parse("", "SELECT 2"),
            bind("", ""),
            execute(""),
            msg(b'S', b""),
            parse("", "SELEC 3"),
            msg(b'S', b""),
        ]
        .concat();
        fe(&mut c, &batch, 1, &mut done);
        let reply = [
            msg(b'1', b""),
            msg(b'2', b""),
            error("22012"),
            msg(b'Z', b"I"),
            error("42601"),
            msg(b'Z', b"I"),
        ]
        .concat();
        be(&mut c, &reply, 2, &mut done);
        assert_eq!(done.len(), 2, "{done:?}");
        assert_eq!(done[0].error.as_deref(), Some("22012"));
        assert_eq!(&*done[0].sql, "SELECT 1/0");
        assert_eq!(done[1].error.as_deref(), Some("42601"));
        assert_eq!(&*done[1].sql, "SELEC 3");
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn simple_query_error_and_copy() {
        let mut c = PgConnection::new(Role::Client, false);
        let mut done = Vec::new();
        fe(
            &mut c,
            &msg(b'Q', b"INSERT INTO u VALUES (1)\0"),
            1,
            &mut done,
        );
        be(
            &mut c,
            &[error("23505"), msg(b'Z', b"I")].concat(),
            2,
            &mut done,
        );
        fe(&mut c, &msg(b'Q', b"COPY t FROM STDIN\0"), 3, &mut done);
        be(&mut c, &msg(b'G', b"\0\0\0"), 4, &mut done);
        fe(
            &mut c,
            &[msg(b'd', b"1\t2\n"), msg(b'c', b"")].concat(),
            5,
            &mut done,
        );
        be(
            &mut c,
            &[msg(b'C', b"COPY 1\0"), msg(b'Z', b"I")].concat(),
            6,
            &mut done,
        );
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].error.as_deref(), Some("23505"));
        assert_eq!(done[1].error, None);
        assert_eq!((done[1].start_ns, done[1].end_ns), (3, 6));
    }

    #[test]
    fn ssl_accepted_stops_parsing_and_refused_continues() {
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        let mut c = PgConnection::new(Role::Client, true);
        let mut done = Vec::new();
        fe(&mut c, &ssl, 1, &mut done);
        be(&mut c, b"S", 2, &mut done);
        assert!(c.encrypted);

        let mut c = PgConnection::new(Role::Client, true);
        fe(&mut c, &ssl, 1, &mut done);
        be(&mut c, b"N", 2, &mut done);
        assert!(!c.encrypted);
        fe(&mut c, &startup("db"), 3, &mut done);
        assert_eq!(c.database.as_deref(), Some("db"));
        fe(&mut c, &msg(b'Q', b"SELECT 1\0"), 4, &mut done);
        be(
            &mut c,
            &[msg(b'R', &[0; 4]), msg(b'Z', b"I")].concat(),
            5,
            &mut done,
        );
        be(
            &mut c,
            &[msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")].concat(),
            6,
            &mut done,
        );
        assert_eq!(done.len(), 1);
    }

    #[test]
    fn mid_stream_attach_counts_what_follows() {
        let mut c = PgConnection::new(Role::Client, false);
        let mut done = Vec::new();
        // The tail of a reply to a request sent before we attached.
        be(
            &mut c,
            &[msg(b'D', b"old"), msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")].concat(),
            1,
            &mut done,
        );
        fe(&mut c, &msg(b'Q', b"SELECT now()\0"), 2, &mut done);
        be(
            &mut c,
            &[msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")].concat(),
            3,
            &mut done,
        );
        assert_eq!(done.len(), 1);
        assert_eq!(&*done[0].sql, "SELECT now()");
    }
}
