//! The v1 HTTP API: the router made from one list of documented routes (so a route cannot
//! exist without being in `/v1/openapi.json`), and the layer that gives axum's own refusals
//! the error shape. Each resource's handlers live in a module of their own.

mod backends;
pub mod error;
mod farm;
mod files;
#[cfg(test)]
mod fuzz;
mod jobs;
mod parse;
mod session;
mod stats;
mod streams;
pub mod views;

pub use crate::clock::rfc3339;
pub use error::ApiError;
pub use views::{backend_rows, job_view, opt_time};

use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

use std::sync::OnceLock;
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::engine::Engine;

use self::{backends::*, farm::*, files::*, jobs::*, session::*, stats::*, streams::*};

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
fn documented(files_limit: usize) -> OpenApiRouter<App> {
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

/// The OpenAPI 3.1 document of this API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented(0).split_for_parts().1
}

/// What every handler may take (`State<Engine>`, `State<Arc<Auth>>`, ...): the engine,
/// and what the HTTP surface keeps of its own (tokens, metrics).
#[derive(Clone)]
pub struct App {
    pub engine: Engine,
    pub auth: Arc<crate::auth::Auth>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl axum::extract::FromRef<App> for Engine {
    fn from_ref(app: &App) -> Engine {
        app.engine.clone()
    }
}

impl axum::extract::FromRef<App> for Arc<crate::auth::Auth> {
    fn from_ref(app: &App) -> Arc<crate::auth::Auth> {
        app.auth.clone()
    }
}

impl axum::extract::FromRef<App> for Arc<crate::metrics::Metrics> {
    fn from_ref(app: &App) -> Arc<crate::metrics::Metrics> {
        app.metrics.clone()
    }
}

pub fn router(app: App) -> Router {
    let engine = &app.engine;
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
            app.auth.clone(),
            crate::auth::guard,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(shape_errors))
        .with_state(app)
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
        // axum's own refusal text, only to quote: without it the message still names
        // the status.
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
    let doc = DOC.get_or_init(|| {
        openapi().to_json().unwrap_or_else(|e| {
            // The document is made from types alone: a failure is a bug, and the route
            // says so rather than answer an empty body.
            tracing::error!(error = %e, "cannot serialise the OpenAPI document");
            format!(r#"{{"error": "cannot serialise the OpenAPI document: {e}"}}"#)
        })
    });
    ([(header::CONTENT_TYPE, "application/json")], doc.as_str()).into_response()
}
