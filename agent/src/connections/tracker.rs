//! `ConnectionTracker`: turns connection records from the kernel, and the
//! periodic snapshot of per-socket counters, into metrics and the summary.

use std::collections::{BTreeMap, HashMap};

use pipelens_common::connections::*;
use serde::Serialize;

use crate::{
    distribution::{Distribution, Quantiles},
    telemetry::{Identities, Identity, LabelCap, OTHER},
};

/// Distinct `process` values per metric family.
/// Distinct `port` values per metric family.
const PORT_CAP: usize = 200;
/// Polls a tracked socket may be missing from the kernel map, without its
/// close having arrived, before it is taken as evicted.
const EVICTION_POLLS: u8 = 3;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Labels {
    pub identity: Identity,
    pub direction: &'static str,
    pub port: String,
}

/// Per-socket counters as last seen, to export deltas.
#[derive(Clone, Debug)]
struct LiveConn {
    stream: Sid,
    sent: u64,
    received: u64,
    retransmits: u64,
    missing_polls: u8,
}

/// One row of the summary: a (process, direction, port).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnSummary {
    pub opened: u64,
    pub closed: u64,
    pub active: i64,
    pub seeded: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub retransmits: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    pub closes: BTreeMap<&'static str, u64>,
    pub connect_failures: BTreeMap<String, u64>,
    pub evicted: u64,
    #[serde(skip)]
    durations: Distribution,
    pub duration_seconds: Option<Quantiles>,
}

/// A snapshot of one `SOCKS` map entry.
#[derive(Clone, Copy, Debug)]
pub struct SockSnapshot {
    pub sk: u64,
    pub state: SockState,
}

/// Metric handles of one label set, registered once: looking a series up
/// by its labels on every event would dominate the agent's CPU under churn.
struct Series {
    opened: metrics::Counter,
    active: metrics::Gauge,
    duration: metrics::Histogram,
    bytes_sent: metrics::Counter,
    bytes_received: metrics::Counter,
    retransmits: metrics::Counter,
    closed: HashMap<&'static str, metrics::Counter>,
    resets: HashMap<&'static str, metrics::Counter>,
    failures: HashMap<String, metrics::Counter>,
}

impl Series {
    fn new(l: &Labels) -> Self {
        let base = base_pairs(l);
        Self {
            opened: metrics::counter!("pipelens_tcp_connections_opened_total", base.clone()),
            active: metrics::gauge!("pipelens_tcp_connections_active", base.clone()),
            duration: metrics::histogram!("pipelens_tcp_connection_duration_seconds", base.clone()),
            bytes_sent: metrics::counter!("pipelens_tcp_bytes_sent_total", base.clone()),
            bytes_received: metrics::counter!("pipelens_tcp_bytes_received_total", base.clone()),
            retransmits: metrics::counter!("pipelens_tcp_retransmits_total", base),
            closed: HashMap::new(),
            resets: HashMap::new(),
            failures: HashMap::new(),
        }
    }
}

type LabelKey = (u32, [u8; 16], u16, u16);

/// Index of a label set in `ConnectionTracker::streams`: events carry it
/// instead of strings, so the hot path never compares or hashes a label.
type Sid = usize;

/// Everything kept per label set.
struct Stream {
    labels: Labels,
    series: Series,
    row: ConnSummary,
}

/// Label sets remembered by (tgid, comm, direction, ports).
const LABEL_CACHE: usize = 16_384;

pub struct ConnectionTracker {
    label_cache: HashMap<LabelKey, Sid>,
    streams: Vec<Stream>,
    by_labels: HashMap<Labels, Sid>,
    ids: Identities,
    port_cap: LabelCap,
    live: HashMap<(u64, u64), LiveConn>,
    seeds: HashMap<SeedKey, (Sid, u32)>,
    evictions: u64,
}

impl Default for ConnectionTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnectionTracker {
    pub fn new() -> Self {
        // Exported from the first scrape, so that a loss has a series to
        // alert on before it happens.
        metrics::counter!("pipelens_map_evictions_total", "map" => "connections_socks")
            .increment(0);
        Self {
            label_cache: HashMap::new(),
            streams: Vec::new(),
            by_labels: HashMap::new(),
            ids: Identities::new("connections"),
            port_cap: LabelCap::new(PORT_CAP, "connections", "port"),
            live: HashMap::new(),
            seeds: HashMap::new(),
            evictions: 0,
        }
    }

    fn labels(&mut self, tgid: u32, comm: &[u8], direction: u16, lport: u16, rport: u16) -> Sid {
        let mut key_comm = [0u8; 16];
        let n = comm.len().min(16);
        key_comm[..n].copy_from_slice(&comm[..n]);
        // Only the port that becomes the label is part of the key: the
        // other one is ephemeral and would make every connection a miss.
        let port = if direction == DIR_INBOUND {
            lport
        } else {
            rport
        };
        let key = (tgid, key_comm, direction, port);
        if let Some(sid) = self.label_cache.get(&key) {
            return *sid;
        }
        if self.label_cache.len() >= LABEL_CACHE {
            self.label_cache.clear();
        }
        let labels = self.make_labels(tgid, comm, direction, lport, rport);
        let sid = match self.by_labels.get(&labels) {
            Some(sid) => *sid,
            None => {
                let sid = self.streams.len();
                self.by_labels.insert(labels.clone(), sid);
                self.streams.push(Stream {
                    series: Series::new(&labels),
                    labels,
                    row: ConnSummary::default(),
                });
                sid
            }
        };
        self.label_cache.insert(key, sid);
        sid
    }

    fn make_labels(
        &mut self,
        tgid: u32,
        comm: &[u8],
        direction: u16,
        lport: u16,
        rport: u16,
    ) -> Labels {
        let identity = self.ids.of(tgid, comm);
        let (direction, port) = match direction {
            DIR_INBOUND => ("inbound", lport),
            _ => ("outbound", rport),
        };
        Labels {
            identity,
            direction,
            port: self.port_cap.admit(&port.to_string()),
        }
    }

    fn row(&mut self, sid: Sid) -> &mut ConnSummary {
        &mut self.streams[sid].row
    }

    fn series(&mut self, sid: Sid) -> &mut Series {
        &mut self.streams[sid].series
    }

    fn closed_counter(&mut self, sid: Sid, reason: &'static str) -> metrics::Counter {
        let stream = &mut self.streams[sid];
        let labels = &stream.labels;
        stream
            .series
            .closed
            .entry(reason)
            .or_insert_with(|| {
                metrics::counter!(
                    "pipelens_tcp_connections_closed_total",
                    label_pairs(labels, reason)
                )
            })
            .clone()
    }

    /// Registers connections found open at startup: counted active now,
    /// matched to their socket by the kernel on first sight.
    pub fn add_seed(&mut self, key: SeedKey, tgid: u32, direction: u16) {
        let labels = self.labels(tgid, &[], direction, key.lport, key.rport);
        self.series(labels).active.increment(1.0);
        let row = self.row(labels);
        row.active += 1;
        row.seeded += 1;
        self.seeds.insert(key, (labels, tgid));
    }

    /// Seeds not matched yet, with the process that held them.
    pub fn pending_seeds(&self) -> impl Iterator<Item = (&SeedKey, u32)> {
        self.seeds.iter().map(|(k, (_, tgid))| (k, *tgid))
    }

    /// A seeded connection that vanished without the kernel ever seeing its
    /// socket again (it closed between the `/proc` read and the seed).
    pub fn drop_seed(&mut self, key: &SeedKey) {
        if let Some((labels, _)) = self.seeds.remove(key) {
            self.series(labels).active.decrement(1.0);
            self.closed_counter(labels, "unobserved").increment(1);
            let row = self.row(labels);
            row.active -= 1;
            row.closed += 1;
            *row.closes.entry("unobserved").or_default() += 1;
        }
    }

    pub fn handle(&mut self, ev: &ConnEvent) {
        match ev.kind {
            EV_OPEN => self.on_open(ev),
            EV_CLOSE => self.on_close(ev),
            EV_CONNECT_FAILED => self.on_connect_failed(ev),
            EV_SEED_MATCHED => self.on_seed_matched(ev),
            other => log::debug!("unknown connection event kind {other}"),
        }
    }

    fn on_open(&mut self, ev: &ConnEvent) {
        let labels = self.labels(
            ev.tgid,
            &ev.comm,
            ev.direction,
            ev.addr.lport,
            ev.addr.rport,
        );
        let series = self.series(labels);
        series.opened.increment(1);
        series.active.increment(1.0);
        let row = self.row(labels);
        row.opened += 1;
        row.active += 1;
        self.follow(ev, labels);
    }

    fn on_seed_matched(&mut self, ev: &ConnEvent) {
        let Some((labels, _)) = self.seeds.remove(&ev.addr) else {
            return;
        };
        self.follow(ev, labels);
    }

    /// Starts exporting byte deltas for the socket of `ev`, as `stream`.
    fn follow(&mut self, ev: &ConnEvent, stream: Sid) {
        self.live.insert(
            (ev.sk, opened_at(ev)),
            LiveConn {
                stream,
                sent: 0,
                received: 0,
                retransmits: 0,
                missing_polls: 0,
            },
        );
    }

    fn on_close(&mut self, ev: &ConnEvent) {
        let key = (ev.sk, opened_at(ev));
        let (labels, was_live, prev) = match self.live.remove(&key) {
            Some(c) => (c.stream, true, (c.sent, c.received, c.retransmits)),
            // The open record was lost (ring full): count what the close says.
            None => (
                self.labels(
                    ev.tgid,
                    &ev.comm,
                    ev.direction,
                    ev.addr.lport,
                    ev.addr.rport,
                ),
                false,
                (0, 0, 0),
            ),
        };
        self.add_traffic(
            labels,
            ev.bytes_sent.saturating_sub(prev.0),
            ev.bytes_received.saturating_sub(prev.1),
            ev.retransmits.saturating_sub(prev.2),
        );
        let reason = match ev.reason {
            CLOSE_RST_SENT => "reset_sent",
            CLOSE_RST_RECEIVED => "reset_received",
            CLOSE_UNOBSERVED => "unobserved",
            _ => "fin",
        };
        self.closed_counter(labels, reason).increment(1);
        // A seeded connection's start is unknown; an unobserved close's end.
        let timed = ev.flags & SOCK_SEEDED == 0 && reason != "unobserved";
        let secs = ev.duration_ns as f64 / 1e9;
        let stream = &mut self.streams[labels];
        let series = &mut stream.series;
        if was_live {
            series.active.decrement(1.0);
        }
        if timed {
            series.duration.record(secs);
        }
        if reason.starts_with("reset_") {
            let r = if reason == "reset_sent" {
                "sent"
            } else {
                "received"
            };
            let names = &stream.labels;
            series
                .resets
                .entry(r)
                .or_insert_with(|| {
                    metrics::counter!("pipelens_tcp_resets_total", label_pairs(names, r))
                })
                .increment(1);
        }
        let row = self.row(labels);
        row.closed += 1;
        if was_live {
            row.active -= 1;
        }
        *row.closes.entry(reason).or_default() += 1;
        match reason {
            "reset_sent" => row.resets_sent += 1,
            "reset_received" => row.resets_received += 1,
            _ => {}
        }
        if timed {
            row.durations.add(secs);
        }
    }

    fn on_connect_failed(&mut self, ev: &ConnEvent) {
        let labels = self.labels(
            ev.tgid,
            &ev.comm,
            DIR_OUTBOUND,
            ev.addr.lport,
            ev.addr.rport,
        );
        let reason = errno_name(ev.reason);
        let stream = &mut self.streams[labels];
        let names = &stream.labels;
        stream
            .series
            .failures
            .entry(reason.clone())
            .or_insert_with(|| {
                metrics::counter!(
                    "pipelens_tcp_connect_failures_total",
                    label_pairs(names, &reason)
                )
            })
            .increment(1);
        *self.row(labels).connect_failures.entry(reason).or_default() += 1;
    }

    fn add_traffic(&mut self, labels: Sid, sent: u64, received: u64, retransmits: u64) {
        if sent == 0 && received == 0 && retransmits == 0 {
            return;
        }
        let series = self.series(labels);
        series.bytes_sent.increment(sent);
        series.bytes_received.increment(received);
        series.retransmits.increment(retransmits);
        // Saturating: a corrupt record's counts must not overflow a total.
        let row = self.row(labels);
        row.bytes_sent = row.bytes_sent.saturating_add(sent);
        row.bytes_received = row.bytes_received.saturating_add(received);
        row.retransmits = row.retransmits.saturating_add(retransmits);
    }

    /// Exports byte and retransmit deltas of every live socket, and takes
    /// sockets that left the kernel map without a close as evicted.
    pub fn poll(&mut self, snapshot: &[SockSnapshot]) {
        let mut present = std::collections::HashSet::with_capacity(snapshot.len());
        for s in snapshot {
            let key = (s.sk, s.state.start_ns);
            present.insert(key);
            let Some(conn) = self.live.get_mut(&key) else {
                continue;
            };
            conn.missing_polls = 0;
            let d = (
                s.state.bytes_sent.saturating_sub(conn.sent),
                s.state.bytes_received.saturating_sub(conn.received),
                s.state.retransmits.saturating_sub(conn.retransmits),
            );
            conn.sent = conn.sent.max(s.state.bytes_sent);
            conn.received = conn.received.max(s.state.bytes_received);
            conn.retransmits = conn.retransmits.max(s.state.retransmits);
            let stream = conn.stream;
            self.add_traffic(stream, d.0, d.1, d.2);
        }
        let mut evicted = Vec::new();
        for (key, conn) in &mut self.live {
            if !present.contains(key) {
                conn.missing_polls += 1;
                if conn.missing_polls >= EVICTION_POLLS {
                    evicted.push(*key);
                }
            }
        }
        for key in evicted {
            if let Some(conn) = self.live.remove(&key) {
                self.evictions += 1;
                metrics::counter!("pipelens_map_evictions_total", "map" => "connections_socks")
                    .increment(1);
                self.series(conn.stream).active.decrement(1.0);
                let row = self.row(conn.stream);
                row.active -= 1;
                row.evicted += 1;
            }
        }
    }

    pub fn summary(&self) -> serde_json::Value {
        let mut streams: Vec<&Stream> = self.streams.iter().collect();
        streams.sort_by(|a, b| a.labels.cmp(&b.labels));
        let rows: Vec<serde_json::Value> = streams
            .into_iter()
            .map(|s| {
                let labels = &s.labels;
                let mut row = s.row.clone();
                row.duration_seconds = row.durations.quantiles();
                serde_json::json!({ "labels": labels, "stats": row })
            })
            .collect();
        serde_json::json!({ "connections": rows, "evictions": self.evictions })
    }

    #[cfg(test)]
    pub fn row_for(&self, process: &str, direction: &str, port: &str) -> Option<&ConnSummary> {
        self.streams
            .iter()
            .find(|s| {
                let l = &s.labels;
                l.identity.process == process && l.direction == direction && l.port == port
            })
            .map(|s| &s.row)
    }
}

fn base_pairs(l: &Labels) -> Vec<metrics::Label> {
    l.identity.labels_with([
        metrics::Label::new("direction", l.direction),
        metrics::Label::new("port", l.port.clone()),
    ])
}

fn label_pairs(l: &Labels, reason: &str) -> Vec<metrics::Label> {
    let mut v = base_pairs(l);
    v.push(metrics::Label::new("reason", reason.to_owned()));
    v
}

/// `ECONNREFUSED` for 111; unknown numbers stay numeric (`E1234`), still a
/// bounded set.
/// When the socket of `ev` was opened: with its address, the identity of
/// a connection. A record whose duration exceeds its time (a corrupt or
/// foreign record) gets 0, the same for its open and its close, rather
/// than a panic.
fn opened_at(ev: &ConnEvent) -> u64 {
    ev.ts_ns.saturating_sub(ev.duration_ns)
}

pub fn errno_name(errno: u32) -> String {
    let e = nix::errno::Errno::from_raw(errno as i32);
    if e == nix::errno::Errno::UnknownErrno {
        return if errno == 0 {
            OTHER.to_owned()
        } else {
            format!("E{errno}")
        };
    }
    format!("{e:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distribution::RELATIVE_ERROR;

    fn test_tuple() -> SockTuple {
        SockTuple {
            family: AF_INET,
            lport: 8080,
            rport: 50000,
            ..SockTuple::EMPTY
        }
    }

    fn event(kind: u32, sk: u64, direction: u16, ts: u64, dur: u64) -> ConnEvent {
        let mut comm = [0u8; 16];
        comm[..6].copy_from_slice(b"server");
        ConnEvent {
            ts_ns: ts,
            sk,
            duration_ns: dur,
            bytes_sent: 0,
            bytes_received: 0,
            retransmits: 0,
            comm,
            addr: test_tuple(),
            tgid: 4242,
            kind,
            reason: 0,
            flags: SOCK_ESTABLISHED,
            direction,
            _pad: [0; 6],
        }
    }

    fn sock(start: u64, sent: u64, received: u64) -> SockState {
        SockState {
            start_ns: start,
            bytes_sent: sent,
            bytes_received: received,
            retransmits: 0,
            comm: [0; 16],
            addr: test_tuple(),
            tgid: 4242,
            flags: SOCK_ESTABLISHED,
            direction: DIR_INBOUND,
            strikes: 0,
            _pad: [0; 4],
        }
    }

    /// Found by the `kernel_records` fuzz target: a close whose duration
    /// exceeded its timestamp overflowed computing when it opened (a panic
    /// with overflow checks, as in the tests and debug builds).
    #[test]
    fn a_close_longer_than_its_time_is_counted() {
        let mut t = ConnectionTracker::new();
        t.handle(&event(EV_OPEN, 1, DIR_INBOUND, 10, 20));
        t.handle(&event(EV_CLOSE, 1, DIR_INBOUND, 5, 1_000));
        let row = t.row_for("server", "inbound", "8080").expect("row");
        assert_eq!((row.opened, row.closed, row.active), (1, 1, 0));
    }

    /// Found by the `kernel_records` fuzz target: closes whose byte counts
    /// add up past `u64::MAX` overflowed the summary's totals.
    #[test]
    fn byte_totals_saturate() {
        let mut t = ConnectionTracker::new();
        for sk in 1..=2 {
            let mut close = event(EV_CLOSE, sk, DIR_INBOUND, 2_000, 1_000);
            close.bytes_sent = u64::MAX - 1;
            t.handle(&close);
        }
        let row = t.row_for("server", "inbound", "8080").expect("row");
        assert_eq!(row.bytes_sent, u64::MAX);
    }

    #[test]
    fn bytes_are_exact_across_polls_and_close() {
        let mut t = ConnectionTracker::new();
        t.handle(&event(EV_OPEN, 1, DIR_INBOUND, 1_000, 0));
        t.poll(&[SockSnapshot {
            sk: 1,
            state: sock(1_000, 100, 10),
        }]);
        t.poll(&[SockSnapshot {
            sk: 1,
            state: sock(1_000, 150, 10),
        }]);
        let mut close = event(EV_CLOSE, 1, DIR_INBOUND, 2_001_000, 2_000_000);
        close.bytes_sent = 400;
        close.bytes_received = 25;
        t.handle(&close);
        let row = t.row_for("server", "inbound", "8080").unwrap();
        assert_eq!((row.opened, row.closed, row.active), (1, 1, 0));
        assert_eq!((row.bytes_sent, row.bytes_received), (400, 25));
        assert_eq!(row.closes.get("fin"), Some(&1));
        let p50 = row.durations.quantiles().unwrap().p50;
        assert!((p50 - 0.002).abs() <= 0.002 * RELATIVE_ERROR, "{p50}");
    }

    #[test]
    fn socket_address_reuse_does_not_mix_connections() {
        let mut t = ConnectionTracker::new();
        t.handle(&event(EV_OPEN, 7, DIR_OUTBOUND, 10, 0));
        let mut c1 = event(EV_CLOSE, 7, DIR_OUTBOUND, 20, 10);
        c1.bytes_sent = 5;
        t.handle(&event(EV_OPEN, 7, DIR_OUTBOUND, 30, 0));
        t.handle(&c1);
        t.poll(&[SockSnapshot {
            sk: 7,
            state: sock(30, 3, 0),
        }]);
        let row = t.row_for("server", "outbound", "50000").unwrap();
        assert_eq!(row.bytes_sent, 8);
        assert_eq!(row.active, 1);
    }

    #[test]
    fn resets_and_failures_are_classified() {
        let mut t = ConnectionTracker::new();
        t.handle(&event(EV_OPEN, 1, DIR_INBOUND, 1, 0));
        let mut close = event(EV_CLOSE, 1, DIR_INBOUND, 2, 1);
        close.reason = CLOSE_RST_SENT;
        t.handle(&close);
        let mut fail = event(EV_CONNECT_FAILED, 2, DIR_OUTBOUND, 3, 0);
        fail.reason = 111;
        t.handle(&fail);
        fail.reason = 110;
        t.handle(&fail);
        let row = t.row_for("server", "inbound", "8080").unwrap();
        assert_eq!(row.resets_sent, 1);
        let row = t.row_for("server", "outbound", "50000").unwrap();
        assert_eq!(row.connect_failures.get("ECONNREFUSED"), Some(&1));
        assert_eq!(row.connect_failures.get("ETIMEDOUT"), Some(&1));
        assert_eq!(row.opened, 0);
    }

    #[test]
    fn seeded_connections_are_active_until_closed() {
        let mut t = ConnectionTracker::new();
        let key: SeedKey = test_tuple();
        t.add_seed(key, 4242, DIR_INBOUND);
        let mut matched = event(EV_SEED_MATCHED, 9, DIR_INBOUND, 100, 0);
        matched.flags |= SOCK_SEEDED;
        t.handle(&matched);
        let mut close = event(EV_CLOSE, 9, DIR_INBOUND, 200, 100);
        close.flags |= SOCK_SEEDED;
        t.handle(&close);
        let row = &t.streams[0].row;
        assert_eq!(
            (row.opened, row.closed, row.active, row.seeded),
            (0, 1, 0, 1)
        );
        assert_eq!(
            row.durations.quantiles(),
            None,
            "a seeded lifetime is unknown"
        );
    }

    #[test]
    fn vanished_sockets_are_counted_as_evicted() {
        let mut t = ConnectionTracker::new();
        t.handle(&event(EV_OPEN, 1, DIR_INBOUND, 1, 0));
        for _ in 0..EVICTION_POLLS {
            t.poll(&[]);
        }
        assert_eq!(t.evictions, 1);
        let row = t.row_for("server", "inbound", "8080").unwrap();
        assert_eq!(row.active, 0);
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(111), "ECONNREFUSED");
        assert_eq!(errno_name(110), "ETIMEDOUT");
        assert_eq!(errno_name(113), "EHOSTUNREACH");
        assert_eq!(errno_name(9999), "E9999");
    }
}
