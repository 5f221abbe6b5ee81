//! The shared store: PostgreSQL, for one coordinator or several on one database.
//!
//! Writes go through the same group-committing writer as the embedded store (one
//! transaction per group, each write conditional on its own). Event numbers are taken
//! from a one-row counter as the last step before the commit: its row lock is held until
//! the commit is visible, so numbers become visible in order across every coordinator,
//! and a reader that has seen event N never later finds a smaller one committing behind
//! it (a plain sequence hands out numbers at insert and commits them out of order). Job
//! rows a group updates are locked first and in id order, so two coordinators' groups
//! never deadlock on each other.

use async_trait::async_trait;
use gantry_core::{Job, Millis};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgQueryResult};
use sqlx::Row;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use crate::rows::{job_of, EventRows, JobRow};
use crate::sql::Sql;
use crate::writer::{finish, rounds, Committer, Done, Op, Write, Writer};
use crate::{Created, Error, Fence, Result};

/// Each entry moves the schema one version up; `gantry_schema.version` holds the version.
/// The schema version this gantry migrates a database to.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

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
        if let Err(e) = migrate(&pool).await {
            pool.close().await;
            return Err(e);
        }
        let schema: String = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await?;
        Ok(PgStore {
            writer: Writer::spawn(Postgres(pool.clone())),
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

/// Who drives a backend, as the database has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub backend: String,
    /// None once released.
    pub owner: Option<String>,
    pub token: i64,
    /// Milliseconds left before it expires (negative once expired), on the database's clock.
    pub remaining_ms: i64,
}

/// One claim of a job for a backend, as committed with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DispatchRecord {
    pub n: i64,
    pub backend: String,
    pub owner: String,
    pub token: i64,
    pub job_id: String,
    /// Microseconds since the Unix epoch, on the database's clock.
    pub at_us: i64,
}

/// Leases: one coordinator drives a backend at a time. Every time is the database's
/// clock (`clock_timestamp()`), so coordinators' clocks never have to agree.
impl PgStore {
    /// Say this coordinator is alive for `ttl`; answers the live coordinators, sorted.
    pub async fn heartbeat(&self, coordinator: &str, ttl: Duration) -> Result<Vec<String>> {
        sqlx::query(
            "INSERT INTO coordinators (id, expires_at) \
             VALUES ($1, clock_timestamp() + $2 * interval '1 millisecond') \
             ON CONFLICT (id) DO UPDATE SET expires_at = EXCLUDED.expires_at",
        )
        .bind(coordinator)
        .bind(ttl.as_millis() as i64)
        .execute(&self.pool)
        .await?;
        Ok(sqlx::query_scalar(
            "SELECT id FROM coordinators WHERE expires_at > clock_timestamp() ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Say this coordinator is gone (a clean shutdown), so others rebalance at once.
    pub async fn leave(&self, coordinator: &str) -> Result<()> {
        sqlx::query("DELETE FROM coordinators WHERE id = $1")
            .bind(coordinator)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Take `backend` if nobody holds it (never leased, released, or expired): answers
    /// the new fencing token, one more than any before it.
    pub async fn acquire_lease(
        &self,
        backend: &str,
        coordinator: &str,
        ttl: Duration,
    ) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "INSERT INTO backend_leases (backend, owner, token, expires_at) \
             VALUES ($1, $2, 1, clock_timestamp() + $3 * interval '1 millisecond') \
             ON CONFLICT (backend) DO UPDATE SET owner = EXCLUDED.owner, \
                 token = backend_leases.token + 1, expires_at = EXCLUDED.expires_at \
             WHERE backend_leases.owner IS NULL OR backend_leases.expires_at <= clock_timestamp() \
             RETURNING token",
        )
        .bind(backend)
        .bind(coordinator)
        .bind(ttl.as_millis() as i64)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Extend a lease this coordinator still holds; false when it lapsed or was taken
    /// (a lapsed lease is never revived: it is acquired anew, with a new token).
    pub async fn renew_lease(
        &self,
        backend: &str,
        coordinator: &str,
        token: i64,
        ttl: Duration,
    ) -> Result<bool> {
        let renewed = sqlx::query(
            "UPDATE backend_leases SET expires_at = clock_timestamp() + $4 * interval '1 millisecond' \
             WHERE backend = $1 AND owner = $2 AND token = $3 AND expires_at > clock_timestamp()",
        )
        .bind(backend)
        .bind(coordinator)
        .bind(token)
        .bind(ttl.as_millis() as i64)
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Give a lease up, so another coordinator may take it at once.
    pub async fn release_lease(&self, backend: &str, coordinator: &str, token: i64) -> Result<()> {
        sqlx::query(
            "UPDATE backend_leases SET owner = NULL, expires_at = clock_timestamp() \
             WHERE backend = $1 AND owner = $2 AND token = $3",
        )
        .bind(backend)
        .bind(coordinator)
        .bind(token)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn leases(&self) -> Result<Vec<Lease>> {
        let rows = sqlx::query(
            "SELECT backend, owner, token, \
             (EXTRACT(EPOCH FROM (expires_at - clock_timestamp())) * 1000)::int8 AS remaining_ms \
             FROM backend_leases ORDER BY backend",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Lease {
                    backend: r.try_get("backend")?,
                    owner: r.try_get("owner")?,
                    token: r.try_get("token")?,
                    remaining_ms: r.try_get("remaining_ms")?,
                })
            })
            .collect()
    }

    /// Every claim committed, in commit order per backend (by `n` within one backend's
    /// lease, since claims are fenced by it).
    pub async fn dispatch_log(&self) -> Result<Vec<DispatchRecord>> {
        let rows = sqlx::query(
            "SELECT n, backend, owner, token, job_id, \
             (EXTRACT(EPOCH FROM at) * 1000000)::int8 AS at_us FROM dispatch_log ORDER BY n",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DispatchRecord {
                    n: r.try_get("n")?,
                    backend: r.try_get("backend")?,
                    owner: r.try_get("owner")?,
                    token: r.try_get("token")?,
                    job_id: r.try_get("job_id")?,
                    at_us: r.try_get("at_us")?,
                })
            })
            .collect()
    }
}

/// Migrations run under an advisory lock, so coordinators starting together migrate once.
async fn migrate(pool: &PgPool) -> Result<()> {
    let known = MIGRATIONS.len() as i64;
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

/// The writer's side of the pool.
struct Postgres(PgPool);

#[async_trait]
impl Committer for Postgres {
    async fn commit(&mut self, batch: &[Write]) -> Result<Vec<Result<Done>>> {
        // A deadlock or serialisation failure undoes the whole group: run it again.
        let mut tries = 0;
        loop {
            match run_group(&self.0, batch).await {
                Err(Error::Database(sqlx::Error::Database(e)))
                    if tries < 5 && matches!(e.code().as_deref(), Some("40P01" | "40001")) =>
                {
                    tries += 1;
                }
                other => return other,
            }
        }
    }
}

/// What a write of the group becomes once its events are numbered.
enum Pending {
    Created,
    Events,
}

async fn run_group(pool: &PgPool, batch: &[Write]) -> Result<Vec<Result<Done>>> {
    let rounds = rounds(batch);
    let mut tx = pool.begin().await?;
    let mut outcomes: Vec<Option<Result<Done>>> = (0..batch.len()).map(|_| None).collect();
    // Rows to update are locked first, in id order; a claim skips a row another
    // coordinator holds instead of waiting for it.
    let (mut lock, mut claim): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    for w in batch {
        if let Op::Update { row, fence, .. } = &w.op {
            match fence {
                Some(f) if f.claim => claim.push(row.id.as_str()),
                _ => lock.push(row.id.as_str()),
            }
        }
    }
    lock.sort_unstable();
    lock.dedup();
    claim.sort_unstable();
    claim.dedup();
    if !lock.is_empty() {
        sqlx::query("SELECT 1 FROM jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&lock)
            .fetch_all(&mut *tx)
            .await?;
    }
    let mut skipped: HashSet<String> = claim.iter().map(|id| (*id).to_owned()).collect();
    if !claim.is_empty() {
        let claimed: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE SKIP LOCKED",
        )
        .bind(&claim)
        .fetch_all(&mut *tx)
        .await?;
        for id in claimed {
            skipped.remove(&id);
        }
    }
    // Writes whose events are to be inserted, in the order they get their numbers.
    let mut pending: Vec<(usize, &EventRows, Pending)> = Vec::new();
    let last_round = rounds.iter().copied().max().unwrap_or(0);
    for round in 0..=last_round {
        let items: Vec<usize> = (0..batch.len()).filter(|i| rounds[*i] == round).collect();
        let creates: Vec<New> = items
            .iter()
            .filter_map(|&i| match &batch[i].op {
                Op::Create {
                    row,
                    spec,
                    request_hash,
                    events,
                } => Some(New {
                    i,
                    row,
                    spec,
                    request_hash,
                    events,
                }),
                _ => None,
            })
            .collect();
        if !creates.is_empty() {
            create(&mut tx, &creates, &mut outcomes, &mut pending).await?;
        }
        let mut updates: Vec<(usize, &JobRow, &EventRows, Option<&Fence>)> = Vec::new();
        for &i in &items {
            if let Op::Update { row, events, fence } = &batch[i].op {
                if fence.as_ref().is_some_and(|f| f.claim) && skipped.contains(row.id.as_str()) {
                    outcomes[i] = Some(Err(row.conflict()));
                } else {
                    updates.push((i, row, events, fence.as_ref()));
                }
            }
        }
        if !updates.is_empty() {
            update(&mut tx, &updates, &mut outcomes, &mut pending).await?;
        }
        for &i in &items {
            match &batch[i].op {
                Op::Append { events } => pending.push((i, events, Pending::Events)),
                Op::Purge { before, limit } => {
                    outcomes[i] = Some(purge(&mut tx, *before, *limit).await)
                }
                Op::Create { .. } | Op::Update { .. } => {}
            }
        }
    }
    insert_events(&mut tx, pending, &mut outcomes).await?;
    tx.commit().await?;
    Ok(finish(outcomes))
}

/// Conditional updates, each fenced by its lease when it has one: the lease must be
/// current and unexpired in the same statement, and is locked (`FOR SHARE`) so that a
/// takeover waits for this commit. Claims that succeed go into the dispatch log.
async fn update<'b>(
    tx: &mut sqlx::PgConnection,
    updates: &[(usize, &'b JobRow, &'b EventRows, Option<&'b Fence>)],
    outcomes: &mut [Option<Result<Done>>],
    pending: &mut Vec<(usize, &'b EventRows, Pending)>,
) -> Result<()> {
    let col = |f: fn(&JobRow) -> String| updates.iter().map(|u| f(u.1)).collect::<Vec<_>>();
    let num = |f: fn(&JobRow) -> i64| updates.iter().map(|u| f(u.1)).collect::<Vec<_>>();
    let fence = |f: fn(&Fence) -> String| {
        updates
            .iter()
            .map(|u| u.3.map(f))
            .collect::<Vec<Option<String>>>()
    };
    let updated: HashSet<String> = sqlx::query_scalar(
        "UPDATE jobs SET state = v.state, not_before = v.not_before, \
         version = v.version, updated_at = v.updated_at, doc = v.doc \
         FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::text[], \
         $7::text[], $8::text[], $9::int8[]) \
         AS v(id, state, not_before, version, updated_at, doc, fence_backend, fence_owner, fence_token) \
         WHERE jobs.id = v.id AND jobs.version = v.version - 1 \
         AND (v.fence_backend IS NULL OR EXISTS (SELECT 1 FROM backend_leases l \
              WHERE l.backend = v.fence_backend AND l.owner = v.fence_owner \
              AND l.token = v.fence_token AND l.expires_at > clock_timestamp() FOR SHARE)) \
         RETURNING jobs.id",
    )
    .bind(col(|r| r.id.as_str().to_owned()))
    .bind(col(|r| r.state.as_str().to_owned()))
    .bind(num(|r| r.not_before))
    .bind(num(|r| r.version))
    .bind(num(|r| r.updated_at))
    .bind(col(|r| r.doc.clone()))
    .bind(fence(|f| f.backend.clone()))
    .bind(fence(|f| f.owner.clone()))
    .bind(updates.iter().map(|u| u.3.map(|f| f.token)).collect::<Vec<Option<i64>>>())
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    // A refused fenced write whose version still matches was refused by its fence.
    let refused: Vec<&str> = updates
        .iter()
        .filter(|u| u.3.is_some() && !updated.contains(u.1.id.as_str()))
        .map(|u| u.1.id.as_str())
        .collect();
    let mut versions: HashMap<String, i64> = HashMap::new();
    if !refused.is_empty() {
        let rows = sqlx::query("SELECT id, version FROM jobs WHERE id = ANY($1)")
            .bind(&refused)
            .fetch_all(&mut *tx)
            .await?;
        for row in rows {
            versions.insert(row.try_get("id")?, row.try_get("version")?);
        }
    }
    let mut log: Vec<(&Fence, &str)> = Vec::new();
    for &(i, row, events, fence) in updates {
        if updated.contains(row.id.as_str()) {
            pending.push((i, events, Pending::Events));
            if let Some(f) = fence.filter(|f| f.claim) {
                log.push((f, row.id.as_str()));
            }
            continue;
        }
        outcomes[i] = Some(Err(match fence {
            Some(f) if versions.get(row.id.as_str()) == Some(&(row.version - 1)) => Error::Fenced {
                id: row.id.clone(),
                backend: f.backend.clone(),
                token: f.token,
            },
            _ => row.conflict(),
        }));
    }
    if !log.is_empty() {
        sqlx::query(
            "INSERT INTO dispatch_log (backend, owner, token, job_id) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[])",
        )
        .bind(
            log.iter()
                .map(|(f, _)| f.backend.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            log.iter()
                .map(|(f, _)| f.owner.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(log.iter().map(|(f, _)| f.token).collect::<Vec<_>>())
        .bind(log.iter().map(|(_, id)| *id).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// A job to create, with the place of its write in the group.
struct New<'b> {
    i: usize,
    row: &'b JobRow,
    spec: &'b str,
    request_hash: &'b str,
    events: &'b EventRows,
}

/// Insert new jobs; one whose idempotency key is taken answers the job that has it.
async fn create<'b>(
    tx: &mut sqlx::PgConnection,
    creates: &[New<'b>],
    outcomes: &mut [Option<Result<Done>>],
    pending: &mut Vec<(usize, &'b EventRows, Pending)>,
) -> Result<()> {
    let text = |f: fn(&New<'b>) -> &'b str| creates.iter().map(f).collect::<Vec<_>>();
    let num = |f: fn(&JobRow) -> i64| creates.iter().map(|c| f(c.row)).collect::<Vec<_>>();
    // ON CONFLICT waits for a concurrent writer of the same key, then skips the row.
    let inserted: HashSet<String> = sqlx::query_scalar(
        "INSERT INTO jobs (id, state, priority, not_before, version, idempotency_key, \
         request_hash, created_at, updated_at, spec, doc) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::int8[], $5::int8[], \
         $6::text[], $7::text[], $8::int8[], $9::int8[], $10::text[], $11::text[]) \
         ON CONFLICT DO NOTHING RETURNING id",
    )
    .bind(text(|c| c.row.id.as_str()))
    .bind(text(|c| c.row.state.as_str()))
    .bind(creates.iter().map(|c| c.row.priority).collect::<Vec<i32>>())
    .bind(num(|r| r.not_before))
    .bind(num(|r| r.version))
    .bind(
        creates
            .iter()
            .map(|c| c.row.idempotency_key.as_deref())
            .collect::<Vec<Option<&str>>>(),
    )
    .bind(text(|c| c.request_hash))
    .bind(num(|r| r.created_at))
    .bind(num(|r| r.updated_at))
    .bind(text(|c| c.spec))
    .bind(text(|c| c.row.doc.as_str()))
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let taken: Vec<&str> = creates
        .iter()
        .filter(|c| !inserted.contains(c.row.id.as_str()))
        .filter_map(|c| c.row.idempotency_key.as_deref())
        .collect();
    let mut existing: HashMap<String, (Job, String)> = HashMap::new();
    if !taken.is_empty() {
        let rows = sqlx::query(
            "SELECT idempotency_key, request_hash, spec, doc FROM jobs \
             WHERE idempotency_key = ANY($1)",
        )
        .bind(&taken)
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            let key: String = row.try_get("idempotency_key")?;
            existing.insert(key, (job_of(&row)?, row.try_get("request_hash")?));
        }
    }
    for c in creates {
        if inserted.contains(c.row.id.as_str()) {
            pending.push((c.i, c.events, Pending::Created));
            continue;
        }
        let found = c.row.idempotency_key.as_ref().and_then(|k| existing.get(k));
        outcomes[c.i] = Some(match found {
            Some((job, stored_hash)) => Ok(Done::Created(Created::Existing {
                job: Box::new(job.clone()),
                same_request: stored_hash == c.request_hash,
            })),
            None => Err(Error::Database(sqlx::Error::Protocol(format!(
                "job {} exists already",
                c.row.id
            )))),
        });
    }
    Ok(())
}

/// Number the group's events from the counter (taken last: its lock is held only for
/// the insert and the commit) and insert them.
async fn insert_events(
    tx: &mut sqlx::PgConnection,
    pending: Vec<(usize, &EventRows, Pending)>,
    outcomes: &mut [Option<Result<Done>>],
) -> Result<()> {
    let total: usize = pending.iter().map(|(_, e, _)| e.kinds.len()).sum();
    let mut next = 0;
    if total > 0 {
        let (mut job_id, mut at, mut state, mut data) = (
            Vec::with_capacity(total),
            Vec::with_capacity(total),
            Vec::with_capacity(total),
            Vec::with_capacity(total),
        );
        for (_, events, _) in &pending {
            for (_, json) in &events.kinds {
                job_id.push(events.job_id.as_str());
                at.push(events.at);
                state.push(events.state.as_str());
                data.push(json.as_str());
            }
        }
        // One round trip: take the numbers, insert the rows in order, and notify
        // (delivered at commit, to every coordinator's listener).
        let last: i64 = sqlx::query_scalar(
            "WITH c AS (UPDATE event_counter SET last = last + $1 RETURNING last), \
             ins AS (INSERT INTO events (seq, job_id, at, state, data) \
                 SELECT c.last - $1 + e.n, e.job_id, e.at, e.state, e.data \
                 FROM c, UNNEST($2::text[], $3::int8[], $4::text[], $5::text[]) \
                 WITH ORDINALITY AS e(job_id, at, state, data, n)) \
             SELECT c.last FROM c, (SELECT pg_notify($6, current_schema())) AS notified",
        )
        .bind(total as i64)
        .bind(&job_id)
        .bind(&at)
        .bind(&state)
        .bind(&data)
        .bind(EVENTS_CHANNEL)
        .fetch_one(&mut *tx)
        .await?;
        next = last - total as i64 + 1;
    }
    for (i, events, kind) in pending {
        let numbered = events.numbered(next);
        next += numbered.len() as i64;
        outcomes[i] = Some(match kind {
            Pending::Events => Ok(Done::Events(numbered)),
            Pending::Created => match numbered.into_iter().next() {
                Some(first) => Ok(Done::Created(Created::New(first))),
                None => Err(Error::Database(sqlx::Error::Protocol(
                    "a new job needs its first event".into(),
                ))),
            },
        });
    }
    Ok(())
}

/// Delete up to `limit` terminal jobs last changed before `before`, with their events.
async fn purge(tx: &mut sqlx::PgConnection, before: Millis, limit: u32) -> Result<Done> {
    let n: i64 = sqlx::query_scalar(
        "WITH gone AS (DELETE FROM jobs WHERE id IN (SELECT id FROM jobs \
         WHERE state IN ('succeeded', 'failed', 'cancelled') AND updated_at < $1 \
         ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id), \
         ev AS (DELETE FROM events WHERE job_id IN (SELECT id FROM gone)), \
         dl AS (DELETE FROM deliveries WHERE job_id IN (SELECT id FROM gone)) \
         SELECT count(*) FROM gone",
    )
    .bind(before)
    .bind(limit as i64)
    .fetch_one(&mut *tx)
    .await?;
    Ok(Done::Purged(n as u64))
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
