//! One driver per backend: a task that keeps one WebSocket open (a fresh clientId per
//! connection, PROTOCOL.md pitfall 8), runs at most one attempt at a time on it, follows
//! that attempt by its prompt id, and reconciles with `/queue` and `/history` after the
//! submit, after every reconnect and whenever the backend has been quiet too long, so a
//! completion is never missed (DESIGN.md invariant 5). Its watchdog times every phase;
//! an attempt gantry gave up on is drained (interrupted or dequeued, then watched until
//! `/queue` shows it gone) before the backend takes anything new.

use gantry_comfy::client::{Client, Session, SessionEvent, Submitted};
use gantry_comfy::rest::{FileRef, HistoryEntry, Outcome, PromptRequest, Queue};
use gantry_comfy::ws::ServerMessage;
use gantry_core::profile::Observed;
use gantry_core::watchdog::{Expired, Phase, Timer, Watch};
use gantry_core::{
    Attachment, AttemptStatus, Failure, FailureKind, Input, JobError, JobId, Millis, Output,
};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use crate::bus::{LiveEvent, LiveKind};
pub mod classify;
pub mod profiling;

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

async fn next_event(session: &mut Option<Session>) -> Option<SessionEvent> {
    match session {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// The prompts that run before `pid` on a backend: the running one (if not ours), then
/// pending ones with a lower number (`/queue` lists the pending heap unordered).
fn ahead_of(queue: &Queue, pid: &str) -> Option<Vec<String>> {
    let ours = queue.queue_pending.iter().find(|i| i.prompt_id == pid)?;
    let n = ours.number.as_f64().unwrap_or_default();
    let mut ahead: Vec<(f64, String)> = queue
        .queue_pending
        .iter()
        .filter(|i| i.prompt_id != pid && i.number.as_f64().unwrap_or_default() < n)
        .map(|i| (i.number.as_f64().unwrap_or_default(), i.prompt_id.clone()))
        .collect();
    ahead.sort_by(|a, b| a.0.total_cmp(&b.0));
    Some(
        queue
            .queue_running
            .iter()
            .map(|i| i.prompt_id.clone())
            .chain(ahead.into_iter().map(|(_, p)| p))
            .collect(),
    )
}

/// Why a WebSocket closed, for the backend's `last_error`.
fn close_reason(code: Option<u16>, error: Option<String>) -> String {
    match (code, error) {
        (_, Some(e)) => e,
        (Some(code), None) => format!("closed with code {code}"),
        (None, None) => "closed".to_owned(),
    }
}

fn f64_of(n: &serde_json::Number) -> f64 {
    n.as_f64().unwrap_or_default()
}

/// Every file reference in a history entry's UI outputs, with the node that wrote it.
/// Uploads each attachment through the backend's own route, into its `gantry` input
/// subfolder under a name made from the content hash (so two jobs' `face.png` never
/// collide and the same bytes are never uploaded under two names), and answers each
/// attachment's name -> the value the workflow must use there (`subfolder/name`, as the
/// backend answered it).
async fn upload_all(
    engine: &Engine,
    client: &Client,
    attachments: &[Attachment],
) -> Result<HashMap<String, String>, (String, bool)> {
    let mut names = HashMap::new();
    for a in attachments {
        let bytes = engine.attachments().read(&a.sha256).await.map_err(|e| {
            (
                format!(
                    "attachment {} ({}) is not readable here: {e}",
                    a.name, a.sha256
                ),
                false,
            )
        })?;
        let file = backend_file_name(a);
        let at = client
            .upload(&file, bytes, UPLOAD_SUBFOLDER, true)
            .await
            .map_err(|e| (format!("{}: {e}", a.name), e.is_connection()))?;
        let value = if at.subfolder.is_empty() {
            at.filename
        } else {
            format!("{}/{}", at.subfolder, at.filename)
        };
        names.insert(a.name.clone(), value);
    }
    Ok(names)
}

/// The name a job's output is downloaded by (`/v1/jobs/{id}/outputs/{name}`): its file
/// name, else `NODE-` before it, else a number too, so that no two outputs of a job
/// share one (the later one could not be reached) and none is empty (no URL reaches it).
fn output_name(taken: &[Output], node: &str, filename: &str) -> String {
    let base = if filename.is_empty() {
        "output"
    } else {
        filename
    };
    let free = |name: &str| !taken.iter().any(|o| o.name == name);
    if free(base) {
        return base.to_owned();
    }
    let mut name = format!("{node}-{base}");
    let mut n = 2;
    while !free(&name) {
        name = format!("{node}-{n}-{base}");
        n += 1;
    }
    name
}

/// The input subfolder gantry uploads attachments into.
const UPLOAD_SUBFOLDER: &str = "gantry";

/// `<first 16 hex of the hash>-<the name's last segment, made safe>`: keeps the
/// extension, which ComfyUI's file lists filter on.
fn backend_file_name(a: &Attachment) -> String {
    let base = a.name.rsplit(['/', '\\']).next().unwrap_or_default();
    let safe: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{}-{safe}", &a.sha256[..16.min(a.sha256.len())])
}

fn files_of(entry: &HistoryEntry) -> Vec<(String, FileRef)> {
    let mut out = Vec::new();
    for (node, ui) in &entry.outputs {
        out.extend(files_in(node, ui));
    }
    out
}

fn files_in(node: &str, ui: &Value) -> Vec<(String, FileRef)> {
    ui.as_object()
        .into_iter()
        .flat_map(|ui| ui.values())
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(|v| serde_json::from_value::<FileRef>(v.clone()).ok())
        .map(|f| (node.to_owned(), f))
        .collect()
}

impl Driver {
    fn liveness(&self) -> Duration {
        self.engine.config().liveness
    }

    /// How often a draining prompt is looked for in `/queue`.
    fn drain_poll(&self) -> Duration {
        (self.liveness() / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// The watchdog's clock.
    fn mono(&self) -> Millis {
        self.epoch.elapsed().as_millis() as Millis
    }

    fn instant_of(&self, mono: Millis) -> Instant {
        self.epoch + Duration::from_millis(mono.max(0) as u64)
    }

    /// The instant at which a wall-clock moment comes.
    fn instant_of_wall(wall: Millis) -> Instant {
        Instant::now() + Duration::from_millis((wall - now_ms()).max(0) as u64)
    }

    /// The wall-clock moment a watchdog timer started, for error details.
    fn wall_of(&self, mono: Millis) -> Millis {
        now_ms() - (self.mono() - mono)
    }

    fn probe_at(&self) -> Option<Millis> {
        self.engine
            .backends()
            .get(&self.name)
            .and_then(|b| b.health.probe_at())
    }

    fn next_wake(&self) -> Instant {
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

    fn set_connection(&self, connection: Connection, error: Option<String>) {
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
    fn contact(&mut self) {
        self.last_contact = Instant::now();
        if let Some(b) = self.engine.backends().get_mut(&self.name) {
            b.last_seen = Some(now_ms());
        }
    }

    fn classes(&self) -> Option<Arc<HashSet<String>>> {
        self.engine
            .backends()
            .get(&self.name)
            .and_then(|b| b.classes.clone())
    }

    async fn on_wake(&mut self) {
        let now = Instant::now();
        if self.session.is_none() && self.client.is_some() && now >= self.reconnect_at {
            self.connect().await;
        }
        if self.probe_at().is_some_and(|at| at <= now_ms()) {
            self.probe().await;
        }
        let Some(cur) = &mut self.current else {
            if self.session.is_some()
                && now >= self.last_contact.max(self.last_poll) + self.liveness()
            {
                self.idle_probe().await;
            }
            return;
        };
        if let Some(d) = &cur.draining {
            if now >= d.next_poll {
                self.drain_check().await;
            }
            return;
        }
        if cur.stopping.as_ref().is_some_and(|s| now >= s.until) {
            self.stop_grace_passed().await;
            return;
        }
        if let Some((_, limit_ms)) = cur.a.deadline.filter(|(at, _)| *at <= now_ms()) {
            cur.a.deadline = None;
            let job_id = cur.a.job_id.clone();
            // The engine answers with a Stop for this attempt, which drains it.
            self.apply(&job_id, Input::DeadlinePassed { limit_ms })
                .await;
            return;
        }
        let mono = self.mono();
        if self
            .current
            .as_ref()
            .is_some_and(|c| c.watch.expired(mono).is_some())
        {
            // Ask before judging: the prompt may have ended where gantry could not see it
            // (a silent socket, or a reconnected one that no longer gets its messages).
            self.last_poll = now;
            self.reconcile().await;
            let mono = self.mono();
            let expired = self
                .current
                .as_ref()
                .filter(|c| c.draining.is_none())
                .and_then(|c| c.watch.expired(mono));
            if let Some(expired) = expired {
                self.timed_out(expired).await;
            }
            return;
        }
        if now >= self.last_contact + 2 * self.liveness() {
            let failure = Failure::lost(JobError::new(
                "backend_unreachable",
                format!(
                    "lost contact with {} for {} ms while the prompt was in flight",
                    self.name,
                    now.duration_since(self.last_contact).as_millis()
                ),
            ));
            self.fail(failure, true).await;
            return;
        }
        if now >= self.last_contact.max(self.last_poll) + self.liveness() {
            // Quiet for too long: ask, rather than trust the socket (pitfalls 7 and 8).
            self.last_poll = now;
            self.reconcile().await;
        }
    }

    /// Idle and quiet for `liveness`: is it still there? An answer counts as contact; no
    /// answer leaves `last_seen` where it was, so the backend turns `stale` (a closed
    /// socket is the WebSocket's to report).
    async fn idle_probe(&mut self) {
        self.last_poll = Instant::now();
        let Some(client) = self.client.clone() else {
            return;
        };
        match tokio::time::timeout(self.liveness(), client.queue()).await {
            Ok(Ok(_)) => {
                self.contact();
                self.engine.backends_changed();
            }
            Ok(Err(e)) => tracing::debug!(backend = %self.name, error = %e, "idle probe failed"),
            Err(_) => tracing::debug!(backend = %self.name, "idle probe unanswered"),
        }
    }

    /// The circuit is open and its cooldown is over: is the backend healthy again?
    async fn probe(&mut self) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let healthy = match tokio::time::timeout(self.liveness(), client.system_stats()).await {
            Ok(Ok(_)) => {
                self.contact();
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(backend = %self.name, error = %e, "circuit probe failed");
                false
            }
            Err(_) => false,
        };
        self.engine.probe_result(&self.name, healthy);
    }

    async fn connect(&mut self) {
        let Some(client) = self.client.clone() else {
            return;
        };
        self.set_connection(Connection::Connecting, None);
        let result = async {
            let info = client.object_info().await?;
            let session = client.connect(false).await?;
            Ok::<_, gantry_comfy::client::Error>((info, session))
        }
        .await;
        match result {
            Ok((info, session)) => {
                let classes: HashSet<String> = info.keys().cloned().collect();
                let models = gantry_core::workflow::ModelChoices::from_object_info(&info);
                if let Some(b) = self.engine.backends().get_mut(&self.name) {
                    if !b.learn_classes(classes, models) {
                        tracing::warn!(backend = %self.name, "object_info listed no node classes; keeping what was known");
                    }
                    b.last_error = None;
                }
                tracing::info!(backend = %self.name, client_id = session.client_id(), "connected");
                self.session = Some(session);
                self.backoff = BACKOFF_MIN;
                self.contact();
                self.set_connection(Connection::Connected, None);
                let mono = self.mono();
                if let Some(cur) = self.current.as_mut() {
                    cur.deaf = true;
                    if cur.stage == Stage::Executing && cur.draining.is_none() {
                        cur.watch.blind(mono);
                    }
                }
                if self.current.is_some() {
                    self.reconcile().await;
                }
                self.engine.wake_scheduler();
            }
            Err(e) => {
                tracing::debug!(backend = %self.name, error = %e, "cannot connect");
                self.set_connection(Connection::Offline, Some(e.to_string()));
                self.reconnect_at = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    async fn on_event(&mut self, event: Option<SessionEvent>) {
        match event {
            Some(SessionEvent::Message(m)) => {
                self.contact();
                self.on_message(m).await;
            }
            Some(SessionEvent::Binary(_)) | Some(SessionEvent::Malformed { .. }) => self.contact(),
            Some(SessionEvent::Closed { code, error }) => {
                self.disconnected(close_reason(code, error));
            }
            None => self.disconnected("the socket ended".to_owned()),
        }
    }

    fn disconnected(&mut self, why: String) {
        tracing::info!(backend = %self.name, reason = %why, "websocket lost");
        // A new socket gets a new clientId, which ComfyUI tells nothing of these prompts.
        let lost = now_ms();
        for cur in [&self.current, &self.next].into_iter().flatten() {
            self.engine.observe(&cur.a.job_id, cur.a.attempt, |p| {
                p.observe(lost, Observed::Lost("the WebSocket was lost: a new connection hears nothing more of this prompt"))
            });
        }
        self.session = None;
        self.set_connection(Connection::Offline, Some(format!("websocket lost: {why}")));
        self.reconnect_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    async fn on_message(&mut self, m: ServerMessage) {
        let Some(cur) = &mut self.current else { return };
        if let ServerMessage::Status(_) = m {
            // The queue moved: where is our prompt now?
            if (cur.stage == Stage::Pending || cur.deaf) && cur.draining.is_none() {
                self.reconcile().await;
            }
            return;
        }
        self.on_prompt_message(m).await;
    }

    /// A message other than `status`: about the current prompt, or another's.
    async fn on_prompt_message(&mut self, m: ServerMessage) {
        let mono = self.mono();
        let Some(cur) = &mut self.current else { return };
        if m.prompt_id() != Some(cur.a.prompt_id.as_str()) {
            return;
        }
        let heard = now_ms();
        let news = self.engine.observe(&cur.a.job_id, cur.a.attempt, |p| {
            profiling::observe(p, heard, &m)
        });
        let draining = cur.draining.is_some();
        // Node steps go into the job's history before what the message does next (an
        // end, a failure), and after the start they belong to; not for an attempt
        // gantry already gave up on.
        if !news.is_empty() && !draining {
            if matches!(
                m,
                ServerMessage::ExecutionStart(_)
                    | ServerMessage::ExecutionCached(_)
                    | ServerMessage::Executing(_)
            ) {
                self.started().await;
            }
            let Some(cur) = &self.current else { return };
            let (job_id, attempt, workflow) =
                (cur.a.job_id.clone(), cur.a.attempt, cur.a.workflow.clone());
            self.engine
                .record_nodes(&job_id, attempt, &self.name, &workflow, news)
                .await;
        }
        let Some(cur) = &mut self.current else { return };
        match m {
            ServerMessage::ExecutionStart(_) => self.started().await,
            ServerMessage::Executing(e) => match e.node {
                Some(node) => {
                    self.started().await;
                    let Some(cur) = &mut self.current else { return };
                    let class_type = cur
                        .a
                        .workflow
                        .class_of(&node)
                        .unwrap_or_default()
                        .to_owned();
                    if !draining {
                        cur.watch.node_started(&node, &class_type, mono);
                    }
                }
                None => self.end_marker().await,
            },
            ServerMessage::Progress(p) => {
                let (value, max) = (f64_of(&p.value), f64_of(&p.max));
                let class_type = cur.a.workflow.class_of(&p.node).unwrap_or_default();
                // Only a changed value is progress (DESIGN.md invariant 4, seed 001).
                if !draining {
                    cur.watch.progress(&p.node, class_type, value, max, mono);
                }
                let (job_id, attempt) = (cur.a.job_id.clone(), cur.a.attempt);
                self.engine.publish_live(LiveEvent {
                    job_id,
                    attempt,
                    backend: self.name.clone(),
                    kind: LiveKind::Progress {
                        node: p.node,
                        value,
                        max,
                    },
                });
            }
            ServerMessage::Executed(e) => {
                cur.executed_files.extend(files_in(&e.node, &e.output));
            }
            ServerMessage::ExecutionSuccess(_) => cur.success_seen = true,
            ServerMessage::ExecutionError(e) => {
                if draining {
                    self.end_attempt();
                    return;
                }
                let details = json!({
                    "backend": self.name,
                    "node_id": e.node_id,
                    "node_type": e.node_type,
                    "exception_type": e.exception_type,
                    "exception_message": e.exception_message,
                    "traceback": e.traceback,
                });
                self.node_failed(
                    &e.node_id,
                    &e.node_type,
                    &e.exception_type,
                    &e.exception_message,
                    details,
                )
                .await;
            }
            ServerMessage::ExecutionInterrupted(_) => self.interrupted().await,
            ServerMessage::Status(_)
            | ServerMessage::ExecutionCached(_)
            | ServerMessage::ProgressState(_)
            | ServerMessage::FeatureFlags(_)
            | ServerMessage::Unknown { .. } => {}
        }
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Run(a) if a.command.is_some() => {
                let (tx, rx) = mpsc::unbounded_channel();
                self.command = Some(((a.job_id.clone(), a.attempt), tx));
                let span = a.span.clone();
                tokio::spawn(
                    crate::backend::command::run(self.engine.clone(), self.name.clone(), a, rx)
                        .instrument(span),
                );
            }
            Command::Stop {
                job_id,
                attempt,
                confirm,
                ..
            } if self
                .command
                .as_ref()
                .is_some_and(|(k, _)| *k == (job_id.clone(), attempt)) =>
            {
                if let Some((_, tx)) = &self.command {
                    let _ = tx.send(confirm);
                }
            }
            Command::Run(a) => {
                if let Some(cur) = &self.current {
                    // Behind a running prompt (or adopted after a restart): queue it on
                    // the backend now, so no GPU time is lost between the two.
                    let pipelined = self.next.is_none()
                        && (a.adopt
                            || (cur.stage == Stage::Executing
                                && cur.draining.is_none()
                                && cur.stopping.is_none()));
                    if pipelined {
                        let adopt = a.adopt;
                        self.next = Some(self.new_current(a));
                        if !adopt {
                            self.swap();
                            self.submit().await;
                            self.swap();
                        }
                        return;
                    }
                    tracing::error!(backend = %self.name, running = %cur.a.job_id, job_id = %a.job_id, "asked to run a third attempt");
                    let failure = Failure::lost(JobError::new(
                        "busy",
                        format!("{} was already running an attempt", self.name),
                    ));
                    self.apply(
                        &a.job_id,
                        Input::Failed {
                            attempt: a.attempt,
                            failure,
                        },
                    )
                    .await;
                    return;
                }
                let adopt = a.adopt;
                self.current = Some(self.new_current(a));
                if adopt {
                    if self.session.is_some() {
                        self.reconcile().await;
                    }
                } else {
                    self.submit().await;
                }
            }
            Command::Stop {
                job_id,
                attempt,
                prompt_id,
                confirm,
            } => {
                let is = |c: &Option<Current>| {
                    c.as_ref()
                        .is_some_and(|c| c.a.job_id == job_id && c.a.attempt == attempt)
                };
                if is(&self.next) {
                    self.swap();
                    self.on_stop(prompt_id, confirm).await;
                    self.swap();
                } else if is(&self.current) {
                    self.on_stop(prompt_id, confirm).await;
                } else {
                    self.stop_on_backend(&prompt_id, None).await;
                }
            }
        }
    }

    /// Stop `current` (`confirm`: a cancel waiting for the backend's word).
    async fn on_stop(&mut self, prompt_id: String, confirm: bool) {
        let Some(stage) = self
            .current
            .as_ref()
            .filter(|c| c.draining.is_none())
            .map(|c| c.stage)
        else {
            return;
        };
        if !self.swapped {
            // A prompt being stopped takes nothing behind it.
            self.set_accepts_next(false);
        }
        if !confirm {
            // The attempt is already over for gantry (superseded, or past its
            // deadline): take it off the backend.
            self.stop_on_backend(&prompt_id, Some(stage)).await;
            self.drain(Instant::now());
            return;
        }
        let grace = self.engine.config().cancel_grace;
        if let Some(cur) = &mut self.current {
            cur.stopping = Some(Stopping {
                until: Instant::now() + grace,
            });
        }
        if self.session.is_some() {
            match stage {
                Stage::Submitting => {}
                Stage::Pending => self.dequeue_for_cancel().await,
                Stage::Executing => {
                    if let Some(client) = &self.client {
                        let _ = client.interrupt(Some(&prompt_id)).await;
                    }
                }
            }
        }
    }

    /// The attempt as the driver starts following it.
    fn new_current(&self, a: Box<Assignment>) -> Current {
        let stage = match a.status {
            AttemptStatus::Pending => Stage::Pending,
            AttemptStatus::Executing => Stage::Executing,
            _ => Stage::Submitting,
        };
        let adopt = a.adopt;
        let mut watch = Watch::new(a.limits.clone());
        if adopt {
            let at = now_ms();
            self.engine
                .observe(&a.job_id, a.attempt, |p| p.observe(at, Observed::Adopted));
            let mono = self.mono();
            match stage {
                Stage::Executing => watch.executing(mono),
                // Where it stands in the queue is learnt by the reconcile.
                Stage::Pending | Stage::Submitting => watch.pending(vec![], mono),
            }
        }
        Current {
            stage,
            watch,
            stopping: None,
            draining: None,
            success_seen: false,
            deaf: adopt,
            executed_files: Vec::new(),
            a,
        }
    }

    fn swap(&mut self) {
        std::mem::swap(&mut self.current, &mut self.next);
        self.swapped = !self.swapped;
    }

    /// Tell the scheduler whether this backend takes a next prompt behind its current one.
    fn set_accepts_next(&self, yes: bool) {
        let changed = match self.engine.backends().get_mut(&self.name) {
            Some(b) if b.accepts_next != yes => {
                b.accepts_next = yes;
                true
            }
            _ => false,
        };
        if changed && yes {
            self.engine.wake_scheduler();
        }
    }

    /// The promoted attempt is at the head of the backend's queue, or already running.
    async fn after_promotion(&mut self) {
        let mono = self.mono();
        let Some(cur) = &mut self.current else { return };
        if cur.draining.is_none() && cur.stage == Stage::Pending {
            cur.watch.pending(vec![], mono);
        }
        if self.session.is_some() {
            self.reconcile().await;
        }
    }

    /// `current` was given up on and the backend may be stuck behind it: take `next` off
    /// the backend and give its job back to the queue.
    async fn evict(&mut self) {
        let Some(next) = &self.next else { return };
        let (job_id, attempt, pid) = (
            next.a.job_id.clone(),
            next.a.attempt,
            next.a.prompt_id.clone(),
        );
        self.swap();
        // What the driver last knew of its stage may be stale: the backend starts it the
        // moment the prompt ahead ends, which the interrupt just sent may have caused.
        // Both dequeue and interrupt are asked (each a no-op where it does not apply),
        // and the drain follows it until `/queue` shows it gone.
        self.stop_on_backend(&pid, None).await;
        let failure = Failure {
            kind: FailureKind::Displaced,
            error: JobError::new(
                "displaced",
                format!(
                    "taken back from {} before it ran: the prompt ahead of it there was stopped",
                    self.name
                ),
            ),
            exclude: None,
        };
        self.apply(&job_id, Input::Failed { attempt, failure })
            .await;
        self.end_attempt();
        self.swap();
        if let Some(d) = self.current.as_mut().and_then(|c| c.draining.as_mut()) {
            d.behind = Some(pid);
        }
    }

    /// Delete our pending prompt, then confirm it is gone (it may have started or finished
    /// meanwhile; a finished one is collected, so a success still wins).
    async fn dequeue_for_cancel(&mut self) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let Some(pid) = self.current.as_ref().map(|c| c.a.prompt_id.clone()) else {
            return;
        };
        let _ = client.delete_pending(std::slice::from_ref(&pid)).await;
        match client.queue().await {
            Ok(q) if q.queue_running.iter().any(|i| i.prompt_id == pid) => {
                self.started().await;
                let _ = client.interrupt(Some(&pid)).await;
            }
            Ok(q) if q.queue_pending.iter().any(|i| i.prompt_id == pid) => {}
            Ok(_) => match client.history_of(&pid).await {
                Ok(Some(entry)) => self.finish_from_history(entry).await,
                Ok(None) => self.cancel_confirmed().await,
                Err(_) => {}
            },
            Err(_) => {}
        }
    }

    async fn submit(&mut self) {
        let (Some(client), Some(session)) = (self.client.clone(), &self.session) else {
            let failure = Failure::lost(JobError::new(
                "backend_offline",
                format!("{} is not connected", self.name),
            ));
            self.fail(failure, false).await;
            return;
        };
        let client_id = session.client_id().to_owned();
        let mono = self.mono();
        let Some(cur) = &mut self.current else { return };
        cur.watch.submitting(mono);
        if !cur.a.attachments.is_empty() {
            let limit = cur.watch.timer().map(|t| Duration::from_millis(t.limit_ms));
            let attachments = cur.a.attachments.clone();
            let upload = upload_all(&self.engine, &client, &attachments);
            let uploaded = match limit {
                Some(limit) => tokio::time::timeout(limit, upload)
                    .await
                    .unwrap_or_else(|_| {
                        Err((
                            format!(
                                "uploading them took longer than the submit limit ({} ms)",
                                limit.as_millis()
                            ),
                            false,
                        ))
                    }),
                None => upload.await,
            };
            match uploaded {
                Ok(names) => {
                    self.contact();
                    let Some(cur) = &mut self.current else { return };
                    cur.a.uploaded = names;
                    // The submit limit counts from here, not from before the uploads.
                    let mono = self.mono();
                    let Some(cur) = &mut self.current else { return };
                    cur.watch.submitting(mono);
                }
                Err((e, connection)) => {
                    let error = JobError::new(
                        "attachment_upload_failed",
                        format!("cannot upload the job's attachments to {}: {e}", self.name),
                    );
                    // Refused by a backend that answered (a full disk): not there again
                    // for a while; unreachable: wait for any backend.
                    let failure = if connection {
                        Failure::lost(error)
                    } else {
                        Failure::backend(error)
                    };
                    self.fail(failure, false).await;
                    return;
                }
            }
        }
        let Some(cur) = &mut self.current else { return };
        let prompt = if cur.a.uploaded.is_empty() {
            cur.a.workflow.graph().clone()
        } else {
            cur.a.workflow.with_names(&cur.a.uploaded)
        };
        let request = PromptRequest {
            prompt,
            client_id: Some(client_id),
            prompt_id: Some(cur.a.prompt_id.clone()),
            ..Default::default()
        };
        let answer = match cur.watch.timer() {
            Some(Timer { limit_ms, .. }) => {
                tokio::time::timeout(Duration::from_millis(limit_ms), client.submit(&request))
                    .await
                    .ok()
            }
            None => Some(client.submit(&request).await),
        };
        let pid = cur.a.prompt_id.clone();
        match answer {
            Some(Ok(Submitted::Accepted(accepted))) if accepted.node_errors.is_empty() => {
                self.contact();
                // The start limit counts from the acceptance (as `submitted_at` does),
                // not from before the request: a slow answer does not eat into it.
                let accepted_at = self.mono();
                let Some(cur) = &mut self.current else { return };
                let (job_id, attempt) = (cur.a.job_id.clone(), cur.a.attempt);
                if cur.stage == Stage::Submitting {
                    cur.stage = Stage::Pending;
                    // Until the queue is seen, count as if at its head.
                    cur.watch.pending(vec![], accepted_at);
                }
                self.apply(&job_id, Input::Submitted { attempt }).await;
                // A cached prompt can finish before its answer is read (pitfall 3): what
                // the socket said meanwhile is handled first, in order, so its nodes are
                // heard rather than only read back from /history. Not while `next` is
                // swapped in: the messages may be the running prompt's.
                if !self.swapped {
                    while let Some(ev) = self.session.as_mut().and_then(|s| s.try_next()) {
                        self.on_event(Some(ev)).await;
                    }
                }
                // And the start timer counts from the head of the queue.
                let ours = |c: &Current| c.a.job_id == job_id && c.a.attempt == attempt;
                if self.current.as_ref().is_some_and(ours) {
                    self.reconcile().await;
                }
            }
            Some(Ok(answer)) => {
                self.contact();
                let (error, node_errors, queued) = match &answer {
                    Submitted::Accepted(partial) => (None, &partial.node_errors, true),
                    Submitted::Rejected(rejected) => {
                        (Some(&rejected.error), &rejected.node_errors, false)
                    }
                };
                if queued {
                    // A partial run is a rejection: take what was queued back off.
                    self.stop_on_backend(&pid, None).await;
                }
                let classes = self.classes();
                let Some(cur) = &self.current else { return };
                let failure = classify::rejection(
                    &cur.a.workflow,
                    &cur.a.uploaded,
                    &self.name,
                    classes.as_deref(),
                    error,
                    node_errors,
                );
                self.fail(failure, queued).await;
            }
            Some(Err(e)) => {
                // It may have landed anyway: make sure it does not run unwatched.
                self.stop_on_backend(&pid, None).await;
                let error = JobError::new(
                    "submit_failed",
                    format!("submit to {} failed: {e}", self.name),
                );
                let failure = if e.is_connection() {
                    Failure::lost(error)
                } else {
                    Failure::backend(error)
                };
                self.fail(failure, true).await;
            }
            None => {
                let mono = self.mono();
                let expired = self.current.as_ref().and_then(|c| c.watch.expired(mono));
                match expired {
                    Some(expired) => self.timed_out(expired).await,
                    None => {
                        self.stop_on_backend(&pid, None).await;
                        let failure = Failure::backend(JobError::new(
                            "timeout",
                            format!("Submit got no answer from {}", self.name),
                        ));
                        self.fail(failure, true).await;
                    }
                }
            }
        }
    }

    /// Find out where our prompt is: running or pending in the queue, finished in history,
    /// or lost. Queue first: ComfyUI moves a prompt from its queue to history atomically,
    /// so a prompt in neither after that order is really gone.
    async fn reconcile(&mut self) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let Some(cur) = &self.current else { return };
        if cur.draining.is_some() {
            self.drain_check().await;
            return;
        }
        let pid = cur.a.prompt_id.clone();
        let queue = match client.queue().await {
            Ok(q) => q,
            Err(e) => {
                tracing::debug!(backend = %self.name, error = %e, "reconcile: queue unavailable");
                return;
            }
        };
        self.contact();
        if queue.queue_running.iter().any(|i| i.prompt_id == pid) {
            self.started().await;
            return;
        }
        if let Some(ahead) = ahead_of(&queue, &pid) {
            let mono = self.mono();
            let Some(cur) = &mut self.current else { return };
            cur.watch.pending(ahead, mono);
            if cur.stage == Stage::Submitting {
                cur.stage = Stage::Pending;
                let (job_id, attempt) = (cur.a.job_id.clone(), cur.a.attempt);
                self.apply(&job_id, Input::Submitted { attempt }).await;
            }
            return;
        }
        match client.history_of(&pid).await {
            Ok(Some(entry)) => {
                if !self.hear_the_end().await {
                    self.finish_from_history(entry).await;
                }
            }
            Ok(None) => {
                if self.current.as_ref().is_some_and(|c| c.stopping.is_some()) {
                    self.cancel_confirmed().await;
                    return;
                }
                // After a lost connection that is a restart or a crash (ComfyUI keeps
                // its queue and history in memory only): the backend's failure, whatever
                // it ran. Gone while the connection held, it is this backend misbehaving
                // with this prompt: blocked like a timeout.
                let reconnected = self.current.as_ref().is_some_and(|c| c.deaf);
                let failure = if reconnected {
                    Failure::lost(JobError::new(
                        "backend_lost",
                        format!(
                            "{} lost prompt {pid}: after the connection dropped it is in neither its queue nor its history (the backend restarted or crashed)",
                            self.name
                        ),
                    ))
                } else {
                    Failure::backend(JobError::new(
                        "prompt_lost",
                        format!(
                            "prompt {pid} vanished from {}: in neither its queue nor its history",
                            self.name
                        ),
                    ))
                };
                self.fail(failure, false).await;
            }
            Err(e) => {
                tracing::debug!(backend = %self.name, error = %e, "reconcile: history unavailable")
            }
        }
    }

    /// `/history` says the prompt is over, but its messages may still be on their way
    /// on a socket that hears it (ComfyUI sends them from another task than the one that
    /// answers HTTP; a cached prompt often ends before its submit is answered): give
    /// them `HEAR_GRACE`, so its nodes are heard and kept in the job's history rather
    /// than only read back. True when the attempt ended by what was heard.
    async fn hear_the_end(&mut self) -> bool {
        let Some(cur) = &self.current else {
            return false;
        };
        if cur.deaf || self.swapped {
            return false;
        }
        let ours = (cur.a.job_id.clone(), cur.a.attempt);
        let until = Instant::now() + HEAR_GRACE;
        loop {
            let still = |c: &Current| c.a.job_id == ours.0 && c.a.attempt == ours.1;
            if !self.current.as_ref().is_some_and(still) {
                return true;
            }
            let Some(session) = self.session.as_mut() else {
                return false;
            };
            match tokio::time::timeout_at(until, session.next()).await {
                Ok(Some(SessionEvent::Message(m))) => {
                    self.contact();
                    // The queue's news is not needed: the prompt is known to be over.
                    if !matches!(m, ServerMessage::Status(_)) {
                        self.on_prompt_message(m).await;
                    }
                }
                Ok(Some(SessionEvent::Binary(_) | SessionEvent::Malformed { .. })) => {
                    self.contact()
                }
                Ok(Some(SessionEvent::Closed { code, error })) => {
                    self.disconnected(close_reason(code, error));
                    return false;
                }
                Ok(None) => {
                    self.disconnected("the socket ended".to_owned());
                    return false;
                }
                Err(_) => return false,
            }
        }
    }

    async fn started(&mut self) {
        let mono = self.mono();
        let Some(cur) = &mut self.current else { return };
        if cur.stage == Stage::Executing || cur.draining.is_some() {
            cur.stage = Stage::Executing;
            return;
        }
        cur.stage = Stage::Executing;
        cur.watch.executing(mono);
        let (job_id, attempt) = (cur.a.job_id.clone(), cur.a.attempt);
        let ready = cur.stopping.is_none() && !self.swapped;
        self.apply(&job_id, Input::Started { attempt }).await;
        if ready && self.engine.config().pipeline {
            self.set_accepts_next(true);
        }
    }

    async fn end_marker(&mut self) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let Some(pid) = self.current.as_ref().map(|c| c.a.prompt_id.clone()) else {
            return;
        };
        match client.history_of(&pid).await {
            Ok(Some(entry)) => self.finish_from_history(entry).await,
            _ => {
                let Some(cur) = &mut self.current else { return };
                if cur.success_seen {
                    let files = std::mem::take(&mut cur.executed_files);
                    self.succeed(files).await;
                }
                // Otherwise the next liveness poll (or drain poll) looks again.
            }
        }
    }

    async fn finish_from_history(&mut self, entry: HistoryEntry) {
        let draining = self.current.as_ref().is_some_and(|c| c.draining.is_some());
        if let Some(cur) = &self.current {
            let now = now_ms();
            self.engine.observe(&cur.a.job_id, cur.a.attempt, |p| {
                profiling::recall_history(p, now, &entry)
            });
        }
        match entry.outcome() {
            Outcome::Success => self.succeed(files_of(&entry)).await,
            Outcome::Interrupted => self.interrupted().await,
            Outcome::Error if draining => self.end_attempt(),
            Outcome::Error => {
                let data = entry
                    .status
                    .messages
                    .iter()
                    .find(|(kind, _)| kind == "execution_error")
                    .map(|(_, data)| data.clone())
                    .unwrap_or(Value::Null);
                let s = |key: &str| {
                    data.get(key)
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_owned()
                };
                let details = json!({"backend": self.name, "history": data});
                self.node_failed(
                    &s("node_id"),
                    &s("node_type"),
                    &s("exception_type"),
                    &s("exception_message"),
                    details,
                )
                .await;
            }
        }
    }

    /// The prompt succeeded: keep its outputs and offer the success to the job. For an
    /// attempt gantry had given up on, the job decides (first success wins).
    async fn succeed(&mut self, files: Vec<(String, FileRef)>) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let mut outputs: Vec<Output> = Vec::new();
        for (node, file) in files {
            let bytes = match client.view(&file).await {
                Ok(b) => b,
                Err(e) => {
                    let error = JobError::new(
                        "output_unavailable",
                        format!(
                            "cannot download output {} of node {node} from {}: {e}",
                            file.filename, self.name
                        ),
                    );
                    let failure = if e.is_connection() {
                        Failure::lost(error)
                    } else {
                        Failure::backend(error)
                    };
                    self.fail(failure, false).await;
                    return;
                }
            };
            let sha256 = match self.engine.outputs().put(bytes.clone()).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(error = %e, "cannot store an output file");
                    // gantry's own storage failed, not the workflow: block nothing.
                    let failure = Failure::lost(JobError::new(
                        "output_unstored",
                        format!("cannot store output {}: {e}", file.filename),
                    ));
                    self.fail(failure, false).await;
                    return;
                }
            };
            let name = output_name(&outputs, &node, &file.filename);
            outputs.push(Output {
                name,
                node_id: node,
                filename: file.filename,
                subfolder: file.subfolder,
                kind: file.kind,
                sha256,
                size: bytes.len() as u64,
            });
        }
        let Some(cur) = &self.current else { return };
        let (job_id, attempt) = (cur.a.job_id.clone(), cur.a.attempt);
        self.apply(
            &job_id,
            Input::Succeeded {
                attempt,
                outputs,
                result: None,
            },
        )
        .await;
        self.engine.backend_ok(&self.name);
        self.end_attempt();
    }

    async fn node_failed(
        &mut self,
        node: &str,
        node_type: &str,
        exception_type: &str,
        message: &str,
        details: Value,
    ) {
        let Some(cur) = &self.current else { return };
        let failure = classify::node_exception(
            &cur.a.excluded,
            &self.name,
            node,
            node_type,
            exception_type,
            message,
            details,
        );
        self.fail(failure, false).await;
    }

    async fn interrupted(&mut self) {
        let Some(cur) = &self.current else { return };
        if cur.draining.is_some() {
            self.end_attempt();
            return;
        }
        if cur.stopping.is_some() {
            self.cancel_confirmed().await;
            return;
        }
        let failure = Failure::backend(JobError::new(
            "interrupted",
            format!("the prompt was interrupted on {}, not by gantry", self.name),
        ));
        self.fail(failure, false).await;
    }

    async fn cancel_confirmed(&mut self) {
        let Some(cur) = &self.current else { return };
        let (job_id, attempt) = (cur.a.job_id.clone(), cur.a.attempt);
        self.apply(&job_id, Input::CancelConfirmed { attempt })
            .await;
        self.end_attempt();
    }

    /// The backend did not confirm a cancel in time: the job is cancelled all the same,
    /// and the prompt is drained (it may be a node that ignores interrupts).
    async fn stop_grace_passed(&mut self) {
        let Some(cur) = &self.current else { return };
        tracing::warn!(backend = %self.name, job_id = %cur.a.job_id, "the backend did not confirm the cancel in time");
        let (job_id, attempt) = (cur.a.job_id.clone(), cur.a.attempt);
        let since = cur
            .stopping
            .as_ref()
            .map(|s| s.until - self.engine.config().cancel_grace);
        self.apply(&job_id, Input::CancelConfirmed { attempt })
            .await;
        self.drain(since.unwrap_or_else(Instant::now));
    }

    async fn timed_out(&mut self, expired: Expired) {
        let Some(cur) = &self.current else { return };
        let mut error = expired.error(&self.name, self.wall_of(expired.timer.since));
        // Timestamps in JSON are RFC 3339; the last sign of progress is the one a reader
        // compares with the attempt's `finished_at`.
        if let Some(since) = error.details.get("since").and_then(Value::as_i64) {
            error.details["since"] = Value::from(crate::clock::rfc3339(since));
        }
        let pid = cur.a.prompt_id.clone();
        let stage = match expired.timer.phase {
            Phase::Submit => None,
            Phase::Start | Phase::QueueAhead => Some(Stage::Pending),
            Phase::FirstProgress | Phase::NodeStall => Some(Stage::Executing),
        };
        // Record first, then act: the committed (fenced) failure is the permission to
        // touch the backend, so a coordinator whose lease lapsed never interrupts a
        // prompt another coordinator now follows.
        self.fail(Failure::backend(error), true).await;
        if !self.fenced.load(std::sync::atomic::Ordering::Relaxed) {
            self.stop_on_backend(&pid, stage).await;
        }
    }

    /// Interrupt (running) or dequeue (pending) a prompt, without waiting for a result.
    async fn stop_on_backend(&self, prompt_id: &str, stage: Option<Stage>) {
        let Some(client) = &self.client else { return };
        if stage != Some(Stage::Executing) {
            let _ = client.delete_pending(&[prompt_id.to_owned()]).await;
        }
        if stage != Some(Stage::Pending) {
            let _ = client.interrupt(Some(prompt_id)).await;
        }
    }

    /// Record the attempt's failure (the engine marks the backend's health with it, see
    /// `Engine::settle_failure`). With `on_backend`, the prompt may still be there: drain
    /// it before the backend takes anything new.
    async fn fail(&mut self, failure: Failure, on_backend: bool) {
        let Some(cur) = &self.current else { return };
        if cur.draining.is_some() {
            self.end_attempt();
            return;
        }
        let (job_id, attempt) = (cur.a.job_id.clone(), cur.a.attempt);
        tracing::info!(backend = %self.name, job_id = %job_id, attempt, code = %failure.error.code, "attempt failed: {}", failure.error.message);
        self.apply(&job_id, Input::Failed { attempt, failure })
            .await;
        if self.fenced.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if on_backend {
            self.drain(Instant::now());
        } else {
            self.end_attempt();
        }
    }

    fn drain(&mut self, since: Instant) {
        if !self.swapped {
            self.evict_next = self.next.is_some();
            if let Some(b) = self.engine.backends().get_mut(&self.name) {
                b.accepts_next = false;
            }
        }
        let Some(cur) = &mut self.current else { return };
        cur.watch.disarm();
        cur.stopping = None;
        cur.draining = Some(Draining {
            since,
            next_poll: Instant::now(),
            stuck: false,
            behind: None,
        });
    }

    /// Is the prompt we gave up on gone from the backend's queue yet?
    async fn drain_check(&mut self) {
        let Some(client) = self.client.clone() else {
            self.end_attempt();
            return;
        };
        let Some(pid) = self.current.as_ref().map(|c| c.a.prompt_id.clone()) else {
            return;
        };
        let poll = self.drain_poll();
        let behind = self
            .current
            .as_ref()
            .and_then(|c| c.draining.as_ref())
            .and_then(|d| d.behind.clone());
        match client.queue().await {
            Ok(q) => {
                self.contact();
                let running = q.queue_running.iter().any(|i| i.prompt_id == pid);
                let pending = q.queue_pending.iter().any(|i| i.prompt_id == pid);
                // The prompt taken back from behind ours: stopped again while it is there.
                let behind_there = behind.as_ref().and_then(|b| {
                    if q.queue_running.iter().any(|i| &i.prompt_id == b) {
                        Some((b.clone(), Stage::Executing))
                    } else if q.queue_pending.iter().any(|i| &i.prompt_id == b) {
                        Some((b.clone(), Stage::Pending))
                    } else {
                        None
                    }
                });
                match &behind_there {
                    Some((b, stage)) => self.stop_on_backend(b, Some(*stage)).await,
                    None => {
                        if let Some(d) = self.current.as_mut().and_then(|c| c.draining.as_mut()) {
                            d.behind = None;
                        }
                    }
                }
                if !running && !pending && behind_there.is_none() {
                    match client.history_of(&pid).await {
                        Ok(Some(entry)) if entry.outcome() == Outcome::Success => {
                            self.succeed(files_of(&entry)).await;
                        }
                        Ok(_) => self.end_attempt(),
                        Err(_) => {
                            if let Some(d) = self.current.as_mut().and_then(|c| c.draining.as_mut())
                            {
                                d.next_poll = Instant::now() + poll;
                            }
                        }
                    }
                    return;
                }
                // Say it again: an interrupt sent while the prompt was still pending, or
                // lost on the way, does nothing.
                if running || pending {
                    let again = if running {
                        Stage::Executing
                    } else {
                        Stage::Pending
                    };
                    self.stop_on_backend(&pid, Some(again)).await;
                }
                // Still there after the grace: stuck (an unreachable backend is offline,
                // not stuck, so only a queue that answered says so).
                let grace = self.engine.config().cancel_grace;
                if let Some(d) = self.current.as_mut().and_then(|c| c.draining.as_mut()) {
                    if !d.stuck && Instant::now() >= d.since + grace {
                        d.stuck = true;
                        tracing::warn!(backend = %self.name, prompt_id = %pid, "the prompt gantry stopped is still on the backend: stuck");
                        self.engine.set_stuck(&self.name, Some(&pid));
                    }
                }
            }
            Err(e) => {
                tracing::debug!(backend = %self.name, error = %e, "drain: queue unavailable");
            }
        }
        if let Some(d) = self.current.as_mut().and_then(|c| c.draining.as_mut()) {
            d.next_poll = Instant::now() + poll;
        }
    }

    async fn apply(&self, job_id: &JobId, input: Input) -> Option<Applied> {
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

    /// The attempt is over for this backend: free it for the next job.
    fn end_attempt(&mut self) {
        let Some(cur) = self.current.take() else {
            return;
        };
        self.engine.forget_profile(&cur.a.job_id, cur.a.attempt);
        if cur.draining.as_ref().is_some_and(|d| d.stuck) {
            self.engine.set_stuck(&self.name, None);
        }
        if let Some(b) = self.engine.backends().get_mut(&self.name) {
            let this = |slot: &Option<(JobId, u32)>| {
                slot.as_ref()
                    .is_some_and(|(j, n)| *j == cur.a.job_id && *n == cur.a.attempt)
            };
            if this(&b.current) {
                b.current = None;
            }
            if this(&b.next) {
                b.next = None;
            }
            if !self.swapped {
                b.accepts_next = false;
                if b.current.is_none() {
                    b.current = b.next.take();
                }
            }
            b.last_used = now_ms();
            // The scheduler set them when it sent a prompt; this covers one it did not
            // send (adopted after a restart), unless another prompt follows.
            if b.current.is_none() {
                b.warm_models.clone_from(&cur.a.models);
            }
        }
        if !self.swapped {
            if let Some(next) = self.next.take() {
                self.current = Some(next);
                self.promoted = true;
            }
        }
        self.engine.wake_scheduler();
    }
}

/// Property tests of output names: whatever files a backend names, every output of a job
/// gets its own name, not empty, that its URL gives back. `PROPTEST_CASES` asks for more.
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

    fn output(name: String) -> Output {
        Output {
            name,
            node_id: String::new(),
            filename: String::new(),
            subfolder: String::new(),
            kind: "output".into(),
            sha256: String::new(),
            size: 0,
        }
    }

    /// Percent-decodes a path segment as the router does.
    fn decode(s: &str) -> Option<String> {
        let mut out = Vec::new();
        let mut bytes = s.bytes();
        while let Some(b) = bytes.next() {
            if b == b'%' {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            } else {
                out.push(b);
            }
        }
        String::from_utf8(out).ok()
    }

    proptest! {
        #![proptest_config(config(512))]

        #[test]
        fn every_output_of_a_job_has_its_own_reachable_name(
            files in prop::collection::vec(
                (
                    prop::sample::select(vec!["9", "10", "9-a.png", ""]),
                    prop_oneof![
                        prop::sample::select(vec!["a.png", "9-a.png", "", "10-a.png", "9-2-a.png", "output"])
                            .prop_map(str::to_owned),
                        "\\PC{0,8}",
                    ],
                ),
                0..12,
            ),
        ) {
            let mut outputs: Vec<Output> = Vec::new();
            for (node, filename) in &files {
                let name = output_name(&outputs, node, filename);
                prop_assert!(!name.is_empty());
                prop_assert!(outputs.iter().all(|o| o.name != name), "{name} twice");
                let url = crate::outputs::url_segment(&name);
                prop_assert_eq!(decode(&url), Some(name.clone()));
                outputs.push(output(name));
            }
        }
    }

    /// Found by the property above: a third file of the same name from the same node
    /// took the second one's name, and an empty file name made an output no URL reached.
    #[test]
    fn a_third_file_of_one_name_and_an_empty_name_get_names_of_their_own() {
        let mut outputs = Vec::new();
        for (node, file) in [("9", "a.png"), ("9", "a.png"), ("9", "a.png"), ("3", "")] {
            outputs.push(output(output_name(&outputs, node, file)));
        }
        let names: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["a.png", "9-a.png", "9-2-a.png", "output"]);
    }
}
