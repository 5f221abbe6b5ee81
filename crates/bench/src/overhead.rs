//! `gantry bench overhead`: the same jobs straight to the simulators by a minimal direct
//! client (one worker per backend: submit, wait on the WebSocket, repeat), then through
//! gantry to fresh simulators of the same kind, twice: closed loop (one client worker per
//! backend, as the direct client) and backlog (every job submitted at once).
//!
//! Times of execution come from the simulators' own `/sim/runs` (µs), so both paths are
//! measured on the same clock at the same place.

use crate::client::{http, sleep_workflow, submit};
use crate::process::Binary;
use crate::report::Results;
use crate::server::{backends_toml, ServerProc};
use crate::sims::{idle_gaps, Run, Sims};
use crate::stats::Stats;
use crate::stream::{follow_events, Tracker};
use crate::time::{ms, now_us};
use anyhow::{bail, Context};
use gantry_comfy::client::Submitted;
use gantry_comfy::rest::{Graph, PromptRequest};
use gantry_comfy::ws::ServerMessage;
use gantry_comfy::{Client, SessionEvent};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::task::JoinSet;

/// What `gantry bench overhead` runs (the command's flags, parsed by the cli).
pub struct Options {
    /// Jobs per run.
    pub jobs: usize,
    /// Simulated backends.
    pub backends: usize,
    /// How long each job's work takes on the backend, in ms.
    pub job_ms: u64,
}

/// One job's timeline, in wall µs.
#[derive(Clone, Debug, Default)]
struct JobTimes {
    prompt_id: String,
    submit_us: i64,
    done_us: i64,
    ok: bool,
}

struct Mode {
    name: &'static str,
    wall_s: f64,
    jobs: Vec<JobTimes>,
    /// Per backend, what ran there.
    runs: Vec<Vec<Run>>,
    server_cpu_s: Option<f64>,
}

impl Mode {
    fn analyse(&self) -> Value {
        let runs: HashMap<&str, &Run> = self
            .runs
            .iter()
            .flatten()
            .map(|r| (r.prompt_id.as_str(), r))
            .collect();
        let mut start = Vec::new();
        let mut done = Vec::new();
        for j in self.jobs.iter().filter(|j| j.ok) {
            if let Some(r) = runs.get(j.prompt_id.as_str()) {
                start.push(ms(r.started_us - j.submit_us));
                done.push(ms(j.done_us - r.finished_us));
            }
        }
        let gaps = idle_gaps(&self.runs);
        json!({
            "mode": self.name,
            "wall_s": self.wall_s,
            "jobs": self.jobs.len(),
            "failed": self.jobs.iter().filter(|j| !j.ok).count(),
            "submit_to_start_ms": Stats::of(&start),
            "success_to_done_ms": Stats::of(&done),
            "idle_gap_ms": Stats::of(&gaps),
            "server_cpu_s": self.server_cpu_s,
        })
    }
}

pub async fn run(a: Options, gantry: &Binary) -> anyhow::Result<Results> {
    if a.jobs == 0 || a.backends == 0 {
        bail!("--jobs and --backends must be at least 1");
    }
    let http = http()?;
    eprintln!(
        "overhead: {} jobs of {} ms on {} backends",
        a.jobs, a.job_ms, a.backends
    );
    let direct = direct(&a, gantry, &http).await.context("direct run")?;
    eprintln!("  direct: {:.2} s", direct.wall_s);
    let closed = through_gantry(&a, gantry, &http, false)
        .await
        .context("gantry closed-loop run")?;
    eprintln!("  gantry closed loop: {:.2} s", closed.wall_s);
    let backlog = through_gantry(&a, gantry, &http, true)
        .await
        .context("gantry backlog run")?;
    eprintln!("  gantry backlog: {:.2} s", backlog.wall_s);

    let d = direct.analyse();
    let c = closed.analyse();
    let b = backlog.analyse();
    let p = |v: &Value, k: &str, q: &str| v[k][q].as_f64().unwrap_or(f64::NAN);
    let added_start_p50 = p(&c, "submit_to_start_ms", "p50") - p(&d, "submit_to_start_ms", "p50");
    let added_start_p99 = p(&c, "submit_to_start_ms", "p99") - p(&d, "submit_to_start_ms", "p99");
    let added_done_p50 = p(&c, "success_to_done_ms", "p50") - p(&d, "success_to_done_ms", "p50");
    let added_done_p99 = p(&c, "success_to_done_ms", "p99") - p(&d, "success_to_done_ms", "p99");
    let ratio_closed = closed.wall_s / direct.wall_s;
    let ratio_backlog = backlog.wall_s / direct.wall_s;
    let mut table = vec![
        format!(
            "{} jobs x {} ms on {} simulated backends (separate process)",
            a.jobs, a.job_ms, a.backends
        ),
        format!(
            "wall time: direct {:.3} s, gantry closed loop {:.3} s (x{:.4}), gantry backlog {:.3} s (x{:.4})",
            direct.wall_s, closed.wall_s, ratio_closed, backlog.wall_s, ratio_backlog
        ),
    ];
    for (name, v) in [
        ("direct", &d),
        ("gantry closed", &c),
        ("gantry backlog", &b),
    ] {
        table.push(format!("[{name}] failed: {}", v["failed"]));
        for key in ["submit_to_start_ms", "success_to_done_ms", "idle_gap_ms"] {
            if name == "gantry backlog" && key == "submit_to_start_ms" {
                continue; // includes the wait in gantry's queue
            }
            let s: Stats = Stats::from_json(&v[key]);
            table.push(format!("[{name}] {key}: {}", s.line("ms")));
        }
    }
    table.push(format!(
        "added by gantry: submit->start p50 {added_start_p50:+.3} ms, p99 {added_start_p99:+.3} ms; success->done p50 {added_done_p50:+.3} ms, p99 {added_done_p99:+.3} ms"
    ));
    if let (Some(c), Some(b)) = (closed.server_cpu_s, backlog.server_cpu_s) {
        table.push(format!(
            "server CPU: closed loop {c:.2} s, backlog {b:.2} s ({:.3} ms per job)",
            b * 1000.0 / a.jobs as f64
        ));
    }
    Ok(Results {
        table,
        json: json!({
            "jobs": a.jobs,
            "backends": a.backends,
            "job_ms": a.job_ms,
            "direct": d,
            "gantry_closed": c,
            "gantry_backlog": b,
            "wall_ratio_closed": ratio_closed,
            "wall_ratio_backlog": ratio_backlog,
            "added_submit_to_start_ms": {"p50": added_start_p50, "p99": added_start_p99},
            "added_success_to_done_ms": {"p50": added_done_p50, "p99": added_done_p99},
        }),
    })
}

/// One worker per backend: submit a job, wait for its success on the socket, repeat.
async fn direct(a: &Options, gantry: &Binary, http: &reqwest::Client) -> anyhow::Result<Mode> {
    let sims = Sims::spawn(gantry, a.backends, 1.0, &[]).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let mut sessions = Vec::new();
    for url in &sims.urls {
        let client = Client::new(url)?;
        let session = client.connect(false).await?;
        sessions.push((client, session));
    }
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    for (client, mut session) in sessions {
        let next = next.clone();
        let (n, job_ms) = (a.jobs, a.job_ms);
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(out);
                }
                let prompt = graph(sleep_workflow(job_ms, 5, i as u64))?;
                let request = PromptRequest {
                    prompt,
                    client_id: Some(session.client_id().to_owned()),
                    ..Default::default()
                };
                let submit_us = now_us();
                let pid = match client.submit(&request).await? {
                    Submitted::Accepted(acc) => acc.prompt_id,
                    Submitted::Rejected(r) => bail!("rejected: {:?}", r.error),
                };
                let ok = loop {
                    match session.next().await {
                        Some(SessionEvent::Message(ServerMessage::ExecutionSuccess(s)))
                            if s.prompt_id == pid =>
                        {
                            break true
                        }
                        Some(SessionEvent::Message(ServerMessage::ExecutionError(e)))
                            if e.prompt_id == pid =>
                        {
                            break false
                        }
                        Some(SessionEvent::Closed { .. }) | None => bail!("socket closed"),
                        _ => {}
                    }
                };
                out.push(JobTimes {
                    prompt_id: pid,
                    submit_us,
                    done_us: now_us(),
                    ok,
                });
            }
        });
    }
    let mut jobs = Vec::new();
    while let Some(r) = set.join_next().await {
        jobs.extend(r??);
    }
    let wall_s = t0.elapsed().as_secs_f64();
    let runs = sims.runs(http).await?;
    Ok(Mode {
        name: "direct",
        wall_s,
        jobs,
        runs,
        server_cpu_s: None,
    })
}

fn graph(v: Value) -> anyhow::Result<Graph> {
    match v {
        Value::Object(m) => Ok(m),
        _ => bail!("a workflow is a JSON object"),
    }
}

async fn through_gantry(
    a: &Options,
    gantry: &Binary,
    http: &reqwest::Client,
    backlog: bool,
) -> anyhow::Result<Mode> {
    let sims = Sims::spawn(gantry, a.backends, 1.0, &[]).await?;
    let dir = tempfile::tempdir()?;
    let server = ServerProc::spawn(gantry, dir.path(), &backends_toml(&sims.urls, "")).await?;
    server.wait_backends(http, a.backends).await?;
    let tracker = Tracker::spawn(follow_events(http, &server.url, 0).await?);
    let cpu0 = server.cpu_seconds();
    let t0 = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    // Closed loop: one worker per backend, as the direct client. Backlog: enough
    // submitters to queue everything at once.
    let workers = if backlog { 16 } else { a.backends };
    for _ in 0..workers {
        let (next, http, url, tracker) = (
            next.clone(),
            http.clone(),
            server.url.clone(),
            tracker.clone(),
        );
        let (n, job_ms) = (a.jobs, a.job_ms);
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(out);
                }
                let body = json!({"workflow": sleep_workflow(job_ms, 5, i as u64)});
                let submit_us = now_us();
                let id = submit(&http, &url, &body).await?;
                let outcome = if backlog {
                    None
                } else {
                    Some(Tracker::wait(&tracker, &id).await?)
                };
                out.push((id, submit_us, outcome));
            }
        });
    }
    let mut submitted = Vec::new();
    while let Some(r) = set.join_next().await {
        submitted.extend(r??);
    }
    let mut jobs = Vec::new();
    for (id, submit_us, outcome) in submitted {
        let (ok, done_us) = match outcome {
            Some(o) => o,
            None => Tracker::wait(&tracker, &id).await?,
        };
        let prompt_id = tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .prompt_of
            .get(&id)
            .cloned()
            .unwrap_or_default();
        jobs.push(JobTimes {
            prompt_id,
            submit_us,
            done_us,
            ok,
        });
    }
    let wall_s = t0.elapsed().as_secs_f64();
    let server_cpu_s = match (cpu0, server.cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let runs = sims.runs(http).await?;
    Ok(Mode {
        name: if backlog {
            "gantry backlog"
        } else {
            "gantry closed"
        },
        wall_s,
        jobs,
        runs,
        server_cpu_s,
    })
}
