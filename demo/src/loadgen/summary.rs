//! The account `loadgen` prints: what each session did, added up per class.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    http::HttpSummary,
    plan::{CloseKind, SessionClass},
};

/// How a session actually ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The TCP connection or the WebSocket handshake failed.
    Failed,
    /// We sent a Close frame with the planned code.
    Closed,
    /// We reset the connection without a Close frame, as planned.
    Abrupt,
    /// The server sent a Close frame before we closed.
    ClosedByServer,
    /// The connection failed mid-session.
    Error,
}

/// One session, as observed by the load generator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionRecord {
    pub index: usize,
    pub class: SessionClass,
    /// The planned end.
    pub close: CloseKind,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Data messages written to the socket (text frames).
    pub messages_sent: u64,
    /// Their payload bytes (frame headers and masks not included).
    pub bytes_sent: u64,
    /// Data messages read, including a subscriber's `{"subscribed":true}`.
    pub messages_received: u64,
    pub bytes_received: u64,
    /// Data messages read that were fanned-out events.
    pub events_received: u64,
    pub pings_sent: u64,
    pub pongs_received: u64,
    /// The server answered our Close frame with its own.
    pub close_acknowledged: bool,
    /// The code of a Close frame the server sent first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_close_code: Option<u16>,
}

impl SessionRecord {
    pub fn new(index: usize, class: SessionClass, close: CloseKind) -> SessionRecord {
        SessionRecord {
            index,
            class,
            close,
            outcome: Outcome::Failed,
            error: None,
            messages_sent: 0,
            bytes_sent: 0,
            messages_received: 0,
            bytes_received: 0,
            events_received: 0,
            pings_sent: 0,
            pongs_received: 0,
            close_acknowledged: false,
            server_close_code: None,
        }
    }
}

/// Sums over the sessions of one class.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClassTotals {
    pub sessions: u64,
    pub opened: u64,
    pub messages_sent: u64,
    pub bytes_sent: u64,
    pub messages_received: u64,
    pub bytes_received: u64,
    pub events_received: u64,
    pub pings_sent: u64,
    pub pongs_received: u64,
}

impl ClassTotals {
    fn add(&mut self, r: &SessionRecord) {
        self.sessions += 1;
        self.opened += u64::from(r.outcome != Outcome::Failed);
        self.messages_sent += r.messages_sent;
        self.bytes_sent += r.bytes_sent;
        self.messages_received += r.messages_received;
        self.bytes_received += r.bytes_received;
        self.events_received += r.events_received;
        self.pings_sent += r.pings_sent;
        self.pongs_received += r.pongs_received;
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SessionTotals {
    pub planned: u64,
    pub opened: u64,
    pub failed: u64,
}

/// What was asked for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanSummary {
    pub sessions: usize,
    pub publishers: usize,
    pub subscribers: usize,
    pub close_mix: String,
    pub rate: f64,
    pub message_size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_per_publisher: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<f64>,
}

/// The JSON document `loadgen` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub target: String,
    pub elapsed_secs: f64,
    pub plan: PlanSummary,
    pub sessions: SessionTotals,
    pub publishers: ClassTotals,
    pub subscribers: ClassTotals,
    /// Close frames we sent, by code.
    pub closes: BTreeMap<String, u64>,
    /// How many of those the server answered with its Close frame.
    pub close_acknowledged: u64,
    /// Connections reset without a Close frame, as planned.
    pub abrupt: u64,
    /// Sessions the server closed first, by the code it sent.
    pub closed_by_server: BTreeMap<String, u64>,
    /// Sessions that failed after opening.
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_session: Option<Vec<SessionRecord>>,
}

impl Summary {
    pub fn new(
        target: String,
        elapsed_secs: f64,
        plan: PlanSummary,
        records: Vec<SessionRecord>,
        http: Option<HttpSummary>,
        per_session: bool,
    ) -> Summary {
        let mut s = Summary {
            target,
            elapsed_secs,
            plan,
            sessions: SessionTotals::default(),
            publishers: ClassTotals::default(),
            subscribers: ClassTotals::default(),
            closes: BTreeMap::new(),
            close_acknowledged: 0,
            abrupt: 0,
            closed_by_server: BTreeMap::new(),
            errors: 0,
            http,
            per_session: None,
        };
        for r in &records {
            s.sessions.planned += 1;
            match r.class {
                SessionClass::Publisher => s.publishers.add(r),
                SessionClass::Subscriber => s.subscribers.add(r),
            }
            match r.outcome {
                Outcome::Failed => s.sessions.failed += 1,
                Outcome::Closed => {
                    *s.closes.entry(r.close.to_string()).or_default() += 1;
                    s.close_acknowledged += u64::from(r.close_acknowledged);
                }
                Outcome::Abrupt => s.abrupt += 1,
                Outcome::ClosedByServer => {
                    let code = r
                        .server_close_code
                        .map_or_else(|| "none".to_owned(), |c| c.to_string());
                    *s.closed_by_server.entry(code).or_default() += 1;
                }
                Outcome::Error => s.errors += 1,
            }
        }
        s.sessions.opened = s.sessions.planned - s.sessions.failed;
        if per_session {
            s.per_session = Some(records);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(class: SessionClass, close: CloseKind, outcome: Outcome, sent: u64) -> SessionRecord {
        SessionRecord {
            outcome,
            messages_sent: sent,
            bytes_sent: sent * 10,
            close_acknowledged: outcome == Outcome::Closed,
            ..SessionRecord::new(0, class, close)
        }
    }

    #[test]
    fn totals_add_up_per_class_and_per_end() {
        use CloseKind::*;
        use SessionClass::*;
        let plan = PlanSummary {
            sessions: 5,
            publishers: 3,
            subscribers: 2,
            close_mix: "1000=1,abrupt=1".into(),
            rate: 0.0,
            message_size: 10,
            messages_per_publisher: Some(4),
            duration_secs: None,
        };
        let mut sub = record(Subscriber, Code(1001), Outcome::Closed, 0);
        sub.messages_received = 9;
        sub.events_received = 8;
        let mut by_server = record(Publisher, Code(1000), Outcome::ClosedByServer, 2);
        by_server.server_close_code = Some(1001);
        let records = vec![
            record(Publisher, Code(1000), Outcome::Closed, 4),
            record(Publisher, Abrupt, Outcome::Abrupt, 4),
            by_server,
            sub,
            record(Subscriber, Abrupt, Outcome::Failed, 0),
        ];
        let s = Summary::new("t".into(), 1.0, plan, records, None, false);
        assert_eq!(
            s.sessions,
            SessionTotals {
                planned: 5,
                opened: 4,
                failed: 1
            }
        );
        assert_eq!(s.publishers.messages_sent, 10);
        assert_eq!(s.publishers.bytes_sent, 100);
        assert_eq!((s.subscribers.sessions, s.subscribers.opened), (2, 1));
        assert_eq!(s.subscribers.events_received, 8);
        assert_eq!(
            s.closes,
            BTreeMap::from([("1000".into(), 1), ("1001".into(), 1)])
        );
        assert_eq!(s.close_acknowledged, 2);
        assert_eq!(s.abrupt, 1);
        assert_eq!(s.closed_by_server, BTreeMap::from([("1001".into(), 1)]));
        assert!(s.per_session.is_none());
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["closes"]["1000"], 1);
        assert!(json.get("http").is_none());
    }
}
