//! The v1 HTTP API: parse and check requests at the edge, call the engine, and turn
//! domain values into the wire's JSON (RFC 3339 timestamps, `_ms` durations, one error
//! shape).

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use bytes::Bytes;
use chrono::DateTime;
use gantry_core::{
    EventKind, Job, JobId, JobSpec, JobState, Millis, Refused, Timeouts, Workflow, MAX_LIMIT_MS,
};
use gantry_store::{Created, Event, JobFilter};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

use gantry_api as wire;
use std::sync::{Arc, OnceLock};
use utoipa::{IntoParams, OpenApi};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::Principal;
use crate::bus::BusEvent;
use crate::engine::{self, now_ms, Applied, Connection, Engine};
use crate::outputs::content_type;
use axum::Extension;
use gantry_core::auth::Scope;

/// Every way a request can fail, each with its status code.
#[derive(Debug)]
pub enum ApiError {
    BadRequest {
        code: &'static str,
        message: String,
        details: Value,
    },
    NotFound(String),
    Conflict {
        code: &'static str,
        message: String,
        details: Value,
    },
    TooLarge {
        limit: usize,
    },
    /// An attachment over `max_attachment_bytes`.
    FileTooLarge {
        message: String,
        limit: u64,
    },
    /// The store cannot be reached: nothing was accepted or changed.
    Unavailable(String),
    /// No token, or one that is not (or no longer) valid.
    Unauthorized {
        code: &'static str,
        message: String,
    },
    /// A valid token whose scope does not allow this.
    Forbidden(String),
    Internal(String),
}

impl ApiError {
    fn bad(code: &'static str, message: impl Into<String>, details: Value) -> ApiError {
        ApiError::BadRequest {
            code,
            message: message.into(),
            details,
        }
    }
}

impl From<engine::Error> for ApiError {
    fn from(e: engine::Error) -> ApiError {
        match e {
            engine::Error::NotFound(id) => ApiError::NotFound(format!("no job {id}")),
            engine::Error::Store(e) => e.into(),
            engine::Error::Agent(m) => ApiError::Internal(m),
        }
    }
}

impl From<gantry_store::Error> for ApiError {
    fn from(e: gantry_store::Error) -> ApiError {
        if e.is_unavailable() {
            ApiError::Unavailable(e.to_string())
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message, details) = match self {
            ApiError::BadRequest {
                code,
                message,
                details,
            } => (StatusCode::BAD_REQUEST, code, message, details),
            ApiError::NotFound(message) => (StatusCode::NOT_FOUND, "not_found", message, json!({})),
            ApiError::Conflict {
                code,
                message,
                details,
            } => (StatusCode::CONFLICT, code, message, details),
            ApiError::TooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body is larger than the limit of {limit} bytes"),
                json!({ "limit_bytes": limit }),
            ),
            ApiError::FileTooLarge { message, limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "attachment_too_large",
                message,
                json!({ "limit_bytes": limit }),
            ),
            ApiError::Unavailable(message) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("{message}; nothing was accepted or changed, try again shortly"),
                json!({}),
            ),
            ApiError::Unauthorized { code, message } => {
                let body = json!({"error": {"code": code, "message": message, "details": {}}});
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    Json(body),
                )
                    .into_response();
            }
            ApiError::Forbidden(message) => {
                (StatusCode::FORBIDDEN, "forbidden", message, json!({}))
            }
            ApiError::Internal(message) => {
                tracing::error!(%message, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    message,
                    json!({}),
                )
            }
        };
        let body = json!({"error": {"code": code, "message": message, "details": details}});
        (status, Json(body)).into_response()
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "gantry",
        description = "A job orchestrator for ComfyUI farms: submit workflows, follow them, cancel them, see the backends. Every refusal is an ErrorBody; timestamps are RFC 3339 (UTC, milliseconds); durations are integers in `_ms` fields."
    ),
    tags(
        (name = "jobs", description = "Submit, follow, cancel and download"),
        (name = "events", description = "Server-sent event streams"),
        (name = "backends", description = "The ComfyUI servers gantry drives"),
        (name = "operations", description = "Health, metrics, the farm and this document")
    )
)]
struct ApiDoc;

/// Every documented route, each with its handler: the router and `/v1/openapi.json` are
/// both made from this, so a route cannot exist without being in the document.
fn documented(files_limit: usize) -> OpenApiRouter<Engine> {
    use utoipa_axum::router::UtoipaMethodRouterExt;
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_jobs, create_job))
        // Files have their own limit (the inner layer is the one extractors see).
        .routes(routes!(upload_file).layer(DefaultBodyLimit::max(files_limit)))
        .routes(routes!(get_job, cancel_job))
        .routes(routes!(job_events))
        .routes(routes!(get_request))
        .routes(routes!(get_output))
        .routes(routes!(get_log))
        .routes(routes!(all_events))
        .routes(routes!(list_backends, add_backend))
        .routes(routes!(drain_backend))
        .routes(routes!(resume_backend))
        .routes(routes!(lift_block))
        .routes(routes!(farm_state))
        .routes(routes!(cluster))
        .routes(routes!(node_stats))
        .routes(routes!(timeout_suggestions))
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(get_session, sign_in, sign_out))
        .routes(routes!(agent_connect))
        .routes(routes!(backend_logs))
}

/// An agent's supervised ComfyUI: its state, its last output lines, its restarts.
#[utoipa::path(get, path = "/v1/backends/{name}/logs", tag = "backends",
    params(("name" = String, Path, description = "The agent's backend name")),
    responses(
        (status = 200, body = wire::BackendLogs),
        (status = 404, description = "No agent of that name", body = wire::ErrorBody),
    ))]
async fn backend_logs(
    State(engine): State<Engine>,
    Path(name): Path<String>,
) -> Result<Json<wire::BackendLogs>, ApiError> {
    engine.agents().logs(&name).map(Json).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no agent {name}: logs are kept for agents' supervised ComfyUI"
        ))
    })
}

/// An agent's link: a WebSocket the agent opens from its GPU machine, carrying the
/// coordinator's connections to its local ComfyUI (see `gantry agent`). The agent is
/// registered as a backend named `name`.
#[utoipa::path(get, path = "/v1/agents/connect", tag = "backends",
    params(
        ("name" = String, Query, description = "The agent's backend name"),
        ("tags" = Option<String>, Query, description = "Comma-separated tags"),
    ),
    responses(
        (status = 101, description = "The link (WebSocket, binary frames)"),
        (status = 400, description = "Not a WebSocket request, or a bad name", body = wire::ErrorBody),
        (status = 409, description = "The name belongs to a configured URL backend", body = wire::ErrorBody),
    ))]
async fn agent_connect(
    state: State<Engine>,
    query: Query<crate::agents::ConnectQuery>,
    ws: axum::extract::WebSocketUpgrade,
) -> Response {
    crate::agents::connect(state, query, ws).await
}

/// The OpenAPI 3.1 document of this API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented(0).split_for_parts().1
}

pub fn router(engine: Engine) -> Router {
    let limit = engine.config().max_body_bytes;
    // A multipart form around the largest file: its boundaries and headers.
    let files_limit = usize::try_from(engine.config().max_attachment_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(64 * 1024);
    let (router, _) = documented(files_limit).split_for_parts();
    router
        .merge(crate::ui::routes())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(axum::middleware::from_fn_with_state(
            engine.clone(),
            crate::auth::guard,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(shape_errors))
        .with_state(engine)
}

/// Refusals axum makes before any handler runs (a path segment or query it cannot
/// decode, a method the route does not take, a body over the limit, a request that is
/// not a WebSocket upgrade) come as plain text or nothing: they are put in the one
/// error shape, so that every 4xx a client gets reads the same.
async fn shape_errors(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = request.method().clone();
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let reason = status
        .canonical_reason()
        .unwrap_or("refused")
        .to_lowercase();
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            (
                "method_not_allowed",
                format!("this route does not take {method} (it takes {allowed})"),
            )
        }
        StatusCode::PAYLOAD_TOO_LARGE => ("body_too_large", text),
        StatusCode::NOT_FOUND => ("not_found", text),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", text),
        s if s.is_server_error() => ("internal", text),
        _ => ("invalid_request", text),
    };
    let message = if message.is_empty() { reason } else { message };
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = json!({"error": {"code": code, "message": message, "details": {}}});
    let mut shaped = (status, Json(body)).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE {
            shaped.headers_mut().insert(name, value.clone());
        }
    }
    shaped
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json")))]
async fn openapi_json() -> Response {
    static DOC: OnceLock<String> = OnceLock::new();
    let doc = DOC.get_or_init(|| openapi().to_json().unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], doc.as_str()).into_response()
}

pub use crate::clock::rfc3339;

pub(crate) fn opt_time(ms: Option<Millis>) -> Option<String> {
    ms.map(rfc3339)
}

/// Percent-encode a path segment.
pub(crate) fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A job as a client sees it.
pub fn job_view(job: &Job) -> wire::Job {
    let attempts = job
        .attempts
        .iter()
        .map(|a| wire::Attempt {
            number: a.number,
            backend: a.backend.clone(),
            prompt_id: a.prompt_id.clone(),
            status: a.status,
            created_at: rfc3339(a.created_at),
            submitted_at: opt_time(a.submitted_at),
            started_at: opt_time(a.started_at),
            finished_at: opt_time(a.finished_at),
            error: a.error.clone(),
            profile: a.profile.clone(),
        })
        .collect();
    let outputs = job
        .outputs
        .iter()
        .map(|o| wire::Output {
            name: o.name.clone(),
            node_id: o.node_id.clone(),
            filename: o.filename.clone(),
            subfolder: o.subfolder.clone(),
            kind: o.kind.clone(),
            size: o.size,
            sha256: o.sha256.clone(),
            content_type: content_type(&o.filename).to_owned(),
            url: format!("/v1/jobs/{}/outputs/{}", job.id, segment(&o.name)),
        })
        .collect();
    let attachments = job
        .spec
        .attachments
        .iter()
        .map(|a| wire::JobAttachment {
            name: a.name.clone(),
            sha256: a.sha256.clone(),
            size: a.size,
        })
        .collect();
    wire::Job {
        attachments,
        callback: job.spec.callback.as_ref().map(|c| callback_view(c, false)),
        deliveries: Vec::new(),
        id: job.id.to_string(),
        state: job.state,
        phase: job.live_attempt().map(|a| a.status),
        priority: job.spec.priority,
        tags: job.spec.tags.clone(),
        max_attempts: job.spec.max_attempts,
        timeouts: job.spec.timeouts.clone(),
        idempotency_key: job.spec.idempotency_key.clone(),
        metadata: job.spec.metadata.clone(),
        workflow_hash: job.spec.workflow.shape_hash(),
        created_at: rfc3339(job.created_at),
        updated_at: rfc3339(job.updated_at),
        cancel_requested: job.cancel_requested,
        attempts,
        excluded: job.excluded.clone(),
        outputs,
        error: job.error.clone(),
        note: job.note.clone(),
        waiting_for: None,
        owner: job.spec.owner.clone(),
        profile: profile_of(job),
        kind: if job.spec.command.is_some() {
            wire::JobKind::Command
        } else {
            wire::JobKind::Workflow
        },
        command: job.spec.command.as_ref().cloned(),
        // A failed command's result is in its error's details.
        result: job.result.clone().or_else(|| {
            job.spec.command.as_ref()?;
            serde_json::from_value(job.error.as_ref()?.details.get("result")?.clone()).ok()
        }),
    }
}

/// Why a queued job waits, as the engine sees the farm now.
fn waiting_view(engine: &Engine, job: &Job) -> Option<wire::WaitingFor> {
    let w = engine.waiting_for(job)?;
    Some(wire::WaitingFor {
        reason: w.reason,
        message: w.message,
        until: opt_time(w.until),
        backends: w.backends,
    })
}

/// Timings of the job as a whole and of each attempt (each attempt's per-node profile
/// is on the attempt).
fn profile_of(job: &Job) -> wire::Profile {
    let first_start = job.attempts.iter().filter_map(|a| a.started_at).next();
    let end = job.state.is_terminal().then_some(job.updated_at);
    let attempts = job
        .attempts
        .iter()
        .map(|a| wire::AttemptTiming {
            number: a.number,
            backend: a.backend.clone(),
            submit_ms: a.submitted_at.map(|s| s - a.created_at),
            queue_ms: a.submitted_at.zip(a.started_at).map(|(s, t)| t - s),
            execution_ms: a.started_at.zip(a.finished_at).map(|(s, f)| f - s),
        })
        .collect();
    wire::Profile {
        queue_ms: first_start.map(|s| s - job.created_at),
        total_ms: end.map(|e| e - job.created_at),
        attempts,
    }
}

/// The body's fields, from the type the document describes it with.
const SUBMIT_FIELDS: &[&str] = wire::SubmitRequest::FIELDS;

fn parse_submit(body: &Value, default_attempts: u32) -> Result<JobSpec, ApiError> {
    let Value::Object(obj) = body else {
        return Err(ApiError::bad(
            "invalid_request",
            "the request body must be a JSON object with a \"workflow\" field",
            json!({}),
        ));
    };
    // The UI's save file posted as the whole body: say that, not "unknown field".
    if obj.get("nodes").is_some_and(Value::is_array) && obj.contains_key("links") {
        if let Err(e) = Workflow::parse(body) {
            return Err(ApiError::bad(e.code(), e.to_string(), json!({})));
        }
    }
    if let Some(unknown) = obj.keys().find(|k| !SUBMIT_FIELDS.contains(&k.as_str())) {
        let hint = if obj.contains_key("class_type")
            || obj.values().any(|v| v.get("class_type").is_some())
        {
            "; send the workflow under \"workflow\": {\"workflow\": {...}}"
        } else {
            ""
        };
        return Err(ApiError::bad(
            "unknown_field",
            format!(
                "unknown field {unknown:?}; the fields are {}{hint}",
                SUBMIT_FIELDS.join(", ")
            ),
            json!({"field": unknown}),
        ));
    }
    let field_err = |field: &str, message: String| {
        ApiError::bad(
            "invalid_field",
            format!("{field}: {message}"),
            json!({"field": field}),
        )
    };
    let kind = match obj.get("kind") {
        None | Some(Value::Null) => wire::JobKind::Workflow,
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
            field_err(
                "kind",
                format!("must be \"workflow\" or \"command\", got {v}"),
            )
        })?,
    };
    let (workflow, command) = match kind {
        wire::JobKind::Workflow => {
            if obj.contains_key("command") {
                return Err(field_err(
                    "command",
                    "is for a job of kind \"command\"; add \"kind\": \"command\" (and no workflow)"
                        .into(),
                ));
            }
            let workflow_value = obj.get("workflow").ok_or_else(|| {
                ApiError::bad(
                    "missing_field",
                    "the request has no \"workflow\" field (an API-format ComfyUI workflow)",
                    json!({"field": "workflow"}),
                )
            })?;
            let workflow = Workflow::parse(workflow_value).map_err(|e| {
                let mut details = json!({"field": "workflow"});
                if let Some(node) = e.node() {
                    details["node"] = json!(node);
                }
                ApiError::bad(e.code(), e.to_string(), details)
            })?;
            (workflow, None)
        }
        wire::JobKind::Command => {
            for field in ["workflow", "attachments"] {
                if obj.contains_key(field) {
                    return Err(field_err(
                        field,
                        "a job of kind \"command\" runs a program, not a workflow: leave it out"
                            .into(),
                    ));
                }
            }
            let v = obj.get("command").ok_or_else(|| {
                ApiError::bad(
                    "missing_field",
                    "a job of kind \"command\" needs a \"command\" field ({\"argv\": [...]})",
                    json!({"field": "command"}),
                )
            })?;
            (Workflow::none(), Some(parse_command(v, &field_err)?))
        }
    };
    let priority = match obj.get("priority") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| field_err("priority", format!("must be a 32-bit integer, got {v}")))?,
    };
    let max_attempts = match obj.get("max_attempts") {
        None | Some(Value::Null) => default_attempts,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=100).contains(n))
            .map(|n| n as u32)
            .ok_or_else(|| {
                field_err(
                    "max_attempts",
                    format!("must be an integer from 1 to 100, got {v}"),
                )
            })?,
    };
    let tags = match obj.get("tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| match t {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                other => Err(field_err(
                    "tags",
                    format!("must be non-empty strings, got {other}"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(v) => {
            return Err(field_err(
                "tags",
                format!("must be an array of strings, got {v}"),
            ))
        }
    };
    let timeouts: Timeouts = match obj.get("timeouts") {
        None | Some(Value::Null) => Timeouts::default(),
        Some(v) => {
            serde_json::from_value(v.clone()).map_err(|e| field_err("timeouts", e.to_string()))?
        }
    };
    if let Some((field, ms)) = timeouts.over_max() {
        return Err(field_err(
            &format!("timeouts.{field}"),
            format!("must be at most {MAX_LIMIT_MS} (ten years), got {ms}"),
        ));
    }
    let idempotency_key = match obj.get("idempotency_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 255 => Some(s.clone()),
        Some(v) => {
            return Err(field_err(
                "idempotency_key",
                format!("must be a string of 1 to 255 bytes, got {v}"),
            ))
        }
    };
    let metadata = match obj.get("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(v) => return Err(field_err("metadata", format!("must be an object, got {v}"))),
    };
    Ok(JobSpec {
        workflow,
        priority,
        max_attempts,
        tags,
        timeouts,
        idempotency_key,
        metadata,
        owner: None,
        attachments: Vec::new(),
        callback: None,
        command,
    })
}

/// The `command` field of a command job.
fn parse_command(
    v: &Value,
    field_err: &dyn Fn(&str, String) -> ApiError,
) -> Result<gantry_core::CommandSpec, ApiError> {
    let req: gantry_core::CommandSpec =
        serde_json::from_value(v.clone()).map_err(|e| field_err("command", e.to_string()))?;
    let has_nul = |s: &str| s.contains('\0');
    match req.argv.first() {
        None => {
            return Err(field_err(
                "command.argv",
                "must name the program to run".into(),
            ))
        }
        Some(p) if p.is_empty() => {
            return Err(field_err(
                "command.argv",
                "argv[0] (the program) is empty".into(),
            ))
        }
        _ => {}
    }
    if let Some(i) = req.argv.iter().position(|a| has_nul(a)) {
        return Err(field_err(
            "command.argv",
            format!("argv[{i}] holds a NUL byte"),
        ));
    }
    if let Some(k) = req
        .env
        .iter()
        .find(|(k, v)| k.is_empty() || k.contains('=') || has_nul(k) || has_nul(v))
        .map(|(k, _)| k)
    {
        return Err(field_err(
            "command.env",
            format!("{k:?}: a variable's name must be non-empty, without '=' or NUL, and its value without NUL"),
        ));
    }
    if let Some(ms) = req.timeout_ms.filter(|ms| *ms > MAX_LIMIT_MS) {
        return Err(field_err(
            "command.timeout_ms",
            format!("must be at most {MAX_LIMIT_MS} (ten years), got {ms}"),
        ));
    }
    if let Some(cwd) = &req.cwd {
        if !std::path::Path::new(cwd).is_absolute() || has_nul(cwd) {
            return Err(field_err(
                "command.cwd",
                format!("{cwd:?} must be an absolute path"),
            ));
        }
    }
    Ok(req)
}

/// A job's webhook as the wire shows it (never its secret); `default` when it is the
/// server's, not the job's own.
fn callback_view(c: &gantry_core::Callback, default: bool) -> wire::JobCallback {
    wire::JobCallback {
        url: c.url.clone(),
        events: c.events.clone(),
        signed: c.secret.is_some(),
        default,
    }
}

/// An attachment of a submit, checked but not yet stored.
enum Attaching {
    Stored(String),
    Inline(Vec<u8>),
}

/// The `attachments` field: names that the workflow uses, each once, each by hash or
/// inline. Storing and the existence check come after (`resolve_attachments`).
fn parse_attachments(
    value: Option<&Value>,
    workflow: &Workflow,
    max_bytes: u64,
) -> Result<Vec<(String, Attaching)>, ApiError> {
    use base64::Engine as _;
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(v) => {
            return Err(ApiError::bad(
                "invalid_field",
                format!("attachments: must be an array of {{name, sha256 | data}}, got {v}"),
                json!({"field": "attachments"}),
            ))
        }
    };
    let mut out: Vec<(String, Attaching)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = format!("attachments[{i}]");
        let bad = |message: String| {
            ApiError::bad(
                "invalid_field",
                format!("{field}: {message}"),
                json!({"field": field}),
            )
        };
        let a: wire::AttachmentRequest =
            serde_json::from_value(item.clone()).map_err(|e| bad(e.to_string()))?;
        if a.name.is_empty() || a.name.len() > 255 || a.name.contains(['/', '\\']) {
            return Err(bad(format!(
                "name must be 1 to 255 bytes without / or \\, got {:?}",
                a.name
            )));
        }
        if out.iter().any(|(n, _)| *n == a.name) {
            return Err(bad(format!("name {:?} is attached twice", a.name)));
        }
        if workflow.inputs_naming(&a.name).is_empty() {
            return Err(ApiError::bad(
                "unused_attachment",
                format!(
                    "{field}: no input of the workflow names {:?}; a LoadImage-style input must \
                     have it as its value (\"image\": {:?})",
                    a.name, a.name
                ),
                json!({"field": field, "name": a.name}),
            ));
        }
        let source = match (a.sha256, a.data) {
            (Some(hash), None) => {
                let hash = hash.to_ascii_lowercase();
                if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad(format!("sha256 must be 64 hex digits, got {hash:?}")));
                }
                Attaching::Stored(hash)
            }
            (None, Some(data)) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(data.trim())
                    .map_err(|e| bad(format!("data is not base64: {e}")))?;
                if bytes.len() as u64 > max_bytes {
                    return Err(ApiError::FileTooLarge {
                        message: format!(
                            "{field}: {:?} is {} bytes, over the limit of {max_bytes} (max_attachment_bytes)",
                            a.name,
                            bytes.len()
                        ),
                        limit: max_bytes,
                    });
                }
                Attaching::Inline(bytes)
            }
            _ => return Err(bad("give exactly one of sha256 and data".into())),
        };
        out.push((a.name, source));
    }
    Ok(out)
}

/// Checks that each attachment by hash is stored here and within the size limit, and
/// stores the inline ones. Nothing about the job is written before this succeeds.
async fn resolve_attachments(
    engine: &Engine,
    pending: Vec<(String, Attaching)>,
) -> Result<Vec<gantry_core::Attachment>, ApiError> {
    let max = engine.config().max_attachment_bytes;
    let mut out = Vec::new();
    for (name, source) in pending {
        let (sha256, size) = match source {
            Attaching::Stored(hash) => {
                let size = match engine.attachments().size(&hash).await {
                    Some(size) => size,
                    None => {
                        return Err(ApiError::bad(
                            "missing_attachment",
                            format!(
                                "attachment {name:?}: no file {hash} here; upload it first with POST /v1/files"
                            ),
                            json!({"name": name, "sha256": hash}),
                        ))
                    }
                };
                if size > max {
                    return Err(ApiError::FileTooLarge {
                        message: format!("attachment {name:?} is {size} bytes, over the limit of {max} (max_attachment_bytes)"),
                        limit: max,
                    });
                }
                (hash, size)
            }
            Attaching::Inline(bytes) => {
                let size = bytes.len() as u64;
                let hash = engine.attachments().put(bytes.into()).await.map_err(|e| {
                    tracing::error!(error = %e, "cannot store an attachment");
                    ApiError::Unavailable(format!("cannot store attachment {name:?}: {e}"))
                })?;
                (hash, size)
            }
        };
        out.push(gantry_core::Attachment { name, sha256, size });
    }
    Ok(out)
}

/// Submit a workflow. It is durable once answered: 202 for a new job; 200 with the
/// existing job when the idempotency key was used before for the same request.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
    request_body = wire::SubmitRequest,
    responses(
        (status = 202, description = "Accepted and queued", body = wire::Accepted),
        (status = 200, description = "The job this idempotency key made before", body = wire::Job),
        (status = 400, description = "The request is not a valid job; nothing was accepted", body = wire::ErrorBody),
        (status = 409, description = "The idempotency key was used with another request", body = wire::ErrorBody),
        (status = 413, description = "The body is over the size limit", body = wire::ErrorBody),
        (status = 503, description = "The store cannot be reached; nothing was accepted", body = wire::ErrorBody),
    ))]
async fn create_job(
    State(engine): State<Engine>,
    principal: Option<Extension<Principal>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = match body {
        Ok(b) => b,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(ApiError::TooLarge {
                limit: engine.config().max_body_bytes,
            })
        }
        Err(rejection) => {
            return Err(ApiError::bad(
                "invalid_request",
                rejection.body_text(),
                json!({}),
            ))
        }
    };
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad(
            "invalid_json",
            format!("the request body is not JSON: {e}"),
            json!({"line": e.line(), "column": e.column()}),
        )
    })?;
    let mut spec = parse_submit(&value, engine.config().max_attempts)?;
    let attaching = parse_attachments(
        value.get("attachments"),
        &spec.workflow,
        engine.config().max_attachment_bytes,
    )?;
    spec.callback = match value.get("callback") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let bad = |message: String| {
                ApiError::bad(
                    "invalid_callback",
                    format!("callback: {message}"),
                    json!({"field": "callback"}),
                )
            };
            let req: wire::CallbackRequest =
                serde_json::from_value(v.clone()).map_err(|e| bad(e.to_string()))?;
            Some(
                crate::callbacks::parse(&req, &engine.config().callbacks.allow_hosts)
                    .map_err(bad)?,
            )
        }
    };
    spec.owner = principal.map(|Extension(p)| p.id);
    // ComfyUI answers an unknown class with an error that names neither node nor class,
    // so check against what the backends said they have.
    if let Some(command) = &spec.command {
        if let Some(refusal) = engine.command_refusal(&spec) {
            return Err(ApiError::bad(
                "command_not_allowed",
                refusal,
                json!({"program": command.program(), "field": "command.argv"}),
            ));
        }
    }
    if let Some((node, class)) = engine.unknown_class(&spec.workflow) {
        return Err(ApiError::bad(
            "unknown_class",
            format!("node {node}: class_type {class} is not installed on any backend"),
            json!({"node": node, "class_type": class}),
        ));
    }
    // A loader naming a file no backend offers would be dispatched only to be refused by
    // validation everywhere: refuse it now, on fresh lists.
    if spec.command.is_none() && engine.missing_model(&spec).is_some() {
        engine.refresh_models(&spec.workflow).await;
        if let Some((model, backends)) = engine.missing_model(&spec) {
            let class = spec.workflow.class_of(&model.node).unwrap_or_default();
            let checked: Vec<String> = backends
                .iter()
                .map(|(name, reason)| format!("{name}: {reason}"))
                .collect();
            return Err(ApiError::bad(
                "missing_model",
                format!(
                    "node {} ({class}): input {} names {:?}, which no backend offers (checked {})",
                    model.node,
                    model.input,
                    model.file,
                    checked.join("; ")
                ),
                json!({
                    "node": model.node,
                    "class_type": class,
                    "input": model.input,
                    "value": model.file,
                    "backends": backends,
                }),
            ));
        }
    }
    spec.attachments = resolve_attachments(&engine, attaching).await?;
    let request_hash = hex::encode(Sha256::digest(&body));
    match engine.submit(spec, &request_hash).await? {
        Created::New(event) => Ok((
            StatusCode::ACCEPTED,
            Json(wire::Accepted {
                id: event.job_id.to_string(),
                state: JobState::Queued,
            }),
        )
            .into_response()),
        Created::Existing { job, same_request } if same_request => {
            Ok((StatusCode::OK, Json(job_view(&job))).into_response())
        }
        Created::Existing { job, .. } => Err(ApiError::Conflict {
            code: "idempotency_conflict",
            message: format!(
                "idempotency key {:?} was used for job {} with a different request",
                job.spec.idempotency_key.as_deref().unwrap_or_default(),
                job.id
            ),
            details: json!({"job_id": job.id}),
        }),
    }
}

fn parse_id(id: &str) -> Result<JobId, ApiError> {
    JobId::parse(id).ok_or_else(|| ApiError::NotFound(format!("no job {id}: not a job id")))
}

async fn load(engine: &Engine, id: &str) -> Result<Job, ApiError> {
    let id = parse_id(id)?;
    engine
        .store()
        .job(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))
}

#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, body = wire::Job),
        (status = 404, description = "No such job", body = wire::ErrorBody),
    ))]
async fn get_job(
    State(engine): State<Engine>,
    Path(id): Path<String>,
) -> Result<Json<wire::Job>, ApiError> {
    let job = load(&engine, &id).await?;
    let mut view = job_view(&job);
    view.waiting_for = waiting_view(&engine, &job);
    if view.callback.is_none() {
        view.callback = engine
            .config()
            .callbacks
            .default
            .as_ref()
            .map(|c| callback_view(c, true));
    }
    view.deliveries = engine
        .store()
        .deliveries(&job.id)
        .await?
        .into_iter()
        .filter_map(|d| serde_json::from_value(d).ok())
        .collect();
    Ok(Json(view))
}

/// The job's request as it was accepted, in the body shape of `POST /v1/jobs` (without
/// its idempotency key), so that a client can submit it again.
#[utoipa::path(get, path = "/v1/jobs/{id}/request", tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "A body for POST /v1/jobs that submits the same work again", body = wire::SubmitRequest),
        (status = 404, description = "No such job", body = wire::ErrorBody),
    ))]
async fn get_request(
    State(engine): State<Engine>,
    Path(id): Path<String>,
) -> Result<Json<wire::SubmitRequest>, ApiError> {
    let job = load(&engine, &id).await?;
    let spec = &job.spec;
    Ok(Json(wire::SubmitRequest {
        kind: spec.command.as_ref().map(|_| wire::JobKind::Command),
        command: spec.command.as_ref().cloned(),
        workflow: spec.workflow.graph().clone(),
        priority: Some(spec.priority),
        max_attempts: Some(spec.max_attempts),
        tags: spec.tags.clone(),
        timeouts: Some(spec.timeouts.clone()),
        idempotency_key: None,
        metadata: Some(spec.metadata.clone()),
        attachments: spec
            .attachments
            .iter()
            .map(|a| wire::AttachmentRequest {
                name: a.name.clone(),
                sha256: Some(a.sha256.clone()),
                data: None,
            })
            .collect(),
        // The secret is not shown back: a resubmit names its own.
        callback: spec.callback.as_ref().map(|c| wire::CallbackRequest {
            url: c.url.clone(),
            events: Some(c.events.clone()),
            secret: None,
        }),
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only jobs in this state: queued, running, succeeded, failed or cancelled.
    state: Option<String>,
    /// From 1 to 1000; 50 by default.
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Jobs, newest first, a page at a time.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(ListQuery),
    responses(
        (status = 200, body = wire::JobPage),
        (status = 400, description = "A query parameter is not valid", body = wire::ErrorBody),
    ))]
async fn list_jobs(
    State(engine): State<Engine>,
    Query(q): Query<ListQuery>,
) -> Result<Json<wire::JobPage>, ApiError> {
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::bad(
                "invalid_query",
                format!("state={s} is not a job state; use queued, running, succeeded, failed or cancelled"),
                json!({"field": "state"}),
            )
        })?),
    };
    let limit = match q.limit.as_deref() {
        None => 50,
        Some(s) => s
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                ApiError::bad(
                    "invalid_query",
                    format!("limit={s} must be an integer from 1 to 1000"),
                    json!({"field": "limit"}),
                )
            })?,
    };
    let before = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(s) => Some(s.parse::<i64>().map_err(|_| {
            ApiError::bad(
                "invalid_query",
                format!("cursor={s} is not a cursor from a previous page"),
                json!({"field": "cursor"}),
            )
        })?),
    };
    let page = engine
        .store()
        .list_jobs(&JobFilter {
            state,
            limit,
            before,
        })
        .await?;
    Ok(Json(wire::JobPage {
        jobs: page
            .jobs
            .iter()
            .map(|job| wire::Job {
                waiting_for: waiting_view(&engine, job),
                ..job_view(job)
            })
            .collect(),
        next_cursor: page.next.map(|n| n.to_string()),
    }))
}

/// Cancel a job, all the way down to its backend.
#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "Cancelled", body = wire::Job),
        (status = 202, description = "Cancel requested: the backend is being told", body = wire::Job),
        (status = 404, description = "No such job", body = wire::ErrorBody),
        (status = 403, description = "The job is another token's, and this one is not admin", body = wire::ErrorBody),
        (status = 409, description = "The job had already finished", body = wire::ErrorBody),
    ))]
async fn cancel_job(
    State(engine): State<Engine>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if let Some(Extension(p)) = &principal {
        let job = load(&engine, &id).await?;
        if p.scope < Scope::Admin && job.spec.owner.as_deref() != Some(p.id.as_str()) {
            return Err(ApiError::Forbidden(format!(
                "job {} was not submitted by token {} ({}): cancelling another's job needs scope admin",
                job.id, p.id, p.name
            )));
        }
    }
    let id = parse_id(&id)?;
    match engine.apply(&id, gantry_core::Input::Cancel).await? {
        Applied::Changed(job) if job.state == JobState::Cancelled => {
            Ok((StatusCode::OK, Json(job_view(&job))).into_response())
        }
        Applied::Changed(job) | Applied::Refused(Refused::NoChange { .. }, job) => {
            Ok((StatusCode::ACCEPTED, Json(job_view(&job))).into_response())
        }
        Applied::Refused(_, job) => Err(ApiError::Conflict {
            code: "job_finished",
            message: format!("job {} is already {}", job.id, job.state),
            details: json!({"state": job.state}),
        }),
    }
}

/// An event's JSON as the streams send it.
fn event_data(e: &Event) -> String {
    let wire = wire::StreamEvent {
        seq: e.seq,
        job_id: e.job_id.to_string(),
        at: rfc3339(e.at),
        state: e.state,
        kind: e.kind.clone(),
    };
    serde_json::to_string(&wire).unwrap_or_default()
}

fn sse_with(e: &Event, data: &str) -> SseEvent {
    SseEvent::default()
        .id(e.seq.to_string())
        .event(e.kind.name())
        .data(data)
}

fn sse_of_event(e: &Event) -> SseEvent {
    sse_with(e, &event_data(e))
}

/// The terminal event itself, not another event of the same transition (an
/// `attempt_failed` is stored with the job's new state too) nor a late one.
fn ends_stream(e: &Event) -> bool {
    e.state.is_terminal()
        && matches!(
            e.kind,
            EventKind::Succeeded { .. } | EventKind::Failed { .. } | EventKind::Cancelled { .. }
        )
}

/// Send persisted events in order, keeping `last` at the newest sent; false once the
/// stream is over (the client left, or the job's terminal event went out).
async fn send_persisted(tx: &mpsc::Sender<SseEvent>, events: &[Event], last: &mut i64) -> bool {
    for e in events {
        *last = e.seq;
        if tx.send(sse_of_event(e)).await.is_err() || ends_stream(e) {
            return false;
        }
    }
    true
}

/// The job's history (state changes and each node's start, end and cached mark) from its
/// first event, or after `since` / `Last-Event-ID`, then live ones (step progress, a
/// command's output lines, which have no `id`), until its terminal event: a client that
/// subscribes late, or again, misses nothing and sees it in order.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "events",
    params(("id" = String, Path, description = "The job's id"), EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "The last `id` this client saw")),
    responses(
        (status = 200, description = "Server-sent events: persisted ones carry `id: seq`", content_type = "text/event-stream", body = wire::StreamEvent),
        (status = 400, description = "`since` is not a sequence number", body = wire::ErrorBody),
        (status = 404, description = "No such job", body = wire::ErrorBody),
    ))]
async fn job_events(
    State(engine): State<Engine>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let since = since_of(q.since.as_deref(), headers.get("last-event-id"))?;
    let id = parse_id(&id)?;
    // Subscribe before reading the job and its backlog, so nothing falls between.
    let mut live = engine.bus().subscribe();
    let job = load(&engine, id.as_str()).await?;
    let backlog = engine.store().job_events(&job.id, since).await?;
    let (tx, rx) = mpsc::channel::<SseEvent>(256);
    let open = crate::metrics::StreamGuard::new(engine.metrics());
    tokio::spawn(async move {
        let _open = open;
        let mut last = since;
        if !send_persisted(&tx, &backlog, &mut last).await {
            return;
        }
        // Resumed past the end: nothing more will come.
        if job.state.is_terminal() {
            return;
        }
        loop {
            let next = tokio::select! {
                // A stream never outlives the server: shutdown waits for open connections.
                _ = engine.shutdown_token().cancelled() => return,
                next = live.recv() => next,
            };
            match next {
                // Writers on different tasks may publish out of sequence order: what
                // the store has up to here (everything below a committed number is
                // committed) goes out in order, so none is skipped.
                Ok(BusEvent::Persisted(e)) if e.job_id == job.id && e.seq > last => {
                    let Ok(missed) = engine.store().job_events(&job.id, last).await else {
                        return;
                    };
                    if !send_persisted(&tx, &missed, &mut last).await {
                        return;
                    }
                }
                Ok(BusEvent::Live(l)) if l.job_id == job.id => {
                    if tx
                        .send(SseEvent::default().event(live_kind(&l)).data(live_data(&l)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Progress may be lost; state changes are re-read from the store.
                    let Ok(missed) = engine.store().job_events(&job.id, last).await else {
                        return;
                    };
                    if !send_persisted(&tx, &missed, &mut last).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Ok(sse_of(rx))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// Start after this sequence number (or after `Last-Event-ID`); 0 by default.
    since: Option<String>,
}

/// Every persisted event after `since` (or `Last-Event-ID`), once and in sequence order,
/// then live ones as they commit; with them, without an `id`, each backend's whole row
/// (`backend`: every backend first, then one whenever what it shows changes) and the
/// running jobs' progress (`node`, `progress`). Publishers on different tasks may reach
/// the bus out of sequence order, so a gap is filled from the store (where everything
/// below a published sequence number has committed) rather than skipped. Progress is
/// coalesced for a client that reads slowly (the latest per job wins) and always sent
/// before any later state change, never after it. A client more than `resync_gap`
/// (10 000) events behind (`since` > 0), or ahead of the store, gets one `resync` event instead:
/// fetch `/v1/state` and follow from its `seq`.
#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(EventsQuery, ("Last-Event-ID" = Option<String>, Header, description = "The last `id` this client saw")),
    responses(
        (status = 200, description = "Server-sent events: every job event once and in sequence order (`id` = seq, data a StreamEvent), `backend` rows (data a Backend), `node` and `progress` (data a LiveEvent), or one `resync` (data a Resync)", content_type = "text/event-stream", body = wire::StreamEvent),
        (status = 400, description = "`since` is not a sequence number", body = wire::ErrorBody),
    ))]
async fn all_events(
    State(engine): State<Engine>,
    Query(q): Query<EventsQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let since = since_of(q.since.as_deref(), headers.get("last-event-id"))?;
    let mut live = engine.bus().subscribe();
    let newest = engine.store().last_seq().await?;
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let resync = if since > newest {
        Some(format!(
            "since {since} is past the newest event {newest} (another store?)"
        ))
    } else if since > 0 && newest - since > engine.config().resync_gap {
        Some(format!(
            "{} events behind, more than {}",
            newest - since,
            engine.config().resync_gap
        ))
    } else {
        None
    };
    if let Some(reason) = resync {
        let data = serde_json::to_string(&wire::Resync {
            seq: newest,
            reason,
        })
        .unwrap_or_default();
        let _ = tx.try_send(frame(None, "resync", &data));
        drop(tx);
        return Ok(farm_body(rx));
    }
    let open = crate::metrics::StreamGuard::new(engine.metrics());
    streams_runtime().spawn(async move {
        let _open = open;
        let mut last = since;
        let mut feed = Feed {
            tx,
            pending: Vec::new(),
        };
        // Every backend as it is now, then the backlog page by page; then the live tail.
        if !feed.backends(&engine).await || !catch_up(&engine, &feed.tx, &mut last).await {
            return;
        }
        let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
        keep_alive.tick().await;
        // Made once: a fresh `cancelled()` per event would take the token's lock each time.
        let stopping = engine.shutdown_token().clone();
        let cancelled = stopping.cancelled();
        tokio::pin!(cancelled);
        // Committed events that reached the bus ahead of one before them (publishers run
        // on different tasks): held until the gap fills, which takes microseconds, or
        // read from the store if it has not after `HOLD` (200 streams each reading the
        // store on every such gap is what would cost).
        let mut held = Held::new();
        let mut held_until = tokio::time::Instant::now();
        loop {
            let first = tokio::select! {
                _ = tokio::time::sleep_until(held_until), if !held.is_empty() => {
                    let ok = catch_up(&engine, &feed.tx, &mut last).await
                        && feed.release(&mut held, &mut last).await;
                    if !ok {
                        return;
                    }
                    continue;
                }
                // A stream never outlives the server: shutdown waits for open connections.
                _ = &mut cancelled => return,
                next = live.recv() => next,
                // A comment line keeps proxies from closing a quiet stream.
                _ = keep_alive.tick() => {
                    if feed.tx.send(Bytes::from_static(b":\n\n")).await.is_err() {
                        return;
                    }
                    continue;
                }
                // Coalesced progress goes out as soon as the client has room.
                _ = tokio::time::sleep(Duration::from_millis(50)), if !feed.pending.is_empty() => {
                    if !feed.flush().await {
                        return;
                    }
                    continue;
                }
            };
            // Whatever else is already on the bus is handled in the same wake-up: with
            // many streams open, waking each once per event is what costs.
            let mut next = Some(first);
            let mut handled = 0;
            while let Some(event) = next.take() {
                let ok = match event {
                    Ok(BusEvent::Persisted(e)) if e.seq == last + 1 => {
                        last = e.seq;
                        feed.flush().await
                            && feed.tx.send(frame_of_published(&e)).await.is_ok()
                            && feed.release(&mut held, &mut last).await
                    }
                    Ok(BusEvent::Persisted(e)) if e.seq > last => {
                        if held.is_empty() {
                            held_until = tokio::time::Instant::now() + HOLD;
                        }
                        held.insert(e.seq, e);
                        if held.len() > 1024 {
                            feed.flush().await
                                && catch_up(&engine, &feed.tx, &mut last).await
                                && feed.release(&mut held, &mut last).await
                        } else {
                            true
                        }
                    }
                    Ok(BusEvent::BackendState(b)) => {
                        let bytes = b.frame(|b| {
                            frame(
                                None,
                                "backend",
                                &serde_json::to_string(b).unwrap_or_default(),
                            )
                        });
                        feed.flush().await && feed.tx.send(bytes).await.is_ok()
                    }
                    // A command's output goes to its job's stream only.
                    Ok(BusEvent::Live(l)) if matches!(l.kind, wire::LiveKind::Log { .. }) => true,
                    Ok(BusEvent::Live(l)) => feed.live(&l),
                    Ok(_) => true,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Backend rows are not in the store: send them all again.
                        feed.flush().await
                            && catch_up(&engine, &feed.tx, &mut last).await
                            && feed.release(&mut held, &mut last).await
                            && feed.backends(&engine).await
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if !ok {
                    return;
                }
                handled += 1;
                if handled < 256 {
                    next = match live.try_recv() {
                        Ok(e) => Some(Ok(e)),
                        Err(broadcast::error::TryRecvError::Lagged(n)) => {
                            Some(Err(broadcast::error::RecvError::Lagged(n)))
                        }
                        Err(broadcast::error::TryRecvError::Closed) => {
                            Some(Err(broadcast::error::RecvError::Closed))
                        }
                        Err(broadcast::error::TryRecvError::Empty) => None,
                    };
                }
            }
        }
    });
    Ok(farm_body(rx))
}

/// Where a stream starts: `since`, else `Last-Event-ID`, else 0. Either must be a
/// sequence number (0 or more); the error names the one at fault.
fn since_of(
    query: Option<&str>,
    header: Option<&axum::http::HeaderValue>,
) -> Result<i64, ApiError> {
    let (what, text) = match (query, header) {
        (Some(s), _) => ("since", s.to_owned()),
        (None, Some(h)) => match h.to_str() {
            Ok(s) => ("Last-Event-ID", s.to_owned()),
            Err(_) => {
                return Err(ApiError::bad(
                    "invalid_since",
                    "Last-Event-ID must be an event sequence number, not bytes that are not visible ASCII",
                    json!({ "field": "Last-Event-ID" }),
                ))
            }
        },
        (None, None) => return Ok(0),
    };
    match text.trim().parse::<i64>() {
        Ok(n) if n >= 0 => Ok(n),
        _ => Err(ApiError::bad(
            "invalid_since",
            format!("{what} must be an event sequence number (0 or more), not {text:?}"),
            json!({ "field": what, "since": text }),
        )),
    }
}

/// Where farm streams run: a thread of their own at a lower OS priority, so that with
/// hundreds of monitors open, rendering and queueing their frames gives way to dispatch
/// (tokio has no task priorities; the kernel has thread priorities). Falls back to the
/// caller's runtime if the thread cannot be made.
fn streams_runtime() -> tokio::runtime::Handle {
    static STREAMS: std::sync::OnceLock<Option<tokio::runtime::Handle>> =
        std::sync::OnceLock::new();
    let made = STREAMS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("gantry-streams")
            .on_thread_start(lower_this_threads_priority)
            .enable_all()
            .build()
            .map_err(|e| tracing::warn!("farm streams share the main runtime: {e}"))
            .ok()?;
        let handle = rt.handle().clone();
        // The runtime lives as long as the process; its thread parks when no stream is open.
        std::mem::forget(rt);
        Some(handle)
    });
    made.clone().unwrap_or_else(tokio::runtime::Handle::current)
}

/// Nice 19 for the calling thread only (Linux applies setpriority to one thread).
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take no pointers; failure only leaves the priority as is.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

/// Committed events a farm stream holds back until the ones before them come.
type Held = std::collections::BTreeMap<i64, Arc<crate::bus::Published>>;

/// How long a farm stream waits for a gap in the sequence to fill from the bus.
const HOLD: Duration = Duration::from_millis(100);

/// How often a quiet farm stream sends a comment line.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One SSE frame.
fn frame(id: Option<i64>, event: &str, data: &str) -> Bytes {
    use bytes::BufMut;
    let mut b = bytes::BytesMut::with_capacity(data.len() + event.len() + 40);
    if let Some(id) = id {
        b.put_slice(b"id: ");
        b.put_slice(id.to_string().as_bytes());
        b.put_u8(b'\n');
    }
    b.put_slice(b"event: ");
    b.put_slice(event.as_bytes());
    b.put_u8(b'\n');
    for line in data.split('\n') {
        b.put_slice(b"data: ");
        b.put_slice(line.as_bytes());
        b.put_u8(b'\n');
    }
    b.put_u8(b'\n');
    b.freeze()
}

fn frame_of_event(e: &Event) -> Bytes {
    frame(Some(e.seq), e.kind.name(), &event_data(e))
}

/// A committed event's frame, made once for every stream.
fn frame_of_published(p: &crate::bus::Published) -> Bytes {
    p.frame(|e| frame(Some(e.seq), e.kind.name(), p.wire(event_data)))
}

/// The farm stream's response: what its task puts on `rx`, whatever has piled up sent
/// as one chunk (one write for a burst, however many streams are open).
fn farm_body(rx: mpsc::Receiver<Bytes>) -> Response {
    const BATCH: usize = 64 * 1024;
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let first = rx.recv().await?;
        let mut more = Vec::new();
        let mut size = first.len();
        while size < BATCH {
            match rx.try_recv() {
                Ok(b) => {
                    size += b.len();
                    more.push(b);
                }
                Err(_) => break,
            }
        }
        let chunk = if more.is_empty() {
            first
        } else {
            let mut all = bytes::BytesMut::with_capacity(size);
            all.extend_from_slice(&first);
            for b in more {
                all.extend_from_slice(&b);
            }
            all.freeze()
        };
        Some((Ok::<_, Infallible>(chunk), rx))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// One client of `/v1/events`: its channel, and the progress it had no room for.
struct Feed {
    tx: mpsc::Sender<Bytes>,
    /// The latest node and progress event per job, in order of first arrival.
    pending: Vec<(JobId, &'static str, Bytes)>,
}

impl Feed {
    /// Send or coalesce a live event; false once the client has left.
    fn live(&mut self, l: &crate::bus::Published<crate::bus::LiveEvent>) -> bool {
        let kind = live_kind(l);
        let event = l.frame(|l| frame(None, kind, &live_data(l)));
        // Behind coalesced ones, a new event waits its turn so the order holds.
        if !self.pending.is_empty() {
            self.coalesce(l.job_id.clone(), kind, event);
            return true;
        }
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(event)) => {
                self.coalesce(l.job_id.clone(), kind, event);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Keep only the latest: a progress event replaces the job's pending one (whatever
    /// its node: a node's start and end are persisted events, never coalesced).
    fn coalesce(&mut self, job: JobId, kind: &'static str, event: Bytes) {
        match self
            .pending
            .iter_mut()
            .find(|(j, k, _)| *j == job && *k == kind)
        {
            Some(slot) => slot.2 = event,
            None => self.pending.push((job, kind, event)),
        }
    }

    /// Send what was coalesced, before anything later; false once the client has left.
    async fn flush(&mut self) -> bool {
        for (_, _, event) in std::mem::take(&mut self.pending) {
            if self.tx.send(event).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Send the held events that now follow `last` in sequence, dropping those already
    /// sent; false once the client has left.
    async fn release(&mut self, held: &mut Held, last: &mut i64) -> bool {
        held.retain(|seq, _| *seq > *last);
        while let Some(e) = held.remove(&(*last + 1)) {
            *last = e.seq;
            if self.tx.send(frame_of_published(&e)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Every backend's row as it is now.
    async fn backends(&mut self, engine: &Engine) -> bool {
        for (b, _) in backend_rows(engine) {
            let data = serde_json::to_string(&b).unwrap_or_default();
            if self.tx.send(frame(None, "backend", &data)).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// The SSE response that sends what a stream's task puts on `rx`, until it ends.
fn sse_of(
    rx: mpsc::Receiver<SseEvent>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// The SSE event name of a live event.
fn live_kind(l: &crate::bus::LiveEvent) -> &'static str {
    match l.kind {
        wire::LiveKind::Progress { .. } => "progress",
        wire::LiveKind::Log { .. } => "log",
    }
}

/// A live event's JSON as the streams send it.
fn live_data(l: &crate::bus::LiveEvent) -> String {
    serde_json::to_string(&wire::LiveEvent {
        job_id: l.job_id.to_string(),
        attempt: l.attempt,
        backend: l.backend.clone(),
        kind: l.kind.clone(),
    })
    .unwrap_or_default()
}

/// Send every stored event after `last`; false once the client has left.
async fn catch_up(engine: &Engine, tx: &mpsc::Sender<Bytes>, last: &mut i64) -> bool {
    loop {
        let page = match engine.store().events_since(*last, 1000).await {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(error = %e, "event stream: cannot read the store");
                return false;
            }
        };
        for e in &page {
            *last = e.seq;
            if tx.send(frame_of_event(e)).await.is_err() {
                return false;
            }
        }
        if page.len() < 1000 {
            return true;
        }
    }
}

/// Store an input file for jobs to attach by its hash: the raw body, or the first file
/// of a multipart form. The same bytes give the same hash; storing them again is harmless.
#[utoipa::path(post, path = "/v1/files", tag = "jobs",
    request_body(content = Vec<u8>, description = "The file: a raw body (any content type), or multipart/form-data with one file field", content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored; attach it to a job as {\"name\", \"sha256\"}", body = wire::StoredFile),
        (status = 400, description = "No file in the form, or an empty file", body = wire::ErrorBody),
        (status = 413, description = "Over max_attachment_bytes; nothing was stored", body = wire::ErrorBody),
    ))]
async fn upload_file(
    State(engine): State<Engine>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    use axum::extract::FromRequest;
    let max = engine.config().max_attachment_bytes;
    let too_large = || ApiError::FileTooLarge {
        message: format!(
            "the file is over the limit of {max} bytes (max_attachment_bytes); nothing was stored"
        ),
        limit: max,
    };
    let is_form = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("multipart/form-data"));
    let bytes = if is_form {
        let mut form = axum::extract::Multipart::from_request(request, &())
            .await
            .map_err(|e| ApiError::bad("invalid_request", e.body_text(), json!({})))?;
        let mut found = None;
        loop {
            match form.next_field().await {
                Ok(Some(field)) if field.file_name().is_some() => {
                    found = Some(field.bytes().await.map_err(|e| {
                        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                            too_large()
                        } else {
                            ApiError::bad("invalid_request", e.body_text(), json!({}))
                        }
                    })?);
                    break;
                }
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(too_large()),
                Err(e) => return Err(ApiError::bad("invalid_request", e.body_text(), json!({}))),
            }
        }
        found.ok_or_else(|| {
            ApiError::bad(
                "missing_file",
                "the form has no file field (a part with a filename)",
                json!({}),
            )
        })?
    } else {
        match Bytes::from_request(request, &()).await {
            Ok(b) => b,
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(too_large()),
            Err(r) => return Err(ApiError::bad("invalid_request", r.body_text(), json!({}))),
        }
    };
    if bytes.len() as u64 > max {
        return Err(too_large());
    }
    if bytes.is_empty() {
        return Err(ApiError::bad("empty_file", "the file is empty", json!({})));
    }
    let size = bytes.len() as u64;
    let sha256 = engine.attachments().put(bytes).await.map_err(|e| {
        tracing::error!(error = %e, "cannot store an uploaded file");
        ApiError::Unavailable(format!("cannot store the file: {e}"))
    })?;
    Ok((StatusCode::CREATED, Json(wire::StoredFile { sha256, size })).into_response())
}

#[utoipa::path(get, path = "/v1/jobs/{id}/outputs/{name}", tag = "jobs",
    params(("id" = String, Path, description = "The job's id"), ("name" = String, Path, description = "The output's `name`")),
    responses(
        (status = 200, description = "The file, with its own content type (image/png, video/mp4, ...)", content_type = "*/*"),
        (status = 404, description = "No such job or output", body = wire::ErrorBody),
    ))]
async fn get_output(
    State(engine): State<Engine>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let job = load(&engine, &id).await?;
    let output = job
        .outputs
        .iter()
        .find(|o| o.name == name)
        .ok_or_else(|| ApiError::NotFound(format!("job {} has no output {name:?}", job.id)))?;
    let bytes = engine
        .outputs()
        .read(&output.sha256)
        .await
        .map_err(|e| ApiError::Internal(format!("output {name} is not readable: {e}")))?;
    Ok((
        [(header::CONTENT_TYPE, content_type(&output.filename))],
        Body::from(bytes),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/jobs/{id}/log", tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "A command job's whole output, stdout and stderr interleaved as heard", content_type = "text/plain"),
        (status = 404, description = "No such job, or no log (not a command job, or it has not ended)", body = wire::ErrorBody),
    ))]
async fn get_log(
    State(engine): State<Engine>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = load(&engine, &id).await?;
    let log = job_view(&job).result.and_then(|r| r.log).ok_or_else(|| {
        ApiError::NotFound(format!(
            "job {} has no log: logs are kept for command jobs once they end",
            job.id
        ))
    })?;
    let bytes = engine.outputs().read(&log.sha256).await.map_err(|e| {
        ApiError::Internal(format!("the log of job {} is not readable: {e}", job.id))
    })?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from(bytes),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/backends", tag = "backends",
    responses((status = 200, description = "The backends this coordinator knows, with live status", body = wire::BackendList)))]
async fn list_backends(State(engine): State<Engine>) -> Json<wire::BackendList> {
    Json(wire::BackendList {
        backends: backend_rows(&engine).into_iter().map(|(b, _)| b).collect(),
    })
}

/// Every backend as a client sees it now, with when it was last heard from.
pub(crate) fn backend_rows(engine: &Engine) -> Vec<(wire::Backend, Option<Millis>)> {
    let (now, stale) = (now_ms(), engine.stale_after_ms());
    type Row = (wire::Backend, Option<Millis>, Option<(JobId, u32)>);
    let views: Vec<Row> = engine
        .backends()
        .values()
        .map(|b| (backend_view(b, now, stale), b.last_seen, b.current.clone()))
        .collect();
    // The progress lock is taken apart from the backends'.
    views
        .into_iter()
        .map(|(mut v, seen, current)| {
            if let Some((job, n)) = current {
                v.progress = engine.progress_of(&job).filter(|p| p.attempt == n);
            }
            (v, seen)
        })
        .collect()
}

/// A backend as a client sees it (without its progress, which the engine keeps apart).
fn backend_view(
    b: &crate::engine::BackendState,
    now: Millis,
    stale_after: Millis,
) -> wire::Backend {
    wire::Backend {
        progress: None,
        name: b.config.name.clone(),
        kind: if b.agent {
            wire::BackendKind::Agent
        } else {
            wire::BackendKind::Url
        },
        allow: b.programs.as_ref().filter(|_| b.agent).map(|p| p.to_vec()),
        url: b.config.url.clone(),
        tags: b.config.tags.clone(),
        priority: b.config.priority,
        status: crate::monitor::status_of(b, now, stale_after),
        current_job: b.current.as_ref().map(|(j, _)| j.to_string()),
        current_attempt: b.current.as_ref().map(|(_, n)| *n),
        next_job: b.next.as_ref().map(|(j, _)| j.to_string()),
        last_seen: opt_time(b.last_seen),
        last_used: (b.last_used > 0).then(|| rfc3339(b.last_used)),
        last_error: b.last_error.clone(),
        node_classes: b.classes.as_ref().map(|c| c.len()),
        warm_models: b.warm_models.clone(),
        blocks: b
            .health
            .blocks()
            .iter()
            .map(|(hash, until)| wire::Block {
                workflow_hash: hash.clone(),
                until: rfc3339(*until),
            })
            .collect(),
        circuit: match b.health.circuit() {
            gantry_core::health::Circuit::Closed => wire::Circuit::Closed,
            gantry_core::health::Circuit::Open { since, probe_at } => wire::Circuit::Open {
                since: rfc3339(since),
                probe_at: rfc3339(probe_at),
            },
        },
        stuck: b.stuck.as_ref().map(|(pid, since)| wire::Stuck {
            prompt_id: pid.clone(),
            since: rfc3339(*since),
        }),
    }
}

/// Add a ComfyUI server at run time. It is kept in the store, so it is driven after a
/// restart and, in a farm, leased by whichever coordinator has room.
#[utoipa::path(post, path = "/v1/backends", tag = "backends",
    request_body = wire::AddBackend,
    responses(
        (status = 201, description = "Added; its driver connects", body = wire::Backend),
        (status = 400, description = "The body or the URL is not valid", body = wire::ErrorBody),
        (status = 409, description = "A backend of that name or URL exists", body = wire::ErrorBody),
        (status = 503, description = "The store cannot be reached; nothing was added", body = wire::ErrorBody),
    ))]
async fn add_backend(State(engine): State<Engine>, body: Bytes) -> Result<Response, ApiError> {
    let req: wire::AddBackend = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad(
            "invalid_request",
            format!("the body must be {{\"url\": ..., \"name\"?, \"tags\"?, \"priority\"?}}: {e}"),
            json!({}),
        )
    })?;
    let spec = match &req.name {
        Some(name) => format!("{name}={}", req.url),
        None => req.url.clone(),
    };
    let mut config = crate::config::BackendConfig::parse(&spec)
        .map_err(|e| ApiError::bad("invalid_backend", e.to_string(), json!({"field": "url"})))?;
    if let Some(tag) = req.tags.iter().find(|t| t.trim().is_empty()) {
        return Err(ApiError::bad(
            "invalid_field",
            format!("tags: must be non-empty strings, got {tag:?}"),
            json!({"field": "tags"}),
        ));
    }
    config.tags = req.tags.clone();
    config.priority = req.priority.unwrap_or(0);
    let exists = |by: &str, other: &str| ApiError::Conflict {
        code: "backend_exists",
        message: format!("a backend with that {by} exists: {other}"),
        details: json!({"backend": other}),
    };
    if let Some(other) = engine
        .backends()
        .values()
        .find(|b| b.config.name == config.name || b.config.url == config.url)
    {
        let by = if other.config.name == config.name {
            "name"
        } else {
            "URL"
        };
        return Err(exists(by, &other.config.name));
    }
    let record = gantry_store::BackendRecord {
        name: config.name.clone(),
        url: config.url.clone(),
        tags: config.tags.clone(),
        priority: config.priority,
        added_at: crate::engine::now_ms(),
    };
    if !engine.store().add_backend(&record).await? {
        // Another coordinator added it a moment ago.
        return Err(exists("name or URL", &config.name));
    }
    let name = config.name.clone();
    engine.add_backend(config);
    tracing::info!(backend = %name, url = %record.url, "backend added");
    let view = backend_rows(&engine)
        .into_iter()
        .map(|(b, _)| b)
        .find(|b| b.name == name)
        .ok_or_else(|| ApiError::Internal(format!("backend {name} vanished as it was added")))?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// Take a backend out of rotation: it takes no new work; what runs there finishes.
#[utoipa::path(post, path = "/v1/backends/{name}/drain", tag = "backends",
    params(("name" = String, Path, description = "The backend's name")),
    responses(
        (status = 200, body = wire::BackendStatusOf),
        (status = 404, description = "No such backend", body = wire::ErrorBody),
        (status = 409, description = "Another coordinator drives it", body = wire::ErrorBody),
    ))]
async fn drain_backend(
    State(engine): State<Engine>,
    Path(name): Path<String>,
) -> Result<Json<wire::BackendStatusOf>, ApiError> {
    set_draining(&engine, &name, true)
}

/// Put a drained backend back in rotation.
#[utoipa::path(post, path = "/v1/backends/{name}/resume", tag = "backends",
    params(("name" = String, Path, description = "The backend's name")),
    responses(
        (status = 200, body = wire::BackendStatusOf),
        (status = 404, description = "No such backend", body = wire::ErrorBody),
        (status = 409, description = "Another coordinator drives it", body = wire::ErrorBody),
    ))]
async fn resume_backend(
    State(engine): State<Engine>,
    Path(name): Path<String>,
) -> Result<Json<wire::BackendStatusOf>, ApiError> {
    set_draining(&engine, &name, false)
}

/// Lift a backend's block on a workflow shape now, instead of at the end of its
/// cooldown.
#[utoipa::path(delete, path = "/v1/backends/{name}/blocks/{workflow_hash}", tag = "backends",
    params(
        ("name" = String, Path, description = "The backend's name"),
        ("workflow_hash" = String, Path, description = "The blocked workflow shape"),
    ),
    responses(
        (status = 200, description = "Lifted; the backend as it is now", body = wire::Backend),
        (status = 404, description = "No such backend, or it has no such block", body = wire::ErrorBody),
        (status = 409, description = "Another coordinator drives it", body = wire::ErrorBody),
    ))]
async fn lift_block(
    State(engine): State<Engine>,
    Path((name, hash)): Path<(String, String)>,
) -> Result<Json<wire::Backend>, ApiError> {
    match engine.lift_block(&name, &hash) {
        None => Err(ApiError::NotFound(format!("no backend {name}"))),
        Some(Err(())) => Err(not_driven_here(&name)),
        Some(Ok(false)) => Err(ApiError::NotFound(format!(
            "backend {name} has no block on workflow {hash}"
        ))),
        Some(Ok(true)) => backend_rows(&engine)
            .into_iter()
            .map(|(b, _)| b)
            .find(|b| b.name == name)
            .map(Json)
            .ok_or_else(|| ApiError::NotFound(format!("no backend {name}"))),
    }
}

/// The farm now, for the monitor: backends, queue depth by priority, running and
/// recently ended jobs, counts, and the `seq` of the last event it includes, from which
/// `GET /v1/events?since=SEQ` goes on.
#[utoipa::path(get, path = "/v1/state", tag = "events",
    responses(
        (status = 200, body = wire::FarmState),
        (status = 503, description = "The store cannot be reached", body = wire::ErrorBody),
    ))]
async fn farm_state(State(engine): State<Engine>) -> Result<Json<wire::FarmState>, ApiError> {
    Ok(Json(crate::monitor::farm_state(&engine).await?))
}

/// The refusal of an action on a backend another coordinator drives.
fn not_driven_here(name: &str) -> ApiError {
    ApiError::Conflict {
        code: "not_driven_here",
        message: format!(
            "backend {name} is driven by another coordinator: send this to the one holding its lease (see /v1/cluster)"
        ),
        details: json!({"backend": name}),
    }
}

/// Drain or resume `name` on the coordinator that drives it.
fn set_draining(
    engine: &Engine,
    name: &str,
    drain: bool,
) -> Result<Json<wire::BackendStatusOf>, ApiError> {
    match engine.set_draining(name, drain) {
        None => Err(ApiError::NotFound(format!("no backend {name}"))),
        Some(false) => Err(not_driven_here(name)),
        Some(true) => {
            let (now, stale) = (now_ms(), engine.stale_after_ms());
            let status = engine
                .backends()
                .get(name)
                .map(|b| crate::monitor::status_of(b, now, stale))
                .unwrap_or(wire::BackendStatus::Offline);
            Ok(Json(wire::BackendStatusOf {
                name: name.to_owned(),
                status,
            }))
        }
    }
}

/// Counters, gauges and histograms in the OpenMetrics text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String),
        (status = 503, description = "The store cannot be reached", body = wire::ErrorBody),
    ))]
async fn metrics(State(engine): State<Engine>) -> Result<Response, ApiError> {
    let text = crate::metrics::render(&engine).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// This coordinator's place in the farm: its id, the leases it holds, the writes its
/// fences refused, and every lease as the database has it.
#[utoipa::path(get, path = "/v1/cluster", tag = "operations",
    responses(
        (status = 200, body = wire::Cluster),
        (status = 503, description = "The store cannot be reached", body = wire::ErrorBody),
    ))]
async fn cluster(State(engine): State<Engine>) -> Result<Json<wire::Cluster>, ApiError> {
    let Some(cluster) = engine.cluster() else {
        return Ok(Json(wire::Cluster {
            store: "embedded".into(),
            coordinator: None,
            lease_ms: None,
            held: None,
            fenced_writes: None,
            leases: None,
        }));
    };
    let held = engine
        .owned_leases()
        .into_iter()
        .map(|(backend, token)| wire::HeldLease { backend, token })
        .collect();
    let all = cluster
        .leases
        .leases()
        .await?
        .into_iter()
        .map(|l| wire::Lease {
            backend: l.backend,
            owner: l.owner,
            token: l.token,
            remaining_ms: l.remaining_ms,
        })
        .collect();
    Ok(Json(wire::Cluster {
        store: "postgres".into(),
        coordinator: Some(cluster.id.clone()),
        lease_ms: Some(cluster.lease.as_millis() as u64),
        held: Some(held),
        fenced_writes: Some(
            cluster
                .fenced_writes
                .load(std::sync::atomic::Ordering::Relaxed),
        ),
        leases: Some(all),
    }))
}

/// Whether this coordinator can serve: 503 when its store cannot be reached.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses(
        (status = 200, body = wire::Health),
        (status = 503, description = "The store cannot be reached", body = wire::Health),
    ))]
async fn healthz(State(engine): State<Engine>) -> Response {
    let store_ok = engine.store().events_since(i64::MAX, 1).await.is_ok();
    let (n, connected) = {
        let b = engine.backends();
        (
            b.len(),
            b.values()
                .filter(|b| b.connection == Connection::Connected)
                .count(),
        )
    };
    let status = if store_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(wire::Health {
            status: if store_ok { "ok" } else { "store_unavailable" }.into(),
            backends: n,
            connected,
        }),
    )
        .into_response()
}

fn session_of(engine: &Engine, principal: Option<Principal>) -> wire::Session {
    wire::Session {
        auth: engine.auth().required(),
        token: principal.map(|p| wire::TokenInfo {
            id: p.id,
            name: p.name,
            scope: p.scope,
        }),
    }
}

/// Whether the server asks for tokens, and the token this request carries (header or
/// cookie) when it is valid.
#[utoipa::path(get, path = "/v1/session", tag = "operations",
    responses(
        (status = 200, body = wire::Session),
        (status = 401, description = "The token sent is not valid", body = wire::ErrorBody),
    ))]
async fn get_session(
    State(engine): State<Engine>,
    headers: axum::http::HeaderMap,
) -> Result<Json<wire::Session>, ApiError> {
    let principal = match crate::auth::presented(&headers) {
        Some(t) => Some(engine.auth().check(&t).await?),
        None => None,
    };
    Ok(Json(session_of(&engine, principal)))
}

/// Sign in: a token (bearer header, or `{"token": ...}`) exchanged for the HttpOnly,
/// SameSite=Strict cookie that a browser sends with every request, EventSource too.
#[utoipa::path(post, path = "/v1/session", tag = "operations",
    request_body(content = Option<wire::SignIn>, description = "The token, when not sent as a bearer"),
    responses(
        (status = 200, description = "Signed in; the cookie is set", body = wire::Session),
        (status = 400, description = "No token was sent", body = wire::ErrorBody),
        (status = 401, description = "The token is not valid", body = wire::ErrorBody),
    ))]
async fn sign_in(
    State(engine): State<Engine>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let token = match crate::auth::bearer(&headers) {
        Some(t) => t,
        None if body.is_empty() => {
            return Err(ApiError::bad(
                "missing_token",
                "send the token as Authorization: Bearer TOKEN or as {\"token\": \"...\"}",
                json!({}),
            ))
        }
        None => {
            serde_json::from_slice::<wire::SignIn>(&body)
                .map_err(|e| {
                    ApiError::bad(
                        "invalid_request",
                        format!("the body must be {{\"token\": \"...\"}}: {e}"),
                        json!({}),
                    )
                })?
                .token
        }
    };
    let principal = engine.auth().check(&token).await?;
    let cookie = format!(
        "{}={token}; HttpOnly; SameSite=Strict; Path=/",
        crate::auth::COOKIE
    );
    Ok((
        [(header::SET_COOKIE, cookie)],
        Json(session_of(&engine, Some(principal))),
    )
        .into_response())
}

/// Sign out: the cookie is cleared.
#[utoipa::path(delete, path = "/v1/session", tag = "operations",
    responses((status = 200, description = "Signed out; the cookie is cleared", body = wire::Session)))]
async fn sign_out(State(engine): State<Engine>) -> Response {
    let cookie = format!(
        "{}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
        crate::auth::COOKIE
    );
    (
        [(header::SET_COOKIE, cookie)],
        Json(session_of(&engine, None)),
    )
        .into_response()
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct StatsQuery {
    /// Only this node class.
    class: Option<String>,
    /// Only this workflow shape (`workflow_hash` of a job).
    workflow: Option<String>,
    /// Only this backend.
    backend: Option<String>,
    /// From this moment: RFC 3339, or a duration ago (`24h`, `7d`).
    since: Option<String>,
    /// Group by `class` (the default) and any of `workflow`, `backend`, comma-separated.
    by: Option<String>,
}

/// Per node class (and workflow, and backend): runs, cached ratio, failures, timeouts
/// and duration quantiles, from every finished attempt's profile.
#[utoipa::path(get, path = "/v1/stats/nodes", tag = "jobs", params(StatsQuery),
    responses(
        (status = 200, body = wire::NodeStatsList),
        (status = 400, description = "A query parameter is not valid", body = wire::ErrorBody),
    ))]
async fn node_stats(
    State(engine): State<Engine>,
    Query(q): Query<StatsQuery>,
) -> Result<Json<wire::NodeStatsList>, ApiError> {
    let by: Vec<String> = match q.by.as_deref() {
        None | Some("") => vec!["class".into()],
        Some(list) => {
            let mut by = vec!["class".to_owned()];
            for part in list.split(',').map(str::trim) {
                match part {
                    "class" => {}
                    "workflow" | "backend" if !by.iter().any(|b| b == part) => by.push(part.into()),
                    "workflow" | "backend" => {}
                    other => {
                        return Err(ApiError::bad(
                            "invalid_query",
                            format!("by={other}: group by class, workflow or backend"),
                            json!({"field": "by"}),
                        ))
                    }
                }
            }
            by
        }
    };
    let since = stats_since(q.since.as_deref(), crate::engine::now_ms())?;
    let rows = engine
        .store()
        .node_stats(&gantry_store::stats::StatsFilter {
            class: q.class.filter(|s| !s.is_empty()),
            workflow: q.workflow.filter(|s| !s.is_empty()),
            backend: q.backend.filter(|s| !s.is_empty()),
            since,
        })
        .await?;
    let with_workflow = by.iter().any(|b| b == "workflow");
    let with_backend = by.iter().any(|b| b == "backend");
    let mut groups: Vec<gantry_store::stats::NodeStats> = Vec::new();
    for row in rows {
        let workflow = if with_workflow {
            row.workflow.as_str()
        } else {
            ""
        };
        let backend = if with_backend {
            row.backend.as_str()
        } else {
            ""
        };
        match groups
            .iter_mut()
            .find(|g| g.class == row.class && g.workflow == workflow && g.backend == backend)
        {
            Some(g) => g.merge(&row),
            None => {
                let mut g = gantry_store::stats::NodeStats::empty(&row.class, workflow, backend, 0);
                g.merge(&row);
                groups.push(g);
            }
        }
    }
    let stats = groups
        .into_iter()
        .map(|g| {
            // A sketch's quantile may overshoot the exact maximum by its relative error.
            let max = g.sketch.max();
            let q = |q: f64| g.quantile(q).map(|v| max.map_or(v, |m| v.min(m)));
            (q(0.5), q(0.95), q(0.99), max, g)
        })
        .map(|(p50, p95, p99, max, g)| wire::NodeStatsEntry {
            cached_ratio: if g.count == 0 {
                0.0
            } else {
                g.cached as f64 / g.count as f64
            },
            measured: g.sketch.count() as u64,
            p50_ms: p50,
            p95_ms: p95,
            p99_ms: p99,
            max_ms: max,
            workflow: with_workflow.then(|| g.workflow.clone()),
            backend: with_backend.then(|| g.backend.clone()),
            class: g.class,
            count: g.count,
            cached: g.cached,
            failed: g.failed,
            timed_out: g.timed_out,
        })
        .collect();
    Ok(Json(wire::NodeStatsList { by, stats }))
}

/// `since` of `/v1/stats/nodes`: an RFC 3339 time, or a duration before `now` (one
/// longer ago than the clock began means from the beginning).
fn stats_since(since: Option<&str>, now: Millis) -> Result<Option<Millis>, ApiError> {
    let s = match since {
        None | Some("") => return Ok(None),
        Some(s) => s,
    };
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Some(t.timestamp_millis()));
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(Some(
            now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )),
        Err(_) => Err(ApiError::bad(
            "invalid_query",
            format!("since={s}: give an RFC 3339 time or a duration ago, like 24h"),
            json!({"field": "since"}),
        )),
    }
}

/// The node-stall limit history gives each class on each backend, and why: in force for
/// the classes `[adaptive]` names, a suggestion for the others (then with its defaults:
/// factor 3, floor 30 s, 20 samples).
#[utoipa::path(get, path = "/v1/stats/timeouts", tag = "jobs",
    responses((status = 200, body = wire::TimeoutSuggestions)))]
async fn timeout_suggestions(State(engine): State<Engine>) -> Json<wire::TimeoutSuggestions> {
    let configured = engine.config().adaptive.clone();
    let policy = configured.clone().unwrap_or_default();
    let suggestions = engine
        .history_keys()
        .into_iter()
        .map(|(class, backend)| {
            let s = engine.suggest(&policy, &class, &backend);
            wire::TimeoutSuggestion {
                slow: engine.is_slow(&class, &backend),
                applied: configured.as_ref().is_some_and(|p| p.applies_to(&class)),
                class: s.class,
                backend: s.backend,
                backend_samples: s.backend_samples,
                farm_samples: s.farm_samples,
                source: s.source.into(),
                p99_ms: s.p99_ms,
                node_stall_ms: s.node_stall_ms,
                reason: s.reason,
            }
        })
        .collect();
    Json(wire::TimeoutSuggestions {
        enabled: configured.is_some(),
        classes: policy.classes.clone(),
        factor: policy.factor,
        floor_ms: policy.floor.as_millis() as u64,
        min_samples: policy.min_samples,
        suggestions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::LiveEvent;

    fn live(job: &JobId, kind: wire::LiveKind) -> crate::bus::Published<LiveEvent> {
        crate::bus::Published::new(LiveEvent {
            job_id: job.clone(),
            attempt: 1,
            backend: "a".into(),
            kind,
        })
    }

    fn progress(node: &str, value: f64) -> wire::LiveKind {
        wire::LiveKind::Progress {
            node: node.into(),
            value,
            max: 10.0,
        }
    }

    /// A frame as text.
    fn text(e: &Bytes) -> String {
        String::from_utf8_lossy(e).into_owned()
    }

    #[tokio::test]
    async fn a_slow_reader_gets_the_latest_progress_in_order_and_before_what_follows() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut feed = Feed {
            tx,
            pending: Vec::new(),
        };
        let (j, k) = (JobId::random(), JobId::random());
        // The channel takes one; the rest wait, coalesced per job.
        assert!(feed.live(&live(&j, progress("3", 1.0))));
        for v in 2..=5 {
            assert!(feed.live(&live(&j, progress("3", f64::from(v)))));
        }
        assert!(feed.live(&live(&k, progress("7", 1.0))));
        // Progress of the next node makes the job's pending progress moot.
        assert!(feed.live(&live(&j, progress("8", 1.0))));
        assert_eq!(feed.pending.len(), 2, "j's latest progress and k's");
        let first = rx.recv().await.unwrap();
        assert!(text(&first).contains("\"value\":1.0"), "{}", text(&first));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(e) = rx.recv().await {
                got.push(text(&e));
            }
            got
        });
        assert!(feed.flush().await);
        drop(feed);
        let got = reader.await.unwrap();
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(
            got[0].contains(&j.to_string()) && got[0].contains("\"node\":\"8\""),
            "{got:#?}"
        );
        assert!(got[1].contains(&k.to_string()), "{got:#?}");
        assert!(
            !got.iter().any(|g| g.contains("\"node\":\"3\"")),
            "{got:#?}"
        );
    }
}

/// Property tests of the API's parsers of what clients send: the submit body (with its
/// workflow, command and attachments), `since` and `Last-Event-ID`, and the stats
/// query's `since`. Whatever comes, each answers a value or a 4xx naming what is
/// wrong, and never panics. `tests/it/fuzz.rs` sends the same over HTTP to every route.
/// `PROPTEST_CASES` asks for more cases.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases,
            rng_seed: proptest::test_runner::RngSeed::Fixed(24),
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "\\PC{0,10}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec(
                    (prop_oneof![Just("workflow".to_owned()), "\\PC{0,6}"], inner),
                    0..5
                )
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// Valid submit bodies of every kind, each to be broken one place at a time.
    fn valid_bodies() -> Vec<Value> {
        let workflow = json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
        });
        vec![
            json!({"workflow": workflow}),
            json!({
                "workflow": workflow, "priority": 5, "max_attempts": 2, "tags": ["gpu"],
                "timeouts": {"node_stall_ms": 1000, "deadline_ms": 60000},
                "idempotency_key": "k-1", "metadata": {"who": "me"},
                "attachments": [{"name": "face.png", "data": "aGVsbG8="}],
            }),
            json!({"workflow": workflow, "attachments": [{"name": "face.png", "sha256": "ab".repeat(32)}]}),
            json!({"kind": "command", "command": {"argv": ["/bin/echo", "hi"], "env": {"A": "1"},
                "cwd": "/tmp", "timeout_ms": 5000, "operation": "model_download"}}),
        ]
    }

    fn mutated_body() -> impl Strategy<Value = Value> {
        let bodies = valid_bodies();
        (
            0..bodies.len(),
            any::<usize>(),
            prop_oneof![
                any_json(),
                // Huge and odd numbers where numbers go.
                prop::sample::select(vec![
                    json!(u64::MAX),
                    json!(i64::MIN),
                    json!(1e300),
                    json!(-0.5),
                    json!(gantry_core::MAX_LIMIT_MS + 1),
                    json!(9_223_372_036_854_775_000u64),
                ]),
            ],
            any::<bool>(),
        )
            .prop_map(move |(b, at, junk, remove)| {
                let mut body = bodies[b].clone();
                mutate(&mut body, at, junk, remove);
                body
            })
    }

    /// Replaces (or removes) the value at one of `v`'s paths, picked by `at`.
    fn mutate(v: &mut Value, at: usize, junk: Value, remove: bool) {
        fn count(v: &Value) -> usize {
            1 + match v {
                Value::Object(m) => m.values().map(count).sum(),
                Value::Array(a) => a.iter().map(count).sum(),
                _ => 0,
            }
        }
        // Walks down to the `n`th value in pre-order and changes it there.
        fn at_nth(v: &mut Value, n: &mut usize, junk: &mut Option<Value>, remove: bool) -> bool {
            let children: Vec<String> = match v {
                Value::Object(m) => m.keys().cloned().collect(),
                Value::Array(a) => (0..a.len()).map(|i| i.to_string()).collect(),
                _ => Vec::new(),
            };
            for key in children {
                *n -= 1;
                if *n == 0 {
                    match v {
                        Value::Object(m) if remove => {
                            m.remove(&key);
                        }
                        Value::Array(a) if remove => {
                            a.remove(key.parse::<usize>().unwrap_or_default());
                        }
                        Value::Object(m) => {
                            m.insert(key, junk.take().unwrap_or_default());
                        }
                        Value::Array(a) => {
                            a[key.parse::<usize>().unwrap_or_default()] =
                                junk.take().unwrap_or_default();
                        }
                        _ => {}
                    }
                    return true;
                }
                let child = match v {
                    Value::Object(m) => m.get_mut(&key),
                    Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
                    _ => None,
                };
                if let Some(child) = child {
                    if at_nth(child, n, junk, remove) {
                        return true;
                    }
                }
            }
            false
        }
        let mut n = at % count(v);
        if n == 0 {
            *v = junk;
            return;
        }
        at_nth(v, &mut n, &mut Some(junk), remove);
    }

    /// A refusal of a parser: a 4xx whose message says something.
    fn check_refusal(e: &ApiError) -> Result<(), TestCaseError> {
        match e {
            ApiError::BadRequest { message, code, .. } => {
                prop_assert!(!message.is_empty() && !code.is_empty());
            }
            ApiError::FileTooLarge { message, .. } => prop_assert!(!message.is_empty()),
            other => prop_assert!(false, "a parser answered {other:?}"),
        }
        Ok(())
    }

    /// What `create_job` does with a body before it touches the engine.
    fn check_submit(body: &Value) -> Result<(), TestCaseError> {
        let spec = match parse_submit(body, 3) {
            Ok(spec) => spec,
            Err(e) => return check_refusal(&e),
        };
        prop_assert!((1..=100).contains(&spec.max_attempts));
        prop_assert!(spec.timeouts.over_max().is_none(), "{:?}", spec.timeouts);
        prop_assert!(spec.tags.iter().all(|t| !t.is_empty()));
        if let Some(c) = &spec.command {
            prop_assert!(!c.program().is_empty());
            prop_assert!(c.timeout_ms.is_none_or(|ms| ms <= MAX_LIMIT_MS));
        } else {
            prop_assert!(!spec.workflow.graph().is_empty());
        }
        match parse_attachments(body.get("attachments"), &spec.workflow, 1024) {
            Ok(list) => {
                for (name, _) in &list {
                    prop_assert!(!name.is_empty() && !name.contains(['/', '\\']));
                    prop_assert!(!spec.workflow.inputs_naming(name).is_empty());
                }
            }
            Err(e) => check_refusal(&e)?,
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(config(512))]

        #[test]
        fn any_json_body_is_a_job_or_a_refusal(body in any_json()) {
            check_submit(&body)?;
        }

        #[test]
        fn broken_valid_bodies_are_jobs_or_refusals(body in mutated_body()) {
            check_submit(&body)?;
        }

        #[test]
        fn since_is_a_sequence_number_or_a_refusal(
            query in prop_oneof![Just(None), "\\PC{0,24}".prop_map(Some), any::<i64>().prop_map(|n| Some(n.to_string()))],
            header in prop_oneof![Just(None), prop::collection::vec(any::<u8>(), 0..24).prop_map(Some)],
        ) {
            let header = header.and_then(|h| axum::http::HeaderValue::from_bytes(&h).ok());
            match since_of(query.as_deref(), header.as_ref()) {
                Ok(n) => prop_assert!(n >= 0),
                Err(e) => check_refusal(&e)?,
            }
        }

        #[test]
        fn stats_since_is_a_time_or_a_refusal(
            since in prop_oneof![
                "\\PC{0,16}",
                (any::<u64>(), prop::sample::select(vec!["ms", "s", "m", "h", "d", "w", "y"])).prop_map(|(n, u)| format!("{n}{u}")),
                any::<i64>().prop_map(rfc3339),
            ],
            now in any::<i64>(),
        ) {
            if let Err(e) = stats_since(Some(&since), now) {
                check_refusal(&e)?;
            }
        }
    }

    /// Found by `broken_valid_bodies_are_jobs_or_refusals`: a deadline near `i64::MAX`
    /// milliseconds was accepted, and the queue's `created_at + deadline` overflowed.
    #[test]
    fn a_timeout_over_ten_years_is_refused_by_field() {
        let body = json!({"workflow": {"1": {"class_type": "A", "inputs": {}}},
            "timeouts": {"deadline_ms": 9_223_372_036_854_775_000u64}});
        let Err(ApiError::BadRequest { message, .. }) = parse_submit(&body, 3) else {
            panic!("accepted");
        };
        assert_eq!(
            message,
            "timeouts.deadline_ms: must be at most 315360000000 (ten years), got 9223372036854775000"
        );
        let body =
            json!({"kind": "command", "command": {"argv": ["/bin/true"], "timeout_ms": u64::MAX}});
        let Err(ApiError::BadRequest { message, .. }) = parse_submit(&body, 3) else {
            panic!("accepted");
        };
        assert!(
            message.starts_with("command.timeout_ms: must be at most"),
            "{message}"
        );
    }

    /// Found by `stats_since_is_a_time_or_a_refusal`: a duration longer than the clock
    /// reaches back (`?since=500000000000y`) overflowed the subtraction.
    #[test]
    fn a_stats_since_before_the_clock_began_is_from_the_beginning() {
        let since = stats_since(Some("500000000000y"), 1_700_000_000_000)
            .ok()
            .flatten();
        assert!(since.is_some_and(|ms| ms < 0), "{since:?}");
    }

    /// `Last-Event-ID` (and `since`) must be a sequence number: negative or garbled
    /// ones are refused by name.
    #[test]
    fn since_names_where_it_came_from() {
        let header = axum::http::HeaderValue::from_static("-4");
        let Err(ApiError::BadRequest { message, .. }) = since_of(None, Some(&header)) else {
            panic!("accepted");
        };
        assert_eq!(
            message,
            "Last-Event-ID must be an event sequence number (0 or more), not \"-4\""
        );
        assert_eq!(since_of(Some(" 12 "), Some(&header)).ok(), Some(12));
        let opaque = axum::http::HeaderValue::from_bytes(&[0xff]).unwrap();
        assert!(since_of(None, Some(&opaque)).is_err());
        assert_eq!(since_of(None, None).ok(), Some(0));
    }
}
