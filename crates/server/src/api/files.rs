//! Files: attachments uploaded for jobs to use, outputs and command logs downloaded.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::json;

use gantry_api as wire;

use crate::engine::Engine;
use crate::outputs::content_type;

use super::{error::*, jobs::*, views::*};

/// Store an input file for jobs to attach by its hash: the raw body, or the first file
/// of a multipart form. The same bytes give the same hash; storing them again is harmless.
#[utoipa::path(post, path = "/v1/files", tag = "jobs",
    request_body(content = Vec<u8>, description = "The file: a raw body (any content type), or multipart/form-data with one file field", content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored; attach it to a job as {\"name\", \"sha256\"}", body = wire::StoredFile),
        (status = 400, description = "No file in the form, or an empty file", body = wire::ErrorBody),
        (status = 413, description = "Over max_attachment_bytes; nothing was stored", body = wire::ErrorBody),
    ))]
pub(crate) async fn upload_file(
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
pub(crate) async fn get_output(
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
pub(crate) async fn get_log(
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
