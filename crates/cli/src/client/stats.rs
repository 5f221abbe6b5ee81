//! `gantry stats`: node timings over the farm's history, per class (and per workflow or
//! backend with `--by`), from `GET /v1/stats/nodes`.

use super::opts::ServerOpts;
use gantry_client::Error;
use serde_json::json;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// Only this node class.
    #[arg(long)]
    class: Option<String>,
    /// Only this workflow shape (a job's workflow_hash).
    #[arg(long)]
    workflow: Option<String>,
    /// Only this backend.
    #[arg(long)]
    backend: Option<String>,
    /// From this moment: RFC 3339, or a duration ago (24h, 7d).
    #[arg(long)]
    since: Option<String>,
    /// Also group by workflow and/or backend, comma-separated.
    #[arg(long)]
    by: Option<String>,
    /// Print the node-stall limit history gives each class on each backend, and why
    /// (in force for the classes `[adaptive]` names).
    #[arg(long)]
    suggest_timeouts: bool,
    #[command(flatten)]
    opts: ServerOpts,
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 1000.0 => format!("{:.2} s", v / 1000.0),
        Some(v) => format!("{v:.0} ms"),
        None => "-".into(),
    }
}

pub async fn run(a: StatsArgs) -> Result<ExitCode, Error> {
    let client = a.opts.client()?;
    if a.suggest_timeouts {
        return suggest(&client, &a).await;
    }
    let mut query: Vec<(&str, &str)> = Vec::new();
    for (k, v) in [
        ("class", &a.class),
        ("workflow", &a.workflow),
        ("backend", &a.backend),
        ("since", &a.since),
        ("by", &a.by),
    ] {
        if let Some(v) = v {
            query.push((k, v));
        }
    }
    let list = client.node_stats(&query).await?;
    if a.opts.json() {
        println!("{}", json!(list));
        return Ok(ExitCode::SUCCESS);
    }
    let extra = |e: &gantry_client::wire::NodeStatsEntry| {
        let mut cols = Vec::new();
        if let Some(w) = &e.workflow {
            cols.push(w.chars().take(12).collect::<String>());
        }
        if let Some(b) = &e.backend {
            cols.push(b.clone());
        }
        cols.join("  ")
    };
    println!(
        "{:<26} {:>7} {:>7} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9}  {}",
        "CLASS",
        "RUNS",
        "CACHED",
        "FAILED",
        "TIMEOUTS",
        "P50",
        "P95",
        "P99",
        "MAX",
        a.by.as_deref()
            .unwrap_or("")
            .replace(',', "  ")
            .to_uppercase()
    );
    for e in &list.stats {
        println!(
            "{:<26} {:>7} {:>6.0}% {:>6} {:>8} {:>9} {:>9} {:>9} {:>9}  {}",
            e.class,
            e.count,
            e.cached_ratio * 100.0,
            e.failed,
            e.timed_out,
            ms(e.p50_ms),
            ms(e.p95_ms),
            ms(e.p99_ms),
            ms(e.max_ms),
            extra(e)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn suggest(client: &gantry_client::Client, a: &StatsArgs) -> Result<ExitCode, Error> {
    let s = client.timeout_suggestions().await?;
    if a.opts.json() {
        println!("{}", json!(s));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "adaptive stall limits {}: max(floor {}, {} x p99), from {} runs on the backend or farm-wide",
        if s.enabled {
            format!("on for {}", s.classes.join(", "))
        } else {
            "off (what [adaptive] would set)".to_owned()
        },
        ms(Some(s.floor_ms as f64)),
        s.factor,
        s.min_samples
    );
    println!(
        "{:<26} {:<14} {:>10} {:>11}  {:<8} WHY",
        "CLASS", "BACKEND", "P99", "NODE_STALL", "APPLIED"
    );
    for t in s.suggestions.iter().filter(|t| {
        a.class.as_ref().is_none_or(|c| *c == t.class)
            && a.backend.as_ref().is_none_or(|b| *b == t.backend)
    }) {
        println!(
            "{:<26} {:<14} {:>10} {:>11}  {:<8} {}",
            t.class,
            t.backend,
            ms(t.p99_ms),
            ms(t.node_stall_ms.map(|v| v as f64)),
            if t.applied { "yes" } else { "no" },
            t.reason
        );
    }
    Ok(ExitCode::SUCCESS)
}
