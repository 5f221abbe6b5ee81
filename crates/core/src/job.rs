//! Jobs and attempts: what a client submitted, what gantry did with it, and the
//! values that fence every change (state, attempt number, version).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use utoipa::ToSchema;

use crate::workflow::Workflow;

pub use crate::clock::Millis;

/// A job's id: a UUID, parsed at the edge.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    pub fn random() -> JobId {
        JobId(uuid::Uuid::new_v4().to_string())
    }

    pub fn parse(s: &str) -> Option<JobId> {
        uuid::Uuid::parse_str(s)
            .ok()
            .map(|u| JobId(u.hyphenated().to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for JobId {
    type Error = String;
    fn try_from(s: String) -> Result<JobId, String> {
        JobId::parse(&s).ok_or_else(|| format!("not a job id: {s}"))
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> String {
        id.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        match self {
            JobState::Queued | JobState::Running => false,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled => true,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-job timeouts in milliseconds; `None` falls back to the backend's or the global
/// value, `Some(0)` disables the timer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submit_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_progress_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_stall_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<u64>,
}

/// The longest limit gantry takes, in milliseconds: ten years. A longer one is no limit
/// in practice, and the bound keeps `now + limit` far from overflowing, on the wall
/// clock (milliseconds in an `i64`) and on the monotonic one.
pub const MAX_LIMIT_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

impl Timeouts {
    /// The first limit over `MAX_LIMIT_MS`, as (its field, its value).
    pub fn over_max(&self) -> Option<(&'static str, u64)> {
        [
            ("submit_ms", self.submit_ms),
            ("start_ms", self.start_ms),
            ("first_progress_ms", self.first_progress_ms),
            ("node_stall_ms", self.node_stall_ms),
            ("deadline_ms", self.deadline_ms),
            ("queue_ms", self.queue_ms),
        ]
        .into_iter()
        .find_map(|(field, ms)| ms.filter(|ms| *ms > MAX_LIMIT_MS).map(|ms| (field, ms)))
    }

    /// `self` where set, else `fallback`.
    pub fn or(&self, fallback: &Timeouts) -> Timeouts {
        Timeouts {
            submit_ms: self.submit_ms.or(fallback.submit_ms),
            start_ms: self.start_ms.or(fallback.start_ms),
            first_progress_ms: self.first_progress_ms.or(fallback.first_progress_ms),
            node_stall_ms: self.node_stall_ms.or(fallback.node_stall_ms),
            deadline_ms: self.deadline_ms.or(fallback.deadline_ms),
            queue_ms: self.queue_ms.or(fallback.queue_ms),
        }
    }
}

/// What the client asked for; never changes after the job is accepted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub workflow: Workflow,
    pub priority: i32,
    pub max_attempts: u32,
    pub tags: Vec<String>,
    pub timeouts: Timeouts,
    pub idempotency_key: Option<String>,
    pub metadata: Map<String, Value>,
    /// The id of the API token that submitted it, when the server asks for tokens: only
    /// that token (or an admin one) may cancel it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Input files the workflow names by `name`; uploaded to each backend before each
    /// attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
    /// Where to POST the job's outcome (and progress, if asked); the server's default
    /// callback applies when this is `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<Callback>,
    /// A command job (`kind: command`): a program run by an agent that allows it, instead
    /// of a workflow (whose graph is then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandSpec>,
}

/// A program an agent runs for a command job (a model download, a worker install): run
/// without a shell, in its own process group, killed with its whole group (SIGTERM,
/// then SIGKILL) on cancel or timeout. The API takes and shows it as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// The program (`argv[0]`, matched exactly against each agent's allow-list) and its
    /// arguments.
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// Where it runs (absolute); the agent's own directory when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Names the operation's timeout in `[timeouts.command]` (`model_download`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// The job's own limit on the run, over the operation's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl CommandSpec {
    pub fn program(&self) -> &str {
        self.argv.first().map_or("", String::as_str)
    }
}

/// How a command ended: its exit code (or the signal that ended it) and the last lines
/// it wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CommandResult {
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Its last lines of output, stdout and stderr interleaved as written, oldest first.
    pub tail: Vec<String>,
    /// Its whole output as the coordinator heard it (up to 8 MiB), kept by content:
    /// `GET /v1/jobs/{id}/log`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<CommandLog>,
}

/// A command's output file in gantry's content store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CommandLog {
    pub sha256: String,
    pub size: u64,
}

/// A webhook: the URL gantry POSTs to on the listed events, signed when `secret` is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Callback {
    pub url: String,
    /// Any of `succeeded`, `failed`, `cancelled`, `progress`.
    pub events: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl Callback {
    /// The events a callback can ask for.
    pub const EVENTS: [&'static str; 4] = ["succeeded", "failed", "cancelled", "progress"];

    pub fn wants(&self, event: &str) -> bool {
        self.events.iter().any(|e| e == event)
    }
}

/// An input file a job carries, kept by content in gantry's data dir.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The value the workflow's inputs use for it (`"image": "face.png"`).
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

/// Why a job or an attempt failed, in the API's error shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub details: Value,
}

impl JobError {
    pub fn new(code: &str, message: impl Into<String>) -> JobError {
        JobError {
            code: code.to_owned(),
            message: message.into(),
            details: Value::Null,
        }
    }

    pub fn with_details(mut self, details: Value) -> JobError {
        self.details = details;
        self
    }
}

/// A file a job produced, kept by content in gantry's data dir.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// Unique within the job; the last segment of its URL.
    pub name: String,
    pub node_id: String,
    pub filename: String,
    pub subfolder: String,
    /// ComfyUI's folder type: `output` or `temp`.
    pub kind: String,
    pub sha256: String,
    pub size: u64,
}

/// A backend this job must not go to again, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Exclusion {
    pub backend: String,
    pub reason: ExclusionReason,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExclusionReason {
    /// The backend does not list a model file the workflow names.
    MissingModel {
        node: String,
        input: String,
        value: String,
    },
    /// The backend does not know a node class the workflow uses.
    MissingClass { node: String, class_type: String },
    /// A node raised an exception on this backend; it may work on another.
    NodeFailed {
        node: String,
        exception_type: String,
    },
    /// The agent refused to run the command's program (not on its allow-list).
    NotAllowed { program: String },
}

impl fmt::Display for ExclusionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExclusionReason::MissingModel { node, input, value } => {
                write!(
                    f,
                    "model {value:?} (node {node} input {input}) not installed"
                )
            }
            ExclusionReason::MissingClass { node, class_type } => {
                write!(f, "node class {class_type} (node {node}) not installed")
            }
            ExclusionReason::NodeFailed {
                node,
                exception_type,
            } => write!(f, "node {node} raised {exception_type}"),
            ExclusionReason::NotAllowed { program } => {
                write!(f, "does not allow program {program:?}")
            }
        }
    }
}

/// Where one attempt is. Attempts are numbered from 1 and only the job's latest attempt
/// may still be live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptStatus {
    /// Sending `POST /prompt`.
    Submitting,
    /// Accepted by the backend, waiting in its queue.
    Pending,
    /// `execution_start` seen.
    Executing,
    Succeeded,
    Failed,
    Cancelled,
}

impl AttemptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptStatus::Submitting => "submitting",
            AttemptStatus::Pending => "pending",
            AttemptStatus::Executing => "executing",
            AttemptStatus::Succeeded => "succeeded",
            AttemptStatus::Failed => "failed",
            AttemptStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_live(self) -> bool {
        match self {
            AttemptStatus::Submitting | AttemptStatus::Pending | AttemptStatus::Executing => true,
            AttemptStatus::Succeeded | AttemptStatus::Failed | AttemptStatus::Cancelled => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub number: u32,
    pub backend: String,
    /// Chosen by gantry before the submit, so the prompt can be found whatever happens.
    pub prompt_id: String,
    pub status: AttemptStatus,
    pub created_at: Millis,
    pub submitted_at: Option<Millis>,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    pub error: Option<JobError>,
    /// Whether this attempt counts against `max_attempts` (a backend that lacks a model
    /// does not use up the job's tries).
    pub counted: bool,
    /// Every node's timing, set when the attempt ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Box<crate::profile::AttemptProfile>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    pub state: JobState,
    /// Bumped by every change; the store updates only when it still holds `version - 1`.
    pub version: u64,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// A re-queued job waits for its backoff before it may be dispatched again.
    pub not_before: Millis,
    pub cancel_requested: bool,
    pub attempts: Vec<Attempt>,
    pub excluded: Vec<Exclusion>,
    pub error: Option<JobError>,
    pub outputs: Vec<Output>,
    /// Something a client should know that is not an error ("cancel came too late").
    pub note: Option<String>,
    /// A command job's outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<CommandResult>,
}

impl Job {
    pub fn new(id: JobId, spec: JobSpec, now: Millis) -> Job {
        Job {
            id,
            spec,
            state: JobState::Queued,
            version: 1,
            created_at: now,
            updated_at: now,
            not_before: now,
            cancel_requested: false,
            attempts: Vec::new(),
            excluded: Vec::new(),
            error: None,
            outputs: Vec::new(),
            note: None,
            result: None,
        }
    }

    pub fn current_attempt(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    pub fn attempt(&self, number: u32) -> Option<&Attempt> {
        self.attempts.iter().find(|a| a.number == number)
    }

    /// The latest attempt when it is still live: the one a driver is watching.
    pub fn live_attempt(&self) -> Option<&Attempt> {
        self.attempts.last().filter(|a| a.status.is_live())
    }

    pub fn attempts_used(&self) -> u32 {
        self.attempts.iter().filter(|a| a.counted).count() as u32
    }

    pub fn is_excluded(&self, backend: &str) -> bool {
        self.excluded.iter().any(|e| e.backend == backend)
    }
}

impl crate::profile::AttemptTimes for Attempt {
    fn prompt_id(&self) -> &str {
        &self.prompt_id
    }

    fn created_at(&self) -> Millis {
        self.created_at
    }

    fn submitted_at(&self) -> Option<Millis> {
        self.submitted_at
    }

    fn started_at(&self) -> Option<Millis> {
        self.started_at
    }

    fn finished_at(&self) -> Option<Millis> {
        self.finished_at
    }
}
