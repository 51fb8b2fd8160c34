//! HTTP/1.1 and WebSocket (RFC 6455) stream analysis, from captured socket
//! payloads; no kernel dependency.
//!
//! A [`WebStream`](stream::WebStream) follows one TCP connection in both
//! directions, seen from the traced process (which may be the server or the
//! client). It is fed every captured read and write — the first bytes of
//! each syscall (and its last ones, when kept) with its full length — and
//! `on_connection_closed` when the connection ends; it turns them into
//! [`WebEvent`]s, drained after each call:
//!
//! | event | metric |
//! |---|---|
//! | [`WebEvent::HttpRequest`] (role server) | `pipelens_http_server_request_duration_seconds{method,route,status_code}` |
//! | [`WebEvent::SessionOpened`] | `pipelens_websocket_sessions_total`, `_sessions_active` +1 |
//! | [`WebEvent::Message`] | `pipelens_websocket_messages_total{direction,opcode}`, `_message_size_bytes`; on a session the target serves, `_response_duration_seconds` ([`response`]) |
//! | [`WebEvent::Control`] | control frames, counted apart from messages |
//! | [`WebEvent::SessionClosed`] | `pipelens_websocket_closes_total{code,initiator}`, `_session_duration_seconds`, `_sessions_active` −1 |
//! | [`WebEvent::ParseError`] | `pipelens_http_parse_errors_total{reason}` |
//!
//! Framing elements (HTTP header blocks, chunk-size lines, WebSocket frame
//! headers) must be inside the captured bytes; payloads (bodies, chunk data,
//! frame payloads) may not be, and are skipped by their length. When a
//! framing element falls in bytes the capture did not keep, the stream is
//! marked unparseable rather than resynchronised by guessing.
//!
//! Which sockets to follow: [`http::classify_first_bytes`] tells an HTTP/1.x
//! request from anything else (TLS, HTTP/2, other protocols) in a socket's
//! first bytes. A WebSocket session over TLS is never seen in clear here.

pub mod analyser;
pub mod frame;
pub mod http;
pub mod response;
pub mod route;
pub mod stream;
#[cfg(test)]
pub(crate) mod tests;

use thiserror::Error;

use self::http::Method;

/// Which way bytes went, seen from the traced process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The traced process read them.
    Received,
    /// The traced process wrote them.
    Sent,
}

impl Direction {
    /// The `direction` label of `pipelens_websocket_messages_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Received => "received",
            Direction::Sent => "sent",
        }
    }

    fn index(self) -> usize {
        match self {
            Direction::Received => 0,
            Direction::Sent => 1,
        }
    }

    fn opposite(self) -> Self {
        match self {
            Direction::Received => Direction::Sent,
            Direction::Sent => Direction::Received,
        }
    }
}

/// An end of the connection: the one that sent the first request is the
/// client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Client,
    Server,
}

impl Role {
    /// The `initiator` label of `pipelens_websocket_closes_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
        }
    }

    fn other(self) -> Self {
        match self {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        }
    }
}

/// A completed HTTP/1.1 exchange: a request and its final response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: Method,
    /// The request target's route class ([`route::route_class`]): never the
    /// raw path or its query.
    pub route: String,
    pub status_code: u16,
    /// The traced process's end: `Server` for the server-side latency
    /// metric, `Client` when it made the request.
    pub role: Role,
    /// When the request's first byte was read or written.
    pub start_ns: u64,
    /// When the response's header block ended (time to first byte).
    pub response_head_ns: u64,
    /// When the response's last byte was read or written (the end of its
    /// body; the end of its head when it has none; the connection's end
    /// for a body delimited by the close). The request duration is
    /// `end_ns - start_ns`, as OpenTelemetry's `http.server.request.duration`
    /// defines it: first request byte to last response byte.
    pub end_ns: u64,
}

impl HttpRequest {
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
}

/// The opcode of a WebSocket data message (RFC 6455 §5.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageOpcode {
    Text,
    Binary,
}

impl MessageOpcode {
    /// The `opcode` label of `pipelens_websocket_messages_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageOpcode::Text => "text",
            MessageOpcode::Binary => "binary",
        }
    }
}

/// A WebSocket control frame (RFC 6455 §5.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlKind {
    Ping,
    Pong,
    Close {
        /// The status code; 1005 when the frame carried none; `None` when
        /// its first two payload bytes were not captured.
        code: Option<u16>,
        /// Bytes of the reason after the code.
        reason_len: u64,
    },
}

impl ControlKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlKind::Ping => "ping",
            ControlKind::Pong => "pong",
            ControlKind::Close { .. } => "close",
        }
    }
}

/// What [`WebStream`](stream::WebStream) saw, in the order it saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebEvent {
    /// A request answered by its final response. A WebSocket handshake is
    /// one too, with status 101, ending with the 101's header block.
    HttpRequest(HttpRequest),
    /// A WebSocket upgrade was answered `101`: the connection now carries
    /// frames.
    SessionOpened {
        /// The traced process's end of the session.
        role: Role,
        ts_ns: u64,
        /// `permessage-deflate` was negotiated (RFC 7692): message sizes are
        /// then compressed wire sizes.
        deflate: bool,
    },
    /// A complete data message; fragments are folded into one.
    Message {
        direction: Direction,
        opcode: MessageOpcode,
        /// Sum of its frames' payload lengths, as on the wire.
        size: u64,
        frames: u32,
        /// RSV1 set on its first frame (compressed by permessage-deflate).
        compressed: bool,
        /// When its last byte was read or written.
        ts_ns: u64,
    },
    Control {
        direction: Direction,
        kind: ControlKind,
        payload_len: u64,
        ts_ns: u64,
    },
    /// The session ended: the close handshake completed, or the connection
    /// ended.
    SessionClosed {
        /// The first close frame's code (1005 if it had none); 1006 when the
        /// connection ended without any close frame; `None` when it cannot
        /// be known (the stream became unparseable before a close frame was
        /// seen, or the code was not captured).
        code: Option<u16>,
        /// Who sent the first close frame; `None` when nobody did.
        closed_by: Option<Role>,
        duration_ns: u64,
        ts_ns: u64,
    },
    /// The stream is unparseable from here on.
    ParseError { error: ParseError, ts_ns: u64 },
}

/// Why a stream stopped being parsed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("not an HTTP/1.x {what}: {source}")]
    Http {
        what: &'static str,
        source: httparse::Error,
    },
    #[error("HTTP header block longer than {limit} bytes")]
    HeadTooLarge { limit: usize },
    #[error("HTTP header block with more than {limit} fields")]
    TooManyHeaders { limit: usize },
    #[error("invalid {header} header")]
    BadHeader { header: &'static str },
    #[error("invalid chunk-size line or chunk end")]
    BadChunk,
    #[error("an HTTP response without a request")]
    UnsolicitedResponse,
    #[error("more than {limit} requests awaiting a response")]
    TooManyPending { limit: usize },
    #[error("101 Switching Protocols answering a request that asked for no upgrade")]
    UnexpectedSwitch,
    #[error("more than {limit} bytes sent before the upgrade request was answered")]
    HeldTooLong { limit: usize },
    /// A framing element was not captured (the capture prefix was too
    /// short for it): continuing would be a guess.
    #[error("{what} fell in bytes the capture did not keep")]
    Unseen { what: &'static str },
    /// RFC 6455 §5.2: the most significant bit of a 64-bit length must be 0.
    #[error("frame length {len:#x} has its most significant bit set")]
    FrameLengthMsb { len: u64 },
    #[error("reserved opcode {opcode:#x}")]
    ReservedOpcode { opcode: u8 },
    #[error("reserved bits {rsv:#05b} set without an extension that defines them")]
    ReservedBits { rsv: u8 },
    /// RFC 6455 §5.5: control frames are not fragmented and carry at most
    /// 125 bytes.
    #[error("control frame {opcode:#x} fragmented or of {len} bytes")]
    BadControlFrame { opcode: u8, len: u64 },
    #[error("continuation frame outside a fragmented message")]
    OrphanContinuation,
    #[error("new data frame inside a fragmented message")]
    InterleavedMessage,
    /// RFC 6455 §5.1: clients mask every frame, servers none.
    #[error("frame from the {} {} masked", from.as_str(), if *masked { "was" } else { "was not" })]
    Masking { from: Role, masked: bool },
    /// RFC 6455 §7.4: 1005, 1006 and 1015 are never sent; below 1000 and
    /// 1016–2999 are unassigned.
    #[error("close code {code} is not allowed in a close frame")]
    BadCloseCode { code: u16 },
    #[error("close frame with a 1-byte payload")]
    ShortClose,
    #[error("close reason is not UTF-8")]
    BadCloseReason,
    #[error("frame after the same side's close frame")]
    FrameAfterClose,
    #[error("the connection ended inside {what}")]
    Truncated { what: &'static str },
}

impl ParseError {
    /// A bounded `reason` label for `pipelens_http_parse_errors_total`.
    pub fn label(&self) -> &'static str {
        match self {
            ParseError::Http { .. } => "not_http",
            ParseError::HeadTooLarge { .. } | ParseError::TooManyHeaders { .. } => "head_too_large",
            ParseError::BadHeader { .. } => "bad_header",
            ParseError::BadChunk => "bad_chunk",
            ParseError::UnsolicitedResponse
            | ParseError::TooManyPending { .. }
            | ParseError::UnexpectedSwitch
            | ParseError::HeldTooLong { .. } => "http_sequence",
            ParseError::Unseen { .. } => "capture_too_short",
            ParseError::FrameLengthMsb { .. }
            | ParseError::ReservedOpcode { .. }
            | ParseError::ReservedBits { .. }
            | ParseError::BadControlFrame { .. }
            | ParseError::OrphanContinuation
            | ParseError::InterleavedMessage
            | ParseError::Masking { .. }
            | ParseError::FrameAfterClose => "ws_protocol",
            ParseError::BadCloseCode { .. }
            | ParseError::ShortClose
            | ParseError::BadCloseReason => "ws_bad_close",
            ParseError::Truncated { .. } => "truncated",
        }
    }
}
