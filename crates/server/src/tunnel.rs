//! The agent link: TCP connections multiplexed over one WebSocket that the agent opens
//! from the GPU machine (nothing listens there, so NAT is no obstacle). On the
//! coordinator each agent gets a loopback listener; every connection made to it (the
//! driver's HTTP requests and its ComfyUI WebSocket) becomes a stream the agent pipes to
//! its local ComfyUI. The driver, the watchdog and reconcile are the very code used for
//! URL backends: an agent backend is a URL backend whose URL is that listener.
//!
//! Frames are binary WebSocket messages: a 4-byte stream id (big endian), a 1-byte op,
//! the payload. Streams are opened by the coordinator only. Stream 0 is the control
//! channel: DATA frames of JSON messages (the agent's child state, log lines, restarts;
//! the coordinator's restart requests). Flow control is the link's
//! own: a stream whose reader lags holds the link (fine for ComfyUI's traffic).

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const OPEN: u8 = 1;
const DATA: u8 = 2;
const FIN: u8 = 3;
const RESET: u8 = 4;

/// Largest payload of one DATA frame.
const CHUNK: usize = 32 * 1024;

/// Frames a stream has not consumed yet, before the link waits for it.
const STREAM_BUFFER: usize = 64;

/// What one stream receives from the link.
enum Inbound {
    Data(Bytes),
    Fin,
}

/// One end of a link: the streams it carries and the way out.
#[derive(Clone)]
pub struct Mux {
    out: mpsc::Sender<Vec<u8>>,
    streams: Arc<Mutex<HashMap<u32, mpsc::Sender<Inbound>>>>,
    next: Arc<AtomicU32>,
    control: Option<mpsc::UnboundedSender<serde_json::Value>>,
}

fn frame(id: u32, op: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + payload.len());
    f.extend_from_slice(&id.to_be_bytes());
    f.push(op);
    f.extend_from_slice(payload);
    f
}

impl Mux {
    /// A mux writing its frames to `out`; feed it what arrives with `dispatch`.
    pub fn new(out: mpsc::Sender<Vec<u8>>) -> Mux {
        Mux {
            out,
            streams: Arc::default(),
            next: Arc::new(AtomicU32::new(1)),
            control: None,
        }
    }

    /// Control messages from the other end go to `control`.
    pub fn with_control(mut self, control: mpsc::UnboundedSender<serde_json::Value>) -> Mux {
        self.control = Some(control);
        self
    }

    /// Sends a control message; false when the link is gone.
    pub async fn send_control(&self, message: &serde_json::Value) -> bool {
        let bytes = serde_json::to_vec(message).unwrap_or_default();
        self.out.send(frame(0, DATA, &bytes)).await.is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, mpsc::Sender<Inbound>>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Carries `tcp` over a new stream (the coordinator's end).
    pub async fn open(&self, tcp: TcpStream) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let rx = self.register(id);
        if self.out.send(frame(id, OPEN, &[])).await.is_err() {
            return;
        }
        tokio::spawn(pipe(self.clone(), id, tcp, rx));
    }

    fn register(&self, id: u32) -> mpsc::Receiver<Inbound> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        self.lock().insert(id, tx);
        rx
    }

    /// Handles one frame from the other end. `connect` makes the local connection for a
    /// stream the other end opened (the agent's end); `None` refuses opens.
    pub async fn dispatch<F, Fut>(&self, f: &[u8], connect: Option<&F>)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = std::io::Result<TcpStream>>,
    {
        if f.len() < 5 {
            return;
        }
        let id = u32::from_be_bytes([f[0], f[1], f[2], f[3]]);
        let payload = &f[5..];
        if id == 0 {
            if let (Some(control), DATA) = (&self.control, f[4]) {
                match serde_json::from_slice(payload) {
                    Ok(message) => {
                        let _ = control.send(message);
                    }
                    Err(e) => tracing::warn!(error = %e, "link: a control message is not JSON"),
                }
            }
            return;
        }
        match f[4] {
            OPEN => {
                let Some(connect) = connect else {
                    let _ = self.out.send(frame(id, RESET, &[])).await;
                    return;
                };
                let rx = self.register(id);
                match connect().await {
                    Ok(tcp) => {
                        tokio::spawn(pipe(self.clone(), id, tcp, rx));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "agent: cannot reach the local ComfyUI");
                        self.lock().remove(&id);
                        let _ = self.out.send(frame(id, RESET, &[])).await;
                    }
                }
            }
            DATA => {
                let tx = self.lock().get(&id).cloned();
                if let Some(tx) = tx {
                    if tx
                        .send(Inbound::Data(Bytes::copy_from_slice(payload)))
                        .await
                        .is_err()
                    {
                        self.lock().remove(&id);
                    }
                }
            }
            FIN => {
                let tx = self.lock().get(&id).cloned();
                if let Some(tx) = tx {
                    let _ = tx.send(Inbound::Fin).await;
                }
            }
            RESET => {
                // Dropping the sender ends the stream's writer; its reader notices the
                // closed socket.
                self.lock().remove(&id);
            }
            _ => {}
        }
    }

    /// The link is gone: every stream it carried ends.
    pub fn close_all(&self) {
        self.lock().clear();
    }
}

/// Copies between a local TCP connection and stream `id` until both directions end.
async fn pipe(mux: Mux, id: u32, tcp: TcpStream, mut rx: mpsc::Receiver<Inbound>) {
    let (mut read, mut write) = tcp.into_split();
    let out = mux.out.clone();
    let upstream = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match read.read(&mut buf).await {
                Ok(0) => {
                    let _ = out.send(frame(id, FIN, &[])).await;
                    return;
                }
                Ok(n) => {
                    if out.send(frame(id, DATA, &buf[..n])).await.is_err() {
                        return;
                    }
                }
                Err(_) => {
                    let _ = out.send(frame(id, RESET, &[])).await;
                    return;
                }
            }
        }
    };
    let downstream = async move {
        while let Some(msg) = rx.recv().await {
            match msg {
                Inbound::Data(b) => {
                    if write.write_all(&b).await.is_err() {
                        return;
                    }
                }
                Inbound::Fin => {
                    let _ = write.shutdown().await;
                    return;
                }
            }
        }
        // Reset or link gone: close our side now.
        let _ = write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
    mux.lock().remove(&id);
}

/// When the link last heard from its peer (set by its reader).
pub struct Heard {
    epoch: tokio::time::Instant,
    ms: std::sync::atomic::AtomicU64,
}

impl Default for Heard {
    fn default() -> Heard {
        Heard {
            epoch: tokio::time::Instant::now(),
            ms: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Heard {
    pub fn now(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.ms.store(ms, Ordering::Relaxed);
    }

    fn at(&self) -> tokio::time::Instant {
        self.epoch + std::time::Duration::from_millis(self.ms.load(Ordering::Relaxed))
    }
}

/// Ends once nothing has been heard for three `heartbeat`s. Both ends ping every
/// `heartbeat`, so a live peer is always heard; this is how a connection that a NAT or
/// a dead machine dropped without a word is found, rather than after TCP's hours.
pub async fn silence(heard: &Heard, heartbeat: std::time::Duration) {
    loop {
        let until = heard.at() + heartbeat * 3;
        if tokio::time::Instant::now() >= until {
            return;
        }
        tokio::time::sleep_until(until).await;
    }
}

/// A link's WebSocket message, as `carry` sees it: both ends' libraries (axum on the
/// coordinator, tungstenite on the agent) have their own type.
pub trait LinkMessage: Sized {
    fn binary(frame: Vec<u8>) -> Self;
    fn ping() -> Self;
    fn into_incoming(self) -> Incoming;
}

/// What a message from the peer is to the link.
pub enum Incoming {
    Frame(Bytes),
    Close,
    /// A ping, a pong, text: only a sign of life.
    Other,
}

/// The two libraries' message types have the same variants.
macro_rules! link_message {
    ($($t:ty),*) => {$(
        impl LinkMessage for $t {
            fn binary(frame: Vec<u8>) -> Self {
                Self::Binary(frame.into())
            }
            fn ping() -> Self {
                Self::Ping(Bytes::new())
            }
            fn into_incoming(self) -> Incoming {
                match self {
                    Self::Binary(b) => Incoming::Frame(b),
                    Self::Close(_) => Incoming::Close,
                    _ => Incoming::Other,
                }
            }
        }
    )*};
}

link_message!(
    axum::extract::ws::Message,
    tokio_tungstenite::tungstenite::Message
);

/// How a link ended.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkEnd {
    /// Closed, or a read or write failed.
    Closed,
    /// Nothing from the peer for three heartbeats.
    Silent,
}

/// Carries one link until it ends: what `out` holds goes to the peer, with a ping every
/// `heartbeat`; each binary frame from the peer goes to `mux` (`connect` opens the local
/// end of a stream the peer opens; `None` refuses them).
pub async fn carry<M, Si, St, E, F, Fut>(
    mut sink: Si,
    mut stream: St,
    out: &mut mpsc::Receiver<Vec<u8>>,
    heartbeat: std::time::Duration,
    mux: &Mux,
    connect: Option<&F>,
) -> LinkEnd
where
    M: LinkMessage,
    Si: futures_util::Sink<M> + Unpin,
    St: futures_util::Stream<Item = Result<M, E>> + Unpin,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<TcpStream>>,
{
    use futures_util::{SinkExt, StreamExt};
    let heard = Heard::default();
    let writer = async {
        let mut ping = tokio::time::interval(heartbeat);
        loop {
            let sent = tokio::select! {
                f = out.recv() => match f {
                    Some(f) => sink.send(M::binary(f)).await,
                    None => return,
                },
                _ = ping.tick() => sink.send(M::ping()).await,
            };
            if sent.is_err() {
                return;
            }
        }
    };
    let reader = async {
        while let Some(Ok(msg)) = stream.next().await {
            heard.now();
            match msg.into_incoming() {
                Incoming::Frame(f) => mux.dispatch(&f, connect).await,
                Incoming::Other => {}
                Incoming::Close => return,
            }
        }
    };
    tokio::select! {
        _ = writer => LinkEnd::Closed,
        _ = reader => LinkEnd::Closed,
        _ = silence(&heard, heartbeat) => LinkEnd::Silent,
    }
}
