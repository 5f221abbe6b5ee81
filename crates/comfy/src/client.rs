//! An async ComfyUI client: REST calls and one WebSocket session per connection.
//!
//! Each `Client::connect` opens a socket with a fresh clientId, because a reused clientId
//! can be silently deafened by the cleanup of an older socket (PROTOCOL.md pitfall 8).

use crate::rest::{
    DeleteRequest, Features, FileRef, History, HistoryEntry, InterruptRequest, ObjectInfo,
    PromptAccepted, PromptInfo, PromptRejected, PromptRequest, Queue, SystemStats,
};
use crate::ws::{feature_flags_request, BinaryMessage, ServerMessage};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use url::Url;

/// What can go wrong talking to a ComfyUI server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad server url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("{method} {path}: {source}")]
    Http {
        method: &'static str,
        path: String,
        source: reqwest::Error,
    },
    #[error("{method} {path}: status {status}: {body}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },
    #[error("{method} {path}: unexpected answer: {source}")]
    Decode {
        method: &'static str,
        path: String,
        source: serde_json::Error,
    },
    #[error("websocket {url}: {source}")]
    WebSocket {
        url: String,
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
}

impl Error {
    /// The connection failed (refused, reset, timed out, closed mid-answer) rather than
    /// the server answering something gantry cannot use: a sign of the server itself
    /// being down or restarting, whatever was asked of it.
    pub fn is_connection(&self) -> bool {
        match self {
            Error::Http { .. } | Error::WebSocket { .. } => true,
            Error::Url { .. } | Error::Status { .. } | Error::Decode { .. } => false,
        }
    }
}

/// The answer to `POST /prompt`: queued (perhaps partly, see `node_errors`) or rejected.
#[derive(Debug, Clone, PartialEq)]
pub enum Submitted {
    Accepted(PromptAccepted),
    Rejected(PromptRejected),
}

/// A handle on one ComfyUI server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
}

impl Client {
    /// A client for the server at `base` (`http://host:port`, optionally with a path prefix).
    pub fn new(base: &str) -> Result<Client, Error> {
        Self::with_http(base, reqwest::Client::new())
    }

    /// Like `new`, sharing a connection pool and its timeouts.
    pub fn with_http(base: &str, http: reqwest::Client) -> Result<Client, Error> {
        let mut url = Url::parse(base).map_err(|e| Error::Url {
            url: base.to_string(),
            reason: e.to_string(),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::Url {
                url: base.to_string(),
                reason: "scheme must be http or https".into(),
            });
        }
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        Ok(Client { http, base: url })
    }

    pub fn base_url(&self) -> &Url {
        &self.base
    }

    fn url(&self, path: &str) -> Result<Url, Error> {
        self.base.join(path).map_err(|e| Error::Url {
            url: format!("{}{}", self.base, path),
            reason: e.to_string(),
        })
    }

    async fn send(
        &self,
        method: &'static str,
        path: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Error> {
        req.send().await.map_err(|source| Error::Http {
            method,
            path: path.to_string(),
            source,
        })
    }

    async fn read_json<T: DeserializeOwned>(
        method: &'static str,
        path: &str,
        resp: reqwest::Response,
    ) -> Result<T, Error> {
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|source| Error::Http {
            method,
            path: path.to_string(),
            source,
        })?;
        if status != 200 {
            return Err(Error::Status {
                method,
                path: path.to_string(),
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        serde_json::from_slice(&body).map_err(|source| Error::Decode {
            method,
            path: path.to_string(),
            source,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let resp = self
            .send("GET", path, self.http.get(self.url(path)?))
            .await?;
        Self::read_json("GET", path, resp).await
    }

    async fn post_ack<B: Serialize>(&self, path: &str, body: &B) -> Result<(), Error> {
        let resp = self
            .send("POST", path, self.http.post(self.url(path)?).json(body))
            .await?;
        let status = resp.status().as_u16();
        if status != 200 {
            let body = resp.text().await.unwrap_or_default();
            return Err(Error::Status {
                method: "POST",
                path: path.to_string(),
                status,
                body,
            });
        }
        Ok(())
    }

    /// `POST /prompt`. A 400 with the validation shape is `Submitted::Rejected`, not an error.
    pub async fn submit(&self, req: &PromptRequest) -> Result<Submitted, Error> {
        let path = "prompt";
        let resp = self
            .send("POST", path, self.http.post(self.url(path)?).json(req))
            .await?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|source| Error::Http {
            method: "POST",
            path: path.into(),
            source,
        })?;
        let decode = |source| Error::Decode {
            method: "POST",
            path: path.into(),
            source,
        };
        match status {
            200 => Ok(Submitted::Accepted(
                serde_json::from_slice(&body).map_err(decode)?,
            )),
            400 => match serde_json::from_slice(&body) {
                Ok(rejected) => Ok(Submitted::Rejected(rejected)),
                Err(_) => Err(Error::Status {
                    method: "POST",
                    path: path.into(),
                    status,
                    body: String::from_utf8_lossy(&body).into_owned(),
                }),
            },
            _ => Err(Error::Status {
                method: "POST",
                path: path.into(),
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            }),
        }
    }

    /// `GET /prompt`.
    pub async fn prompt_info(&self) -> Result<PromptInfo, Error> {
        self.get("prompt").await
    }

    /// `GET /queue`.
    pub async fn queue(&self) -> Result<Queue, Error> {
        self.get("queue").await
    }

    /// `GET /object_info/{class}`: one class's spec (its model lists as they are now, so
    /// a file installed since `/object_info` was read shows); empty for an unknown class.
    pub async fn object_info_of(&self, class: &str) -> Result<ObjectInfo, Error> {
        let path = format!("object_info/{class}");
        let mut url = self.url("object_info")?;
        url.path_segments_mut()
            .map_err(|()| Error::Url {
                url: self.base.to_string(),
                reason: "cannot be a base".into(),
            })?
            .push(class);
        let resp = self.send("GET", &path, self.http.get(url)).await?;
        Self::read_json("GET", &path, resp).await
    }

    /// `GET /history/{id}`; `None` while queued or running, and once deleted or lost.
    pub async fn history_of(&self, prompt_id: &str) -> Result<Option<HistoryEntry>, Error> {
        let path = format!("history/{}", urlencode(prompt_id));
        let mut all: History = self.get(&path).await?;
        Ok(all.shift_remove(prompt_id))
    }

    /// `GET /history?max_items=N` (everything when `None`).
    pub async fn history(&self, max_items: Option<u32>) -> Result<History, Error> {
        match max_items {
            Some(n) => self.get(&format!("history?max_items={n}")).await,
            None => self.get("history").await,
        }
    }

    /// `POST /queue {"delete": ids}`: drops pending prompts silently; a running one stays.
    pub async fn delete_pending(&self, prompt_ids: &[String]) -> Result<(), Error> {
        let body = DeleteRequest {
            delete: Some(prompt_ids.to_vec()),
            clear: None,
        };
        self.post_ack("queue", &body).await
    }

    /// `POST /queue {"clear": true}`.
    pub async fn clear_queue(&self) -> Result<(), Error> {
        let body = DeleteRequest {
            delete: None,
            clear: Some(true),
        };
        self.post_ack("queue", &body).await
    }

    /// `POST /interrupt`, targeted when `prompt_id` is given (a no-op unless it runs).
    pub async fn interrupt(&self, prompt_id: Option<&str>) -> Result<(), Error> {
        let body = InterruptRequest {
            prompt_id: prompt_id.map(str::to_string),
        };
        self.post_ack("interrupt", &body).await
    }

    /// `POST /history {"delete": ids}`.
    pub async fn delete_history(&self, prompt_ids: &[String]) -> Result<(), Error> {
        let body = DeleteRequest {
            delete: Some(prompt_ids.to_vec()),
            clear: None,
        };
        self.post_ack("history", &body).await
    }

    /// `GET /object_info`.
    pub async fn object_info(&self) -> Result<ObjectInfo, Error> {
        self.get("object_info").await
    }

    /// `GET /system_stats`.
    pub async fn system_stats(&self) -> Result<SystemStats, Error> {
        self.get("system_stats").await
    }

    /// `GET /features`.
    pub async fn features(&self) -> Result<Features, Error> {
        self.get("features").await
    }

    /// `POST /upload/image` into the input folder's `subfolder`, as the ComfyUI front end
    /// uploads images, masks' sources and audio alike. With `overwrite` a file of the
    /// same name is replaced; without it the server may answer another name (`x (1).png`).
    /// The answer is where the file is: a workflow names it `subfolder/name`.
    pub async fn upload(
        &self,
        filename: &str,
        bytes: Bytes,
        subfolder: &str,
        overwrite: bool,
    ) -> Result<FileRef, Error> {
        let path = "upload/image";
        let part = reqwest::multipart::Part::stream(bytes).file_name(filename.to_owned());
        let mut form = reqwest::multipart::Form::new()
            .part("image", part)
            .text("type", "input")
            .text("subfolder", subfolder.to_owned());
        if overwrite {
            form = form.text("overwrite", "true");
        }
        let resp = self
            .send(
                "POST",
                path,
                self.http.post(self.url(path)?).multipart(form),
            )
            .await?;
        #[derive(serde::Deserialize)]
        struct Uploaded {
            name: String,
            #[serde(default)]
            subfolder: String,
            #[serde(rename = "type")]
            kind: String,
        }
        let up: Uploaded = Self::read_json("POST", path, resp).await?;
        Ok(FileRef {
            filename: up.name,
            subfolder: up.subfolder,
            kind: up.kind,
        })
    }

    /// `GET /view` for a file an output node wrote.
    pub async fn view(&self, file: &FileRef) -> Result<Bytes, Error> {
        let path = format!(
            "view?filename={}&subfolder={}&type={}",
            urlencode(&file.filename),
            urlencode(&file.subfolder),
            urlencode(&file.kind)
        );
        let resp = self
            .send("GET", &path, self.http.get(self.url(&path)?))
            .await?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|source| Error::Http {
            method: "GET",
            path: path.clone(),
            source,
        })?;
        if status != 200 {
            return Err(Error::Status {
                method: "GET",
                path,
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        Ok(body)
    }

    /// Opens a WebSocket with a fresh clientId. With `preview_metadata`, asks for type-4
    /// previews (which name their prompt) through the feature_flags handshake.
    pub async fn connect(&self, preview_metadata: bool) -> Result<Session, Error> {
        let client_id = uuid::Uuid::new_v4().to_string();
        self.connect_as(&client_id, preview_metadata).await
    }

    /// Opens a WebSocket with a given clientId. Prefer `connect`.
    pub async fn connect_as(
        &self,
        client_id: &str,
        preview_metadata: bool,
    ) -> Result<Session, Error> {
        let mut url = self.url("ws")?;
        let scheme = if self.base.scheme() == "https" {
            "wss"
        } else {
            "ws"
        };
        url.set_scheme(scheme).map_err(|()| Error::Url {
            url: url.to_string(),
            reason: "cannot use a websocket scheme".into(),
        })?;
        url.query_pairs_mut().append_pair("clientId", client_id);
        let ws_err = |source| Error::WebSocket {
            url: url.to_string(),
            source: Box::new(source),
        };
        // A coordinator holds one socket per backend, mostly idle: a small read buffer
        // (tungstenite's default is 128 KiB, kept resident per socket) and no Nagle delay
        // on the few frames it sends.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(8 * 1024);
        let (mut stream, _) =
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true)
                .await
                .map_err(ws_err)?;
        if preview_metadata {
            stream
                .send(Message::text(feature_flags_request()))
                .await
                .map_err(ws_err)?;
        }
        let (events_tx, events) = mpsc::unbounded_channel();
        let (close_tx, mut close_rx) = mpsc::unbounded_channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    frame = stream.next() => {
                        let event = match frame {
                            Some(Ok(Message::Text(text))) => match ServerMessage::parse(&text) {
                                Ok(m) => SessionEvent::Message(m),
                                Err(error) => SessionEvent::Malformed { frame: text.to_string(), error: error.to_string() },
                            },
                            Some(Ok(Message::Binary(b))) => match BinaryMessage::parse(&b) {
                                Ok(m) => SessionEvent::Binary(m),
                                Err(error) => SessionEvent::Malformed { frame: format!("{} binary bytes", b.len()), error: error.to_string() },
                            },
                            Some(Ok(Message::Close(frame))) => SessionEvent::Closed { code: frame.map(|f| u16::from(f.code)), error: None },
                            Some(Ok(_)) => continue,
                            // A connection dropped without a close frame is what RFC 6455 calls 1006.
                            Some(Err(e)) => SessionEvent::Closed { code: Some(1006), error: Some(e.to_string()) },
                            None => SessionEvent::Closed { code: Some(1006), error: None },
                        };
                        let closed = matches!(event, SessionEvent::Closed { .. });
                        if events_tx.send(event).is_err() || closed {
                            return;
                        }
                    }
                    Some(()) = close_rx.recv() => {
                        let _ = stream.close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() })).await;
                        // Drain until the server's close answer so the server sees a clean close.
                        while let Some(Ok(frame)) = stream.next().await {
                            if matches!(frame, Message::Close(_)) { break; }
                        }
                        let _ = events_tx.send(SessionEvent::Closed { code: Some(1000), error: None });
                        return;
                    }
                }
            }
        });
        Ok(Session {
            client_id: client_id.to_string(),
            events,
            close_tx,
            task,
        })
    }
}

/// What a session's socket delivers, in arrival order.
// Nearly every event is a `Message`; boxing it would allocate for the common case only
// to shrink the rare ones.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    Message(ServerMessage),
    Binary(BinaryMessage),
    /// A frame that could not be read; kept so nothing is silently dropped.
    Malformed {
        frame: String,
        error: String,
    },
    /// The socket ended. `code` 1006 means it dropped without a close frame.
    Closed {
        code: Option<u16>,
        error: Option<String>,
    },
}

/// One WebSocket connection with its own clientId.
pub struct Session {
    client_id: String,
    events: mpsc::UnboundedReceiver<SessionEvent>,
    /// Asks the reader task to send a close frame and finish.
    close_tx: mpsc::UnboundedSender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Session {
    /// The clientId to send as `client_id` in `POST /prompt`.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The next event; `None` after `Closed` was delivered.
    pub async fn next(&mut self) -> Option<SessionEvent> {
        self.events.recv().await
    }

    /// The next event if one has already arrived, without waiting.
    pub fn try_next(&mut self) -> Option<SessionEvent> {
        self.events.try_recv().ok()
    }

    /// Sends a close frame and waits for the socket to end.
    pub async fn close(mut self) {
        let _ = self.close_tx.send(());
        while let Some(ev) = self.events.recv().await {
            if matches!(ev, SessionEvent::Closed { .. }) {
                break;
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
