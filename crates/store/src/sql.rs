//! The `Store` trait written once for both databases, and the few things in which they
//! differ, declared by each (`Sql`).
//!
//! A query is written once, with numbered placeholders (`$1`): PostgreSQL's own, which
//! sqlx's SQLite driver binds by number too (SQLite reads `$1` as a named parameter and
//! sqlx maps `$NNN` to the NNN-th value). What a query cannot say the same way on both
//! is a constant of `Sql`: a row lock, where the newest event number lives. Job writes
//! go to each store's writer task, whose group commits differ in earnest (multi-row
//! statements on SQLite's one writer; row locks, claims, fences and an event counter on
//! PostgreSQL) and stay in each store's `commit` module, as the schemas stay in theirs.

use async_trait::async_trait;
use gantry_core::{EventKind, Job, JobId, JobState, Millis};
use serde_json::Value;
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Type};

use crate::rows::{
    backend_from, counts_of, event_of, job_of, page_of, stats_from, token_from, BackendRow,
    StatsRow, TokenRow,
};
use crate::stats::{self, NodeSample, NodeStats, StatsFilter};
use crate::writer::Writer;
use crate::{
    BackendRecord, Created, Error, Event, Fence, JobFilter, JobPage, Result, Store, TokenRecord,
};

/// A store on a SQL database: its connections, and what its dialect says differently.
/// Every `Sql` is a `Store`.
pub(crate) trait Sql: Send + Sync + 'static {
    type Db: Database;

    /// Appended to a `SELECT` of a row the transaction rewrites next, so that a
    /// concurrent writer of the row waits for the commit.
    const FOR_UPDATE: &'static str;

    /// One row, one column: the number of the newest committed event (0 before the
    /// first), never going back, even once events are purged.
    const LAST_SEQ: &'static str;

    /// Whether the database keeps backend leases, so a fenced write can be checked.
    const LEASES: bool;

    /// The task every job write goes through.
    fn writer(&self) -> &Writer;

    /// Where reads go.
    fn reads(&self) -> &Pool<Self::Db>;

    /// Where the writes outside jobs go (tokens, backends, statistics, deliveries).
    fn writes(&self) -> &Pool<Self::Db>;

    /// How many rows a statement changed (each driver answers it in its own type).
    fn rows_affected(done: &<Self::Db as Database>::QueryResult) -> u64;
}

/// The most jobs one page of `list_jobs` holds.
const MAX_PAGE: u32 = 1000;

const TOKEN_COLUMNS: &str = "id, name, scope, hash, created_at, revoked_at";

const STATS_COLUMNS: &str =
    "class, workflow, backend, hour, count, cached, failed, timed_out, sketch";

// The bounds say what the queries below need of a driver: connections that run
// statements, and the column types the tables use. SQLite and PostgreSQL meet them all.
#[async_trait]
impl<S> Store for S
where
    S: Sql,
    for<'c> &'c mut <S::Db as Database>::Connection: Executor<'c, Database = S::Db>,
    for<'q> <S::Db as Database>::Arguments<'q>: IntoArguments<'q, S::Db>,
    for<'q> &'q str: Encode<'q, S::Db> + Decode<'q, S::Db> + Type<S::Db>,
    for<'q> String: Encode<'q, S::Db> + Decode<'q, S::Db> + Type<S::Db>,
    for<'q> i64: Encode<'q, S::Db> + Decode<'q, S::Db> + Type<S::Db>,
    for<'q> i32: Encode<'q, S::Db> + Decode<'q, S::Db> + Type<S::Db>,
    for<'q> Option<i64>: Encode<'q, S::Db>,
    usize: ColumnIndex<<S::Db as Database>::Row>,
    for<'n> &'n str: ColumnIndex<<S::Db as Database>::Row>,
{
    async fn create_job(&self, job: &Job, request_hash: &str) -> Result<Created> {
        self.writer().create(job, request_hash).await
    }

    async fn job(&self, id: &JobId) -> Result<Option<Job>> {
        let row = sqlx::query("SELECT spec, doc FROM jobs WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(self.reads())
            .await?;
        row.as_ref().map(job_of).transpose()
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<JobPage> {
        let limit = filter.limit.clamp(1, MAX_PAGE) as i64;
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
                .fetch_all(self.reads())
                .await?
            }
            None => {
                sqlx::query(
                    "SELECT ord, spec, doc FROM jobs WHERE ord < $1 ORDER BY ord DESC LIMIT $2",
                )
                .bind(before)
                .bind(limit)
                .fetch_all(self.reads())
                .await?
            }
        };
        page_of(&rows, limit)
    }

    async fn update_job(&self, job: &Job, events: &[EventKind]) -> Result<Vec<Event>> {
        self.writer().update(job, events, None).await
    }

    async fn update_job_fenced(
        &self,
        job: &Job,
        events: &[EventKind],
        fence: &Fence,
    ) -> Result<Vec<Event>> {
        if !S::LEASES {
            return Err(Error::NoLeases);
        }
        self.writer().update(job, events, Some(fence)).await
    }

    async fn update_job_steps(
        &self,
        job: &Job,
        steps: &[(JobState, Vec<EventKind>)],
        fence: Option<&Fence>,
    ) -> Result<Vec<Event>> {
        if fence.is_some() && !S::LEASES {
            return Err(Error::NoLeases);
        }
        self.writer().update_steps(job, steps, fence).await
    }

    async fn append_events(
        &self,
        job: &JobId,
        state: JobState,
        at: Millis,
        events: &[EventKind],
    ) -> Result<Vec<Event>> {
        self.writer().append(job, state, at, events).await
    }

    async fn purge_finished(&self, before: Millis, limit: u32) -> Result<u64> {
        self.writer().purge(before, limit).await
    }

    async fn count_by_state(&self) -> Result<Vec<(JobState, u64)>> {
        counts_of(
            sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state")
                .fetch_all(self.reads())
                .await?,
        )
    }

    async fn queued_jobs(&self, limit: u32) -> Result<Vec<Job>> {
        let rows = sqlx::query(
            "SELECT spec, doc FROM jobs WHERE state = 'queued' \
             ORDER BY priority DESC, ord LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(self.reads())
        .await?;
        rows.iter().map(job_of).collect()
    }

    async fn running_jobs(&self) -> Result<Vec<Job>> {
        let rows = sqlx::query("SELECT spec, doc FROM jobs WHERE state = 'running' ORDER BY ord")
            .fetch_all(self.reads())
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
        .fetch_all(self.reads())
        .await?;
        rows.iter().map(event_of).collect()
    }

    async fn last_seq(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(S::LAST_SEQ)
            .fetch_one(self.reads())
            .await?)
    }

    async fn events_since(&self, after_seq: i64, limit: u32) -> Result<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT seq, job_id, at, state, data FROM events \
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(self.reads())
        .await?;
        rows.iter().map(event_of).collect()
    }

    async fn create_token(&self, token: &TokenRecord) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
        ))
        .bind(token.id.as_str())
        .bind(token.name.as_str())
        .bind(token.scope.as_str())
        .bind(token.hash.as_str())
        .bind(token.created_at)
        .bind(token.revoked_at)
        .execute(self.writes())
        .await?;
        Ok(())
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let row: Option<TokenRow> = sqlx::query_as(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = $1"
        ))
        .bind(hash)
        .fetch_optional(self.reads())
        .await?;
        row.map(token_from).transpose()
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let rows: Vec<TokenRow> = sqlx::query_as(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id"
        ))
        .fetch_all(self.reads())
        .await?;
        rows.into_iter().map(token_from).collect()
    }

    async fn revoke_token(&self, id: &str, at: Millis) -> Result<bool> {
        let done =
            sqlx::query("UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(at)
                .bind(id)
                .execute(self.writes())
                .await?;
        Ok(S::rows_affected(&done) == 1)
    }

    async fn active_tokens(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tokens WHERE revoked_at IS NULL")
            .fetch_one(self.reads())
            .await?;
        Ok(n as u64)
    }

    async fn add_backend(&self, backend: &BackendRecord) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO backends (name, url, tags, priority, added_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(backend.name.as_str())
        .bind(backend.url.as_str())
        .bind(serde_json::to_string(&backend.tags)?)
        .bind(backend.priority)
        .bind(backend.added_at)
        .execute(self.writes())
        .await?;
        Ok(S::rows_affected(&done) == 1)
    }

    async fn added_backends(&self) -> Result<Vec<BackendRecord>> {
        let rows: Vec<BackendRow> = sqlx::query_as(
            "SELECT name, url, tags, priority, added_at FROM backends ORDER BY added_at, name",
        )
        .fetch_all(self.reads())
        .await?;
        rows.into_iter().map(backend_from).collect()
    }

    async fn record_node_stats(&self, samples: &[NodeSample]) -> Result<()> {
        let read = format!(
            "SELECT count, cached, failed, timed_out, sketch FROM node_stats \
             WHERE class = $1 AND workflow = $2 AND backend = $3 AND hour = $4{}",
            S::FOR_UPDATE
        );
        let mut tx = self.writes().begin().await?;
        for add in stats::aggregate(samples) {
            // The row first (empty), then locked and merged: two writers of one new key
            // never overwrite each other's counts.
            sqlx::query(&format!(
                "INSERT INTO node_stats ({STATS_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, 0, 0, 0, 0, $5) ON CONFLICT DO NOTHING"
            ))
            .bind(add.class.as_str())
            .bind(add.workflow.as_str())
            .bind(add.backend.as_str())
            .bind(add.hour)
            .bind("")
            .execute(&mut *tx)
            .await?;
            let (count, cached, failed, timed_out, sketch): (i64, i64, i64, i64, String) =
                sqlx::query_as(&read)
                    .bind(add.class.as_str())
                    .bind(add.workflow.as_str())
                    .bind(add.backend.as_str())
                    .bind(add.hour)
                    .fetch_one(&mut *tx)
                    .await?;
            let mut row = NodeStats {
                count: count as u64,
                cached: cached as u64,
                failed: failed as u64,
                timed_out: timed_out as u64,
                sketch: stats::decode_sketch(&sketch)?,
                ..add.clone()
            };
            row.merge(&add);
            sqlx::query(
                "UPDATE node_stats SET count = $1, cached = $2, failed = $3, timed_out = $4, \
                 sketch = $5 WHERE class = $6 AND workflow = $7 AND backend = $8 AND hour = $9",
            )
            .bind(row.count as i64)
            .bind(row.cached as i64)
            .bind(row.failed as i64)
            .bind(row.timed_out as i64)
            .bind(stats::encode_sketch(&row.sketch)?)
            .bind(row.class.as_str())
            .bind(row.workflow.as_str())
            .bind(row.backend.as_str())
            .bind(row.hour)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn node_stats(&self, filter: &StatsFilter) -> Result<Vec<NodeStats>> {
        let mut sql = format!("SELECT {STATS_COLUMNS} FROM node_stats WHERE TRUE");
        let mut n = 0;
        for (column, op, wanted) in [
            ("class", "=", filter.class.is_some()),
            ("workflow", "=", filter.workflow.is_some()),
            ("backend", "=", filter.backend.is_some()),
            ("hour", ">=", filter.since.is_some()),
        ] {
            if wanted {
                n += 1;
                sql.push_str(&format!(" AND {column} {op} ${n}"));
            }
        }
        sql.push_str(" ORDER BY class, workflow, backend, hour");
        let mut q = sqlx::query_as::<_, StatsRow>(&sql);
        for v in [&filter.class, &filter.workflow, &filter.backend]
            .into_iter()
            .flatten()
        {
            q = q.bind(v.as_str());
        }
        if let Some(since) = filter.since {
            q = q.bind(since - since.rem_euclid(stats::HOUR_MS));
        }
        let rows = q.fetch_all(self.reads()).await?;
        rows.into_iter().map(stats_from).collect()
    }

    async fn purge_node_stats(&self, before: Millis) -> Result<u64> {
        let done = sqlx::query("DELETE FROM node_stats WHERE hour <= $1")
            .bind(before - stats::HOUR_MS)
            .execute(self.writes())
            .await?;
        Ok(S::rows_affected(&done))
    }

    async fn record_delivery(&self, job: &JobId, at: Millis, delivery: &Value) -> Result<()> {
        sqlx::query("INSERT INTO deliveries (job_id, at, data) VALUES ($1, $2, $3)")
            .bind(job.as_str())
            .bind(at)
            .bind(delivery.to_string())
            .execute(self.writes())
            .await?;
        Ok(())
    }

    async fn deliveries(&self, job: &JobId) -> Result<Vec<Value>> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT data FROM deliveries WHERE job_id = $1 ORDER BY id")
                .bind(job.as_str())
                .fetch_all(self.reads())
                .await?;
        rows.iter()
            .map(|d| serde_json::from_str(d).map_err(Error::from))
            .collect()
    }
}
