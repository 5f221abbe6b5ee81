//! `gantry bench scale`'s queue part: Q jobs parked in the queue, what they cost in
//! memory and idle CPU, and how fast probe jobs are dispatched past them.

use super::measure::{idle_cpu, levels, opt_f, settle, stats_json, submit_many};
use super::Options;
use crate::client::{sleep_workflow, submit};
use crate::process::Binary;
use crate::server::{backends_toml, ServerProc};
use crate::sims::Sims;
use crate::stats::Stats;
use crate::stream::{follow_events, StreamEvent};
use crate::time::{ms, now_us};
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

/// A URL on which nothing listens (the discard port): its backend never connects, so its
/// node classes stay unknown and jobs only it could run wait (routing's `Capabilities`).
const NOWHERE: &str = "http://127.0.0.1:9";
const PARK_TAG: &str = "parked";

/// What the global event stream has shown, for waiting on without sleeping.
#[derive(Default)]
struct Seen {
    by_kind: HashMap<String, u64>,
    /// Arrival (wall µs) of the first `dispatched` / `started` / terminal event by job;
    /// parked jobs never get one, so these stay small.
    dispatched: HashMap<String, i64>,
    started: HashMap<String, i64>,
    done: HashMap<String, (String, i64)>,
    ended: bool,
}

struct Watch {
    seen: Mutex<Seen>,
    notify: Notify,
}

impl Watch {
    fn spawn(mut events: mpsc::UnboundedReceiver<StreamEvent>) -> Arc<Watch> {
        let watch = Arc::new(Watch {
            seen: Mutex::new(Seen::default()),
            notify: Notify::new(),
        });
        let w = watch.clone();
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                {
                    let mut s = w.lock();
                    *s.by_kind.entry(e.kind.clone()).or_insert(0) += 1;
                    if let Some(job) = e.data["job_id"].as_str() {
                        match e.kind.as_str() {
                            "dispatched" => {
                                s.dispatched.entry(job.to_owned()).or_insert(e.at_us);
                            }
                            "started" => {
                                s.started.entry(job.to_owned()).or_insert(e.at_us);
                            }
                            "succeeded" | "failed" | "cancelled" => {
                                s.done
                                    .entry(job.to_owned())
                                    .or_insert((e.kind.clone(), e.at_us));
                            }
                            _ => {}
                        }
                    }
                }
                w.notify.notify_waiters();
            }
            w.lock().ended = true;
            w.notify.notify_waiters();
        });
        watch
    }

    fn lock(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, kind: &str) -> u64 {
        self.lock().by_kind.get(kind).copied().unwrap_or(0)
    }

    /// Wait until `f` answers something, the stream ends or `deadline` passes.
    async fn until<T>(
        &self,
        deadline: Instant,
        mut f: impl FnMut(&Seen) -> Option<T>,
    ) -> Option<T> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.lock();
                if let Some(v) = f(&s) {
                    return Some(v);
                }
                if s.ended {
                    return None;
                }
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return f(&self.lock());
            }
        }
    }
}

/// One probe: when it was submitted, and when its events arrived (wall µs).
struct Probe {
    submit_us: i64,
    dispatched_us: Option<i64>,
    started_us: Option<i64>,
    outcome: Option<String>,
}

pub(super) async fn queue_part(
    a: &Options,
    gantry: &Binary,
    http: &reqwest::Client,
) -> anyhow::Result<(Vec<String>, Value)> {
    let depths = levels(&a.queued);
    let mut table = vec![format!(
        "[queue] Q jobs parked (tag {PARK_TAG:?}, only on a backend at {NOWHERE}) + 1 idle simulated backend; probes of {} ms one at a time",
        a.job_ms
    )];
    let mut rows = Vec::new();
    let mut p50s = Vec::new();
    for &q in &depths {
        eprintln!("scale/queue: Q={q}");
        let row = one_queue_depth(a, gantry, http, q).await?;
        let submitted = row["submitted"].as_u64().unwrap_or(0);
        let capped = row["capped"] == true;
        table.push(format!(
            "[queue] Q={q:>6}: submitted {submitted}{} in {:.1} s ({:.0}/s, {} in flight); all still queued: {}",
            if capped {
                format!(" (CAPPED by the {} s budget)", a.submit_budget_s)
            } else {
                String::new()
            },
            row["submit_s"].as_f64().unwrap_or(f64::NAN),
            row["submit_per_s"].as_f64().unwrap_or(f64::NAN),
            a.in_flight,
            row["all_parked"],
        ));
        let per_job = row["kib_per_queued_job"].as_f64();
        table.push(format!(
            "[queue] Q={q:>6}: RSS {} -> {} KiB: {} KiB per queued job (target < 2: {}); idle CPU with the queue {}%",
            row["rss_before_kib"],
            row["rss_after_kib"],
            opt_f(per_job, 3),
            match per_job {
                Some(k) if k < 2.0 => "ok",
                Some(_) => "MISSED",
                None => "?",
            },
            opt_f(row["idle_cpu"].as_f64().map(|c| c * 100.0), 1),
        ));
        for (key, label) in [
            ("higher", "probes, priority above the queue"),
            ("equal", "probes, same priority as the queue"),
        ] {
            let p = &row["probes"][key];
            let n = p["sent"].as_u64().unwrap_or(0);
            if n == 0 {
                continue;
            }
            let dispatched = p["dispatched"].as_u64().unwrap_or(0);
            let d: Stats = Stats::from_json(&p["submit_to_dispatched_ms"]);
            let s: Stats = Stats::from_json(&p["submit_to_started_ms"]);
            table.push(format!(
                "[queue] Q={q:>6}: {label}: {dispatched} of {n} dispatched; submit->dispatched {}",
                d.line("ms")
            ));
            table.push(format!(
                "[queue] Q={q:>6}: {label}: submit->started {}",
                s.line("ms")
            ));
            if p["starved"] == true {
                table.push(format!(
                    "[queue] Q={q:>6}: {label}: STARVED: a probe was not dispatched within {} s while its backend sat idle, behind {submitted} parked jobs of the same priority: head-of-line starvation (the scheduler looks only at a bounded prefix of the queue)",
                    a.probe_timeout_s
                ));
            }
            if key == "higher" {
                p50s.push((q, d.p50, d.p99));
            }
        }
        rows.push(row);
    }
    // Growth between the smallest and largest queue, so fixed costs (SQLite's page cache,
    // allocator arenas) that dominate a small queue cancel out.
    let growth: Vec<(u64, f64)> = rows
        .iter()
        .filter_map(|r| {
            let n = r["submitted"].as_u64().filter(|n| *n > 0)?;
            let g = r["rss_after_kib"].as_f64()? - r["rss_before_kib"].as_f64()?;
            Some((n, g))
        })
        .collect();
    let marginal = match (growth.first(), growth.last()) {
        (Some(&(n0, g0)), Some(&(n1, g1))) if n1 > n0 => {
            Some((n0, n1, (g1 - g0) / (n1 - n0) as f64))
        }
        _ => None,
    };
    if let Some((n0, n1, k)) = marginal {
        table.push(format!(
            "[queue] marginal RSS per queued job between Q={n0} and Q={n1}: {k:.3} KiB (target < 2: {})",
            if k < 2.0 { "ok" } else { "MISSED" }
        ));
    }
    if let (Some(first), Some(last)) = (p50s.first(), p50s.last()) {
        if last.0 > first.0 {
            table.push(format!(
                "[queue] probe submit->dispatched from Q={} to Q={}: p50 {:.3} -> {:.3} ms (x{:.2}), p99 {:.3} -> {:.3} ms (x{:.2})",
                first.0, last.0, first.1, last.1, last.1 / first.1, first.2, last.2, last.2 / first.2
            ));
        }
    }
    Ok((
        table,
        json!({"runs": rows, "marginal_kib_per_queued_job": marginal.map(|m| m.2)}),
    ))
}

async fn one_queue_depth(
    a: &Options,
    gantry: &Binary,
    http: &reqwest::Client,
    q: usize,
) -> anyhow::Result<Value> {
    let sims = Sims::spawn(gantry, 1, 1.0, &[]).await?;
    let dir = tempfile::tempdir()?;
    let config = backends_toml(
        &sims.urls,
        &format!(
            "[[backends]]\nname = \"parking\"\nurl = \"{NOWHERE}\"\ntags = [\"{PARK_TAG}\"]\n"
        ),
    );
    let server = ServerProc::spawn(gantry, dir.path(), &config).await?;
    server.wait_backends(http, 1).await?;
    let watch = Watch::spawn(follow_events(http, &server.url, 0).await?);
    let (rss_before, _) = settle(&server, Duration::from_secs(5)).await;

    // Park Q jobs.
    let body: Arc<dyn Fn(usize) -> Value + Send + Sync> =
        Arc::new(|i| json!({"workflow": sleep_workflow(10, 1, i as u64), "tags": [PARK_TAG]}));
    let budget = Duration::from_secs(a.submit_budget_s);
    let (submitted, submit_s) =
        submit_many(http, &server.url, q, a.in_flight, budget, body).await?;
    let capped = submitted < q;
    // The stream shows every `queued` event before the parked jobs count as parked.
    let caught_up = watch
        .until(Instant::now() + Duration::from_secs(60), |s| {
            (s.by_kind.get("queued").copied().unwrap_or(0) >= submitted as u64).then_some(())
        })
        .await
        .is_some();
    let (rss_after, _) = settle(&server, Duration::from_secs(6)).await;
    let idle = idle_cpu(&server, Duration::from_secs(2)).await;
    // Parked means: queued, and neither dispatched nor failed (e.g. as unroutable).
    let failed_early = watch.count("failed");
    let dispatched_early = watch.count("dispatched");
    let all_parked = caught_up && failed_early == 0 && dispatched_early == 0;
    let per_job = match (rss_before, rss_after) {
        (Some(before), Some(after)) if submitted > 0 => {
            Some((after as f64 - before as f64) / submitted as f64)
        }
        _ => None,
    };

    // Probes: above the queue's priority, then at the same one.
    let timeout = Duration::from_secs(a.probe_timeout_s);
    let mut seed = 1_000_000_000 + q as u64 * 1000;
    let mut higher = Vec::new();
    for _ in 0..a.probes {
        seed += 1;
        let p = probe(a, http, &server.url, &watch, 1, seed, timeout).await?;
        let stop = p.dispatched_us.is_none();
        higher.push(p);
        if stop {
            break;
        }
    }
    let mut equal = Vec::new();
    for _ in 0..a.equal_probes {
        seed += 1;
        let p = probe(a, http, &server.url, &watch, 0, seed, timeout).await?;
        let stop = p.dispatched_us.is_none();
        equal.push(p);
        if stop {
            break;
        }
    }
    let still_parked = watch.count("failed") == 0
        && watch.count("dispatched") as usize
            == higher
                .iter()
                .chain(&equal)
                .filter(|p| p.dispatched_us.is_some())
                .count();
    drop(sims);
    Ok(json!({
        "queued": q,
        "submitted": submitted,
        "capped": capped,
        "submit_s": submit_s,
        "submit_per_s": submitted as f64 / submit_s,
        "in_flight": a.in_flight,
        "stream_caught_up": caught_up,
        "all_parked": all_parked,
        "parked_untouched_by_probes": still_parked,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "kib_per_queued_job": per_job,
        "idle_cpu": idle,
        "probes": {"higher": probes_json(&higher), "equal": probes_json(&equal)},
    }))
}

/// Submit one probe job at `priority` and follow it to its end (cancelling it if it is
/// not dispatched within `timeout`), so the next probe finds the backend idle.
async fn probe(
    a: &Options,
    http: &reqwest::Client,
    server: &str,
    watch: &Watch,
    priority: i32,
    seed: u64,
    timeout: Duration,
) -> anyhow::Result<Probe> {
    let body = json!({"workflow": sleep_workflow(a.job_ms, 1, seed), "priority": priority});
    let submit_us = now_us();
    let id = submit(http, server, &body).await?;
    let dispatched_us = watch
        .until(Instant::now() + timeout, |s| s.dispatched.get(&id).copied())
        .await;
    if dispatched_us.is_none() {
        let resp = http
            .delete(format!("{server}/v1/jobs/{id}"))
            .send()
            .await
            .context("cancel a starved probe")?;
        if !resp.status().is_success() {
            bail!("cancelling probe {id}: {}", resp.status());
        }
    }
    let end = Instant::now() + Duration::from_secs(60) + Duration::from_millis(a.job_ms);
    let outcome = watch
        .until(end, |s| s.done.get(&id).map(|(k, _)| k.clone()))
        .await;
    let started_us = watch.lock().started.get(&id).copied();
    Ok(Probe {
        submit_us,
        dispatched_us,
        started_us,
        outcome,
    })
}

fn probes_json(probes: &[Probe]) -> Value {
    let to_dispatched: Vec<f64> = probes
        .iter()
        .filter_map(|p| p.dispatched_us.map(|d| ms(d - p.submit_us)))
        .collect();
    let to_started: Vec<f64> = probes
        .iter()
        .filter_map(|p| p.started_us.map(|d| ms(d - p.submit_us)))
        .collect();
    let dispatched = probes.iter().filter(|p| p.dispatched_us.is_some()).count();
    json!({
        "sent": probes.len(),
        "dispatched": dispatched,
        "starved": dispatched < probes.len(),
        "succeeded": probes.iter().filter(|p| p.outcome.as_deref() == Some("succeeded")).count(),
        "submit_to_dispatched_ms": stats_json(&Stats::of(&to_dispatched)),
        "submit_to_started_ms": stats_json(&Stats::of(&to_started)),
    })
}
