//! The chaos run's plan, all drawn from the seed: its options, the faults each simulator
//! gets, the jobs of the load (a few doomed by design) and where the kills fall.

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{json, Value};
use std::time::Duration;

/// One job in this many runs a node that always raises.
pub(super) const DOOMED_EVERY: usize = 50;
/// Workflow shapes in the load.
pub(super) const SHAPES: usize = 16;

/// The faults of simulator `i % 8`; each spec as `gantry sim --fault` takes it (times
/// are simulated, so divided by `--speed`).
/// Stalls are spread over several simulators at a modest rate each: a stall holds its
/// backend for the whole limit, and three faults in a row open its circuit, so one
/// simulator stalling often would mostly sit out the run and give few samples.
pub(super) const MIXES: [&[&str]; 8] = [
    // A node that stops half way or on its last step, and a server that goes quiet.
    &["stall:at=50,p=0.15", "stall:at=99,p=0.05"],
    // A node that stops (or never starts) while the socket repeats the same progress.
    &["stall:at=30,chatty,p=0.1", "stall:at=0,chatty,p=0.05"],
    // A worker that hangs before starting and takes nothing more (`operate` restarts it
    // when gantry reports the timeout, as an operator would), and a stall.
    &["hang-before-start:p=0.1", "stall:at=70,p=0.1"],
    // A server that dies at every 15th run and comes back empty, and a stall.
    &["crash:after_jobs=14,restart_ms=2000", "stall:at=10,p=0.1"],
    // A node that raises (retried elsewhere) and CUDA out of memory.
    &["error:class=GantrySleep,p=0.15", "oom:p=0.1"],
    // Slow nodes, and a node that never makes its first step.
    &["slow:factor=4,p=0.3", "stall:at=0,p=0.05"],
    // Sockets dropped mid-run, and a chatty stall.
    &["ws-drop:after_ms=1000,p=0.25", "stall:at=60,chatty,p=0.1"],
    // A silent socket, a lost history entry, now and then both (a lost prompt).
    &["ws-silent:p=0.2", "lose-history:p=0.2"],
];
/// The mix whose hang needs an operator.
pub(super) const HANG_MIX: usize = 2;

/// What `gantry bench chaos` runs (the command's flags, parsed by the cli).
pub struct Options {
    /// Jobs to send (every one until acknowledged).
    pub jobs: usize,
    /// Simulated backends, each with a mix of faults (eight mixes, repeated beyond).
    pub sims: usize,
    /// SIGKILLs of a coordinator, each followed by its restart.
    pub kills: usize,
    /// A PostgreSQL database: `--coordinators` share a fresh schema in it (dropped at
    /// the end). Without it, one coordinator on the embedded store.
    pub store: Option<String>,
    /// Coordinators on the Postgres store.
    pub coordinators: usize,
    /// The seed of the load, the faults and the kill points (random when not given;
    /// printed either way).
    pub seed: Option<u64>,
    /// Simulator speed (times faster than real).
    pub speed: f64,
    /// The server's start, first-progress and node-stall limits.
    pub limit: Duration,
    /// Jobs sent and not yet terminal, at most.
    pub window: usize,
    /// Every job must be terminal this long after the later of the last acknowledged
    /// submit and the last restart; also the longest the run may go without a job
    /// ending while some are outstanding.
    pub settle: Duration,
    /// The lease of each backend (Postgres store).
    pub lease: Duration,
}

/// What kind of job the load sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Plan {
    /// Must succeed, whatever the faults.
    Work,
    /// Runs `GantryFail`: must fail, as the workflow's fault.
    Doomed,
}

/// What each job of a load of `jobs` is: one in `DOOMED_EVERY` doomed, the rest work.
pub(super) fn plans(jobs: usize) -> Vec<Plan> {
    (0..jobs)
        .map(|i| {
            if i % DOOMED_EVERY == DOOMED_EVERY - 1 {
                Plan::Doomed
            } else {
                Plan::Work
            }
        })
        .collect()
}

/// Where the kills fall, drawn from `rng` after the load's bodies (so a seed replays
/// both): kill k when the succeeded jobs reach a point drawn in the k-th of `kills`
/// equal stretches of 10%..90% of the run, away from its edges; with the coordinator
/// it kills.
pub(super) fn kill_points(a: &Options, n_coord: usize, rng: &mut StdRng) -> Vec<(usize, usize)> {
    (0..a.kills)
        .map(|k| {
            let span = 0.8 / a.kills as f64;
            let at = 0.1 + span * (k as f64 + rng.random_range(0.2..0.8));
            let victim = rng.random_range(0..n_coord);
            (((a.jobs as f64) * at) as usize, victim)
        })
        .collect()
}

/// The request of job `i`: a sleeping node of 1 to 3 simulated seconds in ten steps,
/// or for a doomed job a node that raises after two steps. Its node ids are one of
/// `SHAPES` sets, so the jobs have that many workflow shapes, as a farm's do: a fault
/// blocks its backend for one shape (`block_cooldown`), not for the whole load.
pub(super) fn body(plan: Plan, i: usize, seed: u64, rng: &mut StdRng) -> Value {
    // Unique per job (no cached outputs), and exact as a JSON number.
    let wf_seed = (seed % 1_000_000) * 1_000_000 + i as u64;
    let base = (i % SHAPES) * 10;
    let (load, work, save) = (
        (base + 1).to_string(),
        (base + 2).to_string(),
        (base + 3).to_string(),
    );
    let node = match plan {
        Plan::Work => json!({"class_type": "GantrySleep", "inputs": {
            "image": [load, 0],
            "seconds": rng.random_range(1.0..3.0),
            "steps": 10,
            "seed": wf_seed,
        }}),
        Plan::Doomed => json!({"class_type": "GantryFail", "inputs": {
            "image": [load, 0],
            "message": "chaos: doomed by design",
            "seed": wf_seed,
            "steps_before_fail": 2,
            "step_seconds": 0.2,
        }}),
    };
    let workflow = json!({
        load.clone(): {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        work.clone(): node,
        save: {"class_type": "SaveImage", "inputs": {"filename_prefix": "chaos", "images": [work, 0]}},
    });
    json!({"workflow": workflow, "idempotency_key": format!("chaos-{seed}-{i}")})
}
