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
mod table;
#[cfg(test)]
mod tests;
