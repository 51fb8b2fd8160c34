//! The metrics registry: a Prometheus recorder with real bucketed histograms,
//! metric descriptions, and the cardinality caps every label goes through.

use std::{
    collections::HashSet,
    sync::{LazyLock, Mutex},
};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Serialize;

use crate::process::ProcessNames;

/// Buckets for connection lifetimes: from sub-millisecond churn to
/// hour-long WebSocket sessions.
pub const CONNECTION_DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 900.0, 3600.0,
];

/// Buckets for statement latency: from a cached index lookup on loopback
/// (tens of microseconds) to a long report query.
pub const QUERY_DURATION_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

/// Buckets for WebSocket message sizes, 16 B to 16 MiB.
pub const MESSAGE_SIZE_BUCKETS: &[f64] = &[
    16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
];

/// Overflow value of a capped label.
pub const OTHER: &str = "other";

/// Installs the global recorder and describes every metric. With `book`
/// (`pipelens record`), every series also reaches the interval book.
pub fn install(book: Option<crate::record::book::Book>) -> anyhow::Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("pipelens_tcp_connection_duration_seconds".to_owned()),
            CONNECTION_DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("pipelens_db_query_duration_seconds".to_owned()),
            QUERY_DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("pipelens_db_query_service_seconds".to_owned()),
            QUERY_DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("pipelens_http_server_request_duration_seconds".to_owned()),
            QUERY_DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("pipelens_websocket_response_duration_seconds".to_owned()),
            QUERY_DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("pipelens_websocket_session_duration_seconds".to_owned()),
            CONNECTION_DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("pipelens_websocket_message_size_bytes".to_owned()),
            MESSAGE_SIZE_BUCKETS,
        )?
        .build_recorder();
    let handle = recorder.handle();
    match book {
        None => metrics::set_global_recorder(recorder)?,
        Some(book) => metrics::set_global_recorder(
            metrics_util::layers::FanoutBuilder::default()
                .add_recorder(recorder)
                .add_recorder(book)
                .build(),
        )
        .map_err(|_| anyhow::anyhow!("a metrics recorder is already installed"))?,
    }
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "pipelens_tcp_connections_opened_total",
        "TCP connections established by (outbound) or accepted by (inbound) a target"
    );
    describe_counter!(
        "pipelens_tcp_connections_closed_total",
        "TCP connections of a target that reached CLOSE, by how they ended"
    );
    describe_gauge!(
        "pipelens_tcp_connections_active",
        "TCP connections of a target currently open"
    );
    describe_histogram!(
        "pipelens_tcp_connection_duration_seconds",
        Unit::Seconds,
        "Lifetime of closed TCP connections, from establishment to CLOSE"
    );
    describe_counter!(
        "pipelens_tcp_connect_failures_total",
        "Outbound connects that failed, by errno"
    );
    describe_counter!(
        "pipelens_tcp_bytes_sent_total",
        Unit::Bytes,
        "Bytes written by a target to its TCP connections"
    );
    describe_counter!(
        "pipelens_tcp_bytes_received_total",
        Unit::Bytes,
        "Bytes read by a target from its TCP connections"
    );
    describe_counter!(
        "pipelens_tcp_retransmits_total",
        "Segments retransmitted on a target's TCP connections"
    );
    describe_counter!(
        "pipelens_db_unanswered_statements_total",
        "Statements without an outcome: discarded by the server after an earlier one failed, in flight when their connection closed, or dropped past the 65,536 requests one connection may have in flight (counted at close)"
    );
    describe_counter!(
        "pipelens_streams_unwalked_bytes_total",
        "Bytes of vectored socket calls whose iovecs the capture could not walk"
    );
    describe_counter!(
        "pipelens_streams_undecided_dropped_total",
        "Sockets whose capture was given up before any protocol analyser could classify them"
    );
    describe_counter!(
        "pipelens_exporter_connections_rejected_total",
        "Connections to /metrics and /healthz closed on accept: the 64 allowed were open"
    );
    describe_counter!(
        "pipelens_label_overflow_total",
        "Times a new label value was reported as `other` because its label reached its cap"
    );
    describe_counter!(
        "pipelens_tcp_resets_total",
        "TCP connections of a target ended by a RST, sent or received"
    );
    describe_histogram!(
        "pipelens_db_query_duration_seconds",
        Unit::Seconds,
        "PostgreSQL statement latency, request's first byte to the reply that completes it"
    );
    describe_histogram!(
        "pipelens_db_query_service_seconds",
        Unit::Seconds,
        "PostgreSQL statement latency net of queueing behind earlier statements of its connection: from the later of its request and the previous reply's completion, to its own completion"
    );
    describe_counter!(
        "pipelens_db_query_errors_total",
        "PostgreSQL statements answered with an ErrorResponse, by SQLSTATE"
    );
    describe_counter!(
        "pipelens_db_parse_errors_total",
        "Times the PostgreSQL wire framing was lost and had to resynchronise"
    );
    describe_counter!(
        "pipelens_db_encrypted_connections_total",
        "PostgreSQL connections that switched to TLS (counted, not parsed)"
    );
    describe_histogram!(
        "pipelens_http_server_request_duration_seconds",
        Unit::Seconds,
        "HTTP/1.x requests served by a target, first request byte to last response byte"
    );
    describe_counter!(
        "pipelens_http_parse_errors_total",
        "HTTP or WebSocket streams that stopped being parsed, by reason"
    );
    describe_counter!(
        "pipelens_websocket_sessions_total",
        "WebSocket sessions opened (upgrade answered 101)"
    );
    describe_gauge!(
        "pipelens_websocket_sessions_active",
        "WebSocket sessions open now"
    );
    describe_histogram!(
        "pipelens_websocket_session_duration_seconds",
        Unit::Seconds,
        "WebSocket session lifetime, 101 to the end of the close handshake or connection"
    );
    describe_histogram!(
        "pipelens_websocket_response_duration_seconds",
        Unit::Seconds,
        "Sessions a target serves: from each data message it receives to the next data message it sends on that session"
    );
    describe_counter!(
        "pipelens_websocket_responses_untimed_total",
        "Data messages received while 256 earlier ones of their session still awaited an answer, so not timed"
    );
    describe_counter!(
        "pipelens_websocket_messages_total",
        "WebSocket data messages (fragments folded), by direction seen from the target"
    );
    describe_histogram!(
        "pipelens_websocket_message_size_bytes",
        Unit::Bytes,
        "WebSocket message payload sizes as on the wire"
    );
    describe_counter!(
        "pipelens_websocket_control_frames_total",
        "WebSocket ping, pong and close frames"
    );
    describe_counter!(
        "pipelens_websocket_closes_total",
        "WebSocket sessions ended, by close code (1006: no close frame) and who closed first"
    );
    describe_counter!(
        "pipelens_memory_growth_bytes_total",
        Unit::Bytes,
        "Estimated resident-set growth (write faults on anonymous memory) by call site, top sites"
    );
    describe_counter!(
        "pipelens_memory_allocated_bytes_total",
        Unit::Bytes,
        "Estimated bytes allocated by call site (allocator uprobes, sampled by bytes), top sites"
    );
    describe_gauge!(
        "pipelens_memory_in_use_bytes",
        Unit::Bytes,
        "Estimated bytes allocated at the call site and not freed yet, top sites"
    );
    describe_counter!(
        "pipelens_events_lost_total",
        "Kernel events dropped because a ring buffer was full (the traced process is never blocked)"
    );
    describe_gauge!(
        "pipelens_collector_up",
        "1 when every probe of the collector is attached"
    );
    describe_gauge!(
        "pipelens_collector_hook_info",
        "1 for each way a collector hooks this kernel, chosen at startup best first (kind: fexit, kprobe, tracepoint, ...)"
    );
    describe_counter!(
        "pipelens_kernel_map_errors_total",
        "Kernel map inserts that failed (map full or out of memory), by collector and map: an entry not tracked, a decision not remembered"
    );
    describe_counter!(
        "pipelens_untracked_closes_total",
        "Established connections a target closed that were never tracked: their open was lost, so they are missing from every connection count"
    );
    describe_counter!(
        "pipelens_connections_reconciled_total",
        "Tracked connections the state hook never saw end, found gone by the reconciliation with the kernel (outcome closed: counted closed with reason unobserved; connect_unresolved: a connect whose outcome was missed)"
    );
    describe_counter!(
        "pipelens_parser_give_ups_total",
        "Times a protocol parser gave a stream up (framing lost, not the protocol), every process together"
    );
    describe_counter!(
        "pipelens_map_evictions_total",
        "Entries a kernel map lost to LRU eviction before they completed"
    );
    describe_gauge!(
        "pipelens_agent_resident_bytes",
        Unit::Bytes,
        "The agent's resident set (VmRSS), read four times a second"
    );
    describe_gauge!(
        "pipelens_agent_memory_limit_bytes",
        Unit::Bytes,
        "--memory-limit: the resident set the agent keeps below by shedding"
    );
    describe_gauge!(
        "pipelens_agent_memory_pressure",
        "0 normal; 1 high (from 70 % of the limit: no new state taken on); 2 critical (from 85 %: profiles let go)"
    );
    describe_counter!(
        "pipelens_shed_total",
        "What a collector gave up to stay under --memory-limit or its own budget: memory processes not profiled or let go, stacks folded to their innermost frames, samples of stacks past the budget; streams not followed"
    );
    describe_gauge!(
        "pipelens_profiler_processes",
        "Processes whose growth the memory collector profiles now (at most 64)"
    );
    describe_gauge!(
        "pipelens_profiler_shared_files",
        "Mapped files whose unwind sections are loaded, each once however many profiled processes map it"
    );
    describe_counter!(
        "pipelens_profiler_samples_dropped_total",
        "Growth samples in no profile: the process exited before its first sample was read (exited), 64 processes were profiled already (process_cap), or memory pressure (pressure)"
    );
}

/// Distinct `process` values a collector reports; the rest are [`OTHER`].
pub const PROCESS_CAP: usize = 200;

/// The identity every series of every collector carries, first in its
/// label set: `process` (the kernel's comm, capped at [`PROCESS_CAP`]) and
/// `container` (the short container id from the process's cgroup, empty
/// outside a container) always; `namespace` and `pod` on a Kubernetes node,
/// where the pod is known, and absent elsewhere (Prometheus treats an empty
/// label as absent: no dashboard query changes when they appear).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Identity {
    pub process: String,
    pub container: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub pod: String,
}

impl Identity {
    /// The identity's labels, to be followed by the series' own.
    pub fn labels(&self) -> Vec<metrics::Label> {
        let mut labels = vec![
            metrics::Label::new("process", self.process.clone()),
            metrics::Label::new("container", self.container.clone()),
        ];
        for (key, value) in [("namespace", &self.namespace), ("pod", &self.pod)] {
            if !value.is_empty() {
                labels.push(metrics::Label::new(key, value.clone()));
            }
        }
        labels
    }

    /// The identity's labels followed by `own`.
    pub fn labels_with(
        &self,
        own: impl IntoIterator<Item = metrics::Label>,
    ) -> Vec<metrics::Label> {
        let mut labels = self.labels();
        labels.extend(own);
        labels
    }
}

/// What `/proc` said about each process, shared by every collector: a
/// process's cgroup is read once however many collectors see it.
static NAMES: LazyLock<Mutex<ProcessNames>> = LazyLock::new(Mutex::default);

/// Resolves a process to its [`Identity`] for one collector: one shared
/// cache, and the collector's own `process` cap.
pub struct Identities {
    process_cap: LabelCap,
}

impl Identities {
    pub fn new(collector: &'static str) -> Self {
        Self {
            process_cap: LabelCap::new(PROCESS_CAP, collector, "process"),
        }
    }

    /// Called when a series or stream is first seen, not per event.
    pub fn of(&mut self, tgid: u32, kernel_comm: &[u8]) -> Identity {
        let (process, container) = NAMES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .labels(tgid, kernel_comm);
        Identity {
            process: self.process_cap.admit(&process),
            container,
            ..Identity::default()
        }
    }
}

/// Caps the number of distinct values one label may take; values past the
/// cap are reported as [`OTHER`], and each time one is, it is counted in
/// `pipelens_label_overflow_total{collector, label}` (exported from the
/// start, at 0, so that a dashboard can tell "none" from "not measured").
#[derive(Debug)]
pub struct LabelCap {
    cap: usize,
    seen: HashSet<String>,
    overflow: metrics::Counter,
}

impl LabelCap {
    pub fn new(cap: usize, collector: &'static str, label: &'static str) -> Self {
        let overflow = metrics::counter!(
            "pipelens_label_overflow_total",
            "collector" => collector,
            "label" => label
        );
        // Registered now (several caps may share the series: never reset).
        overflow.increment(0);
        Self {
            cap,
            seen: HashSet::new(),
            overflow,
        }
    }

    pub fn admit(&mut self, value: &str) -> String {
        if self.seen.contains(value) {
            return value.to_owned();
        }
        if self.seen.len() < self.cap {
            self.seen.insert(value.to_owned());
            return value.to_owned();
        }
        self.overflow.increment(1);
        OTHER.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_leads_every_label_set_and_pod_labels_appear_once_known() {
        let host = Identity {
            process: "pipeline".into(),
            ..Identity::default()
        };
        let names = |labels: Vec<metrics::Label>| -> Vec<(String, String)> {
            labels
                .iter()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect()
        };
        assert_eq!(
            names(host.labels_with([metrics::Label::new("port", "8080")])),
            [
                ("process".into(), "pipeline".into()),
                ("container".into(), String::new()),
                ("port".into(), "8080".into()),
            ]
        );
        let pod = Identity {
            container: "0123456789ab".into(),
            namespace: "shop".into(),
            pod: "pipeline-7d9f".into(),
            ..host
        };
        let keys: Vec<String> = names(pod.labels()).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["process", "container", "namespace", "pod"]);
        let json = serde_json::to_value(&pod).unwrap();
        assert_eq!(json["pod"], "pipeline-7d9f");
        assert!(
            serde_json::to_value(Identity::default())
                .unwrap()
                .get("pod")
                .is_none()
        );
    }

    #[test]
    fn values_past_the_cap_become_other() {
        let mut cap = LabelCap::new(2, "test", "value");
        assert_eq!(cap.admit("a"), "a");
        assert_eq!(cap.admit("b"), "b");
        assert_eq!(cap.admit("c"), OTHER);
        assert_eq!(cap.admit("a"), "a");
        assert_eq!(cap.admit("d"), OTHER);
    }
}
