//! gantry's durable store: the `Store` trait the engine writes through, its embedded
//! SQLite implementation, and PostgreSQL for farms with several coordinators, whose
//! backend leases are behind `Leases`.
//!
//! Every change to a job is one conditional update (it applies only if the stored version
//! is the one the change was computed from) with its event rows in the same transaction,
//! so a job's row and its history never disagree and two writers never both win.
//!
//! Both stores are one `Store` implementation (`sql`) over what each database declares
//! differently; their job writes go through a writer task each (`writer`) that commits
//! them in groups, in each store's own `commit` module.

mod leases;
mod postgres;
mod rows;
mod sql;
mod sqlite;
pub mod stats;
pub mod testing;
mod writer;

use async_trait::async_trait;
use gantry_core::auth::Scope;
use gantry_core::{EventKind, Job, JobId, JobState, Millis};
use serde::Serialize;
use serde_json::Value;

pub use leases::{DispatchRecord, Lease, Leases};
pub use postgres::{PgStore, EVENTS_CHANNEL, SCHEMA_VERSION as PG_SCHEMA_VERSION};
pub use sqlite::{SqliteStore, SCHEMA_VERSION as SQLITE_SCHEMA_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job changed since it was read: reload and recompute.
    #[error("job {id} changed concurrently (expected version {expected})")]
    Conflict { id: JobId, expected: u64 },
    #[error("no job {0}")]
    NotFound(JobId),
    /// The write's lease on its backend is gone (expired, or taken over): this
    /// coordinator no longer drives that backend and must change nothing about it.
    #[error(
        "job {id}: the lease on backend {backend} (token {token}) is no longer this coordinator's"
    )]
    Fenced {
        id: JobId,
        backend: String,
        token: i64,
    },
    /// The embedded store has one coordinator and no leases.
    #[error("the embedded store has no leases: a fenced write belongs to a postgres farm")]
    NoLeases,
    #[error("the store's schema is version {found}, newer than this gantry knows ({known}): upgrade gantry")]
    SchemaTooNew { found: i64, known: i64 },
    /// The database cannot be reached (or its group of writes was cut off): nothing
    /// of the write is known to have committed; try again once it is back.
    #[error("the store is unreachable: {0}")]
    Unavailable(String),
    #[error("store: {0}")]
    Database(#[from] sqlx::Error),
    #[error("store: a stored record does not decode: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("store: a stored record is not valid: {0}")]
    Invalid(String),
}

impl Error {
    /// The database is unreachable, not refusing: worth holding the write and trying
    /// again.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Unavailable(_) => true,
            Error::Database(e) => unreachable_db(e),
            _ => false,
        }
    }
}

fn unreachable_db(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // Connection exceptions, and a server shutting down or starting up.
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A persisted event: a state change (or a late input) with its place in the one global
/// sequence.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    pub seq: i64,
    pub job_id: JobId,
    pub at: Millis,
    /// The job's state after this event.
    pub state: JobState,
    pub kind: EventKind,
}

/// A write's proof that its coordinator drives the backend the write is about: the
/// lease's owner and fencing token, checked in the same statement as the write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub backend: String,
    pub owner: String,
    pub token: i64,
    /// The write claims a queued job for the backend: a job another coordinator is
    /// writing at that moment is skipped (`SKIP LOCKED`, answered as a conflict), not
    /// waited for, and the claim is recorded in the dispatch log.
    pub claim: bool,
}

/// The answer to `create_job`.
#[derive(Clone, Debug, PartialEq)]
pub enum Created {
    /// Committed, with its first event.
    New(Event),
    /// A job with this idempotency key exists; `same_request` says whether it was made
    /// from the same request body.
    Existing { job: Box<Job>, same_request: bool },
}

#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub limit: u32,
    /// Only jobs older than this position (from a previous page's `next`).
    pub before: Option<i64>,
}

#[derive(Clone, Debug)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    /// Where the next page starts, if there may be one.
    pub next: Option<i64>,
}

/// An API token as stored: only its hash, never the token itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public, shown by `gantry token list` and recorded as a job's owner.
    pub id: String,
    pub name: String,
    pub scope: Scope,
    /// SHA-256 of the whole token, hex.
    pub hash: String,
    pub created_at: Millis,
    pub revoked_at: Option<Millis>,
}

/// A backend added at run time (`POST /v1/backends`), kept so every coordinator, and
/// this one after a restart, drives it too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRecord {
    pub name: String,
    pub url: String,
    pub tags: Vec<String>,
    pub priority: i32,
    pub added_at: Millis,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Commit a new job and its `Queued` event, unless a job with the same idempotency key
    /// exists. `request_hash` identifies the request body for that comparison.
    async fn create_job(&self, job: &Job, request_hash: &str) -> Result<Created>;

    async fn job(&self, id: &JobId) -> Result<Option<Job>>;

    /// Newest first.
    async fn list_jobs(&self, filter: &JobFilter) -> Result<JobPage>;

    /// Store `job` if the stored version is `job.version - 1`, with `events` in the same
    /// transaction; `Error::Conflict` otherwise.
    async fn update_job(&self, job: &Job, events: &[EventKind]) -> Result<Vec<Event>>;

    /// As `update_job`, and only while `fence` holds: its lease is current and
    /// unexpired when the row is written (`Error::Fenced` otherwise).
    async fn update_job_fenced(
        &self,
        job: &Job,
        events: &[EventKind],
        fence: &Fence,
    ) -> Result<Vec<Event>>;

    /// As `update_job` (as `update_job_fenced` with a fence), for several state changes
    /// made at once and committed as one row write: `steps` holds each change's events
    /// with the job's state after it, and `job` is the job after the last.
    async fn update_job_steps(
        &self,
        job: &Job,
        steps: &[(JobState, Vec<EventKind>)],
        fence: Option<&Fence>,
    ) -> Result<Vec<Event>>;

    /// Record events that change no job (late inputs, a node's steps), stamped with
    /// the job's state `state`.
    async fn append_events(
        &self,
        job: &JobId,
        state: JobState,
        at: Millis,
        events: &[EventKind],
    ) -> Result<Vec<Event>>;

    /// Delete up to `limit` finished jobs last changed before `before`, with their
    /// events; answers how many were deleted. Queued and running jobs are never touched.
    async fn purge_finished(&self, before: Millis, limit: u32) -> Result<u64>;

    /// How many jobs are in each state (states with none are left out).
    async fn count_by_state(&self) -> Result<Vec<(JobState, u64)>>;

    /// Queued jobs in dispatch order: priority (higher first), then submission order.
    async fn queued_jobs(&self, limit: u32) -> Result<Vec<Job>>;

    /// Every job in `running`, for reconciliation after a restart.
    async fn running_jobs(&self) -> Result<Vec<Job>>;

    /// The events of one job after `after_seq`, in order.
    async fn job_events(&self, id: &JobId, after_seq: i64) -> Result<Vec<Event>>;

    /// The number of the newest committed event (0 before the first): every event up
    /// to it is visible to `events_since`.
    async fn last_seq(&self) -> Result<i64>;

    /// All events after `after_seq`, in order, at most `limit`.
    async fn events_since(&self, after_seq: i64, limit: u32) -> Result<Vec<Event>>;

    /// Keep a new token (its id and hash are unique).
    async fn create_token(&self, token: &TokenRecord) -> Result<()>;

    /// The token with this hash, revoked or not.
    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>>;

    /// Every token, oldest first.
    async fn tokens(&self) -> Result<Vec<TokenRecord>>;

    /// Revoke token `id` at `at`; false when there is no such token or it was revoked.
    async fn revoke_token(&self, id: &str, at: Millis) -> Result<bool>;

    /// How many tokens are not revoked: with none, the API asks for no token.
    async fn active_tokens(&self) -> Result<u64>;

    /// Keep a backend added at run time; false (and nothing kept) when one of that name
    /// or that URL was added before.
    async fn add_backend(&self, backend: &BackendRecord) -> Result<bool>;

    /// The backends added at run time, oldest first.
    async fn added_backends(&self) -> Result<Vec<BackendRecord>>;

    /// Fold these per-node samples into the per-hour aggregates.
    async fn record_node_stats(&self, samples: &[stats::NodeSample]) -> Result<()>;

    /// The per-hour aggregates that match `filter`.
    async fn node_stats(&self, filter: &stats::StatsFilter) -> Result<Vec<stats::NodeStats>>;

    /// Drop the aggregates of hours that ended before `before`; answers how many.
    async fn purge_node_stats(&self, before: Millis) -> Result<u64>;

    /// Records one attempt to deliver a job's callback (a JSON document the server
    /// shapes); kept with the job and purged with it.
    async fn record_delivery(&self, job: &JobId, at: Millis, delivery: &Value) -> Result<()>;

    /// A job's callback delivery attempts, oldest first.
    async fn deliveries(&self, job: &JobId) -> Result<Vec<Value>>;
}
