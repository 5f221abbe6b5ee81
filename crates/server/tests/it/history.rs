//! A job's node history is stored, not live only (issue 24): each node's start, end (with
//! its duration) and cached mark are events with a sequence number, so a client that
//! subscribes after the job finished, or resumes with `Last-Event-ID`, is told every
//! node in order before the terminal event. Checked against what a real ComfyUI said for
//! the same prompts (the captures a, b and b2: nodes without progress, a fully cached
//! rerun and a partly cached one).

use crate::support::{fixture, names, parse_sse_blocks, spawn_app, Sse, TestApp};
use serde_json::Value;
use std::time::Duration;

/// The prompt a capture submitted, and what the real server said of its nodes: the
/// nodes it ran, in order (`executing`), and the ones it took from its cache.
fn capture(name: &str) -> (Value, Vec<String>, Vec<String>) {
    let c = fixture(&format!("comfyui/captures/{name}.json"));
    let events = c["events"].as_array().unwrap();
    let prompt = events
        .iter()
        .find(|e| e["kind"] == "http_request" && e["body"]["path"] == "/prompt")
        .map(|e| e["body"]["json"]["prompt"].clone())
        .expect("the capture submits a prompt");
    let (mut ran, mut cached) = (Vec::new(), Vec::new());
    for e in events {
        let b = &e["body"];
        match b["type"].as_str() {
            Some("executing") => {
                if let Some(node) = b["data"]["node"].as_str() {
                    ran.push(node.to_owned());
                }
            }
            Some("execution_cached") => {
                cached.extend(
                    b["data"]["nodes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|n| n.as_str().unwrap().to_owned()),
                );
            }
            _ => {}
        }
    }
    (prompt, ran, cached)
}

/// The job's stream from `after` (a `Last-Event-ID`), until the server closes it.
async fn events_after(app: &TestApp, id: &str, after: Option<&str>) -> Vec<Sse> {
    let mut request = app.http.get(format!("{}/v1/jobs/{id}/events", app.url));
    if let Some(after) = after {
        request = request.header("Last-Event-ID", after);
    }
    let mut response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let (mut buf, mut events) = (String::new(), Vec::new());
    let read = async {
        while let Some(chunk) = response.chunk().await.unwrap() {
            buf.push_str(std::str::from_utf8(&chunk).unwrap());
            parse_sse_blocks(&mut buf, &mut events);
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the stream of a finished job closes");
    events
}

fn nodes_of<'a>(events: &'a [Sse], kind: &str) -> Vec<&'a str> {
    events
        .iter()
        .filter(|e| e.event == kind)
        .map(|e| e.data["node"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn a_late_subscriber_gets_every_node_in_order_as_a_real_comfyui_ran_them() {
    let app = spawn_app(1, |_| {}).await;
    for name in ["a_normal_run", "b_cached_rerun", "b2_partial_cache"] {
        let (prompt, ran, cached) = capture(name);
        let id = app
            .submit_ok(&serde_json::json!({"workflow": prompt}))
            .await;
        let job = app.wait_terminal(&id).await;
        assert_eq!(job["state"], "succeeded", "{name}: {job:#}");

        // Subscribed after the end: the whole story, nodes included, then the end.
        let events = events_after(&app, &id, None).await;
        let story = names(&events);
        assert_eq!(story.last(), Some(&"succeeded"), "{name}: {story:?}");
        assert_eq!(nodes_of(&events, "node_started"), ran, "{name}: {story:?}");
        assert_eq!(nodes_of(&events, "node_finished"), ran, "{name}: {story:?}");
        let said_cached: Vec<&str> = events
            .iter()
            .filter(|e| e.event == "nodes_cached")
            .flat_map(|e| e.data["nodes"].as_array().unwrap())
            .map(|n| n.as_str().unwrap())
            .collect();
        assert_eq!(said_cached, cached, "{name}: {story:?}");
        // Each node ends before the next starts, all after `started`, each with its
        // duration and the job's seq order.
        let started = story.iter().position(|n| *n == "started").unwrap();
        let mut open: Option<&str> = None;
        for (i, e) in events.iter().enumerate() {
            match e.event.as_str() {
                "node_started" => {
                    assert!(i > started, "{name}: {story:?}");
                    assert_eq!(open, None, "{name}: {story:?}");
                    open = e.data["node"].as_str();
                    assert_eq!(
                        e.data["class_type"],
                        prompt[open.unwrap()]["class_type"],
                        "{name}"
                    );
                }
                "node_finished" => {
                    assert_eq!(open, e.data["node"].as_str(), "{name}: {story:?}");
                    assert_eq!(e.data["status"], "completed");
                    assert!(e.data["duration_ms"].as_u64().is_some(), "{:?}", e.data);
                    open = None;
                }
                _ => {}
            }
        }
        let seqs: Vec<i64> = events
            .iter()
            .map(|e| e.id.as_deref().unwrap().parse().unwrap())
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

        // Resumed after the first node's start: from its end on, nothing twice.
        if let Some(first) = events.iter().find(|e| e.event == "node_started") {
            let again = events_after(&app, &id, first.id.as_deref()).await;
            let after: Vec<&Sse> = events
                .iter()
                .skip_while(|e| e.id != first.id)
                .skip(1)
                .collect();
            assert_eq!(
                names(&again),
                names(after.iter().copied()),
                "{name}: resumed"
            );
        }
        // Resumed after the end: the stream closes at once, empty.
        let last = events.last().unwrap().id.as_deref();
        assert!(events_after(&app, &id, last).await.is_empty());
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_bad_last_event_id_is_refused_by_name() {
    let app = spawn_app(1, |_| {}).await;
    let id = app
        .submit_ok(&serde_json::json!({"workflow": crate::support::tiny_workflow("h")}))
        .await;
    let r = app
        .http
        .get(format!("{}/v1/jobs/{id}/events", app.url))
        .header("Last-Event-ID", "seven")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_since");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("\"seven\""));
    app.shutdown().await;
}
