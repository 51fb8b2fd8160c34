//! PostgreSQL access: the schema, event inserts (one per event or one
//! multi-row INSERT per batch) and the recent-events read, with or without
//! the N+1 pattern.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, NoTls, Statement, types::ToSql};

use super::event::Event;

/// Kinds known at start; events of other kinds are stored all the same and
/// listed without a description.
pub const SEEDED_KINDS: &[(&str, &str)] = &[
    ("click", "A user clicked an element"),
    ("view", "A page or screen was shown"),
    ("purchase", "An order was paid"),
    ("login", "A user signed in"),
    ("logout", "A user signed out"),
];

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kinds (
    name        text PRIMARY KEY,
    description text NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL,
    payload     jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
";

const INSERT_ONE: &str = "INSERT INTO events (kind, payload) VALUES ($1, $2)";

const RECENT_WITH_JOIN: &str = "
SELECT e.id, e.kind, e.payload, (extract(epoch FROM e.received_at) * 1000)::int8, k.description
FROM events e LEFT JOIN kinds k ON k.name = e.kind
ORDER BY e.id DESC LIMIT $1";

const RECENT_EVENTS_ONLY: &str = "
SELECT id, kind, payload, (extract(epoch FROM received_at) * 1000)::int8
FROM events ORDER BY id DESC LIMIT $1";

const KIND_DESCRIPTION: &str = "SELECT description FROM kinds WHERE name = $1";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid connection string: {0}")]
    Config(#[source] tokio_postgres::Error),
    #[error("connecting to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("{what}: {source}")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

fn query_err(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

/// One row of `GET /events/recent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub id: i64,
    pub kind: String,
    pub description: Option<String>,
    pub payload: serde_json::Value,
    pub received_at_ms: i64,
}

/// One client connection with its prepared statements.
struct StoreConn {
    client: Client,
    insert_one: Statement,
    recent_with_join: Statement,
    recent_events_only: Statement,
    kind_description: Statement,
    /// Multi-row INSERTs prepared so far, by row count.
    insert_many: Mutex<HashMap<usize, Statement>>,
}

/// A fixed set of PostgreSQL connections used round-robin.
pub struct EventStore {
    conns: Vec<StoreConn>,
    next: AtomicUsize,
}

impl EventStore {
    /// Opens `connections` connections, creates the schema if missing and
    /// seeds the `kinds` table.
    pub async fn connect(url: &str, connections: usize) -> Result<EventStore, StoreError> {
        let config: tokio_postgres::Config = url.parse().map_err(StoreError::Config)?;
        let mut conns = Vec::with_capacity(connections);
        for i in 0..connections.max(1) {
            let (client, connection) = config.connect(NoTls).await.map_err(StoreError::Connect)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    log::error!("PostgreSQL connection {i} ended: {e}");
                }
            });
            if i == 0 {
                create_schema(&client).await?;
            }
            conns.push(StoreConn::prepare(client).await?);
        }
        Ok(EventStore {
            conns,
            next: AtomicUsize::new(0),
        })
    }

    fn conn(&self) -> &StoreConn {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        &self.conns[i]
    }

    pub async fn insert_one(&self, event: &Event) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.client
            .execute(&conn.insert_one, &[&event.kind, &event.payload])
            .await
            .map_err(query_err("inserting an event"))?;
        Ok(())
    }

    /// Inserts all events with one multi-row INSERT; returns the row count.
    pub async fn insert_many(&self, events: &[Event]) -> Result<u64, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let conn = self.conn();
        let statement = conn.insert_many_statement(events.len()).await?;
        let params: Vec<&(dyn ToSql + Sync)> = events
            .iter()
            .flat_map(|e| [&e.kind as &(dyn ToSql + Sync), &e.payload])
            .collect();
        conn.client
            .execute(&statement, &params)
            .await
            .map_err(query_err("inserting a batch of events"))
    }

    /// The newest `limit` events with their kind's description: one query
    /// with a join, or (`n_plus_one`) one query for the events and one more
    /// per event for its description.
    pub async fn recent(
        &self,
        limit: i64,
        n_plus_one: bool,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let conn = self.conn();
        if !n_plus_one {
            let rows = conn
                .client
                .query(&conn.recent_with_join, &[&limit])
                .await
                .map_err(query_err("reading recent events"))?;
            return Ok(rows
                .iter()
                .map(|r| StoredEvent {
                    id: r.get(0),
                    kind: r.get(1),
                    payload: r.get(2),
                    received_at_ms: r.get(3),
                    description: r.get(4),
                })
                .collect());
        }
        let rows = conn
            .client
            .query(&conn.recent_events_only, &[&limit])
            .await
            .map_err(query_err("reading recent events"))?;
        let mut events = Vec::with_capacity(rows.len());
        for r in &rows {
            let kind: String = r.get(1);
            let description = conn
                .client
                .query_opt(&conn.kind_description, &[&kind])
                .await
                .map_err(query_err("reading a kind's description"))?
                .map(|row| row.get(0));
            events.push(StoredEvent {
                id: r.get(0),
                kind,
                payload: r.get(2),
                received_at_ms: r.get(3),
                description,
            });
        }
        Ok(events)
    }
}

impl StoreConn {
    async fn prepare(client: Client) -> Result<StoreConn, StoreError> {
        let prepare = |sql: &'static str| {
            let client = &client;
            async move {
                client
                    .prepare(sql)
                    .await
                    .map_err(query_err("preparing statements"))
            }
        };
        Ok(StoreConn {
            insert_one: prepare(INSERT_ONE).await?,
            recent_with_join: prepare(RECENT_WITH_JOIN).await?,
            recent_events_only: prepare(RECENT_EVENTS_ONLY).await?,
            kind_description: prepare(KIND_DESCRIPTION).await?,
            insert_many: Mutex::new(HashMap::new()),
            client,
        })
    }

    async fn insert_many_statement(&self, rows: usize) -> Result<Statement, StoreError> {
        if let Some(s) = self.lock_insert_many().get(&rows) {
            return Ok(s.clone());
        }
        let statement = self
            .client
            .prepare(&insert_many_sql(rows))
            .await
            .map_err(query_err("preparing a batch insert"))?;
        self.lock_insert_many().insert(rows, statement.clone());
        Ok(statement)
    }

    fn lock_insert_many(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Statement>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.insert_many.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn create_schema(client: &Client) -> Result<(), StoreError> {
    client
        .batch_execute(SCHEMA)
        .await
        .map_err(query_err("creating the schema"))?;
    let seed = format!(
        "INSERT INTO kinds (name, description) VALUES {} ON CONFLICT (name) DO NOTHING",
        value_pairs(SEEDED_KINDS.len())
    );
    let params: Vec<&(dyn ToSql + Sync)> = SEEDED_KINDS
        .iter()
        .flat_map(|(name, description)| [name as &(dyn ToSql + Sync), description])
        .collect();
    client
        .execute(seed.as_str(), &params)
        .await
        .map_err(query_err("seeding kinds"))?;
    Ok(())
}

/// `INSERT INTO events (kind, payload) VALUES ($1, $2), ($3, $4), …` for
/// `rows` rows.
pub fn insert_many_sql(rows: usize) -> String {
    format!(
        "INSERT INTO events (kind, payload) VALUES {}",
        value_pairs(rows)
    )
}

/// `($1, $2), ($3, $4), …` for `rows` rows of two columns.
fn value_pairs(rows: usize) -> String {
    (0..rows)
        .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_row_insert_numbers_its_parameters() {
        assert_eq!(
            insert_many_sql(1),
            "INSERT INTO events (kind, payload) VALUES ($1, $2)"
        );
        assert_eq!(
            insert_many_sql(3),
            "INSERT INTO events (kind, payload) VALUES ($1, $2), ($3, $4), ($5, $6)"
        );
    }
}
