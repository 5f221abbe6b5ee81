//! Simulators in a process of their own (`gantry sim --count N`), and what they ran.

use crate::process::{read_announced, Binary};
use anyhow::Context;
use serde_json::Value;
use std::process::Stdio;
use tokio::process::Child;

/// Simulators in a process of their own.
pub struct Sims {
    /// Held so the simulators live as long as this handle (killed on drop).
    _process: Child,
    pub urls: Vec<String>,
}

impl Sims {
    pub async fn spawn(
        gantry: &Binary,
        count: usize,
        speed: f64,
        faults: &[String],
    ) -> anyhow::Result<Sims> {
        let args: Vec<String> = faults
            .iter()
            .flat_map(|f| ["--fault".to_owned(), f.clone()])
            .collect();
        Self::spawn_args(gantry, count, speed, &args).await
    }

    /// As `spawn`, with `args` given to `gantry sim` as they are.
    pub async fn spawn_args(
        gantry: &Binary,
        count: usize,
        speed: f64,
        args: &[String],
    ) -> anyhow::Result<Sims> {
        let mut cmd = gantry.command();
        cmd.args(["sim", "--listen", "127.0.0.1:0", "--count"])
            .arg(count.to_string())
            .arg("--speed")
            .arg(speed.to_string())
            .args(args);
        let mut child = cmd
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the simulators")?;
        let urls = read_announced(&mut child, "gantry sim: a ComfyUI server on ", count).await?;
        Ok(Sims {
            _process: child,
            urls,
        })
    }

    /// Every prompt each simulator ran, one list per simulator in `urls` order.
    pub async fn runs(&self, http: &reqwest::Client) -> anyhow::Result<Vec<Vec<Run>>> {
        let mut all = Vec::new();
        for url in &self.urls {
            let v: Value = http
                .get(format!("{url}/sim/runs"))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            // No list at all would read as a simulator that ran nothing: every figure
            // made from it would be empty, without a word.
            let runs = v["runs"]
                .as_array()
                .with_context(|| format!("{url}/sim/runs answered no runs: {v}"))?
                .iter()
                .map(|r| Run {
                    prompt_id: r["prompt_id"].as_str().unwrap_or_default().to_owned(),
                    started_us: r["started_us"].as_i64().unwrap_or(0),
                    finished_us: r["finished_us"].as_i64().unwrap_or(0),
                    status: r["status"].as_str().unwrap_or_default().to_owned(),
                })
                .collect();
            all.push(runs);
        }
        Ok(all)
    }
}

#[derive(Clone, Debug)]
pub struct Run {
    pub prompt_id: String,
    pub started_us: i64,
    pub finished_us: i64,
    /// How it ended: `success`, `error` (an interrupt included).
    pub status: String,
}

/// Idle gaps in ms on each backend: from the end of one prompt to the start of the next.
pub fn idle_gaps(runs: &[Vec<Run>]) -> Vec<f64> {
    let mut gaps = Vec::new();
    for backend in runs {
        let mut sorted: Vec<&Run> = backend.iter().collect();
        sorted.sort_by_key(|r| r.started_us);
        for pair in sorted.windows(2) {
            gaps.push((pair[1].started_us - pair[0].finished_us) as f64 / 1000.0);
        }
    }
    gaps
}
