//! RFC 6455 §5 framing, one direction at a time: headers decoded from the
//! captured bytes, payloads skipped by their length. Only control payloads
//! (125 bytes at most) are kept, for the close code and reason.

use super::{ControlKind, MessageOpcode, ParseError, Role};

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// RSV1, as [`WsFrame::rsv`] holds it: the bit permessage-deflate uses.
pub(super) const RSV1: u8 = 0b100;
/// The longest header: 2 bytes, a 64-bit length, a masking key.
const MAX_HEADER: usize = 14;
/// RFC 6455 §5.5.
const MAX_CONTROL_PAYLOAD: usize = 125;

/// A frame header (RFC 6455 §5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WsFrame {
    pub fin: bool,
    /// RSV1, RSV2, RSV3 as three bits, RSV1 the highest.
    pub rsv: u8,
    pub opcode: u8,
    pub masking_key: Option<[u8; 4]>,
    pub payload_len: u64,
    /// 2 to 14 bytes.
    pub header_len: usize,
}

impl WsFrame {
    /// Decodes the header at the start of `buf`: `Ok(None)` when `buf` ends
    /// first. Checks what needs no context: the opcode, the 64-bit length's
    /// top bit, the control frame limits.
    pub fn decode(buf: &[u8]) -> Result<Option<Self>, ParseError> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        let opcode = b0 & 0x0f;
        if !matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
            return Err(ParseError::ReservedOpcode { opcode });
        }
        let fin = b0 & 0x80 != 0;
        let masked = b1 & 0x80 != 0;
        let len_bytes = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        if buf.len() < 2 + len_bytes {
            return Ok(None);
        }
        let payload_len = match len_bytes {
            2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
            8 => {
                let mut be = [0; 8];
                be.copy_from_slice(&buf[2..10]);
                let len = u64::from_be_bytes(be);
                if len >> 63 != 0 {
                    return Err(ParseError::FrameLengthMsb { len });
                }
                len
            }
            _ => u64::from(b1 & 0x7f),
        };
        // Non-minimal length encodings are a MUST NOT for senders, but they
        // do not change where the frame ends: accepted.
        if opcode & 0x8 != 0 && (!fin || payload_len > MAX_CONTROL_PAYLOAD as u64) {
            return Err(ParseError::BadControlFrame {
                opcode,
                len: payload_len,
            });
        }
        let header_len = 2 + len_bytes + if masked { 4 } else { 0 };
        if buf.len() < header_len {
            return Ok(None);
        }
        let masking_key = masked.then(|| {
            let k = &buf[2 + len_bytes..header_len];
            [k[0], k[1], k[2], k[3]]
        });
        Ok(Some(Self {
            fin,
            rsv: (b0 >> 4) & 0b111,
            opcode,
            masking_key,
            payload_len,
            header_len,
        }))
    }

    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// What a [`FrameReader`] completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FrameItem {
    Message {
        opcode: MessageOpcode,
        size: u64,
        frames: u32,
        compressed: bool,
    },
    Control {
        kind: ControlKind,
        payload_len: u64,
    },
}

/// The frame being read.
#[derive(Debug)]
struct Current {
    frame: WsFrame,
    remaining: u64,
    /// The control payload's first bytes, unmasked, as far as they were
    /// captured without a gap.
    control: [u8; MAX_CONTROL_PAYLOAD],
    control_len: usize,
}

/// A data message whose final frame has not come yet.
#[derive(Debug)]
struct Partial {
    opcode: MessageOpcode,
    size: u64,
    frames: u32,
    compressed: bool,
}

/// The frames one side sends.
#[derive(Debug)]
pub(super) struct FrameReader {
    sender: Role,
    /// RSV bits the negotiated extensions may set.
    rsv_allowed: u8,
    /// Only permessage-deflate was negotiated: RSV1 is then allowed on the
    /// first frame of a data message only (RFC 7692 §6).
    deflate_only: bool,
    header: [u8; MAX_HEADER],
    header_len: usize,
    current: Option<Current>,
    message: Option<Partial>,
    /// This side sent its close frame.
    closed: bool,
}

impl FrameReader {
    /// `extensions`: the server's `Sec-WebSocket-Extensions` named some;
    /// `deflate`: one of them is permessage-deflate.
    pub(super) fn new(sender: Role, extensions: bool, deflate: bool) -> Self {
        let (rsv_allowed, deflate_only) = match (extensions, deflate) {
            (false, _) => (0, false),
            // Unknown extensions may define any RSV bit.
            (true, false) => (0b111, false),
            (true, true) => (RSV1, true),
        };
        Self {
            sender,
            rsv_allowed,
            deflate_only,
            header: [0; MAX_HEADER],
            header_len: 0,
            current: None,
            message: None,
            closed: false,
        }
    }

    /// Inside a frame (its header or its payload): the connection ending
    /// here cut it.
    pub(super) fn in_frame(&self) -> bool {
        self.header_len > 0 || self.current.is_some()
    }

    pub(super) fn closed(&self) -> bool {
        self.closed
    }

    /// Reads captured bytes.
    pub(super) fn consume(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<FrameItem>,
    ) -> Result<(), ParseError> {
        while !input.is_empty() {
            if let Some(cur) = &mut self.current {
                let n = cur.remaining.min(input.len() as u64) as usize;
                if cur.frame.is_control() {
                    let offset = (cur.frame.payload_len - cur.remaining) as usize;
                    if offset == cur.control_len {
                        let key = cur.frame.masking_key.unwrap_or_default();
                        for (i, b) in input[..n].iter().enumerate() {
                            cur.control[offset + i] = b ^ key[(offset + i) % 4];
                        }
                        cur.control_len += n;
                    }
                }
                cur.remaining -= n as u64;
                input = &input[n..];
                if cur.remaining == 0 {
                    self.finish_frame(out)?;
                }
                continue;
            }
            let take = (MAX_HEADER - self.header_len).min(input.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&input[..take]);
            match WsFrame::decode(&self.header[..self.header_len + take])? {
                // Only when all of `input` went into the header: 14 bytes
                // always hold a complete one.
                None => {
                    self.header_len += take;
                    input = &[];
                }
                Some(frame) => {
                    input = &input[frame.header_len - self.header_len..];
                    self.header_len = 0;
                    self.start_frame(frame, out)?;
                }
            }
        }
        Ok(())
    }

    /// Skips `n` bytes that were not captured: only a payload may lie there.
    pub(super) fn skip(&mut self, mut n: u64, out: &mut Vec<FrameItem>) -> Result<(), ParseError> {
        while n > 0 {
            let Some(cur) = &mut self.current else {
                return Err(ParseError::Unseen {
                    what: "a WebSocket frame header",
                });
            };
            let k = cur.remaining.min(n);
            cur.remaining -= k;
            n -= k;
            if cur.remaining == 0 {
                self.finish_frame(out)?;
            }
        }
        Ok(())
    }

    fn start_frame(&mut self, frame: WsFrame, out: &mut Vec<FrameItem>) -> Result<(), ParseError> {
        if self.closed {
            return Err(ParseError::FrameAfterClose);
        }
        let masked = frame.masking_key.is_some();
        if masked != (self.sender == Role::Client) {
            return Err(ParseError::Masking {
                from: self.sender,
                masked,
            });
        }
        let rsv1_misplaced = self.deflate_only
            && frame.rsv & RSV1 != 0
            && (frame.is_control() || frame.opcode == CONTINUATION);
        if frame.rsv & !self.rsv_allowed != 0 || rsv1_misplaced {
            return Err(ParseError::ReservedBits { rsv: frame.rsv });
        }
        match (frame.opcode, &mut self.message) {
            (TEXT | BINARY, Some(_)) => return Err(ParseError::InterleavedMessage),
            (TEXT | BINARY, None) => {
                self.message = Some(Partial {
                    opcode: if frame.opcode == TEXT {
                        MessageOpcode::Text
                    } else {
                        MessageOpcode::Binary
                    },
                    size: frame.payload_len,
                    frames: 1,
                    compressed: frame.rsv & RSV1 != 0,
                });
            }
            (CONTINUATION, None) => return Err(ParseError::OrphanContinuation),
            (CONTINUATION, Some(m)) => {
                m.size = m.size.saturating_add(frame.payload_len);
                m.frames = m.frames.saturating_add(1);
            }
            // Control frames may come between a message's fragments (§5.4).
            _ => {}
        }
        self.current = Some(Current {
            frame,
            remaining: frame.payload_len,
            control: [0; MAX_CONTROL_PAYLOAD],
            control_len: 0,
        });
        if frame.payload_len == 0 {
            self.finish_frame(out)?;
        }
        Ok(())
    }

    fn finish_frame(&mut self, out: &mut Vec<FrameItem>) -> Result<(), ParseError> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        let frame = cur.frame;
        let kind = match frame.opcode {
            PING => ControlKind::Ping,
            PONG => ControlKind::Pong,
            CLOSE => {
                self.closed = true;
                close_kind(frame.payload_len, &cur.control[..cur.control_len])?
            }
            _ => {
                if frame.fin
                    && let Some(m) = self.message.take()
                {
                    out.push(FrameItem::Message {
                        opcode: m.opcode,
                        size: m.size,
                        frames: m.frames,
                        compressed: m.compressed,
                    });
                }
                return Ok(());
            }
        };
        out.push(FrameItem::Control {
            kind,
            payload_len: frame.payload_len,
        });
        Ok(())
    }
}

/// The code and reason length of a close frame whose payload starts with
/// `seen` (all of it when `seen.len() == payload_len`).
fn close_kind(payload_len: u64, seen: &[u8]) -> Result<ControlKind, ParseError> {
    match payload_len {
        0 => Ok(ControlKind::Close {
            code: Some(1005),
            reason_len: 0,
        }),
        1 => Err(ParseError::ShortClose),
        _ => {
            let reason_len = payload_len - 2;
            let [hi, lo, ..] = *seen else {
                return Ok(ControlKind::Close {
                    code: None,
                    reason_len,
                });
            };
            let code = u16::from_be_bytes([hi, lo]);
            if !close_code_valid(code) {
                return Err(ParseError::BadCloseCode { code });
            }
            if seen.len() as u64 == payload_len && std::str::from_utf8(&seen[2..]).is_err() {
                return Err(ParseError::BadCloseReason);
            }
            Ok(ControlKind::Close {
                code: Some(code),
                reason_len,
            })
        }
    }
}

/// RFC 6455 §7.4 and the IANA WebSocket Close Code Number Registry: 1004 is
/// reserved, 1005, 1006 and 1015 are never sent, 1016–2999 are unassigned,
/// 3000–4999 belong to libraries and applications.
fn close_code_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}
