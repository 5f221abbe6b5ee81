//! The shared store's schema: its versions, each a migration, and `gantry_schema`
//! holding the one a database is at (a newer one is refused). Coordinators starting
//! together migrate once, under an advisory lock.
//!
//! A migration, once released, is never edited: databases that ran it keep what it made.

use sqlx::PgPool;

use crate::{Error, Result};

/// The schema version this gantry migrates a database to.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Each entry moves the schema one version up; `gantry_schema.version` holds the version.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE jobs (
    ord BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    not_before BIGINT NOT NULL,
    version BIGINT NOT NULL,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    spec TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX jobs_by_state ON jobs (state, priority DESC, ord);
CREATE INDEX jobs_finished ON jobs (updated_at) WHERE state IN ('succeeded', 'failed', 'cancelled');
CREATE TABLE events (
    seq BIGINT PRIMARY KEY,
    job_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    state TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX events_by_job ON events (job_id, seq);
CREATE TABLE event_counter (
    only_row BOOLEAN PRIMARY KEY CHECK (only_row),
    last BIGINT NOT NULL
);
INSERT INTO event_counter VALUES (TRUE, 0);
"#,
    r#"
CREATE TABLE coordinators (
    id TEXT PRIMARY KEY,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE backend_leases (
    backend TEXT PRIMARY KEY,
    owner TEXT,
    token BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE dispatch_log (
    n BIGSERIAL PRIMARY KEY,
    backend TEXT NOT NULL,
    owner TEXT NOT NULL,
    token BIGINT NOT NULL,
    job_id TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
"#,
    r#"
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
"#,
    r#"
CREATE TABLE backends (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL UNIQUE,
    tags TEXT NOT NULL,
    priority INTEGER NOT NULL,
    added_at BIGINT NOT NULL
);
"#,
    r#"
CREATE TABLE node_stats (
    class TEXT NOT NULL,
    workflow TEXT NOT NULL,
    backend TEXT NOT NULL,
    hour BIGINT NOT NULL,
    count BIGINT NOT NULL,
    cached BIGINT NOT NULL,
    failed BIGINT NOT NULL,
    timed_out BIGINT NOT NULL,
    sketch TEXT NOT NULL,
    PRIMARY KEY (class, workflow, backend, hour)
);
"#,
    r#"
CREATE TABLE deliveries (
    id BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX deliveries_by_job ON deliveries (job_id, id);
"#,
];

/// Migrations run under an advisory lock, so coordinators starting together migrate once.
pub(super) async fn migrate(pool: &PgPool) -> Result<()> {
    let known = SCHEMA_VERSION;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(7355608, hashtext(current_schema()))")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS gantry_schema (version BIGINT NOT NULL)")
        .execute(&mut *tx)
        .await?;
    let found: Option<i64> = sqlx::query_scalar("SELECT version FROM gantry_schema")
        .fetch_optional(&mut *tx)
        .await?;
    let found = match found {
        Some(v) => v,
        None => {
            sqlx::query("INSERT INTO gantry_schema VALUES (0)")
                .execute(&mut *tx)
                .await?;
            0
        }
    };
    if found > known {
        tx.rollback().await?;
        return Err(Error::SchemaTooNew { found, known });
    }
    for sql in MIGRATIONS.iter().skip(found as usize) {
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
    }
    sqlx::query("UPDATE gantry_schema SET version = $1")
        .bind(known)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}
