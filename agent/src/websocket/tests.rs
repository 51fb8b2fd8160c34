//! Fed with real captures (see `fixtures/README.md`): the expectations are
//! what `fixtures/record.py` sent, and the truth it decoded from the same
//! bytes with `websockets`' own frame parser.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{
    frame::WsFrame,
    http::{FirstBytes, Method, classify_first_bytes},
    stream::{StreamState, WebStream},
    *,
};

/// One captured read or write, or the connection's end.
#[derive(Clone, Debug)]
pub(crate) enum Record {
    Data {
        conn: u32,
        from_client: bool,
        ts: u64,
        /// The syscall's full length; `bytes` may be only its first bytes.
        len: usize,
        bytes: Vec<u8>,
    },
    Closed {
        conn: u32,
        ts: u64,
    },
}

pub(crate) struct Capture {
    pub(crate) records: Vec<Record>,
    pub(crate) truth: Value,
}

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

pub(crate) fn load(text: &str) -> Capture {
    let mut truth = Value::Null;
    let mut records = Vec::new();
    for line in text.lines() {
        if let Some(json) = line.strip_prefix("#! ") {
            truth = serde_json::from_str(json).expect("truth line");
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(' ').collect();
        let conn = f[0].parse().expect("conn");
        let ts = f[2].parse().expect("ts");
        records.push(if f[1] == "X" {
            Record::Closed { conn, ts }
        } else {
            Record::Data {
                conn,
                from_client: f[1] == "C",
                ts,
                len: f[3].parse().expect("len"),
                bytes: unhex(f.get(4).copied().unwrap_or("")),
            }
        });
    }
    Capture { records, truth }
}

macro_rules! capture {
    ($name:literal) => {
        load(include_str!(concat!("fixtures/", $name, ".cap")))
    };
}

/// Where an HTTP head at the start of `bytes` ends.
pub(crate) fn head_len(bytes: &[u8]) -> Option<usize> {
    let is_head =
        bytes.starts_with(b"HTTP/1.") || classify_first_bytes(bytes) == FirstBytes::Request;
    is_head.then(|| {
        bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(bytes.len(), |p| p + 4)
    })
}

/// Every read and write captured to its first `prefix` bytes — not
/// counting the HTTP header block it starts with: the agent's capture is
/// sized for header blocks (16 KiB by default), frames and bodies are what
/// gets cut.
fn cut(records: &[Record], prefix: usize) -> Vec<Record> {
    let mut out = records.to_vec();
    for r in &mut out {
        if let Record::Data { bytes, .. } = r {
            let keep = head_len(bytes).unwrap_or(0) + prefix;
            bytes.truncate(keep);
        }
    }
    out
}

/// Every read and write split into syscalls of `piece` bytes.
fn split(records: &[Record], piece: usize) -> Vec<Record> {
    let mut out = Vec::new();
    for r in records {
        let Record::Data {
            conn,
            from_client,
            ts,
            len,
            bytes,
        } = r
        else {
            out.push(r.clone());
            continue;
        };
        let pieces: Vec<&[u8]> = bytes.chunks(piece).collect();
        let gap = len - bytes.len();
        for (i, p) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            out.push(Record::Data {
                conn: *conn,
                from_client: *from_client,
                ts: *ts,
                len: p.len() + if last { gap } else { 0 },
                bytes: p.to_vec(),
            });
        }
        if pieces.is_empty() {
            out.push(r.clone());
        }
    }
    out
}

/// Consecutive writes of one side merged into one read, as a reader that
/// falls behind sees them. Its timestamp is the last one's.
fn coalesce(records: &[Record]) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::new();
    for r in records {
        if let (
            Some(Record::Data {
                conn: c0,
                from_client: f0,
                ts: t0,
                len: l0,
                bytes: b0,
            }),
            Record::Data {
                conn,
                from_client,
                ts,
                len,
                bytes,
            },
        ) = (out.last_mut(), r)
            && c0 == conn
            && f0 == from_client
        {
            // Only after a read captured whole: what follows a gap would
            // not be captured either, and the framing it carries is lost.
            if *l0 == b0.len() {
                b0.extend_from_slice(bytes);
                *l0 += len;
                *t0 = *ts;
                continue;
            }
        }
        out.push(r.clone());
    }
    out
}

/// The events of each connection, the traced process being `traced`.
struct Run {
    events: BTreeMap<u32, Vec<WebEvent>>,
    streams: BTreeMap<u32, WebStream>,
}

impl Run {
    fn conn(&self, conn: u32) -> &[WebEvent] {
        &self.events[&conn]
    }

    fn all(&self) -> Vec<WebEvent> {
        self.events.values().flatten().cloned().collect()
    }
}

/// Memory a stream may hold: two head buffers at most, or one and what a
/// client sent after an unanswered upgrade.
const MAX_BUFFERED: usize = 2 * 16 * 1024 + 1024;

fn run(records: &[Record], traced: Role) -> Run {
    let mut run = Run {
        events: BTreeMap::new(),
        streams: BTreeMap::new(),
    };
    for r in records {
        let (conn, ts) = match r {
            Record::Data { conn, ts, .. } | Record::Closed { conn, ts } => (*conn, *ts),
        };
        let s = run.streams.entry(conn).or_default();
        match r {
            Record::Data {
                from_client,
                len,
                bytes,
                ..
            } => {
                let direction = if *from_client == (traced == Role::Client) {
                    Direction::Sent
                } else {
                    Direction::Received
                };
                s.feed(direction, bytes, *len, ts);
            }
            Record::Closed { .. } => s.on_connection_closed(ts),
        }
        assert!(s.buffered_bytes() <= MAX_BUFFERED);
        run.events.entry(conn).or_default().extend(s.drain_events());
    }
    run
}

type MessageSummary = (MessageOpcode, u64, u32, bool);

fn messages(events: &[WebEvent], direction: Direction) -> Vec<MessageSummary> {
    events
        .iter()
        .filter_map(|e| match *e {
            WebEvent::Message {
                direction: d,
                opcode,
                size,
                frames,
                compressed,
                ..
            } if d == direction => Some((opcode, size, frames, compressed)),
            _ => None,
        })
        .collect()
}

fn controls(events: &[WebEvent], direction: Direction) -> Vec<(ControlKind, u64)> {
    events
        .iter()
        .filter_map(|e| match *e {
            WebEvent::Control {
                direction: d,
                kind,
                payload_len,
                ..
            } if d == direction => Some((kind, payload_len)),
            _ => None,
        })
        .collect()
}

fn closes(events: &[WebEvent]) -> Vec<(Option<u16>, Option<Role>)> {
    events
        .iter()
        .filter_map(|e| match *e {
            WebEvent::SessionClosed {
                code, closed_by, ..
            } => Some((code, closed_by)),
            _ => None,
        })
        .collect()
}

fn requests(events: &[WebEvent]) -> Vec<&HttpRequest> {
    events
        .iter()
        .filter_map(|e| match e {
            WebEvent::HttpRequest(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn errors(events: &[WebEvent]) -> Vec<ParseError> {
    events
        .iter()
        .filter_map(|e| match e {
            WebEvent::ParseError { error, .. } => Some(error.clone()),
            _ => None,
        })
        .collect()
}

/// Holds every WebSocket connection of `cap` to the recorder's truth.
pub(crate) fn check_truth(cap: &Capture, run: &BTreeMap<u32, Vec<WebEvent>>, traced: Role) {
    let truth = cap.truth["websocket"].as_array().expect("websocket truth");
    for t in truth {
        let conn = t["conn"].as_u64().expect("conn") as u32;
        let events = &run[&conn];
        assert_eq!(t["status"], 101, "conn {conn} was upgraded");
        let opened: Vec<_> = events
            .iter()
            .filter_map(|e| match *e {
                WebEvent::SessionOpened { role, deflate, .. } => Some((role, deflate)),
                _ => None,
            })
            .collect();
        assert_eq!(opened, [(traced, t["deflate"] == true)], "conn {conn}");
        for (side, from) in [("C", true), ("S", false)] {
            let direction = if from == (traced == Role::Client) {
                Direction::Sent
            } else {
                Direction::Received
            };
            let want: Vec<(String, u64, u64, bool)> = t[side]["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .map(|m| {
                    (
                        m[0].as_str().expect("opcode").to_owned(),
                        m[1].as_u64().expect("size"),
                        m[2].as_u64().expect("frames"),
                        m[3].as_bool().expect("compressed"),
                    )
                })
                .collect();
            let got: Vec<(String, u64, u64, bool)> = messages(events, direction)
                .into_iter()
                .map(|(op, size, frames, c)| (op.as_str().to_owned(), size, u64::from(frames), c))
                .collect();
            assert_eq!(got, want, "messages from {side} on conn {conn}");
            let want: Vec<(String, u64, Option<u64>)> = t[side]["controls"]
                .as_array()
                .expect("controls")
                .iter()
                .map(|c| {
                    (
                        c[0].as_str().expect("kind").to_owned(),
                        c[1].as_u64().expect("len"),
                        c.get(2).and_then(Value::as_u64),
                    )
                })
                .collect();
            let got: Vec<(String, u64, Option<u64>)> = controls(events, direction)
                .into_iter()
                .map(|(kind, len)| {
                    let code = match kind {
                        ControlKind::Close { code, .. } => code.map(u64::from),
                        _ => None,
                    };
                    (kind.as_str().to_owned(), len, code)
                })
                .collect();
            assert_eq!(got, want, "control frames from {side} on conn {conn}");
        }
        let first_close = match t["first_close"].as_str() {
            Some("C") => Some(Role::Client),
            Some("S") => Some(Role::Server),
            _ => None,
        };
        let all = closes(events);
        assert_eq!(all.len(), 1, "one session end on conn {conn}: {all:?}");
        assert_eq!(all[0].1, first_close, "who closed first on conn {conn}");
        assert!(errors(events).is_empty(), "{:?}", errors(events));
    }
}

/// Events without their timestamps, for runs whose syscalls differ.
fn untimed(events: &[WebEvent]) -> Vec<WebEvent> {
    events
        .iter()
        .cloned()
        .map(|mut e| {
            match &mut e {
                WebEvent::HttpRequest(r) => {
                    r.start_ns = 0;
                    r.response_head_ns = 0;
                    r.end_ns = 0;
                }
                WebEvent::SessionOpened { ts_ns, .. }
                | WebEvent::Message { ts_ns, .. }
                | WebEvent::Control { ts_ns, .. }
                | WebEvent::ParseError { ts_ns, .. } => *ts_ns = 0,
                WebEvent::SessionClosed {
                    ts_ns, duration_ns, ..
                } => {
                    *ts_ns = 0;
                    *duration_ns = 0;
                }
            }
            e
        })
        .collect()
}

pub(crate) const GOOD_WEBSOCKET: &[(&str, &str)] = &[
    ("ws_echo", include_str!("fixtures/ws_echo.cap")),
    ("ws_fragments", include_str!("fixtures/ws_fragments.cap")),
    (
        "ws_server_close",
        include_str!("fixtures/ws_server_close.cap"),
    ),
    ("ws_ping", include_str!("fixtures/ws_ping.cap")),
    ("ws_abrupt", include_str!("fixtures/ws_abrupt.cap")),
    ("ws_deflate", include_str!("fixtures/ws_deflate.cap")),
    ("ws_raw_frames", include_str!("fixtures/ws_raw_frames.cap")),
    (
        "ws_tungstenite_client",
        include_str!("fixtures/ws_tungstenite_client.cap"),
    ),
    (
        "ws_tungstenite_server",
        include_str!("fixtures/ws_tungstenite_server.cap"),
    ),
];

pub(crate) const GOOD_HTTP: &[(&str, &str)] = &[
    (
        "http_keepalive",
        include_str!("fixtures/http_keepalive.cap"),
    ),
    ("http_chunked", include_str!("fixtures/http_chunked.cap")),
    (
        "http_pipelined",
        include_str!("fixtures/http_pipelined.cap"),
    ),
];

pub(crate) fn check_http_truth(cap: &Capture, run: &BTreeMap<u32, Vec<WebEvent>>, traced: Role) {
    let want: Vec<(String, u64)> = cap.truth["http"]
        .as_array()
        .expect("http truth")
        .iter()
        .map(|r| {
            (
                r[0].as_str().expect("method").to_owned(),
                r[1].as_u64().expect("status"),
            )
        })
        .collect();
    let events = &run[&0];
    let got: Vec<(String, u64)> = requests(events)
        .iter()
        .map(|r| (r.method.as_str().to_owned(), u64::from(r.status_code)))
        .collect();
    assert_eq!(got, want);
    for r in requests(events) {
        assert_eq!(r.role, traced);
        assert!(
            r.start_ns < r.response_head_ns && r.response_head_ns <= r.end_ns,
            "{r:?}"
        );
        assert!(r.duration_ns() > 0);
    }
    assert!(errors(events).is_empty(), "{:?}", errors(events));
}

// --- WebSocket: real sessions against the recorder's truth ---------------------

#[test]
fn every_good_websocket_capture_matches_its_truth_from_both_ends() {
    for (name, text) in GOOD_WEBSOCKET {
        let cap = load(text);
        for traced in [Role::Server, Role::Client] {
            eprintln!("{name}, traced {traced:?}");
            check_truth(&cap, &run(&cap.records, traced).events, traced);
        }
    }
}

#[test]
fn echo_sizes_cover_every_length_encoding() {
    let cap = capture!("ws_echo");
    let run = run(&cap.records, Role::Server);
    let events = run.conn(0);
    use MessageOpcode::{Binary, Text};
    let sent = [
        (Text, 5),
        (Binary, 200),
        (Text, 125),
        (Text, 126),
        (Binary, 65535),
        (Binary, 65536),
        (Binary, 70000),
        (Text, 0),
    ];
    let want: Vec<MessageSummary> = sent.iter().map(|&(op, n)| (op, n, 1, false)).collect();
    assert_eq!(messages(events, Direction::Received), want);
    assert_eq!(messages(events, Direction::Sent), want);
    assert_eq!(closes(events), [(Some(1000), Some(Role::Client))]);
    let close_frames: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            WebEvent::Control {
                kind: ControlKind::Close { code, reason_len },
                direction,
                ..
            } => Some((*direction, *code, *reason_len)),
            _ => None,
        })
        .collect();
    // "bye" from the client, echoed by the server.
    assert_eq!(
        close_frames,
        [
            (Direction::Received, Some(1000), 3),
            (Direction::Sent, Some(1000), 3)
        ]
    );
}

/// The brief's metrics, as an aggregator would build them from the events.
#[derive(Debug, Default)]
struct Tally {
    sessions_total: u64,
    sessions_active: i64,
    messages_total: BTreeMap<(&'static str, &'static str), u64>,
    message_size_sum: BTreeMap<&'static str, u64>,
    closes_total: BTreeMap<(String, &'static str), u64>,
    session_seconds: Vec<f64>,
}

impl Tally {
    fn add(&mut self, e: &WebEvent) {
        match *e {
            WebEvent::SessionOpened { .. } => {
                self.sessions_total += 1;
                self.sessions_active += 1;
            }
            WebEvent::Message {
                direction,
                opcode,
                size,
                ..
            } => {
                *self
                    .messages_total
                    .entry((direction.as_str(), opcode.as_str()))
                    .or_default() += 1;
                *self.message_size_sum.entry(direction.as_str()).or_default() += size;
            }
            WebEvent::SessionClosed {
                code,
                closed_by,
                duration_ns,
                ..
            } => {
                self.sessions_active -= 1;
                let code = code.map_or_else(|| "unknown".to_owned(), |c| c.to_string());
                let initiator = closed_by.map_or("none", Role::as_str);
                *self.closes_total.entry((code, initiator)).or_default() += 1;
                self.session_seconds.push(duration_ns as f64 / 1e9);
            }
            _ => {}
        }
    }
}

#[test]
fn metrics_from_sessions_closed_every_way() {
    let mut tally = Tally::default();
    for (_, text) in GOOD_WEBSOCKET {
        let cap = load(text);
        for e in run(&cap.records, Role::Server).all() {
            tally.add(&e);
        }
    }
    assert_eq!(tally.sessions_total, 9);
    assert_eq!(tally.sessions_active, 0);
    let closes: Vec<_> = tally
        .closes_total
        .iter()
        .map(|((code, who), n)| (code.as_str(), *who, *n))
        .collect();
    assert_eq!(
        closes,
        [
            ("1000", "client", 6),
            ("1001", "client", 1),
            ("1001", "server", 1),
            ("1006", "none", 1)
        ]
    );
    assert!(tally.session_seconds.iter().all(|&s| s > 0.0 && s < 10.0));
    // What the clients sent: echo 8 + fragments 1 + server_close 1 + ping 1
    // + abrupt 3 + deflate 7 + raw 4 + tungstenite client 4 + to the
    // tungstenite server 3.
    let received: u64 = tally
        .messages_total
        .iter()
        .filter(|((d, _), _)| *d == "received")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(received, 32);
    let echo_bytes = 5 + 200 + 125 + 126 + 65535 + 65536 + 70000;
    let abrupt_bytes = 3 + 3 + 5;
    let raw_bytes = 9 + 5 + 7 + 300;
    let deflate_wire: u64 = [51, 14, 13, 15, 15, 22, 7].iter().sum();
    let tungstenite_bytes = 10 + 1000 + 12 + 70000 + 8 + 3000 + 15;
    assert_eq!(
        tally.message_size_sum["received"],
        echo_bytes + 60 + 3 + 10 + abrupt_bytes + deflate_wire + raw_bytes + tungstenite_bytes
    );
}

#[test]
fn fragmented_messages_fold_into_one_with_controls_between() {
    let cap = capture!("ws_raw_frames");
    let r = run(&cap.records, Role::Server);
    let events = r.conn(0);
    let got = messages(events, Direction::Received);
    assert_eq!(got[0], (MessageOpcode::Text, 9, 3, false));
    // The ping and pong came between its first and last frame, and are
    // counted apart.
    let c = controls(events, Direction::Received);
    assert_eq!(
        c[..3],
        [
            (ControlKind::Ping, 2),
            (ControlKind::Pong, 1),
            (ControlKind::Ping, 125)
        ]
    );
    assert_eq!(
        controls(events, Direction::Sent)[..2],
        [(ControlKind::Pong, 2), (ControlKind::Pong, 125)]
    );
    let first_message = events
        .iter()
        .position(|e| matches!(e, WebEvent::Message { .. }))
        .expect("a message");
    let first_control = events
        .iter()
        .position(|e| matches!(e, WebEvent::Control { .. }))
        .expect("a control frame");
    assert!(first_control < first_message);

    let cap = capture!("ws_fragments");
    let r = run(&cap.records, Role::Client);
    let events = r.conn(0);
    // websockets closes a fragmented message with an empty final frame.
    assert_eq!(
        messages(events, Direction::Received),
        [
            (MessageOpcode::Text, 17, 4, false),
            (MessageOpcode::Binary, 60, 1, false)
        ]
    );
    assert_eq!(
        messages(events, Direction::Sent),
        [(MessageOpcode::Binary, 60, 4, false)]
    );
}

#[test]
fn server_close_and_abrupt_drop() {
    let cap = capture!("ws_server_close");
    let events = run(&cap.records, Role::Client)
        .events
        .remove(&0)
        .unwrap_or_default();
    assert_eq!(closes(&events), [(Some(1001), Some(Role::Server))]);

    let cap = capture!("ws_abrupt");
    for traced in [Role::Server, Role::Client] {
        let run = run(&cap.records, traced);
        let events = run.conn(0);
        assert_eq!(closes(events), [(Some(1006), None)]);
        assert_eq!(messages(events, Direction::Received).len(), 3);
        assert!(errors(events).is_empty());
        assert_eq!(run.streams[&0].state(), StreamState::Closed);
    }
}

#[test]
fn a_rust_peer_frames_its_own_way() {
    // tokio-tungstenite wrote the last two frames of its fragmented message
    // in one write; the 70000-byte frame came in two reads.
    let cap = capture!("ws_tungstenite_client");
    let r = run(&cap.records, Role::Client);
    let events = r.conn(0);
    use MessageOpcode::{Binary, Text};
    assert_eq!(
        messages(events, Direction::Sent),
        [
            (Text, 10, 1, false),
            (Binary, 1000, 1, false),
            (Text, 12, 3, false),
            (Binary, 70000, 1, false)
        ]
    );
    assert_eq!(controls(events, Direction::Sent)[0], (ControlKind::Ping, 2));
    assert_eq!(closes(events), [(Some(1001), Some(Role::Client))]);

    // And as the server, answering Python's client.
    let cap = capture!("ws_tungstenite_server");
    let r = run(&cap.records, Role::Server);
    let events = r.conn(0);
    assert_eq!(
        messages(events, Direction::Sent),
        [
            (Text, 8, 1, false),
            (Binary, 3000, 1, false),
            (Text, 15, 1, false)
        ]
    );
    assert_eq!(controls(events, Direction::Sent)[0], (ControlKind::Pong, 2));
    assert_eq!(closes(events), [(Some(1000), Some(Role::Client))]);
}

#[test]
fn ping_pong_are_controls_not_messages() {
    let cap = capture!("ws_ping");
    let run = run(&cap.records, Role::Server);
    let events = run.conn(0);
    assert_eq!(
        controls(events, Direction::Sent)[..2],
        [(ControlKind::Ping, 3), (ControlKind::Pong, 8)]
    );
    assert_eq!(
        controls(events, Direction::Received)[..2],
        [(ControlKind::Pong, 3), (ControlKind::Ping, 8)]
    );
    assert_eq!(
        messages(events, Direction::Received),
        [(MessageOpcode::Text, 10, 1, false)]
    );
}

#[test]
fn permessage_deflate_counts_wire_sizes() {
    let cap = capture!("ws_deflate");
    let run = run(&cap.records, Role::Server);
    let events = run.conn(0);
    assert!(matches!(
        events
            .iter()
            .find(|e| matches!(e, WebEvent::SessionOpened { .. })),
        Some(WebEvent::SessionOpened { deflate: true, .. })
    ));
    let got = messages(events, Direction::Received);
    assert_eq!(got.len(), 7);
    assert!(got.iter().all(|m| m.3), "every message compressed: {got:?}");
    // 5000 zero bytes on the wire as 22.
    assert_eq!(got[5], (MessageOpcode::Binary, 22, 1, true));
}

// --- HTTP ------------------------------------------------------------------------

#[test]
fn every_good_http_capture_matches_its_truth_from_both_ends() {
    for (name, text) in GOOD_HTTP {
        let cap = load(text);
        for traced in [Role::Server, Role::Client] {
            eprintln!("{name}, traced {traced:?}");
            check_http_truth(&cap, &run(&cap.records, traced).events, traced);
        }
    }
}

#[test]
fn hundred_keepalive_requests_on_one_connection() {
    let cap = capture!("http_keepalive");
    let run = run(&cap.records, Role::Server);
    let got = requests(run.conn(0));
    assert_eq!(got.len(), 100);
    let count = |m: Method, s: u16| {
        got.iter()
            .filter(|r| r.method == m && r.status_code == s)
            .count()
    };
    // 100 requests cycling through 13 routes: 8 full rounds and 9 more.
    assert_eq!(count(Method::Get, 200), 8);
    assert_eq!(count(Method::Get, 404), 15);
    assert_eq!(count(Method::Head, 200), 8);
    assert_eq!(count(Method::Get, 204), 8);
    assert_eq!(count(Method::Get, 304), 8);
    assert_eq!(count(Method::Patch, 400), 7);
    assert_eq!(count(Method::Options, 200), 7);
    assert_eq!(count(Method::Get, 302), 7);
    assert_eq!(run.streams[&0].state(), StreamState::Closed);
}

#[test]
fn chunked_pipelined_and_close_delimited_bodies() {
    let cap = capture!("http_chunked");
    let run_ = run(&cap.records, Role::Server);
    let got: Vec<_> = requests(run_.conn(0))
        .iter()
        .map(|r| (r.method, r.status_code))
        .collect();
    assert_eq!(
        got,
        [
            (Method::Get, 200),
            (Method::Get, 200),
            (Method::Post, 201),
            (Method::Get, 404)
        ]
    );
    let cap = capture!("http_pipelined");
    let run_ = run(&cap.records, Role::Client);
    let events = run_.conn(0);
    let got = requests(events);
    assert_eq!(got.len(), 8);
    // The refused upgrade stays HTTP; the last body ends with the connection.
    assert!(
        events
            .iter()
            .all(|e| !matches!(e, WebEvent::SessionOpened { .. }))
    );
    let Some(Record::Closed { ts, .. }) = cap.records.last() else {
        panic!("capture ends with the close");
    };
    assert_eq!(got[7].end_ns, *ts);
}

// --- capture truncated, split, merged: the same events ---------------------------

#[test]
fn truncated_captures_give_the_same_events() {
    for (name, text) in GOOD_WEBSOCKET.iter().chain(&GOOD_HTTP[..2]) {
        let cap = load(text);
        for traced in [Role::Server, Role::Client] {
            let full = run(&cap.records, traced);
            // 64 bytes: the smallest capture `pipelens run` allows.
            for prefix in [64, 200] {
                let cut = run(&cut(&cap.records, prefix), traced);
                assert_eq!(cut.events, full.events, "{name} cut to {prefix}");
            }
        }
    }
}

#[test]
fn truncation_that_hides_framing_is_an_error_not_a_guess() {
    // Five requests in one write: cut to 64 bytes, the heads after the
    // first are unseen.
    let cap = capture!("http_pipelined");
    let run_ = run(&cut(&cap.records, 64), Role::Server);
    let events = run_.conn(0);
    assert_eq!(
        errors(events),
        [ParseError::Unseen {
            what: "an HTTP header block"
        }]
    );
    // The five requests were written at once: only the first is seen whole.
    assert_eq!(requests(events).len(), 1);
    assert_eq!(run_.streams[&0].state(), StreamState::Closed);

    // The chunked response read in one go: its second chunk-size line is
    // past the prefix.
    let cap = capture!("http_chunked");
    let run_ = run(&cut(&coalesce(&cap.records), 64), Role::Server);
    let e = errors(run_.conn(0));
    assert_eq!(
        e,
        [ParseError::Unseen {
            what: "a chunk-size line"
        }]
    );
    assert_eq!(e[0].label(), "capture_too_short");

    // Frames read two at a time, the second header past the prefix.
    let cap = capture!("ws_raw_frames");
    let run_ = run(&cut(&coalesce(&cap.records), 14), Role::Server);
    assert_eq!(
        errors(run_.conn(0)),
        [ParseError::Unseen {
            what: "a WebSocket frame header"
        }]
    );
    // The session still ends, with a code nobody can know.
    assert_eq!(closes(run_.conn(0)), [(None, None)]);
}

#[test]
fn events_do_not_depend_on_how_peers_split_their_writes() {
    let captures = GOOD_WEBSOCKET.iter().chain(GOOD_HTTP);
    for (name, text) in captures {
        let cap = load(text);
        let full = run(&cap.records, Role::Server);
        for piece in [1, 7, 1000] {
            let split = run(&split(&cap.records, piece), Role::Server);
            assert_eq!(split.events, full.events, "{name} in pieces of {piece}");
        }
        let merged = run(&coalesce(&cap.records), Role::Server);
        for (conn, events) in &full.events {
            assert_eq!(
                untimed(&merged.events[conn]),
                untimed(events),
                "{name} merged"
            );
        }
    }
}

// --- bad input ----------------------------------------------------------------------

#[test]
fn half_a_frame_then_gone() {
    let cap = capture!("ws_half_frame");
    let run = run(&cap.records, Role::Server);
    let events = run.conn(0);
    assert_eq!(
        messages(events, Direction::Received),
        [(MessageOpcode::Text, 2, 1, false)]
    );
    assert_eq!(
        errors(events),
        [ParseError::Truncated {
            what: "a WebSocket frame"
        }]
    );
    assert_eq!(closes(events), [(Some(1006), None)]);
}

#[test]
fn bad_close_codes_are_protocol_errors() {
    let cap = capture!("ws_bad_close");
    let run = run(&cap.records, Role::Server);
    let want = [
        ParseError::BadCloseCode { code: 1005 },
        ParseError::BadCloseCode { code: 999 },
        ParseError::ShortClose,
    ];
    for (conn, want) in want.into_iter().enumerate() {
        let events = run.conn(conn as u32);
        assert_eq!(messages(events, Direction::Received).len(), 1);
        assert_eq!(errors(events), std::slice::from_ref(&want));
        assert_eq!(want.label(), "ws_bad_close");
        // Unparseable before any valid close frame: the code is unknown.
        assert_eq!(closes(events), [(None, None)]);
        assert_eq!(run.streams[&(conn as u32)].state(), StreamState::Closed);
    }
}

#[test]
fn a_frame_announcing_two_to_the_63_bytes() {
    let cap = capture!("ws_huge");
    let run = run(&cap.records, Role::Server);
    let events = run.conn(0);
    assert_eq!(messages(events, Direction::Received).len(), 1);
    assert_eq!(
        errors(events),
        [ParseError::FrameLengthMsb { len: 1 << 63 }]
    );
    assert_eq!(errors(events)[0].label(), "ws_protocol");
}

#[test]
fn bad_http_input() {
    let cap = capture!("http_bad");
    let run = run(&cap.records, Role::Server);
    let e0 = errors(run.conn(0));
    assert!(
        matches!(
            e0[..],
            [ParseError::Http {
                what: "request",
                ..
            }]
        ),
        "{e0:?}"
    );
    assert_eq!(e0[0].label(), "not_http");
    assert_eq!(
        errors(run.conn(1)),
        [ParseError::HeadTooLarge { limit: 16 * 1024 }]
    );
    // Half a request head: http.server answered it after the client's FIN,
    // which the capture cannot see; the answer pairs with nothing.
    assert_eq!(errors(run.conn(2)), [ParseError::UnsolicitedResponse]);
    for conn in 0..3 {
        assert!(requests(run.conn(conn)).is_empty());
    }
}

#[test]
fn half_a_request_head_then_gone() {
    let mut s = WebStream::new();
    let mut events = feed_all(
        &mut s,
        Direction::Received,
        b"GET / HTTP/1.1\r\nHost: x\r\nAcc",
        1,
    );
    s.on_connection_closed(2);
    events.extend(s.drain_events());
    assert_eq!(
        errors(&events),
        [ParseError::Truncated {
            what: "an HTTP header block"
        }]
    );
    assert_eq!(
        events[0].clone(),
        WebEvent::ParseError {
            error: ParseError::Truncated {
                what: "an HTTP header block"
            },
            ts_ns: 2
        }
    );
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

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Feeds random chunks after `preamble`, checking memory stays bounded;
/// returns the parse errors.
fn feed_random(rng: &mut Rng, preamble: &[Record], chunks: usize) -> usize {
    let mut s = WebStream::new();
    for r in preamble {
        if let Record::Data {
            from_client,
            ts,
            len,
            bytes,
            ..
        } = r
        {
            let d = if *from_client {
                Direction::Received
            } else {
                Direction::Sent
            };
            s.feed(d, bytes, *len, *ts);
        }
    }
    let mut errors = 0;
    for i in 0..chunks {
        let n = rng.below(300) as usize;
        let bytes = rng.bytes(n);
        let extra = if rng.below(4) == 0 {
            rng.below(100_000) as usize
        } else {
            0
        };
        let d = if rng.below(2) == 0 {
            Direction::Received
        } else {
            Direction::Sent
        };
        s.feed(d, &bytes, n + extra, 1_000 + i as u64);
        assert!(s.buffered_bytes() <= MAX_BUFFERED);
        errors += s
            .drain_events()
            .filter(|e| matches!(e, WebEvent::ParseError { .. }))
            .count();
    }
    s.on_connection_closed(u64::MAX);
    errors
        + s.drain_events()
            .filter(|e| matches!(e, WebEvent::ParseError { .. }))
            .count()
}

#[test]
fn random_bytes_never_panic_and_are_counted() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut failed = 0;
    for _ in 0..300 {
        failed += usize::from(feed_random(&mut rng, &[], 50) > 0);
    }
    // Random bytes are almost never a valid request line.
    assert!(failed >= 295, "{failed} of 300 streams counted an error");

    // The same after a real handshake: the frame parser gets the noise.
    let cap = capture!("ws_echo");
    let handshake: Vec<Record> = cap.records[..2].to_vec();
    let mut failed = 0;
    for _ in 0..300 {
        let errors = feed_random(&mut rng, &handshake, 50);
        assert!(errors <= 1, "one error per stream at most");
        failed += errors;
    }
    assert!(failed >= 290, "{failed} of 300 sessions counted an error");
}

#[test]
fn corrupted_real_captures_never_panic() {
    let mut rng = Rng(42);
    for (_, text) in GOOD_WEBSOCKET.iter().chain(GOOD_HTTP) {
        let cap = load(text);
        for _ in 0..20 {
            let mut records = cap.records.clone();
            for r in &mut records {
                if let Record::Data { bytes, len, .. } = r {
                    if !bytes.is_empty() && rng.below(3) == 0 {
                        let i = rng.below(bytes.len() as u64) as usize;
                        bytes[i] ^= 1 << rng.below(8);
                    }
                    if rng.below(10) == 0 {
                        let keep = rng.below(bytes.len() as u64 + 1) as usize;
                        bytes.truncate(keep);
                        *len = (*len).max(keep);
                    }
                }
            }
            for traced in [Role::Server, Role::Client] {
                let _ = run(&records, traced);
            }
        }
    }
}

// --- pieces ------------------------------------------------------------------------

#[test]
fn frame_headers() {
    let f = WsFrame::decode(&[0x81, 0x05]).unwrap().unwrap();
    assert_eq!(
        (f.fin, f.opcode, f.payload_len, f.header_len),
        (true, 1, 5, 2)
    );
    assert!(!f.is_control());
    assert_eq!(f.masking_key, None);
    assert_eq!(f.rsv, 0);
    let f = WsFrame::decode(&[0x02, 0xfe, 0x01, 0x00, 1, 2, 3, 4])
        .unwrap()
        .unwrap();
    assert_eq!((f.fin, f.payload_len, f.header_len), (false, 256, 8));
    assert_eq!(f.masking_key, Some([1, 2, 3, 4]));
    let f = WsFrame::decode(&[0xc2, 0x7f, 0, 0, 0, 1, 0, 0, 0, 0])
        .unwrap()
        .unwrap();
    assert_eq!((f.rsv, f.payload_len, f.header_len), (0b100, 1 << 32, 10));
    // Incomplete headers.
    assert_eq!(WsFrame::decode(&[0x81]), Ok(None));
    assert_eq!(WsFrame::decode(&[0x81, 0xfe, 0x01]), Ok(None));
    assert_eq!(WsFrame::decode(&[0x81, 0x85, 1, 2, 3]), Ok(None));
    // The 64-bit length's top bit is known before the masking key.
    assert_eq!(
        WsFrame::decode(&[0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        Err(ParseError::FrameLengthMsb { len: 1 << 63 })
    );
    assert_eq!(
        WsFrame::decode(&[0x83, 0x00]),
        Err(ParseError::ReservedOpcode { opcode: 3 })
    );
    assert_eq!(
        WsFrame::decode(&[0x89, 0x7e, 0x00, 0x7e]),
        Err(ParseError::BadControlFrame {
            opcode: 9,
            len: 126
        })
    );
    assert_eq!(
        WsFrame::decode(&[0x08, 0x00]),
        Err(ParseError::BadControlFrame { opcode: 8, len: 0 })
    );
}

/// A stream after a real WebSocket handshake (traced: the server).
fn upgraded(deflate: bool) -> WebStream {
    let mut s = WebStream::new();
    let req = b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    s.feed(Direction::Received, req, req.len(), 10);
    let ext = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n"
    } else {
        ""
    };
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n{ext}\r\n"
    );
    s.feed(Direction::Sent, resp.as_bytes(), resp.len(), 20);
    assert_eq!(s.state(), StreamState::WebSocket);
    assert_eq!(s.role(), Some(Role::Server));
    s
}

fn feed_all(s: &mut WebStream, d: Direction, bytes: &[u8], ts: u64) -> Vec<WebEvent> {
    s.feed(d, bytes, bytes.len(), ts);
    s.drain_events().collect()
}

#[test]
fn websocket_protocol_violations() {
    let cases: [(&[u8], Direction, ParseError); 7] = [
        // A client frame without a mask.
        (
            &[0x81, 0x01, b'a'],
            Direction::Received,
            ParseError::Masking {
                from: Role::Client,
                masked: false,
            },
        ),
        // A server frame with one.
        (
            &[0x81, 0x81, 0, 0, 0, 0, b'a'],
            Direction::Sent,
            ParseError::Masking {
                from: Role::Server,
                masked: true,
            },
        ),
        // RSV1 without permessage-deflate.
        (
            &[0xc1, 0x00],
            Direction::Sent,
            ParseError::ReservedBits { rsv: 0b100 },
        ),
        (
            &[0x80, 0x00],
            Direction::Sent,
            ParseError::OrphanContinuation,
        ),
        (
            &[0x01, 0x00, 0x81, 0x00],
            Direction::Sent,
            ParseError::InterleavedMessage,
        ),
        (
            &[0x88, 0x00, 0x81, 0x00],
            Direction::Sent,
            ParseError::FrameAfterClose,
        ),
        // A close reason that is not UTF-8.
        (
            &[0x88, 0x04, 0x03, 0xe8, 0xff, 0xfe],
            Direction::Sent,
            ParseError::BadCloseReason,
        ),
    ];
    for (bytes, d, want) in cases {
        let mut s = upgraded(false);
        let events = feed_all(&mut s, d, bytes, 30);
        assert_eq!(errors(&events), std::slice::from_ref(&want), "{bytes:?}");
        assert_eq!(s.state(), StreamState::Unparseable);
        // Nothing more is read.
        assert!(feed_all(&mut s, d, &[0x81, 0x00], 40).is_empty());
    }
    // With permessage-deflate RSV1 is fine on a first frame, not on a
    // continuation or a control frame (RFC 7692 §6).
    let mut s = upgraded(true);
    let events = feed_all(&mut s, Direction::Sent, &[0x41, 0x01, b'x', 0x80, 0x00], 30);
    assert_eq!(
        messages(&events, Direction::Sent),
        [(MessageOpcode::Text, 1, 2, true)]
    );
    let events = feed_all(&mut s, Direction::Sent, &[0xc9, 0x00], 31);
    assert_eq!(errors(&events), [ParseError::ReservedBits { rsv: 0b100 }]);
}

#[test]
fn close_handshake_codes() {
    // A valid application code, and an empty close answered by one.
    let mut s = upgraded(false);
    let mut events = feed_all(
        &mut s,
        Direction::Received,
        &[0x88, 0x82, 0, 0, 0, 0, 0x0f, 0xa0],
        30,
    );
    events.extend(feed_all(&mut s, Direction::Sent, &[0x88, 0x00], 45));
    assert_eq!(closes(&events), [(Some(4000), Some(Role::Client))]);
    let Some(WebEvent::SessionClosed {
        duration_ns, ts_ns, ..
    }) = events.last()
    else {
        panic!("{events:?}");
    };
    assert_eq!((*duration_ns, *ts_ns), (25, 45));
    assert_eq!(
        controls(&events, Direction::Sent),
        [(
            ControlKind::Close {
                code: Some(1005),
                reason_len: 0
            },
            0
        )]
    );
    // The TCP close after the handshake adds nothing.
    s.on_connection_closed(50);
    assert!(s.drain_events().next().is_none());
    s.on_connection_closed(51);

    // Codes that never go on the wire.
    for code in [999u16, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
        let mut s = upgraded(false);
        let [hi, lo] = code.to_be_bytes();
        let events = feed_all(&mut s, Direction::Sent, &[0x88, 0x02, hi, lo], 30);
        assert_eq!(errors(&events), [ParseError::BadCloseCode { code }]);
    }
    for code in [1000u16, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999] {
        let mut s = upgraded(false);
        let [hi, lo] = code.to_be_bytes();
        let events = feed_all(&mut s, Direction::Sent, &[0x88, 0x02, hi, lo], 30);
        assert!(errors(&events).is_empty(), "{code}");
    }
    // A close frame whose code was not captured.
    let mut s = upgraded(false);
    s.feed(Direction::Sent, &[0x88, 0x05], 7, 30);
    s.on_connection_closed(40);
    let events: Vec<_> = s.drain_events().collect();
    assert_eq!(
        controls(&events, Direction::Sent),
        [(
            ControlKind::Close {
                code: None,
                reason_len: 3
            },
            5
        )]
    );
    assert_eq!(closes(&events), [(None, Some(Role::Server))]);
}

#[test]
fn huge_frames_skipped_by_length() {
    // A 5 GB binary frame from the client, captured 64 bytes per read.
    let mut s = upgraded(false);
    let len: u64 = 5 << 30;
    let mut head = vec![0x82, 0xff];
    head.extend_from_slice(&len.to_be_bytes());
    head.extend_from_slice(&[1, 2, 3, 4]);
    head.resize(64, 0);
    let mut left = len + 14;
    let mut ts = 30;
    let mut events = Vec::new();
    while left > 0 {
        let n = left.min(1 << 20);
        let bytes = if ts == 30 { &head[..] } else { &[0u8; 64][..] };
        s.feed(Direction::Received, bytes, n as usize, ts);
        events.extend(s.drain_events());
        left -= n;
        ts += 1;
    }
    assert_eq!(
        messages(&events, Direction::Received),
        [(MessageOpcode::Binary, len, 1, false)]
    );
    assert!(s.buffered_bytes() == 0);
}

#[test]
fn http_corners() {
    // Leading CRLF, 100 Continue, a chunked request with extensions and
    // trailers, HTTP/1.0 keep-alive, then a response whose body runs to
    // the close.
    let mut s = WebStream::new();
    let mut events = Vec::new();
    let mut ex = |s: &mut WebStream, d, b: &[u8], ts| events.extend(feed_all(s, d, b, ts));
    ex(
        &mut s,
        Direction::Received,
        b"\r\nPOST /u HTTP/1.1\r\nExpect: 100-continue\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        1,
    );
    ex(&mut s, Direction::Sent, b"HTTP/1.1 100 Continue\r\n\r\n", 2);
    ex(
        &mut s,
        Direction::Received,
        b"5;name=v\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n",
        3,
    );
    ex(
        &mut s,
        Direction::Sent,
        b"HTTP/1.1 201 Created\r\ncontent-length: 2, 2\r\n\r\nok",
        4,
    );
    ex(
        &mut s,
        Direction::Received,
        b"TRACE / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nBREW / HTTP/1.1\r\n\r\n",
        5,
    );
    ex(
        &mut s,
        Direction::Sent,
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
        6,
    );
    ex(
        &mut s,
        Direction::Sent,
        b"HTTP/1.1 418 I'm a teapot\r\n\r\nshort and stout",
        7,
    );
    assert_eq!(s.state(), StreamState::Http);
    s.on_connection_closed(9);
    events.extend(s.drain_events());
    let got: Vec<_> = requests(&events)
        .iter()
        .map(|r| (r.method.as_str(), r.status_code, r.start_ns, r.end_ns))
        .collect();
    assert_eq!(
        got,
        [
            ("POST", 201, 1, 4),
            ("TRACE", 200, 5, 6),
            ("other", 418, 5, 9)
        ]
    );
    assert!(errors(&events).is_empty(), "{events:?}");

    // Statuses and methods without a body, whatever Content-Length says.
    let mut s = WebStream::with_role(Role::Client);
    let mut events = feed_all(
        &mut s,
        Direction::Sent,
        b"HEAD / HTTP/1.1\r\n\r\nGET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
        1,
    );
    events.extend(feed_all(
        &mut s,
        Direction::Received,
        b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nHTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n\
          HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n",
        2,
    ));
    let got: Vec<_> = requests(&events)
        .iter()
        .map(|r| (r.method, r.status_code, r.role))
        .collect();
    assert_eq!(
        got,
        [
            (Method::Head, 200, Role::Client),
            (Method::Get, 204, Role::Client),
            (Method::Get, 304, Role::Client)
        ]
    );
    assert_eq!(s.buffered_bytes(), 0);

    // A CONNECT tunnel and an h2c upgrade are not followed.
    for (req, resp) in [
        (
            &b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n"[..],
            &b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03\x01"[..],
        ),
        (
            b"GET / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\nPRI",
        ),
    ] {
        let mut s = WebStream::new();
        let mut events = feed_all(&mut s, Direction::Received, req, 1);
        events.extend(feed_all(&mut s, Direction::Sent, resp, 2));
        events.extend(feed_all(&mut s, Direction::Received, b"\x00\x01garbage", 3));
        assert_eq!(s.state(), StreamState::Opaque);
        assert_eq!(requests(&events).len(), 1);
        assert!(errors(&events).is_empty());
    }

    // Sequence and header errors.
    let many = [
        &b"GET / HTTP/1.1\r\n"[..],
        &b"A: b\r\n".repeat(101),
        b"\r\n",
    ]
    .concat();
    let bad: [(&[u8], &[u8], ParseError); 5] = [
        (&many, b"", ParseError::TooManyHeaders { limit: 100 }),
        (
            b"GET / HTTP/1.1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            ParseError::UnexpectedSwitch,
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"",
            ParseError::BadHeader {
                header: "Content-Length",
            },
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"",
            ParseError::BadHeader {
                header: "Transfer-Encoding",
            },
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"",
            ParseError::BadChunk,
        ),
    ];
    for (req, resp, want) in bad {
        let mut s = WebStream::new();
        let mut events = feed_all(&mut s, Direction::Received, req, 1);
        if !resp.is_empty() {
            events.extend(feed_all(&mut s, Direction::Sent, resp, 2));
        }
        assert_eq!(errors(&events), std::slice::from_ref(&want), "{want}");
    }
}

#[test]
fn oversized_head_in_small_reads_is_bounded() {
    let mut s = WebStream::new();
    s.feed(Direction::Received, b"GET / HTTP/1.1\r\n", 16, 1);
    let line = [b"X-Filler: ".as_slice(), &[b'f'; 290], b"\r\n"].concat();
    let mut events = Vec::new();
    for i in 0..300 {
        s.feed(Direction::Received, &line, line.len(), 2 + i);
        assert!(s.buffered_bytes() <= 16 * 1024);
        events.extend(s.drain_events());
    }
    assert_eq!(
        errors(&events),
        [ParseError::HeadTooLarge { limit: 16 * 1024 }]
    );
    assert_eq!(s.buffered_bytes(), 0);
}

#[test]
fn pipelining_is_bounded() {
    let mut s = WebStream::new();
    let reqs = b"GET / HTTP/1.1\r\n\r\n".repeat(300);
    let events = feed_all(&mut s, Direction::Received, &reqs, 1);
    assert_eq!(errors(&events), [ParseError::TooManyPending { limit: 256 }]);
}

#[test]
fn first_bytes() {
    assert_eq!(
        classify_first_bytes(b"GET /x HTTP/1.1\r\nHo"),
        FirstBytes::Request
    );
    assert_eq!(classify_first_bytes(b"GET /x HT"), FirstBytes::NeedMore);
    assert_eq!(
        classify_first_bytes(b"\x16\x03\x01\x02\x00"),
        FirstBytes::NotHttp
    );
    assert_eq!(
        classify_first_bytes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        FirstBytes::NotHttp
    );
    assert_eq!(Method::Options.as_str(), "OPTIONS");
}

#[test]
fn upgrade_bytes_held_until_the_answer() {
    // The client sends its first frame before the 101 arrives (as some do
    // on a fast path): it is held, then read as a frame.
    let mut s = WebStream::new();
    let req = b"GET /chat HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
    let frame = [0x81, 0x82, 0, 0, 0, 0, b'h', b'i'];
    s.feed(
        Direction::Received,
        &[&req[..], &frame].concat(),
        req.len() + 8,
        1,
    );
    s.feed(Direction::Received, &frame[..6], 8, 2);
    let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n\x81\x00";
    s.feed(Direction::Sent, resp, resp.len(), 3);
    let events: Vec<_> = s.drain_events().collect();
    assert_eq!(
        messages(&events, Direction::Received),
        [
            (MessageOpcode::Text, 2, 1, false),
            (MessageOpcode::Text, 2, 1, false)
        ]
    );
    assert_eq!(
        messages(&events, Direction::Sent),
        [(MessageOpcode::Text, 0, 1, false)]
    );
    assert_eq!(requests(&events)[0].status_code, 101);
    for e in &events {
        if let WebEvent::Message { ts_ns, .. } = e {
            assert!(*ts_ns <= 3);
        }
    }
}

#[test]
fn a_kept_tail_recovers_framing_after_a_long_payload() {
    // One read: a 1000-byte binary frame, then a 5-byte text frame.
    let mut read = vec![0x82, 0x7e, 0x03, 0xe8];
    read.resize(4 + 1000, b'b');
    read.extend_from_slice(&[0x81, 0x05]);
    read.extend_from_slice(b"hello");
    let (prefix, tail) = (&read[..64], &read[read.len() - 128..]);

    let mut s = upgraded(false);
    s.feed_with_tail(Direction::Sent, prefix, tail, read.len(), 30);
    let events: Vec<_> = s.drain_events().collect();
    assert_eq!(
        messages(&events, Direction::Sent),
        [
            (MessageOpcode::Binary, 1000, 1, false),
            (MessageOpcode::Text, 5, 1, false)
        ]
    );
    // Without it, the second header is unseen.
    let mut s = upgraded(false);
    let events = {
        s.feed(Direction::Sent, prefix, read.len(), 30);
        s.drain_events().collect::<Vec<_>>()
    };
    assert_eq!(
        errors(&events),
        [ParseError::Unseen {
            what: "a WebSocket frame header"
        }]
    );
    // A tail overlapping the prefix is read once.
    let mut s = upgraded(false);
    s.feed_with_tail(
        Direction::Sent,
        &read[..1000],
        &read[read.len() - 128..],
        read.len(),
        30,
    );
    assert_eq!(
        messages(&s.drain_events().collect::<Vec<_>>(), Direction::Sent).len(),
        2
    );

    // The same for HTTP: a long body, then a pipelined response whose head
    // is in the tail.
    let mut s = WebStream::new();
    s.feed(
        Direction::Received,
        b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
        38,
        1,
    );
    let mut resp = b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n".to_vec();
    resp.resize(resp.len() + 3000, b'x');
    resp.extend_from_slice(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
    s.feed_with_tail(
        Direction::Sent,
        &resp[..100],
        &resp[resp.len() - 128..],
        resp.len(),
        2,
    );
    let events: Vec<_> = s.drain_events().collect();
    let got: Vec<_> = requests(&events).iter().map(|r| r.status_code).collect();
    assert_eq!(got, [200, 404]);
}
