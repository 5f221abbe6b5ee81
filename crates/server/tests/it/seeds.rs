//! The reports in ../shared/seeds/ that gantry was created from, each reproduced against
//! simulated backends and shown to end well: seed 000 (a server that accepts a prompt and
//! never starts it; a node that hangs) and seed 001 (a node stalled at N% while
//! heartbeats keep coming).

use crate::support::{
    backend_events, ms_of, names, poll_until, sleep_workflow, spawn_app, tiny_workflow, TestApp,
};
use gantry_server::bus::{BusEvent, LiveKind};
use serde_json::{json, Value};
use std::time::Duration;

/// Seed 000, "Execution Start Timeout": the server accepts the prompt, then never starts
/// it. The attempt fails after the start limit with a message naming phase, limit and
/// backend; the prompt is taken off the hung server; the job succeeds on another one; and
/// the hung server is blocked for that workflow until the block lifts by itself.
#[tokio::test]
async fn seed_000_a_server_that_accepts_a_prompt_and_never_starts_it() {
    let app = spawn_app(2, |c| {
        c.backends[0].priority = 10;
        c.timeouts.start_ms = Some(300);
        c.backoff_base = Duration::from_millis(10);
        c.health.block_ms = 3_000;
    })
    .await;
    app.sims[0].set_faults(&["hang-before-start"]).unwrap();
    let mut health = backend_events(&app);

    let id = app
        .submit_ok(&json!({"workflow": tiny_workflow("seed0")}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{job:#}");
    let first = &attempts[0];
    assert_eq!(first["backend"], "a");
    assert_eq!(first["error"]["code"], "timeout");
    assert_eq!(
        first["error"]["message"],
        "Execution failed to start within 300 ms on a: server may be stuck"
    );
    assert_eq!(first["error"]["details"]["phase"], "start");
    assert_eq!(first["error"]["details"]["limit_ms"], 300);
    // The limit counts from the acceptance; `submitted_at` is stamped when that is
    // committed, a moment later (more on a loaded machine), so allow for the commit.
    assert!(
        ms_of(&first["finished_at"]) - ms_of(&first["submitted_at"]) >= 250,
        "not before its limit: {first:#}"
    );
    assert!(
        ms_of(&first["finished_at"]) - ms_of(&first["created_at"]) >= 300,
        "not before its limit: {first:#}"
    );
    assert_eq!(
        (
            attempts[1]["backend"].as_str(),
            attempts[1]["status"].as_str()
        ),
        (Some("b"), Some("succeeded"))
    );

    // The job's own stream tells it: failed (will retry), blocked, retrying.
    let events = app.read_sse(&id).await;
    let story = names(&events);
    let at = |name: &str| story.iter().position(|n| *n == name);
    let (failed, blocked, retrying) = (
        at("attempt_failed").unwrap(),
        at("backend_blocked").unwrap(),
        at("job_retrying").unwrap(),
    );
    // The failure and the retry are one transition; the block it caused follows.
    assert!(failed < retrying && failed < blocked, "{story:?}");
    assert_eq!(events[failed].data["will_retry"], true);
    assert_eq!(events[blocked].data["backend"], "a");
    assert_eq!(events[blocked].data["workflow_hash"], job["workflow_hash"]);
    assert!(events[retrying].data["delay_ms"].as_u64().is_some());

    // Nothing of ours is left queued on the hung server: the failure is committed
    // first (the permission to act), then the prompt is dequeued.
    poll_until(
        "the hung server's queue emptied",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let queue = app.sim_json(0, "/queue").await;
            if queue["queue_pending"] == json!([]) {
                Ok(())
            } else {
                Err(queue)
            }
        },
    )
    .await;

    // While blocked, the same workflow goes straight to the healthy server, even though
    // the hung one is preferred.
    let blocked_event = health
        .wait_for("a", "backend_blocked", Duration::from_secs(5))
        .await;
    let id2 = app
        .submit_ok(&json!({"workflow": tiny_workflow("seed0-again")}))
        .await;
    let job2 = app.wait_terminal(&id2).await;
    let backends: Vec<&str> = job2["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["backend"].as_str().unwrap())
        .collect();
    if ms_of(&job2["attempts"][0]["created_at"]) < blocked_event["until"].as_i64().unwrap() {
        assert_eq!(backends, ["b"], "{job2:#}");
    }
    // The block lifts by itself.
    health
        .wait_for("a", "backend_unblocked", Duration::from_secs(10))
        .await;
    app.shutdown().await;
}

/// Seed 000, "Node Execution Timeout", with its "future enhancement" (a limit per node
/// type) built in: the stalled node is named with its class and last step, and its class
/// limit applies although the global one is far longer.
#[tokio::test]
async fn seed_000_a_node_that_hangs_is_named_and_timed_by_its_class_limit() {
    let app = spawn_app(2, |c| {
        c.backends[0].priority = 10;
        c.timeouts.node_stall_ms = Some(60_000);
        c.timeouts.first_progress_ms = Some(60_000);
        c.node_class = std::sync::Arc::new(
            [(
                "GantrySleep".to_owned(),
                gantry_core::watchdog::ClassTimeouts {
                    first_progress_ms: Some(2_000),
                    node_stall_ms: Some(400),
                },
            )]
            .into(),
        );
        c.backoff_base = Duration::from_millis(10);
    })
    .await;
    app.sims[0].set_faults(&["stall:at=50"]).unwrap();
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(2.0, 10, 1)}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let first = &job["attempts"][0];
    assert_eq!(
        first["error"]["message"],
        "Node 2 (GantrySleep) made no progress for 400 ms at step 5/10 on a",
        "{job:#}"
    );
    let details = &first["error"]["details"];
    assert_eq!(
        (
            details["phase"].as_str(),
            details["node"].as_str(),
            details["class_type"].as_str()
        ),
        (Some("node_stall"), Some("2"), Some("GantrySleep"))
    );
    assert_eq!(details["progress"], json!({"value": 5.0, "max": 10.0}));
    let lag = ms_of(&first["finished_at"]) - ms_of(&details["since"]);
    assert!(
        (400..=900).contains(&lag),
        "detected {lag} ms after the last progress"
    );
    assert_eq!(job["attempts"][1]["backend"], "b");
    app.shutdown().await;
}

/// Seed 000, "Disable Timeout (Not Recommended)": with the start timer at 0 a hung server
/// would hold the job for ever; the job's deadline is the backstop that still ends it,
/// and says so.
#[tokio::test]
async fn seed_000_a_disabled_start_timer_leaves_the_deadline_to_end_the_job() {
    let app = spawn_app(1, |c| {
        c.timeouts.start_ms = Some(300);
    })
    .await;
    app.sims[0].set_faults(&["hang-before-start"]).unwrap();
    let id = app
        .submit_ok(&json!({
            "workflow": tiny_workflow("nostart"),
            "timeouts": {"start_ms": 0, "deadline_ms": 1_000}
        }))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    assert_eq!(job["error"]["code"], "deadline", "{job:#}");
    assert_eq!(
        job["error"]["message"],
        "the job did not finish within its deadline of 1000 ms (attempt 1 was pending on a)"
    );
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1);
    assert!(ms_of(&job["updated_at"]) - ms_of(&job["created_at"]) >= 1_000);
    // The prompt was taken off the backend.
    crate::support::poll_until(
        "the hung prompt dequeued",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let q = app.sim_json(0, "/queue").await;
            if q["queue_pending"] == json!([]) {
                Ok(())
            } else {
                Err(q)
            }
        },
    )
    .await;
    app.shutdown().await;
}

/// Runs one stalled job on backend a (healthy b behind it) and answers the job, its first
/// attempt's error details, and how many times the stalled value was repeated to gantry
/// between the last real progress and the detection.
async fn stalled_job(pct: u32) -> (Value, Value, usize) {
    let app: TestApp = spawn_app(2, |c| {
        c.backends[0].priority = 10;
        c.timeouts.first_progress_ms = Some(800);
        c.timeouts.node_stall_ms = Some(800);
        c.backoff_base = Duration::from_millis(10);
    })
    .await;
    app.sims[0]
        .set_faults(&[&format!("stall:at={pct},chatty")])
        .unwrap();
    let mut bus = app.server.engine.bus().subscribe();
    // 100 steps of 10 ms: step N is N%.
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(20.0, 100, u64::from(pct))}))
        .await;
    let job = app.wait_terminal(&id).await;
    let first = job["attempts"][0].clone();
    let details = first["error"]["details"].clone();
    let mut repeats = 0;
    let mut last: Option<f64> = None;
    while let Ok(event) = bus.try_recv() {
        let BusEvent::Live(live) = event else {
            continue;
        };
        if live.job_id.as_str() != id || live.attempt != 1 {
            continue;
        }
        if let LiveKind::Progress { value, .. } = live.kind {
            if last == Some(value) {
                repeats += 1;
            }
            last = Some(value);
        }
    }
    app.shutdown().await;
    (job, details, repeats)
}

/// Seed 001's table, row by row: a node stalled at 0%, 1%, 25%, 50% or 99% while the same
/// progress value and status frames keep arriving ("heartbeats") is detected within its
/// limit (plus 500 ms) of its last real progress, and the job succeeds elsewhere. The
/// repeated frames counted here are each a moment at which a watchdog that reset on any
/// frame (the bug of seed 001) would have started counting again, and so never fired.
#[tokio::test]
async fn seed_001_a_stall_at_any_percentage_is_detected_while_heartbeats_continue() {
    for pct in [0, 1, 25, 50, 99] {
        let (job, details, repeats) = stalled_job(pct).await;
        assert_eq!(job["state"], "succeeded", "{pct}%: {job:#}");
        let first = &job["attempts"][0];
        assert_eq!(first["error"]["code"], "timeout", "{pct}%: {job:#}");
        let message = first["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("Node 2 (GantrySleep) made no progress for 800 ms"),
            "{pct}%: {message}"
        );
        if pct > 0 {
            assert_eq!(details["phase"], "node_stall", "{pct}%");
            assert!(
                message.ends_with(&format!("at step {pct}/100 on a")),
                "{message}"
            );
        }
        let lag = ms_of(&first["finished_at"]) - ms_of(&details["since"]);
        assert!(
            (800..=1_300).contains(&lag),
            "{pct}%: detected {lag} ms after the last progress"
        );
        assert!(
            repeats >= 3,
            "{pct}%: only {repeats} repeated frames reached gantry during the stall"
        );
        assert_eq!(job["attempts"][1]["status"], "succeeded", "{pct}%");
    }
}

/// Seed 001's last row: a node that keeps advancing is not stalled, however long it runs
/// in total, even when each step is a good part of the limit.
#[tokio::test]
async fn seed_001_normal_progress_is_never_a_stall() {
    let app = spawn_app(1, |c| {
        c.timeouts.first_progress_ms = Some(600);
        c.timeouts.node_stall_ms = Some(600);
    })
    .await;
    // 2 s in 20 steps of 100 ms: three times the limit in total.
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(40.0, 20, 7)}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "{job:#}");
    let a = &job["attempts"][0];
    assert!(ms_of(&a["finished_at"]) - ms_of(&a["started_at"]) >= 1_800);
    app.shutdown().await;
}
