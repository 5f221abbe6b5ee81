//! `gantry bench restart`: SIGKILL the server under load, start it again on the same data
//! dir, and time the recovery.
//!
//! One simulated backend per running job (`--running`, 64), `--running` + `--queued`
//! jobs submitted at once. When `--running` jobs have started, the server process is
//! killed with SIGKILL and a new `gantry serve` is started on the same data dir and
//! config; the simulators go on running what they had. Measured, from the new spawn:
//! - serving: the new process announces its address (and answers `/healthz`);
//! - first new dispatch: the first `dispatched` event recorded by the new process;
//! - reconciled: every attempt in flight at the kill (dispatched, submitted or started,
//!   with no outcome yet) has its outcome recorded by the new process: `succeeded` for
//!   that attempt, or `attempt_failed` for it (then the job is retried), or the job ends;
//!   also, per attempt, how long after its prompt finished on the simulator (or after
//!   the new process served, if later) that outcome came;
//! - done: every job terminal.
//!
//! The end state is checked: every job succeeded exactly once (one `succeeded` event),
//! none lost, and per the simulators' `/sim/runs` no job's work ran to success twice and
//! nothing ran that gantry had not dispatched. Events of the old process are told from
//! those of the new one by their server stamp (`at`, before the kill) and checked by
//! sequence number.

use crate::client::{http, sleep_workflow, submit};
use crate::process::Binary;
use crate::report::Results;
use crate::server::{backends_toml, ServerProc};
use crate::sims::Sims;
use crate::stats::Stats;
use crate::stream::{
    follow_events, follow_until_terminal, is_terminal, StreamEvent, UntilTerminal,
};
use crate::time::{ms, now_us, rfc3339_ms};
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// What `gantry bench restart` runs (the command's flags, parsed by the cli).
pub struct Options {
    /// Jobs waiting in gantry's queue at the kill, beyond those running.
    pub queued: usize,
    /// Jobs running at the kill: one simulated backend each.
    pub running: usize,
    /// How long each job's work takes on the backend, in ms.
    pub job_ms: u64,
    /// Stop waiting (for the running jobs before the kill, for the end after it) after
    /// this long.
    pub timeout: Duration,
}

/// An attempt the old process left in flight.
#[derive(Clone, Debug)]
struct InFlight {
    attempt: u64,
    prompt_id: String,
    /// The last event the old process recorded about it.
    stage: String,
}

/// What the new process recorded about an attempt left in flight.
#[derive(Clone, Debug, Default)]
struct Followed {
    /// The first event about its job (arrival µs, kind).
    first: Option<(i64, String)>,
    /// Its outcome (arrival µs, kind, and for `attempt_failed` the error code).
    outcome: Option<(i64, String)>,
}

pub async fn run(a: Options, gantry: &Binary) -> anyhow::Result<Results> {
    if a.running == 0 || a.job_ms == 0 {
        bail!("--running and --job-ms must be at least 1");
    }
    let total = a.running + a.queued;
    let http = http()?;
    eprintln!(
        "restart: {} running + {} queued jobs of {} ms on {} backends",
        a.running, a.queued, a.job_ms, a.running
    );
    let sims = Sims::spawn(gantry, a.running, 1.0, &[]).await?;
    let dir = tempfile::tempdir()?;
    let config = backends_toml(&sims.urls, "");
    let mut server = ServerProc::spawn(gantry, dir.path(), &config).await?;
    server.wait_backends(&http, a.running).await?;
    let mut events = follow_events(&http, &server.url, 0).await?;

    // Submit everything at once, from a few submitters.
    let t0 = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..16 {
        let (next, http, url) = (next.clone(), http.clone(), server.url.clone());
        let job_ms = a.job_ms;
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(out);
                }
                let body = json!({"workflow": sleep_workflow(job_ms, 5, i as u64)});
                out.push((i, submit(&http, &url, &body).await?));
            }
        });
    }
    let mut submitted = Vec::new();
    while let Some(r) = set.join_next().await {
        submitted.extend(r??);
    }
    submitted.sort();
    let ids: Vec<String> = submitted.into_iter().map(|(_, id)| id).collect();
    let submit_s = t0.elapsed().as_secs_f64();

    // Wait until `running` jobs run at once.
    let deadline = tokio::time::Instant::now() + a.timeout;
    let mut started: HashSet<String> = HashSet::new();
    let mut ended: HashSet<String> = HashSet::new();
    loop {
        let running_now = started.difference(&ended).count();
        if running_now >= a.running {
            break;
        }
        let e = match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => bail!("the server's event stream ended before the kill"),
            Err(_) => bail!(
                "only {running_now} of {} jobs ran at once within the timeout",
                a.running
            ),
        };
        let Some(job) = e.data["job_id"].as_str() else {
            continue;
        };
        if e.kind == "started" {
            started.insert(job.to_owned());
        } else if is_terminal(&e.kind) {
            ended.insert(job.to_owned());
        }
    }
    drop(events);

    // SIGKILL, and wait until it is gone.
    let kill_us = now_us();
    server
        .child
        .kill()
        .await
        .context("cannot SIGKILL the server")?;
    let killed_us = now_us();
    let kill_ms = killed_us.div_euclid(1000);
    drop(server);

    let spawn_us = now_us();
    let server = ServerProc::spawn(gantry, dir.path(), &config).await?;
    let serving_us = now_us();
    http.get(format!("{}/healthz", server.url))
        .send()
        .await?
        .error_for_status()
        .context("the new server does not answer /healthz")?;
    let answering_us = now_us();
    let mut events = follow_events(&http, &server.url, 0).await?;

    // The whole history, old process's and new one's, until every job is terminal.
    let UntilTerminal {
        log,
        done,
        timed_out,
    } = follow_until_terminal(&mut events, &ids, a.timeout).await?;
    let wall_s = t0.elapsed().as_secs_f64();
    let runs = sims.runs(&http).await?;
    drop(server);

    // Old process's events: stamped no later than the kill.
    let stamp = |e: &StreamEvent| e.data["at"].as_str().and_then(rfc3339_ms);
    let is_old = |e: &StreamEvent| stamp(e).is_some_and(|at| at <= kill_ms);
    let seq = |e: &StreamEvent| e.data["seq"].as_i64().unwrap_or(0);
    let last_old_seq = log.iter().filter(|e| is_old(e)).map(seq).max().unwrap_or(0);
    let out_of_order = log
        .iter()
        .filter(|e| !is_old(e) && seq(e) <= last_old_seq)
        .count();

    // What the old process left in flight, and what was done by then.
    let mut live: HashMap<&str, InFlight> = HashMap::new();
    let mut done_before = 0usize;
    for e in log.iter().filter(|e| is_old(e)) {
        let Some(job) = e.data["job_id"].as_str() else {
            continue;
        };
        let attempt = e.data["attempt"].as_u64();
        match e.kind.as_str() {
            "dispatched" => {
                live.insert(
                    job,
                    InFlight {
                        attempt: attempt.unwrap_or(0),
                        prompt_id: e.data["prompt_id"].as_str().unwrap_or_default().to_owned(),
                        stage: e.kind.clone(),
                    },
                );
            }
            "submitted" | "started" => {
                if let Some(f) = live.get_mut(job).filter(|f| Some(f.attempt) == attempt) {
                    f.stage = e.kind.clone();
                }
            }
            "attempt_failed" | "succeeded" => {
                if live.get(job).is_some_and(|f| Some(f.attempt) == attempt) {
                    live.remove(job);
                }
                if e.kind == "succeeded" {
                    done_before += 1;
                }
            }
            "failed" | "cancelled" => {
                live.remove(job);
                done_before += 1;
            }
            _ => {}
        }
    }
    let mut stages: BTreeMap<&str, usize> = BTreeMap::new();
    for f in live.values() {
        *stages.entry(f.stage.as_str()).or_default() += 1;
    }

    // What the new process recorded about them, and about everything else.
    let mut followed: HashMap<&str, Followed> =
        live.keys().map(|j| (*j, Followed::default())).collect();
    let mut first_dispatch_us: Option<i64> = None;
    let mut last_terminal_us: Option<i64> = None;
    for e in log.iter().filter(|e| !is_old(e)) {
        let Some(job) = e.data["job_id"].as_str() else {
            continue;
        };
        if e.kind == "dispatched" && first_dispatch_us.is_none() {
            first_dispatch_us = Some(e.at_us);
        }
        if is_terminal(&e.kind) {
            last_terminal_us = Some(e.at_us);
        }
        let (Some(inflight), Some(f)) = (live.get(job), followed.get_mut(job)) else {
            continue;
        };
        if f.first.is_none() {
            f.first = Some((e.at_us, e.kind.clone()));
        }
        let attempt = e.data["attempt"].as_u64();
        let outcome = match e.kind.as_str() {
            "succeeded" if attempt == Some(inflight.attempt) => {
                if e.data["late"].as_bool() == Some(true) {
                    Some("succeeded (late)".to_owned())
                } else {
                    Some("succeeded".to_owned())
                }
            }
            "attempt_failed" if attempt == Some(inflight.attempt) => Some(format!(
                "attempt_failed ({})",
                e.data["error"]["code"].as_str().unwrap_or("?")
            )),
            "succeeded" | "failed" | "cancelled" => Some(e.kind.clone()),
            _ => None,
        };
        if let (None, Some(o)) = (&f.outcome, outcome) {
            f.outcome = Some((e.at_us, o));
        }
    }

    // Where each prompt ran, and to which job it belongs.
    let mut job_of: HashMap<&str, &str> = HashMap::new();
    let mut failed_attempts: HashMap<&str, usize> = HashMap::new();
    let mut succeeded_events: HashMap<&str, usize> = HashMap::new();
    let mut bad_terminal: Vec<Value> = Vec::new();
    for e in &log {
        let Some(job) = e.data["job_id"].as_str() else {
            continue;
        };
        match e.kind.as_str() {
            "dispatched" => {
                if let Some(p) = e.data["prompt_id"].as_str() {
                    job_of.insert(p, job);
                }
            }
            "attempt_failed" => *failed_attempts.entry(job).or_default() += 1,
            "succeeded" => *succeeded_events.entry(job).or_default() += 1,
            "failed" | "cancelled" => {
                bad_terminal
                    .push(json!({"job_id": job, "outcome": e.kind, "error": e.data["error"]}));
            }
            _ => {}
        }
    }
    let finished_of: HashMap<&str, i64> = runs
        .iter()
        .flatten()
        .map(|r| (r.prompt_id.as_str(), r.finished_us))
        .collect();
    let mut runs_of: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut orphans = Vec::new();
    for r in runs.iter().flatten() {
        match job_of.get(r.prompt_id.as_str()) {
            Some(job) => {
                let e = runs_of.entry(job).or_default();
                e.0 += 1;
                if r.status == "success" {
                    e.1 += 1;
                }
            }
            None => orphans.push(r.prompt_id.clone()),
        }
    }

    let lost: Vec<&String> = ids
        .iter()
        .filter(|id| !done.contains(id.as_str()))
        .collect();
    let not_once: Vec<Value> = ids
        .iter()
        .filter_map(|id| {
            let n = succeeded_events.get(id.as_str()).copied().unwrap_or(0);
            (n != 1 && done.contains(id.as_str()))
                .then(|| json!({"job_id": id, "succeeded_events": n}))
        })
        .collect();
    let ran_twice: Vec<Value> = ids
        .iter()
        .filter_map(|id| {
            let (all, ok) = runs_of.get(id.as_str()).copied().unwrap_or((0, 0));
            (ok > 1).then(|| json!({"job_id": id, "runs": all, "successful_runs": ok}))
        })
        .collect();
    let mut reran_retried = 0;
    let mut reran_unexplained = Vec::new();
    let mut never_ran = 0;
    for id in &ids {
        let (all, _) = runs_of.get(id.as_str()).copied().unwrap_or((0, 0));
        if all == 0 {
            never_ran += 1;
        }
        if all > 1 {
            if failed_attempts.get(id.as_str()).copied().unwrap_or(0) >= all - 1 {
                reran_retried += 1;
            } else {
                reran_unexplained.push(id.clone());
            }
        }
    }
    let succeeded_once = ids.len() - lost.len() - not_once.len() - bad_terminal.len();
    let clean = lost.is_empty()
        && not_once.is_empty()
        && bad_terminal.is_empty()
        && ran_twice.is_empty()
        && orphans.is_empty()
        && reran_unexplained.is_empty();

    let since_spawn = |us: i64| ms(us - spawn_us);
    let mut outcome_kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut to_outcome = Vec::new();
    let mut to_first = Vec::new();
    let mut lag = Vec::new();
    let mut unreconciled = Vec::new();
    for (job, f) in &followed {
        if let Some((at, _)) = &f.first {
            to_first.push(since_spawn(*at));
        }
        match &f.outcome {
            Some((at, kind)) => {
                *outcome_kinds.entry(kind.clone()).or_default() += 1;
                to_outcome.push(since_spawn(*at));
                let prompt = live
                    .get(job)
                    .map(|l| l.prompt_id.as_str())
                    .unwrap_or_default();
                if let Some(fin) = finished_of.get(prompt) {
                    lag.push(ms(at - (*fin).max(serving_us)));
                }
            }
            None => unreconciled.push((*job).to_owned()),
        }
    }
    let all_reconciled_ms = unreconciled
        .is_empty()
        .then(|| to_outcome.iter().copied().fold(0.0, f64::max));
    let all_acknowledged_ms =
        (to_first.len() == followed.len()).then(|| to_first.iter().copied().fold(0.0, f64::max));
    let serving_ms = ms(serving_us - spawn_us);
    let answering_ms = ms(answering_us - spawn_us);
    let first_dispatch_ms = first_dispatch_us.map(since_spawn);
    let all_done_ms = (!timed_out)
        .then_some(last_terminal_us.map(since_spawn))
        .flatten();
    let reconcile_stats = Stats::of(&to_outcome);
    let lag_stats = Stats::of(&lag);
    let opt = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1} ms"));

    let mut table = vec![
        format!(
            "{} running + {} queued jobs x {} ms on {} simulated backends; submitted in {submit_s:.2} s",
            a.running, a.queued, a.job_ms, a.running
        ),
        format!(
            "SIGKILL with {} attempts in flight {:?}, {done_before} jobs done, {} waiting; the kill took {:.1} ms",
            live.len(),
            stages,
            total.saturating_sub(done_before + live.len()),
            ms(killed_us - kill_us)
        ),
        format!(
            "new process, from its spawn: serving {serving_ms:.1} ms (/healthz answered {answering_ms:.1} ms); first new dispatch {}",
            opt(first_dispatch_ms)
        ),
        format!(
            "in-flight attempts reconciled (the new process recorded the attempt's outcome: its success or attempt_failed): all by {} ({} of {})",
            opt(all_reconciled_ms),
            live.len() - unreconciled.len(),
            live.len()
        ),
        format!("  outcomes: {outcome_kinds:?}"),
        format!("  spawn -> outcome: {}", reconcile_stats.line("ms")),
        format!(
            "  outcome after max(prompt finished on the sim, serving): {}",
            lag_stats.line("ms")
        ),
        format!(
            "  first event of the new process about each: all by {}",
            opt(all_acknowledged_ms)
        ),
        format!(
            "every job terminal {} after the spawn{}; wall {wall_s:.2} s from the first submit",
            opt(all_done_ms),
            if timed_out { " (gave up waiting)" } else { "" }
        ),
        format!(
            "end state: {succeeded_once} of {total} succeeded exactly once; lost {}, succeeded more than once {}, failed/cancelled {}",
            lost.len(),
            not_once.len(),
            bad_terminal.len()
        ),
        format!(
            "sim runs: {} jobs ran to success twice, {} reran after a recorded attempt failure, {} reran unexplained, {} never ran, {} runs gantry never dispatched",
            ran_twice.len(),
            reran_retried,
            reran_unexplained.len(),
            never_ran,
            orphans.len()
        ),
    ];
    if out_of_order > 0 {
        table.push(format!(
            "WARNING: {out_of_order} events stamped after the kill have sequence numbers below the old process's last"
        ));
    }
    table.push(format!(
        "verdict: {}",
        if clean {
            "no job lost, none ran twice"
        } else {
            "PROBLEMS (see above and the JSON)"
        }
    ));

    Ok(Results {
        table,
        json: json!({
            "running": a.running,
            "queued": a.queued,
            "jobs": total,
            "job_ms": a.job_ms,
            "submit_s": submit_s,
            "kill": {
                "in_flight": live.len(),
                "in_flight_stages": stages,
                "done_before": done_before,
                "kill_ms": ms(killed_us - kill_us),
                "last_old_seq": last_old_seq,
                "events_out_of_order": out_of_order,
            },
            "restart": {
                "serving_ms": serving_ms,
                "healthz_ms": answering_ms,
                "first_dispatch_ms": first_dispatch_ms,
                "all_reconciled_ms": all_reconciled_ms,
                "all_acknowledged_ms": all_acknowledged_ms,
                "spawn_to_outcome_ms": reconcile_stats,
                "outcome_after_finish_ms": lag_stats,
                "outcomes": outcome_kinds,
                "unreconciled": unreconciled,
                "all_done_ms": all_done_ms,
            },
            "wall_s": wall_s,
            "timed_out": timed_out,
            "end_state": {
                "succeeded_once": succeeded_once,
                "lost": lost,
                "succeeded_events_not_one": not_once,
                "failed_or_cancelled": bad_terminal,
                "ran_to_success_twice": ran_twice,
                "reran_after_attempt_failed": reran_retried,
                "reran_unexplained": reran_unexplained,
                "never_ran": never_ran,
                "runs_not_dispatched": orphans,
                "clean": clean,
            },
        }),
    })
}
