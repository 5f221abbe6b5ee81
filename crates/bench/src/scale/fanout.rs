//! `gantry bench scale`'s fan-out part: S subscribers on `/v1/events` while a batch runs:
//! whether each got every event once and in order, how far apart, and whether dispatch
//! slowed.

use super::measure::{levels, opt_f, stats_json, submit_many};
use super::Options;
use crate::client::sleep_workflow;
use crate::process::Binary;
use crate::server::{backends_toml, ServerProc};
use crate::sims::{idle_gaps, Sims};
use crate::stats::Stats;
use crate::stream::{follow_events, StreamEvent};
use crate::time::{ms, rfc3339_ms};
use anyhow::Context;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

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

pub(super) async fn fanout_part(
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
        let spread: Stats = Stats::from_json(&row["spread_ms"]);
        let lag: Stats = Stats::from_json(&row["at_to_arrival_ms"]);
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
        let gap: Stats = Stats::from_json(&row["idle_gap_ms"]);
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
