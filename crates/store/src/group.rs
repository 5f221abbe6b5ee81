//! What both stores share: how a job and its events become rows, and the writer task
//! that commits writes in groups.
//!
//! Every write goes to one writer task per store, which takes whatever writes queued up
//! while the previous commit was syncing and commits them in one transaction, each still
//! conditional on its own and answered only after the commit is durable. One sync for
//! many writes is what lets a 202 mean "on disk" at thousands of jobs a second.

use async_trait::async_trait;
use gantry_core::{EventKind, Job, JobId, JobState, Millis};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::{Created, Error, Event, Fence, JobPage, Result};

/// A job row as it is written, serialised by the caller (off the writer's task).
pub(crate) struct JobRow {
    pub id: JobId,
    pub state: JobState,
    pub priority: i32,
    pub not_before: Millis,
    pub version: i64,
    pub idempotency_key: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub spec: Option<String>,
    pub doc: String,
}

impl JobRow {
    pub fn of(job: &Job, with_spec: bool) -> Result<JobRow> {
        Ok(JobRow {
            id: job.id.clone(),
            state: job.state,
            priority: job.spec.priority,
            not_before: job.not_before,
            version: job.version as i64,
            idempotency_key: job.spec.idempotency_key.clone(),
            created_at: job.created_at,
            updated_at: job.updated_at,
            spec: if with_spec {
                Some(serde_json::to_string(&job.spec)?)
            } else {
                None
            },
            doc: doc_of(job)?,
        })
    }
}

/// Events to insert for one job, with their JSON.
pub(crate) struct EventRows {
    pub job_id: JobId,
    pub state: JobState,
    pub at: Millis,
    pub kinds: Vec<(EventKind, String)>,
}

impl EventRows {
    pub fn of(job: &Job, at: Millis, kinds: &[EventKind]) -> Result<EventRows> {
        EventRows::about(&job.id, job.state, at, kinds)
    }

    pub fn about(
        job_id: &JobId,
        state: JobState,
        at: Millis,
        kinds: &[EventKind],
    ) -> Result<EventRows> {
        Ok(EventRows {
            job_id: job_id.clone(),
            state,
            at,
            kinds: kinds
                .iter()
                .map(|k| Ok((k.clone(), serde_json::to_string(k)?)))
                .collect::<Result<_>>()?,
        })
    }

    /// The persisted events, numbered from `first`.
    pub fn numbered(&self, first: i64) -> Vec<Event> {
        self.kinds
            .iter()
            .enumerate()
            .map(|(n, (kind, _))| Event {
                seq: first + n as i64,
                job_id: self.job_id.clone(),
                at: self.at,
                state: self.state,
                kind: kind.clone(),
            })
            .collect()
    }
}

pub(crate) enum Op {
    Create {
        row: JobRow,
        request_hash: String,
        events: EventRows,
    },
    Update {
        row: JobRow,
        events: EventRows,
        fence: Option<Fence>,
    },
    Append {
        events: EventRows,
    },
    /// Delete up to `limit` terminal jobs last changed before `before`, with their events.
    Purge {
        before: Millis,
        limit: u32,
    },
}

impl Op {
    /// The job the write is about, if one.
    pub fn job_id(&self) -> Option<&JobId> {
        match self {
            Op::Create { row, .. } | Op::Update { row, .. } => Some(&row.id),
            Op::Append { events } => Some(&events.job_id),
            Op::Purge { .. } => None,
        }
    }
}

pub(crate) enum Done {
    Created(Created),
    Events(Vec<Event>),
    Purged(u64),
}

pub(crate) struct Write {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Done>>,
}

/// The round of each write in a group: a job written twice in one group is written in
/// two rounds, in order, so each round touches a job at most once.
pub(crate) fn rounds(batch: &[Write]) -> Vec<usize> {
    let mut seen: std::collections::HashMap<&JobId, usize> = std::collections::HashMap::new();
    batch
        .iter()
        .map(|w| match w.op.job_id() {
            Some(id) => {
                let n = seen.entry(id).or_insert(0);
                *n += 1;
                *n - 1
            }
            None => 0,
        })
        .collect()
}

/// A store's way of committing one group of writes in one transaction. Each write's own
/// refusal (a conflict) is its outcome and leaves the others alone; an `Err` means
/// nothing of the group committed.
#[async_trait]
pub(crate) trait Committer: Send + 'static {
    async fn commit(&mut self, batch: &[Write]) -> Result<Vec<Result<Done>>>;
}

/// The most writes one transaction takes.
const MAX_GROUP: usize = 1024;

/// The sending side of a store's writer task.
pub(crate) struct Writer {
    tx: mpsc::UnboundedSender<Write>,
}

impl Writer {
    /// Start the writer task over `committer`; it ends when the `Writer` is dropped.
    pub fn spawn(committer: impl Committer) -> Writer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(committer, rx));
        Writer { tx }
    }

    pub async fn write(&self, op: Op) -> Result<Done> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Write { op, reply })
            .map_err(|_| Error::Database(sqlx::Error::PoolClosed))?;
        rx.await
            .map_err(|_| Error::Database(sqlx::Error::PoolClosed))?
    }

    pub async fn create(&self, job: &Job, request_hash: &str) -> Result<Created> {
        let op = Op::Create {
            row: JobRow::of(job, true)?,
            request_hash: request_hash.to_owned(),
            events: EventRows::of(
                job,
                job.created_at,
                &[EventKind::Queued {
                    priority: job.spec.priority,
                }],
            )?,
        };
        match self.write(op).await? {
            Done::Created(c) => Ok(c),
            Done::Events(_) | Done::Purged(_) => Err(unexpected("create")),
        }
    }

    pub async fn update(
        &self,
        job: &Job,
        events: &[EventKind],
        fence: Option<&Fence>,
    ) -> Result<Vec<Event>> {
        let op = Op::Update {
            row: JobRow::of(job, false)?,
            events: EventRows::of(job, job.updated_at, events)?,
            fence: fence.cloned(),
        };
        events_of(self.write(op).await?)
    }

    pub async fn append(
        &self,
        job: &JobId,
        state: JobState,
        at: Millis,
        events: &[EventKind],
    ) -> Result<Vec<Event>> {
        let op = Op::Append {
            events: EventRows::about(job, state, at, events)?,
        };
        events_of(self.write(op).await?)
    }

    pub async fn purge(&self, before: Millis, limit: u32) -> Result<u64> {
        match self.write(Op::Purge { before, limit }).await? {
            Done::Purged(n) => Ok(n),
            Done::Created(_) | Done::Events(_) => Err(unexpected("purge")),
        }
    }
}

fn unexpected(what: &str) -> Error {
    Error::Database(sqlx::Error::Protocol(format!(
        "a {what} was answered with another kind of outcome"
    )))
}

fn events_of(done: Done) -> Result<Vec<Event>> {
    match done {
        Done::Events(events) => Ok(events),
        Done::Created(_) | Done::Purged(_) => Err(unexpected("write of events")),
    }
}

/// Take every write that is waiting, commit them together, answer each.
async fn write_loop(mut committer: impl Committer, mut rx: mpsc::UnboundedReceiver<Write>) {
    let mut batch: Vec<Write> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let outcomes = match committer.commit(&batch).await {
            Ok(outcomes) => outcomes,
            Err(e) => {
                // Nothing of the group committed: every write in it fails alike.
                let unavailable = e.is_unavailable();
                let message = e.to_string();
                batch
                    .iter()
                    .map(|_| {
                        Err(if unavailable {
                            Error::Unavailable(message.clone())
                        } else {
                            Error::Database(sqlx::Error::Protocol(message.clone()))
                        })
                    })
                    .collect()
            }
        };
        for (w, outcome) in batch.drain(..).zip(outcomes) {
            let _ = w.reply.send(outcome);
        }
    }
}

/// Every write of a group gets an outcome, or says it was not carried out.
pub(crate) fn finish(outcomes: Vec<Option<Result<Done>>>) -> Vec<Result<Done>> {
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| {
                Err(Error::Database(sqlx::Error::Protocol(
                    "a write of the group was not carried out".into(),
                )))
            })
        })
        .collect()
}

/// The changing part of a job: everything but its spec, serialised without touching the
/// spec (which is written once, and may be large).
pub(crate) fn doc_of(job: &Job) -> Result<String> {
    #[derive(serde::Serialize)]
    struct Doc<'a> {
        id: &'a JobId,
        state: JobState,
        version: u64,
        created_at: Millis,
        updated_at: Millis,
        not_before: Millis,
        cancel_requested: bool,
        attempts: &'a [gantry_core::Attempt],
        excluded: &'a [gantry_core::Exclusion],
        error: &'a Option<gantry_core::JobError>,
        outputs: &'a [gantry_core::Output],
        note: &'a Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        result: &'a Option<gantry_core::CommandResult>,
    }
    // Every field but the spec: a field added to Job must be added here too.
    let Job {
        id,
        spec: _,
        state,
        version,
        created_at,
        updated_at,
        not_before,
        cancel_requested,
        attempts,
        excluded,
        error,
        outputs,
        note,
        result,
    } = job;
    Ok(serde_json::to_string(&Doc {
        id,
        state: *state,
        version: *version,
        created_at: *created_at,
        updated_at: *updated_at,
        not_before: *not_before,
        cancel_requested: *cancel_requested,
        attempts,
        excluded,
        error,
        outputs,
        note,
        result,
    })?)
}

/// A job from its stored spec and doc.
pub(crate) fn job_from(spec: &str, doc: &str) -> Result<Job> {
    let mut value: Value = serde_json::from_str(doc)?;
    if let Value::Object(map) = &mut value {
        map.insert("spec".to_owned(), serde_json::from_str(spec)?);
    }
    Ok(serde_json::from_value(value)?)
}

/// An event from its stored columns.
pub(crate) fn event_from(
    seq: i64,
    job_id: &str,
    at: Millis,
    state: &str,
    data: &str,
) -> Result<Event> {
    Ok(Event {
        seq,
        job_id: JobId::parse(job_id).ok_or_else(|| {
            Error::Corrupt(serde::de::Error::custom(format!("bad job id {job_id}")))
        })?,
        at,
        state: state_of(state)?,
        kind: serde_json::from_str(data)?,
    })
}

/// A page of `list_jobs` from rows newest first (`limit` asked for): the next page starts
/// below the last row's `ord` when the page is full.
pub(crate) fn page_of<R: sqlx::Row>(
    rows: &[R],
    limit: i64,
    job_of: impl Fn(&R) -> Result<Job>,
) -> Result<JobPage>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
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

/// A stored state name.
fn state_of(state: &str) -> Result<JobState> {
    JobState::parse(state)
        .ok_or_else(|| Error::Corrupt(serde::de::Error::custom(format!("bad state {state}"))))
}

/// The statement both stores answer `count_by_state` with.
pub(crate) const COUNT_BY_STATE: &str =
    "SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state";

/// `count_by_state` from its rows.
pub(crate) fn counts_of(rows: Vec<(String, i64)>) -> Result<Vec<(JobState, u64)>> {
    rows.into_iter()
        .map(|(state, n)| Ok((state_of(&state)?, n as u64)))
        .collect()
}

/// A token's row: id, name, scope, hash, created_at, revoked_at.
pub(crate) type TokenRow = (String, String, String, String, i64, Option<i64>);

pub(crate) const TOKEN_COLUMNS: &str = "id, name, scope, hash, created_at, revoked_at";

pub(crate) fn token_from(row: TokenRow) -> Result<crate::TokenRecord> {
    let (id, name, scope, hash, created_at, revoked_at) = row;
    let scope = gantry_core::auth::Scope::parse(&scope).ok_or_else(|| {
        crate::Error::Invalid(format!("token {id} has an unknown scope {scope:?}"))
    })?;
    Ok(crate::TokenRecord {
        id,
        name,
        scope,
        hash,
        created_at,
        revoked_at,
    })
}

/// A run-time backend's row: name, url, tags (JSON), priority, added_at.
pub(crate) type BackendRow = (String, String, String, i32, i64);

pub(crate) fn backend_from(row: BackendRow) -> Result<crate::BackendRecord> {
    let (name, url, tags, priority, added_at) = row;
    Ok(crate::BackendRecord {
        name,
        url,
        tags: serde_json::from_str(&tags)?,
        priority,
        added_at,
    })
}

/// A node_stats row: class, workflow, backend, hour, count, cached, failed, timed_out, sketch.
pub(crate) type StatsRow = (String, String, String, i64, i64, i64, i64, i64, String);

pub(crate) fn stats_from(row: StatsRow) -> Result<crate::stats::NodeStats> {
    let (class, workflow, backend, hour, count, cached, failed, timed_out, sketch) = row;
    Ok(crate::stats::NodeStats {
        class,
        workflow,
        backend,
        hour,
        count: count as u64,
        cached: cached as u64,
        failed: failed as u64,
        timed_out: timed_out as u64,
        sketch: crate::stats::decode_sketch(&sketch)?,
    })
}
