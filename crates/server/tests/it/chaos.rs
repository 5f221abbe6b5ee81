//! Chaos: many jobs through the HTTP API in front of simulators that stall (silently or
//! chattily, at every point of a node), hang before starting, drop or silence their
//! sockets, lose history, crash and restart, run out of memory or run slow, plus two
//! healthy ones; with short limits, so every fault is met by the watchdog and failover
//! many times over. The outcome of each job is left to chance; what must hold for every
//! job, whatever the interleaving, is checked afterwards:
//!
//! - it is terminal, with no attempt left live;
//! - it succeeded at most once (one `succeeded` event, one succeeded attempt);
//! - a job that neither succeeded nor was cancelled says why;
//! - a timeout names its phase, node, limit and backend, and fired on time;
//! - a failover after a timeout went to another backend while the first was blocked;
//! - every failure that will be retried is followed by its `job_retrying`;
//! - the event stream a client reads is the stored history up to the terminal event.
//!
//! `chaos_short` runs with `cargo test`; `chaos_long` is the same with thousands of jobs
//! (`CHAOS_JOBS=N` and `CHAOS_SEED=N` change its load).

use crate::support::{
    backend_name, ms_of, names, poll_until, sim_config, sleep_workflow, spawn_app_with,
    tiny_workflow, Sse, TestApp,
};
use gantry_core::JobId;
use gantry_server::bus::BusEvent;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short() {
    run_chaos(40, 0x00c0_ffee).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: cargo test -p gantry-server --test it chaos_long -- --ignored"]
async fn chaos_long() {
    // CHAOS_JOBS and CHAOS_SEED change the load (e.g. a quick run of 200 jobs).
    let env = |key: &str| std::env::var(key).ok().and_then(|v| v.parse::<u64>().ok());
    let jobs = env("CHAOS_JOBS").unwrap_or(2000) as usize;
    run_chaos(jobs, env("CHAOS_SEED").unwrap_or(0x0bad_5eed)).await;
}

const START_MS: u64 = 400;
const FIRST_PROGRESS_MS: u64 = 600;
const NODE_STALL_MS: u64 = 500;
const BLOCK_MS: u64 = 500;
/// How late a stall may be detected past its limit, on a loaded machine.
const DETECTION_SLACK_MS: i64 = 500;
const MAX_ATTEMPTS: u64 = 6;

/// The hanging simulator's fault; the operator task mends it now and then.
const HANG: &str = "hang-before-start:p=0.3";
const HANG_SIM: usize = 2;

/// The faults of each simulator; the backends are named a, b, c, ... in this order.
const SIMS: [&[&str]; 10] = [
    // a: a node that stops while the socket keeps repeating the same progress and status.
    &[
        "stall:at=1,chatty,p=0.5",
        "stall:at=50,chatty,p=0.5",
        "stall:at=0,chatty,p=0.5",
    ],
    // b: a node that stops and a server that goes quiet, early or on its last step.
    &["stall:at=25,p=0.5", "stall:at=99,p=0.5"],
    // c: a worker that takes no more prompts once it hangs.
    &[HANG],
    // d: sockets dropped 15 ms (real) into a run.
    &["ws-drop:after_ms=300,p=0.3"],
    // e: a silent socket, a lost history entry, and now and then both (a lost prompt).
    &["ws-silent:p=0.3", "lose-history:p=0.3"],
    // f: dies on every 4th run and comes back empty 50 ms (real) later.
    &["crash:after_jobs=3,restart_ms=1000"],
    // g: CUDA out of memory.
    &["oom:p=0.2"],
    // h: three times slower: some steps outlast the stall limits.
    &["slow:factor=3,p=0.3"],
    // i, j: healthy.
    &[],
    &[],
];

/// A small deterministic generator (splitmix64), so a seed replays the same load.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi`.
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (self.next() >> 11) as f64 / (1u64 << 53) as f64 * (hi - lo)
    }
}

/// What kind of job the load generator sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Plan {
    /// 2 to 6 simulated seconds in 20 steps: 0.1 to 0.3 s of real time.
    Sleep,
    /// Runs in milliseconds.
    Tiny,
    /// Three steps of about the node stall limit each: a completion that races the
    /// watchdog (and the first-progress limit, on a slow backend).
    Race,
    /// A racing or sleeping job with a deadline of its own.
    Deadline,
    /// A longer job cancelled by its client shortly after it was sent.
    Cancel,
}

struct Sent {
    id: String,
    plan: Plan,
}

/// What the operator task saw and did.
#[derive(Default, Debug)]
struct Operator {
    /// Backend health events seen on the bus, by type.
    events: BTreeMap<String, u64>,
    /// Times the hanging simulator was mended ("restarted").
    mended: u64,
}

async fn run_chaos(jobs: usize, seed: u64) {
    let began = Instant::now();
    let sims = SIMS
        .iter()
        .enumerate()
        .map(|(i, faults)| {
            let mut config = sim_config();
            config.faults = faults.iter().map(|f| (*f).to_owned()).collect();
            config.seed = seed.wrapping_add(i as u64);
            config
        })
        .collect();
    let app = spawn_app_with(sims, |c| {
        c.timeouts.start_ms = Some(START_MS);
        c.timeouts.first_progress_ms = Some(FIRST_PROGRESS_MS);
        c.timeouts.node_stall_ms = Some(NODE_STALL_MS);
        c.liveness = Duration::from_millis(300);
        c.cancel_grace = Duration::from_millis(500);
        c.backoff_base = Duration::from_millis(10);
        c.backoff_max = Duration::from_millis(100);
        c.health.block_ms = BLOCK_MS;
        c.health.circuit_ms = 500;
        // A backend that keeps failing is probed again within seconds, not minutes.
        c.health.circuit_max_ms = 2_000;
        c.max_attempts = MAX_ATTEMPTS as u32;
    })
    .await;

    let stop = CancellationToken::new();
    let bus = app.server.engine.bus().subscribe();
    let work = async {
        let sent = generate(&app, jobs, seed).await;
        let deadline = Duration::from_secs(120 + jobs as u64 / 10);
        wait_all_terminal(&app, &sent, deadline).await;
        stop.cancel();
        sent
    };
    let (sent, operator) = tokio::join!(work, operate(&app, bus, stop.clone()));
    let ran_for = began.elapsed();

    let mut stats = Stats::default();
    let mut bad: Vec<String> = Vec::new();
    let mut first_bad = None;
    for s in &sent {
        let job = app.get_job(&s.id).await;
        let stored = stored_events(&app, &s.id).await;
        let sse = app.read_sse(&s.id).await;
        let before = bad.len();
        check_job(&job, &stored, &sse, s.plan, &mut stats, &mut bad);
        if bad.len() > before && first_bad.is_none() {
            let events: Vec<&Value> = stored.iter().map(|e| &e.data).collect();
            first_bad = Some(format!("{job:#}\nits events: {events:#?}"));
        }
    }
    stats.print(jobs, ran_for, &operator);
    app.shutdown().await;
    assert!(
        bad.is_empty(),
        "{} invariant violations (first 40):\n{}\n\nthe first job at fault: {}",
        bad.len(),
        bad.iter().take(40).cloned().collect::<Vec<_>>().join("\n"),
        first_bad.unwrap_or_default()
    );
}

/// Sends `jobs` jobs over the HTTP API, spaced out, and cancels some of them a little
/// later.
async fn generate(app: &TestApp, jobs: usize, seed: u64) -> Vec<Sent> {
    let mut rng = Rng(seed);
    // About the rate the backends can take, faults and all (the long run keeps a queue).
    let gap = Duration::from_millis(if jobs <= 100 { 150 } else { 90 });
    let mut sent: Vec<Sent> = Vec::with_capacity(jobs);
    // (cancel when this many jobs have been sent, job id)
    let mut to_cancel: Vec<(usize, String)> = Vec::new();
    for i in 0..jobs {
        let plan = match i % 10 {
            2 | 6 => Plan::Tiny,
            3 => Plan::Race,
            7 => Plan::Deadline,
            9 => Plan::Cancel,
            _ => Plan::Sleep,
        };
        let wf_seed = seed.wrapping_mul(31).wrapping_add(i as u64) % 1_000_000_007;
        // Each step of a racing job takes about 0.35 to 0.48 s of simulated time at 20x,
        // which the simulator's 5 ms sleeps stretch to about 0.42 to 0.57 s of real
        // time: around the node stall limit of 0.5 s, under the first progress one.
        let race = |rng: &mut Rng| sleep_workflow(3.0 * rng.between(7.0, 9.5), 3, wf_seed);
        let body = match plan {
            Plan::Sleep => json!({
                "workflow": sleep_workflow(rng.between(2.0, 6.0), 20, wf_seed),
                "max_attempts": MAX_ATTEMPTS,
            }),
            Plan::Tiny => json!({
                "workflow": tiny_workflow(&format!("chaos-{i}")),
                "max_attempts": MAX_ATTEMPTS,
            }),
            Plan::Race => json!({"workflow": race(&mut rng), "max_attempts": MAX_ATTEMPTS}),
            Plan::Deadline if i % 20 == 7 => json!({
                "workflow": race(&mut rng),
                "max_attempts": MAX_ATTEMPTS,
                "timeouts": {"deadline_ms": 2_000},
            }),
            Plan::Deadline => json!({
                "workflow": sleep_workflow(rng.between(4.0, 6.0), 20, wf_seed),
                "max_attempts": MAX_ATTEMPTS,
                "timeouts": {"deadline_ms": 2_500},
            }),
            // 1.5 s of real time, cancelled about 0.3 s after it was sent.
            Plan::Cancel => json!({
                "workflow": sleep_workflow(30.0, 20, wf_seed),
                "max_attempts": MAX_ATTEMPTS,
            }),
        };
        let id = app.submit_ok(&body).await;
        if plan == Plan::Cancel {
            to_cancel.push((i + 2, id.clone()));
        }
        sent.push(Sent { id, plan });
        let due: Vec<String> = to_cancel
            .iter()
            .filter(|(at, _)| *at <= i)
            .map(|(_, id)| id.clone())
            .collect();
        to_cancel.retain(|(at, _)| *at > i);
        for id in due {
            cancel(app, &id).await;
        }
        tokio::time::sleep(gap).await;
    }
    for (_, id) in to_cancel {
        cancel(app, &id).await;
    }
    sent
}

async fn cancel(app: &TestApp, id: &str) {
    let (status, body) = app.cancel(id).await;
    // 200: cancelled at once; 202: the backend is asked to stop; 409: already finished.
    assert!(
        matches!(status, 200 | 202 | 409),
        "cancel {id}: {status} {body:#}"
    );
}

fn is_terminal(job: &Value) -> bool {
    matches!(
        job["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

/// Polls the jobs not yet terminal until none is left.
async fn wait_all_terminal(app: &TestApp, sent: &[Sent], deadline: Duration) {
    let pending = Mutex::new(sent.iter().map(|s| s.id.clone()).collect::<Vec<_>>());
    poll_until(
        "every job terminal",
        deadline,
        Duration::from_millis(250),
        || {
            let pending = &pending;
            async move {
                let ids = pending.lock().unwrap().clone();
                let mut still = Vec::new();
                let mut shown = Vec::new();
                for id in ids {
                    let job = app.get_job(&id).await;
                    if !is_terminal(&job) {
                        if shown.len() < 3 {
                            shown.push(job);
                        }
                        still.push(id);
                    }
                }
                let left = still.len();
                *pending.lock().unwrap() = still;
                if left == 0 {
                    Ok(())
                } else {
                    Err((left, shown))
                }
            }
        },
    )
    .await
}

/// Plays the operator: counts what the engine says about backends, and "restarts" the
/// hanging simulator (replaces its faults, which frees its worker) whenever gantry blocks
/// it or opens its circuit, and every two seconds in case an event was missed.
async fn operate(
    app: &TestApp,
    mut bus: tokio::sync::broadcast::Receiver<BusEvent>,
    stop: CancellationToken,
) -> Operator {
    let mut seen = Operator::default();
    let hang_backend = backend_name(HANG_SIM);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mend = |seen: &mut Operator| {
        app.sims[HANG_SIM].set_faults(&[]).unwrap();
        app.sims[HANG_SIM].set_faults(&[HANG]).unwrap();
        seen.mended += 1;
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return seen,
            _ = tick.tick() => mend(&mut seen),
            event = bus.recv() => match event {
                Ok(BusEvent::Backend(e)) => {
                    let v = serde_json::to_value(&*e).unwrap();
                    let kind = v["type"].as_str().unwrap_or("?").to_owned();
                    let hung = e.backend == hang_backend
                        && matches!(kind.as_str(), "backend_blocked" | "backend_circuit_open");
                    *seen.events.entry(kind).or_default() += 1;
                    if hung {
                        mend(&mut seen);
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return seen,
            },
        }
    }
}

/// One stored event: its name, its JSON (as the SSE stream carries it, with `state`),
/// and whether it ends the job's stream.
struct Stored {
    name: String,
    data: Value,
    ends_stream: bool,
}

/// Every event stored for the job, including those after its terminal event (which the
/// SSE stream does not carry): a second success would only show here.
async fn stored_events(app: &TestApp, id: &str) -> Vec<Stored> {
    let job_id = JobId::parse(id).expect("a job id");
    let events = app
        .server
        .engine
        .store()
        .job_events(&job_id, 0)
        .await
        .expect("the job's events");
    events
        .iter()
        .map(|e| {
            let mut data = serde_json::to_value(&e.kind).unwrap();
            data["state"] = serde_json::to_value(e.state).unwrap();
            let name = e.kind.name().to_owned();
            let ends_stream = e.state.is_terminal()
                && matches!(name.as_str(), "succeeded" | "failed" | "cancelled");
            Stored {
                name,
                data,
                ends_stream,
            }
        })
        .collect()
}

#[derive(Default)]
struct Stats {
    states: BTreeMap<String, u64>,
    states_by_plan: BTreeMap<String, u64>,
    attempts: u64,
    retries: u64,
    /// Failed attempts by error code.
    codes: BTreeMap<String, u64>,
    /// Jobs that failed, by the code of their error.
    job_errors: BTreeMap<String, u64>,
    /// Timeouts by phase.
    phases: BTreeMap<String, u64>,
    /// Successes of an attempt gantry had given up on (first success wins).
    late_successes: u64,
    failovers_checked: u64,
    late_events: u64,
}

impl Stats {
    fn print(&self, jobs: usize, ran_for: Duration, operator: &Operator) {
        let count = |k: &str| self.states.get(k).copied().unwrap_or(0);
        println!(
            "chaos: {jobs} jobs in {:.1} s: {} succeeded, {} failed, {} cancelled; {} attempts, {} retries, {} late successes, {} late events, {} failovers checked",
            ran_for.as_secs_f64(),
            count("succeeded"),
            count("failed"),
            count("cancelled"),
            self.attempts,
            self.retries,
            self.late_successes,
            self.late_events,
            self.failovers_checked,
        );
        println!("chaos: timeouts by phase {:?}", self.phases);
        println!("chaos: failed attempts by code {:?}", self.codes);
        println!("chaos: failed jobs by code {:?}", self.job_errors);
        println!("chaos: outcomes by plan {:?}", self.states_by_plan);
        println!(
            "chaos: backend events {:?}; hanging simulator mended {} times",
            operator.events, operator.mended
        );
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

/// Checks every invariant on one terminal job; pushes what is wrong onto `bad`.
fn check_job(
    job: &Value,
    stored: &[Stored],
    sse: &[Sse],
    plan: Plan,
    stats: &mut Stats,
    bad: &mut Vec<String>,
) {
    let id = str_of(job, "id").to_owned();
    let mut fail = |what: String| bad.push(format!("job {id} ({plan:?}): {what}"));
    let state = str_of(job, "state");
    *stats.states.entry(state.to_owned()).or_default() += 1;
    *stats
        .states_by_plan
        .entry(format!("{plan:?}/{state}"))
        .or_default() += 1;
    let attempts = job["attempts"].as_array().cloned().unwrap_or_default();
    stats.attempts += attempts.len() as u64;

    // Terminal, with nothing left running.
    if !is_terminal(job) {
        fail(format!("not terminal: {job:#}"));
        return;
    }
    for a in &attempts {
        if matches!(str_of(a, "status"), "submitting" | "pending" | "executing") {
            fail(format!(
                "attempt {} is still {} in a {state} job",
                a["number"], a["status"]
            ));
        }
    }

    // At most one success, and a succeeded job has exactly one, on a known backend.
    let successes = stored.iter().filter(|e| e.name == "succeeded").count();
    let won: Vec<&Value> = attempts
        .iter()
        .filter(|a| a["status"] == "succeeded")
        .collect();
    if successes > 1 {
        fail(format!("{successes} succeeded events"));
    }
    if won.len() > 1 {
        fail(format!("{} succeeded attempts", won.len()));
    }
    if state == "succeeded" {
        let winner_ok = won.len() == 1
            && (0..SIMS.len()).any(|i| won[0]["backend"] == backend_name(i).as_str());
        if !winner_ok || successes != 1 {
            fail(format!(
                "succeeded with {} succeeded attempts and {successes} succeeded events",
                won.len()
            ));
        }
        if job["outputs"].as_array().is_none_or(Vec::is_empty) {
            fail("succeeded without outputs".into());
        }
    } else if !won.is_empty() {
        fail(format!("{state}, yet an attempt succeeded"));
    }

    // A job that did not succeed and was not cancelled says why.
    if state == "failed" {
        match job["error"]["code"].as_str() {
            Some(code) => *stats.job_errors.entry(code.to_owned()).or_default() += 1,
            None => fail(format!("failed without an error: {:#}", job["error"])),
        }
    }

    // The first terminal event agrees with the state.
    match stored.iter().find(|e| e.ends_stream) {
        Some(e) if e.name == state => {}
        other => fail(format!(
            "the first terminal event is {:?}, the state {state}",
            other.map(|e| &e.name)
        )),
    }

    // Timeouts: phase, message, and timely detection.
    for a in &attempts {
        let error = &a["error"];
        if error.is_null() {
            continue;
        }
        let code = str_of(error, "code");
        let failed = a["status"] == "failed";
        if failed {
            *stats.codes.entry(code.to_owned()).or_default() += 1;
        } else if a["status"] == "succeeded" {
            stats.late_successes += 1;
        }
        if code != "timeout" {
            continue;
        }
        let n = &a["number"];
        let details = &error["details"];
        let phase = str_of(details, "phase");
        let backend = str_of(a, "backend");
        let message = str_of(error, "message");
        *stats.phases.entry(phase.to_owned()).or_default() += 1;
        let limit = details["limit_ms"].as_u64().unwrap_or(0);
        let expected_limit = match phase {
            "start" => Some(START_MS),
            "first_progress" => Some(FIRST_PROGRESS_MS),
            "node_stall" => Some(NODE_STALL_MS),
            "submit" | "queue_ahead" => None,
            _ => {
                fail(format!(
                    "attempt {n}: a timeout in phase {phase:?}: {error:#}"
                ));
                continue;
            }
        };
        if expected_limit.is_some_and(|l| l != limit) {
            fail(format!(
                "attempt {n}: {phase} timeout with limit {limit}, not {expected_limit:?}"
            ));
        }
        if details["backend"] != backend {
            fail(format!(
                "attempt {n} on {backend}: the timeout names backend {}",
                details["backend"]
            ));
        }
        let names_limit = message.contains(&format!(" {limit} ms"));
        let names_backend = message.contains(&format!(" on {backend}"));
        // A node gantry never heard of (the socket said nothing, so only `/queue` showed
        // the prompt running) is "the running node".
        let node_named = if details["node"].is_null() {
            message.starts_with("The running node ")
        } else {
            message.starts_with(&format!("Node {} (", str_of(details, "node")))
        };
        let phase_ok = match phase {
            "node_stall" => {
                node_named
                    && message.contains(" made no progress for ")
                    && message.contains(" at step ")
            }
            "first_progress" => {
                node_named
                    && message.contains(" made no progress for ")
                    && message.contains(" since it started on ")
            }
            "start" => message.starts_with("Execution failed to start within"),
            _ => true,
        };
        if !(names_limit && names_backend && phase_ok) {
            fail(format!(
                "attempt {n}: the {phase} timeout message {message:?} (backend {backend}, limit {limit}, node {})",
                details["node"]
            ));
        }
        if matches!(phase, "node_stall" | "first_progress") && failed {
            let (since, finished) = (&details["since"], &a["finished_at"]);
            if !since.is_string() || !finished.is_string() {
                fail(format!(
                    "attempt {n}: {phase} timeout without since ({since}) or finished_at ({finished})"
                ));
            } else {
                let took = ms_of(finished) - ms_of(since);
                let limit = limit as i64;
                if took < limit || took > limit + DETECTION_SLACK_MS {
                    fail(format!(
                        "attempt {n}: {phase} detected {took} ms after the last sign of progress (limit {limit}): since {since}, finished {finished}"
                    ));
                }
            }
        }
    }

    // Failover: the attempt after a timeout on X, made while X was blocked for this
    // workflow, ran elsewhere.
    for pair in attempts.windows(2) {
        let (a, next) = (&pair[0], &pair[1]);
        if a["status"] != "failed" || a["error"]["code"] != "timeout" {
            continue;
        }
        if !a["finished_at"].is_string() {
            fail(format!(
                "failed attempt {} without finished_at",
                a["number"]
            ));
            continue;
        }
        let finished = ms_of(&a["finished_at"]);
        if ms_of(&next["created_at"]) < finished + BLOCK_MS as i64 {
            stats.failovers_checked += 1;
            if next["backend"] == a["backend"] {
                fail(format!(
                    "attempt {} went back to {} {} ms after its timeout there, while it was blocked",
                    next["number"],
                    a["backend"],
                    ms_of(&next["created_at"]) - finished
                ));
            }
        }
    }

    // Every retriable failure is followed at once by its retry.
    for (i, e) in stored.iter().enumerate() {
        match e.name.as_str() {
            "job_retrying" => stats.retries += 1,
            "late" => stats.late_events += 1,
            _ => {}
        }
        if e.name == "attempt_failed" && e.data["will_retry"] == true {
            let next = stored.get(i + 1);
            let ok = next.is_some_and(|n| {
                n.name == "job_retrying" && n.data["attempt"] == e.data["attempt"]
            });
            if !ok {
                fail(format!(
                    "attempt_failed {} (will_retry) is followed by {:?}",
                    e.data,
                    next.map(|n| &n.data)
                ));
            }
        }
    }

    // What a client reads on the event stream is the stored history up to (and
    // including) the terminal event.
    let end = stored
        .iter()
        .position(|e| e.ends_stream)
        .map_or(stored.len(), |p| p + 1);
    let want: Vec<&str> = stored[..end].iter().map(|e| e.name.as_str()).collect();
    let got = names(sse);
    if got != want {
        fail(format!(
            "the event stream {got:?} is not the stored {want:?}"
        ));
    }
    for (i, e) in sse.iter().enumerate() {
        if e.event == "attempt_failed" && e.data["will_retry"] == true {
            let ok = sse.get(i + 1).is_some_and(|n| {
                n.event == "job_retrying" && n.data["attempt"] == e.data["attempt"]
            });
            if !ok {
                fail(format!(
                    "on the event stream, attempt_failed {} is not followed by its job_retrying",
                    e.data
                ));
            }
        }
    }
}
