//! `gantry bench scale`: how the server's cost grows with the size of the farm, in three
//! parts, each on fresh simulators (one separate process) and a fresh server process:
//!
//! - **backends**: for each backend count B, the server's resident memory once all B
//!   simulated backends are connected and the memory has stopped growing; the slope in
//!   KiB per backend between the smallest and largest B; how long connecting took and
//!   whether every backend connected at all.
//! - **queue**: Q jobs parked in the queue (tagged for a backend whose URL nothing answers,
//!   so routing says *wait*, never *unroutable*): the submit rate, the server's memory
//!   growth per queued job, its CPU while idle with that queue, and the scheduling latency
//!   (submit -> `dispatched` and -> `started` on the global event stream) of probe jobs
//!   sent one at a time to one idle simulated backend, at a higher priority than the parked
//!   jobs and then at the same priority (which shows head-of-line starvation, if any).
//! - **fanout**: S subscribers on `/v1/events`, each its own connection, while a fixed
//!   batch of short jobs runs on a few backends: per event, the spread between its arrival
//!   at each subscriber and its earliest arrival anywhere, the lag from the event's `at` to
//!   its arrival, whether every subscriber got every event once and in order, the
//!   server's CPU time for the batch, and dispatch as the backends see it (the idle gap
//!   between two prompts while jobs wait), so that S streams can be seen not to slow it.

use crate::client::{http, sleep_workflow, submit};
use crate::process::Binary;
use crate::report::Results;
use crate::server::{backends_toml, ServerProc};
use crate::sims::{idle_gaps, Sims};
use crate::stats::Stats;
use crate::stream::{follow_events, StreamEvent};
use crate::time::{ms, now_us, rfc3339_ms};
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

/// The parts of the scenario (`--parts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Backends,
    Queue,
    Fanout,
}

/// What `gantry bench scale` runs (the command's flags, parsed by the cli).
pub struct Options {
    /// Which parts to run, comma-separated.
    pub parts: Vec<Part>,
    /// Backend counts for the memory-per-backend part, comma-separated.
    pub backends: Vec<usize>,
    /// Queue depths (parked jobs) for the queue part, comma-separated.
    pub queued: Vec<usize>,
    /// Event subscriber counts for the fan-out part, comma-separated.
    pub subscribers: Vec<usize>,
    /// Submissions in flight at once while filling a queue.
    pub in_flight: usize,
    /// Longest time spent submitting one queue, in seconds; past it the queue is capped
    /// at what was submitted, and the table says so.
    pub submit_budget_s: u64,
    /// Probe jobs per queue depth at a higher priority than the parked jobs.
    pub probes: usize,
    /// Probe jobs per queue depth at the parked jobs' priority (stops at the first that
    /// is not dispatched in time).
    pub equal_probes: usize,
    /// How long a probe may wait for its dispatch before it counts as starved, in seconds.
    pub probe_timeout_s: u64,
    /// Simulated backends in the fan-out part.
    pub fanout_backends: usize,
    /// Jobs in the fan-out batch.
    pub fanout_jobs: usize,
    /// How long each fan-out job (and each probe) runs on its backend, in ms.
    pub job_ms: u64,
    /// Longest wait for the backends to connect, in seconds.
    pub connect_timeout_s: u64,
}

/// A URL on which nothing listens (the discard port): its backend never connects, so its
/// node classes stay unknown and jobs only it could run wait (routing's `Capabilities`).
const NOWHERE: &str = "http://127.0.0.1:9";
const PARK_TAG: &str = "parked";

pub async fn run(a: Options, gantry: &Binary) -> anyhow::Result<Results> {
    if a.in_flight == 0 || a.fanout_backends == 0 || a.fanout_jobs == 0 {
        bail!("--in-flight, --fanout-backends and --fanout-jobs must be at least 1");
    }
    let http = http();
    let mut table = Vec::new();
    let mut doc = serde_json::Map::new();
    doc.insert("open_files_limit".into(), json!(open_files_limit()));
    if a.parts.contains(&Part::Backends) {
        let (lines, v) = backends_part(&a, gantry, &http)
            .await
            .context("backends part")?;
        table.extend(lines);
        doc.insert("backends".into(), v);
    }
    if a.parts.contains(&Part::Queue) {
        let (lines, v) = queue_part(&a, gantry, &http).await.context("queue part")?;
        table.extend(lines);
        doc.insert("queue".into(), v);
    }
    if a.parts.contains(&Part::Fanout) {
        let (lines, v) = fanout_part(&a, gantry, &http)
            .await
            .context("fan-out part")?;
        table.extend(lines);
        doc.insert("fanout".into(), v);
    }
    Ok(Results {
        table,
        json: Value::Object(doc),
    })
}

/// Sorted, without duplicates or zeros.
fn levels(v: &[usize]) -> Vec<usize> {
    let mut v: Vec<usize> = v.iter().copied().filter(|n| *n > 0).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The soft limit on open files, which bounds how many backends one process can hold.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------------------
// Shared measurements.

/// Poll the server's RSS until it stops growing (two samples in a row within 64 KiB or
/// 0.5 %), at most `limit`: the settled RSS (KiB), and the CPU share the server used
/// meanwhile (1.0 = one core).
async fn settle(server: &ServerProc, limit: Duration) -> (Option<u64>, Option<f64>) {
    let t0 = Instant::now();
    let cpu0 = server.cpu_seconds();
    let Some(mut prev) = server.rss_kib() else {
        return (None, None);
    };
    let mut stable = 0;
    while stable < 2 && t0.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(now) = server.rss_kib() else {
            return (None, None);
        };
        if now <= prev + (prev / 200).max(64) {
            stable += 1;
        } else {
            stable = 0;
        }
        prev = now;
    }
    let cpu = match (cpu0, server.cpu_seconds()) {
        (Some(a), Some(b)) => Some((b - a) / t0.elapsed().as_secs_f64()),
        _ => None,
    };
    (Some(prev), cpu)
}

/// The server's CPU share (1.0 = one core) over `window`, with nothing asked of it.
async fn idle_cpu(server: &ServerProc, window: Duration) -> Option<f64> {
    let t0 = Instant::now();
    let a = server.cpu_seconds()?;
    tokio::time::sleep(window).await;
    let b = server.cpu_seconds()?;
    Some((b - a) / t0.elapsed().as_secs_f64())
}

/// Backends by status in `/v1/backends`.
async fn backend_statuses(
    http: &reqwest::Client,
    server: &str,
) -> anyhow::Result<HashMap<String, usize>> {
    let v: Value = http
        .get(format!("{server}/v1/backends"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let mut by = HashMap::new();
    for b in v["backends"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let status = b["status"].as_str().unwrap_or("?").to_owned();
        *by.entry(status).or_insert(0) += 1;
    }
    Ok(by)
}

/// Wait until `count` backends are idle or busy, at most `limit`: how many were, how
/// long it took, and the statuses at the end.
async fn wait_connected(
    http: &reqwest::Client,
    server: &str,
    count: usize,
    limit: Duration,
) -> anyhow::Result<(usize, f64, HashMap<String, usize>)> {
    let t0 = Instant::now();
    loop {
        let by = backend_statuses(http, server).await?;
        let up = by.get("idle").copied().unwrap_or(0) + by.get("busy").copied().unwrap_or(0);
        if up >= count || t0.elapsed() >= limit {
            return Ok((up, t0.elapsed().as_secs_f64(), by));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Submit `n` jobs with `in_flight` at once, stopping early once `budget` has passed:
/// how many were accepted and how long it took.
async fn submit_many(
    http: &reqwest::Client,
    server: &str,
    n: usize,
    in_flight: usize,
    budget: Duration,
    body: Arc<dyn Fn(usize) -> Value + Send + Sync>,
) -> anyhow::Result<(usize, f64)> {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..in_flight.min(n) {
        let (next, done, http, url, body) = (
            next.clone(),
            done.clone(),
            http.clone(),
            server.to_owned(),
            body.clone(),
        );
        set.spawn(async move {
            loop {
                if t0.elapsed() >= budget {
                    return Ok::<_, anyhow::Error>(());
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok(());
                }
                submit(&http, &url, &body(i)).await?;
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if d % 10_000 == 0 {
                    let s = t0.elapsed().as_secs_f64();
                    eprintln!("    {d} submitted in {s:.1} s ({:.0}/s)", d as f64 / s);
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok((done.load(Ordering::Relaxed), t0.elapsed().as_secs_f64()))
}

fn stats_json(s: &Stats) -> Value {
    serde_json::to_value(s).unwrap_or(Value::Null)
}

fn opt_f(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "?".to_owned(), |x| format!("{x:.digits$}"))
}

// ---------------------------------------------------------------------------------------
// (a) Memory per backend.

async fn backends_part(
    a: &Options,
    gantry: &Binary,
    http: &reqwest::Client,
) -> anyhow::Result<(Vec<String>, Value)> {
    let counts = levels(&a.backends);
    let mut table = vec!["[backends] server RSS with B connected simulated backends".to_owned()];
    let mut rows = Vec::new();
    let mut points: Vec<(usize, u64)> = Vec::new();
    for &b in &counts {
        eprintln!("scale/backends: B={b}");
        match one_backend_count(a, gantry, http, b).await {
            Ok(row) => {
                if let (Some(rss), true) = (row["rss_kib"].as_u64(), row["all_connected"] == true) {
                    points.push((b, rss));
                }
                table.push(format!(
                    "[backends] B={b:>5}: {} of {b} connected in {:.2} s; RSS {} KiB (at start {} KiB, {:.1} KiB/backend above it); idle CPU {}%",
                    row["connected"],
                    row["connect_s"].as_f64().unwrap_or(f64::NAN),
                    row["rss_kib"],
                    row["rss_start_kib"],
                    row["kib_per_backend_above_start"].as_f64().unwrap_or(f64::NAN),
                    opt_f(row["idle_cpu"].as_f64().map(|c| c * 100.0), 1),
                ));
                if row["all_connected"] != true {
                    table.push(format!(
                        "[backends] B={b:>5}: NOT all connected; statuses {}",
                        row["statuses"]
                    ));
                }
                rows.push(row);
            }
            Err(e) => {
                table.push(format!("[backends] B={b:>5}: failed: {e:#}"));
                rows.push(json!({"backends": b, "error": format!("{e:#}")}));
            }
        }
    }
    let slope = match (points.first(), points.last()) {
        (Some(&(b0, r0)), Some(&(b1, r1))) if b1 > b0 => {
            Some((r1 as f64 - r0 as f64) / (b1 - b0) as f64)
        }
        _ => None,
    };
    match (slope, points.first(), points.last()) {
        (Some(s), Some((b0, _)), Some((b1, _))) => table.push(format!(
            "[backends] slope between B={b0} and B={b1}: {s:.1} KiB per backend"
        )),
        _ => table.push("[backends] slope: needs two backend counts that connected".to_owned()),
    }
    Ok((table, json!({"runs": rows, "kib_per_backend": slope})))
}

async fn one_backend_count(
    a: &Options,
    gantry: &Binary,
    http: &reqwest::Client,
    b: usize,
) -> anyhow::Result<Value> {
    let t_sims = Instant::now();
    let sims = Sims::spawn(gantry, b, 1.0, &[])
        .await
        .with_context(|| format!("starting {b} simulators"))?;
    let sims_s = t_sims.elapsed().as_secs_f64();
    let dir = tempfile::tempdir()?;
    let t0 = Instant::now();
    let server = ServerProc::spawn(gantry, dir.path(), &backends_toml(&sims.urls, "")).await?;
    let rss_start = server.rss_kib();
    let limit = Duration::from_secs(a.connect_timeout_s);
    let (up, wait_s, statuses) = wait_connected(http, &server.url, b, limit).await?;
    let connect_s = t0.elapsed().as_secs_f64();
    let (rss, cpu) = settle(&server, Duration::from_secs(6)).await;
    let per_backend = match (rss, rss_start) {
        (Some(r), Some(s)) => Some((r as f64 - s as f64) / b as f64),
        _ => None,
    };
    drop(sims);
    Ok(json!({
        "backends": b,
        "connected": up,
        "all_connected": up >= b,
        "statuses": statuses,
        "sims_start_s": sims_s,
        "connect_s": connect_s,
        "connect_after_first_poll_s": wait_s,
        "rss_start_kib": rss_start,
        "rss_kib": rss,
        "kib_per_backend_above_start": per_backend,
        "idle_cpu": cpu,
    }))
}

// ---------------------------------------------------------------------------------------
// (b) Queued jobs.

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

async fn queue_part(
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
            let d: Stats = serde_json::from_value(p["submit_to_dispatched_ms"].clone())
                .unwrap_or(Stats::of(&[]));
            let s: Stats =
                serde_json::from_value(p["submit_to_started_ms"].clone()).unwrap_or(Stats::of(&[]));
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

// ---------------------------------------------------------------------------------------
// (c) Event fan-out.

/// One event as a subscriber received it.
#[derive(Clone, Copy, Debug)]
struct Got {
    seq: i64,
    at_ms: Option<i64>,
    arrival_us: i64,
}

/// Read a subscriber's stream until it has seen `jobs` jobs end (or `deadline` passes).
async fn collect(
    mut rx: mpsc::UnboundedReceiver<StreamEvent>,
    jobs: usize,
    deadline: Instant,
    failed: Arc<AtomicBool>,
) -> (Vec<Got>, HashMap<String, u64>) {
    let mut got = Vec::new();
    let mut kinds = HashMap::new();
    let mut ended = HashSet::new();
    while ended.len() < jobs {
        let Ok(Some(e)) = tokio::time::timeout_at(deadline.into(), rx.recv()).await else {
            break;
        };
        let Some(seq) = e.data["seq"].as_i64() else {
            continue;
        };
        got.push(Got {
            seq,
            at_ms: e.data["at"].as_str().and_then(rfc3339_ms),
            arrival_us: e.at_us,
        });
        *kinds.entry(e.kind.clone()).or_insert(0) += 1;
        if matches!(e.kind.as_str(), "succeeded" | "failed" | "cancelled") {
            if e.kind != "succeeded" {
                failed.store(true, Ordering::Relaxed);
            }
            if let Some(job) = e.data["job_id"].as_str() {
                ended.insert(job.to_owned());
            }
        }
    }
    (got, kinds)
}

/// How one subscriber's sequence compares with the reference (the first subscriber's).
#[derive(Debug, Default, PartialEq, Eq)]
struct Order {
    /// Events whose seq is not above the one before (duplicates or reordering).
    out_of_order: usize,
    /// Reference seqs it never got.
    missing: usize,
    /// Seqs it got that the reference did not.
    extra: usize,
}

fn check_order(reference: &[i64], got: &[i64]) -> Order {
    let out_of_order = got.windows(2).filter(|w| w[1] <= w[0]).count();
    let mine: HashSet<i64> = got.iter().copied().collect();
    let theirs: HashSet<i64> = reference.iter().copied().collect();
    Order {
        out_of_order,
        missing: theirs.difference(&mine).count(),
        extra: mine.difference(&theirs).count(),
    }
}

/// Gaps inside a sequence: numbers between its first and last that it lacks.
fn gaps(seqs: &[i64]) -> usize {
    let set: HashSet<i64> = seqs.iter().copied().collect();
    match (set.iter().min(), set.iter().max()) {
        (Some(&lo), Some(&hi)) => (hi - lo + 1) as usize - set.len(),
        _ => 0,
    }
}

async fn fanout_part(
    a: &Options,
    gantry: &Binary,
    http: &reqwest::Client,
) -> anyhow::Result<(Vec<String>, Value)> {
    let counts = levels(&a.subscribers);
    let mut table = vec![format!(
        "[fanout] {} jobs x {} ms on {} simulated backends, S subscribers on /v1/events",
        a.fanout_jobs, a.job_ms, a.fanout_backends
    )];
    let mut rows = Vec::new();
    for &s in &counts {
        eprintln!("scale/fanout: S={s}");
        let row = one_fanout(a, gantry, http, s).await?;
        let spread: Stats =
            serde_json::from_value(row["spread_ms"].clone()).unwrap_or(Stats::of(&[]));
        let lag: Stats =
            serde_json::from_value(row["at_to_arrival_ms"].clone()).unwrap_or(Stats::of(&[]));
        table.push(format!(
            "[fanout] S={s:>4}: {} events; {} of {s} subscribers got every event once and in order (gaps in the reference: {}); wall {:.2} s; server CPU {} s ({} ms per job)",
            row["events"],
            row["complete_in_order"],
            row["reference_gaps"],
            row["wall_s"].as_f64().unwrap_or(f64::NAN),
            opt_f(row["server_cpu_s"].as_f64(), 2),
            opt_f(row["server_cpu_s"].as_f64().map(|c| c * 1000.0 / a.fanout_jobs as f64), 2),
        ));
        table.push(format!(
            "[fanout] S={s:>4}: spread across subscribers {}",
            spread.line("ms")
        ));
        table.push(format!(
            "[fanout] S={s:>4}: event at -> arrival {}",
            lag.line("ms")
        ));
        let gap: Stats =
            serde_json::from_value(row["idle_gap_ms"].clone()).unwrap_or(Stats::of(&[]));
        table.push(format!(
            "[fanout] S={s:>4}: backend idle gap between queued jobs (dispatch) {}",
            gap.line("ms")
        ));
        let kinds = &row["events_by_kind"];
        let listed: Vec<String> = ["queued", "dispatched", "submitted", "started", "succeeded"]
            .iter()
            .map(|k| format!("{k} {}", kinds[*k].as_u64().unwrap_or(0)))
            .collect();
        let started = kinds["started"].as_u64().unwrap_or(0);
        table.push(format!(
            "[fanout] S={s:>4}: events by kind (first subscriber): {}{}; server RSS after {} KiB",
            listed.join(", "),
            if started < a.fanout_jobs as u64 {
                format!(
                    " ({} jobs ended with no `started` event)",
                    a.fanout_jobs as u64 - started
                )
            } else {
                String::new()
            },
            row["rss_after_kib"],
        ));
        if row["jobs_failed"] == true {
            table.push(format!("[fanout] S={s:>4}: some jobs did not succeed"));
        }
        rows.push(row);
    }
    Ok((table, json!({"runs": rows})))
}

async fn one_fanout(
    a: &Options,
    gantry: &Binary,
    http: &reqwest::Client,
    s: usize,
) -> anyhow::Result<Value> {
    let sims = Sims::spawn(gantry, a.fanout_backends, 1.0, &[]).await?;
    let dir = tempfile::tempdir()?;
    let server = ServerProc::spawn(gantry, dir.path(), &backends_toml(&sims.urls, "")).await?;
    server.wait_backends(http, a.fanout_backends).await?;
    // Everything a batch can take, generously: its work spread over the backends, plus
    // a minute for overheads.
    let work_ms = a.job_ms * a.fanout_jobs as u64 / a.fanout_backends as u64;
    let deadline = Instant::now() + Duration::from_millis(work_ms * 4) + Duration::from_secs(60);
    let failed = Arc::new(AtomicBool::new(false));
    let mut subs = Vec::with_capacity(s);
    for _ in 0..s {
        // Each its own connection; the server has subscribed it once the headers came.
        let rx = follow_events(http, &server.url, 0).await?;
        subs.push(tokio::spawn(collect(
            rx,
            a.fanout_jobs,
            deadline,
            failed.clone(),
        )));
    }
    let cpu0 = server.cpu_seconds();
    let t0 = Instant::now();
    let job_ms = a.job_ms;
    let body: Arc<dyn Fn(usize) -> Value + Send + Sync> =
        Arc::new(move |i| json!({"workflow": sleep_workflow(job_ms, 1, i as u64)}));
    let (submitted, _) = submit_many(
        http,
        &server.url,
        a.fanout_jobs,
        16,
        Duration::from_secs(3600),
        body,
    )
    .await?;
    let mut all = Vec::with_capacity(s);
    let mut kinds = HashMap::new();
    for (i, h) in subs.into_iter().enumerate() {
        let (got, k) = h.await.context("a subscriber task")?;
        if i == 0 {
            kinds = k;
        }
        all.push(got);
    }
    let wall_s = t0.elapsed().as_secs_f64();
    let cpu = match (cpu0, server.cpu_seconds()) {
        (Some(x), Some(y)) => Some(y - x),
        _ => None,
    };
    let rss_after = server.rss_kib();
    // Dispatch, seen from the backends: how long each stays idle between two prompts
    // while jobs wait (the streams must not widen it).
    let idle_gap = Stats::of(&idle_gaps(&sims.runs(http).await?));
    drop(sims);

    let reference: Vec<i64> = all
        .first()
        .map(|g| g.iter().map(|e| e.seq).collect())
        .unwrap_or_default();
    let mut first_arrival: HashMap<i64, i64> = HashMap::new();
    for g in all.iter().flatten() {
        first_arrival
            .entry(g.seq)
            .and_modify(|t| *t = (*t).min(g.arrival_us))
            .or_insert(g.arrival_us);
    }
    let mut spread = Vec::new();
    let mut lag = Vec::new();
    let mut complete = 0;
    let mut problems = Vec::new();
    for (i, got) in all.iter().enumerate() {
        let seqs: Vec<i64> = got.iter().map(|e| e.seq).collect();
        let order = check_order(&reference, &seqs);
        if order == Order::default() {
            complete += 1;
        } else if problems.len() < 10 {
            problems.push(json!({
                "subscriber": i,
                "out_of_order": order.out_of_order,
                "missing": order.missing,
                "extra": order.extra,
            }));
        }
        for e in got {
            if let Some(first) = first_arrival.get(&e.seq) {
                spread.push(ms(e.arrival_us - first));
            }
            if let Some(at) = e.at_ms {
                lag.push(ms(e.arrival_us - at * 1000));
            }
        }
    }
    Ok(json!({
        "subscribers": s,
        "backends": a.fanout_backends,
        "jobs": a.fanout_jobs,
        "submitted": submitted,
        "jobs_failed": failed.load(Ordering::Relaxed),
        "events": reference.len(),
        "events_by_kind": kinds,
        "reference_gaps": gaps(&reference),
        "complete_in_order": complete,
        "problems": problems,
        "wall_s": wall_s,
        "server_cpu_s": cpu,
        "rss_after_kib": rss_after,
        "idle_gap_ms": stats_json(&idle_gap),
        "spread_ms": stats_json(&Stats::of(&spread)),
        "at_to_arrival_ms": stats_json(&Stats::of(&lag)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_checks() {
        let r = [1, 2, 3, 4];
        assert_eq!(check_order(&r, &[1, 2, 3, 4]), Order::default());
        assert_eq!(
            check_order(&r, &[1, 3, 2, 4]),
            Order {
                out_of_order: 1,
                ..Order::default()
            }
        );
        assert_eq!(
            check_order(&r, &[1, 2, 2, 4, 5]),
            Order {
                out_of_order: 1,
                missing: 1,
                extra: 1
            }
        );
        assert_eq!(gaps(&[3, 4, 6, 7]), 1);
        assert_eq!(levels(&[100, 1, 0, 10, 10]), vec![1, 10, 100]);
    }
}
