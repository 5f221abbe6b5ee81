//! The embedded store's group commit: every job write of a group in one transaction on
//! the one write connection, updates and event inserts as multi-row statements.

use async_trait::async_trait;
use gantry_core::{EventKind, JobState, Millis};
use sqlx::{Row, SqlitePool};
use std::collections::{HashMap, HashSet};

use crate::rows::{job_of, EventRows, JobRow};
use crate::writer::{finish, rounds, Committer, Done, Op, Write};
use crate::{Created, Error, Event, Result};

/// The writer connection, committing groups.
pub(super) struct Sqlite(pub(super) SqlitePool);

#[async_trait]
impl Committer for Sqlite {
    async fn commit(&mut self, batch: &[Write]) -> Result<Vec<Result<Done>>> {
        run_group(&self.0, batch).await
    }
}

/// One transaction for a group of writes; each write's own refusal (a conflict, a
/// duplicate key) is its outcome and leaves the others alone.
///
/// Updates and event inserts go in multi-row statements: a statement's fixed cost (a
/// hop to the connection's thread) then counts once per group, not once per write. A
/// job written twice in one group is written in two rounds, in order.
async fn run_group(pool: &SqlitePool, batch: &[Write]) -> Result<Vec<Result<Done>>> {
    const UPDATE_ROWS: usize = 100;
    const CREATE_ROWS: usize = 100;
    const EVENT_ROWS: usize = 200;
    let mut tx = pool.begin().await?;
    let mut outcomes: Vec<Option<Result<Done>>> = (0..batch.len()).map(|_| None).collect();
    let rounds = rounds(batch);
    let last_round = rounds.iter().copied().max().unwrap_or(0);
    for round in 0..=last_round {
        let items: Vec<usize> = (0..batch.len()).filter(|i| rounds[*i] == round).collect();
        let mut with_events: Vec<usize> = Vec::new();
        // New jobs without an idempotency key (nothing to look up first) go in multi-row
        // inserts; their events join the updates' below.
        let plain = |i: usize| -> Option<NewRow<'_>> {
            match &batch[i].op {
                Op::Create {
                    row,
                    spec,
                    request_hash,
                    ..
                } if row.idempotency_key.is_none() => Some((row, spec, request_hash)),
                _ => None,
            }
        };
        let plains: Vec<usize> = items
            .iter()
            .copied()
            .filter(|i| plain(*i).is_some())
            .collect();
        for chunk in plains.chunks(CREATE_ROWS) {
            let rows: Vec<NewRow<'_>> = chunk.iter().filter_map(|i| plain(*i)).collect();
            if insert_jobs(&mut tx, &rows).await.is_ok() {
                with_events.extend_from_slice(chunk);
                continue;
            }
            // A row the statement refused (a duplicate id) fails that job alone: SQLite
            // undoes the failed statement, not the transaction, so each goes again alone.
            for &i in chunk {
                if let Op::Create {
                    row,
                    spec,
                    request_hash,
                    events,
                } = &batch[i].op
                {
                    outcomes[i] = Some(create(&mut tx, row, spec, request_hash, events).await);
                }
            }
        }
        for &i in &items {
            match &batch[i].op {
                Op::Create { .. } if plain(i).is_some() => {}
                Op::Create {
                    row,
                    spec,
                    request_hash,
                    events,
                } => outcomes[i] = Some(create(&mut tx, row, spec, request_hash, events).await),
                Op::Append { .. } => with_events.push(i),
                Op::Purge { before, limit } => {
                    outcomes[i] = Some(purge(&mut tx, *before, *limit).await)
                }
                Op::Update { .. } => {}
            }
        }
        let updates: Vec<usize> = items
            .iter()
            .copied()
            .filter(|i| matches!(batch[*i].op, Op::Update { .. }))
            .collect();
        for chunk in updates.chunks(UPDATE_ROWS) {
            let rows: Vec<&JobRow> = chunk
                .iter()
                .filter_map(|i| match &batch[*i].op {
                    Op::Update { row, .. } => Some(row),
                    _ => None,
                })
                .collect();
            let mut sql =
                String::from("WITH v(id, state, not_before, version, updated_at, doc) AS (VALUES ");
            for n in 0..rows.len() {
                sql.push_str(if n == 0 {
                    "(?, ?, ?, ?, ?, ?)"
                } else {
                    ", (?, ?, ?, ?, ?, ?)"
                });
            }
            sql.push_str(
                ") UPDATE jobs SET state = v.state, not_before = v.not_before, \
                 version = v.version, updated_at = v.updated_at, doc = v.doc \
                 FROM v WHERE jobs.id = v.id AND jobs.version = v.version - 1 RETURNING jobs.id",
            );
            let mut q = sqlx::query_scalar::<_, String>(&sql);
            for row in &rows {
                q = q
                    .bind(row.id.as_str())
                    .bind(row.state.as_str())
                    .bind(row.not_before)
                    .bind(row.version)
                    .bind(row.updated_at)
                    .bind(&row.doc);
            }
            let updated: HashSet<String> = q.fetch_all(&mut *tx).await?.into_iter().collect();
            for (&i, row) in chunk.iter().zip(&rows) {
                if updated.contains(row.id.as_str()) {
                    with_events.push(i);
                } else {
                    outcomes[i] = Some(Err(row.conflict()));
                }
            }
        }
        // Events in the order their writes came.
        with_events.sort_unstable();
        let rows: Vec<(usize, &EventRows, JobState, &EventKind, &String)> = with_events
            .iter()
            .flat_map(|&i| {
                let events = match &batch[i].op {
                    Op::Update { events, .. }
                    | Op::Append { events }
                    | Op::Create { events, .. } => Some(events),
                    Op::Purge { .. } => None,
                };
                events
                    .into_iter()
                    .flat_map(move |e| e.kinds.iter().map(move |(s, k, d)| (i, e, *s, k, d)))
            })
            .collect();
        let mut done: HashMap<usize, Vec<Event>> =
            with_events.iter().map(|i| (*i, Vec::new())).collect();
        for chunk in rows.chunks(EVENT_ROWS) {
            let mut sql = String::from("INSERT INTO events (job_id, at, state, data) VALUES ");
            for n in 0..chunk.len() {
                sql.push_str(if n == 0 {
                    "(?, ?, ?, ?)"
                } else {
                    ", (?, ?, ?, ?)"
                });
            }
            let mut q = sqlx::query(&sql);
            for (_, e, state, _, data) in chunk {
                q = q
                    .bind(e.job_id.as_str())
                    .bind(e.at)
                    .bind(state.as_str())
                    .bind(data.as_str());
            }
            let result = q.execute(&mut *tx).await?;
            // One statement, one writer: AUTOINCREMENT numbers its rows consecutively.
            let first = result.last_insert_rowid() - chunk.len() as i64 + 1;
            for (n, (i, e, state, kind, _)) in chunk.iter().enumerate() {
                if let Some(list) = done.get_mut(i) {
                    list.push(Event {
                        seq: first + n as i64,
                        job_id: e.job_id.clone(),
                        at: e.at,
                        state: *state,
                        kind: (*kind).clone(),
                    });
                }
            }
        }
        for (i, mut events) in done {
            outcomes[i] = Some(match &batch[i].op {
                Op::Create { .. } if events.is_empty() => Err(Error::Database(
                    sqlx::Error::Protocol("a new job needs its first event".into()),
                )),
                Op::Create { .. } => Ok(Done::Created(Created::New(events.remove(0)))),
                _ => Ok(Done::Events(events)),
            });
        }
    }
    tx.commit().await?;
    Ok(finish(outcomes))
}

/// A new job's row as `insert_jobs` writes it: the row, its spec, its request's hash.
type NewRow<'a> = (&'a JobRow, &'a str, &'a str);

/// Insert new jobs' rows in one statement.
async fn insert_jobs(tx: &mut sqlx::SqliteConnection, rows: &[NewRow<'_>]) -> Result<()> {
    let mut sql = String::from(
        "INSERT INTO jobs (id, state, priority, not_before, version, idempotency_key, \
         request_hash, created_at, updated_at, spec, doc) VALUES ",
    );
    for n in 0..rows.len() {
        sql.push_str(if n == 0 {
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        } else {
            ", (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        });
    }
    let mut q = sqlx::query(&sql);
    for (row, spec, request_hash) in rows {
        q = q
            .bind(row.id.as_str())
            .bind(row.state.as_str())
            .bind(row.priority)
            .bind(row.not_before)
            .bind(row.version)
            .bind(row.idempotency_key.as_deref())
            .bind(*request_hash)
            .bind(row.created_at)
            .bind(row.updated_at)
            .bind(*spec)
            .bind(row.doc.as_str());
    }
    q.execute(&mut *tx).await?;
    Ok(())
}

/// Delete up to `limit` terminal jobs last changed before `before`, with their events.
async fn purge(tx: &mut sqlx::SqliteConnection, before: Millis, limit: u32) -> Result<Done> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') \
         AND updated_at < ? ORDER BY updated_at LIMIT ?",
    )
    .bind(before)
    .bind(limit as i64)
    .fetch_all(&mut *tx)
    .await?;
    for chunk in ids.chunks(500) {
        let marks = vec!["?"; chunk.len()].join(", ");
        for table in [
            "events WHERE job_id",
            "deliveries WHERE job_id",
            "jobs WHERE id",
        ] {
            let sql = format!("DELETE FROM {table} IN ({marks})");
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            q.execute(&mut *tx).await?;
        }
    }
    Ok(Done::Purged(ids.len() as u64))
}

/// Insert a new job, unless its idempotency key is taken: then answer the job that has it.
async fn create(
    tx: &mut sqlx::SqliteConnection,
    row: &JobRow,
    spec: &str,
    request_hash: &str,
    events: &EventRows,
) -> Result<Done> {
    if let Some(key) = &row.idempotency_key {
        let existing = sqlx::query("SELECT * FROM jobs WHERE idempotency_key = ?")
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(found) = existing {
            let stored_hash: &str = found.try_get("request_hash")?;
            return Ok(Done::Created(Created::Existing {
                job: Box::new(job_of(&found)?),
                same_request: stored_hash == request_hash,
            }));
        }
    }
    insert_jobs(tx, &[(row, spec, request_hash)]).await?;
    let mut events = insert_events(tx, events).await?;
    if events.is_empty() {
        return Err(Error::Database(sqlx::Error::Protocol(
            "a new job needs its first event".into(),
        )));
    }
    Ok(Done::Created(Created::New(events.remove(0))))
}

/// Insert one job's events, one statement each (a create has one).
async fn insert_events(tx: &mut sqlx::SqliteConnection, rows: &EventRows) -> Result<Vec<Event>> {
    let mut out = Vec::with_capacity(rows.kinds.len());
    for (state, kind, data) in &rows.kinds {
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO events (job_id, at, state, data) VALUES (?, ?, ?, ?) RETURNING seq",
        )
        .bind(rows.job_id.as_str())
        .bind(rows.at)
        .bind(state.as_str())
        .bind(data)
        .fetch_one(&mut *tx)
        .await?;
        out.push(Event {
            seq,
            job_id: rows.job_id.clone(),
            at: rows.at,
            state: *state,
            kind: kind.clone(),
        });
    }
    Ok(out)
}
