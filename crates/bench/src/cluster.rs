//! `gantry bench cluster`: the same fully cached jobs through one and then several
//! `gantry serve` coordinators on one PostgreSQL database, each in its own process,
//! sharing the simulated backends by lease. For each count: dispatch and job latency one
//! job at a time on an idle farm (what orchestration adds), then jobs per second and the
//! same latencies under a closed-loop load (where they include waiting for a backend).
//! Dispatch latency is submit answered -> `dispatched` seen on the farm's event stream.

use crate::client::{http, sleep_workflow, submit};
use crate::process::Binary;
use crate::report::Results;
use crate::server::{backends_toml, ServerProc};
use crate::sims::Sims;
use crate::stats::Stats;
use crate::stream::{follow_events, Tracker};
use crate::time::now_us;
use anyhow::bail;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Jobs run one at a time on the idle farm before the load.
const IDLE_JOBS: usize = 200;

/// What `gantry bench cluster` runs (the command's flags, parsed by the cli).
pub struct Options {
    /// The PostgreSQL database to run on (a fresh schema is made in it and dropped).
    pub store: String,
    /// Jobs per run.
    pub jobs: usize,
    /// Simulated backends, shared by the coordinators.
    pub backends: usize,
    /// Client connections submitting at once, spread over the coordinators.
    pub submitters: usize,
    /// Coordinator counts to measure, one run each.
    pub coordinators: Vec<usize>,
}

pub async fn run(a: Options, gantry: &Binary) -> anyhow::Result<Results> {
    if a.jobs == 0 || a.backends == 0 || a.submitters == 0 || a.coordinators.contains(&0) {
        bail!("--jobs, --backends, --submitters and each --coordinators must be at least 1");
    }
    let sims = Sims::spawn(gantry, a.backends, 1.0, &[]).await?;
    let mut table = vec![format!(
        "{} fully cached jobs per run, {} simulated backends (separate process), {} submitters, postgres store",
        a.jobs, a.backends, a.submitters
    )];
    let mut runs = Vec::new();
    for &n in &a.coordinators {
        let r = one(&a, gantry, &sims, n).await?;
        table.push(format!(
            "{n} coordinator(s), idle farm, one job at a time: dispatch {}; job {}",
            stats_line(&r["idle_dispatch_ms"]),
            stats_line(&r["idle_job_ms"]),
        ));
        table.push(format!(
            "{n} coordinator(s), loaded: {:.0} jobs/s sustained, {:.0} overall; dispatch {}; job {}",
            r["jobs_per_s_sustained"].as_f64().unwrap_or(f64::NAN),
            r["jobs_per_s_overall"].as_f64().unwrap_or(f64::NAN),
            stats_line(&r["dispatch_ms"]),
            stats_line(&r["job_ms"]),
        ));
        runs.push(r);
    }
    Ok(Results {
        table,
        json: json!({"jobs": a.jobs, "backends": a.backends, "submitters": a.submitters, "runs": runs}),
    })
}

fn stats_line(v: &Value) -> String {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    format!("p50 {:.2} / p99 {:.2} ms", f("p50"), f("p99"))
}

async fn one(a: &Options, gantry: &Binary, sims: &Sims, n: usize) -> anyhow::Result<Value> {
    let schema = gantry_store::testing::FreshSchema::create_on(&a.store).await;
    let dir = tempfile::tempdir()?;
    let http = http()?;
    let mut coordinators = Vec::new();
    for i in 0..n {
        let extra = format!(
            "store = {:?}\nartifacts = {:?}\ncoordinator = \"c{i}\"\nlease = \"5s\"",
            schema.url,
            dir.path().join("artifacts").display().to_string(),
        );
        let data = dir.path().join(format!("c{i}"));
        coordinators
            .push(ServerProc::spawn(gantry, &data, &backends_toml(&sims.urls, &extra)).await?);
    }
    // Every backend leased and connected somewhere.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut up = 0;
        for c in &coordinators {
            let v: Value = http
                .get(format!("{}/v1/backends", c.url))
                .send()
                .await?
                .json()
                .await?;
            up += v["backends"]
                .as_array()
                .map(|l| {
                    l.iter()
                        .filter(|b| matches!(b["status"].as_str(), Some("idle" | "busy")))
                        .count()
                })
                .unwrap_or(0);
        }
        if up >= a.backends {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {up} of {} backends connected after 120 s", a.backends);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tracker = Tracker::spawn(follow_events(&http, &coordinators[0].url, 0).await?);
    let workflow = sleep_workflow(0, 1, 0);
    // Warm every backend's cache, as `bench throughput` does.
    let mut warm = Vec::new();
    for i in 0..a.backends * 2 {
        let url = &coordinators[i % n].url;
        warm.push(submit(&http, url, &json!({ "workflow": workflow })).await?);
    }
    for id in warm {
        Tracker::wait(&tracker, &id).await?;
    }
    // One job at a time on an idle farm: what orchestration alone adds to a job.
    let (mut idle_dispatch, mut idle_job) = (Vec::new(), Vec::new());
    for i in 0..IDLE_JOBS {
        let url = &coordinators[i % n].url;
        let id = submit(&http, url, &json!({ "workflow": workflow })).await?;
        let accepted_us = now_us();
        let (ok, done_us) = Tracker::wait(&tracker, &id).await?;
        if !ok {
            bail!("job {id} did not succeed");
        }
        let dispatched = tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dispatched_us
            .get(&id)
            .copied();
        if let Some(d) = dispatched {
            idle_dispatch.push((d - accepted_us).max(0) as f64 / 1000.0);
        }
        idle_job.push((done_us - accepted_us) as f64 / 1000.0);
    }
    let urls: Vec<String> = coordinators.iter().map(|c| c.url.clone()).collect();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    for s in 0..a.submitters {
        let (next, http, url, tracker, workflow) = (
            next.clone(),
            http.clone(),
            urls[s % n].clone(),
            tracker.clone(),
            workflow.clone(),
        );
        let jobs = a.jobs;
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= jobs {
                    return Ok::<_, anyhow::Error>(out);
                }
                let id = submit(&http, &url, &json!({ "workflow": workflow })).await?;
                let accepted_us = now_us();
                let (ok, done_us) = Tracker::wait(&tracker, &id).await?;
                if !ok {
                    bail!("job {id} did not succeed");
                }
                out.push((id, accepted_us, done_us, t0.elapsed().as_secs_f64()));
            }
        });
    }
    let mut results = Vec::new();
    while let Some(r) = set.join_next().await {
        results.extend(r??);
    }
    let wall = t0.elapsed().as_secs_f64();
    let (dispatch, job): (Vec<f64>, Vec<f64>) = {
        let s = tracker.lock().unwrap_or_else(|p| p.into_inner());
        results
            .iter()
            .filter_map(|(id, accepted, done, _)| {
                let d = *s.dispatched_us.get(id)?;
                Some((
                    ((d - accepted).max(0)) as f64 / 1000.0,
                    (done - accepted) as f64 / 1000.0,
                ))
            })
            .unzip()
    };
    let mut finished: Vec<f64> = results.iter().map(|r| r.3).collect();
    finished.sort_by(f64::total_cmp);
    let k = finished.len();
    let (lo, hi) = (finished[k / 10], finished[(k * 9 / 10).min(k - 1)]);
    let sustained = if hi > lo {
        (k * 8 / 10) as f64 / (hi - lo)
    } else {
        f64::NAN
    };
    for c in coordinators {
        c.interrupt().await?;
    }
    Ok(json!({
        "coordinators": n,
        "jobs_per_s_sustained": sustained,
        "jobs_per_s_overall": a.jobs as f64 / wall,
        "wall_s": wall,
        "dispatch_ms": Stats::of(&dispatch),
        "job_ms": Stats::of(&job),
        "idle_dispatch_ms": Stats::of(&idle_dispatch),
        "idle_job_ms": Stats::of(&idle_job),
    }))
}
