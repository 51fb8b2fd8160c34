//! PostgreSQL v3 wire protocol, both directions of one connection, from
//! captured socket payloads: framing, then pairing requests with replies.
//!
//! Protocol reference: PostgreSQL 15 documentation, chapter 55
//! "Frontend/Backend Protocol" — 55.2 "Message Flow" (startup, simple and
//! extended query, pipelining, COPY, cancel, SSL/GSSAPI session encryption)
//! and 55.7 "Message Formats".
//!
//! The input is what the kernel side copies: for each read or write, a
//! prefix of its bytes and the syscall's full length. [`PgStream::feed`]
//! frames each direction incrementally by message lengths and walks over
//! the bytes it did not see; framing is lost only when a message *header*
//! falls in unseen bytes. It is then found again (resynchronised) at a
//! plausible boundary — a type byte the direction can send with a length
//! that type can have, confirmed by a second header right after it, or by
//! the message ending exactly where its syscall ended. The same search
//! attaches to a connection that is already under way ([`PgStream::mid_stream`]).
//!
//! Pairing follows the protocol's strict ordering: every request that
//! expects a reply is queued and each backend message is matched to the
//! oldest, with the reply grammar of that request checked (ParseComplete
//! for Parse, BindComplete for Bind, …, ReadyForQuery for Sync), so that
//! several Executes before a Sync and several Syncs in flight pair up
//! exactly. After an ErrorResponse in the extended protocol the server
//! skips to the next Sync, and so does the queue. A reply that fits no
//! request is a parse error; the queue then waits for a ReadyForQuery to
//! find its place again. Requests whose replies could not all be seen are
//! never reported, so a report is either right or absent — with two known
//! exceptions: a simple query whose ReadyForQuery went unseen is reported
//! as of its CommandComplete (its row count may then miss a later
//! statement of the same Query), and attaching mid-stream to a *pipelined*
//! connection whose earlier requests are still unanswered. Those unseen
//! requests' replies come first and, when they have the shape of the
//! requests seen next, cannot be told apart from theirs. Events of a
//! connection attached mid-stream are therefore held until a ReadyForQuery
//! pairs as predicted and dropped if a reply fits nothing before; only a
//! pipeline whose shapes line up (including through an error, after which
//! the server skips to Sync) can still be misattributed, for that first
//! group only. A non-pipelined connection (a pooled one waiting for its
//! next statement) pairs exactly from the first request seen.
//!
//! What is reported ([`QueryEvent`]):
//! - simple protocol: one event per `Query` message, from its first byte to
//!   the ReadyForQuery that ends it (several statements in one Query are
//!   one event; the first error decides the status; rows are summed);
//! - extended protocol: one event per `Execute`, from the first byte of the
//!   first message of its group (the Parse/Bind/Describe before it) to the
//!   CommandComplete, EmptyQueryResponse, PortalSuspended or ErrorResponse
//!   that answers it; an error while parsing or binding fails that group's
//!   statement. The statement reported is the one the portal was bound to,
//!   so executing a statement prepared long before reports its SQL;
//! - `COPY … FROM STDIN` / `TO STDOUT` (and CopyBoth) is one event, ended by
//!   its CommandComplete (extended) or ReadyForQuery (simple);
//! - NoticeResponse, ParameterStatus and NotificationResponse are ignored
//!   wherever they come.
//!
//! SQL text is normalised (see `normalize`) as soon as its message is
//! complete; raw text never leaves this module. At most [`MAX_SQL`] bytes
//! of a statement are kept; the rest is skipped by length.
//!
//! Memory is bounded per connection: kept message bodies, the resync
//! window, the request queue, the prepared statement and portal tables and
//! the undrained events all have caps; overflowing one is counted, never
//! buffered.

#![cfg_attr(
    not(test),
    expect(dead_code, reason = "wired to the payload capture path next")
)]

use std::{
    collections::{HashMap, VecDeque},
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
};

use super::normalize::{Operation, normalize};

/// SQL text kept per statement; the rest is skipped by length.
pub const MAX_SQL: usize = 16 * 1024;
/// Body bytes kept of messages read for their leading fields (names,
/// error fields, command tags).
const MAX_FIELDS: usize = 512;
/// The server refuses longer messages (PG_MAX_ALLOC_SIZE is 1 GiB).
const MAX_MESSAGE: u64 = 1 << 30;
/// The server refuses longer startup packets (MAX_STARTUP_PACKET_LENGTH).
const MAX_STARTUP: u64 = 10_000;
/// Bytes searched for a boundary while framing is lost.
const RESYNC_WINDOW: usize = 16 * 1024;
/// Requests awaiting replies (a pipeline deeper than this is not followed).
const MAX_PENDING: usize = 4096;
const MAX_STATEMENTS: usize = 1024;
const MAX_PORTALS: usize = 256;
const MAX_NAME: usize = 256;
/// Events not yet drained by the caller.
const MAX_EVENTS: usize = 4096;
/// A connection with this many parse errors is dropped from parsing.
const MAX_PARSE_ERRORS: u64 = 64;
/// A direction lost for this many bytes in a row is dropped from parsing.
const MAX_LOST_BYTES: u64 = 1 << 20;
/// Raw statement texts whose template is remembered, per connection.
const TEMPLATE_MEMO: usize = 16;

const PROTOCOL_V3: u32 = 3 << 16;
const CANCEL_REQUEST: u32 = 80_877_102;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
/// First byte of a TLS handshake record (PostgreSQL 17 direct SSL).
const TLS_HANDSHAKE: u8 = 0x16;

/// Who wrote the bytes. For a client target its writes are
/// `FromFrontend`; for a server target its reads are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    FromFrontend,
    FromBackend,
}

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamState {
    /// Parsing.
    Active,
    /// SSL or GSSAPI encryption was accepted: counted, not parsed.
    Encrypted,
    /// A CancelRequest connection (it carries nothing else).
    Cancel,
    /// The frontend sent Terminate.
    Terminated,
    /// Too many parse errors, or lost for too long: no longer parsed.
    Abandoned,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    Error,
}

/// A five-character SQLSTATE (ErrorResponse field `C`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SqlState([u8; 5]);

impl SqlState {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("?????")
    }

    fn parse(s: &[u8]) -> Option<Self> {
        let code: [u8; 5] = s.try_into().ok()?;
        code.iter()
            .all(u8::is_ascii_alphanumeric)
            .then_some(Self(code))
    }
}

impl std::fmt::Debug for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Simple,
    Extended,
}

/// One completed operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryEvent {
    /// The normalised statement: literals replaced, never raw text.
    pub template: Arc<str>,
    pub operation: Operation,
    pub protocol: Protocol,
    /// The first byte of the request (its capture timestamp).
    pub start_ns: u64,
    /// The reply that completed it.
    pub end_ns: u64,
    pub status: Status,
    pub sqlstate: Option<SqlState>,
    /// From the CommandComplete tag (or the rows before PortalSuspended).
    pub rows: Option<u64>,
}

/// Counters of one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PgStreamStats {
    /// Malformed input: impossible headers or startup packets, replies that
    /// fit no request, overflowing queues.
    pub parse_errors: u64,
    /// Times framing was lost because a header fell in unseen bytes.
    pub framing_lost: u64,
    /// Times a boundary was found again (after a loss, an error, or
    /// attaching mid-stream).
    pub resyncs: u64,
    /// Executes of a statement or portal whose definition was never seen
    /// (prepared before the agent attached): paired, not reported.
    pub unknown_statements: u64,
    /// Requests whose replies could not all be seen: not reported.
    pub dropped_requests: u64,
    /// Events overwritten because the caller did not drain them.
    pub events_dropped: u64,
}

/// A statement as reported: its template and operation.
#[derive(Clone, Debug)]
struct Statement {
    template: Arc<str>,
    operation: Operation,
}

// ---------------------------------------------------------------------------
// Framing

/// What the framer hands to the pairing.
#[derive(Debug)]
enum Frame {
    /// An untagged startup-phase message: its code and the rest of it.
    Startup { code: u32, body: Vec<u8> },
    /// A tagged message; `body` holds at most the kept prefix.
    Message {
        tag: u8,
        body: Vec<u8>,
        start_ns: u64,
        end_ns: u64,
    },
    /// The backend's one-byte answer to SSLRequest / GSSENCRequest.
    EncryptionAnswer(u8),
    /// The frontend opened with a TLS handshake (direct SSL).
    DirectTls,
    /// Messages went by unseen (a header fell in an unseen gap).
    Lost,
    /// Bytes that cannot be a message here.
    Malformed,
    /// A boundary was found again.
    Resynced,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// Frontend, before the StartupMessage: untagged messages.
    Startup,
    /// Backend, after SSLRequest/GSSENCRequest: one bare byte.
    Answer,
    Tagged,
    /// Searching for a boundary.
    Lost,
    Stopped,
}

#[derive(Debug)]
struct Partial {
    /// 0 for an untagged startup-phase message.
    tag: u8,
    code: u32,
    remaining: u64,
    keep: usize,
    body: Vec<u8>,
    holed: bool,
    start_ns: u64,
}

#[derive(Debug)]
struct Framer {
    dir: Direction,
    framing: Framing,
    head: [u8; 8],
    head_len: usize,
    head_ns: u64,
    msg: Option<Partial>,
    /// While lost: the bytes seen since, up to [`RESYNC_WINDOW`].
    scan: Vec<u8>,
    /// Offsets before this in `scan` are known not to be boundaries.
    scan_from: usize,
    /// Bytes passed over without finding a boundary.
    lost_bytes: u64,
}

impl Framer {
    fn new(dir: Direction, framing: Framing) -> Self {
        Self {
            dir,
            framing,
            head: [0; 8],
            head_len: 0,
            head_ns: 0,
            msg: None,
            scan: Vec::new(),
            scan_from: 0,
            lost_bytes: 0,
        }
    }

    fn stop(&mut self) {
        self.framing = Framing::Stopped;
        self.msg = None;
        self.scan = Vec::new();
    }

    fn lose(&mut self, out: &mut Vec<Frame>, frame: Frame) {
        self.framing = Framing::Lost;
        self.head_len = 0;
        self.msg = None;
        self.scan.clear();
        self.scan_from = 0;
        out.push(frame);
    }

    /// One syscall: its first bytes, `gap` bytes unseen, its last bytes.
    fn feed(&mut self, head: &[u8], gap: u64, tail: &[u8], ts: u64, out: &mut Vec<Frame>) {
        let original_len = head.len() as u64 + gap + tail.len() as u64;
        // A syscall usually starts at a message boundary: try there first.
        if self.framing == Framing::Lost && chain_at(self.dir, head, original_len) {
            self.framing = Framing::Tagged;
            self.scan.clear();
            self.scan_from = 0;
            self.lost_bytes = 0;
            out.push(Frame::Resynced);
        }
        self.consume(head, ts, out);
        self.search(gap == 0 && tail.is_empty(), ts, out);
        if gap > 0 {
            self.skip(gap, ts, out);
        }
        if !tail.is_empty() {
            self.consume(tail, ts, out);
            // The tail ends where the syscall did: a message ending there
            // is a boundary.
            self.search(true, ts, out);
        }
    }

    /// While lost, looks for a boundary in the window and frames from it.
    fn search(&mut self, chunk_end: bool, ts: u64, out: &mut Vec<Frame>) {
        while self.framing == Framing::Lost {
            let Some(at) = self.find_boundary(chunk_end) else {
                break;
            };
            let replay = std::mem::take(&mut self.scan);
            self.framing = Framing::Tagged;
            self.scan_from = 0;
            self.lost_bytes = 0;
            out.push(Frame::Resynced);
            self.consume(&replay[at..], ts, out);
        }
        if self.framing == Framing::Lost {
            self.trim_scan();
        }
    }

    /// Frames `data`; in the lost state, keeps it for the boundary search.
    fn consume(&mut self, mut data: &[u8], ts: u64, out: &mut Vec<Frame>) {
        while !data.is_empty() {
            match self.framing {
                Framing::Stopped => return,
                Framing::Lost => {
                    self.lost_bytes += data.len() as u64;
                    self.scan.extend_from_slice(data);
                    return;
                }
                Framing::Answer => {
                    let answer = data[0];
                    match answer {
                        b'S' | b'G' => {
                            out.push(Frame::EncryptionAnswer(answer));
                            self.stop();
                            return;
                        }
                        b'N' => {
                            out.push(Frame::EncryptionAnswer(answer));
                            data = &data[1..];
                        }
                        // An ErrorResponse from a server that predates the
                        // request: a tagged message.
                        _ => {}
                    }
                    self.framing = Framing::Tagged;
                }
                Framing::Startup | Framing::Tagged => {
                    if self.msg.is_some() {
                        data = self.body(data, ts, out);
                    } else {
                        data = self.header(data, ts, out);
                    }
                }
            }
        }
    }

    fn header<'a>(&mut self, data: &'a [u8], ts: u64, out: &mut Vec<Frame>) -> &'a [u8] {
        let startup = self.framing == Framing::Startup;
        if startup && self.head_len == 0 && data[0] == TLS_HANDSHAKE {
            out.push(Frame::DirectTls);
            self.stop();
            return &[];
        }
        let need = if startup { 8 } else { 5 };
        if self.head_len == 0 {
            self.head_ns = ts;
        }
        let n = (need - self.head_len).min(data.len());
        self.head[self.head_len..self.head_len + n].copy_from_slice(&data[..n]);
        self.head_len += n;
        let data = &data[n..];
        if self.head_len < need {
            return data;
        }
        self.head_len = 0;
        let (tag, code, body_len) = if startup {
            let len = u64::from(u32::from_be_bytes(
                self.head[..4].try_into().expect("4 bytes"),
            ));
            let code = u32::from_be_bytes(self.head[4..8].try_into().expect("4 bytes"));
            if !startup_plausible(len, code) {
                self.lose(out, Frame::Malformed);
                // The packet's bytes after its first may hold a boundary.
                self.scan.extend_from_slice(&self.head[1..8]);
                return data;
            }
            (0, code, len - 8)
        } else {
            let tag = self.head[0];
            let len = u64::from(u32::from_be_bytes(
                self.head[1..5].try_into().expect("4 bytes"),
            ));
            if !tag_plausible(self.dir, tag, len, data.first().copied()) {
                self.lose(out, Frame::Malformed);
                self.scan.extend_from_slice(&self.head[1..5]);
                return data;
            }
            (tag, 0, len - 4)
        };
        self.msg = Some(Partial {
            tag,
            code,
            remaining: body_len,
            keep: keep_for(self.dir, tag).min(body_len as usize),
            body: Vec::new(),
            holed: false,
            start_ns: self.head_ns,
        });
        if body_len == 0 {
            self.finish(ts, out);
        }
        data
    }

    fn body<'a>(&mut self, data: &'a [u8], ts: u64, out: &mut Vec<Frame>) -> &'a [u8] {
        let msg = self.msg.as_mut().expect("in a body");
        let n = (msg.remaining.min(data.len() as u64)) as usize;
        if !msg.holed && msg.body.len() < msg.keep {
            let take = n.min(msg.keep - msg.body.len());
            msg.body.extend_from_slice(&data[..take]);
        }
        msg.remaining -= n as u64;
        if msg.remaining == 0 {
            self.finish(ts, out);
        }
        &data[n..]
    }

    fn finish(&mut self, ts: u64, out: &mut Vec<Frame>) {
        let msg = self.msg.take().expect("a message to finish");
        if msg.tag == 0 {
            match msg.code {
                SSL_REQUEST | GSSENC_REQUEST => {}
                CANCEL_REQUEST => self.framing = Framing::Stopped,
                _ => self.framing = Framing::Tagged,
            }
            out.push(Frame::Startup {
                code: msg.code,
                body: msg.body,
            });
            return;
        }
        out.push(Frame::Message {
            tag: msg.tag,
            body: msg.body,
            start_ns: msg.start_ns,
            end_ns: ts,
        });
    }

    /// Walks over `gap` bytes that went by unseen.
    fn skip(&mut self, mut gap: u64, ts: u64, out: &mut Vec<Frame>) {
        match self.framing {
            Framing::Stopped => {}
            Framing::Lost => {
                // The window is no longer contiguous.
                self.scan.clear();
                self.scan_from = 0;
                self.lost_bytes += gap;
            }
            Framing::Answer => self.lose(out, Frame::Lost),
            Framing::Startup | Framing::Tagged => {
                if let Some(msg) = self.msg.as_mut() {
                    let n = msg.remaining.min(gap);
                    msg.remaining -= n;
                    msg.holed = true;
                    gap -= n;
                    if msg.remaining == 0 {
                        self.finish(ts, out);
                    }
                }
                if gap > 0 || self.head_len > 0 {
                    self.lose(out, Frame::Lost);
                    self.lost_bytes += gap;
                }
            }
        }
    }

    /// The first offset in the window where a message plausibly starts,
    /// confirmed by the header after it, or by its end coinciding with the
    /// end of the syscall (`chunk_end`: the window ends where one did).
    fn find_boundary(&mut self, chunk_end: bool) -> Option<usize> {
        let mut undecided = None;
        let mut at = self.scan_from;
        while at + 5 <= self.scan.len() {
            let tag = self.scan[at];
            let len = u64::from(u32::from_be_bytes(
                self.scan[at + 1..at + 5].try_into().expect("4 bytes"),
            ));
            if tag_plausible(self.dir, tag, len, self.scan.get(at + 5).copied()) {
                let next = at as u64 + 1 + len;
                if next + 5 <= self.scan.len() as u64 {
                    let n = next as usize;
                    let next_len = u64::from(u32::from_be_bytes(
                        self.scan[n + 1..n + 5].try_into().expect("4 bytes"),
                    ));
                    if tag_plausible(
                        self.dir,
                        self.scan[n],
                        next_len,
                        self.scan.get(n + 5).copied(),
                    ) {
                        return Some(at);
                    }
                } else if chunk_end && next == self.scan.len() as u64 {
                    return Some(at);
                } else if next - (at as u64) < RESYNC_WINDOW as u64 {
                    // Confirmable once more bytes come.
                    undecided.get_or_insert(at);
                }
            }
            at += 1;
        }
        self.scan_from = undecided.unwrap_or(at);
        None
    }

    fn trim_scan(&mut self) {
        if self.scan.len() > RESYNC_WINDOW {
            let cut = self.scan.len() - RESYNC_WINDOW / 2;
            self.scan.drain(..cut);
            self.scan_from = self.scan_from.saturating_sub(cut);
        }
    }
}

/// Whether `data`, the seen start of a syscall of `original_len` bytes,
/// begins with a chain of plausible messages: two headers in a row, or one
/// message ending exactly where the syscall ends.
fn chain_at(dir: Direction, data: &[u8], original_len: u64) -> bool {
    let mut at = 0usize;
    let mut headers = 0;
    while at + 5 <= data.len() {
        let len = u64::from(u32::from_be_bytes(
            data[at + 1..at + 5].try_into().expect("4 bytes"),
        ));
        if !tag_plausible(dir, data[at], len, data.get(at + 5).copied()) {
            return false;
        }
        headers += 1;
        let end = at as u64 + 1 + len;
        if end == original_len {
            return true;
        }
        if end > data.len() as u64 {
            return headers >= 2 && end < original_len;
        }
        at = end as usize;
    }
    headers >= 2 && at == data.len() && at as u64 == original_len
}

fn startup_plausible(len: u64, code: u32) -> bool {
    match code {
        SSL_REQUEST | GSSENC_REQUEST => len == 8,
        CANCEL_REQUEST => len == 16,
        // Protocol 3.x: user is mandatory, so at least "user\0x\0\0".
        _ => code >> 16 == PROTOCOL_V3 >> 16 && (8 + 8..=MAX_STARTUP).contains(&len),
    }
}

/// Whether `tag` with length `len` (including itself) can be a message
/// written by `dir`; `first` is the body's first byte when already seen.
fn tag_plausible(dir: Direction, tag: u8, len: u64, first: Option<u8>) -> bool {
    if !(4..=MAX_MESSAGE).contains(&len) {
        return false;
    }
    let body = len - 4;
    match dir {
        Direction::FromFrontend => match tag {
            b'Q' => body >= 1,
            b'P' => body >= 4,
            b'B' => body >= 8,
            b'D' | b'C' => body >= 2 && first.is_none_or(|b| b == b'S' || b == b'P'),
            b'E' => body >= 5,
            b'S' | b'H' | b'X' | b'c' => body == 0,
            b'd' => true,
            b'f' => body >= 1,
            b'F' => body >= 10,
            b'p' => body >= 1,
            _ => false,
        },
        Direction::FromBackend => match tag {
            b'1' | b'2' | b'3' | b'n' | b's' | b'I' | b'c' => body == 0,
            b'Z' => body == 1 && first.is_none_or(|b| matches!(b, b'I' | b'T' | b'E')),
            b'K' => body == 8,
            b'R' => (4..=1 << 16).contains(&body),
            b'S' => (2..=1 << 16).contains(&body),
            b'T' => body >= 2,
            b'D' => body >= 2,
            b'C' => (1..=256).contains(&body),
            b'E' | b'N' => body >= 1 && first.is_none_or(|b| b == 0 || b.is_ascii_alphabetic()),
            b't' => body >= 2,
            b'G' | b'H' | b'W' => body >= 3 && first.is_none_or(|b| b <= 1),
            b'd' => true,
            b'A' => body >= 6,
            b'V' => body >= 4,
            b'v' => body >= 8,
            _ => false,
        },
    }
}

/// Body bytes worth keeping of a message.
fn keep_for(dir: Direction, tag: u8) -> usize {
    match (dir, tag) {
        (Direction::FromFrontend, 0) => MAX_STARTUP as usize,
        (Direction::FromFrontend, b'Q' | b'P') => MAX_SQL + MAX_NAME,
        (Direction::FromFrontend, b'B' | b'E' | b'D' | b'C') => MAX_FIELDS,
        (Direction::FromBackend, b'E' | b'C' | b'Z') => MAX_FIELDS,
        _ => 0,
    }
}

// ---------------------------------------------------------------------------
// Pairing

/// What a queued request waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// StartupMessage: authentication … ReadyForQuery.
    Startup,
    /// Query: anything, then ReadyForQuery.
    Simple,
    /// FunctionCall: FunctionCallResponse, then ReadyForQuery.
    Function,
    Parse,
    Bind,
    DescribeStatement {
        got_parameters: bool,
    },
    DescribePortal,
    Execute,
    Close,
    Sync,
    /// Requests that went by unseen. Drivers write a request group (up to
    /// its Sync or Query) per syscall, so they are taken to end one group.
    Unknown,
}

impl Expect {
    /// Whether a ReadyForQuery ends this request's group.
    fn ends_group(self) -> bool {
        matches!(
            self,
            Self::Startup | Self::Simple | Self::Function | Self::Sync | Self::Unknown
        )
    }

    /// Whether `tag` can be the first reply to this request.
    fn first_reply(self, tag: u8) -> bool {
        match self {
            Self::Startup => matches!(tag, b'R' | b'E' | b'v'),
            Self::Simple => matches!(tag, b'T' | b'C' | b'I' | b'E' | b'G' | b'H' | b'W'),
            Self::Function => matches!(tag, b'V' | b'E'),
            Self::Parse => matches!(tag, b'1' | b'E'),
            Self::Bind => matches!(tag, b'2' | b'E'),
            Self::DescribeStatement { .. } => matches!(tag, b't' | b'E'),
            Self::DescribePortal => matches!(tag, b'T' | b'n' | b'E'),
            Self::Execute => matches!(tag, b'D' | b'C' | b'I' | b's' | b'E' | b'G' | b'H' | b'W'),
            Self::Close => matches!(tag, b'3' | b'E'),
            Self::Sync => tag == b'Z',
            Self::Unknown => false,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    expect: Expect,
    /// The operation this request belongs to.
    op: Option<u64>,
    /// Some of its replies went unseen: pair, never report.
    dropped: bool,
}

#[derive(Debug)]
struct Op {
    statement: Option<Statement>,
    protocol: Protocol,
    start_ns: u64,
    rows: Option<u64>,
    data_rows: u64,
    /// An ErrorResponse answered it (its SQLSTATE may have gone unseen).
    failed: bool,
    sqlstate: Option<SqlState>,
    /// When a CommandComplete, ErrorResponse or EmptyQueryResponse of a
    /// simple query came (its ReadyForQuery may then go unseen).
    answered_ns: Option<u64>,
    /// An Execute belongs to it (an extended group without one, e.g. a bare
    /// Parse to prepare, is reported only if it fails).
    executes: bool,
}

/// Incremental parser of one PostgreSQL connection, both directions.
#[derive(Debug)]
pub struct PgStream {
    frontend: Framer,
    backend: Framer,
    frames: Vec<Frame>,
    state: StreamState,
    user: Option<String>,
    database: Option<String>,
    pending: VecDeque<Pending>,
    ops: HashMap<u64, Op>,
    next_op: u64,
    /// The extended-protocol group the frontend is adding messages to.
    segment: Option<u64>,
    /// The server skips frontend messages until Sync after an error.
    skipping_to_sync: bool,
    /// Replies have been paired with requests since the last loss, so a
    /// reply that fits nothing is an error, not an unseen request's.
    aligned: bool,
    /// The pairing is not yet confirmed (attached mid-stream, or after a
    /// reply that fitted nothing): a pipelined client may have requests
    /// in flight that were never seen, whose replies would pair with the
    /// requests seen next. Events are held until a ReadyForQuery pairs
    /// with a Sync or Query as the grammar predicts, and dropped if a
    /// reply fits nothing first.
    tentative: bool,
    held: Vec<QueryEvent>,
    statements: HashMap<Box<[u8]>, Statement>,
    portals: HashMap<Box<[u8]>, Option<Statement>>,
    memo: VecDeque<(u64, bool, Statement)>,
    events: VecDeque<QueryEvent>,
    stats: PgStreamStats,
}

impl Default for PgStream {
    fn default() -> Self {
        Self::new()
    }
}

impl PgStream {
    /// A connection seen from its first byte.
    pub fn new() -> Self {
        Self::with_framing(Framing::Startup, Framing::Tagged, true)
    }

    /// A connection already under way when capture began: both directions
    /// start by searching for a message boundary, and no reply is trusted
    /// until one has been paired.
    pub fn mid_stream() -> Self {
        Self::with_framing(Framing::Lost, Framing::Lost, false)
    }

    fn with_framing(frontend: Framing, backend: Framing, aligned: bool) -> Self {
        Self {
            frontend: Framer::new(Direction::FromFrontend, frontend),
            backend: Framer::new(Direction::FromBackend, backend),
            frames: Vec::new(),
            state: StreamState::Active,
            user: None,
            database: None,
            pending: VecDeque::new(),
            ops: HashMap::new(),
            next_op: 0,
            segment: None,
            skipping_to_sync: false,
            aligned,
            tentative: !aligned,
            held: Vec::new(),
            statements: HashMap::new(),
            portals: HashMap::new(),
            memo: VecDeque::new(),
            events: VecDeque::new(),
            stats: PgStreamStats::default(),
        }
    }

    /// Feeds one captured read or write: `bytes` is what was captured of
    /// it, `original_len` its full length (larger when only a prefix was
    /// captured), `timestamp_ns` when it happened.
    pub fn feed(
        &mut self,
        direction: Direction,
        bytes: &[u8],
        original_len: usize,
        timestamp_ns: u64,
    ) {
        self.feed_with_tail(direction, bytes, &[], original_len, timestamp_ns);
    }

    /// Like [`feed`](Self::feed), when the capture also kept the last
    /// bytes of the syscall (`tail`): a request's or reply's last messages
    /// (Execute/Sync, CommandComplete/ReadyForQuery) are then seen even
    /// after a long parameter or row. `prefix` and `tail` may overlap.
    pub fn feed_with_tail(
        &mut self,
        direction: Direction,
        prefix: &[u8],
        tail: &[u8],
        original_len: usize,
        timestamp_ns: u64,
    ) {
        if self.state != StreamState::Active {
            return;
        }
        let original_len = original_len.max(prefix.len());
        // Only the part of the tail past the prefix is new.
        let unseen = original_len - prefix.len();
        let tail = &tail[tail.len() - tail.len().min(unseen)..];
        let gap = (original_len - prefix.len() - tail.len()) as u64;
        let mut frames = std::mem::take(&mut self.frames);
        let framer = match direction {
            Direction::FromFrontend => &mut self.frontend,
            Direction::FromBackend => &mut self.backend,
        };
        framer.feed(prefix, gap, tail, timestamp_ns, &mut frames);
        let lost_too_long = framer.framing == Framing::Lost && framer.lost_bytes > MAX_LOST_BYTES;
        for frame in frames.drain(..) {
            if self.state != StreamState::Active {
                break;
            }
            match direction {
                Direction::FromFrontend => self.on_frontend(frame),
                Direction::FromBackend => self.on_backend(frame),
            }
        }
        self.frames = frames;
        if self.state == StreamState::Active
            && (lost_too_long || self.stats.parse_errors >= MAX_PARSE_ERRORS)
        {
            self.abandon();
        }
    }

    /// Completed operations since the last call, oldest first.
    pub fn drain_events(&mut self) -> impl Iterator<Item = QueryEvent> + '_ {
        self.events.drain(..)
    }

    pub fn stats(&self) -> PgStreamStats {
        self.stats
    }

    pub fn parse_errors(&self) -> u64 {
        self.stats.parse_errors
    }

    pub fn state(&self) -> StreamState {
        self.state
    }

    /// The database from the StartupMessage (the user's name when the
    /// message names none, as the server does).
    pub fn database(&self) -> Option<&str> {
        self.database.as_deref().or(self.user.as_deref())
    }

    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn abandon(&mut self) {
        self.state = StreamState::Abandoned;
        self.frontend.stop();
        self.backend.stop();
        self.pending.clear();
        self.ops.clear();
        self.statements.clear();
        self.portals.clear();
    }

    fn parse_error(&mut self) {
        self.stats.parse_errors += 1;
    }

    // --- frontend ---------------------------------------------------------

    fn on_frontend(&mut self, frame: Frame) {
        match frame {
            Frame::Startup { code, body } => self.on_startup(code, &body),
            Frame::Message {
                tag,
                body,
                start_ns,
                ..
            } => self.on_request(tag, &body, start_ns),
            Frame::DirectTls => {
                self.state = StreamState::Encrypted;
                self.backend.stop();
            }
            Frame::Lost => {
                self.stats.framing_lost += 1;
                self.unseen_requests();
            }
            Frame::Malformed => {
                self.parse_error();
                self.unseen_requests();
            }
            Frame::Resynced => self.stats.resyncs += 1,
            Frame::EncryptionAnswer(_) => {}
        }
    }

    fn on_startup(&mut self, code: u32, body: &[u8]) {
        match code {
            SSL_REQUEST | GSSENC_REQUEST => self.backend.framing = Framing::Answer,
            CANCEL_REQUEST => {
                self.state = StreamState::Cancel;
                self.backend.stop();
            }
            _ => {
                let mut fields = body.split(|&b| b == 0);
                while let (Some(key), Some(value)) = (fields.next(), fields.next()) {
                    if key.is_empty() {
                        break;
                    }
                    let value =
                        String::from_utf8_lossy(&value[..value.len().min(MAX_NAME)]).into_owned();
                    match key {
                        b"user" => self.user = Some(value),
                        b"database" => self.database = Some(value),
                        _ => {}
                    }
                }
                self.push(Expect::Startup, None);
            }
        }
    }

    /// Requests went by unseen: whatever they were, their replies come
    /// before those of the requests seen next, and they may have redefined
    /// the unnamed statement and portal.
    fn unseen_requests(&mut self) {
        self.segment = None;
        self.statements.remove(&b""[..]);
        self.portals.remove(&b""[..]);
        if !matches!(self.pending.back(), Some(p) if p.expect == Expect::Unknown) {
            self.push(Expect::Unknown, None);
        }
    }

    fn on_request(&mut self, tag: u8, body: &[u8], ts: u64) {
        if tag == b'X' {
            self.state = StreamState::Terminated;
            return;
        }
        if self.skipping_to_sync {
            if tag != b'S' {
                return;
            }
            self.skipping_to_sync = false;
        }
        match tag {
            b'Q' => {
                self.segment = None;
                let sql = until_nul(body);
                // Without its NUL, the text was cut short.
                let statement = self.statement(sql, sql.len() == body.len());
                let op = self.new_op(Some(statement), Protocol::Simple, ts);
                self.push(Expect::Simple, Some(op));
            }
            b'P' => {
                let name = until_nul(body);
                let rest = &body[(name.len() + 1).min(body.len())..];
                let sql = until_nul(rest);
                let statement = self.statement(sql, sql.len() == rest.len());
                self.remember(name, statement.clone());
                let op = self.segment_op(ts);
                let op_entry = self.ops.get_mut(&op).expect("segment op exists");
                op_entry.statement.get_or_insert(statement);
                self.push(Expect::Parse, Some(op));
            }
            b'B' => {
                let portal = until_nul(body);
                let rest = &body[(portal.len() + 1).min(body.len())..];
                let name = until_nul(rest);
                let statement = self.statements.get(name).cloned();
                if self.portals.len() >= MAX_PORTALS && !self.portals.contains_key(portal) {
                    self.portals.clear();
                }
                self.portals.insert(clip(portal), statement.clone());
                let op = self.segment_op(ts);
                self.ops.get_mut(&op).expect("segment op exists").statement = statement;
                self.push(Expect::Bind, Some(op));
            }
            b'D' => {
                let op = self.segment_op(ts);
                let expect = if body.first() == Some(&b'S') {
                    Expect::DescribeStatement {
                        got_parameters: false,
                    }
                } else {
                    Expect::DescribePortal
                };
                self.push(expect, Some(op));
            }
            b'E' => {
                let portal = until_nul(body);
                let op = self.segment_op(ts);
                let statement = self.portals.get(portal).cloned();
                let entry = self.ops.get_mut(&op).expect("segment op exists");
                entry.executes = true;
                match statement {
                    Some(s) => entry.statement = s,
                    // Bound before capture began.
                    None => entry.statement = None,
                }
                self.segment = None;
                self.push(Expect::Execute, Some(op));
            }
            b'C' => {
                let name = body.get(1..).map(until_nul).unwrap_or_default();
                match body.first() {
                    Some(b'S') => {
                        self.statements.remove(name);
                    }
                    Some(_) => {
                        self.portals.remove(name);
                    }
                    None => {}
                }
                self.push(Expect::Close, None);
            }
            b'S' => {
                self.segment = None;
                self.push(Expect::Sync, None);
            }
            b'F' => {
                self.segment = None;
                self.push(Expect::Function, None);
            }
            // Flush, CopyData/CopyDone/CopyFail, authentication responses:
            // no reply of their own.
            _ => {}
        }
    }

    /// The template of a statement's text, remembered for the texts seen
    /// last (a prepared or parameterised statement repeats verbatim).
    fn statement(&mut self, sql: &[u8], cut_short: bool) -> Statement {
        let sql = &sql[..sql.len().min(MAX_SQL)];
        let cut_short = cut_short || sql.len() == MAX_SQL;
        let mut h = DefaultHasher::new();
        sql.hash(&mut h);
        let key = h.finish();
        if let Some((_, _, s)) = self
            .memo
            .iter()
            .find(|(k, c, _)| *k == key && *c == cut_short)
        {
            return s.clone();
        }
        let n = normalize(&String::from_utf8_lossy(sql), cut_short);
        let statement = Statement {
            template: n.template.into(),
            operation: n.operation,
        };
        if self.memo.len() >= TEMPLATE_MEMO {
            self.memo.pop_front();
        }
        self.memo.push_back((key, cut_short, statement.clone()));
        statement
    }

    fn remember(&mut self, name: &[u8], statement: Statement) {
        if self.statements.len() >= MAX_STATEMENTS
            && !self.statements.contains_key(name)
            && let Some(evict) = self.statements.keys().next().cloned()
        {
            self.statements.remove(&evict);
        }
        self.statements.insert(clip(name), statement);
    }

    fn new_op(&mut self, statement: Option<Statement>, protocol: Protocol, ts: u64) -> u64 {
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(
            id,
            Op {
                statement,
                protocol,
                start_ns: ts,
                rows: None,
                data_rows: 0,
                failed: false,
                sqlstate: None,
                answered_ns: None,
                executes: protocol == Protocol::Simple,
            },
        );
        id
    }

    fn segment_op(&mut self, ts: u64) -> u64 {
        match self.segment {
            Some(op) if self.ops.contains_key(&op) => op,
            _ => {
                let op = self.new_op(None, Protocol::Extended, ts);
                self.segment = Some(op);
                op
            }
        }
    }

    fn push(&mut self, expect: Expect, op: Option<u64>) {
        if self.pending.len() >= MAX_PENDING {
            // Replies are not coming (or not captured): start over.
            self.parse_error();
            self.stats.dropped_requests += self.pending.len() as u64;
            self.pending.clear();
            self.ops.retain(|id, _| Some(*id) == op);
            self.aligned = false;
            self.pending.push_back(Pending {
                expect: Expect::Unknown,
                op: None,
                dropped: true,
            });
        }
        self.pending.push_back(Pending {
            expect,
            op,
            dropped: expect == Expect::Unknown,
        });
    }

    // --- backend ----------------------------------------------------------

    fn on_backend(&mut self, frame: Frame) {
        match frame {
            Frame::Message {
                tag, body, end_ns, ..
            } => self.on_reply(tag, &body, end_ns),
            Frame::EncryptionAnswer(b'N') => {}
            Frame::EncryptionAnswer(_) => {
                self.state = StreamState::Encrypted;
                self.frontend.stop();
            }
            Frame::Lost | Frame::Malformed => {
                if matches!(frame, Frame::Lost) {
                    // Replies went unseen, not wrong: what paired so far
                    // stands.
                    self.stats.framing_lost += 1;
                    if self.tentative {
                        self.confirm();
                    }
                } else {
                    self.parse_error();
                    self.unconfirm();
                }
                // Some replies went unseen: no request waiting now can be
                // reported, and the next ones pair after a ReadyForQuery.
                self.drop_pending();
            }
            Frame::Resynced => self.stats.resyncs += 1,
            Frame::Startup { .. } | Frame::DirectTls => {}
        }
    }

    fn drop_pending(&mut self) {
        // A simple query already answered lost only its ReadyForQuery (a
        // capture prefix too short for a whole reply): report it as of
        // its answer.
        if let Some(head) = self.pending.front().copied()
            && head.expect == Expect::Simple
            && !head.dropped
            && let Some(id) = head.op
            && let Some(answered) = self.ops.get(&id).and_then(|op| op.answered_ns)
        {
            self.report(id, answered);
        }
        for p in &mut self.pending {
            if !p.dropped {
                p.dropped = true;
                self.stats.dropped_requests += 1;
            }
        }
        self.aligned = false;
    }

    fn on_reply(&mut self, tag: u8, body: &[u8], ts: u64) {
        // Asynchronous messages, valid anywhere.
        if matches!(tag, b'N' | b'A' | b'S') {
            return;
        }
        loop {
            let Some(head) = self.pending.front().copied() else {
                if tag == b'Z' {
                    // Idle, with nothing asked: replies pair from here on.
                    self.aligned = true;
                } else if self.aligned && tag != b'E' {
                    self.parse_error();
                    self.aligned = false;
                }
                return;
            };
            if head.dropped {
                if !self.recover(tag) {
                    return;
                }
                // A fresh request fits: pair it.
                continue;
            }
            if self.pair(head, tag, body, ts) {
                self.aligned = true;
                return;
            }
            // The reply fits nothing waiting: the queue has lost its place
            // (expected while unconfirmed: unseen requests' replies).
            if self.aligned && !self.tentative {
                self.parse_error();
            }
            self.unconfirm();
            self.drop_pending();
        }
    }

    /// With unreportable requests at the head: skips their replies. Returns
    /// true when `tag` starts the reply to the first reportable request,
    /// which is then at the head.
    fn recover(&mut self, tag: u8) -> bool {
        if tag == b'Z' {
            // Ends the oldest group: pop it.
            while let Some(p) = self.pending.pop_front() {
                self.finish_item(p);
                if p.expect.ends_group() {
                    break;
                }
            }
            if self.pending.is_empty() {
                self.aligned = true;
            }
            return false;
        }
        // Lost requests' replies (an Unknown group) end only with a
        // ReadyForQuery; seen requests' may end unseen.
        let Some(k) = self.pending.iter().position(|p| !p.dropped) else {
            return false;
        };
        let unknown_before = self
            .pending
            .iter()
            .take(k)
            .any(|p| p.expect == Expect::Unknown);
        if unknown_before || !self.pending[k].expect.first_reply(tag) {
            return false;
        }
        for _ in 0..k {
            let p = self.pending.pop_front().expect("k items");
            self.finish_item(p);
        }
        true
    }

    /// Pairs `tag` with the request at the head. False if it cannot be a
    /// reply to it.
    fn pair(&mut self, head: Pending, tag: u8, body: &[u8], ts: u64) -> bool {
        if tag == b'E'
            && !matches!(
                head.expect,
                Expect::Startup | Expect::Simple | Expect::Function
            )
        {
            if head.expect == Expect::Sync {
                // A FATAL error outside any request (e.g. shutdown).
                return true;
            }
            self.extended_error(head, sqlstate(body), ts);
            return true;
        }
        let op = head.op.and_then(|id| self.ops.get_mut(&id));
        let done = match (head.expect, tag) {
            (Expect::Startup, b'R' | b'K' | b'v' | b'E') => false,
            (Expect::Startup | Expect::Simple | Expect::Function | Expect::Sync, b'Z') => true,
            (Expect::Simple, b'T' | b'D' | b'G' | b'H' | b'W' | b'd' | b'c') => false,
            (Expect::Simple, b'C' | b'I') => {
                if let Some(op) = op {
                    if let Some(rows) = command_rows(body) {
                        op.rows = Some(op.rows.unwrap_or(0) + rows);
                    }
                    op.answered_ns = Some(ts);
                }
                false
            }
            (Expect::Simple, b'E') => {
                if let Some(op) = op {
                    if !op.failed {
                        op.failed = true;
                        op.sqlstate = sqlstate(body);
                    }
                    op.answered_ns = Some(ts);
                }
                false
            }
            (Expect::Function, b'V' | b'E') => false,
            (Expect::Parse, b'1') | (Expect::Bind, b'2') | (Expect::Close, b'3') => true,
            (
                Expect::DescribeStatement {
                    got_parameters: false,
                },
                b't',
            ) => {
                self.pending[0].expect = Expect::DescribeStatement {
                    got_parameters: true,
                };
                false
            }
            (Expect::DescribeStatement { .. } | Expect::DescribePortal, b'T' | b'n') => true,
            (Expect::Execute, b'D') => {
                if let Some(op) = op {
                    op.data_rows += 1;
                }
                false
            }
            (Expect::Execute, b'G' | b'H' | b'W' | b'd' | b'c') => false,
            (Expect::Execute, b'C' | b'I' | b's') => {
                if let Some(op) = op {
                    op.rows = match tag {
                        b'C' => command_rows(body),
                        b's' => Some(op.data_rows),
                        _ => None,
                    };
                }
                if let Some(id) = head.op {
                    self.report(id, ts);
                }
                true
            }
            _ => return false,
        };
        if done {
            let p = self.pending.pop_front().expect("head exists");
            if p.expect == Expect::Simple
                && let Some(id) = p.op
            {
                self.report(id, ts);
            }
            self.finish_item(p);
            if tag == b'Z' && self.tentative {
                self.confirm();
            }
        }
        true
    }

    /// An ErrorResponse to an extended-protocol request: its group fails
    /// and the server ignores everything up to the next Sync.
    fn extended_error(&mut self, head: Pending, state: Option<SqlState>, ts: u64) {
        if let Some(id) = head.op
            && let Some(op) = self.ops.get_mut(&id)
        {
            op.failed = true;
            op.sqlstate = state;
            // A failed Parse or Bind fails the statement even with no
            // Execute sent.
            op.executes = true;
            self.report(id, ts);
        }
        while let Some(p) = self.pending.front().copied() {
            if matches!(p.expect, Expect::Sync | Expect::Unknown) {
                return;
            }
            self.pending.pop_front();
            self.finish_item(p);
        }
        // The Sync is still to come: the server skips until it.
        self.skipping_to_sync = true;
        self.segment = None;
    }

    /// Reports an operation once (if its statement is known).
    fn report(&mut self, id: u64, end_ns: u64) {
        let Some(op) = self.ops.get_mut(&id) else {
            return;
        };
        if !op.executes {
            return;
        }
        // Reported now; a later reply of the same group must not again.
        op.executes = false;
        let Some(statement) = op.statement.clone() else {
            self.stats.unknown_statements += 1;
            return;
        };
        let event = QueryEvent {
            template: statement.template,
            operation: statement.operation,
            protocol: op.protocol,
            start_ns: op.start_ns,
            end_ns,
            status: if op.failed { Status::Error } else { Status::Ok },
            sqlstate: op.sqlstate,
            rows: op.rows,
        };
        if self.tentative {
            if self.held.len() < MAX_EVENTS {
                self.held.push(event);
            } else {
                self.stats.events_dropped += 1;
            }
        } else {
            self.emit(event);
        }
    }

    fn emit(&mut self, event: QueryEvent) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
            self.stats.events_dropped += 1;
        }
        self.events.push_back(event);
    }

    /// The pairing held: release what it produced.
    fn confirm(&mut self) {
        self.tentative = false;
        for event in std::mem::take(&mut self.held) {
            self.emit(event);
        }
    }

    /// The pairing failed: what it produced may be wrong.
    fn unconfirm(&mut self) {
        self.stats.dropped_requests += self.held.len() as u64;
        self.held.clear();
        self.tentative = true;
    }

    /// Forgets a popped request's operation once nothing else refers to it.
    fn finish_item(&mut self, p: Pending) {
        let Some(id) = p.op else {
            return;
        };
        let still_used = self.segment == Some(id) || self.pending.iter().any(|q| q.op == Some(id));
        if !still_used {
            self.ops.remove(&id);
        }
    }
}

fn until_nul(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

fn clip(name: &[u8]) -> Box<[u8]> {
    name[..name.len().min(MAX_NAME)].into()
}

/// The SQLSTATE (field `C`) of an ErrorResponse body.
fn sqlstate(body: &[u8]) -> Option<SqlState> {
    let mut at = 0;
    while at < body.len() && body[at] != 0 {
        let code = body[at];
        let value = until_nul(&body[at + 1..]);
        if code == b'C' {
            return SqlState::parse(value);
        }
        at += 1 + value.len() + 1;
    }
    None
}

/// The row count at the end of a CommandComplete tag (`SELECT 5`,
/// `INSERT 0 1`, `COPY 3`, …), if the command has one.
fn command_rows(body: &[u8]) -> Option<u64> {
    let tag = std::str::from_utf8(until_nul(body)).ok()?;
    let mut words = tag.split_ascii_whitespace();
    let command = words.next()?;
    if !matches!(
        command,
        "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "FETCH" | "MOVE" | "COPY"
    ) {
        return None;
    }
    words.last()?.parse().ok()
}

#[cfg(test)]
mod tests;
