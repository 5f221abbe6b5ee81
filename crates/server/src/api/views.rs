//! Domain values as the wire shows them (`gantry-api` types): jobs, their profile and
//! callback, backends' rows. Used by the API, the monitor and the webhooks alike.

use gantry_core::{Job, JobId, Millis};

use gantry_api as wire;

use crate::clock::now_ms;
use crate::clock::rfc3339;
use crate::engine::{BackendState, Connection, Engine};
use crate::outputs::{content_type, url_segment};

pub fn opt_time(ms: Option<Millis>) -> Option<String> {
    ms.map(rfc3339)
}

/// A job as a client sees it.
pub fn job_view(job: &Job) -> wire::Job {
    let attempts = job
        .attempts
        .iter()
        .map(|a| wire::Attempt {
            number: a.number,
            backend: a.backend.clone(),
            prompt_id: a.prompt_id.clone(),
            status: a.status,
            created_at: rfc3339(a.created_at),
            submitted_at: opt_time(a.submitted_at),
            started_at: opt_time(a.started_at),
            finished_at: opt_time(a.finished_at),
            error: a.error.clone(),
            profile: a.profile.clone(),
        })
        .collect();
    let outputs = job
        .outputs
        .iter()
        .map(|o| wire::Output {
            name: o.name.clone(),
            node_id: o.node_id.clone(),
            filename: o.filename.clone(),
            subfolder: o.subfolder.clone(),
            kind: o.kind.clone(),
            size: o.size,
            sha256: o.sha256.clone(),
            content_type: content_type(&o.filename).to_owned(),
            url: format!("/v1/jobs/{}/outputs/{}", job.id, url_segment(&o.name)),
        })
        .collect();
    let attachments = job
        .spec
        .attachments
        .iter()
        .map(|a| wire::JobAttachment {
            name: a.name.clone(),
            sha256: a.sha256.clone(),
            size: a.size,
        })
        .collect();
    wire::Job {
        attachments,
        callback: job.spec.callback.as_ref().map(|c| callback_view(c, false)),
        deliveries: Vec::new(),
        id: job.id.to_string(),
        state: job.state,
        phase: job.live_attempt().map(|a| a.status),
        priority: job.spec.priority,
        tags: job.spec.tags.clone(),
        max_attempts: job.spec.max_attempts,
        timeouts: job.spec.timeouts.clone(),
        idempotency_key: job.spec.idempotency_key.clone(),
        metadata: job.spec.metadata.clone(),
        workflow_hash: job.spec.workflow.shape_hash(),
        created_at: rfc3339(job.created_at),
        updated_at: rfc3339(job.updated_at),
        cancel_requested: job.cancel_requested,
        attempts,
        excluded: job.excluded.clone(),
        outputs,
        error: job.error.clone(),
        note: job.note.clone(),
        waiting_for: None,
        owner: job.spec.owner.clone(),
        profile: profile_of(job),
        kind: if job.spec.command.is_some() {
            wire::JobKind::Command
        } else {
            wire::JobKind::Workflow
        },
        command: job.spec.command.as_ref().cloned(),
        // A failed command's result is in its error's details.
        result: job.result.clone().or_else(|| {
            job.spec.command.as_ref()?;
            serde_json::from_value(job.error.as_ref()?.details.get("result")?.clone()).ok()
        }),
    }
}

/// Why a queued job waits, as the engine sees the farm now.
pub(crate) fn waiting_view(engine: &Engine, job: &Job) -> Option<wire::WaitingFor> {
    let w = engine.waiting_for(job)?;
    Some(wire::WaitingFor {
        reason: w.reason,
        message: w.message,
        until: opt_time(w.until),
        backends: w.backends,
    })
}

/// Timings of the job as a whole and of each attempt (each attempt's per-node profile
/// is on the attempt).
pub(crate) fn profile_of(job: &Job) -> wire::Profile {
    let first_start = job.attempts.iter().filter_map(|a| a.started_at).next();
    let end = job.state.is_terminal().then_some(job.updated_at);
    let attempts = job
        .attempts
        .iter()
        .map(|a| wire::AttemptTiming {
            number: a.number,
            backend: a.backend.clone(),
            submit_ms: a.submitted_at.map(|s| s - a.created_at),
            queue_ms: a.submitted_at.zip(a.started_at).map(|(s, t)| t - s),
            execution_ms: a.started_at.zip(a.finished_at).map(|(s, f)| f - s),
        })
        .collect();
    wire::Profile {
        queue_ms: first_start.map(|s| s - job.created_at),
        total_ms: end.map(|e| e - job.created_at),
        attempts,
    }
}

/// A job's webhook as the wire shows it (never its secret); `default` when it is the
/// server's, not the job's own.
pub(crate) fn callback_view(c: &gantry_core::Callback, default: bool) -> wire::JobCallback {
    wire::JobCallback {
        url: c.url.clone(),
        events: c.events.clone(),
        signed: c.secret.is_some(),
        default,
    }
}

/// Every backend as a client sees it now, with when it was last heard from.
pub fn backend_rows(engine: &Engine) -> Vec<(wire::Backend, Option<Millis>)> {
    let (now, stale) = (now_ms(), engine.stale_after_ms());
    type Row = (wire::Backend, Option<Millis>, Option<(JobId, u32)>);
    let views: Vec<Row> = engine
        .backends()
        .values()
        .map(|b| (backend_view(b, now, stale), b.last_seen, b.current.clone()))
        .collect();
    // The progress lock is taken apart from the backends'.
    views
        .into_iter()
        .map(|(mut v, seen, current)| {
            if let Some((job, n)) = current {
                v.progress = engine.progress_of(&job).filter(|p| p.attempt == n);
            }
            (v, seen)
        })
        .collect()
}

/// A backend as a client sees it (without its progress, which the engine keeps apart).
pub(crate) fn backend_view(
    b: &crate::engine::BackendState,
    now: Millis,
    stale_after: Millis,
) -> wire::Backend {
    wire::Backend {
        progress: None,
        name: b.config.name.clone(),
        kind: if b.agent {
            wire::BackendKind::Agent
        } else {
            wire::BackendKind::Url
        },
        allow: b.programs.as_ref().filter(|_| b.agent).map(|p| p.to_vec()),
        url: b.config.url.clone(),
        tags: b.config.tags.clone(),
        priority: b.config.priority,
        status: status_of(b, now, stale_after),
        current_job: b.current.as_ref().map(|(j, _)| j.to_string()),
        current_attempt: b.current.as_ref().map(|(_, n)| *n),
        next_job: b.next.as_ref().map(|(j, _)| j.to_string()),
        last_seen: opt_time(b.last_seen),
        last_used: (b.last_used > 0).then(|| rfc3339(b.last_used)),
        last_error: b.last_error.clone(),
        node_classes: b.classes.as_ref().map(|c| c.len()),
        warm_models: b.warm_models.clone(),
        blocks: b
            .health
            .blocks()
            .iter()
            .map(|(hash, until)| wire::Block {
                workflow_hash: hash.clone(),
                until: rfc3339(*until),
            })
            .collect(),
        circuit: match b.health.circuit() {
            gantry_core::health::Circuit::Closed => wire::Circuit::Closed,
            gantry_core::health::Circuit::Open { since, probe_at } => wire::Circuit::Open {
                since: rfc3339(since),
                probe_at: rfc3339(probe_at),
            },
        },
        stuck: b.stuck.as_ref().map(|(pid, since)| wire::Stuck {
            prompt_id: pid.clone(),
            since: rfc3339(*since),
        }),
    }
}

/// A backend's status from what is true of it now.
pub fn status_of(b: &BackendState, now: Millis, stale_after: Millis) -> wire::BackendStatus {
    use wire::BackendStatus as S;
    let heard_lately = b.last_seen.is_some_and(|t| now - t <= stale_after);
    match (b.connection, &b.current) {
        _ if b.stuck.is_some() => S::Stuck,
        (_, Some(_)) if b.draining => S::Draining,
        _ if b.draining => S::Drained,
        // An agent's supervised ComfyUI keeps exiting: why it cannot be reached.
        (Connection::Connecting | Connection::Offline, _) if b.crash_looping => S::CrashLooping,
        (Connection::Connecting, _) => S::Connecting,
        // Never reached yet from here, while this coordinator drives it: still coming up,
        // as far as anyone knows. (One driven by another coordinator is offline here.)
        (Connection::Offline, _) if !b.connected_once && b.lease.is_some() => S::Connecting,
        (Connection::Offline, _) => S::Offline,
        (Connection::Connected, _) if !b.health.accepts_work() => S::Unhealthy,
        (Connection::Connected, _) if !heard_lately => S::Stale,
        (Connection::Connected, Some(_)) => S::Busy,
        (Connection::Connected, None) if b.health.blocks().values().any(|until| *until > now) => {
            S::Blocked
        }
        (Connection::Connected, None) => S::Idle,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;

    fn backend() -> BackendState {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let config = BackendConfig::parse("a=http://127.0.0.1:1").expect("a backend spec");
        let mut b = BackendState::new(config, tx);
        b.connection = Connection::Connected;
        b.connected_once = true;
        b.last_seen = Some(1_000);
        b
    }

    #[test]
    fn status_comes_from_live_facts() {
        use wire::BackendStatus as S;
        let mut b = backend();
        assert_eq!(status_of(&b, 1_500, 1_000), S::Idle);
        // Nothing heard for longer than the interval: stale, whatever it said last.
        assert_eq!(status_of(&b, 2_001, 1_000), S::Stale);
        b.last_seen = Some(2_000);
        let policy = gantry_core::health::HealthPolicy {
            block_ms: 3_000,
            circuit_threshold: 0,
            ..Default::default()
        };
        b.health.on_fault(Some("shape"), 2_000, &policy);
        assert_eq!(status_of(&b, 2_500, 1_000), S::Blocked);
        // A block that has ended no longer counts, lifted yet or not.
        b.last_seen = Some(5_000);
        assert_eq!(status_of(&b, 5_001, 1_000), S::Idle);
        b.current = Some((gantry_core::JobId::random(), 1));
        b.health.on_fault(Some("shape"), 5_000, &policy);
        // Busy with blocks beside it shows busy (the blocks are in the row).
        assert_eq!(status_of(&b, 5_500, 1_000), S::Busy);
        b.draining = true;
        assert_eq!(status_of(&b, 5_500, 1_000), S::Draining);
        b.draining = false;
        b.connection = Connection::Offline;
        assert_eq!(status_of(&b, 5_500, 1_000), S::Offline);
        b.connection = Connection::Connecting;
        assert_eq!(status_of(&b, 5_500, 1_000), S::Connecting);
        // Not reached once yet: a failed connect is no reason to say it went away.
        b.connection = Connection::Offline;
        b.connected_once = false;
        assert_eq!(status_of(&b, 5_500, 1_000), S::Connecting);
    }
}
