//! `gantry agent`: runs on a GPU machine, connects out to the coordinator (one
//! WebSocket; nothing listens here) and carries the coordinator's connections to the
//! local ComfyUI (`tunnel`). Reconnects with backoff whenever the link drops; a prompt
//! running meanwhile keeps running in ComfyUI, and the coordinator's driver finds it
//! (queue, then history, then the output files) once the link is back.

use futures_util::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

use crate::tunnel::Mux;

/// How long opening a connection to the local ComfyUI may take.
const LOCAL_CONNECT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The coordinator, `http(s)://host:port`.
    pub server: String,
    pub token: Option<String>,
    pub name: String,
    /// This machine's identity (from its state file): the coordinator refuses another
    /// machine that takes a registered name.
    pub id: Option<String>,
    pub tags: Vec<String>,
    /// The local ComfyUI, `http://host:port`.
    pub comfyui: String,
    /// The longest wait between two connection attempts.
    pub max_backoff: Duration,
    /// Run ComfyUI as this agent's child (`--spawn`), restarted when it exits or hangs.
    pub spawn: Option<crate::supervise::SpawnConfig>,
    /// The programs command jobs may run here (`--allow`, matched exactly against
    /// `argv[0]`); none when empty.
    pub allow: Vec<String>,
    /// The link is pinged this often and dropped (then made anew) after three silent
    /// ones.
    pub heartbeat: Duration,
}

/// The supervisor's side as the link sees it.
struct Supervision {
    shared: crate::supervise::Shared,
    restart: mpsc::UnboundedSender<crate::supervise::Restart>,
}

/// The link's URL: `ws(s)://.../v1/agents/connect?name=...&tags=...`.
fn link_url(c: &AgentConfig) -> Result<url::Url, String> {
    let mut url =
        url::Url::parse(&c.server).map_err(|e| format!("--server {}: not a URL: {e}", c.server))?;
    let scheme = match url.scheme() {
        "http" => "ws",
        "https" => "wss",
        other => {
            return Err(format!(
                "--server {}: use http or https, not {other}",
                c.server
            ))
        }
    };
    url.set_scheme(scheme)
        .map_err(|()| format!("--server {}: cannot make a WebSocket URL", c.server))?;
    url.set_path("/v1/agents/connect");
    {
        let mut q = url.query_pairs_mut();
        q.clear()
            .append_pair("name", &c.name)
            .append_pair("tags", &c.tags.join(","));
        if let Some(id) = &c.id {
            q.append_pair("id", id);
        }
    }
    Ok(url)
}

/// `host:port` of the local ComfyUI.
fn comfyui_addr(c: &AgentConfig) -> Result<String, String> {
    let url = url::Url::parse(&c.comfyui)
        .map_err(|e| format!("--comfyui {}: not a URL: {e}", c.comfyui))?;
    let host = url
        .host_str()
        .ok_or_else(|| format!("--comfyui {}: no host", c.comfyui))?;
    let port = url
        .port_or_known_default()
        .ok_or_else(|| format!("--comfyui {}: no port", c.comfyui))?;
    Ok(format!("{host}:{port}"))
}

/// Checks the coordinator's and ComfyUI's URLs before anything is written.
pub fn check_urls(server: &str, comfyui: &str) -> Result<(), String> {
    let c = AgentConfig {
        server: server.to_owned(),
        token: None,
        name: "check".into(),
        id: None,
        tags: Vec::new(),
        comfyui: comfyui.to_owned(),
        max_backoff: Duration::from_secs(1),
        spawn: None,
        allow: Vec::new(),
        heartbeat: Duration::from_secs(5),
    };
    link_url(&c)?;
    comfyui_addr(&c)?;
    Ok(())
}

/// The agent's state file: its name and identity, kept across restarts. With no file, a
/// new identity is made and written (`name` is then required); a file naming another
/// agent is an error (two agents must not share one).
pub fn identity(path: &std::path::Path, name: Option<&str>) -> Result<(String, String), String> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct State {
        name: String,
        id: String,
    }
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let state: State = serde_json::from_str(&text)
                .map_err(|e| format!("state file {}: {e}", path.display()))?;
            match name {
                Some(n) if n != state.name => Err(format!(
                    "state file {} is agent {:?}'s: pass --name {:?}, or another --state for a new agent",
                    path.display(),
                    state.name,
                    state.name
                )),
                _ => Ok((state.name, state.id)),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let name = name.ok_or_else(|| {
                format!(
                    "no state file {} yet: give this agent a --name",
                    path.display()
                )
            })?;
            let state = State {
                name: name.to_owned(),
                id: uuid::Uuid::new_v4().to_string(),
            };
            let text = serde_json::to_string_pretty(&state).map_err(|e| e.to_string())?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
            }
            std::fs::write(path, text)
                .map_err(|e| format!("cannot write state file {}: {e}", path.display()))?;
            Ok((state.name, state.id))
        }
        Err(e) => Err(format!("state file {}: {e}", path.display())),
    }
}

/// Runs until `stop`; answers an error only for a configuration that can never work.
pub async fn run(config: AgentConfig, stop: CancellationToken) -> Result<(), String> {
    let url = link_url(&config)?;
    let local = comfyui_addr(&config)?;
    // The current link, for the supervisor's reports.
    let current: Arc<Mutex<Option<Mux>>> = Arc::default();
    let mut supervised = None;
    let mut child = None;
    if let Some(spawn) = &config.spawn {
        let shared = crate::supervise::Shared::default();
        let (reports_tx, mut reports_rx) = mpsc::unbounded_channel();
        let (restart_tx, restart_rx) = mpsc::unbounded_channel();
        child = Some(tokio::spawn(crate::supervise::run(
            spawn.clone(),
            shared.clone(),
            reports_tx,
            restart_rx,
            stop.clone(),
        )));
        let link = current.clone();
        tokio::spawn(async move {
            while let Some(report) = reports_rx.recv().await {
                let mux = link.lock().unwrap_or_else(|p| p.into_inner()).clone();
                // Unlinked, a report is dropped: the next link's hello has the state
                // and the latest lines.
                if let Some(mux) = mux {
                    mux.send_control(&report).await;
                }
            }
        });
        supervised = Some(Supervision {
            shared,
            restart: restart_tx,
        });
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let linked = tokio::select! {
            _ = stop.cancelled() => break,
            linked = link(&config, &url, &local, &stop, &current, supervised.as_ref()) => linked,
        };
        match linked {
            Ok(()) => {
                tracing::warn!(server = %config.server, "agent: link closed; reconnecting");
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                tracing::warn!(server = %config.server, error = %e, "agent: no link");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(config.max_backoff);
    }
    // The child goes down with the agent (SIGTERM to its group, then SIGKILL).
    if let Some(child) = child {
        if let Err(e) = child.await {
            tracing::error!(error = %e, "the supervisor of the local ComfyUI ended abnormally");
        }
    }
    Ok(())
}

/// Runs one command job's program (`process::run`) and reports it on the link: its
/// start, each line, and how it ended.
async fn run_command(
    m: serde_json::Value,
    allow: Vec<String>,
    mux: Mux,
    cancel: CancellationToken,
) {
    let (job, attempt) = (m["job"].clone(), m["attempt"].clone());
    let exit = match serde_json::from_value::<crate::process::Spec>(m) {
        Err(e) => crate::process::Exit {
            outcome: "spawn_failed",
            message: format!("the coordinator's command message is malformed: {e}"),
            ..Default::default()
        },
        Ok(spec) => {
            tracing::info!(job_id = %job, program = ?spec.argv.first(), "agent: command");
            // Bounded: a program faster than the link loses live lines, not memory.
            let (tx, mut rx) = mpsc::channel(1024);
            let forward = {
                let mux = mux.clone();
                let (job, attempt) = (job.clone(), attempt.clone());
                tokio::spawn(async move {
                    while let Some(e) = rx.recv().await {
                        let m = match e {
                            crate::process::Event::Started { pid } => serde_json::json!({
                                "type": "command_started", "job": job, "attempt": attempt, "pid": pid
                            }),
                            crate::process::Event::Line { stream, line } => serde_json::json!({
                                "type": "command_output", "job": job, "attempt": attempt,
                                "stream": stream, "line": line
                            }),
                        };
                        mux.send_control(&m).await;
                    }
                })
            };
            let exit = crate::process::run(&spec, &allow, tx, cancel.clone()).await;
            // Every line goes before the end.
            if let Err(e) = forward.await {
                tracing::error!(error = %e, "a command's output forwarder ended abnormally");
            }
            exit
        }
    };
    cancel.cancel();
    let mut report = match serde_json::to_value(&exit) {
        Ok(v) => v,
        // `Exit` is plain data: a failure is a bug, and the coordinator still hears the
        // command ended (as lost: `cancelled`, retried) rather than a null it cannot read.
        Err(e) => {
            tracing::error!(error = %e, "cannot serialise a command's exit");
            serde_json::json!({"outcome": "cancelled", "message": e.to_string()})
        }
    };
    report["type"] = "command_exit".into();
    report["job"] = job;
    report["attempt"] = attempt;
    mux.send_control(&report).await;
}

/// One life of the link: connect, then carry streams until it closes.
async fn link(
    config: &AgentConfig,
    url: &url::Url,
    local: &str,
    stop: &CancellationToken,
    current: &Arc<Mutex<Option<Mux>>>,
    supervised: Option<&Supervision>,
) -> Result<(), String> {
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| e.to_string())?;
    if let Some(token) = &config.token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the token is not a valid header value".to_owned())?;
        request.headers_mut().insert("authorization", value);
    }
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(server = %config.server, name = %config.name, "agent: linked");
    let (sink, stream) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(256);
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<serde_json::Value>();
    let mux = Mux::new(out_tx).with_control(ctl_tx);
    let hello = match supervised {
        Some(s) => {
            let lines = s.shared.lines();
            let tail = &lines[lines.len().saturating_sub(200)..];
            serde_json::json!({"type": "hello", "supervised": true, "child": s.shared.state(), "lines": tail, "restarts": s.shared.restarts(), "allow": config.allow})
        }
        None => serde_json::json!({"type": "hello", "supervised": false, "allow": config.allow}),
    };
    mux.send_control(&hello).await;
    *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(mux.clone());
    let restart = supervised.map(|s| s.restart.clone());
    // This link's commands: they stop when it drops (the coordinator counts them lost).
    let commands = stop.child_token();
    let _stop_commands = commands.clone().drop_guard();
    let mut running: std::collections::HashMap<(String, u64), CancellationToken> =
        std::collections::HashMap::new();
    let controls = async {
        while let Some(m) = ctl_rx.recv().await {
            let key = || {
                (
                    m["job"].as_str().unwrap_or_default().to_owned(),
                    m["attempt"].as_u64().unwrap_or_default(),
                )
            };
            if m["type"] == "command" {
                running.retain(|_, c| !c.is_cancelled());
                let cancel = commands.child_token();
                running.insert(key(), cancel.clone());
                tokio::spawn(run_command(
                    m.clone(),
                    config.allow.clone(),
                    mux.clone(),
                    cancel,
                ));
                continue;
            }
            if m["type"] == "command_cancel" {
                if let Some(c) = running.remove(&key()) {
                    c.cancel();
                }
                continue;
            }
            if m["type"] == "restart" {
                let prompt = m["prompt_id"].as_str().unwrap_or_default().to_owned();
                match &restart {
                    Some(r) => {
                        tracing::warn!(prompt_id = %prompt, "agent: the coordinator finds ComfyUI stuck; restarting it");
                        let _ = r.send(crate::supervise::Restart::Stuck(prompt));
                    }
                    None => {
                        tracing::warn!(prompt_id = %prompt, "agent: ComfyUI is stuck, and this agent does not supervise it (--spawn)")
                    }
                }
            }
        }
        std::future::pending::<()>().await
    };
    // Bounded: an OPEN is handled on the link's reader, which a hung connect would hold.
    let connect = || async {
        match tokio::time::timeout(LOCAL_CONNECT, TcpStream::connect(local.to_owned())).await {
            Ok(done) => done,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer from {local} within {LOCAL_CONNECT:?}"),
            )),
        }
    };
    let carried = crate::tunnel::carry(
        sink,
        stream,
        &mut out_rx,
        config.heartbeat,
        &mux,
        Some(&connect),
    );
    tokio::select! {
        end = carried => {
            if end == crate::tunnel::LinkEnd::Silent {
                tracing::warn!(server = %config.server, "agent: nothing from the coordinator for three heartbeats; linking anew");
            }
        }
        _ = controls => {}
        _ = stop.cancelled() => {}
    }
    *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
    mux.close_all();
    Ok(())
}
