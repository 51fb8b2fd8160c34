//! What the fuzz targets share: a fuzz input read as a conversation on a
//! few sockets, and that conversation turned into the streams ring's
//! records the way the kernel side (`agent-ebpf/src/bin/streams.rs`) cuts
//! and captures them, so that the targets drive the agent's parsers
//! through [`StreamRecords`], the entry point the collector itself uses.
//!
//! # Input format (`conversation v1`)
//!
//! The seeds `cargo xtask fuzz` writes from the recorded captures are in
//! this format (`xtask/src/fuzz.rs` encodes it); any other input is read
//! the same way, every field clamped to what is left, so no input is
//! rejected.
//!
//! ```text
//! header, 4 bytes:
//!   capture  u8   0: the largest prefix (MAX_PIECES * MAX_CAPTURE);
//!                 n: 64 * n bytes (`--capture-bytes`, 64 the smallest)
//!   pieces   u8   0: each write is one syscall; n: syscalls of at most
//!                 n * n bytes (a writer's bytes in any pieces)
//!   flags    u8   bit 0: the kernel sends the tail of a long syscall
//!   reserved u8
//! then records, to the end of the input:
//!   tag      u8   bits 0-1: socket; bit 2: sent by the traced process;
//!                 bits 3-4: 0 data, 1 close, 2 raw ring record;
//!                 bits 5-7: how the kernel's records go wrong (see `Fault`)
//!   dt       u8   time step: (dt - 16) ms, so time can go back
//!   data:  len u32 LE, len bytes, hidden u32 LE, tail_len u8, tail bytes
//!          (a write of len + hidden + tail_len bytes whose middle
//!          `hidden` bytes the recording did not keep)
//!   close: nothing
//!   raw:   len u16 LE, len bytes handed over as one ring record
//! ```

use pipelens::streams::{Analyser, StreamRecords};
use pipelens_common::{
    connections::SockTuple,
    streams::{
        MAX_CAPTURE, MAX_PIECES, PIECE_LAST, STREAM_CLOSED, STREAM_DATA, STREAM_RECEIVED,
        STREAM_SENT, StreamHeader, TAIL_CAPTURE,
    },
};

pub const KIND_DATA: u8 = 0;
pub const KIND_CLOSE: u8 = 1;
pub const KIND_RAW: u8 = 2;
pub const TAG_SENT: u8 = 1 << 2;

/// How the cut and capture of every syscall is chosen.
#[derive(Clone, Copy, Debug)]
pub struct Cut {
    /// Bytes captured of a syscall's data at most.
    pub capture: usize,
    /// Largest syscall a write is cut into (`usize::MAX`: whole).
    pub piece: usize,
    pub tail: bool,
}

/// One event of the conversation.
#[derive(Debug)]
pub enum Event<'a> {
    Write {
        sock: u8,
        sent: bool,
        fault: u8,
        dt: u8,
        head: &'a [u8],
        hidden: usize,
        tail: &'a [u8],
    },
    Close {
        sock: u8,
        dt: u8,
    },
    Raw(&'a [u8]),
}

/// Reads bytes off the front of the input; short reads are what is left.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }

    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn uint(&mut self, n: usize) -> usize {
        self.take(n)
            .iter()
            .rev()
            .fold(0usize, |v, &b| v << 8 | usize::from(b))
    }
}

/// Hidden bytes of one write at most: enough to cross every capture limit
/// and make lengths the parsers must skip, small enough to stay fast.
const MAX_HIDDEN: usize = 1 << 18;

pub fn parse(input: &[u8]) -> (Cut, Vec<Event<'_>>) {
    let mut r = Reader(input);
    let capture = match r.u8() {
        0 => MAX_PIECES * MAX_CAPTURE,
        n => 64 * usize::from(n),
    };
    let piece = match r.u8() {
        0 => usize::MAX,
        n => usize::from(n) * usize::from(n),
    };
    let tail = r.u8() & 1 != 0;
    r.u8();
    let cut = Cut {
        capture,
        piece,
        tail,
    };
    let mut events = Vec::new();
    while !r.0.is_empty() {
        let tag = r.u8();
        let dt = r.u8();
        let sock = tag & 3;
        let sent = tag & TAG_SENT != 0;
        match (tag >> 3) & 3 {
            KIND_CLOSE => events.push(Event::Close { sock, dt }),
            KIND_RAW => {
                let n = r.uint(2);
                events.push(Event::Raw(r.take(n)));
            }
            _ => {
                let n = r.uint(4);
                let head = r.take(n);
                let hidden = r.uint(4).min(MAX_HIDDEN);
                let n = usize::from(r.u8());
                let tail = r.take(n);
                events.push(Event::Write {
                    sock,
                    sent,
                    fault: tag >> 5,
                    dt,
                    head,
                    hidden,
                    tail,
                });
            }
        }
    }
    (cut, events)
}

/// What may go wrong between the kernel and the decoder for one syscall's
/// records (a lost record, a record from a program that raced another),
/// by the tag's bits 5-7; 0 is none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// A record of a syscall in several is lost (the ring was full).
    LoseOne,
    /// A record claims to start one byte later than it does.
    Offset,
    /// `captured` says more than the record holds.
    Captured,
    /// `tail_len` says more than the header's tail can hold.
    TailLen,
    /// The last record is lost: the syscall is never complete.
    LoseLast,
    /// The socket's inode is unknown (0).
    NoInode,
    /// A record is delivered twice.
    Twice,
}

impl Fault {
    fn of(bits: u8) -> Self {
        match bits & 7 {
            1 => Self::LoseOne,
            2 => Self::Offset,
            3 => Self::Captured,
            4 => Self::TailLen,
            5 => Self::LoseLast,
            6 => Self::NoInode,
            7 => Self::Twice,
            _ => Self::None,
        }
    }
}

/// A write's bytes as far as they are known: `head`, `hidden` unknown
/// bytes, `tail`.
struct Known<'a> {
    head: &'a [u8],
    hidden: usize,
    tail: &'a [u8],
}

impl Known<'_> {
    fn len(&self) -> usize {
        self.head.len() + self.hidden + self.tail.len()
    }

    fn byte(&self, at: usize) -> Option<u8> {
        if at < self.head.len() {
            Some(self.head[at])
        } else if at >= self.head.len() + self.hidden {
            self.tail.get(at - self.head.len() - self.hidden).copied()
        } else {
            None
        }
    }
}

fn header_bytes(h: &StreamHeader) -> &[u8] {
    // SAFETY: StreamHeader is plain integers and arrays with explicit
    // padding fields (no implicit padding), so every byte is initialised.
    unsafe {
        std::slice::from_raw_parts((h as *const StreamHeader).cast(), size_of::<StreamHeader>())
    }
}

fn record(h: &StreamHeader, data: &[u8]) -> Vec<u8> {
    let mut r = header_bytes(h).to_vec();
    r.extend_from_slice(data);
    r
}

/// Syscalls one input is cut into at most; past it the rest of each write
/// is one syscall. Keeps an input to milliseconds (tiny pieces of a long
/// capture would be tens of thousands of records) so that the fuzzer
/// explores rather than grinds.
const MAX_SYSCALLS: usize = 2048;

/// Turns the conversation into ring records, in the order the ring hands
/// them over.
pub struct Kernel {
    cut: Cut,
    syscalls_left: usize,
    ts: u64,
    /// Sockets whose first record was sent (it carries the ports).
    started: [bool; 4],
    /// Lets a socket's inode change on a close, as a new socket reuses the
    /// slot: streams restart.
    generation: [u64; 4],
}

impl Kernel {
    pub fn new(cut: Cut) -> Self {
        Self {
            cut,
            syscalls_left: MAX_SYSCALLS,
            ts: 1_000_000_000,
            started: [false; 4],
            generation: [0; 4],
        }
    }

    fn step(&mut self, dt: u8) {
        let delta = (i64::from(dt) - 16) * 1_000_000;
        self.ts = self.ts.saturating_add_signed(delta);
    }

    fn ino(&self, sock: u8) -> u64 {
        1 + u64::from(sock) + 4 * self.generation[usize::from(sock)]
    }

    fn header(&mut self, sock: u8, sent: bool) -> StreamHeader {
        let first = !std::mem::replace(&mut self.started[usize::from(sock)], true);
        let mut addr = SockTuple::EMPTY;
        if first {
            addr.family = 2;
            addr.lport = 5432 + u16::from(sock);
            addr.rport = 40_000;
        }
        StreamHeader {
            ts_enter: self.ts,
            ts_exit: self.ts + 1_000,
            sk: 0xffff_0000 + u64::from(sock),
            ino: self.ino(sock),
            len: 0,
            tgid: 4242,
            tid: 4243 + u32::from(sock),
            fd: 3 + u32::from(sock),
            kind: STREAM_DATA,
            direction: if sent { STREAM_SENT } else { STREAM_RECEIVED },
            captured: 0,
            tail_len: 0,
            addr,
            flags: 0,
            offset: 0,
            _pad: 0,
            comm: *b"fuzzed\0\0\0\0\0\0\0\0\0\0",
            tail: [0; TAIL_CAPTURE],
        }
    }

    /// The records of one event.
    pub fn records(&mut self, event: &Event<'_>, out: &mut Vec<Vec<u8>>) {
        match *event {
            Event::Raw(bytes) => out.push(bytes.to_vec()),
            Event::Close { sock, dt } => {
                self.step(dt);
                let mut h = self.header(sock, false);
                h.kind = STREAM_CLOSED;
                h.flags = PIECE_LAST;
                out.push(record(&h, &[]));
                let s = usize::from(sock);
                self.generation[s] += 1;
                self.started[s] = false;
            }
            Event::Write {
                sock,
                sent,
                fault,
                dt,
                head,
                hidden,
                tail,
            } => {
                self.step(dt);
                let known = Known { head, hidden, tail };
                let mut at = 0;
                let total = known.len();
                while at < total {
                    let len = if self.syscalls_left > 0 {
                        self.syscalls_left -= 1;
                        self.cut.piece.min(total - at)
                    } else {
                        total - at
                    };
                    self.syscall(sock, sent, Fault::of(fault), &known, at, len, out);
                    at += len;
                }
            }
        }
    }

    /// The records of the syscall that carried `known[at..at + len]`.
    #[expect(clippy::too_many_arguments, reason = "one syscall's whole description")]
    fn syscall(
        &mut self,
        sock: u8,
        sent: bool,
        fault: Fault,
        known: &Known<'_>,
        at: usize,
        len: usize,
        out: &mut Vec<Vec<u8>>,
    ) {
        let mut h = self.header(sock, sent);
        h.len = len as u64;
        if fault == Fault::NoInode {
            h.ino = 0;
        }
        // The prefix, up to the first byte the recording did not keep.
        let want = len.min(self.cut.capture);
        let data: Vec<u8> = (at..at + want).map_while(|i| known.byte(i)).collect();
        if self.cut.tail && data.len() < len {
            let t = len.min(TAIL_CAPTURE);
            if let Some(bytes) = (at + len - t..at + len)
                .map(|i| known.byte(i))
                .collect::<Option<Vec<u8>>>()
            {
                h.tail[..t].copy_from_slice(&bytes);
                h.tail_len = t as u32;
            }
        }
        if fault == Fault::TailLen {
            h.tail_len = u32::MAX;
        }
        let pieces: Vec<&[u8]> = if data.is_empty() {
            vec![&[]]
        } else {
            data.chunks(MAX_CAPTURE).collect()
        };
        let n = pieces.len();
        let mut offset = 0u32;
        for (i, piece) in pieces.into_iter().enumerate() {
            let mut r = h;
            r.captured = piece.len() as u32;
            r.offset = offset;
            offset += piece.len() as u32;
            if i + 1 == n {
                r.flags = PIECE_LAST;
            } else {
                // Only the last record carries the tail.
                r.tail_len = 0;
            }
            match fault {
                Fault::LoseOne if n > 1 && i == n / 2 => continue,
                Fault::LoseLast if i + 1 == n => continue,
                Fault::Offset if i == n / 2 => r.offset += 1,
                Fault::Captured if i == n / 2 => r.captured = u32::MAX,
                _ => {}
            }
            let bytes = record(&r, piece);
            if fault == Fault::Twice && i == n / 2 {
                out.push(bytes.clone());
            }
            out.push(bytes);
        }
    }
}

/// Feeds `input`, read as a conversation, to `analysers` through the
/// streams decoder; ticks them now and then, as the collector does.
pub fn run_conversation(input: &[u8], analysers: Vec<Box<dyn Analyser>>) {
    let (cut, events) = parse(input);
    let mut kernel = Kernel::new(cut);
    let mut decoder = StreamRecords::new(analysers);
    let mut records = Vec::new();
    for (i, e) in events.iter().enumerate() {
        records.clear();
        kernel.records(e, &mut records);
        for r in &records {
            decoder.dispatch(r);
        }
        if i % 16 == 15 {
            decoder.tick();
            decoder.take_decisions();
        }
    }
    decoder.tick();
}
