//! An attempt's end for this backend: a timeout recorded then acted on, a failure, a
//! cancel confirmed, and the drain of a prompt gantry gave up on until `/queue` shows it
//! gone.

use gantry_comfy::rest::Outcome;
use gantry_core::watchdog::{Expired, Phase};
use gantry_core::{Failure, Input, JobId};
use serde_json::Value;
use tokio::time::Instant;

use super::outcome::files_of;
use super::{Draining, Driver, Stage};
use crate::clock::now_ms;

impl Driver {
    pub(super) async fn cancel_confirmed(&mut self) {
        let Some(cur) = &self.current else { return };
        let (job_id, attempt) = (cur.a.job_id.clone(), cur.a.attempt);
        self.apply(&job_id, Input::CancelConfirmed { attempt })
            .await;
        self.end_attempt();
    }

    /// The backend did not confirm a cancel in time: the job is cancelled all the same,
    /// and the prompt is drained (it may be a node that ignores interrupts).
    pub(super) async fn stop_grace_passed(&mut self) {
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

    pub(super) async fn timed_out(&mut self, expired: Expired) {
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
    pub(super) async fn stop_on_backend(&self, prompt_id: &str, stage: Option<Stage>) {
        let Some(client) = &self.client else { return };
        if stage != Some(Stage::Executing) {
            // Best effort, each: the drain asks `/queue` until the prompt is gone and
            // says it again (`drain_check`), so a request lost here is repeated there.
            let _ = client.delete_pending(&[prompt_id.to_owned()]).await;
        }
        if stage != Some(Stage::Pending) {
            let _ = client.interrupt(Some(prompt_id)).await;
        }
    }

    /// Record the attempt's failure (the engine marks the backend's health with it, see
    /// `Engine::settle_failure`). With `on_backend`, the prompt may still be there: drain
    /// it before the backend takes anything new.
    pub(super) async fn fail(&mut self, failure: Failure, on_backend: bool) {
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

    pub(super) fn drain(&mut self, since: Instant) {
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
    pub(super) async fn drain_check(&mut self) {
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

    /// The attempt is over for this backend: free it for the next job.
    pub(super) fn end_attempt(&mut self) {
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
