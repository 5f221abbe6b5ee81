//! Submitting a prompt: the job's attachments uploaded first, then `POST /prompt` under
//! gantry's prompt id, and the answer classified.

use gantry_comfy::client::{Client, Submitted};
use gantry_comfy::rest::PromptRequest;
use gantry_core::watchdog::Timer;
use gantry_core::{Attachment, Failure, Input, JobError};
use std::collections::HashMap;
use std::time::Duration;

use super::classify;
use super::{Current, Driver, Stage};
use crate::engine::Engine;

/// Every file reference in a history entry's UI outputs, with the node that wrote it.
/// Uploads each attachment through the backend's own route, into its `gantry` input
/// subfolder under a name made from the content hash (so two jobs' `face.png` never
/// collide and the same bytes are never uploaded under two names), and answers each
/// attachment's name -> the value the workflow must use there (`subfolder/name`, as the
/// backend answered it).
pub(super) async fn upload_all(
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

/// The input subfolder gantry uploads attachments into.
pub(super) const UPLOAD_SUBFOLDER: &str = "gantry";

/// `<first 16 hex of the hash>-<the name's last segment, made safe>`: keeps the
/// extension, which ComfyUI's file lists filter on.
pub(super) fn backend_file_name(a: &Attachment) -> String {
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

impl Driver {
    pub(super) async fn submit(&mut self) {
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
}
