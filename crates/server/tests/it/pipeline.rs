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

/// A TCP proxy that holds every byte a client sends for `delay` (order kept) and passes
/// the answers at once: a backend whose requests arrive late, so a request sent right
/// after another's answer lands well after the first one's effects. It forwards to the
/// address put in the answered slot (known only once the test's simulator runs).
async fn slow_link(
    delay: Duration,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::OnceLock<std::net::SocketAddr>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = std::sync::Arc::new(std::sync::OnceLock::new());
    let target = upstream.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Some(to) = target.get().copied() else {
                continue;
            };
            let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let (mut client_rx, mut client_tx) = client.into_split();
            let (mut server_rx, mut server_tx) = server.into_split();
            let (held, mut due) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = client_rx.read(&mut buf).await {
                    let _ = held.send((tokio::time::Instant::now() + delay, buf[..n].to_vec()));
                }
            });
            tokio::spawn(async move {
                while let Some((at, bytes)) = due.recv().await {
                    tokio::time::sleep_until(at).await;
                    if server_tx.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
            });
        }
    });
    (addr, upstream)
}

/// The prompt taken back from behind a stalled one is stopped on the backend even when
/// the backend started it before the dequeue came: here every request reaches the
/// backend 100 ms late, so the stalled prompt's interrupt lets the one behind start
/// before the dequeue sent after it arrives. Every run stalls, so a prompt left there
/// would run unwatched for ever and every later prompt would wait behind it (found by
/// `gantry bench chaos`: backends taken out of the farm for good).
#[tokio::test]
async fn a_prompt_taken_back_is_stopped_even_once_the_backend_started_it() {
    let (link, upstream) = slow_link(Duration::from_millis(100)).await;
    let app = crate::support::spawn_app_with(vec![crate::support::sim_config()], |c| {
        let sim = url::Url::parse(&c.backends[0].url).unwrap();
        let port = sim.port().unwrap();
        upstream.set(([127, 0, 0, 1], port).into()).unwrap();
        c.backends[0].url = format!("http://{link}");
        c.timeouts.node_stall_ms = Some(400);
        c.timeouts.first_progress_ms = Some(400);
        c.max_attempts = 1;
        c.backoff_base = Duration::from_millis(10);
        c.backoff_max = Duration::from_millis(20);
        // Neither a block nor the circuit keeps the second job away from the backend.
        c.health.block_ms = 0;
        c.health.circuit_threshold = 0;
    })
    .await;
    set_faults(&app, 0, &["stall:at=50"]).await;
    let stalled = app
        .submit_ok(&json!({"workflow": sleep_workflow(4.0, 8, 100)}))
        .await;
    app.wait_job(&stalled, "executing", Duration::from_secs(10), |j| {
        j["phase"] == "executing"
    })
    .await;
    let behind = app
        .submit_ok(&json!({"workflow": sleep_workflow(4.0, 8, 101)}))
        .await;
    app.wait_job(&behind, "pipelined", Duration::from_secs(10), |j| {
        j["phase"] == "pending"
    })
    .await;
    let job = app.wait_terminal(&behind).await;
    assert_eq!(job["attempts"][0]["error"]["code"], "displaced", "{job:#}");
    app.wait_terminal(&stalled).await;
    poll_until(
        "nothing of gantry's left on the backend",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            match sim_queue(&app, 0).await {
                (running, pending) if running.is_empty() && pending.is_empty() => Ok(()),
                left => Err(left),
            }
        },
    )
    .await;
    app.shutdown().await;
}
