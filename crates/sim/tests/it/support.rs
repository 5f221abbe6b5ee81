//! Plumbing for tests that talk to a simulator the way a real client does: the capture
//! files, a WebSocket that records every frame it receives (with its receive time) in a
//! background task, one-shot HTTP exchanges, and polling with a deadline.

use futures_util::stream::SplitSink;
use futures_util::{Future, SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// `fixtures/comfyui/captures`, at the root of the repository.
pub fn captures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/comfyui/captures")
}

/// Names (without `.json`) of every capture file; panics when the folder is missing, so a
/// broken checkout fails loudly instead of testing nothing.
pub fn capture_names() -> Vec<String> {
    let dir = captures_dir();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "the captures folder {} must exist (it holds the recorded ComfyUI sessions): {e}",
            dir.display()
        )
    });
    let mut names: Vec<String> = entries
        .map(|entry| entry.expect("readable captures folder").file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".json") && !name.starts_with('_'))
        .map(|name| name.trim_end_matches(".json").to_string())
        .collect();
    names.sort();
    names
}

/// One recorded scenario (format described at the top of PROTOCOL.md).
#[derive(Debug, Clone, Deserialize)]
pub struct Capture {
    pub scenario: String,
    /// The captured server's base URL, e.g. `http://127.0.0.1:8188`.
    pub server: String,
    pub events: Vec<Event>,
    /// Everything else in the file: notes, client ids, ids of earlier scenarios...
    #[serde(flatten)]
    pub meta: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub t_ms: f64,
    /// `out` (client to server), `in` (server to client) or `local` (a note).
    pub direction: String,
    pub kind: String,
    #[serde(default)]
    pub ws: Option<String>,
    #[serde(default)]
    pub body: Value,
}

impl Event {
    pub fn is(&self, direction: &str, kind: &str) -> bool {
        self.direction == direction && self.kind == kind
    }
    /// A WebSocket frame the client received.
    pub fn is_received_frame(&self) -> bool {
        self.direction == "in" && (self.kind == "ws_text" || self.kind == "ws_binary")
    }
}

/// Reads `captures/<name>.json`; panics with the path when it is missing or malformed.
pub fn load_capture(name: &str) -> Capture {
    let path = captures_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "capture {} must exist (is fixtures/comfyui/captures present?): {e}",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not a capture: {e}", path.display()))
}

/// A frame as the socket received it.
#[derive(Debug, Clone)]
pub struct Frame {
    pub at: Instant,
    pub body: FrameBody,
}

#[derive(Debug, Clone)]
pub enum FrameBody {
    Text(Value),
    /// A text frame that is not JSON (never sent by ComfyUI).
    BadText(String),
    Binary(Vec<u8>),
}

/// How a socket's connection ended.
#[derive(Debug, Clone, PartialEq)]
pub enum SocketEnd {
    /// The server sent a close frame (its answer to ours, normally) with this code.
    CloseFrame(Option<u16>),
    /// The connection dropped without a close frame: what clients report as 1006.
    Abnormal(String),
}

/// Everything a socket has received so far.
#[derive(Debug, Clone, Default)]
pub struct SocketLog {
    pub frames: Vec<Frame>,
    pub end: Option<SocketEnd>,
}

/// A client WebSocket whose receiving half runs in its own task, so frames are recorded the
/// moment they arrive, whatever the test is doing.
pub struct Socket {
    sink: SplitSink<WsStream, Message>,
    log: watch::Receiver<SocketLog>,
}

impl Socket {
    pub async fn connect(url: &str) -> Result<Socket, String> {
        let (stream, _response) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| format!("connect {url}: {e}"))?;
        let (sink, mut stream) = stream.split();
        let (tx, log) = watch::channel(SocketLog::default());
        tokio::spawn(async move {
            let end = loop {
                let body = match stream.next().await {
                    Some(Ok(Message::Text(text))) => match serde_json::from_str(text.as_str()) {
                        Ok(v) => FrameBody::Text(v),
                        Err(_) => FrameBody::BadText(text.to_string()),
                    },
                    Some(Ok(Message::Binary(bytes))) => FrameBody::Binary(bytes.to_vec()),
                    Some(Ok(Message::Close(frame))) => {
                        break SocketEnd::CloseFrame(frame.map(|f| u16::from(f.code)))
                    }
                    Some(Ok(_)) => continue, // ping, pong
                    Some(Err(e)) => break SocketEnd::Abnormal(e.to_string()),
                    None => break SocketEnd::Abnormal("stream ended without a close frame".into()),
                };
                let frame = Frame {
                    at: Instant::now(),
                    body,
                };
                tx.send_modify(|log| log.frames.push(frame));
            };
            tx.send_modify(|log| log.end = Some(end));
        });
        Ok(Socket { sink, log })
    }

    pub async fn send_text(&mut self, text: String) -> Result<(), String> {
        self.sink
            .send(Message::Text(text.into()))
            .await
            .map_err(|e| e.to_string())
    }

    /// Sends a close frame; the server's answer shows up as the log's `end`.
    pub async fn send_close(&mut self, code: u16) -> Result<(), String> {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        self.sink
            .send(Message::Close(Some(frame)))
            .await
            .map_err(|e| e.to_string())
    }

    /// A copy of what was received so far.
    pub fn snapshot(&self) -> SocketLog {
        self.log.borrow().clone()
    }

    pub fn frame_count(&self) -> usize {
        self.log.borrow().frames.len()
    }

    pub fn has_ended(&self) -> bool {
        self.log.borrow().end.is_some()
    }

    /// Waits until `done` holds for the log, or the deadline passes; true if it holds.
    /// Wakes on every received frame, so nothing is slept away.
    pub async fn wait_until(&self, deadline: Duration, done: impl Fn(&SocketLog) -> bool) -> bool {
        let mut rx = self.log.clone();
        let waited = tokio::time::timeout(deadline, rx.wait_for(|log| done(log)))
            .await
            .map(|held| held.is_ok());
        match waited {
            Ok(true) => true,
            // The reader task is gone: nothing more will arrive, judge the final log.
            Ok(false) => done(&rx.borrow()),
            Err(_elapsed) => false,
        }
    }
}

/// What one HTTP request got.
#[derive(Debug)]
pub struct HttpOutcome {
    pub result: Result<HttpReply, HttpFailure>,
}

#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

#[derive(Debug)]
pub enum HttpFailure {
    /// Nothing listens: what a client sees while the server is down.
    Connect(String),
    Other(String),
}

impl std::fmt::Display for HttpFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpFailure::Connect(e) => write!(f, "cannot connect: {e}"),
            HttpFailure::Other(e) => write!(f, "{e}"),
        }
    }
}

/// A client that never reuses connections: a pooled connection to a simulator that has
/// since crashed would turn "connection refused" into some other error.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

pub async fn send(request: reqwest::RequestBuilder) -> HttpOutcome {
    let result = match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            match response.bytes().await {
                Ok(body) => Ok(HttpReply {
                    status,
                    headers,
                    body: body.to_vec(),
                }),
                Err(e) => Err(HttpFailure::Other(format!("reading the body: {e}"))),
            }
        }
        Err(e) if e.is_connect() => Err(HttpFailure::Connect(e.to_string())),
        Err(e) => Err(HttpFailure::Other(e.to_string())),
    };
    HttpOutcome { result }
}

/// Calls `probe` every `every` until it returns Some, or the deadline passes.
pub async fn poll<T, F, Fut>(deadline: Duration, every: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let give_up = Instant::now() + deadline;
    loop {
        if let Some(found) = probe().await {
            return Some(found);
        }
        if Instant::now() >= give_up {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// GET `path` on `base` and parse JSON; None on any failure (for polling).
pub async fn get_json(http: &reqwest::Client, base: &str, path: &str) -> Option<Value> {
    let reply = send(http.get(format!("{base}{path}"))).await.result.ok()?;
    (reply.status == 200).then(|| reply.json()).flatten()
}

/// Polls until the prompt has a history entry and the queue is empty (the entry is
/// written just before the prompt's last frames, so both are needed for "settled").
pub async fn wait_settled(
    http: &reqwest::Client,
    base: &str,
    prompt_id: &str,
    deadline: Duration,
) -> Option<Value> {
    poll(deadline, Duration::from_millis(10), || async {
        let history = get_json(http, base, &format!("/history/{prompt_id}")).await?;
        let entry = history.get(prompt_id)?.clone();
        let queue = get_json(http, base, "/prompt").await?;
        (queue["exec_info"]["queue_remaining"] == 0).then_some(entry)
    })
    .await
}
