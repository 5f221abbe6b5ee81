//! Several `gantry serve` processes on one PostgreSQL database, driving one set of
//! simulators, killed and paused for real (issue 6's proof).

use gantry_store::testing::FreshSchema;
use gantry_store::{Leases, PgStore, Store};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

/// The simulators and the shared folders of one farm.
struct Farm {
    sims: Vec<gantry_sim::SimHandle>,
    schema: FreshSchema,
    dir: tempfile::TempDir,
    inspect: PgStore,
    http: reqwest::Client,
}

/// One coordinator process.
struct Coordinator {
    id: String,
    child: Option<Child>,
    url: String,
}

impl Farm {
    async fn new(n_sims: usize, speed: f64, faults: &[&str]) -> Option<Farm> {
        let schema = FreshSchema::create().await?;
        let mut sims = Vec::new();
        for i in 0..n_sims {
            sims.push(
                gantry_sim::spawn(gantry_sim::SimConfig {
                    speed,
                    faults: if i == 0 {
                        faults.iter().map(|f| f.to_string()).collect()
                    } else {
                        Vec::new()
                    },
                    ..Default::default()
                })
                .await
                .unwrap(),
            );
        }
        let inspect = PgStore::open(&schema.url).await.unwrap();
        Some(Farm {
            sims,
            schema,
            dir: tempfile::tempdir().unwrap(),
            inspect,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        })
    }

    fn config(&self, extra: &str) -> PathBuf {
        let path = self.dir.path().join("gantry.toml");
        let backends: String = self
            .sims
            .iter()
            .enumerate()
            .map(|(i, s)| format!("[[backends]]\nname = \"b{i}\"\nurl = \"{}\"\n", s.url()))
            .collect();
        std::fs::write(&path, format!("{extra}\n{backends}")).unwrap();
        path
    }

    /// Start coordinator `id` (again, after a kill) and wait until it serves.
    fn start(&self, id: &str, config: &Path, lease: &str) -> Coordinator {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gantry"))
            .args(["serve", "--listen", "127.0.0.1:0", "--lease", lease])
            .arg("--store")
            .arg(&self.schema.url)
            .arg("--artifacts")
            .arg(self.dir.path().join("artifacts"))
            .arg("--data-dir")
            .arg(self.dir.path().join(id))
            .arg("--coordinator")
            .arg(id)
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("FARM_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let url = super::serving_url(&mut child);
        Coordinator {
            id: id.to_owned(),
            child: Some(child),
            url,
        }
    }

    /// Submit with an idempotency key to the first live coordinator that answers, in
    /// the order given: a client that lost its answer to a killed coordinator asks
    /// another one, and the key makes that the same job.
    async fn submit(&self, to: &[&Coordinator], key: &str, body: &Value) -> Option<String> {
        let mut body = body.clone();
        body["idempotency_key"] = json!(key);
        for c in to {
            let Ok(r) = self
                .http
                .post(format!("{}/v1/jobs", c.url))
                .json(&body)
                .send()
                .await
            else {
                continue;
            };
            let status = r.status().as_u16();
            let Ok(v) = r.json::<Value>().await else {
                continue;
            };
            match status {
                200 | 202 => return v["id"].as_str().map(str::to_owned),
                503 => continue,
                other => panic!("submit {key}: {other} {v}"),
            }
        }
        None
    }

    /// Every stored event, in sequence.
    async fn events(&self) -> Vec<gantry_store::Event> {
        let mut all = Vec::new();
        loop {
            let after = all.last().map_or(0, |e: &gantry_store::Event| e.seq);
            let page = self.inspect.events_since(after, 1000).await.unwrap();
            if page.is_empty() {
                return all;
            }
            all.extend(page);
        }
    }

    /// No two coordinators ever drove one backend at once (see `check_dispatch_log`).
    async fn check_dispatch_log(&self) -> usize {
        let log = self.inspect.dispatch_log().await.unwrap();
        gantry_store::testing::check_dispatch_log(&log).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Coordinator {
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn alive(&self) -> bool {
        self.child.is_some()
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().map(|c| c.id()).unwrap();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tiny(prefix: &str) -> Value {
    json!({"workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}
    }})
}

fn sleep(seconds: f64, steps: u64, seed: u64) -> Value {
    json!({"workflow": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 2}},
        "2": {"class_type": "GantrySleep", "inputs": {"image": ["1", 0], "seconds": seconds, "steps": steps, "seed": seed}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "s"}}
    }})
}

async fn poll<T>(what: &str, limit: Duration, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let give_up = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < give_up, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Three coordinators, eight backends, thousands of jobs; coordinators SIGKILLed and
/// restarted at random (`FARM_SEED` replays a run, `FARM_JOBS` sizes it). Afterwards
/// every job is terminal and succeeded exactly once, no prompt ran twice, and no backend
/// was ever claimed for by two coordinators under one lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_killed_at_random_lose_no_job_and_run_none_twice() {
    let Some(farm) = Farm::new(8, 50.0, &[]).await else {
        return;
    };
    let seed: u64 = std::env::var("FARM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let n_jobs: usize = std::env::var("FARM_JOBS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    eprintln!("farm chaos: FARM_SEED={seed} FARM_JOBS={n_jobs}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let config = farm.config("max_attempts = 10\nbackoff_base = \"50ms\"\nbackoff_max = \"500ms\"");
    let lease = "1s";
    let mut coords: Vec<Coordinator> = ["c1", "c2", "c3"]
        .iter()
        .map(|id| farm.start(id, &config, lease))
        .collect();

    // A client following the farm's events through whichever coordinator is up: when
    // the one it reads dies, it resumes on another with Last-Event-ID.
    let live_urls = std::sync::Arc::new(std::sync::Mutex::new(
        coords.iter().map(|c| c.url.clone()).collect::<Vec<_>>(),
    ));
    // Told the last sequence number once the run is over; it stops on reaching it.
    let (stop_following, mut stopped) = tokio::sync::watch::channel(None::<i64>);
    let follower = {
        let urls = live_urls.clone();
        let http = reqwest::Client::new();
        tokio::spawn(async move {
            let mut seen: Vec<i64> = Vec::new();
            let mut resumes = 0;
            let mut turn = 0;
            let done = |seen: &[i64], target: Option<i64>| {
                target.is_some_and(|t| seen.last().copied().unwrap_or(0) >= t)
            };
            while !done(&seen, *stopped.borrow()) {
                let url = {
                    let urls = urls.lock().unwrap();
                    turn += 1;
                    urls[turn % urls.len()].clone()
                };
                let mut req = http.get(format!("{url}/v1/events"));
                if let Some(last) = seen.last() {
                    req = req.header("last-event-id", last.to_string());
                    resumes += 1;
                }
                let Ok(mut resp) = req.send().await else {
                    continue;
                };
                let mut buf = String::new();
                while !done(&seen, *stopped.borrow()) {
                    let chunk = tokio::select! {
                        c = resp.chunk() => c,
                        _ = stopped.changed() => continue,
                    };
                    let Ok(Some(chunk)) = chunk else { break };
                    buf.push_str(&String::from_utf8_lossy(&chunk));
                    while let Some(end) = buf.find("\n\n") {
                        let block: String = buf.drain(..end + 2).collect();
                        if let Some(id) = block.lines().find_map(|l| l.strip_prefix("id:")) {
                            seen.push(id.trim().parse().unwrap());
                        }
                    }
                }
            }
            (seen, resumes)
        })
    };

    let mut ids: Vec<String> = Vec::new();
    let mut kills = 0;
    let mut next_kill = Instant::now() + Duration::from_millis(rng.random_range(200..600));
    let mut dead_since: HashMap<usize, Instant> = HashMap::new();
    for n in 0..n_jobs {
        let body = if n % 10 == 0 {
            sleep(5.0, 10, n as u64)
        } else {
            tiny(&format!("j{n}"))
        };
        let mut order: Vec<&Coordinator> = coords.iter().filter(|c| c.alive()).collect();
        let first = rng.random_range(0..order.len());
        order.rotate_left(first);
        let id = poll(
            "a coordinator accepts the job",
            Duration::from_secs(30),
            async || farm.submit(&order, &format!("job-{n}"), &body).await,
        )
        .await;
        ids.push(id);
        // The chaos: a kill now and then while at least two run, a restart a little later.
        let now = Instant::now();
        if now >= next_kill {
            let alive: Vec<usize> = (0..coords.len()).filter(|i| coords[*i].alive()).collect();
            if alive.len() >= 2 {
                let victim = alive[rng.random_range(0..alive.len())];
                coords[victim].kill();
                dead_since.insert(victim, now);
                kills += 1;
            }
            next_kill = now + Duration::from_millis(rng.random_range(300..900));
        }
        let back: Vec<usize> = dead_since
            .iter()
            .filter(|(_, at)| at.elapsed() > Duration::from_millis(400))
            .map(|(i, _)| *i)
            .collect();
        for i in back {
            dead_since.remove(&i);
            let id = coords[i].id.clone();
            coords[i] = farm.start(&id, &config, lease);
        }
        *live_urls.lock().unwrap() = coords
            .iter()
            .filter(|c| c.alive())
            .map(|c| c.url.clone())
            .collect();
    }
    for i in dead_since.into_keys() {
        let id = coords[i].id.clone();
        coords[i] = farm.start(&id, &config, lease);
    }
    *live_urls.lock().unwrap() = coords.iter().map(|c| c.url.clone()).collect();
    eprintln!("farm chaos: {n_jobs} submitted with {kills} kills; waiting for the rest");
    assert!(kills >= 3, "too few kills to mean anything: {kills}");

    let url = coords[0].url.clone();
    poll("every job terminal", Duration::from_secs(240), async || {
        for state in ["queued", "running"] {
            let page: Value = farm
                .http
                .get(format!("{url}/v1/jobs?state={state}&limit=1"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            if !page["jobs"].as_array()?.is_empty() {
                return None;
            }
        }
        Some(())
    })
    .await;

    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), n_jobs, "an idempotency key made two jobs");
    let events = farm.events().await;
    let mut succeeded: HashMap<String, usize> = HashMap::new();
    for e in &events {
        if e.kind.name() == "succeeded" {
            *succeeded.entry(e.job_id.to_string()).or_default() += 1;
        }
    }
    let mut prompts: HashMap<String, String> = HashMap::new();
    for id in &ids {
        let job = farm
            .inspect
            .job(&gantry_core::JobId::parse(id).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(job.state, gantry_core::JobState::Succeeded, "{job:#?}");
        assert_eq!(
            succeeded.get(id),
            Some(&1),
            "job {id} succeeded {:?} times",
            succeeded.get(id)
        );
        for a in &job.attempts {
            prompts.insert(a.prompt_id.clone(), id.clone());
        }
    }
    // On the backends: no job's prompts succeeded twice.
    let mut ran: HashMap<String, usize> = HashMap::new();
    for sim in &farm.sims {
        let history: Value = farm
            .http
            .get(format!("{}/history", sim.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for (pid, entry) in history.as_object().unwrap() {
            if entry["status"]["status_str"] == "success" {
                if let Some(job) = prompts.get(pid) {
                    *ran.entry(job.clone()).or_default() += 1;
                }
            }
        }
    }
    let twice: Vec<_> = ran.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "jobs that ran twice on a backend: {twice:?}"
    );
    // The follower, resumed across every kill of the coordinator it read, sees every
    // event up to the last committed one, once and in order.
    let last = farm.inspect.last_seq().await.unwrap();
    stop_following.send(Some(last)).unwrap();
    let (followed, resumes) = tokio::time::timeout(Duration::from_secs(60), follower)
        .await
        .expect("the follower never caught up with the last event")
        .unwrap();
    eprintln!("farm chaos: the follower resumed {resumes} times");
    assert_eq!(
        followed,
        (1..=last).collect::<Vec<i64>>(),
        "the follower skipped or repeated an event"
    );
    let claims = farm.check_dispatch_log().await;
    assert!(claims >= n_jobs, "{claims} claims for {n_jobs} jobs");
    for c in &mut coords {
        c.kill();
    }
    for sim in farm.sims {
        sim.shutdown().await;
    }
}

/// SIGSTOP a coordinator past its lease while it drives a stalled job; another takes the
/// backend over; SIGCONT the first: its timer fires and its write is refused by the
/// fence, and it holds no lease after. The job goes on under the new owner alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_paused_past_its_lease_changes_nothing_when_it_resumes() {
    // Stalled before its first step: c1 hears nothing more of it once paused, so its
    // first-progress timer has run out when it wakes (buffered progress would re-arm it).
    let Some(farm) = Farm::new(1, 20.0, &["stall:at=0,every=1"]).await else {
        return;
    };
    let config =
        farm.config("max_attempts = 1\n[timeouts]\nnode_stall = \"2s\"\nfirst_progress = \"2s\"");
    let mut c1 = farm.start("c1", &config, "1s");
    let cluster = |c: &Coordinator| format!("{}/v1/cluster", c.url);
    poll(
        "c1 leases the backend",
        Duration::from_secs(30),
        async || {
            let v: Value = farm
                .http
                .get(cluster(&c1))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["held"].as_array()?.len() == 1).then_some(())
        },
    )
    .await;
    let mut c2 = farm.start("c2", &config, "1s");
    let id = farm
        .submit(&[&c1], "stalled", &sleep(100.0, 50, 1))
        .await
        .unwrap();
    let job_url = format!("{}/v1/jobs/{id}", c1.url);
    poll(
        "the job executes on c1's backend",
        Duration::from_secs(30),
        async || {
            let v: Value = farm
                .http
                .get(&job_url)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["attempts"][0]["status"] == "executing").then_some(())
        },
    )
    .await;

    c1.signal("-STOP");
    let paused = Instant::now();
    let takeover = poll(
        "c2 takes the backend over",
        Duration::from_secs(30),
        async || {
            let leases = farm.inspect.leases().await.ok()?;
            let l = leases.first()?;
            (l.owner.as_deref() == Some("c2") && l.remaining_ms > 0).then_some(l.token)
        },
    )
    .await;
    assert_eq!(takeover, 2);
    // Past c1's own first-progress limit too (2 s from the node's start, just before the
    // pause), so its watchdog has a write to attempt on waking; c2's own limit, counted
    // from its takeover, runs out later.
    let past = Duration::from_millis(2300).saturating_sub(paused.elapsed());
    tokio::time::sleep(past).await;
    c1.signal("-CONT");

    let c1_state = poll(
        "c1 notices it lost the lease",
        Duration::from_secs(30),
        async || {
            let v: Value = farm
                .http
                .get(cluster(&c1))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            v["held"].as_array()?.is_empty().then_some(v)
        },
    )
    .await;
    assert!(
        c1_state["fenced_writes"].as_u64().unwrap() >= 1,
        "c1 attempted no write after resuming: {c1_state:#}"
    );
    // The job is judged by c2 alone: one failure of its one attempt, by the stall.
    let job = poll(
        "the job fails under c2",
        Duration::from_secs(30),
        async || {
            let v: Value = farm
                .http
                .get(format!("{}/v1/jobs/{id}", c2.url))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["state"] == "failed").then_some(v)
        },
    )
    .await;
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "{job:#}");
    let events = farm.events().await;
    let failed: Vec<_> = events
        .iter()
        .filter(|e| e.kind.name() == "attempt_failed")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    let c2_state: Value = farm
        .http
        .get(cluster(&c2))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(c2_state["held"][0]["token"], 2, "{c2_state:#}");
    assert_eq!(c2_state["fenced_writes"], 0, "{c2_state:#}");
    farm.check_dispatch_log().await;
    c1.kill();
    c2.kill();
}
