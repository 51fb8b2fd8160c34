//! The parser held to real captures of PostgreSQL 15 (`fixtures/*.pgw`,
//! recorded by `fixtures/record.py` between real clients and a real
//! server): each scenario's ground truth is what its client sent.

use std::collections::BTreeMap;

use super::{
    conn::{Completed, PgConnection, Role},
    sql,
    wire::{Segment, Side},
};

pub(crate) struct Chunk {
    pub(crate) conn: u32,
    pub(crate) side: Side,
    pub(crate) ts: u64,
    pub(crate) len: u64,
    pub(crate) head: Vec<u8>,
    pub(crate) tail: Vec<u8>,
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

pub(crate) fn load(name: &str) -> Vec<Chunk> {
    let path = format!("{}/src/queries/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Chunk {
                conn: f[0].parse().expect("conn"),
                side: if f[1] == "F" {
                    Side::Frontend
                } else {
                    Side::Backend
                },
                ts: f[2].parse().expect("ts"),
                len: f[3].parse().expect("len"),
                head: f.get(4).map(|h| hex(h)).unwrap_or_default(),
                tail: f.get(5).map(|h| hex(h)).unwrap_or_default(),
            }
        })
        .collect()
}

/// How much of each chunk the parser is shown.
#[derive(Clone, Copy)]
enum Cut {
    /// What the fixture holds (everything, or prefix + tail when it was big).
    AsRecorded,
    /// Only the first N bytes and the last M, as a small `--capture-bytes`.
    PrefixTail(usize, usize),
}

struct Replay {
    done: Vec<Completed>,
    conns: BTreeMap<u32, PgConnection>,
}

fn replay(name: &str, cut: Cut) -> Replay {
    let mut conns: BTreeMap<u32, PgConnection> = BTreeMap::new();
    let mut done = Vec::new();
    for c in load(name) {
        let conn = conns
            .entry(c.conn)
            .or_insert_with(|| PgConnection::new(Role::Client, true));
        // The full bytes, when the fixture has them.
        let full = c.tail.is_empty() && c.head.len() as u64 == c.len;
        let (head, tail): (Vec<u8>, Vec<u8>) = match cut {
            Cut::AsRecorded => (c.head.clone(), c.tail.clone()),
            Cut::PrefixTail(p, t) if full => {
                let p = p.min(c.head.len());
                let t = t.min(c.head.len() - p);
                (c.head[..p].to_vec(), c.head[c.head.len() - t..].to_vec())
            }
            Cut::PrefixTail(..) => (c.head.clone(), c.tail.clone()),
        };
        let seen = (head.len() + tail.len()) as u64;
        let mut segs = vec![Segment::Bytes(&head)];
        if c.len > seen {
            segs.push(Segment::Gap(c.len - seen));
        }
        if !tail.is_empty() {
            segs.push(Segment::Bytes(&tail));
        }
        conn.feed(c.side, &segs, c.ts, &mut done);
    }
    Replay { done, conns }
}

fn templates(done: &[Completed]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for d in done {
        *m.entry(sql::template(&d.sql)).or_default() += 1;
    }
    m
}

fn errors(done: &[Completed]) -> Vec<String> {
    done.iter().filter_map(|d| d.error.clone()).collect()
}

const PGBENCH: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = ?";

#[test]
fn pgbench_in_every_protocol_mode() {
    for mode in ["simple", "extended", "prepared"] {
        let r = replay(&format!("pgbench_{mode}.pgw"), Cut::AsRecorded);
        let t = templates(&r.done);
        assert_eq!(t.get(PGBENCH), Some(&10), "{mode}: {t:?}");
        assert!(errors(&r.done).is_empty(), "{mode}");
        assert_eq!(
            t.get("select count(*) from pgbench_branches"),
            Some(&1),
            "{mode}"
        );
        assert!(r.conns.values().all(|c| c.parse_errors() == 0), "{mode}");
        assert!(
            r.conns
                .values()
                .all(|c| c.database.as_deref() == Some("fixtures"))
        );
        assert!(r.done.iter().all(|d| d.end_ns >= d.start_ns));
    }
}

#[test]
fn framing_survives_small_captures() {
    // Every write of pgbench simple and prepared holds one request, so a
    // 64-byte prefix and tail still show every message header that matters.
    for mode in ["simple", "prepared"] {
        let r = replay(&format!("pgbench_{mode}.pgw"), Cut::PrefixTail(64, 64));
        assert_eq!(templates(&r.done).get(PGBENCH), Some(&10), "{mode}");
        assert!(errors(&r.done).is_empty());
    }
}

#[test]
fn errors_by_sqlstate_in_both_protocols() {
    for name in ["errors_simple.pgw", "errors_extended.pgw"] {
        let r = replay(name, Cut::AsRecorded);
        let mut e = errors(&r.done);
        e.sort();
        assert_eq!(e, ["22012", "23505", "42601"], "{name}");
        assert!(
            r.done.iter().filter(|d| d.error.is_none()).count() >= 3,
            "{name}"
        );
    }
}

#[test]
fn psycopg_pipeline_pairs_in_order() {
    let r = replay("pipeline.pgw", Cut::AsRecorded);
    let t = templates(&r.done);
    let by_op = |op: &str| {
        t.iter()
            .filter(|(k, _)| sql::operation(k) == op)
            .map(|(_, v)| *v)
            .sum::<usize>()
    };
    assert_eq!(by_op("INSERT"), 10, "{t:?}");
    assert_eq!(by_op("SELECT"), 10, "{t:?}");
    assert_eq!(by_op("UPDATE"), 10, "{t:?}");
    assert!(errors(&r.done).is_empty());
}

#[test]
fn pipeline_error_skips_what_the_server_skipped() {
    let r = replay("pipeline_error.pgw", Cut::AsRecorded);
    assert_eq!(errors(&r.done), ["22012"]);
    // a, b, c (failed), then f: d and e never ran.
    let failed = r
        .done
        .iter()
        .position(|d| d.error.is_some())
        .expect("error");
    assert_eq!(
        failed,
        2,
        "{:?}",
        r.done.iter().map(|d| &d.sql).collect::<Vec<_>>()
    );
    assert_eq!(r.done.len(), 4);
}

#[test]
fn copy_is_one_operation_each() {
    let r = replay("copy.pgw", Cut::AsRecorded);
    let copies = r
        .done
        .iter()
        .filter(|d| sql::operation(&sql::template(&d.sql)) == "COPY")
        .count();
    assert_eq!(copies, 3);
    assert!(errors(&r.done).is_empty());
}

#[test]
fn psql_session_without_literals() {
    let r = replay("psql_simple.pgw", Cut::AsRecorded);
    assert_eq!(r.done.len(), 10, "{:?}", templates(&r.done));
    for t in templates(&r.done).keys() {
        assert!(!t.contains('@') && !t.contains("example"), "{t}");
    }
}

#[test]
fn tls_is_counted_not_parsed() {
    let r = replay("ssl.pgw", Cut::AsRecorded);
    assert!(r.conns.values().any(|c| c.encrypted));
    assert!(r.done.is_empty());
}

#[test]
fn large_statements_and_rows_are_skipped_by_length() {
    let r = replay("large.pgw", Cut::AsRecorded);
    assert!(r.conns.values().all(|c| c.parse_errors() == 0));
    let t = templates(&r.done);
    assert!(
        t.contains_key("SELECT ?") || t.contains_key("SELECT ?::int"),
        "{t:?}"
    );
    assert_eq!(r.done.len(), 6, "{t:?}");
    assert!(t.keys().all(|k| !k.contains("xxxx")));
}

#[test]
fn hand_written_frontend_corner_cases() {
    let r = replay("raw.pgw", Cut::AsRecorded);
    assert!(r.conns.values().all(|c| c.parse_errors() == 0));
    // The cancelled pg_sleep reports the server's 57014.
    assert!(
        errors(&r.done).contains(&"57014".to_owned()),
        "{:?}",
        errors(&r.done)
    );
    // No database in the StartupMessage: the server uses the user's name.
    assert!(
        r.conns
            .values()
            .any(|c| c.database.as_deref() == c.user.as_deref())
    );
}

#[test]
fn pipelined_statements_split_their_wait_from_their_service() {
    // psql waits for each reply: nothing is ever queued.
    let serial = replay("psql_simple.pgw", Cut::AsRecorded);
    assert!(serial.done.iter().all(|d| d.queued_ns == 0));
    // psycopg's pipeline sends the batch before the first reply: the later
    // statements of it wait for the earlier ones, and what is left of each
    // (its service) follows the previous completion, never overlapping it.
    let piped = replay("pipeline.pgw", Cut::AsRecorded);
    assert!(piped.done.iter().filter(|d| d.queued_ns > 0).count() >= 10);
    let mut last_end = 0;
    for d in &piped.done {
        assert!(d.queued_ns <= d.end_ns - d.start_ns, "{d:?}");
        let served_from = d.start_ns + d.queued_ns;
        assert!(
            served_from >= last_end.min(d.end_ns),
            "{d:?} after {last_end}"
        );
        if d.queued_ns > 0 {
            assert_eq!(served_from, last_end, "{d:?}");
        }
        last_end = last_end.max(d.end_ns);
    }
}
