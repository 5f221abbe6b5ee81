//! The whole server on the PostgreSQL store: jobs run, fail over, cancel and stream as on
//! the embedded one, and outputs land in the shared artifacts folder.

use crate::support::{names, sleep_workflow, spawn_app_pg, tiny_workflow};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_cancel_and_stream_on_postgres() {
    let Some(app) = spawn_app_pg(2, |_| {}).await else {
        return;
    };
    let bodies: Vec<_> = (0..6)
        .map(|i| json!({"workflow": tiny_workflow(&format!("pg{i}"))}))
        .collect();
    let ids: Vec<String> =
        futures_util::future::join_all(bodies.iter().map(|b| app.submit_ok(b))).await;
    let slow = app
        .submit_ok(&json!({"workflow": sleep_workflow(200.0, 100, 1)}))
        .await;
    for id in &ids {
        let job = app.wait_terminal(id).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        let url = job["outputs"][0]["url"].as_str().unwrap();
        let png = app
            .http
            .get(format!("{}{url}", app.url))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        let sha = job["outputs"][0]["sha256"].as_str().unwrap();
        let artifacts = app.server.engine.config().artifacts.clone().unwrap();
        assert!(
            artifacts
                .join("outputs")
                .join(&sha[..2])
                .join(sha)
                .is_file(),
            "output {sha} is not in the artifacts folder"
        );
    }
    app.wait_job(
        &slow,
        "slow job running",
        crate::support::TERMINAL_DEADLINE,
        |j| j["state"] == "running",
    )
    .await;
    let (status, _) = app.cancel(&slow).await;
    assert!(status == 200 || status == 202, "{status}");
    let job = app.wait_terminal(&slow).await;
    assert_eq!(job["state"], "cancelled", "{job:#}");

    // The job's stream is its stored history, from the first event to the terminal one.
    let events = app.read_sse(&ids[0]).await;
    let persisted: Vec<&str> = names(events.iter().filter(|e| e.id.is_some())).to_vec();
    assert_eq!(persisted.first(), Some(&"queued"), "{persisted:?}");
    assert_eq!(persisted.last(), Some(&"succeeded"), "{persisted:?}");
    let seqs: Vec<i64> = events
        .iter()
        .filter_map(|e| e.id.as_deref())
        .map(|id| id.parse().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    app.shutdown().await;
}
