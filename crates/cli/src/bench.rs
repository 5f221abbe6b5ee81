//! `gantry bench`: its flags (clap) and the dispatch into `gantry-bench`, which runs the
//! scenarios. Each scenario's defaults and help live here; its `Options` there.

use anyhow::Context;
use gantry_bench::{
    chaos, cluster, engine, failover, overhead, profile, restart, routing, scale, throughput,
};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
    /// Also write the results as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum Scenario {
    /// Direct client against gantry on the same simulators: wall time, added latency, idle gap.
    Overhead(Overhead),
    /// Fully cached jobs through many simulated backends: jobs per second, and a profile.
    Throughput(Throughput),
    /// The engine alone (store, scheduler, bus) with in-process backends that finish at once.
    Engine(Engine),
    /// Some backends hang or stall: detection lag past the configured limit.
    Failover(Failover),
    /// Many backends, deep queues, many event subscribers: memory and latency as they grow.
    Scale(Scale),
    /// SIGKILL the server under load and time the recovery.
    Restart(Restart),
    /// One and several coordinators on one PostgreSQL database: throughput, dispatch latency.
    Cluster(Cluster),
    /// What the always-on per-node profile costs each job.
    Profile(Profile),
    /// Warm-model routing against random routing on backends with costly model loads.
    Routing(Routing),
    /// Faulty backends and the coordinator SIGKILLed: no job lost, none succeeded twice,
    /// none stuck, every stall detected in time (exits 1 on a problem).
    Chaos(Chaos),
}

/// Run the scenario: its table and JSON on stdout (and in `--json`'s file), an error when
/// it found problems. The scenarios start `gantry serve` and `gantry sim` from this very
/// executable.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let scenario = match args.scenario {
        Scenario::Overhead(a) => gantry_bench::Scenario::Overhead(a.options()),
        Scenario::Throughput(a) => gantry_bench::Scenario::Throughput(a.options()),
        Scenario::Engine(a) => gantry_bench::Scenario::Engine(a.options()),
        Scenario::Failover(a) => gantry_bench::Scenario::Failover(a.options()),
        Scenario::Scale(a) => gantry_bench::Scenario::Scale(a.options()),
        Scenario::Restart(a) => gantry_bench::Scenario::Restart(a.options()),
        Scenario::Cluster(a) => gantry_bench::Scenario::Cluster(a.options()),
        Scenario::Profile(a) => gantry_bench::Scenario::Profile(a.options()),
        Scenario::Routing(a) => gantry_bench::Scenario::Routing(a.options()),
        Scenario::Chaos(a) => gantry_bench::Scenario::Chaos(a.options()),
    };
    let gantry = gantry_bench::Binary::at(
        std::env::current_exe().context("cannot find the gantry executable")?,
    );
    gantry_bench::run(&gantry, scenario, args.json.as_deref()).await
}

/// A duration flag, bounded as the config file's durations are.
fn duration(s: &str) -> Result<Duration, String> {
    gantry_server::config::parse_duration("duration", s).map_err(|e| e.to_string())
}

/// `gantry bench scale --parts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Backends,
    Queue,
    Fanout,
}

impl From<Part> for scale::Part {
    fn from(p: Part) -> scale::Part {
        match p {
            Part::Backends => scale::Part::Backends,
            Part::Queue => scale::Part::Queue,
            Part::Fanout => scale::Part::Fanout,
        }
    }
}

#[derive(clap::Args)]
struct Overhead {
    /// Jobs per run.
    #[arg(long, default_value_t = 640)]
    jobs: usize,
    /// Simulated backends.
    #[arg(long, default_value_t = 64)]
    backends: usize,
    /// How long each job's work takes on the backend, in ms.
    #[arg(long, default_value_t = 1000)]
    job_ms: u64,
}

impl Overhead {
    fn options(self) -> overhead::Options {
        overhead::Options {
            jobs: self.jobs,
            backends: self.backends,
            job_ms: self.job_ms,
        }
    }
}

#[derive(clap::Args)]
struct Throughput {
    /// Jobs to run.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Simulated backends.
    #[arg(long, default_value_t = 64)]
    backends: usize,
    /// Client connections submitting at once.
    #[arg(long, default_value_t = 64)]
    submitters: usize,
    /// Then profile a second server with `perf record` under a quarter of the load.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    profile: bool,
}

impl Throughput {
    fn options(self) -> throughput::Options {
        throughput::Options {
            jobs: self.jobs,
            backends: self.backends,
            submitters: self.submitters,
            profile: self.profile,
        }
    }
}

#[derive(clap::Args)]
struct Engine {
    /// Jobs to run.
    #[arg(long, default_value_t = 50_000)]
    jobs: usize,
    /// In-process backends.
    #[arg(long, default_value_t = 64)]
    backends: usize,
    /// Tasks submitting at once.
    #[arg(long, default_value_t = 256)]
    submitters: usize,
}

impl Engine {
    fn options(self) -> engine::Options {
        engine::Options {
            jobs: self.jobs,
            backends: self.backends,
            submitters: self.submitters,
        }
    }
}

#[derive(clap::Args)]
struct Failover {
    /// Simulated backends.
    #[arg(long, default_value_t = 8)]
    backends: usize,
    /// Jobs to run; every one must succeed.
    #[arg(long, default_value_t = 100)]
    jobs: usize,
    /// Share of the backends that hang before start; as many again stall mid-node (at
    /// least one of each when above 0).
    #[arg(long, default_value_t = 0.25)]
    faulty: f64,
    /// The simulator fault the stalling backends get (see `gantry sim --fault`).
    #[arg(long, default_value = "stall:at=50")]
    stall_spec: String,
    /// How long each job's work takes on a healthy backend, in ms.
    #[arg(long, default_value_t = 500)]
    job_ms: u64,
    /// The server's start, first-progress and node-stall limits.
    #[arg(long, default_value = "1s", value_parser = duration)]
    limit: Duration,
    /// The server's block_cooldown: how long a backend takes no job of the same workflow
    /// shape (here: the same job) after a fault there.
    #[arg(long, default_value = "60s", value_parser = duration)]
    block_cooldown: Duration,
    /// The server's circuit_threshold: faults in a row that take a backend out of service
    /// (0, the default here, keeps the faulty backends taking work).
    #[arg(long, default_value_t = 0)]
    circuit_threshold: u32,
    /// Give every job the same workflow shape (then a fault blocks its backend for every
    /// job, and a retry may go back to it once the block lifts).
    #[arg(long)]
    same_shape: bool,
    /// The server's max_attempts (a job may meet several faulty backends in a row).
    #[arg(long, default_value_t = 10)]
    max_attempts: u32,
    /// Stop waiting for the jobs after this long.
    #[arg(long, default_value = "5m", value_parser = duration)]
    timeout: Duration,
}

impl Failover {
    fn options(self) -> failover::Options {
        failover::Options {
            backends: self.backends,
            jobs: self.jobs,
            faulty: self.faulty,
            stall_spec: self.stall_spec,
            job_ms: self.job_ms,
            limit: self.limit,
            block_cooldown: self.block_cooldown,
            circuit_threshold: self.circuit_threshold,
            same_shape: self.same_shape,
            max_attempts: self.max_attempts,
            timeout: self.timeout,
        }
    }
}

#[derive(clap::Args)]
struct Scale {
    /// Which parts to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["backends", "queue", "fanout"])]
    parts: Vec<Part>,
    /// Backend counts for the memory-per-backend part, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 10, 100, 1000])]
    backends: Vec<usize>,
    /// Queue depths (parked jobs) for the queue part, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [100usize, 10_000, 100_000])]
    queued: Vec<usize>,
    /// Event subscriber counts for the fan-out part, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 10, 200])]
    subscribers: Vec<usize>,
    /// Submissions in flight at once while filling a queue.
    #[arg(long, default_value_t = 32)]
    in_flight: usize,
    /// Longest time spent submitting one queue, in seconds; past it the queue is capped
    /// at what was submitted, and the table says so.
    #[arg(long, default_value_t = 180)]
    submit_budget_s: u64,
    /// Probe jobs per queue depth at a higher priority than the parked jobs.
    #[arg(long, default_value_t = 50)]
    probes: usize,
    /// Probe jobs per queue depth at the parked jobs' priority (stops at the first that
    /// is not dispatched in time).
    #[arg(long, default_value_t = 5)]
    equal_probes: usize,
    /// How long a probe may wait for its dispatch before it counts as starved, in seconds.
    #[arg(long, default_value_t = 5)]
    probe_timeout_s: u64,
    /// Simulated backends in the fan-out part.
    #[arg(long, default_value_t = 8)]
    fanout_backends: usize,
    /// Jobs in the fan-out batch.
    #[arg(long, default_value_t = 200)]
    fanout_jobs: usize,
    /// How long each fan-out job (and each probe) runs on its backend, in ms.
    #[arg(long, default_value_t = 50)]
    job_ms: u64,
    /// Longest wait for the backends to connect, in seconds.
    #[arg(long, default_value_t = 180)]
    connect_timeout_s: u64,
}

impl Scale {
    fn options(self) -> scale::Options {
        scale::Options {
            parts: self.parts.into_iter().map(scale::Part::from).collect(),
            backends: self.backends,
            queued: self.queued,
            subscribers: self.subscribers,
            in_flight: self.in_flight,
            submit_budget_s: self.submit_budget_s,
            probes: self.probes,
            equal_probes: self.equal_probes,
            probe_timeout_s: self.probe_timeout_s,
            fanout_backends: self.fanout_backends,
            fanout_jobs: self.fanout_jobs,
            job_ms: self.job_ms,
            connect_timeout_s: self.connect_timeout_s,
        }
    }
}

#[derive(clap::Args)]
struct Restart {
    /// Jobs waiting in gantry's queue at the kill, beyond those running.
    #[arg(long, default_value_t = 1000)]
    queued: usize,
    /// Jobs running at the kill: one simulated backend each.
    #[arg(long, default_value_t = 64)]
    running: usize,
    /// How long each job's work takes on the backend, in ms.
    #[arg(long, default_value_t = 3000)]
    job_ms: u64,
    /// Stop waiting (for the running jobs before the kill, for the end after it) after
    /// this long.
    #[arg(long, default_value = "10m", value_parser = duration)]
    timeout: Duration,
}

impl Restart {
    fn options(self) -> restart::Options {
        restart::Options {
            queued: self.queued,
            running: self.running,
            job_ms: self.job_ms,
            timeout: self.timeout,
        }
    }
}

#[derive(clap::Args)]
struct Cluster {
    /// The PostgreSQL database to run on (a fresh schema is made in it and dropped).
    #[arg(long, env = "GANTRY_TEST_POSTGRES_URL")]
    store: String,
    /// Jobs per run.
    #[arg(long, default_value_t = 5_000)]
    jobs: usize,
    /// Simulated backends, shared by the coordinators.
    #[arg(long, default_value_t = 24)]
    backends: usize,
    /// Client connections submitting at once, spread over the coordinators.
    #[arg(long, default_value_t = 48)]
    submitters: usize,
    /// Coordinator counts to measure, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    coordinators: Vec<usize>,
}

impl Cluster {
    fn options(self) -> cluster::Options {
        cluster::Options {
            store: self.store,
            jobs: self.jobs,
            backends: self.backends,
            submitters: self.submitters,
            coordinators: self.coordinators,
        }
    }
}

#[derive(clap::Args)]
struct Profile {
    /// Jobs to profile.
    #[arg(long, default_value_t = 5000)]
    jobs: usize,
    /// Sampler steps per job (progress messages).
    #[arg(long, default_value_t = 30)]
    steps: u32,
}

impl Profile {
    fn options(self) -> profile::Options {
        profile::Options {
            jobs: self.jobs,
            steps: self.steps,
        }
    }
}

#[derive(clap::Args)]
struct Routing {
    /// Simulated backends.
    #[arg(long, default_value_t = 4)]
    backends: usize,
    /// Jobs in the batch.
    #[arg(long, default_value_t = 200)]
    jobs: usize,
    /// Distinct checkpoints the batch uses.
    #[arg(long, default_value_t = 4)]
    models: usize,
    /// What a checkpoint load costs when the backend's previous prompt used another.
    #[arg(long, default_value_t = 3000)]
    cold_ms: u64,
    /// What it costs when the previous prompt used the same one.
    #[arg(long, default_value_t = 0)]
    warm_ms: u64,
    /// Sampler steps per job (50 ms each in the simulator).
    #[arg(long, default_value_t = 4)]
    steps: u64,
    /// Seed of the batch's order of models.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

impl Routing {
    fn options(self) -> routing::Options {
        routing::Options {
            backends: self.backends,
            jobs: self.jobs,
            models: self.models,
            cold_ms: self.cold_ms,
            warm_ms: self.warm_ms,
            steps: self.steps,
            seed: self.seed,
        }
    }
}

#[derive(clap::Args)]
struct Chaos {
    /// Jobs to send (every one until acknowledged).
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    /// Simulated backends, each with a mix of faults (eight mixes, repeated beyond).
    #[arg(long, default_value_t = 8)]
    sims: usize,
    /// SIGKILLs of a coordinator, each followed by its restart.
    #[arg(long, default_value_t = 2)]
    kills: usize,
    /// A PostgreSQL database: `--coordinators` share a fresh schema in it (dropped at
    /// the end). Without it, one coordinator on the embedded store.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Coordinators on the Postgres store.
    #[arg(long, default_value_t = 2)]
    coordinators: usize,
    /// The seed of the load, the faults and the kill points (random when not given;
    /// printed either way).
    #[arg(long, env = "GANTRY_CHAOS_SEED")]
    seed: Option<u64>,
    /// Simulator speed (times faster than real).
    #[arg(long, default_value_t = 20.0)]
    speed: f64,
    /// The server's start, first-progress and node-stall limits.
    #[arg(long, default_value = "1s", value_parser = duration)]
    limit: Duration,
    /// Jobs sent and not yet terminal, at most.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Every job must be terminal this long after the later of the last acknowledged
    /// submit and the last restart; also the longest the run may go without a job
    /// ending while some are outstanding.
    #[arg(long, default_value = "2m", value_parser = duration)]
    settle: Duration,
    /// The lease of each backend (Postgres store).
    #[arg(long, default_value = "2s", value_parser = duration)]
    lease: Duration,
}

impl Chaos {
    fn options(self) -> chaos::Options {
        chaos::Options {
            jobs: self.jobs,
            sims: self.sims,
            kills: self.kills,
            store: self.store,
            coordinators: self.coordinators,
            seed: self.seed,
            speed: self.speed,
            limit: self.limit,
            window: self.window,
            settle: self.settle,
            lease: self.lease,
        }
    }
}
