//! The job state machine: the one pure function through which every change to a job goes.
//!
//! `transition(job, input, now, policy)` answers the changed job, the events to persist
//! with it (in the same transaction) and the effects the engine must carry out, or says
//! why the input changes nothing. Inputs about an attempt carry its number, so an event
//! from an old attempt never moves a job that has moved on (DESIGN.md invariant 3).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::profile::{AttemptProfile, NodeStatus};
use crate::routing::{Outlook, WaitingFor};

use crate::job::{
    Attempt, AttemptStatus, CommandResult, Exclusion, ExclusionReason, Job, JobError, JobId,
    JobState, Millis, Output,
};

/// How retries are spaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            backoff_base_ms: 1_000,
            backoff_max_ms: 30_000,
        }
    }
}

impl Policy {
    /// The wait before try `n + 1` after `n` counted failures: base, 2 base, 4 base, ...
    pub fn backoff_ms(&self, n_failed: u32) -> u64 {
        let shift = n_failed.saturating_sub(1).min(20);
        self.backoff_base_ms
            .saturating_mul(1u64 << shift)
            .min(self.backoff_max_ms)
    }

    /// The backoff with "equal jitter" (half fixed, half spread), so jobs that failed
    /// together do not all come back at once. The spread comes from the job id and the
    /// attempt, not a random generator, so the same inputs give the same delay.
    pub fn retry_delay_ms(&self, job: &JobId, n_failed: u32) -> u64 {
        let full = self.backoff_ms(n_failed);
        let half = full / 2;
        if half == 0 {
            return full;
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in job.as_str().bytes().chain(n_failed.to_le_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        half + h % (full - half + 1)
    }
}

/// Whose fault a failed attempt was, which decides what happens next (ARCHITECTURE.md,
/// "Failure kinds", has the whole table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The workflow failed on this backend (a timeout of its own, out of memory, a node's
    /// exception not yet seen elsewhere): retry after a backoff, counting the attempt; the
    /// engine blocks this workflow shape on the backend for a cooldown.
    Backend,
    /// The backend itself failed, whatever it ran: it crashed or restarted (the prompt
    /// vanished), refused or reset the connection, went silent. Retry as soon as any
    /// backend is ready (the same one once it answers again), counting the attempt so a
    /// workflow that kills every backend still ends; it counts towards the backend's
    /// circuit breaker and blocks no workflow.
    Lost,
    /// The workflow's fault (validation, an exception that repeats): fail now.
    Workflow,
    /// The backend lacks something another backend may have: exclude it for this job and
    /// route elsewhere, without using up an attempt.
    Missing,
    /// Taken back before it ran because of another prompt (one gantry gave up on, ahead
    /// of it in the backend's queue): retry at once, without using up an attempt.
    Displaced,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub kind: FailureKind,
    pub error: JobError,
    /// Keep this job away from the attempt's backend from now on.
    pub exclude: Option<ExclusionReason>,
}

impl Failure {
    /// The workflow failed on this backend, with nothing to exclude: retry after a
    /// backoff, counting the attempt, and block the shape there for a while.
    pub fn backend(error: JobError) -> Failure {
        Failure {
            kind: FailureKind::Backend,
            error,
            exclude: None,
        }
    }

    /// The backend itself failed (crashed, unreachable, lost the prompt): retry on the
    /// first ready backend, counting the attempt; nothing is blocked.
    pub fn lost(error: JobError) -> Failure {
        Failure {
            kind: FailureKind::Lost,
            error,
            exclude: None,
        }
    }

    /// Whether the failure blocks the attempt's workflow shape on its backend: the
    /// workflow's own trouble there, unless it already keeps this job away from the
    /// backend by an exclusion (a node's exception may yet prove to be the workflow's,
    /// so it blocks no one else).
    pub fn blocks_workflow(&self) -> bool {
        self.kind == FailureKind::Backend && self.exclude.is_none()
    }

    /// Whether the failure counts towards the backend's circuit breaker.
    pub fn is_backends_fault(&self) -> bool {
        matches!(self.kind, FailureKind::Backend | FailureKind::Lost)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// The scheduler gives a queued job to a backend; gantry chose the prompt id.
    Dispatch {
        backend: String,
        prompt_id: String,
    },
    /// The backend accepted the prompt.
    Submitted {
        attempt: u32,
    },
    /// `execution_start` for the attempt's prompt.
    Started {
        attempt: u32,
    },
    Succeeded {
        attempt: u32,
        outputs: Vec<Output>,
        /// A command job's exit code and last lines.
        result: Option<CommandResult>,
    },
    Failed {
        attempt: u32,
        failure: Failure,
    },
    /// A client asked to cancel.
    Cancel,
    /// The backend confirmed the interrupt or the dequeue, or the cancel grace passed.
    CancelConfirmed {
        attempt: u32,
    },
    /// The job waited in `queued` longer than its queue timeout.
    QueueTimeout {
        limit_ms: u64,
    },
    /// No known backend could ever run the job.
    Unroutable {
        error: JobError,
    },
    /// The job is not terminal this long after it was accepted: whatever runs is
    /// stopped and the job fails, attempts left or not.
    DeadlinePassed {
        limit_ms: u64,
    },
}

impl Input {
    pub fn name(&self) -> &'static str {
        match self {
            Input::Dispatch { .. } => "dispatch",
            Input::Submitted { .. } => "submitted",
            Input::Started { .. } => "started",
            Input::Succeeded { .. } => "succeeded",
            Input::Failed { .. } => "failed",
            Input::Cancel => "cancel",
            Input::CancelConfirmed { .. } => "cancel_confirmed",
            Input::QueueTimeout { .. } => "queue_timeout",
            Input::Unroutable { .. } => "unroutable",
            Input::DeadlinePassed { .. } => "deadline_passed",
        }
    }

    pub fn attempt(&self) -> Option<u32> {
        match self {
            Input::Submitted { attempt }
            | Input::Started { attempt }
            | Input::Succeeded { attempt, .. }
            | Input::Failed { attempt, .. }
            | Input::CancelConfirmed { attempt } => Some(*attempt),
            Input::Dispatch { .. }
            | Input::Cancel
            | Input::QueueTimeout { .. }
            | Input::Unroutable { .. }
            | Input::DeadlinePassed { .. } => None,
        }
    }
}

/// What a state change records; persisted with a sequence number in the same
/// transaction as the change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    Queued {
        priority: i32,
    },
    Dispatched {
        attempt: u32,
        backend: String,
        prompt_id: String,
    },
    Submitted {
        attempt: u32,
        backend: String,
    },
    Started {
        attempt: u32,
        backend: String,
    },
    /// A node started running (ComfyUI's `executing`), as gantry heard it. Node events
    /// are history, like state changes: a client that subscribes late gets them all.
    NodeStarted {
        attempt: u32,
        backend: String,
        node: String,
        class_type: String,
    },
    /// A node ended (completed, failed or interrupted), `duration_ms` after it was heard
    /// starting.
    NodeFinished {
        attempt: u32,
        backend: String,
        node: String,
        class_type: String,
        status: NodeStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
    },
    /// These nodes' outputs come from ComfyUI's cache: they do not run.
    NodesCached {
        attempt: u32,
        backend: String,
        nodes: Vec<String>,
    },
    AttemptFailed {
        attempt: u32,
        backend: String,
        error: JobError,
        /// The job goes back to the queue.
        #[serde(alias = "retry")]
        will_retry: bool,
    },
    /// The attempt's failure blocked its backend for this workflow shape until `until`.
    BackendBlocked {
        backend: String,
        workflow_hash: String,
        until: Millis,
    },
    /// The job is queued again after a failed attempt. It cannot start before
    /// `not_before` (`delay_ms` from the failure): the end of its backoff, or later when
    /// a block or an open breaker with a known end holds every backend that could run it;
    /// `waiting_for` says what else it waits for (a backend to come back, to be free).
    JobRetrying {
        attempt: u32,
        delay_ms: u64,
        not_before: Millis,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        waiting_for: Option<WaitingFor>,
    },
    CancelRequested {
        attempt: Option<u32>,
    },
    Succeeded {
        attempt: u32,
        backend: String,
        /// A success that arrived after gantry had given up on that attempt.
        late: bool,
        /// The profile of the attempt that ended the job (set by the engine).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        profile: Option<Box<AttemptProfile>>,
    },
    Failed {
        error: JobError,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        profile: Option<Box<AttemptProfile>>,
    },
    Cancelled {
        attempt: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        profile: Option<Box<AttemptProfile>>,
    },
    /// An input about an old attempt or a finished job: kept, and changed nothing.
    Late {
        attempt: Option<u32>,
        input: String,
    },
}

impl EventKind {
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Queued { .. } => "queued",
            EventKind::Dispatched { .. } => "dispatched",
            EventKind::Submitted { .. } => "submitted",
            EventKind::Started { .. } => "started",
            EventKind::NodeStarted { .. } => "node_started",
            EventKind::NodeFinished { .. } => "node_finished",
            EventKind::NodesCached { .. } => "nodes_cached",
            EventKind::AttemptFailed { .. } => "attempt_failed",
            EventKind::JobRetrying { .. } => "job_retrying",
            EventKind::BackendBlocked { .. } => "backend_blocked",
            EventKind::CancelRequested { .. } => "cancel_requested",
            EventKind::Succeeded { .. } => "succeeded",
            EventKind::Failed { .. } => "failed",
            EventKind::Cancelled { .. } => "cancelled",
            EventKind::Late { .. } => "late",
        }
    }
}

/// Work for the engine that follows from a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Interrupt (if running) or dequeue (if pending) this attempt's prompt.
    StopAttempt {
        attempt: u32,
        backend: String,
        prompt_id: String,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    pub job: Job,
    pub events: Vec<EventKind>,
    pub effects: Vec<Effect>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// About an attempt that is not the job's live one, or a job already finished: the
    /// caller records it as a late event.
    #[error("{input} for attempt {attempt:?} is late: the job is {state} on attempt {current:?}")]
    Late {
        input: &'static str,
        attempt: Option<u32>,
        current: Option<u32>,
        state: JobState,
    },
    /// Already done (a second cancel, a repeated `started`).
    #[error("{input} changes nothing")]
    NoChange { input: &'static str },
    #[error("cannot {input} a {state} job")]
    NotAllowed {
        input: &'static str,
        state: JobState,
    },
}

/// Amend a transition that put a job back in the queue with what routing knows at
/// `now` (the engine asks it with the attempt's own backend counted free): a job no
/// backend can run any more fails now instead of announcing a retry that the next step
/// would fail for good, and a retry says when it can really start and what it waits for.
pub fn settle_retry(applied: &mut Applied, outlook: Outlook, now: Millis) {
    let Some(idx) = applied
        .events
        .iter()
        .position(|e| matches!(e, EventKind::JobRetrying { .. }))
    else {
        return;
    };
    match outlook {
        Outlook::Ready => {}
        Outlook::Wait(waiting) => {
            if let EventKind::JobRetrying {
                delay_ms,
                not_before,
                waiting_for,
                ..
            } = &mut applied.events[idx]
            {
                if let Some(until) = waiting.until {
                    *not_before = (*not_before).max(until);
                    *delay_ms = (*not_before - now).max(0) as u64;
                }
                *waiting_for = Some(waiting);
            }
        }
        Outlook::Never(error) => {
            applied.events.remove(idx);
            for e in &mut applied.events {
                if let EventKind::AttemptFailed { will_retry, .. } = e {
                    *will_retry = false;
                }
            }
            applied.job.state = JobState::Failed;
            applied.job.error = Some(error.clone());
            applied.events.push(EventKind::Failed {
                error,
                profile: None,
            });
        }
    }
}

/// Apply `input` to `job` at `now`.
pub fn transition(
    job: &Job,
    input: Input,
    now: Millis,
    policy: &Policy,
) -> Result<Applied, Refused> {
    let name = input.name();
    let mut next = job.clone();
    let mut events = Vec::new();
    let mut effects = Vec::new();
    let current = job.current_attempt().map(|a| a.number);
    let late = |attempt: Option<u32>| Refused::Late {
        input: name,
        attempt,
        current,
        state: job.state,
    };
    let not_allowed = Refused::NotAllowed {
        input: name,
        state: job.state,
    };

    match input {
        Input::Dispatch { backend, prompt_id } => {
            if job.state != JobState::Queued {
                return Err(not_allowed);
            }
            let number = job.attempts.len() as u32 + 1;
            next.attempts.push(Attempt {
                number,
                backend: backend.clone(),
                prompt_id: prompt_id.clone(),
                status: AttemptStatus::Submitting,
                created_at: now,
                submitted_at: None,
                started_at: None,
                finished_at: None,
                error: None,
                counted: true,
                profile: None,
            });
            next.state = JobState::Running;
            events.push(EventKind::Dispatched {
                attempt: number,
                backend,
                prompt_id,
            });
        }
        Input::Submitted { attempt } => {
            let a = live_attempt_mut(&mut next, attempt).ok_or_else(|| late(Some(attempt)))?;
            match a.status {
                AttemptStatus::Submitting => {
                    a.status = AttemptStatus::Pending;
                    a.submitted_at = Some(now);
                    events.push(EventKind::Submitted {
                        attempt,
                        backend: a.backend.clone(),
                    });
                }
                AttemptStatus::Pending | AttemptStatus::Executing => {
                    return Err(Refused::NoChange { input: name })
                }
                AttemptStatus::Succeeded | AttemptStatus::Failed | AttemptStatus::Cancelled => {
                    return Err(late(Some(attempt)))
                }
            }
        }
        Input::Started { attempt } => {
            let a = live_attempt_mut(&mut next, attempt).ok_or_else(|| late(Some(attempt)))?;
            match a.status {
                // The start can overtake the answer to the submit (they travel on
                // different connections).
                AttemptStatus::Submitting | AttemptStatus::Pending => {
                    a.submitted_at.get_or_insert(now);
                    a.status = AttemptStatus::Executing;
                    a.started_at = Some(now);
                    events.push(EventKind::Started {
                        attempt,
                        backend: a.backend.clone(),
                    });
                }
                AttemptStatus::Executing => return Err(Refused::NoChange { input: name }),
                AttemptStatus::Succeeded | AttemptStatus::Failed | AttemptStatus::Cancelled => {
                    return Err(late(Some(attempt)))
                }
            }
        }
        Input::Succeeded {
            attempt,
            outputs,
            result,
        } => {
            if job.state.is_terminal() {
                return Err(late(Some(attempt)));
            }
            let is_current = current == Some(attempt)
                && job.current_attempt().is_some_and(|a| a.status.is_live());
            let Some(idx) = next.attempts.iter().position(|a| a.number == attempt) else {
                return Err(late(Some(attempt)));
            };
            if !is_current {
                // First success wins: an earlier attempt that gantry gave up on finished
                // after all. Stop whatever attempt is live now.
                if let Some(live) = next.attempts.last_mut().filter(|a| a.status.is_live()) {
                    live.status = AttemptStatus::Cancelled;
                    live.finished_at = Some(now);
                    effects.push(Effect::StopAttempt {
                        attempt: live.number,
                        backend: live.backend.clone(),
                        prompt_id: live.prompt_id.clone(),
                    });
                }
            }
            let a = &mut next.attempts[idx];
            let given_up = a.error.take();
            a.status = AttemptStatus::Succeeded;
            a.finished_at = Some(now);
            let backend = a.backend.clone();
            // A prompt can end before gantry saw it accepted or started (a cached one, or
            // an end found by a reconcile): the stream still tells every step, in order.
            if is_current && a.submitted_at.is_none() {
                events.push(EventKind::Submitted {
                    attempt,
                    backend: backend.clone(),
                });
            }
            if is_current && a.started_at.is_none() {
                events.push(EventKind::Started {
                    attempt,
                    backend: backend.clone(),
                });
            }
            a.started_at.get_or_insert(now);
            a.submitted_at.get_or_insert(now);
            next.state = JobState::Succeeded;
            next.outputs = outputs;
            next.result = result;
            next.error = None;
            let mut notes = Vec::new();
            if let Some(error) = given_up {
                notes.push(format!(
                    "attempt {attempt} succeeded after gantry had given up on it ({})",
                    error.message
                ));
            }
            if job.cancel_requested {
                notes.push("the job succeeded before the cancel reached it".to_owned());
            }
            if !notes.is_empty() {
                next.note = Some(notes.join("; "));
            }
            events.push(EventKind::Succeeded {
                attempt,
                backend,
                late: !is_current,
                profile: None,
            });
        }
        Input::Failed { attempt, failure } => {
            if job.state != JobState::Running {
                return Err(late(Some(attempt)));
            }
            let cancel_requested = job.cancel_requested;
            let max_attempts = job.spec.max_attempts;
            let a = live_attempt_mut(&mut next, attempt).ok_or_else(|| late(Some(attempt)))?;
            a.status = AttemptStatus::Failed;
            a.finished_at = Some(now);
            a.error = Some(failure.error.clone());
            a.counted = matches!(
                failure.kind,
                FailureKind::Backend | FailureKind::Lost | FailureKind::Workflow
            );
            let backend = a.backend.clone();
            if let Some(reason) = failure.exclude {
                let exclusion = Exclusion {
                    backend: backend.clone(),
                    reason,
                };
                if !next.excluded.contains(&exclusion) {
                    next.excluded.push(exclusion);
                }
            }
            let used = next.attempts_used();
            let retry = !cancel_requested
                && match failure.kind {
                    FailureKind::Workflow => false,
                    FailureKind::Backend | FailureKind::Lost => used < max_attempts,
                    FailureKind::Missing | FailureKind::Displaced => true,
                };
            events.push(EventKind::AttemptFailed {
                attempt,
                backend,
                error: failure.error.clone(),
                will_retry: retry,
            });
            if cancel_requested {
                next.state = JobState::Cancelled;
                events.push(EventKind::Cancelled {
                    attempt: Some(attempt),
                    profile: None,
                });
            } else if retry {
                let delay_ms = match failure.kind {
                    // A lost backend is waited for by routing (it is offline until it
                    // answers again), not by a guess at how long that takes.
                    FailureKind::Missing | FailureKind::Displaced | FailureKind::Lost => 0,
                    FailureKind::Backend | FailureKind::Workflow => {
                        policy.retry_delay_ms(&job.id, used)
                    }
                };
                next.state = JobState::Queued;
                next.not_before = now + delay_ms as Millis;
                events.push(EventKind::JobRetrying {
                    attempt,
                    delay_ms,
                    not_before: next.not_before,
                    waiting_for: None,
                });
            } else {
                let mut error = failure.error;
                if matches!(failure.kind, FailureKind::Backend | FailureKind::Lost) {
                    error.message = format!(
                        "{} (gave up after {used} of {max_attempts} attempts)",
                        error.message
                    );
                }
                next.state = JobState::Failed;
                next.error = Some(error.clone());
                events.push(EventKind::Failed {
                    error,
                    profile: None,
                });
            }
        }
        Input::Cancel => match job.state {
            JobState::Queued => {
                next.cancel_requested = true;
                next.state = JobState::Cancelled;
                events.push(EventKind::Cancelled {
                    attempt: None,
                    profile: None,
                });
            }
            JobState::Running => {
                if job.cancel_requested {
                    return Err(Refused::NoChange { input: name });
                }
                next.cancel_requested = true;
                let live = job.live_attempt();
                if let Some(a) = live {
                    effects.push(Effect::StopAttempt {
                        attempt: a.number,
                        backend: a.backend.clone(),
                        prompt_id: a.prompt_id.clone(),
                    });
                }
                events.push(EventKind::CancelRequested {
                    attempt: live.map(|a| a.number),
                });
            }
            JobState::Succeeded | JobState::Failed | JobState::Cancelled => {
                return Err(not_allowed)
            }
        },
        Input::CancelConfirmed { attempt } => {
            if job.state != JobState::Running || !job.cancel_requested {
                return Err(late(Some(attempt)));
            }
            let a = live_attempt_mut(&mut next, attempt).ok_or_else(|| late(Some(attempt)))?;
            a.status = AttemptStatus::Cancelled;
            a.finished_at = Some(now);
            next.state = JobState::Cancelled;
            events.push(EventKind::Cancelled {
                attempt: Some(attempt),
                profile: None,
            });
        }
        Input::QueueTimeout { limit_ms } => {
            if job.state != JobState::Queued {
                return Err(not_allowed);
            }
            let error = JobError::new(
                "queue_timeout",
                format!("the job waited in the queue longer than its limit of {limit_ms} ms"),
            )
            .with_details(serde_json::json!({ "limit_ms": limit_ms }));
            next.state = JobState::Failed;
            next.error = Some(error.clone());
            events.push(EventKind::Failed {
                error,
                profile: None,
            });
        }
        Input::Unroutable { error } => {
            if job.state != JobState::Queued {
                return Err(not_allowed);
            }
            next.state = JobState::Failed;
            next.error = Some(error.clone());
            events.push(EventKind::Failed {
                error,
                profile: None,
            });
        }
        Input::DeadlinePassed { limit_ms } => {
            if job.state.is_terminal() {
                return Err(not_allowed);
            }
            let mut error = JobError::new(
                "deadline",
                format!("the job did not finish within its deadline of {limit_ms} ms"),
            )
            .with_details(serde_json::json!({ "limit_ms": limit_ms }));
            if let Some(live) = next.attempts.last_mut().filter(|a| a.status.is_live()) {
                error.message = format!(
                    "{} (attempt {} was {} on {})",
                    error.message,
                    live.number,
                    live.status.as_str(),
                    live.backend
                );
                live.status = AttemptStatus::Failed;
                live.finished_at = Some(now);
                live.error = Some(error.clone());
                effects.push(Effect::StopAttempt {
                    attempt: live.number,
                    backend: live.backend.clone(),
                    prompt_id: live.prompt_id.clone(),
                });
                events.push(EventKind::AttemptFailed {
                    attempt: live.number,
                    backend: live.backend.clone(),
                    error: error.clone(),
                    will_retry: false,
                });
            }
            next.state = JobState::Failed;
            next.error = Some(error.clone());
            events.push(EventKind::Failed {
                error,
                profile: None,
            });
        }
    }

    next.version = job.version + 1;
    next.updated_at = now;
    Ok(Applied {
        job: next,
        events,
        effects,
    })
}

fn live_attempt_mut(job: &mut Job, number: u32) -> Option<&mut Attempt> {
    if job.state != JobState::Running {
        return None;
    }
    job.attempts
        .last_mut()
        .filter(|a| a.number == number && a.status.is_live())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobId, JobSpec, Timeouts};
    use crate::workflow::Workflow;

    fn job(max_attempts: u32) -> Job {
        let workflow = Workflow::parse(&serde_json::json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}}
        }))
        .unwrap();
        Job::new(
            JobId::random(),
            JobSpec {
                workflow,
                priority: 0,
                max_attempts,
                tags: vec![],
                timeouts: Timeouts::default(),
                idempotency_key: None,
                metadata: Default::default(),
                owner: None,
                attachments: Vec::new(),
                callback: None,
                command: None,
            },
            0,
        )
    }

    fn apply(job: &Job, input: Input) -> Job {
        transition(job, input, 10, &Policy::default()).unwrap().job
    }

    fn dispatch(job: &Job, backend: &str) -> Job {
        apply(
            job,
            Input::Dispatch {
                backend: backend.into(),
                prompt_id: format!("p-{backend}-{}", job.attempts.len() + 1),
            },
        )
    }

    fn fail(kind: FailureKind) -> Failure {
        Failure {
            kind,
            error: JobError::new("x", "boom"),
            exclude: None,
        }
    }

    /// One line per step: the state, the current attempt and its status.
    fn trace(job: &Job) -> String {
        match job.current_attempt() {
            Some(a) => format!(
                "{} #{} {:?} v{}",
                job.state, a.number, a.status, job.version
            ),
            None => format!("{} v{}", job.state, job.version),
        }
    }

    #[test]
    fn happy_path() {
        let j = job(3);
        let j1 = dispatch(&j, "a");
        let j2 = apply(&j1, Input::Submitted { attempt: 1 });
        let j3 = apply(&j2, Input::Started { attempt: 1 });
        let j4 = apply(
            &j3,
            Input::Succeeded {
                attempt: 1,
                outputs: vec![],
                result: None,
            },
        );
        let got: Vec<String> = [&j, &j1, &j2, &j3, &j4].iter().map(|j| trace(j)).collect();
        assert_eq!(
            got,
            [
                "queued v1",
                "running #1 Submitting v2",
                "running #1 Pending v3",
                "running #1 Executing v4",
                "succeeded #1 Succeeded v5"
            ]
        );
    }

    #[test]
    fn a_success_seen_before_the_start_still_tells_every_step() {
        let j = apply(&dispatch(&job(1), "a"), Input::Submitted { attempt: 1 });
        let applied = transition(
            &j,
            Input::Succeeded {
                attempt: 1,
                outputs: vec![],
                result: None,
            },
            10,
            &Policy::default(),
        )
        .unwrap();
        let names: Vec<&str> = applied.events.iter().map(EventKind::name).collect();
        assert_eq!(names, ["started", "succeeded"]);
        let a = applied.job.current_attempt().unwrap();
        assert_eq!((a.submitted_at, a.started_at), (Some(10), Some(10)));
    }

    #[test]
    fn a_displaced_attempt_is_retried_at_once_and_not_counted() {
        let j = apply(&dispatch(&job(1), "a"), Input::Submitted { attempt: 1 });
        let j = apply(
            &j,
            Input::Failed {
                attempt: 1,
                failure: fail(FailureKind::Displaced),
            },
        );
        assert_eq!(j.state, JobState::Queued, "one attempt allowed, none used");
        assert_eq!(j.not_before, 10, "no backoff");
        assert!(!j.attempts[0].counted);
        assert!(j.excluded.is_empty(), "the backend is not excluded");
    }

    #[test]
    fn start_may_overtake_the_submit_answer() {
        let j = dispatch(&job(1), "a");
        let j = apply(&j, Input::Started { attempt: 1 });
        assert_eq!(trace(&j), "running #1 Executing v3");
        let again = transition(&j, Input::Submitted { attempt: 1 }, 10, &Policy::default());
        assert_eq!(again, Err(Refused::NoChange { input: "submitted" }));
    }

    #[test]
    fn backend_failures_retry_until_attempts_run_out() {
        let j = dispatch(&job(2), "a");
        let applied = transition(
            &j,
            Input::Failed {
                attempt: 1,
                failure: fail(FailureKind::Backend),
            },
            100,
            &Policy::default(),
        )
        .unwrap();
        assert_eq!(applied.job.state, JobState::Queued);
        // Equal jitter: between half and all of the 1 s base backoff.
        let delay = applied.job.not_before - 100;
        assert!((500..=1_000).contains(&delay), "{delay}");
        assert_eq!(
            applied.events.last(),
            Some(&EventKind::JobRetrying {
                attempt: 1,
                delay_ms: delay as u64,
                not_before: applied.job.not_before,
                waiting_for: None,
            })
        );
        let j = dispatch(&applied.job, "b");
        let j = apply(
            &j,
            Input::Failed {
                attempt: 2,
                failure: fail(FailureKind::Backend),
            },
        );
        assert_eq!(j.state, JobState::Failed);
        let error = j.error.unwrap();
        assert_eq!(error.message, "boom (gave up after 2 of 2 attempts)");
    }

    #[test]
    fn retry_delays_are_jittered_per_job_and_grow() {
        let p = Policy::default();
        let delays: Vec<u64> = (0..50)
            .map(|_| p.retry_delay_ms(&JobId::random(), 1))
            .collect();
        assert!(delays.iter().all(|d| (500..=1_000).contains(d)));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 10, "spread out: {delays:?}");
        let id = JobId::random();
        assert_eq!(p.retry_delay_ms(&id, 3), p.retry_delay_ms(&id, 3));
        assert!((2_000..=4_000).contains(&p.retry_delay_ms(&id, 3)));
        assert!(p.retry_delay_ms(&id, 30) <= 30_000);
    }

    #[test]
    fn a_deadline_fails_the_job_and_stops_its_attempt() {
        let j = dispatch(&job(3), "a");
        let j = apply(&j, Input::Started { attempt: 1 });
        let applied = transition(
            &j,
            Input::DeadlinePassed { limit_ms: 60_000 },
            70,
            &Policy::default(),
        )
        .unwrap();
        assert_eq!(applied.job.state, JobState::Failed);
        let error = applied.job.error.clone().unwrap();
        assert_eq!(error.code, "deadline");
        assert_eq!(
            error.message,
            "the job did not finish within its deadline of 60000 ms (attempt 1 was executing on a)"
        );
        assert_eq!(applied.job.attempts[0].status, AttemptStatus::Failed);
        assert_eq!(applied.effects.len(), 1);
        // A success that arrives after that is late: the job stays failed.
        let late = transition(
            &applied.job,
            Input::Succeeded {
                attempt: 1,
                outputs: vec![],
                result: None,
            },
            80,
            &Policy::default(),
        );
        assert!(matches!(late, Err(Refused::Late { .. })), "{late:?}");
        // A queued job fails the same way, with nothing to stop.
        let queued = transition(
            &job(1),
            Input::DeadlinePassed { limit_ms: 5 },
            9,
            &Policy::default(),
        )
        .unwrap();
        assert_eq!(queued.job.state, JobState::Failed);
        assert!(queued.effects.is_empty());
    }

    #[test]
    fn workflow_failures_do_not_retry() {
        let j = dispatch(&job(3), "a");
        let j = apply(
            &j,
            Input::Failed {
                attempt: 1,
                failure: fail(FailureKind::Workflow),
            },
        );
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.error.unwrap().message, "boom");
    }

    #[test]
    fn missing_capability_excludes_the_backend_and_costs_no_attempt() {
        let j = dispatch(&job(1), "a");
        let j = apply(
            &j,
            Input::Failed {
                attempt: 1,
                failure: Failure {
                    kind: FailureKind::Missing,
                    error: JobError::new("missing_model", "no model"),
                    exclude: Some(ExclusionReason::MissingModel {
                        node: "4".into(),
                        input: "ckpt_name".into(),
                        value: "x.safetensors".into(),
                    }),
                },
            },
        );
        assert_eq!(j.state, JobState::Queued);
        assert_eq!(j.not_before, 10, "no backoff for a missing model");
        assert!(j.is_excluded("a"));
        assert!(!j.is_excluded("b"));
        assert_eq!(j.attempts_used(), 0);
    }

    #[test]
    fn late_inputs_about_an_old_attempt_change_nothing() {
        let j = dispatch(&job(3), "a");
        let j = apply(
            &j,
            Input::Failed {
                attempt: 1,
                failure: fail(FailureKind::Backend),
            },
        );
        let j = dispatch(&j, "b");
        for input in [
            Input::Started { attempt: 1 },
            Input::Submitted { attempt: 1 },
            Input::Failed {
                attempt: 1,
                failure: fail(FailureKind::Backend),
            },
            Input::CancelConfirmed { attempt: 1 },
        ] {
            let refused = transition(&j, input, 20, &Policy::default()).unwrap_err();
            assert!(
                matches!(
                    refused,
                    Refused::Late {
                        attempt: Some(1),
                        current: Some(2),
                        ..
                    }
                ),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn a_late_success_is_adopted_and_stops_the_live_attempt() {
        let j = dispatch(&job(3), "a");
        let j = apply(
            &j,
            Input::Failed {
                attempt: 1,
                failure: fail(FailureKind::Backend),
            },
        );
        let j = dispatch(&j, "b");
        let applied = transition(
            &j,
            Input::Succeeded {
                attempt: 1,
                outputs: vec![],
                result: None,
            },
            30,
            &Policy::default(),
        )
        .unwrap();
        assert_eq!(applied.job.state, JobState::Succeeded);
        assert_eq!(applied.job.attempts[0].status, AttemptStatus::Succeeded);
        assert_eq!(
            applied.job.attempts[0].error, None,
            "a succeeded attempt has no error"
        );
        assert_eq!(
            applied.job.note.as_deref(),
            Some("attempt 1 succeeded after gantry had given up on it (boom)")
        );
        assert_eq!(applied.job.attempts[1].status, AttemptStatus::Cancelled);
        assert_eq!(
            applied.effects,
            [Effect::StopAttempt {
                attempt: 2,
                backend: "b".into(),
                prompt_id: "p-b-2".into()
            }]
        );
        assert!(matches!(
            applied.events[0],
            EventKind::Succeeded { late: true, .. }
        ));
        // A second success (the other attempt finishing too) is late: one terminal state.
        let second = transition(
            &applied.job,
            Input::Succeeded {
                attempt: 2,
                outputs: vec![],
                result: None,
            },
            40,
            &Policy::default(),
        );
        assert!(matches!(second, Err(Refused::Late { .. })));
    }

    #[test]
    fn cancel_queued_is_immediate_and_running_waits_for_the_backend() {
        let queued = apply(&job(3), Input::Cancel);
        assert_eq!(queued.state, JobState::Cancelled);

        let running = dispatch(&job(3), "a");
        let applied = transition(&running, Input::Cancel, 10, &Policy::default()).unwrap();
        assert_eq!(applied.job.state, JobState::Running);
        assert!(applied.job.cancel_requested);
        assert_eq!(applied.effects.len(), 1);
        let again = transition(&applied.job, Input::Cancel, 11, &Policy::default());
        assert_eq!(again, Err(Refused::NoChange { input: "cancel" }));
        let done = apply(&applied.job, Input::CancelConfirmed { attempt: 1 });
        assert_eq!(trace(&done), "cancelled #1 Cancelled v4");
        let terminal = transition(&done, Input::Cancel, 12, &Policy::default());
        assert_eq!(
            terminal,
            Err(Refused::NotAllowed {
                input: "cancel",
                state: JobState::Cancelled
            })
        );
    }

    #[test]
    fn a_failure_after_cancel_cancels_and_a_success_wins_with_a_note() {
        let running = apply(&dispatch(&job(3), "a"), Input::Cancel);
        let failed = apply(
            &running,
            Input::Failed {
                attempt: 1,
                failure: fail(FailureKind::Backend),
            },
        );
        assert_eq!(failed.state, JobState::Cancelled);
        let succeeded = apply(
            &running,
            Input::Succeeded {
                attempt: 1,
                outputs: vec![],
                result: None,
            },
        );
        assert_eq!(succeeded.state, JobState::Succeeded);
        assert!(succeeded.note.is_some());
    }

    #[test]
    fn only_queued_jobs_dispatch_time_out_or_become_unroutable() {
        let running = dispatch(&job(3), "a");
        for input in [
            Input::Dispatch {
                backend: "b".into(),
                prompt_id: "p".into(),
            },
            Input::QueueTimeout { limit_ms: 5 },
            Input::Unroutable {
                error: JobError::new("unroutable", "none"),
            },
        ] {
            assert!(matches!(
                transition(&running, input, 10, &Policy::default()),
                Err(Refused::NotAllowed { .. })
            ));
        }
        let timed_out = apply(&job(3), Input::QueueTimeout { limit_ms: 5 });
        assert_eq!(timed_out.state, JobState::Failed);
        assert_eq!(timed_out.error.unwrap().code, "queue_timeout");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = Policy::default();
        let got: Vec<u64> = (1..=7).map(|n| p.backoff_ms(n)).collect();
        assert_eq!(got, [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]);
    }

    #[test]
    fn a_lost_backend_is_retried_at_once_and_counted() {
        let j = dispatch(&job(2), "a");
        let j = apply(
            &j,
            Input::Failed {
                attempt: 1,
                failure: Failure::lost(JobError::new("backend_lost", "gone")),
            },
        );
        assert_eq!(j.state, JobState::Queued);
        assert_eq!(
            j.not_before, 10,
            "no backoff: routing waits for a ready backend"
        );
        assert!(
            j.attempts[0].counted,
            "a workflow that kills every backend still ends"
        );
        let j = dispatch(&j, "a");
        let j = apply(
            &j,
            Input::Failed {
                attempt: 2,
                failure: Failure::lost(JobError::new("backend_lost", "gone")),
            },
        );
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(
            j.error.unwrap().message,
            "gone (gave up after 2 of 2 attempts)"
        );
    }

    #[test]
    fn only_the_workflows_own_trouble_on_a_backend_blocks_it() {
        let blocks = |f: Failure| (f.blocks_workflow(), f.is_backends_fault());
        assert_eq!(blocks(fail(FailureKind::Backend)), (true, true));
        assert_eq!(blocks(fail(FailureKind::Lost)), (false, true));
        assert_eq!(blocks(fail(FailureKind::Workflow)), (false, false));
        assert_eq!(blocks(fail(FailureKind::Missing)), (false, false));
        assert_eq!(blocks(fail(FailureKind::Displaced)), (false, false));
        let excluded = Failure {
            exclude: Some(ExclusionReason::NodeFailed {
                node: "1".into(),
                exception_type: "E".into(),
            }),
            ..fail(FailureKind::Backend)
        };
        assert_eq!(blocks(excluded), (false, true));
    }

    fn retried(kind: FailureKind) -> Applied {
        let j = dispatch(&job(3), "a");
        transition(
            &j,
            Input::Failed {
                attempt: 1,
                failure: fail(kind),
            },
            100,
            &Policy::default(),
        )
        .unwrap()
    }

    #[test]
    fn a_retry_that_routing_says_can_never_run_fails_now() {
        let mut applied = retried(FailureKind::Missing);
        let error = JobError::new("unroutable", "no backend can run this job: a: lacks it");
        settle_retry(&mut applied, Outlook::Never(error.clone()), 100);
        assert_eq!(applied.job.state, JobState::Failed);
        assert_eq!(applied.job.error.as_ref(), Some(&error));
        let names: Vec<&str> = applied.events.iter().map(EventKind::name).collect();
        assert_eq!(names, ["attempt_failed", "failed"]);
        assert!(matches!(
            applied.events[0],
            EventKind::AttemptFailed {
                will_retry: false,
                ..
            }
        ));
    }

    #[test]
    fn a_retry_says_when_it_can_really_start() {
        let waiting = |until| WaitingFor {
            reason: crate::routing::WaitReason::Blocked,
            message: "blocked".into(),
            until,
            backends: Default::default(),
        };
        let mut applied = retried(FailureKind::Backend);
        let backoff_end = applied.job.not_before;
        settle_retry(&mut applied, Outlook::Wait(waiting(Some(60_100))), 100);
        assert_eq!(
            applied.events.last(),
            Some(&EventKind::JobRetrying {
                attempt: 1,
                delay_ms: 60_000,
                not_before: 60_100,
                waiting_for: Some(waiting(Some(60_100))),
            })
        );
        assert_eq!(
            applied.job.not_before, backoff_end,
            "the job itself may go as soon as the hold lifts early (an unblock, a new backend)"
        );
        // Waiting for an event with no known end: the backoff still stands.
        let mut applied = retried(FailureKind::Lost);
        settle_retry(&mut applied, Outlook::Wait(waiting(None)), 100);
        assert!(matches!(
            applied.events.last(),
            Some(EventKind::JobRetrying {
                delay_ms: 0,
                not_before: 100,
                waiting_for: Some(_),
                ..
            })
        ));
        // Ready: nothing changes.
        let mut applied = retried(FailureKind::Backend);
        let before = applied.clone();
        settle_retry(&mut applied, Outlook::Ready, 100);
        assert_eq!(applied, before);
    }
}
