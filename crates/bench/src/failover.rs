//! `gantry bench failover`: how soon gantry notices a backend that has stopped working,
//! and how soon the job runs again elsewhere.
//!
//! A fixed share of the simulated backends hang before start (they accept every prompt
//! and never run it), as many again stall mid-node (progress stops half way); the rest
//! are healthy. The server runs with short explicit limits (`start`, `first_progress`,
//! `node_stall`) and no circuit breaker. Each job's workflow has a shape of its own (its
//! own node ids), so the block a fault puts on a backend keeps that job's retries away
//! from it while other jobs still go there: the faulty backends keep taking work, every
//! fault is a sample, and every retry runs elsewhere (`--same-shape` gives all jobs one
//! shape instead). Every job must end `succeeded`.
//!
//! For each fault (`attempt_failed`):
//! - the time of the fault is the last sign of progress: for a stall, the simulator's
//!   last progress message (its run's start from `/sim/runs` plus the nominal time of the
//!   steps before the stall, a few ms early as the simulator's sleeps overrun, so the lag
//!   is if anything overstated); otherwise gantry's own `details.since`;
//! - detection lag = when the `attempt_failed` event reached this client, minus (the
//!   fault + the configured limit); the same by the event's server stamp `at` too;
//! - fault to retry start = when the next attempt's prompt started on its simulator
//!   (`/sim/runs`), minus the fault. It includes the retry backoff, reported apart, and
//!   the time from the end of the backoff (`not_before`) to that start.
//!
//! The target: detection lag p99 under 250 ms past the configured limit.

use crate::client::{http, sleep_workflow, submit};
use crate::process::Binary;
use crate::report::Results;
use crate::server::{backends_toml, ServerProc};
use crate::sims::Sims;
use crate::stats::Stats;
use crate::stream::{follow_events, follow_until_terminal, UntilTerminal};
use crate::time::{ms, rfc3339_ms};
use anyhow::{bail, Context};
use gantry_sim::faults::{Fault, Kind};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// The target for the detection lag's p99, past the limit.
const TARGET_P99_MS: f64 = 250.0;

/// What `gantry bench failover` runs (the command's flags, parsed by the cli).
pub struct Options {
    /// Simulated backends.
    pub backends: usize,
    /// Jobs to run; every one must succeed.
    pub jobs: usize,
    /// Share of the backends that hang before start; as many again stall mid-node (at
    /// least one of each when above 0).
    pub faulty: f64,
    /// The simulator fault the stalling backends get (see `gantry sim --fault`).
    pub stall_spec: String,
    /// How long each job's work takes on a healthy backend, in ms.
    pub job_ms: u64,
    /// The server's start, first-progress and node-stall limits.
    pub limit: Duration,
    /// The server's block_cooldown: how long a backend takes no job of the same workflow
    /// shape (here: the same job) after a fault there.
    pub block_cooldown: Duration,
    /// The server's circuit_threshold: faults in a row that take a backend out of service
    /// (0, the default here, keeps the faulty backends taking work).
    pub circuit_threshold: u32,
    /// Give every job the same workflow shape (then a fault blocks its backend for every
    /// job, and a retry may go back to it once the block lifts).
    pub same_shape: bool,
    /// The server's max_attempts (a job may meet several faulty backends in a row).
    pub max_attempts: u32,
    /// Stop waiting for the jobs after this long.
    pub timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Health {
    Hang,
    Stall,
    Healthy,
}

impl Health {
    fn name(self) -> &'static str {
        match self {
            Health::Hang => "hang",
            Health::Stall => "stall",
            Health::Healthy => "other",
        }
    }
}

/// One `attempt_failed`, measured.
#[derive(Debug)]
struct Detected {
    job: String,
    attempt: u64,
    backend: String,
    kind: Health,
    code: String,
    phase: String,
    limit_ms: f64,
    /// Where the time of the fault came from: `sim` or `server`.
    fault_source: &'static str,
    lag_ms: Option<f64>,
    lag_at_ms: Option<f64>,
    /// How much later gantry saw the last sign of progress than the simulator sent it
    /// (stalls only).
    since_after_sim_ms: Option<f64>,
    retry: Retry,
    backoff_ms: Option<f64>,
}

#[derive(Debug)]
enum Retry {
    /// No further attempt (the job failed or was not retried).
    None,
    /// The next attempt's prompt never started (it met a hung backend too).
    NotStarted { backend: String },
    Started {
        backend: String,
        fault_to_start_ms: Option<f64>,
        /// From the end of the backoff (`not_before`) to the start.
        after_backoff_ms: Option<f64>,
    },
}

pub async fn run(a: Options, gantry: &Binary) -> anyhow::Result<Results> {
    if a.jobs == 0 || a.backends == 0 || a.job_ms == 0 {
        bail!("--jobs, --backends and --job-ms must be at least 1");
    }
    if !(0.0..=0.5).contains(&a.faulty) {
        bail!("--faulty is a share of the backends between 0 and 0.5");
    }
    let limit_ms = a.limit.as_millis() as u64;
    if limit_ms == 0 {
        bail!("--limit must be above 0 (0 turns the timers off)");
    }
    let stall = Fault::parse(&a.stall_spec).context("--stall-spec")?;
    let Kind::Stall { at_pct, .. } = stall.kind else {
        bail!("--stall-spec must be a stall fault (stall:at=PCT,...)");
    };
    let per_kind = if a.faulty > 0.0 {
        ((a.faulty * a.backends as f64).round() as usize).max(1)
    } else {
        0
    };
    if 2 * per_kind >= a.backends {
        bail!(
            "--faulty {} of {} backends leaves none healthy",
            a.faulty,
            a.backends
        );
    }
    let health: Vec<Health> = (0..a.backends)
        .map(|i| match i {
            i if i < per_kind => Health::Hang,
            i if i < 2 * per_kind => Health::Stall,
            _ => Health::Healthy,
        })
        .collect();
    // Progress comes at least four times per limit, so a healthy node never trips it.
    let steps = (a.job_ms * 4).div_ceil(limit_ms).max(5);
    let step_us = a.job_ms as f64 * 1000.0 / steps as f64;
    // The stall strikes at the first step whose value reaches at% (at 0, before any).
    let stall_step = if at_pct <= 0.0 {
        0.0
    } else {
        (at_pct * steps as f64 / 100.0).ceil()
    };
    // EmptyImage runs before the sleeping node, for its nominal cost.
    let before_us = match gantry_sim::nodes::cost("EmptyImage", &serde_json::Map::new()) {
        gantry_sim::nodes::Cost::Fixed(d) => d.as_micros() as f64,
        _ => 0.0,
    };
    let stall_offset_us = (before_us + stall_step * step_us) as i64;

    let http = http()?;
    eprintln!(
        "failover: {} jobs of {} ms on {} backends ({per_kind} hang, {per_kind} stall), limit {limit_ms} ms",
        a.jobs, a.job_ms, a.backends
    );
    let sims = Sims::spawn(gantry, a.backends, 1.0, &[]).await?;
    for (url, h) in sims.urls.iter().zip(&health) {
        let specs: Vec<&str> = match h {
            Health::Hang => vec!["hang-before-start"],
            Health::Stall => vec![a.stall_spec.as_str()],
            Health::Healthy => continue,
        };
        http.post(format!("{url}/sim/faults"))
            .json(&specs)
            .send()
            .await?
            .error_for_status()
            .with_context(|| format!("cannot set the faults of {url}"))?;
    }
    let extra = format!(
        "max_attempts = {}\nblock_cooldown = \"{}ms\"\ncircuit_threshold = {}\n\
         [timeouts]\nstart = \"{limit_ms}ms\"\nfirst_progress = \"{limit_ms}ms\"\nnode_stall = \"{limit_ms}ms\"\n",
        a.max_attempts,
        a.block_cooldown.as_millis(),
        a.circuit_threshold
    );
    let dir = tempfile::tempdir()?;
    let server = ServerProc::spawn(gantry, dir.path(), &backends_toml(&sims.urls, &extra)).await?;
    server.wait_backends(&http, a.backends).await?;
    let mut events = follow_events(&http, &server.url, 0).await?;

    let t0 = Instant::now();
    let mut ids = Vec::with_capacity(a.jobs);
    for i in 0..a.jobs {
        let mut workflow = sleep_workflow(a.job_ms, steps, i as u64);
        if !a.same_shape {
            workflow = own_shape(&workflow, i);
        }
        let body = json!({ "workflow": workflow });
        ids.push(submit(&http, &server.url, &body).await?);
    }
    let UntilTerminal { log, timed_out, .. } =
        follow_until_terminal(&mut events, &ids, a.timeout).await?;
    let wall_s = t0.elapsed().as_secs_f64();
    let runs = sims.runs(&http).await?;
    drop(server);

    // Where each prompt ran: prompt id -> (backend index, started µs).
    let mut ran: HashMap<&str, (usize, i64)> = HashMap::new();
    for (i, backend) in runs.iter().enumerate() {
        for r in backend {
            ran.insert(r.prompt_id.as_str(), (i, r.started_us));
        }
    }
    let health_of = |backend: &str| -> Health {
        backend
            .strip_prefix('b')
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|i| health.get(i).copied())
            .unwrap_or(Health::Healthy)
    };
    // Per job: attempt -> (backend, prompt id); (backoff, not_before µs) per failed
    // attempt; final outcome.
    let mut dispatched: HashMap<&str, BTreeMap<u64, (&str, &str)>> = HashMap::new();
    let mut backoff: HashMap<(&str, u64), (f64, Option<i64>)> = HashMap::new();
    let mut outcome: HashMap<&str, &str> = HashMap::new();
    for e in &log {
        let Some(job) = e.data["job_id"].as_str() else {
            continue;
        };
        let attempt = e.data["attempt"].as_u64().unwrap_or(0);
        match e.kind.as_str() {
            "dispatched" => {
                let backend = e.data["backend"].as_str().unwrap_or_default();
                let prompt = e.data["prompt_id"].as_str().unwrap_or_default();
                dispatched
                    .entry(job)
                    .or_default()
                    .insert(attempt, (backend, prompt));
            }
            "job_retrying" => {
                if let Some(d) = e.data["delay_ms"].as_f64() {
                    let not_before = e.data["not_before"]
                        .as_i64()
                        .or_else(|| e.data["not_before"].as_str().and_then(rfc3339_ms))
                        .map(|m| m * 1000);
                    backoff.insert((job, attempt), (d, not_before));
                }
            }
            "succeeded" | "failed" | "cancelled" => {
                outcome.entry(job).or_insert(e.kind.as_str());
            }
            _ => {}
        }
    }

    let mut faults = Vec::new();
    for e in log.iter().filter(|e| e.kind == "attempt_failed") {
        let Some(job) = e.data["job_id"].as_str() else {
            continue;
        };
        let attempt = e.data["attempt"].as_u64().unwrap_or(0);
        let backend = e.data["backend"].as_str().unwrap_or_default().to_owned();
        let error = &e.data["error"];
        let details = &error["details"];
        let kind = health_of(&backend);
        let limit = details["limit_ms"].as_f64().unwrap_or(limit_ms as f64);
        let since_us = details["since"]
            .as_str()
            .and_then(rfc3339_ms)
            .map(|m| m * 1000);
        let at_us = e.data["at"].as_str().and_then(rfc3339_ms).map(|m| m * 1000);
        let attempts = dispatched.get(job);
        let prompt = attempts.and_then(|d| d.get(&attempt)).map(|(_, p)| *p);
        let sim_fault_us = match (kind, prompt.and_then(|p| ran.get(p))) {
            (Health::Stall, Some((_, started))) => Some(started + stall_offset_us),
            _ => None,
        };
        let (fault_us, fault_source) = match (sim_fault_us, since_us) {
            (Some(f), _) => (Some(f), "sim"),
            (None, Some(s)) => (Some(s), "server"),
            (None, None) => (None, "none"),
        };
        let lag =
            |detect_us: Option<i64>| -> Option<f64> { Some(ms(detect_us? - fault_us?) - limit) };
        let (backoff_ms, not_before_us) = match backoff.get(&(job, attempt)) {
            Some((d, nb)) => (Some(*d), *nb),
            None => (None, None),
        };
        let retry = match attempts.and_then(|d| d.get(&(attempt + 1))) {
            None => Retry::None,
            Some((b, p)) => match ran.get(p) {
                None => Retry::NotStarted {
                    backend: (*b).to_owned(),
                },
                Some((_, started)) => Retry::Started {
                    backend: (*b).to_owned(),
                    fault_to_start_ms: fault_us.map(|f| ms(started - f)),
                    after_backoff_ms: not_before_us.map(|nb| ms(started - nb)),
                },
            },
        };
        faults.push(Detected {
            job: job.to_owned(),
            attempt,
            backend,
            kind,
            code: error["code"].as_str().unwrap_or_default().to_owned(),
            phase: details["phase"].as_str().unwrap_or_default().to_owned(),
            limit_ms: limit,
            fault_source,
            lag_ms: lag(Some(e.at_us)),
            lag_at_ms: lag(at_us),
            since_after_sim_ms: match (sim_fault_us, since_us) {
                (Some(f), Some(s)) => Some(ms(s - f)),
                _ => None,
            },
            retry,
            backoff_ms,
        });
    }

    let not_succeeded: Vec<Value> = ids
        .iter()
        .filter(|id| outcome.get(id.as_str()) != Some(&"succeeded"))
        .map(|id| {
            json!({"job_id": id, "outcome": outcome.get(id.as_str()).copied().unwrap_or("not finished")})
        })
        .collect();
    let succeeded = ids.len() - not_succeeded.len();

    let group = |name: &str, pick: &dyn Fn(&Detected) -> bool| -> Value {
        let of: Vec<&Detected> = faults.iter().filter(|f| pick(f)).collect();
        let vals = |f: &dyn Fn(&Detected) -> Option<f64>| -> Vec<f64> {
            of.iter().filter_map(|d| f(d)).collect()
        };
        let mut phases: BTreeMap<String, usize> = BTreeMap::new();
        for d in &of {
            let label = if d.phase.is_empty() {
                d.code.clone()
            } else {
                d.phase.clone()
            };
            *phases.entry(label).or_default() += 1;
        }
        json!({
            "kind": name,
            "faults": of.len(),
            "phases": phases,
            "detection_lag_ms": Stats::of(&vals(&|d| d.lag_ms)),
            "detection_lag_by_server_stamp_ms": Stats::of(&vals(&|d| d.lag_at_ms)),
            "fault_to_retry_start_ms": Stats::of(&vals(&|d| match d.retry {
                Retry::Started { fault_to_start_ms, .. } => fault_to_start_ms,
                _ => None,
            })),
            "retry_backoff_ms": Stats::of(&vals(&|d| d.backoff_ms)),
            "backoff_end_to_retry_start_ms": Stats::of(&vals(&|d| match d.retry {
                Retry::Started { after_backoff_ms, .. } => after_backoff_ms,
                _ => None,
            })),
            "since_after_sim_ms": Stats::of(&vals(&|d| d.since_after_sim_ms)),
            "fault_time_from_sim": of.iter().filter(|d| d.fault_source == "sim").count(),
        })
    };
    let hang = group("hang", &|d| d.kind == Health::Hang);
    let stalls = group("stall", &|d| d.kind == Health::Stall);
    let other = group("other", &|d| d.kind == Health::Healthy);
    let all = group("all", &|_| true);

    let mut elsewhere = 0;
    let mut same = 0;
    let mut not_started = 0;
    let mut none = 0;
    for d in &faults {
        match &d.retry {
            Retry::Started { backend, .. } if *backend != d.backend => elsewhere += 1,
            Retry::Started { .. } => same += 1,
            Retry::NotStarted { .. } => not_started += 1,
            Retry::None => none += 1,
        }
    }
    let stat = |v: &Value, key: &str| -> Stats { Stats::from_json(&v[key]) };
    let p99 = stat(&all, "detection_lag_ms").p99;
    let met = p99 < TARGET_P99_MS;

    let mut table = vec![
        format!(
            "{} jobs x {} ms on {} simulated backends: {per_kind} hang before start, {per_kind} stall ({}), {} healthy",
            a.jobs,
            a.job_ms,
            a.backends,
            a.stall_spec,
            a.backends - 2 * per_kind
        ),
        format!(
            "limits: start / first_progress / node_stall {limit_ms} ms; block_cooldown {} ms; circuit_threshold {}{}; max_attempts {}; retry backoff: the server's (1 s base, equal jitter); {}",
            a.block_cooldown.as_millis(),
            a.circuit_threshold,
            if a.circuit_threshold == 0 { " (off)" } else { "" },
            a.max_attempts,
            if a.same_shape { "one workflow shape for all jobs" } else { "a workflow shape per job" }
        ),
        format!(
            "jobs: {succeeded} of {} succeeded{}; wall {wall_s:.2} s",
            ids.len(),
            if timed_out { " (gave up waiting)" } else { "" }
        ),
    ];
    for v in &not_succeeded {
        table.push(format!(
            "  NOT succeeded: {} ({})",
            v["job_id"], v["outcome"]
        ));
    }
    let phases = |v: &Value| -> String {
        let parts: Vec<String> = v["phases"]
            .as_object()
            .map(|m| m.iter().map(|(k, n)| format!("{k} {n}")).collect())
            .unwrap_or_default();
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join(", "))
        }
    };
    table.push(format!(
        "faults detected: hang {}{}, stall {}{}, on healthy backends {}{}",
        hang["faults"],
        phases(&hang),
        stalls["faults"],
        phases(&stalls),
        other["faults"],
        phases(&other)
    ));
    table.push(
        "detection lag = attempt_failed arrival here - (last sign of progress + limit); fault to retry start = retry's prompt start on its simulator - last sign of progress".into(),
    );
    for (name, v) in [("hang", &hang), ("stall", &stalls), ("all", &all)] {
        table.push(format!(
            "[{name}] detection lag past the limit: {}",
            stat(v, "detection_lag_ms").line("ms")
        ));
        table.push(format!(
            "[{name}] fault to retry start: {}",
            stat(v, "fault_to_retry_start_ms").line("ms")
        ));
    }
    table.push(format!(
        "[all] detection lag by the server's stamp `at`: {}",
        stat(&all, "detection_lag_by_server_stamp_ms").line("ms")
    ));
    table.push(format!(
        "[all] retry backoff (job_retrying delay_ms): {}",
        stat(&all, "retry_backoff_ms").line("ms")
    ));
    table.push(format!(
        "[all] end of backoff (not_before) to retry start: {}",
        stat(&all, "backoff_end_to_retry_start_ms").line("ms")
    ));
    table.push(format!(
        "[stall] gantry saw the last progress after the simulator's nominal time: {}",
        stat(&stalls, "since_after_sim_ms").line("ms")
    ));
    table.push(format!(
        "retries: {elsewhere} started elsewhere, {same} on the same backend, {not_started} hung again before starting, {none} not retried"
    ));
    table.push(format!(
        "target: detection lag p99 under {TARGET_P99_MS} ms past the limit: p99 {p99:.1} ms, {}",
        if met { "met" } else { "NOT met" }
    ));

    let detail: Vec<Value> = faults
        .iter()
        .map(|d| {
            let (retry, retry_backend, to_start) = match &d.retry {
                Retry::None => ("none", None, None),
                Retry::NotStarted { backend } => ("not_started", Some(backend), None),
                Retry::Started {
                    backend,
                    fault_to_start_ms,
                    ..
                } => ("started", Some(backend), *fault_to_start_ms),
            };
            json!({
                "job_id": d.job, "attempt": d.attempt, "backend": d.backend, "kind": d.kind.name(),
                "code": d.code, "phase": d.phase, "limit_ms": d.limit_ms, "fault_time_from": d.fault_source,
                "detection_lag_ms": d.lag_ms, "detection_lag_by_server_stamp_ms": d.lag_at_ms,
                "retry": retry, "retry_backend": retry_backend, "fault_to_retry_start_ms": to_start,
                "retry_backoff_ms": d.backoff_ms,
            })
        })
        .collect();
    Ok(Results {
        table,
        json: json!({
            "jobs": a.jobs,
            "backends": a.backends,
            "hang_backends": per_kind,
            "stall_backends": per_kind,
            "stall_spec": a.stall_spec,
            "job_ms": a.job_ms,
            "steps": steps,
            "limit_ms": limit_ms,
            "block_cooldown_ms": a.block_cooldown.as_millis() as u64,
            "circuit_threshold": a.circuit_threshold,
            "same_shape": a.same_shape,
            "max_attempts": a.max_attempts,
            "wall_s": wall_s,
            "succeeded": succeeded,
            "not_succeeded": not_succeeded,
            "timed_out": timed_out,
            "hang": hang,
            "stall": stalls,
            "other": other,
            "all": all,
            "retries": {"elsewhere": elsewhere, "same_backend": same, "not_started": not_started, "none": none},
            "target_p99_ms": TARGET_P99_MS,
            "target_met": met,
            "faults": detail,
        }),
    })
}

/// `workflow` with node ids of its own (job `i`'s), links included: the same work in a
/// workflow shape no other job has.
fn own_shape(workflow: &Value, i: usize) -> Value {
    let id = |k: &str| format!("{}{k}", i + 1);
    let Some(nodes) = workflow.as_object() else {
        return workflow.clone();
    };
    let renamed = nodes
        .iter()
        .map(|(k, node)| {
            let mut node = node.clone();
            if let Some(inputs) = node.get_mut("inputs").and_then(Value::as_object_mut) {
                for v in inputs.values_mut() {
                    if let Some([Value::String(from), _]) = v.as_array_mut().map(Vec::as_mut_slice)
                    {
                        *from = id(from);
                    }
                }
            }
            (id(k), node)
        })
        .collect();
    Value::Object(renamed)
}
