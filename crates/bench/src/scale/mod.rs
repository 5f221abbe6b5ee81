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

mod backends;
mod fanout;
mod measure;
mod queue;

use crate::client::http;
use crate::process::Binary;
use crate::report::Results;
use anyhow::{bail, Context};
use serde_json::{json, Value};

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

/// Run the parts `a.parts` names, in order, each on fresh processes.
pub async fn run(a: Options, gantry: &Binary) -> anyhow::Result<Results> {
    if a.in_flight == 0 || a.fanout_backends == 0 || a.fanout_jobs == 0 {
        bail!("--in-flight, --fanout-backends and --fanout-jobs must be at least 1");
    }
    let http = http()?;
    let mut table = Vec::new();
    let mut doc = serde_json::Map::new();
    doc.insert(
        "open_files_limit".into(),
        json!(measure::open_files_limit()),
    );
    if a.parts.contains(&Part::Backends) {
        let (lines, v) = backends::backends_part(&a, gantry, &http)
            .await
            .context("backends part")?;
        table.extend(lines);
        doc.insert("backends".into(), v);
    }
    if a.parts.contains(&Part::Queue) {
        let (lines, v) = queue::queue_part(&a, gantry, &http)
            .await
            .context("queue part")?;
        table.extend(lines);
        doc.insert("queue".into(), v);
    }
    if a.parts.contains(&Part::Fanout) {
        let (lines, v) = fanout::fanout_part(&a, gantry, &http)
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
