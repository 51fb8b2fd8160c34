//! Command-line settings of the `pipeline` binary. Every flag also reads an
//! environment variable, so a container can be configured without arguments.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, ValueEnum};

/// How ingested events reach PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InsertMode {
    /// One INSERT round trip per event, awaited before the session reads its
    /// next message (the slow path a review finds).
    PerEvent,
    /// Events are buffered and written with one multi-row INSERT per batch of
    /// `--batch-size` events or every `--batch-interval-ms`, whichever first.
    Batched,
}

impl InsertMode {
    /// The flag value: `per-event` or `batched`.
    pub fn name(self) -> &'static str {
        match self {
            InsertMode::PerEvent => "per-event",
            InsertMode::Batched => "batched",
        }
    }
}

/// An event pipeline: WebSocket clients publish JSON events, which are stored
/// in PostgreSQL and fanned out to subscribed WebSocket clients.
///
/// Endpoints: `GET /ws` (WebSocket; `/ws?subscribe=1` also receives every
/// event), `GET /events/recent?limit=N`, `GET /health`, `GET /stats`.
#[derive(Debug, Clone, Parser)]
#[command(name = "pipeline", version)]
pub struct PipelineSettings {
    /// Address the HTTP and WebSocket server listens on.
    #[arg(long, env = "PIPELINE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// libpq-style connection string, key/value
    /// (`host=/tmp/pgsock port=5433 user=postgres dbname=postgres`; a host
    /// starting with `/` is a Unix socket directory) or URL
    /// (`postgresql://user@127.0.0.1:5432/db`).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    )]
    pub database_url: String,

    /// Number of PostgreSQL connections, used round-robin.
    #[arg(long, env = "PIPELINE_DB_CONNECTIONS", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub db_connections: u16,

    /// How events are written to PostgreSQL.
    #[arg(long, env = "PIPELINE_INSERT_MODE", value_enum, default_value_t = InsertMode::PerEvent)]
    pub insert_mode: InsertMode,

    /// Batched mode: largest number of events in one INSERT.
    #[arg(long, env = "PIPELINE_BATCH_SIZE", default_value_t = 100,
          value_parser = clap::value_parser!(u16).range(1..=10_000))]
    pub batch_size: u16,

    /// Batched mode: longest time an event waits in the buffer, in ms.
    #[arg(long, env = "PIPELINE_BATCH_INTERVAL_MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_interval_ms: u64,

    /// `GET /events/recent` runs one extra query per event to fetch its
    /// kind's description, instead of one query with a join.
    #[arg(long, env = "PIPELINE_N_PLUS_ONE", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub n_plus_one: bool,

    /// Each subscriber's outbound queue grows without bound when the client
    /// reads slowly, instead of holding `--outbound-capacity` messages and
    /// dropping (and counting) the rest.
    #[arg(long, env = "PIPELINE_UNBOUNDED_BUFFER", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub unbounded_buffer: bool,

    /// Bounded mode: messages queued per subscriber before new ones are dropped.
    #[arg(long, env = "PIPELINE_OUTBOUND_CAPACITY", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub outbound_capacity: u32,

    /// Largest WebSocket message accepted from a client, in bytes.
    #[arg(long, env = "PIPELINE_MAX_MESSAGE_BYTES", default_value_t = 1 << 20)]
    pub max_message_bytes: usize,
}

impl PipelineSettings {
    pub fn batch_interval(&self) -> Duration {
        Duration::from_millis(self.batch_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        let s = PipelineSettings::try_parse_from([
            "pipeline",
            "--insert-mode",
            "batched",
            "--n-plus-one",
            "--unbounded-buffer",
            "--database-url",
            "host=/tmp/pgsock port=5433 user=postgres dbname=postgres",
        ])
        .expect("parse");
        assert_eq!(s.insert_mode, InsertMode::Batched);
        assert!(s.n_plus_one && s.unbounded_buffer);
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn defaults_are_the_fixed_behaviours_except_insert_mode() {
        let s = PipelineSettings::try_parse_from(["pipeline"]).expect("parse");
        assert_eq!(s.insert_mode, InsertMode::PerEvent);
        assert!(!s.n_plus_one && !s.unbounded_buffer);
    }
}
