//! Where the prompt ended: found by asking (`/queue` then `/history`), or read back
//! from `/history`; its outputs downloaded and stored before the success is offered.

use gantry_comfy::rest::{FileRef, HistoryEntry, Outcome, Queue};
use gantry_core::{Failure, Input, JobError, Output};
use serde_json::{json, Value};

use crate::clock::now_ms;

use super::{classify, profiling};
use super::{Driver, Stage};

/// The prompts that run before `pid` on a backend: the running one (if not ours), then
/// pending ones with a lower number (`/queue` lists the pending heap unordered).
pub(super) fn ahead_of(queue: &Queue, pid: &str) -> Option<Vec<String>> {
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

/// The name a job's output is downloaded by (`/v1/jobs/{id}/outputs/{name}`): its file
/// name, else `NODE-` before it, else a number too, so that no two outputs of a job
/// share one (the later one could not be reached) and none is empty (no URL reaches it).
pub(super) fn output_name(taken: &[Output], node: &str, filename: &str) -> String {
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

pub(super) fn files_of(entry: &HistoryEntry) -> Vec<(String, FileRef)> {
    let mut out = Vec::new();
    for (node, ui) in &entry.outputs {
        out.extend(files_in(node, ui));
    }
    out
}

pub(super) fn files_in(node: &str, ui: &Value) -> Vec<(String, FileRef)> {
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
    /// Find out where our prompt is: running or pending in the queue, finished in history,
    /// or lost. Queue first: ComfyUI moves a prompt from its queue to history atomically,
    /// so a prompt in neither after that order is really gone.
    pub(super) async fn reconcile(&mut self) {
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

    pub(super) async fn finish_from_history(&mut self, entry: HistoryEntry) {
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
    pub(super) async fn succeed(&mut self, files: Vec<(String, FileRef)>) {
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

    pub(super) async fn node_failed(
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

    pub(super) async fn interrupted(&mut self) {
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
