//! The farm of a chaos run: its coordinators and their kills, the simulators' faults,
//! and what the run asks of them (ready, connected, anything left in a queue).

use crate::server::ServerProc;
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One coordinator process, and where it keeps its files.
pub(super) struct Coordinator {
    pub(super) id: String,
    pub(super) data: PathBuf,
    pub(super) proc: Option<ServerProc>,
}

/// A kill and the restart after it.
#[derive(Debug)]
pub(super) struct Kill {
    pub(super) coordinator: String,
    /// When the SIGKILL was sent, wall ms.
    pub(super) at_ms: i64,
    /// Jobs seen succeeded when it came.
    pub(super) succeeded: usize,
    pub(super) acked: usize,
    /// From the new spawn to the `serving on` line, and to `/healthz` answering 200.
    pub(super) serving_ms: f64,
    pub(super) healthy_ms: f64,
    /// When the new process answered `/healthz`, wall ms.
    pub(super) ready_ms: i64,
}

pub(super) async fn set_faults(
    http: &reqwest::Client,
    sim: &str,
    specs: &[&str],
) -> anyhow::Result<()> {
    http.post(format!("{sim}/sim/faults"))
        .json(specs)
        .send()
        .await?
        .error_for_status()
        .with_context(|| format!("cannot set the faults of {sim}"))?;
    Ok(())
}

/// Poll `/healthz` until it answers 200.
pub(super) async fn healthy(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{url}/healthz did not answer 200 within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The prompts still in a simulator's queue 30 s on: (simulator, prompt id or what
/// went wrong asking).
pub(super) async fn left_on(http: &reqwest::Client, sims: &[String]) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut left = Vec::new();
        for url in sims {
            let q: Value = match http.get(format!("{url}/queue")).send().await {
                // What went wrong is kept: it ends up in the problem's text.
                Ok(r) => r
                    .json()
                    .await
                    .unwrap_or_else(|e| json!({"error": e.to_string()})),
                Err(e) => json!({"error": e.to_string()}),
            };
            if q.get("queue_running").is_none() {
                left.push((url.clone(), format!("no queue: {q}")));
                continue;
            }
            for key in ["queue_running", "queue_pending"] {
                for item in q[key].as_array().into_iter().flatten() {
                    left.push((url.clone(), item[1].as_str().unwrap_or("?").to_owned()));
                }
            }
        }
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until every backend is connected on some coordinator.
pub(super) async fn wait_connected(
    http: &reqwest::Client,
    coords: &[Coordinator],
    n: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut up = 0;
        for proc in coords.iter().filter_map(|c| c.proc.as_ref()) {
            let v: Value = http
                .get(format!("{}/v1/backends", proc.url))
                .send()
                .await?
                .json()
                .await?;
            up += v["backends"].as_array().map_or(0, |l| {
                l.iter()
                    .filter(|b| matches!(b["status"].as_str(), Some("idle" | "busy")))
                    .count()
            });
        }
        if up >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {up} of {n} backends connected after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
