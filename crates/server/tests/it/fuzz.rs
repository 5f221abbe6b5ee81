//! Bad requests over real HTTP to every route of a running server (the routes of
//! `/v1/openapi.json`, the monitor's, and one that does not exist): random and broken
//! JSON, truncated bodies, wrong types, huge strings, deep nesting, odd content types,
//! path and query parameters that are junk or badly escaped. No answer may be a 5xx,
//! every 4xx has the `{"error": {"code", "message", "details"}}` shape with something
//! in its message, and afterwards the store holds what it held before: no job, event,
//! backend, token or file was made.
//!
//! Deterministic: the requests come from a seeded generator (`GANTRY_FUZZ_SEED` picks
//! another seed, `GANTRY_FUZZ_REQUESTS` how many requests per route).

use crate::support::{spawn_app, TestApp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::path::Path;

/// The default seed, and requests sent to each route and method.
const SEED: u64 = 24;
const REQUESTS_PER_ROUTE: usize = 24;

/// The limit on an uploaded file in this test, so that an oversized one is cheap.
const MAX_ATTACHMENT: u64 = 4096;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Everything a bad request must leave as it was.
#[derive(Debug, PartialEq)]
struct Contents {
    jobs: Vec<String>,
    last_seq: i64,
    tokens: usize,
    stored_backends: Vec<String>,
    backends: Vec<(String, bool)>,
    files: BTreeSet<String>,
}

async fn contents(app: &TestApp) -> Contents {
    let engine = &app.server.engine;
    let store = engine.store();
    let page = store
        .list_jobs(&gantry_store::JobFilter {
            state: None,
            limit: 1000,
            before: None,
        })
        .await
        .unwrap();
    let mut backends: Vec<(String, bool)> = engine
        .backends()
        .values()
        .map(|b| (b.config.name.clone(), b.draining))
        .collect();
    backends.sort();
    let mut files = BTreeSet::new();
    walk(&engine.config().data_dir.join("inputs"), &mut files);
    walk(&engine.config().data_dir.join("outputs"), &mut files);
    Contents {
        jobs: page.jobs.iter().map(|j| j.id.to_string()).collect(),
        last_seq: store.last_seq().await.unwrap(),
        tokens: store.tokens().await.unwrap().len(),
        stored_backends: store
            .added_backends()
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.name)
            .collect(),
        backends,
        files,
    }
}

fn walk(dir: &Path, out: &mut BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.insert(path.display().to_string());
        }
    }
}

/// Junk of every kind for a path or query parameter, already escaped for a URL (some
/// of it escaped wrongly on purpose).
fn param(rng: &mut StdRng) -> String {
    match rng.random_range(0..10) {
        0 => "%FF%FE".to_owned(),
        1 => "%zz".to_owned(),
        2 => "..".to_owned(),
        3 => "%2F..%2Fetc%2Fpasswd".to_owned(),
        4 => "x".repeat(rng.random_range(1000..20_000)),
        5 => "00000000-0000-0000-0000-000000000000".to_owned(),
        6 => rng.random::<i64>().to_string(),
        7 => "%00".to_owned(),
        _ => escape(&text(rng, 16)),
    }
}

/// Random text: ASCII, control characters, unicode.
fn text(rng: &mut StdRng, max: usize) -> String {
    let n = rng.random_range(0..=max);
    (0..n)
        .map(|_| match rng.random_range(0..4) {
            0 => char::from(rng.random_range(0u8..128)),
            1 => char::from_u32(rng.random_range(0x80..0x3000)).unwrap_or('?'),
            2 => ['é', '😀', '\u{202e}', '\u{0}', '"', '\\'][rng.random_range(0..6)],
            _ => char::from(rng.random_range(b'a'..=b'z')),
        })
        .collect()
}

fn escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query string of known and unknown keys with junk values, repeated keys included.
fn query(rng: &mut StdRng) -> String {
    const KEYS: &[&str] = &[
        "state", "limit", "cursor", "since", "by", "class", "workflow", "backend", "name", "tags",
        "id",
    ];
    let n = rng.random_range(0..4);
    let pairs: Vec<String> = (0..n)
        .map(|_| {
            let key = if rng.random_bool(0.8) {
                KEYS[rng.random_range(0..KEYS.len())].to_owned()
            } else {
                param(rng)
            };
            let value = match rng.random_range(0..6) {
                0 => "500000000000y".to_owned(),
                1 => "-1".to_owned(),
                2 => u64::MAX.to_string(),
                _ => param(rng),
            };
            format!("{key}={value}")
        })
        .collect();
    if pairs.is_empty() {
        String::new()
    } else {
        format!("?{}", pairs.join("&"))
    }
}

/// Any JSON, nested a little.
fn any_json(rng: &mut StdRng, depth: u32) -> Value {
    match rng.random_range(0..if depth == 0 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => json!(rng.random::<i64>()),
        3 => json!(rng.random::<f64>() * 1e300),
        4 => json!(u64::MAX),
        5 => Value::String(text(rng, 12)),
        6 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| any_json(rng, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.random_range(0..4))
                .map(|_| (text(rng, 6), any_json(rng, depth - 1)))
                .collect(),
        ),
    }
}

fn valid_workflow() -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "fuzz"}},
    })
}

/// A submit body broken in one way that makes it a bad request, whatever else it holds.
fn broken_submit(rng: &mut StdRng) -> Value {
    let mut body = json!({"workflow": valid_workflow(), "priority": 1, "tags": ["t"]});
    let junk = any_json(rng, 2);
    match rng.random_range(0..14) {
        0 => {
            body.as_object_mut().map(|b| b.remove("workflow"));
        }
        1 => {
            body["workflow"] =
                [Value::Null, json!(1), json!("w"), json!([1])][rng.random_range(0..4)].clone()
        }
        2 => body["workflow"]["1"]["class_type"] = json!(rng.random::<i64>()),
        3 => body["workflow"]["2"]["inputs"]["images"] = json!([param(rng), 0]),
        4 => body["workflow"]["1"]["inputs"]["loop"] = json!(["2", 0]),
        5 => body[format!("x{}", text(rng, 6))] = junk,
        6 => {
            body["priority"] =
                [json!("high"), json!(1u64 << 40), json!(0.5)][rng.random_range(0..3)].clone()
        }
        7 => {
            body["max_attempts"] = [json!(0), json!(101), json!(-1)][rng.random_range(0..3)].clone()
        }
        8 => {
            body["timeouts"] =
                json!({"deadline_ms": rng.random_range(gantry_core::MAX_LIMIT_MS + 1..=u64::MAX)})
        }
        9 => body["tags"] = json!([""]),
        10 => body["attachments"] = json!([{"name": text(rng, 8) + "-unused", "data": "aGk="}]),
        11 => {
            body["workflow"]["1"]["class_type"] =
                json!(format!("NoSuchClass{}", rng.random::<u32>()))
        }
        12 => body["timeouts"] = json!({"node_stall_ms": junk, "nope": 1}),
        _ => body["kind"] = json!("command"),
    }
    // Sometimes a huge string rides along in metadata; the body stays bad.
    if rng.random_bool(0.1) {
        body["metadata"] = json!({"big": "y".repeat(rng.random_range(10_000..300_000))});
    }
    body
}

/// A `POST /v1/backends` body that cannot add a backend.
fn broken_backend(rng: &mut StdRng) -> Value {
    let mut body = json!({"url": "http://127.0.0.1:9", "name": "fuzz", "tags": ["t"]});
    match rng.random_range(0..8) {
        0 => body["url"] = Value::String(text(rng, 12)),
        1 => body["url"] = json!("ftp://127.0.0.1:9"),
        2 => body["url"] = json!(rng.random::<i64>()),
        3 => body["name"] = json!("a"),
        4 => body["tags"] = json!(["", " "]),
        5 => body["priority"] = json!("top"),
        6 => body[format!("x{}", text(rng, 4))] = any_json(rng, 2),
        _ => {
            body.as_object_mut().map(|b| b.remove("url"));
        }
    }
    body
}

/// A body for `route`: random JSON, a broken valid one, truncated, deeply nested, raw
/// bytes, or nothing; with a content type that may not fit it.
fn body(rng: &mut StdRng, route: &str) -> (Vec<u8>, Option<String>) {
    let json_text = |v: &Value| serde_json::to_vec(v).unwrap_or_default();
    let bytes = match rng.random_range(0..8) {
        0 => Vec::new(),
        1 => json_text(&any_json(rng, 3)),
        2 | 3 => match route {
            "/v1/jobs" => json_text(&broken_submit(rng)),
            "/v1/backends" => json_text(&broken_backend(rng)),
            _ => json_text(&json!({"token": text(rng, 20)})),
        },
        4 => {
            // A valid body cut short: never valid JSON.
            let whole =
                json_text(&json!({"workflow": valid_workflow(), "url": "http://127.0.0.1:9"}));
            let cut = rng.random_range(1..whole.len());
            whole[..cut].to_vec()
        }
        5 => {
            let depth = rng.random_range(100..5000);
            let mut s = "[".repeat(depth);
            s.push_str(&"]".repeat(depth));
            s.into_bytes()
        }
        6 => (0..rng.random_range(1..256))
            .map(|_| rng.random())
            .collect(),
        _ => text(rng, 64).into_bytes(),
    };
    let content_type = match rng.random_range(0..7) {
        0 => None,
        1 => Some("text/plain".to_owned()),
        2 => Some("multipart/form-data; boundary=xyz".to_owned()),
        3 => Some("multipart/form-data".to_owned()),
        // Any visible ASCII: what a header can carry.
        4 => Some(
            (0..rng.random_range(0..16))
                .map(|_| char::from(rng.random_range(b' '..=b'~')))
                .collect(),
        ),
        _ => Some("application/json".to_owned()),
    };
    (bytes, content_type)
}

/// A bad upload for `POST /v1/files`: empty, over the limit, or a form with no file.
fn bad_upload(rng: &mut StdRng) -> (Vec<u8>, Option<String>) {
    match rng.random_range(0..5) {
        0 => (Vec::new(), None),
        1 => (
            vec![7; MAX_ATTACHMENT as usize + rng.random_range(1..4096)],
            None,
        ),
        2 => (
            b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nvalue\r\n--b--\r\n".to_vec(),
            Some("multipart/form-data; boundary=b".to_owned()),
        ),
        3 => (
            text(rng, 40).into_bytes(),
            Some("multipart/form-data; boundary=b".to_owned()),
        ),
        _ => (b"--b\r\n".to_vec(), Some("multipart/form-data".to_owned())),
    }
}

/// Every route and method the server documents, plus the monitor's and a missing one.
async fn routes(app: &TestApp) -> Vec<(String, String)> {
    let doc = app.get_json("/v1/openapi.json").await;
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            out.push((method.to_uppercase(), path.clone()));
        }
    }
    assert!(out.len() > 20, "the document lists the routes: {out:?}");
    for path in ["/", "/ui/app.js", "/no/such/route"] {
        out.push(("GET".to_owned(), path.to_owned()));
    }
    // A method no route has.
    out.push(("PATCH".to_owned(), "/v1/jobs".to_owned()));
    out
}

/// What one answer must be; `None` when it is fine.
async fn judge(response: reqwest::Response) -> Option<String> {
    let status = response.status().as_u16();
    if status >= 500 {
        let body = response.text().await.unwrap_or_default();
        return Some(format!("{status}: {body}"));
    }
    if !(400..500).contains(&status) {
        return None;
    }
    let body = response.bytes().await.unwrap_or_default();
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let error = parsed.as_ref().map(|v| &v["error"]);
    let shaped = error.is_some_and(|e| {
        e["code"].as_str().is_some_and(|c| !c.is_empty())
            && e["message"].as_str().is_some_and(|m| !m.trim().is_empty())
            && e.get("details").is_some()
    });
    (!shaped).then(|| {
        format!(
            "{status} without the error shape: {:?}",
            String::from_utf8_lossy(&body)
        )
    })
}

/// Fills `{name}` parameters of a documented path with junk (never an existing
/// backend's name, which a drain would change).
fn fill(rng: &mut StdRng, path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').map_or(rest.len(), |c| open + c + 1);
        let mut value = param(rng);
        while ["a", "b"].contains(&value.as_str()) || value.is_empty() {
            value = param(rng);
        }
        out.push_str(&value);
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

#[tokio::test]
async fn bad_requests_to_every_route_get_a_shaped_4xx_and_change_nothing() {
    let app = spawn_app(2, |c| c.max_attachment_bytes = MAX_ATTACHMENT).await;
    let seed = env_or("GANTRY_FUZZ_SEED", SEED);
    let per_route = env_or("GANTRY_FUZZ_REQUESTS", REQUESTS_PER_ROUTE);
    let mut rng = StdRng::seed_from_u64(seed);
    let before = contents(&app).await;
    let mut failures: Map<String, Value> = Map::new();
    let mut n_sent = 0;
    for (method, path) in routes(&app).await {
        for _ in 0..per_route {
            let url_path = fill(&mut rng, &path);
            let q = query(&mut rng);
            let (bytes, content_type) = if path == "/v1/files" && method == "POST" {
                bad_upload(&mut rng)
            } else {
                body(&mut rng, &path)
            };
            let method_value = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let mut request = app
                .http
                .request(method_value, format!("{}{url_path}{q}", app.url))
                .body(bytes.clone());
            if let Some(ct) = content_type.as_deref() {
                request = request.header("content-type", ct);
            }
            if path == "/v1/events" {
                // A bad Last-Event-ID, and no since to win over it.
                let id =
                    [param(&mut rng), "-3".into(), "1e3".into()][rng.random_range(0..3)].clone();
                request = app
                    .http
                    .get(format!("{}{url_path}", app.url))
                    .header("last-event-id", id);
            }
            let response = match request.send().await {
                Ok(r) => r,
                Err(e) => {
                    failures.insert(
                        format!("{method} {url_path}{q} #{n_sent}"),
                        json!(format!("no answer: {e}")),
                    );
                    continue;
                }
            };
            n_sent += 1;
            if let Some(why) = judge(response).await {
                let shown: String = String::from_utf8_lossy(&bytes).chars().take(300).collect();
                failures.insert(
                    format!("{method} {url_path}{q} #{n_sent}"),
                    json!({"why": why, "content_type": content_type, "body": shown}),
                );
            }
        }
    }
    let after = contents(&app).await;
    assert!(
        failures.is_empty(),
        "{} of {n_sent} requests (seed {seed}) were answered badly:\n{:#}",
        failures.len(),
        Value::Object(failures)
    );
    assert_eq!(
        after, before,
        "bad requests changed the store (seed {seed})"
    );
    app.shutdown().await;
}

/// A control message an agent might send, right or wrong in every field.
fn control_message(rng: &mut StdRng) -> Value {
    const TYPES: &[&str] = &[
        "hello",
        "child",
        "log",
        "restart",
        "command_started",
        "command_output",
        "command_exit",
        "command_lost",
        "nonsense",
    ];
    if rng.random_bool(0.15) {
        return any_json(rng, 3);
    }
    let mut m = Map::new();
    m.insert(
        "type".into(),
        json!(TYPES[rng.random_range(0..TYPES.len())]),
    );
    for key in [
        "allow",
        "child",
        "lines",
        "restarts",
        "supervised",
        "state",
        "line",
        "reason",
        "at",
        "job",
        "attempt",
        "exit_code",
        "outcome",
    ] {
        if rng.random_bool(0.4) {
            let v = match rng.random_range(0..3) {
                0 => json!([text(rng, 8), any_json(rng, 1)]),
                1 => json!("x".repeat(rng.random_range(0..70_000))),
                _ => any_json(rng, 2),
            };
            m.insert(key.into(), v);
        }
    }
    Value::Object(m)
}

/// An agent's link sends junk: frames too short, unknown ops, control messages that are
/// not JSON or hold wrong types, lines of any size. The coordinator drops what it cannot
/// read and goes on: its control task still takes the next good message, and every
/// route still answers.
#[tokio::test]
async fn an_agent_sending_junk_frames_leaves_the_coordinator_serving() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let app = spawn_app(0, |_| {}).await;
    let seed = env_or("GANTRY_FUZZ_SEED", SEED);
    let mut rng = StdRng::seed_from_u64(seed);
    let ws = app.url.replacen("http", "ws", 1);
    let (mut link, _) =
        tokio_tungstenite::connect_async(format!("{ws}/v1/agents/connect?name=fuzz"))
            .await
            .expect("the agent links");
    let control = |m: &Value| {
        let mut f = vec![0, 0, 0, 0, 2];
        f.extend_from_slice(&serde_json::to_vec(m).unwrap());
        Message::Binary(f.into())
    };
    for _ in 0..env_or("GANTRY_FUZZ_REQUESTS", REQUESTS_PER_ROUTE) * 20 {
        let message = match rng.random_range(0..6) {
            0 => Message::Binary(
                (0..rng.random_range(0..8))
                    .map(|_| rng.random())
                    .collect::<Vec<u8>>()
                    .into(),
            ),
            1 => {
                // A frame of a stream nobody opened, or an op that does not exist.
                let mut f = rng.random::<u32>().to_be_bytes().to_vec();
                f.push(rng.random_range(0..9));
                f.extend((0..rng.random_range(0..16)).map(|_| rng.random::<u8>()));
                Message::Binary(f.into())
            }
            2 => {
                let mut f = vec![0, 0, 0, 0, 2];
                f.extend(text(&mut rng, 32).into_bytes());
                Message::Binary(f.into())
            }
            3 => Message::Text(text(&mut rng, 16).into()),
            _ => control(&control_message(&mut rng)),
        };
        link.send(message).await.expect("the link takes the frame");
    }
    // The control task is alive if a good line sent after all that arrives.
    let marker = format!("after the junk, seed {seed}");
    link.send(control(&json!({"type": "log", "line": marker})))
        .await
        .unwrap();
    crate::support::poll_until(
        "the line sent after the junk",
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(20),
        || async {
            let (status, logs) = app.get("/v1/backends/fuzz/logs").await;
            let lines = logs["lines"].as_array().cloned().unwrap_or_default();
            if status == 200 && lines.iter().any(|l| l == &json!(marker)) {
                Ok(())
            } else {
                Err((status, logs))
            }
        },
    )
    .await;
    for path in ["/healthz", "/v1/backends", "/v1/state"] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
    }
    app.shutdown().await;
}
