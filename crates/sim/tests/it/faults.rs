//! One test per fault kind: what a client sees on the wire, in what order, and what
//! /queue and /history say. Waits poll a real signal with a deadline; where a test shows
//! that something does *not* happen, it watches for a bounded time in which a healthy
//! simulator at this speed would have finished many times over.

use crate::smoke::{kinds, run_ms, until_end, workflow};
use gantry_comfy::client::Submitted;
use gantry_comfy::rest::{Outcome, PromptRequest};
use gantry_comfy::ws::ServerMessage;
use gantry_comfy::{Client, Session, SessionEvent};
use gantry_sim::{spawn, SimConfig, SimHandle};
use serde_json::{json, Map, Value};
use std::time::Duration;

const SPEED: f64 = 20.0;

async fn sim_with(faults: &[&str]) -> (SimHandle, Client) {
    let sim = spawn(SimConfig {
        speed: SPEED,
        faults: faults.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let client = Client::new(&sim.url()).unwrap();
    (sim, client)
}

/// EmptyImage -> GantrySleep(1 s, 4 steps) -> ImageInvert -> SaveImage, with a seed so
/// each call runs afresh.
fn sleep_graph(seed: u64) -> Map<String, Value> {
    let mut g = workflow("a_normal.json");
    g["2"]["inputs"]["steps"] = json!(4);
    g["2"]["inputs"]["seed"] = json!(seed);
    g
}

async fn submit(client: &Client, session: &Session, graph: Map<String, Value>) -> String {
    let req = PromptRequest {
        prompt: graph,
        client_id: Some(session.client_id().to_string()),
        ..Default::default()
    };
    match client.submit(&req).await.unwrap() {
        Submitted::Accepted(a) => a.prompt_id,
        Submitted::Rejected(r) => panic!("rejected: {r:?}"),
    }
}

/// Messages that arrive within `window`.
async fn watch(session: &mut Session, window: Duration) -> Vec<SessionEvent> {
    let mut out = Vec::new();
    let end = tokio::time::Instant::now() + window;
    while let Ok(Some(ev)) = tokio::time::timeout_at(end, session.next()).await {
        let closed = matches!(ev, SessionEvent::Closed { .. });
        out.push(ev);
        if closed {
            break;
        }
    }
    out
}

fn messages(evs: &[SessionEvent]) -> Vec<&ServerMessage> {
    evs.iter()
        .filter_map(|e| match e {
            SessionEvent::Message(m) => Some(m),
            _ => None,
        })
        .collect()
}

async fn history_outcome(client: &Client, id: &str) -> Option<Outcome> {
    client.history_of(id).await.unwrap().map(|e| e.outcome())
}

async fn poll<T, F: std::future::Future<Output = Option<T>>>(mut f: impl FnMut() -> F) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls history until the prompt has an entry, and returns how it ended.
async fn await_outcome(client: &Client, id: &str) -> Outcome {
    poll(|| {
        let c = client.clone();
        let id = id.to_string();
        async move { history_outcome(&c, &id).await }
    })
    .await
}

/// The socket's last event is a close without a close frame (1006).
fn assert_abnormal_close(evs: &[SessionEvent]) {
    match evs.last() {
        Some(SessionEvent::Closed { code, .. }) => assert_eq!(*code, Some(1006)),
        other => panic!("expected an abnormal close, got {other:?}"),
    }
}

fn progress_values(ms: &[&ServerMessage]) -> Vec<u64> {
    ms.iter()
        .filter_map(|m| match m {
            ServerMessage::Progress(p) => p.value.as_u64(),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn hang_before_start_keeps_the_prompt_pending_and_blocks_later_ones() {
    let (sim, client) = sim_with(&["hang-before-start"]).await;
    let mut s = client.connect(false).await.unwrap();
    let first = submit(&client, &s, sleep_graph(1)).await;
    let second = submit(&client, &s, sleep_graph(2)).await;
    // A healthy simulator finishes both in ~0.1 s at this speed.
    let evs = watch(&mut s, Duration::from_millis(500)).await;
    let ms = messages(&evs);
    assert!(
        ms.iter().all(|m| m.kind() == "status"),
        "only status frames: {:?}",
        kinds_of(&ms)
    );
    let q = client.queue().await.unwrap();
    assert!(q.queue_running.is_empty());
    let pending: Vec<_> = q
        .queue_pending
        .iter()
        .map(|i| i.prompt_id.clone())
        .collect();
    assert_eq!(pending, [first.clone(), second.clone()]);
    assert_eq!(
        client
            .prompt_info()
            .await
            .unwrap()
            .exec_info
            .queue_remaining,
        2
    );
    assert_eq!(history_outcome(&client, &first).await, None);

    // Clearing the fault un-sticks the worker: both run, in order.
    sim.set_faults(&[]).unwrap();
    until_end(&mut s, &first).await;
    until_end(&mut s, &second).await;
    sim.shutdown().await;
}

fn kinds_of(ms: &[&ServerMessage]) -> Vec<String> {
    ms.iter().map(|m| m.kind().to_string()).collect()
}

#[tokio::test]
async fn stall_goes_silent_at_the_percentage_until_interrupted() {
    let (sim, client) = sim_with(&["stall:at=50"]).await;
    let mut s = client.connect(false).await.unwrap();
    let id = submit(&client, &s, sleep_graph(3)).await;
    let evs = watch(&mut s, Duration::from_millis(700)).await;
    let ms = messages(&evs);
    assert_eq!(progress_values(&ms), [1, 2], "stops at 2/4 = 50%");
    let last = ms.last().unwrap();
    assert_eq!(last.kind(), "progress", "silent after the stalled progress");
    let q = client.queue().await.unwrap();
    assert_eq!(q.queue_running[0].prompt_id, id);
    assert_eq!(history_outcome(&client, &id).await, None);

    client.interrupt(Some(&id)).await.unwrap();
    let ms = until_end(&mut s, &id).await;
    assert_eq!(kinds(&ms), ["execution_interrupted", "status", "executing"]);
    let ServerMessage::ExecutionInterrupted(i) = &ms[0] else {
        unreachable!()
    };
    assert_eq!(
        (i.node_id.as_str(), i.node_type.as_str()),
        ("2", "GantrySleep")
    );
    assert_eq!(
        history_outcome(&client, &id).await,
        Some(Outcome::Interrupted)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn chatty_stall_repeats_the_same_progress_with_status_frames() {
    let (sim, client) = sim_with(&["stall:at=25,chatty"]).await;
    let mut s = client.connect(false).await.unwrap();
    let id = submit(&client, &s, sleep_graph(4)).await;
    let evs = watch(&mut s, Duration::from_millis(800)).await;
    let ms = messages(&evs);
    let values = progress_values(&ms);
    assert!(values.len() >= 4, "heartbeats keep coming: {values:?}");
    assert!(
        values.iter().all(|v| *v == 1),
        "but progress never advances: {values:?}"
    );
    let n_status = ms.iter().filter(|m| m.kind() == "status").count();
    assert!(n_status >= 4, "status frames too: {n_status}");
    client.interrupt(None).await.unwrap();
    let ms = until_end(&mut s, &id).await;
    assert!(kinds(&ms).contains(&"execution_interrupted"));
    sim.shutdown().await;
}

#[tokio::test]
async fn uninterruptible_stall_ignores_interrupt() {
    let (sim, client) = sim_with(&["stall:at=50,uninterruptible"]).await;
    let mut s = client.connect(false).await.unwrap();
    let id = submit(&client, &s, sleep_graph(5)).await;
    poll(|| {
        let c = client.clone();
        async move {
            let q = c.queue().await.ok()?;
            (!q.queue_running.is_empty()).then_some(())
        }
    })
    .await;
    let _ = watch(&mut s, Duration::from_millis(300)).await;
    client.interrupt(Some(&id)).await.unwrap();
    let evs = watch(&mut s, Duration::from_millis(600)).await;
    assert!(
        messages(&evs).is_empty(),
        "nothing after the interrupt: {evs:?}"
    );
    assert_eq!(client.queue().await.unwrap().queue_running[0].prompt_id, id);
    sim.shutdown().await;
}

#[tokio::test]
async fn error_fault_raises_in_the_named_class_and_every_n_picks_runs() {
    let (sim, client) = sim_with(&["error:class=ImageInvert,every=2"]).await;
    let mut s = client.connect(false).await.unwrap();
    let mut outcomes = Vec::new();
    for seed in 10..13 {
        let id = submit(&client, &s, sleep_graph(seed)).await;
        let ms = until_end(&mut s, &id).await;
        if let Some(ServerMessage::ExecutionError(e)) =
            ms.iter().find(|m| m.kind() == "execution_error")
        {
            assert_eq!(e.node_id, "3");
            assert_eq!(e.node_type, "ImageInvert");
            assert_eq!(e.exception_type, "RuntimeError");
            // EmptyImage came from the previous run's cache, so only node 2 executed.
            assert_eq!(e.executed, ["2"]);
            assert!(e.exception_message.ends_with('\n'));
            let tail = &kinds(&ms)[kinds(&ms).len() - 3..];
            assert_eq!(tail, ["execution_error", "status", "executing"]);
        }
        outcomes.push(history_outcome(&client, &id).await.unwrap());
    }
    assert_eq!(
        outcomes,
        [Outcome::Success, Outcome::Error, Outcome::Success]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn oom_fault_is_a_cuda_out_of_memory_error() {
    let (sim, client) = sim_with(&["oom"]).await;
    let mut s = client.connect(false).await.unwrap();
    let id = submit(&client, &s, workflow("workflows/txt2img.json")).await;
    let ms = until_end(&mut s, &id).await;
    let Some(ServerMessage::ExecutionError(e)) = ms.iter().find(|m| m.kind() == "execution_error")
    else {
        panic!("no execution_error: {:?}", kinds(&ms))
    };
    assert_eq!(e.node_type, "KSampler");
    assert_eq!(e.exception_type, "torch.OutOfMemoryError");
    assert!(e
        .exception_message
        .contains("ran out of memory on your GPU"));
    assert_eq!(history_outcome(&client, &id).await, Some(Outcome::Error));
    sim.shutdown().await;
}

#[tokio::test]
async fn ws_drop_closes_sockets_with_1006_and_the_run_still_completes() {
    let (sim, client) = sim_with(&["ws-drop:after_ms=200"]).await;
    let mut s = client.connect(false).await.unwrap();
    let id = submit(&client, &s, sleep_graph(20)).await;
    let evs = watch(&mut s, Duration::from_secs(5)).await;
    assert_abnormal_close(&evs);
    let outcome = await_outcome(&client, &id).await;
    assert_eq!(outcome, Outcome::Success);
    sim.shutdown().await;
}

#[tokio::test]
async fn ws_silent_sends_nothing_about_the_run_but_history_has_it() {
    let (sim, client) = sim_with(&["ws-silent"]).await;
    let mut s = client.connect(false).await.unwrap();
    let id = submit(&client, &s, sleep_graph(21)).await;
    let outcome = await_outcome(&client, &id).await;
    assert_eq!(outcome, Outcome::Success);
    let evs = watch(&mut s, Duration::from_millis(200)).await;
    let ms = messages(&evs);
    assert!(!ms.is_empty());
    assert!(
        ms.iter().all(|m| m.kind() == "status"),
        "{:?}",
        kinds_of(&ms)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn crash_drops_sockets_refuses_http_and_restarts_empty() {
    let (sim, client) = sim_with(&["crash:after_jobs=1,restart_ms=4000"]).await;
    let mut s = client.connect(false).await.unwrap();
    let first = submit(&client, &s, sleep_graph(30)).await;
    until_end(&mut s, &first).await;
    let second = submit(&client, &s, sleep_graph(31)).await;
    let evs = watch(&mut s, Duration::from_secs(5)).await;
    assert_abnormal_close(&evs);
    // Down: connections are refused (restart_ms=4000 at speed 20 is 200 ms).
    let fresh = Client::new(&sim.url()).unwrap();
    let down = fresh.prompt_info().await;
    let up = poll(|| {
        let c = fresh.clone();
        async move { c.queue().await.ok() }
    })
    .await;
    assert!(down.is_err() || up.queue_pending.is_empty());
    assert!(up.queue_running.is_empty() && up.queue_pending.is_empty());
    assert!(
        fresh.history(None).await.unwrap().is_empty(),
        "history is gone"
    );
    assert!(fresh.history_of(&second).await.unwrap().is_none());
    // The counter starts again at 0, as after a real restart.
    let mut s2 = fresh.connect(false).await.unwrap();
    let req = PromptRequest {
        prompt: sleep_graph(32),
        client_id: Some(s2.client_id().to_string()),
        ..Default::default()
    };
    let Submitted::Accepted(a) = fresh.submit(&req).await.unwrap() else {
        panic!()
    };
    assert_eq!(a.number.as_i64(), Some(0));
    until_end(&mut s2, &a.prompt_id).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn slow_fault_stretches_execution_time() {
    let (sim, client) = sim_with(&["slow:factor=4"]).await;
    let mut s = client.connect(false).await.unwrap();
    let id = submit(&client, &s, sleep_graph(40)).await;
    until_end(&mut s, &id).await;
    // GantrySleep(1 s) at speed 20 is 50 ms; four times slower is at least 200 ms.
    let ms = run_ms(&client, &id).await;
    assert!(ms >= 190, "ran in {ms} ms");
    sim.shutdown().await;
}

#[tokio::test]
async fn lose_history_completes_on_the_wire_but_history_stays_empty() {
    let (sim, client) = sim_with(&["lose-history"]).await;
    let mut s = client.connect(false).await.unwrap();
    let id = submit(&client, &s, sleep_graph(50)).await;
    let ms = until_end(&mut s, &id).await;
    assert!(kinds(&ms).contains(&"execution_success"));
    assert_eq!(history_outcome(&client, &id).await, None);
    sim.shutdown().await;
}

#[tokio::test]
async fn faults_change_at_run_time_and_bad_specs_change_nothing() {
    let (sim, _client) = sim_with(&["oom"]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/sim/faults", sim.url());
    let bad = http
        .post(&url)
        .body(r#"["stall:at=50","explode"]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("\"explode\""),
        "{body}"
    );
    let now: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(now, json!({"faults": ["oom"]}));
    let ok = http
        .post(&url)
        .body(r#"["stall:at=50,every=3"]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let now: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(now, json!({"faults": ["stall:at=50,every=3"]}));
    sim.shutdown().await;
}
