//! A backend that crashes is the backend's failure, not the workflow's (issue 24): the job
//! is retried as soon as a backend is ready (the same one once it answers again), no
//! workflow block is recorded, and while it waits the job and its events say what for.

use crate::support::{ms_of, poll_until, sleep_workflow, spawn_app, tiny_workflow, TestApp};
use gantry_server::clock::now_ms as wall_ms;
use serde_json::{json, Value};
use std::time::Duration;

fn backends_of(job: &Value) -> Vec<&str> {
    job["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["backend"].as_str().unwrap())
        .collect()
}

async fn backend_json(app: &TestApp, name: &str) -> Value {
    let body = app.get_json("/v1/backends").await;
    body["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap()
}

/// Waits until the job is queued and says it waits for `reason`.
async fn wait_waiting(app: &TestApp, id: &str, reason: &str) -> Value {
    app.wait_job(
        id,
        &format!("job {id} waiting for {reason}"),
        Duration::from_secs(20),
        |j| j["state"] == "queued" && j["waiting_for"]["reason"] == reason,
    )
    .await
}

/// The case: ComfyUI killed mid-run and back on its port at once. The prompt has
/// vanished with the process; the job runs again on the same (only) backend as soon as
/// it answers, within its own run time and a second of the restart, and nothing blocks
/// its workflow there.
#[tokio::test]
async fn a_backend_killed_mid_job_and_back_at_once_runs_it_again_without_a_block() {
    let app = spawn_app(1, |c| {
        c.liveness = Duration::from_millis(500);
    })
    .await;
    // 40 simulated seconds: 2 s of real time.
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(40.0, 40, 24)}))
        .await;
    app.wait_job(&id, "executing", Duration::from_secs(10), |j| {
        j["phase"] == "executing"
    })
    .await;
    app.sims[0].crash().await;
    app.sims[0].restart().await.unwrap();
    let restarted = wall_ms();

    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(backends_of(&job), ["a", "a"], "{job:#}");
    let error = &job["attempts"][0]["error"];
    assert_eq!(error["code"], "backend_lost", "{job:#}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("restarted or crashed"),
        "{error:#}"
    );
    // Within the restart, plus the job's own time (as the backend ran it), plus 1 s.
    let second = &job["attempts"][1];
    let own = ms_of(&second["finished_at"]) - ms_of(&second["started_at"]);
    let done = ms_of(&second["finished_at"]);
    assert!(
        done - restarted <= own + 1_000,
        "succeeded {} ms after the restart, its own run took {own} ms: {job:#}",
        done - restarted
    );

    // No workflow block: not on the backend, not on the job's stream; the retry did not
    // pretend to a backoff.
    assert_eq!(backend_json(&app, "a").await["blocks"], json!([]));
    let events = app.read_sse(&id).await;
    assert!(
        !events.iter().any(|e| e.event == "backend_blocked"),
        "{events:?}"
    );
    let retry = events.iter().find(|e| e.event == "job_retrying").unwrap();
    assert_eq!(retry.data["delay_ms"], 0, "{:?}", retry.data);
    let failed = events.iter().find(|e| e.event == "attempt_failed").unwrap();
    assert_eq!(failed.data["will_retry"], true);

    // Another job of the same shape runs there straight away too.
    let again = app
        .submit_ok(&json!({"workflow": sleep_workflow(1.0, 1, 25)}))
        .await;
    let job = app.wait_terminal(&again).await;
    assert_eq!(
        (job["state"].as_str(), backends_of(&job)),
        (Some("succeeded"), vec!["a"])
    );
    app.shutdown().await;
}

/// The only backend crashes and stays down: the attempt is the backend's failure, and
/// the job says it waits for the backend to come back (no made-up short delay), then runs
/// there once it does.
#[tokio::test]
async fn a_job_whose_only_backend_is_down_says_it_waits_for_it_to_come_back() {
    let app = spawn_app(1, |c| {
        c.liveness = Duration::from_millis(200);
    })
    .await;
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(200.0, 200, 26)}))
        .await;
    app.wait_job(&id, "executing", Duration::from_secs(10), |j| {
        j["phase"] == "executing"
    })
    .await;
    app.sims[0].crash().await;

    let job = wait_waiting(&app, &id, "backend_offline").await;
    let w = &job["waiting_for"];
    assert!(w.get("until").is_none(), "no known end: {w:#}");
    assert!(
        w["backends"]["a"].as_str().unwrap().starts_with("offline"),
        "{w:#}"
    );
    assert!(
        w["message"].as_str().unwrap().contains("come back"),
        "{w:#}"
    );
    let error = &job["attempts"][0]["error"];
    assert_eq!(error["code"], "backend_unreachable", "{job:#}");

    app.sims[0].restart().await.unwrap();
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(backends_of(&job), ["a", "a"]);
    let events = app.read_sse(&id).await;
    let retry = events.iter().find(|e| e.event == "job_retrying").unwrap();
    assert_eq!(retry.data["delay_ms"], 0, "{:?}", retry.data);
    assert_eq!(
        retry.data["waiting_for"]["reason"], "backend_offline",
        "{:?}",
        retry.data
    );
    assert!(!events.iter().any(|e| e.event == "backend_blocked"));
    app.shutdown().await;
}

/// A hang is the workflow's own trouble on that backend: it is blocked there, and with no
/// other backend the retry says it waits for the block, until when, on its view and in
/// its `job_retrying` event (whose `not_before` is the block's end, not the backoff's).
#[tokio::test]
async fn a_job_held_by_a_block_says_so_and_until_when() {
    let app = spawn_app(1, |c| {
        c.timeouts.start_ms = Some(200);
        c.backoff_base = Duration::from_millis(10);
        c.health.block_ms = 60_000;
        c.health.circuit_threshold = 0;
    })
    .await;
    app.sims[0].set_faults(&["hang-before-start"]).unwrap();
    let id = app
        .submit_ok(&json!({"workflow": tiny_workflow("held")}))
        .await;
    let job = wait_waiting(&app, &id, "blocked").await;
    let blocks = backend_json(&app, "a").await["blocks"].clone();
    let until = blocks[0]["until"].clone();
    assert_eq!(job["waiting_for"]["until"], until, "{job:#} {blocks:#}");
    assert!(
        job["waiting_for"]["backends"]["a"]
            .as_str()
            .unwrap()
            .starts_with("blocked for this workflow until"),
        "{job:#}"
    );
    // The operator lifts the block (the fault is gone): it runs at once.
    app.sims[0].set_faults(&[]).unwrap();
    let hash = job["workflow_hash"].as_str().unwrap();
    let r = app
        .http
        .delete(format!("{}/v1/backends/a/blocks/{hash}", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let events = app.read_sse(&id).await;
    let retry = events.iter().find(|e| e.event == "job_retrying").unwrap();
    let blocked = events
        .iter()
        .find(|e| e.event == "backend_blocked")
        .unwrap();
    assert_eq!(
        retry.data["not_before"], blocked.data["until"],
        "{events:?}"
    );
    assert_eq!(retry.data["waiting_for"]["reason"], "blocked");
    let at = |name: &str| events.iter().position(|e| e.event == name).unwrap();
    assert!(at("attempt_failed") < at("job_retrying"));
    assert!(at("job_retrying") < at("backend_blocked"));
    app.shutdown().await;
}

/// An open circuit breaker holds the job until its probe.
#[tokio::test]
async fn a_waiting_job_names_an_open_breaker() {
    let app = spawn_app(1, |c| {
        c.timeouts.start_ms = Some(200);
        c.backoff_base = Duration::from_millis(10);
        c.health.block_ms = 0;
        c.health.circuit_threshold = 1;
        c.health.circuit_ms = 60_000;
    })
    .await;
    app.sims[0].set_faults(&["hang-before-start"]).unwrap();
    let id = app
        .submit_ok(&json!({"workflow": tiny_workflow("breaker")}))
        .await;
    let job = wait_waiting(&app, &id, "circuit_open").await;
    let circuit = backend_json(&app, "a").await["circuit"].clone();
    assert_eq!(
        job["waiting_for"]["until"], circuit["probe_at"],
        "{circuit:#}"
    );
    app.shutdown().await;
}

/// A busy farm, and a retry's backoff with the backend free again.
#[tokio::test]
async fn a_waiting_job_names_a_busy_farm_and_its_backoff() {
    let app = spawn_app(1, |c| {
        c.pipeline = false;
        c.timeouts.start_ms = Some(200);
        c.backoff_base = Duration::from_secs(60);
        c.backoff_max = Duration::from_secs(60);
        c.health.block_ms = 0;
        c.health.circuit_threshold = 0;
    })
    .await;
    // Busy: the only backend runs a long job.
    let long = app
        .submit_ok(&json!({"workflow": sleep_workflow(400.0, 400, 27)}))
        .await;
    app.wait_job(&long, "executing", Duration::from_secs(10), |j| {
        j["phase"] == "executing"
    })
    .await;
    let behind = app
        .submit_ok(&json!({"workflow": tiny_workflow("behind")}))
        .await;
    let job = wait_waiting(&app, &behind, "busy").await;
    assert_eq!(job["waiting_for"]["backends"]["a"], "busy", "{job:#}");
    app.cancel(&long).await;
    app.cancel(&behind).await;
    app.wait_backends_idle().await;

    // Backoff: the attempt failed (a hang, blocking nothing here) and the backend is
    // free again, but the retry's backoff has not ended.
    app.sims[0].set_faults(&["hang-before-start"]).unwrap();
    let id = app
        .submit_ok(&json!({"workflow": tiny_workflow("backoff")}))
        .await;
    let job = wait_waiting(&app, &id, "backoff").await;
    let until = ms_of(&job["waiting_for"]["until"]);
    let failed_at = ms_of(&job["attempts"][0]["finished_at"]);
    assert!(
        (30_000..=60_000).contains(&(until - failed_at)),
        "the jittered backoff of 60 s: {job:#}"
    );
    app.shutdown().await;
}

/// With no backend known, a job with tags waits and says which tags it needs.
#[tokio::test]
async fn a_job_with_no_backend_for_its_tags_says_so() {
    let app = spawn_app(0, |_| {}).await;
    let id = app
        .submit_ok(&json!({"workflow": tiny_workflow("tagged"), "tags": ["sdxl"]}))
        .await;
    let job = wait_waiting(&app, &id, "no_backend").await;
    assert_eq!(
        job["waiting_for"]["message"], "no backend with tag sdxl is known",
        "{job:#}"
    );
    // The list says the same.
    let listed = app.all_jobs().await;
    assert_eq!(listed[0]["waiting_for"]["reason"], "no_backend");
    app.shutdown().await;
}

/// The scheduler's stale read of a backend does not make a job that waits look ready:
/// with a backend that never connects, the job waits for it.
#[tokio::test]
async fn a_job_waits_for_a_backend_that_has_not_connected_yet() {
    let app = spawn_app(1, |_| {}).await;
    app.sims[0].crash().await;
    poll_until(
        "a offline",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let a = backend_json(&app, "a").await;
            if a["status"] != "idle" {
                Ok(())
            } else {
                Err(a)
            }
        },
    )
    .await;
    let id = app
        .submit_ok(&json!({"workflow": tiny_workflow("unconnected")}))
        .await;
    wait_waiting(&app, &id, "backend_offline").await;
    app.sims[0].restart().await.unwrap();
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    app.shutdown().await;
}
