//! PostgreSQL v3 wire protocol framing, both directions, from captures that
//! may be cut short: the parser keeps its place with message lengths
//! through bytes it never saw, and finds its place again (resynchronises)
//! when a header itself went unseen or when it attaches to a connection
//! mid-stream. Protocol reference: PostgreSQL documentation, "Frontend/Backend
//! Protocol", sections "Message Flow" and "Message Formats".

/// Which side of the protocol wrote the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Frontend,
    Backend,
}

/// One piece of a captured syscall: bytes seen, or bytes that went by
/// unseen (the part of a large read or write past the captured prefix).
#[derive(Clone, Copy, Debug)]
pub enum Segment<'a> {
    Bytes(&'a [u8]),
    Gap(u64),
}

/// A complete message, with as much of its body as was captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Type byte; 0 for the untagged startup-phase messages.
    pub tag: u8,
    /// The body (after the length), possibly cut at [`MAX_BODY`] or where
    /// the capture ended.
    pub body: Vec<u8>,
    /// Whether `body` is the whole body.
    pub complete: bool,
}

/// Body bytes kept per message; the rest is skipped by length.
pub const MAX_BODY: usize = 16 * 1024;
/// Largest length a real message has (the server's limit is 1 GiB).
const MAX_LEN: u32 = 1 << 30;

pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;
pub const PROTOCOL_V3: u32 = 196_608;

/// Type bytes a frontend sends after startup.
pub fn frontend_tag(t: u8) -> bool {
    matches!(
        t,
        b'Q' | b'P'
            | b'B'
            | b'D'
            | b'E'
            | b'S'
            | b'H'
            | b'C'
            | b'X'
            | b'd'
            | b'c'
            | b'f'
            | b'F'
            | b'p'
    )
}

/// Type bytes a backend sends.
pub fn backend_tag(t: u8) -> bool {
    matches!(
        t,
        b'R' | b'S'
            | b'K'
            | b'Z'
            | b'T'
            | b'D'
            | b'C'
            | b'E'
            | b'N'
            | b'I'
            | b'1'
            | b'2'
            | b'3'
            | b'n'
            | b't'
            | b's'
            | b'G'
            | b'H'
            | b'W'
            | b'd'
            | b'c'
            | b'A'
            | b'v'
            | b'V'
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Collecting a header (type byte and length).
    Header,
    /// Inside a body: `remaining` bytes to go.
    Body { remaining: u64 },
    /// Lost: waiting for a place where a message plausibly starts.
    Lost,
}

/// Incremental framer for one direction of one connection.
#[derive(Debug)]
pub struct Framer {
    side: Side,
    state: State,
    /// Frontend before the StartupMessage: messages have no type byte.
    startup_phase: bool,
    /// Backend right after an SSLRequest/GSSENCRequest: one bare byte.
    pub expect_single_byte: bool,
    header: [u8; 5],
    header_len: usize,
    tag: u8,
    body: Vec<u8>,
    body_complete: bool,
    /// Times framing was lost.
    pub errors: u64,
}

impl Framer {
    pub fn new(side: Side, from_start: bool) -> Self {
        Self {
            side,
            state: if from_start {
                State::Header
            } else {
                State::Lost
            },
            startup_phase: side == Side::Frontend && from_start,
            expect_single_byte: false,
            header: [0; 5],
            header_len: 0,
            tag: 0,
            body: Vec::new(),
            body_complete: true,
            errors: 0,
        }
    }

    /// After an SSLRequest answered `N`, the frontend sends its startup.
    pub fn restart_startup(&mut self) {
        self.startup_phase = true;
    }

    #[cfg(test)]
    pub fn is_lost(&self) -> bool {
        self.state == State::Lost
    }

    fn header_size(&self) -> usize {
        if self.startup_phase { 4 } else { 5 }
    }

    fn lose(&mut self) {
        if self.state != State::Lost {
            self.errors += 1;
        }
        self.state = State::Lost;
        self.header_len = 0;
        self.body.clear();
    }

    /// Feeds one segment; completed messages are appended to `out`.
    /// `chunk_start` says the segment begins a syscall's data, where writers
    /// almost always begin a message: the place to try to resynchronise.
    pub fn feed(&mut self, seg: Segment<'_>, chunk_start: bool, out: &mut Vec<Message>) {
        match seg {
            Segment::Gap(n) => self.skip(n, out),
            Segment::Bytes(b) => {
                if self.state == State::Lost {
                    if chunk_start && self.plausible_start(b) {
                        self.state = State::Header;
                    } else if self.side == Side::Backend {
                        self.resync_on_ready(b, out);
                        return;
                    } else {
                        return;
                    }
                }
                self.bytes(b, out);
            }
        }
    }

    fn skip(&mut self, n: u64, out: &mut Vec<Message>) {
        if n == 0 {
            return;
        }
        match self.state {
            State::Body { remaining } if n <= remaining => {
                self.body_complete = false;
                let left = remaining - n;
                self.state = State::Body { remaining: left };
                if left == 0 {
                    self.finish(out);
                }
            }
            State::Lost => {}
            _ => self.lose(),
        }
    }

    fn bytes(&mut self, mut b: &[u8], out: &mut Vec<Message>) {
        while !b.is_empty() {
            match self.state {
                State::Lost => return,
                State::Header => {
                    if self.expect_single_byte && self.side == Side::Backend {
                        self.expect_single_byte = false;
                        out.push(Message {
                            tag: b[0],
                            body: Vec::new(),
                            complete: true,
                        });
                        b = &b[1..];
                        continue;
                    }
                    let need = self.header_size() - self.header_len;
                    let take = need.min(b.len());
                    self.header[self.header_len..self.header_len + take]
                        .copy_from_slice(&b[..take]);
                    self.header_len += take;
                    b = &b[take..];
                    if self.header_len < self.header_size() {
                        return;
                    }
                    let (tag, len_bytes) = if self.startup_phase {
                        (0u8, &self.header[..4])
                    } else {
                        (self.header[0], &self.header[1..5])
                    };
                    let len = u32::from_be_bytes(len_bytes.try_into().expect("4 bytes"));
                    self.header_len = 0;
                    let valid_tag = self.startup_phase
                        || match self.side {
                            Side::Frontend => frontend_tag(tag),
                            Side::Backend => backend_tag(tag),
                        };
                    if !valid_tag
                        || !(4..=MAX_LEN).contains(&len)
                        || (self.startup_phase && len < 8)
                    {
                        self.lose();
                        return;
                    }
                    self.tag = tag;
                    self.body.clear();
                    self.body_complete = true;
                    self.state = State::Body {
                        remaining: u64::from(len - 4),
                    };
                    if len == 4 {
                        self.finish(out);
                    }
                }
                State::Body { remaining } => {
                    let take = (remaining as usize).min(b.len());
                    // Bytes after a gap are not the body's next bytes: kept,
                    // they would glue a statement's end (the capture's
                    // tail, a later piece) onto its start, a text nobody
                    // sent. The body stays the prefix that was seen.
                    let room = if self.body_complete {
                        MAX_BODY.saturating_sub(self.body.len())
                    } else {
                        0
                    };
                    let keep = take.min(room);
                    self.body.extend_from_slice(&b[..keep]);
                    if keep < take {
                        self.body_complete = false;
                    }
                    b = &b[take..];
                    let left = remaining - take as u64;
                    self.state = State::Body { remaining: left };
                    if left == 0 {
                        self.finish(out);
                    }
                }
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<Message>) {
        let msg = Message {
            tag: self.tag,
            body: std::mem::take(&mut self.body),
            complete: self.body_complete,
        };
        if self.startup_phase {
            // Only the v3 StartupMessage ends the untagged phase; an
            // SSLRequest is followed by another untagged message.
            let code = msg
                .body
                .get(..4)
                .map(|c| u32::from_be_bytes(c.try_into().expect("4")));
            if code == Some(PROTOCOL_V3) || code.is_some_and(|c| c >> 16 == 3) {
                self.startup_phase = false;
            }
        }
        self.state = State::Header;
        out.push(msg);
    }

    /// Whether `b` plausibly starts with a message of this side: a known
    /// type byte and a sane length, followed by another plausible header
    /// or by the end of the data.
    fn plausible_start(&self, b: &[u8]) -> bool {
        let mut at = 0usize;
        let mut seen = 0;
        while at + 5 <= b.len() && seen < 4 {
            let tag = b[at];
            let ok_tag = match self.side {
                Side::Frontend => frontend_tag(tag),
                Side::Backend => backend_tag(tag),
            };
            let len = u32::from_be_bytes(b[at + 1..at + 5].try_into().expect("4"));
            if !ok_tag || !(4..=MAX_LEN).contains(&len) {
                return false;
            }
            seen += 1;
            at += 1 + len as usize;
        }
        seen > 0 && (at >= b.len() || seen == 4)
    }

    /// A backend's reply to a batch ends with ReadyForQuery
    /// (`Z`, length 5, status I/T/E): found at the end of a piece of data,
    /// it is a message boundary to resume from.
    fn resync_on_ready(&mut self, b: &[u8], out: &mut Vec<Message>) {
        if b.len() >= 6 {
            let z = &b[b.len() - 6..];
            if z[0] == b'Z' && z[1..5] == [0, 0, 0, 5] && matches!(z[5], b'I' | b'T' | b'E') {
                out.push(Message {
                    tag: b'Z',
                    body: vec![z[5]],
                    complete: true,
                });
                self.state = State::Header;
                self.header_len = 0;
            }
        }
    }
}

/// Reads a NUL-terminated string at the start of `b`: (string, rest).
pub fn cstr(b: &[u8]) -> Option<(&str, &[u8])> {
    let end = b.iter().position(|c| *c == 0)?;
    let s = std::str::from_utf8(&b[..end]).ok()?;
    Some((s, &b[end + 1..]))
}

/// The `C` (SQLSTATE) field of an ErrorResponse body.
pub fn sqlstate(body: &[u8]) -> Option<String> {
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            return None;
        }
        let (value, after) = cstr(tail)?;
        if code == b'C' {
            let valid = value.len() == 5 && value.bytes().all(|c| c.is_ascii_alphanumeric());
            return valid.then(|| value.to_owned());
        }
        rest = after;
    }
    None
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

    fn run(f: &mut Framer, segs: &[(Segment<'_>, bool)]) -> Vec<Message> {
        let mut out = Vec::new();
        for (s, start) in segs {
            f.feed(*s, *start, &mut out);
        }
        out
    }

    #[test]
    fn frames_across_arbitrary_splits() {
        let mut stream = msg(b'Q', b"SELECT 1\0");
        stream.extend(msg(b'S', b""));
        stream.extend(msg(b'X', b""));
        for split in 0..stream.len() {
            let mut f = Framer::new(Side::Frontend, false);
            f.state = State::Header;
            let out = run(
                &mut f,
                &[
                    (Segment::Bytes(&stream[..split]), true),
                    (Segment::Bytes(&stream[split..]), false),
                ],
            );
            let tags: Vec<u8> = out.iter().map(|m| m.tag).collect();
            assert_eq!(tags, b"QSX", "split at {split}");
            assert_eq!(out[0].body, b"SELECT 1\0");
        }
    }

    #[test]
    fn unseen_bytes_are_skipped_by_length() {
        let big = vec![b'x'; 10_000];
        let mut data = msg(b'D', &big);
        data.extend(msg(b'C', b"SELECT 1\0"));
        data.extend(msg(b'Z', b"I"));
        let mut f = Framer::new(Side::Backend, true);
        // 64 bytes seen, the rest of the DataRow unseen, the tail seen.
        let tail_from = data.len() - 20;
        let out = run(
            &mut f,
            &[
                (Segment::Bytes(&data[..64]), true),
                (Segment::Gap((tail_from - 64) as u64), false),
                (Segment::Bytes(&data[tail_from..]), false),
            ],
        );
        let tags: Vec<u8> = out.iter().map(|m| m.tag).collect();
        assert_eq!(tags, b"DCZ");
        assert!(!out[0].complete);
        assert_eq!(out[1].body, b"SELECT 1\0");
    }

    /// Found by `streams::reassembly_tests`: the tail of a long Query
    /// was appended to its prefix, and the statement reported was the two
    /// glued together.
    #[test]
    fn a_body_cut_by_the_capture_is_its_seen_prefix_only() {
        let text = format!(
            "SELECT * FROM t WHERE id IN ({}) AND k = 1\0",
            "7, ".repeat(400)
        );
        let q = msg(b'Q', text.as_bytes());
        let mut f = Framer::new(Side::Frontend, false);
        f.state = State::Header;
        let tail_from = q.len() - 30;
        let out = run(
            &mut f,
            &[
                (Segment::Bytes(&q[..64]), true),
                (Segment::Gap((tail_from - 64) as u64), false),
                (Segment::Bytes(&q[tail_from..]), false),
            ],
        );
        assert_eq!(out.len(), 1);
        assert!(!out[0].complete);
        assert_eq!(out[0].body, &q[5..64]);
    }

    #[test]
    fn a_header_lost_in_a_gap_resyncs_on_ready_for_query() {
        let mut data = msg(b'D', &[b'x'; 100]);
        data.extend(msg(b'D', &[b'y'; 100]));
        data.extend(msg(b'C', b"SELECT 2\0"));
        data.extend(msg(b'Z', b"I"));
        let mut f = Framer::new(Side::Backend, true);
        let out = run(
            &mut f,
            &[
                (Segment::Bytes(&data[..50]), true),
                (Segment::Gap(100), false),
                (Segment::Bytes(&data[150..data.len() - 30]), false),
                (Segment::Bytes(&data[data.len() - 30..]), false),
            ],
        );
        assert_eq!(out.last().map(|m| m.tag), Some(b'Z'));
        assert_eq!(f.errors, 1);
        assert!(!f.is_lost());
    }

    #[test]
    fn startup_then_tagged() {
        let mut startup = Vec::new();
        let body = b"\x00\x03\x00\x00user\0bob\0database\0shop\0\0";
        startup.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        startup.extend_from_slice(body);
        startup.extend(msg(b'Q', b"SELECT 1\0"));
        let mut f = Framer::new(Side::Frontend, true);
        let out = run(&mut f, &[(Segment::Bytes(&startup), true)]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].tag, 0);
        assert_eq!(out[1].tag, b'Q');
    }

    #[test]
    fn garbage_loses_framing_without_panicking() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        for _ in 0..2000 {
            let mut buf = vec![0u8; 300];
            for b in &mut buf {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            for side in [Side::Frontend, Side::Backend] {
                let mut f = Framer::new(side, true);
                let mut out = Vec::new();
                f.feed(Segment::Bytes(&buf), true, &mut out);
                f.feed(Segment::Gap(u64::MAX / 2), false, &mut out);
                f.feed(Segment::Bytes(&buf), true, &mut out);
                assert!(out.iter().all(|m| m.body.len() <= MAX_BODY));
            }
        }
    }

    #[test]
    fn sqlstate_is_read_from_the_error_fields() {
        let body = b"SERROR\0VERROR\0C42601\0Msyntax error at or near \"SELEC\"\0\0";
        assert_eq!(sqlstate(body).as_deref(), Some("42601"));
        assert_eq!(sqlstate(b"SERROR\0\0"), None);
        assert_eq!(sqlstate(b"C12"), None);
    }
}
