//! `gantry bench routing`: what routing by warm models saves. Simulated backends whose
//! checkpoint loader costs `--cold-ms` unless their previous prompt loaded the same file
//! (ComfyUI keeps only its latest prompt's models, PROTOCOL.md section 6) run one mixed
//! batch of jobs over `--models` checkpoints, in a seeded random order, all submitted
//! at once; first with gantry's routing (`routing = "warm"`: a free backend takes a
//! queued job it is warm for, and a job goes to a backend warm for it), then with
//! `routing = "random"` on fresh simulators. Reports each run's total time, cold loads
//! (read from each job's profile: the loader node executed rather than cached) and the
//! ratio.

use crate::client::{http, submit};
use crate::process::Binary;
use crate::report::Results;
use crate::server::{backends_toml, ServerProc};
use crate::sims::Sims;
use crate::stats::Stats;
use crate::stream::{follow_events, follow_until_terminal};
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// What `gantry bench routing` runs (the command's flags, parsed by the cli).
pub struct Options {
    /// Simulated backends.
    pub backends: usize,
    /// Jobs in the batch.
    pub jobs: usize,
    /// Distinct checkpoints the batch uses.
    pub models: usize,
    /// What a checkpoint load costs when the backend's previous prompt used another.
    pub cold_ms: u64,
    /// What it costs when the previous prompt used the same one.
    pub warm_ms: u64,
    /// Sampler steps per job (50 ms each in the simulator).
    pub steps: u64,
    /// Seed of the batch's order of models.
    pub seed: u64,
}

/// One routing mode's run of the batch.
struct Run {
    total_s: f64,
    cold: usize,
    job_s: Stats,
}

fn workflow(model: &str, steps: u64, seed: u64) -> Value {
    json!({
        "3": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": steps, "cfg": 7, "sampler_name": "euler", "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": model}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "routing", "images": ["8", 0]}}
    })
}

/// The batch's models, in a reproducible random order (xorshift; no statistics needed).
fn order(a: &Options) -> Vec<usize> {
    let mut x = a.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..a.jobs)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % a.models as u64) as usize
        })
        .collect()
}

async fn run_mode(
    a: &Options,
    gantry: &Binary,
    routing: &str,
    models: &[String],
) -> anyhow::Result<Run> {
    let http = http()?;
    let sims = Sims::spawn_args(
        gantry,
        a.backends,
        1.0,
        &[
            "--loader-ms".into(),
            format!("{},{}", a.cold_ms, a.warm_ms),
            "--models".into(),
            models.join(","),
        ],
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let config = backends_toml(&sims.urls, &format!("routing = \"{routing}\""));
    let server = ServerProc::spawn(gantry, dir.path(), &config).await?;
    server.wait_backends(&http, a.backends).await?;
    let mut events = follow_events(&http, &server.url, 0).await?;
    let t0 = Instant::now();
    let mut ids = Vec::with_capacity(a.jobs);
    for (i, m) in order(a).into_iter().enumerate() {
        let body = json!({"workflow": workflow(&models[m], a.steps, i as u64)});
        ids.push(submit(&http, &server.url, &body).await?);
    }
    let limit = Duration::from_millis(a.cold_ms + 1000) * a.jobs as u32 + Duration::from_secs(60);
    let followed = follow_until_terminal(&mut events, &ids, limit).await?;
    let total_s = t0.elapsed().as_secs_f64();
    if followed.timed_out {
        bail!(
            "{routing}: only {} of {} jobs ended in {limit:?}",
            followed.done.len(),
            ids.len()
        );
    }
    let (mut cold, mut job_s) = (0, Vec::new());
    for id in &ids {
        let job: Value = http
            .get(format!("{}/v1/jobs/{id}", server.url))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if job["state"] != "succeeded" {
            bail!(
                "{routing}: job {id} ended {}: {}",
                job["state"],
                job["error"]
            );
        }
        let attempt = job["attempts"]
            .as_array()
            .and_then(|a| a.last())
            .context("a succeeded job without attempts")?;
        let loader = attempt["profile"]["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["id"] == "4"))
            .with_context(|| format!("job {id} has no profile of its loader"))?;
        cold += usize::from(loader["status"] == "completed");
        job_s.push(
            attempt["profile"]["execution_ms"]
                .as_f64()
                .unwrap_or(f64::NAN)
                / 1000.0,
        );
    }
    server.interrupt().await?;
    Ok(Run {
        total_s,
        cold,
        job_s: Stats::of(&job_s),
    })
}

pub async fn run(a: Options, gantry: &Binary) -> anyhow::Result<Results> {
    if a.backends == 0 || a.jobs == 0 || a.models == 0 {
        bail!("--backends, --jobs and --models must be at least 1");
    }
    let models: Vec<String> = (0..a.models)
        .map(|i| format!("checkpoint-{i}.safetensors"))
        .collect();
    let warm = run_mode(&a, gantry, "warm", &models).await?;
    let random = run_mode(&a, gantry, "random", &models).await?;
    let ratio = random.total_s / warm.total_s;
    let line = |name: &str, r: &Run| {
        format!(
            "{name:>6}: total {:.1} s, {} cold loads of {}, execution per job {}",
            r.total_s,
            r.cold,
            a.jobs,
            r.job_s.line("s")
        )
    };
    let json_of = |r: &Run| json!({"total_s": r.total_s, "cold_loads": r.cold, "job_s": r.job_s});
    Ok(Results {
        table: vec![
            format!(
                "{} jobs over {} checkpoints in a seeded random order, {} simulated backends, loads {} ms cold / {} ms warm, {} sampler steps",
                a.jobs, a.models, a.backends, a.cold_ms, a.warm_ms, a.steps
            ),
            line("warm", &warm),
            line("random", &random),
            format!("random / warm total time: x{ratio:.2}"),
        ],
        json: json!({
            "jobs": a.jobs,
            "models": a.models,
            "backends": a.backends,
            "cold_ms": a.cold_ms,
            "warm_ms": a.warm_ms,
            "warm": json_of(&warm),
            "random": json_of(&random),
            "random_over_warm": ratio,
        }),
    })
}
