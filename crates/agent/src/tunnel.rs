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

/// A frame from the peer, as read.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A control message (stream 0, DATA): JSON, checked by the reader.
    Control(&'a [u8]),
    Open(u32),
    Data(u32, &'a [u8]),
    Fin(u32),
    Reset(u32),
}

/// Why a frame from the peer is dropped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a link frame of {0} bytes is shorter than its 5-byte header")]
    Short(usize),
    #[error("stream {id}: no op {op} (OPEN 1, DATA 2, FIN 3, RESET 4)")]
    UnknownOp { id: u32, op: u8 },
    #[error("stream 0 carries control messages (DATA) only, not op {0}")]
    ControlOp(u8),
}

impl<'a> Frame<'a> {
    /// Reads a frame; a payload on OPEN, FIN or RESET means nothing and is ignored.
    pub fn parse(f: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        let (Some(head), Some(payload)) = (f.get(..4), f.get(5..)) else {
            return Err(FrameError::Short(f.len()));
        };
        let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        match (id, f[4]) {
            (0, DATA) => Ok(Frame::Control(payload)),
            (0, op) => Err(FrameError::ControlOp(op)),
            (id, OPEN) => Ok(Frame::Open(id)),
            (id, DATA) => Ok(Frame::Data(id, payload)),
            (id, FIN) => Ok(Frame::Fin(id)),
            (id, RESET) => Ok(Frame::Reset(id)),
            (id, op) => Err(FrameError::UnknownOp { id, op }),
        }
    }

    /// The frame's bytes on the link.
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            Frame::Control(payload) => frame(0, DATA, payload),
            Frame::Open(id) => frame(id, OPEN, &[]),
            Frame::Data(id, payload) => frame(id, DATA, payload),
            Frame::Fin(id) => frame(id, FIN, &[]),
            Frame::Reset(id) => frame(id, RESET, &[]),
        }
    }
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
        // A `Value` always serialises (its map keys are strings).
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
        let read = match Frame::parse(f) {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, "link: a frame is malformed; dropped");
                return;
            }
        };
        match read {
            Frame::Control(payload) => {
                let Some(control) = &self.control else { return };
                match serde_json::from_slice(payload) {
                    Ok(message) => {
                        let _ = control.send(message);
                    }
                    Err(e) => tracing::warn!(error = %e, "link: a control message is not JSON"),
                }
            }
            Frame::Open(id) => {
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
            Frame::Data(id, payload) => {
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
            Frame::Fin(id) => {
                let tx = self.lock().get(&id).cloned();
                if let Some(tx) = tx {
                    let _ = tx.send(Inbound::Fin).await;
                }
            }
            Frame::Reset(id) => {
                // Dropping the sender ends the stream's writer; its reader notices the
                // closed socket.
                self.lock().remove(&id);
            }
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

/// tungstenite's message, the agent's end (the coordinator wraps axum's the same way).
impl LinkMessage for tokio_tungstenite::tungstenite::Message {
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
            Self::Text(_) | Self::Ping(_) | Self::Pong(_) | Self::Frame(_) => Incoming::Other,
        }
    }
}

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

/// Property tests of the link's frames: whatever bytes the peer sends, a frame is read
/// whole (and encodes back to the same bytes) or dropped with a reason; never a panic.
/// `PROPTEST_CASES` asks for more cases.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases,
            rng_seed: proptest::test_runner::RngSeed::Fixed(24),
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(config(1024))]

        #[test]
        fn any_bytes_are_a_frame_or_a_reason(bytes in prop::collection::vec(any::<u8>(), 0..24)) {
            match Frame::parse(&bytes) {
                // What the frame means encodes to its bytes, less an ignored payload.
                Ok(frame) => {
                    let encoded = frame.encode();
                    prop_assert_eq!(&bytes[..encoded.len()], &encoded[..]);
                    prop_assert_eq!(Frame::parse(&encoded), Ok(frame));
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }

        #[test]
        fn frames_of_every_op_read_back(
            id in prop_oneof![Just(0u32), Just(1u32), any::<u32>()],
            op in 0u8..7,
            payload in prop::collection::vec(any::<u8>(), 0..8),
        ) {
            let bytes = frame(id, op, &payload);
            match Frame::parse(&bytes) {
                Ok(f) => prop_assert!(matches!(f, Frame::Control(_) | Frame::Data(..)) == (op == DATA)),
                Err(FrameError::Short(_)) => prop_assert!(false, "a whole header was short"),
                Err(_) => prop_assert!(id == 0 || !(OPEN..=RESET).contains(&op)),
            }
        }
    }

    #[test]
    fn malformed_frames_say_why() {
        let check = |bytes: &[u8], expect: &str| {
            assert_eq!(
                Frame::parse(bytes).map(|_| ()).unwrap_err().to_string(),
                expect
            );
        };
        check(
            &[0, 0, 1],
            "a link frame of 3 bytes is shorter than its 5-byte header",
        );
        check(
            &[0, 0, 0, 7, 9],
            "stream 7: no op 9 (OPEN 1, DATA 2, FIN 3, RESET 4)",
        );
        check(
            &[0, 0, 0, 0, OPEN],
            "stream 0 carries control messages (DATA) only, not op 1",
        );
        assert_eq!(Frame::parse(&[0, 0, 0, 2, FIN, 1]), Ok(Frame::Fin(2)));
        assert_eq!(Frame::parse(&[0, 0, 0, 0, DATA]), Ok(Frame::Control(&[])));
    }
}
