//! `gantry agent` as a process: serving its local ComfyUI until SIGTERM, restarting a
//! spawned ComfyUI that was killed or stuck past its interrupt.

use super::{farm, farm_with, run, sleep_graph, stderr, write, Farm};
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantry_agent_serves_its_local_comfyui_until_sigterm() {
    let farm = farm(&[]).await;
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("agent.json");
    let gpu = gantry_sim::spawn(gantry_sim::SimConfig {
        speed: 20.0,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut agent = farm
        .gantry(&[
            "agent",
            "--state",
            state.to_str().unwrap(),
            "--server",
            &farm.server.url(),
            "--name",
            "gpu-2",
            "--tag",
            "remote",
            "--comfyui",
            &gpu.url(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status_of = |farm: &Farm| {
        let http = farm.http.clone();
        let url = format!("{}/v1/backends", farm.server.url());
        async move {
            let list: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            list["backends"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["name"] == "gpu-2")
                .map(|b| b["status"].as_str().unwrap_or_default().to_owned())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while status_of(&farm).await.as_deref() != Some("idle") {
        assert!(
            Instant::now() < deadline,
            "the agent's backend never became idle"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "w.json",
        &json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "remote"}}
        }),
    );
    let o = run(farm.gantry(&["submit", &file, "--tag", "remote", "--wait", "--json"])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let runs: Value = farm
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
        1,
        "it ran on the agent's ComfyUI"
    );

    // SIGTERM (what systemd sends): the agent exits cleanly; its backend goes offline.
    let pid = agent.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let exit = tokio::task::spawn_blocking(move || agent.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(20);
    while status_of(&farm).await.as_deref() != Some("offline") {
        assert!(
            Instant::now() < deadline,
            "the agent's backend never went offline"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The state file keeps the name and identity: a restart needs no --name, another
    // name with this file is refused.
    let kept: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(kept["name"], "gpu-2");
    assert!(
        kept["id"].as_str().is_some_and(|id| id.len() == 36),
        "{kept}"
    );
    let st = state.to_str().unwrap();
    let o = run(farm.gantry(&[
        "agent",
        "--state",
        st,
        "--server",
        "http://127.0.0.1:9",
        "--name",
        "other",
    ]))
    .await;
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("is agent \"gpu-2\"'s"),
        "{}",
        stderr(&o)
    );
    let fresh = state_dir.path().join("never.json");
    let o = run(farm.gantry(&[
        "agent",
        "--state",
        fresh.to_str().unwrap(),
        "--server",
        "ftp://x",
        "--name",
        "n",
    ]))
    .await;
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("use http or https"), "{}", stderr(&o));
    assert!(!fresh.exists(), "a refused start writes nothing");
}

/// The processes whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if rest.split_whitespace().nth(1) == Some(&pid.to_string()) {
            out.push(child);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantry_agent_spawn_restarts_a_killed_comfyui_and_the_job_succeeds_on_retry() {
    // The dead backend's block for this workflow is short: the retry waits for it.
    let farm = farm_with(&[], |c| {
        c.health.block_ms = 300;
        c.backoff_base = Duration::from_millis(50);
    })
    .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let comfyui = format!("http://127.0.0.1:{port}");
    let child_cmd = format!(
        "env RUST_LOG=info {} sim --listen 127.0.0.1:{port} --speed 20",
        env!("CARGO_BIN_EXE_gantry")
    );
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("agent.json");
    let mut agent = farm
        .gantry(&[
            "agent",
            "--state",
            state.to_str().unwrap(),
            "--server",
            &farm.server.url(),
            "--name",
            "gpu-3",
            "--tag",
            "supervised",
            "--comfyui",
            &comfyui,
            "--spawn",
            &child_cmd,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let agent_pid = agent.id();
    let http = farm.http.clone();
    let logs_url = format!("{}/v1/backends/gpu-3/logs", farm.server.url());
    let logs = || {
        let (http, url) = (http.clone(), logs_url.clone());
        async move {
            let r = http.get(url).send().await.unwrap();
            if r.status() == 200 {
                r.json::<Value>().await.unwrap()
            } else {
                Value::Null
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while logs().await["child"]["state"] != "ready" {
        assert!(
            Instant::now() < deadline,
            "the child never became ready: {}",
            logs().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_child = children_of(agent_pid);
    assert_eq!(first_child.len(), 1, "one child: {first_child:?}");
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(40.0, 40));
    // Follow the job while the child is killed mid-run.
    let mut watch = farm
        .gantry(&["submit", &file, "--tag", "supervised", "--wait"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs: Value = farm
            .http
            .get(format!("{}/v1/jobs?state=running", farm.server.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if jobs["jobs"][0]["phase"] == "executing" {
            break;
        }
        assert!(Instant::now() < deadline, "the job never ran: {jobs}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed = Command::new("kill")
        .args(["-KILL", &first_child[0].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = tokio::task::spawn_blocking(move || {
        let status = watch.wait().unwrap();
        (status, watch)
    })
    .await
    .unwrap();
    assert_eq!(out.0.code(), Some(0), "the job succeeded on retry");
    let l = logs().await;
    let restarts = l["restarts"].as_array().unwrap();
    assert!(
        restarts.iter().any(|r| r["reason"] == "exited (signal 9)"),
        "{l:#}"
    );
    assert!(
        !l["lines"].as_array().unwrap().is_empty(),
        "the child's output is kept: {l:#}"
    );
    let second_child = children_of(agent_pid);
    assert_eq!(second_child.len(), 1, "{second_child:?}");
    assert_ne!(second_child, first_child, "a new child");

    // SIGTERM to the agent takes its child down too: no orphan.
    Command::new("kill")
        .args(["-TERM", &agent_pid.to_string()])
        .status()
        .unwrap();
    let exit = tokio::task::spawn_blocking(move || agent.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
    assert!(
        !std::path::Path::new(&format!("/proc/{}", second_child[0])).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", second_child[0]))
                .is_ok_and(|s| s.contains(") Z ")),
        "the child is gone with the agent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gantry_agent_spawn_restarts_a_comfyui_stuck_past_its_interrupt_and_the_job_fails_over() {
    let farm = farm_with(&[], |c| {
        c.cancel_grace = Duration::from_millis(300);
        c.backoff_base = Duration::from_millis(50);
    })
    .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let comfyui = format!("http://127.0.0.1:{port}");
    // A node blocked in one call: the interrupt never lands (PROTOCOL.md capture d3).
    let child_cmd = format!(
        "{} sim --listen 127.0.0.1:{port} --speed 20 --fault stall:at=50,uninterruptible",
        env!("CARGO_BIN_EXE_gantry")
    );
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("agent.json");
    let mut agent = farm
        .gantry(&[
            "agent",
            "--state",
            state.to_str().unwrap(),
            "--server",
            &farm.server.url(),
            "--name",
            "gpu-4",
            "--comfyui",
            &comfyui,
            "--spawn",
            &child_cmd,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = farm.server.url();
    let http = farm.http.clone();
    let get = |path: String| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let r = http.get(format!("{base}{path}")).send().await.unwrap();
            r.json::<Value>().await.unwrap_or(Value::Null)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while get("/v1/backends/gpu-4/logs".into()).await["child"]["state"] != "ready" {
        assert!(Instant::now() < deadline, "the child never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Only gpu-4 takes the job at first.
    let drained = http
        .post(format!("{base}/v1/backends/a/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 200);
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(40.0, 40));
    let o = run(farm.gantry(&["submit", &file, "--timeout", "node_stall=1s"])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(format!("/v1/jobs/{id}")).await["attempts"][0]["backend"] != "gpu-4" {
        assert!(Instant::now() < deadline, "the job never went to gpu-4");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    http.post(format!("{base}/v1/backends/a/resume"))
        .send()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let job = get(format!("/v1/jobs/{id}")).await;
        if job["state"] == "succeeded" || job["state"] == "failed" {
            break job;
        }
        assert!(Instant::now() < deadline, "the job never ended: {job:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["attempts"][0]["backend"], "gpu-4");
    assert_eq!(job["attempts"][1]["backend"], "a", "failed over: {job:#}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = get("/v1/backends/gpu-4/logs".into()).await;
        let stuck = logs["restarts"].as_array().is_some_and(|r| {
            r.iter().any(|x| {
                x["reason"].as_str().is_some_and(|s| {
                    s.starts_with("stuck: prompt") && s.contains("after its interrupt")
                })
            })
        });
        if stuck {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no restart for the stuck prompt: {logs:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status()
        .unwrap();
    let exit = tokio::task::spawn_blocking(move || agent.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}
