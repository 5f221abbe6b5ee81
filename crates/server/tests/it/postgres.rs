//! The whole server on the PostgreSQL store: jobs run, fail over, cancel and stream as on
//! the embedded one, and outputs land in the shared artifacts folder.

use crate::support::{
    backend_name, names, poll_until, sim_config, sleep_workflow, spawn_app_pg, tiny_workflow, Sse,
    TestApp,
};
use gantry_server::{BackendConfig, Config, Server, StoreConfig};
use gantry_store::{Leases, Store};
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_cancel_and_stream_on_postgres() {
    let Some(app) = spawn_app_pg(2, |_| {}).await else {
        return;
    };
    let bodies: Vec<_> = (0..6)
        .map(|i| json!({"workflow": tiny_workflow(&format!("pg{i}"))}))
        .collect();
    let ids: Vec<String> =
        futures_util::future::join_all(bodies.iter().map(|b| app.submit_ok(b))).await;
    for id in &ids {
        let job = app.wait_terminal(id).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        let url = job["outputs"][0]["url"].as_str().unwrap();
        let png = app
            .http
            .get(format!("{}{url}", app.url))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        let sha = job["outputs"][0]["sha256"].as_str().unwrap();
        let artifacts = app.server.engine.config().artifacts.clone().unwrap();
        assert!(
            artifacts
                .join("outputs")
                .join(&sha[..2])
                .join(sha)
                .is_file(),
            "output {sha} is not in the artifacts folder"
        );
    }
    // Submitted once the others are done, so that none is queued behind it.
    let slow = app
        .submit_ok(&json!({"workflow": sleep_workflow(4000.0, 2000, 1)}))
        .await;
    app.wait_job(
        &slow,
        "slow job running",
        crate::support::TERMINAL_DEADLINE,
        |j| j["state"] == "running",
    )
    .await;
    let (status, _) = app.cancel(&slow).await;
    assert!(status == 200 || status == 202, "{status}");
    let job = app.wait_terminal(&slow).await;
    assert_eq!(job["state"], "cancelled", "{job:#}");

    // The job's stream is its stored history, from the first event to the terminal one.
    let events = app.read_sse(&ids[0]).await;
    let persisted: Vec<&str> = names(events.iter().filter(|e| e.id.is_some())).to_vec();
    assert_eq!(persisted.first(), Some(&"queued"), "{persisted:?}");
    assert_eq!(persisted.last(), Some(&"succeeded"), "{persisted:?}");
    let seqs: Vec<i64> = events
        .iter()
        .filter_map(|e| e.id.as_deref())
        .map(|id| id.parse().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    app.shutdown().await;
}

/// Coordinators sharing one database and one set of simulators.
struct Farm {
    sims: Vec<gantry_sim::SimHandle>,
    schema: gantry_store::testing::FreshSchema,
    shared: tempfile::TempDir,
    inspect: gantry_store::PgStore,
}

impl Farm {
    async fn new(n_sims: usize) -> Option<Farm> {
        let schema = gantry_store::testing::FreshSchema::create().await?;
        let mut sims = Vec::new();
        for _ in 0..n_sims {
            sims.push(gantry_sim::spawn(sim_config()).await.unwrap());
        }
        let inspect = gantry_store::PgStore::open(&schema.url).await.unwrap();
        Some(Farm {
            sims,
            schema,
            shared: tempfile::tempdir().unwrap(),
            inspect,
        })
    }

    /// Start coordinator `id` on the farm, with a short lease.
    async fn coordinator(&self, id: &str) -> TestApp {
        let mut config = Config::new("127.0.0.1:0".parse().unwrap(), self.shared.path().join(id));
        config.store = StoreConfig::Postgres(self.schema.url.clone());
        config.artifacts = Some(self.shared.path().join("artifacts"));
        config.coordinator = Some(id.to_owned());
        config.lease = Duration::from_millis(1500);
        config.backends = self
            .sims
            .iter()
            .enumerate()
            .map(|(i, sim)| {
                BackendConfig::parse(&format!("{}={}", backend_name(i), sim.url())).unwrap()
            })
            .collect();
        TestApp::attach(Server::start(config).await.expect("coordinator starts"))
    }

    /// Waits until every backend is leased, `owners` each holding its share.
    async fn wait_spread(&self, owners: &[&str]) -> Vec<gantry_store::Lease> {
        let share = self.sims.len().div_ceil(owners.len());
        poll_until(
            "leases spread over the coordinators",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || async {
                let leases = self.inspect.leases().await.unwrap();
                let live: Vec<_> = leases
                    .iter()
                    .filter(|l| l.remaining_ms > 0 && l.owner.is_some())
                    .collect();
                let spread = live.len() == self.sims.len()
                    && owners.iter().all(|o| {
                        let n = live
                            .iter()
                            .filter(|l| l.owner.as_deref() == Some(*o))
                            .count();
                        n >= 1 && n <= share
                    });
                if spread {
                    Ok(leases)
                } else {
                    Err(leases)
                }
            },
        )
        .await
    }

    /// No two coordinators ever drove one backend at once (see `check_dispatch_log`).
    async fn check_dispatch_log(&self) -> usize {
        let log = self.inspect.dispatch_log().await.unwrap();
        gantry_store::testing::check_dispatch_log(&log).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Reads `/v1/events` of `app` until `enough` holds for what it has, or panics.
async fn read_global(app: &TestApp, since: i64, enough: impl Fn(&[Sse]) -> bool) -> Vec<Sse> {
    let mut response = app
        .http
        .get(format!("{}/v1/events?since={since}", app.url))
        .send()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + crate::support::TERMINAL_DEADLINE;
    let (mut buf, mut events) = (String::new(), Vec::new());
    while !enough(&events) {
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .unwrap_or_else(|_| panic!("the global stream stalled at {} events", events.len()))
            .unwrap()
            .expect("the global stream ended");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        crate::support::parse_sse_blocks(&mut buf, &mut events);
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_share_one_farm() {
    let Some(farm) = Farm::new(4).await else {
        return;
    };
    let c1 = farm.coordinator("c1").await;
    // Alone, c1 drives every backend; a second coordinator joining takes its share.
    farm.wait_spread(&["c1"]).await;
    let c2 = farm.coordinator("c2").await;
    farm.wait_spread(&["c1", "c2"]).await;

    // Jobs submitted to either run on the whole farm, and each stream shows them all.
    let bodies: Vec<Value> = (0..12)
        .map(|i| json!({"workflow": tiny_workflow(&format!("farm{i}"))}))
        .collect();
    let mut ids = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let app = if i % 2 == 0 { &c1 } else { &c2 };
        ids.push(app.submit_ok(body).await);
    }
    for id in &ids {
        let job = c1.wait_terminal(id).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        // The output is reachable from the coordinator that did not fetch it too.
        let url = job["outputs"][0]["url"].as_str().unwrap();
        for app in [&c1, &c2] {
            let r = app
                .http
                .get(format!("{}{url}", app.url))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    let succeeded =
        |events: &[Sse]| events.iter().filter(|e| e.event == "succeeded").count() >= ids.len();
    for app in [&c1, &c2] {
        let events = read_global(app, 0, succeeded).await;
        let seqs: Vec<i64> = events
            .iter()
            .filter_map(|e| e.id.as_deref()?.parse().ok())
            .collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        for id in &ids {
            assert!(
                events.iter().any(|e| e.data["job_id"] == *id),
                "{id} missing"
            );
        }
    }

    // A cancel through the coordinator that does not drive the job's backend reaches it.
    let slow = c1
        .submit_ok(&json!({"workflow": sleep_workflow(400.0, 200, 7)}))
        .await;
    let running = c1
        .wait_job(
            &slow,
            "slow job executing",
            crate::support::TERMINAL_DEADLINE,
            |j| j["attempts"][0]["status"] == "executing",
        )
        .await;
    let backend = running["attempts"][0]["backend"]
        .as_str()
        .unwrap()
        .to_owned();
    let leases = farm.inspect.leases().await.unwrap();
    let driver = leases
        .iter()
        .find(|l| l.backend == backend)
        .and_then(|l| l.owner.clone())
        .unwrap();
    let other = if driver == "c1" { &c2 } else { &c1 };
    let (status, _) = other.cancel(&slow).await;
    assert_eq!(status, 202);
    let job = other.wait_terminal(&slow).await;
    assert_eq!(job["state"], "cancelled", "{job:#}");
    let sim = &farm.sims[(backend.as_bytes()[0] - b'a') as usize];
    let queue: Value = reqwest::get(format!("{}/queue", sim.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(queue["queue_running"], json!([]), "{queue:#}");

    // A client following c2's global stream: c2 goes away, the client resumes on c1
    // with Last-Event-ID and misses nothing.
    let before = read_global(&c2, 0, |e| e.len() >= 10).await;
    let last_id: i64 = before
        .last()
        .unwrap()
        .id
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();

    // One leaves: the other takes every backend and the farm goes on.
    c2.server.shutdown().await;
    let leases = farm.wait_spread(&["c1"]).await;
    assert!(leases.iter().all(|l| l.owner.as_deref() == Some("c1")));
    let more: Vec<Value> = (0..4)
        .map(|i| json!({"workflow": tiny_workflow(&format!("after{i}"))}))
        .collect();
    for body in &more {
        let id = c1.submit_ok(body).await;
        assert_eq!(c1.wait_terminal(&id).await["state"], "succeeded");
    }
    assert!(farm.check_dispatch_log().await >= ids.len() + 5);
    let total = farm.inspect.last_seq().await.unwrap();
    let mut resumed = c1
        .http
        .get(format!("{}/v1/events", c1.url))
        .header("last-event-id", last_id.to_string())
        .send()
        .await
        .unwrap();
    let (mut buf, mut after) = (String::new(), Vec::new());
    while after
        .last()
        .and_then(|e: &Sse| e.id.as_deref()?.parse::<i64>().ok())
        != Some(total)
    {
        let chunk = tokio::time::timeout(crate::support::TERMINAL_DEADLINE, resumed.chunk())
            .await
            .expect("the resumed stream stalled")
            .unwrap()
            .expect("the resumed stream ended");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        crate::support::parse_sse_blocks(&mut buf, &mut after);
    }
    let seqs: Vec<i64> = before
        .iter()
        .chain(&after)
        .filter_map(|e| e.id.as_deref()?.parse().ok())
        .collect();
    assert_eq!(
        seqs,
        (1..=total).collect::<Vec<i64>>(),
        "a gap or a repeat across the hand-over"
    );
    c1.server.shutdown().await;
    for sim in farm.sims {
        sim.shutdown().await;
    }
}

/// PostgreSQL unreachable for a while: new jobs are refused with 503 (and never
/// created), /healthz says store_unavailable, the running prompt's success is held in
/// memory and written once the database is back; nothing is lost or run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_refuses_new_work_and_keeps_what_runs() {
    let Some(schema) = gantry_store::testing::FreshSchema::create().await else {
        return;
    };
    let base = url::Url::parse(&schema.url).unwrap();
    let upstream = format!(
        "{}:{}",
        base.host_str().unwrap(),
        base.port().unwrap_or(5432)
    );
    let upstream = tokio::net::lookup_host(upstream)
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = crate::support::PgProxy::start(upstream).await;
    let url = proxy.url(&schema.url);
    let sims = vec![sim_config()];
    let app = crate::support::spawn_app_with(sims, |c| {
        c.store = StoreConfig::Postgres(url);
        c.artifacts = Some(c.data_dir.join("../artifacts"));
    })
    .await;
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(20.0, 10, 3)}))
        .await;
    let running = app
        .wait_job(&id, "executing", crate::support::TERMINAL_DEADLINE, |j| {
            j["attempts"][0]["status"] == "executing"
        })
        .await;
    let prompt = running["attempts"][0]["prompt_id"]
        .as_str()
        .unwrap()
        .to_owned();

    proxy.cut();
    poll_until(
        "healthz reports the store unavailable",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            let (status, body) = app.get("/healthz").await;
            if status == 503 && body["status"] == "store_unavailable" {
                Ok(())
            } else {
                Err((status, body))
            }
        },
    )
    .await;
    let refused = app
        .submit(&json!({"workflow": tiny_workflow("outage"), "idempotency_key": "during"}))
        .await;
    crate::support::assert_error(&refused, 503, "store_unavailable", &["unreachable"]);
    // The prompt finishes on the backend while the database is away.
    poll_until(
        "the prompt finishes on the backend",
        crate::support::TERMINAL_DEADLINE,
        Duration::from_millis(50),
        || async {
            let h = app.sim_json(0, &format!("/history/{prompt}")).await;
            if h[&prompt]["status"]["status_str"] == "success" {
                Ok(())
            } else {
                Err(h)
            }
        },
    )
    .await;

    proxy.restore();
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "{job:#}");
    assert_eq!(app.get("/healthz").await.0, 200);
    // The refused submit created nothing: its key is free.
    let again = app
        .submit(&json!({"workflow": tiny_workflow("outage"), "idempotency_key": "during"}))
        .await;
    assert_eq!(again.0, 202, "{:#}", again.1);
    let history = app.sim_json(0, "/history").await;
    let runs = history
        .as_object()
        .unwrap()
        .values()
        .filter(|e| e["prompt"][1] == json!(prompt))
        .count();
    assert_eq!(runs, 1, "the prompt ran {runs} times");
    app.shutdown().await;
}

/// A backend added on one coordinator is kept in the database: the other sees it, the
/// farm leases it, and a job that only it can run, submitted to either, runs there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_added_on_one_coordinator_joins_the_whole_farm() {
    let Some(farm) = Farm::new(2).await else {
        return;
    };
    let late = gantry_sim::spawn(sim_config()).await.unwrap();
    let c1 = farm.coordinator("c1").await;
    let c2 = farm.coordinator("c2").await;
    farm.wait_spread(&["c1", "c2"]).await;
    let added = c1
        .http
        .post(format!("{}/v1/backends", c1.url))
        .json(&json!({"url": late.url(), "name": "late", "tags": ["big"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201);
    // The other coordinator learns of it from the store.
    poll_until(
        "c2 knows the added backend",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let list = c2.get_json("/v1/backends").await;
            let known = list["backends"].as_array().is_some_and(|l| {
                l.iter()
                    .any(|b| b["name"] == "late" && b["tags"] == json!(["big"]))
            });
            if known {
                Ok(())
            } else {
                Err(list)
            }
        },
    )
    .await;
    poll_until(
        "the added backend is leased",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let leases = farm.inspect.leases().await.unwrap();
            if leases
                .iter()
                .any(|l| l.backend == "late" && l.owner.is_some() && l.remaining_ms > 0)
            {
                Ok(())
            } else {
                Err(leases)
            }
        },
    )
    .await;
    for (i, app) in [&c1, &c2].into_iter().enumerate() {
        let id = app
            .submit_ok(&json!({"workflow": tiny_workflow(&format!("late{i}")), "tags": ["big"]}))
            .await;
        let job = app.wait_terminal(&id).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert_eq!(job["attempts"][0]["backend"], "late");
    }
    // Adding it again on the other coordinator is refused.
    let again = c2
        .http
        .post(format!("{}/v1/backends", c2.url))
        .json(&json!({"url": late.url(), "name": "late"}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    farm.check_dispatch_log().await;
    c1.shutdown().await;
    c2.shutdown().await;
    late.shutdown().await;
}

/// Who holds the live lease of backend `name`.
async fn owner(farm: &Farm, name: &str) -> Option<String> {
    farm.inspect
        .leases()
        .await
        .unwrap()
        .into_iter()
        .find(|l| l.backend == name && l.remaining_ms > 0)
        .and_then(|l| l.owner)
}

/// The row of backend `name` on coordinator `app`.
async fn backend_row(app: &TestApp, name: &str) -> Option<Value> {
    let list = app.get_json("/v1/backends").await;
    list["backends"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_links_to_one_coordinator_and_the_whole_farm_uses_it() {
    use gantry_agent::link::{self as agent, AgentConfig};
    let Some(farm) = Farm::new(1).await else {
        return;
    };
    let gpu = gantry_sim::spawn(sim_config()).await.unwrap();
    let c1 = farm.coordinator("c1").await;
    let c2 = farm.coordinator("c2").await;
    let agent_to = |server: &str| AgentConfig {
        name: "gpu-nat".into(),
        id: Some("machine-nat".into()),
        allow: vec!["/bin/sh".into()],
        ..crate::agents::agent_config(server, &gpu.url())
    };
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(agent::run(agent_to(&c1.url), stop.clone()));
    poll_until(
        "c1 leases the agent linked to it",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || async {
            match owner(&farm, "gpu-nat").await.as_deref() {
                Some("c1") => Ok(()),
                other => Err(other.map(str::to_owned)),
            }
        },
    )
    .await;
    // c2 learns of it from the store; a job and a command submitted there run on it.
    poll_until(
        "c2 knows the agent",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            match backend_row(&c2, "gpu-nat").await {
                Some(b) if b["kind"] == "agent" => Ok(()),
                other => Err(other),
            }
        },
    )
    .await;
    let id = c2
        .submit_ok(&json!({"workflow": tiny_workflow("nat-pg"), "tags": ["nat"]}))
        .await;
    let job = c2.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["attempts"][0]["backend"], "gpu-nat");
    let id = c2
        .submit_ok(&json!({"kind": "command", "tags": ["nat"],
            "command": {"argv": ["/bin/sh", "-c", "echo from the agent"]}}))
        .await;
    let job = c2.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["result"]["tail"], json!(["from the agent"]));

    // The agent moves to c2 (another route out of its NAT, say): c1 gives the lease
    // back, c2 takes it, and work submitted to c1 runs there.
    stop.cancel();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(agent::run(agent_to(&c2.url), stop.clone()));
    poll_until(
        "c2 leases the agent now linked to it",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || async {
            match owner(&farm, "gpu-nat").await.as_deref() {
                Some("c2") => Ok(()),
                other => Err(other.map(str::to_owned)),
            }
        },
    )
    .await;
    let id = c1
        .submit_ok(&json!({"workflow": tiny_workflow("nat-pg-2"), "tags": ["nat"]}))
        .await;
    let job = c1.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["attempts"][0]["backend"], "gpu-nat");
    let runs: Value = c1
        .http
        .get(format!("{}/sim/runs", gpu.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        runs["runs"].as_array().unwrap().len(),
        2,
        "both prompts ran on the agent's ComfyUI"
    );
    farm.check_dispatch_log().await;
    stop.cancel();
    c1.shutdown().await;
    c2.shutdown().await;
}
