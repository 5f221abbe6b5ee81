//! The wire types of gantry's v1 HTTP API. The server builds its answers from these and
//! derives `/v1/openapi.json` from them; the client reads answers into them; so the
//! document, the server and the client cannot drift apart.
//!
//! Conventions: timestamps are RFC 3339 strings in UTC with milliseconds, durations are
//! integers with an `_ms` suffix, and every refusal is an [`ErrorBody`].

pub use gantry_core::auth::Scope;
pub use gantry_core::profile::{AttemptProfile, NodeProfile, NodeStatus};
pub use gantry_core::routing::WaitReason;
pub use gantry_core::{
    AttemptStatus, CommandResult, EventKind, Exclusion, ExclusionReason, JobError, JobState,
    Timeouts,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// Every refusal: `{"error": {code, message, details}}`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable reason (`invalid_field`, `not_found`, ...).
    pub code: String,
    /// What is wrong, for a person.
    pub message: String,
    /// What the refusal is about (the field, node, limit, ...); `{}` when nothing more.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub details: Value,
}

/// The body of `POST /v1/jobs`. Only `workflow` is required (`command` instead, for a
/// job of kind `command`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// `workflow` (the default) or `command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<JobKind>,
    /// An API-format ComfyUI workflow: node id → `{class_type, inputs}`.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    #[schema(value_type = Object)]
    pub workflow: Map<String, Value>,
    /// What a command job runs, on an agent that allows its program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandRequest>,
    /// Higher runs first; 0 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// From 1 to 100; the server's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100)]
    pub max_attempts: Option<u32>,
    /// A backend must carry every tag to run the job.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The job's own limit per phase, over the backend's and the server's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// A second submit with the same key returns the first job instead of a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 255)]
    pub idempotency_key: Option<String>,
    /// Kept with the job and shown back; gantry does not read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
    /// Input files the workflow names (`"image": "face.png"` in a LoadImage): each is
    /// uploaded to the backend before each attempt and the workflow's inputs renamed to
    /// where the backend put it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<AttachmentRequest>,
    /// A webhook for this job, instead of the server's default one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<CallbackRequest>,
}

/// Where gantry POSTs a job's outcome: a JSON body, signed with HMAC-SHA256 of the body
/// in `X-Gantry-Signature: sha256=HEX` when `secret` is set, retried with backoff on
/// failure or a non-2xx answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallbackRequest {
    /// http or https, to a host in the server's `[callback] allow_hosts` (loopback only
    /// when that list is empty).
    pub url: String,
    /// Any of `succeeded`, `failed`, `cancelled`, `progress`; the three terminal ones
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// A job's webhook as `GET /v1/jobs/{id}` shows it (never its secret).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobCallback {
    pub url: String,
    pub events: Vec<String>,
    /// Whether deliveries are signed.
    pub signed: bool,
    /// The server's default callback, not the job's own.
    pub default: bool,
}

/// An agent's supervised ComfyUI: its state, its recent output, its restarts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackendLogs {
    pub name: String,
    /// The agent's link is up.
    pub linked: bool,
    /// The agent runs ComfyUI as its child (`--spawn`).
    pub supervised: bool,
    /// The child's latest state (`starting`, `ready`, `crash_looping`, ...).
    #[schema(value_type = Object)]
    pub child: Value,
    /// Its latest output lines, oldest first.
    pub lines: Vec<String>,
    /// Each restart with its reason, oldest first.
    #[schema(value_type = Vec<Object>)]
    pub restarts: Vec<Value>,
}

/// One attempt to deliver a webhook.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Delivery {
    /// The same for every attempt of one delivery (also sent as `X-Gantry-Delivery`).
    pub delivery_id: String,
    pub event: String,
    /// From 1.
    pub attempt: u32,
    #[schema(format = DateTime)]
    pub at: String,
    pub url: String,
    /// The receiver's HTTP status, when it answered.
    pub status: Option<u16>,
    /// Why the attempt did not count as delivered.
    pub error: Option<String>,
    pub duration_ms: u64,
    pub delivered: bool,
    /// No more attempts will be made (delivered, or given up after the retry window).
    #[serde(rename = "final")]
    pub last: bool,
}

/// An input file of a job: the hash `POST /v1/files` answered, or its bytes inline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachmentRequest {
    /// The value the workflow's file inputs use for it; at most 255 bytes, no `/`.
    pub name: String,
    /// The SHA-256 (hex) that `POST /v1/files` answered. Exactly one of `sha256` and
    /// `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The file's bytes in base64 (standard alphabet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// A file gantry keeps by content: the answer of `POST /v1/files`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StoredFile {
    /// SHA-256 of the bytes, hex: what a job's attachment refers to.
    pub sha256: String,
    pub size: u64,
}

/// A job's input file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobAttachment {
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

/// What a job runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// A ComfyUI workflow.
    #[default]
    Workflow,
    /// A program run by an agent (`gantry agent --allow PROGRAM`).
    Command,
}

/// A command job's program: core's own type, taken and shown as it is.
pub type CommandRequest = gantry_core::CommandSpec;

impl SubmitRequest {
    /// The body's field names, in the order the document lists them.
    pub const FIELDS: &'static [&'static str] = &[
        "kind",
        "workflow",
        "command",
        "priority",
        "max_attempts",
        "tags",
        "timeouts",
        "idempotency_key",
        "metadata",
        "attachments",
        "callback",
    ];
}

/// The answer to a new submit (HTTP 202).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub id: String,
    pub state: JobState,
}

/// A job as `GET /v1/jobs/{id}` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: String,
    #[serde(default)]
    pub kind: JobKind,
    pub state: JobState,
    /// The live attempt's status, while there is one.
    pub phase: Option<AttemptStatus>,
    pub priority: i32,
    pub tags: Vec<String>,
    pub max_attempts: u32,
    pub timeouts: Timeouts,
    pub idempotency_key: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
    /// The hash of the workflow's shape (its graph without input values).
    pub workflow_hash: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
    pub cancel_requested: bool,
    pub attempts: Vec<Attempt>,
    /// Backends this job will not go to again, and why.
    pub excluded: Vec<Exclusion>,
    pub outputs: Vec<Output>,
    /// Input files uploaded to each backend before each attempt.
    #[serde(default)]
    pub attachments: Vec<JobAttachment>,
    /// The webhook this job's events go to, if any.
    #[serde(default)]
    pub callback: Option<JobCallback>,
    /// Every attempt to deliver the webhook, oldest first.
    #[serde(default)]
    pub deliveries: Vec<Delivery>,
    /// Why the job failed, once it has.
    pub error: Option<JobError>,
    /// Something to know that is not an error ("cancel came too late").
    pub note: Option<String>,
    /// Why a queued job is not running yet, and until when if that is known; absent
    /// when it is not queued or a backend can take it now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<WaitingFor>,
    /// The id of the token that submitted it, when the server asks for tokens.
    #[serde(default)]
    pub owner: Option<String>,
    pub profile: Profile,
    /// A command job's program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandRequest>,
    /// A command job's exit code and last lines of output, once it ended (failed too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<CommandResult>,
}

impl Job {
    pub fn is_terminal(&self) -> bool {
        self.state.is_terminal()
    }
}

/// Why a queued job waits.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct WaitingFor {
    pub reason: WaitReason,
    /// The same, for a person, with the times.
    pub message: String,
    /// The earliest it can start, when a hold with a known end keeps it (its retry
    /// backoff, a block, an open breaker); absent when it waits for an event (a backend
    /// coming back or becoming free).
    #[schema(format = DateTime)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// What keeps it from each backend, by name (`busy`, `offline (...)`, `blocked for
    /// this workflow until ...`, `never: lacks tag sdxl`, ...).
    #[serde(default)]
    pub backends: std::collections::BTreeMap<String, String>,
}

/// One try of a job on one backend.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Attempt {
    /// From 1.
    pub number: u32,
    pub backend: String,
    /// ComfyUI's prompt id, chosen by gantry before the submit.
    pub prompt_id: String,
    pub status: AttemptStatus,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub submitted_at: Option<String>,
    #[schema(format = DateTime)]
    pub started_at: Option<String>,
    #[schema(format = DateTime)]
    pub finished_at: Option<String>,
    pub error: Option<JobError>,
    /// Every node's timing, once the attempt has ended.
    #[serde(default)]
    pub profile: Option<Box<AttemptProfile>>,
}

/// A file the job produced.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Output {
    /// Unique within the job; the last segment of `url`.
    pub name: String,
    pub node_id: String,
    pub filename: String,
    pub subfolder: String,
    /// ComfyUI's folder type: `output` or `temp`.
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    pub sha256: String,
    pub content_type: String,
    /// Where to download it: `/v1/jobs/{id}/outputs/{name}`.
    pub url: String,
}

/// Timings of the job as a whole and of each attempt.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Profile {
    /// From accepted to the first attempt's start.
    pub queue_ms: Option<i64>,
    /// From accepted to the end, once finished.
    pub total_ms: Option<i64>,
    pub attempts: Vec<AttemptTiming>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct AttemptTiming {
    pub number: u32,
    pub backend: String,
    /// From dispatch to the backend accepting the prompt.
    pub submit_ms: Option<i64>,
    /// In the backend's queue.
    pub queue_ms: Option<i64>,
    pub execution_ms: Option<i64>,
}

/// One page of `GET /v1/jobs`, newest first.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    /// Pass as `cursor` for the next page; absent on the last.
    pub next_cursor: Option<String>,
}

/// A persisted event, as the event streams send it (its SSE `id` is `seq`, its SSE
/// `event` is `type`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct StreamEvent {
    /// Its place in the farm-wide sequence: every event once, in order.
    pub seq: i64,
    pub job_id: String,
    #[schema(format = DateTime)]
    pub at: String,
    /// The job's state after the event.
    pub state: JobState,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Something seen on a backend while an attempt runs; sent on a job's stream, not
/// persisted, without an SSE `id`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct LiveEvent {
    pub job_id: String,
    pub attempt: u32,
    pub backend: String,
    #[serde(flatten)]
    pub kind: LiveKind,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveKind {
    /// A node's own step counter (a node's start and end are persisted events:
    /// `node_started`, `node_finished`, `nodes_cached`).
    Progress { node: String, value: f64, max: f64 },
    /// A line a command job's program wrote, on `stdout` or `stderr`.
    Log { stream: String, line: String },
}

/// What a backend is doing, from live facts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackendStatus {
    Connecting,
    Idle,
    /// Idle, and blocked for some workflow shapes after faults there (see `blocks`).
    Blocked,
    Busy,
    /// Its circuit is open after repeated failures.
    Unhealthy,
    /// Drained by an operator while an attempt still runs there.
    Draining,
    /// Drained by an operator and idle.
    Drained,
    /// A prompt gantry stopped still runs there past the grace.
    Stuck,
    /// Connected, but nothing heard from it (messages, answers to gantry's probes) for
    /// longer than twice `liveness`: what it shows may be out of date.
    Stale,
    Offline,
    /// An agent's supervised ComfyUI keeps exiting soon after its start.
    CrashLooping,
}

impl BackendStatus {
    pub const ALL: [BackendStatus; 11] = [
        BackendStatus::Connecting,
        BackendStatus::Idle,
        BackendStatus::Blocked,
        BackendStatus::Busy,
        BackendStatus::Unhealthy,
        BackendStatus::Draining,
        BackendStatus::Drained,
        BackendStatus::Stuck,
        BackendStatus::Stale,
        BackendStatus::Offline,
        BackendStatus::CrashLooping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendStatus::Connecting => "connecting",
            BackendStatus::Idle => "idle",
            BackendStatus::Blocked => "blocked",
            BackendStatus::Busy => "busy",
            BackendStatus::Unhealthy => "unhealthy",
            BackendStatus::Draining => "draining",
            BackendStatus::Drained => "drained",
            BackendStatus::Stuck => "stuck",
            BackendStatus::Stale => "stale",
            BackendStatus::Offline => "offline",
            BackendStatus::CrashLooping => "crash_looping",
        }
    }
}

/// A backend as this coordinator sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Backend {
    pub name: String,
    /// `url` (configured or added) or `agent` (`gantry agent`, linked from its machine).
    #[serde(default)]
    pub kind: BackendKind,
    /// An agent's `--allow` list: the programs its command jobs may run (absent until it
    /// has said, and for a URL backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    pub url: String,
    pub tags: Vec<String>,
    /// Higher is preferred.
    pub priority: i32,
    pub status: BackendStatus,
    pub current_job: Option<String>,
    pub current_attempt: Option<u32>,
    /// The attempt queued on it behind the current one (pipelining).
    pub next_job: Option<String>,
    #[schema(format = DateTime)]
    pub last_seen: Option<String>,
    #[schema(format = DateTime)]
    pub last_used: Option<String>,
    pub last_error: Option<String>,
    /// How many node classes it reported.
    pub node_classes: Option<usize>,
    /// Model files of the latest prompt sent to it (what a ComfyUI keeps loaded).
    pub warm_models: Vec<String>,
    pub blocks: Vec<Block>,
    pub circuit: Circuit,
    pub stuck: Option<Stuck>,
    /// Where its current attempt is: node and step, as last heard.
    #[serde(default)]
    pub progress: Option<Progress>,
}

/// How gantry reaches a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    #[default]
    Url,
    Agent,
}

/// Where a running attempt is, as last heard from its backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    pub job_id: String,
    pub attempt: u32,
    pub backend: String,
    /// The node executing, once one has started.
    pub node: Option<String>,
    pub class_type: Option<String>,
    /// The node's own step counter, when it reports one.
    pub value: Option<f64>,
    pub max: Option<f64>,
}

/// A job in a list of the monitor: what a row shows (the whole job is at
/// `/v1/jobs/{id}`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct JobSummary {
    pub id: String,
    pub state: JobState,
    pub priority: i32,
    pub workflow_hash: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// The backend of its latest attempt.
    pub backend: Option<String>,
    pub attempts: u32,
    pub error: Option<JobError>,
    /// From acceptance to the end, once it has ended.
    pub duration_ms: Option<i64>,
    pub progress: Option<Progress>,
}

/// Queued jobs of one priority.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct PriorityDepth {
    pub priority: i32,
    pub count: u64,
}

/// The farm at one moment: what the monitor draws, consistent with the event stream
/// from `seq` on (`GET /v1/events?since=SEQ` sends every later event).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct FarmState {
    /// The last event this snapshot includes.
    pub seq: i64,
    #[schema(format = DateTime)]
    pub at: String,
    pub backends: Vec<Backend>,
    /// Jobs waiting here, by priority, highest first.
    pub queue: Vec<PriorityDepth>,
    pub queued: u64,
    /// The newest queued jobs (at most `RECENT`); `queue` has the depth.
    pub queued_jobs: Vec<JobSummary>,
    pub running: Vec<JobSummary>,
    /// The latest jobs to have ended, newest first (at most `RECENT`).
    pub recent: Vec<JobSummary>,
    /// Jobs in the store by state.
    #[schema(value_type = Object)]
    pub counts: std::collections::BTreeMap<String, u64>,
    /// A backend not heard from for this long is `stale`.
    pub stale_after_ms: u64,
}

impl FarmState {
    /// How many ended jobs a snapshot lists.
    pub const RECENT: usize = 50;
}

/// Sent instead of the events a client asked for when it is too far behind (or ahead)
/// to catch up: fetch `/v1/state` again and follow from its `seq`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Resync {
    /// The newest event now.
    pub seq: i64,
    pub reason: String,
}

/// A workflow shape this backend will not take until `until`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Block {
    pub workflow_hash: String,
    #[schema(format = DateTime)]
    pub until: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Circuit {
    Closed,
    /// No work until a probe at `probe_at` succeeds.
    Open {
        #[schema(format = DateTime)]
        since: String,
        #[schema(format = DateTime)]
        probe_at: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Stuck {
    pub prompt_id: String,
    #[schema(format = DateTime)]
    pub since: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct BackendList {
    pub backends: Vec<Backend>,
}

/// The body of `POST /v1/backends`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddBackend {
    /// The ComfyUI server's base URL, `http://host:port`.
    pub url: String,
    /// Defaults to the URL's `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What jobs may ask of it (`"tags": [...]` on a job).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Higher is preferred; 0 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
}

/// A backend's status after a drain or resume.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct BackendStatusOf {
    pub name: String,
    pub status: BackendStatus,
}

/// This coordinator's place in the farm. With the embedded store only `store` is set.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Cluster {
    /// `embedded` or `postgres`.
    pub store: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// The leases this coordinator holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Vec<HeldLease>>,
    /// Writes refused because this coordinator's lease had been lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_writes: Option<u64>,
    /// Every lease, as the database has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leases: Option<Vec<Lease>>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct HeldLease {
    pub backend: String,
    /// The fencing token: it grows on every takeover.
    pub token: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Lease {
    pub backend: String,
    /// None once released.
    pub owner: Option<String>,
    pub token: i64,
    pub remaining_ms: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`, or `store_unavailable` (with HTTP 503).
    pub status: String,
    pub backends: usize,
    pub connected: usize,
}

/// Who this client is to the server: `GET`, `POST` (sign in) and `DELETE` (sign out)
/// `/v1/session`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Session {
    /// Whether the server asks for tokens (once any exists).
    pub auth: bool,
    /// The token this request carried, when it is valid.
    pub token: Option<TokenInfo>,
}

/// A token as the API shows it: never the token itself.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub scope: Scope,
}

/// The body of `POST /v1/session`, when the token is not in the `Authorization` header.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    pub token: String,
}

/// Node timings aggregated over finished attempts (`GET /v1/stats/nodes`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeStatsList {
    /// What the rows are grouped by: `class`, and `workflow` and `backend` when asked.
    pub by: Vec<String>,
    pub stats: Vec<NodeStatsEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeStatsEntry {
    pub class: String,
    /// Set when grouped by workflow (its shape hash).
    pub workflow: Option<String>,
    /// Set when grouped by backend.
    pub backend: Option<String>,
    /// Runs of the node, cached ones included.
    pub count: u64,
    pub cached: u64,
    pub cached_ratio: f64,
    pub failed: u64,
    /// Runs that were executing when their attempt timed out.
    pub timed_out: u64,
    /// Runs with a measured duration (the quantiles' sample).
    pub measured: u64,
    /// Streaming quantiles (DDSketch, 1% relative error).
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// What adaptive stall limits are, or would be, per node class and backend
/// (`GET /v1/stats/timeouts`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TimeoutSuggestions {
    /// Whether `[adaptive]` is on: the limits below are in force for its classes.
    pub enabled: bool,
    /// The classes it applies to (`*` for all); with it off, what would apply.
    pub classes: Vec<String>,
    pub factor: f64,
    pub floor_ms: u64,
    pub min_samples: u64,
    pub suggestions: Vec<TimeoutSuggestion>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TimeoutSuggestion {
    pub class: String,
    pub backend: String,
    /// Whether `[adaptive]` applies to this class now.
    pub applied: bool,
    pub backend_samples: u64,
    pub farm_samples: u64,
    /// Where the p99 came from: `backend`, `farm`, or `none` (too few samples).
    pub source: String,
    pub p99_ms: Option<f64>,
    /// `max(floor, factor x p99)`; none with too few samples.
    pub node_stall_ms: Option<u64>,
    pub reason: String,
    /// This backend's median for the class is over twice the farm's: the scheduler
    /// uses it last for jobs with this class.
    pub slow: bool,
}
