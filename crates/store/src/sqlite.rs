//! The embedded store: one SQLite file in the data dir, in WAL mode.
//!
//! Writes go through a pool of one connection, so they are serialised and event sequence
//! numbers commit in order; reads use their own pool and never block on a writer (WAL).
//! A job's immutable spec is written once; its changing part is one JSON document.

use async_trait::async_trait;
use gantry_core::{EventKind, Job, JobId, JobState, Millis};
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use crate::{Created, Error, Event, JobFilter, JobPage, Result, Store};

/// Each entry moves the schema one version up; `PRAGMA user_version` holds the version.
const MIGRATIONS: &[&str] = &[r#"
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
"#];

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Open (creating if needed) `gantry.db` in `dir` and bring its schema up to date.
    pub async fn open(dir: &Path) -> Result<SqliteStore> {
        let options = SqliteConnectOptions::from_str("sqlite://gantry.db")?
            .filename(dir.join("gantry.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // A 202 promises the job survives a power cut, not only a crash.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        migrate(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(SqliteStore { writer, reader })
    }
}

async fn migrate(pool: &SqlitePool) -> Result<()> {
    let known = MIGRATIONS.len() as i64;
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

/// The changing part of a job: everything but its spec.
fn doc_of(job: &Job) -> Result<String> {
    let mut value = serde_json::to_value(job)?;
    if let Value::Object(map) = &mut value {
        map.remove("spec");
    }
    Ok(serde_json::to_string(&value)?)
}

fn job_of(row: &sqlx::sqlite::SqliteRow) -> Result<Job> {
    let spec: String = row.try_get("spec")?;
    let doc: String = row.try_get("doc")?;
    let mut value: Value = serde_json::from_str(&doc)?;
    if let Value::Object(map) = &mut value {
        map.insert("spec".to_owned(), serde_json::from_str(&spec)?);
    }
    Ok(serde_json::from_value(value)?)
}

fn event_of(row: &sqlx::sqlite::SqliteRow) -> Result<Event> {
    let job_id: String = row.try_get("job_id")?;
    let state: String = row.try_get("state")?;
    let data: String = row.try_get("data")?;
    Ok(Event {
        seq: row.try_get("seq")?,
        job_id: JobId::parse(&job_id).ok_or_else(|| {
            Error::Corrupt(serde::de::Error::custom(format!("bad job id {job_id}")))
        })?,
        at: row.try_get("at")?,
        state: JobState::parse(&state).ok_or_else(|| {
            Error::Corrupt(serde::de::Error::custom(format!("bad state {state}")))
        })?,
        kind: serde_json::from_str(&data)?,
    })
}

async fn insert_events(
    tx: &mut sqlx::SqliteConnection,
    job: &Job,
    at: Millis,
    events: &[EventKind],
) -> Result<Vec<Event>> {
    let mut out = Vec::with_capacity(events.len());
    for kind in events {
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO events (job_id, at, state, data) VALUES (?, ?, ?, ?) RETURNING seq",
        )
        .bind(job.id.as_str())
        .bind(at)
        .bind(job.state.as_str())
        .bind(serde_json::to_string(kind)?)
        .fetch_one(&mut *tx)
        .await?;
        out.push(Event {
            seq,
            job_id: job.id.clone(),
            at,
            state: job.state,
            kind: kind.clone(),
        });
    }
    Ok(out)
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_job(&self, job: &Job, request_hash: &str) -> Result<Created> {
        let mut tx = self.writer.begin().await?;
        if let Some(key) = &job.spec.idempotency_key {
            let existing = sqlx::query("SELECT * FROM jobs WHERE idempotency_key = ?")
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(row) = existing {
                let stored_hash: String = row.try_get("request_hash")?;
                return Ok(Created::Existing {
                    job: Box::new(job_of(&row)?),
                    same_request: stored_hash == request_hash,
                });
            }
        }
        sqlx::query(
            "INSERT INTO jobs (id, state, priority, not_before, version, idempotency_key, \
             request_hash, created_at, updated_at, spec, doc) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(job.id.as_str())
        .bind(job.state.as_str())
        .bind(job.spec.priority)
        .bind(job.not_before)
        .bind(job.version as i64)
        .bind(job.spec.idempotency_key.as_deref())
        .bind(request_hash)
        .bind(job.created_at)
        .bind(job.updated_at)
        .bind(serde_json::to_string(&job.spec)?)
        .bind(doc_of(job)?)
        .execute(&mut *tx)
        .await?;
        let mut events = insert_events(
            &mut tx,
            job,
            job.created_at,
            &[EventKind::Queued {
                priority: job.spec.priority,
            }],
        )
        .await?;
        tx.commit().await?;
        Ok(Created::New(events.remove(0)))
    }

    async fn job(&self, id: &JobId) -> Result<Option<Job>> {
        let row = sqlx::query("SELECT spec, doc FROM jobs WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(job_of).transpose()
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<JobPage> {
        let limit = filter.limit.clamp(1, 1000) as i64;
        let before = filter.before.unwrap_or(i64::MAX);
        let rows = match filter.state {
            Some(state) => {
                sqlx::query(
                    "SELECT ord, spec, doc FROM jobs WHERE state = ? AND ord < ? \
                     ORDER BY ord DESC LIMIT ?",
                )
                .bind(state.as_str())
                .bind(before)
                .bind(limit)
                .fetch_all(&self.reader)
                .await?
            }
            None => {
                sqlx::query(
                    "SELECT ord, spec, doc FROM jobs WHERE ord < ? ORDER BY ord DESC LIMIT ?",
                )
                .bind(before)
                .bind(limit)
                .fetch_all(&self.reader)
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
        let expected = job.version.saturating_sub(1);
        let mut tx = self.writer.begin().await?;
        let updated = sqlx::query(
            "UPDATE jobs SET state = ?, not_before = ?, version = ?, updated_at = ?, doc = ? \
             WHERE id = ? AND version = ?",
        )
        .bind(job.state.as_str())
        .bind(job.not_before)
        .bind(job.version as i64)
        .bind(job.updated_at)
        .bind(doc_of(job)?)
        .bind(job.id.as_str())
        .bind(expected as i64)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(Error::Conflict {
                id: job.id.clone(),
                expected,
            });
        }
        let events = insert_events(&mut tx, job, job.updated_at, events).await?;
        tx.commit().await?;
        Ok(events)
    }

    async fn append_events(
        &self,
        job: &Job,
        at: Millis,
        events: &[EventKind],
    ) -> Result<Vec<Event>> {
        let mut tx = self.writer.begin().await?;
        let events = insert_events(&mut tx, job, at, events).await?;
        tx.commit().await?;
        Ok(events)
    }

    async fn queued_jobs(&self, limit: u32) -> Result<Vec<Job>> {
        let rows = sqlx::query(
            "SELECT spec, doc FROM jobs WHERE state = 'queued' ORDER BY priority DESC, ord LIMIT ?",
        )
        .bind(limit as i64)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(job_of).collect()
    }

    async fn running_jobs(&self) -> Result<Vec<Job>> {
        let rows = sqlx::query("SELECT spec, doc FROM jobs WHERE state = 'running' ORDER BY ord")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(job_of).collect()
    }

    async fn job_events(&self, id: &JobId, after_seq: i64) -> Result<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT seq, job_id, at, state, data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq",
        )
        .bind(id.as_str())
        .bind(after_seq)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(event_of).collect()
    }

    async fn events_since(&self, after_seq: i64, limit: u32) -> Result<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT seq, job_id, at, state, data FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(after_seq)
        .bind(limit as i64)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(event_of).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_core::{transition, Input, JobSpec, Policy, Timeouts, Workflow};

    fn job(key: Option<&str>, priority: i32, now: Millis) -> Job {
        let workflow = Workflow::parse(&serde_json::json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8}}
        }))
        .unwrap();
        Job::new(
            JobId::random(),
            JobSpec {
                workflow,
                priority,
                max_attempts: 3,
                tags: vec![],
                timeouts: Timeouts::default(),
                idempotency_key: key.map(String::from),
                metadata: Default::default(),
            },
            now,
        )
    }

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn a_job_round_trips_with_its_events() {
        let (_dir, store) = store().await;
        let j = job(None, 0, 5);
        let Created::New(first) = store.create_job(&j, "h").await.unwrap() else {
            panic!("not new")
        };
        assert_eq!(first.kind, EventKind::Queued { priority: 0 });
        assert_eq!(store.job(&j.id).await.unwrap().unwrap(), j);
        let applied = transition(
            &j,
            Input::Dispatch {
                backend: "a".into(),
                prompt_id: "p".into(),
            },
            9,
            &Policy::default(),
        )
        .unwrap();
        let events = store
            .update_job(&applied.job, &applied.events)
            .await
            .unwrap();
        assert_eq!(events[0].seq, first.seq + 1);
        assert_eq!(events[0].state, JobState::Running);
        assert_eq!(store.job(&j.id).await.unwrap().unwrap(), applied.job);
        let all = store.job_events(&j.id, 0).await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(store.running_jobs().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_stale_version_is_refused_and_writes_nothing() {
        let (_dir, store) = store().await;
        let j = job(None, 0, 5);
        store.create_job(&j, "h").await.unwrap();
        let a = transition(&j, Input::Cancel, 6, &Policy::default()).unwrap();
        let b = transition(
            &j,
            Input::Dispatch {
                backend: "a".into(),
                prompt_id: "p".into(),
            },
            6,
            &Policy::default(),
        )
        .unwrap();
        store.update_job(&a.job, &a.events).await.unwrap();
        let err = store.update_job(&b.job, &b.events).await.unwrap_err();
        assert!(matches!(err, Error::Conflict { expected: 1, .. }), "{err}");
        let stored = store.job(&j.id).await.unwrap().unwrap();
        assert_eq!(stored.state, JobState::Cancelled);
        assert_eq!(store.job_events(&j.id, 0).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn idempotency_keys_answer_the_existing_job() {
        let (_dir, store) = store().await;
        let j = job(Some("k"), 0, 5);
        store.create_job(&j, "h1").await.unwrap();
        let again = job(Some("k"), 0, 6);
        match store.create_job(&again, "h1").await.unwrap() {
            Created::Existing { job, same_request } => {
                assert_eq!(job.id, j.id);
                assert!(same_request);
            }
            Created::New(_) => panic!("created twice"),
        }
        match store.create_job(&again, "h2").await.unwrap() {
            Created::Existing { same_request, .. } => assert!(!same_request),
            Created::New(_) => panic!("created twice"),
        }
        let page = store
            .list_jobs(&JobFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(page.jobs.len(), 1);
    }

    #[tokio::test]
    async fn queue_order_is_priority_then_submission_and_pages_walk_back() {
        let (_dir, store) = store().await;
        let low = job(None, 0, 1);
        let high = job(None, 5, 2);
        let low2 = job(None, 0, 3);
        for j in [&low, &high, &low2] {
            store.create_job(j, "h").await.unwrap();
        }
        let order: Vec<JobId> = store
            .queued_jobs(10)
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(order, [high.id.clone(), low.id.clone(), low2.id.clone()]);

        let first = store
            .list_jobs(&JobFilter {
                limit: 2,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(first.jobs.len(), 2);
        assert_eq!(first.jobs[0].id, low2.id);
        let second = store
            .list_jobs(&JobFilter {
                limit: 2,
                before: first.next,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(second.jobs.len(), 1);
        assert_eq!(second.jobs[0].id, low.id);
        assert_eq!(second.next, None);
        let queued = store
            .list_jobs(&JobFilter {
                state: Some(JobState::Running),
                limit: 10,
                before: None,
            })
            .await
            .unwrap();
        assert!(queued.jobs.is_empty());
    }

    #[tokio::test]
    async fn reopening_keeps_everything_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let j = job(None, 0, 5);
        {
            let store = SqliteStore::open(dir.path()).await.unwrap();
            store.create_job(&j, "h").await.unwrap();
        }
        let store = SqliteStore::open(dir.path()).await.unwrap();
        assert_eq!(store.job(&j.id).await.unwrap().unwrap(), j);
        assert_eq!(store.events_since(0, 10).await.unwrap().len(), 1);
        sqlx::raw_sql("PRAGMA user_version = 99")
            .execute(&store.writer)
            .await
            .unwrap();
        drop(store);
        let err = SqliteStore::open(dir.path()).await.err().unwrap();
        assert!(
            matches!(
                err,
                Error::SchemaTooNew {
                    found: 99,
                    known: 1
                }
            ),
            "{err}"
        );
    }
}
