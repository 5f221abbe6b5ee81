//! The shared store's group commit: every job write of a group in one transaction,
//! safe with several coordinators writing at once.
//!
//! Job rows a group updates are locked first and in id order, so two coordinators'
//! groups never deadlock on each other; a claim skips a row another coordinator holds
//! (`SKIP LOCKED`). A fenced update checks its lease in the writing statement. Event
//! numbers are taken from a one-row counter as the last step before the commit: its row
//! lock is held until the commit is visible, so numbers become visible in order across
//! every coordinator, and a reader that has seen event N never later finds a smaller one
//! committing behind it (a plain sequence hands out numbers at insert and commits them
//! out of order).

use async_trait::async_trait;
use gantry_core::{Job, Millis};
use sqlx::postgres::PgPool;
use sqlx::Row;
use std::collections::{HashMap, HashSet};

use super::EVENTS_CHANNEL;
use crate::rows::{job_of, EventRows, JobRow};
use crate::writer::{finish, rounds, Committer, Done, Op, Write};
use crate::{Created, Error, Fence, Result};

/// The writer's side of the pool.
pub(super) struct Postgres(pub(super) PgPool);

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
            for (event_state, _, json) in &events.kinds {
                job_id.push(events.job_id.as_str());
                at.push(events.at);
                state.push(event_state.as_str());
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
