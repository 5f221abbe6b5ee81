//! The driver's connection to its ComfyUI: waking on timers, connecting (`/object_info`,
//! then the WebSocket), losing the socket, idle and circuit probes.

use gantry_comfy::client::SessionEvent;
use gantry_core::profile::Observed;
use gantry_core::{Failure, Input, JobError};
use std::collections::HashSet;
use tokio::time::Instant;

use super::{close_reason, Driver, Stage, BACKOFF_MAX, BACKOFF_MIN};
use crate::clock::now_ms;
use crate::engine::Connection;

impl Driver {
    pub(super) async fn on_wake(&mut self) {
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
    pub(super) async fn idle_probe(&mut self) {
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
    pub(super) async fn probe(&mut self) {
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

    pub(super) async fn connect(&mut self) {
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

    pub(super) async fn on_event(&mut self, event: Option<SessionEvent>) {
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

    pub(super) fn disconnected(&mut self, why: String) {
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
}
