//! The API as the benchmarks' client uses it: the HTTP client, a submit, the workflow
//! most scenarios send.

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// POST a job; answers its id.
pub async fn submit(http: &reqwest::Client, server: &str, body: &Value) -> anyhow::Result<String> {
    let resp = http
        .post(format!("{server}/v1/jobs"))
        .json(body)
        .send()
        .await
        .context("submit")?;
    let status = resp.status();
    let v: Value = resp.json().await.context("submit answer")?;
    if !status.is_success() {
        bail!("submit refused ({status}): {v}");
    }
    v["id"]
        .as_str()
        .map(str::to_owned)
        .context("submit answer has no id")
}

/// A small image workflow whose middle node runs for `ms` (GantrySleep) with `steps`
/// progress steps; `seed` keeps it from the cache, the same seed makes it fully cached.
pub fn sleep_workflow(ms: u64, steps: u64, seed: u64) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "GantrySleep", "inputs": {"image": ["1", 0], "seconds": ms as f64 / 1000.0, "steps": steps, "seed": seed}},
        "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["2", 0]}}
    })
}

/// HTTP client for benchmarks: no pool limit, no proxy. (Its build error used to be
/// dropped for a default client, which goes through any proxy the environment names:
/// the run would have measured the proxy.)
pub fn http() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .build()
        .context("cannot build the benchmarks' HTTP client")
}
