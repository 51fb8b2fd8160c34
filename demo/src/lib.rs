//! pipelens' demonstration service and its load generator.
//!
//! [`pipeline`] is an ordinary event pipeline — WebSocket clients in,
//! PostgreSQL behind, fan-out to subscribers — with no instrumentation at
//! all: pipelens observes it from the kernel. Its settings switch on the
//! inefficiencies a performance review finds (one INSERT per event, N+1
//! queries, unbounded per-connection buffers) so that a fix can be measured.
//!
//! [`loadgen`] drives it and prints an exact account of what it did, which
//! the tests use as ground truth. Its tests start their private PostgreSQL
//! with the workspace's one harness, `pipelens_tests::pg`.

pub mod loadgen;
pub mod pipeline;
