//! The event bus: persisted state changes (with their sequence numbers) and ephemeral
//! progress, fanned out to every SSE stream. Persisted events are the truth and can be
//! re-read from the store by a subscriber that fell behind; progress may be dropped.

use gantry_core::health::HealthEvent;
use gantry_core::{JobId, Millis};
use gantry_store::Event;
use serde::Serialize;
use std::sync::Arc;
use tokio::sync::broadcast;

#[derive(Clone, Debug)]
pub enum BusEvent {
    Persisted(Arc<Published>),
    Live(Arc<Published<LiveEvent>>),
    /// A change in a backend's health (blocks, circuit, stuck), for the global stream.
    Backend(Arc<BackendEvent>),
    /// A backend as it is now, whenever what a monitor shows of it changed
    /// (`monitor::backend_feed`); the whole row, so a client never needs the previous.
    BackendState(Arc<Published<gantry_api::Backend>>),
}

/// A committed event as it goes out: its wire form is made once, by the first stream
/// that sends it, and shared by all the others (200 subscribers, one serialisation).
#[derive(Debug)]
pub struct Published<T = Event> {
    pub event: T,
    wire: std::sync::OnceLock<String>,
    frame: std::sync::OnceLock<bytes::Bytes>,
}

impl<T> Published<T> {
    pub fn new(event: T) -> Published<T> {
        Published {
            event,
            wire: std::sync::OnceLock::new(),
            frame: std::sync::OnceLock::new(),
        }
    }

    /// The event's JSON as streams send it, made by `make` the first time.
    pub fn wire(&self, make: impl FnOnce(&T) -> String) -> &str {
        self.wire.get_or_init(|| make(&self.event))
    }

    /// The event's whole SSE frame, made by `make` the first time: every stream of the
    /// farm sends the same bytes (a reference count, not a copy).
    pub fn frame(&self, make: impl FnOnce(&T) -> bytes::Bytes) -> bytes::Bytes {
        self.frame.get_or_init(|| make(&self.event)).clone()
    }
}

impl<T> std::ops::Deref for Published<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.event
    }
}

impl BusEvent {
    pub fn persisted(event: Event) -> BusEvent {
        BusEvent::Persisted(Arc::new(Published::new(event)))
    }

    /// The job it is about, if any.
    pub fn job_id(&self) -> Option<&JobId> {
        match self {
            BusEvent::Persisted(e) => Some(&e.job_id),
            BusEvent::Live(e) => Some(&e.job_id),
            BusEvent::Backend(_) | BusEvent::BackendState(_) => None,
        }
    }
}

/// A backend health change; not persisted yet (the global event stream of the monitor
/// will carry it with a sequence number).
#[derive(Clone, Debug, Serialize)]
pub struct BackendEvent {
    pub backend: String,
    pub at: Millis,
    #[serde(flatten)]
    pub kind: HealthEvent,
}

/// Something seen on a backend while an attempt runs; not persisted.
#[derive(Clone, Debug, Serialize)]
pub struct LiveEvent {
    pub job_id: JobId,
    pub attempt: u32,
    pub backend: String,
    #[serde(flatten)]
    pub kind: LiveKind,
}

/// The kinds of live event, as the wire has them.
pub use gantry_api::LiveKind;

#[derive(Clone)]
pub struct Bus {
    tx: broadcast::Sender<BusEvent>,
}

impl Bus {
    pub fn new(capacity: usize) -> Bus {
        let (tx, _) = broadcast::channel(capacity);
        Bus { tx }
    }

    pub fn publish(&self, event: BusEvent) {
        // No subscriber is fine: nobody is watching.
        // Refused only when no one subscribes: nothing is waiting for it then.
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<BusEvent> {
        self.tx.subscribe()
    }
}
