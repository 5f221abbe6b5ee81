//! The coordinator's side of agents: `GET /v1/agents/connect` takes an agent's
//! WebSocket, gives the agent a loopback listener (kept for the coordinator's life, so
//! the backend's URL never changes across reconnects) and registers it as a backend of
//! that name. While the link is down the listener refuses every connection, so the
//! backend goes offline exactly as an unreachable URL backend does.

use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::config::BackendConfig;
use crate::engine::Engine;
use crate::tunnel::Mux;

/// How an agent's backend is stored: its URL is made anew (a loopback port) at each start.
use crate::config::AGENT_SCHEME;

/// Every agent this coordinator has seen, by name.
#[derive(Default)]
pub struct Agents {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    links: AtomicU64,
}

/// One agent's listener and its current link.
struct Slot {
    port: u16,
    /// The identity of the agent that registered the name (from its state file); a link
    /// with another one is refused.
    id: Mutex<Option<String>>,
    link: Mutex<Option<(u64, Mux)>>,
    /// What the agent said of its supervised ComfyUI.
    child: Mutex<Child>,
    /// The programs its `--allow` list names, from its latest hello; `None` until then.
    programs: Mutex<Option<Arc<Vec<String>>>>,
    /// The command attempts running there, each with the channel its messages go to.
    /// The link id is the one it was started over: only that link's end loses it.
    runs: Mutex<HashMap<(String, u32), (u64, RunSender)>>,
}

/// Where a command attempt's messages go.
type RunSender = mpsc::UnboundedSender<serde_json::Value>;

/// An agent's supervised ComfyUI as last reported.
#[derive(Default)]
struct Child {
    supervised: bool,
    state: serde_json::Value,
    lines: std::collections::VecDeque<String>,
    restarts: std::collections::VecDeque<serde_json::Value>,
}

/// Restarts kept per agent.
const RESTARTS_KEPT: usize = crate::supervise::RESTARTS_KEPT;

impl Slot {
    fn link(&self) -> Option<Mux> {
        self.lock().as_ref().map(|(_, m)| m.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, Mux)>> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Deserialize)]
pub struct ConnectQuery {
    name: String,
    /// Comma-separated.
    #[serde(default)]
    tags: Option<String>,
    /// The agent's identity from its state file.
    #[serde(default)]
    id: Option<String>,
}

/// `agent://NAME?id=ID`: how an agent backend is stored.
fn stored_url(name: &str, id: Option<&str>) -> String {
    match id {
        Some(id) => format!("{AGENT_SCHEME}{name}?id={id}"),
        None => format!("{AGENT_SCHEME}{name}"),
    }
}

/// The id in a stored `agent://NAME?id=ID`.
pub fn stored_id(url: &str) -> Option<String> {
    url.split_once("?id=").map(|(_, id)| id.to_owned())
}

/// A name a backend can have: 1 to 64 of `A-Za-z0-9._-`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `GET /v1/agents/connect?name=NAME&tags=a,b`: an agent's link (WebSocket).
pub async fn connect(
    State(engine): State<Engine>,
    Query(q): Query<ConnectQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let refuse = |status: axum::http::StatusCode, code: &str, message: String| {
        let body = serde_json::json!({"error": {"code": code, "message": message, "details": {}}});
        (status, axum::Json(body)).into_response()
    };
    if !valid_name(&q.name) {
        return refuse(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid_name",
            format!(
                "agent name {:?}: use 1 to 64 letters, digits, '.', '_' or '-'",
                q.name
            ),
        );
    }
    let known_url = engine.backends().get(&q.name).map(|b| b.config.url.clone());
    let slot = match engine.agents().slot(&q.name, engine.shutdown_token()).await {
        Ok(slot) => slot,
        Err(e) => {
            return refuse(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "agent_listener",
                format!("cannot listen for agent {}: {e}", q.name),
            )
        }
    };
    let url = format!("http://127.0.0.1:{}", slot.port);
    {
        let mut known = slot.id.lock().unwrap_or_else(|p| p.into_inner());
        match (known.as_deref(), q.id.as_deref()) {
            (Some(k), Some(offered)) if k != offered => {
                return refuse(
                    axum::http::StatusCode::CONFLICT,
                    "name_taken",
                    format!(
                        "backend {} belongs to another agent (id {k}, this one is {offered}): give this machine another --name",
                        q.name
                    ),
                );
            }
            // Seed 002: an unknown id never replaces a known one.
            (None, Some(offered)) => *known = Some(offered.to_owned()),
            _ => {}
        }
    }
    if let Some(known) = known_url {
        if known != url {
            return refuse(
                axum::http::StatusCode::CONFLICT,
                "name_taken",
                format!(
                    "a backend named {} is already configured with URL {known}: give the agent another --name",
                    q.name
                ),
            );
        }
    }
    let tags: Vec<String> = q
        .tags
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    let name = q.name.clone();
    let id = q.id.clone();
    ws.on_upgrade(move |socket| serve_link(engine, name, id, tags, url, slot, socket))
}

impl Agents {
    /// Makes the listener of a stored agent backend at start; answers its URL.
    pub async fn reserve(
        &self,
        name: &str,
        id: Option<String>,
        stop: &tokio_util::sync::CancellationToken,
    ) -> std::io::Result<String> {
        let slot = self.slot(name, stop).await?;
        *slot.id.lock().unwrap_or_else(|p| p.into_inner()) = id;
        Ok(format!("http://127.0.0.1:{}", slot.port))
    }

    /// The slot of `name`, with its listener made on first use.
    async fn slot(
        &self,
        name: &str,
        stop: &tokio_util::sync::CancellationToken,
    ) -> std::io::Result<Arc<Slot>> {
        if let Some(s) = self.get(name) {
            return Ok(s);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let slot = Arc::new(Slot {
            port: listener.local_addr()?.port(),
            id: Mutex::new(None),
            link: Mutex::new(None),
            child: Mutex::default(),
            programs: Mutex::new(None),
            runs: Mutex::default(),
        });
        {
            let mut slots = self.lock();
            // Two first links of one name at once: the first one's slot wins.
            if let Some(s) = slots.get(name) {
                return Ok(s.clone());
            }
            slots.insert(name.to_owned(), slot.clone());
        }
        let s = slot.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((tcp, _)) = accepted else { continue };
                match s.link() {
                    Some(mux) => mux.open(tcp).await,
                    // No link: the connection closes at once, as a refused one would.
                    None => drop(tcp),
                }
            }
        });
        Ok(slot)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, name: &str) -> Option<Arc<Slot>> {
        self.lock().get(name).cloned()
    }

    /// The coordinator found `prompt_id` stuck on agent `name` past its interrupt: ask
    /// the agent to restart its ComfyUI (it does if it supervises one).
    pub fn on_stuck(&self, name: &str, prompt_id: &str) {
        let Some(mux) = self.get(name).and_then(|s| s.link()) else {
            return;
        };
        let message = serde_json::json!({"type": "restart", "prompt_id": prompt_id});
        tokio::spawn(async move {
            mux.send_control(&message).await;
        });
    }

    /// The programs backend `name` runs for command jobs: an agent's allow-list (`None`
    /// until it has said), none for a backend that is not an agent.
    pub fn programs_of(&self, name: &str) -> Option<Arc<Vec<String>>> {
        match self.get(name) {
            Some(slot) => slot
                .programs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            None => Some(Arc::default()),
        }
    }

    pub fn is_agent(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Whether agent `name` is linked to this coordinator now.
    pub fn is_linked(&self, name: &str) -> bool {
        self.get(name).is_some_and(|s| s.link().is_some())
    }

    /// Asks agent `name` to run a command attempt; its messages (`command_started`,
    /// `command_output`, `command_exit`, and `command_lost` when the link drops) come on
    /// the answered channel.
    pub async fn start_command(
        &self,
        name: &str,
        request: serde_json::Value,
    ) -> Result<mpsc::UnboundedReceiver<serde_json::Value>, String> {
        let slot = self
            .get(name)
            .ok_or_else(|| format!("{name} is not an agent"))?;
        let (link, mux) = slot
            .lock()
            .clone()
            .ok_or_else(|| format!("agent {name} is not linked"))?;
        let key = run_key(&request);
        let (tx, rx) = mpsc::unbounded_channel();
        slot.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (link, tx));
        if !mux.send_control(&request).await {
            return Err(format!("the link to agent {name} closed"));
        }
        Ok(rx)
    }

    /// Asks agent `name` to stop a command attempt (its process group: SIGTERM, then
    /// SIGKILL after `grace_ms`).
    pub async fn cancel_command(&self, name: &str, job: &str, attempt: u32) {
        if let Some(mux) = self.get(name).and_then(|s| s.link()) {
            let m = serde_json::json!({"type": "command_cancel", "job": job, "attempt": attempt});
            mux.send_control(&m).await;
        }
    }

    pub fn forget_command(&self, name: &str, job: &str, attempt: u32) {
        if let Some(slot) = self.get(name) {
            slot.runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&(job.to_owned(), attempt));
        }
    }

    /// `GET /v1/backends/{name}/logs`: `None` when `name` is not an agent.
    pub fn logs(&self, name: &str) -> Option<gantry_api::BackendLogs> {
        let slot = self.get(name)?;
        let c = slot.child.lock().unwrap_or_else(|p| p.into_inner());
        Some(gantry_api::BackendLogs {
            name: name.to_owned(),
            linked: slot.link().is_some(),
            supervised: c.supervised,
            child: c.state.clone(),
            lines: c.lines.iter().cloned().collect(),
            restarts: c.restarts.iter().cloned().collect(),
        })
    }
}

/// Which command attempt a control message is about.
fn run_key(m: &serde_json::Value) -> (String, u32) {
    (
        m["job"].as_str().unwrap_or_default().to_owned(),
        m["attempt"].as_u64().unwrap_or_default() as u32,
    )
}

/// A control message from an agent.
fn on_control(engine: &Engine, name: &str, slot: &Slot, m: serde_json::Value) {
    if m["type"]
        .as_str()
        .is_some_and(|t| t.starts_with("command_"))
    {
        let runs = slot.runs.lock().unwrap_or_else(|p| p.into_inner());
        // An agent reports only the attempts it was given over this coordinator's
        // link: anything else is dropped.
        if let Some((_, tx)) = runs.get(&run_key(&m)) {
            let _ = tx.send(m);
        }
        return;
    }
    if m["type"] == "hello" {
        let programs: Vec<String> = m["allow"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let programs = Arc::new(programs);
        *slot.programs.lock().unwrap_or_else(|p| p.into_inner()) = Some(programs.clone());
        if let Some(b) = engine.backends().get_mut(name) {
            b.programs = Some(programs);
        }
        engine.wake_scheduler();
    }
    if matches!(m["type"].as_str(), Some("hello" | "child")) {
        let state = if m["type"] == "hello" {
            &m["child"]
        } else {
            &m
        };
        let looping = state["state"] == "crash_looping";
        if let Some(b) = engine.backends().get_mut(name) {
            b.crash_looping = looping;
        }
        engine.backends_changed();
    }
    let mut c = slot.child.lock().unwrap_or_else(|p| p.into_inner());
    match m["type"].as_str() {
        Some("hello") => {
            c.supervised = m["supervised"] == true;
            c.state = m["child"].clone();
            c.lines = m["lines"]
                .as_array()
                .map(|l| {
                    l.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            // The agent keeps its restarts, those made while unlinked too.
            if let Some(r) = m["restarts"].as_array() {
                c.restarts = r.iter().rev().take(RESTARTS_KEPT).rev().cloned().collect();
            }
        }
        Some("child") => c.state = m,
        Some("log") => {
            if c.lines.len() >= crate::supervise::LOG_LINES {
                c.lines.pop_front();
            }
            c.lines
                .push_back(m["line"].as_str().unwrap_or_default().to_owned());
        }
        Some("restart") => {
            tracing::warn!(agent = %name, reason = %m["reason"], "agent restarted its ComfyUI");
            if c.restarts.len() >= RESTARTS_KEPT {
                c.restarts.pop_front();
            }
            let mut event = m;
            // Stamped by the agent; by this coordinator only if the agent did not.
            if event["at"].is_null() {
                event["at"] = serde_json::json!(crate::clock::rfc3339(crate::clock::now_ms()));
            }
            c.restarts.push_back(event);
        }
        _ => {}
    }
}

async fn serve_link(
    engine: Engine,
    name: String,
    agent_id: Option<String>,
    tags: Vec<String>,
    url: String,
    slot: Arc<Slot>,
    socket: WebSocket,
) {
    let id = engine.agents().links.fetch_add(1, Ordering::Relaxed);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(256);
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel();
    let mux = Mux::new(out_tx).with_control(ctl_tx);
    let s = slot.clone();
    let agent = name.clone();
    let e = engine.clone();
    tokio::spawn(async move {
        while let Some(m) = ctl_rx.recv().await {
            on_control(&e, &agent, &s, m);
        }
    });
    // A newer link of the same agent replaces the older one (a reconnect that raced the
    // old socket's close).
    if let Some((_, old)) = slot.lock().replace((id, mux.clone())) {
        old.close_all();
    }
    let known_tags = engine.backends().get(&name).map(|b| b.config.tags.clone());
    match known_tags {
        None => match BackendConfig::parse(&format!("{name}={url}")) {
            Ok(mut config) => {
                config.tags = tags.clone();
                // Kept, so that after a restart its running jobs are recovered onto it.
                let record = gantry_store::BackendRecord {
                    name: name.clone(),
                    url: stored_url(&name, agent_id.as_deref()),
                    tags,
                    priority: 0,
                    added_at: crate::clock::now_ms(),
                };
                if let Err(e) = engine.store().add_backend(&record).await {
                    tracing::warn!(error = %e, agent = %name, "agent backend not stored");
                }
                engine.add_backend(config);
            }
            Err(e) => tracing::error!(error = %e, agent = %name, "agent backend not added"),
        },
        // Seed 002: a re-registration never overwrites what is known.
        Some(known) if !tags.is_empty() && known != tags => {
            tracing::warn!(agent = %name, ?known, offered = ?tags, "agent offers other tags; the known ones are kept");
        }
        Some(_) => {}
    }
    if let Some(b) = engine.backends().get_mut(&name) {
        b.linked = true;
    }
    engine.wake_scheduler();
    // In a farm only the coordinator an agent links to can drive it: take its lease.
    if let Some(cluster) = engine.cluster() {
        cluster.check.notify_one();
    }
    tracing::info!(agent = %name, "agent connected");
    let (sink, stream) = socket.split();
    let heartbeat = engine.config().agent_heartbeat;
    // The coordinator opens streams; the agent may not.
    let refuse_opens = None::<&fn() -> std::future::Ready<std::io::Result<tokio::net::TcpStream>>>;
    let stop = engine.shutdown_token().clone();
    tokio::select! {
        end = crate::tunnel::carry(sink, stream, &mut out_rx, heartbeat, &mux, refuse_opens) => {
            if end == crate::tunnel::LinkEnd::Silent {
                tracing::warn!(agent = %name, "nothing from the agent for three heartbeats: the link is dropped");
            }
        }
        _ = stop.cancelled() => {}
    }
    let ours = {
        let mut link = slot.lock();
        let ours = link.as_ref().is_some_and(|(i, _)| *i == id);
        if ours {
            *link = None;
        }
        ours
    };
    // (A newer link of the same agent keeps it linked.)
    if ours {
        if let Some(b) = engine.backends().get_mut(&name) {
            b.linked = false;
        }
    }
    mux.close_all();
    // The agent stops the commands of a link that dropped; their attempts are lost.
    slot.runs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(job, attempt), (link, tx)| {
            if *link != id {
                return true;
            }
            let lost = serde_json::json!({"type": "command_lost", "job": job, "attempt": attempt});
            let _ = tx.send(lost);
            false
        });
    if let Some(cluster) = engine.cluster() {
        cluster.check.notify_one();
    }
    tracing::info!(agent = %name, "agent disconnected");
}
