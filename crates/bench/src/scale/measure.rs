//! What the parts of `gantry bench scale` measure alike: the server's settled memory
//! and idle CPU, its backends' statuses, a queue filled at a given concurrency.

use crate::client::submit;
use crate::server::ServerProc;
use crate::stats::Stats;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Sorted, without duplicates or zeros.
pub(super) fn levels(v: &[usize]) -> Vec<usize> {
    let mut v: Vec<usize> = v.iter().copied().filter(|n| *n > 0).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The soft limit on open files, which bounds how many backends one process can hold.
pub(super) fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
}

/// Poll the server's RSS until it stops growing (two samples in a row within 64 KiB or
/// 0.5 %), at most `limit`: the settled RSS (KiB), and the CPU share the server used
/// meanwhile (1.0 = one core).
pub(super) async fn settle(server: &ServerProc, limit: Duration) -> (Option<u64>, Option<f64>) {
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
pub(super) async fn idle_cpu(server: &ServerProc, window: Duration) -> Option<f64> {
    let t0 = Instant::now();
    let a = server.cpu_seconds()?;
    tokio::time::sleep(window).await;
    let b = server.cpu_seconds()?;
    Some((b - a) / t0.elapsed().as_secs_f64())
}

/// Backends by status in `/v1/backends`.
pub(super) async fn backend_statuses(
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
pub(super) async fn wait_connected(
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
pub(super) async fn submit_many(
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

/// `s` as JSON. Stats are numbers only (a NaN is written as null), so this cannot fail.
pub(super) fn stats_json(s: &Stats) -> Value {
    serde_json::to_value(s).unwrap_or(Value::Null)
}

pub(super) fn opt_f(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "?".to_owned(), |x| format!("{x:.digits$}"))
}
