//! `gantry profile JOB [--vs JOB2] [--format table|json|csv]`: where an attempt's time
//! went, node by node, on one time axis; or the per-node deltas between two jobs.

use super::opts::ServerOpts;
use super::pretty_json;
use gantry_client::wire::{AttemptProfile, NodeProfile, NodeStatus};
use gantry_client::{Error, Job};
use serde_json::json;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct ProfileArgs {
    job: String,
    /// Compare with this job: per-node durations and their difference.
    #[arg(long, value_name = "JOB")]
    vs: Option<String>,
    /// The attempt to show (1, 2, ...); the last one that has a profile by default.
    #[arg(long)]
    attempt: Option<u32>,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    #[command(flatten)]
    opts: ServerOpts,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

const BAR: usize = 40;

/// The profile of `job`'s attempt `n` (or its last profiled one).
fn profile_of(job: &Job, n: Option<u32>) -> Result<(u32, String, AttemptProfile), String> {
    let found = match n {
        Some(n) => job.attempts.iter().find(|a| a.number == n),
        None => job.attempts.iter().rev().find(|a| a.profile.is_some()),
    };
    match found {
        Some(a) => match &a.profile {
            Some(p) => Ok((a.number, a.backend.clone(), (**p).clone())),
            None => Err(format!(
                "job {} attempt {} has no profile yet: it is {}",
                job.id,
                a.number,
                a.status.as_str()
            )),
        },
        None => Err(match n {
            Some(n) => format!("job {} has no attempt {n}", job.id),
            None => format!(
                "job {} has no finished attempt yet (it is {}): nothing to profile",
                job.id, job.state
            ),
        }),
    }
}

fn ms(v: Option<i64>) -> String {
    match v {
        Some(ms) if ms >= 10_000 => format!("{:.1} s", ms as f64 / 1000.0),
        Some(ms) if ms >= 1000 => format!("{:.2} s", ms as f64 / 1000.0),
        Some(ms) => format!("{ms} ms"),
        None => "-".into(),
    }
}

/// Slowest first; nodes without a duration after, in execution order.
fn by_duration(p: &AttemptProfile) -> Vec<&NodeProfile> {
    let mut nodes: Vec<&NodeProfile> = p.nodes.iter().collect();
    nodes.sort_by_key(|n| std::cmp::Reverse(n.duration_ms.map_or(i64::MIN, |d| d)));
    nodes
}

/// A node's run as a bar on the axis `[from, to]`.
fn bar(n: &NodeProfile, from: i64, to: i64) -> String {
    let mut cells = vec![' '; BAR];
    let span = (to - from).max(1) as f64;
    let cell = |t: i64| {
        (((t - from) as f64 / span) * BAR as f64)
            .floor()
            .clamp(0.0, (BAR - 1) as f64) as usize
    };
    match (n.status, n.start, n.end) {
        (NodeStatus::Cached, _, _) => return format!("|{:<BAR$}|", "(cached)"),
        (_, Some(s), Some(e)) => {
            for c in cells.iter_mut().take(cell(e) + 1).skip(cell(s)) {
                *c = '#';
            }
        }
        (_, Some(s), None) => {
            cells[cell(s)] = '#';
            for c in cells.iter_mut().skip(cell(s) + 1) {
                *c = '?';
            }
        }
        _ => {}
    }
    format!("|{}|", cells.into_iter().collect::<String>())
}

fn print_table(job: &Job, number: u32, backend: &str, p: &AttemptProfile) {
    println!(
        "job {} attempt {number} on {backend}: {} (queue {}, execution {}, total {})",
        job.id,
        job.state,
        ms(p.queue_ms),
        ms(p.execution_ms),
        ms(p.total_ms)
    );
    println!(
        "{} executed, {} cached, {} failed{}",
        p.summary.executed,
        p.summary.cached,
        p.summary.failed,
        if p.complete {
            ""
        } else {
            "; the record is incomplete"
        }
    );
    for g in &p.gaps {
        println!("  missing: {}", g.reason);
    }
    let starts = p.nodes.iter().filter_map(|n| n.start);
    let from = p.started_at.into_iter().chain(starts).min().unwrap_or(0);
    let ends = p.nodes.iter().filter_map(|n| n.end);
    let to = p.completed_at.into_iter().chain(ends).max().unwrap_or(from);
    println!(
        "{:<6} {:<22} {:<18} {:<11} {:>9}  TIMELINE ({} from start)",
        "NODE",
        "CLASS",
        "TITLE",
        "STATUS",
        "DURATION",
        ms(Some(to - from))
    );
    for n in by_duration(p) {
        let steps = if n.progress_count > 0 {
            format!(" {} steps", n.progress_count)
        } else {
            String::new()
        };
        println!(
            "{:<6} {:<22} {:<18} {:<11} {:>9}  {}{steps}",
            n.id,
            fit(&n.class_type, 22),
            fit(n.title.as_deref().unwrap_or(""), 18),
            n.status.as_str(),
            ms(n.duration_ms),
            bar(n, from, to)
        );
        if let Some(e) = &n.error {
            println!("       error: {e}");
        }
    }
}

/// `s` in at most `width` characters, so the columns stay aligned.
fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_owned()
    } else {
        let cut: String = s.chars().take(width - 1).collect();
        format!("{cut}~")
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn print_csv(p: &AttemptProfile) {
    println!("node,class_type,title,status,start_offset_ms,end_offset_ms,duration_ms,progress_count,error");
    let origin = p.started_at.unwrap_or(0);
    let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
    for n in &p.nodes {
        println!(
            "{},{},{},{},{},{},{},{},{}",
            csv_field(&n.id),
            csv_field(&n.class_type),
            csv_field(n.title.as_deref().unwrap_or("")),
            n.status.as_str(),
            opt(n.start.map(|s| s - origin)),
            opt(n.end.map(|e| e - origin)),
            opt(n.duration_ms),
            n.progress_count,
            csv_field(n.error.as_deref().unwrap_or(""))
        );
    }
}

/// Per node id: its class, both durations and the difference (b - a).
fn deltas(a: &AttemptProfile, b: &AttemptProfile) -> Vec<serde_json::Value> {
    let mut ids: Vec<&str> = a.nodes.iter().map(|n| n.id.as_str()).collect();
    for n in &b.nodes {
        if !ids.contains(&n.id.as_str()) {
            ids.push(&n.id);
        }
    }
    ids.into_iter()
        .map(|id| {
            let na = a.nodes.iter().find(|n| n.id == id);
            let nb = b.nodes.iter().find(|n| n.id == id);
            let (da, db) = (
                na.and_then(|n| n.duration_ms),
                nb.and_then(|n| n.duration_ms),
            );
            json!({
                "node": id,
                "class_type": na.or(nb).map(|n| n.class_type.clone()),
                "a_status": na.map(|n| n.status.as_str()),
                "b_status": nb.map(|n| n.status.as_str()),
                "a_ms": da,
                "b_ms": db,
                "delta_ms": da.zip(db).map(|(x, y)| y - x),
            })
        })
        .collect()
}

pub async fn run(a: ProfileArgs) -> Result<ExitCode, Error> {
    let client = a.opts.client()?;
    let job = client.job(&a.job).await?;
    let (number, backend, p) = match profile_of(&job, a.attempt) {
        Ok(found) => found,
        Err(message) => {
            eprintln!("gantry: {message}");
            return Ok(ExitCode::from(1));
        }
    };
    let Some(other) = &a.vs else {
        match a.format {
            Format::Table => print_table(&job, number, &backend, &p),
            Format::Json => println!(
                "{}",
                pretty_json(
                    &json!({"job": job.id, "attempt": number, "backend": backend, "profile": p}),
                    &format!("the profile of job {}", job.id)
                )?
            ),
            Format::Csv => print_csv(&p),
        }
        return Ok(ExitCode::SUCCESS);
    };
    let job_b = client.job(other).await?;
    let (number_b, _, pb) = match profile_of(&job_b, None) {
        Ok(found) => found,
        Err(message) => {
            eprintln!("gantry: {message}");
            return Ok(ExitCode::from(1));
        }
    };
    let rows = deltas(&p, &pb);
    let total = p.execution_ms.zip(pb.execution_ms).map(|(x, y)| y - x);
    match a.format {
        Format::Json => println!(
            "{}",
            pretty_json(
                &json!({
                    "a": {"job": job.id, "attempt": number, "execution_ms": p.execution_ms},
                    "b": {"job": job_b.id, "attempt": number_b, "execution_ms": pb.execution_ms},
                    "execution_delta_ms": total,
                    "nodes": rows,
                }),
                &format!("the comparison of jobs {} and {}", job.id, job_b.id)
            )?
        ),
        Format::Csv => {
            println!("node,class_type,a_status,b_status,a_ms,b_ms,delta_ms");
            for r in &rows {
                let f = |k: &str| match &r[k] {
                    serde_json::Value::Null => String::new(),
                    serde_json::Value::String(s) => csv_field(s),
                    v => v.to_string(),
                };
                println!(
                    "{},{},{},{},{},{},{}",
                    f("node"),
                    f("class_type"),
                    f("a_status"),
                    f("b_status"),
                    f("a_ms"),
                    f("b_ms"),
                    f("delta_ms")
                );
            }
        }
        Format::Table => {
            println!(
                "A = job {} attempt {number}, B = job {} attempt {number_b}: execution {} vs {} ({})",
                job.id,
                job_b.id,
                ms(p.execution_ms),
                ms(pb.execution_ms),
                signed(total)
            );
            println!(
                "{:<6} {:<22} {:>10} {:>10} {:>10}",
                "NODE", "CLASS", "A", "B", "B - A"
            );
            for r in &rows {
                let d = |k: &str| r[k].as_i64();
                let show = |k: &str, s: &str| match d(k) {
                    Some(v) => ms(Some(v)),
                    None => r[s].as_str().unwrap_or("-").to_owned(),
                };
                println!(
                    "{:<6} {:<22} {:>10} {:>10} {:>10}",
                    r["node"].as_str().unwrap_or_default(),
                    r["class_type"].as_str().unwrap_or_default(),
                    show("a_ms", "a_status"),
                    show("b_ms", "b_status"),
                    signed(d("delta_ms"))
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn signed(v: Option<i64>) -> String {
    match v {
        Some(v) if v >= 0 => format!("+{}", ms(Some(v))),
        Some(v) => format!("-{}", ms(Some(-v))),
        None => "-".into(),
    }
}
