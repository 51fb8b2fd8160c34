//! HTTP/1.1 message framing (RFC 9112): heads parsed with `httparse`,
//! bodies skipped by `Content-Length` or by the chunked coding (§6, §7.1).

use httparse::{EMPTY_HEADER, Header, ParserConfig, Status};

use super::ParseError;

/// A header block longer than this is refused: buffering it would let one
/// peer hold memory, and no real request needs it.
pub(super) const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 100;
/// RFC 9112 §7.1.1 chunk extensions make this line unbounded in theory.
const MAX_CHUNK_LINE: usize = 1024;
const MAX_TRAILERS: usize = 16 * 1024;

/// A request method, from a bounded set (a label of the latency metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
    Patch,
    Head,
    Options,
    Connect,
    Trace,
    Other,
}

impl Method {
    fn from_token(token: &str) -> Self {
        // Methods are case-sensitive (RFC 9110 §9.1).
        match token {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "HEAD" => Method::Head,
            "OPTIONS" => Method::Options,
            "CONNECT" => Method::Connect,
            "TRACE" => Method::Trace,
            _ => Method::Other,
        }
    }

    /// The `method` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Patch => "PATCH",
            Method::Head => "HEAD",
            Method::Options => "OPTIONS",
            Method::Connect => "CONNECT",
            Method::Trace => "TRACE",
            Method::Other => "other",
        }
    }
}

/// How a message body ends, from its headers alone (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BodyLength {
    Length(u64),
    Chunked,
    /// Responses only: the body runs to the connection's end.
    UntilClose,
}

/// What the request asked the connection to become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Upgrade {
    None,
    WebSocket,
    /// Another protocol in `Upgrade`, or a CONNECT tunnel.
    Other,
}

#[derive(Debug)]
pub(super) struct RequestHead {
    pub method: Method,
    /// The target's route class, folded as soon as it is parsed.
    pub route: String,
    pub body: BodyLength,
    /// The connection ends after the response (`Connection: close`, or
    /// HTTP/1.0 without keep-alive).
    pub close: bool,
    pub upgrade: Upgrade,
}

#[derive(Debug)]
pub(super) struct ResponseHead {
    pub status: u16,
    pub body: BodyLength,
    pub close: bool,
    pub upgrade_websocket: bool,
    /// `Sec-WebSocket-Extensions` named at least one extension.
    pub extensions: bool,
    pub deflate: bool,
}

/// What the first bytes of an unclassified socket look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstBytes {
    /// A well-formed HTTP/1.x request line.
    Request,
    NotHttp,
    /// Too few bytes to tell.
    NeedMore,
}

/// Whether a socket's first bytes open an HTTP/1.x request, for the
/// capture path to decide which sockets to follow. TLS and HTTP/2 prefaces
/// are `NotHttp`.
pub fn classify_first_bytes(bytes: &[u8]) -> FirstBytes {
    let mut headers = [EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(Status::Complete(_)) | Err(httparse::Error::TooManyHeaders) => FirstBytes::Request,
        // httparse fills in the version once the request line is complete.
        Ok(Status::Partial) if req.version.is_some() => FirstBytes::Request,
        Ok(Status::Partial) if bytes.len() < MAX_HEAD => FirstBytes::NeedMore,
        _ => FirstBytes::NotHttp,
    }
}

/// Comma-separated list elements of a header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// What the headers common to requests and responses say.
struct Fields {
    content_length: Option<u64>,
    /// `Transfer-Encoding` present; `Some(true)` when its last coding is
    /// chunked.
    chunked: Option<bool>,
    close: bool,
    keep_alive: bool,
    upgrade_websocket: bool,
    upgrade_any: bool,
    connection_upgrade: bool,
    extensions: bool,
    deflate: bool,
}

fn fields(headers: &[Header<'_>]) -> Result<Fields, ParseError> {
    let mut f = Fields {
        content_length: None,
        chunked: None,
        close: false,
        keep_alive: false,
        upgrade_websocket: false,
        upgrade_any: false,
        connection_upgrade: false,
        extensions: false,
        deflate: false,
    };
    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            // A list of identical values is tolerated (RFC 9110 §8.6).
            for t in tokens(h.value) {
                let n = std::str::from_utf8(t)
                    .ok()
                    .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(ParseError::BadHeader {
                        header: "Content-Length",
                    })?;
                if f.content_length.is_some_and(|m| m != n) {
                    return Err(ParseError::BadHeader {
                        header: "Content-Length",
                    });
                }
                f.content_length = Some(n);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Several fields make one list: the last coding counts.
            for t in tokens(h.value) {
                f.chunked = Some(t.eq_ignore_ascii_case(b"chunked"));
            }
            f.chunked.get_or_insert(false);
        } else if name.eq_ignore_ascii_case("connection") {
            for t in tokens(h.value) {
                f.close |= t.eq_ignore_ascii_case(b"close");
                f.keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
                f.connection_upgrade |= t.eq_ignore_ascii_case(b"upgrade");
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            for t in tokens(h.value) {
                f.upgrade_any = true;
                f.upgrade_websocket |= t.eq_ignore_ascii_case(b"websocket");
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            for t in tokens(h.value) {
                f.extensions = true;
                let name = t.split(|&b| b == b';').next().unwrap_or_default();
                f.deflate |= name
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"permessage-deflate");
            }
        }
    }
    Ok(f)
}

/// A complete request head at the start of `buf`, and its length.
pub(super) fn parse_request(buf: &[u8]) -> Result<Option<(usize, RequestHead)>, ParseError> {
    let mut headers = [EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(Status::Complete(n)) => n,
        Ok(Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ParseError::TooManyHeaders { limit: MAX_HEADERS });
        }
        Err(source) => {
            return Err(ParseError::Http {
                what: "request",
                source,
            });
        }
    };
    let method = Method::from_token(req.method.unwrap_or_default());
    let f = fields(req.headers)?;
    let body = match (f.chunked, f.content_length) {
        (Some(true), _) => BodyLength::Chunked,
        // A request's body length must be determinable (RFC 9112 §6.3).
        (Some(false), _) => {
            return Err(ParseError::BadHeader {
                header: "Transfer-Encoding",
            });
        }
        (None, Some(n)) => BodyLength::Length(n),
        (None, None) => BodyLength::Length(0),
    };
    let http10 = req.version == Some(0);
    let upgrade = if method == Method::Connect {
        Upgrade::Other
    } else if f.upgrade_websocket && f.connection_upgrade {
        Upgrade::WebSocket
    } else if f.upgrade_any && f.connection_upgrade {
        Upgrade::Other
    } else {
        Upgrade::None
    };
    Ok(Some((
        n,
        RequestHead {
            method,
            route: super::route::route_class(req.path.unwrap_or("/")),
            body,
            close: f.close || (http10 && !f.keep_alive),
            upgrade,
        },
    )))
}

/// A complete response head at the start of `buf`, and its length.
pub(super) fn parse_response(buf: &[u8]) -> Result<Option<(usize, ResponseHead)>, ParseError> {
    let mut headers = [EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    // Servers are followed as they are, old habits included.
    let n = match ParserConfig::default()
        .allow_obsolete_multiline_headers_in_responses(true)
        .allow_spaces_after_header_name_in_responses(true)
        .parse_response(&mut resp, buf)
    {
        Ok(Status::Complete(n)) => n,
        Ok(Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ParseError::TooManyHeaders { limit: MAX_HEADERS });
        }
        Err(source) => {
            return Err(ParseError::Http {
                what: "response",
                source,
            });
        }
    };
    let f = fields(resp.headers)?;
    let body = match (f.chunked, f.content_length) {
        (Some(true), _) => BodyLength::Chunked,
        (Some(false), _) | (None, None) => BodyLength::UntilClose,
        (None, Some(n)) => BodyLength::Length(n),
    };
    let http10 = resp.version == Some(0);
    Ok(Some((
        n,
        ResponseHead {
            status: resp.code.unwrap_or_default(),
            body,
            // A body delimited by the close also ends the connection; the
            // caller knows when there is no body at all.
            close: f.close || (http10 && !f.keep_alive),
            upgrade_websocket: f.upgrade_websocket,
            extensions: f.extensions,
            deflate: f.deflate,
        },
    )))
}

/// Gathers a header block that may span several reads, up to [`MAX_HEAD`].
#[derive(Debug, Default)]
pub(super) struct HeadReader {
    buf: Vec<u8>,
    /// When its first byte came.
    start_ns: Option<u64>,
}

/// A head that [`HeadReader::read`] completed, and when it started.
pub(super) type Completed<H> = Option<(H, u64)>;

/// [`parse_request`] or [`parse_response`].
pub(super) type HeadParser<H> = fn(&[u8]) -> Result<Option<(usize, H)>, ParseError>;

impl HeadReader {
    /// Reads from `input` until a head is complete: the bytes used, and
    /// the head with its start time when it is.
    pub(super) fn read<H>(
        &mut self,
        input: &[u8],
        ts: u64,
        parse: HeadParser<H>,
    ) -> Result<(usize, Completed<H>), ParseError> {
        let start = *self.start_ns.get_or_insert(ts);
        let too_large = ParseError::HeadTooLarge { limit: MAX_HEAD };
        if self.buf.is_empty() {
            // The common case, a head within one read: parsed in place.
            return match parse(input)? {
                Some((n, _)) if n > MAX_HEAD => Err(too_large),
                Some((n, head)) => {
                    self.start_ns = None;
                    Ok((n, Some((head, start))))
                }
                None if input.len() >= MAX_HEAD => Err(too_large),
                None => {
                    self.buf.extend_from_slice(input);
                    Ok((input.len(), None))
                }
            };
        }
        let before = self.buf.len();
        let take = (MAX_HEAD - before).min(input.len());
        self.buf.extend_from_slice(&input[..take]);
        match parse(&self.buf)? {
            Some((n, head)) => {
                self.buf.clear();
                self.start_ns = None;
                Ok((n - before, Some((head, start))))
            }
            None if self.buf.len() >= MAX_HEAD => Err(too_large),
            None => Ok((take, None)),
        }
    }

    pub(super) fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Where a chunked body is (RFC 9112 §7.1).
#[derive(Debug)]
pub(super) enum Chunked {
    SizeLine(Vec<u8>),
    Data(u64),
    /// The CRLF after a chunk's data: how many of its bytes came.
    DataEnd(u8),
    Trailers {
        line_len: usize,
        total: usize,
    },
}

/// Skips a message body.
#[derive(Debug)]
pub(super) enum BodyReader {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

impl BodyReader {
    pub(super) fn new(length: BodyLength) -> Self {
        match length {
            BodyLength::Length(n) => BodyReader::Length(n),
            BodyLength::Chunked => BodyReader::Chunked(Chunked::SizeLine(Vec::new())),
            BodyLength::UntilClose => BodyReader::UntilClose,
        }
    }

    #[cfg(test)]
    pub(super) fn buffered(&self) -> usize {
        match self {
            BodyReader::Chunked(Chunked::SizeLine(line)) => line.len(),
            _ => 0,
        }
    }

    /// Reads captured body bytes: how many belonged to the body, and
    /// whether it ended.
    pub(super) fn consume(&mut self, input: &[u8]) -> Result<(usize, bool), ParseError> {
        match self {
            BodyReader::Length(rem) => {
                let k = (*rem).min(input.len() as u64);
                *rem -= k;
                Ok((k as usize, *rem == 0))
            }
            BodyReader::UntilClose => Ok((input.len(), false)),
            BodyReader::Chunked(c) => consume_chunked(c, input),
        }
    }

    /// Skips `n` uncaptured bytes: how many belonged to the body, and
    /// whether it ended.
    pub(super) fn skip(&mut self, n: u64) -> Result<(u64, bool), ParseError> {
        match self {
            BodyReader::Length(rem) => {
                let k = (*rem).min(n);
                *rem -= k;
                Ok((k, *rem == 0))
            }
            BodyReader::UntilClose => Ok((n, false)),
            BodyReader::Chunked(c) => {
                let mut used = 0;
                while used < n {
                    match c {
                        Chunked::Data(rem) => {
                            let k = (*rem).min(n - used);
                            *rem -= k;
                            used += k;
                            if *rem == 0 {
                                *c = Chunked::DataEnd(0);
                            }
                        }
                        // Its length is known: two bytes, CR LF.
                        Chunked::DataEnd(seen) => {
                            let k = u64::from(2 - *seen).min(n - used);
                            *seen += k as u8;
                            used += k;
                            if *seen == 2 {
                                *c = Chunked::SizeLine(Vec::new());
                            }
                        }
                        Chunked::SizeLine(_) => {
                            return Err(ParseError::Unseen {
                                what: "a chunk-size line",
                            });
                        }
                        Chunked::Trailers { .. } => {
                            return Err(ParseError::Unseen {
                                what: "a chunked body's trailer section",
                            });
                        }
                    }
                }
                Ok((used, false))
            }
        }
    }
}

fn consume_chunked(c: &mut Chunked, input: &[u8]) -> Result<(usize, bool), ParseError> {
    let mut used = 0;
    while used < input.len() {
        let rest = &input[used..];
        match c {
            Chunked::SizeLine(line) => {
                let end = rest.iter().position(|&b| b == b'\n');
                let part = &rest[..end.unwrap_or(rest.len())];
                if line.len() + part.len() > MAX_CHUNK_LINE {
                    return Err(ParseError::BadChunk);
                }
                line.extend_from_slice(part);
                let Some(end) = end else {
                    return Ok((input.len(), false));
                };
                used += end + 1;
                *c = match chunk_size(line)? {
                    0 => Chunked::Trailers {
                        line_len: 0,
                        total: 0,
                    },
                    n => Chunked::Data(n),
                };
            }
            Chunked::Data(rem) => {
                let k = (*rem).min(rest.len() as u64);
                *rem -= k;
                used += k as usize;
                if *rem == 0 {
                    *c = Chunked::DataEnd(0);
                }
            }
            Chunked::DataEnd(seen) => {
                match (*seen, rest[0]) {
                    (0, b'\r') => *seen = 1,
                    // A bare LF is tolerated (RFC 9112 §2.2).
                    (_, b'\n') => *c = Chunked::SizeLine(Vec::new()),
                    _ => return Err(ParseError::BadChunk),
                }
                used += 1;
            }
            Chunked::Trailers { line_len, total } => {
                used += 1;
                match rest[0] {
                    b'\n' if *line_len == 0 => return Ok((used, true)),
                    b'\n' => *line_len = 0,
                    b'\r' => {}
                    _ => {
                        *line_len += 1;
                        *total += 1;
                        if *total > MAX_TRAILERS {
                            return Err(ParseError::HeadTooLarge {
                                limit: MAX_TRAILERS,
                            });
                        }
                    }
                }
            }
        }
    }
    Ok((used, false))
}

/// The size on a chunk-size line (`1a3f;ext=1\r`, the LF removed).
fn chunk_size(line: &[u8]) -> Result<u64, ParseError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let hex = line.split(|&b| b == b';').next().unwrap_or_default();
    let hex = hex.trim_ascii();
    if hex.is_empty() || hex.len() > 16 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return Err(ParseError::BadChunk);
    }
    let hex = std::str::from_utf8(hex).map_err(|_| ParseError::BadChunk)?;
    u64::from_str_radix(hex, 16).map_err(|_| ParseError::BadChunk)
}
