//! What the web monitor reads: `GET /v1/state` and `GET /v1/events?since=` from its
//! `seq` (nothing missed, nothing repeated, backend rows first and on every change,
//! progress never after its job's end), `resync` for a client too far behind, idle
//! backends probed so their status rests on something heard, blocks lifted by hand,
//! and the page itself served from the binary.

use crate::support::{
    parse_sse_blocks, poll_until, sleep_workflow, spawn_app, tiny_workflow, Sse, TestApp,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;

/// Follow `/v1/events?since=SINCE` in the background, each event as it comes.
async fn follow(app: &TestApp, since: i64) -> mpsc::UnboundedReceiver<Sse> {
    let mut response = app
        .http
        .get(format!("{}/v1/events?since={since}", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (mut buf, mut out) = (String::new(), Vec::new());
        while let Ok(Some(chunk)) = response.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            parse_sse_blocks(&mut buf, &mut out);
            for e in out.drain(..) {
                if tx.send(e).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Events until `done` says the log is complete (or 30 s pass: a failure).
async fn until(rx: &mut mpsc::UnboundedReceiver<Sse>, done: impl Fn(&[Sse]) -> bool) -> Vec<Sse> {
    let mut log = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done(&log) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => log.push(e),
            Ok(None) => panic!("the stream ended; got {:?}", crate::support::names(&log)),
            Err(_) => panic!("timed out; got {:?}", crate::support::names(&log)),
        }
    }
    log
}

fn terminal(e: &Sse) -> bool {
    matches!(e.event.as_str(), "succeeded" | "failed" | "cancelled")
}

#[tokio::test]
async fn the_stream_from_a_snapshot_seq_misses_nothing_repeats_nothing_and_shows_backends_change() {
    let app = spawn_app(1, |_| {}).await;
    app.wait_backends_idle().await;
    for i in 0..3 {
        let id = app
            .submit_ok(&json!({"workflow": tiny_workflow(&format!("before{i}"))}))
            .await;
        app.wait_terminal(&id).await;
    }
    let state = app.get_json("/v1/state").await;
    let seq = state["seq"].as_i64().unwrap();
    assert!(seq >= 12, "{state:#}");
    assert_eq!(state["counts"]["succeeded"], 3, "{state:#}");
    assert_eq!(state["recent"].as_array().unwrap().len(), 3);
    assert!(state["running"].as_array().unwrap().is_empty());
    assert_eq!(state["backends"][0]["name"], "a");
    assert_eq!(state["backends"][0]["status"], "idle");
    assert!(state["stale_after_ms"].as_u64().unwrap() > 0);

    let mut rx = follow(&app, seq).await;
    // Every backend's row comes first, as it is now.
    let first = rx.recv().await.unwrap();
    assert_eq!(
        (first.event.as_str(), &first.data["name"]),
        ("backend", &json!("a"))
    );
    assert_eq!(first.data["status"], "idle");
    assert!(first.id.is_none(), "a backend row has no sequence number");

    let ids = [
        app.submit_ok(&json!({"workflow": sleep_workflow(2.0, 10, 1)}))
            .await,
        app.submit_ok(&json!({"workflow": sleep_workflow(1.0, 5, 2)}))
            .await,
    ];
    let log = until(&mut rx, |log| {
        ids.iter().all(|id| {
            log.iter()
                .any(|e| terminal(e) && e.data["job_id"].as_str() == Some(id))
        }) && {
            // The latest row is idle again, after a busy one.
            let rows: Vec<&Sse> = log.iter().filter(|e| e.event == "backend").collect();
            rows.last().is_some_and(|r| r.data["status"] == "idle")
                && rows.iter().any(|r| r.data["status"] == "busy")
        }
    })
    .await;
    // Job events: after the snapshot's seq, each once, in order, none missing.
    let seqs: Vec<i64> = log
        .iter()
        .filter_map(|e| e.id.as_ref().map(|i| i.parse::<i64>().unwrap()))
        .collect();
    assert_eq!(seqs.first(), Some(&(seq + 1)), "{:?}", seqs);
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    // The backend's row followed it: busy with the job, then idle.
    let rows: Vec<(&str, Option<&str>)> = log
        .iter()
        .filter(|e| e.event == "backend")
        .map(|e| {
            (
                e.data["status"].as_str().unwrap(),
                e.data["current_job"].as_str(),
            )
        })
        .collect();
    let busy = rows
        .iter()
        .position(|r| *r == ("busy", Some(ids[0].as_str())))
        .unwrap_or_else(|| panic!("never busy with the first job: {rows:?}"));
    assert!(rows[busy..].iter().any(|r| r.0 == "idle"), "{rows:?}");
    // Progress came, and never after its job's end.
    let mut ended: HashMap<&str, usize> = HashMap::new();
    for (i, e) in log.iter().enumerate() {
        let job = e.data["job_id"].as_str().unwrap_or_default();
        if terminal(e) {
            ended.insert(job, i);
        }
        if matches!(e.event.as_str(), "node" | "progress") {
            assert!(
                !ended.contains_key(job),
                "{} after the end of {job}",
                e.event
            );
        }
    }
    assert!(log
        .iter()
        .any(|e| e.event == "progress" && e.data["job_id"] == ids[0].as_str()));

    // The snapshot now agrees with what the stream said.
    let after = app.get_json("/v1/state").await;
    assert_eq!(after["seq"].as_i64(), seqs.last().copied());
    assert_eq!(after["counts"]["succeeded"], 5);
    app.shutdown().await;
}

#[tokio::test]
async fn a_running_job_shows_its_node_and_step_in_the_snapshot() {
    let app = spawn_app(1, |_| {}).await;
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(20.0, 40, 3)}))
        .await;
    let state = poll_until(
        "the snapshot shows the job's step",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || async {
            let s = app.get_json("/v1/state").await;
            match s["running"][0]["progress"]["value"].as_f64() {
                Some(v) if v >= 1.0 => Ok(s),
                _ => Err(s),
            }
        },
    )
    .await;
    let running = &state["running"][0];
    assert_eq!(running["id"], id.as_str());
    assert_eq!(running["progress"]["node"], "2");
    assert_eq!(running["progress"]["max"], 40.0);
    let backend = &state["backends"][0];
    assert_eq!(
        (&backend["status"], &backend["current_job"]),
        (&json!("busy"), &json!(id))
    );
    assert_eq!(backend["progress"]["job_id"], id.as_str());
    assert_eq!(app.cancel(&id).await.0, 202);
    app.wait_terminal(&id).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_client_too_far_behind_or_ahead_is_told_to_resync() {
    let app = spawn_app(1, |c| c.resync_gap = 5).await;
    for i in 0..3 {
        let id = app
            .submit_ok(&json!({"workflow": tiny_workflow(&format!("r{i}"))}))
            .await;
        app.wait_terminal(&id).await;
    }
    let newest = app.get_json("/v1/state").await["seq"].as_i64().unwrap();
    for since in [1, newest + 100] {
        let mut rx = follow(&app, since).await;
        let e = rx.recv().await.unwrap();
        assert_eq!(e.event, "resync", "since {since}: {e:?}");
        assert_eq!(e.data["seq"], newest);
        assert!(rx.recv().await.is_none(), "the stream ends after a resync");
    }
    // Within the gap: the backend rows, then the missed events.
    let mut rx = follow(&app, newest - 2).await;
    let log = until(&mut rx, |log| {
        log.iter().filter(|e| e.id.is_some()).count() == 2
    })
    .await;
    assert_eq!(log[0].event, "backend");
    let ids: Vec<&str> = log.iter().filter_map(|e| e.id.as_deref()).collect();
    assert_eq!(ids, [(newest - 1).to_string(), newest.to_string()]);
    app.shutdown().await;
}

#[tokio::test]
async fn an_idle_backend_is_probed_so_it_is_heard_from_and_never_stale() {
    let app = spawn_app(1, |c| c.liveness = Duration::from_millis(300)).await;
    app.wait_backends_idle().await;
    let seen = |b: &Value| {
        chrono::DateTime::parse_from_rfc3339(b["backends"][0]["last_seen"].as_str().unwrap())
            .unwrap()
            .timestamp_millis()
    };
    let first = seen(&app.get_json("/v1/backends").await);
    // Nothing is sent to it and it sends nothing by itself; gantry's probes are heard.
    let later = poll_until(
        "last_seen moves while idle",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let b = app.get_json("/v1/backends").await;
            if seen(&b) >= first + 600 {
                Ok(b)
            } else {
                Err(b)
            }
        },
    )
    .await;
    assert_eq!(later["backends"][0]["status"], "idle", "{later:#}");
    let runs = app.sim_json(0, "/sim/runs").await;
    assert!(
        runs["runs"].as_array().unwrap().is_empty(),
        "probes run no prompt"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_block_is_shown_on_the_backend_and_can_be_lifted() {
    let app = spawn_app(2, |c| {
        c.backends[0].priority = 10;
        c.backoff_base = Duration::from_millis(10);
        c.health.circuit_threshold = 0;
    })
    .await;
    app.wait_backends_idle().await;
    app.sims[0].set_faults(&["oom"]).unwrap();
    let id = app
        .submit_ok(&json!({"workflow": tiny_workflow("blocked")}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let hash = job["workflow_hash"].as_str().unwrap().to_owned();
    let a = poll_until(
        "a shows the block",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let list = app.get_json("/v1/backends").await;
            let a = list["backends"][0].clone();
            if a["status"] == "blocked" {
                Ok(a)
            } else {
                Err(list)
            }
        },
    )
    .await;
    assert_eq!(a["blocks"][0]["workflow_hash"], hash.as_str(), "{a:#}");

    let lift = |path: String| {
        let app = &app;
        async move {
            let r = app
                .http
                .delete(format!("{}{path}", app.url))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, row) = lift(format!("/v1/backends/a/blocks/{hash}")).await;
    assert_eq!(status, 200, "{row:#}");
    assert_eq!(row["blocks"], json!([]));
    assert_eq!(row["status"], "idle");
    let again = lift(format!("/v1/backends/a/blocks/{hash}")).await;
    crate::support::assert_error(&again, 404, "not_found", &["no block", &hash]);
    let nobody = lift(format!("/v1/backends/zz/blocks/{hash}")).await;
    crate::support::assert_error(&nobody, 404, "not_found", &["no backend zz"]);
    app.shutdown().await;
}

#[tokio::test]
async fn the_page_is_served_from_the_binary() {
    let app = spawn_app(1, |_| {}).await;
    for (path, kind, needle) in [
        ("/", "text/html", "/ui/app.js"),
        ("/ui/app.js", "text/javascript", "/v1/events?since="),
        ("/ui/style.css", "text/css", ".badge"),
    ] {
        let r = app
            .http
            .get(format!("{}{path}", app.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with(kind), "{path}: {ct}");
        assert!(r.text().await.unwrap().contains(needle), "{path}");
    }
    app.shutdown().await;
}
