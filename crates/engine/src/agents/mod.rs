//! The coordinator's side of agents: `GET /v1/agents/connect` takes an agent's
//! WebSocket, gives the agent a loopback listener (kept for the coordinator's life, so
//! the backend's URL never changes across reconnects) and registers it as a backend of
//! that name. While the link is down the listener refuses every connection, so the
//! backend goes offline exactly as an unreachable URL backend does.

pub mod link;

use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use gantry_agent::tunnel::Mux;

/// How an agent's backend is stored: its URL is made anew (a loopback port) at each start.
use crate::config::AGENT_SCHEME;

/// Every agent this coordinator has seen, by name.
#[derive(Default)]
pub struct Agents {
    pub(crate) slots: Mutex<HashMap<String, Arc<Slot>>>,
    pub(crate) links: AtomicU64,
}

/// One agent's listener and its current link.
pub(crate) struct Slot {
    pub(crate) port: u16,
    /// The identity of the agent that registered the name (from its state file); a link
    /// with another one is refused.
    pub(crate) id: Mutex<Option<String>>,
    pub(crate) link: Mutex<Option<(u64, Mux)>>,
    /// What the agent said of its supervised ComfyUI.
    pub(crate) child: Mutex<Child>,
    /// The programs its `--allow` list names, from its latest hello; `None` until then.
    pub(crate) programs: Mutex<Option<Arc<Vec<String>>>>,
    /// The command attempts running there, each with the channel its messages go to.
    /// The link id is the one it was started over: only that link's end loses it.
    pub(crate) runs: Mutex<HashMap<(String, u32), (u64, RunSender)>>,
}

/// Where a command attempt's messages go.
pub(crate) type RunSender = mpsc::UnboundedSender<serde_json::Value>;

/// An agent's supervised ComfyUI as last reported.
#[derive(Default)]
pub(crate) struct Child {
    pub(crate) supervised: bool,
    pub(crate) state: serde_json::Value,
    pub(crate) lines: std::collections::VecDeque<String>,
    pub(crate) restarts: std::collections::VecDeque<serde_json::Value>,
}

/// Restarts kept per agent.
pub(crate) const RESTARTS_KEPT: usize = gantry_agent::supervise::RESTARTS_KEPT;

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
    pub(crate) name: String,
    /// Comma-separated.
    #[serde(default)]
    pub(crate) tags: Option<String>,
    /// The agent's identity from its state file.
    #[serde(default)]
    pub(crate) id: Option<String>,
}

/// `agent://NAME?id=ID`: how an agent backend is stored.
pub(crate) fn stored_url(name: &str, id: Option<&str>) -> String {
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
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
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
pub(crate) fn run_key(m: &serde_json::Value) -> (String, u32) {
    (
        m["job"].as_str().unwrap_or_default().to_owned(),
        m["attempt"].as_u64().unwrap_or_default() as u32,
    )
}
