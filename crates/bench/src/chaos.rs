//! `gantry bench chaos`: thousands of jobs over faulty simulators while the coordinator
//! process is SIGKILLed and restarted, then every promise of RELIABILITY.md checked
//! against the store.
//!
//! Each simulator gets one mix of faults (`MIXES`: stalls, hangs, crashes, slow nodes,
//! node errors, out of memory, dropped or silent sockets, lost history). A few jobs run
//! a node that always raises (`GantryFail`): they must fail, as the workflow's fault,
//! and only they may. Jobs are sent by a closed loop (`--window` outstanding at once)
//! with an idempotency key each, to whichever coordinator is up; a submit that got no
//! answer is sent again with the same key until one answers 2xx with an id.
//!
//! Kills: with the embedded store one `gantry serve` is SIGKILLed `--kills` times and
//! started again on the same data dir; with `--store postgres://...` `--coordinators`
//! share a fresh schema and at each kill one of them (chosen by the seed) is SIGKILLed
//! and started again with the same id. Kill `k` comes when the jobs seen succeeding
//! on the farm's event stream reach a count drawn from the seed, so where the kills
//! fall in the run replays with the seed; readiness is `/healthz` answering 200.
//!
//! Checked afterwards, from the store (every event, every job):
//! - every acknowledged job is there, and no other;
//! - none succeeded twice: at most one `succeeded` event and one succeeded attempt;
//! - none is stuck: each is terminal, with no attempt live, within `--settle` of the
//!   later of the last acknowledgement and the last restart; the jobs that cannot fail
//!   succeeded, the doomed ones failed with `node_error` on two backends;
//! - every stall was detected within its limit + 500 ms: for each attempt failed by a
//!   `node_stall` or `first_progress` timeout, `finished_at - details.since - limit`.
//!   `since` is when the coordinator that failed it last heard progress, or, for an
//!   attempt it adopted (after a restart or a lease takeover), when it adopted it: a
//!   coordinator that was down heard nothing, and the new one, deaf to the prompt's
//!   messages (they go to the old socket's clientId), bounds it by `first_progress`
//!   from the adoption. Such attempts (in flight at a kill) are reported apart, with
//!   their time from the kill as well;
//! - the farm's event stream, followed across every kill with `since=`, carried every
//!   stored event once and in order;
//! - on PostgreSQL, no two coordinators claimed one backend under one lease (the
//!   dispatch log);
//! - nothing is left in a simulator's queue once every job ended: each prompt gantry gave
//!   up on was stopped (a prompt left running unwatched holds its backend for good),
//!   except the known gap: one whose timeout a coordinator committed within a limit
//!   before it was killed, not yet stopped (reported as `left_at_kill`).
//!
//! Any of these broken is listed under `problems`, and `gantry bench` then exits 1.

use crate::client::http;
use crate::process::Binary;
use crate::report::Results;
use crate::server::{backends_toml, ServerProc};
use crate::sims::Sims;
use crate::stats::Stats;
use crate::time::{now_us, rfc3339_ms};
use anyhow::{bail, Context};
use gantry_core::{AttemptStatus, Job, JobId, JobState};
use gantry_store::{JobFilter, Leases, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// How late past its limit a stall may be detected.
const STALL_SLACK_MS: i64 = 500;
/// At most this many problems of one kind are listed (all are counted).
const LISTED: usize = 20;
/// One job in this many runs a node that always raises.
const DOOMED_EVERY: usize = 50;
/// Workflow shapes in the load.
const SHAPES: usize = 16;

/// The faults of simulator `i % 8`; each spec as `gantry sim --fault` takes it (times
/// are simulated, so divided by `--speed`).
/// Stalls are spread over several simulators at a modest rate each: a stall holds its
/// backend for the whole limit, and three faults in a row open its circuit, so one
/// simulator stalling often would mostly sit out the run and give few samples.
const MIXES: [&[&str]; 8] = [
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
const HANG_MIX: usize = 2;

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
enum Plan {
    /// Must succeed, whatever the faults.
    Work,
    /// Runs `GantryFail`: must fail, as the workflow's fault.
    Doomed,
}

/// A submit answered 2xx.
#[derive(Clone, Debug)]
struct Acked {
    id: String,
    at_us: i64,
}

/// What the follower, the submitters and the controller share.
struct Shared {
    /// Each coordinator's URL while it serves.
    urls: Mutex<Vec<Option<String>>>,
    progress: Mutex<Progress>,
    /// Bumped on every change of `progress`, for those waiting on it.
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct Progress {
    /// Submits begun.
    taken: usize,
    acked: Vec<Option<Acked>>,
    n_acked: usize,
    /// Jobs whose terminal event was seen.
    terminal: HashSet<String>,
    succeeded: usize,
    /// Every persisted event's number, as the follower read them.
    seqs: Vec<i64>,
    /// Times the follower opened the stream again after losing it.
    resumes: usize,
    last_end: Option<Instant>,
}

impl Shared {
    fn live_urls(&self) -> Vec<String> {
        self.urls
            .lock()
            .map(|u| u.iter().flatten().cloned().collect())
            .unwrap_or_default()
    }

    fn set_url(&self, i: usize, url: Option<String>) {
        if let Ok(mut u) = self.urls.lock() {
            u[i] = url;
        }
    }

    fn update<T>(&self, f: impl FnOnce(&mut Progress) -> T) -> T {
        let out = {
            let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut p)
        };
        self.changed.send_modify(|n| *n += 1);
        out
    }

    /// `update` without waking those who wait.
    fn quiet<T>(&self, f: impl FnOnce(&mut Progress) -> T) -> T {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut p)
    }

    fn read<T>(&self, f: impl FnOnce(&Progress) -> T) -> T {
        let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        f(&p)
    }

    /// Wait until `ready` holds, or until no job has ended for `limit` (the run stopped
    /// moving): answers whether it holds.
    async fn wait_moving(&self, limit: Duration, ready: impl Fn(&Progress) -> bool) -> bool {
        let mut rx = self.changed.subscribe();
        let begun = Instant::now();
        loop {
            if self.read(&ready) {
                return true;
            }
            let moved = self.read(|p| p.last_end).map_or(begun, |t| t.max(begun));
            let deadline = moved + limit;
            if Instant::now() >= deadline {
                return false;
            }
            if let Ok(Err(_)) = tokio::time::timeout_at(deadline.into(), rx.changed()).await {
                return self.read(&ready);
            }
        }
    }

    /// Wait until `ready` holds or `deadline` passes: answers whether it holds.
    async fn wait_until(&self, deadline: Instant, ready: impl Fn(&Progress) -> bool) -> bool {
        let mut rx = self.changed.subscribe();
        loop {
            if self.read(&ready) {
                return true;
            }
            match tokio::time::timeout_at(deadline.into(), rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.read(&ready),
            }
        }
    }
}

/// One coordinator process, and where it keeps its files.
struct Coordinator {
    id: String,
    data: PathBuf,
    proc: Option<ServerProc>,
}

/// A kill and the restart after it.
#[derive(Debug)]
struct Kill {
    coordinator: String,
    /// When the SIGKILL was sent, wall ms.
    at_ms: i64,
    /// Jobs seen succeeded when it came.
    succeeded: usize,
    acked: usize,
    /// From the new spawn to the `serving on` line, and to `/healthz` answering 200.
    serving_ms: f64,
    healthy_ms: f64,
    /// When the new process answered `/healthz`, wall ms.
    ready_ms: i64,
}

pub async fn run(a: Options, gantry: &Binary) -> anyhow::Result<Results> {
    if a.jobs == 0 || a.sims == 0 || a.window == 0 {
        bail!("--jobs, --sims and --window must be at least 1");
    }
    let limit_ms = a.limit.as_millis() as i64;
    if limit_ms == 0 {
        bail!("--limit must be above 0 (0 turns the timers off)");
    }
    let n_coord = if a.store.is_some() { a.coordinators } else { 1 };
    if n_coord == 0 {
        bail!("--coordinators must be at least 1");
    }
    let seed = a.seed.unwrap_or_else(rand::random);
    eprintln!(
        "chaos: seed {seed} (GANTRY_CHAOS_SEED={seed} or --seed {seed} replays the load, the faults and the kill points)"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let plans: Vec<Plan> = (0..a.jobs)
        .map(|i| {
            if i % DOOMED_EVERY == DOOMED_EVERY - 1 {
                Plan::Doomed
            } else {
                Plan::Work
            }
        })
        .collect();
    let bodies: Vec<Value> = plans
        .iter()
        .enumerate()
        .map(|(i, plan)| body(*plan, i, seed, &mut rng))
        .collect();
    // Kill k when the succeeded jobs reach a point drawn in the k-th of `kills` equal
    // stretches of 10%..90% of the run, away from its edges.
    let kill_points: Vec<(usize, usize)> = (0..a.kills)
        .map(|k| {
            let span = 0.8 / a.kills as f64;
            let at = 0.1 + span * (k as f64 + rng.random_range(0.2..0.8));
            let victim = rng.random_range(0..n_coord);
            (((a.jobs as f64) * at) as usize, victim)
        })
        .collect();

    let http = http();
    let started = Instant::now();
    let sims = Sims::spawn_args(
        gantry,
        a.sims,
        a.speed,
        &["--seed".into(), seed.to_string()],
    )
    .await?;
    for (i, url) in sims.urls.iter().enumerate() {
        set_faults(&http, url, MIXES[i % MIXES.len()]).await?;
    }
    let dir = tempfile::tempdir()?;
    let schema = match &a.store {
        Some(url) => Some(gantry_store::testing::FreshSchema::create_on(url).await),
        None => None,
    };
    let limit = format!("{limit_ms}ms");
    let common = format!(
        "max_attempts = 16\nbackoff_base = \"20ms\"\nbackoff_max = \"500ms\"\n\
         block_cooldown = \"2s\"\ncircuit_cooldown = \"1s\"\nliveness = \"1s\"\n\
         cancel_grace = \"1s\"\nresync_gap = 1000000000\n\
         [timeouts]\nstart = \"{limit}\"\nfirst_progress = \"{limit}\"\nnode_stall = \"{limit}\"\n"
    );
    let mut coords: Vec<Coordinator> = (0..n_coord)
        .map(|i| Coordinator {
            id: format!("c{i}"),
            data: dir.path().join(format!("c{i}")),
            proc: None,
        })
        .collect();
    let config_of = |c: &Coordinator| {
        let top = match &schema {
            Some(s) => format!(
                "store = {:?}\nartifacts = {:?}\ncoordinator = {:?}\nlease = \"{}ms\"\n",
                s.url,
                dir.path().join("artifacts").display().to_string(),
                c.id,
                a.lease.as_millis()
            ),
            None => String::new(),
        };
        // Top-level keys first: the backends' tables close the top level.
        backends_toml(&sims.urls, &format!("{top}{common}"))
    };
    for c in &mut coords {
        let proc = ServerProc::spawn(gantry, &c.data, &config_of(c)).await?;
        healthy(&http, &proc.url).await?;
        c.proc = Some(proc);
    }
    wait_connected(&http, &coords, a.sims).await?;
    let shared = Arc::new(Shared {
        urls: Mutex::new(
            coords
                .iter()
                .map(|c| c.proc.as_ref().map(|p| p.url.clone()))
                .collect(),
        ),
        progress: Mutex::new(Progress {
            acked: vec![None; a.jobs],
            ..Progress::default()
        }),
        changed: watch::channel(0).0,
    });
    eprintln!(
        "chaos: {} jobs over {} simulators, {} coordinator(s) on the {} store, {} kills at {:?} succeeded",
        a.jobs,
        a.sims,
        n_coord,
        if a.store.is_some() { "postgres" } else { "embedded" },
        a.kills,
        kill_points.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );

    let stop = CancellationToken::new();
    let (hang_tx, hang_rx) = mpsc::unbounded_channel();
    let hang_backends: HashSet<String> = (0..a.sims)
        .filter(|i| i % MIXES.len() == HANG_MIX)
        .map(|i| format!("b{i}"))
        .collect();
    let follower = tokio::spawn(follow(shared.clone(), hang_backends, hang_tx, stop.clone()));
    let operator = tokio::spawn(operate(http.clone(), sims.urls.clone(), hang_rx));
    let bodies = Arc::new(bodies);
    let mut submitters = tokio::task::JoinSet::new();
    for _ in 0..4 {
        submitters.spawn(submit_loop(
            shared.clone(),
            bodies.clone(),
            seed,
            a.window,
            stop.clone(),
        ));
    }

    // The kills, each when its point is reached.
    let mut kills: Vec<Kill> = Vec::new();
    let mut gave_up: Option<String> = None;
    for (k, &(point, victim)) in kill_points.iter().enumerate() {
        let reached = shared
            .wait_moving(a.settle, |p| {
                p.succeeded >= point || p.terminal.len() >= a.jobs
            })
            .await;
        if !reached || shared.read(|p| p.succeeded < point) {
            gave_up = Some(format!(
                "kill {} never came: {} jobs succeeded, not {point}, and none ended for {:?}",
                k + 1,
                shared.read(|p| p.succeeded),
                a.settle
            ));
            break;
        }
        let c = &mut coords[victim];
        let (succeeded, acked) = shared.read(|p| (p.succeeded, p.n_acked));
        shared.set_url(victim, None);
        let at_ms = now_us() / 1000;
        if let Some(mut proc) = c.proc.take() {
            proc.child
                .kill()
                .await
                .context("cannot SIGKILL gantry serve")?;
        }
        let spawned = Instant::now();
        let proc = ServerProc::spawn(gantry, &c.data, &config_of(c)).await?;
        let serving_ms = spawned.elapsed().as_secs_f64() * 1000.0;
        healthy(&http, &proc.url).await?;
        let healthy_ms = spawned.elapsed().as_secs_f64() * 1000.0;
        shared.set_url(victim, Some(proc.url.clone()));
        c.proc = Some(proc);
        eprintln!(
            "chaos: kill {} of {}: {succeeded} succeeded, {acked} acknowledged; serving again in {healthy_ms:.0} ms",
            k + 1,
            c.id
        );
        kills.push(Kill {
            coordinator: c.id.clone(),
            at_ms,
            succeeded,
            acked,
            serving_ms,
            healthy_ms,
            ready_ms: now_us() / 1000,
        });
    }

    // Then every job acknowledged, and every one terminal within the bound.
    let mut last_ack_ms = None;
    let mut settled_ms = None;
    if gave_up.is_none() {
        let all_acked = shared.wait_moving(a.settle, |p| p.n_acked >= a.jobs).await;
        if !all_acked {
            gave_up = Some(format!(
                "only {} of {} jobs acknowledged: the run stopped moving for {:?}",
                shared.read(|p| p.n_acked),
                a.jobs,
                a.settle
            ));
        }
    }
    while !submitters.is_empty() {
        if gave_up.is_some() {
            stop.cancel();
        }
        match submitters.join_next().await {
            Some(Ok(Ok(()))) | None => {}
            Some(Ok(Err(e))) => return Err(e),
            Some(Err(e)) => bail!("a submitter panicked: {e}"),
        }
    }
    if gave_up.is_none() {
        let last_ack = shared.read(|p| {
            p.acked
                .iter()
                .flatten()
                .map(|a| a.at_us / 1000)
                .max()
                .unwrap_or(0)
        });
        let from = kills.iter().map(|k| k.ready_ms).fold(last_ack, i64::max);
        last_ack_ms = Some(last_ack);
        let left = Duration::from_millis(
            (a.settle.as_millis() as i64 - (now_us() / 1000 - from)).max(0) as u64,
        );
        if shared
            .wait_until(Instant::now() + left, |p| p.terminal.len() >= a.jobs)
            .await
        {
            settled_ms = Some(now_us() / 1000 - from);
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    // Nothing of gantry's is left on a backend once every job ended: each prompt it gave
    // up on is stopped and drained (no fault here ignores an interrupt).
    let left_on_backends = if settled_ms.is_some() {
        left_on(&http, &sims.urls).await
    } else {
        Vec::new()
    };

    // The follower reads on to the last event any coordinator reports, so its record
    // can be compared with the store's.
    let mut last_seq = 0;
    for url in shared.live_urls() {
        let state: Value = http
            .get(format!("{url}/v1/state"))
            .send()
            .await?
            .json()
            .await?;
        last_seq = last_seq.max(state["seq"].as_i64().unwrap_or(0));
    }
    let caught_up = shared
        .wait_until(Instant::now() + Duration::from_secs(60), |p| {
            p.seqs.last().copied().unwrap_or(0) >= last_seq
        })
        .await;
    stop.cancel();
    follower.await.context("the follower panicked")?;
    // The follower held the operator's only sender: it ends with it.
    let mends = operator.await.context("the operator panicked")?;
    for c in &mut coords {
        if let Some(proc) = c.proc.take() {
            proc.interrupt().await?;
        }
    }
    drop(sims);

    // With several coordinators, no two ever drove one backend under one lease.
    let mut claims = None;
    let store: Arc<dyn Store> = match &schema {
        Some(s) => {
            let pg = gantry_store::PgStore::open(&s.url).await?;
            claims = Some(gantry_store::testing::check_dispatch_log(
                &pg.dispatch_log().await?,
            ));
            Arc::new(pg)
        }
        None => Arc::new(gantry_store::SqliteStore::open(&coords[0].data).await?),
    };
    let progress = std::mem::take(&mut *shared.progress.lock().unwrap_or_else(|e| e.into_inner()));
    let verdict = check(
        store.as_ref(),
        &plans,
        &progress,
        &kills,
        limit_ms,
        last_seq,
        caught_up,
        &left_on_backends,
    )
    .await?;
    drop(store);
    drop(schema);

    let mut problems = verdict.problems.clone();
    if let Some(why) = &gave_up {
        problems.insert(0, why.clone());
    }
    if let Some(Err(why)) = &claims {
        problems.push(format!("two coordinators drove one backend: {why}"));
    }
    if gave_up.is_none() && settled_ms.is_none() {
        problems.insert(
            0,
            format!(
                "not every job was terminal {:?} after the last acknowledgement and the last restart",
                a.settle
            ),
        );
    }
    let store_name = if a.store.is_some() {
        "postgres"
    } else {
        "embedded"
    };
    let mut table = vec![
        format!(
            "{} jobs ({} doomed) over {} faulty simulators at speed {}, limits {limit_ms} ms, window {}; {} coordinator(s) on the {store_name} store; seed {seed}",
            a.jobs,
            plans.iter().filter(|p| **p == Plan::Doomed).count(),
            a.sims,
            a.speed,
            a.window,
            n_coord
        ),
        format!(
            "{} kills, {} restarts: {}",
            kills.len(),
            kills.len(),
            kills
                .iter()
                .map(|k| format!(
                    "{} at {} succeeded (serving {:.0} ms, healthy {:.0} ms after the spawn)",
                    k.coordinator, k.succeeded, k.serving_ms, k.healthy_ms
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        format!(
            "acknowledged {}, found {}; succeeded {}, failed {} {:?}, cancelled {}",
            progress.n_acked,
            verdict.found,
            verdict.states.get("succeeded").unwrap_or(&0),
            verdict.states.get("failed").unwrap_or(&0),
            verdict.failed_by_code,
            verdict.states.get("cancelled").unwrap_or(&0),
        ),
        format!(
            "attempts {}, failed by code {:?}, timeouts by phase {:?}; in flight at the kills {:?}",
            verdict.attempts, verdict.attempt_codes, verdict.phases, verdict.in_flight
        ),
        format!(
            "stall detection past the limit, ms: {}",
            verdict.lag.line("ms")
        ),
        format!(
            "  of attempts in flight at a kill (from the adoption): {}; from the kill: max {:.0} ms",
            verdict.lag_adopted.line("ms"),
            verdict.from_kill_max_ms
        ),
        format!(
            "all terminal {} after the later of the last acknowledgement and the last restart; wall {wall_s:.1} s; the hang was mended {mends} times; the event stream resumed {} times",
            settled_ms.map_or("never".to_owned(), |ms| format!("{ms} ms")),
            progress.resumes
        ),
    ];
    if !verdict.left_at_kill.is_empty() {
        table.push(format!(
            "left on a backend by a coordinator killed just after failing it (the known gap): {:?}",
            verdict.left_at_kill
        ));
    }
    table.push(if problems.is_empty() {
        "verdict: every acknowledged job there, none succeeded twice, none stuck, every stall detected within its limit + 500 ms".to_owned()
    } else {
        format!("verdict: {} PROBLEMS:", problems.len())
    });
    for p in problems.iter().take(LISTED * 4) {
        table.push(format!("  {p}"));
    }

    Ok(Results {
        table,
        json: json!({
            "seed": seed,
            "store": store_name,
            "coordinators": n_coord,
            "jobs": a.jobs,
            "doomed": plans.iter().filter(|p| **p == Plan::Doomed).count(),
            "sims": a.sims,
            "speed": a.speed,
            "limit_ms": limit_ms,
            "window": a.window,
            "faults": (0..a.sims).map(|i| MIXES[i % MIXES.len()]).collect::<Vec<_>>(),
            "kills": kills.iter().map(|k| json!({
                "coordinator": k.coordinator,
                "succeeded": k.succeeded,
                "acknowledged": k.acked,
                "serving_ms": k.serving_ms,
                "healthy_ms": k.healthy_ms,
            })).collect::<Vec<_>>(),
            "restarts": kills.len(),
            "acknowledged": progress.n_acked,
            "found": verdict.found,
            "states": verdict.states,
            "failed_by_code": verdict.failed_by_code,
            "attempts": verdict.attempts,
            "attempts_failed_by_code": verdict.attempt_codes,
            "timeouts_by_phase": verdict.phases,
            "in_flight_at_kills": verdict.in_flight,
            "attempts_by_backend": verdict.by_backend,
            "left_at_kill": verdict.left_at_kill,
            "stall_lag_ms": verdict.lag,
            "stall_lag_adopted_ms": verdict.lag_adopted,
            "stall_from_kill_max_ms": verdict.from_kill_max_ms,
            "settled_ms": settled_ms,
            "last_ack_ms": last_ack_ms,
            "wall_s": wall_s,
            "hang_mended": mends,
            "stream_resumes": progress.resumes,
            "events": verdict.events,
            "dispatch_claims": claims.and_then(Result::ok),
            "problems": problems,
        }),
    })
}

/// The request of job `i`: a sleeping node of 1 to 3 simulated seconds in ten steps,
/// or for a doomed job a node that raises after two steps. Its node ids are one of
/// `SHAPES` sets, so the jobs have that many workflow shapes, as a farm's do: a fault
/// blocks its backend for one shape (`block_cooldown`), not for the whole load.
fn body(plan: Plan, i: usize, seed: u64, rng: &mut StdRng) -> Value {
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

async fn set_faults(http: &reqwest::Client, sim: &str, specs: &[&str]) -> anyhow::Result<()> {
    http.post(format!("{sim}/sim/faults"))
        .json(specs)
        .send()
        .await?
        .error_for_status()
        .with_context(|| format!("cannot set the faults of {sim}"))?;
    Ok(())
}

/// Poll `/healthz` until it answers 200.
async fn healthy(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{url}/healthz did not answer 200 within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The prompts still in a simulator's queue 30 s on: (simulator, prompt id or what
/// went wrong asking).
async fn left_on(http: &reqwest::Client, sims: &[String]) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut left = Vec::new();
        for url in sims {
            let q: Value = match http.get(format!("{url}/queue")).send().await {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(e) => json!({"error": e.to_string()}),
            };
            if q.get("queue_running").is_none() {
                left.push((url.clone(), format!("no queue: {q}")));
                continue;
            }
            for key in ["queue_running", "queue_pending"] {
                for item in q[key].as_array().into_iter().flatten() {
                    left.push((url.clone(), item[1].as_str().unwrap_or("?").to_owned()));
                }
            }
        }
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until every backend is connected on some coordinator.
async fn wait_connected(
    http: &reqwest::Client,
    coords: &[Coordinator],
    n: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut up = 0;
        for proc in coords.iter().filter_map(|c| c.proc.as_ref()) {
            let v: Value = http
                .get(format!("{}/v1/backends", proc.url))
                .send()
                .await?
                .json()
                .await?;
            up += v["backends"].as_array().map_or(0, |l| {
                l.iter()
                    .filter(|b| matches!(b["status"].as_str(), Some("idle" | "busy")))
                    .count()
            });
        }
        if up >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {up} of {n} backends connected after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Send the next job while fewer than `window` are outstanding, until all are
/// acknowledged; each submit goes to a live coordinator and is sent again, with the
/// same idempotency key, until one answers 2xx with an id.
async fn submit_loop(
    shared: Arc<Shared>,
    bodies: Arc<Vec<Value>>,
    seed: u64,
    window: usize,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut turn = seed as usize;
    loop {
        let mut rx = shared.changed.subscribe();
        let i = loop {
            // Taking a job changes nothing anyone waits on: no wake-up (one would wake
            // the other submitters, which would wake this one, and so on).
            let taken = shared.quiet(|p| {
                if p.taken < bodies.len() && p.taken - p.terminal.len().min(p.taken) < window {
                    p.taken += 1;
                    Some(Some(p.taken - 1))
                } else if p.taken >= bodies.len() {
                    Some(None)
                } else {
                    None
                }
            });
            match taken {
                Some(Some(i)) => break i,
                Some(None) => return Ok(()),
                None => {
                    tokio::select! {
                        _ = rx.changed() => {}
                        _ = stop.cancelled() => return Ok(()),
                    }
                }
            }
        };
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            let urls = shared.live_urls();
            turn = turn.wrapping_add(1);
            let Some(url) = urls.get(turn % urls.len().max(1)) else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let answer = match http
                .post(format!("{url}/v1/jobs"))
                .json(&bodies[i])
                .send()
                .await
            {
                Ok(r) => {
                    let status = r.status();
                    r.json::<Value>().await.ok().map(|v| (status, v))
                }
                Err(_) => None,
            };
            match answer {
                Some((status, v)) if status.is_success() => {
                    let id = v["id"]
                        .as_str()
                        .with_context(|| format!("a {status} answer without an id: {v}"))?
                        .to_owned();
                    let at_us = now_us();
                    shared.update(|p| {
                        p.acked[i] = Some(Acked { id, at_us });
                        p.n_acked += 1;
                    });
                    break;
                }
                // The store is unreachable, or the coordinator died under the request.
                Some((status, _)) if status.as_u16() == 503 => {}
                None => {}
                Some((status, v)) => bail!("submit of job {i} refused: {status} {v}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Follow the farm's event stream on whichever coordinator is up, resuming after the
/// last event read (`since=`) whenever the stream is lost; count what ended and tell
/// the operator of timeouts on a backend that hangs.
async fn follow(
    shared: Arc<Shared>,
    hang_backends: HashSet<String>,
    hang: mpsc::UnboundedSender<String>,
    stop: CancellationToken,
) {
    let http = http();
    let mut turn = 0usize;
    let mut opened = false;
    while !stop.is_cancelled() {
        let urls = shared.live_urls();
        turn = turn.wrapping_add(1);
        let Some(url) = urls.get(turn % urls.len().max(1)) else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let since = shared.read(|p| p.seqs.last().copied().unwrap_or(0));
        let resp = http
            .get(format!("{url}/v1/events?since={since}"))
            .send()
            .await
            .and_then(|r| r.error_for_status());
        let Ok(mut resp) = resp else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if opened {
            shared.update(|p| p.resumes += 1);
        }
        opened = true;
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let chunk = tokio::select! {
                c = resp.chunk() => c,
                _ = stop.cancelled() => return,
            };
            let Ok(Some(chunk)) = chunk else { break };
            buf.extend_from_slice(&chunk);
            let mut start = 0;
            while let Some(rel) = buf[start..].windows(2).position(|w| w == b"\n\n") {
                let block = String::from_utf8_lossy(&buf[start..start + rel]).into_owned();
                start += rel + 2;
                on_block(&shared, &block, &hang_backends, &hang);
            }
            buf.drain(..start);
        }
    }
}

/// One SSE frame of the farm's stream: only persisted job events (with an `id`) count.
fn on_block(
    shared: &Shared,
    block: &str,
    hang_backends: &HashSet<String>,
    hang: &mpsc::UnboundedSender<String>,
) {
    let mut seq = None;
    let mut kind = "";
    let mut data = String::new();
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            seq = v.trim().parse::<i64>().ok();
        } else if let Some(v) = line.strip_prefix("event:") {
            kind = v.trim();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    let Some(seq) = seq else { return };
    let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
    let job = v["job_id"].as_str().unwrap_or_default().to_owned();
    if kind == "attempt_failed"
        && v["error"]["code"] == "timeout"
        && hang_backends.contains(v["backend"].as_str().unwrap_or_default())
    {
        let _ = hang.send(v["backend"].as_str().unwrap_or_default().to_owned());
    }
    shared.update(|p| {
        p.seqs.push(seq);
        if matches!(kind, "succeeded" | "failed" | "cancelled") && p.terminal.insert(job) {
            p.last_end = Some(Instant::now());
            if kind == "succeeded" {
                p.succeeded += 1;
            }
        }
    });
}

/// The operator: when gantry reports a timeout on a backend whose worker hangs, it
/// restarts that simulator's worker (clears the hang, then arms it again). Answers how
/// many times it did.
async fn operate(
    http: reqwest::Client,
    sims: Vec<String>,
    mut hangs: mpsc::UnboundedReceiver<String>,
) -> u64 {
    let mut mends = 0;
    while let Some(backend) = hangs.recv().await {
        let Some(url) = backend
            .strip_prefix('b')
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| sims.get(i))
        else {
            continue;
        };
        if set_faults(&http, url, &[]).await.is_ok()
            && set_faults(&http, url, MIXES[HANG_MIX]).await.is_ok()
        {
            mends += 1;
        }
    }
    mends
}

/// What the store says, and what is wrong with it.
struct Verdict {
    problems: Vec<String>,
    found: usize,
    events: usize,
    states: BTreeMap<String, usize>,
    failed_by_code: BTreeMap<String, usize>,
    attempts: usize,
    attempt_codes: BTreeMap<String, usize>,
    phases: BTreeMap<String, usize>,
    /// Per kill: attempts in flight at it, by how they ended.
    in_flight: Vec<BTreeMap<String, usize>>,
    /// Prompts left on a backend whose attempt a coordinator failed just before it was
    /// killed (the known gap).
    left_at_kill: Vec<String>,
    /// Per backend: attempts by how they ended.
    by_backend: BTreeMap<String, BTreeMap<String, usize>>,
    lag: Stats,
    lag_adopted: Stats,
    from_kill_max_ms: f64,
}

/// Problems of one kind: all counted, the first `LISTED` kept.
#[derive(Default)]
struct Found(BTreeMap<&'static str, (usize, Vec<String>)>);

impl Found {
    fn add(&mut self, kind: &'static str, what: String) {
        let e = self.0.entry(kind).or_default();
        e.0 += 1;
        if e.1.len() < LISTED {
            e.1.push(what);
        }
    }

    fn lines(self) -> Vec<String> {
        self.0
            .into_iter()
            .flat_map(|(kind, (n, first))| {
                std::iter::once(format!("{kind}: {n}"))
                    .chain(first.into_iter().map(|w| format!("  {w}")))
            })
            .collect()
    }
}

#[allow(clippy::too_many_arguments)]
async fn check(
    store: &dyn Store,
    plans: &[Plan],
    progress: &Progress,
    kills: &[Kill],
    limit_ms: i64,
    streamed_to: i64,
    caught_up: bool,
    left_on_backends: &[(String, String)],
) -> anyhow::Result<Verdict> {
    let mut bad = Found::default();
    // Every event, for the succeeded counts and the stream comparison.
    let mut events = Vec::new();
    loop {
        let after = events.last().map_or(0, |e: &gantry_store::Event| e.seq);
        let page = store.events_since(after, 5000).await?;
        if page.is_empty() {
            break;
        }
        events.extend(page);
    }
    let mut successes: HashMap<&str, usize> = HashMap::new();
    for e in &events {
        if e.kind.name() == "succeeded" {
            *successes.entry(e.job_id.as_str()).or_default() += 1;
        }
    }
    // The stream a client followed across the kills: every stored event up to the last
    // one reported at the end, once and in order.
    let stored_seqs: Vec<i64> = events
        .iter()
        .map(|e| e.seq)
        .filter(|s| *s <= streamed_to)
        .collect();
    let read: Vec<i64> = progress
        .seqs
        .iter()
        .copied()
        .filter(|s| *s <= streamed_to)
        .collect();
    if !caught_up || read != stored_seqs {
        let missed = stored_seqs.len().saturating_sub(read.len());
        bad.add(
            "the event stream followed across the kills is not the stored sequence",
            format!(
                "read {} events, stored {} up to seq {streamed_to} ({missed} missing){}",
                read.len(),
                stored_seqs.len(),
                if caught_up {
                    ""
                } else {
                    "; it never caught up"
                }
            ),
        );
    }

    // Jobs: every acknowledged one, and nothing else.
    let mut stored_ids: HashSet<String> = HashSet::new();
    let mut filter = JobFilter {
        state: None,
        limit: 1000,
        before: None,
    };
    loop {
        let page = store.list_jobs(&filter).await?;
        stored_ids.extend(page.jobs.iter().map(|j| j.id.to_string()));
        match page.next {
            Some(next) if !page.jobs.is_empty() => filter.before = Some(next),
            _ => break,
        }
    }
    let acked: Vec<(usize, &Acked)> = progress
        .acked
        .iter()
        .enumerate()
        .filter_map(|(i, a)| a.as_ref().map(|a| (i, a)))
        .collect();
    let acked_ids: HashSet<&str> = acked.iter().map(|(_, a)| a.id.as_str()).collect();
    if acked_ids.len() != acked.len() {
        bad.add(
            "two idempotency keys answered the same job",
            format!("{} acknowledgements, {} ids", acked.len(), acked_ids.len()),
        );
    }
    for id in &stored_ids {
        if !acked_ids.contains(id.as_str()) {
            bad.add("a stored job no submit was acknowledged for", id.clone());
        }
    }

    let mut v = Verdict {
        problems: Vec::new(),
        found: 0,
        events: events.len(),
        states: BTreeMap::new(),
        failed_by_code: BTreeMap::new(),
        attempts: 0,
        attempt_codes: BTreeMap::new(),
        phases: BTreeMap::new(),
        in_flight: vec![BTreeMap::new(); kills.len()],
        by_backend: BTreeMap::new(),
        left_at_kill: Vec::new(),
        lag: Stats::of(&[]),
        lag_adopted: Stats::of(&[]),
        from_kill_max_ms: f64::NAN,
    };
    let mut lags = Vec::new();
    let mut lags_adopted = Vec::new();
    for (i, a) in &acked {
        let Some(job_id) = JobId::parse(&a.id) else {
            bad.add("an acknowledged id that is not a job id", a.id.clone());
            continue;
        };
        let Some(job) = store.job(&job_id).await? else {
            bad.add("lost: acknowledged, not in the store", a.id.clone());
            continue;
        };
        v.found += 1;
        check_job(
            &job,
            plans[*i],
            successes.get(a.id.as_str()).copied().unwrap_or(0),
            kills,
            limit_ms,
            &mut v,
            &mut lags,
            &mut lags_adopted,
            &mut bad,
        );
    }
    // Prompts left on a backend: the known gap (RELIABILITY.md) is a timeout committed by
    // a coordinator killed before it stopped the prompt (record, then act), which no
    // later coordinator knows to stop; anything else is a problem.
    let mut attempt_of: HashMap<String, (String, i64)> = HashMap::new();
    for (_, a) in &acked {
        if let Some(job) = JobId::parse(&a.id) {
            if let Some(job) = store.job(&job).await? {
                for at in &job.attempts {
                    if let Some(f) = at.finished_at {
                        attempt_of.insert(
                            at.prompt_id.clone(),
                            (
                                format!("{} attempt {} {}", a.id, at.number, at.status.as_str()),
                                f,
                            ),
                        );
                    }
                }
            }
        }
    }
    for (url, prompt) in left_on_backends {
        let explained = attempt_of.get(prompt).filter(|(_, finished)| {
            kills
                .iter()
                .any(|k| *finished <= k.at_ms && *finished > k.at_ms - limit_ms - STALL_SLACK_MS)
        });
        match explained {
            Some((what, _)) => v.left_at_kill.push(format!("{prompt} on {url} ({what})")),
            None => bad.add(
                "a prompt left on a backend after every job ended",
                format!(
                    "{prompt} on {url} ({})",
                    attempt_of
                        .get(prompt)
                        .map_or("no ended attempt of it", |(w, _)| w.as_str())
                ),
            ),
        }
    }
    v.lag = Stats::of(&lags);
    v.lag_adopted = Stats::of(&lags_adopted.iter().map(|l| l.0).collect::<Vec<_>>());
    v.from_kill_max_ms = lags_adopted.iter().map(|l| l.1).fold(f64::NAN, f64::max);
    v.problems = bad.lines();
    Ok(v)
}

#[allow(clippy::too_many_arguments)]
fn check_job(
    job: &Job,
    plan: Plan,
    successes: usize,
    kills: &[Kill],
    limit_ms: i64,
    v: &mut Verdict,
    lags: &mut Vec<f64>,
    lags_adopted: &mut Vec<(f64, f64)>,
    bad: &mut Found,
) {
    let id = job.id.to_string();
    *v.states.entry(job.state.as_str().to_owned()).or_default() += 1;
    v.attempts += job.attempts.len();
    let won = job
        .attempts
        .iter()
        .filter(|a| a.status == AttemptStatus::Succeeded)
        .count();
    if successes > 1 || won > 1 {
        bad.add(
            "succeeded twice",
            format!("{id}: {successes} succeeded events, {won} succeeded attempts"),
        );
    }
    if !job.state.is_terminal() {
        bad.add(
            "stuck: not terminal",
            format!(
                "{id}: {} after {} attempts",
                job.state.as_str(),
                job.attempts.len()
            ),
        );
    }
    if job.state.is_terminal() {
        for a in &job.attempts {
            if matches!(
                a.status,
                AttemptStatus::Submitting | AttemptStatus::Pending | AttemptStatus::Executing
            ) {
                bad.add(
                    "stuck: an attempt still live in a terminal job",
                    format!("{id}: attempt {} {}", a.number, a.status.as_str()),
                );
            }
        }
    }
    if job.state == JobState::Failed {
        let code = job.error.as_ref().map_or("none", |e| e.code.as_str());
        *v.failed_by_code.entry(code.to_owned()).or_default() += 1;
    }
    match (plan, job.state) {
        (Plan::Work, JobState::Succeeded) => {
            if successes != 1 || won != 1 {
                bad.add(
                    "succeeded without exactly one success recorded",
                    format!("{id}: {successes} succeeded events, {won} succeeded attempts"),
                );
            }
        }
        (Plan::Doomed, JobState::Failed) => {
            // The workflow's fault: the same exception on two backends.
            let raised: HashSet<&str> = job
                .attempts
                .iter()
                .filter(|a| a.error.as_ref().is_some_and(|e| e.code == "node_error"))
                .map(|a| a.backend.as_str())
                .collect();
            let code = job.error.as_ref().map(|e| e.code.as_str());
            if code != Some("node_error") || raised.len() < 2 {
                bad.add(
                    "a doomed job failed otherwise than by its workflow",
                    format!("{id}: {code:?}, node errors on {raised:?}"),
                );
            }
        }
        (_, state) if !state.is_terminal() => {}
        (plan, state) => bad.add(
            "a job ended otherwise than its faults allow",
            format!(
                "{id} ({plan:?}): {} {}",
                state.as_str(),
                job.error
                    .as_ref()
                    .map_or(String::new(), |e| format!("{}: {}", e.code, e.message))
            ),
        ),
    }

    for a in &job.attempts {
        let how = match &a.error {
            Some(e) if a.status == AttemptStatus::Failed => e.code.clone(),
            _ => a.status.as_str().to_owned(),
        };
        *v.by_backend
            .entry(a.backend.clone())
            .or_default()
            .entry(how)
            .or_default() += 1;
        // In flight at a kill: created before it and not finished by then.
        for (k, kill) in kills.iter().enumerate() {
            if a.created_at <= kill.at_ms && a.finished_at.is_none_or(|f| f > kill.at_ms) {
                let how = match &a.error {
                    Some(e) => format!("{} ({})", a.status.as_str(), e.code),
                    None => a.status.as_str().to_owned(),
                };
                *v.in_flight[k].entry(how).or_default() += 1;
            }
        }
        let Some(error) = &a.error else { continue };
        if a.status == AttemptStatus::Failed {
            *v.attempt_codes.entry(error.code.clone()).or_default() += 1;
        }
        if error.code != "timeout" {
            continue;
        }
        let phase = error.details["phase"].as_str().unwrap_or("?");
        *v.phases.entry(phase.to_owned()).or_default() += 1;
        if a.status != AttemptStatus::Failed || !matches!(phase, "node_stall" | "first_progress") {
            continue;
        }
        let since = error.details["since"].as_str().and_then(rfc3339_ms);
        let limit = error.details["limit_ms"].as_i64();
        let (Some(since), Some(limit), Some(finished)) = (since, limit, a.finished_at) else {
            bad.add(
                "a stall timeout without since, limit or finished_at",
                format!("{id}: attempt {}: {}", a.number, error.details),
            );
            continue;
        };
        if limit != limit_ms {
            bad.add(
                "a stall timeout with another limit than configured",
                format!("{id}: attempt {} {phase}: {limit} ms", a.number),
            );
        }
        let lag = finished - since - limit;
        let straddled = kills
            .iter()
            .filter(|k| a.created_at <= k.at_ms && finished > k.at_ms)
            .map(|k| k.at_ms)
            .max();
        match straddled {
            Some(kill_ms) => lags_adopted.push((lag as f64, (finished - kill_ms - limit) as f64)),
            None => lags.push(lag as f64),
        }
        if !(0..=STALL_SLACK_MS).contains(&lag) {
            bad.add(
                "a stall detected outside its limit + 500 ms",
                format!(
                    "{id}: attempt {} on {} ({phase}): {lag} ms past the limit of {limit} ms{}",
                    a.number,
                    a.backend,
                    if straddled.is_some() {
                        ", in flight at a kill"
                    } else {
                        ""
                    }
                ),
            );
        }
    }
}
