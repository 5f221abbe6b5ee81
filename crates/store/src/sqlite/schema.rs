//! The embedded store's schema: its versions, each a migration, and `PRAGMA
//! user_version` holding the one a database is at (a newer one is refused).
//!
//! A migration, once released, is never edited: databases that ran it keep what it made.

use sqlx::SqlitePool;

use crate::{Error, Result};

/// The schema version this gantry migrates a database to.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Each entry moves the schema one version up; `PRAGMA user_version` holds the version.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE jobs (
    ord INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    not_before INTEGER NOT NULL,
    version INTEGER NOT NULL,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    spec TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX jobs_by_state ON jobs (state, priority DESC, ord);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    state TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX events_by_job ON events (job_id, seq);
"#,
    r#"
CREATE INDEX jobs_finished ON jobs (updated_at) WHERE state IN ('succeeded', 'failed', 'cancelled');
"#,
    r#"
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
"#,
    r#"
CREATE TABLE backends (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL UNIQUE,
    tags TEXT NOT NULL,
    priority INTEGER NOT NULL,
    added_at INTEGER NOT NULL
);
"#,
    r#"
CREATE TABLE node_stats (
    class TEXT NOT NULL,
    workflow TEXT NOT NULL,
    backend TEXT NOT NULL,
    hour INTEGER NOT NULL,
    count INTEGER NOT NULL,
    cached INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    timed_out INTEGER NOT NULL,
    sketch TEXT NOT NULL,
    PRIMARY KEY (class, workflow, backend, hour)
);
"#,
    r#"
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX deliveries_by_job ON deliveries (job_id, id);
"#,
];

/// Bring the schema up to `SCHEMA_VERSION`, one transaction per version.
pub(super) async fn migrate(pool: &SqlitePool) -> Result<()> {
    let known = SCHEMA_VERSION;
    let found: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(pool)
        .await?;
    if found > known {
        return Err(Error::SchemaTooNew { found, known });
    }
    for (idx, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::raw_sql(&format!("PRAGMA user_version = {}", idx + 1))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(())
}
