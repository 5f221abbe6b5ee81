//! What a scenario found, printed for people and written as JSON for scripts, with the
//! machine the numbers come from.

use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::path::Path;

/// Print `results` of scenario `name`: its table and its JSON report on stdout, the
/// report in `json` too when given; an error when the results list `problems`.
pub fn publish(name: &str, results: Results, json: Option<&Path>) -> anyhow::Result<()> {
    let report = json!({
        "scenario": name,
        "machine": machine(),
        "results": results.json,
    });
    println!("\n== gantry bench {name} ==");
    for line in &results.table {
        println!("{line}");
    }
    let text = serde_json::to_string_pretty(&report)?;
    println!("\n{text}");
    if let Some(path) = json {
        std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    // A scenario that checks promises lists what it found broken under `problems`.
    if let Some(problems) = report["results"]["problems"]
        .as_array()
        .filter(|p| !p.is_empty())
    {
        bail!(
            "gantry bench {name}: {} problems (listed above)",
            problems.len()
        );
    }
    Ok(())
}

/// What a scenario found: lines for people and a document for scripts.
pub struct Results {
    pub table: Vec<String>,
    pub json: Value,
}

/// The machine the numbers come from. It describes, it measures nothing: where `/proc`
/// cannot be read (not Linux), memory 0 and an empty CPU name say "unknown".
fn machine() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    json!({"cores": cores, "memory_gib": mem_kib / (1024 * 1024), "cpu": cpu})
}
