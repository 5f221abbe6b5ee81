//! What the engine asks: run an attempt (or queue it behind the running one, which is
//! pipelining), stop one; and the `current`/`next` pair that pipelining keeps.

use gantry_core::profile::Observed;
use gantry_core::watchdog::Watch;
use gantry_core::{AttemptStatus, Failure, FailureKind, Input, JobError};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use super::{Current, Driver, Stage, Stopping};
use crate::backend::protocol::{Assignment, Command};
use crate::clock::now_ms;

impl Driver {
    pub(super) async fn on_command(&mut self, cmd: Command) {
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
    pub(super) async fn on_stop(&mut self, prompt_id: String, confirm: bool) {
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
                        // The cancel's grace (`stop_grace_passed`) covers an interrupt
                        // that did not land: the prompt is then drained.
                        let _ = client.interrupt(Some(&prompt_id)).await;
                    }
                }
            }
        }
    }

    /// The attempt as the driver starts following it.
    pub(super) fn new_current(&self, a: Box<Assignment>) -> Current {
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

    pub(super) fn swap(&mut self) {
        std::mem::swap(&mut self.current, &mut self.next);
        self.swapped = !self.swapped;
    }

    /// Tell the scheduler whether this backend takes a next prompt behind its current one.
    pub(super) fn set_accepts_next(&self, yes: bool) {
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
    pub(super) async fn after_promotion(&mut self) {
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
    pub(super) async fn evict(&mut self) {
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
    pub(super) async fn dequeue_for_cancel(&mut self) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let Some(pid) = self.current.as_ref().map(|c| c.a.prompt_id.clone()) else {
            return;
        };
        // Whether it landed is read from `/queue` just below.
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
}
