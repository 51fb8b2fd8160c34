//! Socket payload streams: loading the capture object, reading its ring,
//! and handing each socket's bytes to the protocol analyser that claims it.
//!
//! Kernel side: `agent-ebpf/src/bin/streams.rs`. Which protocols exist is
//! not known here: analysers register through [`Analyser`].

use std::{collections::HashMap, time::Duration};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, ProgramArray, RingBuf},
    programs::TracePoint,
};
use pipelens_common::streams::{
    CaptureState, MAX_CAPTURE, MAX_PIECES, PIECE_LAST, STREAM_CLOSED, STREAM_MAP_ERRORS,
    STREAM_RECEIVED, STREAM_STAT_RING_LOST, STREAM_STAT_UNWALKED, StreamHeader,
    StreamTracepointOffsets,
};

/// Syscalls whose data is being reassembled from several records, at most.
const MAX_ASSEMBLIES: usize = 4096;

#[cfg(test)]
mod reassembly_tests;
mod router;
use router::Router;

/// The records of one syscall, in arrival order.
struct Assembly {
    data: Vec<u8>,
    /// A record was lost: what follows the gap is not appended.
    broken: bool,
}
use tokio_util::sync::CancellationToken;

use crate::{
    collector::{Attached, Collector, CollectorKind, Hook, Running, Section},
    objects::{self, Loader, ProbeError},
    session::Session,
    tracefs::TracepointFormat,
};

/// (program, category, tracepoint, name of the buffer argument, name of
/// the third argument)
#[rustfmt::skip]
pub const HOOKS: &[(&str, &str, &str, &str, &str)] = &[
    ("enter_read", "syscalls", "sys_enter_read", "buf", "count"),
    ("enter_read", "syscalls", "sys_enter_recvfrom", "ubuf", "size"),
    ("enter_write", "syscalls", "sys_enter_write", "buf", "count"),
    ("enter_write", "syscalls", "sys_enter_sendto", "buff", "len"),
    ("enter_readv", "syscalls", "sys_enter_readv", "vec", "vlen"),
    ("enter_writev", "syscalls", "sys_enter_writev", "vec", "vlen"),
    ("enter_recvmsg", "syscalls", "sys_enter_recvmsg", "msg", "flags"),
    ("enter_sendmsg", "syscalls", "sys_enter_sendmsg", "msg", "flags"),
    ("exit_io", "syscalls", "sys_exit_read", "", ""),
    ("exit_io", "syscalls", "sys_exit_recvfrom", "", ""),
    ("exit_io", "syscalls", "sys_exit_write", "", ""),
    ("exit_io", "syscalls", "sys_exit_sendto", "", ""),
    ("exit_io", "syscalls", "sys_exit_readv", "", ""),
    ("exit_io", "syscalls", "sys_exit_writev", "", ""),
    ("exit_io", "syscalls", "sys_exit_recvmsg", "", ""),
    ("exit_io", "syscalls", "sys_exit_sendmsg", "", ""),
    ("enter_close", "syscalls", "sys_enter_close", "", ""),
    ("stream_sock_state", "sock", "inet_sock_set_state", "", ""),
];

/// Offsets for this kernel, each field from its own tracepoint's format
/// file. One program serves several `sys_enter_*`, so each field must be at
/// the same place in all of them (it is: syscall tracepoint records are the
/// syscall number followed by 8-byte arguments); a kernel where it is not,
/// or where a field is missing, is an error naming it, never a guess.
pub fn tracepoint_offsets(capture_bytes: usize) -> Result<StreamTracepointOffsets, ProbeError> {
    let mut offsets: Option<(u32, u32, u32)> = None;
    let mut exit_ret = None;
    for (_, category, name, ptr_field, third_field) in HOOKS {
        if *category != "syscalls" {
            continue;
        }
        let f = TracepointFormat::load(category, name)?;
        if name.starts_with("sys_exit") {
            let ret = f.offset("ret")?;
            if exit_ret.is_some_and(|r| r != ret) {
                return Err(ProbeError::Layout(format!("{category}:{name} field `ret`")));
            }
            exit_ret = Some(ret);
            continue;
        }
        let fd = f.offset("fd")?;
        if ptr_field.is_empty() {
            continue;
        }
        let found = (fd, f.offset(ptr_field)?, f.offset(third_field)?);
        if let Some(seen) = offsets
            && seen != found
        {
            let field = if seen.0 != found.0 {
                "fd"
            } else if seen.1 != found.1 {
                ptr_field
            } else {
                third_field
            };
            return Err(ProbeError::Layout(format!(
                "{category}:{name} field `{field}`"
            )));
        }
        offsets = Some(found);
    }
    let (fd, ptr, third) = offsets.ok_or_else(|| ProbeError::Layout("sys_enter_*".into()))?;
    let iss = TracepointFormat::load("sock", "inet_sock_set_state")?;
    Ok(StreamTracepointOffsets {
        enter_fd: fd,
        enter_ptr: ptr,
        enter_arg2: third,
        exit_ret: exit_ret.ok_or_else(|| ProbeError::Layout("sys_exit_*".into()))?,
        iss_skaddr: iss.offset("skaddr")?,
        iss_newstate: iss.offset("newstate")?,
        capture_bytes: capture_bytes.min(MAX_CAPTURE * MAX_PIECES) as u32,
        _pad: 0,
    })
}

/// Loads `walk_iovecs` (never attached: `exit_io` tail-calls it, and it
/// itself, to walk every iovec of a vectored call) into its slot.
pub fn install_iov_walker(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    let prog: &mut TracePoint = ebpf
        .program_mut("walk_iovecs")
        .expect("program defined in the object")
        .try_into()
        .expect("program is a tracepoint");
    prog.load().map_err(|source| ProbeError::Attach {
        category: "streams",
        name: "walk_iovecs",
        source,
    })?;
    let fd = prog.fd().map_err(|source| ProbeError::Attach {
        category: "streams",
        name: "walk_iovecs",
        source,
    })?;
    let fd = fd.try_clone()?;
    let map = ebpf
        .map_mut("IOV_WALKER")
        .ok_or(ProbeError::MissingMap("IOV_WALKER"))?;
    ProgramArray::try_from(map)?.set(0, &fd, 0)?;
    Ok(())
}

/// Which way bytes went, seen from the traced process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flow {
    Received,
    Sent,
}

/// One read or write of a socket, as captured.
#[derive(Debug)]
pub struct Chunk<'a> {
    /// The stream's identity (the socket's inode number).
    pub sk: u64,
    /// The process that read or wrote it.
    pub tgid: u32,
    pub comm: &'a [u8],
    pub flow: Flow,
    /// Syscall entry: when a write's first byte left.
    pub ts_enter: u64,
    /// Syscall exit: when a read's bytes were in hand.
    pub ts_exit: u64,
    /// Full length of the data; `data` holds its first bytes.
    pub len: u64,
    pub data: &'a [u8],
    /// The last bytes of the data when `data` does not reach the end.
    pub tail: &'a [u8],
    /// Local and remote ports (TCP), known on a socket's first chunk only
    /// (0 after, and for Unix sockets).
    pub lport: u16,
    pub rport: u16,
}

/// What an analyser says about a socket it was offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Yes: keep capturing, every later chunk goes to [`Analyser::feed`].
    Mine,
    /// Not this protocol.
    NotMine,
    /// Cannot tell from these bytes yet.
    Unsure,
}

/// A protocol analyser: offered the first chunks of unclassified sockets,
/// fed every chunk of the ones it claimed.
pub trait Analyser: Send {
    fn name(&self) -> &'static str;
    fn offer(&mut self, chunk: &Chunk<'_>) -> Claim;
    fn feed(&mut self, chunk: &Chunk<'_>);
    fn closed(&mut self, sk: u64, ts: u64);
    /// Drop every stream (their ends went unseen).
    fn forget_all(&mut self);
    /// Called about once a second (expiry, metric flushes).
    fn tick(&mut self) {}
    /// Its section of `--summary-json`.
    fn summary(&self) -> Section;
}

/// The attached capture object and the analysers it feeds.
pub struct StreamsCollector {
    ebpf: Ebpf,
    records: StreamRecords,
}

/// The streams ring's records decoded: a syscall sent in several records
/// joined again, each syscall's data delivered through the [`Router`] to
/// the analysers. Apart from [`StreamsCollector`] so that the fuzz targets
/// (`agent/fuzz`) feed it records as the ring hands them over.
pub struct StreamRecords {
    router: Router,
    assemblies: HashMap<(u32, u64), Assembly>,
}

impl StreamsCollector {
    pub fn start(
        loader: &Loader,
        capture_bytes: usize,
        analysers: Vec<Box<dyn Analyser>>,
    ) -> Result<Self, ProbeError> {
        let offsets = tracepoint_offsets(capture_bytes)?;
        let mut ebpf = loader.load("streams", objects::STREAMS, |l| {
            l.override_global("STREAM_TP_OFFSETS", &offsets, true);
        })?;
        install_iov_walker(&mut ebpf)?;
        let hooks: Vec<_> = HOOKS.iter().map(|(p, c, n, _, _)| (*p, *c, *n)).collect();
        objects::attach_tracepoints(&mut ebpf, &hooks)?;
        let collector = Self {
            ebpf,
            records: StreamRecords::new(analysers),
        };
        // Every loss series exists, at zero, before anything can be lost.
        collector.count_lost()?;
        metrics::counter!("pipelens_streams_undecided_dropped_total").increment(0);
        Ok(collector)
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> Result<Self, ProbeError> {
        let mut ring = objects::take_ring(&mut self.ebpf, "STREAM_EVENTS")?;
        let mut drain_tick = tokio::time::interval(Duration::from_millis(50));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    self.drain(guard.get_inner_mut());
                    guard.clear_ready();
                }
                _ = drain_tick.tick() => self.drain(ring.get_mut()),
                _ = tick.tick() => {
                    self.drain(ring.get_mut());
                    self.records.tick();
                    self.count_lost()?;
                }
                () = shutdown.cancelled() => break,
            }
        }
        self.drain(ring.get_mut());
        self.records.tick();
        Ok(self)
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            self.records.dispatch(&item);
        }
        self.apply_decisions();
    }

    fn apply_decisions(&mut self) {
        let decided = self.records.take_decisions();
        if decided.is_empty() {
            return;
        }
        let Some(map) = self.ebpf.map_mut("CAPTURE_STATE") else {
            return;
        };
        let Ok(mut map) = BpfHashMap::<_, u64, CaptureState>::try_from(map) else {
            return;
        };
        for (sk, state) in decided {
            // The kernel's record of who owns the socket stays.
            let tgid = map.get(&sk, 0).map_or(0, |c| c.tgid);
            let _ = map.insert(
                sk,
                CaptureState {
                    state,
                    undecided_seen: 0,
                    tgid,
                    _pad: 0,
                },
                0,
            );
        }
    }

    /// Exports the kernel's loss counters: records the ring had no room
    /// for, bytes of vectored calls left unwalked. They run from the
    /// object's load, so they are set, not added.
    fn count_lost(&self) -> Result<(), ProbeError> {
        objects::export_map_errors(&self.ebpf, "streams", "STREAM_STATS", &STREAM_MAP_ERRORS)?;
        let stat = |slot| objects::per_cpu_total(&self.ebpf, "STREAM_STATS", slot);
        metrics::counter!("pipelens_events_lost_total", "collector" => "streams")
            .absolute(stat(STREAM_STAT_RING_LOST)?);
        metrics::counter!("pipelens_streams_unwalked_bytes_total")
            .absolute(stat(STREAM_STAT_UNWALKED)?);
        Ok(())
    }
}

impl StreamRecords {
    pub fn new(analysers: Vec<Box<dyn Analyser>>) -> Self {
        Self {
            router: Router::new(analysers),
            assemblies: HashMap::new(),
        }
    }

    /// Decodes one ring record; delivers the syscall's data once its
    /// last record is in.
    pub fn dispatch(&mut self, bytes: &[u8]) {
        let hsize = size_of::<StreamHeader>();
        if bytes.len() < hsize {
            return;
        }
        // SAFETY: length checked; read_unaligned makes no alignment assumption.
        let h: StreamHeader = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        if h.kind == STREAM_CLOSED {
            self.router.closed(h.ino, h.ts_exit);
            return;
        }
        let captured = (h.captured as usize).min(bytes.len() - hsize);
        let piece = &bytes[hsize..hsize + captured];
        let last = h.flags & PIECE_LAST != 0;
        if h.offset == 0 && last {
            self.deliver(&h, piece);
            return;
        }
        // A syscall's data in several records: reassemble by (tid, entry time).
        let key = (h.tid, h.ts_enter);
        if !self.assemblies.contains_key(&key) && self.assemblies.len() >= MAX_ASSEMBLIES {
            self.assemblies.clear();
        }
        let a = self.assemblies.entry(key).or_insert_with(|| Assembly {
            data: Vec::new(),
            broken: false,
        });
        if !a.broken {
            if h.offset as usize == a.data.len() {
                a.data.extend_from_slice(piece);
            } else {
                a.broken = true;
            }
        }
        if last && let Some(a) = self.assemblies.remove(&key) {
            self.deliver(&h, &a.data);
        }
    }

    fn deliver(&mut self, h: &StreamHeader, data: &[u8]) {
        let tail_len = (h.tail_len as usize).min(h.tail.len());
        let chunk = Chunk {
            sk: h.ino,
            tgid: h.tgid,
            comm: &h.comm,
            flow: if h.direction == STREAM_RECEIVED {
                Flow::Received
            } else {
                Flow::Sent
            },
            ts_enter: h.ts_enter,
            ts_exit: h.ts_exit,
            len: h.len,
            data,
            tail: &h.tail[..tail_len],
            lport: h.addr.lport,
            rport: h.addr.rport,
        };
        self.router.deliver(&chunk);
    }

    /// Calls every analyser's [`Analyser::tick`].
    pub fn tick(&mut self) {
        self.router.tick();
    }

    /// Capture decisions for the kernel since the last call: (inode, state).
    pub fn take_decisions(&mut self) -> Vec<(u64, u32)> {
        std::mem::take(&mut self.router.decided)
    }
}

/// The payload collector as `pipelens run` requests it: one capture object
/// feeding the analysers of the requested protocol collectors.
pub struct Payload {
    pub kinds: Vec<CollectorKind>,
    pub capture_bytes: usize,
    /// Makes the analyser of a kind, or `None` if that kind is not one.
    pub analyser: fn(CollectorKind) -> Option<Box<dyn Analyser>>,
}

impl Collector for Payload {
    fn kinds(&self) -> Vec<CollectorKind> {
        self.kinds.clone()
    }

    fn start(self: Box<Self>, session: &Session) -> Result<Box<dyn Attached>, ProbeError> {
        let analysers = self
            .kinds
            .iter()
            .filter_map(|k| (self.analyser)(*k))
            .collect();
        let collector = StreamsCollector::start(&session.loader, self.capture_bytes, analysers)?;
        Ok(Box::new(collector))
    }
}

impl Attached for StreamsCollector {
    fn hooks(&self) -> Vec<Hook> {
        // One way on every kernel so far: the syscall tracepoints.
        vec![Hook {
            hook: "payload",
            kind: "tracepoint",
            target: "syscalls:sys_{enter,exit}_{read,write,readv,writev,recvfrom,sendto,recvmsg,sendmsg}",
        }]
    }

    fn spawn(self: Box<Self>, shutdown: CancellationToken) -> Running {
        tokio::spawn(async move {
            let collector = self.run(shutdown).await?;
            Ok(collector.records.router.summaries())
        })
    }
}
