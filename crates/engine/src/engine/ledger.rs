//! The only writer of jobs: `apply` (transition, conditional store write with its
//! events, publish, carry out effects), the submit, node history, progress, and what a
//! failed attempt does to its backend's health.

use super::{Applied, Engine, Error};
use gantry_core::health::HealthEvent;
use gantry_core::profile::{NodeStep, ProfileBuilder};
use gantry_core::{
    transition, Effect, EventKind, Input, Job, JobId, JobSpec, JobState, Millis, Refused, Workflow,
};
use gantry_store::{Created, Event, Fence};
use std::sync::Arc;
use std::time::Duration;

use crate::backend::protocol::Command;
use crate::bus::{BusEvent, LiveEvent, LiveKind};

pub use crate::clock::now_ms;

/// A failed attempt's mark on its backend's health, made once the failure is committed.
pub(crate) struct HealthChange {
    backend: String,
    /// The workflow shape to block there, if the failure was that workflow's own.
    block: Option<String>,
}

impl Engine {
    /// Record, in the profile of `job`'s attempt `attempt`, what its backend said;
    /// answers the node steps it made known (for `record_nodes`).
    pub fn observe(
        &self,
        job: &JobId,
        attempt: u32,
        f: impl FnOnce(&mut ProfileBuilder),
    ) -> Vec<NodeStep> {
        let mut profiles = self.lock_profiles();
        let profile = profiles.entry((job.clone(), attempt)).or_default();
        f(profile);
        profile.take_news()
    }

    /// Keep a running attempt's node steps in the job's history (so a client that
    /// subscribes late is told every node, in order) and publish them; a started node
    /// is also the job's current progress. Held while the store is unreachable, like a
    /// state change.
    pub async fn record_nodes(
        &self,
        job: &JobId,
        attempt: u32,
        backend: &str,
        workflow: &Workflow,
        steps: Vec<NodeStep>,
    ) {
        let class = |node: &str| workflow.class_of(node).unwrap_or_default().to_owned();
        let kinds: Vec<EventKind> = steps
            .into_iter()
            .map(|step| match step {
                NodeStep::Started(node) => EventKind::NodeStarted {
                    attempt,
                    backend: backend.to_owned(),
                    class_type: class(&node),
                    node,
                },
                NodeStep::Finished {
                    node,
                    duration_ms,
                    status,
                } => EventKind::NodeFinished {
                    attempt,
                    backend: backend.to_owned(),
                    class_type: class(&node),
                    node,
                    status,
                    duration_ms,
                },
                NodeStep::Cached(nodes) => EventKind::NodesCached {
                    attempt,
                    backend: backend.to_owned(),
                    nodes,
                },
            })
            .collect();
        for kind in &kinds {
            if let EventKind::NodeStarted {
                node, class_type, ..
            } = kind
            {
                self.note_progress(job, attempt, backend, |p| {
                    p.node = Some(node.clone());
                    p.class_type = Some(class_type.clone());
                    (p.value, p.max) = (None, None);
                });
            }
        }
        let mut wait = Duration::from_millis(100);
        loop {
            match self
                .inner
                .store
                .append_events(job, JobState::Running, now_ms(), &kinds)
                .await
            {
                Ok(events) => return self.publish_persisted(events),
                Err(e) if e.is_unavailable() => {
                    tracing::warn!(job_id = %job, error = %e, "store unreachable: holding node events");
                    tokio::select! {
                        _ = self.inner.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::warn!(job_id = %job, error = %e, "cannot record node events");
                    return;
                }
            }
        }
    }

    /// Forget an attempt's record (its driver let it go without an end being written
    /// here: a lost lease, a drain that outlived it).
    pub fn forget_profile(&self, job: &JobId, attempt: u32) {
        self.lock_profiles().remove(&(job.clone(), attempt));
    }

    /// Attach to each attempt that `applied` ends its profile, and to the job's terminal
    /// event the profile of the attempt that ended it. Answers the attempts whose
    /// records to drop once the write commits.
    pub(crate) fn attach_profiles(
        &self,
        before: &Job,
        applied: &mut gantry_core::Applied,
    ) -> Vec<u32> {
        let mut ended = Vec::new();
        {
            let profiles = self.lock_profiles();
            for a in applied.job.attempts.iter_mut() {
                let was_live = before
                    .attempts
                    .iter()
                    .any(|b| b.number == a.number && b.status.is_live());
                // A command runs no nodes: it has no profile.
                let command = before.spec.command.is_some();
                if was_live && !a.status.is_live() && a.profile.is_none() && !command {
                    let builder = profiles.get(&(before.id.clone(), a.number));
                    let profile = builder.cloned().unwrap_or_default();
                    a.profile = Some(Box::new(profile.finish(&before.spec.workflow, a)));
                    ended.push(a.number);
                }
            }
        }
        let last = applied
            .job
            .attempts
            .iter()
            .rev()
            .find(|a| ended.contains(&a.number))
            .or_else(|| applied.job.attempts.last())
            .and_then(|a| a.profile.clone());
        for e in applied.events.iter_mut() {
            match e {
                EventKind::Succeeded { profile, .. }
                | EventKind::Failed { profile, .. }
                | EventKind::Cancelled { profile, .. } => *profile = last.clone(),
                _ => {}
            }
        }
        ended
    }

    /// Commit a new job. The caller answers 202 only after this returns `New`.
    pub async fn submit(&self, spec: JobSpec, request_hash: &str) -> Result<Created, Error> {
        let job = Job::new(JobId::random(), spec, now_ms());
        let created = self.inner.store.create_job(&job, request_hash).await?;
        if let Created::New(event) = &created {
            self.queue().note(&job, &self.inner.config.timeouts);
            self.publish_persisted(vec![event.clone()]);
            self.wake_scheduler();
        }
        Ok(created)
    }

    /// As `apply`, holding `input` in memory while the store is unreachable and trying
    /// again with backoff until it is back (or the server stops): what a backend said
    /// about a running prompt is never dropped for want of a database. The scheduler
    /// and the API do not hold: they stop dispatching, and refuse with 503.
    pub async fn apply_held(&self, id: &JobId, input: Input) -> Result<Applied, Error> {
        let mut wait = Duration::from_millis(100);
        loop {
            match self.apply(id, input.clone()).await {
                Err(Error::Store(e)) if e.is_unavailable() => {
                    tracing::warn!(job_id = %id, input = input.name(), error = %e, "store unreachable: holding the change");
                    tokio::select! {
                        _ = self.inner.shutdown.cancelled() => return Err(Error::Store(e)),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    /// As `apply_held`, for a caller with nothing better to do with a refusal than say it:
    /// the write fails only when this coordinator lost the backend's lease (its next
    /// driver takes over), stops, or the job is gone, and each is logged with the input.
    pub async fn apply_or_log(&self, id: &JobId, input: Input) -> Option<Applied> {
        let name = input.name();
        match self.apply_held(id, input).await {
            Ok(applied) => Some(applied),
            Err(e) => {
                tracing::warn!(job_id = %id, input = name, error = %e, "cannot record a job change");
                None
            }
        }
    }

    /// Apply `input` to job `id`: recompute on a concurrent change, record late inputs.
    /// A queued job starts from the queue index's copy instead of reading its row; that
    /// is safe because the write is conditional on the version, and a refusal is decided
    /// on the stored row only.
    pub async fn apply(&self, id: &JobId, input: Input) -> Result<Applied, Error> {
        let mut cached = self.queue().hot(id);
        loop {
            let from_cache = cached.is_some();
            let job = self.current(id, cached.take()).await?;
            let now = now_ms();
            match transition(&job, input.clone(), now, &self.inner.policy) {
                Ok(mut applied) => {
                    let health = self.settle_failure(&job, &input, &mut applied, now);
                    let ended = self.attach_profiles(&job, &mut applied);
                    let stored = match self.fence(&job, &input) {
                        Some(fence) => {
                            self.inner
                                .store
                                .update_job_fenced(&applied.job, &applied.events, &fence)
                                .await
                        }
                        None => {
                            self.inner
                                .store
                                .update_job(&applied.job, &applied.events)
                                .await
                        }
                    };
                    match stored {
                        Ok(events) => {
                            if let Some(change) = health {
                                self.change_health(change, now);
                            }
                            return Ok(Applied::Changed(self.committed(applied, events, ended)));
                        }
                        // Someone wrote first: reread.
                        Err(gantry_store::Error::Conflict { .. }) => continue,
                        Err(e @ gantry_store::Error::Fenced { .. }) => {
                            tracing::warn!(job_id = %id, error = %e, "write refused by its fence");
                            if let Some(cluster) = &self.inner.cluster {
                                cluster
                                    .fenced_writes
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                cluster.check.notify_one();
                            }
                            return Err(e.into());
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(_) if from_cache => {
                    // Refuse only on the stored truth, never on a copy a concurrent
                    // writer may not have refreshed yet.
                    continue;
                }
                Err(refused) => {
                    // The stored job is the truth: an index entry it contradicts goes.
                    self.queue().note(&job, &self.inner.config.timeouts);
                    if let Refused::Late { attempt, .. } = &refused {
                        tracing::info!(job_id = %id, attempt, input = input.name(), "late input recorded");
                        let events = self
                            .inner
                            .store
                            .append_events(
                                &job.id,
                                job.state,
                                now,
                                &[EventKind::Late {
                                    attempt: *attempt,
                                    input: input.name().to_owned(),
                                }],
                            )
                            .await?;
                        self.publish_persisted(events);
                    }
                    return Ok(Applied::Refused(refused, Arc::unwrap_or_clone(job)));
                }
            }
        }
    }

    /// The job as a change starts from: the queue index's copy when there is one,
    /// the stored row otherwise.
    async fn current(&self, id: &JobId, hot: Option<Arc<Job>>) -> Result<Arc<Job>, Error> {
        match hot {
            Some(job) => Ok(job),
            None => Ok(Arc::new(
                self.inner
                    .store
                    .job(id)
                    .await?
                    .ok_or_else(|| Error::NotFound(id.clone()))?,
            )),
        }
    }

    /// What follows a committed change: node statistics, the profiles of ended attempts
    /// dropped, the queue index told, the events announced, webhooks, effects carried
    /// out. Answers the job as it now stands.
    fn committed(&self, applied: gantry_core::Applied, events: Vec<Event>, ended: Vec<u32>) -> Job {
        let id = &applied.job.id;
        self.sample_nodes(&applied.job, &ended);
        if !ended.is_empty() {
            let mut profiles = self.lock_profiles();
            for n in ended {
                profiles.remove(&(id.clone(), n));
            }
        }
        self.queue().note(&applied.job, &self.inner.config.timeouts);
        if applied.job.state != JobState::Running {
            self.lock_progress().remove(id);
        }
        self.publish_persisted(events);
        self.hooks_after(&applied.job, &applied.events);
        self.carry_out(&applied.job, applied.effects);
        if applied.job.state != JobState::Running {
            self.wake_scheduler();
        }
        applied.job
    }

    /// Inputs that arrived together about one attempt (an in-process backend's
    /// submitted, started and succeeded), applied in order and committed as one write:
    /// one row write and one event batch, each event with the state its change left the
    /// job in. Nothing is announced before that commit, as with `apply`. When any of
    /// them is refused, or is a failure (which settles the backend's health), each goes
    /// through `apply` on its own instead, which decides refusals on the stored row.
    pub async fn apply_steps(&self, id: &JobId, inputs: Vec<Input>) -> Result<Applied, Error> {
        let alone = inputs.len() < 2 || inputs.iter().any(|i| matches!(i, Input::Failed { .. }));
        if !alone {
            let hot = self.queue().hot(id);
            let job = self.current(id, hot).await?;
            let now = now_ms();
            let mut current = (*job).clone();
            let mut steps: Vec<(JobState, Vec<EventKind>)> = Vec::new();
            let mut effects = Vec::new();
            let mut ended = Vec::new();
            let mut refused = false;
            for input in &inputs {
                match transition(&current, input.clone(), now, &self.inner.policy) {
                    Ok(mut applied) => {
                        ended.extend(self.attach_profiles(&current, &mut applied));
                        effects.extend(applied.effects);
                        steps.push((applied.job.state, applied.events));
                        current = applied.job;
                    }
                    Err(_) => {
                        refused = true;
                        break;
                    }
                }
            }
            let fence = self.fence(&job, &inputs[0]);
            if !refused && fence.is_none() {
                // One write: one version past the row's.
                current.version = job.version + 1;
                match self
                    .inner
                    .store
                    .update_job_steps(&current, &steps, None)
                    .await
                {
                    Ok(stored) => {
                        let applied = gantry_core::Applied {
                            job: current,
                            events: steps.into_iter().flat_map(|(_, kinds)| kinds).collect(),
                            effects,
                        };
                        return Ok(Applied::Changed(self.committed(applied, stored, ended)));
                    }
                    // Someone wrote first: each on its own, from the stored row.
                    Err(gantry_store::Error::Conflict { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let mut last = None;
        for input in inputs {
            last = Some(self.apply(id, input).await?);
        }
        last.ok_or_else(|| Error::NotFound(id.clone()))
    }

    /// Tells the webhook deliverer about a job that just ended here, and keeps the set of
    /// running jobs whose callback wants progress.
    pub(crate) fn hooks_after(&self, job: &Job, events: &[EventKind]) {
        let Some((callback, _)) = crate::hooks::effective(job, &self.inner.config.callbacks) else {
            return;
        };
        let ended = events.iter().any(|k| {
            matches!(
                k,
                EventKind::Succeeded { .. }
                    | EventKind::Failed { .. }
                    | EventKind::Cancelled { .. }
            )
        });
        if job.state == JobState::Running && callback.wants("progress") {
            let mut hooks = self
                .inner
                .progress_hooks
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            hooks
                .entry(job.id.clone())
                .or_insert_with(|| Arc::new(callback.clone()));
        } else if job.state.is_terminal() {
            self.inner
                .progress_hooks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&job.id);
        }
        if ended && job.state.is_terminal() {
            let notice = crate::hooks::Notice::Ended(Arc::new(job.clone()));
            if self.inner.callbacks.send(notice).is_err() {
                // Only once the deliverer stopped (shutdown): the delivery is not lost,
                // `callbacks::resume` sends what was not delivered at the next start.
                tracing::debug!(job_id = %job.id, "webhook deliverer stopped; the callback is sent at the next start");
            }
        }
    }

    pub fn publish_live(&self, event: LiveEvent) {
        if let LiveKind::Progress { node, value, max } = &event.kind {
            let hook = self
                .inner
                .progress_hooks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&event.job_id)
                .cloned();
            if let Some(callback) = hook {
                let body = serde_json::json!({
                    "event": "progress",
                    "job_id": event.job_id.to_string(),
                    "attempt": event.attempt,
                    "backend": event.backend,
                    "node": node,
                    "value": value,
                    "max": max,
                });
                // Progress is a moment's news: with the deliverer stopped (shutdown) it
                // has no one to go to, and the next step says more.
                let _ = self.inner.callbacks.send(crate::hooks::Notice::Progress {
                    job_id: event.job_id.clone(),
                    callback,
                    body,
                });
            }
        }
        match &event.kind {
            LiveKind::Log { .. } => {}
            LiveKind::Progress { node, value, max } => {
                self.note_progress(&event.job_id, event.attempt, &event.backend, |p| {
                    if p.node.as_deref() != Some(node) {
                        p.node = Some(node.clone());
                        p.class_type = None;
                    }
                    (p.value, p.max) = (Some(*value), Some(*max));
                });
            }
        }
        self.inner
            .bus
            .publish(BusEvent::Live(Arc::new(crate::bus::Published::new(event))));
    }

    /// Change what the monitor shows of a running job's progress (`progress_of`).
    pub(crate) fn note_progress(
        &self,
        job: &JobId,
        attempt: u32,
        backend: &str,
        f: impl FnOnce(&mut gantry_api::Progress),
    ) {
        let mut progress = self.lock_progress();
        let p = progress
            .entry(job.clone())
            .or_insert_with(|| gantry_api::Progress {
                job_id: job.to_string(),
                attempt,
                backend: backend.to_owned(),
                node: None,
                class_type: None,
                value: None,
                max: None,
            });
        if p.attempt != attempt {
            p.attempt = attempt;
            backend.clone_into(&mut p.backend);
            (p.node, p.class_type, p.value, p.max) = (None, None, None, None);
        }
        f(p);
    }

    pub(crate) fn carry_out(&self, job: &Job, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::StopAttempt {
                    attempt,
                    backend,
                    prompt_id,
                } => {
                    // A cancel waits for the backend's confirmation; a superseded attempt
                    // (a late success won) is stopped and forgotten.
                    let confirm = job.state == JobState::Running && job.cancel_requested;
                    let backends = self.backends();
                    if let Some(b) = backends.get(&backend) {
                        b.tell(Command::Stop {
                            job_id: job.id.clone(),
                            attempt,
                            prompt_id,
                            confirm,
                        });
                    }
                }
            }
        }
    }

    /// Put committed events on the bus; with several coordinators the event tail does,
    /// in sequence order for every coordinator alike.
    pub(crate) fn publish_persisted(&self, events: Vec<Event>) {
        match &self.inner.cluster {
            Some(cluster) => cluster.wrote(&events),
            None => {
                for event in events {
                    self.inner.bus.publish(BusEvent::persisted(event));
                }
            }
        }
    }

    /// The proof of lease a write of `input` on `job` must carry, if any: dispatches
    /// and every input about an attempt are about that attempt's backend.
    pub(crate) fn fence(&self, job: &Job, input: &Input) -> Option<Fence> {
        let cluster = self.inner.cluster.as_ref()?;
        let attempt_backend = |n: u32| {
            job.attempts
                .get((n as usize).checked_sub(1)?)
                .map(|a| a.backend.clone())
        };
        let (backend, claim) = match input {
            Input::Dispatch { backend, .. } => (backend.clone(), true),
            Input::Submitted { attempt }
            | Input::Started { attempt }
            | Input::Succeeded { attempt, .. }
            | Input::Failed { attempt, .. }
            | Input::CancelConfirmed { attempt } => (attempt_backend(*attempt)?, false),
            Input::DeadlinePassed { .. } if job.state == JobState::Running => {
                (job.live_attempt()?.backend.clone(), false)
            }
            Input::DeadlinePassed { .. }
            | Input::Cancel
            | Input::QueueTimeout { .. }
            | Input::Unroutable { .. } => return None,
        };
        // A backend not leased here gets a token no lease has: the write is refused.
        let token = self
            .backends()
            .get(&backend)
            .and_then(|b| b.lease)
            .unwrap_or(-1);
        Some(Fence {
            backend,
            owner: cluster.id.clone(),
            token,
            claim,
        })
    }

    /// What a failed attempt does to its backend's health (`Failure::is_backends_fault`),
    /// settled with the transition that records the failure: the breaker counts it, and
    /// the workflow's own trouble there (`Failure::blocks_workflow`) blocks its shape on
    /// the backend, a `backend_blocked` event in the same commit. A retry is then told
    /// what routing says with that health (`settle_retry`): when it can really start,
    /// what it waits for, or that no backend can run it any more. Answers the health
    /// change to make once the commit succeeded.
    pub(crate) fn settle_failure(
        &self,
        job: &Job,
        input: &Input,
        applied: &mut gantry_core::Applied,
        now: Millis,
    ) -> Option<HealthChange> {
        let Input::Failed { attempt, failure } = input else {
            return None;
        };
        let backend = job
            .attempts
            .iter()
            .find(|a| a.number == *attempt)?
            .backend
            .clone();
        // A command runs on the agent, not in ComfyUI: its failures say nothing of
        // ComfyUI's health.
        let change =
            (failure.is_backends_fault() && job.spec.command.is_none()).then(|| HealthChange {
                backend: backend.clone(),
                block: failure
                    .blocks_workflow()
                    .then(|| job.spec.workflow.shape_hash()),
            });
        let health = change.as_ref().and_then(|c| {
            let mut health = self.backends().get(&c.backend)?.health.clone();
            let events = health.on_fault(c.block.as_deref(), now, &self.inner.config.health);
            for e in events {
                if let HealthEvent::BackendBlocked {
                    workflow_hash,
                    until,
                } = e
                {
                    // Right after the failure and its retry (which says it waits for
                    // the block), before a terminal event that must come last.
                    let at = applied
                        .events
                        .iter()
                        .rposition(|k| {
                            matches!(
                                k,
                                EventKind::AttemptFailed { .. } | EventKind::JobRetrying { .. }
                            )
                        })
                        .map_or(applied.events.len(), |i| i + 1);
                    applied.events.insert(
                        at,
                        EventKind::BackendBlocked {
                            backend: backend.clone(),
                            workflow_hash,
                            until,
                        },
                    );
                }
            }
            Some(health)
        });
        if applied.job.state == JobState::Queued {
            let outlook = self.outlook(
                &applied.job,
                Some((&job.id, *attempt)),
                health.as_ref().map(|h| (backend.as_str(), h)),
                now,
            );
            gantry_core::transition::settle_retry(applied, outlook, now);
        }
        change
    }

    /// Make a committed failure's health change (see `settle_failure`) and publish it.
    pub(crate) fn change_health(&self, change: HealthChange, now: Millis) {
        let events = match self.backends().get_mut(&change.backend) {
            Some(b) => b
                .health
                .on_fault(change.block.as_deref(), now, &self.inner.config.health),
            None => return,
        };
        if !events.is_empty() {
            self.wake_scheduler();
        }
        self.publish_health(&change.backend, events);
    }
}
