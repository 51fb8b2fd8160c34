//! The opening of a socket no analyser has claimed yet. A peer may split a
//! protocol's first message across as many reads or writes as it likes
//! (`GET ` in one write and the rest in the next, a PostgreSQL startup
//! packet's length before its body), so a socket's opening chunks are kept
//! and offered joined; once an analyser claims the socket it is fed every
//! one of them, from the first byte, with their own timestamps.

use std::collections::{HashMap, HashSet};

use pipelens_common::streams::{CAPTURE_OFF, CAPTURE_ON};

use super::{Analyser, Chunk, Claim, Flow};

/// Streams followed at once, at most.
const MAX_STREAMS: usize = 100_000;

/// Sockets whose opening is kept while no analyser can classify it, at most.
const MAX_OPENINGS: usize = 4096;

/// Bytes of an opening kept at most: past this no analyser is still unsure
/// (an HTTP head is at most 16 KiB, a PostgreSQL startup packet 10 KiB).
pub const MAX_OPENING: usize = 16 * 1024;

/// One captured read or write, owned.
pub struct OwnedChunk {
    pub flow: Flow,
    pub ts_enter: u64,
    pub ts_exit: u64,
    pub len: u64,
    pub data: Vec<u8>,
    pub tail: Vec<u8>,
}

impl OwnedChunk {
    fn of(c: &Chunk<'_>) -> Self {
        Self {
            flow: c.flow,
            ts_enter: c.ts_enter,
            ts_exit: c.ts_exit,
            len: c.len,
            data: c.data.to_vec(),
            tail: c.tail.to_vec(),
        }
    }

    pub fn view<'a>(&'a self, sk: u64, owner: (u32, &'a [u8]), ports: (u16, u16)) -> Chunk<'a> {
        Chunk {
            sk,
            tgid: owner.0,
            comm: owner.1,
            flow: self.flow,
            ts_enter: self.ts_enter,
            ts_exit: self.ts_exit,
            len: self.len,
            data: &self.data,
            tail: &self.tail,
            lport: ports.0,
            rport: ports.1,
        }
    }
}

/// What the kernel told of the socket on its first chunk, and the chunks
/// in that chunk's direction since.
pub struct Opening {
    pub tgid: u32,
    pub comm: Vec<u8>,
    /// Local and remote port, sent by the kernel with the first chunk only.
    pub ports: (u16, u16),
    pub chunks: Vec<OwnedChunk>,
    /// The chunks' data joined, while each was captured whole.
    pub joined: Vec<u8>,
    pub end: End,
}

/// Whether the opening can still grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Open,
    /// A chunk went the other way: later chunks are offered alone, as
    /// the opening of a conversation joined in its middle.
    Turned,
    /// A chunk was not captured whole, or the opening reached
    /// [`MAX_OPENING`]: nothing more can be joined.
    Full,
}

/// What to offer the analysers for a new chunk of an unclaimed socket.
pub enum Offer {
    /// The opening so far, this chunk included: on a claim, feed every
    /// chunk of it.
    Joined,
    /// This chunk alone (it does not extend the opening).
    Alone,
    /// Nothing more can be learnt: the opening is as long as it gets.
    Exhausted,
}

impl Opening {
    /// An opening that starts with `first` (already offered alone).
    pub fn new(first: &Chunk<'_>) -> Self {
        let mut o = Self {
            tgid: first.tgid,
            comm: first.comm.to_vec(),
            ports: (first.lport, first.rport),
            chunks: Vec::new(),
            joined: Vec::new(),
            end: End::Open,
        };
        o.push(first);
        o
    }

    /// Adds the next chunk of the socket, and says what is to be offered.
    pub fn push(&mut self, c: &Chunk<'_>) -> Offer {
        let flow = self.chunks.first().map_or(c.flow, |f| f.flow);
        if c.flow != flow {
            self.end = End::Turned;
        }
        match self.end {
            End::Turned => return Offer::Alone,
            End::Full => return Offer::Exhausted,
            End::Open => {}
        }
        if self.joined.len() + c.data.len() > MAX_OPENING {
            self.end = End::Full;
            return Offer::Exhausted;
        }
        self.joined.extend_from_slice(c.data);
        self.chunks.push(OwnedChunk::of(c));
        if c.data.len() as u64 != c.len {
            self.end = End::Full;
        }
        Offer::Joined
    }

    /// The opening as one chunk: the first chunk's times, every byte.
    pub fn joined_view(&self, sk: u64) -> Chunk<'_> {
        let first = &self.chunks[0];
        let last = &self.chunks[self.chunks.len() - 1];
        Chunk {
            sk,
            tgid: self.tgid,
            comm: &self.comm,
            flow: first.flow,
            ts_enter: first.ts_enter,
            ts_exit: last.ts_exit,
            len: self.chunks.iter().map(|c| c.len).sum(),
            data: &self.joined,
            tail: &last.tail,
            lport: self.ports.0,
            rport: self.ports.1,
        }
    }
}

/// The whole data of a chunk whose captured prefix and tail meet.
fn covered(c: &Chunk<'_>) -> Option<Vec<u8>> {
    let (seen, len) = (c.data.len() as u64, c.len);
    if seen >= len || c.tail.is_empty() || seen + c.tail.len() as u64 <= len {
        return None;
    }
    let mut whole = c.data.to_vec();
    whole.extend_from_slice(&c.tail[(seen + c.tail.len() as u64 - len) as usize..]);
    Some(whole)
}

/// Hands each socket's chunks to the analyser that claimed it, and offers
/// the openings of the others.
pub struct Router {
    analysers: Vec<Box<dyn Analyser>>,
    owner: HashMap<u64, usize>,
    /// Sockets no analyser could classify yet, with their first chunks.
    openings: HashMap<u64, Opening>,
    /// Capture decisions for the kernel, applied after each drain.
    pub decided: Vec<(u64, u32)>,
}

impl Router {
    /// Every analyser's summary section.
    pub fn summaries(&self) -> Vec<crate::collector::Section> {
        self.analysers.iter().map(|a| a.summary()).collect()
    }

    pub fn new(analysers: Vec<Box<dyn Analyser>>) -> Self {
        Self {
            analysers,
            owner: HashMap::new(),
            openings: HashMap::new(),
            decided: Vec::new(),
        }
    }

    pub fn closed(&mut self, sk: u64, ts: u64) {
        self.openings.remove(&sk);
        if let Some(i) = self.owner.remove(&sk) {
            self.analysers[i].closed(sk, ts);
        }
    }

    pub fn tick(&mut self) {
        for a in &mut self.analysers {
            a.tick();
        }
    }

    pub fn deliver(&mut self, chunk: &Chunk<'_>) {
        if let Some(&i) = self.owner.get(&chunk.sk) {
            self.analysers[i].feed(chunk);
            return;
        }
        if self.owner.len() >= MAX_STREAMS {
            // Streams whose end went unseen (a process killed outright)
            // must not accumulate: start over, the live ones are re-offered.
            for i in self.owner.drain().map(|(_, i)| i).collect::<HashSet<_>>() {
                self.analysers[i].forget_all();
            }
        }
        // A chunk just over the capture is whole once its tail is added:
        // so offered, a StartupMessage longer than the capture is still
        // recognised, and the opening can still grow.
        let whole;
        let chunk = match covered(chunk) {
            Some(bytes) => {
                whole = bytes;
                &Chunk {
                    data: &whole,
                    tail: &[],
                    ..*chunk
                }
            }
            None => chunk,
        };
        let Some(mut opening) = self.openings.remove(&chunk.sk) else {
            if crate::budget::pressure() >= crate::budget::Pressure::High {
                // No new stream under memory pressure: its capture stops.
                self.decided.push((chunk.sk, CAPTURE_OFF));
                crate::budget::shed("streams", "stream", 1);
                return;
            }
            // A socket's first chunk: offered alone (most are claimed at
            // once), kept only while no analyser can tell yet.
            match self.offer(chunk) {
                Some(Claim::Mine) => self.feed_owner(chunk),
                Some(_) => {}
                None => {
                    if self.openings.len() >= MAX_OPENINGS {
                        self.give_up_openings();
                    }
                    self.openings.insert(chunk.sk, Opening::new(chunk));
                }
            }
            return;
        };
        let settled = match opening.push(chunk) {
            Offer::Joined => match self.offer(&opening.joined_view(chunk.sk)) {
                Some(Claim::Mine) => {
                    for c in &opening.chunks {
                        self.feed_owner(&c.view(
                            chunk.sk,
                            (opening.tgid, &opening.comm),
                            opening.ports,
                        ));
                    }
                    true
                }
                Some(_) => true,
                None => false,
            },
            Offer::Alone => {
                let chunk = Chunk {
                    lport: opening.ports.0,
                    rport: opening.ports.1,
                    ..*chunk
                };
                match self.offer(&chunk) {
                    Some(Claim::Mine) => {
                        self.feed_owner(&chunk);
                        true
                    }
                    Some(_) => true,
                    None => false,
                }
            }
            Offer::Exhausted => {
                self.decided.push((chunk.sk, CAPTURE_OFF));
                true
            }
        };
        if !settled {
            self.openings.insert(chunk.sk, opening);
        }
    }

    /// Offers a chunk to every analyser: `Some(Mine)` when one claimed the
    /// socket, `Some(NotMine)` when none wants it, `None` while one is
    /// still unsure.
    fn offer(&mut self, chunk: &Chunk<'_>) -> Option<Claim> {
        let mut unsure = false;
        for (i, a) in self.analysers.iter_mut().enumerate() {
            match a.offer(chunk) {
                Claim::Mine => {
                    log::debug!("socket {} is {}", chunk.sk, a.name());
                    self.owner.insert(chunk.sk, i);
                    self.decided.push((chunk.sk, CAPTURE_ON));
                    return Some(Claim::Mine);
                }
                Claim::Unsure => unsure = true,
                Claim::NotMine => {}
            }
        }
        if unsure {
            return None;
        }
        self.decided.push((chunk.sk, CAPTURE_OFF));
        Some(Claim::NotMine)
    }

    fn feed_owner(&mut self, chunk: &Chunk<'_>) {
        if let Some(&i) = self.owner.get(&chunk.sk) {
            self.analysers[i].feed(chunk);
        }
    }

    /// Too many sockets undecided at once (a flood of connections that
    /// never say enough): capture stops for all of them.
    fn give_up_openings(&mut self) {
        let n = self.openings.len();
        for (ino, _) in self.openings.drain() {
            self.decided.push((ino, CAPTURE_OFF));
        }
        metrics::counter!("pipelens_streams_undecided_dropped_total").increment(n as u64);
    }
}

#[cfg(test)]
mod tests {
    //! Real captures replayed through the router with their opening split
    //! at every byte: whatever the split, the analysers see the same
    //! conversation as when it came whole.

    use super::*;
    use crate::{
        queries::{QueriesAnalyser, fixture_tests, wire::Side},
        websocket::{
            analyser::WebAnalyser,
            tests::{Record, load},
        },
    };

    const COMM: &[u8] = b"traced\0\0\0\0\0\0\0\0\0\0";

    /// A read or write as the kernel sends it: ports on a socket's first
    /// chunk only.
    fn chunk(sk: u64, flow: Flow, ts: u64, len: u64, data: &[u8], first: bool) -> Chunk<'_> {
        Chunk {
            sk,
            tgid: 0,
            comm: COMM,
            flow,
            ts_enter: ts,
            ts_exit: ts,
            len,
            data,
            tail: &[],
            lport: if first { 8080 } else { 0 },
            rport: if first { 40_000 } else { 0 },
        }
    }

    /// The first record cut at `cuts` (offsets into it).
    fn split_first(first: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut pieces = Vec::new();
        let mut at = 0;
        for &c in cuts.iter().chain(std::iter::once(&first.len())) {
            pieces.push(first[at..c].to_vec());
            at = c;
        }
        pieces
    }

    /// Every way to cut an opening in two, and byte by byte.
    fn every_split(len: usize) -> Vec<Vec<usize>> {
        let mut all: Vec<Vec<usize>> = (1..len).map(|c| vec![c]).collect();
        all.push((1..len).collect());
        all
    }

    /// The demo's HTTP server as the traced side: 100 keep-alive requests,
    /// the first one's head arriving in pieces.
    fn http_requests(cuts: &[usize]) -> (u64, Vec<(String, String)>) {
        let cap = load(include_str!("../websocket/fixtures/http_keepalive.cap"));
        let (analyser, summary) = WebAnalyser::new();
        let mut router = Router::new(vec![Box::new(analyser)]);
        let mut first = true;
        for r in &cap.records {
            match r {
                Record::Data {
                    conn,
                    from_client,
                    ts,
                    len,
                    bytes,
                } => {
                    let flow = if *from_client {
                        Flow::Received
                    } else {
                        Flow::Sent
                    };
                    let pieces = if first {
                        split_first(bytes, cuts)
                    } else {
                        vec![bytes.clone()]
                    };
                    let whole = bytes.len() == *len;
                    for (i, p) in pieces.iter().enumerate() {
                        let len = if whole { p.len() } else { *len };
                        let c = chunk(u64::from(*conn), flow, *ts + i as u64, len as u64, p, first);
                        router.deliver(&c);
                        first = false;
                    }
                }
                Record::Closed { conn, ts } => router.closed(u64::from(*conn), *ts),
            }
        }
        let stats = summary.lock().unwrap();
        let keys = stats
            .keys()
            .map(|k| (k.identity.process.clone(), k.port.clone()))
            .collect();
        let total = stats.values().flat_map(|s| s.http_requests.values()).sum();
        (total, keys)
    }

    #[test]
    fn an_http_request_head_split_anywhere_is_counted() {
        let cap = load(include_str!("../websocket/fixtures/http_keepalive.cap"));
        let truth = cap.truth["http"].as_array().expect("truth").len() as u64;
        assert_eq!(truth, 100);
        let Record::Data { bytes, .. } = &cap.records[0] else {
            panic!("the capture opens with data");
        };
        for cuts in std::iter::once(vec![]).chain(every_split(bytes.len())) {
            let (total, keys) = http_requests(&cuts);
            assert_eq!(total, truth, "cut at {cuts:?}");
            // Labelled by the ports the kernel gave with the first piece.
            assert_eq!(
                keys,
                vec![("traced".to_owned(), "8080".to_owned())],
                "{cuts:?}"
            );
        }
    }

    /// psql as the traced client: its SSLRequest and then its startup
    /// packet arriving in pieces.
    fn psql_statements(cut_record: usize, cuts: &[usize]) -> (u64, u64) {
        let (analyser, summary) = QueriesAnalyser::new();
        let mut router = Router::new(vec![Box::new(analyser)]);
        let records = fixture_tests::load("psql_simple.pgw");
        for (n, c) in records
            .iter()
            .filter(|c| c.conn == records[0].conn)
            .enumerate()
        {
            let flow = match c.side {
                Side::Frontend => Flow::Sent,
                Side::Backend => Flow::Received,
            };
            let pieces = if n == cut_record {
                split_first(&c.head, cuts)
            } else {
                vec![c.head.clone()]
            };
            let whole = c.tail.is_empty() && c.head.len() as u64 == c.len;
            for (i, p) in pieces.iter().enumerate() {
                let len = if whole { p.len() as u64 } else { c.len };
                let mut piece = chunk(1, flow, c.ts + i as u64, len, p, n == 0 && i == 0);
                piece.tail = &c.tail;
                router.deliver(&piece);
            }
        }
        let stats = summary.lock().unwrap();
        let count = stats.iter().map(|(_, s)| s.count).sum();
        let errors = stats.iter().flat_map(|(_, s)| s.errors.values()).sum();
        (count, errors)
    }

    /// Found by `streams::reassembly_tests`: a StartupMessage longer than
    /// the capture, whose tail made it whole, was not recognised; the
    /// opening stopped growing and the connection was lost.
    #[test]
    fn an_opening_made_whole_by_its_tail_is_recognised() {
        let records = fixture_tests::load("pgbench_simple.pgw");
        let startup = &records[0].head;
        assert_eq!(startup.len(), 88);
        let (analyser, summary) = QueriesAnalyser::new();
        let mut router = Router::new(vec![Box::new(analyser)]);
        let mut c = chunk(1, Flow::Sent, records[0].ts, 88, &startup[..64], true);
        c.tail = &startup[88 - 40..];
        router.deliver(&c);
        for r in records.iter().filter(|r| r.conn == 0).skip(1) {
            let flow = match r.side {
                Side::Frontend => Flow::Sent,
                Side::Backend => Flow::Received,
            };
            let mut c = chunk(1, flow, r.ts, r.len, &r.head, false);
            c.tail = &r.tail;
            router.deliver(&c);
        }
        let stats = summary.lock().unwrap();
        assert_eq!(stats.iter().map(|(_, s)| s.count).sum::<u64>(), 2);
        assert!(
            stats.iter().all(|(k, _)| k.db_name == "fixtures"),
            "{stats:?}"
        );
    }

    #[test]
    fn a_postgresql_opening_split_anywhere_is_followed() {
        let records = fixture_tests::load("psql_simple.pgw");
        // The SSLRequest, the server's 'N', then the StartupMessage.
        assert_eq!(records[0].head.len(), 8);
        assert_eq!(records[1].head, b"N");
        let startup = records[2].head.len();
        let whole = psql_statements(0, &[]);
        assert_eq!(whole.0, 10, "the capture's ten statements");
        for cuts in every_split(8) {
            assert_eq!(
                psql_statements(0, &cuts),
                whole,
                "SSLRequest cut at {cuts:?}"
            );
        }
        for cuts in every_split(startup) {
            assert_eq!(psql_statements(2, &cuts), whole, "startup cut at {cuts:?}");
        }
    }
}
