//! What the WebSocket says of the current prompt: its start, each node (kept in the
//! job's history and fed to the watchdog), progress, its end heard or read back.

use gantry_comfy::client::SessionEvent;
use gantry_comfy::ws::ServerMessage;
use gantry_core::Input;
use serde_json::json;
use tokio::time::Instant;

use crate::bus::{LiveEvent, LiveKind};

use super::outcome::files_in;
use super::profiling;
use super::{close_reason, f64_of, Current, Driver, Stage, HEAR_GRACE};
use crate::clock::now_ms;

impl Driver {
    pub(super) async fn on_message(&mut self, m: ServerMessage) {
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
    pub(super) async fn on_prompt_message(&mut self, m: ServerMessage) {
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

    /// `/history` says the prompt is over, but its messages may still be on their way
    /// on a socket that hears it (ComfyUI sends them from another task than the one that
    /// answers HTTP; a cached prompt often ends before its submit is answered): give
    /// them `HEAR_GRACE`, so its nodes are heard and kept in the job's history rather
    /// than only read back. True when the attempt ended by what was heard.
    pub(super) async fn hear_the_end(&mut self) -> bool {
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

    pub(super) async fn started(&mut self) {
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

    pub(super) async fn end_marker(&mut self) {
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
}
