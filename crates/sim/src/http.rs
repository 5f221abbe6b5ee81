//! The simulator's HTTP and WebSocket surface: ComfyUI's routes (each also under `/api`),
//! its Origin check, its socket table rules, and `/sim/faults` for tests.

use crate::engine::{Item, Out, Sim, Socket};
use crate::faults::Fault;
use crate::validate::{validate_prompt, Verdict};
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Map, Number, Value};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Per-life state of the HTTP layer.
#[derive(Clone)]
pub struct App {
    pub sim: Arc<Sim>,
    /// Cancelled when this life of the simulator dies; sockets drop without a close frame.
    pub life: CancellationToken,
}

pub fn router(app: App) -> Router {
    let routes = Router::new()
        .route("/prompt", post(post_prompt).get(get_prompt))
        .route("/queue", get(get_queue).post(post_queue))
        .route("/interrupt", post(post_interrupt))
        .route("/free", post(post_free))
        .route("/history", get(get_history).post(post_history))
        .route("/history/{prompt_id}", get(get_history_one))
        .route("/object_info", get(get_object_info))
        .route("/object_info/{class}", get(get_object_info_one))
        .route("/system_stats", get(get_system_stats))
        .route("/features", get(get_features))
        .route("/view", get(get_view))
        .route(
            "/upload/image",
            post(post_upload_image).layer(axum::extract::DefaultBodyLimit::max(MAX_UPLOAD)),
        )
        .route("/ws", get(get_ws))
        .route("/sim/faults", get(get_faults).post(post_faults))
        .route("/sim/runs", get(get_runs));
    Router::new()
        .merge(routes.clone())
        .nest("/api", routes)
        .layer(middleware::from_fn(origin_check))
        .with_state(app)
}

/// ComfyUI answers JSON with this exact content type.
fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut r = (status, v.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

fn ok_json(v: &Value) -> Response {
    json_response(StatusCode::OK, v)
}

/// What aiohttp answers when a handler raises (a body that is not JSON, for one).
fn internal_error() -> Response {
    let mut r = (
        StatusCode::INTERNAL_SERVER_ERROR,
        "500 Internal Server Error\n\nServer got itself in trouble",
    )
        .into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn empty(status: StatusCode) -> Response {
    (status, Body::empty()).into_response()
}

/// ComfyUI's origin-only middleware: a loopback Host with a different Origin is refused.
async fn origin_check(req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    if let (Some(host), Some(origin)) = (host, origin) {
        let origin_netloc = origin
            .split("://")
            .nth(1)
            .unwrap_or(&origin)
            .trim_end_matches('/');
        let host_name = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
        let loopback = matches!(host_name, "127.0.0.1" | "localhost" | "[::1]" | "::1")
            || host_name.starts_with("127.");
        if loopback && origin_netloc != host {
            return empty(StatusCode::FORBIDDEN);
        }
    }
    next.run(req).await
}

fn parse_body(body: &Bytes) -> Option<Value> {
    serde_json::from_slice(body).ok()
}

async fn post_prompt(State(app): State<App>, body: Bytes) -> Response {
    let Some(Value::Object(json)) = parse_body(&body) else {
        return internal_error();
    };
    let sim = &app.sim;
    // The counter moves on every call, accepted or not, as ComfyUI's does.
    let number = match json.get("number") {
        Some(n) => match n.as_f64().and_then(Number::from_f64) {
            Some(n) => n,
            None => return internal_error(),
        },
        None => {
            let front = json.get("front").and_then(Value::as_bool).unwrap_or(false);
            sim.state().next_number(front)
        }
    };
    let Some(prompt) = json.get("prompt") else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": {"type": "no_prompt", "message": "No prompt provided",
                "details": "No prompt provided", "extra_info": {}}, "node_errors": {}}),
        );
    };
    let Some(prompt) = prompt.as_object() else {
        return internal_error();
    };
    let prompt_id = match json.get("prompt_id") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let partial: Option<Vec<String>> = json
        .get("partial_execution_targets")
        .and_then(|v| serde_json::from_value(v.clone()).ok());
    let verdict = validate_prompt(
        prompt,
        &sim.catalog(),
        &sim.input_paths(),
        partial.as_deref(),
    );
    let mut extra_data = json
        .get("extra_data")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(c) = json.get("client_id") {
        extra_data.insert("client_id".into(), c.clone());
    }
    match verdict {
        Verdict::Accepted {
            graph,
            outputs,
            node_errors,
        } => {
            sim.enqueue(Item {
                number: number.clone(),
                prompt_id: prompt_id.clone(),
                prompt: graph,
                extra_data,
                outputs,
            })
            .await;
            ok_json(&json!({"prompt_id": prompt_id, "number": number, "node_errors": node_errors}))
        }
        Verdict::Rejected { error, node_errors } => json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": error, "node_errors": node_errors}),
        ),
    }
}

async fn get_prompt(State(app): State<App>) -> Response {
    let st = app.sim.state();
    ok_json(&json!({"exec_info": {"queue_remaining": st.remaining()}}))
}

async fn get_queue(State(app): State<App>) -> Response {
    let st = app.sim.state();
    let running: Vec<Value> = st.running.iter().map(Item::to_value).collect();
    let pending: Vec<Value> = st.queue.iter().map(Item::to_value).collect();
    ok_json(&json!({"queue_running": running, "queue_pending": pending}))
}

async fn post_queue(State(app): State<App>, body: Bytes) -> Response {
    let Some(Value::Object(json)) = parse_body(&body) else {
        return internal_error();
    };
    let mut st = app.sim.state();
    if json.get("clear").and_then(Value::as_bool).unwrap_or(false) {
        st.wipe();
    }
    if let Some(ids) = json.get("delete").and_then(Value::as_array) {
        for id in ids.iter().filter_map(Value::as_str) {
            st.delete_pending(id);
        }
    }
    empty(StatusCode::OK)
}

async fn post_interrupt(State(app): State<App>, body: Bytes) -> Response {
    let json = parse_body(&body).unwrap_or(Value::Null);
    let target = json
        .get("prompt_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    let st = app.sim.state();
    let hit = match target {
        Some(id) => st.running.as_ref().is_some_and(|r| r.prompt_id == id),
        None => true,
    };
    if hit {
        app.sim
            .interrupt
            .store(true, std::sync::atomic::Ordering::SeqCst);
    } else {
        tracing::info!(prompt_id = ?target, "targeted interrupt for a prompt that is not running: ignored");
    }
    empty(StatusCode::OK)
}

async fn post_free() -> Response {
    empty(StatusCode::OK)
}

async fn get_history(State(app): State<App>, Query(q): Query<HashMap<String, String>>) -> Response {
    let max_items: Option<usize> = match q.get("max_items").map(|s| s.parse()) {
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return internal_error(),
        None => None,
    };
    let mut offset: i64 = match q.get("offset").map(|s| s.parse()) {
        Some(Ok(n)) => n,
        Some(Err(_)) => return internal_error(),
        None => -1,
    };
    let st = app.sim.state();
    if offset < 0 {
        if let Some(m) = max_items {
            offset = st.history.len() as i64 - m as i64;
        }
    }
    let mut out = Map::new();
    for (i, (k, v)) in st.history.iter().enumerate() {
        if i as i64 >= offset {
            out.insert(k.clone(), v.clone());
            if max_items.is_some_and(|m| out.len() >= m) {
                break;
            }
        }
    }
    ok_json(&Value::Object(out))
}

async fn get_history_one(State(app): State<App>, Path(prompt_id): Path<String>) -> Response {
    let st = app.sim.state();
    let mut out = Map::new();
    if let Some(v) = st.history.get(&prompt_id) {
        out.insert(prompt_id, v.clone());
    }
    ok_json(&Value::Object(out))
}

async fn post_history(State(app): State<App>, body: Bytes) -> Response {
    let Some(Value::Object(json)) = parse_body(&body) else {
        return internal_error();
    };
    let mut st = app.sim.state();
    if json.get("clear").and_then(Value::as_bool).unwrap_or(false) {
        st.history.clear();
    }
    if let Some(ids) = json.get("delete").and_then(Value::as_array) {
        for id in ids.iter().filter_map(Value::as_str) {
            st.history.shift_remove(id);
        }
    }
    empty(StatusCode::OK)
}

async fn get_object_info(State(app): State<App>) -> Response {
    let info = app.sim.catalog().object_info(&app.sim.input_files());
    ok_json(&serde_json::to_value(info).unwrap_or_default())
}

async fn get_object_info_one(State(app): State<App>, Path(class): Path<String>) -> Response {
    let info = app.sim.catalog().object_info(&app.sim.input_files());
    let mut out = Map::new();
    if let Some(v) = info.get(&class) {
        out.insert(class, v.clone());
    }
    ok_json(&Value::Object(out))
}

async fn get_system_stats() -> Response {
    let ram: u64 = 24 * 1024 * 1024 * 1024;
    ok_json(&json!({
        "system": {
            "os": "posix", "ram_total": ram, "ram_free": ram, "comfyui_version": "0.3.64",
            "required_frontend_version": "1.27.10", "installed_templates_version": "0.1.95",
            "required_templates_version": "0.1.95",
            "python_version": "3.11.7 (gantry-sim)", "pytorch_version": "2.8.0+cu128 (simulated)",
            "embedded_python": false, "argv": ["main.py", "--gantry-sim"],
        },
        "devices": [{"name": "cuda:0 gantry-sim", "type": "cuda", "index": 0,
            "vram_total": ram, "vram_free": ram, "torch_vram_total": ram, "torch_vram_free": ram}],
    }))
}

async fn get_features() -> Response {
    ok_json(&server_features())
}

fn server_features() -> Value {
    json!({"supports_preview_metadata": true, "max_upload_size": 104857600})
}

async fn get_view(State(app): State<App>, Query(q): Query<HashMap<String, String>>) -> Response {
    let Some(filename) = q.get("filename") else {
        return empty(StatusCode::NOT_FOUND);
    };
    if filename.is_empty() || filename.starts_with('/') || filename.contains("..") {
        return empty(StatusCode::BAD_REQUEST);
    }
    let base = match q.get("type").map(String::as_str).unwrap_or("output") {
        "output" => &app.sim.output_dir,
        "input" => &app.sim.input_dir,
        "temp" => &app.sim.temp_dir,
        _ => return empty(StatusCode::BAD_REQUEST),
    };
    let mut dir = base.clone();
    if let Some(sub) = q.get("subfolder").filter(|s| !s.is_empty()) {
        if sub.starts_with('/') || sub.split('/').any(|p| p == "..") {
            return empty(StatusCode::FORBIDDEN);
        }
        dir = dir.join(sub);
    }
    let path = dir.join(filename);
    let Ok(bytes) = tokio::fs::read(&path).await else {
        return empty(StatusCode::NOT_FOUND);
    };
    let modified = tokio::fs::metadata(&path)
        .await
        .and_then(|m| m.modified())
        .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
    let mtime_ns = modified
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let content_type = if filename.ends_with(".png") {
        "image/png"
    } else if filename.ends_with(".jpg") || filename.ends_with(".jpeg") {
        "image/jpeg"
    } else if filename.ends_with(".webp") {
        "image/webp"
    } else {
        "application/octet-stream"
    };
    let mut headers = HeaderMap::new();
    let mut put = |k: header::HeaderName, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            headers.insert(k, v);
        }
    };
    put(header::CONTENT_TYPE, content_type.to_string());
    put(
        header::CONTENT_DISPOSITION,
        format!("filename=\"{filename}\""),
    );
    put(header::ETAG, format!("\"{mtime_ns:x}-{:x}\"", bytes.len()));
    put(header::LAST_MODIFIED, httpdate::fmt_http_date(modified));
    (StatusCode::OK, headers, bytes).into_response()
}

/// ComfyUI's `--max-upload-size` default (100 MB).
const MAX_UPLOAD: usize = 100 * 1024 * 1024;

/// `POST /upload/image` as server.py's `image_upload`: multipart `image` (with a
/// filename), `overwrite`, `type` (input, temp or output) and `subfolder`. Without
/// `overwrite` an existing name with other bytes becomes `name (1).ext`, with the same
/// bytes it is answered as is. Answers `{name, subfolder, type}`.
async fn post_upload_image(
    State(app): State<App>,
    multipart: Result<axum::extract::Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    // aiohttp's request.post() on a body that is not a form is an empty form: no image.
    let Ok(mut multipart) = multipart else {
        return empty(StatusCode::BAD_REQUEST);
    };
    let mut image: Option<(String, Bytes)> = None;
    let mut fields: HashMap<String, String> = HashMap::new();
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or_default().to_string();
                let filename = field.file_name().map(str::to_owned);
                let Ok(bytes) = field.bytes().await else {
                    return empty(StatusCode::BAD_REQUEST);
                };
                match filename {
                    Some(f) if name == "image" => image = Some((f, bytes)),
                    _ => {
                        fields.insert(name, String::from_utf8_lossy(&bytes).into_owned());
                    }
                }
            }
            Ok(None) => break,
            Err(_) => return empty(StatusCode::BAD_REQUEST),
        }
    }
    let Some((filename, bytes)) = image else {
        return empty(StatusCode::BAD_REQUEST);
    };
    if filename.is_empty() {
        return empty(StatusCode::BAD_REQUEST);
    }
    let kind = fields.get("type").map(String::as_str).unwrap_or("input");
    let base = match kind {
        "input" => &app.sim.input_dir,
        "temp" => &app.sim.temp_dir,
        "output" => &app.sim.output_dir,
        // server.py leaves its folder unset and fails on it.
        _ => return internal_error(),
    };
    let subfolder = fields.get("subfolder").cloned().unwrap_or_default();
    // os.path.normpath, then the commonpath check: nothing may land outside the folder.
    let Some(rel) = normalized(&format!("{subfolder}/{filename}")) else {
        return empty(StatusCode::BAD_REQUEST);
    };
    let mut path = base.join(&rel);
    let Some(dir) = path.parent().map(std::path::Path::to_path_buf) else {
        return empty(StatusCode::BAD_REQUEST);
    };
    if tokio::fs::create_dir_all(&dir).await.is_err() {
        return internal_error();
    }
    let overwrite = matches!(
        fields.get("overwrite").map(String::as_str),
        Some("true" | "1")
    );
    let mut name = filename.clone();
    let mut duplicate = false;
    if !overwrite {
        let (stem, ext) = match filename.rsplit_once('.') {
            Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
            _ => (filename.clone(), String::new()),
        };
        let mut i = 1;
        while let Ok(existing) = tokio::fs::read(&path).await {
            if existing == bytes.as_ref() {
                duplicate = true;
                break;
            }
            name = format!("{stem} ({i}){ext}");
            path = dir.join(&name);
            i += 1;
        }
    }
    if !duplicate && tokio::fs::write(&path, &bytes).await.is_err() {
        return internal_error();
    }
    ok_json(&json!({"name": name, "subfolder": subfolder, "type": kind}))
}

/// A relative path with `.` and `..` resolved; `None` when it is empty or climbs out.
fn normalized(path: &str) -> Option<std::path::PathBuf> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(parts.iter().collect())
}

/// Not ComfyUI's: when each prompt of this life ran, oldest first (for benchmarks).
async fn get_runs(State(app): State<App>) -> Response {
    let runs: Vec<_> = app.sim.state().runs_log.iter().cloned().collect();
    ok_json(&json!({ "runs": runs }))
}

async fn get_faults(State(app): State<App>) -> Response {
    let specs = app
        .sim
        .faults
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .specs();
    ok_json(&json!({"faults": specs}))
}

/// Replaces the faults in force; `[]` clears them. Nothing changes if any spec is bad.
async fn post_faults(State(app): State<App>, body: Bytes) -> Response {
    let specs: Vec<String> = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": format!("body must be a JSON list of fault spec strings: {e}")}),
            )
        }
    };
    let mut faults = Vec::new();
    for s in &specs {
        match Fault::parse(s) {
            Ok(f) => faults.push(f),
            Err(e) => {
                return json_response(StatusCode::BAD_REQUEST, &json!({"error": e.to_string()}))
            }
        }
    }
    app.sim.replace_faults(faults);
    ok_json(&json!({"faults": specs}))
}

async fn get_ws(
    State(app): State<App>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let sid = q
        .get("clientId")
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    ws.on_upgrade(move |socket| socket_task(app, socket, sid))
}

/// One socket: registers under its sid (replacing any other socket with that sid), greets
/// with `status`, forwards what the engine sends, and on close removes whatever socket the
/// table holds under its sid (ComfyUI's cleanup, which deafens a newer same-sid socket).
async fn socket_task(app: App, mut socket: WebSocket, sid: String) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let conn = app.sim.new_conn_id();
    {
        let mut st = app.sim.state();
        let mut greeting = st.status_data();
        if let Some(m) = greeting.as_object_mut() {
            m.insert("sid".into(), Value::String(sid.clone()));
        }
        let _ = tx.send(Out::Text(
            json!({"type": "status", "data": greeting}).to_string(),
        ));
        if st.client_id.as_deref() == Some(sid.as_str()) {
            if let Some(node) = &st.last_node_id {
                let _ = tx.send(Out::Text(
                    json!({"type": "executing", "data": {"node": node}}).to_string(),
                ));
            }
        }
        st.sockets.insert(
            sid.clone(),
            Socket {
                conn,
                tx,
                preview_metadata: false,
            },
        );
    }
    let mut first_text = true;
    let mut replaced = false;
    let clean = loop {
        tokio::select! {
            _ = app.life.cancelled() => break false,
            out = rx.recv(), if !replaced => match out {
                Some(Out::Text(t)) => if socket.send(Message::text(t)).await.is_err() { break true },
                Some(Out::Binary(b)) => if socket.send(Message::binary(b)).await.is_err() { break true },
                Some(Out::Drop) => break false,
                // A newer socket with this sid took the table entry: this one stays open
                // and hears nothing more, as in ComfyUI.
                None => replaced = true,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let flags = first_text && serde_json::from_str::<Value>(&t).ok()
                        .is_some_and(|v| v["type"] == "feature_flags");
                    first_text = false;
                    if flags {
                        let wants = serde_json::from_str::<Value>(&t).ok()
                            .and_then(|v| v["data"]["supports_preview_metadata"].as_bool())
                            .unwrap_or(false);
                        let mut st = app.sim.state();
                        if let Some(s) = st.sockets.get_mut(&sid) {
                            if s.conn == conn { s.preview_metadata = wants; }
                        }
                        let reply = json!({"type": "feature_flags", "data": server_features()}).to_string();
                        if let Some(s) = st.sockets.get(&sid) {
                            let _ = s.tx.send(Out::Text(reply));
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break true,
                Some(Ok(_)) => {}
            },
        }
    };
    // ComfyUI pops the sid whichever socket holds it now.
    app.sim.state().sockets.remove(&sid);
    if clean {
        // The library queued its answer to the client's close frame; reading on until the
        // stream ends sends it, so the client sees a clean 1000 close.
        while let Some(Ok(_)) = socket.recv().await {}
    }
    // Not clean: dropping the socket closes TCP with no close frame (the client sees 1006).
}
