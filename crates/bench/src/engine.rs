//! `gantry bench engine`: the engine alone. In-process backends finish every prompt the
//! moment they get it (no HTTP, no WebSocket), and jobs are submitted through the engine's
//! own entry point, so what is measured is the store (each job committed before its
//! submit returns), the scheduler and the event bus: the figure to hold against general
//! job queues.

use crate::client::sleep_workflow;
use crate::report::Results;
use crate::stats::Stats;
use anyhow::{bail, Context};
use gantry_core::{JobSpec, JobState, Timeouts, Workflow};
use gantry_server::{BackendConfig, Config, Server};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// What `gantry bench engine` runs (the command's flags, parsed by the cli).
pub struct Options {
    /// Jobs to run.
    pub jobs: usize,
    /// In-process backends.
    pub backends: usize,
    /// Tasks submitting at once.
    pub submitters: usize,
}

pub async fn run(a: Options) -> anyhow::Result<Results> {
    if a.jobs == 0 || a.backends == 0 || a.submitters == 0 {
        bail!("--jobs, --backends and --submitters must be at least 1");
    }
    let workflow = Workflow::parse(&sleep_workflow(0, 1, 0)).context("workflow")?;
    let classes: Vec<String> = workflow.nodes().map(|(_, c)| c.to_owned()).collect();
    let dir = tempfile::tempdir()?;
    let mut config = Config::new("127.0.0.1:0".parse()?, dir.path().join("data"));
    config.backends = (0..a.backends)
        .map(|i| BackendConfig::instant(&format!("i{i}"), classes.clone()))
        .collect();
    let server = Server::start(config).await.context("start the engine")?;
    let engine = server.engine.clone();
    let spec = JobSpec {
        workflow,
        priority: 0,
        max_attempts: 3,
        tags: Vec::new(),
        timeouts: Timeouts::default(),
        idempotency_key: None,
        metadata: Default::default(),
        owner: None,
        attachments: Vec::new(),
        callback: None,
        command: None,
    };
    let t0 = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..a.submitters {
        let (engine, spec, next, n) = (engine.clone(), spec.clone(), next.clone(), a.jobs);
        set.spawn(async move {
            let mut acks = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let t = Instant::now();
                engine.submit(spec.clone(), "bench").await?;
                acks.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, anyhow::Error>(acks)
        });
    }
    let mut acks = Vec::new();
    while let Some(r) = set.join_next().await {
        acks.extend(r??);
    }
    let submitted = t0.elapsed().as_secs_f64();
    // Done when nothing waits and no backend holds an attempt.
    loop {
        let busy = engine.backends().values().any(|b| b.current.is_some());
        if engine.queue_len() == 0 && !busy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    // Count from the store, the truth: every job succeeded, each once.
    let mut succeeded = 0usize;
    let mut events = 0usize;
    let mut after = 0;
    loop {
        let page = engine.store().events_since(after, 10_000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        events += page.len();
        succeeded += page
            .iter()
            .filter(|e| e.state == JobState::Succeeded && e.kind.name() == "succeeded")
            .count();
    }
    server.shutdown().await;
    if succeeded != a.jobs {
        bail!("{succeeded} of {} jobs succeeded", a.jobs);
    }
    let rate = a.jobs as f64 / wall;
    let ack = Stats::of(&acks);
    let table = vec![
        format!(
            "{} jobs, {} in-process backends that finish at once, {} submitters, embedded store (fsync per commit group)",
            a.jobs, a.backends, a.submitters
        ),
        format!(
            "throughput: {rate:.0} jobs/s end to end ({wall:.2} s; every job queued, dispatched, submitted, started and succeeded: {events} events committed)"
        ),
        format!(
            "submit rate: {:.0} jobs/s acknowledged (durable) in {submitted:.2} s",
            a.jobs as f64 / submitted
        ),
        format!("submit acknowledgement latency: {}", ack.line("ms")),
    ];
    Ok(Results {
        table,
        json: json!({
            "jobs": a.jobs,
            "backends": a.backends,
            "submitters": a.submitters,
            "jobs_per_s": rate,
            "wall_s": wall,
            "events": events,
            "submit_jobs_per_s": a.jobs as f64 / submitted,
            "submit_ack_ms": ack,
        }),
    })
}
