//! Connection lifecycle: TCP state changes, accept/connect outcomes, bytes,
//! retransmits and resets of the targets' sockets.
//!
//! Sockets enter `SOCKS` only in the context of a target: connect's
//! CLOSE → SYN_SENT, or the accepting process's first read, write or close
//! of a connection established on one of its listening ports (or, with the
//! optional syscall hooks, the exit of `accept`). Softirq-context probes
//! filter by one lookup of the socket address and attribute to the owner
//! recorded there, never to whatever task ran the softirq.
#![no_std]
#![no_main]
// The bpfel target has no 64-bit atomic types, but the instruction exists
// (BPF_XADD, available on every BPF CPU version when the result is unused).
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic add on map values, see above")]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    Global,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::bpf_ktime_get_ns,
    macros::{fexit, kprobe, kretprobe, map, raw_tracepoint, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{
        FExitContext, ProbeContext, RawTracePointContext, RetProbeContext, TracePointContext,
    },
};
use pipelens_common::connections::*;
use pipelens_ebpf::{
    bump_stat, config_field, current_ids, is_target, kernel_offset, read_user, sock_err,
    sock_of_fd, sock_protocol, sock_state, sock_tuple,
};

#[unsafe(no_mangle)]
static CONN_TP_OFFSETS: Global<ConnTracepointOffsets> = Global::new(ConnTracepointOffsets {
    iss_skaddr: 0,
    iss_oldstate: 0,
    iss_newstate: 0,
    iss_sport: 0,
    iss_dport: 0,
    iss_family: 0,
    iss_protocol: 0,
    iss_saddr: 0,
    iss_daddr: 0,
    iss_saddr_v6: 0,
    iss_daddr_v6: 0,
    len_sk: 0,
    len_protocol: 0,
    len_ret: 0,
    len_flags: 0,
    retrans_skaddr: 0,
    send_reset_skaddr: 0,
    recv_reset_skaddr: 0,
    connect_fd: 0,
    connect_uservaddr: 0,
    exit_ret: 0,
    common_flags: 2,
});

#[map]
static CONN_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
static SOCKS: LruHashMap<u64, SockState> = LruHashMap::with_max_entries(MAX_SOCKS, 0);

#[map]
static SEEDS: HashMap<SeedKey, SeedValue> = HashMap::with_max_entries(MAX_SEEDS, 0);

/// Number of entries userspace put in `SEEDS`; zero once all are matched or
/// expired, so that the miss path costs one array read.
#[map]
static SEED_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Listening ports of targets → the tgid that listens. Handshakes that
/// complete on them are remembered until the accepting process claims them.
#[map]
static TARGET_LISTENERS: HashMap<u16, u32> = HashMap::with_max_entries(MAX_LISTENERS, 0);

#[map]
static PENDING_INBOUND: LruHashMap<u64, PendingInbound> =
    LruHashMap::with_max_entries(MAX_PENDING_INBOUND, 0);

#[map]
static CONNECTING: LruHashMap<u32, PendingConnect> = LruHashMap::with_max_entries(4096, 0);

#[map]
static CONN_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// The `tcp_sendmsg` / `tcp_recvmsg` call in flight per thread, between a
/// kprobe and its kretprobe (kernels without fexit).
#[map]
static TCP_CALLS: LruHashMap<u32, TcpCall> = LruHashMap::with_max_entries(16_384, 0);

const MSG_PEEK: i32 = 2;
/// Pending bytes in the ring past which the reader is woken at once.
const WAKEUP_BYTES: u64 = 64 * 1024;
const EINPROGRESS: i64 = 115;
const EALREADY: i64 = 114;
const EISCONN: i64 = 106;
const EINTR: i64 = 4;
/// Reported when a socket left SYN_SENT without the kernel recording an error:
/// the application closed it before the handshake finished.
const ECANCELED: u32 = 125;
const EADDRNOTAVAIL: u32 = 99;

#[inline(always)]
fn bump(stat: u32) {
    bump_stat(&CONN_STATS, stat);
}

/// Reads one field of `CONN_TP_OFFSETS` (not the whole struct onto the stack).
macro_rules! tp_off {
    ($field:ident) => {
        pipelens_ebpf::global_field!(CONN_TP_OFFSETS, ConnTracepointOffsets, $field)
    };
}

/// Inserts into a map, counting a failure in its `CONN_STATS` slot.
macro_rules! insert_or_count {
    ($map:expr, $key:expr, $value:expr, $stat:expr) => {{
        let ok = $map.insert($key, $value, 0).is_ok();
        if !ok {
            bump($stat);
        }
        ok
    }};
}

#[inline(always)]
fn add(field: *mut u64, n: u64) {
    // SAFETY: `field` points into a live map value; the add is atomic because
    // the same socket may be written and read on two CPUs at once.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, n) };
}

use pipelens_ebpf::tp_field as tp;

fn emit(kind: u32, sk: u64, s: &SockState, reason: u32, now: u64) {
    let Some(mut entry) = CONN_EVENTS.reserve::<ConnEvent>(0) else {
        bump(STAT_RING_LOST);
        return;
    };
    let ev = ConnEvent {
        ts_ns: now,
        sk,
        duration_ns: now.saturating_sub(s.start_ns),
        bytes_sent: s.bytes_sent,
        bytes_received: s.bytes_received,
        retransmits: s.retransmits,
        comm: s.comm,
        addr: s.addr,
        tgid: s.tgid,
        kind,
        reason,
        flags: s.flags,
        direction: s.direction,
        _pad: [0; 6],
    };
    entry.write(ev);
    // Wake the reader only once a batch is waiting: it drains every 100 ms
    // anyway, and a wakeup per connection event costs the traced workload
    // a context switch under churn.
    let flags = if CONN_EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    };
    entry.submit(flags);
}

fn new_state(tgid: u32, direction: u16, flags: u32, now: u64, addr: SockTuple) -> SockState {
    SockState {
        start_ns: now,
        bytes_sent: 0,
        bytes_received: 0,
        retransmits: 0,
        comm: pipelens_ebpf::process_comm(),
        addr,
        tgid,
        flags,
        direction,
        strikes: 0,
        _pad: [0; 4],
    }
}

/// Whether the tracepoint fired in the context of the current task, rather
/// than in an interrupt or softirq that merely borrowed it (on loopback, the
/// peer's send runs our socket's receive path in the peer's context).
#[inline(always)]
fn in_task_context(ctx: &TracePointContext) -> bool {
    match tp::<u8>(ctx, tp_off!(common_flags)) {
        Ok(flags) => flags & TRACE_FLAGS_INTERRUPT == 0,
        Err(_) => false,
    }
}

/// An inbound connection on a target's listener, claimed by the target that
/// touches it first in its own context (its first read, write or close):
/// that is the process that accepted it, found without hooking `accept`,
/// whose syscall tracepoint would put every syscall on the host on the slow
/// path.
#[inline(always)]
fn claim_inbound(sk: u64, tgid: u32) -> Option<*mut SockState> {
    // SAFETY: copied out before removal.
    let pending = unsafe { PENDING_INBOUND.get(sk) }.copied()?;
    let _ = PENDING_INBOUND.remove(sk);
    let now = unsafe { bpf_ktime_get_ns() };
    let s = new_state(
        tgid,
        DIR_INBOUND,
        SOCK_ESTABLISHED,
        pending.ts_ns,
        pending.addr,
    );
    if !insert_or_count!(SOCKS, sk, s, STAT_SOCKS_FULL) {
        return None;
    }
    emit(EV_OPEN, sk, &s, 0, now);
    SOCKS.get_ptr_mut(sk)
}

/// The tracked state of `sk`, or — for a connection that existed before the
/// agent started — its seed, found by its addresses and promoted to `SOCKS`.
/// With `claimant`, a pending inbound connection is claimed by that tgid.
#[inline(always)]
fn sock_entry(sk: u64, claimant: Option<u32>) -> Option<*mut SockState> {
    if let Some(p) = SOCKS.get_ptr_mut(sk) {
        return Some(p);
    }
    if let Some(tgid) = claimant
        && let Some(p) = claim_inbound(sk, tgid)
    {
        return Some(p);
    }
    let pending = SEED_COUNT.get(0).copied().unwrap_or(0);
    // SEED_COUNT is per-CPU: userspace writes the same count into every slot.
    if pending == 0 {
        return None;
    }
    let key: SeedKey = sock_tuple(sk).ok()?;
    // SAFETY: copied out before the entry is removed.
    let seed = unsafe { SEEDS.get(key) }.copied()?;
    let now = unsafe { bpf_ktime_get_ns() };
    let mut s = new_state(
        seed.tgid,
        seed.direction,
        SOCK_SEEDED | SOCK_ESTABLISHED,
        now,
        key,
    );
    s.comm = [0; 16];
    let _ = SEEDS.remove(key);
    if !insert_or_count!(SOCKS, sk, s, STAT_SOCKS_FULL) {
        return None;
    }
    emit(EV_SEED_MATCHED, sk, &s, 0, now);
    SOCKS.get_ptr_mut(sk)
}

// State changes, resets and retransmits, hooked two ways, best first:
//
// - raw tracepoints (`raw_tp/<name>`, 4.17+), which read the tracepoint's
//   arguments (the `struct sock *`) and the socket's fields by BTF offsets.
//   These are never skipped because another BPF program is running on the
//   CPU: most of these events fire in softirq context, which can interrupt
//   any process-context program (a payload copy, a page-fault sample), and
//   a perf-event tracepoint program is dropped, uncounted, when it nests in
//   another (`bpf_prog_active`). Under load that lost opens and closes;
// - the perf-event tracepoints, reading the fields from the record, as a
//   fallback.

/// Where a state change's fields come from.
#[derive(Clone, Copy)]
enum StateSource<'a> {
    Record(&'a TracePointContext),
    Sock,
}

/// One `inet_sock_set_state`, from either hook.
struct StateChange<'a> {
    sk: u64,
    old: i32,
    new: i32,
    src: StateSource<'a>,
}

impl StateChange<'_> {
    /// The local port, the one field a listener's changes need.
    #[inline(always)]
    fn sport(&self) -> Result<u16, i32> {
        match self.src {
            StateSource::Record(ctx) => tp(ctx, tp_off!(iss_sport)),
            StateSource::Sock => Ok(sock_tuple(self.sk)?.lport),
        }
    }

    /// Addresses and ports, IPv4 in the first four bytes.
    #[inline(always)]
    fn tuple(&self) -> Result<SockTuple, i32> {
        let ctx = match self.src {
            StateSource::Record(ctx) => ctx,
            StateSource::Sock => return sock_tuple(self.sk),
        };
        let family: u16 = tp(ctx, tp_off!(iss_family))?;
        let mut t = SockTuple {
            family,
            lport: tp(ctx, tp_off!(iss_sport))?,
            rport: tp(ctx, tp_off!(iss_dport))?,
            ..SockTuple::EMPTY
        };
        if family == AF_INET {
            let a: [u8; 4] = tp(ctx, tp_off!(iss_saddr))?;
            let b: [u8; 4] = tp(ctx, tp_off!(iss_daddr))?;
            t.saddr[..4].copy_from_slice(&a);
            t.daddr[..4].copy_from_slice(&b);
        } else {
            t.saddr = tp(ctx, tp_off!(iss_saddr_v6))?;
            t.daddr = tp(ctx, tp_off!(iss_daddr_v6))?;
        }
        Ok(t)
    }

    /// Whether the change runs in the context of the task that caused it,
    /// for a local close to claim an inbound connection never touched.
    /// The record's flags say so; a raw tracepoint has none, so there the
    /// transitions only a syscall makes (FIN_WAIT1, LAST_ACK) count, and an
    /// abortive close (to CLOSE) counts unless a reset was received on the
    /// socket, which is the softirq's way there.
    #[inline(always)]
    fn by_local_task(&self) -> bool {
        match self.src {
            StateSource::Record(ctx) => in_task_context(ctx),
            // A received reset sets `sk_err` just before `tcp_done()`; a
            // local abort sets it, if at all, after the change.
            // SAFETY: copied out.
            StateSource::Sock => {
                self.new != TCP_CLOSE
                    || (sock_err(self.sk) == Ok(0)
                        && unsafe { PENDING_INBOUND.get(self.sk) }
                            .is_none_or(|p| p.flags & PENDING_RST_RECEIVED == 0))
            }
        }
    }

    /// A local close (FIN or abort) runs in the closing task's context.
    #[inline(always)]
    fn is_local_close(&self) -> bool {
        let (old, new) = (self.old, self.new);
        (old == TCP_ESTABLISHED && (new == TCP_FIN_WAIT1 || new == TCP_CLOSE))
            || (old == TCP_CLOSE_WAIT && (new == TCP_LAST_ACK || new == TCP_CLOSE))
    }
}

/// `sock:inet_sock_set_state(skaddr, oldstate, newstate, sport, dport, family,
/// protocol, saddr, daddr, saddr_v6, daddr_v6)`
#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let change = || -> Result<StateChange<'_>, i32> {
        let protocol: u16 = tp(&ctx, tp_off!(iss_protocol))?;
        if protocol != IPPROTO_TCP {
            return Err(0);
        }
        Ok(StateChange {
            sk: tp(&ctx, tp_off!(iss_skaddr))?,
            old: tp(&ctx, tp_off!(iss_oldstate))?,
            new: tp(&ctx, tp_off!(iss_newstate))?,
            src: StateSource::Record(&ctx),
        })
    };
    match change().and_then(|c| try_set_state(&c)) {
        Ok(()) | Err(_) => 0,
    }
}

/// raw `inet_sock_set_state(const struct sock *sk, const int oldstate,
/// const int newstate)`
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn raw_inet_sock_set_state(ctx: RawTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    if sock_protocol(sk) != Ok(IPPROTO_TCP) {
        return 0;
    }
    let change = StateChange {
        sk,
        old: ctx.arg::<u64>(1) as i32,
        new: ctx.arg::<u64>(2) as i32,
        src: StateSource::Sock,
    };
    match try_set_state(&change) {
        Ok(()) | Err(_) => 0,
    }
}

/// Dispatches a state change to the function for its transition. The
/// first ones concern sockets not tracked (yet); the rest, a tracked one.
#[inline(always)]
fn try_set_state(c: &StateChange<'_>) -> Result<(), i32> {
    match (c.old, c.new) {
        (TCP_CLOSE, TCP_SYN_SENT) => on_connect(c),
        (TCP_CLOSE, TCP_LISTEN) => on_listen(c),
        (TCP_LISTEN, TCP_CLOSE) => on_listener_closed(c),
        // A child socket cloned from a listener (it inherits its state).
        (TCP_LISTEN, _) => Ok(()),
        (TCP_SYN_RECV, TCP_ESTABLISHED) => on_handshake_completed(c),
        _ => on_tracked_change(c),
    }
}

/// CLOSE → SYN_SENT: `connect()`, in the caller's process context.
#[inline(always)]
fn on_connect(c: &StateChange<'_>) -> Result<(), i32> {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let s = new_state(tgid, DIR_OUTBOUND, 0, now, SockTuple::EMPTY);
    insert_or_count!(SOCKS, c.sk, s, STAT_SOCKS_FULL);
    if let Some(p) = CONNECTING.get_ptr_mut(tid) {
        // SAFETY: live map value of this thread only.
        unsafe { (*p).syn_sent = 1 };
    }
    Ok(())
}

/// CLOSE → LISTEN: `listen()`, in the caller's process context.
#[inline(always)]
fn on_listen(c: &StateChange<'_>) -> Result<(), i32> {
    let (tgid, _) = current_ids();
    if is_target(tgid) {
        insert_or_count!(TARGET_LISTENERS, c.sport()?, tgid, STAT_LISTENERS_FULL);
    }
    Ok(())
}

/// LISTEN → CLOSE: the listener goes away.
#[inline(always)]
fn on_listener_closed(c: &StateChange<'_>) -> Result<(), i32> {
    let _ = TARGET_LISTENERS.remove(c.sport()?);
    Ok(())
}

/// SYN_RECV → ESTABLISHED: a handshake completed, in softirq context.
/// Remembered if a target listens on the port, for the process that
/// accepts it to claim.
#[inline(always)]
fn on_handshake_completed(c: &StateChange<'_>) -> Result<(), i32> {
    let lport = c.sport()?;
    // SAFETY: presence test only.
    let ours = config_field!(mode) == pipelens_common::config::MODE_ALL
        || unsafe { TARGET_LISTENERS.get(lport) }.is_some();
    if !ours {
        return Ok(());
    }
    let p = PendingInbound {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        addr: c.tuple()?,
        flags: 0,
        _pad: 0,
    };
    insert_or_count!(PENDING_INBOUND, c.sk, p, STAT_PENDING_INBOUND_FULL);
    Ok(())
}

/// Every other change concerns a tracked socket (or a seeded or pending
/// one, promoted here). A local close is the last chance for an accepted
/// connection that was never read or written to be claimed by its owner;
/// a target's local close of a connection found nowhere is one whose open
/// was lost, and is counted (`STAT_SOCK_UNTRACKED_CLOSE`): each connection
/// makes exactly one local-close transition, so it is counted once.
#[inline(always)]
fn on_tracked_change(c: &StateChange<'_>) -> Result<(), i32> {
    let claimant = if c.is_local_close() && c.by_local_task() {
        let (tgid, _) = current_ids();
        is_target(tgid).then_some(tgid)
    } else {
        None
    };
    let Some(p) = sock_entry(c.sk, claimant) else {
        if c.new == TCP_CLOSE {
            let _ = PENDING_INBOUND.remove(c.sk);
        }
        if claimant.is_some() {
            bump(STAT_SOCK_UNTRACKED_CLOSE);
        }
        return Ok(());
    };
    // SAFETY: `p` points into a live SOCKS value.
    let s = unsafe { &mut *p };
    match (c.old, c.new) {
        (TCP_SYN_SENT, TCP_ESTABLISHED) => on_established(c, s),
        (TCP_ESTABLISHED, TCP_FIN_WAIT1) => {
            on_local_fin(s);
            Ok(())
        }
        (TCP_ESTABLISHED, TCP_CLOSE_WAIT) => {
            on_peer_fin(s);
            Ok(())
        }
        (_, TCP_CLOSE) => {
            let done = if s.flags & SOCK_ESTABLISHED == 0 {
                on_connect_failed(c, s)
            } else {
                on_closed(c, s);
                Ok(())
            };
            let _ = SOCKS.remove(c.sk);
            done
        }
        _ => Ok(()),
    }
}

/// SYN_SENT → ESTABLISHED: an outbound connection is open. The local port
/// is bound after SYN_SENT is entered: the tuple is taken now.
#[inline(always)]
fn on_established(c: &StateChange<'_>, s: &mut SockState) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    s.addr = c.tuple()?;
    s.flags |= SOCK_ESTABLISHED;
    s.start_ns = now;
    emit(EV_OPEN, c.sk, s, 0, now);
    Ok(())
}

/// ESTABLISHED → FIN_WAIT1: the local side closes, first unless the peer
/// already did.
#[inline(always)]
fn on_local_fin(s: &mut SockState) {
    if s.flags & SOCK_PEER_CLOSED_FIRST == 0 {
        s.flags |= SOCK_LOCAL_CLOSED_FIRST;
    }
}

/// ESTABLISHED → CLOSE_WAIT: the peer closes, first unless we already did.
#[inline(always)]
fn on_peer_fin(s: &mut SockState) {
    if s.flags & SOCK_LOCAL_CLOSED_FIRST == 0 {
        s.flags |= SOCK_PEER_CLOSED_FIRST;
    }
}

/// → CLOSE without ever reaching ESTABLISHED: a failed connect. The kernel
/// stores the errno in `sk_err` before `tcp_done()`.
#[inline(always)]
fn on_connect_failed(c: &StateChange<'_>, s: &SockState) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let t = c.tuple()?;
    let mut err = sock_err(c.sk).unwrap_or(0) as u32;
    if err == 0 && s.flags & SOCK_RST_RECEIVED != 0 {
        err = 111; // ECONNREFUSED
    }
    if err == 0 {
        // tcp_v4_connect enters SYN_SENT before it binds a local port; when
        // no port is free it goes back to CLOSE with the port still 0 and
        // returns EADDRNOTAVAIL without sk_err.
        err = if t.lport == 0 {
            EADDRNOTAVAIL
        } else {
            ECANCELED
        };
    }
    let mut snapshot = *s;
    snapshot.addr.family = t.family;
    snapshot.addr.rport = t.rport;
    emit(EV_CONNECT_FAILED, c.sk, &snapshot, err, now);
    Ok(())
}

/// → CLOSE of an established connection: how it ended. Going straight to
/// CLOSE from ESTABLISHED or CLOSE_WAIT, with no RST received, is an
/// abortive close (SO_LINGER 0, unread data): the kernel sends a RST right
/// after this transition.
#[inline(always)]
fn on_closed(c: &StateChange<'_>, s: &mut SockState) {
    let now = unsafe { bpf_ktime_get_ns() };
    let abortive = c.old == TCP_ESTABLISHED || c.old == TCP_CLOSE_WAIT;
    if abortive && s.flags & SOCK_RST_RECEIVED == 0 {
        s.flags |= SOCK_RST_SENT;
    }
    let reason = if s.flags & SOCK_RST_RECEIVED != 0 {
        CLOSE_RST_RECEIVED
    } else if s.flags & SOCK_RST_SENT != 0 {
        CLOSE_RST_SENT
    } else {
        CLOSE_FIN
    };
    emit(EV_CLOSE, c.sk, s, reason, now);
}

// Reconciliation. A state change can be missed without any counter of
// ours knowing: the kernel skips a raw tracepoint program that fires while
// the same program already runs on that CPU (a softirq interrupting it in
// process context; counted only in the program's `recursion_misses`), and
// a perf-event tracepoint program nested in any other. A tracked socket
// whose CLOSE was missed would stay in `SOCKS`, and active, for good.

/// Never attached: the agent runs it with `BPF_PROG_TEST_RUN` (raw
/// tracepoint test runs exist since 5.10) every few seconds over every
/// tracked socket, `RECONCILE_PAIRS` `(sk, start_ns)` pairs from its last
/// snapshot of `SOCKS` per run (a zero `sk` ends the list). A tracked
/// socket whose `struct sock` is no longer its connection — in TCP_CLOSE,
/// or with other ports (the address handed to a new socket) — is gone;
/// found so by `RECONCILE_STRIKES` runs in a row, it is closed as
/// unobserved. TCP sockets are `SLAB_TYPESAFE_BY_RCU`: a freed one keeps
/// its memory a socket's, which is read with `bpf_probe_read_kernel`
/// anyway. Returns how many it closed.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn reconcile_socks(ctx: RawTracePointContext) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    // Context offsets must be constants for the verifier: no loop.
    reconcile_one(ctx.arg(0), ctx.arg(1), now)
        + reconcile_one(ctx.arg(2), ctx.arg(3), now)
        + reconcile_one(ctx.arg(4), ctx.arg(5), now)
        + reconcile_one(ctx.arg(6), ctx.arg(7), now)
        + reconcile_one(ctx.arg(8), ctx.arg(9), now)
        + reconcile_one(ctx.arg(10), ctx.arg(11), now)
}

const _: () = assert!(RECONCILE_PAIRS == 6, "reconcile_socks reads six pairs");

#[inline(always)]
fn reconcile_one(sk: u64, start_ns: u64, now: u64) -> u32 {
    if sk == 0 {
        return 0;
    }
    let Some(p) = SOCKS.get_ptr_mut(sk) else {
        return 0;
    };
    // SAFETY: `p` points into a live SOCKS value.
    let s = unsafe { &mut *p };
    // Another connection on the same address since the snapshot.
    if s.start_ns != start_ns {
        return 0;
    }
    if still_open(sk, s) {
        s.strikes = 0;
        return 0;
    }
    s.strikes += 1;
    if s.strikes < RECONCILE_STRIKES {
        return 0;
    }
    if s.flags & SOCK_ESTABLISHED != 0 {
        emit(EV_CLOSE, sk, s, CLOSE_UNOBSERVED, now);
        bump(STAT_RECONCILED);
    } else {
        // A connect whose outcome was missed: it was never counted open.
        bump(STAT_RECONCILED_CONNECT);
    }
    let _ = SOCKS.remove(sk);
    1
}

/// Whether the socket at `sk` is still the connection `s` tracks.
#[inline(always)]
fn still_open(sk: u64, s: &SockState) -> bool {
    match sock_state(sk) {
        Ok(state) if state as i32 != TCP_CLOSE => {}
        _ => return false,
    }
    if s.flags & SOCK_ESTABLISHED == 0 || s.addr.family == 0 {
        return true;
    }
    match sock_tuple(sk) {
        Ok(t) => t.family == s.addr.family && t.lport == s.addr.lport && t.rport == s.addr.rport,
        Err(_) => false,
    }
}

/// `syscalls:sys_exit_accept4` and `syscalls:sys_exit_accept`: the returned
/// descriptor is walked to its socket, which becomes tracked and owned by
/// the accepting process.
#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    match try_accept(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_accept(ctx: &TracePointContext) -> Result<(), i32> {
    let (tgid, _) = current_ids();
    if !is_target(tgid) {
        return Ok(());
    }
    let ret: i64 = tp(ctx, tp_off!(exit_ret))?;
    if ret < 0 {
        return Ok(());
    }
    let (sk, _) = sock_of_fd(ret as u64)?;
    let t = sock_tuple(sk)?;
    if t.family != AF_INET && t.family != AF_INET6 {
        return Ok(());
    }
    if sock_protocol(sk)? != IPPROTO_TCP {
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = PENDING_INBOUND.remove(sk);
    let mut s = new_state(tgid, DIR_INBOUND, SOCK_ESTABLISHED, now, t);
    emit(EV_OPEN, sk, &s, 0, now);
    if sock_state(sk)? as i32 == TCP_CLOSE {
        // Reset by the peer while it waited in the backlog: it will never
        // change state again, so it is closed here.
        s.flags |= SOCK_CLOSED_BEFORE_ACCEPT | SOCK_RST_RECEIVED;
        emit(EV_CLOSE, sk, &s, CLOSE_RST_RECEIVED, now);
        return Ok(());
    }
    insert_or_count!(SOCKS, sk, s, STAT_SOCKS_FULL);
    Ok(())
}

/// `syscalls:sys_enter_connect(fd, uservaddr, addrlen)`
#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    match try_enter_connect(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_enter_connect(ctx: &TracePointContext) -> Result<(), i32> {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return Ok(());
    }
    let fd: u64 = tp(ctx, tp_off!(connect_fd))?;
    let addr: u64 = tp(ctx, tp_off!(connect_uservaddr))?;
    // `sa_family` starts both `sockaddr_in` and `sockaddr_in6` (user ABI);
    // the other fields are at their BTF offsets.
    let family: u16 = read_user(addr)?;
    let mut dest = SockTuple {
        family,
        ..SockTuple::EMPTY
    };
    if family == AF_INET {
        let port_be: u16 = read_user(addr + kernel_offset!(sockaddr_in_port) as u64)?;
        let a: [u8; 4] = read_user(addr + kernel_offset!(sockaddr_in_addr) as u64)?;
        dest.rport = u16::from_be(port_be);
        dest.daddr[..4].copy_from_slice(&a);
    } else if family == AF_INET6 {
        let port_be: u16 = read_user(addr + kernel_offset!(sockaddr_in6_port) as u64)?;
        dest.rport = u16::from_be(port_be);
        dest.daddr = read_user(addr + kernel_offset!(sockaddr_in6_addr) as u64)?;
    } else {
        return Ok(());
    }
    let pending = PendingConnect {
        addr: dest,
        fd: fd as u32,
        syn_sent: 0,
    };
    insert_or_count!(CONNECTING, tid, pending, STAT_CONNECTING_FULL);
    Ok(())
}

/// `syscalls:sys_exit_connect(ret)`: counts failures that happened before
/// the socket ever reached SYN_SENT (no route, no local port, refused by a
/// filter). Failures after SYN_SENT are counted by the state tracepoint.
#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    match try_exit_connect(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_exit_connect(ctx: &TracePointContext) -> Result<(), i32> {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return Ok(());
    }
    // SAFETY: copied out before removal.
    let Some(pending) = (unsafe { CONNECTING.get(tid) }).copied() else {
        return Ok(());
    };
    let _ = CONNECTING.remove(tid);
    let ret: i64 = tp(ctx, tp_off!(exit_ret))?;
    if ret >= 0 || pending.syn_sent != 0 {
        return Ok(());
    }
    let err = -ret;
    if err == EINPROGRESS || err == EALREADY || err == EISCONN || err == EINTR {
        return Ok(());
    }
    let (sk, _) = sock_of_fd(pending.fd as u64)?;
    if sock_protocol(sk)? != IPPROTO_TCP {
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let s = new_state(tgid, DIR_OUTBOUND, 0, now, pending.addr);
    emit(EV_CONNECT_FAILED, sk, &s, err as u32, now);
    Ok(())
}

// Byte counts. Three ways to the same numbers, chosen by the agent per
// kernel, best first: fexit on `tcp_sendmsg`/`tcp_recvmsg` (one trampoline
// call, arguments and return value together), kprobe + kretprobe on the same
// functions, or the `sock:sock_{send,recv}_length` tracepoints (6.3 and
// newer). All three run in the caller's context, after the call.

/// `sock:sock_send_length(sk, family, protocol, ret, flags)`, process context.
#[tracepoint]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    match try_length(&ctx, true) {
        Ok(()) | Err(_) => 0,
    }
}

/// `sock:sock_recv_length(sk, family, protocol, ret, flags)`, process context.
#[tracepoint]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    match try_length(&ctx, false) {
        Ok(()) | Err(_) => 0,
    }
}

#[inline(always)]
fn try_length(ctx: &TracePointContext, send: bool) -> Result<(), i32> {
    let (tgid, _) = current_ids();
    if !is_target(tgid) {
        return Ok(());
    }
    let protocol: u16 = tp(ctx, tp_off!(len_protocol))?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let ret: i32 = tp(ctx, tp_off!(len_ret))?;
    let flags: i32 = if send {
        0
    } else {
        tp(ctx, tp_off!(len_flags))?
    };
    let sk: u64 = tp(ctx, tp_off!(len_sk))?;
    count_bytes(tgid, sk, ret as i64, flags, send);
    Ok(())
}

/// Adds `ret` bytes (a send or receive's result) to the socket's counts.
#[inline(always)]
fn count_bytes(tgid: u32, sk: u64, ret: i64, flags: i32, send: bool) {
    if ret <= 0 || (!send && flags & MSG_PEEK != 0) {
        return;
    }
    let Some(p) = sock_entry(sk, Some(tgid)) else {
        return;
    };
    // SAFETY: `p` points into a live SOCKS value.
    unsafe {
        if send {
            add(&raw mut (*p).bytes_sent, ret as u64);
        } else {
            add(&raw mut (*p).bytes_received, ret as u64);
        }
    }
}

/// fexit `int tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)`
#[fexit(function = "tcp_sendmsg")]
pub fn fexit_tcp_sendmsg(ctx: FExitContext) -> u32 {
    let (tgid, _) = current_ids();
    if is_target(tgid) {
        let ret: i64 = ctx.arg::<i32>(3) as i64;
        count_bytes(tgid, ctx.arg(0), ret, 0, true);
    }
    0
}

/// fexit `int tcp_recvmsg(...)`, in each of its shapes: `nonblock` went in
/// 5.19 and `addr_len` later, and a tracing program reads its arguments
/// and result at fixed slots.
macro_rules! fexit_recvmsg {
    ($name:ident, $flags:literal, $ret:literal, $doc:literal) => {
        #[doc = $doc]
        #[fexit(function = "tcp_recvmsg")]
        pub fn $name(ctx: FExitContext) -> u32 {
            let (tgid, _) = current_ids();
            if is_target(tgid) {
                let ret: i64 = ctx.arg::<i32>($ret) as i64;
                count_bytes(tgid, ctx.arg(0), ret, ctx.arg($flags), false);
            }
            0
        }
    };
}

fexit_recvmsg!(
    fexit_tcp_recvmsg,
    3,
    4,
    "`int tcp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags)` (6.16 and newer)"
);
fexit_recvmsg!(
    fexit_tcp_recvmsg_al,
    3,
    5,
    "`int tcp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int flags, int *addr_len)` (5.19 to 6.15)"
);
fexit_recvmsg!(
    fexit_tcp_recvmsg_nb,
    4,
    6,
    "`int tcp_recvmsg(struct sock *sk, struct msghdr *msg, size_t len, int nonblock, int flags, int *addr_len)` (before 5.19)"
);

#[inline(always)]
fn call_enter(sk: u64, flags: i32, send: bool) {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return;
    }
    let call = TcpCall {
        sk,
        flags,
        send: send as u32,
    };
    insert_or_count!(TCP_CALLS, tid, call, STAT_CALLS_FULL);
}

#[inline(always)]
fn call_exit(ret: i64) {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return;
    }
    // SAFETY: copied out before removal.
    let Some(call) = (unsafe { TCP_CALLS.get(tid) }).copied() else {
        return;
    };
    let _ = TCP_CALLS.remove(tid);
    count_bytes(tgid, call.sk, ret, call.flags, call.send != 0);
}

/// kprobe `tcp_sendmsg(sk, msg, size)`
#[kprobe]
pub fn kprobe_tcp_sendmsg(ctx: ProbeContext) -> u32 {
    call_enter(ctx.arg(0).unwrap_or(0), 0, true);
    0
}

/// kprobe `tcp_recvmsg(sk, msg, len, flags[, addr_len])` (5.19 and newer)
#[kprobe]
pub fn kprobe_tcp_recvmsg(ctx: ProbeContext) -> u32 {
    call_enter(ctx.arg(0).unwrap_or(0), ctx.arg(3).unwrap_or(0), false);
    0
}

/// kprobe `tcp_recvmsg(sk, msg, len, nonblock, flags, addr_len)` (before 5.19)
#[kprobe]
pub fn kprobe_tcp_recvmsg_nb(ctx: ProbeContext) -> u32 {
    call_enter(ctx.arg(0).unwrap_or(0), ctx.arg(4).unwrap_or(0), false);
    0
}

/// kretprobe of `tcp_sendmsg` and `tcp_recvmsg`: the call's result.
#[kretprobe]
pub fn kretprobe_tcp_io(ctx: RetProbeContext) -> u32 {
    call_exit(ctx.ret::<i32>() as i64);
    0
}

/// `tcp:tcp_retransmit_skb(skbaddr, skaddr, ...)`, softirq or timer context.
#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    match try_retransmit(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_retransmit(ctx: &TracePointContext) -> Result<(), i32> {
    mark_retransmit(tp(ctx, tp_off!(retrans_skaddr))?);
    Ok(())
}

/// `tcp:tcp_send_reset(skbaddr, skaddr, state, reason, ...)`
#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    match try_reset(&ctx, tp_off!(send_reset_skaddr), SOCK_RST_SENT) {
        Ok(()) | Err(_) => 0,
    }
}

/// `tcp:tcp_receive_reset(skaddr, ...)`
#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    match try_reset(&ctx, tp_off!(recv_reset_skaddr), SOCK_RST_RECEIVED) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_reset(ctx: &TracePointContext, offset: u32, flag: u32) -> Result<(), i32> {
    mark_reset(tp(ctx, offset)?, flag);
    Ok(())
}

#[inline(always)]
fn mark_reset(sk: u64, flag: u32) {
    if sk == 0 {
        return;
    }
    if let Some(p) = SOCKS.get_ptr_mut(sk) {
        // SAFETY: `p` points into a live SOCKS value.
        unsafe { (*p).flags |= flag };
    } else if flag == SOCK_RST_RECEIVED
        && let Some(p) = PENDING_INBOUND.get_ptr_mut(sk)
    {
        // Not claimed yet: its coming CLOSE is the reset's, not its owner's.
        // SAFETY: live map value.
        unsafe { (*p).flags |= PENDING_RST_RECEIVED };
    }
}

#[inline(always)]
fn mark_retransmit(sk: u64) {
    if let Some(p) = SOCKS.get_ptr_mut(sk) {
        // SAFETY: `p` points into a live SOCKS value.
        unsafe { add(&raw mut (*p).retransmits, 1) };
    }
}

/// raw `tcp_retransmit_skb(const struct sock *sk, const struct sk_buff *skb)`
#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn raw_tcp_retransmit_skb(ctx: RawTracePointContext) -> u32 {
    mark_retransmit(ctx.arg(0));
    0
}

/// raw `tcp_send_reset(const struct sock *sk, const struct sk_buff *skb, ...)`
#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn raw_tcp_send_reset(ctx: RawTracePointContext) -> u32 {
    mark_reset(ctx.arg(0), SOCK_RST_SENT);
    0
}

/// raw `tcp_receive_reset(struct sock *sk)`
#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn raw_tcp_receive_reset(ctx: RawTracePointContext) -> u32 {
    mark_reset(ctx.arg(0), SOCK_RST_RECEIVED);
    0
}

pipelens_ebpf::kernel_object!();
