//! Socket payload capture: the bytes targets read from and write to their
//! sockets, for the protocol parsers in userspace (PostgreSQL, HTTP,
//! WebSocket). The kernel only copies; it never parses.

use crate::connections::SockTuple;

/// Bytes per ring record; a syscall's data is sent in up to
/// [`MAX_PIECES`] records of this size.
pub const MAX_CAPTURE: usize = 4096;
/// Records per syscall at most: the largest prefix captured is
/// `MAX_PIECES * MAX_CAPTURE` (64 KiB), enough for a pipelined batch of
/// statements in one write.
pub const MAX_PIECES: usize = 16;
/// `StreamHeader::flags`: this record ends the syscall's data.
pub const PIECE_LAST: u32 = 1;
/// `StreamHeader::flags` (on the last record): the iovecs of a vectored
/// call were not all walked, so the tail is unknown; the call's length and
/// the prefix captured are still exact. Counted in `STREAM_STAT_UNWALKED`.
pub const PIECE_UNWALKED: u32 = 2;

/// Steps of the iovec walk per program; the walk goes on in a tail call of
/// the same program, at most [`IOV_WALK_CALLS`] times. A step ends an
/// iovec, fills a record or reaches the capture limit, so a call needs at
/// most `UIO_MAXIOV` (1,024) + [`MAX_PIECES`] + 2 steps.
pub const IOV_STEPS: usize = 48;
/// Programs in a walk's chain: the kernel allows 33 (32 tail calls on 5.10).
pub const IOV_WALK_CALLS: usize = 33;
/// The iovec count the kernel accepts in one call (`UIO_MAXIOV`).
pub const UIO_MAXIOV: u64 = 1024;
/// Bytes kept from the end of a syscall's data when it is longer than the
/// prefix: replies usually end with the message that completes them
/// (PostgreSQL's ReadyForQuery), which is what latency needs.
pub const TAIL_CAPTURE: usize = 128;

/// `StreamEvent::kind`: data read or written.
pub const STREAM_DATA: u32 = 1;
/// The socket was closed (or its TCP connection reached CLOSE).
pub const STREAM_CLOSED: u32 = 2;

/// `StreamEvent::direction`: the target read the bytes.
pub const STREAM_RECEIVED: u32 = 0;
/// The target wrote the bytes.
pub const STREAM_SENT: u32 = 1;

/// `CAPTURE_STATE` values: what userspace decided about a socket.
pub const CAPTURE_UNDECIDED: u32 = 0;
pub const CAPTURE_ON: u32 = 1;
pub const CAPTURE_OFF: u32 = 2;

/// Syscalls of a socket that stays undecided before the kernel stops
/// sending its data. Userspace decides on the first one it sees (the kernel
/// wakes it at once for a new socket), so this only bounds the cost when
/// userspace lags; it must be large enough that a busy connection does not
/// run past it in the meantime, or its first statements would be lost.
pub const UNDECIDED_BUDGET: u32 = 512;

pub const MAX_STREAM_SOCKS: u32 = 65_536;

/// Per-socket capture state, keyed by the socket's inode number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CaptureState {
    pub state: u32,
    pub undecided_seen: u32,
    /// The process that first read or wrote the socket: only its close
    /// ends the stream. Another holder's close (a forking server's parent
    /// dropping its copy of an accepted socket, as the PostgreSQL
    /// postmaster does right after forking the backend) leaves it going.
    pub tgid: u32,
    pub _pad: u32,
}

/// Syscall in flight on a thread, from its enter to its exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ActiveIo {
    pub ts_enter: u64,
    /// Buffer, `iovec` array or `user_msghdr` address.
    pub ptr: u64,
    pub fd: u32,
    /// [`IO_BUF`], [`IO_IOV`] or [`IO_MSG`].
    pub shape: u32,
    pub direction: u32,
    /// Number of iovecs for [`IO_IOV`].
    pub iovcnt: u32,
}

pub const IO_BUF: u32 = 0;
pub const IO_IOV: u32 = 1;
pub const IO_MSG: u32 = 2;

/// Header of a record on the streams ring; `captured` bytes of data follow
/// it (the record is sent with only those bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StreamHeader {
    pub ts_enter: u64,
    pub ts_exit: u64,
    /// The socket's `struct sock` address (0 when unknown).
    pub sk: u64,
    /// The socket's inode number: the stream's identity (0 on a close
    /// seen only by address, from the TCP state tracepoint).
    pub ino: u64,
    /// Full length of the data (the syscall's return value).
    pub len: u64,
    pub tgid: u32,
    pub tid: u32,
    pub fd: u32,
    pub kind: u32,
    pub direction: u32,
    /// Bytes of data following the header (a prefix of the data).
    pub captured: u32,
    /// Valid bytes in `tail` (the end of the data), 0 when the prefix
    /// already covers everything.
    pub tail_len: u32,
    /// The socket's addresses and ports, on the first record of a socket
    /// (empty on the others: the stream is known by then).
    pub addr: SockTuple,
    /// [`PIECE_LAST`] on the last record of a syscall.
    pub flags: u32,
    /// Where this record's data starts within the syscall's data.
    pub offset: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
    pub tail: [u8; TAIL_CAPTURE],
}

/// The per-CPU scratch record assembled before it is copied to the ring.
/// The data area is twice the capture limit so that a second iovec copied
/// at any offset below the limit stays in bounds for the verifier.
#[repr(C)]
pub struct StreamRecord {
    pub header: StreamHeader,
    pub data: [u8; 2 * MAX_CAPTURE],
}

/// Tracepoint field offsets for the capture programs, read from tracefs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamTracepointOffsets {
    /// First argument (`fd`) of every hooked `sys_enter_*`.
    pub enter_fd: u32,
    /// Second argument (buffer, iovec array or msghdr).
    pub enter_ptr: u32,
    /// Third argument (count, vlen or flags).
    pub enter_arg2: u32,
    /// `ret` of `sys_exit_*`.
    pub exit_ret: u32,
    /// `sock:inet_sock_set_state`
    pub iss_skaddr: u32,
    pub iss_newstate: u32,
    /// Bytes of prefix to capture per syscall (at most
    /// `MAX_PIECES * MAX_CAPTURE`).
    pub capture_bytes: u32,
    pub _pad: u32,
}

/// A vectored call being walked, iovec by iovec, across tail calls. The
/// record under construction is the per-CPU `StreamRecord`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IovWalk {
    /// User address of the `struct iovec` array, and its length.
    pub iov: u64,
    pub iovcnt: u64,
    /// The iovec being walked, and the bytes of it already walked.
    pub idx: u64,
    pub in_iov: u64,
    /// Bytes of the call's data walked so far, and in all (its return value).
    pub pos: u64,
    pub total: u64,
    /// Bytes to capture (the prefix): `min(total, --capture-bytes)`.
    pub want: u64,
    /// Bytes in the record under construction.
    pub fill: u64,
    /// Where the tail starts (`total - tail_len`), when there is one.
    pub tail_from: u64,
    pub tail_len: u64,
    /// Wake userspace with the first record (a socket's first sight).
    pub wake: u32,
    /// A piece of the tail could not be read: the tail is not sent.
    pub tail_fault: u32,
}

/// Indices of the per-CPU `STREAM_STATS` array.
pub const STREAM_STAT_RING_LOST: u32 = 0;
/// Bytes of vectored calls whose iovecs could not all be walked.
pub const STREAM_STAT_UNWALKED: u32 = 1;
/// A map insert failed: one slot per map, exported with
/// [`STREAM_MAP_ERRORS`].
pub const STREAM_STAT_ACTIVE_IO_FULL: u32 = 2;
pub const STREAM_STAT_CAPTURE_STATE_FULL: u32 = 3;
pub const STREAM_STAT_CAPTURED_TCP_FULL: u32 = 4;
pub const STREAM_STAT_COUNT: u32 = 5;

/// `STREAM_STATS` slots counting failed inserts, with the map each is for.
pub const STREAM_MAP_ERRORS: [(u32, &str); 3] = [
    (STREAM_STAT_ACTIVE_IO_FULL, "active_io"),
    (STREAM_STAT_CAPTURE_STATE_FULL, "capture_state"),
    (STREAM_STAT_CAPTURED_TCP_FULL, "captured_tcp"),
];

// The header crosses into userspace as raw bytes: no implicit padding.
const _: () = assert!(size_of::<StreamHeader>() == 264);
