//! `gantry bench throughput`: fully cached jobs (ComfyUI answers them from its cache at
//! once) through many simulated backends, over the real HTTP and WebSocket protocol, with
//! the embedded store. Reports jobs per second sustained and, when `perf` is installed,
//! where the server's CPU time goes.

use crate::client::{http, sleep_workflow, submit};
use crate::process::Binary;
use crate::report::Results;
use crate::server::{backends_toml, ServerProc};
use crate::sims::Sims;
use crate::stats::Stats;
use crate::stream::{follow_events, Tracker};
use anyhow::{bail, Context};
use serde_json::json;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::task::JoinSet;

/// What `gantry bench throughput` runs (the command's flags, parsed by the cli).
pub struct Options {
    /// Jobs to run.
    pub jobs: usize,
    /// Simulated backends.
    pub backends: usize,
    /// Client connections submitting at once.
    pub submitters: usize,
    /// Then profile a second server with `perf record` under a quarter of the load.
    pub profile: bool,
}

pub async fn run(a: Options, gantry: &Binary) -> anyhow::Result<Results> {
    if a.jobs == 0 || a.backends == 0 || a.submitters == 0 {
        bail!("--jobs, --backends and --submitters must be at least 1");
    }
    let http = http()?;
    let sims = Sims::spawn(gantry, a.backends, 1.0, &[]).await?;
    let dir = tempfile::tempdir()?;
    let server = ServerProc::spawn(gantry, dir.path(), &backends_toml(&sims.urls, "")).await?;
    server.wait_backends(&http, a.backends).await?;
    let workflow = sleep_workflow(0, 1, 0);
    // Warm every backend's cache: the first run of the workflow executes, later ones
    // come from the cache.
    let tracker = Tracker::spawn(follow_events(&http, &server.url, 0).await?);
    let mut ids = Vec::new();
    for _ in 0..a.backends * 2 {
        ids.push(submit(&http, &server.url, &json!({ "workflow": workflow })).await?);
    }
    for id in ids {
        Tracker::wait(&tracker, &id).await?;
    }
    let rss_before = server.rss_kib();
    let cpu0 = server.cpu_seconds();
    let t0 = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..a.submitters {
        let (next, http, url, tracker, workflow) = (
            next.clone(),
            http.clone(),
            server.url.clone(),
            tracker.clone(),
            workflow.clone(),
        );
        let n = a.jobs;
        set.spawn(async move {
            let mut latencies = Vec::new();
            let mut finished = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>((latencies, finished));
                }
                let t = Instant::now();
                let id = submit(&http, &url, &json!({ "workflow": workflow })).await?;
                let (ok, _) = Tracker::wait(&tracker, &id).await?;
                if !ok {
                    bail!("job {id} did not succeed");
                }
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                finished.push(t0.elapsed().as_secs_f64());
            }
        });
    }
    let mut latencies = Vec::new();
    let mut finished = Vec::new();
    while let Some(r) = set.join_next().await {
        let (l, f) = r??;
        latencies.extend(l);
        finished.extend(f);
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = match (cpu0, server.cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let rss_after = server.rss_kib();
    drop(server);
    let profile = if a.profile {
        profile(&a, gantry, &sims, &workflow).await?
    } else {
        Vec::new()
    };
    // Sustained rate: the middle 80% of completions, away from ramp-up and tail.
    finished.sort_by(f64::total_cmp);
    let n = finished.len();
    let (lo, hi) = (finished[n / 10], finished[(n * 9 / 10).min(n - 1)]);
    let sustained = if hi > lo {
        (n * 8 / 10) as f64 / (hi - lo)
    } else {
        f64::NAN
    };
    let lat = Stats::of(&latencies);
    let mut table = vec![
        format!(
            "{} fully cached jobs, {} simulated backends (separate process), {} submitters, embedded store",
            a.jobs, a.backends, a.submitters
        ),
        format!(
            "throughput: {:.0} jobs/s sustained (middle 80%), {:.0} jobs/s overall ({:.2} s)",
            sustained,
            a.jobs as f64 / wall,
            wall
        ),
        format!("job latency (submit -> succeeded seen): {}", lat.line("ms")),
    ];
    if let Some(cpu) = cpu {
        table.push(format!(
            "server CPU: {cpu:.2} s = {:.3} ms per job ({:.0}% of one core)",
            cpu * 1000.0 / a.jobs as f64,
            cpu / wall * 100.0
        ));
    }
    if let (Some(b), Some(f)) = (rss_before, rss_after) {
        table.push(format!(
            "server RSS: {} MiB before, {} MiB after",
            b / 1024,
            f / 1024
        ));
    }
    if !profile.is_empty() {
        table.push("where the server's CPU time goes (perf, self time):".into());
        table.extend(profile.iter().map(|l| format!("  {l}")));
    }
    drop(sims);
    Ok(Results {
        table,
        json: json!({
            "jobs": a.jobs,
            "backends": a.backends,
            "submitters": a.submitters,
            "jobs_per_s_sustained": sustained,
            "jobs_per_s_overall": a.jobs as f64 / wall,
            "wall_s": wall,
            "latency_ms": lat,
            "server_cpu_s": cpu,
            "server_rss_kib": {"before": rss_before, "after": rss_after},
            "profile": profile,
        }),
    })
}

/// Run `jobs` jobs on a second server started under `perf record`, and name the top items
/// by self time. Sampling slows the server, so this run's rate is not the one reported.
async fn profile(
    a: &Options,
    gantry: &Binary,
    sims: &Sims,
    workflow: &serde_json::Value,
) -> anyhow::Result<Vec<String>> {
    let have_perf = tokio::process::Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !have_perf {
        return Ok(vec!["(perf is not installed: no profile)".into()]);
    }
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("perf.data");
    let wrapper: Vec<String> = ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-o"]
        .iter()
        .map(|s| s.to_string())
        .chain([data.display().to_string(), "--".into()])
        .collect();
    let http = http()?;
    let server = ServerProc::spawn_wrapped(
        gantry,
        &dir.path().join("db"),
        &backends_toml(&sims.urls, ""),
        &wrapper,
    )
    .await?;
    server.wait_backends(&http, a.backends).await?;
    let tracker = Tracker::spawn(follow_events(&http, &server.url, 0).await?);
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    let n = (a.jobs / 4).max(1);
    for _ in 0..a.submitters {
        let (next, http, url, tracker, workflow) = (
            next.clone(),
            http.clone(),
            server.url.clone(),
            tracker.clone(),
            workflow.clone(),
        );
        set.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let id = submit(&http, &url, &json!({ "workflow": workflow })).await?;
                Tracker::wait(&tracker, &id).await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    server.interrupt().await?;
    let out = tokio::process::Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "dso,symbol",
            "--percent-limit",
            "1",
            "-g",
            "none",
            "-i",
        ])
        .arg(&data)
        .output()
        .await
        .context("perf report")?;
    // A failed report printed nothing to parse: say so in the table rather than show an
    // empty profile.
    if !out.status.success() {
        return Ok(vec![format!(
            "(perf report failed, {}: {})",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )]);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.trim_start()
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
        .take(25)
        .map(|l| {
            let mut line = l.split_whitespace().collect::<Vec<_>>().join(" ");
            line.truncate(140);
            line
        })
        .collect())
}
