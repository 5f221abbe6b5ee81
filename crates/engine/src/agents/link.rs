//! The coordinator's end of an agent's link: the agent admitted (`admit`), then, over
//! its WebSocket (`serve`), registered as a backend, its streams carried to the loopback
//! listener, and its control messages (hello, child state, log lines, restarts, command
//! output) taken in.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;

use crate::config::BackendConfig;
use crate::engine::Engine;
use gantry_agent::tunnel::Mux;

use super::{run_key, stored_url, valid_name, ConnectQuery, Slot, RESTARTS_KEPT};

/// Why a link is refused, by what kind of refusal it is.
#[derive(Debug)]
pub enum Refusal {
    /// The request is wrong (a bad name).
    Invalid { code: &'static str, message: String },
    /// The name belongs to someone else.
    Taken { code: &'static str, message: String },
    /// This coordinator cannot take links now.
    Unavailable { code: &'static str, message: String },
}

/// An agent admitted to link, before its socket is open.
pub struct Admitted {
    name: String,
    id: Option<String>,
    tags: Vec<String>,
    url: String,
    slot: Arc<Slot>,
}

/// Check an agent's request to link (`GET /v1/agents/connect?name=NAME&tags=a,b`): its
/// name, its identity against the one that registered the name, and a configured URL
/// backend of the same name. Nothing is changed for a refused agent but the listener of
/// its name.
pub async fn admit(engine: &Engine, q: &ConnectQuery) -> Result<Admitted, Refusal> {
    if !valid_name(&q.name) {
        return Err(Refusal::Invalid {
            code: "invalid_name",
            message: format!(
                "agent name {:?}: use 1 to 64 letters, digits, '.', '_' or '-'",
                q.name
            ),
        });
    }
    let known_url = engine.backends().get(&q.name).map(|b| b.config.url.clone());
    let slot = engine
        .agents()
        .slot(&q.name, engine.shutdown_token())
        .await
        .map_err(|e| Refusal::Unavailable {
            code: "agent_listener",
            message: format!("cannot listen for agent {}: {e}", q.name),
        })?;
    let url = format!("http://127.0.0.1:{}", slot.port);
    {
        let mut known = slot.id.lock().unwrap_or_else(|p| p.into_inner());
        match (known.as_deref(), q.id.as_deref()) {
            (Some(k), Some(offered)) if k != offered => {
                return Err(Refusal::Taken {
                    code: "name_taken",
                    message: format!(
                        "backend {} belongs to another agent (id {k}, this one is {offered}): give this machine another --name",
                        q.name
                    ),
                });
            }
            // Seed 002: an unknown id never replaces a known one.
            (None, Some(offered)) => *known = Some(offered.to_owned()),
            _ => {}
        }
    }
    if let Some(known) = known_url {
        if known != url {
            return Err(Refusal::Taken {
                code: "name_taken",
                message: format!(
                    "a backend named {} is already configured with URL {known}: give the agent another --name",
                    q.name
                ),
            });
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
    Ok(Admitted {
        name: q.name.clone(),
        id: q.id.clone(),
        tags,
        url,
        slot,
    })
}

/// A control message from an agent.
pub(crate) fn on_control(engine: &Engine, name: &str, slot: &Slot, m: serde_json::Value) {
    if m["type"]
        .as_str()
        .is_some_and(|t| t.starts_with("command_"))
    {
        let runs = slot.runs.lock().unwrap_or_else(|p| p.into_inner());
        // An agent reports only the attempts it was given over this coordinator's
        // link: anything else is dropped.
        if let Some((_, tx)) = runs.get(&run_key(&m)) {
            // Refused only once the attempt's task ended (it gave up on the command):
            // nothing is waiting for what the agent says of it any more.
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
            if c.lines.len() >= gantry_agent::supervise::LOG_LINES {
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

/// Serve an admitted agent's link over its socket (`sink` and `stream` of whatever
/// WebSocket library carries it) until it ends or the coordinator stops.
pub async fn serve<M, Si, St, E>(engine: Engine, admitted: Admitted, sink: Si, stream: St)
where
    M: gantry_agent::tunnel::LinkMessage,
    Si: futures_util::Sink<M> + Unpin,
    St: futures_util::Stream<Item = Result<M, E>> + Unpin,
{
    let Admitted {
        name,
        id: agent_id,
        tags,
        url,
        slot,
    } = admitted;
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
    let heartbeat = engine.config().agent_heartbeat;
    // The coordinator opens streams; the agent may not.
    let refuse_opens = None::<&fn() -> std::future::Ready<std::io::Result<tokio::net::TcpStream>>>;
    let stop = engine.shutdown_token().clone();
    tokio::select! {
        end = gantry_agent::tunnel::carry(sink, stream, &mut out_rx, heartbeat, &mux, refuse_opens) => {
            if end == gantry_agent::tunnel::LinkEnd::Silent {
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
            // As above: a task that already ended needs no word of the loss.
            let _ = tx.send(lost);
            false
        });
    if let Some(cluster) = engine.cluster() {
        cluster.check.notify_one();
    }
    tracing::info!(agent = %name, "agent disconnected");
}
