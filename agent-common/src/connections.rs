//! Connection-lifecycle records: kernel → userspace events and the per-socket
//! state kept in the `SOCKS` map.

/// Connection initiated by the target (`connect`).
pub const DIR_OUTBOUND: u16 = 1;
/// Connection accepted by the target (`accept`).
pub const DIR_INBOUND: u16 = 2;

/// `ConnEvent::kind`: the connection reached ESTABLISHED (outbound) or was
/// returned by `accept` (inbound).
pub const EV_OPEN: u32 = 1;
/// The connection reached TCP_CLOSE; carries the final counters.
pub const EV_CLOSE: u32 = 2;
/// `connect` failed; `reason` is the errno.
pub const EV_CONNECT_FAILED: u32 = 3;
/// A connection that existed before the agent started was matched to its
/// socket (seeded from `/proc`); carries nothing but the socket identity.
pub const EV_SEED_MATCHED: u32 = 4;

/// `SockState::flags`: the connection was seeded from `/proc`.
pub const SOCK_SEEDED: u32 = 1 << 0;
/// A RST was received on this socket (`tcp:tcp_receive_reset`).
pub const SOCK_RST_RECEIVED: u32 = 1 << 1;
/// A RST was sent on this socket (`tcp:tcp_send_reset`, or an abortive close).
pub const SOCK_RST_SENT: u32 = 1 << 2;
/// The local side closed first (ESTABLISHED → FIN_WAIT1).
pub const SOCK_LOCAL_CLOSED_FIRST: u32 = 1 << 3;
/// The peer closed first (ESTABLISHED → CLOSE_WAIT).
pub const SOCK_PEER_CLOSED_FIRST: u32 = 1 << 4;
/// The connection reached ESTABLISHED (an outbound socket in SYN_SENT has not).
pub const SOCK_ESTABLISHED: u32 = 1 << 5;
/// The socket was already closed when `accept` returned it.
pub const SOCK_CLOSED_BEFORE_ACCEPT: u32 = 1 << 6;

/// Close reasons carried in `ConnEvent::reason` for [`EV_CLOSE`].
pub const CLOSE_FIN: u32 = 0;
pub const CLOSE_RST_SENT: u32 = 1;
pub const CLOSE_RST_RECEIVED: u32 = 2;
/// The state hook never saw this close: the reconciliation found the
/// tracked socket gone (see [`RECONCILE_PAIRS`]).
pub const CLOSE_UNOBSERVED: u32 = 3;

/// `(sk, start_ns)` pairs one run of the `reconcile_socks` program checks.
/// It is never attached: userspace runs it with `BPF_PROG_TEST_RUN`, whose
/// raw-tracepoint context holds at most 12 arguments (`MAX_BPF_FUNC_ARGS`).
pub const RECONCILE_PAIRS: usize = 6;
/// Consecutive reconciliation runs that must find a tracked socket gone
/// before it is closed as unobserved: one sighting could be a socket whose
/// address was handed to a new connection an instant before.
pub const RECONCILE_STRIKES: u16 = 2;

/// TCP states as numbered by the kernel (`include/net/tcp_states.h`).
pub const TCP_ESTABLISHED: i32 = 1;
pub const TCP_SYN_SENT: i32 = 2;
pub const TCP_SYN_RECV: i32 = 3;
pub const TCP_FIN_WAIT1: i32 = 4;
pub const TCP_CLOSE: i32 = 7;
pub const TCP_CLOSE_WAIT: i32 = 8;
pub const TCP_LAST_ACK: i32 = 9;
pub const TCP_LISTEN: i32 = 10;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// Capacity of the `SOCKS` LRU map (tracked connections).
pub const MAX_SOCKS: u32 = 65_536;
/// Capacity of the `SEEDS` map (pre-existing connections not yet matched).
pub const MAX_SEEDS: u32 = 16_384;

/// A connection's addresses and ports: the one type every record and map
/// that carries them uses, kernel and userspace alike. IPv4 addresses fill
/// the first four bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockTuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub family: u16,
    /// Local port, host order.
    pub lport: u16,
    /// Remote port, host order.
    pub rport: u16,
    pub _pad: u16,
}

impl SockTuple {
    pub const EMPTY: Self = Self {
        saddr: [0; 16],
        daddr: [0; 16],
        family: 0,
        lport: 0,
        rport: 0,
        _pad: 0,
    };
}

/// Per-socket state, keyed by the `struct sock` address.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockState {
    pub start_ns: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub retransmits: u64,
    /// Command name of the owning process, captured in process context.
    pub comm: [u8; 16],
    pub addr: SockTuple,
    pub tgid: u32,
    pub flags: u32,
    pub direction: u16,
    /// Reconciliation runs in a row that found the socket gone.
    pub strikes: u16,
    pub _pad: [u8; 4],
}

/// Key of the `SEEDS` map: a connection seen in `/proc/net/tcp*` before the
/// agent started, found again by its addresses once its socket shows up.
pub type SeedKey = SockTuple;

/// Value of the `SEEDS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SeedValue {
    pub tgid: u32,
    pub direction: u16,
    pub _pad: u16,
}

/// One record on the connections ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnEvent {
    pub ts_ns: u64,
    pub sk: u64,
    pub duration_ns: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub retransmits: u64,
    pub comm: [u8; 16],
    pub addr: SockTuple,
    pub tgid: u32,
    pub kind: u32,
    pub reason: u32,
    pub flags: u32,
    pub direction: u16,
    pub _pad: [u8; 6],
}

/// Indices of the per-CPU `CONN_STATS` array.
pub const STAT_RING_LOST: u32 = 0;
/// A target closed, in its own context, an established TCP connection that
/// was never tracked: its open was lost (a failed insert, an eviction, a
/// skipped program), so the connection is missing from every count.
pub const STAT_SOCK_UNTRACKED_CLOSE: u32 = 1;
/// A map insert failed (the map was full, or the kernel had no memory):
/// one slot per map, exported with [`CONN_MAP_ERRORS`].
pub const STAT_SOCKS_FULL: u32 = 2;
/// A kprobe found the in-flight call map full (kprobe tier only).
pub const STAT_CALLS_FULL: u32 = 3;
pub const STAT_LISTENERS_FULL: u32 = 4;
pub const STAT_PENDING_INBOUND_FULL: u32 = 5;
pub const STAT_CONNECTING_FULL: u32 = 6;
/// A tracked connection whose close the state hook never saw, found gone by
/// the reconciliation and closed then ([`CLOSE_UNOBSERVED`]).
pub const STAT_RECONCILED: u32 = 7;
/// A tracked connect (SYN_SENT) whose socket was found gone by the
/// reconciliation without its outcome (open or failure) ever being seen.
pub const STAT_RECONCILED_CONNECT: u32 = 8;
pub const STAT_COUNT: u32 = 9;

/// `CONN_STATS` slots counting failed inserts, with the map each is for
/// (the `map` label of `pipelens_kernel_map_errors_total`).
pub const CONN_MAP_ERRORS: [(u32, &str); 5] = [
    (STAT_SOCKS_FULL, "socks"),
    (STAT_CALLS_FULL, "tcp_calls"),
    (STAT_LISTENERS_FULL, "target_listeners"),
    (STAT_PENDING_INBOUND_FULL, "pending_inbound"),
    (STAT_CONNECTING_FULL, "connecting"),
];

/// Byte offsets of tracepoint fields used by the connections collector, read
/// from `/sys/kernel/tracing/events/<cat>/<name>/format` at startup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnTracepointOffsets {
    /// `sock:inet_sock_set_state`
    pub iss_skaddr: u32,
    pub iss_oldstate: u32,
    pub iss_newstate: u32,
    pub iss_sport: u32,
    pub iss_dport: u32,
    pub iss_family: u32,
    pub iss_protocol: u32,
    pub iss_saddr: u32,
    pub iss_daddr: u32,
    pub iss_saddr_v6: u32,
    pub iss_daddr_v6: u32,
    /// `sock:sock_send_length` / `sock:sock_recv_length` (same layout)
    pub len_sk: u32,
    pub len_protocol: u32,
    pub len_ret: u32,
    pub len_flags: u32,
    /// `tcp:tcp_retransmit_skb`
    pub retrans_skaddr: u32,
    /// `tcp:tcp_send_reset`
    pub send_reset_skaddr: u32,
    /// `tcp:tcp_receive_reset`
    pub recv_reset_skaddr: u32,
    /// `syscalls:sys_enter_connect`
    pub connect_fd: u32,
    pub connect_uservaddr: u32,
    /// `syscalls:sys_exit_*`
    pub exit_ret: u32,
    /// `common_flags` of every tracepoint record (irq/softirq context bits).
    pub common_flags: u32,
}

/// `common_flags` bits meaning "not in the context of the current task"
/// (`TRACE_FLAG_HARDIRQ | TRACE_FLAG_SOFTIRQ | TRACE_FLAG_NMI`).
pub const TRACE_FLAGS_INTERRUPT: u8 = 0x08 | 0x10 | 0x40;

/// Capacity of the `TARGET_LISTENERS` map (listening ports of targets).
pub const MAX_LISTENERS: u32 = 4096;
/// Capacity of the `PENDING_INBOUND` LRU map (handshakes completed on a
/// target's listener, not yet claimed by the process that accepts them).
pub const MAX_PENDING_INBOUND: u32 = 16_384;

/// A connection established on a target's listening port, waiting for the
/// process that accepted it to touch it in its own context.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PendingInbound {
    pub ts_ns: u64,
    pub addr: SockTuple,
    pub flags: u32,
    pub _pad: u32,
}

/// In-flight `connect` of one thread, keyed by tid in `CONNECTING`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PendingConnect {
    /// The destination (`daddr`, `rport`, `family`); the local half is not
    /// known yet.
    pub addr: SockTuple,
    pub fd: u32,
    /// Set when the socket reached SYN_SENT: the state tracepoint then owns
    /// the outcome and the syscall exit must not count it again.
    pub syn_sent: u32,
}

/// `PendingInbound::flags`: a reset was received before any claim.
pub const PENDING_RST_RECEIVED: u32 = 1;

/// A `tcp_sendmsg` / `tcp_recvmsg` call between its kprobe and kretprobe,
/// keyed by tid in `TCP_CALLS`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TcpCall {
    pub sk: u64,
    pub flags: i32,
    pub send: u32,
}

// The records cross into userspace as raw bytes: no implicit padding.
const _: () = assert!(size_of::<SockTuple>() == 40);
const _: () = assert!(size_of::<SockState>() == 104);
const _: () = assert!(size_of::<ConnEvent>() == 128);
const _: () = assert!(size_of::<PendingInbound>() == 56);
const _: () = assert!(size_of::<PendingConnect>() == 48);
