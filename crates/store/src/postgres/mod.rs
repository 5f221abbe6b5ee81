//! The shared store: PostgreSQL, for one coordinator or several on one database.
//!
//! Writes go through the same group-committing writer as the embedded store, with a
//! group commit of its own (`commit`: row locks in id order, claims, fences, and event
//! numbers from a counter taken last, so they become visible in order across
//! coordinators). The queries it shares with SQLite are in `sql`; what only it has is
//! here: versioned migrations under an advisory lock (`schema`), backend leases
//! (`leases`), and LISTEN/NOTIFY for the event tail.

mod commit;
mod leases;
mod schema;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgQueryResult};
use std::str::FromStr;
use std::time::Duration;

use crate::sql::Sql;
use crate::writer::Writer;
use crate::Result;

pub use schema::SCHEMA_VERSION;

pub struct PgStore {
    writer: Writer,
    pool: PgPool,
    schema: String,
}

/// The channel every commit with events notifies, with its schema as the payload.
pub const EVENTS_CHANNEL: &str = "gantry_events";

impl PgStore {
    /// Connect to `url` (`postgres://USER@HOST/DB`; a `search_path` given in its
    /// `options` picks the schema) and bring the schema up to date.
    pub async fn open(url: &str) -> Result<PgStore> {
        PgStore::connect(PgConnectOptions::from_str(url)?).await
    }

    pub async fn connect(options: PgConnectOptions) -> Result<PgStore> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            // Short, so an outage is seen (and reported) quickly rather than queued behind.
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options)
            .await?;
        if let Err(e) = schema::migrate(&pool).await {
            pool.close().await;
            return Err(e);
        }
        let schema: String = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await?;
        Ok(PgStore {
            writer: Writer::spawn(commit::Postgres(pool.clone())),
            pool,
            schema,
        })
    }

    /// The pool, for the parts of a coordinator that talk to the database directly.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema the store lives in: the payload of its `EVENTS_CHANNEL` notifications.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// A listener woken by every commit that adds events (a wake-up only: the event
    /// rows are the truth, read with `events_since`).
    pub async fn listen(&self) -> Result<sqlx::postgres::PgListener> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(EVENTS_CHANNEL).await?;
        Ok(listener)
    }
}

impl Sql for PgStore {
    type Db = sqlx::Postgres;

    const FOR_UPDATE: &'static str = " FOR UPDATE";

    // The counter the group commit takes numbers from (`commit::insert_events`).
    const LAST_SEQ: &'static str = "SELECT last FROM event_counter";

    const LEASES: bool = true;

    fn writer(&self) -> &Writer {
        &self.writer
    }

    fn reads(&self) -> &PgPool {
        &self.pool
    }

    fn writes(&self) -> &PgPool {
        &self.pool
    }

    fn rows_affected(done: &PgQueryResult) -> u64 {
        done.rows_affected()
    }
}
