//! Command jobs: a program run by an agent that allows it, its output streamed on the
//! job's events, its exit code and last lines in the job's result, and its whole
//! process group gone after a cancel or a timeout. The agent runs in-process; the
//! programs are real processes.

use crate::agents::wait_status;
use crate::support::{assert_error, parse_sse_blocks, poll_until, sim_config, Sse, TestApp};
use gantry_agent::link::{self as agent, AgentConfig};
use gantry_agent::process::group_alive;
use gantry_server::config::Config;
use gantry_server::Server;
use serde_json::{json, Value};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const SH: &str = "/bin/sh";

fn agent_config(server: &str, comfyui: &str, allow: &[&str]) -> AgentConfig {
    AgentConfig {
        name: "gpu-cmd".into(),
        id: Some("machine-cmd".into()),
        tags: vec!["cmd".into()],
        allow: allow.iter().map(|a| a.to_string()).collect(),
        ..crate::agents::agent_config(server, comfyui)
    }
}

/// A coordinator with one agent (allowing `allow`) in front of a simulator.
struct Farm {
    app: TestApp,
    _sim: gantry_sim::SimHandle,
    stop: CancellationToken,
    _data: tempfile::TempDir,
}

async fn farm(allow: &[&str], tweak: impl FnOnce(&mut Config)) -> Farm {
    let sim = gantry_sim::spawn(sim_config()).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), data.path().join("d"));
    config.liveness = Duration::from_millis(300);
    config.cancel_grace = Duration::from_secs(2);
    tweak(&mut config);
    let app = TestApp::attach(Server::start(config).await.unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(agent::run(
        agent_config(&app.url, &sim.url(), allow),
        stop.clone(),
    ));
    wait_status(&app, "gpu-cmd", "idle").await;
    Farm {
        app,
        _sim: sim,
        stop,
        _data: data,
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn command_job(script: &str) -> Value {
    json!({"kind": "command", "command": {"argv": [SH, "-c", script]}, "tags": ["cmd"]})
}

/// A named pipe the program blocks on (`read go < FIFO`) until the test writes to it.
fn gate(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("gate");
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    path
}

/// Reads the job's stream until `until` holds for an event; answers all so far.
async fn read_until(
    response: &mut reqwest::Response,
    buf: &mut String,
    events: &mut Vec<Sse>,
    until: impl Fn(&Sse) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !events.iter().any(&until) {
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .unwrap_or_else(|_| panic!("stream stalled; got {events:?}"))
            .unwrap();
        let Some(chunk) = chunk else {
            panic!("stream ended; got {events:?}")
        };
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        parse_sse_blocks(buf, events);
    }
}

async fn job_stream(app: &TestApp, id: &str) -> reqwest::Response {
    app.http
        .get(format!("{}/v1/jobs/{id}/events", app.url))
        .send()
        .await
        .unwrap()
}

fn logs(events: &[Sse]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.event == "log")
        .map(|e| {
            format!(
                "{}: {}",
                e.data["stream"].as_str().unwrap(),
                e.data["line"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test]
async fn a_command_job_streams_its_output_and_ends_with_its_exit_code_and_last_lines() {
    let f = farm(&[SH], |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let gate = gate(dir.path());
    let script = format!(
        "read go < {}; echo one; echo two >&2; echo \"in $PWD with $GREETING\"",
        gate.display()
    );
    let mut body = command_job(&script);
    body["command"]["env"] = json!({"GREETING": "hi"});
    body["command"]["cwd"] = json!(dir.path());
    let id = f.app.submit_ok(&body).await;
    let mut stream = job_stream(&f.app, &id).await;
    let (mut buf, mut events) = (String::new(), Vec::new());
    // The program has started (the agent said so) and waits at the gate.
    read_until(&mut stream, &mut buf, &mut events, |e| e.event == "started").await;
    std::fs::write(&gate, "go\n").unwrap();
    read_until(&mut stream, &mut buf, &mut events, |e| {
        e.event == "succeeded"
    })
    .await;
    let mut lines = logs(&events);
    lines.sort();
    let pwd = dir.path().canonicalize().unwrap();
    assert_eq!(
        lines,
        [
            "stderr: two".to_owned(),
            format!("stdout: in {} with hi", pwd.display()),
            "stdout: one".to_owned(),
        ]
    );
    let job = f.app.get_job(&id).await;
    assert_eq!(job["kind"], "command");
    assert_eq!(job["command"]["argv"][0], SH);
    assert_eq!(job["result"]["exit_code"], 0, "{job:#}");
    assert_eq!(
        job["result"]["tail"].as_array().unwrap().len(),
        3,
        "{job:#}"
    );
    assert_eq!(job["attempts"][0]["backend"], "gpu-cmd");
    // The whole output is kept.
    let log = f
        .app
        .http
        .get(format!("{}/v1/jobs/{id}/log", f.app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(log.status(), 200);
    let mut kept: Vec<String> = log
        .text()
        .await
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        [
            "in ".to_owned() + pwd.to_str().unwrap() + " with hi",
            "one".into(),
            "two".into()
        ]
    );

    // A failing program fails the job at once, with its code and last lines.
    let id = f
        .app
        .submit_ok(&command_job("echo about to fail; exit 7"))
        .await;
    let job = f.app.wait_terminal(&id).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    assert_eq!(job["error"]["code"], "command_failed");
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exited with code 7"),
        "{job:#}"
    );
    assert_eq!(job["result"]["exit_code"], 7);
    assert_eq!(job["result"]["tail"], json!(["about to fail"]));
    let log = f
        .app
        .http
        .get(format!("{}/v1/jobs/{id}/log", f.app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(log.status(), 200, "a failed command's log is kept too");
    assert_eq!(log.text().await.unwrap(), "about to fail\n");
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "not retried");

    // The backend is free for work again; and a job's request, submitted again (what
    // `gantry retry` does), runs the same command.
    let id = f.app.submit_ok(&command_job("echo again")).await;
    assert_eq!(f.app.wait_terminal(&id).await["state"], "succeeded");
    let request = f.app.get_json(&format!("/v1/jobs/{id}/request")).await;
    assert_eq!(request["kind"], "command", "{request:#}");
    assert!(request.get("workflow").is_none(), "{request:#}");
    let again = f.app.submit_ok(&request).await;
    let job = f.app.wait_terminal(&again).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["result"]["tail"], json!(["again"]));
}

#[tokio::test]
async fn cancelling_a_command_job_leaves_no_process_of_its_group_alive() {
    let f = farm(&[SH], |_| {}).await;
    // Children that ignore SIGTERM, and a grandchild: SIGKILL after the grace takes them.
    let script = "trap '' TERM; echo \"pgid $$\"; sleep 600 & (sleep 600 & wait) & wait";
    let id = f.app.submit_ok(&command_job(script)).await;
    let mut stream = job_stream(&f.app, &id).await;
    let (mut buf, mut events) = (String::new(), Vec::new());
    read_until(&mut stream, &mut buf, &mut events, |e| e.event == "log").await;
    let line = logs(&events).remove(0);
    let pgid: u32 = line
        .strip_prefix("stdout: pgid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(group_alive(pgid));
    let (status, _) = f.app.cancel(&id).await;
    assert!(status == 200 || status == 202, "{status}");
    let job = f.app.wait_terminal(&id).await;
    assert_eq!(job["state"], "cancelled", "{job:#}");
    assert!(
        !group_alive(pgid),
        "a process of the command's group survived the cancel"
    );
}

#[tokio::test]
async fn a_command_past_its_operations_limit_is_killed_and_fails() {
    let f = farm(&[SH], |c| {
        let mut ops = (*c.command_timeouts).clone();
        ops.insert("model_download".into(), Duration::from_millis(500));
        c.command_timeouts = std::sync::Arc::new(ops);
    })
    .await;
    let mut body = command_job("echo \"pgid $$\"; sleep 600");
    body["command"]["operation"] = json!("model_download");
    let id = f.app.submit_ok(&body).await;
    let job = f.app.wait_terminal(&id).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    assert_eq!(job["error"]["code"], "command_timeout", "{job:#}");
    assert!(
        job["error"]["message"].as_str().unwrap().contains("500ms"),
        "{job:#}"
    );
    let pgid: u32 = job["result"]["tail"][0]
        .as_str()
        .and_then(|l| l.strip_prefix("pgid "))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{job:#}"));
    assert!(!group_alive(pgid));

    // The job's own limit comes first.
    let mut body = command_job("sleep 600");
    body["command"]["operation"] = json!("model_download");
    body["command"]["timeout_ms"] = json!(200);
    let id = f.app.submit_ok(&body).await;
    let job = f.app.wait_terminal(&id).await;
    assert_eq!(job["error"]["code"], "command_timeout", "{job:#}");
    assert!(
        job["error"]["message"].as_str().unwrap().contains("200ms"),
        "{job:#}"
    );
}

#[tokio::test]
async fn a_program_outside_the_allow_list_is_refused_and_bad_commands_change_nothing() {
    let f = farm(&["/bin/echo"], |_| {}).await;
    let answer = f.app.submit(&command_job("echo hi")).await;
    assert_error(
        &answer,
        400,
        "command_not_allowed",
        &[
            "\"/bin/sh\"",
            "gpu-cmd: does not allow program \"/bin/sh\" (allows /bin/echo)",
        ],
    );
    // Allowed: it runs.
    let id = f
        .app
        .submit_ok(&json!({"kind": "command", "command": {"argv": ["/bin/echo", "allowed"]}}))
        .await;
    let job = f.app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["result"]["tail"], json!(["allowed"]));

    for (body, code, needle) in [
        (json!({"kind": "command"}), "missing_field", "\"command\""),
        (
            json!({"kind": "command", "command": {"argv": []}}),
            "invalid_field",
            "command.argv",
        ),
        (
            json!({"kind": "command", "command": {"argv": ["/bin/echo"], "cwd": "rel"}}),
            "invalid_field",
            "absolute",
        ),
        (
            json!({"kind": "command", "command": {"argv": ["/bin/echo"]}, "workflow": {"1": {}}}),
            "invalid_field",
            "workflow",
        ),
        (
            json!({"kind": "command", "command": {"argv": ["/bin/echo"], "shell": true}}),
            "invalid_field",
            "shell",
        ),
        (
            json!({"command": {"argv": ["/bin/echo"]}}),
            "invalid_field",
            "kind",
        ),
        (
            json!({"kind": "script"}),
            "invalid_field",
            "\"workflow\" or \"command\"",
        ),
    ] {
        let answer = f.app.submit(&body).await;
        assert_error(&answer, 400, code, &[needle]);
    }
    let all = f.app.all_jobs().await;
    assert_eq!(all.len(), 1, "only the allowed job was accepted");
}

#[tokio::test]
async fn a_link_that_drops_while_a_command_runs_kills_it_and_the_job_runs_again() {
    let mut f = farm(&[SH], |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let gate = gate(dir.path());
    let script = format!("echo \"pgid $$\"; read go < {}; echo done", gate.display());
    let id = f.app.submit_ok(&command_job(&script)).await;
    let mut stream = job_stream(&f.app, &id).await;
    let (mut buf, mut events) = (String::new(), Vec::new());
    read_until(&mut stream, &mut buf, &mut events, |e| e.event == "log").await;
    let pgid: u32 = logs(&events)[0]
        .strip_prefix("stdout: pgid ")
        .and_then(|p| p.parse().ok())
        .unwrap();
    // The agent goes away mid-command: the command goes with it, the attempt is lost.
    f.stop.cancel();
    read_until(&mut stream, &mut buf, &mut events, |e| {
        e.event == "attempt_failed" && e.data["will_retry"] == true
    })
    .await;
    let failed = events.iter().find(|e| e.event == "attempt_failed").unwrap();
    assert_eq!(
        failed.data["error"]["code"], "command_lost",
        "{:?}",
        failed.data
    );
    poll_until(
        "the first attempt's group gone",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            if group_alive(pgid) {
                Err(pgid)
            } else {
                Ok(())
            }
        },
    )
    .await;
    // It comes back: the second attempt runs there, to the end.
    f.stop = CancellationToken::new();
    let sim_url = f._sim.url();
    tokio::spawn(agent::run(
        agent_config(&f.app.url, &sim_url, &[SH]),
        f.stop.clone(),
    ));
    read_until(&mut stream, &mut buf, &mut events, |e| {
        e.event == "log" && e.data["attempt"] == 2
    })
    .await;
    let g = gate.clone();
    tokio::task::spawn_blocking(move || std::fs::write(g, "go\n"))
        .await
        .unwrap()
        .unwrap();
    read_until(&mut stream, &mut buf, &mut events, |e| {
        e.event == "succeeded"
    })
    .await;
    let job = f.app.get_job(&id).await;
    assert_eq!(job["attempts"].as_array().unwrap().len(), 2, "{job:#}");
    assert_eq!(job["result"]["tail"][1], "done", "{job:#}");
}

#[tokio::test]
async fn an_agent_cannot_report_an_attempt_leased_to_another() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let f = farm(&[SH], |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let gate = gate(dir.path());
    let id = f
        .app
        .submit_ok(&command_job(&format!(
            "read go < {}; echo real",
            gate.display()
        )))
        .await;
    f.app
        .wait_job(&id, "executing", Duration::from_secs(20), |j| {
            j["phase"] == "executing"
        })
        .await;
    // Another machine links as agent "evil" and claims the attempt ended.
    let url = format!(
        "{}/v1/agents/connect?name=evil&id=evil-1",
        f.app.url.replacen("http", "ws", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let control = |m: Value| {
        let mut frame = vec![0, 0, 0, 0, 2];
        frame.extend(serde_json::to_vec(&m).unwrap());
        Message::Binary(frame.into())
    };
    let forged = json!({"type": "command_exit", "job": id, "attempt": 1, "outcome": "exited",
        "exit_code": 0, "tail": ["forged"]});
    ws.send(control(forged)).await.unwrap();
    // Its hello, sent after: once the coordinator shows it, the forgery was handled.
    ws.send(control(
        json!({"type": "hello", "supervised": false, "allow": ["/forged"]}),
    ))
    .await
    .unwrap();
    poll_until(
        "evil's hello",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let list = f.app.get_json("/v1/backends").await;
            let evil = list["backends"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["name"] == "evil")
                .cloned();
            match evil {
                Some(b) if b["allow"] == json!(["/forged"]) && b["kind"] == "agent" => Ok(()),
                _ => Err(list),
            }
        },
    )
    .await;
    let job = f.app.get_job(&id).await;
    assert_eq!(
        job["state"], "running",
        "a forged report changed the job: {job:#}"
    );
    let g = gate.clone();
    tokio::task::spawn_blocking(move || std::fs::write(g, "go\n"))
        .await
        .unwrap()
        .unwrap();
    let job = f.app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["result"]["tail"], json!(["real"]));
}

#[tokio::test]
async fn a_command_past_the_jobs_deadline_is_stopped_before_the_agent_takes_more() {
    // A long grace: the program ignores SIGTERM, so its group lives until the SIGKILL.
    let f = farm(&[SH], |c| c.cancel_grace = Duration::from_secs(5)).await;
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pgid");
    let script = format!("trap '' TERM; echo $$ > {}; sleep 600", pid_file.display());
    let mut body = command_job(&script);
    body["timeouts"] = json!({"deadline_ms": 2000});
    let id = f.app.submit_ok(&body).await;
    let next = f.app.submit_ok(&command_job("echo next")).await;
    let job = f.app.wait_terminal(&id).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    let pgid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The job is over, its program not yet: the agent stays taken until it is gone.
    let list = f.app.get_json("/v1/backends").await;
    assert_eq!(list["backends"][0]["current_job"], json!(id), "{list:#}");
    assert_eq!(f.app.get_job(&next).await["state"], "queued");
    let next = f.app.wait_terminal(&next).await;
    assert_eq!(next["state"], "succeeded", "{next:#}");
    assert!(
        !group_alive(pgid),
        "the first command's group outlived its job"
    );
}

#[tokio::test]
async fn a_command_runs_on_an_agent_whose_comfyui_is_down_so_it_can_repair_it() {
    let data = tempfile::tempdir().unwrap();
    let config = Config::new("127.0.0.1:0".parse().unwrap(), data.path().join("d"));
    let app = TestApp::attach(Server::start(config).await.unwrap());
    let stop = CancellationToken::new();
    // Its ComfyUI cannot start (a missing dependency, say): the backend crash-loops.
    let mut c = agent_config(&app.url, "http://127.0.0.1:9", &[SH]);
    c.spawn = Some(gantry_agent::supervise::SpawnConfig {
        command: "echo No module named torch >&2; false".into(),
        cwd: None,
        comfyui: "http://127.0.0.1:9".into(),
    });
    let running = tokio::spawn(agent::run(c, stop.clone()));
    wait_status(&app, "gpu-cmd", "crash_looping").await;
    // A workflow waits; the repair command runs at once.
    let workflow = app
        .submit_ok(&json!({"workflow": crate::support::tiny_workflow("waits"), "tags": ["cmd"]}))
        .await;
    let id = app
        .submit_ok(&command_job("echo pip install torch: done"))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["result"]["tail"], json!(["pip install torch: done"]));
    assert_eq!(app.get_job(&workflow).await["state"], "queued");
    stop.cancel();
    running.await.unwrap().unwrap();
    app.shutdown().await;
}
