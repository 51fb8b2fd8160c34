//! One connection, both directions: HTTP/1.1 requests paired with their
//! responses in order (pipelining included), and after an accepted
//! WebSocket upgrade, each side's frames.

use std::collections::VecDeque;

use super::{
    ControlKind, Direction, HttpRequest, Method, ParseError, Role, WebEvent,
    frame::{FrameItem, FrameReader},
    http::{self, BodyLength, BodyReader, HeadReader, RequestHead, ResponseHead, Upgrade},
};

/// Requests awaiting their response, at most (pipelining depth).
const MAX_PENDING: usize = 256;
/// Bytes a client may send after an upgrade request before the answer
/// says what they are.
const MAX_HELD: usize = 16 * 1024;
const MAX_HELD_SEGMENTS: usize = 64;

/// Where the stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamState {
    Http,
    /// An upgrade to WebSocket was accepted.
    WebSocket,
    /// A CONNECT tunnel or an upgrade to another protocol: not followed.
    Opaque,
    /// A parse error: nothing more is read (the end of a WebSocket session
    /// is still reported when the connection closes).
    Unparseable,
    /// [`WebStream::on_connection_closed`] was called.
    Closed,
}

/// A request whose response has not come.
#[derive(Debug)]
struct Pending {
    method: Method,
    route: String,
    start_ns: u64,
    upgrade: Upgrade,
    close: bool,
}

/// A response whose body is being skipped.
#[derive(Debug)]
struct Exchange {
    method: Method,
    route: String,
    status: u16,
    start_ns: u64,
    head_ns: u64,
    /// The connection ends after this response.
    close: bool,
    /// Its request was an upgrade (or CONNECT) that this response refused:
    /// what the client sent after it is HTTP again.
    release_held: bool,
}

#[derive(Debug)]
enum HeldSegment {
    Bytes(Vec<u8>, u64),
    Gap(u64, u64),
}

/// What one direction expects next.
#[derive(Debug)]
enum Side {
    Head(HeadReader),
    RequestBody {
        body: BodyReader,
        then_hold: bool,
    },
    ResponseBody {
        body: BodyReader,
        exchange: Exchange,
    },
    /// After an upgrade request: what follows is HTTP or frames depending
    /// on the response, so it is kept until then.
    Held {
        segments: Vec<HeldSegment>,
        bytes: usize,
    },
    Frames(FrameReader),
    Ignored,
}

impl Side {
    fn head() -> Self {
        Side::Head(HeadReader::default())
    }

    fn held() -> Self {
        Side::Held {
            segments: Vec::new(),
            bytes: 0,
        }
    }

    /// What the connection's end cut in the middle, if anything.
    fn cut_short(&self) -> Option<&'static str> {
        match self {
            Side::Head(h) if h.buffered() > 0 => Some("an HTTP header block"),
            Side::RequestBody { .. } => Some("an HTTP request body"),
            Side::ResponseBody { body, .. } if !matches!(body, BodyReader::UntilClose) => {
                Some("an HTTP response body")
            }
            Side::Frames(f) if f.in_frame() => Some("a WebSocket frame"),
            _ => None,
        }
    }

    #[cfg(test)]
    fn buffered(&self) -> usize {
        match self {
            Side::Head(h) => h.buffered(),
            Side::RequestBody { body, .. } | Side::ResponseBody { body, .. } => body.buffered(),
            Side::Held { bytes, .. } => *bytes,
            Side::Frames(_) | Side::Ignored => 0,
        }
    }
}

#[derive(Debug)]
struct Session {
    opened_ns: u64,
    /// Who sent the first close frame, and its code.
    first_close: Option<(Role, Option<u16>)>,
}

/// Incremental analyser of one TCP connection carrying HTTP/1.1, possibly
/// upgraded to WebSocket, fed with the captured reads and writes of the
/// traced process.
///
/// Memory is bounded: a header block is buffered up to 16 KiB, bytes sent
/// after an unanswered upgrade request up to 16 KiB, a chunk-size line up
/// to 1 KiB, a frame header up to 14 bytes; at most 256 requests await
/// their response. Events accumulate until [`drain_events`](Self::drain_events).
#[derive(Debug)]
pub struct WebStream {
    /// The traced process's end; `None` until the first bytes say.
    role: Option<Role>,
    sides: [Side; 2],
    pending: VecDeque<Pending>,
    session: Option<Session>,
    state: StreamState,
    events: VecDeque<WebEvent>,
    items: Vec<FrameItem>,
}

impl Default for WebStream {
    fn default() -> Self {
        Self::new()
    }
}

impl WebStream {
    /// A connection seen from its first byte: whichever side sends first
    /// is the client.
    pub fn new() -> Self {
        Self {
            role: None,
            sides: [Side::head(), Side::head()],
            pending: VecDeque::new(),
            session: None,
            state: StreamState::Http,
            events: VecDeque::new(),
            items: Vec::new(),
        }
    }

    /// A connection whose traced end is known (accepted: `Server`,
    /// connected: `Client`).
    pub fn with_role(role: Role) -> Self {
        Self {
            role: Some(role),
            ..Self::new()
        }
    }

    #[cfg(test)]
    pub fn role(&self) -> Option<Role> {
        self.role
    }

    #[cfg(test)]
    pub fn state(&self) -> StreamState {
        self.state
    }

    /// Bytes held in buffers for framing (bounded; see the type's doc).
    #[cfg(test)]
    pub fn buffered_bytes(&self) -> usize {
        self.sides.iter().map(Side::buffered).sum()
    }

    pub fn drain_events(&mut self) -> impl Iterator<Item = WebEvent> + '_ {
        self.events.drain(..)
    }

    /// Feeds one read (`Received`) or write (`Sent`) of the traced process:
    /// `bytes` is what was captured of it, `original_len` its full length
    /// (more when only a prefix was captured: the rest is skipped by
    /// length), `timestamp_ns` when it happened.
    #[cfg(test)]
    pub fn feed(
        &mut self,
        direction: Direction,
        bytes: &[u8],
        original_len: usize,
        timestamp_ns: u64,
    ) {
        self.feed_with_tail(direction, bytes, &[], original_len, timestamp_ns);
    }

    /// Like [`feed`](Self::feed), when the capture also kept the last bytes
    /// of the syscall (`tail`): framing there is read too — a small frame
    /// or a pipelined response after a long payload. `prefix` and `tail`
    /// may overlap. A framing element in the part between them still makes
    /// the stream unparseable.
    pub fn feed_with_tail(
        &mut self,
        direction: Direction,
        prefix: &[u8],
        tail: &[u8],
        original_len: usize,
        timestamp_ns: u64,
    ) {
        if !matches!(self.state, StreamState::Http | StreamState::WebSocket) {
            return;
        }
        let original_len = original_len.max(prefix.len());
        if original_len == 0 {
            return;
        }
        self.role.get_or_insert(match direction {
            Direction::Received => Role::Server,
            Direction::Sent => Role::Client,
        });
        // Only the part of the tail past the prefix is new.
        let unseen = original_len - prefix.len();
        let tail = &tail[tail.len() - tail.len().min(unseen)..];
        let gap = (unseen - tail.len()) as u64;
        let result = self
            .consume(direction, prefix, timestamp_ns)
            .and_then(|()| self.skip(direction, gap, timestamp_ns))
            .and_then(|()| self.consume(direction, tail, timestamp_ns));
        if let Err(error) = result {
            self.fail(error, timestamp_ns);
        }
    }

    /// The TCP connection ended (either side closed it, or it was reset).
    /// A body delimited by the close ends here; a WebSocket session still
    /// open ends, as 1006 if no close frame was seen.
    pub fn on_connection_closed(&mut self, timestamp_ns: u64) {
        if self.state == StreamState::Closed {
            return;
        }
        let parseable = matches!(self.state, StreamState::Http | StreamState::WebSocket);
        let mut cut = None;
        if parseable && self.role.is_some() {
            let i = self.responses_dir().index();
            if let Side::ResponseBody {
                body: BodyReader::UntilClose,
                ..
            } = self.sides[i]
                && let Side::ResponseBody { exchange, .. } =
                    std::mem::replace(&mut self.sides[i], Side::Ignored)
            {
                self.emit_exchange(&exchange, timestamp_ns);
            }
            cut = self.sides.iter().find_map(Side::cut_short);
        }
        if let Some(what) = cut {
            self.events.push_back(WebEvent::ParseError {
                error: ParseError::Truncated { what },
                ts_ns: timestamp_ns,
            });
        }
        self.end_session(timestamp_ns, parseable.then_some(1006));
        self.state = StreamState::Closed;
        self.sides = [Side::Ignored, Side::Ignored];
        self.pending.clear();
    }

    fn traced_role(&self) -> Role {
        self.role.unwrap_or(Role::Server)
    }

    /// The direction requests travel in, seen from the traced process.
    fn requests_dir(&self) -> Direction {
        match self.traced_role() {
            Role::Server => Direction::Received,
            Role::Client => Direction::Sent,
        }
    }

    fn responses_dir(&self) -> Direction {
        self.requests_dir().opposite()
    }

    /// The end that sent bytes going `direction`.
    fn sender(&self, direction: Direction) -> Role {
        match direction {
            Direction::Sent => self.traced_role(),
            Direction::Received => self.traced_role().other(),
        }
    }

    fn fail(&mut self, error: ParseError, ts_ns: u64) {
        log::debug!("HTTP/WebSocket stream unparseable: {error}");
        self.events.push_back(WebEvent::ParseError { error, ts_ns });
        self.state = StreamState::Unparseable;
        self.sides = [Side::Ignored, Side::Ignored];
        self.pending.clear();
    }

    fn consume(&mut self, d: Direction, mut input: &[u8], ts: u64) -> Result<(), ParseError> {
        let i = d.index();
        let requests = d == self.requests_dir();
        while !input.is_empty() {
            let used = match &mut self.sides[i] {
                Side::Head(reader) if requests => {
                    let (used, head) = reader.read(input, ts, http::parse_request)?;
                    if let Some((head, start)) = head {
                        self.on_request(d, head, start)?;
                    }
                    used
                }
                Side::Head(reader) => {
                    let (used, head) = reader.read(input, ts, http::parse_response)?;
                    if let Some((head, _)) = head {
                        self.on_response(d, head, ts)?;
                    }
                    used
                }
                Side::RequestBody { body, then_hold } => {
                    let hold = *then_hold;
                    let (used, done) = body.consume(input)?;
                    if done {
                        self.sides[i] = if hold { Side::held() } else { Side::head() };
                    }
                    used
                }
                Side::ResponseBody { body, .. } => {
                    let (used, done) = body.consume(input)?;
                    if done {
                        self.response_done(d, ts)?;
                    }
                    used
                }
                Side::Held { segments, bytes } => {
                    *bytes += input.len();
                    if *bytes > MAX_HELD || segments.len() >= MAX_HELD_SEGMENTS {
                        return Err(ParseError::HeldTooLong { limit: MAX_HELD });
                    }
                    segments.push(HeldSegment::Bytes(input.to_vec(), ts));
                    input.len()
                }
                Side::Frames(reader) => {
                    let mut items = std::mem::take(&mut self.items);
                    let result = reader.consume(input, &mut items);
                    // Frames completed before an error still count.
                    self.emit_items(d, &mut items, ts);
                    self.items = items;
                    result?;
                    input.len()
                }
                Side::Ignored => input.len(),
            };
            input = &input[used..];
        }
        Ok(())
    }

    fn skip(&mut self, d: Direction, mut n: u64, ts: u64) -> Result<(), ParseError> {
        let i = d.index();
        while n > 0 {
            let used = match &mut self.sides[i] {
                Side::Head(_) => {
                    return Err(ParseError::Unseen {
                        what: "an HTTP header block",
                    });
                }
                Side::RequestBody { body, then_hold } => {
                    let hold = *then_hold;
                    let (used, done) = body.skip(n)?;
                    if done {
                        self.sides[i] = if hold { Side::held() } else { Side::head() };
                    }
                    used
                }
                Side::ResponseBody { body, .. } => {
                    let (used, done) = body.skip(n)?;
                    if done {
                        self.response_done(d, ts)?;
                    }
                    used
                }
                Side::Held { segments, .. } => {
                    if segments.len() >= MAX_HELD_SEGMENTS {
                        return Err(ParseError::HeldTooLong { limit: MAX_HELD });
                    }
                    segments.push(HeldSegment::Gap(n, ts));
                    n
                }
                Side::Frames(reader) => {
                    let mut items = std::mem::take(&mut self.items);
                    let result = reader.skip(n, &mut items);
                    self.emit_items(d, &mut items, ts);
                    self.items = items;
                    result?;
                    n
                }
                Side::Ignored => n,
            };
            n -= used;
        }
        Ok(())
    }

    fn on_request(
        &mut self,
        d: Direction,
        head: RequestHead,
        start_ns: u64,
    ) -> Result<(), ParseError> {
        if self.pending.len() >= MAX_PENDING {
            return Err(ParseError::TooManyPending { limit: MAX_PENDING });
        }
        let hold = head.upgrade != Upgrade::None;
        self.pending.push_back(Pending {
            method: head.method,
            route: head.route,
            start_ns,
            upgrade: head.upgrade,
            close: head.close,
        });
        self.sides[d.index()] = match head.body {
            BodyLength::Length(0) if hold => Side::held(),
            BodyLength::Length(0) => Side::head(),
            length => Side::RequestBody {
                body: BodyReader::new(length),
                then_hold: hold,
            },
        };
        Ok(())
    }

    fn on_response(&mut self, d: Direction, head: ResponseHead, ts: u64) -> Result<(), ParseError> {
        // Interim responses (100 Continue, 103 Early Hints) precede the
        // final one and answer nothing by themselves.
        if (100..200).contains(&head.status) && head.status != 101 {
            return Ok(());
        }
        let req = self
            .pending
            .pop_front()
            .ok_or(ParseError::UnsolicitedResponse)?;
        let mut exchange = Exchange {
            method: req.method,
            route: req.route,
            status: head.status,
            start_ns: req.start_ns,
            head_ns: ts,
            close: req.close || head.close,
            release_held: req.upgrade != Upgrade::None,
        };
        if head.status == 101 {
            return match req.upgrade {
                Upgrade::None => Err(ParseError::UnexpectedSwitch),
                Upgrade::WebSocket if head.upgrade_websocket => {
                    self.emit_exchange(&exchange, ts);
                    self.open_session(d, &head, ts)
                }
                _ => {
                    self.emit_exchange(&exchange, ts);
                    self.go_opaque();
                    Ok(())
                }
            };
        }
        if req.method == Method::Connect && (200..300).contains(&head.status) {
            self.emit_exchange(&exchange, ts);
            self.go_opaque();
            return Ok(());
        }
        // RFC 9112 §6.3: no body after HEAD, 204 or 304, whatever the
        // headers say.
        let no_body = req.method == Method::Head || head.status == 204 || head.status == 304;
        let body = if no_body {
            BodyLength::Length(0)
        } else {
            head.body
        };
        exchange.close |= body == BodyLength::UntilClose;
        let i = d.index();
        self.sides[i] = Side::ResponseBody {
            body: BodyReader::new(body),
            exchange,
        };
        if body == BodyLength::Length(0) {
            self.response_done(d, ts)?;
        }
        Ok(())
    }

    /// The response on `d` ended at `ts`.
    fn response_done(&mut self, d: Direction, ts: u64) -> Result<(), ParseError> {
        let i = d.index();
        let Side::ResponseBody { exchange, .. } =
            std::mem::replace(&mut self.sides[i], Side::head())
        else {
            return Ok(());
        };
        self.emit_exchange(&exchange, ts);
        if exchange.close {
            // Nothing follows on this connection.
            self.sides = [Side::Ignored, Side::Ignored];
            self.pending.clear();
            return Ok(());
        }
        if exchange.release_held {
            self.release_held()?;
        }
        Ok(())
    }

    /// An upgrade was refused: what the client sent after it is HTTP.
    fn release_held(&mut self) -> Result<(), ParseError> {
        let d = self.requests_dir();
        let i = d.index();
        match &mut self.sides[i] {
            Side::RequestBody { then_hold, .. } => {
                *then_hold = false;
                Ok(())
            }
            Side::Held { .. } => {
                let Side::Held { segments, .. } =
                    std::mem::replace(&mut self.sides[i], Side::head())
                else {
                    unreachable!("matched above");
                };
                self.replay(d, segments)
            }
            _ => Ok(()),
        }
    }

    fn replay(&mut self, d: Direction, segments: Vec<HeldSegment>) -> Result<(), ParseError> {
        for segment in segments {
            match segment {
                HeldSegment::Bytes(bytes, ts) => self.consume(d, &bytes, ts)?,
                HeldSegment::Gap(n, ts) => self.skip(d, n, ts)?,
            }
        }
        Ok(())
    }

    fn go_opaque(&mut self) {
        self.state = StreamState::Opaque;
        self.sides = [Side::Ignored, Side::Ignored];
        self.pending.clear();
    }

    /// The `101` on `server_dir` accepted a WebSocket upgrade.
    fn open_session(
        &mut self,
        server_dir: Direction,
        head: &ResponseHead,
        ts: u64,
    ) -> Result<(), ParseError> {
        let client_dir = server_dir.opposite();
        self.sides[server_dir.index()] = Side::Frames(FrameReader::new(
            Role::Server,
            head.extensions,
            head.deflate,
        ));
        let before = std::mem::replace(
            &mut self.sides[client_dir.index()],
            Side::Frames(FrameReader::new(
                Role::Client,
                head.extensions,
                head.deflate,
            )),
        );
        self.pending.clear();
        self.state = StreamState::WebSocket;
        self.session = Some(Session {
            opened_ns: ts,
            first_close: None,
        });
        self.events.push_back(WebEvent::SessionOpened {
            role: self.traced_role(),
            ts_ns: ts,
            deflate: head.deflate,
        });
        match before {
            Side::Held { segments, .. } => self.replay(client_dir, segments),
            // The upgrade request's body had not ended: frames cannot be
            // told from it.
            _ => Err(ParseError::UnexpectedSwitch),
        }
    }

    fn emit_exchange(&mut self, exchange: &Exchange, end_ns: u64) {
        self.events.push_back(WebEvent::HttpRequest(HttpRequest {
            method: exchange.method,
            route: exchange.route.clone(),
            status_code: exchange.status,
            role: self.traced_role(),
            start_ns: exchange.start_ns,
            response_head_ns: exchange.head_ns,
            end_ns,
        }));
    }

    fn emit_items(&mut self, d: Direction, items: &mut Vec<FrameItem>, ts: u64) {
        for item in items.drain(..) {
            match item {
                FrameItem::Message {
                    opcode,
                    size,
                    frames,
                    compressed,
                } => self.events.push_back(WebEvent::Message {
                    direction: d,
                    opcode,
                    size,
                    frames,
                    compressed,
                    ts_ns: ts,
                }),
                FrameItem::Control { kind, payload_len } => {
                    self.events.push_back(WebEvent::Control {
                        direction: d,
                        kind,
                        payload_len,
                        ts_ns: ts,
                    });
                    if let ControlKind::Close { code, .. } = kind {
                        self.on_close_frame(d, code, ts);
                    }
                }
            }
        }
    }

    fn on_close_frame(&mut self, d: Direction, code: Option<u16>, ts: u64) {
        let sender = self.sender(d);
        if let Some(s) = &mut self.session
            && s.first_close.is_none()
        {
            s.first_close = Some((sender, code));
        }
        let both_closed = self
            .sides
            .iter()
            .all(|s| matches!(s, Side::Frames(f) if f.closed()));
        if both_closed {
            self.end_session(ts, None);
        }
    }

    /// Reports the session's end; `no_close_code` is its code when no close
    /// frame was seen.
    fn end_session(&mut self, ts: u64, no_close_code: Option<u16>) {
        let Some(s) = self.session.take() else {
            return;
        };
        let (code, closed_by) = match s.first_close {
            Some((role, code)) => (code, Some(role)),
            None => (no_close_code, None),
        };
        self.events.push_back(WebEvent::SessionClosed {
            code,
            closed_by,
            duration_ns: ts.saturating_sub(s.opened_ns),
            ts_ns: ts,
        });
    }
}
