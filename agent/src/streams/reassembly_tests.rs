//! Property tests of reassembly: a valid conversation, each of its writes
//! cut into syscall-sized pieces anywhere (down to one byte), each piece
//! captured only to an arbitrary `capture` limit (≥ 64, the smallest
//! `--capture-bytes`) with its true length kept — with or without the
//! kernel's tail of the last [`TAIL_CAPTURE`] bytes — and delivered
//! through the [`Router`] to the real analysers, parses to the same
//! statements, messages and requests as the conversation delivered whole.
//!
//! What a cut may hide, and what then may differ:
//! - Framing is never hidden. A piece longer than the capture ends before
//!   the first framing byte its capture would hide (the next piece starts
//!   there), as a writer starts a long write at a message. Framing is: the
//!   type byte and length of every PostgreSQL message, the whole of the
//!   untagged startup messages, ErrorResponses, and of the small requests
//!   whose fields pairing needs (Describe, Execute, Close, Sync, …), the
//!   statement and portal names of Parse and Bind; for HTTP/WebSocket the
//!   header block of each recorded write and its next 64 bytes (frame
//!   headers, close codes, chunk-size lines: the fixtures' writes start at
//!   a frame, see `websocket/fixtures/README.md`), the whole write where a
//!   recorded write packs several requests (`http_pipelined`). A capture
//!   that hides framing is an error, not a guess: that is
//!   `websocket::tests::truncation_that_hides_framing_is_an_error_not_a_guess`.
//! - Hidden bytes are message bodies only: query and statement text,
//!   parameters, data rows, COPY data, WebSocket payloads, HTTP bodies.
//!   Of these only statement text is reported, so the one difference
//!   allowed is that a statement's text is its visible prefix: the bytes
//!   from its start up to the first hidden one, never anything seen after
//!   a hidden byte. The number of statements, their order, connection,
//!   error (SQLSTATE), start, end and queued time are identical; so is
//!   every HTTP/WebSocket event, timestamps included (every piece of a
//!   write carries the write's time).
//!
//! Ground truth: the generated PostgreSQL conversations are checked
//! against the generator's own statements (text, SQLSTATE, times); the
//! recorded captures' whole runs against what their clients sent (the
//! PostgreSQL scenario table of `queries/fixtures/README.md`, the
//! recorder's `#!` truth line of each WebSocket/HTTP capture).

use std::collections::BTreeMap;

use pipelens_common::streams::TAIL_CAPTURE;
use proptest::{prelude::*, test_runner::Config};

use super::{Chunk, Flow, router::Router};
use crate::{
    queries::{
        QueriesAnalyser,
        conn::Completed,
        fixture_tests,
        wire::{CANCEL_REQUEST, PROTOCOL_V3, SSL_REQUEST, Side},
    },
    websocket::{
        Role, WebEvent,
        analyser::WebAnalyser,
        tests::{self as ws, Record},
    },
};

const COMM: &[u8] = b"traced\0\0\0\0\0\0\0\0\0\0";

/// One read or write of a conversation, as far as it is known: the
/// recorded captures keep only a prefix (and for PostgreSQL a tail) of
/// their long writes.
#[derive(Clone, Debug)]
struct Write {
    sk: u64,
    flow: Flow,
    ts: u64,
    len: usize,
    /// Known bytes at the start.
    head: Vec<u8>,
    /// Known bytes at the end (`len - end.len()..len`).
    end: Vec<u8>,
    /// Framing: ranges of offsets in this write never to be hidden.
    framing: Vec<(usize, usize)>,
}

impl Write {
    fn byte(&self, at: usize) -> Option<u8> {
        if at < self.head.len() {
            Some(self.head[at])
        } else if at >= self.len - self.end.len() && at < self.len {
            Some(self.end[at - (self.len - self.end.len())])
        } else {
            None
        }
    }
}

#[derive(Clone, Debug)]
enum Event {
    Write(Write),
    Closed { sk: u64, ts: u64 },
}

/// How the kernel cuts and captures: piece sizes (used in turn, over and
/// over), the capture limit, whether it sends the tail of a long piece.
#[derive(Clone, Debug)]
struct Cut {
    sizes: Vec<usize>,
    capture: usize,
    tail: bool,
}

impl Cut {
    /// Every write whole, as recorded.
    fn none() -> Self {
        Self {
            sizes: vec![usize::MAX],
            capture: usize::MAX,
            tail: true,
        }
    }
}

/// One piece as the kernel reports it, and where it lies in its write.
struct Piece {
    at: usize,
    len: usize,
    data: Vec<u8>,
    tail: Vec<u8>,
}

impl Piece {
    fn visible(&self, i: usize) -> bool {
        (self.at..self.at + self.data.len()).contains(&i)
            || (self.at + self.len - self.tail.len()..self.at + self.len).contains(&i)
    }
}

/// What the kernel captures of `w[at..at + len]`.
fn capture(w: &Write, at: usize, len: usize, cut: &Cut) -> Piece {
    let want = len.min(cut.capture);
    let data: Vec<u8> = (at..at + want).map_while(|i| w.byte(i)).collect();
    let mut tail = Vec::new();
    if cut.tail && data.len() < len {
        let t = len.min(TAIL_CAPTURE);
        if let Some(bytes) = (at + len - t..at + len).map(|i| w.byte(i)).collect() {
            tail = bytes;
        }
    }
    Piece {
        at,
        len,
        data,
        tail,
    }
}

/// `w` in pieces; `next` walks `cut.sizes` across writes.
fn pieces(w: &Write, cut: &Cut, next: &mut usize) -> Vec<Piece> {
    if cut.capture == usize::MAX {
        // As recorded: the known head and end.
        return vec![Piece {
            at: 0,
            len: w.len,
            data: w.head.clone(),
            tail: w.end.clone(),
        }];
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at < w.len {
        let mut len = cut.sizes[*next % cut.sizes.len()].min(w.len - at);
        *next += 1;
        let piece = loop {
            let p = capture(w, at, len, cut);
            let hidden = w
                .framing
                .iter()
                .flat_map(|&(s, e)| s.max(at)..e.min(at + len))
                .find(|&i| !p.visible(i));
            match hidden {
                // End the piece before it: the next one starts there.
                Some(i) => len = i - at,
                None => break p,
            }
        };
        assert!(piece.len > 0);
        at += piece.len;
        out.push(piece);
    }
    out
}

/// Delivers `events` cut by `cut` through a router over `analysers`;
/// returns, per write, its pieces (what was visible).
fn replay(
    events: &[Event],
    cut: &Cut,
    analysers: Vec<Box<dyn super::Analyser>>,
) -> Vec<Vec<Piece>> {
    let mut router = Router::new(analysers);
    let mut next = 0;
    let mut seen = std::collections::HashSet::new();
    let mut all = Vec::new();
    for e in events {
        match e {
            Event::Closed { sk, ts } => {
                router.closed(*sk, *ts);
                all.push(Vec::new());
            }
            Event::Write(w) => {
                let ps = pieces(w, cut, &mut next);
                for p in &ps {
                    let first = seen.insert(w.sk);
                    router.deliver(&Chunk {
                        sk: w.sk,
                        tgid: 0,
                        comm: COMM,
                        flow: w.flow,
                        ts_enter: w.ts,
                        ts_exit: w.ts,
                        len: p.len as u64,
                        data: &p.data,
                        tail: &p.tail,
                        lport: if first { 5432 } else { 0 },
                        rport: if first { 40_000 } else { 0 },
                    });
                }
                all.push(ps);
            }
        }
    }
    all
}

fn cuts() -> impl Strategy<Value = Cut> {
    let size = prop_oneof![
        3 => 1usize..8,
        3 => 1usize..300,
        2 => 1usize..70_000,
    ];
    (
        prop::collection::vec(size, 1..12),
        prop_oneof![64usize..300, 64usize..70_000],
        any::<bool>(),
    )
        .prop_map(|(sizes, capture, tail)| Cut {
            sizes,
            capture,
            tail,
        })
}

// --- PostgreSQL ------------------------------------------------------------------

fn pg_run(events: &[Event], cut: &Cut) -> (Vec<(u64, Completed)>, Vec<Vec<Piece>>) {
    let (analyser, _summary) = QueriesAnalyser::new();
    let log = analyser.log.clone();
    let pieces = replay(events, cut, vec![Box::new(analyser)]);
    let done = std::mem::take(&mut *log.lock().expect("log"));
    (done, pieces)
}

fn be32(b: &[Option<u8>], at: usize) -> usize {
    let mut v = 0usize;
    for i in 0..4 {
        let byte = b[at + i].unwrap_or_else(|| panic!("framing at {} unseen", at + i));
        v = v << 8 | usize::from(byte);
    }
    v
}

/// Length of the NUL-terminated string at `at`, its NUL included.
fn cstr_len(b: &[Option<u8>], at: usize) -> usize {
    b[at..]
        .iter()
        .position(|c| *c == Some(0) || c.is_none())
        .map_or(b.len() - at, |p| p + 1)
}

/// The framing of one direction of a PostgreSQL connection (its bytes
/// joined, `None` where unknown), as offset ranges into the joined bytes.
fn pg_framing(b: &[Option<u8>], side: Side, ssl_answer: bool) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut startup = side == Side::Frontend;
    if ssl_answer && !b.is_empty() {
        out.push((0, 1));
        at = 1;
    }
    while at < b.len() {
        if startup {
            let len = be32(b, at);
            let code = be32(b, at + 4);
            out.push((at, at + len));
            startup = code != PROTOCOL_V3 as usize && code != CANCEL_REQUEST as usize;
            at += len;
            continue;
        }
        let tag = b[at].expect("type byte");
        let len = be32(b, at + 1);
        let body = at + 5;
        let keep = match (side, tag) {
            (Side::Frontend, b'Q' | b'd' | b'F') | (Side::Backend, b'D' | b'd' | b'T') => 0,
            (Side::Frontend, b'P') => cstr_len(b, body),
            (Side::Frontend, b'B') => {
                let portal = cstr_len(b, body);
                portal + cstr_len(b, body + portal)
            }
            _ => len - 4,
        };
        out.push((at, body + keep.min(len - 4)));
        at += 1 + len;
    }
    out
}

/// Sets each write's framing from the joined bytes of its direction.
fn frame_pg(events: &mut [Event]) {
    let mut dirs: BTreeMap<(u64, bool), Vec<usize>> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        if let Event::Write(w) = e {
            dirs.entry((w.sk, w.flow == Flow::Sent))
                .or_default()
                .push(i);
        }
    }
    let joined = |idx: &[usize], events: &[Event]| -> Vec<Option<u8>> {
        idx.iter()
            .flat_map(|&i| match &events[i] {
                Event::Write(w) => (0..w.len).map(|j| w.byte(j)).collect::<Vec<_>>(),
                Event::Closed { .. } => Vec::new(),
            })
            .collect()
    };
    for ((sk, sent), idx) in &dirs {
        let b = joined(idx, events);
        let side = if *sent { Side::Frontend } else { Side::Backend };
        let ssl = !*sent
            && dirs.get(&(*sk, true)).is_some_and(|f| {
                let fb = joined(&f[..1], events);
                fb.len() >= 8 && be32(&fb, 4) == SSL_REQUEST as usize
            });
        let framing = pg_framing(&b, side, ssl);
        let mut start = 0;
        for &i in idx {
            let Event::Write(w) = &mut events[i] else {
                continue;
            };
            let end = start + w.len;
            w.framing = framing
                .iter()
                .filter(|&&(s, e)| s < end && e > start)
                .map(|&(s, e)| (s.max(start) - start, e.min(end) - start))
                .collect();
            start = end;
        }
    }
}

fn pg_fixture(name: &str) -> Vec<Event> {
    let mut events: Vec<Event> = fixture_tests::load(name)
        .into_iter()
        .map(|c| {
            Event::Write(Write {
                sk: u64::from(c.conn) + 1,
                // The traced process is the client.
                flow: match c.side {
                    Side::Frontend => Flow::Sent,
                    Side::Backend => Flow::Received,
                },
                ts: c.ts,
                len: c.len as usize,
                head: c.head,
                end: c.tail,
                framing: Vec::new(),
            })
        })
        .collect();
    frame_pg(&mut events);
    events
}

/// The recorded PostgreSQL captures and, from their scenario table, the
/// statements and SQLSTATEs their clients caused.
const PG_FIXTURES: &[(&str, usize, &[&str])] = &[
    // pgbench's 10 transactions and its 2 setup queries.
    ("pgbench_simple.pgw", 12, &[]),
    ("pgbench_extended.pgw", 12, &[]),
    ("pgbench_prepared.pgw", 12, &[]),
    ("psql_simple.pgw", 10, &[]),
    ("errors_simple.pgw", 6, &["22012", "23505", "42601"]),
    ("errors_extended.pgw", 6, &["22012", "23505", "42601"]),
    ("copy.pgw", 0, &[]),
    // The CREATE and the 30 pipelined statements.
    ("pipeline.pgw", 31, &[]),
    // a, b, c (22012), f: the server skipped d and e.
    ("pipeline_error.pgw", 4, &["22012"]),
    ("large.pgw", 6, &[]),
    ("raw.pgw", 0, &["57014"]),
];

/// `cut` is `full` or its visible prefix (a cut multi-byte character
/// decodes to U+FFFD at the end).
fn is_visible_prefix(cut: &str, full: &str) -> bool {
    full.starts_with(cut.trim_end_matches('\u{FFFD}'))
}

fn same_statements(cut: &[(u64, Completed)], full: &[(u64, Completed)]) -> Result<(), String> {
    if cut.len() != full.len() {
        return Err(format!("{} statements, {} whole", cut.len(), full.len()));
    }
    for ((sk, c), (fsk, f)) in cut.iter().zip(full) {
        let same = sk == fsk
            && c.error == f.error
            && c.start_ns == f.start_ns
            && c.end_ns == f.end_ns
            && c.queued_ns == f.queued_ns
            && is_visible_prefix(&c.sql, &f.sql);
        if !same {
            return Err(format!("{c:?} where whole: {f:?}"));
        }
    }
    Ok(())
}

#[test]
fn recorded_postgresql_captures_whole_match_their_scenarios() {
    for (name, count, errors) in PG_FIXTURES {
        let (done, _) = pg_run(&pg_fixture(name), &Cut::none());
        if *count > 0 {
            assert_eq!(done.len(), *count, "{name}");
        }
        let mut e: Vec<&str> = done
            .iter()
            .filter_map(|(_, d)| d.error.as_deref())
            .collect();
        e.sort_unstable();
        assert_eq!(e, *errors, "{name}");
    }
}

proptest! {
    #![proptest_config(Config { cases: 256, failure_persistence: None, ..Config::default() })]

    #[test]
    fn recorded_postgresql_captures_in_any_pieces(
        fixture in 0..PG_FIXTURES.len(),
        cut in cuts(),
    ) {
        let events = pg_fixture(PG_FIXTURES[fixture].0);
        let (full, _) = pg_run(&events, &Cut::none());
        let (done, _) = pg_run(&events, &cut);
        prop_assert_eq!(same_statements(&done, &full), Ok(()), "{}", PG_FIXTURES[fixture].0);
    }
}

/// A statement of a generated conversation and how the server answers it.
#[derive(Clone, Debug)]
struct GenStatement {
    /// Extended protocol (a named statement), or simple protocol.
    prepared: bool,
    sql: String,
    /// Sizes of the rows returned.
    rows: Vec<usize>,
    error: Option<&'static str>,
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cstrs(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p);
        v.push(0);
    }
    v
}

/// The bytes of a statement's request and of its reply; where its text
/// starts in the request.
fn gen_bytes(s: &GenStatement, n: usize) -> (Vec<u8>, Vec<u8>, usize) {
    let mut req = Vec::new();
    let mut reply = Vec::new();
    let text_at;
    match s.prepared {
        false => {
            text_at = 5;
            req.extend(msg(b'Q', &cstrs(&[s.sql.as_bytes()])));
        }
        true => {
            let name = format!("stmt{n}");
            text_at = 5 + name.len() + 1;
            let mut parse = cstrs(&[name.as_bytes(), s.sql.as_bytes()]);
            parse.extend_from_slice(&0u16.to_be_bytes());
            req.extend(msg(b'P', &parse));
            let mut bind = cstrs(&[b"", name.as_bytes()]);
            bind.extend_from_slice(&[0; 6]);
            req.extend(msg(b'B', &bind));
            req.extend(msg(b'D', b"P\0"));
            req.extend(msg(b'E', b"\0\0\0\0\0"));
            req.extend(msg(b'S', b""));
            reply.extend(msg(b'1', b""));
            reply.extend(msg(b'2', b""));
        }
    }
    reply.extend(msg(
        b'T',
        b"\0\x01v\0\0\0\0\0\0\0\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0",
    ));
    match s.error {
        Some(state) => reply.extend(msg(
            b'E',
            &cstrs(&[
                b"SERROR",
                b"VERROR",
                format!("C{state}").as_bytes(),
                b"Mit failed",
                b"",
            ]),
        )),
        None => {
            for &n in &s.rows {
                let mut row = 1u16.to_be_bytes().to_vec();
                row.extend_from_slice(&(n as u32).to_be_bytes());
                row.resize(row.len() + n, b'r');
                reply.extend(msg(b'D', &row));
            }
            reply.extend(msg(b'C', format!("SELECT {}\0", s.rows.len()).as_bytes()));
        }
    }
    reply.extend(msg(b'Z', b"I"));
    (req, reply, text_at)
}

/// A client's conversation: startup, then `batches` of statements, each
/// batch written at once and answered at once. Returns the events and,
/// per statement, its write (event index) and text's offset in it.
fn gen_conversation(batches: &[Vec<GenStatement>]) -> (Vec<Event>, Vec<(usize, usize)>) {
    let sk = 7;
    let write = |flow, ts, bytes: Vec<u8>| {
        Event::Write(Write {
            sk,
            flow,
            ts,
            len: bytes.len(),
            head: bytes,
            end: Vec::new(),
            framing: Vec::new(),
        })
    };
    let mut startup = 196_608u32.to_be_bytes().to_vec();
    startup.extend(cstrs(&[b"user", b"app", b"database", b"gen", b""]));
    let mut first = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    first.extend(startup);
    let mut events = vec![write(Flow::Sent, 1_000, first)];
    let mut hello = msg(b'R', &[0; 4]);
    hello.extend(msg(b'S', &cstrs(&[b"server_version", b"15"])));
    hello.extend(msg(b'K', &[1; 8]));
    hello.extend(msg(b'Z', b"I"));
    events.push(write(Flow::Received, 2_000, hello));
    let mut texts = Vec::new();
    for (n, batch) in batches.iter().enumerate() {
        let ts = 10_000 * (n as u64 + 1);
        let (mut req, mut reply) = (Vec::new(), Vec::new());
        for s in batch {
            let (q, r, text_at) = gen_bytes(s, texts.len());
            texts.push((events.len(), req.len() + text_at));
            req.extend(q);
            reply.extend(r);
        }
        events.push(write(Flow::Sent, ts, req));
        events.push(write(Flow::Received, ts + 5_000, reply));
    }
    frame_pg(&mut events);
    (events, texts)
}

fn gen_statement() -> impl Strategy<Value = GenStatement> {
    (
        any::<bool>(),
        0usize..6,
        0usize..3_000,
        prop::collection::vec(prop_oneof![0usize..50, 0usize..40_000], 0..4),
        prop::option::of(prop::sample::select(vec![
            "22012", "23505", "42601", "57014",
        ])),
    )
        .prop_map(|(prepared, table, pad, rows, error)| GenStatement {
            prepared,
            sql: format!(
                "SELECT c{table} FROM t{table} WHERE v = '{}' AND k = {pad}",
                "x".repeat(pad)
            ),
            rows,
            error,
        })
}

proptest! {
    #![proptest_config(Config { cases: 256, failure_persistence: None, ..Config::default() })]

    #[test]
    fn generated_postgresql_conversations_in_any_pieces(
        batches in prop::collection::vec(prop::collection::vec(gen_statement(), 1..4), 1..8),
        cut in cuts(),
    ) {
        let (events, texts) = gen_conversation(&batches);
        let (done, pieces) = pg_run(&events, &cut);
        let statements: Vec<&GenStatement> = batches.iter().flatten().collect();
        prop_assert_eq!(done.len(), statements.len());
        for (((_, d), s), &(write, text_at)) in done.iter().zip(&statements).zip(&texts) {
            let Event::Write(w) = &events[write] else { unreachable!() };
            // The text up to its first byte no piece showed.
            let visible = (0..s.sql.len())
                .take_while(|&i| pieces[write].iter().any(|p| p.visible(text_at + i)))
                .count();
            prop_assert_eq!(&*d.sql, &s.sql[..visible]);
            prop_assert_eq!(d.error.as_deref(), s.error);
            prop_assert_eq!(d.start_ns, w.ts);
            prop_assert_eq!(d.end_ns, w.ts + 5_000);
        }
        let (full, _) = pg_run(&events, &Cut::none());
        prop_assert_eq!(same_statements(&done, &full), Ok(()));
    }
}

// --- HTTP and WebSocket ----------------------------------------------------------

fn ws_events(name: &str, cap: &ws::Capture, traced: Role) -> Vec<Event> {
    cap.records
        .iter()
        .map(|r| match r {
            Record::Closed { conn, ts } => Event::Closed {
                sk: u64::from(*conn) + 1,
                ts: *ts,
            },
            Record::Data {
                conn,
                from_client,
                ts,
                len,
                bytes,
            } => {
                let framed = if name == "http_pipelined" {
                    bytes.len()
                } else {
                    (ws::head_len(bytes).unwrap_or(0) + 64).min(bytes.len())
                };
                Event::Write(Write {
                    sk: u64::from(*conn) + 1,
                    flow: if *from_client == (traced == Role::Client) {
                        Flow::Sent
                    } else {
                        Flow::Received
                    },
                    ts: *ts,
                    len: *len,
                    head: bytes.clone(),
                    end: Vec::new(),
                    framing: vec![(0, framed)],
                })
            }
        })
        .collect()
}

fn ws_run(events: &[Event], cut: &Cut) -> BTreeMap<u32, Vec<WebEvent>> {
    let (analyser, _summary) = WebAnalyser::new();
    let log = analyser.log.clone();
    replay(events, cut, vec![Box::new(analyser)]);
    let mut by_conn: BTreeMap<u32, Vec<WebEvent>> = BTreeMap::new();
    for (sk, e) in log.lock().expect("log").drain(..) {
        by_conn.entry(sk as u32 - 1).or_default().push(e);
    }
    by_conn
}

fn web_fixtures() -> Vec<(&'static str, &'static str)> {
    ws::GOOD_WEBSOCKET
        .iter()
        .chain(ws::GOOD_HTTP)
        .copied()
        .collect()
}

#[test]
fn recorded_web_captures_whole_through_the_router_match_their_truth() {
    for (name, text) in web_fixtures() {
        let cap = ws::load(text);
        for traced in [Role::Server, Role::Client] {
            let run = ws_run(&ws_events(name, &cap, traced), &Cut::none());
            if name.starts_with("http") {
                ws::check_http_truth(&cap, &run, traced);
            } else {
                ws::check_truth(&cap, &run, traced);
            }
        }
    }
}

proptest! {
    #![proptest_config(Config { cases: 256, failure_persistence: None, ..Config::default() })]

    #[test]
    fn recorded_web_captures_in_any_pieces(
        fixture in 0..web_fixtures().len(),
        server in any::<bool>(),
        cut in cuts(),
    ) {
        let (name, text) = web_fixtures()[fixture];
        let cap = ws::load(text);
        let traced = if server { Role::Server } else { Role::Client };
        let events = ws_events(name, &cap, traced);
        let full = ws_run(&events, &Cut::none());
        let got = ws_run(&events, &cut);
        prop_assert_eq!(got, full, "{} traced as {:?}", name, traced);
    }
}
