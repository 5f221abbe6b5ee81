//! Attempt profiles: built from the captures of a real ComfyUI (every node timed, cached
//! nodes marked, a failed and an interrupted node), and from simulated runs (on the
//! job, in its terminal event, per attempt, and saying which part is missing when the
//! WebSocket was lost mid-run instead of inventing durations).

use crate::support::{fixture, ms_of, sim_config, sleep_workflow, spawn_app_with};
use gantry_comfy::ws::ServerMessage;
use gantry_core::profile::{AttemptProfile, NodeStatus, ProfileBuilder};
use gantry_core::{Attempt, AttemptStatus, Workflow};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// The profiles of every prompt in a capture, by prompt id, in order of first message.
fn profiles_of(capture: &str, workflow: Value) -> Vec<AttemptProfile> {
    let capture = fixture(&format!("comfyui/captures/{capture}.json"));
    let workflow = Workflow::parse(&workflow).unwrap();
    let mut builders: BTreeMap<usize, (String, ProfileBuilder, i64)> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for e in capture["events"].as_array().unwrap() {
        if e["kind"] != "ws_text" {
            continue;
        }
        let m = ServerMessage::parse(&e["body"].to_string()).unwrap();
        let Some(pid) = m.prompt_id().map(str::to_owned) else {
            continue;
        };
        let at = e["t_ms"].as_f64().unwrap().round() as i64;
        let i = match order.iter().position(|p| *p == pid) {
            Some(i) => i,
            None => {
                order.push(pid.clone());
                order.len() - 1
            }
        };
        let entry = builders
            .entry(i)
            .or_insert_with(|| (pid, ProfileBuilder::default(), at));
        entry.2 = at;
        gantry_server::backend::comfy::profiling::observe(&mut entry.1, at, &m);
    }
    builders
        .into_values()
        .map(|(pid, b, last)| {
            let attempt = Attempt {
                number: 1,
                backend: "a".into(),
                prompt_id: pid,
                status: AttemptStatus::Succeeded,
                created_at: 0,
                submitted_at: Some(0),
                started_at: None,
                finished_at: Some(last),
                error: None,
                counted: true,
                profile: None,
            };
            b.finish(&workflow, &attempt)
        })
        .collect()
}

fn statuses(p: &AttemptProfile) -> Vec<(&str, NodeStatus)> {
    p.nodes.iter().map(|n| (n.id.as_str(), n.status)).collect()
}

#[test]
fn a_normal_run_times_every_node_with_its_progress_and_title() {
    let mut workflow = fixture("comfyui/workflows/a_normal.json");
    workflow["2"]["_meta"] = json!({"title": "Slow step"});
    let [p] = profiles_of("a_normal_run", workflow).try_into().unwrap();
    use NodeStatus::*;
    assert_eq!(
        statuses(&p),
        [
            ("1", Completed),
            ("2", Completed),
            ("3", Completed),
            ("4", Completed)
        ]
    );
    assert!(p.complete && p.gaps.is_empty());
    let n2 = &p.nodes[1];
    assert_eq!(
        (n2.class_type.as_str(), n2.title.as_deref()),
        ("GantrySleep", Some("Slow step"))
    );
    // executing "2" at 25.7 ms, executing "3" at 1031.1 ms.
    assert_eq!(n2.duration_ms, Some(1031 - 26));
    assert_eq!(n2.progress_count, 5);
    let values: Vec<f64> = n2.progress.iter().map(|p| p.value).collect();
    assert_eq!(values, [1.0, 2.0, 3.0, 4.0, 5.0]);
    // SaveImage ends at its `executed`, not at the success that follows 260 ms later.
    assert_eq!(p.nodes[3].duration_ms, Some(1036 - 1031));
    assert_eq!(p.summary.slowest[0].id, "2");
    assert_eq!(
        (p.summary.executed, p.summary.cached, p.summary.failed),
        (4, 0, 0)
    );
    assert_eq!(p.summary.with_progress, ["2"]);
    assert_eq!(p.started_at, Some(23));
    assert_eq!(p.execution_ms, Some(1298 - 23));
}

#[test]
fn cached_nodes_are_marked_and_not_timed() {
    let [p] = profiles_of(
        "b2_partial_cache",
        fixture("comfyui/workflows/b2_partial_cache.json"),
    )
    .try_into()
    .unwrap();
    let n1 = p.nodes.iter().find(|n| n.id == "1").unwrap();
    assert_eq!((n1.status, n1.duration_ms), (NodeStatus::Cached, None));
    assert_eq!((p.summary.executed, p.summary.cached), (3, 1));
    assert!(p.summary.slowest.iter().all(|s| s.id != "1"));
}

#[test]
fn a_failed_node_carries_its_error_and_what_follows_never_ran() {
    let profiles = profiles_of(
        "c_execution_error",
        fixture("comfyui/workflows/c_fail.json"),
    );
    assert_eq!(profiles.len(), 2);
    let first = &profiles[0];
    let n3 = first.nodes.iter().find(|n| n.id == "3").unwrap();
    assert_eq!(n3.status, NodeStatus::Failed);
    assert!(
        n3.error.as_deref().unwrap().contains("deliberate failure"),
        "{n3:?}"
    );
    assert_eq!(n3.duration_ms, Some(527 - 319));
    assert_eq!(first.summary.failed, 1);
    // The rerun: its first two nodes come from the cache.
    let again = &profiles[1];
    use NodeStatus::*;
    let s: BTreeMap<&str, NodeStatus> = statuses(again).into_iter().collect();
    assert_eq!((s["1"], s["2"], s["3"]), (Cached, Cached, Failed));
}

#[test]
fn an_interrupted_node_ends_at_the_interrupt() {
    let [p] = profiles_of(
        "d_interrupt_targeted",
        fixture("comfyui/workflows/d_interrupt_targeted.json"),
    )
    .try_into()
    .unwrap();
    use NodeStatus::*;
    assert_eq!(
        statuses(&p),
        [("1", Completed), ("2", Interrupted), ("3", Pending)]
    );
    assert_eq!(p.nodes[1].duration_ms, Some(2711 - 19));
    assert_eq!(p.nodes[1].progress_count, 3);
}

/// A simulated run: the profile is on the job's attempt and in its terminal event.
#[tokio::test]
async fn a_finished_job_shows_each_attempt_profile_and_its_terminal_event_carries_it() {
    let app = spawn_app_with(vec![sim_config()], |_| {}).await;
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(1.0, 4, 3)}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded");
    let profile = &job["attempts"][0]["profile"];
    assert_eq!(profile["complete"], true, "{profile:#}");
    let nodes = profile["nodes"].as_array().unwrap();
    assert!(
        nodes.iter().all(|n| n["status"] == "completed"),
        "{profile:#}"
    );
    let sleep = nodes
        .iter()
        .find(|n| n["class_type"] == "GantrySleep")
        .unwrap();
    assert_eq!(sleep["progress_count"], 4);
    assert!(sleep["duration_ms"].as_i64().unwrap() > 0);
    assert_eq!(
        profile["summary"]["slowest"][0]["class_type"],
        "GantrySleep"
    );
    let events = app.read_sse(&id).await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "succeeded");
    assert_eq!(last.data["profile"], *profile);
    app.shutdown().await;
}

/// The WebSocket drops mid-run: the outcome still comes (from history), and the
/// profile says which part is missing; no node that ran in the gap gets a duration.
#[tokio::test]
async fn a_run_whose_socket_dropped_says_what_is_missing() {
    let app = spawn_app_with(vec![sim_config()], |c| {
        c.liveness = Duration::from_millis(200);
    })
    .await;
    // The sim runs 20x fast: drop 15 ms into a run of 0.5 simulated s per step.
    app.sims[0].set_faults(&["ws-drop:after_ms=300"]).unwrap();
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(4.0, 8, 4)}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let profile = &job["attempts"][0]["profile"];
    assert_eq!(profile["complete"], false, "{profile:#}");
    let gap = &profile["gaps"][0];
    assert!(
        gap["reason"].as_str().unwrap().contains("WebSocket"),
        "{gap}"
    );
    assert!(gap["from"].is_i64() && gap["to"].is_i64(), "{gap}");
    let nodes = profile["nodes"].as_array().unwrap();
    let sleep = nodes
        .iter()
        .find(|n| n["class_type"] == "GantrySleep")
        .unwrap();
    assert_eq!(sleep["status"], "unknown", "{profile:#}");
    assert!(sleep["duration_ms"].is_null());
    // Nothing after the drop was heard: the nodes after it are unknown, not pending.
    let save = nodes
        .iter()
        .find(|n| n["class_type"] == "SaveImage")
        .unwrap();
    assert_eq!(save["status"], "unknown", "{profile:#}");
    app.shutdown().await;
}

/// A job that failed over keeps each attempt's own profile: the first shows the node
/// that raised, the second a clean run.
#[tokio::test]
async fn a_failed_first_attempt_keeps_its_own_profile() {
    let app = spawn_app_with(vec![sim_config(), sim_config()], |c| {
        c.backends[0].priority = 10;
        c.backoff_base = Duration::from_millis(10);
    })
    .await;
    app.sims[0]
        .set_faults(&["error:class=GantrySleep"])
        .unwrap();
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(0.5, 2, 5)}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let node = |attempt: usize, class: &str| -> Value {
        job["attempts"][attempt]["profile"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["class_type"] == class)
            .cloned()
            .unwrap()
    };
    assert_eq!(job["attempts"][0]["backend"], "a", "{job:#}");
    // Its end may have been read from /history before the socket told it: either way
    // the node that raised is known, and the one after it never ran.
    assert_eq!(node(0, "GantrySleep")["status"], "failed", "{job:#}");
    assert!(node(0, "GantrySleep")["error"].as_str().is_some());
    assert_eq!(node(0, "SaveImage")["status"], "pending");
    assert_eq!(job["attempts"][0]["profile"]["summary"]["failed"], 1);
    assert_eq!(node(1, "GantrySleep")["status"], "completed");
    assert_eq!(node(1, "SaveImage")["status"], "completed");
    app.shutdown().await;
}

/// Every finished attempt's nodes feed the aggregates behind `GET /v1/stats/nodes`.
#[tokio::test]
async fn finished_attempts_feed_the_node_statistics() {
    use crate::support::{assert_error, poll_until};
    let app = spawn_app_with(vec![sim_config()], |_| {}).await;
    for seed in [1, 2, 3, 3] {
        let id = app
            .submit_ok(&json!({"workflow": sleep_workflow(0.4, 2, seed)}))
            .await;
        assert_eq!(app.wait_terminal(&id).await["state"], "succeeded");
    }
    // Written by the stats writer within about a second of the last job.
    let body = poll_until(
        "the statistics count every run",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let body = app.get_json("/v1/stats/nodes?class=GantrySleep").await;
            if body["stats"][0]["count"] == 4 {
                Ok(body)
            } else {
                Err(body)
            }
        },
    )
    .await;
    let s = &body["stats"][0];
    assert_eq!(body["stats"].as_array().unwrap().len(), 1);
    // The repeated seed came from ComfyUI's cache.
    assert_eq!(
        (s["cached"].as_u64(), s["measured"].as_u64()),
        (Some(1), Some(3)),
        "{s:#}"
    );
    assert_eq!(s["cached_ratio"], 0.25);
    let (p50, p99, max) = (
        s["p50_ms"].as_f64().unwrap(),
        s["p99_ms"].as_f64().unwrap(),
        s["max_ms"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= max * 1.02, "{s:#}");
    let by_backend = app.get_json("/v1/stats/nodes?by=backend,workflow").await;
    let first = &by_backend["stats"][0];
    assert_eq!(first["backend"], "a");
    assert!(first["workflow"].is_string());
    assert_eq!(by_backend["by"], json!(["class", "backend", "workflow"]));
    let future = app
        .get_json("/v1/stats/nodes?since=2999-01-01T00:00:00Z")
        .await;
    assert_eq!(future["stats"], json!([]));
    let bad = app.get("/v1/stats/nodes?by=colour").await;
    assert_error(&bad, 400, "invalid_query", &["by=colour"]);
    let bad = app.get("/v1/stats/nodes?since=yesterday").await;
    assert_error(&bad, 400, "invalid_query", &["since=yesterday"]);
    app.shutdown().await;
}

/// `[adaptive]`: once a class has enough runs on a backend, its stall limit there is
/// `max(floor, factor x p99)`: a stalled node is caught at that, not at the configured
/// five minutes; `/v1/stats/timeouts` says what it set and why.
#[tokio::test]
async fn adaptive_stall_limits_come_from_the_class_history() {
    use gantry_server::config::Adaptive;
    let app = spawn_app_with(vec![sim_config()], |c| {
        c.adaptive = Some(Adaptive {
            classes: vec!["GantrySleep".into()],
            factor: 2.0,
            floor: Duration::from_millis(250),
            min_samples: 3,
        });
    })
    .await;
    let before = app.get_json("/v1/stats/timeouts").await;
    assert_eq!(before["enabled"], true);
    assert_eq!(before["suggestions"], json!([]));
    for seed in 1..=3 {
        let id = app
            .submit_ok(&json!({"workflow": sleep_workflow(1.0, 4, seed)}))
            .await;
        assert_eq!(app.wait_terminal(&id).await["state"], "succeeded");
    }
    let after = app.get_json("/v1/stats/timeouts").await;
    let sleep = after["suggestions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["class"] == "GantrySleep")
        .cloned()
        .unwrap_or_else(|| panic!("{after:#}"));
    assert_eq!(
        (sleep["source"].as_str(), sleep["backend_samples"].as_u64()),
        (Some("backend"), Some(3)),
        "{sleep:#}"
    );
    assert_eq!(sleep["applied"], true);
    let limit = sleep["node_stall_ms"].as_u64().unwrap();
    let p99 = sleep["p99_ms"].as_f64().unwrap();
    assert_eq!(limit, ((2.0 * p99).ceil() as u64).max(250), "{sleep:#}");
    // Other classes are suggested, not applied.
    let other = after["suggestions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["class"] == "SaveImage")
        .cloned()
        .unwrap();
    assert_eq!(other["applied"], false);

    // A node that stalls is caught at the learnt limit.
    app.sims[0].set_faults(&["stall:at=50"]).unwrap();
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(20.0, 10, 9), "max_attempts": 1}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    let details = &job["attempts"][0]["error"]["details"];
    assert_eq!(details["phase"], "node_stall", "{job:#}");
    assert_eq!(details["limit_ms"], limit, "{job:#}");
    app.shutdown().await;
}

/// A backend much slower than the farm for a class (its median over twice the farm's,
/// from enough runs) is used last: with both idle, jobs go to the fast one.
#[tokio::test]
async fn a_backend_much_slower_for_a_class_is_used_last() {
    let app = spawn_app_with(vec![sim_config(), sim_config()], |_| {}).await;
    app.sims[1].set_faults(&["slow:factor=6"]).unwrap();
    // Enough runs on each (least recently used alternates them while none is judged).
    let mut on_b = 0;
    for seed in 0..48 {
        let id = app
            .submit_ok(&json!({"workflow": sleep_workflow(0.4, 2, 100 + seed)}))
            .await;
        let job = app.wait_terminal(&id).await;
        on_b += usize::from(job["attempts"][0]["backend"] == "b");
    }
    assert!(on_b >= 20, "b ran {on_b} of 48 before it was judged");
    // Judged at the stats writer's next flush, within about a second.
    crate::support::poll_until(
        "b is judged slow for GantrySleep",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async {
            let t = app.get_json("/v1/stats/timeouts").await;
            let slow = |backend: &str| {
                t["suggestions"].as_array().unwrap().iter().any(|s| {
                    s["class"] == "GantrySleep" && s["backend"] == backend && s["slow"] == true
                })
            };
            if slow("b") && !slow("a") {
                Ok(())
            } else {
                Err(t)
            }
        },
    )
    .await;
    for seed in 0..6 {
        let id = app
            .submit_ok(&json!({"workflow": sleep_workflow(0.4, 2, 500 + seed)}))
            .await;
        let job = app.wait_terminal(&id).await;
        assert_eq!(
            job["attempts"][0]["backend"], "a",
            "slow b was used while a was idle"
        );
    }
    app.shutdown().await;
}

/// txt2img on checkpoint `model` with a GantrySleep of `seconds` after the decode.
fn model_workflow(model: &str, seconds: f64, seed: u64) -> Value {
    let mut w = fixture("workflows/txt2img.json");
    w["4"]["inputs"]["ckpt_name"] = json!(model);
    w["3"]["inputs"]["seed"] = json!(seed);
    w["3"]["inputs"]["steps"] = json!(1);
    w["10"] = json!({"class_type": "GantrySleep", "inputs": {"image": ["8", 0], "seconds": seconds, "steps": 1, "seed": seed}});
    w["9"]["inputs"]["images"] = json!(["10", 0]);
    w
}

#[tokio::test]
async fn a_free_backend_takes_a_queued_job_it_is_warm_for_before_the_head() {
    const X: &str = "v1-5-pruned-emaonly.safetensors";
    const Y: &str = "sd_xl_base_1.0.safetensors";
    let app = spawn_app_with(vec![sim_config(), sim_config()], |c| c.pipeline = false).await;
    let run = |model: &'static str, seconds: f64, seed: u64| {
        let app = &app;
        async move {
            app.submit_ok(&json!({"workflow": model_workflow(model, seconds, seed)}))
                .await
        }
    };
    // a last ran X, b last ran Y.
    let first = app.wait_terminal(&run(X, 0.1, 1).await).await;
    assert_eq!(first["attempts"][0]["backend"], "a");
    let second = app.wait_terminal(&run(Y, 0.1, 2).await).await;
    assert_eq!(second["attempts"][0]["backend"], "b");
    // Both busy, each on what it is warm for; a frees long before b.
    let long = run(Y, 80.0, 3).await;
    let short = run(X, 20.0, 4).await;
    for id in [&long, &short] {
        app.wait_job(id, "running", Duration::from_secs(20), |j| {
            j["state"] == "running"
        })
        .await;
    }
    let on = |j: &Value| j["attempts"][0]["backend"].as_str().unwrap().to_owned();
    assert_eq!(on(&app.get_job(&long).await), "b");
    assert_eq!(on(&app.get_job(&short).await), "a");
    // The head of the queue wants Y; a, free first, is warm for the X job behind it.
    let head = run(Y, 0.1, 5).await;
    let behind = run(X, 0.1, 6).await;
    assert_eq!(app.get_job(&head).await["state"], "queued");
    let behind = app.wait_terminal(&behind).await;
    let head = app.wait_terminal(&head).await;
    assert_eq!(on(&behind), "a", "the X job waited for b or ran cold");
    // The head was passed over once, then ran (on a, free again while b is still busy:
    // a cold load beats waiting), never lost.
    assert!(
        ms_of(&head["attempts"][0]["created_at"]) >= ms_of(&behind["attempts"][0]["created_at"]),
        "the head was dispatched first: {head} {behind}"
    );
    assert_eq!(behind["state"], "succeeded");
    assert_eq!(head["state"], "succeeded");
    app.shutdown().await;
}
