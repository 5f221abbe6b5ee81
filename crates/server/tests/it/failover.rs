//! Failover against simulated backends that misbehave: a node that ignores the
//! interrupt (the backend is held and marked stuck), the circuit breaker, blocks that
//! make a job wait rather than fail, interrupts gantry did not send, and sockets that
//! drop, go silent or lose the prompt.

use crate::support::{backend_events, ms_of, poll_until, sleep_workflow, spawn_app, tiny_workflow};
use serde_json::{json, Value};
use std::time::Duration;

fn backends_of(job: &Value) -> Vec<String> {
    job["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["backend"].as_str().unwrap().to_owned())
        .collect()
}

async fn backend_json(app: &crate::support::TestApp, name: &str) -> Value {
    let body = app.get_json("/v1/backends").await;
    body["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap()
}

/// PROTOCOL.md capture d3: a node blocked in one call ignores POST /interrupt. gantry
/// fails the attempt over at once, but sends the backend nothing new while /queue still
/// shows the prompt, marks it `stuck` after the grace, and takes it back when the prompt
/// is finally gone.
#[tokio::test]
async fn a_node_that_ignores_the_interrupt_holds_its_backend_stuck_until_it_is_gone() {
    let app = spawn_app(2, |c| {
        c.backends[0].priority = 10;
        c.timeouts.node_stall_ms = Some(300);
        c.cancel_grace = Duration::from_millis(400);
        c.backoff_base = Duration::from_millis(10);
    })
    .await;
    // Simulated 100 s: 5 s of real time before the blocked call returns.
    app.sims[0]
        .set_faults(&["stall:at=50,uninterruptible,resume_ms=100000"])
        .unwrap();
    let mut health = backend_events(&app);
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(2.0, 10, 3)}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(backends_of(&job), ["a", "b"]);

    let stuck = health
        .wait_for("a", "backend_stuck", Duration::from_secs(10))
        .await;
    assert_eq!(stuck["prompt_id"], job["attempts"][0]["prompt_id"]);
    let a = backend_json(&app, "a").await;
    let recovered_yet = health
        .seen
        .iter()
        .any(|(_, e)| e["type"] == "backend_recovered");
    if !recovered_yet {
        assert_eq!(a["status"], "stuck", "{a:#}");
        assert_eq!(a["stuck"]["prompt_id"], stuck["prompt_id"]);
        // Another workflow would prefer a, but a takes nothing while stuck.
        let id2 = app
            .submit_ok(&json!({"workflow": tiny_workflow("while-stuck")}))
            .await;
        let job2 = app.wait_terminal(&id2).await;
        let recovered = health
            .seen
            .iter()
            .any(|(_, e)| e["type"] == "backend_recovered");
        if !recovered {
            assert_eq!(backends_of(&job2), ["b"], "{job2:#}");
        }
    }
    // The blocked call returns, the interrupt lands, the prompt leaves the queue.
    health
        .wait_for("a", "backend_recovered", Duration::from_secs(20))
        .await;
    let id3 = app
        .submit_ok(&json!({"workflow": tiny_workflow("after")}))
        .await;
    let job3 = app.wait_terminal(&id3).await;
    assert_eq!(backends_of(&job3), ["a"], "a is preferred again: {job3:#}");
    app.shutdown().await;
}

fn invert_workflow() -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 1}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}}
    })
}

/// A backend that fails every workflow (out of memory here) has its circuit opened after
/// the threshold: it gets no new work until a probe of /system_stats finds it healthy.
#[tokio::test]
async fn repeated_faults_open_the_circuit_and_a_healthy_probe_closes_it() {
    let app = spawn_app(2, |c| {
        c.backends[0].priority = 10;
        c.backoff_base = Duration::from_millis(10);
        c.health.circuit_threshold = 2;
        c.health.circuit_ms = 1_500;
    })
    .await;
    app.sims[0].set_faults(&["oom"]).unwrap();
    let mut health = backend_events(&app);
    for workflow in [tiny_workflow("one"), sleep_workflow(0.2, 2, 1)] {
        let id = app.submit_ok(&json!({"workflow": workflow})).await;
        let job = app.wait_terminal(&id).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert_eq!(backends_of(&job), ["a", "b"], "{job:#}");
        assert!(job["attempts"][0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("OutOfMemory"));
    }
    let open = health
        .wait_for("a", "backend_circuit_open", Duration::from_secs(5))
        .await;
    assert_eq!(open["faults"], 2);
    let probe_at = open["probe_at"].as_i64().unwrap();
    // A third workflow goes to b while the circuit is open.
    let id = app.submit_ok(&json!({"workflow": invert_workflow()})).await;
    let job = app.wait_terminal(&id).await;
    let a = backend_json(&app, "a").await;
    if ms_of(&job["attempts"][0]["created_at"]) < probe_at {
        assert_eq!(backends_of(&job), ["b"], "{job:#}");
    }
    if gantry_server::engine::now_ms() < probe_at - 100 {
        assert_eq!(
            (a["status"].as_str(), a["circuit"]["state"].as_str()),
            (Some("unhealthy"), Some("open")),
            "{a:#}"
        );
    }
    app.sims[0].set_faults(&[]).unwrap();
    let closed = health
        .wait_for("a", "backend_circuit_closed", Duration::from_secs(10))
        .await;
    assert!(closed["at"].as_i64().unwrap() >= probe_at);
    poll_until(
        "a idle again",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            let a = backend_json(&app, "a").await;
            // Free again; the fault's block on that workflow may still stand (`blocked`).
            if matches!(a["status"].as_str(), Some("idle" | "blocked"))
                && a["circuit"]["state"] == "closed"
            {
                Ok(())
            } else {
                Err(a)
            }
        },
    )
    .await;
    app.shutdown().await;
}

/// With one backend, blocked for the workflow after a hang, the retry waits (queued, not
/// failed) until the block lifts, then runs there.
#[tokio::test]
async fn a_job_waits_for_a_block_to_lift_when_no_other_backend_can_run_it() {
    let app = spawn_app(1, |c| {
        c.timeouts.start_ms = Some(300);
        c.backoff_base = Duration::from_millis(10);
        c.health.block_ms = 1_000;
    })
    .await;
    app.sims[0].set_faults(&["hang-before-start"]).unwrap();
    let mut health = backend_events(&app);
    let id = app
        .submit_ok(&json!({"workflow": tiny_workflow("wait")}))
        .await;
    let blocked = health
        .wait_for("a", "backend_blocked", Duration::from_secs(10))
        .await;
    // The server is restarted by its operator (here: the fault is lifted).
    app.sims[0].set_faults(&[]).unwrap();
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(backends_of(&job), ["a", "a"]);
    assert!(
        ms_of(&job["attempts"][1]["created_at"]) >= blocked["until"].as_i64().unwrap(),
        "the retry waited for the block to lift: {job:#} {blocked:#}"
    );
    app.shutdown().await;
}

/// An interrupt gantry did not send (someone pressed Cancel in ComfyUI's own page) is the
/// backend's fault: the job retries elsewhere.
#[tokio::test]
async fn an_interrupt_gantry_did_not_send_is_retried_elsewhere() {
    let app = spawn_app(2, |c| {
        c.backends[0].priority = 10;
        c.backoff_base = Duration::from_millis(10);
    })
    .await;
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(100.0, 100, 9)}))
        .await;
    app.wait_job(&id, "running on a", Duration::from_secs(10), |j| {
        j["phase"] == "executing"
    })
    .await;
    let r = app
        .http
        .post(format!("{}/interrupt", app.sims[0].url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(backends_of(&job), ["a", "b"]);
    assert_eq!(job["attempts"][0]["error"]["code"], "interrupted");
    app.shutdown().await;
}

/// A WebSocket that drops mid-run is reconnected (with a fresh clientId) and the prompt
/// followed to its end through /history: no retry, no lost result.
#[tokio::test]
async fn a_dropped_websocket_is_reconnected_and_the_prompt_followed_to_its_end() {
    let app = spawn_app(1, |c| {
        c.liveness = Duration::from_millis(300);
    })
    .await;
    app.sims[0].set_faults(&["ws-drop:after_ms=4000"]).unwrap();
    // 1 s of real time; the socket drops after 200 ms.
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(20.0, 10, 4)}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(backends_of(&job), ["a"], "{job:#}");
    assert_eq!(job["outputs"].as_array().unwrap().len(), 1);
    app.shutdown().await;
}

/// A socket that stays open but says nothing (events stop while prompts still complete)
/// does not hang the job: the liveness poll asks /history.
#[tokio::test]
async fn a_silent_websocket_does_not_hang_the_job() {
    let app = spawn_app(1, |c| {
        c.liveness = Duration::from_millis(300);
    })
    .await;
    app.sims[0].set_faults(&["ws-silent"]).unwrap();
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(4.0, 4, 5)}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(backends_of(&job), ["a"], "{job:#}");
    app.shutdown().await;
}

/// A prompt whose end nobody saw and that is in neither /queue nor /history was lost: it
/// is retried, not waited on for ever.
#[tokio::test]
async fn a_prompt_in_neither_queue_nor_history_is_retried() {
    let app = spawn_app(2, |c| {
        c.backends[0].priority = 10;
        c.liveness = Duration::from_millis(300);
        c.backoff_base = Duration::from_millis(10);
    })
    .await;
    app.sims[0]
        .set_faults(&["ws-silent", "lose-history"])
        .unwrap();
    let id = app
        .submit_ok(&json!({"workflow": tiny_workflow("lost")}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(backends_of(&job), ["a", "b"]);
    assert_eq!(job["attempts"][0]["error"]["code"], "prompt_lost");
    app.shutdown().await;
}

/// A backend that crashes mid-run and comes back empty: the attempt is found lost (or the
/// backend unreachable), the job succeeds elsewhere, and the backend rejoins.
#[tokio::test]
async fn a_backend_that_crashes_and_restarts_mid_run() {
    let app = spawn_app(2, |c| {
        c.backends[0].priority = 10;
        c.liveness = Duration::from_millis(300);
        c.backoff_base = Duration::from_millis(10);
    })
    .await;
    // Dies during its first run and restarts 25 simulated seconds (1.25 s) later.
    app.sims[0]
        .set_faults(&["crash:after_jobs=0,restart_ms=25000"])
        .unwrap();
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(10.0, 10, 6)}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(backends_of(&job)[0], "a");
    let code = job["attempts"][0]["error"]["code"].as_str().unwrap();
    assert!(
        ["backend_lost", "backend_unreachable"].contains(&code),
        "{job:#}"
    );
    poll_until(
        "a back",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async {
            let a = backend_json(&app, "a").await;
            if matches!(a["status"].as_str(), Some("idle" | "blocked")) {
                Ok(())
            } else {
                Err(a)
            }
        },
    )
    .await;
    app.shutdown().await;
}
