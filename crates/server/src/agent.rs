//! `gantry agent`: runs on a GPU machine, connects out to the coordinator (one
//! WebSocket; nothing listens here) and carries the coordinator's connections to the
//! local ComfyUI (`tunnel`). Reconnects with backoff whenever the link drops; a prompt
//! running meanwhile keeps running in ComfyUI, and the coordinator's driver finds it
//! (queue, then history, then the output files) once the link is back.

use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
use tokio_util::sync::CancellationToken;

use crate::tunnel::Mux;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The coordinator, `http(s)://host:port`.
    pub server: String,
    pub token: Option<String>,
    pub name: String,
    pub tags: Vec<String>,
    /// The local ComfyUI, `http://host:port`.
    pub comfyui: String,
    /// The longest wait between two connection attempts.
    pub max_backoff: Duration,
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
    url.query_pairs_mut()
        .clear()
        .append_pair("name", &c.name)
        .append_pair("tags", &c.tags.join(","));
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

/// Runs until `stop`; answers an error only for a configuration that can never work.
pub async fn run(config: AgentConfig, stop: CancellationToken) -> Result<(), String> {
    let url = link_url(&config)?;
    let local = comfyui_addr(&config)?;
    let mut backoff = Duration::from_millis(100);
    loop {
        let linked = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            linked = link(&config, &url, &local, &stop) => linked,
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
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(config.max_backoff);
    }
}

/// One life of the link: connect, then carry streams until it closes.
async fn link(
    config: &AgentConfig,
    url: &url::Url,
    local: &str,
    stop: &CancellationToken,
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
    let (mut sink, mut stream) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(256);
    let mux = Mux::new(out_tx);
    let writer = async {
        while let Some(f) = out_rx.recv().await {
            if sink.send(Message::Binary(f.into())).await.is_err() {
                return;
            }
        }
    };
    let connect = || TcpStream::connect(local.to_owned());
    let reader = async {
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(b) => mux.dispatch(&b, Some(&connect)).await,
                Message::Close(_) => return,
                _ => {}
            }
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
        _ = stop.cancelled() => {}
    }
    mux.close_all();
    Ok(())
}
