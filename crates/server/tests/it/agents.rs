//! Agents: a GPU machine's process that connects out to the coordinator and carries its
//! connections to the local ComfyUI. Here the agent runs in-process against a simulator
//! the coordinator has no URL for.

use crate::support::{poll_until, sim_config, sleep_workflow, tiny_workflow, TestApp};
use gantry_agent::link::{self as agent, AgentConfig};
use gantry_server::config::Config;
use gantry_server::Server;
use serde_json::{json, Value};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// An in-process agent's config: named `gpu-behind-nat`, tagged `nat`, quick to retry.
pub(crate) fn agent_config(server: &str, comfyui: &str) -> AgentConfig {
    AgentConfig {
        server: server.to_owned(),
        token: None,
        name: "gpu-behind-nat".into(),
        id: Some("machine-1".into()),
        tags: vec!["nat".into()],
        comfyui: comfyui.to_owned(),
        max_backoff: Duration::from_millis(200),
        spawn: None,
        allow: Vec::new(),
        heartbeat: Duration::from_millis(200),
    }
}

async fn backend_status(app: &TestApp, name: &str) -> Result<Value, Value> {
    let list = app.get_json("/v1/backends").await;
    list["backends"]
        .as_array()
        .and_then(|l| l.iter().find(|b| b["name"] == name).cloned())
        .ok_or(list)
}

pub(crate) async fn wait_status(app: &TestApp, name: &str, status: &str) -> Value {
    poll_until(
        &format!("backend {name} {status}"),
        Duration::from_secs(15),
        Duration::from_millis(20),
        || async {
            match backend_status(app, name).await {
                Ok(b) if b["status"] == status => Ok(b),
                other => Err(other),
            }
        },
    )
    .await
}

#[tokio::test]
async fn an_agent_registers_as_a_backend_and_runs_jobs_through_its_link() {
    let sim = gantry_sim::spawn(sim_config()).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), data.path().join("d"));
    config.liveness = Duration::from_millis(300);
    let app = TestApp::attach(Server::start(config).await.unwrap());
    let stop = CancellationToken::new();
    let running = tokio::spawn(agent::run(agent_config(&app.url, &sim.url()), stop.clone()));

    let b = wait_status(&app, "gpu-behind-nat", "idle").await;
    assert_eq!(b["tags"], json!(["nat"]));
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            app.submit_ok(&json!({"workflow": tiny_workflow(&format!("nat{i}")), "tags": ["nat"]}))
                .await,
        );
    }
    // A prompt with progress, so the WebSocket through the link carries frames.
    ids.push(
        app.submit_ok(&json!({"workflow": sleep_workflow(1.0, 5, 9), "tags": ["nat"]}))
            .await,
    );
    for id in &ids {
        let job = app.wait_terminal(id).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert_eq!(job["attempts"][0]["backend"], "gpu-behind-nat");
        let png = app
            .http
            .get(format!(
                "{}{}",
                app.url,
                job["outputs"][0]["url"].as_str().unwrap()
            ))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"));
    }
    let runs = app
        .http
        .get(format!("{}/sim/runs", sim.url()))
        .send()
        .await
        .unwrap();
    let runs: Value = runs.json().await.unwrap();
    assert_eq!(
        runs["runs"].as_array().unwrap().len(),
        4,
        "every prompt ran on the agent's ComfyUI"
    );

    // The agent goes away: its backend goes offline, and a job for it waits.
    stop.cancel();
    running.await.unwrap().unwrap();
    wait_status(&app, "gpu-behind-nat", "offline").await;
    let waiting = app
        .submit_ok(&json!({"workflow": tiny_workflow("after"), "tags": ["nat"]}))
        .await;
    assert_eq!(app.get_job(&waiting).await["state"], "queued");

    // It comes back under the same name: same backend, the job runs.
    let stop = CancellationToken::new();
    let again = tokio::spawn(agent::run(agent_config(&app.url, &sim.url()), stop.clone()));
    let job = app.wait_terminal(&waiting).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let list = app.get_json("/v1/backends").await;
    assert_eq!(list["backends"].as_array().unwrap().len(), 1, "{list:#}");
    stop.cancel();
    again.await.unwrap().unwrap();
    app.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn an_agent_cannot_take_the_name_of_a_url_backend() {
    let sim = gantry_sim::spawn(sim_config()).await.unwrap();
    let app = crate::support::spawn_app(1, |_| {}).await;
    let url = format!(
        "{}/v1/agents/connect?name=a",
        app.url.replacen("http", "ws", 1)
    );
    let refused = tokio_tungstenite::connect_async(url).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 409),
        other => panic!("a taken name must be refused: {other:?}"),
    }
    // A name registered by one machine (its state file's id) is refused to another.
    let ws = app.url.replacen("http", "ws", 1);
    let (first, _) =
        tokio_tungstenite::connect_async(format!("{ws}/v1/agents/connect?name=gpu-x&id=machine-1"))
            .await
            .unwrap();
    match tokio_tungstenite::connect_async(format!(
        "{ws}/v1/agents/connect?name=gpu-x&id=machine-2"
    ))
    .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 409),
        other => panic!("another machine must not take gpu-x: {other:?}"),
    }
    drop(first);
    let bad = format!(
        "{}/v1/agents/connect?name=no%20spaces",
        app.url.replacen("http", "ws", 1)
    );
    match tokio_tungstenite::connect_async(bad).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 400),
        other => panic!("a bad name must be refused: {other:?}"),
    }
    app.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_coordinator_restarted_while_a_job_runs_on_an_agent_ends_it_succeeded_once() {
    let sim = gantry_sim::spawn(sim_config()).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = |listen: &str| {
        let mut c = Config::new(listen.parse().unwrap(), data.path().join("d"));
        c.liveness = Duration::from_millis(300);
        c
    };
    let first = Server::start(config("127.0.0.1:0")).await.unwrap();
    let addr = first.url().trim_start_matches("http://").to_owned();
    let app = TestApp::attach(first);
    // One agent process for both lives of the coordinator: it reconnects by itself.
    let stop = CancellationToken::new();
    let running = tokio::spawn(agent::run(agent_config(&app.url, &sim.url()), stop.clone()));
    wait_status(&app, "gpu-behind-nat", "idle").await;
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(20.0, 40, 5)}))
        .await;
    poll_until(
        "the job executing on the agent",
        Duration::from_secs(15),
        Duration::from_millis(20),
        || async {
            let job = app.get_job(&id).await;
            if job["phase"] == "executing" {
                Ok(())
            } else {
                Err(job)
            }
        },
    )
    .await;
    app.shutdown().await;

    // The same data and address: the agent's backend is known from the store before the
    // agent is back, so the running attempt is recovered onto it and adopted.
    let app = TestApp::attach(Server::start(config(&addr)).await.unwrap());
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "{job:#}");
    let runs: Value = app
        .http
        .get(format!("{}/sim/runs", sim.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(runs["runs"].as_array().unwrap().len(), 1, "it ran once");
    let list = app.get_json("/v1/backends").await;
    assert_eq!(list["backends"][0]["tags"], json!(["nat"]), "{list:#}");
    stop.cancel();
    running.await.unwrap().unwrap();
    app.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn with_tokens_an_agent_links_with_an_agent_token_and_not_with_a_submit_one() {
    use gantry_core::auth::Scope;
    let sim = gantry_sim::spawn(sim_config()).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = Config::new("127.0.0.1:0".parse().unwrap(), data.path().join("d"));
    let app = TestApp::attach(Server::start(config).await.unwrap());
    let store = app.server.engine.store().clone();
    let (agent_token, agent_record) = gantry_server::auth::issue(Scope::Agent, "gpus", 1);
    store.create_token(&agent_record).await.unwrap();
    let (submit_token, submit_record) = gantry_server::auth::issue(Scope::Submit, "app", 1);
    store.create_token(&submit_record).await.unwrap();
    app.server.auth.refresh().await;

    // A submit token is refused at the handshake: the agent keeps trying, never linked.
    let stop = CancellationToken::new();
    let mut wrong = agent_config(&app.url, &sim.url());
    wrong.name = "wrong-token".into();
    wrong.token = Some(submit_token.clone());
    let refused = tokio::spawn(agent::run(wrong, stop.clone()));
    let mut right = agent_config(&app.url, &sim.url());
    right.token = Some(agent_token);
    let linked = tokio::spawn(agent::run(right, stop.clone()));
    let b = poll_until(
        "the agent with its token registered",
        Duration::from_secs(15),
        Duration::from_millis(20),
        || async {
            let r = app
                .http
                .get(format!("{}/v1/backends", app.url))
                .bearer_auth(&submit_token)
                .send()
                .await
                .unwrap();
            let list: Value = r.json().await.unwrap();
            let found = list["backends"].as_array().and_then(|l| {
                l.iter()
                    .find(|b| b["name"] == "gpu-behind-nat" && b["status"] == "idle")
                    .cloned()
            });
            found.ok_or(list)
        },
    )
    .await;
    assert_eq!(b["tags"], json!(["nat"]));
    let r = app
        .http
        .get(format!("{}/v1/backends", app.url))
        .bearer_auth(&submit_token)
        .send()
        .await
        .unwrap();
    let list: Value = r.json().await.unwrap();
    assert!(
        list["backends"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["name"] != "wrong-token"),
        "{list:#}"
    );
    stop.cancel();
    refused.await.unwrap().unwrap();
    linked.await.unwrap().unwrap();
    app.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_spawned_comfyui_that_keeps_exiting_shows_crash_looping_with_each_restart() {
    let data = tempfile::tempdir().unwrap();
    let config = Config::new("127.0.0.1:0".parse().unwrap(), data.path().join("d"));
    let app = TestApp::attach(Server::start(config).await.unwrap());
    let stop = CancellationToken::new();
    let mut c = agent_config(&app.url, "http://127.0.0.1:9");
    c.spawn = Some(gantry_agent::supervise::SpawnConfig {
        command: "echo starting up; echo no GPU found >&2; false".into(),
        cwd: None,
        comfyui: "http://127.0.0.1:9".into(),
    });
    let running = tokio::spawn(agent::run(c, stop.clone()));
    let b = wait_status(&app, "gpu-behind-nat", "crash_looping").await;
    assert_eq!(b["current_job"], Value::Null);
    let logs = app.get_json("/v1/backends/gpu-behind-nat/logs").await;
    assert_eq!(logs["supervised"], true);
    assert_eq!(logs["child"]["state"], "crash_looping", "{logs:#}");
    let restarts = logs["restarts"].as_array().unwrap();
    assert!(restarts.len() >= 3, "{logs:#}");
    assert!(
        restarts
            .iter()
            .all(|r| r["reason"] == "exited (exit code 1)"),
        "{logs:#}"
    );
    let lines = logs["lines"].as_array().unwrap();
    assert!(
        lines.contains(&json!("no GPU found")),
        "stderr is kept: {logs:#}"
    );
    let (status, _) = app.get("/v1/backends/nobody/logs").await;
    assert_eq!(status, 404);
    stop.cancel();
    running.await.unwrap().unwrap();
    app.shutdown().await;
}

#[tokio::test]
async fn restarts_made_while_the_link_is_down_reach_the_coordinator() {
    // A port nothing listens on yet: the agent cannot link while its child crash-loops.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("starts");
    let stop = CancellationToken::new();
    let mut c = agent_config(&server, "http://127.0.0.1:9");
    c.spawn = Some(gantry_agent::supervise::SpawnConfig {
        command: format!("echo start >> {}; false", starts.display()),
        cwd: None,
        comfyui: "http://127.0.0.1:9".into(),
    });
    let running = tokio::spawn(agent::run(c, stop.clone()));
    poll_until(
        "three starts while unlinked",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || async {
            let n = std::fs::read_to_string(&starts)
                .map(|t| t.lines().count())
                .unwrap_or(0);
            if n >= 3 {
                Ok(())
            } else {
                Err(n)
            }
        },
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let config = Config::new(
        format!("127.0.0.1:{port}").parse().unwrap(),
        data.path().join("d"),
    );
    let app = TestApp::attach(Server::start(config).await.unwrap());
    let logs = poll_until(
        "the agent's hello",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || async {
            let (status, logs) = app.get("/v1/backends/gpu-behind-nat/logs").await;
            if status == 200 && logs["supervised"] == true {
                Ok(logs)
            } else {
                Err(logs)
            }
        },
    )
    .await;
    // The hello itself carries them (the next exit is seconds of backoff away), each
    // with the agent's own time of it.
    assert!(logs["restarts"].as_array().unwrap().len() >= 2, "{logs:#}");
    for r in logs["restarts"].as_array().unwrap() {
        assert_eq!(r["reason"], "exited (exit code 1)", "{logs:#}");
        crate::support::assert_rfc3339_ms(&r["at"]);
    }
    stop.cancel();
    running.await.unwrap().unwrap();
    app.shutdown().await;
}

#[tokio::test]
async fn a_link_that_drops_while_a_prompt_runs_ends_with_the_job_succeeded_once() {
    let sim = gantry_sim::spawn(sim_config()).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), data.path().join("d"));
    config.liveness = Duration::from_millis(300);
    let app = TestApp::attach(Server::start(config).await.unwrap());
    let stop = CancellationToken::new();
    let first = tokio::spawn(agent::run(agent_config(&app.url, &sim.url()), stop.clone()));
    wait_status(&app, "gpu-behind-nat", "idle").await;
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(30.0, 30, 21)}))
        .await;
    poll_until(
        "the job executing on the agent",
        Duration::from_secs(15),
        Duration::from_millis(20),
        || async {
            let job = app.get_job(&id).await;
            if job["phase"] == "executing" {
                Ok(())
            } else {
                Err(job)
            }
        },
    )
    .await;
    // The link goes (the agent stops); ComfyUI runs on; the agent comes back.
    stop.cancel();
    first.await.unwrap().unwrap();
    wait_status(&app, "gpu-behind-nat", "offline").await;
    let stop = CancellationToken::new();
    let second = tokio::spawn(agent::run(agent_config(&app.url, &sim.url()), stop.clone()));
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "{job:#}");
    let runs: Value = app
        .http
        .get(format!("{}/sim/runs", sim.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(runs["runs"].as_array().unwrap().len(), 1, "run once");
    stop.cancel();
    second.await.unwrap().unwrap();
    app.shutdown().await;
    sim.shutdown().await;
}

/// A TCP proxy that can swallow its open connections: after `swallow`, every byte on
/// them is dropped and neither end is told (a NAT that forgot the mapping). Connections
/// made later pass.
struct BlackHole {
    addr: std::net::SocketAddr,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl BlackHole {
    async fn start(upstream: std::net::SocketAddr) -> BlackHole {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let g = generation.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let born = g.load(Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut r, mut w) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                    ),
                    (Box::new(sr), Box::new(cw)),
                ] {
                    let g = g.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match r.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            // Swallowed: read and dropped, the socket kept open.
                            if g.load(Ordering::SeqCst) != born {
                                continue;
                            }
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        BlackHole { addr, generation }
    }

    fn swallow(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_link_a_nat_silently_dropped_is_found_by_its_heartbeat_and_made_anew() {
    let sim = gantry_sim::spawn(sim_config()).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), data.path().join("d"));
    config.liveness = Duration::from_millis(300);
    config.agent_heartbeat = Duration::from_millis(200);
    let app = TestApp::attach(Server::start(config).await.unwrap());
    let hole = BlackHole::start(app.server.addr).await;
    let stop = CancellationToken::new();
    let running = tokio::spawn(agent::run(
        agent_config(&format!("http://{}", hole.addr), &sim.url()),
        stop.clone(),
    ));
    wait_status(&app, "gpu-behind-nat", "idle").await;
    // The NAT forgets the link: nothing passes, nobody is told.
    hole.swallow();
    wait_status(&app, "gpu-behind-nat", "offline").await;
    // The agent finds it too, and links anew (a new connection passes).
    wait_status(&app, "gpu-behind-nat", "idle").await;
    let id = app
        .submit_ok(&json!({"workflow": tiny_workflow("after-nat"), "tags": ["nat"]}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    stop.cancel();
    running.await.unwrap().unwrap();
    app.shutdown().await;
}
