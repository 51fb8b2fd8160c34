//! The connections collector: TCP connection lifecycles of the targets.
//!
//! Kernel side: `agent-ebpf/src/bin/connections.rs`. Here: loading and
//! attaching it, reading its ring buffer, polling per-socket counters, and
//! seeding connections that predate the agent.

pub mod bytes;
mod reconcile;
pub mod seed;
pub mod tracker;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, PerCpuValues, RingBuf},
    programs::RawTracePoint,
};
use pipelens_common::connections::{
    CONN_MAP_ERRORS, ConnEvent, ConnTracepointOffsets, STAT_RECONCILED, STAT_RECONCILED_CONNECT,
    STAT_RING_LOST, STAT_SOCK_UNTRACKED_CLOSE, SeedKey, SeedValue, SockState,
};
use reconcile::Reconciler;
use tokio_util::sync::CancellationToken;
pub use tracker::ConnectionTracker;
use tracker::SockSnapshot;

use crate::{
    collector::{Attached, Collector, CollectorKind, Hook, Running},
    objects::{self, Loader, ProbeError},
    session::Session,
    tracefs::{self, TracefsError, TracepointFormat},
};

/// Tracepoints this collector attaches on every kernel: (program,
/// category, name). Byte counts have hooks of their own, see [`bytes`].
pub const HOOKS: &[(&str, &str, &str)] = &[
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
    ("tcp_retransmit_skb", "tcp", "tcp_retransmit_skb"),
    ("tcp_send_reset", "tcp", "tcp_send_reset"),
    ("tcp_receive_reset", "tcp", "tcp_receive_reset"),
];

/// [`HOOKS`] as raw tracepoints, the first choice: (program, tracepoint).
const RAW_HOOKS: &[(&str, &str)] = &[
    ("raw_inet_sock_set_state", "inet_sock_set_state"),
    ("raw_tcp_retransmit_skb", "tcp_retransmit_skb"),
    ("raw_tcp_send_reset", "tcp_send_reset"),
    ("raw_tcp_receive_reset", "tcp_receive_reset"),
];

/// The byte-count tracepoints (6.3 and newer), the last choice of
/// [`bytes::attach`].
pub const LENGTH_HOOKS: &[(&str, &str, &str)] = &[
    ("sock_send_length", "sock", "sock_send_length"),
    ("sock_recv_length", "sock", "sock_recv_length"),
];

/// Optional syscall hooks (`--syscall-hooks`). Enabling any syscall
/// tracepoint puts every syscall of every process on the host through the
/// kernel's tracing slow path (about 10% of loopback connection churn here,
/// see BENCHMARKS.md), so they are off by default. They add inbound
/// attribution at `accept` time, for connections the accepting process
/// closes without ever touching, and connect errors raised before any SYN
/// is sent (ENETUNREACH, EACCES).
pub const SYSCALL_HOOKS: &[(&str, &str, &str)] = &[
    ("sys_exit_accept", "syscalls", "sys_exit_accept4"),
    ("sys_exit_accept", "syscalls", "sys_exit_accept"),
    ("sys_enter_connect", "syscalls", "sys_enter_connect"),
    ("sys_exit_connect", "syscalls", "sys_exit_connect"),
];

/// Tracepoint field offsets for this kernel, from tracefs.
pub fn tracepoint_offsets() -> Result<ConnTracepointOffsets, TracefsError> {
    let iss = TracepointFormat::load("sock", "inet_sock_set_state")?;
    let retrans = TracepointFormat::load("tcp", "tcp_retransmit_skb")?;
    let send_reset = TracepointFormat::load("tcp", "tcp_send_reset")?;
    let recv_reset = TracepointFormat::load("tcp", "tcp_receive_reset")?;
    let connect = TracepointFormat::load("syscalls", "sys_enter_connect")?;
    let exit = TracepointFormat::load("syscalls", "sys_exit_connect")?;
    // Kernels before 6.3 have no length tracepoints: their fields stay 0
    // and another hook counts bytes.
    let (mut len_sk, mut len_protocol, mut len_ret, mut len_flags) = (0, 0, 0, 0);
    if tracefs::exists("sock", "sock_send_length") {
        let send = TracepointFormat::load("sock", "sock_send_length")?;
        let recv = TracepointFormat::load("sock", "sock_recv_length")?;
        for field in ["sk", "protocol", "ret", "flags"] {
            if send.offset(field)? != recv.offset(field)? {
                return Err(TracefsError::Format {
                    path: "sock_send_length / sock_recv_length".into(),
                    reason: format!(
                        "field `{field}` differs between the two; they must share a layout"
                    ),
                });
            }
        }
        (len_sk, len_protocol, len_ret, len_flags) = (
            send.offset("sk")?,
            send.offset("protocol")?,
            send.offset("ret")?,
            send.offset("flags")?,
        );
    }
    Ok(ConnTracepointOffsets {
        iss_skaddr: iss.offset("skaddr")?,
        iss_oldstate: iss.offset("oldstate")?,
        iss_newstate: iss.offset("newstate")?,
        iss_sport: iss.offset("sport")?,
        iss_dport: iss.offset("dport")?,
        iss_family: iss.offset("family")?,
        iss_protocol: iss.offset("protocol")?,
        iss_saddr: iss.offset("saddr")?,
        iss_daddr: iss.offset("daddr")?,
        iss_saddr_v6: iss.offset("saddr_v6")?,
        iss_daddr_v6: iss.offset("daddr_v6")?,
        len_sk,
        len_protocol,
        len_ret,
        len_flags,
        retrans_skaddr: retrans.offset("skaddr")?,
        send_reset_skaddr: send_reset.offset("skaddr")?,
        recv_reset_skaddr: recv_reset.offset("skaddr")?,
        connect_fd: connect.offset("fd")?,
        connect_uservaddr: connect.offset("uservaddr")?,
        exit_ret: exit.offset("ret")?,
        common_flags: iss.offset("common_flags")?,
    })
}

/// Missing hooks on this kernel, as `category:name`.
pub fn missing_hooks() -> Vec<String> {
    HOOKS
        .iter()
        .filter(|(_, c, n)| !tracefs::exists(c, n))
        .map(|(_, c, n)| format!("{c}:{n}"))
        .collect()
}

/// The attached collector. Dropping it detaches every probe.
pub struct ConnectionsCollector {
    ebpf: Ebpf,
    tracker: Arc<Mutex<ConnectionTracker>>,
    pub byte_hook: bytes::ByteHookChoice,
    /// `raw_tracepoint` or `tracepoint`, see [`attach_state_hooks`].
    pub state_hook: &'static str,
    /// `None` where raw tracepoint test runs are refused (see [`reconcile`]).
    reconciler: Option<Reconciler>,
}

/// The state, reset and retransmit hooks as raw tracepoints: unlike a
/// perf-event tracepoint program, a raw tracepoint program is not skipped
/// when the softirq that runs it interrupts another BPF program (see
/// `agent-ebpf/src/bin/connections.rs`). The tracepoints are the fallback.
fn attach_state_hooks(ebpf: &mut Ebpf) -> Result<&'static str, ProbeError> {
    let raw = RAW_HOOKS.iter().try_for_each(|(prog, name)| {
        let p: &mut RawTracePoint = ebpf
            .program_mut(prog)
            .expect("program defined in the object")
            .try_into()
            .expect("program is a raw tracepoint");
        p.load().and_then(|()| p.attach(name).map(|_| ()))
    });
    match raw {
        Ok(()) => Ok("raw_tracepoint"),
        Err(e) => {
            log::info!(
                "connections: raw tracepoints refused ({}); using tracepoints",
                objects::verifier_reason(&e)
            );
            for (prog, _) in RAW_HOOKS {
                if let Some(Ok(p)) = ebpf.program_mut(prog).map(<&mut RawTracePoint>::try_from) {
                    let _ = p.unload();
                }
            }
            objects::attach_tracepoints(ebpf, HOOKS)?;
            Ok("tracepoint")
        }
    }
}

impl ConnectionsCollector {
    pub fn start(loader: &Loader, syscall_hooks: bool) -> Result<Self, ProbeError> {
        let offsets = tracepoint_offsets()?;
        let mut ebpf = loader.load("connections", objects::CONNECTIONS, |l| {
            l.override_global("CONN_TP_OFFSETS", &offsets, true);
        })?;
        let optional: &[_] = if syscall_hooks { SYSCALL_HOOKS } else { &[] };
        objects::attach_tracepoints(&mut ebpf, optional)?;
        let state_hook = attach_state_hooks(&mut ebpf)?;
        let byte_hook = bytes::attach(&mut ebpf).map_err(ProbeError::NoHook)?;
        let reconciler = match Reconciler::load(&mut ebpf) {
            Ok(r) => Some(r),
            Err(e) => {
                log::warn!(
                    "connections: {e}; a close the state hook misses leaves its connection active"
                );
                None
            }
        };
        let collector = Self {
            ebpf,
            tracker: Arc::new(Mutex::new(ConnectionTracker::new())),
            byte_hook,
            state_hook,
            reconciler,
        };
        // Every loss series exists, at zero, before anything can be lost.
        collector.export_losses()?;
        Ok(collector)
    }

    /// Seeds connections that `tgids` hold open right now. Called after the
    /// probes are attached, so that nothing closes unseen in between.
    pub fn seed_existing(&mut self, tgids: &[u32]) -> Result<usize, ProbeError> {
        let (seeds, listeners) = seed::find_existing(tgids);
        let mut ports: HashMap<_, u16, u32> = HashMap::try_from(
            self.ebpf
                .map_mut("TARGET_LISTENERS")
                .ok_or(ProbeError::MissingMap("TARGET_LISTENERS"))?,
        )?;
        for (port, tgid) in &listeners {
            ports.insert(port, tgid, 0)?;
        }
        let mut map: HashMap<_, SeedKey, SeedValue> = HashMap::try_from(
            self.ebpf
                .map_mut("SEEDS")
                .ok_or(ProbeError::MissingMap("SEEDS"))?,
        )?;
        let mut tracker = lock(&self.tracker);
        for s in &seeds {
            map.insert(
                s.key,
                SeedValue {
                    tgid: s.tgid,
                    direction: s.direction,
                    _pad: 0,
                },
                0,
            )?;
            tracker.add_seed(s.key, s.tgid, s.direction);
        }
        drop(tracker);
        self.set_seed_count(seeds.len() as u64)?;
        Ok(seeds.len())
    }

    fn set_seed_count(&mut self, n: u64) -> Result<(), ProbeError> {
        let mut count: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map_mut("SEED_COUNT")
                .ok_or(ProbeError::MissingMap("SEED_COUNT"))?,
        )?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        count.set(0, PerCpuValues::try_from(vec![n; cpus])?, 0)?;
        Ok(())
    }

    /// Reads events until `shutdown`, polls per-socket counters every second,
    /// and drains everything once more before returning.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<Self, ProbeError> {
        let mut ring = objects::take_ring(&mut self.ebpf, "CONN_EVENTS")?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // The kernel side batches wakeups; this bounds how stale a count gets.
        let mut drain_tick = tokio::time::interval(Duration::from_millis(100));
        let mut seed_check = 0u32;
        loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    drain(guard.get_inner_mut(), &self.tracker);
                    guard.clear_ready();
                }
                _ = drain_tick.tick() => drain(ring.get_mut(), &self.tracker),
                _ = tick.tick() => {
                    drain(ring.get_mut(), &self.tracker);
                    seed_check += 1;
                    let every_five = seed_check.is_multiple_of(5);
                    self.poll(every_five)?;
                    if every_five {
                        self.reconcile_seeds()?;
                    }
                }
                () = shutdown.cancelled() => break,
            }
        }
        drain(ring.get_mut(), &self.tracker);
        self.poll(false)?;
        drain(ring.get_mut(), &self.tracker);
        Ok(self)
    }

    fn poll(&mut self, reconcile: bool) -> Result<(), ProbeError> {
        let socks: HashMap<&MapData, u64, SockState> = HashMap::try_from(
            self.ebpf
                .map("SOCKS")
                .ok_or(ProbeError::MissingMap("SOCKS"))?,
        )?;
        let snapshot: Vec<SockSnapshot> = socks
            .iter()
            .filter_map(Result::ok)
            .map(|(sk, state)| SockSnapshot { sk, state })
            .collect();
        if reconcile && let Some(r) = &self.reconciler {
            let tracked: Vec<(u64, u64)> =
                snapshot.iter().map(|s| (s.sk, s.state.start_ns)).collect();
            match r.check(&tracked) {
                Ok(0) => {}
                Ok(n) => log::debug!("connections: {n} tracked socket(s) found closed unobserved"),
                Err(e) => log::warn!("connections: {e}"),
            }
        }
        lock(&self.tracker).poll(&snapshot);
        self.export_losses()
    }

    /// Exports the kernel's loss counters. They run from the object's load,
    /// so they are set, not added; the first call, at start, exports every
    /// series at 0.
    fn export_losses(&self) -> Result<(), ProbeError> {
        objects::export_map_errors(&self.ebpf, "connections", "CONN_STATS", &CONN_MAP_ERRORS)?;
        let stat = |slot| objects::per_cpu_total(&self.ebpf, "CONN_STATS", slot);
        metrics::counter!("pipelens_events_lost_total", "collector" => "connections")
            .absolute(stat(STAT_RING_LOST)?);
        metrics::counter!("pipelens_untracked_closes_total")
            .absolute(stat(STAT_SOCK_UNTRACKED_CLOSE)?);
        metrics::counter!("pipelens_connections_reconciled_total", "outcome" => "closed")
            .absolute(stat(STAT_RECONCILED)?);
        metrics::counter!(
            "pipelens_connections_reconciled_total",
            "outcome" => "connect_unresolved"
        )
        .absolute(stat(STAT_RECONCILED_CONNECT)?);
        Ok(())
    }

    /// Seeds whose connection is gone from `/proc` without the kernel having
    /// matched them closed in the window before they were seeded.
    fn reconcile_seeds(&mut self) -> Result<(), ProbeError> {
        let pending: Vec<(SeedKey, u32)> = lock(&self.tracker)
            .pending_seeds()
            .map(|(k, tgid)| (*k, tgid))
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let mut tables: std::collections::HashMap<u32, std::collections::HashSet<SeedKey>> =
            std::collections::HashMap::new();
        let mut map: HashMap<_, SeedKey, SeedValue> = HashMap::try_from(
            self.ebpf
                .map_mut("SEEDS")
                .ok_or(ProbeError::MissingMap("SEEDS"))?,
        )?;
        let mut tracker = lock(&self.tracker);
        for (key, tgid) in pending {
            let table = tables
                .entry(tgid)
                .or_insert_with(|| seed::tcp_table(tgid).into_iter().map(|r| r.key).collect());
            if !table.contains(&key) {
                let _ = map.remove(&key);
                tracker.drop_seed(&key);
            }
        }
        let remaining = tracker.pending_seeds().count() as u64;
        drop(tracker);
        self.set_seed_count(remaining)
    }
}

fn drain(ring: &mut RingBuf<MapData>, tracker: &Mutex<ConnectionTracker>) {
    let mut tracker = lock(tracker);
    while let Some(item) = ring.next() {
        if let Some(ev) = decode(&item) {
            tracker.handle(&ev);
        }
    }
}

/// One record of the connections ring, `None` when it is too short.
pub fn decode(item: &[u8]) -> Option<ConnEvent> {
    if item.len() < size_of::<ConnEvent>() {
        log::warn!("short connection record ({} bytes)", item.len());
        return None;
    }
    // SAFETY: the length is checked; read_unaligned makes no alignment
    // assumption about the ring's memory.
    Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) })
}

fn lock(m: &Mutex<ConnectionTracker>) -> std::sync::MutexGuard<'_, ConnectionTracker> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The connections collector as `pipelens run` requests it.
pub struct Connections {
    /// Also hook the accept and connect syscalls.
    pub syscall_hooks: bool,
}

impl Collector for Connections {
    fn kinds(&self) -> Vec<CollectorKind> {
        vec![CollectorKind::Connections]
    }

    fn start(self: Box<Self>, session: &Session) -> Result<Box<dyn Attached>, ProbeError> {
        let mut collector = ConnectionsCollector::start(&session.loader, self.syscall_hooks)?;
        match collector.seed_existing(&session.traced_now()) {
            Ok(n) => log::info!("connections: {n} existing connection(s) seeded"),
            Err(e) => log::warn!("connections: seeding existing connections: {e}"),
        }
        Ok(Box::new(collector))
    }
}

impl Attached for ConnectionsCollector {
    fn hooks(&self) -> Vec<Hook> {
        vec![
            Hook {
                hook: "state",
                kind: self.state_hook,
                target: "inet_sock_set_state,tcp_retransmit_skb,tcp_send_reset,tcp_receive_reset",
            },
            Hook {
                hook: "bytes",
                kind: self.byte_hook.hook.name(),
                target: self.byte_hook.hook.target(),
            },
            Hook {
                hook: "reconcile",
                kind: if self.reconciler.is_some() {
                    "test_run"
                } else {
                    "none"
                },
                target: "SOCKS",
            },
        ]
    }

    fn spawn(self: Box<Self>, shutdown: CancellationToken) -> Running {
        tokio::spawn(async move {
            let collector = self.run(shutdown).await?;
            let summary = lock(&collector.tracker).summary();
            Ok(vec![("connections", summary)])
        })
    }
}
