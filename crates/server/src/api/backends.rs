//! `/v1/backends`: list, add, drain, resume, lift a block, an agent's logs and link.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::json;

use gantry_api as wire;

use crate::engine::{now_ms, Engine};

use super::{error::*, views::*};

/// An agent's supervised ComfyUI: its state, its last output lines, its restarts.
#[utoipa::path(get, path = "/v1/backends/{name}/logs", tag = "backends",
    params(("name" = String, Path, description = "The agent's backend name")),
    responses(
        (status = 200, body = wire::BackendLogs),
        (status = 404, description = "No agent of that name", body = wire::ErrorBody),
    ))]
pub(crate) async fn backend_logs(
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
pub(crate) async fn agent_connect(
    State(engine): State<Engine>,
    Query(q): Query<crate::agents::ConnectQuery>,
    ws: axum::extract::WebSocketUpgrade,
) -> Result<Response, ApiError> {
    use crate::agents::link::{admit, serve, Refusal};
    use futures_util::StreamExt;
    let admitted = admit(&engine, &q).await.map_err(|r| match r {
        Refusal::Invalid { code, message } => ApiError::bad(code, message, json!({})),
        Refusal::Taken { code, message } => ApiError::Conflict {
            code,
            message,
            details: json!({}),
        },
        Refusal::Unavailable { code, message } => ApiError::Unable { code, message },
    })?;
    Ok(ws.on_upgrade(move |socket| {
        let (sink, stream) = socket.split();
        let sink = futures_util::SinkExt::with(sink, |m: Ws| {
            std::future::ready(Ok::<_, axum::Error>(m.0))
        });
        let stream = stream.map(|m| m.map(Ws));
        serve(engine, admitted, sink, stream)
    }))
}

/// axum's WebSocket message as the link's framing sees it (the agent's side has
/// tungstenite's; the trait is the agent crate's, so this side wraps its type).
struct Ws(axum::extract::ws::Message);

impl gantry_agent::tunnel::LinkMessage for Ws {
    fn binary(frame: Vec<u8>) -> Self {
        Ws(axum::extract::ws::Message::Binary(frame.into()))
    }

    fn ping() -> Self {
        Ws(axum::extract::ws::Message::Ping(bytes::Bytes::new()))
    }

    fn into_incoming(self) -> gantry_agent::tunnel::Incoming {
        use axum::extract::ws::Message;
        use gantry_agent::tunnel::Incoming;
        match self.0 {
            Message::Binary(b) => Incoming::Frame(b),
            Message::Close(_) => Incoming::Close,
            Message::Text(_) | Message::Ping(_) | Message::Pong(_) => Incoming::Other,
        }
    }
}

#[utoipa::path(get, path = "/v1/backends", tag = "backends",
    responses((status = 200, description = "The backends this coordinator knows, with live status", body = wire::BackendList)))]
pub(crate) async fn list_backends(State(engine): State<Engine>) -> Json<wire::BackendList> {
    Json(wire::BackendList {
        backends: backend_rows(&engine).into_iter().map(|(b, _)| b).collect(),
    })
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
pub(crate) async fn add_backend(
    State(engine): State<Engine>,
    body: Bytes,
) -> Result<Response, ApiError> {
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
pub(crate) async fn drain_backend(
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
pub(crate) async fn resume_backend(
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
pub(crate) async fn lift_block(
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

/// The refusal of an action on a backend another coordinator drives.
pub(crate) fn not_driven_here(name: &str) -> ApiError {
    ApiError::Conflict {
        code: "not_driven_here",
        message: format!(
            "backend {name} is driven by another coordinator: send this to the one holding its lease (see /v1/cluster)"
        ),
        details: json!({"backend": name}),
    }
}

/// Drain or resume `name` on the coordinator that drives it.
pub(crate) fn set_draining(
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
                .map(|b| crate::api::views::status_of(b, now, stale))
                .unwrap_or(wire::BackendStatus::Offline);
            Ok(Json(wire::BackendStatusOf {
                name: name.to_owned(),
                status,
            }))
        }
    }
}
