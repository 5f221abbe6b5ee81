//! The coordinator's side of agents: `GET /v1/agents/connect` takes an agent's
//! WebSocket, gives the agent a loopback listener (kept for the coordinator's life, so
//! the backend's URL never changes across reconnects) and registers it as a backend of
//! that name. While the link is down the listener refuses every connection, so the
//! backend goes offline exactly as an unreachable URL backend does.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
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
pub const AGENT_SCHEME: &str = "agent://";

/// Every agent this coordinator has seen, by name.
#[derive(Default)]
pub struct Agents {
    slots: tokio::sync::Mutex<HashMap<String, Arc<Slot>>>,
    links: AtomicU64,
}

/// One agent's listener and its current link.
struct Slot {
    port: u16,
    link: Mutex<Option<(u64, Mux)>>,
}

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
    if engine.cluster().is_some() {
        return refuse(
            axum::http::StatusCode::CONFLICT,
            "agents_unsupported",
            "agents connect to a coordinator on the embedded store only, for now".into(),
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
    ws.on_upgrade(move |socket| serve_link(engine, name, tags, url, slot, socket))
}

impl Agents {
    /// Makes the listener of a stored agent backend at start; answers its URL.
    pub async fn reserve(
        &self,
        name: &str,
        stop: &tokio_util::sync::CancellationToken,
    ) -> std::io::Result<String> {
        let slot = self.slot(name, stop).await?;
        Ok(format!("http://127.0.0.1:{}", slot.port))
    }

    /// The slot of `name`, with its listener made on first use.
    async fn slot(
        &self,
        name: &str,
        stop: &tokio_util::sync::CancellationToken,
    ) -> std::io::Result<Arc<Slot>> {
        let mut slots = self.slots.lock().await;
        if let Some(s) = slots.get(name) {
            return Ok(s.clone());
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let slot = Arc::new(Slot {
            port: listener.local_addr()?.port(),
            link: Mutex::new(None),
        });
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
        slots.insert(name.to_owned(), slot.clone());
        Ok(slot)
    }
}

async fn serve_link(
    engine: Engine,
    name: String,
    tags: Vec<String>,
    url: String,
    slot: Arc<Slot>,
    socket: WebSocket,
) {
    let id = engine.agents().links.fetch_add(1, Ordering::Relaxed);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(256);
    let mux = Mux::new(out_tx);
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
                    url: format!("{AGENT_SCHEME}{name}"),
                    tags,
                    priority: 0,
                    added_at: crate::engine::now_ms(),
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
    tracing::info!(agent = %name, "agent connected");
    let (mut sink, mut stream) = socket.split();
    let writer = async {
        while let Some(f) = out_rx.recv().await {
            if sink.send(Message::Binary(f.into())).await.is_err() {
                return;
            }
        }
    };
    let reader = async {
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(b) => {
                    mux.dispatch(
                        &b,
                        None::<&fn() -> std::future::Ready<std::io::Result<tokio::net::TcpStream>>>,
                    )
                    .await
                }
                Message::Close(_) => return,
                _ => {}
            }
        }
    };
    let stop = engine.shutdown_token().clone();
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
        _ = stop.cancelled() => {}
    }
    {
        let mut link = slot.lock();
        if link.as_ref().is_some_and(|(i, _)| *i == id) {
            *link = None;
        }
    }
    mux.close_all();
    tracing::info!(agent = %name, "agent disconnected");
}
