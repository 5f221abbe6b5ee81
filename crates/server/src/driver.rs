//! One driver per backend: a task that keeps one WebSocket open (a fresh clientId per
//! connection, PROTOCOL.md pitfall 8), runs at most one attempt at a time on it, follows
//! that attempt by its prompt id, and reconciles with `/queue` and `/history` after the
//! submit, after every reconnect and whenever the backend has been quiet too long, so a
//! completion is never missed (DESIGN.md invariant 5).

use gantry_comfy::client::{Client, Session, SessionEvent, Submitted};
use gantry_comfy::rest::{FileRef, HistoryEntry, Outcome, PromptRequest};
use gantry_comfy::ws::ServerMessage;
use gantry_core::{
    Attempt, AttemptStatus, Exclusion, Failure, Input, Job, JobError, JobId, Output, Timeouts,
    Workflow,
};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::bus::{LiveEvent, LiveKind};
use crate::classify;
use crate::engine::{now_ms, Applied, Connection, Engine};

/// What the engine asks of a driver.
#[derive(Debug)]
pub enum Command {
    /// Run this attempt (or, when `adopt` is set, find and follow one a previous process
    /// started).
    Run(Box<Assignment>),
    /// Stop an attempt on the backend. With `confirm`, the job waits for the backend to
    /// confirm (a cancel); without, the attempt is already over for gantry.
    Stop {
        job_id: JobId,
        attempt: u32,
        prompt_id: String,
        confirm: bool,
    },
}

/// One attempt, with what the driver needs to run and judge it.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub job_id: JobId,
    pub attempt: u32,
    pub prompt_id: String,
    pub workflow: Workflow,
    pub models: Vec<String>,
    pub timeouts: Timeouts,
    pub excluded: Vec<Exclusion>,
    pub adopt: bool,
    pub status: AttemptStatus,
}

impl Assignment {
    pub fn new(job: &Job, attempt: &Attempt, timeouts: Timeouts, adopt: bool) -> Assignment {
        Assignment {
            job_id: job.id.clone(),
            attempt: attempt.number,
            prompt_id: attempt.prompt_id.clone(),
            workflow: job.spec.workflow.clone(),
            models: job
                .spec
                .workflow
                .models()
                .into_iter()
                .map(|m| m.file)
                .collect(),
            timeouts,
            excluded: job.excluded.clone(),
            adopt,
            status: attempt.status,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Submitting,
    Pending,
    Executing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerKind {
    Start,
    Stall,
}

struct Stopping {
    confirm: bool,
    until: Instant,
}

/// The attempt in flight on this backend.
struct Current {
    a: Box<Assignment>,
    phase: Phase,
    node: Option<String>,
    /// The running node's last progress value, and its max.
    progress: Option<(f64, f64)>,
    timer: Option<(Instant, TimerKind, u64)>,
    stopping: Option<Stopping>,
    success_seen: bool,
    /// Files named by `executed` messages, in case history is gone when we ask.
    executed_files: Vec<(String, FileRef)>,
}

struct Driver {
    engine: Engine,
    name: String,
    client: Option<Client>,
    session: Option<Session>,
    current: Option<Current>,
    reconnect_at: Instant,
    backoff: Duration,
    last_heard: Instant,
    /// Since when the socket has been down; an attempt in flight is failed when this
    /// lasts longer than the liveness limit.
    offline_since: Option<Instant>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub async fn run(engine: Engine, name: String, mut commands: mpsc::UnboundedReceiver<Command>) {
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
    let shutdown = engine.shutdown_token().clone();
    let mut d = Driver {
        engine,
        name,
        client,
        session: None,
        current: None,
        reconnect_at: Instant::now(),
        backoff: BACKOFF_MIN,
        last_heard: Instant::now(),
        offline_since: Some(Instant::now()),
    };
    loop {
        let wake = d.next_wake();
        tokio::select! {
            _ = shutdown.cancelled() => {
                if let Some(s) = d.session.take() {
                    s.close().await;
                }
                return;
            }
            cmd = commands.recv() => match cmd {
                Some(cmd) => d.on_command(cmd).await,
                None => return,
            },
            ev = next_event(&mut d.session) => d.on_event(ev).await,
            _ = tokio::time::sleep_until(wake) => d.on_wake().await,
        }
    }
}

async fn next_event(session: &mut Option<Session>) -> Option<SessionEvent> {
    match session {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

fn f64_of(n: &serde_json::Number) -> f64 {
    n.as_f64().unwrap_or_default()
}

/// Every file reference in a history entry's UI outputs, with the node that wrote it.
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

    fn next_wake(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut wake = far;
        if self.session.is_none() && self.client.is_some() {
            wake = wake.min(self.reconnect_at);
        }
        if let Some(cur) = &self.current {
            if let Some((at, ..)) = cur.timer {
                wake = wake.min(at);
            }
            if let Some(s) = &cur.stopping {
                wake = wake.min(s.until);
            }
            if self.session.is_some() {
                wake = wake.min(self.last_heard + self.liveness());
            }
            if let Some(since) = self.offline_since {
                wake = wake.min(since + self.liveness());
            }
        }
        wake
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
            }
        }
    }

    fn heard(&mut self) {
        self.last_heard = Instant::now();
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
        let Some(cur) = &self.current else { return };
        if cur.stopping.as_ref().is_some_and(|s| now >= s.until) {
            self.stop_grace_passed().await;
            return;
        }
        if let Some(since) = self.offline_since.filter(|s| now >= *s + self.liveness()) {
            let failure = Failure::backend(JobError::new(
                "backend_unreachable",
                format!(
                    "lost contact with {} for {} ms while the prompt was in flight",
                    self.name,
                    now.duration_since(since).as_millis()
                ),
            ));
            self.fail(failure).await;
            return;
        }
        if let Some((at, kind, limit)) = cur.timer {
            if now >= at {
                self.timed_out(kind, limit).await;
                return;
            }
        }
        if self.session.is_some() && now >= self.last_heard + self.liveness() {
            // Quiet for too long: ask, rather than trust the socket (pitfalls 7 and 8).
            self.last_heard = now;
            self.reconcile().await;
        }
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
                if let Some(b) = self.engine.backends().get_mut(&self.name) {
                    b.classes = Some(Arc::new(classes));
                    b.last_error = None;
                }
                tracing::info!(backend = %self.name, client_id = session.client_id(), "connected");
                self.session = Some(session);
                self.offline_since = None;
                self.backoff = BACKOFF_MIN;
                self.heard();
                self.set_connection(Connection::Connected, None);
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
                self.heard();
                self.on_message(m).await;
            }
            Some(SessionEvent::Binary(_)) | Some(SessionEvent::Malformed { .. }) => self.heard(),
            Some(SessionEvent::Closed { code, error }) => {
                let why = match (code, error) {
                    (_, Some(e)) => e,
                    (Some(code), None) => format!("closed with code {code}"),
                    (None, None) => "closed".to_owned(),
                };
                self.disconnected(why);
            }
            None => self.disconnected("the socket ended".to_owned()),
        }
    }

    fn disconnected(&mut self, why: String) {
        tracing::info!(backend = %self.name, reason = %why, "websocket lost");
        self.session = None;
        self.offline_since = Some(Instant::now());
        self.set_connection(Connection::Offline, Some(format!("websocket lost: {why}")));
        self.reconnect_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    async fn on_message(&mut self, m: ServerMessage) {
        let Some(cur) = &mut self.current else { return };
        if m.prompt_id() != Some(cur.a.prompt_id.as_str()) {
            return;
        }
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
                    cur.node = Some(node.clone());
                    cur.progress = None;
                    let (job_id, attempt) = (cur.a.job_id.clone(), cur.a.attempt);
                    self.arm(TimerKind::Stall);
                    self.engine.publish_live(LiveEvent {
                        job_id,
                        attempt,
                        backend: self.name.clone(),
                        kind: LiveKind::Node { node, class_type },
                    });
                }
                None => self.end_marker().await,
            },
            ServerMessage::Progress(p) => {
                let (value, max) = (f64_of(&p.value), f64_of(&p.max));
                let advanced = cur.node.as_deref() != Some(p.node.as_str())
                    || cur.progress.is_none_or(|(last, _)| value > last);
                cur.node = Some(p.node.clone());
                if advanced {
                    cur.progress = Some((value, max));
                }
                let (job_id, attempt) = (cur.a.job_id.clone(), cur.a.attempt);
                // A repeated value is not progress (DESIGN.md invariant 4).
                if advanced {
                    self.arm(TimerKind::Stall);
                }
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
            Command::Run(a) => {
                if let Some(cur) = &self.current {
                    tracing::error!(backend = %self.name, running = %cur.a.job_id, job_id = %a.job_id, "asked to run a second attempt");
                    let failure = Failure::backend(JobError::new(
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
                let phase = match a.status {
                    AttemptStatus::Pending => Phase::Pending,
                    AttemptStatus::Executing => Phase::Executing,
                    _ => Phase::Submitting,
                };
                let adopt = a.adopt;
                self.current = Some(Current {
                    a,
                    phase,
                    node: None,
                    progress: None,
                    timer: None,
                    stopping: None,
                    success_seen: false,
                    executed_files: Vec::new(),
                });
                if adopt {
                    match phase {
                        Phase::Executing => self.arm(TimerKind::Stall),
                        Phase::Pending | Phase::Submitting => self.arm(TimerKind::Start),
                    }
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
                let ours = self
                    .current
                    .as_ref()
                    .is_some_and(|c| c.a.job_id == job_id && c.a.attempt == attempt);
                if !ours {
                    self.stop_on_backend(&prompt_id, None).await;
                    return;
                }
                let grace = self.engine.config().cancel_grace;
                let Some(cur) = &mut self.current else { return };
                cur.stopping = Some(Stopping {
                    confirm,
                    until: Instant::now() + grace,
                });
                let phase = cur.phase;
                if !confirm {
                    // The attempt is already over for gantry.
                    self.stop_on_backend(&prompt_id, Some(phase)).await;
                    self.end_attempt();
                    return;
                }
                if self.session.is_some() {
                    match phase {
                        Phase::Submitting => {}
                        Phase::Pending => self.dequeue_for_cancel().await,
                        Phase::Executing => {
                            if let Some(client) = &self.client {
                                let _ = client.interrupt(Some(&prompt_id)).await;
                            }
                        }
                    }
                }
            }
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
            let failure = Failure::backend(JobError::new(
                "backend_offline",
                format!("{} is not connected", self.name),
            ));
            self.fail(failure).await;
            return;
        };
        let Some(cur) = &self.current else { return };
        let request = PromptRequest {
            prompt: cur.a.workflow.graph().clone(),
            client_id: Some(session.client_id().to_owned()),
            prompt_id: Some(cur.a.prompt_id.clone()),
            ..Default::default()
        };
        let limit = cur.a.timeouts.submit_ms.unwrap_or(0);
        let answer = if limit > 0 {
            tokio::time::timeout(Duration::from_millis(limit), client.submit(&request))
                .await
                .map_err(|_| {
                    format!(
                        "{} did not answer POST /prompt within {limit} ms",
                        self.name
                    )
                })
        } else {
            Ok(client.submit(&request).await)
        };
        let pid = cur.a.prompt_id.clone();
        match answer {
            Ok(Ok(Submitted::Accepted(accepted))) if accepted.node_errors.is_empty() => {
                let Some(cur) = &mut self.current else { return };
                let (job_id, attempt) = (cur.a.job_id.clone(), cur.a.attempt);
                if cur.phase == Phase::Submitting {
                    cur.phase = Phase::Pending;
                    self.arm(TimerKind::Start);
                }
                self.apply(&job_id, Input::Submitted { attempt }).await;
                // A cached prompt can finish before its answer is read (pitfall 3).
                self.reconcile().await;
            }
            Ok(Ok(answer)) => {
                let (error, node_errors) = match &answer {
                    Submitted::Accepted(partial) => {
                        // A partial run is a rejection: take what was queued back off.
                        self.stop_on_backend(&pid, None).await;
                        (None, &partial.node_errors)
                    }
                    Submitted::Rejected(rejected) => (Some(&rejected.error), &rejected.node_errors),
                };
                let classes = self.classes();
                let Some(cur) = &self.current else { return };
                let failure = classify::rejection(
                    &cur.a.workflow,
                    &self.name,
                    classes.as_deref(),
                    error,
                    node_errors,
                );
                self.fail(failure).await;
            }
            Ok(Err(e)) => {
                // It may have landed anyway: make sure it does not run unwatched.
                self.stop_on_backend(&pid, None).await;
                self.fail(Failure::backend(JobError::new(
                    "submit_failed",
                    format!("submit to {} failed: {e}", self.name),
                )))
                .await;
            }
            Err(message) => {
                self.stop_on_backend(&pid, None).await;
                let failure = Failure::backend(JobError::new("timeout", message).with_details(
                    json!({"phase": "submit", "limit_ms": limit, "backend": self.name}),
                ));
                self.fail(failure).await;
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
        let Some(pid) = self.current.as_ref().map(|c| c.a.prompt_id.clone()) else {
            return;
        };
        let queue = match client.queue().await {
            Ok(q) => q,
            Err(e) => {
                tracing::debug!(backend = %self.name, error = %e, "reconcile: queue unavailable");
                return;
            }
        };
        if queue.queue_running.iter().any(|i| i.prompt_id == pid) {
            self.started().await;
            return;
        }
        if queue.queue_pending.iter().any(|i| i.prompt_id == pid) {
            let Some(cur) = &mut self.current else { return };
            if cur.phase == Phase::Submitting {
                cur.phase = Phase::Pending;
                let (job_id, attempt) = (cur.a.job_id.clone(), cur.a.attempt);
                self.arm(TimerKind::Start);
                self.apply(&job_id, Input::Submitted { attempt }).await;
            }
            return;
        }
        match client.history_of(&pid).await {
            Ok(Some(entry)) => self.finish_from_history(entry).await,
            Ok(None) => {
                let stopping = self
                    .current
                    .as_ref()
                    .and_then(|c| c.stopping.as_ref().map(|s| s.confirm));
                if stopping == Some(true) {
                    self.cancel_confirmed().await;
                    return;
                }
                let failure = Failure::backend(JobError::new(
                    "prompt_lost",
                    format!(
                        "prompt {pid} vanished from {}: in neither its queue nor its history",
                        self.name
                    ),
                ));
                self.fail(failure).await;
            }
            Err(e) => {
                tracing::debug!(backend = %self.name, error = %e, "reconcile: history unavailable")
            }
        }
    }

    async fn started(&mut self) {
        let Some(cur) = &mut self.current else { return };
        if cur.phase == Phase::Executing {
            return;
        }
        cur.phase = Phase::Executing;
        let (job_id, attempt) = (cur.a.job_id.clone(), cur.a.attempt);
        self.arm(TimerKind::Stall);
        self.apply(&job_id, Input::Started { attempt }).await;
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
                // Otherwise the next liveness poll reconciles.
            }
        }
    }

    async fn finish_from_history(&mut self, entry: HistoryEntry) {
        match entry.outcome() {
            Outcome::Success => self.succeed(files_of(&entry)).await,
            Outcome::Interrupted => self.interrupted().await,
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

    async fn succeed(&mut self, files: Vec<(String, FileRef)>) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let mut outputs: Vec<Output> = Vec::new();
        for (node, file) in files {
            let bytes = match client.view(&file).await {
                Ok(b) => b,
                Err(e) => {
                    let failure = Failure::backend(JobError::new(
                        "output_unavailable",
                        format!(
                            "cannot download output {} of node {node} from {}: {e}",
                            file.filename, self.name
                        ),
                    ));
                    self.fail(failure).await;
                    return;
                }
            };
            let sha256 = match self.engine.outputs().put(&bytes).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(error = %e, "cannot store an output file");
                    let failure = Failure::backend(JobError::new(
                        "output_unstored",
                        format!("cannot store output {}: {e}", file.filename),
                    ));
                    self.fail(failure).await;
                    return;
                }
            };
            let mut name = file.filename.clone();
            if outputs.iter().any(|o| o.name == name) {
                name = format!("{node}-{name}");
            }
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
        self.apply(&job_id, Input::Succeeded { attempt, outputs })
            .await;
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
        self.fail(failure).await;
    }

    async fn interrupted(&mut self) {
        let Some(cur) = &self.current else { return };
        match cur.stopping.as_ref().map(|s| s.confirm) {
            Some(true) => self.cancel_confirmed().await,
            Some(false) => self.end_attempt(),
            None => {
                let failure = Failure::backend(JobError::new(
                    "interrupted",
                    format!("the prompt was interrupted on {}, not by gantry", self.name),
                ));
                self.fail(failure).await;
            }
        }
    }

    async fn cancel_confirmed(&mut self) {
        let Some(cur) = &self.current else { return };
        let (job_id, attempt) = (cur.a.job_id.clone(), cur.a.attempt);
        self.apply(&job_id, Input::CancelConfirmed { attempt })
            .await;
        self.end_attempt();
    }

    async fn stop_grace_passed(&mut self) {
        let Some(cur) = &self.current else { return };
        tracing::warn!(backend = %self.name, job_id = %cur.a.job_id, "the backend did not confirm the cancel in time");
        self.cancel_confirmed().await;
    }

    async fn timed_out(&mut self, kind: TimerKind, limit: u64) {
        let Some(cur) = &self.current else { return };
        let (message, phase) = match kind {
            TimerKind::Start => (
                format!(
                    "the prompt did not start within {limit} ms of being queued on {}",
                    self.name
                ),
                "start",
            ),
            TimerKind::Stall => {
                let node = cur.node.clone().unwrap_or_else(|| "?".into());
                let class = cur
                    .a
                    .workflow
                    .class_of(&node)
                    .unwrap_or("unknown")
                    .to_owned();
                let at = match cur.progress {
                    Some((v, m)) => format!(" at step {v}/{m}"),
                    None => String::new(),
                };
                (
                    format!(
                        "node {node} ({class}) made no progress for {limit} ms{at} on {}",
                        self.name
                    ),
                    "node_stall",
                )
            }
        };
        let pid = cur.a.prompt_id.clone();
        let current_phase = cur.phase;
        let node = cur.node.clone();
        let failure = Failure::backend(JobError::new("timeout", message).with_details(
            json!({"phase": phase, "limit_ms": limit, "backend": self.name, "node": node}),
        ));
        self.stop_on_backend(&pid, Some(current_phase)).await;
        self.fail(failure).await;
    }

    /// Interrupt (running) or dequeue (pending) a prompt, without waiting for a result.
    async fn stop_on_backend(&self, prompt_id: &str, phase: Option<Phase>) {
        let Some(client) = &self.client else { return };
        if phase != Some(Phase::Executing) {
            let _ = client.delete_pending(&[prompt_id.to_owned()]).await;
        }
        if phase != Some(Phase::Pending) {
            let _ = client.interrupt(Some(prompt_id)).await;
        }
    }

    /// Start the phase timer of `kind` from now (none when its limit is 0 or unset).
    fn arm(&mut self, kind: TimerKind) {
        let Some(cur) = &mut self.current else { return };
        let limit = match kind {
            TimerKind::Start => cur.a.timeouts.start_ms,
            TimerKind::Stall => cur.a.timeouts.node_stall_ms,
        };
        cur.timer = limit
            .filter(|ms| *ms > 0)
            .map(|ms| (Instant::now() + Duration::from_millis(ms), kind, ms));
    }

    async fn fail(&mut self, failure: Failure) {
        let Some(cur) = &self.current else { return };
        let (job_id, attempt) = (cur.a.job_id.clone(), cur.a.attempt);
        tracing::info!(backend = %self.name, job_id = %job_id, attempt, code = %failure.error.code, "attempt failed: {}", failure.error.message);
        self.apply(&job_id, Input::Failed { attempt, failure })
            .await;
        self.end_attempt();
    }

    async fn apply(&self, job_id: &JobId, input: Input) -> Option<Applied> {
        match self.engine.apply(job_id, input).await {
            Ok(applied) => Some(applied),
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
        if let Some(b) = self.engine.backends().get_mut(&self.name) {
            if b.current
                .as_ref()
                .is_some_and(|(j, n)| *j == cur.a.job_id && *n == cur.a.attempt)
            {
                b.current = None;
            }
            b.last_used = now_ms();
            for model in cur.a.models.iter().rev() {
                b.warm_models.retain(|m| m != model);
                b.warm_models.insert(0, model.clone());
            }
            b.warm_models.truncate(16);
        }
        self.engine.wake_scheduler();
    }
}
