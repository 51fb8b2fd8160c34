//! Socket payload capture for the protocol parsers: a bounded prefix (and a
//! short tail) of every read and write of a target on a TCP or Unix-domain
//! socket that userspace has not ruled out. The kernel copies; userspace
//! classifies each socket from its first bytes and turns capture off for
//! the ones that speak nothing it parses.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_ktime_get_ns, generated},
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::TracePointContext,
};
use pipelens_common::{
    connections::{AF_INET, AF_INET6, IPPROTO_TCP, SockTuple, TCP_CLOSE},
    streams::*,
};
use pipelens_ebpf::{
    bump_stat, current_ids, is_target, kernel_offset, read_user, sock_of_fd, sock_protocol,
    sock_tuple,
};

#[unsafe(no_mangle)]
static STREAM_TP_OFFSETS: Global<StreamTracepointOffsets> = Global::new(StreamTracepointOffsets {
    enter_fd: 16,
    enter_ptr: 24,
    enter_arg2: 32,
    exit_ret: 16,
    iss_skaddr: 8,
    iss_newstate: 20,
    capture_bytes: 1024,
    _pad: 0,
});

#[map]
static STREAM_EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

#[map]
/// The syscall in flight per thread. Entries are rewritten in place and
/// marked done (`ts_enter == 0`) rather than inserted and deleted on every
/// syscall: a hash update and delete per read and write were the largest
/// map cost under pgbench. LRU, so that exited threads' entries go.
static ACTIVE_IO: LruHashMap<u32, ActiveIo> = LruHashMap::with_max_entries(16_384, 0);

#[map]
static CAPTURE_STATE: LruHashMap<u64, CaptureState> =
    LruHashMap::with_max_entries(MAX_STREAM_SOCKS, 0);

/// Address → inode of the TCP sockets being captured, so that their
/// CLOSE (seen only by address) ends the right stream.
#[map]
static CAPTURED_TCP: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_STREAM_SOCKS, 0);

#[map]
static SCRATCH: PerCpuArray<StreamRecord> = PerCpuArray::with_max_entries(1, 0);

#[map]
static IOV_WALK: PerCpuArray<IovWalk> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: `walk_iovecs`, set by userspace after loading.
#[map]
static IOV_WALKER: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[map]
static STREAM_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STREAM_STAT_COUNT, 0);

const AF_UNIX: u16 = 1;
const WAKEUP_BYTES: u64 = 256 * 1024;
const MASK: usize = MAX_CAPTURE - 1;

use pipelens_ebpf::tp_field as tp;

/// Reads one field of `STREAM_TP_OFFSETS` (not the whole struct onto the
/// stack).
macro_rules! tp_off {
    ($field:ident) => {
        pipelens_ebpf::global_field!(STREAM_TP_OFFSETS, StreamTracepointOffsets, $field)
    };
}

#[inline(always)]
fn enter(ctx: &TracePointContext, shape: u32, direction: u32) -> Result<(), i32> {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return Ok(());
    }
    let fd: u64 = tp(ctx, tp_off!(enter_fd))?;
    let ptr: u64 = tp(ctx, tp_off!(enter_ptr))?;
    let arg2: u64 = tp(ctx, tp_off!(enter_arg2))?;
    let io = ActiveIo {
        ts_enter: unsafe { bpf_ktime_get_ns() },
        ptr,
        fd: fd as u32,
        shape,
        direction,
        iovcnt: if shape == IO_IOV { arg2 as u32 } else { 0 },
    };
    match ACTIVE_IO.get_ptr_mut(tid) {
        // SAFETY: this thread's own entry; nothing else writes it.
        Some(p) => unsafe { *p = io },
        None => {
            if ACTIVE_IO.insert(tid, io, 0).is_err() {
                bump_stat(&STREAM_STATS, STREAM_STAT_ACTIVE_IO_FULL);
            }
        }
    }
    Ok(())
}

macro_rules! enter_probe {
    ($name:ident, $shape:expr, $direction:expr, $doc:literal) => {
        #[doc = $doc]
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            match enter(&ctx, $shape, $direction) {
                Ok(()) | Err(_) => 0,
            }
        }
    };
}

enter_probe!(
    enter_read,
    IO_BUF,
    STREAM_RECEIVED,
    "`sys_enter_read(fd, buf, count)`, `sys_enter_recvfrom(fd, ubuf, size, ...)`"
);
enter_probe!(
    enter_write,
    IO_BUF,
    STREAM_SENT,
    "`sys_enter_write(fd, buf, count)`, `sys_enter_sendto(fd, buff, len, ...)`"
);
enter_probe!(
    enter_readv,
    IO_IOV,
    STREAM_RECEIVED,
    "`sys_enter_readv(fd, vec, vlen)`"
);
enter_probe!(
    enter_writev,
    IO_IOV,
    STREAM_SENT,
    "`sys_enter_writev(fd, vec, vlen)`"
);
enter_probe!(
    enter_recvmsg,
    IO_MSG,
    STREAM_RECEIVED,
    "`sys_enter_recvmsg(fd, msg, flags)`"
);
enter_probe!(
    enter_sendmsg,
    IO_MSG,
    STREAM_SENT,
    "`sys_enter_sendmsg(fd, msg, flags)`"
);

/// `sys_exit_*(ret)` of every hooked syscall: copies the data of a socket
/// that is being captured or is still undecided.
#[tracepoint]
pub fn exit_io(ctx: TracePointContext) -> u32 {
    if let Ok(true) = try_exit(&ctx) {
        // SAFETY: the slot holds `walk_iovecs`, a tracepoint program too;
        // on success this does not return.
        unsafe { IOV_WALKER.tail_call(&ctx, 0) };
        finish_walk(true);
    }
    0
}

/// The rest of a vectored call's walk, [`IOV_STEPS`] steps per program,
/// chained by tail calls to itself.
#[tracepoint]
pub fn walk_iovecs(ctx: TracePointContext) -> u32 {
    if walk_steps() {
        finish_walk(false);
    } else {
        // SAFETY: as in `exit_io`.
        unsafe { IOV_WALKER.tail_call(&ctx, 0) };
        // The chain's limit: what is left goes unwalked, and is counted.
        finish_walk(true);
    }
    0
}

/// Copies, record by record, the prefix of a vectored call's data and its
/// tail; walks the rest by length. True when the call is walked to its end.
#[inline(always)]
fn walk_steps() -> bool {
    let (Some(w), Some(rec)) = (IOV_WALK.get_ptr_mut(0), SCRATCH.get_ptr_mut(0)) else {
        return true;
    };
    // SAFETY: per-CPU state and scratch, no other user on this CPU while we run.
    let (w, rec) = unsafe { (&mut *w, &mut *rec) };
    for _ in 0..IOV_STEPS {
        if w.pos >= w.total || w.idx >= w.iovcnt {
            return true;
        }
        let Ok((base, len)) = read_iovec(w.iov, w.idx) else {
            // An unreadable iovec array: the rest cannot be walked.
            return false;
        };
        let mut seg = len.saturating_sub(w.in_iov);
        if seg > w.total - w.pos {
            seg = w.total - w.pos;
        }
        if seg == 0 {
            w.idx += 1;
            w.in_iov = 0;
            continue;
        }
        let src = base + w.in_iov;
        if w.pos < w.want {
            let room = MAX_CAPTURE as u64 - w.fill;
            if seg > w.want - w.pos {
                seg = w.want - w.pos;
            }
            if seg > room {
                seg = room;
            }
            if copy_at(rec.data.as_mut_ptr(), w.fill, src, seg) != seg {
                // A fault: the prefix ends here, the rest is walked by length.
                w.want = w.pos;
                continue;
            }
            w.fill += seg;
        }
        if w.tail_len > 0 && w.pos + seg > w.tail_from {
            let from = if w.pos > w.tail_from {
                w.pos
            } else {
                w.tail_from
            };
            if !copy_tail_piece(
                &mut rec.header,
                from - w.tail_from,
                src + (from - w.pos),
                w.pos + seg - from,
            ) {
                w.tail_fault = 1;
            }
        }
        w.pos += seg;
        w.in_iov += seg;
        if w.in_iov >= len {
            w.idx += 1;
            w.in_iov = 0;
        }
        if w.fill >= MAX_CAPTURE as u64 && w.pos < w.want {
            rec.header.offset = (w.pos - w.fill) as u32;
            rec.header.captured = MAX_CAPTURE as u32;
            rec.header.flags = 0;
            submit(
                rec,
                (size_of::<StreamHeader>() + MAX_CAPTURE) as u64,
                w.wake != 0,
            );
            w.wake = 0;
            w.fill = 0;
        }
    }
    w.pos >= w.total || w.idx >= w.iovcnt
}

/// Sends the last record of a vectored call, with its tail once the walk
/// reached it; counts what went unwalked.
#[inline(always)]
fn finish_walk(unwalked: bool) {
    let (Some(w), Some(rec)) = (IOV_WALK.get_ptr_mut(0), SCRATCH.get_ptr_mut(0)) else {
        return;
    };
    // SAFETY: as in `walk_steps`.
    let (w, rec) = unsafe { (&mut *w, &mut *rec) };
    let prefix_end = if w.pos < w.want { w.pos } else { w.want };
    let fill = if w.fill > MAX_CAPTURE as u64 {
        MAX_CAPTURE as u64
    } else {
        w.fill
    };
    rec.header.offset = prefix_end.saturating_sub(fill) as u32;
    rec.header.captured = fill as u32;
    rec.header.flags = PIECE_LAST;
    rec.header.tail_len = if w.pos >= w.total {
        w.tail_len as u32
    } else {
        0
    };
    if unwalked && w.pos < w.total {
        rec.header.flags |= PIECE_UNWALKED;
        if let Some(p) = STREAM_STATS.get_ptr_mut(STREAM_STAT_UNWALKED) {
            // SAFETY: per-CPU slot.
            unsafe { *p += w.total - w.pos };
        }
    }
    submit(rec, size_of::<StreamHeader>() as u64 + fill, w.wake != 0);
}

/// Copies `n` (≤ MAX_CAPTURE) user bytes to `data + at` (at < MAX_CAPTURE);
/// returns the count copied, 0 on a fault.
#[inline(always)]
fn copy_at(data: *mut u8, at: u64, src: u64, n: u64) -> u64 {
    let at = (pipelens_ebpf::opaque(at) as usize) & MASK;
    let n = pipelens_ebpf::opaque(n);
    if n == 0 || n > MAX_CAPTURE as u64 {
        return 0;
    }
    // SAFETY: `data` has room for 2 × MAX_CAPTURE bytes, `at + n` is below
    // that; the helper validates `src`.
    let rc = unsafe {
        generated::bpf_probe_read_user(
            data.add(at).cast(),
            n as u32,
            src as *const core::ffi::c_void,
        )
    };
    if rc == 0 { n } else { 0 }
}

/// Copies `n` user bytes to the header's tail at `at` (`at + n` ≤
/// TAIL_CAPTURE by construction; the bounds the verifier sees stay inside
/// the record).
#[inline(always)]
fn copy_tail_piece(h: &mut StreamHeader, at: u64, src: u64, n: u64) -> bool {
    let at = (pipelens_ebpf::opaque(at) as usize) & (TAIL_CAPTURE - 1);
    let n = pipelens_ebpf::opaque(n);
    if n == 0 || n > TAIL_CAPTURE as u64 {
        return false;
    }
    // SAFETY: `at + n` ≤ TAIL_CAPTURE; for the verifier, at most
    // 2 × TAIL_CAPTURE past the tail's start, inside the scratch record.
    let rc = unsafe {
        generated::bpf_probe_read_user(
            h.tail.as_mut_ptr().add(at).cast(),
            n as u32,
            src as *const core::ffi::c_void,
        )
    };
    rc == 0
}

/// The exit of a read or write: the syscall entered, its result, and
/// the capture decision for its socket; then the data is copied (a plain
/// buffer) or its walk is set up (iovecs, continued in `walk_iovecs`).
/// True when the walk is to be run.
#[inline(always)]
fn try_exit(ctx: &TracePointContext) -> Result<bool, i32> {
    let (tgid, tid) = current_ids();
    let Some(io) = take_active_io(tid) else {
        return Ok(false);
    };
    let ret: i64 = tp(ctx, tp_off!(exit_ret))?;
    if ret <= 0 {
        return Ok(false);
    }
    let (sk, ino) = sock_of_fd(io.fd as u64)?;
    let Some(first_sight) = capture_decision(&io, sk, ino, tgid)? else {
        return Ok(false);
    };
    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        return Ok(false);
    };
    // SAFETY: per-CPU scratch, no other user on this CPU while we run.
    let rec = unsafe { &mut *rec };
    let total = ret as u64;
    fill_header(&mut rec.header, &io, sk, ino, total, first_sight);
    let mut cap = tp_off!(capture_bytes) as u64;
    if cap > (MAX_PIECES * MAX_CAPTURE) as u64 {
        cap = (MAX_PIECES * MAX_CAPTURE) as u64;
    }
    let want = if total < cap { total } else { cap };
    if io.shape == IO_BUF {
        if want < total {
            copy_tail(&mut rec.header, io.ptr, total);
        }
        send_buffer(rec, io.ptr, want, first_sight.is_some());
        return Ok(false);
    }
    Ok(start_walk(&io, total, want, first_sight.is_some()))
}

/// The syscall in flight on thread `tid`, marked done.
#[inline(always)]
fn take_active_io(tid: u32) -> Option<ActiveIo> {
    let p = ACTIVE_IO.get_ptr_mut(tid)?;
    // SAFETY: this thread's own entry; nothing else writes it.
    let io = unsafe { *p };
    if io.ts_enter == 0 {
        return None;
    }
    // SAFETY: as above.
    unsafe { (*p).ts_enter = 0 };
    Some(io)
}

/// Whether this call's data is sent: `None` when the socket is ruled out,
/// `Some(None)` for a socket seen before, `Some(Some(addresses))` for a
/// socket seen for the first time (its state decides first: a socket seen
/// before needs no more reads).
#[inline(always)]
fn capture_decision(
    io: &ActiveIo,
    sk: u64,
    ino: u64,
    tgid: u32,
) -> Result<Option<Option<SockTuple>>, i32> {
    let Some(state) = CAPTURE_STATE.get_ptr_mut(ino) else {
        return decide_first_sight(io, sk, ino, tgid).map(|t| t.map(Some));
    };
    // SAFETY: live map value.
    let state = unsafe { &mut *state };
    if state.state == CAPTURE_OFF {
        return Ok(None);
    }
    if state.state == CAPTURE_UNDECIDED {
        if state.undecided_seen >= UNDECIDED_BUDGET {
            state.state = CAPTURE_OFF;
            return Ok(None);
        }
        state.undecided_seen += 1;
    }
    Ok(Some(None))
}

/// A socket's first sight: only TCP and Unix stream sockets are worth it,
/// and only when the first byte can open a protocol we parse. Anything else
/// is ruled out here, without a record to userspace (under connection
/// churn, classifying every socket in userspace cost more than the
/// connections collector itself). The decision is kept in `CAPTURE_STATE`.
#[inline(always)]
fn decide_first_sight(
    io: &ActiveIo,
    sk: u64,
    ino: u64,
    tgid: u32,
) -> Result<Option<SockTuple>, i32> {
    let t = sock_tuple(sk)?;
    let wanted = match t.family {
        AF_INET | AF_INET6 => sock_protocol(sk)? == IPPROTO_TCP,
        AF_UNIX => true,
        _ => false,
    };
    let wanted = wanted && may_open_protocol(first_byte(io));
    let fresh = CaptureState {
        state: if wanted {
            CAPTURE_UNDECIDED
        } else {
            CAPTURE_OFF
        },
        undecided_seen: 1,
        tgid,
        _pad: 0,
    };
    if CAPTURE_STATE.insert(ino, fresh, 0).is_err() {
        // Not remembered: nothing sent, decided again on its next call.
        bump_stat(&STREAM_STATS, STREAM_STAT_CAPTURE_STATE_FULL);
        return Ok(None);
    }
    if !wanted {
        return Ok(None);
    }
    if t.family != AF_UNIX && CAPTURED_TCP.insert(sk, ino, 0).is_err() {
        // Its close by the TCP state change goes unseen; `close` still ends it.
        bump_stat(&STREAM_STATS, STREAM_STAT_CAPTURED_TCP_FULL);
    }
    Ok(Some(t))
}

/// The header every record of this call shares; addresses on a socket's
/// first sight only.
#[inline(always)]
fn fill_header(
    h: &mut StreamHeader,
    io: &ActiveIo,
    sk: u64,
    ino: u64,
    len: u64,
    first_sight: Option<SockTuple>,
) {
    let (tgid, tid) = current_ids();
    h.ts_enter = io.ts_enter;
    h.ts_exit = unsafe { bpf_ktime_get_ns() };
    h.sk = sk;
    h.ino = ino;
    h.len = len;
    h.tgid = tgid;
    h.tid = tid;
    h.fd = io.fd;
    h.kind = STREAM_DATA;
    h.direction = io.direction;
    h.addr = first_sight.unwrap_or(SockTuple::EMPTY);
    h.comm = pipelens_ebpf::process_comm();
    h.tail_len = 0;
    h.flags = 0;
    h.offset = 0;
}

/// A plain buffer's prefix, one record per MAX_CAPTURE bytes, so that a
/// pipelined batch larger than one record is still seen whole.
#[inline(always)]
fn send_buffer(rec: &mut StreamRecord, buf: u64, want: u64, wake: bool) {
    let mut i = 0usize;
    while i < MAX_PIECES {
        let start = (i * MAX_CAPTURE) as u64;
        if start >= want && i > 0 {
            break;
        }
        let left = want.saturating_sub(start);
        let n = if left < MAX_CAPTURE as u64 {
            left
        } else {
            MAX_CAPTURE as u64
        };
        let last = start + n >= want || i + 1 == MAX_PIECES;
        let got = if n == MAX_CAPTURE as u64 {
            copy_user_full(rec.data.as_mut_ptr(), buf + start)
        } else {
            copy_user(rec.data.as_mut_ptr(), buf + start, n)
        };
        rec.header.offset = start as u32;
        rec.header.captured = got as u32;
        rec.header.flags = if last { PIECE_LAST } else { 0 };
        let size = core::mem::size_of::<StreamHeader>() as u64 + got;
        submit(rec, size, wake && i == 0);
        if last {
            break;
        }
        i += 1;
    }
}

/// Sets up the walk of a vectored call's iovecs, run in `walk_iovecs`.
/// False when there is no walk state to set up.
#[inline(always)]
fn start_walk(io: &ActiveIo, total: u64, want: u64, wake: bool) -> bool {
    let (iov, iovcnt) = if io.shape == IO_IOV {
        (io.ptr, io.iovcnt as u64)
    } else {
        (
            read_user(io.ptr + kernel_offset!(msghdr_msg_iov) as u64).unwrap_or(0),
            read_user(io.ptr + kernel_offset!(msghdr_msg_iovlen) as u64).unwrap_or(0),
        )
    };
    let Some(w) = IOV_WALK.get_ptr_mut(0) else {
        return false;
    };
    let tail_len = if want < total {
        if total < TAIL_CAPTURE as u64 {
            total
        } else {
            TAIL_CAPTURE as u64
        }
    } else {
        0
    };
    // SAFETY: per-CPU walk state, no other user on this CPU while we run.
    unsafe {
        *w = IovWalk {
            iov,
            iovcnt: if iovcnt > UIO_MAXIOV {
                UIO_MAXIOV
            } else {
                iovcnt
            },
            idx: 0,
            in_iov: 0,
            pos: 0,
            total,
            want,
            fill: 0,
            tail_from: total - tail_len,
            tail_len,
            wake: wake as u32,
            tail_fault: 0,
        }
    };
    true
}

/// Entry `idx` of the `struct iovec` array at `iov`: `(iov_base, iov_len)`,
/// in one helper call (the loader checked the two are adjacent 8-byte
/// fields; offsets and stride from BTF).
#[inline(always)]
fn read_iovec(iov: u64, idx: u64) -> Result<(u64, u64), i32> {
    let base_off = kernel_offset!(iovec_iov_base) as u64;
    let len_off = kernel_offset!(iovec_iov_len) as u64;
    let lower = if base_off < len_off {
        base_off
    } else {
        len_off
    };
    let pair: [u64; 2] = read_user(iov + idx * kernel_offset!(iovec_size) as u64 + lower)?;
    Ok(if base_off < len_off {
        (pair[0], pair[1])
    } else {
        (pair[1], pair[0])
    })
}

/// Copies exactly MAX_CAPTURE user bytes to `dst`; returns the count.
#[inline(always)]
fn copy_user_full(dst: *mut u8, src: u64) -> u64 {
    // SAFETY: `dst` has room for 2 × MAX_CAPTURE bytes; the helper
    // validates `src`.
    let rc = unsafe {
        generated::bpf_probe_read_user(
            dst.cast(),
            MAX_CAPTURE as u32,
            src as *const core::ffi::c_void,
        )
    };
    if rc == 0 { MAX_CAPTURE as u64 } else { 0 }
}

/// Bytes that can start what the analysers recognise: a PostgreSQL
/// startup-phase message (its length's high byte, 0), a PostgreSQL message
/// type byte of either side, or an HTTP/1.x request method or status line.
const PROTOCOL_FIRST_BYTES: [u64; 4] = {
    let mut set = [0u64; 4];
    let bytes = b"\0ABCDEFGHIKNOPQRSTVWXZ123acdfnpstv";
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i] as usize;
        set[b / 64] |= 1 << (b % 64);
        i += 1;
    }
    set
};

#[inline(always)]
fn may_open_protocol(b: Option<u8>) -> bool {
    match b {
        Some(b) => PROTOCOL_FIRST_BYTES[(b as usize / 64) & 3] & (1 << (b % 64)) != 0,
        None => true,
    }
}

/// The first byte of the syscall's data, read from the user buffer (or its
/// first iovec); `None` when it cannot be read or the first iovec is empty.
#[inline(always)]
fn first_byte(io: &ActiveIo) -> Option<u8> {
    let iov = match io.shape {
        IO_BUF => return read_user::<u8>(io.ptr).ok(),
        IO_IOV => io.ptr,
        _ => read_user::<u64>(io.ptr + kernel_offset!(msghdr_msg_iov) as u64).ok()?,
    };
    // An empty first iovec says nothing of the first byte: undecided.
    match read_iovec(iov, 0).ok()? {
        (_, 0) => None,
        (base, _) => read_user::<u8>(base).ok(),
    }
}

/// Copies `n` (≤ MAX_CAPTURE − 1 after masking) user bytes to `dst`;
/// returns the count copied, 0 on a fault.
#[inline(always)]
fn copy_user(dst: *mut u8, src: u64, n: u64) -> u64 {
    let n = (pipelens_ebpf::opaque(n) as usize) & MASK;
    if n == 0 {
        return 0;
    }
    // SAFETY: `dst` has room for MAX_CAPTURE bytes past it (see
    // StreamRecord), `n` is below that; the helper validates `src`.
    let rc = unsafe {
        generated::bpf_probe_read_user(dst.cast(), n as u32, src as *const core::ffi::c_void)
    };
    if rc == 0 { n as u64 } else { 0 }
}

/// The last bytes of a `len`-byte buffer into the header's tail.
#[inline(always)]
fn copy_tail(h: &mut StreamHeader, buf: u64, len: u64) {
    let n = if len < TAIL_CAPTURE as u64 {
        len
    } else {
        TAIL_CAPTURE as u64
    };
    if copy_tail_piece(h, 0, buf + len - n, n) {
        h.tail_len = n as u32;
    }
}

#[inline(always)]
fn submit(rec: &StreamRecord, size: u64, wake: bool) {
    let max = core::mem::size_of::<StreamHeader>() + MAX_CAPTURE;
    let size = pipelens_ebpf::opaque(size);
    let size = if size as usize > max {
        max
    } else {
        size as usize
    };
    // SAFETY: `rec` is at least `max` bytes long.
    let bytes =
        unsafe { core::slice::from_raw_parts((rec as *const StreamRecord).cast::<u8>(), size) };
    let flags = if wake || STREAM_EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    };
    if STREAM_EVENTS.output::<[u8]>(bytes, flags).is_err() {
        bump_stat(&STREAM_STATS, STREAM_STAT_RING_LOST);
    }
}

fn emit_closed(sk: u64, ino: u64) {
    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch.
    let rec = unsafe { &mut *rec };
    let (tgid, tid) = current_ids();
    let now = unsafe { bpf_ktime_get_ns() };
    let h = &mut rec.header;
    h.ts_enter = now;
    h.ts_exit = now;
    h.sk = sk;
    h.ino = ino;
    h.len = 0;
    h.tgid = tgid;
    h.tid = tid;
    h.kind = STREAM_CLOSED;
    h.captured = 0;
    h.tail_len = 0;
    h.flags = PIECE_LAST;
    h.offset = 0;
    submit(rec, core::mem::size_of::<StreamHeader>() as u64, false);
}

/// `sys_enter_close(fd)`: a captured Unix or TCP socket closed by a target.
#[tracepoint]
pub fn enter_close(ctx: TracePointContext) -> u32 {
    match try_close(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_close(ctx: &TracePointContext) -> Result<(), i32> {
    let (tgid, _) = current_ids();
    if !is_target(tgid) {
        return Ok(());
    }
    let fd: u64 = tp(ctx, tp_off!(enter_fd))?;
    let (sk, ino) = sock_of_fd(fd)?;
    // SAFETY: copied out.
    let Some(state) = (unsafe { CAPTURE_STATE.get(ino) }).copied() else {
        return Ok(());
    };
    if state.tgid != 0 && state.tgid != tgid {
        // Not the last holder's close, most likely: the stream goes on.
        return Ok(());
    }
    let _ = CAPTURE_STATE.remove(ino);
    if state.state == CAPTURE_ON {
        emit_closed(sk, ino);
    }
    Ok(())
}

/// `sock:inet_sock_set_state`: a captured TCP connection reached CLOSE,
/// whoever closed it (the peer, a reset, the process exiting).
#[tracepoint]
pub fn stream_sock_state(ctx: TracePointContext) -> u32 {
    match try_state(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_state(ctx: &TracePointContext) -> Result<(), i32> {
    let new: i32 = tp(ctx, tp_off!(iss_newstate))?;
    if new != TCP_CLOSE {
        return Ok(());
    }
    let sk: u64 = tp(ctx, tp_off!(iss_skaddr))?;
    // Only the address is known here (the socket may be orphaned already).
    // SAFETY: copied out.
    let Some(ino) = (unsafe { CAPTURED_TCP.get(sk) }).copied() else {
        return Ok(());
    };
    let _ = CAPTURED_TCP.remove(sk);
    // SAFETY: copied out.
    let Some(state) = (unsafe { CAPTURE_STATE.get(ino) }).copied() else {
        return Ok(());
    };
    let _ = CAPTURE_STATE.remove(ino);
    if state.state == CAPTURE_ON {
        emit_closed(sk, ino);
    }
    Ok(())
}

pipelens_ebpf::kernel_object!();
