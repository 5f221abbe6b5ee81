//! `/v1/openapi.json`: a valid OpenAPI 3.1 document that lists every route, and every
//! answer the server gives matches the schema the document names for it.

use crate::support::{parse_sse_blocks, spawn_app, tiny_workflow, Sse};
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// Every route of the API. A route added to the server without being added here fails
/// the test, and so does one documented here that the document lacks.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/{id}"),
    ("DELETE", "/v1/jobs/{id}"),
    ("GET", "/v1/jobs/{id}/events"),
    ("GET", "/v1/jobs/{id}/request"),
    ("GET", "/v1/jobs/{id}/outputs/{name}"),
    ("GET", "/v1/jobs/{id}/log"),
    ("POST", "/v1/files"),
    ("GET", "/v1/events"),
    ("GET", "/v1/backends"),
    ("POST", "/v1/backends"),
    ("POST", "/v1/backends/{name}/drain"),
    ("POST", "/v1/backends/{name}/resume"),
    ("DELETE", "/v1/backends/{name}/blocks/{workflow_hash}"),
    ("GET", "/v1/state"),
    ("GET", "/v1/cluster"),
    ("GET", "/v1/stats/nodes"),
    ("GET", "/v1/stats/timeouts"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/session"),
    ("POST", "/v1/session"),
    ("DELETE", "/v1/session"),
    ("GET", "/v1/agents/connect"),
    ("GET", "/v1/backends/{name}/logs"),
];

/// The value at a local `$ref` (`#/components/schemas/Job`).
fn resolve<'d>(doc: &'d Value, reference: &str) -> Option<&'d Value> {
    doc.pointer(reference.strip_prefix('#')?)
}

fn refs<'v>(v: &'v Value, out: &mut Vec<&'v str>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r);
            }
            m.values().for_each(|v| refs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

/// Check `body` against the schema the document gives for `status` and `content_type`
/// of the operation; answers whether the document names one.
fn check_against(
    doc: &Value,
    path: &str,
    method: &str,
    status: u16,
    content_type: &str,
    body: &Value,
) -> bool {
    let op = &doc["paths"][path][method.to_lowercase()];
    let response = &op["responses"][status.to_string()];
    assert!(
        response.is_object(),
        "{method} {path} answered {status}, which the document does not list: {body}"
    );
    let Some(schema) = response["content"][content_type].get("schema") else {
        return false;
    };
    // The schema, with the document's components beside it so that its refs resolve.
    let root = json!({"allOf": [schema], "components": doc["components"]});
    let validator = jsonschema::validator_for(&root)
        .unwrap_or_else(|e| panic!("{method} {path} {status}: the schema does not compile: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status}: the answer does not match the document:\n{}\n{body:#}",
        errors.join("\n")
    );
    true
}

#[tokio::test]
async fn the_openapi_document_validates_lists_every_route_and_matches_every_answer() {
    let app = spawn_app(1, |_| {}).await;
    let id = app
        .submit_ok(
            &json!({"workflow": tiny_workflow("openapi"), "tags": [], "metadata": {"who": "test"}}),
        )
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let output = job["outputs"][0]["name"].as_str().unwrap().to_owned();
    let backend = crate::support::backend_name(0);

    let text = app
        .http
        .get(format!("{}/v1/openapi.json", app.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // A valid OpenAPI 3.1 document, by a parser of the specification's own types.
    let spec = oas3::from_json(&text).expect("the document parses as OpenAPI 3.1");
    let version = spec
        .validate_version()
        .expect("a supported OpenAPI version");
    assert_eq!((version.major, version.minor), (3, 1));
    let doc: Value = serde_json::from_str(&text).unwrap();
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        assert!(resolve(&doc, r).is_some(), "{r} does not resolve");
    }

    let listed: BTreeSet<(String, String)> = spec
        .operations()
        .map(|(path, method, _)| (method.to_string(), path))
        .collect();
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(listed, expected, "the document's routes");

    // Every route answers (none is the "no such route" fallback), and every JSON answer
    // matches its schema. Drain goes before resume, so both succeed.
    let mut checked = 0;
    for (method, path) in ROUTES {
        if *path == "/v1/agents/connect" {
            // A WebSocket: tests/it/agents.rs drives it.
            continue;
        }
        let url = format!(
            "{}{}",
            app.url,
            path.replace("{id}", &id)
                .replace("{workflow_hash}", "0123abcd")
                .replace(
                    "{name}",
                    if path.contains("outputs") {
                        &output
                    } else {
                        &backend
                    }
                )
        );
        let request = match *method {
            "GET" => app.http.get(&url),
            "POST" if *path == "/v1/jobs" => app
                .http
                .post(&url)
                .json(&json!({"workflow": tiny_workflow("openapi2"), "priority": 3})),
            "POST" if *path == "/v1/files" => app.http.post(&url).body(b"an input file".to_vec()),
            "POST" if *path == "/v1/backends" => app
                .http
                .post(&url)
                .json(&json!({"url": "http://127.0.0.1:9", "name": "unreachable"})),
            "POST" => app.http.post(&url),
            "DELETE" => app.http.delete(&url),
            other => panic!("{other}"),
        };
        let mut response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .to_owned();
        if content_type == "text/event-stream" {
            // The job's stream ends at its terminal event; the farm's is read only as
            // far as the first event.
            let (mut buf, mut events): (String, Vec<Sse>) = (String::new(), Vec::new());
            while events.iter().filter(|e| e.id.is_some()).count() < 2 {
                let Some(chunk) = response.chunk().await.unwrap() else {
                    break;
                };
                buf.push_str(std::str::from_utf8(&chunk).unwrap());
                parse_sse_blocks(&mut buf, &mut events);
            }
            let persisted: Vec<&Sse> = events.iter().filter(|e| e.id.is_some()).collect();
            assert!(!persisted.is_empty(), "{path}: no events");
            for e in persisted {
                assert_eq!(e.data["type"], e.event.as_str());
                assert_eq!(e.data["seq"].to_string(), *e.id.as_ref().unwrap());
                assert!(check_against(
                    &doc,
                    path,
                    method,
                    status,
                    &content_type,
                    &e.data
                ));
            }
            checked += 1;
            continue;
        }
        let body = response.bytes().await.unwrap();
        if content_type == "application/json" {
            let body: Value = serde_json::from_slice(&body).unwrap();
            assert_ne!(
                body["error"]["message"], "no such route",
                "{method} {path} is documented but not served"
            );
            if check_against(&doc, path, method, status, &content_type, &body) {
                checked += 1;
            }
        } else {
            assert!(
                (200..300).contains(&status),
                "{method} {path}: {status} {content_type}"
            );
            let content = &doc["paths"][path][method.to_lowercase()]["responses"]
                [status.to_string()]["content"];
            assert!(
                content[content_type.as_str()].is_object() || content["*/*"].is_object(),
                "{method} {path}: {status} {content_type} is not in the document"
            );
        }
    }
    assert!(
        checked >= 12,
        "only {checked} answers had a schema to check"
    );

    // Refusals match the error schema too.
    let missing = app
        .http
        .get(format!(
            "{}/v1/jobs/{}",
            app.url, "00000000-0000-4000-8000-000000000000"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert!(check_against(
        &doc,
        "/v1/jobs/{id}",
        "GET",
        404,
        "application/json",
        &body
    ));
    let bad = app
        .submit(&json!({"workflow": tiny_workflow("x"), "priority": "high"}))
        .await;
    assert!(check_against(
        &doc,
        "/v1/jobs",
        "POST",
        bad.0,
        "application/json",
        &bad.1
    ));

    // The submit body's fields as the document has them are the ones the server takes.
    let props: BTreeSet<&str> = doc["components"]["schemas"]["SubmitRequest"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let taken: BTreeSet<&str> = gantry_api::SubmitRequest::FIELDS.iter().copied().collect();
    assert_eq!(props, taken);
    app.shutdown().await;
}
