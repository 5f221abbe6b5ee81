//! The edges of the v1 API: what it refuses and how, idempotency, cancel, listing.

use crate::support::{
    assert_error, fixture, names, poll_until, sleep_workflow, spawn_app, tiny_workflow,
};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test]
async fn bad_requests_are_refused_naming_the_culprit_and_create_no_job() {
    let app = spawn_app(1, |c| c.max_body_bytes = 4096).await;

    let not_json = app.submit_raw(b"{\"workflow\": {".to_vec()).await;
    let e = assert_error(&not_json, 400, "invalid_json", &["not JSON"]);
    assert!(e["details"]["line"].is_u64(), "{e:#}");

    // The UI's save format, under "workflow" and as the whole body.
    let ui = fixture("workflows/ui-format-example.json");
    let wrapped = app.submit(&json!({ "workflow": ui })).await;
    let e = assert_error(&wrapped, 400, "ui_format", &["API format", "Export (API)"]);
    assert_eq!(e["details"]["field"], "workflow");
    let bare = app.submit(&ui).await;
    assert_error(&bare, 400, "ui_format", &["API format", "Export (API)"]);

    // A bare API-format graph: told to put it under "workflow".
    let graph = app.submit(&tiny_workflow("bare")).await;
    assert_error(
        &graph,
        400,
        "unknown_field",
        &["\"1\"", "under \"workflow\""],
    );

    let no_workflow = app.submit(&json!({"priority": 1})).await;
    assert_error(&no_workflow, 400, "missing_field", &["\"workflow\""]);

    let dangling = fixture("comfyui/workflows/f_link_to_missing_node.json");
    let e = assert_error(
        &app.submit(&json!({ "workflow": dangling })).await,
        400,
        "missing_link_target",
        &["node 3 (ImageInvert)", "input image", "node 99"],
    );
    assert_eq!(e["details"]["node"], "3");

    let unknown = fixture("comfyui/workflows/f_unknown_class_type.json");
    let e = assert_error(
        &app.submit(&json!({ "workflow": unknown })).await,
        400,
        "unknown_class",
        &["node 2", "GantryDoesNotExist"],
    );
    assert_eq!(
        e["details"],
        json!({"node": "2", "class_type": "GantryDoesNotExist"})
    );

    let padding = "x".repeat(5000);
    let large = app
        .submit(&json!({"workflow": tiny_workflow("big"), "metadata": {"pad": padding}}))
        .await;
    let e = assert_error(&large, 413, "body_too_large", &["4096"]);
    assert_eq!(e["details"]["limit_bytes"], 4096);

    let typo = app
        .submit(&json!({"workflow": tiny_workflow("t"), "priorty": 5}))
        .await;
    let e = assert_error(&typo, 400, "unknown_field", &["\"priorty\"", "priority"]);
    assert_eq!(e["details"]["field"], "priorty");

    let zero = app
        .submit(&json!({"workflow": tiny_workflow("t"), "max_attempts": 0}))
        .await;
    let e = assert_error(&zero, 400, "invalid_field", &["max_attempts", "1 to 100"]);
    assert_eq!(e["details"]["field"], "max_attempts");

    let bad_timeouts = app
        .submit(&json!({"workflow": tiny_workflow("t"), "timeouts": {"start": 5}}))
        .await;
    assert_error(&bad_timeouts, 400, "invalid_field", &["timeouts", "start"]);

    assert_eq!(
        app.all_jobs().await,
        Vec::<Value>::new(),
        "no job was created"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn an_idempotency_key_answers_the_same_job_or_a_conflict() {
    let app = spawn_app(1, |_| {}).await;
    let body = json!({"workflow": tiny_workflow("idem"), "idempotency_key": "order-17"});
    let id = app.submit_ok(&body).await;

    let (status, again) = app.submit(&body).await;
    assert_eq!(status, 200, "{again:#}");
    assert_eq!(again["id"], id.as_str());
    assert_eq!(again["idempotency_key"], "order-17");

    let other = json!({"workflow": tiny_workflow("other"), "idempotency_key": "order-17"});
    let e = assert_error(
        &app.submit(&other).await,
        409,
        "idempotency_conflict",
        &["order-17", &id],
    );
    assert_eq!(e["details"]["job_id"], id.as_str());

    // Still the same job once it has finished.
    assert_eq!(app.wait_terminal(&id).await["state"], "succeeded");
    let (status, after) = app.submit(&body).await;
    assert_eq!((status, after["id"].as_str()), (200, Some(id.as_str())));
    assert_eq!(after["state"], "succeeded");

    let jobs = app.all_jobs().await;
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    assert_eq!(jobs[0]["id"], id.as_str());
    app.shutdown().await;
}

#[tokio::test]
async fn cancel_a_queued_job_at_once_and_a_running_one_on_the_backend() {
    // A cancel that the backend never confirmed would take this long: far past the test's
    // bound, so only a confirmed interrupt passes. No pipelining, so the second job waits
    // in gantry's own queue (a pipelined one is cancelled in pipeline.rs).
    let app = spawn_app(1, |c| {
        c.cancel_grace = Duration::from_secs(20);
        c.pipeline = false;
    })
    .await;

    // 600 simulated seconds: 30 s of real time, far longer than the test.
    let running = app
        .submit_ok(&json!({"workflow": sleep_workflow(600.0, 600, 1)}))
        .await;
    let job = app
        .wait_job(
            &running,
            "the long job executing",
            Duration::from_secs(10),
            |j| j["phase"] == "executing",
        )
        .await;
    let prompt_id = job["attempts"][0]["prompt_id"].as_str().unwrap().to_owned();

    // The only backend is busy: this one waits in gantry's queue.
    let queued = app
        .submit_ok(&json!({"workflow": sleep_workflow(1.0, 1, 2)}))
        .await;
    assert_eq!(app.get_job(&queued).await["state"], "queued");
    let (status, body) = app.cancel(&queued).await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["state"], "cancelled");
    let job = app.get_job(&queued).await;
    assert_eq!(job["state"], "cancelled");
    assert_eq!(job["attempts"], json!([]));

    let asked = Instant::now();
    let (status, body) = app.cancel(&running).await;
    assert_eq!(status, 202, "{body:#}");
    assert_eq!(
        (body["state"].as_str(), &body["cancel_requested"]),
        (Some("running"), &json!(true))
    );
    let job = app.wait_terminal(&running).await;
    let took = asked.elapsed();
    assert_eq!(job["state"], "cancelled", "{job:#}");
    assert!(
        took < Duration::from_secs(5),
        "the cancel took {took:?}: not confirmed by the backend"
    );
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "{job:#}");
    assert_eq!(job["attempts"][0]["status"], "cancelled");
    assert_eq!(job["outputs"], json!([]));

    // The prompt was interrupted on the backend, not left to run.
    let queue = poll_until(
        "the sim's queue empty",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            let q = app.sim_json(0, "/queue").await;
            let empty = q["queue_running"] == json!([]) && q["queue_pending"] == json!([]);
            if empty {
                Ok(q)
            } else {
                Err(q)
            }
        },
    )
    .await;
    assert_eq!(queue["queue_running"], json!([]));
    let history = app.sim_json(0, &format!("/history/{prompt_id}")).await;
    let messages = history[&prompt_id]["status"]["messages"]
        .as_array()
        .expect("a history entry");
    assert!(
        messages.iter().any(|m| m[0] == "execution_interrupted"),
        "{history:#}"
    );

    let events = app.read_sse(&running).await;
    let changes: Vec<&str> = names(&events)
        .into_iter()
        .filter(|n| !n.starts_with("node"))
        .collect();
    assert_eq!(
        changes,
        [
            "queued",
            "dispatched",
            "submitted",
            "started",
            "cancel_requested",
            "cancelled"
        ]
    );
    // The node that was running is in the story, ended as interrupted.
    let interrupted = events
        .iter()
        .find(|e| e.event == "node_finished" && e.data["status"] == "interrupted");
    assert!(interrupted.is_some(), "{:?}", names(&events));

    for id in [&running, &queued] {
        let e = assert_error(&app.cancel(id).await, 409, "job_finished", &["cancelled"]);
        assert_eq!(e["details"]["state"], "cancelled");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn list_filters_by_state_and_pages_with_a_cursor() {
    let app = spawn_app(1, |_| {}).await;
    let mut succeeded = Vec::new();
    for i in 0..3 {
        succeeded.push(
            app.submit_ok(&json!({"workflow": tiny_workflow(&format!("list{i}"))}))
                .await,
        );
    }
    let rejected = fixture("comfyui/workflows/f_missing_required_input.json");
    let failed = app.submit_ok(&json!({ "workflow": rejected })).await;
    for id in &succeeded {
        assert_eq!(app.wait_terminal(id).await["state"], "succeeded");
    }
    assert_eq!(app.wait_terminal(&failed).await["state"], "failed");

    let mut walked = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(c) => format!("/v1/jobs?state=succeeded&limit=1&cursor={c}"),
            None => "/v1/jobs?state=succeeded&limit=1".to_owned(),
        };
        let page = app.get_json(&path).await;
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 1, "{page:#}");
        for job in jobs {
            assert_eq!(job["state"], "succeeded");
            walked.push(job["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let newest_first: Vec<String> = succeeded.iter().rev().cloned().collect();
    assert_eq!(walked, newest_first);

    let page = app.get_json("/v1/jobs?state=failed").await;
    let ids: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [failed.as_str()]);
    assert_eq!(page["next_cursor"], Value::Null);
    assert_eq!(app.all_jobs().await.len(), 4);

    let (status, body) = app.get("/v1/jobs?state=done").await;
    assert_error(&(status, body), 400, "invalid_query", &["state=done"]);
    let (status, body) = app.get("/v1/jobs?limit=0").await;
    assert_error(&(status, body), 400, "invalid_query", &["limit=0"]);
    let (status, body) = app.get("/v1/jobs?cursor=abc").await;
    assert_error(&(status, body), 400, "invalid_query", &["cursor=abc"]);
    app.shutdown().await;
}

/// A metrics scrape parses as Prometheus text and counts what happened: jobs by state,
/// attempts, failures by code, timeouts by phase, queue time, dispatch latency, node
/// durations by class, backends and open event streams.
#[tokio::test]
async fn a_metrics_scrape_parses_and_counts_what_happened() {
    use crate::support::poll_until;
    let app = spawn_app(1, |c| c.backoff_base = Duration::from_millis(10)).await;
    // Long enough for its nodes to be seen running (a tiny one ends at the submit's
    // reconcile, before its node messages are read).
    let ok = app
        .submit_ok(&json!({"workflow": sleep_workflow(2.0, 4, 9)}))
        .await;
    assert_eq!(app.wait_terminal(&ok).await["state"], "succeeded");
    app.sims[0].set_faults(&["hang-before-start"]).unwrap();
    let stuck = app
        .submit_ok(&json!({"workflow": tiny_workflow("metrics2"), "max_attempts": 1, "timeouts": {"start_ms": 200}}))
        .await;
    assert_eq!(app.wait_terminal(&stuck).await["state"], "failed");
    // A stream held open while scraping.
    let stream = app
        .http
        .get(format!("{}/v1/events", app.url))
        .send()
        .await
        .unwrap();

    let sample = |scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => f64::NAN,
            })
    };
    let scrape = poll_until(
        "the metrics count both jobs",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let response = app
                .http
                .get(format!("{}/metrics", app.url))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let text = response.text().await.unwrap();
            let lines = text.lines().map(|l| Ok(l.to_owned()));
            let scrape = prometheus_parse::Scrape::parse(lines).expect("the scrape parses");
            let want = [
                ("gantry_jobs", vec![("state", "succeeded")], 1.0),
                ("gantry_jobs", vec![("state", "failed")], 1.0),
                ("gantry_jobs", vec![("state", "queued")], 0.0),
                ("gantry_attempts_total", vec![], 2.0),
                (
                    "gantry_attempt_failures_total",
                    vec![("code", "timeout")],
                    1.0,
                ),
                ("gantry_timeouts_total", vec![("phase", "start")], 1.0),
                ("gantry_queue_time_seconds_count", vec![], 2.0),
                ("gantry_dispatch_latency_seconds_count", vec![], 2.0),
                (
                    "gantry_node_duration_seconds_count",
                    vec![("class", "SaveImage")],
                    1.0,
                ),
                ("gantry_event_streams", vec![], 1.0),
            ];
            let wrong: Vec<String> = want
                .iter()
                .filter(|(name, labels, v)| sample(&scrape, name, labels) != Some(*v))
                .map(|(name, labels, v)| {
                    format!(
                        "{name}{labels:?} = {:?}, want {v}",
                        sample(&scrape, name, labels)
                    )
                })
                .collect();
            if wrong.is_empty() {
                Ok(scrape)
            } else {
                Err((wrong, text))
            }
        },
    )
    .await;
    let backends: f64 = gantry_api::BackendStatus::ALL
        .iter()
        .filter_map(|s| sample(&scrape, "gantry_backends", &[("status", s.as_str())]))
        .sum();
    assert_eq!(backends, 1.0);
    drop(stream);
    app.shutdown().await;
}
