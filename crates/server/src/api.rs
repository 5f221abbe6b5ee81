//! The v1 HTTP API: parse and check requests at the edge, call the engine, and turn
//! domain values into the wire's JSON (RFC 3339 timestamps, `_ms` durations, one error
//! shape).

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use gantry_core::{EventKind, Job, JobId, JobSpec, JobState, Millis, Refused, Timeouts, Workflow};
use gantry_store::{Created, Event, JobFilter};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use tokio::sync::{broadcast, mpsc};

use crate::bus::BusEvent;
use crate::engine::{self, Applied, Connection, Engine};
use crate::outputs::content_type;

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
    /// The store cannot be reached: nothing was accepted or changed.
    Unavailable(String),
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
            ApiError::Unavailable(message) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("{message}; nothing was accepted or changed, try again shortly"),
                json!({}),
            ),
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

pub fn router(engine: Engine) -> Router {
    let limit = engine.config().max_body_bytes;
    Router::new()
        .route("/v1/jobs", get(list_jobs).post(create_job))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/jobs/{id}/request", get(get_request))
        .route("/v1/jobs/{id}/outputs/{name}", get(get_output))
        .route("/v1/events", get(all_events))
        .route("/v1/backends", get(list_backends))
        .route("/v1/backends/{name}/drain", post(drain_backend))
        .route("/v1/backends/{name}/resume", post(resume_backend))
        .route("/v1/cluster", get(cluster))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(engine)
}

pub fn rfc3339(ms: Millis) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn opt_time(ms: Option<Millis>) -> Value {
    ms.map(|m| Value::String(rfc3339(m))).unwrap_or(Value::Null)
}

/// Percent-encode a path segment.
fn segment(s: &str) -> String {
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

/// The JSON a client sees of a job.
pub fn job_json(job: &Job) -> Value {
    let attempts: Vec<Value> = job
        .attempts
        .iter()
        .map(|a| {
            json!({
                "number": a.number,
                "backend": a.backend,
                "prompt_id": a.prompt_id,
                "status": a.status,
                "created_at": rfc3339(a.created_at),
                "submitted_at": opt_time(a.submitted_at),
                "started_at": opt_time(a.started_at),
                "finished_at": opt_time(a.finished_at),
                "error": a.error,
            })
        })
        .collect();
    let outputs: Vec<Value> = job
        .outputs
        .iter()
        .map(|o| {
            json!({
                "name": o.name,
                "node_id": o.node_id,
                "filename": o.filename,
                "subfolder": o.subfolder,
                "type": o.kind,
                "size": o.size,
                "sha256": o.sha256,
                "content_type": content_type(&o.filename),
                "url": format!("/v1/jobs/{}/outputs/{}", job.id, segment(&o.name)),
            })
        })
        .collect();
    json!({
        "id": job.id,
        "state": job.state,
        "phase": job.live_attempt().map(|a| a.status),
        "priority": job.spec.priority,
        "tags": job.spec.tags,
        "max_attempts": job.spec.max_attempts,
        "timeouts": job.spec.timeouts,
        "idempotency_key": job.spec.idempotency_key,
        "metadata": job.spec.metadata,
        "workflow_hash": job.spec.workflow.shape_hash(),
        "created_at": rfc3339(job.created_at),
        "updated_at": rfc3339(job.updated_at),
        "cancel_requested": job.cancel_requested,
        "attempts": attempts,
        "excluded": job.excluded,
        "outputs": outputs,
        "error": job.error,
        "note": job.note,
        "profile": profile_json(job),
    })
}

/// Timings of the job as a whole and of each attempt. (Per-node profiles come with the
/// profiling work; see the issue notes.)
fn profile_json(job: &Job) -> Value {
    let first_start = job.attempts.iter().filter_map(|a| a.started_at).next();
    let end = if job.state.is_terminal() {
        Some(job.updated_at)
    } else {
        None
    };
    let attempts: Vec<Value> = job
        .attempts
        .iter()
        .map(|a| {
            json!({
                "number": a.number,
                "backend": a.backend,
                "submit_ms": a.submitted_at.map(|s| s - a.created_at),
                "queue_ms": match (a.submitted_at, a.started_at) { (Some(s), Some(t)) => Some(t - s), _ => None },
                "execution_ms": match (a.started_at, a.finished_at) { (Some(s), Some(f)) => Some(f - s), _ => None },
            })
        })
        .collect();
    json!({
        "queue_ms": first_start.map(|s| s - job.created_at),
        "total_ms": end.map(|e| e - job.created_at),
        "attempts": attempts,
    })
}

const SUBMIT_FIELDS: &[&str] = &[
    "workflow",
    "priority",
    "max_attempts",
    "tags",
    "timeouts",
    "idempotency_key",
    "metadata",
];

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
    })
}

async fn create_job(
    State(engine): State<Engine>,
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
    let spec = parse_submit(&value, engine.config().max_attempts)?;
    // ComfyUI answers an unknown class with an error that names neither node nor class,
    // so check against what the backends said they have.
    if let Some((node, class)) = engine.unknown_class(&spec.workflow) {
        return Err(ApiError::bad(
            "unknown_class",
            format!("node {node}: class_type {class} is not installed on any backend"),
            json!({"node": node, "class_type": class}),
        ));
    }
    let request_hash = hex::encode(Sha256::digest(&body));
    match engine.submit(spec, &request_hash).await? {
        Created::New(event) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"id": event.job_id, "state": JobState::Queued})),
        )
            .into_response()),
        Created::Existing { job, same_request } if same_request => {
            Ok((StatusCode::OK, Json(job_json(&job))).into_response())
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

async fn get_job(
    State(engine): State<Engine>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(job_json(&load(&engine, &id).await?)))
}

/// The job's request as it was accepted, in the body shape of `POST /v1/jobs` (without
/// its idempotency key), so that a client can submit it again.
async fn get_request(
    State(engine): State<Engine>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = load(&engine, &id).await?;
    let spec = &job.spec;
    Ok(Json(json!({
        "workflow": spec.workflow.graph(),
        "priority": spec.priority,
        "max_attempts": spec.max_attempts,
        "tags": spec.tags,
        "timeouts": spec.timeouts,
        "metadata": spec.metadata,
    })))
}

#[derive(Deserialize)]
struct ListQuery {
    state: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

async fn list_jobs(
    State(engine): State<Engine>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
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
    let jobs: Vec<Value> = page.jobs.iter().map(job_json).collect();
    Ok(Json(
        json!({"jobs": jobs, "next_cursor": page.next.map(|n| n.to_string())}),
    ))
}

async fn cancel_job(
    State(engine): State<Engine>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    match engine.apply(&id, gantry_core::Input::Cancel).await? {
        Applied::Changed(job) if job.state == JobState::Cancelled => {
            Ok((StatusCode::OK, Json(job_json(&job))).into_response())
        }
        Applied::Changed(job) | Applied::Refused(Refused::NoChange { .. }, job) => {
            Ok((StatusCode::ACCEPTED, Json(job_json(&job))).into_response())
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
    let mut data = serde_json::to_value(&e.kind).unwrap_or_default();
    if let Value::Object(m) = &mut data {
        m.insert("seq".into(), json!(e.seq));
        m.insert("job_id".into(), json!(e.job_id));
        m.insert("at".into(), json!(rfc3339(e.at)));
        m.insert("state".into(), json!(e.state));
    }
    data.to_string()
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

/// A live event, serialised once for every stream.
fn sse_of_published(p: &crate::bus::Published) -> SseEvent {
    sse_with(p, p.wire(event_data))
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

async fn job_events(
    State(engine): State<Engine>,
    Path(id): Path<String>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let job = load(&engine, &id).await?;
    // Subscribe before reading the backlog, so nothing falls between the two.
    let mut live = engine.bus().subscribe();
    let backlog = engine.store().job_events(&job.id, 0).await?;
    let (tx, rx) = mpsc::channel::<SseEvent>(256);
    let open = crate::metrics::StreamGuard::new(engine.metrics());
    tokio::spawn(async move {
        let _open = open;
        let mut last = 0;
        if !send_persisted(&tx, &backlog, &mut last).await {
            return;
        }
        loop {
            let next = tokio::select! {
                // A stream never outlives the server: shutdown waits for open connections.
                _ = engine.shutdown_token().cancelled() => return,
                next = live.recv() => next,
            };
            match next {
                Ok(BusEvent::Persisted(e)) if e.job_id == job.id && e.seq > last => {
                    last = e.seq;
                    if tx.send(sse_of_published(&e)).await.is_err() || ends_stream(&e) {
                        return;
                    }
                }
                Ok(BusEvent::Live(l)) if l.job_id == job.id => {
                    let data = serde_json::to_value(&*l).unwrap_or_default();
                    let kind = data
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("live")
                        .to_owned();
                    if tx
                        .send(SseEvent::default().event(kind).data(data.to_string()))
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

#[derive(Deserialize)]
struct EventsQuery {
    since: Option<String>,
}

/// Every persisted event after `since` (or `Last-Event-ID`), once and in sequence order,
/// then live ones as they commit. Publishers on different tasks may reach the bus out of
/// sequence order, so a gap is filled from the store (where everything below a published
/// sequence number has committed) rather than skipped.
async fn all_events(
    State(engine): State<Engine>,
    Query(q): Query<EventsQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let from_header = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let since = match q.since.or(from_header) {
        None => 0,
        Some(s) => s.trim().parse::<i64>().map_err(|_| {
            ApiError::bad(
                "invalid_since",
                format!("since must be an event sequence number, not {s:?}"),
                json!({ "since": s }),
            )
        })?,
    };
    let mut live = engine.bus().subscribe();
    let (tx, rx) = mpsc::channel::<SseEvent>(1024);
    let open = crate::metrics::StreamGuard::new(engine.metrics());
    tokio::spawn(async move {
        let _open = open;
        let mut last = since;
        // The backlog, page by page; then the live tail.
        if !catch_up(&engine, &tx, &mut last).await {
            return;
        }
        loop {
            let next = tokio::select! {
                // A stream never outlives the server: shutdown waits for open connections.
                _ = engine.shutdown_token().cancelled() => return,
                next = live.recv() => next,
            };
            match next {
                Ok(BusEvent::Persisted(e)) if e.seq == last + 1 => {
                    last = e.seq;
                    if tx.send(sse_of_published(&e)).await.is_err() {
                        return;
                    }
                }
                Ok(BusEvent::Persisted(e)) if e.seq > last => {
                    if !catch_up(&engine, &tx, &mut last).await {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if !catch_up(&engine, &tx, &mut last).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Ok(sse_of(rx))
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

/// Send every stored event after `last`; false once the client has left.
async fn catch_up(engine: &Engine, tx: &mpsc::Sender<SseEvent>, last: &mut i64) -> bool {
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
            if tx.send(sse_of_event(e)).await.is_err() {
                return false;
            }
        }
        if page.len() < 1000 {
            return true;
        }
    }
}

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
    let path = engine
        .outputs()
        .path(&output.sha256)
        .ok_or_else(|| ApiError::Internal(format!("output {name} has a bad hash")))?;
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| ApiError::Internal(format!("output {name} is not readable: {e}")))?;
    Ok((
        [(header::CONTENT_TYPE, content_type(&output.filename))],
        Body::from(bytes),
    )
        .into_response())
}

async fn list_backends(State(engine): State<Engine>) -> Json<Value> {
    let backends = engine.backends();
    let list: Vec<Value> = backends
        .values()
        .map(|b| {
            let status = crate::metrics::status_of(b);
            let blocks: Vec<Value> = b
                .health
                .blocks()
                .iter()
                .map(|(hash, until)| json!({"workflow_hash": hash, "until": rfc3339(*until)}))
                .collect();
            let circuit = match b.health.circuit() {
                gantry_core::health::Circuit::Closed => json!({"state": "closed"}),
                gantry_core::health::Circuit::Open { since, probe_at } => json!({
                    "state": "open", "since": rfc3339(since), "probe_at": rfc3339(probe_at)
                }),
            };
            json!({
                "name": b.config.name,
                "url": b.config.url,
                "tags": b.config.tags,
                "priority": b.config.priority,
                "status": status,
                "current_job": b.current.as_ref().map(|(j, _)| j),
                "current_attempt": b.current.as_ref().map(|(_, n)| n),
                "next_job": b.next.as_ref().map(|(j, _)| j),
                "last_seen": b.last_seen.map(rfc3339),
                "last_used": (b.last_used > 0).then(|| rfc3339(b.last_used)),
                "last_error": b.last_error,
                "node_classes": b.classes.as_ref().map(|c| c.len()),
                "warm_models": b.warm_models,
                "blocks": blocks,
                "circuit": circuit,
                "stuck": b.stuck.as_ref().map(|(pid, since)| json!({"prompt_id": pid, "since": rfc3339(*since)})),
            })
        })
        .collect();
    Json(json!({ "backends": list }))
}

async fn drain_backend(
    State(engine): State<Engine>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_draining(&engine, &name, true)
}

async fn resume_backend(
    State(engine): State<Engine>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_draining(&engine, &name, false)
}

/// Drain or resume `name` on the coordinator that drives it.
fn set_draining(engine: &Engine, name: &str, drain: bool) -> Result<Json<Value>, ApiError> {
    match engine.set_draining(name, drain) {
        None => Err(ApiError::NotFound(format!("no backend {name}"))),
        Some(false) => Err(ApiError::Conflict {
            code: "not_driven_here",
            message: format!(
                "backend {name} is driven by another coordinator: send this to the one holding its lease (see /v1/cluster)"
            ),
            details: json!({"backend": name}),
        }),
        Some(true) => {
            let status = engine
                .backends()
                .get(name)
                .map(crate::metrics::status_of)
                .unwrap_or("offline");
            Ok(Json(json!({"name": name, "status": status})))
        }
    }
}

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
async fn cluster(State(engine): State<Engine>) -> Result<Json<Value>, ApiError> {
    let Some(cluster) = engine.cluster() else {
        return Ok(Json(json!({"store": "embedded"})));
    };
    let held: Vec<Value> = engine
        .owned_leases()
        .into_iter()
        .map(|(backend, token)| json!({"backend": backend, "token": token}))
        .collect();
    let all: Vec<Value> = cluster
        .store
        .leases()
        .await?
        .into_iter()
        .map(|l| {
            json!({"backend": l.backend, "owner": l.owner, "token": l.token, "remaining_ms": l.remaining_ms})
        })
        .collect();
    Ok(Json(json!({
        "store": "postgres",
        "coordinator": cluster.id,
        "lease_ms": cluster.lease.as_millis() as u64,
        "held": held,
        "fenced_writes": cluster.fenced_writes.load(std::sync::atomic::Ordering::Relaxed),
        "leases": all,
    })))
}

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
        Json(json!({"status": if store_ok { "ok" } else { "store_unavailable" }, "backends": n, "connected": connected})),
    )
        .into_response()
}
