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
use gantry_core::{EventKind, Job, JobId, Millis};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::Row;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use crate::group::{
    event_from, finish, job_from, rounds, Committer, Done, EventRows, JobRow, Op, Write, Writer,
};
use crate::{Created, Error, Event, JobFilter, JobPage, Result, Store};

/// Each entry moves the schema one version up; `gantry_schema.version` holds the version.
const MIGRATIONS: &[&str] = &[r#"
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
"#];

pub struct PgStore {
    writer: Writer,
    pool: PgPool,
}

impl PgStore {
    /// Connect to `url` (`postgres://USER@HOST/DB`; a `search_path` given in its
    /// `options` picks the schema) and bring the schema up to date.
    pub async fn open(url: &str) -> Result<PgStore> {
        PgStore::connect(PgConnectOptions::from_str(url)?).await
    }

    pub async fn connect(options: PgConnectOptions) -> Result<PgStore> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        if let Err(e) = migrate(&pool).await {
            pool.close().await;
            return Err(e);
        }
        Ok(PgStore {
            writer: Writer::spawn(Postgres(pool.clone())),
            pool,
        })
    }

    /// The pool, for the parts of a coordinator that talk to the database directly.
    pub fn pool(&self) -> &PgPool {
        &self.pool
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
    let mut lock: Vec<&str> = batch
        .iter()
        .filter_map(|w| match &w.op {
            Op::Update { row, .. } => Some(row.id.as_str()),
            _ => None,
        })
        .collect();
    lock.sort_unstable();
    lock.dedup();
    if !lock.is_empty() {
        sqlx::query("SELECT 1 FROM jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&lock)
            .fetch_all(&mut *tx)
            .await?;
    }
    let mut outcomes: Vec<Option<Result<Done>>> = (0..batch.len()).map(|_| None).collect();
    // Writes whose events are to be inserted, in the order they get their numbers.
    let mut pending: Vec<(usize, &EventRows, Pending)> = Vec::new();
    let last_round = rounds.iter().copied().max().unwrap_or(0);
    for round in 0..=last_round {
        let items: Vec<usize> = (0..batch.len()).filter(|i| rounds[*i] == round).collect();
        let creates: Vec<(usize, &JobRow, &str, &EventRows)> = items
            .iter()
            .filter_map(|&i| match &batch[i].op {
                Op::Create {
                    row,
                    request_hash,
                    events,
                } => Some((i, row, request_hash.as_str(), events)),
                _ => None,
            })
            .collect();
        if !creates.is_empty() {
            create(&mut tx, &creates, &mut outcomes, &mut pending).await?;
        }
        let updates: Vec<(usize, &JobRow, &EventRows)> = items
            .iter()
            .filter_map(|&i| match &batch[i].op {
                Op::Update { row, events } => Some((i, row, events)),
                _ => None,
            })
            .collect();
        if !updates.is_empty() {
            let col = |f: fn(&JobRow) -> String| updates.iter().map(|u| f(u.1)).collect::<Vec<_>>();
            let num = |f: fn(&JobRow) -> i64| updates.iter().map(|u| f(u.1)).collect::<Vec<_>>();
            let updated: HashSet<String> = sqlx::query_scalar(
                "UPDATE jobs SET state = v.state, not_before = v.not_before, \
                 version = v.version, updated_at = v.updated_at, doc = v.doc \
                 FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::text[]) \
                 AS v(id, state, not_before, version, updated_at, doc) \
                 WHERE jobs.id = v.id AND jobs.version = v.version - 1 RETURNING jobs.id",
            )
            .bind(col(|r| r.id.as_str().to_owned()))
            .bind(col(|r| r.state.as_str().to_owned()))
            .bind(num(|r| r.not_before))
            .bind(num(|r| r.version))
            .bind(num(|r| r.updated_at))
            .bind(col(|r| r.doc.clone()))
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
            for (i, row, events) in updates {
                if updated.contains(row.id.as_str()) {
                    pending.push((i, events, Pending::Events));
                } else {
                    outcomes[i] = Some(Err(Error::Conflict {
                        id: row.id.clone(),
                        expected: row.version.saturating_sub(1) as u64,
                    }));
                }
            }
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

/// Insert new jobs; one whose idempotency key is taken answers the job that has it.
async fn create<'b>(
    tx: &mut sqlx::PgConnection,
    creates: &[(usize, &'b JobRow, &str, &'b EventRows)],
    outcomes: &mut [Option<Result<Done>>],
    pending: &mut Vec<(usize, &'b EventRows, Pending)>,
) -> Result<()> {
    let text = |f: &dyn Fn(&JobRow, &str) -> String| {
        creates.iter().map(|c| f(c.1, c.2)).collect::<Vec<_>>()
    };
    let num = |f: fn(&JobRow) -> i64| creates.iter().map(|c| f(c.1)).collect::<Vec<_>>();
    // ON CONFLICT waits for a concurrent writer of the same key, then skips the row.
    let inserted: HashSet<String> = sqlx::query_scalar(
        "INSERT INTO jobs (id, state, priority, not_before, version, idempotency_key, \
         request_hash, created_at, updated_at, spec, doc) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::int8[], $5::int8[], \
         $6::text[], $7::text[], $8::int8[], $9::int8[], $10::text[], $11::text[]) \
         ON CONFLICT DO NOTHING RETURNING id",
    )
    .bind(text(&|r, _| r.id.as_str().to_owned()))
    .bind(text(&|r, _| r.state.as_str().to_owned()))
    .bind(creates.iter().map(|c| c.1.priority).collect::<Vec<i32>>())
    .bind(num(|r| r.not_before))
    .bind(num(|r| r.version))
    .bind(
        creates
            .iter()
            .map(|c| c.1.idempotency_key.clone())
            .collect::<Vec<Option<String>>>(),
    )
    .bind(text(&|_, h| h.to_owned()))
    .bind(num(|r| r.created_at))
    .bind(num(|r| r.updated_at))
    .bind(text(&|r, _| r.spec.clone().unwrap_or_else(|| "{}".into())))
    .bind(text(&|r, _| r.doc.clone()))
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let taken: Vec<&str> = creates
        .iter()
        .filter(|c| !inserted.contains(c.1.id.as_str()))
        .filter_map(|c| c.1.idempotency_key.as_deref())
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
    for &(i, row, request_hash, events) in creates {
        if inserted.contains(row.id.as_str()) {
            pending.push((i, events, Pending::Created));
            continue;
        }
        let found = row.idempotency_key.as_ref().and_then(|k| existing.get(k));
        outcomes[i] = Some(match found {
            Some((job, stored_hash)) => Ok(Done::Created(Created::Existing {
                job: Box::new(job.clone()),
                same_request: stored_hash == request_hash,
            })),
            None => Err(Error::Database(sqlx::Error::Protocol(format!(
                "job {} exists already",
                row.id
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
        let last: i64 =
            sqlx::query_scalar("UPDATE event_counter SET last = last + $1 RETURNING last")
                .bind(total as i64)
                .fetch_one(&mut *tx)
                .await?;
        next = last - total as i64 + 1;
        let mut seq = Vec::with_capacity(total);
        let (mut job_id, mut at, mut state, mut data) = (
            Vec::with_capacity(total),
            Vec::with_capacity(total),
            Vec::with_capacity(total),
            Vec::with_capacity(total),
        );
        for (_, events, _) in &pending {
            for (_, json) in &events.kinds {
                seq.push(next + seq.len() as i64);
                job_id.push(events.job_id.as_str());
                at.push(events.at);
                state.push(events.state.as_str());
                data.push(json.as_str());
            }
        }
        sqlx::query(
            "INSERT INTO events (seq, job_id, at, state, data) \
             SELECT * FROM UNNEST($1::int8[], $2::text[], $3::int8[], $4::text[], $5::text[])",
        )
        .bind(&seq)
        .bind(&job_id)
        .bind(&at)
        .bind(&state)
        .bind(&data)
        .execute(&mut *tx)
        .await?;
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
         ev AS (DELETE FROM events WHERE job_id IN (SELECT id FROM gone)) \
         SELECT count(*) FROM gone",
    )
    .bind(before)
    .bind(limit as i64)
    .fetch_one(&mut *tx)
    .await?;
    Ok(Done::Purged(n as u64))
}

fn job_of(row: &PgRow) -> Result<Job> {
    let spec: &str = row.try_get("spec")?;
    let doc: &str = row.try_get("doc")?;
    job_from(spec, doc)
}

fn event_of(row: &PgRow) -> Result<Event> {
    event_from(
        row.try_get("seq")?,
        row.try_get("job_id")?,
        row.try_get("at")?,
        row.try_get("state")?,
        row.try_get("data")?,
    )
}

#[async_trait]
impl Store for PgStore {
    async fn create_job(&self, job: &Job, request_hash: &str) -> Result<Created> {
        self.writer.create(job, request_hash).await
    }

    async fn job(&self, id: &JobId) -> Result<Option<Job>> {
        let row = sqlx::query("SELECT spec, doc FROM jobs WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_of).transpose()
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<JobPage> {
        let limit = filter.limit.clamp(1, 1000) as i64;
        let before = filter.before.unwrap_or(i64::MAX);
        let rows = match filter.state {
            Some(state) => {
                sqlx::query(
                    "SELECT ord, spec, doc FROM jobs WHERE state = $1 AND ord < $2 \
                     ORDER BY ord DESC LIMIT $3",
                )
                .bind(state.as_str())
                .bind(before)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(
                    "SELECT ord, spec, doc FROM jobs WHERE ord < $1 ORDER BY ord DESC LIMIT $2",
                )
                .bind(before)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        let next = if rows.len() as i64 == limit {
            rows.last()
                .map(|r| r.try_get::<i64, _>("ord"))
                .transpose()?
        } else {
            None
        };
        let jobs = rows.iter().map(job_of).collect::<Result<Vec<_>>>()?;
        Ok(JobPage { jobs, next })
    }

    async fn update_job(&self, job: &Job, events: &[EventKind]) -> Result<Vec<Event>> {
        self.writer.update(job, events).await
    }

    async fn append_events(
        &self,
        job: &Job,
        at: Millis,
        events: &[EventKind],
    ) -> Result<Vec<Event>> {
        self.writer.append(job, at, events).await
    }

    async fn purge_finished(&self, before: Millis, limit: u32) -> Result<u64> {
        self.writer.purge(before, limit).await
    }

    async fn queued_jobs(&self, limit: u32) -> Result<Vec<Job>> {
        let rows = sqlx::query(
            "SELECT spec, doc FROM jobs WHERE state = 'queued' \
             ORDER BY priority DESC, ord LIMIT $1",
        )
        .bind(limit.min(i64::MAX as u32) as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_of).collect()
    }

    async fn running_jobs(&self) -> Result<Vec<Job>> {
        let rows = sqlx::query("SELECT spec, doc FROM jobs WHERE state = 'running' ORDER BY ord")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_of).collect()
    }

    async fn job_events(&self, id: &JobId, after_seq: i64) -> Result<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT seq, job_id, at, state, data FROM events \
             WHERE job_id = $1 AND seq > $2 ORDER BY seq",
        )
        .bind(id.as_str())
        .bind(after_seq)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_of).collect()
    }

    async fn events_since(&self, after_seq: i64, limit: u32) -> Result<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT seq, job_id, at, state, data FROM events \
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_seq)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_of).collect()
    }
}
