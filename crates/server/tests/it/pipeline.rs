//! Pipelining: the next job waits on the backend itself, behind the running one, so the
//! GPU starts it the moment the first ends; and it is taken back when gantry stops the
//! prompt ahead of it, or cancelled without ever running.

use crate::support::{poll_until, sleep_workflow, spawn_app};
use serde_json::{json, Value};
use std::time::Duration;

/// (running prompt ids, pending prompt ids) on simulator `sim`.
async fn sim_queue(app: &crate::support::TestApp, sim: usize) -> (Vec<String>, Vec<String>) {
    let q = app.sim_json(sim, "/queue").await;
    let ids = |key: &str| -> Vec<String> {
        q[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item[1].as_str().unwrap().to_owned())
            .collect()
    };
    (ids("queue_running"), ids("queue_pending"))
}

fn prompt_of(job: &Value) -> String {
    job["attempts"].as_array().unwrap().last().unwrap()["prompt_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn the_next_job_waits_on_the_backend_behind_the_running_one() {
    let app = spawn_app(1, |_| {}).await;
    // 40 simulated seconds = 2 s of real time: long enough to look at the queue.
    let first = app
        .submit_ok(&json!({"workflow": sleep_workflow(40.0, 40, 1)}))
        .await;
    let second = app
        .submit_ok(&json!({"workflow": sleep_workflow(0.2, 2, 2)}))
        .await;
    let (running, pending) = poll_until(
        "the second prompt queued on the backend behind the first",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || async {
            let q = sim_queue(&app, 0).await;
            if q.0.len() == 1 && q.1.len() == 1 {
                Ok(q)
            } else {
                Err(q)
            }
        },
    )
    .await;
    // The backend may show the prompt queued a moment before gantry commits its
    // acceptance: wait for that commit, not for a guess at how long it takes.
    let b = app
        .wait_job(
            &second,
            "the second job pending",
            Duration::from_secs(10),
            |j| j["phase"] == "pending",
        )
        .await;
    let a = app.get_job(&first).await;
    assert_eq!(running, vec![prompt_of(&a)]);
    assert_eq!(pending, vec![prompt_of(&b)]);
    assert_eq!(b["state"], "running");
    let backends = app.get_json("/v1/backends").await;
    assert_eq!(backends["backends"][0]["next_job"], json!(second));
    for id in [&first, &second] {
        assert_eq!(app.wait_terminal(id).await["state"], "succeeded");
    }
    // Each ran once, the second straight after the first.
    let runs = app.sim_json(0, "/sim/runs").await;
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{runs:#?}");
    assert_eq!(
        runs[1]["prompt_id"],
        json!(prompt_of(&app.get_job(&second).await))
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_pipelined_job_cancelled_never_runs() {
    let app = spawn_app(1, |_| {}).await;
    let first = app
        .submit_ok(&json!({"workflow": sleep_workflow(40.0, 40, 3)}))
        .await;
    let second = app
        .submit_ok(&json!({"workflow": sleep_workflow(0.2, 2, 4)}))
        .await;
    poll_until(
        "the second prompt queued on the backend",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || async {
            let q = sim_queue(&app, 0).await;
            if q.1.len() == 1 {
                Ok(())
            } else {
                Err(q)
            }
        },
    )
    .await;
    let pid = prompt_of(&app.get_job(&second).await);
    let (status, _) = app.cancel(&second).await;
    assert_eq!(status, 202);
    assert_eq!(app.wait_terminal(&second).await["state"], "cancelled");
    let (_, pending) = sim_queue(&app, 0).await;
    assert!(pending.is_empty(), "dequeued from the backend: {pending:?}");
    assert_eq!(app.wait_terminal(&first).await["state"], "succeeded");
    let runs = app.sim_json(0, "/sim/runs").await;
    assert!(
        !runs["runs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["prompt_id"] == json!(pid)),
        "the cancelled prompt never ran: {runs:#}"
    );
    app.shutdown().await;
}

async fn set_faults(app: &crate::support::TestApp, sim: usize, faults: &[&str]) {
    let status = app
        .http
        .post(format!("{}/sim/faults", app.sims[sim].url()))
        .json(&faults)
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success());
}

#[tokio::test]
async fn a_job_behind_a_stalled_prompt_is_taken_back_and_retried() {
    let app = spawn_app(1, |c| {
        c.timeouts.node_stall_ms = Some(400);
        c.backoff_base = Duration::from_millis(20);
        c.backoff_max = Duration::from_millis(40);
        c.health.block_ms = 300;
    })
    .await;
    set_faults(&app, 0, &["stall:at=30"]).await;
    let stalled = app
        .submit_ok(&json!({"workflow": sleep_workflow(40.0, 40, 5)}))
        .await;
    app.wait_job(&stalled, "executing", Duration::from_secs(10), |j| {
        j["phase"] == "executing"
    })
    .await;
    // The fault struck this run only; the one queued behind it runs normally.
    set_faults(&app, 0, &[]).await;
    let behind = app
        .submit_ok(&json!({"workflow": sleep_workflow(0.2, 2, 6)}))
        .await;
    app.wait_job(&behind, "pipelined", Duration::from_secs(10), |j| {
        j["phase"] == "pending"
    })
    .await;
    let job = app.wait_terminal(&behind).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{job:#}");
    assert_eq!(attempts[0]["error"]["code"], "displaced", "{job:#}");
    let job = app.wait_terminal(&stalled).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["attempts"][0]["error"]["code"], "timeout", "{job:#}");
    app.shutdown().await;
}
