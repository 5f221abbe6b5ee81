//! Command jobs on the coordinator's side: one task per command attempt that asks the
//! attempt's agent to run the program (`agents::Agents::start_command`), publishes each
//! line it writes as a `log` event on the job's stream, and turns how it ended into the
//! job's transition. The agent enforces the allow-list and the time limit and kills the
//! whole process group; this task only bounds how long it waits for the agent's word.

use gantry_core::{CommandResult, ExclusionReason, Failure, FailureKind, Input, JobError};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::backend::protocol::Assignment;
use crate::bus::{LiveEvent, LiveKind};
use crate::engine::{now_ms, Engine};

/// How long past the time limit and the kill grace the agent may take to say how the
/// command ended before the attempt counts as lost.
const WORD_SLACK: Duration = Duration::from_secs(10);
/// The most of a command's output kept in its log; later lines are counted.
const MAX_LOG: usize = 8 * 1024 * 1024;

/// A command's whole output as it is heard.
#[derive(Default)]
struct Log {
    bytes: Vec<u8>,
    cut: u64,
}

impl Log {
    fn line(&mut self, line: &str) {
        if self.bytes.len() + line.len() < MAX_LOG {
            self.bytes.extend_from_slice(line.as_bytes());
            self.bytes.push(b'\n');
        } else {
            self.cut += 1;
        }
    }

    /// Stored in the outputs' content store; `None` (logged) if the disk refuses.
    async fn keep(mut self, engine: &Engine, dropped: u64) -> Option<gantry_core::CommandLog> {
        if self.cut > 0 {
            let note = format!(
                "[gantry: {} more lines not kept past {MAX_LOG} bytes]\n",
                self.cut
            );
            self.bytes.extend_from_slice(note.as_bytes());
        }
        if dropped > 0 {
            let note =
                format!("[gantry: {dropped} lines the agent could not stream are missing]\n");
            self.bytes.extend_from_slice(note.as_bytes());
        }
        let size = self.bytes.len() as u64;
        match engine.outputs().put(self.bytes.into()).await {
            Ok(sha256) => Some(gantry_core::CommandLog { sha256, size }),
            Err(e) => {
                tracing::error!(error = %e, "cannot keep a command's log");
                None
            }
        }
    }
}

/// Runs command attempt `a` on agent `backend` until it ends; `stop` carries the
/// engine's stop requests (`true`: a cancel that waits for the agent's confirmation).
pub async fn run(
    engine: Engine,
    backend: String,
    a: Box<Assignment>,
    mut stop: mpsc::UnboundedReceiver<bool>,
) {
    let Some(command) = a.command.clone() else {
        return;
    };
    let job = a.job_id.to_string();
    let agents = engine.agents();
    let limit = engine.config().command_timeout(&command);
    let grace = engine.config().cancel_grace;
    let outcome = if a.adopt {
        // The coordinator restarted (or took the backend over) while the command ran:
        // the agent stopped it when the old link dropped.
        Some(backend_failure(
            &a,
            "command_lost",
            format!("the link to agent {backend} was lost while the command ran, and the agent stopped it"),
        ))
    } else {
        let request = json!({
            "type": "command",
            "job": job,
            "attempt": a.attempt,
            "argv": command.argv,
            "env": command.env,
            "cwd": command.cwd,
            "timeout_ms": limit.as_millis() as u64,
            "grace_ms": grace.as_millis() as u64,
        });
        match agents.start_command(&backend, request).await {
            Err(e) => Some(backend_failure(
                &a,
                "agent_unlinked",
                format!("cannot start the command: {e}"),
            )),
            Ok(rx) => {
                engine
                    .apply_or_log(&a.job_id, Input::Submitted { attempt: a.attempt })
                    .await;
                follow(&engine, &backend, &a, rx, &mut stop, limit, grace).await
            }
        }
    };
    if let Some(input) = outcome {
        if let Err(e) = engine.apply_held(&a.job_id, input).await {
            tracing::error!(job_id = %a.job_id, error = %e, "cannot record a command's end");
        }
    }
    agents.forget_command(&backend, &job, a.attempt);
    if let Some(b) = engine.backends().get_mut(&backend) {
        if b.current.as_ref() == Some(&(a.job_id.clone(), a.attempt)) {
            b.current = None;
        }
        b.last_used = now_ms();
    }
    engine.wake_scheduler();
}

/// Follows the agent's messages about the attempt; answers the input that ends it (none
/// when the job already ended some other way, a deadline say).
async fn follow(
    engine: &Engine,
    backend: &str,
    a: &Assignment,
    mut rx: mpsc::UnboundedReceiver<Value>,
    stop: &mut mpsc::UnboundedReceiver<bool>,
    limit: Duration,
    grace: Duration,
) -> Option<Input> {
    let job = a.job_id.to_string();
    let program = a
        .command
        .as_ref()
        .map(|c| c.program().to_owned())
        .unwrap_or_default();
    let mut give_up = Instant::now() + limit + grace + WORD_SLACK;
    let mut deadline = a
        .deadline
        .map(|(at, _)| Instant::now() + Duration::from_millis((at - now_ms()).max(0) as u64));
    // A cancel waits for the agent's word that the group is gone, and so does a stop
    // without confirmation (the job ended already: `abandoned`), so that the agent
    // takes nothing new while the old program's group is still being killed.
    let mut cancelling = false;
    let mut abandoned = false;
    let mut log = Log::default();
    // The agent's word did not come: a cancel is over all the same, anything else lost.
    let unheard = |cancelling: bool, message: String| {
        if cancelling {
            Input::CancelConfirmed { attempt: a.attempt }
        } else {
            backend_failure(a, "command_lost", message)
        }
    };
    loop {
        let deadline_at = deadline.unwrap_or(give_up);
        tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else {
                    return (!abandoned).then(|| backend_failure(a, "command_lost", "the agent's link closed".into()));
                };
                match m["type"].as_str() {
                    Some("command_started") => {
                        engine.apply_or_log(&a.job_id, Input::Started { attempt: a.attempt }).await;
                    }
                    Some("command_output") => {
                        let line = m["line"].as_str().unwrap_or_default().to_owned();
                        log.line(&line);
                        engine.publish_live(LiveEvent {
                            job_id: a.job_id.clone(),
                            attempt: a.attempt,
                            backend: backend.to_owned(),
                            kind: LiveKind::Log {
                                stream: m["stream"].as_str().unwrap_or("stdout").to_owned(),
                                line,
                            },
                        })
                    }
                    Some("command_exit") if abandoned || cancelling => {
                        return (!abandoned).then_some(Input::CancelConfirmed { attempt: a.attempt });
                    }
                    Some("command_exit") => {
                        let kept = log.keep(engine, m["dropped"].as_u64().unwrap_or(0)).await;
                        return Some(ended(a, &program, &m, kept));
                    }
                    Some("command_lost") if abandoned => return None,
                    Some("command_lost") => {
                        return Some(unheard(
                            cancelling,
                            format!("the link to agent {backend} dropped while the command ran; the agent stops it"),
                        ))
                    }
                    _ => {}
                }
            }
            s = stop.recv(), if !cancelling && !abandoned => {
                engine.agents().cancel_command(backend, &job, a.attempt).await;
                match s {
                    Some(true) => cancelling = true,
                    // Over for gantry already (or the engine let go of this backend).
                    Some(false) | None => abandoned = true,
                }
                give_up = give_up.min(Instant::now() + grace + WORD_SLACK);
            }
            _ = tokio::time::sleep_until(deadline_at), if deadline.is_some() => {
                deadline = None;
                let limit_ms = a.deadline.map_or(0, |(_, ms)| ms);
                engine.apply_or_log(&a.job_id, Input::DeadlinePassed { limit_ms }).await;
                engine.agents().cancel_command(backend, &job, a.attempt).await;
                abandoned = true;
                give_up = give_up.min(Instant::now() + grace + WORD_SLACK);
            }
            _ = tokio::time::sleep_until(give_up) => {
                engine.agents().cancel_command(backend, &job, a.attempt).await;
                if abandoned {
                    return None;
                }
                return Some(unheard(
                    cancelling,
                    format!("agent {backend} said nothing of the command within its limit ({limit:?}) and the kill grace"),
                ));
            }
        }
    }
}

/// The attempt failed for the agent's sake (not the command's): retried, counted.
fn backend_failure(a: &Assignment, code: &str, message: String) -> Input {
    Input::Failed {
        attempt: a.attempt,
        failure: Failure::lost(JobError::new(code, message)),
    }
}

/// The input for the agent's `command_exit`.
fn ended(a: &Assignment, program: &str, m: &Value, log: Option<gantry_core::CommandLog>) -> Input {
    let result = CommandResult {
        exit_code: m["exit_code"].as_i64().map(|c| c as i32),
        signal: m["signal"].as_i64().map(|s| s as i32),
        tail: m["tail"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(|l| l.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        log,
    };
    let details = json!({"result": result, "program": program});
    let failure = |kind, code: &str, message: String, exclude| Input::Failed {
        attempt: a.attempt,
        failure: Failure {
            kind,
            error: JobError::new(code, message).with_details(details.clone()),
            exclude,
        },
    };
    let message = m["message"].as_str().unwrap_or_default().to_owned();
    match m["outcome"].as_str() {
        Some("exited") if result.exit_code == Some(0) => Input::Succeeded {
            attempt: a.attempt,
            outputs: Vec::new(),
            result: Some(result),
        },
        Some("exited") => {
            let how = match (result.exit_code, result.signal) {
                (Some(code), _) => format!("exited with code {code}"),
                (None, Some(sig)) => format!("was killed by signal {sig}"),
                (None, None) => "ended".to_owned(),
            };
            failure(
                FailureKind::Workflow,
                "command_failed",
                format!("{program} {how}"),
                None,
            )
        }
        Some("timed_out") => failure(
            FailureKind::Workflow,
            "command_timeout",
            format!(
                "{program} ran past its limit of {:?}; its process group was killed",
                Duration::from_millis(m["timeout_ms"].as_u64().unwrap_or_default())
            ),
            None,
        ),
        Some("refused") => failure(
            FailureKind::Missing,
            "command_not_allowed",
            message,
            Some(ExclusionReason::NotAllowed {
                program: program.to_owned(),
            }),
        ),
        Some("cancelled") => failure(
            FailureKind::Lost,
            "command_lost",
            "the agent stopped the command".to_owned(),
            None,
        ),
        _ => failure(
            FailureKind::Workflow,
            "command_spawn_failed",
            format!("cannot start {program}: {message}"),
            None,
        ),
    }
}
