//! How the store's records become rows and come back: a job as its immutable spec and
//! its changing document, events, tokens, run-time backends and node statistics. Both
//! databases store the same columns, so this is written once, over any sqlx row.

use gantry_core::{EventKind, Job, JobId, JobState, Millis};
use serde_json::Value;
use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::{BackendRecord, Error, Event, JobPage, Result, TokenRecord};

/// A job row as it is written, serialised by the caller (off the writer's task). The
/// spec is not here: it is written once, with the job's creation.
pub(crate) struct JobRow {
    pub id: JobId,
    pub state: JobState,
    pub priority: i32,
    pub not_before: Millis,
    pub version: i64,
    pub idempotency_key: Option<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub doc: String,
}

impl JobRow {
    pub fn of(job: &Job) -> Result<JobRow> {
        Ok(JobRow {
            id: job.id.clone(),
            state: job.state,
            priority: job.spec.priority,
            not_before: job.not_before,
            version: job.version as i64,
            idempotency_key: job.spec.idempotency_key.clone(),
            created_at: job.created_at,
            updated_at: job.updated_at,
            doc: doc_of(job)?,
        })
    }

    /// The refusal of a write of this row whose stored version was not the one before.
    pub fn conflict(&self) -> Error {
        Error::Conflict {
            id: self.id.clone(),
            expected: self.version.saturating_sub(1) as u64,
        }
    }
}

/// Events to insert for one job, with their JSON, each with the job's state after it
/// (several state changes may be committed in one write).
pub(crate) struct EventRows {
    pub job_id: JobId,
    pub at: Millis,
    pub kinds: Vec<(JobState, EventKind, String)>,
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
            at,
            kinds: kinds
                .iter()
                .map(|k| Ok((state, k.clone(), serde_json::to_string(k)?)))
                .collect::<Result<_>>()?,
        })
    }

    /// The events of several state changes in a row: each step's events with the state
    /// that step left the job in.
    pub fn steps(
        job_id: &JobId,
        at: Millis,
        steps: &[(JobState, Vec<EventKind>)],
    ) -> Result<EventRows> {
        Ok(EventRows {
            job_id: job_id.clone(),
            at,
            kinds: steps
                .iter()
                .flat_map(|(state, kinds)| kinds.iter().map(move |k| (*state, k)))
                .map(|(state, k)| Ok((state, k.clone(), serde_json::to_string(k)?)))
                .collect::<Result<_>>()?,
        })
    }

    /// The persisted events, numbered from `first`.
    pub fn numbered(&self, first: i64) -> Vec<Event> {
        self.kinds
            .iter()
            .enumerate()
            .map(|(n, (state, kind, _))| Event {
                seq: first + n as i64,
                job_id: self.job_id.clone(),
                at: self.at,
                state: *state,
                kind: kind.clone(),
            })
            .collect()
    }
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

/// A job from a row with its `spec` and `doc` columns.
pub(crate) fn job_of<R: Row>(row: &R) -> Result<Job>
where
    for<'r> &'r str: Decode<'r, R::Database> + Type<R::Database>,
    for<'n> &'n str: ColumnIndex<R>,
{
    job_from(row.try_get("spec")?, row.try_get("doc")?)
}

/// An event from a row with the columns of the events table.
pub(crate) fn event_of<R: Row>(row: &R) -> Result<Event>
where
    for<'r> &'r str: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'n> &'n str: ColumnIndex<R>,
{
    let job_id: &str = row.try_get("job_id")?;
    let state: &str = row.try_get("state")?;
    Ok(Event {
        seq: row.try_get("seq")?,
        job_id: JobId::parse(job_id).ok_or_else(|| {
            Error::Corrupt(serde::de::Error::custom(format!("bad job id {job_id}")))
        })?,
        at: row.try_get("at")?,
        state: state_of(state)?,
        kind: serde_json::from_str(row.try_get("data")?)?,
    })
}

/// A page of `list_jobs` from rows newest first (`limit` asked for): the next page starts
/// below the last row's `ord` when the page is full.
pub(crate) fn page_of<R: Row>(rows: &[R], limit: i64) -> Result<JobPage>
where
    for<'r> &'r str: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'n> &'n str: ColumnIndex<R>,
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

/// `count_by_state` from its rows.
pub(crate) fn counts_of(rows: Vec<(String, i64)>) -> Result<Vec<(JobState, u64)>> {
    rows.into_iter()
        .map(|(state, n)| Ok((state_of(&state)?, n as u64)))
        .collect()
}

/// A token's row: id, name, scope, hash, created_at, revoked_at.
pub(crate) type TokenRow = (String, String, String, String, i64, Option<i64>);

pub(crate) fn token_from(row: TokenRow) -> Result<TokenRecord> {
    let (id, name, scope, hash, created_at, revoked_at) = row;
    let scope = gantry_core::auth::Scope::parse(&scope)
        .ok_or_else(|| Error::Invalid(format!("token {id} has an unknown scope {scope:?}")))?;
    Ok(TokenRecord {
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

pub(crate) fn backend_from(row: BackendRow) -> Result<BackendRecord> {
    let (name, url, tags, priority, added_at) = row;
    Ok(BackendRecord {
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
