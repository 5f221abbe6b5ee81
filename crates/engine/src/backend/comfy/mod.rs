//! One driver per backend: a task that keeps one WebSocket open (a fresh clientId per
//! connection, PROTOCOL.md pitfall 8), runs at most one attempt at a time on it, follows
//! that attempt by its prompt id, and reconciles with `/queue` and `/history` after the
//! submit, after every reconnect and whenever the backend has been quiet too long, so a
//! completion is never missed (DESIGN.md invariant 5). Its watchdog times every phase;
//! an attempt gantry gave up on is drained (interrupted or dequeued, then watched until
//! `/queue` shows it gone) before the backend takes anything new.

use gantry_comfy::client::{Client, Session, SessionEvent};
use gantry_comfy::rest::FileRef;
use gantry_core::watchdog::Watch;
use gantry_core::{Input, JobId, Millis};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

pub mod classify;
mod commands;
mod connection;
mod ending;
mod messages;
mod outcome;
pub mod profiling;
mod submit;

use crate::backend::protocol::{Assignment, Command};
use crate::clock::now_ms;
use crate::engine::{Applied, Connection, Engine};

/// Where the attempt is on the backend, as far as the driver knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Submitting,
    Pending,
    Executing,
}

/// A cancel waiting for the backend's confirmation.
struct Stopping {
    until: Instant,
}

/// The attempt is over for gantry, but its prompt may still be on the backend: it is
/// interrupted or dequeued, and the backend takes nothing new until `/queue` shows the
/// prompt gone. A success that arrives meanwhile is still offered to the job (first
/// success wins).
struct Draining {
    since: Instant,
    next_poll: Instant,
    stuck: bool,
    /// The prompt taken back from behind this one (`Driver::evict`): the backend may
    /// have started it already (it does the moment the one ahead ends, before the driver
    /// hears of it), so the backend is not free until it is gone too.
    behind: Option<String>,
}

/// The attempt in flight on this backend.
struct Current {
    a: Box<Assignment>,
    stage: Stage,
    watch: Watch,
    stopping: Option<Stopping>,
    draining: Option<Draining>,
    success_seen: bool,
    /// The prompt was sent under another socket's clientId (adopted after a restart, or
    /// the socket reconnected), so its own messages do not reach us: every `status`
    /// frame (the queue moved) is then the cue to ask where it is.
    deaf: bool,
    /// Files named by `executed` messages, in case history is gone when we ask.
    executed_files: Vec<(String, FileRef)>,
}

struct Driver {
    engine: Engine,
    name: String,
    client: Option<Client>,
    session: Option<Session>,
    current: Option<Current>,
    /// The next attempt, already queued on the backend behind `current` so the GPU
    /// starts it the moment `current` ends (pipelining). Watched once promoted.
    next: Option<Current>,
    /// `current` and `next` are swapped so that code written for `current` acts on
    /// `next`; ending it then empties the slot without promoting anything.
    swapped: bool,
    /// `next` became `current`: find out where it stands.
    promoted: bool,
    /// `current` was given up on: take `next` back off the backend.
    evict_next: bool,
    reconnect_at: Instant,
    backoff: Duration,
    /// The last sign of life from the backend: a frame, or an answer to a request.
    last_contact: Instant,
    /// The last time the driver asked `/queue` and `/history` because things were quiet.
    last_poll: Instant,
    /// The watchdog's clock: milliseconds since this instant.
    epoch: Instant,
    /// A write was refused by this coordinator's lease: it no longer drives the backend
    /// and must not touch it again; the driver ends.
    fenced: std::sync::atomic::AtomicBool,
    /// The command attempt running on this agent (its own task, `command::run`), and
    /// where its stop requests go.
    command: Option<((JobId, u32), mpsc::UnboundedSender<bool>)>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// How long a prompt that `/history` says is over may take to be heard on its socket.
const HEAR_GRACE: Duration = Duration::from_millis(100);
/// Short: a backend that crashed is usually back within seconds, and its jobs wait for
/// it (a refused connection costs it nothing).
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Drive backend `name` until `stop` (shutdown, or the end of this coordinator's lease
/// on it); stopping leaves whatever runs on the backend for the next driver to adopt.
pub async fn run(
    engine: Engine,
    name: String,
    mut commands: mpsc::UnboundedReceiver<Command>,
    stop: tokio_util::sync::CancellationToken,
) {
    let url = engine
        .backends()
        .get(&name)
        .map(|b| b.config.url.clone())
        .unwrap_or_default();
    let client = match Client::with_http(&url, engine.http().clone()) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(backend = %name, error = %e, "backend url unusable");
            None
        }
    };
    let shutdown = stop;
    let now = Instant::now();
    let mut d = Driver {
        engine,
        name,
        client,
        session: None,
        current: None,
        next: None,
        swapped: false,
        promoted: false,
        evict_next: false,
        reconnect_at: now,
        backoff: BACKOFF_MIN,
        last_contact: now,
        last_poll: now,
        epoch: now,
        fenced: std::sync::atomic::AtomicBool::new(false),
        command: None,
    };
    loop {
        let wake = d.next_wake();
        // Everything handled for the current attempt is logged in its span.
        let span = d
            .current
            .as_ref()
            .map_or_else(tracing::Span::none, |c| c.a.span.clone());
        tokio::select! {
            // A timer that ran out is judged before a stop that came at the same time:
            // a driver resuming after a pause tries its write, which the fence refuses.
            biased;
            _ = tokio::time::sleep_until(wake) => d.on_wake().instrument(span).await,
            _ = shutdown.cancelled() => {
                if let Some(s) = d.session.take() {
                    s.close().await;
                }
                return;
            }
            cmd = commands.recv() => match cmd {
                Some(cmd) => {
                    // A new attempt is handled in its own span from the start.
                    let span = match &cmd {
                        Command::Run(a) => a.span.clone(),
                        Command::Stop { .. } => span,
                    };
                    d.on_command(cmd).instrument(span).await
                }
                None => return,
            },
            ev = next_event(&mut d.session) => d.on_event(ev).instrument(span).await,
        }
        if d.fenced.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(backend = %d.name, "lease gone: the driver stops and leaves the backend to its new owner");
            if let Some(s) = d.session.take() {
                s.close().await;
            }
            return;
        }
        if std::mem::take(&mut d.evict_next) {
            d.evict().await;
        }
        if std::mem::take(&mut d.promoted) {
            d.after_promotion().await;
        }
    }
}

pub(super) async fn next_event(session: &mut Option<Session>) -> Option<SessionEvent> {
    match session {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Why a WebSocket closed, for the backend's `last_error`.
pub(super) fn close_reason(code: Option<u16>, error: Option<String>) -> String {
    match (code, error) {
        (_, Some(e)) => e,
        (Some(code), None) => format!("closed with code {code}"),
        (None, None) => "closed".to_owned(),
    }
}

pub(super) fn f64_of(n: &serde_json::Number) -> f64 {
    n.as_f64().unwrap_or_default()
}

impl Driver {
    pub(super) fn liveness(&self) -> Duration {
        self.engine.config().liveness
    }

    /// How often a draining prompt is looked for in `/queue`.
    pub(super) fn drain_poll(&self) -> Duration {
        (self.liveness() / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// The watchdog's clock.
    pub(super) fn mono(&self) -> Millis {
        self.epoch.elapsed().as_millis() as Millis
    }

    pub(super) fn instant_of(&self, mono: Millis) -> Instant {
        self.epoch + Duration::from_millis(mono.max(0) as u64)
    }

    /// The instant at which a wall-clock moment comes.
    pub(super) fn instant_of_wall(wall: Millis) -> Instant {
        Instant::now() + Duration::from_millis((wall - now_ms()).max(0) as u64)
    }

    /// The wall-clock moment a watchdog timer started, for error details.
    pub(super) fn wall_of(&self, mono: Millis) -> Millis {
        now_ms() - (self.mono() - mono)
    }

    pub(super) fn probe_at(&self) -> Option<Millis> {
        self.engine
            .backends()
            .get(&self.name)
            .and_then(|b| b.health.probe_at())
    }

    pub(super) fn next_wake(&self) -> Instant {
        let mut wake = Instant::now() + Duration::from_secs(3600);
        if self.session.is_none() && self.client.is_some() {
            wake = wake.min(self.reconnect_at);
        }
        if let Some(at) = self.probe_at() {
            wake = wake.min(Self::instant_of_wall(at));
        }
        let Some(cur) = &self.current else {
            // An idle ComfyUI sends nothing by itself: ask it now and then, so its status
            // rests on something heard (`stale` otherwise).
            if self.session.is_some() {
                wake = wake.min(self.last_contact.max(self.last_poll) + self.liveness());
            }
            return wake;
        };
        if let Some(d) = &cur.draining {
            return wake.min(d.next_poll);
        }
        if let Some(at) = cur.watch.due() {
            wake = wake.min(self.instant_of(at));
        }
        if let Some(s) = &cur.stopping {
            wake = wake.min(s.until);
        }
        if let Some((at, _)) = cur.a.deadline {
            wake = wake.min(Self::instant_of_wall(at));
        }
        let quiet = self.last_contact.max(self.last_poll);
        wake.min(quiet + self.liveness())
            .min(self.last_contact + 2 * self.liveness())
    }

    pub(super) fn set_connection(&self, connection: Connection, error: Option<String>) {
        let mut backends = self.engine.backends();
        if let Some(b) = backends.get_mut(&self.name) {
            b.connection = connection;
            if error.is_some() {
                b.last_error = error;
            }
            if connection == Connection::Connected {
                b.last_seen = Some(now_ms());
                b.connected_once = true;
            }
        }
    }

    /// The backend answered or sent something.
    pub(super) fn contact(&mut self) {
        self.last_contact = Instant::now();
        if let Some(b) = self.engine.backends().get_mut(&self.name) {
            b.last_seen = Some(now_ms());
        }
    }

    pub(super) fn classes(&self) -> Option<Arc<HashSet<String>>> {
        self.engine
            .backends()
            .get(&self.name)
            .and_then(|b| b.classes.clone())
    }

    pub(super) async fn apply(&self, job_id: &JobId, input: Input) -> Option<Applied> {
        match self.engine.apply_held(job_id, input).await {
            Ok(applied) => Some(applied),
            Err(e) if e.is_fenced() => {
                self.fenced
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                None
            }
            Err(e) => {
                tracing::error!(backend = %self.name, job_id = %job_id, error = %e, "cannot record a job change");
                None
            }
        }
    }
}
