//! `/v1/jobs`: submit, read, list, cancel, and the request as accepted.

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use gantry_core::{Job, JobId, JobState, Refused};
use gantry_store::{Created, JobFilter};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use gantry_api as wire;
use utoipa::IntoParams;

use crate::auth::Principal;
use crate::engine::{Applied, Engine};
use axum::Extension;
use gantry_core::auth::Scope;

use super::{error::*, parse::*, views::*};

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
pub(crate) async fn create_job(
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
            Some(crate::hooks::parse(&req, &engine.config().callbacks.allow_hosts).map_err(bad)?)
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

pub(crate) fn parse_id(id: &str) -> Result<JobId, ApiError> {
    JobId::parse(id).ok_or_else(|| ApiError::NotFound(format!("no job {id}: not a job id")))
}

pub(crate) async fn load(engine: &Engine, id: &str) -> Result<Job, ApiError> {
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
pub(crate) async fn get_job(
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
pub(crate) async fn get_request(
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
pub(crate) struct ListQuery {
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
pub(crate) async fn list_jobs(
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
pub(crate) async fn cancel_job(
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
