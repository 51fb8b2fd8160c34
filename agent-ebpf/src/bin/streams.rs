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
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user, generated},
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use pipelens_common::{
    connections::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_CLOSE},
    streams::*,
};
use pipelens_ebpf::{current_ids, is_target, sock_and_inode_of_fd, sock_protocol, sock_tuple};

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
static STREAM_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STREAM_STAT_COUNT, 0);

const AF_UNIX: u16 = 1;
const WAKEUP_BYTES: u64 = 256 * 1024;
const MASK: usize = MAX_CAPTURE - 1;

use pipelens_ebpf::tp_field as tp;

#[inline(always)]
fn enter(ctx: &TracePointContext, shape: u32, direction: u32) -> Result<(), i32> {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return Ok(());
    }
    let off = STREAM_TP_OFFSETS.load();
    let fd: u64 = tp(ctx, off.enter_fd)?;
    let ptr: u64 = tp(ctx, off.enter_ptr)?;
    let arg2: u64 = tp(ctx, off.enter_arg2)?;
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
        None => ACTIVE_IO.insert(tid, io, 0)?,
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
    match try_exit(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_exit(ctx: &TracePointContext) -> Result<(), i32> {
    let (tgid, tid) = current_ids();
    // SAFETY: copied out before removal.
    let Some(p) = ACTIVE_IO.get_ptr_mut(tid) else {
        return Ok(());
    };
    // SAFETY: this thread's own entry; nothing else writes it.
    let io = unsafe { *p };
    if io.ts_enter == 0 {
        return Ok(());
    }
    // SAFETY: as above.
    unsafe { (*p).ts_enter = 0 };
    let off = STREAM_TP_OFFSETS.load();
    let ret: i64 = tp(ctx, off.exit_ret)?;
    if ret <= 0 {
        return Ok(());
    }
    let (sk, ino) = sock_and_inode_of_fd(io.fd as u64, true)?;
    // The state decides first: a socket seen before needs no more reads.
    let mut first_sight = false;
    let (mut family, mut lport, mut rport) = (0u16, 0u16, 0u16);
    match CAPTURE_STATE.get_ptr_mut(ino) {
        Some(state) => {
            // SAFETY: live map value.
            let state = unsafe { &mut *state };
            if state.state == CAPTURE_OFF {
                return Ok(());
            }
            if state.state == CAPTURE_UNDECIDED {
                if state.undecided_seen >= UNDECIDED_BUDGET {
                    state.state = CAPTURE_OFF;
                    return Ok(());
                }
                state.undecided_seen += 1;
            }
        }
        None => {
            // First sight: only TCP and Unix stream sockets are worth it.
            let t = sock_tuple(sk)?;
            let wanted = match t.family {
                AF_INET | AF_INET6 => sock_protocol(sk)? == IPPROTO_TCP,
                AF_UNIX => true,
                _ => false,
            };
            // And only when the first byte can open a protocol we parse:
            // anything else is ruled out here, without a record to userspace
            // (under connection churn, classifying every socket in userspace
            // cost more than the connections collector itself).
            let wanted = wanted && may_open_protocol(first_byte(&io));
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
            CAPTURE_STATE.insert(ino, fresh, 0)?;
            if !wanted {
                return Ok(());
            }
            if t.family != AF_UNIX {
                let _ = CAPTURED_TCP.insert(sk, ino, 0);
            }
            (family, lport, rport) = (t.family, t.lport, t.rport);
            first_sight = true;
        }
    }

    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: per-CPU scratch, no other user on this CPU while we run.
    let rec = unsafe { &mut *rec };
    let h = &mut rec.header;
    h.ts_enter = io.ts_enter;
    h.ts_exit = unsafe { bpf_ktime_get_ns() };
    h.sk = sk;
    h.ino = ino;
    h.len = ret as u64;
    h.tgid = tgid;
    h.tid = tid;
    h.fd = io.fd;
    h.kind = STREAM_DATA;
    h.direction = io.direction;
    h.family = family;
    h.lport = lport;
    h.rport = rport;
    h.comm = pipelens_ebpf::process_comm();
    h.tail_len = 0;

    let mut cap = off.capture_bytes as u64;
    if cap > (MAX_PIECES * MAX_CAPTURE) as u64 {
        cap = (MAX_PIECES * MAX_CAPTURE) as u64;
    }
    let want = if (ret as u64) < cap { ret as u64 } else { cap };
    h.flags = 0;
    h.offset = 0;
    if want < ret as u64 && io.shape == IO_BUF {
        copy_tail(&mut rec.header, io.ptr, ret as u64);
    }
    match io.shape {
        IO_BUF => {
            // One record per MAX_CAPTURE bytes, so that a pipelined batch
            // larger than one record is still seen whole.
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
                    copy_user_full(rec.data.as_mut_ptr(), io.ptr + start)
                } else {
                    copy_user(rec.data.as_mut_ptr(), io.ptr + start, n)
                };
                rec.header.offset = start as u32;
                rec.header.captured = got as u32;
                rec.header.flags = if last { PIECE_LAST } else { 0 };
                let size = core::mem::size_of::<StreamHeader>() as u64 + got;
                submit(rec, size, first_sight && i == 0);
                if last {
                    break;
                }
                i += 1;
            }
        }
        shape => {
            let first = if want < MAX_CAPTURE as u64 {
                want
            } else {
                (MAX_CAPTURE - 1) as u64
            };
            let captured = if shape == IO_IOV {
                copy_iovecs(&mut rec.data, io.ptr, io.iovcnt as u64, first)
            } else {
                // struct user_msghdr: msg_iov at 16, msg_iovlen at 24 (user ABI).
                let iov: u64 = read_user(io.ptr + 16).unwrap_or(0);
                let iovlen: u64 = read_user(io.ptr + 24).unwrap_or(0);
                copy_iovecs(&mut rec.data, iov, iovlen, first)
            };
            rec.header.captured = captured as u32;
            rec.header.flags = PIECE_LAST;
            let size = core::mem::size_of::<StreamHeader>() as u64 + (captured & MASK as u64);
            submit(rec, size, first_sight);
        }
    }
    Ok(())
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
/// first iovec); `None` when it cannot be read.
#[inline(always)]
fn first_byte(io: &ActiveIo) -> Option<u8> {
    let base = match io.shape {
        IO_BUF => io.ptr,
        IO_IOV => read_user::<u64>(io.ptr).ok()?,
        _ => {
            let iov: u64 = read_user(io.ptr + 16).ok()?;
            read_user::<u64>(iov).ok()?
        }
    };
    read_user::<u8>(base).ok()
}

#[inline(always)]
fn read_user<T>(addr: u64) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_user validates the user address.
    unsafe { bpf_probe_read_user(addr as *const T) }
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

#[inline(always)]
fn copy_tail(h: &mut StreamHeader, buf: u64, len: u64) {
    let start = buf + len - TAIL_CAPTURE as u64;
    // SAFETY: fixed-size copy into the header's tail array.
    let rc = unsafe {
        generated::bpf_probe_read_user(
            h.tail.as_mut_ptr().cast(),
            TAIL_CAPTURE as u32,
            start as *const core::ffi::c_void,
        )
    };
    if rc == 0 {
        h.tail_len = TAIL_CAPTURE as u32;
    }
}

/// The first two iovecs, up to `want` bytes in all.
#[inline(always)]
fn copy_iovecs(data: &mut [u8; 2 * MAX_CAPTURE], iov: u64, iovcnt: u64, want: u64) -> u64 {
    if iovcnt == 0 {
        return 0;
    }
    let (Ok(base0), Ok(len0)) = (read_user::<u64>(iov), read_user::<u64>(iov + 8)) else {
        return 0;
    };
    let first = if len0 < want { len0 } else { want };
    let mut done = copy_user(data.as_mut_ptr(), base0, first);
    if done < want && done == len0 && iovcnt > 1 {
        let (Ok(base1), Ok(len1)) = (read_user::<u64>(iov + 16), read_user::<u64>(iov + 24)) else {
            return done;
        };
        let rest = want - done;
        let second = if len1 < rest { len1 } else { rest };
        let at = (pipelens_ebpf::opaque(done) as usize) & MASK;
        // SAFETY: `at` < MAX_CAPTURE and the copy is < MAX_CAPTURE, inside
        // the 2 × MAX_CAPTURE data area.
        done += copy_user(unsafe { data.as_mut_ptr().add(at) }, base1, second);
    }
    done
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
    if STREAM_EVENTS.output::<[u8]>(bytes, flags).is_err()
        && let Some(p) = STREAM_STATS.get_ptr_mut(STREAM_STAT_RING_LOST)
    {
        // SAFETY: per-CPU slot.
        unsafe { *p += 1 };
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
    let fd: u64 = tp(ctx, STREAM_TP_OFFSETS.load().enter_fd)?;
    let (sk, ino) = sock_and_inode_of_fd(fd, true)?;
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
    let off = STREAM_TP_OFFSETS.load();
    let new: i32 = tp(ctx, off.iss_newstate)?;
    if new != TCP_CLOSE {
        return Ok(());
    }
    let sk: u64 = tp(ctx, off.iss_skaddr)?;
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
