//! `gantry demo`: the whole system in one process. Three simulated ComfyUI backends (the
//! third one faulty), the engine with its embedded store, and a client that submits sample
//! workflows through the real HTTP API, so everything a user would see is real.

use anyhow::Context;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::time::Instant;

const TXT2IMG: &str = include_str!("../../../fixtures/workflows/txt2img.json");

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Address to serve the API on.
    #[arg(long, default_value = gantry_server::config::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Submit this many jobs (all at once) instead of a trickle without end.
    #[arg(long)]
    jobs: Option<u32>,
    /// With --jobs: wait for every job, print a summary and exit (0 only if all succeeded).
    #[arg(long, requires = "jobs")]
    exit_when_done: bool,
    /// Run the simulated backends this many times faster than a real GPU would.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Time between two jobs of the trickle.
    #[arg(long, default_value = "2s", value_parser = humantime_duration)]
    interval: Duration,
    /// Keep the store and outputs here (a temporary folder by default).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    gantry_server::config::parse_duration("--interval", s).map_err(|e| e.to_string())
}

/// A sample job: text-to-image with a fresh seed, or a small image pipeline.
fn sample(n: u64) -> anyhow::Result<Value> {
    let mut workflow: Value = serde_json::from_str(TXT2IMG).context("the built-in workflow")?;
    workflow["3"]["inputs"]["seed"] = json!(rand::random::<u32>());
    workflow["3"]["inputs"]["steps"] = json!(8 + (n % 3) * 6);
    if n % 4 == 3 {
        workflow["4"]["inputs"]["ckpt_name"] = json!("sd_xl_base_1.0.safetensors");
    }
    Ok(json!({ "workflow": workflow, "metadata": { "demo": n } }))
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let temp = tempfile::tempdir().context("cannot make a temporary data dir")?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_owned());
    let mut sims = Vec::new();
    let specs: [(&str, &[&str]); 3] = [
        ("gpu-1", &[]),
        ("gpu-2", &[]),
        ("gpu-3", &["error:class=KSampler,p=0.3"]),
    ];
    let mut config = gantry_server::Config::new(args.listen, data_dir.clone());
    for (idx, (name, faults)) in specs.iter().enumerate() {
        let sim = gantry_sim::spawn(gantry_sim::SimConfig {
            listen: "127.0.0.1:0".parse()?,
            speed: args.speed,
            faults: faults.iter().map(|f| f.to_string()).collect(),
            seed: idx as u64 + 1,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot start simulated backend {name}"))?;
        config
            .backends
            .push(gantry_server::BackendConfig::parse(&format!(
                "{name}={}",
                sim.url()
            ))?);
        sims.push(sim);
    }
    let server = gantry_server::Server::start(config)
        .await
        .context("cannot start gantry")?;
    let base = server.url();
    println!("gantry demo: API on {base}, data in {}", data_dir.display());
    println!("  monitor: {base}/  (open it in a browser)");
    for (sim, (name, faults)) in sims.iter().zip(specs) {
        let note = if faults.is_empty() {
            String::new()
        } else {
            format!("  (faulty: {})", faults.join(", "))
        };
        println!("  backend {name}: simulated ComfyUI at {}{note}", sim.url());
    }
    println!("  look:  curl {base}/v1/backends");
    println!("         curl '{base}/v1/jobs?limit=5'");
    println!("         curl -N {base}/v1/jobs/JOB_ID/events");

    let http = reqwest::Client::new();
    let outcome = match args.jobs {
        Some(n) => run_batch(&http, &base, n, args.exit_when_done).await,
        None => trickle(&http, &base, args.interval).await,
    };
    server.shutdown().await;
    for sim in sims {
        sim.shutdown().await;
    }
    outcome
}

async fn submit(http: &reqwest::Client, base: &str, n: u64) -> anyhow::Result<String> {
    let resp = http
        .post(format!("{base}/v1/jobs"))
        .json(&sample(n)?)
        .send()
        .await
        .context("submitting a demo job")?;
    let status = resp.status();
    let body: Value = resp.json().await.context("reading the submit answer")?;
    if status.as_u16() != 202 {
        anyhow::bail!("the demo job was refused ({status}): {body}");
    }
    // An answer without an id was taken as an empty one, and the batch then polled
    // `/v1/jobs/` for it.
    body["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("the demo job's answer has no id: {body}"))
}

async fn trickle(http: &reqwest::Client, base: &str, interval: Duration) -> anyhow::Result<()> {
    println!(
        "submitting a job every {} (Ctrl+C stops)",
        humantime_fmt(interval)
    );
    let mut tick = tokio::time::interval(interval);
    for n in 0.. {
        tokio::select! {
            // A failure to listen answers at once: it ended the demo as a Ctrl+C would.
            done = tokio::signal::ctrl_c() => {
                done.context("waiting for Ctrl+C")?;
                return Ok(());
            }
            _ = tick.tick() => {
                let id = submit(http, base, n).await?;
                println!("  submitted job {id}");
            }
        }
    }
    Ok(())
}

fn humantime_fmt(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

async fn run_batch(
    http: &reqwest::Client,
    base: &str,
    n_jobs: u32,
    exit_when_done: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut ids = Vec::new();
    for n in 0..n_jobs {
        ids.push(submit(http, base, u64::from(n)).await?);
    }
    println!("submitted {n_jobs} jobs");
    if !exit_when_done {
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl+C")?;
        return Ok(());
    }
    let mut done: Vec<Value> = Vec::new();
    let mut pending = ids;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !pending.is_empty() {
        tokio::select! {
            done = tokio::signal::ctrl_c() => {
                done.context("waiting for Ctrl+C")?;
                anyhow::bail!("interrupted with {} jobs unfinished", pending.len())
            }
            _ = tick.tick() => {}
        }
        let mut still = Vec::new();
        for id in pending {
            let job: Value = http
                .get(format!("{base}/v1/jobs/{id}"))
                .send()
                .await?
                .json()
                .await?;
            match job["state"].as_str() {
                Some("succeeded" | "failed" | "cancelled") => done.push(job),
                _ => still.push(id),
            }
        }
        pending = still;
    }
    let count = |state: &str| done.iter().filter(|j| j["state"] == state).count();
    let retries: usize = done
        .iter()
        .map(|j| {
            j["attempts"]
                .as_array()
                .map_or(0, |a| a.len().saturating_sub(1))
        })
        .sum();
    let succeeded = count("succeeded");
    println!(
        "demo: {succeeded} succeeded, {} failed, {} cancelled in {:.1} s ({retries} retries)",
        count("failed"),
        count("cancelled"),
        started.elapsed().as_secs_f64()
    );
    for job in done.iter().filter(|j| j["state"] != "succeeded") {
        println!(
            "  job {} {}: {}",
            job["id"], job["state"], job["error"]["message"]
        );
    }
    if succeeded != done.len() {
        anyhow::bail!("not every demo job succeeded");
    }
    Ok(())
}
