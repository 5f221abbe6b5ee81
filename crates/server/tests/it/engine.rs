//! Jobs through the engine to simulated backends and back: outputs, events, the cached
//! prompt race, rejections, routing around missing models and failing nodes.

use crate::support::{
    assert_rfc3339_ms, fixture, names, sim_config, sleep_workflow, spawn_app, spawn_app_with,
    tiny_workflow, Sse,
};
use gantry_core::Timeouts;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::time::Instant;

const PERSISTED_SUCCESS: [&str; 5] = ["queued", "dispatched", "submitted", "started", "succeeded"];

#[tokio::test]
async fn a_job_succeeds_and_its_output_downloads_with_its_hash() {
    let app = spawn_app(1, |_| {}).await;
    let id = app
        .submit_ok(&json!({"workflow": tiny_workflow("happy"), "metadata": {"order": 7}}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["error"], Value::Null);
    assert_eq!(job["metadata"], json!({"order": 7}));

    let outputs = job["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1, "{job:#}");
    let out = &outputs[0];
    assert_eq!(
        (out["node_id"].as_str(), out["type"].as_str()),
        (Some("2"), Some("output"))
    );
    assert_eq!(out["content_type"], "image/png");
    let filename = out["filename"].as_str().unwrap();
    assert!(
        filename.starts_with("happy") && filename.ends_with(".png"),
        "{filename}"
    );
    let url = out["url"].as_str().unwrap();
    assert_eq!(
        url,
        format!("/v1/jobs/{id}/outputs/{}", out["name"].as_str().unwrap())
    );

    let response = app
        .http
        .get(format!("{}{url}", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    let png = response.bytes().await.unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG: {:?}",
        &png[..png.len().min(16)]
    );
    assert_eq!(
        hex::encode(Sha256::digest(&png)),
        out["sha256"].as_str().unwrap()
    );
    assert_eq!(out["size"].as_u64(), Some(png.len() as u64));
    // The very file the backend wrote.
    let on_backend = app.sims[0]
        .output_dir()
        .join(out["subfolder"].as_str().unwrap())
        .join(filename);
    assert_eq!(std::fs::read(&on_backend).unwrap(), png.to_vec());

    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{job:#}");
    let a = &attempts[0];
    assert_eq!(
        (a["number"].as_u64(), a["backend"].as_str()),
        (Some(1), Some("a"))
    );
    assert_eq!(a["status"], "succeeded");
    assert_eq!(a["error"], Value::Null);
    let prompt_id = a["prompt_id"].as_str().unwrap();
    let history = app.sim_json(0, &format!("/history/{prompt_id}")).await;
    assert_eq!(
        history[prompt_id]["status"]["status_str"], "success",
        "{history:#}"
    );
    let times: Vec<&Value> = ["created_at", "submitted_at", "started_at", "finished_at"]
        .iter()
        .map(|k| &a[*k])
        .collect();
    for t in &times {
        assert_rfc3339_ms(t);
    }
    assert!(
        times.windows(2).all(|w| w[0].as_str() <= w[1].as_str()),
        "{a:#}"
    );
    assert_rfc3339_ms(&job["created_at"]);
    assert_rfc3339_ms(&job["updated_at"]);

    let (status, missing) = app.get(&format!("/v1/jobs/{id}/outputs/nope.png")).await;
    assert_eq!(
        (status, &missing["error"]["code"]),
        (404, &json!("not_found"))
    );
    app.shutdown().await;
}

/// Persisted events (those with an id) of a stream.
fn persisted(events: &[Sse]) -> Vec<&Sse> {
    events.iter().filter(|e| e.id.is_some()).collect()
}

/// The state changes of a stream (persisted, not a node's step).
fn states<'a>(events: &[&'a Sse]) -> Vec<&'a Sse> {
    events
        .iter()
        .copied()
        .filter(|e| !e.event.starts_with("node"))
        .collect()
}

#[tokio::test]
async fn the_event_stream_tells_the_story_and_closes() {
    let app = spawn_app(1, |_| {}).await;
    // 10 simulated seconds in 5 steps: half a second of real time, with progress.
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(10.0, 5, 7)}))
        .await;
    let live = app.read_sse(&id).await;

    let stored = persisted(&live);
    let changes = states(&stored);
    assert_eq!(
        names(changes.iter().copied()),
        PERSISTED_SUCCESS,
        "{:?}",
        names(&live)
    );
    let seqs: Vec<i64> = stored
        .iter()
        .map(|e| e.id.as_ref().unwrap().parse().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    for e in &stored {
        assert_eq!(e.data["job_id"], id.as_str());
        assert_eq!(
            e.data["seq"].as_i64().map(|s| s.to_string()).as_deref(),
            e.id.as_deref()
        );
        assert_rfc3339_ms(&e.data["at"]);
    }
    assert_eq!(changes[1].data["backend"], "a");
    assert_eq!(changes[4].data["state"], "succeeded");

    // Live events carry no id and come between started and succeeded.
    let all = names(&live);
    let started = all.iter().position(|n| *n == "started").unwrap();
    let succeeded = all.iter().position(|n| *n == "succeeded").unwrap();
    assert_eq!(
        succeeded,
        all.len() - 1,
        "the stream ends with the terminal event: {all:?}"
    );
    for (i, e) in live.iter().enumerate().filter(|(_, e)| e.id.is_none()) {
        assert_eq!(e.event, "progress", "{all:?}");
        assert!(started < i && i < succeeded, "{all:?}");
    }
    // Each node's start and end are stored, in the workflow's order, between the two.
    let nodes: Vec<(&str, &str)> = live
        .iter()
        .enumerate()
        .filter(|(_, e)| e.event.starts_with("node_"))
        .map(|(i, e)| {
            assert!(started < i && i < succeeded, "{all:?}");
            (e.event.as_str(), e.data["node"].as_str().unwrap())
        })
        .collect();
    assert_eq!(
        nodes,
        [
            ("node_started", "1"),
            ("node_finished", "1"),
            ("node_started", "2"),
            ("node_finished", "2"),
            ("node_started", "3"),
            ("node_finished", "3")
        ]
    );
    let progress: Vec<&Sse> = live.iter().filter(|e| e.event == "progress").collect();
    assert!(!progress.is_empty(), "no progress event: {all:?}");
    assert_eq!(progress[0].data["node"], "2");
    assert_eq!(progress[0].data["max"].as_f64(), Some(5.0));

    // Opened after the end: the same persisted events, then the stream closes.
    let replay = app.read_sse(&id).await;
    let ids = |events: &[&Sse]| {
        events
            .iter()
            .map(|e| e.id.clone().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(replay.len(), stored.len(), "{:?}", names(&replay));
    assert_eq!(ids(&persisted(&replay)), ids(&stored));
    assert_eq!(
        names(states(&persisted(&replay)).iter().copied()),
        PERSISTED_SUCCESS
    );
    app.shutdown().await;
}

/// seed-002: a prompt the backend serves wholly from its cache finishes before the
/// answer to its submit is read; gantry must still see it finish at once, not when a
/// timeout or a liveness poll comes round.
#[tokio::test]
async fn a_fully_cached_prompt_succeeds_at_once() {
    let app = spawn_app(1, |c| {
        c.timeouts = Timeouts {
            submit_ms: Some(30_000),
            start_ms: Some(30_000),
            node_stall_ms: Some(30_000),
            ..c.timeouts.clone()
        };
    })
    .await;
    let body = json!({"workflow": fixture("workflows/txt2img.json")});
    let first = app.submit_ok(&body).await;
    let submitted = Instant::now();
    let second = app.submit_ok(&body).await;
    let job = app.wait_terminal(&second).await;
    let took = submitted.elapsed();
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert!(
        took < Duration::from_secs(5),
        "the cached job took {took:?}"
    );
    assert_eq!(app.wait_terminal(&first).await["state"], "succeeded");
    assert_eq!(job["outputs"].as_array().unwrap().len(), 1, "{job:#}");

    // It really was served from the cache: every node of the workflow.
    let prompt_id = job["attempts"][0]["prompt_id"].as_str().unwrap();
    let history = app.sim_json(0, &format!("/history/{prompt_id}")).await;
    let messages = history[prompt_id]["status"]["messages"].as_array().unwrap();
    let cached = messages
        .iter()
        .find(|m| m[0] == "execution_cached")
        .map(|m| m[1]["nodes"].as_array().unwrap().len());
    assert_eq!(cached, Some(7), "{history:#}");

    // Once more with a backend that says nothing on its socket about the run: only a
    // look at its queue and history right after the submit can tell that it finished.
    app.sims[0].set_faults(&["ws-silent"]).unwrap();
    let submitted = Instant::now();
    let third = app.submit_ok(&body).await;
    let job = app.wait_terminal(&third).await;
    let took = submitted.elapsed();
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert!(
        took < Duration::from_secs(5),
        "the silent cached job took {took:?}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_workflow_the_backend_rejects_fails_at_once_with_its_node_errors() {
    let app = spawn_app(1, |_| {}).await;
    for (fixture_name, node, input) in [
        ("f_missing_required_input", "2", "seconds"),
        ("f_value_below_min", "2", "steps"),
    ] {
        let workflow = fixture(&format!("comfyui/workflows/{fixture_name}.json"));
        let id = app
            .submit_ok(&json!({"workflow": workflow, "max_attempts": 3}))
            .await;
        let job = app.wait_terminal(&id).await;
        assert_eq!(job["state"], "failed", "{job:#}");
        let attempts = job["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 1, "a rejection is not retried: {job:#}");
        assert_eq!(attempts[0]["status"], "failed");
        let error = &job["error"];
        assert_eq!(error["code"], "rejected", "{job:#}");
        assert_eq!(&attempts[0]["error"], error);
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("node {node} (GantrySleep)")),
            "{message}"
        );
        assert!(message.contains(input), "{message}");

        // The backend's own node_errors, whole: ask it directly for comparison.
        let direct = app
            .http
            .post(format!("{}/prompt", app.sims[0].url()))
            .json(&json!({ "prompt": workflow }))
            .send()
            .await
            .unwrap();
        assert_eq!(direct.status(), 400);
        let direct: Value = direct.json().await.unwrap();
        assert!(direct["node_errors"][node].is_object(), "{direct:#}");
        assert_eq!(error["details"]["node_errors"], direct["node_errors"]);
        assert_eq!(error["details"]["backend"], "a");

        let events = app.read_sse(&id).await;
        assert_eq!(
            names(&events),
            ["queued", "dispatched", "attempt_failed", "failed"]
        );
        assert_eq!(events[2].data["will_retry"], false);
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_backend_missing_the_model_is_skipped_for_one_that_has_it() {
    let mut without = sim_config();
    without.models = vec!["other.safetensors".into()];
    let app = spawn_app_with(vec![without, sim_config()], |c| c.backends[0].priority = 10).await;
    const MODEL: &str = "v1-5-pruned-emaonly.safetensors";

    let id = app
        .submit_ok(&json!({"workflow": fixture("workflows/txt2img.json")}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{job:#}");
    assert_eq!(
        (
            attempts[0]["backend"].as_str(),
            attempts[0]["status"].as_str()
        ),
        (Some("a"), Some("failed"))
    );
    assert_eq!(attempts[0]["error"]["code"], "missing_model");
    let message = attempts[0]["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("a: ") && message.contains(MODEL),
        "{message}"
    );
    assert_eq!(
        (
            attempts[1]["backend"].as_str(),
            attempts[1]["status"].as_str()
        ),
        (Some("b"), Some("succeeded"))
    );
    assert_eq!(
        job["excluded"],
        json!([{"backend": "a", "reason": {"kind": "missing_model", "node": "4", "input": "ckpt_name", "value": MODEL}}])
    );
    assert_eq!(job["outputs"].as_array().unwrap().len(), 1);

    // A model that no backend has is refused at submit once both have been read
    // (tests/it/models.rs); one that only a backend not read yet may have is failed
    // there, once read.
    let mut nowhere = fixture("workflows/txt2img.json");
    nowhere["4"]["inputs"]["ckpt_name"] = json!("nowhere.safetensors");
    let answer = app
        .submit(&json!({"workflow": nowhere, "max_attempts": 1}))
        .await;
    assert_eq!(answer.0, 400, "{answer:?}");
    assert_eq!(answer.1["error"]["code"], "missing_model");
    app.shutdown().await;
}

#[tokio::test]
async fn a_node_error_fails_over_to_another_backend() {
    let app = spawn_app(2, |c| {
        c.backends[0].priority = 10;
        c.backoff_base = Duration::from_millis(10);
    })
    .await;
    app.sims[0]
        .set_faults(&["error:class=ImageInvert,every=1"])
        .unwrap();
    let workflow = |color: u32| {
        json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": color}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}}
        })
    };

    let id = app
        .submit_ok(&json!({"workflow": workflow(1), "max_attempts": 3}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{job:#}");
    assert_eq!(attempts[0]["backend"], "a");
    assert_eq!(attempts[0]["error"]["code"], "node_error");
    let message = attempts[0]["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("node 2 (ImageInvert) raised RuntimeError on a"),
        "{message}"
    );
    assert_eq!(
        (
            attempts[1]["backend"].as_str(),
            attempts[1]["status"].as_str()
        ),
        (Some("b"), Some("succeeded"))
    );
    assert_eq!(job["excluded"][0]["backend"], "a");
    assert_eq!(job["excluded"][0]["reason"]["kind"], "node_failed");

    // The same exception on the second backend too: the workflow's fault, no third try.
    app.sims[1]
        .set_faults(&["error:class=ImageInvert"])
        .unwrap();
    let id = app
        .submit_ok(&json!({"workflow": workflow(2), "max_attempts": 3}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    let backends: Vec<&str> = job["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["backend"].as_str().unwrap())
        .collect();
    assert_eq!(backends, ["a", "b"]);
    assert_eq!(job["error"]["code"], "node_error");
    app.shutdown().await;
}

/// A 200 that still carries node_errors means ComfyUI would run only the valid outputs
/// (PROTOCOL.md pitfall 11): gantry counts it as a rejection, fails the job at once with
/// the backend's node_errors, and takes the partial prompt back off the backend.
#[tokio::test]
async fn a_partly_valid_workflow_is_a_rejection_not_a_partial_run() {
    let app = spawn_app(1, |_| {}).await;
    // A valid output branch, and a second one whose GantrySleep has steps below the minimum.
    let mut workflow = fixture("comfyui/workflows/a_normal.json");
    let bad = fixture("comfyui/workflows/f_value_below_min.json");
    workflow["12"] = bad["2"].clone();
    workflow["12"]["inputs"]["image"] = json!(["1", 0]);
    workflow["13"] = json!({"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "bad"}});
    let id = app.submit_ok(&json!({"workflow": workflow})).await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "{job:#}");
    assert_eq!(job["error"]["code"], "rejected", "{job:#}");
    let node_errors = job["error"]["details"]["node_errors"].as_object().unwrap();
    assert!(!node_errors.is_empty(), "{job:#}");
    assert!(job["outputs"].as_array().unwrap().is_empty());
    let prompt_id = job["attempts"][0]["prompt_id"].as_str().unwrap().to_owned();
    // The valid half was dequeued or interrupted: once the backend's queue is empty, its
    // history does not show it succeeded.
    crate::support::poll_until(
        "the backend's queue to empty",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let q = app.sim_json(0, "/queue").await;
            let empty = q["queue_running"].as_array().is_some_and(|a| a.is_empty())
                && q["queue_pending"].as_array().is_some_and(|a| a.is_empty());
            if empty {
                Ok(())
            } else {
                Err(q)
            }
        },
    )
    .await;
    let history = app.sim_json(0, &format!("/history/{prompt_id}")).await;
    let ran_ok = history[&prompt_id]["status"]["status_str"] == "success";
    assert!(!ran_ok, "the partial prompt ran to success: {history:#}");
    // Straight to ComfyUI's rules, this is a 200 with node_errors: a partial run.
    let direct = app
        .http
        .post(format!("{}/prompt", app.sims[0].url()))
        .json(&json!({ "prompt": workflow, "prompt_id": "probe" }))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 200);
    let direct: Value = direct.json().await.unwrap();
    assert!(direct["node_errors"]["12"].is_object(), "{direct:#}");
    app.shutdown().await;
}

/// More jobs waiting ahead than any scan would reach (they need a backend that is down)
/// must not keep a runnable job of the same priority from an idle backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runnable_job_is_not_starved_by_thousands_waiting_ahead_of_it() {
    use gantry_core::{JobSpec, Workflow};
    use gantry_server::{BackendConfig, Config, Server};
    let sim = gantry_sim::spawn(sim_config()).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), data.path().join("d"));
    config.backends = vec![
        BackendConfig::parse(&format!("a={}", sim.url())).unwrap(),
        // Nothing listens there: jobs for it wait (their classes are not known to fail).
        BackendConfig::parse("parked=http://127.0.0.1:9").unwrap(),
    ];
    config.backends[1].tags = vec!["parked".into()];
    let server = Server::start(config).await.unwrap();
    let engine = server.engine.clone();
    let workflow = Workflow::parse(&tiny_workflow("parked")).unwrap();
    let spec = |tags: Vec<String>| JobSpec {
        workflow: workflow.clone(),
        priority: 0,
        max_attempts: 3,
        tags,
        timeouts: Timeouts::default(),
        idempotency_key: None,
        metadata: Default::default(),
        owner: None,
        attachments: Vec::new(),
        callback: None,
        command: None,
    };
    let parked = 6000;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..parked {
        let (engine, spec) = (engine.clone(), spec(vec!["parked".into()]));
        tasks.spawn(async move { engine.submit(spec, "h").await.unwrap() });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert_eq!(engine.queue_len(), parked);
    let runnable = match engine.submit(spec(vec![]), "h").await.unwrap() {
        gantry_store::Created::New(e) => e.job_id,
        other => panic!("{other:?}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = engine.store().job(&runnable).await.unwrap().unwrap();
        if job.state.is_terminal() {
            assert_eq!(job.state, gantry_core::JobState::Succeeded, "{job:?}");
            break;
        }
        assert!(Instant::now() < deadline, "starved: {job:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(engine.queue_len(), parked, "the parked jobs still wait");
    server.shutdown().await;
}

/// An in-process backend knows a prompt's submission, start and success at once: they
/// are applied in order and committed as one write (`Engine::apply_steps`), and the job's
/// history still tells each change apart, each with the state it left the job in.
#[tokio::test]
async fn changes_known_at_once_commit_together_and_each_keeps_its_own_state() {
    let data = tempfile::tempdir().unwrap();
    let mut config =
        gantry_server::Config::new("127.0.0.1:0".parse().unwrap(), data.path().join("data"));
    config.backends = vec![gantry_server::BackendConfig::instant(
        "i0",
        vec!["EmptyImage".into(), "SaveImage".into()],
    )];
    let server = gantry_server::Server::start(config).await.unwrap();
    let app = crate::support::TestApp::attach(server);
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(
            app.submit_ok(&json!({"workflow": tiny_workflow(&format!("at-once-{n}"))}))
                .await,
        );
    }
    for id in &ids {
        let job = app.wait_terminal(id).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        let events = app.read_sse(id).await;
        assert_eq!(names(&events), PERSISTED_SUCCESS, "{events:#?}");
        let states: Vec<&str> = events
            .iter()
            .map(|e| e.data["state"].as_str().unwrap())
            .collect();
        assert_eq!(
            states,
            ["queued", "running", "running", "running", "succeeded"],
            "{events:#?}"
        );
        // The last three: one commit, numbered in a row, at one moment.
        let seqs: Vec<i64> = events
            .iter()
            .map(|e| e.data["seq"].as_i64().unwrap())
            .collect();
        assert_eq!(
            (seqs[3] - seqs[2], seqs[4] - seqs[3]),
            (1, 1),
            "{events:#?}"
        );
        assert_eq!(events[2].data["at"], events[4].data["at"], "{events:#?}");
        assert_eq!(job["attempts"][0]["status"], "succeeded", "{job:#}");
        // Three row writes: created, dispatched, and the three changes together.
        let stored = app
            .server
            .engine
            .store()
            .job(&gantry_core::JobId::parse(id).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.version, 3, "{job:#}");
    }
    app.server.shutdown().await;
}
