//! Fed with real captures of PostgreSQL 15 (see `../fixtures/README.md`);
//! the expectations are what `fixtures/record.py` sent.

use super::*;

/// One captured read or write.
#[derive(Clone, Debug)]
struct Chunk {
    conn: u32,
    dir: Direction,
    ts: u64,
    len: usize,
    bytes: Vec<u8>,
    /// The last bytes, when `bytes` is only a prefix.
    tail: Vec<u8>,
}

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn load(text: &str) -> Vec<Chunk> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Chunk {
                conn: f[0].parse().expect("conn"),
                dir: if f[1] == "F" {
                    Direction::FromFrontend
                } else {
                    Direction::FromBackend
                },
                ts: f[2].parse().expect("ts"),
                len: f[3].parse().expect("len"),
                bytes: unhex(f.get(4).copied().unwrap_or("")),
                tail: unhex(f.get(5).copied().unwrap_or("")),
            }
        })
        .collect()
}

macro_rules! fixture {
    ($name:literal) => {
        load(include_str!(concat!("../fixtures/", $name, ".pgw")))
    };
}

#[derive(Debug, Default)]
struct Outcome {
    events: Vec<QueryEvent>,
    stats: PgStreamStats,
    streams: Vec<(u32, PgStream)>,
}

impl Outcome {
    fn count(&self, template: &str) -> usize {
        self.events
            .iter()
            .filter(|e| &*e.template == template)
            .count()
    }

    fn templates(&self) -> Vec<&str> {
        self.events.iter().map(|e| &*e.template).collect()
    }

    fn sqlstates(&self) -> Vec<&str> {
        self.events
            .iter()
            .filter_map(|e| e.sqlstate.as_ref())
            .map(SqlState::as_str)
            .collect()
    }

    fn stream(&self, conn: u32) -> &PgStream {
        &self
            .streams
            .iter()
            .find(|(c, _)| *c == conn)
            .expect("connection")
            .1
    }
}

/// Feeds every connection of a capture into its own stream (prefixes only).
fn run(chunks: &[Chunk], new: fn() -> PgStream) -> Outcome {
    run_with(chunks, new, false)
}

fn run_with(chunks: &[Chunk], new: fn() -> PgStream, tails: bool) -> Outcome {
    let mut out = Outcome::default();
    for c in chunks {
        let i = match out.streams.iter().position(|(conn, _)| *conn == c.conn) {
            Some(i) => i,
            None => {
                out.streams.push((c.conn, new()));
                out.streams.len() - 1
            }
        };
        let stream = &mut out.streams[i].1;
        if tails {
            stream.feed_with_tail(c.dir, &c.bytes, &c.tail, c.len, c.ts);
        } else {
            stream.feed(c.dir, &c.bytes, c.len, c.ts);
        }
        out.events.extend(stream.drain_events());
        check_bounds(stream);
    }
    for (_, s) in &out.streams {
        let st = s.stats();
        out.stats.parse_errors += st.parse_errors;
        out.stats.framing_lost += st.framing_lost;
        out.stats.resyncs += st.resyncs;
        out.stats.unknown_statements += st.unknown_statements;
        out.stats.dropped_requests += st.dropped_requests;
        out.stats.events_dropped += st.events_dropped;
    }
    out
}

/// Every buffer of a stream stays within its cap.
fn check_bounds(s: &PgStream) {
    for f in [&s.frontend, &s.backend] {
        assert!(
            f.scan.len() <= RESYNC_WINDOW + 70_000,
            "resync window {}",
            f.scan.len()
        );
        if let Some(m) = &f.msg {
            assert!(m.body.len() <= m.keep && m.keep <= MAX_STARTUP as usize + MAX_SQL + MAX_NAME);
        }
    }
    assert!(s.pending.len() <= MAX_PENDING + 1);
    assert!(s.ops.len() <= MAX_PENDING + 1);
    assert!(s.statements.len() <= MAX_STATEMENTS && s.portals.len() <= MAX_PORTALS);
    assert!(s.events.len() <= MAX_EVENTS);
}

/// The same capture with every chunk cut to its first `prefix` bytes (and
/// its last `tail` bytes), the original length kept, as the kernel side
/// captures.
fn truncated(chunks: &[Chunk], prefix: usize) -> Vec<Chunk> {
    truncated_with_tail(chunks, prefix, 0)
}

fn truncated_with_tail(chunks: &[Chunk], prefix: usize, tail: usize) -> Vec<Chunk> {
    chunks
        .iter()
        .map(|c| {
            assert_eq!(c.bytes.len(), c.len, "a whole chunk to cut");
            Chunk {
                bytes: c.bytes[..c.len.min(prefix)].to_vec(),
                tail: c.bytes[c.len - c.len.min(tail)..].to_vec(),
                ..c.clone()
            }
        })
        .collect()
}

fn ok(o: &Outcome) {
    assert_eq!(o.stats.parse_errors, 0, "{:?}", o.stats);
    assert_eq!(o.stats.framing_lost, 0, "{:?}", o.stats);
    for e in &o.events {
        assert!(e.start_ns <= e.end_ns, "{e:?}");
    }
}

const PGBENCH_SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = ?";

#[test]
fn psql_simple_queries() {
    let o = run(&fixture!("psql_simple"), PgStream::new);
    ok(&o);
    assert_eq!(
        o.templates(),
        [
            "SELECT ?",
            "CREATE TEMP TABLE t (id int PRIMARY KEY, email text)",
            "INSERT INTO t VALUES (?)",
            "INSERT INTO t VALUES (?)",
            "SELECT email FROM t WHERE id = ?",
            "SELECT email FROM t WHERE id IN (?)",
            "UPDATE t SET email = ? WHERE id = ?",
            "DELETE FROM t WHERE id = ?",
            "WITH d AS (SELECT ? AS x) SELECT x FROM d",
            "DO ?",
        ]
    );
    let ops: Vec<_> = o.events.iter().map(|e| e.operation.as_str()).collect();
    assert_eq!(
        ops,
        [
            "SELECT", "CREATE", "INSERT", "INSERT", "SELECT", "SELECT", "UPDATE", "DELETE",
            "SELECT", "DO"
        ]
    );
    let rows: Vec<_> = o.events.iter().map(|e| e.rows).collect();
    assert_eq!(
        rows,
        [
            Some(1),
            None,
            Some(1),
            Some(2),
            Some(1),
            Some(3),
            Some(1),
            Some(1),
            Some(1),
            None
        ]
    );
    assert!(
        o.events
            .iter()
            .all(|e| e.status == Status::Ok && e.protocol == Protocol::Simple)
    );
    assert!(
        o.events
            .iter()
            .all(|e| !e.template.contains("example") && !e.template.contains("42"))
    );
    let s = o.stream(0);
    assert_eq!(
        (s.database(), s.user()),
        (Some("fixtures"), Some("postgres"))
    );
    assert_eq!(
        s.state(),
        StreamState::Terminated,
        "SSLRequest refused, then parsed to the end"
    );
}

#[test]
fn errors_carry_their_sqlstate_in_both_protocols() {
    let simple = run(&fixture!("errors_simple"), PgStream::new);
    ok(&simple);
    assert_eq!(simple.sqlstates(), ["42601", "23505", "22012"]);
    assert_eq!(simple.events.len(), 6);
    assert_eq!(simple.events[0].template.as_ref(), "SELEC ?");
    assert_eq!(simple.events[5].status, Status::Ok);

    let extended = run(&fixture!("errors_extended"), PgStream::new);
    ok(&extended);
    assert_eq!(extended.sqlstates(), ["42601", "23505", "22012"]);
    let summary: Vec<_> = extended
        .events
        .iter()
        .map(|e| (&*e.template, e.status, e.sqlstate.map(|s| s.to_string())))
        .collect();
    assert_eq!(
        summary,
        [
            ("CREATE TEMP TABLE u (id int PRIMARY KEY)", Status::Ok, None),
            ("SELEC ?", Status::Error, Some("42601".into())),
            ("INSERT INTO u VALUES (?)", Status::Ok, None),
            (
                "INSERT INTO u VALUES (?)",
                Status::Error,
                Some("23505".into())
            ),
            ("SELECT ? / ?", Status::Error, Some("22012".into())),
            ("SELECT ?::int", Status::Ok, None),
        ]
    );
}

#[test]
fn copy_in_and_out_are_one_operation_each() {
    let o = run(&fixture!("copy"), PgStream::new);
    ok(&o);
    let summary: Vec<_> = o
        .events
        .iter()
        .map(|e| (&*e.template, e.operation, e.rows))
        .collect();
    assert_eq!(
        summary,
        [
            (
                "CREATE TEMP TABLE c (a int, b text)",
                Operation::Create,
                None
            ),
            ("COPY c FROM STDIN", Operation::Copy, Some(3)),
            ("COPY c TO STDOUT", Operation::Copy, Some(3)),
            (
                "COPY (SELECT a FROM c WHERE a > ?) TO STDOUT WITH (FORMAT csv)",
                Operation::Copy,
                Some(2)
            ),
            ("SELECT count(*) FROM c", Operation::Select, Some(1)),
        ]
    );
}

#[test]
fn pgbench_select_count_matches_in_every_mode() {
    for (name, chunks) in [
        ("simple", fixture!("pgbench_simple")),
        ("extended", fixture!("pgbench_extended")),
        ("prepared", fixture!("pgbench_prepared")),
    ] {
        let o = run(&chunks, PgStream::new);
        ok(&o);
        // -c 2 -t 5: ten transactions of the select-only script.
        assert_eq!(o.count(PGBENCH_SELECT), 10, "{name}: {:?}", o.templates());
        // pgbench's own setup on its first connection: the scale check
        // and the partitioning check.
        assert_eq!(
            o.count("select count(*) from pgbench_branches"),
            1,
            "{name}"
        );
        assert_eq!(o.events.len(), 12, "{name}: {:?}", o.templates());
        assert!(
            o.events
                .iter()
                .all(|e| e.status == Status::Ok && e.rows == Some(1)),
            "{name}"
        );
        let protocol = if name == "simple" {
            Protocol::Simple
        } else {
            Protocol::Extended
        };
        assert!(
            o.events
                .iter()
                .filter(|e| &*e.template == PGBENCH_SELECT)
                .all(|e| e.protocol == protocol)
        );
    }
}

#[test]
fn pipelined_statements_pair_in_order() {
    let o = run(&fixture!("pipeline"), PgStream::new);
    ok(&o);
    let insert = "INSERT INTO p (id, v) VALUES (?)";
    let select = "SELECT v FROM p WHERE id = ?";
    let update = "UPDATE p SET v = ? WHERE id = ?";
    let mut expected = vec!["CREATE TEMP TABLE p (id int PRIMARY KEY, v text)"];
    for _ in 0..10 {
        expected.extend([insert, select, update]);
    }
    assert_eq!(o.templates(), expected);
    for e in &o.events[1..] {
        let want = match &*e.template {
            t if t == insert => "INSERT",
            t if t == select => "SELECT",
            _ => "UPDATE",
        };
        assert_eq!(
            (e.operation.as_str(), e.rows, e.status),
            (want, Some(1), Status::Ok)
        );
    }
    // Pipelined: requests leave before earlier replies come back.
    let overlapping = o
        .events
        .windows(2)
        .filter(|w| w[1].start_ns < w[0].end_ns)
        .count();
    assert!(overlapping > 0, "the capture was not pipelined");
}

#[test]
fn an_error_in_a_pipeline_skips_to_the_sync() {
    let o = run(&fixture!("pipeline_error"), PgStream::new);
    ok(&o);
    let summary: Vec<_> = o
        .events
        .iter()
        .map(|e| (&*e.template, e.sqlstate.map(|s| s.to_string())))
        .collect();
    assert_eq!(
        summary,
        [
            ("SELECT ?::int AS a", None),
            ("SELECT ?::int AS b", None),
            ("SELECT ? / ? AS c", Some("22012".into())),
            // d and e were skipped by the server: never executed.
            ("SELECT ?::int AS f", None),
        ]
    );
}

#[test]
fn raw_protocol_corners() {
    let o = run(&fixture!("raw"), PgStream::new);
    ok(&o);
    let summary: Vec<_> = o
        .events
        .iter()
        .map(|e| {
            (
                &*e.template,
                e.operation,
                e.rows,
                e.sqlstate.map(|s| s.to_string()),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("", Operation::Empty, None, None),
            // Two statements in one Query: one event, rows summed.
            ("SELECT ?; SELECT ?, ?", Operation::Select, Some(2), None),
            // A statement prepared once (no event), executed twice.
            ("SELECT ?::int + ?", Operation::Select, Some(1), None),
            ("SELECT ?::int + ?", Operation::Select, Some(1), None),
            // A portal fetched in two Executes: PortalSuspended, then done.
            (
                "SELECT generate_series(?, ?)",
                Operation::Select,
                Some(1),
                None
            ),
            (
                "SELECT generate_series(?, ?)",
                Operation::Select,
                Some(1),
                None
            ),
            (
                "SELECT pg_sleep(?)",
                Operation::Select,
                None,
                Some("57014".into())
            ),
        ]
    );
    let main = o.stream(0);
    assert_eq!(
        main.database(),
        Some("postgres"),
        "no database: the user's name"
    );
    assert_eq!(main.state(), StreamState::Terminated);
    assert_eq!(main.in_flight(), 0);
    assert_eq!(o.stream(1).state(), StreamState::Cancel);
}

#[test]
fn accepted_ssl_is_counted_not_parsed() {
    let o = run(&fixture!("ssl"), PgStream::new);
    assert!(o.events.is_empty());
    assert_eq!(o.stats.parse_errors, 0);
    assert_eq!(o.stream(0).state(), StreamState::Encrypted);
}

#[test]
fn large_messages_are_skipped_by_length() {
    // Every chunk over 512 bytes was stored as its first 512 and its last
    // 64, as the kernel side captures them.
    let chunks = fixture!("large");
    let with_tails = run_with(&chunks, PgStream::new, true);
    ok(&with_tails);
    let summary: Vec<_> = with_tails
        .events
        .iter()
        .map(|e| (&*e.template, e.status, e.rows))
        .collect();
    assert_eq!(
        summary,
        [
            // 1 MiB of SQL: the first 16 KiB are kept, cut inside the literal.
            ("SELECT length( …", Status::Ok, Some(1)),
            ("SELECT ?", Status::Ok, Some(1)),
            ("CREATE TEMP TABLE big (v text)", Status::Ok, None),
            // A 200 kB parameter, then Describe/Execute/Sync in the tail.
            ("INSERT INTO big VALUES (?)", Status::Ok, Some(1)),
            // A 300 kB row, then CommandComplete/ReadyForQuery in the tail.
            ("SELECT repeat(?, ?)", Status::Ok, Some(1)),
            ("SELECT ?::int", Status::Ok, Some(1)),
        ]
    );
    // Prefixes only: the messages after a long one are unseen, so those two
    // statements go unreported (never misreported), and the next pair again.
    let prefixes = run(&chunks, PgStream::new);
    assert_eq!(prefixes.stats.parse_errors, 0, "{:?}", prefixes.stats);
    assert_eq!(prefixes.stats.framing_lost, 2, "{:?}", prefixes.stats);
    assert_eq!(
        prefixes.templates(),
        [
            "SELECT length( …",
            "SELECT ?",
            "CREATE TEMP TABLE big (v text)",
            "SELECT ?::int"
        ]
    );
}

/// The events of a truncated or partial capture must be events of the
/// whole one, in the same order: a statement is reported right, or not at
/// all. A template may be cut (` …`) where the capture cut its SQL.
fn assert_subsequence(part: &[QueryEvent], whole: &[QueryEvent], what: &str) {
    let mut rest = whole.iter();
    for e in part {
        let found = rest.by_ref().any(|w| {
            let template =
                w.template == e.template || e.template.ends_with(super::super::normalize::ELLIPSIS);
            template
                && (w.operation, w.status, w.sqlstate, w.start_ns)
                    == (e.operation, e.status, e.sqlstate, e.start_ns)
        });
        assert!(found, "{what}: {e:?} is not an event of the whole capture");
    }
}

fn all_fixtures() -> Vec<(&'static str, Vec<Chunk>)> {
    vec![
        ("psql_simple", fixture!("psql_simple")),
        ("errors_simple", fixture!("errors_simple")),
        ("errors_extended", fixture!("errors_extended")),
        ("copy", fixture!("copy")),
        ("pgbench_simple", fixture!("pgbench_simple")),
        ("pgbench_extended", fixture!("pgbench_extended")),
        ("pgbench_prepared", fixture!("pgbench_prepared")),
        ("pipeline", fixture!("pipeline")),
        ("pipeline_error", fixture!("pipeline_error")),
        ("raw", fixture!("raw")),
    ]
}

#[test]
fn a_64_byte_prefix_keeps_framing_and_never_misreports() {
    for (name, chunks) in all_fixtures() {
        let whole = run(&chunks, PgStream::new);
        let cut = run(&truncated(&chunks, 64), PgStream::new);
        assert_eq!(cut.stats.parse_errors, 0, "{name}: {:?}", cut.stats);
        assert_subsequence(&cut.events, &whole.events, name);
        let expected = match name {
            // Each request and reply fits its headers in 64 bytes, or loses
            // only a ReadyForQuery after its CommandComplete.
            "pgbench_simple" | "pgbench_prepared" => Some(whole.count(PGBENCH_SELECT)),
            // Parse/Bind/Describe/Execute/Sync in one write: the Execute is
            // past the prefix.
            "pgbench_extended" => Some(0),
            _ => None,
        };
        if let Some(n) = expected {
            assert_eq!(
                cut.count(PGBENCH_SELECT),
                n,
                "{name}: {:?}",
                cut.templates()
            );
        }
        if name == "errors_simple" || name == "copy" {
            assert_eq!(cut.events.len(), whole.events.len(), "{name}");
            assert_eq!(cut.sqlstates(), whole.sqlstates(), "{name}");
        }
    }
}

#[test]
fn a_64_byte_prefix_and_tail_keep_every_count_but_deep_pipelines() {
    for (name, chunks) in all_fixtures() {
        let whole = run(&chunks, PgStream::new);
        let cut = run_with(&truncated_with_tail(&chunks, 64, 64), PgStream::new, true);
        assert_eq!(cut.stats.parse_errors, 0, "{name}: {:?}", cut.stats);
        assert_subsequence(&cut.events, &whole.events, name);
        if name.starts_with("pipeline") {
            // Many requests in one write: the middle ones are unseen.
            continue;
        }
        assert_eq!(
            cut.events.len(),
            whole.events.len(),
            "{name}: {:?}",
            cut.templates()
        );
        assert_eq!(
            cut.count(PGBENCH_SELECT),
            whole.count(PGBENCH_SELECT),
            "{name}"
        );
        assert_eq!(cut.sqlstates(), whole.sqlstates(), "{name}");
    }
}

/// One connection of a capture, as seen by an agent that started in the
/// middle of chunk `from`, `skip` bytes into it.
fn attached_at(chunks: &[Chunk], from: usize, skip: usize) -> Vec<Chunk> {
    let mut out: Vec<Chunk> = chunks[from..].to_vec();
    let first = &mut out[0];
    let skip = skip.min(first.bytes.len());
    first.bytes.drain(..skip);
    first.len -= skip;
    out
}

#[test]
fn attaching_mid_stream_counts_what_follows() {
    for (name, chunks) in all_fixtures() {
        let conns: Vec<u32> = {
            let mut c: Vec<u32> = chunks.iter().map(|c| c.conn).collect();
            c.dedup();
            c
        };
        for conn in conns {
            let one: Vec<Chunk> = chunks.iter().filter(|c| c.conn == conn).cloned().collect();
            let whole = run(&one, PgStream::new);
            for from in 1..one.len() {
                for skip in [0, 1, 3, 7] {
                    let what = format!("{name} conn {conn} from chunk {from} +{skip}");
                    let part = attached_at(&one, from, skip);
                    let o = run(&part, PgStream::mid_stream);
                    assert_eq!(o.stats.parse_errors, 0, "{what}: {:?}", o.stats);
                    let attach = part[0].ts;
                    let settled = whole
                        .events
                        .iter()
                        .find(|e| e.end_ns >= attach)
                        .map(|e| e.end_ns);
                    if name.starts_with("pipeline") {
                        // Requests in flight unseen, then requests of the
                        // same shape seen: their replies are ambiguous (see
                        // the module doc). After that group, pairing is exact.
                        let after = |events: &[QueryEvent]| -> Vec<QueryEvent> {
                            events
                                .iter()
                                .filter(|e| settled.is_some_and(|t| e.start_ns > t))
                                .cloned()
                                .collect()
                        };
                        assert_eq!(after(&o.events), after(&whole.events), "{what}");
                        continue;
                    }
                    // Exactly the last events of the whole capture.
                    let tail = &whole.events
                        [whole.events.len() - o.events.len().min(whole.events.len())..];
                    assert_eq!(o.events, tail, "{what}");
                    // And every statement sent after the first reply that
                    // completed once the agent was there.
                    let owed = whole
                        .events
                        .iter()
                        .filter(|e| settled.is_some_and(|t| e.start_ns > t))
                        .count();
                    // (A statement prepared before the agent came is paired
                    // and counted apart: its SQL was never seen.)
                    let unknown = o.stats.unknown_statements as usize;
                    assert!(
                        o.events.len() + unknown >= owed,
                        "{what}: {} events, {unknown} unknown, {owed} owed",
                        o.events.len()
                    );
                }
            }
        }
    }
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn random_and_mangled_input_never_panics() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let fixtures = all_fixtures();
    for round in 0..300 {
        let mut stream = if round % 2 == 0 {
            PgStream::new()
        } else {
            PgStream::mid_stream()
        };
        if round % 3 == 0 {
            // Pure noise, in random pieces, claimed longer than captured.
            for _ in 0..50 {
                let n = rng.below(300);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                let original = n + if rng.below(4) == 0 {
                    rng.below(1 << 20)
                } else {
                    0
                };
                let dir = if rng.below(2) == 0 {
                    Direction::FromFrontend
                } else {
                    Direction::FromBackend
                };
                stream.feed(dir, &bytes, original, round);
                stream.drain_events().for_each(drop);
                check_bounds(&stream);
            }
            continue;
        }
        // A real capture with flipped bytes, dropped ranges and random cuts.
        let (_, chunks) = &fixtures[rng.below(fixtures.len())];
        for c in chunks.iter().filter(|c| c.conn == 0) {
            let mut bytes = c.bytes.clone();
            for _ in 0..rng.below(3) {
                if !bytes.is_empty() {
                    let i = rng.below(bytes.len());
                    bytes[i] = rng.next() as u8;
                }
            }
            if rng.below(5) == 0 && !bytes.is_empty() {
                let at = rng.below(bytes.len());
                bytes.drain(at..(at + rng.below(20)).min(bytes.len()));
            }
            let keep = bytes.len().min(rng.below(bytes.len() + 1).max(1));
            stream.feed_with_tail(c.dir, &bytes[..keep], &bytes[keep..], bytes.len(), c.ts);
            stream.drain_events().for_each(drop);
            check_bounds(&stream);
        }
    }
}

#[test]
fn literals_never_surface_whatever_the_capture_cuts() {
    // The literals psql_simple sends: e-mail addresses and numbers.
    let chunks = fixture!("psql_simple");
    let mut rng = Rng(7);
    for _ in 0..200 {
        let mut s = PgStream::new();
        for c in &chunks {
            let prefix = rng.below(c.bytes.len() + 1);
            let tail = rng.below(c.bytes.len() - prefix + 1);
            s.feed_with_tail(
                c.dir,
                &c.bytes[..prefix],
                &c.bytes[c.len - tail..],
                c.len,
                c.ts,
            );
            for e in s.drain_events() {
                for literal in ["alice", "bob", "carol", "example", "42"] {
                    assert!(!e.template.contains(literal), "{e:?}");
                }
            }
        }
    }
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn startup() -> Vec<u8> {
    let body = b"\x00\x03\x00\x00user\x00app\x00\x00";
    let mut m = (body.len() as u32 + 4).to_be_bytes().to_vec();
    m.extend_from_slice(body);
    m
}

/// A stream past its startup, with the ReadyForQuery that ends it.
fn ready() -> PgStream {
    let mut s = PgStream::new();
    let m = startup();
    s.feed(Direction::FromFrontend, &m, m.len(), 1);
    let mut r = message(b'R', &[0, 0, 0, 0]);
    r.extend(message(b'Z', b"I"));
    s.feed(Direction::FromBackend, &r, r.len(), 2);
    assert_eq!(s.database(), Some("app"));
    s
}

fn answer(rows: &str) -> Vec<u8> {
    let mut r = message(b'C', format!("SELECT {rows}\0").as_bytes());
    r.extend(message(b'Z', b"I"));
    r
}

#[test]
fn a_2_pow_31_length_is_a_parse_error_then_parsing_resumes() {
    let mut s = ready();
    let mut bad = vec![b'Q'];
    bad.extend_from_slice(&(1u32 << 31).to_be_bytes());
    bad.extend_from_slice(b"SELECT 1\0");
    s.feed(Direction::FromFrontend, &bad, bad.len(), 3);
    assert_eq!(s.parse_errors(), 1);
    assert!(
        s.frontend.msg.is_none() && s.frontend.scan.len() < 64,
        "nothing buffered for it"
    );
    // The error's own reply, then a good query.
    s.feed(
        Direction::FromBackend,
        &message(b'E', b"SERROR\0C08P01\0\0"),
        20,
        4,
    );
    let z = message(b'Z', b"I");
    s.feed(Direction::FromBackend, &z, z.len(), 5);
    let q = message(b'Q', b"SELECT 2\0");
    s.feed(Direction::FromFrontend, &q, q.len(), 6);
    let a = answer("1");
    s.feed(Direction::FromBackend, &a, a.len(), 7);
    let events: Vec<_> = s.drain_events().collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (&*events[0].template, events[0].start_ns, events[0].end_ns),
        ("SELECT ?", 6, 7)
    );
}

#[test]
fn a_1_mib_query_keeps_16_kib() {
    let mut s = ready();
    let mut sql = b"SELECT '".to_vec();
    sql.extend(std::iter::repeat_n(b'x', 1 << 20));
    sql.extend_from_slice(b"'\0");
    let q = message(b'Q', &sql);
    // Delivered in 64 KiB reads, each captured whole.
    for (i, part) in q.chunks(1 << 16).enumerate() {
        s.feed(Direction::FromFrontend, part, part.len(), 10 + i as u64);
        let kept = s.frontend.msg.as_ref().map_or(0, |m| m.body.len());
        assert!(kept <= MAX_SQL + MAX_NAME, "{kept}");
    }
    let a = answer("1");
    s.feed(Direction::FromBackend, &a, a.len(), 100);
    let events: Vec<_> = s.drain_events().collect();
    assert_eq!(events.len(), 1);
    assert_eq!(&*events[0].template, "SELECT …");
    assert_eq!((events[0].start_ns, events[0].end_ns), (10, 100));
}

#[test]
fn a_connection_killed_mid_message_or_mid_reply_reports_nothing() {
    let mut s = ready();
    let q = message(b'Q', b"SELECT pg_sleep(10)\0");
    s.feed(Direction::FromFrontend, &q[..9], q.len(), 3);
    assert_eq!(s.drain_events().count(), 0);
    let mut s = ready();
    s.feed(Direction::FromFrontend, &q, q.len(), 3);
    let partial = message(b'T', b"\x00\x01pg_sleep\x00\x00\x00\x00\x00\x00\x00\x00\x00\x08\xe6\x00\x04\xff\xff\xff\xff\x00\x00");
    s.feed(Direction::FromBackend, &partial[..10], partial.len(), 4);
    assert_eq!(s.drain_events().count(), 0);
    assert_eq!(s.in_flight(), 1);
    assert_eq!(s.parse_errors(), 0);
}

#[test]
fn gssapi_and_direct_tls_encryption_stop_parsing() {
    let mut s = PgStream::new();
    let gss = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
    s.feed(Direction::FromFrontend, &gss, 8, 1);
    s.feed(Direction::FromBackend, b"G", 1, 2);
    assert_eq!(s.state(), StreamState::Encrypted);
    let mut s = PgStream::new();
    s.feed(
        Direction::FromFrontend,
        &[0x16, 0x03, 0x01, 0x02, 0x00],
        517,
        1,
    );
    assert_eq!(s.state(), StreamState::Encrypted);
}

#[test]
fn random_bytes_from_the_first_byte_are_dropped_from_parsing() {
    let mut rng = Rng(42);
    let mut s = PgStream::new();
    for i in 0..600 {
        let bytes: Vec<u8> = (0..4096).map(|_| rng.next() as u8).collect();
        s.feed(Direction::FromFrontend, &bytes, bytes.len(), i);
        check_bounds(&s);
    }
    assert!(s.parse_errors() >= 1);
    assert_eq!(s.state(), StreamState::Abandoned);
    assert_eq!(s.drain_events().count(), 0);
}

#[test]
fn requests_without_replies_are_capped() {
    // Only one direction captured: requests pile up, never past the cap.
    let mut s = ready();
    let q = message(b'Q', b"SELECT 1\0");
    for i in 0..(MAX_PENDING as u64 + 100) {
        s.feed(Direction::FromFrontend, &q, q.len(), 10 + i);
        check_bounds(&s);
    }
    assert!(s.in_flight() <= MAX_PENDING + 1);
    assert_eq!(s.parse_errors(), 1);
    assert_eq!(s.drain_events().count(), 0);
}

#[test]
fn copy_both_ends_with_its_command_complete() {
    // Replication-style CopyBoth through the extended protocol.
    let mut s = ready();
    let mut req = message(b'P', b"\0START_REPLICATION SLOT s LOGICAL 0/0\0\0\0");
    req.extend(message(b'B', b"\0\0\0\0\0\0\0\0"));
    req.extend(message(b'E', b"\0\0\0\0\0"));
    req.extend(message(b'S', b""));
    s.feed(Direction::FromFrontend, &req, req.len(), 10);
    let mut rep = message(b'1', b"");
    rep.extend(message(b'2', b""));
    rep.extend(message(b'W', b"\0\0\0"));
    rep.extend(message(b'd', b"wal bytes"));
    s.feed(Direction::FromBackend, &rep, rep.len(), 11);
    let fb = message(b'd', b"standby status");
    s.feed(Direction::FromFrontend, &fb, fb.len(), 12);
    let mut end = message(b'c', b"");
    end.extend(message(b'C', b"START_REPLICATION\0"));
    end.extend(message(b'Z', b"I"));
    s.feed(Direction::FromBackend, &end, end.len(), 13);
    let events: Vec<_> = s.drain_events().collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0].start_ns, events[0].end_ns, events[0].status),
        (10, 13, Status::Ok)
    );
    assert_eq!(s.in_flight(), 0);
    assert_eq!(s.parse_errors(), 0);
}
