//! The driver's timers on tokio's paused clock: the start, first-progress, node-stall and
//! deadline phases and the cancel's grace, each shown to fire when its limit has passed to
//! the millisecond and not a millisecond before, against a simulated ComfyUI that runs on
//! the same paused clock (its nodes' steps take virtual seconds).
//!
//! Time moves only when a test says so. Tokio would otherwise move a paused clock by
//! itself whenever every task waits ("auto-advance"), also while the SQLite store's worker
//! thread is writing, which would make the times of a run depend on the disk. So a task
//! that only yields keeps the runtime busy (`Frozen`), the test moves time with
//! `tokio::time::advance`, and between two moves it waits for a real signal (a job's
//! state, an event on the engine's bus) with nothing but yields. Wall time follows the
//! same clock (`clock::follow_tokio_clock`), so an attempt's `finished_at` and its
//! timer's `since` differ by exactly the time the test let pass.
//!
//! A limit of tens of seconds to minutes costs no real time: each test runs in well
//! under a second. A guard of real time (`within`) turns a wait that never ends into a
//! failure that says what was awaited.

// The integration tests' helpers (this binary uses a few of them).
#[allow(dead_code)]
#[path = "../it/support.rs"]
mod support;

use gantry_server::bus::BusEvent;
use gantry_server::{clock, BackendConfig, Config, Server};
use gantry_sim::{SimConfig, SimHandle};
use serde_json::{json, Value};
use std::future::Future;
use std::time::Duration;
use support::{ms_of, sleep_workflow};
use tokio::sync::broadcast;

/// The simulator's slice of a node's sleep.
const SIM_SLICE_MS: u64 = 100;

/// Real time a test may spend waiting for one signal before it gives up.
const REAL_GUARD: Duration = Duration::from_secs(60);

/// Keeps the runtime busy so the paused clock never moves by itself.
struct Frozen(tokio::task::JoinHandle<()>);

impl Frozen {
    fn start() -> Frozen {
        Frozen(tokio::spawn(async {
            loop {
                tokio::task::yield_now().await;
            }
        }))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `fut` to its end, or panics naming `what` once `REAL_GUARD` of real time passed.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::select! {
        biased;
        v = fut => v,
        _ = real_time(REAL_GUARD) => panic!(
            "{what}: not within {REAL_GUARD:?} of real time (the clock is paused: only the test moves it)"
        ),
    }
}

/// Yields until `d` of real time has passed.
#[allow(clippy::disallowed_methods)] // The guard is real time: the test's clock stands still.
async fn real_time(d: Duration) {
    let end = std::time::Instant::now() + d;
    while std::time::Instant::now() < end {
        tokio::task::yield_now().await;
    }
}

struct Farm {
    server: Server,
    sim: SimHandle,
    http: reqwest::Client,
    bus: broadcast::Receiver<BusEvent>,
    _frozen: Frozen,
    _data: tempfile::TempDir,
}

/// One simulator at speed 1 (its seconds are the paused clock's) behind a server whose
/// backend is called `a`, with liveness polls an hour apart so that only the timer under
/// test acts; `tweak` sets the limits.
async fn farm(tweak: impl FnOnce(&mut Config)) -> Farm {
    clock::follow_tokio_clock();
    let frozen = Frozen::start();
    let sim = gantry_sim::spawn(SimConfig::default())
        .await
        .expect("simulator starts");
    let data = tempfile::tempdir().expect("temp data dir");
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), data.path().join("data"));
    config.backends = vec![BackendConfig::parse(&format!("a={}", sim.url())).unwrap()];
    config.liveness = Duration::from_secs(3600);
    tweak(&mut config);
    let server = Server::start(config).await.expect("server starts");
    let farm = Farm {
        bus: server.engine.bus().subscribe(),
        server,
        sim,
        http: reqwest::Client::new(),
        _frozen: frozen,
        _data: data,
    };
    farm.until("backend a idle", |f| async move {
        let body = f.get("/v1/backends").await;
        (body["backends"][0]["status"] == "idle").then_some(())
    })
    .await;
    farm
}

impl Farm {
    async fn get(&self, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.server.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }

    async fn submit(&self, body: Value) -> String {
        let response = self
            .http
            .post(format!("{}/v1/jobs", self.server.url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let answer: Value = response.json().await.unwrap();
        answer["id"].as_str().unwrap().to_owned()
    }

    async fn job(&self, id: &str) -> Value {
        self.get(&format!("/v1/jobs/{id}")).await
    }

    /// Asks `probe` again and again, yielding in between, until it answers Some.
    async fn until<'a, T, F, Fut>(&'a self, what: &str, probe: F) -> T
    where
        F: Fn(&'a Farm) -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        within(what, async {
            loop {
                if let Some(found) = probe(self).await {
                    return found;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
    }

    /// The job, once `done` holds for it.
    async fn job_until(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let last = std::cell::RefCell::new(Value::Null);
        let wait = async {
            loop {
                let job = self.job(id).await;
                if done(&job) {
                    return job;
                }
                *last.borrow_mut() = job;
                tokio::task::yield_now().await;
            }
        };
        tokio::select! {
            biased;
            job = wait => job,
            _ = real_time(REAL_GUARD) => panic!(
                "{what}: not within {REAL_GUARD:?} of real time; the job: {:#}",
                last.borrow()
            ),
        }
    }

    /// The next event on the engine's bus (committed, live or a backend's) for which
    /// `wanted` holds, as JSON.
    async fn event(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let bus = &mut self.bus;
        within(what, async {
            loop {
                let event = match bus.recv().await {
                    Ok(BusEvent::Persisted(p)) => serde_json::to_value(&p.event).unwrap(),
                    Ok(BusEvent::Live(l)) => serde_json::to_value(&l.event).unwrap(),
                    Ok(BusEvent::Backend(b)) => serde_json::to_value(&*b).unwrap(),
                    Ok(BusEvent::BackendState(_)) => continue,
                    Err(broadcast::error::RecvError::Lagged(n)) => panic!("{what}: lagged by {n}"),
                    Err(e) => panic!("{what}: {e}"),
                };
                if wanted(&event) {
                    return event;
                }
            }
        })
        .await
    }

    /// Waits for the sleep workflow's node 1 (EmptyImage, 1 ms in the simulator) to start,
    /// lets its millisecond pass, and waits for node 2 (GantrySleep) to start.
    async fn node_two_started(&mut self) {
        self.event("node 1 started", |e| is_node_started(e, "1"))
            .await;
        self.advance_ms(1).await;
        self.event("node 2 started", |e| is_node_started(e, "2"))
            .await;
    }

    /// Moves the paused clock `ms` forward and lets every task it woke run.
    async fn advance_ms(&self, ms: u64) {
        tokio::time::advance(Duration::from_millis(ms)).await;
        settle().await;
    }

    /// Moves the clock `ms` forward a tenth of a second at a time, the simulator's own
    /// step (its nodes sleep in slices of 100 ms, looking for an interrupt in between, as
    /// ComfyUI's test nodes do), so that everything that wakes on the way acts on time.
    async fn run_ms(&self, ms: u64) {
        let mut left = ms;
        while left > 0 {
            let step = left.min(SIM_SLICE_MS);
            self.advance_ms(step).await;
            left -= step;
        }
    }

    /// Lets `limit_ms` pass but its last millisecond, checks the job still runs, lets
    /// that millisecond pass and answers the job once it has ended.
    async fn ended_exactly_after(&self, id: &str, limit_ms: u64) -> Value {
        self.run_ms(limit_ms - 1).await;
        self.assert_not_ended(id).await;
        self.advance_ms(1).await;
        self.job_until(id, "the job ended", ended).await
    }

    /// Runs the sleep node's first `n` steps of `step_ms` each, waiting for each.
    async fn steps(&mut self, n: u32, step_ms: u64) {
        for step in 1..=n {
            self.run_ms(step_ms).await;
            self.event(&format!("step {step}"), |e| is_progress(e, f64::from(step)))
                .await;
        }
    }

    /// The job has not ended (what the last `advance_ms` woke has been served).
    async fn assert_not_ended(&self, id: &str) {
        let job = self.job(id).await;
        assert!(
            matches!(job["state"].as_str(), Some("queued" | "running")),
            "ended early: {job:#}"
        );
    }

    async fn shutdown(self) {
        // Shutting down may wait on timers: let the clock run by itself again.
        drop(self._frozen);
        self.server.shutdown().await;
        self.sim.shutdown().await;
    }
}

/// Lets every task that is ready run, and the I/O they start between tasks of this
/// runtime (the simulator, the server and the client share it) go back and forth.
async fn settle() {
    for _ in 0..2_000 {
        tokio::task::yield_now().await;
    }
}

fn ended(job: &Value) -> bool {
    matches!(
        job["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

fn is_node_started(event: &Value, node: &str) -> bool {
    event["kind"]["type"] == "node_started" && event["kind"]["node"] == node
}

fn is_progress(event: &Value, value: f64) -> bool {
    event["type"] == "progress" && event["value"].as_f64() == Some(value)
}

/// The first attempt's timeout: the failed job, and its error's details.
fn timeout_of(job: &Value, phase: &str, limit_ms: u64) -> Value {
    assert_eq!(job["state"], "failed", "{job:#}");
    let error = &job["attempts"][0]["error"];
    assert_eq!(error["code"], "timeout", "{job:#}");
    let details = error["details"].clone();
    assert_eq!(details["phase"], phase, "{job:#}");
    assert_eq!(details["limit_ms"], limit_ms, "{job:#}");
    details
}

/// A prompt that ComfyUI accepts and never starts: the start timer ends the attempt when
/// it has been at the head of the queue for exactly `start_ms`.
#[tokio::test(start_paused = true)]
async fn the_start_timer_fires_when_its_limit_has_passed_and_not_before() {
    let farm = farm(|c| c.timeouts.start_ms = Some(30_000)).await;
    farm.sim.set_faults(&["hang-before-start"]).unwrap();
    let id = farm
        .submit(json!({"workflow": sleep_workflow(1.0, 1, 1), "max_attempts": 1}))
        .await;
    farm.job_until(&id, "the prompt pending on a", |j| {
        j["attempts"][0]["status"] == "pending"
    })
    .await;
    let pending_at = clock::now_ms();

    let job = farm.ended_exactly_after(&id, 30_000).await;
    let details = timeout_of(&job, "start", 30_000);
    let finished = ms_of(&job["attempts"][0]["finished_at"]);
    assert_eq!(finished - ms_of(&details["since"]), 30_000, "{job:#}");
    assert_eq!(finished - pending_at, 30_000, "{job:#}");
    // Taken off the backend: its queue is empty again.
    farm.until("the prompt gone from a's queue", |f| async move {
        let q: Value = f
            .http
            .get(format!("{}/queue", f.sim.url()))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (q["queue_pending"] == json!([]) && q["queue_running"] == json!([])).then_some(())
    })
    .await;
    farm.shutdown().await;
}

/// A node that starts and never reports a step: the first-progress limit ends it,
/// counted from the node's start.
#[tokio::test(start_paused = true)]
async fn the_first_progress_timer_counts_from_the_nodes_start() {
    let mut farm = farm(|c| {
        c.timeouts.first_progress_ms = Some(20_000);
        c.timeouts.node_stall_ms = Some(600_000);
    })
    .await;
    farm.sim.set_faults(&["stall:at=0"]).unwrap();
    let id = farm
        .submit(json!({"workflow": sleep_workflow(10.0, 10, 2), "max_attempts": 1}))
        .await;
    farm.node_two_started().await;
    let started_at = clock::now_ms();

    let job = farm.ended_exactly_after(&id, 20_000).await;
    let details = timeout_of(&job, "first_progress", 20_000);
    assert_eq!(details["node"], "2", "{job:#}");
    let finished = ms_of(&job["attempts"][0]["finished_at"]);
    assert_eq!(finished - ms_of(&details["since"]), 20_000, "{job:#}");
    assert_eq!(finished - started_at, 20_000, "{job:#}");
    farm.shutdown().await;
}

/// A node that stops at step 5 of 10: each step of a second resets the stall timer, and
/// the limit counts from the last step seen, to the millisecond.
#[tokio::test(start_paused = true)]
async fn the_node_stall_timer_counts_from_the_last_step_and_each_step_resets_it() {
    let mut farm = farm(|c| {
        c.timeouts.first_progress_ms = Some(15_000);
        c.timeouts.node_stall_ms = Some(15_000);
    })
    .await;
    farm.sim.set_faults(&["stall:at=50"]).unwrap();
    let id = farm
        .submit(json!({"workflow": sleep_workflow(10.0, 10, 3), "max_attempts": 1}))
        .await;
    farm.node_two_started().await;
    farm.steps(5, 1_000).await;
    let last_step_at = clock::now_ms();

    let job = farm.ended_exactly_after(&id, 15_000).await;
    let details = timeout_of(&job, "node_stall", 15_000);
    assert_eq!(details["progress"], json!({"value": 5.0, "max": 10.0}));
    let finished = ms_of(&job["attempts"][0]["finished_at"]);
    assert_eq!(ms_of(&details["since"]), last_step_at, "{job:#}");
    assert_eq!(finished - last_step_at, 15_000, "{job:#}");
    farm.shutdown().await;
}

/// A job's deadline ends it when the time since its submission reaches the limit, while
/// its node keeps progressing (no other timer has any reason to act).
#[tokio::test(start_paused = true)]
async fn the_deadline_ends_a_progressing_job_at_its_limit_from_submission() {
    let mut farm = farm(|c| {
        c.timeouts.first_progress_ms = Some(600_000);
        c.timeouts.node_stall_ms = Some(600_000);
    })
    .await;
    let submitted_at = clock::now_ms();
    let id = farm
        .submit(json!({
            "workflow": sleep_workflow(100.0, 10, 4),
            "timeouts": {"deadline_ms": 25_000}
        }))
        .await;
    farm.node_two_started().await;
    farm.steps(2, 10_000).await;
    // 1 ms of node 1 and 20 s of node 2 have passed: 4 999 ms to the deadline.
    let job = farm.ended_exactly_after(&id, 4_999).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    assert_eq!(job["error"]["code"], "deadline", "{job:#}");
    assert_eq!(ms_of(&job["created_at"]), submitted_at, "{job:#}");
    assert_eq!(ms_of(&job["updated_at"]) - submitted_at, 25_000, "{job:#}");
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "{job:#}");
    farm.shutdown().await;
}

/// A cancel whose interrupt the node ignores: the job is cancelled when the grace has
/// passed (not before: the backend may still confirm), the backend is marked stuck, and
/// it is taken back when the prompt finally leaves its queue.
#[tokio::test(start_paused = true)]
async fn a_cancel_the_backend_ignores_ends_after_the_grace_and_marks_it_stuck() {
    let mut farm = farm(|c| {
        c.cancel_grace = Duration::from_secs(20);
        c.timeouts.first_progress_ms = Some(600_000);
        c.timeouts.node_stall_ms = Some(600_000);
    })
    .await;
    farm.sim
        .set_faults(&["stall:at=50,uninterruptible,resume_ms=100000"])
        .unwrap();
    let id = farm
        .submit(json!({"workflow": sleep_workflow(10.0, 10, 5)}))
        .await;
    farm.node_two_started().await;
    farm.steps(5, 1_000).await;
    let response = farm
        .http
        .delete(format!("{}/v1/jobs/{id}", farm.server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let asked_at = clock::now_ms();

    let job = farm.ended_exactly_after(&id, 20_000).await;
    assert_eq!(job["state"], "cancelled", "{job:#}");
    assert_eq!(ms_of(&job["updated_at"]) - asked_at, 20_000, "{job:#}");
    let prompt_id = job["attempts"][0]["prompt_id"].clone();
    let stuck = farm
        .event("a marked stuck", |e| {
            e["type"] == "backend_stuck" && e["backend"] == "a"
        })
        .await;
    assert_eq!(stuck["prompt_id"], prompt_id);
    let backends = farm.get("/v1/backends").await;
    assert_eq!(backends["backends"][0]["status"], "stuck", "{backends:#}");

    // The blocked call returns 100 s into the stall (80 s from here): the prompt leaves
    // the queue, and the drain's next look at it (a second later at most) frees the
    // backend.
    farm.run_ms(81_000).await;
    farm.event("a recovered", |e| {
        e["type"] == "backend_recovered" && e["backend"] == "a"
    })
    .await;
    farm.shutdown().await;
}
