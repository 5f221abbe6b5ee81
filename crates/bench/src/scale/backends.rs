//! `gantry bench scale`'s backends part: the server's memory with B simulated backends
//! connected, and its slope per backend.

use super::measure::{levels, opt_f, settle, wait_connected};
use super::Options;
use crate::process::Binary;
use crate::server::{backends_toml, ServerProc};
use crate::sims::Sims;
use anyhow::Context;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub(super) async fn backends_part(
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
